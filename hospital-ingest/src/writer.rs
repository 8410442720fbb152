//! The single store writer: batches frames from every connection into one transaction,
//! runs reassembly, commits durably, then acknowledges and publishes what was committed.
//! It runs on its own thread because redb is synchronous and a commit waits for fsync.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use relay_proto::model::{
    ClockOffset, DataRecord, Frame, GapClosed, GapRecord, StreamDescriptor, StreamInfo, StreamKind,
    StreamRef, SubscribeResponse, TimestampCheck, frame::Payload, subscribe_response::Record,
};
use tokio::sync::{OwnedSemaphorePermit, broadcast, mpsc, oneshot};
use tokio::time::Instant;

use crate::reassembly::{Arrival, Limits, Output, Reassembler, StreamKey};
use crate::store::{Declared, LogEntry, SeqRef, Store, StoreError};

/// Frames written per transaction at most; bounds commit latency and memory.
const MAX_BATCH: usize = 1024;

/// (stream id, seq) the ingest now holds durably.
pub type AckSender = mpsc::Sender<(u32, u64)>;

/// Why a Hello's streams were not registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamsRefused {
    /// The session exists with other descriptors, or without this stream.
    #[error("stream {stream_id} differs from the session's first Hello")]
    SessionMismatch {
        /// The first stream that differs.
        stream_id: u32,
    },
    /// The vehicle opened its quota of new sessions in the last hour.
    #[error("more than {per_hour} new sessions of this vehicle in an hour")]
    SessionQuota {
        /// The quota.
        per_hour: usize,
    },
}

/// New sessions per vehicle in the last hour, bounded by the quota.
#[derive(Debug)]
pub struct SessionQuota {
    per_hour: usize,
    opened: HashMap<Arc<str>, VecDeque<Instant>>,
}

impl SessionQuota {
    /// A quota of `per_hour` new sessions per vehicle.
    pub fn new(per_hour: usize) -> Self {
        Self {
            per_hour,
            opened: HashMap::new(),
        }
    }

    /// Whether `vehicle` may open a new session at `now`; if so, it is counted.
    pub fn admit(&mut self, vehicle: &Arc<str>, now: Instant) -> bool {
        let hour = Duration::from_secs(3600);
        let times = self.opened.entry(vehicle.clone()).or_default();
        while times
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) >= hour)
        {
            times.pop_front();
        }
        if times.len() >= self.per_hour {
            return false;
        }
        times.push_back(now);
        true
    }
}

/// What the QUIC side asks of the store writer.
#[derive(Debug)]
pub enum WriterCmd {
    /// This node now owns the vehicle (several ingest nodes on one log): its streams'
    /// reassembly is restored from the log as it stands, whoever wrote it last.
    Adopt {
        /// The vehicle.
        vehicle: Arc<str>,
        /// Answered once restored (with the store's error, if reading it failed).
        done: oneshot::Sender<Result<(), String>>,
    },
    /// Registers the streams of a vehicle session (from its Hello).
    Streams {
        /// The vehicle.
        vehicle: Arc<str>,
        /// Its session.
        session: u64,
        /// The streams the Hello declared.
        streams: Vec<StreamDescriptor>,
        /// Answered once stored.
        done: oneshot::Sender<Result<(), StreamsRefused>>,
    },
    /// Store a frame and acknowledge it once durable.
    Frame {
        /// The vehicle.
        vehicle: Arc<str>,
        /// Its session.
        session: u64,
        /// The frame.
        frame: Frame,
        /// When it arrived (UTC ns).
        received_ns: i64,
        /// The vehicle clock's offset estimate then.
        vehicle_clock: Option<ClockOffset>,
        /// Whether its capture time is plausible.
        capture_time_check: TimestampCheck,
        /// Where to report it durable.
        ack: AckSender,
        /// The read budget its bytes took; given back once the writer has the frame.
        budget: Vec<OwnedSemaphorePermit>,
    },
}

impl WriterCmd {
    /// The vehicle it concerns.
    pub fn vehicle(&self) -> &Arc<str> {
        match self {
            Self::Adopt { vehicle, .. }
            | Self::Streams { vehicle, .. }
            | Self::Frame { vehicle, .. } => vehicle,
        }
    }
}

