//! `loadtest blast`: many vehicles' worth of traffic from pre-encoded frames.
//!
//! No agent, emulator or scheduler per vehicle: each simulated vehicle is one QUIC connection
//! (its own certificate, a real Hello) that writes prepared frames on their own unidirectional
//! streams at the agent's pace (ECG every frame period, vitals and position once a second) and
//! drains its acknowledgements, so thousands of vehicles fit beside the ingest on one machine.
//! One subscriber checks that every frame sent arrived exactly once and records the added
//! latency: arrival at the subscriber minus the moment the frame was sent (its capture time).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use ed_client::client::ClientTls;
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use prost::Message;
use relay_devcerts::{DevPki, generate};
use relay_emulator::spec::parse_duration;
use relay_proto::model::{
    ChannelInfo, FixQuality, Frame, Location, StreamDescriptor, StreamKind, VitalSign,
    VitalsReport, WaveformChunk, WaveformInfo, frame::Payload, subscribe_request::Start,
    subscribe_response::Record,
};
use relay_proto::wire::v1::{ControlMessage, Hello, control_message::Body};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use vehicle_agent::config::{IngestEndpoint, TlsFiles, WaveformEncodingChoice};

use crate::loadgen::{process_usage, spawn_ingest, subscribe, vehicle_id, wait_for_grpc};
use crate::report::{Percentiles, histogram, percentiles};
use crate::seqset::SeqSet;

const SUBSCRIBER: &str = "loadtest";
/// Stream ids of every simulated vehicle.
pub(crate) const ECG: u32 = 0;
const VITALS: u32 = 1;
const GPS: u32 = 2;
/// The standard mix: 12-lead ECG at 500 Hz.
const ECG_LEADS: usize = 12;
const ECG_RATE_HZ: f64 = 500.0;
/// Handshakes in progress at once while the fleet connects.
const CONCURRENT_CONNECTS: usize = 32;

/// Flags of `loadtest blast`.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct BlastArgs {
    /// Simulated vehicles (one connection each).
    #[arg(long, default_value_t = 250)]
    pub vehicles: usize,
    /// Measured time, after every vehicle is connected.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    #[serde(serialize_with = "secs")]
    pub duration: Duration,
    /// ECG frame duration (the agent's framing.frame).
    #[arg(long, default_value = "40ms", value_parser = parse_duration)]
    #[serde(serialize_with = "secs")]
    pub frame: Duration,
    /// ECG record whose first 12 signals are sent (at every other sample if recorded at
    /// 1000 Hz), packed once before the run.
    #[arg(long, default_value = "data/ecg/s0010_re")]
    pub ecg: PathBuf,
    /// How the ECG frames carry their samples.
    #[arg(long, value_enum, default_value = "lpc1")]
    pub waveform_encoding: WaveformEncodingChoice,
    /// UDP sockets (quinn endpoints) the vehicles share.
    #[arg(long, default_value_t = 8)]
    pub endpoints: usize,
    /// After the measured time, how long to wait for the last frames to reach the subscriber.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    #[serde(serialize_with = "secs")]
    pub drain: Duration,
    /// The ingest's `store.commit_interval` (its default when not given).
    #[arg(long, value_parser = parse_duration)]
    #[serde(serialize_with = "opt_secs")]
    pub commit_interval: Option<Duration>,
    /// The ingest's `reassembly.reorder_window` (its default when not given).
    #[arg(long, value_parser = parse_duration)]
    #[serde(serialize_with = "opt_secs")]
    pub reorder_window: Option<Duration>,
    /// Where the JSON report goes.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

/// A duration as seconds in a report.
pub(crate) fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// An optional duration as seconds (or null) in a report.
fn opt_secs<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => secs(d, s),
        None => s.serialize_none(),
    }
}

