//! Ambulance-side agent: reads sources (WFDB replay, a patient monitor over HL7 v2 / MLLP
//! ([`hl7_input`]), a GPS receiver through gpsd or NMEA ([`gps`]), synthetic ECG, vitals and
//! GPS), frames them
//! with sequence numbers and capture timestamps, and delivers them to the hospital ingest over
//! QUIC with mutual TLS over every configured bearer, holding every frame in a crash-safe spool
//! until the ingest acknowledges it.
//!
//! Data flow: [`sources`] -> [`framer`] -> [`spool`] (durable before anything leaves) ->
//! [`scheduler`] (with [`health`] per bearer: which bearer carries which frame, and when to
//! send it again elsewhere) -> [`uplink`] (the async shell: one QUIC connection per bearer,
//! dialled by [`redial`], opened with [`handshake`]). The protocol decisions are sans-IO
//! machines fed with time and events; the shell only moves bytes and time.
#![warn(missing_docs)]

pub mod clock;
pub mod config;
pub mod events;
pub mod framer;
pub mod gps;
pub mod handshake;
pub mod health;
pub mod hl7_input;
pub mod metrics;
pub mod redial;
pub mod scheduler;
pub mod sources;
pub mod spool;
pub mod tls;
pub mod uplink;

use anyhow::Context;
use relay_proto::wire::v1::Hello;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::AgentConfig;

/// Frames buffered between sources and the uplink before a source waits.
const SOURCE_QUEUE_FRAMES: usize = 1024;

/// What the `vehicle-agent` binary does with its command line: load the configuration
/// (printing help or version and exiting when asked), stream until SIGTERM/ctrl-c or until the
/// agent fails (its spool died: the process then exits non-zero for its supervisor to restart
/// it), then stop, delivering for `buffer.stop_drain`.
pub async fn run_cli(args: Vec<std::ffi::OsString>) -> anyhow::Result<()> {
    if args.get(1).is_some_and(|a| a == "event") {
        return event_cli(args.into_iter().skip(1)).await;
    }
    relay_ops::init_logging("info");
    let cfg: AgentConfig =
        relay_ops::config::load_or_exit(args).context("loading configuration")?;
    let agent = Agent::start(cfg).await?;
    tokio::select! {
        () = relay_ops::shutdown_signal() => tracing::info!("shutting down"),
        () = agent.failed() => tracing::error!("agent failed; stopping so the supervisor restarts it"),
    }
    agent.shutdown().await.map(|_| ())
}

/// `vehicle-agent event ...`: the crew's clinical events, for scripts and the crew tablet.
#[derive(Debug, clap::Parser)]
#[command(name = "vehicle-agent event")]
enum EventCommand {
    /// Raises an event (STEMI, STROKE, TRAUMA, ECG_12_LEAD_ACQUIRED, ETA, HANDOVER_NOTE) and
    /// prints where it went: its stream and sequence number.
    Raise {
        /// The event code (case-insensitive).
        code: String,
        /// Free text: an ETA, a note.
        #[arg(long, default_value = "")]
        text: String,
        /// info, low, medium or high; the code's default when absent.
        #[arg(long)]
        severity: Option<String>,
        /// The agent's events socket (`events.socket`).
        #[arg(long)]
        socket: std::path::PathBuf,
    },
    /// Prints whether, by whom and when the ED acknowledged an event.
    Status {
        /// The event's sequence number, as `raise` printed it.
        seq: u64,
        /// The agent's events socket (`events.socket`).
        #[arg(long)]
        socket: std::path::PathBuf,
    },
}

async fn event_cli(args: impl Iterator<Item = std::ffi::OsString>) -> anyhow::Result<()> {
    use clap::Parser as _;
    let command = match EventCommand::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    match command {
        EventCommand::Raise {
            code,
            text,
            severity,
            socket,
        } => {
            let request = events::Request::Raise {
                code,
                text,
                severity,
            };
            let answer = events::request(&socket, &request).await?;
            println!("{answer}");
            Ok(())
        }
        EventCommand::Status { seq, socket } => {
            let answer = events::request(&socket, &events::Request::Status { seq }).await?;
            println!("{answer}");
            Ok(())
        }
    }
}

/// What an agent did, reported when it stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSummary {
    /// Per stream id, frames the source produced (sequence numbers `base..base + n`, see
    /// [`Agent::seq_base`]).
    pub frames_produced: Vec<(u32, u64)>,
    /// Frames still unacknowledged when the uplink closed.
    pub unacked_at_exit: usize,
}

