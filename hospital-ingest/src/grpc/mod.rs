//! The public gRPC API: ListVehicles and Subscribe (backlog from the store, a sync marker, then
//! live records from the bus; every message carries its resume cursor). Where a subscription
//! stands is the sans-IO [`flow::SubscriptionFlow`]; this module moves records and time.

pub mod early;
pub mod flow;
pub mod limits;
pub mod listener;

use std::collections::{BTreeMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use relay_proto::model::telemetry_server::Telemetry;
use relay_proto::model::{
    AcknowledgeRequest, AcknowledgeResponse, HistoryRequest, HistoryResponse, ListVehiclesRequest,
    ListVehiclesResponse, SubscribeRequest, SubscribeResponse, Vehicle, subscribe_request::Start,
    subscribe_response::Record,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::access::{AccessControl, ClientIdentity, Grant};
use crate::audit::{AuditEvent, AuditLog, Outcome};
use crate::quic::Online;
use crate::store::{LogEntry, Store, StoreError, record_scope};
use early::{EarlyFrame, EarlyLedger};
use flow::{LiveStep, SubscriptionFlow};
use limits::ClientLimits;

/// Records read from the store per page while sending a backlog.
const BACKLOG_PAGE: usize = 512;
/// How long before a rewind's capture time the store is read from (vehicle clocks ahead of
/// the ingest's by less than this are covered).
const REWIND_MARGIN_NS: i64 = 10 * 60 * 1_000_000_000;

#[derive(Debug, Clone)]
/// Who may read what, and per-subscriber bounds.
pub struct GrpcSettings {
    /// Messages queued per subscriber.
    pub subscriber_queue: usize,
    /// A subscriber whose queue stays full this long is cut off.
    pub slow_subscriber_timeout: Duration,
    /// The access policy in force.
    pub access: Arc<AccessControl>,
    /// Calls and subscriptions per client.
    pub limits: Arc<ClientLimits>,
    /// Where every call is recorded.
    pub audit: AuditLog,
    /// Irregular behaviour of clients, detected and reported.
    pub watch: crate::detect::Watch,
}

/// Every reason of `relay_ingest_grpc_denied_total`, exported at zero from start.
pub const DENIAL_REASONS: &[&str] = &[
    "unauthenticated",
    "no_grant",
    "vehicle",
    "kind",
    "call_rate",
    "subscriptions",
];

/// Vehicles a subscription's end record names at most (it delivered data of these).
const MAX_AUDITED_VEHICLES: usize = 4096;

/// An audit event of `action` by `who` from `remote`.
fn audit_event(
    action: &str,
    outcome: Outcome,
    who: Option<&ClientIdentity>,
    remote: Option<std::net::SocketAddr>,
) -> AuditEvent {
    let mut event = AuditEvent::new(action, outcome);
    event.client = who.map(Into::into);
    event.remote = remote.map(|r| r.to_string());
    event
}

#[derive(Debug, Clone)]
/// The Telemetry gRPC service.
pub struct TelemetryService {
    store: Store,
    bus: broadcast::Sender<Arc<LogEntry>>,
    /// Live frames as this node's bearers receive them, before they are durable.
    early: early::EarlySource,
    online: Arc<Online>,
    settings: GrpcSettings,
    slots: Arc<Semaphore>,
    stop: CancellationToken,
}

impl TelemetryService {
    /// The service over `store`, the live `bus` and the `early` frames, admitting
    /// `max_subscribers` at once.
    pub fn new(
        store: Store,
        bus: broadcast::Sender<Arc<LogEntry>>,
        early: early::EarlySource,
        online: Arc<Online>,
        settings: GrpcSettings,
        max_subscribers: usize,
        stop: CancellationToken,
    ) -> Self {
        Self {
            store,
            bus,
            early,
            online,
            settings,
            slots: Arc::new(Semaphore::new(max_subscribers)),
            stop,
        }
    }
}

fn internal(e: StoreError) -> Status {
    tracing::error!(error = %e, "store read failed");
    Status::internal("store unavailable")
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "store task failed");
            Status::internal("store task failed")
        })?
        .map_err(internal)
}

/// What a subscription wants, within what its client may read (worked out again when the
/// policy is reloaded).
#[derive(Debug, Clone)]
struct Filter {
    vehicles: HashSet<String>,
    kinds: HashSet<i32>,
    who: Arc<ClientIdentity>,
    access: Arc<AccessControl>,
    grant: Grant,
    generation: u64,
    /// A rewind: data captured before this is left out (`from_capture_time_ns`).
    from_capture_ns: Option<i64>,
}

