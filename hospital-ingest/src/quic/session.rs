//! One vehicle bearer connection after its TLS handshake: the Hello exchange, then frames in
//! (one unidirectional stream each, read within a size bound, validated, handed to the store
//! writer) and acknowledgements out once the writer made them durable.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use prost::Message;
use relay_proto::model::{
    DataRecord, Frame, StreamDescriptor, StreamRef, TimestampCheck, frame::Payload,
};
use relay_proto::wire::v1::{ControlMessage, Pong, control_message::Body};
use relay_proto::{CloseCode, MAX_CONTROL_MESSAGE_BYTES};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

use super::acks::{AckCoalescer, MAX_ACK_SEQS};
use super::clock::ServerClock;
use super::handshake::ServerHandshake;
use super::registry::{HelloSlot, OnlineGuard};
use super::validate::validate_frame;
use super::{QuicContext, Refusal, refuse};
use crate::grpc::early::EarlySource;
use crate::writer::{StreamsRefused, WriterCmd};

/// Application code of a STOP_SENDING for a frame stream that missed its read deadline.
const STOP_DEADLINE: u32 = 1;
/// How long acknowledgements may gather before they are written.
const ACK_COALESCE: Duration = Duration::from_millis(5);

/// A connection the detector knows of, until it ends.
struct WatchedConnection {
    watch: crate::detect::Watch,
    vehicle: Arc<str>,
    id: u64,
}

impl WatchedConnection {
    fn new(watch: &crate::detect::Watch, vehicle: &Arc<str>, addr: std::net::IpAddr) -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        watch.check(|d| d.on_connect(vehicle, id, addr));
        Self {
            watch: watch.clone(),
            vehicle: vehicle.clone(),
            id,
        }
    }
}

impl Drop for WatchedConnection {
    fn drop(&mut self) {
        let (vehicle, id) = (&self.vehicle, self.id);
        self.watch.check(|d| {
            d.on_disconnect(vehicle, id);
            Vec::new()
        });
    }
}

/// Why the first control message could not be read.
enum HelloReadError {
    /// The stream ended first.
    Ended,
    /// It failed, or announced more than a control message may hold.
    Io(std::io::Error),
}

/// Reads the first length-delimited control message (the Hello) after reserving its bytes
/// from `budget`; the reservation is returned with it and given back when dropped.
async fn read_hello(
    recv: &mut quinn::RecvStream,
    budget: &Arc<Semaphore>,
) -> Result<(Vec<u8>, tokio::sync::OwnedSemaphorePermit), HelloReadError> {
    // A peer that goes away before its Hello is not malformed input: it just ended.
    let read = |e: quinn::ReadExactError| match e {
        quinn::ReadExactError::FinishedEarly(_)
        | quinn::ReadExactError::ReadError(
            quinn::ReadError::ConnectionLost(_) | quinn::ReadError::Reset(_),
        ) => HelloReadError::Ended,
        quinn::ReadExactError::ReadError(e) => HelloReadError::Io(e.into()),
    };
    let mut prefix = [0u8; 4];
    recv.read_exact(&mut prefix).await.map_err(read)?;
    let len = u32::from_be_bytes(prefix);
    if len as usize > MAX_CONTROL_MESSAGE_BYTES {
        return Err(HelloReadError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("control message of {len} bytes, at most {MAX_CONTROL_MESSAGE_BYTES}"),
        )));
    }
    let reserved = budget
        .clone()
        .acquire_many_owned(len)
        .await
        .map_err(|_| HelloReadError::Ended)?;
    let mut message = vec![0u8; len as usize];
    recv.read_exact(&mut message).await.map_err(read)?;
    Ok((message, reserved))
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_CONTROL_MESSAGE_BYTES)
        .new_codec()
}

/// What a connection brings from admission: its pending-handshake slot (given back once the
/// Hello checked out) and the pool of session slots it then takes one from.
pub(super) struct Admitted {
    pub(super) pending: super::PendingHandshake,
    pub(super) sessions: Arc<Semaphore>,
}

