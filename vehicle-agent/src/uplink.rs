//! The async shell around the [`Scheduler`]: one QUIC connection per bearer (each bound to its
//! own address or interface, reconnected with its own backoff), a dispatcher that turns the
//! scheduler's decisions into QUIC streams, the intake that spools every frame before any
//! bearer sees it, and the acknowledgements that release frames and cancel redundant copies.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use prost::Message;
use rand::Rng;
use relay_proto::model::Frame;
use relay_proto::wire::v1::{ControlMessage, Hello, control_message::Body};
use relay_proto::{CloseCode, MAX_CONTROL_MESSAGE_BYTES, PROTOCOL_VERSION};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

use crate::config::{AgentConfig, BearerConfig};
use crate::health::PathSample;
use crate::metrics::{kind_label, quinn_priority};
use crate::scheduler::{Action, Budget, FrameId, Scheduler, SchedulerConfig, Transmit};
use crate::spool::{SpoolGone, SpoolHandle, StoredFrame};
use relay_proto::Class;

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("bind: {0}")]
    Bind(std::io::Error),
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("handshake timed out")]
    HandshakeTimeout,
    #[error("control stream: {0}")]
    Control(String),
    #[error("ingest refused us: {0}")]
    Refused(String),
}

impl UplinkError {
    fn label(&self) -> &'static str {
        match self {
            Self::Bind(_) => "bind",
            Self::Connect(_) => "connect",
            Self::Connection(_) => "connection",
            Self::HandshakeTimeout => "timeout",
            Self::Control(_) => "control",
            Self::Refused(_) => "refused",
        }
    }
}

/// How often quinn's statistics of each connection are read into the health estimate.
const STATS_INTERVAL: Duration = Duration::from_millis(20);
/// How long bearers get to close their connections when the agent stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// How often bearer and queue gauges are published.
const METRICS_INTERVAL: Duration = Duration::from_millis(500);

/// A copy being written: cancelling the token resets its QUIC stream.
#[derive(Debug)]
struct CopyHandle {
    serial: u64,
    token: CancellationToken,
}

/// Shared between bearers, dispatcher, intake and acknowledgement handling.
#[derive(Debug)]
struct Shared {
    sched: Mutex<Scheduler>,
    /// Something changed: the dispatcher polls the scheduler again.
    wake: Notify,
    /// The scheduler became empty (for a draining agent).
    drained: Notify,
    intake_done: AtomicBool,
    /// Current connection of each bearer with its generation.
    conns: Vec<Mutex<Option<(u64, quinn::Connection)>>>,
    copies: Mutex<HashMap<(usize, FrameId), CopyHandle>>,
    next_copy: AtomicU64,
    names: Vec<String>,
    spool: SpoolHandle,
    /// Cancelled when the agent can no longer keep its promise of crash safety.
    failed: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock means a panic elsewhere already; the data is still consistent enough
    // to keep delivering.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn new(
        sched: Scheduler,
        names: Vec<String>,
        spool: SpoolHandle,
        failed: CancellationToken,
    ) -> Self {
        Self {
            sched: Mutex::new(sched),
            wake: Notify::new(),
            drained: Notify::new(),
            intake_done: AtomicBool::new(false),
            conns: names.iter().map(|_| Mutex::new(None)).collect(),
            copies: Mutex::new(HashMap::new()),
            next_copy: AtomicU64::new(0),
            names,
            spool,
            failed,
        }
    }

    fn sched(&self) -> MutexGuard<'_, Scheduler> {
        lock(&self.sched)
    }

    /// Nothing left to deliver: the sources are done and everything was acknowledged.
    fn fully_drained(&self) -> bool {
        self.intake_done.load(Ordering::Acquire) && self.sched().is_empty()
    }

    fn connected_bearers(&self) -> usize {
        self.conns.iter().filter(|c| lock(c).is_some()).count()
    }

    /// The spool task is gone: no frame can be made crash-safe or numbered safely any more.
    /// The agent is told to stop (and, as a service, restarts on a reopened spool) rather
    /// than stream on pretending to be crash-safe.
    fn spool_lost(&self, e: SpoolGone) {
        if !self.failed.is_cancelled() {
            tracing::error!(error = %e, "stopping the agent: the spool is gone");
            metrics::gauge!("relay_agent_spool_up").set(0.0);
        }
        self.failed.cancel();
    }
}

