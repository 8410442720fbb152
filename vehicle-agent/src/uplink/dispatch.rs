//! The dispatcher: polls the scheduler and carries out its actions, writing each frame copy on
//! its own unidirectional QUIC stream at the priority of its class and lane, and resetting
//! copies another bearer already delivered. It also publishes the bearer and queue gauges.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use relay_proto::Class;
use relay_proto::model::{Frame, WaveformInfo, frame::Payload};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Shared, lock};
use crate::metrics::{kind_label, quinn_priority};
use crate::scheduler::{Action, FrameId, Transmit};

/// How often bearer and queue gauges are published.
const METRICS_INTERVAL: Duration = Duration::from_millis(500);

/// A copy being written: cancelling the token resets its QUIC stream.
#[derive(Debug)]
pub(super) struct CopyHandle {
    serial: u64,
    token: CancellationToken,
}

/// Polls the scheduler and carries out its actions.
pub(super) async fn dispatch(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut next_metrics = Instant::now();
    loop {
        let now = Instant::now();
        let (actions, timeout) = {
            let mut s = shared.sched();
            let actions = s.poll(now);
            (actions, s.poll_timeout(now))
        };
        let more = actions.len() >= 128;
        for a in actions {
            match a {
                Action::Transmit(send) => start_copy(&shared, send),
                Action::Cancel { bearer, id, .. } => cancel_copy(&shared, bearer, id),
            }
        }
        if now >= next_metrics {
            publish_metrics(&shared, now);
            next_metrics = now + METRICS_INTERVAL;
        }
        if more {
            tokio::task::yield_now().await;
            continue;
        }
        let until = timeout.map_or(next_metrics, |t| t.min(next_metrics));
        tokio::select! {
            () = shared.wake.notified() => {}
            () = tokio::time::sleep_until(until) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

fn publish_metrics(shared: &Shared, now: Instant) {
    let s = shared.sched();
    for (i, name) in shared.names.iter().enumerate() {
        let label = [("bearer", name.clone())];
        let state = s.state(i, now);
        metrics::gauge!("relay_agent_bearer_state", &label).set(state.gauge());
        if let Some(h) = s.health(i) {
            metrics::gauge!("relay_agent_bearer_rtt_seconds", &label)
                .set(h.srtt().unwrap_or_default().as_secs_f64());
            metrics::gauge!("relay_agent_bearer_rtt_variance_seconds", &label)
                .set(h.rttvar().as_secs_f64());
            metrics::gauge!("relay_agent_bearer_loss_ratio", &label).set(h.loss());
            metrics::gauge!("relay_agent_bearer_delivery_rate_bytes_per_second", &label)
                .set(h.delivery_rate());
        }
        metrics::gauge!("relay_agent_bearer_in_flight_bytes", &label)
            .set(s.in_flight_bytes(i) as f64);
        let c = s.counters(i);
        metrics::counter!("relay_agent_bearer_frames_sent_total", &label).absolute(c.frames_sent);
        metrics::counter!("relay_agent_bearer_sent_bytes_total", &label).absolute(c.bytes_sent);
        metrics::counter!("relay_agent_bearer_frames_acked_total", &label).absolute(c.frames_acked);
        metrics::counter!("relay_agent_bearer_frames_resent_total", &label)
            .absolute(c.frames_recovered);
        metrics::counter!("relay_agent_bearer_failovers_total", &label).absolute(c.failovers);
    }
    for (class, queued) in Class::ALL.iter().zip(s.queued_per_class()) {
        metrics::gauge!("relay_agent_queued_frames", "class" => class.label()).set(queued as f64);
    }
    metrics::gauge!("relay_agent_unacked_frames").set(s.len() as f64);
    metrics::gauge!("relay_agent_unacked_bytes").set(s.bytes() as f64);
    drop(s);
    metrics::gauge!("relay_agent_connected").set(shared.connected_bearers() as f64);
}

fn start_copy(shared: &Arc<Shared>, send: Transmit) {
    let (conn, plain_waveforms) = match &*lock(&shared.conns[send.bearer]) {
        Some(live) if live.generation == send.generation => {
            (live.conn.clone(), live.plain_waveforms)
        }
        _ => {
            shared
                .sched()
                .on_send_failed(send.bearer, send.generation, send.id);
            shared.wake.notify_one();
            return;
        }
    };
    let serial = shared.next_copy.fetch_add(1, Ordering::Relaxed);
    let token = CancellationToken::new();
    lock(&shared.copies).insert(
        (send.bearer, send.id),
        CopyHandle {
            serial,
            token: token.clone(),
        },
    );
    metrics::counter!("relay_agent_frames_sent_total", "kind" => kind_label(send.kind))
        .increment(1);
    if send.resend {
        metrics::counter!("relay_agent_frames_resent_total").increment(1);
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        let mut send = send;
        if plain_waveforms && let Some(info) = shared.packed_streams.get(&send.id.stream_id) {
            send.bytes = plain_copy(&send.bytes, info);
        }
        let result = write_copy(&conn, &send, &token).await;
        if let Err(e) = result
            && !token.is_cancelled()
        {
            metrics::counter!("relay_agent_frame_send_errors_total").increment(1);
            tracing::debug!(error = %e, "frame write failed");
            shared
                .sched()
                .on_send_failed(send.bearer, send.generation, send.id);
            shared.wake.notify_one();
        }
        let mut copies = lock(&shared.copies);
        if copies
            .get(&(send.bearer, send.id))
            .is_some_and(|c| c.serial == serial)
        {
            copies.remove(&(send.bearer, send.id));
        }
    });
}

pub(super) fn cancel_copy(shared: &Shared, bearer: usize, id: FrameId) {
    if let Some(c) = lock(&shared.copies).remove(&(bearer, id)) {
        c.token.cancel();
    }
}

/// The frame with its waveform chunk unpacked, for an ingest that does not decode the
/// stream's encoding (our own frames: they only fail to unpack if the spool was damaged, and
/// then go as they are, for the ingest to refuse).
fn plain_copy(bytes: &Bytes, info: &WaveformInfo) -> Bytes {
    let Ok(mut frame) = Frame::decode(bytes.as_ref()) else {
        return bytes.clone();
    };
    if let Some(Payload::Waveform(chunk)) = frame.payload.as_mut()
        && relay_proto::waveform::unpack(chunk, info, usize::MAX).is_ok()
    {
        return Bytes::from(frame.encode_to_vec());
    }
    bytes.clone()
}

/// Writes one copy on its own unidirectional stream, then holds the stream until the peer
/// has it all, so an acknowledgement via another bearer can still reset it.
async fn write_copy(
    conn: &quinn::Connection,
    send: &Transmit,
    cancel: &CancellationToken,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let reset = |s: &mut quinn::SendStream| {
        let _ = s.reset(quinn::VarInt::from_u32(0));
    };
    let mut s = tokio::select! {
        s = conn.open_uni() => s?,
        () = cancel.cancelled() => return Ok(()),
    };
    s.set_priority(quinn_priority(send.kind, send.lane))?;
    tokio::select! {
        r = s.write_all(&send.bytes) => r?,
        () = cancel.cancelled() => { reset(&mut s); return Ok(()) }
    }
    s.finish()?;
    tokio::select! {
        stopped = s.stopped() => {
            // The ingest stopped reading this frame (its read deadline passed): the copy did
            // not arrive, so the frame must be sent again rather than wait for an ack.
            if let Ok(Some(code)) = stopped {
                return Err(format!("the ingest stopped the stream (code {code})").into());
            }
        }
        () = cancel.cancelled() => reset(&mut s),
    }
    Ok(())
}
