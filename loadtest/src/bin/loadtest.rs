use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    loadtest::cli::main(loadtest::cli::Cli::parse()).await
}
