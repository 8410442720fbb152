//! Where a subscription stands, to resume it on any ingest node without gap or duplicate,
//! early frames included (`SubscribeRequest.early`): the cursor of the last durable message,
//! and the provisional frames received and not yet confirmed, which a resumed subscription
//! declares as `held` so they are confirmed rather than sent again. Sans-IO.

use std::collections::{BTreeMap, BTreeSet};

use relay_proto::model::subscribe_request::Start;
use relay_proto::model::subscribe_response::Record;
use relay_proto::model::{HeldFrames, StreamRef, SubscribeRequest, SubscribeResponse};

/// Most held ranges a subscription request may carry (the ingest's bound).
pub const MAX_HELD_RANGES: usize = 4096;
/// Most held frames (the ingest's bound on unconfirmed frames per subscriber).
pub const MAX_HELD_FRAMES: usize = 16_384;

/// What one subscription message means for the subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// A data frame it did not have: use it (provisional or durable).
    NewFrame,
    /// A frame it had provisionally is durable now: nothing new to show.
    Confirmed,
    /// A confirmation of a frame it never had provisionally (it forgot it; see
    /// [`MAX_HELD_FRAMES`]): the frame itself was received before or is lost to this view.
    UnknownConfirmation,
    /// Anything else (descriptors, gaps, markers).
    Other,
}

/// A stream as held: vehicle, session, stream id (and its ref, for the request).
type HeldKey = (String, u64, u32);

/// A subscription's resume state.
#[derive(Debug, Default, Clone)]
pub struct Resume {
    cursor: Option<u64>,
    held: BTreeMap<HeldKey, (StreamRef, BTreeSet<u64>)>,
    held_frames: usize,
}

impl Resume {
    /// Takes one message in; says what it means.
    pub fn apply(&mut self, msg: &SubscribeResponse) -> Delivery {
        if !msg.provisional {
            self.cursor = Some(msg.cursor);
        }
        match &msg.record {
            Some(Record::Data(d)) if msg.provisional => {
                if let (Some(s), Some(f)) = (&d.stream, &d.frame)
                    && self.held_frames < MAX_HELD_FRAMES
                {
                    let key = (s.vehicle_id.clone(), s.session_id, s.stream_id);
                    let (_, seqs) = self
                        .held
                        .entry(key)
                        .or_insert_with(|| (s.clone(), BTreeSet::new()));
                    if seqs.insert(f.seq) {
                        self.held_frames += 1;
                    }
                }
                Delivery::NewFrame
            }
            // Durable in full although held (the ingest was not told, e.g. more held
            // ranges than a request carries): the frame confirms itself.
            Some(Record::Data(d)) => match (&d.stream, &d.frame) {
                (Some(s), Some(f)) if self.release(s, f.seq) => Delivery::Confirmed,
                _ => Delivery::NewFrame,
            },
            Some(Record::Confirmed(c)) => match &c.stream {
                Some(s) if self.release(s, c.seq) => Delivery::Confirmed,
                _ => Delivery::UnknownConfirmation,
            },
            _ => Delivery::Other,
        }
    }

    /// Forgets held frame `seq` of `s`; whether it was held.
    fn release(&mut self, s: &StreamRef, seq: u64) -> bool {
        let key = (s.vehicle_id.clone(), s.session_id, s.stream_id);
        let Some((_, seqs)) = self.held.get_mut(&key) else {
            return false;
        };
        if !seqs.remove(&seq) {
            return false;
        }
        self.held_frames -= 1;
        if seqs.is_empty() {
            self.held.remove(&key);
        }
        true
    }

    /// The cursor of the last durable message, if any arrived.
    pub fn cursor(&self) -> Option<u64> {
        self.cursor
    }

    /// Provisional frames held unconfirmed.
    pub fn held_frames(&self) -> usize {
        self.held_frames
    }

    /// The held frames as ranges, at most [`MAX_HELD_RANGES`] (beyond, the ingest sends the
    /// rest again in full, and [`Resume::apply`] recognises them as held).
    pub fn held_ranges(&self) -> Vec<HeldFrames> {
        let mut out = Vec::new();
        for (stream, seqs) in self.held.values() {
            let mut seqs = seqs.iter().copied();
            let Some(first) = seqs.next() else { continue };
            let (mut start, mut end) = (first, first + 1);
            for seq in seqs {
                if seq == end {
                    end += 1;
                } else {
                    out.push(range(stream, start, end));
                    (start, end) = (seq, seq + 1);
                }
            }
            out.push(range(stream, start, end));
        }
        out.truncate(MAX_HELD_RANGES);
        out
    }

