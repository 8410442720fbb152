//! QUIC side of the ingest: accepts vehicle bearers and authenticates them by certificate
//! ([`serve`]), checks their Hello ([`handshake`]) and frames ([`validate`]), runs each
//! session (one unidirectional stream per frame into the store writer, acknowledgements back on
//! the control stream once durable, coalesced by [`acks`]) and keeps the [`registry`] of
//! vehicles online.

pub mod acks;
pub mod admission;
pub mod clock;
pub mod handshake;
pub mod registry;
mod session;
pub mod socket;
pub mod validate;

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use relay_proto::CloseCode;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Quic;
use crate::writer::WriterCmd;

use admission::{Admission, AdmissionLimits, Decision};
pub use registry::Online;
pub use validate::{MAX_SEQ, validate_frame, validate_hello};

/// What every connection task shares.
#[derive(Debug, Clone)]
pub struct QuicContext {
    /// Read budget of all connections together (bytes, see `quic.max_reading_bytes`).
    pub reading: Arc<Semaphore>,
    /// The QUIC section of the configuration.
    pub cfg: Quic,
    /// The store writer.
    pub writer: mpsc::Sender<WriterCmd>,
    /// Vehicles online now.
    pub online: Arc<Online>,
    /// Where refusals that matter for security are recorded.
    pub audit: crate::audit::AuditLog,
    /// Irregular behaviour of vehicles, detected and reported.
    pub watch: crate::detect::Watch,
    /// Where frames go as they arrive, for subscribers that want them before they are
    /// durable.
    pub early: crate::grpc::early::EarlySource,
}

/// Why a connection was closed by us.
#[derive(Debug, thiserror::Error)]
#[error("{code:?}: {detail}")]
pub struct Refusal {
    /// The QUIC application close code sent to the peer.
    pub code: CloseCode,
    /// What was wrong, for the log and (shortened) the close reason.
    pub detail: String,
}

fn refuse(code: CloseCode, detail: impl Into<String>) -> Refusal {
    Refusal {
        code,
        detail: detail.into(),
    }
}

fn protocol_error(ctx: &QuicContext, conn: &quinn::Connection, vehicle: &str, r: &Refusal) {
    metrics::counter!("relay_ingest_protocol_errors_total", "reason" => r.code.label())
        .increment(1);
    // Refusals that say something about a certificate's holder go to the audit log too.
    if matches!(
        r.code,
        CloseCode::IdentityMismatch
            | CloseCode::BadIdentity
            | CloseCode::SessionMismatch
            | CloseCode::QuotaExceeded
    ) {
        let mut event =
            crate::audit::AuditEvent::new("vehicle_refused", crate::audit::Outcome::Denied);
        event.client = vehicle_client(conn);
        event.remote = Some(conn.remote_address().to_string());
        event.vehicles = (vehicle != "?")
            .then(|| vehicle.to_owned())
            .into_iter()
            .collect();
        event.detail = serde_json::json!({ "reason": r.code.label(), "detail": r.detail });
        ctx.audit.record(event);
    }
    tracing::warn!(vehicle, remote = %conn.remote_address(), code = r.code.label(), detail = %r.detail, "closing connection");
    let reason: String = r.detail.chars().take(200).collect();
    conn.close(quinn::VarInt::from_u32(r.code.as_u32()), reason.as_bytes());
}

/// Every reason of `relay_ingest_handshake_failures_total`.
pub const HANDSHAKE_FAILURE_REASONS: &[&str] = &[
    "revoked",
    "unknown_ca",
    "expired",
    "not_yet_valid",
    "no_certificate",
    "bad_certificate",
    "alpn",
    "timeout",
    "abandoned",
    "protocol",
];

/// Why a QUIC handshake failed, as a bounded label. A peer that closes or resets its own
/// attempt is `abandoned`: agents dial several bearers at once and drop the attempts that
/// lose, which is no attack.
pub fn handshake_failure_reason(e: &quinn::ConnectionError) -> &'static str {
    use quinn::ConnectionError as E;
    match e {
        E::TimedOut => "timeout",
        E::ApplicationClosed(_) | E::ConnectionClosed(_) | E::Reset | E::LocallyClosed => {
            "abandoned"
        }
        // rustls' verdict reaches us as the text of quinn's transport error, and as the TLS
        // alert in its code.
        E::TransportError(t) => match tls_failure_reason(&t.reason) {
            "protocol" => tls_alert_reason(u64::from(t.code)),
            reason => reason,
        },
        _ => "protocol",
    }
}

