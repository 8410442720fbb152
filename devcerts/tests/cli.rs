//! relay-devcerts, run as the binary: it writes a PKI whose files load and whose vehicle
//! certificates carry the identity the ingest accepts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

#[test]
fn the_binary_writes_a_pki_the_ingest_accepts() {
    let work = tempfile::tempdir().unwrap();
    let certs = work.path().join("certs");
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_relay-devcerts"))
            .args(args)
            .arg("--out")
            .arg(&certs)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["--vehicle", "amb-9", "--subscriber", "ed-console"]);
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
    // Keys are owner-only, certificates bounded in time.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&certs), 0o700);
        for key in ["fleet-ca", "hospital-ca", "ingest", "amb-9", "ed-console"] {
            assert_eq!(mode(&certs.join(format!("{key}.key"))), 0o600, "{key}");
        }
    }
    let days = |name: &str| {
        let pem = std::fs::read(certs.join(format!("{name}.pem"))).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        let cert = pem.parse_x509().unwrap();
        let v = cert.validity();
        (v.not_after.timestamp() - v.not_before.timestamp()) / 86_400
    };
    assert_eq!(
        days("amb-9"),
        365,
        "365 days, plus an hour of slack for clock skew"
    );
    assert_eq!(days("fleet-ca"), 730);
    // The ingest's own loader takes the directory as it is.
    let tls = hospital_ingest::config::Tls::from_dev_dir(&certs);
    assert!(tls.fleet_ca.exists() && tls.subscriber_ca.exists());
    // Both revocation lists start empty, and --revoke-subscriber lists an ED client's serial.
    let crl = tls.subscriber_crl.unwrap();
    assert!(
        hospital_ingest::tls::revoked_serials(&crl)
            .unwrap()
            .is_empty()
    );
    assert!(
        hospital_ingest::tls::revoked_serials(&tls.fleet_crl.unwrap())
            .unwrap()
            .is_empty()
    );
    run(&["--revoke-subscriber", "ed-console"]);
    let ed = relay_ops::pem::load_certs(&certs.join("ed-console.pem")).unwrap();
    let serial = hospital_ingest::tls::certificate_serial(&ed[0]).unwrap();
    assert_eq!(
        hospital_ingest::tls::revoked_serials(&crl).unwrap(),
        vec![serial]
    );
}
