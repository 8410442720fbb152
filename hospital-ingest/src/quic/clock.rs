//! Clock exchanges of one bearer connection, ingest side (sans-IO): answers each Ping with a
//! Pong and, when the next Ping reports when that Pong arrived, holds all four times of the
//! exchange ([`relay_proto::clock`]). The ingest so estimates the vehicle's clock from its own
//! receive and send times, not from a figure the vehicle claims.

use relay_proto::clock::Exchange;
use relay_proto::wire::v1::{Ping, Pong};

/// The last exchange answered, waiting for its t4: id, t1, t2, t3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Answered {
    id: u64,
    t1: i64,
    t2: i64,
    t3: i64,
}

/// Pings closer together than this are not answered: the agent sends one every 10 s, and a
/// flood of them must not cost more than a trickle.
pub const MIN_PING_INTERVAL_NS: i64 = 1_000_000_000;

/// One connection's clock exchanges.
#[derive(Debug, Default)]
pub struct ServerClock {
    answered: Option<Answered>,
    /// When the last Ping answered arrived.
    last_ping_ns: Option<i64>,
}

impl ServerClock {
    /// After the Hello exchange (id 0): the agent's Hello time, when it arrived, when the
    /// HelloAck left.
    pub fn after_hello(agent_time_ns: i64, received_ns: i64, ack_sent_ns: i64) -> Self {
        Self {
            answered: Some(Answered {
                id: 0,
                t1: agent_time_ns,
                t2: received_ns,
                t3: ack_sent_ns,
            }),
            last_ping_ns: None,
        }
    }

    /// A Ping received at `received_ns`, answered at `now_ns`: the Pong to send, and the
    /// earlier exchange the Ping completes (if it reports the one we answered last). None:
    /// it came within [`MIN_PING_INTERVAL_NS`] of the last Ping answered and is ignored.
    pub fn on_ping(
        &mut self,
        ping: &Ping,
        received_ns: i64,
        now_ns: i64,
    ) -> Option<(Pong, Option<Exchange>)> {
        // The Hello exchange does not count: the first Ping follows it at once.
        if let Some(last) = self.last_ping_ns
            && received_ns.saturating_sub(last).saturating_abs() < MIN_PING_INTERVAL_NS
        {
            return None;
        }
        self.last_ping_ns = Some(received_ns);
        let completed = match (self.answered, &ping.previous) {
            (Some(a), Some(p)) if p.id == a.id => Some(Exchange {
                t1: a.t1,
                t2: a.t2,
                t3: a.t3,
                t4: p.agent_receive_ns,
            }),
            _ => None,
        };
        self.answered = Some(Answered {
            id: ping.id,
            t1: ping.agent_send_ns,
            t2: received_ns,
            t3: now_ns,
        });
        let pong = Pong {
            id: ping.id,
            agent_send_ns: ping.agent_send_ns,
            ingest_receive_ns: received_ns,
            ingest_send_ns: now_ns,
        };
        Some((pong, completed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_proto::wire::v1::PongReceived;

    const MS: i64 = 1_000_000;
    const T0: i64 = 1_800_000_000_000_000_000;

    #[test]
    fn each_ping_completes_the_exchange_before_it() {
        // Vehicle 5 s ahead, 20 ms each way.
        let theta = 5000 * MS;
        let mut c = ServerClock::after_hello(T0 + theta, T0 + 20 * MS, T0 + 21 * MS);
        let ping = Ping {
            id: 1,
            agent_send_ns: T0 + 50 * MS + theta,
            previous: Some(PongReceived {
                id: 0,
                agent_receive_ns: T0 + 41 * MS + theta,
            }),
        };
        let (pong, hello) = c.on_ping(&ping, T0 + 70 * MS, T0 + 70 * MS).unwrap();
        assert_eq!(hello.unwrap().sample().unwrap().offset_ns, theta);
        assert_eq!(
            (pong.id, pong.ingest_receive_ns, pong.ingest_send_ns),
            (1, T0 + 70 * MS, T0 + 70 * MS)
        );
        // A report naming another exchange than the one answered last completes nothing.
        let stray = Ping {
            id: 2,
            agent_send_ns: T0,
            previous: Some(PongReceived {
                id: 7,
                agent_receive_ns: T0,
            }),
        };
        // Within a second of the last one: not answered at all.
        assert!(c.on_ping(&stray, T0 + 900 * MS, T0 + 900 * MS).is_none());
        let at = T0 + 1100 * MS;
        assert!(c.on_ping(&stray, at, at).unwrap().1.is_none());
        let next = Ping {
            id: 3,
            agent_send_ns: T0 + 200 * MS + theta,
            previous: Some(PongReceived {
                id: 2,
                agent_receive_ns: T0 + 100 * MS + theta,
            }),
        };
        // Ping 2's exchange is completed with the times the ingest kept for it.
        let at = T0 + 2200 * MS;
        let e = c.on_ping(&next, at, at).unwrap().1.unwrap();
        assert_eq!(
            e,
            Exchange {
                t1: T0,
                t2: T0 + 1100 * MS,
                t3: T0 + 1100 * MS,
                t4: T0 + 100 * MS + theta
            }
        );
    }
}
