//! The shipped 3-node NATS JetStream configuration (deploy/nats/nats.conf, issue 13) in a real
//! cluster on loopback: the nodes find each other over mutually authenticated TLS routes, the
//! JetStream meta group has a leader with a quorum, every write is fsynced
//! (`sync_interval: always`), clients must come with TLS and a certificate, and the cluster
//! elects a new leader when the leader is killed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::Duration;

use relay_e2e::{Pki, http_get};
use serde_json::Value;

/// The server binary: `$NATS_SERVER`, else `nats-server` on the PATH (tests/run.sh installs
/// the pinned 2.15.1).
fn nats_server() -> String {
    std::env::var("NATS_SERVER").unwrap_or_else(|_| "nats-server".into())
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Node {
    name: String,
    client: u16,
    monitor: u16,
    child: tokio::process::Child,
}

fn start_node(pki: &Pki, dir: &Path, i: usize, ports: &[(u16, u16, u16)]) -> Node {
    let (client, cluster, monitor) = ports[i];
    let others: Vec<String> = (0..ports.len())
        .filter(|&j| j != i)
        .map(|j| format!("tls://127.0.0.1:{}", ports[j].1))
        .collect();
    let name = format!("nats-{}", i + 1);
    let store = dir.join(&name);
    std::fs::create_dir_all(&store).unwrap();
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let p = |f: &str| pki.path().join(f).display().to_string();
    let child = tokio::process::Command::new(nats_server())
        .arg("-c")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nats/nats.conf"))
        .env("NATS_NAME", &name)
        .env("NATS_HOST", "127.0.0.1")
        .env("NATS_CLIENT_PORT", client.to_string())
        .env("NATS_CLUSTER_PORT", cluster.to_string())
        .env("NATS_MONITOR_PORT", monitor.to_string())
        .env("NATS_ROUTE_A", &others[0])
        .env("NATS_ROUTE_B", &others[1])
        .env("NATS_STORE_DIR", &store)
        .env("NATS_CERT", p("nats-node.pem"))
        .env("NATS_KEY", p("nats-node.key"))
        .env("NATS_CA", p("hospital-ca.pem"))
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {} (tests/run.sh installs it): {e}", nats_server()));
    Node {
        name,
        client,
        monitor,
        child,
    }
}

/// The node's JetStream report, once its monitoring port answers.
async fn jsz(node: &Node) -> Option<Value> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], node.monitor));
    tokio::net::TcpStream::connect(addr).await.ok()?;
    let (_, body) = http_get(addr, "/jsz").await;
    serde_json::from_str(&body).ok()
}

/// Waits until `nodes` agree on a meta leader among them; returns its name.
async fn agreed_leader(nodes: &[&Node], timeout: Duration) -> String {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let mut leaders = Vec::new();
        for n in nodes {
            if let Some(j) = jsz(n).await {
                leaders.push(
                    j["meta_cluster"]["leader"]
                        .as_str()
                        .unwrap_or("")
                        .to_owned(),
                );
            }
        }
        if leaders.len() == nodes.len()
            && !leaders[0].is_empty()
            && leaders.iter().all(|l| *l == leaders[0])
            && nodes.iter().any(|n| n.name == leaders[0])
        {
            return leaders[0].clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no agreed leader within {timeout:?}: {leaders:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_nats_configuration_forms_a_tls_cluster_that_fsyncs_and_survives_its_leader() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let ports: Vec<(u16, u16, u16)> = (0..3)
        .map(|_| (free_tcp_port(), free_tcp_port(), free_tcp_port()))
        .collect();
    let mut nodes: Vec<Node> = (0..3)
        .map(|i| start_node(&pki, work.path(), i, &ports))
        .collect();

    let all: Vec<&Node> = nodes.iter().collect();
    let leader = agreed_leader(&all, Duration::from_secs(60)).await;
    for n in &nodes {
        let j = jsz(n).await.unwrap();
        assert_eq!(
            j["meta_cluster"]["cluster_size"], 3,
            "{}",
            j["meta_cluster"]
        );
        assert_eq!(j["config"]["sync_always"], true, "every write fsynced");
        // Clients are told TLS with a certificate is required (no plaintext).
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", n.client))
            .await
            .unwrap();
        let mut info = vec![0_u8; 4096];
        let len = tokio::time::timeout(Duration::from_secs(5), async {
            use tokio::io::AsyncReadExt;
            s.read(&mut info).await.unwrap()
        })
        .await
        .unwrap();
        let line = String::from_utf8_lossy(&info[..len]).into_owned();
        let info: Value = serde_json::from_str(line.trim().trim_start_matches("INFO ")).unwrap();
        assert_eq!(info["tls_required"], true, "{info}");
        assert_eq!(info["tls_verify"], true, "{info}");
        assert_eq!(info["jetstream"], true, "{info}");
        assert_eq!(info["cluster"], "relay");
    }

    // SIGKILL the leader: the two left elect one of themselves.
    let i = nodes.iter().position(|n| n.name == leader).unwrap();
    let mut dead = nodes.remove(i);
    let killed = tokio::time::Instant::now();
    dead.child.start_kill().unwrap();
    dead.child.wait().await.unwrap();
    let rest: Vec<&Node> = nodes.iter().collect();
    let new_leader = agreed_leader(&rest, Duration::from_secs(60)).await;
    assert_ne!(new_leader, leader);
    eprintln!(
        "meta leader {leader} killed; {new_leader} elected and agreed within {:?}",
        killed.elapsed()
    );
}
