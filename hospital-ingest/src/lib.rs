//! Hospital-side ingest: accepts vehicles over QUIC with mutual TLS, reassembles and stores
//! their streams durably, acknowledges what is stored, and republishes over gRPC.
//!
//! Data flow: [`quic`] (accept, certificate identity, Hello, frame validation, session) hands
//! frames to the [`writer`] thread, which runs them through the sans-IO [`reassembly`] (dedup,
//! order, gap records), commits them to the [`store`] (redb, fsync) and only then has the
//! session acknowledge them ([`quic::acks`]); committed records go to the live bus, from
//! which [`grpc`] serves subscribers (backlog, sync marker, live; [`grpc::flow`]).
//! [`config`] is the one configuration struct; [`tls`] builds both listeners' TLS.
#![warn(missing_docs)]

pub mod access;
pub mod audit;
pub mod cluster;
pub mod config;
pub mod detect;
pub mod grpc;
pub mod metrics;
pub mod quic;
pub mod reassembly;
pub mod store;
pub mod syslog;
pub mod tls;
pub mod writer;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use relay_proto::model::telemetry_server::TelemetryServer;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::IngestConfig;

pub use relay_ops::now_utc_ns;

use relay_ops::config::ServiceConfig as _;

/// What the `hospital-ingest` binary does with its command line: load the configuration
/// (printing help or version and exiting when asked), run until SIGTERM/ctrl-c, shut down
/// gracefully.
pub async fn run_cli(args: Vec<std::ffi::OsString>) -> anyhow::Result<()> {
    if args.get(1).is_some_and(|a| a == "audit") {
        return audit_cli(args.into_iter().skip(1));
    }
    relay_ops::init_logging("info");
    let cfg: IngestConfig =
        relay_ops::config::load_or_exit(args).context("loading configuration")?;
    let ingest = Ingest::start(cfg).await?;
    let stop = relay_ops::shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            () = relay_ops::reload_signal() => {
                if let Err(e) = ingest.reload() {
                    tracing::error!(error = %format!("{e:#}"), "reload failed; the previous TLS configuration stays");
                }
            }
        }
    }
    tracing::info!("shutting down");
    ingest.shutdown().await
}

/// `hospital-ingest audit ...`: check or ask the access audit log.
#[derive(Debug, clap::Parser)]
#[command(name = "hospital-ingest audit")]
enum AuditCommand {
    /// Checks the hash chain of audit files and names the first broken line. A directory
    /// stands for its audit-*.jsonl files, oldest first.
    Verify {
        /// Audit files or directories, oldest first.
        #[arg(required = true)]
        paths: Vec<std::path::PathBuf>,
    },
    /// Lists the records that involve a vehicle (who read its data) from a time on, then the
    /// clients among them.
    Query {
        /// Only records that name this vehicle.
        #[arg(long)]
        vehicle: Option<String>,
        /// From this time on: RFC 3339 (2026-11-29T06:00:00Z) or a duration ago (2h).
        #[arg(long)]
        since: Option<String>,
        /// Audit files or directories, oldest first.
        #[arg(required = true)]
        paths: Vec<std::path::PathBuf>,
    },
}

fn audit_files(paths: &[std::path::PathBuf]) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            files.extend(audit::files_in(p)?);
        } else {
            files.push(p.clone());
        }
    }
    Ok(files)
}

