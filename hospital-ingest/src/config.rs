//! Ingest configuration: one struct, [`IngestConfig`], read from a TOML file (every key
//! optional, embedded defaults, unknown keys refused) and overridden key by key by flags
//! (`--help` lists them). Durations are written as durations (`"10s"`, `"72h"`); the keys of
//! earlier versions (`*_ms`, `*_s`, `retention_hours`) are refused with a message naming their
//! replacement. `deploy/config/hospital-ingest.toml` shows every key with its default (a test
//! holds it to that).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser};
use relay_ops::config::{MetricsConfig, Rename, invalid, parse_duration, positive};

pub use relay_ops::config::ServiceConfig;
use serde::{Deserialize, Serialize};

pub use relay_ops::config::ConfigError;

/// Keys of earlier versions and their replacements.
pub const RENAMED_KEYS: &[Rename] = &[
    ("quic.idle_timeout_ms", "quic.idle_timeout"),
    ("quic.hello_timeout_ms", "quic.hello_timeout"),
    (
        "grpc.slow_subscriber_timeout_ms",
        "grpc.slow_subscriber_timeout",
    ),
    ("store.retention_hours", "store.retention"),
    ("store.retention_interval_s", "store.retention_interval"),
    ("reassembly.reorder_window_ms", "reassembly.reorder_window"),
];

/// Accepts ambulances over QUIC (mutual TLS), stores their telemetry and republishes it over
/// gRPC.
///
/// The ingest's whole configuration. Every setting has a default; --config names a TOML file
/// (see deploy/config/hospital-ingest.toml) and each flag overrides one key of it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, Parser)]
#[serde(deny_unknown_fields, default)]
#[command(name = "hospital-ingest", version)]
pub struct IngestConfig {
    /// TOML configuration file; flags override single keys of it.
    #[serde(skip)]
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Accept certificates of the development PKI (relay-devcerts): demos and tests only.
    #[serde(skip)]
    #[arg(long)]
    pub allow_dev_pki: bool,
    /// The QUIC endpoint vehicles connect to.
    #[command(flatten)]
    pub quic: Quic,
    /// The gRPC API for emergency departments.
    #[command(flatten)]
    pub grpc: Grpc,
    /// Certificates and the CAs of vehicles and subscribers.
    #[command(flatten)]
    pub tls: Tls,
    /// The durable store.
    #[command(flatten)]
    pub store: StoreConfig,
    /// The JetStream cluster, when store.backend = "jetstream".
    #[command(flatten)]
    pub jetstream: JetStreamConfig,
    /// Putting each stream back in order.
    #[command(flatten)]
    pub reassembly: Reassembly,
    /// The access audit log.
    #[command(flatten)]
    pub audit: AuditConfig,
    /// Detection of irregular vehicle behaviour.
    #[command(flatten)]
    pub detect: DetectConfig,
    /// The Prometheus endpoint.
    #[command(flatten)]
    pub metrics: MetricsConfig,
}

/// Thresholds of the detector of irregular vehicle behaviour (README "Security"); findings
/// are counted in `relay_ingest_security_events_total{reason}` and audited, never blocked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(deny_unknown_fields, default)]
pub struct DetectConfig {
    /// Capture times further ahead of the vehicle clock's estimated time (the ingest's clock
    /// before the first estimate) are flagged and reported (timestamp_future).
    #[serde(with = "humantime_serde")]
    #[arg(long = "detect-max-clock-ahead", value_parser = parse_duration)]
    pub max_clock_ahead: Duration,
    /// Capture times older than this are flagged and reported (timestamp_past).
    #[serde(with = "humantime_serde")]
    #[arg(long = "detect-max-age", value_parser = parse_duration)]
    pub max_age: Duration,
    /// A vehicle clock off the ingest's by more than this, beyond the estimate's
    /// uncertainty, is reported (clock_skew).
    #[serde(with = "humantime_serde")]
    #[arg(long = "detect-max-clock-offset", value_parser = parse_duration)]
    pub max_clock_offset: Duration,
    /// Movement between GPS fixes faster than this is reported (impossible_movement), km/h.
    #[arg(long = "detect-max-speed-kmh")]
    pub max_speed_kmh: f64,
    /// Frames per second of capture time a stream may produce (beyond: seq_jump).
    #[arg(long = "detect-max-frames-per-second")]
    pub max_frames_per_second: f64,
    /// New sessions of one vehicle in ten minutes beyond which it is reported
    /// (session_storm).
    #[arg(long = "detect-max-new-sessions-per-10min")]
    pub max_new_sessions_per_10min: usize,
    /// Source addresses of one vehicle's live connections at once beyond which it is
    /// reported (too_many_addresses): its bearers.
    #[arg(long = "detect-max-addresses")]
    pub max_addresses: usize,
    /// Vehicles an ED client may start reading for the first time within an hour before it
    /// is reported (subscriber_new_vehicles).
    #[arg(long = "detect-max-new-vehicles-per-hour")]
    pub max_new_vehicles_per_hour: usize,
    /// Access-policy refusals of one ED client within ten minutes beyond which it is
    /// reported (subscriber_denials).
    #[arg(long = "detect-max-denials-per-10min")]
    pub max_denials_per_10min: usize,
}

