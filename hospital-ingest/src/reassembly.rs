//! Sans-IO reassembly of each stream, fed with frames the store has not seen and with time.
//!
//! Frames of one stream can overtake each other in flight (each travels on its own QUIC
//! stream). A frame newer than expected is held for at most the reorder window, so ordinary
//! reordering reaches subscribers in order and without noise. If the missing frames are still
//! absent when the window ends, the held frames are delivered after an explicit gap record;
//! frames that fill an announced gap later are delivered marked late, and a gap-closed record
//! follows once the whole announced range has arrived. A window of zero delivers at once.
//!
//! Deduplication against stored frames is the store's job (it knows every stored seq); a frame
//! below the delivered high-water mark that fills no open gap is stale and is not stored again.
//! A frame above the mark was never delivered, so a writer that is the log's only one need not
//! ask the store about it ([`Reassembler::above_delivered`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
/// One stream of one vehicle's session.
pub struct StreamKey {
    /// The vehicle (from its certificate).
    pub vehicle: Arc<str>,
    /// The session (one agent run; resumed after a crash).
    pub session: u64,
    /// The stream within the session.
    pub stream_id: u32,
}

/// A range of frames announced as missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    /// First missing seq.
    pub start_seq: u64,
    /// One past the last missing seq.
    pub end_seq: u64,
    /// Capture time just after the last frame before the gap (0 when none came before).
    pub start_time_ns: i64,
    /// Capture time of the first frame after the gap.
    pub end_time_ns: i64,
}

/// What to publish, in this order.
#[derive(Debug, PartialEq, Eq)]
pub enum Output<T> {
    /// Publish a frame.
    Deliver {
        /// Its stream.
        key: StreamKey,
        /// Its seq.
        seq: u64,
        /// The frame.
        item: T,
        /// Whether it fills an announced gap.
        late: bool,
    },
    /// Publish a gap record.
    Gap {
        /// Its stream.
        key: StreamKey,
        /// The missing range.
        gap: Gap,
    },
    /// Every frame of an announced gap has arrived.
    GapClosed {
        /// Its stream.
        key: StreamKey,
        /// First seq of the gap.
        start_seq: u64,
        /// One past its last seq.
        end_seq: u64,
    },
}

/// What happened to an arriving frame besides the outputs.
#[derive(Debug, PartialEq, Eq)]
pub enum Arrival<T> {
    /// Taken (delivered now or held).
    Taken,
    /// The same seq was already held: the new item replaced the held one, which is returned
    /// (the caller keeps the newest way to acknowledge it).
    Replaced(T),
    /// Below the high-water mark and in no open gap: delivered before (and since expired from
    /// the store) or older than the oldest tracked gap. The item is returned.
    Stale(T),
}

#[derive(Debug, Clone, Copy)]
/// Bounds of the reassembler.
pub struct Limits {
    /// How long a newer frame waits for the missing ones before a gap is announced.
    pub reorder_window: Duration,
    /// Frames held per stream at most; beyond, the gap is announced at once.
    pub max_held: usize,
    /// Announced gaps tracked per stream; beyond, the oldest is given up.
    pub max_gaps: usize,
}

#[derive(Debug)]
struct Held<T> {
    item: T,
    capture_ns: i64,
    end_ns: i64,
    since: Instant,
}

#[derive(Debug)]
struct StreamState<T> {
    /// One past the highest seq delivered.
    next_seq: u64,
    /// Capture time just after the highest frame delivered.
    next_time_ns: i64,
    held: BTreeMap<u64, Held<T>>,
    /// Missing ranges inside announced gaps: start -> end (exclusive).
    missing: BTreeMap<u64, u64>,
    /// Announced gaps: start -> (end, frames still missing).
    announced: BTreeMap<u64, (u64, u64)>,
}

impl<T> Default for StreamState<T> {
    fn default() -> Self {
        Self {
            next_seq: 0,
            next_time_ns: 0,
            held: BTreeMap::new(),
            missing: BTreeMap::new(),
            announced: BTreeMap::new(),
        }
    }
}

#[derive(Debug)]
/// Reassembly of every stream (see the module documentation).
pub struct Reassembler<T> {
    streams: HashMap<StreamKey, StreamState<T>>,
    /// The streams holding frames: deadlines and timeouts look only at these, not at every
    /// stream of every connected vehicle (the writer asks on each batch).
    holding: HashSet<StreamKey>,
    limits: Limits,
    dropped_gaps: u64,
}

