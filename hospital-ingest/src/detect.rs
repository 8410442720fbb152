//! Detection of irregular vehicle behaviour (sans-IO): a compromised router uses a valid
//! certificate, so what it sends is checked against what a real ambulance can produce. The
//! [`Detector`] is fed with connections, Hellos and validated frames, each with the time, and
//! answers with [`Finding`]s; the caller counts them
//! (`relay_ingest_security_events_total{reason}`), logs them and writes them to the audit log.
//! Nothing here refuses anything: findings report, the validation and quotas block.
//!
//! Frames are judged by their capture times, not by when they arrive, so a backlog that an
//! agent delivers in a burst after an outage looks exactly as it was produced.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::Duration;

use relay_proto::model::{ClockOffset, Frame, StreamDescriptor, TimestampCheck, frame::Payload};

/// Thresholds, each with a default that a working ambulance stays well inside.
#[derive(Debug, Clone, PartialEq)]
pub struct Thresholds {
    /// Capture times further ahead of the vehicle clock's estimated time at arrival (the
    /// ingest's clock before the first estimate) are implausible.
    pub max_clock_ahead: Duration,
    /// Capture times older than this are implausible (spools hold hours, not days).
    pub max_age: Duration,
    /// A vehicle clock off the ingest's by more than this (beyond the estimate's
    /// uncertainty) is reported.
    pub max_clock_offset: Duration,
    /// Faster movement between two GPS fixes is impossible (m/s).
    pub max_speed_mps: f64,
    /// Frames a stream may produce per second of capture time (beyond: a sequence jump).
    pub max_frames_per_second: f64,
    /// New sessions of one vehicle in ten minutes beyond which it is a storm.
    pub max_new_sessions_per_10min: usize,
    /// Distinct source addresses of one vehicle's live connections at once (its bearers).
    pub max_addresses: usize,
    /// Vehicles an ED client may start reading for the first time within an hour.
    pub max_new_vehicles_per_hour: usize,
    /// Refusals by the access policy one ED client may collect within ten minutes.
    pub max_denials_per_10min: usize,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            max_clock_ahead: Duration::from_secs(5),
            max_age: Duration::from_secs(24 * 3600),
            max_clock_offset: Duration::from_secs(1),
            max_speed_mps: 300.0 / 3.6,
            max_frames_per_second: 200.0,
            max_new_sessions_per_10min: 10,
            max_addresses: 4,
            max_new_vehicles_per_hour: 20,
            max_denials_per_10min: 10,
        }
    }
}

/// What looked wrong (a bounded metric label each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// A capture time ahead of the vehicle's clock.
    TimestampFuture,
    /// A capture time older than any spool would hold.
    TimestampPast,
    /// GPS fixes further apart than a vehicle can travel in the time between them.
    ImpossibleMovement,
    /// More samples than the declared rate gives for the capture time that passed.
    RateExceeded,
    /// Sequence numbers advancing faster than frames can be produced.
    SeqJump,
    /// Many new sessions from one vehicle.
    SessionStorm,
    /// More source addresses at once than a vehicle has bearers.
    TooManyAddresses,
    /// An ED client starting to read many vehicles it never read before.
    SubscriberNewVehicles,
    /// An ED client repeatedly asking for what the access policy does not grant.
    SubscriberDenials,
    /// A vehicle clock far off the ingest's.
    ClockSkew,
}

impl Reason {
    /// Every reason, for metrics exported from the start.
    pub const ALL: [Reason; 10] = [
        Reason::TimestampFuture,
        Reason::TimestampPast,
        Reason::ImpossibleMovement,
        Reason::RateExceeded,
        Reason::SeqJump,
        Reason::SessionStorm,
        Reason::TooManyAddresses,
        Reason::SubscriberNewVehicles,
        Reason::SubscriberDenials,
        Reason::ClockSkew,
    ];

    /// Bounded metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::TimestampFuture => "timestamp_future",
            Self::TimestampPast => "timestamp_past",
            Self::ImpossibleMovement => "impossible_movement",
            Self::RateExceeded => "rate_exceeded",
            Self::SeqJump => "seq_jump",
            Self::SessionStorm => "session_storm",
            Self::TooManyAddresses => "too_many_addresses",
            Self::SubscriberNewVehicles => "subscriber_new_vehicles",
            Self::SubscriberDenials => "subscriber_denials",
            Self::ClockSkew => "clock_skew",
        }
    }
}

