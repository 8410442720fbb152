//! Ambulance-side agent: reads sources (WFDB replay, synthetic ECG, vitals, GPS), frames them
//! with sequence numbers and capture timestamps, and delivers them to the hospital ingest over
//! QUIC with mutual TLS, holding every frame until the ingest acknowledges it.

pub mod config;
pub mod framer;
pub mod health;
pub mod metrics;
pub mod outbox;
pub mod scheduler;
pub mod sources;
pub mod tls;
pub mod uplink;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use relay_proto::wire::v1::Hello;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::AgentConfig;

/// Frames buffered between sources and the uplink before a source waits.
const SOURCE_QUEUE_FRAMES: usize = 1024;

/// What an agent did, reported when it stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSummary {
    /// Per stream id, frames the source produced (sequence numbers `0..n`).
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
    pub metrics_addr: Option<std::net::SocketAddr>,
}

pub fn now_utc_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Agent {
    /// Prepares sources, TLS and metrics, then starts streaming. Errors here are configuration
    /// errors (missing files, bad certificates); network trouble is retried forever.
    pub async fn start(cfg: AgentConfig) -> anyhow::Result<Self> {
        cfg.validate()?;
        crate::metrics::describe();
        relay_proto::ops::install_crypto_provider();
        let client = tls::client_config(&cfg.tls, &cfg.ingest)
            .context("building TLS client configuration")?;
        let mut prepared = Vec::new();
        for (i, s) in cfg.sources.iter().enumerate() {
            let id = u32::try_from(i).context("too many sources")?;
            prepared.push(
                sources::PreparedSource::prepare(s, id)
                    .with_context(|| format!("preparing source {i}"))?,
            );
        }
        let stop = CancellationToken::new();
        let metrics_addr = match cfg.metrics.listen {
            Some(addr) => Some(
                relay_proto::ops::serve_metrics(addr, stop.clone().cancelled_owned())
                    .await
                    .context("starting metrics endpoint")?,
            ),
            None => None,
        };
        let hello = Hello {
            protocol_version: relay_proto::PROTOCOL_VERSION,
            vehicle_id: cfg.vehicle_id.clone(),
            session_id: rand::random(),
            streams: prepared.iter().map(|p| p.descriptor.clone()).collect(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
        };
        tracing::info!(vehicle = %cfg.vehicle_id, session = hello.session_id, streams = hello.streams.len(), ingest = %cfg.ingest.address, "agent starting");
        let (tx, rx) = tokio::sync::mpsc::channel(SOURCE_QUEUE_FRAMES);
        let epoch = now_utc_ns();
        let frame_ms = cfg.framing.frame_ms;
        let drain = Duration::from_millis(cfg.buffer.stop_drain_ms);
        let sources = prepared
            .into_iter()
            .map(|p| {
                (
                    p.descriptor.stream_id,
                    tokio::spawn(p.run(frame_ms, epoch, tx.clone(), stop.clone())),
                )
            })
            .collect();
        drop(tx);
        let uplink = tokio::spawn(uplink::run(cfg, client, hello, rx, stop.clone(), drain));
        Ok(Self {
            stop,
            sources,
            uplink,
            metrics_addr,
        })
    }

    /// Stops the sources, gives the uplink `buffer.stop_drain_ms` to deliver what is
    /// unacknowledged, then closes the connection.
    pub async fn shutdown(self) -> anyhow::Result<AgentSummary> {
        self.stop.cancel();
        let mut frames_produced = Vec::new();
        for (stream_id, s) in self.sources {
            frames_produced.push((stream_id, s.await.unwrap_or(0)));
        }
        let unacked_at_exit = self
            .uplink
            .await
            .context("uplink task")?
            .context("uplink")?;
        Ok(AgentSummary {
            frames_produced,
            unacked_at_exit,
        })
    }

    /// Resolves when the uplink ends (only after `shutdown` was requested elsewhere).
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }
}