/// What a blast measured.
#[derive(Debug, Clone, Serialize)]
pub struct BlastReport {
    /// The flags.
    pub args: BlastArgs,
    /// `lpc1` or `samples`.
    pub waveform_encoding: String,
    /// Seconds the fleet took to connect.
    pub connect_seconds: f64,
    /// Frames written during the measured time (all classes), and per second.
    pub frames_sent: u64,
    /// Frames per second over the measured time.
    pub frames_per_second: f64,
    /// Bytes of encoded frames written.
    pub frame_bytes_sent: u64,
    /// Distinct frames the subscriber received of those sent.
    pub frames_received: u64,
    /// Sent but never received.
    pub frames_missing: u64,
    /// Of them, acknowledged by the ingest (durably stored, must reach subscribers): must be 0.
    pub missing_acknowledged: u64,
    /// Of them, never acknowledged: refused or stopped by an overloaded ingest. An agent
    /// sends those again; the blaster does not, so under overload they show here.
    pub missing_unacknowledged: u64,
    /// Frames the ingest acknowledged (durably stored) of those sent.
    pub frames_acknowledged: u64,
    /// Received more than once (must be 0).
    pub duplicates: u64,
    /// Frames whose write failed (the connection broke); they are not counted as sent.
    pub send_errors: u64,
    /// Added latency (subscriber arrival minus send), by class: ecg, vitals, location.
    pub latency: HashMap<String, (u64, Percentiles)>,
    /// The ingest's part of it: subscriber arrival minus the ingest's receipt of the whole
    /// frame (the record's `received_time_ns`; same machine, same clock), by class. The rest
    /// is the blaster's write and the QUIC transfer.
    pub latency_after_receipt: HashMap<String, (u64, Percentiles)>,
    /// Seconds from the first frame sent to the last.
    pub measured_seconds: f64,
    /// The ingest's CPU time (user + system) over the measured time.
    pub ingest_cpu_seconds: f64,
    /// The ingest's CPU time over the measured time as a share of one core, and its peak RSS.
    pub ingest_cpu_share: f64,
    /// Peak resident set of the ingest process.
    pub ingest_peak_rss_bytes: u64,
    /// This process's CPU share over the measured time (vehicles and subscriber together).
    pub blaster_cpu_share: f64,
}

impl BlastReport {
    /// A summary for the terminal.
    pub fn human(&self) -> String {
        let mut out = format!(
            "blast: {} vehicles ({} encoding), {:.0} s measured, connected in {:.1} s\n\
             frames sent {} ({:.0}/s, {:.1} MB), received {}, missing {} (acknowledged {}, never acknowledged {}), duplicates {}, send errors {}\n\
             ingest CPU {:.1} % of one core, peak RSS {:.0} MB; blaster CPU {:.1} %\n",
            self.args.vehicles,
            self.waveform_encoding,
            self.args.duration.as_secs_f64(),
            self.connect_seconds,
            self.frames_sent,
            self.frames_per_second,
            self.frame_bytes_sent as f64 / 1e6,
            self.frames_received,
            self.frames_missing,
            self.missing_acknowledged,
            self.missing_unacknowledged,
            self.duplicates,
            self.send_errors,
            self.ingest_cpu_share * 100.0,
            self.ingest_peak_rss_bytes as f64 / 1e6,
            self.blaster_cpu_share * 100.0,
        );
        let mut classes: Vec<_> = self.latency.iter().collect();
        classes.sort_by_key(|(k, _)| k.as_str());
        for (class, (frames, l)) in classes {
            out.push_str(&format!(
                "  {class:<9} added latency p50 {:.2} ms, p90 {:.2}, p99 {:.2}, p99.9 {:.2}, max {:.1} ({frames} frames)\n",
                l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms
            ));
            if let Some((_, l)) = self.latency_after_receipt.get(class) {
                out.push_str(&format!(
                    "  {:<9} of it after the ingest's receipt p50 {:.2} ms, p90 {:.2}, p99 {:.2}, p99.9 {:.2}, max {:.1}\n",
                    "", l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms
                ));
            }
        }
        out
    }
}