pub(super) async fn serve_vehicle(
    conn: &quinn::Connection,
    vehicle: Arc<str>,
    ctx: &QuicContext,
    stop: &CancellationToken,
    admitted: Admitted,
) -> Result<(), Refusal> {
    let hs = ServerHandshake::new(Instant::now(), ctx.cfg.hello_timeout);
    let accepted = tokio::time::timeout_at(hs.poll_timeout(), conn.accept_bi())
        .await
        .map_err(|_| hs.handle_timeout("control stream"))?;
    let Ok((send, recv)) = accepted else {
        return Ok(()); // the peer went away before opening its control stream
    };
    let mut control_out = FramedWrite::new(send, codec());
    // A Hello may be up to MAX_CONTROL_MESSAGE_BYTES: what a certificate can make us hold
    // before its connections count is bounded by Hellos in progress per vehicle, and their
    // bytes come out of the ingest's read budget.
    let max = ctx.cfg.max_connections_per_vehicle;
    let Some(hello_slot) = HelloSlot::try_new(&ctx.online, &vehicle, max) else {
        return Err(refuse(
            CloseCode::QuotaExceeded,
            format!("more than {max} Hellos of this vehicle in progress"),
        ));
    };
    let mut recv = recv;
    let first = tokio::time::timeout_at(hs.poll_timeout(), read_hello(&mut recv, &ctx.reading))
        .await
        .map_err(|_| hs.handle_timeout("hello"))?;
    let hello_received_ns = crate::now_utc_ns();
    let hello = match first {
        Ok((bytes, _reserved)) => hs.handle_message(&bytes, &vehicle)?,
        Err(HelloReadError::Ended) => return Err(hs.handle_end(None)),
        Err(HelloReadError::Io(e)) => return Err(hs.handle_end(Some(e))),
    };
    drop(hello_slot);
    let mut control_in = FramedRead::new(recv, codec());
    // The handshake is over; the connection is a session now, if there is room.
    let Admitted { pending, sessions } = admitted;
    drop(pending);
    let Ok(_session) = sessions.try_acquire_owned() else {
        metrics::counter!("relay_ingest_handshakes_refused_total", "reason" => "sessions_full")
            .increment(1);
        return Err(refuse(CloseCode::Overloaded, "ingest at max_connections"));
    };
    // Counted from here: a vehicle holds at most its bearers plus slack at once.
    let budget = ctx.cfg.max_reading_bytes_per_vehicle;
    let Some(online) = OnlineGuard::try_new(&ctx.online, &vehicle, max, budget, conn) else {
        return Err(refuse(
            CloseCode::QuotaExceeded,
            format!("more than {max} connections of this vehicle"),
        ));
    };
    let (session, agent_time_ns) = (hello.session_id, hello.agent_time_ns);
    let streams: HashMap<u32, StreamDescriptor> = hello
        .streams
        .iter()
        .map(|s| (s.stream_id, s.clone()))
        .collect();
    // Subscribers always get plain samples (frames are unpacked on arrival), so what is
    // stored and published says so; the vehicle's choice stays in `streams` for reading.
    let mut published = hello.streams;
    for w in published.iter_mut().filter_map(|s| s.waveform.as_mut()) {
        w.set_encoding(relay_proto::model::WaveformEncoding::Samples);
    }
    let (done_tx, done_rx) = oneshot::channel();
    ctx.writer
        .send(WriterCmd::Streams {
            vehicle: vehicle.clone(),
            session,
            streams: published,
            done: done_tx,
        })
        .await
        .map_err(|_| refuse(CloseCode::ServerShutdown, "store closed"))?;
    match done_rx.await {
        Ok(Ok(())) => {}
        Ok(Err(refused @ StreamsRefused::SessionQuota { .. })) => {
            return Err(refuse(CloseCode::QuotaExceeded, refused.to_string()));
        }
        Ok(Err(refused @ StreamsRefused::SessionMismatch { .. })) => {
            // A valid certificate rewriting what its stored data mean: a security event.
            metrics::counter!("relay_ingest_security_events_total", "reason" => "session_mismatch")
                .increment(1);
            return Err(refuse(CloseCode::SessionMismatch, refused.to_string()));
        }
        Err(_) => return Err(refuse(CloseCode::Overloaded, "could not register streams")),
    }
    let ack_sent_ns = crate::now_utc_ns();
    let ack = ServerHandshake::hello_ack(
        hello_received_ns,
        ack_sent_ns,
        ctx.cfg.decode_waveform_codec,
    );
    if control_out.send(ack).await.is_err() {
        return Ok(()); // the peer went away during the handshake
    }
    let mut clock = ServerClock::after_hello(agent_time_ns, hello_received_ns, ack_sent_ns);
    tracing::info!(vehicle = %vehicle, session, streams = streams.len(), remote = %conn.remote_address(), "vehicle connected");

    let (ack_tx, ack_rx) = mpsc::channel(ctx.cfg.max_pending_acks);
    // Pongs beyond these wait for none: an agent pinging faster than we answer loses some.
    let (pong_tx, pong_rx) = mpsc::channel(PONG_QUEUE);
    // ED acknowledgements of the crew's events, to this connection.
    let (event_ack_tx, event_ack_rx) = mpsc::channel(EVENT_ACK_QUEUE);
    online.route_acks(session, event_ack_tx);
    let mut ack_writer = tokio::spawn(write_acks(ack_rx, pong_rx, event_ack_rx, control_out));
    // Watched from here: its sessions, its addresses, its frames.
    let _watched = WatchedConnection::new(&ctx.watch, &vehicle, conn.remote_address().ip());
    let (v, now) = (vehicle.clone(), crate::now_utc_ns());
    ctx.watch.check(|d| d.on_hello(now, &v, session));
    let reader = FrameReader {
        budget: online.budget.clone(),
        reading: ctx.reading.clone(),
        max: ctx.cfg.max_frame_bytes,
        decode_waveform_codec: ctx.cfg.decode_waveform_codec,
        deadline: ctx.cfg.frame_read_timeout,
        streams: Arc::new(streams),
        vehicle: vehicle.clone(),
        session,
        writer: ctx.writer.clone(),
        watch: ctx.watch.clone(),
        clock: online.clock.clone(),
        early: ctx.early.clone(),
    };
    let (fail_tx, mut fail_rx) = mpsc::channel::<Refusal>(1);
    let mut readers = JoinSet::new();
    let result = loop {
        tokio::select! {
            uni = conn.accept_uni() => match uni {
                Ok(recv) => {
                    let (reader, ack, fail) = (reader.clone(), ack_tx.clone(), fail_tx.clone());
                    readers.spawn(async move {
                        if let Err(r) = reader.read_frame(recv, ack).await {
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
                Some(Ok(bytes)) => {
                    let received_ns = crate::now_utc_ns();
                    match ControlMessage::decode(bytes.freeze()) {
                        Ok(ControlMessage { body: Some(Body::Ping(ping)) }) => {
                            if let Some((pong, completed)) = clock.on_ping(&ping, received_ns, crate::now_utc_ns()) {
                                let _ = pong_tx.try_send(pong);
                                if let Some(exchange) = completed {
                                    clock_exchange(ctx, &vehicle, &online.clock, &exchange);
                                }
                            }
                        }
                        Ok(_) => {} // nothing else is expected from the agent; ignore
                        Err(e) => break Err(refuse(CloseCode::Malformed, format!("control message: {e}"))),
                    }
                }
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

/// Pongs waiting to be written at most.
const PONG_QUEUE: usize = 4;
/// Event acknowledgements waiting to be written at most (the ED sees "not delivered" beyond).
const EVENT_ACK_QUEUE: usize = 64;

/// A completed clock exchange of `vehicle`: into its estimate, and the estimate to the
/// detector.
fn clock_exchange(
    ctx: &QuicContext,
    vehicle: &str,
    clock: &super::registry::SharedClock,
    exchange: &relay_proto::clock::Exchange,
) {
    let estimate = {
        let mut filter = clock.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = filter.add_exchange(exchange) {
            tracing::debug!(vehicle, error = %e, "clock exchange not usable");
            return;
        }
        filter.estimate()
    };
    if let Some(estimate) = estimate {
        ctx.watch.check(|d| d.on_clock(vehicle, &estimate));
    }
}

/// What every frame stream of one session is read against.
#[derive(Clone)]
struct FrameReader {
    /// This vehicle's read budget and everyone's (bytes).
    budget: Arc<Semaphore>,
    reading: Arc<Semaphore>,
    max: usize,
    /// Packed waveform frames are decoded (the HelloAck said so).
    decode_waveform_codec: bool,
    deadline: Duration,
    streams: Arc<HashMap<u32, StreamDescriptor>>,
    vehicle: Arc<str>,
    session: u64,
    writer: mpsc::Sender<WriterCmd>,
    watch: crate::detect::Watch,
    /// The vehicle's clock offset estimate.
    clock: super::registry::SharedClock,
    early: EarlySource,
}

impl FrameReader {
    /// Turns a packed waveform chunk into samples, so everything after this (detector,
    /// store, subscribers) sees one form. A packed chunk may not expand to more samples than
    /// a plain frame of the size bound could hold (a sample takes at least a byte there).
    fn unpack(&self, frame: &mut Frame) -> Result<(), Refusal> {
        let (Some(Payload::Waveform(chunk)), Some(info)) = (
            frame.payload.as_mut(),
            self.streams
                .get(&frame.stream_id)
                .and_then(|d| d.waveform.as_ref()),
        ) else {
            return Ok(());
        };
        if chunk.packed.is_empty() {
            metrics::counter!("relay_ingest_waveform_frames_total", "encoding" => "samples")
                .increment(1);
            return Ok(());
        }
        if !self.decode_waveform_codec {
            return Err(refuse(
                CloseCode::Malformed,
                format!(
                    "stream {} seq {}: packed waveform, and this ingest said it takes samples",
                    frame.stream_id, frame.seq
                ),
            ));
        }
        relay_proto::waveform::unpack(chunk, info, self.max).map_err(|e| {
            refuse(
                CloseCode::Malformed,
                format!("stream {} seq {}: {e}", frame.stream_id, frame.seq),
            )
        })?;
        metrics::counter!("relay_ingest_waveform_frames_total", "encoding" => "lpc1").increment(1);
        Ok(())
    }

    /// Reads one frame stream within its size bound and deadline, validates the frame and
    /// hands it to the store writer; `ack` learns when it is durable.
    async fn read_frame(
        &self,
        mut recv: quinn::RecvStream,
        ack: mpsc::Sender<(u32, u64)>,
    ) -> Result<(), Refusal> {
        let max = self.max;
        // A stream that never finishes must not hold its buffers for ever; the budget is
        // reserved before anything is read (the wait counts against the same deadline).
        let read = async {
            let permits = u32::try_from(max).unwrap_or(u32::MAX);
            let mine = self.budget.clone().acquire_many_owned(permits).await;
            let all = self.reading.clone().acquire_many_owned(permits).await;
            let budget: Vec<_> = mine.into_iter().chain(all).collect();
            (recv.read_to_end(max).await, budget)
        };
        let (bytes, mut budget) = match tokio::time::timeout(self.deadline, read).await {
            Err(_) => {
                let _ = recv.stop(quinn::VarInt::from_u32(STOP_DEADLINE));
                metrics::counter!("relay_ingest_streams_stopped_total", "reason" => "deadline")
                    .increment(1);
                return Ok(());
            }
            Ok((Ok(b), budget)) => (b, budget),
            Ok((Err(quinn::ReadToEndError::TooLong), _)) => {
                return Err(refuse(
                    CloseCode::FrameTooLarge,
                    format!("frame larger than {max} bytes"),
                ));
            }
            Ok((Err(_), _)) => return Ok(()), // stream reset or connection lost: the agent re-sends
        };
        metrics::counter!("relay_ingest_frame_bytes_total").increment(bytes.len() as u64);
        // Read: what the frame holds is its size, not the most a frame may have. The rest goes
        // back, so frames waiting for a slow commit (a log electing its leader) do not stop
        // this vehicle's reading long before the writer's queue is full.
        let holds = bytes.len().max(1);
        for permit in &mut budget {
            if let Some(spare) = permit.num_permits().checked_sub(holds) {
                drop(permit.split(spare));
            }
        }
        let mut frame = Frame::decode(bytes.as_slice())
            .map_err(|e| refuse(CloseCode::Malformed, format!("undecodable frame: {e}")))?;
        validate_frame(&frame, &self.streams)?;
        self.unpack(&mut frame)?;
        metrics::counter!("relay_ingest_frames_received_total").increment(1);
        let received_ns = crate::now_utc_ns();
        let vehicle_clock = self
            .clock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .estimate();
        let offset = vehicle_clock.as_ref().map(|c| c.offset_ns);
        let capture_time_check = match self.streams.get(&frame.stream_id) {
            Some(desc) => {
                let (vehicle, session) = (&self.vehicle, self.session);
                self.watch
                    .judge(|d| d.on_frame(received_ns, offset, vehicle, session, desc, &frame))
            }
            None => TimestampCheck::Unspecified, // validation refuses such frames
        };
        if ack.capacity() == 0 {
            // The agent does not read its acknowledgements: stop taking its frames.
            return Err(refuse(
                CloseCode::Overloaded,
                "acknowledgements not drained",
            ));
        }
        if let Some(desc) = self.streams.get(&frame.stream_id) {
            let record = || DataRecord {
                stream: Some(StreamRef {
                    vehicle_id: self.vehicle.to_string(),
                    session_id: self.session,
                    stream_id: frame.stream_id,
                    kind: desc.kind,
                }),
                frame: Some(frame.clone()),
                late: false,
                received_time_ns: received_ns,
                vehicle_clock,
                capture_time_check: capture_time_check as i32,
            };
            self.early.offer(
                &self.vehicle,
                self.session,
                desc.kind,
                record,
                frame.seq,
                frame.stream_id,
            );
        }
        let cmd = WriterCmd::Frame {
            vehicle: self.vehicle.clone(),
            session: self.session,
            frame,
            received_ns,
            vehicle_clock,
            capture_time_check,
            ack,
            budget,
        };
        self.writer
            .send(cmd)
            .await
            .map_err(|_| refuse(CloseCode::ServerShutdown, "store closed"))
    }
}

/// Writes the acknowledgements the [`AckCoalescer`] forms from durable (stream, seq).
async fn write_acks(
    mut rx: mpsc::Receiver<(u32, u64)>,
    mut pongs: mpsc::Receiver<Pong>,
    mut event_acks: mpsc::Receiver<relay_proto::wire::v1::EventAck>,
    mut out: FramedWrite<quinn::SendStream, LengthDelimitedCodec>,
) {
    let mut acks = AckCoalescer::new(ACK_COALESCE, MAX_ACK_SEQS);
    let mut open = true;
    while open {
        let due = acks.poll_timeout();
        tokio::select! {
            durable = rx.recv() => match durable {
                Some((stream_id, seq)) => acks.handle_durable(Instant::now(), stream_id, seq),
                None => open = false,
            },
            Some(pong) = pongs.recv() => {
                let msg = ControlMessage {
                    body: Some(Body::Pong(pong)),
                };
                if out.send(Bytes::from(msg.encode_to_vec())).await.is_err() {
                    return;
                }
            }
            Some(ack) = event_acks.recv() => {
                let msg = ControlMessage {
                    body: Some(Body::EventAck(ack)),
                };
                if out.send(Bytes::from(msg.encode_to_vec())).await.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {}
        }
        let ack = if open {
            acks.poll_ack(Instant::now())
        } else {
            acks.flush()
        };
        if let Some(ack) = ack {
            let msg = ControlMessage {
                body: Some(Body::Ack(ack)),
            };
            if out.send(Bytes::from(msg.encode_to_vec())).await.is_err() {
                return;
            }
        }
    }
}
