//! One bearer: a QUIC connection to the ingest, reconnected with backoff. Frames wait in the
//! [`Outbox`] until acknowledged; every new connection re-sends what is still unacknowledged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use prost::Message;
use rand::Rng;
use relay_proto::model::Frame;
use relay_proto::wire::v1::{ControlMessage, Hello, control_message::Body};
use relay_proto::{CloseCode, MAX_CONTROL_MESSAGE_BYTES, PROTOCOL_VERSION};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

use crate::config::AgentConfig;
use crate::metrics::{class_rank, kind_label, quinn_priority};
use crate::outbox::{FrameKey, Outbox};

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("handshake timed out")]
    HandshakeTimeout,
    #[error("control stream: {0}")]
    Control(String),
    #[error("ingest refused us: {0}")]
    Refused(String),
}

impl UplinkError {
    fn label(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::Connection(_) => "connection",
            Self::HandshakeTimeout => "timeout",
            Self::Control(_) => "control",
            Self::Refused(_) => "refused",
        }
    }
}

/// Shared between the connection loop, the frame intake and the writers.
#[derive(Debug)]
struct Shared {
    outbox: Mutex<Outbox>,
    pending: Notify,
    drained: Notify,
    /// When a stopping agent gives up on unacknowledged frames; set once, when stop fires.
    drain_until: std::sync::OnceLock<Instant>,
    /// Every source has ended and its last frames are in the outbox.
    intake_done: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn outbox(&self) -> MutexGuard<'_, Outbox> {
        // A poisoned lock means a panic elsewhere already; the data is still consistent
        // enough to keep delivering.
        self.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Nothing left to deliver: the sources are done and everything was acknowledged.
    fn fully_drained(&self) -> bool {
        self.intake_done.load(std::sync::atomic::Ordering::Acquire) && self.outbox().is_empty()
    }

    fn publish_gauges(o: &Outbox) {
        metrics::gauge!("relay_agent_unacked_frames").set(o.len() as f64);
        metrics::gauge!("relay_agent_unacked_bytes").set(o.bytes() as f64);
    }
}

fn control_codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_CONTROL_MESSAGE_BYTES)
        .new_codec()
}

/// Runs until `stop` fires; then waits up to `drain` for unacknowledged frames to be delivered.
/// Returns how many frames were still unacknowledged.
pub async fn run(
    cfg: AgentConfig,
    client: quinn::ClientConfig,
    hello: Hello,
    frames: mpsc::Receiver<Frame>,
    stop: CancellationToken,
    drain: Duration,
) -> Result<usize, std::io::Error> {
    let endpoint = quinn::Endpoint::client(cfg.ingest.bind)?;
    let shared = Arc::new(Shared {
        outbox: Mutex::new(Outbox::new(cfg.buffer.max_unacked_bytes)),
        pending: Notify::new(),
        drained: Notify::new(),
        drain_until: std::sync::OnceLock::new(),
        intake_done: std::sync::atomic::AtomicBool::new(false),
    });
    let kinds: HashMap<u32, i32> = hello
        .streams
        .iter()
        .map(|s| (s.stream_id, s.kind))
        .collect();
    let intake = tokio::spawn(intake(
        frames,
        shared.clone(),
        kinds,
        cfg.framing.max_frame_bytes,
    ));

    let initial = Duration::from_millis(cfg.reconnect.initial_backoff_ms);
    let max = Duration::from_millis(cfg.reconnect.max_backoff_ms);
    let mut backoff = initial;
    // Once stopping, unacknowledged frames still get `drain` to reach the ingest, dialling
    // again if the connection is down.
    loop {
        let drain_until = stop
            .is_cancelled()
            .then(|| *shared.drain_until.get_or_init(|| Instant::now() + drain));
        if let Some(until) = drain_until
            && (shared.fully_drained() || Instant::now() >= until)
        {
            break;
        }
        let mut established = false;
        let bearer = Bearer {
            endpoint: &endpoint,
            cfg: &cfg,
            client: &client,
            hello: &hello,
            shared: &shared,
            drain,
        };
        let attempt = serve_connection(&bearer, &stop, &mut established);
        let served = match drain_until {
            // The drain deadline also bounds a handshake begun while stopping; reaching it ends
            // the drain, it is not a connection failure.
            Some(until) => match tokio::time::timeout_at(until, attempt).await {
                Ok(r) => r,
                Err(_) => break,
            },
            None => attempt.await,
        };
        if established {
            // We had a working session: back off from the beginning again.
            backoff = initial;
        }
        match served {
            Ok(()) => break,
            Err(e) => {
                metrics::counter!("relay_agent_connect_failures_total", "reason" => e.label())
                    .increment(1);
                tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "bearer down; will reconnect");
            }
        }
        let jitter = rand::rng().random_range(0.8..1.2);
        let retry_at = Instant::now() + backoff.mul_f64(jitter);
        match drain_until {
            Some(until) => tokio::time::sleep_until(retry_at.min(until)).await,
            None => tokio::select! {
                () = tokio::time::sleep_until(retry_at) => {}
                // Start draining (or leave) at once.
                () = stop.cancelled() => {}
            },
        }
        backoff = (backoff * 2).min(max);
    }
    intake.abort();
    let left = shared.outbox().len();
    if left > 0 {
        tracing::warn!(unacked_frames = left, "stopping with unacknowledged frames");
    }
    endpoint.close(
        quinn::VarInt::from_u32(CloseCode::Normal.as_u32()),
        b"agent stopping",
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    Ok(left)
}