/// One irregularity.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    /// What.
    pub reason: Reason,
    /// Which vehicle ("" for a finding about an ED client, named in `detail`).
    pub vehicle: String,
    /// The figures behind it.
    pub detail: String,
}

/// Stream states kept at most; idle ones are forgotten first.
const MAX_STREAMS: usize = 65_536;
/// Sequence numbers an agent may skip on a restart (its spool's reservation headroom) and
/// reordering slack.
const SEQ_SLACK: u64 = 1024;
/// GPS noise below which no movement is judged (m).
const MIN_JUMP_M: f64 = 100.0;

#[derive(Debug, Default)]
struct StreamState {
    /// Highest seq seen and its capture time.
    seq: Option<(u64, i64)>,
    /// Highest sample index seen (waveforms) and its capture time.
    sample: Option<(u64, i64)>,
    /// Latest GPS fix by capture time.
    fix: Option<(f64, f64, i64)>,
    last_seen_ns: i64,
}

#[derive(Debug, Default)]
struct VehicleState {
    /// Session ids seen lately, with when they were first seen.
    sessions: VecDeque<(u64, i64)>,
    /// Live connections: id -> source address.
    connections: HashMap<u64, IpAddr>,
    /// Its clock was reported off (again only once back within half the threshold).
    clock_skewed: bool,
}

#[derive(Debug, Default)]
struct SubscriberState {
    /// Vehicles this client has read (bounded).
    known: std::collections::HashSet<String>,
    /// When it started reading a vehicle for the first time, within the last hour.
    firsts: VecDeque<i64>,
    /// Its refusals within the last ten minutes.
    denials: VecDeque<i64>,
}

/// ED clients and vehicles per client remembered, at most.
const MAX_SUBSCRIBERS: usize = 4096;
const MAX_KNOWN_VEHICLES: usize = 4096;

/// The detector's state.
#[derive(Debug, Default)]
pub struct Detector {
    thresholds: Thresholds,
    /// Per vehicle, per (session, stream): looked up by `&str`, so a frame allocates nothing.
    streams: HashMap<String, HashMap<(u64, u32), StreamState>>,
    /// Streams in `streams`, all vehicles together.
    stream_count: usize,
    vehicles: HashMap<String, VehicleState>,
    subscribers: HashMap<String, SubscriberState>,
}

fn finding(reason: Reason, vehicle: &str, detail: String) -> Finding {
    Finding {
        reason,
        vehicle: vehicle.to_owned(),
        detail,
    }
}

/// Great-circle distance in metres.
fn haversine_m(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = p2 - p1;
    let dl = (lon2 - lon1).to_radians();
    let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * 6_371_000.0 * a.sqrt().asin()
}

impl Detector {
    /// A detector with `thresholds`.
    pub fn new(thresholds: Thresholds) -> Self {
        Self {
            thresholds,
            ..Self::default()
        }
    }

    /// Whether `capture` is plausible for a frame received at `now_ns` from a vehicle whose
    /// clock is `clock_offset_ns` ahead of ours (`None`: not estimated yet, ours is used).
    pub fn check_capture_time(
        &self,
        now_ns: i64,
        clock_offset_ns: Option<i64>,
        capture: i64,
    ) -> TimestampCheck {
        let t = &self.thresholds;
        let vehicle_now = now_ns.saturating_add(clock_offset_ns.unwrap_or(0));
        if capture.saturating_sub(vehicle_now) > t.max_clock_ahead.as_nanos() as i64 {
            TimestampCheck::Future
        } else if vehicle_now.saturating_sub(capture) > t.max_age.as_nanos() as i64 {
            TimestampCheck::Past
        } else {
            TimestampCheck::Plausible
        }
    }

    /// A validated frame of `vehicle`'s session `session`, on the stream `desc` declares,
    /// received at `now_ns` from a vehicle whose clock is `clock_offset_ns` ahead of ours:
    /// its capture time's check, and what looked wrong.
    pub fn on_frame(
        &mut self,
        now_ns: i64,
        clock_offset_ns: Option<i64>,
        vehicle: &str,
        session: u64,
        desc: &StreamDescriptor,
        frame: &Frame,
    ) -> (TimestampCheck, Vec<Finding>) {
        let check = self.check_capture_time(now_ns, clock_offset_ns, frame.capture_time_ns);
        let findings = self.judge_frame(
            now_ns,
            check,
            clock_offset_ns,
            vehicle,
            session,
            desc,
            frame,
        );
        (check, findings)
    }

