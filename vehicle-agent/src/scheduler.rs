//! Sans-IO multi-bearer scheduler: holds every unacknowledged frame, decides which bearer(s)
//! carry it, detects frames a bearer lost and sends them again on another one, and cancels
//! copies once one was acknowledged.
//!
//! - Strict priority by class (events > waveforms > vitals > location > bulk), with two
//!   lanes: frames produced within `live_window` form the live lane and go first; older ones
//!   (the backlog after an outage, or restored from the spool) form the catch-up lane, which
//!   may only fill half of a bearer's in-flight allowance so the live lane always has room.
//! - Per class policy: `fastest` (lowest expected delivery time), `redundant` (the best two
//!   bearers), `backup` (the first configured bearer while it is up, others only when it is not).
//! - A copy unacknowledged past its bearer's loss-detection time is overdue: the frame is sent
//!   again on another bearer (never twice on one connection; QUIC itself retransmits there).
//! - A bearer over its data budget (metered SIM) is used only when no other bearer can carry.
//!
//! Fed with `now` and events, returning actions; the async shell moves bytes and time.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use tokio::time::Instant;

use relay_proto::Class;

use crate::health::{Health, HealthConfig, LinkState, PathSample};

/// Sends decided per `poll` at most, so one call stays short; the caller polls again.
const MAX_SENDS_PER_POLL: usize = 256;
/// Overdue frames passed over per `poll` at most (they wait on the only bearer that can carry).
const MAX_SKIPS_PER_POLL: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
/// How many bearers carry a class, and which.
pub enum Policy {
    /// The bearer with the lowest expected delivery time.
    Fastest,
    /// The best two bearers carry every frame.
    Redundant,
    /// The first configured bearer while it is up; the others only when it is not.
    Backup,
}

