//! Validation of what a vehicle sends: the Hello against its certificate and our bounds, and
//! every frame against the stream it claims. Pure functions; a failure names the close code.

use std::collections::{HashMap, HashSet};

use relay_proto::model::{Frame, StreamDescriptor, StreamKind, WaveformEncoding, frame::Payload};
use relay_proto::wire::v1::Hello;
use relay_proto::{CloseCode, PROTOCOL_VERSION};

use super::{Refusal, refuse};

/// Bounds of what a Hello may declare.
const MAX_STREAMS_PER_SESSION: usize = 64;
const MAX_CHANNELS: usize = 256;
const MAX_SAMPLES_PER_FRAME: u32 = 100_000;
/// Samples per frame of a multi-rate source's signal (WFDB's bound in the relay's reader).
const MAX_SOURCE_SAMPLES_PER_FRAME: u32 = 4096;
/// Highest sequence number accepted: 2^40 frames is over 1,000 years of 40 ms frames, and
/// keeps every seq and sample-index computation far from overflow.
pub const MAX_SEQ: u64 = 1 << 40;
const MAX_VITALS_PER_FRAME: usize = 256;
/// Checks a Hello against the certificate and our bounds.
pub fn validate_hello(hello: &Hello, vehicle: &str) -> Result<(), Refusal> {
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(refuse(
            CloseCode::BadHandshake,
            format!("protocol version {} unsupported", hello.protocol_version),
        ));
    }
    if hello.vehicle_id != vehicle {
        metrics::counter!("relay_ingest_security_events_total", "reason" => "identity_mismatch")
            .increment(1);
        return Err(refuse(
            CloseCode::IdentityMismatch,
            format!(
                "hello claims vehicle {:?}, certificate says {vehicle:?}",
                hello.vehicle_id.chars().take(64).collect::<String>()
            ),
        ));
    }
    if hello.agent_version.len() > 128 {
        return Err(refuse(CloseCode::Malformed, "agent version over 128 bytes"));
    }
    if hello.streams.is_empty() || hello.streams.len() > MAX_STREAMS_PER_SESSION {
        return Err(refuse(
            CloseCode::Malformed,
            format!("1..={MAX_STREAMS_PER_SESSION} streams required"),
        ));
    }
    let mut ids = HashSet::new();
    for s in &hello.streams {
        if !ids.insert(s.stream_id) {
            return Err(refuse(
                CloseCode::Malformed,
                format!("stream id {} declared twice", s.stream_id),
            ));
        }
        validate_descriptor(s)?;
    }
    Ok(())
}

fn validate_descriptor(s: &StreamDescriptor) -> Result<(), Refusal> {
    let kind = StreamKind::try_from(s.kind).map_err(|_| {
        refuse(
            CloseCode::Malformed,
            format!("stream {}: unknown kind {}", s.stream_id, s.kind),
        )
    })?;
    if kind == StreamKind::Unspecified || s.name.len() > 64 {
        return Err(refuse(
            CloseCode::Malformed,
            format!("stream {}: kind or name invalid", s.stream_id),
        ));
    }
    match (kind, &s.waveform) {
        (StreamKind::Waveform, Some(w)) => {
            let rate_ok = w.sample_rate_hz.is_finite()
                && w.sample_rate_hz > 0.0
                && w.sample_rate_hz <= 100_000.0;
            if !rate_ok
                || w.channels.is_empty()
                || w.channels.len() > MAX_CHANNELS
                || w.source.len() > 256
            {
                return Err(refuse(
                    CloseCode::Malformed,
                    format!("stream {}: bad waveform rate or channels", s.stream_id),
                ));
            }
            if WaveformEncoding::try_from(w.encoding).is_err() {
                return Err(refuse(
                    CloseCode::Malformed,
                    format!(
                        "stream {}: unknown waveform encoding {}",
                        s.stream_id, w.encoding
                    ),
                ));
            }
            let layout = &w.source_samples_per_frame;
            let layout_ok = layout.len() <= MAX_CHANNELS
                && layout
                    .iter()
                    .all(|&k| (1..=MAX_SOURCE_SAMPLES_PER_FRAME).contains(&k))
                && w.frame_rate_hz.is_finite()
                && (0.0..=100_000.0).contains(&w.frame_rate_hz)
                && w.counter_frequency_hz.is_finite()
                && w.counter_frequency_hz >= 0.0
                && (layout.is_empty() || w.frame_rate_hz > 0.0);
            if w.channels.iter().any(|c| {
                !(c.gain.is_finite() && c.gain > 0.0)
                    || c.name.len() > 64
                    || c.unit.len() > 32
                    || (!layout.is_empty() && c.source_signal as usize >= layout.len())
            }) || !layout_ok
            {
                return Err(refuse(
                    CloseCode::Malformed,
                    format!("stream {}: bad channel description", s.stream_id),
                ));
            }
        }
        (StreamKind::Waveform, None) => {
            return Err(refuse(
                CloseCode::Malformed,
                format!("stream {}: waveform without description", s.stream_id),
            ));
        }
        _ => {}
    }
    Ok(())
}

