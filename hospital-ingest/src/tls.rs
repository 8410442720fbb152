//! TLS for both listeners, and the vehicle identity taken from a client certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use relay_ops::pem::{load_certs, load_key};
use rustls::pki_types::CertificateDer;

use crate::config::{IngestConfig, Tls};

#[derive(Debug, thiserror::Error)]
/// Why a TLS configuration could not be built.
pub enum TlsError {
    #[error(transparent)]
    /// A certificate or key could not be loaded.
    Pem(#[from] relay_ops::pem::PemError),
    #[error("reading {path}: {source}")]
    /// A file could not be read.
    Io {
        /// The file.
        path: PathBuf,
        #[source]
        /// The operating system's error.
        source: std::io::Error,
    },
    #[error("TLS configuration: {0}")]
    /// rustls refused the certificates or key.
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    /// The client-certificate verifier could not be built.
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("QUIC configuration: {0}")]
    /// quinn refused the TLS configuration.
    Quic(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
/// Why a vehicle certificate names no usable vehicle.
pub enum IdentityError {
    #[error("no client certificate")]
    /// The peer presented no certificate.
    NoCertificate,
    #[error("client certificate does not parse")]
    /// The certificate does not parse.
    Unparseable,
    #[error("client certificate has no common name")]
    /// Its subject has no common name.
    NoCommonName,
    #[error("common name {0:?} is not a valid vehicle id")]
    /// The common name is not a valid vehicle id.
    InvalidId(String),
}

impl IdentityError {
    /// Short name, a bounded metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::NoCertificate => "no_certificate",
            Self::Unparseable => "unparseable_certificate",
            Self::NoCommonName => "no_common_name",
            Self::InvalidId(_) => "invalid_vehicle_id",
        }
    }
}

/// The certificate revocation lists in a PEM file.
pub fn load_crls(
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateRevocationListDer<'static>>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateRevocationListDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Io {
            path: path.to_owned(),
            source: std::io::Error::other(e.to_string()),
        })
}

/// Serial numbers (raw, as in the certificate) that the lists in a PEM file revoke.
pub fn revoked_serials(path: &Path) -> Result<Vec<Vec<u8>>, TlsError> {
    let mut out = Vec::new();
    for crl in load_crls(path)? {
        let (_, parsed) = x509_parser::parse_x509_crl(crl.as_ref()).map_err(|e| TlsError::Io {
            path: path.to_owned(),
            source: std::io::Error::other(e.to_string()),
        })?;
        out.extend(
            parsed
                .iter_revoked_certificates()
                .map(|r| r.raw_serial().to_vec()),
        );
    }
    Ok(out)
}

/// Serial number (raw) of the certificate of a QUIC connection's peer.
pub fn connection_serial(conn: &quinn::Connection) -> Option<Vec<u8>> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certificate_serial(certs.first()?)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A verifier of client certificates issued by the CA(s) in `ca`, refusing those that the
/// revocation lists in `crl` (if any) revoke.
fn client_verifier(
    ca: &Path,
    crl: Option<&PathBuf>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots.add(cert)?;
    }
    let crls = match crl {
        Some(path) => load_crls(path)?,
        None => Vec::new(),
    };
    let mut verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
    if !crls.is_empty() {
        verifier = verifier.with_crls(crls).only_check_end_entity_revocation();
    }
    Ok(verifier.build()?)
}

/// QUIC server: TLS 1.3 only, client certificate from the fleet CA required.
pub fn quic_server_config(cfg: &IngestConfig) -> Result<quinn::ServerConfig, TlsError> {
    let tls_files: &Tls = &cfg.tls;
    let verifier = client_verifier(&tls_files.fleet_ca, tls_files.fleet_crl.as_ref())?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&tls_files.cert)?, load_key(&tls_files.key)?)?;
    tls.alpn_protocols = vec![relay_proto::ALPN.to_vec()];
    tls.max_early_data_size = 0; // no 0-RTT: replayable data has no place in clinical telemetry
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(cfg.quic.max_concurrent_frames))
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(1))
        // Bytes a vehicle may have in flight to us: bounds the memory one connection can take.
        .receive_window(quinn::VarInt::from_u32(
            cfg.quic.connection_receive_window_bytes,
        ))
        .stream_receive_window(quinn::VarInt::from_u32(
            u32::try_from(cfg.quic.max_frame_bytes).unwrap_or(u32::MAX),
        ))
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(cfg.quic.idle_timeout)
                .map_err(|e| TlsError::Quic(e.to_string()))?,
        ));
    server.transport_config(Arc::new(transport));
    Ok(server)
}

/// gRPC server TLS: our certificate, a client certificate from the subscriber CA (and not on
/// its revocation list) required, HTTP/2 only. Built anew on every reload.
pub fn grpc_server_config(tls: &Tls) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let verifier = client_verifier(&tls.subscriber_ca, tls.subscriber_crl.as_ref())?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&tls.cert)?, load_key(&tls.key)?)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Why a TLS handshake failed, as a bounded metric label: what an operator needs to tell a
/// stranger's or a revoked certificate from a client that simply went away.
pub fn handshake_failure_reason(error: &rustls::Error) -> &'static str {
    use rustls::CertificateError as C;
    match error {
        rustls::Error::InvalidCertificate(C::Revoked) => "revoked",
        rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => "unknown_ca",
        rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => "expired",
        rustls::Error::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => {
            "not_yet_valid"
        }
        rustls::Error::InvalidCertificate(_) => "bad_certificate",
        rustls::Error::NoCertificatesPresented => "no_certificate",
        rustls::Error::NoApplicationProtocol => "alpn",
        _ => "protocol",
    }
}

/// Serial number (raw) of a certificate, if it parses.
pub fn certificate_serial(cert: &CertificateDer<'_>) -> Option<Vec<u8>> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(parsed.tbs_certificate.raw_serial().to_vec())
}

/// The vehicle id of a verified client certificate: its subject common name.
pub fn vehicle_id(cert: &CertificateDer<'_>) -> Result<String, IdentityError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|_| IdentityError::Unparseable)?;
    let cn = parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or(IdentityError::NoCommonName)?;
    if !relay_proto::is_valid_vehicle_id(cn) {
        return Err(IdentityError::InvalidId(cn.chars().take(80).collect()));
    }
    Ok(cn.to_owned())
}

/// When the certificate of a QUIC connection's peer expires (Unix seconds).
pub fn connection_not_after(conn: &quinn::Connection) -> Option<i64> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    relay_ops::pem::not_after(certs.first()?)
}

/// The vehicle id of a QUIC connection's (already verified) peer.
pub fn connection_vehicle_id(conn: &quinn::Connection) -> Result<String, IdentityError> {
    let identity = conn.peer_identity().ok_or(IdentityError::NoCertificate)?;
    let certs = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| IdentityError::NoCertificate)?;
    vehicle_id(certs.first().ok_or(IdentityError::NoCertificate)?)
}
