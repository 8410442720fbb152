//! Identity comes from certificates; bad input closes only the offending connection.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use hospital_ingest::Ingest;
use prost::Message;
use relay_e2e::*;
use relay_proto::CloseCode;
use relay_proto::model::{
    Frame, ListVehiclesRequest, StreamDescriptor, StreamKind, SubscribeRequest, SubscribeResponse,
    VitalSign, VitalsReport, frame::Payload, subscribe_request::Start,
};
use relay_proto::wire::v1::{ControlMessage, Hello, control_message::Body};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use vehicle_agent::Agent;
use vehicle_agent::config::{IngestEndpoint, TlsFiles};

async fn raw_connect(
    cert_dir: &Path,
    trust_dir: &Path,
    vehicle: &str,
    ingest: SocketAddr,
) -> Result<quinn::Connection, String> {
    raw_connect_from([127, 0, 0, 1], cert_dir, trust_dir, vehicle, ingest).await
}

/// As [`raw_connect`], from loopback address `from`.
async fn raw_connect_from(
    from: [u8; 4],
    cert_dir: &Path,
    trust_dir: &Path,
    vehicle: &str,
    ingest: SocketAddr,
) -> Result<quinn::Connection, String> {
    let files = TlsFiles {
        ca_cert: trust_dir.join("hospital-ca.pem"),
        cert: cert_dir.join(format!("{vehicle}.pem")),
        key: cert_dir.join(format!("{vehicle}.key")),
    };
    let client = vehicle_agent::tls::client_config(
        &files,
        &IngestEndpoint::default(),
        Duration::from_millis(250),
    )
    .unwrap();
    let ep = quinn::Endpoint::client(SocketAddr::from((from, 0))).unwrap();
    let conn = ep
        .connect_with(client, ingest, "localhost")
        .unwrap()
        .await
        .map_err(|e| e.to_string())?;
    Ok(conn)
}

fn vitals(stream_id: u32, name: &str) -> StreamDescriptor {
    StreamDescriptor {
        stream_id,
        kind: StreamKind::Vitals as i32,
        name: name.into(),
        waveform: None,
    }
}

/// Sends a Hello declaring one vitals stream (id 0) in session 42 and waits for the HelloAck.
async fn hello(conn: &quinn::Connection, claimed: &str) -> Result<(), quinn::ConnectionError> {
    hello_declaring(conn, claimed, vec![vitals(0, "vitals")]).await
}

/// Sends a Hello for session 42 declaring `streams` and waits for the HelloAck.
async fn hello_declaring(
    conn: &quinn::Connection,
    claimed: &str,
    streams: Vec<StreamDescriptor>,
) -> Result<(), quinn::ConnectionError> {
    hello_session(conn, claimed, 42, streams).await
}

/// Sends a Hello for `session` declaring `streams` and waits for the HelloAck.
async fn hello_session(
    conn: &quinn::Connection,
    claimed: &str,
    session_id: u64,
    streams: Vec<StreamDescriptor>,
) -> Result<(), quinn::ConnectionError> {
    hello_padded(conn, claimed, session_id, streams, 0).await
}

/// As [`hello_session`], with `padding` bytes of a field the ingest does not know appended to
/// the control message (still a valid Hello: protobuf skips unknown fields).
async fn hello_padded(
    conn: &quinn::Connection,
    claimed: &str,
    session_id: u64,
    streams: Vec<StreamDescriptor>,
    padding: usize,
) -> Result<(), quinn::ConnectionError> {
    let (send, recv) = conn.open_bi().await?;
    let mut w = FramedWrite::new(send, LengthDelimitedCodec::new());
    let mut r = FramedRead::new(recv, LengthDelimitedCodec::new());
    let hello = Hello {
        protocol_version: relay_proto::PROTOCOL_VERSION,
        vehicle_id: claimed.into(),
        session_id,
        streams,
        agent_version: "test".into(),
        agent_time_ns: relay_ops::now_utc_ns(),
    };
    let mut msg = ControlMessage {
        body: Some(Body::Hello(hello)),
    }
    .encode_to_vec();
    if padding > 0 {
        // Field 15, length-delimited.
        prost::encoding::encode_key(15, prost::encoding::WireType::LengthDelimited, &mut msg);
        prost::encoding::encode_varint(padding as u64, &mut msg);
        msg.resize(msg.len() + padding, 0xa5);
    }
    if w.send(Bytes::from(msg)).await.is_err() {
        return Err(conn.closed().await);
    }
    tokio::select! {
        m = r.next() => match m {
            Some(Ok(b)) => match ControlMessage::decode(b.freeze()).unwrap().body {
                Some(Body::HelloAck(_)) => {
                    // Keep the control stream open for the rest of the test.
                    std::mem::forget((w, r));
                    Ok(())
                }
                other => panic!("unexpected {other:?}"),
            },
            _ => Err(conn.closed().await),
        },
        e = conn.closed() => Err(e),
    }
}

fn close_code(e: &quinn::ConnectionError) -> Option<CloseCode> {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => {
            CloseCode::from_u64(c.error_code.into_inner())
        }
        _ => None,
    }
}

async fn send_raw_frame(conn: &quinn::Connection, bytes: &[u8]) {
    if let Ok(mut s) = conn.open_uni().await {
        let _ = s.write_all(bytes).await;
        let _ = s.finish();
    }
}

async fn closed_within(conn: &quinn::Connection) -> quinn::ConnectionError {
    tokio::time::timeout(Duration::from_secs(20), conn.closed())
        .await
        .expect("connection should be closed by the ingest")
}

