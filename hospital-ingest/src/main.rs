#[tokio::main]
async fn main() -> anyhow::Result<()> {
    hospital_ingest::run_cli(std::env::args_os().collect()).await
}
