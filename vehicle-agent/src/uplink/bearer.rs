//! One bearer: its QUIC endpoint on its own address or interface, connection attempts paced
//! by the sans-IO [`Redial`] policy, the Hello exchange of [`ClientHandshake`], and, while
//! connected, acknowledgements in and path statistics into the scheduler's health estimate.

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use prost::Message;
use rand::Rng;
use relay_proto::clock::Exchange;
use relay_proto::wire::v1::{ControlMessage, Hello, control_message::Body};
use relay_proto::{CloseCode, MAX_CONTROL_MESSAGE_BYTES};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

use super::dispatch::cancel_copy;
use super::{Shared, UplinkError, lock};
use crate::clock::{ClockSync, PING_INTERVAL, WallClock};
use crate::config::{AgentConfig, BearerConfig};
use crate::handshake::{ClientHandshake, HandshakeError};
use crate::health::PathSample;
use crate::redial::{DialOutcome, Redial, RedialConfig};
use crate::scheduler::Action;

/// How often quinn's statistics of each connection are read into the health estimate.
const STATS_INTERVAL: Duration = Duration::from_millis(20);
/// Connection attempts in progress per bearer at most while dialling.
const MAX_CONCURRENT_DIALS: usize = 8;
/// How long a stopping bearer waits for its endpoint's connections to close.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

fn control_codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_CONTROL_MESSAGE_BYTES)
        .new_codec()
}

/// The redial policy's timing from the agent's configuration.
pub fn redial_config(cfg: &AgentConfig) -> RedialConfig {
    RedialConfig {
        initial_backoff: cfg.reconnect.initial_backoff,
        max_backoff: cfg.reconnect.max_backoff,
        redial_interval: cfg.reconnect.redial_interval,
        max_in_flight: MAX_CONCURRENT_DIALS,
    }
}

/// One bearer: binds its socket, connects, reconnects by its redial policy.
pub(super) struct BearerTask {
    pub(super) index: usize,
    pub(super) bearer: BearerConfig,
    pub(super) cfg: Arc<AgentConfig>,
    pub(super) client: Arc<crate::tls::ReloadingClientConfig>,
    pub(super) hello: Hello,
    pub(super) shared: Arc<Shared>,
    pub(super) wall: WallClock,
}

/// A QUIC endpoint on this bearer's own address or interface.
fn bearer_endpoint(b: &BearerConfig) -> std::io::Result<quinn::Endpoint> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(b.bind),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    if let Some(interface) = &b.interface {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        socket.bind_device(Some(interface.as_bytes()))?;
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        return Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            format!("binding to interface {interface} needs Linux"),
        ));
    }
    socket.bind(&b.bind.into())?;
    socket.set_nonblocking(true)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for QUIC"))?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket.into(),
        runtime,
    )
}

type ControlReader = FramedRead<quinn::RecvStream, LengthDelimitedCodec>;
type ControlWriter = FramedWrite<quinn::SendStream, LengthDelimitedCodec>;

/// A connection that finished its handshake and Hello. The control writer is kept: dropping
/// it would finish the control stream, which ends the session at the ingest.
struct Dialed {
    conn: quinn::Connection,
    reader: ControlReader,
    writer: ControlWriter,
    /// Clock exchanges of this connection, the Hello's done.
    clock: ClockSync,
    hello_exchange: Exchange,
    /// What the HelloAck listed.
    waveform_encodings: Vec<i32>,
}