/// How the writer thread runs.
#[derive(Debug, Clone)]
pub struct WriterSettings {
    /// Commands queued at most.
    pub queue: usize,
    /// Reassembly bounds.
    pub limits: Limits,
    /// What the store keeps.
    pub retention: RetentionPolicy,
    /// New sessions per vehicle and hour.
    pub sessions_per_hour: usize,
    /// Least time from one commit's start to the next.
    pub commit_interval: Duration,
}

/// Reopening the writer after a failed commit: first and longest wait between attempts.
const REOPEN_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

#[derive(Debug, Clone)]
/// What the store keeps.
pub struct RetentionPolicy {
    /// Records older than this are deleted.
    pub max_age: Duration,
    /// The log is kept below this many bytes.
    pub max_bytes: u64,
    /// One vehicle's records are kept below this many bytes (its oldest deleted first).
    pub max_bytes_per_vehicle: u64,
    /// How often retention runs.
    pub interval: Duration,
}

/// A frame on its way through reassembly; acknowledged once stored.
#[derive(Debug)]
struct Pending {
    frame: Frame,
    received_ns: i64,
    vehicle_clock: Option<ClockOffset>,
    capture_time_check: TimestampCheck,
    ack: AckSender,
}

struct StreamMeta {
    kind: i32,
    rate_hz: f64,
}

struct Writer {
    store: Store,
    reassembler: Reassembler<Pending>,
    limits: Limits,
    meta: HashMap<StreamKey, StreamMeta>,
    bus: broadcast::Sender<Arc<LogEntry>>,
    /// Whether the writer publishes what it commits (else the store does, in log order). It
    /// does exactly when it is the log's only writer.
    publishes: bool,
    sessions: SessionQuota,
    /// Vehicles with frames in the batch being committed (released from reordering or new).
    unstored: HashSet<Arc<str>>,
    /// When each vehicle's last-seen time was last stored (UTC ns): stored again only
    /// [`LAST_SEEN_RESOLUTION_NS`] later, not on every batch (a store write each).
    last_seen_stored: HashMap<Arc<str>, i64>,
}

/// How stale a vehicle's stored last-seen time may be.
const LAST_SEEN_RESOLUTION_NS: i64 = 1_000_000_000;

fn stream_ref(key: &StreamKey, kind: i32) -> StreamRef {
    StreamRef {
        vehicle_id: key.vehicle.to_string(),
        session_id: key.session,
        stream_id: key.stream_id,
        kind,
    }
}

/// Capture time just after the last sample of `frame`.
fn frame_end_ns(frame: &Frame, rate_hz: f64) -> i64 {
    match &frame.payload {
        Some(Payload::Waveform(w)) if rate_hz > 0.0 => frame
            .capture_time_ns
            .saturating_add((w.sample_count as f64 * 1e9 / rate_hz).round() as i64),
        _ => frame.capture_time_ns,
    }
}

fn message(record: Record) -> SubscribeResponse {
    SubscribeResponse {
        cursor: 0,
        record: Some(record),
        ..Default::default()
    }
}

/// What one batch has to do after its commit.
#[derive(Default)]
struct AfterCommit {
    acks: Vec<(AckSender, u32, u64)>,
    replies: Vec<oneshot::Sender<Result<(), StreamsRefused>>>,
}

