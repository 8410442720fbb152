//! Index entries of committed records that are not in the index tables yet.
//!
//! Why: the frames of one commit come from about as many vehicles as it holds frames, and
//! the dedup and per-vehicle indexes are keyed by vehicle first, so writing them with every
//! commit rewrote (copy-on-write, checksummed, fsynced) one B-tree leaf of each index per
//! frame. Instead the vehicles are split into [`PARTITIONS`]; each commit writes the log and
//! the waiting index entries of the next partition in turn (see [`FlushScope`]), so a
//! vehicle's entries reach the index at most [`PARTITIONS`] commits later, many to a leaf. A
//! commit from few vehicles writes everything ([`FEW_VEHICLES`]). Until then the entries live
//! here, where readers look as well as in the tables. The log itself is committed before any
//! acknowledgement as before; the index is derived from it, and on open whatever the tables
//! lack is rebuilt from the log (see `indexed_below` in the embedded store).
//!
//! Memory is bounded by the writer's batch size: at most [`PARTITIONS`] commits' worth of
//! entries wait here.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use crate::reassembly::StreamKey;

/// Partitions of vehicles; a commit writes the waiting entries of the next one in turn that
/// holds any to the index.
pub(super) const PARTITIONS: usize = 64;

/// A commit holding frames of no more vehicles than this writes every waiting entry: with few
/// vehicles batching saves little, and entries held for rounds of commits made the ED view's
/// live latency tail longer (measured in the browser test; why was not found). It counts the
/// commit's own vehicles, which follow the load, not what waits (which a commit writing
/// everything would keep low for ever).
pub(super) const FEW_VEHICLES: usize = 4;

/// A frame of one vehicle: (session, stream, seq).
pub(super) type FrameOfVehicle = (u64, u32, u64);

/// Index entries of some committed records.
#[derive(Debug, Default, Clone)]
pub(super) struct Delta {
    /// Dedup entries: vehicle -> (session, stream, seq) -> cursor.
    pub frames: HashMap<Arc<str>, BTreeMap<FrameOfVehicle, u64>>,
    /// Per-vehicle log entries: vehicle -> (cursor, encoded length), cursors ascending.
    pub records: HashMap<Arc<str>, Vec<(u64, u64)>>,
    /// The lowest cursor any entry refers to.
    pub lowest: Option<u64>,
    /// Entries held (frames and records).
    pub entries: usize,
}

impl Delta {
    fn note_cursor(&mut self, cursor: u64) {
        self.lowest = Some(self.lowest.map_or(cursor, |l| l.min(cursor)));
    }

    /// A stored frame of `vehicle` at `cursor`.
    pub fn add_frame(&mut self, vehicle: &Arc<str>, frame: FrameOfVehicle, cursor: u64) {
        self.note_cursor(cursor);
        self.entries += 1;
        match self.frames.get_mut(&**vehicle) {
            Some(f) => {
                f.insert(frame, cursor);
            }
            None => {
                self.frames
                    .insert(vehicle.clone(), BTreeMap::from([(frame, cursor)]));
            }
        }
    }

    /// A record of `vehicle` at `cursor`, `len` bytes encoded.
    pub fn add_record(&mut self, vehicle: &Arc<str>, cursor: u64, len: u64) {
        self.note_cursor(cursor);
        self.entries += 1;
        match self.records.get_mut(&**vehicle) {
            Some(r) => r.push((cursor, len)),
            None => {
                self.records.insert(vehicle.clone(), vec![(cursor, len)]);
            }
        }
    }

    /// Cursor of a frame, if this delta holds it.
    pub fn cursor_of(&self, vehicle: &str, frame: FrameOfVehicle) -> Option<u64> {
        self.frames.get(vehicle)?.get(&frame).copied()
    }

    /// Vehicles with entries here.
    pub fn vehicles(&self) -> usize {
        self.frames.len().max(self.records.len())
    }

    /// Adds `newer`'s entries (of records committed after this delta's).
    fn absorb(&mut self, newer: Delta) {
        for (vehicle, frames) in newer.frames {
            self.frames.entry(vehicle).or_default().extend(frames);
        }
        for (vehicle, records) in newer.records {
            self.records.entry(vehicle).or_default().extend(records);
        }
        if let Some(l) = newer.lowest {
            self.note_cursor(l);
        }
        self.entries += newer.entries;
    }
}

/// The partition of a vehicle: stable across runs and processes (SipHash with fixed keys).
pub(super) fn partition_of(vehicle: &str) -> usize {
    let mut h = DefaultHasher::new();
    vehicle.hash(&mut h);
    (h.finish() % PARTITIONS as u64) as usize
}

