//! Agent configuration: a TOML file with every key optional (embedded defaults), and CLI flags
//! that override single values without clobbering the rest of the file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use crate::scheduler::Policy;
pub use relay_ops::config::ConfigError;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Vehicle id; must equal the common name of the vehicle certificate.
    pub vehicle_id: String,
    pub ingest: IngestEndpoint,
    pub tls: TlsFiles,
    pub framing: Framing,
    pub buffer: Buffer,
    pub reconnect: Reconnect,
    pub metrics: Metrics,
    /// Cellular bearers: one QUIC connection each.
    pub bearers: Vec<BearerConfig>,
    pub scheduling: Scheduling,
    pub spool: SpoolConfig,
    pub sources: Vec<SourceConfig>,
}

/// One bearer (modem): its own local address or network interface.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BearerConfig {
    /// Name used in logs and metric labels.
    pub name: String,
    /// Local address to bind (the modem's address, or 0.0.0.0:0 with `interface`).
    #[serde(default = "any_address")]
    pub bind: SocketAddr,
    /// Network interface to bind with SO_BINDTODEVICE (Linux; needs CAP_NET_RAW).
    #[serde(default)]
    pub interface: Option<String>,
    /// Ingest address over this bearer when it differs from `ingest.address` (a carrier's
    /// private APN, or a link emulator in tests).
    #[serde(default)]
    pub remote: Option<SocketAddr>,
    /// Bytes this bearer may send per `budget_period_s` (metered SIM); beyond it the bearer is
    /// used only when no other can carry.
    #[serde(default)]
    pub budget_bytes: Option<u64>,
    #[serde(default = "default_budget_period")]
    pub budget_period_s: u64,
}

fn any_address() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}
fn default_budget_period() -> u64 {
    30 * 24 * 3600
}

impl std::str::FromStr for BearerConfig {
    type Err = String;

    /// `NAME=ADDRESS` or `NAME=ADDRESS@INTERFACE`, e.g. `wan1=0.0.0.0:0@wwan1`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("bearer {s:?}: expected NAME=ADDRESS[@INTERFACE]"))?;
        let (addr, interface) = match rest.split_once('@') {
            Some((a, i)) => (a, Some(i.to_owned())),
            None => (rest, None),
        };
        let bind = addr
            .parse()
            .map_err(|e| format!("bearer {name}: address {addr:?}: {e}"))?;
        Ok(Self {
            interface,
            ..Self::new(name, bind)
        })
    }
}

impl BearerConfig {
    /// A bearer bound to `bind`, without interface, remote override or budget.
    pub fn new(name: &str, bind: SocketAddr) -> Self {
        Self {
            name: name.to_owned(),
            bind,
            interface: None,
            remote: None,
            budget_bytes: None,
            budget_period_s: default_budget_period(),
        }
    }
}