/// Moves produced frames into the outbox whatever the connection state, so sources never stall.
async fn intake(
    mut rx: mpsc::Receiver<Frame>,
    shared: Arc<Shared>,
    kinds: HashMap<u32, i32>,
    max_frame_bytes: usize,
) {
    while let Some(frame) = rx.recv().await {
        let kind = kinds.get(&frame.stream_id).copied().unwrap_or_default();
        let key = FrameKey {
            rank: class_rank(kind),
            stream_id: frame.stream_id,
            seq: frame.seq,
        };
        let bytes = Bytes::from(frame.encode_to_vec());
        if bytes.len() > max_frame_bytes {
            tracing::error!(
                stream_id = frame.stream_id,
                seq = frame.seq,
                len = bytes.len(),
                "frame exceeds max_frame_bytes; dropped"
            );
            metrics::counter!("relay_agent_frames_evicted_total", "kind" => kind_label(kind))
                .increment(1);
            continue;
        }
        let evicted = {
            let mut o = shared.outbox();
            let ev = o.insert(key, kind, bytes);
            Shared::publish_gauges(&o);
            ev
        };
        for (k, kind) in evicted.frames {
            tracing::warn!(
                stream_id = k.stream_id,
                seq = k.seq,
                "buffer full: frame evicted unacknowledged"
            );
            metrics::counter!("relay_agent_frames_evicted_total", "kind" => kind_label(kind))
                .increment(1);
        }
        shared.pending.notify_one();
    }
    // The sources have stopped: a draining connection may now finish once the outbox is empty.
    shared
        .intake_done
        .store(true, std::sync::atomic::Ordering::Release);
    shared.drained.notify_one();
}

/// What one connection attempt needs.
struct Bearer<'a> {
    endpoint: &'a quinn::Endpoint,
    cfg: &'a AgentConfig,
    client: &'a quinn::ClientConfig,
    hello: &'a Hello,
    shared: &'a Arc<Shared>,
    drain: Duration,
}

