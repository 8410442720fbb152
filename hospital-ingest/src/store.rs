//! The ingest's durable store on redb: an append-only log of everything subscribers see (data,
//! gaps, gap closures, stream announcements), indexed by a global cursor, plus the set of
//! stored (vehicle, session, stream, seq) for deduplication.
//!
//! Why redb: pure Rust (no C toolchain on the ingest host), ACID transactions with
//! copy-on-write B-trees and checksummed commits, so a crash or power cut leaves the last
//! committed state; one writer and many concurrent readers, which is exactly our shape (one
//! writer thread, one reader per subscriber). The ingest acknowledges a frame only after the
//! transaction holding it has committed with `Durability::Immediate` (fsync).

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;

use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use relay_proto::model::{
    DataRecord, GapRecord, StreamInfo, SubscribeResponse, subscribe_response::Record,
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

#[derive(Debug, thiserror::Error)]
/// Why the store could not be read or written.
pub enum StoreError {
    #[error("store: {0}")]
    /// redb failed (I/O, full disk, corruption).
    Redb(#[from] redb::Error),
    #[error("store file {path}: {source}")]
    /// The store file or its directory could not be created or restricted.
    Io {
        /// The file.
        path: std::path::PathBuf,
        #[source]
        /// The operating system's error.
        source: std::io::Error,
    },
    #[error("store record {cursor} is corrupt: {source}")]
    /// A log record does not decode.
    Corrupt {
        /// Its cursor.
        cursor: u64,
        #[source]
        /// prost's error.
        source: prost::DecodeError,
    },
}

relay_ops::from_redb_errors!(StoreError, Redb);

/// A record as appended to the log.
#[derive(Debug, Clone)]
pub struct LogEntry {
    /// Its position in the log.
    pub cursor: u64,
    /// The vehicle it belongs to.
    pub vehicle: Arc<str>,
    /// Its stream kind.
    pub kind: i32,
    /// The message as subscribers receive it.
    pub message: SubscribeResponse,
}

/// A time range of one stream, as [`Store::history`] returns it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    /// Data records in sequence order.
    pub records: Vec<DataRecord>,
    /// Sequence numbers missing between them (never received, or deleted).
    pub missing: Vec<GapRecord>,
    /// More records lie in the range beyond the bound.
    pub truncated: bool,
}

/// Identity of a stored frame.
#[derive(Debug, Clone, Copy)]
pub struct SeqRef<'a> {
    /// The vehicle.
    pub vehicle: &'a str,
    /// The session.
    pub session: u64,
    /// The stream.
    pub stream_id: u32,
    /// The sequence number.
    pub seq: u64,
}

#[derive(Debug, Clone)]
/// The store: cheap to clone, one writer, any number of readers.
pub struct Store {
    db: Arc<Database>,
}

/// How a declared stream relates to its session as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Declared {
    /// The session's first declaration of it.
    New,
    /// Declared before with the same descriptor (a bearer reconnecting, an agent restarting).
    Same,
    /// Declared before with another descriptor, or not in the session's first declaration.
    Conflict,
}

/// Vehicle and kind a log record belongs to (for subscription filters).
pub fn record_scope(msg: &SubscribeResponse) -> Option<(&str, i32)> {
    let s = match msg.record.as_ref()? {
        Record::Data(d) => d.stream.as_ref()?,
        Record::Gap(g) => g.stream.as_ref()?,
        Record::GapClosed(g) => g.stream.as_ref()?,
        Record::Stream(s) => s.stream.as_ref()?,
        Record::Sync(_) | Record::Lagged(_) => return None,
    };
    Some((s.vehicle_id.as_str(), s.kind))
}

impl Store {
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

    /// Starts a write transaction.
    pub fn begin(&self) -> Result<WriteBatch, StoreError> {
        let txn = self.db.begin_write()?;
        let (next_cursor, log_bytes) = {
            let meta = txn.open_table(META)?;
            let next = meta.get("next_cursor")?.map_or(1, |v| v.value());
            let bytes = meta.get("log_bytes")?.map_or(0, |v| v.value());
            (next, bytes)
        };
        Ok(WriteBatch {
            txn,
            next_cursor,
            log_bytes,
            appended: Vec::new(),
        })
    }

    /// Cursor of the newest record (0 when empty).
    pub fn head(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        let log = txn.open_table(LOG)?;
        Ok(log.last()?.map_or(0, |(k, _)| k.value()))
    }

