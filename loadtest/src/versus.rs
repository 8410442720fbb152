//! `loadtest versus`: the same fleet, message rate and message sizes through the ingest and
//! through a broker users would otherwise pick, one after the other on the same machine, in
//! one run: CPU per stored frame and peak RSS of each server process.
//!
//! The ingest is measured by [`crate::blast`] (QUIC, one connection per vehicle, acks after
//! the durable commit, one gRPC subscriber). The broker is a single NATS JetStream server with
//! the shipped configuration minus its cluster block (mutual TLS; file storage), once with
//! `sync_interval: always` (fsync before every acknowledgement: the ingest's durability) and
//! once with NATS's default (fsync every 2 minutes). Its publishers are one TLS client
//! connection per vehicle sending the very frames the blaster sends (the same encoded
//! `Frame` messages, the ECG packed) with a `Nats-Msg-Id` for deduplication, awaiting every
//! publish acknowledgement; one ordered consumer reads every message and checks each arrived
//! once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use async_nats::jetstream;
use futures::StreamExt;
use hdrhistogram::Histogram;
use prost::Message;
use relay_devcerts::{DevPki, NATS_INGEST_CLIENT, generate};
use relay_emulator::spec::parse_duration;
use relay_proto::model::Frame;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use vehicle_agent::config::WaveformEncodingChoice;

use crate::blast::{BlastArgs, ECG, Prepared, prepare, secs};
use crate::loadgen::{process_usage, vehicle_id};
use crate::nats::{Standalone, SyncInterval};
use crate::report::{Machine, Percentiles, histogram, percentiles};
use crate::seqset::SeqSet;

/// JetStream's stream and subject prefix for the benchmark.
const STREAM: &str = "BENCH";
const SUBJECT_PREFIX: &str = "bench";
/// Client connections being set up at once while the fleet connects.
const CONCURRENT_CONNECTS: usize = 32;
/// Publishes a vehicle may have unacknowledged before it waits (about 8 s of its traffic).
const MAX_UNACKED_PER_VEHICLE: usize = 256;
/// The consumer gives up after this many errors without a message between them.
const MAX_CONSECUTIVE_CONSUMER_ERRORS: u32 = 20;
/// Bound on the benchmark stream's disk use.
const STREAM_MAX_BYTES: i64 = 8 * 1024 * 1024 * 1024;
/// How long the server may take to start.
const SERVER_START: Duration = Duration::from_secs(30);

/// What to compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum System {
    /// The hospital ingest (embedded store, fsync per commit), driven by the frame blaster.
    Ingest,
    /// One NATS JetStream server, file storage, TLS, `sync_interval: always`.
    JetstreamFsync,
    /// The same with NATS's default `sync_interval` (2 minutes).
    JetstreamLazy,
}

impl System {
    fn durability(self) -> &'static str {
        match self {
            Self::Ingest => {
                "fsync per commit (group commit); a frame is acknowledged after its commit is durable"
            }
            Self::JetstreamFsync => {
                "sync_interval: always; fsync before every publish acknowledgement"
            }
            Self::JetstreamLazy => {
                "sync_interval: 2 min (NATS default); acknowledged writes can be lost on a power cut"
            }
        }
    }
}

/// Flags of `loadtest versus`.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct VersusArgs {
    /// Simulated vehicles: the standard mix each (12-lead 500 Hz ECG per frame period,
    /// vitals and position once a second).
    #[arg(long, default_value_t = 100)]
    pub vehicles: usize,
    /// Measured time of each system, after its fleet is connected.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    #[serde(serialize_with = "secs")]
    pub duration: Duration,
    /// ECG frame duration.
    #[arg(long, default_value = "40ms", value_parser = parse_duration)]
    #[serde(serialize_with = "secs")]
    pub frame: Duration,
    /// ECG record whose first 12 signals are sent.
    #[arg(long, default_value = "data/ecg/s0010_re")]
    pub ecg: PathBuf,
    /// Systems to run, in this order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "ingest,jetstream-fsync,jetstream-lazy"
    )]
    pub systems: Vec<System>,
    /// The nats-server binary (default: $NATS_SERVER, else nats-server on the PATH).
    #[arg(long)]
    pub nats_server: Option<String>,
    /// After the measured time, how long to wait for the last frames at the subscriber.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    #[serde(serialize_with = "secs")]
    pub drain: Duration,
    /// Where the JSON report goes.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