impl Default for DetectConfig {
    fn default() -> Self {
        let t = crate::detect::Thresholds::default();
        Self {
            max_clock_ahead: t.max_clock_ahead,
            max_age: t.max_age,
            max_clock_offset: t.max_clock_offset,
            max_speed_kmh: (t.max_speed_mps * 3.6).round(),
            max_frames_per_second: t.max_frames_per_second,
            max_new_sessions_per_10min: t.max_new_sessions_per_10min,
            max_addresses: t.max_addresses,
            max_new_vehicles_per_hour: t.max_new_vehicles_per_hour,
            max_denials_per_10min: t.max_denials_per_10min,
        }
    }
}

impl DetectConfig {
    /// The detector's thresholds.
    pub fn thresholds(&self) -> crate::detect::Thresholds {
        crate::detect::Thresholds {
            max_clock_ahead: self.max_clock_ahead,
            max_age: self.max_age,
            max_clock_offset: self.max_clock_offset,
            max_speed_mps: self.max_speed_kmh / 3.6,
            max_frames_per_second: self.max_frames_per_second,
            max_new_sessions_per_10min: self.max_new_sessions_per_10min,
            max_addresses: self.max_addresses,
            max_new_vehicles_per_hour: self.max_new_vehicles_per_hour,
            max_denials_per_10min: self.max_denials_per_10min,
        }
    }
}

/// The tamper-evident access audit log (README "Security").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Directory of the audit files (audit-<first record>.jsonl, owner-only). None: `audit`
    /// beside the store file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(id = "audit.path", long = "audit-path")]
    pub path: Option<PathBuf>,
    /// A file that reaches this many bytes is closed and the next one started; the hash
    /// chain continues across files.
    #[arg(id = "audit.max_file_bytes", long = "audit-max-file-bytes")]
    pub max_file_bytes: u64,
    /// Files kept; the oldest beyond are deleted, so archive them before (or raise this).
    #[arg(id = "audit.max_files", long = "audit-max-files")]
    pub max_files: usize,
    /// Records waiting for the writer at most (and, with syslog forwarding, waiting to be
    /// forwarded).
    #[arg(id = "audit.queue", long = "audit-queue")]
    pub queue: usize,
    /// `host:port` of a syslog receiver (a SIEM) to which every durable record is forwarded
    /// as RFC 5424 over TLS (RFC 5425, usually port 6514). None: no forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(id = "audit.syslog_address", long = "audit-syslog-address")]
    pub syslog_address: Option<String>,
    /// CA certificates (PEM) that sign the receiver's certificate; required with
    /// syslog_address (there is no plaintext syslog).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(id = "audit.syslog_ca", long = "audit-syslog-ca")]
    pub syslog_ca: Option<PathBuf>,
    /// Name the receiver's certificate must carry. None: the host part of syslog_address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(id = "audit.syslog_server_name", long = "audit-syslog-server-name")]
    pub syslog_server_name: Option<String>,
    /// Our certificate (PEM) when the receiver asks for one; with syslog_key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(id = "audit.syslog_cert", long = "audit-syslog-cert")]
    pub syslog_cert: Option<PathBuf>,
    /// Its private key (PEM); with syslog_cert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(id = "audit.syslog_key", long = "audit-syslog-key")]
    pub syslog_key: Option<PathBuf>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            path: None,
            max_file_bytes: 64 * 1024 * 1024,
            max_files: 256,
            queue: 4096,
            syslog_address: None,
            syslog_ca: None,
            syslog_server_name: None,
            syslog_cert: None,
            syslog_key: None,
        }
    }
}

impl AuditConfig {
    /// Where records are forwarded, when they are (checked by `validate`).
    pub fn syslog_target(&self) -> Option<crate::syslog::SyslogTarget> {
        let address = self.syslog_address.clone()?;
        let server_name = match &self.syslog_server_name {
            Some(n) => n.clone(),
            None => syslog_host(&address).to_owned(),
        };
        Some(crate::syslog::SyslogTarget {
            server_name,
            ca: self.syslog_ca.clone()?,
            client_cert: self.syslog_cert.clone().zip(self.syslog_key.clone()),
            queue: self.queue,
            address,
        })
    }
}

/// The host part of `host:port` (`[v6]:port` too).
fn syslog_host(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Putting each stream back in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(deny_unknown_fields, default)]
pub struct Reassembly {
    /// A frame that overtook others waits this long for them before a gap is announced
    /// (0s announces at once; at most 10s).
    #[serde(with = "humantime_serde")]
    #[arg(long = "reassembly-reorder-window", value_parser = parse_duration)]
    pub reorder_window: Duration,
    /// Frames held per stream while waiting; beyond, the gap is announced at once.
    #[arg(long = "reassembly-max-held-frames")]
    pub max_held_frames: usize,
    /// Announced gaps tracked per stream; beyond, the oldest is given up.
    #[arg(long = "reassembly-max-open-gaps")]
    pub max_open_gaps: usize,
}

impl Default for Reassembly {
    fn default() -> Self {
        Self {
            reorder_window: Duration::from_millis(50),
            max_held_frames: 1024,
            max_open_gaps: 65_536,
        }
    }
}