    #[allow(clippy::too_many_arguments)]
    fn judge_frame(
        &mut self,
        now_ns: i64,
        check: TimestampCheck,
        clock_offset_ns: Option<i64>,
        vehicle: &str,
        session: u64,
        desc: &StreamDescriptor,
        frame: &Frame,
    ) -> Vec<Finding> {
        let t = &self.thresholds;
        let mut out = Vec::new();
        let capture = frame.capture_time_ns;
        let whose = if clock_offset_ns.is_some() {
            "the vehicle's estimated clock"
        } else {
            "the ingest's clock"
        };
        let vehicle_now = now_ns.saturating_add(clock_offset_ns.unwrap_or(0));
        match check {
            TimestampCheck::Future => out.push(finding(
                Reason::TimestampFuture,
                vehicle,
                format!(
                    "stream {} seq {}: captured {:.1} s ahead of {whose}",
                    frame.stream_id,
                    frame.seq,
                    capture.saturating_sub(vehicle_now) as f64 / 1e9
                ),
            )),
            TimestampCheck::Past => out.push(finding(
                Reason::TimestampPast,
                vehicle,
                format!(
                    "stream {} seq {}: captured {:.0} h before {whose}",
                    frame.stream_id,
                    frame.seq,
                    vehicle_now.saturating_sub(capture) as f64 / 3.6e12
                ),
            )),
            _ => {}
        }
        let (max_fps, max_speed) = (t.max_frames_per_second, t.max_speed_mps);
        let key = (session, frame.stream_id);
        let known = self
            .streams
            .get(vehicle)
            .is_some_and(|m| m.contains_key(&key));
        if !known {
            // Only a new stream can push the table over its bound; idle ones go first.
            if self.stream_count >= MAX_STREAMS {
                let oldest = now_ns - 3_600_000_000_000;
                for m in self.streams.values_mut() {
                    m.retain(|_, s| s.last_seen_ns > oldest);
                }
                self.streams.retain(|_, m| !m.is_empty());
                self.stream_count = self.streams.values().map(HashMap::len).sum();
            }
            if self.stream_count >= MAX_STREAMS {
                return out; // thousands of busy streams: judge the timestamps only
            }
            self.stream_count += 1;
            if !self.streams.contains_key(vehicle) {
                self.streams.insert(vehicle.to_owned(), HashMap::new());
            }
        }
        let Some(per_vehicle) = self.streams.get_mut(vehicle) else {
            return out;
        };
        let state = per_vehicle.entry(key).or_default();
        state.last_seen_ns = now_ns;

        // Sequence numbers: no faster than frames can be produced in the capture time passed.
        match state.seq {
            Some((seq, at)) if frame.seq > seq => {
                let dt = capture.saturating_sub(at).max(0) as f64 / 1e9;
                let allowed = (dt * max_fps) as u64 + SEQ_SLACK;
                if frame.seq - seq > allowed {
                    out.push(finding(
                        Reason::SeqJump,
                        vehicle,
                        format!(
                            "stream {}: seq {} -> {} in {dt:.3} s of capture time (at most {allowed})",
                            frame.stream_id, seq, frame.seq
                        ),
                    ));
                }
                state.seq = Some((frame.seq, capture));
            }
            None => state.seq = Some((frame.seq, capture)),
            Some(_) => {} // a copy or an older frame overtaken by newer ones
        }

        match &frame.payload {
            Some(Payload::Waveform(w)) => {
                let rate = desc.waveform.as_ref().map_or(0.0, |w| w.sample_rate_hz);
                match state.sample {
                    Some((index, at)) if w.first_sample_index > index => {
                        let dt = capture.saturating_sub(at) as f64 / 1e9;
                        let samples = (w.first_sample_index - index) as f64;
                        // The agent stamps sample n at epoch + n / rate: honest frames fit to
                        // the nanosecond; allow 1 % and two samples of rounding.
                        if samples > rate * dt.max(0.0) * 1.01 + 2.0 {
                            out.push(finding(
                                Reason::RateExceeded,
                                vehicle,
                                format!(
                                    "stream {}: {samples} samples in {dt:.3} s of capture time at a declared {rate} Hz",
                                    frame.stream_id
                                ),
                            ));
                        }
                        state.sample = Some((w.first_sample_index, capture));
                    }
                    None => state.sample = Some((w.first_sample_index, capture)),
                    Some(_) => {}
                }
            }
            Some(Payload::Location(l)) => match state.fix {
                Some((lat, lon, at)) if capture > at => {
                    let dt = (capture - at) as f64 / 1e9;
                    let d = haversine_m(lat, lon, l.latitude_deg, l.longitude_deg);
                    if d > MIN_JUMP_M && d / dt > max_speed {
                        out.push(finding(
                            Reason::ImpossibleMovement,
                            vehicle,
                            format!(
                                "moved {:.2} km in {dt:.1} s ({:.0} km/h)",
                                d / 1000.0,
                                d / dt * 3.6
                            ),
                        ));
                    }
                    state.fix = Some((l.latitude_deg, l.longitude_deg, capture));
                }
                None => state.fix = Some((l.latitude_deg, l.longitude_deg, capture)),
                Some(_) => {}
            },
            _ => {}
        }
        out
    }

