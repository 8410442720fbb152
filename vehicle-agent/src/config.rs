//! Agent configuration: one struct, [`AgentConfig`], read from a TOML file (every key
//! optional, embedded defaults, unknown keys refused) and overridden key by key by flags
//! (`--help` lists them; an absent flag keeps the file's value). Durations are written as
//! durations (`"500ms"`, `"10s"`); the keys of earlier versions (`*_ms`, `*_s`) are refused
//! with a message naming their replacement. `deploy/config/vehicle-agent.toml` shows every key
//! with its default (a test holds it to that).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser};
use relay_ops::config::{MetricsConfig, Rename, invalid, parse_duration, positive};

pub use relay_ops::config::ServiceConfig;
use serde::{Deserialize, Serialize};

pub use crate::scheduler::Policy;
pub use relay_ops::config::ConfigError;

/// Keys of earlier versions and their replacements.
pub const RENAMED_KEYS: &[Rename] = &[
    ("ingest.idle_timeout_ms", "ingest.idle_timeout"),
    ("scheduling.live_window_ms", "scheduling.live_window"),
    ("scheduling.suspect_floor_ms", "scheduling.suspect_floor"),
    ("scheduling.down_after_ms", "scheduling.down_after"),
    ("scheduling.probe_interval_ms", "scheduling.probe_interval"),
    ("spool.sync_interval_ms", "spool.sync_interval"),
    ("framing.frame_ms", "framing.frame"),
    ("buffer.stop_drain_ms", "buffer.stop_drain"),
    ("reconnect.initial_backoff_ms", "reconnect.initial_backoff"),
    ("reconnect.max_backoff_ms", "reconnect.max_backoff"),
    ("reconnect.redial_interval_ms", "reconnect.redial_interval"),
    (
        "reconnect.handshake_timeout_ms",
        "reconnect.handshake_timeout",
    ),
    ("bearers[].budget_period_s", "bearers[].budget_period"),
    ("sources[].interval_ms", "sources[].interval"),
];

/// Modems on one router, at most.
pub const MAX_BEARERS: usize = 8;

/// Streams ambulance telemetry to the hospital ingest over QUIC with mutual TLS.
///
/// The agent's whole configuration. Every setting has a default; --config names a TOML file
/// (see deploy/config/vehicle-agent.toml) and each flag overrides one key of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Parser)]
#[serde(deny_unknown_fields, default)]
#[command(name = "vehicle-agent", version)]
pub struct AgentConfig {
    /// Vehicle id; must equal the common name of the vehicle certificate.
    #[arg(long)]
    pub vehicle_id: String,
    /// TOML configuration file; flags override single keys of it.
    #[serde(skip)]
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Accept certificates of the development PKI (relay-devcerts): demos and tests only.
    #[serde(skip)]
    #[arg(long)]
    pub allow_dev_pki: bool,
    /// The hospital ingest.
    #[command(flatten)]
    pub ingest: IngestEndpoint,
    /// This vehicle's certificate and the pinned ingest CA.
    #[command(flatten)]
    pub tls: TlsFiles,
    /// How waveforms are cut into frames.
    #[command(flatten)]
    pub framing: Framing,
    /// What is held until acknowledged.
    #[command(flatten)]
    pub buffer: Buffer,
    /// How bearers reconnect.
    #[command(flatten)]
    pub reconnect: Reconnect,
    /// The Prometheus endpoint.
    #[command(flatten)]
    pub metrics: MetricsConfig,
    /// Cellular bearers, one QUIC connection each: `NAME=ADDRESS[@INTERFACE]`, repeated; the
    /// flags replace the file's list.
    #[arg(long = "bearer")]
    pub bearers: Vec<BearerConfig>,
    /// How frames are spread over the bearers.
    #[command(flatten)]
    pub scheduling: Scheduling,
    /// The crash-safe spool.
    #[command(flatten)]
    pub spool: SpoolConfig,
    /// The crew's clinical events.
    #[command(flatten)]
    pub events: EventsConfig,
    /// Data sources, each one stream (`[[sources]]` in the file; --wfdb-record on the command
    /// line).
    #[arg(skip)]
    pub sources: Vec<SourceConfig>,
    /// Command-line shortcut for a WFDB replay source.
    #[serde(skip)]
    #[command(flatten)]
    pub replay: ReplayFlags,
}

