//! Sans-IO redial policy of one bearer: when to start a connection attempt, how many may be in
//! flight, and how long to wait after a refusal.
//!
//! A silent path (a dead zone: the handshake times out) costs the ingest nothing, so attempts
//! go on at a steady pace, staggered every `redial_interval` with up to `max_in_flight` at
//! once: a bearer that comes back is found within about one interval, whatever the handshake
//! timeout. A refusal (the ingest answered and said no, or the connection broke in a way that
//! is not silence) backs off exponentially with jitter, so a fleet does not hammer an ingest
//! that is shutting down or overloaded. A bearer whose socket cannot be bound (the modem or its
//! interface is missing) waits `max_backoff` before trying again.
//!
//! The shell feeds outcomes and time in and starts an attempt whenever [`Redial::poll_dial`]
//! says so; it wakes at [`Redial::poll_timeout`].

use std::time::Duration;

use tokio::time::Instant;

/// Timing of the redial policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedialConfig {
    /// First wait after a refusal.
    pub initial_backoff: Duration,
    /// Longest wait after refusals, and the wait after a failed bind.
    pub max_backoff: Duration,
    /// Pace of new attempts while the path is silent.
    pub redial_interval: Duration,
    /// Attempts in flight at most.
    pub max_in_flight: usize,
}

/// How a connection attempt ended, as far as the policy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DialOutcome {
    /// Handshake and Hello done: the bearer is connected (the shell abandons the other
    /// attempts).
    Connected,
    /// Nothing answered in time: the path is silent.
    Silent,
    /// The ingest or the network said no (the shell abandons the other attempts).
    Refused,
    /// The bearer's socket could not be bound.
    BindFailed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Starting attempts; the next one is due at `next`.
    Dialling {
        next: Instant,
    },
    /// Waiting out a refusal or a failed bind.
    Waiting {
        until: Instant,
    },
    Connected,
    Stopped,
}

/// The redial state machine of one bearer.
#[derive(Debug, Clone)]
pub struct Redial {
    cfg: RedialConfig,
    state: State,
    in_flight: usize,
    backoff: Duration,
}

impl Redial {
    /// A bearer that wants a connection from `now` on.
    pub fn new(cfg: RedialConfig, now: Instant) -> Self {
        Self {
            cfg,
            state: State::Dialling { next: now },
            in_flight: 0,
            backoff: cfg.initial_backoff,
        }
    }

    /// Whether to start an attempt now. Each `true` counts one attempt in flight until its
    /// outcome is handled.
    pub fn poll_dial(&mut self, now: Instant) -> bool {
        if let State::Waiting { until } = self.state
            && now >= until
        {
            self.state = State::Dialling { next: now };
        }
        match self.state {
            State::Dialling { next } if now >= next && self.in_flight < self.cfg.max_in_flight => {
                self.in_flight += 1;
                self.state = State::Dialling {
                    next: now + self.cfg.redial_interval,
                };
                true
            }
            _ => false,
        }
    }

