//! The clinicians' browser view: subscribes to the ingest over gRPC and serves an HTTPS web
//! application. `ed-web hash-password` reads a password on stdin and prints the argon2 hash
//! for the users file.
use std::io::BufRead;

use anyhow::Context;
use ed_client::web::{EdWeb, WebConfig, auth};
use relay_ops::config::load_or_exit;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "hash-password") {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading the password from stdin")?;
        let password = line.trim_end_matches(['\r', '\n']);
        anyhow::ensure!(!password.is_empty(), "empty password on stdin");
        println!("{}", auth::hash_password(password)?);
        return Ok(());
    }
    relay_ops::init_logging("info");
    let cfg: WebConfig = load_or_exit(args)?;
    let web = EdWeb::start(cfg).await.context("starting ed-web")?;
    println!("ed-web: https://{}/", web.addr);
    relay_ops::shutdown_signal().await;
    web.shutdown();
    Ok(())
}
