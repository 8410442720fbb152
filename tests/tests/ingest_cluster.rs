//! Two ingest nodes on one JetStream log (issue 13), a real 3-node NATS cluster on loopback:
//! - two agents whose two bearers each are split across the two nodes (every ECG frame sent
//!   over both: the default redundant policy) arrive bit-exact, once, with every gap closed,
//!   at a subscriber of either node, with the same cursors;
//! - the node that owns a vehicle is SIGKILLed mid-stream: the bearer it carried moves to
//!   the other node, which takes the vehicle over; nothing is lost or duplicated and live
//!   ECG at a subscriber of the surviving node resumes quickly (measured).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::time::Duration;

use hospital_ingest::Ingest;
use relay_e2e::nats::{Cluster, ingest_on};
use relay_e2e::*;
use tokio::time::Instant;
use vehicle_agent::Agent;
use vehicle_agent::config::{AgentConfig, BearerConfig};

/// Serialized: each test runs 3 NATS servers and 2 ingest nodes on the 2-core machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `vehicle` replaying `record` with bearer wan0 on node `a` (then `b`) and wan1 on `b`
/// (then `a`).
fn split_agent(
    pki: &Pki,
    vehicle: &str,
    record: &str,
    speed: f64,
    frame_ms: u64,
    a: SocketAddr,
    b: SocketAddr,
) -> AgentConfig {
    let mut sources = vec![replay(record, speed)];
    sources.extend(vitals_and_gps());
    let mut cfg = agent_config(pki.path(), vehicle, a, sources);
    cfg.framing.frame = Duration::from_millis(frame_ms);
    let bearer = |name: &str, first: SocketAddr, then: SocketAddr| BearerConfig {
        remote: Some(first),
        fallback_remotes: vec![then],
        ..BearerConfig::new(name, "127.0.0.1:0".parse().unwrap())
    };
    cfg.bearers = vec![bearer("wan0", a, b), bearer("wan1", b, a)];
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearers_split_across_two_ingest_nodes_arrive_once_and_exact_at_either_node() {
    let _one = ONE_AT_A_TIME.lock().await;
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let nats = Cluster::start(&pki, &work.path().join("nats"), 3).await;
    let mut nodes = Vec::new();
    for name in ["a", "b"] {
        let dir = work.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        nodes.push(
            Ingest::start(ingest_on(&nats, &pki, &dir, "split"))
                .await
                .unwrap(),
        );
    }
    let (a, b) = (nodes[0].quic_addr, nodes[1].quic_addr);
    let a1 = Agent::start(split_agent(&pki, "amb-1", "100", 300.0, 200, a, b))
        .await
        .unwrap();
    let a2 = Agent::start(split_agent(&pki, "amb-2", "s0010_re", 8.0, 40, b, a))
        .await
        .unwrap();
    let done = |c: &Collected| {
        c.waveform_samples("amb-1") >= 650_000 && c.waveform_samples("amb-2") >= 38_400
    };
    let urls: Vec<String> = nodes
        .iter()
        .map(|n| format!("https://{}", n.grpc_addr))
        .collect();
    let on_a = collect_until(
        || urls[0].clone(),
        &pki.subscriber("ed-console"),
        &work.path().join("wfdb-a"),
        Duration::from_secs(240),
        done,
    )
    .await;
    assert_eq!(on_a.duplicates, 0);
    assert_eq!(on_a.gaps_closed, on_a.gaps, "every gap closed");
    let cursor_a = on_a.cursor;
    assert_all_bit_exact(on_a, &[("amb-1", "100"), ("amb-2", "s0010_re")]);
    // The other node serves the same log: same records, same cursors.
    let on_b = collect_until(
        || urls[1].clone(),
        &pki.subscriber("ed-2"),
        &work.path().join("wfdb-b"),
        Duration::from_secs(120),
        |c| done(c) && c.cursor >= cursor_a,
    )
    .await;
    assert_eq!(on_b.duplicates, 0);
    assert_all_bit_exact(on_b, &[("amb-1", "100"), ("amb-2", "s0010_re")]);
    a1.shutdown().await.unwrap();
    a2.shutdown().await.unwrap();
    for n in nodes {
        n.shutdown().await.unwrap();
    }
}

/// What a node's metrics say.
async fn metrics_of(child: &IngestChild) -> String {
    http_get(child.metrics.unwrap(), "/metrics").await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_owning_ingest_node_loses_nothing_and_live_ecg_resumes_on_the_other() {
    let _one = ONE_AT_A_TIME.lock().await;
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let nats = Cluster::start(&pki, &work.path().join("nats"), 3).await;
    let mut nodes = Vec::new();
    for name in ["a", "b"] {
        let dir = work.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = ingest_on(&nats, &pki, &dir, "kill");
        nodes.push(spawn_ingest_child(env!("CARGO_BIN_EXE_e2e-hospital-ingest"), cfg, &dir).await);
    }
    let (a, b) = (nodes[0].quic, nodes[1].quic);
    // s0010_re (38.4 s) at 2x: about 19 s of streaming.
    let agent = Agent::start(split_agent(&pki, "amb-2", "s0010_re", 2.0, 40, a, b))
        .await
        .unwrap();
    // The node that took the vehicle owns it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let owner = loop {
        let mut taken = Vec::new();
        for n in &nodes {
            taken.push(metric_value(
                &metrics_of(n).await,
                "relay_ingest_cluster_ownership_taken_total",
            ));
        }
        if let Some(i) = taken.iter().position(|&t| t >= 1.0) {
            break i;
        }
        assert!(Instant::now() < deadline, "nobody took the vehicle");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let survivor = 1 - owner;
    let live = collect_s0010(
        format!("https://{}", nodes[survivor].grpc),
        pki.subscriber("ed-console"),
        work.path().join("wfdb"),
        "amb-2",
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut dead = nodes.remove(owner);
    let killed = Instant::now();
    dead.child.start_kill().unwrap();
    dead.child.wait().await.unwrap();
    let collected = live.await.unwrap();
    let after = &nodes[0];
    let m = metrics_of(after).await;
    assert!(
        metric_value(&m, "relay_ingest_cluster_takeovers_total") >= 1.0,
        "the survivor took the vehicle over"
    );
    assert!(
        metric_value(&m, "relay_ingest_connections_total") >= 2.0,
        "the dead node's bearer moved to the survivor"
    );
    // Live ECG at the survivor's subscriber: the longest silence from the kill on.
    let arrivals: Vec<Instant> = collected
        .waveforms
        .iter()
        .map(|w| w.at)
        .filter(|&t| t >= killed - Duration::from_millis(500))
        .collect();
    let first_after = arrivals.iter().find(|&&t| t > killed).copied().unwrap();
    let longest = arrivals
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    eprintln!(
        "owner node SIGKILLed: first ECG at the survivor's subscriber {:?} later, longest \
         silence {longest:?}; {} gaps, all closed: {}",
        first_after - killed,
        collected.gaps,
        collected.gaps == collected.gaps_closed
    );
    assert_eq!(collected.duplicates, 0);
    assert_eq!(collected.gaps, collected.gaps_closed, "every gap closed");
    assert_bit_exact(collected, "amb-2", "s0010_re");
    assert!(
        longest < Duration::from_secs(1),
        "live ECG stalled {longest:?}"
    );
    agent.shutdown().await.unwrap();
}
