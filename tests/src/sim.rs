//! A deterministic, virtual-time simulation of the whole relay path, in the manner of
//! quinn-proto's `Pair`: the agent's real sans-IO machines (framer, [`Scheduler`] with its
//! bearer health, [`Redial`], the redb [`Spool`]) send through the emulator's link model
//! ([`Direction`], driven by fixed rates or the Mahimahi traces) to the ingest's real
//! [`Reassembler`] and [`AckCoalescer`]; acknowledgements come back through the downlinks.
//!
//! Between the machines sits a small model of what quinn does on one connection: a frame copy
//! is cut into packets of at most [`PACKET_PAYLOAD`] bytes; every packet the ingest receives is
//! answered by a QUIC acknowledgement (the RTT samples and liveness the health estimator
//! reads); lost packets are sent again after a probe timeout that doubles while they stay lost;
//! keep-alives go out every probe interval; a connection that hears nothing for the idle
//! timeout is closed, and the bearer redials with a four-leg handshake (Initial, server
//! handshake, Hello, HelloAck), each attempt bounded by the handshake timeout.
//!
//! Time never comes from a clock: the loop steps to the earliest of every machine's next
//! timeout and its own event queue, so a ten-minute drive runs in seconds, and the same seed
//! gives the same run.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use hospital_ingest::quic::acks::{AckCoalescer, MAX_ACK_SEQS};
use hospital_ingest::reassembly::{Arrival, Limits, Output, Reassembler, StreamKey};
use prost::Message;
use relay_emulator::BearerSpec;
use relay_emulator::model::{Direction, Offer};
use relay_proto::model::{
    ChannelInfo, Frame, StreamDescriptor, StreamKind, WaveformInfo, frame::Payload,
};
use relay_proto::wire::v1::Ack;
use relay_wfdb::Record;
use tokio::time::Instant;
use vehicle_agent::config::AgentConfig;
use vehicle_agent::framer::WaveformFramer;
use vehicle_agent::health::PathSample;
use vehicle_agent::redial::{DialOutcome, Redial};
use vehicle_agent::scheduler::{Action, FrameId, Scheduler, Transmit};
use vehicle_agent::spool::{Spool, SpoolCmd};
use vehicle_agent::uplink::{redial_config, scheduler_config};

/// Payload bytes per simulated QUIC packet.
pub const PACKET_PAYLOAD: usize = 1200;
/// Bytes of headers, framing and AEAD tag added to every packet.
const PACKET_OVERHEAD: usize = 48;
/// Size of a packet that carries only acknowledgements, a ping or a handshake answer's tail.
const SMALL_PACKET: usize = 60;
/// Size of a handshake packet (Initial and the server's certificate flight).
const HANDSHAKE_PACKET: usize = 1200;
/// quinn's initial RTT estimate, used for probe timeouts before any sample.
const INITIAL_RTT: Duration = Duration::from_millis(333);
/// Added to probe timeouts (QUIC's max_ack_delay).
const MAX_ACK_DELAY: Duration = Duration::from_millis(25);
/// Congestion window the health estimator is shown (the relay's load is far below it).
const CWND: u64 = 256 * 1024;
/// How often the shell reads quinn's statistics.
const STATS_INTERVAL: Duration = Duration::from_millis(20);
/// The ingest's store commit (batch and fsync) after a frame arrives.
const COMMIT_DELAY: Duration = Duration::from_millis(3);
/// How long the ingest gathers acknowledgements.
const ACK_COALESCE: Duration = Duration::from_millis(5);
/// Iterations at one instant before the loop is declared stuck.
const MAX_ROUNDS_AT_ONE_INSTANT: u32 = 100_000;

/// The only stream of the simulated vehicle: a replayed WFDB record.
pub const ECG: u32 = 0;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// One entry per bearer.
    pub bearers: Vec<BearerSpec>,
    /// The agent's configuration (scheduling, reconnect, framing, spool timing).
    pub agent: AgentConfig,
    /// Replay speed of the record (3.0: three seconds of signal per second).
    pub speed: f64,
    /// The ingest's reassembly limits.
    pub limits: Limits,
    /// Seeds the links' random choices.
    pub seed: u64,
}

impl SimConfig {
    /// Defaults of the agent and ingest over the given bearers.
    pub fn new(bearers: Vec<BearerSpec>) -> Self {
        let ingest = hospital_ingest::IngestConfig::default();
        Self {
            bearers,
            agent: AgentConfig::default(),
            speed: 1.0,
            limits: Limits {
                reorder_window: ingest.reassembly.reorder_window,
                max_held: ingest.reassembly.max_held_frames,
                max_gaps: ingest.reassembly.max_open_gaps,
            },
            seed: 1,
        }
    }
}

/// What a subscriber of the simulated ingest received, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Received {
    /// A data record.
    Frame {
        /// Arrival at the subscriber (virtual time since the start).
        at: Duration,
        /// Its sequence number.
        seq: u64,
        /// Whether it filled an announced gap.
        late: bool,
        /// The frame as the ingest decoded it.
        frame: Frame,
    },
    /// A gap record for `[start, end)`.
    Gap {
        /// Arrival at the subscriber.
        at: Duration,
        /// First missing seq.
        start: u64,
        /// One past the last missing seq.
        end: u64,
    },
    /// The gap `[start, end)` is complete.
    GapClosed {
        /// Arrival at the subscriber.
        at: Duration,
        /// First seq of the gap.
        start: u64,
        /// One past its last seq.
        end: u64,
    },
}

