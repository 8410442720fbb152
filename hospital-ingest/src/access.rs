//! Who may read which patient: the subscriber access policy (sans-IO). A client certificate
//! becomes a [`ClientIdentity`]; the policy's rules that match it give it a [`Grant`] (vehicles
//! and stream kinds); the gRPC service lists and delivers only what the grant allows and
//! refuses requests beyond it.
//!
//! ```toml
//! # One rule per role; a client gets the union of every rule it matches.
//! [[rule]]
//! name = "ed-vienna"
//! subject_cn = ["ed-console"]            # any of: subject_cn, san, issuer_cn
//! fleets = ["vienna"]                    # and/or vehicles = [...], vehicle_prefixes = [...]
//! kinds = ["waveform", "vitals", "events"]  # default: every kind
//!
//! [fleet.vienna]
//! vehicles = ["amb-1"]
//! vehicle_prefixes = ["vie-"]
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use relay_proto::model::StreamKind;
use serde::Deserialize;

/// Why a policy file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML of this shape.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: std::path::PathBuf,
        /// What the parser said.
        #[source]
        source: toml::de::Error,
    },
    /// A rule is incomplete or names something that does not exist.
    #[error("{path}: rule {rule:?}: {problem}")]
    Rule {
        /// The file.
        path: std::path::PathBuf,
        /// The rule's name.
        rule: String,
        /// What is wrong with it.
        problem: String,
    },
}

/// The identity of a client certificate, as the policy and the audit log see it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientIdentity {
    /// Subject common name.
    pub subject_cn: Option<String>,
    /// The whole subject, RFC 4514.
    pub subject: String,
    /// Subject alternative names (DNS, URI, e-mail), as written.
    pub sans: Vec<String>,
    /// Issuer common name.
    pub issuer_cn: Option<String>,
    /// Serial number, hexadecimal.
    pub serial: String,
    /// SHA-256 of the certificate (DER), hexadecimal.
    pub fingerprint: String,
}

impl ClientIdentity {
    /// The identity of a certificate (DER), or `None` when it does not parse.
    pub fn from_der(der: &[u8]) -> Option<Self> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let cn = |name: &x509_parser::x509::X509Name<'_>| {
            name.iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map(str::to_owned)
        };
        let mut sans = Vec::new();
        if let Ok(Some(ext)) = cert.subject_alternative_name() {
            for name in &ext.value.general_names {
                match name {
                    GeneralName::DNSName(s) | GeneralName::URI(s) | GeneralName::RFC822Name(s) => {
                        sans.push((*s).to_owned());
                    }
                    _ => {}
                }
            }
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        Some(Self {
            subject_cn: cn(cert.subject()),
            subject: cert.subject().to_string(),
            sans,
            issuer_cn: cn(cert.issuer()),
            serial: hex(cert.tbs_certificate.raw_serial()),
            fingerprint: hex(digest.as_ref()),
        })
    }

    /// Short form for logs and error messages: the subject CN, else the subject.
    pub fn name(&self) -> &str {
        self.subject_cn.as_deref().unwrap_or(&self.subject)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The policy file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessPolicy {
    /// The rules; a client gets the union of those it matches, nothing when none does.
    #[serde(default, rename = "rule")]
    pub rules: Vec<Rule>,
    /// Named groups of vehicles that rules refer to.
    #[serde(default, rename = "fleet")]
    pub fleets: BTreeMap<String, Fleet>,
}

/// Vehicles by id or id prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fleet {
    /// Vehicle ids.
    #[serde(default)]
    pub vehicles: Vec<String>,
    /// Every vehicle whose id starts with one of these.
    #[serde(default)]
    pub vehicle_prefixes: Vec<String>,
}

