//! The demo: a development PKI, an ingest, two ambulances, the ED web view and an ED monitor,
//! all on loopback, with embedded defaults and the shipped recordings.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use ed_client::client::ClientTls;
use ed_client::monitor::{self, MonitorOptions};
use ed_client::web::{EdWeb, WebConfig, auth::hash_password};
use hospital_ingest::{Ingest, IngestConfig};
use relay_devcerts::{DevPki, generate};
use vehicle_agent::config::SourceConfig;
use vehicle_agent::{Agent, AgentConfig};

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "relay-demo",
    version,
    about = "Run ingest, two ambulances and an ED monitor on loopback"
)]
/// Flags of `relay-demo`.
pub struct DemoArgs {
    /// Directory with the WFDB records (100, s0010_re).
    #[arg(long, default_value_os_t = default_data_dir())]
    pub data_dir: PathBuf,
    /// Stop after this many seconds (runs until ctrl-c when absent).
    #[arg(long)]
    pub duration_s: Option<u64>,
    /// Also write every waveform the monitor receives as WFDB records here.
    #[arg(long)]
    pub wfdb_dir: Option<PathBuf>,
    /// Replay speed of the recordings (1 = real time).
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// Print status lines instead of redrawing the screen.
    #[arg(long)]
    pub plain: bool,
    /// HTTPS address of the ED web view (ed-web).
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub web_listen: std::net::SocketAddr,
}

/// The shipped recordings (data/ecg).
pub fn default_data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/ecg")
}

fn agent(
    pki: &Path,
    vehicle: &str,
    ingest: std::net::SocketAddr,
    ecg: SourceConfig,
    lat: f64,
    lon: f64,
) -> AgentConfig {
    let mut c = AgentConfig {
        vehicle_id: vehicle.into(),
        // The demo runs on the development PKI it made itself.
        allow_dev_pki: true,
        ..AgentConfig::default()
    };
    c.ingest.address = ingest;
    c.spool.path = pki.join(format!("spool-{vehicle}.redb"));
    c.tls.ca_cert = pki.join("hospital-ca.pem");
    c.tls.cert = pki.join(format!("{vehicle}.pem"));
    c.tls.key = pki.join(format!("{vehicle}.key"));
    c.sources = vec![
        ecg,
        SourceConfig::SyntheticVitals {
            interval: Duration::from_secs(1),
        },
        SourceConfig::SyntheticGps {
            interval: Duration::from_secs(1),
            start_latitude_deg: lat,
            start_longitude_deg: lon,
        },
    ];
    c
}

