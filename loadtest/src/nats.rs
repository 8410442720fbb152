//! A NATS JetStream cluster of local `nats-server` processes, each started from the shipped
//! `deploy/nats/nats.conf` (mutual TLS for clients and routes) on loopback: the log of a
//! `loadtest run --store jetstream`, and of the end-to-end tests. Nodes can be killed and
//! restarted on their ports and stores.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

/// The shipped node configuration (every node's; what differs comes from the environment).
pub const NATS_CONF: &str = include_str!("../../deploy/nats/nats.conf");

/// The line of [`NATS_CONF`] a different [`SyncInterval`] replaces.
const SYNC_ALWAYS_LINE: &str = "sync_interval: always";

/// Bound on one monitoring request.
const MONITOR_TIMEOUT: Duration = Duration::from_secs(10);

/// What can go wrong running a cluster.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// No free port on loopback.
    #[error("no free TCP port on loopback: {0}")]
    Port(std::io::Error),
    /// A file or directory of the cluster.
    #[error("{path}: {source}")]
    Io {
        /// Which.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The server binary did not start.
    #[error(
        "starting {server} (install nats-server 2.10 or later, or name it with NATS_SERVER / \
         --nats-server): {source}"
    )]
    Spawn {
        /// The binary.
        server: String,
        /// Why.
        source: std::io::Error,
    },
    /// The shipped configuration no longer says `sync_interval: always`.
    #[error("deploy/nats/nats.conf has no `{SYNC_ALWAYS_LINE}` line to replace")]
    SyncLine,
    /// The shipped configuration no longer has a `cluster { ... }` block to drop.
    #[error("deploy/nats/nats.conf has no `cluster {{ ... }}` block to drop")]
    ClusterBlock,
    /// A single server did not report JetStream ready.
    #[error("nats-server did not report JetStream ready within {timeout:?}\n{log}")]
    NotReady {
        /// How long it was given.
        timeout: Duration,
        /// The end of its log.
        log: String,
    },
    /// The nodes did not agree on a JetStream meta leader.
    #[error(
        "no agreed JetStream meta leader within {timeout:?} (leaders seen: {leaders:?})\n{logs}"
    )]
    NoLeader {
        /// How long it was given.
        timeout: Duration,
        /// What each running node named.
        leaders: Vec<String>,
        /// The end of every node's log.
        logs: String,
    },
}

/// JetStream's `sync_interval`: when a node fsyncs what it acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncInterval {
    /// Before every acknowledgement (as shipped: an acknowledged frame survives a power cut).
    Always,
    /// Every so often (NATS's default is 2 minutes).
    Every(Duration),
}

impl std::str::FromStr for SyncInterval {
    type Err = String;

    /// `always` or a period such as `2m` or `30s`.
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "always" {
            return Ok(Self::Always);
        }
        let d = relay_emulator::spec::parse_duration(s)
            .map_err(|e| format!("sync interval {s:?}: expected `always` or a period: {e}"))?;
        if d.is_zero() {
            return Err(format!("sync interval {s:?}: must be positive"));
        }
        Ok(Self::Every(d))
    }
}

impl std::fmt::Display for SyncInterval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Always => f.write_str("always"),
            // NATS reads whole milliseconds in a quoted duration.
            Self::Every(d) => write!(f, "{}ms", d.as_millis()),
        }
    }
}

impl serde::Serialize for SyncInterval {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The node configuration with `sync` in place of the shipped `always`.
pub fn node_config(sync: SyncInterval) -> Result<String, NatsError> {
    if !NATS_CONF.contains(SYNC_ALWAYS_LINE) {
        return Err(NatsError::SyncLine);
    }
    Ok(match sync {
        SyncInterval::Always => NATS_CONF.to_owned(),
        SyncInterval::Every(_) => {
            NATS_CONF.replace(SYNC_ALWAYS_LINE, &format!("sync_interval: \"{sync}\""))
        }
    })
}

/// The shipped configuration with `sync` and without its `cluster` block: one server on its
/// own (TLS and client identities as shipped), for comparing a single node with one ingest.
pub fn standalone_config(sync: SyncInterval) -> Result<String, NatsError> {
    let conf = node_config(sync)?;
    let start = conf.find("\ncluster {").ok_or(NatsError::ClusterBlock)?;
    let end = conf[start..]
        .find("\n}\n")
        .map(|e| start + e + 3)
        .ok_or(NatsError::ClusterBlock)?;
    Ok(format!("{}{}", &conf[..start + 1], &conf[end..]))
}

/// `n` distinct free TCP ports on loopback: every listener is held until all are chosen, so
/// two nodes never get the same port (a node that cannot bind never joins the cluster).
pub fn free_tcp_ports(n: usize) -> Result<Vec<u16>, NatsError> {
    let held = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(NatsError::Port)?;
    held.iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()
        .map_err(NatsError::Port)
}

/// `server -c config` with what every node reads from the environment besides its name, ports
/// and routes: loopback, its `store`, the development certificates in `certs` and the ingest's
/// client identity; its log goes to `log`; killed when dropped.
fn server_command(
    server: &str,
    config: &Path,
    certs: &Path,
    store: &Path,
    log: std::fs::File,
) -> tokio::process::Command {
    let p = |f: &str| certs.join(f);
    let mut command = tokio::process::Command::new(server);
    command
        .arg("-c")
        .arg(config)
        .env("NATS_HOST", "127.0.0.1")
        .env("NATS_STORE_DIR", store)
        .env("NATS_CERT", p("nats-node.pem"))
        .env("NATS_KEY", p("nats-node.key"))
        .env("NATS_CA", p("hospital-ca.pem"))
        .env("NATS_INGEST_USER", relay_devcerts::NATS_INGEST_IDENTITY)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true);
    command
}

