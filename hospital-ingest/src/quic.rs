//! QUIC side: accepts vehicle bearers, authenticates them by certificate, reads frames (one per
//! unidirectional stream), validates them and hands them to the store writer; writes
//! acknowledgements back on the control stream once frames are durable.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use prost::Message;
use relay_proto::model::{Frame, StreamDescriptor, StreamKind, frame::Payload};
use relay_proto::seq::ranges_from_seqs;
use relay_proto::wire::v1::{
    Ack, ControlMessage, Hello, HelloAck, StreamAck, control_message::Body,
};
use relay_proto::{CloseCode, MAX_CONTROL_MESSAGE_BYTES, PROTOCOL_VERSION};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

use crate::config::Quic;
use crate::writer::WriterCmd;

/// Bounds of what a Hello may declare.
const MAX_STREAMS_PER_SESSION: usize = 64;
const MAX_CHANNELS: usize = 256;
const MAX_SAMPLES_PER_FRAME: u32 = 100_000;
/// Highest sequence number accepted: 2^40 frames is over 1,000 years of 40 ms frames, and
/// keeps every seq and sample-index computation far from overflow.
pub const MAX_SEQ: u64 = 1 << 40;
const MAX_VITALS_PER_FRAME: usize = 256;
/// How long acknowledgements may gather before they are written.
const ACK_COALESCE: Duration = Duration::from_millis(5);

/// Which vehicles have a bearer connected now (vehicle -> connection count).
#[derive(Debug, Default)]
pub struct Online {
    inner: Mutex<HashMap<String, usize>>,
}

impl Online {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn up(&self, v: &str) {
        let mut m = self.lock();
        *m.entry(v.to_owned()).or_default() += 1;
        metrics::gauge!("relay_ingest_vehicles_online").set(m.len() as f64);
    }

    fn down(&self, v: &str) {
        let mut m = self.lock();
        if let Some(n) = m.get_mut(v) {
            *n -= 1;
            if *n == 0 {
                m.remove(v);
            }
        }
        metrics::gauge!("relay_ingest_vehicles_online").set(m.len() as f64);
    }

    pub fn is_online(&self, v: &str) -> bool {
        self.lock().contains_key(v)
    }
}

/// Marks a vehicle online from its accepted Hello until the connection ends.
struct OnlineGuard<'a> {
    online: &'a Online,
    vehicle: &'a str,
}

impl<'a> OnlineGuard<'a> {
    fn new(online: &'a Online, vehicle: &'a str) -> Self {
        online.up(vehicle);
        Self { online, vehicle }
    }
}

impl Drop for OnlineGuard<'_> {
    fn drop(&mut self) {
        self.online.down(self.vehicle);
    }
}

#[derive(Debug, Clone)]
pub struct QuicContext {
    pub cfg: Quic,
    pub writer: mpsc::Sender<WriterCmd>,
    pub online: Arc<Online>,
}

/// Why a connection was closed by us.
#[derive(Debug, thiserror::Error)]
#[error("{code:?}: {detail}")]
pub struct Refusal {
    pub code: CloseCode,
    pub detail: String,
}

fn refuse(code: CloseCode, detail: impl Into<String>) -> Refusal {
    Refusal {
        code,
        detail: detail.into(),
    }
}

fn protocol_error(conn: &quinn::Connection, vehicle: &str, r: &Refusal) {
    metrics::counter!("relay_ingest_protocol_errors_total", "reason" => r.code.label())
        .increment(1);
    tracing::warn!(vehicle, remote = %conn.remote_address(), code = r.code.label(), detail = %r.detail, "closing connection");
    let reason: String = r.detail.chars().take(200).collect();
    conn.close(quinn::VarInt::from_u32(r.code.as_u32()), reason.as_bytes());
}

/// Accepts connections until `stop` fires, at most `max_connections` at once.
pub async fn serve(endpoint: quinn::Endpoint, ctx: QuicContext, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(ctx.cfg.max_connections));
    let mut conns = JoinSet::new();
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            () = stop.cancelled() => break,
        };
        let incoming = tokio::select! {
            i = endpoint.accept() => match i { Some(i) => i, None => break },
            () = stop.cancelled() => break,
        };
        let ctx = ctx.clone();
        let stop = stop.clone();
        conns.spawn(async move {
            let _permit = permit;
            handle_incoming(incoming, ctx, stop).await;
        });
        while conns.try_join_next().is_some() {}
    }
    endpoint.close(
        quinn::VarInt::from_u32(CloseCode::ServerShutdown.as_u32()),
        b"ingest shutting down",
    );
    conns.shutdown().await;
}

