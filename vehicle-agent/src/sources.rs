//! Data sources: WFDB replay and synthetic generators. Each source is one stream; it paces
//! itself in real time (or sped up) and hands frames to the uplink.

use std::f64::consts::PI;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use relay_proto::model::{
    ChannelInfo, FixQuality, Frame, Location, StreamDescriptor, StreamKind, VitalSign,
    VitalsReport, WaveformInfo, frame::Payload,
};
use relay_wfdb::{self as wfdb, Record, WfdbError};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::SourceConfig;
use crate::framer::{SequenceCounter, WaveformFramer};

use relay_proto::codes as mdc;

#[derive(Debug, thiserror::Error)]
/// Why a source could not be prepared.
pub enum SourceError {
    #[error(transparent)]
    /// The WFDB record could not be read.
    Wfdb(#[from] WfdbError),
    #[error("record {0} has no samples")]
    /// The record has no samples.
    Empty(String),
}

/// A source ready to run: its descriptor is known before the first connection.
#[derive(Debug)]
pub struct PreparedSource {
    /// What the stream is, declared in the Hello.
    pub descriptor: StreamDescriptor,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    /// One rate group of a record: `signals` share their samples per frame.
    Replay {
        record: Arc<Record>,
        signals: Vec<usize>,
        speed: f64,
        looping: bool,
    },
    Ecg {
        rate_hz: u32,
        heart_rate_bpm: f64,
    },
    Vitals {
        interval: Duration,
    },
    /// Clinical events from the crew's local API; `seq_base` is added to tell the crew the
    /// sequence number the ED sees (a resumed session continues its numbers).
    Events {
        raises: mpsc::Receiver<crate::events::Raise>,
        seq_base: u64,
    },
    Gps {
        interval: Duration,
        lat: f64,
        lon: f64,
    },
    Gpsd {
        address: std::net::SocketAddr,
    },
    Nmea {
        path: std::path::PathBuf,
        replay: crate::gps::NmeaReplay,
    },
    /// A monitor's MLLP listener, feeding this stream and the ones after it.
    Hl7 {
        listener: Box<crate::config::Hl7Listener>,
        streams: Box<crate::hl7_input::Hl7Streams>,
    },
    /// A stream whose frames another source of the same input produces.
    FedBySibling,
}

const TWELVE_LEADS: [&str; 12] = [
    "I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6",
];

impl PreparedSource {
    /// Reads what the source needs (a record) and describes its streams, numbered from
    /// `first_stream_id`: one stream per source, except a multi-rate record, which becomes
    /// one stream per rate group (see [`PreparedSource::wfdb_groups`]).
    pub fn prepare(cfg: &SourceConfig, first_stream_id: u32) -> Result<Vec<Self>, SourceError> {
        Ok(match cfg {
            SourceConfig::Wfdb {
                record,
                speed,
                r#loop,
                name,
            } => {
                let rec = wfdb::read_record(record)?;
                if rec.frames == 0 {
                    return Err(SourceError::Empty(record.display().to_string()));
                }
                for (i, s) in rec.header.signals.iter().enumerate() {
                    if s.checksum.is_some_and(|c| c != rec.checksum(i)) {
                        tracing::warn!(record = %record.display(), signal = i, "checksum differs from header");
                    }
                }
                Self::wfdb_groups(Arc::new(rec), first_stream_id, name, *speed, *r#loop)
            }
            SourceConfig::Hl7Mllp(listener) => {
                // One listener feeds several streams: the vitals stream's source runs it, the
                // waveform streams' sources only declare their streams.
                let descriptors =
                    crate::hl7_input::Hl7Streams::descriptors(listener, first_stream_id);
                let mut out = Vec::with_capacity(descriptors.len());
                for (k, descriptor) in descriptors.into_iter().enumerate() {
                    let kind = if k == 0 {
                        Kind::Hl7 {
                            listener: Box::new(listener.clone()),
                            streams: Box::new(crate::hl7_input::Hl7Streams::new(
                                listener,
                                first_stream_id,
                            )),
                        }
                    } else {
                        Kind::FedBySibling
                    };
                    out.push(Self { descriptor, kind });
                }
                out
            }
            other => Self::synthetic(other, first_stream_id)
                .into_iter()
                .collect(),
        })
    }

    /// A record's streams. Signals at different rates (WFDB samples per frame) cannot share a
    /// stream, whose chunks interleave one sample of every channel; each rate group becomes a
    /// stream of its own, replayed in step with the others (same start, pacing by signal time),
    /// and every one of them carries the record's layout so the ED side can put the record
    /// back together. The group holding the first signal keeps `name`; the others are named
    /// `<name>-<rate>hz`.
    fn wfdb_groups(
        rec: Arc<Record>,
        first_stream_id: u32,
        name: &str,
        speed: f64,
        looping: bool,
    ) -> Vec<Self> {
        let multi_rate = rec.is_multi_rate();
        let frame_rate = rec.header.sampling_frequency;
        let layout: Vec<u32> = if multi_rate {
            rec.header
                .signals
                .iter()
                .map(|s| s.samples_per_frame)
                .collect()
        } else {
            Vec::new()
        };
        let mut out = Vec::new();
        for (k, group) in rec.rate_groups().into_iter().enumerate() {
            let rate = frame_rate * f64::from(group.samples_per_frame);
            let channels = group
                .signals
                .iter()
                .map(|&i| {
                    let s = &rec.header.signals[i];
                    let name = if s.description.is_empty() {
                        format!("sig{i}")
                    } else {
                        s.description.clone()
                    };
                    ChannelInfo {
                        mdc_code: mdc::ecg_lead(&name),
                        name,
                        unit: s.units.clone(),
                        gain: s.gain,
                        baseline: s.baseline,
                        adc_resolution: s.adc_resolution,
                        adc_zero: s.adc_zero,
                        initial_value: s
                            .initial_value
                            .or_else(|| rec.sample(i, 0))
                            .unwrap_or_default(),
                        source_signal: u32::try_from(i).unwrap_or(u32::MAX),
                    }
                })
                .collect();
            let stream_name = if k == 0 {
                name.to_owned()
            } else {
                format!("{name}-{}hz", (rate * 10_000.0).round() / 10_000.0)
            };
            out.push(Self {
                descriptor: StreamDescriptor {
                    stream_id: first_stream_id.saturating_add(k as u32),
                    kind: StreamKind::Waveform as i32,
                    name: stream_name,
                    waveform: Some(WaveformInfo {
                        sample_rate_hz: rate,
                        channels,
                        source: format!("wfdb:{}", rec.header.record_name),
                        frame_rate_hz: if multi_rate { frame_rate } else { 0.0 },
                        source_samples_per_frame: layout.clone(),
                        counter_frequency_hz: rec.header.counter_frequency.unwrap_or(0.0),
                        ..WaveformInfo::default()
                    }),
                },
                kind: Kind::Replay {
                    record: rec.clone(),
                    signals: group.signals,
                    speed,
                    looping,
                },
            });
        }
        out
    }

    /// A generator's stream (`None` for a record: see [`PreparedSource::wfdb_groups`]).
    fn synthetic(cfg: &SourceConfig, stream_id: u32) -> Option<Self> {
        Some(match cfg {
            SourceConfig::Wfdb { .. } | SourceConfig::Hl7Mllp(_) => return None,
            SourceConfig::SyntheticEcg {
                rate_hz,
                heart_rate_bpm,
                name,
            } => Self {
                descriptor: StreamDescriptor {
                    stream_id,
                    kind: StreamKind::Waveform as i32,
                    name: name.clone(),
                    waveform: Some(WaveformInfo {
                        sample_rate_hz: *rate_hz as f64,
                        channels: TWELVE_LEADS
                            .iter()
                            .map(|l| ChannelInfo {
                                name: (*l).into(),
                                mdc_code: mdc::ecg_lead(l),
                                unit: "mV".into(),
                                gain: 1000.0,
                                baseline: 0,
                                adc_resolution: 16,
                                adc_zero: 0,
                                initial_value: 0,
                                source_signal: 0,
                            })
                            .collect(),
                        source: "synthetic".into(),
                        ..WaveformInfo::default()
                    }),
                },
                kind: Kind::Ecg {
                    rate_hz: *rate_hz,
                    heart_rate_bpm: *heart_rate_bpm,
                },
            },
            SourceConfig::SyntheticVitals { interval } => Self {
                descriptor: StreamDescriptor {
                    stream_id,
                    kind: StreamKind::Vitals as i32,
                    name: "vitals".into(),
                    waveform: None,
                },
                kind: Kind::Vitals {
                    interval: *interval,
                },
            },
            SourceConfig::Gpsd { address } => Self {
                descriptor: location_descriptor(stream_id),
                kind: Kind::Gpsd { address: *address },
            },
            SourceConfig::Nmea {
                path,
                replay,
                speed,
                r#loop,
            } => Self {
                descriptor: location_descriptor(stream_id),
                kind: Kind::Nmea {
                    path: path.clone(),
                    replay: crate::gps::NmeaReplay {
                        paced: *replay,
                        speed: *speed,
                        looping: *r#loop,
                    },
                },
            },
            SourceConfig::SyntheticGps {
                interval,
                start_latitude_deg,
                start_longitude_deg,
            } => Self {
                descriptor: location_descriptor(stream_id),
                kind: Kind::Gps {
                    interval: *interval,
                    lat: *start_latitude_deg,
                    lon: *start_longitude_deg,
                },
            },
        })
    }

    /// The crew's clinical events as stream `stream_id`, raised through `raises`.
    pub fn events(
        stream_id: u32,
        raises: mpsc::Receiver<crate::events::Raise>,
        seq_base: u64,
    ) -> Self {
        Self {
            descriptor: StreamDescriptor {
                stream_id,
                kind: StreamKind::Events as i32,
                name: "events".into(),
                waveform: None,
            },
            kind: Kind::Events { raises, seq_base },
        }
    }

    /// Numbers an events stream's frames from `base` on, as the crew is told (the spool's
    /// base of a resumed session); other sources are numbered by the uplink.
    pub fn set_events_seq_base(&mut self, base: u64) {
        if let Kind::Events { seq_base, .. } = &mut self.kind {
            *seq_base = base;
        }
    }

    /// Produces frames until the source ends or `stop` fires. `epoch_ns` is the capture time of
    /// the first sample. Returns the number of frames produced.
    pub async fn run(
        self,
        frame: Duration,
        epoch_ns: i64,
        tx: mpsc::Sender<Frame>,
        stop: CancellationToken,
    ) -> u64 {
        let stream_id = self.descriptor.stream_id;
        let kind_label = crate::metrics::kind_label(self.descriptor.kind);
        let produced = match self.kind {
            Kind::Replay {
                record,
                signals,
                speed,
                looping,
            } => {
                let channels = signals.len();
                let spf = signals.first().map_or(1, |&s| record.samples_per_frame(s));
                let rate = record.header.sampling_frequency * spf as f64;
                let total = signals.first().map_or(0, |&s| record.signal_len(s)) as u64;
                let framer = WaveformFramer::new(stream_id, channels, rate, frame, epoch_ns);
                let next = move |first: u64, count: usize| -> Option<Vec<i32>> {
                    if total == 0 || (!looping && first >= total) {
                        return None;
                    }
                    let mut out = Vec::with_capacity(count * channels);
                    let mut at = first;
                    // A looping replay wraps inside a chunk; sample indices keep counting.
                    while out.len() < count * channels {
                        if !looping && at >= total {
                            break;
                        }
                        let t = (at % total) as usize;
                        let want = count - out.len() / channels;
                        let take = want.min(total as usize - t);
                        record.interleaved(&signals, t, take, &mut out);
                        at += take as u64;
                    }
                    Some(out)
                };
                paced_waveform(framer, speed, next, &tx, &stop, kind_label).await
            }
            Kind::Ecg {
                rate_hz,
                heart_rate_bpm,
            } => {
                let framer = WaveformFramer::new(stream_id, 12, rate_hz as f64, frame, epoch_ns);
                let model = SyntheticEcg::new(rate_hz as f64, heart_rate_bpm);
                let next = move |first: u64, count: usize| -> Option<Vec<i32>> {
                    let mut out = Vec::with_capacity(count * 12);
                    for k in 0..count as u64 {
                        out.extend_from_slice(&model.sample(first + k));
                    }
                    Some(out)
                };
                paced_waveform(framer, 1.0, next, &tx, &stop, kind_label).await
            }
            Kind::Vitals { interval } => {
                let mut seq = SequenceCounter::new(stream_id);
                let mut vitals = SyntheticVitals::new(u64::from(stream_id) ^ epoch_ns as u64);
                periodic(interval, epoch_ns, &tx, &stop, kind_label, |t| {
                    seq.frame(t, Payload::Vitals(vitals.next_report()))
                })
                .await
            }
            Kind::Events {
                mut raises,
                seq_base,
            } => {
                let mut seq = SequenceCounter::new(stream_id);
                let start = Instant::now();
                let mut produced = 0;
                loop {
                    let raise = tokio::select! {
                        r = raises.recv() => r,
                        () = stop.cancelled() => None,
                    };
                    let Some(crate::events::Raise { event, placed }) = raise else {
                        break;
                    };
                    // Stamped now on the vehicle clock, like every other stream.
                    let elapsed = i64::try_from(start.elapsed().as_nanos()).unwrap_or(i64::MAX);
                    let t = epoch_ns.saturating_add(elapsed);
                    let frame = seq.frame(t, Payload::Event(event));
                    let number = frame.seq + seq_base;
                    if tx.send(frame).await.is_err() {
                        break;
                    }
                    metrics::counter!("relay_agent_frames_produced_total", "kind" => kind_label)
                        .increment(1);
                    produced += 1;
                    let _ = placed.send((number, t));
                }
                produced
            }
            Kind::Gps { interval, lat, lon } => {
                let mut seq = SequenceCounter::new(stream_id);
                let mut track = GpsTrack::new(lat, lon);
                let dt = interval.as_secs_f64();
                periodic(interval, epoch_ns, &tx, &stop, kind_label, |t| {
                    seq.frame(t, Payload::Location(track.advance(dt)))
                })
                .await
            }
            Kind::Gpsd { address } => {
                let mut sink = crate::gps::FixSink::new(stream_id, &tx, epoch_ns);
                crate::gps::run_gpsd(address, &mut sink, &stop).await;
                sink.produced
            }
            Kind::Hl7 { listener, streams } => {
                crate::hl7_input::run(*listener, *streams, tx.clone(), epoch_ns, stop.clone()).await
            }
            Kind::FedBySibling => 0,
            Kind::Nmea { path, replay } => {
                let mut sink = crate::gps::FixSink::new(stream_id, &tx, epoch_ns);
                crate::gps::run_nmea(&path, replay, &mut sink, &stop).await;
                sink.produced
            }
        };
        tracing::info!(stream_id, produced, "source finished");
        produced
    }
}

fn location_descriptor(stream_id: u32) -> StreamDescriptor {
    StreamDescriptor {
        stream_id,
        kind: StreamKind::Location as i32,
        name: "gps".into(),
        waveform: None,
    }
}

/// Emits each frame once its last sample exists (signal time / speed after start).
async fn paced_waveform(
    mut framer: WaveformFramer,
    speed: f64,
    mut next: impl FnMut(u64, usize) -> Option<Vec<i32>>,
    tx: &mpsc::Sender<Frame>,
    stop: &CancellationToken,
    kind_label: &'static str,
) -> u64 {
    let start = Instant::now();
    let spf = framer.samples_per_frame();
    let mut produced = 0;
    while let Some(samples) = next(framer.next_sample_index(), spf) {
        if samples.is_empty() {
            break;
        }
        let due = start + Duration::from_secs_f64(framer.signal_time_after(spf) / speed);
        tokio::select! {
            () = tokio::time::sleep_until(due) => {}
            () = stop.cancelled() => break,
        }
        let frame = framer.frame(samples);
        if tx.send(frame).await.is_err() {
            break;
        }
        metrics::counter!("relay_agent_frames_produced_total", "kind" => kind_label).increment(1);
        produced += 1;
    }
    produced
}

async fn periodic(
    interval: Duration,
    epoch_ns: i64,
    tx: &mpsc::Sender<Frame>,
    stop: &CancellationToken,
    kind_label: &'static str,
    mut make: impl FnMut(i64) -> Frame,
) -> u64 {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut produced: u64 = 0;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stop.cancelled() => break,
        }
        let t = epoch_ns.saturating_add((produced as f64 * interval.as_secs_f64() * 1e9) as i64);
        if tx.send(make(t)).await.is_err() {
            break;
        }
        metrics::counter!("relay_agent_frames_produced_total", "kind" => kind_label).increment(1);
        produced += 1;
    }
    produced
}