impl Filter {
    /// Whether `msg` reaches into the time asked for: data captured at or after it, gaps
    /// ending after it; everything when no time was asked for.
    fn in_time(&self, msg: &SubscribeResponse) -> bool {
        let Some(from) = self.from_capture_ns else {
            return true;
        };
        match &msg.record {
            Some(Record::Data(d)) => d.frame.as_ref().is_some_and(|f| f.capture_time_ns >= from),
            Some(Record::Gap(g)) => g.end_time_ns == 0 || g.end_time_ns >= from,
            _ => true,
        }
    }

    fn matches(&self, vehicle: &str, kind: i32) -> bool {
        (self.vehicles.is_empty() || self.vehicles.contains(vehicle))
            && (self.kinds.is_empty() || self.kinds.contains(&kind))
            && self.grant.allows(vehicle, kind)
    }

    /// Takes a reloaded policy into account; true when the grant changed.
    fn refresh(&mut self) -> bool {
        if self.access.generation() == self.generation {
            return false;
        }
        let (grant, generation) = self.access.grant(&self.who);
        self.generation = generation;
        let changed = grant != self.grant;
        self.grant = grant;
        changed
    }

    fn matches_record(&self, msg: &SubscribeResponse) -> bool {
        record_scope(msg).is_some_and(|(v, k)| self.matches(v, k)) && self.in_time(msg)
    }
}

/// A status handed from the subscription task to its response stream.
type StatusSlot = Arc<std::sync::Mutex<Option<Status>>>;

fn take_status(slot: &StatusSlot) -> Option<Status> {
    slot.lock().unwrap_or_else(|p| p.into_inner()).take()
}

/// The response stream: queued messages, unless the subscriber was cut off, in which case the
/// error comes first (its queue is full by definition) and the stream ends. A subscription
/// that failed (the store could not be read) ends with its error after what was queued.
pub struct SubscriberStream {
    rx: mpsc::Receiver<SubscribeResponse>,
    cut_off: StatusSlot,
    failure: StatusSlot,
    done: bool,
    _slot: OwnedSemaphorePermit,
    _client_slot: limits::SubscriptionSlot,
}

impl Stream for SubscriberStream {
    type Item = Result<SubscribeResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Some(status) = take_status(&self.cut_off) {
            self.done = true;
            self.rx.close();
            return Poll::Ready(Some(Err(status)));
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(take_status(&self.failure).map(Err))
            }
            other => other.map(|m| m.map(Ok)),
        }
    }
}

/// Sends into a subscriber's queue; gives up (and cuts it off) when the queue stays full.
struct Outlet {
    tx: mpsc::Sender<SubscribeResponse>,
    timeout: Duration,
    cut_off: StatusSlot,
    /// For the audit: data records handed over, of which vehicles, the last cursor.
    delivered: u64,
    vehicles: std::collections::BTreeSet<String>,
    cursor: u64,
    /// Streams whose descriptor the client has (vehicle, session, stream).
    described: HashSet<(String, u64, u32)>,
    /// Frames sent provisionally (`early` subscriptions only).
    early: Option<EarlyLedger>,
}

/// Why a subscription ended early.
#[derive(Debug)]
enum Stop {
    /// The client went away.
    Gone,
    /// The client did not read; it was cut off.
    Slow,
    /// The subscription cannot go on (the store could not be read); the client gets this.
    Failed(Status),
}

impl Outlet {
    /// Sends a durable record (a data record sent provisionally before is confirmed instead).
    async fn send(&mut self, msg: SubscribeResponse) -> Result<(), Stop> {
        if let (Some(ledger), Some(Record::Data(d))) = (self.early.as_mut(), &msg.record)
            && let (Some(s), Some(f)) = (d.stream.as_ref(), d.frame.as_ref())
            && ledger.on_durable(&(s.vehicle_id.clone(), s.session_id, s.stream_id), f.seq)
        {
            let confirmed = relay_proto::model::Confirmed {
                stream: Some(s.clone()),
                seq: f.seq,
                late: d.late,
            };
            return self
                .deliver(SubscribeResponse {
                    cursor: msg.cursor,
                    record: Some(Record::Confirmed(confirmed)),
                    provisional: false,
                })
                .await;
        }
        self.deliver(msg).await
    }

