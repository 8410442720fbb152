//! Clock offset of a vehicle to the ingest, NTP-style (RFC 5905's on-wire calculation and a
//! minimum-delay filter), shared by both sides: each exchange has four times, t1 and t4 on the
//! vehicle's clock (Ping sent, Pong received), t2 and t3 on the ingest's (Ping received, Pong
//! sent). With the vehicle clock at ingest + θ and one-way delays d↑ and d↓,
//! `((t1 - t2) + (t4 - t3)) / 2 = θ + (d↓ - d↑) / 2`, so the estimate is off by at most half
//! the round trip `(t4 - t1) - (t3 - t2)`. Queues on a cellular uplink make the delays vary
//! by hundreds of milliseconds; the exchange with the shortest round trip among the latest
//! ones has the least room for asymmetry, so [`ClockFilter`] keeps that one.
//!
//! Pure arithmetic on times given by the caller: tested without clocks or sockets.

use crate::model::ClockOffset;

/// The four times of one exchange, UTC ns (t1, t4 vehicle clock; t2, t3 ingest clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exchange {
    /// Ping sent (vehicle).
    pub t1: i64,
    /// Ping received (ingest).
    pub t2: i64,
    /// Pong sent (ingest).
    pub t3: i64,
    /// Pong received (vehicle).
    pub t4: i64,
}

/// Why an exchange cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ExchangeError {
    /// The round trip comes out negative or longer than [`MAX_ROUND_TRIP_NS`]: a clock stepped
    /// during the exchange, or a peer reported nonsense.
    #[error("round trip of {0} ns is impossible")]
    RoundTrip(i128),
    /// The ingest held the Ping for a negative time or longer than the round trip allows.
    #[error("ingest processing time of {0} ns is impossible")]
    Processing(i128),
}

/// Longest round trip an exchange may take (a Pong that queued this long says nothing).
pub const MAX_ROUND_TRIP_NS: i128 = 60_000_000_000;

/// One usable exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Vehicle clock minus ingest clock.
    pub offset_ns: i64,
    /// Network round trip (ingest processing time excluded).
    pub round_trip_ns: i64,
    /// When it was measured, ingest clock (t3).
    pub measured_ns: i64,
}

impl Exchange {
    /// The offset and round trip it gives, in 128-bit arithmetic since the times come from
    /// the network.
    pub fn sample(&self) -> Result<Sample, ExchangeError> {
        let (t1, t2, t3, t4) = (
            i128::from(self.t1),
            i128::from(self.t2),
            i128::from(self.t3),
            i128::from(self.t4),
        );
        let processing = t3 - t2;
        let round_trip = (t4 - t1) - processing;
        if !(0..=MAX_ROUND_TRIP_NS).contains(&round_trip) {
            return Err(ExchangeError::RoundTrip(round_trip));
        }
        if !(0..=MAX_ROUND_TRIP_NS).contains(&processing) {
            return Err(ExchangeError::Processing(processing));
        }
        let offset = ((t1 - t2) + (t4 - t3)) / 2;
        Ok(Sample {
            offset_ns: i64::try_from(offset).unwrap_or(if offset < 0 {
                i64::MIN
            } else {
                i64::MAX
            }),
            // Bounded by MAX_ROUND_TRIP_NS above.
            round_trip_ns: round_trip as i64,
            measured_ns: self.t3,
        })
    }
}

/// Samples a filter compares (NTP's clock filter keeps eight).
pub const FILTER_SAMPLES: usize = 8;

/// The latest [`FILTER_SAMPLES`] samples; the estimate is the one with the shortest round
/// trip. Bounded: a fixed array, whatever a peer sends.
#[derive(Debug, Clone, Default)]
pub struct ClockFilter {
    samples: [Option<Sample>; FILTER_SAMPLES],
    next: usize,
}

impl ClockFilter {
    /// An empty filter.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a sample, replacing the oldest.
    pub fn add(&mut self, s: Sample) {
        self.samples[self.next] = Some(s);
        self.next = (self.next + 1) % FILTER_SAMPLES;
    }

    /// Adds the sample of `exchange` if it is usable.
    pub fn add_exchange(&mut self, exchange: &Exchange) -> Result<Sample, ExchangeError> {
        let s = exchange.sample()?;
        self.add(s);
        Ok(s)
    }

    /// The sample with the shortest round trip (the latest of equals), if any.
    pub fn best(&self) -> Option<Sample> {
        let mut best: Option<Sample> = None;
        for s in self.samples.iter().flatten() {
            if best.is_none_or(|b| {
                s.round_trip_ns < b.round_trip_ns
                    || (s.round_trip_ns == b.round_trip_ns && s.measured_ns > b.measured_ns)
            }) {
                best = Some(*s);
            }
        }
        best
    }