fn control_codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_CONTROL_MESSAGE_BYTES)
        .new_codec()
}

/// Everything the uplink needs.
pub struct Uplink {
    pub cfg: AgentConfig,
    pub client: quinn::ClientConfig,
    pub hello: Hello,
    pub frames: mpsc::Receiver<Frame>,
    pub stop: CancellationToken,
    pub drain: Duration,
    pub spool: SpoolHandle,
    /// Cancelled by the uplink when the spool is gone (see [`SpoolGone`]).
    pub failed: CancellationToken,
    /// Unacknowledged frames of an earlier run of this session.
    pub restored: Vec<StoredFrame>,
    /// Per stream: added to the sources' sequence numbers (a resumed session continues).
    pub seq_base: HashMap<u32, u64>,
}

pub fn scheduler_config(cfg: &AgentConfig) -> SchedulerConfig {
    let sc = &cfg.scheduling;
    SchedulerConfig {
        policies: sc.policies(),
        max_bytes: cfg.buffer.max_unacked_bytes,
        max_in_flight_bytes: sc.max_in_flight_bytes,
        max_in_flight_frames: cfg.ingest.max_in_flight_frames,
        live_window: Duration::from_millis(sc.live_window_ms),
        health: crate::health::HealthConfig {
            suspect_floor: Duration::from_millis(sc.suspect_floor_ms),
            down_after: Duration::from_millis(sc.down_after_ms),
            probe_interval: Duration::from_millis(sc.probe_interval_ms),
            ..crate::health::HealthConfig::default()
        },
    }
}