/// One bearer (modem): its own local address or network interface.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BearerConfig {
    /// Name used in logs and metric labels.
    pub name: String,
    /// Local address to bind (the modem's address, or 0.0.0.0:0 with `interface`).
    #[serde(default = "any_address")]
    pub bind: SocketAddr,
    /// Network interface to bind with SO_BINDTODEVICE (Linux; needs CAP_NET_RAW).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// Ingest address over this bearer when it differs from `ingest.address` (a carrier's
    /// private APN, or a link emulator in tests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<SocketAddr>,
    /// With `remote`: other ingest nodes over this bearer, dialled in turn when `remote`
    /// cannot be reached or drops the connection (without `remote` the bearer uses
    /// `ingest.fallback_addresses`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallback_remotes: Vec<SocketAddr>,
    /// Bytes this bearer may send per `budget_period` (metered SIM); beyond it the bearer is
    /// used only when no other can carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_bytes: Option<u64>,
    /// The period of `budget_bytes`.
    #[serde(default = "default_budget_period", with = "humantime_serde")]
    pub budget_period: Duration,
}

fn any_address() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}

fn default_budget_period() -> Duration {
    Duration::from_secs(30 * 24 * 3600)
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
    /// The ingest addresses this bearer dials, preferred first.
    pub fn remotes(&self, ingest: &IngestEndpoint) -> Vec<SocketAddr> {
        match self.remote {
            Some(r) => std::iter::once(r)
                .chain(self.fallback_remotes.iter().copied())
                .collect(),
            None => std::iter::once(ingest.address)
                .chain(ingest.fallback_addresses.iter().copied())
                .collect(),
        }
    }

    /// A bearer bound to `bind`, without interface, remote override or budget.
    pub fn new(name: &str, bind: SocketAddr) -> Self {
        Self {
            name: name.to_owned(),
            bind,
            interface: None,
            remote: None,
            fallback_remotes: Vec::new(),
            budget_bytes: None,
            budget_period: default_budget_period(),
        }
    }
}

/// How frames are spread over the bearers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(deny_unknown_fields, default)]
pub struct Scheduling {
    /// Policy for events: "fastest", "redundant" (best two bearers) or "backup" (the first
    /// configured bearer while it is up, others only when it is not).
    #[arg(long = "scheduling-events")]
    pub events: Policy,
    /// Policy for ECG and other waveforms.
    #[arg(long = "scheduling-waveforms")]
    pub waveforms: Policy,
    /// Policy for vital signs.
    #[arg(long = "scheduling-vitals")]
    pub vitals: Policy,
    /// Policy for position reports.
    #[arg(long = "scheduling-location")]
    pub location: Policy,
    /// Policy for anything else.
    #[arg(long = "scheduling-bulk")]
    pub bulk: Policy,
    /// Frames younger than this form the live lane and go before any backlog.
    #[serde(with = "humantime_serde")]
    #[arg(long = "scheduling-live-window", value_parser = parse_duration)]
    pub live_window: Duration,
    /// Per bearer: bytes sent and not yet acknowledged at most.
    #[arg(long = "scheduling-max-in-flight-bytes")]
    pub max_in_flight_bytes: usize,
    /// Floor of the loss-detection time (2*SRTT + 4*RTTVAR).
    #[serde(with = "humantime_serde")]
    #[arg(long = "scheduling-suspect-floor", value_parser = parse_duration)]
    pub suspect_floor: Duration,
    /// A suspect bearer is down after this much more silence.
    #[serde(with = "humantime_serde")]
    #[arg(long = "scheduling-down-after", value_parser = parse_duration)]
    pub down_after: Duration,
    /// Probe (QUIC keep-alive) interval on every bearer.
    #[serde(with = "humantime_serde")]
    #[arg(long = "scheduling-probe-interval", value_parser = parse_duration)]
    pub probe_interval: Duration,
}

/// The crew's local API for clinical events (README "Clinical events").
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, Args)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Unix socket of the crew's event API (created owner-only); the agent then declares an
    /// `events` stream. None: no event API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(id = "events.socket", long = "events-socket")]
    pub socket: Option<PathBuf>,
}

