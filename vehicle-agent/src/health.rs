//! Sans-IO health estimate of one bearer: smoothed RTT and variance from our own
//! acknowledgements (RFC 6298 filter), loss and delivery rate from quinn's statistics, and a
//! liveness clock fed by anything received on the connection (acknowledgements, QUIC ACKs of
//! our data, answers to keep-alive probes on an idle bearer).
//!
//! The state follows SRT's rule: a bearer with data outstanding turns *suspect* when nothing
//! was heard for `2*SRTT + 4*RTTVAR` (floored) since the oldest outstanding frame was sent,
//! and *down* once that silence lasts `down_after` longer. An idle bearer is judged the same
//! way against its probe interval (two probes may go unanswered before it is suspect), so
//! failover takes a round trip, not the QUIC idle timeout.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
/// What the estimator says of a bearer.
pub enum LinkState {
    /// Heard from recently: carries traffic.
    Up,
    /// Nothing heard for the loss-detection time: its copies are re-sent elsewhere.
    Suspect,
    /// Silent for longer, or not connected: carries nothing.
    Down,
}

impl LinkState {
    /// Short name, a bounded metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Suspect => "suspect",
            Self::Down => "down",
        }
    }

    /// Gauge value: 2 up, 1 suspect, 0 down (alert on `< 2`).
    pub fn gauge(self) -> f64 {
        match self {
            Self::Up => 2.0,
            Self::Suspect => 1.0,
            Self::Down => 0.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
/// Timing of the estimator.
pub struct HealthConfig {
    /// Lower bound of the loss-detection time (SRT uses about 60 ms).
    pub suspect_floor: Duration,
    /// Silence beyond the suspect threshold after which the bearer is down.
    pub down_after: Duration,
    /// How often an idle bearer is probed (the QUIC keep-alive interval).
    pub probe_interval: Duration,
    /// Loss-detection time before any RTT sample exists.
    pub initial_loss_detection: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            suspect_floor: Duration::from_millis(60),
            down_after: Duration::from_millis(1000),
            probe_interval: Duration::from_millis(250),
            initial_loss_detection: Duration::from_millis(1000),
        }
    }
}

/// Delivery rate assumed before anything was measured: 1 Mbit/s, a modest cellular uplink.
const DEFAULT_RATE_BYTES_PER_S: f64 = 125_000.0;
/// Window over which acknowledged bytes are turned into a delivery-rate sample.
const RATE_WINDOW: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
/// Health estimate of one bearer, fed with acknowledgements and quinn's statistics.
pub struct Health {
    cfg: HealthConfig,
    srtt: Option<Duration>,
    rttvar: Duration,
    connected: bool,
    last_heard: Option<Instant>,
    rx_datagrams: u64,
    /// Packet loss ratio (EWMA over stats polls) from quinn's counters.
    loss: f64,
    lost_packets: u64,
    sent_packets: u64,
    /// Bytes per second: EWMA of acknowledged bytes per window.
    measured_rate: Option<f64>,
    /// Bytes per second the congestion controller allows (cwnd / RTT).
    cwnd_rate: Option<f64>,
    window_start: Option<Instant>,
    window_bytes: u64,
}

/// quinn's path statistics as the shell reads them from `Connection::stats()`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PathSample {
    /// quinn's smoothed RTT.
    pub rtt: Duration,
    /// Congestion window, bytes.
    pub cwnd: u64,
    /// Packets declared lost so far.
    pub lost_packets: u64,
    /// Packets sent so far.
    pub sent_packets: u64,
    /// UDP datagrams received so far (anything heard).
    pub rx_datagrams: u64,
}

impl Health {
    /// A bearer not yet connected.
    pub fn new(cfg: HealthConfig) -> Self {
        Self {
            cfg,
            srtt: None,
            rttvar: Duration::ZERO,
            connected: false,
            last_heard: None,
            rx_datagrams: 0,
            loss: 0.0,
            lost_packets: 0,
            sent_packets: 0,
            measured_rate: None,
            cwnd_rate: None,
            window_start: None,
            window_bytes: 0,
        }
    }

    /// A connection was established at `now`.
    pub fn on_connected(&mut self, now: Instant) {
        self.connected = true;
        self.last_heard = Some(now);
        self.rx_datagrams = 0;
        self.lost_packets = 0;
        self.sent_packets = 0;
        self.window_start = None;
        self.window_bytes = 0;
    }

    /// The connection ended.
    pub fn on_disconnected(&mut self) {
        self.connected = false;
    }

    /// When anything was last heard on this bearer's connection.
    pub fn last_heard(&self) -> Option<Instant> {
        self.last_heard
    }