/// Runs until `stop` fires; then keeps delivering for up to `drain`. Returns how many frames
/// were still unacknowledged (they stay in the spool for the next run).
pub async fn run(up: Uplink) -> Result<usize, std::io::Error> {
    let Uplink {
        cfg,
        client,
        hello,
        frames,
        stop,
        drain,
        spool,
        failed,
        restored,
        seq_base,
    } = up;
    let budgets = cfg
        .bearers
        .iter()
        .map(|b| {
            b.budget_bytes.map(|bytes| Budget {
                bytes,
                period: Duration::from_secs(b.budget_period_s),
            })
        })
        .collect();
    let mut sched = Scheduler::new(scheduler_config(&cfg), budgets, Instant::now());
    let kinds: HashMap<u32, i32> = hello
        .streams
        .iter()
        .map(|s| (s.stream_id, s.kind))
        .collect();
    let mut dropped = Vec::new();
    for f in restored {
        let kind = kinds.get(&f.id.stream_id).copied().unwrap_or(f.kind);
        for (id, kind) in sched.restore(f.id, kind, f.bytes) {
            count_eviction(id, kind);
            dropped.push(id);
        }
    }
    if !sched.is_empty() {
        tracing::info!(
            frames = sched.len(),
            bytes = sched.bytes(),
            "re-sending what the spool held from the last run"
        );
    }
    let dropped = spool.delete(dropped).await;
    let names = cfg.bearers.iter().map(|b| b.name.clone()).collect();
    let shared = Arc::new(Shared::new(sched, names, spool, failed));
    if let Err(e) = dropped {
        shared.spool_lost(e);
    }
    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    tasks.spawn(intake(
        frames,
        shared.clone(),
        kinds,
        seq_base,
        cfg.framing.max_frame_bytes,
    ));
    tasks.spawn(dispatch(shared.clone(), shutdown.clone()));
    let cfg = Arc::new(cfg);
    for (index, bearer) in cfg.bearers.iter().enumerate() {
        let b = BearerTask {
            index,
            bearer: bearer.clone(),
            cfg: cfg.clone(),
            client: client.clone(),
            hello: hello.clone(),
            shared: shared.clone(),
        };
        tasks.spawn(b.run(shutdown.clone()));
    }

    stop.cancelled().await;
    // Unacknowledged frames still get `drain` to reach the ingest over any bearer.
    let until = Instant::now() + drain;
    while !shared.fully_drained() && Instant::now() < until {
        tokio::select! {
            () = shared.drained.notified() => {}
            () = tokio::time::sleep_until(until) => {}
            // Re-check now and then: the intake may finish without anything left to ack.
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    // Bearers close their connections and let the close reach the ingest (bounded); what
    // does not end by then is aborted.
    shutdown.cancel();
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    for c in &shared.conns {
        if let Some((_, conn)) = lock(c).take() {
            conn.close(
                quinn::VarInt::from_u32(CloseCode::Normal.as_u32()),
                b"agent stopping",
            );
        }
    }
    let left = shared.sched().len();
    if left > 0 {
        tracing::warn!(
            unacked_frames = left,
            "stopping with unacknowledged frames (kept in the spool)"
        );
    }
    metrics::gauge!("relay_agent_connected").set(0.0);
    Ok(left)
}

fn count_eviction(id: FrameId, kind: i32) {
    tracing::warn!(
        stream_id = id.stream_id,
        seq = id.seq,
        "spool full: frame evicted unacknowledged"
    );
    metrics::counter!("relay_agent_frames_evicted_total", "kind" => kind_label(kind)).increment(1);
}

/// Spools produced frames and hands them to the scheduler whatever the bearers' state, so
/// sources never stall.
async fn intake(
    mut rx: mpsc::Receiver<Frame>,
    shared: Arc<Shared>,
    kinds: HashMap<u32, i32>,
    seq_base: HashMap<u32, u64>,
    max_frame_bytes: usize,
) {
    let mut spool = shared.spool.clone();
    while let Some(mut frame) = rx.recv().await {
        frame.seq += seq_base.get(&frame.stream_id).copied().unwrap_or(0);
        let kind = kinds.get(&frame.stream_id).copied().unwrap_or_default();
        let id = FrameId {
            stream_id: frame.stream_id,
            seq: frame.seq,
        };
        let bytes = Bytes::from(frame.encode_to_vec());
        if bytes.len() > max_frame_bytes {
            tracing::error!(
                stream_id = id.stream_id,
                seq = id.seq,
                len = bytes.len(),
                "frame exceeds max_frame_bytes; dropped"
            );
            metrics::counter!("relay_agent_frames_evicted_total", "kind" => kind_label(kind))
                .increment(1);
            continue;
        }
        // A number may leave the vehicle only once a restart can no longer reuse it, and a
        // frame only once it is on its way into the spool.
        if let Err(e) = spool.reserved_beyond(id.stream_id, id.seq).await {
            return shared.spool_lost(e);
        }
        if let Err(e) = spool.put(id, kind, bytes.clone()).await {
            return shared.spool_lost(e);
        }
        let evicted = shared.sched().insert(id, kind, bytes, Instant::now());
        for (id, kind) in &evicted {
            count_eviction(*id, *kind);
        }
        if let Err(e) = spool.delete(evicted.into_iter().map(|(id, _)| id)).await {
            return shared.spool_lost(e);
        }
        shared.wake.notify_one();
    }
    // The sources have stopped: a draining agent may now finish once everything is acked.
    shared.intake_done.store(true, Ordering::Release);
    shared.drained.notify_one();
}

/// Polls the scheduler and carries out its actions.
async fn dispatch(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut next_metrics = Instant::now();
    loop {
        let now = Instant::now();
        let (actions, timeout) = {
            let mut s = shared.sched();
            let actions = s.poll(now);
            (actions, s.poll_timeout(now))
        };
        let more = actions.len() >= 128;
        for a in actions {
            match a {
                Action::Transmit(send) => start_copy(&shared, send),
                Action::Cancel { bearer, id, .. } => cancel_copy(&shared, bearer, id),
            }
        }
        if now >= next_metrics {
            publish_metrics(&shared, now);
            next_metrics = now + METRICS_INTERVAL;
        }
        if more {
            tokio::task::yield_now().await;
            continue;
        }
        let until = timeout.map_or(next_metrics, |t| t.min(next_metrics));
        tokio::select! {
            () = shared.wake.notified() => {}
            () = tokio::time::sleep_until(until) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

fn publish_metrics(shared: &Shared, now: Instant) {
    let s = shared.sched();
    for (i, name) in shared.names.iter().enumerate() {
        let label = [("bearer", name.clone())];
        let state = s.state(i, now);
        metrics::gauge!("relay_agent_bearer_state", &label).set(state.gauge());
        if let Some(h) = s.health(i) {
            metrics::gauge!("relay_agent_bearer_rtt_seconds", &label)
                .set(h.srtt().unwrap_or_default().as_secs_f64());
            metrics::gauge!("relay_agent_bearer_rtt_variance_seconds", &label)
                .set(h.rttvar().as_secs_f64());
            metrics::gauge!("relay_agent_bearer_loss_ratio", &label).set(h.loss());
            metrics::gauge!("relay_agent_bearer_delivery_rate_bytes_per_second", &label)
                .set(h.delivery_rate());
        }
        metrics::gauge!("relay_agent_bearer_in_flight_bytes", &label)
            .set(s.in_flight_bytes(i) as f64);
        let c = s.counters(i);
        metrics::counter!("relay_agent_bearer_frames_sent_total", &label).absolute(c.frames_sent);
        metrics::counter!("relay_agent_bearer_sent_bytes_total", &label).absolute(c.bytes_sent);
        metrics::counter!("relay_agent_bearer_frames_acked_total", &label).absolute(c.frames_acked);
        metrics::counter!("relay_agent_bearer_frames_resent_total", &label)
            .absolute(c.frames_recovered);
        metrics::counter!("relay_agent_bearer_failovers_total", &label).absolute(c.failovers);
    }
    for (class, queued) in Class::ALL.iter().zip(s.queued_per_class()) {
        metrics::gauge!("relay_agent_queued_frames", "class" => class.label()).set(queued as f64);
    }
    metrics::gauge!("relay_agent_unacked_frames").set(s.len() as f64);
    metrics::gauge!("relay_agent_unacked_bytes").set(s.bytes() as f64);
    drop(s);
    metrics::gauge!("relay_agent_connected").set(shared.connected_bearers() as f64);
}

fn start_copy(shared: &Arc<Shared>, send: Transmit) {
    let conn = match &*lock(&shared.conns[send.bearer]) {
        Some((g, c)) if *g == send.generation => c.clone(),
        _ => {
            shared
                .sched()
                .on_send_failed(send.bearer, send.generation, send.id);
            shared.wake.notify_one();
            return;
        }
    };
    let serial = shared.next_copy.fetch_add(1, Ordering::Relaxed);
    let token = CancellationToken::new();
    lock(&shared.copies).insert(
        (send.bearer, send.id),
        CopyHandle {
            serial,
            token: token.clone(),
        },
    );
    metrics::counter!("relay_agent_frames_sent_total", "kind" => kind_label(send.kind))
        .increment(1);
    if send.resend {
        metrics::counter!("relay_agent_frames_resent_total").increment(1);
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        let result = write_copy(&conn, &send, &token).await;
        if let Err(e) = result
            && !token.is_cancelled()
        {
            metrics::counter!("relay_agent_frame_send_errors_total").increment(1);
            tracing::debug!(error = %e, "frame write failed");
            shared
                .sched()
                .on_send_failed(send.bearer, send.generation, send.id);
            shared.wake.notify_one();
        }
        let mut copies = lock(&shared.copies);
        if copies
            .get(&(send.bearer, send.id))
            .is_some_and(|c| c.serial == serial)
        {
            copies.remove(&(send.bearer, send.id));
        }
    });
}

fn cancel_copy(shared: &Shared, bearer: usize, id: FrameId) {
    if let Some(c) = lock(&shared.copies).remove(&(bearer, id)) {
        c.token.cancel();
    }
}

/// Writes one copy on its own unidirectional stream, then holds the stream until the peer
/// has it all, so an acknowledgement via another bearer can still reset it.
async fn write_copy(
    conn: &quinn::Connection,
    send: &Transmit,
    cancel: &CancellationToken,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let reset = |s: &mut quinn::SendStream| {
        let _ = s.reset(quinn::VarInt::from_u32(0));
    };
    let mut s = tokio::select! {
        s = conn.open_uni() => s?,
        () = cancel.cancelled() => return Ok(()),
    };
    s.set_priority(quinn_priority(send.kind, send.lane))?;
    tokio::select! {
        r = s.write_all(&send.bytes) => r?,
        () = cancel.cancelled() => { reset(&mut s); return Ok(()) }
    }
    s.finish()?;
    tokio::select! {
        _ = s.stopped() => {}
        () = cancel.cancelled() => reset(&mut s),
    }
    Ok(())
}

/// One bearer: binds its socket, connects, reconnects with its own backoff.
struct BearerTask {
    index: usize,
    bearer: BearerConfig,
    cfg: Arc<AgentConfig>,
    client: quinn::ClientConfig,
    hello: Hello,
    shared: Arc<Shared>,
}

/// A QUIC endpoint on this bearer's own address or interface.
fn bearer_endpoint(b: &BearerConfig) -> std::io::Result<quinn::Endpoint> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(b.bind),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    if let Some(interface) = &b.interface {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        socket.bind_device(Some(interface.as_bytes()))?;
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        return Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            format!("binding to interface {interface} needs Linux"),
        ));
    }
    socket.bind(&b.bind.into())?;
    socket.set_nonblocking(true)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for QUIC"))?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket.into(),
        runtime,
    )
}

