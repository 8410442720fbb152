//! Who may read which patient, over real gRPC and TLS: an ED certificate scoped by the access
//! policy sees and reads only its vehicles and kinds, is refused beyond them, follows a
//! reloaded policy, and is held to its call rate and subscription count; without a policy
//! nobody reads patient data; reflection can be turned off; one CA for vehicles and ED clients
//! is refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::Duration;

use hospital_ingest::Ingest;
use relay_e2e::*;
use relay_proto::model::telemetry_client::TelemetryClient;
use relay_proto::model::{
    ListVehiclesRequest, StreamKind, SubscribeRequest, SubscribeResponse, subscribe_request::Start,
    subscribe_response::Record,
};
use tonic::transport::Channel;
use vehicle_agent::Agent;

/// ed-2 reads amb-1's vitals and positions; ed-console reads everything.
const SCOPED: &str = r#"
[[rule]]
name = "ed-2: amb-1 vitals and positions"
subject_cn = ["ed-2"]
vehicles = ["amb-1"]
kinds = ["vitals", "location"]

[[rule]]
name = "console"
subject_cn = ["ed-console"]
all_vehicles = true
"#;

async fn client(ingest: &Ingest, pki: &Pki, name: &str) -> TelemetryClient<Channel> {
    ed_client::client::connect(
        &format!("https://{}", ingest.grpc_addr),
        &pki.subscriber(name),
    )
    .await
    .unwrap()
}

async fn listed(c: &mut TelemetryClient<Channel>) -> Vec<String> {
    let list = c
        .list_vehicles(ListVehiclesRequest::default())
        .await
        .unwrap()
        .into_inner();
    list.vehicles.into_iter().map(|v| v.vehicle_id).collect()
}

fn live(vehicles: &[&str], kinds: &[StreamKind]) -> SubscribeRequest {
    SubscribeRequest {
        vehicle_ids: vehicles.iter().map(|v| (*v).to_owned()).collect(),
        kinds: kinds.iter().map(|k| *k as i32).collect(),
        start: Some(Start::Live(true)),
        ..Default::default()
    }
}

/// (vehicle, kind) of the next `n` data records of a subscription.
async fn next_data(feed: &mut tonic::Streaming<SubscribeResponse>, n: usize) -> Vec<(String, i32)> {
    let mut out = Vec::new();
    while out.len() < n {
        let msg = tokio::time::timeout(Duration::from_secs(10), feed.message())
            .await
            .expect("data within 10 s")
            .unwrap()
            .expect("the subscription goes on");
        if let Some(Record::Data(d)) = msg.record {
            let s = d.stream.unwrap();
            out.push((s.vehicle_id, s.kind));
        }
    }
    out
}

