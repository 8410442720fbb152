//! ed-web configuration: one struct, [`WebConfig`], read from a TOML file (every key optional,
//! unknown keys refused) and overridden key by key by flags. `deploy/config/ed-web.toml` shows
//! every key with its default (a test holds it to that).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser};
use relay_ops::config::{ConfigError, Rename, ServiceConfig, invalid, parse_duration, positive};
use serde::{Deserialize, Serialize};

/// The ED web view: subscribes to the ingest over gRPC and serves clinicians an HTTPS web
/// application (board of vehicles, live calibrated waveforms, vitals, position, alerts).
///
/// Every setting has a default; --config names a TOML file (see deploy/config/ed-web.toml)
/// and each flag overrides one key of it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, Parser)]
#[serde(deny_unknown_fields, default)]
#[command(name = "ed-web", version)]
pub struct WebConfig {
    /// TOML configuration file; flags override single keys of it.
    #[serde(skip)]
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Accept certificates of the development PKI (relay-devcerts): demos and tests only.
    #[serde(skip)]
    #[arg(long)]
    pub allow_dev_pki: bool,
    /// The HTTPS endpoint browsers use.
    #[command(flatten)]
    pub http: HttpConfig,
    /// The ingest's gRPC API and ed-web's client certificate for it.
    #[command(flatten)]
    pub ingest: IngestLink,
    /// Users and sessions.
    #[command(flatten)]
    pub auth: AuthConfig,
    /// How traces are drawn.
    #[command(flatten)]
    pub display: DisplayConfig,
    /// The record of who viewed what.
    #[command(flatten)]
    pub audit: WebAuditConfig,
    /// Paging the cath lab.
    #[command(flatten)]
    pub webhook: WebhookConfig,
    /// The Prometheus endpoint.
    #[command(flatten)]
    pub metrics: relay_ops::config::MetricsConfig,
}

/// The HTTPS endpoint (`[http]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address browsers connect to (HTTPS only: there is no plaintext mode).
    #[arg(id = "http.listen", long = "http-listen", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Server certificate chain (PEM) browsers are shown.
    #[arg(id = "http.cert", long = "http-cert")]
    pub cert: PathBuf,
    /// Its private key (PEM).
    #[arg(id = "http.key", long = "http-key")]
    pub key: PathBuf,
    /// Live streams (server-sent events) open at once, all browsers together.
    #[arg(id = "http.max_streams", long = "http-max-streams")]
    pub max_streams: usize,
    /// Live streams one user may hold open at once.
    #[arg(id = "http.max_streams_per_user", long = "http-max-streams-per-user")]
    pub max_streams_per_user: usize,
    /// Messages queued for one browser; a browser that falls this far behind is disconnected
    /// and resumes from its last event id (nothing is lost, memory stays bounded).
    #[arg(id = "http.stream_queue", long = "http-stream-queue")]
    pub stream_queue: usize,
    /// A browser whose queue stays full this long is disconnected (it resumes from its last
    /// event id).
    #[serde(with = "humantime_serde")]
    #[arg(id = "http.slow_browser_timeout", long = "http-slow-browser-timeout", value_parser = parse_duration)]
    pub slow_browser_timeout: Duration,
    /// TLS handshakes in progress at once; further connections wait in the kernel's backlog.
    #[arg(
        id = "http.max_pending_handshakes",
        long = "http-max-pending-handshakes"
    )]
    pub max_pending_handshakes: usize,
    /// A TLS handshake not finished in this time is dropped.
    #[serde(with = "humantime_serde")]
    #[arg(id = "http.handshake_timeout", long = "http-handshake-timeout", value_parser = parse_duration)]
    pub handshake_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            cert: "certs/ed-web-server.pem".into(),
            key: "certs/ed-web-server.key".into(),
            max_streams: 256,
            max_streams_per_user: 8,
            stream_queue: 1024,
            slow_browser_timeout: Duration::from_secs(10),
            max_pending_handshakes: 64,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// The ingest's gRPC API (`[ingest]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(deny_unknown_fields, default)]
