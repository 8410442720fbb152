//! The embedded backend: redb in one file. An append-only log keyed by cursor plus the
//! dedup, stream, vehicle and per-vehicle quota tables, all updated in one transaction.
//!
//! Why redb: pure Rust (no C toolchain on the ingest host), ACID transactions with
//! copy-on-write B-trees and checksummed commits, so a crash or power cut leaves the last
//! committed state; one writer and many concurrent readers, which is exactly our shape (one
//! writer thread, one reader per subscriber). The ingest acknowledges a frame only after the
//! transaction holding it has committed with `Durability::Immediate` (fsync).
//!
//! The dedup and per-vehicle indexes are derived from the log and written a partition of
//! vehicles per commit ([`deferred`]); `indexed_below` in META tells from where a reopen
//! rebuilds what they lack.

mod deferred;

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use relay_proto::model::{DataRecord, StreamInfo, SubscribeResponse, subscribe_response::Record};

use super::{
    Declared, History, LogEntry, LogStore, RetentionOutcome, SeqRef, StoreBatch, StoreError,
    StoredStream, record_scope,
};
use crate::reassembly::StreamKey;
use deferred::{Deferred, Delta, Flush, FlushScope};

/// cursor -> encoded SubscribeResponse (with its cursor set).
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
/// (vehicle, session, stream, seq) -> cursor of the stored frame.
const SEEN: TableDefinition<(&str, u64, u32, u64), u64> = TableDefinition::new("seen");
/// (vehicle, session, stream) -> encoded StreamInfo.
const STREAMS: TableDefinition<(&str, u64, u32), &[u8]> = TableDefinition::new("streams");
/// (vehicle, session, stream) -> last time the stream was declared (Hello), UTC ns.
const STREAM_DECLARED: TableDefinition<(&str, u64, u32), i64> =
    TableDefinition::new("stream_declared");
/// vehicle -> last time anything was received, UTC ns.
const VEHICLES: TableDefinition<&str, i64> = TableDefinition::new("vehicles");
/// counters: "next_cursor", "log_bytes", "vehicle_index" (1 once the two tables below exist
/// for every record), "indexed_below" (every record below this cursor is in SEEN,
/// VEHICLE_LOG and VEHICLE_BYTES; records from it on may be, each at most once).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// (vehicle, cursor) -> encoded length: each vehicle's records, oldest first.
const VEHICLE_LOG: TableDefinition<(&str, u64), u64> = TableDefinition::new("vehicle_log");
/// vehicle -> bytes of log it holds.
const VEHICLE_BYTES: TableDefinition<&str, u64> = TableDefinition::new("vehicle_bytes");

/// Records [`Store::cursor_before_received`] looks past a probe for a data record.
const RECEIVED_PROBE: usize = 256;

/// Page cache of [`Store::open`] (as `store.cache_bytes`' default).
pub const DEFAULT_CACHE_BYTES: usize = 256 * 1024 * 1024;

#[derive(Debug, Clone)]
/// The embedded store: cheap to clone, one writer, any number of readers.
pub struct EmbeddedStore {
    db: Arc<Database>,
    /// Index entries of committed records not in the index tables yet.
    deferred: Arc<Mutex<Deferred>>,
}

/// The waiting index entries; a panic elsewhere while holding them leaves them usable (every
/// change to them is a single insert or swap).
fn lock(deferred: &Mutex<Deferred>) -> MutexGuard<'_, Deferred> {
    deferred.lock().unwrap_or_else(PoisonError::into_inner)
}

impl EmbeddedStore {
    /// Opens (or creates) the store and its tables, with the default page cache.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(path, DEFAULT_CACHE_BYTES)
    }

    /// Opens (or creates) the store at `path`, caching at most `cache_bytes` of its pages.
    pub fn open_with_cache(path: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
        // Patient data: owner-only file in an owner-only directory, from the start.
        relay_ops::private::prepare_file(path).map_err(|source| StoreError::Io {
            path: path.to_owned(),
            source,
        })?;
        let db = redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create(path)?;
        let txn = db.begin_write()?;
        {
            txn.open_table(LOG)?;
            txn.open_table(SEEN)?;
            txn.open_table(STREAMS)?;
            txn.open_table(STREAM_DECLARED)?;
            txn.open_table(VEHICLES)?;
            txn.open_table(VEHICLE_LOG)?;
            txn.open_table(VEHICLE_BYTES)?;
            let mut meta = txn.open_table(META)?;
            // A store from before per-vehicle quotas: index what it holds, once.
            if meta.get("vehicle_index")?.is_none() {
                let log = txn.open_table(LOG)?;
                let mut index = txn.open_table(VEHICLE_LOG)?;
                let mut totals = txn.open_table(VEHICLE_BYTES)?;
                for item in log.iter()? {
                    let (k, v) = item?;
                    let Ok(msg) = SubscribeResponse::decode(v.value()) else {
                        continue; // corrupt: retention deletes it globally, oldest first
                    };
                    if let Some((vehicle, _)) = record_scope(&msg) {
                        let len = v.value().len() as u64;
                        index.insert((vehicle, k.value()), len)?;
                        let before = totals.get(vehicle)?.map_or(0, |b| b.value());
                        totals.insert(vehicle, before + len)?;
                    }
                }
                meta.insert("vehicle_index", 1)?;
            }
            // Index what the last run committed to the log but not yet to the indexes. A
            // store from before deferred indexing has it all.
            let next = meta.get("next_cursor")?.map_or(1, |v| v.value());
            let below = meta.get("indexed_below")?.map_or(next, |v| v.value());
            if below < next {
                index_from(&txn, below)?;
            }
            meta.insert("indexed_below", next)?;
        }
        txn.commit()?;
        Ok(Self {
            db: Arc::new(db),
            deferred: Arc::default(),
        })
    }

    /// Overwrites the log record at `cursor` with bytes that do not decode, as a damaged disk
    /// would; tests use it to see how readers fail.
    #[cfg(test)]
    pub(crate) fn damage_record_for_tests(&self, cursor: u64) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut log = txn.open_table(LOG)?;
            log.insert(cursor, &[0xff_u8, 0xff, 0xff][..])?;
        }
        txn.commit()?;
        Ok(())
    }
}

