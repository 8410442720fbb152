//! The waveform codec across the relay: packed frames arrive bit-exact, the codec is
//! negotiated (an agent told to pack sends plain samples to an ingest that does not decode
//! them), and an agent that sends plain samples (as agents before the codec did) is served
//! as before.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use hospital_ingest::Ingest;
use relay_e2e::*;
use vehicle_agent::Agent;
use vehicle_agent::config::WaveformEncodingChoice;

/// Samples per signal of record 100.
const RECORD_100_SAMPLES: u64 = 650_000;

/// What one run put on the wire: frame bytes the ingest read, and its waveform frames by
/// encoding (differences of the process-wide counters over the run).
#[derive(Debug, Clone, Copy)]
struct Wire {
    bytes: f64,
    lpc1_frames: f64,
    plain_frames: f64,
}

fn wire_counters(body: &str) -> Wire {
    let frames = |encoding: &str| {
        labelled_metric(
            body,
            "relay_ingest_waveform_frames_total",
            &format!("encoding=\"{encoding}\""),
        )
        .unwrap_or(0.0)
    };
    Wire {
        bytes: metric_value(body, "relay_ingest_frame_bytes_total"),
        lpc1_frames: frames("lpc1"),
        plain_frames: frames("samples"),
    }
}

/// Record 100 (30 min, two leads, 360 Hz) from `vehicle` with `encoding` to an ingest that
/// decodes the codec or not; checks it arrives bit-exact and returns the wire counters.
async fn send_record_100(
    vehicle: &str,
    encoding: WaveformEncodingChoice,
    ingest_decodes: bool,
) -> Wire {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let mut icfg = ingest_config(&pki, &work.path().join("store.redb"));
    icfg.quic.decode_waveform_codec = ingest_decodes;
    let ingest = Ingest::start(icfg).await.unwrap();
    let metrics = ingest.metrics_addr.unwrap();
    let before = wire_counters(&http_get(metrics, "/metrics").await.1);
    let mut cfg = agent_config(
        pki.path(),
        vehicle,
        ingest.quic_addr,
        vec![replay("100", 300.0)],
    );
    // Longer frames than the default keep this debug-build run short (the 40 ms figures are
    // in the loadtest codec report).
    cfg.framing.frame = Duration::from_millis(200);
    cfg.framing.waveform_encoding = encoding;
    let agent = Agent::start(cfg).await.unwrap();
    let url = format!("https://{}", ingest.grpc_addr);
    let collected = collect_until(
        || url.clone(),
        &pki.subscriber("ed-console"),
        &work.path().join("wfdb"),
        Duration::from_secs(240),
        |c| c.waveform_samples(vehicle) >= RECORD_100_SAMPLES,
    )
    .await;
    assert_eq!(collected.duplicates, 0);
    let after = wire_counters(&http_get(metrics, "/metrics").await.1);
    assert_bit_exact(collected, vehicle, "100");
    agent.shutdown().await.unwrap();
    ingest.shutdown().await.unwrap();
    Wire {
        bytes: after.bytes - before.bytes,
        lpc1_frames: after.lpc1_frames - before.lpc1_frames,
        plain_frames: after.plain_frames - before.plain_frames,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packed_and_plain_agents_and_an_ingest_without_the_codec_all_deliver_bit_exact() {
    // One after the other: the counters are process-wide.
    let packed = send_record_100("amb-1", WaveformEncodingChoice::Lpc1, true).await;
    let plain = send_record_100("amb-2", WaveformEncodingChoice::Samples, true).await;
    let fallback = send_record_100("amb-3", WaveformEncodingChoice::Lpc1, false).await;
    // 30 min in 200 ms frames of 72 samples: 9,028 frames, each read once or (re-sent) more.
    for (name, w, lpc1) in [
        ("packed", packed, true),
        ("plain", plain, false),
        ("fallback", fallback, false),
    ] {
        let (used, unused) = if lpc1 {
            (w.lpc1_frames, w.plain_frames)
        } else {
            (w.plain_frames, w.lpc1_frames)
        };
        assert!(used >= 9_028.0 && unused == 0.0, "{name}: {w:?}");
    }
    // Record 100 packs to about 0.3 of its 16-bit size, varints take about 0.85 (frame
    // headers on top of both).
    assert!(
        packed.bytes < 0.5 * plain.bytes,
        "packed {packed:?} vs plain {plain:?}"
    );
    assert!(
        (fallback.bytes - plain.bytes).abs() < 0.1 * plain.bytes,
        "fallback {fallback:?} vs plain {plain:?}"
    );
}