/// A frame the simulated source produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Produced {
    /// Its sequence number.
    pub seq: u64,
    /// When it was complete (virtual time): the first moment it could leave.
    pub at: Duration,
    /// Index of its first sample in the record.
    pub first_sample: u64,
    /// Samples per channel it carries.
    pub samples: u32,
}

/// Counters of one simulated bearer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BearerStats {
    /// Packets offered to the uplink.
    pub packets_sent: u64,
    /// Packets sent again after a probe timeout.
    pub packets_lost: u64,
    /// Frame copies started.
    pub copies: u64,
    /// Connections established.
    pub connects: u64,
    /// Connections closed by the idle timeout.
    pub idle_closes: u64,
}

#[derive(Debug, Clone)]
enum Packet {
    /// Part of a frame copy, agent to ingest.
    Part {
        copy: u64,
        part: u32,
    },
    /// QUIC acknowledgement, ingest to agent, of a packet sent at `sent_at`.
    QuicAck {
        sent_at: Duration,
    },
    /// Keep-alive, agent to ingest.
    Ping,
    /// The relay's acknowledgement on the control stream, ingest to agent.
    Control {
        ack: Ack,
    },
    /// Handshake legs of dial attempt `attempt`.
    Initial {
        attempt: u64,
    },
    ServerFlight {
        attempt: u64,
    },
    Hello {
        attempt: u64,
    },
    HelloAck {
        attempt: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    Up,
    Down,
}

/// A packet sent on a connection that QUIC delivers reliably (resent after a probe timeout).
#[derive(Debug)]
struct Reliable {
    bearer: usize,
    generation: u64,
    way: Way,
    packet: Packet,
    size: usize,
    pto: Duration,
}

/// What the ingest's reassembler holds per frame: the frame and where to acknowledge it
/// (bearer, connection generation).
type Held = (FrameId, Frame, Vec<(usize, u64)>);

#[derive(Debug)]
struct Copy {
    bearer: usize,
    generation: u64,
    id: FrameId,
    bytes: Bytes,
    parts: u32,
    received: HashSet<u32>,
    cancelled: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Produce,
    Stats(usize),
    Probe(usize, u64),
    Retransmit(u64),
    DialTimeout(usize, u64),
    IngestCommit,
    SpoolCommit,
    Cut(usize),
    Restore(usize),
    Crash,
    Restart,
}

#[derive(Debug)]
struct SimBearer {
    up: Direction,
    down: Direction,
    redial: Redial,
    /// Current connection generation, if connected.
    connected: Option<u64>,
    generation: u64,
    last_heard: Duration,
    rx_datagrams: u64,
    sent_packets: u64,
    lost_packets: u64,
    rtt: Option<Duration>,
    /// Dial attempts in flight: id -> started.
    attempts: HashMap<u64, Duration>,
    /// Acknowledgements gathering at the ingest, per connection generation.
    acks: HashMap<u64, AckCoalescer>,
    stats: BearerStats,
}

/// The agent's state that a crash loses.
#[derive(Debug)]
struct AgentState {
    sched: Scheduler,
    /// Produced frames waiting for their sequence number's durable reservation.
    intake: VecDeque<(FrameId, Bytes)>,
    /// Puts and deletes since the last spool commit.
    spool_batch: Vec<SpoolCmd>,
    reserved: HashMap<u32, u64>,
    /// Added to the framer's sequence numbers (a resumed session continues).
    seq_base: u64,
}

/// The simulation.
#[derive(Debug)]
pub struct Sim {
    cfg: SimConfig,
    t0: Instant,
    now: Duration,
    events: BinaryHeap<Reverse<(Duration, u64, Event)>>,
    next_event: u64,
    bearers: Vec<SimBearer>,
    record: Record,
    framer: WaveformFramer,
    /// Frames are produced until this time.
    produce_until: Duration,
    /// When the running source started (its sample 0).
    source_start: Duration,
    produced: Vec<Produced>,
    agent: Option<AgentState>,
    spool: Option<Spool>,
    spool_path: PathBuf,
    _spool_dir: tempfile::TempDir,
    next_packet: u64,
    /// Packets on the links: id -> (bearer, connection generation, sent at, what).
    packets: HashMap<u64, (usize, u64, Duration, Packet)>,
    reliable: HashMap<u64, Reliable>,
    copies: HashMap<u64, Copy>,
    /// Latest copy per (bearer, frame), to cancel it.
    copy_of: HashMap<(usize, FrameId), u64>,
    next_copy: u64,
    next_attempt: u64,
    // Ingest.
    key: StreamKey,
    reassembler: Reassembler<Held>,
    stored: HashSet<u64>,
    /// Frames waiting for the store commit: (frame, where to acknowledge it).
    committing: Vec<(Frame, usize, u64)>,
    received: Vec<Received>,
    duplicates_at_ingest: u64,
    /// Frames the agent's scheduler refused to release from untrusted acknowledgements.
    bogus_acked: u64,
    /// Bearers whose next connection first receives an acknowledgement of `[0, 2^40)`.
    fake_ack_on_connect: HashSet<usize>,
}

fn descriptor(record: &Record) -> StreamDescriptor {
    StreamDescriptor {
        stream_id: ECG,
        kind: StreamKind::Waveform as i32,
        name: "ecg".into(),
        waveform: Some(WaveformInfo {
            sample_rate_hz: record.header.sampling_frequency,
            channels: record
                .header
                .signals
                .iter()
                .map(|s| ChannelInfo {
                    name: s.description.clone(),
                    gain: s.gain,
                    ..ChannelInfo::default()
                })
                .collect(),
            source: "sim".into(),
            ..WaveformInfo::default()
        }),
    }
}

impl Sim {
    /// A vehicle replaying `record` over `cfg.bearers` to one ingest, starting at virtual
    /// time zero with every bearer dialling.
    pub fn new(cfg: SimConfig, record: &Path) -> Self {
        let record = relay_wfdb::read_record(record).unwrap();
        let t0 = Instant::now();
        let spool_dir = tempfile::tempdir().unwrap();
        let spool_path = spool_dir.path().join("spool.redb");
        let (spool, opened) = Spool::open(&spool_path, &[descriptor(&record)]).unwrap();
        let bearers = cfg
            .bearers
            .iter()
            .enumerate()
            .map(|(i, spec)| SimBearer {
                up: Direction::new(spec.up.clone(), cfg.seed.wrapping_mul(31) + 2 * i as u64),
                down: Direction::new(
                    spec.down.clone(),
                    cfg.seed.wrapping_mul(31) + 2 * i as u64 + 1,
                ),
                redial: Redial::new(redial_config(&cfg.agent), t0),
                connected: None,
                generation: 0,
                last_heard: Duration::ZERO,
                rx_datagrams: 0,
                sent_packets: 0,
                lost_packets: 0,
                rtt: None,
                attempts: HashMap::new(),
                acks: HashMap::new(),
                stats: BearerStats::default(),
            })
            .collect();
        let framer = WaveformFramer::new(
            ECG,
            record.num_signals(),
            record.header.sampling_frequency,
            cfg.agent.framing.frame,
            1_700_000_000_000_000_000,
        );
        let agent = AgentState {
            sched: Scheduler::new(
                scheduler_config(&cfg.agent),
                cfg.bearers.iter().map(|_| None).collect(),
                t0,
            ),
            intake: VecDeque::new(),
            spool_batch: Vec::new(),
            reserved: spool.reserved(),
            seq_base: opened.seq_base.get(&ECG).copied().unwrap_or(0),
        };
        let mut sim = Self {
            t0,
            now: Duration::ZERO,
            events: BinaryHeap::new(),
            next_event: 0,
            bearers,
            record,
            framer,
            produce_until: Duration::MAX,
            source_start: Duration::ZERO,
            produced: Vec::new(),
            agent: Some(agent),
            spool: Some(spool),
            spool_path,
            _spool_dir: spool_dir,
            next_packet: 0,
            packets: HashMap::new(),
            reliable: HashMap::new(),
            copies: HashMap::new(),
            copy_of: HashMap::new(),
            next_copy: 0,
            next_attempt: 0,
            key: StreamKey {
                vehicle: "amb-sim".into(),
                session: opened.session_id,
                stream_id: ECG,
            },
            reassembler: Reassembler::new(cfg.limits),
            stored: HashSet::new(),
            committing: Vec::new(),
            received: Vec::new(),
            duplicates_at_ingest: 0,
            bogus_acked: 0,
            fake_ack_on_connect: HashSet::new(),
            cfg,
        };
        sim.schedule_produce();
        sim.at(sim.cfg.agent.spool.sync_interval, Event::SpoolCommit);
        for b in 0..sim.bearers.len() {
            sim.at(STATS_INTERVAL, Event::Stats(b));
        }
        sim
    }