/// Indexes the log records from `from` on that the index tables lack.
fn index_from(txn: &redb::WriteTransaction, from: u64) -> Result<(), StoreError> {
    let log = txn.open_table(LOG)?;
    let mut seen = txn.open_table(SEEN)?;
    let mut index = txn.open_table(VEHICLE_LOG)?;
    let mut totals = txn.open_table(VEHICLE_BYTES)?;
    for item in log.range(from..)? {
        let (k, v) = item?;
        let cursor = k.value();
        let Ok(msg) = SubscribeResponse::decode(v.value()) else {
            continue; // corrupt: retention deletes it globally, oldest first
        };
        if let Some(Record::Data(d)) = &msg.record
            && let (Some(s), Some(f)) = (&d.stream, &d.frame)
        {
            seen.insert(
                (s.vehicle_id.as_str(), s.session_id, s.stream_id, f.seq),
                cursor,
            )?;
        }
        // Its partition may have been written: count its bytes once.
        if let Some((vehicle, _)) = record_scope(&msg)
            && index.get((vehicle, cursor))?.is_none()
        {
            let len = v.value().len() as u64;
            index.insert((vehicle, cursor), len)?;
            let before = totals.get(vehicle)?.map_or(0, |b| b.value());
            totals.insert(vehicle, before + len)?;
        }
    }
    Ok(())
}

/// Writes waiting index entries to the index tables.
fn write_index(txn: &redb::WriteTransaction, deltas: &[Arc<Delta>]) -> Result<(), StoreError> {
    if deltas.is_empty() {
        return Ok(());
    }
    let mut seen = txn.open_table(SEEN)?;
    for delta in deltas {
        for (vehicle, frames) in &delta.frames {
            for (&(session, stream_id, seq), &cursor) in frames {
                seen.insert((&**vehicle, session, stream_id, seq), cursor)?;
            }
        }
    }
    let mut by_vehicle = txn.open_table(VEHICLE_LOG)?;
    let mut added: HashMap<&str, u64> = HashMap::new();
    for delta in deltas {
        for (vehicle, records) in &delta.records {
            for &(cursor, len) in records {
                by_vehicle.insert((&**vehicle, cursor), len)?;
                *added.entry(vehicle).or_default() += len;
            }
        }
    }
    let mut totals = txn.open_table(VEHICLE_BYTES)?;
    for (vehicle, len) in added {
        let before = totals.get(vehicle)?.map_or(0, |b| b.value());
        totals.insert(vehicle, before + len)?;
    }
    Ok(())
}

/// Two ascending runs of (seq, cursor), from the index table and from the entries still
/// waiting, as one; a seq in both comes once.
fn merge_ascending<E>(
    table: impl Iterator<Item = Result<(u64, u64), E>>,
    waiting: impl Iterator<Item = (u64, u64)>,
) -> impl Iterator<Item = Result<(u64, u64), E>> {
    let mut table = table.peekable();
    let mut waiting = waiting.peekable();
    std::iter::from_fn(move || {
        // Some(None): an error comes next from the table.
        let head = match table.peek() {
            None => None,
            Some(Ok((seq, _))) => Some(Some(*seq)),
            Some(Err(_)) => Some(None),
        };
        match (head, waiting.peek().map(|w| w.0)) {
            (Some(Some(t)), Some(w)) if w < t => waiting.next().map(Ok),
            (Some(Some(t)), Some(w)) if w == t => {
                waiting.next();
                table.next()
            }
            (Some(_), _) => table.next(),
            (None, _) => waiting.next().map(Ok),
        }
    })
}

/// Adds a stored seq to what a restarted reassembler resumes: past the end it extends the
/// stream (a hole before it if it skips seqs), inside a hole it fills that seq.
fn note_stored(s: &mut StoredStream, seq: u64, cursor: u64, max_holes: usize) {
    if seq >= s.next_seq {
        if seq > s.next_seq {
            s.holes.push_back((s.next_seq, seq));
        }
        s.next_seq = seq + 1;
        s.last_cursor = cursor;
    } else if let Some(i) = s.holes.iter().position(|&(a, b)| a <= seq && seq < b) {
        let (a, b) = s.holes[i];
        s.holes.remove(i);
        if seq + 1 < b {
            s.holes.insert(i, (seq + 1, b));
        }
        if a < seq {
            s.holes.insert(i, (a, seq));
        }
    }
    while s.holes.len() > max_holes {
        s.holes.pop_front();
    }
}

