//! ed-web in a real browser: headless Chromium logs in, reads the board and a vehicle's live
//! view, and the test checks what the page itself received and drew.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::Duration;

use ed_client::web::{EdWeb, WebConfig, auth::hash_password};
use hospital_ingest::Ingest;
use relay_e2e::browser::Browser;
use relay_e2e::{
    Pki, agent_config, ingest_config, links, over_links, record, replay, vitals_and_gps,
};
use serde_json::Value;
use vehicle_agent::Agent;
use vehicle_agent::config::Policy;

/// One browser test at a time: each runs Chromium beside an ingest, agents and ed-web, and
/// their latency bounds are about the relay, not about two of them sharing two cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The declared pixel density of the test's "screen": 25 mm/s is then 100 px/s and
/// 10 mm/mV 40 px/mV.
const PPMM: f64 = 4.0;

fn users_file(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("users.toml");
    let text = format!(
        "[[user]]\nname = \"dr-lee\"\npassword_hash = \"{}\"\nvehicles = [\"amb-1\", \"amb-2\"]\n\n\
         [[user]]\nname = \"nurse-kim\"\npassword_hash = \"{}\"\nvehicles = [\"amb-2\"]\n",
        hash_password("lee's long passphrase").unwrap(),
        hash_password("kim's long passphrase").unwrap(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn web_config(pki: &Pki, ingest: &Ingest, work: &Path) -> WebConfig {
    let mut w = WebConfig {
        allow_dev_pki: true,
        ..WebConfig::default()
    };
    w.http.listen = "127.0.0.1:0".parse().unwrap();
    w.http.cert = pki.path().join("ed-web-server.pem");
    w.http.key = pki.path().join("ed-web-server.key");
    w.ingest.url = format!("https://{}", ingest.grpc_addr);
    w.ingest.ca = pki.path().join("hospital-ca.pem");
    w.ingest.cert = pki.path().join("ed-web.pem");
    w.ingest.key = pki.path().join("ed-web.key");
    w.ingest.refresh = Duration::from_millis(500);
    w.auth.users_file = users_file(work);
    w.display.pixels_per_mm = PPMM;
    w.audit.path = Some(work.join("ed-web-audit.jsonl"));
    w
}

async fn login(b: &mut Browser, base: &str, user: &str, password: &str) {
    b.navigate(&format!("{base}/login")).await;
    b.eval(&format!(
        "document.getElementById('user').value = {user:?}; \
         document.getElementById('password').value = {password:?}; \
         document.getElementById('login').submit(); true"
    ))
    .await;
    b.wait_for(
        "document.readyState === 'complete' && (location.pathname !== '/login' || location.search !== '')",
        Duration::from_secs(30),
    )
    .await;
}

async fn status_of(b: &mut Browser, path: &str) -> u64 {
    // An EventSource URL answers 200 and stays open: abort after the headers.
    b.eval(&format!(
        "(async () => {{ const c = new AbortController(); \
           const r = await fetch({path:?}, {{ signal: c.signal, redirect: 'manual' }}); \
           c.abort(); return r.type === 'opaqueredirect' ? 303 : r.status; }})()"
    ))
    .await
    .as_u64()
    .unwrap()
}

/// FNV-1a over each sample's four bytes (little-endian), as the page computes it.
fn fnv(samples: &[i32]) -> u32 {
    let mut h: u32 = 2_166_136_261;
    for v in samples {
        for b in v.to_le_bytes() {
            h ^= u32::from(b);
            h = h.wrapping_mul(16_777_619);
        }
    }
    h
}

/// Centres of the runs of columns in `row` that `is_line` accepts.
fn line_centres(row: &[[u8; 3]], is_line: impl Fn([u8; 3]) -> bool) -> Vec<f64> {
    let mut centres = Vec::new();
    let mut run: Option<usize> = None;
    for (x, px) in row.iter().enumerate() {
        match (is_line(*px), run) {
            (true, None) => run = Some(x),
            (false, Some(start)) => {
                centres.push((start + x - 1) as f64 / 2.0);
                run = None;
            }
            _ => {}
        }
    }
    centres
}

fn decode_png(bytes: &[u8]) -> (usize, usize, Vec<[u8; 3]>) {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    let pixels = buf[..info.buffer_size()]
        .chunks(channels)
        .map(|p| [p[0], p[1], p[2]])
        .collect();
    (info.width as usize, info.height as usize, pixels)
}

/// Validates a Bundle with the independent `fhir.resources` package (R4B models) and decodes
/// its waveform SampledData against `orig` (every value within one quantisation step, `E`
/// only where no sample is known). Returns how many samples per lead it held.
fn check_fhir_export(bundle: &Path, orig: &relay_wfdb::Record) -> usize {
    let out = std::process::Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/fhir/validate.py"))
        .arg(bundle)
        .output()
        .expect("python3 (tests/run.sh installs fhir.resources)");
    assert!(
        out.status.success(),
        "fhir.resources refused the bundle: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let counts: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(counts["Device"], 1, "{counts}");
    assert_eq!(counts["Encounter"], 1, "{counts}");
    let json: Value = serde_json::from_slice(&std::fs::read(bundle).unwrap()).unwrap();
    let resources: Vec<&Value> = json["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["resource"])
        .collect();
    let encounter = resources
        .iter()
        .find(|r| r["resourceType"] == "Encounter")
        .unwrap();
    assert_eq!(encounter["identifier"][0]["value"], "EMS-2026-0042");
    let nsig = orig.header.signals.len();
    let mut held = std::collections::BTreeSet::new();
    for r in resources
        .iter()
        .filter(|r| r["component"][0]["valueSampledData"].is_object())
    {
        assert_eq!(
            r["encounter"]["reference"],
            format!("Encounter/{}", encounter["id"].as_str().unwrap())
        );
        let first: usize = r["identifier"][0]["value"]
            .as_str()
            .unwrap()
            .rsplit('/')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        for (c, comp) in r["component"].as_array().unwrap().iter().enumerate() {
            let sd = &comp["valueSampledData"];
            let (origin, factor) = (
                sd["origin"]["value"].as_f64().unwrap(),
                sd["factor"].as_f64().unwrap(),
            );
            let sig = &orig.header.signals[c];
            for (i, token) in sd["data"].as_str().unwrap().split(' ').enumerate() {
                if token == "E" {
                    continue;
                }
                let value: f64 = token.parse().unwrap();
                let stored = orig.samples[(first + i) * nsig + c];
                let physical = (f64::from(stored) - f64::from(sig.baseline)) / sig.gain;
                assert!(
                    (origin + factor * value - physical).abs() <= 1.0 / sig.gain,
                    "lead {c} sample {}",
                    first + i
                );
                if c == 0 {
                    held.insert(first + i);
                }
            }
        }
    }
    // From sample 0 without a hole: the cut was back-filled before the export.
    let n = held.len();
    assert_eq!(
        held.last().copied(),
        Some(n - 1),
        "samples 0..{n} without E"
    );
    n
}

fn screenshot_dir() -> std::path::PathBuf {
    std::env::var_os("ED_WEB_SCREENSHOTS").map_or_else(
        || Path::new(env!("CARGO_TARGET_TMPDIR")).join("ed-web-screenshots"),
        std::path::PathBuf::from,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clinicians_see_the_board_and_every_sample_of_a_live_ecg_in_the_browser() {
    let _one = ONE_AT_A_TIME.lock().await;
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let mut icfg = ingest_config(&pki, &work.path().join("store.redb"));
    // A short reorder window: frames recovered over the other bearer after a cut come later
    // than it, so the ingest announces the gap and the page must draw it, then fill it.
    icfg.reassembly.reorder_window = Duration::from_millis(5);
    let ingest = Ingest::start(icfg).await.unwrap();
    let web = EdWeb::start(web_config(&pki, &ingest, work.path()))
        .await
        .unwrap();
    let base = format!("https://127.0.0.1:{}", web.addr.port());

    // amb-1 replays record 100 in real time over two emulated bearers, each ECG frame on one
    // of them, so the test can cut the one carrying it; amb-2 sends vitals and positions.
    let links = links(2, "rate=20mbit,delay=10ms", ingest.quic_addr).await;
    let start_ms = relay_ops::now_utc_ns() as f64 / 1e6 - 2000.0;
    let mut sources = vec![replay("100", 1.0)];
    sources.extend(vitals_and_gps());
    let mut cfg = agent_config(pki.path(), "amb-1", links[0].addr, sources);
    over_links(&mut cfg, &links);
    cfg.scheduling.waveforms = Policy::Fastest;
    let amb1 = Agent::start(cfg).await.unwrap();
    // amb-2 replays the whole of record 100 (30 min) at 100 times real time.
    let mut sources = vec![replay("100", 100.0)];
    sources.extend(vitals_and_gps());
    let amb2 = Agent::start(agent_config(pki.path(), "amb-2", ingest.quic_addr, sources))
        .await
        .unwrap();

    let mut b = Browser::launch().await;

    // No anonymous access: pages send to the login, the API refuses.
    b.navigate(&format!("{base}/")).await;
    assert_eq!(b.eval("location.pathname").await, "/login");
    for path in [
        "/api/board",
        "/api/board/events",
        "/api/vehicles/amb-1/events",
        "/api/me",
    ] {
        assert_eq!(status_of(&mut b, path).await, 401, "{path}");
    }
    assert_eq!(status_of(&mut b, "/vehicle?id=amb-1").await, 303);
    // Secure headers on every answer.
    let headers = b
        .eval(
            "(async () => { const r = await fetch('/login'); \
               return Object.fromEntries(r.headers.entries()); })()",
        )
        .await;
    let csp = headers["content-security-policy"].as_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(
        headers["strict-transport-security"]
            .as_str()
            .unwrap()
            .contains("max-age=")
    );
    assert_eq!(headers["cache-control"], "no-store");

    // A wrong password is refused; a user sees only the vehicles in scope.
    login(&mut b, &base, "nurse-kim", "guess").await;
    assert_eq!(b.eval("location.search").await, "?failed=1");
    login(&mut b, &base, "nurse-kim", "kim's long passphrase").await;
    assert_eq!(b.eval("location.pathname").await, "/");
    assert_eq!(status_of(&mut b, "/vehicle?id=amb-1").await, 403);
    assert_eq!(status_of(&mut b, "/api/vehicles/amb-1/events").await, 403);
    assert_eq!(status_of(&mut b, "/vehicle?id=amb-2").await, 200);
    b.wait_for(
        "window.edBoard && edBoard.vehicles.includes('amb-2')",
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        b.eval("edBoard.vehicles").await,
        serde_json::json!(["amb-2"])
    );
    b.eval("document.querySelector('form[action=\"/logout\"]').submit(); true")
        .await;
    b.wait_for("location.pathname === '/login'", Duration::from_secs(10))
        .await;
    assert_eq!(status_of(&mut b, "/api/board").await, 401, "logged out");

    // The board lists both vehicles for a user whose scope has both.
    login(&mut b, &base, "dr-lee", "lee's long passphrase").await;
    b.wait_for(
        "window.edBoard && edBoard.vehicles.includes('amb-1') && edBoard.vehicles.includes('amb-2') \
         && document.querySelectorAll('#vehicles tr').length === 2",
        Duration::from_secs(30),
    )
    .await;
    b.wait_for(
        "[...document.querySelectorAll('#vehicles tr')].every(r => r.textContent.includes('/min')) \
         && document.querySelector('tr[data-vehicle=\"amb-1\"]').textContent.includes('2 bearers: RTT') \
         && document.querySelector('tr[data-vehicle=\"amb-2\"]').textContent.includes('1 bearer: RTT')",
        Duration::from_secs(30),
    )
    .await;
    let shots = screenshot_dir();
    std::fs::create_dir_all(&shots).unwrap();
    std::fs::write(shots.join("ed-web-board.png"), b.screenshot(None).await).unwrap();

    // The vehicle view, from before amb-1 started: the page must hold every sample from 0.
    b.navigate(&format!("{base}/vehicle?id=amb-1&from={start_ms}"))
        .await;
    let contig =
        "(() => { const s = Object.values(edState.streams)[0]; return s ? s.contig : 0; })()";
    b.wait_for(&format!("{contig} >= 360 * 4"), Duration::from_secs(30))
        .await;

    // Cut the bearer carrying amb-1's ECG for 300 ms: what it had in flight arrives late
    // over the other one, so the page shows a break, then the late data back-filled.
    let before: Vec<u64> = links
        .iter()
        .map(|l| l.counters().up.delivered_bytes)
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let carrier = (0..2)
        .max_by_key(|&i| links[i].counters().up.delivered_bytes - before[i])
        .unwrap();
    links[carrier].cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    links[carrier].restore();
    b.wait_for(&format!("{contig} >= 360 * 14"), Duration::from_secs(60))
        .await;
    let s: Value = b
        .eval(
            "(() => { const s = Object.values(edState.streams)[0]; \
               return { contig: s.contig, base: s.base, nch: s.nch, hash: s.hash, holes: s.holes, \
                        backfilled: s.backfilled, duplicates: s.duplicates, gaps: s.gaps }; })()",
        )
        .await;
    let contig = s["contig"].as_u64().unwrap() as usize;
    assert_eq!(s["base"], 0, "the view starts at the record's first sample");
    assert_eq!(s["duplicates"], 0);
    assert!(
        s["holes"].as_u64().unwrap() >= 1 && s["backfilled"].as_u64().unwrap() >= 1,
        "the cut made a break that late data filled: {s:?}"
    );

    // Every sample, in order, as the page holds it: the hash of its contiguous prefix equals
    // the record's.
    let rec = relay_wfdb::read_record(&record("100")).unwrap();
    let n = rec.num_signals();
    assert_eq!(s["nch"].as_u64().unwrap() as usize, n);
    assert_eq!(
        s["hash"].as_u64().unwrap() as u32,
        fnv(&rec.samples[..contig * n]),
        "the page's samples 0..{contig} differ from record 100"
    );

    // The FHIR export of what was received, read-only from ed-web, for an incident: it
    // validates with fhir.resources and gives back every sample of record 100 received.
    let bundle = b
        .eval(&format!(
            "fetch('/api/vehicles/amb-1/fhir?from={start_ms}&incident=EMS-2026-0042').then(r => r.text())"
        ))
        .await;
    let bundle_path = work.path().join("amb-1.fhir.json");
    std::fs::write(&bundle_path, bundle.as_str().unwrap()).unwrap();
    let exported = check_fhir_export(&bundle_path, &rec);
    assert!(
        exported >= contig,
        "the export holds every sample the page had: {exported} < {contig}"
    );
    assert_eq!(
        status_of(
            &mut b,
            &format!(
                "/api/vehicles/amb-1/fhir?from={start_ms}&to={}",
                start_ms - 1.0
            )
        )
        .await,
        400,
        "a range that ends before it starts"
    );

    // Capture to screen, measured by the page on live frames.
    let mut lat: Vec<f64> = serde_json::from_value(b.eval("edState.latencies").await).unwrap();
    assert!(lat.len() >= 50, "{} live frames measured", lat.len());
    lat.sort_by(f64::total_cmp);
    let p99 = lat[(lat.len() * 99 / 100).min(lat.len() - 1)];
    eprintln!(
        "capture-to-screen over {} frames: p50 {:.0} ms, p99 {p99:.0} ms",
        lat.len(),
        lat[lat.len() / 2]
    );
    assert!(p99 < 500.0, "p99 {p99} ms");

    // The trace at 25 mm/s and 10 mm/mV: the calibration pulse is 1 mV (40 px) tall and
    // 200 ms (20 px) wide, and the 5 mm grid puts one second at 100 px.
    std::fs::write(shots.join("ed-web-vehicle.png"), b.screenshot(None).await).unwrap();
    let rect = b
        .eval("(() => { const r = document.querySelector('canvas.lead').getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; })()")
        .await;
    let r: Vec<f64> = serde_json::from_value(rect).unwrap();
    let png = b.screenshot(Some((r[0], r[1], r[2], r[3]))).await;
    let (w, h, px) = decode_png(&png);
    let dark = |p: [u8; 3]| p[0] < 90 && p[1] < 90 && p[2] < 90;
    // The pulse sits in the left margin (15 mm), where no trace is drawn.
    let margin = (15.0 * PPMM) as usize;
    let (mut top, mut bottom, mut left, mut right) = (h, 0, w, 0);
    for y in 0..h {
        for x in 0..margin {
            if dark(px[y * w + x]) {
                top = top.min(y);
                bottom = bottom.max(y);
                left = left.min(x);
                right = right.max(x);
            }
        }
    }
    let pulse_h = (bottom - top) as f64;
    // Its top edge: the dark columns of the first dark row.
    let top_row = &px[top * w..top * w + margin];
    let tops: Vec<usize> = (0..margin).filter(|&x| dark(top_row[x])).collect();
    let pulse_w = (tops.last().unwrap() - tops.first().unwrap()) as f64;
    assert!(
        (pulse_h - 10.0 * PPMM).abs() <= 2.0,
        "pulse {pulse_h} px tall, {left}..{right}"
    );
    assert!(
        (pulse_w - 5.0 * PPMM).abs() <= 2.0,
        "pulse {pulse_w} px wide"
    );
    // Major grid lines along a row near the bottom (the trace rarely reaches it): redder than
    // the faint minor lines, even where antialiasing spreads a line over two columns.
    let major = |p: [u8; 3]| p[0] > 200 && p[1] < 215 && p[2] < 215;
    let y = h - 2;
    let centres = line_centres(&px[y * w..(y + 1) * w], major);
    let mut spacings: Vec<f64> = centres.windows(2).map(|c| c[1] - c[0]).collect();
    spacings.sort_by(f64::total_cmp);
    assert!(spacings.len() >= 10, "{centres:?}");
    let second = spacings[spacings.len() / 2] * 5.0;
    assert!(
        (second - 25.0 * PPMM).abs() <= 1.5,
        "one second is {second} px"
    );
    eprintln!(
        "at {PPMM} px/mm: calibration pulse {pulse_h} x {pulse_w} px (1 mV x 200 ms), one second {second} px"
    );

    // Rewind: the view restarts at the chosen capture time and shows the window from there,
    // with a banner saying so.
    let anchor: Vec<f64> = serde_json::from_value(
        b.eval("(() => { const s = Object.values(edState.streams)[0]; return [s.anchor.index, s.anchor.cap]; })()")
            .await,
    )
    .unwrap();
    let epoch_ms = anchor[1] - anchor[0] / 360.0 * 1000.0;
    // A whole second: the page's time field holds seconds.
    let rewind_to = ((epoch_ms + 5000.0) / 1000.0).ceil() * 1000.0;
    b.eval(&format!(
        "document.getElementById('from').value = \
           new Date({rewind_to} - new Date({rewind_to}).getTimezoneOffset() * 60000).toISOString().slice(0, 19); \
         document.getElementById('rewind').click(); true"
    ))
    .await;
    b.wait_for(
        "document.getElementById('banner').textContent.startsWith('Rewound') \
         && Object.values(edState.streams).length > 0 && Object.values(edState.streams)[0].contig > 360",
        Duration::from_secs(30),
    )
    .await;
    let first_index = b
        .eval("Object.values(edState.streams)[0].base")
        .await
        .as_f64()
        .unwrap();
    let base_ms = epoch_ms + first_index / 360.0 * 1000.0;
    assert!(
        base_ms >= rewind_to - 1.0 && base_ms < rewind_to + 250.0,
        "rewound to {rewind_to}, first sample at {base_ms}"
    );

    // amb-2's view, from before it started, ends up holding the whole record: all 650,000
    // samples of both leads, in order, as the page's own hash shows.
    b.navigate(&format!("{base}/vehicle?id=amb-2&from={start_ms}"))
        .await;
    let whole = rec.frames;
    b.wait_for(
        &format!(
            "(() => {{ const s = Object.values(edState.streams)[0]; return s && s.contig >= {whole}; }})()"
        ),
        Duration::from_secs(180),
    )
    .await;
    let s: Value = b
        .eval(
            "(() => { const s = Object.values(edState.streams)[0]; \
               return { contig: s.contig, base: s.base, hash: s.hash, duplicates: s.duplicates }; })()",
        )
        .await;
    assert_eq!(s["base"], 0);
    assert_eq!(s["contig"].as_u64().unwrap() as usize, whole, "{s}");
    assert_eq!(s["duplicates"], 0);
    assert_eq!(
        s["hash"].as_u64().unwrap() as u32,
        fnv(&rec.samples),
        "the page's copy of record 100 differs from it"
    );

    // Every view was audited with its user.
    let audit = std::fs::read_to_string(work.path().join("ed-web-audit.jsonl")).unwrap();
    let lines: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let has = |user: &str, action: &str, vehicle: Option<&str>, outcome: &str| {
        lines.iter().any(|l| {
            l["user"] == user
                && l["action"] == action
                && l["outcome"] == outcome
                && vehicle.is_none_or(|v| l["vehicle"] == v)
        })
    };
    assert!(has("nurse-kim", "login", None, "bad_credentials"));
    assert!(has("nurse-kim", "view_vehicle", Some("amb-1"), "denied"));
    assert!(has("nurse-kim", "stream_vehicle", Some("amb-1"), "denied"));
    assert!(has("dr-lee", "view_vehicle", Some("amb-1"), "ok"));
    assert!(has("dr-lee", "stream_vehicle", Some("amb-1"), "ok"));

    b.close().await;
    web.shutdown();
    amb1.shutdown().await.unwrap();
    amb2.shutdown().await.unwrap();
    for l in links {
        l.stop();
    }
    ingest.shutdown().await.unwrap();
}

/// One POST the cath-lab receiver got.
#[derive(Debug, Clone)]
struct Page {
    key: String,
    status: u16,
    at_ns: i64,
    body: Value,
}

/// A cath-lab pager on loopback: HTTPS (the development PKI's `localhost` certificate),
/// records every POST, answers 503 while `refuse` is set and 200 otherwise. It also serves
/// map tiles: every GET gets a 256 x 256 PNG and its path is recorded.
struct Receiver {
    addr: std::net::SocketAddr,
    pages: std::sync::Arc<std::sync::Mutex<Vec<Page>>>,
    refuse: std::sync::Arc<std::sync::atomic::AtomicBool>,
    tiles: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

/// A plain light-green 256 x 256 map tile.
fn tile_png() -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, 256, 256);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().unwrap();
        w.write_image_data(&[200_u8, 230, 200].repeat(256 * 256))
            .unwrap();
    }
    out
}

impl Receiver {
    async fn start(pki: &Pki) -> Self {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let certs = relay_ops::pem::load_certs(&pki.path().join("ingest.pem")).unwrap();
        let key = relay_ops::pem::load_key(&pki.path().join("ingest.key")).unwrap();
        let tls = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pages = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let refuse = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tiles = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (p, r, t) = (pages.clone(), refuse.clone(), tiles.clone());
        let tile = std::sync::Arc::new(tile_png());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, pages, refuse) = (acceptor.clone(), p.clone(), r.clone());
                let (tiles, tile) = (t.clone(), tile.clone());
                tokio::spawn(async move {
                    let Ok(mut s) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut buf = Vec::new();
                    let mut chunk = [0_u8; 4096];
                    let (head, body) = loop {
                        let Ok(n) = s.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&buf).into_owned();
                        if let Some((head, body)) = text.split_once("\r\n\r\n") {
                            let len: usize = head
                                .lines()
                                .find_map(|l| {
                                    l.to_ascii_lowercase()
                                        .strip_prefix("content-length:")
                                        .map(|v| v.trim().parse().unwrap())
                                })
                                .unwrap_or(0);
                            if body.len() >= len {
                                break (head.to_owned(), body.to_owned());
                            }
                        }
                    };
                    if let Some(path) = head
                        .lines()
                        .next()
                        .and_then(|l| l.strip_prefix("GET "))
                        .and_then(|l| l.split(' ').next())
                    {
                        tiles.lock().unwrap().push(path.to_owned());
                        let _ = s
                            .write_all(
                                format!(
                                    "HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                                    tile.len()
                                )
                                .as_bytes(),
                            )
                            .await;
                        let _ = s.write_all(&tile).await;
                        let _ = s.shutdown().await;
                        return;
                    }
                    let key = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .starts_with("idempotency-key:")
                                .then(|| l["idempotency-key:".len()..].trim().to_owned())
                        })
                        .unwrap_or_default();
                    let status = if refuse.load(Ordering::SeqCst) {
                        503
                    } else {
                        200
                    };
                    pages.lock().unwrap().push(Page {
                        key,
                        status,
                        at_ns: relay_ops::now_utc_ns(),
                        body: serde_json::from_str(&body).unwrap_or(Value::Null),
                    });
                    let reason = if status == 200 {
                        "OK"
                    } else {
                        "Service Unavailable"
                    };
                    let _ = s
                        .write_all(
                            format!(
                                "HTTP/1.1 {status} {reason}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                            )
                            .as_bytes(),
                        )
                        .await;
                    let _ = s.shutdown().await;
                });
            }
        });
        Self {
            addr,
            pages,
            refuse,
            tiles,
        }
    }

    fn pages(&self) -> Vec<Page> {
        self.pages.lock().unwrap().clone()
    }

    fn delivered(&self, key: &str) -> usize {
        self.pages()
            .iter()
            .filter(|p| p.key == key && p.status == 200)
            .count()
    }
}