/// How frames are spread over the bearers.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Scheduling {
    /// Policy per class: "fastest", "redundant" (best two bearers) or "backup" (the first
    /// configured bearer while it is up, others only when it is not).
    pub events: Policy,
    pub waveforms: Policy,
    pub vitals: Policy,
    pub location: Policy,
    pub bulk: Policy,
    /// Frames younger than this form the live lane and go before any backlog, milliseconds.
    pub live_window_ms: u64,
    /// Per bearer: bytes sent and not yet acknowledged at most.
    pub max_in_flight_bytes: usize,
    /// Floor of the loss-detection time (2*SRTT + 4*RTTVAR), milliseconds.
    pub suspect_floor_ms: u64,
    /// A suspect bearer is down after this much more silence, milliseconds.
    pub down_after_ms: u64,
    /// Probe (QUIC keep-alive) interval on every bearer, milliseconds.
    pub probe_interval_ms: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// Crash-safe store of unacknowledged frames (created if missing).
    pub path: PathBuf,
    /// Commit (fsync) interval, milliseconds: at most this much data is at risk on power loss.
    pub sync_interval_ms: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IngestEndpoint {
    /// UDP address of the ingest's QUIC endpoint.
    pub address: SocketAddr,
    /// Name the ingest certificate must carry.
    pub server_name: String,
    /// Connection considered dead after this long without any packet, milliseconds.
    pub idle_timeout_ms: u64,
    /// Per bearer: frames sent and not yet acknowledged at most (each on its own QUIC stream).
    pub max_in_flight_frames: usize,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsFiles {
    /// CA that signed the ingest certificate (pinned; the system store is never used).
    pub ca_cert: PathBuf,
    /// This vehicle's certificate chain (PEM).
    pub cert: PathBuf,
    /// This vehicle's private key (PEM).
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Framing {
    /// Duration of one waveform frame, milliseconds.
    pub frame_ms: u32,
    /// Largest encoded frame; must not exceed the ingest's bound.
    pub max_frame_bytes: usize,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Buffer {
    /// Bytes of frames kept until acknowledged; when full, the lowest-priority oldest frames
    /// are evicted (and counted).
    pub max_unacked_bytes: usize,
    /// On shutdown, keep delivering unacknowledged frames this long, milliseconds.
    pub stop_drain_ms: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Reconnect {
    /// Backoff after the ingest refused or closed a connection attempt.
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// While a bearer's path is silent, a new connection attempt starts this often.
    pub redial_interval_ms: u64,
    /// Handshake (QUIC + Hello) must finish within this, milliseconds.
    pub handshake_timeout_ms: u64,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Metrics {
    /// Prometheus endpoint (`GET /metrics`); none when absent.
    pub listen: Option<SocketAddr>,
}

/// A data source; each becomes one stream.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, tag = "type", rename_all = "snake_case")]
pub enum SourceConfig {
    /// Replays a PhysioNet WFDB record.
    Wfdb {
        /// Record path without extension, e.g. `data/ecg/100`.
        record: PathBuf,
        /// Replay speed factor (1 = real time).
        #[serde(default = "one")]
        speed: f64,
        /// Start again at the end (sample indices keep counting).
        #[serde(default)]
        r#loop: bool,
        #[serde(default = "ecg_name")]
        name: String,
    },
    /// 12-lead ECG generator.
    SyntheticEcg {
        #[serde(default = "default_ecg_rate")]
        rate_hz: u32,
        #[serde(default = "default_heart_rate")]
        heart_rate_bpm: f64,
        #[serde(default = "ecg_name")]
        name: String,
    },
    /// HR, SpO2, NIBP, RR, EtCO2 and temperature.
    SyntheticVitals {
        #[serde(default = "default_interval")]
        interval_ms: u64,
    },
    /// A GPS track.
    SyntheticGps {
        #[serde(default = "default_interval")]
        interval_ms: u64,
        #[serde(default = "default_lat")]
        start_latitude_deg: f64,
        #[serde(default = "default_lon")]
        start_longitude_deg: f64,
    },
}

fn one() -> f64 {
    1.0
}
fn ecg_name() -> String {
    "ecg".into()
}
fn default_ecg_rate() -> u32 {
    500
}
fn default_heart_rate() -> f64 {
    72.0
}
fn default_interval() -> u64 {
    1000
}
fn default_lat() -> f64 {
    52.5200
}
fn default_lon() -> f64 {
    13.4050
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            vehicle_id: "amb-1".into(),
            ingest: IngestEndpoint::default(),
            tls: TlsFiles::default(),
            framing: Framing::default(),
            buffer: Buffer::default(),
            reconnect: Reconnect::default(),
            metrics: Metrics::default(),
            bearers: vec![BearerConfig::new("wan0", any_address())],
            scheduling: Scheduling::default(),
            spool: SpoolConfig::default(),
            sources: vec![
                SourceConfig::SyntheticEcg {
                    rate_hz: default_ecg_rate(),
                    heart_rate_bpm: default_heart_rate(),
                    name: ecg_name(),
                },
                SourceConfig::SyntheticVitals {
                    interval_ms: default_interval(),
                },
                SourceConfig::SyntheticGps {
                    interval_ms: default_interval(),
                    start_latitude_deg: default_lat(),
                    start_longitude_deg: default_lon(),
                },
            ],
        }
    }
}

impl Default for IngestEndpoint {
    fn default() -> Self {
        Self {
            address: SocketAddr::from(([127, 0, 0, 1], 4433)),
            server_name: "localhost".into(),
            idle_timeout_ms: 10_000,
            max_in_flight_frames: 256,
        }
    }
}

impl Default for TlsFiles {
    fn default() -> Self {
        Self {
            ca_cert: "certs/hospital-ca.pem".into(),
            cert: "certs/amb-1.pem".into(),
            key: "certs/amb-1.key".into(),
        }
    }
}

impl Default for Framing {
    fn default() -> Self {
        Self {
            frame_ms: 40,
            max_frame_bytes: relay_proto::DEFAULT_MAX_FRAME_BYTES,
        }
    }
}

impl Default for Buffer {
    fn default() -> Self {
        Self {
            max_unacked_bytes: 64 * 1024 * 1024,
            stop_drain_ms: 3_000,
        }
    }
}

impl Default for Scheduling {
    fn default() -> Self {
        Self {
            // ECG is the clinical payload and small (about 12 kB/s for 12 leads at 500 Hz):
            // two bearers carry every frame, so a hole in one costs nothing.
            events: Policy::Redundant,
            waveforms: Policy::Redundant,
            vitals: Policy::Fastest,
            location: Policy::Fastest,
            bulk: Policy::Backup,
            live_window_ms: 1_000,
            max_in_flight_bytes: 4 * 1024 * 1024,
            suspect_floor_ms: 60,
            down_after_ms: 1_000,
            probe_interval_ms: 250,
        }
    }
}

impl Scheduling {
    pub fn policies(&self) -> [Policy; relay_proto::Class::COUNT] {
        [
            self.events,
            self.waveforms,
            self.vitals,
            self.location,
            self.bulk,
        ]
    }
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            path: "spool/vehicle-agent.redb".into(),
            sync_interval_ms: 100,
        }
    }
}

impl Default for Reconnect {
    fn default() -> Self {
        Self {
            initial_backoff_ms: 200,
            max_backoff_ms: 5_000,
            redial_interval_ms: 500,
            handshake_timeout_ms: 4_000,
        }
    }
}

/// Flags that override the file. Every field is optional so an absent flag keeps the file's value.
#[derive(Debug, Clone, Default, clap::Parser)]
#[command(
    name = "vehicle-agent",
    version,
    about = "Streams ambulance telemetry to the hospital ingest over QUIC with mutual TLS"
)]
pub struct Cli {
    /// TOML configuration file (see deploy/config/vehicle-agent.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub vehicle_id: Option<String>,
    /// Ingest QUIC address, e.g. 127.0.0.1:4433.
    #[arg(long)]
    pub ingest: Option<SocketAddr>,
    #[arg(long)]
    pub server_name: Option<String>,
    #[arg(long)]
    pub ca_cert: Option<PathBuf>,
    #[arg(long)]
    pub cert: Option<PathBuf>,
    #[arg(long)]
    pub key: Option<PathBuf>,
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    #[arg(long)]
    pub frame_ms: Option<u32>,
    /// Spool file (overrides spool.path).
    #[arg(long)]
    pub spool: Option<PathBuf>,
    /// Bearers, replacing the configured list: NAME=ADDRESS[@INTERFACE], repeated.
    #[arg(long = "bearer")]
    pub bearers: Vec<BearerConfig>,
    /// Replace the configured ECG source by a WFDB record replay.
    #[arg(long)]
    pub wfdb_record: Option<PathBuf>,
    /// Replay speed for --wfdb-record.
    #[arg(long, requires = "wfdb_record")]
    pub speed: Option<f64>,
    /// Loop --wfdb-record.
    #[arg(long = "loop", requires = "wfdb_record")]
    pub r#loop: bool,
}