/// Connection attempts in progress per bearer at most while dialling.
const MAX_CONCURRENT_DIALS: usize = 8;

type ControlReader = FramedRead<quinn::RecvStream, LengthDelimitedCodec>;
type ControlWriter = FramedWrite<quinn::SendStream, LengthDelimitedCodec>;

/// A connection that finished its handshake and Hello. The control writer is kept: dropping
/// it would finish the control stream, which ends the session at the ingest.
struct Dialed {
    conn: quinn::Connection,
    reader: ControlReader,
    _writer: ControlWriter,
}

impl UplinkError {
    /// Nothing answered: the path is silent (dead zone), which costs the ingest nothing, so
    /// dialling goes on at its steady pace instead of backing off.
    fn is_silence(&self) -> bool {
        matches!(
            self,
            Self::HandshakeTimeout | Self::Connection(quinn::ConnectionError::TimedOut)
        )
    }
}

/// One connection attempt: QUIC handshake, Hello, HelloAck.
async fn dial(
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    remote: std::net::SocketAddr,
    server_name: String,
    hello: Hello,
    timeout: Duration,
) -> Result<Dialed, UplinkError> {
    let deadline = Instant::now() + timeout;
    let connecting = endpoint.connect_with(client, remote, &server_name)?;
    let conn = tokio::time::timeout_at(deadline, connecting)
        .await
        .map_err(|_| UplinkError::HandshakeTimeout)??;
    let (send, recv) = conn.open_bi().await?;
    let mut writer = FramedWrite::new(send, control_codec());
    let mut reader = FramedRead::new(recv, control_codec());
    let msg = ControlMessage {
        body: Some(Body::Hello(hello)),
    };
    writer
        .send(Bytes::from(msg.encode_to_vec()))
        .await
        .map_err(|e| UplinkError::Control(e.to_string()))?;
    let reply = tokio::select! {
        r = tokio::time::timeout_at(deadline, reader.next()) => r.map_err(|_| UplinkError::HandshakeTimeout)?,
        e = conn.closed() => return Err(refusal(e)),
    };
    match reply.map(|r| r.map(|b| ControlMessage::decode(b.freeze()))) {
        Some(Ok(Ok(ControlMessage {
            body: Some(Body::HelloAck(ack)),
        }))) if ack.protocol_version == PROTOCOL_VERSION => Ok(Dialed {
            conn,
            reader,
            _writer: writer,
        }),
        Some(Ok(Ok(other))) => Err(UplinkError::Control(format!(
            "expected HelloAck, got {other:?}"
        ))),
        Some(Ok(Err(e))) => Err(UplinkError::Control(e.to_string())),
        Some(Err(e)) => Err(UplinkError::Control(e.to_string())),
        None => Err(refusal(conn.closed().await)),
    }
}

