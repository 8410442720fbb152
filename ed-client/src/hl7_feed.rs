//! Outbound HL7 v2 feed for an integration engine: IHE PCD-01 `ORU^R01` over MLLP (TLS
//! optional), one message per vehicle session per second of signal, built from the gRPC
//! subscription. Numerics are `NM` OBXs coded with MDC and LOINC, in UCUM units; each waveform
//! channel is an `NA` OBX holding exactly that second's samples (as many as the stream's rate)
//! in physical units, with its sample rate as an `MDC_ATTR_SAMP_RATE` attribute OBX below it.
//!
//! Delivery is at least once and in order, with stable identities: message `k` of a session
//! always has control id `<vehicle>.<session>.<k>`, messages are sent one at a time and the next
//! only after an `AA`; on a NAK, a timeout or a dead receiver the unacknowledged message is sent
//! again (same MSH-10) after a back-off. A state file records the last acknowledged message of
//! every session and the subscription cursor to resume from, so a restarted feed rebuilds the
//! same messages and skips the acknowledged ones.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use relay_hl7::MllpCodec;
use relay_proto::codes;
use relay_proto::model::{
    ChannelInfo, StreamKind, SubscribeResponse, VitalSign, frame::Payload,
    subscribe_response::Record,
};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

/// A second of signal waits at most this long (in later signal of any stream of its session)
/// for a missing chunk; then it is sent with the missing samples empty. Bounds what a session
/// holds.
pub const MAX_WAIT_SECONDS: u64 = 30;
/// Messages built but not yet acknowledged, at most (the subscription waits beyond it).
pub const MAX_QUEUED: usize = 256;

/// A message ready to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// MSH-10.
    pub control_id: String,
    /// The session it belongs to and its number in the session.
    pub session: (String, u64),
    /// Its number (second of signal) in the session.
    pub window: u64,
    /// The message (segments separated by CR).
    pub text: String,
    /// Subscription cursor to resume from once it is acknowledged.
    pub resume_cursor: u64,
}

#[derive(Debug)]
struct Wave {
    rate_hz: f64,
    channels: Vec<ChannelInfo>,
    /// Capture time of sample 0.
    start_ns: Option<i64>,
    /// Chunks by first sample index: (cursor of their record, interleaved samples).
    chunks: BTreeMap<u64, (u64, Vec<i32>)>,
}

impl Wave {
    fn index_at(&self, second: u64) -> u64 {
        (second as f64 * self.rate_hz).floor() as u64
    }

    /// One past the last sample held contiguously from `from`.
    fn contiguous_end(&self, from: u64) -> u64 {
        let n = self.channels.len().max(1) as u64;
        let mut end = from;
        for (&first, (_, s)) in self.chunks.range(..) {
            let last = first + s.len() as u64 / n;
            if last <= end {
                continue;
            }
            if first > end {
                break;
            }
            end = last;
        }
        end
    }

    fn highest(&self) -> u64 {
        let n = self.channels.len().max(1) as u64;
        self.chunks
            .iter()
            .next_back()
            .map_or(0, |(&f, (_, s))| f + s.len() as u64 / n)
    }

    /// Samples `[a, b)` per channel (None where missing), then drops what lies before `b`.
    fn take(&mut self, a: u64, b: u64) -> Vec<Vec<Option<i32>>> {
        let n = self.channels.len().max(1);
        let mut out = vec![vec![None; (b - a) as usize]; n];
        for (&first, (_, s)) in self.chunks.range(..b) {
            for (k, frame) in s.chunks(n).enumerate() {
                let i = first + k as u64;
                if i >= a && i < b {
                    for (c, &v) in frame.iter().enumerate() {
                        out[c][(i - a) as usize] = Some(v);
                    }
                }
            }
        }
        let done: Vec<u64> = self
            .chunks
            .iter()
            .filter(|(f, (_, s))| **f + (s.len() / n) as u64 <= b)
            .map(|(f, _)| *f)
            .collect();
        for f in done {
            self.chunks.remove(&f);
        }
        out
    }
}