/// A 12-lead ECG built from Gaussian P, Q, R, S and T waves with per-lead amplitudes: not a
/// diagnosis-grade simulator, but it looks like an ECG on every lead and is deterministic.
#[derive(Debug, Clone)]
pub struct SyntheticEcg {
    rate_hz: f64,
    rr_s: f64,
}

// (centre relative to R in s, width in s) of P, Q, R, S, T.
const WAVES: [(f64, f64); 5] = [
    (-0.20, 0.025),
    (-0.03, 0.010),
    (0.0, 0.012),
    (0.03, 0.010),
    (0.28, 0.055),
];
// Amplitudes in mV per lead (I, II, III, aVR, aVL, aVF, V1..V6) for P, Q, R, S, T.
const AMPS: [[f64; 5]; 12] = [
    [0.10, -0.05, 0.90, -0.10, 0.25],
    [0.15, -0.08, 1.30, -0.20, 0.35],
    [0.05, -0.05, 0.45, -0.15, 0.10],
    [-0.12, 0.05, -1.00, 0.15, -0.30],
    [0.04, -0.03, 0.30, -0.05, 0.08],
    [0.10, -0.06, 0.85, -0.15, 0.22],
    [0.06, 0.00, 0.30, -1.00, -0.10],
    [0.08, 0.00, 0.60, -1.40, 0.30],
    [0.08, -0.05, 1.00, -0.90, 0.40],
    [0.09, -0.08, 1.50, -0.50, 0.45],
    [0.09, -0.08, 1.40, -0.30, 0.38],
    [0.08, -0.06, 1.10, -0.15, 0.30],
];

