//! Admission before cost: a client without a certificate floods the QUIC port with valid
//! Initials from changing source ports (fire and forget), first from another loopback address
//! than the vehicles, then from the same one. A vehicle that connects during the
//! flood has its session within 2 s, and a vehicle streaming throughout keeps its connection
//! and gets everything acknowledged.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hospital_ingest::Ingest;
use relay_e2e::*;
use relay_proto::wire::v1::{ControlMessage, Hello, control_message::Body};
use tokio::time::Instant;
use vehicle_agent::Agent;

/// Sends real QUIC Initials (each with its own connection id, captured from a client that
/// never goes on) at `rate` per second for `duration`, each from a fresh socket on `bind` that
/// is closed right away: fire and forget, nothing answers the ingest. Returns how many.
async fn flood(target: SocketAddr, bind: IpAddr, ca: &Path, rate: u64, duration: Duration) -> u64 {
    // A stranger: it trusts the ingest's CA, so its handshakes are real, but has no certificate.
    let mut roots = rustls::RootCertStore::empty();
    for c in relay_ops::pem::load_certs(ca).unwrap() {
        roots.add(c).unwrap();
    }
    let mut crypto = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    crypto.alpn_protocols = vec![relay_proto::ALPN.to_vec()];
    let client = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap(),
    ));
    let maker = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let until = Instant::now() + duration;
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    let mut sent = 0;
    let mut buf = vec![0u8; 2048];
    while Instant::now() < until {
        tick.tick().await;
        // Capture one Initial: the client dials a socket of ours instead of the ingest.
        let sniffer = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let connecting = maker
            .connect_with(client.clone(), sniffer.local_addr().unwrap(), "localhost")
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(1), sniffer.recv_from(&mut buf)).await;
        drop(connecting);
        let Ok(Ok((len, _))) = got else { continue };
        // Replay it from a fresh port, then vanish.
        let socket = std::net::UdpSocket::bind(SocketAddr::new(bind, 0)).unwrap();
        if socket.send_to(&buf[..len], target).is_ok() {
            sent += 1;
        }
    }
    sent
}

/// Time from dialling to a HelloAck for a vehicle with a certificate.
async fn time_to_session(pki: &Pki, vehicle: &str, ingest: SocketAddr) -> Duration {
    use bytes::Bytes;
    use futures::{SinkExt, StreamExt};
    use prost::Message;
    use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
    let started = Instant::now();
    let files = vehicle_agent::config::TlsFiles {
        ca_cert: pki.path().join("hospital-ca.pem"),
        cert: pki.path().join(format!("{vehicle}.pem")),
        key: pki.path().join(format!("{vehicle}.key")),
    };
    let client = vehicle_agent::tls::client_config(
        &files,
        &vehicle_agent::config::IngestEndpoint::default(),
        Duration::from_millis(250),
    )
    .unwrap();
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = ep
        .connect_with(client, ingest, "localhost")
        .unwrap()
        .await
        .unwrap();
    let (send, recv) = conn.open_bi().await.unwrap();
    let mut w = FramedWrite::new(send, LengthDelimitedCodec::new());
    let mut r = FramedRead::new(recv, LengthDelimitedCodec::new());
    let hello = Hello {
        protocol_version: relay_proto::PROTOCOL_VERSION,
        vehicle_id: vehicle.into(),
        session_id: 7,
        streams: vec![relay_proto::model::StreamDescriptor {
            stream_id: 0,
            kind: relay_proto::model::StreamKind::Vitals as i32,
            name: "vitals".into(),
            waveform: None,
        }],
        agent_version: "test".into(),
    };
    w.send(Bytes::from(
        ControlMessage {
            body: Some(Body::Hello(hello)),
        }
        .encode_to_vec(),
    ))
    .await
    .unwrap();
    let reply = r.next().await.unwrap().unwrap();
    let msg = ControlMessage::decode(reply.freeze()).unwrap();
    assert!(matches!(msg.body, Some(Body::HelloAck(_))), "{msg:?}");
    let took = started.elapsed();
    conn.close(quinn::VarInt::from_u32(0), b"done");
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_flood_without_a_certificate_locks_out_no_vehicle() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let ingest = Ingest::start(ingest_config(&pki, &work.path().join("s.redb")))
        .await
        .unwrap();
    let agent = Agent::start(agent_config(
        pki.path(),
        "amb-1",
        ingest.quic_addr,
        vitals_and_gps(),
    ))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ca = pki.path().join("hospital-ca.pem");
    for (bind, vehicle) in [([127, 0, 0, 2], "amb-2"), ([127, 0, 0, 1], "amb-3")] {
        let flooding = {
            let ca = ca.clone();
            let target = ingest.quic_addr;
            tokio::spawn(async move {
                flood(
                    target,
                    IpAddr::from(bind),
                    &ca,
                    1000,
                    Duration::from_secs(6),
                )
                .await
            })
        };
        tokio::time::sleep(Duration::from_secs(2)).await;
        let took = time_to_session(&pki, vehicle, ingest.quic_addr).await;
        let started = flooding.await.unwrap();
        println!(
            "flood from {bind:?}: {started} handshakes started; {vehicle} had its session after {took:?}"
        );
        assert!(started > 2000, "the flood ran ({started})");
        assert!(took < Duration::from_secs(2), "{vehicle} waited {took:?}");
    }
    let (_, body) = http_get(ingest.metrics_addr.unwrap(), "/metrics").await;
    assert!(
        metric_value(&body, "relay_ingest_handshake_retries_total") > 0.0,
        "the flood met Retry: {body}"
    );
    assert_eq!(
        metric_value(&body, "relay_agent_connects_total"),
        1.0,
        "the streaming vehicle never lost its connection"
    );
    let summary = agent.shutdown().await.unwrap();
    assert_eq!(summary.unacked_at_exit, 0, "everything produced was stored");
    ingest.shutdown().await.unwrap();
}