    /// Sends a live frame before it is durable, when the subscriber wants it and has not had
    /// it (see [`EarlyLedger::offer_early`]).
    async fn send_early(&mut self, frame: &EarlyFrame) -> Result<(), Stop> {
        let key = (frame.vehicle.to_string(), frame.session, frame.stream_id);
        let Some(ledger) = self.early.as_mut() else {
            return Ok(());
        };
        if !self.described.contains(&key) || !ledger.offer_early(&key, frame.seq) {
            return Ok(());
        }
        metrics::counter!("relay_ingest_subscriber_early_frames_total").increment(1);
        self.deliver(frame.message.clone()).await
    }

    async fn deliver(&mut self, msg: SubscribeResponse) -> Result<(), Stop> {
        // A provisional message is no resume point: the audit's end cursor stays put.
        let cursor = if msg.provisional {
            self.cursor
        } else {
            msg.cursor
        };
        let vehicle = match &msg.record {
            Some(Record::Data(d)) => d.stream.as_ref().map(|s| s.vehicle_id.clone()),
            _ => None,
        };
        let described = match &msg.record {
            Some(Record::Stream(info)) => info
                .stream
                .as_ref()
                .map(|s| (s.vehicle_id.clone(), s.session_id, s.stream_id)),
            _ => None,
        };
        match tokio::time::timeout(self.timeout, self.tx.send(msg)).await {
            Ok(Ok(())) => {
                self.cursor = cursor;
                self.described.extend(described);
                if let Some(v) = vehicle {
                    self.delivered += 1;
                    if self.vehicles.len() < MAX_AUDITED_VEHICLES {
                        self.vehicles.insert(v);
                    }
                }
                Ok(())
            }
            Ok(Err(_)) => Err(Stop::Gone),
            Err(_) => {
                // What was still queued is dropped with the stream, so the resume point is the
                // cursor of the last message the client actually received.
                let status = Status::resource_exhausted(format!(
                    "subscriber too slow: queue full for {:?}; subscribe again with after_cursor = the cursor of the last message received",
                    self.timeout
                ));
                *self.cut_off.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
                metrics::counter!("relay_ingest_subscribers_cut_off_total").increment(1);
                Err(Stop::Slow)
            }
        }
    }
}

impl TelemetryService {
    /// Sends the descriptors of the stored streams that `filter` lets through and the client
    /// has not had yet (all at the start; those a reloaded policy newly grants later).
    async fn describe(&self, filter: &Filter, cursor: u64, out: &mut Outlet) -> Result<(), Stop> {
        let store = self.store.clone();
        let streams = blocking(move || store.streams())
            .await
            .map_err(Stop::Failed)?;
        for info in streams {
            let Some(s) = info.stream.as_ref() else {
                continue;
            };
            let key = (s.vehicle_id.clone(), s.session_id, s.stream_id);
            if filter.matches(&s.vehicle_id, s.kind) && !out.described.contains(&key) {
                out.send(SubscribeResponse {
                    cursor,
                    record: Some(Record::Stream(info)),
                    provisional: false,
                })
                .await?;
            }
        }
        Ok(())
    }

    /// Sends stored records in (after, up_to] that match; returns the last cursor examined.
    async fn send_backlog(
        &self,
        filter: &mut Filter,
        mut after: u64,
        up_to: u64,
        out: &mut Outlet,
    ) -> Result<(u64, u64), Stop> {
        let mut sent = 0;
        while after < up_to {
            let store = self.store.clone();
            let page = blocking(move || store.read_after(after, up_to, BACKLOG_PAGE))
                .await
                .map_err(Stop::Failed)?;
            let Some(last) = page.last().map(|(c, _)| *c) else {
                break;
            };
            if filter.refresh() {
                self.describe(filter, after, out).await?;
            }
            for (_, msg) in page {
                if filter.matches_record(&msg) {
                    out.send(msg).await?;
                    sent += 1;
                }
            }
            after = last;
        }
        Ok((up_to.max(after), sent))
    }

