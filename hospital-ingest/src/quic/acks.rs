//! Sans-IO acknowledgement coalescing: the store writer reports each durable (stream, seq);
//! acknowledgements gather for a short window (or until a bound) and leave as one `Ack` of
//! ranges, so the control stream carries a few messages per round trip rather than one per
//! frame.

use std::collections::BTreeMap;
use std::time::Duration;

use relay_proto::seq::ranges_from_seqs;
use relay_proto::wire::v1::{Ack, StreamAck};
use tokio::time::Instant;

/// Sequence numbers one `Ack` covers at most. Worst case (no two contiguous) each becomes a
/// range of two varints, under 32 bytes encoded, so an `Ack` stays far below
/// [`relay_proto::MAX_CONTROL_MESSAGE_BYTES`] (tested).
pub const MAX_ACK_SEQS: usize = 4096;

/// Gathers durable frames into acknowledgements.
#[derive(Debug)]
pub struct AckCoalescer {
    window: Duration,
    max_seqs: usize,
    pending: BTreeMap<u32, Vec<u64>>,
    count: usize,
    due: Option<Instant>,
}

impl AckCoalescer {
    /// Acknowledgements wait at most `window` after the first one of a batch, and a batch
    /// holds at most `max_seqs` (clamped to 1..=[`MAX_ACK_SEQS`]).
    pub fn new(window: Duration, max_seqs: usize) -> Self {
        Self {
            window,
            max_seqs: max_seqs.clamp(1, MAX_ACK_SEQS),
            pending: BTreeMap::new(),
            count: 0,
            due: None,
        }
    }

    /// `seq` of `stream_id` is durable and may be acknowledged.
    pub fn handle_durable(&mut self, now: Instant, stream_id: u32, seq: u64) {
        if self.count == 0 {
            self.due = Some(now + self.window);
        }
        self.pending.entry(stream_id).or_default().push(seq);
        self.count += 1;
    }

    /// The acknowledgement to send now: when the window has passed or the batch is full.
    pub fn poll_ack(&mut self, now: Instant) -> Option<Ack> {
        let full = self.count >= self.max_seqs;
        let due = self.due.is_some_and(|d| now >= d);
        if self.count > 0 && (full || due) {
            self.flush()
        } else {
            None
        }
    }

    /// Everything pending, at once (the session is ending).
    pub fn flush(&mut self) -> Option<Ack> {
        if self.count == 0 {
            return None;
        }
        self.count = 0;
        self.due = None;
        let streams = std::mem::take(&mut self.pending)
            .into_iter()
            .map(|(stream_id, mut seqs)| StreamAck {
                stream_id,
                ranges: ranges_from_seqs(&mut seqs),
            })
            .collect();
        Some(Ack { streams })
    }

    /// When the pending batch is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.due
    }

    /// Sequence numbers waiting.
    pub fn pending(&self) -> usize {
        self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use relay_proto::wire::v1::{ControlMessage, SeqRange, control_message::Body};

    #[test]
    fn gathers_for_the_window_then_sends_ranges() {
        let t0 = Instant::now();
        let mut a = AckCoalescer::new(Duration::from_millis(5), MAX_ACK_SEQS);
        assert_eq!(a.poll_timeout(), None);
        for seq in [3, 1, 2, 7] {
            a.handle_durable(t0, 0, seq);
        }
        a.handle_durable(t0 + Duration::from_millis(3), 4, 9);
        assert_eq!(a.poll_timeout(), Some(t0 + Duration::from_millis(5)));
        assert!(a.poll_ack(t0 + Duration::from_millis(4)).is_none());
        let ack = a.poll_ack(t0 + Duration::from_millis(5)).unwrap();
        let range = |start, end| SeqRange { start, end };
        assert_eq!(
            ack.streams,
            vec![
                StreamAck {
                    stream_id: 0,
                    ranges: vec![range(1, 4), range(7, 8)]
                },
                StreamAck {
                    stream_id: 4,
                    ranges: vec![range(9, 10)]
                },
            ]
        );
        assert_eq!((a.pending(), a.poll_timeout()), (0, None));
    }

    #[test]
    fn a_full_batch_leaves_at_once_and_fits_a_control_message() {
        let t0 = Instant::now();
        let mut a = AckCoalescer::new(Duration::from_secs(1), usize::MAX);
        // Every other number: no two contiguous, the largest encoding.
        for i in 0..MAX_ACK_SEQS as u64 - 1 {
            a.handle_durable(t0, u32::MAX, (1 << 40) - 2 * i);
        }
        assert!(a.poll_ack(t0).is_none());
        a.handle_durable(t0, u32::MAX, 1);
        let ack = a.poll_ack(t0).unwrap();
        let encoded = ControlMessage {
            body: Some(Body::Ack(ack)),
        }
        .encoded_len();
        assert!(
            encoded < relay_proto::MAX_CONTROL_MESSAGE_BYTES / 8,
            "{encoded}"
        );
        assert!(a.flush().is_none());
    }
}