impl LogStore for EmbeddedStore {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    fn begin(&self) -> Result<Box<dyn StoreBatch>, StoreError> {
        let txn = self.db.begin_write()?;
        let (next_cursor, log_bytes) = {
            let meta = txn.open_table(META)?;
            let next = meta.get("next_cursor")?.map_or(1, |v| v.value());
            let bytes = meta.get("log_bytes")?.map_or(0, |v| v.value());
            (next, bytes)
        };
        Ok(Box::new(EmbeddedBatch {
            txn,
            next_cursor,
            log_bytes,
            appended: Vec::new(),
            encoded: Vec::new(),
            fresh: Delta::default(),
            deferred: self.deferred.clone(),
        }))
    }

    fn stored(&self, r: SeqRef<'_>) -> Result<bool, StoreError> {
        // Waiting entries first: one leaving them is in the table by then.
        let frame = (r.session, r.stream_id, r.seq);
        if lock(&self.deferred).cursor_of(r.vehicle, frame).is_some() {
            return Ok(true);
        }
        let txn = self.db.begin_read()?;
        let seen = txn.open_table(SEEN)?;
        Ok(seen
            .get((r.vehicle, r.session, r.stream_id, r.seq))?
            .is_some())
    }

    /// Cursor of the newest record (0 when empty).
    fn head(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        let log = txn.open_table(LOG)?;
        Ok(log.last()?.map_or(0, |(k, _)| k.value()))
    }

    /// Up to `limit` records with cursor in `(after, up_to]`, oldest first.
    fn read_after(
        &self,
        after: u64,
        up_to: u64,
        limit: usize,
    ) -> Result<Vec<(u64, SubscribeResponse)>, StoreError> {
        let txn = self.db.begin_read()?;
        let log = txn.open_table(LOG)?;
        let mut out = Vec::new();
        if after >= up_to {
            return Ok(out);
        }
        for item in log.range(after + 1..=up_to)?.take(limit) {
            let (k, v) = item?;
            let cursor = k.value();
            let msg = SubscribeResponse::decode(v.value())
                .map_err(|source| StoreError::Corrupt { cursor, source })?;
            out.push((cursor, msg));
        }
        Ok(out)
    }

