//! Structured property tests of the ingest's decoders: honest frames are accepted, mutated
//! ones never panic, an accepted frame or Hello keeps the invariants the rest of the ingest
//! relies on, configuration text in TOML's alphabet never panics. Arbitrary bytes through
//! every decoder are the fuzz targets' job (`stable.rs`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use hospital_ingest::IngestConfig;
use hospital_ingest::config::ServiceConfig;
use hospital_ingest::quic::handshake::ServerHandshake;
use hospital_ingest::quic::{MAX_SEQ, validate_frame};
use proptest::prelude::*;
use prost::Message;
use relay_proto::model::{
    ChannelInfo, Frame, Location, StreamDescriptor, StreamKind, VitalSign, VitalsReport,
    WaveformChunk, WaveformInfo, frame::Payload,
};
use relay_proto::wire::v1::{ControlMessage, Hello, control_message::Body};
use tokio::time::Instant;

fn declared() -> HashMap<u32, StreamDescriptor> {
    relay_fuzz::declared_streams()
}

fn payload() -> impl Strategy<Value = Option<Payload>> {
    prop_oneof![
        Just(None),
        (
            any::<u64>(),
            0u32..5000,
            prop::collection::vec(any::<i32>(), 0..64)
        )
            .prop_map(|(first_sample_index, sample_count, samples)| Some(
                Payload::Waveform(WaveformChunk {
                    first_sample_index,
                    sample_count,
                    samples,
                    ..Default::default()
                })
            )),
        prop::collection::vec((any::<u32>(), any::<f64>()), 0..8).prop_map(|v| Some(
            Payload::Vitals(VitalsReport {
                values: v
                    .into_iter()
                    .map(|(mdc_code, value)| VitalSign {
                        mdc_code,
                        value,
                        ..VitalSign::default()
                    })
                    .collect(),
            })
        )),
        (any::<f64>(), any::<f64>()).prop_map(|(latitude_deg, longitude_deg)| Some(
            Payload::Location(Location {
                latitude_deg,
                longitude_deg,
                ..Location::default()
            })
        )),
    ]
}

fn frame() -> impl Strategy<Value = Frame> {
    (0u32..4, any::<u64>(), any::<i64>(), payload()).prop_map(
        |(stream_id, seq, capture_time_ns, payload)| Frame {
            stream_id,
            seq,
            capture_time_ns,
            payload,
        },
    )
}

/// Frames a correct agent sends on the declared streams.
fn honest_frame() -> impl Strategy<Value = Frame> {
    (0u64..1_000_000, 1u32..50, any::<i32>(), 0u32..3).prop_map(|(seq, count, v, stream)| {
        let payload = match stream {
            0 => Payload::Waveform(WaveformChunk {
                first_sample_index: seq * u64::from(count),
                sample_count: count,
                samples: vec![v; count as usize * 3],
                ..Default::default()
            }),
            1 => Payload::Vitals(VitalsReport {
                values: vec![VitalSign {
                    mdc_code: 147_842,
                    value: f64::from(v % 300),
                    ..VitalSign::default()
                }],
            }),
            _ => Payload::Location(Location {
                latitude_deg: f64::from(v % 90),
                longitude_deg: f64::from(v % 180),
                ..Location::default()
            }),
        };
        Frame {
            stream_id: stream,
            seq,
            capture_time_ns: i64::from(v),
            payload: Some(payload),
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn honest_frames_are_accepted(frame in honest_frame()) {
        prop_assert!(validate_frame(&frame, &declared()).is_ok(), "{:?}", frame);
    }

    #[test]
    fn a_mutated_honest_frame_never_panics_validation(
        frame in honest_frame(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut bytes = frame.encode_to_vec();
        for (at, v) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= v;
        }
        if let Ok(f) = Frame::decode(bytes.as_slice()) {
            let _ = validate_frame(&f, &declared());
        }
    }

    #[test]
    fn an_accepted_frame_keeps_the_invariants_the_store_relies_on(frame in frame()) {
        let streams = declared();
        if validate_frame(&frame, &streams).is_ok() {
            prop_assert!(frame.seq <= MAX_SEQ);
            let desc = &streams[&frame.stream_id];
            match (&frame.payload, StreamKind::try_from(desc.kind).unwrap()) {
                (Some(Payload::Waveform(w)), StreamKind::Waveform) => {
                    prop_assert!(w.sample_count > 0);
                    prop_assert_eq!(w.samples.len(), w.sample_count as usize * 3);
                }
                (Some(Payload::Vitals(v)), StreamKind::Vitals) => {
                    prop_assert!(v.values.iter().all(|x| x.value.is_finite()));
                }
                (Some(Payload::Location(l)), StreamKind::Location) => {
                    prop_assert!(l.latitude_deg.abs() <= 90.0 && l.longitude_deg.abs() <= 180.0);
                }
                other => prop_assert!(false, "accepted {other:?}"),
            }
            // What was accepted survives a round trip unchanged.
            let back = Frame::decode(frame.encode_to_vec().as_slice()).unwrap();
            prop_assert_eq!(back, frame);
        }
    }

    #[test]
    fn an_accepted_hello_names_the_certificate_and_stays_in_bounds(
        claimed in prop_oneof![Just("amb-1".to_string()), "[a-z0-9-]{0,8}"],
        ids in prop::collection::vec(0u32..100, 0..80),
        kind in 0i32..6,
        rate in any::<f64>(),
        gain in any::<f64>(),
        name in ".{0,80}",
    ) {
        let streams = ids.iter().map(|&stream_id| StreamDescriptor {
            stream_id,
            kind,
            name: name.clone(),
            waveform: Some(WaveformInfo {
                sample_rate_hz: rate,
                channels: vec![ChannelInfo { gain, ..ChannelInfo::default() }],
                source: String::new(),
                ..WaveformInfo::default()
            }),
        }).collect();
        let hello = Hello {
            protocol_version: relay_proto::PROTOCOL_VERSION,
            vehicle_id: claimed.clone(),
            session_id: 1,
            streams,
            agent_version: String::new(),
            agent_time_ns: 0,
        };
        let bytes = ControlMessage { body: Some(Body::Hello(hello)) }.encode_to_vec();
        let hs = ServerHandshake::new(Instant::now(), Duration::from_secs(5));
        if let Ok(h) = hs.handle_message(&bytes, "amb-1") {
            prop_assert_eq!(h.vehicle_id, "amb-1");
            prop_assert!(!h.streams.is_empty() && h.streams.len() <= 64);
            let unique: std::collections::HashSet<u32> = h.streams.iter().map(|s| s.stream_id).collect();
            prop_assert_eq!(unique.len(), h.streams.len());
            prop_assert!(h.streams.iter().all(|s| s.name.len() <= 64));
        }
    }

    #[test]
    fn arbitrary_configuration_text_never_panics(text in "[\\[\\]a-z_.=\"0-9 \\n#:-]{0,300}") {
        if let Ok(cfg) = IngestConfig::from_toml(&text, Path::new("fuzz.toml")) {
            let _ = cfg.validate();
        }
    }
}