/// A frame of `stream` with `seq`, captured at `at_ns`.
fn frame_at(stream_id: u32, seq: u64, at_ns: i64, payload: Payload) -> Vec<u8> {
    Frame {
        stream_id,
        seq,
        capture_time_ns: at_ns,
        payload: Some(payload),
    }
    .encode_to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_detector_reason_is_raised_by_a_vehicle_that_misbehaves_and_not_by_an_honest_one() {
    use relay_proto::model::{ChannelInfo, Location, WaveformChunk, WaveformInfo};
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let ingest = Ingest::start(ingest_config(&pki, &work.path().join("s.redb")))
        .await
        .unwrap();
    let honest = Agent::start(agent_config(
        pki.path(),
        "amb-2",
        ingest.quic_addr,
        vitals_and_gps(),
    ))
    .await
    .unwrap();
    let connect =
        |from: [u8; 4]| raw_connect_from(from, pki.path(), pki.path(), "amb-1", ingest.quic_addr);
    let gps = StreamDescriptor {
        stream_id: 1,
        kind: StreamKind::Location as i32,
        name: "gps".into(),
        waveform: None,
    };
    let ecg = StreamDescriptor {
        stream_id: 2,
        kind: StreamKind::Waveform as i32,
        name: "ecg".into(),
        waveform: Some(WaveformInfo {
            sample_rate_hz: 500.0,
            channels: vec![ChannelInfo {
                name: "II".into(),
                gain: 200.0,
                ..ChannelInfo::default()
            }],
            ..WaveformInfo::default()
        }),
    };
    let conn = connect([127, 0, 0, 1]).await.unwrap();
    let streams = vec![vitals(0, "vitals"), gps, ecg];
    hello_session(&conn, "amb-1", 42, streams).await.unwrap();
    let now = hospital_ingest::now_utc_ns();
    let s = 1_000_000_000i64;
    let vital = || {
        Payload::Vitals(VitalsReport {
            values: vec![VitalSign {
                mdc_code: 147_842,
                value: 80.0,
                ..VitalSign::default()
            }],
        })
    };
    let fix = |lat: f64| {
        Payload::Location(Location {
            latitude_deg: lat,
            longitude_deg: 16.37,
            ..Location::default()
        })
    };
    let chunk = |index: u64, count: u32| {
        Payload::Waveform(WaveformChunk {
            first_sample_index: index,
            sample_count: count,
            samples: vec![0; count as usize],
            ..Default::default()
        })
    };
    for bytes in [
        // A minute ahead of the ingest's clock, then two days old.
        frame_at(0, 0, now + 60 * s, vital()),
        frame_at(0, 1, now - 48 * 3600 * s, vital()),
        // 11 km in 10 s, and 10,000 frames in those 10 s.
        frame_at(1, 0, now, fix(48.2)),
        frame_at(1, 10_000, now + 10 * s, fix(48.3)),
        // 5,000 samples in 40 ms at a declared 500 Hz.
        frame_at(2, 0, now, chunk(0, 20)),
        frame_at(2, 1, now + s / 25, chunk(5_000, 20)),
    ] {
        send_raw_frame(&conn, &bytes).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Eleven new sessions within a minute.
    for session in 100..111 {
        let c = connect([127, 0, 0, 1]).await.unwrap();
        hello_session(&c, "amb-1", session, vec![vitals(0, "vitals")])
            .await
            .unwrap();
        c.close(quinn::VarInt::from_u32(0), b"next");
    }
    // Five source addresses at once for a vehicle with four bearers at most.
    let mut held = Vec::new();
    for last in 2..7u8 {
        let c = connect([127, 0, 0, last]).await.unwrap();
        hello(&c, "amb-1").await.unwrap();
        held.push(c);
    }

    let reasons = [
        "timestamp_future",
        "timestamp_past",
        "impossible_movement",
        "seq_jump",
        "rate_exceeded",
        "session_storm",
        "too_many_addresses",
    ];
    let audit_dir = work.path().join("audit");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let records = loop {
        let records = hospital_ingest::audit::query(
            &hospital_ingest::audit::files_in(&audit_dir).unwrap(),
            None,
            0,
        )
        .unwrap();
        let seen: Vec<&str> = reasons
            .iter()
            .copied()
            .filter(|r| {
                records.iter().any(|rec| {
                    rec.event.action == "security_event"
                        && rec.event.vehicles == ["amb-1"]
                        && rec.event.detail["reason"] == *r
                })
            })
            .collect();
        if seen.len() == reasons.len() {
            break records;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "audited so far: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (_, body) = http_get(ingest.metrics_addr.unwrap(), "/metrics").await;
    for reason in reasons {
        let n = labelled_metric(
            &body,
            "relay_ingest_security_events_total",
            &format!("reason=\"{reason}\""),
        );
        assert!(n.is_some_and(|n| n >= 1.0), "{reason}: {body}");
    }
    // The honest vehicle, streaming the whole time, raised nothing.
    assert!(
        !records
            .iter()
            .any(|r| r.event.action == "security_event" && r.event.vehicles == ["amb-2"]),
        "{records:#?}"
    );
    drop(held);
    honest.shutdown().await.unwrap();
    ingest.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_ca_and_identity_claims_are_refused() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let ingest = Ingest::start(ingest_config(&pki, &work.path().join("s.redb")))
        .await
        .unwrap();

    // A certificate for "amb-1" from another CA never gets a session.
    match raw_connect(pki.rogue.path(), pki.path(), "amb-1", ingest.quic_addr).await {
        Err(_) => {}
        Ok(conn) => {
            let r = hello(&conn, "amb-1").await;
            assert!(r.is_err(), "a foreign-CA certificate got a session");
            assert!(
                close_code(&r.unwrap_err()).is_none(),
                "refused by TLS, not by the application"
            );
        }
    }

    // A genuine amb-1 certificate that claims to be amb-2 is closed with identity_mismatch.
    let conn = raw_connect(pki.path(), pki.path(), "amb-1", ingest.quic_addr)
        .await
        .unwrap();
    let err = hello(&conn, "amb-2").await.unwrap_err();
    assert_eq!(close_code(&err), Some(CloseCode::IdentityMismatch), "{err}");

    // The same for the full agent: it never gets to stream as amb-2.
    let mut cfg = agent_config(pki.path(), "amb-2", ingest.quic_addr, vitals_and_gps());
    cfg.tls.cert = pki.path().join("amb-1.pem");
    cfg.tls.key = pki.path().join("amb-1.key");
    let impostor = Agent::start(cfg).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut client = ed_client::client::connect(
        &format!("https://{}", ingest.grpc_addr),
        &pki.subscriber("ed-console"),
    )
    .await
    .unwrap();
    let list = client
        .list_vehicles(relay_proto::model::ListVehiclesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        list.vehicles.iter().all(|v| v.vehicle_id != "amb-2"),
        "{list:?}"
    );
    impostor.shutdown().await.unwrap();

    let (_, body) = http_get(ingest.metrics_addr.unwrap(), "/metrics").await;
    assert!(
        labelled_metric(
            &body,
            "relay_ingest_handshake_failures_total",
            "reason=\"unknown_ca\""
        )
        .is_some_and(|n| n >= 1.0),
        "{body}"
    );
    assert!(
        body.contains("relay_ingest_security_events_total{reason=\"identity_mismatch\"}"),
        "{body}"
    );
    ingest.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_frames_close_only_that_connection() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let ingest = Ingest::start(ingest_config(&pki, &work.path().join("s.redb")))
        .await
        .unwrap();
    let url = format!("https://{}", ingest.grpc_addr);
    let tls = pki.subscriber("ed-console");

    // A well-behaved vehicle streams throughout.
    let good = Agent::start(agent_config(
        pki.path(),
        "amb-1",
        ingest.quic_addr,
        vitals_and_gps(),
    ))
    .await
    .unwrap();
    let before = collect_until(
        || url.clone(),
        &tls,
        &work.path().join("a"),
        Duration::from_secs(60),
        |c| c.data_records >= 5,
    )
    .await;

    // Garbage on a frame stream.
    let bad = raw_connect(pki.path(), pki.path(), "amb-3", ingest.quic_addr)
        .await
        .unwrap();
    hello(&bad, "amb-3").await.unwrap();
    send_raw_frame(&bad, b"\xff\xff\xff\xff not a protobuf frame").await;
    assert_eq!(
        close_code(&closed_within(&bad).await),
        Some(CloseCode::Malformed)
    );

    // A well-formed frame for a stream that was never declared.
    let bad = raw_connect(pki.path(), pki.path(), "amb-3", ingest.quic_addr)
        .await
        .unwrap();
    hello(&bad, "amb-3").await.unwrap();
    let undeclared = Frame {
        stream_id: 9,
        seq: 0,
        capture_time_ns: 0,
        payload: Some(Payload::Vitals(VitalsReport {
            values: vec![VitalSign {
                mdc_code: 147_842,
                label: "HR".into(),
                value: 80.0,
                unit: "/min".into(),
            }],
        })),
    };
    send_raw_frame(&bad, &undeclared.encode_to_vec()).await;
    assert_eq!(
        close_code(&closed_within(&bad).await),
        Some(CloseCode::Malformed)
    );

    // A frame larger than the bound.
    let big = raw_connect(pki.path(), pki.path(), "amb-4", ingest.quic_addr)
        .await
        .unwrap();
    hello(&big, "amb-4").await.unwrap();
    send_raw_frame(&big, &vec![0u8; relay_proto::DEFAULT_MAX_FRAME_BYTES + 1]).await;
    assert_eq!(
        close_code(&closed_within(&big).await),
        Some(CloseCode::FrameTooLarge)
    );

    // The good vehicle kept streaming: new frames arrive after all of that.
    let seen = before.data_records;
    let after = collect_until(
        || url.clone(),
        &tls,
        &work.path().join("b"),
        Duration::from_secs(60),
        |c| c.data_records >= seen + 10,
    )
    .await;
    assert_eq!(
        after.vehicles.iter().collect::<Vec<_>>(),
        vec!["amb-1"],
        "nothing from the bad connections was stored"
    );
    assert_eq!(after.duplicates, 0);

    let (_, body) = http_get(ingest.metrics_addr.unwrap(), "/metrics").await;
    assert!(
        body.contains("relay_ingest_protocol_errors_total{reason=\"malformed\"} 2"),
        "{body}"
    );
    assert!(
        body.contains("relay_ingest_protocol_errors_total{reason=\"frame_too_large\"} 1"),
        "{body}"
    );
    good.shutdown().await.unwrap();
    ingest.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_cannot_be_redeclared_with_other_descriptors() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let ingest = Ingest::start(ingest_config(&pki, &work.path().join("s.redb")))
        .await
        .unwrap();
    let connect = || raw_connect(pki.path(), pki.path(), "amb-1", ingest.quic_addr);
    let first = connect().await.unwrap();
    hello(&first, "amb-1").await.unwrap();
    // The same declaration again (a second bearer, an agent restart): accepted.
    let same = connect().await.unwrap();
    hello(&same, "amb-1").await.unwrap();
    // Another descriptor for a stored stream, or a stream the session never declared.
    for streams in [
        vec![vitals(0, "renamed")],
        vec![vitals(0, "vitals"), vitals(1, "extra")],
    ] {
        let other = connect().await.unwrap();
        let err = hello_declaring(&other, "amb-1", streams).await.unwrap_err();
        assert_eq!(close_code(&err), Some(CloseCode::SessionMismatch), "{err}");
    }
    assert!(
        first.close_reason().is_none(),
        "the honest connections stay"
    );
    let (_, body) = http_get(ingest.metrics_addr.unwrap(), "/metrics").await;
    let events = labelled_metric(
        &body,
        "relay_ingest_security_events_total",
        "reason=\"session_mismatch\"",
    );
    assert_eq!(events, Some(2.0), "{body}");
    // What subscribers read the stored data with is the first declaration.
    let url = format!("https://{}", ingest.grpc_addr);
    let mut client = ed_client::client::connect(&url, &pki.subscriber("ed-console"))
        .await
        .unwrap();
    let list = client
        .list_vehicles(relay_proto::model::ListVehiclesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let names: Vec<String> = list.vehicles[0]
        .streams
        .iter()
        .filter_map(|s| s.descriptor.as_ref().map(|d| d.name.clone()))
        .collect();
    assert_eq!(names, vec!["vitals".to_string()]);
    ingest.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_development_pki_is_refused_without_allow_dev_pki() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let mut cfg = ingest_config(&pki, &work.path().join("s.redb"));
    cfg.allow_dev_pki = false;
    let err = Ingest::start(cfg).await.unwrap_err();
    assert!(format!("{err:#}").contains("--allow-dev-pki"), "{err:#}");
    let mut agent = agent_config(
        pki.path(),
        "amb-1",
        "127.0.0.1:9".parse().unwrap(),
        vitals_and_gps(),
    );
    agent.allow_dev_pki = false;
    let err = Agent::start(agent).await.unwrap_err();
    assert!(format!("{err:#}").contains("development PKI"), "{err:#}");
    // The binaries: the shipped configuration pointed at a development PKI.
    let config = work.path().join("ingest.toml");
    let mut shipped = hospital_ingest::IngestConfig {
        tls: hospital_ingest::config::Tls::from_dev_dir(pki.path()),
        ..hospital_ingest::IngestConfig::default()
    };
    shipped.store.path = work.path().join("t.redb");
    shipped.quic.listen = "127.0.0.1:0".parse().unwrap();
    shipped.grpc.listen = "127.0.0.1:0".parse().unwrap();
    std::fs::write(&config, shipped.to_toml().unwrap()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_e2e-hospital-ingest"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--allow-dev-pki"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_stream_that_never_finishes_is_stopped_and_counted() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let mut cfg = ingest_config(&pki, &work.path().join("s.redb"));
    cfg.quic.frame_read_timeout = Duration::from_secs(1);
    let ingest = Ingest::start(cfg).await.unwrap();
    let conn = raw_connect(pki.path(), pki.path(), "amb-1", ingest.quic_addr)
        .await
        .unwrap();
    hello(&conn, "amb-1").await.unwrap();
    // Half a frame, then nothing: no FIN.
    let mut stalled = conn.open_uni().await.unwrap();
    stalled.write_all(&[0x08, 0x00, 0x10]).await.unwrap();
    let stopped = tokio::time::timeout(Duration::from_secs(10), stalled.stopped())
        .await
        .expect("the ingest stops the stalled stream")
        .unwrap();
    assert_eq!(stopped, Some(quinn::VarInt::from_u32(1)));
    assert!(
        conn.close_reason().is_none(),
        "only the stream, not the vehicle"
    );
    let (_, body) = http_get(ingest.metrics_addr.unwrap(), "/metrics").await;
    assert_eq!(
        labelled_metric(
            &body,
            "relay_ingest_streams_stopped_total",
            "reason=\"deadline\""
        ),
        Some(1.0),
        "{body}"
    );
    ingest.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vehicle_over_its_connection_or_session_quota_is_refused() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let mut cfg = ingest_config(&pki, &work.path().join("s.redb"));
    cfg.quic.max_connections_per_vehicle = 2;
    cfg.quic.max_new_sessions_per_hour = 3;
    let ingest = Ingest::start(cfg).await.unwrap();
    let connect = |v: &'static str| raw_connect(pki.path(), pki.path(), v, ingest.quic_addr);
    // Two bearers of session 42 at once: accepted; a third connection: refused.
    let a = connect("amb-1").await.unwrap();
    hello(&a, "amb-1").await.unwrap();
    let b = connect("amb-1").await.unwrap();
    hello(&b, "amb-1").await.unwrap();
    let c = connect("amb-1").await.unwrap();
    let err = hello(&c, "amb-1").await.unwrap_err();
    assert_eq!(close_code(&err), Some(CloseCode::QuotaExceeded), "{err}");
    // Another vehicle is not affected.
    let other = connect("amb-2").await.unwrap();
    hello(&other, "amb-2").await.unwrap();
    // Connections that end free their slots; sessions 43 and 44 are the second and third new
    // sessions of the hour, 45 is one too many.
    a.close(quinn::VarInt::from_u32(0), b"done");
    b.close(quinn::VarInt::from_u32(0), b"done");
    let mut outcomes = Vec::new();
    for session in [43, 44, 45] {
        let outcome = loop {
            let conn = connect("amb-1").await.unwrap();
            let r = hello_session(&conn, "amb-1", session, vec![vitals(0, "vitals")]).await;
            match r {
                Err(e)
                    if close_code(&e) == Some(CloseCode::QuotaExceeded)
                        && e.to_string().contains("connections") =>
                {
                    // The ingest has not seen the closes yet.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                r => {
                    conn.close(quinn::VarInt::from_u32(0), b"done");
                    break r;
                }
            }
        };
        outcomes.push(outcome.map_err(|e| (close_code(&e), e.to_string())));
    }
    assert!(outcomes[0].is_ok() && outcomes[1].is_ok(), "{outcomes:?}");
    let refused = outcomes[2].clone().unwrap_err();
    assert_eq!(refused.0, Some(CloseCode::QuotaExceeded));
    assert!(refused.1.contains("sessions"), "{}", refused.1);
    let (_, body) = http_get(ingest.metrics_addr.unwrap(), "/metrics").await;
    let counted = labelled_metric(
        &body,
        "relay_ingest_protocol_errors_total",
        "reason=\"quota_exceeded\"",
    );
    assert!(counted.is_some_and(|n| n >= 2.0), "{body}");
    ingest.shutdown().await.unwrap();
}

/// amb-1 opens `attempts` new sessions, each on a connection of its own with a Hello padded
/// to about 1 MiB, eight at a time, against the ingest as its own process while amb-2
/// streams: only its hourly quota of sessions is accepted, the rest are refused and counted,
/// the ingest's memory stays flat, and amb-2's stored data are complete.
async fn session_storm(attempts: u64) {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let cfg = ingest_config(&pki, &work.path().join("s.redb"));
    let quota = cfg.quic.max_new_sessions_per_hour as u64;
    let child =
        spawn_ingest_child(env!("CARGO_BIN_EXE_e2e-hospital-ingest"), cfg, work.path()).await;
    let honest = Agent::start(agent_config(
        pki.path(),
        "amb-2",
        child.quic,
        vitals_and_gps(),
    ))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = child.rss_bytes();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (next, dir, quic) = (next.clone(), pki.path().to_owned(), child.quic);
        workers.spawn(async move {
            let (mut accepted, mut refused, mut other) = (0u64, 0u64, Vec::new());
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= attempts {
                    return (accepted, refused, other);
                }
                let conn = raw_connect(&dir, &dir, "amb-1", quic).await.unwrap();
                let streams = vec![vitals(0, "vitals")];
                match hello_padded(&conn, "amb-1", 1_000 + n, streams, 1_000_000).await {
                    Ok(()) => accepted += 1,
                    Err(e) if close_code(&e) == Some(CloseCode::QuotaExceeded) => refused += 1,
                    Err(e) => other.push(e.to_string()),
                }
                conn.close(quinn::VarInt::from_u32(0), b"next");
            }
        });
    }
    let (mut accepted, mut refused, mut peak) = (0, 0, before);
    loop {
        peak = peak.max(child.rss_bytes());
        match tokio::time::timeout(Duration::from_millis(200), workers.join_next()).await {
            Ok(None) => break,
            Ok(Some(done)) => {
                let (a, r, other) = done.unwrap();
                assert!(other.is_empty(), "refused for another reason: {other:?}");
                accepted += a;
                refused += r;
            }
            Err(_) => {}
        }
    }
    let grown = peak.saturating_sub(before);
    println!(
        "{attempts} sessions of ~1 MiB Hellos: {accepted} accepted, {refused} refused; \
         ingest RSS peak +{} MiB",
        grown >> 20
    );
    assert_eq!(accepted, quota, "exactly the hourly quota is accepted");
    assert_eq!(refused, attempts - quota);
    // Eight Hellos of 1 MiB at a time, and the allocator's slack: flat, not 1 MiB a session.
    assert!(grown < 64 << 20, "grew {} MiB", grown >> 20);
    let (_, body) = http_get(child.metrics.unwrap(), "/metrics").await;
    let counted = labelled_metric(
        &body,
        "relay_ingest_protocol_errors_total",
        "reason=\"quota_exceeded\"",
    );
    assert_eq!(counted, Some(refused as f64), "{body}");
    // The other vehicle lost nothing: every frame it produced is stored, once.
    let summary = honest.shutdown().await.unwrap();
    assert_eq!(summary.unacked_at_exit, 0);
    let produced: u64 = summary.frames_produced.iter().map(|(_, n)| n).sum();
    let stored = collect_until(
        || format!("https://{}", child.grpc),
        &pki.subscriber("ed-console"),
        &work.path().join("wfdb"),
        Duration::from_secs(60),
        |c| c.syncs > 0,
    )
    .await;
    assert!(
        stored.complete_from_zero(),
        "every amb-2 frame from 0, once"
    );
    let amb2: u64 = stored
        .frames_by_stream()
        .iter()
        .filter(|(id, _)| id.0 == "amb-2")
        .map(|(_, n)| n)
        .sum();
    assert_eq!(amb2, produced, "amb-2's data intact");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_storm_with_megabyte_hellos_is_refused_past_the_quota_and_holds_no_memory() {
    session_storm(300).await;
}

/// The acceptance figure: 10,000 sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak run, several minutes: cargo test -p relay-e2e --test security -- --ignored"]
async fn soak_ten_thousand_sessions_with_megabyte_hellos() {
    session_storm(10_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vehicle_cannot_hold_more_half_sent_hellos_than_its_connection_cap() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let mut cfg = ingest_config(&pki, &work.path().join("s.redb"));
    cfg.quic.max_connections_per_vehicle = 4;
    let ingest = Ingest::start(cfg).await.unwrap();
    // Ten connections of amb-1 each announce a 1 MiB Hello and send 1 KiB of it.
    let mut stalled = Vec::new();
    for _ in 0..10 {
        let conn = raw_connect(pki.path(), pki.path(), "amb-1", ingest.quic_addr)
            .await
            .unwrap();
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        // Refused connections may be closed before these writes complete.
        let _ = send.write_all(&1_000_000u32.to_be_bytes()).await;
        let _ = send.write_all(&[0u8; 1024]).await;
        stalled.push((conn, send));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The four in progress are held until the Hello deadline; the other six are refused at
    // once, before they cost a megabyte each.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let refused: Vec<String> = stalled
        .iter()
        .filter_map(|(c, _)| c.close_reason())
        .map(|e| {
            assert_eq!(close_code(&e), Some(CloseCode::QuotaExceeded), "{e}");
            e.to_string()
        })
        .collect();
    assert_eq!(refused.len(), 6, "{refused:?}");
    assert!(refused[0].contains("Hellos"), "{}", refused[0]);
    // Another vehicle is not affected.
    let amb2 = raw_connect(pki.path(), pki.path(), "amb-2", ingest.quic_addr)
        .await
        .unwrap();
    hello(&amb2, "amb-2").await.unwrap();
    ingest.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_revokes_a_vehicle_in_a_running_ingest_process() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let mut cfg = ingest_config(&pki, &work.path().join("s.redb"));
    // SIGHUP alone: the file watcher must not be what reloads.
    cfg.tls.watch_interval = Duration::ZERO;
    let child =
        spawn_ingest_child(env!("CARGO_BIN_EXE_e2e-hospital-ingest"), cfg, work.path()).await;
    let connect = |v: &'static str| raw_connect(pki.path(), pki.path(), v, child.quic);
    let amb1 = connect("amb-1").await.unwrap();
    hello(&amb1, "amb-1").await.unwrap();
    let amb2 = connect("amb-2").await.unwrap();
    hello(&amb2, "amb-2").await.unwrap();
    relay_devcerts::revoke(pki.path(), &["amb-1".into()]).unwrap();
    let pid = child.child.id().unwrap().to_string();
    let kill = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(kill.success());
    let err = tokio::time::timeout(Duration::from_secs(5), amb1.closed())
        .await
        .expect("amb-1 is cut off within 5 s of SIGHUP");
    assert_eq!(close_code(&err), Some(CloseCode::Revoked), "{err}");
    match connect("amb-1").await {
        Err(_) => {}
        Ok(conn) => assert!(hello(&conn, "amb-1").await.is_err(), "amb-1 got a session"),
    }
    assert!(amb2.close_reason().is_none(), "amb-2 keeps its session");
    // The live session closed, and the new handshake refused (the ingest counts the latter
    // when its side of the handshake ends, which may be after the client gave up).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, body) = http_get(child.metrics.unwrap(), "/metrics").await;
        let revoked = labelled_metric(
            &body,
            "relay_ingest_security_events_total",
            "reason=\"revoked\"",
        );
        if revoked.is_some_and(|n| n >= 2.0) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_vehicle_is_cut_off_on_reload_and_a_rotated_certificate_needs_no_restart() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let mut cfg = ingest_config(&pki, &work.path().join("s.redb"));
    // The explicit reload (SIGHUP) alone, without the file watcher racing it.
    cfg.tls.watch_interval = Duration::ZERO;
    let ingest = Ingest::start(cfg).await.unwrap();
    let connect = |v: &'static str| raw_connect(pki.path(), pki.path(), v, ingest.quic_addr);
    let amb1 = connect("amb-1").await.unwrap();
    hello(&amb1, "amb-1").await.unwrap();
    let amb2 = connect("amb-2").await.unwrap();
    hello(&amb2, "amb-2").await.unwrap();

    // amb-1's router was stolen: revoke it, rotate the ingest's certificate, reload.
    relay_devcerts::revoke(pki.path(), &["amb-1".into()]).unwrap();
    relay_devcerts::reissue_ingest(pki.path(), &relay_devcerts::DevPki::default()).unwrap();
    assert_eq!(
        ingest.reload().unwrap().vehicles,
        1,
        "one live session revoked"
    );
    let err = tokio::time::timeout(Duration::from_secs(5), amb1.closed())
        .await
        .expect("amb-1 is cut off within 5 s");
    assert_eq!(close_code(&err), Some(CloseCode::Revoked), "{err}");
    // New handshakes of amb-1 fail.
    match connect("amb-1").await {
        Err(_) => {}
        Ok(conn) => assert!(hello(&conn, "amb-1").await.is_err(), "amb-1 got a session"),
    }
    // amb-2 is untouched, and new connections see the rotated certificate.
    assert!(amb2.close_reason().is_none());
    let fresh = connect("amb-2").await.unwrap();
    hello(&fresh, "amb-2").await.unwrap();
    let served = fresh
        .peer_identity()
        .unwrap()
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .unwrap();
    let rotated = relay_ops::pem::load_certs(&pki.path().join("ingest.pem")).unwrap();
    assert_eq!(served[0], rotated[0], "the new certificate is served");
    let (_, body) = http_get(ingest.metrics_addr.unwrap(), "/metrics").await;
    let revoked = labelled_metric(
        &body,
        "relay_ingest_security_events_total",
        "reason=\"revoked\"",
    );
    assert!(revoked.is_some_and(|n| n >= 1.0), "{body}");
    ingest.shutdown().await.unwrap();
}

/// A TLS connection to the gRPC listener as ED client `name`, without gRPC on top, to see
/// which certificate the ingest serves and whether it lets the client in.
async fn grpc_tls_connect(
    pki: &Path,
    name: &str,
    addr: SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in relay_ops::pem::load_certs(&pki.join("hospital-ca.pem")).unwrap() {
        roots.add(ca).unwrap();
    }
    let certs = relay_ops::pem::load_certs(&pki.join(format!("{name}.pem"))).unwrap();
    let key = relay_ops::pem::load_key(&pki.join(format!("{name}.key"))).unwrap();
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let server_name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(server_name, tcp)
        .await
}

/// An ingest that reloads only when told (no file watcher racing the test's explicit
/// reload), and amb-1 streaming vitals and GPS to it.
async fn reload_only_ingest_with_amb1(pki: &Pki, work: &Path) -> (Ingest, Agent) {
    let mut cfg = ingest_config(pki, &work.join("s.redb"));
    cfg.tls.watch_interval = Duration::ZERO;
    let ingest = Ingest::start(cfg).await.unwrap();
    let agent = Agent::start(agent_config(
        pki.path(),
        "amb-1",
        ingest.quic_addr,
        vitals_and_gps(),
    ))
    .await
    .unwrap();
    (ingest, agent)
}

/// The next message of a subscription, if one comes within 5 s.
async fn next(
    feed: &mut tonic::Streaming<SubscribeResponse>,
) -> Result<Result<Option<SubscribeResponse>, tonic::Status>, tokio::time::error::Elapsed> {
    tokio::time::timeout(Duration::from_secs(5), feed.message()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_ed_client_is_cut_off_on_reload_and_the_grpc_certificate_rotates() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let (ingest, agent) = reload_only_ingest_with_amb1(&pki, work.path()).await;
    let url = format!("https://{}", ingest.grpc_addr);
    let live = || SubscribeRequest {
        vehicle_ids: vec![],
        kinds: vec![],
        start: Some(Start::Live(true)),
        ..Default::default()
    };
    let mut stolen = ed_client::client::connect(&url, &pki.subscriber("ed-console"))
        .await
        .unwrap();
    let mut stolen_feed = stolen.subscribe(live()).await.unwrap().into_inner();
    let mut kept = ed_client::client::connect(&url, &pki.subscriber("ed-2"))
        .await
        .unwrap();
    let mut kept_feed = kept.subscribe(live()).await.unwrap().into_inner();
    for feed in [&mut stolen_feed, &mut kept_feed] {
        assert!(
            matches!(next(feed).await, Ok(Ok(Some(_)))),
            "both read live data"
        );
    }

    // ed-console's certificate was stolen: revoke it, rotate the ingest's certificate, reload.
    relay_devcerts::revoke_subscribers(pki.path(), &["ed-console".into()]).unwrap();
    relay_devcerts::reissue_ingest(pki.path(), &relay_devcerts::DevPki::default()).unwrap();
    let reloaded = ingest.reload().unwrap();
    assert_eq!(
        (reloaded.vehicles, reloaded.subscribers),
        (0, 1),
        "{reloaded:?}"
    );
    // Its subscription ends within 5 s (an error, after what was already in flight).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, stolen_feed.message()).await {
            Err(_) => panic!("the revoked client still reads after 5 s"),
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None) | Err(_)) => break,
        }
    }
    // ed-2 keeps reading on its connection, and ed-console cannot come back.
    for _ in 0..3 {
        assert!(
            matches!(next(&mut kept_feed).await, Ok(Ok(Some(_)))),
            "ed-2 still reads"
        );
    }
    let again = async {
        let mut c = ed_client::client::connect(&url, &pki.subscriber("ed-console")).await?;
        c.list_vehicles(ListVehiclesRequest::default()).await?;
        anyhow::Ok(())
    };
    assert!(again.await.is_err(), "a revoked client was served");
    // New connections get the rotated certificate, without a restart.
    let fresh = grpc_tls_connect(pki.path(), "ed-2", ingest.grpc_addr)
        .await
        .unwrap();
    let served = fresh.get_ref().1.peer_certificates().unwrap()[0].clone();
    let rotated = relay_ops::pem::load_certs(&pki.path().join("ingest.pem")).unwrap();
    assert_eq!(served, rotated[0], "the new certificate is served");

    let (_, body) = http_get(ingest.metrics_addr.unwrap(), "/metrics").await;
    let refused = labelled_metric(
        &body,
        "relay_ingest_grpc_handshake_failures_total",
        "reason=\"revoked\"",
    );
    assert!(refused.is_some_and(|n| n >= 1.0), "{body}");
    agent.shutdown().await.unwrap();
    ingest.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ed_client_that_never_finishes_its_handshake_is_dropped_and_counted() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let mut cfg = ingest_config(&pki, &work.path().join("s.redb"));
    cfg.grpc.tls_handshake_timeout = Duration::from_millis(500);
    cfg.grpc.max_pending_handshakes = 4;
    let ingest = Ingest::start(cfg).await.unwrap();
    // More silent TCP connections than handshakes may be pending: the excess is closed at
    // once, the rest when their deadline passes.
    let mut silent = Vec::new();
    for _ in 0..8 {
        silent.push(
            tokio::net::TcpStream::connect(ingest.grpc_addr)
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for mut s in silent {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0) | Err(_))), "still open: {read:?}");
    }
    // A real client is served meanwhile and afterwards.
    let mut client = ed_client::client::connect(
        &format!("https://{}", ingest.grpc_addr),
        &pki.subscriber("ed-2"),
    )
    .await
    .unwrap();
    client
        .list_vehicles(ListVehiclesRequest::default())
        .await
        .unwrap();
    let (_, body) = http_get(ingest.metrics_addr.unwrap(), "/metrics").await;
    let count = |reason: &str| {
        labelled_metric(
            &body,
            "relay_ingest_grpc_handshake_failures_total",
            &format!("reason=\"{reason}\""),
        )
        .unwrap_or(0.0)
    };
    // At least: the counters are shared with the other tests of this binary.
    assert!(count("busy") + count("timeout") >= 8.0, "{body}");
    assert!(count("busy") >= 4.0, "{body}");
    ingest.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_vehicle_certificate_is_used_at_the_next_dial_without_losing_anything() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let (ingest, agent) = reload_only_ingest_with_amb1(&pki, work.path()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The old certificate is revoked and a renewed one installed on the vehicle; the ingest
    // then reloads and cuts the session that still uses the old one.
    relay_devcerts::revoke(pki.path(), &["amb-1".into()]).unwrap();
    relay_devcerts::reissue_vehicle(pki.path(), "amb-1", 365).unwrap();
    assert_eq!(ingest.reload().unwrap().vehicles, 1);
    // The agent dials again with the renewed certificate and catches up.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, body) = http_get(ingest.metrics_addr.unwrap(), "/metrics").await;
        if metric_value(&body, "relay_agent_connects_total") >= 2.0
            && metric_value(&body, "relay_ingest_vehicles_online") >= 1.0
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no new session:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The agent counted why it was cut off.
    let (_, body) = http_get(ingest.metrics_addr.unwrap(), "/metrics").await;
    let refused = labelled_metric(&body, "relay_agent_refusals_total", "code=\"revoked\"");
    assert!(refused.is_some_and(|n| n >= 1.0), "{body}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let summary = agent.shutdown().await.unwrap();
    assert_eq!(
        summary.unacked_at_exit, 0,
        "nothing lost across the renewal"
    );
    ingest.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_that_never_finish_cannot_exhaust_memory() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    // The ingest as a process of its own, so its memory is measured alone.
    let mut cfg = ingest_config(&pki, &work.path().join("s.redb"));
    cfg.metrics.listen = None;
    cfg.quic.frame_read_timeout = Duration::from_secs(30);
    let q = cfg.quic.clone();
    let streams = q.max_concurrent_frames as usize;
    let mut child =
        spawn_ingest_child(env!("CARGO_BIN_EXE_e2e-hospital-ingest"), cfg, work.path()).await;
    let pid = child.child.id().unwrap();
    let ingest = child.quic;
    let honest = Agent::start(agent_config(pki.path(), "amb-2", ingest, vitals_and_gps()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = rss_bytes(pid);
    // amb-1 opens every connection it may, each with every stream it may, 255 KiB each and no
    // FIN: 16 x 512 x 255 KiB, 2 GiB offered.
    let chunk = bytes::Bytes::from(vec![0x55u8; 255 * 1024]);
    let mut attack = tokio::task::JoinSet::new();
    let mut conns = Vec::new();
    for _ in 0..q.max_connections_per_vehicle {
        let conn = raw_connect(pki.path(), pki.path(), "amb-1", ingest)
            .await
            .unwrap();
        hello(&conn, "amb-1").await.unwrap();
        for _ in 0..streams {
            let (conn, chunk) = (conn.clone(), chunk.clone());
            attack.spawn(async move {
                let mut stream = conn.open_uni().await.ok()?;
                // Kept open by returning it: dropping a send stream would finish the frame.
                match tokio::time::timeout(Duration::from_secs(10), stream.write_chunk(chunk)).await
                {
                    Ok(Ok(())) => Some((true, stream)),
                    Ok(Err(_)) => None,
                    Err(_) => Some((false, stream)),
                }
            });
        }
        conns.push(conn);
    }
    let (mut written, mut open) = (0, Vec::new());
    while let Some(joined) = attack.join_next().await {
        if let Ok(Some((done, stream))) = joined {
            written += usize::from(done);
            open.push(stream);
        }
    }
    // Whatever the ingest accepted has arrived by now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let grown = rss_bytes(pid).saturating_sub(before);
    println!(
        "attack: {written} of {} open streams took 255 KiB; ingest grew {} MiB",
        open.len(),
        grown >> 20
    );
    // The attack held: every stream open on a live connection (none was refused or closed).
    assert_eq!(
        open.len(),
        q.max_connections_per_vehicle * streams,
        "{written} written"
    );
    assert!(conns.iter().all(|c| c.close_reason().is_none()));
    // The README's bound for one vehicle: its read budget plus a receive window per
    // connection (32 MiB + 16 x 4 MiB), and 32 MiB for the allocator. Without the budget,
    // four connections' worth of this attack grew the ingest by 549 MiB.
    let bound = q.max_reading_bytes_per_vehicle
        + conns.len() * q.connection_receive_window_bytes as usize
        + (32 << 20);
    assert!(
        (grown as usize) < bound.min(256 << 20),
        "grew {} MiB, bound {} MiB",
        grown >> 20,
        bound >> 20
    );
    drop(open);
    drop(conns);
    let summary = honest.shutdown().await.unwrap();
    assert_eq!(summary.unacked_at_exit, 0, "the other vehicle lost nothing");
    child.child.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vehicle_flooding_the_store_cannot_push_out_another_patients_data() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let store_path = work.path().join("s.redb");
    let mut cfg = ingest_config(&pki, &store_path);
    cfg.store.max_bytes = 8 << 20;
    cfg.store.max_bytes_per_vehicle = 1 << 20;
    cfg.store.retention_interval = Duration::from_millis(200);
    let ingest = Ingest::start(cfg).await.unwrap();
    let honest = Agent::start(agent_config(
        pki.path(),
        "amb-2",
        ingest.quic_addr,
        vitals_and_gps(),
    ))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // amb-1 sends 12 MiB of well-formed vitals (48 frames of ~256 values with long labels).
    let flood = raw_connect(pki.path(), pki.path(), "amb-1", ingest.quic_addr)
        .await
        .unwrap();
    hello(&flood, "amb-1").await.unwrap();
    let value = VitalSign {
        mdc_code: 147_842,
        label: "x".repeat(1000),
        value: 80.0,
        unit: "/min".into(),
    };
    for seq in 0..48 {
        let frame = Frame {
            stream_id: 0,
            seq,
            capture_time_ns: 0,
            payload: Some(Payload::Vitals(VitalsReport {
                values: vec![value.clone(); 250],
            })),
        };
        send_raw_frame(&flood, &frame.encode_to_vec()).await;
    }
    // The flood is stored and swept back to the quota.
    let metrics = ingest.metrics_addr.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, body) = http_get(metrics, "/metrics").await;
        if metric_value(&body, "relay_ingest_vehicle_quota_deleted_total") >= 30.0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(flood.close_reason().is_none(), "the flood was not refused");
    drop(flood);
    let summary = honest.shutdown().await.unwrap();
    assert_eq!(summary.unacked_at_exit, 0);
    ingest.shutdown().await.unwrap();

    // What the store holds: amb-1 within its quota, amb-2 from its first frame on.
    let store = hospital_ingest::store::Store::open(&store_path).unwrap();
    let (mut flood_bytes, mut honest_first) = (0u64, std::collections::HashMap::new());
    for (_, msg) in store.read_after(0, u64::MAX, 100_000).unwrap() {
        let len = msg.encoded_len() as u64;
        let Some(relay_proto::model::subscribe_response::Record::Data(d)) = msg.record else {
            continue;
        };
        let (stream, frame) = (d.stream.unwrap(), d.frame.unwrap());
        match stream.vehicle_id.as_str() {
            "amb-1" => flood_bytes += len,
            "amb-2" => {
                let first = honest_first.entry(stream.stream_id).or_insert(u64::MAX);
                *first = (*first).min(frame.seq);
            }
            other => panic!("unexpected vehicle {other}"),
        }
    }
    println!("amb-1 holds {flood_bytes} bytes; amb-2 first seqs {honest_first:?}");
    assert!(flood_bytes > 0 && flood_bytes <= 1 << 20, "{flood_bytes}");
    assert!(!honest_first.is_empty());
    assert!(
        honest_first.values().all(|&seq| seq == 0),
        "amb-2 lost its oldest data: {honest_first:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_list_copied_into_place_cuts_the_vehicle_off_without_a_signal() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let mut cfg = ingest_config(&pki, &work.path().join("s.redb"));
    cfg.tls.watch_interval = Duration::from_millis(200);
    let ingest = Ingest::start(cfg).await.unwrap();
    let amb1 = raw_connect(pki.path(), pki.path(), "amb-1", ingest.quic_addr)
        .await
        .unwrap();
    hello(&amb1, "amb-1").await.unwrap();
    let amb2 = raw_connect(pki.path(), pki.path(), "amb-2", ingest.quic_addr)
        .await
        .unwrap();
    hello(&amb2, "amb-2").await.unwrap();
    // A list cut off mid-copy does not load: the running configuration stays, nobody is
    // cut off, and new vehicles still get in.
    let crl = pki.path().join("fleet-ca.crl.pem");
    std::fs::write(&crl, "-----BEGIN X509 CRL-----\nMIIB\n").unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(amb1.close_reason().is_none(), "a broken list cut amb-1 off");
    let amb3 = raw_connect(pki.path(), pki.path(), "amb-3", ingest.quic_addr)
        .await
        .unwrap();
    hello(&amb3, "amb-3").await.unwrap();
    // Nobody calls reload or sends SIGHUP: the new list on disk is enough.
    relay_devcerts::revoke(pki.path(), &["amb-1".into()]).unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), amb1.closed())
        .await
        .expect("amb-1 is cut off within 10 s");
    assert_eq!(close_code(&err), Some(CloseCode::Revoked), "{err}");
    assert!(amb2.close_reason().is_none(), "amb-2 is untouched");
    ingest.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vehicle_clock_five_seconds_ahead_is_estimated_told_to_subscribers_and_reported() {
    use relay_proto::model::{ClockOffset, ListVehiclesRequest, TimestampCheck};
    use vehicle_agent::clock::WallClock;
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let ingest = Ingest::start(ingest_config(&pki, &work.path().join("s.redb")))
        .await
        .unwrap();
    let truth = 5_000_000_000i64;
    let start = |vehicle: &'static str, wall: WallClock| {
        let cfg = agent_config(pki.path(), vehicle, ingest.quic_addr, vitals_and_gps());
        Agent::start_with_clock(cfg, wall)
    };
    let ahead = start("amb-1", WallClock::skewed(truth)).await.unwrap();
    let synced = start("amb-2", WallClock::system()).await.unwrap();
    let url = format!("https://{}", ingest.grpc_addr);
    let mut client = ed_client::client::connect(&url, &pki.subscriber("ed-console"))
        .await
        .unwrap();
    let mut feed = client
        .subscribe(SubscribeRequest {
            vehicle_ids: vec![],
            kinds: vec![],
            start: Some(Start::AfterCursor(0)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // The estimate is within half the round trip of its exchange (plus 5 ms for the time
    // between reading the two clocks) of the truth.
    let close_to = |c: &ClockOffset, truth: i64| {
        let error = (c.offset_ns - truth).abs();
        assert!(
            error <= c.uncertainty_ns + 5_000_000,
            "estimated {c:?}, truth {truth} ns"
        );
        assert!(c.uncertainty_ns < 1_000_000_000, "{c:?}");
    };
    // Records of both vehicles carrying an estimate, each judged plausible: the skewed
    // vehicle stamps by its own clock, consistently.
    let mut seen: std::collections::HashMap<String, ClockOffset> = Default::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while seen.len() < 2 {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let msg = tokio::time::timeout(left, feed.message())
            .await
            .expect("records with clock estimates of both vehicles within 20 s")
            .unwrap()
            .unwrap();
        let Some(relay_proto::model::subscribe_response::Record::Data(d)) = msg.record else {
            continue;
        };
        let vehicle = d.stream.as_ref().unwrap().vehicle_id.clone();
        assert_eq!(
            d.capture_time_check,
            TimestampCheck::Plausible as i32,
            "{vehicle}: {d:?}"
        );
        if let Some(c) = d.vehicle_clock {
            seen.insert(vehicle, c);
        }
    }
    close_to(&seen["amb-1"], truth);
    close_to(&seen["amb-2"], 0);
    // The agents' own estimates agree.
    close_to(&ahead.clock_offset().unwrap(), truth);
    close_to(&synced.clock_offset().unwrap(), 0);
    // ListVehicles tells the current estimate too.
    let list = client
        .list_vehicles(ListVehiclesRequest::default())
        .await
        .unwrap()
        .into_inner();
    for v in &list.vehicles {
        let truth = if v.vehicle_id == "amb-1" { truth } else { 0 };
        close_to(v.clock.as_ref().unwrap(), truth);
    }
    // The skew is a security event of amb-1, audited and counted; amb-2 raised none.
    let audit_dir = work.path().join("audit");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let skew_events = |vehicle: &str| {
        let records = hospital_ingest::audit::query(
            &hospital_ingest::audit::files_in(&audit_dir).unwrap(),
            None,
            0,
        )
        .unwrap();
        records
            .into_iter()
            .filter(|r| {
                r.event.action == "security_event"
                    && r.event.vehicles == [vehicle]
                    && r.event.detail["reason"] == "clock_skew"
            })
            .count()
    };
    while skew_events("amb-1") == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no clock_skew audited"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, body) = http_get(ingest.metrics_addr.unwrap(), "/metrics").await;
    let n = labelled_metric(
        &body,
        "relay_ingest_security_events_total",
        "reason=\"clock_skew\"",
    );
    assert!(n >= Some(1.0), "{body}");
    assert_eq!(skew_events("amb-2"), 0);
    ahead.shutdown().await.unwrap();
    synced.shutdown().await.unwrap();
    ingest.shutdown().await.unwrap();
}

/// A certificate to present: its directory and file stem.
type Presented<'a> = Option<(&'a Path, &'a str)>;

/// A QUIC client towards the ingest trusting its CA, presenting `cert` (file stem in
/// `cert_dir`) or no certificate, offering `alpn`.
async fn dial_with(
    ingest: SocketAddr,
    trust_dir: &Path,
    cert: Presented<'_>,
    alpn: &[u8],
) -> Result<quinn::Connection, quinn::ConnectionError> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in relay_ops::pem::load_certs(&trust_dir.join("hospital-ca.pem")).unwrap() {
        roots.add(ca).unwrap();
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let mut tls = match cert {
        Some((dir, stem)) => builder
            .with_client_auth_cert(
                relay_ops::pem::load_certs(&dir.join(format!("{stem}.pem"))).unwrap(),
                relay_ops::pem::load_key(&dir.join(format!("{stem}.key"))).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    let client = quinn::ClientConfig::new(std::sync::Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ));
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = ep
        .connect_with(client, ingest, "localhost")
        .unwrap()
        .await?;
    // Under TLS 1.3 the client may finish before the server has judged its certificate:
    // the refusal then arrives as the connection's close.
    match tokio::time::timeout(Duration::from_secs(5), conn.closed()).await {
        Ok(e) => Err(e),
        Err(_) => Ok(conn),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_vehicle_handshakes_are_counted_by_cause() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    relay_devcerts::revoke(pki.path(), &["amb-4".into()]).unwrap();
    relay_devcerts::issue_expired_vehicle(pki.path(), "amb-3-lapsed", "amb-3").unwrap();
    let mut cfg = ingest_config(&pki, &work.path().join("s.redb"));
    cfg.quic.handshake_timeout = Duration::from_secs(1);
    // Its own process: the counters are this test's alone.
    let ingest =
        spawn_ingest_child(env!("CARGO_BIN_EXE_e2e-hospital-ingest"), cfg, work.path()).await;
    let target = ingest.quic;
    let count = |body: &str, reason: &str| {
        labelled_metric(
            body,
            "relay_ingest_handshake_failures_total",
            &format!("reason=\"{reason}\""),
        )
        .unwrap_or(0.0)
    };
    let (_, before) = http_get(ingest.metrics.unwrap(), "/metrics").await;
    let alpn = relay_proto::ALPN;
    let (trust, rogue) = (pki.path(), pki.rogue.path());
    // Each attempt in turn; every one is refused.
    let attempts: Vec<(&str, Presented, &[u8])> = vec![
        ("unknown_ca", Some((rogue, "amb-1")), alpn),
        ("revoked", Some((trust, "amb-4")), alpn),
        ("expired", Some((trust, "amb-3-lapsed")), alpn),
        ("no_certificate", None, alpn),
        ("alpn", Some((trust, "amb-1")), b"h3"),
    ];
    for (reason, cert, alpn) in &attempts {
        let r = dial_with(target, trust, *cert, alpn).await;
        assert!(r.is_err(), "{reason}: the attempt got through");
    }
    // A stranger that sends its Initial and goes silent.
    let sent = flood(
        target,
        [127, 0, 0, 1].into(),
        &trust.join("hospital-ca.pem"),
        5,
        Duration::from_millis(150),
    )
    .await;
    assert!(sent >= 1);
    // A genuine vehicle still connects, and its dial is no failure.
    dial_with(target, trust, Some((trust, "amb-1")), alpn)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, after) = http_get(ingest.metrics.unwrap(), "/metrics").await;
        let missing: Vec<&str> = [
            "unknown_ca",
            "revoked",
            "expired",
            "no_certificate",
            "alpn",
            "timeout",
        ]
        .into_iter()
        .filter(|r| count(&after, r) < count(&before, r) + 1.0)
        .collect();
        if missing.is_empty() {
            // Exactly one each (the timeouts: one per Initial replayed); nothing else is a
            // "protocol" failure.
            for (reason, ..) in &attempts {
                assert_eq!(
                    count(&after, reason),
                    count(&before, reason) + 1.0,
                    "{reason}"
                );
            }
            assert_eq!(
                count(&after, "protocol"),
                count(&before, "protocol"),
                "{after}"
            );
            assert_eq!(count(&after, "bad_certificate"), 0.0, "{after}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not counted by cause: {missing:?}\n{after}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
