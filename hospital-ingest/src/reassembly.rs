//! Sans-IO reassembly of each stream: decides, for a frame the store has not seen, whether it
//! is in order, opens a gap (newer than expected) or fills one (late), and when an announced gap
//! is completely filled. Deduplication itself is the store's job (it knows every stored seq);
//! a frame below the high-water mark that fills no known gap is stale and is not stored again.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamKey {
    pub vehicle: Arc<str>,
    pub session: u64,
    pub stream_id: u32,
}

/// A range of frames announced as missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    pub start_seq: u64,
    pub end_seq: u64,
    /// Capture time just after the last frame before the gap (0 when none came before).
    pub start_time_ns: i64,
    /// Capture time of the frame that revealed the gap.
    pub end_time_ns: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Store and deliver the frame; `gap` (if any) goes before it, `closed` after it.
    Accept {
        late: bool,
        gap: Option<Gap>,
        closed: Option<(u64, u64)>,
    },
    /// Below the high-water mark and in no open gap: delivered before (and since expired from
    /// the store) or older than the oldest tracked gap. Acknowledge, do not store.
    Stale,
}

#[derive(Debug, Default)]
struct StreamState {
    /// One past the highest seq accepted.
    next_seq: u64,
    /// Capture time just after the highest frame accepted.
    next_time_ns: i64,
    /// Missing ranges: start -> end (exclusive).
    missing: BTreeMap<u64, u64>,
    /// Announced gaps: start -> (end, frames still missing).
    announced: BTreeMap<u64, (u64, u64)>,
}

#[derive(Debug)]
pub struct Reassembler {
    streams: HashMap<StreamKey, StreamState>,
    max_gaps_per_stream: usize,
    dropped_gaps: u64,
}

impl Reassembler {
    pub fn new(max_gaps_per_stream: usize) -> Self {
        Self {
            streams: HashMap::new(),
            max_gaps_per_stream: max_gaps_per_stream.max(1),
            dropped_gaps: 0,
        }
    }

    /// Announced gaps given up because a stream had more than the bound open.
    pub fn dropped_gaps(&self) -> u64 {
        self.dropped_gaps
    }

    /// Drops a stream's state (its data has expired and it was not declared since).
    pub fn forget(&mut self, key: &StreamKey) {
        self.streams.remove(key);
    }

    pub fn open_gaps(&self, key: &StreamKey) -> usize {
        self.streams.get(key).map_or(0, |s| s.announced.len())
    }

    /// Restores a stream's state after a restart from the seqs already stored (ascending).
    /// Holes between stored seqs become open gaps again, as they were before the restart.
    pub fn restore(
        &mut self,
        key: StreamKey,
        stored_ascending: impl IntoIterator<Item = u64>,
        next_time_ns: i64,
    ) {
        let mut st = StreamState::default();
        let mut first = true;
        for seq in stored_ascending {
            if !first && seq > st.next_seq {
                st.missing.insert(st.next_seq, seq);
                st.announced.insert(st.next_seq, (seq, seq - st.next_seq));
            }
            first = false;
            st.next_seq = st.next_seq.max(seq + 1);
        }
        st.next_time_ns = next_time_ns;
        self.streams.insert(key, st);
    }