/// Everything every simulated vehicle sends, prepared once.
pub(crate) struct Prepared {
    pub(crate) streams: Vec<StreamDescriptor>,
    /// ECG chunks, each for `samples_per_frame` samples, packed or plain; replayed in a loop.
    ecg: Vec<WaveformChunk>,
    samples_per_frame: u64,
    vitals: Payload,
    location: Payload,
}

pub(crate) fn prepare(a: &BlastArgs) -> anyhow::Result<Prepared> {
    let record =
        relay_wfdb::read_record(&a.ecg).with_context(|| format!("reading {}", a.ecg.display()))?;
    if record.num_signals() < ECG_LEADS {
        bail!("{} has fewer than {ECG_LEADS} signals", a.ecg.display());
    }
    let step = (record.header.sampling_frequency / ECG_RATE_HZ)
        .round()
        .max(1.0) as usize;
    let leads: Vec<usize> = (0..ECG_LEADS).collect();
    let channels: Vec<ChannelInfo> = leads
        .iter()
        .filter_map(|&s| record.header.signals.get(s))
        .map(|s| ChannelInfo {
            name: s.description.clone(),
            unit: "mV".into(),
            gain: s.gain,
            baseline: s.baseline,
            adc_resolution: s.adc_resolution,
            adc_zero: s.adc_zero,
            ..ChannelInfo::default()
        })
        .collect();
    let info = WaveformInfo {
        sample_rate_hz: ECG_RATE_HZ,
        channels,
        source: format!("blast:{}", record.header.record_name),
        encoding: a.waveform_encoding.wire() as i32,
        ..WaveformInfo::default()
    };
    let samples_per_frame = ((ECG_RATE_HZ * a.frame.as_secs_f64()).round() as usize).max(1);
    let mut encoder = relay_proto::waveform::encoder_for(&info)?;
    let len = record.signal_len(0) / step;
    let mut ecg = Vec::new();
    let mut row = Vec::new();
    for f in 0..len / samples_per_frame {
        let mut samples = Vec::with_capacity(samples_per_frame * ECG_LEADS);
        for j in 0..samples_per_frame {
            row.clear();
            record.interleaved(&leads, (f * samples_per_frame + j) * step, 1, &mut row);
            samples.extend_from_slice(&row);
        }
        let mut chunk = WaveformChunk {
            sample_count: samples_per_frame as u32,
            samples,
            ..WaveformChunk::default()
        };
        if let Some(enc) = encoder.as_mut() {
            relay_proto::waveform::pack(&mut chunk, enc)?;
        }
        ecg.push(chunk);
    }
    if ecg.is_empty() {
        bail!("{} is shorter than one frame", a.ecg.display());
    }
    let vital = |mdc_code: u32, label: &str, value: f64, unit: &str| VitalSign {
        mdc_code,
        label: label.into(),
        value,
        unit: unit.into(),
    };
    let vitals = Payload::Vitals(VitalsReport {
        values: vec![
            vital(147_842, "HR", 72.0, "/min"),
            vital(150_456, "SpO2", 97.0, "%"),
            vital(151_562, "RR", 16.0, "/min"),
            vital(150_301, "NIBP-sys", 128.0, "mm[Hg]"),
            vital(150_302, "NIBP-dia", 82.0, "mm[Hg]"),
            vital(151_708, "EtCO2", 38.0, "mm[Hg]"),
            vital(150_364, "Temp", 36.9, "Cel"),
        ],
    });
    let location = Payload::Location(Location {
        latitude_deg: 52.52,
        longitude_deg: 13.405,
        altitude_m: 34.0,
        speed_mps: 13.9,
        heading_deg: 90.0,
        fix_quality: FixQuality::Fix3d as i32,
        horizontal_accuracy_m: 4.0,
        satellites: 9,
        ..Location::default()
    });
    let descriptor = |stream_id: u32, kind: StreamKind, name: &str| StreamDescriptor {
        stream_id,
        kind: kind as i32,
        name: name.into(),
        waveform: None,
    };
    let mut ecg_descriptor = descriptor(ECG, StreamKind::Waveform, "ecg");
    ecg_descriptor.waveform = Some(info);
    Ok(Prepared {
        streams: vec![
            ecg_descriptor,
            descriptor(VITALS, StreamKind::Vitals, "vitals"),
            descriptor(GPS, StreamKind::Location, "gps"),
        ],
        ecg,
        samples_per_frame: samples_per_frame as u64,
        vitals,
        location,
    })
}

