//! Operations plumbing shared by the binaries: one Prometheus recorder per process, served on
//! any number of HTTP listeners, and log set-up.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("another metrics recorder is installed in this process")]
    RecorderTaken,
    #[error("binding metrics endpoint {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

static HANDLE: OnceLock<Result<PrometheusHandle, ()>> = OnceLock::new();

/// The process-wide Prometheus recorder, installed on first use. Agent and ingest may share a
/// process (tests, the demo); both then report into the same registry.
pub fn prometheus() -> Result<PrometheusHandle, OpsError> {
    HANDLE
        .get_or_init(|| {
            // Latency histograms get buckets from 1 ms to 30 s instead of summaries, so they
            // aggregate across instances.
            let builder = PrometheusBuilder::new().set_buckets(&[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]);
            let builder = match builder {
                Ok(b) => b,
                Err(_) => return Err(()),
            };
            builder.install_recorder().map_err(|_| ())
        })
        .clone()
        .map_err(|()| OpsError::RecorderTaken)
}

/// Serves `GET /metrics` in Prometheus text format on `addr` until `shutdown` resolves.
/// Returns the bound address (useful with port 0).
pub async fn serve_metrics(
    addr: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<SocketAddr, OpsError> {
    let handle = prometheus()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| OpsError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| OpsError::Bind { addr, source })?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let h = handle.clone();
            async move {
                // Histograms are kept as buckets; upkeep drains their pending samples.
                h.run_upkeep();
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    h.render(),
                )
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::warn!(error = %e, "metrics endpoint stopped");
        }
    });
    Ok(local)
}

/// The wall clock as UTC nanoseconds since the Unix epoch, the unit of every capture and
/// arrival time in the protocol (0 before 1970, saturating in 2262).
pub fn now_utc_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Structured logs to stderr; `RUST_LOG` overrides `default_filter`. Safe to call twice.
pub fn init_logging(default_filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// rustls needs one process-wide crypto provider (ring here); every binary and test calls
/// this before building a TLS config. A second call is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Resolves on ctrl-c or SIGTERM (systemd's stop signal).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Reading certificates and keys from PEM files, for both services and the tests.
pub mod pem {
    use std::path::{Path, PathBuf};

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    #[derive(Debug, thiserror::Error)]
    pub enum PemError {
        #[error("reading {path}: {source}")]
        Read {
            path: PathBuf,
            #[source]
            source: rustls::pki_types::pem::Error,
        },
        #[error("{path} holds no certificate")]
        NoCertificate { path: PathBuf },
    }

    /// Every certificate in a PEM file (a chain: leaf first); at least one.
    pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|source| PemError::Read {
                path: path.to_owned(),
                source,
            })?;
        if certs.is_empty() {
            return Err(PemError::NoCertificate {
                path: path.to_owned(),
            });
        }
        Ok(certs)
    }

    /// The first private key in a PEM file.
    pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
        PrivateKeyDer::from_pem_file(path).map_err(|source| PemError::Read {
            path: path.to_owned(),
            source,
        })
    }
}

/// Configuration files: TOML parsed into a service's config struct, with errors naming the file.
pub mod config {
    use std::path::{Path, PathBuf};

    #[derive(Debug, thiserror::Error)]
    pub enum ConfigError {
        #[error("reading config {path}: {source}")]
        Read {
            path: PathBuf,
            #[source]
            source: std::io::Error,
        },
        #[error("parsing config {path}: {source}")]
        Parse {
            path: PathBuf,
            #[source]
            source: Box<toml::de::Error>,
        },
        #[error("invalid config: {0}")]
        Invalid(String),
    }

    /// Parses TOML text; `path` only names the source in errors.
    pub fn parse_toml<T: serde::de::DeserializeOwned>(
        text: &str,
        path: &Path,
    ) -> Result<T, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(e),
        })
    }

    pub fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        parse_toml(&text, path)
    }
}
