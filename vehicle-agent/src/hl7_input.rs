//! Patient monitor input: IHE PCD-01 `ORU^R01` over MLLP on the vehicle LAN. Numerics become
//! the vitals stream; waveform channels (one `NA` OBX per channel) the waveform streams the
//! configuration declares. Every message is answered: AA once its frames are queued for the
//! uplink, AE/AR with the reason otherwise; a bad message never stops the listener.

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use relay_hl7::{AckCode, MllpCodec, Observations};
use relay_proto::model::{
    ChannelInfo, Frame, StreamDescriptor, StreamKind, VitalSign, VitalsReport, WaveformChunk,
    WaveformInfo, frame::Payload,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use crate::config::{Hl7Listener, Hl7Waveform};
use crate::framer::SequenceCounter;

/// Connections served at once (a monitor or two, a gateway); more wait.
pub const MAX_CONNECTIONS: usize = 16;
/// A connection silent this long is closed (gateways reconnect).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// A TLS handshake must finish within this.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The streams of one monitor input and what turns its messages into their frames (sans-IO).
#[derive(Debug)]
pub struct Hl7Streams {
    vitals: SequenceCounter,
    waveforms: Vec<WaveStream>,
}

#[derive(Debug)]
struct WaveStream {
    cfg: Hl7Waveform,
    seq: SequenceCounter,
    next_sample: u64,
    /// Capture time of sample 0: when its first chunk arrived.
    start_ns: Option<i64>,
}

impl Hl7Streams {
    /// Streams numbered from `first_stream_id`: vitals first, then each waveform.
    pub fn new(cfg: &Hl7Listener, first_stream_id: u32) -> Self {
        Self {
            vitals: SequenceCounter::new(first_stream_id),
            waveforms: cfg
                .waveforms
                .iter()
                .enumerate()
                .map(|(k, w)| WaveStream {
                    cfg: w.clone(),
                    seq: SequenceCounter::new(first_stream_id.saturating_add(1 + k as u32)),
                    next_sample: 0,
                    start_ns: None,
                })
                .collect(),
        }
    }

    /// The descriptors for the Hello, in stream order.
    pub fn descriptors(cfg: &Hl7Listener, first_stream_id: u32) -> Vec<StreamDescriptor> {
        let mut out = vec![StreamDescriptor {
            stream_id: first_stream_id,
            kind: StreamKind::Vitals as i32,
            name: "vitals".into(),
            waveform: None,
        }];
        for (k, w) in cfg.waveforms.iter().enumerate() {
            out.push(StreamDescriptor {
                stream_id: first_stream_id.saturating_add(1 + k as u32),
                kind: StreamKind::Waveform as i32,
                name: w.name.clone(),
                waveform: Some(WaveformInfo {
                    sample_rate_hz: w.sample_rate_hz,
                    channels: w
                        .channels
                        .iter()
                        .map(|c| ChannelInfo {
                            name: c.name.clone(),
                            mdc_code: c.mdc_code,
                            unit: w.unit.clone(),
                            gain: w.gain,
                            adc_resolution: 16,
                            ..ChannelInfo::default()
                        })
                        .collect(),
                    source: format!("hl7:{}", cfg.listen),
                    ..WaveformInfo::default()
                }),
            });
        }
        out
    }

    /// The frames one message makes, or why it is refused (nothing is taken from a refused
    /// message). `now_ns` is the vehicle clock.
    pub fn apply(&mut self, obs: &Observations, now_ns: i64) -> Result<Vec<Frame>, String> {
        // Check every waveform stream first: a message is taken whole or not at all.
        let mut chunks = Vec::new();
        for (k, ws) in self.waveforms.iter().enumerate() {
            let found: Vec<_> = ws
                .cfg
                .channels
                .iter()
                .map(|c| obs.waveforms.iter().find(|w| w.mdc_code == c.mdc_code))
                .collect();
            if found.iter().all(Option::is_none) {
                continue; // this message does not carry the stream
            }
            let mut channels = Vec::with_capacity(found.len());
            for (c, w) in ws.cfg.channels.iter().zip(found) {
                let w = w.ok_or_else(|| {
                    format!(
                        "stream {}: channel {} ({}) missing",
                        ws.cfg.name, c.name, c.mdc_code
                    )
                })?;
                if let Some(rate) = w.sample_rate_hz
                    && (rate - ws.cfg.sample_rate_hz).abs() > 1e-6 * rate
                {
                    return Err(format!(
                        "stream {}: channel {} at {rate} Hz, declared {} Hz",
                        ws.cfg.name, c.name, ws.cfg.sample_rate_hz
                    ));
                }
                if !w.unit.is_empty() && w.unit != ws.cfg.unit {
                    return Err(format!(
                        "stream {}: channel {} in {:?}, declared {:?}",
                        ws.cfg.name, c.name, w.unit, ws.cfg.unit
                    ));
                }
                channels.push(w);
            }
            let n = channels[0].samples.len();
            if channels.iter().any(|w| w.samples.len() != n) {
                return Err(format!(
                    "stream {}: channels differ in sample count",
                    ws.cfg.name
                ));
            }
            let mut samples = Vec::with_capacity(n * channels.len());
            for i in 0..n {
                for w in &channels {
                    let v = (w.samples[i] * ws.cfg.gain).round();
                    if !(f64::from(i32::MIN)..=f64::from(i32::MAX)).contains(&v) {
                        return Err(format!("stream {}: sample out of range", ws.cfg.name));
                    }
                    samples.push(v as i32);
                }
            }
            chunks.push((k, n, samples));
        }
        let mut frames = Vec::new();
        if !obs.numerics.is_empty() {
            let values = obs
                .numerics
                .iter()
                .map(|n| VitalSign {
                    mdc_code: n.mdc_code,
                    label: short_label(n.mdc_code).map_or_else(|| n.label.clone(), str::to_owned),
                    value: n.value,
                    unit: n.unit.clone(),
                })
                .collect();
            frames.push(
                self.vitals
                    .frame(now_ns, Payload::Vitals(VitalsReport { values })),
            );
        }
        for (k, n, samples) in chunks {
            let ws = &mut self.waveforms[k];
            let start = *ws.start_ns.get_or_insert(now_ns);
            let at = start.saturating_add(
                (ws.next_sample as f64 * 1e9 / ws.cfg.sample_rate_hz).round() as i64,
            );
            frames.push(ws.seq.frame(
                at,
                Payload::Waveform(WaveformChunk {
                    first_sample_index: ws.next_sample,
                    sample_count: n as u32,
                    samples,
                    ..WaveformChunk::default()
                }),
            ));
            ws.next_sample += n as u64;
        }
        Ok(frames)
    }
}

/// Short labels of the vital signs the ED view and FHIR export know.
fn short_label(mdc: u32) -> Option<&'static str> {
    use relay_proto::codes as c;
    Some(match mdc {
        c::ECG_HEART_RATE => "HR",
        c::PULS_OXIM_SAT_O2 => "SpO2",
        c::PRESS_BLD_NONINV_SYS => "NIBP-sys",
        c::PRESS_BLD_NONINV_DIA => "NIBP-dia",
        c::PRESS_BLD_NONINV_MEAN => "NIBP-mean",
        c::RESP_RATE => "RR",
        c::AWAY_CO2_ET => "EtCO2",
        c::TEMP_BODY => "Temp",
        _ => return None,
    })
}