/// The QUIC endpoint vehicles connect to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(deny_unknown_fields, default)]
pub struct Quic {
    /// UDP address vehicles connect to.
    #[arg(id = "quic.listen", long = "quic-listen", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Established vehicle connections (bearers) at most; a connection counts once its
    /// certificate and Hello checked out.
    #[arg(long = "quic-max-connections")]
    pub max_connections: usize,
    /// Largest frame accepted; a larger one closes that connection.
    #[arg(long)]
    pub max_frame_bytes: usize,
    /// Decode waveform frames packed with the lossless codec (lpc1) and say so in the
    /// HelloAck. Off, agents send plain samples (about three times the bytes) and a packed
    /// frame closes its connection.
    #[arg(long = "quic-decode-waveform-codec", action = clap::ArgAction::Set)]
    pub decode_waveform_codec: bool,
    /// Frames in flight per connection (concurrent unidirectional streams).
    #[arg(long = "quic-max-concurrent-frames")]
    pub max_concurrent_frames: u32,
    /// A connection silent this long is dropped.
    #[serde(with = "humantime_serde")]
    #[arg(long = "quic-idle-timeout", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Handshakes in progress at most (before certificate and Hello are checked); apart from
    /// `max_connections`, which counts established sessions.
    #[arg(long = "quic-max-pending-handshakes")]
    pub max_pending_handshakes: usize,
    /// Handshakes in progress at most from one address (validated by Retry). Generous:
    /// many ambulances can share a carrier's NAT address.
    #[arg(long = "quic-max-pending-handshakes-per-source")]
    pub max_pending_handshakes_per_source: usize,
    /// Past this many handshakes in progress, peers must validate their address (QUIC
    /// Retry) before they get one.
    #[arg(long = "quic-retry-above")]
    pub retry_above: usize,
    /// Past this many handshakes in progress from one address, its peers must validate.
    #[arg(long = "quic-retry-above-per-source")]
    pub retry_above_per_source: usize,
    /// A handshake (QUIC and TLS) must complete within this.
    #[serde(with = "humantime_serde")]
    #[arg(long = "quic-handshake-timeout", value_parser = parse_duration)]
    pub handshake_timeout: Duration,
    /// Connections (bearers) one vehicle may hold at once: its bearers plus slack for
    /// connections that died but have not timed out yet.
    #[arg(long = "quic-max-connections-per-vehicle")]
    pub max_connections_per_vehicle: usize,
    /// New sessions one vehicle may open per hour (an agent starts a new session only when
    /// its streams change; a restart resumes the old one).
    #[arg(long = "quic-max-new-sessions-per-hour")]
    pub max_new_sessions_per_hour: usize,
    /// Bytes of frames (and Hellos) being read or waiting for the store writer, all
    /// connections together; a frame reserves `max_frame_bytes` (a Hello its size) before it
    /// is read, so memory is bounded by construction (the rest waits in QUIC flow control,
    /// `connection_receive_window_bytes` per connection). At least 1 MiB.
    #[arg(long = "quic-max-reading-bytes")]
    pub max_reading_bytes: usize,
    /// The same bound for one vehicle, all its bearers together, so one vehicle cannot take
    /// it all.
    #[arg(long = "quic-max-reading-bytes-per-vehicle")]
    pub max_reading_bytes_per_vehicle: usize,
    /// A frame's stream must be complete within this after it opened; a stalled one is
    /// stopped (the agent sends the frame again) and counted.
    #[serde(with = "humantime_serde")]
    #[arg(long = "quic-frame-read-timeout", value_parser = parse_duration)]
    pub frame_read_timeout: Duration,
    /// Hello must arrive within this after the handshake.
    #[serde(with = "humantime_serde")]
    #[arg(long = "quic-hello-timeout", value_parser = parse_duration)]
    pub hello_timeout: Duration,
    /// Acknowledgements waiting to be written per connection before it is closed as stuck.
    #[arg(long = "quic-max-pending-acks")]
    pub max_pending_acks: usize,
    /// Bytes a connection may have in flight towards the ingest (QUIC flow control): the
    /// memory one vehicle connection can occupy with unread frames.
    #[arg(long = "quic-connection-receive-window-bytes")]
    pub connection_receive_window_bytes: u32,
    /// Receive buffer asked of the kernel for the QUIC socket: what packets can wait while
    /// the ingest is busy before the kernel drops them. Linux grants at most
    /// `net.core.rmem_max` (see deploy/sysctl); the granted size is logged and exported.
    #[arg(long = "quic-socket-receive-buffer-bytes")]
    pub socket_receive_buffer_bytes: usize,
}