/// One connection attempt: QUIC handshake, Hello, HelloAck, all within `timeout`.
async fn dial(
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    remote: std::net::SocketAddr,
    server_name: String,
    hello: Hello,
    timeout: Duration,
    wall: WallClock,
) -> Result<Dialed, UplinkError> {
    let mut hs = ClientHandshake::new(&hello, Instant::now(), timeout);
    let deadline = hs.poll_timeout();
    let connecting = endpoint.connect_with(client, remote, &server_name)?;
    let conn = tokio::time::timeout_at(deadline, connecting)
        .await
        .map_err(|_| HandshakeError::Timeout)??;
    let (send, recv) = conn.open_bi().await?;
    let mut writer = FramedWrite::new(send, control_codec());
    let mut reader = FramedRead::new(recv, control_codec());
    let hello_sent_ns = wall.now_ns();
    if let Some(hello) = hs.poll_transmit(hello_sent_ns) {
        writer
            .send(hello)
            .await
            .map_err(UplinkError::ControlStream)?;
    }
    let reply = tokio::select! {
        r = tokio::time::timeout_at(deadline, reader.next()) => r.map_err(|_| HandshakeError::Timeout)?,
        e = conn.closed() => return Err(refusal(e)),
    };
    match reply {
        Some(Ok(bytes)) => {
            let received_ns = wall.now_ns();
            let ack = hs.handle_message(&bytes)?;
            let (clock, hello_exchange) = ClockSync::after_hello(
                Instant::now(),
                PING_INTERVAL,
                hello_sent_ns,
                &ack,
                received_ns,
            );
            Ok(Dialed {
                conn,
                reader,
                writer,
                clock,
                hello_exchange,
                waveform_encodings: ack.waveform_encodings,
            })
        }
        Some(Err(e)) => Err(UplinkError::ControlStream(e)),
        None => Err(refusal(conn.closed().await)),
    }
}

impl BearerTask {
    pub(super) async fn run(self, shutdown: CancellationToken) {
        let label = [("bearer", self.bearer.name.clone())];
        let cfg = &self.cfg;
        let handshake = cfg.reconnect.handshake_timeout;
        // Ingest nodes in turn: the next after a failed dial or a lost connection.
        let remotes = self.bearer.remotes(&cfg.ingest);
        let mut current = 0usize;
        let mut redial = Redial::new(redial_config(cfg), Instant::now());
        let mut endpoint: Option<quinn::Endpoint> = None;
        let mut generation = 0u64;
        let mut dials = JoinSet::new();
        let failed = |e: &UplinkError| {
            metrics::counter!("relay_agent_connect_failures_total", "reason" => e.label())
                .increment(1);
            if let UplinkError::Refused { code, .. } = e {
                // What the ingest held against us: a quota, a revoked certificate, ...
                let code = code.map_or("unknown", CloseCode::label);
                metrics::counter!("relay_agent_refusals_total", "code" => code).increment(1);
            }
            metrics::counter!("relay_agent_bearer_connect_failures_total", &label).increment(1);
        };
        loop {
            let now = Instant::now();
            while redial.poll_dial(now) {
                let ep = match &endpoint {
                    Some(e) => e.clone(),
                    None => match bearer_endpoint(&self.bearer) {
                        Ok(e) => {
                            endpoint = Some(e.clone());
                            e
                        }
                        Err(e) => {
                            // The modem or its interface may not exist yet: try again later.
                            let e = UplinkError::Bind(e);
                            failed(&e);
                            tracing::warn!(bearer = %self.bearer.name, error = %e, "cannot bind bearer");
                            redial.handle_outcome(now, DialOutcome::BindFailed, 1.0);
                            break;
                        }
                    },
                };
                dials.spawn(dial(
                    ep,
                    self.client.current(),
                    remotes[current % remotes.len()],
                    cfg.ingest.server_name.clone(),
                    self.hello.clone(),
                    handshake,
                    self.wall,
                ));
            }
            let wake = redial.poll_timeout();
            tokio::select! {
                () = tokio::time::sleep_until(wake.unwrap_or(now)), if wake.is_some() => {}
                Some(r) = dials.join_next(), if !dials.is_empty() => {
                    let now = Instant::now();
                    match r {
                        Ok(Ok(d)) => {
                            // The other attempts are abandoned.
                            dials = JoinSet::new();
                            redial.handle_outcome(now, DialOutcome::Connected, 1.0);
                            generation += 1;
                            let served = tokio::select! {
                                r = self.serve(d, generation) => r,
                                () = shutdown.cancelled() => break,
                            };
                            if let Err(e) = served {
                                failed(&e);
                                tracing::warn!(bearer = %self.bearer.name, error = %e, "bearer lost; dialling again");
                                current += 1;
                            }
                            redial.handle_disconnected(Instant::now());
                        }
                        Ok(Err(e)) if e.is_silence() => {
                            failed(&e);
                            current += 1;
                            redial.handle_outcome(now, DialOutcome::Silent, 1.0);
                        }
                        Ok(Err(e)) => {
                            failed(&e);
                            current += 1;
                            dials = JoinSet::new();
                            let jitter = rand::rng().random_range(0.8..1.2);
                            tracing::warn!(bearer = %self.bearer.name, error = %e, backoff_ms = redial.backoff().as_millis() as u64, "bearer refused; will reconnect");
                            redial.handle_outcome(now, DialOutcome::Refused, jitter);
                        }
                        // An attempt that panicked tells nothing about the path.
                        Err(_) => redial.handle_outcome(now, DialOutcome::Silent, 1.0),
                    }
                }
                () = shutdown.cancelled() => break,
            }
        }
        redial.stop();
        drop(dials);
        if let Some(e) = endpoint {
            e.close(
                quinn::VarInt::from_u32(CloseCode::Normal.as_u32()),
                b"agent stopping",
            );
            let _ = tokio::time::timeout(CLOSE_GRACE, e.wait_idle()).await;
        }
    }