/// Connects, says Hello, then writes frames and takes acknowledgements until the connection
/// ends (`Err`) or `stop` fires and the outbox drained or `drain` passed (`Ok`).
async fn serve_connection(
    b: &Bearer<'_>,
    stop: &CancellationToken,
    established: &mut bool,
) -> Result<(), UplinkError> {
    let Bearer {
        endpoint,
        cfg,
        client,
        hello,
        shared,
        drain,
    } = *b;
    let handshake = Duration::from_millis(cfg.reconnect.handshake_timeout_ms);
    let connecting =
        endpoint.connect_with(client.clone(), cfg.ingest.address, &cfg.ingest.server_name)?;
    let conn = tokio::time::timeout(handshake, connecting)
        .await
        .map_err(|_| UplinkError::HandshakeTimeout)??;
    let (send, recv) = conn.open_bi().await?;
    let mut writer = FramedWrite::new(send, control_codec());
    let mut reader = FramedRead::new(recv, control_codec());
    let msg = ControlMessage {
        body: Some(Body::Hello(hello.clone())),
    };
    writer
        .send(Bytes::from(msg.encode_to_vec()))
        .await
        .map_err(|e| UplinkError::Control(e.to_string()))?;
    let reply = tokio::select! {
        r = tokio::time::timeout(handshake, reader.next()) => r.map_err(|_| UplinkError::HandshakeTimeout)?,
        e = conn.closed() => return Err(refusal(e)),
    };
    match reply.map(|r| r.map(|b| ControlMessage::decode(b.freeze()))) {
        Some(Ok(Ok(ControlMessage {
            body: Some(Body::HelloAck(ack)),
        }))) if ack.protocol_version == PROTOCOL_VERSION => {}
        Some(Ok(Ok(other))) => {
            return Err(UplinkError::Control(format!(
                "expected HelloAck, got {other:?}"
            )));
        }
        Some(Ok(Err(e))) => return Err(UplinkError::Control(e.to_string())),
        Some(Err(e)) => return Err(UplinkError::Control(e.to_string())),
        None => return Err(refusal(conn.closed().await)),
    }
    tracing::info!(remote = %conn.remote_address(), "connected to ingest");
    metrics::counter!("relay_agent_connects_total").increment(1);
    *established = true;
    metrics::gauge!("relay_agent_connected").set(1.0);
    shared.outbox().requeue_all();
    shared.pending.notify_one();
    let writers = tokio::spawn(write_frames(
        conn.clone(),
        shared.clone(),
        cfg.ingest.max_in_flight_frames,
    ));

    let mut drain_deadline: Option<Instant> = None;
    let result = loop {
        let deadline = drain_deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            msg = reader.next() => match msg {
                Some(Ok(bytes)) => match ControlMessage::decode(bytes.freeze()) {
                    Ok(ControlMessage { body: Some(Body::Ack(ack)) }) => handle_ack(shared, &ack),
                    Ok(other) => tracing::debug!(?other, "ignoring control message"),
                    Err(e) => break Err(UplinkError::Control(format!("undecodable control message: {e}"))),
                },
                // Tell why the ingest closed, when it did, rather than "connection lost".
                Some(Err(e)) => break Err(conn.close_reason().map_or(UplinkError::Control(e.to_string()), refusal)),
                None => break Err(refusal(conn.closed().await)),
            },
            e = conn.closed() => break Err(refusal(e)),
            () = stop.cancelled(), if drain_deadline.is_none() => {
                drain_deadline = Some(*shared.drain_until.get_or_init(|| Instant::now() + drain));
            }
            () = shared.drained.notified(), if drain_deadline.is_some() => {}
            () = tokio::time::sleep_until(deadline), if drain_deadline.is_some() => break Ok(()),
        }
        if drain_deadline.is_some() && shared.fully_drained() {
            break Ok(());
        }
    };
    writers.abort();
    metrics::gauge!("relay_agent_connected").set(0.0);
    if result.is_ok() {
        conn.close(
            quinn::VarInt::from_u32(CloseCode::Normal.as_u32()),
            b"agent stopping",
        );
    }
    result
}

fn refusal(e: quinn::ConnectionError) -> UplinkError {
    match &e {
        quinn::ConnectionError::ApplicationClosed(close) => {
            let code = CloseCode::from_u64(close.error_code.into_inner());
            let reason = String::from_utf8_lossy(&close.reason).into_owned();
            UplinkError::Refused(format!(
                "{} ({reason})",
                code.map_or("unknown", CloseCode::label)
            ))
        }
        _ => UplinkError::Connection(e),
    }
}

fn handle_ack(shared: &Shared, ack: &relay_proto::wire::v1::Ack) {
    let now = Instant::now();
    let mut released = 0u64;
    let latencies: Vec<Duration> = {
        let mut o = shared.outbox();
        let mut all = Vec::new();
        for s in &ack.streams {
            for r in &s.ranges {
                all.extend(o.ack(s.stream_id, r.start, r.end, now));
            }
        }
        Shared::publish_gauges(&o);
        if o.is_empty() {
            shared.drained.notify_one();
        }
        all
    };
    for l in &latencies {
        metrics::histogram!("relay_agent_ack_latency_seconds").record(l.as_secs_f64());
        released += 1;
    }
    metrics::counter!("relay_agent_frames_acked_total").increment(released);
}

/// Writes pending frames, each on its own unidirectional stream with its class priority, at
/// most `max_in_flight` at a time.
async fn write_frames(conn: quinn::Connection, shared: Arc<Shared>, max_in_flight: usize) {
    let permits = Arc::new(Semaphore::new(max_in_flight));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let next = shared.outbox().next_pending(Instant::now());
        let Some(out) = next else {
            drop(permit);
            shared.pending.notified().await;
            continue;
        };
        let conn = conn.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let result = async {
                let mut s = conn.open_uni().await?;
                s.set_priority(quinn_priority(out.kind))?;
                s.write_all(&out.bytes).await?;
                s.finish()?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            }
            .await;
            match result {
                Ok(()) => {
                    metrics::counter!("relay_agent_frames_sent_total", "kind" => kind_label(out.kind)).increment(1);
                    if out.resend {
                        metrics::counter!("relay_agent_frames_resent_total").increment(1);
                    }
                }
                Err(e) => {
                    metrics::counter!("relay_agent_frame_send_errors_total").increment(1);
                    tracing::debug!(error = %e, "frame write failed");
                    // A dead connection re-sends everything on the next one; only a live one
                    // needs the frame offered again.
                    if conn.close_reason().is_none() {
                        shared.outbox().requeue(out.key);
                        shared.pending.notify_one();
                    }
                }
            }
        });
    }
}