/// Who (any matcher) may read what (vehicles, kinds).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Shown in logs and the audit log.
    pub name: String,
    /// Client certificates with one of these subject common names.
    #[serde(default)]
    pub subject_cn: Vec<String>,
    /// Client certificates with one of these subject alternative names.
    #[serde(default)]
    pub san: Vec<String>,
    /// Client certificates issued by a CA with one of these common names.
    #[serde(default)]
    pub issuer_cn: Vec<String>,
    /// Every vehicle.
    #[serde(default)]
    pub all_vehicles: bool,
    /// Vehicle ids.
    #[serde(default)]
    pub vehicles: Vec<String>,
    /// Every vehicle whose id starts with one of these.
    #[serde(default)]
    pub vehicle_prefixes: Vec<String>,
    /// Fleets (`[fleet.NAME]`).
    #[serde(default)]
    pub fleets: Vec<String>,
    /// Stream kinds: events, waveform, vitals, location; empty: all of them.
    #[serde(default)]
    pub kinds: Vec<String>,
}

/// Every stream kind a grant can name, by its policy name.
const KINDS: [(&str, StreamKind); 4] = [
    ("events", StreamKind::Events),
    ("waveform", StreamKind::Waveform),
    ("vitals", StreamKind::Vitals),
    ("location", StreamKind::Location),
];

impl AccessPolicy {
    /// Reads and checks a policy file.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and checks policy text (`path` only names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, PolicyError> {
        let policy: Self = toml::from_str(text).map_err(|source| PolicyError::Parse {
            path: path.to_owned(),
            source,
        })?;
        for rule in &policy.rules {
            let problem = policy.rule_problem(rule);
            if let Some(problem) = problem {
                return Err(PolicyError::Rule {
                    path: path.to_owned(),
                    rule: rule.name.clone(),
                    problem,
                });
            }
        }
        Ok(policy)
    }

    fn rule_problem(&self, rule: &Rule) -> Option<String> {
        if rule.subject_cn.is_empty() && rule.san.is_empty() && rule.issuer_cn.is_empty() {
            return Some("names no client (subject_cn, san or issuer_cn)".into());
        }
        let scoped = rule.all_vehicles
            || !rule.vehicles.is_empty()
            || !rule.vehicle_prefixes.is_empty()
            || !rule.fleets.is_empty();
        if !scoped {
            return Some(
                "grants no vehicle (all_vehicles, vehicles, vehicle_prefixes or fleets)".into(),
            );
        }
        if let Some(f) = rule.fleets.iter().find(|f| !self.fleets.contains_key(*f)) {
            return Some(format!("fleet {f:?} is not defined"));
        }
        let ids = rule
            .vehicles
            .iter()
            .chain(self.fleets.values().flat_map(|f| &f.vehicles));
        if let Some(v) = ids
            .into_iter()
            .find(|v| !relay_proto::is_valid_vehicle_id(v))
        {
            return Some(format!("{v:?} is not a vehicle id"));
        }
        if let Some(k) = rule.kinds.iter().find(|k| kind_by_name(k).is_none()) {
            return Some(format!(
                "unknown kind {k:?} (events, waveform, vitals, location)"
            ));
        }
        None
    }

    /// What `client` may read: the union of the rules that match it (nothing when none does).
    pub fn grant(&self, client: &ClientIdentity) -> Grant {
        let mut parts = Vec::new();
        for rule in self.rules.iter().filter(|r| r.matches(client)) {
            let mut vehicles: BTreeSet<String> = rule.vehicles.iter().cloned().collect();
            let mut prefixes: Vec<String> = rule.vehicle_prefixes.clone();
            for fleet in rule.fleets.iter().filter_map(|f| self.fleets.get(f)) {
                vehicles.extend(fleet.vehicles.iter().cloned());
                prefixes.extend(fleet.vehicle_prefixes.iter().cloned());
            }
            let kinds = if rule.kinds.is_empty() {
                KINDS.iter().map(|(_, k)| *k as i32).collect()
            } else {
                rule.kinds
                    .iter()
                    .filter_map(|k| kind_by_name(k))
                    .map(|k| k as i32)
                    .collect()
            };
            parts.push(GrantPart {
                rule: rule.name.clone(),
                all_vehicles: rule.all_vehicles,
                vehicles,
                prefixes,
                kinds,
            });
        }
        Grant { parts }
    }

    /// A policy that lets clients with these subject common names read everything (tests,
    /// the demo).
    pub fn everything_for(subject_cns: &[&str]) -> Self {
        Self {
            rules: vec![Rule {
                name: "everything".into(),
                subject_cn: subject_cns.iter().map(|s| (*s).to_owned()).collect(),
                all_vehicles: true,
                ..Rule::default()
            }],
            fleets: BTreeMap::new(),
        }
    }
}

