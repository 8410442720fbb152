//! The JetStream backend: the log is one NATS JetStream stream (file storage, replicated,
//! `sync_interval: always` on the servers), the cursor is the stream sequence, and the small
//! mutable state (stream descriptors with their declaration time, vehicles' last contact)
//! lives in a KV bucket beside it.
//!
//! - **Writers fenced per vehicle.** Each vehicle's records of a batch are published as
//!   JetStream atomic batches (all or nothing, contiguous sequences, one fsync per batch),
//!   the first carrying `Nats-Expected-Last-Subject-Sequence` over the vehicle's subjects:
//!   a batch that does not continue the vehicle's records exactly where this store last saw
//!   them (another node wrote them meanwhile) is refused whole ([`StoreError::Fenced`]) and
//!   the store catches up before its next batch. Different vehicles never conflict, so
//!   several ingest nodes write one log. The cursor (the stream sequence) comes from the
//!   commit and is not stored in the record.
//! - **Every node follows the log.** An ordered consumer takes every record in, in log
//!   order, whichever node wrote it: into the index and onto the node's live bus, so
//!   subscribers of any node see the same records with the same cursors.
//! - **Dedup beyond JetStream's window.** `Nats-Msg-Id` dedup only spans a time window (and
//!   atomic batches refuse it): exactly-once comes from the store's own index of stored
//!   (vehicle, session, stream, seq), kept in memory as ranges per stream (a few bytes per
//!   stream while frames arrive in order), rebuilt by reading the log on open and kept by
//!   the follower.
//! - **Reads** use batched direct gets (`$JS.API.DIRECT.GET`, one request, many messages),
//!   served by any replica.
//! - **Retention**: the stream's own `max_age`/`max_bytes` (server-enforced) plus the same
//!   sweep as the embedded backend (age by receipt time, total bytes, per-vehicle quota)
//!   done with purges, byte totals kept per vehicle in buckets of
//!   [`JetStreamOptions::accounting_granularity_bytes`].
//!
//! The store runs its NATS client on a small runtime of its own, so its blocking methods work
//! from the writer thread, from `spawn_blocking` and during start-up alike.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, kv, stream};
use async_nats::{HeaderMap, StatusCode};
use bytes::Bytes;
use futures::StreamExt as _;
use prost::Message as _;
use relay_proto::model::{StreamInfo, SubscribeResponse, subscribe_response::Record};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::{
    Declared, History, LogEntry, LogStore, RetentionOutcome, SeqRef, StoreBatch, StoreError,
    StoredStream, data_seq, record_scope,
};
use crate::reassembly::StreamKey;

/// JetStream refuses atomic batches of more messages than this (ADR-50).
const MAX_ATOMIC_BATCH: usize = 1000;
/// Messages per batched direct get.
const READ_PAGE: usize = 512;
/// Bytes per batched direct get, at most.
const READ_PAGE_BYTES: usize = 4 * 1024 * 1024;
/// Records [`LogStore::cursor_before_received`] looks past a probe for a data record.
const RECEIVED_PROBE: usize = 256;
/// How far before a history range the scan starts (by storage time), for vehicle clocks
/// ahead of the ingest's and the frame in progress at its start.
const HISTORY_LOOKBACK: Duration = Duration::from_secs(300);
/// Records a history scan reads at most before it answers truncated.
const HISTORY_SCAN_MAX: usize = 2_000_000;
/// A vehicle's last contact is written to the KV bucket at most this often (the ingest
/// keeps the exact time in memory; the bucket only serves a restart).
const VEHICLE_PERSIST_EVERY_NS: i64 = 30_000_000_000;

/// Where and how to reach JetStream.
#[derive(Debug, Clone)]
pub struct JetStreamOptions {
    /// Server URLs (`tls://host:port`), any node of the cluster.
    pub servers: Vec<String>,
    /// CA the servers' certificates chain to.
    pub ca: PathBuf,
    /// This ingest node's client certificate (PEM).
    pub cert: PathBuf,
    /// Its key (PEM).
    pub key: PathBuf,
    /// Name of the log stream.
    pub stream: String,
    /// Subject prefix of the log (records go to `<prefix>.<vehicle hex>.<session>.<stream>`).
    pub subject_prefix: String,
    /// Name of the KV bucket for descriptors and vehicles.
    pub meta_bucket: String,
    /// Replicas of the stream and the bucket (3 on a 3-node cluster).
    pub replicas: usize,
    /// The stream's own age limit (server-enforced, by storage time).
    pub max_age: Duration,
    /// The stream's own size limit, bytes (server-enforced, oldest discarded).
    pub max_bytes: u64,
    /// Time allowed for one request (publish, read, admin).
    pub request_timeout: Duration,
    /// Precision of the byte accounting behind quotas and the size bound: records are
    /// counted in runs of about this many bytes.
    pub accounting_granularity_bytes: u64,
    /// Name the connection carries (shown by the servers' monitoring).
    pub client_name: String,
}

/// The JetStream store: cheap to share (callers hold it in a [`super::Store`]).
pub struct JetStreamStore {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for JetStreamStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamStore")
            .field("stream", &self.shared.stream_name)
            .finish()
    }
}

struct Shared {
    runtime: Option<tokio::runtime::Runtime>,
    client: async_nats::Client,
    js: jetstream::Context,
    stream_name: Arc<str>,
    prefix: Arc<str>,
    kv: kv::Store,
    kv_stream: Arc<str>,
    timeout: Duration,
    granularity: u64,
    index: Mutex<Index>,
    /// Where followed records go (the ingest's live bus), once attached.
    live: Mutex<Option<broadcast::Sender<Arc<LogEntry>>>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside an async context: let it go.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// A stream as the index keys it: (vehicle, session, stream id).
type Key = (Arc<str>, u64, u32);

/// Streams declared in a batch: the descriptor to keep and the declaration time.
type Declarations = BTreeMap<Key, (StreamInfo, i64)>;

/// One stream's state: descriptor, declaration time, which seqs are stored where.
#[derive(Debug, Default, Clone)]
struct StreamState {
    info: Option<StreamInfo>,
    declared_ns: Option<i64>,
    /// Stored seqs in runs of consecutive seqs stored at increasing cursors, by first seq
    /// (a few runs per stream while frames arrive in order; a late frame starts one).
    seen: BTreeMap<u64, SeqRun>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SeqRun {
    /// One past the last seq.
    end: u64,
    first_cursor: u64,
    last_cursor: u64,
}

impl StreamState {
    fn contains(&self, seq: u64) -> bool {
        self.seen
            .range(..=seq)
            .next_back()
            .is_some_and(|(_, r)| seq < r.end)
    }

    fn insert(&mut self, seq: u64, cursor: u64) {
        if self.contains(seq) {
            return;
        }
        // Extends the run ending just before it (cursors only grow), else starts one.
        if let Some((_, r)) = self.seen.range_mut(..seq).next_back()
            && r.end == seq
            && r.last_cursor < cursor
        {
            r.end = seq + 1;
            r.last_cursor = cursor;
            return;
        }
        self.seen.insert(
            seq,
            SeqRun {
                end: seq + 1,
                first_cursor: cursor,
                last_cursor: cursor,
            },
        );
    }

    /// Highest stored seq and its cursor.
    fn top(&self) -> Option<(u64, u64)> {
        self.seen
            .iter()
            .max_by_key(|(_, r)| r.end)
            .map(|(_, r)| (r.end - 1, r.last_cursor))
    }
}

/// Byte totals of one vehicle's records in runs of consecutive cursors.
#[derive(Debug, Default, Clone)]
struct Runs {
    runs: VecDeque<Run>,
    total: u64,
}

#[derive(Debug, Clone, Copy)]
struct Run {
    first: u64,
    last: u64,
    bytes: u64,
}

impl Runs {
    fn add(&mut self, cursor: u64, len: u64, granularity: u64) {
        self.total += len;
        match self.runs.back_mut() {
            Some(r) if r.bytes < granularity => {
                r.last = cursor;
                r.bytes += len;
            }
            _ => self.runs.push_back(Run {
                first: cursor,
                last: cursor,
                bytes: len,
            }),
        }
    }

