//! Fuzz target bodies: one function per decoder that takes bytes from the network or a file.
//! Data flow: bytes -> decoder -> validation -> the invariants the rest of the relay relies on,
//! asserted here. The same bodies run under libFuzzer (`fuzz/libfuzzer`, nightly, coverage
//! guided) and in the normal test run as bounded property tests on stable (`tests/stable.rs`),
//! so a regression fails CI whether or not a nightly toolchain is around.
// A fuzz body reports a broken invariant by panicking: that is how libFuzzer and proptest see it.
#![allow(clippy::panic)]

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use hospital_ingest::IngestConfig;
use hospital_ingest::config::ServiceConfig;
use hospital_ingest::quic::handshake::ServerHandshake;
use hospital_ingest::quic::{MAX_SEQ, validate_frame};
use prost::Message;
use relay_proto::model::{
    ChannelInfo, Frame, StreamDescriptor, StreamKind, WaveformInfo, frame::Payload,
};
use relay_proto::wire::v1::{ControlMessage, Hello, HelloAck, control_message::Body};
use relay_wfdb::{WfdbError, parse_header, record_from_parts};
use tokio::time::Instant;
use vehicle_agent::AgentConfig;
use vehicle_agent::handshake::ClientHandshake;
use vehicle_agent::scheduler::{Action, FrameId, Scheduler};
use vehicle_agent::uplink::scheduler_config;

/// A fuzz target body: takes any bytes, panics only on a broken invariant.
pub type Target = fn(&[u8]);

/// Every target, by the name its libFuzzer binary and corpus directory carry.
pub const TARGETS: &[(&str, Target)] = &[
    ("ingest_frame", ingest_frame),
    ("ingest_hello", ingest_hello),
    ("agent_control", agent_control),
    ("wfdb_header", wfdb_header),
    ("wfdb_record", wfdb_record),
    ("waveform_codec", waveform_codec),
    ("ingest_config", ingest_config),
    ("agent_config", agent_config),
];

/// The vehicle id the certificate of the fuzzed connection names.
pub const VEHICLE: &str = "amb-1";
/// Leads of the fixture ECG stream.
pub const ECG_LEADS: usize = 3;

/// The streams the fixture session declared: a 3-lead ECG, vitals and GPS.
pub fn declared_streams() -> HashMap<u32, StreamDescriptor> {
    let ecg = StreamDescriptor {
        stream_id: 0,
        kind: StreamKind::Waveform as i32,
        name: "ecg".into(),
        waveform: Some(WaveformInfo {
            sample_rate_hz: 500.0,
            channels: (0..ECG_LEADS)
                .map(|i| ChannelInfo {
                    name: format!("L{i}"),
                    gain: 200.0,
                    ..ChannelInfo::default()
                })
                .collect(),
            source: String::new(),
            ..WaveformInfo::default()
        }),
    };
    let simple = |stream_id, kind: StreamKind, name: &str| StreamDescriptor {
        stream_id,
        kind: kind as i32,
        name: name.into(),
        waveform: None,
    };
    [
        (0, ecg),
        (1, simple(1, StreamKind::Vitals, "vitals")),
        (2, simple(2, StreamKind::Location, "gps")),
    ]
    .into_iter()
    .collect()
}

/// A frame from a vehicle's data stream: decode, validate against the session's streams, and
/// check that an accepted frame keeps what the store and subscribers rely on.
pub fn ingest_frame(data: &[u8]) {
    let Ok(frame) = Frame::decode(data) else {
        return;
    };
    let streams = declared_streams();
    if validate_frame(&frame, &streams).is_err() {
        return;
    }
    assert!(frame.seq <= MAX_SEQ, "accepted seq {}", frame.seq);
    let Some(desc) = streams.get(&frame.stream_id) else {
        panic!("accepted undeclared stream {}", frame.stream_id);
    };
    match (&frame.payload, StreamKind::try_from(desc.kind)) {
        (Some(Payload::Waveform(w)), Ok(StreamKind::Waveform)) => {
            assert!(w.sample_count > 0, "accepted an empty chunk");
            assert_eq!(w.samples.len(), w.sample_count as usize * ECG_LEADS);
        }
        (Some(Payload::Vitals(v)), Ok(StreamKind::Vitals)) => {
            assert!(v.values.iter().all(|x| x.value.is_finite()));
        }
        (Some(Payload::Location(l)), Ok(StreamKind::Location)) => {
            assert!(l.latitude_deg.abs() <= 90.0 && l.longitude_deg.abs() <= 180.0);
            let numbers = [
                l.altitude_m,
                l.speed_mps,
                l.heading_deg,
                l.horizontal_accuracy_m,
            ];
            assert!(numbers.iter().all(|x| x.is_finite()), "accepted {l:?}");
        }
        other => panic!("accepted a payload its stream does not carry: {other:?}"),
    }
    // What was accepted is stored re-encoded: it must survive the round trip unchanged.
    assert_eq!(
        Frame::decode(frame.encode_to_vec().as_slice()).ok(),
        Some(frame)
    );
}