fn kind_by_name(name: &str) -> Option<StreamKind> {
    KINDS.iter().find(|(n, _)| *n == name).map(|(_, k)| *k)
}

impl Rule {
    fn matches(&self, client: &ClientIdentity) -> bool {
        let cn = |names: &[String], value: &Option<String>| {
            value.as_ref().is_some_and(|v| names.contains(v))
        };
        cn(&self.subject_cn, &client.subject_cn)
            || cn(&self.issuer_cn, &client.issuer_cn)
            || client.sans.iter().any(|s| self.san.contains(s))
    }
}

/// What one client may read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grant {
    parts: Vec<GrantPart>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct GrantPart {
    rule: String,
    all_vehicles: bool,
    vehicles: BTreeSet<String>,
    prefixes: Vec<String>,
    kinds: BTreeSet<i32>,
}

impl GrantPart {
    fn covers(&self, vehicle: &str) -> bool {
        self.all_vehicles
            || self.vehicles.contains(vehicle)
            || self
                .prefixes
                .iter()
                .any(|p| vehicle.starts_with(p.as_str()))
    }
}

impl Grant {
    /// Whether the client may read streams of `kind` of `vehicle`.
    pub fn allows(&self, vehicle: &str, kind: i32) -> bool {
        self.parts
            .iter()
            .any(|p| p.kinds.contains(&kind) && p.covers(vehicle))
    }

    /// Whether the client may see `vehicle` at all (some kind of it).
    pub fn sees(&self, vehicle: &str) -> bool {
        self.parts.iter().any(|p| p.covers(vehicle))
    }

    /// Whether some vehicle's `kind` is readable.
    pub fn reads_kind(&self, kind: i32) -> bool {
        self.parts.iter().any(|p| p.kinds.contains(&kind))
    }

    /// Whether the client may read nothing at all.
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// The names of the rules the grant comes from (for the audit log).
    pub fn rules(&self) -> Vec<&str> {
        self.parts.iter().map(|p| p.rule.as_str()).collect()
    }
}

/// The policy in force, replaced on reload; a generation number tells subscriptions that
/// their grant must be worked out again.
#[derive(Debug, Default)]
pub struct AccessControl {
    policy: std::sync::RwLock<Option<std::sync::Arc<AccessPolicy>>>,
    generation: std::sync::atomic::AtomicU64,
}

impl AccessControl {
    /// Starts with `policy` (None: nobody may read patient data).
    pub fn new(policy: Option<AccessPolicy>) -> std::sync::Arc<Self> {
        let control = Self::default();
        control.set(policy);
        std::sync::Arc::new(control)
    }