impl SyntheticEcg {
    /// A generator at `rate_hz` with the given heart rate.
    pub fn new(rate_hz: f64, heart_rate_bpm: f64) -> Self {
        Self {
            rate_hz,
            rr_s: 60.0 / heart_rate_bpm,
        }
    }

    /// All 12 leads at sample `index`, in microvolts (gain 1000 per mV).
    pub fn sample(&self, index: u64) -> [i32; 12] {
        let t = index as f64 / self.rate_hz;
        // Position relative to the nearest R peak, R peaks at 0.35 s into each beat.
        let phase = (t % self.rr_s) - 0.35;
        let wander = 0.03 * (2.0 * PI * 0.25 * t).sin();
        let mut out = [0; 12];
        for (lead, amps) in AMPS.iter().enumerate() {
            let mut mv = wander;
            for (k, (centre, width)) in WAVES.iter().enumerate() {
                let d = (phase - centre) / width;
                mv += amps[k] * (-0.5 * d * d).exp();
            }
            out[lead] = (mv * 1000.0).round() as i32;
        }
        out
    }
}

/// Vital signs drifting slowly around plausible values of a stable adult patient.
#[derive(Debug)]
pub struct SyntheticVitals {
    rng: StdRng,
    hr: f64,
    spo2: f64,
    sys: f64,
    dia: f64,
    rr: f64,
    etco2: f64,
    temp: f64,
}