/// How to run a cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The `nats-server` binary.
    pub server: String,
    /// Nodes (3 for R3).
    pub nodes: usize,
    /// JetStream's fsync policy.
    pub sync: SyncInterval,
}

impl ClusterOptions {
    /// Three nodes, `sync_interval: always`, the server named by `$NATS_SERVER` or else
    /// `nats-server` on the PATH.
    pub fn new() -> Self {
        Self {
            server: std::env::var("NATS_SERVER").unwrap_or_else(|_| "nats-server".into()),
            nodes: 3,
            sync: SyncInterval::Always,
        }
    }
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self::new()
    }
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

    /// Its process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(tokio::process::Child::id)
    }
}

/// A cluster of nodes sharing one working directory (their stores survive restarts). Every
/// node is killed when the cluster is dropped.
#[derive(Debug)]
pub struct Cluster {
    /// The nodes, running or not.
    pub nodes: Vec<Node>,
    dir: PathBuf,
    certs: PathBuf,
    server: String,
    config: PathBuf,
}

impl Cluster {
    /// Starts the nodes in `dir` with the development certificates in `certs`
    /// (`nats-node.pem`, `hospital-ca.pem`, ...) and waits up to `timeout` until they agree on
    /// a JetStream meta leader.
    pub async fn start(
        certs: &Path,
        dir: &Path,
        options: &ClusterOptions,
        timeout: Duration,
    ) -> Result<Self, NatsError> {
        let ports = free_tcp_ports(3 * options.nodes)?;
        let nodes = ports
            .chunks_exact(3)
            .enumerate()
            .map(|(i, p)| Node {
                name: format!("nats-{}", i + 1),
                client: p[0],
                cluster: p[1],
                monitor: p[2],
                child: None,
            })
            .collect();
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| NatsError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let config = dir.join("nats.conf");
        std::fs::write(&config, node_config(options.sync)?).map_err(io(&config))?;
        let mut c = Self {
            nodes,
            dir: dir.to_owned(),
            certs: certs.to_owned(),
            server: options.server.clone(),
            config,
        };
        for i in 0..options.nodes {
            c.start_node(i)?;
        }
        c.meta_leader(timeout).await?;
        Ok(c)
    }

    /// Client URLs of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Node::url).collect()
    }

    /// (Re)starts node `i` on its ports and its store.
    pub fn start_node(&mut self, i: usize) -> Result<(), NatsError> {
        let routes: Vec<String> = (0..self.nodes.len())
            .filter(|&j| j != i)
            .map(|j| format!("tls://127.0.0.1:{}", self.nodes[j].cluster))
            .collect();
        let node = &self.nodes[i];
        let store = self.dir.join(&node.name);
        std::fs::create_dir_all(&store).map_err(|source| NatsError::Io {
            path: store.clone(),
            source,
        })?;
        let log_path = self.dir.join(format!("{}.log", node.name));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|source| NatsError::Io {
                path: log_path.clone(),
                source,
            })?;
        // A cluster of one or two still fills both route variables.
        let route = |k: usize| {
            routes
                .get(k)
                .or(routes.first())
                .cloned()
                .unwrap_or_else(|| format!("tls://127.0.0.1:{}", node.cluster))
        };
        let child = server_command(&self.server, &self.config, &self.certs, &store, log)
            .env("NATS_NAME", &node.name)
            .env("NATS_CLIENT_PORT", node.client.to_string())
            .env("NATS_CLUSTER_PORT", node.cluster.to_string())
            .env("NATS_MONITOR_PORT", node.monitor.to_string())
            .env("NATS_ROUTE_A", route(0))
            .env("NATS_ROUTE_B", route(1))
            .spawn()
            .map_err(|source| NatsError::Spawn {
                server: self.server.clone(),
                source,
            })?;
        self.nodes[i].child = Some(child);
        Ok(())
    }

    /// The last `lines` lines of every node's log, for a failure message.
    pub fn log_tails(&self, lines: usize) -> String {
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
        if let Some(mut child) = self.nodes.get_mut(i).and_then(|n| n.child.take()) {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// A running node's JetStream report (`/jsz`), with `query` appended.
    pub async fn jsz(&self, i: usize, query: &str) -> Option<Value> {
        let node = self.nodes.get(i)?;
        node.child.as_ref()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], node.monitor));
        let body = http_get(addr, &format!("/jsz{query}")).await.ok()?;
        serde_json::from_str(&body).ok()
    }

    /// Waits until the running nodes agree on a meta leader among them and each knows the
    /// whole cluster; returns the leader's index.
    pub async fn meta_leader(&self, timeout: Duration) -> Result<usize, NatsError> {
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
                return Ok(i);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(NatsError::NoLeader {
                    timeout,
                    leaders,
                    logs: self.log_tails(8),
                });
            }
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

