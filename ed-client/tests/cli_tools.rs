//! ed-monitor, the shipped command-line subscriber, exports a stored recording as a
//! bit-exact WFDB record and keeps the cursor to resume from.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::Duration;

use ed_client::client::{ClientTls, connect};
use hospital_ingest::{Ingest, IngestConfig};
use relay_proto::model::{
    StreamKind, SubscribeRequest, subscribe_request::Start, subscribe_response::Record,
};
use vehicle_agent::config::{BearerConfig, SourceConfig};
use vehicle_agent::{Agent, AgentConfig};

fn data(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../data/ecg")
        .join(name)
}

/// ed-monitor towards `url` as ed-console of the development PKI in `certs`.
fn ed_monitor(url: &str, certs: &Path) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_ed-monitor"));
    c.arg("--server")
        .arg(url)
        .arg("--ca")
        .arg(certs.join("hospital-ca.pem"))
        .arg("--cert")
        .arg(certs.join("ed-console.pem"))
        .arg("--key")
        .arg(certs.join("ed-console.key"));
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devcerts_and_ed_monitor_export_a_recording_bit_exact() {
    let work = tempfile::tempdir().unwrap();
    let certs = work.path().join("certs");
    relay_devcerts::generate(
        &certs,
        &relay_devcerts::DevPki {
            vehicles: vec!["amb-9".into()],
            subscribers: vec!["ed-console".into()],
            ..relay_devcerts::DevPki::default()
        },
    )
    .unwrap();

    let mut cfg = IngestConfig::default();
    cfg.quic.listen = "127.0.0.1:0".parse().unwrap();
    cfg.grpc.listen = "127.0.0.1:0".parse().unwrap();
    cfg.tls = hospital_ingest::config::Tls::from_dev_dir(&certs);
    cfg.grpc.access_policy = Some(certs.join(relay_devcerts::ACCESS_POLICY));
    cfg.store.path = work.path().join("store.redb");
    cfg.allow_dev_pki = true;
    let ingest = Ingest::start(cfg).await.unwrap();

    let mut a = AgentConfig {
        vehicle_id: "amb-9".into(),
        allow_dev_pki: true,
        ..AgentConfig::default()
    };
    a.ingest.address = ingest.quic_addr;
    a.bearers = vec![BearerConfig::new("wan0", "127.0.0.1:0".parse().unwrap())];
    a.spool.path = work.path().join("spool.redb");
    a.tls.ca_cert = certs.join("hospital-ca.pem");
    a.tls.cert = certs.join("amb-9.pem");
    a.tls.key = certs.join("amb-9.key");
    a.sources = vec![
        SourceConfig::Wfdb {
            record: data("s0010_re"),
            speed: 20.0,
            r#loop: false,
            name: "ecg".into(),
        },
        SourceConfig::SyntheticVitals {
            interval: Duration::from_millis(100),
        },
    ];
    let agent = Agent::start(a).await.unwrap();

    // Wait until the whole record is stored: the last frame carries sample 38_399.
    let url = format!("https://{}", ingest.grpc_addr);
    let tls = ClientTls::from_dev_dir(&certs, "ed-console");
    let mut client = connect(&url, &tls).await.unwrap();
    let req = SubscribeRequest {
        vehicle_ids: vec![],
        kinds: vec![],
        start: Some(Start::AfterCursor(0)),
        ..Default::default()
    };
    let mut stream = client.subscribe(req).await.unwrap().into_inner();
    let mut frames = 0;
    let total_frames = 38_400_u64.div_ceil(40);
    while frames < total_frames {
        let m = tokio::time::timeout(Duration::from_secs(60), stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Some(Record::Data(d)) = &m.record
            && d.stream
                .as_ref()
                .is_some_and(|s| s.kind == StreamKind::Waveform as i32)
        {
            frames += 1;
        }
    }
    agent.shutdown().await.unwrap();

    let export = work.path().join("export");
    let cursor_file = work.path().join("ed.cursor");
    let mut export_wfdb = ed_monitor(&url, &certs);
    let out = export_wfdb
        .args([
            "--after-cursor",
            "0",
            "--exit-after-sync",
            "--plain",
            "--wfdb-dir",
        ])
        .arg(&export)
        .arg("--cursor-file")
        .arg(&cursor_file)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("wrote "), "{stdout}");

    let hea = std::fs::read_dir(&export)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "hea"))
        .unwrap();
    let got = relay_wfdb::read_record(&hea.with_extension("")).unwrap();
    let orig = relay_wfdb::read_record(&data("s0010_re")).unwrap();
    assert_eq!(got.frames, orig.frames);
    assert!(got.samples == orig.samples);
    for (g, o) in got.header.signals.iter().zip(&orig.header.signals) {
        assert_eq!(g.checksum, o.checksum);
    }
    let cursor: u64 = std::fs::read_to_string(&cursor_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(cursor > 0, "the cursor to resume from is kept");

    // The same recording as a FHIR R4 Bundle.
    let bundle = work.path().join("bundle.json");
    let mut export_fhir = ed_monitor(&url, &certs);
    let out = export_fhir
        .args([
            "--vehicle",
            "amb-9",
            "--after-cursor",
            "0",
            "--exit-after-sync",
            "--plain",
            "--fhir",
        ])
        .arg(&bundle)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    check_fhir_bundle(&bundle, &orig);
    ingest.shutdown().await.unwrap();
}

