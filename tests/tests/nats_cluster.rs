//! The shipped 3-node NATS JetStream configuration (deploy/nats/nats.conf, issue 13) in a real
//! cluster on loopback: the nodes find each other over mutually authenticated TLS routes, the
//! JetStream meta group has a leader with a quorum, every write is fsynced
//! (`sync_interval: always`), clients must come with TLS and a certificate, and the cluster
//! elects a new leader when the leader is killed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use relay_e2e::Pki;
use relay_e2e::nats::Cluster;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_nats_configuration_forms_a_tls_cluster_that_fsyncs_and_survives_its_leader() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(&pki, work.path(), 3).await;
    let leader = cluster.meta_leader(Duration::from_secs(60)).await;
    for i in 0..3 {
        let j = cluster.jsz(i, "").await.unwrap();
        assert_eq!(
            j["meta_cluster"]["cluster_size"], 3,
            "{}",
            j["meta_cluster"]
        );
        assert_eq!(j["config"]["sync_always"], true, "every write fsynced");
        // Clients are told TLS with a certificate is required (no plaintext).
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", cluster.nodes[i].client))
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
    let killed = tokio::time::Instant::now();
    cluster.kill(leader).await;
    let new_leader = cluster.meta_leader(Duration::from_secs(60)).await;
    assert_ne!(new_leader, leader);
    eprintln!(
        "meta leader {} killed; {} elected and agreed within {:?}",
        cluster.nodes[leader].name,
        cluster.nodes[new_leader].name,
        killed.elapsed()
    );
}
