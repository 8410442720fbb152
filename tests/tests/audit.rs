//! The access audit over real gRPC, against the ingest as its own process: every call leaves
//! a record naming the client's certificate and the outcome, the log survives SIGKILL and a
//! restart with its chain intact, `audit verify` names the line where one byte was changed,
//! and `audit query --vehicle` tells who read a patient's data.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::Duration;

use hospital_ingest::access::ClientIdentity;
use hospital_ingest::audit::{AuditRecord, Outcome, files_in, query};
use relay_e2e::*;
use relay_proto::model::{ListVehiclesRequest, SubscribeRequest, subscribe_request::Start};
use vehicle_agent::Agent;

const POLICY: &str = r#"
[[rule]]
name = "ed-2: amb-1"
subject_cn = ["ed-2"]
vehicles = ["amb-1"]

[[rule]]
name = "console"
subject_cn = ["ed-console"]
all_vehicles = true
"#;

const EXE: &str = env!("CARGO_BIN_EXE_e2e-hospital-ingest");

fn identity(pki: &Pki, name: &str) -> ClientIdentity {
    let certs = relay_ops::pem::load_certs(&pki.path().join(format!("{name}.pem"))).unwrap();
    ClientIdentity::from_der(certs[0].as_ref()).unwrap()
}

/// Runs `hospital-ingest audit ARGS` and returns (success, stdout + stderr).
fn audit_cli(args: &[&str], dir: &Path) -> (bool, String) {
    let out = std::process::Command::new(EXE)
        .arg("audit")
        .args(args)
        .arg(dir)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// Subscribes live as `name` to `vehicles`, reads `n` messages, and leaves.
async fn read_some(url: &str, pki: &Pki, name: &str, vehicles: &[&str], n: usize) {
    let mut c = ed_client::client::connect(url, &pki.subscriber(name))
        .await
        .unwrap();
    let req = SubscribeRequest {
        vehicle_ids: vehicles.iter().map(|v| (*v).to_owned()).collect(),
        kinds: vec![],
        start: Some(Start::AfterCursor(0)),
        ..Default::default()
    };
    let mut feed = c.subscribe(req).await.unwrap().into_inner();
    for _ in 0..n {
        tokio::time::timeout(Duration::from_secs(10), feed.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

fn of<'a>(records: &'a [AuditRecord], action: &str, who: &ClientIdentity) -> Vec<&'a AuditRecord> {
    records
        .iter()
        .filter(|r| {
            r.event.action == action
                && r.event
                    .client
                    .as_ref()
                    .is_some_and(|c| c.serial == who.serial && c.subject == who.subject)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_is_audited_and_the_chain_survives_sigkill_and_shows_tampering() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let policy = work.path().join("policy.toml");
    std::fs::write(&policy, POLICY).unwrap();
    let mut cfg = ingest_config(&pki, &work.path().join("s.redb"));
    cfg.grpc.access_policy = Some(policy);
    let mut ingest = spawn_ingest_child(EXE, cfg.clone(), work.path()).await;
    let agents = [
        Agent::start(agent_config(
            pki.path(),
            "amb-1",
            ingest.quic,
            vitals_and_gps(),
        ))
        .await
        .unwrap(),
        Agent::start(agent_config(
            pki.path(),
            "amb-2",
            ingest.quic,
            vitals_and_gps(),
        ))
        .await
        .unwrap(),
    ];
    tokio::time::sleep(Duration::from_secs(2)).await;
    let url = format!("https://{}", ingest.grpc);
    let (ed2, console) = (identity(&pki, "ed-2"), identity(&pki, "ed-console"));

    // ed-2 lists (amb-1 only), is refused amb-2, reads amb-1; the console reads everything.
    let mut c = ed_client::client::connect(&url, &pki.subscriber("ed-2"))
        .await
        .unwrap();
    let listed = c
        .list_vehicles(ListVehiclesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.vehicles.len(), 1);
    let refused = c
        .subscribe(SubscribeRequest {
            vehicle_ids: vec!["amb-2".into()],
            kinds: vec![],
            start: Some(Start::Live(true)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    read_some(&url, &pki, "ed-2", &[], 20).await;
    read_some(&url, &pki, "ed-console", &[], 20).await;
    // The end records are written as the subscriptions notice their clients left.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // SIGKILL, then a restart on the same store and audit directory.
    ingest.child.kill().await.unwrap();
    let ingest = spawn_ingest_child(EXE, cfg, work.path()).await;
    let url = format!("https://{}", ingest.grpc);
    let mut c = ed_client::client::connect(&url, &pki.subscriber("ed-2"))
        .await
        .unwrap();
    c.list_vehicles(ListVehiclesRequest::default())
        .await
        .unwrap();
    drop(c);
    for a in agents {
        a.shutdown().await.unwrap();
    }
    let mut ingest = ingest;
    ingest.child.kill().await.unwrap();

    // One record per call, naming the certificate (subject and serial) and the outcome.
    let dir = work.path().join("audit");
    let records = query(&files_in(&dir).unwrap(), None, 0).unwrap();
    let lists = of(&records, "list_vehicles", &ed2);
    assert_eq!(lists.len(), 2, "one before and one after the restart");
    assert!(lists.iter().all(|r| r.event.outcome == Outcome::Success));
    assert_eq!(lists[0].event.vehicles, vec!["amb-1"]);
    let subscribes = of(&records, "subscribe", &ed2);
    assert_eq!(subscribes.len(), 2, "{subscribes:#?}");
    assert_eq!(subscribes[0].event.outcome, Outcome::Denied);
    assert!(subscribes[0].event.detail.to_string().contains("vehicle"));
    assert_eq!(subscribes[1].event.outcome, Outcome::Success);
    let ended = of(&records, "subscription_end", &ed2);
    assert_eq!(ended.len(), 1, "{records:#?}");
    assert_eq!(
        ended[0].event.vehicles,
        vec!["amb-1"],
        "ed-2 received amb-1 only"
    );
    assert!(ended[0].event.detail["records_delivered"].as_u64().unwrap() > 0);
    assert_eq!(of(&records, "subscription_end", &console).len(), 1);
    assert!(records.iter().any(|r| r.event.action == "grpc_connect"));
    for r in &records {
        assert!(!r.event.action.is_empty() && r.time_ns > 0, "{r:?}");
    }

    // The chain is intact across the kill.
    let (ok, text) = audit_cli(&["verify"], &dir);
    assert!(ok && text.contains("intact"), "{text}");

    // Who saw amb-1's data: both clients.
    let (ok, text) = audit_cli(&["query", "--vehicle", "amb-1"], &dir);
    assert!(ok, "{text}");
    assert!(
        text.contains(&ed2.subject) && text.contains(&console.subject),
        "{text}"
    );
    assert!(text.contains(&ed2.serial), "{text}");

    // One byte of a past record changed: verify fails at that line.
    let files = files_in(&dir).unwrap();
    let text = std::fs::read_to_string(&files[0]).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let target = lines
        .iter()
        .position(|l| l.contains("\"action\":\"list_vehicles\""))
        .unwrap();
    assert!(target + 1 < lines.len(), "a past record, not the newest");
    let mut changed: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
    changed[target] = changed[target].replacen("amb-1", "amb-9", 1);
    std::fs::write(&files[0], changed.join("\n") + "\n").unwrap();
    let (ok, text) = audit_cli(&["verify"], &dir);
    assert!(!ok, "{text}");
    let at = format!("{}:{}:", files[0].display(), target + 1);
    assert!(text.contains(&at), "expected {at} in {text}");
}

/// rsyslogd receiving RFC 5425 (syslog over TLS) on `port`, with the ingest's development
/// certificate as its own, writing what it receives to `out`, one line per message:
/// MSGID|STRUCTURED-DATA|APP-NAME|FACILITY|SEVERITY|MSG.
fn rsyslogd(dir: &Path, pki: &Path, port: u16, out: &Path) -> std::process::Child {
    let conf = dir.join("rsyslog.conf");
    let work = dir.join("rsyslog-work");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(
        &conf,
        format!(
            r#"global(workDirectory="{work}"
       DefaultNetstreamDriver="gtls"
       DefaultNetstreamDriverCAFile="{pki}/hospital-ca.pem"
       DefaultNetstreamDriverCertFile="{pki}/ingest.pem"
       DefaultNetstreamDriverKeyFile="{pki}/ingest.key")
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="anon")
input(type="imtcp" port="{port}" address="127.0.0.1")
template(name="fields" type="list") {{
  property(name="msgid") constant(value="|")
  property(name="structured-data") constant(value="|")
  property(name="app-name") constant(value="|")
  property(name="syslogfacility") constant(value="|")
  property(name="syslogseverity") constant(value="|")
  property(name="msg") constant(value="\n")
}}
action(type="omfile" file="{out}" template="fields")
"#,
            work = work.display(),
            pki = pki.display(),
            out = out.display(),
        ),
    )
    .unwrap();
    std::process::Command::new("rsyslogd")
        .args(["-n", "-iNONE", "-f"])
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("rsyslogd.log")).unwrap())
        .spawn()
        .expect("rsyslogd (Debian packages rsyslog and rsyslog-gnutls; .ci/run installs them)")
}

/// What rsyslog wrote so far: (msgid, structured data, app, facility, severity, record).
fn received(out: &Path) -> Vec<(String, String, String, String, String, AuditRecord)> {
    let text = std::fs::read_to_string(out).unwrap_or_default();
    text.lines()
        .map(|l| {
            let f: Vec<&str> = l.splitn(6, '|').collect();
            assert_eq!(f.len(), 6, "{l}");
            let json = f[5].trim_start_matches('\u{feff}');
            let record: AuditRecord =
                serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"));
            let s = |i: usize| f[i].to_owned();
            (s(0), s(1), s(2), s(3), s(4), record)
        })
        .collect()
}

async fn wait_for_port(port: u16) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "rsyslogd did not listen"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every local record (at least `min_records`) has reached the receiver.
async fn all_forwarded(
    audit_dir: &Path,
    out: &Path,
    min_records: usize,
) -> (
    Vec<AuditRecord>,
    Vec<(String, String, String, String, String, AuditRecord)>,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mine = query(&files_in(audit_dir).unwrap(), None, 0).unwrap();
        let theirs = received(out);
        if mine.len() >= min_records && theirs.len() == mine.len() {
            return (mine, theirs);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} local records, {} forwarded",
            mine.len(),
            theirs.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_is_forwarded_to_a_real_syslog_receiver_over_tls_across_its_restart() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let (_, port) = free_ports();
    let out = work.path().join("received.log");
    let mut receiver = rsyslogd(work.path(), pki.path(), port, &out);
    wait_for_port(port).await;
    let mut cfg = ingest_config(&pki, &work.path().join("s.redb"));
    cfg.audit.syslog_address = Some(format!("127.0.0.1:{port}"));
    cfg.audit.syslog_ca = Some(pki.path().join("hospital-ca.pem"));
    cfg.audit.syslog_server_name = Some("localhost".into());
    let ingest = spawn_ingest_child(EXE, cfg.clone(), work.path()).await;
    let url = format!("https://{}", ingest.grpc);
    let list = || async {
        let mut c = ed_client::client::connect(&url, &pki.subscriber("ed-console"))
            .await
            .unwrap();
        c.list_vehicles(ListVehiclesRequest {}).await.unwrap();
    };
    let audit_dir = cfg.audit_dir();
    let local = || query(&files_in(&audit_dir).unwrap(), None, 0).unwrap();
    list().await;
    let (mine, theirs) = all_forwarded(&audit_dir, &out, 2).await;
    for (record, (msgid, sd, app, facility, severity, copy)) in mine.iter().zip(&theirs) {
        assert_eq!(copy, record);
        assert_eq!(msgid, &record.event.action);
        // Successes are informational, refusals and failures warnings.
        let (outcome, level) = match record.event.outcome {
            Outcome::Success => ("success", "6"),
            Outcome::Denied => ("denied", "4"),
            Outcome::Failure => ("failure", "4"),
        };
        assert_eq!(
            sd,
            &format!("[audit@32473 seq=\"{}\" outcome=\"{outcome}\"]", record.seq)
        );
        assert_eq!((app.as_str(), facility.as_str()), ("hospital-ingest", "13"));
        assert_eq!(severity, level);
    }
    // The receiver goes away; what is audited meanwhile waits and arrives once it is back.
    receiver.kill().unwrap();
    receiver.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    list().await;
    list().await;
    let before = mine.len();
    assert!(local().len() >= before + 4, "recorded locally meanwhile");
    let mut receiver = rsyslogd(work.path(), pki.path(), port, &out);
    wait_for_port(port).await;
    let (mine, theirs) = all_forwarded(&audit_dir, &out, before + 4).await;
    let seqs: Vec<u64> = theirs.iter().map(|t| t.5.seq).collect();
    let expected: Vec<u64> = mine.iter().map(|r| r.seq).collect();
    assert_eq!(
        seqs, expected,
        "nothing lost or repeated across the restart"
    );
    let (_, body) = http_get(ingest.metrics.unwrap(), "/metrics").await;
    assert_eq!(
        metric_value(&body, "relay_ingest_audit_forwarded_total"),
        mine.len() as f64
    );
    assert_eq!(
        metric_value(&body, "relay_ingest_audit_forward_dropped_total"),
        0.0
    );
    assert_eq!(
        metric_value(&body, "relay_ingest_audit_forward_connected"),
        1.0
    );
    receiver.kill().unwrap();
    receiver.wait().unwrap();
}
