//! The emulator on real UDP sockets.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::Duration;

use relay_emulator::{BearerSpec, Link, TraceCache, start_links, trace::OPPORTUNITY_BYTES};
use tokio::net::UdpSocket;
use tokio::time::Instant;

fn trace(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../data/traces")
        .join(name)
        .display()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "real-time soak run (30 s); the model's capacity is tested on virtual time"]
async fn a_trace_link_delivers_the_trace_capacity_over_30_s_on_real_sockets() {
    let sink = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let spec = BearerSpec::parse(
        &format!(
            "{},offset=200s,queue=512KiB",
            trace("TMobile-UMTS-driving.up")
        ),
        &mut TraceCache::default(),
    )
    .unwrap();
    let expected_opportunities = match &spec.up.capacity {
        relay_emulator::Capacity::Trace { trace, .. } => {
            trace.opportunities_between(200_000, 230_000)
        }
        _ => unreachable!(),
    };
    let link = Link::start(
        "127.0.0.1:0".parse().unwrap(),
        sink.local_addr().unwrap(),
        spec,
        1,
    )
    .await
    .unwrap();
    let start = Instant::now();
    let window = Duration::from_secs(30);
    let sender = tokio::spawn(async move {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut tick = tokio::time::interval(Duration::from_millis(2));
        let payload = vec![7u8; 1200];
        // Well above the trace's capacity, so the queue never runs dry.
        while start.elapsed() < window {
            tick.tick().await;
            for _ in 0..2 {
                s.send_to(&payload, link.addr).await.unwrap();
            }
        }
        link
    });
    let mut received = 0u64;
    let mut buf = vec![0u8; 2048];
    while let Ok(Ok(n)) = tokio::time::timeout_at(start + window, sink.recv(&mut buf)).await {
        received += n as u64;
    }
    let link = sender.await.unwrap();
    let capacity = expected_opportunities as f64 * OPPORTUNITY_BYTES as f64;
    let ratio = received as f64 / capacity;
    assert!(
        (0.98..=1.02).contains(&ratio),
        "received {received} B, trace capacity {capacity} B over 30 s ({ratio:.4}); {:?}",
        link.counters()
    );
    assert!(
        link.counters().up.dropped_queue_full > 0,
        "link was saturated"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_and_restore_at_runtime_both_ways() {
    // An echo server behind the link.
    let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = echo.recv_from(&mut buf).await {
            let _ = echo.send_to(&buf[..n], from).await;
        }
    });
    let mut traces = TraceCache::default();
    let specs = [
        BearerSpec::parse("rate=10mbit,delay=20ms", &mut traces).unwrap(),
        BearerSpec::parse("rate=10mbit,delay=5ms", &mut traces).unwrap(),
    ];
    let mut links = start_links(echo_addr, &specs, 1).await.unwrap();
    let other = links.pop().unwrap();
    let link = links.pop().unwrap();
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let ping = |i: u8| {
        let client = &client;
        let to = link.addr;
        async move {
            client.send_to(&[i; 100], to).await.unwrap();
            let mut buf = [0u8; 1500];
            match tokio::time::timeout(Duration::from_millis(1000), client.recv(&mut buf)).await {
                Ok(Ok(n)) => Some((n, buf[0])),
                _ => None,
            }
        }
    };
    let t = Instant::now();
    assert_eq!(ping(1).await, Some((100, 1)));
    assert!(
        t.elapsed() >= Duration::from_millis(40),
        "delay applied both ways"
    );
    link.cut();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(ping(2).await, None);
    link.restore();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(ping(3).await, Some((100, 3)));
    // Cutting one link leaves the other alone.
    link.cut();
    tokio::time::sleep(Duration::from_millis(50)).await;
    client.send_to(&[9; 100], other.addr).await.unwrap();
    let mut buf = [0u8; 1500];
    let n = tokio::time::timeout(Duration::from_millis(1000), client.recv(&mut buf))
        .await
        .expect("the other link still answers")
        .unwrap();
    assert_eq!((n, buf[0]), (100, 9));
    let c = link.stop();
    assert_eq!(c.up.offered_packets, 3);
    assert_eq!(c.up.dropped_link_down, 1);
    assert_eq!(c.down.delivered_packets, 2);
}