    /// Forgets runs wholly below `cursor` (deleted).
    fn drop_below(&mut self, cursor: u64) {
        while let Some(r) = self.runs.front() {
            if r.last >= cursor {
                break;
            }
            self.total = self.total.saturating_sub(r.bytes);
            self.runs.pop_front();
        }
    }

    /// The cursor to purge below so that at most `limit` bytes are left.
    fn cut_for(&self, limit: u64) -> Option<u64> {
        let mut left = self.total;
        let mut cut = None;
        for r in &self.runs {
            if left <= limit {
                break;
            }
            left = left.saturating_sub(r.bytes);
            cut = Some(r.last + 1);
        }
        cut
    }
}

/// What the store knows of the log, kept in step with it by the one writer.
#[derive(Debug, Default)]
struct Index {
    /// Cursor of the last record read or written.
    /// Every record up to this cursor is taken into account, in log order (by the follower).
    followed: u64,
    /// A commit failed or was fenced: catch up with the log before the next batch.
    stale: bool,
    /// vehicle -> the last sequence on its subjects as far as this store knows (what its
    /// next batch expects: per-vehicle fencing).
    vehicle_last: HashMap<String, u64>,
    streams: BTreeMap<Key, StreamState>,
    /// vehicle -> (last contact, last contact written to the bucket).
    vehicles: BTreeMap<String, (i64, Option<i64>)>,
    /// vehicle ("" for records of no vehicle) -> byte runs.
    bytes: BTreeMap<String, Runs>,
}

impl Index {
    fn stream_mut(&mut self, vehicle: &str, session: u64, stream_id: u32) -> &mut StreamState {
        self.streams
            .entry((vehicle.into(), session, stream_id))
            .or_default()
    }

    fn stream(&self, vehicle: &str, session: u64, stream_id: u32) -> Option<&StreamState> {
        self.streams.get(&(Arc::from(vehicle), session, stream_id))
    }

    /// Takes a record of the log into account, in log order; false when it was already.
    fn apply(
        &mut self,
        cursor: u64,
        vehicle: &str,
        msg: &SubscribeResponse,
        granularity: u64,
    ) -> bool {
        if cursor <= self.followed {
            return false;
        }
        // Counted as the embedded store counts it: the record with its cursor.
        let len = msg.encoded_len() as u64;
        self.bytes
            .entry(vehicle.to_owned())
            .or_default()
            .add(cursor, len, granularity);
        self.apply_committed(cursor, vehicle, msg);
        self.followed = cursor;
        true
    }

    /// What a commit of ours tells before the follower sees it: stored seqs, descriptors,
    /// the vehicle's last sequence (all idempotent).
    fn apply_committed(&mut self, cursor: u64, vehicle: &str, msg: &SubscribeResponse) {
        if let Some((v, s, id, seq)) = data_seq(msg) {
            self.stream_mut(v, s, id).insert(seq, cursor);
        }
        if let Some(Record::Stream(info)) = &msg.record
            && let Some(s) = &info.stream
        {
            let st = self.stream_mut(&s.vehicle_id, s.session_id, s.stream_id);
            if st.info.is_none() {
                st.info = Some(info.clone());
            }
        }
        let last = self.vehicle_last.entry(vehicle.to_owned()).or_default();
        *last = (*last).max(cursor);
    }

    fn session_has_streams(&self, vehicle: &str, session: u64) -> bool {
        let v: Arc<str> = vehicle.into();
        self.streams
            .range((v.clone(), session, 0)..=(v, session, u32::MAX))
            .any(|(_, s)| s.info.is_some())
    }

    fn total_bytes(&self) -> u64 {
        self.bytes.values().map(|r| r.total).sum()
    }

