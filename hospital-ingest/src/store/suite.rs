//! The store suite: one set of cases every [`LogStore`](super::LogStore) backend must pass.
//! Each case takes `open`, which returns a handle on one and the same store every time it is
//! called (a second call is a reopen: a restarted ingest). The embedded backend runs it in
//! its unit tests ([`crate::store_suite`]), the JetStream backend against a real 3-node
//! cluster in the end-to-end tests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::sync::Arc;

use prost::Message as _;
use relay_proto::model::{StreamInfo, SubscribeResponse, subscribe_response::Record};

use super::{Declared, History, SeqRef, Store, WriteBatch};
use crate::reassembly::StreamKey;

/// See the name.
pub fn a_session_keeps_the_descriptors_of_its_first_declaration(open: &mut dyn FnMut() -> Store) {
    use relay_proto::model::StreamRef;
    let store = open();
    let info = |stream_id: u32, name: &str| StreamInfo {
        stream: Some(StreamRef {
            vehicle_id: "amb-1".into(),
            session_id: 1,
            stream_id,
            kind: 3,
        }),
        descriptor: Some(relay_proto::model::StreamDescriptor {
            stream_id,
            kind: 3,
            name: name.into(),
            waveform: None,
        }),
    };
    let mut b = store.begin().unwrap();
    assert_eq!(
        b.classify_stream(&info(0, "vitals")).unwrap(),
        Declared::New
    );
    assert!(b.put_stream(&info(0, "vitals"), 1).unwrap());
    assert_eq!(
        b.classify_stream(&info(0, "vitals")).unwrap(),
        Declared::Same
    );
    assert_eq!(
        b.classify_stream(&info(0, "other")).unwrap(),
        Declared::Conflict
    );
    assert_eq!(
        b.classify_stream(&info(1, "extra")).unwrap(),
        Declared::Conflict
    );
    assert!(
        !b.put_stream(&info(0, "other"), 2).unwrap(),
        "never rewritten"
    );
    b.commit().unwrap();
    let stored = store.streams().unwrap();
    let name = stored[0].descriptor.as_ref().map(|d| d.name.clone());
    assert_eq!(name.as_deref(), Some("vitals"));
}

/// Whether frame `seq` of amb-1's stream 0 (session 1) is stored, as `b` sees it.
fn stored(b: &WriteBatch, seq: u64) -> bool {
    b.contains(SeqRef {
        vehicle: "amb-1",
        session: 1,
        stream_id: 0,
        seq,
    })
    .unwrap()
}
use relay_proto::model::{DataRecord, Frame, StreamRef};

pub fn data(vehicle: &str, seq: u64, received: i64) -> SubscribeResponse {
    SubscribeResponse {
        cursor: 0,
        provisional: false,
        record: Some(Record::Data(DataRecord {
            stream: Some(StreamRef {
                vehicle_id: vehicle.into(),
                session_id: 1,
                stream_id: 0,
                kind: 2,
            }),
            frame: Some(Frame {
                stream_id: 0,
                seq,
                capture_time_ns: 0,
                payload: None,
            }),
            late: false,
            received_time_ns: received,
            ..DataRecord::default()
        })),
    }
}

