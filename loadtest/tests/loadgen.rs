//! The `loadtest` binary end to end: emulator CLI, and a short load run with its JSON report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UdpSocket;

const EXE: &str = env!("CARGO_BIN_EXE_loadtest");

/// Runs `loadtest run ARGS --report FILE` (bounded in time), checks it succeeded, and returns
/// what it printed and its JSON report.
async fn load_run(args: &[&str]) -> (String, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let out = tokio::process::Command::new(EXE)
        .arg("run")
        .args(args)
        .arg("--report")
        .arg(&report)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(300), out)
        .await
        .expect("load run finishes")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    (stdout, r)
}

/// Every class of `phase`: nothing lost or repeated, and each of `subscribers` saw every
/// frame exactly once.
fn assert_every_frame_once(phase: &serde_json::Value, subscribers: u64) {
    let name = phase["name"].as_str().unwrap();
    for class in ["waveform", "vitals", "location"] {
        let c = &phase["classes"][class];
        assert_eq!(c["frames_lost"], 0, "{name}/{class}: {c}");
        assert_eq!(c["samples_lost"], 0, "{name}/{class}: {c}");
        assert_eq!(c["duplicates"], 0, "{name}/{class}: {c}");
        assert_eq!(c["frames_produced"], c["frames_received"], "{name}/{class}");
        assert_eq!(
            c["deliveries"].as_u64().unwrap(),
            subscribers * c["frames_received"].as_u64().unwrap(),
            "{name}/{class}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_load_run_delivers_everything_and_writes_its_report() {
    let (stdout, r) = load_run(&[
        "--vehicles",
        "3",
        "--subscribers",
        "2",
        "--duration",
        "8s",
        "--drain-timeout",
        "90s",
        "--bearer",
        "rate=4mbit,delay=30ms,loss=2%",
        "--bearer",
        "rate=4mbit,delay=60ms",
    ])
    .await;
    assert!(
        stdout.contains("== relay") && stdout.contains("== baseline"),
        "{stdout}"
    );
    assert!(r["machine"]["cores"].as_u64().unwrap() >= 1);
    assert_eq!(r["config"]["vehicles"], 3);
    assert!(r["command_line"].as_array().unwrap().len() > 5);
    let phases = r["phases"].as_array().unwrap();
    assert_eq!(phases.len(), 2);
    for p in phases {
        let name = p["name"].as_str().unwrap();
        // Two subscribers each saw every frame once.
        assert_every_frame_once(p, 2);
        let ecg = &p["classes"]["waveform"];
        // 3 vehicles x 8 s x 25 frames/s, give or take start-up.
        assert!(ecg["frames_produced"].as_u64().unwrap() >= 500, "{ecg}");
        // The first bearer's 30 ms propagation delay is the floor of both latency and oracle.
        assert!(ecg["latency"]["p50_ms"].as_f64().unwrap() >= 30.0, "{ecg}");
        let oracle_p50 = ecg["oracle"]["p50_ms"].as_f64().unwrap();
        assert!((29.0..=31.0).contains(&oracle_p50), "{ecg}");
        assert_eq!(ecg["oracle_on_time_fraction"], 1.0);
        assert!(p["wire_bytes_per_payload_byte"].as_f64().unwrap() > 0.1);
        assert!(p["links"]["up"]["dropped_random_loss"].as_u64().unwrap() > 0);
        assert!(p["ingest"]["cpu_seconds"].as_f64().unwrap() > 0.0);
        assert!(p["ingest"]["peak_rss_bytes"].as_u64().unwrap() > 1_000_000);
        assert_eq!(p["subscriber_errors"], serde_json::json!([]));
        // Honest vehicles over lossy links raise no security event.
        assert_eq!(
            p["security"]["security_events"],
            serde_json::json!({}),
            "{name}: {}",
            p["security"]
        );
    }
    assert_eq!(phases[0]["bearers"].as_array().unwrap().len(), 2);
    assert_eq!(phases[1]["bearers"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_emulate_subcommand_relays_and_obeys_cut_and_restore() {
    let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let target = echo.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = echo.recv_from(&mut buf).await {
            let _ = echo.send_to(&buf[..n], from).await;
        }
    });
    let mut child = tokio::process::Command::new(EXE)
        .args([
            "emulate",
            "--listen",
            "127.0.0.1:0",
            "--bearer",
            "rate=10mbit,delay=5ms",
        ])
        .arg("--target")
        .arg(target.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // "link 0: 127.0.0.1:PORT -> ..."
    let addr: std::net::SocketAddr = first.split_whitespace().nth(2).unwrap().parse().unwrap();
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let ping = |i: u8| {
        let client = &client;
        async move {
            client.send_to(&[i; 64], addr).await.unwrap();
            let mut buf = [0u8; 128];
            tokio::time::timeout(Duration::from_millis(1000), client.recv(&mut buf))
                .await
                .ok()
                .map(|r| buf[..r.unwrap()].to_vec())
        }
    };
    assert_eq!(ping(1).await, Some(vec![1; 64]));
    stdin.write_all(b"cut 0\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(ping(2).await, None);
    stdin.write_all(b"restore 0\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(ping(3).await, Some(vec![3; 64]));
    stdin.write_all(b"quit\n").await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    let mut rest = String::new();
    while let Ok(Some(l)) = lines.next_line().await {
        rest.push_str(&l);
        rest.push('\n');
    }
    assert!(
        rest.contains("link 0: up 3 offered / 2 delivered / 1 dropped"),
        "{rest}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_run_can_target_a_running_ingest() {
    use relay_devcerts::{DevPki, generate};
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    relay_ops::install_crypto_provider();
    generate(
        &pki,
        &DevPki {
            vehicles: vec!["lt-0001".into(), "lt-0002".into()],
            subscribers: vec!["loadtest".into()],
            ..DevPki::default()
        },
    )
    .unwrap();
    let mut cfg = hospital_ingest::IngestConfig::default();
    cfg.quic.listen = "127.0.0.1:0".parse().unwrap();
    cfg.grpc.listen = "127.0.0.1:0".parse().unwrap();
    cfg.tls = hospital_ingest::config::Tls::from_dev_dir(&pki);
    cfg.grpc.access_policy = Some(pki.join(relay_devcerts::ACCESS_POLICY));
    cfg.store.path = dir.path().join("store.redb");
    cfg.allow_dev_pki = true;
    let ingest = hospital_ingest::Ingest::start(cfg).await.unwrap();

    let ingest_arg = format!("{},https://{}", ingest.quic_addr, ingest.grpc_addr);
    let pki_arg = pki.display().to_string();
    let (_, r) = load_run(&[
        "--vehicles",
        "2",
        "--duration",
        "4s",
        "--no-baseline",
        "--bearer",
        "rate=2mbit,delay=10ms",
        "--ingest",
        &ingest_arg,
        "--pki",
        &pki_arg,
    ])
    .await;
    let phases = r["phases"].as_array().unwrap();
    assert_eq!(phases.len(), 1);
    let ecg = &phases[0]["classes"]["waveform"];
    assert!(ecg["frames_produced"].as_u64().unwrap() >= 100, "{ecg}");
    assert_eq!(ecg["frames_lost"], 0);
    // Nobody measured the external ingest's process.
    assert!(phases[0]["ingest"].is_null());
    ingest.shutdown().await.unwrap();
}

/// `--store jetstream`: a 3-node NATS cluster and two ingest nodes started by the run; 4 s in,
/// the first ingest node is SIGKILLed. Its bearers fail over to the other node, its
/// subscriber resumes there from its cursor: nothing lost, nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_load_run_survives_the_kill_of_an_ingest_node() {
    let (stdout, r) = load_run(&[
        "--vehicles",
        "3",
        "--subscribers",
        "2",
        "--duration",
        "10s",
        "--no-baseline",
        "--store",
        "jetstream",
        "--kill-node",
        "4s",
        "--bearer",
        "rate=4mbit,delay=30ms",
        "--bearer",
        "rate=4mbit,delay=60ms",
    ])
    .await;
    assert!(
        stdout.contains("SIGKILL of ingest node 1 at 4 s"),
        "{stdout}"
    );
    assert_eq!(r["config"]["store"], "jetstream");
    assert_eq!(r["config"]["nats_sync_interval"], "always");
    let p = &r["phases"][0];
    assert!(
        p["store"]
            .as_str()
            .unwrap()
            .starts_with("jetstream: 3 NATS nodes, R3"),
        "{}",
        p["store"]
    );
    // Both subscribers (one of them moved) saw every frame once.
    assert_every_frame_once(p, 2);
    let ecg = &p["classes"]["waveform"];
    assert!(ecg["frames_produced"].as_u64().unwrap() >= 500, "{ecg}");
    // Live ECG kept flowing across the kill: a generous bound (the figure goes to the README).
    let gap = ecg["gap_around_cut_ms"].as_f64().unwrap();
    assert!(gap < 5_000.0, "{ecg}");
    // The subscriber of the killed node moved to the other one.
    assert!(p["subscriber_reconnects"].as_u64().unwrap() >= 1, "{p}");
    assert_eq!(p["subscriber_errors"], serde_json::json!([]));
    // Every process was measured: two ingest nodes (the killed one until its kill), three NATS
    // nodes.
    let nodes = p["ingest_nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2, "{p}");
    let nats = p["nats"].as_array().unwrap();
    assert_eq!(nats.len(), 3, "{p}");
    for u in nodes.iter().chain(nats) {
        assert!(u["cpu_seconds"].as_f64().unwrap() > 0.0, "{u}");
        assert!(u["peak_rss_bytes"].as_u64().unwrap() > 1_000_000, "{u}");
    }
    assert_eq!(
        p["security"]["security_events"],
        serde_json::json!({}),
        "{}",
        p["security"]
    );
}

#[tokio::test]
async fn contradictory_cluster_flags_are_refused_with_a_reason() {
    for (args, reason) in [
        (
            &["--ingest-nodes", "2"][..],
            "several nodes need --store jetstream",
        ),
        (&["--kill-node", "5s"][..], "--kill-node needs two or more"),
        (
            &[
                "--store",
                "jetstream",
                "--ingest-nodes",
                "1",
                "--kill-node",
                "5s",
            ][..],
            "--kill-node needs two or more",
        ),
    ] {
        let out = tokio::process::Command::new(EXE)
            .args(["run", "--vehicles", "1", "--duration", "1s"])
            .args(args)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr.contains(reason), "{args:?}: {stderr}");
    }
    let out = tokio::process::Command::new(EXE)
        .args(["run", "--ingest", "127.0.0.1:4433", "--pki", "/nonexistent"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("expected QUIC_ADDRESS,GRPC_URL"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