/// The crash-safe spool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// Spool file (redb; created if missing).
    #[arg(long = "spool")]
    pub path: PathBuf,
    /// Commit (fsync) interval: at most this much data is at risk on power loss (1ms..=200ms).
    #[serde(with = "humantime_serde")]
    #[arg(long = "spool-sync-interval", value_parser = parse_duration)]
    pub sync_interval: Duration,
}

/// The hospital ingest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(deny_unknown_fields, default)]
pub struct IngestEndpoint {
    /// UDP address of the ingest's QUIC endpoint.
    #[arg(long = "ingest")]
    pub address: SocketAddr,
    /// Other ingest nodes (several nodes on one JetStream log): a bearer that cannot reach
    /// its ingest, or loses it, dials the next of `address` and these in turn.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[arg(
        id = "ingest.fallback_addresses",
        long = "ingest-fallback",
        value_delimiter = ','
    )]
    pub fallback_addresses: Vec<SocketAddr>,
    /// Name the ingest certificate must carry.
    #[arg(long)]
    pub server_name: String,
    /// A bearer's connection is closed after this long without any packet.
    #[serde(with = "humantime_serde")]
    #[arg(long = "ingest-idle-timeout", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Per bearer: frames sent and not yet acknowledged at most (each on its own QUIC stream).
    /// Live frames keep flowing while acknowledgements stall (the ingest's store electing a
    /// leader) until this many are outstanding.
    #[arg(long = "ingest-max-in-flight-frames")]
    pub max_in_flight_frames: usize,
}

/// This vehicle's certificate and the pinned ingest CA.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(deny_unknown_fields, default)]
pub struct TlsFiles {
    /// CA that signed the ingest certificate (pinned; the system store is never used).
    #[arg(long)]
    pub ca_cert: PathBuf,
    /// This vehicle's certificate chain (PEM).
    #[arg(long)]
    pub cert: PathBuf,
    /// This vehicle's private key (PEM).
    #[arg(long)]
    pub key: PathBuf,
}

/// How waveforms are cut into frames.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(deny_unknown_fields, default)]
pub struct Framing {
    /// Duration of one waveform frame (whole milliseconds, 1ms..=1s).
    #[serde(with = "humantime_serde")]
    #[arg(long, value_parser = parse_duration)]
    pub frame: Duration,
    /// Largest encoded frame; must not exceed the ingest's bound.
    #[arg(long)]
    pub max_frame_bytes: usize,
    /// How waveform samples travel: `lpc1`, the lossless per-frame codec (about a third of
    /// the bytes of `samples` on ECG), or `samples`, one varint per sample. A bearer whose
    /// ingest does not decode lpc1 gets samples whatever this says.
    #[arg(long, value_enum)]
    pub waveform_encoding: WaveformEncodingChoice,
}

/// Waveform encodings an agent can be told to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "snake_case")]
pub enum WaveformEncodingChoice {
    /// The lossless per-frame codec (relay-codec).
    #[default]
    Lpc1,
    /// One zig-zag varint per sample.
    Samples,
}

impl WaveformEncodingChoice {
    /// The wire value.
    pub fn wire(self) -> relay_proto::model::WaveformEncoding {
        match self {
            Self::Lpc1 => relay_proto::model::WaveformEncoding::Lpc1,
            Self::Samples => relay_proto::model::WaveformEncoding::Samples,
        }
    }
}

/// What is held until acknowledged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(deny_unknown_fields, default)]
pub struct Buffer {
    /// Bytes of frames kept until acknowledged; when full, the lowest-priority oldest frames
    /// are evicted (and counted).
    #[arg(long = "buffer-max-unacked-bytes")]
    pub max_unacked_bytes: usize,
    /// On shutdown, keep delivering unacknowledged frames this long.
    #[serde(with = "humantime_serde")]
    #[arg(long = "buffer-stop-drain", value_parser = parse_duration)]
    pub stop_drain: Duration,
}