    /// Whether a connection is established.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// An acknowledgement of a frame sent on this bearer at `sent_at` arrived.
    pub fn on_ack(&mut self, sent_at: Instant, bytes: usize, now: Instant) {
        self.last_heard = Some(now);
        let rtt = now.saturating_duration_since(sent_at);
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(srtt) => {
                let diff = srtt.abs_diff(rtt);
                self.rttvar = (self.rttvar * 3 + diff) / 4;
                self.srtt = Some((srtt * 7 + rtt) / 8);
            }
        }
        let start = *self.window_start.get_or_insert(now);
        self.window_bytes += bytes as u64;
        let elapsed = now.saturating_duration_since(start);
        if elapsed >= RATE_WINDOW {
            let sample = self.window_bytes as f64 / elapsed.as_secs_f64();
            self.measured_rate = Some(match self.measured_rate {
                None => sample,
                Some(r) => 0.75 * r + 0.25 * sample,
            });
            self.window_start = Some(now);
            self.window_bytes = 0;
        }
    }

    /// quinn's statistics, polled by the shell. Anything received counts as heard.
    pub fn on_path(&mut self, s: PathSample, now: Instant) {
        if s.rx_datagrams > self.rx_datagrams {
            self.last_heard = Some(now);
        }
        self.rx_datagrams = s.rx_datagrams;
        let (lost, sent) = (
            s.lost_packets.saturating_sub(self.lost_packets),
            s.sent_packets.saturating_sub(self.sent_packets),
        );
        if sent > 0 {
            let sample = (lost as f64 / sent as f64).min(1.0);
            self.loss = 0.9 * self.loss + 0.1 * sample;
        }
        self.lost_packets = s.lost_packets;
        self.sent_packets = s.sent_packets;
        if !s.rtt.is_zero() {
            self.cwnd_rate = Some(s.cwnd as f64 / s.rtt.as_secs_f64());
            if self.srtt.is_none() {
                // The handshake's RTT seeds the estimate until our own acks arrive.
                self.srtt = Some(s.rtt);
                self.rttvar = s.rtt / 2;
            }
        }
    }

    /// Smoothed RTT, once measured.
    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// RTT variance.
    pub fn rttvar(&self) -> Duration {
        self.rttvar
    }

    /// Smoothed packet loss ratio.
    pub fn loss(&self) -> f64 {
        self.loss
    }

    /// Bytes per second this bearer is expected to deliver.
    pub fn delivery_rate(&self) -> f64 {
        match (self.measured_rate, self.cwnd_rate) {
            (Some(a), Some(b)) => a.max(b),
            (Some(r), None) | (None, Some(r)) => r,
            (None, None) => DEFAULT_RATE_BYTES_PER_S,
        }
        .max(1.0)
    }

    /// How long a frame may stay unacknowledged before it counts as lost on this bearer.
    pub fn loss_detection_time(&self) -> Duration {
        match self.srtt {
            Some(srtt) => (srtt * 2 + self.rttvar * 4).max(self.cfg.suspect_floor),
            None => self.cfg.initial_loss_detection,
        }
    }

    /// Expected time for `queued_bytes` (including the frame to send) to be delivered.
    pub fn expected_delivery(&self, queued_bytes: usize) -> Duration {
        let srtt = self.srtt.unwrap_or(self.cfg.initial_loss_detection / 2);
        let queue = Duration::from_secs_f64(queued_bytes as f64 / self.delivery_rate());
        // A lost packet costs about one more round trip.
        srtt / 2 + queue + srtt.mul_f64(self.loss)
    }

    /// Silence allowed on an idle bearer: a probe answer is due every probe interval; one
    /// missed answer (a delayed ACK, a busy host) is not yet a failure.
    fn idle_allowance(&self) -> Duration {
        self.cfg.probe_interval * 2 + self.loss_detection_time()
    }

    /// State now, given when the oldest frame still outstanding on this bearer was sent.
    pub fn state(&self, now: Instant, oldest_outstanding: Option<Instant>) -> LinkState {
        let Some(heard) = self.last_heard.filter(|_| self.connected) else {
            return LinkState::Down;
        };
        let ld = self.loss_detection_time();
        let judge = |silence: Duration, allowed: Duration| {
            if silence > allowed + self.cfg.down_after {
                LinkState::Down
            } else if silence > allowed {
                LinkState::Suspect
            } else {
                LinkState::Up
            }
        };
        let idle = judge(now.saturating_duration_since(heard), self.idle_allowance());
        let busy = oldest_outstanding.map_or(LinkState::Up, |t| {
            judge(now.saturating_duration_since(t.max(heard)), ld)
        });
        worst(idle, busy)
    }

    /// When `state` may change next without new input (for the caller's timer).
    pub fn next_change(
        &self,
        now: Instant,
        oldest_outstanding: Option<Instant>,
    ) -> Option<Instant> {
        let heard = self.last_heard.filter(|_| self.connected)?;
        let ld = self.loss_detection_time();
        let idle_base = heard + self.idle_allowance();
        let busy_base = oldest_outstanding.map(|t| t.max(heard) + ld);
        [Some(idle_base), busy_base]
            .into_iter()
            .flatten()
            .flat_map(|base| [base, base + self.cfg.down_after])
            .filter(|p| *p > now)
            .min()
    }
}