    /// An accepted Hello of `vehicle` for `session` at `now_ns`.
    pub fn on_hello(&mut self, now_ns: i64, vehicle: &str, session: u64) -> Vec<Finding> {
        let max = self.thresholds.max_new_sessions_per_10min;
        let v = self.vehicles.entry(vehicle.to_owned()).or_default();
        let window = now_ns - 600_000_000_000;
        while v.sessions.front().is_some_and(|(_, at)| *at < window) {
            v.sessions.pop_front();
        }
        if v.sessions.iter().any(|(s, _)| *s == session) {
            return Vec::new(); // a bearer redialling into its session
        }
        v.sessions.push_back((session, now_ns));
        // Bounded: beyond the threshold the count is what matters, not every id.
        while v.sessions.len() > max + 64 {
            v.sessions.pop_front();
        }
        if v.sessions.len() > max {
            return vec![finding(
                Reason::SessionStorm,
                vehicle,
                format!("{} new sessions in 10 minutes", v.sessions.len()),
            )];
        }
        Vec::new()
    }

    /// A new estimate of `vehicle`'s clock offset (vehicle minus ingest).
    pub fn on_clock(&mut self, vehicle: &str, estimate: &ClockOffset) -> Vec<Finding> {
        let max = self.thresholds.max_clock_offset.as_nanos() as i64;
        let v = self.vehicles.entry(vehicle.to_owned()).or_default();
        let off = estimate.offset_ns.saturating_abs();
        // Only what the estimate's uncertainty cannot explain counts.
        let skewed = off.saturating_sub(estimate.uncertainty_ns) > max;
        if skewed && !v.clock_skewed {
            v.clock_skewed = true;
            return vec![finding(
                Reason::ClockSkew,
                vehicle,
                format!(
                    "vehicle clock {:+.3} s off the ingest's (+-{:.3} s)",
                    estimate.offset_ns as f64 / 1e9,
                    estimate.uncertainty_ns as f64 / 1e9
                ),
            )];
        }
        if off <= max / 2 {
            v.clock_skewed = false;
        }
        Vec::new()
    }

    /// Connection `id` of `vehicle` from `addr` became a session.
    pub fn on_connect(&mut self, vehicle: &str, id: u64, addr: IpAddr) -> Vec<Finding> {
        let max = self.thresholds.max_addresses;
        let v = self.vehicles.entry(vehicle.to_owned()).or_default();
        v.connections.insert(id, addr);
        let mut addrs: Vec<&IpAddr> = v.connections.values().collect();
        addrs.sort();
        addrs.dedup();
        if addrs.len() > max {
            return vec![finding(
                Reason::TooManyAddresses,
                vehicle,
                format!("connected from {} addresses at once", addrs.len()),
            )];
        }
        Vec::new()
    }

    fn subscriber(&mut self, fingerprint: &str) -> Option<&mut SubscriberState> {
        if self.subscribers.len() >= MAX_SUBSCRIBERS && !self.subscribers.contains_key(fingerprint)
        {
            self.subscribers
                .retain(|_, s| !s.firsts.is_empty() || !s.denials.is_empty());
            if self.subscribers.len() >= MAX_SUBSCRIBERS {
                return None;
            }
        }
        Some(self.subscribers.entry(fingerprint.to_owned()).or_default())
    }

    /// ED client `client` (certificate `fingerprint`) starts reading `vehicles` at `now_ns`.
    pub fn on_subscriber_reads(
        &mut self,
        now_ns: i64,
        client: &str,
        fingerprint: &str,
        vehicles: &[String],
    ) -> Vec<Finding> {
        let max = self.thresholds.max_new_vehicles_per_hour;
        let Some(s) = self.subscriber(fingerprint) else {
            return Vec::new();
        };
        for v in vehicles {
            if s.known.len() < MAX_KNOWN_VEHICLES && s.known.insert(v.clone()) {
                s.firsts.push_back(now_ns);
            }
        }
        let window = now_ns - 3_600_000_000_000;
        while s.firsts.front().is_some_and(|at| *at < window) {
            s.firsts.pop_front();
        }
        if s.firsts.len() > max {
            return vec![finding(
                Reason::SubscriberNewVehicles,
                "",
                format!(
                    "ED client {client}: {} vehicles read for the first time within an hour",
                    s.firsts.len()
                ),
            )];
        }
        Vec::new()
    }

