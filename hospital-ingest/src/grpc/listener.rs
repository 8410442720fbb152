//! The gRPC listener's TLS, in front of tonic: TCP accept -> bounded, deadlined TLS handshake
//! with the current configuration -> a connection tonic serves. Our own acceptor (rather than
//! tonic's) lets the certificate, the subscriber CA and its revocation list be replaced without
//! a restart, counts failed handshakes by cause, and closes the open connections of a client
//! whose certificate is revoked.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::Connected;

use crate::audit::{AuditEvent, Outcome};

/// Established connections handed to tonic but not yet taken: tonic takes them as fast as it
/// can; the bound only keeps a burst of handshakes from piling up.
const HANDOFF_QUEUE: usize = 16;

/// The TLS configuration new handshakes use and the open connections, by certificate serial.
#[derive(Debug)]
pub struct GrpcTls {
    config: RwLock<Arc<rustls::ServerConfig>>,
    open: Mutex<HashMap<u64, OpenConnection>>,
    next_id: AtomicU64,
}

#[derive(Debug)]
struct OpenConnection {
    serial: Option<Vec<u8>>,
    close: CancellationToken,
}

impl GrpcTls {
    /// Starts with `config`.
    pub fn new(config: Arc<rustls::ServerConfig>) -> Arc<Self> {
        Arc::new(Self {
            config: RwLock::new(config),
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        })
    }

    /// New handshakes use `config` from now on; open connections keep theirs.
    pub fn set_config(&self, config: Arc<rustls::ServerConfig>) {
        *self.config.write().unwrap_or_else(PoisonError::into_inner) = config;
    }

    fn current(&self) -> Arc<rustls::ServerConfig> {
        self.config
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Open connections at the moment.
    pub fn open_connections(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Closes every open connection whose client certificate serial is in `revoked`; returns
    /// how many. Their calls end with an error at once, whatever they were waiting for.
    pub fn close_revoked(&self, revoked: &[Vec<u8>]) -> usize {
        let open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let mut closed = 0;
        for conn in open.values() {
            if conn.serial.as_ref().is_some_and(|s| revoked.contains(s)) {
                conn.close.cancel();
                closed += 1;
            }
        }
        closed
    }

    fn register(self: &Arc<Self>, serial: Option<Vec<u8>>) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let close = CancellationToken::new();
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                id,
                OpenConnection {
                    serial,
                    close: close.clone(),
                },
            );
        Registration {
            owner: self.clone(),
            id,
            close,
        }
    }
}

/// Removes its connection from the open ones when tonic drops it.
#[derive(Debug)]
struct Registration {
    owner: Arc<GrpcTls>,
    id: u64,
    close: CancellationToken,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.owner
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

/// Bounds of the TLS accept loop.
#[derive(Debug, Clone, Copy)]
pub struct AcceptLimits {
    /// A handshake not finished by then is dropped.
    pub handshake_timeout: Duration,
    /// Handshakes in progress at most; more connections are closed at once.
    pub max_pending: usize,
}

/// Accepts TCP connections, runs their TLS handshakes (each bounded in time, their number
/// bounded) with the configuration current at accept time, and yields the established ones for
/// `tonic::transport::Server::serve_with_incoming_shutdown`. Ends when `stop` is cancelled.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<GrpcTls>,
    audit: crate::audit::AuditLog,
    limits: AcceptLimits,
    stop: CancellationToken,
) -> ReceiverStream<io::Result<GrpcConnection>> {
    let (tx, rx) = mpsc::channel(HANDOFF_QUEUE);
    let pending = Arc::new(Semaphore::new(limits.max_pending));
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors and the like: the listener itself is fine.
                        tracing::warn!(error = %e, "gRPC accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = pending.clone().try_acquire_owned() else {
                refused("busy");
                continue;
            };
            // Live records are small writes: with Nagle's algorithm one would wait for the
            // subscriber's delayed ACK (40 ms on Linux) whenever an earlier one is unacked.
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(%remote, error = %e, "TCP_NODELAY not set");
            }
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
            let (tls, tx, stop, audit) = (tls.clone(), tx.clone(), stop.clone(), audit.clone());
            tokio::spawn(async move {
                let handshake =
                    tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp));
                let stream = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = handshake => r,
                };
                drop(permit);
                let stream = match stream {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        let reason = e
                            .get_ref()
                            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                            .map_or("io", crate::tls::handshake_failure_reason);
                        refused(reason);
                        if reason == "revoked" {
                            metrics::counter!("relay_ingest_security_events_total", "reason" => "revoked")
                                .increment(1);
                        }
                        tracing::warn!(%remote, reason, error = %e, "gRPC TLS handshake failed");
                        let mut event = AuditEvent::new("grpc_connect", Outcome::Denied);
                        event.remote = Some(remote.to_string());
                        event.detail =
                            serde_json::json!({ "reason": reason, "error": e.to_string() });
                        audit.record(event);
                        return;
                    }
                    Err(_) => {
                        refused("timeout");
                        return;
                    }
                };
                let client = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| crate::access::ClientIdentity::from_der(c.as_ref()));
                let mut event = AuditEvent::new("grpc_connect", Outcome::Success);
                event.client = client.as_ref().map(Into::into);
                event.remote = Some(remote.to_string());
                audit.record(event);
                let serial = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(crate::tls::certificate_serial);
                let registration = tls.register(serial);
                let closed = registration.close.clone().cancelled_owned();
                let conn = GrpcConnection {
                    inner: stream,
                    closed: Box::pin(closed),
                    _registration: registration,
                };
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    ReceiverStream::new(rx)
}

