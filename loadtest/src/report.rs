//! What a load run measured: per stream class latency histograms (achieved and oracle),
//! on-time fractions, losses, duplicates, gaps; and the human table / JSON report.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use relay_emulator::LinkCounters;

/// Latencies are recorded in microseconds up to one hour.
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// Accumulates one stream class.
#[derive(Debug, Clone)]
pub struct ClassAccumulator {
    latency_us: Histogram<u64>,
    oracle_us: Histogram<u64>,
    deadline: Duration,
    /// Frame deliveries over all subscribers.
    pub deliveries: u64,
    /// Of them, within the deadline.
    pub on_time: u64,
    /// Frames the oracle delivers within the deadline.
    pub oracle_on_time: u64,
    /// Frames the oracle was asked about.
    pub oracle_frames: u64,
    /// Distinct frames received.
    pub unique_frames: u64,
    /// Records marked late.
    pub late_records: u64,
    /// Payload bytes received.
    pub payload_bytes: u64,
    /// Samples received.
    pub samples_received: u64,
    /// Longest time one stream delivered nothing.
    pub longest_gap: Duration,
    /// Longest gap of a stream that spans the bearer cut (`--cut-carrier-at`) or the node kill
    /// (`--kill-node`).
    pub gap_around_cut: Option<Duration>,
}

pub(crate) fn histogram() -> Result<Histogram<u64>, hdrhistogram::CreationError> {
    // 3 significant digits over 1 us..1 h: fixed size, some tens of KB.
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros())
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_LATENCY_US)
}

impl ClassAccumulator {
    /// An accumulator judging on-time against `deadline`.
    pub fn new(deadline: Duration) -> Result<Self, hdrhistogram::CreationError> {
        Ok(Self {
            latency_us: histogram()?,
            oracle_us: histogram()?,
            deadline,
            deliveries: 0,
            on_time: 0,
            oracle_on_time: 0,
            oracle_frames: 0,
            unique_frames: 0,
            late_records: 0,
            payload_bytes: 0,
            samples_received: 0,
            longest_gap: Duration::ZERO,
            gap_around_cut: None,
        })
    }

    /// One delivery of a frame to one subscriber.
    pub fn record_latency(&mut self, latency: Duration) {
        self.deliveries += 1;
        if latency <= self.deadline {
            self.on_time += 1;
        }
        let _ = self.latency_us.record(us(latency));
    }

    /// The lower bound for one frame.
    pub fn record_oracle(&mut self, bound: Duration) {
        self.oracle_frames += 1;
        if bound <= self.deadline {
            self.oracle_on_time += 1;
        }
        let _ = self.oracle_us.record(us(bound));
    }

    /// Adds another accumulator's figures.
    pub fn merge(&mut self, o: &Self) {
        let _ = self.latency_us.add(&o.latency_us);
        let _ = self.oracle_us.add(&o.oracle_us);
        self.deliveries += o.deliveries;
        self.on_time += o.on_time;
        self.oracle_on_time += o.oracle_on_time;
        self.oracle_frames += o.oracle_frames;
        self.unique_frames += o.unique_frames;
        self.late_records += o.late_records;
        self.payload_bytes += o.payload_bytes;
        self.samples_received += o.samples_received;
        self.longest_gap = self.longest_gap.max(o.longest_gap);
        self.gap_around_cut = self.gap_around_cut.max(o.gap_around_cut);
    }

    /// The class's report, given what was produced.
    pub fn finish(
        &self,
        frames_produced: u64,
        frames_lost: u64,
        samples_lost: u64,
        duplicates: u64,
    ) -> ClassReport {
        let pct = percentiles;
        let frac = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        ClassReport {
            frames_produced,
            frames_received: self.unique_frames,
            frames_lost,
            samples_received: self.samples_received,
            samples_lost,
            duplicates,
            late_records: self.late_records,
            deliveries: self.deliveries,
            latency: pct(&self.latency_us),
            on_time_fraction: frac(self.on_time, self.deliveries),
            oracle: pct(&self.oracle_us),
            oracle_on_time_fraction: frac(self.oracle_on_time, self.oracle_frames),
            longest_gap_ms: self.longest_gap.as_secs_f64() * 1000.0,
            gap_around_cut_ms: self.gap_around_cut.map(|g| g.as_secs_f64() * 1000.0),
            payload_bytes: self.payload_bytes,
        }
    }
}