    /// A cursor after which lie all records received at or after `at_ns` (ingest clock): a
    /// binary search over the received times data records carry, in one read transaction.
    /// Receipt order follows cursor order up to the writer's batching (milliseconds), so
    /// callers ask with a margin and filter what they get.
    fn cursor_before_received(&self, at_ns: i64) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        let log = txn.open_table(LOG)?;
        let (Some(first), Some(last)) = (log.first()?, log.last()?) else {
            return Ok(0);
        };
        let (first, last) = (first.0.value(), last.0.value());
        // The first data record at or after cursor `c` (looking a bounded way ahead; none
        // found counts as "received later", which only makes the start earlier).
        let received_from = |c: u64| -> Result<Option<(u64, i64)>, StoreError> {
            for item in log.range(c..=last)?.take(RECEIVED_PROBE) {
                let (k, v) = item?;
                let cursor = k.value();
                let msg = SubscribeResponse::decode(v.value())
                    .map_err(|source| StoreError::Corrupt { cursor, source })?;
                if let Some(Record::Data(d)) = msg.record {
                    return Ok(Some((cursor, d.received_time_ns)));
                }
            }
            Ok(None)
        };
        super::search_received(first, last, at_ns, received_from)
    }

    /// Every stream announcement stored.
    fn streams(&self) -> Result<Vec<StreamInfo>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(STREAMS)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (_, v) = item?;
            if let Ok(info) = StreamInfo::decode(v.value()) {
                out.push(info);
            }
        }
        Ok(out)
    }

    /// Every vehicle seen, with the last time anything arrived from it (UTC ns).
    fn vehicles(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(VEHICLES)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (k, v) = item?;
            out.push((k.value().to_owned(), v.value()));
        }
        Ok(out)
    }

    /// What the reassembler needs of each stream after a restart, computed in one pass over
    /// the dedup index without holding every seq in memory: the high-water mark, the holes
    /// between stored seqs (the newest `max_holes` of them) and the cursor of the highest.
    fn stored_streams(&self, max_holes: usize) -> Result<Vec<StoredStream>, StoreError> {
        let waiting = lock(&self.deferred).all_frames();
        let txn = self.db.begin_read()?;
        let t = txn.open_table(SEEN)?;
        let mut out: Vec<StoredStream> = Vec::new();
        for item in t.iter()? {
            let (k, v) = item?;
            let (vehicle, session, stream_id, seq) = k.value();
            let same = out.last().is_some_and(|s| {
                &*s.key.vehicle == vehicle
                    && s.key.session == session
                    && s.key.stream_id == stream_id
            });
            if !same {
                let key = StreamKey {
                    vehicle: vehicle.into(),
                    session,
                    stream_id,
                };
                out.push(StoredStream {
                    key,
                    next_seq: seq,
                    holes: VecDeque::new(),
                    last_cursor: 0,
                });
            }
            if let Some(s) = out.last_mut() {
                note_stored(s, seq, v.value(), max_holes);
            }
        }
        // `out` is in key order, as the table; so is `waiting`.
        for ((vehicle, (session, stream_id, seq)), cursor) in waiting {
            let key = StreamKey {
                vehicle,
                session,
                stream_id,
            };
            let i = match out.binary_search_by(|s| s.key.cmp(&key)) {
                Ok(i) => i,
                Err(i) => {
                    out.insert(
                        i,
                        StoredStream {
                            key,
                            next_seq: seq,
                            holes: VecDeque::new(),
                            last_cursor: 0,
                        },
                    );
                    i
                }
            };
            note_stored(&mut out[i], seq, cursor, max_holes);
        }
        Ok(out)
    }

    /// A binary search over the stream's sequence numbers finds the start (capture times
    /// grow with them at the source).
    fn history(
        &self,
        stream: &StreamKey,
        from_ns: i64,
        to_ns: i64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<History, StoreError> {
        let waiting = lock(&self.deferred).frames_of_stream(stream);
        let txn = self.db.begin_read()?;
        let seen = txn.open_table(SEEN)?;
        let log = txn.open_table(LOG)?;
        let (v, s, id) = (&*stream.vehicle, stream.session, stream.stream_id);
        // Stored (seq, cursor) from `seq` on: the table's and the waiting entries.
        let stored_from = |seq: u64| -> Result<_, StoreError> {
            let table = seen
                .range((v, s, id, seq)..=(v, s, id, u64::MAX))?
                .map(|item| item.map(|(k, c)| (k.value().3, c.value())));
            let waiting = waiting.range(seq..).map(|(&q, &c)| (q, c));
            Ok(merge_ascending(table, waiting))
        };
        let data_at = |cursor: u64| -> Result<Option<DataRecord>, StoreError> {
            let Some(bytes) = log.get(cursor)? else {
                return Ok(None); // deleted by retention
            };
            let msg = SubscribeResponse::decode(bytes.value())
                .map_err(|source| StoreError::Corrupt { cursor, source })?;
            Ok(match msg.record {
                Some(Record::Data(d)) => Some(d),
                _ => None,
            })
        };
        let capture = super::capture_ns;
        // The first stored seq at or after `seq`, with its record.
        let first_from = |seq: u64| -> Result<Option<(u64, DataRecord)>, StoreError> {
            for item in stored_from(seq)? {
                let (seq, cursor) = item?;
                if let Some(d) = data_at(cursor)? {
                    return Ok(Some((seq, d)));
                }
            }
            Ok(None)
        };
        // Invariant: every stored seq below `lo` was captured before `from_ns`; the first
        // stored seq at or after `hi` (if any) at or after it.
        let (mut lo, mut hi) = (0u64, u64::MAX);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match first_from(mid)? {
                Some((seq, d)) if capture(&d) < from_ns => lo = seq.saturating_add(1),
                _ => hi = mid,
            }
        }
        // From the last stored frame before `lo`: it may be in progress at `from_ns`.
        let in_table = match seen.range((v, s, id, 0)..(v, s, id, lo))?.next_back() {
            Some(item) => Some(item?.0.value().3),
            None => None,
        };
        let waiting_before = waiting.range(..lo).next_back().map(|(&q, _)| q);
        let start = in_table.max(waiting_before).unwrap_or(lo);
        let frames = stored_from(start)?.filter_map(|item| {
            let frame = item
                .map_err(StoreError::from)
                .and_then(|(seq, cursor)| Ok(data_at(cursor)?.map(|d| (seq, d))));
            frame.transpose()
        });
        super::history_from(frames, from_ns, to_ns, max_records, max_bytes)
    }

    /// The announcement of one stream, if it is known.
    fn stream_info(&self, stream: &StreamKey) -> Result<Option<StreamInfo>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(STREAMS)?;
        let key = (&*stream.vehicle, stream.session, stream.stream_id);
        match t.get(key)? {
            Some(v) => Ok(StreamInfo::decode(v.value()).ok()),
            None => Ok(None),
        }
    }

    /// The record at `cursor`, if it is still kept.
    fn record(&self, cursor: u64) -> Result<Option<SubscribeResponse>, StoreError> {
        let txn = self.db.begin_read()?;
        let log = txn.open_table(LOG)?;
        match log.get(cursor)? {
            Some(v) => Ok(Some(
                SubscribeResponse::decode(v.value())
                    .map_err(|source| StoreError::Corrupt { cursor, source })?,
            )),
            None => Ok(None),
        }
    }

    /// Deletes each vehicle's oldest records while it holds more than `max_bytes_per_vehicle`
    /// (so one vehicle cannot push out other patients' data), then the oldest records while
    /// they are older than `min_received_ns` or the log is larger than `max_bytes`, at most
    /// `max_deletes` in all. Then forgets streams that hold no data any more and were last
    /// declared before `min_received_ns` (so descriptors do not pile up over agent sessions).
    /// Descriptors of streams with data left stay, so what remains can be interpreted.
    fn enforce_retention(
        &self,
        min_received_ns: i64,
        max_bytes: u64,
        max_bytes_per_vehicle: u64,
        max_deletes: usize,
    ) -> Result<RetentionOutcome, StoreError> {
        let txn = self.db.begin_write()?;
        // Deletes go through the index: all of it first.
        let flush = lock(&self.deferred).start(FlushScope::All);
        let outcome = write_index(&txn, &flush.deltas)
            .and_then(|()| {
                let mut meta = txn.open_table(META)?;
                let next = meta.get("next_cursor")?.map_or(1, |v| v.value());
                meta.insert("indexed_below", next)?;
                Ok(())
            })
            .and_then(|()| {
                retain(
                    &txn,
                    min_received_ns,
                    max_bytes,
                    max_bytes_per_vehicle,
                    max_deletes,
                )
            })
            .and_then(|out| Ok(txn.commit().map(|()| out)?));
        let mut deferred = lock(&self.deferred);
        match outcome {
            Ok(out) => {
                deferred.finish(flush, Delta::default());
                Ok(out)
            }
            Err(e) => {
                deferred.abort(flush);
                Err(e)
            }
        }
    }

    /// Records in the log.
    fn log_len(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(LOG)?.len()?)
    }
}

