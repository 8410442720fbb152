//! The ED monitor loop shared by `ed-monitor` and the demo: subscribe (resuming from a cursor,
//! reconnecting on its own), keep the dashboard, optionally write WFDB, redraw every second.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use relay_proto::model::{SubscribeRequest, subscribe_request::Start, subscribe_response::Record};
use tokio::time::Instant;

use crate::client::{ClientTls, StreamId, WfdbSink, connect};
use crate::view::Dashboard;

#[derive(Debug, Clone)]
/// What the monitor connects to and what it does with what it receives.
pub struct MonitorOptions {
    /// e.g. `https://127.0.0.1:50051`
    pub server: String,
    /// TLS files of this client.
    pub tls: ClientTls,
    /// Empty: all vehicles.
    pub vehicles: Vec<String>,
    /// Empty: all kinds (StreamKind values).
    pub kinds: Vec<i32>,
    /// Start after this cursor; live only when absent (a cursor file, if present, wins).
    pub after_cursor: Option<u64>,
    /// Rewind: start with what was captured at or after this time (UTC ns), when no cursor
    /// is known; a reconnect resumes from the cursor.
    pub from_capture_time_ns: Option<i64>,
    /// Read at start, written on exit.
    pub cursor_file: Option<PathBuf>,
    /// Write every waveform stream as a WFDB record here.
    pub wfdb_dir: Option<PathBuf>,
    /// Write what was received of the one vehicle followed as a FHIR R4 Bundle (JSON) here.
    pub fhir: Option<PathBuf>,
    /// The incident (EMS case number) the FHIR export belongs to: it gets an Encounter.
    pub incident: Option<String>,
    /// Holes up to this long are filled in a record; past it a new record begins.
    pub max_gap_fill: Duration,
    /// Stop once the backlog has been received (sync marker).
    pub exit_after_sync: bool,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// Print the table every second instead of redrawing the screen.
    pub plain: bool,
}

/// What a monitor run ends with.
#[derive(Debug)]
pub struct MonitorSummary {
    /// The last state of the dashboard.
    pub dashboard: Dashboard,
    /// The cursor of the last message received, to resume from.
    pub cursor: Option<u64>,
    /// Records written: stream and header path.
    pub written: Vec<(StreamId, PathBuf)>,
}

/// Subscribes (resuming and reconnecting on its own), keeps the dashboard and writes WFDB until told to stop.
pub async fn run(opts: MonitorOptions) -> anyhow::Result<MonitorSummary> {
    let mut cursor = opts.after_cursor;
    if let Some(f) = &opts.cursor_file
        && let Ok(text) = std::fs::read_to_string(f)
    {
        let c = text
            .trim()
            .parse()
            .with_context(|| format!("cursor file {} holds no number", f.display()))?;
        cursor = Some(c);
    }
    let mut fhir = match (&opts.fhir, opts.vehicles.as_slice()) {
        (None, _) => None,
        (Some(_), [vehicle]) => {
            Some(crate::fhir::FhirExport::new(vehicle).with_incident(opts.incident.clone()))
        }
        (Some(_), _) => anyhow::bail!("a FHIR export is of one vehicle: name it once"),
    };
    let mut sink = opts
        .wfdb_dir
        .as_deref()
        .map(|d| WfdbSink::with_max_gap_fill(d, opts.max_gap_fill));
    let mut dash = Dashboard::default();
    let redraw = std::io::stdout().is_terminal() && !opts.plain;
    let deadline = opts.duration.map(|d| Instant::now() + d);
    let mut backoff = Duration::from_millis(200);
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let until_deadline = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(until_deadline);
    'outer: loop {
        let attempt = async {
            let mut client = connect(&opts.server, &opts.tls).await?;
            let req = SubscribeRequest {
                vehicle_ids: opts.vehicles.clone(),
                kinds: opts.kinds.clone(),
                start: Some(match (cursor, opts.from_capture_time_ns) {
                    (Some(c), _) => Start::AfterCursor(c),
                    (None, Some(t)) => Start::FromCaptureTimeNs(t),
                    (None, None) => Start::Live(true),
                }),
                ..Default::default()
            };
            anyhow::Ok(client.subscribe(req).await?.into_inner())
        };
        let mut stream = tokio::select! {
            r = attempt => match r {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("connecting to {}: {e:#}; retrying in {backoff:?}", opts.server);
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = &mut until_deadline => break 'outer,
                        _ = tokio::signal::ctrl_c() => break 'outer,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            },
            () = &mut until_deadline => break 'outer,
            _ = tokio::signal::ctrl_c() => break 'outer,
        };
        backoff = Duration::from_millis(200);
        loop {
            tokio::select! {
                msg = stream.message() => match msg {
                    Ok(Some(m)) => {
                        dash.apply(&m, relay_ops::now_utc_ns());
                        if let Some(s) = sink.as_mut() {
                            s.handle(&m).context("writing WFDB")?;
                        }
                        if let Some(f) = fhir.as_mut() {
                            f.handle(&m);
                        }
                        cursor = Some(m.cursor);
                        if opts.exit_after_sync && matches!(m.record, Some(Record::Sync(_))) {
                            break 'outer;
                        }
                    }
                    Ok(None) => { eprintln!("stream ended; resuming"); break; }
                    Err(status) => { eprintln!("stream error: {status}; resuming"); break; }
                },
                _ = ticker.tick() => {
                    if redraw {
                        print!("\x1b[2J\x1b[H{}", dash.render());
                    } else {
                        print!("{}", dash.render());
                    }
                }
                () = &mut until_deadline => break 'outer,
                _ = tokio::signal::ctrl_c() => break 'outer,
            }
        }
    }
    if let (Some(f), Some(c)) = (&opts.cursor_file, cursor) {
        std::fs::write(f, format!("{c}\n")).with_context(|| format!("writing {}", f.display()))?;
    }
    let written = match sink {
        Some(s) => s.finish().context("finishing WFDB records")?,
        None => Vec::new(),
    };
    if let (Some(path), Some(export)) = (&opts.fhir, &fhir) {
        let text = serde_json::to_string_pretty(&export.bundle())?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(MonitorSummary {
        dashboard: dash,
        cursor,
        written,
    })
}
