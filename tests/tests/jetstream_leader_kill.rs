//! The JetStream stream leader SIGKILLed while an agent streams (issue 13): the log elects a
//! new leader (seconds, Raft election timeouts) and nothing acknowledged is lost; live ECG at
//! a subscriber keeps flowing meanwhile (measured: the longest silence); a subscriber that
//! reconnects with its cursor across the change sees every record once.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hospital_ingest::Ingest;
use relay_e2e::nats::{Cluster, ingest_on};
use relay_e2e::*;
use tokio::time::Instant;
use vehicle_agent::Agent;

/// Serialized: each test runs 3 NATS servers, an ingest and an agent on the 2-core machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_stream_leader_loses_nothing_and_live_ecg_keeps_flowing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let mut nats = Cluster::start(&pki, &work.path().join("nats"), 3).await;
    let cfg = ingest_on(&nats, &pki, work.path(), "leader");
    let ingest = Ingest::start(cfg).await.unwrap();
    let agent = Agent::start(s0010_agent(&pki, "amb-2", ingest.quic_addr))
        .await
        .unwrap();

    // Two early subscribers: one stays connected (the live gap is measured there); the
    // other's connection breaks once the leader is dead while it holds frames not yet
    // durable, and it resumes with its cursor and those frames.
    let url = format!("https://{}", ingest.grpc_addr);
    let complete =
        |c: &Collected| c.waveform_samples("amb-2") >= S0010_SAMPLES && c.resume.held_frames() == 0;
    let watching = {
        let (url, tls, out) = (
            url.clone(),
            pki.subscriber("ed-console"),
            work.path().join("wfdb-a"),
        );
        tokio::spawn(async move {
            collect_early_until(
                || url.clone(),
                &tls,
                &out,
                Duration::from_secs(240),
                |_| false,
                complete,
            )
            .await
        })
    };
    let killed_flag = Arc::new(AtomicBool::new(false));
    let hung_up = Arc::new(AtomicBool::new(false));
    let resuming = {
        let (url, tls, out) = (
            url.clone(),
            pki.subscriber("ed-2"),
            work.path().join("wfdb-b"),
        );
        let (k, h) = (killed_flag.clone(), hung_up.clone());
        tokio::spawn(async move {
            collect_early_until(
                || url.clone(),
                &tls,
                &out,
                Duration::from_secs(240),
                move |c| {
                    k.load(Ordering::SeqCst)
                        && c.resume.held_frames() > 0
                        && !h.swap(true, Ordering::SeqCst)
                },
                complete,
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    let leader = nats
        .stream_leader("LOG_leader")
        .await
        .expect("the log stream has a leader");
    let killed = Instant::now();
    nats.kill(leader).await;
    killed_flag.store(true, Ordering::SeqCst);
    let watched = watching.await.unwrap();
    let resumed = resuming.await.unwrap();

    let arrivals: Vec<Instant> = watched
        .waveforms
        .iter()
        .map(|w| w.at)
        .filter(|&t| t >= killed - Duration::from_millis(500))
        .collect();
    let longest = arrivals
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    eprintln!(
        "stream leader SIGKILLed: longest live ECG silence at a subscriber {longest:?} \
         ({} of its frames provisional, {} reconnects); the resuming subscriber: {} frames \
         provisional, {} reconnects, {} duplicates",
        watched.provisional,
        watched.reconnects,
        resumed.provisional,
        resumed.reconnects,
        resumed.duplicates,
    );
    assert!(
        hung_up.load(Ordering::SeqCst),
        "resumed holding early frames"
    );
    for c in [&watched, &resumed] {
        assert!(c.provisional > 0, "frames came early");
        assert_eq!(
            c.confirmed, c.provisional,
            "every early frame confirmed once durable"
        );
        assert_eq!(c.unknown_confirmations, 0);
        assert_eq!(c.duplicates, 0);
        assert_eq!(c.gaps, c.gaps_closed, "every gap closed");
    }
    assert_bit_exact(watched, "amb-2", "s0010_re");
    assert_bit_exact(resumed, "amb-2", "s0010_re");
    assert!(
        longest < Duration::from_secs(2),
        "live ECG stalled {longest:?}"
    );
    agent.shutdown().await.unwrap();
    ingest.shutdown().await.unwrap();
}

/// Every NATS server SIGKILLed while an agent streams, for longer than a store request may
/// take, then restarted: the ingest's commits fail meanwhile (nothing acknowledged), its
/// writer waits for the log to answer again, then closes the vehicle's connections so the
/// agent sends every unacknowledged frame again: the subscriber ends up with the whole
/// record, bit-exact, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_every_nats_server_mid_stream_loses_nothing_once_they_are_back() {
    let _one = ONE_AT_A_TIME.lock().await;
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let mut nats = Cluster::start(&pki, &work.path().join("nats"), 3).await;
    let mut cfg = ingest_on(&nats, &pki, work.path(), "outage");
    cfg.jetstream.request_timeout = Duration::from_secs(2);
    let ingest =
        spawn_ingest_child(env!("CARGO_BIN_EXE_e2e-hospital-ingest"), cfg, work.path()).await;
    let agent = Agent::start(s0010_agent(&pki, "amb-2", ingest.quic))
        .await
        .unwrap();
    let subscriber = collect_s0010(
        format!("https://{}", ingest.grpc),
        pki.subscriber("ed-console"),
        work.path().join("wfdb"),
        "amb-2",
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    for i in 0..3 {
        nats.kill(i).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    for i in 0..3 {
        nats.start_node(i);
    }
    let collected = subscriber.await.unwrap();
    let metrics = http_get(ingest.metrics.unwrap(), "/metrics").await.1;
    let (errors, connections) = (
        metric_value(&metrics, "relay_ingest_store_errors_total"),
        metric_value(&metrics, "relay_ingest_connections_total"),
    );
    eprintln!(
        "every NATS server SIGKILLed for 5 s: {errors} store errors, {connections} bearer \
         connections in all; the subscriber reconnected {} times, {} gaps, all closed: {}",
        collected.reconnects,
        collected.gaps,
        collected.gaps == collected.gaps_closed
    );
    assert!(errors >= 1.0, "commits failed during the outage");
    // One bearer: its first connection, then the one after the ingest closed it.
    assert!(
        connections >= 2.0,
        "the agent reconnected to send its unacknowledged frames again"
    );
    assert_eq!(collected.duplicates, 0);
    assert_eq!(collected.gaps, collected.gaps_closed, "every gap closed");
    assert_bit_exact(collected, "amb-2", "s0010_re");
    agent.shutdown().await.unwrap();
}