fn count(result: &'static str) {
    metrics::counter!("relay_agent_hl7_messages_total", "result" => result).increment(1);
}

fn hl7_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    chrono::DateTime::from_timestamp(secs, 0)
        .map(|t| t.format("%Y%m%d%H%M%S").to_string())
        .unwrap_or_default()
}

/// Listens on `cfg.listen` until `stop` fires, feeding `streams` from every connection.
/// Returns the frames produced.
pub async fn run(
    cfg: Hl7Listener,
    streams: Hl7Streams,
    tx: mpsc::Sender<Frame>,
    epoch_ns: i64,
    stop: CancellationToken,
) -> u64 {
    let tls = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(cert), Some(key)) => match server_tls(cert, key) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::error!(error = %e, "HL7 listener TLS configuration; not listening");
                return 0;
            }
        },
        _ => None,
    };
    let listener = loop {
        match TcpListener::bind(cfg.listen).await {
            Ok(l) => break l,
            Err(e) => {
                tracing::error!(listen = %cfg.listen, error = %e, "HL7 listener cannot bind; retrying in 5 s");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(5)) => {}
                    () = stop.cancelled() => return 0,
                }
            }
        }
    };
    tracing::info!(listen = %cfg.listen, tls = tls.is_some(), "HL7 MLLP listener up");
    let shared = Arc::new(tokio::sync::Mutex::new((streams, 0u64)));
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p,
            () = stop.cancelled() => break,
        };
        let Ok(permit) = permit else { break };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = stop.cancelled() => break,
        };
        let (sock, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "HL7 accept failed");
                continue;
            }
        };
        let conn = Connection {
            max_bytes: cfg.max_message_bytes,
            shared: shared.clone(),
            tx: tx.clone(),
            epoch_ns,
            start,
            stop: stop.clone(),
        };
        let tls = tls.clone();
        tasks.spawn(async move {
            let _permit = permit;
            tracing::info!(%peer, "monitor connected");
            match tls {
                Some(acceptor) => {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(sock)).await {
                        Ok(Ok(s)) => conn.serve(s).await,
                        _ => tracing::warn!(%peer, "HL7 TLS handshake failed"),
                    }
                }
                None => conn.serve(sock).await,
            }
            tracing::info!(%peer, "monitor disconnected");
        });
        while tasks.try_join_next().is_some() {}
    }
    tasks.shutdown().await;
    shared.lock().await.1
}