impl SyntheticVitals {
    /// A generator whose drift is fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            hr: 78.0,
            spo2: 97.0,
            sys: 128.0,
            dia: 82.0,
            rr: 16.0,
            etco2: 36.0,
            temp: 36.9,
        }
    }

    fn drift(rng: &mut StdRng, v: &mut f64, step: f64, lo: f64, hi: f64) {
        *v = (*v + rng.random_range(-step..=step)).clamp(lo, hi);
    }

    /// The next report, values drifted a little.
    pub fn next_report(&mut self) -> VitalsReport {
        let r = &mut self.rng;
        Self::drift(r, &mut self.hr, 1.0, 55.0, 120.0);
        Self::drift(r, &mut self.spo2, 0.3, 92.0, 100.0);
        Self::drift(r, &mut self.sys, 1.0, 95.0, 170.0);
        Self::drift(r, &mut self.dia, 0.7, 55.0, 105.0);
        Self::drift(r, &mut self.rr, 0.3, 10.0, 26.0);
        Self::drift(r, &mut self.etco2, 0.3, 30.0, 45.0);
        Self::drift(r, &mut self.temp, 0.01, 36.0, 38.5);
        // Units come from the shared code table, so every end names them alike.
        let v = |mdc_code, label: &str, value: f64| VitalSign {
            mdc_code,
            label: label.into(),
            value,
            unit: mdc::ucum_unit(mdc_code).unwrap_or_default().into(),
        };
        let mean = (self.sys + 2.0 * self.dia) / 3.0;
        VitalsReport {
            values: vec![
                v(mdc::ECG_HEART_RATE, "HR", self.hr.round()),
                v(mdc::PULS_OXIM_SAT_O2, "SpO2", self.spo2.round()),
                v(mdc::PRESS_BLD_NONINV_SYS, "NIBP-sys", self.sys.round()),
                v(mdc::PRESS_BLD_NONINV_DIA, "NIBP-dia", self.dia.round()),
                v(mdc::PRESS_BLD_NONINV_MEAN, "NIBP-mean", mean.round()),
                v(mdc::RESP_RATE, "RR", self.rr.round()),
                v(mdc::AWAY_CO2_ET, "EtCO2", self.etco2.round()),
                v(mdc::TEMP_BODY, "Temp", (self.temp * 10.0).round() / 10.0),
            ],
        }
    }
}

