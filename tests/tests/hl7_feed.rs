//! The hospital HL7 feed (issue 14): PCD-01 ORU^R01 over MLLP to an integration engine, parsed
//! back by the Python `hl7` package (tests/hl7/receiver.py); a receiver that dies mid-stream
//! holding an unacknowledged message, and a feed stopped and started again on its state file
//! (then over TLS), lose no message and duplicate no MSH-10.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use ed_client::hl7_feed::{FeedOptions, run};
use hospital_ingest::Ingest;
use relay_e2e::*;
use tokio::io::AsyncBufReadExt;
use tokio_util::sync::CancellationToken;
use vehicle_agent::Agent;

const SECONDS: usize = 16;

async fn receiver(
    port: u16,
    log: &Path,
    die_after: Option<usize>,
    ack_delay: Option<Duration>,
    tls: Option<(&Path, &Path)>,
) -> tokio::process::Child {
    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/hl7/receiver.py"))
        .arg(port.to_string())
        .arg(log);
    if let Some(n) = die_after {
        cmd.arg("--die-after").arg(n.to_string());
    }
    if let Some(d) = ack_delay {
        cmd.arg("--ack-delay").arg(d.as_secs_f64().to_string());
    }
    if let Some((cert, key)) = tls {
        cmd.arg("--tls").arg(cert).arg(key);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 (tests/run.sh installs the hl7 package)");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the receiver starts")
        .unwrap();
    assert_eq!(first.as_deref(), Some("listening"));
    child
}

fn logged(log: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    // Complete lines only: the receiver may be writing the last one.
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

async fn wait_for(log: &Path, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while logged(log).len() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {n} messages",
            logged(log).len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hl7_feed_survives_a_dying_receiver_and_a_restart_without_loss_or_duplicates() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let ingest = Ingest::start(ingest_config(&pki, &work.path().join("store.redb")))
        .await
        .unwrap();
    // Record 100 (MLII, V5 at 360 Hz) at 4x with vitals: four seconds of signal per second.
    let mut sources = vec![replay("100", 4.0)];
    sources.extend(vitals_and_gps());
    let agent = Agent::start(agent_config(pki.path(), "amb-1", ingest.quic_addr, sources))
        .await
        .unwrap();

    let (_, port) = free_ports();
    let log = work.path().join("received.jsonl");
    // The first receiver dies holding message 6.
    let mut first = receiver(port, &log, Some(5), None, None).await;
    let opts = FeedOptions {
        server: format!("https://{}", ingest.grpc_addr),
        tls: pki.subscriber("ed-console"),
        target: format!("127.0.0.1:{port}"),
        target_tls: None,
        state: work.path().join("feed.json"),
        facility: "TEST-ED".into(),
        ack_timeout: Duration::from_secs(5),
    };
    let stop = CancellationToken::new();
    let feed = tokio::spawn(run(opts.clone(), stop.clone()));
    let status = tokio::time::timeout(Duration::from_secs(60), first.wait())
        .await
        .expect("the receiver dies at message 6")
        .unwrap();
    assert_eq!(status.code(), Some(3));
    assert_eq!(logged(&log).len(), 5);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A slow engine: it acknowledges each message 500 ms after logging it.
    let mut second = receiver(port, &log, None, Some(Duration::from_millis(500)), None).await;
    wait_for(&log, 9).await;
    // The feed itself stops and starts again on its state file, now towards an engine that
    // speaks MLLP over TLS (the development ingest certificate: "localhost", hospital CA).
    // The stop comes while the ninth message waits for its answer: the feed takes it first,
    // so the restarted feed does not send that message again.
    stop.cancel();
    feed.await.unwrap().unwrap();
    second.kill().await.unwrap();
    let (cert, key) = (pki.path().join("ingest.pem"), pki.path().join("ingest.key"));
    let _third = receiver(port, &log, None, None, Some((&cert, &key))).await;
    let tls_opts = FeedOptions {
        target_tls: Some((pki.path().join("hospital-ca.pem"), "localhost".into())),
        ..opts.clone()
    };
    let stop = CancellationToken::new();
    let feed = tokio::spawn(run(tls_opts, stop.clone()));
    wait_for(&log, SECONDS).await;
    stop.cancel();
    feed.await.unwrap().unwrap();

    let messages = logged(&log);
    let ids: Vec<&str> = messages
        .iter()
        .map(|m| m["control_id"].as_str().unwrap())
        .collect();
    let unique: HashSet<&&str> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "an MSH-10 twice: {ids:?}");
    // Every second of the session in order, none missing.
    let windows: Vec<u64> = ids
        .iter()
        .map(|id| id.rsplit('.').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(
        windows,
        (0..windows.len() as u64).collect::<Vec<_>>(),
        "{ids:?}"
    );

    let orig = relay_wfdb::read_record(&record("100")).unwrap();
    for (k, m) in messages.iter().enumerate() {
        assert!(m["patient"].as_str().unwrap().starts_with("amb-1-"));
        let waves = m["waves"].as_array().unwrap();
        assert_eq!(waves.len(), 2, "two leads: {m}");
        for (c, w) in waves.iter().enumerate() {
            assert_eq!(w["rate"].as_f64(), Some(360.0));
            assert_eq!(w["unit"], "mV");
            let values = w["values"].as_array().unwrap();
            assert_eq!(values.len(), 360, "one second at 360 Hz");
            let spec = &orig.header.signals[c];
            for (i, v) in values.iter().enumerate() {
                let stored = (v.as_f64().expect("no sample missing") * spec.gain).round() as i32
                    + spec.baseline;
                assert_eq!(
                    stored,
                    orig.samples[(k * 360 + i) * 2 + c],
                    "second {k} lead {c} sample {i}"
                );
            }
        }
        let numerics = m["numerics"].as_array().unwrap();
        if k > 0 {
            let hr = numerics
                .iter()
                .find(|n| n["codes"]["MDC"] == "147842")
                .unwrap_or_else(|| panic!("heart rate in second {k}: {m}"));
            assert_eq!(hr["codes"]["LN"], "8867-4");
            assert_eq!(
                (hr["unit"].as_str(), hr["unit_system"].as_str()),
                (Some("/min"), Some("UCUM"))
            );
        }
    }
    agent.shutdown().await.unwrap();
    ingest.shutdown().await.unwrap();
}
