//! Through the user-space link emulator: agent -> lossy, delayed link -> ingest -> subscriber.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use hospital_ingest::Ingest;
use relay_e2e::*;
use relay_emulator::{BearerSpec, Link, TraceCache};
use vehicle_agent::Agent;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_100_crosses_a_link_with_5_percent_loss_and_50_ms_delay_bit_exact() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let ingest = Ingest::start(ingest_config(&pki, &work.path().join("store.redb")))
        .await
        .unwrap();
    // Loss both ways: data packets and acknowledgements.
    let spec = BearerSpec::parse(
        "rate=20mbit,delay=50ms,loss=5%,down.loss=5%",
        &mut TraceCache::default(),
    )
    .unwrap();
    let link = Link::start("127.0.0.1:0".parse().unwrap(), ingest.quic_addr, spec, 100)
        .await
        .unwrap();

    let mut sources = vec![replay("100", 60.0)];
    sources.extend(vitals_and_gps());
    let mut cfg = agent_config(pki.path(), "amb-1", link.addr, sources);
    cfg.framing.frame = Duration::from_millis(200);
    let agent = Agent::start(cfg).await.unwrap();

    let url = format!("https://{}", ingest.grpc_addr);
    let collected = collect_until(
        || url.clone(),
        &pki.subscriber("ed-console"),
        &work.path().join("wfdb"),
        Duration::from_secs(400),
        |c| c.waveform_samples("amb-1") >= 650_000,
    )
    .await;
    assert_eq!(collected.duplicates, 0);

    // The emulator really lost packets in both directions (about 5 %).
    let counters = link.counters();
    for (dir, c) in [("up", counters.up), ("down", counters.down)] {
        let rate = c.dropped_random_loss as f64 / c.offered_packets as f64;
        assert!(
            c.offered_packets > 500 && (0.03..0.07).contains(&rate),
            "{dir}: {c:?}"
        );
    }
    assert_bit_exact(collected, "amb-1", "100");
    agent.shutdown().await.unwrap();
    link.stop();
    ingest.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_agent_dials_again_to_drain_what_is_unacknowledged() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let ingest = Ingest::start(ingest_config(&pki, &work.path().join("store.redb")))
        .await
        .unwrap();
    let spec = BearerSpec::parse("rate=10mbit,delay=10ms", &mut TraceCache::default()).unwrap();
    let link = Link::start("127.0.0.1:0".parse().unwrap(), ingest.quic_addr, spec, 1)
        .await
        .unwrap();
    let mut cfg = agent_config(pki.path(), "amb-2", link.addr, vitals_and_gps());
    cfg.buffer.stop_drain = Duration::from_secs(30);
    // Attempts fail fast while the link is down, so the stop request finds the agent between
    // attempts rather than inside a handshake that might outlive the outage.
    cfg.reconnect.handshake_timeout = Duration::from_secs(1);
    let agent = Agent::start(cfg).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The connection dies (idle timeout 3 s) while frames keep being produced; the agent is
    // told to stop while the link is still down and the link comes back 5 s later.
    link.cut();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let stopping = tokio::spawn(agent.shutdown());
    tokio::time::sleep(Duration::from_secs(5)).await;
    link.restore();
    let summary = tokio::time::timeout(Duration::from_secs(60), stopping)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(summary.unacked_at_exit, 0, "{summary:?}");
    let produced: u64 = summary.frames_produced.iter().map(|(_, n)| n).sum();
    assert!(produced >= 40, "{summary:?}");

    let url = format!("https://{}", ingest.grpc_addr);
    let collected = collect_until(
        || url.clone(),
        &pki.subscriber("ed-console"),
        &work.path().join("wfdb"),
        Duration::from_secs(60),
        |c| c.data_records >= produced,
    )
    .await;
    assert_eq!(collected.duplicates, 0);
    assert_eq!(collected.data_records, produced);
    link.stop();
    ingest.shutdown().await.unwrap();
}