impl Prepared {
    /// What a vehicle sends at its `n`th frame period (`per_second` periods a second): the
    /// next ECG chunk, and vitals and position once a second; by stream index.
    pub(crate) fn tick(&self, n: u64, per_second: u64) -> Vec<(usize, Payload)> {
        let mut todo = Vec::with_capacity(3);
        let chunk_index = (n % self.ecg.len() as u64) as usize;
        if let Some(chunk) = self.ecg.get(chunk_index) {
            let mut chunk = chunk.clone();
            chunk.first_sample_index = n * self.samples_per_frame;
            todo.push((ECG as usize, Payload::Waveform(chunk)));
        }
        if n.is_multiple_of(per_second) {
            todo.push((VITALS as usize, self.vitals.clone()));
            todo.push((GPS as usize, self.location.clone()));
        }
        todo
    }
}

/// Counters every vehicle task adds to.
#[derive(Default)]
struct Sent {
    frames: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
}

/// Frames each vehicle wrote successfully, per stream: `[ecg, vitals, gps]`.
type SentPerStream = [u64; 3];

struct Vehicle {
    id: String,
    conn: quinn::Connection,
    /// What the ingest acknowledged (durably stored), per stream.
    acked: Arc<std::sync::Mutex<[SeqSet; 3]>>,
    /// Kept open: finishing it ends the session at the ingest.
    _control: FramedWrite<quinn::SendStream, LengthDelimitedCodec>,
}

async fn connect_vehicle(
    endpoint: quinn::Endpoint,
    pki: &Path,
    ingest: std::net::SocketAddr,
    id: String,
    streams: Vec<StreamDescriptor>,
) -> anyhow::Result<(Vehicle, tokio::task::JoinHandle<()>)> {
    let files = TlsFiles {
        ca_cert: pki.join("hospital-ca.pem"),
        cert: pki.join(format!("{id}.pem")),
        key: pki.join(format!("{id}.key")),
    };
    let ingest_cfg = IngestEndpoint {
        address: ingest,
        ..IngestEndpoint::default()
    };
    let client = vehicle_agent::tls::client_config(&files, &ingest_cfg, Duration::from_secs(2))?;
    let conn = endpoint
        .connect_with(client, ingest, &ingest_cfg.server_name)?
        .await
        .with_context(|| format!("{id}: QUIC handshake"))?;
    let (send, recv) = conn.open_bi().await?;
    let codec = || {
        LengthDelimitedCodec::builder()
            .max_frame_length(relay_proto::MAX_CONTROL_MESSAGE_BYTES)
            .new_codec()
    };
    let mut control = FramedWrite::new(send, codec());
    let mut replies = FramedRead::new(recv, codec());
    let hello = ControlMessage {
        body: Some(Body::Hello(Hello {
            protocol_version: relay_proto::PROTOCOL_VERSION,
            vehicle_id: id.clone(),
            session_id: rand::random(),
            streams,
            agent_version: concat!("loadtest-blast/", env!("CARGO_PKG_VERSION")).into(),
            agent_time_ns: hospital_ingest::now_utc_ns(),
        })),
    };
    control
        .send(bytes::Bytes::from(hello.encode_to_vec()))
        .await
        .with_context(|| format!("{id}: sending the Hello"))?;
    match replies.next().await {
        Some(Ok(b)) => match ControlMessage::decode(b.as_ref())?.body {
            Some(Body::HelloAck(_)) => {}
            other => bail!("{id}: expected HelloAck, got {other:?}"),
        },
        _ => bail!(
            "{id}: the ingest closed the control stream: {:?}",
            conn.close_reason()
        ),
    }
    // Acknowledgements must be read, or the ingest stops taking frames; they also tell which
    // frames the ingest promised to keep.
    let acked: Arc<std::sync::Mutex<[SeqSet; 3]>> = Arc::default();
    let record = acked.clone();
    let drain = tokio::spawn(async move {
        while let Some(Ok(b)) = replies.next().await {
            let Ok(ControlMessage {
                body: Some(Body::Ack(ack)),
            }) = ControlMessage::decode(b.as_ref())
            else {
                continue;
            };
            let mut sets = record.lock().unwrap_or_else(|p| p.into_inner());
            for sa in ack.streams {
                let Some(set) = sets.get_mut(sa.stream_id as usize) else {
                    continue;
                };
                for r in sa.ranges {
                    // Our own streams hold well under a million frames per run.
                    for seq in r.start..r.end.min(r.start.saturating_add(1_000_000)) {
                        set.insert(seq);
                    }
                }
            }
        }
    });
    Ok((
        Vehicle {
            id,
            conn,
            acked,
            _control: control,
        },
        drain,
    ))
}