fn audit_cli(args: impl Iterator<Item = std::ffi::OsString>) -> anyhow::Result<()> {
    use clap::Parser as _;
    let command = match AuditCommand::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    match command {
        AuditCommand::Verify { paths } => {
            let files = audit_files(&paths)?;
            match audit::verify(&files)? {
                Ok(v) => {
                    let (first, last) = v.seqs.unwrap_or((0, 0));
                    println!(
                        "audit chain intact: {} records (seq {first}..={last}) in {} files",
                        v.records,
                        files.len()
                    );
                    Ok(())
                }
                Err(broken) => anyhow::bail!("audit chain broken at {broken}"),
            }
        }
        AuditCommand::Query {
            vehicle,
            since,
            paths,
        } => {
            let since_ns = match since.as_deref() {
                None => 0,
                Some(text) => {
                    let at = humantime::parse_rfc3339_weak(text).or_else(|_| {
                        humantime::parse_duration(text)
                            .map(|ago| std::time::SystemTime::now() - ago)
                    });
                    let at = at.with_context(|| format!("--since {text:?}: not a time"))?;
                    let ns = at
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_nanos());
                    i64::try_from(ns).unwrap_or(i64::MAX)
                }
            };
            // Printed as found: a log of any size in bounded memory.
            let (mut count, mut clients) = (0u64, std::collections::BTreeSet::new());
            audit::query_each(&audit_files(&paths)?, vehicle.as_deref(), since_ns, |r| {
                let client = r.event.client.as_ref();
                println!(
                    "{} #{} {} {:?} client={:?} serial={} remote={} vehicles={} {}",
                    r.time,
                    r.seq,
                    r.event.action,
                    r.event.outcome,
                    client.map_or("-", |c| c.subject.as_str()),
                    client.map_or("-", |c| c.serial.as_str()),
                    r.event.remote.as_deref().unwrap_or("-"),
                    r.event.vehicles.join(","),
                    r.event.detail
                );
                count += 1;
                if let Some(c) = client {
                    clients.insert((c.subject.clone(), c.serial.clone()));
                }
            })?;
            println!("{count} records; clients:");
            for (subject, serial) in clients {
                println!("  {subject} (serial {serial})");
            }
            Ok(())
        }
    }
}

/// A running ingest. Ports given as 0 are resolved in the `*_addr` fields.
#[derive(Debug)]
pub struct Ingest {
    /// Bound QUIC address.
    pub quic_addr: SocketAddr,
    /// Bound gRPC address.
    pub grpc_addr: SocketAddr,
    /// Bound metrics address, when one was asked for.
    pub metrics_addr: Option<SocketAddr>,
    stop: CancellationToken,
    quic: JoinHandle<()>,
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
    writer: std::thread::JoinHandle<()>,
    /// This node's part of a cluster of ingest nodes (JetStream store).
    cluster: Option<cluster::Cluster>,
    /// For reloads: both listeners, the configuration they were built from, live connections.
    reloader: TlsReloader,
}