/// One system's figures.
#[derive(Debug, Clone, Serialize)]
pub struct SystemResult {
    /// Which.
    pub system: System,
    /// What an acknowledgement promises.
    pub durability: String,
    /// Frames published during the measured time, and per second.
    pub frames_sent: u64,
    /// Frames per second.
    pub frames_per_second: f64,
    /// Bytes of encoded frames (message payloads) sent.
    pub frame_bytes_sent: u64,
    /// Frames the server acknowledged as stored.
    pub frames_stored: u64,
    /// Server process CPU seconds (user + system) over the measured time.
    pub server_cpu_seconds: f64,
    /// The same as a share of one core.
    pub server_cpu_share: f64,
    /// Server CPU per stored frame, microseconds.
    pub server_cpu_per_stored_frame_us: f64,
    /// Peak resident set of the server process.
    pub server_peak_rss_bytes: u64,
    /// CPU share of this process (publishers and subscriber).
    pub client_cpu_share: f64,
    /// Distinct frames the subscriber received.
    pub frames_delivered: u64,
    /// Acknowledged but never delivered (must be 0).
    pub missing_acknowledged: u64,
    /// Sent, never acknowledged and never delivered.
    pub missing_unacknowledged: u64,
    /// Delivered more than once (must be 0).
    pub duplicates: u64,
    /// ECG frames: subscriber arrival minus send.
    pub ecg_latency: Percentiles,
    /// Publish to acknowledgement, every frame (JetStream only; the blaster does not time
    /// individual acks).
    pub ack_latency: Option<Percentiles>,
    /// Errors the JetStream consumer reported and recovered from (missed heartbeats under
    /// overload); 0 for the ingest.
    pub consumer_errors: u64,
}

/// What `loadtest versus` measured.
#[derive(Debug, Clone, Serialize)]
pub struct VersusReport {
    /// The flags.
    pub args: VersusArgs,
    /// Where it ran.
    pub machine: Machine,
    /// The nats-server version, when a JetStream system ran.
    pub nats_server_version: Option<String>,
    /// One entry per system, in the order run.
    pub results: Vec<SystemResult>,
    /// The ingest's CPU per stored frame divided by each other system's.
    pub ingest_cpu_ratio: HashMap<String, f64>,
}

impl VersusReport {
    /// A table for the terminal.
    pub fn human(&self) -> String {
        let mut out = format!(
            "versus: {} vehicles, {:.0} s each, standard mix\n\
             {:<16} {:>9} {:>10} {:>12} {:>9} {:>8} {:>10} {:>14}\n",
            self.args.vehicles,
            self.args.duration.as_secs_f64(),
            "system",
            "frames/s",
            "CPU %",
            "CPU/frame us",
            "RSS MB",
            "missing",
            "duplicates",
            "ECG p50/p99 ms",
        );
        for r in &self.results {
            out.push_str(&format!(
                "{:<16} {:>9.0} {:>10.1} {:>12.1} {:>9.0} {:>8} {:>10} {:>6.1}/{:<7.1}\n",
                system_name(r.system),
                r.frames_per_second,
                r.server_cpu_share * 100.0,
                r.server_cpu_per_stored_frame_us,
                r.server_peak_rss_bytes as f64 / 1e6,
                r.missing_acknowledged + r.missing_unacknowledged,
                r.duplicates,
                r.ecg_latency.p50_ms,
                r.ecg_latency.p99_ms,
            ));
        }
        let mut ratios: Vec<_> = self.ingest_cpu_ratio.iter().collect();
        ratios.sort_by(|a, b| a.0.cmp(b.0));
        for (other, ratio) in ratios {
            out.push_str(&format!(
                "ingest CPU per stored frame / {other}: {ratio:.2}\n"
            ));
        }
        out
    }
}

