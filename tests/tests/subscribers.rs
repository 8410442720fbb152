//! A subscriber that stops reading is cut off without delaying anyone else.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use hospital_ingest::Ingest;
use relay_e2e::*;
use relay_proto::model::{
    HeldFrames, StreamRef, SubscribeRequest, subscribe_request::Start, subscribe_response::Record,
};
use vehicle_agent::Agent;
use vehicle_agent::config::SourceConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_subscriber_is_cut_off_while_another_keeps_up() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let mut cfg = ingest_config(&pki, &work.path().join("s.redb"));
    cfg.grpc.subscriber_queue = 16;
    cfg.grpc.slow_subscriber_timeout = Duration::from_secs(1);
    cfg.grpc.live_buffer = 256;
    let ingest = Ingest::start(cfg).await.unwrap();
    let url = format!("https://{}", ingest.grpc_addr);

    // 15 leads at 1000 Hz, 20x real time: about 500 frames (600 kB) a second.
    let source = SourceConfig::Wfdb {
        record: record("s0010_re"),
        speed: 20.0,
        r#loop: true,
        name: "ecg".into(),
    };
    let agent = Agent::start(agent_config(
        pki.path(),
        "amb-1",
        ingest.quic_addr,
        vec![source],
    ))
    .await
    .unwrap();

    // The stalled subscriber: subscribes, then never reads.
    let mut stalled_client = ed_client::client::connect(&url, &pki.subscriber("ed-2"))
        .await
        .unwrap();
    let req = SubscribeRequest {
        vehicle_ids: vec![],
        kinds: vec![],
        start: Some(Start::Live(true)),
        ..Default::default()
    };
    let mut stalled = stalled_client.subscribe(req).await.unwrap().into_inner();

    // The healthy subscriber reads everything the while.
    let healthy = collect_until(
        || url.clone(),
        &pki.subscriber("ed-console"),
        &work.path().join("w"),
        Duration::from_secs(180),
        |c| c.data_records >= 6_000,
    )
    .await;
    assert_eq!(healthy.duplicates, 0);
    assert!(
        healthy.complete_from_zero(),
        "every seq from 0 to the highest, once"
    );
    // Generous: the point is that it is not held up by the stalled one (cut off after 1 s).
    assert!(
        healthy.max_live_delay_ms < 5_000.0,
        "healthy subscriber delayed {} ms",
        healthy.max_live_delay_ms
    );

    // Meanwhile the stalled one was cut off, and says so when it finally reads.
    let (_, body) = http_get(ingest.metrics_addr.unwrap(), "/metrics").await;
    assert!(
        metric_value(&body, "relay_ingest_subscribers_cut_off_total") >= 1.0,
        "{body}"
    );
    let mut got_status = None;
    for _ in 0..100_000 {
        match tokio::time::timeout(Duration::from_secs(30), stalled.message())
            .await
            .unwrap()
        {
            Ok(Some(m)) => assert!(!matches!(m.record, Some(Record::Lagged(_))) || m.cursor > 0),
            Ok(None) => break,
            Err(status) => {
                got_status = Some(status);
                break;
            }
        }
    }
    let status = got_status.expect("the stalled subscriber ends with an error status");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
    assert!(status.message().contains("after_cursor"), "{status}");

    agent.shutdown().await.unwrap();
    ingest.shutdown().await.unwrap();
}