#[derive(Debug, Default)]
struct Part {
    /// Entries of commits since this partition was last written to the index.
    filling: Delta,
    /// Entries being written to the index by the open write transaction.
    flushing: Option<Arc<Delta>>,
}

/// Which partitions a commit writes to the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FlushScope {
    /// The next one in turn that holds entries (empty ones are passed over). Only one, so a
    /// partition gathers up to [`PARTITIONS`] commits' entries of its few vehicles, many to
    /// a leaf; taking more per commit drains them to a leaf per frame again.
    Next,
    /// All (before retention, which deletes through the index).
    All,
}

/// Entries not in the index tables yet, by partition. One writer (the thread that commits),
/// any number of readers; callers hold it behind a mutex, briefly.
#[derive(Debug)]
pub(super) struct Deferred {
    parts: Vec<Part>,
    /// The partition the next [`FlushScope::Next`] writes.
    turn: usize,
}

impl Default for Deferred {
    fn default() -> Self {
        Self {
            parts: (0..PARTITIONS).map(|_| Part::default()).collect(),
            turn: 0,
        }
    }
}

/// What a commit writes to the index, taken out of [`Deferred`] until the commit's outcome.
#[derive(Debug)]
pub(super) struct Flush {
    /// The partitions taken.
    pub parts: Vec<usize>,
    /// Their entries.
    pub deltas: Vec<Arc<Delta>>,
    /// Every record below this cursor is indexed once the commit succeeds, as far as the
    /// entries of other partitions are concerned (the caller also accounts for its own
    /// batch).
    pub others_lowest: Option<u64>,
}

impl Deferred {
    fn parts_of(&self, vehicle: &str) -> &Part {
        &self.parts[partition_of(vehicle)]
    }

    /// Cursor of a frame waiting here, if any.
    pub fn cursor_of(&self, vehicle: &str, frame: FrameOfVehicle) -> Option<u64> {
        let part = self.parts_of(vehicle);
        part.filling
            .cursor_of(vehicle, frame)
            .or_else(|| part.flushing.as_ref()?.cursor_of(vehicle, frame))
    }

    /// The waiting frames of one stream: seq -> cursor.
    pub fn frames_of_stream(&self, stream: &StreamKey) -> BTreeMap<u64, u64> {
        let part = self.parts_of(&stream.vehicle);
        let (s, id) = (stream.session, stream.stream_id);
        let mut out = BTreeMap::new();
        for delta in part.flushing.iter().map(|d| &**d).chain([&part.filling]) {
            if let Some(frames) = delta.frames.get(&*stream.vehicle) {
                out.extend(
                    frames
                        .range((s, id, 0)..=(s, id, u64::MAX))
                        .map(|(k, c)| (k.2, *c)),
                );
            }
        }
        out
    }

    /// Every waiting frame, ordered as the dedup table is: ((vehicle, session, stream, seq),
    /// cursor).
    pub fn all_frames(&self) -> Vec<((Arc<str>, FrameOfVehicle), u64)> {
        let mut out = Vec::new();
        for part in &self.parts {
            for delta in part.flushing.iter().map(|d| &**d).chain([&part.filling]) {
                for (vehicle, frames) in &delta.frames {
                    out.extend(frames.iter().map(|(f, c)| ((vehicle.clone(), *f), *c)));
                }
            }
        }
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        out.dedup_by(|a, b| a.0 == b.0);
        out
    }

    /// Takes the partitions `scope` names for writing to the index; readers still see them
    /// until [`Deferred::finish`].
    pub fn start(&mut self, scope: FlushScope) -> Flush {
        // `finish` and `abort` both clear `flushing`, so only `filling` holds entries here.
        let held = |part: &Part| part.filling.entries;
        let parts: Vec<usize> = match scope {
            FlushScope::Next => {
                // The turn moves at least one partition a commit: each is written at least
                // once every PARTITIONS commits.
                let mut parts = Vec::new();
                for _ in 0..PARTITIONS {
                    let p = self.turn;
                    self.turn = (self.turn + 1) % PARTITIONS;
                    if held(&self.parts[p]) > 0 {
                        parts.push(p);
                        break;
                    }
                }
                parts
            }
            FlushScope::All => (0..PARTITIONS)
                .filter(|&p| held(&self.parts[p]) > 0)
                .collect(),
        };
        let mut deltas = Vec::with_capacity(parts.len());
        for &p in &parts {
            let part = &mut self.parts[p];
            let taken = Arc::new(std::mem::take(&mut part.filling));
            part.flushing = Some(taken.clone());
            deltas.push(taken);
        }
        let others_lowest = self
            .parts
            .iter()
            .enumerate()
            .filter(|(p, _)| !parts.contains(p))
            .filter_map(|(_, part)| part.filling.lowest)
            .min();
        Flush {
            parts,
            deltas,
            others_lowest,
        }
    }

