use anyhow::Context;
use clap::Parser;
use hospital_ingest::config::{Cli, IngestConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    relay_proto::ops::init_logging("info");
    let cli = Cli::parse();
    let cfg = IngestConfig::load(&cli).context("loading configuration")?;
    let ingest = hospital_ingest::Ingest::start(cfg).await?;
    relay_proto::ops::shutdown_signal().await;
    tracing::info!("shutting down");
    ingest.shutdown().await
}
