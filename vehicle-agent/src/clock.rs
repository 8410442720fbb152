//! The agent's wall clock and its offset to the ingest's.
//!
//! Capture times come from [`WallClock`]; each bearer connection runs a sans-IO [`ClockSync`]
//! that turns the Hello exchange and a periodic Ping on the control stream into NTP-style
//! exchanges ([`relay_proto::clock`]). The agent keeps the best of them (shortest round trip,
//! any bearer) as `relay_agent_clock_offset_seconds`; the ingest computes the same from its
//! side and tells subscribers. Nothing here changes a capture time: a vehicle whose clock is
//! off is reported, its data delivered as stamped.

use std::time::Duration;

use relay_proto::clock::Exchange;
use relay_proto::wire::v1::{HelloAck, Ping, Pong, PongReceived};
use tokio::time::Instant;

/// Interval between clock exchanges on a connection (the first goes right after HelloAck).
pub const PING_INTERVAL: Duration = Duration::from_secs(10);
/// A Ping unanswered this long is given up (the next one goes out).
pub const PING_TIMEOUT: Duration = Duration::from_secs(30);

/// The vehicle's wall clock, UTC ns. The system clock in service; tests give an agent a clock
/// that runs ahead or behind, as a router without time sync would.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WallClock {
    skew_ns: i64,
}

impl WallClock {
    /// The system clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// The system clock shifted by `skew_ns` (positive: ahead).
    pub fn skewed(skew_ns: i64) -> Self {
        Self { skew_ns }
    }

    /// Now, UTC ns.
    pub fn now_ns(&self) -> i64 {
        relay_ops::now_utc_ns().saturating_add(self.skew_ns)
    }
}

/// Clock exchanges of one connection, agent side.
#[derive(Debug)]
pub struct ClockSync {
    next_id: u64,
    /// The Ping awaiting its Pong: id, t1, when it gives up.
    outstanding: Option<(u64, i64, Instant)>,
    /// The last completed exchange, reported to the ingest in the next Ping.
    completed: Option<PongReceived>,
    next_ping: Instant,
    interval: Duration,
}

impl ClockSync {
    /// After the Hello exchange: `hello_sent_ns` (t1) and `ack_received_ns` (t4) on our clock,
    /// at `now`. Returns the Hello exchange, and schedules the first Ping at once (it carries
    /// t4 to the ingest).
    pub fn after_hello(
        now: Instant,
        interval: Duration,
        hello_sent_ns: i64,
        ack: &HelloAck,
        ack_received_ns: i64,
    ) -> (Self, Exchange) {
        let exchange = Exchange {
            t1: hello_sent_ns,
            t2: ack.hello_received_ns,
            t3: ack.ingest_time_ns,
            t4: ack_received_ns,
        };
        let sync = Self {
            next_id: 1,
            outstanding: None,
            completed: Some(PongReceived {
                id: 0,
                agent_receive_ns: ack_received_ns,
            }),
            next_ping: now,
            interval,
        };
        (sync, exchange)
    }