/// One `nats-server` on its own (no cluster), started from [`standalone_config`] on loopback
/// with the development certificates; killed when dropped.
#[derive(Debug)]
pub struct Standalone {
    /// Client port (TLS).
    pub client: u16,
    /// Monitoring port.
    pub monitor: u16,
    child: tokio::process::Child,
}

impl Standalone {
    /// Starts a server storing in `dir` with the certificates in `certs` and waits up to
    /// `timeout` until JetStream is ready.
    pub async fn start(
        server: &str,
        certs: &Path,
        dir: &Path,
        sync: SyncInterval,
        timeout: Duration,
    ) -> Result<Self, NatsError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| NatsError::Io { path, source }
        };
        let store = dir.join("store");
        std::fs::create_dir_all(&store).map_err(io(&store))?;
        let config = dir.join("nats.conf");
        std::fs::write(&config, standalone_config(sync)?).map_err(io(&config))?;
        let log_path = dir.join("nats.log");
        let log = std::fs::File::create(&log_path).map_err(io(&log_path))?;
        let ports = free_tcp_ports(2)?;
        let child = server_command(server, &config, certs, &store, log)
            .env("NATS_NAME", "nats-standalone")
            .env("NATS_CLIENT_PORT", ports[0].to_string())
            .env("NATS_MONITOR_PORT", ports[1].to_string())
            .spawn()
            .map_err(|source| NatsError::Spawn {
                server: server.to_owned(),
                source,
            })?;
        let s = Self {
            client: ports[0],
            monitor: ports[1],
            child,
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let health = SocketAddr::from(([127, 0, 0, 1], s.monitor));
        while http_get(health, "/healthz?js-enabled-only=true")
            .await
            .is_err()
        {
            if tokio::time::Instant::now() >= deadline {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                return Err(NatsError::NotReady {
                    timeout,
                    log: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(s)
    }

    /// Its client URL.
    pub fn url(&self) -> String {
        format!("tls://127.0.0.1:{}", self.client)
    }

    /// Its process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

/// The body of a plain-HTTP GET (monitoring and metrics endpoints). HTTP/1.0, so the answer is
/// never chunked; bounded in size and time.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let read = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        // A node's full JetStream report or an ingest's metrics: a few MiB at most.
        s.take(64 * 1024 * 1024).read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(MONITOR_TIMEOUT, read)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))??;
    let text = String::from_utf8_lossy(&buf);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "no HTTP header",
        ));
    };
    if !head.starts_with("HTTP/1.") || head.split_whitespace().nth(1) != Some("200") {
        return Err(std::io::Error::other(format!(
            "GET {path}: {}",
            head.lines().next().unwrap_or("")
        )));
    }
    Ok(body.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_standalone_config_drops_only_the_cluster_block() {
        let conf = standalone_config(SyncInterval::Always).unwrap();
        let settings: Vec<&str> = conf
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect();
        assert!(
            !settings
                .iter()
                .any(|l| l.contains("cluster {") || l.contains("NATS_ROUTE")),
            "{conf}"
        );
        for kept in [
            "tls {",
            "verify_and_map: true",
            "sync_interval: always",
            "jetstream {",
        ] {
            assert!(conf.contains(kept), "{kept} missing from\n{conf}");
        }
        assert!(
            conf.trim_end().ends_with("write_deadline: \"10s\""),
            "{conf}"
        );
    }

    #[test]
    fn sync_interval_parses_and_rewrites_the_shipped_config() {
        assert_eq!("always".parse(), Ok(SyncInterval::Always));
        assert_eq!(
            "2m".parse(),
            Ok(SyncInterval::Every(Duration::from_secs(120)))
        );
        assert!("0s".parse::<SyncInterval>().is_err());
        assert!("sometimes".parse::<SyncInterval>().is_err());
        let shipped = node_config(SyncInterval::Always).unwrap_or_default();
        assert_eq!(shipped, NATS_CONF);
        let lazy = node_config(SyncInterval::Every(Duration::from_secs(120))).unwrap_or_default();
        assert!(lazy.contains("sync_interval: \"120000ms\""), "{lazy}");
        assert!(!lazy.contains(SYNC_ALWAYS_LINE));
    }
}