/// [`LogStore::enforce_retention`] within `txn`, with the index complete.
fn retain(
    txn: &redb::WriteTransaction,
    min_received_ns: i64,
    max_bytes: u64,
    max_bytes_per_vehicle: u64,
    max_deletes: usize,
) -> Result<RetentionOutcome, StoreError> {
    let mut out = RetentionOutcome::default();
    {
        let mut meta = txn.open_table(META)?;
        let mut log = Deleter {
            log: txn.open_table(LOG)?,
            seen: txn.open_table(SEEN)?,
            index: txn.open_table(VEHICLE_LOG)?,
            totals: txn.open_table(VEHICLE_BYTES)?,
            bytes: meta.get("log_bytes")?.map_or(0, |v| v.value()),
        };
        let mut over_quota = Vec::new();
        for item in log.totals.iter()? {
            let (k, v) = item?;
            if v.value() > max_bytes_per_vehicle {
                over_quota.push(k.value().to_owned());
            }
        }
        for vehicle in over_quota {
            let v = vehicle.as_str();
            let before = out.deleted_over_quota;
            while out.deleted < max_deletes as u64
                && log.totals.get(v)?.map_or(0, |b| b.value()) > max_bytes_per_vehicle
            {
                let oldest = match log.index.range((v, 0)..=(v, u64::MAX))?.next() {
                    Some(entry) => {
                        let (k, len) = entry?;
                        Some((k.value().1, len.value()))
                    }
                    None => None,
                };
                let Some((cursor, len)) = oldest else { break };
                if !log.delete(cursor)? {
                    // Indexed but gone (a corrupt record retention already removed).
                    log.index.remove((v, cursor))?;
                    log.subtract(v, len)?;
                }
                out.deleted += 1;
                out.deleted_over_quota += 1;
            }
            if out.deleted_over_quota > before {
                out.vehicles_over_quota.push(vehicle);
            }
        }
        while out.deleted < max_deletes as u64 {
            let Some((k, v)) = log.log.first()? else {
                break;
            };
            let cursor = k.value();
            let msg = SubscribeResponse::decode(v.value()).ok();
            drop((k, v));
            let received = match msg.as_ref().and_then(|m| m.record.as_ref()) {
                Some(Record::Data(d)) => d.received_time_ns,
                _ => i64::MIN,
            };
            let too_old = received < min_received_ns;
            if !too_old && log.bytes <= max_bytes {
                break;
            }
            log.delete(cursor)?;
            out.deleted += 1;
        }
        meta.insert("log_bytes", log.bytes)?;
        out.bytes_left = log.bytes;
        let Deleter { seen, .. } = log;

        let mut declared = txn.open_table(STREAM_DECLARED)?;
        let mut streams = txn.open_table(STREAMS)?;
        let mut stale = Vec::new();
        for item in declared.iter()? {
            let (k, v) = item?;
            let (vehicle, session, stream_id) = k.value();
            if v.value() >= min_received_ns {
                continue;
            }
            let has_data = seen
                .range((vehicle, session, stream_id, 0)..=(vehicle, session, stream_id, u64::MAX))?
                .next()
                .is_some();
            if !has_data {
                stale.push(StreamKey {
                    vehicle: vehicle.into(),
                    session,
                    stream_id,
                });
            }
        }
        for key in &stale {
            declared.remove((&*key.vehicle, key.session, key.stream_id))?;
            streams.remove((&*key.vehicle, key.session, key.stream_id))?;
        }
        out.pruned_streams = stale;

        // Vehicles silent for the whole retention window and without streams left.
        let mut vehicles = txn.open_table(VEHICLES)?;
        let mut silent = Vec::new();
        for item in vehicles.iter()? {
            let (k, v) = item?;
            let id = k.value();
            let has_streams = streams
                .range((id, 0, 0)..=(id, u64::MAX, u32::MAX))?
                .next()
                .is_some();
            if v.value() < min_received_ns && !has_streams {
                silent.push(id.to_owned());
            }
        }
        for id in silent {
            vehicles.remove(id.as_str())?;
        }
    }
    Ok(out)
}

/// The tables a deleted record must leave, in one retention transaction.
struct Deleter<'t> {
    log: redb::Table<'t, u64, &'static [u8]>,
    seen: redb::Table<'t, (&'static str, u64, u32, u64), u64>,
    index: redb::Table<'t, (&'static str, u64), u64>,
    totals: redb::Table<'t, &'static str, u64>,
    /// Bytes of log.
    bytes: u64,
}

impl Deleter<'_> {
    /// Deletes the record at `cursor` with its dedup and vehicle index entries; false when
    /// there was none.
    fn delete(&mut self, cursor: u64) -> Result<bool, StoreError> {
        let Some(v) = self.log.remove(cursor)? else {
            return Ok(false);
        };
        let len = v.value().len() as u64;
        let msg = SubscribeResponse::decode(v.value()).ok();
        drop(v);
        self.bytes = self.bytes.saturating_sub(len);
        let Some(msg) = msg else { return Ok(true) };
        if let Some(Record::Data(d)) = &msg.record
            && let (Some(s), Some(f)) = (&d.stream, &d.frame)
        {
            self.seen
                .remove((s.vehicle_id.as_str(), s.session_id, s.stream_id, f.seq))?;
        }
        if let Some((vehicle, _)) = record_scope(&msg) {
            self.index.remove((vehicle, cursor))?;
            self.subtract(vehicle, len)?;
        }
        Ok(true)
    }

    /// Takes `len` bytes off `vehicle`'s total (forgetting it at zero).
    fn subtract(&mut self, vehicle: &str, len: u64) -> Result<(), StoreError> {
        let left = self
            .totals
            .get(vehicle)?
            .map_or(0, |b| b.value())
            .saturating_sub(len);
        if left == 0 {
            self.totals.remove(vehicle)?;
        } else {
            self.totals.insert(vehicle, left)?;
        }
        Ok(())
    }
}

