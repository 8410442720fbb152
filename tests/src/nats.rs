//! A real NATS JetStream cluster on loopback for the tests: `loadtest`'s cluster (nodes
//! started from the shipped `deploy/nats/nats.conf`: mutual TLS for clients and routes,
//! `sync_interval: always`), killed and restarted at will; failures panic with the nodes' logs.

use std::path::Path;
use std::time::Duration;

use loadtest::nats::ClusterOptions;

use crate::Pki;

pub use loadtest::nats::Node;

/// A cluster of nodes sharing one working directory (their stores survive restarts).
#[derive(Debug)]
pub struct Cluster(loadtest::nats::Cluster);

impl std::ops::Deref for Cluster {
    type Target = loadtest::nats::Cluster;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Cluster {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Cluster {
    /// Starts `n` (3 unless testing something else) nodes in `dir` with certificates of `pki`
    /// and waits until they agree on a JetStream meta leader. The server is `$NATS_SERVER`,
    /// else `nats-server` on the PATH (tests/run.sh installs the pinned version).
    pub async fn start(pki: &Pki, dir: &Path, n: usize) -> Self {
        let options = ClusterOptions {
            nodes: n,
            ..ClusterOptions::new()
        };
        match loadtest::nats::Cluster::start(pki.path(), dir, &options, Duration::from_secs(60))
            .await
        {
            Ok(c) => Self(c),
            Err(e) => panic!("NATS cluster (tests/run.sh installs nats-server): {e}"),
        }
    }

    /// (Re)starts node `i` on its ports and its store.
    pub fn start_node(&mut self, i: usize) {
        if let Err(e) = self.0.start_node(i) {
            panic!("restarting NATS node {i}: {e}");
        }
    }

    /// Waits until the running nodes agree on a meta leader among them and each knows the
    /// whole cluster; returns the leader's index.
    pub async fn meta_leader(&self, timeout: Duration) -> usize {
        self.0
            .meta_leader(timeout)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
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