pub struct IngestLink {
    /// gRPC address of the ingest.
    #[arg(id = "ingest.url", long = "ingest-url")]
    pub url: String,
    /// Name the ingest's certificate must carry.
    #[arg(id = "ingest.server_name", long = "ingest-server-name")]
    pub server_name: String,
    /// CA of the ingest's certificate (the hospital CA).
    #[arg(id = "ingest.ca", long = "ingest-ca")]
    pub ca: PathBuf,
    /// ed-web's client certificate (the ingest's access policy decides what it may read).
    #[arg(id = "ingest.cert", long = "ingest-cert")]
    pub cert: PathBuf,
    /// Its private key.
    #[arg(id = "ingest.key", long = "ingest-key")]
    pub key: PathBuf,
    /// How often the board asks the ingest for the list of vehicles.
    #[serde(with = "humantime_serde")]
    #[arg(id = "ingest.refresh", long = "ingest-refresh", value_parser = parse_duration)]
    pub refresh: Duration,
}

impl Default for IngestLink {
    fn default() -> Self {
        Self {
            url: "https://127.0.0.1:50051".into(),
            server_name: "localhost".into(),
            ca: "certs/hospital-ca.pem".into(),
            cert: "certs/ed-web.pem".into(),
            key: "certs/ed-web.key".into(),
            refresh: Duration::from_secs(2),
        }
    }
}

/// Users and sessions (`[auth]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// TOML file of users: `[[user]]` with `name`, `password_hash` (argon2 PHC string from
    /// `ed-web hash-password`) and `vehicles` (ids, `prefix*` or `*`). Read at start.
    #[arg(id = "auth.users_file", long = "auth-users-file")]
    pub users_file: PathBuf,
    /// A session ends this long after login.
    #[serde(with = "humantime_serde")]
    #[arg(id = "auth.session_ttl", long = "auth-session-ttl", value_parser = parse_duration)]
    pub session_ttl: Duration,
    /// Sessions held at once; the oldest is ended when a login would exceed it.
    #[arg(id = "auth.max_sessions", long = "auth-max-sessions")]
    pub max_sessions: usize,
    /// Failed logins of one user before further attempts wait `lockout`.
    #[arg(id = "auth.max_failures", long = "auth-max-failures")]
    pub max_failures: u32,
    /// How long a user whose password was mistyped `max_failures` times is refused.
    #[serde(with = "humantime_serde")]
    #[arg(id = "auth.lockout", long = "auth-lockout", value_parser = parse_duration)]
    pub lockout: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            users_file: "ed-web-users.toml".into(),
            session_ttl: Duration::from_secs(12 * 3600),
            max_sessions: 1024,
            max_failures: 5,
            lockout: Duration::from_secs(60),
        }
    }
}

/// How traces are drawn (`[display]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(deny_unknown_fields, default)]
pub struct DisplayConfig {
    /// CSS pixels per millimetre of the ED screens (CSS's nominal 96 dpi is 3.7795): set it
    /// from a measured screen so 25 mm/s and 10 mm/mV are true millimetres.
    #[arg(id = "display.pixels_per_mm", long = "display-pixels-per-mm")]
    pub pixels_per_mm: f64,
    /// How far back a browser may rewind a vehicle view (capture time before now).
    #[serde(with = "humantime_serde")]
    #[arg(id = "display.rewind_limit", long = "display-rewind-limit", value_parser = parse_duration)]
    pub rewind_limit: Duration,
    /// Map tile URL template (`https://tiles.example/{z}/{x}/{y}.png`); a plain track view
    /// when empty (hospital networks are often closed).
    #[arg(id = "display.tile_url", long = "display-tile-url")]
    pub tile_url: String,
}

impl Default for DisplayConfig {
    fn default() -> Self {
        Self {
            // CSS's 96 px per inch, to five digits (a value TOML reads back exactly).
            pixels_per_mm: 3.7795,
            rewind_limit: Duration::from_secs(3600),
            tile_url: String::new(),
        }
    }
}

/// The record of who viewed what (`[audit]`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, Args)]
#[serde(deny_unknown_fields, default)]
pub struct WebAuditConfig {
    /// Append one JSON line per login, page view and data stream here (they are also logged);
    /// none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(id = "audit.path", long = "audit-path")]
    pub path: Option<PathBuf>,
}

