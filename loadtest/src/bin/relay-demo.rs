use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    relay_ops::init_logging("warn");
    loadtest::demo::run(loadtest::demo::DemoArgs::parse()).await
}
