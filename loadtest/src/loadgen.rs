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

use crate::nats::{Cluster, ClusterOptions, SyncInterval};
use crate::report::{
    ClassAccumulator, Machine, PhaseReport, ProcessUsage, Report, SecurityCounters,
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
    /// How agents send waveform samples (the agent's `framing.waveform_encoding`).
    #[arg(long, value_enum, default_value = "lpc1")]
    pub waveform_encoding: vehicle_agent::config::WaveformEncodingChoice,
    /// Failover scenario: this far into the measured time, cut (blackhole, both ways) the bearer
    /// of each vehicle that carried the most in the second before; the report then shows the
    /// longest gap across the cut. Multi-bearer phases only.
    #[arg(long, value_parser = parse_duration)]
    #[serde(serialize_with = "opt_secs")]
    pub cut_carrier_at: Option<Duration>,
    /// Write the JSON report here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// A running ingest node instead of starting ingests: `QUIC_ADDRESS,GRPC_URL`, e.g.
    /// `127.0.0.1:4433,https://127.0.0.1:50051`; repeat for every node of a cluster (bearers
    /// and subscribers are spread over them, each fails over to the others). Needs --pki.
    #[arg(long = "ingest", requires = "pki", value_name = "QUIC,GRPC_URL")]
    pub ingest: Vec<ExternalIngest>,
    /// The log of the ingests the run starts: `embedded` (one ingest, its own redb file) or
    /// `jetstream` (a NATS JetStream cluster the run starts from deploy/nats/nats.conf, 3
    /// nodes, R3, shared by every ingest node).
    #[arg(long, value_enum, default_value_t = StoreChoice::Embedded)]
    pub store: StoreChoice,
    /// Ingest nodes to start (embedded: 1; jetstream: default 2). Each vehicle's bearers
    /// start on different nodes and fail over to the others.
    #[arg(long)]
    pub ingest_nodes: Option<usize>,
    /// The nats-server binary for `--store jetstream` (default: $NATS_SERVER, else
    /// nats-server on the PATH; 2.10 or later).
    #[arg(long)]
    pub nats_server: Option<String>,
    /// JetStream `sync_interval` of the NATS nodes: `always` (fsync before every
    /// acknowledgement, as shipped) or a period such as `2m` (NATS's default), to measure what
    /// `always` costs.
    #[arg(long, default_value = "always")]
    pub nats_sync_interval: SyncInterval,
    /// Node failure scenario: this far into the measured time, SIGKILL the first ingest node
    /// (of those the run starts; two or more); its vehicles and subscribers move to the
    /// others, and the report shows the longest gap across the kill.
    #[arg(long, value_name = "AFTER", value_parser = parse_duration)]
    #[serde(serialize_with = "opt_secs")]
    pub kill_node: Option<Duration>,
    /// PKI directory for external ingests: hospital-ca.pem, lt-0001.pem/.key ... and
    /// loadtest.pem/.key (create with relay-devcerts). With --store jetstream also the NATS
    /// certificates relay-devcerts writes.
    #[arg(long)]
    pub pki: Option<PathBuf>,
}

/// Where a load run keeps its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreChoice {
    /// Each ingest its own redb file.
    Embedded,
    /// A NATS JetStream cluster the run starts.
    Jetstream,
}

/// A running ingest node given on the command line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExternalIngest {
    /// Its QUIC address.
    pub quic: SocketAddr,
    /// Its gRPC URL.
    pub grpc: String,
}

impl std::str::FromStr for ExternalIngest {
    type Err = String;

    /// `QUIC_ADDRESS,GRPC_URL`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (quic, grpc) = s
            .split_once(',')
            .ok_or_else(|| format!("ingest {s:?}: expected QUIC_ADDRESS,GRPC_URL"))?;
        let quic = quic
            .trim()
            .parse()
            .map_err(|e| format!("ingest {s:?}: QUIC address: {e}"))?;
        let grpc = grpc.trim();
        if !grpc.starts_with("https://") {
            return Err(format!("ingest {s:?}: the gRPC URL must be https://..."));
        }
        Ok(Self {
            quic,
            grpc: grpc.to_owned(),
        })
    }
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
    ingest_node_count(&args)?;
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
             of them ({}, waveform encoding {:?}); the oracle may use all",
            bearers.len(),
            args.waveform_policy
                .map_or("default policies".to_owned(), |p| format!(
                    "waveforms {p:?}"
                )),
            args.waveform_encoding
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