/// Checks a frame against its stream's declaration.
pub fn validate_frame(
    frame: &Frame,
    streams: &HashMap<u32, StreamDescriptor>,
) -> Result<(), Refusal> {
    let Some(desc) = streams.get(&frame.stream_id) else {
        return Err(refuse(
            CloseCode::Malformed,
            format!("frame for undeclared stream {}", frame.stream_id),
        ));
    };
    if frame.seq > MAX_SEQ {
        return Err(refuse(
            CloseCode::Malformed,
            format!(
                "stream {} seq {} beyond {MAX_SEQ}",
                frame.stream_id, frame.seq
            ),
        ));
    }
    let kind = StreamKind::try_from(desc.kind).unwrap_or(StreamKind::Unspecified);
    let ok = match (&frame.payload, kind) {
        (Some(Payload::Waveform(w)), StreamKind::Waveform) => {
            let channels = desc.waveform.as_ref().map_or(0, |w| w.channels.len());
            // Plain samples are always understood; packed ones only on a stream that said
            // how they are packed (unpacking checks the rest).
            let form_ok = if w.packed.is_empty() {
                w.samples.len() == w.sample_count as usize * channels
            } else {
                w.samples.is_empty()
                    && desc
                        .waveform
                        .as_ref()
                        .is_some_and(|i| i.encoding() != WaveformEncoding::Samples)
            };
            w.sample_count > 0
                && w.sample_count <= MAX_SAMPLES_PER_FRAME
                && form_ok
                // Sample index consistent with the frame number: frames before this one
                // hold at most MAX_SAMPLES_PER_FRAME each.
                && w.first_sample_index <= frame.seq * u64::from(MAX_SAMPLES_PER_FRAME)
        }
        (Some(Payload::Vitals(v)), StreamKind::Vitals) => {
            !v.values.is_empty()
                && v.values.len() <= MAX_VITALS_PER_FRAME
                && v.values.iter().all(|x| x.value.is_finite())
        }
        (Some(Payload::Location(l)), StreamKind::Location) => plausible_location(l),
        (Some(Payload::Event(_)), StreamKind::Events) => true,
        _ => false,
    };
    if !ok {
        return Err(refuse(
            CloseCode::Malformed,
            format!(
                "stream {} seq {}: payload does not match its stream",
                frame.stream_id, frame.seq
            ),
        ));
    }
    Ok(())
}

