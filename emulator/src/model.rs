//! Sans-IO model of one direction of a cellular link, fed with time (since the link started)
//! and packets. Order of effects, as in Mahimahi's nested shells: loss at the entrance, then a
//! drop-tail queue drained by the capacity (trace opportunities or a fixed rate), then
//! propagation delay plus jitter. A link that is down (scheduled blackout or runtime cut) drops
//! what is offered and anything that would leave or arrive while it is down.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::trace::{OPPORTUNITY_BYTES, Trace};

/// Runtime cuts remembered to judge packets still in flight.
const MAX_CUT_HISTORY: usize = 64;

/// How fast the bottleneck drains.
#[derive(Debug, Clone)]
pub enum Capacity {
    /// Delivery opportunities from a trace, starting `offset` into it.
    /// A Mahimahi trace, started `offset` into it.
    Trace {
        /// The trace.
        trace: Arc<Trace>,
        /// Where in the trace time zero falls.
        offset: Duration,
    },
    /// A constant rate.
    /// A fixed rate.
    Rate {
        /// Bits per second.
        bits_per_second: u64,
    },
}

/// Bursty loss: a two-state Markov chain, evaluated once per packet.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct GilbertElliott {
    /// Probability of moving from the good to the bad state.
    pub p_good_to_bad: f64,
    /// Probability of moving from the bad to the good state.
    pub p_bad_to_good: f64,
    /// Loss probability in the bad state.
    pub loss_bad: f64,
    /// Loss probability in the good state.
    pub loss_good: f64,
}

impl GilbertElliott {
    /// Long-run loss rate of the chain.
    pub fn stationary_loss(&self) -> f64 {
        let denom = self.p_good_to_bad + self.p_bad_to_good;
        if denom <= 0.0 {
            return self.loss_good;
        }
        (self.p_good_to_bad * self.loss_bad + self.p_bad_to_good * self.loss_good) / denom
    }
}

/// Behaviour of one direction.
#[derive(Debug, Clone)]
pub struct DirectionParams {
    /// How many bytes the link carries when.
    pub capacity: Capacity,
    /// One-way propagation delay.
    pub delay: Duration,
    /// Each packet gets an extra uniform delay in `[0, jitter]`.
    pub jitter: Duration,
    /// Allow jitter to reorder packets; otherwise a packet never overtakes its predecessor.
    pub reorder: bool,
    /// Independent random loss probability.
    pub loss: f64,
    /// Bursty loss, when set.
    pub gilbert_elliott: Option<GilbertElliott>,
    /// Drop-tail bound on bytes waiting for capacity.
    pub queue_bytes: usize,
    /// Scheduled outages, as times since the link started.
    pub blackouts: Vec<Range<Duration>>,
}

impl Default for DirectionParams {
    fn default() -> Self {
        Self {
            capacity: Capacity::Rate {
                bits_per_second: 50_000_000,
            },
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            reorder: false,
            loss: 0.0,
            gilbert_elliott: None,
            queue_bytes: 256 * 1024,
            blackouts: Vec::new(),
        }
    }
}

impl DirectionParams {
    /// Whether a scheduled blackout covers `t`.
    pub fn is_scheduled_down(&self, t: Duration) -> bool {
        self.blackouts.iter().any(|b| b.contains(&t))
    }

    /// When the scheduled outage(s) covering `t` end; `None` if the link is up at `t`.
    pub fn blackout_end(&self, t: Duration) -> Option<Duration> {
        self.blackouts
            .iter()
            .filter(|b| b.contains(&t))
            .map(|b| b.end)
            .max()
    }
}

/// Packet and byte counts of one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DirectionCounters {
    /// Packets offered to the link.
    pub offered_packets: u64,
    /// Bytes offered to the link.
    pub offered_bytes: u64,
    /// Packets delivered.
    pub delivered_packets: u64,
    /// Bytes delivered.
    pub delivered_bytes: u64,
    /// Packets dropped by random loss.
    pub dropped_random_loss: u64,
    /// Packets dropped by the Gilbert-Elliott chain.
    pub dropped_burst_loss: u64,
    /// Packets dropped because the queue was full.
    pub dropped_queue_full: u64,
    /// Packets dropped because the link was down.
    pub dropped_link_down: u64,
}

