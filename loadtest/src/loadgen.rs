//! The load generator: N simulated vehicles (each its own certificate and agent), B emulated
//! bearers each, M gRPC subscribers, against an ingest it starts as a child process (so its
//! CPU time and memory can be measured) or one given by address. A run has two phases with the
//! same workload and seed: the relay as built, then the single-bearer baseline.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use ed_client::client::{ClientTls, connect};
use futures::future::join_all;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use relay_devcerts::{DevPki, generate};
use relay_proto::model::{
    StreamKind, SubscribeRequest, frame::Payload, subscribe_request::Start,
    subscribe_response::Record,
};
use serde::Serialize;
use tokio::time::Instant;
use vehicle_agent::config::SourceConfig;
use vehicle_agent::config::{BearerConfig, Policy};
use vehicle_agent::{Agent, AgentConfig};

use crate::report::{
    ClassAccumulator, IngestUsage, Machine, PhaseReport, Report, SecurityCounters,
};
use crate::seqset::SeqSet;
use relay_emulator::model::Direction;
use relay_emulator::spec::parse_duration;
use relay_emulator::{BearerSpec, DirectionParams, Link, LinkCounters, TraceCache};

/// Subscriber name in the generated PKI.
const SUBSCRIBER: &str = "loadtest";
/// Bound on how long the ingest may take to accept connections.
const INGEST_START_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, clap::Args, Serialize)]
/// Flags of `loadtest run`.
pub struct RunArgs {
    /// Simulated vehicles.
    #[arg(long, default_value_t = 10)]
    pub vehicles: usize,
    /// An emulated bearer per vehicle (repeat for several); see the emulator's spec syntax,
    /// e.g. `data/traces/ATT-LTE-driving.up,delay=40ms`. Default: the two shipped driving traces.
    #[arg(long = "bearer")]
    pub bearers: Vec<String>,
    /// Measured run time.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    #[serde(serialize_with = "secs")]
    pub duration: Duration,
    /// gRPC subscribers, each following every vehicle.
    #[arg(long, default_value_t = 1)]
    pub subscribers: usize,
    /// Capture-to-subscriber deadline for the on-time fraction.
    #[arg(long, default_value = "300ms", value_parser = parse_duration)]
    #[serde(serialize_with = "secs")]
    pub deadline: Duration,
    /// ECG source: `synthetic` (12 leads) or a WFDB record path without extension.
    #[arg(long, default_value = "synthetic")]
    pub ecg: String,
    /// Sample rate of the synthetic ECG.
    #[arg(long, default_value_t = 500)]
    pub ecg_rate_hz: u32,
    /// Duration of one waveform frame, milliseconds.
    #[arg(long, default_value_t = 40)]
    pub frame_ms: u32,
    /// Vitals report interval, milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub vitals_interval_ms: u64,
    /// GPS fix interval, milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub gps_interval_ms: u64,
    /// Fixes trace offsets, loss and jitter patterns.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Start every vehicle this far into its traces; random per vehicle when absent (vehicles
    /// drive through different places).
    #[arg(long, value_parser = parse_duration)]
    #[serde(serialize_with = "opt_secs")]
    pub trace_offset: Option<Duration>,
    /// After the measured time, links are lifted and agents get this long to deliver backlogs.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    #[serde(serialize_with = "secs")]
    pub drain_timeout: Duration,
    /// Skip the single-bearer baseline phase.
    #[arg(long)]
    pub no_baseline: bool,
    /// Agent policy for waveforms (default: the agent's, redundant).
    #[arg(long, value_enum)]
    pub waveform_policy: Option<Policy>,
    /// Failover scenario: this far into the measured time, cut (blackhole, both ways) the bearer
    /// of each vehicle that carried the most in the second before; the report then shows the
    /// longest gap across the cut. Multi-bearer phases only.
    #[arg(long, value_parser = parse_duration)]
    #[serde(serialize_with = "opt_secs")]
    pub cut_carrier_at: Option<Duration>,
    /// Write the JSON report here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Use a running ingest's QUIC address instead of starting one (needs --ingest-grpc, --pki).
    #[arg(long, requires_all = ["ingest_grpc", "pki"])]
    pub ingest_quic: Option<SocketAddr>,
    /// gRPC URL of the running ingest, e.g. https://127.0.0.1:50051.
    #[arg(long)]
    pub ingest_grpc: Option<String>,
    /// PKI directory for an external ingest: hospital-ca.pem, lt-0001.pem/.key ... and
    /// loadtest.pem/.key (create with relay-devcerts).
    #[arg(long)]
    pub pki: Option<PathBuf>,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

fn opt_secs<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_f64(d.as_secs_f64()),
        None => s.serialize_none(),
    }
}

