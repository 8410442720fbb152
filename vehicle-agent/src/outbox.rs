//! Sans-IO buffer of frames not yet acknowledged by the ingest.
//!
//! Every frame stays here from production until the ingest acknowledges it. Frames not yet
//! written on the current connection are "pending"; a new connection makes everything pending
//! again (the ingest drops duplicates). The buffer is bounded in bytes: when full, the
//! lowest-priority, oldest frames are evicted first and reported to the caller.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::Bytes;
use tokio::time::Instant;

/// Orders frames by class (most urgent first), then stream, then sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrameKey {
    pub rank: u8,
    pub stream_id: u32,
    pub seq: u64,
}

#[derive(Debug)]
struct Entry {
    bytes: Bytes,
    kind: i32,
    sent_at: Option<Instant>,
    sent_count: u32,
}

#[derive(Debug)]
pub struct Outbox {
    entries: BTreeMap<FrameKey, Entry>,
    pending: BTreeSet<FrameKey>,
    /// rank of each known stream, to find entries from (stream, seq) acknowledgements.
    ranks: HashMap<u32, u8>,
    bytes: usize,
    max_bytes: usize,
}

/// A frame to write now.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub key: FrameKey,
    pub kind: i32,
    pub bytes: Bytes,
    /// Written before on an earlier connection.
    pub resend: bool,
}

/// What an insert displaced.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Evicted {
    pub frames: Vec<(FrameKey, i32)>,
}

impl Outbox {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            entries: BTreeMap::new(),
            pending: BTreeSet::new(),
            ranks: HashMap::new(),
            bytes: 0,
            max_bytes,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Adds a frame as pending. Evicts lowest priority, oldest frames while over the bound.
    pub fn insert(&mut self, key: FrameKey, kind: i32, bytes: Bytes) -> Evicted {
        self.ranks.insert(key.stream_id, key.rank);
        let mut evicted = Evicted::default();
        while self.bytes + bytes.len() > self.max_bytes {
            let Some(victim) = self.eviction_candidate() else {
                break;
            };
            if victim.rank < key.rank {
                // Everything left is more urgent than the newcomer: drop the newcomer.
                evicted.frames.push((key, kind));
                return evicted;
            }
            if let Some(e) = self.remove(&victim) {
                evicted.frames.push((victim, e.kind));
            }
        }
        self.bytes += bytes.len();
        self.entries.insert(
            key,
            Entry {
                bytes,
                kind,
                sent_at: None,
                sent_count: 0,
            },
        );
        self.pending.insert(key);
        evicted
    }

    /// Oldest frame of the least urgent class (of its lowest-numbered stream): one B-tree
    /// lookup, so a full buffer costs nothing extra per frame.
    fn eviction_candidate(&self) -> Option<FrameKey> {
        let worst_rank = self.entries.keys().next_back()?.rank;
        let first_of_rank = FrameKey {
            rank: worst_rank,
            stream_id: 0,
            seq: 0,
        };
        self.entries.range(first_of_rank..).next().map(|(k, _)| *k)
    }

    fn remove(&mut self, key: &FrameKey) -> Option<Entry> {
        let e = self.entries.remove(key)?;
        self.pending.remove(key);
        self.bytes -= e.bytes.len();
        Some(e)
    }

    /// The most urgent pending frame, marked as written at `now`.
    pub fn next_pending(&mut self, now: Instant) -> Option<Outgoing> {
        let key = self.pending.pop_first()?;
        let e = self.entries.get_mut(&key)?;
        e.sent_at = Some(now);
        e.sent_count += 1;
        Some(Outgoing {
            key,
            kind: e.kind,
            bytes: e.bytes.clone(),
            resend: e.sent_count > 1,
        })
    }

    /// A write failed: offer the frame again (if still unacknowledged).
    pub fn requeue(&mut self, key: FrameKey) {
        if self.entries.contains_key(&key) {
            self.pending.insert(key);
        }
    }

    /// New connection: everything unacknowledged must be written again.
    pub fn requeue_all(&mut self) {
        self.pending = self.entries.keys().copied().collect();
    }

