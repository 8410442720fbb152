//! The dashboards and alert rules in deploy/ only name metrics the services really export.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::Path;

use hospital_ingest::config::ServiceConfig as _;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// `relay_...` identifiers in a text, without the histogram series suffixes.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("relay_") {
        if i > 0 && text.as_bytes()[i - 1].is_ascii_alphanumeric() {
            continue;
        }
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !["relay_agent_", "relay_ingest_", "relay_edweb_"]
            .iter()
            .any(|p| name.starts_with(p))
        {
            continue; // e.g. the relay_proto crate
        }
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .fold(name.clone(), |n, s| {
                n.strip_suffix(s).map(str::to_owned).unwrap_or(n)
            });
        out.insert(base);
    }
    out
}

/// Metric names in the services' metrics.rs files, which describe every metric.
fn described() -> BTreeSet<String> {
    [
        "vehicle-agent/src/metrics.rs",
        "hospital-ingest/src/metrics.rs",
        "ed-client/src/web/metrics.rs",
    ]
    .iter()
    .flat_map(|f| metric_names(&std::fs::read_to_string(root().join(f)).unwrap()))
    .collect()
}

/// Every metric the code emits is described (so it has HELP text), and only those.
#[test]
fn every_emitted_metric_is_described() {
    let described = described();
    let mut emitted = BTreeSet::new();
    for dir in [
        "vehicle-agent/src",
        "hospital-ingest/src",
        "ed-client/src/web",
    ] {
        for entry in std::fs::read_dir(root().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("metrics.rs") {
                emitted.extend(metric_names(&std::fs::read_to_string(&path).unwrap()));
            }
        }
    }
    let undescribed: Vec<&String> = emitted.difference(&described).collect();
    assert!(
        undescribed.is_empty(),
        "emitted without description: {undescribed:?}"
    );
}

#[test]
fn dashboards_and_alerts_reference_described_metrics() {
    let described = described();
    assert!(described.len() > 25, "{described:?}");
    for f in [
        "deploy/grafana/relay-overview.json",
        "deploy/prometheus/relay-alerts.yml",
    ] {
        let used = metric_names(&std::fs::read_to_string(root().join(f)).unwrap());
        assert!(!used.is_empty(), "{f} names no metric");
        let unknown: Vec<&String> = used.difference(&described).collect();
        assert!(
            unknown.is_empty(),
            "{f} uses metrics nobody exports: {unknown:?}"
        );
    }
}

/// The example configurations show every key, commented out, with its default value.
#[test]
fn example_configs_are_the_defaults_with_every_key() {
    let config = root().join("deploy/config");
    relay_ops::config::check_example::<vehicle_agent::AgentConfig>(
        &config.join("vehicle-agent.toml"),
    )
    .unwrap();
    relay_ops::config::check_example::<hospital_ingest::IngestConfig>(
        &config.join("hospital-ingest.toml"),
    )
    .unwrap();
    relay_ops::config::check_example::<ed_client::web::WebConfig>(&config.join("ed-web.toml"))
        .unwrap();
}

/// The command line of a unit's ExecStart, with its config file taken from deploy/config and
/// `%d` (the credentials directory) as `credentials`.
fn exec_start(unit: &str, credentials: &str) -> Vec<String> {
    let text = std::fs::read_to_string(root().join("deploy/systemd").join(unit)).unwrap();
    // The last non-empty one (a drop-in first resets the unit's with an empty ExecStart=).
    let line = text
        .lines()
        .filter_map(|l| l.strip_prefix("ExecStart="))
        .rfind(|l| !l.is_empty())
        .unwrap();
    line.split_whitespace()
        .map(|arg| {
            let arg = arg.replace("%d", credentials);
            match arg.strip_prefix("/etc/ambulance-relay/") {
                Some(file) if file.ends_with(".toml") => root()
                    .join("deploy/config")
                    .join(file)
                    .display()
                    .to_string(),
                _ => arg,
            }
        })
        .collect()
}

#[test]
fn the_units_start_the_services_with_their_key_from_the_credentials_directory() {
    let ingest: hospital_ingest::IngestConfig =
        relay_ops::config::load_from(exec_start("hospital-ingest.service", "/run/creds")).unwrap();
    assert_eq!(ingest.tls.key, Path::new("/run/creds/ingest.key"));
    let agent: vehicle_agent::AgentConfig =
        relay_ops::config::load_from(exec_start("vehicle-agent.service", "/run/creds")).unwrap();
    assert_eq!(agent.tls.key, Path::new("/run/creds/vehicle.key"));
    let web: ed_client::web::WebConfig =
        relay_ops::config::load_from(exec_start("ed-web.service", "/run/creds")).unwrap();
    assert_eq!(web.http.key, Path::new("/run/creds/ed-web-server.key"));
    assert_eq!(web.ingest.key, Path::new("/run/creds/ed-web.key"));
    // Each key the command line names is one the unit loads as a credential.
    for (unit, key) in [
        ("hospital-ingest.service", "ingest.key"),
        ("vehicle-agent.service", "vehicle.key"),
        ("ed-web.service", "ed-web-server.key"),
        ("ed-web.service", "ed-web.key"),
    ] {
        let text = std::fs::read_to_string(root().join("deploy/systemd").join(unit)).unwrap();
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("LoadCredential={key}:"))),
            "{unit} does not load {key}"
        );
    }
}