impl Policy {
    fn copies(self) -> usize {
        match self {
            Self::Redundant => 2,
            Self::Fastest | Self::Backup => 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
/// Which lane a frame is sent in.
pub enum Lane {
    /// Produced within the live window: goes first.
    Live,
    /// Backlog after an outage or restored from the spool: follows at lower priority.
    CatchUp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
/// A frame's identity within the session.
pub struct FrameId {
    /// The stream.
    pub stream_id: u32,
    /// Its sequence number.
    pub seq: u64,
}

/// A metered bearer may send at most `bytes` per `period`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// Bytes per period.
    pub bytes: u64,
    /// The period.
    pub period: Duration,
}

#[derive(Debug, Clone, PartialEq)]
/// Bounds and policies of the scheduler.
pub struct SchedulerConfig {
    /// Policy per class.
    pub policies: [Policy; Class::COUNT],
    /// Bytes of unacknowledged frames held at most (memory and spool).
    pub max_bytes: usize,
    /// Per bearer: bytes sent and not yet acknowledged at most.
    pub max_in_flight_bytes: usize,
    /// Per bearer: frames sent and not yet acknowledged at most.
    pub max_in_flight_frames: usize,
    /// Frames younger than this are live; older ones are caught up behind them.
    pub live_window: Duration,
    /// Timing of each bearer's health estimator.
    pub health: HealthConfig,
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Write this copy on its bearer.
    Transmit(Transmit),
    /// Reset the QUIC stream (or drop the queued write) of this copy: another was acknowledged.
    Cancel {
        /// The bearer.
        bearer: usize,
        /// Its connection generation.
        generation: u64,
        /// The frame.
        id: FrameId,
    },
}

#[derive(Debug, Clone, PartialEq)]
/// One copy of a frame to write on a bearer.
pub struct Transmit {
    /// The bearer (index in the configuration).
    pub bearer: usize,
    /// Connection generation of the bearer this copy is meant for.
    pub generation: u64,
    /// The frame.
    pub id: FrameId,
    /// Its stream kind.
    pub kind: i32,
    /// The lane it goes in (sets its QUIC priority).
    pub lane: Lane,
    /// The encoded frame.
    pub bytes: Bytes,
    /// Sent before (on another bearer or an earlier connection).
    pub resend: bool,
}

/// Result of an acknowledgement.
#[derive(Debug, Default, PartialEq)]
pub struct Acked {
    /// Frames released, with their class kind and the time since their first send.
    pub released: Vec<(FrameId, i32, Option<Duration>)>,
    /// Copies on other bearers to cancel.
    pub cancels: Vec<Action>,
    /// Held frames the message claimed that were never sent on its connection; when not
    /// zero, the message was ignored.
    pub bogus: u64,
}

#[derive(Debug, Clone, Copy)]
struct InFlightCopy {
    bearer: usize,
    generation: u64,
    sent_at: Instant,
    overdue: bool,
}

#[derive(Debug)]
struct Entry {
    class: Class,
    kind: i32,
    order: u64,
    bytes: Bytes,
    copies: Vec<InFlightCopy>,
    first_sent: Option<Instant>,
    sends: u32,
}

impl Entry {
    fn live_copies(&self) -> usize {
        self.copies.iter().filter(|c| !c.overdue).count()
    }
}

/// Counters per bearer, cumulative (the shell turns them into metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BearerCounters {
    /// Frame copies sent.
    pub frames_sent: u64,
    /// Bytes of frame copies sent.
    pub bytes_sent: u64,
    /// Frames acknowledged through this bearer.
    pub frames_acked: u64,
    /// Copies sent because another bearer's copy was overdue or lost with its connection.
    pub frames_recovered: u64,
    /// Times this bearer stopped being up while it carried frames, or after frames it
    /// carried went overdue and nothing was heard from it since.
    pub failovers: u64,
}

#[derive(Debug, Clone, Copy)]
struct BudgetState {
    budget: Budget,
    window_start: Instant,
    used: u64,
}

#[derive(Debug)]
struct Bearer {
    health: Health,
    generation: u64,
    /// Copies outstanding, by send time (the oldest decides the state).
    in_flight: BTreeSet<(Instant, FrameId)>,
    /// Outstanding copies not yet found overdue, by send time.
    unchecked: BTreeSet<(Instant, FrameId)>,
    in_flight_bytes: usize,
    budget: Option<BudgetState>,
    last_state: LinkState,
    /// When copies on this bearer last went overdue. Their frames may be recovered and
    /// acknowledged elsewhere before the bearer leaves Up, emptying `in_flight`; a bearer
    /// not heard from since then still failed over.
    overdue_since: Option<Instant>,
    counters: BearerCounters,
}

impl Bearer {
    fn oldest_outstanding(&self) -> Option<Instant> {
        self.in_flight.first().map(|(t, _)| *t)
    }

    /// Frames it carried went overdue and nothing was heard from it since.
    fn stranded(&self) -> bool {
        self.overdue_since
            .is_some_and(|t| self.health.last_heard().is_none_or(|heard| heard <= t))
    }

    fn state(&self, now: Instant) -> LinkState {
        self.health.state(now, self.oldest_outstanding())
    }

    /// Records its state `s`; leaving Up while it carried frames, or stranded, is a failover.
    fn set_state(&mut self, s: LinkState) {
        if self.last_state == LinkState::Up
            && s != LinkState::Up
            && (!self.in_flight.is_empty() || self.stranded())
        {
            self.counters.failovers += 1;
        }
        if s != LinkState::Up {
            self.overdue_since = None;
        }
        self.last_state = s;
    }

    fn over_budget(&mut self, len: usize, now: Instant) -> bool {
        let Some(b) = self.budget.as_mut() else {
            return false;
        };
        if now.saturating_duration_since(b.window_start) >= b.budget.period {
            b.window_start = now;
            b.used = 0;
        }
        b.used + len as u64 > b.budget.bytes
    }
}

#[derive(Debug)]
/// The multi-bearer scheduler (see the module documentation).
pub struct Scheduler {
    cfg: SchedulerConfig,
    entries: HashMap<FrameId, Entry>,
    /// Every entry by (class, production order): eviction takes the least urgent, oldest.
    by_age: BTreeSet<(Class, u64, FrameId)>,
    /// Frames with no live copy, by (class, production order).
    pending: BTreeSet<(Class, u64, FrameId)>,
    /// Production time of recent frames, to find where the live lane starts.
    recent: VecDeque<(Instant, u64)>,
    next_order: u64,
    bytes: usize,
    bearers: Vec<Bearer>,
    evicted: [u64; Class::COUNT],
}

/// Frames evicted by an insert (the newcomer itself when everything held is more urgent).
pub type Evicted = Vec<(FrameId, i32)>;

impl Scheduler {
    /// A scheduler for `budgets.len()` bearers, none connected yet.
    pub fn new(cfg: SchedulerConfig, budgets: Vec<Option<Budget>>, now: Instant) -> Self {
        let bearers = budgets
            .into_iter()
            .map(|b| Bearer {
                health: Health::new(cfg.health),
                generation: 0,
                in_flight: BTreeSet::new(),
                unchecked: BTreeSet::new(),
                in_flight_bytes: 0,
                budget: b.map(|budget| BudgetState {
                    budget,
                    window_start: now,
                    used: 0,
                }),
                last_state: LinkState::Down,
                overdue_since: None,
                counters: BearerCounters::default(),
            })
            .collect();
        Self {
            cfg,
            entries: HashMap::new(),
            by_age: BTreeSet::new(),
            pending: BTreeSet::new(),
            recent: VecDeque::new(),
            next_order: 0,
            bytes: 0,
            bearers,
            evicted: [0; Class::COUNT],
        }
    }

    /// Frames held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Frames waiting for a bearer, per class.
    pub fn queued_per_class(&self) -> [usize; Class::COUNT] {
        let mut out = [0; Class::COUNT];
        for (class, _, _) in &self.pending {
            out[class.index()] += 1;
        }
        out
    }

    /// Health estimate of a bearer.
    pub fn health(&self, bearer: usize) -> Option<&Health> {
        self.bearers.get(bearer).map(|b| &b.health)
    }

    /// Counters of a bearer.
    pub fn counters(&self, bearer: usize) -> BearerCounters {
        self.bearers
            .get(bearer)
            .map(|b| b.counters)
            .unwrap_or_default()
    }

    /// State of a bearer at `now`.
    pub fn state(&self, bearer: usize, now: Instant) -> LinkState {
        self.bearers
            .get(bearer)
            .map_or(LinkState::Down, |b| b.state(now))
    }

    /// Bytes sent on a bearer and not yet acknowledged.
    pub fn in_flight_bytes(&self, bearer: usize) -> usize {
        self.bearers.get(bearer).map_or(0, |b| b.in_flight_bytes)
    }

    /// Frames evicted so far, per class.
    pub fn evicted(&self) -> [u64; Class::COUNT] {
        self.evicted
    }

    /// Adds a frame produced now (live lane). Over the byte bound, the least urgent oldest
    /// frames are evicted; if everything held is more urgent, the newcomer is.
    pub fn insert(&mut self, id: FrameId, kind: i32, bytes: Bytes, now: Instant) -> Evicted {
        let order = self.next_order;
        let evicted = self.insert_inner(id, kind, bytes);
        // Only a frame taken now got an order (not a duplicate, not an evicted newcomer).
        if self.entries.contains_key(&id) && self.next_order > order {
            self.recent.push_back((now, order));
        }
        evicted
    }

    /// Adds a frame restored from the spool: it joins the catch-up lane.
    pub fn restore(&mut self, id: FrameId, kind: i32, bytes: Bytes) -> Evicted {
        self.insert_inner(id, kind, bytes)
    }

    fn insert_inner(&mut self, id: FrameId, kind: i32, bytes: Bytes) -> Evicted {
        let class = Class::of_kind(kind);
        let mut evicted = Vec::new();
        if self.entries.contains_key(&id) {
            return evicted;
        }
        while self.bytes + bytes.len() > self.cfg.max_bytes {
            let Some(&(worst_class, _, _)) = self.by_age.last() else {
                break;
            };
            let Some(&victim) = self
                .by_age
                .range(
                    (
                        worst_class,
                        0,
                        FrameId {
                            stream_id: 0,
                            seq: 0,
                        },
                    )..,
                )
                .next()
            else {
                break;
            };
            if worst_class < class {
                self.evicted[class.index()] += 1;
                evicted.push((id, kind));
                return evicted;
            }
            if let Some(e) = self.remove(victim.2) {
                self.evicted[e.class.index()] += 1;
                evicted.push((victim.2, e.kind));
            }
        }
        let order = self.next_order;
        self.next_order += 1;
        self.bytes += bytes.len();
        self.by_age.insert((class, order, id));
        self.pending.insert((class, order, id));
        self.entries.insert(
            id,
            Entry {
                class,
                kind,
                order,
                bytes,
                copies: Vec::new(),
                first_sent: None,
                sends: 0,
            },
        );
        evicted
    }

    fn remove(&mut self, id: FrameId) -> Option<Entry> {
        let e = self.entries.remove(&id)?;
        self.by_age.remove(&(e.class, e.order, id));
        self.pending.remove(&(e.class, e.order, id));
        self.bytes -= e.bytes.len();
        for c in &e.copies {
            if let Some(b) = self.bearers.get_mut(c.bearer) {
                b.in_flight.remove(&(c.sent_at, id));
                b.unchecked.remove(&(c.sent_at, id));
                b.in_flight_bytes = b.in_flight_bytes.saturating_sub(e.bytes.len());
            }
        }
        Some(e)
    }

    /// A bearer's connection (generation `generation`) completed its handshake.
    pub fn on_connected(&mut self, bearer: usize, generation: u64, now: Instant) {
        self.drop_copies_of(bearer);
        if let Some(b) = self.bearers.get_mut(bearer) {
            b.generation = generation;
            b.health.on_connected(now);
        }
    }

    /// A bearer's connection ended: what it carried is sent again elsewhere.
    pub fn on_disconnected(&mut self, bearer: usize, generation: u64) {
        let Some(b) = self.bearers.get_mut(bearer) else {
            return;
        };
        if b.generation != generation {
            return;
        }
        // Judged now, before its copies are dropped: it may reconnect before the next poll.
        b.set_state(LinkState::Down);
        b.health.on_disconnected();
        self.drop_copies_of(bearer);
    }

    fn drop_copies_of(&mut self, bearer: usize) {
        let Some(b) = self.bearers.get_mut(bearer) else {
            return;
        };
        let ids: Vec<FrameId> = b.in_flight.iter().map(|(_, id)| *id).collect();
        b.in_flight.clear();
        b.unchecked.clear();
        b.in_flight_bytes = 0;
        for id in ids {
            if let Some(e) = self.entries.get_mut(&id) {
                e.copies.retain(|c| c.bearer != bearer);
                if e.live_copies() == 0 {
                    self.pending.insert((e.class, e.order, id));
                }
            }
        }
    }

    /// The write of a copy failed: the frame needs another send if nothing else carries it.
    pub fn on_send_failed(&mut self, bearer: usize, generation: u64, id: FrameId) {
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        let Some(pos) = e
            .copies
            .iter()
            .position(|c| c.bearer == bearer && c.generation == generation)
        else {
            return;
        };
        let c = e.copies.remove(pos);
        if let Some(b) = self.bearers.get_mut(bearer) {
            b.in_flight.remove(&(c.sent_at, id));
            b.unchecked.remove(&(c.sent_at, id));
            b.in_flight_bytes = b.in_flight_bytes.saturating_sub(e.bytes.len());
        }
        if e.live_copies() == 0 {
            self.pending.insert((e.class, e.order, id));
        }
    }

    /// quinn's statistics of a bearer's connection.
    pub fn on_path(&mut self, bearer: usize, sample: PathSample, now: Instant) {
        if let Some(b) = self.bearers.get_mut(bearer) {
            b.health.on_path(sample, now);
        }
    }

    /// The ingest acknowledged `ranges` (`(stream, start, end)`, end exclusive) in one message
    /// on `bearer`'s connection.
    ///
    /// An honest ingest acknowledges only what arrived on that connection. A message that
    /// covers a held frame with no copy on this bearer (never sent there, or sent on an
    /// earlier connection) is not trusted at all: nothing is released, and the frames it
    /// claimed are counted in [`Acked::bogus`]. So nothing leaves the spool unless it was sent
    /// where the acknowledgement came from.
    pub fn on_ack(&mut self, bearer: usize, ranges: &[(u32, u64, u64)], now: Instant) -> Acked {
        let mut out = Acked::default();
        let mut ids = Vec::new();
        for &(stream_id, start, end) in ranges {
            // The range comes from the network: the work is bounded by what we hold, not by
            // its width (a wide range scans the held frames instead of every number in it).
            let width = end.saturating_sub(start);
            if width > self.entries.len() as u64 {
                ids.extend(
                    self.entries
                        .keys()
                        .filter(|id| id.stream_id == stream_id && (start..end).contains(&id.seq))
                        .copied(),
                );
            } else {
                ids.extend(
                    (start..end)
                        .map(|seq| FrameId { stream_id, seq })
                        .filter(|id| self.entries.contains_key(id)),
                );
            }
        }
        let unsent = ids
            .iter()
            .filter(|id| {
                self.entries
                    .get(id)
                    .is_some_and(|e| !e.copies.iter().any(|c| c.bearer == bearer))
            })
            .count();
        if unsent > 0 {
            out.bogus = unsent as u64;
            return out;
        }
        for id in ids {
            let Some(e) = self.remove(id) else {
                continue;
            };
            for c in &e.copies {
                if c.bearer == bearer {
                    if let Some(b) = self.bearers.get_mut(bearer) {
                        if c.generation == b.generation {
                            b.health.on_ack(c.sent_at, e.bytes.len(), now);
                        }
                        b.counters.frames_acked += 1;
                    }
                } else {
                    out.cancels.push(Action::Cancel {
                        bearer: c.bearer,
                        generation: c.generation,
                        id,
                    });
                }
            }
            out.released.push((
                id,
                e.kind,
                e.first_sent.map(|t| now.saturating_duration_since(t)),
            ));
        }
        out
    }

    /// Marks overdue copies and makes their frames pending again.
    fn detect_overdue(&mut self, now: Instant) {
        for bi in 0..self.bearers.len() {
            let ld = self.bearers[bi].health.loss_detection_time();
            while let Some(&(sent_at, id)) = self.bearers[bi].unchecked.first() {
                if sent_at + ld > now {
                    break;
                }
                self.bearers[bi].unchecked.remove(&(sent_at, id));
                let Some(e) = self.entries.get_mut(&id) else {
                    continue;
                };
                self.bearers[bi].overdue_since = Some(now);
                for c in e.copies.iter_mut().filter(|c| c.bearer == bi) {
                    c.overdue = true;
                }
                if e.live_copies() == 0 {
                    self.pending.insert((e.class, e.order, id));
                }
            }
        }
    }

    fn update_states(&mut self, now: Instant) -> Vec<LinkState> {
        self.bearers
            .iter_mut()
            .map(|b| {
                let s = b.state(now);
                b.set_state(s);
                s
            })
            .collect()
    }

    /// Where the live lane starts (production order), dropping older entries of `recent`.
    fn live_cutoff(&mut self, now: Instant) -> u64 {
        while let Some(&(t, _)) = self.recent.front() {
            if now.saturating_duration_since(t) < self.cfg.live_window {
                break;
            }
            self.recent.pop_front();
        }
        self.recent.front().map_or(u64::MAX, |&(_, o)| o)
    }

    /// The next frame to place: live lane by class, then the catch-up lane by class; events are
    /// always live.
    fn next_candidate(
        &self,
        cutoff: u64,
        skip: &BTreeSet<(Class, u64, FrameId)>,
    ) -> Option<((Class, u64, FrameId), Lane)> {
        let origin = FrameId {
            stream_id: 0,
            seq: 0,
        };
        for class in Class::ALL {
            let from = if class == Class::Events { 0 } else { cutoff };
            if let Some(k) = self
                .pending
                .range((class, from, origin)..(class, u64::MAX, origin))
                .find(|k| !skip.contains(k))
            {
                return Some((*k, Lane::Live));
            }
        }
        self.pending
            .iter()
            .find(|k| !skip.contains(k))
            .map(|k| (*k, Lane::CatchUp))
    }

    /// Decides what to send now. Call again after acks, connection changes, inserts, and at
    /// `poll_timeout`.
    pub fn poll(&mut self, now: Instant) -> Vec<Action> {
        self.detect_overdue(now);
        let states = self.update_states(now);
        let cutoff = self.live_cutoff(now);
        let mut actions = Vec::new();
        // Frames placed (or passed over) in this round.
        let mut skip = BTreeSet::new();
        while actions.len() < MAX_SENDS_PER_POLL {
            let Some((key, lane)) = self.next_candidate(cutoff, &skip) else {
                break;
            };
            let id = key.2;
            let Some(e) = self.entries.get(&id) else {
                self.pending.remove(&key);
                continue;
            };
            let policy = self.cfg.policies[e.class.index()];
            let need = policy.copies().saturating_sub(e.live_copies()).max(1);
            let in_flight_elsewhere = !e.copies.is_empty();
            let targets = self.choose(id, e.bytes.len(), lane, policy, need, &states, now);
            if targets.is_empty() {
                if !in_flight_elsewhere || skip.len() >= MAX_SKIPS_PER_POLL {
                    // No bearer can take a fresh frame now: nothing less urgent can go either.
                    break;
                }
                // Overdue, but only the bearer still carrying it could take it: QUIC keeps
                // retransmitting there; newer frames must not wait behind it.
                skip.insert(key);
                continue;
            }
            let Some(e) = self.entries.get_mut(&id) else {
                break;
            };
            let resend = e.sends > 0;
            for b in targets {
                let bearer = &mut self.bearers[b];
                e.copies.push(InFlightCopy {
                    bearer: b,
                    generation: bearer.generation,
                    sent_at: now,
                    overdue: false,
                });
                e.sends += 1;
                e.first_sent.get_or_insert(now);
                bearer.in_flight.insert((now, id));
                bearer.unchecked.insert((now, id));
                bearer.in_flight_bytes += e.bytes.len();
                bearer.counters.frames_sent += 1;
                bearer.counters.bytes_sent += e.bytes.len() as u64;
                if resend {
                    bearer.counters.frames_recovered += 1;
                }
                if let Some(budget) = bearer.budget.as_mut() {
                    budget.used += e.bytes.len() as u64;
                }
                actions.push(Action::Transmit(Transmit {
                    bearer: b,
                    generation: bearer.generation,
                    id,
                    kind: e.kind,
                    lane,
                    bytes: e.bytes.clone(),
                    resend,
                }));
            }
            self.pending.remove(&key);
            skip.insert(key);
        }
        actions
    }

    /// Bearers to carry a frame now, best first.
    #[allow(clippy::too_many_arguments)]
    fn choose(
        &mut self,
        id: FrameId,
        len: usize,
        lane: Lane,
        policy: Policy,
        need: usize,
        states: &[LinkState],
        now: Instant,
    ) -> Vec<usize> {
        let (max_bytes, max_frames) = match lane {
            Lane::Live => (self.cfg.max_in_flight_bytes, self.cfg.max_in_flight_frames),
            Lane::CatchUp => (
                self.cfg.max_in_flight_bytes / 2,
                self.cfg.max_in_flight_frames / 2,
            ),
        };
        let holders: Vec<(usize, u64)> = self
            .entries
            .get(&id)
            .map(|e| e.copies.iter().map(|c| (c.bearer, c.generation)).collect())
            .unwrap_or_default();
        // (state, over budget, expected delivery, index): the natural order is the preference.
        let mut usable: Vec<(u8, bool, Duration, usize)> = Vec::new();
        for (i, b) in self.bearers.iter_mut().enumerate() {
            let state = states.get(i).copied().unwrap_or(LinkState::Down);
            let holds = holders.iter().any(|&(hb, g)| hb == i && g == b.generation);
            let room = b.in_flight_bytes + len <= max_bytes.max(len)
                && b.in_flight.len() < max_frames.max(1);
            if state == LinkState::Down || holds || !room {
                continue;
            }
            let rank = u8::from(state == LinkState::Suspect);
            let over = b.over_budget(len, now);
            usable.push((
                rank,
                over,
                b.health.expected_delivery(b.in_flight_bytes + len),
                i,
            ));
        }
        // Over-budget bearers only when nothing else can carry.
        if usable.iter().any(|u| !u.1) {
            usable.retain(|u| !u.1);
        }
        // Suspect bearers only when no bearer is up.
        if usable.iter().any(|u| u.0 == 0) {
            usable.retain(|u| u.0 == 0);
        }
        usable.sort_by_key(|u| (u.0, u.1, u.2));
        if policy == Policy::Backup
            && let Some((pos, _)) = usable.iter().enumerate().min_by_key(|(_, u)| u.3)
        {
            // The first configured bearer that can carry goes first, whatever its speed.
            let first = usable.remove(pos);
            usable.insert(0, first);
        }
        usable.into_iter().take(need).map(|u| u.3).collect()
    }

    /// When `poll` must run again without new input (a copy becoming overdue, a bearer
    /// changing state, a budget window or the live lane boundary moving).
    pub fn poll_timeout(&self, now: Instant) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        let mut consider = |c: Instant| {
            if c > now {
                t = Some(t.map_or(c, |x| x.min(c)));
            }
        };
        for b in &self.bearers {
            if let Some(&(sent_at, _)) = b.unchecked.first() {
                consider(sent_at + b.health.loss_detection_time());
            }
            if let Some(c) = b.health.next_change(now, b.oldest_outstanding()) {
                consider(c);
            }
            if let Some(budget) = &b.budget {
                consider(budget.window_start + budget.budget.period);
            }
        }
        if let Some(&(first, _)) = self.recent.front()
            && !self.pending.is_empty()
        {
            consider(first + self.cfg.live_window);
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_proto::model::StreamKind;
    use std::collections::BTreeMap;

    const ECG: i32 = StreamKind::Waveform as i32;
    const GPS: i32 = StreamKind::Location as i32;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn cfg(policy: Policy) -> SchedulerConfig {
        SchedulerConfig {
            policies: [policy; Class::COUNT],
            max_bytes: 1 << 20,
            max_in_flight_bytes: 1 << 16,
            max_in_flight_frames: 64,
            live_window: ms(1000),
            health: HealthConfig::default(),
        }
    }

    fn id(stream_id: u32, seq: u64) -> FrameId {
        FrameId { stream_id, seq }
    }

    fn frame(n: usize) -> Bytes {
        Bytes::from(vec![0u8; n])
    }

    fn sends(actions: &[Action]) -> Vec<(usize, FrameId, Lane)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Transmit(s) => Some((s.bearer, s.id, s.lane)),
                Action::Cancel { .. } => None,
            })
            .collect()
    }