impl Ingest {
    /// Validates the configuration, opens the store and starts every listener.
    pub async fn start(cfg: IngestConfig) -> anyhow::Result<Self> {
        // The recorder first: descriptions and gauges set before it exists are lost.
        relay_ops::prometheus().context("installing the metrics recorder")?;
        cfg.validate()?;
        let t = &cfg.tls;
        relay_ops::pem::refuse_development(
            &[&t.cert, &t.fleet_ca, &t.subscriber_ca],
            cfg.allow_dev_pki,
        )?;
        // One CA for both would let a vehicle certificate read patients and an ED certificate
        // pose as an ambulance.
        let fleet = relay_ops::pem::load_certs(&t.fleet_ca).context("reading the fleet CA")?;
        let subscribers =
            relay_ops::pem::load_certs(&t.subscriber_ca).context("reading the subscriber CA")?;
        if fleet.iter().any(|c| subscribers.contains(c)) {
            anyhow::bail!(
                "tls.fleet_ca and tls.subscriber_ca share a CA certificate: vehicles and ED \
                 clients must come from different CAs"
            );
        }
        // Expiry is visible weeks ahead (alerts at 30 and 7 days), not when it bites.
        for (which, path) in [
            ("server", &t.cert),
            ("fleet_ca", &t.fleet_ca),
            ("subscriber_ca", &t.subscriber_ca),
        ] {
            if let Some(at) = relay_ops::pem::earliest_expiry(path)? {
                ::metrics::gauge!("relay_ingest_certificate_expiry_timestamp_seconds", "certificate" => which)
                    .set(at as f64);
            }
        }
        relay_ops::install_crypto_provider();
        crate::metrics::describe();
        let stop = CancellationToken::new();
        let store = match cfg.store.backend {
            config::StoreBackend::Embedded => store::Store::new(
                store::EmbeddedStore::open_with_cache(&cfg.store.path, cfg.store.cache_bytes)
                    .with_context(|| format!("opening store {}", cfg.store.path.display()))?,
            ),
            config::StoreBackend::Jetstream => {
                let options = cfg.jetstream.options(&cfg.store);
                // Connecting and reading the log back blocks: not on a runtime worker.
                let opened =
                    tokio::task::spawn_blocking(move || store::JetStreamStore::open(&options))
                        .await
                        .context("opening the JetStream store")?;
                store::Store::new(opened.with_context(|| {
                    format!(
                        "opening the JetStream store (stream {} on {})",
                        cfg.jetstream.stream,
                        cfg.jetstream.servers.join(", ")
                    )
                })?)
            }
        };
        let (bus, _) = tokio::sync::broadcast::channel(cfg.grpc.live_buffer);
        // Frames as they arrive, for `early` subscribers; as deep as the live buffer.
        let (early, _) = tokio::sync::broadcast::channel(cfg.grpc.live_buffer);
        let early = grpc::early::EarlySource::new(early, store.clone());
        let retention = writer::RetentionPolicy {
            max_age: cfg.store.retention,
            max_bytes: cfg.store.max_bytes,
            max_bytes_per_vehicle: cfg.store.max_bytes_per_vehicle,
            interval: cfg.store.retention_interval,
        };
        let limits = reassembly::Limits {
            reorder_window: cfg.reassembly.reorder_window,
            max_held: cfg.reassembly.max_held_frames,
            max_gaps: cfg.reassembly.max_open_gaps,
        };
        let online = Arc::new(quic::Online::default());
        let (writer_tx, writer) = writer::spawn(
            store.clone(),
            bus.clone(),
            writer::WriterSettings {
                queue: cfg.store.writer_queue,
                limits,
                retention,
                sessions_per_hour: cfg.quic.max_new_sessions_per_hour,
                commit_interval: cfg.store.commit_interval,
            },
            online.clone(),
            tokio::runtime::Handle::current(),
        )
        .context("starting store writer")?;

        // The audit log before any listener: no access goes unrecorded.
        let forward = match cfg.audit.syslog_target() {
            Some(target) => Some(
                syslog::Forwarder::start(target, &tokio::runtime::Handle::current())
                    .context("starting the audit forward to syslog")?,
            ),
            None => None,
        };
        let (audit, _audit_writer) = audit::AuditLog::open(audit::AuditSettings {
            dir: cfg.audit_dir(),
            max_file_bytes: cfg.audit.max_file_bytes,
            max_files: cfg.audit.max_files,
            queue: cfg.audit.queue,
            forward,
        })
        .context("opening the audit log")?;
        let server_config =
            tls::quic_server_config(&cfg).context("building QUIC TLS configuration")?;
        let bound = quic::socket::bind(cfg.quic.listen, cfg.quic.socket_receive_buffer_bytes)
            .with_context(|| format!("binding QUIC {}", cfg.quic.listen))?;
        report_receive_buffer(&cfg.quic, &bound);
        let drops_inode = bound.inode;
        let runtime = quinn::default_runtime().context("no async runtime for QUIC")?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server_config),
            bound.socket,
            runtime,
        )
        .with_context(|| format!("starting QUIC on {}", cfg.quic.listen))?;
        let quic_addr = endpoint.local_addr()?;
        if let Some(inode) = drops_inode {
            tokio::spawn(export_receive_drops(inode, stop.clone()));
        }
        // One detector for vehicles and ED clients.
        let watch = detect::Watch::new(cfg.detect.thresholds(), audit.clone());
        // On a JetStream log, each vehicle's commands go to the node that owns it.
        let (cluster, writer_tx) = match cfg.store.backend {
            config::StoreBackend::Embedded => (None, writer_tx),
            config::StoreBackend::Jetstream => {
                let options = cfg.jetstream.options(&cfg.store);
                let (node, router) = cluster::Cluster::start(
                    &options,
                    writer_tx,
                    cfg.store.writer_queue,
                    stop.clone(),
                )
                .await
                .context("joining the ingest cluster")?;
                (Some(node), router)
            }
        };
        let ctx = quic::QuicContext {
            reading: Arc::new(tokio::sync::Semaphore::new(cfg.quic.max_reading_bytes)),
            cfg: cfg.quic.clone(),
            writer: writer_tx,
            online: online.clone(),
            audit: audit.clone(),
            watch: watch.clone(),
            early: early.clone(),
        };
        let quic = tokio::spawn(quic::serve(endpoint.clone(), ctx, stop.clone()));

        let listener = tokio::net::TcpListener::bind(cfg.grpc.listen)
            .await
            .with_context(|| format!("binding gRPC {}", cfg.grpc.listen))?;
        let grpc_addr = listener.local_addr()?;
        let access = access::AccessControl::new(load_policy(&cfg.grpc)?);
        let settings = grpc::GrpcSettings {
            subscriber_queue: cfg.grpc.subscriber_queue,
            slow_subscriber_timeout: cfg.grpc.slow_subscriber_timeout,
            access: access.clone(),
            limits: grpc::limits::ClientLimits::new(
                cfg.grpc.max_calls_per_minute,
                cfg.grpc.max_subscriptions_per_client,
            ),
            audit: audit.clone(),
            watch,
        };
        let svc = grpc::TelemetryService::new(
            store,
            bus,
            early,
            online.clone(),
            settings,
            cfg.grpc.max_subscribers,
            stop.clone(),
        );
        let (health, health_svc) = tonic_health::server::health_reporter();
        health
            .set_serving::<TelemetryServer<grpc::TelemetryService>>()
            .await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(relay_proto::FILE_DESCRIPTOR_SET)
            .build_v1()
            .context("building reflection service")?;
        let grpc_tls = grpc::listener::GrpcTls::new(
            tls::grpc_server_config(&cfg.tls).context("building gRPC TLS configuration")?,
        );
        let incoming = grpc::listener::incoming(
            listener,
            grpc_tls.clone(),
            audit.clone(),
            grpc::listener::AcceptLimits {
                handshake_timeout: cfg.grpc.tls_handshake_timeout,
                max_pending: cfg.grpc.max_pending_handshakes,
            },
            stop.clone(),
        );
        let router = tonic::transport::Server::builder()
            .add_service(health_svc)
            .add_optional_service(cfg.grpc.reflection.then_some(reflection))
            .add_service(TelemetryServer::new(svc));
        let grpc_stop = stop.clone();
        let grpc = tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(incoming, grpc_stop.cancelled_owned())
                .await
        });
        let metrics_addr = match cfg.metrics.listen {
            Some(addr) => {
                Some(relay_ops::serve_metrics(addr, stop.clone().cancelled_owned()).await?)
            }
            None => None,
        };
        let reloader = TlsReloader {
            endpoint,
            online,
            grpc: grpc_tls,
            access,
            audit,
            tls: cfg.tls.clone(),
            quic_cfg: cfg.clone(),
        };
        if !cfg.tls.watch_interval.is_zero() {
            tokio::spawn(watch_tls_files(
                reloader.clone(),
                cfg.tls.watch_interval,
                stop.clone(),
            ));
        }
        let store_at = match cfg.store.backend {
            config::StoreBackend::Embedded => cfg.store.path.display().to_string(),
            config::StoreBackend::Jetstream => {
                format!(
                    "{} on {}",
                    cfg.jetstream.stream,
                    cfg.jetstream.servers.join(",")
                )
            }
        };
        tracing::info!(%quic_addr, %grpc_addr, ?metrics_addr, store = %store_at, "ingest running");
        Ok(Self {
            quic_addr,
            grpc_addr,
            metrics_addr,
            stop,
            quic,
            grpc,
            writer,
            cluster,
            reloader,
        })
    }

    /// Reads the certificate, key, both CAs and both CRLs again (SIGHUP, or a change the file
    /// watcher noticed): new QUIC and gRPC handshakes use them at once, and the live sessions
    /// of vehicles and the open gRPC connections of ED clients that a list now revokes are
    /// closed. Returns how many of each were closed.
    pub fn reload(&self) -> anyhow::Result<Reloaded> {
        self.reloader.reload()
    }

    /// Stops accepting, closes connections, lets the writer finish its last batch.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.stop.cancel();
        let _ = self.quic.await;
        if let Some(cluster) = self.cluster {
            // Other nodes take this node's vehicles at once; the router lets the writer go.
            cluster.leave().await;
        }
        match tokio::time::timeout(Duration::from_secs(5), self.grpc).await {
            Ok(Ok(r)) => r.context("gRPC server")?,
            Ok(Err(e)) => return Err(e).context("gRPC task"),
            Err(_) => tracing::warn!("gRPC server did not stop within 5 s"),
        }
        let writer = self.writer;
        tokio::task::spawn_blocking(move || writer.join())
            .await
            .ok();
        Ok(())
    }
}