/// The ingest on the JetStream cluster: the example's keys over the defaults make a valid
/// configuration, and the systemd drop-in gives it its NATS key as a credential.
#[test]
fn the_jetstream_ingest_example_and_drop_in_configure_the_cluster_store() {
    let example = root().join("deploy/config/hospital-ingest-jetstream.toml");
    let cfg = hospital_ingest::IngestConfig::from_file(&example).unwrap();
    cfg.validate().unwrap();
    assert_eq!(
        cfg.store.backend,
        hospital_ingest::config::StoreBackend::Jetstream
    );
    assert_eq!(cfg.jetstream.servers.len(), 3);
    assert_eq!(cfg.jetstream.replicas, 3);
    let drop_in = "hospital-ingest.service.d/jetstream.conf";
    let ingest: hospital_ingest::IngestConfig =
        relay_ops::config::load_from(exec_start(drop_in, "/run/creds")).unwrap();
    assert_eq!(ingest.tls.key, Path::new("/run/creds/ingest.key"));
    assert_eq!(
        ingest.jetstream.key,
        Path::new("/run/creds/ingest-nats.key")
    );
    let text = std::fs::read_to_string(root().join("deploy/systemd").join(drop_in)).unwrap();
    assert!(text.contains("LoadCredential=ingest-nats.key:"));
}

/// The YAML documents of a file, as JSON (through Python's PyYAML: tests/run.sh installs it).
fn yaml_documents(path: &Path) -> Vec<serde_json::Value> {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
        ])
        .arg(path)
        .output()
        .expect("python3 (tests/run.sh installs python3-yaml)");
    assert!(
        out.status.success(),
        "{}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Every variable of the shipped nats.conf is set wherever a node is started from it: the
/// systemd unit with its environment file, the Kubernetes StatefulSet, the cluster of the
/// tests and of `loadtest run --store jetstream`.
#[test]
fn every_nats_deployment_sets_every_variable_of_nats_conf() {
    let conf = std::fs::read_to_string(root().join("deploy/nats/nats.conf")).unwrap();
    let vars: BTreeSet<String> = conf
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(|l| l.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '$')))
        .filter_map(|w| w.strip_prefix('$'))
        .map(str::to_owned)
        .collect();
    assert!(vars.len() >= 10, "{vars:?}");
    let read = |p: &str| std::fs::read_to_string(root().join(p)).unwrap();
    let systemd = read("deploy/systemd/nats-server.service") + &read("deploy/nats/nats-1.env");
    let harness = read("loadtest/src/nats.rs");
    let docs = yaml_documents(&root().join("deploy/kubernetes/nats.yaml"));
    let set = docs.iter().find(|d| d["kind"] == "StatefulSet").unwrap();
    assert_eq!(set["spec"]["replicas"], 3);
    let container = &set["spec"]["template"]["spec"]["containers"][0];
    let k8s: BTreeSet<&str> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    for v in &vars {
        assert!(
            systemd.contains(&format!("{v}=")),
            "{v} not set by the systemd unit or nats-1.env"
        );
        assert!(k8s.contains(v.as_str()), "{v} not set by the StatefulSet");
        assert!(
            harness.contains(&format!(".env(\"{v}\"")),
            "{v} not set by loadtest's cluster"
        );
    }
    // The ingest Deployment's flags make a valid configuration with the cluster example,
    // and its Service exposes the ports the container opens.
    let docs = yaml_documents(&root().join("deploy/kubernetes/hospital-ingest.yaml"));
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let example = root().join("deploy/config/hospital-ingest-jetstream.toml");
    let mut args = vec!["hospital-ingest".to_owned()];
    for a in container["args"].as_array().unwrap() {
        let a = a.as_str().unwrap();
        args.push(match a.strip_prefix("--config=") {
            Some(_) => format!("--config={}", example.display()),
            None => a.to_owned(),
        });
    }
    let cfg: hospital_ingest::IngestConfig = relay_ops::config::load_from(args).unwrap();
    assert_eq!(cfg.quic.listen.port(), 4433);
    let ports: BTreeSet<&str> = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    let service = docs.iter().find(|d| d["kind"] == "Service").unwrap();
    for p in service["spec"]["ports"].as_array().unwrap() {
        assert!(ports.contains(p["targetPort"].as_str().unwrap()), "{p}");
    }
    assert!(
        service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["protocol"] == "UDP" && p["port"] == 4433),
        "QUIC over UDP"
    );
}