impl Writer {
    fn open(
        store: Store,
        bus: broadcast::Sender<Arc<LogEntry>>,
        limits: Limits,
        sessions: SessionQuota,
    ) -> Result<Self, StoreError> {
        let mut meta = HashMap::new();
        for info in store.streams()? {
            if let (Some(s), Some(d)) = (info.stream, info.descriptor) {
                let key = StreamKey {
                    vehicle: s.vehicle_id.into(),
                    session: s.session_id,
                    stream_id: s.stream_id,
                };
                let rate_hz = d.waveform.map_or(0.0, |w| w.sample_rate_hz);
                meta.insert(
                    key,
                    StreamMeta {
                        kind: d.kind,
                        rate_hz,
                    },
                );
            }
        }
        let mut reassembler = Reassembler::new(limits);
        for s in store.stored_streams(limits.max_gaps)? {
            let rate = meta.get(&s.key).map_or(0.0, |m| m.rate_hz);
            let end = match store.record(s.last_cursor)?.and_then(|m| m.record) {
                Some(Record::Data(DataRecord { frame: Some(f), .. })) => frame_end_ns(&f, rate),
                _ => 0,
            };
            reassembler.restore(s.key, s.next_seq, s.holes, end);
        }
        let publishes = !store.publish_to(&bus);
        Ok(Self {
            store,
            reassembler,
            limits,
            meta,
            bus,
            publishes,
            sessions,
            unstored: HashSet::new(),
            last_seen_stored: HashMap::new(),
        })
    }

    /// Restores `vehicle`'s streams from the store (descriptors, high-water marks, holes):
    /// what another node wrote while it owned the vehicle counts from here.
    fn adopt(&mut self, vehicle: &Arc<str>) -> Result<(), StoreError> {
        for info in self.store.streams()? {
            if let (Some(s), Some(d)) = (info.stream, info.descriptor)
                && *s.vehicle_id == **vehicle
            {
                let key = StreamKey {
                    vehicle: vehicle.clone(),
                    session: s.session_id,
                    stream_id: s.stream_id,
                };
                let rate_hz = d.waveform.map_or(0.0, |w| w.sample_rate_hz);
                self.meta.insert(
                    key,
                    StreamMeta {
                        kind: d.kind,
                        rate_hz,
                    },
                );
            }
        }
        for s in self.store.stored_streams(self.limits.max_gaps)? {
            if s.key.vehicle != *vehicle {
                continue;
            }
            let rate = self.meta.get(&s.key).map_or(0.0, |m| m.rate_hz);
            let end = match self.store.record(s.last_cursor)?.and_then(|m| m.record) {
                Some(Record::Data(DataRecord { frame: Some(f), .. })) => frame_end_ns(&f, rate),
                _ => 0,
            };
            self.reassembler.restore(s.key, s.next_seq, s.holes, end);
        }
        Ok(())
    }

    fn kind_and_rate(&self, key: &StreamKey) -> (i32, f64) {
        self.meta
            .get(key)
            .map_or((StreamKind::Unspecified as i32, 0.0), |m| {
                (m.kind, m.rate_hz)
            })
    }

    /// Appends reassembly outputs to the batch, in order.
    fn publish(
        &mut self,
        batch: &mut crate::store::WriteBatch,
        outputs: Vec<Output<Pending>>,
        after: &mut AfterCommit,
    ) -> Result<(), StoreError> {
        for o in outputs {
            match o {
                Output::Deliver {
                    key,
                    seq,
                    item,
                    late,
                } => {
                    self.unstored.insert(key.vehicle.clone());
                    let (kind, _) = self.kind_and_rate(&key);
                    let data = DataRecord {
                        stream: Some(stream_ref(&key, kind)),
                        frame: Some(item.frame),
                        late,
                        received_time_ns: item.received_ns,
                        vehicle_clock: item.vehicle_clock,
                        capture_time_check: item.capture_time_check as i32,
                    };
                    let seq_ref = SeqRef {
                        vehicle: &key.vehicle,
                        session: key.session,
                        stream_id: key.stream_id,
                        seq,
                    };
                    batch.append(
                        &key.vehicle,
                        kind,
                        message(Record::Data(data)),
                        Some(seq_ref),
                    )?;
                    after.acks.push((item.ack, key.stream_id, seq));
                    metrics::counter!("relay_ingest_frames_stored_total", "kind" => crate::metrics::kind_label(kind)).increment(1);
                    if late {
                        metrics::counter!("relay_ingest_frames_late_total").increment(1);
                    }
                }
                Output::Gap { key, gap } => {
                    let (kind, _) = self.kind_and_rate(&key);
                    metrics::counter!("relay_ingest_gaps_total").increment(1);
                    let rec = GapRecord {
                        stream: Some(stream_ref(&key, kind)),
                        start_seq: gap.start_seq,
                        end_seq: gap.end_seq,
                        start_time_ns: gap.start_time_ns,
                        end_time_ns: gap.end_time_ns,
                    };
                    batch.append(&key.vehicle, kind, message(Record::Gap(rec)), None)?;
                }
                Output::GapClosed {
                    key,
                    start_seq,
                    end_seq,
                } => {
                    let (kind, _) = self.kind_and_rate(&key);
                    let rec = GapClosed {
                        stream: Some(stream_ref(&key, kind)),
                        start_seq,
                        end_seq,
                    };
                    batch.append(&key.vehicle, kind, message(Record::GapClosed(rec)), None)?;
                }
            }
        }
        Ok(())
    }