    fn at(&mut self, t: Duration, e: Event) {
        self.next_event += 1;
        self.events.push(Reverse((t, self.next_event, e)));
    }

    fn instant(&self, t: Duration) -> Instant {
        self.t0 + t
    }

    /// Virtual time since the start.
    pub fn now(&self) -> Duration {
        self.now
    }

    /// Cuts bearer `b` (both directions) at `t`.
    pub fn cut_at(&mut self, t: Duration, b: usize) {
        self.at(t, Event::Cut(b));
    }

    /// Restores bearer `b` at `t`.
    pub fn restore_at(&mut self, t: Duration, b: usize) {
        self.at(t, Event::Restore(b));
    }

    /// Kills the agent at `t` (everything not committed to the spool is lost) and starts it
    /// again on its spool `downtime` later.
    pub fn crash_at(&mut self, t: Duration, downtime: Duration) {
        self.at(t, Event::Crash);
        self.at(t + downtime, Event::Restart);
    }

    /// The source stops producing at `t`.
    pub fn stop_producing_at(&mut self, t: Duration) {
        self.produce_until = t;
    }

    /// Frames produced so far.
    pub fn produced(&self) -> &[Produced] {
        &self.produced
    }

    /// What the subscriber received so far.
    pub fn received(&self) -> &[Received] {
        &self.received
    }

