//! Ingest configuration: TOML file with embedded defaults, flags override single values.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use relay_ops::config::ConfigError;

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    pub quic: Quic,
    pub grpc: Grpc,
    pub tls: Tls,
    pub store: StoreConfig,
    pub reassembly: Reassembly,
    pub metrics: Metrics,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Reassembly {
    /// A frame that overtook others waits this long for them before a gap is announced,
    /// milliseconds (0 = announce at once).
    pub reorder_window_ms: u64,
    /// Frames held per stream while waiting; beyond, the gap is announced at once.
    pub max_held_frames: usize,
    /// Announced gaps tracked per stream; beyond, the oldest is given up.
    pub max_open_gaps: usize,
}

impl Default for Reassembly {
    fn default() -> Self {
        Self {
            reorder_window_ms: 50,
            max_held_frames: 1024,
            max_open_gaps: 65_536,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Quic {
    /// UDP address vehicles connect to.
    pub listen: SocketAddr,
    /// Concurrent vehicle connections (bearers) at most.
    pub max_connections: usize,
    /// Largest frame accepted; a larger one closes that connection.
    pub max_frame_bytes: usize,
    /// Frames in flight per connection (concurrent unidirectional streams).
    pub max_concurrent_frames: u32,
    /// A connection silent this long is dropped, milliseconds.
    pub idle_timeout_ms: u64,
    /// Hello must arrive within this after the handshake, milliseconds.
    pub hello_timeout_ms: u64,
    /// Acknowledgements waiting to be written per connection before it is closed as stuck.
    pub max_pending_acks: usize,
    /// Bytes a connection may have in flight towards the ingest (QUIC flow control): the
    /// memory one vehicle connection can occupy with unread frames.
    pub connection_receive_window_bytes: u32,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Grpc {
    /// TCP address of the gRPC API (TLS, client certificates required).
    pub listen: SocketAddr,
    /// Messages queued per subscriber.
    pub subscriber_queue: usize,
    /// A subscriber whose queue stays full this long is cut off, milliseconds.
    pub slow_subscriber_timeout_ms: u64,
    /// Live records buffered for subscribers that are momentarily behind.
    pub live_buffer: usize,
    /// Concurrent subscriptions at most.
    pub max_subscribers: usize,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Tls {
    /// The ingest's certificate chain and key (PEM), for QUIC and gRPC.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA whose client certificates may connect as vehicles (CN = vehicle id).
    pub fleet_ca: PathBuf,
    /// CA whose client certificates may use the gRPC API.
    pub subscriber_ca: PathBuf,
}

impl Tls {
    /// The usual file names of the development PKI (`relay-devcerts`) in `dir`.
    pub fn from_dev_dir(dir: &Path) -> Self {
        Self {
            cert: dir.join("ingest.pem"),
            key: dir.join("ingest.key"),
            fleet_ca: dir.join("fleet-ca.pem"),
            subscriber_ca: dir.join("hospital-ca.pem"),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// redb database file.
    pub path: PathBuf,
    /// Records older than this are deleted, hours.
    pub retention_hours: f64,
    /// The log is kept below this many bytes (oldest deleted first).
    pub max_bytes: u64,
    /// How often retention runs, seconds.
    pub retention_interval_s: u64,
    /// Frames waiting for the writer at most (back-pressure to the vehicles beyond).
    pub writer_queue: usize,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Metrics {
    /// Prometheus endpoint (GET /metrics); none when absent.
    pub listen: Option<SocketAddr>,
}

impl Default for Quic {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 4433)),
            max_connections: 1024,
            max_frame_bytes: relay_proto::DEFAULT_MAX_FRAME_BYTES,
            max_concurrent_frames: 512,
            idle_timeout_ms: 10_000,
            hello_timeout_ms: 10_000,
            max_pending_acks: 65_536,
            connection_receive_window_bytes: 4 * 1024 * 1024,
        }
    }
}

impl Default for Grpc {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            subscriber_queue: 1024,
            slow_subscriber_timeout_ms: 10_000,
            live_buffer: 8192,
            max_subscribers: 256,
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
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: "ingest-data/relay.redb".into(),
            retention_hours: 72.0,
            max_bytes: 10 * 1024 * 1024 * 1024,
            retention_interval_s: 10,
            writer_queue: 8192,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, clap::Parser)]
#[command(
    name = "hospital-ingest",
    version,
    about = "Accepts ambulances over QUIC (mutual TLS), stores their telemetry and republishes it over gRPC"
)]
pub struct Cli {
    /// TOML configuration file (see deploy/config/hospital-ingest.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub quic_listen: Option<SocketAddr>,
    #[arg(long)]
    pub grpc_listen: Option<SocketAddr>,
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    #[arg(long)]
    pub store_path: Option<PathBuf>,
    #[arg(long)]
    pub cert: Option<PathBuf>,
    #[arg(long)]
    pub key: Option<PathBuf>,
    #[arg(long)]
    pub fleet_ca: Option<PathBuf>,
    #[arg(long)]
    pub subscriber_ca: Option<PathBuf>,
    #[arg(long)]
    pub max_frame_bytes: Option<usize>,
}

impl Cli {
    /// Flags naming the TLS files of the development PKI in `dir`.
    pub fn for_dev_pki(dir: &Path) -> Self {
        let tls = Tls::from_dev_dir(dir);
        Self {
            cert: Some(tls.cert),
            key: Some(tls.key),
            fleet_ca: Some(tls.fleet_ca),
            subscriber_ca: Some(tls.subscriber_ca),
            ..Self::default()
        }
    }