/// One write transaction; nothing is visible or durable before `commit`.
struct EmbeddedBatch {
    txn: redb::WriteTransaction,
    next_cursor: u64,
    log_bytes: u64,
    appended: Vec<LogEntry>,
    /// The encoded records of `appended`, inserted at commit: the log table is opened once a
    /// batch instead of once a record (opening one looks it up in redb's table tree).
    encoded: Vec<Vec<u8>>,
    /// Index entries of `appended`: they wait in `deferred` once committed; `contains`
    /// looks here first.
    fresh: Delta,
    /// The store's waiting index entries.
    deferred: Arc<Mutex<Deferred>>,
}

impl std::fmt::Debug for EmbeddedBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteBatch")
            .field("next_cursor", &self.next_cursor)
            .finish()
    }
}

impl StoreBatch for EmbeddedBatch {
    /// Whether this frame is stored (in this transaction or before).
    fn contains(&self, r: SeqRef<'_>) -> Result<bool, StoreError> {
        let frame = (r.session, r.stream_id, r.seq);
        if self.fresh.cursor_of(r.vehicle, frame).is_some()
            || lock(&self.deferred).cursor_of(r.vehicle, frame).is_some()
        {
            return Ok(true);
        }
        let seen = self.txn.open_table(SEEN)?;
        Ok(seen
            .get((r.vehicle, r.session, r.stream_id, r.seq))?
            .is_some())
    }

    /// Appends `message` to the log (assigning its cursor); `seq` marks a stored frame.
    fn append(
        &mut self,
        vehicle: &Arc<str>,
        kind: i32,
        mut message: SubscribeResponse,
        seq: Option<SeqRef<'_>>,
    ) -> Result<u64, StoreError> {
        let cursor = self.next_cursor;
        self.next_cursor += 1;
        message.cursor = cursor;
        let bytes = message.encode_to_vec();
        let len = bytes.len() as u64;
        self.log_bytes += len;
        self.encoded.push(bytes);
        let owned = |id: &str| {
            if id == &**vehicle {
                vehicle.clone()
            } else {
                Arc::from(id)
            }
        };
        if let Some(r) = seq {
            let frame = (r.session, r.stream_id, r.seq);
            self.fresh.add_frame(&owned(r.vehicle), frame, cursor);
        }
        if let Some((owner, _)) = record_scope(&message) {
            self.fresh.add_record(&owned(owner), cursor, len);
        }
        self.appended.push(LogEntry {
            cursor,
            vehicle: vehicle.clone(),
            kind,
            message,
        });
        Ok(cursor)
    }

    /// How a stream declaration relates to what the store holds of its session.
    fn classify_stream(&self, info: &StreamInfo) -> Result<Declared, StoreError> {
        let Some(s) = &info.stream else {
            return Ok(Declared::Same);
        };
        let key = (s.vehicle_id.as_str(), s.session_id, s.stream_id);
        let t = self.txn.open_table(STREAMS)?;
        if let Some(old) = t.get(key)? {
            return Ok(if old.value() == info.encode_to_vec().as_slice() {
                Declared::Same
            } else {
                Declared::Conflict
            });
        }
        // A stream the session's first Hello did not declare.
        let first = (s.vehicle_id.as_str(), s.session_id, 0);
        let last = (s.vehicle_id.as_str(), s.session_id, u32::MAX);
        Ok(if t.range(first..=last)?.next().is_some() {
            Declared::Conflict
        } else {
            Declared::New
        })
    }

    /// Whether the session of this stream has no stream stored yet (its first Hello).
    fn session_is_new(&self, info: &StreamInfo) -> Result<bool, StoreError> {
        let Some(s) = &info.stream else {
            return Ok(false);
        };
        let t = self.txn.open_table(STREAMS)?;
        let first = (s.vehicle_id.as_str(), s.session_id, 0);
        let last = (s.vehicle_id.as_str(), s.session_id, u32::MAX);
        Ok(t.range(first..=last)?.next().is_none())
    }

    /// Records a stream declaration the caller classified as new or the same; a stored
    /// descriptor is never rewritten. True when it was new.
    fn put_stream(&mut self, info: &StreamInfo, now_ns: i64) -> Result<bool, StoreError> {
        let Some(s) = &info.stream else {
            return Ok(false);
        };
        let key = (s.vehicle_id.as_str(), s.session_id, s.stream_id);
        self.txn.open_table(STREAM_DECLARED)?.insert(key, now_ns)?;
        let mut t = self.txn.open_table(STREAMS)?;
        if t.get(key)?.is_some() {
            return Ok(false);
        }
        t.insert(key, info.encode_to_vec().as_slice())?;
        Ok(true)
    }