    /// The record being replayed.
    pub fn record(&self) -> &Record {
        &self.record
    }

    /// Counters of bearer `b`.
    pub fn bearer_stats(&self, b: usize) -> BearerStats {
        self.bearers[b].stats
    }

    /// The agent's smoothed RTT estimate of bearer `b`.
    pub fn srtt(&self, b: usize) -> Option<Duration> {
        self.agent
            .as_ref()
            .and_then(|a| a.sched.health(b))
            .and_then(|h| h.srtt())
    }

    /// Failovers the scheduler counted away from bearer `b`.
    pub fn failovers(&self, b: usize) -> u64 {
        self.agent
            .as_ref()
            .map_or(0, |a| a.sched.counters(b).failovers)
    }

    /// Frames the agent holds unacknowledged.
    pub fn unacked(&self) -> usize {
        self.agent
            .as_ref()
            .map_or(0, |a| a.sched.len() + a.intake.len())
    }

    /// The next connection of bearer `b` first receives an acknowledgement of every number
    /// (`[0, 2^40)` of the stream), as from a fake or broken ingest, before anything is sent.
    pub fn fake_ack_on_next_connect(&mut self, b: usize) {
        self.fake_ack_on_connect.insert(b);
    }

    /// Frames the agent refused to release because an acknowledgement claimed frames never
    /// sent on its connection.
    pub fn bogus_acked(&self) -> u64 {
        self.bogus_acked
    }

    /// Frames that reached the ingest again after they were stored.
    pub fn duplicates_at_ingest(&self) -> u64 {
        self.duplicates_at_ingest
    }

    /// The bytes the uplink of bearer `b` delivered so far.
    pub fn uplink_delivered_bytes(&self, b: usize) -> u64 {
        self.bearers[b].up.counters().delivered_bytes
    }

    /// Runs until `t` (virtual).
    pub fn run_until(&mut self, t: Duration) {
        let mut rounds_here = 0u32;
        loop {
            let next = self.next_wake();
            let Some(next) = next.filter(|&n| n <= t) else {
                self.now = t;
                return;
            };
            if next <= self.now {
                rounds_here += 1;
                assert!(
                    rounds_here < MAX_ROUNDS_AT_ONE_INSTANT,
                    "simulation stuck at {:?}",
                    self.now
                );
            } else {
                rounds_here = 0;
                self.now = next;
            }
            self.step();
        }
    }

    /// Runs until the agent holds nothing unacknowledged and the source has stopped, or `t`.
    pub fn run_until_drained(&mut self, t: Duration) -> bool {
        while self.now < t {
            let chunk = (self.now + Duration::from_millis(100)).min(t);
            self.run_until(chunk);
            if self.now >= self.produce_until && self.unacked() == 0 && self.agent.is_some() {
                // Let the last acknowledgements and reorder windows settle.
                let settle = self.now + Duration::from_millis(500);
                self.run_until(settle.min(t));
                return true;
            }
        }
        false
    }
}

fn end_ns(frame: &Frame, rate_hz: f64) -> i64 {
    match &frame.payload {
        Some(Payload::Waveform(w)) if rate_hz > 0.0 => {
            frame.capture_time_ns + (f64::from(w.sample_count) * 1e9 / rate_hz).round() as i64
        }
        _ => frame.capture_time_ns + 1,
    }
}

impl Sim {
    fn next_wake(&self) -> Option<Duration> {
        let t0 = self.t0;
        let since = |i: Instant| i.saturating_duration_since(t0);
        let mut t = self.events.peek().map(|Reverse((t, _, _))| *t);
        let mut consider = |c: Option<Duration>| {
            if let Some(c) = c {
                t = Some(t.map_or(c, |x| x.min(c)));
            }
        };
        for b in &self.bearers {
            consider(b.up.poll_timeout());
            consider(b.down.poll_timeout());
            if self.agent.is_some() {
                consider(b.redial.poll_timeout().map(since));
            }
            for a in b.acks.values() {
                consider(a.poll_timeout().map(since));
            }
        }
        if let Some(a) = &self.agent {
            consider(a.sched.poll_timeout(self.instant(self.now)).map(since));
        }
        consider(self.reassembler.next_deadline().map(since));
        t
    }