    fn run_batch(&mut self, cmds: Vec<WriterCmd>, now: Instant) -> Result<(), StoreError> {
        self.unstored.clear();
        let now_ns = crate::now_utc_ns();
        let mut batch = self.store.begin()?;
        let mut after = AfterCommit::default();
        let mut touched: HashSet<Arc<str>> = HashSet::new();
        for cmd in cmds {
            match cmd {
                WriterCmd::Adopt { vehicle, done } => {
                    let restored = self.adopt(&vehicle).map_err(|e| e.to_string());
                    let _ = done.send(restored);
                }
                WriterCmd::Streams {
                    vehicle,
                    session,
                    streams,
                    done,
                } => {
                    let infos: Vec<(StreamKey, StreamDescriptor, StreamInfo)> = streams
                        .into_iter()
                        .map(|d| {
                            let key = StreamKey {
                                vehicle: vehicle.clone(),
                                session,
                                stream_id: d.stream_id,
                            };
                            let info = StreamInfo {
                                stream: Some(stream_ref(&key, d.kind)),
                                descriptor: Some(d.clone()),
                            };
                            (key, d, info)
                        })
                        .collect();
                    // A session's descriptors are fixed at its first Hello: stored samples
                    // are read with them, so a redeclaration may not change them.
                    let mut conflict = None;
                    for (key, _, info) in &infos {
                        if batch.classify_stream(info)? == Declared::Conflict {
                            conflict = Some(key.stream_id);
                            break;
                        }
                    }
                    if let Some(stream_id) = conflict {
                        let _ = done.send(Err(StreamsRefused::SessionMismatch { stream_id }));
                        continue;
                    }
                    let new_session = match infos.first() {
                        Some((_, _, info)) => batch.session_is_new(info)?,
                        None => false,
                    };
                    if new_session && !self.sessions.admit(&vehicle, now) {
                        let per_hour = self.sessions.per_hour;
                        let _ = done.send(Err(StreamsRefused::SessionQuota { per_hour }));
                        continue;
                    }
                    for (key, d, info) in infos {
                        let rate_hz = d.waveform.as_ref().map_or(0.0, |w| w.sample_rate_hz);
                        if batch.put_stream(&info, now_ns)? {
                            batch.append(&vehicle, d.kind, message(Record::Stream(info)), None)?;
                        }
                        self.meta.insert(
                            key,
                            StreamMeta {
                                kind: d.kind,
                                rate_hz,
                            },
                        );
                    }
                    touched.insert(vehicle);
                    after.replies.push(done);
                }
                WriterCmd::Frame {
                    vehicle,
                    session,
                    frame,
                    received_ns,
                    vehicle_clock,
                    capture_time_check,
                    ack,
                    budget,
                } => {
                    // The frame is the writer's now: its read budget goes back.
                    drop(budget);
                    touched.insert(vehicle.clone());
                    let key = StreamKey {
                        vehicle,
                        session,
                        stream_id: frame.stream_id,
                    };
                    let seq = frame.seq;
                    let stored = SeqRef {
                        vehicle: &key.vehicle,
                        session,
                        stream_id: key.stream_id,
                        seq,
                    };
                    // Above the delivered mark, a frame is new without asking the store, when
                    // this writer is the log's only one (it saw every stored frame).
                    let surely_new = self.publishes && self.reassembler.above_delivered(&key, seq);
                    if !surely_new && batch.contains(stored)? {
                        metrics::counter!("relay_ingest_frames_duplicate_total").increment(1);
                        after.acks.push((ack, key.stream_id, seq));
                        continue;
                    }
                    let (_, rate) = self.kind_and_rate(&key);
                    let (capture, end) = (frame.capture_time_ns, frame_end_ns(&frame, rate));
                    let item = Pending {
                        frame,
                        received_ns,
                        vehicle_clock,
                        capture_time_check,
                        ack,
                    };
                    let (arrival, outputs) = self
                        .reassembler
                        .on_frame(&key, seq, capture, end, item, now);
                    match arrival {
                        Arrival::Taken => {}
                        Arrival::Replaced(_) => {
                            metrics::counter!("relay_ingest_frames_duplicate_total").increment(1);
                        }
                        Arrival::Stale(item) => {
                            metrics::counter!("relay_ingest_frames_duplicate_total").increment(1);
                            after.acks.push((item.ack, key.stream_id, seq));
                        }
                    }
                    self.publish(&mut batch, outputs, &mut after)?;
                }
            }
        }
        let expired = self.reassembler.on_timeout(now);
        self.publish(&mut batch, expired, &mut after)?;
        let mut seen_now = Vec::new();
        for v in touched {
            let stored = self.last_seen_stored.get(&v);
            if stored.is_none_or(|&t| now_ns.saturating_sub(t) >= LAST_SEEN_RESOLUTION_NS) {
                batch.touch_vehicle(&v, now_ns)?;
                seen_now.push(v);
            }
        }
        metrics::gauge!("relay_ingest_reorder_held_frames").set(self.reassembler.held() as f64);
        let started = Instant::now();
        let appended = batch.commit()?;
        metrics::histogram!("relay_ingest_store_commit_seconds")
            .record(started.elapsed().as_secs_f64());
        for v in seen_now {
            self.last_seen_stored.insert(v, now_ns);
        }
        // Durable now: acknowledge, answer, publish.
        for (tx, stream, seq) in after.acks {
            if tx.try_send((stream, seq)).is_err() {
                // The connection is gone or not draining its acks (it is then closed); the
                // agent re-sends unacknowledged frames after reconnecting.
                metrics::counter!("relay_ingest_acks_dropped_total").increment(1);
            }
        }
        for r in after.replies {
            let _ = r.send(Ok(()));
        }
        if self.publishes {
            for e in appended {
                // No subscriber is fine: the log holds it.
                let _ = self.bus.send(Arc::new(e));
            }
        }
        Ok(())
    }