    /// Bearers connected with a measured RTT each (acks of a probe frame on a side stream).
    fn with_rtts(policy: Policy, rtts: &[u64], t0: Instant) -> Scheduler {
        let mut s = Scheduler::new(cfg(policy), vec![None; rtts.len()], t0);
        for (b, rtt) in rtts.iter().enumerate() {
            s.on_connected(b, 1, t0);
            s.on_path(
                b,
                PathSample {
                    rtt: ms(*rtt),
                    cwnd: 1 << 20,
                    rx_datagrams: 1,
                    ..PathSample::default()
                },
                t0,
            );
        }
        s
    }

    #[test]
    fn fastest_picks_the_lowest_expected_delivery() {
        let t0 = Instant::now();
        let mut s = with_rtts(Policy::Fastest, &[120, 40, 80], t0);
        s.insert(id(0, 0), ECG, frame(100), t0);
        assert_eq!(sends(&s.poll(t0)), vec![(1, id(0, 0), Lane::Live)]);
    }

    #[test]
    fn strict_priority_then_age_within_the_live_lane() {
        let t0 = Instant::now();
        let mut s = with_rtts(Policy::Fastest, &[40], t0);
        s.insert(id(2, 0), GPS, frame(10), t0);
        s.insert(id(0, 0), ECG, frame(10), t0);
        s.insert(id(0, 1), ECG, frame(10), t0);
        let order: Vec<FrameId> = sends(&s.poll(t0)).into_iter().map(|x| x.1).collect();
        assert_eq!(order, vec![id(0, 0), id(0, 1), id(2, 0)]);
    }