/// Paging the cath lab (`[webhook]`): events with one of `codes` are POSTed to `url`,
/// exactly once each (README "ED web view").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Args)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// HTTPS URL alerts are POSTed to (JSON, with an Idempotency-Key header); no paging
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(id = "webhook.url", long = "webhook-url")]
    pub url: Option<String>,
    /// CA that signed the receiver's certificate (PEM).
    #[arg(id = "webhook.ca", long = "webhook-ca")]
    pub ca: PathBuf,
    /// Event codes that page (comma-separated on the command line).
    #[arg(id = "webhook.codes", long = "webhook-codes", value_delimiter = ',')]
    pub codes: Vec<String>,
    /// The durable outbox (redb): alerts not yet delivered and those already sent.
    #[arg(id = "webhook.outbox", long = "webhook-outbox")]
    pub outbox: PathBuf,
    /// One POST (connect, TLS, answer) must finish within this.
    #[serde(with = "humantime_serde")]
    #[arg(id = "webhook.timeout", long = "webhook-timeout", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Retries back off from 1 s, doubling up to this.
    #[serde(with = "humantime_serde")]
    #[arg(id = "webhook.max_backoff", long = "webhook-max-backoff", value_parser = parse_duration)]
    pub max_backoff: Duration,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            url: None,
            ca: "certs/webhook-ca.pem".into(),
            codes: vec!["STEMI".into()],
            outbox: "ed-web-webhook.redb".into(),
            timeout: Duration::from_secs(10),
            max_backoff: Duration::from_secs(60),
        }
    }
}

impl ServiceConfig for WebConfig {
    const RENAMED: &'static [Rename] = &[];

    fn config_file(&self) -> Option<&Path> {
        self.config.as_deref()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        positive(&[
            ("http.max_streams", self.http.max_streams),
            ("http.max_streams_per_user", self.http.max_streams_per_user),
            ("http.stream_queue", self.http.stream_queue),
            (
                "http.max_pending_handshakes",
                self.http.max_pending_handshakes,
            ),
            ("auth.max_sessions", self.auth.max_sessions),
            ("auth.max_failures", self.auth.max_failures as usize),
        ])?;
        positive(&[
            ("http.handshake_timeout", self.http.handshake_timeout),
            ("http.slow_browser_timeout", self.http.slow_browser_timeout),
            ("ingest.refresh", self.ingest.refresh),
            ("auth.session_ttl", self.auth.session_ttl),
            ("display.rewind_limit", self.display.rewind_limit),
            ("webhook.timeout", self.webhook.timeout),
            ("webhook.max_backoff", self.webhook.max_backoff),
        ])?;
        if let Some(url) = &self.webhook.url
            && !url.starts_with("https://")
        {
            return invalid("webhook.url", url, "must be an https:// URL");
        }
        let ppmm = self.display.pixels_per_mm;
        if !(ppmm.is_finite() && (1.0..=40.0).contains(&ppmm)) {
            return invalid("display.pixels_per_mm", &ppmm, "must be in 1..=40");
        }
        let tiles = &self.display.tile_url;
        if !tiles.is_empty() && !tiles.starts_with("https://") {
            return invalid(
                "display.tile_url",
                tiles,
                "must be an https:// URL template",
            );
        }
        if !self.ingest.url.starts_with("https://") {
            return invalid("ingest.url", &self.ingest.url, "must be https://");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_flag_is_documented_and_bounds_are_checked() {
        relay_ops::config::check_flags::<WebConfig>().unwrap();
        WebConfig::default().validate().unwrap();
        let bad: Result<WebConfig, _> =
            WebConfig::load_from(["ed-web", "--display-pixels-per-mm", "0.1"]);
        assert!(
            bad.unwrap_err()
                .to_string()
                .contains("display.pixels_per_mm")
        );
        let bad: Result<WebConfig, _> =
            WebConfig::load_from(["ed-web", "--ingest-url", "http://10.0.0.1:50051"]);
        assert!(bad.unwrap_err().to_string().contains("ingest.url"));
        let bad: Result<WebConfig, _> =
            WebConfig::load_from(["ed-web", "--webhook-url", "http://cathlab/page"]);
        assert!(bad.unwrap_err().to_string().contains("webhook.url"));
        let c: WebConfig =
            WebConfig::load_from(["ed-web", "--webhook-codes", "STEMI,STROKE"]).unwrap();
        assert_eq!(c.webhook.codes, ["STEMI", "STROKE"]);
    }
}