    /// Up to `limit` records with cursor in `(after, up_to]`, oldest first.
    pub fn read_after(
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
    pub fn cursor_before_received(&self, at_ns: i64) -> Result<u64, StoreError> {
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
        // Invariant: data before `lo` was received before `at_ns`; from `hi` on, not.
        let (mut lo, mut hi) = (first, last + 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match received_from(mid)? {
                Some((cursor, received)) if received < at_ns => lo = cursor + 1,
                _ => hi = mid,
            }
        }
        Ok(lo.saturating_sub(1))
    }

    /// Every stream announcement stored.
    pub fn streams(&self) -> Result<Vec<StreamInfo>, StoreError> {
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
    pub fn vehicles(&self) -> Result<Vec<(String, i64)>, StoreError> {
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
    pub fn stored_streams(&self, max_holes: usize) -> Result<Vec<StoredStream>, StoreError> {
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

    /// One stream's data records captured in `[from_ns, to_ns)` (beginning with the frame in
    /// progress at `from_ns` when later ones follow), in sequence order: at most `max_records` and about `max_bytes`
    /// encoded, `truncated` when more lie in the range. Sequence numbers missing between the
    /// records returned are listed. A binary search over the stream's sequence numbers finds
    /// the start (capture times grow with them at the source).
    pub fn history(
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
        let capture = |d: &DataRecord| d.frame.as_ref().map_or(i64::MIN, |f| f.capture_time_ns);
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
        // The frame in progress at `from_ns` (the last stored one before it), unless one
        // starts exactly there or the stream has nothing after it (it ended before).
        let in_progress = first_from(lo)?.is_some_and(|(_, d)| capture(&d) > from_ns);
        let start = match seen.range((v, s, id, 0)..(v, s, id, lo))?.next_back() {
            Some(item) if in_progress => item?.0.value().3,
            _ => lo,
        };
        let mut out = History::default();
        let mut bytes = 0usize;
        let mut previous: Option<(u64, i64)> = None;
        for item in seen.range((v, s, id, start)..=(v, s, id, u64::MAX))? {
            let (k, c) = item?;
            let seq = k.value().3;
            let Some(d) = data_at(c.value())? else {
                continue;
            };
            let at = capture(&d);
            if at >= to_ns {
                break;
            }
            if out.records.len() >= max_records || (bytes >= max_bytes && !out.records.is_empty()) {
                out.truncated = true;
                break;
            }
            if let Some((p, p_at)) = previous
                && seq > p + 1
            {
                out.missing.push(GapRecord {
                    stream: d.stream.clone(),
                    start_seq: p + 1,
                    end_seq: seq,
                    start_time_ns: p_at,
                    end_time_ns: at,
                });
            }
            previous = Some((seq, at));
            bytes += d.encoded_len();
            out.records.push(d);
        }
        Ok(out)
    }

    /// The announcement of one stream, if it is known.
    pub fn stream_info(&self, stream: &StreamKey) -> Result<Option<StreamInfo>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(STREAMS)?;
        let key = (&*stream.vehicle, stream.session, stream.stream_id);
        match t.get(key)? {
            Some(v) => Ok(StreamInfo::decode(v.value()).ok()),
            None => Ok(None),
        }
    }

    /// The record at `cursor`, if it is still kept.
    pub fn record(&self, cursor: u64) -> Result<Option<SubscribeResponse>, StoreError> {
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
    pub fn enforce_retention(
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
    pub fn log_len(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(LOG)?.len()?)
    }
}

/// What a retention sweep removed.
#[derive(Debug, Default)]
pub struct RetentionOutcome {
    /// Records deleted.
    pub deleted: u64,
    /// Of those, records of vehicles over their quota.
    pub deleted_over_quota: u64,
    /// Vehicles that were over their quota.
    pub vehicles_over_quota: Vec<String>,
    /// Bytes of log left.
    pub bytes_left: u64,
    /// Streams that lost all their records.
    pub pruned_streams: Vec<StreamKey>,
}

/// A stored stream as the reassembler must resume it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredStream {
    /// The stream.
    pub key: StreamKey,
    /// One past the highest stored seq.
    pub next_seq: u64,
    /// Missing ranges [start, end) between stored seqs, oldest first.
    pub holes: VecDeque<(u64, u64)>,
    /// Cursor of the highest stored frame.
    pub last_cursor: u64,
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
pub struct WriteBatch {
    txn: redb::WriteTransaction,
    next_cursor: u64,
    log_bytes: u64,
    appended: Vec<LogEntry>,
}

impl std::fmt::Debug for WriteBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteBatch")
            .field("next_cursor", &self.next_cursor)
            .finish()
    }
}

impl WriteBatch {
    /// Whether this frame is stored (in this transaction or before).
    pub fn contains(&self, r: SeqRef<'_>) -> Result<bool, StoreError> {
        let seen = self.txn.open_table(SEEN)?;
        Ok(seen
            .get((r.vehicle, r.session, r.stream_id, r.seq))?
            .is_some())
    }

    /// Appends `message` to the log (assigning its cursor); `seq` marks a stored frame.
    pub fn append(
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
        self.txn.open_table(LOG)?.insert(cursor, bytes.as_slice())?;
        let len = bytes.len() as u64;
        self.log_bytes += len;
        if let Some((owner, _)) = record_scope(&message) {
            self.txn
                .open_table(VEHICLE_LOG)?
                .insert((owner, cursor), len)?;
            let mut totals = self.txn.open_table(VEHICLE_BYTES)?;
            let before = totals.get(owner)?.map_or(0, |b| b.value());
            totals.insert(owner, before + len)?;
        }
        if let Some(r) = seq {
            self.txn
                .open_table(SEEN)?
                .insert((r.vehicle, r.session, r.stream_id, r.seq), cursor)?;
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
    pub fn classify_stream(&self, info: &StreamInfo) -> Result<Declared, StoreError> {
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
    pub fn session_is_new(&self, info: &StreamInfo) -> Result<bool, StoreError> {
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
    pub fn put_stream(&mut self, info: &StreamInfo, now_ns: i64) -> Result<bool, StoreError> {
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
    pub fn touch_vehicle(&mut self, vehicle: &str, now_ns: i64) -> Result<(), StoreError> {
        self.txn.open_table(VEHICLES)?.insert(vehicle, now_ns)?;
        Ok(())
    }

    /// Commits durably and returns what was appended, in cursor order.
    pub fn commit(self) -> Result<Vec<LogEntry>, StoreError> {
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

    #[test]
    fn a_session_keeps_the_descriptors_of_its_first_declaration() {
        use relay_proto::model::StreamRef;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
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

    fn data(vehicle: &str, seq: u64, received: i64) -> SubscribeResponse {
        SubscribeResponse {
            cursor: 0,
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

    #[test]
    fn appends_survive_reopen_and_dedup_index_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let v: Arc<str> = "amb-1".into();
        {
            let store = Store::open(&path).unwrap();
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
        let store = Store::open(&path).unwrap();
        assert_eq!(store.head().unwrap(), 3);
        let b = store.begin().unwrap();
        assert!(stored(&b, 3));
        assert!(!stored(&b, 2));
        drop(b);
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

    #[test]
    fn the_cursor_before_a_receipt_time_is_found_by_binary_search() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
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

    #[test]
    fn history_returns_a_time_range_of_one_stream_with_its_holes_and_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
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

    #[test]
    fn retention_deletes_oldest_by_age_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
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
    fn fill(store: &Store, vehicle: &str, first: u64, n: u64, received: i64) {
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

    fn seqs_of(store: &Store, vehicle: &str) -> Vec<u64> {
        store
            .read_after(0, u64::MAX, 1000)
            .unwrap()
            .into_iter()
            .filter_map(|(_, m)| match m.record {
                Some(Record::Data(d)) if d.stream.as_ref()?.vehicle_id == vehicle => {
                    Some(d.frame?.seq)
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_vehicle_over_its_quota_loses_its_own_oldest_records_not_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let store = Store::open(&path).unwrap();
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
        let store = Store::open(&path).unwrap();
        fill(&store, "amb-1", 50, 20, 3);
        let r = store
            .enforce_retention(0, u64::MAX, 10 * one, 10_000)
            .unwrap();
        assert!(r.deleted_over_quota >= 15, "{r:?}");
        assert!(seqs_of(&store, "amb-1").len() <= 10);
    }

    #[test]
    fn a_store_from_before_quotas_is_indexed_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let store = Store::open(&path).unwrap();
        fill(&store, "amb-1", 0, 20, 1);
        fill(&store, "amb-2", 0, 2, 2);
        // Forget the index, as a store written by an older ingest would lack it.
        let txn = store.db.begin_write().unwrap();
        txn.delete_table(VEHICLE_LOG).unwrap();
        txn.delete_table(VEHICLE_BYTES).unwrap();
        txn.open_table(META)
            .unwrap()
            .remove("vehicle_index")
            .unwrap();
        txn.commit().unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        let one = store.read_after(0, 1, 1).unwrap()[0].1.encoded_len() as u64;
        let r = store
            .enforce_retention(0, u64::MAX, 5 * one, 10_000)
            .unwrap();
        assert_eq!(r.vehicles_over_quota, vec!["amb-1".to_owned()]);
        assert!(seqs_of(&store, "amb-1").len() <= 5);
        assert_eq!(seqs_of(&store, "amb-2"), vec![0, 1]);
    }

    #[test]
    fn streams_without_data_are_forgotten_after_retention() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
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
        b.append(&v, 2, data(&v, 0, 1_000), Some(r)).unwrap();
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
}
