//! GPS inputs (issue 14): an NMEA log replayed through the agent, and gpsd's JSON protocol
//! from a small fake gpsd on loopback, arrive at a gRPC subscriber as location frames with the
//! positions, speed, fix and satellites of the input.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use hospital_ingest::Ingest;
use relay_e2e::*;
use relay_proto::model::{FixQuality, Location, frame::Payload};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use vehicle_agent::Agent;
use vehicle_agent::config::SourceConfig;

fn drive_log() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/gps/drive.nmea")
}

/// What the log says per epoch, read with plain string splitting (not the agent's parser):
/// (lat, lon, speed m/s, fix, satellites) of every GGA with a position, checksum valid.
fn expected_from_log(text: &str) -> Vec<(f64, f64, f64, FixQuality, u32)> {
    let valid = |line: &str| {
        let Some((body, sum)) = line
            .trim()
            .strip_prefix('$')
            .and_then(|l| l.split_once('*'))
        else {
            return false;
        };
        let x = body.bytes().fold(0u8, |a, b| a ^ b);
        u8::from_str_radix(sum, 16) == Ok(x)
    };
    let deg = |v: &str, hemi: &str, width: usize| {
        let d: f64 = v[..width].parse().unwrap();
        let m: f64 = v[width..].parse().unwrap();
        let x = d + m / 60.0;
        if hemi == "S" || hemi == "W" { -x } else { x }
    };
    let mut speed_knots = 0.0;
    let mut rmc_valid = true;
    let mut out = Vec::new();
    for line in text.lines().filter(|l| valid(l)) {
        let f: Vec<&str> = line.trim().split('*').next().unwrap().split(',').collect();
        match &f[0][3..] {
            "RMC" => {
                rmc_valid = f[2] == "A";
                speed_knots = f[7].parse().unwrap_or(0.0);
            }
            "GGA" if !f[2].is_empty() => {
                let quality: u32 = f[6].parse().unwrap();
                let fix = match quality {
                    _ if !rmc_valid => FixQuality::None,
                    0 | 6 => FixQuality::None,
                    2 => FixQuality::Dgps,
                    _ if f[9].is_empty() => FixQuality::Fix2d, // no altitude: 2D (the GSA says so too)
                    _ => FixQuality::Fix3d,
                };
                out.push((
                    deg(f[2], f[3], 2),
                    deg(f[4], f[5], 3),
                    speed_knots * 1852.0 / 3600.0,
                    fix,
                    f[7].parse().unwrap(),
                ));
            }
            _ => {}
        }
    }
    out
}

