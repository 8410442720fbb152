//! What the browser receives: each gRPC subscription message as one JSON object, shaped for
//! drawing. Samples stay raw ADC units with each channel's gain and baseline beside them, so
//! the page shows exact values and never an interpolation. 64-bit ids travel as strings
//! (JavaScript numbers hold 53 bits); times as milliseconds since the epoch.

use relay_proto::model::{
    FixQuality, Severity, StreamKind, StreamRef, SubscribeResponse, TimestampCheck, frame::Payload,
    subscribe_response::Record,
};
use serde_json::{Value, json};

/// The key a page uses for a stream: `session:stream`.
pub fn stream_key(s: &StreamRef) -> String {
    format!("{}:{}", s.session_id, s.stream_id)
}

/// Nanoseconds since the epoch as fractional milliseconds.
pub fn ms(ns: i64) -> f64 {
    ns as f64 / 1e6
}

/// Lower-case name of a stream kind.
pub fn kind_name(kind: i32) -> &'static str {
    match StreamKind::try_from(kind) {
        Ok(StreamKind::Events) => "events",
        Ok(StreamKind::Waveform) => "waveform",
        Ok(StreamKind::Vitals) => "vitals",
        Ok(StreamKind::Location) => "location",
        _ => "unknown",
    }
}

/// Lower-case name of a severity.
pub fn severity_name(severity: i32) -> &'static str {
    match Severity::try_from(severity) {
        Ok(Severity::High) => "high",
        Ok(Severity::Medium) => "medium",
        Ok(Severity::Low) => "low",
        Ok(Severity::Info) => "info",
        _ => "unspecified",
    }
}

fn fix_name(fix: i32) -> &'static str {
    match FixQuality::try_from(fix) {
        Ok(FixQuality::None) => "none",
        Ok(FixQuality::Fix2d) => "2d",
        Ok(FixQuality::Fix3d) => "3d",
        Ok(FixQuality::Dgps) => "dgps",
        Ok(FixQuality::Rtk) => "rtk",
        _ => "unknown",
    }
}

/// A waveform record as the page receives it, serialized straight from the frame's samples
/// (the hot path: no JSON value per sample).
#[derive(serde::Serialize)]
struct Wave<'a> {
    t: &'static str,
    key: String,
    seq: u64,
    cap: f64,
    cap_ingest: f64,
    rcv: f64,
    late: bool,
    plausible: bool,
    first: u64,
    n: u32,
    s: &'a [i32],
}

/// One subscription message as the text of the page's event (the JSON of [`to_json`]), or
/// `None` for what a page cannot use.
pub fn to_event_data(msg: &SubscribeResponse) -> Option<String> {
    if let Some(Record::Data(d)) = &msg.record
        && let (Some(s), Some(f)) = (&d.stream, &d.frame)
        && let Some(Payload::Waveform(w)) = &f.payload
    {
        let offset_ns = d.vehicle_clock.as_ref().map_or(0, |c| c.offset_ns);
        let wave = Wave {
            t: "wave",
            key: stream_key(s),
            seq: f.seq,
            cap: ms(f.capture_time_ns),
            cap_ingest: ms(f.capture_time_ns.saturating_sub(offset_ns)),
            rcv: ms(d.received_time_ns),
            late: d.late,
            plausible: plausible(d.capture_time_check),
            first: w.first_sample_index,
            n: w.sample_count,
            s: &w.samples,
        };
        return serde_json::to_string(&wave).ok();
    }
    to_json(msg).map(|v| v.to_string())
}

fn plausible(check: i32) -> bool {
    !matches!(
        TimestampCheck::try_from(check),
        Ok(TimestampCheck::Future | TimestampCheck::Past)
    )
}

