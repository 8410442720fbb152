//! Sans-IO admission of incoming QUIC connections: an unauthenticated peer gets nothing that
//! costs more than it spent.
//!
//! Handshakes in progress are bounded on their own, apart from established sessions (which
//! count against `quic.max_connections` only once certificate and Hello checked out). When
//! handshakes pile up, or one address has many in progress, a peer whose address is not yet
//! validated is asked for a QUIC Retry: stateless for the ingest, one round trip for a real
//! client, and the end of a flood of spoofed or fire-and-forget Initials. A validated address
//! is refused only when every pending slot is taken or it alone holds its share; many
//! ambulances behind one carrier-grade NAT address therefore never lock each other out (their
//! handshakes finish in a round trip, and Retry, not refusal, is what meets their address
//! first).

use std::collections::HashMap;
use std::net::IpAddr;

/// Bounds of the admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Handshakes in progress at most (all addresses).
    pub max_pending: usize,
    /// Handshakes in progress at most from one address (validated).
    pub max_pending_per_source: usize,
    /// Past this many handshakes in progress, unvalidated addresses are sent a Retry.
    pub retry_above: usize,
    /// Past this many handshakes from one address, its unvalidated peers are sent a Retry.
    pub retry_above_per_source: usize,
}

/// What to do with an incoming connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Start the handshake; the caller must [`Admission::finish`] it when it ends.
    Accept,
    /// Answer with a stateless Retry (address validation).
    Retry,
    /// Refuse: too many handshakes in progress (`reason` is a metric label).
    Refuse {
        /// Bounded label: `pending_full` or `per_source`.
        reason: &'static str,
    },
}

/// Handshakes in progress, in total and per source address.
#[derive(Debug)]
pub struct Admission {
    limits: AdmissionLimits,
    pending: usize,
    per_source: HashMap<IpAddr, usize>,
}

impl Admission {
    /// No handshake in progress.
    pub fn new(limits: AdmissionLimits) -> Self {
        Self {
            limits,
            pending: 0,
            per_source: HashMap::new(),
        }
    }

    /// A new connection from `source`, whose address `validated` (it echoed a Retry token).
    pub fn decide(&mut self, source: IpAddr, validated: bool) -> Decision {
        let from_source = self.per_source.get(&source).copied().unwrap_or(0);
        let l = &self.limits;
        if !validated && (self.pending >= l.retry_above || from_source >= l.retry_above_per_source)
        {
            return Decision::Retry;
        }
        if self.pending >= l.max_pending {
            return Decision::Refuse {
                reason: "pending_full",
            };
        }
        if from_source >= l.max_pending_per_source {
            return Decision::Refuse {
                reason: "per_source",
            };
        }
        self.pending += 1;
        *self.per_source.entry(source).or_default() += 1;
        Decision::Accept
    }

    /// An accepted handshake from `source` ended (a session, a failure or a timeout).
    pub fn finish(&mut self, source: IpAddr) {
        self.pending = self.pending.saturating_sub(1);
        if let Some(n) = self.per_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&source);
            }
        }
    }

    /// Handshakes in progress.
    pub fn pending(&self) -> usize {
        self.pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> AdmissionLimits {
        AdmissionLimits {
            max_pending: 6,
            max_pending_per_source: 4,
            retry_above: 3,
            retry_above_per_source: 2,
        }
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    #[test]
    fn quiet_times_accept_without_a_retry() {
        let mut a = Admission::new(limits());
        assert_eq!(a.decide(ip(1), false), Decision::Accept);
        assert_eq!(a.decide(ip(2), false), Decision::Accept);
        a.finish(ip(1));
        a.finish(ip(2));
        assert_eq!(a.pending(), 0);
    }

    #[test]
    fn a_flood_of_unvalidated_initials_gets_retries_and_holds_nothing() {
        let mut a = Admission::new(limits());
        for n in 1..=3 {
            assert_eq!(a.decide(ip(n), false), Decision::Accept);
        }
        // Three pending: everyone unvalidated now pays a round trip first.
        for n in 0..200 {
            assert_eq!(a.decide(ip(n), false), Decision::Retry);
        }
        assert_eq!(a.pending(), 3, "retries cost no slot");
        // A real vehicle answers the Retry and is admitted.
        assert_eq!(a.decide(ip(9), true), Decision::Accept);
    }

    #[test]
    fn one_address_is_asked_to_validate_before_it_fills_its_share() {
        let mut a = Admission::new(limits());
        assert_eq!(a.decide(ip(1), false), Decision::Accept);
        assert_eq!(a.decide(ip(1), false), Decision::Accept);
        assert_eq!(a.decide(ip(1), false), Decision::Retry);
        // Behind a carrier NAT, validated peers of that address still get in ...
        assert_eq!(a.decide(ip(1), true), Decision::Accept);
        assert_eq!(a.decide(ip(1), true), Decision::Accept);
        // ... up to its share; other addresses are not affected.
        assert_eq!(
            a.decide(ip(1), true),
            Decision::Refuse {
                reason: "per_source"
            }
        );
        assert_eq!(a.decide(ip(2), true), Decision::Accept);
        assert_eq!(a.decide(ip(3), true), Decision::Accept);
        assert_eq!(
            a.decide(ip(4), true),
            Decision::Refuse {
                reason: "pending_full"
            }
        );
        for _ in 0..4 {
            a.finish(ip(1));
        }
        assert_eq!(a.decide(ip(1), true), Decision::Accept, "slots come back");
    }
}