    /// The access policy refused ED client `client` at `now_ns`.
    pub fn on_subscriber_denied(
        &mut self,
        now_ns: i64,
        client: &str,
        fingerprint: &str,
    ) -> Vec<Finding> {
        let max = self.thresholds.max_denials_per_10min;
        let Some(s) = self.subscriber(fingerprint) else {
            return Vec::new();
        };
        s.denials.push_back(now_ns);
        let window = now_ns - 600_000_000_000;
        while s.denials.front().is_some_and(|at| *at < window) {
            s.denials.pop_front();
        }
        while s.denials.len() > max + 64 {
            s.denials.pop_front();
        }
        if s.denials.len() > max {
            return vec![finding(
                Reason::SubscriberDenials,
                "",
                format!(
                    "ED client {client}: {} refusals within ten minutes",
                    s.denials.len()
                ),
            )];
        }
        Vec::new()
    }

    /// Connection `id` of `vehicle` ended.
    pub fn on_disconnect(&mut self, vehicle: &str, id: u64) {
        if let Some(v) = self.vehicles.get_mut(vehicle) {
            v.connections.remove(&id);
            if v.connections.is_empty() && v.sessions.is_empty() && !v.clock_skewed {
                self.vehicles.remove(vehicle);
            }
        }
    }
}

/// The shell around the [`Detector`]: one for all connections, findings counted, logged and
/// audited (each vehicle and reason at most once a minute in the log and the audit; the
/// counter counts every one).
#[derive(Debug, Clone)]
pub struct Watch {
    detector: std::sync::Arc<std::sync::Mutex<Detector>>,
    reported: std::sync::Arc<std::sync::Mutex<HashMap<(String, Reason), i64>>>,
    audit: crate::audit::AuditLog,
}

/// Vehicle and reason pairs remembered for the once-a-minute report, at most.
const MAX_REPORTED: usize = 16_384;

impl Watch {
    /// A watch with `thresholds`, reporting to `audit`.
    pub fn new(thresholds: Thresholds, audit: crate::audit::AuditLog) -> Self {
        Self {
            detector: std::sync::Arc::new(std::sync::Mutex::new(Detector::new(thresholds))),
            reported: std::sync::Arc::default(),
            audit,
        }
    }

    /// Runs `f` on the detector and reports what it found.
    pub fn check(&self, f: impl FnOnce(&mut Detector) -> Vec<Finding>) {
        self.judge(|d| ((), f(d)))
    }

    /// Runs `f` on the detector, reports what it found and returns the rest of its answer.
    pub fn judge<T>(&self, f: impl FnOnce(&mut Detector) -> (T, Vec<Finding>)) -> T {
        let (answer, findings) = {
            let mut d = self
                .detector
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            f(&mut d)
        };
        if !findings.is_empty() {
            self.report(relay_ops::now_utc_ns(), findings);
        }
        answer
    }

