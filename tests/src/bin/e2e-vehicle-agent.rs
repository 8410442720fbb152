//! The vehicle-agent binary, built inside this package so end-to-end tests can run it as a
//! real process (and kill it with SIGKILL) via CARGO_BIN_EXE_e2e-vehicle-agent.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    vehicle_agent::run_cli(std::env::args_os().collect()).await
}