async fn two_vehicles(pki: &Pki, ingest: &Ingest) -> (Agent, Agent) {
    let start = |v: &str| {
        Agent::start(agent_config(
            pki.path(),
            v,
            ingest.quic_addr,
            vitals_and_gps(),
        ))
    };
    (start("amb-1").await.unwrap(), start("amb-2").await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ed_certificate_reads_only_what_the_policy_grants_and_follows_a_reload() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let policy = work.path().join("policy.toml");
    std::fs::write(&policy, SCOPED).unwrap();
    let mut cfg = ingest_config(&pki, &work.path().join("s.redb"));
    cfg.grpc.access_policy = Some(policy.clone());
    cfg.tls.watch_interval = Duration::ZERO;
    // Small thresholds, so the subscriber reasons show in this short run.
    cfg.detect.max_denials_per_10min = 2;
    cfg.detect.max_new_vehicles_per_hour = 1;
    let ingest = Ingest::start(cfg).await.unwrap();
    let (a1, a2) = two_vehicles(&pki, &ingest).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let mut scoped = client(&ingest, &pki, "ed-2").await;
    let mut console = client(&ingest, &pki, "ed-console").await;
    assert_eq!(
        listed(&mut scoped).await,
        vec!["amb-1"],
        "only its vehicle is named"
    );
    assert_eq!(listed(&mut console).await, vec!["amb-1", "amb-2"]);

    // Beyond the grant: another vehicle, or a kind it may not read.
    for req in [
        live(&["amb-2"], &[]),
        live(&["amb-1", "amb-2"], &[StreamKind::Vitals]),
        live(&[], &[StreamKind::Waveform]),
    ] {
        let status = scoped.subscribe(req.clone()).await.unwrap_err();
        assert_eq!(
            status.code(),
            tonic::Code::PermissionDenied,
            "{req:?}: {status:?}"
        );
    }
    // A filter naming nothing means everything it may read: amb-1's vitals and positions.
    let mut feed = scoped.subscribe(live(&[], &[])).await.unwrap().into_inner();
    for (vehicle, kind) in next_data(&mut feed, 10).await {
        assert_eq!(vehicle, "amb-1");
        assert!(kind == StreamKind::Vitals as i32 || kind == StreamKind::Location as i32);
    }

    // The policy changes: ed-2 now follows amb-2's positions only; the live subscription and
    // new calls follow at once.
    std::fs::write(
        &policy,
        SCOPED.replace(
            "vehicles = [\"amb-1\"]\nkinds = [\"vitals\", \"location\"]",
            "vehicles = [\"amb-2\"]\nkinds = [\"location\"]",
        ),
    )
    .unwrap();
    ingest.reload().unwrap();
    assert_eq!(listed(&mut scoped).await, vec!["amb-2"]);
    // The newly granted stream's descriptor comes before its first data record, so the
    // client can interpret it.
    let mut described = false;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), feed.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match msg.record {
            Some(Record::Stream(info)) => {
                let s = info.stream.unwrap();
                described |= s.vehicle_id == "amb-2" && s.kind == StreamKind::Location as i32;
            }
            Some(Record::Data(d)) if d.stream.as_ref().unwrap().vehicle_id == "amb-2" => {
                assert!(described, "amb-2 data before its descriptor");
                break;
            }
            _ => {}
        }
    }
    // Records already queued under the old grant drain first.
    let after: Vec<(String, i32)> = next_data(&mut feed, 40).await.split_off(20);
    assert!(
        after
            .iter()
            .all(|(v, k)| v == "amb-2" && *k == StreamKind::Location as i32),
        "{after:?}"
    );

    let (_, body) = http_get(ingest.metrics_addr.unwrap(), "/metrics").await;
    let denied = |reason: &str| {
        labelled_metric(
            &body,
            "relay_ingest_grpc_denied_total",
            &format!("reason=\"{reason}\""),
        )
        .unwrap_or(0.0)
    };
    assert!(denied("vehicle") >= 2.0 && denied("kind") >= 1.0, "{body}");
    // Three refusals within ten minutes, and the console reading two vehicles it never read.
    let _console_feed = console.subscribe(live(&[], &[])).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, body) = http_get(ingest.metrics_addr.unwrap(), "/metrics").await;
        let event = |reason: &str| {
            labelled_metric(
                &body,
                "relay_ingest_security_events_total",
                &format!("reason=\"{reason}\""),
            )
            .unwrap_or(0.0)
        };
        if event("subscriber_denials") >= 1.0 && event("subscriber_new_vehicles") >= 1.0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    a1.shutdown().await.unwrap();
    a2.shutdown().await.unwrap();
    ingest.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_policy_nobody_reads_patient_data() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let mut cfg = ingest_config(&pki, &work.path().join("s.redb"));
    cfg.grpc.access_policy = None;
    let ingest = Ingest::start(cfg).await.unwrap();
    let agent = Agent::start(agent_config(
        pki.path(),
        "amb-1",
        ingest.quic_addr,
        vitals_and_gps(),
    ))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut c = client(&ingest, &pki, "ed-console").await;
    assert!(listed(&mut c).await.is_empty());
    let status = c.subscribe(live(&[], &[])).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    agent.shutdown().await.unwrap();
    ingest.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_is_held_to_its_call_rate_and_subscription_count_and_others_are_not() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let mut cfg = ingest_config(&pki, &work.path().join("s.redb"));
    cfg.grpc.max_calls_per_minute = 5;
    cfg.grpc.max_subscriptions_per_client = 2;
    let ingest = Ingest::start(cfg).await.unwrap();
    let mut greedy = client(&ingest, &pki, "ed-console").await;
    let _first = greedy.subscribe(live(&[], &[])).await.unwrap();
    let _second = greedy.subscribe(live(&[], &[])).await.unwrap();
    let third = greedy.subscribe(live(&[], &[])).await.unwrap_err();
    assert_eq!(third.code(), tonic::Code::ResourceExhausted, "{third:?}");
    // Calls 4 and 5 of the minute pass, the sixth does not.
    for _ in 0..2 {
        greedy
            .list_vehicles(ListVehiclesRequest::default())
            .await
            .unwrap();
    }
    let sixth = greedy
        .list_vehicles(ListVehiclesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(sixth.code(), tonic::Code::ResourceExhausted, "{sixth:?}");
    // Another client certificate has its own budget.
    let mut other = client(&ingest, &pki, "ed-2").await;
    other
        .list_vehicles(ListVehiclesRequest::default())
        .await
        .unwrap();
    let _s = other.subscribe(live(&[], &[])).await.unwrap();
    let (_, body) = http_get(ingest.metrics_addr.unwrap(), "/metrics").await;
    for reason in ["call_rate", "subscriptions"] {
        let n = labelled_metric(
            &body,
            "relay_ingest_grpc_denied_total",
            &format!("reason=\"{reason}\""),
        );
        assert!(n.is_some_and(|n| n >= 1.0), "{reason}: {body}");
    }
    ingest.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_can_be_turned_off() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest,
    };
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let mut cfg = ingest_config(&pki, &work.path().join("s.redb"));
    cfg.grpc.reflection = false;
    let ingest = Ingest::start(cfg).await.unwrap();
    let tls = pki.subscriber("ed-console");
    let read = |p: &Path| std::fs::read(p).unwrap();
    let channel = Channel::from_shared(format!("https://{}", ingest.grpc_addr))
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(read(&tls.ca)))
                .identity(tonic::transport::Identity::from_pem(
                    read(&tls.cert),
                    read(&tls.key),
                ))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let status = ServerReflectionClient::new(channel)
        .server_reflection_info(futures::stream::iter(vec![req]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");
    ingest.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_ca_for_vehicles_and_ed_clients_is_refused() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let mut cfg = ingest_config(&pki, &work.path().join("s.redb"));
    cfg.tls.subscriber_ca = cfg.tls.fleet_ca.clone();
    let err = Ingest::start(cfg).await.unwrap_err();
    assert!(format!("{err:#}").contains("different CAs"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_returns_a_capture_time_range_of_one_stream_within_the_grant() {
    use relay_proto::model::{HistoryRequest, StreamRef, subscribe_response::Record};
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let policy = work.path().join("policy.toml");
    std::fs::write(&policy, SCOPED).unwrap();
    let mut cfg = ingest_config(&pki, &work.path().join("s.redb"));
    cfg.grpc.access_policy = Some(policy);
    let audit_dir = cfg.audit_dir();
    let ingest = Ingest::start(cfg).await.unwrap();
    let mut sources = vitals_and_gps();
    sources.push(replay("100", 1.0));
    let agent = Agent::start(agent_config(pki.path(), "amb-1", ingest.quic_addr, sources))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut console = client(&ingest, &pki, "ed-console").await;
    // The ECG stream's stored frames, as a subscriber sees them.
    let mut feed = console
        .subscribe(SubscribeRequest {
            vehicle_ids: vec!["amb-1".into()],
            kinds: vec![StreamKind::Waveform as i32],
            start: Some(relay_proto::model::subscribe_request::Start::AfterCursor(0)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (mut ecg, mut stream) = (Vec::new(), None);
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), feed.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match msg.record {
            Some(Record::Data(d)) => {
                stream = d.stream.clone();
                ecg.push(d.frame.unwrap());
            }
            Some(Record::Sync(_)) => break,
            _ => {}
        }
    }
    drop(feed);
    assert!(ecg.len() > 30, "{} frames", ecg.len());
    let stream = stream.unwrap();
    let k = ecg.len() / 3;
    let ask = |from: i64, to: i64, max: u32| HistoryRequest {
        stream: Some(StreamRef {
            kind: 0,
            ..stream.clone()
        }),
        from_capture_time_ns: from,
        to_capture_time_ns: to,
        max_records: max,
    };
    // Ten frames, from one that starts exactly at `from`: the same frames the subscriber got.
    let (from, to) = (ecg[k].capture_time_ns, ecg[k + 10].capture_time_ns);
    let h = console
        .history(ask(from, to, 0))
        .await
        .unwrap()
        .into_inner();
    let got: Vec<_> = h.records.iter().map(|d| d.frame.clone().unwrap()).collect();
    assert_eq!(got, ecg[k..k + 10].to_vec());
    assert!(!h.truncated && h.missing.is_empty());
    let info = h.stream.unwrap();
    assert!(
        info.descriptor.unwrap().waveform.is_some(),
        "the descriptor comes along"
    );
    // A millisecond later the frame in progress then comes first.
    let h = console
        .history(ask(from + 1_000_000, to, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.records[0].frame.as_ref().unwrap().seq, ecg[k].seq);
    // Bounded.
    let h = console.history(ask(0, 0, 3)).await.unwrap().into_inner();
    assert_eq!((h.records.len(), h.truncated), (3, true));
    assert_eq!(
        console.history(ask(0, 0, 10_001)).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    // ed-2 reads amb-1's vitals only: its waveforms are refused, an unknown stream not found.
    let mut scoped = client(&ingest, &pki, "ed-2").await;
    let err = scoped.history(ask(from, to, 0)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    let mut unknown = ask(from, to, 0);
    unknown.stream.as_mut().unwrap().stream_id = 999;
    let err = console.history(unknown).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
    // Each answered call left its audit record first.
    let records = hospital_ingest::audit::query(
        &hospital_ingest::audit::files_in(&audit_dir).unwrap(),
        Some("amb-1"),
        0,
    )
    .unwrap();
    let history: Vec<_> = records
        .iter()
        .filter(|r| r.event.action == "history")
        .collect();
    let console_calls = history
        .iter()
        .filter(|r| {
            r.event.outcome == hospital_ingest::audit::Outcome::Success
                && r.event
                    .client
                    .as_ref()
                    .unwrap()
                    .subject
                    .contains("ed-console")
        })
        .count();
    // The three answered calls (an invalid request and an unknown stream read nothing).
    assert_eq!(console_calls, 3, "{history:#?}");
    let all = hospital_ingest::audit::query(
        &hospital_ingest::audit::files_in(&audit_dir).unwrap(),
        None,
        0,
    )
    .unwrap();
    assert!(
        all.iter().any(|r| r.event.action == "history"
            && r.event.outcome == hospital_ingest::audit::Outcome::Denied
            && r.event.client.as_ref().unwrap().subject.contains("ed-2")),
        "the refusal is audited"
    );
    agent.shutdown().await.unwrap();
    ingest.shutdown().await.unwrap();
}