/// Receive buffer of each blaster socket: as large as the ingest's, so acknowledgements are
/// not dropped by the kernel on the blaster's side when the machine is busy (the ingest
/// would only send them again, and the run would measure the blaster).
const BLASTER_RECEIVE_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// A client endpoint on loopback with [`BLASTER_RECEIVE_BUFFER_BYTES`].
fn blaster_endpoint() -> anyhow::Result<quinn::Endpoint> {
    let bound = hospital_ingest::quic::socket::bind(
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        BLASTER_RECEIVE_BUFFER_BYTES,
    )?;
    let runtime = quinn::default_runtime().context("no async runtime for QUIC")?;
    Ok(quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        bound.socket,
        runtime,
    )?)
}

/// Writes one frame on its own stream.
async fn write_frame(conn: &quinn::Connection, bytes: &[u8]) -> anyhow::Result<()> {
    let mut s = conn.open_uni().await?;
    s.write_all(bytes).await?;
    s.finish()?;
    Ok(())
}

/// Sends the vehicle's frames at the agent's pace until `stop`.
async fn send_loop(
    v: Arc<Vehicle>,
    prepared: Arc<Prepared>,
    period: Duration,
    offset: Duration,
    stop: CancellationToken,
    sent: Arc<Sent>,
) -> SentPerStream {
    let mut counts = [0u64; 3];
    let per_second = (1.0 / period.as_secs_f64()).round().max(1.0) as u64;
    let mut tick = tokio::time::interval_at(Instant::now() + offset, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    let mut buf = Vec::with_capacity(1024);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let todo = prepared.tick(n, per_second);
        n += 1;
        for (stream, payload) in todo {
            let frame = Frame {
                stream_id: stream as u32,
                seq: counts[stream],
                capture_time_ns: hospital_ingest::now_utc_ns(),
                payload: Some(payload),
            };
            buf.clear();
            if frame.encode(&mut buf).is_err() {
                continue;
            }
            match write_frame(&v.conn, &buf).await {
                Ok(()) => {
                    counts[stream] += 1;
                    sent.frames.fetch_add(1, Ordering::Relaxed);
                    sent.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    // A broken connection ends this vehicle's run; later seqs would only
                    // look lost.
                    tracing::warn!(vehicle = %v.id, error = %e, "frame write failed");
                    sent.errors.fetch_add(1, Ordering::Relaxed);
                    return counts;
                }
            }
        }
    }
    counts
}

/// What the subscriber saw.
#[derive(Default)]
struct Seen {
    streams: HashMap<(String, u32), SeqSet>,
    duplicates: u64,
    latency: HashMap<u32, Histogram<u64>>,
    /// Arrival minus the ingest's receipt, by stream id.
    after_receipt: HashMap<u32, Histogram<u64>>,
}

