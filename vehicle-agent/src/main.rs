#[tokio::main]
async fn main() -> anyhow::Result<()> {
    vehicle_agent::run_cli(std::env::args_os().collect()).await
}