    #[test]
    fn redundant_uses_the_best_two_and_ack_cancels_the_other_copy() {
        let t0 = Instant::now();
        let mut s = with_rtts(Policy::Redundant, &[120, 40, 80], t0);
        s.insert(id(0, 0), ECG, frame(100), t0);
        let mut got = sends(&s.poll(t0));
        got.sort();
        assert_eq!(
            got,
            vec![(1, id(0, 0), Lane::Live), (2, id(0, 0), Lane::Live)]
        );
        let acked = s.on_ack(1, &[(0, 0, 1)], t0 + ms(40));
        assert_eq!(acked.released.len(), 1);
        assert_eq!(
            acked.cancels,
            vec![Action::Cancel {
                bearer: 2,
                generation: 1,
                id: id(0, 0)
            }]
        );
        assert!(s.is_empty());
        assert_eq!(s.in_flight_bytes(2), 0);
    }

    #[test]
    fn backup_prefers_the_first_bearer_while_it_is_up() {
        let t0 = Instant::now();
        let mut s = with_rtts(Policy::Backup, &[120, 40], t0);
        s.insert(id(2, 0), GPS, frame(10), t0);
        assert_eq!(sends(&s.poll(t0)), vec![(0, id(2, 0), Lane::Live)]);
        s.on_disconnected(0, 1);
        s.insert(id(2, 1), GPS, frame(10), t0);
        let got = sends(&s.poll(t0));
        assert_eq!(got.len(), 2, "both frames go on bearer 1 now: {got:?}");
        assert!(got.iter().all(|g| g.0 == 1));
    }