    /// A frame the store has not seen. `end_time_ns` is the capture time just after its last sample.
    pub fn on_frame(
        &mut self,
        key: &StreamKey,
        seq: u64,
        capture_ns: i64,
        end_time_ns: i64,
    ) -> Verdict {
        let max_gaps = self.max_gaps_per_stream;
        let st = self.streams.entry(key.clone()).or_default();
        if seq >= st.next_seq {
            let gap = (seq > st.next_seq).then_some(Gap {
                start_seq: st.next_seq,
                end_seq: seq,
                start_time_ns: st.next_time_ns,
                end_time_ns: capture_ns,
            });
            if let Some(g) = gap {
                st.missing.insert(g.start_seq, g.end_seq);
                st.announced
                    .insert(g.start_seq, (g.end_seq, g.end_seq - g.start_seq));
                while st.announced.len() > max_gaps {
                    if let Some((s, (e, _))) = st.announced.pop_first() {
                        let stale: Vec<u64> = st.missing.range(s..e).map(|(k, _)| *k).collect();
                        for k in stale {
                            st.missing.remove(&k);
                        }
                        self.dropped_gaps += 1;
                    }
                }
            }
            st.next_seq = seq + 1;
            st.next_time_ns = end_time_ns;
            return Verdict::Accept {
                late: false,
                gap,
                closed: None,
            };
        }
        // Below the high-water mark: only a seq inside a missing range is new.
        let Some((&m_start, &m_end)) = st.missing.range(..=seq).next_back() else {
            return Verdict::Stale;
        };
        if seq >= m_end {
            return Verdict::Stale;
        }
        st.missing.remove(&m_start);
        if m_start < seq {
            st.missing.insert(m_start, seq);
        }
        if seq + 1 < m_end {
            st.missing.insert(seq + 1, m_end);
        }
        let mut closed = None;
        if let Some((&a_start, entry)) = st.announced.range_mut(..=seq).next_back()
            && seq < entry.0
        {
            entry.1 = entry.1.saturating_sub(1);
            if entry.1 == 0 {
                closed = Some((a_start, entry.0));
            }
        }
        if let Some((s, _)) = closed {
            st.announced.remove(&s);
        }
        Verdict::Accept {
            late: true,
            gap: None,
            closed,
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

    fn accept(late: bool) -> Verdict {
        Verdict::Accept {
            late,
            gap: None,
            closed: None,
        }
    }

    #[test]
    fn in_order_frames_are_plain() {
        let mut r = Reassembler::new(16);
        for s in 0..5 {
            assert_eq!(
                r.on_frame(&key(), s, s as i64 * 40, (s as i64 + 1) * 40),
                accept(false)
            );
        }
    }

    #[test]
    fn gap_is_announced_then_filled_late_then_closed() {
        let mut r = Reassembler::new(16);
        r.on_frame(&key(), 0, 0, 40);
        let v = r.on_frame(&key(), 4, 160, 200);
        assert_eq!(
            v,
            Verdict::Accept {
                late: false,
                gap: Some(Gap {
                    start_seq: 1,
                    end_seq: 4,
                    start_time_ns: 40,
                    end_time_ns: 160
                }),
                closed: None
            }
        );
        assert_eq!(r.on_frame(&key(), 2, 80, 120), accept(true));
        assert_eq!(
            r.on_frame(&key(), 2, 80, 120),
            Verdict::Stale,
            "the store dedups, but a re-fill is stale too"
        );
        assert_eq!(r.on_frame(&key(), 1, 40, 80), accept(true));
        assert_eq!(
            r.on_frame(&key(), 3, 120, 160),
            Verdict::Accept {
                late: true,
                gap: None,
                closed: Some((1, 4))
            }
        );
        assert_eq!(r.open_gaps(&key()), 0);
        assert_eq!(r.on_frame(&key(), 0, 0, 40), Verdict::Stale);
        assert_eq!(r.on_frame(&key(), 5, 200, 240), accept(false));
    }

    #[test]
    fn first_frame_after_seq_zero_missing_announces_a_gap_from_zero() {
        let mut r = Reassembler::new(16);
        match r.on_frame(&key(), 3, 120, 160) {
            Verdict::Accept { gap: Some(g), .. } => {
                assert_eq!((g.start_seq, g.end_seq, g.start_time_ns), (0, 3, 0))
            }
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn streams_are_independent() {
        let mut r = Reassembler::new(16);
        let other = StreamKey {
            stream_id: 1,
            ..key()
        };
        r.on_frame(&key(), 0, 0, 1);
        assert_eq!(r.on_frame(&other, 0, 0, 1), accept(false));
    }

    #[test]
    fn gap_tracking_is_bounded() {
        let mut r = Reassembler::new(2);
        for s in [0, 2, 4, 6] {
            r.on_frame(&key(), s, 0, 0);
        }
        assert_eq!(r.open_gaps(&key()), 2);
        assert_eq!(r.dropped_gaps(), 1);
        assert_eq!(
            r.on_frame(&key(), 1, 0, 0),
            Verdict::Stale,
            "oldest gap given up"
        );
        assert!(matches!(
            r.on_frame(&key(), 5, 0, 0),
            Verdict::Accept { late: true, .. }
        ));
    }

    #[test]
    fn restore_rebuilds_high_water_mark_and_holes() {
        let mut r = Reassembler::new(16);
        r.restore(key(), [3, 4, 7, 8], 360);
        assert_eq!(r.on_frame(&key(), 8, 0, 0), Verdict::Stale);
        assert_eq!(r.on_frame(&key(), 9, 360, 400), accept(false));
        assert_eq!(r.on_frame(&key(), 5, 0, 0), accept(true));
        assert_eq!(
            r.on_frame(&key(), 6, 0, 0),
            Verdict::Accept {
                late: true,
                gap: None,
                closed: Some((5, 7))
            }
        );
        assert_eq!(
            r.on_frame(&key(), 1, 0, 0),
            Verdict::Stale,
            "below the oldest retained seq"
        );
    }
}