/// Ingest nodes a run may use (started or given).
const MAX_INGEST_NODES: usize = 16;

/// How many ingest nodes a run uses, after checking the flags agree.
fn ingest_node_count(args: &RunArgs) -> anyhow::Result<usize> {
    if !args.ingest.is_empty() {
        anyhow::ensure!(
            args.ingest_nodes.is_none() && args.store == StoreChoice::Embedded,
            "--ingest names running nodes: --ingest-nodes and --store do not apply"
        );
        anyhow::ensure!(
            args.kill_node.is_none(),
            "--kill-node kills a node the run started; it cannot kill one given by --ingest"
        );
        // Each node gets an emulated link per bearer of every vehicle.
        anyhow::ensure!(
            args.ingest.len() <= MAX_INGEST_NODES,
            "--ingest names at most {MAX_INGEST_NODES} nodes"
        );
        return Ok(args.ingest.len());
    }
    let nodes = match (args.store, args.ingest_nodes) {
        (StoreChoice::Embedded, None | Some(1)) => 1,
        (StoreChoice::Embedded, Some(_)) => bail!(
            "--store embedded runs one ingest (each node would have a log of its own); several \
             nodes need --store jetstream"
        ),
        (StoreChoice::Jetstream, n) => n.unwrap_or(2),
    };
    anyhow::ensure!(
        (1..=MAX_INGEST_NODES).contains(&nodes),
        "--ingest-nodes must be 1..={MAX_INGEST_NODES}"
    );
    anyhow::ensure!(
        args.kill_node.is_none() || nodes >= 2,
        "--kill-node needs two or more ingest nodes (--store jetstream --ingest-nodes 2)"
    );
    Ok(nodes)
}

/// One ingest node of a phase.
pub(crate) struct IngestNode {
    pub(crate) quic: SocketAddr,
    pub(crate) grpc_url: String,
    pub(crate) child: Option<tokio::process::Child>,
    /// Its metrics endpoint (ours only).
    pub(crate) metrics: Option<SocketAddr>,
    /// Its log file (ours only).
    pub(crate) log: Option<PathBuf>,
}

/// The NATS cluster a jetstream phase runs on.
fn nats_options(args: &RunArgs) -> ClusterOptions {
    let mut o = ClusterOptions::new();
    if let Some(server) = &args.nats_server {
        o.server = server.clone();
    }
    o.sync = args.nats_sync_interval;
    o
}

async fn start_ingests(
    args: &RunArgs,
    pki: &Path,
    dir: &Path,
    ingest_exe: &Path,
    nats: Option<&Cluster>,
) -> anyhow::Result<Vec<IngestNode>> {
    if !args.ingest.is_empty() {
        return Ok(args
            .ingest
            .iter()
            .map(|e| IngestNode {
                quic: e.quic,
                grpc_url: e.grpc.clone(),
                child: None,
                metrics: None,
                log: None,
            })
            .collect());
    }
    let mut nodes = Vec::new();
    for n in 0..ingest_node_count(args)? {
        nodes.push(spawn_ingest(
            pki,
            &dir.join(format!("ingest-{}", n + 1)),
            ingest_exe,
            |cfg| {
                if let Some(cluster) = nats {
                    cfg.store.backend = hospital_ingest::config::StoreBackend::Jetstream;
                    cfg.jetstream.servers = cluster.urls();
                    cfg.jetstream.ca = pki.join("hospital-ca.pem");
                    cfg.jetstream.cert =
                        pki.join(format!("{}.pem", relay_devcerts::NATS_INGEST_CLIENT));
                    cfg.jetstream.key =
                        pki.join(format!("{}.key", relay_devcerts::NATS_INGEST_CLIENT));
                    cfg.jetstream.replicas = cluster.nodes.len().min(3);
                    cfg.jetstream.client_name = format!("loadtest-ingest-{}", n + 1);
                }
            },
        )?);
    }
    Ok(nodes)
}