    #[test]
    fn overdue_copy_is_recovered_on_another_bearer_and_the_late_one_cancelled() {
        let t0 = Instant::now();
        let mut s = with_rtts(Policy::Fastest, &[40, 80], t0);
        s.insert(id(0, 0), ECG, frame(100), t0);
        assert_eq!(sends(&s.poll(t0)), vec![(0, id(0, 0), Lane::Live)]);
        let ld = s
            .health(0)
            .map(Health::loss_detection_time)
            .unwrap_or_default();
        let due = s.poll_timeout(t0).unwrap();
        assert!(due <= t0 + ld, "{due:?}");
        assert!(
            sends(&s.poll(t0 + ld - ms(1))).is_empty(),
            "not before its time"
        );
        let t1 = t0 + ld + ms(1);
        assert_eq!(sends(&s.poll(t1)), vec![(1, id(0, 0), Lane::Live)]);
        assert_eq!(s.counters(1).frames_recovered, 1);
        let acked = s.on_ack(1, &[(0, 0, 1)], t1 + ms(80));
        assert_eq!(acked.cancels.len(), 1, "the copy still queued on bearer 0");
        // Nothing left to do: the frame is gone from both bearers.
        assert!(s.poll(t1 + ms(500)).is_empty());
        assert_eq!(s.in_flight_bytes(0) + s.in_flight_bytes(1), 0);
    }

