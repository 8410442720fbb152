//! Helpers for the end-to-end tests: a throw-away PKI (plus a foreign CA), ingests in-process
//! or as a killable process, agents, and a resuming subscriber that collects what it receives.
#![warn(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ed_client::client::{ClientTls, StreamId, WfdbSink, connect, stream_id};
use ed_client::resume::Delivery;
use hospital_ingest::config::IngestConfig;
use relay_devcerts::{DevPki, generate};
use relay_proto::model::{StreamKind, subscribe_request::Start, subscribe_response::Record};
use vehicle_agent::config::{AgentConfig, BearerConfig, SourceConfig};

pub mod browser;
pub mod nats;
pub mod sim;

/// The vehicles the test PKI has certificates for.
pub const VEHICLES: [&str; 4] = ["amb-1", "amb-2", "amb-3", "amb-4"];

/// Shipped copy of a PhysioNet record (see data/NOTICE).
pub fn record(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../data/ecg")
        .join(name)
}

/// A throw-away development PKI, and a foreign one.
pub struct Pki {
    /// The PKI the services trust.
    pub dir: tempfile::TempDir,
    /// A second, unrelated PKI: its vehicle certificates must be refused.
    pub rogue: tempfile::TempDir,
}

impl Pki {
    /// Makes both PKIs.
    pub fn new() -> Self {
        relay_ops::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let vehicles = VEHICLES.iter().map(|v| v.to_string()).collect();
        let subscribers = vec!["ed-console".into(), "ed-2".into(), "ed-web".into()];
        generate(
            dir.path(),
            &DevPki {
                vehicles,
                subscribers,
                ..DevPki::default()
            },
        )
        .unwrap();
        let rogue = tempfile::tempdir().unwrap();
        generate(
            rogue.path(),
            &DevPki {
                vehicles: vec!["amb-1".into()],
                ..DevPki::default()
            },
        )
        .unwrap();
        Self { dir, rogue }
    }

    /// Directory of the trusted PKI.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// TLS files of ED client `name`.
    pub fn subscriber(&self, name: &str) -> ClientTls {
        ClientTls::from_dev_dir(self.path(), name)
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

/// Ingest configuration on ephemeral loopback ports.
pub fn ingest_config(pki: &Pki, store: &Path) -> IngestConfig {
    let mut c = IngestConfig::default();
    c.quic.listen = "127.0.0.1:0".parse().unwrap();
    c.grpc.listen = "127.0.0.1:0".parse().unwrap();
    c.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    c.tls = hospital_ingest::config::Tls::from_dev_dir(pki.path());
    c.grpc.access_policy = Some(pki.path().join(relay_devcerts::ACCESS_POLICY));
    c.store.path = store.to_owned();
    c.allow_dev_pki = true;
    c
}

/// An agent for `vehicle` on one bearer towards `ingest`, with quick reconnects.
pub fn agent_config(
    pki_dir: &Path,
    vehicle: &str,
    ingest: SocketAddr,
    sources: Vec<SourceConfig>,
) -> AgentConfig {
    let mut c = AgentConfig {
        vehicle_id: vehicle.into(),
        allow_dev_pki: true,
        ..AgentConfig::default()
    };
    c.ingest.address = ingest;
    c.bearers = vec![BearerConfig::new("wan0", "127.0.0.1:0".parse().unwrap())];
    c.spool.path = pki_dir.join(format!("spool-{vehicle}.redb"));
    c.ingest.idle_timeout = Duration::from_secs(3);
    c.reconnect.initial_backoff = Duration::from_millis(100);
    c.reconnect.max_backoff = Duration::from_secs(1);
    c.tls.ca_cert = pki_dir.join("hospital-ca.pem");
    c.tls.cert = pki_dir.join(format!("{vehicle}.pem"));
    c.tls.key = pki_dir.join(format!("{vehicle}.key"));
    c.sources = sources;
    c
}

/// `n` emulated links towards `ingest`, each shaped by `spec` (relay-emulator's syntax).
pub async fn links(n: usize, spec: &str, ingest: SocketAddr) -> Vec<relay_emulator::Link> {
    let mut out = Vec::new();
    for i in 0..n {
        let spec =
            relay_emulator::BearerSpec::parse(spec, &mut relay_emulator::TraceCache::default())
                .unwrap();
        out.push(
            relay_emulator::Link::start("127.0.0.1:0".parse().unwrap(), ingest, spec, i as u64)
                .await
                .unwrap(),
        );
    }
    out
}

/// One bearer per emulated link (`wan0`, `wan1`, ...).
pub fn over_links(cfg: &mut AgentConfig, links: &[relay_emulator::Link]) {
    cfg.bearers = links
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let mut b = BearerConfig::new(&format!("wan{i}"), "127.0.0.1:0".parse().unwrap());
            b.remote = Some(l.addr);
            b
        })
        .collect();
}

