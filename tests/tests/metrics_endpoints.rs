//! The agent's and the ingest's /metrics endpoints answer in Prometheus text format.
//!
//! Its own test binary: the metrics recorder is process-wide, and gauges such as
//! `relay_agent_connected` would otherwise mix with the agents of tests running beside it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use hospital_ingest::Ingest;
use relay_e2e::*;
use vehicle_agent::Agent;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoints_answer_in_prometheus_text_format() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let ingest = Ingest::start(ingest_config(&pki, &work.path().join("store.redb")))
        .await
        .unwrap();
    let mut cfg = agent_config(pki.path(), "amb-3", ingest.quic_addr, vitals_and_gps());
    cfg.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    let agent = Agent::start(cfg).await.unwrap();
    let url = format!("https://{}", ingest.grpc_addr);
    collect_until(
        || url.clone(),
        &pki.subscriber("ed-console"),
        &work.path().join("w"),
        Duration::from_secs(60),
        |c| c.data_records >= 10,
    )
    .await;

    for (addr, expected) in [
        (
            ingest.metrics_addr.unwrap(),
            [
                "# TYPE relay_ingest_frames_stored_total counter",
                "relay_ingest_vehicles_online 1",
                "relay_ingest_store_commit_seconds_bucket",
            ],
        ),
        (
            agent.metrics_addr.unwrap(),
            [
                "# TYPE relay_agent_frames_acked_total counter",
                "relay_agent_connected 1",
                "relay_agent_ack_latency_seconds_bucket",
            ],
        ),
    ] {
        let (head, body) = http_get(addr, "/metrics").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        // Certificate expiry is visible: the development PKI's leaves are valid a year.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        for (name, labels) in [
            (
                "relay_ingest_certificate_expiry_timestamp_seconds",
                "certificate=\"server\"",
            ),
            (
                "relay_ingest_certificate_expiry_timestamp_seconds",
                "certificate=\"fleet_ca\"",
            ),
            (
                "relay_agent_certificate_expiry_timestamp_seconds",
                "certificate=\"vehicle\"",
            ),
        ] {
            let at = labelled_metric(&body, name, labels)
                .unwrap_or_else(|| panic!("{name}{{{labels}}} in\n{body}"));
            let days = (at - now) / 86_400.0;
            assert!(
                (300.0..=800.0).contains(&days),
                "{name} {labels}: {days} days"
            );
        }
        let vehicles = metric_value(
            &body,
            "relay_ingest_vehicle_certificate_expiry_timestamp_seconds",
        );
        assert!(
            ((vehicles - now) / 86_400.0 - 365.0).abs() < 2.0,
            "{vehicles}"
        );
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/plain"),
            "{head}"
        );
        for e in expected {
            assert!(body.contains(e), "{e} missing from\n{body}");
        }
        // Every sample line is `name{labels} value`.
        for line in body
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let value = line.rsplit(' ').next().unwrap();
            assert!(
                value.parse::<f64>().is_ok() || value == "+Inf" || value == "NaN",
                "bad sample line {line}"
            );
        }
    }
    // The QUIC socket's receive buffer as the kernel granted it, and the kernel's drop count
    // of that socket (read from /proc/net/udp at start and every 5 s).
    let (_, body) = http_get(ingest.metrics_addr.unwrap(), "/metrics").await;
    let buffer = metric_value(&body, "relay_ingest_quic_socket_receive_buffer_bytes");
    assert!(buffer >= 64.0 * 1024.0, "receive buffer {buffer}");
    if cfg!(target_os = "linux") {
        assert!(
            body.contains("# TYPE relay_ingest_quic_socket_receive_drops_total counter"),
            "drops counter missing from\n{body}"
        );
    }
    agent.shutdown().await.unwrap();
    ingest.shutdown().await.unwrap();
}