impl DirectionCounters {
    /// Packets dropped, all causes.
    pub fn dropped(&self) -> u64 {
        self.dropped_random_loss
            + self.dropped_burst_loss
            + self.dropped_queue_full
            + self.dropped_link_down
    }

    /// Adds another direction's counters.
    pub fn add(&mut self, o: &Self) {
        self.offered_packets += o.offered_packets;
        self.offered_bytes += o.offered_bytes;
        self.delivered_packets += o.delivered_packets;
        self.delivered_bytes += o.delivered_bytes;
        self.dropped_random_loss += o.dropped_random_loss;
        self.dropped_burst_loss += o.dropped_burst_loss;
        self.dropped_queue_full += o.dropped_queue_full;
        self.dropped_link_down += o.dropped_link_down;
    }
}

/// What happened to an offered packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Accepted; it will be delivered unless the link goes down.
    Queued,
    /// Dropped by random loss.
    DroppedRandomLoss,
    /// Dropped by the Gilbert-Elliott chain.
    DroppedBurstLoss,
    /// Dropped: the queue was full.
    DroppedQueueFull,
    /// Dropped: the link is down.
    DroppedLinkDown,
}

/// A packet past the entrance: (delivery time, arrival order, departure from the bottleneck,
/// bytes). The order number is unique, so the heap orders by delivery time, then arrival.
type InFlight = (Duration, u64, Duration, Bytes);