fn worst(a: LinkState, b: LinkState) -> LinkState {
    match (a, b) {
        (LinkState::Down, _) | (_, LinkState::Down) => LinkState::Down,
        (LinkState::Suspect, _) | (_, LinkState::Suspect) => LinkState::Suspect,
        _ => LinkState::Up,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn connected(t0: Instant) -> Health {
        let mut h = Health::new(HealthConfig::default());
        h.on_connected(t0);
        h
    }

    #[test]
    fn rtt_filter_follows_rfc6298() {
        let t0 = Instant::now();
        let mut h = connected(t0);
        h.on_ack(t0, 100, t0 + ms(80));
        assert_eq!((h.srtt(), h.rttvar()), (Some(ms(80)), ms(40)));
        h.on_ack(t0 + ms(100), 100, t0 + ms(200));
        // srtt = 7/8*80 + 1/8*100 = 82.5; rttvar = 3/4*40 + 1/4*20 = 35
        assert_eq!(h.srtt(), Some(Duration::from_micros(82_500)));
        assert_eq!(h.rttvar(), ms(35));
        assert_eq!(h.loss_detection_time(), Duration::from_micros(305_000));
    }

    #[test]
    fn loss_detection_has_a_floor() {
        let t0 = Instant::now();
        let mut h = connected(t0);
        for i in 0..50 {
            let t = t0 + ms(10 * i);
            h.on_ack(t, 100, t + ms(2));
        }
        assert_eq!(h.loss_detection_time(), ms(60));
    }

    #[test]
    fn outstanding_data_without_answer_turns_suspect_then_down() {
        let t0 = Instant::now();
        let mut h = connected(t0);
        for i in 0..20 {
            let t = t0 + ms(100 * i);
            h.on_ack(t, 1000, t + ms(80));
        }
        let ld = h.loss_detection_time();
        assert!(ld >= ms(160) && ld < ms(200), "{ld:?}");
        let heard = t0 + ms(1980);
        let sent = heard + ms(10);
        assert_eq!(h.state(sent + ld - ms(1), Some(sent)), LinkState::Up);
        assert_eq!(h.state(sent + ld + ms(1), Some(sent)), LinkState::Suspect);
        assert_eq!(h.next_change(sent, Some(sent)), Some(sent + ld));
        assert_eq!(h.state(sent + ld + ms(1001), Some(sent)), LinkState::Down);
        // Anything heard (a QUIC ACK of our packets) keeps a bearer up while its acks lag.
        h.on_path(
            PathSample {
                rx_datagrams: 5,
                ..PathSample::default()
            },
            sent + ld,
        );
        assert_eq!(h.state(sent + ld + ms(1), Some(sent)), LinkState::Up);
    }

    #[test]
    fn idle_bearer_is_judged_by_its_probes() {
        let t0 = Instant::now();
        let mut h = connected(t0);
        let ld = h.loss_detection_time();
        let probe = HealthConfig::default().probe_interval;
        assert_eq!(h.state(t0 + probe * 2 + ld - ms(1), None), LinkState::Up);
        assert_eq!(
            h.state(t0 + probe * 2 + ld + ms(1), None),
            LinkState::Suspect
        );
        let sample = |n| PathSample {
            rx_datagrams: n,
            rtt: ms(50),
            cwnd: 50_000,
            ..PathSample::default()
        };
        h.on_path(sample(1), t0 + ms(200));
        assert_eq!(h.state(t0 + ms(300), None), LinkState::Up);
        // The same counter again means nothing new arrived.
        h.on_path(sample(1), t0 + ms(5000));
        assert_eq!(h.state(t0 + ms(5000), None), LinkState::Down);
        h.on_disconnected();
        assert_eq!(h.state(t0 + ms(5000), None), LinkState::Down);
        assert_eq!(h.next_change(t0, None), None);
    }

    #[test]
    fn delivery_rate_and_loss_from_stats_and_acks() {
        let t0 = Instant::now();
        let mut h = connected(t0);
        assert_eq!(h.delivery_rate(), DEFAULT_RATE_BYTES_PER_S);
        h.on_path(
            PathSample {
                rtt: ms(100),
                cwnd: 100_000,
                lost_packets: 10,
                sent_packets: 100,
                rx_datagrams: 1,
            },
            t0,
        );
        assert!((h.delivery_rate() - 1_000_000.0).abs() < 1.0);
        assert!((h.loss() - 0.01).abs() < 1e-9, "{}", h.loss());
        assert_eq!(h.srtt(), Some(ms(100)), "seeded by the handshake RTT");
        // Slower queue -> later expected delivery.
        assert!(h.expected_delivery(1_000_000) > h.expected_delivery(1_000));
        assert!(h.expected_delivery(0) >= ms(50));
    }
}
