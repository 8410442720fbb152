//! Forwarding of the audit log to a SIEM: every record, once it is durable in the local file,
//! leaves as an RFC 5424 syslog message over TLS with RFC 5425's octet-counted framing (the
//! standard transport SIEMs and rsyslog/syslog-ng accept on port 6514). The local file stays
//! the record; the copy off the machine is what makes the newest lines, and the whole chain
//! against a root user, tamper-evident.
//!
//! Messages: facility 13 (log audit); severity informational for a success, warning for a
//! denial or failure; APP-NAME `hospital-ingest`, PROCID our pid, MSGID the audit action,
//! structured data `[audit@32473 seq="N" outcome="..."]`, and the record's JSON line as MSG.
//! (32473 is the private enterprise number RFC 5612 reserves for documentation; a hospital
//! may map it in its SIEM like any other.)
//!
//! Bounded: records wait in a queue of `audit.queue`; when the receiver is away longer than
//! the queue lasts, records beyond are dropped from the forward (counted in
//! `relay_ingest_audit_forward_dropped_total`), never from the file. The connection is
//! retried with backoff (1 s doubling to 30 s). RFC 5425 has no acknowledgements: a receiver
//! that closes its connection is noticed before the next record is written, but records
//! written into a connection whose peer vanished without closing (a network partition) may
//! be lost from the forward; the chain's sequence numbers show the SIEM which.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// Where and how to forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyslogTarget {
    /// `host:port` of the receiver.
    pub address: String,
    /// Name its certificate must carry.
    pub server_name: String,
    /// CA certificates that may have signed the receiver's certificate.
    pub ca: PathBuf,
    /// Our certificate and key, when the receiver asks for one.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Records waiting to be forwarded at most.
    pub queue: usize,
}

/// Why forwarding cannot start.
#[derive(Debug, thiserror::Error)]
pub enum SyslogError {
    /// A certificate or key could not be read.
    #[error(transparent)]
    Pem(#[from] relay_ops::pem::PemError),
    /// rustls refused them.
    #[error("syslog TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The server name is not a DNS name or address.
    #[error("syslog server name {0:?} is not a DNS name or IP address")]
    ServerName(String),
}

/// Facility "log audit" (RFC 5424, 6.2.1).
const FACILITY_LOG_AUDIT: u8 = 13;
/// SD-ID of our structured data.
const SD_ID: &str = "audit@32473";
/// The longest wait for a connection or a write before the receiver counts as away.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Printable US-ASCII without spaces, at most `max` characters, "-" when empty (RFC 5424
/// header fields).
fn header_field(s: &str, max: usize) -> String {
    let f: String = s
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(max)
        .collect();
    if f.is_empty() { "-".into() } else { f }
}

/// This host's name for the HOSTNAME field.
pub fn hostname() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    header_field(name.trim(), 255)
}

/// The RFC 5424 message of one audit line (None when the line is not an audit record).
pub fn message(line: &str, hostname: &str, procid: u32) -> Option<String> {
    let record: crate::audit::AuditRecord = serde_json::from_str(line).ok()?;
    let (severity, outcome) = match record.event.outcome {
        crate::audit::Outcome::Success => (6, "success"),
        crate::audit::Outcome::Denied => (4, "denied"),
        crate::audit::Outcome::Failure => (4, "failure"),
    };
    let pri = FACILITY_LOG_AUDIT * 8 + severity;
    // The record's own RFC 3339 time (UTC, milliseconds) is a valid TIMESTAMP; the SD
    // parameters are a number and fixed words (nothing to escape).
    Some(format!(
        "<{pri}>1 {} {} hospital-ingest {procid} {} [{SD_ID} seq=\"{}\" outcome=\"{outcome}\"] \u{feff}{line}",
        header_field(&record.time, 32),
        header_field(hostname, 255),
        header_field(&record.event.action, 32),
        record.seq,
    ))
}

/// RFC 5425 framing: the message length in octets, a space, the message.
pub fn frame(message: &str) -> Vec<u8> {
    let mut out = format!("{} ", message.len()).into_bytes();
    out.extend_from_slice(message.as_bytes());
    out
}

/// The audit writer's side of the forward: hands durable lines to the forwarding task.
#[derive(Debug, Clone)]
pub struct Forwarder {
    tx: mpsc::Sender<String>,
}

impl Forwarder {
    /// Starts forwarding to `target` on `runtime`.
    pub fn start(
        target: SyslogTarget,
        runtime: &tokio::runtime::Handle,
    ) -> Result<Self, SyslogError> {
        let tls = client_config(&target)?;
        let name = rustls::pki_types::ServerName::try_from(target.server_name.clone())
            .map_err(|_| SyslogError::ServerName(target.server_name.clone()))?;
        let (tx, rx) = mpsc::channel(target.queue.max(1));
        runtime.spawn(run(target, tls, name, rx));
        Ok(Self { tx })
    }

    /// Queues a durable line; when the queue is full it is dropped from the forward.
    pub fn offer(&self, line: String) {
        if self.tx.try_send(line).is_err() {
            metrics::counter!("relay_ingest_audit_forward_dropped_total").increment(1);
        }
    }
}