/// What a reload closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reloaded {
    /// Live vehicle sessions whose certificate the fleet CRL now revokes.
    pub vehicles: usize,
    /// Open gRPC connections whose certificate the subscriber CRL now revokes.
    pub subscribers: usize,
}

/// Everything a TLS reload replaces or closes: both listeners and their live connections.
#[derive(Debug, Clone)]
struct TlsReloader {
    endpoint: quinn::Endpoint,
    online: Arc<quic::Online>,
    grpc: Arc<grpc::listener::GrpcTls>,
    access: Arc<access::AccessControl>,
    audit: audit::AuditLog,
    tls: config::Tls,
    quic_cfg: IngestConfig,
}

impl TlsReloader {
    /// See [`Ingest::reload`]. Builds everything before replacing anything, so a file that
    /// does not load leaves both listeners as they were; either way the audit log says so.
    fn reload(&self) -> anyhow::Result<Reloaded> {
        let result = self.try_reload();
        if let Err(e) = &result {
            let mut event = audit::AuditEvent::new("tls_reload", audit::Outcome::Failure);
            event.detail = serde_json::json!({ "error": format!("{e:#}") });
            self.audit.record(event);
        }
        result
    }

    fn try_reload(&self) -> anyhow::Result<Reloaded> {
        let quic =
            tls::quic_server_config(&self.quic_cfg).context("rebuilding QUIC TLS configuration")?;
        let grpc =
            tls::grpc_server_config(&self.tls).context("rebuilding gRPC TLS configuration")?;
        let serials = |crl: &Option<std::path::PathBuf>, what: &str| match crl {
            Some(path) => {
                tls::revoked_serials(path).with_context(|| format!("reading the {what} CRL"))
            }
            None => Ok(Vec::new()),
        };
        let revoked_vehicles = serials(&self.tls.fleet_crl, "fleet")?;
        let revoked_subscribers = serials(&self.tls.subscriber_crl, "subscriber")?;
        let policy = load_policy(&self.quic_cfg.grpc)?;
        self.endpoint.set_server_config(Some(quic));
        self.grpc.set_config(grpc);
        self.access.set(policy);
        let closed = Reloaded {
            vehicles: self.online.close_revoked(&revoked_vehicles),
            subscribers: self.grpc.close_revoked(&revoked_subscribers),
        };
        let mut event = audit::AuditEvent::new("tls_reload", audit::Outcome::Success);
        event.detail = serde_json::json!({
            "revoked_vehicles": revoked_vehicles.len(),
            "revoked_subscribers": revoked_subscribers.len(),
            "closed_vehicle_sessions": closed.vehicles,
            "closed_subscriber_connections": closed.subscribers,
        });
        self.audit.record(event);
        let total = closed.vehicles + closed.subscribers;
        if total > 0 {
            ::metrics::counter!("relay_ingest_security_events_total", "reason" => "revoked")
                .increment(total as u64);
        }
        tracing::info!(
            revoked_vehicles = revoked_vehicles.len(),
            revoked_subscribers = revoked_subscribers.len(),
            closed_vehicles = closed.vehicles,
            closed_subscribers = closed.subscribers,
            "TLS configuration reloaded"
        );
        Ok(closed)
    }
}