    /// The estimate as subscribers receive it.
    pub fn estimate(&self) -> Option<ClockOffset> {
        self.best().map(|s| ClockOffset {
            offset_ns: s.offset_ns,
            uncertainty_ns: (s.round_trip_ns + 1) / 2,
            measured_time_ns: s.measured_ns,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: i64 = 1_000_000;
    const T0: i64 = 1_800_000_000_000_000_000;

    /// An exchange over a path with the given one-way delays, vehicle clock `theta` ahead,
    /// the ingest holding the Ping for `hold`.
    fn exchange(start: i64, theta: i64, up: i64, hold: i64, down: i64) -> Exchange {
        let t1_true = start;
        Exchange {
            t1: t1_true + theta,
            t2: t1_true + up,
            t3: t1_true + up + hold,
            t4: t1_true + up + hold + down + theta,
        }
    }

    #[test]
    fn symmetric_paths_give_the_exact_offset() {
        for theta in [0, 5_000 * MS, -3_700 * MS, 1] {
            let s = exchange(T0, theta, 40 * MS, 2 * MS, 40 * MS)
                .sample()
                .unwrap();
            assert_eq!(s.offset_ns, theta);
            assert_eq!(s.round_trip_ns, 80 * MS);
        }
    }

    #[test]
    fn asymmetry_errs_by_at_most_half_the_round_trip() {
        // A cellular uplink queueing 300 ms one way.
        let theta = 5_000 * MS;
        let s = exchange(T0, theta, 330 * MS, MS, 30 * MS).sample().unwrap();
        let error = (s.offset_ns - theta).abs();
        assert_eq!(error, 150 * MS);
        assert!(error <= s.round_trip_ns / 2);
    }

    #[test]
    fn the_filter_keeps_the_shortest_round_trip_of_the_latest_samples() {
        let theta = 5_000 * MS;
        let mut f = ClockFilter::new();
        assert_eq!(f.estimate(), None);
        // Queued exchanges first, then one over an idle path.
        for (i, up) in [400, 250, 600].into_iter().enumerate() {
            f.add_exchange(&exchange(
                T0 + i as i64 * 1000 * MS,
                theta,
                up * MS,
                0,
                20 * MS,
            ))
            .unwrap();
        }
        f.add_exchange(&exchange(T0 + 5000 * MS, theta, 21 * MS, 0, 20 * MS))
            .unwrap();
        let e = f.estimate().unwrap();
        assert!((e.offset_ns - theta).abs() <= e.uncertainty_ns, "{e:?}");
        assert_eq!(e.uncertainty_ns, 41 * MS / 2);
        assert_eq!(e.measured_time_ns, T0 + 5000 * MS + 21 * MS);
        // Eight worse samples later, the good one has aged out: the clock may have drifted.
        for i in 0..FILTER_SAMPLES as i64 {
            f.add_exchange(&exchange(
                T0 + (10 + i) * 1000 * MS,
                theta,
                100 * MS,
                0,
                100 * MS,
            ))
            .unwrap();
        }
        assert_eq!(f.estimate().unwrap().uncertainty_ns, 100 * MS);
    }

    #[test]
    fn impossible_exchanges_are_refused_without_overflow() {
        let mut f = ClockFilter::new();
        // The Pong "arrived" before the Ping left: a clock stepped back.
        let stepped = Exchange {
            t1: T0,
            t2: T0,
            t3: T0,
            t4: T0 - MS,
        };
        assert!(matches!(
            f.add_exchange(&stepped),
            Err(ExchangeError::RoundTrip(_))
        ));
        let extreme = Exchange {
            t1: i64::MIN,
            t2: i64::MAX,
            t3: i64::MAX,
            t4: i64::MAX,
        };
        assert!(f.add_exchange(&extreme).is_err());
        let negative_hold = Exchange {
            t1: T0,
            t2: T0 + 10 * MS,
            t3: T0,
            t4: T0 + MS,
        };
        assert!(matches!(
            f.add_exchange(&negative_hold),
            Err(ExchangeError::Processing(_))
        ));
        // Offsets as large as i64 allows still come out without wrapping.
        let far = Exchange {
            t1: i64::MAX - 10,
            t2: i64::MIN + 10,
            t3: i64::MIN + 10,
            t4: i64::MAX - 10,
        };
        assert_eq!(far.sample().unwrap().offset_ns, i64::MAX);
        assert_eq!(f.estimate(), None);
    }
}