fn server_tls(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let certs = relay_ops::pem::load_certs(cert)?;
    let key = relay_ops::pem::load_key(key)?;
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

struct Connection {
    max_bytes: usize,
    shared: Arc<tokio::sync::Mutex<(Hl7Streams, u64)>>,
    tx: mpsc::Sender<Frame>,
    epoch_ns: i64,
    start: Instant,
    stop: CancellationToken,
}

impl Connection {
    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(self, io: S) {
        let mut framed = Framed::new(io, MllpCodec::new(self.max_bytes));
        let mut acks: u64 = 0;
        loop {
            let next = tokio::select! {
                n = tokio::time::timeout(IDLE_TIMEOUT, framed.next()) => n,
                () = self.stop.cancelled() => return,
            };
            let msg = match next {
                Err(_) | Ok(None) => return,
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(relay_hl7::MllpError::Io(_)))) => return,
                Ok(Some(Err(e))) => {
                    // Framing errors (too long, bytes outside a block) have no control id to
                    // answer. The reader then ends this connection (its next item is None);
                    // the monitor reconnects. Going on would need the codec to yield
                    // refusals as items: after an error the reader does not decode what it
                    // already holds until new bytes arrive, and the sender waits for an ACK.
                    count("rejected");
                    tracing::warn!(error = %e, "HL7 framing");
                    continue;
                }
            };
            acks += 1;
            let ack_id = format!("ACK{acks}");
            let text = String::from_utf8_lossy(&msg);
            let (code, reason, control, sender) = match relay_hl7::parse_oru(&text) {
                Ok(obs) => {
                    let now = self.epoch_ns.saturating_add(
                        i64::try_from(self.start.elapsed().as_nanos()).unwrap_or(i64::MAX),
                    );
                    let mut guard = self.shared.lock().await;
                    let result = guard.0.apply(&obs, now);
                    let sender = obs.sender.clone();
                    match result {
                        Ok(frames) => {
                            let mut sent = 0;
                            for f in frames {
                                let kind = match f.payload {
                                    Some(Payload::Vitals(_)) => "vitals",
                                    _ => "waveform",
                                };
                                if self.tx.send(f).await.is_err() {
                                    return;
                                }
                                metrics::counter!("relay_agent_frames_produced_total", "kind" => kind)
                                    .increment(1);
                                sent += 1;
                            }
                            guard.1 += sent;
                            (AckCode::Accept, String::new(), obs.control_id, sender)
                        }
                        Err(reason) => (AckCode::Error, reason, obs.control_id, sender),
                    }
                }
                Err(e) => {
                    let code = match e {
                        relay_hl7::Pcd01Error::Syntax(_)
                        | relay_hl7::Pcd01Error::Unsupported(_) => AckCode::Reject,
                        _ => AckCode::Error,
                    };
                    // Answer with whatever control id the message has.
                    let control = control_id_of(&text);
                    (code, e.to_string(), control, (String::new(), String::new()))
                }
            };
            count(match code {
                AckCode::Accept => "accepted",
                AckCode::Error => "error",
                AckCode::Reject => "rejected",
            });
            if code != AckCode::Accept {
                tracing::warn!(%reason, control_id = %control, "HL7 message refused");
            }
            let ack = relay_hl7::ack(
                ("RELAY-AGENT", "AMBULANCE"),
                (&sender.0, &sender.1),
                &hl7_now(),
                &ack_id,
                &control,
                code,
                &reason,
            );
            if framed.send(ack).await.is_err() {
                return;
            }
        }
    }
}

/// MSH-10 of a message that did not parse, best effort (for the NAK).
fn control_id_of(text: &str) -> String {
    text.lines()
        .flat_map(|l| l.split('\r'))
        .find(|l| l.starts_with("MSH"))
        .and_then(|msh| {
            let sep = msh.chars().nth(3)?;
            msh.split(sep).nth(9).map(|s| s.chars().take(64).collect())
        })
        .unwrap_or_default()
}