/// Logs and exports the QUIC socket's receive buffer; warns when the kernel granted less
/// than asked (Linux caps the request at `net.core.rmem_max`, then books and reports twice
/// what it granted).
fn report_receive_buffer(q: &config::Quic, bound: &quic::socket::BoundSocket) {
    let (asked, granted) = (q.socket_receive_buffer_bytes, bound.receive_buffer_bytes);
    ::metrics::gauge!("relay_ingest_quic_socket_receive_buffer_bytes").set(granted as f64);
    let effective = if cfg!(target_os = "linux") {
        granted / 2
    } else {
        granted
    };
    if effective < asked {
        tracing::warn!(
            asked,
            granted,
            "the kernel granted the QUIC socket a smaller receive buffer than configured; \
             raise net.core.rmem_max (deploy/sysctl/90-hospital-ingest.conf)"
        );
    } else {
        tracing::info!(asked, granted, "QUIC socket receive buffer");
    }
}

/// How often the kernel's drop count of the QUIC socket is read.
const RECEIVE_DROPS_INTERVAL: Duration = Duration::from_secs(5);

/// Exports the datagrams the kernel dropped at the QUIC socket (a full receive buffer: the
/// ingest fell behind its packets), until `stop`.
async fn export_receive_drops(inode: u64, stop: CancellationToken) {
    let proc_net = std::path::Path::new("/proc/net");
    let mut tick = tokio::time::interval(RECEIVE_DROPS_INTERVAL);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Blocking reads of a small procfs table: well under a millisecond.
        if let Some(drops) = quic::socket::receive_drops(proc_net, inode) {
            ::metrics::counter!("relay_ingest_quic_socket_receive_drops_total").absolute(drops);
        }
    }
}