    fn sweep(&mut self, retention: &RetentionPolicy) {
        let now_ns = crate::now_utc_ns();
        // Vehicles that went quiet are stored at once when they return.
        self.last_seen_stored
            .retain(|_, t| now_ns.saturating_sub(*t) < LAST_SEEN_RESOLUTION_NS);
        let max_age_ns = i64::try_from(retention.max_age.as_nanos()).unwrap_or(i64::MAX);
        let cutoff = now_ns.saturating_sub(max_age_ns);
        match self.store.enforce_retention(
            cutoff,
            retention.max_bytes,
            retention.max_bytes_per_vehicle,
            100_000,
        ) {
            Ok(outcome) => {
                metrics::counter!("relay_ingest_retention_deleted_total")
                    .increment(outcome.deleted);
                metrics::counter!("relay_ingest_vehicle_quota_deleted_total")
                    .increment(outcome.deleted_over_quota);
                for vehicle in &outcome.vehicles_over_quota {
                    // Far more data than one vehicle sends: worth a look, not only a delete.
                    tracing::warn!(%vehicle, "vehicle over its store quota; its oldest records deleted");
                }
                metrics::gauge!("relay_ingest_store_log_bytes").set(outcome.bytes_left as f64);
                for key in outcome.pruned_streams {
                    self.reassembler.forget(&key);
                    self.meta.remove(&key);
                }
            }
            Err(e) => tracing::error!(error = %e, "retention sweep failed"),
        }
    }
}