fn system_name(s: System) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Runs every system in turn.
pub async fn run(a: VersusArgs, ingest_exe: &Path) -> anyhow::Result<VersusReport> {
    anyhow::ensure!(
        (1..=10_000).contains(&a.vehicles),
        "--vehicles must be 1..=10000"
    );
    anyhow::ensure!(!a.systems.is_empty(), "--systems names none");
    let blast_args = BlastArgs {
        vehicles: a.vehicles,
        duration: a.duration,
        frame: a.frame,
        ecg: a.ecg.clone(),
        waveform_encoding: WaveformEncodingChoice::Lpc1,
        endpoints: 8,
        drain: a.drain,
        commit_interval: None,
        reorder_window: None,
        report: None,
    };
    let server = a
        .nats_server
        .clone()
        .or_else(|| std::env::var("NATS_SERVER").ok())
        .unwrap_or_else(|| "nats-server".into());
    let mut nats_server_version = None;
    let mut results = Vec::new();
    for &system in &a.systems {
        eprintln!("== {}", system_name(system));
        let result = match system {
            System::Ingest => {
                let b = crate::blast::run(blast_args.clone(), ingest_exe).await?;
                let ecg_latency = b
                    .latency
                    .get("ecg")
                    .map(|(_, p)| *p)
                    .context("the blast measured no ECG latency")?;
                SystemResult {
                    system,
                    durability: system.durability().into(),
                    frames_sent: b.frames_sent,
                    frames_per_second: b.frames_per_second,
                    frame_bytes_sent: b.frame_bytes_sent,
                    frames_stored: b.frames_acknowledged,
                    server_cpu_seconds: b.ingest_cpu_seconds,
                    server_cpu_share: b.ingest_cpu_share,
                    server_cpu_per_stored_frame_us: per_frame_us(
                        b.ingest_cpu_seconds,
                        b.frames_acknowledged,
                    ),
                    server_peak_rss_bytes: b.ingest_peak_rss_bytes,
                    client_cpu_share: b.blaster_cpu_share,
                    frames_delivered: b.frames_received,
                    missing_acknowledged: b.missing_acknowledged,
                    missing_unacknowledged: b.missing_unacknowledged,
                    duplicates: b.duplicates,
                    ecg_latency,
                    ack_latency: None,
                    consumer_errors: 0,
                }
            }
            System::JetstreamFsync | System::JetstreamLazy => {
                if nats_server_version.is_none() {
                    nats_server_version = version_of(&server).await;
                }
                let sync = if system == System::JetstreamFsync {
                    SyncInterval::Always
                } else {
                    SyncInterval::Every(Duration::from_secs(120))
                };
                jetstream_run(&a, &blast_args, &server, system, sync).await?
            }
        };
        eprintln!(
            "   {:.0} frames/s, server CPU {:.1} % ({:.1} us per stored frame), peak RSS {:.0} MB",
            result.frames_per_second,
            result.server_cpu_share * 100.0,
            result.server_cpu_per_stored_frame_us,
            result.server_peak_rss_bytes as f64 / 1e6
        );
        results.push(result);
    }
    let mut ingest_cpu_ratio = HashMap::new();
    if let Some(ingest) = results.iter().find(|r| r.system == System::Ingest) {
        for r in results.iter().filter(|r| r.system != System::Ingest) {
            if r.server_cpu_per_stored_frame_us > 0.0 {
                ingest_cpu_ratio.insert(
                    system_name(r.system),
                    ingest.server_cpu_per_stored_frame_us / r.server_cpu_per_stored_frame_us,
                );
            }
        }
    }
    let report = VersusReport {
        args: a,
        machine: Machine::probe(),
        nats_server_version,
        results,
        ingest_cpu_ratio,
    };
    if let Some(path) = &report.args.report {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}

fn per_frame_us(cpu_seconds: f64, frames: u64) -> f64 {
    if frames == 0 {
        0.0
    } else {
        cpu_seconds * 1e6 / frames as f64
    }
}

async fn version_of(server: &str) -> Option<String> {
    let out = tokio::process::Command::new(server)
        .arg("--version")
        .output()
        .await
        .ok()?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// What the JetStream publishers of one vehicle sent and got acknowledged, per stream.
#[derive(Default)]
struct VehicleLog {
    sent: [u64; 3],
    acked: [SeqSet; 3],
}

/// Counters shared by every publisher.
#[derive(Default)]
struct Totals {
    frames: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
}

/// What the consumer saw.
struct Consumed {
    streams: HashMap<(String, u32), SeqSet>,
    duplicates: u64,
    consumer_errors: u64,
    ecg_latency: Histogram<u64>,
}

async fn client(url: &str, pki: &Path, name: &str) -> anyhow::Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .name(name)
        .require_tls(true)
        .add_root_certificates(pki.join("hospital-ca.pem"))
        .add_client_certificate(
            pki.join(format!("{NATS_INGEST_CLIENT}.pem")),
            pki.join(format!("{NATS_INGEST_CLIENT}.key")),
        )
        .connection_timeout(Duration::from_secs(10))
        .connect(url)
        .await
        .with_context(|| format!("{name}: connecting to {url}"))
}

/// One vehicle's publisher.
struct Publisher {
    id: String,
    js: jetstream::Context,
    prepared: Arc<Prepared>,
    period: Duration,
    /// Where in the frame period this vehicle sends.
    offset: Duration,
    stop: CancellationToken,
    totals: Arc<Totals>,
    log: Arc<std::sync::Mutex<VehicleLog>>,
    ack_latency: Arc<std::sync::Mutex<Histogram<u64>>>,
}

/// Publishes one vehicle's frames at the agent's pace until `stop`; a second task awaits
/// the acknowledgements in order.
async fn publish_loop(p: Publisher) {
    let Publisher {
        id,
        js,
        prepared,
        period,
        offset,
        stop,
        totals,
        log,
        ack_latency,
    } = p;
    let (tx, mut rx) =
        tokio::sync::mpsc::channel::<(jetstream::context::PublishAckFuture, Instant, usize, u64)>(
            MAX_UNACKED_PER_VEHICLE,
        );
    let acks = {
        let log = log.clone();
        tokio::spawn(async move {
            while let Some((ack, sent_at, stream, seq)) = rx.recv().await {
                if ack.await.is_ok() {
                    let us = (sent_at.elapsed().as_micros() as u64).max(1);
                    {
                        let mut h = ack_latency.lock().unwrap_or_else(|p| p.into_inner());
                        let high = h.high();
                        let _ = h.record(us.min(high));
                    }
                    let mut l = log.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(set) = l.acked.get_mut(stream) {
                        set.insert(seq);
                    }
                }
            }
        })
    };
    let per_second = (1.0 / period.as_secs_f64()).round().max(1.0) as u64;
    let mut tick = tokio::time::interval_at(Instant::now() + offset, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut counts = [0u64; 3];
    let mut n: u64 = 0;
    'run: loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let todo = prepared.tick(n, per_second);
        n += 1;
        for (stream, payload) in todo {
            let seq = counts[stream];
            let frame = Frame {
                stream_id: stream as u32,
                seq,
                capture_time_ns: hospital_ingest::now_utc_ns(),
                payload: Some(payload),
            };
            let bytes = bytes::Bytes::from(frame.encode_to_vec());
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("{id}.{stream}.{seq}").as_str());
            let len = bytes.len() as u64;
            let sent_at = Instant::now();
            match js
                .publish_with_headers(format!("{SUBJECT_PREFIX}.{id}.{stream}"), headers, bytes)
                .await
            {
                Ok(ack) => {
                    counts[stream] += 1;
                    totals.frames.fetch_add(1, Ordering::Relaxed);
                    totals.bytes.fetch_add(len, Ordering::Relaxed);
                    if tx.send((ack, sent_at, stream, seq)).await.is_err() {
                        break 'run;
                    }
                }
                Err(e) => {
                    tracing::warn!(vehicle = %id, error = %e, "publish failed");
                    totals.errors.fetch_add(1, Ordering::Relaxed);
                    break 'run;
                }
            }
        }
    }
    drop(tx);
    let _ = acks.await;
    log.lock().unwrap_or_else(|p| p.into_inner()).sent = counts;
}