/// Modems on one router, at most.
pub const MAX_BEARERS: usize = 8;

impl AgentConfig {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        relay_ops::config::read_toml(path)
    }

    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        relay_ops::config::parse_toml(text, path)
    }

    /// Loads the file named by `cli.config` (or the defaults), applies the flags, validates.
    pub fn load(cli: &Cli) -> Result<Self, ConfigError> {
        let mut cfg = match &cli.config {
            Some(p) => Self::from_file(p)?,
            None => Self::default(),
        };
        cfg.apply(cli);
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn apply(&mut self, cli: &Cli) {
        if let Some(v) = &cli.vehicle_id {
            self.vehicle_id = v.clone();
        }
        if let Some(v) = cli.ingest {
            self.ingest.address = v;
        }
        if let Some(v) = &cli.server_name {
            self.ingest.server_name = v.clone();
        }
        if let Some(v) = &cli.ca_cert {
            self.tls.ca_cert = v.clone();
        }
        if let Some(v) = &cli.cert {
            self.tls.cert = v.clone();
        }
        if let Some(v) = &cli.key {
            self.tls.key = v.clone();
        }
        if let Some(v) = cli.metrics_listen {
            self.metrics.listen = Some(v);
        }
        if let Some(v) = cli.frame_ms {
            self.framing.frame_ms = v;
        }
        if let Some(v) = &cli.spool {
            self.spool.path = v.clone();
        }
        if !cli.bearers.is_empty() {
            self.bearers = cli.bearers.clone();
        }
        if let Some(record) = &cli.wfdb_record {
            let replay = SourceConfig::Wfdb {
                record: record.clone(),
                speed: cli.speed.unwrap_or(1.0),
                r#loop: cli.r#loop,
                name: ecg_name(),
            };
            let ecg = self.sources.iter().position(|s| {
                matches!(
                    s,
                    SourceConfig::Wfdb { .. } | SourceConfig::SyntheticEcg { .. }
                )
            });
            match ecg {
                Some(i) => self.sources[i] = replay,
                None => self.sources.insert(0, replay),
            }
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if !relay_proto::is_valid_vehicle_id(&self.vehicle_id) {
            return bad(format!(
                "vehicle_id {:?} must be 1-64 of [A-Za-z0-9._-]",
                self.vehicle_id
            ));
        }
        if !(1..=1000).contains(&self.framing.frame_ms) {
            return bad("framing.frame_ms must be 1..=1000".into());
        }
        if self.framing.max_frame_bytes < 1024 {
            return bad("framing.max_frame_bytes must be at least 1024".into());
        }
        if self.ingest.max_in_flight_frames == 0 {
            return bad("ingest.max_in_flight_frames must be positive".into());
        }
        if self.buffer.max_unacked_bytes < self.framing.max_frame_bytes {
            return bad("buffer.max_unacked_bytes must hold at least one frame".into());
        }
        if self.reconnect.redial_interval_ms == 0 || self.reconnect.handshake_timeout_ms == 0 {
            return bad("reconnect: redial_interval_ms and handshake_timeout_ms positive".into());
        }
        if self.reconnect.initial_backoff_ms == 0
            || self.reconnect.max_backoff_ms < self.reconnect.initial_backoff_ms
        {
            return bad("reconnect: 0 < initial_backoff_ms <= max_backoff_ms".into());
        }
        if self.sources.is_empty() {
            return bad("at least one source is needed".into());
        }
        if self.bearers.is_empty() || self.bearers.len() > MAX_BEARERS {
            return bad(format!("1..={MAX_BEARERS} bearers are needed"));
        }
        let mut names = std::collections::HashSet::new();
        for b in &self.bearers {
            if !relay_proto::is_valid_vehicle_id(&b.name) || !names.insert(&b.name) {
                return bad(format!(
                    "bearer name {:?} must be unique, 1-64 of [A-Za-z0-9._-]",
                    b.name
                ));
            }
            if b.budget_period_s == 0 {
                return bad(format!(
                    "bearer {}: budget_period_s must be positive",
                    b.name
                ));
            }
        }
        let sc = &self.scheduling;
        if sc.live_window_ms == 0
            || sc.suspect_floor_ms == 0
            || sc.probe_interval_ms == 0
            || sc.max_in_flight_bytes < self.framing.max_frame_bytes
        {
            return bad(
                "scheduling: windows and intervals positive, max_in_flight_bytes >= max_frame_bytes"
                    .into(),
            );
        }
        if !(1..=200).contains(&self.spool.sync_interval_ms) {
            return bad(
                "spool.sync_interval_ms must be 1..=200 (data at risk on power loss)".into(),
            );
        }
        for s in &self.sources {
            match s {
                SourceConfig::Wfdb { speed, .. }
                    if !(speed.is_finite() && *speed > 0.0 && *speed <= 10_000.0) =>
                {
                    return bad(format!("wfdb speed {speed} must be in (0, 10000]"));
                }
                SourceConfig::SyntheticEcg {
                    rate_hz,
                    heart_rate_bpm,
                    ..
                } if !(50..=2000).contains(rate_hz) || !(20.0..=300.0).contains(heart_rate_bpm) => {
                    return bad("synthetic_ecg: rate_hz 50..=2000, heart_rate_bpm 20..=300".into());
                }
                SourceConfig::SyntheticVitals { interval_ms }
                | SourceConfig::SyntheticGps { interval_ms, .. }
                    if *interval_ms < 10 =>
                {
                    return bad("interval_ms must be at least 10".into());
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn shipped_example_config_parses_and_validates() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/vehicle-agent.toml");
        let cfg = AgentConfig::from_file(&path).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.sources.len(), 3);
    }

    #[test]
    fn flags_override_only_what_they_name() {
        let toml = r#"
            vehicle_id = "amb-7"
            [ingest]
            address = "10.0.0.1:5000"
            server_name = "ingest.example"
            [framing]
            frame_ms = 20
        "#;
        let mut cfg = AgentConfig::from_toml(toml, Path::new("t.toml")).unwrap();
        let cli = Cli::parse_from([
            "vehicle-agent",
            "--ingest",
            "127.0.0.1:9",
            "--wfdb-record",
            "x/100",
            "--speed",
            "4",
        ]);
        cfg.apply(&cli);
        assert_eq!(cfg.vehicle_id, "amb-7");
        assert_eq!(cfg.ingest.address, "127.0.0.1:9".parse().unwrap());
        assert_eq!(cfg.ingest.server_name, "ingest.example");
        assert_eq!(cfg.framing.frame_ms, 20);
        assert!(matches!(&cfg.sources[0], SourceConfig::Wfdb { speed, .. } if *speed == 4.0));
        assert_eq!(
            cfg.sources.len(),
            3,
            "the ECG source is replaced, not added"
        );
    }

    #[test]
    fn bearers_and_spool_from_flags_and_their_bounds() {
        let cli = Cli::parse_from([
            "vehicle-agent",
            "--bearer",
            "wan0=10.0.0.2:0",
            "--bearer",
            "wan1=0.0.0.0:0@wwan1",
            "--spool",
            "/var/lib/x.redb",
        ]);
        let mut cfg = AgentConfig::default();
        cfg.apply(&cli);
        cfg.validate().unwrap();
        assert_eq!(cfg.bearers.len(), 2);
        assert_eq!(cfg.bearers[0].bind, "10.0.0.2:0".parse().unwrap());
        assert_eq!(cfg.bearers[1].interface.as_deref(), Some("wwan1"));
        assert_eq!(cfg.spool.path, Path::new("/var/lib/x.redb"));
        assert!("wan0".parse::<BearerConfig>().is_err(), "address missing");

        let mut twice = cfg.clone();
        twice.bearers[1].name = "wan0".into();
        assert!(twice.validate().is_err(), "bearer names are labels: unique");
        let mut none = cfg.clone();
        none.bearers.clear();
        assert!(none.validate().is_err());
        let mut slow = cfg.clone();
        slow.spool.sync_interval_ms = 500;
        assert!(slow.validate().is_err(), "more than 200 ms of data at risk");
        let toml = r#"
            [[bearers]]
            name = "lte-a"
            interface = "wwan0"
            budget_bytes = 1000000
            [scheduling]
            waveforms = "fastest"
        "#;
        let cfg = AgentConfig::from_toml(toml, Path::new("t.toml")).unwrap();
        assert_eq!(cfg.bearers[0].budget_bytes, Some(1_000_000));
        assert_eq!(cfg.scheduling.waveforms, Policy::Fastest);
        assert_eq!(cfg.scheduling.events, Policy::Redundant, "default kept");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = AgentConfig::from_toml("vehicle_idd = \"x\"", Path::new("t.toml")).unwrap_err();
        assert!(err.to_string().contains("vehicle_idd"), "{err}");
    }

    #[test]
    fn invalid_values_are_refused() {
        let cfg = AgentConfig {
            vehicle_id: "no spaces".into(),
            ..AgentConfig::default()
        };
        assert!(cfg.validate().is_err());
        let mut cfg = AgentConfig::default();
        cfg.framing.frame_ms = 0;
        assert!(cfg.validate().is_err());
    }
}
