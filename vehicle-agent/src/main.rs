use anyhow::Context;
use clap::Parser;
use vehicle_agent::config::{AgentConfig, Cli};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    relay_proto::ops::init_logging("info");
    let cli = Cli::parse();
    let cfg = AgentConfig::load(&cli).context("loading configuration")?;
    let agent = vehicle_agent::Agent::start(cfg).await?;
    relay_proto::ops::shutdown_signal().await;
    tracing::info!("shutting down");
    agent.shutdown().await.map(|_| ())
}
