use anyhow::Context;
use clap::Parser;
use vehicle_agent::config::{AgentConfig, Cli};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    relay_proto::ops::init_logging("info");
    let cli = Cli::parse();
    let cfg = AgentConfig::load(&cli).context("loading configuration")?;
    let agent = vehicle_agent::Agent::start(cfg).await?;
    shutdown_signal().await;
    tracing::info!("shutting down");
    agent.shutdown().await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