/// How bearers reconnect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(deny_unknown_fields, default)]
pub struct Reconnect {
    /// First backoff after the ingest refused or closed a connection attempt.
    #[serde(with = "humantime_serde")]
    #[arg(long = "reconnect-initial-backoff", value_parser = parse_duration)]
    pub initial_backoff: Duration,
    /// Longest backoff.
    #[serde(with = "humantime_serde")]
    #[arg(long = "reconnect-max-backoff", value_parser = parse_duration)]
    pub max_backoff: Duration,
    /// While a bearer's path is silent, a new connection attempt starts this often.
    #[serde(with = "humantime_serde")]
    #[arg(long = "reconnect-redial-interval", value_parser = parse_duration)]
    pub redial_interval: Duration,
    /// Handshake (QUIC + Hello) must finish within this.
    #[serde(with = "humantime_serde")]
    #[arg(long = "reconnect-handshake-timeout", value_parser = parse_duration)]
    pub handshake_timeout: Duration,
}

/// Command-line shortcut: replace the configured ECG source by a WFDB replay.
#[derive(Debug, Clone, Default, PartialEq, Args)]
pub struct ReplayFlags {
    /// Replay this WFDB record (path without extension) instead of the configured ECG source.
    #[arg(long)]
    pub wfdb_record: Option<PathBuf>,
    /// Replay speed for --wfdb-record (1 = real time).
    #[arg(long, requires = "wfdb_record")]
    pub speed: Option<f64>,
    /// Loop --wfdb-record.
    #[arg(long = "loop", requires = "wfdb_record")]
    pub r#loop: bool,
}

/// A data source; each becomes one stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
        /// Stream name shown to subscribers.
        #[serde(default = "ecg_name")]
        name: String,
    },
    /// 12-lead ECG generator.
    SyntheticEcg {
        /// Samples per second per lead.
        #[serde(default = "default_ecg_rate")]
        rate_hz: u32,
        /// Heart rate of the generated rhythm.
        #[serde(default = "default_heart_rate")]
        heart_rate_bpm: f64,
        /// Stream name shown to subscribers.
        #[serde(default = "ecg_name")]
        name: String,
    },
    /// HR, SpO2, NIBP, RR, EtCO2 and temperature.
    SyntheticVitals {
        /// One report per interval.
        #[serde(default = "default_interval", with = "humantime_serde")]
        interval: Duration,
    },
    /// Positions from a gpsd daemon (its JSON protocol over TCP, `?WATCH`; TPV and SKY reports).
    Gpsd {
        /// gpsd's address (it listens on 127.0.0.1:2947 unless told otherwise).
        #[serde(default = "default_gpsd")]
        address: SocketAddr,
    },
    /// Positions from NMEA 0183 sentences (GGA, RMC, VTG, GSA, GST): a receiver's serial
    /// device, set to its baud rate beforehand (e.g. `stty -F /dev/ttyUSB0 9600 raw`), or a log.
    Nmea {
        /// The device or log file.
        path: PathBuf,
        /// Replay a log at the pace of its fix times (demos, tests) instead of reading lines
        /// as they come (a device).
        #[serde(default)]
        replay: bool,
        /// Replay speed factor (1 = real time).
        #[serde(default = "one")]
        speed: f64,
        /// Start a replayed log again at its end.
        #[serde(default)]
        r#loop: bool,
    },
    /// A patient monitor or monitor gateway sending IHE PCD-01 `ORU^R01` over MLLP: numerics
    /// become a vitals stream, the waveform channels the waveform streams declared here.
    Hl7Mllp(Hl7Listener),
    /// A GPS track.
    SyntheticGps {
        /// One position per interval.
        #[serde(default = "default_interval", with = "humantime_serde")]
        interval: Duration,
        /// Where the track starts.
        #[serde(default = "default_lat")]
        start_latitude_deg: f64,
        /// Where the track starts.
        #[serde(default = "default_lon")]
        start_longitude_deg: f64,
    },
}

/// The MLLP listener of a monitor input (`type = "hl7_mllp"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hl7Listener {
    /// Address on the vehicle LAN to listen on (2575 is HL7's registered port).
    #[serde(default = "default_mllp_listen")]
    pub listen: SocketAddr,
    /// Server certificate chain (PEM) for MLLP over TLS; plain MLLP when absent.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// Private key of `tls_cert` (PEM).
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Longest message taken; a longer one is refused and skipped.
    #[serde(default = "default_mllp_max")]
    pub max_message_bytes: usize,
    /// The waveform streams the monitor sends (channels by MDC code); numerics need none.
    #[serde(default)]
    pub waveforms: Vec<Hl7Waveform>,
}

