//! The README's demo command runs: two ambulances appear with vitals and waveforms.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

#[tokio::test]
async fn demo_shows_both_ambulances_and_writes_their_waveforms() {
    let out_dir = tempfile::tempdir().unwrap();
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_relay-demo"))
        .args([
            "--duration-s",
            "4",
            "--plain",
            "--web-listen",
            "127.0.0.1:0",
            "--wfdb-dir",
        ])
        .arg(out_dir.path())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The web view's address and login are printed.
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("ED web view: https://127.0.0.1:")
                && l.contains("login: demo / ")),
        "{stdout}"
    );
    let last_table: Vec<&str> = stdout
        .lines()
        .rev()
        .filter(|l| l.starts_with("amb-"))
        .take(2)
        .collect();
    assert_eq!(last_table.len(), 2, "{stdout}");
    for line in last_table {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let hr: f64 = cols[1]
            .parse()
            .unwrap_or_else(|_| panic!("no heart rate in {line:?}"));
        assert!((40.0..=200.0).contains(&hr), "{line}");
    }
    let records = std::fs::read_dir(out_dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "hea")
        })
        .count();
    assert_eq!(records, 2, "{stdout}");
}
