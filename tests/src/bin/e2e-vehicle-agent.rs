//! The vehicle-agent binary, built inside this package so end-to-end tests can run it as a
//! real process (and kill it with SIGKILL) via CARGO_BIN_EXE_e2e-vehicle-agent.
use anyhow::Context;
use vehicle_agent::config::AgentConfig;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    relay_ops::init_logging("info");
    let cfg = relay_ops::config::exit_on_cli(AgentConfig::load_from(std::env::args_os()))
        .context("loading configuration")?;
    let agent = vehicle_agent::Agent::start(cfg).await?;
    relay_ops::shutdown_signal().await;
    agent.shutdown().await.map(|_| ())
}