/// Waits until `node` accepts gRPC connections; fails when it exits or takes too long.
pub(crate) async fn wait_for_grpc(node: &mut IngestNode, tls: &ClientTls) -> anyhow::Result<()> {
    let t0 = Instant::now();
    loop {
        if connect(&node.grpc_url, tls).await.is_ok() {
            return Ok(());
        }
        if let Some(child) = node.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            let log = node.log.as_ref().map(std::fs::read_to_string);
            bail!(
                "the ingest exited ({status}); see its log:\n{}",
                log.and_then(Result::ok).unwrap_or_default()
            );
        }
        if t0.elapsed() > INGEST_START_TIMEOUT {
            bail!(
                "the ingest at {} did not accept gRPC connections within \
                 {INGEST_START_TIMEOUT:?}",
                node.grpc_url
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts one ingest node as a child process (`loadtest ingest`) on free loopback ports, with
/// its store, configuration and log in `node_dir`; `tweak` adjusts the configuration.
pub(crate) fn spawn_ingest(
    pki: &Path,
    node_dir: &Path,
    ingest_exe: &Path,
    tweak: impl FnOnce(&mut hospital_ingest::IngestConfig),
) -> anyhow::Result<IngestNode> {
    let (quic_port, grpc_port) = free_port_pair()?;
    let (_, metrics_port) = free_port_pair()?;
    let metrics = SocketAddr::from(([127, 0, 0, 1], metrics_port));
    std::fs::create_dir_all(node_dir).context("creating the ingest's directory")?;
    let log_path = node_dir.join("ingest.log");
    let log = std::fs::File::create(&log_path).context("creating ingest.log")?;
    let mut cfg = hospital_ingest::IngestConfig::default();
    cfg.quic.listen = SocketAddr::from(([127, 0, 0, 1], quic_port));
    cfg.grpc.listen = SocketAddr::from(([127, 0, 0, 1], grpc_port));
    cfg.store.path = node_dir.join("store.redb");
    cfg.tls = hospital_ingest::config::Tls::from_dev_dir(pki);
    cfg.grpc.access_policy = Some(pki.join(relay_devcerts::ACCESS_POLICY));
    cfg.metrics.listen = Some(metrics);
    tweak(&mut cfg);
    let config = node_dir.join("ingest.toml");
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
    Ok(IngestNode {
        quic: cfg.quic.listen,
        grpc_url: format!("https://127.0.0.1:{grpc_port}"),
        child: Some(child),
        metrics: Some(metrics),
        log: Some(log_path),
    })
}

/// Counters the ingest's detector and TLS stack keep, read from its metrics endpoint: by
/// `reason`, the non-zero ones.
async fn security_counters(metrics: SocketAddr) -> anyhow::Result<SecurityCounters> {
    let text = crate::nats::http_get(metrics, "/metrics")
        .await
        .with_context(|| format!("reading the ingest's metrics at {metrics}"))?;
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
pub(crate) fn process_usage(pid: u32) -> Option<(f64, u64)> {
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
    /// Times a subscriber moved to another node.
    subscriber_reconnects: u64,
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
    reconnects: u64,
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

/// Bound on one subscriber's moves to another node (each after its node went away).
const MAX_SUBSCRIBER_RECONNECTS: u64 = 64;

/// Opens a subscription on `url`.
pub(crate) async fn subscribe(
    url: &str,
    tls: &ClientTls,
    start: Start,
) -> anyhow::Result<tonic::Streaming<relay_proto::model::SubscribeResponse>> {
    let mut client = connect(url, tls)
        .await
        .with_context(|| format!("subscriber connect to {url}"))?;
    Ok(client
        .subscribe(SubscribeRequest {
            vehicle_ids: vec![],
            kinds: vec![],
            start: Some(start),
            ..Default::default()
        })
        .await
        .with_context(|| format!("subscribe at {url}"))?
        .into_inner())
}

/// Where a subscriber connects: `urls[0]` first, then, when its node goes away, the next one
/// (resuming after the last cursor it got).
#[allow(clippy::too_many_arguments)]
async fn subscriber(
    index: usize,
    urls: Vec<String>,
    tls: ClientTls,
    oracle: Arc<HashMap<String, Vec<OracleBearer>>>,
    deadline: Duration,
    shared: Arc<Mutex<Measurements>>,
    timeline: Arc<Timeline>,
    ready: tokio::sync::mpsc::Sender<()>,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let first = urls.first().context("a subscriber without an ingest")?;
    let mut stream = subscribe(first, &tls, Start::Live(true)).await?;
    let mut node = 0usize;
    let mut cursor = 0u64;
    let mut reconnects = 0u64;
    // Only the first sync marker says the subscriber is ready.
    let mut ready = Some(ready);
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
        m.subscriber_reconnects += std::mem::take(&mut pending.reconnects);
        if index == 0 {
            for (key, st) in streams {
                m.received.insert(key.clone(), st.received.clone());
            }
        }
    };
    let mut tick = tokio::time::interval(FLUSH_INTERVAL);
    'messages: loop {
        let msg = tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {
                flush(&mut pending, &streams);
                continue;
            }
            m = stream.message() => m,
        };
        let msg = match msg {
            Ok(Some(msg)) => msg,
            // Its node went away (killed, restarting): with other nodes, resume there after
            // the last cursor; nothing stored in between is missed, nothing repeated.
            ended if urls.len() > 1 => {
                if reconnects >= MAX_SUBSCRIBER_RECONNECTS {
                    ended.context("subscription")?;
                    bail!("subscription ended {reconnects} times");
                }
                reconnects += 1;
                pending.reconnects += 1;
                loop {
                    node = (node + 1) % urls.len();
                    match subscribe(&urls[node], &tls, Start::AfterCursor(cursor)).await {
                        Ok(s) => {
                            stream = s;
                            continue 'messages;
                        }
                        Err(e) => tracing::warn!("subscriber {index}: {e:#}"),
                    }
                    tokio::select! {
                        () = stop.cancelled() => break 'messages,
                        () = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
            }
            Ok(None) => break,
            Err(e) => return Err(e).context("subscription"),
        };
        if msg.cursor > 0 {
            cursor = msg.cursor;
        }
        match msg.record {
            Some(Record::Sync(_)) => {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(()).await;
                }
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

/// CPU seconds and peak RSS of the processes in `pids`, each from its own baseline.
fn usage_since(pids: &[Option<u32>], before: &[Option<f64>]) -> Vec<Option<ProcessUsage>> {
    pids.iter()
        .zip(before)
        .map(|(pid, before)| {
            let (cpu, rss) = pid.and_then(process_usage)?;
            Some(ProcessUsage {
                cpu_seconds: cpu - before.unwrap_or(0.0),
                peak_rss_bytes: rss,
            })
        })
        .collect()
}

/// The emulated links of one bearer of a vehicle: one per ingest node (the same trace, offset
/// and seed), so the bearer keeps its character whichever node it dials.
type BearerLinks = Vec<Link>;

#[allow(clippy::too_many_arguments)]
async fn run_phase(
    args: &RunArgs,
    phase: &Phase,
    plans: &[VehiclePlan],
    pki: &Path,
    dir: &Path,
    ingest_exe: &Path,
) -> anyhow::Result<PhaseReport> {
    let mut nats = match args.store {
        StoreChoice::Jetstream if args.ingest.is_empty() => Some(
            Cluster::start(
                pki,
                &dir.join("nats"),
                &nats_options(args),
                INGEST_START_TIMEOUT,
            )
            .await
            .context("starting the NATS cluster")?,
        ),
        _ => None,
    };
    let mut ingests = start_ingests(args, pki, dir, ingest_exe, nats.as_ref()).await?;
    let tls = ClientTls::from_dev_dir(pki, SUBSCRIBER);

    // Wait until every ingest answers on gRPC.
    for node in &mut ingests {
        wait_for_grpc(node, &tls).await?;
    }

    // Links first (their time zero anchors the oracle), then subscribers, then vehicles.
    // Bearer b of vehicle v starts at node (v + b) mod nodes: a vehicle's bearers land on
    // different nodes, and the vehicles spread evenly.
    let node_count = ingests.len();
    let mut links: Vec<Vec<BearerLinks>> = Vec::new();
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
            let mut per_node = Vec::new();
            for k in 0..node_count {
                let node = &ingests[(v + b + k) % node_count];
                let link = Link::start(
                    "127.0.0.1:0".parse().context("loopback")?,
                    node.quic,
                    spec.clone(),
                    seed,
                )
                .await
                .context("starting an emulated link")?;
                per_node.push(link);
            }
            mine.push(per_node);
        }
        oracle.insert(
            plan.id.clone(),
            mine.iter()
                .filter_map(|per_node| per_node.first())
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
        // Subscribers spread over the nodes too; each falls back to the others in turn.
        let urls = (0..node_count)
            .map(|k| ingests[(i + k) % node_count].grpc_url.clone())
            .collect();
        subscriber_tasks.push(tokio::spawn(subscriber(
            i,
            urls,
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

    let ingest_pids: Vec<Option<u32>> = ingests
        .iter()
        .map(|n| n.child.as_ref().and_then(|c| c.id()))
        .collect();
    let nats_pids: Vec<Option<u32>> = nats
        .as_ref()
        .map(|c| c.nodes.iter().map(|n| n.pid()).collect())
        .unwrap_or_default();
    let cpu = |pids: &[Option<u32>]| -> Vec<Option<f64>> {
        pids.iter()
            .map(|p| p.and_then(process_usage).map(|u| u.0))
            .collect()
    };
    let ingest_cpu_before = cpu(&ingest_pids);
    let nats_cpu_before = cpu(&nats_pids);
    // A killed node's figures are taken just before the kill.
    let mut killed_usage: Option<(usize, Option<ProcessUsage>)> = None;
    let _ = timeline.run_start.set(Instant::now());
    let mut agents = Vec::new();
    for (plan, mine) in plans.iter().zip(&links) {
        let mut cfg = AgentConfig {
            vehicle_id: plan.id.clone(),
            // Load runs use the development PKI they made.
            allow_dev_pki: true,
            ..AgentConfig::default()
        };
        let first = mine
            .first()
            .and_then(|per_node| per_node.first())
            .context("a vehicle without bearers")?;
        cfg.ingest.address = first.addr;
        // Each emulated link is its own path to one node: one bearer per emulated bearer,
        // dialling its first node's link and failing over to the others'.
        cfg.bearers = mine
            .iter()
            .enumerate()
            .map(|(i, per_node)| {
                let mut b =
                    BearerConfig::new(&format!("wan{i}"), SocketAddr::from(([127, 0, 0, 1], 0)));
                b.remote = per_node.first().map(|l| l.addr);
                b.fallback_remotes = per_node.iter().skip(1).map(|l| l.addr).collect();
                b
            })
            .collect();
        cfg.spool.path = dir.join(format!("spool-{}.redb", plan.id));
        cfg.tls.ca_cert = pki.join("hospital-ca.pem");
        cfg.tls.cert = pki.join(format!("{}.pem", plan.id));
        cfg.tls.key = pki.join(format!("{}.key", plan.id));
        cfg.framing.frame = Duration::from_millis(u64::from(args.frame_ms));
        cfg.framing.waveform_encoding = args.waveform_encoding;
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
    // Failover scenario: what each bearer carried in the second before the cut.
    let cut_at = args
        .cut_carrier_at
        .filter(|_| phase.bearers_per_vehicle > 1 && timeline.cut.get().is_none());
    let mut carried_before: Option<Vec<Vec<u64>>> = None;
    let delivered = |links: &Vec<Vec<BearerLinks>>| -> Vec<Vec<u64>> {
        links
            .iter()
            .map(|mine| {
                mine.iter()
                    .map(|per_node| {
                        per_node
                            .iter()
                            .map(|l| l.counters().up.delivered_bytes)
                            .sum()
                    })
                    .collect()
            })
            .collect()
    };
    let mut disruption = None;
    while run_start.elapsed() < args.duration {
        let mut step =
            Duration::from_millis(500).min(args.duration.saturating_sub(run_start.elapsed()));
        let elapsed = run_start.elapsed();
        if let Some(at) = cut_at {
            let sample_at = at.saturating_sub(Duration::from_secs(1));
            if carried_before.is_none() && elapsed >= sample_at {
                carried_before = Some(delivered(&links));
            } else if let Some(before) = carried_before
                .as_ref()
                .filter(|_| elapsed >= at && timeline.cut.get().is_none())
            {
                let now = delivered(&links);
                for ((mine, b), n) in links.iter().zip(before).zip(&now) {
                    let carrier = (0..mine.len()).max_by_key(|&i| n[i].saturating_sub(b[i]));
                    for l in carrier.and_then(|i| mine.get(i)).into_iter().flatten() {
                        l.cut();
                    }
                }
                let _ = timeline.cut.set(Instant::now());
                disruption = Some(format!(
                    "cut of the carrying bearer at {:.0} s",
                    at.as_secs_f64()
                ));
            }
            for t in [sample_at, at] {
                if t > elapsed {
                    step = step.min(t - elapsed);
                }
            }
        }
        if let Some(at) = args.kill_node {
            if elapsed >= at && killed_usage.is_none() {
                let before = ingest_cpu_before.first().copied().flatten();
                let usage = usage_since(&ingest_pids[..1], &[before]).pop().flatten();
                if let Some(mut child) = ingests.first_mut().and_then(|n| n.child.take()) {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                }
                killed_usage = Some((0, usage));
                let _ = timeline.cut.set(Instant::now());
                disruption = Some(format!(
                    "SIGKILL of ingest node 1 at {:.0} s",
                    at.as_secs_f64()
                ));
            } else if at > elapsed {
                step = step.min(at - elapsed);
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
    for l in links.iter().flatten().flatten() {
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
    let mut ingest_nodes = usage_since(&ingest_pids, &ingest_cpu_before);
    if let Some((i, usage)) = killed_usage
        && let Some(slot) = ingest_nodes.get_mut(i)
    {
        *slot = usage;
    }
    let nats_nodes = usage_since(&nats_pids, &nats_cpu_before);
    // Security counters of every node still running, summed.
    let mut security: Option<SecurityCounters> = None;
    for node in &ingests {
        if let (Some(addr), Some(_)) = (node.metrics, &node.child) {
            let s = security_counters(addr).await?;
            security
                .get_or_insert_with(SecurityCounters::default)
                .add(&s);
        }
    }
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
    for node in &mut ingests {
        if let Some(mut child) = node.child.take() {
            let _ = child.kill().await;
        }
    }
    if let Some(cluster) = nats.as_mut() {
        for i in 0..cluster.nodes.len() {
            cluster.kill(i).await;
        }
    }
    let mut counters = LinkCounters::default();
    let mut bearer_names = Vec::new();
    for (i, per_node) in links.into_iter().flatten().enumerate() {
        for (k, l) in per_node.into_iter().enumerate() {
            if i < phase.bearers_per_vehicle && k == 0 {
                bearer_names.push(l.spec.name.clone());
            }
            let c = l.stop();
            counters.up.add(&c.up);
            counters.down.add(&c.down);
        }
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
    let ingest_total = ProcessUsage::total(&ingest_nodes);
    let store = match (&nats, args.ingest.is_empty()) {
        (Some(c), _) => format!(
            "jetstream: {} NATS nodes, R{}, sync_interval {}",
            c.nodes.len(),
            c.nodes.len().min(3),
            args.nats_sync_interval
        ),
        (None, true) => "embedded (redb)".into(),
        (None, false) => "external".into(),
    };
    Ok(PhaseReport {
        name: phase.name.into(),
        description: phase.description.clone(),
        bearers: bearer_names,
        bearers_used_by_agent: phase.bearers_per_vehicle,
        vehicles: plans.len(),
        subscribers: args.subscribers,
        store,
        measured_seconds: measured.as_secs_f64(),
        drain_seconds: drained.as_secs_f64(),
        classes,
        disruption,
        frames_unacked_at_agent_exit: unacked,
        wire_bytes_up: counters.up.offered_bytes,
        wire_bytes_down: counters.down.offered_bytes,
        wire_bytes_per_payload_byte: if payload_total == 0 {
            0.0
        } else {
            counters.up.offered_bytes as f64 / payload_total as f64
        },
        links: counters,
        ingest: ingest_total,
        ingest_nodes,
        nats: nats_nodes,
        security,
        subscriber_reconnects: m.subscriber_reconnects,
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
/// The class of every stream the agents' sources declare, numbered as the agent numbers them
/// (a multi-rate record or a monitor input declares several streams).
fn stream_classes(sources: &[SourceConfig]) -> HashMap<u32, &'static str> {
    let mut out = HashMap::new();
    for s in sources {
        let first = out.len() as u32;
        match vehicle_agent::sources::PreparedSource::prepare(s, first) {
            Ok(prepared) => {
                for p in prepared {
                    out.insert(p.descriptor.stream_id, class_of(p.descriptor.kind));
                }
            }
            // Unreadable (the agent will say why): one stream, classed by its type.
            Err(_) => {
                let kind = match s {
                    SourceConfig::SyntheticVitals { .. } | SourceConfig::Hl7Mllp(_) => {
                        StreamKind::Vitals
                    }
                    SourceConfig::SyntheticGps { .. }
                    | SourceConfig::Gpsd { .. }
                    | SourceConfig::Nmea { .. } => StreamKind::Location,
                    SourceConfig::Wfdb { .. } | SourceConfig::SyntheticEcg { .. } => {
                        StreamKind::Waveform
                    }
                };
                out.insert(first, class_of(kind as i32));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_external_ingest_is_a_quic_address_and_a_grpc_url() {
        let e: ExternalIngest = "127.0.0.1:4433,https://127.0.0.1:50051"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(e.quic, SocketAddr::from(([127, 0, 0, 1], 4433)));
        assert_eq!(e.grpc, "https://127.0.0.1:50051");
        for bad in [
            "127.0.0.1:4433",
            "localhost,https://x",
            "127.0.0.1:4433,http://127.0.0.1:50051",
        ] {
            assert!(bad.parse::<ExternalIngest>().is_err(), "{bad}");
        }
    }

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