/// Runs the demo until ctrl-c or `--duration-s`.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    for rec in ["100", "s0010_re"] {
        let hea = args.data_dir.join(format!("{rec}.hea"));
        anyhow::ensure!(hea.exists(), "{} not found; pass --data-dir", hea.display());
    }
    let work = tempfile::tempdir().context("creating a work directory")?;
    let pki = work.path().join("certs");
    let vehicles = vec!["amb-1".to_string(), "amb-2".to_string()];
    generate(
        &pki,
        &DevPki {
            vehicles,
            subscribers: vec!["ed-console".into(), "ed-web".into()],
            ..DevPki::default()
        },
    )
    .context("creating development certificates")?;

    let mut cfg = IngestConfig {
        // The demo runs on the development PKI it made itself.
        allow_dev_pki: true,
        ..IngestConfig::default()
    };
    cfg.quic.listen = "127.0.0.1:0".parse()?;
    cfg.grpc.listen = "127.0.0.1:0".parse()?;
    cfg.metrics.listen = Some("127.0.0.1:0".parse()?);
    cfg.tls = hospital_ingest::config::Tls::from_dev_dir(&pki);
    cfg.grpc.access_policy = Some(pki.join(relay_devcerts::ACCESS_POLICY));
    cfg.store.path = work.path().join("store/relay.redb");
    let ingest = Ingest::start(cfg).await?;

    let replay = |rec: &str| SourceConfig::Wfdb {
        record: args.data_dir.join(rec),
        speed: args.speed,
        r#loop: true,
        name: "ecg".into(),
    };
    let a1 = Agent::start(agent(
        &pki,
        "amb-1",
        ingest.quic_addr,
        replay("100"),
        52.5200,
        13.4050,
    ))
    .await?;
    let a2 = Agent::start(agent(
        &pki,
        "amb-2",
        ingest.quic_addr,
        replay("s0010_re"),
        52.4900,
        13.3600,
    ))
    .await?;

    let (web, password) = start_web(&pki, work.path(), ingest.grpc_addr, args.web_listen).await?;
    println!(
        "relay demo: ingest QUIC {} gRPC {} metrics http://{}/metrics; amb-1 replays MIT-BIH 100, amb-2 PTB s0010_re; ctrl-c stops",
        ingest.quic_addr,
        ingest.grpc_addr,
        ingest
            .metrics_addr
            .map(|a| a.to_string())
            .unwrap_or_default()
    );
    println!(
        "ED web view: https://{}/ (login: demo / {password}; the certificate is the demo's own, \
         signed by {}: accept the browser's warning or trust that CA)",
        web.addr,
        pki.join("hospital-ca.pem").display()
    );
    let summary = monitor::run(MonitorOptions {
        server: format!("https://{}", ingest.grpc_addr),
        tls: ClientTls::from_dev_dir(&pki, "ed-console"),
        vehicles: Vec::new(),
        kinds: Vec::new(),
        after_cursor: Some(0),
        from_capture_time_ns: None,
        cursor_file: None,
        wfdb_dir: args.wfdb_dir.clone(),
        fhir: None,
        incident: None,
        max_gap_fill: ed_client::client::DEFAULT_MAX_GAP_FILL,
        exit_after_sync: false,
        duration: args.duration_s.map(Duration::from_secs),
        plain: args.plain,
    })
    .await?;
    print!("{}", summary.dashboard.render());
    for (id, path) in summary.written {
        println!("wrote {} ({} stream {})", path.display(), id.0, id.2);
    }
    web.shutdown();
    a1.shutdown().await?;
    a2.shutdown().await?;
    ingest.shutdown().await?;
    Ok(())
}

/// Starts ed-web for one user, `demo`, whose password is made up for this run.
async fn start_web(
    pki: &Path,
    work: &Path,
    grpc: std::net::SocketAddr,
    listen: std::net::SocketAddr,
) -> anyhow::Result<(EdWeb, String)> {
    use rand::RngCore;
    let mut raw = [0_u8; 9];
    rand::rng().fill_bytes(&mut raw);
    let password: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let users = work.join("ed-web-users.toml");
    std::fs::write(
        &users,
        format!(
            "[[user]]\nname = \"demo\"\npassword_hash = \"{}\"\nvehicles = [\"*\"]\n",
            hash_password(&password)?
        ),
    )
    .context("writing the demo's ed-web users file")?;
    let mut w = WebConfig {
        // The demo runs on the development PKI it made itself.
        allow_dev_pki: true,
        ..WebConfig::default()
    };
    w.http.listen = listen;
    w.http.cert = pki.join(format!("{}.pem", relay_devcerts::ED_WEB_SERVER));
    w.http.key = pki.join(format!("{}.key", relay_devcerts::ED_WEB_SERVER));
    w.ingest.url = format!("https://{grpc}");
    w.ingest.ca = pki.join("hospital-ca.pem");
    w.ingest.cert = pki.join("ed-web.pem");
    w.ingest.key = pki.join("ed-web.key");
    w.auth.users_file = users;
    let web = EdWeb::start(w)
        .await
        .with_context(|| format!("starting ed-web on {listen} (pass --web-listen)"))?;
    Ok((web, password))
}