/// Data records of a subscription until its sync marker: (stream key, seq) -> capture time.
async fn backlog_of(
    url: &str,
    pki: &Pki,
    start: Start,
) -> (
    std::collections::BTreeMap<(u64, u32, u64), i64>,
    tonic::Streaming<relay_proto::model::SubscribeResponse>,
) {
    let mut client = ed_client::client::connect(url, &pki.subscriber("ed-console"))
        .await
        .unwrap();
    let mut feed = client
        .subscribe(SubscribeRequest {
            vehicle_ids: vec!["amb-1".into()],
            kinds: vec![],
            start: Some(start),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut data = std::collections::BTreeMap::new();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), feed.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match msg.record {
            Some(Record::Data(d)) => {
                let (s, f) = (d.stream.unwrap(), d.frame.unwrap());
                data.insert((s.session_id, s.stream_id, f.seq), f.capture_time_ns);
            }
            Some(Record::Sync(_)) => return (data, feed),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_rewinds_to_a_capture_time_and_gets_exactly_what_was_captured_since() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let ingest = Ingest::start(ingest_config(&pki, &work.path().join("s.redb")))
        .await
        .unwrap();
    let url = format!("https://{}", ingest.grpc_addr);
    let mut sources = vitals_and_gps();
    sources.push(replay("100", 1.0));
    let agent = Agent::start(agent_config(pki.path(), "amb-1", ingest.quic_addr, sources))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Everything stored, then a time in the middle of it.
    let (all, _) = backlog_of(&url, &pki, Start::AfterCursor(0)).await;
    let mut times: Vec<i64> = all.values().copied().collect();
    times.sort_unstable();
    assert!(times.len() > 50, "{} records", times.len());
    let t = times[times.len() / 2];
    let (rewound, mut feed) = backlog_of(&url, &pki, Start::FromCaptureTimeNs(t)).await;
    // The backlog holds exactly the stored records captured at or after t (and what arrived
    // since the first read, captured later still).
    let expected: std::collections::BTreeMap<_, _> = all
        .iter()
        .filter(|(_, c)| **c >= t)
        .map(|(k, c)| (*k, *c))
        .collect();
    for (k, c) in &expected {
        assert_eq!(rewound.get(k), Some(c), "{k:?} missing from the rewind");
    }
    for (k, c) in &rewound {
        assert!(*c >= t, "{k:?} captured {c}, before {t}");
    }
    // Live after the marker: only later captures, and they keep coming.
    let mut live = 0;
    while live < 20 {
        let msg = tokio::time::timeout(Duration::from_secs(10), feed.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Some(Record::Data(d)) = msg.record {
            assert!(d.frame.unwrap().capture_time_ns >= t);
            live += 1;
        }
    }
    // A rewind before anything was stored returns everything; one into the future, nothing.
    let (from_epoch, _) = backlog_of(&url, &pki, Start::FromCaptureTimeNs(0)).await;
    assert!(all.keys().all(|k| from_epoch.contains_key(k)));
    let (future, _) = backlog_of(&url, &pki, Start::FromCaptureTimeNs(i64::MAX)).await;
    assert!(future.is_empty(), "{future:?}");
    agent.shutdown().await.unwrap();
    ingest.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stemi_alert_raised_by_the_crew_reaches_the_ed_and_its_acknowledgement_the_crew() {
    use relay_proto::model::{Severity, StreamKind, frame::Payload};
    use vehicle_agent::events::{Request, request as raise};
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let ingest = Ingest::start(ingest_config(&pki, &work.path().join("s.redb")))
        .await
        .unwrap();
    let socket = work.path().join("events.sock");
    let mut cfg = agent_config(pki.path(), "amb-1", ingest.quic_addr, vitals_and_gps());
    cfg.events.socket = Some(socket.clone());
    let agent = Agent::start(cfg).await.unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "only the agent's user may raise events");
    }
    let url = format!("https://{}", ingest.grpc_addr);
    let mut client = ed_client::client::connect(&url, &pki.subscriber("ed-console"))
        .await
        .unwrap();
    let mut feed = client
        .subscribe(SubscribeRequest {
            vehicle_ids: vec!["amb-1".into()],
            kinds: vec![StreamKind::Events as i32],
            start: Some(Start::Live(true)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // The sync marker first: from here on everything is live.
    loop {
        let msg = feed.message().await.unwrap().unwrap();
        if matches!(msg.record, Some(Record::Sync(_))) {
            break;
        }
    }
    let raised = raise(
        &socket,
        &Request::Raise {
            code: "stemi".into(),
            text: "inferior ST elevation".into(),
            severity: None,
        },
    )
    .await
    .unwrap();
    let seq = raised["seq"].as_u64().unwrap();
    let (event, session) = loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), feed.message())
            .await
            .expect("the alert within 5 s on loopback")
            .unwrap()
            .unwrap();
        if let Some(Record::Data(d)) = msg.record {
            let s = d.stream.unwrap();
            assert_eq!(s.kind, StreamKind::Events as i32);
            assert_eq!(s.stream_id as u64, raised["stream"].as_u64().unwrap());
            let f = d.frame.unwrap();
            assert_eq!(f.seq, seq);
            assert_eq!(
                f.capture_time_ns,
                raised["capture_time_ns"].as_i64().unwrap()
            );
            let Some(Payload::Event(e)) = f.payload else {
                panic!("not an event");
            };
            break (e, s.session_id);
        }
    };
    assert_eq!(event.code, "STEMI");
    assert_eq!(event.severity, Severity::High as i32);
    assert_eq!(event.text, "inferior ST elevation");
    // Not acknowledged yet; then the ED acknowledges, and the crew sees who and when.
    let status = Request::Status { seq };
    assert_eq!(
        raise(&socket, &status).await.unwrap()["acknowledged"],
        false
    );
    let acked_at = tokio::time::Instant::now();
    let ack = client
        .acknowledge(relay_proto::model::AcknowledgeRequest {
            stream: Some(relay_proto::model::StreamRef {
                vehicle_id: "amb-1".into(),
                session_id: session,
                stream_id: raised["stream"].as_u64().unwrap() as u32,
                kind: 0,
            }),
            seq,
            note: "cath lab ready".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ack.delivered);
    let answer = loop {
        let a = raise(&socket, &status).await.unwrap();
        if a["acknowledged"] == true {
            break a;
        }
        assert!(
            acked_at.elapsed() < Duration::from_secs(2),
            "the acknowledgement reaches the vehicle within 2 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(answer["acknowledged_by"], "ed-console");
    assert_eq!(answer["note"], "cath lab ready");
    assert!(answer["acknowledged_at_ns"].as_i64().unwrap() > 0);
    // Unknown codes are refused with a reason; the API keeps serving.
    let err = raise(
        &socket,
        &Request::Raise {
            code: "PIZZA".into(),
            text: String::new(),
            severity: None,
        },
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("unknown code"), "{err}");
    let again = raise(
        &socket,
        &Request::Raise {
            code: "ETA".into(),
            text: "12 min".into(),
            severity: None,
        },
    )
    .await
    .unwrap();
    assert_eq!(again["seq"].as_u64().unwrap(), seq + 1);
    agent.shutdown().await.unwrap();
    assert!(!socket.exists(), "the socket goes with the agent");
    ingest.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledgement_given_while_the_vehicle_is_offline_reaches_it_when_it_is_back() {
    use relay_proto::model::{AcknowledgeRequest, ListVehiclesRequest, StreamKind, StreamRef};
    use vehicle_agent::events::{Request, request};
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let ingest = Ingest::start(ingest_config(&pki, &work.path().join("s.redb")))
        .await
        .unwrap();
    let links = links(1, "rate=20mbit,delay=5ms", ingest.quic_addr).await;
    let socket = work.path().join("events.sock");
    let mut cfg = agent_config(pki.path(), "amb-1", links[0].addr, vitals_and_gps());
    over_links(&mut cfg, &links);
    cfg.events.socket = Some(socket.clone());
    let agent = Agent::start(cfg).await.unwrap();
    let url = format!("https://{}", ingest.grpc_addr);
    let mut client = ed_client::client::connect(&url, &pki.subscriber("ed-console"))
        .await
        .unwrap();
    let raised = request(
        &socket,
        &Request::Raise {
            code: "stroke".into(),
            text: "left-sided weakness".into(),
            severity: None,
        },
    )
    .await
    .unwrap();
    let (seq, stream_id) = (
        raised["seq"].as_u64().unwrap(),
        raised["stream"].as_u64().unwrap() as u32,
    );
    // The event's session, from the stored record.
    let mut feed = client
        .subscribe(SubscribeRequest {
            vehicle_ids: vec!["amb-1".into()],
            kinds: vec![StreamKind::Events as i32],
            start: Some(Start::AfterCursor(0)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let session = loop {
        let m = tokio::time::timeout(Duration::from_secs(10), feed.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Some(Record::Data(d)) = m.record {
            break d.stream.unwrap().session_id;
        }
    };
    // Online: the vehicle's bearer shows with its round-trip time.
    let vehicles = client
        .list_vehicles(ListVehiclesRequest {})
        .await
        .unwrap()
        .into_inner()
        .vehicles;
    let bearers = &vehicles[0].bearers;
    assert_eq!(bearers.len(), 1, "{vehicles:?}");
    assert!(
        bearers[0].rtt_ns >= 10_000_000,
        "5 ms each way: {bearers:?}"
    );
    assert!(bearers[0].sent_packets > 0 && bearers[0].connected_since_ns > 0);

    // The bearer goes dark; once the ingest counts the vehicle offline, the ED acknowledges.
    links[0].cut();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let v = client
            .list_vehicles(ListVehiclesRequest {})
            .await
            .unwrap()
            .into_inner()
            .vehicles;
        if !v[0].online {
            assert!(v[0].bearers.is_empty());
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still online");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ack = client
        .acknowledge(AcknowledgeRequest {
            stream: Some(StreamRef {
                vehicle_id: "amb-1".into(),
                session_id: session,
                stream_id,
                kind: StreamKind::Events as i32,
            }),
            seq,
            note: "stroke team called".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!ack.delivered && ack.held, "{ack:?}");
    let status = Request::Status { seq };
    assert_eq!(
        request(&socket, &status).await.unwrap()["acknowledged"],
        false
    );
    // Back in coverage: the held acknowledgement reaches the crew.
    links[0].restore();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let answer = loop {
        let a = request(&socket, &status).await.unwrap();
        if a["acknowledged"] == true {
            break a;
        }
        assert!(tokio::time::Instant::now() < deadline, "not delivered: {a}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(answer["note"], "stroke team called");
    assert_eq!(answer["acknowledged_by"], "ed-console");
    agent.shutdown().await.unwrap();
    for l in links {
        l.stop();
    }
    ingest.shutdown().await.unwrap();
}

/// Early delivery on the embedded store: frames come provisionally and are confirmed once
/// durable, every frame once, bit-exact; a `held` list is checked before anything flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_subscription_gets_every_frame_once_and_held_lists_are_bounded() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let ingest = Ingest::start(ingest_config(&pki, &work.path().join("e.redb")))
        .await
        .unwrap();
    let url = format!("https://{}", ingest.grpc_addr);
    let mut client = ed_client::client::connect(&url, &pki.subscriber("ed-console"))
        .await
        .unwrap();
    let held = |n: u64| -> Vec<HeldFrames> {
        (0..n)
            .map(|i| HeldFrames {
                stream: Some(StreamRef {
                    vehicle_id: "amb-1".into(),
                    session_id: 1,
                    stream_id: 0,
                    kind: 0,
                }),
                start_seq: 2 * i,
                end_seq: 2 * i + 1,
            })
            .collect()
    };
    for (early, held, why) in [
        (false, held(1), "held without early"),
        (true, held(4097), "more than 4096 ranges"),
    ] {
        let req = SubscribeRequest {
            start: Some(Start::AfterCursor(0)),
            early,
            held,
            ..Default::default()
        };
        let status = client.subscribe(req).await.expect_err(why);
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{why}");
    }

    let mut sources = vec![replay("s0010_re", 8.0)];
    sources.extend(vitals_and_gps());
    let agent = Agent::start(agent_config(pki.path(), "amb-1", ingest.quic_addr, sources))
        .await
        .unwrap();
    let collected = collect_early_until(
        || url.clone(),
        &pki.subscriber("ed-console"),
        &work.path().join("w"),
        Duration::from_secs(120),
        |_| false,
        |c| c.waveform_samples("amb-1") >= 38_400 && c.resume.held_frames() == 0,
    )
    .await;
    assert!(collected.provisional > 0, "frames came early");
    assert_eq!(collected.confirmed, collected.provisional);
    assert_eq!(collected.unknown_confirmations, 0);
    assert_eq!(collected.duplicates, 0);
    assert_bit_exact(collected, "amb-1", "s0010_re");
    agent.shutdown().await.unwrap();
    ingest.shutdown().await.unwrap();
}