    /// Frames of a bearer that went silent, recovered and acknowledged elsewhere before it
    /// left Up: still a failover. A bearer heard from after that is not one.
    #[test]
    fn failover_is_counted_when_recovery_empties_the_silent_bearer_first() {
        let heard = |s: &mut Scheduler, rx_datagrams: u64, now: Instant| {
            let sample = PathSample {
                rtt: ms(40),
                cwnd: 1 << 20,
                rx_datagrams,
                ..PathSample::default()
            };
            s.on_path(0, sample, now);
        };
        for heard_late in [false, true] {
            let t0 = Instant::now();
            let mut s = with_rtts(Policy::Fastest, &[40, 80], t0);
            s.insert(id(0, 0), ECG, frame(100), t0);
            assert_eq!(sends(&s.poll(t0)), vec![(0, id(0, 0), Lane::Live)]);
            // Something (an earlier frame's ack, a keep-alive) arrives just after the send,
            // so the bearer stays Up for a while after its copy is overdue.
            heard(&mut s, 2, t0 + ms(30));
            let ld = s
                .health(0)
                .map(Health::loss_detection_time)
                .unwrap_or_default();
            let t1 = t0 + ld + ms(1);
            assert_eq!(sends(&s.poll(t1)), vec![(1, id(0, 0), Lane::Live)]);
            assert_eq!(s.state(0, t1), LinkState::Up);
            s.on_ack(1, &[(0, 0, 1)], t1 + ms(20));
            assert_eq!(s.in_flight_bytes(0), 0, "recovery emptied bearer 0");
            assert_eq!(s.state(0, t1 + ms(20)), LinkState::Up);
            if heard_late {
                heard(&mut s, 3, t1 + ms(25));
            }
            let mut left_up = false;
            for step in 0..400u64 {
                let now = t1 + ms(30 + 10 * step);
                s.poll(now);
                if s.state(0, now) != LinkState::Up {
                    left_up = true;
                    break;
                }
            }
            assert!(left_up, "a silent bearer leaves Up");
            let expected = u64::from(!heard_late);
            assert_eq!(
                s.counters(0).failovers,
                expected,
                "heard late: {heard_late}"
            );
        }
    }