/// What the writer thread does in one round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterStep {
    /// Commit a batch: commands arrived or held frames' reorder window ended.
    pub batch: bool,
    /// Run the retention sweep.
    pub sweep: bool,
}

/// Sans-IO timing of the writer thread: when to wake (the first of the reassembler's next
/// reorder deadline and the next retention sweep) and what is due when it wakes.
#[derive(Debug, Clone, Copy)]
pub struct WriterTimer {
    sweep_interval: Duration,
    next_sweep: Instant,
}

impl WriterTimer {
    /// The first sweep is one interval after `now`.
    pub fn new(sweep_interval: Duration, now: Instant) -> Self {
        Self {
            sweep_interval,
            next_sweep: now + sweep_interval,
        }
    }

    /// When to wake at the latest if no command arrives.
    pub fn wake_at(&self, reorder_deadline: Option<Instant>) -> Instant {
        reorder_deadline.map_or(self.next_sweep, |d| d.min(self.next_sweep))
    }

    /// What is due at `now`, with or without commands waiting.
    pub fn poll(
        &mut self,
        now: Instant,
        has_commands: bool,
        reorder_deadline: Option<Instant>,
    ) -> WriterStep {
        let reorder_due = reorder_deadline.is_some_and(|d| d <= now);
        let sweep = now >= self.next_sweep;
        if sweep {
            self.next_sweep = now + self.sweep_interval;
        }
        WriterStep {
            batch: has_commands || reorder_due,
            sweep,
        }
    }
}

/// Starts the writer thread. Returns the command sender; the thread ends when every sender is
/// dropped, after finishing its last batch (frames still held for reordering are not
/// acknowledged and will be re-sent by their agents).
///
/// A commit that fails leaves frames taken and not stored: the writer then rebuilds its
/// reassembly from the store (waiting for the store as long as it takes) and closes the
/// connections of the vehicles whose frames it held, so their agents send every
/// unacknowledged frame again (an agent re-sends on another connection only).
pub fn spawn(
    store: Store,
    bus: broadcast::Sender<Arc<LogEntry>>,
    settings: WriterSettings,
    online: Arc<crate::quic::Online>,
    runtime: tokio::runtime::Handle,
) -> Result<(mpsc::Sender<WriterCmd>, std::thread::JoinHandle<()>), StoreError> {
    let WriterSettings {
        queue,
        limits,
        retention,
        sessions_per_hour,
        commit_interval,
    } = settings;
    let mut writer = Writer::open(store, bus, limits, SessionQuota::new(sessions_per_hour))?;
    let (tx, mut rx) = mpsc::channel::<WriterCmd>(queue);
    let handle = std::thread::Builder::new()
        .name("store-writer".into())
        .spawn(move || {
            let mut timer = WriterTimer::new(retention.interval, Instant::now());
            let mut last_commit: Option<Instant> = None;
            loop {
                let wake = timer.wake_at(writer.reassembler.next_deadline());
                let first =
                    runtime.block_on(async { tokio::time::timeout_at(wake, rx.recv()).await });
                let mut cmds = Vec::new();
                match first {
                    Ok(Some(cmd)) => cmds.push(cmd),
                    Ok(None) => break,
                    Err(_) => {}
                }
                // Group commit: what arrives until the interval is over joins this batch.
                if !cmds.is_empty()
                    && let Some(ready) = last_commit.map(|t| t + commit_interval)
                    && ready > Instant::now()
                {
                    // Created inside the runtime: a Sleep needs its timer.
                    runtime.block_on(async { tokio::time::sleep_until(ready).await });
                }
                while cmds.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(c) => cmds.push(c),
                        Err(_) => break,
                    }
                }
                metrics::gauge!("relay_ingest_store_queue_depth").set(rx.len() as f64);
                let now = Instant::now();
                let step = timer.poll(now, !cmds.is_empty(), writer.reassembler.next_deadline());
                let in_batch: HashSet<Arc<str>> =
                    cmds.iter().map(|c| c.vehicle().clone()).collect();
                if step.batch {
                    last_commit = Some(now);
                }
                if step.batch
                    && let Err(e) = writer.run_batch(cmds, now)
                {
                    // Nothing was acknowledged. The reassembler saw frames that were not
                    // stored: rebuild it from the store, never go on with it (a frame sent
                    // again would count as stored).
                    tracing::error!(error = %e, "store commit failed; batch not acknowledged");
                    metrics::counter!("relay_ingest_store_errors_total").increment(1);
                    let mut lost = in_batch;
                    lost.extend(writer.unstored.drain());
                    lost.extend(writer.reassembler.holding().map(|k| k.vehicle.clone()));
                    match reopen(&writer, &rx, &runtime) {
                        Some(mut w) => {
                            w.sessions = std::mem::replace(
                                &mut writer.sessions,
                                SessionQuota::new(sessions_per_hour),
                            );
                            writer = w;
                        }
                        None => break,
                    }
                    // The store answers again: their agents send what is unacknowledged once
                    // reconnected. Not before: until then the connections still carry live
                    // frames to early subscribers, and a new connection's Hello would wait
                    // for the store anyway.
                    let closed = online.close_vehicles(
                        &lost,
                        relay_proto::CloseCode::Overloaded,
                        "store commit failed: send unacknowledged frames again",
                    );
                    tracing::warn!(
                        vehicles = lost.len(),
                        connections = closed,
                        "closed the connections of vehicles with frames not stored"
                    );
                }
                if step.sweep {
                    writer.sweep(&retention);
                }
            }
            tracing::debug!("store writer stopped");
        })
        .map_err(|e| StoreError::Redb(redb::Error::Io(e)))?;
    Ok((tx, handle))
}

