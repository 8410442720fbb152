//! Terminal dashboard of the ED monitor: one line per vehicle with its latest vitals, position,
//! ECG latency and delivery state.

use std::collections::BTreeMap;
use std::fmt::Write;

use relay_proto::codes;
use relay_proto::model::{
    SubscribeResponse, TimestampCheck, frame::Payload, subscribe_response::Record,
};

#[derive(Debug, Default, Clone)]
/// The latest state of one vehicle.
pub struct VehicleView {
    /// Heart rate, /min.
    pub hr: Option<f64>,
    /// SpO2, %.
    pub spo2: Option<f64>,
    /// NIBP systolic, diastolic and mean, `mm[Hg]`.
    pub nibp: (Option<f64>, Option<f64>, Option<f64>),
    /// Latitude, longitude (degrees) and speed (m/s).
    pub position: Option<(f64, f64, f64)>,
    /// Capture-to-display latency of the latest live waveform frame, milliseconds.
    pub waveform_latency_ms: Option<f64>,
    /// Waveform frames received.
    pub waveform_frames: u64,
    /// Of them, frames that filled a gap (late).
    pub late_frames: u64,
    /// Gaps announced and not yet closed.
    pub gaps_open: u64,
    /// Gaps announced so far.
    pub gaps_seen: u64,
    /// The vehicle clock's offset to the ingest's (vehicle minus ingest), seconds, as the
    /// latest record carried it.
    pub clock_offset_s: Option<f64>,
    /// Records whose capture time the ingest flagged implausible.
    pub implausible_times: u64,
}

#[derive(Debug, Default)]
/// What the terminal view shows: every vehicle seen and the subscription's state.
pub struct Dashboard {
    /// By vehicle id.
    pub vehicles: BTreeMap<String, VehicleView>,
    /// Records received, and whether the backlog is done.
    pub records: u64,
    /// Whether the backlog has been received.
    pub synced: bool,
    /// Lagged notices received.
    pub lagged: u64,
    /// Cursor of the last message.
    pub cursor: u64,
    rates: BTreeMap<(String, u64, u32), f64>,
}

impl Dashboard {
    /// Takes one message received at `now_ns`.
    pub fn apply(&mut self, msg: &SubscribeResponse, now_ns: i64) {
        self.records += 1;
        self.cursor = msg.cursor;
        match &msg.record {
            Some(Record::Stream(info)) => {
                if let (Some(s), Some(w)) = (
                    &info.stream,
                    info.descriptor.as_ref().and_then(|d| d.waveform.as_ref()),
                ) {
                    self.rates.insert(
                        (s.vehicle_id.clone(), s.session_id, s.stream_id),
                        w.sample_rate_hz,
                    );
                }
            }
            Some(Record::Data(d)) => {
                let (Some(s), Some(f)) = (&d.stream, &d.frame) else {
                    return;
                };
                let v = self.vehicles.entry(s.vehicle_id.clone()).or_default();
                if d.late {
                    v.late_frames += 1;
                }
                let offset_ns = d.vehicle_clock.as_ref().map_or(0, |c| c.offset_ns);
                if let Some(c) = &d.vehicle_clock {
                    v.clock_offset_s = Some(c.offset_ns as f64 / 1e9);
                }
                let check = TimestampCheck::try_from(d.capture_time_check);
                if matches!(check, Ok(TimestampCheck::Future | TimestampCheck::Past)) {
                    v.implausible_times += 1;
                }
                match &f.payload {
                    Some(Payload::Vitals(r)) => {
                        for x in &r.values {
                            match x.mdc_code {
                                codes::ECG_HEART_RATE => v.hr = Some(x.value),
                                codes::PULS_OXIM_SAT_O2 => v.spo2 = Some(x.value),
                                codes::PRESS_BLD_NONINV_SYS => v.nibp.0 = Some(x.value),
                                codes::PRESS_BLD_NONINV_DIA => v.nibp.1 = Some(x.value),
                                codes::PRESS_BLD_NONINV_MEAN => v.nibp.2 = Some(x.value),
                                _ => {}
                            }
                        }
                    }
                    Some(Payload::Location(l)) => {
                        v.position = Some((l.latitude_deg, l.longitude_deg, l.speed_mps))
                    }
                    Some(Payload::Waveform(w)) => {
                        v.waveform_frames += 1;
                        if !d.late {
                            let rate = self
                                .rates
                                .get(&(s.vehicle_id.clone(), s.session_id, s.stream_id))
                                .copied()
                                .unwrap_or(0.0);
                            let dur_ns = if rate > 0.0 {
                                w.sample_count as f64 * 1e9 / rate
                            } else {
                                0.0
                            };
                            // On the ingest's clock: a vehicle clock running ahead does not
                            // make data look as if it came from the future.
                            let end = (f.capture_time_ns - offset_ns) as f64 + dur_ns;
                            v.waveform_latency_ms = Some((now_ns as f64 - end) / 1e6);
                        }
                    }
                    _ => {}
                }
            }
            Some(Record::Gap(g)) => {
                if let Some(s) = &g.stream {
                    let v = self.vehicles.entry(s.vehicle_id.clone()).or_default();
                    v.gaps_open += 1;
                    v.gaps_seen += 1;
                }
            }
            Some(Record::GapClosed(g)) => {
                if let Some(s) = &g.stream {
                    let v = self.vehicles.entry(s.vehicle_id.clone()).or_default();
                    v.gaps_open = v.gaps_open.saturating_sub(1);
                }
            }
            Some(Record::Sync(_)) => self.synced = true,
            Some(Record::Lagged(_)) => self.lagged += 1,
            // The monitor never asks for early frames.
            Some(Record::Confirmed(_)) | None => {}
        }
    }

