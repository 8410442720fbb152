//! Early delivery of live frames (`SubscribeRequest.early`): a frame goes to the subscriber
//! as soon as the node that received it has it, marked provisional, and its durable record
//! later confirms it instead of repeating it. This keeps live ECG flowing while the log cannot
//! commit (a JetStream leader election takes seconds), without giving up "every record once".
//!
//! [`EarlyLedger`] is the per-subscriber bookkeeping, sans-IO: which frames went out
//! provisionally and are not confirmed yet, and the newest durable frame of each stream the
//! subscriber has (an early copy of anything up to it is old news: a re-sent frame).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use relay_proto::model::subscribe_response::Record;
use relay_proto::model::{DataRecord, HeldFrames, SubscribeResponse};
use tokio::sync::broadcast;

use crate::store::{SeqRef, Store};

/// Unconfirmed provisional frames per subscriber; beyond, frames wait to be durable.
pub const MAX_UNCONFIRMED: usize = 16_384;
/// Ranges a resuming subscriber may declare it holds.
pub const MAX_HELD_RANGES: usize = 4096;
/// An unconfirmed frame this far behind its stream's newest durable frame is forgotten (it was
/// never taken by the log, or the log had it before the subscription; 4096 frames are
/// 164 s of a 40 ms stream).
pub const STALE_SEQS: u64 = 4096;

/// A stream as the subscriber sees it: (vehicle, session, stream id).
pub type StreamKeyOf = (String, u64, u32);

/// A live frame as a node received it, before it is durable.
#[derive(Debug)]
pub struct EarlyFrame {
    /// Its vehicle (as the certificate says).
    pub vehicle: Arc<str>,
    /// Its stream's kind.
    pub kind: i32,
    /// Its vehicle session.
    pub session: u64,
    /// Its stream.
    pub stream_id: u32,
    /// Its sequence number in the stream.
    pub seq: u64,
    /// The provisional message (a data record, `provisional` set, cursor 0).
    pub message: SubscribeResponse,
}

/// Where a node's bearers hand their frames for early delivery.
#[derive(Debug, Clone)]
pub struct EarlySource {
    bus: broadcast::Sender<Arc<EarlyFrame>>,
    store: Store,
}

impl EarlySource {
    /// Frames go out on `bus`; `store` tells which are stored already.
    pub fn new(bus: broadcast::Sender<Arc<EarlyFrame>>, store: Store) -> Self {
        Self { bus, store }
    }

    /// A new receiver of early frames.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<EarlyFrame>> {
        self.bus.subscribe()
    }

    /// Offers a frame just received (validated) to early subscribers: copied only when there
    /// are any, and only when the log does not hold it yet (an agent re-sending a frame whose
    /// acknowledgement it missed must not reach a subscriber twice: one that already had it
    /// durable, in this subscription or an earlier one).
    pub fn offer(
        &self,
        vehicle: &Arc<str>,
        session: u64,
        kind: i32,
        record: impl FnOnce() -> DataRecord,
        seq: u64,
        stream_id: u32,
    ) {
        if self.bus.receiver_count() == 0 {
            return;
        }
        let at = SeqRef {
            vehicle,
            session,
            stream_id,
            seq,
        };
        match self.store.stored(at) {
            Ok(false) => {}
            Ok(true) => return,
            Err(e) => {
                tracing::debug!(error = %e, "early delivery: store index not readable");
                return;
            }
        }
        let _ = self.bus.send(Arc::new(EarlyFrame {
            vehicle: vehicle.clone(),
            kind,
            session,
            stream_id,
            seq,
            message: SubscribeResponse {
                cursor: 0,
                record: Some(Record::Data(record())),
                provisional: true,
            },
        }));
    }
}

/// Why a resuming subscriber's `held` list is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeldError {
    /// More ranges than [`MAX_HELD_RANGES`].
    #[error("more than {MAX_HELD_RANGES} held ranges")]
    TooManyRanges,
    /// More frames than [`MAX_UNCONFIRMED`].
    #[error("held ranges cover more than {MAX_UNCONFIRMED} frames")]
    TooManyFrames,
    /// A range names no stream or is empty.
    #[error("a held range without a stream, or with start_seq >= end_seq")]
    BadRange,
}

/// One subscriber's provisional frames.
#[derive(Debug, Default)]
pub struct EarlyLedger {
    newest_durable: HashMap<StreamKeyOf, u64>,
    unconfirmed: HashMap<StreamKeyOf, BTreeSet<u64>>,
    count: usize,
}

impl EarlyLedger {
    /// A ledger that already counts `held` (what a resuming subscriber has) as sent.
    pub fn with_held(held: &[HeldFrames]) -> Result<Self, HeldError> {
        if held.len() > MAX_HELD_RANGES {
            return Err(HeldError::TooManyRanges);
        }
        let mut ledger = Self::default();
        for h in held {
            let Some(s) = h.stream.as_ref().filter(|_| h.start_seq < h.end_seq) else {
                return Err(HeldError::BadRange);
            };
            let key = (s.vehicle_id.clone(), s.session_id, s.stream_id);
            let frames = h.end_seq - h.start_seq;
            if frames > (MAX_UNCONFIRMED - ledger.count) as u64 {
                return Err(HeldError::TooManyFrames);
            }
            let set = ledger.unconfirmed.entry(key).or_default();
            for seq in h.start_seq..h.end_seq {
                if set.insert(seq) {
                    ledger.count += 1;
                }
            }
        }
        Ok(ledger)
    }

