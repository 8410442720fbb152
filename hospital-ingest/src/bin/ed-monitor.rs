//! ED-side subscriber: live terminal view of the ambulances, optional WFDB export of every
//! waveform stream, resumable from a cursor file; reconnects on its own.
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use hospital_ingest::client::{ClientTls, WfdbSink, connect};
use hospital_ingest::view::Dashboard;
use relay_proto::model::{
    StreamKind, SubscribeRequest, subscribe_request::Start, subscribe_response::Record,
};

#[derive(Debug, Parser)]
#[command(
    name = "ed-monitor",
    version,
    about = "Watch ambulances live and export their waveforms as WFDB records"
)]
struct Args {
    /// gRPC address of the ingest.
    #[arg(long, default_value = "https://127.0.0.1:50051")]
    server: String,
    /// Name the ingest certificate must carry.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// CA of the ingest certificate.
    #[arg(long, default_value = "certs/hospital-ca.pem")]
    ca: PathBuf,
    /// This client's certificate and key.
    #[arg(long, default_value = "certs/ed-console.pem")]
    cert: PathBuf,
    #[arg(long, default_value = "certs/ed-console.key")]
    key: PathBuf,
    /// Vehicles to follow (repeat); all when absent.
    #[arg(long = "vehicle")]
    vehicles: Vec<String>,
    /// Stream kinds to follow (waveform, vitals, location, events; repeat); all when absent.
    #[arg(long = "kind")]
    kinds: Vec<String>,
    /// Start after this cursor (0 = oldest retained); live only when absent.
    #[arg(long)]
    after_cursor: Option<u64>,
    /// Keep the resume cursor here: read at start, written on exit.
    #[arg(long)]
    cursor_file: Option<PathBuf>,
    /// Write every waveform stream as a WFDB record (format 16) into this directory.
    #[arg(long)]
    wfdb_dir: Option<PathBuf>,
    /// Exit once the backlog has been received (the sync marker), e.g. to export history.
    #[arg(long)]
    exit_after_sync: bool,
    /// Exit after this many seconds.
    #[arg(long)]
    duration_s: Option<u64>,
    /// Print a status line instead of redrawing the screen.
    #[arg(long)]
    plain: bool,
}

fn parse_kind(s: &str) -> anyhow::Result<i32> {
    Ok(match s {
        "waveform" => StreamKind::Waveform,
        "vitals" => StreamKind::Vitals,
        "location" => StreamKind::Location,
        "events" => StreamKind::Events,
        other => anyhow::bail!("unknown kind {other:?} (waveform, vitals, location, events)"),
    } as i32)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    relay_proto::ops::init_logging("warn");
    let a = Args::parse();
    let tls = ClientTls {
        ca: a.ca.clone(),
        cert: a.cert.clone(),
        key: a.key.clone(),
        domain: a.server_name.clone(),
    };
    let kinds = a
        .kinds
        .iter()
        .map(|k| parse_kind(k))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut cursor = a.after_cursor;
    if let Some(f) = &a.cursor_file
        && let Ok(text) = std::fs::read_to_string(f)
    {
        cursor = Some(
            text.trim()
                .parse()
                .with_context(|| format!("cursor file {} holds no number", f.display()))?,
        );
    }
    let mut sink = a.wfdb_dir.as_deref().map(WfdbSink::new);
    let mut dash = Dashboard::default();
    let tty = std::io::stdout().is_terminal() && !a.plain;
    let deadline = a
        .duration_s
        .map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
    let mut backoff = Duration::from_millis(200);
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    'outer: loop {
        let mut client = match connect(&a.server, &tls).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("connecting to {}: {e}; retrying", a.server);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let req = SubscribeRequest {
            vehicle_ids: a.vehicles.clone(),
            kinds: kinds.clone(),
            start: Some(cursor.map_or(Start::Live(true), Start::AfterCursor)),
        };
        let mut stream = match client.subscribe(req).await {
            Ok(s) => s.into_inner(),
            Err(status) => {
                eprintln!("subscribe refused: {status}; retrying");
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        backoff = Duration::from_millis(200);
        loop {
            let until_deadline = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                msg = stream.message() => match msg {
                    Ok(Some(m)) => {
                        dash.apply(&m, hospital_ingest::now_utc_ns());
                        if let Some(s) = sink.as_mut() {
                            s.handle(&m).context("writing WFDB")?;
                        }
                        cursor = Some(m.cursor);
                        if a.exit_after_sync && matches!(m.record, Some(Record::Sync(_))) {
                            break 'outer;
                        }
                    }
                    Ok(None) => { eprintln!("stream ended; resuming"); break; }
                    Err(status) => { eprintln!("stream error: {status}; resuming"); break; }
                },
                _ = ticker.tick() => {
                    if tty {
                        print!("\x1b[2J\x1b[H{}", dash.render());
                    } else {
                        let lines = dash.render();
                        println!("{}", lines.lines().skip(2).collect::<Vec<_>>().join(" | "));
                    }
                }
                () = until_deadline => break 'outer,
                _ = tokio::signal::ctrl_c() => break 'outer,
            }
        }
        tokio::time::sleep(backoff).await;
    }
    if let (Some(f), Some(c)) = (&a.cursor_file, cursor) {
        std::fs::write(f, format!("{c}\n")).with_context(|| format!("writing {}", f.display()))?;
    }
    if let Some(s) = sink {
        for (id, path) in s.finish().context("finishing WFDB records")? {
            println!(
                "wrote {} (vehicle {}, stream {})",
                path.display(),
                id.0,
                id.2
            );
        }
    }
    Ok(())
}
