//! `loadtest blast`, `loadtest codec` and `loadtest versus` end to end, through the binary.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

const EXE: &str = env!("CARGO_BIN_EXE_loadtest");

/// Runs `loadtest ARGS --report FILE` (bounded in time), checks it succeeded and returns its
/// JSON report.
async fn report_of(args: &[&str]) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let out = tokio::process::Command::new(EXE)
        .args(args)
        .arg("--report")
        .arg(&report)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(300), out)
        .await
        .expect("the command finishes")
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap()
}

fn data(path: &str) -> String {
    format!("{}/../data/{path}", env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_blast_sees_every_frame_once_at_the_subscriber() {
    let ecg = data("ecg/s0010_re");
    let r = report_of(&[
        "blast",
        "--vehicles",
        "8",
        "--duration",
        "3s",
        "--drain",
        "60s",
        "--ecg",
        &ecg,
    ])
    .await;
    let sent = r["frames_sent"].as_u64().unwrap();
    // 8 vehicles x 3 s of 40 ms ECG frames (75 each), plus vitals and position once a
    // second; a busy machine may send a few less, never none.
    assert!(sent >= 8 * 50, "{r}");
    assert_eq!(r["frames_received"].as_u64(), Some(sent), "{r}");
    assert_eq!(r["frames_missing"], 0, "{r}");
    assert_eq!(r["missing_acknowledged"], 0, "{r}");
    assert_eq!(r["duplicates"], 0, "{r}");
    assert_eq!(r["send_errors"], 0, "{r}");
    let classes: u64 = ["ecg", "vitals", "location"]
        .iter()
        .map(|c| r["latency"][c][0].as_u64().unwrap())
        .sum();
    assert_eq!(classes, sent, "every frame's latency is measured once: {r}");
    for c in ["ecg", "vitals", "location"] {
        let (all, ingest) = (&r["latency"][c], &r["latency_after_receipt"][c]);
        assert_eq!(all[0], ingest[0], "{r}");
        // The ingest's part is a part: it cannot exceed the whole.
        let max = |l: &serde_json::Value| l[1]["max_ms"].as_f64().unwrap();
        assert!(max(ingest) > 0.0 && max(ingest) <= max(all) + 0.01, "{r}");
    }
    assert!(r["ingest_peak_rss_bytes"].as_u64().unwrap() > 0, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_codec_report_checks_every_frame_and_meets_the_size_bounds() {
    let (r100, s0010, mixed) = (
        data("ecg/100"),
        data("ecg/s0010_re"),
        data("ecg-multirate/mixedsignals"),
    );
    let r = report_of(&[
        "codec", "--runs", "1", "--record", &r100, "--record", &s0010, "--record", &mixed,
    ])
    .await;
    // Sizes are deterministic (the timings are not, and are not judged here). Bounds from
    // the issue that asked for the codec, on 40 ms frames each decodable on its own.
    let ratio = |list: &str, suffix: &str| {
        r[list]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"].as_str().unwrap().ends_with(suffix))
            .map(|s| s["lpc1_ratio"].as_f64().unwrap())
            .unwrap_or_else(|| panic!("{suffix} in {list}: {r}"))
    };
    assert!(ratio("streams", "ecg/100") <= 0.40, "{r}");
    assert!(ratio("streams", "ecg/s0010_re") <= 0.42, "{r}");
    assert!(
        ratio("records", "mixedsignals (whole record)") <= 0.60,
        "{r}"
    );
    for s in r["streams"].as_array().unwrap() {
        assert!(
            s["lpc1_bytes"].as_u64().unwrap() < s["varint_bytes"].as_u64().unwrap(),
            "{s}"
        );
    }
}

/// `loadtest versus`: the ingest and a real nats-server (TLS, JetStream file storage, fsync
/// per acknowledgement and lazy) take the same short fleet one after the other; every system
/// stores and delivers every frame once, and the report prices each per stored frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versus_runs_the_same_fleet_through_the_ingest_and_jetstream() {
    let ecg = data("ecg/s0010_re");
    let r = report_of(&[
        "versus",
        "--vehicles",
        "4",
        "--duration",
        "3s",
        "--drain",
        "60s",
        "--ecg",
        &ecg,
    ])
    .await;
    let results = r["results"].as_array().unwrap();
    let systems: Vec<&str> = results
        .iter()
        .map(|s| s["system"].as_str().unwrap())
        .collect();
    assert_eq!(
        systems,
        ["ingest", "jetstream-fsync", "jetstream-lazy"],
        "{r}"
    );
    for s in results {
        let sent = s["frames_sent"].as_u64().unwrap();
        // 4 vehicles x 3 s: 75 ECG frames each plus vitals and position once a second; a
        // busy machine may send a few less, never none.
        assert!(sent >= 4 * 50, "{s}");
        assert_eq!(s["frames_stored"].as_u64(), Some(sent), "{s}");
        assert_eq!(s["frames_delivered"].as_u64(), Some(sent), "{s}");
        assert_eq!(s["missing_acknowledged"], 0, "{s}");
        assert_eq!(s["duplicates"], 0, "{s}");
        let cpu = s["server_cpu_seconds"].as_f64().unwrap();
        let per_frame = s["server_cpu_per_stored_frame_us"].as_f64().unwrap();
        assert!(cpu > 0.0, "{s}");
        assert!(
            (per_frame - cpu * 1e6 / sent as f64).abs() < 1e-6 * per_frame.max(1.0),
            "{s}"
        );
        assert!(
            s["server_peak_rss_bytes"].as_u64().unwrap() > 1_000_000,
            "{s}"
        );
        // The same frames for every system: the same mean size (within the few frames a
        // busy machine may send less).
        let mean = |s: &serde_json::Value| {
            s["frame_bytes_sent"].as_f64().unwrap() / s["frames_sent"].as_f64().unwrap()
        };
        assert!((mean(s) / mean(&results[0]) - 1.0).abs() < 0.05, "{s}");
    }
    for other in ["jetstream-fsync", "jetstream-lazy"] {
        assert!(r["ingest_cpu_ratio"][other].as_f64().unwrap() > 0.0, "{r}");
    }
    assert!(
        r["nats_server_version"]
            .as_str()
            .unwrap()
            .starts_with("nats-server: v2."),
        "{r}"
    );
}
