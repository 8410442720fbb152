//! Development PKI: a fleet CA for vehicles, a hospital CA for the ingest and ED clients, and
//! their leaf certificates. Production deployments bring their own PKI (see the README).
#![warn(missing_docs)]

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevocationReason, RevokedCertParams, SerialNumber,
};

#[derive(Debug, thiserror::Error)]
/// Why the development PKI could not be written.
pub enum DevCertError {
    #[error("certificate generation: {0}")]
    /// rcgen could not make a key or certificate.
    Rcgen(#[from] rcgen::Error),
    #[error("writing {path}: {source}")]
    /// A file or directory could not be written.
    Io {
        /// The file or directory.
        path: PathBuf,
        #[source]
        /// The operating system's error.
        source: std::io::Error,
    },
    #[error("the system clock is outside the range of certificate dates")]
    /// The system clock cannot be turned into a certificate date.
    Clock,
    #[error("{0:?} is not a valid name (1-64 of [A-Za-z0-9._-])")]
    /// A vehicle or subscriber name that would clash with the CA files or escape the directory.
    BadName(String),
}

/// What to create.
#[derive(Debug, Clone)]
pub struct DevPki {
    /// Vehicle ids; each gets `<id>.pem` / `<id>.key` signed by the fleet CA.
    pub vehicles: Vec<String>,
    /// ED client names; each gets a client certificate from the hospital CA.
    pub subscribers: Vec<String>,
    /// DNS names and IP addresses of the ingest certificate.
    pub ingest_names: Vec<String>,
    /// Leaf certificates are valid this many days from now (the CAs twice as long).
    pub valid_days: u32,
}

impl Default for DevPki {
    fn default() -> Self {
        Self {
            vehicles: vec!["amb-1".into()],
            subscribers: vec!["ed-console".into()],
            ingest_names: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            valid_days: 365,
        }
    }
}

struct Ca {
    params: CertificateParams,
    key: KeyPair,
}

fn write(path: PathBuf, contents: &str) -> Result<(), DevCertError> {
    fs::write(&path, contents).map_err(|source| DevCertError::Io { path, source })
}

/// Keys are readable by their owner only, from the moment the file exists.
fn write_key(path: PathBuf, contents: &str) -> Result<(), DevCertError> {
    relay_ops::private::write_file(&path, contents.as_bytes())
        .map_err(|source| DevCertError::Io { path, source })
}

fn now() -> Result<time::OffsetDateTime, DevCertError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    time::OffsetDateTime::from_unix_timestamp(i64::try_from(now).unwrap_or(i64::MAX))
        .map_err(|_| DevCertError::Clock)
}

/// From an hour ago (clock skew) to `days` from now.
fn validity(params: &mut CertificateParams, days: u32) -> Result<(), DevCertError> {
    let now = now()?;
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
    Ok(())
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::OrganizationName,
        relay_ops::pem::DEV_PKI_ORGANIZATION,
    );
    dn.push(DnType::CommonName, cn);
    dn
}

