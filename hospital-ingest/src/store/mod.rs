//! The ingest's durable store: an append-only log of everything subscribers see (data, gaps,
//! gap closures, stream announcements), indexed by a global cursor, plus the set of stored
//! (vehicle, session, stream, seq) for deduplication, the streams' descriptors and when each
//! vehicle was last heard.
//!
//! Two backends implement [`LogStore`]: [`embedded`] (redb in one file, the default: a
//! newcomer needs no server) and [`jetstream`] (a replicated NATS JetStream stream, for
//! deployments that outgrow one machine). Both acknowledge nothing before it is durable:
//! [`StoreBatch::commit`] returns only once the batch is fsynced (redb `Durability::Immediate`,
//! JetStream `sync_interval: always` on a quorum). One test suite ([`suite`], behind the
//! `store-suite` feature) runs against both.

use std::collections::VecDeque;
use std::sync::Arc;

use relay_proto::model::{
    DataRecord, GapRecord, StreamInfo, SubscribeResponse, subscribe_response::Record,
};

use crate::reassembly::StreamKey;

pub mod embedded;
pub mod jetstream;
#[cfg(any(test, feature = "store-suite"))]
pub mod suite;

pub use embedded::{DEFAULT_CACHE_BYTES, EmbeddedStore};
pub use jetstream::{JetStreamOptions, JetStreamStore};

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
    #[error("jetstream {op}: {reason}")]
    /// A JetStream request failed (connection, timeout, server error).
    JetStream {
        /// What was asked.
        op: &'static str,
        /// The client's or the server's words.
        reason: String,
    },
    #[error(
        "jetstream log moved under us: expected it to end at {expected}, it ends at {found} \
         (another writer, or a write of ours that failed after it was stored)"
    )]
    /// The log was written by someone else since this store last read it: the batch was
    /// refused whole (fencing), nothing of it is stored. The store re-reads the log before its
    /// next batch.
    Fenced {
        /// Where this writer thought the log ended.
        expected: u64,
        /// Where it ends.
        found: u64,
    },
}

relay_ops::from_redb_errors!(StoreError, Redb);

impl StoreError {
    /// A JetStream failure of `op`.
    pub(crate) fn js(op: &'static str, reason: impl std::fmt::Display) -> Self {
        Self::JetStream {
            op,
            reason: reason.to_string(),
        }
    }
}

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

/// A time range of one stream, as [`LogStore::history`] returns it.
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

/// Vehicle and kind a log record belongs to (for subscription filters).
pub fn record_scope(msg: &SubscribeResponse) -> Option<(&str, i32)> {
    let s = match msg.record.as_ref()? {
        Record::Data(d) => d.stream.as_ref()?,
        Record::Gap(g) => g.stream.as_ref()?,
        Record::GapClosed(g) => g.stream.as_ref()?,
        Record::Stream(s) => s.stream.as_ref()?,
        Record::Confirmed(c) => c.stream.as_ref()?,
        Record::Sync(_) | Record::Lagged(_) => return None,
    };
    Some((s.vehicle_id.as_str(), s.kind))
}