/// Gaps that begin this soon after the cut count as caused by it.
const CUT_WINDOW: Duration = Duration::from_secs(5);

/// Vehicle id of the `i`-th simulated vehicle.
pub fn vehicle_id(i: usize) -> String {
    format!("lt-{:04}", i + 1)
}

/// The default bearers: the two shipped driving traces.
pub fn default_bearers() -> Vec<String> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = manifest.parent().unwrap_or(manifest).join("data/traces");
    ["ATT-LTE-driving.up", "TMobile-UMTS-driving.up"]
        .iter()
        .map(|t| dir.join(t).display().to_string())
        .collect()
}

/// Everything one phase needs to know about a vehicle's bearers.
#[derive(Debug, Clone)]
struct VehiclePlan {
    id: String,
    bearers: Vec<BearerSpec>,
}

/// Where the ingest of a phase is.
struct IngestTarget {
    quic: SocketAddr,
    grpc_url: String,
    child: Option<tokio::process::Child>,
    /// Its metrics endpoint (ours only).
    metrics: Option<SocketAddr>,
}

/// A phase of the run.
struct Phase {
    name: &'static str,
    description: String,
    /// Bearers the emulator runs per vehicle (and the oracle may use).
    bearers_per_vehicle: usize,
}

/// Runs the whole load test and returns its report.
pub async fn run(args: RunArgs, ingest_exe: &Path) -> anyhow::Result<Report> {
    anyhow::ensure!(
        args.vehicles >= 1 && args.vehicles <= 10_000,
        "--vehicles must be 1..=10000"
    );
    anyhow::ensure!(
        args.subscribers >= 1 && args.subscribers <= 256,
        "--subscribers must be 1..=256"
    );
    anyhow::ensure!(
        args.frame_ms >= 1 && args.frame_ms <= 10_000,
        "--frame-ms must be 1..=10000"
    );
    relay_ops::install_crypto_provider();
    let started_utc_ns = hospital_ingest::now_utc_ns();
    let bearer_texts = if args.bearers.is_empty() {
        default_bearers()
    } else {
        args.bearers.clone()
    };
    let mut traces = TraceCache::default();
    let args = RunArgs {
        bearers: bearer_texts.clone(),
        ..args
    };
    let bearers: Vec<BearerSpec> = bearer_texts
        .iter()
        .map(|b| BearerSpec::parse(b, &mut traces))
        .collect::<Result<_, _>>()?;

    let work = tempfile::tempdir().context("creating a work directory")?;
    let pki = match &args.pki {
        Some(p) => p.clone(),
        None => {
            let dir = work.path().join("pki");
            generate(
                &dir,
                &DevPki {
                    vehicles: (0..args.vehicles).map(vehicle_id).collect(),
                    subscribers: vec![SUBSCRIBER.into()],
                    ..DevPki::default()
                },
            )
            .context("creating certificates")?;
            dir
        }
    };

    // Per vehicle: the same stretch of every trace in both phases, so they compare fairly.
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let plans: Vec<VehiclePlan> = (0..args.vehicles)
        .map(|i| {
            let offset = args
                .trace_offset
                .unwrap_or_else(|| Duration::from_millis(rng.random_range(0..1_000_000)));
            VehiclePlan {
                id: vehicle_id(i),
                bearers: bearers
                    .iter()
                    .map(|b| b.with_trace_offset(offset))
                    .collect(),
            }
        })
        .collect();

    let mut phases = vec![Phase {
        name: "relay",
        description: format!(
            "the relay as built: {} emulated bearer(s) per vehicle, the agent schedules over all \
             of them ({}); the oracle may use all",
            bearers.len(),
            args.waveform_policy
                .map_or("default policies".to_owned(), |p| format!(
                    "waveforms {p:?}"
                ))
        ),
        bearers_per_vehicle: bearers.len(),
    }];
    if !args.no_baseline {
        phases.push(Phase {
            name: "baseline",
            description: "same workload over the first bearer alone, no redundancy".into(),
            bearers_per_vehicle: 1,
        });
    }

    let mut reports = Vec::new();
    for phase in &phases {
        let dir = work.path().join(phase.name);
        std::fs::create_dir_all(&dir).context("creating the phase directory")?;
        let report = run_phase(&args, phase, &plans, &pki, &dir, ingest_exe)
            .await
            .with_context(|| format!("phase {}", phase.name))?;
        reports.push(report);
    }
    let report = Report {
        command_line: std::env::args().collect(),
        started_utc_ns,
        machine: Machine::probe(),
        config: serde_json::to_value(&args).context("serializing the configuration")?,
        phases: reports,
    };
    if let Some(path) = &args.report {
        let text = serde_json::to_string_pretty(&report).context("serializing the report")?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}

fn free_port_pair() -> anyhow::Result<(u16, u16)> {
    let u = std::net::UdpSocket::bind("127.0.0.1:0").context("probing a UDP port")?;
    let t = std::net::TcpListener::bind("127.0.0.1:0").context("probing a TCP port")?;
    Ok((u.local_addr()?.port(), t.local_addr()?.port()))
}

async fn start_ingest(
    args: &RunArgs,
    pki: &Path,
    dir: &Path,
    ingest_exe: &Path,
) -> anyhow::Result<IngestTarget> {
    if let (Some(quic), Some(grpc)) = (args.ingest_quic, &args.ingest_grpc) {
        return Ok(IngestTarget {
            quic,
            grpc_url: grpc.clone(),
            child: None,
            metrics: None,
        });
    }
    let (quic_port, grpc_port) = free_port_pair()?;
    let (_, metrics_port) = free_port_pair()?;
    let metrics = SocketAddr::from(([127, 0, 0, 1], metrics_port));
    let log = std::fs::File::create(dir.join("ingest.log")).context("creating ingest.log")?;
    let mut cfg = hospital_ingest::IngestConfig::default();
    cfg.quic.listen = SocketAddr::from(([127, 0, 0, 1], quic_port));
    cfg.grpc.listen = SocketAddr::from(([127, 0, 0, 1], grpc_port));
    cfg.store.path = dir.join("store.redb");
    cfg.tls = hospital_ingest::config::Tls::from_dev_dir(pki);
    cfg.grpc.access_policy = Some(pki.join(relay_devcerts::ACCESS_POLICY));
    cfg.metrics.listen = Some(metrics);
    let config = dir.join("ingest.toml");
    std::fs::write(&config, cfg.to_toml()?).context("writing ingest.toml")?;
    let child = tokio::process::Command::new(ingest_exe)
        .arg("ingest")
        .arg("--config")
        .arg(&config)
        .arg("--allow-dev-pki")
        .env("RUST_LOG", "warn")
        .stdout(log.try_clone().context("ingest log")?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {} ingest", ingest_exe.display()))?;
    Ok(IngestTarget {
        quic: SocketAddr::from(([127, 0, 0, 1], quic_port)),
        grpc_url: format!("https://127.0.0.1:{grpc_port}"),
        child: Some(child),
        metrics: Some(metrics),
    })
}

/// Counters the ingest's detector and TLS stack keep, read from its metrics endpoint: by
/// `reason`, the non-zero ones.
async fn security_counters(metrics: SocketAddr) -> anyhow::Result<SecurityCounters> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let read = async {
        let mut s = tokio::net::TcpStream::connect(metrics).await?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: ingest\r\nConnection: close\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        // The exposition of one ingest is a few hundred KiB at most.
        s.take(16 * 1024 * 1024).read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .context("reading the ingest's metrics timed out")?
        .context("reading the ingest's metrics")?;
    let text = String::from_utf8_lossy(&buf);
    let by_reason = |name: &str| {
        let prefix = format!("{name}{{reason=\"");
        text.lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .filter_map(|l| {
                let (reason, rest) = l.split_once("\"}")?;
                let n = rest.trim().parse::<f64>().ok()?;
                (n > 0.0).then(|| (reason.to_owned(), n as u64))
            })
            .collect()
    };
    Ok(SecurityCounters {
        security_events: by_reason("relay_ingest_security_events_total"),
        handshake_failures: by_reason("relay_ingest_handshake_failures_total"),
    })
}

/// CPU seconds (user + system) and peak RSS of a process, from /proc.
fn process_usage(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on every Linux architecture we run on.
    let cpu = (utime + stime) as f64 / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some((cpu, hwm_kb * 1024))
}

fn sources(args: &RunArgs) -> Vec<SourceConfig> {
    let ecg = if args.ecg == "synthetic" {
        SourceConfig::SyntheticEcg {
            rate_hz: args.ecg_rate_hz,
            heart_rate_bpm: 72.0,
            name: "ecg".into(),
        }
    } else {
        SourceConfig::Wfdb {
            record: PathBuf::from(&args.ecg),
            speed: 1.0,
            r#loop: true,
            name: "ecg".into(),
        }
    };
    vec![
        ecg,
        SourceConfig::SyntheticVitals {
            interval: Duration::from_millis(args.vitals_interval_ms),
        },
        SourceConfig::SyntheticGps {
            interval: Duration::from_millis(args.gps_interval_ms),
            start_latitude_deg: 52.52,
            start_longitude_deg: 13.405,
        },
    ]
}

/// Uplink parameters and time zero of every bearer of one vehicle, for the oracle.
#[derive(Debug, Clone)]
struct OracleBearer {
    up: DirectionParams,
    started_utc_ns: i64,
}

/// When the vehicles started and when the measured time ended, for delivery gaps.
#[derive(Debug, Default)]
struct Timeline {
    run_start: std::sync::OnceLock<Instant>,
    measured_end: std::sync::OnceLock<Instant>,
    /// When the carrying bearers were cut (`--cut-carrier-at`).
    cut: std::sync::OnceLock<Instant>,
}

/// A stream as `(vehicle id, stream id)`.
type StreamKey = (String, u32);

/// What the first subscriber has received of one stream.
#[derive(Debug, Clone, Default)]
struct ReceivedStream {
    seqs: SeqSet,
    /// Values per frame (samples x channels for waveforms, 1 otherwise), for counting losses.
    values_per_frame: u64,
}

/// Shared by the subscriber tasks; each merges its own figures in every flush.
#[derive(Debug, Default)]
struct Measurements {
    classes: HashMap<&'static str, ClassAccumulator>,
    /// What the first subscriber received, per stream.
    received: HashMap<StreamKey, ReceivedStream>,
    duplicates: HashMap<&'static str, u64>,
    /// Total deliveries over all subscribers, for the progress line.
    deliveries: u64,
}

fn class_of(kind: i32) -> &'static str {
    relay_proto::kind_label(kind)
}

/// One subscriber's view of one stream.
#[derive(Debug)]
struct StreamState {
    class: &'static str,
    sample_rate_hz: f64,
    received: ReceivedStream,
    last_arrival: Option<Instant>,
}

impl StreamState {
    fn new(kind: i32) -> Self {
        Self {
            class: class_of(kind),
            sample_rate_hz: 0.0,
            received: ReceivedStream::default(),
            last_arrival: None,
        }
    }
}

/// Figures gathered since the last flush into [`Measurements`].
#[derive(Debug, Default)]
struct Pending {
    classes: HashMap<&'static str, ClassAccumulator>,
    duplicates: HashMap<&'static str, u64>,
    deliveries: u64,
}

/// How often subscribers publish their figures (the drain check reads them).
const FLUSH_INTERVAL: Duration = Duration::from_millis(250);

/// Lower bound for a frame captured (complete) at `end_ns`: its earliest delivery over any of
/// the vehicle's bearers.
fn oracle_bound(bearers: &[OracleBearer], end_ns: i64) -> Option<Duration> {
    bearers
        .iter()
        .filter_map(|b| {
            let t = Duration::from_nanos(u64::try_from(end_ns - b.started_utc_ns).unwrap_or(0));
            Direction::earliest_delivery(&b.up, t).map(|at| at.saturating_sub(t))
        })
        .min()
}

#[allow(clippy::too_many_arguments)]
async fn subscriber(
    index: usize,
    url: String,
    tls: ClientTls,
    oracle: Arc<HashMap<String, Vec<OracleBearer>>>,
    deadline: Duration,
    shared: Arc<Mutex<Measurements>>,
    timeline: Arc<Timeline>,
    ready: tokio::sync::mpsc::Sender<()>,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let mut client = connect(&url, &tls).await.context("subscriber connect")?;
    let mut stream = client
        .subscribe(SubscribeRequest {
            vehicle_ids: vec![],
            kinds: vec![],
            start: Some(Start::Live(true)),
            ..Default::default()
        })
        .await
        .context("subscribe")?
        .into_inner();
    let mut streams: HashMap<StreamKey, StreamState> = HashMap::new();
    let mut pending = Pending::default();
    let flush = |pending: &mut Pending, streams: &HashMap<StreamKey, StreamState>| {
        let mut m = shared.lock().unwrap_or_else(|p| p.into_inner());
        for (k, v) in pending.classes.drain() {
            match m.classes.get_mut(k) {
                Some(acc) => acc.merge(&v),
                None => {
                    m.classes.insert(k, v);
                }
            }
        }
        for (k, n) in pending.duplicates.drain() {
            *m.duplicates.entry(k).or_default() += n;
        }
        m.deliveries += std::mem::take(&mut pending.deliveries);
        if index == 0 {
            for (key, st) in streams {
                m.received.insert(key.clone(), st.received.clone());
            }
        }
    };
    let mut tick = tokio::time::interval(FLUSH_INTERVAL);
    loop {
        let msg = tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {
                flush(&mut pending, &streams);
                continue;
            }
            m = stream.message() => m,
        };
        let Some(msg) = msg.context("subscription")? else {
            break;
        };
        match msg.record {
            Some(Record::Sync(_)) => {
                let _ = ready.send(()).await;
            }
            Some(Record::Stream(info)) => {
                if let (Some(r), Some(d)) = (info.stream, info.descriptor)
                    && let Some(w) = d.waveform
                {
                    streams
                        .entry((r.vehicle_id, r.stream_id))
                        .or_insert_with(|| StreamState::new(r.kind))
                        .sample_rate_hz = w.sample_rate_hz;
                }
            }
            Some(Record::Data(d)) => {
                let now_ns = hospital_ingest::now_utc_ns();
                let now = Instant::now();
                let (Some(r), Some(frame)) = (d.stream, d.frame) else {
                    continue;
                };
                let st = streams
                    .entry((r.vehicle_id.clone(), r.stream_id))
                    .or_insert_with(|| StreamState::new(r.kind));
                // Capture time is the end of the frame: the first moment it could be sent.
                let (end_ns, values, payload) = match &frame.payload {
                    Some(Payload::Waveform(w)) => {
                        let dur = if st.sample_rate_hz > 0.0 {
                            (f64::from(w.sample_count) * 1e9 / st.sample_rate_hz) as i64
                        } else {
                            0
                        };
                        let values = w.samples.len() as u64;
                        (
                            frame.capture_time_ns.saturating_add(dur),
                            values,
                            values * 2,
                        )
                    }
                    Some(Payload::Vitals(v)) => (
                        frame.capture_time_ns,
                        1,
                        prost::Message::encoded_len(v) as u64,
                    ),
                    Some(Payload::Location(l)) => (
                        frame.capture_time_ns,
                        1,
                        prost::Message::encoded_len(l) as u64,
                    ),
                    Some(Payload::Event(e)) => (
                        frame.capture_time_ns,
                        1,
                        prost::Message::encoded_len(e) as u64,
                    ),
                    None => (frame.capture_time_ns, 0, 0),
                };
                if !st.received.seqs.insert(frame.seq) {
                    *pending.duplicates.entry(st.class).or_default() += 1;
                    continue;
                }
                st.received.values_per_frame = st.received.values_per_frame.max(values);
                let acc = match pending.classes.entry(st.class) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(ClassAccumulator::new(deadline)?)
                    }
                };
                acc.record_latency(Duration::from_nanos(
                    u64::try_from(now_ns - end_ns).unwrap_or(0),
                ));
                if d.late {
                    acc.late_records += 1;
                }
                // A stream's first frame counts from the vehicles' start: a vehicle that cannot
                // get through at first shows that as a gap too.
                if let Some(prev) = st
                    .last_arrival
                    .or_else(|| timeline.run_start.get().copied())
                {
                    let gap = now.saturating_duration_since(prev);
                    acc.longest_gap = acc.longest_gap.max(gap);
                    if timeline
                        .cut
                        .get()
                        .is_some_and(|&cut| now >= cut && prev <= cut + CUT_WINDOW)
                    {
                        acc.gap_around_cut = acc.gap_around_cut.max(Some(gap));
                    }
                }
                st.last_arrival = Some(now);
                pending.deliveries += 1;
                if index == 0 {
                    acc.unique_frames += 1;
                    acc.payload_bytes += payload;
                    acc.samples_received += values;
                    if let Some(bound) = oracle
                        .get(&r.vehicle_id)
                        .and_then(|b| oracle_bound(b, end_ns))
                    {
                        acc.record_oracle(bound);
                    }
                }
            }
            _ => {}
        }
    }
    // Streams silent at the end of the measured time (and not heard from since).
    if let Some(end) = timeline.measured_end.get() {
        for st in streams.values() {
            if let Some(last) = st.last_arrival.filter(|last| last < end) {
                let acc = match pending.classes.entry(st.class) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(ClassAccumulator::new(deadline)?)
                    }
                };
                acc.longest_gap = acc.longest_gap.max(end.saturating_duration_since(last));
            }
        }
    }
    flush(&mut pending, &streams);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn run_phase(
    args: &RunArgs,
    phase: &Phase,
    plans: &[VehiclePlan],
    pki: &Path,
    dir: &Path,
    ingest_exe: &Path,
) -> anyhow::Result<PhaseReport> {
    let mut ingest = start_ingest(args, pki, dir, ingest_exe).await?;
    let tls = ClientTls::from_dev_dir(pki, SUBSCRIBER);

    // Wait until the ingest answers on gRPC.
    let t0 = Instant::now();
    loop {
        if connect(&ingest.grpc_url, &tls).await.is_ok() {
            break;
        }
        if let Some(child) = ingest.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            bail!(
                "the ingest exited ({status}); see its log:\n{}",
                std::fs::read_to_string(dir.join("ingest.log")).unwrap_or_default()
            );
        }
        if t0.elapsed() > INGEST_START_TIMEOUT {
            bail!("the ingest did not accept gRPC connections within {INGEST_START_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Links first (their time zero anchors the oracle), then subscribers, then vehicles.
    let mut links: Vec<Vec<Link>> = Vec::new();
    let mut oracle: HashMap<String, Vec<OracleBearer>> = HashMap::new();
    for (v, plan) in plans.iter().enumerate() {
        let mut mine = Vec::new();
        for (b, spec) in plan
            .bearers
            .iter()
            .take(phase.bearers_per_vehicle)
            .enumerate()
        {
            // The same seed per vehicle and bearer in every phase.
            let seed = args.seed ^ ((v as u64) << 16) ^ (b as u64);
            let link = Link::start(
                "127.0.0.1:0".parse().context("loopback")?,
                ingest.quic,
                spec.clone(),
                seed,
            )
            .await
            .context("starting an emulated link")?;
            mine.push(link);
        }
        oracle.insert(
            plan.id.clone(),
            mine.iter()
                .map(|l| OracleBearer {
                    up: l.spec.up.clone(),
                    started_utc_ns: l.started_utc_ns,
                })
                .collect(),
        );
        links.push(mine);
    }

    let shared = Arc::new(Mutex::new(Measurements::default()));
    let oracle = Arc::new(oracle);
    let timeline = Arc::new(Timeline::default());
    let stop_subscribers = tokio_util::sync::CancellationToken::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(args.subscribers);
    let mut subscriber_tasks = Vec::new();
    for i in 0..args.subscribers {
        subscriber_tasks.push(tokio::spawn(subscriber(
            i,
            ingest.grpc_url.clone(),
            tls.clone(),
            oracle.clone(),
            args.deadline,
            shared.clone(),
            timeline.clone(),
            ready_tx.clone(),
            stop_subscribers.clone(),
        )));
    }
    drop(ready_tx);
    for _ in 0..args.subscribers {
        tokio::time::timeout(INGEST_START_TIMEOUT, ready_rx.recv())
            .await
            .context("subscribers did not get their sync marker")?;
    }

    let cpu_before = ingest
        .child
        .as_ref()
        .and_then(|c| c.id())
        .and_then(process_usage)
        .map(|u| u.0);
    let _ = timeline.run_start.set(Instant::now());
    let mut agents = Vec::new();
    for (plan, mine) in plans.iter().zip(&links) {
        let mut cfg = AgentConfig {
            vehicle_id: plan.id.clone(),
            // Load runs use the development PKI they made.
            allow_dev_pki: true,
            ..AgentConfig::default()
        };
        let first = mine.first().context("a vehicle without bearers")?;
        cfg.ingest.address = first.addr;
        // Each emulated link is its own path to the ingest: one bearer per link.
        cfg.bearers = mine
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let mut b =
                    BearerConfig::new(&format!("wan{i}"), SocketAddr::from(([127, 0, 0, 1], 0)));
                b.remote = Some(l.addr);
                b
            })
            .collect();
        cfg.spool.path = dir.join(format!("spool-{}.redb", plan.id));
        cfg.tls.ca_cert = pki.join("hospital-ca.pem");
        cfg.tls.cert = pki.join(format!("{}.pem", plan.id));
        cfg.tls.key = pki.join(format!("{}.key", plan.id));
        cfg.framing.frame = Duration::from_millis(u64::from(args.frame_ms));
        cfg.buffer.stop_drain = args.drain_timeout;
        cfg.sources = sources(args);
        if let Some(p) = args.waveform_policy {
            cfg.scheduling.waveforms = p;
        }
        agents.push(
            Agent::start(cfg)
                .await
                .with_context(|| format!("starting agent {}", plan.id))?,
        );
    }

    let run_start = Instant::now();
    let bar = ProgressBar::new(args.duration.as_secs().max(1));
    bar.set_style(
        ProgressStyle::with_template("{prefix:>8} [{bar:40}] {pos}/{len} s  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix(phase.name);
    // Failover scenario: what each link carried in the second before the cut.
    let cut_at = args
        .cut_carrier_at
        .filter(|_| phase.bearers_per_vehicle > 1 && timeline.cut.get().is_none());
    let mut carried_before: Option<Vec<Vec<u64>>> = None;
    let delivered = |links: &Vec<Vec<Link>>| -> Vec<Vec<u64>> {
        links
            .iter()
            .map(|mine| {
                mine.iter()
                    .map(|l| l.counters().up.delivered_bytes)
                    .collect()
            })
            .collect()
    };
    while run_start.elapsed() < args.duration {
        let mut step =
            Duration::from_millis(500).min(args.duration.saturating_sub(run_start.elapsed()));
        if let Some(at) = cut_at {
            let sample_at = at.saturating_sub(Duration::from_secs(1));
            let elapsed = run_start.elapsed();
            if carried_before.is_none() && elapsed >= sample_at {
                carried_before = Some(delivered(&links));
            } else if let Some(before) = carried_before
                .as_ref()
                .filter(|_| elapsed >= at && timeline.cut.get().is_none())
            {
                let now = delivered(&links);
                for ((mine, b), n) in links.iter().zip(before).zip(&now) {
                    let carrier = (0..mine.len()).max_by_key(|&i| n[i].saturating_sub(b[i]));
                    if let Some(l) = carrier.and_then(|i| mine.get(i)) {
                        l.cut();
                    }
                }
                let _ = timeline.cut.set(Instant::now());
            }
            for t in [sample_at, at] {
                if t > elapsed {
                    step = step.min(t - elapsed);
                }
            }
        }
        tokio::time::sleep(step).await;
        bar.set_position(run_start.elapsed().as_secs());
        let d = shared.lock().unwrap_or_else(|p| p.into_inner()).deliveries;
        bar.set_message(format!("{d} frames delivered"));
    }
    bar.finish_and_clear();
    let measured = run_start.elapsed();
    let _ = timeline.measured_end.set(Instant::now());

    // The measurement is over: take the limits off so every backlog can drain, then stop the
    // vehicles (each delivers what is unacknowledged within the drain timeout).
    let drain_start = Instant::now();
    let spinner = ProgressBar::new_spinner();
    spinner.set_prefix(phase.name);
    spinner.set_style(
        ProgressStyle::with_template("{prefix:>8} {spinner} {elapsed} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    spinner.enable_steady_tick(Duration::from_millis(200));
    spinner.set_message("links lifted; vehicles stopping and delivering their backlog");
    for l in links.iter().flatten() {
        l.lift();
    }
    let summaries = join_all(agents.into_iter().map(|a| a.shutdown())).await;
    let mut produced: HashMap<StreamKey, u64> = HashMap::new();
    let mut unacked = 0u64;
    for (plan, s) in plans.iter().zip(summaries) {
        let s = s.with_context(|| format!("stopping agent {}", plan.id))?;
        unacked += s.unacked_at_exit as u64;
        for (stream, n) in s.frames_produced {
            produced.insert((plan.id.clone(), stream), n);
        }
    }
    // Wait for the subscribers to see every produced frame (bounded by the drain timeout).
    let kinds = stream_classes(&sources(args));
    while drain_start.elapsed() < args.drain_timeout {
        {
            let m = shared.lock().unwrap_or_else(|p| p.into_inner());
            let missing: u64 = losses(&produced, &m.received, &kinds)
                .values()
                .map(|(_, lost, _)| lost)
                .sum();
            if missing == 0 {
                break;
            }
            spinner.set_message(format!("{missing} frames still on their way"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    spinner.finish_and_clear();
    let drained = drain_start.elapsed();
    let usage = ingest
        .child
        .as_ref()
        .and_then(|c| c.id())
        .and_then(process_usage);
    let security = match ingest.metrics {
        Some(addr) => Some(security_counters(addr).await?),
        None => None,
    };
    stop_subscribers.cancel();
    // A subscriber that ended early (cut off as slow, connection lost) makes its figures
    // partial: the report says so instead of blaming the relay for frames it never asked for.
    let mut subscriber_errors = Vec::new();
    for (i, t) in subscriber_tasks.into_iter().enumerate() {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => subscriber_errors.push(format!("subscriber {i}: {e:#}")),
            Err(e) => subscriber_errors.push(format!("subscriber {i}: task failed: {e}")),
        }
    }
    if let Some(mut child) = ingest.child.take() {
        let _ = child.kill().await;
    }
    let mut counters = LinkCounters::default();
    let mut bearer_names = Vec::new();
    for (i, l) in links.into_iter().flatten().enumerate() {
        if i < phase.bearers_per_vehicle {
            bearer_names.push(l.spec.name.clone());
        }
        let c = l.stop();
        counters.up.add(&c.up);
        counters.down.add(&c.down);
    }

    let m = std::mem::take(&mut *shared.lock().unwrap_or_else(|p| p.into_inner()));
    // Losses per class from what the agents produced.
    let mut classes = std::collections::BTreeMap::new();
    let per_class = losses(&produced, &m.received, &kinds);
    let mut payload_total = 0u64;
    for (class, (frames, lost, samples_lost)) in per_class {
        let acc = match m.classes.get(class) {
            Some(a) => a.clone(),
            None => ClassAccumulator::new(args.deadline)?,
        };
        payload_total += acc.payload_bytes;
        let dup = m.duplicates.get(class).copied().unwrap_or(0);
        classes.insert(
            class.to_owned(),
            acc.finish(frames, lost, samples_lost, dup),
        );
    }
    let ingest_usage = match (usage, cpu_before) {
        (Some((cpu, rss)), Some(before)) => Some(IngestUsage {
            cpu_seconds: cpu - before,
            peak_rss_bytes: rss,
        }),
        _ => None,
    };
    Ok(PhaseReport {
        name: phase.name.into(),
        description: phase.description.clone(),
        bearers: bearer_names,
        bearers_used_by_agent: phase.bearers_per_vehicle,
        vehicles: plans.len(),
        subscribers: args.subscribers,
        measured_seconds: measured.as_secs_f64(),
        drain_seconds: drained.as_secs_f64(),
        classes,
        frames_unacked_at_agent_exit: unacked,
        wire_bytes_up: counters.up.offered_bytes,
        wire_bytes_down: counters.down.offered_bytes,
        wire_bytes_per_payload_byte: if payload_total == 0 {
            0.0
        } else {
            counters.up.offered_bytes as f64 / payload_total as f64
        },
        links: counters,
        ingest: ingest_usage,
        security,
        subscriber_errors,
    })
}

/// Per class: frames produced, frames never received, and their values (samples x channels
/// for waveforms, 1 per report otherwise).
fn losses(
    produced: &HashMap<StreamKey, u64>,
    received: &HashMap<StreamKey, ReceivedStream>,
    kinds: &HashMap<u32, &'static str>,
) -> HashMap<&'static str, (u64, u64, u64)> {
    let mut per_class: HashMap<&'static str, (u64, u64, u64)> = HashMap::new();
    for (key, n) in produced {
        let class = kinds.get(&key.1).copied().unwrap_or("other");
        let (missing, per_frame) = received.get(key).map_or((*n, 1), |r| {
            (r.seqs.missing_below(*n), r.values_per_frame.max(1))
        });
        let e = per_class.entry(class).or_default();
        e.0 += n;
        e.1 += missing;
        e.2 += missing * per_frame;
    }
    per_class
}

/// Class of each source's stream id (stream ids are the source positions).
fn stream_classes(sources: &[SourceConfig]) -> HashMap<u32, &'static str> {
    sources
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let kind = match s {
                SourceConfig::Wfdb { .. } | SourceConfig::SyntheticEcg { .. } => {
                    StreamKind::Waveform
                }
                SourceConfig::SyntheticVitals { .. } => StreamKind::Vitals,
                SourceConfig::SyntheticGps { .. } => StreamKind::Location,
            };
            (i as u32, class_of(kind as i32))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn losses_count_every_missing_frame_and_its_samples() {
        let key = |v: &str, s: u32| (v.to_string(), s);
        let produced = HashMap::from([(key("a", 0), 10), (key("a", 1), 3), (key("b", 0), 5)]);
        let stream = |seqs: SeqSet, values_per_frame| ReceivedStream {
            seqs,
            values_per_frame,
        };
        let received = HashMap::from([
            (
                key("a", 0),
                stream((0..10).filter(|s| *s != 4 && *s != 9).collect(), 240),
            ),
            (key("a", 1), stream((0..3).collect(), 1)),
            // Announced, but not a single frame arrived.
            (key("b", 0), stream(SeqSet::default(), 240)),
        ]);
        let kinds = HashMap::from([(0, "waveform"), (1, "vitals")]);
        let l = losses(&produced, &received, &kinds);
        // a/0 misses seqs 4 and 9; b/0 never arrived at all.
        assert_eq!(l["waveform"], (15, 7, 7 * 240));
        assert_eq!(l["vitals"], (3, 0, 0));
    }
}