    async fn run_subscription(
        self,
        mut filter: Filter,
        start: Option<Start>,
        out: &mut Outlet,
    ) -> Result<(), Stop> {
        // Subscribe to the bus before reading the head: whatever is committed after the head
        // arrives live, so backlog and live meet without gap; duplicates are skipped by cursor.
        let mut live = self.bus.subscribe();
        let store = self.store.clone();
        let head = blocking(move || store.head()).await.map_err(Stop::Failed)?;
        // A rewind starts at the records received since a little before that capture time:
        // what was captured then cannot have arrived earlier (a vehicle clock more than the
        // margin ahead is a clock_skew finding); earlier captures are filtered out.
        let start = match start {
            Some(Start::FromCaptureTimeNs(t)) => {
                let store = self.store.clone();
                let at = t.saturating_sub(REWIND_MARGIN_NS);
                let after = blocking(move || store.cursor_before_received(at))
                    .await
                    .map_err(Stop::Failed)?;
                Some(Start::AfterCursor(after))
            }
            other => other,
        };
        let mut flow = SubscriptionFlow::new(start.as_ref(), head);
        // Descriptors of the matching streams first, so every data record can be interpreted.
        self.describe(&filter, flow.cursor(), out).await?;
        let (after, up_to) = flow.backlog();
        let (reached, backlog) = self.send_backlog(&mut filter, after, up_to, out).await?;
        flow.handle_caught_up(reached);
        out.send(flow.sync_marker(backlog)).await?;
        // Early frames are live by nature: from here on.
        let mut early = out.early.is_some().then(|| self.early.subscribe());
        loop {
            let entry = tokio::select! {
                r = live.recv() => r,
                Some(f) = next_early(&mut early) => {
                    // A reloaded policy applies at once, also while no durable record flows.
                    if filter.refresh() {
                        self.describe(&filter, flow.cursor(), out).await?;
                    }
                    if filter.matches(&f.vehicle, f.kind) && filter.in_time(&f.message) {
                        out.send_early(&f).await?;
                    }
                    continue;
                }
                () = self.stop.cancelled() => return Ok(()),
                () = out.tx.closed() => return Err(Stop::Gone),
            };
            match entry {
                Ok(e) => match flow.handle_live(e.cursor) {
                    LiveStep::Skip => {}
                    LiveStep::Deliver { heal } => {
                        if let Some((after, up_to)) = heal {
                            // Committed but not seen live (cannot happen with an intact bus;
                            // cheap to heal from the store).
                            self.send_backlog(&mut filter, after, up_to, out).await?;
                        }
                        if filter.refresh() {
                            self.describe(&filter, flow.cursor(), out).await?;
                        }
                        if filter.matches(&e.vehicle, e.kind) && filter.in_time(&e.message) {
                            out.send(e.message.clone()).await?;
                        }
                    }
                },
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    metrics::counter!("relay_ingest_subscriber_lagged_total").increment(1);
                    out.send(flow.handle_lagged(missed)).await?;
                    let store = self.store.clone();
                    let head = blocking(move || store.head()).await.map_err(Stop::Failed)?;
                    let (reached, _) = self
                        .send_backlog(&mut filter, flow.cursor(), head, out)
                        .await?;
                    flow.handle_caught_up(reached);
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            }
        }
    }
}

/// The next early frame; never, without early delivery. Frames the subscriber missed
/// (it lagged) come durable.
async fn next_early(
    rx: &mut Option<broadcast::Receiver<Arc<EarlyFrame>>>,
) -> Option<Arc<EarlyFrame>> {
    let Some(r) = rx.as_mut() else {
        return std::future::pending().await;
    };
    loop {
        match r.recv().await {
            Ok(f) => return Some(f),
            Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => {
                *rx = None;
                return std::future::pending().await;
            }
        }
    }
}

/// Why `grant` does not let a client read `vehicle`'s streams of `kind` (None: the kind is not
/// known yet, the vehicle alone is checked), as (reason label, message); None when it does.
fn stream_refusal(
    grant: &Grant,
    vehicle: &str,
    kind: Option<i32>,
) -> Option<(&'static str, String)> {
    if grant.is_empty() {
        return Some((
            "no_grant",
            "the access policy grants this client nothing".into(),
        ));
    }
    // Outside the grant the vehicle is not even named as existing.
    if !grant.sees(vehicle) {
        return Some((
            "vehicle",
            format!("not allowed to read vehicle {vehicle:?}"),
        ));
    }
    match kind {
        Some(k) if !grant.allows(vehicle, k) => {
            let kind = relay_proto::kind_label(k);
            Some(("kind", format!("not allowed to read {kind} streams")))
        }
        _ => None,
    }
}