/// A waveform stream fed by a monitor's `NA` observations: all its channels come in each
/// message, with the same sample count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hl7Waveform {
    /// Stream name shown to subscribers.
    pub name: String,
    /// Samples per second (a message saying otherwise is refused).
    pub sample_rate_hz: f64,
    /// UCUM unit of the samples, e.g. "mV".
    #[serde(default = "default_mv")]
    pub unit: String,
    /// Stored integers per unit: a sample is stored as round(value x gain), so 1/gain must
    /// not be coarser than the monitor's resolution (1000: microvolts for mV).
    #[serde(default = "default_hl7_gain")]
    pub gain: f64,
    /// The channels, in stream order.
    pub channels: Vec<Hl7Channel>,
}

/// One channel of an [`Hl7Waveform`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hl7Channel {
    /// IEEE 11073 MDC code the monitor sends in OBX-3 (e.g. 131330 for lead II).
    pub mdc_code: u32,
    /// Channel name shown to subscribers (e.g. "II").
    pub name: String,
}

impl Hl7Listener {
    fn validate(&self) -> Result<(), ConfigError> {
        if !(1024..=64 << 20).contains(&self.max_message_bytes) {
            return invalid(
                "sources[].max_message_bytes",
                &self.max_message_bytes,
                "must be 1 KiB..=64 MiB",
            );
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return invalid(
                "sources[].tls_cert",
                &self.tls_cert.is_some(),
                "tls_cert and tls_key go together",
            );
        }
        let mut codes = std::collections::HashSet::new();
        for w in &self.waveforms {
            if !(w.sample_rate_hz.is_finite()
                && w.sample_rate_hz > 0.0
                && w.sample_rate_hz <= 100_000.0)
            {
                return invalid(
                    "sources[].waveforms[].sample_rate_hz",
                    &w.sample_rate_hz,
                    "must be in (0, 100000]",
                );
            }
            if !(w.gain.is_finite() && w.gain > 0.0) {
                return invalid("sources[].waveforms[].gain", &w.gain, "must be positive");
            }
            if w.channels.is_empty() || w.channels.len() > 256 {
                return invalid(
                    "sources[].waveforms[].channels",
                    &w.channels.len(),
                    "must be 1..=256 channels",
                );
            }
            for c in &w.channels {
                if !codes.insert(c.mdc_code) {
                    return invalid(
                        "sources[].waveforms[].channels[].mdc_code",
                        &c.mdc_code,
                        "names one channel only",
                    );
                }
            }
        }
        Ok(())
    }
}

fn default_mllp_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 2575))
}
fn default_mllp_max() -> usize {
    1 << 20
}
fn default_mv() -> String {
    "mV".into()
}
fn default_hl7_gain() -> f64 {
    1000.0
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
fn default_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_gpsd() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 2947))
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
            config: None,
            allow_dev_pki: false,
            vehicle_id: "amb-1".into(),
            ingest: IngestEndpoint::default(),
            tls: TlsFiles::default(),
            framing: Framing::default(),
            buffer: Buffer::default(),
            reconnect: Reconnect::default(),
            metrics: MetricsConfig::default(),
            bearers: vec![BearerConfig::new("wan0", any_address())],
            scheduling: Scheduling::default(),
            spool: SpoolConfig::default(),
            events: EventsConfig::default(),
            sources: vec![
                SourceConfig::SyntheticEcg {
                    rate_hz: default_ecg_rate(),
                    heart_rate_bpm: default_heart_rate(),
                    name: ecg_name(),
                },
                SourceConfig::SyntheticVitals {
                    interval: default_interval(),
                },
                SourceConfig::SyntheticGps {
                    interval: default_interval(),
                    start_latitude_deg: default_lat(),
                    start_longitude_deg: default_lon(),
                },
            ],
            replay: ReplayFlags::default(),
        }
    }
}