/// The Bundle validates with the independent `fhir.resources` package (R4B models), and its
/// SampledData give back every physical value of `orig` within one quantisation step.
fn check_fhir_bundle(bundle: &Path, orig: &relay_wfdb::Record) {
    let out = std::process::Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fhir/validate.py"
        ))
        .arg(bundle)
        .output()
        .expect("python3 (tests/run.sh installs fhir.resources)");
    assert!(
        out.status.success(),
        "fhir.resources refused the bundle: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let counts: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(counts["Device"], 1, "{counts}");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(bundle).unwrap()).unwrap();
    let resources: Vec<&serde_json::Value> = json["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["resource"])
        .collect();
    let coded = |r: &serde_json::Value, code: &str| {
        r["code"]["coding"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["code"] == code))
    };
    // Vitals: heart rate with LOINC and MDC codes, blood pressure as a panel.
    let hr = resources
        .iter()
        .find(|r| coded(r, "8867-4"))
        .expect("a heart rate");
    assert!(coded(hr, "147842"), "{hr}");
    assert_eq!(hr["valueQuantity"]["system"], "http://unitsofmeasure.org");
    let bp = resources
        .iter()
        .find(|r| coded(r, "85354-9"))
        .expect("a BP panel");
    assert!(bp["component"].as_array().unwrap().len() >= 2, "{bp}");
    // Waveforms: every sample of every lead, in 10 s windows.
    let nsig = orig.header.signals.len();
    let mut seen = 0usize;
    for r in resources
        .iter()
        .filter(|r| r["component"][0]["valueSampledData"].is_object())
    {
        let first: usize = r["identifier"][0]["value"]
            .as_str()
            .unwrap()
            .rsplit('/')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let components = r["component"].as_array().unwrap();
        assert_eq!(components.len(), nsig);
        for (c, comp) in components.iter().enumerate() {
            let sd = &comp["valueSampledData"];
            let (origin, factor) = (
                sd["origin"]["value"].as_f64().unwrap(),
                sd["factor"].as_f64().unwrap(),
            );
            let sig = &orig.header.signals[c];
            for (i, token) in sd["data"].as_str().unwrap().split(' ').enumerate() {
                let value: f64 = token.parse().unwrap_or_else(|_| panic!("sample {token:?}"));
                let stored = orig.samples[(first + i) * nsig + c];
                let physical = (f64::from(stored) - f64::from(sig.baseline)) / sig.gain;
                assert!(
                    (origin + factor * value - physical).abs() <= 1.0 / sig.gain,
                    "lead {c} sample {}",
                    first + i
                );
                if c == 0 {
                    seen += 1;
                }
            }
        }
    }
    assert_eq!(seen, orig.frames, "every sample exported once");
}