    fn step(&mut self) {
        let now = self.now;
        let inst = self.instant(now);
        while let Some(Reverse((t, _, e))) = self.events.peek().copied() {
            if t > now {
                break;
            }
            self.events.pop();
            self.handle_event(e);
        }
        for b in 0..self.bearers.len() {
            while let Some(p) = self.bearers[b].up.poll_transmit(now) {
                self.arrive(p);
            }
            while let Some(p) = self.bearers[b].down.poll_transmit(now) {
                self.arrive(p);
            }
        }
        if self.reassembler.next_deadline().is_some_and(|d| d <= inst) {
            let outputs = self.reassembler.on_timeout(inst);
            self.publish(outputs);
        }
        for b in 0..self.bearers.len() {
            let gens: Vec<u64> = self.bearers[b].acks.keys().copied().collect();
            for g in gens {
                let ack = self.bearers[b]
                    .acks
                    .get_mut(&g)
                    .and_then(|a| a.poll_ack(inst));
                if let Some(ack) = ack {
                    let size = SMALL_PACKET + ack.encoded_len();
                    self.send_reliable(b, g, Way::Down, Packet::Control { ack }, size);
                }
            }
            let current = self.bearers[b].connected;
            self.bearers[b]
                .acks
                .retain(|g, a| a.pending() > 0 || Some(*g) == current);
        }
        if self.agent.is_some() {
            for b in 0..self.bearers.len() {
                while self.bearers[b].redial.poll_dial(inst) {
                    self.start_attempt(b);
                }
            }
            self.poll_scheduler();
        }
    }

    fn poll_scheduler(&mut self) {
        let inst = self.instant(self.now);
        loop {
            let Some(agent) = self.agent.as_mut() else {
                return;
            };
            let actions = agent.sched.poll(inst);
            if actions.is_empty() {
                return;
            }
            for a in actions {
                match a {
                    Action::Transmit(t) => self.transmit(t),
                    Action::Cancel { bearer, id, .. } => self.cancel(bearer, id),
                }
            }
        }
    }

    fn transmit(&mut self, t: Transmit) {
        if self.bearers[t.bearer].connected != Some(t.generation) {
            if let Some(a) = self.agent.as_mut() {
                a.sched.on_send_failed(t.bearer, t.generation, t.id);
            }
            return;
        }
        let copy = self.next_copy;
        self.next_copy += 1;
        let parts = t.bytes.len().div_ceil(PACKET_PAYLOAD).max(1);
        let parts32 = u32::try_from(parts).unwrap();
        for part in 0..parts32 {
            let len = (t.bytes.len() - part as usize * PACKET_PAYLOAD).min(PACKET_PAYLOAD);
            self.send_reliable(
                t.bearer,
                t.generation,
                Way::Up,
                Packet::Part { copy, part },
                len + PACKET_OVERHEAD,
            );
        }
        self.bearers[t.bearer].stats.copies += 1;
        self.copy_of.insert((t.bearer, t.id), copy);
        self.copies.insert(
            copy,
            Copy {
                bearer: t.bearer,
                generation: t.generation,
                id: t.id,
                bytes: t.bytes,
                parts: parts32,
                received: HashSet::new(),
                cancelled: false,
            },
        );
    }

    fn cancel(&mut self, bearer: usize, id: FrameId) {
        if let Some(copy) = self.copy_of.remove(&(bearer, id))
            && let Some(c) = self.copies.get_mut(&copy)
        {
            c.cancelled = true;
        }
    }

    fn pto(&self, b: usize) -> Duration {
        self.bearers[b].rtt.unwrap_or(INITIAL_RTT) * 2 + MAX_ACK_DELAY
    }

    /// Puts a packet on a link; returns its id.
    fn offer(&mut self, b: usize, generation: u64, way: Way, packet: Packet, size: usize) -> u64 {
        let id = self.next_packet;
        self.next_packet += 1;
        let mut bytes = vec![0u8; size.max(8)];
        bytes[..8].copy_from_slice(&id.to_le_bytes());
        let now = self.now;
        let link = &mut self.bearers[b];
        let verdict = match way {
            Way::Up => {
                link.sent_packets += 1;
                link.stats.packets_sent += 1;
                link.up.offer(now, Bytes::from(bytes))
            }
            Way::Down => link.down.offer(now, Bytes::from(bytes)),
        };
        if verdict == Offer::Queued {
            self.packets.insert(id, (b, generation, now, packet));
        }
        id
    }

    fn send_reliable(&mut self, b: usize, generation: u64, way: Way, packet: Packet, size: usize) {
        let pto = self.pto(b);
        self.send_reliable_with(b, generation, way, packet, size, pto);
    }

    fn send_reliable_with(
        &mut self,
        b: usize,
        generation: u64,
        way: Way,
        packet: Packet,
        size: usize,
        pto: Duration,
    ) {
        let id = self.offer(b, generation, way, packet.clone(), size);
        self.reliable.insert(
            id,
            Reliable {
                bearer: b,
                generation,
                way,
                packet,
                size,
                pto,
            },
        );
        self.at(self.now + pto, Event::Retransmit(id));
    }

    fn start_attempt(&mut self, b: usize) {
        let attempt = self.next_attempt;
        self.next_attempt += 1;
        self.bearers[b].attempts.insert(attempt, self.now);
        self.offer(b, 0, Way::Up, Packet::Initial { attempt }, HANDSHAKE_PACKET);
        let timeout = self.cfg.agent.reconnect.handshake_timeout;
        self.at(self.now + timeout, Event::DialTimeout(b, attempt));
    }