/// One direction of an emulated link.
#[derive(Debug)]
pub struct Direction {
    params: DirectionParams,
    rng: ChaCha8Rng,
    ge_bad: bool,
    /// Departure time and size of packets still waiting for capacity (FIFO).
    waiting: VecDeque<(Duration, usize)>,
    waiting_bytes: usize,
    /// Trace: next unused opportunity, and bytes left of the last used one.
    next_opportunity: u64,
    credit: usize,
    credit_at: Duration,
    /// Fixed rate: when the server is free again.
    server_free_at: Duration,
    last_delivery: Duration,
    in_flight: BinaryHeap<Reverse<InFlight>>,
    next_id: u64,
    cut_since: Option<Duration>,
    cuts: VecDeque<Range<Duration>>,
    counters: DirectionCounters,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Direction {
    /// A direction with `params`; `seed` fixes every random choice.
    pub fn new(params: DirectionParams, seed: u64) -> Self {
        Self {
            params,
            rng: ChaCha8Rng::seed_from_u64(seed),
            ge_bad: false,
            waiting: VecDeque::new(),
            waiting_bytes: 0,
            next_opportunity: 0,
            credit: 0,
            credit_at: Duration::ZERO,
            server_free_at: Duration::ZERO,
            last_delivery: Duration::ZERO,
            in_flight: BinaryHeap::new(),
            next_id: 0,
            cut_since: None,
            cuts: VecDeque::new(),
            counters: DirectionCounters::default(),
        }
    }

    /// The parameters in force.
    pub fn params(&self) -> &DirectionParams {
        &self.params
    }

    /// Counters so far.
    pub fn counters(&self) -> DirectionCounters {
        self.counters
    }

    /// Bytes waiting for capacity at `now`.
    pub fn queued_bytes(&mut self, now: Duration) -> usize {
        self.release_departed(now);
        self.waiting_bytes
    }

    /// Runtime control: cut (`true`) or restore (`false`) the link.
    pub fn set_cut(&mut self, now: Duration, cut: bool) {
        match (cut, self.cut_since) {
            (true, None) => self.cut_since = Some(now),
            (false, Some(since)) => {
                self.cut_since = None;
                if self.cuts.len() == MAX_CUT_HISTORY {
                    self.cuts.pop_front();
                }
                self.cuts.push_back(since..now);
            }
            _ => {}
        }
    }

    /// Drops every limit from `now` on: packets still waiting for capacity (possibly behind a
    /// long trace gap) arrive at once, in order, and new packets meet an ideal link.
    pub fn lift(&mut self, now: Duration) {
        self.params = DirectionParams {
            queue_bytes: self.params.queue_bytes,
            ..DirectionParams::default()
        };
        self.cut_since = None;
        self.cuts.clear();
        self.waiting.clear();
        self.waiting_bytes = 0;
        self.server_free_at = now;
        self.last_delivery = now;
        self.in_flight = self
            .in_flight
            .drain()
            .map(|Reverse((at, id, depart, p))| Reverse((at.min(now), id, depart, p)))
            .collect();
    }

    /// Whether the link is down at `t` (scheduled blackout or runtime cut).
    pub fn is_down(&self, t: Duration) -> bool {
        self.params.is_scheduled_down(t)
            || self.cut_since.is_some_and(|since| t >= since)
            || self.cuts.iter().any(|c| c.contains(&t))
    }

    /// Offers a packet at `now`.
    pub fn offer(&mut self, now: Duration, packet: Bytes) -> Offer {
        let size = packet.len();
        self.counters.offered_packets += 1;
        self.counters.offered_bytes += size as u64;
        let verdict = self.judge(now, size);
        match verdict {
            Offer::Queued => {}
            Offer::DroppedRandomLoss => self.counters.dropped_random_loss += 1,
            Offer::DroppedBurstLoss => self.counters.dropped_burst_loss += 1,
            Offer::DroppedQueueFull => self.counters.dropped_queue_full += 1,
            Offer::DroppedLinkDown => self.counters.dropped_link_down += 1,
        }
        if verdict != Offer::Queued {
            return verdict;
        }
        let depart = self.departure(now, size);
        self.waiting.push_back((depart, size));
        self.waiting_bytes += size;
        let jitter = if self.params.jitter.is_zero() {
            Duration::ZERO
        } else {
            self.params.jitter.mul_f64(self.rng.random::<f64>())
        };
        let mut deliver = depart + self.params.delay + jitter;
        if !self.params.reorder {
            deliver = deliver.max(self.last_delivery);
        }
        self.last_delivery = self.last_delivery.max(deliver);
        let id = self.next_id;
        self.next_id += 1;
        self.in_flight.push(Reverse((deliver, id, depart, packet)));
        Offer::Queued
    }

    fn judge(&mut self, now: Duration, size: usize) -> Offer {
        if self.is_down(now) {
            return Offer::DroppedLinkDown;
        }
        // The loss draws happen for every packet in the same order, so a seed fixes the pattern.
        let random_loss = self.params.loss > 0.0 && self.rng.random::<f64>() < self.params.loss;
        let burst_loss = match self.params.gilbert_elliott {
            Some(ge) => {
                let flip = self.rng.random::<f64>();
                self.ge_bad = if self.ge_bad {
                    flip >= ge.p_bad_to_good
                } else {
                    flip < ge.p_good_to_bad
                };
                let p = if self.ge_bad {
                    ge.loss_bad
                } else {
                    ge.loss_good
                };
                self.rng.random::<f64>() < p
            }
            None => false,
        };
        if random_loss {
            return Offer::DroppedRandomLoss;
        }
        if burst_loss {
            return Offer::DroppedBurstLoss;
        }
        self.release_departed(now);
        if self.waiting_bytes + size > self.params.queue_bytes {
            return Offer::DroppedQueueFull;
        }
        Offer::Queued
    }

    fn release_departed(&mut self, now: Duration) {
        while let Some(&(depart, size)) = self.waiting.front() {
            if depart > now {
                break;
            }
            self.waiting.pop_front();
            self.waiting_bytes -= size;
        }
    }

    /// FIFO service: a packet's departure depends only on earlier packets and its arrival, so
    /// it is fixed when the packet enters the queue.
    fn departure(&mut self, arrival: Duration, size: usize) -> Duration {
        match &self.params.capacity {
            Capacity::Rate { bits_per_second } => {
                let tx =
                    Duration::from_secs_f64(size as f64 * 8.0 / (*bits_per_second).max(1) as f64);
                let start = self.server_free_at.max(arrival);
                self.server_free_at = start + tx;
                self.server_free_at
            }
            Capacity::Trace { trace, offset } => {
                let offset_ms = ms(*offset);
                let mut remaining = size;
                let mut depart = arrival;
                // Bytes left over from an opportunity this packet was already waiting for.
                if self.credit > 0 && self.credit_at >= arrival {
                    let take = self.credit.min(remaining);
                    self.credit -= take;
                    remaining -= take;
                    depart = self.credit_at;
                }
                while remaining > 0 {
                    let first = trace.first_at_or_after(ms(arrival).saturating_add(offset_ms));
                    let k = self.next_opportunity.max(first);
                    self.next_opportunity = k + 1;
                    let at = Duration::from_millis(trace.time_of_ms(k).saturating_sub(offset_ms));
                    let take = OPPORTUNITY_BYTES.min(remaining);
                    remaining -= take;
                    self.credit = OPPORTUNITY_BYTES - take;
                    self.credit_at = at;
                    depart = at;
                }
                depart
            }
        }
    }

    /// The next packet due for delivery at `now`, if any. Packets that left or would arrive
    /// while the link is down are dropped here.
    pub fn poll_transmit(&mut self, now: Duration) -> Option<Bytes> {
        while self
            .in_flight
            .peek()
            .is_some_and(|Reverse((at, ..))| *at <= now)
        {
            let Reverse((at, _, depart, packet)) = self.in_flight.pop()?;
            if self.is_down(depart) || self.is_down(at) {
                self.counters.dropped_link_down += 1;
                continue;
            }
            self.counters.delivered_packets += 1;
            self.counters.delivered_bytes += packet.len() as u64;
            return Some(packet);
        }
        None
    }

    /// When `poll_transmit` has something next.
    pub fn poll_timeout(&self) -> Option<Duration> {
        self.in_flight.peek().map(|Reverse((at, ..))| *at)
    }

    /// Earliest delivery possible for a packet offered at `t` on an idle link (loss aside):
    /// the first opportunity at or after `t` outside any blackout, plus the propagation delay.
    /// Runtime cuts are not known in advance and are ignored.
    pub fn earliest_delivery(params: &DirectionParams, t: Duration) -> Option<Duration> {
        // Offered inside a blackout: dropped; the sender must retry after it.
        if let Some(end) = params.blackout_end(t) {
            return Self::earliest_delivery(params, end);
        }
        let depart = match &params.capacity {
            Capacity::Rate { .. } => t,
            Capacity::Trace { trace, offset } => {
                let offset_ms = ms(*offset);
                let k = trace.first_at_or_after(ms(t).saturating_add(offset_ms));
                Duration::from_millis(trace.time_of_ms(k).saturating_sub(offset_ms))
            }
        };
        if let Some(end) = params.blackout_end(depart) {
            return Self::earliest_delivery(params, end);
        }
        Some(depart + params.delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped(name: &str) -> Arc<Trace> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../data/traces")
            .join(name);
        Arc::new(Trace::from_file(&p).unwrap())
    }

    fn packet(i: u64, size: usize) -> Bytes {
        let mut v = vec![0u8; size];
        v[..8].copy_from_slice(&i.to_be_bytes());
        Bytes::from(v)
    }

    fn id(p: &Bytes) -> u64 {
        u64::from_be_bytes(p[..8].try_into().unwrap())
    }

    /// Offers one packet every `every` until `until`, polling in 1 ms steps; returns
    /// (packet id, delivery time) in delivery order.
    fn drive(
        d: &mut Direction,
        every: Duration,
        size: usize,
        until: Duration,
        poll_until: Duration,
    ) -> Vec<(u64, Duration)> {
        let mut out = Vec::new();
        let mut next_offer = Duration::ZERO;
        let mut i = 0;
        let mut now = Duration::ZERO;
        while now <= poll_until {
            while next_offer <= now && next_offer < until {
                d.offer(next_offer, packet(i, size));
                i += 1;
                next_offer += every;
            }
            while let Some(p) = d.poll_transmit(now) {
                out.push((id(&p), now));
            }
            now += Duration::from_millis(1);
        }
        out
    }

    #[test]
    fn a_saturated_trace_link_delivers_the_trace_capacity_over_30_s() {
        for (name, offset_s) in [("ATT-LTE-driving.up", 0), ("TMobile-UMTS-driving.up", 300)] {
            let trace = shipped(name);
            let offset = Duration::from_secs(offset_s);
            let window = Duration::from_secs(30);
            let mut d = Direction::new(
                DirectionParams {
                    capacity: Capacity::Trace {
                        trace: trace.clone(),
                        offset,
                    },
                    queue_bytes: 1 << 20,
                    ..DirectionParams::default()
                },
                1,
            );
            // 1200-byte packets (QUIC-sized) every ms: far above the trace's capacity.
            let got = drive(&mut d, Duration::from_millis(1), 1200, window, window);
            let delivered_bytes = got.len() as f64 * 1200.0;
            let opp = trace.opportunities_between(offset_s * 1000, offset_s * 1000 + 30_000);
            let capacity_bytes = opp as f64 * OPPORTUNITY_BYTES as f64;
            let ratio = delivered_bytes / capacity_bytes;
            assert!(
                (0.98..=1.02).contains(&ratio),
                "{name}: delivered {delivered_bytes} B, trace capacity {capacity_bytes} B ({ratio:.4})"
            );
        }
    }

    #[test]
    fn random_loss_matches_its_setting() {
        let mut d = Direction::new(
            DirectionParams {
                loss: 0.05,
                queue_bytes: usize::MAX,
                ..DirectionParams::default()
            },
            7,
        );
        let n = 100_000;
        for i in 0..n {
            d.offer(Duration::from_micros(i * 100), packet(i, 100));
        }
        let c = d.counters();
        let rate = c.dropped_random_loss as f64 / n as f64;
        // 4.5 standard deviations of a binomial proportion.
        let tolerance = 4.5 * (0.05f64 * 0.95 / n as f64).sqrt();
        assert!((rate - 0.05).abs() < tolerance, "loss rate {rate}");
        assert_eq!(c.dropped(), c.dropped_random_loss);
    }

    #[test]
    fn gilbert_elliott_loss_has_its_rate_and_burst_length() {
        let ge = GilbertElliott {
            p_good_to_bad: 0.01,
            p_bad_to_good: 0.25,
            loss_bad: 1.0,
            loss_good: 0.0,
        };
        let mut d = Direction::new(
            DirectionParams {
                gilbert_elliott: Some(ge),
                queue_bytes: usize::MAX,
                ..DirectionParams::default()
            },
            11,
        );
        let n = 400_000u64;
        let mut lost = Vec::with_capacity(n as usize);
        for i in 0..n {
            let v = d.offer(Duration::from_micros(i * 10), packet(i, 64));
            lost.push(v == Offer::DroppedBurstLoss);
        }
        let rate = lost.iter().filter(|l| **l).count() as f64 / n as f64;
        let expected = ge.stationary_loss();
        assert!(
            (rate - expected).abs() < 0.1 * expected,
            "burst loss rate {rate}, expected {expected}"
        );
        let bursts = lost.windows(2).filter(|w| !w[0] && w[1]).count() as f64;
        let mean_burst = lost.iter().filter(|l| **l).count() as f64 / bursts;
        assert!(
            (mean_burst - 1.0 / ge.p_bad_to_good).abs() < 0.4,
            "mean burst length {mean_burst}"
        );
    }

    #[test]
    fn a_blackout_drops_everything_in_its_window() {
        let window = Duration::from_secs(2)..Duration::from_secs(5);
        let delay = Duration::from_millis(40);
        let mut d = Direction::new(
            DirectionParams {
                delay,
                jitter: Duration::from_millis(10),
                blackouts: vec![window.clone()],
                ..DirectionParams::default()
            },
            3,
        );
        let every = Duration::from_millis(5);
        let got = drive(
            &mut d,
            every,
            500,
            Duration::from_secs(8),
            Duration::from_secs(9),
        );
        let sent_at = |i: u64| every * i as u32;
        // `drive` polls in 1 ms steps, so a packet due just before the window shows up to 1 ms
        // late.
        let polled_window = window.start + Duration::from_millis(1)..window.end;
        assert!(got.iter().all(|(_, at)| !polled_window.contains(at)));
        assert!(got.iter().all(|(i, _)| !window.contains(&sent_at(*i))));
        // Everything offered well outside the window arrives.
        let offered = (Duration::from_secs(8).as_millis() / 5) as u64;
        let expect_missing = (0..offered)
            .filter(|i| {
                let t = sent_at(*i);
                t + delay + Duration::from_millis(11) >= window.start && t < window.end
            })
            .count();
        let strictly_inside = (0..offered)
            .filter(|i| window.contains(&sent_at(*i)))
            .count();
        let missing = offered as usize - got.len();
        assert!(
            missing >= strictly_inside && missing <= expect_missing,
            "missing {missing}"
        );
        assert_eq!(d.counters().dropped_link_down as usize, missing);
    }

    #[test]
    fn a_runtime_cut_drops_until_restored() {
        let mut d = Direction::new(DirectionParams::default(), 1);
        assert_eq!(d.offer(Duration::ZERO, packet(0, 100)), Offer::Queued);
        d.set_cut(Duration::from_millis(1), true);
        assert_eq!(
            d.offer(Duration::from_millis(2), packet(1, 100)),
            Offer::DroppedLinkDown
        );
        d.set_cut(Duration::from_millis(3), false);
        assert_eq!(
            d.offer(Duration::from_millis(4), packet(2, 100)),
            Offer::Queued
        );
        let mut got = Vec::new();
        while let Some(p) = d.poll_transmit(Duration::from_millis(10)) {
            got.push(id(&p));
        }
        assert_eq!(got, vec![0, 2]);
    }

    #[test]
    fn the_same_seed_gives_the_same_delivery_pattern() {
        let params = DirectionParams {
            capacity: Capacity::Trace {
                trace: shipped("TMobile-UMTS-driving.up"),
                offset: Duration::from_secs(17),
            },
            delay: Duration::from_millis(30),
            jitter: Duration::from_millis(20),
            reorder: true,
            loss: 0.02,
            gilbert_elliott: Some(GilbertElliott {
                p_good_to_bad: 0.02,
                p_bad_to_good: 0.3,
                loss_bad: 0.8,
                loss_good: 0.0,
            }),
            queue_bytes: 64 * 1024,
            blackouts: vec![Duration::from_secs(3)..Duration::from_secs(4)],
        };
        let run = |seed| {
            let mut d = Direction::new(params.clone(), seed);
            drive(
                &mut d,
                Duration::from_millis(2),
                1000,
                Duration::from_secs(10),
                Duration::from_secs(12),
            )
        };
        let a = run(42);
        assert!(a.len() > 300, "{} delivered", a.len());
        assert_eq!(a, run(42));
        assert_ne!(a, run(43));
    }

    #[test]
    fn without_reorder_jitter_keeps_the_order() {
        let mut d = Direction::new(
            DirectionParams {
                jitter: Duration::from_millis(50),
                ..DirectionParams::default()
            },
            5,
        );
        let got = drive(
            &mut d,
            Duration::from_millis(1),
            200,
            Duration::from_secs(2),
            Duration::from_secs(3),
        );
        assert_eq!(got.len(), 2000);
        assert!(got.windows(2).all(|w| w[0].0 < w[1].0));
    }

    #[test]
    fn lifting_releases_what_waits_behind_a_trace_gap() {
        let trace = Arc::new(Trace::parse(std::path::Path::new("gap"), "1\n60000\n").unwrap());
        let mut d = Direction::new(
            DirectionParams {
                capacity: Capacity::Trace {
                    trace,
                    offset: Duration::ZERO,
                },
                ..DirectionParams::default()
            },
            1,
        );
        d.offer(Duration::from_millis(10), packet(0, 1000));
        d.offer(Duration::from_millis(20), packet(1, 1000));
        assert_eq!(d.poll_transmit(Duration::from_secs(5)), None);
        d.lift(Duration::from_secs(5));
        d.offer(Duration::from_secs(5), packet(2, 1000));
        let got: Vec<u64> = std::iter::from_fn(|| d.poll_transmit(Duration::from_millis(5001)))
            .map(|p| id(&p))
            .collect();
        assert_eq!(got, vec![0, 1, 2]);
    }

    #[test]
    fn drop_tail_bounds_the_queue_in_bytes() {
        let mut d = Direction::new(
            DirectionParams {
                capacity: Capacity::Rate {
                    bits_per_second: 80_000,
                },
                queue_bytes: 10_000,
                ..DirectionParams::default()
            },
            1,
        );
        for i in 0..100 {
            d.offer(Duration::ZERO, packet(i, 1000));
        }
        assert_eq!(d.counters().dropped_queue_full, 90);
        assert!(d.queued_bytes(Duration::ZERO) <= 10_000);
        // 80 kbit/s drains one 1000-byte packet per 100 ms.
        assert_eq!(d.poll_transmit(Duration::from_millis(99)), None);
        assert!(d.poll_transmit(Duration::from_millis(100)).is_some());
    }

    #[test]
    fn oracle_waits_out_blackouts() {
        let p = DirectionParams {
            delay: Duration::from_millis(10),
            blackouts: vec![
                Duration::from_secs(1)..Duration::from_secs(2),
                Duration::from_millis(1500)..Duration::from_secs(3),
            ],
            ..DirectionParams::default()
        };
        let at = |ms: u64| Direction::earliest_delivery(&p, Duration::from_millis(ms)).unwrap();
        assert_eq!(at(500), Duration::from_millis(510));
        // Overlapping outages chain: the link is back at 3 s.
        assert_eq!(at(1200), Duration::from_millis(3010));
        assert_eq!(at(3000), Duration::from_millis(3010));
    }

    #[test]
    fn oracle_reproduces_the_reference_on_time_fractions() {
        // The reference: 40 ms frames over the shorter trace's length, 300 ms deadline.
        let att = DirectionParams {
            capacity: Capacity::Trace {
                trace: shipped("ATT-LTE-driving.up"),
                offset: Duration::ZERO,
            },
            ..DirectionParams::default()
        };
        let tmo = DirectionParams {
            capacity: Capacity::Trace {
                trace: shipped("TMobile-UMTS-driving.up"),
                offset: Duration::ZERO,
            },
            ..DirectionParams::default()
        };
        let end = Duration::from_millis(931_233);
        let deadline = Duration::from_millis(300);
        let (mut n, mut one, mut two) = (0u64, 0u64, 0u64);
        let mut t = Duration::from_millis(40);
        while t <= end {
            let a = Direction::earliest_delivery(&att, t).unwrap() - t;
            let b = Direction::earliest_delivery(&tmo, t).unwrap() - t;
            n += 1;
            one += u64::from(a <= deadline);
            two += u64::from(a.min(b) <= deadline);
            t += Duration::from_millis(40);
        }
        let (one, two) = (one as f64 / n as f64, two as f64 / n as f64);
        assert!((one - 0.885).abs() < 0.001, "ATT alone {one}");
        assert!((two - 0.998).abs() < 0.001, "ATT + T-Mobile {two}");
    }
}