/// The cause in the text of a TLS failure.
fn tls_failure_reason(text: &str) -> &'static str {
    let text = text.to_ascii_lowercase();
    let has = |needles: &[&str]| needles.iter().any(|n| text.contains(n));
    if has(&["revoked"]) {
        "revoked"
    } else if has(&[
        "unknownissuer",
        "unknown issuer",
        "unknown ca",
        "badsignature",
        "bad signature",
    ]) {
        "unknown_ca"
    } else if has(&["expired"]) {
        "expired"
    } else if has(&["notvalidyet", "not valid yet"]) {
        "not_yet_valid"
    } else if has(&["no certificates", "nocertificatespresented"]) {
        "no_certificate"
    } else if has(&["application protocol", "known protocol"]) {
        "alpn"
    } else if has(&["certificate"]) {
        "bad_certificate"
    } else {
        "protocol"
    }
}

/// The cause a TLS alert (carried in a QUIC CRYPTO_ERROR code, 0x100 + alert) names.
fn tls_alert_reason(code: u64) -> &'static str {
    match code.checked_sub(0x100) {
        Some(44) => "revoked",
        Some(45) => "expired",
        Some(48) => "unknown_ca",
        Some(116) => "no_certificate",
        Some(120) => "alpn",
        Some(42 | 43 | 46) => "bad_certificate",
        _ => "protocol",
    }
}

/// The certificate of a QUIC connection's peer, as the audit log names it.
fn vehicle_client(conn: &quinn::Connection) -> Option<crate::audit::AuditClient> {
    let identity = conn.peer_identity()?;
    let certs = identity
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    let id = crate::access::ClientIdentity::from_der(certs.first()?.as_ref())?;
    Some((&id).into())
}

/// A handshake in progress, counted by [`Admission`] until it is dropped.
pub(crate) struct PendingHandshake {
    admission: Arc<Mutex<Admission>>,
    source: IpAddr,
}

impl Drop for PendingHandshake {
    fn drop(&mut self) {
        let mut a = self.admission.lock().unwrap_or_else(|p| p.into_inner());
        a.finish(self.source);
        metrics::gauge!("relay_ingest_pending_handshakes").set(a.pending() as f64);
    }
}

/// Accepts connections until `stop` fires. Incoming connections pass [`Admission`] first
/// (Retry or refusal under pressure, before any handshake work); a connection counts against
/// `max_connections` only once its certificate and Hello checked out.
pub async fn serve(endpoint: quinn::Endpoint, ctx: QuicContext, stop: CancellationToken) {
    let sessions = Arc::new(Semaphore::new(ctx.cfg.max_connections));
    let admission = Arc::new(Mutex::new(Admission::new(AdmissionLimits {
        max_pending: ctx.cfg.max_pending_handshakes,
        max_pending_per_source: ctx.cfg.max_pending_handshakes_per_source,
        retry_above: ctx.cfg.retry_above,
        retry_above_per_source: ctx.cfg.retry_above_per_source,
    })));
    let mut conns = JoinSet::new();
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i { Some(i) => i, None => break },
            () = stop.cancelled() => break,
        };
        let source = incoming.remote_address().ip();
        let decision = admission
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .decide(source, incoming.remote_address_validated());
        match decision {
            Decision::Retry => {
                metrics::counter!("relay_ingest_handshake_retries_total").increment(1);
                if let Err(e) = incoming.retry() {
                    e.into_incoming().ignore();
                }
                continue;
            }
            Decision::Refuse { reason } => {
                metrics::counter!("relay_ingest_handshakes_refused_total", "reason" => reason)
                    .increment(1);
                incoming.refuse();
                continue;
            }
            Decision::Accept => {}
        }
        let pending = PendingHandshake {
            admission: admission.clone(),
            source,
        };
        let ctx = ctx.clone();
        let stop = stop.clone();
        let sessions = sessions.clone();
        conns.spawn(async move {
            handle_incoming(incoming, ctx, stop, pending, sessions).await;
        });
        while conns.try_join_next().is_some() {}
    }
    endpoint.close(
        quinn::VarInt::from_u32(CloseCode::ServerShutdown.as_u32()),
        b"ingest shutting down",
    );
    conns.shutdown().await;
}