    /// Carries frames and takes acknowledgements on an established connection until it ends.
    async fn serve(&self, dialed: Dialed, generation: u64) -> Result<(), UplinkError> {
        let (shared, index) = (&self.shared, self.index);
        let Dialed {
            conn,
            mut reader,
            mut writer,
            mut clock,
            hello_exchange,
            waveform_encodings,
        } = dialed;
        shared.clock_exchange(&hello_exchange);
        tracing::info!(bearer = %self.bearer.name, remote = %conn.remote_address(), "bearer connected to ingest");
        metrics::counter!("relay_agent_connects_total").increment(1);
        // Waveform encodings this ingest does not decode travel as plain samples to it.
        let plain_waveforms = shared
            .packed_streams
            .values()
            .any(|w| !waveform_encodings.contains(&w.encoding));
        if plain_waveforms {
            tracing::warn!(bearer = %self.bearer.name, "the ingest does not decode the configured waveform encoding; sending plain samples to it");
        }
        *lock(&shared.conns[index]) = Some(super::Live {
            generation,
            conn: conn.clone(),
            plain_waveforms,
        });
        shared
            .sched()
            .on_connected(index, generation, Instant::now());
        shared.wake.notify_one();
        let stats = tokio::spawn(poll_stats(conn.clone(), shared.clone(), index));

        let result = loop {
            if let Some(ping) = clock.poll_ping(Instant::now(), self.wall.now_ns()) {
                let msg = ControlMessage {
                    body: Some(Body::Ping(ping)),
                };
                // A control stream that takes a while to write is a slow path, not an error;
                // the ingest's reads of frames do not wait on it.
                if let Err(e) = writer.send(bytes::Bytes::from(msg.encode_to_vec())).await {
                    break Err(conn
                        .close_reason()
                        .map_or(UplinkError::ControlStream(e), refusal));
                }
            }
            let ping_due = clock.poll_timeout();
            tokio::select! {
                () = tokio::time::sleep_until(ping_due) => {}
                msg = reader.next() => match msg {
                    Some(Ok(bytes)) => match ControlMessage::decode(bytes.freeze()) {
                        Ok(ControlMessage { body: Some(Body::Ack(ack)) }) => handle_ack(shared, index, &ack).await,
                        Ok(ControlMessage { body: Some(Body::EventAck(ack)) }) => {
                            // Only for this session's events stream (a stale ack names another).
                            if let Some((id, acks)) = &shared.event_acks
                                && ack.stream_id == *id
                                && ack.session_id == self.hello.session_id
                            {
                                crate::events::record_ack(acks, ack);
                            }
                        }
                        Ok(ControlMessage { body: Some(Body::Pong(pong)) }) => {
                            if let Some(exchange) = clock.on_pong(&pong, self.wall.now_ns()) {
                                shared.clock_exchange(&exchange);
                            }
                        }
                        Ok(other) => tracing::debug!(?other, "ignoring control message"),
                        Err(e) => break Err(UplinkError::Undecodable(e)),
                    },
                    // Tell why the ingest closed, when it did, rather than "connection lost".
                    Some(Err(e)) => break Err(conn.close_reason().map_or(UplinkError::ControlStream(e), refusal)),
                    None => break Err(refusal(conn.closed().await)),
                },
                e = conn.closed() => break Err(refusal(e)),
            }
        };
        stats.abort();
        {
            let mut c = lock(&shared.conns[index]);
            if c.as_ref().is_some_and(|l| l.generation == generation) {
                *c = None;
            }
        }
        shared.sched().on_disconnected(index, generation);
        shared.wake.notify_one();
        result
    }
}