/// The first control message of a connection, at the ingest: the Hello and its validation.
pub fn ingest_hello(data: &[u8]) {
    let hs = ServerHandshake::new(Instant::now(), Duration::from_secs(5));
    let Ok(hello) = hs.handle_message(data, VEHICLE) else {
        return;
    };
    assert_eq!(
        hello.vehicle_id, VEHICLE,
        "a Hello for another vehicle passed"
    );
    assert!(!hello.streams.is_empty() && hello.streams.len() <= 64);
    let mut ids: Vec<u32> = hello.streams.iter().map(|s| s.stream_id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(
        ids.len(),
        hello.streams.len(),
        "duplicate stream ids passed"
    );
    assert!(hello.streams.iter().all(|s| s.name.len() <= 64));
}

/// Control messages after the Hello: at the agent the reply to its Hello, clock Pongs, and
/// acknowledgements, which must release only frames that were sent on the acknowledging
/// connection; at the ingest clock Pings. A clock estimate from any of them stays within
/// the bounds of an exchange.
pub fn agent_control(data: &[u8]) {
    let now = Instant::now();
    let mut hs = ClientHandshake::new(&Hello::default(), now, Duration::from_secs(1));
    let t = 1_700_000_000_000_000_000;
    let mut filter = relay_proto::clock::ClockFilter::new();
    let check = |filter: &relay_proto::clock::ClockFilter| {
        if let Some(e) = filter.estimate() {
            let max = relay_proto::clock::MAX_ROUND_TRIP_NS as i64;
            assert!((0..=max / 2 + 1).contains(&e.uncertainty_ns), "{e:?}");
        }
    };
    if let Ok(ack) = hs.handle_message(data) {
        let (mut sync, hello) = vehicle_agent::clock::ClockSync::after_hello(
            now,
            Duration::from_secs(10),
            t,
            &ack,
            t + 1,
        );
        let _ = filter.add_exchange(&hello);
        let ping = sync.poll_ping(now, t + 2);
        assert!(ping.is_some_and(|p| p.previous.is_some()));
        check(&filter);
    }
    match ControlMessage::decode(data) {
        Ok(ControlMessage {
            body: Some(Body::Pong(pong)),
        }) => {
            let ack = HelloAck::default();
            let (mut sync, _) = vehicle_agent::clock::ClockSync::after_hello(
                now,
                Duration::from_secs(10),
                t,
                &ack,
                t,
            );
            let ping = sync.poll_ping(now, t);
            assert_eq!(ping.map(|p| p.id), Some(1));
            if let Some(exchange) = sync.on_pong(&pong, t + 5_000_000) {
                assert_eq!(exchange.t1, t, "the agent's own send time, not the echo");
                let _ = filter.add_exchange(&exchange);
            }
            check(&filter);
        }
        Ok(ControlMessage {
            body: Some(Body::Ping(ping)),
        }) => {
            let mut server = hospital_ingest::quic::clock::ServerClock::after_hello(t, t, t);
            // The first Ping after the Hello is always answered.
            let answered = server.on_ping(&ping, t + 1, t + 2);
            assert!(answered.is_some(), "the first Ping was not answered");
            if let Some((pong, exchange)) = answered {
                assert_eq!(pong.id, ping.id);
                if let Some(e) = exchange {
                    let _ = filter.add_exchange(&e);
                }
            }
            assert!(
                server.on_ping(&ping, t + 3, t + 4).is_none(),
                "a second at once is not"
            );
            check(&filter);
        }
        _ => {}
    }

    let Ok(ControlMessage {
        body: Some(Body::Ack(ack)),
    }) = ControlMessage::decode(data)
    else {
        return;
    };
    let mut sched = Scheduler::new(
        scheduler_config(&AgentConfig::default()),
        vec![None, None],
        now,
    );
    sched.on_connected(0, 1, now);
    let kind = StreamKind::Waveform as i32;
    for seq in 0..64 {
        let id = FrameId { stream_id: 0, seq };
        sched.insert(id, kind, Bytes::from_static(b"frame"), now);
    }
    let mut sent = Vec::new();
    for action in sched.poll(now) {
        if let Action::Transmit(t) = action {
            sent.push((t.id, t.bearer));
        }
    }
    let before = sched.len();
    let ranges: Vec<(u32, u64, u64)> = ack
        .streams
        .iter()
        .flat_map(|s| s.ranges.iter().map(|r| (s.stream_id, r.start, r.end)))
        .collect();
    let acked = sched.on_ack(0, &ranges, now + Duration::from_millis(50));
    for (id, _, _) in &acked.released {
        assert!(
            sent.contains(&(*id, 0)),
            "released {id:?}, never sent on bearer 0"
        );
    }
    assert_eq!(sched.len(), before - acked.released.len());
}

/// A WFDB header (`.hea`) as text.
pub fn wfdb_header(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = parse_header(&text, Path::new("fuzz.hea"));
}

/// A whole WFDB record: the header text up to the first NUL byte, then the bytes every signal
/// file it names holds. An accepted record holds exactly what its shape claims.
pub fn wfdb_record(data: &[u8]) {
    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let text = String::from_utf8_lossy(&data[..split]);
    let body = data.get(split + 1..).unwrap_or_default();
    let read = |_: &str| Ok::<_, WfdbError>(body.to_vec());
    let Ok(record) = record_from_parts(&text, Path::new("fuzz.hea"), read) else {
        return;
    };
    assert!(record.num_signals() > 0);
    assert_eq!(record.samples.len(), record.frames * record.frame_width());
    for s in 0..record.num_signals() {
        assert_eq!(record.signal(s).count(), record.signal_len(s));
    }
}

/// A packed waveform chunk as the ingest unpacks it: the first byte picks the channel count
/// (1..=16), the next two the samples per channel (0..=1023), the rest is the codec's data. A
/// chunk that decodes holds exactly the samples asked for, and encoding them again decodes to
/// the same samples.
pub fn waveform_codec(data: &[u8]) {
    let [c, n0, n1, packed @ ..] = data else {
        return;
    };
    let channels = usize::from(c % 16) + 1;
    let count = usize::from(u16::from_le_bytes([*n0, *n1]) % 1024);
    let centers: Vec<i32> = (0..channels as i32).map(|i| i * 100 - 300).collect();
    let mut samples = Vec::new();
    if relay_codec::decode(packed, &centers, count, &mut samples).is_err() {
        return;
    }
    assert_eq!(samples.len(), channels * count);
    let Ok(mut encoder) = relay_codec::Encoder::new(&centers) else {
        panic!("{channels} channels refused by the encoder");
    };
    let mut again = Vec::new();
    if let Err(e) = encoder.encode(&samples, &mut again) {
        panic!("decoded samples do not encode: {e}");
    }
    let mut back = Vec::new();
    if let Err(e) = relay_codec::decode(&again, &centers, count, &mut back) {
        panic!("re-encoded samples do not decode: {e}");
    }
    assert_eq!(back, samples);
}

/// The ingest's configuration file.
pub fn ingest_config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(cfg) = IngestConfig::from_toml(&text, Path::new("fuzz.toml")) {
        let _ = cfg.validate();
    }
}

