//! A real NATS JetStream cluster on loopback for the tests: nodes started from the shipped
//! `deploy/nats/nats.conf` (mutual TLS for clients and routes, `sync_interval: always`),
//! killed and restarted at will.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::{Pki, http_get};

/// The server binary: `$NATS_SERVER`, else `nats-server` on the PATH (tests/run.sh installs
/// the pinned version).
pub fn nats_server() -> String {
    std::env::var("NATS_SERVER").unwrap_or_else(|_| "nats-server".into())
}

/// `n` distinct free TCP ports on loopback: every listener is held until all are chosen, so
/// two nodes never get the same port (a node that cannot bind never joins the cluster).
fn free_tcp_ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap_or_else(|e| panic!("no free port: {e}"))
        })
        .collect();
    held.iter()
        .map(|l| {
            l.local_addr()
                .unwrap_or_else(|e| panic!("no free port: {e}"))
                .port()
        })
        .collect()
}

/// One node of a [`Cluster`].
#[derive(Debug)]
pub struct Node {
    /// Its server name (nats-1, ...).
    pub name: String,
    /// Client port.
    pub client: u16,
    /// Route port.
    pub cluster: u16,
    /// Monitoring port.
    pub monitor: u16,
    child: Option<tokio::process::Child>,
}

impl Node {
    /// Its client URL.
    pub fn url(&self) -> String {
        format!("tls://127.0.0.1:{}", self.client)
    }

    /// Whether it runs.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

/// A cluster of nodes sharing one working directory (their stores survive restarts).
#[derive(Debug)]
pub struct Cluster {
    /// The nodes, running or not.
    pub nodes: Vec<Node>,
    dir: PathBuf,
    certs: PathBuf,
}

impl Cluster {
    /// Starts `n` (3 unless testing something else) nodes in `dir` with certificates of `pki`
    /// and waits until they agree on a JetStream meta leader.
    pub async fn start(pki: &Pki, dir: &Path, n: usize) -> Self {
        let ports = free_tcp_ports(3 * n);
        let nodes = (0..n)
            .map(|i| Node {
                name: format!("nats-{}", i + 1),
                client: ports[3 * i],
                cluster: ports[3 * i + 1],
                monitor: ports[3 * i + 2],
                child: None,
            })
            .collect();
        let mut c = Self {
            nodes,
            dir: dir.to_owned(),
            certs: pki.path().to_owned(),
        };
        for i in 0..n {
            c.start_node(i);
        }
        c.meta_leader(Duration::from_secs(60)).await;
        c
    }

    /// Client URLs of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Node::url).collect()
    }