/// A WFDB replay of shipped record `name`.
pub fn replay(name: &str, speed: f64) -> SourceConfig {
    SourceConfig::Wfdb {
        record: record(name),
        speed,
        r#loop: false,
        name: "ecg".into(),
    }
}

/// Synthetic vitals and GPS, every 200 ms.
pub fn vitals_and_gps() -> Vec<SourceConfig> {
    vec![
        SourceConfig::SyntheticVitals {
            interval: Duration::from_millis(200),
        },
        SourceConfig::SyntheticGps {
            interval: Duration::from_millis(200),
            start_latitude_deg: 52.5,
            start_longitude_deg: 13.4,
        },
    ]
}

/// Everything a subscriber saw.
#[derive(Debug)]
pub struct Collected {
    /// Every waveform received, as WFDB records.
    pub sink: WfdbSink,
    /// Data records received.
    pub data_records: u64,
    /// Frames received more than once.
    pub duplicates: u64,
    /// Vehicles seen.
    pub vehicles: HashSet<String>,
    /// Gap records.
    pub gaps: u64,
    /// Gap-closed records.
    pub gaps_closed: u64,
    /// Records marked late.
    pub late: u64,
    /// Sync markers.
    pub syncs: u64,
    /// Lagged notices.
    pub lagged: u64,
    /// Subscriptions started again.
    pub reconnects: u64,
    /// Cursor of the last message.
    pub cursor: u64,
    /// Longest time between the ingest storing a frame and this subscriber receiving it, for
    /// frames received after the sync marker (live), milliseconds.
    pub max_live_delay_ms: f64,
    /// Every waveform frame in arrival order.
    pub waveforms: Vec<Arrival>,
    /// Every location frame in arrival order.
    pub locations: Vec<Arrival>,
    /// Every vitals frame in arrival order.
    pub vitals: Vec<Arrival>,
    /// Frames received provisionally (early subscriptions).
    pub provisional: u64,
    /// Provisional frames confirmed (by a confirmation or the frame again in full).
    pub confirmed: u64,
    /// Confirmations of frames this subscriber never had provisionally.
    pub unknown_confirmations: u64,
    /// Resume state (cursor, held provisional frames).
    pub resume: ed_client::resume::Resume,
    seen: HashSet<(StreamId, u64)>,
}

/// A waveform frame as this subscriber received it.
#[derive(Debug, Clone)]
pub struct Arrival {
    /// Its stream.
    pub stream: StreamId,
    /// The frame.
    pub frame: relay_proto::model::Frame,
    /// Whether it filled a gap.
    pub late: bool,
    /// When it arrived.
    pub at: tokio::time::Instant,
}

impl Collected {
    fn new(dir: &Path) -> Self {
        Self {
            sink: WfdbSink::new(dir),
            data_records: 0,
            duplicates: 0,
            vehicles: HashSet::new(),
            gaps: 0,
            gaps_closed: 0,
            late: 0,
            syncs: 0,
            lagged: 0,
            reconnects: 0,
            cursor: 0,
            max_live_delay_ms: 0.0,
            waveforms: Vec::new(),
            locations: Vec::new(),
            vitals: Vec::new(),
            provisional: 0,
            confirmed: 0,
            unknown_confirmations: 0,
            resume: ed_client::resume::Resume::default(),
            seen: HashSet::new(),
        }
    }