impl BearerTask {
    async fn run(self, shutdown: CancellationToken) {
        let label = [("bearer", self.bearer.name.clone())];
        let cfg = &self.cfg;
        let initial = Duration::from_millis(cfg.reconnect.initial_backoff_ms);
        let max = Duration::from_millis(cfg.reconnect.max_backoff_ms);
        let redial = Duration::from_millis(cfg.reconnect.redial_interval_ms);
        let handshake = Duration::from_millis(cfg.reconnect.handshake_timeout_ms);
        let remote = self.bearer.remote.unwrap_or(cfg.ingest.address);
        let mut backoff = initial;
        let mut endpoint: Option<quinn::Endpoint> = None;
        let mut generation = 0u64;
        let failed = |e: &UplinkError| {
            metrics::counter!("relay_agent_connect_failures_total", "reason" => e.label())
                .increment(1);
            metrics::counter!("relay_agent_bearer_connect_failures_total", &label).increment(1);
        };
        'outer: while !shutdown.is_cancelled() {
            let ep = match &endpoint {
                Some(e) => e.clone(),
                None => match bearer_endpoint(&self.bearer) {
                    Ok(e) => {
                        endpoint = Some(e.clone());
                        e
                    }
                    Err(e) => {
                        // The modem or its interface may not exist yet: try again later.
                        let e = UplinkError::Bind(e);
                        failed(&e);
                        tracing::warn!(bearer = %self.bearer.name, error = %e, "cannot bind bearer");
                        tokio::select! {
                            () = tokio::time::sleep(max) => continue,
                            () = shutdown.cancelled() => break,
                        }
                    }
                },
            };
            // Staggered attempts: while the path is silent a new one starts every `redial`,
            // so a bearer coming back is found within about that long; a refusal backs off.
            let mut dials = JoinSet::new();
            let mut next_dial = Instant::now();
            let dialed = loop {
                tokio::select! {
                    () = tokio::time::sleep_until(next_dial), if dials.len() < MAX_CONCURRENT_DIALS => {
                        dials.spawn(dial(ep.clone(), self.client.clone(), remote, cfg.ingest.server_name.clone(), self.hello.clone(), handshake));
                        next_dial = Instant::now() + redial;
                    }
                    Some(r) = dials.join_next(), if !dials.is_empty() => match r {
                        Ok(Ok(d)) => break Ok(d),
                        Ok(Err(e)) if e.is_silence() => failed(&e),
                        Ok(Err(e)) => break Err(e),
                        Err(_) => {}
                    },
                    () = shutdown.cancelled() => break 'outer,
                }
            };
            dials.abort_all();
            match dialed {
                Ok(d) => {
                    backoff = initial;
                    generation += 1;
                    let served = tokio::select! {
                        r = self.serve(d, generation) => r,
                        () = shutdown.cancelled() => break,
                    };
                    if let Err(e) = served {
                        failed(&e);
                        tracing::warn!(bearer = %self.bearer.name, error = %e, "bearer lost; dialling again");
                    }
                }
                Err(e) => {
                    failed(&e);
                    tracing::warn!(bearer = %self.bearer.name, error = %e, backoff_ms = backoff.as_millis() as u64, "bearer refused; will reconnect");
                    let jitter = rand::rng().random_range(0.8..1.2);
                    tokio::select! {
                        () = tokio::time::sleep(backoff.mul_f64(jitter)) => {}
                        () = shutdown.cancelled() => break,
                    }
                    backoff = (backoff * 2).min(max);
                }
            }
        }
        if let Some(e) = endpoint {
            e.close(
                quinn::VarInt::from_u32(CloseCode::Normal.as_u32()),
                b"agent stopping",
            );
            let _ = tokio::time::timeout(Duration::from_secs(2), e.wait_idle()).await;
        }
    }

    /// Carries frames and takes acknowledgements on an established connection until it ends.
    async fn serve(&self, dialed: Dialed, generation: u64) -> Result<(), UplinkError> {
        let (shared, index) = (&self.shared, self.index);
        let Dialed {
            conn,
            mut reader,
            _writer,
        } = dialed;
        tracing::info!(bearer = %self.bearer.name, remote = %conn.remote_address(), "bearer connected to ingest");
        metrics::counter!("relay_agent_connects_total").increment(1);
        *lock(&shared.conns[index]) = Some((generation, conn.clone()));
        shared
            .sched()
            .on_connected(index, generation, Instant::now());
        shared.wake.notify_one();
        let stats = tokio::spawn(poll_stats(conn.clone(), shared.clone(), index));

        let result = loop {
            tokio::select! {
                msg = reader.next() => match msg {
                    Some(Ok(bytes)) => match ControlMessage::decode(bytes.freeze()) {
                        Ok(ControlMessage { body: Some(Body::Ack(ack)) }) => handle_ack(shared, index, &ack).await,
                        Ok(other) => tracing::debug!(?other, "ignoring control message"),
                        Err(e) => break Err(UplinkError::Control(format!("undecodable control message: {e}"))),
                    },
                    // Tell why the ingest closed, when it did, rather than "connection lost".
                    Some(Err(e)) => break Err(conn.close_reason().map_or(UplinkError::Control(e.to_string()), refusal)),
                    None => break Err(refusal(conn.closed().await)),
                },
                e = conn.closed() => break Err(refusal(e)),
            }
        };
        stats.abort();
        {
            let mut c = lock(&shared.conns[index]);
            if c.as_ref().is_some_and(|(g, _)| *g == generation) {
                *c = None;
            }
        }
        shared.sched().on_disconnected(index, generation);
        shared.wake.notify_one();
        result
    }
}