    /// Releases acknowledged frames in `[start, end)` of a stream; returns how long each had
    /// waited since it was last written.
    pub fn ack(
        &mut self,
        stream_id: u32,
        start: u64,
        end: u64,
        now: Instant,
    ) -> Vec<std::time::Duration> {
        let Some(&rank) = self.ranks.get(&stream_id) else {
            return Vec::new();
        };
        if end <= start {
            return Vec::new();
        }
        let lo = FrameKey {
            rank,
            stream_id,
            seq: start,
        };
        let hi = FrameKey {
            rank,
            stream_id,
            seq: end,
        };
        let keys: Vec<FrameKey> = self.entries.range(lo..hi).map(|(k, _)| *k).collect();
        keys.iter()
            .filter_map(|k| self.remove(k))
            .filter_map(|e| e.sent_at.map(|t| now.saturating_duration_since(t)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(rank: u8, stream_id: u32, seq: u64) -> FrameKey {
        FrameKey {
            rank,
            stream_id,
            seq,
        }
    }

    #[test]
    fn most_urgent_first_then_oldest() {
        let mut o = Outbox::new(1 << 20);
        let now = Instant::now();
        o.insert(key(3, 2, 0), 4, Bytes::from_static(b"gps"));
        o.insert(key(1, 0, 1), 2, Bytes::from_static(b"ecg1"));
        o.insert(key(1, 0, 0), 2, Bytes::from_static(b"ecg0"));
        let order: Vec<FrameKey> =
            std::iter::from_fn(|| o.next_pending(now).map(|g| g.key)).collect();
        assert_eq!(order, vec![key(1, 0, 0), key(1, 0, 1), key(3, 2, 0)]);
        assert_eq!(o.len(), 3, "written frames stay until acknowledged");
    }

    #[test]
    fn ack_releases_ranges_and_reconnect_resends_the_rest() {
        let mut o = Outbox::new(1 << 20);
        let now = Instant::now();
        for s in 0..10 {
            o.insert(key(1, 0, s), 2, Bytes::from(vec![0u8; 10]));
        }
        while o.next_pending(now).is_some() {}
        assert_eq!(o.ack(0, 2, 5, now).len(), 3);
        assert_eq!(o.ack(0, 5, 5, now).len(), 0);
        assert_eq!(o.ack(7, 0, 100, now).len(), 0, "unknown stream");
        assert_eq!((o.len(), o.bytes()), (7, 70));
        o.requeue_all();
        let again: Vec<(u64, bool)> =
            std::iter::from_fn(|| o.next_pending(now).map(|g| (g.key.seq, g.resend))).collect();
        assert_eq!(
            again,
            vec![
                (0, true),
                (1, true),
                (5, true),
                (6, true),
                (7, true),
                (8, true),
                (9, true)
            ]
        );
    }

    #[test]
    fn full_buffer_evicts_location_before_ecg() {
        let mut o = Outbox::new(40);
        o.insert(key(3, 2, 0), 4, Bytes::from(vec![0u8; 10]));
        o.insert(key(3, 2, 1), 4, Bytes::from(vec![0u8; 10]));
        o.insert(key(1, 0, 0), 2, Bytes::from(vec![0u8; 10]));
        o.insert(key(1, 0, 1), 2, Bytes::from(vec![0u8; 10]));
        let ev = o.insert(key(1, 0, 2), 2, Bytes::from(vec![0u8; 10]));
        assert_eq!(
            ev.frames,
            vec![(key(3, 2, 0), 4)],
            "oldest location goes first"
        );
        let ev = o.insert(key(1, 0, 3), 2, Bytes::from(vec![0u8; 10]));
        assert_eq!(ev.frames, vec![(key(3, 2, 1), 4)]);
        let ev = o.insert(key(1, 0, 4), 2, Bytes::from(vec![0u8; 10]));
        assert_eq!(ev.frames, vec![(key(1, 0, 0), 2)], "then the oldest ECG");
        // A location frame does not displace ECG: it is dropped itself.
        let ev = o.insert(key(3, 2, 2), 4, Bytes::from(vec![0u8; 10]));
        assert_eq!(ev.frames, vec![(key(3, 2, 2), 4)]);
        assert_eq!(o.bytes(), 40);
    }
}
