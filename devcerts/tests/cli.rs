//! relay-devcerts, run as the binary: it writes a PKI whose files load and whose vehicle
//! certificates carry the identity the ingest accepts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

#[test]
fn the_binary_writes_a_pki_the_ingest_accepts() {
    let work = tempfile::tempdir().unwrap();
    let certs = work.path().join("certs");
    let out = Command::new(env!("CARGO_BIN_EXE_relay-devcerts"))
        .args(["--vehicle", "amb-9", "--subscriber", "ed-console", "--out"])
        .arg(&certs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in ["fleet-ca", "hospital-ca", "ingest", "amb-9", "ed-console"] {
        let chain = relay_ops::pem::load_certs(&certs.join(format!("{name}.pem"))).unwrap();
        relay_ops::pem::load_key(&certs.join(format!("{name}.key"))).unwrap();
        if name == "amb-9" {
            assert_eq!(
                hospital_ingest::tls::vehicle_id(&chain[0]).unwrap(),
                "amb-9"
            );
        }
    }
    // The ingest's own loader takes the directory as it is.
    let tls = hospital_ingest::config::Tls::from_dev_dir(&certs);
    assert!(tls.fleet_ca.exists() && tls.subscriber_ca.exists());
}