/// Feeds quinn's path statistics into the bearer's health; anything received wakes the
/// dispatcher (a suspect bearer may be up again).
async fn poll_stats(conn: quinn::Connection, shared: Arc<Shared>, index: usize) {
    let mut tick = tokio::time::interval(STATS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_rx = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            // Ends with its connection even when the bearer task was dropped mid-serve.
            _ = conn.closed() => return,
        }
        let st = conn.stats();
        let sample = PathSample {
            rtt: st.path.rtt,
            cwnd: st.path.cwnd,
            lost_packets: st.path.lost_packets,
            sent_packets: st.path.sent_packets,
            rx_datagrams: st.udp_rx.datagrams,
        };
        shared.sched().on_path(index, sample, Instant::now());
        if sample.rx_datagrams != last_rx {
            last_rx = sample.rx_datagrams;
            shared.wake.notify_one();
        }
    }
}

fn refusal(e: quinn::ConnectionError) -> UplinkError {
    match &e {
        quinn::ConnectionError::ApplicationClosed(close) => {
            let code = CloseCode::from_u64(close.error_code.into_inner());
            let reason = String::from_utf8_lossy(&close.reason).into_owned();
            UplinkError::Refused(format!(
                "{} ({reason})",
                code.map_or("unknown", CloseCode::label)
            ))
        }
        _ => UplinkError::Connection(e),
    }
}