impl TelemetryService {
    /// Refuses a call for what the access policy does not grant (`PERMISSION_DENIED`).
    fn refuse(
        &self,
        action: &str,
        (reason, message): (&'static str, String),
        who: &ClientIdentity,
        remote: Option<std::net::SocketAddr>,
    ) -> Status {
        self.deny(
            action,
            reason,
            Some(who),
            remote,
            Status::permission_denied(message),
        )
    }

    /// Refuses a call: counted, logged and audited.
    fn deny(
        &self,
        action: &str,
        reason: &'static str,
        who: Option<&ClientIdentity>,
        remote: Option<std::net::SocketAddr>,
        status: Status,
    ) -> Status {
        metrics::counter!("relay_ingest_grpc_denied_total", "reason" => reason).increment(1);
        let name = who.map_or("?", ClientIdentity::name);
        tracing::warn!(
            client = name,
            reason,
            message = status.message(),
            "gRPC call refused"
        );
        let mut event = audit_event(action, Outcome::Denied, who, remote);
        event.detail = serde_json::json!({ "reason": reason, "message": status.message() });
        self.settings.audit.record(event);
        if let Some(who) = who.filter(|_| matches!(reason, "no_grant" | "vehicle" | "kind")) {
            let now = crate::now_utc_ns();
            self.settings
                .watch
                .check(|d| d.on_subscriber_denied(now, who.name(), &who.fingerprint));
        }
        status
    }

    /// The client of a call (from its certificate), within its call rate.
    fn admit<T>(&self, req: &Request<T>, action: &str) -> Result<ClientIdentity, Status> {
        // Tests of this module put the identity in directly; over the network it comes from
        // the verified certificate of the TLS connection.
        let who = req
            .extensions()
            .get::<ClientIdentity>()
            .cloned()
            .or_else(|| {
                let certs = req.peer_certs()?;
                ClientIdentity::from_der(certs.first()?.as_ref())
            });
        let remote = req.remote_addr();
        let Some(who) = who else {
            return Err(self.deny(
                action,
                "unauthenticated",
                None,
                remote,
                Status::unauthenticated("no usable client certificate"),
            ));
        };
        if let Err(r) = self
            .settings
            .limits
            .call(&who.fingerprint, tokio::time::Instant::now())
        {
            return Err(self.deny(
                action,
                r.label(),
                Some(&who),
                remote,
                Status::resource_exhausted("too many calls from this client; slow down"),
            ));
        }
        Ok(who)
    }

    /// Writes `event` to disk before the access it describes happens.
    async fn audit_first(&self, event: AuditEvent) -> Result<(), Status> {
        if self.settings.audit.record_durable(event).await {
            Ok(())
        } else {
            Err(Status::unavailable(
                "the access audit cannot be written; no patient data without it",
            ))
        }
    }
}

/// Records one History call returns at most, by default and at most.
const HISTORY_DEFAULT_RECORDS: usize = 1000;
const HISTORY_MAX_RECORDS: usize = 10_000;
/// Encoded size one History response stays about within: below the 4 MiB gRPC clients accept
/// by default.
const HISTORY_MAX_BYTES: usize = 3 * 1024 * 1024;

/// Longest note an acknowledgement carries to the crew.
const MAX_ACK_NOTE_CHARS: usize = 500;

#[tonic::async_trait]
impl Telemetry for TelemetryService {
    async fn acknowledge(
        &self,
        req: Request<AcknowledgeRequest>,
    ) -> Result<Response<AcknowledgeResponse>, Status> {
        let who = self.admit(&req, "acknowledge")?;
        let remote = req.remote_addr();
        let req = req.into_inner();
        let Some(stream) = req.stream else {
            return Err(Status::invalid_argument("name the event's stream"));
        };
        if req.note.chars().count() > MAX_ACK_NOTE_CHARS {
            return Err(Status::invalid_argument(format!(
                "the note is longer than {MAX_ACK_NOTE_CHARS} characters"
            )));
        }
        let (grant, _) = self.settings.access.grant(&who);
        let events = relay_proto::model::StreamKind::Events as i32;
        if let Some(refusal) = stream_refusal(&grant, &stream.vehicle_id, Some(events)) {
            return Err(self.refuse("acknowledge", refusal, &who, remote));
        }
        let key = crate::reassembly::StreamKey {
            vehicle: stream.vehicle_id.as_str().into(),
            session: stream.session_id,
            stream_id: stream.stream_id,
        };
        let store = self.store.clone();
        let info = blocking(move || store.stream_info(&key)).await?;
        if info.and_then(|i| i.stream).is_none_or(|s| s.kind != events) {
            return Err(Status::not_found("no such events stream"));
        }
        let ack = relay_proto::wire::v1::EventAck {
            session_id: stream.session_id,
            stream_id: stream.stream_id,
            seq: req.seq,
            acknowledged_by: who.name().to_owned(),
            acknowledged_at_ns: crate::now_utc_ns(),
            note: req.note,
        };
        // Recorded before it leaves: who acknowledged which event.
        let mut event = audit_event("acknowledge", Outcome::Success, Some(&who), remote);
        event.vehicles = vec![stream.vehicle_id.clone()];
        event.detail = serde_json::json!({
            "stream": { "session": stream.session_id, "stream": stream.stream_id },
            "seq": req.seq,
            "note": ack.note,
        });
        self.audit_first(event).await?;
        let delivered = self.online.send_event_ack(&stream.vehicle_id, &ack);
        tracing::info!(vehicle = %stream.vehicle_id, seq = req.seq, by = %ack.acknowledged_by, delivered, "event acknowledged");
        Ok(Response::new(AcknowledgeResponse {
            delivered: delivered > 0,
            held: delivered == 0,
        }))
    }

