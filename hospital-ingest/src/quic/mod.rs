//! QUIC side of the ingest: accepts vehicle bearers and authenticates them by certificate
//! ([`serve`]), checks their Hello ([`handshake`]) and frames ([`validate`]), runs each
//! session (one unidirectional stream per frame into the store writer, acknowledgements back on
//! the control stream once durable, coalesced by [`acks`]) and keeps the [`registry`] of
//! vehicles online.

pub mod acks;
pub mod handshake;
pub mod registry;
mod session;
pub mod validate;

use std::sync::Arc;

use relay_proto::CloseCode;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Quic;
use crate::writer::WriterCmd;

pub use registry::Online;
pub use validate::{MAX_SEQ, validate_frame, validate_hello};

/// What every connection task shares.
#[derive(Debug, Clone)]
pub struct QuicContext {
    /// The QUIC section of the configuration.
    pub cfg: Quic,
    /// The store writer.
    pub writer: mpsc::Sender<WriterCmd>,
    /// Vehicles online now.
    pub online: Arc<Online>,
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

fn protocol_error(conn: &quinn::Connection, vehicle: &str, r: &Refusal) {
    metrics::counter!("relay_ingest_protocol_errors_total", "reason" => r.code.label())
        .increment(1);
    tracing::warn!(vehicle, remote = %conn.remote_address(), code = r.code.label(), detail = %r.detail, "closing connection");
    let reason: String = r.detail.chars().take(200).collect();
    conn.close(quinn::VarInt::from_u32(r.code.as_u32()), reason.as_bytes());
}

/// Accepts connections until `stop` fires, at most `max_connections` at once.
pub async fn serve(endpoint: quinn::Endpoint, ctx: QuicContext, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(ctx.cfg.max_connections));
    let mut conns = JoinSet::new();
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            () = stop.cancelled() => break,
        };
        let incoming = tokio::select! {
            i = endpoint.accept() => match i { Some(i) => i, None => break },
            () = stop.cancelled() => break,
        };
        let ctx = ctx.clone();
        let stop = stop.clone();
        conns.spawn(async move {
            let _permit = permit;
            handle_incoming(incoming, ctx, stop).await;
        });
        while conns.try_join_next().is_some() {}
    }
    endpoint.close(
        quinn::VarInt::from_u32(CloseCode::ServerShutdown.as_u32()),
        b"ingest shutting down",
    );
    conns.shutdown().await;
}

async fn handle_incoming(incoming: quinn::Incoming, ctx: QuicContext, stop: CancellationToken) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            // Includes certificates from a foreign CA: a security event, not just noise.
            metrics::counter!("relay_ingest_handshake_failures_total").increment(1);
            tracing::warn!(%remote, error = %e, "QUIC/TLS handshake failed");
            return;
        }
    };
    let vehicle = match crate::tls::connection_vehicle_id(&conn) {
        Ok(v) => v,
        Err(e) => {
            metrics::counter!("relay_ingest_security_events_total", "reason" => e.label())
                .increment(1);
            protocol_error(&conn, "?", &refuse(CloseCode::BadIdentity, e.to_string()));
            return;
        }
    };
    metrics::counter!("relay_ingest_connections_total").increment(1);
    let result = session::serve_vehicle(&conn, Arc::from(vehicle.as_str()), &ctx, &stop).await;
    match result {
        Ok(()) => tracing::info!(vehicle, %remote, "vehicle disconnected"),
        Err(r) => protocol_error(&conn, &vehicle, &r),
    }
}
