//! The clinicians' browser view: subscribes to the ingest over gRPC and serves an HTTPS web
//! application. `ed-web hash-password` reads a password on stdin and prints the argon2 hash
//! for the users file.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ed_client::web::run_cli(std::env::args_os().collect()).await
}
