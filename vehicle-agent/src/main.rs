use anyhow::Context;
use clap::Parser;
use vehicle_agent::config::{AgentConfig, Cli};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    relay_ops::init_logging("info");
    let cli = Cli::parse();
    let cfg = AgentConfig::load(&cli).context("loading configuration")?;
    let agent = vehicle_agent::Agent::start(cfg).await?;
    tokio::select! {
        () = relay_ops::shutdown_signal() => tracing::info!("shutting down"),
        () = agent.failed() => tracing::error!("agent failed; stopping so the supervisor restarts it"),
    }
    agent.shutdown().await.map(|_| ())
}