/// The gRPC API for emergency departments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(deny_unknown_fields, default)]
pub struct Grpc {
    /// TCP address of the gRPC API (TLS, client certificates required).
    #[arg(id = "grpc.listen", long = "grpc-listen", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Messages queued per subscriber.
    #[arg(long = "grpc-subscriber-queue")]
    pub subscriber_queue: usize,
    /// A subscriber whose queue stays full this long is cut off.
    #[serde(with = "humantime_serde")]
    #[arg(long = "grpc-slow-subscriber-timeout", value_parser = parse_duration)]
    pub slow_subscriber_timeout: Duration,
    /// Live records buffered for subscribers that are momentarily behind.
    #[arg(long = "grpc-live-buffer")]
    pub live_buffer: usize,
    /// Concurrent subscriptions at most.
    #[arg(long = "grpc-max-subscribers")]
    pub max_subscribers: usize,
    /// A client must finish its TLS handshake within this time, or it is disconnected.
    #[serde(with = "humantime_serde")]
    #[arg(long = "grpc-tls-handshake-timeout", value_parser = parse_duration)]
    pub tls_handshake_timeout: Duration,
    /// TLS handshakes in progress at most; further connections are closed at once, so
    /// clients that never finish cannot tie up the listener.
    #[arg(
        id = "grpc.max_pending_handshakes",
        long = "grpc-max-pending-handshakes"
    )]
    pub max_pending_handshakes: usize,
    /// Who may read which vehicles and stream kinds (README "Security"); reloaded on SIGHUP
    /// and when the file changes. None: no client may read patient data (health and
    /// reflection still answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long = "grpc-access-policy")]
    pub access_policy: Option<PathBuf>,
    /// Serve gRPC server reflection (lets tools such as grpcurl discover the API).
    #[arg(long = "grpc-reflection", action = clap::ArgAction::Set)]
    pub reflection: bool,
    /// Subscriptions one client certificate may hold at once.
    #[arg(long = "grpc-max-subscriptions-per-client")]
    pub max_subscriptions_per_client: usize,
    /// Calls (ListVehicles, Subscribe) one client certificate may make per minute; more
    /// fail with RESOURCE_EXHAUSTED.
    #[arg(long = "grpc-max-calls-per-minute")]
    pub max_calls_per_minute: u32,
}

/// Certificates and the CAs of vehicles and subscribers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(deny_unknown_fields, default)]
pub struct Tls {
    /// The ingest's certificate chain (PEM), for QUIC and gRPC.
    #[arg(long)]
    pub cert: PathBuf,
    /// The ingest's private key (PEM).
    #[arg(long)]
    pub key: PathBuf,
    /// CA whose client certificates may connect as vehicles (CN = vehicle id).
    #[arg(long)]
    pub fleet_ca: PathBuf,
    /// CA whose client certificates may use the gRPC API.
    #[arg(long)]
    pub subscriber_ca: PathBuf,
    /// Revocation list(s) of the fleet CA (PEM): revoked vehicles fail the handshake, and on
    /// SIGHUP or when the file changes their live connections are closed. None by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub fleet_crl: Option<PathBuf>,
    /// Revocation list(s) of the subscriber CA (PEM): revoked ED clients fail the handshake,
    /// and on SIGHUP or when the file changes their open gRPC connections are closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub subscriber_crl: Option<PathBuf>,
    /// How often these files are checked for changes; a change is loaded as on SIGHUP (a
    /// revoked vehicle is cut off, a rotated certificate served). 0s: only on SIGHUP.
    #[serde(with = "humantime_serde")]
    #[arg(long = "tls-watch-interval", value_parser = parse_duration)]
    pub watch_interval: Duration,
}

impl Tls {
    /// The usual file names of the development PKI (`relay-devcerts`) in `dir`.
    pub fn from_dev_dir(dir: &Path) -> Self {
        Self {
            cert: dir.join("ingest.pem"),
            key: dir.join("ingest.key"),
            fleet_ca: dir.join("fleet-ca.pem"),
            subscriber_ca: dir.join("hospital-ca.pem"),
            fleet_crl: Some(dir.join("fleet-ca.crl.pem")),
            subscriber_crl: Some(dir.join("hospital-ca.crl.pem")),
            watch_interval: Tls::default().watch_interval,
        }
    }
}

/// Which backend holds the log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// redb in one file (store.path): no server needed.
    #[default]
    Embedded,
    /// A NATS JetStream cluster ([jetstream]).
    Jetstream,
}

/// The durable store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Which backend holds the log: embedded (redb file at store.path) or jetstream (the
    /// cluster of [jetstream]).
    #[arg(id = "store.backend", long = "store-backend", value_enum)]
    pub backend: StoreBackend,
    /// redb database file (embedded backend).
    #[arg(long = "store-path")]
    pub path: PathBuf,
    /// Records older than this are deleted.
    #[serde(with = "humantime_serde")]
    #[arg(long = "store-retention", value_parser = parse_duration)]
    pub retention: Duration,
    /// The log is kept below this many bytes (oldest deleted first).
    #[arg(long = "store-max-bytes")]
    pub max_bytes: u64,
    /// One vehicle's records are kept below this many bytes (its own oldest deleted first),
    /// so one vehicle cannot push other patients' data out of the store.
    #[arg(long = "store-max-bytes-per-vehicle")]
    pub max_bytes_per_vehicle: u64,
    /// How often retention runs.
    #[serde(with = "humantime_serde")]
    #[arg(long = "store-retention-interval", value_parser = parse_duration)]
    pub retention_interval: Duration,
    /// Frames waiting for the writer at most (back-pressure to the vehicles beyond). While the
    /// store cannot commit (a JetStream leader election) every vehicle's frames wait here;
    /// their bytes count against `quic.max_reading_bytes`.
    #[arg(long = "store-writer-queue")]
    pub writer_queue: usize,
    /// Memory the database may use to cache pages, bytes (redb would take 1 GiB).
    #[arg(long = "store-cache-bytes")]
    pub cache_bytes: usize,
    /// Least time from one commit's start to the next: frames arriving meanwhile share the
    /// next commit (and its fsync). Adds at most this much to a frame's latency and saves
    /// CPU at moderate load, where commits would otherwise carry a few frames each. 0
    /// commits as soon as anything waits.
    #[serde(with = "humantime_serde")]
    #[arg(long = "store-commit-interval", value_parser = parse_duration)]
    pub commit_interval: Duration,
}