    async fn history(
        &self,
        req: Request<HistoryRequest>,
    ) -> Result<Response<HistoryResponse>, Status> {
        let who = self.admit(&req, "history")?;
        let remote = req.remote_addr();
        let req = req.into_inner();
        let Some(stream) = req.stream else {
            return Err(Status::invalid_argument("name the stream"));
        };
        let max = match req.max_records as usize {
            0 => HISTORY_DEFAULT_RECORDS,
            n if n > HISTORY_MAX_RECORDS => {
                return Err(Status::invalid_argument(format!(
                    "max_records is at most {HISTORY_MAX_RECORDS}"
                )));
            }
            n => n,
        };
        let to = match req.to_capture_time_ns {
            0 => i64::MAX,
            t => t,
        };
        let (grant, _) = self.settings.access.grant(&who);
        if let Some(refusal) = stream_refusal(&grant, &stream.vehicle_id, None) {
            return Err(self.refuse("history", refusal, &who, remote));
        }
        let key = crate::reassembly::StreamKey {
            vehicle: stream.vehicle_id.as_str().into(),
            session: stream.session_id,
            stream_id: stream.stream_id,
        };
        let store = self.store.clone();
        let lookup = key.clone();
        let Some(info) = blocking(move || store.stream_info(&lookup)).await? else {
            return Err(Status::not_found("no such stream"));
        };
        let kind = info.stream.as_ref().map_or(0, |s| s.kind);
        if let Some(refusal) = stream_refusal(&grant, &stream.vehicle_id, Some(kind)) {
            return Err(self.refuse("history", refusal, &who, remote));
        }
        // Audited before any data is read out.
        let mut event = audit_event("history", Outcome::Success, Some(&who), remote);
        event.vehicles = vec![stream.vehicle_id.clone()];
        event.detail = serde_json::json!({
            "stream": { "session": stream.session_id, "stream": stream.stream_id, "kind": relay_proto::kind_label(kind) },
            "from_capture_time_ns": req.from_capture_time_ns,
            "to_capture_time_ns": req.to_capture_time_ns,
            "max_records": max,
            "rules": grant.rules(),
        });
        self.audit_first(event).await?;
        let store = self.store.clone();
        let from = req.from_capture_time_ns;
        let h = blocking(move || store.history(&key, from, to, max, HISTORY_MAX_BYTES)).await?;
        Ok(Response::new(HistoryResponse {
            stream: Some(info),
            records: h.records,
            missing: h.missing,
            truncated: h.truncated,
        }))
    }

