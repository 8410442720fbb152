use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    hospital_ingest::run_cli(hospital_ingest::config::Cli::parse()).await
}