fn client_config(target: &SyslogTarget) -> Result<Arc<rustls::ClientConfig>, SyslogError> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in relay_ops::pem::load_certs(&target.ca)? {
        roots.add(ca)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    let config = match &target.client_cert {
        Some((cert, key)) => builder.with_client_auth_cert(
            relay_ops::pem::load_certs(cert)?,
            relay_ops::pem::load_key(key)?,
        )?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

type Stream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn connect(
    target: &SyslogTarget,
    tls: &Arc<rustls::ClientConfig>,
    name: &rustls::pki_types::ServerName<'static>,
) -> std::io::Result<Stream> {
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(&target.address).await?;
        tcp.set_nodelay(true)?;
        tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name.clone(), tcp)
            .await
    };
    tokio::time::timeout(IO_TIMEOUT, attempt)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connecting timed out"))?
}

async fn run(
    target: SyslogTarget,
    tls: Arc<rustls::ClientConfig>,
    name: rustls::pki_types::ServerName<'static>,
    mut rx: mpsc::Receiver<String>,
) {
    let (host, pid) = (hostname(), std::process::id());
    let connected = metrics::gauge!("relay_ingest_audit_forward_connected");
    // A frame that could not be written goes first on the next connection.
    let mut pending: Option<Vec<u8>> = None;
    let mut backoff = Duration::from_secs(1);
    loop {
        let stream = match connect(&target, &tls, &name).await {
            Ok(s) => s,
            Err(e) => {
                connected.set(0.0);
                tracing::warn!(address = %target.address, error = %e, retry_in = ?backoff, "cannot reach the syslog receiver");
                // Lines keep arriving; the queue holds what it can meanwhile.
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                if rx.is_closed() && rx.is_empty() {
                    return;
                }
                continue;
            }
        };
        tracing::info!(address = %target.address, "forwarding the audit log to syslog");
        connected.set(1.0);
        backoff = Duration::from_secs(1);
        // The receiver never sends: anything readable is its close, seen before the next
        // record would be written into a dead connection and lost.
        let (mut reader, mut writer) = tokio::io::split(stream);
        let mut scratch = [0u8; 64];
        loop {
            let framed = match pending.take() {
                Some(f) => f,
                None => {
                    let next = tokio::select! {
                        line = rx.recv() => line,
                        read = reader.read(&mut scratch) => {
                            match read {
                                Ok(0) | Err(_) => tracing::warn!("the syslog receiver closed the connection; reconnecting"),
                                Ok(_) => tracing::warn!("the syslog receiver sent data; reconnecting"),
                            }
                            break;
                        }
                    };
                    match next {
                        Some(line) => match message(&line, &host, pid) {
                            Some(m) => frame(&m),
                            None => continue,
                        },
                        None => {
                            let _ = writer.shutdown().await;
                            return;
                        }
                    }
                }
            };
            let written = tokio::time::timeout(IO_TIMEOUT, async {
                writer.write_all(&framed).await?;
                writer.flush().await
            })
            .await;
            match written {
                Ok(Ok(())) => {
                    metrics::counter!("relay_ingest_audit_forwarded_total").increment(1);
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "syslog connection failed; reconnecting");
                    pending = Some(framed);
                    break;
                }
                Err(_) => {
                    tracing::warn!("syslog receiver stopped reading; reconnecting");
                    pending = Some(framed);
                    break;
                }
            }
        }
        connected.set(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AuditEvent, Chain, Outcome};

    fn line(action: &str, outcome: Outcome) -> String {
        let mut chain = Chain::genesis();
        let mut event = AuditEvent::new(action, outcome);
        event.vehicles = vec!["amb-1".into()];
        event.detail = serde_json::json!({ "note": "a \"quoted\" ] word" });
        chain.seal(event, 1_800_000_000_123_000_000)
    }

    #[test]
    fn a_record_becomes_an_rfc_5424_message_with_its_line_as_msg() {
        let l = line("subscribe", Outcome::Success);
        let m = message(&l, "ingest-1", 4242).unwrap();
        let expected = format!(
            "<110>1 2027-01-15T08:00:00.123Z ingest-1 hospital-ingest 4242 subscribe \
             [audit@32473 seq=\"1\" outcome=\"success\"] \u{feff}{l}"
        );
        assert_eq!(m, expected);
        let denied = message(&line("subscribe", Outcome::Denied), "h", 1).unwrap();
        assert!(denied.starts_with("<108>1 "), "{denied}");
        assert!(message("not json", "h", 1).is_none());
    }

    #[test]
    fn header_fields_hold_no_spaces_and_frames_count_octets() {
        assert_eq!(header_field("a b\tc", 32), "abc");
        assert_eq!(header_field("", 32), "-");
        assert_eq!(header_field(&"x".repeat(40), 32).len(), 32);
        // Octets, not characters: the BOM alone is three.
        let f = frame("\u{feff}é");
        assert_eq!(f, "5 \u{feff}é".as_bytes());
    }
}
