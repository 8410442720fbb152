//! The intake: every produced frame gets its sequence number's durable reservation and is put
//! into the spool before the scheduler may hand it to a bearer.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use prost::Message;
use relay_proto::model::{Frame, frame::Payload};
use relay_proto::waveform::{Encoder, pack};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Shared, count_eviction};
use crate::metrics::kind_label;
use crate::scheduler::FrameId;

/// Spools produced frames and hands them to the scheduler whatever the bearers' state, so
/// sources never stall.
pub(super) async fn intake(
    mut rx: mpsc::Receiver<Frame>,
    shared: Arc<Shared>,
    kinds: HashMap<u32, i32>,
    seq_base: HashMap<u32, u64>,
    mut encoders: HashMap<u32, Encoder>,
    max_frame_bytes: usize,
) {
    let mut spool = shared.spool.clone();
    while let Some(mut frame) = rx.recv().await {
        frame.seq += seq_base.get(&frame.stream_id).copied().unwrap_or(0);
        let kind = kinds.get(&frame.stream_id).copied().unwrap_or_default();
        let id = FrameId {
            stream_id: frame.stream_id,
            seq: frame.seq,
        };
        if let (Some(encoder), Some(Payload::Waveform(chunk))) =
            (encoders.get_mut(&frame.stream_id), frame.payload.as_mut())
            && let Err(e) = pack(chunk, encoder)
        {
            // Only a source breaking its own layout gets here; plain samples still go.
            tracing::warn!(stream_id = id.stream_id, error = %e, "waveform frame not packed");
        }
        let bytes = Bytes::from(frame.encode_to_vec());
        if bytes.len() > max_frame_bytes {
            tracing::error!(
                stream_id = id.stream_id,
                seq = id.seq,
                len = bytes.len(),
                "frame exceeds max_frame_bytes; dropped"
            );
            metrics::counter!("relay_agent_frames_evicted_total", "kind" => kind_label(kind))
                .increment(1);
            continue;
        }
        // A number may leave the vehicle only once a restart can no longer reuse it, and a
        // frame only once it is on its way into the spool.
        if let Err(e) = spool.reserved_beyond(id.stream_id, id.seq).await {
            return shared.spool_lost(e);
        }
        if let Err(e) = spool.put(id, kind, bytes.clone()).await {
            return shared.spool_lost(e);
        }
        let evicted = shared.sched().insert(id, kind, bytes, Instant::now());
        for (id, kind) in &evicted {
            count_eviction(*id, *kind);
        }
        if let Err(e) = spool.delete(evicted.into_iter().map(|(id, _)| id)).await {
            return shared.spool_lost(e);
        }
        shared.wake.notify_one();
    }
    // The sources have stopped: a draining agent may now finish once everything is acked.
    shared.intake_done.store(true, Ordering::Release);
    shared.drained.notify_one();
}