impl Default for IngestEndpoint {
    fn default() -> Self {
        Self {
            address: SocketAddr::from(([127, 0, 0, 1], 4433)),
            fallback_addresses: Vec::new(),
            server_name: "localhost".into(),
            idle_timeout: Duration::from_secs(10),
            max_in_flight_frames: 1024,
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
            frame: Duration::from_millis(40),
            max_frame_bytes: relay_proto::DEFAULT_MAX_FRAME_BYTES,
            waveform_encoding: WaveformEncodingChoice::default(),
        }
    }
}

impl Default for Buffer {
    fn default() -> Self {
        Self {
            max_unacked_bytes: 64 * 1024 * 1024,
            stop_drain: Duration::from_secs(3),
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
            live_window: Duration::from_secs(1),
            max_in_flight_bytes: 4 * 1024 * 1024,
            suspect_floor: Duration::from_millis(60),
            down_after: Duration::from_secs(1),
            probe_interval: Duration::from_millis(250),
        }
    }
}

impl Scheduling {
    /// Policy per class, indexed by [`relay_proto::Class::index`].
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
            sync_interval: Duration::from_millis(100),
        }
    }
}

impl Default for Reconnect {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            redial_interval: Duration::from_millis(500),
            handshake_timeout: Duration::from_secs(4),
        }
    }
}

impl ServiceConfig for AgentConfig {
    const RENAMED: &'static [Rename] = RENAMED_KEYS;

    fn config_file(&self) -> Option<&Path> {
        self.config.as_deref()
    }