async fn handle_incoming(incoming: quinn::Incoming, ctx: QuicContext, stop: CancellationToken) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            // Includes certificates from a foreign CA: a security event, not just noise.
            metrics::counter!("relay_ingest_handshake_failures_total").increment(1);
            tracing::warn!(%remote, error = %e, "QUIC/TLS handshake failed");
            return;
        }
    };
    let vehicle = match crate::tls::connection_vehicle_id(&conn) {
        Ok(v) => v,
        Err(e) => {
            metrics::counter!("relay_ingest_security_events_total", "reason" => e.label())
                .increment(1);
            protocol_error(&conn, "?", &refuse(CloseCode::BadIdentity, e.to_string()));
            return;
        }
    };
    metrics::counter!("relay_ingest_connections_total").increment(1);
    let result = serve_vehicle(&conn, Arc::from(vehicle.as_str()), &ctx, &stop).await;
    match result {
        Ok(()) => tracing::info!(vehicle, %remote, "vehicle disconnected"),
        Err(r) => protocol_error(&conn, &vehicle, &r),
    }
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_CONTROL_MESSAGE_BYTES)
        .new_codec()
}

/// Checks a Hello against the certificate and our bounds.
pub fn validate_hello(hello: &Hello, vehicle: &str) -> Result<(), Refusal> {
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(refuse(
            CloseCode::BadHandshake,
            format!("protocol version {} unsupported", hello.protocol_version),
        ));
    }
    if hello.vehicle_id != vehicle {
        metrics::counter!("relay_ingest_security_events_total", "reason" => "identity_mismatch")
            .increment(1);
        return Err(refuse(
            CloseCode::IdentityMismatch,
            format!(
                "hello claims vehicle {:?}, certificate says {vehicle:?}",
                hello.vehicle_id.chars().take(64).collect::<String>()
            ),
        ));
    }
    if hello.streams.is_empty() || hello.streams.len() > MAX_STREAMS_PER_SESSION {
        return Err(refuse(
            CloseCode::Malformed,
            format!("1..={MAX_STREAMS_PER_SESSION} streams required"),
        ));
    }
    let mut ids = HashSet::new();
    for s in &hello.streams {
        if !ids.insert(s.stream_id) {
            return Err(refuse(
                CloseCode::Malformed,
                format!("stream id {} declared twice", s.stream_id),
            ));
        }
        validate_descriptor(s)?;
    }
    Ok(())
}

fn validate_descriptor(s: &StreamDescriptor) -> Result<(), Refusal> {
    let kind = StreamKind::try_from(s.kind).map_err(|_| {
        refuse(
            CloseCode::Malformed,
            format!("stream {}: unknown kind {}", s.stream_id, s.kind),
        )
    })?;
    if kind == StreamKind::Unspecified || s.name.len() > 64 {
        return Err(refuse(
            CloseCode::Malformed,
            format!("stream {}: kind or name invalid", s.stream_id),
        ));
    }
    match (kind, &s.waveform) {
        (StreamKind::Waveform, Some(w)) => {
            let rate_ok = w.sample_rate_hz.is_finite()
                && w.sample_rate_hz > 0.0
                && w.sample_rate_hz <= 100_000.0;
            if !rate_ok || w.channels.is_empty() || w.channels.len() > MAX_CHANNELS {
                return Err(refuse(
                    CloseCode::Malformed,
                    format!("stream {}: bad waveform rate or channels", s.stream_id),
                ));
            }
            if w.channels.iter().any(|c| {
                !(c.gain.is_finite() && c.gain > 0.0) || c.name.len() > 64 || c.unit.len() > 32
            }) {
                return Err(refuse(
                    CloseCode::Malformed,
                    format!("stream {}: bad channel description", s.stream_id),
                ));
            }
        }
        (StreamKind::Waveform, None) => {
            return Err(refuse(
                CloseCode::Malformed,
                format!("stream {}: waveform without description", s.stream_id),
            ));
        }
        _ => {}
    }
    Ok(())
}