#[derive(Debug, Default)]
struct Session {
    waves: BTreeMap<u32, Wave>,
    /// Vitals not yet sent: (capture time, cursor, values).
    vitals: Vec<(i64, u64, Vec<VitalSign>)>,
    next_window: u64,
    /// Capture time of the session's first second (first waveform's sample 0, else the first
    /// vitals report).
    start_ns: Option<i64>,
    latest_vitals_ns: i64,
}

/// Builds the feed's messages from subscription records (sans-IO).
#[derive(Debug)]
pub struct FeedBuilder {
    facility: String,
    sessions: HashMap<(String, u64), Session>,
    /// Last acknowledged window per session (from the state file): not built again.
    acked: HashMap<(String, u64), u64>,
    last_cursor: u64,
}

fn fmt_ts(ns: i64) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let frac = ns.rem_euclid(1_000_000_000) / 100_000; // 1/10,000 s
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}{:02}{:02}{:02}.{frac:04}+0000",
        tod / 3600,
        tod / 60 % 60,
        tod % 60
    )
}

/// LOINC code and display of a vital sign (as the FHIR export uses them).
fn loinc(mdc: u32) -> Option<(&'static str, &'static str)> {
    crate::fhir::loinc(mdc)
}

fn mdc_name(mdc: u32, label: &str) -> String {
    let name = match mdc {
        codes::ECG_HEART_RATE => "MDC_ECG_HEART_RATE",
        codes::PULS_OXIM_SAT_O2 => "MDC_PULS_OXIM_SAT_O2",
        codes::PRESS_BLD_NONINV_SYS => "MDC_PRESS_BLD_NONINV_SYS",
        codes::PRESS_BLD_NONINV_DIA => "MDC_PRESS_BLD_NONINV_DIA",
        codes::PRESS_BLD_NONINV_MEAN => "MDC_PRESS_BLD_NONINV_MEAN",
        codes::RESP_RATE => "MDC_RESP_RATE",
        codes::AWAY_CO2_ET => "MDC_AWAY_CO2_ET",
        codes::TEMP_BODY => "MDC_TEMP_BODY",
        _ => label,
    };
    relay_hl7::escape(name)
}

/// OBX-3 of an observation: the MDC code, and where there is one the LOINC code beside it;
/// a channel without an MDC code gets a local code.
fn identifier(mdc: u32, label: &str) -> String {
    let primary = if mdc == 0 {
        format!(
            "{}^{}^99RELAY",
            relay_hl7::escape(label),
            relay_hl7::escape(label)
        )
    } else {
        format!("{mdc}^{}^MDC", mdc_name(mdc, label))
    };
    match loinc(mdc) {
        Some((code, display)) => format!("{primary}^{code}^{}^LN", relay_hl7::escape(display)),
        None => primary,
    }
}

fn ucum(unit: &str) -> String {
    let u = relay_hl7::escape(if unit.is_empty() { "1" } else { unit });
    format!("{u}^{u}^UCUM")
}

impl FeedBuilder {
    /// A builder naming `facility` as the sending facility (MSH-4), skipping the windows
    /// `acked` says were acknowledged.
    pub fn new(facility: &str, acked: HashMap<(String, u64), u64>) -> Self {
        Self {
            facility: facility.to_owned(),
            sessions: HashMap::new(),
            acked,
            last_cursor: 0,
        }
    }