    /// The command line that parses back into `self`, for starting the ingest as a process.
    pub fn to_args(&self) -> Vec<std::ffi::OsString> {
        let mut out = Vec::new();
        let mut flag = |name: &str, value: Option<std::ffi::OsString>| {
            if let Some(v) = value {
                out.push(name.into());
                out.push(v);
            }
        };
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.clone().into_os_string());
        let text = |v: Option<String>| v.map(Into::into);
        flag("--config", path(&self.config));
        flag(
            "--quic-listen",
            text(self.quic_listen.map(|a| a.to_string())),
        );
        flag(
            "--grpc-listen",
            text(self.grpc_listen.map(|a| a.to_string())),
        );
        flag(
            "--metrics-listen",
            text(self.metrics_listen.map(|a| a.to_string())),
        );
        flag("--store-path", path(&self.store_path));
        flag("--cert", path(&self.cert));
        flag("--key", path(&self.key));
        flag("--fleet-ca", path(&self.fleet_ca));
        flag("--subscriber-ca", path(&self.subscriber_ca));
        flag(
            "--max-frame-bytes",
            text(self.max_frame_bytes.map(|n| n.to_string())),
        );
        out
    }
}

impl IngestConfig {
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        relay_ops::config::parse_toml(text, path)
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        relay_ops::config::read_toml(path)
    }

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
        fn set<T: Clone>(dst: &mut T, src: &Option<T>) {
            if let Some(v) = src {
                *dst = v.clone();
            }
        }
        set(&mut self.quic.listen, &cli.quic_listen);
        set(&mut self.grpc.listen, &cli.grpc_listen);
        if cli.metrics_listen.is_some() {
            self.metrics.listen = cli.metrics_listen;
        }
        set(&mut self.store.path, &cli.store_path);
        set(&mut self.tls.cert, &cli.cert);
        set(&mut self.tls.key, &cli.key);
        set(&mut self.tls.fleet_ca, &cli.fleet_ca);
        set(&mut self.tls.subscriber_ca, &cli.subscriber_ca);
        set(&mut self.quic.max_frame_bytes, &cli.max_frame_bytes);
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.into()));
        if self.quic.max_frame_bytes < 1024 || self.quic.max_frame_bytes > 16 * 1024 * 1024 {
            return bad("quic.max_frame_bytes must be in 1 KiB..=16 MiB");
        }
        if self.quic.max_connections == 0
            || self.quic.max_concurrent_frames == 0
            || self.quic.max_pending_acks == 0
        {
            return bad("quic limits must be positive");
        }
        if (self.quic.connection_receive_window_bytes as usize) < self.quic.max_frame_bytes {
            return bad("quic.connection_receive_window_bytes must hold at least one frame");
        }
        if self.grpc.subscriber_queue == 0
            || self.grpc.live_buffer == 0
            || self.grpc.max_subscribers == 0
        {
            return bad("grpc limits must be positive");
        }
        if !(self.store.retention_hours.is_finite() && self.store.retention_hours > 0.0) {
            return bad("store.retention_hours must be positive");
        }
        if self.reassembly.reorder_window_ms > 10_000
            || self.reassembly.max_held_frames == 0
            || self.reassembly.max_open_gaps == 0
        {
            return bad("reassembly: reorder_window_ms <= 10000, limits positive");
        }
        if self.store.max_bytes < 1024 * 1024
            || self.store.writer_queue == 0
            || self.store.retention_interval_s == 0
        {
            return bad(
                "store: max_bytes >= 1 MiB, writer_queue and retention_interval_s positive",
            );
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
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/hospital-ingest.toml");
        let cfg = IngestConfig::from_file(&path).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.metrics.listen, Some("127.0.0.1:9100".parse().unwrap()));
    }

    #[test]
    fn rendered_flags_parse_back_into_the_same_cli() {
        let cli = Cli {
            config: Some("/etc/relay/ingest.toml".into()),
            quic_listen: Some("127.0.0.1:4433".parse().unwrap()),
            grpc_listen: Some("[::1]:50051".parse().unwrap()),
            metrics_listen: Some("127.0.0.1:9100".parse().unwrap()),
            store_path: Some("/var/lib/relay.redb".into()),
            max_frame_bytes: Some(65_536),
            ..Cli::for_dev_pki(Path::new("/certs"))
        };
        let args = std::iter::once("hospital-ingest".into()).chain(cli.to_args());
        assert_eq!(Cli::parse_from(args), cli);
        assert_eq!(
            Cli::parse_from(
                std::iter::once("hospital-ingest".into()).chain(Cli::default().to_args())
            ),
            Cli::default()
        );
    }

    #[test]
    fn flags_override_only_what_they_name() {
        let mut cfg = IngestConfig::from_toml(
            "[store]\npath = \"/var/lib/x.redb\"\nretention_hours = 5\n",
            Path::new("t"),
        )
        .unwrap();
        cfg.apply(&Cli::parse_from([
            "hospital-ingest",
            "--grpc-listen",
            "127.0.0.1:1",
        ]));
        assert_eq!(cfg.store.path, PathBuf::from("/var/lib/x.redb"));
        assert_eq!(cfg.store.retention_hours, 5.0);
        assert_eq!(cfg.grpc.listen, "127.0.0.1:1".parse().unwrap());
        assert_eq!(cfg.quic.listen, Quic::default().listen);
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(
            IngestConfig::from_toml("[quic]\nmax_frame_bytes = \"x\"", Path::new("t")).is_err()
        );
        assert!(IngestConfig::from_toml("[quik]\n", Path::new("t")).is_err());
        let mut cfg = IngestConfig::default();
        cfg.quic.max_frame_bytes = 10;
        assert!(cfg.validate().is_err());
    }
}