    /// A connection that ends while it carries frames is a failover, counted once; one that
    /// ends idle is not, nor is the reconnect.
    #[test]
    fn failover_is_counted_when_a_carrying_connection_ends() {
        for carrying in [true, false] {
            let t0 = Instant::now();
            let mut s = with_rtts(Policy::Fastest, &[40, 80], t0);
            if carrying {
                s.insert(id(0, 0), ECG, frame(100), t0);
                assert_eq!(sends(&s.poll(t0)), vec![(0, id(0, 0), Lane::Live)]);
            } else {
                assert!(s.poll(t0).is_empty());
            }
            let t1 = t0 + ms(10);
            s.on_disconnected(0, 1);
            let resent = sends(&s.poll(t1));
            // Reconnected before anything else is judged: still counted once.
            s.on_connected(0, 2, t1 + ms(1));
            for step in 0..20u64 {
                s.poll(t1 + ms(2 + 10 * step));
            }
            if carrying {
                assert_eq!(resent, vec![(1, id(0, 0), Lane::Live)]);
            } else {
                assert!(resent.is_empty());
            }
            assert_eq!(
                s.counters(0).failovers,
                u64::from(carrying),
                "carrying: {carrying}"
            );
        }
    }

    #[test]
    fn blackholed_bearer_fails_over_within_a_loss_detection_time() {
        // Virtual time: 40 ms frames, bearer 0 (fastest) stops answering at 2 s.
        let t0 = Instant::now();
        let mut s = with_rtts(Policy::Fastest, &[40, 60], t0);
        let mut delivered_at: BTreeMap<u64, Instant> = BTreeMap::new();
        let mut in_flight: Vec<(Instant, usize, FrameId)> = Vec::new();
        let mut rx = [1u64; 2];
        let blackhole = t0 + ms(2000);
        let rtt = [ms(40), ms(60)];
        for step in 0..1100u64 {
            let now = t0 + ms(5 * step);
            if step % 8 == 0 && step < 1000 {
                s.insert(id(0, step / 8), ECG, frame(600), now);
            }
            // Deliver acks whose round trip completed.
            in_flight.retain(|&(sent, b, fid)| {
                let lost = b == 0 && sent + rtt[0] / 2 >= blackhole;
                if lost {
                    return false;
                }
                if sent + rtt[b] <= now {
                    let a = s.on_ack(b, &[(fid.stream_id, fid.seq, fid.seq + 1)], now);
                    if !a.released.is_empty() {
                        delivered_at.entry(fid.seq).or_insert(sent + rtt[b] / 2);
                    }
                    false
                } else {
                    true
                }
            });
            for b in 0..2 {
                if b == 1 || now < blackhole {
                    rx[b] += 1;
                }
                s.on_path(
                    b,
                    PathSample {
                        rtt: rtt[b],
                        cwnd: 1 << 20,
                        rx_datagrams: rx[b],
                        ..PathSample::default()
                    },
                    now,
                );
            }
            for a in s.poll(now) {
                if let Action::Transmit(x) = a {
                    in_flight.push((now, x.bearer, x.id));
                }
            }
        }
        let seqs: Vec<u64> = delivered_at.keys().copied().collect();
        assert_eq!(
            seqs,
            (0..125).collect::<Vec<_>>(),
            "every frame arrives once"
        );
        let times: Vec<Instant> = delivered_at.values().copied().collect();
        let longest = times
            .windows(2)
            .map(|w| w[1].saturating_duration_since(w[0]))
            .max()
            .unwrap_or_default();
        // 2 x the other bearer's RTT + 100 ms.
        assert!(longest < ms(220), "longest gap {longest:?}");
        assert!(s.counters(0).failovers >= 1);
        assert_eq!(s.state(1, t0 + ms(5000)), LinkState::Up);
        assert_ne!(s.state(0, t0 + ms(5000)), LinkState::Up);
    }

    #[test]
    fn after_an_outage_the_live_lane_goes_before_the_backlog() {
        let t0 = Instant::now();
        let mut s = with_rtts(Policy::Fastest, &[40], t0);
        s.on_disconnected(0, 1);
        for i in 0..100u64 {
            s.insert(id(0, i), ECG, frame(100), t0 + ms(40 * i));
        }
        s.insert(id(2, 0), GPS, frame(10), t0 + ms(3990));
        let now = t0 + ms(4000);
        assert!(s.poll(now).is_empty(), "no bearer");
        s.on_connected(0, 2, now);
        let got = sends(&s.poll(now));
        // The last second of ECG (live) first, oldest of it first, then live GPS, then the
        // backlog; the backlog may use only half the in-flight allowance.
        // Produced at t0 + 3040 ms and later: within the last second.
        assert_eq!(got[0], (0, id(0, 76), Lane::Live));
        assert_eq!(got[23], (0, id(0, 99), Lane::Live));
        assert_eq!(got[24], (0, id(2, 0), Lane::Live));
        assert_eq!(got[25], (0, id(0, 0), Lane::CatchUp));
        assert_eq!(
            got.len(),
            32,
            "64 frames in flight at most, catch-up up to 32 of them"
        );
        assert_eq!(got[25..].iter().filter(|g| g.2 == Lane::CatchUp).count(), 7);
        // Live frames still go while the backlog fills its half.
        s.insert(id(0, 100), ECG, frame(100), now);
        assert_eq!(sends(&s.poll(now)), vec![(0, id(0, 100), Lane::Live)]);
    }