    /// Whether frame `seq` of `key`, just received by a node, goes to the subscriber now:
    /// not sent already, newer than the newest durable frame it has, and room in the ledger.
    /// If so it counts as sent.
    pub fn offer_early(&mut self, key: &StreamKeyOf, seq: u64) -> bool {
        if self.count >= MAX_UNCONFIRMED || self.newest_durable.get(key).is_some_and(|&n| seq <= n)
        {
            return false;
        }
        let inserted = match self.unconfirmed.get_mut(key) {
            Some(set) => set.insert(seq),
            None => {
                self.unconfirmed.insert(key.clone(), BTreeSet::from([seq]));
                true
            }
        };
        self.count += usize::from(inserted);
        inserted
    }

    /// Frame `seq` of `key` is durable and about to go to the subscriber: true when it was
    /// sent provisionally (confirm it instead of sending it again).
    pub fn on_durable(&mut self, key: &StreamKeyOf, seq: u64) -> bool {
        let newest = self.newest_durable.entry(key.clone()).or_insert(seq);
        *newest = (*newest).max(seq);
        let newest = *newest;
        let Some(set) = self.unconfirmed.get_mut(key) else {
            return false;
        };
        let confirmed = set.remove(&seq);
        // What lies far behind will not be confirmed any more.
        let keep = set.split_off(&newest.saturating_sub(STALE_SEQS));
        let forgotten = set.len();
        *set = keep;
        self.count -= forgotten + usize::from(confirmed);
        if set.is_empty() {
            self.unconfirmed.remove(key);
        }
        confirmed
    }

    /// Provisional frames sent and not confirmed.
    pub fn unconfirmed(&self) -> usize {
        self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_proto::model::StreamRef;

    fn key(stream: u32) -> StreamKeyOf {
        ("amb-1".into(), 7, stream)
    }

    fn held(stream: u32, start: u64, end: u64) -> HeldFrames {
        HeldFrames {
            stream: Some(StreamRef {
                vehicle_id: "amb-1".into(),
                session_id: 7,
                stream_id: stream,
                kind: 0,
            }),
            start_seq: start,
            end_seq: end,
        }
    }

    #[test]
    fn a_frame_goes_early_once_and_its_durable_record_confirms_it() {
        let mut l = EarlyLedger::default();
        assert!(l.offer_early(&key(1), 10));
        assert!(
            !l.offer_early(&key(1), 10),
            "a second bearer's copy is not sent"
        );
        assert!(l.offer_early(&key(2), 10), "streams are apart");
        assert_eq!(l.unconfirmed(), 2);
        assert!(l.on_durable(&key(1), 10), "confirmed, not repeated");
        assert!(!l.on_durable(&key(1), 11), "never sent early: sent in full");
        assert!(
            !l.offer_early(&key(1), 10),
            "older than the newest durable frame"
        );
        assert!(!l.offer_early(&key(1), 11));
        assert!(l.offer_early(&key(1), 12));
        assert_eq!(l.unconfirmed(), 2);
    }

    #[test]
    fn held_frames_of_a_resuming_subscriber_are_confirmed_not_repeated() {
        let mut l = EarlyLedger::with_held(&[held(1, 5, 8)]).unwrap();
        assert_eq!(l.unconfirmed(), 3);
        assert!(!l.offer_early(&key(1), 6), "it has that one");
        assert!(l.on_durable(&key(1), 5));
        assert!(l.on_durable(&key(1), 7));
        assert!(
            l.on_durable(&key(1), 6),
            "late, out of order: still confirmed"
        );
        assert_eq!(l.unconfirmed(), 0);
    }

    #[test]
    fn held_lists_are_bounded_and_checked() {
        let many: Vec<_> = (0..=MAX_HELD_RANGES as u64)
            .map(|i| held(1, i, i + 1))
            .collect();
        assert_eq!(
            EarlyLedger::with_held(&many).unwrap_err(),
            HeldError::TooManyRanges
        );
        assert_eq!(
            EarlyLedger::with_held(&[held(1, 0, u64::MAX)]).unwrap_err(),
            HeldError::TooManyFrames
        );
        assert_eq!(
            EarlyLedger::with_held(&[held(1, 4, 4)]).unwrap_err(),
            HeldError::BadRange
        );
        let mut no_stream = held(1, 0, 1);
        no_stream.stream = None;
        assert_eq!(
            EarlyLedger::with_held(&[no_stream]).unwrap_err(),
            HeldError::BadRange
        );
    }

    #[test]
    fn the_ledger_is_bounded_and_forgets_what_falls_far_behind() {
        let mut l = EarlyLedger::default();
        for seq in 0..MAX_UNCONFIRMED as u64 {
            assert!(l.offer_early(&key(1), seq));
        }
        assert!(
            !l.offer_early(&key(2), 0),
            "full: frames wait to be durable"
        );
        // The stream moves far ahead without confirming them (the log never took them).
        assert!(!l.on_durable(&key(1), MAX_UNCONFIRMED as u64 + STALE_SEQS));
        assert_eq!(l.unconfirmed(), 0);
        assert!(l.offer_early(&key(2), 0));
    }
}