    /// An attempt ended. `jitter` (drawn by the shell, 0.8..1.2 in production) scales the
    /// wait after a refusal so that vehicles refused together do not return together.
    pub fn handle_outcome(&mut self, now: Instant, outcome: DialOutcome, jitter: f64) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if matches!(self.state, State::Connected | State::Stopped) {
            return;
        }
        match outcome {
            DialOutcome::Connected => {
                self.in_flight = 0;
                self.backoff = self.cfg.initial_backoff;
                self.state = State::Connected;
            }
            DialOutcome::Silent => {}
            DialOutcome::Refused => {
                self.in_flight = 0;
                self.state = State::Waiting {
                    until: now + self.backoff.mul_f64(jitter.clamp(0.0, 10.0)),
                };
                self.backoff = (self.backoff * 2).min(self.cfg.max_backoff);
            }
            DialOutcome::BindFailed => {
                self.in_flight = 0;
                self.state = State::Waiting {
                    until: now + self.cfg.max_backoff,
                };
            }
        }
    }

    /// The established connection ended: dial again at once. A connection that broke with a
    /// refusal (the ingest closed it) should be reported with [`Redial::handle_refused`]
    /// instead.
    pub fn handle_disconnected(&mut self, now: Instant) {
        if self.state == State::Connected {
            self.state = State::Dialling { next: now };
        }
    }

    /// The established connection was closed by the ingest: back off as after a refusal.
    pub fn handle_refused(&mut self, now: Instant, jitter: f64) {
        if self.state == State::Connected {
            self.state = State::Dialling { next: now };
            self.in_flight = 1;
            self.handle_outcome(now, DialOutcome::Refused, jitter);
        }
    }

    /// The agent is stopping: no more attempts.
    pub fn stop(&mut self) {
        self.state = State::Stopped;
    }

    /// Whether a connection is established.
    pub fn is_connected(&self) -> bool {
        self.state == State::Connected
    }

    /// Attempts started and not yet ended.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The wait the next refusal would cost (before jitter).
    pub fn backoff(&self) -> Duration {
        self.backoff
    }

    /// When `poll_dial` may say yes next without new input.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Dialling { next } if self.in_flight < self.cfg.max_in_flight => Some(next),
            State::Waiting { until } => Some(until),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn cfg() -> RedialConfig {
        RedialConfig {
            initial_backoff: ms(500),
            max_backoff: ms(4000),
            redial_interval: ms(500),
            max_in_flight: 3,
        }
    }

    /// Times at which attempts start between `from` and `to`, stepping to each timeout.
    fn attempts(r: &mut Redial, from: Instant, to: Instant) -> Vec<Duration> {
        let mut out = Vec::new();
        let mut now = from;
        while now <= to {
            while r.poll_dial(now) {
                out.push(now - from);
            }
            match r.poll_timeout() {
                Some(t) if t > now => now = t,
                _ => break,
            }
        }
        out
    }

    #[test]
    fn a_silent_path_is_dialled_at_a_steady_staggered_pace() {
        let t0 = Instant::now();
        let mut r = Redial::new(cfg(), t0);
        // Three in flight at most: attempts at 0, 0.5, 1.0 s, then none until one ends.
        assert_eq!(
            attempts(&mut r, t0, t0 + ms(3000)),
            vec![ms(0), ms(500), ms(1000)]
        );
        assert_eq!(r.poll_timeout(), None, "all slots taken");
        r.handle_outcome(t0 + ms(3000), DialOutcome::Silent, 1.0);
        assert!(
            r.poll_dial(t0 + ms(3000)),
            "a slot freed by silence is used at once"
        );
        assert_eq!(r.backoff(), ms(500), "silence does not back off");
    }

    #[test]
    fn refusals_back_off_exponentially_up_to_the_bound_and_connecting_resets() {
        let t0 = Instant::now();
        let mut r = Redial::new(cfg(), t0);
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..5 {
            assert!(r.poll_dial(now));
            r.handle_outcome(now, DialOutcome::Refused, 1.0);
            let until = r.poll_timeout().unwrap();
            waits.push(until - now);
            assert!(!r.poll_dial(until - ms(1)), "not before the wait is over");
            now = until;
        }
        assert_eq!(waits, vec![ms(500), ms(1000), ms(2000), ms(4000), ms(4000)]);
        assert!(r.poll_dial(now));
        r.handle_outcome(now, DialOutcome::Connected, 1.0);
        assert!(r.is_connected());
        assert_eq!(r.poll_timeout(), None);
        assert_eq!(r.backoff(), ms(500));
        r.handle_disconnected(now + ms(10));
        assert!(
            r.poll_dial(now + ms(10)),
            "a lost connection is dialled again at once"
        );
    }

    #[test]
    fn jitter_scales_the_wait_and_a_failed_bind_waits_the_longest_backoff() {
        let t0 = Instant::now();
        let mut r = Redial::new(cfg(), t0);
        assert!(r.poll_dial(t0));
        r.handle_outcome(t0, DialOutcome::Refused, 1.2);
        assert_eq!(r.poll_timeout(), Some(t0 + ms(600)));
        let t1 = t0 + ms(600);
        assert!(r.poll_dial(t1));
        r.handle_outcome(t1, DialOutcome::BindFailed, 1.0);
        assert_eq!(r.poll_timeout(), Some(t1 + ms(4000)));
    }

    #[test]
    fn a_connection_closed_by_the_ingest_backs_off_and_stop_ends_dialling() {
        let t0 = Instant::now();
        let mut r = Redial::new(cfg(), t0);
        assert!(r.poll_dial(t0));
        r.handle_outcome(t0, DialOutcome::Connected, 1.0);
        r.handle_refused(t0 + ms(100), 1.0);
        assert_eq!(r.poll_timeout(), Some(t0 + ms(600)));
        r.stop();
        assert!(!r.poll_dial(t0 + ms(10_000)));
        assert_eq!(r.poll_timeout(), None);
    }
}