    /// Takes one subscription message; returns the messages it completes, in order.
    pub fn push(&mut self, msg: &SubscribeResponse) -> Vec<Outgoing> {
        if msg.provisional {
            return Vec::new();
        }
        self.last_cursor = self.last_cursor.max(msg.cursor);
        let key = match &msg.record {
            Some(Record::Stream(info)) => {
                let (Some(s), Some(d)) = (&info.stream, &info.descriptor) else {
                    return Vec::new();
                };
                let session = self.session((s.vehicle_id.clone(), s.session_id));
                if s.kind == StreamKind::Waveform as i32
                    && let Some(w) = &d.waveform
                    && w.sample_rate_hz > 0.0
                    && !w.channels.is_empty()
                {
                    session.waves.entry(s.stream_id).or_insert(Wave {
                        rate_hz: w.sample_rate_hz,
                        channels: w.channels.clone(),
                        start_ns: None,
                        chunks: BTreeMap::new(),
                    });
                }
                (s.vehicle_id.clone(), s.session_id)
            }
            Some(Record::Data(d)) => {
                let (Some(s), Some(f)) = (&d.stream, &d.frame) else {
                    return Vec::new();
                };
                let key = (s.vehicle_id.clone(), s.session_id);
                let session = self.session(key.clone());
                let next_window = session.next_window;
                match &f.payload {
                    Some(Payload::Waveform(w)) => {
                        let Some(wave) = session.waves.get_mut(&s.stream_id) else {
                            return Vec::new();
                        };
                        if w.samples.len() != w.sample_count as usize * wave.channels.len() {
                            return Vec::new();
                        }
                        let start = *wave.start_ns.get_or_insert_with(|| {
                            f.capture_time_ns.saturating_sub(
                                (w.first_sample_index as f64 * 1e9 / wave.rate_hz) as i64,
                            )
                        });
                        // A chunk of a second already sent (a resumed feed replays some).
                        if w.first_sample_index + u64::from(w.sample_count)
                            <= wave.index_at(next_window)
                        {
                            return Vec::new();
                        }
                        session.start_ns.get_or_insert(start);
                        wave.chunks
                            .entry(w.first_sample_index)
                            .or_insert((msg.cursor, w.samples.clone()));
                    }
                    Some(Payload::Vitals(v)) => {
                        session.start_ns.get_or_insert(f.capture_time_ns);
                        session.latest_vitals_ns = session.latest_vitals_ns.max(f.capture_time_ns);
                        session
                            .vitals
                            .push((f.capture_time_ns, msg.cursor, v.values.clone()));
                    }
                    _ => {}
                }
                key
            }
            _ => return Vec::new(),
        };
        self.build_ready(&key)
    }

    /// The session's state, created (after its acknowledged seconds) on first sight.
    fn session(&mut self, key: (String, u64)) -> &mut Session {
        let next = self.acked.get(&key).map_or(0, |a| a + 1);
        self.sessions.entry(key).or_insert_with(|| Session {
            next_window: next,
            ..Session::default()
        })
    }

    /// The earliest cursor any held record came from, or the last seen cursor.
    fn resume_cursor(&self) -> u64 {
        let held = self
            .sessions
            .values()
            .flat_map(|s| {
                s.waves
                    .values()
                    .flat_map(|w| w.chunks.values().map(|(c, _)| *c))
                    .chain(s.vitals.iter().map(|(_, c, _)| *c))
            })
            .min();
        held.map_or(self.last_cursor, |c| c.saturating_sub(1))
    }

    fn build_ready(&mut self, key: &(String, u64)) -> Vec<Outgoing> {
        let mut out = Vec::new();
        while let Some(session) = self.sessions.get_mut(key) {
            let k = session.next_window;
            let Some(start) = session.start_ns else { break };
            // Complete: every waveform holds the second whole (a vitals-only session: a later
            // report came). Overdue: the session has gone MAX_WAIT_SECONDS past it in any
            // stream, so a stream that stalls or never sends holds nothing up for longer.
            let complete = if session.waves.is_empty() {
                session.latest_vitals_ns >= start + (k as i64 + 1) * 1_000_000_000
            } else {
                session
                    .waves
                    .values()
                    .all(|w| w.contiguous_end(w.index_at(k)) >= w.index_at(k + 1))
            };
            let overdue_at = k + 1 + MAX_WAIT_SECONDS;
            let overdue = session
                .waves
                .values()
                .any(|w| w.highest() >= w.index_at(overdue_at))
                || session.latest_vitals_ns >= start + overdue_at as i64 * 1_000_000_000;
            if !(complete || overdue) {
                break;
            }
            let text = Self::message(&self.facility, key, k, start, session);
            session.next_window += 1;
            let skip = self.acked.get(key).is_some_and(|&a| k <= a);
            if !skip {
                out.push(Outgoing {
                    control_id: format!("{}.{:x}.{k}", key.0, key.1),
                    session: key.clone(),
                    window: k,
                    text,
                    resume_cursor: 0,
                });
            }
        }
        let cursor = self.resume_cursor();
        for o in &mut out {
            o.resume_cursor = cursor;
        }
        out
    }