    /// Samples per channel received for the waveform stream of `vehicle`.
    pub fn waveform_samples(&self, vehicle: &str) -> u64 {
        self.sink
            .streams()
            .filter(|id| id.0 == vehicle)
            .map(|id| self.sink.received_samples(id))
            .sum()
    }

    /// Whether every stream holds each seq from 0 to its highest exactly once.
    pub fn complete_from_zero(&self) -> bool {
        let mut max: HashMap<&StreamId, u64> = HashMap::new();
        for (id, seq) in &self.seen {
            let m = max.entry(id).or_default();
            *m = (*m).max(*seq);
        }
        let counts = self.frames_by_stream();
        max.iter().all(|(id, m)| counts.get(*id) == Some(&(m + 1)))
    }

    /// Longest time between consecutive live (not late) waveform arrivals within a window;
    /// the whole window when fewer than two arrived.
    pub fn longest_live_gap(
        &self,
        from: tokio::time::Instant,
        to: tokio::time::Instant,
    ) -> Duration {
        let times: Vec<tokio::time::Instant> = self
            .waveforms
            .iter()
            .filter(|a| !a.late && a.at >= from && a.at <= to)
            .map(|a| a.at)
            .collect();
        times
            .windows(2)
            .map(|w| w[1].saturating_duration_since(w[0]))
            .max()
            .unwrap_or(to.saturating_duration_since(from))
    }

    /// Frames received per vehicle and stream id.
    pub fn frames_by_stream(&self) -> HashMap<StreamId, u64> {
        let mut m = HashMap::new();
        for (id, _) in &self.seen {
            *m.entry(id.clone()).or_default() += 1;
        }
        m
    }
}

/// Samples per channel of record s0010_re (38.4 s at 1000 Hz).
pub const S0010_SAMPLES: u64 = 38_400;

/// An agent for `vehicle` replaying s0010_re at 2x in 40 ms frames (about 19 s of
/// streaming), with vitals and GPS, to the ingest at `ingest`.
pub fn s0010_agent(pki: &Pki, vehicle: &str, ingest: SocketAddr) -> AgentConfig {
    let mut sources = vec![replay("s0010_re", 2.0)];
    sources.extend(vitals_and_gps());
    let mut cfg = agent_config(pki.path(), vehicle, ingest, sources);
    cfg.framing.frame = Duration::from_millis(40);
    cfg
}

/// A subscriber (durable records only) in the background, collecting until `vehicle`'s
/// s0010_re is complete and every gap announced is closed (at most 300 s).
pub fn collect_s0010(
    url: String,
    tls: ClientTls,
    out: PathBuf,
    vehicle: &'static str,
) -> tokio::task::JoinHandle<Collected> {
    tokio::spawn(async move {
        collect_until(
            || url.clone(),
            &tls,
            &out,
            Duration::from_secs(300),
            |c| c.waveform_samples(vehicle) >= S0010_SAMPLES && c.gaps == c.gaps_closed,
        )
        .await
    })
}

/// Subscribes from cursor 0 and collects until `done` holds, resuming from the last cursor
/// whenever the stream breaks (ingest restarts). Panics after `limit`.
pub async fn collect_until(
    url: impl Fn() -> String,
    tls: &ClientTls,
    out_dir: &Path,
    limit: Duration,
    done: impl Fn(&Collected) -> bool,
) -> Collected {
    collect(url, tls, out_dir, limit, false, |_| false, done).await
}

/// As [`collect_until`], with early delivery (`SubscribeRequest.early`): provisional frames
/// count as received, their confirmations do not; a resumed subscription declares the held
/// ones. `hang_up` is asked after every message: true ends the subscription there (the
/// client resumes at once), as a client whose connection broke.
pub async fn collect_early_until(
    url: impl Fn() -> String,
    tls: &ClientTls,
    out_dir: &Path,
    limit: Duration,
    hang_up: impl FnMut(&Collected) -> bool,
    done: impl Fn(&Collected) -> bool,
) -> Collected {
    collect(url, tls, out_dir, limit, true, hang_up, done).await
}