    /// (Re)starts node `i` on its ports and its store.
    pub fn start_node(&mut self, i: usize) {
        let routes: Vec<String> = (0..self.nodes.len())
            .filter(|&j| j != i)
            .map(|j| format!("tls://127.0.0.1:{}", self.nodes[j].cluster))
            .collect();
        let node = &self.nodes[i];
        let store = self.dir.join(&node.name);
        std::fs::create_dir_all(&store).unwrap_or_else(|e| panic!("{}: {e}", store.display()));
        let log_path = self.dir.join(format!("{}.log", node.name));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap_or_else(|e| panic!("{}: {e}", log_path.display()));
        let p = |f: &str| self.certs.join(f).display().to_string();
        let route = |k: usize| routes.get(k).cloned().unwrap_or_else(|| routes[0].clone());
        let child = tokio::process::Command::new(nats_server())
            .arg("-c")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nats/nats.conf"))
            .env("NATS_NAME", &node.name)
            .env("NATS_HOST", "127.0.0.1")
            .env("NATS_CLIENT_PORT", node.client.to_string())
            .env("NATS_CLUSTER_PORT", node.cluster.to_string())
            .env("NATS_MONITOR_PORT", node.monitor.to_string())
            .env("NATS_ROUTE_A", route(0))
            .env("NATS_ROUTE_B", route(1))
            .env("NATS_STORE_DIR", &store)
            .env("NATS_CERT", p("nats-node.pem"))
            .env("NATS_KEY", p("nats-node.key"))
            .env("NATS_CA", p("hospital-ca.pem"))
            .env("NATS_INGEST_USER", relay_devcerts::NATS_INGEST_IDENTITY)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("starting {} (tests/run.sh installs it): {e}", nats_server())
            });
        self.nodes[i].child = Some(child);
    }

    /// The last `lines` lines of every node's log, for a failure message.
    fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            let log = std::fs::read_to_string(self.dir.join(format!("{}.log", node.name)))
                .unwrap_or_default();
            let all: Vec<&str> = log.lines().collect();
            out.push_str(&format!("--- {}\n", node.name));
            for line in &all[all.len().saturating_sub(lines)..] {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// SIGKILLs node `i` and waits for it to be gone.
    pub async fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// A running node's JetStream report (`/jsz`), with `query` appended.
    pub async fn jsz(&self, i: usize, query: &str) -> Option<Value> {
        let node = &self.nodes[i];
        node.child.as_ref()?;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], node.monitor));
        tokio::net::TcpStream::connect(addr).await.ok()?;
        let (head, body) = http_get(addr, &format!("/jsz{query}")).await;
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(&body)?
        } else {
            body
        };
        serde_json::from_str(&body).ok()
    }

    /// Waits until the running nodes agree on a meta leader among them and each knows the
    /// whole cluster; returns the leader's index.
    pub async fn meta_leader(&self, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let mut leaders = Vec::new();
            let running: Vec<usize> = (0..self.nodes.len())
                .filter(|&i| self.nodes[i].is_running())
                .collect();
            let mut whole = true;
            for &i in &running {
                if let Some(j) = self.jsz(i, "").await {
                    // Every node knows every peer (offline ones count), not only a leader.
                    whole &= j["meta_cluster"]["cluster_size"] == self.nodes.len();
                    leaders.push(
                        j["meta_cluster"]["leader"]
                            .as_str()
                            .unwrap_or("")
                            .to_owned(),
                    );
                }
            }
            if whole
                && leaders.len() == running.len()
                && !leaders.is_empty()
                && leaders.iter().all(|l| *l == leaders[0])
                && let Some(i) = running
                    .iter()
                    .copied()
                    .find(|&i| self.nodes[i].name == leaders[0])
            {
                return i;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no agreed meta leader within {timeout:?}: {leaders:?}\n{}",
                self.log_tails(8)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The node leading JetStream stream `stream` (by its cluster report), when one does.
    pub async fn stream_leader(&self, stream: &str) -> Option<usize> {
        for i in 0..self.nodes.len() {
            let Some(j) = self.jsz(i, "?accounts=true&streams=true").await else {
                continue;
            };
            for account in j["account_details"].as_array().into_iter().flatten() {
                for s in account["stream_detail"].as_array().into_iter().flatten() {
                    if s["name"] == stream {
                        let leader = s["cluster"]["leader"].as_str().unwrap_or("");
                        if let Some(k) = self.nodes.iter().position(|n| n.name == leader) {
                            return Some(k);
                        }
                    }
                }
            }
        }
        None
    }
}

/// The body of a chunked HTTP/1.1 response (large monitoring answers come chunked).
fn dechunk(body: &str) -> Option<String> {
    let mut out = String::new();
    let mut rest = body;
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let size = usize::from_str_radix(size.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(after.get(..size)?);
        rest = after.get(size..)?.strip_prefix("\r\n")?;
    }
}

/// Store options for the cluster, with names unique to `tag` (one cluster serves several
/// stores), the ingest's dev client certificate, and byte accounting per record.
pub fn store_options(
    cluster: &Cluster,
    pki: &Pki,
    tag: &str,
) -> hospital_ingest::store::JetStreamOptions {
    hospital_ingest::store::JetStreamOptions {
        servers: cluster.urls(),
        ca: pki.path().join("hospital-ca.pem"),
        cert: pki
            .path()
            .join(format!("{}.pem", relay_devcerts::NATS_INGEST_CLIENT)),
        key: pki
            .path()
            .join(format!("{}.key", relay_devcerts::NATS_INGEST_CLIENT)),
        stream: format!("LOG_{tag}"),
        subject_prefix: format!("relay.{tag}"),
        meta_bucket: format!("META_{tag}"),
        replicas: cluster.nodes.len().min(3),
        max_age: Duration::from_secs(72 * 3600),
        max_bytes: 1 << 30,
        request_timeout: Duration::from_secs(10),
        accounting_granularity_bytes: 1,
        client_name: format!("test-{tag}"),
    }
}

/// An ingest configuration (as [`crate::ingest_config`]) with its store on `cluster`: the
/// log stream, bucket and subjects named after `tag`, so several nodes given the same tag
/// share one log.
pub fn ingest_on(
    cluster: &Cluster,
    pki: &Pki,
    dir: &Path,
    tag: &str,
) -> hospital_ingest::IngestConfig {
    let mut cfg = crate::ingest_config(pki, &dir.join("unused.redb"));
    let o = store_options(cluster, pki, tag);
    cfg.store.backend = hospital_ingest::config::StoreBackend::Jetstream;
    cfg.jetstream.servers = o.servers;
    cfg.jetstream.ca = o.ca;
    cfg.jetstream.cert = o.cert;
    cfg.jetstream.key = o.key;
    cfg.jetstream.stream = o.stream;
    cfg.jetstream.subject_prefix = o.subject_prefix;
    cfg.jetstream.meta_bucket = o.meta_bucket;
    cfg.jetstream.replicas = o.replicas;
    cfg.audit.path = Some(dir.join("audit"));
    cfg
}
