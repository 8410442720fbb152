//! The embedded backend: redb in one file. An append-only log keyed by cursor plus the
//! dedup, stream, vehicle and per-vehicle quota tables, all updated in one transaction.
//!
//! Why redb: pure Rust (no C toolchain on the ingest host), ACID transactions with
//! copy-on-write B-trees and checksummed commits, so a crash or power cut leaves the last
//! committed state; one writer and many concurrent readers, which is exactly our shape (one
//! writer thread, one reader per subscriber). The ingest acknowledges a frame only after the
//! transaction holding it has committed with `Durability::Immediate` (fsync).

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::Arc;

use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use relay_proto::model::{DataRecord, StreamInfo, SubscribeResponse, subscribe_response::Record};

use super::{
    Declared, History, LogEntry, LogStore, RetentionOutcome, SeqRef, StoreBatch, StoreError,
    StoredStream, record_scope,
};
use crate::reassembly::StreamKey;

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
/// for every record).
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
        }
        txn.commit()?;
        Ok(Self { db: Arc::new(db) })
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
            seen: HashMap::new(),
        }))
    }

    fn stored(&self, r: SeqRef<'_>) -> Result<bool, StoreError> {
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
                if seq > s.next_seq {
                    s.holes.push_back((s.next_seq, seq));
                    if s.holes.len() > max_holes {
                        s.holes.pop_front();
                    }
                }
                s.next_seq = seq + 1;
                s.last_cursor = v.value();
            }
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
        let txn = self.db.begin_read()?;
        let seen = txn.open_table(SEEN)?;
        let log = txn.open_table(LOG)?;
        let (v, s, id) = (&*stream.vehicle, stream.session, stream.stream_id);
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
            for item in seen.range((v, s, id, seq)..=(v, s, id, u64::MAX))? {
                let (k, c) = item?;
                if let Some(d) = data_at(c.value())? {
                    return Ok(Some((k.value().3, d)));
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
        let start = match seen.range((v, s, id, 0)..(v, s, id, lo))?.next_back() {
            Some(item) => item?.0.value().3,
            None => lo,
        };
        let frames = seen
            .range((v, s, id, start)..=(v, s, id, u64::MAX))?
            .filter_map(|item| {
                let frame = item
                    .map_err(StoreError::from)
                    .and_then(|(k, c)| Ok(data_at(c.value())?.map(|d| (k.value().3, d))));
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
                    .range(
                        (vehicle, session, stream_id, 0)..=(vehicle, session, stream_id, u64::MAX),
                    )?
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
        txn.commit()?;
        Ok(out)
    }

    /// Records in the log.
    fn log_len(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(LOG)?.len()?)
    }
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
    /// The encoded records of `appended`, inserted at commit: each table is opened once a
    /// batch instead of four times a record (opening one looks it up in redb's table tree).
    encoded: Vec<Vec<u8>>,
    /// Frames appended in this batch and their cursors, inserted into SEEN at commit;
    /// `contains` looks here first.
    seen: HashMap<Arc<str>, HashMap<FrameOfVehicle, u64>>,
}

/// A frame of one vehicle: (session, stream, seq).
type FrameOfVehicle = (u64, u32, u64);

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
        if self
            .seen
            .get(r.vehicle)
            .is_some_and(|s| s.contains_key(&(r.session, r.stream_id, r.seq)))
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
        self.log_bytes += bytes.len() as u64;
        self.encoded.push(bytes);
        if let Some(r) = seq {
            let owner = if r.vehicle == &**vehicle {
                vehicle.clone()
            } else {
                Arc::from(r.vehicle)
            };
            self.seen
                .entry(owner)
                .or_default()
                .insert((r.session, r.stream_id, r.seq), cursor);
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

    /// Commits durably and returns what was appended, in cursor order.
    fn commit(self: Box<Self>) -> Result<Vec<LogEntry>, StoreError> {
        {
            // Cursors ascend: the log's B-tree grows at its end.
            let mut log = self.txn.open_table(LOG)?;
            for (entry, bytes) in self.appended.iter().zip(&self.encoded) {
                log.insert(entry.cursor, bytes.as_slice())?;
            }
        }
        {
            let mut by_vehicle = self.txn.open_table(VEHICLE_LOG)?;
            let mut added: HashMap<&str, u64> = HashMap::new();
            for (entry, bytes) in self.appended.iter().zip(&self.encoded) {
                if let Some((owner, _)) = record_scope(&entry.message) {
                    let len = bytes.len() as u64;
                    by_vehicle.insert((owner, entry.cursor), len)?;
                    *added.entry(owner).or_default() += len;
                }
            }
            let mut totals = self.txn.open_table(VEHICLE_BYTES)?;
            for (owner, len) in added {
                let before = totals.get(owner)?.map_or(0, |b| b.value());
                totals.insert(owner, before + len)?;
            }
        }
        {
            let mut seen = self.txn.open_table(SEEN)?;
            for (vehicle, frames) in &self.seen {
                for (&(session, stream_id, seq), &cursor) in frames {
                    seen.insert((&**vehicle, session, stream_id, seq), cursor)?;
                }
            }
        }
        {
            let mut meta = self.txn.open_table(META)?;
            meta.insert("next_cursor", self.next_cursor)?;
            meta.insert("log_bytes", self.log_bytes)?;
        }
        self.txn.commit()?;
        Ok(self.appended)
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