fn refused(reason: &'static str) {
    metrics::counter!("relay_ingest_grpc_handshake_failures_total", "reason" => reason)
        .increment(1);
}

/// Every label value of `relay_ingest_grpc_handshake_failures_total`, exported at zero from
/// start so that alert rules see the first failure.
pub const HANDSHAKE_FAILURE_REASONS: &[&str] = &[
    "revoked",
    "unknown_ca",
    "expired",
    "not_yet_valid",
    "bad_certificate",
    "no_certificate",
    "alpn",
    "protocol",
    "io",
    "timeout",
    "busy",
];

/// An established gRPC connection: reads and writes fail once its certificate is revoked,
/// which ends every call on it.
pub struct GrpcConnection {
    inner: TlsStream<TcpStream>,
    closed: Pin<Box<WaitForCancellationFutureOwned>>,
    _registration: Registration,
}

impl std::fmt::Debug for GrpcConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcConnection").finish_non_exhaustive()
    }
}

impl GrpcConnection {
    /// Polling the close signal registers the task, so a revocation wakes a connection that
    /// is only waiting for its client.
    fn check_open(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.closed.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "client certificate revoked",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

impl AsyncRead for GrpcConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_open(cx)?;
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for GrpcConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_open(cx)?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_open(cx)?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl Connected for GrpcConnection {
    type ConnectInfo = <TlsStream<TcpStream> as Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn client_config(pki: &std::path::Path) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for ca in relay_ops::pem::load_certs(&pki.join("hospital-ca.pem")).unwrap() {
            roots.add(ca).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            relay_ops::pem::load_certs(&pki.join("ed-console.pem")).unwrap(),
            relay_ops::pem::load_key(&pki.join("ed-console.key")).unwrap(),
        )
        .unwrap();
        Arc::new(config)
    }

    #[tokio::test]
    async fn accepted_connections_send_small_writes_without_waiting_for_acks() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        relay_devcerts::generate(&pki, &relay_devcerts::DevPki::default()).unwrap();
        let server =
            crate::tls::grpc_server_config(&crate::config::Tls::from_dev_dir(&pki)).unwrap();
        let (audit, _audit_writer) = crate::audit::AuditLog::open(crate::audit::AuditSettings {
            dir: dir.path().join("audit"),
            max_file_bytes: 1 << 20,
            max_files: 2,
            queue: 16,
            forward: None,
        })
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let limits = AcceptLimits {
            handshake_timeout: Duration::from_secs(30),
            max_pending: 4,
        };
        let mut accepted = incoming(listener, GrpcTls::new(server), audit, limits, stop.clone());

        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let connector = tokio_rustls::TlsConnector::from(client_config(&pki));
        let (client, conn) = tokio::join!(connector.connect(name, tcp), accepted.next());
        let _client = client.unwrap();
        let conn = conn.unwrap().unwrap();
        // Nagle's algorithm off: a live record is written at once, not after the
        // subscriber's delayed ACK of the one before.
        assert!(conn.inner.get_ref().0.nodelay().unwrap());
        stop.cancel();
    }
}