/// Checks a frame against its stream's declaration.
pub fn validate_frame(
    frame: &Frame,
    streams: &HashMap<u32, StreamDescriptor>,
) -> Result<(), Refusal> {
    let Some(desc) = streams.get(&frame.stream_id) else {
        return Err(refuse(
            CloseCode::Malformed,
            format!("frame for undeclared stream {}", frame.stream_id),
        ));
    };
    if frame.seq > MAX_SEQ {
        return Err(refuse(
            CloseCode::Malformed,
            format!(
                "stream {} seq {} beyond {MAX_SEQ}",
                frame.stream_id, frame.seq
            ),
        ));
    }
    let kind = StreamKind::try_from(desc.kind).unwrap_or(StreamKind::Unspecified);
    let ok = match (&frame.payload, kind) {
        (Some(Payload::Waveform(w)), StreamKind::Waveform) => {
            let channels = desc.waveform.as_ref().map_or(0, |w| w.channels.len());
            w.sample_count > 0
                && w.sample_count <= MAX_SAMPLES_PER_FRAME
                && w.samples.len() == w.sample_count as usize * channels
                // Sample index consistent with the frame number: frames before this one
                // hold at most MAX_SAMPLES_PER_FRAME each.
                && w.first_sample_index <= frame.seq * u64::from(MAX_SAMPLES_PER_FRAME)
        }
        (Some(Payload::Vitals(v)), StreamKind::Vitals) => {
            !v.values.is_empty()
                && v.values.len() <= MAX_VITALS_PER_FRAME
                && v.values.iter().all(|x| x.value.is_finite())
        }
        (Some(Payload::Location(l)), StreamKind::Location) => {
            (-90.0..=90.0).contains(&l.latitude_deg) && (-180.0..=180.0).contains(&l.longitude_deg)
        }
        (Some(Payload::Event(_)), StreamKind::Events) => true,
        _ => false,
    };
    if !ok {
        return Err(refuse(
            CloseCode::Malformed,
            format!(
                "stream {} seq {}: payload does not match its stream",
                frame.stream_id, frame.seq
            ),
        ));
    }
    Ok(())
}

async fn serve_vehicle(
    conn: &quinn::Connection,
    vehicle: Arc<str>,
    ctx: &QuicContext,
    stop: &CancellationToken,
) -> Result<(), Refusal> {
    let hello_timeout = Duration::from_millis(ctx.cfg.hello_timeout_ms);
    let accepted = tokio::time::timeout(hello_timeout, conn.accept_bi())
        .await
        .map_err(|_| refuse(CloseCode::BadHandshake, "no control stream"))?;
    let Ok((send, recv)) = accepted else {
        return Ok(()); // the peer went away before opening its control stream
    };
    let mut control_out = FramedWrite::new(send, codec());
    let mut control_in = FramedRead::new(recv, codec());
    let first = tokio::time::timeout(hello_timeout, control_in.next())
        .await
        .map_err(|_| refuse(CloseCode::BadHandshake, "no hello"))?;
    let hello = match first {
        Some(Ok(b)) => match ControlMessage::decode(b.freeze()) {
            Ok(ControlMessage {
                body: Some(Body::Hello(h)),
            }) => h,
            Ok(_) => {
                return Err(refuse(
                    CloseCode::BadHandshake,
                    "first control message is not a hello",
                ));
            }
            Err(e) => {
                return Err(refuse(
                    CloseCode::Malformed,
                    format!("undecodable hello: {e}"),
                ));
            }
        },
        Some(Err(e)) => return Err(refuse(CloseCode::Malformed, format!("control stream: {e}"))),
        None => {
            return Err(refuse(
                CloseCode::BadHandshake,
                "control stream closed before hello",
            ));
        }
    };
    validate_hello(&hello, &vehicle)?;
    let session = hello.session_id;
    let streams: HashMap<u32, StreamDescriptor> = hello
        .streams
        .iter()
        .map(|s| (s.stream_id, s.clone()))
        .collect();
    let (done_tx, done_rx) = oneshot::channel();
    ctx.writer
        .send(WriterCmd::Streams {
            vehicle: vehicle.clone(),
            session,
            streams: hello.streams,
            done: done_tx,
        })
        .await
        .map_err(|_| refuse(CloseCode::ServerShutdown, "store closed"))?;
    match done_rx.await {
        Ok(Ok(())) => {}
        _ => return Err(refuse(CloseCode::Overloaded, "could not register streams")),
    }
    let ack = ControlMessage {
        body: Some(Body::HelloAck(HelloAck {
            protocol_version: PROTOCOL_VERSION,
            ingest_time_ns: crate::now_utc_ns(),
        })),
    };
    if control_out
        .send(Bytes::from(ack.encode_to_vec()))
        .await
        .is_err()
    {
        return Ok(()); // the peer went away during the handshake
    }
    tracing::info!(vehicle = %vehicle, session, streams = streams.len(), remote = %conn.remote_address(), "vehicle connected");
    let _online = OnlineGuard::new(&ctx.online, &vehicle);

    let (ack_tx, ack_rx) = mpsc::channel(ctx.cfg.max_pending_acks);
    let mut ack_writer = tokio::spawn(write_acks(ack_rx, control_out));
    let streams = Arc::new(streams);
    let (fail_tx, mut fail_rx) = mpsc::channel::<Refusal>(1);
    let mut readers = JoinSet::new();
    let result = loop {
        tokio::select! {
            uni = conn.accept_uni() => match uni {
                Ok(recv) => {
                    let (streams, writer, ack, fail) = (streams.clone(), ctx.writer.clone(), ack_tx.clone(), fail_tx.clone());
                    let (vehicle, max) = (vehicle.clone(), ctx.cfg.max_frame_bytes);
                    readers.spawn(async move {
                        if let Err(r) = read_frame(recv, max, &streams, &vehicle, session, &writer, ack).await {
                            let _ = fail.try_send(r);
                        }
                    });
                    while readers.try_join_next().is_some() {}
                }
                Err(_) => break Ok(()),
            },
            Some(r) = fail_rx.recv() => break Err(r),
            _ = &mut ack_writer => break match conn.close_reason() {
                Some(_) => Ok(()),
                None => Err(refuse(CloseCode::BadHandshake, "control stream closed")),
            },
            msg = control_in.next() => match msg {
                Some(Ok(_)) => {} // nothing else is expected from the agent yet; ignore
                // A read error on a connection that is already closed is a disconnect, not
                // bad input.
                Some(Err(_)) if conn.close_reason().is_some() => break Ok(()),
                Some(Err(e)) => break Err(refuse(CloseCode::Malformed, format!("control stream: {e}"))),
                None => break Ok(()),
            },
            () = stop.cancelled() => {
                conn.close(quinn::VarInt::from_u32(CloseCode::ServerShutdown.as_u32()), b"ingest shutting down");
                break Ok(());
            }
        }
    };
    readers.abort_all();
    ack_writer.abort();
    result
}