/// The access policy `grpc.access_policy` names, if any.
fn load_policy(g: &config::Grpc) -> anyhow::Result<Option<access::AccessPolicy>> {
    let Some(path) = &g.access_policy else {
        tracing::warn!("no grpc.access_policy: no client may read patient data");
        return Ok(None);
    };
    Ok(Some(access::AccessPolicy::load(path)?))
}

/// Size and modification time of each TLS and policy file (None: missing), to notice a
/// change.
fn tls_files_state(cfg: &IngestConfig) -> Vec<Option<(std::time::SystemTime, u64)>> {
    let t = &cfg.tls;
    [&t.cert, &t.key, &t.fleet_ca, &t.subscriber_ca]
        .into_iter()
        .chain(t.fleet_crl.as_ref())
        .chain(t.subscriber_crl.as_ref())
        .chain(cfg.grpc.access_policy.as_ref())
        .map(|path| {
            let meta = std::fs::metadata(path).ok()?;
            Some((meta.modified().ok()?, meta.len()))
        })
        .collect()
}

/// Reloads the TLS files when they change, as SIGHUP does, so a revocation list copied into
/// place cuts a stolen router off without anyone signalling the service. A change that does
/// not load (a key replaced before its certificate) keeps the running configuration and is
/// tried again at the next change.
async fn watch_tls_files(reloader: TlsReloader, interval: Duration, stop: CancellationToken) {
    let mut loaded = tls_files_state(&reloader.quic_cfg);
    let mut failed = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let now = tls_files_state(&reloader.quic_cfg);
        if now == loaded || failed.as_ref() == Some(&now) {
            continue;
        }
        match reloader.reload() {
            Ok(_) => {
                loaded = now;
                failed = None;
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "TLS files changed but do not load; the running configuration stays");
                failed = Some(now);
            }
        }
    }
}