/// A vehicle driving at about 50 km/h along a gently curving road.
#[derive(Debug, Clone)]
pub struct GpsTrack {
    lat: f64,
    lon: f64,
    heading: f64,
    t: f64,
}

impl GpsTrack {
    /// A track starting at `lat`, `lon`.
    pub fn new(lat: f64, lon: f64) -> Self {
        Self {
            lat,
            lon,
            heading: 45.0,
            t: 0.0,
        }
    }

    /// The position after `dt_s` more seconds.
    pub fn advance(&mut self, dt_s: f64) -> Location {
        const SPEED: f64 = 14.0;
        const M_PER_DEG: f64 = 111_320.0;
        self.t += dt_s;
        self.heading = (45.0 + 30.0 * (self.t / 60.0).sin()).rem_euclid(360.0);
        let h = self.heading.to_radians();
        self.lat += SPEED * dt_s * h.cos() / M_PER_DEG;
        self.lon += SPEED * dt_s * h.sin() / (M_PER_DEG * self.lat.to_radians().cos());
        Location {
            latitude_deg: self.lat,
            longitude_deg: self.lon,
            altitude_m: 40.0,
            speed_mps: SPEED,
            heading_deg: self.heading,
            fix_quality: FixQuality::Fix3d as i32,
            horizontal_accuracy_m: 4.0,
            satellites: 9,
            hdop: 0.9,
            ..Location::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn synthetic_ecg_has_r_peaks_at_the_heart_rate() {
        let ecg = SyntheticEcg::new(500.0, 60.0);
        let lead_ii: Vec<i32> = (0..5000).map(|i| ecg.sample(i)[1]).collect();
        let peaks = lead_ii
            .windows(3)
            .filter(|w| w[1] > 1000 && w[1] >= w[0] && w[1] > w[2])
            .count();
        assert_eq!(peaks, 10, "60 bpm over 10 s");
    }

    #[test]
    fn vitals_carry_mdc_codes_and_ucum_units() {
        let r = SyntheticVitals::new(1).next_report();
        let hr = r
            .values
            .iter()
            .find(|v| v.mdc_code == mdc::ECG_HEART_RATE)
            .unwrap();
        assert_eq!(hr.unit, "/min");
        assert!((55.0..=120.0).contains(&hr.value));
        assert_eq!(r.values.len(), 8);
    }

    #[test]
    fn gps_moves_at_its_speed() {
        let mut g = GpsTrack::new(52.52, 13.405);
        let a = g.advance(1.0);
        let b = g.advance(1.0);
        let dy = (b.latitude_deg - a.latitude_deg) * 111_320.0;
        let dx =
            (b.longitude_deg - a.longitude_deg) * 111_320.0 * a.latitude_deg.to_radians().cos();
        let d = (dx * dx + dy * dy).sqrt();
        assert!((13.0..15.0).contains(&d), "{d}");
    }

    #[tokio::test(start_paused = true)]
    async fn replay_paces_and_preserves_every_sample() {
        let record = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/ecg/100");
        let cfg = SourceConfig::Wfdb {
            record: record.clone(),
            speed: 100.0,
            r#loop: false,
            name: "ecg".into(),
        };
        let src = PreparedSource::prepare(&cfg, 0).unwrap().remove(0);
        let original = wfdb::read_record(&record).unwrap();
        let (tx, mut rx) = mpsc::channel(64);
        let started = Instant::now();
        let task =
            tokio::spawn(src.run(Duration::from_millis(40), 0, tx, CancellationToken::new()));
        let mut samples = Vec::new();
        let mut last_seq = None;
        while let Some(f) = rx.recv().await {
            assert_eq!(f.seq, last_seq.map_or(0, |s| s + 1));
            last_seq = Some(f.seq);
            if let Some(Payload::Waveform(w)) = f.payload {
                assert_eq!(w.first_sample_index as usize * 2, samples.len());
                samples.extend(w.samples);
            }
        }
        assert_eq!(task.await.unwrap(), last_seq.unwrap() + 1);
        assert_eq!(samples, original.samples);
        // 1805.6 s of signal at 100x: about 18 s of (virtual) time.
        let took = started.elapsed().as_secs_f64();
        assert!((18.0..18.2).contains(&took), "{took}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_multi_rate_record_becomes_one_stream_per_rate_replayed_in_step() {
        let record =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/ecg-multirate/mixedsignals");
        let cfg = SourceConfig::Wfdb {
            record: record.clone(),
            speed: 50.0,
            r#loop: false,
            name: "monitor".into(),
        };
        let sources = PreparedSource::prepare(&cfg, 3).unwrap();
        let original = wfdb::read_record(&record).unwrap();
        let names: Vec<&str> = sources.iter().map(|s| s.descriptor.name.as_str()).collect();
        assert_eq!(names, ["monitor", "monitor-124.945hz", "monitor-62.4725hz"]);
        let mut tasks = Vec::new();
        for (k, src) in sources.into_iter().enumerate() {
            let d = src.descriptor.clone();
            assert_eq!(d.stream_id, 3 + k as u32);
            let w = d.waveform.clone().unwrap();
            assert_eq!(w.frame_rate_hz, 62.4725);
            assert_eq!(w.source_samples_per_frame, vec![4, 4, 4, 2, 2, 1]);
            assert_eq!(w.counter_frequency_hz, 999.56);
            let (tx, mut rx) = mpsc::channel(64);
            let run =
                tokio::spawn(src.run(Duration::from_millis(40), 7, tx, CancellationToken::new()));
            tasks.push(tokio::spawn(async move {
                let mut samples = Vec::new();
                let mut last_time = 0;
                while let Some(f) = rx.recv().await {
                    if let Some(Payload::Waveform(c)) = f.payload {
                        let n = w.channels.len();
                        assert_eq!(c.first_sample_index as usize * n, samples.len());
                        samples.extend(c.samples);
                        last_time = f.capture_time_ns;
                    }
                }
                run.await.unwrap();
                (w, samples, last_time)
            }));
        }
        let mut last_times = Vec::new();
        for t in tasks {
            let (w, samples, last_time) = t.await.unwrap();
            let signals: Vec<usize> = w
                .channels
                .iter()
                .map(|c| c.source_signal as usize)
                .collect();
            let mut want = Vec::new();
            original.interleaved(&signals, 0, usize::MAX, &mut want);
            assert_eq!(samples.len(), want.len(), "{}", w.sample_rate_hz);
            assert!(samples == want, "group at {} Hz differs", w.sample_rate_hz);
            for (c, &s) in w.channels.iter().zip(&signals) {
                let spec = &original.header.signals[s];
                assert_eq!(
                    (c.gain, c.baseline, c.unit.as_str()),
                    (spec.gain, spec.baseline, spec.units.as_str())
                );
            }
            last_times.push(last_time);
        }
        // In step: every group's last chunk was captured within one chunk of the others.
        let spread = last_times.iter().max().unwrap() - last_times.iter().min().unwrap();
        assert!(spread <= 40_000_000, "{last_times:?}");
    }
}