/// One subscription message as the page's JSON, or `None` for what a page cannot use.
pub fn to_json(msg: &SubscribeResponse) -> Option<Value> {
    let v = match msg.record.as_ref()? {
        Record::Stream(info) => {
            let s = info.stream.as_ref()?;
            let d = info.descriptor.as_ref()?;
            let wave = d.waveform.as_ref().map(|w| {
                json!({
                    "rate": w.sample_rate_hz,
                    "source": w.source,
                    "channels": w.channels.iter().map(|c| json!({
                        "name": c.name,
                        "mdc": c.mdc_code,
                        "unit": if c.unit.is_empty() { "mV" } else { c.unit.as_str() },
                        "gain": c.gain,
                        "baseline": c.baseline,
                    })).collect::<Vec<_>>(),
                })
            });
            json!({
                "t": "stream",
                "key": stream_key(s),
                "kind": kind_name(s.kind),
                "name": d.name,
                "waveform": wave,
            })
        }
        Record::Data(d) => {
            let s = d.stream.as_ref()?;
            let f = d.frame.as_ref()?;
            let offset_ns = d.vehicle_clock.as_ref().map_or(0, |c| c.offset_ns);
            let plausible = plausible(d.capture_time_check);
            let mut v = json!({
                "key": stream_key(s),
                "seq": f.seq,
                "cap": ms(f.capture_time_ns),
                // The capture time on the ingest's clock, for latency across clocks.
                "cap_ingest": ms(f.capture_time_ns.saturating_sub(offset_ns)),
                "rcv": ms(d.received_time_ns),
                "late": d.late,
                "plausible": plausible,
            });
            let extra = match f.payload.as_ref()? {
                Payload::Waveform(w) => json!({
                    "t": "wave",
                    "first": w.first_sample_index,
                    "n": w.sample_count,
                    "s": w.samples,
                }),
                Payload::Vitals(r) => json!({
                    "t": "vitals",
                    "values": r.values.iter().map(|x| json!({
                        "mdc": x.mdc_code,
                        "label": x.label,
                        "value": x.value,
                        "unit": x.unit,
                    })).collect::<Vec<_>>(),
                }),
                Payload::Location(l) => json!({
                    "t": "loc",
                    "lat": l.latitude_deg,
                    "lon": l.longitude_deg,
                    "alt": l.altitude_m,
                    "speed": l.speed_mps,
                    "heading": l.heading_deg,
                    "fix": fix_name(l.fix_quality),
                    "accuracy": l.horizontal_accuracy_m,
                    "satellites": l.satellites,
                }),
                Payload::Event(e) => json!({
                    "t": "event",
                    "code": e.code,
                    "severity": severity_name(e.severity),
                    "text": e.text,
                }),
            };
            if let (Some(obj), Value::Object(more)) = (v.as_object_mut(), extra) {
                obj.extend(more);
            }
            v
        }
        Record::Gap(g) => {
            let s = g.stream.as_ref()?;
            json!({
                "t": "gap",
                "key": stream_key(s),
                "start_seq": g.start_seq,
                "end_seq": g.end_seq,
                "start": ms(g.start_time_ns),
                "end": ms(g.end_time_ns),
            })
        }
        Record::GapClosed(g) => {
            let s = g.stream.as_ref()?;
            json!({
                "t": "gap_closed",
                "key": stream_key(s),
                "start_seq": g.start_seq,
                "end_seq": g.end_seq,
            })
        }
        Record::Sync(s) => json!({ "t": "sync", "backlog": s.backlog_records }),
        Record::Lagged(l) => json!({ "t": "lagged", "missed": l.missed_live_records }),
        // The page never asks for early frames.
        Record::Confirmed(_) => return None,
    };
    Some(v)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use relay_proto::model::{DataRecord, Frame, WaveformChunk};

    #[test]
    fn waveform_records_keep_exact_samples_and_ids_as_strings() {
        let msg = SubscribeResponse {
            provisional: false,
            cursor: 7,
            record: Some(Record::Data(DataRecord {
                stream: Some(StreamRef {
                    vehicle_id: "amb-1".into(),
                    session_id: u64::MAX,
                    stream_id: 3,
                    kind: StreamKind::Waveform as i32,
                }),
                frame: Some(Frame {
                    stream_id: 3,
                    seq: 9,
                    capture_time_ns: 1_700_000_000_123_456_789,
                    payload: Some(Payload::Waveform(WaveformChunk {
                        first_sample_index: 360,
                        sample_count: 2,
                        samples: vec![-5, 7, 1024, -1024],
                        ..Default::default()
                    })),
                }),
                late: true,
                ..Default::default()
            })),
        };
        let v = to_json(&msg).unwrap();
        assert_eq!(v["t"], "wave");
        assert_eq!(v["key"], format!("{}:3", u64::MAX));
        assert_eq!(v["first"], 360);
        assert_eq!(v["s"], json!([-5, 7, 1024, -1024]));
        assert_eq!(v["late"], true);
        assert!((v["cap"].as_f64().unwrap() - 1_700_000_000_123.456_8).abs() < 0.001);
        // The live stream's direct serialization says the same.
        let direct: Value = serde_json::from_str(&to_event_data(&msg).unwrap()).unwrap();
        assert_eq!(direct, v);
    }
}