async fn read_frame(
    mut recv: quinn::RecvStream,
    max: usize,
    streams: &HashMap<u32, StreamDescriptor>,
    vehicle: &Arc<str>,
    session: u64,
    writer: &mpsc::Sender<WriterCmd>,
    ack: mpsc::Sender<(u32, u64)>,
) -> Result<(), Refusal> {
    let bytes = match recv.read_to_end(max).await {
        Ok(b) => b,
        Err(quinn::ReadToEndError::TooLong) => {
            return Err(refuse(
                CloseCode::FrameTooLarge,
                format!("frame larger than {max} bytes"),
            ));
        }
        Err(_) => return Ok(()), // stream reset or connection lost: the agent re-sends
    };
    metrics::counter!("relay_ingest_frame_bytes_total").increment(bytes.len() as u64);
    let frame = Frame::decode(bytes.as_slice())
        .map_err(|e| refuse(CloseCode::Malformed, format!("undecodable frame: {e}")))?;
    validate_frame(&frame, streams)?;
    metrics::counter!("relay_ingest_frames_received_total").increment(1);
    if ack.capacity() == 0 {
        // The agent does not read its acknowledgements: stop taking its frames.
        return Err(refuse(
            CloseCode::Overloaded,
            "acknowledgements not drained",
        ));
    }
    let cmd = WriterCmd::Frame {
        vehicle: vehicle.clone(),
        session,
        frame,
        received_ns: crate::now_utc_ns(),
        ack,
    };
    writer
        .send(cmd)
        .await
        .map_err(|_| refuse(CloseCode::ServerShutdown, "store closed"))
}