    fn handle_event(&mut self, e: Event) {
        let now = self.now;
        let inst = self.instant(now);
        match e {
            Event::Produce => self.produce(),
            Event::Stats(b) => {
                self.at(now + STATS_INTERVAL, Event::Stats(b));
                let idle = self.cfg.agent.ingest.idle_timeout;
                let link = &mut self.bearers[b];
                let (Some(generation), Some(agent)) = (link.connected, self.agent.as_mut()) else {
                    return;
                };
                if now.saturating_sub(link.last_heard) >= idle {
                    link.connected = None;
                    link.stats.idle_closes += 1;
                    link.redial.handle_disconnected(inst);
                    agent.sched.on_disconnected(b, generation);
                    return;
                }
                let sample = PathSample {
                    rtt: link.rtt.unwrap_or(INITIAL_RTT),
                    cwnd: CWND,
                    lost_packets: link.lost_packets,
                    sent_packets: link.sent_packets,
                    rx_datagrams: link.rx_datagrams,
                };
                agent.sched.on_path(b, sample, inst);
            }
            Event::Probe(b, generation) => {
                if self.agent.is_some() && self.bearers[b].connected == Some(generation) {
                    self.offer(b, generation, Way::Up, Packet::Ping, SMALL_PACKET);
                    let every = self.cfg.agent.scheduling.probe_interval;
                    self.at(now + every, Event::Probe(b, generation));
                }
            }
            Event::Retransmit(id) => {
                let Some(r) = self.reliable.remove(&id) else {
                    return;
                };
                let alive =
                    self.agent.is_some() && self.bearers[r.bearer].connected == Some(r.generation);
                let cancelled = match &r.packet {
                    Packet::Part { copy, .. } => self.copies.get(copy).is_none_or(|c| c.cancelled),
                    _ => false,
                };
                if alive && !cancelled {
                    self.bearers[r.bearer].lost_packets += 1;
                    self.bearers[r.bearer].stats.packets_lost += 1;
                    let idle = self.cfg.agent.ingest.idle_timeout;
                    let pto = (r.pto * 2).min(idle);
                    self.send_reliable_with(r.bearer, r.generation, r.way, r.packet, r.size, pto);
                }
            }
            Event::DialTimeout(b, attempt) => {
                if self.bearers[b].attempts.remove(&attempt).is_some() && self.agent.is_some() {
                    self.bearers[b]
                        .redial
                        .handle_outcome(inst, DialOutcome::Silent, 1.0);
                }
            }
            Event::IngestCommit => self.commit_at_ingest(),
            Event::SpoolCommit => {
                let every = self.cfg.agent.spool.sync_interval;
                self.at(now + every, Event::SpoolCommit);
                self.commit_spool();
            }
            Event::Cut(b) => {
                self.bearers[b].up.set_cut(now, true);
                self.bearers[b].down.set_cut(now, true);
            }
            Event::Restore(b) => {
                self.bearers[b].up.set_cut(now, false);
                self.bearers[b].down.set_cut(now, false);
            }
            Event::Crash => self.crash(),
            Event::Restart => self.restart(),
        }
    }

    fn schedule_produce(&mut self) {
        let spf = self.framer.samples_per_frame();
        let total = self.record.frames as u64;
        if self.framer.next_sample_index() + spf as u64 > total {
            return;
        }
        let signal = Duration::from_secs_f64(self.framer.signal_time_after(spf) / self.cfg.speed);
        let due = self.source_start + signal;
        if due <= self.produce_until {
            self.at(due, Event::Produce);
        }
    }

    fn produce(&mut self) {
        if self.agent.is_none() {
            return;
        }
        let channels = self.record.num_signals();
        let spf = self.framer.samples_per_frame();
        let first = self.framer.next_sample_index() as usize;
        let samples = self.record.samples[first * channels..(first + spf) * channels].to_vec();
        let mut frame = self.framer.frame(samples);
        let inst = self.instant(self.now);
        let Some(agent) = self.agent.as_mut() else {
            return;
        };
        frame.seq += agent.seq_base;
        self.produced.push(Produced {
            seq: frame.seq,
            at: self.now,
            first_sample: first as u64,
            samples: spf as u32,
        });
        let id = FrameId {
            stream_id: ECG,
            seq: frame.seq,
        };
        agent
            .intake
            .push_back((id, Bytes::from(frame.encode_to_vec())));
        Self::admit(agent, inst);
        self.schedule_produce();
    }

    /// The intake: frames go to the spool and the scheduler once their number is reserved.
    fn admit(agent: &mut AgentState, inst: Instant) {
        let kind = StreamKind::Waveform as i32;
        while let Some((id, _)) = agent.intake.front() {
            if agent
                .reserved
                .get(&id.stream_id)
                .is_none_or(|&r| id.seq >= r)
            {
                return;
            }
            let Some((id, bytes)) = agent.intake.pop_front() else {
                return;
            };
            agent.spool_batch.push(SpoolCmd::Put {
                id,
                kind,
                put_ns: 0,
                bytes: bytes.clone(),
            });
            for (evicted, _) in agent.sched.insert(id, kind, bytes, inst) {
                agent.spool_batch.push(SpoolCmd::Delete(evicted));
            }
        }
    }