/// The NATS JetStream cluster holding the log (store.backend = "jetstream"). The log is one
/// replicated stream whose age and size limits are store.retention and store.max_bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(deny_unknown_fields, default)]
pub struct JetStreamConfig {
    /// Server URLs, tls://host:port (any nodes of the cluster; TLS always).
    #[arg(
        id = "jetstream.servers",
        long = "jetstream-servers",
        value_delimiter = ','
    )]
    pub servers: Vec<String>,
    /// CA the servers' certificates chain to (PEM).
    #[arg(id = "jetstream.ca", long = "jetstream-ca")]
    pub ca: PathBuf,
    /// This ingest node's client certificate for the cluster (PEM): its own credentials.
    #[arg(id = "jetstream.cert", long = "jetstream-cert")]
    pub cert: PathBuf,
    /// Its key (PEM).
    #[arg(id = "jetstream.key", long = "jetstream-key")]
    pub key: PathBuf,
    /// Name of the log stream.
    #[arg(id = "jetstream.stream", long = "jetstream-stream")]
    pub stream: String,
    /// Subject prefix of the log's records.
    #[arg(id = "jetstream.subject_prefix", long = "jetstream-subject-prefix")]
    pub subject_prefix: String,
    /// KV bucket holding stream descriptors and vehicles' last contact.
    #[arg(id = "jetstream.meta_bucket", long = "jetstream-meta-bucket")]
    pub meta_bucket: String,
    /// Replicas of the stream and the bucket (3 on a 3-node cluster: one node may fail).
    #[arg(id = "jetstream.replicas", long = "jetstream-replicas")]
    pub replicas: usize,
    /// Time allowed for one request to the cluster (publish, read, admin).
    #[serde(with = "humantime_serde")]
    #[arg(id = "jetstream.request_timeout", long = "jetstream-request-timeout", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// Precision of the byte accounting behind store.max_bytes and
    /// store.max_bytes_per_vehicle, bytes (records are counted in runs of about this size;
    /// memory: about 24 bytes per run).
    #[arg(
        id = "jetstream.accounting_granularity_bytes",
        long = "jetstream-accounting-granularity-bytes"
    )]
    pub accounting_granularity_bytes: u64,
    /// Name this ingest's connection carries (the servers' monitoring shows it).
    #[arg(id = "jetstream.client_name", long = "jetstream-client-name")]
    pub client_name: String,
}

impl Default for JetStreamConfig {
    fn default() -> Self {
        Self {
            servers: vec!["tls://127.0.0.1:4222".into()],
            ca: "certs/hospital-ca.pem".into(),
            cert: "certs/ingest-nats.pem".into(),
            key: "certs/ingest-nats.key".into(),
            stream: "RELAY_LOG".into(),
            subject_prefix: "relay.log".into(),
            meta_bucket: "RELAY_META".into(),
            replicas: 3,
            request_timeout: Duration::from_secs(10),
            accounting_granularity_bytes: 1024 * 1024,
            client_name: "hospital-ingest".into(),
        }
    }
}

impl JetStreamConfig {
    /// The store's options, with the stream's limits from `store`.
    pub fn options(&self, store: &StoreConfig) -> crate::store::JetStreamOptions {
        crate::store::JetStreamOptions {
            servers: self.servers.clone(),
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            stream: self.stream.clone(),
            subject_prefix: self.subject_prefix.clone(),
            meta_bucket: self.meta_bucket.clone(),
            replicas: self.replicas,
            max_age: store.retention,
            max_bytes: store.max_bytes,
            request_timeout: self.request_timeout,
            accounting_granularity_bytes: self.accounting_granularity_bytes,
            client_name: self.client_name.clone(),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.servers.is_empty() {
            return invalid("jetstream.servers", &"[]", "must name at least one server");
        }
        for s in &self.servers {
            let rest = s.strip_prefix("tls://");
            if rest.is_none_or(|r| r.is_empty() || r.contains('/')) {
                return invalid(
                    "jetstream.servers",
                    s,
                    "must be tls://host:port (there is no plaintext connection)",
                );
            }
        }
        let name_ok = |n: &str| {
            !n.is_empty()
                && n.len() <= 64
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        };
        if !name_ok(&self.stream) {
            return invalid(
                "jetstream.stream",
                &self.stream,
                "must be 1-64 of A-Z a-z 0-9 _ -",
            );
        }
        if !name_ok(&self.meta_bucket) {
            return invalid(
                "jetstream.meta_bucket",
                &self.meta_bucket,
                "must be 1-64 of A-Z a-z 0-9 _ -",
            );
        }
        let token_ok = |t: &str| {
            !t.is_empty()
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        };
        if !self.subject_prefix.split('.').all(token_ok) {
            return invalid(
                "jetstream.subject_prefix",
                &self.subject_prefix,
                "must be dot-separated tokens of A-Z a-z 0-9 _ - (no wildcards)",
            );
        }
        if !(1..=5).contains(&self.replicas) {
            return invalid("jetstream.replicas", &self.replicas, "must be 1..=5");
        }
        positive(&[("jetstream.request_timeout", self.request_timeout)])?;
        if self.accounting_granularity_bytes == 0 {
            return invalid(
                "jetstream.accounting_granularity_bytes",
                &0,
                "must be positive",
            );
        }
        Ok(())
    }
}

impl Default for Quic {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 4433)),
            max_connections: 1024,
            max_frame_bytes: relay_proto::DEFAULT_MAX_FRAME_BYTES,
            decode_waveform_codec: true,
            max_concurrent_frames: 512,
            idle_timeout: Duration::from_secs(10),
            hello_timeout: Duration::from_secs(10),
            max_pending_acks: 65_536,
            frame_read_timeout: Duration::from_secs(30),
            max_reading_bytes: 256 * 1024 * 1024,
            max_reading_bytes_per_vehicle: 32 * 1024 * 1024,
            max_connections_per_vehicle: 16,
            max_pending_handshakes: 4096,
            max_pending_handshakes_per_source: 1024,
            retry_above: 256,
            retry_above_per_source: 32,
            handshake_timeout: Duration::from_secs(3),
            max_new_sessions_per_hour: 60,
            connection_receive_window_bytes: 4 * 1024 * 1024,
            socket_receive_buffer_bytes: 4 * 1024 * 1024,
        }
    }
}