    /// The commit holding `flush` succeeded: its entries are in the tables. `committed`
    /// (the entries of the batch that commit held) waits for its partitions' turns.
    pub fn finish(&mut self, flush: Flush, committed: Delta) {
        for p in flush.parts {
            self.parts[p].flushing = None;
        }
        for (vehicle, frames) in committed.frames {
            let part = &mut self.parts[partition_of(&vehicle)].filling;
            if let Some(&lowest) = frames.values().min() {
                part.note_cursor(lowest);
            }
            part.entries += frames.len();
            part.frames.entry(vehicle).or_default().extend(frames);
        }
        for (vehicle, records) in committed.records {
            let part = &mut self.parts[partition_of(&vehicle)].filling;
            if let Some(&(lowest, _)) = records.first() {
                part.note_cursor(lowest);
            }
            part.entries += records.len();
            part.records.entry(vehicle).or_default().extend(records);
        }
    }

    /// The commit holding `flush` failed: its entries wait again (nothing of the failed
    /// batch was committed, so nothing of it is added).
    pub fn abort(&mut self, flush: Flush) {
        for p in flush.parts {
            let part = &mut self.parts[p];
            if let Some(old) = part.flushing.take() {
                let mut merged = Arc::unwrap_or_clone(old);
                merged.absorb(std::mem::take(&mut part.filling));
                part.filling = merged;
            }
        }
    }