    async fn list_vehicles(
        &self,
        req: Request<ListVehiclesRequest>,
    ) -> Result<Response<ListVehiclesResponse>, Status> {
        let who = self.admit(&req, "list_vehicles")?;
        let remote = req.remote_addr();
        let (grant, _) = self.settings.access.grant(&who);
        let store = self.store.clone();
        let (vehicles, streams) =
            blocking(move || Ok((store.vehicles()?, store.streams()?))).await?;
        // Only what the client may see: other vehicles are not even named.
        let mut by_vehicle: BTreeMap<String, Vehicle> = vehicles
            .into_iter()
            .filter(|(id, _)| grant.sees(id))
            .map(|(id, last_seen_ns)| {
                let v = Vehicle {
                    vehicle_id: id.clone(),
                    online: self.online.is_online(&id),
                    last_seen_ns,
                    streams: Vec::new(),
                    clock: self.online.clock(&id),
                    bearers: self.online.bearers(&id),
                };
                (id, v)
            })
            .collect();
        for info in streams {
            let Some((id, kind)) = info.stream.as_ref().map(|s| (s.vehicle_id.clone(), s.kind))
            else {
                continue;
            };
            if !grant.allows(&id, kind) {
                continue;
            }
            if let Some(v) = by_vehicle.get_mut(&id) {
                v.streams.push(info);
            }
        }
        let mut event = audit_event("list_vehicles", Outcome::Success, Some(&who), remote);
        event.vehicles = by_vehicle.keys().cloned().collect();
        event.detail = serde_json::json!({ "rules": grant.rules() });
        self.audit_first(event).await?;
        Ok(Response::new(ListVehiclesResponse {
            vehicles: by_vehicle.into_values().collect(),
        }))
    }

    type SubscribeStream = SubscriberStream;

