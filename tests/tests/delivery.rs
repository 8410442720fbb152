//! Real recordings cross agent -> QUIC -> ingest -> gRPC -> WFDB writer bit-exactly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use hospital_ingest::Ingest;
use relay_e2e::*;
use relay_proto::model::ListVehiclesRequest;
use vehicle_agent::Agent;

async fn round_trip(vehicle: &str, record_name: &str, speed: f64, frame_ms: u32, samples: u64) {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let ingest = Ingest::start(ingest_config(&pki, &work.path().join("store.redb")))
        .await
        .unwrap();
    let mut sources = vec![replay(record_name, speed)];
    sources.extend(vitals_and_gps());
    let mut cfg = agent_config(pki.path(), vehicle, ingest.quic_addr, sources);
    cfg.framing.frame = Duration::from_millis(u64::from(frame_ms));
    let agent = Agent::start(cfg).await.unwrap();

    let url = format!("https://{}", ingest.grpc_addr);
    let collected = collect_until(
        || url.clone(),
        &pki.subscriber("ed-console"),
        &work.path().join("wfdb"),
        Duration::from_secs(240),
        |c| c.waveform_samples(vehicle) >= samples,
    )
    .await;
    assert_eq!(collected.duplicates, 0);
    assert_eq!(
        collected.vehicles.iter().collect::<Vec<_>>(),
        vec![vehicle],
        "frames carry the certificate's vehicle id"
    );
    assert!(
        collected.syncs >= 1,
        "a sync marker separates backlog and live"
    );

    // The vehicle is listed with its streams while connected.
    let mut client = ed_client::client::connect(&url, &pki.subscriber("ed-2"))
        .await
        .unwrap();
    let list = client
        .list_vehicles(ListVehiclesRequest {})
        .await
        .unwrap()
        .into_inner();
    let v = list
        .vehicles
        .iter()
        .find(|v| v.vehicle_id == vehicle)
        .expect("vehicle listed");
    assert!(v.online);
    assert_eq!(v.streams.len(), 3);
    let ecg = v
        .streams
        .iter()
        .find(|s| s.stream.as_ref().is_some_and(|r| is_waveform(r.kind)))
        .unwrap();
    let w = ecg.descriptor.as_ref().unwrap().waveform.as_ref().unwrap();
    assert!(
        !w.channels.is_empty()
            && w.channels
                .iter()
                .all(|c| c.gain > 0.0 && !c.unit.is_empty())
    );

    assert_bit_exact(collected, vehicle, record_name);
    agent.shutdown().await.unwrap();
    ingest.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_100_format_212_two_leads_arrives_bit_exact() {
    // 30 min of 360 Hz at 300x: about 6 s.
    round_trip("amb-1", "100", 300.0, 200, 650_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_s0010_fifteen_leads_across_two_files_arrives_bit_exact() {
    // 38.4 s of 1000 Hz at 8x, default 40 ms frames.
    round_trip("amb-2", "s0010_re", 8.0, 40, 38_400).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_and_reflection_are_served() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let ingest = Ingest::start(ingest_config(&pki, &work.path().join("store.redb")))
        .await
        .unwrap();
    let tls = pki.subscriber("ed-console");
    let read = |p: &std::path::Path| std::fs::read(p).unwrap();
    let channel = tonic::transport::Channel::from_shared(format!("https://{}", ingest.grpc_addr))
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
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "ambulance.telemetry.v1.Telemetry".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut refl = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = refl
        .server_reflection_info(futures::stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let msg = resp.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("{msg:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"ambulance.telemetry.v1.Telemetry".to_string()),
        "{names:?}"
    );

    // Without a client certificate the API is refused.
    let anonymous = tonic::transport::Channel::from_shared(format!("https://{}", ingest.grpc_addr))
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(read(&tls.ca)))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await;
    if let Ok(ch) = anonymous {
        let mut c = relay_proto::model::telemetry_client::TelemetryClient::new(ch);
        assert!(
            c.list_vehicles(ListVehiclesRequest {}).await.is_err(),
            "API answered without a client certificate"
        );
    }
    ingest.shutdown().await.unwrap();
}