/// A writer rebuilt from the store after a failed commit, trying until the store answers;
/// None when the ingest stops meanwhile.
fn reopen(
    old: &Writer,
    rx: &mpsc::Receiver<WriterCmd>,
    runtime: &tokio::runtime::Handle,
) -> Option<Writer> {
    let (mut wait, longest) = REOPEN_BACKOFF;
    loop {
        match Writer::open(
            old.store.clone(),
            old.bus.clone(),
            old.limits,
            SessionQuota::new(0),
        ) {
            Ok(w) => return Some(w),
            Err(e) => {
                tracing::error!(error = %e, retry_in = ?wait, "reloading reassembly state failed");
                metrics::counter!("relay_ingest_store_errors_total").increment(1);
            }
        }
        if rx.is_closed() {
            return None;
        }
        runtime.block_on(async move { tokio::time::sleep(wait).await });
        wait = (wait * 2).min(longest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_sessions_are_limited_per_vehicle_over_a_sliding_hour() {
        let t0 = Instant::now();
        let mut q = SessionQuota::new(2);
        let (a, b): (Arc<str>, Arc<str>) = ("amb-1".into(), "amb-2".into());
        assert!(q.admit(&a, t0));
        assert!(q.admit(&a, t0 + Duration::from_secs(60)));
        assert!(
            !q.admit(&a, t0 + Duration::from_secs(120)),
            "third in the hour"
        );
        assert!(q.admit(&b, t0 + Duration::from_secs(120)), "per vehicle");
        assert!(
            q.admit(&a, t0 + Duration::from_secs(3600)),
            "the first left the window"
        );
        assert!(!q.admit(&a, t0 + Duration::from_secs(3601)));
    }

    #[test]
    fn the_writer_wakes_for_reordering_and_sweeps_on_its_interval() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut t = WriterTimer::new(ms(1000), t0);
        assert_eq!(t.wake_at(None), t0 + ms(1000));
        assert_eq!(t.wake_at(Some(t0 + ms(50))), t0 + ms(50));
        let idle = t.poll(t0 + ms(10), false, Some(t0 + ms(50)));
        let step = |batch, sweep| WriterStep { batch, sweep };
        assert_eq!(idle, step(false, false));
        let reorder = t.poll(t0 + ms(50), false, Some(t0 + ms(50)));
        assert_eq!(reorder, step(true, false));
        let both = t.poll(t0 + ms(1000), true, None);
        assert_eq!(both, step(true, true));
        assert_eq!(
            t.wake_at(None),
            t0 + ms(2000),
            "the next sweep one interval later"
        );
    }
}