async fn consume(
    mut messages: jetstream::consumer::push::Ordered,
    consumed: Arc<std::sync::Mutex<Consumed>>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut consecutive_errors = 0;
    loop {
        let next = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            m = messages.next() => m,
        };
        let Some(m) = next else { return Ok(()) };
        let m = match m {
            Ok(m) => {
                consecutive_errors = 0;
                m
            }
            // An overloaded server misses heartbeats; the ordered consumer re-creates itself
            // from the last sequence it delivered, so it goes on (counted in the report).
            Err(e) => {
                consecutive_errors += 1;
                consumed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .consumer_errors += 1;
                if consecutive_errors >= MAX_CONSECUTIVE_CONSUMER_ERRORS {
                    bail!("the ordered consumer failed {consecutive_errors} times in a row: {e}");
                }
                tracing::warn!(error = %e, "ordered consumer");
                continue;
            }
        };
        let now_ns = hospital_ingest::now_utc_ns();
        // bench.<vehicle>.<stream>
        let mut parts = m.subject.as_str().rsplitn(2, '.');
        let (Some(stream), Some(rest)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Some(vehicle) = rest.strip_prefix(&format!("{SUBJECT_PREFIX}.")) else {
            continue;
        };
        let (Ok(stream), Ok(frame)) = (stream.parse::<u32>(), Frame::decode(m.payload.as_ref()))
        else {
            continue;
        };
        let mut c = consumed.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = c
            .streams
            .entry((vehicle.to_owned(), stream))
            .or_default()
            .insert(frame.seq);
        if !fresh {
            c.duplicates += 1;
        } else if stream == ECG {
            let us = (now_ns.saturating_sub(frame.capture_time_ns) / 1000).max(1) as u64;
            let high = c.ecg_latency.high();
            let _ = c.ecg_latency.record(us.min(high));
        }
    }
}