/// See the name.
pub fn appends_survive_reopen_and_dedup_index_is_kept(open: &mut dyn FnMut() -> Store) {
    let v: Arc<str> = "amb-1".into();
    {
        let store = open();
        let mut b = store.begin().unwrap();
        for seq in [0, 1, 3] {
            let r = SeqRef {
                vehicle: &v,
                session: 1,
                stream_id: 0,
                seq,
            };
            b.append(&v, 2, data(&v, seq, 10), Some(r)).unwrap();
        }
        let appended = b.commit().unwrap();
        assert_eq!(
            appended.iter().map(|e| e.cursor).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        // An uncommitted batch leaves no trace.
        let mut b = store.begin().unwrap();
        b.append(&v, 2, data(&v, 4, 10), None).unwrap();
        drop(b);
    }
    let store = open();
    assert_eq!(store.head().unwrap(), 3);
    let b = store.begin().unwrap();
    assert!(stored(&b, 3));
    assert!(!stored(&b, 2));
    drop(b);
    // The store itself (what early delivery asks) says the same.
    let at = |seq| SeqRef {
        vehicle: "amb-1",
        session: 1,
        stream_id: 0,
        seq,
    };
    assert!(store.stored(at(3)).unwrap() && !store.stored(at(2)).unwrap());
    let page = store.read_after(1, 3, 10).unwrap();
    assert_eq!(
        page.iter().map(|(c, m)| (*c, m.cursor)).collect::<Vec<_>>(),
        vec![(2, 2), (3, 3)]
    );
    let streams = store.stored_streams(16).unwrap();
    assert_eq!(streams.len(), 1);
    assert_eq!(streams[0].next_seq, 4, "seqs 0, 1, 3 stored");
    assert_eq!(Vec::from(streams[0].holes.clone()), vec![(2, 3)]);
    assert_eq!(streams[0].last_cursor, 3);
    assert!(
        store.stored_streams(0).unwrap()[0].holes.is_empty(),
        "holes bounded"
    );
}

/// See the name.
pub fn the_cursor_before_a_receipt_time_is_found_by_binary_search(open: &mut dyn FnMut() -> Store) {
    let store = open();
    assert_eq!(store.cursor_before_received(5).unwrap(), 0, "empty");
    // Cursors 1..=100 received at 10, 20, ..., 1000, with non-data records among them.
    for i in 1..=100u64 {
        fill(&store, "amb-1", i, 1, i as i64 * 10);
        if i % 7 == 0 {
            let mut b = store.begin().unwrap();
            b.append(
                &Arc::from("amb-1"),
                2,
                SubscribeResponse {
                    cursor: 0,
                    record: Some(Record::Sync(Default::default())),
                    ..Default::default()
                },
                None,
            )
            .unwrap();
            b.commit().unwrap();
        }
    }
    let received = |c: u64| match store.record(c).unwrap().and_then(|m| m.record) {
        Some(Record::Data(d)) => Some(d.received_time_ns),
        _ => None,
    };
    for at in [0i64, 10, 11, 500, 505, 1000, 1001] {
        let after = store.cursor_before_received(at).unwrap();
        // Nothing after it was received earlier; the record at it (if data) was.
        let head = store.head().unwrap();
        for c in after + 1..=head {
            assert!(received(c).is_none_or(|r| r >= at), "at {at}: cursor {c}");
        }
        if let Some(r) = received(after) {
            assert!(r < at, "at {at}: starts too early at {after}");
        }
    }
    assert_eq!(
        store.cursor_before_received(i64::MAX).unwrap(),
        store.head().unwrap()
    );
}

/// See the name.
pub fn history_returns_a_time_range_of_one_stream_with_its_holes_and_bounds(
    open: &mut dyn FnMut() -> Store,
) {
    let store = open();
    let key = StreamKey {
        vehicle: "amb-1".into(),
        session: 1,
        stream_id: 0,
    };
    // Frames every 40 ms from seq 0 to 99, 50..=54 never stored; another stream between.
    let mut b = store.begin().unwrap();
    for seq in (0..100u64).filter(|s| !(50..55).contains(s)) {
        for stream_id in [0u32, 1] {
            let mut msg = data(&key.vehicle, seq, 0);
            if let Some(Record::Data(d)) = msg.record.as_mut() {
                d.stream.as_mut().unwrap().stream_id = stream_id;
                let f = d.frame.as_mut().unwrap();
                f.stream_id = stream_id;
                f.capture_time_ns = seq as i64 * 40;
            }
            let r = SeqRef {
                vehicle: &key.vehicle,
                session: 1,
                stream_id,
                seq,
            };
            b.append(&key.vehicle, 2, msg, Some(r)).unwrap();
        }
    }
    b.commit().unwrap();
    let seqs = |h: &History| -> Vec<u64> {
        h.records
            .iter()
            .map(|d| d.frame.as_ref().unwrap().seq)
            .collect()
    };
    // 1,000..2,000: frames 25..=49 and the frame in progress at 1,000 (seq 25 starts
    // exactly there, so none before it).
    let h = store.history(&key, 1000, 2000, 1000, usize::MAX).unwrap();
    assert_eq!(seqs(&h), (25..50).collect::<Vec<_>>());
    assert!(!h.truncated && h.missing.is_empty());
    assert!(
        h.records
            .iter()
            .all(|d| d.stream.as_ref().unwrap().stream_id == 0)
    );
    // 1,010..: begins with seq 25, in progress at 1,010; across the hole.
    let h = store.history(&key, 1010, 2400, 1000, usize::MAX).unwrap();
    assert_eq!(seqs(&h).first(), Some(&25));
    assert_eq!(seqs(&h).last(), Some(&59));
    assert_eq!(h.missing.len(), 1);
    let gap = &h.missing[0];
    assert_eq!((gap.start_seq, gap.end_seq), (50, 55));
    assert_eq!((gap.start_time_ns, gap.end_time_ns), (49 * 40, 55 * 40));
    // Bounded by count and by bytes.
    let h = store.history(&key, 0, i64::MAX, 10, usize::MAX).unwrap();
    assert_eq!((seqs(&h), h.truncated), ((0..10).collect(), true));
    let h = store.history(&key, 0, i64::MAX, 1000, 1).unwrap();
    assert_eq!((h.records.len(), h.truncated), (1, true));
    // Outside what is stored: nothing; an unknown stream: nothing.
    assert!(
        store
            .history(&key, 10_000, 20_000, 10, usize::MAX)
            .unwrap()
            .records
            .is_empty()
    );
    let other = StreamKey {
        stream_id: 7,
        ..key.clone()
    };
    assert!(
        store
            .history(&other, 0, i64::MAX, 10, usize::MAX)
            .unwrap()
            .records
            .is_empty()
    );
}

/// See the name.
pub fn retention_deletes_oldest_by_age_and_size(open: &mut dyn FnMut() -> Store) {
    let store = open();
    let v: Arc<str> = "amb-1".into();
    let mut b = store.begin().unwrap();
    for seq in 0..10 {
        let r = SeqRef {
            vehicle: &v,
            session: 1,
            stream_id: 0,
            seq,
        };
        b.append(&v, 2, data(&v, seq, seq as i64 * 100), Some(r))
            .unwrap();
    }
    b.commit().unwrap();
    let deleted = store
        .enforce_retention(300, u64::MAX, u64::MAX, 1000)
        .unwrap()
        .deleted;
    assert_eq!(deleted, 3);
    assert_eq!(store.log_len().unwrap(), 7);
    let b = store.begin().unwrap();
    assert!(!stored(&b, 2));
    drop(b);
    let mut largest = data(&v, 9, 900);
    largest.cursor = 10;
    let one = largest.encode_to_vec().len() as u64;
    let r = store.enforce_retention(0, 2 * one, u64::MAX, 1000).unwrap();
    assert_eq!(r.deleted, 5);
    assert!(r.bytes_left <= 2 * one);
    assert_eq!(store.read_after(0, u64::MAX, 10).unwrap()[0].0, 9);
}

/// Appends `n` frames of `vehicle` (seqs from `first`) received at `received`.
pub fn fill(store: &Store, vehicle: &str, first: u64, n: u64, received: i64) {
    let v: Arc<str> = vehicle.into();
    let mut b = store.begin().unwrap();
    for seq in first..first + n {
        let r = SeqRef {
            vehicle: &v,
            session: 1,
            stream_id: 0,
            seq,
        };
        b.append(&v, 2, data(&v, seq, received), Some(r)).unwrap();
    }
    b.commit().unwrap();
}

pub fn seqs_of(store: &Store, vehicle: &str) -> Vec<u64> {
    store
        .read_after(0, u64::MAX, 1000)
        .unwrap()
        .into_iter()
        .filter_map(|(_, m)| match m.record {
            Some(Record::Data(d)) if d.stream.as_ref()?.vehicle_id == vehicle => Some(d.frame?.seq),
            _ => None,
        })
        .collect()
}

/// See the name.
pub fn a_vehicle_over_its_quota_loses_its_own_oldest_records_not_others(
    open: &mut dyn FnMut() -> Store,
) {
    let store = open();
    let one = {
        let mut m = data("amb-1", 99, 1);
        m.cursor = 99;
        m.encode_to_vec().len() as u64
    };
    // amb-2 stored first (oldest), then amb-1 floods.
    fill(&store, "amb-2", 0, 5, 1);
    fill(&store, "amb-1", 0, 50, 2);
    let out = store
        .enforce_retention(0, u64::MAX, 10 * one, 10_000)
        .unwrap();
    assert_eq!(out.vehicles_over_quota, vec!["amb-1".to_owned()]);
    assert_eq!(out.deleted, out.deleted_over_quota);
    assert_eq!(seqs_of(&store, "amb-2"), (0..5).collect::<Vec<_>>());
    let kept = seqs_of(&store, "amb-1");
    assert!(kept.len() <= 10 && kept.len() >= 9, "{kept:?}");
    assert_eq!(kept.last(), Some(&49), "the newest are kept");
    // A deleted frame is forgotten by the dedup index, a kept one is not.
    let b = store.begin().unwrap();
    let amb1: Arc<str> = "amb-1".into();
    let seen = |seq| {
        b.contains(SeqRef {
            vehicle: &amb1,
            session: 1,
            stream_id: 0,
            seq,
        })
        .unwrap()
    };
    assert!(!seen(0) && seen(49));
    drop(b);
    // The global bound still deletes oldest first, and keeps the per-vehicle totals right.
    let r = store
        .enforce_retention(0, 8 * one, 10 * one, 10_000)
        .unwrap();
    assert!(r.bytes_left <= 8 * one);
    assert!(seqs_of(&store, "amb-2").is_empty(), "oldest first globally");
    assert!(r.vehicles_over_quota.is_empty());
    // Reopened (the index is durable), a second flood is cut back to the quota again.
    drop(store);
    let store = open();
    fill(&store, "amb-1", 50, 20, 3);
    let r = store
        .enforce_retention(0, u64::MAX, 10 * one, 10_000)
        .unwrap();
    assert!(r.deleted_over_quota >= 15, "{r:?}");
    assert!(seqs_of(&store, "amb-1").len() <= 10);
}

/// See the name.
pub fn streams_without_data_are_forgotten_after_retention(open: &mut dyn FnMut() -> Store) {
    let store = open();
    let v: Arc<str> = "amb-1".into();
    let info = |session| StreamInfo {
        stream: Some(StreamRef {
            vehicle_id: "amb-1".into(),
            session_id: session,
            stream_id: 0,
            kind: 2,
        }),
        descriptor: None,
    };
    let mut b = store.begin().unwrap();
    assert!(b.put_stream(&info(1), 100).unwrap());
    assert!(
        !b.put_stream(&info(1), 100).unwrap(),
        "unchanged descriptor"
    );
    b.put_stream(&info(2), 100).unwrap();
    b.put_stream(&info(3), 900).unwrap();
    let r = SeqRef {
        vehicle: &v,
        session: 2,
        stream_id: 0,
        seq: 0,
    };
    let mut frame = data(&v, 0, 1_000);
    if let Some(Record::Data(d)) = frame.record.as_mut() {
        d.stream.as_mut().unwrap().session_id = 2;
    }
    b.append(&v, 2, frame, Some(r)).unwrap();
    b.commit().unwrap();
    let out = store
        .enforce_retention(500, u64::MAX, u64::MAX, 1000)
        .unwrap();
    // Session 1: declared long ago, no data: forgotten. Session 2: has data. Session 3: recent.
    let pruned: Vec<u64> = out.pruned_streams.iter().map(|k| k.session).collect();
    assert_eq!(pruned, vec![1]);
    let left: Vec<u64> = store
        .streams()
        .unwrap()
        .iter()
        .map(|s| s.stream.as_ref().unwrap().session_id)
        .collect();
    assert_eq!(left, vec![2, 3]);

    // A vehicle silent for the window and without streams is forgotten too.
    let mut b = store.begin().unwrap();
    b.touch_vehicle("amb-1", 100).unwrap();
    b.touch_vehicle("amb-old", 100).unwrap();
    b.commit().unwrap();
    store
        .enforce_retention(500, u64::MAX, u64::MAX, 1000)
        .unwrap();
    let ids: Vec<String> = store
        .vehicles()
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(ids, vec!["amb-1"], "amb-1 still has streams");
}

/// One batch larger than a JetStream atomic batch may be (1,000 messages) commits whole,
/// with contiguous cursors, and is read back in order in pages.
pub fn a_large_batch_commits_whole_in_order(open: &mut dyn FnMut() -> Store) {
    let store = open();
    let v: Arc<str> = "amb-1".into();
    let mut b = store.begin().unwrap();
    for seq in 0..2_500u64 {
        let r = SeqRef {
            vehicle: &v,
            session: 1,
            stream_id: 0,
            seq,
        };
        b.append(&v, 2, data(&v, seq, 7), Some(r)).unwrap();
    }
    let appended = b.commit().unwrap();
    let cursors: Vec<u64> = appended.iter().map(|e| e.cursor).collect();
    assert_eq!(cursors, (1..=2_500).collect::<Vec<_>>());
    assert_eq!(store.head().unwrap(), 2_500);
    assert_eq!(store.log_len().unwrap(), 2_500);
    let page = store.read_after(0, 2_500, 10_000).unwrap();
    assert_eq!(page.len(), 2_500);
    assert!(
        page.iter()
            .enumerate()
            .all(|(i, (c, m))| *c == i as u64 + 1 && m.cursor == *c)
    );
    assert_eq!(
        seqs_of(&store, "amb-1").len(),
        1_000,
        "seqs_of reads one page of 1,000"
    );
    let tail = store.read_after(2_400, 2_450, 10).unwrap();
    assert_eq!(tail.first().map(|(c, _)| *c), Some(2_401));
    assert_eq!(tail.len(), 10);
    drop(store);
    let store = open();
    let s = store.stored_streams(16).unwrap();
    assert_eq!(s.len(), 1);
    assert_eq!((s[0].next_seq, s[0].last_cursor), (2_500, 2_500));
    assert!(s[0].holes.is_empty());
    let b = store.begin().unwrap();
    assert!(stored(&b, 0) && stored(&b, 2_499) && !stored(&b, 2_500));
}

/// A quota sweep's effect on the dedup index is the same in memory and after a reopen.
pub fn what_retention_deleted_stays_deleted_after_a_reopen(open: &mut dyn FnMut() -> Store) {
    let store = open();
    let one = {
        let mut m = data("amb-1", 99, 1);
        m.cursor = 99;
        m.encode_to_vec().len() as u64
    };
    // Frames 0..20 in order, then 30..40, then 20..30 late (the hole filled).
    fill(&store, "amb-1", 0, 20, 1);
    fill(&store, "amb-1", 30, 10, 1);
    fill(&store, "amb-1", 20, 10, 1);
    let out = store
        .enforce_retention(0, u64::MAX, 25 * one, 1_000)
        .unwrap();
    assert!(out.deleted_over_quota >= 15, "{out:?}");
    let kept = seqs_of(&store, "amb-1");
    let seen = |store: &Store| -> Vec<u64> {
        let b = store.begin().unwrap();
        (0..40).filter(|&s| stored(&b, s)).collect()
    };
    let mut sorted = kept.clone();
    sorted.sort_unstable();
    assert_eq!(
        seen(&store),
        sorted,
        "the index holds exactly what the log holds"
    );
    drop(store);
    let store = open();
    assert_eq!(seen(&store), sorted, "and so after a reopen");
    let s = store.stored_streams(16).unwrap();
    assert_eq!(s[0].next_seq, 40);
}

/// One case: given a way to open (and reopen) the store under test, it panics on failure.
pub type Case = fn(&mut dyn FnMut() -> Store);

/// Every case, by name.
pub const CASES: &[(&str, Case)] = &[
    (
        "a_session_keeps_the_descriptors_of_its_first_declaration",
        a_session_keeps_the_descriptors_of_its_first_declaration,
    ),
    (
        "appends_survive_reopen_and_dedup_index_is_kept",
        appends_survive_reopen_and_dedup_index_is_kept,
    ),
    (
        "the_cursor_before_a_receipt_time_is_found_by_binary_search",
        the_cursor_before_a_receipt_time_is_found_by_binary_search,
    ),
    (
        "history_returns_a_time_range_of_one_stream_with_its_holes_and_bounds",
        history_returns_a_time_range_of_one_stream_with_its_holes_and_bounds,
    ),
    (
        "retention_deletes_oldest_by_age_and_size",
        retention_deletes_oldest_by_age_and_size,
    ),
    (
        "a_vehicle_over_its_quota_loses_its_own_oldest_records_not_others",
        a_vehicle_over_its_quota_loses_its_own_oldest_records_not_others,
    ),
    (
        "streams_without_data_are_forgotten_after_retention",
        streams_without_data_are_forgotten_after_retention,
    ),
    (
        "a_large_batch_commits_whole_in_order",
        a_large_batch_commits_whole_in_order,
    ),
    (
        "what_retention_deleted_stays_deleted_after_a_reopen",
        what_retention_deleted_stays_deleted_after_a_reopen,
    ),
];

/// Generates one `#[test]` per suite case, each opening stores with `$factory` (an
/// expression giving a fresh `FnMut() -> Store` per case).
#[macro_export]
macro_rules! store_suite {
    ($factory:expr) => {
        #[test]
        fn a_session_keeps_the_descriptors_of_its_first_declaration() {
            let mut open = $factory;
            $crate::store::suite::a_session_keeps_the_descriptors_of_its_first_declaration(&mut open);
        }
        #[test]
        fn appends_survive_reopen_and_dedup_index_is_kept() {
            let mut open = $factory;
            $crate::store::suite::appends_survive_reopen_and_dedup_index_is_kept(&mut open);
        }
        #[test]
        fn the_cursor_before_a_receipt_time_is_found_by_binary_search() {
            let mut open = $factory;
            $crate::store::suite::the_cursor_before_a_receipt_time_is_found_by_binary_search(&mut open);
        }
        #[test]
        fn history_returns_a_time_range_of_one_stream_with_its_holes_and_bounds() {
            let mut open = $factory;
            $crate::store::suite::history_returns_a_time_range_of_one_stream_with_its_holes_and_bounds(&mut open);
        }
        #[test]
        fn retention_deletes_oldest_by_age_and_size() {
            let mut open = $factory;
            $crate::store::suite::retention_deletes_oldest_by_age_and_size(&mut open);
        }
        #[test]
        fn a_vehicle_over_its_quota_loses_its_own_oldest_records_not_others() {
            let mut open = $factory;
            $crate::store::suite::a_vehicle_over_its_quota_loses_its_own_oldest_records_not_others(&mut open);
        }
        #[test]
        fn streams_without_data_are_forgotten_after_retention() {
            let mut open = $factory;
            $crate::store::suite::streams_without_data_are_forgotten_after_retention(&mut open);
        }
        #[test]
        fn a_large_batch_commits_whole_in_order() {
            let mut open = $factory;
            $crate::store::suite::a_large_batch_commits_whole_in_order(&mut open);
        }
        #[test]
        fn what_retention_deleted_stays_deleted_after_a_reopen() {
            let mut open = $factory;
            $crate::store::suite::what_retention_deleted_stays_deleted_after_a_reopen(&mut open);
        }
    };
}

#[cfg(test)]
mod tests {
    /// Every case is listed in [`super::CASES`] and in the macro (so both backends run it).
    #[test]
    fn every_case_is_run_by_both_backends() {
        let source = include_str!("suite.rs");
        let cases: Vec<&str> = source
            .split("\npub fn ")
            .skip(1)
            .filter(|f| {
                f.split('{')
                    .next()
                    .is_some_and(|sig| sig.contains("open: &mut dyn FnMut() -> Store"))
            })
            .filter_map(|f| f.split('(').next())
            .collect();
        assert!(cases.len() >= 9, "{cases:?}");
        for c in &cases {
            assert!(
                super::CASES.iter().any(|(name, _)| name == c),
                "{c} missing from CASES"
            );
            assert!(
                source.contains(&format!("$crate::store::suite::{c}(&mut open)")),
                "{c} missing from store_suite!"
            );
        }
        assert_eq!(super::CASES.len(), cases.len());
    }
}
