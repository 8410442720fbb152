//! kill -9 of the ingest mid-stream, restart on the same store: no sample is lost or duplicated
//! (the agent streams over two bearers).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use relay_e2e::*;
use vehicle_agent::Agent;
use vehicle_agent::config::BearerConfig;

struct IngestProcess {
    child: tokio::process::Child,
}

fn spawn_ingest(
    pki: &Pki,
    store: &std::path::Path,
    quic: u16,
    grpc: u16,
    log: &std::path::Path,
) -> IngestProcess {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut cfg = hospital_ingest::IngestConfig::default();
    cfg.quic.listen = format!("127.0.0.1:{quic}").parse().unwrap();
    cfg.grpc.listen = format!("127.0.0.1:{grpc}").parse().unwrap();
    cfg.store.path = store.to_owned();
    cfg.tls = hospital_ingest::config::Tls::from_dev_dir(pki.path());
    cfg.grpc.access_policy = Some(pki.path().join(relay_devcerts::ACCESS_POLICY));
    let config = store.with_extension("toml");
    std::fs::write(&config, cfg.to_toml().unwrap()).unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_e2e-hospital-ingest"))
        .arg("--config")
        .arg(&config)
        .arg("--allow-dev-pki")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    IngestProcess { child }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_killed_twice_mid_stream_loses_no_sample() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let store = work.path().join("store.redb");
    let log = work.path().join("ingest.log");
    let (quic, grpc) = free_ports();
    let mut ingest = spawn_ingest(&pki, &store, quic, grpc, &log);

    // Record 100 at 100x: about 18 s of streaming.
    let mut sources = vec![replay("100", 100.0)];
    sources.extend(vitals_and_gps());
    let mut cfg = agent_config(
        pki.path(),
        "amb-1",
        format!("127.0.0.1:{quic}").parse().unwrap(),
        sources,
    );
    cfg.framing.frame = Duration::from_millis(200);
    // Two bearers, both to the ingest that dies: each must find the restarted one.
    cfg.bearers = ["wan0", "wan1"]
        .map(|n| BearerConfig::new(n, "127.0.0.1:0".parse().unwrap()))
        .to_vec();
    let agent = Agent::start(cfg).await.unwrap();

    let progress = Arc::new(AtomicU64::new(0));
    let p = progress.clone();
    let tls = pki.subscriber("ed-console");
    let out = work.path().join("wfdb");
    let subscriber = tokio::spawn(async move {
        collect_until(
            move || format!("https://127.0.0.1:{grpc}"),
            &tls,
            &out,
            Duration::from_secs(300),
            move |c| {
                let n = c.waveform_samples("amb-1");
                p.store(n, Ordering::Relaxed);
                n >= 650_000
            },
        )
        .await
    });

    for threshold in [120_000, 360_000] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while progress.load(Ordering::Relaxed) < threshold {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no progress; see {}",
                log.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ingest.child.start_kill().unwrap(); // SIGKILL: no graceful path runs
        ingest.child.wait().await.unwrap();
        let at_kill = progress.load(Ordering::Relaxed);
        assert!(at_kill < 650_000, "the kill must happen mid-stream");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        ingest = spawn_ingest(&pki, &store, quic, grpc, &log);
    }

    let collected = subscriber.await.unwrap();
    assert!(
        collected.reconnects >= 2,
        "the subscriber resumed from its cursor after each kill"
    );
    assert_eq!(
        collected.duplicates, 0,
        "exactly once to the subscriber across restarts"
    );
    assert_bit_exact(collected, "amb-1", "100");
    agent.shutdown().await.unwrap();
    ingest.child.start_kill().unwrap();
}