/// Sent, delivered, missing (acknowledged, not) per the logs and what the consumer saw.
fn tally(
    logs: &[(String, Arc<std::sync::Mutex<VehicleLog>>)],
    consumed: &Consumed,
) -> (u64, u64, u64, u64) {
    let (mut stored, mut delivered, mut missing_acked, mut missing_unacked) = (0, 0, 0, 0);
    for (id, log) in logs {
        let l = log.lock().unwrap_or_else(|p| p.into_inner());
        for (stream, &n) in l.sent.iter().enumerate() {
            let got = consumed.streams.get(&(id.clone(), stream as u32));
            stored += n - l.acked[stream].missing_below(n);
            for seq in 0..n {
                if got.is_some_and(|g| g.contains(seq)) {
                    delivered += 1;
                } else if l.acked[stream].contains(seq) {
                    missing_acked += 1;
                } else {
                    missing_unacked += 1;
                }
            }
        }
    }
    (stored, delivered, missing_acked, missing_unacked)
}

async fn jetstream_run(
    a: &VersusArgs,
    blast_args: &BlastArgs,
    server: &str,
    system: System,
    sync: SyncInterval,
) -> anyhow::Result<SystemResult> {
    relay_ops::install_crypto_provider();
    let prepared = Arc::new(prepare(blast_args)?);
    let work = tempfile::tempdir().context("creating a work directory")?;
    let pki = work.path().join("pki");
    generate(&pki, &DevPki::default()).context("creating certificates")?;
    let nats = Standalone::start(server, &pki, &work.path().join("nats"), sync, SERVER_START)
        .await
        .context("starting nats-server")?;
    let pid = nats.pid().context("nats-server has no process id")?;
    let url = nats.url();

    let admin = client(&url, &pki, "versus-consumer").await?;
    let js = jetstream::new(admin.clone());
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: STREAM.into(),
            subjects: vec![format!("{SUBJECT_PREFIX}.>")],
            storage: jetstream::stream::StorageType::File,
            num_replicas: 1,
            duplicate_window: Duration::from_secs(120),
            max_bytes: STREAM_MAX_BYTES,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("creating stream {STREAM}: {e}"))?;
    let messages = stream
        .create_consumer(jetstream::consumer::push::OrderedConfig {
            deliver_subject: admin.new_inbox(),
            filter_subject: format!("{SUBJECT_PREFIX}.>"),
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("creating the consumer: {e}"))?
        .messages()
        .await
        .map_err(|e| anyhow::anyhow!("consuming: {e}"))?;
    let consumed = Arc::new(std::sync::Mutex::new(Consumed {
        streams: HashMap::new(),
        duplicates: 0,
        consumer_errors: 0,
        ecg_latency: histogram()?,
    }));
    let consumer_stop = CancellationToken::new();
    let consumer = tokio::spawn(consume(messages, consumed.clone(), consumer_stop.clone()));

    let connect_started = Instant::now();
    let gate = Arc::new(Semaphore::new(CONCURRENT_CONNECTS));
    let mut connecting = Vec::new();
    for i in 0..a.vehicles {
        let (gate, url, pki) = (gate.clone(), url.clone(), pki.clone());
        connecting.push(tokio::spawn(async move {
            let _turn = gate.acquire_owned().await;
            let id = vehicle_id(i);
            let c = client(&url, &pki, &id).await?;
            anyhow::Ok((id, c))
        }));
    }
    let mut fleet = Vec::new();
    for c in connecting {
        match c.await {
            Ok(Ok(v)) => fleet.push(v),
            Ok(Err(e)) => return Err(e),
            Err(e) => bail!("a connecting task failed: {e}"),
        }
    }
    eprintln!(
        "   {} publishers connected in {:.1} s",
        fleet.len(),
        connect_started.elapsed().as_secs_f64()
    );

    let totals = Arc::new(Totals::default());
    let ack_latency = Arc::new(std::sync::Mutex::new(histogram()?));
    let stop = CancellationToken::new();
    let usage_before = (process_usage(pid), process_usage(std::process::id()));
    let started = Instant::now();
    let mut logs = Vec::new();
    let mut loops = Vec::new();
    let count = fleet.len();
    for (i, (id, c)) in fleet.iter().enumerate() {
        let log = Arc::new(std::sync::Mutex::new(VehicleLog::default()));
        logs.push((id.clone(), log.clone()));
        let offset = a.frame.mul_f64(i as f64 / count as f64);
        loops.push(tokio::spawn(publish_loop(Publisher {
            id: id.clone(),
            js: jetstream::new(c.clone()),
            prepared: prepared.clone(),
            period: a.frame,
            offset,
            stop: stop.clone(),
            totals: totals.clone(),
            log,
            ack_latency: ack_latency.clone(),
        })));
    }
    tokio::time::sleep(a.duration).await;
    stop.cancel();
    let measured = started.elapsed().as_secs_f64();
    let usage_after = (process_usage(pid), process_usage(std::process::id()));
    // The publishers finish awaiting their outstanding acknowledgements (bounded by the
    // JetStream context's request timeout).
    for l in loops {
        let _ = l.await;
    }
    let cpu = |before: Option<(f64, u64)>, after: Option<(f64, u64)>| match (before, after) {
        (Some((b, _)), Some((a, _))) => a - b,
        _ => 0.0,
    };
    let server_cpu_seconds = cpu(usage_before.0, usage_after.0);
    let client_cpu_seconds = cpu(usage_before.1, usage_after.1);
    let server_peak_rss_bytes = process_usage(pid).map_or(0, |(_, rss)| rss);

    let drain_started = Instant::now();
    while drain_started.elapsed() < a.drain && !consumer.is_finished() {
        let (_, _, missing_acked, _) = {
            let c = consumed.lock().unwrap_or_else(|p| p.into_inner());
            tally(&logs, &c)
        };
        if missing_acked == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    consumer_stop.cancel();
    match consumer.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e.context("the consumer failed")),
        Err(e) => bail!("the consumer task failed: {e}"),
    }
    let c = consumed.lock().unwrap_or_else(|p| p.into_inner());
    let (frames_stored, frames_delivered, missing_acknowledged, missing_unacknowledged) =
        tally(&logs, &c);
    let frames_sent = totals.frames.load(Ordering::Relaxed);
    let errors = totals.errors.load(Ordering::Relaxed);
    if errors > 0 {
        eprintln!("   {errors} publishes failed");
    }
    let ack = ack_latency.lock().unwrap_or_else(|p| p.into_inner());
    Ok(SystemResult {
        system,
        durability: system.durability().into(),
        frames_sent,
        frames_per_second: frames_sent as f64 / measured,
        frame_bytes_sent: totals.bytes.load(Ordering::Relaxed),
        frames_stored,
        server_cpu_seconds,
        server_cpu_share: server_cpu_seconds / measured,
        server_cpu_per_stored_frame_us: per_frame_us(server_cpu_seconds, frames_stored),
        server_peak_rss_bytes,
        client_cpu_share: client_cpu_seconds / measured,
        frames_delivered,
        missing_acknowledged,
        missing_unacknowledged,
        duplicates: c.duplicates,
        ecg_latency: percentiles(&c.ecg_latency),
        ack_latency: Some(percentiles(&ack)),
        consumer_errors: c.consumer_errors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_frame_cost_is_cpu_over_stored_frames() {
        assert_eq!(per_frame_us(2.0, 1_000_000), 2.0);
        assert_eq!(per_frame_us(1.0, 0), 0.0);
    }

    #[test]
    fn system_names_are_the_flag_values() {
        use clap::ValueEnum;
        for s in [
            System::Ingest,
            System::JetstreamFsync,
            System::JetstreamLazy,
        ] {
            let flag = s.to_possible_value().map(|v| v.get_name().to_owned());
            assert_eq!(flag, Some(system_name(s)));
        }
    }
}
