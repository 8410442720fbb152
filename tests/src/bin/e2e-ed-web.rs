//! The ed-web binary's main, built inside this package so end-to-end tests can run it as a
//! real process (and kill it with SIGKILL) via CARGO_BIN_EXE_e2e-ed-web.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ed_client::web::run_cli(std::env::args_os().collect()).await
}