    /// Replaces the policy; grants are worked out anew from now on, live subscriptions too.
    pub fn set(&self, policy: Option<AccessPolicy>) {
        *self
            .policy
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = policy.map(std::sync::Arc::new);
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// The current generation (changes with every [`AccessControl::set`]).
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// What `client` may read now, and the generation it was worked out under.
    pub fn grant(&self, client: &ClientIdentity) -> (Grant, u64) {
        let generation = self.generation();
        let policy = self
            .policy
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let grant = policy.map(|p| p.grant(client)).unwrap_or_default();
        (grant, generation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
[[rule]]
name = "amb-1 only"
subject_cn = ["ed-amb1"]
vehicles = ["amb-1"]

[[rule]]
name = "vienna positions"
san = ["dispatch.vienna.example"]
fleets = ["vienna"]
kinds = ["location"]

[[rule]]
name = "hospital ca"
issuer_cn = ["Other CA"]
all_vehicles = true
kinds = ["vitals"]

[fleet.vienna]
vehicles = ["amb-9"]
vehicle_prefixes = ["vie-"]
"#;

    fn client(cn: &str, sans: &[&str], issuer: &str) -> ClientIdentity {
        ClientIdentity {
            subject_cn: Some(cn.into()),
            sans: sans.iter().map(|s| (*s).to_owned()).collect(),
            issuer_cn: Some(issuer.into()),
            ..ClientIdentity::default()
        }
    }

    const W: i32 = StreamKind::Waveform as i32;
    const V: i32 = StreamKind::Vitals as i32;
    const L: i32 = StreamKind::Location as i32;

    #[test]
    fn a_client_reads_what_its_rules_grant_and_nothing_else() {
        let p = AccessPolicy::parse(POLICY, Path::new("p.toml")).unwrap();
        let amb1 = p.grant(&client("ed-amb1", &[], "Hospital CA"));
        assert!(amb1.allows("amb-1", W) && amb1.allows("amb-1", L));
        assert!(!amb1.allows("amb-2", W) && !amb1.sees("amb-2"));

        let dispatch = p.grant(&client("x", &["dispatch.vienna.example"], "Hospital CA"));
        assert!(dispatch.allows("amb-9", L) && dispatch.allows("vie-17", L));
        assert!(!dispatch.allows("vie-17", W), "positions only");
        assert!(!dispatch.sees("amb-1"));
        assert!(dispatch.reads_kind(L) && !dispatch.reads_kind(W));

        let by_issuer = p.grant(&client("anyone", &[], "Other CA"));
        assert!(by_issuer.allows("amb-5", V) && !by_issuer.allows("amb-5", W));

        let stranger = p.grant(&client("ed-console", &[], "Hospital CA"));
        assert!(stranger.is_empty() && !stranger.sees("amb-1"));
    }

    #[test]
    fn a_client_matching_several_rules_gets_their_union() {
        let p = AccessPolicy::parse(POLICY, Path::new("p.toml")).unwrap();
        let both = p.grant(&client("ed-amb1", &["dispatch.vienna.example"], "Other CA"));
        assert!(both.allows("amb-1", W));
        assert!(both.allows("vie-3", L) && both.allows("vie-3", V) && !both.allows("vie-3", W));
        assert_eq!(
            both.rules(),
            vec!["amb-1 only", "vienna positions", "hospital ca"]
        );
    }

    #[test]
    fn incomplete_or_dangling_rules_are_refused_with_their_name() {
        for (text, problem) in [
            (
                "[[rule]]\nname = \"r\"\nall_vehicles = true\n",
                "names no client",
            ),
            (
                "[[rule]]\nname = \"r\"\nsubject_cn = [\"a\"]\n",
                "grants no vehicle",
            ),
            (
                "[[rule]]\nname = \"r\"\nsubject_cn = [\"a\"]\nfleets = [\"x\"]\n",
                "fleet \"x\" is not defined",
            ),
            (
                "[[rule]]\nname = \"r\"\nsubject_cn = [\"a\"]\nall_vehicles = true\nkinds = [\"ecg\"]\n",
                "unknown kind",
            ),
            (
                "[[rule]]\nname = \"r\"\nsubject_cn = [\"a\"]\nvehicles = [\"a b\"]\n",
                "not a vehicle id",
            ),
        ] {
            let err = AccessPolicy::parse(text, Path::new("p.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(problem) && err.contains("p.toml"), "{err}");
        }
        let err = AccessPolicy::parse("[[rules]]\n", Path::new("p.toml")).unwrap_err();
        assert!(matches!(err, PolicyError::Parse { .. }), "{err}");
    }

    #[test]
    fn an_empty_policy_grants_nothing() {
        let p = AccessPolicy::parse("", Path::new("p.toml")).unwrap();
        assert!(
            p.grant(&client("ed-console", &[], "Hospital CA"))
                .is_empty()
        );
    }
}