async fn handle_incoming(
    incoming: quinn::Incoming,
    ctx: QuicContext,
    stop: CancellationToken,
    pending: PendingHandshake,
    sessions: Arc<Semaphore>,
) {
    let remote = incoming.remote_address();
    let conn = match tokio::time::timeout(ctx.cfg.handshake_timeout, incoming).await {
        Err(_) => {
            // Dropped by admission control, and a failed handshake by its cause.
            metrics::counter!("relay_ingest_handshakes_refused_total", "reason" => "handshake_timeout")
                .increment(1);
            metrics::counter!("relay_ingest_handshake_failures_total", "reason" => "timeout")
                .increment(1);
            return;
        }
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            // Includes certificates from a foreign CA: a security event, not just noise.
            let reason = handshake_failure_reason(&e);
            metrics::counter!("relay_ingest_handshake_failures_total", "reason" => reason)
                .increment(1);
            if reason == "revoked" {
                metrics::counter!("relay_ingest_security_events_total", "reason" => "revoked")
                    .increment(1);
                let mut event = crate::audit::AuditEvent::new(
                    "vehicle_handshake",
                    crate::audit::Outcome::Denied,
                );
                event.remote = Some(remote.to_string());
                event.detail = serde_json::json!({ "reason": "revoked", "error": e.to_string() });
                ctx.audit.record(event);
            }
            tracing::warn!(%remote, error = %e, "QUIC/TLS handshake failed");
            return;
        }
    };
    let vehicle = match crate::tls::connection_vehicle_id(&conn) {
        Ok(v) => v,
        Err(e) => {
            metrics::counter!("relay_ingest_security_events_total", "reason" => e.label())
                .increment(1);
            protocol_error(
                &ctx,
                &conn,
                "?",
                &refuse(CloseCode::BadIdentity, e.to_string()),
            );
            return;
        }
    };
    metrics::counter!("relay_ingest_connections_total").increment(1);
    let admitted = session::Admitted { pending, sessions };
    let result =
        session::serve_vehicle(&conn, Arc::from(vehicle.as_str()), &ctx, &stop, admitted).await;
    match result {
        Ok(()) => tracing::info!(vehicle, %remote, "vehicle disconnected"),
        Err(r) => protocol_error(&ctx, &conn, &vehicle, &r),
    }
}

#[cfg(test)]
mod handshake_failure_tests {
    use super::*;

    #[test]
    fn handshake_failures_are_told_apart_by_cause() {
        for (text, reason) in [
            ("invalid peer certificate: Revoked", "revoked"),
            ("invalid peer certificate: UnknownIssuer", "unknown_ca"),
            // A CA of the same name that did not sign it.
            ("invalid peer certificate: BadSignature", "unknown_ca"),
            (
                "invalid peer certificate: certificate expired: verification time 5",
                "expired",
            ),
            ("invalid peer certificate: NotValidYet", "not_yet_valid"),
            ("peer sent no certificates", "no_certificate"),
            // rustls' own words for NoApplicationProtocol.
            ("peer doesn't support any known protocol", "alpn"),
            ("invalid peer certificate: BadEncoding", "bad_certificate"),
            ("unexpected message", "protocol"),
        ] {
            assert_eq!(tls_failure_reason(text), reason, "{text}");
        }
        assert_eq!(
            handshake_failure_reason(&quinn::ConnectionError::TimedOut),
            "timeout"
        );
        assert_eq!(
            handshake_failure_reason(&quinn::ConnectionError::Reset),
            "abandoned",
            "an agent's losing parallel dial is no attack"
        );
        assert!(HANDSHAKE_FAILURE_REASONS.contains(&"abandoned"));
        // Text that names nothing: the alert in the code decides.
        for (alert, reason) in [
            (120, "alpn"),
            (116, "no_certificate"),
            (48, "unknown_ca"),
            (80, "protocol"),
        ] {
            assert_eq!(tls_alert_reason(0x100 + alert), reason, "{alert}");
        }
        assert_eq!(tls_alert_reason(0x0a), "protocol");
    }
}