    /// Entries waiting (for tests and bounds).
    #[cfg(test)]
    pub fn waiting_frames(&self) -> usize {
        self.all_frames().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entries in a test partition.
    const MANY: usize = 512;

    fn key(v: &Arc<str>, stream_id: u32) -> StreamKey {
        StreamKey {
            vehicle: v.clone(),
            session: 1,
            stream_id,
        }
    }

    /// Vehicles landing in two different partitions.
    fn two_vehicles() -> (Arc<str>, Arc<str>) {
        let a: Arc<str> = "amb-0".into();
        let b = (1..1000)
            .map(|i| Arc::<str>::from(format!("amb-{i}")))
            .find(|b| partition_of(b) != partition_of(&a))
            .unwrap();
        (a, b)
    }

    #[test]
    fn every_partition_is_written_once_per_round_and_readers_see_entries_until_then() {
        let (a, b) = two_vehicles();
        let mut d = Deferred::default();
        let mut batch = Delta::default();
        batch.add_frame(&a, (1, 0, 7), 10);
        batch.add_record(&a, 10, 100);
        batch.add_frame(&b, (1, 0, 3), 11);
        batch.add_record(&b, 11, 100);
        let f = d.start(FlushScope::Next);
        assert!(f.deltas.is_empty(), "nothing waited yet");
        d.finish(f, batch);
        assert_eq!(d.cursor_of(&a, (1, 0, 7)), Some(10));
        assert_eq!(d.cursor_of(&b, (1, 0, 3)), Some(11));
        assert_eq!(d.cursor_of(&b, (1, 0, 4)), None);
        assert_eq!(d.frames_of_stream(&key(&a, 0)), BTreeMap::from([(7, 10)]));
        assert!(d.frames_of_stream(&key(&a, 1)).is_empty());

        // One round of turns writes each vehicle's entries exactly once.
        let mut written = Vec::new();
        for _ in 0..PARTITIONS {
            let f = d.start(FlushScope::Next);
            for delta in &f.deltas {
                written.extend(delta.frames.keys().cloned());
                // While the commit runs, readers still find them.
                for (v, frames) in &delta.frames {
                    for (fr, c) in frames {
                        assert_eq!(d.cursor_of(v, *fr), Some(*c));
                    }
                }
            }
            d.finish(f, Delta::default());
        }
        written.sort();
        let mut both = vec![a.clone(), b.clone()];
        both.sort();
        assert_eq!(written, both);
        assert_eq!(d.waiting_frames(), 0);
        assert_eq!(d.cursor_of(&a, (1, 0, 7)), None);
    }

    #[test]
    fn a_failed_flush_keeps_its_entries_waiting_and_reports_the_lowest_cursor_left() {
        let (a, b) = two_vehicles();
        let mut d = Deferred::default();
        let mut batch = Delta::default();
        batch.add_frame(&a, (1, 0, 1), 5);
        // Enough of b's that not all is written at once.
        let n = MANY as u64;
        for seq in 1..=n {
            batch.add_frame(&b, (1, 0, seq), 5 + seq);
        }
        let f = d.start(FlushScope::Next);
        d.finish(f, batch);
        let f = d.start(FlushScope::All);
        assert_eq!(f.deltas.len(), 2);
        assert_eq!(f.others_lowest, None, "all taken");
        d.abort(f);
        assert_eq!(d.waiting_frames(), 1 + MANY);
        assert_eq!(d.cursor_of(&b, (1, 0, 1)), Some(6));
        // Taking only a's partition leaves b's lowest cursor as the bound.
        d.turn = partition_of(&a);
        let f = d.start(FlushScope::Next);
        assert_eq!(f.others_lowest, Some(6));
        d.finish(f, Delta::default());
        assert_eq!(d.cursor_of(&a, (1, 0, 1)), None);
        assert_eq!(d.all_frames().len(), MANY);
    }

    /// Adds committed entries without writing any.
    fn commit_entries(d: &mut Deferred, batch: Delta) {
        let nothing = Flush {
            parts: Vec::new(),
            deltas: Vec::new(),
            others_lowest: None,
        };
        d.finish(nothing, batch);
    }

    #[test]
    fn a_commit_passes_over_empty_partitions_and_takes_one() {
        let (a, b) = two_vehicles();
        let mut d = Deferred::default();
        let many = MANY as u64;
        let mut batch = Delta::default();
        for seq in 0..many {
            batch.add_frame(&a, (1, 0, seq), seq);
            batch.add_frame(&b, (1, 0, seq), 100_000 + seq);
        }
        commit_entries(&mut d, batch);
        // The first partition holding entries, however far the turn has to go; only it.
        let f = d.start(FlushScope::Next);
        assert_eq!(f.parts.len(), 1);
        assert_eq!(f.deltas[0].entries, MANY);
        d.finish(f, Delta::default());
        assert_eq!(d.waiting_frames(), MANY);
        let f = d.start(FlushScope::Next);
        assert_eq!(f.parts.len(), 1);
        d.finish(f, Delta::default());
        assert_eq!(d.waiting_frames(), 0);
        // Nothing waiting: nothing taken.
        let f = d.start(FlushScope::Next);
        assert!(f.parts.is_empty() && f.deltas.is_empty());
    }

    /// The point of deferring: under a steady fleet, a commit writes the entries of few
    /// vehicles (many entries each), and what waits stays within PARTITIONS commits' worth.
    #[test]
    fn under_a_steady_fleet_a_commit_writes_few_vehicles_and_what_waits_is_bounded() {
        let vehicles: Vec<Arc<str>> = (0..100).map(|i| format!("amb-{i}").into()).collect();
        let mut d = Deferred::default();
        let (per_commit, commits) = (17_u64, 3_000_u64);
        let (mut written_vehicles, mut written_entries, mut most_waiting) = (0, 0, 0);
        let mut cursor = 0;
        for commit in 0..commits {
            let mut batch = Delta::default();
            for _ in 0..per_commit {
                // A fixed scatter of vehicles over commits (no two frames share a cursor).
                let v = &vehicles[((cursor * 37 + commit * 11) % 100) as usize];
                batch.add_frame(v, (1, 0, cursor), cursor);
                batch.add_record(v, cursor, 100);
                cursor += 1;
            }
            let f = d.start(FlushScope::Next);
            if commit >= 2 * PARTITIONS as u64 {
                for delta in &f.deltas {
                    written_vehicles += delta.vehicles();
                    written_entries += delta.entries;
                }
            }
            d.finish(f, batch);
            most_waiting = most_waiting.max(d.waiting_frames());
        }
        let measured = (commits - 2 * PARTITIONS as u64) as f64;
        let vehicles_per_commit = written_vehicles as f64 / measured;
        let entries_per_commit = written_entries as f64 / measured;
        // 100 vehicles over 64 partitions: about 1.6 a partition, each with a round's entries.
        assert!(
            vehicles_per_commit < 3.0,
            "{vehicles_per_commit} vehicles a commit"
        );
        // The index keeps pace with the log (2 entries a frame).
        assert!(
            (entries_per_commit - 2.0 * per_commit as f64).abs() < 2.0,
            "{entries_per_commit} entries a commit"
        );
        assert!(most_waiting <= PARTITIONS * per_commit as usize);
    }

    #[test]
    fn all_frames_come_in_index_order() {
        let (a, b) = two_vehicles();
        let mut d = Deferred::default();
        let mut batch = Delta::default();
        batch.add_frame(&b, (2, 0, 1), 1);
        batch.add_frame(&a, (1, 1, 9), 2);
        batch.add_frame(&a, (1, 0, 30), 3);
        batch.add_frame(&a, (1, 0, 4), 4);
        let f = d.start(FlushScope::Next);
        d.finish(f, batch);
        let keys: Vec<_> = d.all_frames().into_iter().map(|(k, _)| k).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        assert_eq!(keys.len(), 4);
    }
}