async fn handle_ack(shared: &Shared, bearer: usize, ack: &relay_proto::wire::v1::Ack) {
    let now = Instant::now();
    let mut released = Vec::new();
    let mut cancels = Vec::new();
    {
        let mut s = shared.sched();
        for st in &ack.streams {
            for r in &st.ranges {
                let a = s.on_ack(bearer, st.stream_id, r.start, r.end, now);
                released.extend(a.released);
                cancels.extend(a.cancels);
            }
        }
        if s.is_empty() {
            shared.drained.notify_one();
        }
    }
    for c in cancels {
        if let Action::Cancel { bearer, id, .. } = c {
            cancel_copy(shared, bearer, id);
        }
    }
    for (_, _, latency) in &released {
        if let Some(l) = latency {
            metrics::histogram!("relay_agent_ack_latency_seconds").record(l.as_secs_f64());
        }
    }
    metrics::counter!("relay_agent_frames_acked_total").increment(released.len() as u64);
    let deleted = shared
        .spool
        .delete(released.into_iter().map(|(id, _, _)| id))
        .await;
    if let Err(e) = deleted {
        shared.spool_lost(e);
    }
    shared.wake.notify_one();
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_proto::model::{StreamDescriptor, StreamKind};

    #[tokio::test]
    async fn a_dead_spool_stops_the_agent_instead_of_streaming_unprotected() {
        let dir = tempfile::tempdir().unwrap();
        let streams = [StreamDescriptor {
            stream_id: 0,
            kind: StreamKind::Vitals as i32,
            name: "vitals".into(),
            waveform: None,
        }];
        let (spool, _) = crate::spool::Spool::open(&dir.path().join("s.redb"), &streams).unwrap();
        let (handle, task) =
            crate::spool::start(spool, Duration::from_millis(20), CancellationToken::new());
        task.abort();
        let _ = task.await;
        let failed = CancellationToken::new();
        let sched = Scheduler::new(
            scheduler_config(&AgentConfig::default()),
            vec![None],
            Instant::now(),
        );
        let shared = Arc::new(Shared::new(
            sched,
            vec!["wan0".into()],
            handle,
            failed.clone(),
        ));
        let (tx, rx) = mpsc::channel(4);
        tx.send(Frame {
            stream_id: 0,
            seq: 0,
            capture_time_ns: 1,
            payload: None,
        })
        .await
        .unwrap();
        drop(tx);
        let kinds = HashMap::from([(0, StreamKind::Vitals as i32)]);
        intake(rx, shared.clone(), kinds, HashMap::new(), 1 << 16).await;
        assert!(failed.is_cancelled(), "the agent is told to stop");
        assert!(
            shared.sched().is_empty(),
            "no frame goes out that the spool did not take"
        );
    }
}