async fn watch(
    mut stream: tonic::Streaming<relay_proto::model::SubscribeResponse>,
    seen: Arc<std::sync::Mutex<Seen>>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let msg = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            m = stream.message() => m.context("subscription")?,
        };
        let Some(msg) = msg else { return Ok(()) };
        let Some(Record::Data(d)) = msg.record else {
            continue;
        };
        let now_ns = hospital_ingest::now_utc_ns();
        let (Some(r), Some(frame)) = (d.stream, d.frame) else {
            continue;
        };
        let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = s
            .streams
            .entry((r.vehicle_id, r.stream_id))
            .or_default()
            .insert(frame.seq);
        if !fresh {
            s.duplicates += 1;
            continue;
        }
        let us = (now_ns.saturating_sub(frame.capture_time_ns) / 1000).max(1) as u64;
        if let Some(h) = s.latency.get_mut(&r.stream_id) {
            let _ = h.record(us.min(h.high()));
        }
        let us = (now_ns.saturating_sub(d.received_time_ns) / 1000).max(1) as u64;
        if let Some(h) = s.after_receipt.get_mut(&r.stream_id) {
            let _ = h.record(us.min(h.high()));
        }
    }
}

/// How many frames of what was sent are still missing at the subscriber, and how many were
/// received.
fn missing(seen: &Seen, sent: &[(String, SentPerStream)]) -> (u64, u64) {
    let (mut missing, mut received) = (0, 0);
    for (id, counts) in sent {
        for (stream, &n) in counts.iter().enumerate() {
            let absent = seen
                .streams
                .get(&(id.clone(), stream as u32))
                .map_or(n, |s| s.missing_below(n));
            missing += absent;
            received += n - absent;
        }
    }
    (missing, received)
}

/// Of the frames missing at the subscriber: how many the ingest had acknowledged (a broken
/// promise, must be 0) and how many it never did (refused or stopped while overloaded; an
/// agent sends those again, the blaster does not).
fn missing_by_ack(
    seen: &Seen,
    fleet: &[Arc<Vehicle>],
    sent: &[(String, SentPerStream)],
) -> (u64, u64) {
    let (mut acked, mut unacked) = (0, 0);
    for (v, (id, counts)) in fleet.iter().zip(sent) {
        let sets = v.acked.lock().unwrap_or_else(|p| p.into_inner());
        for (stream, &n) in counts.iter().enumerate() {
            let got = seen.streams.get(&(id.clone(), stream as u32));
            for seq in 0..n {
                if got.is_some_and(|g| g.contains(seq)) {
                    continue;
                }
                if sets.get(stream).is_some_and(|a| a.contains(seq)) {
                    acked += 1;
                } else {
                    unacked += 1;
                }
            }
        }
    }
    (acked, unacked)
}

/// How many of the frames sent the ingest acknowledged.
fn acknowledged(fleet: &[Arc<Vehicle>], sent: &[(String, SentPerStream)]) -> u64 {
    let mut n = 0;
    for (v, (_, counts)) in fleet.iter().zip(sent) {
        let sets = v.acked.lock().unwrap_or_else(|p| p.into_inner());
        for (set, &count) in sets.iter().zip(counts) {
            n += count - set.missing_below(count);
        }
    }
    n
}