async fn collect(
    url: impl Fn() -> String,
    tls: &ClientTls,
    out_dir: &Path,
    limit: Duration,
    early: bool,
    mut hang_up: impl FnMut(&Collected) -> bool,
    done: impl Fn(&Collected) -> bool,
) -> Collected {
    let mut c = Collected::new(out_dir);
    let deadline = tokio::time::Instant::now() + limit;
    'outer: loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "subscriber gave up: {} records ({} duplicates, {} provisional held unconfirmed: {:?}), {} samples",
            c.data_records,
            c.duplicates,
            c.resume.held_frames(),
            c.resume
                .held_ranges()
                .iter()
                .take(8)
                .map(|h| (
                    h.stream.as_ref().map(|s| s.stream_id),
                    h.start_seq,
                    h.end_seq
                ))
                .collect::<Vec<_>>(),
            c.sink
                .streams()
                .map(|s| c.sink.received_samples(s))
                .sum::<u64>()
        );
        let Ok(mut client) = connect(&url(), tls).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let req = c
            .resume
            .request(vec![], vec![], Start::AfterCursor(0), early);
        let Ok(resp) = client.subscribe(req).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut stream = resp.into_inner();
        loop {
            // Wake now and then so `done` may turn true without a new message.
            let wake = (tokio::time::Instant::now() + Duration::from_millis(250)).min(deadline);
            let msg = match tokio::time::timeout_at(wake, stream.message()).await {
                Err(_) if done(&c) => return c,
                Err(_) if tokio::time::Instant::now() >= deadline => continue 'outer,
                Err(_) => continue,
                Ok(Ok(Some(m))) => m,
                Ok(_) => {
                    c.reconnects += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue 'outer;
                }
            };
            let delivery = c.resume.apply(&msg);
            c.cursor = c.resume.cursor().unwrap_or(0);
            if msg.provisional {
                c.provisional += 1;
            }
            match delivery {
                Delivery::Confirmed => c.confirmed += 1,
                Delivery::UnknownConfirmation => c.unknown_confirmations += 1,
                Delivery::NewFrame | Delivery::Other => {}
            }
            match &msg.record {
                // Held already: no new frame.
                Some(Record::Data(_)) if delivery == Delivery::Confirmed => {}
                Some(Record::Data(d)) => {
                    let s = d.stream.as_ref().unwrap();
                    c.vehicles.insert(s.vehicle_id.clone());
                    let key = (stream_id(s), d.frame.as_ref().unwrap().seq);
                    if !c.seen.insert(key) {
                        c.duplicates += 1;
                    }
                    c.data_records += 1;
                    if d.late {
                        c.late += 1;
                    }
                    let arrival = || Arrival {
                        stream: stream_id(s),
                        frame: d.frame.clone().unwrap(),
                        late: d.late,
                        at: tokio::time::Instant::now(),
                    };
                    if is_waveform(s.kind) {
                        c.waveforms.push(arrival());
                    } else if s.kind == relay_proto::model::StreamKind::Location as i32 {
                        c.locations.push(arrival());
                    } else if s.kind == relay_proto::model::StreamKind::Vitals as i32 {
                        c.vitals.push(arrival());
                    }
                    if c.syncs > 0 {
                        let delay =
                            (hospital_ingest::now_utc_ns() - d.received_time_ns) as f64 / 1e6;
                        c.max_live_delay_ms = c.max_live_delay_ms.max(delay);
                    }
                }
                Some(Record::Gap(_)) => c.gaps += 1,
                Some(Record::GapClosed(_)) => c.gaps_closed += 1,
                Some(Record::Sync(_)) => c.syncs += 1,
                Some(Record::Lagged(_)) => c.lagged += 1,
                _ => {}
            }
            if delivery != Delivery::Confirmed {
                c.sink.handle(&msg).unwrap();
            }
            if done(&c) {
                return c;
            }
            if hang_up(&c) {
                c.reconnects += 1;
                continue 'outer;
            }
        }
    }
}

