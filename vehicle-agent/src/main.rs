use anyhow::Context;
use vehicle_agent::config::AgentConfig;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    relay_ops::init_logging("info");
    let cfg = relay_ops::config::exit_on_cli(AgentConfig::load_from(std::env::args_os()))
        .context("loading configuration")?;
    let agent = vehicle_agent::Agent::start(cfg).await?;
    tokio::select! {
        () = relay_ops::shutdown_signal() => tracing::info!("shutting down"),
        () = agent.failed() => tracing::error!("agent failed; stopping so the supervisor restarts it"),
    }
    agent.shutdown().await.map(|_| ())
}