/// A position every consumer can use as it is: no NaN or infinity (JSON, FHIR and maps have no
/// place for them), coordinates and heading in range, no negative speed or accuracy.
fn plausible_location(l: &relay_proto::model::Location) -> bool {
    (-90.0..=90.0).contains(&l.latitude_deg)
        && (-180.0..=180.0).contains(&l.longitude_deg)
        && l.altitude_m.is_finite()
        && (0.0..=360.0).contains(&l.heading_deg)
        && l.speed_mps.is_finite()
        && l.speed_mps >= 0.0
        && [
            l.horizontal_accuracy_m,
            l.vertical_accuracy_m,
            l.speed_accuracy_mps,
            l.hdop,
        ]
        .iter()
        .all(|v| v.is_finite() && *v >= 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_proto::model::{ChannelInfo, Location, WaveformChunk, WaveformInfo};
    use relay_proto::model::{StreamDescriptor, StreamKind};

    fn ecg(id: u32) -> StreamDescriptor {
        let ch = |n: &str| ChannelInfo {
            name: n.into(),
            unit: "mV".into(),
            gain: 200.0,
            ..ChannelInfo::default()
        };
        StreamDescriptor {
            stream_id: id,
            kind: StreamKind::Waveform as i32,
            name: "ecg".into(),
            waveform: Some(WaveformInfo {
                sample_rate_hz: 360.0,
                channels: vec![ch("MLII"), ch("V5")],
                source: String::new(),
                ..WaveformInfo::default()
            }),
        }
    }

    fn hello(streams: Vec<StreamDescriptor>) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            vehicle_id: "amb-1".into(),
            session_id: 1,
            streams,
            agent_version: String::new(),
            agent_time_ns: 0,
        }
    }

    #[test]
    fn hello_must_match_certificate_and_bounds() {
        assert!(validate_hello(&hello(vec![ecg(0)]), "amb-1").is_ok());
        assert_eq!(
            validate_hello(&hello(vec![ecg(0)]), "amb-2")
                .unwrap_err()
                .code,
            CloseCode::IdentityMismatch
        );
        assert_eq!(
            validate_hello(&hello(vec![ecg(0), ecg(0)]), "amb-1")
                .unwrap_err()
                .code,
            CloseCode::Malformed
        );
        assert_eq!(
            validate_hello(&hello(vec![]), "amb-1").unwrap_err().code,
            CloseCode::Malformed
        );
        let mut bad_rate = ecg(0);
        if let Some(w) = bad_rate.waveform.as_mut() {
            w.sample_rate_hz = f64::NAN;
        }
        assert!(validate_hello(&hello(vec![bad_rate]), "amb-1").is_err());
        // A rate group of a multi-rate source: its channels must name signals of the layout.
        let group = |layout: Vec<u32>, frame_rate: f64, signal: u32| {
            let mut d = ecg(0);
            if let Some(w) = d.waveform.as_mut() {
                w.source_samples_per_frame = layout;
                w.frame_rate_hz = frame_rate;
                for c in &mut w.channels {
                    c.source_signal = signal;
                }
            }
            hello(vec![d])
        };
        assert!(validate_hello(&group(vec![4, 1], 90.0, 1), "amb-1").is_ok());
        for bad in [
            group(vec![4, 1], 90.0, 2),
            group(vec![4, 0], 90.0, 0),
            group(vec![4, 5000], 90.0, 0),
            group(vec![4, 1], 0.0, 0),
            group(vec![4, 1], f64::INFINITY, 0),
        ] {
            assert!(validate_hello(&bad, "amb-1").is_err(), "{bad:?}");
        }
        let mut old = hello(vec![ecg(0)]);
        old.protocol_version = 99;
        assert_eq!(
            validate_hello(&old, "amb-1").unwrap_err().code,
            CloseCode::BadHandshake
        );
    }

    #[test]
    fn frames_must_match_their_stream() {
        let streams: HashMap<u32, StreamDescriptor> = [(0, ecg(0))].into_iter().collect();
        let wave = |count: u32, n: usize| Frame {
            stream_id: 0,
            seq: 0,
            capture_time_ns: 0,
            payload: Some(Payload::Waveform(WaveformChunk {
                first_sample_index: 0,
                sample_count: count,
                samples: vec![0; n],
                ..Default::default()
            })),
        };
        assert!(validate_frame(&wave(3, 6), &streams).is_ok());
        assert!(
            validate_frame(&wave(3, 5), &streams).is_err(),
            "samples not count x channels"
        );
        assert!(validate_frame(&wave(0, 0), &streams).is_err());
        let mut other = wave(3, 6);
        other.stream_id = 1;
        assert!(
            validate_frame(&other, &streams).is_err(),
            "undeclared stream"
        );
        let loc = Frame {
            payload: Some(Payload::Location(Location::default())),
            ..wave(1, 2)
        };
        assert!(
            validate_frame(&loc, &streams).is_err(),
            "payload kind differs from the stream's"
        );
        let mut far = wave(3, 6);
        far.seq = MAX_SEQ + 1;
        assert!(
            validate_frame(&far, &streams).is_err(),
            "seq beyond the bound"
        );
        let mut jump = wave(3, 6);
        if let Some(Payload::Waveform(w)) = jump.payload.as_mut() {
            w.first_sample_index = 1 << 50;
        }
        assert!(
            validate_frame(&jump, &streams).is_err(),
            "sample index inconsistent with seq"
        );
        let no_payload = Frame {
            payload: None,
            ..wave(1, 2)
        };
        assert!(validate_frame(&no_payload, &streams).is_err());
    }

    #[test]
    fn packed_frames_only_on_streams_that_declared_their_encoding() {
        let mut packed_ecg = ecg(1);
        if let Some(w) = packed_ecg.waveform.as_mut() {
            w.set_encoding(WaveformEncoding::Lpc1);
        }
        let streams: HashMap<u32, StreamDescriptor> =
            [(0, ecg(0)), (1, packed_ecg.clone())].into_iter().collect();
        let wave = |stream_id: u32, samples: Vec<i32>, packed: Vec<u8>| Frame {
            stream_id,
            payload: Some(Payload::Waveform(WaveformChunk {
                sample_count: 3,
                samples,
                packed,
                ..Default::default()
            })),
            ..Frame::default()
        };
        assert!(validate_frame(&wave(1, Vec::new(), vec![1, 2]), &streams).is_ok());
        assert!(
            validate_frame(&wave(1, vec![0; 6], Vec::new()), &streams).is_ok(),
            "plain samples are understood on any stream"
        );
        assert!(
            validate_frame(&wave(0, Vec::new(), vec![1, 2]), &streams).is_err(),
            "packed on a plain stream"
        );
        assert!(
            validate_frame(&wave(1, vec![0; 6], vec![1, 2]), &streams).is_err(),
            "both forms at once"
        );
        // A descriptor with an encoding this ingest does not know is refused at the Hello.
        if let Some(w) = packed_ecg.waveform.as_mut() {
            w.encoding = 7;
        }
        assert_eq!(
            validate_hello(&hello(vec![packed_ecg]), "amb-1")
                .unwrap_err()
                .code,
            CloseCode::Malformed
        );
    }

    #[test]
    fn positions_without_a_number_or_out_of_range_are_refused() {
        let ok = Location {
            latitude_deg: 48.2,
            longitude_deg: 16.4,
            altitude_m: 180.0,
            speed_mps: 12.0,
            heading_deg: 359.0,
            horizontal_accuracy_m: 4.0,
            ..Location::default()
        };
        assert!(plausible_location(&ok));
        let bad = [
            Location {
                altitude_m: f64::NAN,
                ..ok
            },
            Location {
                speed_mps: f64::INFINITY,
                ..ok
            },
            Location {
                speed_mps: -1.0,
                ..ok
            },
            Location {
                heading_deg: 361.0,
                ..ok
            },
            Location {
                heading_deg: f64::NAN,
                ..ok
            },
            Location {
                horizontal_accuracy_m: f64::NAN,
                ..ok
            },
            Location {
                latitude_deg: f64::NAN,
                ..ok
            },
        ];
        for l in bad {
            assert!(!plausible_location(&l), "{l:?}");
        }
    }
}