impl<T> Reassembler<T> {
    /// A reassembler with `limits` (counts of at least 1).
    pub fn new(limits: Limits) -> Self {
        let limits = Limits {
            max_held: limits.max_held.max(1),
            max_gaps: limits.max_gaps.max(1),
            ..limits
        };
        Self {
            streams: HashMap::new(),
            holding: HashSet::new(),
            limits,
            dropped_gaps: 0,
        }
    }

    /// Announced gaps given up because a stream had more than the bound open.
    pub fn dropped_gaps(&self) -> u64 {
        self.dropped_gaps
    }

    /// Announced gaps of a stream still open.
    pub fn open_gaps(&self, key: &StreamKey) -> usize {
        self.streams.get(key).map_or(0, |s| s.announced.len())
    }

    /// Whether `seq` lies above everything delivered on `key` (held frames count as not
    /// delivered). Every stored frame was delivered or restored below that mark, so where this
    /// reassembler sees every frame the log takes, such a frame is not stored.
    pub fn above_delivered(&self, key: &StreamKey, seq: u64) -> bool {
        self.streams.get(key).is_none_or(|s| seq >= s.next_seq)
    }

    /// Frames held for reordering, all streams.
    pub fn held(&self) -> usize {
        self.holding
            .iter()
            .filter_map(|k| self.streams.get(k))
            .map(|s| s.held.len())
            .sum()
    }

    /// Streams holding frames for reordering.
    pub fn holding(&self) -> impl Iterator<Item = &StreamKey> {
        self.holding.iter()
    }

    /// Keeps `holding` in step with whether `key` holds frames.
    fn note_holding(&mut self, key: &StreamKey) {
        let holds = self.streams.get(key).is_some_and(|s| !s.held.is_empty());
        if holds {
            if !self.holding.contains(key) {
                self.holding.insert(key.clone());
            }
        } else {
            self.holding.remove(key);
        }
    }

    /// Drops a stream's state (its data has expired and it was not declared since).
    pub fn forget(&mut self, key: &StreamKey) {
        self.holding.remove(key);
        self.streams.remove(key);
    }

    /// Restores a stream after a restart: `next_seq` is one past the highest stored seq and
    /// `holes` the missing ranges between stored seqs, which are open gaps again, as they were
    /// before the restart (the newest `max_gaps` of them).
    pub fn restore(
        &mut self,
        key: StreamKey,
        next_seq: u64,
        holes: impl IntoIterator<Item = (u64, u64)>,
        next_time_ns: i64,
    ) {
        let mut st = StreamState {
            next_seq,
            next_time_ns,
            ..StreamState::default()
        };
        for (start, end) in holes {
            if start < end && end <= next_seq {
                st.missing.insert(start, end);
                st.announced.insert(start, (end, end - start));
            }
        }
        while st.announced.len() > self.limits.max_gaps {
            if let Some((s, _)) = st.announced.pop_first() {
                st.missing.remove(&s);
            }
        }
        self.holding.remove(&key);
        self.streams.insert(key, st);
    }

