//! Two ingest nodes on one JetStream log (issue 13), a real 3-node NATS cluster on loopback:
//! - two agents whose two bearers each are split across the two nodes (every ECG frame sent
//!   over both: the default redundant policy) arrive bit-exact, once, with every gap closed,
//!   at a subscriber of either node, with the same cursors;
//! - the node that owns a vehicle is SIGKILLed mid-stream: the bearer it carried moves to
//!   the other node, which takes the vehicle over; nothing is lost or duplicated and live
//!   ECG at a subscriber of the surviving node resumes quickly (measured);
//! - a frame forwarded to an owner that then goes away is asked again as soon as the owner is
//!   found gone, not after the request timeout.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::time::Duration;

use hospital_ingest::Ingest;
use relay_e2e::nats::{Cluster, ingest_on, store_options};
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
    // Collected until no gap is open: one may open at any moment of a live stream (a frame
    // still on its way through the other node), and what is asserted is that each closes.
    let done = |c: &Collected| {
        c.waveform_samples("amb-1") >= 650_000
            && c.waveform_samples("amb-2") >= 38_400
            && c.gaps_closed == c.gaps
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

/// The node that took the vehicle (the only one) owns it.
async fn owning_node(nodes: &[IngestChild]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut taken = Vec::new();
        for n in nodes {
            taken.push(metric_value(
                &metrics_of(n).await,
                "relay_ingest_cluster_ownership_taken_total",
            ));
        }
        if let Some(i) = taken.iter().position(|&t| t >= 1.0) {
            return i;
        }
        assert!(Instant::now() < deadline, "nobody took the vehicle");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    let owner = owning_node(&nodes).await;
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
    let first_after = collected
        .waveforms
        .iter()
        .map(|w| w.at)
        .find(|&t| t > killed)
        .expect("live ECG after the kill");
    let last = collected.waveforms.last().map(|w| w.at).unwrap();
    let longest = collected.longest_live_gap(killed - Duration::from_millis(500), last);
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

/// A frame for vehicle `vehicle` (stream 0) as the QUIC side hands it on, and where its
/// acknowledgement arrives.
fn frame_cmd(
    vehicle: &str,
    seq: u64,
) -> (
    hospital_ingest::writer::WriterCmd,
    tokio::sync::mpsc::Receiver<(u32, u64)>,
) {
    let (ack, acks) = tokio::sync::mpsc::channel(1);
    let cmd = hospital_ingest::writer::WriterCmd::Frame {
        vehicle: vehicle.into(),
        session: 1,
        frame: relay_proto::model::Frame {
            stream_id: 0,
            seq,
            ..Default::default()
        },
        received_ns: 0,
        vehicle_clock: None,
        capture_time_check: relay_proto::model::TimestampCheck::Unspecified,
        ack,
        budget: Vec::new(),
    };
    (cmd, acks)
}

/// The next command a writer the test plays gets (bounded).
async fn next(
    writes: &mut tokio::sync::mpsc::Receiver<hospital_ingest::writer::WriterCmd>,
) -> hospital_ingest::writer::WriterCmd {
    tokio::time::timeout(Duration::from_secs(20), writes.recv())
        .await
        .unwrap_or_else(|_| panic!("no command for 20 s"))
        .unwrap()
}

/// A forward already waiting on the owner when the owner goes away (a dead node never
/// answers) is asked again as soon as the owner is found gone, not after the request timeout
/// (60 s here). Two cluster nodes whose writers the test plays: X owns the vehicle and holds
/// the frame Y forwarded to it, then stops serving; Y's next forward finds no responder and
/// takes the vehicle over, and the held frame reaches Y's writer at once. Before this was
/// fixed it waited the full request timeout (seen in a 50-vehicle `--kill-node` load run:
/// ECG frames 10.1 s late at the default 10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_waiting_on_an_owner_that_went_away_is_asked_again_at_once() {
    use hospital_ingest::writer::WriterCmd;
    let _one = ONE_AT_A_TIME.lock().await;
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let nats = Cluster::start(&pki, &work.path().join("nats"), 3).await;
    let mut options = store_options(&nats, &pki, "frozen");
    options.request_timeout = Duration::from_secs(60);
    // Opening the store creates the log stream and the meta bucket.
    let o = options.clone();
    tokio::task::spawn_blocking(move || hospital_ingest::store::JetStreamStore::open(&o).map(drop))
        .await
        .unwrap()
        .unwrap();
    let node = |name: &str| {
        let mut o = options.clone();
        o.client_name = name.into();
        let (writer, writes) = tokio::sync::mpsc::channel::<WriterCmd>(16);
        let stop = tokio_util::sync::CancellationToken::new();
        async move {
            let (node, route) =
                hospital_ingest::cluster::Cluster::start(&o, writer, 16, stop.clone())
                    .await
                    .unwrap();
            (node, route, writes, stop)
        }
    };
    let (_x, route_x, mut writes_x, stop_x) = node("x").await;
    let (_y, route_y, mut writes_y, _stop_y) = node("y").await;
    // X hears of the vehicle first and takes it; its writer restores it and takes frame 0.
    route_x.send(frame_cmd("amb-9", 0).0).await.unwrap();
    match next(&mut writes_x).await {
        WriterCmd::Adopt { done, .. } => done.send(Ok(())).unwrap(),
        other => panic!("expected the adoption, got {:?}", other.vehicle()),
    }
    assert!(matches!(next(&mut writes_x).await, WriterCmd::Frame { frame, .. } if frame.seq == 0));
    // Frame 1 reaches Y, which forwards it to X; X's writer holds it: nothing is durable, the
    // forward waits.
    let (cmd, mut ack_1) = frame_cmd("amb-9", 1);
    route_y.send(cmd).await.unwrap();
    let held = next(&mut writes_x).await;
    assert!(matches!(&held, WriterCmd::Frame { frame, .. } if frame.seq == 1));
    // X goes away: it stops serving forwards (its frame 1 is never answered).
    stop_x.cancel();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let gone = Instant::now();
    // Frame 2 reaches Y: no responder at X, Y takes the vehicle over; frame 1 is asked again.
    route_y.send(frame_cmd("amb-9", 2).0).await.unwrap();
    let mut seqs = std::collections::BTreeSet::new();
    while seqs.len() < 2 {
        match next(&mut writes_y).await {
            WriterCmd::Adopt { done, .. } => done.send(Ok(())).unwrap(),
            WriterCmd::Frame { frame, ack, .. } => {
                seqs.insert(frame.seq);
                // Durable (frame 2's bearer is not watched).
                let _ = ack.try_send((frame.stream_id, frame.seq));
            }
            WriterCmd::Streams { .. } => panic!("no Hello was sent"),
        }
    }
    let waited = gone.elapsed();
    eprintln!(
        "frame 1, waiting on the owner that went away, reached the new owner {waited:?} later"
    );
    assert_eq!(seqs, [1, 2].into());
    // Its acknowledgement goes back to the bearer that brought it.
    assert_eq!(ack_1.recv().await, Some((0, 1)));
    // Well inside the 60 s request timeout (it takes milliseconds; 20 s bounds each step).
    assert!(waited < Duration::from_secs(30), "{waited:?}");
    drop((held, route_x, writes_x));
}
