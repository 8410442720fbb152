//! QUIC client configuration: TLS 1.3 only, the ingest's CA pinned, our vehicle certificate.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use relay_ops::pem::{load_certs, load_key};

use crate::config::{IngestEndpoint, TlsFiles};

#[derive(Debug, thiserror::Error)]
/// Why the TLS client configuration could not be built.
pub enum TlsError {
    #[error(transparent)]
    /// A certificate or key could not be loaded.
    Pem(#[from] relay_ops::pem::PemError),
    #[error("TLS configuration: {0}")]
    /// rustls refused the certificates or key.
    Rustls(#[from] rustls::Error),
    #[error("QUIC crypto configuration: {0}")]
    /// quinn refused the TLS configuration.
    Quic(String),
}

/// The QUIC client configuration: TLS 1.3 with this vehicle's certificate, the pinned ingest CA, ALPN, idle timeout and keep-alives (the bearers' probes).
pub fn client_config(
    files: &TlsFiles,
    endpoint: &IngestEndpoint,
    keep_alive: Duration,
) -> Result<quinn::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in load_certs(&files.ca_cert)? {
        roots.add(ca)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(load_certs(&files.cert)?, load_key(&files.key)?)?;
    tls.alpn_protocols = vec![relay_proto::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    // Keep-alives are also the probes that measure an idle or backup bearer.
    transport.keep_alive_interval(Some(keep_alive));
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(endpoint.idle_timeout)
            .map_err(|e| TlsError::Quic(e.to_string()))?,
    ));
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

/// When and how large a file was last seen: a change means a new certificate or key.
type Stamp = Vec<Option<(SystemTime, u64)>>;

fn stamp(files: &TlsFiles) -> Stamp {
    [&files.cert, &files.key, &files.ca_cert]
        .iter()
        .map(|p: &&std::path::PathBuf| {
            let m = std::fs::metadata(Path::new(p)).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
}

/// The client configuration, built again when the certificate, key or CA file changes, so a
/// renewed certificate is used at the next dial without a restart (and without touching the
/// spool). A file that does not load keeps the previous configuration (logged and counted).
#[derive(Debug)]
pub struct ReloadingClientConfig {
    files: TlsFiles,
    endpoint: IngestEndpoint,
    keep_alive: Duration,
    current: Mutex<(Stamp, quinn::ClientConfig)>,
}

impl ReloadingClientConfig {
    /// Builds the first configuration; an error here is a configuration error.
    pub fn new(
        files: &TlsFiles,
        endpoint: &IngestEndpoint,
        keep_alive: Duration,
    ) -> Result<Self, TlsError> {
        let config = client_config(files, endpoint, keep_alive)?;
        Ok(Self {
            files: files.clone(),
            endpoint: endpoint.clone(),
            keep_alive,
            current: Mutex::new((stamp(files), config)),
        })
    }

    /// The configuration for the next dial.
    pub fn current(&self) -> quinn::ClientConfig {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let now = stamp(&self.files);
        if now != current.0 {
            match client_config(&self.files, &self.endpoint, self.keep_alive) {
                Ok(config) => {
                    tracing::info!(cert = %self.files.cert.display(), "certificate files changed; dialling with the new ones");
                    *current = (now, config);
                }
                Err(e) => {
                    // A half-written renewal: try again at the next dial.
                    metrics::counter!("relay_agent_tls_reload_errors_total").increment(1);
                    tracing::warn!(error = %e, "certificate files changed but do not load; keeping the previous ones");
                }
            }
        }
        current.1.clone()
    }
}