    #[test]
    fn full_store_evicts_location_before_ecg_and_counts() {
        let t0 = Instant::now();
        let mut c = cfg(Policy::Fastest);
        c.max_bytes = 40;
        let mut s = Scheduler::new(c, vec![None], t0);
        s.insert(id(2, 0), GPS, frame(10), t0);
        s.insert(id(2, 1), GPS, frame(10), t0);
        s.insert(id(0, 0), ECG, frame(10), t0);
        s.insert(id(0, 1), ECG, frame(10), t0);
        assert_eq!(
            s.insert(id(0, 2), ECG, frame(10), t0),
            vec![(id(2, 0), GPS)]
        );
        assert_eq!(
            s.insert(id(0, 3), ECG, frame(10), t0),
            vec![(id(2, 1), GPS)]
        );
        assert_eq!(
            s.insert(id(0, 4), ECG, frame(10), t0),
            vec![(id(0, 0), ECG)]
        );
        assert_eq!(
            s.insert(id(2, 2), GPS, frame(10), t0),
            vec![(id(2, 2), GPS)],
            "location never displaces ECG"
        );
        assert_eq!(s.bytes(), 40);
        assert_eq!(s.evicted()[3], 3);
        assert_eq!(s.evicted()[1], 1);
    }

    #[test]
    fn metered_bearer_only_when_nothing_else_can_carry() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(
            cfg(Policy::Fastest),
            vec![
                Some(Budget {
                    bytes: 150,
                    period: Duration::from_secs(3600),
                }),
                None,
            ],
            t0,
        );
        for (b, rtt) in [(0, 20), (1, 200)] {
            s.on_connected(b, 1, t0);
            s.on_path(
                b,
                PathSample {
                    rtt: ms(rtt),
                    cwnd: 1 << 20,
                    rx_datagrams: 1,
                    ..PathSample::default()
                },
                t0,
            );
        }
        s.insert(id(0, 0), ECG, frame(100), t0);
        s.insert(id(0, 1), ECG, frame(100), t0);
        let got = sends(&s.poll(t0));
        assert_eq!(got[0].0, 0, "fast metered bearer within its budget");
        assert_eq!(got[1].0, 1, "budget spent: the unmetered bearer");
        s.on_disconnected(1, 1);
        s.insert(id(0, 2), ECG, frame(100), t0);
        assert_eq!(
            sends(&s.poll(t0))[0].0,
            0,
            "over budget, but the only one left"
        );
    }

    #[test]
    fn a_wide_ack_releases_exactly_what_it_covers() {
        let t0 = Instant::now();
        let mut s = with_rtts(Policy::Fastest, &[40], t0);
        for seq in [5, 70_000, 1 << 39] {
            s.insert(id(0, seq), ECG, frame(10), t0);
        }
        s.insert(id(1, 6), ECG, frame(10), t0);
        assert_eq!(sends(&s.poll(t0)).len(), 4);
        let acked = s.on_ack(0, &[(0, 0, 1 << 39)], t0 + ms(40));
        let mut ids: Vec<FrameId> = acked.released.iter().map(|r| r.0).collect();
        ids.sort();
        assert_eq!(ids, vec![id(0, 5), id(0, 70_000)]);
        assert_eq!(s.len(), 2, "stream 1 and the seq beyond the range stay");
    }

    #[test]
    fn an_ack_for_frames_never_sent_on_its_connection_releases_nothing() {
        let t0 = Instant::now();
        let mut s = with_rtts(Policy::Fastest, &[40, 40], t0);
        s.on_disconnected(1, 1);
        for seq in 0..4 {
            s.insert(id(0, seq), ECG, frame(10), t0);
        }
        let sent = sends(&s.poll(t0));
        assert_eq!(sent.len(), 4);
        assert!(sent.iter().all(|x| x.0 == 0), "bearer 1 is down");
        s.insert(id(0, 4), ECG, frame(10), t0 + ms(50));
        // A fake (or broken) ingest on bearer 1 claims everything.
        s.on_connected(1, 2, t0 + ms(60));
        let bogus = s.on_ack(1, &[(0, 0, 1 << 40)], t0 + ms(61));
        assert_eq!((bogus.bogus, bogus.released.len()), (5, 0));
        assert_eq!(s.len(), 5, "nothing leaves the spool");
        // Even one unsent frame in a message makes the whole message untrusted.
        let mixed = s.on_ack(0, &[(0, 0, 5)], t0 + ms(62));
        assert_eq!((mixed.bogus, mixed.released.len()), (1, 0));
        // The honest acknowledgement of what was sent on bearer 0 still works.
        let honest = s.on_ack(0, &[(0, 0, 4)], t0 + ms(80));
        assert_eq!((honest.bogus, honest.released.len()), (0, 4));
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn reconnect_makes_everything_on_that_bearer_pending_again() {
        let t0 = Instant::now();
        let mut s = with_rtts(Policy::Fastest, &[40], t0);
        for i in 0..3 {
            s.insert(id(0, i), ECG, frame(10), t0);
        }
        assert_eq!(sends(&s.poll(t0)).len(), 3);
        s.on_disconnected(0, 1);
        s.on_connected(0, 2, t0 + ms(500));
        let again = s.poll(t0 + ms(500));
        assert_eq!(again.len(), 3);
        assert!(
            again
                .iter()
                .all(|a| matches!(a, Action::Transmit(x) if x.resend && x.generation == 2))
        );
    }
}