/// The agent's configuration file.
pub fn agent_config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(cfg) = AgentConfig::from_toml(&text, Path::new("fuzz.toml")) {
        let _ = cfg.validate();
    }
}

/// Well-formed inputs for a target, the starting point of both the libFuzzer corpus
/// (`examples/seed-corpus.rs`) and the stable mutation runs.
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    use relay_proto::model::{Location, VitalSign, VitalsReport, WaveformChunk};
    use relay_proto::wire::v1::{Ack, Ping, Pong, PongReceived, SeqRange, StreamAck};
    let frame = |stream_id, seq, payload| {
        Frame {
            stream_id,
            seq,
            capture_time_ns: 1_700_000_000_000_000_000,
            payload: Some(payload),
        }
        .encode_to_vec()
    };
    let control = |body| ControlMessage { body: Some(body) }.encode_to_vec();
    match target {
        "ingest_frame" => vec![
            frame(
                0,
                7,
                Payload::Waveform(WaveformChunk {
                    first_sample_index: 70,
                    sample_count: 10,
                    samples: (0..10 * ECG_LEADS as i32).collect(),
                    ..Default::default()
                }),
            ),
            frame(
                1,
                3,
                Payload::Vitals(VitalsReport {
                    values: vec![VitalSign {
                        mdc_code: 147_842,
                        value: 72.0,
                        ..VitalSign::default()
                    }],
                }),
            ),
            frame(
                2,
                1,
                Payload::Location(Location {
                    latitude_deg: 48.2,
                    longitude_deg: 16.37,
                    ..Location::default()
                }),
            ),
        ],
        "ingest_hello" => vec![control(Body::Hello(Hello {
            protocol_version: relay_proto::PROTOCOL_VERSION,
            vehicle_id: VEHICLE.into(),
            session_id: 42,
            streams: declared_streams().into_values().collect(),
            agent_version: "fuzz".into(),
            agent_time_ns: 1_700_000_000_000_000_000,
        }))],
        "agent_control" => vec![
            control(Body::HelloAck(HelloAck {
                protocol_version: relay_proto::PROTOCOL_VERSION,
                ingest_time_ns: 1_700_000_000_000_000_000,
                hello_received_ns: 1_699_999_999_999_000_000,
                ..Default::default()
            })),
            control(Body::Pong(Pong {
                id: 1,
                agent_send_ns: 1_700_000_000_000_000_000,
                ingest_receive_ns: 1_700_000_000_010_000_000,
                ingest_send_ns: 1_700_000_000_011_000_000,
            })),
            control(Body::Ping(Ping {
                id: 1,
                agent_send_ns: 1_700_000_000_000_000_000,
                previous: Some(PongReceived {
                    id: 0,
                    agent_receive_ns: 1_700_000_000_020_000_000,
                }),
            })),
            control(Body::Ack(Ack {
                streams: vec![StreamAck {
                    stream_id: 0,
                    ranges: vec![
                        SeqRange { start: 0, end: 8 },
                        SeqRange { start: 9, end: 12 },
                    ],
                }],
            })),
        ],
        "wfdb_header" => vec![
            include_bytes!("../../data/ecg/100.hea").to_vec(),
            include_bytes!("../../data/ecg/s0010_re.hea").to_vec(),
        ],
        "wfdb_record" => vec![
            b"r 2 360 4\nr.dat 212 200 11 1024 995 0 0 MLII\nr.dat 212 200 11 1024 1011 0 0 V5\n\0\
              \x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c"
                .to_vec(),
            b"s 3 1000 2\ns.dat 16 2000 16 0 0 0 0 i\ns.dat 16 2000 16 0 0 0 0 ii\n\
              s.dat 16 2000 16 0 0 0 0 iii\n\0\x01\x00\x02\x00\x03\x00\xff\xff\xfe\xff\xfd\xff"
                .to_vec(),
        ],
        "waveform_codec" => {
            // Three channels of 20 samples (a ramp, a sine-like wave, their difference), and
            // a flat channel of 40.
            let wave: Vec<i32> = (0..20)
                .flat_map(|t: i32| {
                    let a = t * 13 - 100;
                    let b = [0, 3, 5, 6, 5, 3, 0, -3, -5, -6][(t % 10) as usize] * 40;
                    [a, b, b - a]
                })
                .collect();
            let mut out = Vec::new();
            for (channels, samples) in [(3usize, wave), (1, vec![-300; 40])] {
                let centers: Vec<i32> = (0..channels as i32).map(|i| i * 100 - 300).collect();
                let count = (samples.len() / channels) as u16;
                let mut seed = vec![(channels - 1) as u8];
                seed.extend(count.to_le_bytes());
                if let Ok(mut e) = relay_codec::Encoder::new(&centers)
                    && e.encode(&samples, &mut seed).is_ok()
                {
                    out.push(seed);
                }
            }
            out
        }
        "ingest_config" => {
            vec![include_bytes!("../../deploy/config/hospital-ingest.toml").to_vec()]
        }
        "agent_config" => vec![include_bytes!("../../deploy/config/vehicle-agent.toml").to_vec()],
        _ => Vec::new(),
    }
}