    fn message(facility: &str, key: &(String, u64), k: u64, start: i64, s: &mut Session) -> String {
        let from = start + k as i64 * 1_000_000_000;
        let to = from + 1_000_000_000;
        let control = format!("{}.{:x}.{k}", key.0, key.1);
        let mut segs = vec![
            format!(
                "MSH|^~\\&|RELAY-ED|{}|||{}||ORU^R01^ORU_R01|{}|P|2.6|||NE|AL||UNICODE UTF-8|||{}",
                relay_hl7::escape(facility),
                fmt_ts(from),
                relay_hl7::escape(&control),
                relay_hl7::pcd01::PCD01_PROFILE
            ),
            format!(
                "PID|||{}^^^RELAY^AN||Unknown^Patient",
                relay_hl7::escape(&format!("{}-{:x}", key.0, key.1))
            ),
            format!(
                "OBR|1|{0}^RELAY|{0}^RELAY|182777000^monitoring of patient^SCT|||{1}|{2}",
                relay_hl7::escape(&control),
                fmt_ts(from),
                fmt_ts(to)
            ),
        ];
        let mut n = 0;
        // Numerics of this second (and any earlier ones not sent yet), latest value per code.
        let (now, later): (Vec<_>, Vec<_>) = s.vitals.drain(..).partition(|(t, _, _)| *t < to);
        s.vitals = later;
        let mut latest: BTreeMap<u32, (i64, VitalSign)> = BTreeMap::new();
        for (t, _, values) in now {
            for v in values {
                latest.insert(v.mdc_code, (t, v));
            }
        }
        for (i, (t, v)) in latest.into_values().enumerate() {
            n += 1;
            segs.push(format!(
                "OBX|{n}|NM|{}|1.0.1.{}|{}|{}|||||R|||{}",
                identifier(v.mdc_code, &v.label),
                i + 1,
                v.value,
                ucum(&v.unit),
                fmt_ts(t)
            ));
        }
        for (si, wave) in s.waves.values_mut().enumerate() {
            let (a, b) = (wave.index_at(k), wave.index_at(k + 1));
            let samples = wave.take(a, b);
            for (c, (ch, values)) in wave.channels.iter().zip(samples).enumerate() {
                let gain = if ch.gain > 0.0 { ch.gain } else { 1.0 };
                let text: Vec<String> = values
                    .iter()
                    .map(|v| {
                        v.map_or(String::new(), |v| {
                            format!("{}", f64::from(v - ch.baseline) / gain)
                        })
                    })
                    .collect();
                n += 1;
                let sub = format!("1.0.{}.{}", si + 2, c + 1);
                segs.push(format!(
                    "OBX|{n}|NA|{}|{sub}|{}|{}|||||R|||{}",
                    identifier(ch.mdc_code, &ch.name),
                    text.join("^"),
                    ucum(&ch.unit),
                    fmt_ts(from)
                ));
                n += 1;
                segs.push(format!(
                    "OBX|{n}|NM|67981^MDC_ATTR_SAMP_RATE^MDC|{sub}.1|{}|264608^MDC_DIM_PER_SEC^MDC|||||R",
                    wave.rate_hz
                ));
            }
        }
        let mut text = segs.join("\r");
        text.push('\r');
        text
    }
}

