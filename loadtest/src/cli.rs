//! The `loadtest` command: `run` (load generator), `emulate` (stand-alone link emulator) and the
//! internal `ingest` used to measure the ingest as its own process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tokio::io::AsyncBufReadExt;

use crate::loadgen::{self, RunArgs};
use relay_emulator::spec::parse_duration;
use relay_emulator::{BearerSpec, Link, TraceCache};

#[derive(Debug, clap::Parser)]
#[command(
    name = "loadtest",
    version,
    about = "Link emulator and load generator for the ambulance telemetry relay"
)]
/// The `loadtest` command line.
pub struct Cli {
    #[command(subcommand)]
    /// What to do.
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
/// The subcommands.
pub enum Command {
    /// Run vehicles, emulated bearers and subscribers against an ingest and report.
    Run(Box<RunArgs>),
    /// Run emulated links in front of a UDP service (e.g. an ingest's QUIC port).
    Emulate(EmulateArgs),
    /// Measure the waveform codec on records: size against 16-bit and varints, time per
    /// sample, every frame checked.
    Codec(crate::codec::CodecArgs),
    /// Many vehicles' worth of traffic from pre-encoded frames against an ingest of its own:
    /// every frame checked at a subscriber, added latency, ingest CPU and memory.
    Blast(Box<crate::blast::BlastArgs>),
    /// The same fleet through the ingest and through NATS JetStream (fsync per
    /// acknowledgement, and lazy), one after the other: CPU per stored frame and RSS of each.
    Versus(Box<crate::versus::VersusArgs>),
    /// Run a hospital ingest (used by `run` to measure it as a separate process); takes the
    /// ingest's own flags.
    #[command(hide = true)]
    Ingest {
        /// hospital-ingest flags, e.g. --config FILE.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

#[derive(Debug, clap::Args)]
/// Flags of `loadtest emulate`.
pub struct EmulateArgs {
    /// Where the links forward to.
    #[arg(long)]
    pub target: SocketAddr,
    /// Address of the first link; further links take the following ports (port 0: any).
    #[arg(long, default_value = "127.0.0.1:4500")]
    pub listen: SocketAddr,
    /// One link per flag, e.g. `data/traces/ATT-LTE-driving.up,delay=40ms,blackout=20s-80s`.
    #[arg(long = "bearer", required = true)]
    pub bearers: Vec<String>,
    #[arg(long, default_value_t = 1)]
    /// Seeds the links' random choices.
    pub seed: u64,
    /// Print counters this often.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub stats_interval: Duration,
}

/// Runs a `loadtest` command line.
pub async fn main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Ingest { args } => {
            let argv = std::iter::once(std::ffi::OsString::from("hospital-ingest")).chain(args);
            hospital_ingest::run_cli(argv.collect()).await
        }
        Command::Emulate(a) => {
            relay_ops::init_logging("warn");
            emulate(a).await
        }
        Command::Blast(a) => {
            relay_ops::init_logging("error");
            let exe = std::env::current_exe().context("locating this executable")?;
            let report = crate::blast::run(*a, &exe).await?;
            println!("{}", report.human());
            Ok(())
        }
        Command::Versus(a) => {
            relay_ops::init_logging("error");
            let exe = std::env::current_exe().context("locating this executable")?;
            let report = crate::versus::run(*a, &exe).await?;
            println!("{}", report.human());
            Ok(())
        }
        Command::Codec(a) => {
            let report = crate::codec::run(&a)?;
            println!("{}", report.human());
            Ok(())
        }
        Command::Run(a) => {
            // Fifty agents reconnecting through coverage holes is the point of a run, not news:
            // only errors reach the terminal unless RUST_LOG asks for more.
            relay_ops::init_logging("error");
            let exe = std::env::current_exe().context("locating this executable")?;
            let report = loadgen::run(*a, &exe).await?;
            println!("{}", report.human());
            Ok(())
        }
    }
}

async fn emulate(a: EmulateArgs) -> anyhow::Result<()> {
    let mut traces = TraceCache::default();
    let mut links = Vec::new();
    for (i, text) in a.bearers.iter().enumerate() {
        let spec = BearerSpec::parse(text, &mut traces)?;
        let mut listen = a.listen;
        if listen.port() != 0 {
            let port =
                u16::try_from(usize::from(listen.port()) + i).context("port out of range")?;
            listen.set_port(port);
        }
        let link = Link::start(listen, a.target, spec, a.seed.wrapping_add(i as u64))
            .await
            .with_context(|| format!("starting link {i} on {listen}"))?;
        println!(
            "link {i}: {} -> {} ({})",
            link.addr, a.target, link.spec.name
        );
        links.push(link);
    }
    println!("commands: cut N | restore N | stats | quit");
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut tick = tokio::time::interval(a.stats_interval);
    let mut stdin_open = true;
    let print = |links: &[Link]| {
        for (i, l) in links.iter().enumerate() {
            let c = l.counters();
            println!(
                "link {i}: up {} offered / {} delivered / {} dropped (loss {} burst {} queue {} down {}); down {} / {} / {}",
                c.up.offered_packets,
                c.up.delivered_packets,
                c.up.dropped(),
                c.up.dropped_random_loss,
                c.up.dropped_burst_loss,
                c.up.dropped_queue_full,
                c.up.dropped_link_down,
                c.down.offered_packets,
                c.down.delivered_packets,
                c.down.dropped()
            );
        }
    };
    loop {
        tokio::select! {
            () = relay_ops::shutdown_signal() => break,
            _ = tick.tick() => print(&links),
            line = lines.next_line(), if stdin_open => {
                let Ok(Some(line)) = line else { stdin_open = false; continue; };
                let mut words = line.split_whitespace();
                let cmd = words.next().unwrap_or("");
                let which = words.next().and_then(|w| w.parse::<usize>().ok());
                match (cmd, which.and_then(|i| links.get(i))) {
                    ("cut", Some(l)) => l.cut(),
                    ("restore", Some(l)) => l.restore(),
                    ("stats", _) => print(&links),
                    ("quit", _) => break,
                    ("", _) => {}
                    _ => println!("commands: cut N | restore N | stats | quit"),
                }
            }
        }
    }
    print(&links);
    Ok(())
}

/// Shipped traces, for help texts and tests.
pub fn traces_dir() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/traces")
}
