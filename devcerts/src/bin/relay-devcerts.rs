//! Creates a development PKI (fleet CA, hospital CA, ingest, vehicle and ED client certificates).
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use relay_devcerts::{DevPki, generate};

/// Create development certificates for the relay (never use them in production).
#[derive(Debug, Parser)]
#[command(name = "relay-devcerts", version)]
struct Args {
    /// Output directory.
    #[arg(long, default_value = "certs")]
    out: PathBuf,
    /// Vehicle ids (certificate common names); repeat for several.
    #[arg(long = "vehicle", default_values_t = vec!["amb-1".to_string()])]
    vehicles: Vec<String>,
    /// ED client names; repeat for several.
    #[arg(long = "subscriber", default_values_t = vec!["ed-console".to_string()])]
    subscribers: Vec<String>,
    /// Names and addresses of the ingest certificate; repeat for several.
    #[arg(long = "ingest-name", default_values_t = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()])]
    ingest_names: Vec<String>,
    /// Only rewrite fleet-ca.crl.pem in --out, revoking these vehicles' certificates (repeat
    /// for several); the ingest applies it on SIGHUP.
    #[arg(long = "revoke", value_name = "VEHICLE")]
    revoke: Vec<String>,
    /// Only rewrite hospital-ca.crl.pem in --out, revoking these ED clients' certificates
    /// (repeat for several); the ingest applies it on SIGHUP or when the file changes.
    #[arg(long = "revoke-subscriber", value_name = "NAME")]
    revoke_subscriber: Vec<String>,
    /// Days the leaf certificates are valid (the CAs twice as long).
    #[arg(long, default_value_t = 365)]
    valid_days: u32,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if !a.revoke_subscriber.is_empty() {
        let crl = relay_devcerts::revoke_subscribers(&a.out, &a.revoke_subscriber)
            .with_context(|| format!("revoking in {}", a.out.display()))?;
        println!(
            "{} revoked in {}",
            a.revoke_subscriber.join(", "),
            crl.display()
        );
        if a.revoke.is_empty() {
            return Ok(());
        }
    }
    if !a.revoke.is_empty() {
        let crl = relay_devcerts::revoke(&a.out, &a.revoke)
            .with_context(|| format!("revoking in {}", a.out.display()))?;
        println!("{} revoked in {}", a.revoke.join(", "), crl.display());
        return Ok(());
    }
    let pki = DevPki {
        vehicles: a.vehicles,
        subscribers: a.subscribers,
        ingest_names: a.ingest_names,
        valid_days: a.valid_days,
    };
    generate(&a.out, &pki)
        .with_context(|| format!("writing certificates to {}", a.out.display()))?;
    println!("development PKI written to {}", a.out.display());
    Ok(())
}
