//! Outbound HL7 v2 feed: every vehicle's numerics and waveforms as IHE PCD-01 ORU^R01, one
//! message per vehicle session per second, over MLLP (TLS optional) to an integration engine;
//! at least once, in order, resumable (see `ed_client::hl7_feed`).
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use ed_client::client::IngestArgs;
use ed_client::hl7_feed::{FeedOptions, run};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "ed-hl7-feed",
    version,
    about = "Feed an HL7 v2 integration engine (IHE PCD-01 over MLLP) from the relay"
)]
struct Args {
    #[command(flatten)]
    ingest: IngestArgs,
    /// The integration engine's MLLP listener, host:port.
    #[arg(long)]
    target: String,
    /// CA (PEM) of the engine's certificate: MLLP over TLS (plain MLLP when absent).
    #[arg(long, requires = "target_name")]
    target_ca: Option<PathBuf>,
    /// Name the engine's certificate must carry.
    #[arg(long, requires = "target_ca")]
    target_name: Option<String>,
    /// State file: acknowledged messages and the cursor to resume from.
    #[arg(long, default_value = "hl7-feed.state.json")]
    state: PathBuf,
    /// Sending facility (MSH-4).
    #[arg(long, default_value = "RELAY")]
    facility: String,
    /// An acknowledgement must come within this; otherwise the message is sent again.
    #[arg(long, default_value = "10s", value_parser = relay_ops::config::parse_duration)]
    ack_timeout: Duration,
    /// Serve Prometheus metrics here (relay_ed_hl7_messages_total by result).
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    relay_ops::init_logging("info");
    let a = Args::parse();
    let metrics_listen = a.metrics_listen;
    let opts = FeedOptions {
        server: a.ingest.server.clone(),
        tls: a.ingest.tls(),
        target: a.target,
        target_tls: a.target_ca.zip(a.target_name),
        state: a.state,
        facility: a.facility,
        ack_timeout: a.ack_timeout,
    };
    let stop = CancellationToken::new();
    if let Some(addr) = metrics_listen {
        relay_ops::serve_metrics(addr, stop.clone().cancelled_owned()).await?;
        metrics::describe_counter!(
            "relay_ed_hl7_messages_total",
            "HL7 feed deliveries by result: accepted (AA), refused (AE/AR: sent again), timeout, failed (connection lost), unreachable"
        );
    }
    let on_signal = stop.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        on_signal.cancel();
    });
    run(opts, stop).await
}