    fn report(&self, now_ns: i64, findings: Vec<Finding>) {
        let mut reported = self
            .reported
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if reported.len() >= MAX_REPORTED {
            reported.retain(|_, at| now_ns - *at < 60_000_000_000);
        }
        for f in findings {
            metrics::counter!("relay_ingest_security_events_total", "reason" => f.reason.label())
                .increment(1);
            let key = (f.vehicle.clone(), f.reason);
            let due = reported
                .get(&key)
                .is_none_or(|at| now_ns - *at >= 60_000_000_000);
            if !due || reported.len() >= MAX_REPORTED {
                continue;
            }
            reported.insert(key, now_ns);
            tracing::warn!(vehicle = %f.vehicle, reason = f.reason.label(), detail = %f.detail, "irregular vehicle behaviour");
            let mut event =
                crate::audit::AuditEvent::new("security_event", crate::audit::Outcome::Failure);
            event.vehicles = (!f.vehicle.is_empty())
                .then_some(f.vehicle)
                .into_iter()
                .collect();
            event.detail = serde_json::json!({ "reason": f.reason.label(), "detail": f.detail });
            self.audit.record(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_proto::model::{
        ChannelInfo, Location, StreamKind, VitalSign, VitalsReport, WaveformChunk, WaveformInfo,
    };

    const S: i64 = 1_000_000_000;

    /// Findings of a frame from a vehicle whose clock was not estimated yet.
    fn judged(
        d: &mut Detector,
        now: i64,
        vehicle: &str,
        session: u64,
        desc: &StreamDescriptor,
        frame: &Frame,
    ) -> Vec<Finding> {
        d.on_frame(now, None, vehicle, session, desc, frame).1
    }
    const T0: i64 = 1_800_000_000 * S;

    fn ecg() -> StreamDescriptor {
        StreamDescriptor {
            stream_id: 0,
            kind: StreamKind::Waveform as i32,
            name: "ecg".into(),
            waveform: Some(WaveformInfo {
                sample_rate_hz: 500.0,
                channels: vec![ChannelInfo::default()],
                source: String::new(),
                ..WaveformInfo::default()
            }),
        }
    }

    fn gps() -> StreamDescriptor {
        StreamDescriptor {
            stream_id: 2,
            kind: StreamKind::Location as i32,
            name: "gps".into(),
            waveform: None,
        }
    }

    /// Frame `seq` of 20 samples at 500 Hz, stamped as the agent's framer does.
    fn chunk(seq: u64) -> Frame {
        let index = seq * 20;
        Frame {
            stream_id: 0,
            seq,
            capture_time_ns: T0 + (index as f64 * 1e9 / 500.0).round() as i64,
            payload: Some(Payload::Waveform(WaveformChunk {
                first_sample_index: index,
                sample_count: 20,
                samples: vec![0; 20],
                ..Default::default()
            })),
        }
    }

    fn fix(seq: u64, at: i64, lat: f64, lon: f64) -> Frame {
        Frame {
            stream_id: 2,
            seq,
            capture_time_ns: at,
            payload: Some(Payload::Location(Location {
                latitude_deg: lat,
                longitude_deg: lon,
                ..Location::default()
            })),
        }
    }

    fn reasons(f: &[Finding]) -> Vec<Reason> {
        f.iter().map(|f| f.reason).collect()
    }

    #[test]
    fn an_honest_stream_delivered_late_out_of_order_and_twice_raises_nothing() {
        let mut d = Detector::default();
        // A 30 minute outage: the backlog arrives in a burst an hour later, reordered, with
        // copies from a second bearer.
        let now = T0 + 3600 * S;
        let mut seqs: Vec<u64> = (0..5000).collect();
        seqs.swap(10, 20);
        seqs.swap(300, 301);
        for seq in seqs.iter().chain(&[5, 6, 7]) {
            assert!(judged(&mut d, now, "amb-1", 7, &ecg(), &chunk(*seq)).is_empty());
        }
        // A drive at 120 km/h, one fix a second.
        for i in 0..600 {
            let f = fix(i, T0 + i as i64 * S, 48.0 + i as f64 * 0.0003, 16.0);
            assert!(judged(&mut d, now, "amb-1", 7, &gps(), &f).is_empty());
        }
        // Redials into the same session, two bearers from two addresses.
        for i in 0..50 {
            assert!(d.on_hello(T0 + i * S, "amb-1", 7).is_empty());
        }
        assert!(
            d.on_connect("amb-1", 1, "10.0.0.1".parse().unwrap())
                .is_empty()
        );
        assert!(
            d.on_connect("amb-1", 2, "10.0.0.2".parse().unwrap())
                .is_empty()
        );
    }

    #[test]
    fn capture_times_ahead_of_the_clock_or_days_old_are_findings() {
        let mut d = Detector::default();
        let f = chunk(0);
        let r = judged(&mut d, f.capture_time_ns - 6 * S, "amb-1", 1, &ecg(), &f);
        assert_eq!(reasons(&r), vec![Reason::TimestampFuture]);
        let r = judged(&mut d, f.capture_time_ns + 4 * S, "amb-1", 2, &ecg(), &f);
        assert!(r.is_empty(), "4 s of skew is within bounds");
        let r = judged(
            &mut d,
            f.capture_time_ns + 25 * 3600 * S,
            "amb-1",
            3,
            &ecg(),
            &f,
        );
        assert_eq!(reasons(&r), vec![Reason::TimestampPast]);
    }

    #[test]
    fn capture_times_are_judged_against_the_vehicle_clock_once_estimated() {
        let mut d = Detector::default();
        let f = chunk(0);
        // A vehicle 8 s ahead, stamping honestly by its own clock: plausible once the offset
        // is known, flagged (and reported) before.
        let arrival = f.capture_time_ns - 8 * S + S / 10;
        let (check, r) = d.on_frame(arrival, Some(8 * S), "amb-1", 1, &ecg(), &f);
        assert_eq!((check, r.len()), (TimestampCheck::Plausible, 0));
        let (check, r) = d.on_frame(arrival, None, "amb-1", 2, &ecg(), &f);
        assert_eq!(check, TimestampCheck::Future);
        assert_eq!(reasons(&r), vec![Reason::TimestampFuture]);
        // A vehicle in sync whose frames claim to come from 6 s ahead of its clock.
        let (check, _) = d.on_frame(f.capture_time_ns - 6 * S, Some(0), "amb-1", 3, &ecg(), &f);
        assert_eq!(check, TimestampCheck::Future);
        let (check, r) = d.on_frame(
            f.capture_time_ns + 25 * 3600 * S,
            Some(-S),
            "amb-1",
            4,
            &ecg(),
            &f,
        );
        assert_eq!(check, TimestampCheck::Past);
        assert_eq!(reasons(&r), vec![Reason::TimestampPast]);
    }

    #[test]
    fn a_clock_off_beyond_its_uncertainty_is_reported_once_until_it_recovers() {
        let mut d = Detector::default();
        let est = |offset_ns: i64, uncertainty_ns: i64| ClockOffset {
            offset_ns,
            uncertainty_ns,
            measured_time_ns: T0,
        };
        let ms = S / 1000;
        assert!(
            d.on_clock("amb-1", &est(3 * ms, 20 * ms)).is_empty(),
            "in sync"
        );
        // 1.15 s off, but a 400 ms round trip leaves room for 0.2 s of error.
        assert!(
            d.on_clock("amb-1", &est(-1150 * ms, 200 * ms)).is_empty(),
            "explained by the round trip"
        );
        let r = d.on_clock("amb-1", &est(5000 * ms, 20 * ms));
        assert_eq!(reasons(&r), vec![Reason::ClockSkew]);
        assert!(r[0].detail.contains("+5.000 s"), "{}", r[0].detail);
        assert!(
            d.on_clock("amb-1", &est(5001 * ms, 15 * ms)).is_empty(),
            "once"
        );
        assert!(
            d.on_clock("amb-2", &est(-5 * S, 0)).len() == 1,
            "per vehicle"
        );
        // Set right, then off again: a new report.
        assert!(d.on_clock("amb-1", &est(100 * ms, 20 * ms)).is_empty());
        assert_eq!(
            reasons(&d.on_clock("amb-1", &est(2 * S, 0))),
            vec![Reason::ClockSkew]
        );
    }

    #[test]
    fn more_samples_than_the_declared_rate_allows_is_a_finding() {
        let mut d = Detector::default();
        let now = T0 + 3600 * S;
        assert!(judged(&mut d, now, "amb-1", 1, &ecg(), &chunk(0)).is_empty());
        // Sample index 2,000 ahead, stamped 40 ms later: 50,000 Hz against 500 declared.
        let mut f = chunk(1);
        if let Some(Payload::Waveform(w)) = f.payload.as_mut() {
            w.first_sample_index = 2_000;
        }
        assert_eq!(
            reasons(&judged(&mut d, now, "amb-1", 1, &ecg(), &f)),
            vec![Reason::RateExceeded]
        );
    }

    #[test]
    fn sequence_numbers_racing_ahead_of_capture_time_are_a_finding() {
        let mut d = Detector::default();
        let now = T0 + 3600 * S;
        assert!(judged(&mut d, now, "amb-1", 1, &ecg(), &chunk(0)).is_empty());
        // A restart skips the spool's headroom: fine.
        let mut f = chunk(1);
        f.seq = 300;
        assert!(judged(&mut d, now, "amb-1", 1, &ecg(), &f).is_empty());
        f.seq = 1_000_000;
        f.capture_time_ns += S / 25;
        assert_eq!(
            reasons(&judged(&mut d, now, "amb-1", 1, &ecg(), &f)),
            vec![Reason::SeqJump]
        );
    }

    #[test]
    fn gps_fixes_kilometres_apart_seconds_apart_are_impossible_movement() {
        let mut d = Detector::default();
        let now = T0 + 3600 * S;
        assert!(judged(&mut d, now, "amb-1", 1, &gps(), &fix(0, T0, 48.2, 16.37)).is_empty());
        // 0.1 degree of latitude (11 km) in 10 s.
        let r = judged(
            &mut d,
            now,
            "amb-1",
            1,
            &gps(),
            &fix(1, T0 + 10 * S, 48.3, 16.37),
        );
        assert_eq!(reasons(&r), vec![Reason::ImpossibleMovement]);
        assert!(r[0].detail.contains("km/h"), "{}", r[0].detail);
        // An older fix overtaken by newer ones is not judged against them.
        assert!(
            judged(
                &mut d,
                now,
                "amb-1",
                1,
                &gps(),
                &fix(2, T0 + 5 * S, 48.2, 16.37)
            )
            .is_empty()
        );
    }

    #[test]
    fn many_new_sessions_are_a_storm_but_redials_are_not() {
        let mut d = Detector::default();
        for s in 0..10 {
            assert!(d.on_hello(T0 + s as i64 * S, "amb-1", s).is_empty());
        }
        let r = d.on_hello(T0 + 11 * S, "amb-1", 99);
        assert_eq!(reasons(&r), vec![Reason::SessionStorm]);
        assert!(
            d.on_hello(T0 + 12 * S, "amb-2", 1).is_empty(),
            "per vehicle"
        );
        // Ten minutes later the window is empty again.
        assert!(d.on_hello(T0 + 700 * S, "amb-1", 100).is_empty());
    }

    #[test]
    fn an_ed_client_reading_many_new_vehicles_or_collecting_refusals_is_a_finding() {
        let t = Thresholds {
            max_new_vehicles_per_hour: 3,
            max_denials_per_10min: 2,
            ..Thresholds::default()
        };
        let mut d = Detector::new(t);
        let v = |ids: &[&str]| ids.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert!(
            d.on_subscriber_reads(T0, "ed-1", "f1", &v(&["amb-1", "amb-2"]))
                .is_empty()
        );
        // The same vehicles again are nothing new.
        assert!(
            d.on_subscriber_reads(T0 + S, "ed-1", "f1", &v(&["amb-1", "amb-2"]))
                .is_empty()
        );
        assert!(
            d.on_subscriber_reads(T0 + S, "ed-1", "f1", &v(&["amb-3"]))
                .is_empty()
        );
        let r = d.on_subscriber_reads(T0 + 2 * S, "ed-1", "f1", &v(&["amb-4"]));
        assert_eq!(reasons(&r), vec![Reason::SubscriberNewVehicles]);
        assert!(r[0].detail.contains("ed-1") && r[0].vehicle.is_empty());
        // Another client has its own history; an hour later the window is empty.
        assert!(
            d.on_subscriber_reads(T0, "ed-2", "f2", &v(&["amb-4"]))
                .is_empty()
        );
        assert!(
            d.on_subscriber_reads(T0 + 3700 * S, "ed-1", "f1", &v(&["amb-5"]))
                .is_empty()
        );
        assert!(d.on_subscriber_denied(T0, "ed-1", "f1").is_empty());
        assert!(d.on_subscriber_denied(T0 + S, "ed-1", "f1").is_empty());
        let r = d.on_subscriber_denied(T0 + 2 * S, "ed-1", "f1");
        assert_eq!(reasons(&r), vec![Reason::SubscriberDenials]);
        assert!(
            d.on_subscriber_denied(T0 + 700 * S, "ed-1", "f1")
                .is_empty()
        );
    }

    #[test]
    fn more_addresses_at_once_than_bearers_is_a_finding() {
        let mut d = Detector::default();
        for i in 0..4u64 {
            let addr = IpAddr::from([10, 0, 0, i as u8]);
            assert!(d.on_connect("amb-1", i, addr).is_empty());
        }
        let r = d.on_connect("amb-1", 9, IpAddr::from([10, 0, 0, 9]));
        assert_eq!(reasons(&r), vec![Reason::TooManyAddresses]);
        d.on_disconnect("amb-1", 9);
        d.on_disconnect("amb-1", 0);
        assert!(
            d.on_connect("amb-1", 10, IpAddr::from([10, 0, 0, 1]))
                .is_empty()
        );
        // Vitals carry no extra checks beyond time and sequence.
        let vitals = Frame {
            stream_id: 1,
            seq: 0,
            capture_time_ns: T0,
            payload: Some(Payload::Vitals(VitalsReport {
                values: vec![VitalSign::default()],
            })),
        };
        let desc = StreamDescriptor {
            stream_id: 1,
            kind: StreamKind::Vitals as i32,
            ..StreamDescriptor::default()
        };
        assert!(judged(&mut d, T0, "amb-1", 1, &desc, &vitals).is_empty());
    }
}