    fn commit_spool(&mut self) {
        let (Some(agent), Some(spool)) = (self.agent.as_mut(), self.spool.as_mut()) else {
            return;
        };
        let batch = std::mem::take(&mut agent.spool_batch);
        agent.reserved = spool.commit(&batch).unwrap();
        let inst = self.t0 + self.now;
        Self::admit(agent, inst);
    }

    fn crash(&mut self) {
        self.agent = None;
        self.spool = None;
        for b in &mut self.bearers {
            b.redial.stop();
            b.connected = None;
            b.attempts.clear();
        }
    }

    fn restart(&mut self) {
        let inst = self.instant(self.now);
        let (spool, opened) = Spool::open(&self.spool_path, &[descriptor(&self.record)]).unwrap();
        assert!(opened.resumed, "the spool resumes the session");
        assert_eq!(opened.session_id, self.key.session);
        let mut sched = Scheduler::new(
            scheduler_config(&self.cfg.agent),
            self.cfg.bearers.iter().map(|_| None).collect(),
            inst,
        );
        for f in opened.frames {
            sched.restore(f.id, f.kind, f.bytes);
        }
        self.agent = Some(AgentState {
            sched,
            intake: VecDeque::new(),
            spool_batch: Vec::new(),
            reserved: spool.reserved(),
            seq_base: opened.seq_base.get(&ECG).copied().unwrap_or(0),
        });
        self.spool = Some(spool);
        for b in &mut self.bearers {
            b.redial = Redial::new(redial_config(&self.cfg.agent), inst);
        }
        // A replayed record starts again, as the real agent's replay source does.
        self.framer = WaveformFramer::new(
            ECG,
            self.record.num_signals(),
            self.record.header.sampling_frequency,
            self.cfg.agent.framing.frame,
            1_700_000_000_000_000_000 + self.now.as_nanos() as i64,
        );
        self.source_start = self.now;
        self.schedule_produce();
    }

    fn arrive(&mut self, bytes: Bytes) {
        let Some(id) = bytes
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
        else {
            return;
        };
        let Some((b, generation, sent_at, packet)) = self.packets.remove(&id) else {
            return;
        };
        self.reliable.remove(&id);
        let now = self.now;
        let inst = self.instant(now);
        match packet {
            // At the ingest.
            Packet::Initial { attempt } => {
                self.offer(
                    b,
                    0,
                    Way::Down,
                    Packet::ServerFlight { attempt },
                    HANDSHAKE_PACKET,
                );
            }
            Packet::Hello { attempt } => {
                self.offer(b, 0, Way::Down, Packet::HelloAck { attempt }, SMALL_PACKET);
            }
            Packet::Ping => {
                self.offer(
                    b,
                    generation,
                    Way::Down,
                    Packet::QuicAck { sent_at },
                    SMALL_PACKET,
                );
            }
            Packet::Part { copy, part } => {
                self.offer(
                    b,
                    generation,
                    Way::Down,
                    Packet::QuicAck { sent_at },
                    SMALL_PACKET,
                );
                self.part_at_ingest(copy, part);
            }
            // At the agent.
            Packet::ServerFlight { attempt } => {
                if self.agent.is_some() && self.bearers[b].attempts.contains_key(&attempt) {
                    self.offer(b, 0, Way::Up, Packet::Hello { attempt }, SMALL_PACKET * 4);
                }
            }
            Packet::HelloAck { attempt } => {
                let link = &mut self.bearers[b];
                let Some(started) = link.attempts.get(&attempt).copied() else {
                    return;
                };
                let Some(agent) = self.agent.as_mut() else {
                    return;
                };
                if link.connected.is_some() {
                    return;
                }
                link.attempts.clear();
                link.redial
                    .handle_outcome(inst, DialOutcome::Connected, 1.0);
                link.generation += 1;
                let g = link.generation;
                link.connected = Some(g);
                link.last_heard = now;
                // quinn seeds its RTT from the handshake (two round trips here).
                link.rtt = Some((now - started) / 2);
                link.stats.connects += 1;
                agent.sched.on_connected(b, g, inst);
                if self.fake_ack_on_connect.remove(&b) {
                    let acked = agent.sched.on_ack(b, &[(ECG, 0, 1 << 40)], inst);
                    assert!(acked.released.is_empty(), "a fake ack released frames");
                    self.bogus_acked += acked.bogus;
                }
                let every = self.cfg.agent.scheduling.probe_interval;
                self.at(now + every, Event::Probe(b, g));
            }
            Packet::QuicAck { sent_at } => {
                let link = &mut self.bearers[b];
                if self.agent.is_some() && link.connected == Some(generation) {
                    link.rx_datagrams += 1;
                    link.last_heard = now;
                    link.rtt = Some(now - sent_at);
                }
            }
            Packet::Control { ack } => {
                let link = &mut self.bearers[b];
                let Some(agent) = self.agent.as_mut() else {
                    return;
                };
                if link.connected != Some(generation) {
                    return;
                }
                link.rx_datagrams += 1;
                link.last_heard = now;
                let ranges: Vec<(u32, u64, u64)> = ack
                    .streams
                    .iter()
                    .flat_map(|st| st.ranges.iter().map(|r| (st.stream_id, r.start, r.end)))
                    .collect();
                let acked = agent.sched.on_ack(b, &ranges, inst);
                self.bogus_acked += acked.bogus;
                for (id, _, _) in acked.released {
                    agent.spool_batch.push(SpoolCmd::Delete(id));
                }
                let cancels = acked.cancels;
                for c in cancels {
                    if let Action::Cancel { bearer, id, .. } = c {
                        self.cancel(bearer, id);
                    }
                }
            }
        }
    }

