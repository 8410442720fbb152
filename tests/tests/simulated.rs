//! The long multi-bearer scenarios on the virtual-time harness (`relay_e2e::sim`): the agent's
//! scheduler, health, redial and spool through the emulator's link model to the ingest's
//! reassembly, with the same bounds the real-socket versions asserted. They run in seconds;
//! the real-socket versions stay available as soak runs (`cargo test -- --ignored`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::Duration;

use relay_e2e::record;
use relay_e2e::sim::{Produced, Received, Sim, SimConfig, assert_exact, frames_by_seq};
use relay_emulator::{BearerSpec, TraceCache};
use vehicle_agent::scheduler::Policy;

fn s(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn bearers(n: usize, spec: &str) -> Vec<BearerSpec> {
    let mut cache = TraceCache::default();
    (0..n)
        .map(|_| BearerSpec::parse(spec, &mut cache).unwrap())
        .collect()
}

/// Longest time between consecutive arrivals of frames produced in `[from, to)`, counted from
/// `from`.
fn longest_live_gap(sim: &Sim, from: Duration, to: Duration) -> Duration {
    let produced: std::collections::HashSet<u64> = sim
        .produced()
        .iter()
        .filter(|p| p.at >= from && p.at < to)
        .map(|p| p.seq)
        .collect();
    let mut times: Vec<Duration> = frames_by_seq(sim.received())
        .into_iter()
        .filter(|(seq, _)| produced.contains(seq))
        .map(|(_, (_, _, at, _))| at)
        .collect();
    times.sort();
    let mut last = from;
    let mut longest = Duration::ZERO;
    for t in times {
        longest = longest.max(t.saturating_sub(last));
        last = last.max(t);
    }
    longest
}

#[test]
fn blackholed_live_bearer_fails_over_within_two_round_trips() {
    let mut cfg = SimConfig::new(bearers(3, "rate=20mbit,delay=40ms"));
    // One bearer carries each ECG frame, so losing it is a real failover.
    cfg.agent.scheduling.waveforms = Policy::Fastest;
    let mut sim = Sim::new(cfg, &record("100"));
    sim.run_until(s(4));
    let before: Vec<u64> = (0..3).map(|b| sim.uplink_delivered_bytes(b)).collect();
    sim.run_until(s(5));
    let carrier = (0..3)
        .max_by_key(|&b| sim.uplink_delivered_bytes(b) - before[b])
        .unwrap();
    let cut = s(5);
    sim.cut_at(cut, carrier);
    sim.stop_producing_at(s(10));
    assert!(sim.run_until_drained(s(40)), "everything is acknowledged");

    let produced = sim.produced().to_vec();
    assert_exact(&sim, &produced);
    let remaining_rtt = (0..3)
        .filter(|&b| b != carrier)
        .filter_map(|b| sim.srtt(b))
        .max()
        .unwrap();
    let bound = remaining_rtt.max(ms(80)) * 2 + ms(100);
    let gap = longest_live_gap(&sim, cut - ms(500), cut + s(3));
    println!(
        "carrier {carrier} blackholed; remaining RTT {remaining_rtt:?}; longest live ECG gap {gap:?} (bound {bound:?})"
    );
    assert!(gap < bound, "live ECG gap {gap:?} >= {bound:?}");
    assert!(sim.failovers(carrier) >= 1, "the failover was counted");
    assert!(
        sim.bearer_stats(carrier).packets_lost > 0,
        "the cut dropped packets mid-stream"
    );
}

#[test]
fn all_bearers_down_for_60_s_then_live_first_and_every_sample_exact() {
    let mut sim = Sim::new(
        SimConfig::new(bearers(2, "rate=20mbit,delay=20ms")),
        &record("100"),
    );
    for b in 0..2 {
        sim.cut_at(s(3), b);
    }
    let back = s(63);
    sim.restore_at(back, 0);
    sim.restore_at(back + s(1), 1);
    sim.stop_producing_at(s(72));
    assert!(sim.run_until_drained(s(120)), "everything is acknowledged");
    let produced = sim.produced().to_vec();
    assert_exact(&sim, &produced);

    // Live again: the first frame produced within the last second before the return arrives
    // within 1 s of it, ahead of the backlog.
    let arrivals = frames_by_seq(sim.received());
    let first_live = produced
        .iter()
        .filter(|p| p.at >= back - s(1))
        .filter_map(|p| arrivals.get(&p.seq).map(|a| a.2))
        .filter(|&at| at >= back)
        .min()
        .unwrap();
    let backlog_done = produced
        .iter()
        .filter(|p| p.at < back - s(2))
        .filter_map(|p| arrivals.get(&p.seq).map(|a| a.2))
        .max()
        .unwrap();
    let live_after = first_live - back;
    println!(
        "live ECG {live_after:?} after the first bearer returned; backlog complete {:?} after",
        backlog_done - back
    );
    assert!(live_after < s(1), "{live_after:?}");
    // The outage's backlog (1,500 frames) comes after live, and what arrives after a newer
    // frame is marked late. (Backlog frames that arrive within the reorder window of the
    // first live frame fill in before it, in order: with a larger in-flight allowance, more.)
    let backlog: Vec<_> = produced
        .iter()
        .filter(|p| p.at >= s(3) && p.at < back - s(1))
        .filter_map(|p| arrivals.get(&p.seq))
        .collect();
    let after_live: Vec<_> = backlog.iter().filter(|a| a.2 > first_live).collect();
    assert!(
        after_live.len() * 2 >= backlog.len(),
        "most of the backlog after live ({} of {})",
        after_live.len(),
        backlog.len()
    );
    assert!(
        after_live.iter().all(|a| a.3),
        "what arrives after a newer frame is marked late"
    );
    assert!(backlog_done > first_live, "live frames went first");
    let gaps = sim
        .received()
        .iter()
        .filter(|r| matches!(r, Received::Gap { .. }))
        .count();
    let closed = sim
        .received()
        .iter()
        .filter(|r| matches!(r, Received::GapClosed { .. }))
        .count();
    assert!(closed >= 1 && closed == gaps, "gaps {gaps} closed {closed}");
}

#[test]
fn record_100_over_two_driving_traces_for_10_minutes_arrives_bit_exact() {
    let traces = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/traces");
    let mut cache = TraceCache::default();
    let links = ["ATT-LTE-driving.up", "TMobile-UMTS-driving.up"]
        .iter()
        .map(|t| {
            let spec = format!("trace={},delay=40ms", traces.join(t).display());
            BearerSpec::parse(&spec, &mut cache).unwrap()
        })
        .collect();
    let mut cfg = SimConfig::new(links);
    cfg.speed = 3.0;
    cfg.agent.framing.frame = ms(120);
    let mut sim = Sim::new(cfg, &record("100"));
    sim.stop_producing_at(s(600));
    assert!(sim.run_until_drained(s(900)), "everything is acknowledged");
    let produced = sim.produced().to_vec();
    // 10 minutes at 3x: 30 minutes of record 100 (650,000 samples), every one exact.
    let samples: u64 = produced.iter().map(|p| u64::from(p.samples)).sum();
    assert!(samples >= 640_000, "{samples} samples");
    assert_exact(&sim, &produced);
    for b in 0..2 {
        println!("bearer {b}: {:?}", sim.bearer_stats(b));
    }
    assert!(
        (0..2).all(|b| sim.bearer_stats(b).packets_lost > 0),
        "the traces' holes really cost packets"
    );
}

#[test]
fn agent_crash_resumes_from_the_spool_and_loses_nothing_older_than_the_sync_interval() {
    let mut sim = Sim::new(
        SimConfig::new(bearers(2, "rate=20mbit,delay=30ms")),
        &record("100"),
    );
    // Both bearers down from 5 s: the spool fills with what cannot leave; the agent is killed
    // at 8 s and starts again 1 s later while the links return.
    for b in 0..2 {
        sim.cut_at(s(5), b);
        sim.restore_at(s(9), b);
    }
    let crash = s(8);
    sim.crash_at(crash, s(1));
    sim.stop_producing_at(s(15));
    assert!(sim.run_until_drained(s(60)), "everything is acknowledged");

    let produced = sim.produced().to_vec();
    let (before, after): (Vec<Produced>, Vec<Produced>) =
        produced.iter().partition(|p| p.at <= crash);
    // Data at risk: the frame being filled, what was put since the last commit, the commit in
    // progress: 200 ms.
    let safe: Vec<_> = before
        .iter()
        .filter(|p| p.at + ms(200) <= crash)
        .copied()
        .collect();
    assert!(safe.len() > 150, "{} frames before the crash", safe.len());
    assert_exact(&sim, &safe);
    assert!(!after.is_empty());
    assert_exact(&sim, &after);
    // The restarted agent continued the session after every number it had reserved: the
    // ingest saw one gap for the lost tail and the unused reservation.
    let arrivals = frames_by_seq(sim.received());
    let resumed_from = after[0].seq;
    let last_before = before.iter().map(|p| p.seq).max().unwrap();
    assert!(resumed_from > last_before, "no number reused");
    assert!(
        sim.received().iter().any(
            |r| matches!(r, Received::Gap { start, end, .. } if *start <= last_before + 1 && *end >= resumed_from)
                || matches!(r, Received::Gap { end, .. } if *end == resumed_from)
        ),
        "a gap record covers the numbers that never came"
    );
    assert!(arrivals.len() >= safe.len() + after.len());
}

#[test]
fn a_fake_ingest_acknowledging_everything_releases_nothing() {
    let mut sim = Sim::new(
        SimConfig::new(bearers(2, "rate=20mbit,delay=20ms")),
        &record("100"),
    );
    // Nothing can leave for 3 s, so the agent holds frames sent nowhere; the first connection
    // of bearer 0 then meets an ingest that acknowledges every number at once.
    for b in 0..2 {
        sim.cut_at(Duration::ZERO, b);
    }
    sim.fake_ack_on_next_connect(0);
    sim.restore_at(s(3), 0);
    sim.restore_at(s(4), 1);
    sim.stop_producing_at(s(8));
    assert!(sim.run_until_drained(s(40)), "everything is acknowledged");
    assert!(
        sim.bogus_acked() >= 70,
        "the fake acknowledgement was counted ({} frames)",
        sim.bogus_acked()
    );
    let produced = sim.produced().to_vec();
    assert_exact(&sim, &produced);
}