    /// When `on_timeout` next has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.holding
            .iter()
            .filter_map(|k| self.streams.get(k))
            .filter_map(|s| s.held.values().map(|h| h.since).min())
            .min()
            .map(|t| t + self.limits.reorder_window)
    }

    /// A frame the store has not seen. `end_ns` is the capture time just after its last sample.
    pub fn on_frame(
        &mut self,
        key: &StreamKey,
        seq: u64,
        capture_ns: i64,
        end_ns: i64,
        item: T,
        now: Instant,
    ) -> (Arrival<T>, Vec<Output<T>>) {
        let result = self.take_frame(key, seq, capture_ns, end_ns, item, now);
        self.note_holding(key);
        result
    }

    fn take_frame(
        &mut self,
        key: &StreamKey,
        seq: u64,
        capture_ns: i64,
        end_ns: i64,
        item: T,
        now: Instant,
    ) -> (Arrival<T>, Vec<Output<T>>) {
        let limits = self.limits;
        let mut out = Vec::new();
        let st = self.streams.entry(key.clone()).or_default();
        if seq == st.next_seq {
            st.next_seq = seq + 1;
            st.next_time_ns = end_ns;
            out.push(Output::Deliver {
                key: key.clone(),
                seq,
                item,
                late: false,
            });
            Self::drain_contiguous(key, st, &mut out);
            return (Arrival::Taken, out);
        }
        if seq > st.next_seq {
            if let Some(h) = st.held.get_mut(&seq) {
                let old = std::mem::replace(&mut h.item, item);
                return (Arrival::Replaced(old), out);
            }
            st.held.insert(
                seq,
                Held {
                    item,
                    capture_ns,
                    end_ns,
                    since: now,
                },
            );
            if limits.reorder_window.is_zero() || st.held.len() > limits.max_held {
                self.dropped_gaps += Self::release_held(key, st, limits.max_gaps, &mut out);
            }
            return (Arrival::Taken, out);
        }
        // Below the high-water mark: only a seq inside a missing range is new.
        let Some((&m_start, &m_end)) = st.missing.range(..=seq).next_back() else {
            return (Arrival::Stale(item), out);
        };
        if seq >= m_end {
            return (Arrival::Stale(item), out);
        }
        st.missing.remove(&m_start);
        if m_start < seq {
            st.missing.insert(m_start, seq);
        }
        if seq + 1 < m_end {
            st.missing.insert(seq + 1, m_end);
        }
        out.push(Output::Deliver {
            key: key.clone(),
            seq,
            item,
            late: true,
        });
        if let Some((&a_start, entry)) = st.announced.range_mut(..=seq).next_back()
            && seq < entry.0
        {
            entry.1 = entry.1.saturating_sub(1);
            if entry.1 == 0 {
                let end_seq = entry.0;
                st.announced.remove(&a_start);
                out.push(Output::GapClosed {
                    key: key.clone(),
                    start_seq: a_start,
                    end_seq,
                });
            }
        }
        (Arrival::Taken, out)
    }

    /// Announces gaps whose reorder window has passed and delivers the frames held behind them.
    pub fn on_timeout(&mut self, now: Instant) -> Vec<Output<T>> {
        let mut out = Vec::new();
        let limits = self.limits;
        let mut released = Vec::new();
        for key in &self.holding {
            let Some(st) = self.streams.get_mut(key) else {
                continue;
            };
            let oldest = st.held.values().map(|h| h.since).min();
            let expired = oldest.is_some_and(|t| now >= t + limits.reorder_window);
            if expired {
                self.dropped_gaps += Self::release_held(key, st, limits.max_gaps, &mut out);
                released.push(key.clone());
            }
        }
        for key in released {
            self.note_holding(&key);
        }
        out
    }

    /// Delivers everything held, announcing the gaps in front of and between the held frames.
    fn release_held(
        key: &StreamKey,
        st: &mut StreamState<T>,
        max_gaps: usize,
        out: &mut Vec<Output<T>>,
    ) -> u64 {
        let mut dropped = 0;
        while let Some((seq, h)) = st.held.pop_first() {
            if seq > st.next_seq {
                let gap = Gap {
                    start_seq: st.next_seq,
                    end_seq: seq,
                    start_time_ns: st.next_time_ns,
                    end_time_ns: h.capture_ns,
                };
                st.missing.insert(gap.start_seq, gap.end_seq);
                st.announced
                    .insert(gap.start_seq, (gap.end_seq, gap.end_seq - gap.start_seq));
                while st.announced.len() > max_gaps {
                    if let Some((s, (e, _))) = st.announced.pop_first() {
                        let inside: Vec<u64> = st.missing.range(s..e).map(|(k, _)| *k).collect();
                        for k in inside {
                            st.missing.remove(&k);
                        }
                        dropped += 1;
                    }
                }
                out.push(Output::Gap {
                    key: key.clone(),
                    gap,
                });
            }
            st.next_seq = seq + 1;
            st.next_time_ns = h.end_ns;
            out.push(Output::Deliver {
                key: key.clone(),
                seq,
                item: h.item,
                late: false,
            });
        }
        dropped
    }

    fn drain_contiguous(key: &StreamKey, st: &mut StreamState<T>, out: &mut Vec<Output<T>>) {
        while let Some(entry) = st.held.first_entry() {
            if *entry.key() != st.next_seq {
                break;
            }
            let h = entry.remove();
            out.push(Output::Deliver {
                key: key.clone(),
                seq: st.next_seq,
                item: h.item,
                late: false,
            });
            st.next_seq += 1;
            st.next_time_ns = h.end_ns;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> StreamKey {
        StreamKey {
            vehicle: "amb-1".into(),
            session: 7,
            stream_id: 0,
        }
    }

    const WINDOW: Duration = Duration::from_millis(50);

    fn r(window: Duration, max_gaps: usize) -> Reassembler<u64> {
        Reassembler::new(Limits {
            reorder_window: window,
            max_held: 4,
            max_gaps,
        })
    }

    /// Feeds seq (item = seq, capture = 40 ms per frame) and returns a compact trace.
    fn feed(r: &mut Reassembler<u64>, seq: u64, now: Instant) -> (String, Vec<String>) {
        let t = seq as i64 * 40;
        let (arrival, out) = r.on_frame(&key(), seq, t, t + 40, seq, now);
        let a = match arrival {
            Arrival::Taken => "taken".to_string(),
            Arrival::Replaced(x) => format!("replaced {x}"),
            Arrival::Stale(x) => format!("stale {x}"),
        };
        (a, trace(out))
    }

    fn trace(out: Vec<Output<u64>>) -> Vec<String> {
        out.into_iter()
            .map(|o| match o {
                Output::Deliver { seq, late, .. } => {
                    format!("{seq}{}", if late { " late" } else { "" })
                }
                Output::Gap { gap, .. } => format!(
                    "gap {}..{} @{}..{}",
                    gap.start_seq, gap.end_seq, gap.start_time_ns, gap.end_time_ns
                ),
                Output::GapClosed {
                    start_seq, end_seq, ..
                } => format!("closed {start_seq}..{end_seq}"),
            })
            .collect()
    }

    #[test]
    fn in_order_frames_pass_straight_through() {
        let mut r = r(WINDOW, 16);
        let now = Instant::now();
        for s in 0..3 {
            assert_eq!(feed(&mut r, s, now).1, vec![s.to_string()]);
        }
        assert_eq!(r.next_deadline(), None);
    }

    #[test]
    fn reordering_within_the_window_is_healed_silently() {
        let mut r = r(WINDOW, 16);
        let now = Instant::now();
        feed(&mut r, 0, now);
        assert_eq!(feed(&mut r, 2, now).1, Vec::<String>::new(), "held");
        assert_eq!(r.next_deadline(), Some(now + WINDOW));
        assert_eq!(
            feed(&mut r, 1, now + Duration::from_millis(3)).1,
            vec!["1", "2"]
        );
        assert_eq!(r.held(), 0);
        assert!(r.on_timeout(now + WINDOW).is_empty());
    }

    #[test]
    fn a_real_loss_becomes_a_gap_then_late_data_then_closed() {
        let mut r = r(WINDOW, 16);
        let now = Instant::now();
        feed(&mut r, 0, now);
        feed(&mut r, 3, now);
        feed(&mut r, 4, now + Duration::from_millis(10));
        assert!(r.on_timeout(now + Duration::from_millis(49)).is_empty());
        assert_eq!(
            trace(r.on_timeout(now + WINDOW)),
            vec!["gap 1..3 @40..120", "3", "4"]
        );
        assert_eq!(feed(&mut r, 2, now).1, vec!["2 late"]);
        assert_eq!(feed(&mut r, 2, now).0, "stale 2");
        assert_eq!(feed(&mut r, 1, now).1, vec!["1 late", "closed 1..3"]);
        assert_eq!(r.open_gaps(&key()), 0);
        assert_eq!(feed(&mut r, 5, now).1, vec!["5"]);
    }

    #[test]
    fn only_streams_holding_frames_are_tracked_for_deadlines() {
        let mut r = r(WINDOW, 16);
        let now = Instant::now();
        let stream = |id: u32| StreamKey {
            stream_id: id,
            ..key()
        };
        for id in 0..100 {
            r.on_frame(&stream(id), 0, 0, 40, 0, now);
        }
        assert_eq!(r.holding().count(), 0);
        let later = now + Duration::from_millis(7);
        r.on_frame(&stream(7), 2, 80, 120, 2, later);
        r.on_frame(&stream(8), 3, 120, 160, 3, now + Duration::from_millis(9));
        let mut holding: Vec<u32> = r.holding().map(|k| k.stream_id).collect();
        holding.sort_unstable();
        assert_eq!(holding, vec![7, 8]);
        assert_eq!(r.held(), 2);
        assert_eq!(r.next_deadline(), Some(later + WINDOW));
        // Stream 7's gap fills: only stream 8 still waits.
        r.on_frame(&stream(7), 1, 40, 80, 1, later);
        assert_eq!(
            r.holding().map(|k| k.stream_id).collect::<Vec<_>>(),
            vec![8]
        );
        assert_eq!(
            r.next_deadline(),
            Some(now + Duration::from_millis(9) + WINDOW)
        );
        // Its window ends: the gap is announced and nothing is held any more.
        let out = trace(r.on_timeout(now + Duration::from_millis(9) + WINDOW));
        assert_eq!(out, vec!["gap 1..3 @40..120", "3"]);
        assert_eq!(r.holding().count(), 0);
        assert_eq!(r.next_deadline(), None);
        r.on_frame(&stream(9), 5, 200, 240, 5, now);
        r.forget(&stream(9));
        assert_eq!(r.holding().count(), 0);
        assert_eq!(r.held(), 0);
    }

    #[test]
    fn above_delivered_means_never_delivered() {
        let mut r = r(WINDOW, 16);
        let now = Instant::now();
        assert!(r.above_delivered(&key(), 0), "a stream not seen yet");
        feed(&mut r, 0, now);
        feed(&mut r, 2, now);
        assert!(!r.above_delivered(&key(), 0));
        assert!(r.above_delivered(&key(), 1));
        assert!(r.above_delivered(&key(), 2), "held, not delivered");
        r.on_timeout(now + WINDOW);
        assert!(
            !r.above_delivered(&key(), 1),
            "in the announced gap: may come late"
        );
        assert!(!r.above_delivered(&key(), 2));
        assert!(r.above_delivered(&key(), 3));
        r.restore(key(), 10, [(4, 6)], 400);
        assert!(!r.above_delivered(&key(), 9));
        assert!(r.above_delivered(&key(), 10));
    }

    #[test]
    fn zero_window_announces_at_once() {
        let mut r = r(Duration::ZERO, 16);
        let now = Instant::now();
        assert_eq!(feed(&mut r, 2, now).1, vec!["gap 0..2 @0..80", "2"]);
        assert_eq!(feed(&mut r, 0, now).1, vec!["0 late"]);
    }

    #[test]
    fn a_duplicate_of_a_held_frame_replaces_it() {
        let mut r = r(WINDOW, 16);
        let now = Instant::now();
        feed(&mut r, 1, now);
        assert_eq!(feed(&mut r, 1, now).0, "replaced 1");
        assert_eq!(r.held(), 1);
    }

    #[test]
    fn too_many_held_frames_release_at_once() {
        let mut r = r(WINDOW, 16);
        let now = Instant::now();
        for s in 1..=4 {
            assert!(feed(&mut r, s, now).1.is_empty());
        }
        assert_eq!(
            feed(&mut r, 5, now).1,
            vec!["gap 0..1 @0..40", "1", "2", "3", "4", "5"]
        );
    }

    #[test]
    fn streams_are_independent() {
        let mut r = r(Duration::ZERO, 16);
        let other = StreamKey {
            stream_id: 1,
            ..key()
        };
        let now = Instant::now();
        r.on_frame(&key(), 0, 0, 1, 0, now);
        let (_, out) = r.on_frame(&other, 0, 0, 1, 0, now);
        assert_eq!(trace(out), vec!["0"]);
    }

    #[test]
    fn gap_tracking_is_bounded() {
        let mut r = r(Duration::ZERO, 2);
        let now = Instant::now();
        for s in [0, 2, 4, 6] {
            feed(&mut r, s, now);
        }
        assert_eq!(r.open_gaps(&key()), 2);
        assert_eq!(r.dropped_gaps(), 1);
        assert_eq!(feed(&mut r, 1, now).0, "stale 1", "oldest gap given up");
        assert_eq!(feed(&mut r, 5, now).1, vec!["5 late", "closed 5..6"]);
    }

    #[test]
    fn restore_rebuilds_high_water_mark_and_holes() {
        let mut r = r(WINDOW, 16);
        r.restore(key(), 9, [(5, 7)], 360); // seqs 3, 4, 7, 8 stored
        let now = Instant::now();
        assert_eq!(feed(&mut r, 8, now).0, "stale 8");
        assert_eq!(feed(&mut r, 9, now).1, vec!["9"]);
        assert_eq!(feed(&mut r, 5, now).1, vec!["5 late"]);
        assert_eq!(feed(&mut r, 6, now).1, vec!["6 late", "closed 5..7"]);
        assert_eq!(
            feed(&mut r, 1, now).0,
            "stale 1",
            "below the oldest retained seq"
        );
    }
}