/// `relay_...` names in a Prometheus text exposition.
fn exported(body: &str) -> BTreeSet<String> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .flat_map(metric_names)
        .collect()
}

/// Every series a dashboard panel or an alert rule queries exists on a freshly started,
/// quiet ingest, agent and ed-web (each its own process), so `increase()` sees the first
/// event and panels never show "no data".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboards_and_alerts_query_is_exported_from_the_start() {
    use relay_e2e::*;
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let cfg = ingest_config(&pki, &work.path().join("s.redb"));
    let ingest =
        spawn_ingest_child(env!("CARGO_BIN_EXE_e2e-hospital-ingest"), cfg, work.path()).await;
    let mut agent_cfg = agent_config(pki.path(), "amb-1", ingest.quic, vitals_and_gps());
    let agent_metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    agent_cfg.metrics.listen = Some(agent_metrics);
    let agent_toml = work.path().join("agent.toml");
    std::fs::write(&agent_toml, agent_cfg.to_toml().unwrap()).unwrap();
    let _agent = tokio::process::Command::new(env!("CARGO_BIN_EXE_e2e-vehicle-agent"))
        .arg("--config")
        .arg(&agent_toml)
        .arg("--allow-dev-pki")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // ed-web, with one user and its metrics endpoint.
    let users = work.path().join("users.toml");
    std::fs::write(
        &users,
        format!(
            "[[user]]\nname = \"dr-lee\"\npassword_hash = \"{}\"\nvehicles = [\"*\"]\n",
            ed_client::web::auth::hash_password("a long passphrase").unwrap()
        ),
    )
    .unwrap();
    let web_metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let p = |f: &str| pki.path().join(f);
    let _web = tokio::process::Command::new(env!("CARGO_BIN_EXE_e2e-ed-web"))
        .arg("--allow-dev-pki")
        .args(["--http-listen", "127.0.0.1:0"])
        .arg("--http-cert")
        .arg(p("ed-web-server.pem"))
        .arg("--http-key")
        .arg(p("ed-web-server.key"))
        .arg("--ingest-url")
        .arg(format!("https://{}", ingest.grpc))
        .arg("--ingest-ca")
        .arg(p("hospital-ca.pem"))
        .arg("--ingest-cert")
        .arg(p("ed-web.pem"))
        .arg("--ingest-key")
        .arg(p("ed-web.key"))
        .arg("--auth-users-file")
        .arg(&users)
        .arg("--metrics-listen")
        .arg(web_metrics.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let (ingest_body, agent_body) = loop {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let agent_up = tokio::net::TcpStream::connect(agent_metrics).await.is_ok();
        if agent_up {
            let (_, a) = http_get(agent_metrics, "/metrics").await;
            if metric_value(&a, "relay_agent_connects_total") >= 1.0 {
                let (_, i) = http_get(ingest.metrics.unwrap(), "/metrics").await;
                break (i, a);
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent did not connect"
        );
    };
    let web_body = loop {
        if tokio::net::TcpStream::connect(web_metrics).await.is_ok() {
            let (_, w) = http_get(web_metrics, "/metrics").await;
            // Connected to the ingest once its first vehicle list came back.
            if metric_value(&w, "relay_edweb_ingest_connected") >= 1.0 {
                break w;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "ed-web did not reach the ingest"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    let mut live = exported(&ingest_body);
    live.extend(exported(&agent_body));
    live.extend(exported(&web_body));
    let mut missing = Vec::new();
    for f in [
        "deploy/grafana/relay-overview.json",
        "deploy/prometheus/relay-alerts.yml",
    ] {
        let used = metric_names(&std::fs::read_to_string(root().join(f)).unwrap());
        assert!(used.len() > 10, "{f}: {used:?}");
        missing.extend(used.difference(&live).map(|m| format!("{f}: {m}")));
    }
    assert!(
        missing.is_empty(),
        "queried but not exported by a fresh ingest, agent and ed-web: {missing:#?}"
    );
}

/// Every alert rule has a promtool unit test that makes it fire and one that keeps it silent
/// (`.ci/run` runs them with `promtool test rules`).
#[test]
fn every_alert_rule_has_a_firing_and_a_silent_promtool_test() {
    let rules = std::fs::read_to_string(root().join("deploy/prometheus/relay-alerts.yml")).unwrap();
    let tests =
        std::fs::read_to_string(root().join("deploy/prometheus/relay-alerts.test.yml")).unwrap();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 20, "{alerts:?}");
    for alert in alerts {
        let blocks: Vec<&str> = tests
            .split("  - interval:")
            .filter(|b| b.contains(&format!("alertname: {alert}\n")))
            .collect();
        let silent = blocks
            .iter()
            .filter(|b| b.contains("exp_alerts: []"))
            .count();
        let firing = blocks.len() - silent;
        assert!(
            firing >= 1 && silent >= 1,
            "{alert}: {firing} firing, {silent} silent tests"
        );
    }
}