/// A started agent.
#[derive(Debug)]
pub struct Agent {
    stop: CancellationToken,
    sources: Vec<(u32, JoinHandle<u64>)>,
    uplink: JoinHandle<Result<usize, std::io::Error>>,
    spool_task: JoinHandle<()>,
    spool_finish: CancellationToken,
    failed: CancellationToken,
    seq_base: std::collections::HashMap<u32, u64>,
    clock: std::sync::Arc<std::sync::Mutex<relay_proto::clock::ClockFilter>>,
    /// The crew's event API, when configured (ends with `stop`).
    events_api: Option<JoinHandle<()>>,
    /// Address of the metrics endpoint, when one was asked for.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

pub use relay_ops::now_utc_ns;

use relay_ops::config::ServiceConfig as _;

impl Agent {
    /// Prepares sources, TLS and metrics, then starts streaming. Errors here are configuration
    /// errors (missing files, bad certificates); network trouble is retried forever.
    pub async fn start(cfg: AgentConfig) -> anyhow::Result<Self> {
        Self::start_with_clock(cfg, clock::WallClock::system()).await
    }

    /// [`Agent::start`] with capture times and clock exchanges taken from `wall` (tests run
    /// agents whose clock is off).
    pub async fn start_with_clock(
        cfg: AgentConfig,
        wall: clock::WallClock,
    ) -> anyhow::Result<Self> {
        // The recorder first: descriptions and gauges set before it exists are lost.
        relay_ops::prometheus().context("installing the metrics recorder")?;
        cfg.validate()?;
        relay_ops::pem::refuse_development(&[&cfg.tls.cert, &cfg.tls.ca_cert], cfg.allow_dev_pki)?;
        // Expiry is visible weeks ahead (alerts at 30 and 7 days), not when it bites.
        for (which, path) in [("vehicle", &cfg.tls.cert), ("ingest_ca", &cfg.tls.ca_cert)] {
            if let Some(at) = relay_ops::pem::earliest_expiry(path)? {
                ::metrics::gauge!("relay_agent_certificate_expiry_timestamp_seconds", "certificate" => which)
                    .set(at as f64);
            }
        }
        crate::metrics::describe();
        relay_ops::install_crypto_provider();
        let keep_alive = cfg.scheduling.probe_interval;
        let client = std::sync::Arc::new(
            tls::ReloadingClientConfig::new(&cfg.tls, &cfg.ingest, keep_alive)
                .context("building TLS client configuration")?,
        );
        let mut prepared = Vec::new();
        for (i, s) in cfg.sources.iter().enumerate() {
            let id = u32::try_from(prepared.len()).context("too many sources")?;
            prepared.extend(
                sources::PreparedSource::prepare(s, id)
                    .with_context(|| format!("preparing source {i}"))?,
            );
        }
        // The crew's events: a stream after the sources, fed by the local API.
        let mut events = None;
        if cfg.events.socket.is_some() {
            let id = u32::try_from(prepared.len()).context("too many sources")?;
            let (tx, rx) = tokio::sync::mpsc::channel(events::QUEUE);
            events = Some((id, tx));
            // Its sequence base is known once the spool is open (set below).
            prepared.push(sources::PreparedSource::events(id, rx, 0));
        }
        let encoding = cfg.framing.waveform_encoding.wire();
        for p in &mut prepared {
            if let Some(w) = p.descriptor.waveform.as_mut() {
                w.set_encoding(encoding);
            }
        }
        let descriptors: Vec<_> = prepared.iter().map(|p| p.descriptor.clone()).collect();
        let spool_path = cfg.spool.path.clone();
        let (spool, opened) = {
            let descriptors = descriptors.clone();
            tokio::task::spawn_blocking(move || spool::Spool::open(&spool_path, &descriptors))
                .await
                .context("spool task")?
                .with_context(|| format!("opening spool {}", cfg.spool.path.display()))?
        };
        if opened.discarded > 0 {
            ::metrics::counter!("relay_agent_spool_discarded_frames_total")
                .increment(opened.discarded);
            tracing::error!(
                frames = opened.discarded,
                "the spool held frames of a session with other streams; they cannot be sent and were dropped"
            );
        }
        let spool_finish = CancellationToken::new();
        let (spool_handle, spool_task) =
            spool::start(spool, cfg.spool.sync_interval, spool_finish.clone());
        let stop = CancellationToken::new();
        let failed = CancellationToken::new();
        let metrics_addr = match cfg.metrics.listen {
            Some(addr) => Some(
                relay_ops::serve_metrics(addr, stop.clone().cancelled_owned())
                    .await
                    .context("starting metrics endpoint")?,
            ),
            None => None,
        };
        let hello = Hello {
            protocol_version: relay_proto::PROTOCOL_VERSION,
            vehicle_id: cfg.vehicle_id.clone(),
            session_id: opened.session_id,
            streams: descriptors,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            agent_time_ns: 0, // stamped by each connection as it sends it
        };
        tracing::info!(
            vehicle = %cfg.vehicle_id,
            session = hello.session_id,
            resumed = opened.resumed,
            spooled_frames = opened.frames.len(),
            streams = hello.streams.len(),
            bearers = cfg.bearers.len(),
            ingest = %cfg.ingest.address,
            "agent starting"
        );
        let (tx, rx) = tokio::sync::mpsc::channel(SOURCE_QUEUE_FRAMES);
        let epoch = wall.now_ns();
        let frame = cfg.framing.frame;
        let drain = cfg.buffer.stop_drain;
        let mut events_api = None;
        let acks = events::Acks::default();
        let event_acks = events.as_ref().map(|(id, _)| (*id, acks.clone()));
        if let Some((id, tx)) = events {
            for p in &mut prepared {
                if p.descriptor.stream_id == id {
                    p.set_events_seq_base(opened.seq_base.get(&id).copied().unwrap_or(0));
                }
            }
            if let Some(path) = &cfg.events.socket {
                events_api = Some(
                    events::serve(path, id, tx, acks.clone(), stop.clone())
                        .context("starting the crew's event API")?,
                );
                tracing::info!(socket = %path.display(), stream = id, "crew event API listening");
            }
        }
        let sources = prepared
            .into_iter()
            .map(|p| {
                (
                    p.descriptor.stream_id,
                    tokio::spawn(p.run(frame, epoch, tx.clone(), stop.clone())),
                )
            })
            .collect();
        drop(tx);
        let clock = std::sync::Arc::default();
        let uplink = tokio::spawn(uplink::run(uplink::Uplink {
            cfg,
            client,
            hello,
            frames: rx,
            stop: stop.clone(),
            drain,
            spool: spool_handle,
            failed: failed.clone(),
            restored: opened.frames,
            seq_base: opened.seq_base.clone(),
            wall,
            clock: std::sync::Arc::clone(&clock),
            event_acks,
        }));
        Ok(Self {
            stop,
            sources,
            uplink,
            spool_task,
            spool_finish,
            failed,
            seq_base: opened.seq_base,
            clock,
            events_api,
            metrics_addr,
        })
    }