/// Percentiles of a histogram of microseconds, in milliseconds.
pub(crate) fn percentiles(h: &Histogram<u64>) -> Percentiles {
    if h.is_empty() {
        return Percentiles::default();
    }
    let ms = |v: u64| v as f64 / 1000.0;
    Percentiles {
        p50_ms: ms(h.value_at_quantile(0.50)),
        p90_ms: ms(h.value_at_quantile(0.90)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        p999_ms: ms(h.value_at_quantile(0.999)),
        max_ms: ms(h.max()),
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
/// Latency percentiles, milliseconds.
pub struct Percentiles {
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Maximum.
    pub max_ms: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
/// Figures of one stream class.
pub struct ClassReport {
    /// Frames the sources produced.
    pub frames_produced: u64,
    /// Distinct frames that reached the first subscriber.
    pub frames_received: u64,
    /// Frames produced and never received.
    pub frames_lost: u64,
    /// Samples received.
    pub samples_received: u64,
    /// Samples of frames never received (waveforms: values of every channel).
    pub samples_lost: u64,
    /// Frames a subscriber received more than once (all subscribers).
    pub duplicates: u64,
    /// Records marked late (they filled a gap).
    pub late_records: u64,
    /// Frame deliveries over all subscribers (the latency population).
    pub deliveries: u64,
    /// Capture (end of the frame) to subscriber.
    pub latency: Percentiles,
    /// Share of deliveries within the deadline.
    pub on_time_fraction: f64,
    /// Lower bound: earliest delivery opportunity on any bearer after capture + propagation.
    pub oracle: Percentiles,
    /// Share of frames the oracle delivers within the deadline.
    pub oracle_on_time_fraction: f64,
    /// Longest time one stream delivered nothing to a subscriber.
    pub longest_gap_ms: f64,
    /// Longest such time spanning the phase's disruption: the cut of the bearer carrying the
    /// vehicle's ECG (`--cut-carrier-at`) or the kill of an ingest node (`--kill-node`).
    pub gap_around_cut_ms: Option<f64>,
    /// Payload bytes received.
    pub payload_bytes: u64,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
/// What a process (an ingest node, a NATS node) used over the measured and drain time.
pub struct ProcessUsage {
    /// User and system CPU time.
    pub cpu_seconds: f64,
    /// Peak resident memory.
    pub peak_rss_bytes: u64,
}

impl ProcessUsage {
    /// Several processes together: CPU time and peak memory summed (the peaks may fall at
    /// different times, so the memory is an upper bound). None when none was measured.
    pub fn total(each: &[Option<Self>]) -> Option<Self> {
        each.iter().flatten().copied().reduce(|a, b| Self {
            cpu_seconds: a.cpu_seconds + b.cpu_seconds,
            peak_rss_bytes: a.peak_rss_bytes + b.peak_rss_bytes,
        })
    }
}

#[derive(Debug, Clone, Serialize)]
/// One phase of a run (relay or baseline).
pub struct PhaseReport {
    /// Short name.
    pub name: String,
    /// What it ran.
    pub description: String,
    /// Bearers per vehicle the emulator ran, and how many the agent used.
    pub bearers: Vec<String>,
    /// Bearers each agent used.
    pub bearers_used_by_agent: usize,
    /// Vehicles.
    pub vehicles: usize,
    /// Subscribers.
    pub subscribers: usize,
    /// Where the log was: `embedded (redb)`, `jetstream: ...` with the cluster's settings, or
    /// `external`.
    pub store: String,
    /// Seconds measured.
    pub measured_seconds: f64,
    /// Seconds spent draining after the measured time.
    pub drain_seconds: f64,
    /// Figures per stream class.
    pub classes: BTreeMap<String, ClassReport>,
    /// The failure the run caused, when it caused one (`gap_around_cut_ms` spans it).
    pub disruption: Option<String>,
    /// Frames agents still held when they stopped.
    pub frames_unacked_at_agent_exit: u64,
    /// UDP bytes offered to the uplinks.
    pub wire_bytes_up: u64,
    /// UDP bytes offered to the downlinks.
    pub wire_bytes_down: u64,
    /// Uplink bytes offered to the emulated links per byte of sample/measurement payload.
    pub wire_bytes_per_payload_byte: f64,
    /// Counters of every emulated link, summed.
    pub links: LinkCounters,
    /// Ingest CPU time and peak resident memory, every node the run started together (None
    /// for external ingests).
    pub ingest: Option<ProcessUsage>,
    /// The same per ingest node (a killed node: until it was killed).
    pub ingest_nodes: Vec<Option<ProcessUsage>>,
    /// The same per NATS node (`--store jetstream`; empty otherwise).
    pub nats: Vec<Option<ProcessUsage>>,
    /// Times a subscriber moved to another ingest node (its node went away).
    pub subscriber_reconnects: u64,
    /// What the ingest's detector and TLS stack reported (None for an external ingest).
    pub security: Option<SecurityCounters>,
    /// Subscribers that ended before the phase did; their figures are partial.
    pub subscriber_errors: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
/// Security counters of the ingest at the end of a phase, by reason (zeros left out): an
/// honest fleet, outages and redials included, must raise no security event.
pub struct SecurityCounters {
    /// `relay_ingest_security_events_total`.
    pub security_events: BTreeMap<String, u64>,
    /// `relay_ingest_handshake_failures_total` (`abandoned`: the agents' own losing dials).
    pub handshake_failures: BTreeMap<String, u64>,
}

impl SecurityCounters {
    /// Adds another node's counters.
    pub fn add(&mut self, o: &Self) {
        for (r, n) in &o.security_events {
            *self.security_events.entry(r.clone()).or_default() += n;
        }
        for (r, n) in &o.handshake_failures {
            *self.handshake_failures.entry(r.clone()).or_default() += n;
        }
    }
}

#[derive(Debug, Clone, Serialize)]
/// The machine a run was measured on.
pub struct Machine {
    /// CPU cores.
    pub cores: usize,
    /// Memory.
    pub memory_bytes: u64,
    /// CPU model.
    pub cpu_model: String,
    /// Kernel version.
    pub kernel: String,
}

impl Machine {
    /// Reads this machine's figures from /proc.
    pub fn probe() -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let meminfo = read("/proc/meminfo");
        let memory_bytes = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or(0);
        let cpu_model = read("/proc/cpuinfo")
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_default();
        Self {
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            memory_bytes,
            cpu_model,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
/// A whole run: what was run, where, and every figure.
pub struct Report {
    /// The command line.
    pub command_line: Vec<String>,
    /// When it started (UTC ns).
    pub started_utc_ns: i64,
    /// The machine.
    pub machine: Machine,
    /// The configuration as given.
    pub config: serde_json::Value,
    /// The phases.
    pub phases: Vec<PhaseReport>,
}

impl Report {
    /// The table printed at the end of a run.
    pub fn human(&self) -> String {
        let mut s = String::new();
        let m = &self.machine;
        let _ = writeln!(
            s,
            "machine: {} cores, {:.1} GiB, {}",
            m.cores,
            m.memory_bytes as f64 / (1u64 << 30) as f64,
            m.cpu_model
        );
        for p in &self.phases {
            let _ = writeln!(s, "\n== {}: {}", p.name, p.description);
            let _ = writeln!(
                s,
                "   {} vehicles, {} subscribers, {:.0} s measured + {:.1} s drain; bearers {} (agent uses {})",
                p.vehicles,
                p.subscribers,
                p.measured_seconds,
                p.drain_seconds,
                p.bearers.join(" + "),
                p.bearers_used_by_agent
            );
            let _ = writeln!(
                s,
                "   store: {}; {} ingest node(s)",
                p.store,
                p.ingest_nodes.len().max(1)
            );
            let _ = writeln!(
                s,
                "   {:<9} {:>8} {:>5} {:>4} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8} {:>8} {:>10} {:>9}",
                "class",
                "frames",
                "lost",
                "dup",
                "p50 ms",
                "p90",
                "p99",
                "p99.9",
                "max",
                "on-time",
                "oracle",
                "oracle p99",
                "gap ms"
            );
            for (class, c) in &p.classes {
                let _ = writeln!(
                    s,
                    "   {:<9} {:>8} {:>5} {:>4} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>9.1} {:>7.2}% {:>7.2}% {:>10.1} {:>9.0}",
                    class,
                    c.frames_produced,
                    c.frames_lost,
                    c.duplicates,
                    c.latency.p50_ms,
                    c.latency.p90_ms,
                    c.latency.p99_ms,
                    c.latency.p999_ms,
                    c.latency.max_ms,
                    c.on_time_fraction * 100.0,
                    c.oracle_on_time_fraction * 100.0,
                    c.oracle.p99_ms,
                    c.longest_gap_ms
                );
            }
            let disruption = p.disruption.as_deref().unwrap_or("disruption");
            for (class, c) in &p.classes {
                if let Some(g) = c.gap_around_cut_ms {
                    let _ = writeln!(
                        s,
                        "   {class}: longest gap across the {disruption}: {g:.0} ms"
                    );
                }
            }
            if p.subscriber_reconnects > 0 {
                let _ = writeln!(
                    s,
                    "   subscribers moved to another node {} time(s)",
                    p.subscriber_reconnects
                );
            }
            let lost: u64 = p.classes.values().map(|c| c.samples_lost).sum();
            let _ = writeln!(
                s,
                "   samples lost {lost}; wire/payload {:.2}; uplink {:.1} MB, downlink {:.1} MB; link drops {} up / {} down",
                p.wire_bytes_per_payload_byte,
                p.wire_bytes_up as f64 / 1e6,
                p.wire_bytes_down as f64 / 1e6,
                p.links.up.dropped(),
                p.links.down.dropped()
            );
            for e in &p.subscriber_errors {
                let _ = writeln!(s, "   ended early (figures partial): {e}");
            }
            let wall = (p.measured_seconds + p.drain_seconds).max(1e-9);
            let mb = |u: &Option<ProcessUsage>| {
                u.map_or("-".to_owned(), |u| {
                    format!("{:.0}", u.peak_rss_bytes as f64 / 1e6)
                })
            };
            match &p.ingest {
                Some(i) => {
                    let _ = writeln!(
                        s,
                        "   ingest: {:.1} s CPU ({:.1}% of one core), peak RSS {} MB",
                        i.cpu_seconds,
                        100.0 * i.cpu_seconds / wall,
                        p.ingest_nodes
                            .iter()
                            .map(mb)
                            .collect::<Vec<_>>()
                            .join(" + ")
                    );
                }
                None => {
                    let _ = writeln!(s, "   ingest: external (CPU and memory not measured)");
                }
            }
            if let Some(n) = ProcessUsage::total(&p.nats) {
                let _ = writeln!(
                    s,
                    "   NATS: {:.1} s CPU ({:.1}% of one core), peak RSS {} MB",
                    n.cpu_seconds,
                    100.0 * n.cpu_seconds / wall,
                    p.nats.iter().map(mb).collect::<Vec<_>>().join(" + ")
                );
            }
            if let Some(sec) = &p.security {
                let list = |m: &BTreeMap<String, u64>| {
                    if m.is_empty() {
                        "none".to_owned()
                    } else {
                        m.iter()
                            .map(|(r, n)| format!("{r} {n}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                };
                let _ = writeln!(
                    s,
                    "   security events: {}; handshake failures: {}",
                    list(&sec.security_events),
                    list(&sec.handshake_failures)
                );
            }
        }
        s
    }
}