/// Writes what was collected as WFDB and checks it against the original record: every sample
/// equal, header checksums equal to the original header's.
pub fn assert_bit_exact(collected: Collected, vehicle: &str, original: &str) {
    assert_all_bit_exact(collected, &[(vehicle, original)]);
}

/// [`assert_bit_exact`] for several vehicles, each with its original record.
pub fn assert_all_bit_exact(collected: Collected, expected: &[(&str, &str)]) {
    let written = collected.sink.finish().unwrap();
    for (vehicle, original) in expected {
        let (_, hea) = written
            .iter()
            .find(|(id, _)| id.0 == *vehicle)
            .expect("a WFDB record for the vehicle");
        assert_same_record(hea, original);
    }
}

fn assert_same_record(hea: &Path, original: &str) {
    let orig = relay_wfdb::read_record(&record(original)).unwrap();
    let got = relay_wfdb::read_record(&hea.with_extension("")).unwrap();
    assert_eq!(got.num_signals(), orig.num_signals());
    assert_eq!(
        got.header.sampling_frequency,
        orig.header.sampling_frequency
    );
    assert_eq!(got.frames, orig.frames);
    assert!(
        got.samples == orig.samples,
        "samples differ from the original"
    );
    for (i, (g, o)) in got
        .header
        .signals
        .iter()
        .zip(&orig.header.signals)
        .enumerate()
    {
        assert_eq!(g.checksum, o.checksum, "checksum of signal {i}");
        assert_eq!(g.description, o.description);
        assert_eq!(
            (g.gain, g.baseline, g.adc_zero, g.adc_resolution),
            (o.gain, o.baseline, o.adc_zero, o.adc_resolution)
        );
        assert_eq!(g.initial_value, o.initial_value);
    }
}

/// GET a path over plain HTTP/1.1 (metrics endpoints); returns (status line + headers, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.to_owned(), body.to_owned())
}

/// An ingest running as a process of its own, so its memory is measured alone.
#[derive(Debug)]
pub struct IngestChild {
    /// The process (killed when dropped).
    pub child: tokio::process::Child,
    /// Its QUIC address.
    pub quic: SocketAddr,
    /// Its gRPC address.
    pub grpc: SocketAddr,
    /// Its metrics address, when `cfg.metrics.listen` asked for one.
    pub metrics: Option<SocketAddr>,
}

impl IngestChild {
    /// Resident memory now, bytes.
    pub fn rss_bytes(&self) -> u64 {
        rss_bytes(self.child.id().unwrap_or(0))
    }
}