/// Feeds quinn's path statistics into the bearer's health; anything received wakes the
/// dispatcher (a suspect bearer may be up again).
async fn poll_stats(conn: quinn::Connection, shared: Arc<Shared>, index: usize) {
    let mut tick = tokio::time::interval(STATS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_rx = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            // Ends with its connection even when the bearer task was dropped mid-serve.
            _ = conn.closed() => return,
        }
        let st = conn.stats();
        let sample = PathSample {
            rtt: st.path.rtt,
            cwnd: st.path.cwnd,
            lost_packets: st.path.lost_packets,
            sent_packets: st.path.sent_packets,
            rx_datagrams: st.udp_rx.datagrams,
        };
        shared.sched().on_path(index, sample, Instant::now());
        if sample.rx_datagrams != last_rx {
            last_rx = sample.rx_datagrams;
            shared.wake.notify_one();
        }
    }
}

/// Why a connection ended, naming the ingest's close code when it closed it.
fn refusal(e: quinn::ConnectionError) -> UplinkError {
    match &e {
        quinn::ConnectionError::ApplicationClosed(close) => UplinkError::Refused {
            code: CloseCode::from_u64(close.error_code.into_inner()),
            reason: String::from_utf8_lossy(&close.reason).into_owned(),
        },
        _ => UplinkError::Connection(e),
    }
}

pub(super) async fn handle_ack(shared: &Shared, bearer: usize, ack: &relay_proto::wire::v1::Ack) {
    let now = Instant::now();
    let mut released = Vec::new();
    let mut cancels = Vec::new();
    {
        let mut s = shared.sched();
        let ranges: Vec<(u32, u64, u64)> = ack
            .streams
            .iter()
            .flat_map(|st| st.ranges.iter().map(|r| (st.stream_id, r.start, r.end)))
            .collect();
        let a = s.on_ack(bearer, &ranges, now);
        if a.bogus > 0 {
            metrics::counter!("relay_agent_bogus_acked_frames_total").increment(a.bogus);
            tracing::warn!(
                bearer = %shared.names.get(bearer).map_or("?", String::as_str),
                frames = a.bogus,
                "ignored an acknowledgement for frames never sent on this connection"
            );
        }
        released.extend(a.released);
        cancels.extend(a.cancels);
        if s.is_empty() {
            shared.drained.notify_one();
        }
    }
    for c in cancels {
        if let Action::Cancel { bearer, id, .. } = c {
            cancel_copy(shared, bearer, id);
        }
    }
    for (_, _, latency) in &released {
        if let Some(l) = latency {
            metrics::histogram!("relay_agent_ack_latency_seconds").record(l.as_secs_f64());
        }
    }
    metrics::counter!("relay_agent_frames_acked_total").increment(released.len() as u64);
    let deleted = shared
        .spool
        .delete(released.into_iter().map(|(id, _, _)| id))
        .await;
    if let Err(e) = deleted {
        shared.spool_lost(e);
    }
    shared.wake.notify_one();
}