    /// One line per vehicle, for the terminal.
    pub fn render(&self) -> String {
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.0}"));
        let mut s = String::new();
        let _ = writeln!(
            s,
            "ambulance telemetry - cursor {} - records {} - {}{}",
            self.cursor,
            self.records,
            if self.synced { "live" } else { "catching up" },
            if self.lagged > 0 {
                format!(" - lagged {}x", self.lagged)
            } else {
                String::new()
            }
        );
        let _ = writeln!(
            s,
            "{:<12} {:>4} {:>5} {:>13} {:>24} {:>10} {:>8} {:>6} {:>5} {:>8} {:>6}",
            "vehicle",
            "HR",
            "SpO2",
            "NIBP",
            "position (lat, lon, m/s)",
            "ECG lat ms",
            "frames",
            "late",
            "gaps",
            "clock s",
            "bad ts"
        );
        for (id, v) in &self.vehicles {
            let nibp = format!("{}/{} ({})", opt(v.nibp.0), opt(v.nibp.1), opt(v.nibp.2));
            let pos = v
                .position
                .map_or("-".into(), |(a, b, c)| format!("{a:.5}, {b:.5}, {c:.0}"));
            let lat = v
                .waveform_latency_ms
                .map_or("-".into(), |l| format!("{l:.0}"));
            let clock = v.clock_offset_s.map_or("-".into(), |c| format!("{c:+.3}"));
            let _ = writeln!(
                s,
                "{:<12} {:>4} {:>5} {:>13} {:>24} {:>10} {:>8} {:>6} {:>5} {:>8} {:>6}",
                id,
                opt(v.hr),
                opt(v.spo2),
                nibp,
                pos,
                lat,
                v.waveform_frames,
                v.late_frames,
                v.gaps_open,
                clock,
                v.implausible_times
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_proto::model::{DataRecord, Frame, StreamRef, VitalSign, VitalsReport};

    #[test]
    fn shows_latest_vitals_per_vehicle() {
        let mut d = Dashboard::default();
        let vit = |code, value| VitalSign {
            mdc_code: code,
            label: String::new(),
            value,
            unit: String::new(),
        };
        let msg = SubscribeResponse {
            provisional: false,
            cursor: 9,
            record: Some(Record::Data(DataRecord {
                stream: Some(StreamRef {
                    vehicle_id: "amb-3".into(),
                    session_id: 1,
                    stream_id: 1,
                    kind: 3,
                }),
                frame: Some(Frame {
                    stream_id: 1,
                    seq: 0,
                    capture_time_ns: 0,
                    payload: Some(Payload::Vitals(VitalsReport {
                        values: vec![
                            vit(147_842, 81.0),
                            vit(150_456, 97.0),
                            vit(150_021, 130.0),
                            vit(150_022, 85.0),
                            vit(150_023, 100.0),
                        ],
                    })),
                }),
                late: false,
                received_time_ns: 0,
                ..DataRecord::default()
            })),
        };
        d.apply(&msg, 0);
        let out = d.render();
        assert!(out.contains("amb-3"), "{out}");
        assert!(out.contains("81"), "{out}");
        assert!(out.contains("130/85 (100)"), "{out}");
        assert_eq!(d.cursor, 9);
    }

    #[test]
    fn latency_is_measured_on_the_ingest_clock_and_flagged_times_are_counted() {
        use relay_proto::model::{
            ClockOffset, StreamDescriptor, StreamInfo, WaveformChunk, WaveformInfo,
        };
        let s = 1_000_000_000i64;
        let stream = StreamRef {
            vehicle_id: "amb-1".into(),
            session_id: 1,
            stream_id: 0,
            kind: 2,
        };
        let mut d = Dashboard::default();
        d.apply(
            &SubscribeResponse {
                provisional: false,
                cursor: 1,
                record: Some(Record::Stream(StreamInfo {
                    stream: Some(stream.clone()),
                    descriptor: Some(StreamDescriptor {
                        waveform: Some(WaveformInfo {
                            sample_rate_hz: 500.0,
                            ..WaveformInfo::default()
                        }),
                        ..StreamDescriptor::default()
                    }),
                })),
            },
            0,
        );
        // Captured at 100 s + 5 s by a clock 5 s ahead, 40 ms of samples, shown at 100.1 s.
        let record = |check: TimestampCheck| SubscribeResponse {
            provisional: false,
            cursor: 2,
            record: Some(Record::Data(DataRecord {
                stream: Some(stream.clone()),
                frame: Some(Frame {
                    capture_time_ns: 105 * s,
                    payload: Some(Payload::Waveform(WaveformChunk {
                        sample_count: 20,
                        ..WaveformChunk::default()
                    })),
                    ..Frame::default()
                }),
                vehicle_clock: Some(ClockOffset {
                    offset_ns: 5 * s,
                    uncertainty_ns: s / 100,
                    measured_time_ns: 99 * s,
                }),
                capture_time_check: check as i32,
                ..DataRecord::default()
            })),
        };
        d.apply(&record(TimestampCheck::Plausible), 100 * s + s / 10);
        let v = &d.vehicles["amb-1"];
        assert_eq!(v.waveform_latency_ms.map(|l| l.round()), Some(60.0));
        assert_eq!((v.clock_offset_s, v.implausible_times), (Some(5.0), 0));
        d.apply(&record(TimestampCheck::Future), 100 * s);
        assert_eq!(d.vehicles["amb-1"].implausible_times, 1);
        let out = d.render();
        assert!(out.contains("+5.000"), "{out}");
    }
}