/// Starts `exe` (the test package's `e2e-hospital-ingest`, from `CARGO_BIN_EXE_...`, which
/// only integration tests see) with `cfg` on free loopback ports (where it says port 0), its configuration written
/// into `dir`, and waits until its gRPC port and its metrics port (when asked for) accept
/// (QUIC is bound before them).
pub async fn spawn_ingest_child(exe: &str, mut cfg: IngestConfig, dir: &Path) -> IngestChild {
    // Port 0 becomes a free port; a given one is kept (a restart on the same addresses).
    let (quic, grpc) = free_ports();
    if cfg.quic.listen.port() == 0 {
        cfg.quic.listen = format!("127.0.0.1:{quic}").parse().unwrap();
    }
    if cfg.grpc.listen.port() == 0 {
        cfg.grpc.listen = format!("127.0.0.1:{grpc}").parse().unwrap();
    }
    let metrics = cfg.metrics.listen.map(|_| {
        let t = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        t.local_addr().unwrap()
    });
    cfg.metrics.listen = metrics;
    let config = dir.join("ingest.toml");
    std::fs::write(&config, cfg.to_toml().unwrap()).unwrap();
    let log_path = dir.join("ingest.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let child = tokio::process::Command::new(exe)
        .arg("--config")
        .arg(&config)
        .arg("--allow-dev-pki")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let grpc = cfg.grpc.listen;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    // The metrics endpoint opens on its own task: a test reading it at once must find it up
    // (seen refused right after the gRPC port accepted).
    for port in std::iter::once(grpc).chain(metrics) {
        while tokio::net::TcpStream::connect(port).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "ingest did not start ({port} refused):\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    IngestChild {
        child,
        quic: cfg.quic.listen,
        grpc,
        metrics,
    }
}

/// Resident memory of a process, bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// A free loopback port for UDP and one for TCP (bound and released; fine on loopback in tests).
pub fn free_ports() -> (u16, u16) {
    let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let t = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    (
        u.local_addr().unwrap().port(),
        t.local_addr().unwrap().port(),
    )
}

/// Whether a stream kind is a waveform.
pub fn is_waveform(kind: i32) -> bool {
    kind == StreamKind::Waveform as i32
}

/// Value of an unlabelled sample in Prometheus text, 0 when absent.
pub fn metric_value(body: &str, name: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Value of a sample with exactly these labels (`{bearer="wan0"}`) in Prometheus text.
pub fn labelled_metric(body: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = format!("{name}{{{labels}}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.trim().parse().ok())
}

/// Checks waveform frames against the original record: every frame's samples equal the
/// record's at its first sample index. Returns how many samples were compared.
pub fn assert_frames_match_record(frames: &[&relay_proto::model::Frame], original: &str) -> u64 {
    use relay_proto::model::frame::Payload;
    let orig = relay_wfdb::read_record(&record(original)).unwrap();
    let channels = orig.num_signals();
    let mut compared = 0;
    for f in frames {
        let Some(Payload::Waveform(w)) = &f.payload else {
            panic!("stream {} seq {} is not a waveform", f.stream_id, f.seq);
        };
        let start = usize::try_from(w.first_sample_index).unwrap() * channels;
        let end = start + w.sample_count as usize * channels;
        assert_eq!(
            &w.samples[..],
            &orig.samples[start..end],
            "seq {} (samples from {}) differs from the record",
            f.seq,
            w.first_sample_index
        );
        compared += u64::from(w.sample_count);
    }
    compared
}

/// Sends real QUIC Initials (each with its own connection id, captured from a client that
/// never goes on) at `rate` per second for `duration`, each from a fresh socket on `bind` that
/// is closed right away: fire and forget, nothing answers the ingest. Returns how many.
pub async fn flood(
    target: SocketAddr,
    bind: std::net::IpAddr,
    ca: &Path,
    rate: u64,
    duration: Duration,
) -> u64 {
    // A stranger: it trusts the ingest's CA, so its handshakes are real, but has no certificate.
    let mut roots = rustls::RootCertStore::empty();
    for c in relay_ops::pem::load_certs(ca).unwrap() {
        roots.add(c).unwrap();
    }
    let mut crypto = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    crypto.alpn_protocols = vec![relay_proto::ALPN.to_vec()];
    let client = quinn::ClientConfig::new(std::sync::Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap(),
    ));
    let maker = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let until = tokio::time::Instant::now() + duration;
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    let mut sent = 0;
    let mut buf = vec![0u8; 2048];
    while tokio::time::Instant::now() < until {
        tick.tick().await;
        // Capture one Initial: the client dials a socket of ours instead of the ingest.
        let sniffer = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let connecting = maker
            .connect_with(client.clone(), sniffer.local_addr().unwrap(), "localhost")
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(1), sniffer.recv_from(&mut buf)).await;
        drop(connecting);
        let Ok(Ok((len, _))) = got else { continue };
        // Replay it from a fresh port, then vanish.
        let socket = std::net::UdpSocket::bind(SocketAddr::new(bind, 0)).unwrap();
        if socket.send_to(&buf[..len], target).is_ok() {
            sent += 1;
        }
    }
    sent
}