    /// Stops the sources, gives the uplink `buffer.stop_drain` to deliver what is
    /// unacknowledged (what is left stays in the spool), then closes the bearers.
    pub async fn shutdown(self) -> anyhow::Result<AgentSummary> {
        self.stop.cancel();
        if let Some(api) = self.events_api {
            let _ = api.await;
        }
        let mut frames_produced = Vec::new();
        for (stream_id, s) in self.sources {
            frames_produced.push((stream_id, s.await.unwrap_or(0)));
        }
        let unacked_at_exit = self
            .uplink
            .await
            .context("uplink task")?
            .context("uplink")?;
        // The last acknowledgements reach the spool before we return.
        self.spool_finish.cancel();
        self.spool_task.await.context("spool task")?;
        if self.failed.is_cancelled() {
            anyhow::bail!(
                "the spool failed while running; frames produced since its last commit were not crash-safe"
            );
        }
        Ok(AgentSummary {
            frames_produced,
            unacked_at_exit,
        })
    }

    /// Per stream, the first sequence number of this run (not 0 when a spooled session
    /// resumed after a restart).
    pub fn seq_base(&self) -> &std::collections::HashMap<u32, u64> {
        &self.seq_base
    }

    /// The estimate of this vehicle's clock offset to the ingest's (vehicle minus ingest), once
    /// a clock exchange completed.
    pub fn clock_offset(&self) -> Option<relay_proto::model::ClockOffset> {
        self.clock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .estimate()
    }

    /// Resolves when the uplink ends (only after `shutdown` was requested elsewhere).
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Resolves if the agent can no longer run safely (its spool task died). The caller then
    /// calls [`Agent::shutdown`], which reports the failure; the service exits non-zero and
    /// its supervisor restarts it on a reopened spool.
    pub async fn failed(&self) {
        self.failed.cancelled().await
    }
}