impl Default for Grpc {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            subscriber_queue: 1024,
            slow_subscriber_timeout: Duration::from_secs(10),
            live_buffer: 8192,
            max_subscribers: 256,
            tls_handshake_timeout: Duration::from_secs(10),
            max_pending_handshakes: 64,
            access_policy: None,
            reflection: true,
            max_subscriptions_per_client: 16,
            max_calls_per_minute: 120,
        }
    }
}

impl Default for Tls {
    fn default() -> Self {
        Self {
            cert: "certs/ingest.pem".into(),
            key: "certs/ingest.key".into(),
            fleet_ca: "certs/fleet-ca.pem".into(),
            subscriber_ca: "certs/hospital-ca.pem".into(),
            fleet_crl: None,
            subscriber_crl: None,
            watch_interval: Duration::from_secs(30),
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: StoreBackend::Embedded,
            path: "ingest-data/relay.redb".into(),
            retention: Duration::from_secs(72 * 3600),
            max_bytes: 10 * 1024 * 1024 * 1024,
            max_bytes_per_vehicle: 2 * 1024 * 1024 * 1024,
            retention_interval: Duration::from_secs(10),
            writer_queue: 65536,
            cache_bytes: crate::store::DEFAULT_CACHE_BYTES,
            commit_interval: Duration::from_millis(5),
        }
    }
}

impl ServiceConfig for IngestConfig {
    const RENAMED: &'static [Rename] = RENAMED_KEYS;

    fn config_file(&self) -> Option<&Path> {
        self.config.as_deref()
    }

