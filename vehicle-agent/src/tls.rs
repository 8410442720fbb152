//! QUIC client configuration: TLS 1.3 only, the ingest's CA pinned, our vehicle certificate.

use std::sync::Arc;
use std::time::Duration;

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