    /// Forgets what the log no longer holds below `first` (the stream's first sequence).
    fn drop_below(&mut self, first: u64) {
        for runs in self.bytes.values_mut() {
            runs.drop_below(first);
        }
        self.bytes.retain(|_, r| !r.runs.is_empty());
        // A vehicle with nothing left has no last sequence (the server's expectation is 0).
        let bytes = &self.bytes;
        self.vehicle_last.retain(|v, _| bytes.contains_key(v));
    }
}

/// Request of a batched direct get.
#[derive(Debug, Serialize)]
struct DirectGet<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    batch: usize,
    max_bytes: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_by_subj: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    start_time: Option<String>,
}

/// A message read back.
struct Stored {
    seq: u64,
    subject: String,
    headers: Option<HeaderMap>,
    payload: Bytes,
}

/// Reply to a batch commit.
#[derive(Debug, Deserialize)]
struct CommitReply {
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    count: usize,
    #[serde(default)]
    error: Option<ApiError>,
}

#[derive(Debug, Deserialize)]
struct ApiError {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    err_code: u32,
    #[serde(default)]
    description: String,
}

/// JetStream's error code for a failed `Nats-Expected-Last-Sequence`.
const ERR_WRONG_LAST_SEQUENCE: u32 = 10071;

/// Hex of a vehicle id: any id becomes one subject token.
fn hex(id: &str) -> String {
    let mut out = String::with_capacity(id.len() * 2);
    for b in id.bytes() {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn unhex(token: &str) -> Option<String> {
    if !token.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

fn stream_key_name(vehicle: &str, session: u64, stream_id: u32) -> String {
    format!("s.{}.{session}.{stream_id}", hex(vehicle))
}

fn vehicle_key_name(vehicle: &str) -> String {
    format!("v.{}", hex(vehicle))
}

fn rfc3339(ns: i64) -> String {
    let at = SystemTime::UNIX_EPOCH + Duration::from_nanos(u64::try_from(ns).unwrap_or(0));
    humantime::format_rfc3339_nanos(at).to_string()
}

impl JetStreamStore {
    /// Connects (mutual TLS, always), creates or updates the log stream and the bucket, and
    /// reads the log to rebuild the index.
    pub fn open(opts: &JetStreamOptions) -> Result<Self, StoreError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("jetstream-client")
            .enable_all()
            .build()
            .map_err(|e| StoreError::js("starting the client runtime", e))?;
        let o = opts.clone();
        let (client, js, kv) = block(&runtime, async move {
            let client = connect(&o).await?;
            let mut js = jetstream::new(client.clone());
            js.set_timeout(o.request_timeout);
            let config = stream::Config {
                name: o.stream.clone(),
                subjects: vec![format!("{}.>", o.subject_prefix)],
                storage: stream::StorageType::File,
                num_replicas: o.replicas,
                max_age: o.max_age,
                max_bytes: i64::try_from(o.max_bytes).unwrap_or(i64::MAX),
                discard: stream::DiscardPolicy::Old,
                retention: stream::RetentionPolicy::Limits,
                allow_direct: true,
                allow_atomic_publish: true,
                max_message_size: i32::try_from(relay_proto::DEFAULT_MAX_FRAME_BYTES * 2)
                    .unwrap_or(i32::MAX),
                ..Default::default()
            };
            create_with_retries("creating the log stream", || {
                js.create_or_update_stream(config.clone())
            })
            .await?;
            let bucket = kv::Config {
                bucket: o.meta_bucket.clone(),
                history: 1,
                num_replicas: o.replicas,
                storage: stream::StorageType::File,
                max_value_size: 64 * 1024,
                ..Default::default()
            };
            let kv = create_with_retries("creating the meta bucket", || {
                js.create_or_update_key_value(bucket.clone())
            })
            .await?;
            // A stream just created (or after a restart) elects its leader a moment later;
            // writes before that find no responder. Wait for both (bounded).
            for name in [o.stream.clone(), format!("KV_{}", o.meta_bucket)] {
                wait_for_leader(&js, &name, o.request_timeout).await?;
            }
            Ok::<_, StoreError>((client, js, kv))
        })??;
        let shared = Arc::new(Shared {
            runtime: Some(runtime),
            client,
            js,
            stream_name: opts.stream.as_str().into(),
            prefix: opts.subject_prefix.as_str().into(),
            kv_stream: format!("KV_{}", opts.meta_bucket).into(),
            kv,
            timeout: opts.request_timeout,
            granularity: opts.accounting_granularity_bytes.max(1),
            index: Mutex::new(Index::default()),
            live: Mutex::new(None),
        });
        let store = Self { shared };
        store.load()?;
        let weak = Arc::downgrade(&store.shared);
        if let Some(rt) = store.shared.runtime.as_ref() {
            rt.spawn(follow(weak));
        }
        Ok(store)
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        // A panic while holding the lock leaves a consistent-enough index: the worst is a
        // stale flag not set, and every commit checks the log's end anyway.
        self.shared
            .index
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `f` on the store's runtime and waits for it.
    fn run<T: Send + 'static>(
        &self,
        f: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let rt = self
            .shared
            .runtime
            .as_ref()
            .ok_or_else(|| StoreError::js("run", "the store is shutting down"))?;
        block(rt, f)?
    }

    /// Reads the whole log and the bucket into a fresh index (on open).
    fn load(&self) -> Result<(), StoreError> {
        let (first, last) = self.bounds()?;
        let mut fresh = Index::default();
        let mut next = first.max(1);
        while next <= last {
            let page = self.read_page(next, None, None, READ_PAGE)?;
            let Some(end) = page.last().map(|m| m.seq) else {
                break;
            };
            for m in &page {
                let msg = decode(m)?;
                let vehicle = self.subject_vehicle(&m.subject).unwrap_or_default();
                fresh.apply(m.seq, &vehicle, &msg, self.shared.granularity);
            }
            next = end + 1;
        }
        fresh.followed = fresh.followed.max(last);
        // The bucket: descriptors (with their declaration time) and vehicles.
        for m in self.read_all(&self.shared.kv_stream.clone())? {
            let deleted = m
                .headers
                .as_ref()
                .and_then(|h| h.get("KV-Operation"))
                .is_some_and(|op| op.as_str() == "DEL" || op.as_str() == "PURGE");
            let key = m.subject.split_once('.').map_or("", |(_, rest)| rest);
            let key = key.split_once('.').map_or("", |(_, rest)| rest);
            let parts: Vec<&str> = key.split('.').collect();
            match parts.as_slice() {
                ["s", v, session, stream_id] => {
                    let (Some(v), Ok(session), Ok(stream_id)) =
                        (unhex(v), session.parse::<u64>(), stream_id.parse::<u32>())
                    else {
                        continue;
                    };
                    if deleted {
                        if let Some(st) =
                            fresh
                                .streams
                                .get_mut(&(v.as_str().into(), session, stream_id))
                        {
                            st.info = None;
                            st.declared_ns = None;
                        }
                        continue;
                    }
                    let (declared, info) = m.payload.split_at(8.min(m.payload.len()));
                    let declared = i64::from_be_bytes(declared.try_into().unwrap_or([0; 8]));
                    let Ok(info) = StreamInfo::decode(info) else {
                        continue;
                    };
                    let st = fresh.stream_mut(&v, session, stream_id);
                    st.info = Some(info);
                    st.declared_ns = Some(declared);
                }
                ["v", v] => {
                    let Some(v) = unhex(v) else { continue };
                    if deleted {
                        fresh.vehicles.remove(&v);
                        continue;
                    }
                    let at = m.payload.get(..8).and_then(|b| b.try_into().ok());
                    let at = i64::from_be_bytes(at.unwrap_or([0; 8]));
                    fresh.vehicles.insert(v, (at, Some(at)));
                }
                _ => {}
            }
        }
        // Streams whose declaration is gone from the bucket and whose data is gone too.
        fresh
            .streams
            .retain(|_, s| s.info.is_some() || !s.seen.is_empty());
        *self.index() = fresh;
        Ok(())
    }

    /// The vehicle a record's subject names.
    fn subject_vehicle(&self, subject: &str) -> Option<String> {
        let rest = subject
            .strip_prefix(&*self.shared.prefix)?
            .strip_prefix('.')?;
        unhex(rest.split('.').next()?)
    }

    /// Waits until the follower has taken in everything the log holds now (bounded by the
    /// request timeout): what this store answers then includes every other writer's records.
    fn catch_up(&self) -> Result<(), StoreError> {
        let deadline = tokio::time::Instant::now() + self.shared.timeout;
        loop {
            let (_, last) = self.bounds()?;
            let followed = self.index().followed;
            // Caught up, or what lies beyond was deleted (purges leave no record to follow).
            if followed >= last || self.read_page(followed + 1, None, None, 1)?.is_empty() {
                self.index().stale = false;
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(StoreError::js(
                    "catching up with the log",
                    format!("followed to {followed}, the log ends at {last}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The log's first and last sequence.
    fn bounds(&self) -> Result<(u64, u64), StoreError> {
        let state = self.state()?;
        Ok((state.first_sequence, state.last_sequence))
    }

    /// The log stream's state (sequences, messages, bytes).
    fn state(&self) -> Result<stream::State, StoreError> {
        let js = self.shared.js.clone();
        let name = self.shared.stream_name.to_string();
        self.run(async move {
            let s = js
                .get_stream_no_info(&name)
                .await
                .map_err(|e| StoreError::js("looking up the log", e))?;
            let info = s
                .get_info()
                .await
                .map_err(|e| StoreError::js("reading the log's state", e))?;
            Ok(info.state)
        })
    }

    /// Up to `limit` messages from `seq` on (or from `start_time`), of `subject` when given.
    fn read_page(
        &self,
        seq: u64,
        subject: Option<&str>,
        start_time: Option<i64>,
        limit: usize,
    ) -> Result<Vec<Stored>, StoreError> {
        self.read_page_of(
            &self.shared.stream_name.clone(),
            seq,
            subject,
            start_time,
            limit,
        )
    }

    fn read_page_of(
        &self,
        stream: &str,
        seq: u64,
        subject: Option<&str>,
        start_time: Option<i64>,
        limit: usize,
    ) -> Result<Vec<Stored>, StoreError> {
        let request = DirectGet {
            seq: start_time.is_none().then_some(seq.max(1)),
            batch: limit.max(1),
            max_bytes: READ_PAGE_BYTES,
            next_by_subj: subject,
            start_time: start_time.map(rfc3339),
        };
        let body = serde_json::to_vec(&request).map_err(|e| StoreError::js("direct get", e))?;
        let deadline = tokio::time::Instant::now() + self.shared.timeout;
        loop {
            match self.direct_get(stream, body.clone(), limit) {
                // No replica answers direct gets yet (a stream just created, a leader just
                // elected): ask again shortly, within the request timeout.
                Err(StoreError::JetStream { reason, .. })
                    if reason.starts_with("503") && tokio::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                other => return other,
            }
        }
    }

    /// One batched direct get.
    fn direct_get(
        &self,
        stream: &str,
        body: Vec<u8>,
        limit: usize,
    ) -> Result<Vec<Stored>, StoreError> {
        let client = self.shared.client.clone();
        let api = format!("$JS.API.DIRECT.GET.{stream}");
        let timeout = self.shared.timeout;
        self.run(async move {
            let inbox = client.new_inbox();
            let mut sub = client
                .subscribe(inbox.clone())
                .await
                .map_err(|e| StoreError::js("direct get", e))?;
            client
                .publish_with_reply(api, inbox, body.into())
                .await
                .map_err(|e| StoreError::js("direct get", e))?;
            let mut out = Vec::new();
            loop {
                let msg = tokio::time::timeout(timeout, sub.next())
                    .await
                    .map_err(|_| StoreError::js("direct get", "timed out"))?
                    .ok_or_else(|| StoreError::js("direct get", "connection closed"))?;
                if let Some(status) = msg.status {
                    match status.as_u16() {
                        // End of batch, or nothing there.
                        204 | 404 => break,
                        _ => {
                            return Err(StoreError::js(
                                "direct get",
                                format!("{status}: {}", msg.description.unwrap_or_default()),
                            ));
                        }
                    }
                }
                let headers = msg.headers;
                let get = |name: &str| {
                    headers
                        .as_ref()
                        .and_then(|h| h.get(name))
                        .map(|v| v.as_str().to_owned())
                };
                let seq = get("Nats-Sequence")
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| StoreError::js("direct get", "reply without Nats-Sequence"))?;
                let subject = get("Nats-Subject").unwrap_or_default();
                out.push(Stored {
                    seq,
                    subject,
                    headers,
                    payload: msg.payload,
                });
                if out.len() >= limit {
                    break;
                }
            }
            Ok(out)
        })
    }

    /// Every message of `stream` (the bucket), oldest first.
    fn read_all(&self, stream: &str) -> Result<Vec<Stored>, StoreError> {
        let mut out = Vec::new();
        let mut next = 1;
        loop {
            let page = self.read_page_of(stream, next, None, None, READ_PAGE)?;
            let Some(last) = page.last().map(|m| m.seq) else {
                return Ok(out);
            };
            next = last + 1;
            out.extend(page);
        }
    }

    fn subject(&self, vehicle: &str, msg: &SubscribeResponse) -> String {
        let scope = match &msg.record {
            Some(Record::Data(d)) => d.stream.as_ref(),
            Some(Record::Gap(g)) => g.stream.as_ref(),
            Some(Record::GapClosed(g)) => g.stream.as_ref(),
            Some(Record::Stream(s)) => s.stream.as_ref(),
            _ => None,
        };
        match scope {
            Some(s) => format!(
                "{}.{}.{}.{}",
                self.shared.prefix,
                hex(&s.vehicle_id),
                s.session_id,
                s.stream_id
            ),
            None => format!("{}.{}._._", self.shared.prefix, hex(vehicle)),
        }
    }

    /// Purges records below `cursor` (of `vehicle` only, when given); how many went.
    fn purge_below(&self, cursor: u64, vehicle: Option<&str>) -> Result<u64, StoreError> {
        let js = self.shared.js.clone();
        let name = self.shared.stream_name.to_string();
        let filter = vehicle.map(|v| format!("{}.{}.>", self.shared.prefix, hex(v)));
        self.run(async move {
            let s = js
                .get_stream_no_info(&name)
                .await
                .map_err(|e| StoreError::js("purging", e))?;
            let purged = match filter {
                Some(f) => s.purge().filter(f).sequence(cursor).await,
                None => s.purge().sequence(cursor).await,
            }
            .map_err(|e| StoreError::js("purging", e))?;
            Ok(purged.purged)
        })
    }

    /// Once the records below `cut` (of `vehicle`, or of all) are gone, forgets the seqs
    /// they held: runs wholly below go, a run across the cut starts at its first member
    /// still stored (found by reading the stream's records from the cut).
    fn trim_streams(&self, cut: u64, vehicle: Option<&str>) -> Result<(), StoreError> {
        let mut across = Vec::new();
        {
            let mut index = self.index();
            for (key, st) in index.streams.iter_mut() {
                if vehicle.is_some_and(|v| &*key.0 != v) {
                    continue;
                }
                st.seen.retain(|_, r| r.last_cursor >= cut);
                for (&start, r) in &st.seen {
                    if r.first_cursor < cut {
                        across.push((key.clone(), start, *r));
                    }
                }
            }
        }
        for (key, start, run) in across {
            let subject = format!("{}.{}.{}.{}", self.shared.prefix, hex(&key.0), key.1, key.2);
            let member = self.first_member(cut, &subject, start, run.end)?;
            let mut index = self.index();
            if let Some(st) = index.streams.get_mut(&key) {
                st.seen.remove(&start);
                if let Some((seq, cursor)) = member {
                    st.seen.insert(
                        seq,
                        SeqRun {
                            first_cursor: cursor,
                            ..run
                        },
                    );
                }
            }
        }
        Ok(())
    }

    /// The first data record at or after cursor `from` of `subject` whose seq lies in
    /// `start..end`, as (seq, cursor).
    fn first_member(
        &self,
        from: u64,
        subject: &str,
        start: u64,
        end: u64,
    ) -> Result<Option<(u64, u64)>, StoreError> {
        let mut next = from;
        // Bounded: past a few pages of other records, the run is kept whole (its frames
        // still count as stored; a re-sent one is acknowledged, not stored twice).
        for _ in 0..8 {
            let page = self.read_page(next, Some(subject), None, READ_PAGE)?;
            let Some(last) = page.last().map(|m| m.seq) else {
                return Ok(None);
            };
            for m in &page {
                let msg = decode(m)?;
                if let Some((_, _, _, seq)) = data_seq(&msg)
                    && (start..end).contains(&seq)
                {
                    return Ok(Some((seq, m.seq)));
                }
            }
            next = last + 1;
        }
        Ok(Some((start, from)))
    }

    fn kv_delete(&self, keys: Vec<String>) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        let kv = self.shared.kv.clone();
        self.run(async move {
            for k in keys {
                kv.purge(&k)
                    .await
                    .map_err(|e| StoreError::js("deleting from the meta bucket", e))?;
            }
            Ok(())
        })
    }
}

/// Follows the log from where the index ends, for as long as the store lives: every record,
/// whichever node wrote it, enters the index in log order and goes to the live bus. The
/// ordered consumer re-creates itself after a gap or a lost server; a failure to create it
/// is retried.
async fn follow(weak: std::sync::Weak<Shared>) {
    loop {
        let Some(shared) = weak.upgrade() else { return };
        let start = shared
            .index
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .followed
            + 1;
        let (js, client) = (shared.js.clone(), shared.client.clone());
        let (name, filter) = (
            shared.stream_name.to_string(),
            format!("{}.>", shared.prefix),
        );
        drop(shared);
        let consumer = async {
            let stream = js
                .get_stream_no_info(&name)
                .await
                .map_err(|e| e.to_string())?;
            let consumer = stream
                .create_consumer(jetstream::consumer::push::OrderedConfig {
                    deliver_subject: client.new_inbox(),
                    filter_subject: filter,
                    deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: start,
                    },
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())?;
            consumer.messages().await.map_err(|e| e.to_string())
        };
        let mut messages = match consumer.await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "following the JetStream log; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        while let Some(next) = messages.next().await {
            let Some(shared) = weak.upgrade() else { return };
            match next {
                Ok(m) => match m.info() {
                    Ok(info) => shared.on_followed(info.stream_sequence, &m.subject, &m.payload),
                    Err(e) => tracing::warn!(error = %e, "a followed record without metadata"),
                },
                Err(e) => {
                    tracing::warn!(error = %e, "following the JetStream log; resuming");
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Shared {
    /// A record the follower received.
    fn on_followed(&self, seq: u64, subject: &str, payload: &[u8]) {
        let msg = match SubscribeResponse::decode(payload) {
            Ok(mut m) => {
                m.cursor = seq;
                m
            }
            Err(e) => {
                // Counted past (a reader of it gets StoreError::Corrupt).
                tracing::error!(cursor = seq, error = %e, "a log record does not decode");
                let mut index = self
                    .index
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                index.followed = index.followed.max(seq);
                return;
            }
        };
        let vehicle = subject
            .strip_prefix(&*self.prefix)
            .and_then(|r| r.strip_prefix('.'))
            .and_then(|r| unhex(r.split('.').next()?))
            .unwrap_or_default();
        let applied = self
            .index
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .apply(seq, &vehicle, &msg, self.granularity);
        if !applied {
            return;
        }
        let live = self
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if let Some(bus) = live {
            let (owner, kind) = record_scope(&msg).unwrap_or((vehicle.as_str(), 0));
            let entry = LogEntry {
                cursor: seq,
                vehicle: owner.into(),
                kind,
                message: msg,
            };
            // No subscriber is fine: the log holds it.
            let _ = bus.send(Arc::new(entry));
        }
    }
}

/// Waits until stream `name` has a leader (a clustered stream elects one after it is
/// created or its servers restart), at most `timeout`.
async fn wait_for_leader(
    js: &jetstream::Context,
    name: &str,
    timeout: Duration,
) -> Result<(), StoreError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let ready = match js.get_stream_no_info(name).await {
            Ok(s) => s
                .get_info()
                .await
                .map(|i| i.cluster.is_none_or(|c| c.leader.is_some()))
                .unwrap_or(false),
            Err(_) => false,
        };
        if ready {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(StoreError::js(
                "waiting for a stream leader",
                name.to_owned(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client connection to the cluster: TLS always, with this node's certificate.
pub(crate) async fn connect(o: &JetStreamOptions) -> Result<async_nats::Client, StoreError> {
    let servers: Vec<async_nats::ServerAddr> = o
        .servers
        .iter()
        .map(|s| s.parse())
        .collect::<Result<_, _>>()
        .map_err(|e| StoreError::js("parsing server URLs", e))?;
    async_nats::ConnectOptions::new()
        .name(&o.client_name)
        .require_tls(true)
        .add_root_certificates(o.ca.clone())
        .add_client_certificate(o.cert.clone(), o.key.clone())
        .connection_timeout(o.request_timeout)
        .request_timeout(Some(o.request_timeout))
        .connect(servers)
        .await
        .map_err(|e| StoreError::js("connecting", e))
}

/// Runs `f` to completion on `rt` from any thread (also from inside another runtime's
/// task: the future runs on `rt`'s own worker while this thread waits).
fn block<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    f: impl Future<Output = T> + Send + 'static,
) -> Result<T, StoreError> {
    futures::executor::block_on(rt.spawn(f)).map_err(|e| StoreError::js("client task", e))
}

fn decode(m: &Stored) -> Result<SubscribeResponse, StoreError> {
    let mut msg =
        SubscribeResponse::decode(m.payload.as_ref()).map_err(|source| StoreError::Corrupt {
            cursor: m.seq,
            source,
        })?;
    msg.cursor = m.seq;
    Ok(msg)
}

impl LogStore for JetStreamStore {
    fn backend(&self) -> &'static str {
        "jetstream"
    }

    fn begin(&self) -> Result<Box<dyn StoreBatch>, StoreError> {
        if self.index().stale {
            self.catch_up()?;
        }
        Ok(Box::new(JetStreamBatch {
            store: JetStreamStore {
                shared: self.shared.clone(),
            },
            expect: HashMap::new(),
            records: Vec::new(),
            seen: HashSet::new(),
            streams: BTreeMap::new(),
            vehicles: HashMap::new(),
        }))
    }

    fn head(&self) -> Result<u64, StoreError> {
        Ok(self.bounds()?.1)
    }

    fn stored(&self, r: SeqRef<'_>) -> Result<bool, StoreError> {
        Ok(self
            .index()
            .stream(r.vehicle, r.session, r.stream_id)
            .is_some_and(|s| s.contains(r.seq)))
    }

    fn publish_to(&self, bus: &broadcast::Sender<Arc<LogEntry>>) -> bool {
        *self
            .shared
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(bus.clone());
        true
    }

    fn read_after(
        &self,
        after: u64,
        up_to: u64,
        limit: usize,
    ) -> Result<Vec<(u64, SubscribeResponse)>, StoreError> {
        if after >= up_to || limit == 0 {
            return Ok(Vec::new());
        }
        let want = limit.min(usize::try_from(up_to - after).unwrap_or(usize::MAX));
        let mut out = Vec::new();
        let mut next = after + 1;
        while out.len() < want {
            let page = self.read_page(next, None, None, (want - out.len()).min(READ_PAGE))?;
            let Some(last) = page.last().map(|m| m.seq) else {
                break;
            };
            for m in page.iter().filter(|m| m.seq <= up_to) {
                out.push((m.seq, decode(m)?));
            }
            if last >= up_to {
                break;
            }
            next = last + 1;
        }
        Ok(out)
    }

    fn cursor_before_received(&self, at_ns: i64) -> Result<u64, StoreError> {
        let (first, last) = self.bounds()?;
        if last == 0 || first > last {
            return Ok(last);
        }
        // The first data record at or after cursor `c`, looking a bounded way ahead.
        let received_from = |c: u64| -> Result<Option<(u64, i64)>, StoreError> {
            let mut next = c;
            let mut looked = 0;
            while looked < RECEIVED_PROBE && next <= last {
                let page = self.read_page(next, None, None, 16)?;
                let Some(end) = page.last().map(|m| m.seq) else {
                    break;
                };
                for m in &page {
                    if let Some(Record::Data(d)) = decode(m)?.record {
                        return Ok(Some((m.seq, d.received_time_ns)));
                    }
                }
                looked += page.len();
                next = end + 1;
            }
            Ok(None)
        };
        super::search_received(first, last, at_ns, received_from)
    }

    fn streams(&self) -> Result<Vec<StreamInfo>, StoreError> {
        Ok(self
            .index()
            .streams
            .values()
            .filter_map(|s| s.info.clone())
            .collect())
    }

    fn vehicles(&self) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(self
            .index()
            .vehicles
            .iter()
            .map(|(v, (at, _))| (v.clone(), *at))
            .collect())
    }

    fn stored_streams(&self, max_holes: usize) -> Result<Vec<StoredStream>, StoreError> {
        // Every writer's records in (another node may have written these streams).
        self.catch_up()?;
        let index = self.index();
        let mut out = Vec::new();
        for ((v, s, id), st) in &index.streams {
            let Some((top, last_cursor)) = st.top() else {
                continue;
            };
            let mut holes = VecDeque::new();
            let mut previous_end: Option<u64> = None;
            for (&start, run) in &st.seen {
                if let Some(p) = previous_end
                    && p < start
                {
                    holes.push_back((p, start));
                    if holes.len() > max_holes {
                        holes.pop_front();
                    }
                }
                previous_end = Some(run.end);
            }
            out.push(StoredStream {
                key: StreamKey {
                    vehicle: v.clone(),
                    session: *s,
                    stream_id: *id,
                },
                next_seq: top + 1,
                holes,
                last_cursor,
            });
        }
        Ok(out)
    }

    fn history(
        &self,
        stream: &StreamKey,
        from_ns: i64,
        to_ns: i64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<History, StoreError> {
        let subject = format!(
            "{}.{}.{}.{}",
            self.shared.prefix,
            hex(&stream.vehicle),
            stream.session,
            stream.stream_id
        );
        let lookback = i64::try_from(HISTORY_LOOKBACK.as_nanos()).unwrap_or(i64::MAX);
        let start = from_ns.saturating_sub(lookback).max(0);
        // Candidates by seq: the last frame captured before `from_ns` and the first
        // `max_records + 1` captured in range (enough to answer and to know it is truncated).
        let mut before: Option<(u64, relay_proto::model::DataRecord)> = None;
        let mut in_range: BTreeMap<u64, relay_proto::model::DataRecord> = BTreeMap::new();
        let mut scanned = 0usize;
        let mut truncated_scan = false;
        let mut page = self.read_page(0, Some(&subject), Some(start), READ_PAGE)?;
        while let Some(last) = page.last().map(|m| m.seq) {
            for m in &page {
                let Some(Record::Data(d)) = decode(m)?.record else {
                    continue;
                };
                let Some(seq) = d.frame.as_ref().map(|f| f.seq) else {
                    continue;
                };
                let at = super::capture_ns(&d);
                if at < from_ns {
                    if before.as_ref().is_none_or(|(s, _)| seq > *s) {
                        before = Some((seq, d));
                    }
                } else if at < to_ns {
                    in_range.insert(seq, d);
                    if in_range.len() > max_records.saturating_add(1) {
                        in_range.pop_last();
                    }
                }
            }
            scanned += page.len();
            if scanned >= HISTORY_SCAN_MAX {
                truncated_scan = true;
                break;
            }
            page = self.read_page(last + 1, Some(&subject), None, READ_PAGE)?;
        }
        // The frame before `from_ns` only counts as in progress if it precedes the range.
        let first_in_range = in_range.keys().next().copied();
        let before = before.filter(|(s, _)| first_in_range.is_none_or(|f| *s < f));
        let frames = before.into_iter().chain(in_range).map(Ok);
        let mut h = super::history_from(frames, from_ns, to_ns, max_records, max_bytes)?;
        h.truncated |= truncated_scan;
        Ok(h)
    }

    fn stream_info(&self, stream: &StreamKey) -> Result<Option<StreamInfo>, StoreError> {
        Ok(self
            .index()
            .stream(&stream.vehicle, stream.session, stream.stream_id)
            .and_then(|s| s.info.clone()))
    }

    fn record(&self, cursor: u64) -> Result<Option<SubscribeResponse>, StoreError> {
        let page = self.read_page(cursor, None, None, 1)?;
        match page.first() {
            Some(m) if m.seq == cursor => Ok(Some(decode(m)?)),
            _ => Ok(None),
        }
    }

    fn enforce_retention(
        &self,
        min_received_ns: i64,
        max_bytes: u64,
        max_bytes_per_vehicle: u64,
        max_deletes: usize,
    ) -> Result<RetentionOutcome, StoreError> {
        // Byte totals count what the follower took in: all of the log, first.
        self.catch_up()?;
        let mut out = RetentionOutcome::default();
        // What the server's own limits deleted since the last sweep.
        let (first, _) = self.bounds()?;
        self.index().drop_below(first);
        self.trim_streams(first, None)?;
        // Vehicles over their quota lose their own oldest records.
        let cuts: Vec<(String, u64)> = self
            .index()
            .bytes
            .iter()
            .filter(|(v, r)| !v.is_empty() && r.total > max_bytes_per_vehicle)
            .filter_map(|(v, r)| Some((v.clone(), r.cut_for(max_bytes_per_vehicle)?)))
            .collect();
        for (vehicle, cut) in cuts {
            let n = self.purge_below(cut, Some(&vehicle))?;
            out.deleted += n;
            out.deleted_over_quota += n;
            if let Some(r) = self.index().bytes.get_mut(&vehicle) {
                r.drop_below(cut);
            }
            self.trim_streams(cut, Some(&vehicle))?;
            if n > 0 {
                out.vehicles_over_quota.push(vehicle);
            }
        }
        // Then the oldest of all: by receipt time, and while the log is too large.
        let by_age = self.cursor_before_received(min_received_ns)? + 1;
        let by_size = {
            let index = self.index();
            let mut runs: Vec<Run> = index
                .bytes
                .values()
                .flat_map(|r| r.runs.iter().copied())
                .collect();
            runs.sort_by_key(|r| r.first);
            let mut left = index.total_bytes();
            let mut cut = 0;
            for r in &runs {
                if left <= max_bytes {
                    break;
                }
                left = left.saturating_sub(r.bytes);
                cut = r.last + 1;
            }
            cut
        };
        let budget = first.saturating_add(u64::try_from(max_deletes).unwrap_or(u64::MAX));
        let cut = by_age.max(by_size).min(budget);
        if cut > first {
            out.deleted += self.purge_below(cut, None)?;
            self.index().drop_below(cut);
            self.trim_streams(cut, None)?;
        }
        // Streams with no data left, declared before the window; then silent vehicles.
        let mut forget_keys = Vec::new();
        {
            let mut index = self.index();
            out.bytes_left = index.total_bytes();
            let stale: Vec<Key> = index
                .streams
                .iter()
                .filter(|(_, st)| {
                    st.seen.is_empty() && st.declared_ns.unwrap_or(i64::MIN) < min_received_ns
                })
                .map(|(k, _)| k.clone())
                .collect();
            for key in &stale {
                index.streams.remove(key);
                forget_keys.push(stream_key_name(&key.0, key.1, key.2));
                out.pruned_streams.push(StreamKey {
                    vehicle: key.0.clone(),
                    session: key.1,
                    stream_id: key.2,
                });
            }
            let silent: Vec<String> = index
                .vehicles
                .iter()
                .filter(|(v, (at, _))| {
                    *at < min_received_ns
                        && !index.streams.keys().any(|(sv, _, _)| &**sv == v.as_str())
                })
                .map(|(v, _)| v.clone())
                .collect();
            for v in silent {
                index.vehicles.remove(&v);
                forget_keys.push(vehicle_key_name(&v));
            }
        }
        self.kv_delete(forget_keys)?;
        Ok(out)
    }

    fn log_len(&self) -> Result<u64, StoreError> {
        Ok(self.state()?.messages)
    }
}

/// A batch: each vehicle's records, committed as atomic batches that expect the vehicle's
/// subjects to end where this store last saw them (fencing per vehicle; cursors come from
/// the commit).
struct JetStreamBatch {
    store: JetStreamStore,
    /// vehicle (subject token) -> the last sequence its first record expects.
    expect: HashMap<String, u64>,
    records: Vec<Pending>,
    seen: HashSet<(Arc<str>, u64, u32, u64)>,
    streams: Declarations,
    vehicles: HashMap<String, i64>,
}

impl std::fmt::Debug for JetStreamBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamBatch")
            .field("vehicles", &self.expect.len())
            .field("records", &self.records.len())
            .finish()
    }
}

impl StoreBatch for JetStreamBatch {
    fn contains(&self, r: SeqRef<'_>) -> Result<bool, StoreError> {
        if self
            .seen
            .contains(&(r.vehicle.into(), r.session, r.stream_id, r.seq))
        {
            return Ok(true);
        }
        Ok(self
            .store
            .index()
            .stream(r.vehicle, r.session, r.stream_id)
            .is_some_and(|s| s.contains(r.seq)))
    }

    fn append(
        &mut self,
        vehicle: &Arc<str>,
        kind: i32,
        mut message: SubscribeResponse,
        seq: Option<SeqRef<'_>>,
    ) -> Result<u64, StoreError> {
        // Stored without a cursor: the log's sequence is the cursor, known at commit.
        message.cursor = 0;
        let subject = self.store.subject(vehicle, &message);
        let owner = record_scope(&message)
            .map_or(&**vehicle, |(v, _)| v)
            .to_owned();
        if !self.expect.contains_key(&owner) {
            let last = self.store.index().vehicle_last.get(&owner).copied();
            self.expect.insert(owner.clone(), last.unwrap_or(0));
        }
        let payload = Bytes::from(message.encode_to_vec());
        if let Some(r) = seq {
            self.seen
                .insert((r.vehicle.into(), r.session, r.stream_id, r.seq));
        }
        self.records.push(Pending {
            subject,
            owner,
            payload,
            entry: LogEntry {
                cursor: 0,
                vehicle: vehicle.clone(),
                kind,
                message,
            },
        });
        Ok(0)
    }

    fn classify_stream(&self, info: &StreamInfo) -> Result<Declared, StoreError> {
        let Some(s) = &info.stream else {
            return Ok(Declared::Same);
        };
        let key: Key = (s.vehicle_id.as_str().into(), s.session_id, s.stream_id);
        let stored = match self.streams.get(&key) {
            Some((i, _)) => Some(i.clone()),
            None => self
                .store
                .index()
                .streams
                .get(&key)
                .and_then(|st| st.info.clone()),
        };
        if let Some(old) = stored {
            return Ok(if old.encode_to_vec() == info.encode_to_vec() {
                Declared::Same
            } else {
                Declared::Conflict
            });
        }
        Ok(if self.session_has_streams(&s.vehicle_id, s.session_id) {
            Declared::Conflict
        } else {
            Declared::New
        })
    }

    fn session_is_new(&self, info: &StreamInfo) -> Result<bool, StoreError> {
        let Some(s) = &info.stream else {
            return Ok(false);
        };
        Ok(!self.session_has_streams(&s.vehicle_id, s.session_id))
    }

    fn put_stream(&mut self, info: &StreamInfo, now_ns: i64) -> Result<bool, StoreError> {
        let Some(s) = &info.stream else {
            return Ok(false);
        };
        let key: Key = (s.vehicle_id.as_str().into(), s.session_id, s.stream_id);
        if let Some(entry) = self.streams.get_mut(&key) {
            entry.1 = now_ns;
            return Ok(false);
        }
        let stored = self
            .store
            .index()
            .streams
            .get(&key)
            .and_then(|st| st.info.clone());
        let new = stored.is_none();
        self.streams
            .insert(key, (stored.unwrap_or_else(|| info.clone()), now_ns));
        Ok(new)
    }

    fn touch_vehicle(&mut self, vehicle: &str, now_ns: i64) -> Result<(), StoreError> {
        self.vehicles.insert(vehicle.to_owned(), now_ns);
        Ok(())
    }

    fn commit(self: Box<Self>) -> Result<Vec<LogEntry>, StoreError> {
        let JetStreamBatch {
            store,
            expect,
            mut records,
            streams,
            vehicles,
            ..
        } = *self;
        let result = commit(&store, &expect, &mut records, &streams, &vehicles);
        let mut index = store.index();
        if let Err(e) = result {
            // Part of it may be stored: catch up with the log before the next batch.
            index.stale = true;
            return Err(e);
        }
        for p in &records {
            index.apply_committed(p.entry.cursor, &p.owner, &p.entry.message);
        }
        for ((v, s, id), (info, declared)) in &streams {
            let st = index.stream_mut(v, *s, *id);
            if st.info.is_none() {
                st.info = Some(info.clone());
            }
            st.declared_ns = Some(*declared);
        }
        for (v, at) in &vehicles {
            let entry = index.vehicles.entry(v.clone()).or_insert((*at, None));
            entry.0 = *at;
            if should_persist(entry.1, *at) {
                entry.1 = Some(*at);
            }
        }
        drop(index);
        let mut entries: Vec<LogEntry> = records.into_iter().map(|p| p.entry).collect();
        entries.sort_by_key(|e| e.cursor);
        Ok(entries)
    }
}

/// A record of a batch on its way to the log.
struct Pending {
    subject: String,
    /// The vehicle whose subjects it goes to.
    owner: String,
    payload: Bytes,
    entry: LogEntry,
}

impl JetStreamBatch {
    fn session_has_streams(&self, vehicle: &str, session: u64) -> bool {
        let v: Arc<str> = vehicle.into();
        self.streams
            .range((v.clone(), session, 0)..=(v, session, u32::MAX))
            .next()
            .is_some()
            || self.store.index().session_has_streams(vehicle, session)
    }
}

fn should_persist(persisted: Option<i64>, at: i64) -> bool {
    persisted.is_none_or(|p| at.saturating_sub(p) >= VEHICLE_PERSIST_EVERY_NS || at < p)
}

/// Atomic batches in flight at once (JetStream bounds them per stream).
const CONCURRENT_BATCHES: usize = 16;

/// Where a vehicle's records are in the batch, and their cursors once committed.
type VehicleOutcome = (Vec<usize>, Result<Vec<u64>, StoreError>);

/// One vehicle's share of a batch.
struct VehicleBatch {
    /// Where its records are in the batch.
    records_at: Vec<usize>,
    /// The last sequence on its subjects its first record expects.
    expected: u64,
    /// Its subjects.
    filter: String,
    /// (subject, payload) of each record.
    messages: Vec<(String, Bytes)>,
}

/// Publishes each vehicle's records as atomic batches that expect the vehicle's subjects to
/// end where `expect` says (a vehicle written meanwhile by another node is refused whole:
/// [`StoreError::Fenced`]), sets the records' cursors, then writes the bucket; returns once
/// all of it is durable.
fn commit(
    store: &JetStreamStore,
    expect: &HashMap<String, u64>,
    records: &mut [Pending],
    streams: &Declarations,
    vehicles: &HashMap<String, i64>,
) -> Result<(), StoreError> {
    // Each vehicle's records, in the order appended.
    let mut by_vehicle: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, p) in records.iter().enumerate() {
        by_vehicle.entry(p.owner.as_str()).or_default().push(i);
    }
    let jobs: Vec<VehicleBatch> = by_vehicle
        .into_iter()
        .map(|(v, records_at)| VehicleBatch {
            messages: records_at
                .iter()
                .map(|&i| (records[i].subject.clone(), records[i].payload.clone()))
                .collect(),
            records_at,
            expected: expect.get(v).copied().unwrap_or(0),
            filter: format!("{}.{}.>", store.shared.prefix, hex(v)),
        })
        .collect();
    let client = store.shared.client.clone();
    let timeout = store.shared.timeout;
    let outcomes = store.run(async move {
        let results: Vec<VehicleOutcome> = futures::stream::iter(jobs.into_iter().map(|job| {
            let client = client.clone();
            async move {
                let r =
                    publish_vehicle(client, job.expected, job.filter, job.messages, timeout).await;
                (job.records_at, r)
            }
        }))
        .buffer_unordered(CONCURRENT_BATCHES)
        .collect()
        .await;
        Ok(results)
    })?;
    let mut first_error = None;
    for (idx, result) in outcomes {
        match result {
            Ok(cursors) => {
                for (&i, cursor) in idx.iter().zip(cursors) {
                    records[i].entry.cursor = cursor;
                    records[i].entry.message.cursor = cursor;
                }
            }
            Err(e) => {
                // A fenced vehicle first: it tells the most.
                if first_error.is_none() || matches!(e, StoreError::Fenced { .. }) {
                    first_error = Some(e);
                }
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let mut puts: Vec<(String, Bytes)> = Vec::new();
    for ((v, s, id), (info, declared)) in streams {
        let mut value = declared.to_be_bytes().to_vec();
        info.encode(&mut value)
            .map_err(|e| StoreError::js("encoding a descriptor", e))?;
        puts.push((stream_key_name(v, *s, *id), value.into()));
    }
    {
        let index = store.index();
        for (v, at) in vehicles {
            let persisted = index.vehicles.get(v).and_then(|(_, p)| *p);
            if should_persist(persisted, *at) {
                puts.push((
                    vehicle_key_name(v),
                    Bytes::copy_from_slice(&at.to_be_bytes()),
                ));
            }
        }
    }
    if !puts.is_empty() {
        let kv = store.shared.kv.clone();
        store.run(async move {
            let acks = futures::future::join_all(puts.into_iter().map(|(k, v)| {
                let kv = kv.clone();
                async move { kv.put(k, v).await }
            }))
            .await;
            for a in acks {
                a.map_err(|e| StoreError::js("writing the meta bucket", e))?;
            }
            Ok(())
        })?;
    }
    Ok(())
}

/// A batch id: 128 random bits in hex.
fn batch_id() -> Result<String, StoreError> {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| StoreError::js("batch id", "no randomness"))?;
    let mut out = String::with_capacity(32);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    Ok(out)
}

/// One vehicle's records as atomic batches of at most [`MAX_ATOMIC_BATCH`], the first
/// expecting the vehicle's subjects (`filter`) to end at `expected`, each next one where the
/// one before ended; the cursor of every record.
async fn publish_vehicle(
    client: async_nats::Client,
    mut expected: u64,
    filter: String,
    messages: Vec<(String, Bytes)>,
    timeout: Duration,
) -> Result<Vec<u64>, StoreError> {
    let mut cursors = Vec::with_capacity(messages.len());
    let mut messages = messages.into_iter().peekable();
    while messages.peek().is_some() {
        let chunk: Vec<(String, Bytes)> = messages.by_ref().take(MAX_ATOMIC_BATCH).collect();
        let n = chunk.len() as u64;
        let last = publish_atomic(
            client.clone(),
            batch_id()?,
            expected,
            &filter,
            chunk,
            timeout,
        )
        .await?;
        // A broken server could answer a last sequence below the batch's size.
        let first = (last + 1)
            .checked_sub(n)
            .filter(|&f| f > expected)
            .ok_or_else(|| {
                StoreError::js(
                    "commit batch",
                    format!("{n} messages acknowledged at sequence {last}, not after {expected}"),
                )
            })?;
        cursors.extend(first..=last);
        expected = last;
    }
    Ok(cursors)
}

/// Attempts at creating the log stream or the meta bucket on open.
const CREATE_ATTEMPTS: u32 = 3;

/// Runs `create` until it succeeds, at most [`CREATE_ATTEMPTS`] times: a cluster that has
/// just formed can take longer than one request to place a replicated stream, and creating
/// is idempotent.
async fn create_with_retries<T, E: std::fmt::Display, F>(
    op: &'static str,
    mut create: impl FnMut() -> F,
) -> Result<T, StoreError>
where
    F: std::future::Future<Output = Result<T, E>>,
{
    let mut attempt = 1;
    loop {
        match create().await {
            Ok(v) => return Ok(v),
            Err(e) if attempt >= CREATE_ATTEMPTS => return Err(StoreError::js(op, e)),
            Err(e) => {
                tracing::warn!(error = %e, attempt, "{op}; asking again");
                attempt += 1;
            }
        }
    }
}

/// One JetStream atomic batch: every message but the last published plainly, the last as a
/// request carrying the commit; the first expects the last sequence on `filter` to be
/// `expected_last`. Returns the sequence of the last message stored.
async fn publish_atomic(
    client: async_nats::Client,
    batch_id: String,
    expected_last: u64,
    filter: &str,
    messages: Vec<(String, Bytes)>,
    timeout: Duration,
) -> Result<u64, StoreError> {
    let n = messages.len();
    let mut reply = None;
    for (i, (subject, payload)) in messages.into_iter().enumerate() {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Batch-Id", batch_id.as_str());
        headers.insert("Nats-Batch-Sequence", (i + 1).to_string().as_str());
        if i == 0 {
            headers.insert(
                "Nats-Expected-Last-Subject-Sequence",
                expected_last.to_string().as_str(),
            );
            headers.insert("Nats-Expected-Last-Subject-Sequence-Subject", filter);
        }
        if i + 1 == n {
            headers.insert("Nats-Batch-Commit", "1");
            let request = async_nats::Request::new()
                .headers(headers)
                .payload(payload)
                .timeout(Some(timeout));
            reply = Some(
                client
                    .send_request(subject, request)
                    .await
                    .map_err(|e| StoreError::js("committing a batch", e))?,
            );
        } else {
            client
                .publish_with_headers(subject, headers, payload)
                .await
                .map_err(|e| StoreError::js("publishing a batch", e))?;
        }
    }
    let Some(reply) = reply else {
        return Ok(expected_last);
    };
    if reply.status == Some(StatusCode::NO_RESPONDERS) {
        return Err(StoreError::js(
            "committing a batch",
            "no JetStream stream answers",
        ));
    }
    let ack: CommitReply = serde_json::from_slice(&reply.payload)
        .map_err(|e| StoreError::js("committing a batch", e))?;
    if let Some(e) = ack.error {
        if e.err_code == ERR_WRONG_LAST_SEQUENCE {
            let found = e
                .description
                .rsplit(' ')
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            return Err(StoreError::Fenced {
                expected: expected_last,
                found,
            });
        }
        return Err(StoreError::js(
            "committing a batch",
            format!("{} {} {}", e.code, e.err_code, e.description),
        ));
    }
    if ack.count != n {
        return Err(StoreError::js(
            "committing a batch",
            format!("{} of {n} messages committed", ack.count),
        ));
    }
    Ok(ack.seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vehicle_ids_become_one_subject_token_and_back() {
        for id in ["amb-1", "a.b c*>", "ü"] {
            let h = hex(id);
            assert!(h.chars().all(|c| c.is_ascii_hexdigit()));
            assert_eq!(unhex(&h).as_deref(), Some(id));
        }
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("abc"), None);
    }

    #[test]
    fn stored_seqs_are_kept_as_runs_of_increasing_cursors() {
        let mut s = StreamState::default();
        // Arrival order (cursors 100, 101, ...): 0..=2 in order, 5, then 4 and 3 late, 9.
        for (i, seq) in [0, 1, 2, 5, 4, 3, 9].into_iter().enumerate() {
            s.insert(seq, 100 + i as u64);
        }
        // 3 extends 0..3 (its cursor is higher); 4 stays alone (stored before 3).
        let runs: Vec<(u64, u64)> = s.seen.iter().map(|(a, r)| (*a, r.end)).collect();
        assert_eq!(runs, vec![(0, 4), (4, 5), (5, 6), (9, 10)]);
        assert!(s.contains(5) && !s.contains(6) && s.contains(9) && !s.contains(10));
        assert_eq!(s.top(), Some((9, 106)));
        s.insert(3, 200);
        assert_eq!(s.seen.len(), 4, "a duplicate changes nothing");
        s.insert(10, 107);
        let run = s
            .seen
            .get(&9)
            .map(|r| (r.end, r.first_cursor, r.last_cursor));
        assert_eq!(run, Some((11, 106, 107)));
    }

    #[test]
    fn byte_runs_find_the_cut_that_keeps_a_bound() {
        let mut r = Runs::default();
        for c in 1..=10 {
            r.add(c, 100, 1);
        }
        assert_eq!(r.total, 1000);
        assert_eq!(r.cut_for(1000), None);
        assert_eq!(r.cut_for(350), Some(8), "keeps 8, 9, 10");
        r.drop_below(8);
        assert_eq!(r.total, 300);
        let mut coarse = Runs::default();
        for c in 1..=10 {
            coarse.add(c, 100, 250);
        }
        assert_eq!(coarse.runs.len(), 4, "runs of about 250 bytes");
    }
}