    /// Records that something arrived from `vehicle` at `now_ns`.
    fn touch_vehicle(&mut self, vehicle: &str, now_ns: i64) -> Result<(), StoreError> {
        self.txn.open_table(VEHICLES)?.insert(vehicle, now_ns)?;
        Ok(())
    }

    /// Commits durably and returns what was appended, in cursor order: the log, and the
    /// waiting index entries of the next partition in turn that holds any (all of them for
    /// a commit from few vehicles).
    fn commit(self: Box<Self>) -> Result<Vec<LogEntry>, StoreError> {
        let batch = *self;
        let scope = if batch.fresh.vehicles() <= deferred::FEW_VEHICLES {
            FlushScope::All
        } else {
            FlushScope::Next
        };
        let flush = lock(&batch.deferred).start(scope);
        let written = batch.write(&flush).and_then(|()| Ok(batch.txn.commit()?));
        let mut deferred = lock(&batch.deferred);
        match written {
            Ok(()) => {
                deferred.finish(flush, batch.fresh);
                Ok(batch.appended)
            }
            Err(e) => {
                deferred.abort(flush);
                Err(e)
            }
        }
    }
}

impl EmbeddedBatch {
    /// Everything but the commit itself.
    fn write(&self, flush: &Flush) -> Result<(), StoreError> {
        {
            // Cursors ascend: the log's B-tree grows at its end.
            let mut log = self.txn.open_table(LOG)?;
            for (entry, bytes) in self.appended.iter().zip(&self.encoded) {
                log.insert(entry.cursor, bytes.as_slice())?;
            }
        }
        write_index(&self.txn, &flush.deltas)?;
        let indexed_below = [flush.others_lowest, self.fresh.lowest]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(self.next_cursor);
        let mut meta = self.txn.open_table(META)?;
        meta.insert("next_cursor", self.next_cursor)?;
        meta.insert("log_bytes", self.log_bytes)?;
        meta.insert("indexed_below", indexed_below)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    #[cfg(unix)]
    #[test]
    fn the_store_is_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data/relay.redb");
        drop(Store::open(&path).unwrap());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.path().join("data")), 0o700);
    }

    use crate::store::suite::{fill, seqs_of};

    #[test]
    fn a_store_from_before_quotas_is_indexed_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let embedded = EmbeddedStore::open(&path).unwrap();
        let store = Store::new(embedded.clone());
        fill(&store, "amb-1", 0, 20, 1);
        fill(&store, "amb-2", 0, 2, 2);
        // Forget the index, as a store written by an older ingest would lack it.
        let txn = embedded.db.begin_write().unwrap();
        txn.delete_table(VEHICLE_LOG).unwrap();
        txn.delete_table(VEHICLE_BYTES).unwrap();
        txn.open_table(META)
            .unwrap()
            .remove("vehicle_index")
            .unwrap();
        txn.commit().unwrap();
        drop((store, embedded));
        let store = Store::open(&path).unwrap();
        let one = store.read_after(0, 1, 1).unwrap()[0].1.encoded_len() as u64;
        let r = store
            .enforce_retention(0, u64::MAX, 5 * one, 10_000)
            .unwrap();
        assert_eq!(r.vehicles_over_quota, vec!["amb-1".to_owned()]);
        assert!(seqs_of(&store, "amb-1").len() <= 5);
        assert_eq!(seqs_of(&store, "amb-2"), vec![0, 1]);
    }

    /// Appends frames `seqs` of stream 0 of each vehicle (captured every 40 ms), one commit.
    fn append_frames(store: &Store, vehicles: &[Arc<str>], seqs: &[u64]) {
        let mut b = store.begin().unwrap();
        for v in vehicles {
            for &seq in seqs {
                let mut msg = crate::store::suite::data(v, seq, 7);
                if let Some(Record::Data(d)) = msg.record.as_mut()
                    && let Some(f) = d.frame.as_mut()
                {
                    f.capture_time_ns = seq as i64 * 40;
                }
                let r = SeqRef {
                    vehicle: v,
                    session: 1,
                    stream_id: 0,
                    seq,
                };
                b.append(v, 2, msg, Some(r)).unwrap();
            }
        }
        b.commit().unwrap();
    }

    /// Everything readers can ask about the vehicles' frames.
    fn answers(store: &Store, vehicles: &[Arc<str>]) -> Vec<String> {
        let mut out = vec![format!("{:?}", store.stored_streams(16).unwrap())];
        let b = store.begin().unwrap();
        for v in vehicles {
            let key = StreamKey {
                vehicle: v.clone(),
                session: 1,
                stream_id: 0,
            };
            out.push(format!(
                "{:?}",
                store.history(&key, 0, i64::MAX, 1000, usize::MAX)
            ));
            // From the middle of the stream, where the start is searched for.
            out.push(format!(
                "{:?}",
                store.history(&key, 130, 450, 1000, usize::MAX)
            ));
            for seq in 0..20 {
                let r = SeqRef {
                    vehicle: v,
                    session: 1,
                    stream_id: 0,
                    seq,
                };
                out.push(format!("{seq}:{:?}/{:?}", store.stored(r), b.contains(r)));
            }
        }
        out
    }

    /// (frames in SEEN, per-vehicle bytes in VEHICLE_BYTES, the same counted from the log).
    type Tables = (u64, Vec<(String, u64)>, Vec<(String, u64)>);

    fn tables(embedded: &EmbeddedStore) -> Tables {
        let txn = embedded.db.begin_read().unwrap();
        let seen = txn.open_table(SEEN).unwrap().len().unwrap();
        let totals = txn.open_table(VEHICLE_BYTES).unwrap();
        let totals: Vec<(String, u64)> = totals
            .iter()
            .unwrap()
            .map(|i| i.unwrap())
            .map(|(k, v)| (k.value().to_owned(), v.value()))
            .collect();
        let mut counted: std::collections::BTreeMap<String, u64> = Default::default();
        for item in txn.open_table(LOG).unwrap().iter().unwrap() {
            let (_, v) = item.unwrap();
            let msg = SubscribeResponse::decode(v.value()).unwrap();
            if let Some((vehicle, _)) = record_scope(&msg) {
                *counted.entry(vehicle.to_owned()).or_default() += v.value().len() as u64;
            }
        }
        (seen, totals, counted.into_iter().collect())
    }

    #[test]
    fn waiting_index_entries_answer_as_the_tables_do_and_a_reopen_writes_them_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let embedded = EmbeddedStore::open(&path).unwrap();
        let store = Store::new(embedded.clone());
        let vehicles: Vec<Arc<str>> = (0..200).map(|i| format!("amb-{i}").into()).collect();
        // In the tables: 0..10 without 3, 4 and 7.
        append_frames(&store, &vehicles, &[0, 1, 2, 5, 6, 8, 9]);
        store
            .enforce_retention(i64::MIN, u64::MAX, u64::MAX, 0)
            .unwrap();
        assert_eq!(
            tables(&embedded).0,
            200 * 7,
            "retention writes every waiting entry"
        );
        // Waiting: a gap fill, the next frames and a new hole, in two commits.
        append_frames(&store, &vehicles, &[3, 10, 11]);
        append_frames(&store, &vehicles, &[13, 14]);
        // And vehicles none of whose frames is in the table yet (more than a few, or their
        // commit would write every waiting entry).
        let late: Vec<Arc<str>> = (0..5).map(|i| format!("amb-late-{i}").into()).collect();
        append_frames(&store, &late, &(0..20).collect::<Vec<_>>());
        let mut all = vehicles.clone();
        all.extend(late);
        let vehicles = all;
        let (in_table, totals, counted) = tables(&embedded);
        assert!(
            in_table < 200 * 12,
            "some partitions have not had their turn: {in_table} in the table"
        );
        assert_ne!(totals, counted, "so their bytes wait too");
        let waiting = answers(&store, &vehicles);
        assert!(
            waiting
                .iter()
                .any(|a| a.contains("holes: [(4, 5), (7, 8), (12, 13)]"))
        );

        // Once written, the answers are the same.
        store
            .enforce_retention(i64::MIN, u64::MAX, u64::MAX, 0)
            .unwrap();
        let (in_table, totals, counted) = tables(&embedded);
        assert_eq!(in_table, 200 * 12 + 100);
        assert_eq!(totals, counted);
        assert_eq!(answers(&store, &vehicles), waiting);

        // Entries still waiting at a crash are written by the next open, bytes counted once
        // (some partitions had their turn before the crash), and by no later one again.
        append_frames(&store, &vehicles, &[4, 15]);
        append_frames(&store, &vehicles, &[16]);
        let before = answers(&store, &vehicles);
        drop((store, embedded));
        for _ in 0..2 {
            let embedded = EmbeddedStore::open(&path).unwrap();
            let (in_table, totals, counted) = tables(&embedded);
            assert_eq!(in_table, 200 * 15 + 100);
            assert_eq!(totals, counted);
            assert_eq!(answers(&Store::new(embedded), &vehicles), before);
        }
    }

    #[test]
    fn a_commit_from_few_vehicles_writes_every_waiting_entry() {
        let dir = tempfile::tempdir().unwrap();
        let embedded = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        let store = Store::new(embedded.clone());
        let many: Vec<Arc<str>> = (0..50).map(|i| format!("amb-{i}").into()).collect();
        append_frames(&store, &many, &[0, 1]);
        append_frames(&store, &many, &[2]);
        assert!(
            tables(&embedded).0 < 150,
            "a commit from many vehicles writes a part"
        );
        append_frames(&store, &many[..deferred::FEW_VEHICLES], &[3]);
        assert_eq!(tables(&embedded).0, 150, "all that waited");
        // Its own entries wait for the next commit, as every commit's do.
        let waiting = lock(&embedded.deferred).waiting_frames();
        assert_eq!(waiting, deferred::FEW_VEHICLES);
    }

    #[test]
    fn waiting_entries_stay_bounded_by_a_round_of_commits() {
        let dir = tempfile::tempdir().unwrap();
        let embedded = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        let store = Store::new(embedded.clone());
        let vehicles: Vec<Arc<str>> = (0..200).map(|i| format!("amb-{i}").into()).collect();
        for round in 0..3 * deferred::PARTITIONS as u64 {
            append_frames(&store, &vehicles, &[round]);
            let waiting = lock(&embedded.deferred).waiting_frames();
            assert!(
                waiting <= deferred::PARTITIONS * vehicles.len(),
                "{waiting} waiting after commit {round}"
            );
        }
        let (in_table, ..) = tables(&embedded);
        assert!(in_table > 0, "partitions had their turns");
    }

    /// The shared store suite against this backend: each case with its own file, reopened by
    /// opening the file again.
    fn embedded() -> impl FnMut() -> Store {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        move || {
            let _keep = &dir;
            Store::new(EmbeddedStore::open(&path).unwrap())
        }
    }

    crate::store_suite!(embedded());
}