/// Coalesces durable (stream, seq) into range acknowledgements on the control stream.
async fn write_acks(
    mut rx: mpsc::Receiver<(u32, u64)>,
    mut out: FramedWrite<quinn::SendStream, LengthDelimitedCodec>,
) {
    while let Some(first) = rx.recv().await {
        let mut by_stream: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        by_stream.entry(first.0).or_default().push(first.1);
        let deadline = tokio::time::Instant::now() + ACK_COALESCE;
        while let Ok(Some((s, q))) = tokio::time::timeout_at(deadline, rx.recv()).await {
            by_stream.entry(s).or_default().push(q);
            if by_stream.values().map(Vec::len).sum::<usize>() >= 4096 {
                break;
            }
        }
        let streams = by_stream
            .into_iter()
            .map(|(stream_id, mut seqs)| StreamAck {
                stream_id,
                ranges: ranges_from_seqs(&mut seqs),
            })
            .collect();
        let msg = ControlMessage {
            body: Some(Body::Ack(Ack { streams })),
        };
        if out.send(Bytes::from(msg.encode_to_vec())).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_proto::model::{ChannelInfo, Location, WaveformChunk, WaveformInfo};

    fn ecg(id: u32) -> StreamDescriptor {
        let ch = |n: &str| ChannelInfo {
            name: n.into(),
            unit: "mV".into(),
            gain: 200.0,
            ..ChannelInfo::default()
        };
        StreamDescriptor {
            stream_id: id,
            kind: StreamKind::Waveform as i32,
            name: "ecg".into(),
            waveform: Some(WaveformInfo {
                sample_rate_hz: 360.0,
                channels: vec![ch("MLII"), ch("V5")],
                source: String::new(),
            }),
        }
    }

    fn hello(streams: Vec<StreamDescriptor>) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            vehicle_id: "amb-1".into(),
            session_id: 1,
            streams,
            agent_version: String::new(),
        }
    }

    #[test]
    fn hello_must_match_certificate_and_bounds() {
        assert!(validate_hello(&hello(vec![ecg(0)]), "amb-1").is_ok());
        assert_eq!(
            validate_hello(&hello(vec![ecg(0)]), "amb-2")
                .unwrap_err()
                .code,
            CloseCode::IdentityMismatch
        );
        assert_eq!(
            validate_hello(&hello(vec![ecg(0), ecg(0)]), "amb-1")
                .unwrap_err()
                .code,
            CloseCode::Malformed
        );
        assert_eq!(
            validate_hello(&hello(vec![]), "amb-1").unwrap_err().code,
            CloseCode::Malformed
        );
        let mut bad_rate = ecg(0);
        if let Some(w) = bad_rate.waveform.as_mut() {
            w.sample_rate_hz = f64::NAN;
        }
        assert!(validate_hello(&hello(vec![bad_rate]), "amb-1").is_err());
        let mut old = hello(vec![ecg(0)]);
        old.protocol_version = 99;
        assert_eq!(
            validate_hello(&old, "amb-1").unwrap_err().code,
            CloseCode::BadHandshake
        );
    }

    #[test]
    fn frames_must_match_their_stream() {
        let streams: HashMap<u32, StreamDescriptor> = [(0, ecg(0))].into_iter().collect();
        let wave = |count: u32, n: usize| Frame {
            stream_id: 0,
            seq: 0,
            capture_time_ns: 0,
            payload: Some(Payload::Waveform(WaveformChunk {
                first_sample_index: 0,
                sample_count: count,
                samples: vec![0; n],
            })),
        };
        assert!(validate_frame(&wave(3, 6), &streams).is_ok());
        assert!(
            validate_frame(&wave(3, 5), &streams).is_err(),
            "samples not count x channels"
        );
        assert!(validate_frame(&wave(0, 0), &streams).is_err());
        let mut other = wave(3, 6);
        other.stream_id = 1;
        assert!(
            validate_frame(&other, &streams).is_err(),
            "undeclared stream"
        );
        let loc = Frame {
            payload: Some(Payload::Location(Location::default())),
            ..wave(1, 2)
        };
        assert!(
            validate_frame(&loc, &streams).is_err(),
            "payload kind differs from the stream's"
        );
        let mut far = wave(3, 6);
        far.seq = MAX_SEQ + 1;
        assert!(
            validate_frame(&far, &streams).is_err(),
            "seq beyond the bound"
        );
        let mut jump = wave(3, 6);
        if let Some(Payload::Waveform(w)) = jump.payload.as_mut() {
            w.first_sample_index = 1 << 50;
        }
        assert!(
            validate_frame(&jump, &streams).is_err(),
            "sample index inconsistent with seq"
        );
        let no_payload = Frame {
            payload: None,
            ..wave(1, 2)
        };
        assert!(validate_frame(&no_payload, &streams).is_err());
    }
}