    /// Checks every bound; the error names the key and the value.
    fn validate(&self) -> Result<(), ConfigError> {
        if !relay_proto::is_valid_vehicle_id(&self.vehicle_id) {
            return invalid(
                "vehicle_id",
                &self.vehicle_id,
                "must be 1-64 of [A-Za-z0-9._-]",
            );
        }
        let frame = self.framing.frame;
        if !(Duration::from_millis(1)..=Duration::from_secs(1)).contains(&frame)
            || !frame.subsec_nanos().is_multiple_of(1_000_000)
        {
            return invalid(
                "framing.frame",
                &frame,
                "must be whole milliseconds, 1ms..=1s",
            );
        }
        if self.framing.max_frame_bytes < 1024 {
            return invalid(
                "framing.max_frame_bytes",
                &self.framing.max_frame_bytes,
                "must be at least 1024",
            );
        }
        if self.ingest.max_in_flight_frames == 0 {
            return invalid("ingest.max_in_flight_frames", &0, "must be positive");
        }
        if self.ingest.idle_timeout < Duration::from_millis(100) {
            return invalid(
                "ingest.idle_timeout",
                &self.ingest.idle_timeout,
                "must be at least 100ms",
            );
        }
        if self.buffer.max_unacked_bytes < self.framing.max_frame_bytes {
            return invalid(
                "buffer.max_unacked_bytes",
                &self.buffer.max_unacked_bytes,
                "must hold at least one frame (framing.max_frame_bytes)",
            );
        }
        let r = &self.reconnect;
        positive(&[
            ("reconnect.redial_interval", r.redial_interval),
            ("reconnect.handshake_timeout", r.handshake_timeout),
            ("reconnect.initial_backoff", r.initial_backoff),
        ])?;
        if r.max_backoff < r.initial_backoff {
            return invalid(
                "reconnect.max_backoff",
                &r.max_backoff,
                "must be at least reconnect.initial_backoff",
            );
        }
        if self.sources.is_empty() {
            return invalid("sources", &self.sources, "at least one source is needed");
        }
        if self.bearers.is_empty() || self.bearers.len() > MAX_BEARERS {
            return invalid(
                "bearers",
                &self.bearers.len(),
                &format!("1..={MAX_BEARERS} bearers are needed"),
            );
        }
        let mut names = std::collections::HashSet::new();
        for b in &self.bearers {
            if !relay_proto::is_valid_vehicle_id(&b.name) || !names.insert(&b.name) {
                return invalid(
                    "bearers[].name",
                    &b.name,
                    "must be unique, 1-64 of [A-Za-z0-9._-]",
                );
            }
            if b.budget_period.is_zero() {
                return invalid(
                    "bearers[].budget_period",
                    &b.budget_period,
                    "must be positive",
                );
            }
        }
        let sc = &self.scheduling;
        positive(&[
            ("scheduling.live_window", sc.live_window),
            ("scheduling.suspect_floor", sc.suspect_floor),
            ("scheduling.probe_interval", sc.probe_interval),
        ])?;
        if sc.max_in_flight_bytes < self.framing.max_frame_bytes {
            return invalid(
                "scheduling.max_in_flight_bytes",
                &sc.max_in_flight_bytes,
                "must be at least framing.max_frame_bytes",
            );
        }
        let sync = self.spool.sync_interval;
        if !(Duration::from_millis(1)..=Duration::from_millis(200)).contains(&sync) {
            return invalid(
                "spool.sync_interval",
                &sync,
                "must be 1ms..=200ms (data at risk on power loss)",
            );
        }
        for s in &self.sources {
            match s {
                SourceConfig::Wfdb { speed, .. } | SourceConfig::Nmea { speed, .. }
                    if !(speed.is_finite() && *speed > 0.0 && *speed <= 10_000.0) =>
                {
                    return invalid("sources[].speed", speed, "must be in (0, 10000]");
                }
                SourceConfig::Hl7Mllp(h) => h.validate()?,
                SourceConfig::SyntheticEcg { rate_hz, .. } if !(50..=2000).contains(rate_hz) => {
                    return invalid("sources[].rate_hz", rate_hz, "must be 50..=2000");
                }
                SourceConfig::SyntheticEcg { heart_rate_bpm, .. }
                    if !(20.0..=300.0).contains(heart_rate_bpm) =>
                {
                    return invalid(
                        "sources[].heart_rate_bpm",
                        heart_rate_bpm,
                        "must be 20..=300",
                    );
                }
                SourceConfig::SyntheticVitals { interval }
                | SourceConfig::SyntheticGps { interval, .. }
                    if *interval < Duration::from_millis(10) =>
                {
                    return invalid("sources[].interval", interval, "must be at least 10ms");
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn apply_shortcuts(&mut self) {
        self.apply_replay_flags();
    }
}

impl AgentConfig {
    /// `--wfdb-record` replaces the configured ECG source (or comes first if there is none).
    fn apply_replay_flags(&mut self) {
        let Some(record) = self.replay.wfdb_record.clone() else {
            return;
        };
        let replay = SourceConfig::Wfdb {
            record,
            speed: self.replay.speed.unwrap_or(1.0),
            r#loop: self.replay.r#loop,
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

    /// The configuration as TOML (what a file must hold to give it back).
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bearer_dials_its_own_remotes_or_the_ingest_nodes_in_turn() {
        let cfg = AgentConfig::load_from([
            "vehicle-agent",
            "--ingest",
            "192.0.2.10:4433",
            "--ingest-fallback",
            "192.0.2.11:4433,192.0.2.12:4433",
        ])
        .unwrap();
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        let plain = BearerConfig::new("wan0", any_address());
        assert_eq!(
            plain.remotes(&cfg.ingest),
            [
                addr("192.0.2.10:4433"),
                addr("192.0.2.11:4433"),
                addr("192.0.2.12:4433")
            ]
        );
        let apn = BearerConfig {
            remote: Some(addr("10.64.0.1:4433")),
            fallback_remotes: vec![addr("10.64.0.2:4433")],
            ..BearerConfig::new("wan1", any_address())
        };
        assert_eq!(
            apn.remotes(&cfg.ingest),
            [addr("10.64.0.1:4433"), addr("10.64.0.2:4433")],
            "a bearer with its own remote keeps to its own list"
        );
    }

    #[test]
    fn flags_override_only_what_they_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(
            &file,
            r#"
            vehicle_id = "amb-7"
            [ingest]
            address = "10.0.0.1:5000"
            server_name = "ingest.example"
            [framing]
            frame = "20ms"
            "#,
        )
        .unwrap();
        let cfg = AgentConfig::load_from([
            "vehicle-agent".as_ref(),
            "--config".as_ref(),
            file.as_os_str(),
            "--ingest".as_ref(),
            "127.0.0.1:9".as_ref(),
            "--wfdb-record".as_ref(),
            "x/100".as_ref(),
            "--speed".as_ref(),
            "4".as_ref(),
            "--scheduling-live-window".as_ref(),
            "2s".as_ref(),
        ] as [&std::ffi::OsStr; 11])
        .unwrap();
        assert_eq!(cfg.vehicle_id, "amb-7");
        assert_eq!(cfg.ingest.address, "127.0.0.1:9".parse().unwrap());
        assert_eq!(cfg.ingest.server_name, "ingest.example");
        assert_eq!(cfg.framing.frame, Duration::from_millis(20));
        assert_eq!(cfg.scheduling.live_window, Duration::from_secs(2));
        assert_eq!(cfg.scheduling.probe_interval, Duration::from_millis(250));
        assert!(matches!(&cfg.sources[0], SourceConfig::Wfdb { speed, .. } if *speed == 4.0));
        assert_eq!(
            cfg.sources.len(),
            3,
            "the ECG source is replaced, not added"
        );
    }

    #[test]
    fn bearers_and_spool_from_flags_and_their_bounds() {
        let cfg = AgentConfig::load_from([
            "vehicle-agent",
            "--bearer",
            "wan0=10.0.0.2:0",
            "--bearer",
            "wan1=0.0.0.0:0@wwan1",
            "--spool",
            "/var/lib/x.redb",
        ])
        .unwrap();
        assert_eq!(cfg.bearers.len(), 2);
        assert_eq!(cfg.bearers[0].bind, "10.0.0.2:0".parse().unwrap());
        assert_eq!(cfg.bearers[1].interface.as_deref(), Some("wwan1"));
        assert_eq!(cfg.spool.path, Path::new("/var/lib/x.redb"));
        assert!("wan0".parse::<BearerConfig>().is_err(), "address missing");

        let mut twice = cfg.clone();
        twice.bearers[1].name = "wan0".into();
        let err = twice.validate().unwrap_err().to_string();
        assert!(err.contains("bearers[].name = \"wan0\""), "{err}");
        let mut none = cfg.clone();
        none.bearers.clear();
        assert!(none.validate().is_err());
        let mut slow = cfg.clone();
        slow.spool.sync_interval = Duration::from_millis(500);
        let err = slow.validate().unwrap_err().to_string();
        assert!(err.contains("spool.sync_interval = 500ms"), "{err}");
        let toml = r#"
            [[bearers]]
            name = "lte-a"
            interface = "wwan0"
            budget_bytes = 1000000
            budget_period = "1day"
            [scheduling]
            waveforms = "fastest"
        "#;
        let cfg = AgentConfig::from_toml(toml, Path::new("t.toml")).unwrap();
        assert_eq!(cfg.bearers[0].budget_bytes, Some(1_000_000));
        assert_eq!(cfg.bearers[0].budget_period, Duration::from_secs(86_400));
        assert_eq!(cfg.scheduling.waveforms, Policy::Fastest);
        assert_eq!(cfg.scheduling.events, Policy::Redundant, "default kept");
    }

    #[test]
    fn unknown_and_renamed_keys_are_refused_by_name() {
        let err = AgentConfig::from_toml("vehicle_idd = \"x\"", Path::new("t.toml")).unwrap_err();
        assert!(err.to_string().contains("vehicle_idd"), "{err}");
        let err =
            AgentConfig::from_toml("[scheduling]\nlive_window_ms = 1000", Path::new("t.toml"))
                .unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::Renamed {
                    new: "scheduling.live_window",
                    ..
                }
            ),
            "{err}"
        );
        let err = AgentConfig::from_toml(
            "[[sources]]\ntype = \"synthetic_vitals\"\ninterval_ms = 500",
            Path::new("t.toml"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("sources[].interval"), "{err}");
        let err = AgentConfig::load_from(["vehicle-agent", "--frame", "forty"]).unwrap_err();
        assert!(matches!(err, ConfigError::Cli(_)), "{err}");
    }

    #[test]
    fn invalid_values_are_refused_naming_key_and_value() {
        let cfg = AgentConfig {
            vehicle_id: "no spaces".into(),
            ..AgentConfig::default()
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("vehicle_id = \"no spaces\""), "{err}");
        let mut cfg = AgentConfig::default();
        cfg.framing.frame = Duration::from_micros(40_500);
        assert!(
            cfg.validate()
                .unwrap_err()
                .to_string()
                .contains("framing.frame")
        );
    }

    #[test]
    fn every_flag_is_documented() {
        relay_ops::config::check_flags::<AgentConfig>().unwrap();
    }
}