fn locations(c: &Collected, vehicle: &str) -> Vec<Location> {
    let mut frames: Vec<_> = c
        .locations
        .iter()
        .filter(|a| a.stream.0 == vehicle)
        .map(|a| a.frame.clone())
        .collect();
    frames.sort_by_key(|f| f.seq);
    frames
        .into_iter()
        .filter_map(|f| match f.payload {
            Some(Payload::Location(l)) => Some(l),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_nmea_log_and_a_gpsd_feed_arrive_as_location_frames() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let ingest = Ingest::start(ingest_config(&pki, &work.path().join("store.redb")))
        .await
        .unwrap();

    // amb-1: the 90 s drive log, replayed at 10x.
    let nmea = SourceConfig::Nmea {
        path: drive_log(),
        replay: true,
        speed: 10.0,
        r#loop: false,
    };
    let expected = expected_from_log(&std::fs::read_to_string(drive_log()).unwrap());
    assert_eq!(expected.len(), 84, "the log's epochs with a position");
    let nmea_agent = Agent::start(agent_config(
        pki.path(),
        "amb-1",
        ingest.quic_addr,
        vec![nmea],
    ))
    .await
    .unwrap();

    // amb-2: a fake gpsd on loopback speaking the documented protocol: it waits for ?WATCH,
    // answers VERSION, DEVICES and WATCH, then a SKY and a TPV per second (here every 50 ms),
    // a TPV without fix first and a line of garbage in between.
    let gpsd = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gpsd_addr = gpsd.local_addr().unwrap();
    const TPVS: usize = 20;
    let fake = tokio::spawn(async move {
        let (sock, _) = gpsd.accept().await.unwrap();
        let (r, mut w) = sock.into_split();
        w.write_all(b"{\"class\":\"VERSION\",\"release\":\"3.25\",\"rev\":\"3.25\",\"proto_major\":3,\"proto_minor\":15}\n").await.unwrap();
        let mut cmd = String::new();
        BufReader::new(r).read_line(&mut cmd).await.unwrap();
        assert!(
            cmd.starts_with("?WATCH={\"enable\":true,\"json\":true}"),
            "{cmd}"
        );
        w.write_all(b"{\"class\":\"DEVICES\",\"devices\":[{\"class\":\"DEVICE\",\"path\":\"/dev/ttyACM0\",\"driver\":\"u-blox\",\"activated\":\"2026-11-29T10:00:00.000Z\",\"native\":1,\"bps\":9600,\"parity\":\"N\",\"stopbits\":1,\"cycle\":1.00}]}\n{\"class\":\"WATCH\",\"enable\":true,\"json\":true,\"nmea\":false,\"raw\":0,\"scaled\":false,\"timing\":false,\"split24\":false,\"pps\":false}\n{\"class\":\"TPV\",\"device\":\"/dev/ttyACM0\",\"mode\":1}\nnot json at all\n").await.unwrap();
        for k in 0..TPVS {
            let sky = format!(
                "{{\"class\":\"SKY\",\"device\":\"/dev/ttyACM0\",\"hdop\":0.9,\"uSat\":{},\"satellites\":[]}}\n",
                6 + k % 4
            );
            let tpv = format!(
                "{{\"class\":\"TPV\",\"device\":\"/dev/ttyACM0\",\"mode\":3,\"status\":{},\"time\":\"2026-11-29T10:00:{:02}.000Z\",\"lat\":{},\"lon\":{},\"altMSL\":35.5,\"speed\":{},\"track\":90.0,\"eph\":3.5,\"epv\":5.0,\"eps\":0.3}}\n",
                if k < 10 { 1 } else { 2 },
                k,
                52.5 + k as f64 * 1e-4,
                13.4 + k as f64 * 2e-4,
                10.0 + k as f64
            );
            w.write_all(sky.as_bytes()).await.unwrap();
            w.write_all(tpv.as_bytes()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Keep the connection open until the test is done.
        tokio::time::sleep(Duration::from_secs(60)).await;
    });
    let gpsd_agent = Agent::start(agent_config(
        pki.path(),
        "amb-2",
        ingest.quic_addr,
        vec![SourceConfig::Gpsd { address: gpsd_addr }],
    ))
    .await
    .unwrap();

    let url = format!("https://{}", ingest.grpc_addr);
    let collected = collect_until(
        || url.clone(),
        &pki.subscriber("ed-console"),
        &work.path().join("wfdb"),
        Duration::from_secs(120),
        |c| locations(c, "amb-1").len() >= expected.len() && locations(c, "amb-2").len() >= TPVS,
    )
    .await;
    assert_eq!(collected.duplicates, 0);

    let got = locations(&collected, "amb-1");
    assert_eq!(got.len(), expected.len());
    for (k, (l, (lat, lon, speed, fix, sats))) in got.iter().zip(&expected).enumerate() {
        assert!((l.latitude_deg - lat).abs() < 1e-9, "epoch {k}: {l:?}");
        assert!((l.longitude_deg - lon).abs() < 1e-9, "epoch {k}: {l:?}");
        assert!(
            (l.speed_mps - speed).abs() < 1e-3,
            "epoch {k}: {l:?} vs {speed}"
        );
        assert_eq!(l.fix_quality, *fix as i32, "epoch {k}: {l:?}");
        assert_eq!(l.satellites, *sats, "epoch {k}");
        assert!(
            l.horizontal_accuracy_m > 0.0 && l.hdop > 0.0,
            "GST and HDOP carried"
        );
        assert!(l.fix_time_ns > 0, "RMC date and time carried");
    }

    let got = locations(&collected, "amb-2");
    assert_eq!(got.len(), TPVS, "one frame per TPV with a position");
    for (k, l) in got.iter().enumerate() {
        assert!((l.latitude_deg - (52.5 + k as f64 * 1e-4)).abs() < 1e-12);
        assert!((l.longitude_deg - (13.4 + k as f64 * 2e-4)).abs() < 1e-12);
        assert_eq!(
            (l.altitude_m, l.speed_mps, l.heading_deg),
            (35.5, 10.0 + k as f64, 90.0)
        );
        let fix = if k < 10 {
            FixQuality::Fix3d
        } else {
            FixQuality::Dgps
        };
        assert_eq!(l.fix_quality, fix as i32);
        assert_eq!(l.satellites, 6 + (k % 4) as u32);
        assert_eq!(
            (
                l.horizontal_accuracy_m,
                l.vertical_accuracy_m,
                l.speed_accuracy_mps,
                l.hdop
            ),
            (3.5, 5.0, 0.3, 0.9)
        );
        assert_eq!(
            l.fix_time_ns,
            1_795_946_400_000_000_000 + k as i64 * 1_000_000_000
        );
    }
    fake.abort();
    nmea_agent.shutdown().await.unwrap();
    gpsd_agent.shutdown().await.unwrap();
    ingest.shutdown().await.unwrap();
}