/// What the feed has delivered: persisted after every acknowledgement.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub struct FeedState {
    /// Subscription cursor to resume after (every message built from earlier records is
    /// acknowledged).
    pub cursor: Option<u64>,
    /// Last acknowledged window per session, keyed `<vehicle> <session>`.
    pub acked: BTreeMap<String, u64>,
}

impl FeedState {
    /// Reads the state file; a missing file is a fresh start.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        match std::fs::read(path) {
            Ok(b) => Ok(serde_json::from_slice(&b)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes it atomically (temporary file, fsync, rename).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        use std::io::Write;
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(self)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }

    fn acked_map(&self) -> HashMap<(String, u64), u64> {
        self.acked
            .iter()
            .filter_map(|(k, &v)| {
                let (veh, sess) = k.rsplit_once(' ')?;
                Some(((veh.to_owned(), u64::from_str_radix(sess, 16).ok()?), v))
            })
            .collect()
    }
}

/// Where and how the feed delivers.
#[derive(Debug, Clone)]
pub struct FeedOptions {
    /// gRPC address of the ingest.
    pub server: String,
    /// TLS files of this client.
    pub tls: crate::client::ClientTls,
    /// The integration engine's MLLP address.
    pub target: String,
    /// CA (PEM) of the engine's certificate and the name it must carry, for MLLP over TLS.
    pub target_tls: Option<(PathBuf, String)>,
    /// State file (acknowledged messages, resume cursor).
    pub state: PathBuf,
    /// MSH-4.
    pub facility: String,
    /// An acknowledgement must come within this.
    pub ack_timeout: Duration,
}

/// Runs the feed until `stop` fires.
pub async fn run(opts: FeedOptions, stop: CancellationToken) -> anyhow::Result<()> {
    let state = FeedState::load(&opts.state)?;
    let (tx, rx) = mpsc::channel(MAX_QUEUED);
    let builder = FeedBuilder::new(&opts.facility, state.acked_map());
    let subscribe = tokio::spawn(subscribe_loop(
        opts.server.clone(),
        opts.tls.clone(),
        state.cursor,
        builder,
        tx,
        stop.clone(),
    ));
    let result = send_loop(&opts, state, rx, &stop).await;
    stop.cancel();
    let _ = subscribe.await;
    result
}

async fn subscribe_loop(
    server: String,
    tls: crate::client::ClientTls,
    cursor: Option<u64>,
    mut builder: FeedBuilder,
    tx: mpsc::Sender<Outgoing>,
    stop: CancellationToken,
) {
    let mut after = cursor.unwrap_or(0);
    let mut first = true;
    loop {
        if stop.is_cancelled() {
            return;
        }
        let stream = async {
            let mut client = crate::client::connect(&server, &tls).await?;
            let req = relay_proto::model::SubscribeRequest {
                start: Some(relay_proto::model::subscribe_request::Start::AfterCursor(
                    after,
                )),
                ..Default::default()
            };
            anyhow::Ok(client.subscribe(req).await?.into_inner())
        };
        let mut stream = match tokio::select! { s = stream => s, () = stop.cancelled() => return } {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "HL7 feed: subscription failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    () = stop.cancelled() => return,
                }
            }
        };
        if first {
            tracing::info!(after, "HL7 feed subscribed");
            first = false;
        }
        loop {
            let msg = tokio::select! { m = stream.message() => m, () = stop.cancelled() => return };
            let Ok(Some(msg)) = msg else { break };
            after = after.max(msg.cursor);
            for out in builder.push(&msg) {
                let sent =
                    tokio::select! { r = tx.send(out) => r, () = stop.cancelled() => return };
                if sent.is_err() {
                    return;
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
            () = stop.cancelled() => return,
        }
    }
}

type Conn = Framed<Box<dyn Io>, MllpCodec>;
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

