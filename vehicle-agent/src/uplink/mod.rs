//! The async shell around the [`Scheduler`]: it only moves bytes and time.
//!
//! - `intake`: spools every produced frame before any bearer sees it, then hands it to the
//!   scheduler;
//! - `dispatch`: polls the scheduler and turns its decisions into QUIC streams (one per
//!   frame copy) or stream resets;
//! - `bearer`: one QUIC connection per bearer, dialled by the sans-IO redial policy, with
//!   the Hello handshake, acknowledgements and path statistics.
//!
//! The decisions live in the sans-IO machines: [`crate::scheduler`], [`crate::health`],
//! [`crate::redial`], [`crate::handshake`].

mod bearer;
mod dispatch;
mod intake;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use relay_proto::CloseCode;
use relay_proto::model::Frame;
use relay_proto::wire::v1::Hello;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use bearer::redial_config;

use crate::config::AgentConfig;
use crate::handshake::HandshakeError;
use crate::metrics::kind_label;
use crate::scheduler::{Budget, FrameId, Scheduler, SchedulerConfig};
use crate::spool::{SpoolGone, SpoolHandle, StoredFrame};
use dispatch::CopyHandle;

/// Why a bearer's connection attempt or connection ended.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    /// The bearer's socket could not be bound (missing interface or address).
    #[error("bind: {0}")]
    Bind(#[source] std::io::Error),
    /// quinn could not start a connection (bad address or configuration).
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The QUIC connection failed or was lost.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The Hello exchange failed.
    #[error("handshake: {0}")]
    Handshake(#[from] HandshakeError),
    /// Reading or writing the control stream failed.
    #[error("control stream: {0}")]
    ControlStream(#[source] std::io::Error),
    /// A control message from the ingest did not decode.
    #[error("undecodable control message: {0}")]
    Undecodable(#[source] prost::DecodeError),
    /// The ingest closed the connection with an application error code.
    #[error("ingest refused us: {} ({reason})", code.map_or("unknown", CloseCode::label))]
    Refused {
        /// The close code, if it is one we know.
        code: Option<CloseCode>,
        /// The ingest's reason text.
        reason: String,
    },
}

impl UplinkError {
    /// Bounded metric label.
    fn label(&self) -> &'static str {
        match self {
            Self::Bind(_) => "bind",
            Self::Connect(_) => "connect",
            Self::Connection(_) => "connection",
            Self::Handshake(HandshakeError::Timeout) => "timeout",
            Self::Handshake(_) | Self::ControlStream(_) | Self::Undecodable(_) => "control",
            Self::Refused { .. } => "refused",
        }
    }

    /// Nothing answered: the path is silent (dead zone), which costs the ingest nothing, so
    /// dialling goes on at its steady pace instead of backing off.
    fn is_silence(&self) -> bool {
        matches!(
            self,
            Self::Handshake(HandshakeError::Timeout)
                | Self::Connection(quinn::ConnectionError::TimedOut)
        )
    }
}

/// How long bearers get to close their connections when the agent stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Shared between bearers, dispatcher, intake and acknowledgement handling.
#[derive(Debug)]
struct Shared {
    sched: Mutex<Scheduler>,
    /// Something changed: the dispatcher polls the scheduler again.
    wake: Notify,
    /// The scheduler became empty (for a draining agent).
    drained: Notify,
    intake_done: AtomicBool,
    /// Current connection of each bearer.
    conns: Vec<Mutex<Option<Live>>>,
    copies: Mutex<HashMap<(usize, FrameId), CopyHandle>>,
    next_copy: AtomicU64,
    names: Vec<String>,
    spool: SpoolHandle,
    /// Cancelled when the agent can no longer keep its promise of crash safety.
    failed: CancellationToken,
    /// Clock exchanges of every bearer: the best estimate of our offset to the ingest.
    clock: Arc<Mutex<relay_proto::clock::ClockFilter>>,
    /// The events stream's id and the ED's acknowledgements of its events.
    event_acks: Option<(u32, crate::events::Acks)>,
    /// Waveform streams whose chunks are packed, by id (to unpack them for an ingest that
    /// does not decode their encoding).
    packed_streams: HashMap<u32, relay_proto::model::WaveformInfo>,
}

/// A bearer's established connection.
#[derive(Debug, Clone)]
struct Live {
    generation: u64,
    conn: quinn::Connection,
    /// Its ingest does not decode every packed stream's encoding: waveform frames go to it
    /// as plain samples.
    plain_waveforms: bool,
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
            clock: Arc::default(),
            event_acks: None,
            packed_streams: HashMap::new(),
        }
    }

    /// A completed clock exchange on any bearer; the estimate is exported as metrics.
    fn clock_exchange(&self, exchange: &relay_proto::clock::Exchange) {
        let mut filter = lock(&self.clock);
        if let Err(e) = filter.add_exchange(exchange) {
            tracing::debug!(error = %e, "clock exchange not usable");
            return;
        }
        if let Some(best) = filter.estimate() {
            metrics::gauge!("relay_agent_clock_offset_seconds").set(best.offset_ns as f64 / 1e9);
            metrics::gauge!("relay_agent_clock_offset_uncertainty_seconds")
                .set(best.uncertainty_ns as f64 / 1e9);
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

/// Everything the uplink needs.
pub struct Uplink {
    /// The agent's configuration.
    pub cfg: AgentConfig,
    /// QUIC and TLS client configuration shared by every bearer (read again when its files
    /// change).
    pub client: Arc<crate::tls::ReloadingClientConfig>,
    /// The Hello every bearer sends.
    pub hello: Hello,
    /// Frames from the sources.
    pub frames: mpsc::Receiver<Frame>,
    /// Cancelled when the agent stops.
    pub stop: CancellationToken,
    /// How long a stopping agent keeps delivering.
    pub drain: Duration,
    /// The spool task.
    pub spool: SpoolHandle,
    /// Cancelled by the uplink when the spool is gone (see [`SpoolGone`]).
    pub failed: CancellationToken,
    /// Unacknowledged frames of an earlier run of this session.
    pub restored: Vec<StoredFrame>,
    /// Per stream: added to the sources' sequence numbers (a resumed session continues).
    pub seq_base: HashMap<u32, u64>,
    /// The vehicle's wall clock (clock exchanges are stamped with it).
    pub wall: crate::clock::WallClock,
    /// Where the estimate of our clock's offset to the ingest's is kept.
    pub clock: Arc<Mutex<relay_proto::clock::ClockFilter>>,
    /// The events stream's id and where the ED's acknowledgements of its events go.
    pub event_acks: Option<(u32, crate::events::Acks)>,
}

/// The scheduler's configuration from the agent's.
pub fn scheduler_config(cfg: &AgentConfig) -> SchedulerConfig {
    let sc = &cfg.scheduling;
    SchedulerConfig {
        policies: sc.policies(),
        max_bytes: cfg.buffer.max_unacked_bytes,
        max_in_flight_bytes: sc.max_in_flight_bytes,
        max_in_flight_frames: cfg.ingest.max_in_flight_frames,
        live_window: sc.live_window,
        health: crate::health::HealthConfig {
            suspect_floor: sc.suspect_floor,
            down_after: sc.down_after,
            probe_interval: sc.probe_interval,
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
        wall,
        clock,
        event_acks,
    } = up;
    let budgets = cfg
        .bearers
        .iter()
        .map(|b| {
            b.budget_bytes.map(|bytes| Budget {
                bytes,
                period: b.budget_period,
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
    let mut shared = Shared::new(sched, names, spool, failed);
    shared.clock = clock;
    shared.event_acks = event_acks;
    shared.packed_streams = hello
        .streams
        .iter()
        .filter_map(|s| Some((s.stream_id, s.waveform.clone()?)))
        .filter(|(_, w)| w.encoding() != relay_proto::model::WaveformEncoding::Samples)
        .collect();
    let mut encoders = HashMap::new();
    for (&id, info) in &shared.packed_streams {
        match relay_proto::waveform::encoder_for(info) {
            Ok(Some(encoder)) => {
                encoders.insert(id, encoder);
            }
            Ok(None) => {}
            // The ingest refuses such a Hello anyway; plain samples are the safe side.
            Err(e) => tracing::warn!(stream_id = id, error = %e, "waveform stream not packed"),
        }
    }
    let shared = Arc::new(shared);
    if let Err(e) = dropped {
        shared.spool_lost(e);
    }
    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    tasks.spawn(intake::intake(
        frames,
        shared.clone(),
        kinds,
        seq_base,
        encoders,
        cfg.framing.max_frame_bytes,
    ));
    tasks.spawn(dispatch::dispatch(shared.clone(), shutdown.clone()));
    let cfg = Arc::new(cfg);
    for (index, bearer) in cfg.bearers.iter().enumerate() {
        let b = bearer::BearerTask {
            index,
            bearer: bearer.clone(),
            cfg: cfg.clone(),
            client: client.clone(),
            hello: hello.clone(),
            shared: shared.clone(),
            wall,
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
        if let Some(Live { conn, .. }) = lock(c).take() {
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
        intake::intake(
            rx,
            shared.clone(),
            kinds,
            HashMap::new(),
            HashMap::new(),
            1 << 16,
        )
        .await;
        assert!(failed.is_cancelled(), "the agent is told to stop");
        assert!(
            shared.sched().is_empty(),
            "no frame goes out that the spool did not take"
        );
    }
}