/// ed-web as a process of its own (killable with SIGKILL), on `port`.
async fn spawn_ed_web(
    pki: &Pki,
    work: &Path,
    grpc: std::net::SocketAddr,
    port: u16,
    pager: std::net::SocketAddr,
) -> tokio::process::Child {
    let p = |f: &str| pki.path().join(f).display().to_string();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(work.join("ed-web.log"))
        .unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_e2e-ed-web"))
        .arg("--allow-dev-pki")
        .args(["--http-listen", &format!("127.0.0.1:{port}")])
        .args(["--http-cert", &p("ed-web-server.pem")])
        .args(["--http-key", &p("ed-web-server.key")])
        .args(["--ingest-url", &format!("https://{grpc}")])
        .args(["--ingest-ca", &p("hospital-ca.pem")])
        .args(["--ingest-cert", &p("ed-web.pem")])
        .args(["--ingest-key", &p("ed-web.key")])
        .args(["--ingest-refresh", "500ms"])
        .arg("--auth-users-file")
        .arg(users_file(work))
        .args([
            "--webhook-url",
            &format!("https://localhost:{}/page", pager.port()),
        ])
        .args(["--webhook-ca", &p("hospital-ca.pem")])
        .arg("--webhook-outbox")
        .arg(work.join("outbox.redb"))
        .args(["--webhook-max-backoff", "1s"])
        .args([
            "--display-tile-url",
            &format!(
                "https://localhost:{}/tiles/{{z}}/{{x}}/{{y}}.png",
                pager.port()
            ),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "ed-web did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child
}

fn p99(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[(xs.len() * 99 / 100).min(xs.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stemi_alert_reaches_the_ed_view_and_pages_the_cath_lab_once_across_crashes() {
    let _one = ONE_AT_A_TIME.lock().await;
    use relay_e2e::spawn_ingest_child;
    use vehicle_agent::events::{Request, request};
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(&pki).await;
    let icfg = ingest_config(&pki, &work.path().join("store.redb"));
    let mut ingest = spawn_ingest_child(
        env!("CARGO_BIN_EXE_e2e-hospital-ingest"),
        icfg.clone(),
        work.path(),
    )
    .await;

    // amb-1 on one bearer shaped by the ATT LTE driving trace with 5 % loss each way.
    let trace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/traces/ATT-LTE-driving.up");
    let links = links(
        1,
        &format!("{},delay=40ms,loss=5%,down.loss=5%", trace.display()),
        ingest.quic,
    )
    .await;
    let socket = work.path().join("events.sock");
    // A 12-lead (plus Frank leads) ECG at 1000 Hz: PTB record s0010_re.
    let mut sources = vec![replay("s0010_re", 1.0)];
    sources.extend(vitals_and_gps());
    let mut cfg = agent_config(pki.path(), "amb-1", links[0].addr, sources);
    over_links(&mut cfg, &links);
    cfg.events.socket = Some(socket.clone());
    let agent = Agent::start(cfg).await.unwrap();
    let raise = |text: String| {
        let socket = socket.clone();
        async move {
            let r = request(
                &socket,
                &Request::Raise {
                    code: "stemi".into(),
                    text,
                    severity: None,
                },
            )
            .await
            .unwrap();
            (
                r["seq"].as_u64().unwrap(),
                r["capture_time_ns"].as_i64().unwrap(),
            )
        }
    };

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut web = spawn_ed_web(&pki, work.path(), ingest.grpc, port, receiver.addr).await;
    let base = format!("https://127.0.0.1:{port}");
    let mut b = Browser::launch().await;
    login(&mut b, &base, "dr-lee", "lee's long passphrase").await;
    b.navigate(&format!("{base}/vehicle?id=amb-1")).await;
    b.wait_for("window.edState && edState.synced", Duration::from_secs(30))
        .await;

    // With a tile source configured, the track is drawn on map tiles: the tile holding the
    // track's start (the synthetic GPS starts at 52.5 N, 13.4 E) is fetched and drawn.
    let stats = b
        .wait_for(
            "ed.tileStats.loaded >= 1 && ed.tileStats",
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(stats["failed"], 0, "{stats}");
    let requested = receiver.tiles.lock().unwrap().clone();
    let holds_start = requested.iter().any(|path| {
        let parts: Vec<f64> = path
            .trim_start_matches("/tiles/")
            .trim_end_matches(".png")
            .split('/')
            .filter_map(|p| p.parse().ok())
            .collect();
        let [z, x, y] = parts[..] else { return false };
        let n = 2_f64.powf(z);
        let lat = 52.5_f64.to_radians();
        let tx = ((13.4 + 180.0) / 360.0 * n).floor();
        let ty =
            ((1.0 - (lat.tan() + 1.0 / lat.cos()).ln() / std::f64::consts::PI) / 2.0 * n).floor();
        (3.0..=17.0).contains(&z) && x == tx && y == ty
    });
    assert!(holds_start, "{requested:?}");

    // 30 alerts, 400 ms apart: each reaches the ED view and the cath lab's pager.
    const ALERTS: u64 = 30;
    let mut raised = Vec::new();
    for i in 0..ALERTS {
        raised.push(raise(format!("inferior STE, alert {i}")).await);
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    b.wait_for(
        &format!("edState.events.filter(e => e.code === 'STEMI').length >= {ALERTS}"),
        Duration::from_secs(30),
    )
    .await;
    let view: Vec<f64> = serde_json::from_value(
        b.eval("edState.events.filter(e => e.code === 'STEMI').map(e => e.arrived - e.cap)")
            .await,
    )
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while receiver.pages().iter().filter(|p| p.status == 200).count() < ALERTS as usize {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            receiver.pages()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let paged: Vec<f64> = receiver
        .pages()
        .iter()
        .map(|p| (p.at_ns - p.body["capture_time_ns"].as_i64().unwrap()) as f64 / 1e6)
        .collect();
    let (view_p99, paged_p99) = (p99(view.clone()), p99(paged.clone()));
    eprintln!(
        "STEMI over ATT LTE driving + 5 % loss, {ALERTS} alerts: ED view p99 {view_p99:.0} ms (max {:.0}), webhook p99 {paged_p99:.0} ms (max {:.0})",
        view.iter().copied().fold(0.0, f64::max),
        paged.iter().copied().fold(0.0, f64::max)
    );
    assert!(view_p99 < 1000.0 && paged_p99 < 1000.0);

    // The 12 standard leads in 4 columns of 3 (I II III | aVR aVL aVF | V1-V3 | V4-V6), the
    // Frank leads below at full width.
    let layout = b
        .eval(
            "[...document.querySelectorAll('canvas.lead')].map(c => { const r = c.getBoundingClientRect(); \
               return [c.dataset.lead, Math.round(r.x), Math.round(r.y), Math.round(r.width)]; })",
        )
        .await;
    let layout: Vec<(String, i64, i64, i64)> = serde_json::from_value(layout).unwrap();
    let names: Vec<&str> = layout.iter().map(|l| l.0.as_str()).collect();
    assert_eq!(
        names,
        [
            "I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6", "vx", "vy",
            "vz"
        ]
    );
    let at = |i: usize| (layout[i].1, layout[i].2);
    assert!(
        at(0).0 < at(3).0 && at(3).0 < at(6).0 && at(6).0 < at(9).0,
        "{layout:?}"
    );
    assert!(
        at(0).1 == at(3).1 && at(0).1 < at(1).1 && at(1).1 < at(2).1,
        "{layout:?}"
    );
    assert!(
        layout[12].3 > 3 * layout[0].3 && at(12).1 > at(2).1,
        "{layout:?}"
    );

    // The alarm shows the 10 s of ECG before the newest alert (1000 Hz), from the history.
    let (last_seq, _) = *raised.last().unwrap();
    let strip = b
        .wait_for(
            &format!(
                "window.edState.alarmStrip && edState.alarmStrip.alert.endsWith('/{last_seq}') && edState.alarmStrip"
            ),
            Duration::from_secs(30),
        )
        .await;
    // Exactly the 10 s before it; a part still missing after 5 s of recovery would be a
    // declared break, never filled in.
    let samples = strip["samples"].as_u64().unwrap();
    let span = strip["last"].as_u64().unwrap() - strip["first"].as_u64().unwrap() + 1;
    assert!((9990..=10001).contains(&span), "{strip}");
    assert!(
        samples == span || (strip["missing"].as_u64().unwrap() >= 1 && samples >= span * 95 / 100),
        "{strip}"
    );
    assert_eq!(strip["channel"], 1, "lead II");
    assert_eq!(
        strip["differ"], 0,
        "the strip shows the live trace's samples: {strip}"
    );
    assert!(strip["agree"].as_u64().unwrap() > 9000, "{strip}");
    let shots = screenshot_dir();
    std::fs::create_dir_all(&shots).unwrap();
    std::fs::write(shots.join("ed-web-alarm.png"), b.screenshot(None).await).unwrap();

    // The ED acknowledges the newest alarm in the browser; the crew's API shows it.
    b.wait_for(
        "document.querySelector('#alarm button') !== null",
        Duration::from_secs(10),
    )
    .await;
    let clicked = tokio::time::Instant::now();
    b.eval("document.querySelector('#alarm button').click(); true")
        .await;
    let ack = loop {
        let a = request(&socket, &Request::Status { seq: last_seq })
            .await
            .unwrap();
        if a["acknowledged"] == true {
            break a;
        }
        assert!(
            clicked.elapsed() < Duration::from_secs(2),
            "ack within 2 s: {a}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!(
        "acknowledgement reached the vehicle in {:?}: {ack}",
        clicked.elapsed()
    );
    assert_eq!(ack["acknowledged_by"], "ed-web");
    assert!(ack["note"].as_str().unwrap().contains("dr-lee"), "{ack}");
    // Every ED screen learns it from the board: that alert no longer alarms, the others do.
    let events = b
        .eval("fetch('/api/board').then(r => r.json()).then(b => b.vehicles[0].events)")
        .await;
    let events = events.as_array().unwrap();
    let acked: Vec<&Value> = events
        .iter()
        .filter(|e| e["acked_by"] == "dr-lee")
        .collect();
    assert_eq!(acked.len(), 1, "{events:?}");
    assert_eq!(acked[0]["seq"], last_seq);
    assert!(
        events
            .iter()
            .filter(|e| e.get("acked_by").is_none())
            .count()
            >= 10
    );
    b.close().await;

    // The pager is down when the next alert comes, and ed-web is killed with it pending.
    receiver
        .refuse
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let (a_seq, _) = raise("alert A".into()).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !receiver
        .pages()
        .iter()
        .any(|p| p.body["seq"] == a_seq && p.body["text"] == "alert A" && p.status == 503)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "alert A was never tried"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    web.start_kill().unwrap(); // SIGKILL
    web.wait().await.unwrap();
    receiver
        .refuse
        .store(false, std::sync::atomic::Ordering::SeqCst);
    web = spawn_ed_web(&pki, work.path(), ingest.grpc, port, receiver.addr).await;
    // The ingest is killed too, and restarted on the same store and addresses.
    ingest.child.start_kill().unwrap();
    ingest.child.wait().await.unwrap();
    let mut again = icfg.clone();
    again.quic.listen = ingest.quic;
    again.grpc.listen = ingest.grpc;
    ingest = spawn_ingest_child(
        env!("CARGO_BIN_EXE_e2e-hospital-ingest"),
        again,
        work.path(),
    )
    .await;
    let (b_seq, _) = raise("alert B, after both restarts".into()).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let pages = receiver.pages();
        let ok = |seq: u64| {
            pages.iter().any(|p| {
                p.status == 200
                    && p.body["seq"] == seq
                    && p.body["text"]
                        .as_str()
                        .is_some_and(|t| t.starts_with("alert "))
            })
        };
        if ok(a_seq) && ok(b_seq) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{pages:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Time for any repeat to show up (ed-web re-reads from its cursor after each restart).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pages = receiver.pages();
    let keys: std::collections::BTreeSet<&str> = pages.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys.len() as u64, ALERTS + 2, "one id per alert: {keys:?}");
    for key in &keys {
        assert_eq!(
            receiver.delivered(key),
            1,
            "{key} delivered exactly once: {pages:?}"
        );
        let body = &pages.iter().find(|p| p.key == *key).unwrap().body;
        assert_eq!(body["alert_id"], *key);
        assert_eq!(body["code"], "STEMI");
    }
    let refused = pages.iter().filter(|p| p.status == 503).count();
    assert!(refused >= 1, "alert A was refused before the crash");

    web.start_kill().unwrap();
    agent.shutdown().await.unwrap();
    ingest.child.start_kill().unwrap();
    for l in links {
        l.stop();
    }
}

/// A TLS connection to ed-web trusting the development hospital CA, with a small receive
/// buffer so a reader that stops reading is felt by the server soon.
async fn dial(
    addr: std::net::SocketAddr,
    pki: &Pki,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for c in relay_ops::pem::load_certs(&pki.path().join("hospital-ca.pem")).unwrap() {
        roots.add(c).unwrap();
    }
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let sock = tokio::net::TcpSocket::from_std_stream(sock.into());
    let tcp = sock.connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap()
}

/// Sends `request` and reads the answer's head (and, unless `head_only`, its body to the end).
async fn exchange(
    s: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    request: &str,
    head_only: bool,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0_u8; 1024];
    let read = async {
        loop {
            let n = s.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if head_only && buf.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

async fn login_raw(addr: std::net::SocketAddr, pki: &Pki, user: &str, password: &str) -> String {
    let body = format!(
        "user={user}&password={}",
        password.replace(' ', "+").replace('\'', "%27")
    );
    let mut s = dial(addr, pki).await;
    let (_, answer) = exchange(
        &mut s,
        &format!(
            "POST /login HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-www-form-urlencoded\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
        false,
    )
    .await;
    answer
}

fn session_cookie(answer: &str) -> Option<String> {
    answer
        .lines()
        .find(|l| {
            l.to_ascii_lowercase()
                .starts_with("set-cookie: edweb_session=")
        })
        .and_then(|l| {
            l.split_once(": ")
                .map(|(_, v)| v.split(';').next().unwrap_or("").to_owned())
        })
        .filter(|c| !c.ends_with('='))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ed_web_holds_the_line_against_login_floods_and_stalled_browsers() {
    let _one = ONE_AT_A_TIME.lock().await;
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let ingest = Ingest::start(ingest_config(&pki, &work.path().join("store.redb")))
        .await
        .unwrap();
    // Without --allow-dev-pki, development certificates are refused at start.
    let strict = WebConfig {
        allow_dev_pki: false,
        ..web_config(&pki, &ingest, work.path())
    };
    let refused = EdWeb::start(strict).await.unwrap_err().to_string();
    assert!(refused.contains("development"), "{refused}");
    let mut cfg = web_config(&pki, &ingest, work.path());
    cfg.http.max_streams_per_user = 3;
    cfg.http.stream_queue = 16;
    cfg.http.slow_browser_timeout = Duration::from_secs(2);
    cfg.auth.lockout = Duration::from_secs(3);
    cfg.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    let web = EdWeb::start(cfg).await.unwrap();
    // Record 100 at 100 times real time: about 900 frames a second for the streams below.
    let amb1 = Agent::start(agent_config(
        pki.path(),
        "amb-1",
        ingest.quic_addr,
        vec![replay("100", 100.0)],
    ))
    .await
    .unwrap();

    // A login flood: 60 wrong passwords for dr-lee, 20 at a time. Every one is refused, the
    // user is locked out, and another user's board answers meanwhile.
    let kim =
        session_cookie(&login_raw(web.addr, &pki, "nurse-kim", "kim's long passphrase").await)
            .expect("nurse-kim logs in");
    let started = tokio::time::Instant::now();
    let flood = async {
        let mut outcomes = Vec::new();
        for _ in 0..3 {
            let round = (0..20).map(|i| {
                let pki = &pki;
                async move { login_raw(web.addr, pki, "dr-lee", &format!("guess {i}")).await }
            });
            outcomes.extend(futures::future::join_all(round).await);
        }
        outcomes
    };
    let board = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t = tokio::time::Instant::now();
        let mut s = dial(web.addr, &pki).await;
        let (status, _) = exchange(
            &mut s,
            &format!("GET /api/board HTTP/1.1\r\nHost: localhost\r\nCookie: {kim}\r\nConnection: close\r\n\r\n"),
            false,
        )
        .await;
        (status, t.elapsed())
    };
    let (outcomes, (board_status, board_time)) = tokio::join!(flood, board);
    let flood_time = started.elapsed();
    assert!(
        outcomes.iter().all(|a| session_cookie(a).is_none()),
        "a wrong password got in"
    );
    let locked = outcomes
        .iter()
        .filter(|a| a.contains("/login?locked=1"))
        .count();
    assert!(locked >= 50, "{locked} of 60 refused by the lockout");
    assert_eq!(board_status, 200);
    eprintln!(
        "login flood: 60 wrong passwords in {flood_time:?} ({locked} refused by the lockout without hashing); another user's board answered in {board_time:?}"
    );
    // Locked out even with the right password; then the lockout ends.
    let answer = login_raw(web.addr, &pki, "dr-lee", "lee's long passphrase").await;
    assert!(answer.contains("locked=1"), "{answer}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let lee = session_cookie(&login_raw(web.addr, &pki, "dr-lee", "lee's long passphrase").await)
        .expect("dr-lee logs in after the lockout");

    // Three streams for one user, never read; a fourth is refused.
    let stream_request = format!(
        "GET /api/vehicles/amb-1/events HTTP/1.1\r\nHost: localhost\r\nCookie: {lee}\r\nAccept: text/event-stream\r\n\r\n"
    );
    let mut stalled = Vec::new();
    for _ in 0..3 {
        let mut s = dial(web.addr, &pki).await;
        let (status, _) = exchange(&mut s, &stream_request, true).await;
        assert_eq!(status, 200);
        stalled.push(s);
    }
    let mut fourth = dial(web.addr, &pki).await;
    assert_eq!(exchange(&mut fourth, &stream_request, true).await.0, 429);
    // The stalled browsers fill their queues and are dropped, freeing their places.
    let t = tokio::time::Instant::now();
    let freed = loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut s = dial(web.addr, &pki).await;
        if exchange(&mut s, &stream_request, true).await.0 == 200 {
            break t.elapsed();
        }
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "stalled streams were never dropped"
        );
    };
    eprintln!("stalled browsers dropped and their places free after {freed:?}");
    // A dropped stream ends: what was buffered drains, then its response ends (the last,
    // empty chunk of HTTP/1.1 chunked encoding).
    {
        use tokio::io::AsyncReadExt;
        let mut sink = vec![0_u8; 64 * 1024];
        let mut tail: Vec<u8> = Vec::new();
        let drained = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let n = stalled[0].read(&mut sink).await.unwrap_or(0);
                if n == 0 {
                    return;
                }
                tail.extend_from_slice(&sink[..n]);
                let keep = tail.len().saturating_sub(16);
                tail.drain(..keep);
                if tail.ends_with(b"\r\n0\r\n\r\n") {
                    return;
                }
            }
        })
        .await;
        assert!(drained.is_ok(), "the stalled stream never ended");
    }
    // Operators see it: refused logins, refused and dropped streams (the recorder is shared
    // by the tests of this binary, hence "at least").
    let (_, m) = relay_e2e::http_get(web.metrics_addr.unwrap(), "/metrics").await;
    let value = |labels: &str, name: &str| {
        relay_e2e::labelled_metric(&m, name, labels)
            .unwrap_or_else(|| relay_e2e::metric_value(&m, name))
    };
    assert!(
        value("outcome=\"locked_out\"", "relay_edweb_logins_total") >= 55.0,
        "{m}"
    );
    assert!(
        value("outcome=\"bad_credentials\"", "relay_edweb_logins_total") >= 5.0,
        "{m}"
    );
    assert!(value("", "relay_edweb_streams_refused_total") >= 1.0, "{m}");
    assert!(
        value("", "relay_edweb_browsers_dropped_total") >= 3.0,
        "{m}"
    );
    web.shutdown();
    amb1.shutdown().await.unwrap();
    ingest.shutdown().await.unwrap();
}