    /// The Ping to send now, stamped `wall_ns`, if one is due.
    pub fn poll_ping(&mut self, now: Instant, wall_ns: i64) -> Option<Ping> {
        if let Some((_, _, give_up)) = self.outstanding
            && now >= give_up
        {
            self.outstanding = None;
        }
        if self.outstanding.is_some() || now < self.next_ping {
            return None;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.outstanding = Some((id, wall_ns, now + PING_TIMEOUT));
        self.next_ping = now + self.interval;
        Some(Ping {
            id,
            agent_send_ns: wall_ns,
            previous: self.completed.take(),
        })
    }

    /// When [`ClockSync::poll_ping`] has something to do next.
    pub fn poll_timeout(&self) -> Instant {
        match self.outstanding {
            // The next Ping waits for this one's Pong or its giving up.
            Some((_, _, give_up)) => give_up,
            None => self.next_ping,
        }
    }

    /// A Pong arrived at `wall_ns` on our clock; the exchange it completes, if it answers the
    /// Ping we wait for (our own t1 is used, not the echo).
    pub fn on_pong(&mut self, pong: &Pong, wall_ns: i64) -> Option<Exchange> {
        let (id, t1, _) = self.outstanding?;
        if pong.id != id {
            return None;
        }
        self.outstanding = None;
        self.completed = Some(PongReceived {
            id,
            agent_receive_ns: wall_ns,
        });
        Some(Exchange {
            t1,
            t2: pong.ingest_receive_ns,
            t3: pong.ingest_send_ns,
            t4: wall_ns,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: i64 = 1_000_000;
    const T0: i64 = 1_800_000_000_000_000_000;

    #[test]
    fn pings_at_once_then_by_interval_each_reporting_the_last_exchange() {
        let now = Instant::now();
        let ack = HelloAck {
            protocol_version: relay_proto::PROTOCOL_VERSION,
            hello_received_ns: T0 - 5000 * MS + 20 * MS,
            ingest_time_ns: T0 - 5000 * MS + 21 * MS,
            ..Default::default()
        };
        // A vehicle clock 5 s ahead, 20 ms each way.
        let (mut sync, hello) = ClockSync::after_hello(now, PING_INTERVAL, T0, &ack, T0 + 41 * MS);
        assert_eq!(hello.sample().unwrap().offset_ns, 5000 * MS);
        let ping = sync.poll_ping(now, T0 + 42 * MS).unwrap();
        assert_eq!((ping.id, ping.agent_send_ns), (1, T0 + 42 * MS));
        assert_eq!(
            ping.previous,
            Some(PongReceived {
                id: 0,
                agent_receive_ns: T0 + 41 * MS
            })
        );
        // One Ping at a time, and not before the interval.
        assert!(sync.poll_ping(now + PING_INTERVAL, T0).is_none());
        let pong = Pong {
            id: 1,
            agent_send_ns: 0, // the echo is not trusted
            ingest_receive_ns: T0 - 5000 * MS + 62 * MS,
            ingest_send_ns: T0 - 5000 * MS + 62 * MS,
        };
        assert!(sync.on_pong(&Pong { id: 9, ..pong }, T0).is_none());
        let e = sync.on_pong(&pong, T0 + 82 * MS).unwrap();
        assert_eq!(e.sample().unwrap().offset_ns, 5000 * MS);
        assert!(sync.on_pong(&pong, T0 + 90 * MS).is_none(), "answered once");
        assert!(sync.poll_ping(now + Duration::from_secs(9), T0).is_none());
        assert_eq!(sync.poll_timeout(), now + PING_INTERVAL);
        let next = sync
            .poll_ping(now + PING_INTERVAL, T0 + 10_000 * MS)
            .unwrap();
        assert_eq!(next.id, 2);
        assert_eq!(next.previous.unwrap().agent_receive_ns, T0 + 82 * MS);
    }

    #[test]
    fn an_unanswered_ping_is_given_up() {
        let now = Instant::now();
        let (mut sync, _) =
            ClockSync::after_hello(now, PING_INTERVAL, T0, &HelloAck::default(), T0);
        let first = sync.poll_ping(now, T0).unwrap();
        assert!(sync.poll_ping(now + PING_TIMEOUT / 2, T0).is_none());
        assert_eq!(sync.poll_timeout(), now + PING_TIMEOUT);
        let second = sync.poll_ping(now + PING_TIMEOUT, T0).unwrap();
        assert_eq!(second.id, first.id + 1);
        assert_eq!(second.previous, None, "the lost exchange is not reported");
        // The late Pong of the first Ping completes nothing.
        let late = Pong {
            id: first.id,
            ..Pong::default()
        };
        assert!(sync.on_pong(&late, T0).is_none());
    }

    #[test]
    fn a_skewed_clock_runs_ahead_of_the_system_clock() {
        let ahead = WallClock::skewed(5000 * MS).now_ns() - WallClock::system().now_ns();
        assert!((4990 * MS..=5000 * MS).contains(&ahead), "{ahead}");
    }
}
