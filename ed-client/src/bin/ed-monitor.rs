//! ED-side subscriber: live terminal view of the ambulances, optional WFDB export of every
//! waveform stream, resumable from a cursor file; reconnects on its own.
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use ed_client::client::IngestArgs;
use ed_client::monitor::{MonitorOptions, run};
use relay_proto::model::StreamKind;

#[derive(Debug, Parser)]
#[command(
    name = "ed-monitor",
    version,
    about = "Watch ambulances live and export their waveforms as WFDB records"
)]
struct Args {
    #[command(flatten)]
    ingest: IngestArgs,
    /// Vehicles to follow (repeat); all when absent.
    #[arg(long = "vehicle")]
    vehicles: Vec<String>,
    /// Stream kinds to follow (waveform, vitals, location, events; repeat); all when absent.
    #[arg(long = "kind", value_parser = parse_kind)]
    kinds: Vec<i32>,
    /// Start after this cursor (0 = oldest retained); live only when absent.
    #[arg(long)]
    after_cursor: Option<u64>,
    /// Rewind: start with what was captured at or after this time, RFC 3339
    /// (2026-11-29T08:00:00Z) or a duration ago (10m); a cursor (file or flag) wins.
    #[arg(long, value_parser = parse_time)]
    from: Option<i64>,
    /// Keep the resume cursor here: read at start (wins over --after-cursor), written on exit.
    #[arg(long)]
    cursor_file: Option<PathBuf>,
    /// Write every waveform stream as a WFDB record (format 16) into this directory.
    #[arg(long)]
    wfdb_dir: Option<PathBuf>,
    /// Write what was received of the one --vehicle as a FHIR R4 Bundle (JSON) to this file:
    /// vital-signs Observations (LOINC + MDC), waveforms as SampledData per 10 s, the vehicle
    /// as a Device. With --from and --exit-after-sync it exports a time range.
    #[arg(long)]
    fhir: Option<PathBuf>,
    /// The incident (EMS case number) the --fhir export belongs to: the Bundle gets an
    /// Encounter with it, and every Observation refers to the Encounter.
    #[arg(long)]
    incident: Option<String>,
    /// Holes in a stream up to this long are filled with the invalid sample value; past it
    /// the stream continues in a new record (`..._s2`, ...), so a far-off sample index never
    /// makes a huge file.
    #[arg(long, default_value = "10m", value_parser = relay_ops::config::parse_duration)]
    max_gap_fill: Duration,
    /// Exit once the backlog has been received (the sync marker), e.g. to export history.
    #[arg(long)]
    exit_after_sync: bool,
    /// Exit after this many seconds.
    #[arg(long)]
    duration_s: Option<u64>,
    /// Print the table every second instead of redrawing the screen.
    #[arg(long)]
    plain: bool,
}

fn parse_time(s: &str) -> Result<i64, String> {
    let at = humantime::parse_rfc3339_weak(s)
        .or_else(|_| humantime::parse_duration(s).map(|ago| std::time::SystemTime::now() - ago))
        .map_err(|_| format!("{s:?} is neither an RFC 3339 time nor a duration"))?;
    let ns = at
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| format!("{s:?} is before 1970"))?
        .as_nanos();
    i64::try_from(ns).map_err(|_| format!("{s:?} is too far ahead"))
}

fn parse_kind(s: &str) -> Result<i32, String> {
    Ok(match s {
        "waveform" => StreamKind::Waveform,
        "vitals" => StreamKind::Vitals,
        "location" => StreamKind::Location,
        "events" => StreamKind::Events,
        other => {
            return Err(format!(
                "unknown kind {other:?} (waveform, vitals, location, events)"
            ));
        }
    } as i32)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    relay_ops::init_logging("warn");
    let a = Args::parse();
    let opts = MonitorOptions {
        server: a.ingest.server.clone(),
        tls: a.ingest.tls(),
        vehicles: a.vehicles,
        kinds: a.kinds,
        after_cursor: a.after_cursor,
        from_capture_time_ns: a.from,
        cursor_file: a.cursor_file,
        wfdb_dir: a.wfdb_dir,
        fhir: a.fhir,
        incident: a.incident,
        max_gap_fill: a.max_gap_fill,
        exit_after_sync: a.exit_after_sync,
        duration: a.duration_s.map(Duration::from_secs),
        plain: a.plain,
    };
    let summary = run(opts).await?;
    for (id, path) in summary.written {
        println!(
            "wrote {} (vehicle {}, stream {})",
            path.display(),
            id.0,
            id.2
        );
    }
    Ok(())
}