/// The parameters every development CA is made with (its validity aside).
fn ca_params(cn: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// Common name of the development fleet CA.
const FLEET_CA_CN: &str = "Fleet CA (development)";

/// Writes `fleet-ca.crl.pem` into `dir`, signed by the fleet CA there, revoking the
/// certificates of `vehicles` (none: an empty list, so an ingest can load it from the start).
pub fn revoke(dir: &Path, vehicles: &[String]) -> Result<PathBuf, DevCertError> {
    write_crl(dir, "fleet-ca", FLEET_CA_CN, vehicles)
}

/// Writes `hospital-ca.crl.pem` into `dir`, signed by the hospital CA there, revoking the
/// certificates of ED clients `subscribers` (none: an empty list).
pub fn revoke_subscribers(dir: &Path, subscribers: &[String]) -> Result<PathBuf, DevCertError> {
    write_crl(dir, "hospital-ca", HOSPITAL_CA_CN, subscribers)
}

/// Writes `<ca>.crl.pem`, revoking the certificates `<name>.pem` in `dir` of each of `names`.
fn write_crl(dir: &Path, ca: &str, ca_cn: &str, names: &[String]) -> Result<PathBuf, DevCertError> {
    let io = |path: PathBuf| move |source| DevCertError::Io { path, source };
    let ca_key = load_ca(dir, ca, ca_cn)?;
    let issuer = Issuer::from_params(&ca_key.params, &ca_key.key);
    let mut revoked = Vec::new();
    for v in names {
        check_name(v)?;
        let path = dir.join(format!("{v}.pem"));
        let pem = fs::read(&path).map_err(io(path.clone()))?;
        let serial = x509_parser::pem::parse_x509_pem(&pem)
            .ok()
            .and_then(|(_, p)| {
                p.parse_x509()
                    .ok()
                    .map(|c| c.tbs_certificate.raw_serial().to_vec())
            })
            .ok_or_else(|| DevCertError::BadName(v.clone()))?;
        revoked.push(RevokedCertParams {
            serial_number: SerialNumber::from_slice(&serial),
            revocation_time: now()?,
            reason_code: Some(RevocationReason::KeyCompromise),
            invalidity_date: None,
        });
    }
    let now = now()?;
    let crl = CertificateRevocationListParams {
        this_update: now - time::Duration::hours(1),
        next_update: now + time::Duration::days(30),
        crl_number: SerialNumber::from(u64::try_from(now.unix_timestamp()).unwrap_or(0)),
        issuing_distribution_point: None,
        revoked_certs: revoked,
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&issuer)?;
    let out = dir.join(format!("{ca}.crl.pem"));
    write(out.clone(), &crl.pem()?)?;
    Ok(out)
}

/// Common name of the development hospital CA.
const HOSPITAL_CA_CN: &str = "Hospital CA (development)";

/// The CA `name` (`<name>.key` in `dir`, common name `cn`), to issue from again.
fn load_ca(dir: &Path, name: &str, cn: &str) -> Result<Ca, DevCertError> {
    let key_path = dir.join(format!("{name}.key"));
    let key_pem = fs::read_to_string(&key_path).map_err(|source| DevCertError::Io {
        path: key_path,
        source,
    })?;
    Ok(Ca {
        params: ca_params(cn),
        key: KeyPair::from_pem(&key_pem)?,
    })
}

/// Issues a new ingest certificate and key (`ingest.pem/.key`) from the hospital CA in `dir`,
/// as a certificate rotation does; the ingest serves it after SIGHUP.
pub fn reissue_ingest(dir: &Path, pki: &DevPki) -> Result<(), DevCertError> {
    let ca = load_ca(dir, "hospital-ca", HOSPITAL_CA_CN)?;
    make_leaf(
        dir,
        "ingest",
        "hospital-ingest",
        pki.ingest_names.clone(),
        &[ExtendedKeyUsagePurpose::ServerAuth],
        &ca,
        pki.valid_days.max(1),
    )
}

/// Issues a new certificate and key for `vehicle` from the fleet CA in `dir` (a renewal: same
/// vehicle id, new key and serial).
pub fn reissue_vehicle(dir: &Path, vehicle: &str, days: u32) -> Result<(), DevCertError> {
    let ca = load_ca(dir, "fleet-ca", FLEET_CA_CN)?;
    make_leaf(
        dir,
        vehicle,
        vehicle,
        vec![],
        &[ExtendedKeyUsagePurpose::ClientAuth],
        &ca,
        days.max(1),
    )
}

/// Issues `<file>.pem` and `<file>.key` for `vehicle` from the fleet CA in `dir`, valid from
/// two days ago until yesterday: what a router whose renewal failed presents (for tests of
/// its refusal).
pub fn issue_expired_vehicle(dir: &Path, file: &str, vehicle: &str) -> Result<(), DevCertError> {
    check_name(file)?;
    check_name(vehicle)?;
    let ca = load_ca(dir, "fleet-ca", FLEET_CA_CN)?;
    let now = now()?;
    let window = (now - time::Duration::days(2), now - time::Duration::days(1));
    make_leaf_valid(
        dir,
        file,
        vehicle,
        vec![],
        &[ExtendedKeyUsagePurpose::ClientAuth],
        &ca,
        window,
    )
}

/// Creates a CA and writes `<name>.pem` and `<name>.key` into `dir`.
fn make_ca(dir: &Path, name: &str, cn: &str, days: u32) -> Result<Ca, DevCertError> {
    let mut params = ca_params(cn);
    validity(&mut params, days)?;
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write(dir.join(format!("{name}.pem")), &cert.pem())?;
    write_key(dir.join(format!("{name}.key")), &key.serialize_pem())?;
    Ok(Ca { params, key })
}

fn make_leaf(
    dir: &Path,
    file: &str,
    cn: &str,
    sans: Vec<String>,
    usages: &[ExtendedKeyUsagePurpose],
    ca: &Ca,
    days: u32,
) -> Result<(), DevCertError> {
    let now = now()?;
    // From an hour ago (clock skew).
    let window = (
        now - time::Duration::hours(1),
        now + time::Duration::days(i64::from(days)),
    );
    make_leaf_valid(dir, file, cn, sans, usages, ca, window)
}

fn make_leaf_valid(
    dir: &Path,
    file: &str,
    cn: &str,
    sans: Vec<String>,
    usages: &[ExtendedKeyUsagePurpose],
    ca: &Ca,
    (not_before, not_after): (time::OffsetDateTime, time::OffsetDateTime),
) -> Result<(), DevCertError> {
    let mut params = CertificateParams::new(sans)?;
    params.not_before = not_before;
    params.not_after = not_after;
    params.distinguished_name = dn(cn);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = usages.to_vec();
    let key = KeyPair::generate()?;
    let issuer = Issuer::from_params(&ca.params, &ca.key);
    let cert = params.signed_by(&key, &issuer)?;
    write(dir.join(format!("{file}.pem")), &cert.pem())?;
    write_key(dir.join(format!("{file}.key")), &key.serialize_pem())?;
    Ok(())
}

/// Refuses a leaf name that would clash with the CA files or escape the directory.
fn check_name(name: &str) -> Result<(), DevCertError> {
    if !relay_proto::is_valid_vehicle_id(name)
        || name.ends_with("-ca")
        || name == "ingest"
        || name == ED_WEB_SERVER
        || name == NATS_NODE
    {
        return Err(DevCertError::BadName(name.to_owned()));
    }
    Ok(())
}

/// Writes a complete development PKI into `dir`:
/// `fleet-ca.pem`, `hospital-ca.pem`, `ingest.pem/.key`, `ed-web-server.pem/.key` (ed-web's
/// HTTPS certificate, same names as the ingest's), `nats-node.pem/.key` (the NATS nodes',
/// server and client), `ingest-nats.pem/.key` (the ingest's client certificate for NATS), `<vehicle>.pem/.key`,
/// `<subscriber>.pem/.key` (CA keys too, so more leaves can be made by hand).
pub fn generate(dir: &Path, pki: &DevPki) -> Result<(), DevCertError> {
    for name in pki.vehicles.iter().chain(&pki.subscribers) {
        check_name(name)?;
    }
    relay_ops::private::create_dir(dir).map_err(|source| DevCertError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let days = pki.valid_days.max(1);
    let ca_days = days.saturating_mul(2);
    let fleet = make_ca(dir, "fleet-ca", FLEET_CA_CN, ca_days)?;
    let hospital = make_ca(dir, "hospital-ca", HOSPITAL_CA_CN, ca_days)?;
    make_leaf(
        dir,
        "ingest",
        "hospital-ingest",
        pki.ingest_names.clone(),
        &[ExtendedKeyUsagePurpose::ServerAuth],
        &hospital,
        days,
    )?;
    make_leaf(
        dir,
        NATS_NODE,
        "nats-node",
        pki.ingest_names.clone(),
        &[
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        &hospital,
        days,
    )?;
    make_leaf(
        dir,
        NATS_INGEST_CLIENT,
        NATS_INGEST_IDENTITY,
        vec![NATS_INGEST_IDENTITY.to_owned()],
        &[ExtendedKeyUsagePurpose::ClientAuth],
        &hospital,
        days,
    )?;
    make_leaf(
        dir,
        ED_WEB_SERVER,
        "ed-web",
        pki.ingest_names.clone(),
        &[ExtendedKeyUsagePurpose::ServerAuth],
        &hospital,
        days,
    )?;
    for v in &pki.vehicles {
        make_leaf(
            dir,
            v,
            v,
            vec![],
            &[ExtendedKeyUsagePurpose::ClientAuth],
            &fleet,
            days,
        )?;
    }
    for s in &pki.subscribers {
        make_leaf(
            dir,
            s,
            s,
            vec![],
            &[ExtendedKeyUsagePurpose::ClientAuth],
            &hospital,
            days,
        )?;
    }
    // An empty revocation list, so an ingest can be pointed at it from the start.
    revoke(dir, &[])?;
    revoke_subscribers(dir, &[])?;
    write_access_policy(dir, &pki.subscribers)?;
    Ok(())
}

/// File stem of the ingest's client certificate for the NATS cluster (the JetStream store's
/// credentials; each ingest node has its own in production).
pub const NATS_INGEST_CLIENT: &str = "ingest-nats";

/// The identity the NATS cluster maps that certificate to (its common name and DNS
/// subjectAltName; `NATS_INGEST_USER` in deploy/nats/nats.conf).
pub const NATS_INGEST_IDENTITY: &str = "hospital-ingest-nats";

/// File stem of the NATS nodes' certificate in a development PKI: server and client
/// authentication both, as cluster routes need (a node dials its peers).
pub const NATS_NODE: &str = "nats-node";

/// File stem of ed-web's HTTPS server certificate in a development PKI.
pub const ED_WEB_SERVER: &str = "ed-web-server";

/// Name of the development access policy [`generate`] writes beside the certificates.
pub const ACCESS_POLICY: &str = "access-policy.toml";

/// Writes `access-policy.toml`: every development ED client may read every vehicle (the
/// ingest's `grpc.access_policy`; a real deployment writes its own, README "Security").
fn write_access_policy(dir: &Path, subscribers: &[String]) -> Result<(), DevCertError> {
    let names: Vec<String> = subscribers.iter().map(|s| format!("{s:?}")).collect();
    let text = format!(
        "# Development access policy (relay-devcerts): every development ED client may read\n\
         # every vehicle. Never use it in production.\n\
         [[rule]]\n\
         name = \"development ED clients\"\n\
         subject_cn = [{}]\n\
         all_vehicles = true\n",
        names.join(", ")
    );
    write(dir.join(ACCESS_POLICY), &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_parseable_pki_with_vehicle_ids_as_common_names() {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki {
            vehicles: vec!["amb-1".into(), "amb-2".into()],
            ..DevPki::default()
        };
        generate(dir.path(), &pki).unwrap();
        for f in [
            "fleet-ca",
            "hospital-ca",
            "ingest",
            "amb-1",
            "amb-2",
            "ed-console",
        ] {
            let certs = relay_ops::pem::load_certs(&dir.path().join(format!("{f}.pem"))).unwrap();
            relay_ops::pem::load_key(&dir.path().join(format!("{f}.key"))).unwrap();
            if f.starts_with("amb") {
                assert_eq!(hospital_ingest::tls::vehicle_id(&certs[0]).unwrap(), f);
            }
        }
    }

    #[test]
    fn refuses_names_that_would_clash_or_escape() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["../x", "ingest", "fleet-ca", ""] {
            let pki = DevPki {
                vehicles: vec![bad.into()],
                ..DevPki::default()
            };
            assert!(generate(dir.path(), &pki).is_err(), "{bad}");
        }
    }
}