    /// Checks every bound; the error names the key and the value.
    fn validate(&self) -> Result<(), ConfigError> {
        let q = &self.quic;
        if !(64 * 1024..=256 * 1024 * 1024).contains(&q.socket_receive_buffer_bytes) {
            return invalid(
                "quic.socket_receive_buffer_bytes",
                &q.socket_receive_buffer_bytes,
                "must be in 64 KiB..=256 MiB",
            );
        }
        if !(1024..=16 * 1024 * 1024).contains(&q.max_frame_bytes) {
            return invalid(
                "quic.max_frame_bytes",
                &q.max_frame_bytes,
                "must be in 1 KiB..=16 MiB",
            );
        }
        positive(&[
            ("quic.max_connections", q.max_connections),
            (
                "quic.max_concurrent_frames",
                q.max_concurrent_frames as usize,
            ),
            ("quic.max_pending_acks", q.max_pending_acks),
            (
                "quic.max_connections_per_vehicle",
                q.max_connections_per_vehicle,
            ),
            (
                "quic.max_new_sessions_per_hour",
                q.max_new_sessions_per_hour,
            ),
            ("quic.max_pending_handshakes", q.max_pending_handshakes),
            (
                "quic.max_pending_handshakes_per_source",
                q.max_pending_handshakes_per_source,
            ),
            ("grpc.subscriber_queue", self.grpc.subscriber_queue),
            ("grpc.live_buffer", self.grpc.live_buffer),
            ("grpc.max_subscribers", self.grpc.max_subscribers),
            (
                "grpc.max_pending_handshakes",
                self.grpc.max_pending_handshakes,
            ),
            (
                "grpc.max_subscriptions_per_client",
                self.grpc.max_subscriptions_per_client,
            ),
            (
                "grpc.max_calls_per_minute",
                self.grpc.max_calls_per_minute as usize,
            ),
            ("store.writer_queue", self.store.writer_queue),
            ("audit.max_files", self.audit.max_files),
            (
                "detect.max_new_sessions_per_10min",
                self.detect.max_new_sessions_per_10min,
            ),
            ("detect.max_addresses", self.detect.max_addresses),
            ("audit.queue", self.audit.queue),
            ("store.cache_bytes", self.store.cache_bytes),
            (
                "reassembly.max_held_frames",
                self.reassembly.max_held_frames,
            ),
            ("reassembly.max_open_gaps", self.reassembly.max_open_gaps),
        ])?;
        positive(&[
            ("quic.idle_timeout", q.idle_timeout),
            ("quic.frame_read_timeout", q.frame_read_timeout),
            ("quic.handshake_timeout", q.handshake_timeout),
            ("quic.hello_timeout", q.hello_timeout),
            (
                "grpc.slow_subscriber_timeout",
                self.grpc.slow_subscriber_timeout,
            ),
            (
                "grpc.tls_handshake_timeout",
                self.grpc.tls_handshake_timeout,
            ),
            ("store.retention", self.store.retention),
            ("store.retention_interval", self.store.retention_interval),
        ])?;
        if q.max_reading_bytes_per_vehicle < q.max_frame_bytes
            || q.max_reading_bytes_per_vehicle > u32::MAX as usize
        {
            return invalid(
                "quic.max_reading_bytes_per_vehicle",
                &q.max_reading_bytes_per_vehicle,
                "must hold at least one frame (quic.max_frame_bytes), at most 4 GiB",
            );
        }
        if q.max_reading_bytes < q.max_reading_bytes_per_vehicle
            || q.max_reading_bytes < relay_proto::MAX_CONTROL_MESSAGE_BYTES
            || q.max_reading_bytes > u32::MAX as usize
        {
            return invalid(
                "quic.max_reading_bytes",
                &q.max_reading_bytes,
                "must be at least quic.max_reading_bytes_per_vehicle and 1 MiB (the largest \
                 Hello), at most 4 GiB",
            );
        }
        if (q.connection_receive_window_bytes as usize) < q.max_frame_bytes {
            return invalid(
                "quic.connection_receive_window_bytes",
                &q.connection_receive_window_bytes,
                "must hold at least one frame (quic.max_frame_bytes)",
            );
        }
        if self.store.commit_interval > Duration::from_millis(100) {
            return invalid(
                "store.commit_interval",
                &self.store.commit_interval,
                "must be at most 100ms (it adds to every frame's latency)",
            );
        }
        if self.reassembly.reorder_window > Duration::from_secs(10) {
            return invalid(
                "reassembly.reorder_window",
                &self.reassembly.reorder_window,
                "must be at most 10s",
            );
        }
        if self.store.max_bytes < 1024 * 1024 {
            return invalid(
                "store.max_bytes",
                &self.store.max_bytes,
                "must be at least 1 MiB",
            );
        }
        if self.store.max_bytes_per_vehicle < 1024 * 1024
            || self.store.max_bytes_per_vehicle > self.store.max_bytes
        {
            return invalid(
                "store.max_bytes_per_vehicle",
                &self.store.max_bytes_per_vehicle,
                "must be at least 1 MiB and at most store.max_bytes",
            );
        }
        self.jetstream.validate()?;
        let a = &self.audit;
        if let Some(address) = &a.syslog_address {
            let port = address
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok());
            if port.is_none_or(|p| p == 0) || syslog_host(address).is_empty() {
                return invalid("audit.syslog_address", address, "must be host:port");
            }
            if a.syslog_ca.is_none() {
                return invalid(
                    "audit.syslog_ca",
                    &"none",
                    "is required with audit.syslog_address (syslog goes over TLS only)",
                );
            }
        }
        if a.syslog_cert.is_some() != a.syslog_key.is_some() {
            return invalid(
                "audit.syslog_cert",
                &a.syslog_cert.as_ref().map(|p| p.display().to_string()),
                "needs audit.syslog_key, and the other way round",
            );
        }
        Ok(())
    }
}

impl IngestConfig {
    /// The audit directory: `audit.path`, else `audit` beside the store file.
    pub fn audit_dir(&self) -> PathBuf {
        self.audit.path.clone().unwrap_or_else(|| {
            self.store
                .path
                .parent()
                .unwrap_or(Path::new("."))
                .join("audit")
        })
    }

    /// The configuration as TOML (what a file must hold to give it back); tests and the load
    /// generator start ingest processes with it.
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rendered_configuration_parses_back_the_same() {
        let mut cfg = IngestConfig {
            tls: Tls::from_dev_dir(Path::new("/certs")),
            ..IngestConfig::default()
        };
        cfg.metrics.listen = Some("127.0.0.1:9100".parse().unwrap());
        cfg.store.retention = Duration::from_secs(90 * 60);
        let text = cfg.to_toml().unwrap();
        assert!(text.contains("retention = \"1h 30m\""), "{text}");
        assert_eq!(IngestConfig::from_toml(&text, Path::new("t")).unwrap(), cfg);
    }