    /// The request that continues this subscription: after the cursor with the held frames
    /// (early delivery on), or from `first` when nothing durable arrived yet.
    pub fn request(
        &self,
        vehicle_ids: Vec<String>,
        kinds: Vec<i32>,
        first: Start,
        early: bool,
    ) -> SubscribeRequest {
        SubscribeRequest {
            vehicle_ids,
            kinds,
            start: Some(self.cursor.map_or(first, Start::AfterCursor)),
            early,
            held: if early && self.cursor.is_some() {
                self.held_ranges()
            } else {
                Vec::new()
            },
        }
    }
}

fn range(stream: &StreamRef, start_seq: u64, end_seq: u64) -> HeldFrames {
    HeldFrames {
        stream: Some(stream.clone()),
        start_seq,
        end_seq,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_proto::model::{Confirmed, DataRecord, Frame, SyncMarker};

    fn stream(id: u32) -> StreamRef {
        StreamRef {
            vehicle_id: "amb-1".into(),
            session_id: 3,
            stream_id: id,
            kind: 0,
        }
    }

    fn data(id: u32, seq: u64, cursor: u64, provisional: bool) -> SubscribeResponse {
        SubscribeResponse {
            cursor,
            record: Some(Record::Data(DataRecord {
                stream: Some(stream(id)),
                frame: Some(Frame {
                    stream_id: id,
                    seq,
                    ..Default::default()
                }),
                ..Default::default()
            })),
            provisional,
        }
    }

    fn confirmed(id: u32, seq: u64, cursor: u64) -> SubscribeResponse {
        SubscribeResponse {
            cursor,
            record: Some(Record::Confirmed(Confirmed {
                stream: Some(stream(id)),
                seq,
                late: false,
            })),
            provisional: false,
        }
    }

    #[test]
    fn provisional_frames_are_held_until_confirmed_and_never_move_the_cursor() {
        let mut r = Resume::default();
        let sync = SubscribeResponse {
            cursor: 9,
            record: Some(Record::Sync(SyncMarker { backlog_records: 0 })),
            provisional: false,
        };
        assert_eq!(r.apply(&sync), Delivery::Other);
        for seq in [4, 5, 6, 9] {
            assert_eq!(r.apply(&data(1, seq, 0, true)), Delivery::NewFrame);
        }
        assert_eq!(r.cursor(), Some(9), "provisional: no resume point");
        assert_eq!(r.apply(&confirmed(1, 4, 10)), Delivery::Confirmed);
        assert_eq!(r.apply(&data(2, 1, 11, false)), Delivery::NewFrame);
        assert_eq!(r.cursor(), Some(11));
        assert_eq!(r.held_frames(), 3);
        let req = r.request(vec![], vec![], Start::Live(true), true);
        assert_eq!(req.start, Some(Start::AfterCursor(11)));
        let ranges: Vec<(u64, u64)> = req.held.iter().map(|h| (h.start_seq, h.end_seq)).collect();
        assert_eq!(ranges, [(5, 7), (9, 10)]);
        assert_eq!(r.apply(&confirmed(1, 4, 12)), Delivery::UnknownConfirmation);
        assert_eq!(
            r.apply(&data(1, 5, 13, false)),
            Delivery::Confirmed,
            "a held frame sent again in full is no new frame"
        );
        assert_eq!(r.held_frames(), 2);
    }

    #[test]
    fn a_fresh_subscription_starts_where_asked_and_declares_nothing() {
        let r = Resume::default();
        let req = r.request(vec!["amb-1".into()], vec![], Start::Live(true), true);
        assert_eq!(req.start, Some(Start::Live(true)));
        assert!(req.held.is_empty() && req.early);
    }

    #[test]
    fn held_frames_and_ranges_are_bounded() {
        let mut r = Resume::default();
        // Every other seq: one range per frame.
        for i in 0..(MAX_HELD_FRAMES as u64 + 10) {
            r.apply(&data(1, 2 * i, 0, true));
        }
        assert_eq!(r.held_frames(), MAX_HELD_FRAMES);
        assert_eq!(r.held_ranges().len(), MAX_HELD_RANGES);
    }
}
