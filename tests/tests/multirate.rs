//! Multi-rate WFDB records (issue 14): signals at different samples per frame, FLAC-compressed
//! files and skew cross agent -> QUIC -> ingest -> gRPC -> WFDB export bit-exactly, checked by
//! the Python `wfdb` package (PhysioNet's reader, which nobody here wrote).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use hospital_ingest::Ingest;
use relay_e2e::*;
use vehicle_agent::Agent;
use vehicle_agent::config::SourceConfig;

fn multirate(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../data/ecg-multirate")
        .join(name)
}

/// (vehicle, record, samples of all its signals together, checksums equal to the original's)
const RECORDS: [(&str, &str, u64, bool); 3] = [
    // 14,400 frames of 4 + 2 + 1 samples per signal group (FLAC, three files).
    ("amb-1", "mixedsignals", 14_400 * 7, true),
    // 4,000 frames of 1 + 2 samples.
    ("amb-2", "test01_00s_frame", 4_000 * 3, true),
    // The same with skew: the last 3 samples of ECG_1 lie past the file's end (invalid).
    ("amb-3", "test01_00s_skewframe", 4_000 * 3, false),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_rate_records_cross_the_relay_bit_exact_as_python_wfdb_reads_them() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let ingest = Ingest::start(ingest_config(&pki, &work.path().join("store.redb")))
        .await
        .unwrap();
    let mut agents = Vec::new();
    for (vehicle, name, _, _) in RECORDS {
        // mixedsignals is 230 s long: 20x makes it about 12 s.
        let source = SourceConfig::Wfdb {
            record: multirate(name),
            speed: 20.0,
            r#loop: false,
            name: "monitor".into(),
        };
        let mut cfg = agent_config(pki.path(), vehicle, ingest.quic_addr, vec![source]);
        cfg.framing.frame = Duration::from_millis(200);
        agents.push(Agent::start(cfg).await.unwrap());
    }
    let url = format!("https://{}", ingest.grpc_addr);
    let collected = collect_until(
        || url.clone(),
        &pki.subscriber("ed-console"),
        &work.path().join("wfdb"),
        Duration::from_secs(240),
        |c| {
            RECORDS
                .iter()
                .all(|(v, _, samples, _)| c.waveform_samples(v) >= *samples)
        },
    )
    .await;
    assert_eq!(collected.duplicates, 0);
    // One stream per rate group: three for mixedsignals, two for the others.
    let mut streams: Vec<String> = collected.sink.streams().map(|s| s.0.clone()).collect();
    streams.sort();
    assert_eq!(
        streams,
        [
            "amb-1", "amb-1", "amb-1", "amb-2", "amb-2", "amb-3", "amb-3"
        ]
    );
    let written = collected.sink.finish().unwrap();
    assert_eq!(
        written.len(),
        3,
        "one multi-rate record per vehicle: {written:?}"
    );

    let mut args = Vec::new();
    for (vehicle, name, _, same_checksums) in RECORDS {
        let (_, hea) = written.iter().find(|(id, _)| id.0 == vehicle).unwrap();
        // Our own reader first, then the independent one.
        let got = relay_wfdb::read_record(&hea.with_extension("")).unwrap();
        let orig = relay_wfdb::read_record(&multirate(name)).unwrap();
        assert_eq!(got.frames, orig.frames, "{name}");
        for s in 0..orig.num_signals() {
            assert!(got.signal(s).eq(orig.signal(s)), "{name} signal {s}");
        }
        args.push(multirate(name).display().to_string());
        args.push(hea.with_extension("").display().to_string());
        if same_checksums {
            args.push("--same-checksums".into());
        }
    }
    let out = std::process::Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/wfdb/check_export.py"))
        .args(&args)
        .output()
        .expect("python3 (tests/run.sh installs the wfdb package)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python wfdb: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("OK ")).count(),
        3,
        "{stdout}"
    );
    assert!(
        stdout.contains("samples per frame [4, 4, 4, 2, 2, 1]"),
        "{stdout}"
    );

    for a in agents {
        a.shutdown().await.unwrap();
    }
    ingest.shutdown().await.unwrap();
}