    fn part_at_ingest(&mut self, copy: u64, part: u32) {
        let Some(c) = self.copies.get_mut(&copy) else {
            return;
        };
        if c.cancelled {
            // The stream was reset: the ingest drops what it had of it.
            self.copies.remove(&copy);
            return;
        }
        c.received.insert(part);
        if c.received.len() < c.parts as usize {
            return;
        }
        let Some(c) = self.copies.remove(&copy) else {
            return;
        };
        if self.copy_of.get(&(c.bearer, c.id)) == Some(&copy) {
            self.copy_of.remove(&(c.bearer, c.id));
        }
        let frame = Frame::decode(c.bytes).unwrap();
        if self.committing.is_empty() {
            self.at(self.now + COMMIT_DELAY, Event::IngestCommit);
        }
        self.committing.push((frame, c.bearer, c.generation));
    }

    fn ack(&mut self, routes: &[(usize, u64)], seq: u64) {
        let inst = self.instant(self.now);
        for &(b, g) in routes {
            self.bearers[b]
                .acks
                .entry(g)
                .or_insert_with(|| AckCoalescer::new(ACK_COALESCE, MAX_ACK_SEQS))
                .handle_durable(inst, ECG, seq);
        }
    }

    fn commit_at_ingest(&mut self) {
        let inst = self.instant(self.now);
        let rate = self.record.header.sampling_frequency;
        for (frame, b, g) in std::mem::take(&mut self.committing) {
            let seq = frame.seq;
            if self.stored.contains(&seq) {
                self.duplicates_at_ingest += 1;
                self.ack(&[(b, g)], seq);
                continue;
            }
            let id = FrameId {
                stream_id: ECG,
                seq,
            };
            let (capture, end) = (frame.capture_time_ns, end_ns(&frame, rate));
            let key = self.key.clone();
            let (arrival, outputs) =
                self.reassembler
                    .on_frame(&key, seq, capture, end, (id, frame, vec![(b, g)]), inst);
            if let Arrival::Stale((_, _, routes)) = arrival {
                self.duplicates_at_ingest += 1;
                self.ack(&routes, seq);
            }
            self.publish(outputs);
        }
    }

    fn publish(&mut self, outputs: Vec<Output<Held>>) {
        let at = self.now;
        for o in outputs {
            match o {
                Output::Deliver {
                    seq, item, late, ..
                } => {
                    let (_, frame, routes) = item;
                    self.stored.insert(seq);
                    self.ack(&routes, seq);
                    self.received.push(Received::Frame {
                        at,
                        seq,
                        late,
                        frame,
                    });
                }
                Output::Gap { gap, .. } => self.received.push(Received::Gap {
                    at,
                    start: gap.start_seq,
                    end: gap.end_seq,
                }),
                Output::GapClosed {
                    start_seq, end_seq, ..
                } => self.received.push(Received::GapClosed {
                    at,
                    start: start_seq,
                    end: end_seq,
                }),
            }
        }
    }
}

/// Frames the subscriber received, by seq, with how often each came.
pub fn frames_by_seq(received: &[Received]) -> BTreeMap<u64, (usize, &Frame, Duration, bool)> {
    let mut out: BTreeMap<u64, (usize, &Frame, Duration, bool)> = BTreeMap::new();
    for r in received {
        if let Received::Frame {
            at,
            seq,
            late,
            frame,
        } = r
        {
            out.entry(*seq)
                .and_modify(|e| e.0 += 1)
                .or_insert((1, frame, *at, *late));
        }
    }
    out
}

/// Asserts that every frame in `expected` arrived exactly once and carries exactly the
/// record's samples at its sample index.
pub fn assert_exact(sim: &Sim, expected: &[Produced]) {
    let got = frames_by_seq(sim.received());
    let record = sim.record();
    let channels = record.num_signals();
    for p in expected {
        let Some((count, frame, _, _)) = got.get(&p.seq) else {
            panic!(
                "frame {} (produced at {:?}) never arrived; {} of {} arrived",
                p.seq,
                p.at,
                got.len(),
                expected.len()
            );
        };
        assert_eq!(*count, 1, "frame {} arrived {count} times", p.seq);
        let Some(Payload::Waveform(w)) = &frame.payload else {
            panic!("frame {} is not a waveform", p.seq);
        };
        assert_eq!(w.first_sample_index, p.first_sample, "frame {}", p.seq);
        let from = p.first_sample as usize * channels;
        let to = from + p.samples as usize * channels;
        assert!(
            w.samples == record.samples[from..to],
            "frame {} samples differ from the record",
            p.seq
        );
    }
}
