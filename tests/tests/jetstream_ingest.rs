//! The ingest on the JetStream store (`store.backend = "jetstream"`, issue 13) against a
//! real 3-node cluster on loopback: two agents stream record 100 and s0010_re, a subscriber's
//! WFDB export is bit-exact without duplicates; the ingest is then stopped and a new one,
//! with nothing on its disk, serves the same log again from the cluster (subscriber from
//! cursor 0, bit-exact, no duplicate).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use hospital_ingest::Ingest;
use hospital_ingest::config::ServiceConfig;
use relay_e2e::nats::{Cluster, ingest_on};
use relay_e2e::*;
use vehicle_agent::Agent;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_cross_an_ingest_on_jetstream_bit_exact_and_a_fresh_ingest_serves_the_log() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(&pki, &work.path().join("nats"), 3).await;
    let cfg = ingest_on(&cluster, &pki, work.path(), "ingest");
    cfg.validate().unwrap();
    let ingest = Ingest::start(cfg.clone()).await.unwrap();

    let start_agent = |vehicle: &str, record: &str, speed: f64, frame_ms: u64, quic| {
        let mut sources = vec![replay(record, speed)];
        sources.extend(vitals_and_gps());
        let mut c = agent_config(pki.path(), vehicle, quic, sources);
        c.framing.frame = Duration::from_millis(frame_ms);
        Agent::start(c)
    };
    let a1 = start_agent("amb-1", "100", 300.0, 200, ingest.quic_addr)
        .await
        .unwrap();
    let a2 = start_agent("amb-2", "s0010_re", 8.0, 40, ingest.quic_addr)
        .await
        .unwrap();
    let done = |c: &Collected| {
        c.waveform_samples("amb-1") >= 650_000 && c.waveform_samples("amb-2") >= 38_400
    };
    let url = format!("https://{}", ingest.grpc_addr);
    let collected = collect_until(
        || url.clone(),
        &pki.subscriber("ed-console"),
        &work.path().join("wfdb-live"),
        Duration::from_secs(240),
        done,
    )
    .await;
    assert_eq!(collected.duplicates, 0);
    assert_all_bit_exact(collected, &[("amb-1", "100"), ("amb-2", "s0010_re")]);
    a1.shutdown().await.unwrap();
    a2.shutdown().await.unwrap();
    ingest.shutdown().await.unwrap();

    // A new ingest process with an empty disk: the log, the descriptors and the dedup
    // index come from the cluster.
    let ingest = Ingest::start(cfg).await.unwrap();
    let url = format!("https://{}", ingest.grpc_addr);
    let replayed = collect_until(
        || url.clone(),
        &pki.subscriber("ed-2"),
        &work.path().join("wfdb-replay"),
        Duration::from_secs(120),
        done,
    )
    .await;
    assert_eq!(replayed.duplicates, 0);
    assert_all_bit_exact(replayed, &[("amb-1", "100"), ("amb-2", "s0010_re")]);
    ingest.shutdown().await.unwrap();
}