async fn connect_target(opts: &FeedOptions) -> anyhow::Result<Conn> {
    let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&opts.target))
        .await
        .map_err(|_| anyhow::anyhow!("connecting to {} timed out", opts.target))??;
    let io: Box<dyn Io> = match &opts.target_tls {
        None => Box::new(tcp),
        Some((ca, name)) => {
            relay_ops::install_crypto_provider();
            let mut roots = rustls::RootCertStore::empty();
            for c in relay_ops::pem::load_certs(ca)? {
                roots.add(c)?;
            }
            let config = rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth();
            let name = rustls::pki_types::ServerName::try_from(name.clone())?;
            let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
            Box::new(tls.connect(name, tcp).await?)
        }
    };
    Ok(Framed::new(io, MllpCodec::new(1 << 20)))
}

fn count(result: &'static str) {
    metrics::counter!("relay_ed_hl7_messages_total", "result" => result).increment(1);
}

async fn send_loop(
    opts: &FeedOptions,
    mut state: FeedState,
    mut rx: mpsc::Receiver<Outgoing>,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let mut pending: VecDeque<Outgoing> = VecDeque::new();
    let mut conn: Option<Conn> = None;
    let mut backoff = Duration::from_millis(200);
    loop {
        if stop.is_cancelled() {
            return Ok(());
        }
        if pending.is_empty() {
            let next =
                tokio::select! { m = rx.recv() => m, () = stop.cancelled() => return Ok(()) };
            match next {
                Some(m) => pending.push_back(m),
                None => return Ok(()),
            }
        }
        let Some(msg) = pending.front().cloned() else {
            continue;
        };
        if conn.is_none() {
            match tokio::select! { c = connect_target(opts) => c, () = stop.cancelled() => return Ok(()) }
            {
                Ok(c) => {
                    tracing::info!(target = %opts.target, "HL7 feed connected");
                    conn = Some(c);
                }
                Err(e) => {
                    tracing::warn!(target = %opts.target, error = %e, "HL7 feed: receiver unreachable");
                    count("unreachable");
                    tokio::select! { () = tokio::time::sleep(backoff) => {}, () = stop.cancelled() => return Ok(()) }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let outcome = async {
            c.send(msg.text.as_bytes()).await?;
            loop {
                let Some(ack) = c.next().await else {
                    anyhow::bail!("receiver closed the connection");
                };
                let ack = ack?;
                let text = String::from_utf8_lossy(&ack).into_owned();
                let msa = text
                    .split(['\r', '\n'])
                    .find(|s| s.starts_with("MSA"))
                    .map(str::to_owned)
                    .unwrap_or_default();
                let f: Vec<&str> = msa.split('|').collect();
                // An acknowledgement of another message (a late one) is not this one's.
                if f.get(2).copied() != Some(msg.control_id.as_str()) {
                    continue;
                }
                return Ok(f.get(1).map(|s| s.to_string()).unwrap_or_default());
            }
        };
        // A stop does not cut an exchange short: a message the engine may already hold gets
        // its answer awaited (at most ack_timeout) and recorded, so a feed stopped and started
        // again does not send an acknowledged message twice.
        let result = tokio::time::timeout(opts.ack_timeout, outcome).await;
        match result {
            Ok(Ok(code)) if code == "AA" || code == "CA" => {
                count("accepted");
                backoff = Duration::from_millis(200);
                pending.pop_front();
                state
                    .acked
                    .insert(format!("{} {:x}", msg.session.0, msg.session.1), msg.window);
                state.cursor = Some(msg.resume_cursor);
                state.save(&opts.state)?;
            }
            Ok(Ok(code)) => {
                count("refused");
                tracing::warn!(control_id = %msg.control_id, %code, "HL7 feed: message refused; sending it again");
                tokio::select! { () = tokio::time::sleep(backoff) => {}, () = stop.cancelled() => return Ok(()) }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            Ok(Err(e)) => {
                count("failed");
                tracing::warn!(control_id = %msg.control_id, error = %e, "HL7 feed: connection lost; sending again");
                conn = None;
            }
            Err(_) => {
                count("timeout");
                tracing::warn!(control_id = %msg.control_id, "HL7 feed: no acknowledgement; sending again");
                conn = None;
            }
        }
        // Take what the subscription built meanwhile, keeping the queue bounded.
        while pending.len() < MAX_QUEUED {
            match rx.try_recv() {
                Ok(m) => pending.push_back(m),
                Err(_) => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_proto::model::{
        DataRecord, Frame, StreamDescriptor, StreamInfo, StreamRef, VitalsReport, WaveformChunk,
        WaveformInfo,
    };

    fn stream(id: u32, kind: StreamKind) -> StreamRef {
        StreamRef {
            vehicle_id: "amb-1".into(),
            session_id: 7,
            stream_id: id,
            kind: kind as i32,
        }
    }

    fn ecg_info(id: u32) -> SubscribeResponse {
        SubscribeResponse {
            record: Some(Record::Stream(StreamInfo {
                stream: Some(stream(id, StreamKind::Waveform)),
                descriptor: Some(StreamDescriptor {
                    stream_id: id,
                    kind: StreamKind::Waveform as i32,
                    name: "ecg".into(),
                    waveform: Some(WaveformInfo {
                        sample_rate_hz: 10.0,
                        channels: vec![ChannelInfo {
                            name: "II".into(),
                            gain: 1.0,
                            ..ChannelInfo::default()
                        }],
                        ..WaveformInfo::default()
                    }),
                }),
            })),
            ..Default::default()
        }
    }

    fn data(cursor: u64, s: StreamRef, t: i64, payload: Payload) -> SubscribeResponse {
        SubscribeResponse {
            cursor,
            record: Some(Record::Data(DataRecord {
                stream: Some(s),
                frame: Some(Frame {
                    stream_id: 0,
                    seq: cursor,
                    capture_time_ns: t,
                    payload: Some(payload),
                }),
                ..DataRecord::default()
            })),
            ..Default::default()
        }
    }

    #[test]
    fn a_stream_that_never_sends_holds_its_session_back_only_so_long() {
        let mut b = FeedBuilder::new("ED", HashMap::new());
        b.push(&ecg_info(0));
        b.push(&ecg_info(1)); // declared, never sends
        let mut sent = Vec::new();
        for k in 0..(MAX_WAIT_SECONDS + 5) {
            let chunk = Payload::Waveform(WaveformChunk {
                first_sample_index: k * 10,
                sample_count: 10,
                samples: vec![1; 10],
                ..Default::default()
            });
            let t = k as i64 * 1_000_000_000;
            sent.extend(b.push(&data(k + 1, stream(0, StreamKind::Waveform), t, chunk)));
            let vitals = Payload::Vitals(VitalsReport::default());
            sent.extend(b.push(&data(1000 + k, stream(2, StreamKind::Vitals), t, vitals)));
        }
        // Seconds go once the session is MAX_WAIT_SECONDS past them; stream 1's samples empty.
        assert_eq!(sent.len(), 5);
        assert_eq!(sent[0].control_id, "amb-1.7.0");
        assert!(
            sent[0].text.contains("|1^1^1^1^1^1^1^1^1^1|"),
            "{}",
            sent[0].text
        );
        assert!(sent[0].text.contains("|^^^^^^^^^|"), "{}", sent[0].text);
        let held: usize = b.sessions.values().map(|s| s.vitals.len()).sum();
        assert!(
            held <= MAX_WAIT_SECONDS as usize + 1,
            "{held} vitals reports held"
        );
    }

    #[test]
    fn timestamps_are_hl7_dtm_in_utc() {
        assert_eq!(fmt_ts(0), "19700101000000.0000+0000");
        assert_eq!(
            fmt_ts(1_795_946_401_123_456_789),
            "20261129100001.1234+0000"
        );
        assert_eq!(fmt_ts(951_782_400_000_000_000), "20000229000000.0000+0000");
    }
}