/// A durable log store. One writer ([`LogStore::begin`], from one thread at a time), any
/// number of concurrent readers. Methods block (callers on an async runtime use
/// `spawn_blocking`).
pub trait LogStore: Send + Sync + std::fmt::Debug {
    /// Starts a write batch; nothing of it is visible or durable before its commit.
    fn begin(&self) -> Result<Box<dyn StoreBatch>, StoreError>;
    /// Cursor of the newest record (0 when empty).
    fn head(&self) -> Result<u64, StoreError>;
    /// Whether frame `seq` is stored (committed; on a shared log, as far as this node has
    /// followed it). Cheap: an index lookup.
    fn stored(&self, seq: SeqRef<'_>) -> Result<bool, StoreError>;
    /// Up to `limit` records with cursor in `(after, up_to]`, oldest first.
    fn read_after(
        &self,
        after: u64,
        up_to: u64,
        limit: usize,
    ) -> Result<Vec<(u64, SubscribeResponse)>, StoreError>;
    /// A cursor after which lie all records received at or after `at_ns` (ingest clock).
    /// Receipt order follows cursor order up to the writer's batching (milliseconds), so
    /// callers ask with a margin and filter what they get.
    fn cursor_before_received(&self, at_ns: i64) -> Result<u64, StoreError>;
    /// Every stream announcement stored.
    fn streams(&self) -> Result<Vec<StreamInfo>, StoreError>;
    /// Every vehicle seen, with the last time anything arrived from it (UTC ns).
    fn vehicles(&self) -> Result<Vec<(String, i64)>, StoreError>;
    /// What the reassembler needs of each stream after a restart: the high-water mark, the
    /// holes between stored seqs (the newest `max_holes` of them) and the cursor of the
    /// highest.
    fn stored_streams(&self, max_holes: usize) -> Result<Vec<StoredStream>, StoreError>;
    /// One stream's data records captured in `[from_ns, to_ns)` (beginning with the frame in
    /// progress at `from_ns` when later ones follow), in sequence order: at most
    /// `max_records` and about `max_bytes` encoded, `truncated` when more lie in the range.
    /// Sequence numbers missing between the records returned are listed.
    fn history(
        &self,
        stream: &StreamKey,
        from_ns: i64,
        to_ns: i64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<History, StoreError>;
    /// The announcement of one stream, if it is known.
    fn stream_info(&self, stream: &StreamKey) -> Result<Option<StreamInfo>, StoreError>;
    /// The record at `cursor`, if it is still kept.
    fn record(&self, cursor: u64) -> Result<Option<SubscribeResponse>, StoreError>;
    /// Deletes each vehicle's oldest records while it holds more than `max_bytes_per_vehicle`
    /// (so one vehicle cannot push out other patients' data), then the oldest records while
    /// they are older than `min_received_ns` or the log is larger than `max_bytes`, at most
    /// about `max_deletes` in all. Then forgets streams that hold no data any more and were
    /// last declared before `min_received_ns`, and vehicles silent since then without
    /// streams. Descriptors of streams with data left stay, so what remains can be read.
    fn enforce_retention(
        &self,
        min_received_ns: i64,
        max_bytes: u64,
        max_bytes_per_vehicle: u64,
        max_deletes: usize,
    ) -> Result<RetentionOutcome, StoreError>;
    /// Records in the log.
    fn log_len(&self) -> Result<u64, StoreError>;
    /// Which backend this is, for logs ("embedded", "jetstream").
    fn backend(&self) -> &'static str;
    /// Has the store send every record to `bus` as the log takes it, whoever wrote it
    /// (several ingest nodes on one log); false when it cannot, and then the one writer
    /// publishes what it commits.
    fn publish_to(&self, bus: &tokio::sync::broadcast::Sender<Arc<LogEntry>>) -> bool {
        let _ = bus;
        false
    }
}

/// One write batch of a [`LogStore`]; dropped without commit, it leaves no trace.
pub trait StoreBatch: Send + std::fmt::Debug {
    /// Whether this frame is stored (in this batch or before).
    fn contains(&self, r: SeqRef<'_>) -> Result<bool, StoreError>;
    /// Appends `message` to the log (assigning its cursor); `seq` marks a stored frame.
    fn append(
        &mut self,
        vehicle: &Arc<str>,
        kind: i32,
        message: SubscribeResponse,
        seq: Option<SeqRef<'_>>,
    ) -> Result<u64, StoreError>;
    /// How a stream declaration relates to what the store holds of its session.
    fn classify_stream(&self, info: &StreamInfo) -> Result<Declared, StoreError>;
    /// Whether the session of this stream has no stream stored yet (its first Hello).
    fn session_is_new(&self, info: &StreamInfo) -> Result<bool, StoreError>;
    /// Records a stream declaration the caller classified as new or the same; a stored
    /// descriptor is never rewritten. True when it was new.
    fn put_stream(&mut self, info: &StreamInfo, now_ns: i64) -> Result<bool, StoreError>;
    /// Records that something arrived from `vehicle` at `now_ns`.
    fn touch_vehicle(&mut self, vehicle: &str, now_ns: i64) -> Result<(), StoreError>;
    /// Commits durably and returns what was appended, in cursor order.
    fn commit(self: Box<Self>) -> Result<Vec<LogEntry>, StoreError>;
}

/// A write batch of whichever backend.
pub type WriteBatch = Box<dyn StoreBatch>;

/// A handle on the store: cheap to clone, one writer, any number of readers.
#[derive(Debug, Clone)]
pub struct Store(Arc<dyn LogStore>);

impl Store {
    /// A handle on `backend`.
    pub fn new(backend: impl LogStore + 'static) -> Self {
        Self(Arc::new(backend))
    }

    /// Opens (or creates) an embedded store at `path` with the default page cache.
    pub fn open(path: &std::path::Path) -> Result<Self, StoreError> {
        Ok(Self::new(EmbeddedStore::open(path)?))
    }
}

impl std::ops::Deref for Store {
    type Target = dyn LogStore;

    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

/// The ordered record a data frame's dedup entry names, or `None`.
pub(crate) fn data_seq(msg: &SubscribeResponse) -> Option<(&str, u64, u32, u64)> {
    match &msg.record {
        Some(Record::Data(d)) => {
            let (s, f) = (d.stream.as_ref()?, d.frame.as_ref()?);
            Some((s.vehicle_id.as_str(), s.session_id, s.stream_id, f.seq))
        }
        _ => None,
    }
}

/// The binary search behind [`LogStore::cursor_before_received`] over the cursors
/// `first..=last`, given the first data record at or after a cursor (looking a bounded way
/// ahead; none found counts as received later, which only makes the start earlier), as
/// (cursor, received time).
pub(crate) fn search_received(
    first: u64,
    last: u64,
    at_ns: i64,
    mut received_from: impl FnMut(u64) -> Result<Option<(u64, i64)>, StoreError>,
) -> Result<u64, StoreError> {
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

/// Capture time of a data record's frame (`i64::MIN` without one).
pub(crate) fn capture_ns(d: &DataRecord) -> i64 {
    d.frame.as_ref().map_or(i64::MIN, |f| f.capture_time_ns)
}

/// The history of one stream from its stored frames, given in sequence order and each once:
/// what both backends answer [`LogStore::history`] with once they have the candidates.
/// `frames` must hold every stored frame captured at or after `from_ns` plus, when it exists,
/// the last stored one captured before it.
pub(crate) fn history_from(
    frames: impl IntoIterator<Item = Result<(u64, DataRecord), StoreError>>,
    from_ns: i64,
    to_ns: i64,
    max_records: usize,
    max_bytes: usize,
) -> Result<History, StoreError> {
    use prost::Message as _;
    let mut frames = frames.into_iter().peekable();
    // Skip to the frame in progress at `from_ns` (the last one before it), unless one starts
    // exactly there or nothing follows it (the stream ended before).
    let mut before: Option<(u64, DataRecord)> = None;
    while let Some(next) = frames.peek() {
        match next {
            Ok((_, d)) if capture_ns(d) >= from_ns => break,
            Ok(_) => before = frames.next().transpose()?,
            Err(_) => {
                frames.next().transpose()?;
            }
        }
    }
    let in_progress = matches!(frames.peek(), Some(Ok((_, d))) if capture_ns(d) > from_ns);
    let mut out = History::default();
    let mut bytes = 0usize;
    let mut previous: Option<(u64, i64)> = None;
    let start = before.filter(|_| in_progress).map(Ok);
    for item in start.into_iter().chain(frames) {
        let (seq, d) = item?;
        let at = capture_ns(&d);
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