    #[test]
    fn flags_override_only_what_they_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ingest.toml");
        std::fs::write(
            &file,
            "[store]\npath = \"/var/lib/x.redb\"\nretention = \"5h\"\n",
        )
        .unwrap();
        let cfg = IngestConfig::load_from([
            "hospital-ingest".as_ref(),
            "--config".as_ref(),
            file.as_os_str(),
            "--grpc-listen".as_ref(),
            "127.0.0.1:1".as_ref(),
            "--reassembly-reorder-window".as_ref(),
            "0s".as_ref(),
        ] as [&std::ffi::OsStr; 7])
        .unwrap();
        assert_eq!(cfg.store.path, PathBuf::from("/var/lib/x.redb"));
        assert_eq!(cfg.store.retention, Duration::from_secs(5 * 3600));
        assert_eq!(cfg.grpc.listen, "127.0.0.1:1".parse().unwrap());
        assert_eq!(cfg.reassembly.reorder_window, Duration::ZERO);
        assert_eq!(cfg.quic.listen, Quic::default().listen);
    }

    #[test]
    fn bad_values_unknown_and_renamed_keys_are_refused_by_name() {
        let err =
            IngestConfig::from_toml("[quic]\nmax_frame_bytes = \"x\"", Path::new("t")).unwrap_err();
        assert!(err.to_string().contains("max_frame_bytes"), "{err}");
        assert!(IngestConfig::from_toml("[quik]\n", Path::new("t")).is_err());
        let err =
            IngestConfig::from_toml("[store]\nretention_hours = 72", Path::new("t")).unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::Renamed {
                    new: "store.retention",
                    ..
                }
            ),
            "{err}"
        );
        let mut cfg = IngestConfig::default();
        cfg.quic.max_frame_bytes = 10;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("quic.max_frame_bytes = 10"), "{err}");
        // A read budget must hold at least one frame, and the ingest's at least a vehicle's.
        let mut cfg = IngestConfig::default();
        cfg.quic.max_reading_bytes_per_vehicle = cfg.quic.max_frame_bytes - 1;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("quic.max_reading_bytes_per_vehicle"), "{err}");
        let mut cfg = IngestConfig::default();
        cfg.quic.max_reading_bytes = cfg.quic.max_reading_bytes_per_vehicle - 1;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("quic.max_reading_bytes ="), "{err}");
        // Group commit waits at most 100 ms; 0 commits at once.
        let cfg =
            IngestConfig::from_toml("[store]\ncommit_interval = \"0s\"", Path::new("t")).unwrap();
        assert_eq!(cfg.store.commit_interval, Duration::ZERO);
        cfg.validate().unwrap();
        let mut cfg = IngestConfig::default();
        cfg.store.commit_interval = Duration::from_millis(101);
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("store.commit_interval"), "{err}");
    }

    #[test]
    fn syslog_forwarding_needs_a_port_and_a_ca_and_names_the_host() {
        let with = |address: &str, ca: bool| {
            let mut cfg = IngestConfig::default();
            cfg.audit.syslog_address = Some(address.into());
            cfg.audit.syslog_ca = ca.then(|| PathBuf::from("/etc/siem-ca.pem"));
            cfg
        };
        let err = |cfg: IngestConfig| cfg.validate().unwrap_err().to_string();
        assert!(err(with("siem:6514", false)).contains("audit.syslog_ca"));
        assert!(err(with("siem", true)).contains("audit.syslog_address"));
        assert!(err(with(":6514", true)).contains("audit.syslog_address"));
        let cfg = with("siem.hospital.example:6514", true);
        cfg.validate().unwrap();
        let target = cfg.audit.syslog_target().unwrap();
        assert_eq!(target.server_name, "siem.hospital.example");
        assert_eq!(target.client_cert, None);
        let v6 = with("[::1]:6514", true).audit.syslog_target().unwrap();
        assert_eq!(v6.server_name, "::1");
        let mut half = with("siem:6514", true);
        half.audit.syslog_cert = Some("/c.pem".into());
        assert!(err(half).contains("audit.syslog_cert"));
        assert_eq!(IngestConfig::default().audit.syslog_target(), None);
    }

    #[test]
    fn the_jetstream_backend_is_chosen_by_key_or_flag_and_never_plaintext() {
        let cfg = IngestConfig::load_from([
            "hospital-ingest",
            "--store-backend",
            "jetstream",
            "--jetstream-servers",
            "tls://nats-1:4222,tls://nats-2:4222",
            "--jetstream-replicas",
            "3",
        ])
        .unwrap();
        assert_eq!(cfg.store.backend, StoreBackend::Jetstream);
        assert_eq!(
            cfg.jetstream.servers,
            ["tls://nats-1:4222", "tls://nats-2:4222"]
        );
        let text = "[store]\nbackend = \"jetstream\"\n[jetstream]\nservers = [\"tls://n:4222\"]\n";
        let cfg = IngestConfig::from_toml(text, Path::new("t")).unwrap();
        assert_eq!(cfg.store.backend, StoreBackend::Jetstream);
        let options = cfg.jetstream.options(&cfg.store);
        assert_eq!(
            options.max_age, cfg.store.retention,
            "the stream's limits are the store's"
        );
        let err = |f: &dyn Fn(&mut JetStreamConfig)| {
            let mut cfg = IngestConfig::default();
            f(&mut cfg.jetstream);
            cfg.validate().unwrap_err().to_string()
        };
        assert!(err(&|j| j.servers = vec!["nats://n:4222".into()]).contains("plaintext"));
        assert!(err(&|j| j.servers.clear()).contains("jetstream.servers"));
        assert!(err(&|j| j.replicas = 0).contains("jetstream.replicas"));
        assert!(err(&|j| j.stream = "a.b".into()).contains("jetstream.stream"));
        assert!(err(&|j| j.subject_prefix = "relay.>".into()).contains("subject_prefix"));
        assert!(err(&|j| j.request_timeout = Duration::ZERO).contains("request_timeout"));
    }

    #[test]
    fn every_flag_is_documented() {
        relay_ops::config::check_flags::<IngestConfig>().unwrap();
    }
}