    async fn subscribe(
        &self,
        req: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let who = self.admit(&req, "subscribe")?;
        let remote = req.remote_addr();
        let req = req.into_inner();
        if req.vehicle_ids.len() > 1024 || req.kinds.len() > 16 {
            return Err(Status::invalid_argument("too many vehicle ids or kinds"));
        }
        let early = if req.early {
            match EarlyLedger::with_held(&req.held) {
                Ok(ledger) => Some(ledger),
                Err(e) => return Err(Status::invalid_argument(format!("held: {e}"))),
            }
        } else if !req.held.is_empty() {
            return Err(Status::invalid_argument("held frames need early = true"));
        } else {
            None
        };
        let (grant, generation) = self.settings.access.grant(&who);
        let refuse = |refusal| Err(self.refuse("subscribe", refusal, &who, remote));
        for v in &req.vehicle_ids {
            if let Some(refusal) = stream_refusal(&grant, v, None) {
                return refuse(refusal);
            }
        }
        if grant.is_empty() {
            return refuse((
                "no_grant",
                "the access policy grants this client nothing".into(),
            ));
        }
        if let Some(k) = req.kinds.iter().find(|k| !grant.reads_kind(**k)) {
            let kind = relay_proto::kind_label(*k);
            return refuse(("kind", format!("not allowed to read {kind} streams")));
        }
        let client_slot = self
            .settings
            .limits
            .subscribe(&who.fingerprint)
            .map_err(|r| {
                self.deny(
                    "subscribe",
                    r.label(),
                    Some(&who),
                    remote,
                    Status::resource_exhausted("too many subscriptions of this client"),
                )
            })?;
        let slot = self
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| Status::resource_exhausted("too many subscribers"))?;
        // Audited before any data flows: who asked for what, and which of the vehicles known
        // now it may receive.
        let store = self.store.clone();
        let known = blocking(move || store.vehicles()).await?;
        let mut event = audit_event("subscribe", Outcome::Success, Some(&who), remote);
        event.vehicles = known
            .into_iter()
            .map(|(v, _)| v)
            .filter(|v| {
                grant.sees(v) && (req.vehicle_ids.is_empty() || req.vehicle_ids.contains(v))
            })
            .collect();
        let start = match &req.start {
            Some(Start::Live(_)) => serde_json::json!("live"),
            Some(Start::AfterCursor(c)) => serde_json::json!({ "after_cursor": c }),
            Some(Start::FromCaptureTimeNs(t)) => serde_json::json!({ "from_capture_time_ns": t }),
            None => serde_json::Value::Null,
        };
        let kinds: Vec<&str> = req
            .kinds
            .iter()
            .map(|k| relay_proto::kind_label(*k))
            .collect();
        event.detail = serde_json::json!({
            "filter": { "vehicles": req.vehicle_ids, "kinds": kinds },
            "start": start,
            "early": req.early,
            "rules": grant.rules(),
        });
        let in_reach = event.vehicles.clone();
        self.audit_first(event).await?;
        let now = crate::now_utc_ns();
        self.settings
            .watch
            .check(|d| d.on_subscriber_reads(now, who.name(), &who.fingerprint, &in_reach));
        let filter = Filter {
            vehicles: req.vehicle_ids.into_iter().collect(),
            kinds: req.kinds.into_iter().collect(),
            who: Arc::new(who),
            access: self.settings.access.clone(),
            grant,
            generation,
            from_capture_ns: match req.start {
                Some(Start::FromCaptureTimeNs(t)) => Some(t),
                _ => None,
            },
        };
        let who = filter.who.clone();
        let (tx, rx) = mpsc::channel(self.settings.subscriber_queue);
        let cut_off = Arc::new(std::sync::Mutex::new(None));
        let out = Outlet {
            tx,
            timeout: self.settings.slow_subscriber_timeout,
            cut_off: cut_off.clone(),
            delivered: 0,
            vehicles: std::collections::BTreeSet::new(),
            cursor: 0,
            described: HashSet::new(),
            early,
        };
        let failure = StatusSlot::default();
        let svc = self.clone();
        let failed = failure.clone();
        metrics::gauge!("relay_ingest_subscribers").increment(1.0);
        tokio::spawn(async move {
            let mut out = out;
            let began = tokio::time::Instant::now();
            let audit = svc.settings.audit.clone();
            let result = svc.run_subscription(filter, req.start, &mut out).await;
            metrics::gauge!("relay_ingest_subscribers").decrement(1.0);
            let (outcome, ended) = match &result {
                Err(Stop::Slow) => (Outcome::Failure, "cut off: too slow"),
                Err(Stop::Failed(_)) => (Outcome::Failure, "store unavailable"),
                Ok(()) => (Outcome::Success, "ingest stopping"),
                Err(Stop::Gone) => (Outcome::Success, "client left"),
            };
            let mut event = audit_event("subscription_end", outcome, Some(&who), remote);
            event.vehicles = std::mem::take(&mut out.vehicles).into_iter().collect();
            event.detail = serde_json::json!({
                "records_delivered": out.delivered,
                "end_cursor": out.cursor,
                "duration_ms": began.elapsed().as_millis() as u64,
                "ended": ended,
            });
            audit.record(event);
            match result {
                Err(Stop::Slow) => tracing::warn!("slow subscriber cut off"),
                // Set before the queue closes, so the stream ends with it.
                Err(Stop::Failed(status)) => {
                    *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
                }
                Ok(()) | Err(Stop::Gone) => {}
            }
            drop(out);
        });
        Ok(Response::new(SubscriberStream {
            rx,
            cut_off,
            failure,
            done: false,
            _slot: slot,
            _client_slot: client_slot,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[tokio::test]
    async fn a_store_read_error_ends_the_subscription_with_internal() {
        let dir = tempfile::tempdir().unwrap();
        let embedded = crate::store::EmbeddedStore::open(&dir.path().join("store.redb")).unwrap();
        embedded.damage_record_for_tests(1).unwrap();
        let (bus, _) = broadcast::channel(16);
        let store = Store::new(embedded);
        let svc = TelemetryService::new(
            store.clone(),
            bus,
            early::EarlySource::new(broadcast::channel(16).0, store),
            Arc::new(Online::default()),
            GrpcSettings {
                subscriber_queue: 16,
                slow_subscriber_timeout: Duration::from_secs(5),
                access: AccessControl::new(Some(crate::access::AccessPolicy::everything_for(&[
                    "ed-console",
                ]))),
                limits: ClientLimits::new(60, 4),
                audit: crate::audit::AuditLog::open(crate::audit::AuditSettings {
                    dir: dir.path().join("audit"),
                    max_file_bytes: 1 << 20,
                    max_files: 4,
                    queue: 16,
                    forward: None,
                })
                .unwrap()
                .0,
                watch: crate::detect::Watch::new(
                    crate::detect::Thresholds::default(),
                    crate::audit::AuditLog::open(crate::audit::AuditSettings {
                        dir: dir.path().join("audit-watch"),
                        max_file_bytes: 1 << 20,
                        max_files: 4,
                        queue: 16,
                        forward: None,
                    })
                    .unwrap()
                    .0,
                ),
            },
            4,
            CancellationToken::new(),
        );
        let mut req = Request::new(SubscribeRequest {
            start: Some(Start::AfterCursor(0)),
            ..SubscribeRequest::default()
        });
        req.extensions_mut().insert(ClientIdentity {
            subject_cn: Some("ed-console".into()),
            fingerprint: "f".into(),
            ..ClientIdentity::default()
        });
        let mut stream = svc.subscribe(req).await.unwrap().into_inner();
        let end = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match stream.next().await {
                    Some(Ok(_)) => continue,
                    other => break other,
                }
            }
        })
        .await
        .unwrap();
        let status = end
            .expect("the stream ends with an error, not cleanly")
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
    }
}