/// Runs `loadtest blast` against an ingest started as a child process (`ingest_exe ingest`).
pub async fn run(a: BlastArgs, ingest_exe: &Path) -> anyhow::Result<BlastReport> {
    anyhow::ensure!(
        (1..=10_000).contains(&a.vehicles),
        "--vehicles must be 1..=10000"
    );
    anyhow::ensure!(
        (1..=64).contains(&a.endpoints),
        "--endpoints must be 1..=64"
    );
    anyhow::ensure!(
        a.frame >= Duration::from_millis(2) && a.frame <= Duration::from_secs(1),
        "--frame must be 2ms..=1s"
    );
    relay_ops::install_crypto_provider();
    let prepared = Arc::new(prepare(&a)?);
    let work = tempfile::tempdir().context("creating a work directory")?;
    let pki = work.path().join("pki");
    let ids: Vec<String> = (0..a.vehicles).map(vehicle_id).collect();
    generate(
        &pki,
        &DevPki {
            vehicles: ids.clone(),
            subscribers: vec![SUBSCRIBER.into()],
            ..DevPki::default()
        },
    )
    .context("creating certificates")?;
    let (vehicles, commit_interval, reorder_window) =
        (a.vehicles, a.commit_interval, a.reorder_window);
    let mut node = spawn_ingest(&pki, &work.path().join("ingest"), ingest_exe, |cfg| {
        cfg.quic.max_connections = vehicles + 64;
        if let Some(interval) = commit_interval {
            cfg.store.commit_interval = interval;
        }
        if let Some(window) = reorder_window {
            cfg.reassembly.reorder_window = window;
        }
    })?;
    let tls = ClientTls::from_dev_dir(&pki, SUBSCRIBER);
    wait_for_grpc(&mut node, &tls).await?;
    let ingest_pid = node
        .child
        .as_ref()
        .and_then(tokio::process::Child::id)
        .context("the ingest has no process id")?;

    let (mut latency, mut after_receipt) = (HashMap::new(), HashMap::new());
    for stream in [ECG, VITALS, GPS] {
        latency.insert(stream, histogram()?);
        after_receipt.insert(stream, histogram()?);
    }
    let seen = Arc::new(std::sync::Mutex::new(Seen {
        latency,
        after_receipt,
        ..Seen::default()
    }));
    let watcher_stop = CancellationToken::new();
    let subscription = subscribe(&node.grpc_url, &tls, Start::Live(true)).await?;
    let watcher = tokio::spawn(watch(subscription, seen.clone(), watcher_stop.clone()));

    let endpoints = (0..a.endpoints)
        .map(|_| blaster_endpoint())
        .collect::<anyhow::Result<Vec<_>>>()
        .context("opening UDP sockets")?;
    let connect_started = Instant::now();
    let gate = Arc::new(Semaphore::new(CONCURRENT_CONNECTS));
    let mut connecting = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let (endpoint, gate, pki) = (
            endpoints[i % endpoints.len()].clone(),
            gate.clone(),
            pki.clone(),
        );
        let (quic, id, streams) = (node.quic, id.clone(), prepared.streams.clone());
        connecting.push(tokio::spawn(async move {
            let _turn = gate.acquire_owned().await;
            connect_vehicle(endpoint, &pki, quic, id, streams).await
        }));
    }
    let mut fleet = Vec::new();
    let mut drains = Vec::new();
    for c in connecting {
        match c.await {
            Ok(Ok((v, drain))) => {
                fleet.push(Arc::new(v));
                drains.push(drain);
            }
            Ok(Err(e)) => {
                let log = node.log.as_ref().map(std::fs::read_to_string);
                bail!(
                    "{e:#}\ningest log:\n{}",
                    log.and_then(Result::ok).unwrap_or_default()
                );
            }
            Err(e) => bail!("a connecting task failed: {e}"),
        }
    }
    let connect_seconds = connect_started.elapsed().as_secs_f64();
    eprintln!(
        "{} vehicles connected in {connect_seconds:.1} s",
        fleet.len()
    );

    let sent = Arc::new(Sent::default());
    let stop = CancellationToken::new();
    let usage_before = (process_usage(ingest_pid), process_usage(std::process::id()));
    let started = Instant::now();
    let mut loops = Vec::new();
    for (i, v) in fleet.iter().enumerate() {
        // Spread the vehicles over the frame period, as real ones are.
        let offset = a.frame.mul_f64(i as f64 / fleet.len() as f64);
        loops.push(tokio::spawn(send_loop(
            v.clone(),
            prepared.clone(),
            a.frame,
            offset,
            stop.clone(),
            sent.clone(),
        )));
    }
    tokio::time::sleep(a.duration).await;
    stop.cancel();
    let mut per_vehicle = Vec::new();
    for (v, l) in fleet.iter().zip(loops) {
        per_vehicle.push((v.id.clone(), l.await.unwrap_or_default()));
    }
    let measured = started.elapsed().as_secs_f64();
    let usage_after = (process_usage(ingest_pid), process_usage(std::process::id()));
    let share = |before: Option<(f64, u64)>, after: Option<(f64, u64)>| match (before, after) {
        (Some((cpu_before, _)), Some((cpu_after, _))) => (cpu_after - cpu_before) / measured,
        _ => 0.0,
    };
    let ingest_cpu_share = share(usage_before.0, usage_after.0);
    let ingest_cpu_seconds = ingest_cpu_share * measured;
    let blaster_cpu_share = share(usage_before.1, usage_after.1);
    let ingest_peak_rss_bytes = usage_after.0.map_or(0, |(_, rss)| rss);

    // Every frame written is acknowledged or on its way: wait for the subscriber to see them.
    let drain_started = Instant::now();
    while drain_started.elapsed() < a.drain {
        let done = {
            let s = seen.lock().unwrap_or_else(|p| p.into_inner());
            missing(&s, &per_vehicle).0 == 0
        };
        if done || watcher.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    watcher_stop.cancel();
    match watcher.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e.context("the subscriber failed")),
        Err(e) => bail!("the subscriber task failed: {e}"),
    }
    // Acknowledgements travel beside the subscriber's copies: give the last ones a moment.
    let frames_sent = sent.frames.load(Ordering::Relaxed);
    let ack_wait = Instant::now();
    while acknowledged(&fleet, &per_vehicle) < frames_sent
        && ack_wait.elapsed() < Duration::from_secs(5)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for v in &fleet {
        v.conn.close(quinn::VarInt::from_u32(0), b"blast over");
    }
    for d in drains {
        d.abort();
    }
    let frames_acknowledged = acknowledged(&fleet, &per_vehicle);
    let class = |stream: u32| match stream {
        ECG => "ecg",
        VITALS => "vitals",
        _ => "location",
    };
    let by_class = |histograms: &HashMap<u32, Histogram<u64>>| {
        histograms
            .iter()
            .map(|(k, h)| (class(*k).to_owned(), (h.len(), percentiles(h))))
            .collect::<HashMap<_, _>>()
    };
    let (frames_missing, frames_received, duplicates, latency, latency_after_receipt, by_ack) = {
        let s = seen.lock().unwrap_or_else(|p| p.into_inner());
        let (missing, received) = missing(&s, &per_vehicle);
        let by_ack = missing_by_ack(&s, &fleet, &per_vehicle);
        (
            missing,
            received,
            s.duplicates,
            by_class(&s.latency),
            by_class(&s.after_receipt),
            by_ack,
        )
    };
    let report = BlastReport {
        waveform_encoding: format!("{:?}", a.waveform_encoding).to_lowercase(),
        connect_seconds,
        frames_sent,
        frames_per_second: frames_sent as f64 / measured,
        frame_bytes_sent: sent.bytes.load(Ordering::Relaxed),
        frames_received,
        frames_missing,
        missing_acknowledged: by_ack.0,
        missing_unacknowledged: by_ack.1,
        frames_acknowledged,
        duplicates,
        send_errors: sent.errors.load(Ordering::Relaxed),
        latency,
        latency_after_receipt,
        measured_seconds: measured,
        ingest_cpu_seconds,
        ingest_cpu_share,
        ingest_peak_rss_bytes,
        blaster_cpu_share,
        args: a,
    };
    if let Some(path) = &report.args.report {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(mut child) = node.child.take() {
        let _ = child.kill().await;
    }
    Ok(report)
}
