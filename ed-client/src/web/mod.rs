//! `ed-web`: the clinicians' browser view, as a client of the public gRPC API. It subscribes to
//! the ingest with its own certificate and serves an HTTPS application: a board of vehicles
//! and a live vehicle view (calibrated sweeping waveforms, vitals, position, clinical events),
//! pushed to the browser as server-sent events whose ids are gRPC cursors, so a reconnecting
//! browser resumes without loss. Users log in with argon2-hashed passwords; each sees only the
//! vehicles their scope allows; every login, page view and stream is audited.

pub mod auth;
pub mod board;
pub mod config;
pub mod feed;
pub mod listener;
pub mod metrics;
pub mod webhook;

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Form, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use relay_proto::model::telemetry_client::TelemetryClient;
use relay_proto::model::{
    AcknowledgeRequest, ListVehiclesRequest, StreamKind, StreamRef, SubscribeRequest,
    subscribe_request::Start,
};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use self::auth::{Auth, LoginRefused, SESSION_COOKIE, Session};
use self::board::Board;
pub use self::config::WebConfig;
use crate::client::{ClientError, ClientTls};

/// Why ed-web could not start.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    /// The users file is unusable.
    #[error(transparent)]
    Users(#[from] auth::UsersError),
    /// A certificate or key could not be read.
    #[error(transparent)]
    Pem(#[from] relay_ops::pem::PemError),
    /// The server TLS configuration was refused.
    #[error("HTTPS TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The listen address or the audit file could not be opened.
    #[error("{what}: {source}")]
    Io {
        /// What was being opened.
        what: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The ingest's address or client certificate is unusable.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The webhook's outbox, URL or CA is unusable.
    #[error(transparent)]
    Webhook(#[from] webhook::WebhookError),
    /// The metrics endpoint could not start.
    #[error("metrics endpoint: {0}")]
    Metrics(#[from] relay_ops::OpsError),
}

/// Capture time a vehicle view starts with when the browser names none: the trace fills at
/// once with the latest seconds instead of sweeping in from empty.
const DEFAULT_BACKFILL: Duration = Duration::from_secs(12);
/// How often the board is pushed to each browser.
const BOARD_PUSH: Duration = Duration::from_secs(1);
/// The longest time range one FHIR export or history request covers.
const MAX_RANGE: Duration = Duration::from_secs(3600);
/// Records one FHIR export reads at most (an hour of a 12-lead 500 Hz stream in 40 ms frames
/// is 90,000); beyond, the export is refused rather than held in memory.
const MAX_EXPORT_RECORDS: usize = 400_000;
/// A FHIR export must be read from the ingest within this.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(120);
/// Records one history request returns at most (the ingest bounds it too).
const MAX_HISTORY_RECORDS: u32 = 1000;

/// One JSON line per login, page view and data stream (and a log line each).
#[derive(Debug)]
struct WebAudit {
    file: Option<Mutex<std::fs::File>>,
}

impl WebAudit {
    fn record(
        &self,
        user: &str,
        action: &str,
        vehicle: Option<&str>,
        outcome: &str,
        peer: SocketAddr,
    ) {
        tracing::info!(target: "ed_web::audit", user, action, vehicle, outcome, %peer, "access");
        let Some(file) = &self.file else { return };
        let line = json!({
            "time": relay_ops::now_utc_ns(),
            "user": user,
            "action": action,
            "vehicle": vehicle,
            "outcome": outcome,
            "peer": peer.to_string(),
        });
        let mut f = file.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = writeln!(f, "{line}") {
            tracing::error!(error = %e, "writing the ed-web audit file");
        }
    }
}

struct AppState {
    cfg: WebConfig,
    auth: Arc<Auth>,
    client: TelemetryClient<Channel>,
    board: Arc<Mutex<Board>>,
    streams: Arc<Semaphore>,
    per_user: Mutex<HashMap<String, usize>>,
    audit: WebAudit,
}

type Shared = Arc<AppState>;

/// The browser's address, for the audit.
#[derive(Debug, Clone, Copy)]
struct Peer(SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, listener::TlsListener>>
    for Peer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, listener::TlsListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}

/// A running ed-web.
#[derive(Debug)]
pub struct EdWeb {
    /// Where browsers connect.
    pub addr: SocketAddr,
    /// The Prometheus endpoint, when `metrics.listen` asked for one.
    pub metrics_addr: Option<SocketAddr>,
    server: tokio::task::JoinHandle<()>,
    board: tokio::task::JoinHandle<()>,
}

impl EdWeb {
    /// Reads users and certificates, binds the HTTPS address and starts following the ingest
    /// (a missing ingest is retried; the board shows it as disconnected).
    pub async fn start(cfg: WebConfig) -> Result<Self, WebError> {
        relay_ops::install_crypto_provider();
        // A key made on a developer's machine is never trusted or shown in production.
        let mut pem_files = vec![
            cfg.http.cert.as_path(),
            cfg.ingest.ca.as_path(),
            cfg.ingest.cert.as_path(),
        ];
        if cfg.webhook.url.is_some() {
            pem_files.push(cfg.webhook.ca.as_path());
        }
        relay_ops::pem::refuse_development(&pem_files, cfg.allow_dev_pki)?;
        let metrics_addr = match cfg.metrics.listen {
            Some(listen) => {
                let addr = relay_ops::serve_metrics(listen, std::future::pending()).await?;
                metrics::describe();
                Some(addr)
            }
            None => None,
        };
        let users = auth::read_users(&cfg.auth.users_file)?;
        let auth = Auth::new(users, &cfg.auth)?;
        let certs = relay_ops::pem::load_certs(&cfg.http.cert)?;
        let key = relay_ops::pem::load_key(&cfg.http.key)?;
        let mut tls = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let file = match &cfg.audit.path {
            Some(p) => {
                let io = |source| WebError::Io {
                    what: format!("opening audit file {}", p.display()),
                    source,
                };
                // Who looked at which patient: readable by ed-web's user only.
                relay_ops::private::prepare_file(p).map_err(io)?;
                let f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(p)
                    .map_err(io)?;
                Some(Mutex::new(f))
            }
            None => None,
        };
        let link = &cfg.ingest;
        let client_tls = ClientTls {
            ca: link.ca.clone(),
            cert: link.cert.clone(),
            key: link.key.clone(),
            domain: link.server_name.clone(),
        };
        let client = crate::client::connect_lazy(&link.url, &client_tls)?;
        let tcp = tokio::net::TcpListener::bind(cfg.http.listen)
            .await
            .map_err(|source| WebError::Io {
                what: format!("binding {}", cfg.http.listen),
                source,
            })?;
        let listener = listener::TlsListener::new(
            tcp,
            Arc::new(tls),
            cfg.http.max_pending_handshakes,
            cfg.http.handshake_timeout,
        )
        .map_err(|source| WebError::Io {
            what: "HTTPS listener".into(),
            source,
        })?;
        let addr = axum::serve::Listener::local_addr(&listener).map_err(|source| WebError::Io {
            what: "HTTPS listener".into(),
            source,
        })?;
        let webhook = webhook::Webhook::start(&cfg.webhook)?;
        // With a webhook, the board resumes after the last alert it wrote to the outbox, so
        // no alert raised while ed-web was down is missed.
        let mut first = Board::default();
        first.cursor = webhook.as_ref().and_then(webhook::Webhook::resume_cursor);
        let board = Arc::new(Mutex::new(first));
        let state = Arc::new(AppState {
            streams: Arc::new(Semaphore::new(cfg.http.max_streams)),
            per_user: Mutex::new(HashMap::new()),
            audit: WebAudit { file },
            client: client.clone(),
            board: board.clone(),
            auth,
            cfg: cfg.clone(),
        });
        let board_task = tokio::spawn(follow_board(client, board, cfg.ingest.refresh, webhook));
        let app = router(state);
        let server = tokio::spawn(async move {
            let svc = app.into_make_service_with_connect_info::<Peer>();
            if let Err(e) = axum::serve(listener, svc).await {
                tracing::error!(error = %e, "HTTPS server ended");
            }
        });
        tracing::info!(%addr, "ed-web listening (HTTPS)");
        Ok(Self {
            addr,
            metrics_addr,
            server,
            board: board_task,
        })
    }

    /// Stops serving (open streams end; browsers reconnect elsewhere or later).
    pub fn shutdown(self) {
        self.server.abort();
        self.board.abort();
    }
}

/// The `ed-web` command line: `ed-web hash-password` (password on stdin, argon2 hash on
/// stdout), or the service until SIGTERM / ctrl-c.
pub async fn run_cli(args: Vec<std::ffi::OsString>) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::BufRead;
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
    let cfg: WebConfig = relay_ops::config::load_or_exit(args)?;
    let web = EdWeb::start(cfg).await.context("starting ed-web")?;
    println!("ed-web: https://{}/", web.addr);
    relay_ops::shutdown_signal().await;
    web.shutdown();
    Ok(())
}

fn router(state: Shared) -> Router {
    Router::new()
        .route("/", get(board_page))
        .route("/vehicle", get(vehicle_page))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/assets/{name}", get(asset))
        .route("/api/me", get(me))
        .route("/api/board", get(board_json))
        .route("/api/board/events", get(board_events))
        .route("/api/vehicles/{id}/events", get(vehicle_events))
        .route("/api/vehicles/{id}/ack", post(acknowledge))
        .route("/api/vehicles/{id}/history", get(history))
        .route("/api/vehicles/{id}/fhir", get(fhir_export))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            security_headers,
        ))
        .with_state(state)
}

/// The page assets, embedded: hospital networks are often closed, so nothing comes from a CDN.
fn asset_body(name: &str) -> Option<(&'static str, &'static str)> {
    Some(match name {
        "style.css" => ("text/css; charset=utf-8", include_str!("assets/style.css")),
        "common.js" => (
            "text/javascript; charset=utf-8",
            include_str!("assets/common.js"),
        ),
        "board.js" => (
            "text/javascript; charset=utf-8",
            include_str!("assets/board.js"),
        ),
        "vehicle.js" => (
            "text/javascript; charset=utf-8",
            include_str!("assets/vehicle.js"),
        ),
        "login.js" => (
            "text/javascript; charset=utf-8",
            include_str!("assets/login.js"),
        ),
        _ => return None,
    })
}

async fn security_headers(State(state): State<Shared>, req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let tiles = state
        .cfg
        .display
        .tile_url
        .split('/')
        .take(3)
        .collect::<Vec<_>>()
        .join("/");
    let csp = format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: {tiles}; \
         connect-src 'self'; media-src 'self' data:; form-action 'self'; frame-ancestors 'none'; \
         base-uri 'none'"
    );
    let h = res.headers_mut();
    if let Ok(v) = HeaderValue::from_str(csp.trim()) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=31536000; includeSubDomains"),
    );
    // Patient data must not linger in caches of shared ED workstations.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    res
}

fn cookie_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == SESSION_COOKIE)
        .map(|(_, v)| v)
}

fn session(state: &AppState, headers: &HeaderMap) -> Option<Session> {
    cookie_token(headers).and_then(|t| state.auth.session(t))
}

/// The session of an API request about `vehicle`, or its refusal: 401 without a session,
/// 403 (audited as `action` denied) outside the user's scope.
fn api_access(
    state: &AppState,
    headers: &HeaderMap,
    vehicle: &str,
    action: &str,
    peer: SocketAddr,
) -> Result<Session, Box<Response>> {
    let Some(s) = session(state, headers) else {
        return Err(Box::new(unauthorized()));
    };
    if !s.scope.allows(vehicle) {
        state
            .audit
            .record(&s.user, action, Some(vehicle), "denied", peer);
        return Err(Box::new(out_of_scope()));
    }
    Ok(s)
}

fn html(body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response()
}

fn unauthorized() -> Response {
    (StatusCode::UNAUTHORIZED, "log in first\n").into_response()
}

fn out_of_scope() -> Response {
    (
        StatusCode::FORBIDDEN,
        "this vehicle is outside your scope\n",
    )
        .into_response()
}

async fn login_page() -> Response {
    html(include_str!("assets/login.html"))
}

async fn board_page(
    State(state): State<Shared>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    headers: HeaderMap,
) -> Response {
    let Some(s) = session(&state, &headers) else {
        return Redirect::to("/login").into_response();
    };
    state.audit.record(&s.user, "view_board", None, "ok", peer);
    html(include_str!("assets/board.html"))
}

#[derive(Debug, Deserialize)]
struct VehicleQuery {
    id: String,
}

async fn vehicle_page(
    State(state): State<Shared>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    headers: HeaderMap,
    Query(q): Query<VehicleQuery>,
) -> Response {
    let Some(s) = session(&state, &headers) else {
        return Redirect::to("/login").into_response();
    };
    if !s.scope.allows(&q.id) {
        state
            .audit
            .record(&s.user, "view_vehicle", Some(&q.id), "denied", peer);
        return out_of_scope();
    }
    state
        .audit
        .record(&s.user, "view_vehicle", Some(&q.id), "ok", peer);
    html(include_str!("assets/vehicle.html"))
}

async fn asset(Path(name): Path<String>) -> Response {
    match asset_body(&name) {
        Some((ty, body)) => ([(header::CONTENT_TYPE, ty)], body).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

#[derive(Deserialize)]
struct LoginForm {
    user: String,
    password: String,
}

async fn login(
    State(state): State<Shared>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    Form(form): Form<LoginForm>,
) -> Response {
    if form.user.len() > 64 || form.password.len() > 1024 {
        return (StatusCode::BAD_REQUEST, "user or password too long\n").into_response();
    }
    match state.auth.login(&form.user, &form.password).await {
        Ok(token) => {
            ::metrics::counter!("relay_edweb_logins_total", "outcome" => "ok").increment(1);
            state.audit.record(&form.user, "login", None, "ok", peer);
            let cookie = format!(
                "{SESSION_COOKIE}={token}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={}",
                state.auth.ttl().as_secs()
            );
            ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
        }
        Err(LoginRefused::BadCredentials) => {
            ::metrics::counter!("relay_edweb_logins_total", "outcome" => "bad_credentials")
                .increment(1);
            state
                .audit
                .record(&form.user, "login", None, "bad_credentials", peer);
            Redirect::to("/login?failed=1").into_response()
        }
        Err(LoginRefused::LockedOut(_)) => {
            ::metrics::counter!("relay_edweb_logins_total", "outcome" => "locked_out").increment(1);
            state
                .audit
                .record(&form.user, "login", None, "locked_out", peer);
            Redirect::to("/login?locked=1").into_response()
        }
    }
}

async fn logout(
    State(state): State<Shared>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    headers: HeaderMap,
) -> Response {
    if let Some(s) = cookie_token(&headers).and_then(|t| state.auth.logout(t)) {
        state.audit.record(&s.user, "logout", None, "ok", peer);
    }
    let clear = format!("{SESSION_COOKIE}=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0");
    ([(header::SET_COOKIE, clear)], Redirect::to("/login")).into_response()
}

async fn me(State(state): State<Shared>, headers: HeaderMap) -> Response {
    let Some(s) = session(&state, &headers) else {
        return unauthorized();
    };
    let d = &state.cfg.display;
    axum::Json(json!({
        "user": s.user,
        "pixels_per_mm": d.pixels_per_mm,
        "tile_url": d.tile_url,
    }))
    .into_response()
}

async fn board_json(State(state): State<Shared>, headers: HeaderMap) -> Response {
    let Some(s) = session(&state, &headers) else {
        return unauthorized();
    };
    let snap = board_snapshot(&state, &s);
    axum::Json(snap).into_response()
}

fn board_snapshot(state: &AppState, s: &Session) -> serde_json::Value {
    let now_ms = feed::ms(relay_ops::now_utc_ns());
    state
        .board
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .snapshot(&s.scope, now_ms)
}

/// A live stream's place in the bounds: one of `max_streams`, one of the user's.
struct StreamSlot {
    state: Shared,
    user: String,
    _permit: OwnedSemaphorePermit,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        ::metrics::gauge!("relay_edweb_streams_open").decrement(1.0);
        let mut per_user = self
            .state
            .per_user
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = per_user.get_mut(&self.user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                per_user.remove(&self.user);
            }
        }
    }
}

fn take_slot(state: &Shared, user: &str) -> Option<StreamSlot> {
    let permit = state.streams.clone().try_acquire_owned().ok()?;
    let mut per_user = state
        .per_user
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let n = per_user.entry(user.to_owned()).or_insert(0);
    if *n >= state.cfg.http.max_streams_per_user {
        return None;
    }
    *n += 1;
    ::metrics::gauge!("relay_edweb_streams_open").increment(1.0);
    Some(StreamSlot {
        state: state.clone(),
        user: user.to_owned(),
        _permit: permit,
    })
}

fn too_many_streams() -> Response {
    ::metrics::counter!("relay_edweb_streams_refused_total").increment(1);
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::RETRY_AFTER, "5")],
        "too many live views open; close one\n",
    )
        .into_response()
}

async fn board_events(
    State(state): State<Shared>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    headers: HeaderMap,
) -> Response {
    let Some(s) = session(&state, &headers) else {
        return unauthorized();
    };
    let Some(slot) = take_slot(&state, &s.user) else {
        return too_many_streams();
    };
    state
        .audit
        .record(&s.user, "stream_board", None, "ok", peer);
    let (tx, rx) = mpsc::channel::<Event>(2);
    tokio::spawn(async move {
        let _slot = slot;
        let mut tick = tokio::time::interval(BOARD_PUSH);
        loop {
            tick.tick().await;
            // A session ended (logout, expiry) ends its streams too.
            if cookie_token(&headers)
                .and_then(|t| state.auth.session(t))
                .is_none()
            {
                return;
            }
            let snap = board_snapshot(&state, &s);
            if tx
                .send(Event::default().event("board").data(snap.to_string()))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    sse(rx)
}

fn sse(rx: mpsc::Receiver<Event>) -> Response {
    let stream = ReceiverStream::new(rx).map(Ok::<_, Infallible>);
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

#[derive(Debug, Deserialize)]
struct StreamQuery {
    /// Rewind: capture time to start at, milliseconds since the epoch.
    from: Option<f64>,
    /// Continue after this cursor (a page reopening its stream after an error; a browser's
    /// own reconnect sends Last-Event-ID instead).
    after: Option<u64>,
}

async fn vehicle_events(
    State(state): State<Shared>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    Path(id): Path<String>,
    Query(q): Query<StreamQuery>,
    headers: HeaderMap,
) -> Response {
    let s = match api_access(&state, &headers, &id, "stream_vehicle", peer) {
        Ok(s) => s,
        Err(refused) => return *refused,
    };
    let now_ns = relay_ops::now_utc_ns();
    let last_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let start = match (last_id.or(q.after), q.from) {
        // A reconnecting browser continues right after what it has.
        (Some(cursor), _) => Start::AfterCursor(cursor),
        (None, Some(from_ms)) if from_ms.is_finite() => {
            let earliest = now_ns.saturating_sub(state.cfg.display.rewind_limit.as_nanos() as i64);
            Start::FromCaptureTimeNs(((from_ms * 1e6) as i64).clamp(earliest, now_ns))
        }
        _ => Start::FromCaptureTimeNs(now_ns.saturating_sub(DEFAULT_BACKFILL.as_nanos() as i64)),
    };
    let Some(slot) = take_slot(&state, &s.user) else {
        return too_many_streams();
    };
    let req = SubscribeRequest {
        vehicle_ids: vec![id.clone()],
        kinds: vec![],
        start: Some(start),
        ..Default::default()
    };
    let mut upstream = match state.client.clone().subscribe(req).await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            state
                .audit
                .record(&s.user, "stream_vehicle", Some(&id), "ingest_refused", peer);
            tracing::warn!(vehicle = id, %status, "the ingest refused a vehicle stream");
            return (StatusCode::BAD_GATEWAY, "the ingest is not reachable\n").into_response();
        }
    };
    state
        .audit
        .record(&s.user, "stream_vehicle", Some(&id), "ok", peer);
    let (tx, rx) = mpsc::channel::<Event>(state.cfg.http.stream_queue);
    let slow = state.cfg.http.slow_browser_timeout;
    tokio::spawn(async move {
        let _slot = slot;
        loop {
            let msg = match upstream.message().await {
                Ok(Some(m)) => m,
                Ok(None) => return,
                Err(status) => {
                    tracing::info!(vehicle = id, %status, "vehicle stream from the ingest ended");
                    return;
                }
            };
            let Some(body) = feed::to_event_data(&msg) else {
                continue;
            };
            let ev = Event::default().id(msg.cursor.to_string()).data(body);
            // A browser this far behind is dropped; it reconnects with its last id.
            match tokio::time::timeout(slow, tx.send(ev)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return,
                Err(_) => {
                    ::metrics::counter!("relay_edweb_browsers_dropped_total").increment(1);
                    tracing::info!(vehicle = id, "a browser fell behind; disconnected");
                    return;
                }
            }
        }
    });
    let stream = ReceiverStream::new(rx).map(Ok::<_, Infallible>);
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

#[derive(Debug, Deserialize)]
struct AckBody {
    key: String,
    seq: u64,
}

async fn acknowledge(
    State(state): State<Shared>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    Path(id): Path<String>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<AckBody>,
) -> Response {
    let s = match api_access(&state, &headers, &id, "acknowledge", peer) {
        Ok(s) => s,
        Err(refused) => return *refused,
    };
    let Some((session_id, stream_id)) = parse_key(&body.key) else {
        return (StatusCode::BAD_REQUEST, "key must be session:stream\n").into_response();
    };
    let req = AcknowledgeRequest {
        stream: Some(StreamRef {
            vehicle_id: id.clone(),
            session_id,
            stream_id,
            kind: StreamKind::Events as i32,
        }),
        seq: body.seq,
        note: format!("acknowledged by {} (ed-web)", s.user),
    };
    match state.client.clone().acknowledge(req).await {
        Ok(r) => {
            state
                .audit
                .record(&s.user, "acknowledge", Some(&id), "ok", peer);
            state
                .board
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .acknowledged(
                    &id,
                    &body.key,
                    body.seq,
                    &s.user,
                    feed::ms(relay_ops::now_utc_ns()),
                );
            let r = r.into_inner();
            axum::Json(json!({"delivered": r.delivered, "held": r.held})).into_response()
        }
        Err(status) => {
            state
                .audit
                .record(&s.user, "acknowledge", Some(&id), "ingest_refused", peer);
            (StatusCode::BAD_GATEWAY, format!("{}\n", status.message())).into_response()
        }
    }
}

#[derive(Debug, Deserialize)]
struct RangeQuery {
    /// Start, capture time in milliseconds since the epoch.
    from: f64,
    /// End (inclusive); now when absent.
    to: Option<f64>,
    /// For history: the stream, `session:stream`.
    key: Option<String>,
    /// For FHIR: the incident (EMS case number), which adds an Encounter.
    incident: Option<String>,
}

impl RangeQuery {
    /// The range in UTC ns, checked: finite, ordered, at most MAX_RANGE.
    fn range(&self) -> Result<(i64, i64), Box<Response>> {
        let to = self.to.unwrap_or(feed::ms(relay_ops::now_utc_ns()));
        let ok = self.from.is_finite()
            && to.is_finite()
            && self.from <= to
            && to - self.from <= MAX_RANGE.as_millis() as f64;
        if !ok {
            return Err(Box::new(
                (
                    StatusCode::BAD_REQUEST,
                    "from and to must be times in ms, from <= to, at most an hour apart\n",
                )
                    .into_response(),
            ));
        }
        Ok(((self.from * 1e6) as i64, (to * 1e6) as i64))
    }
}

fn parse_key(key: &str) -> Option<(u64, u32)> {
    let (a, b) = key.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// A time range of one stream (the 10 s of ECG before an alarm), from the ingest's History.
async fn history(
    State(state): State<Shared>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    Path(id): Path<String>,
    Query(q): Query<RangeQuery>,
    headers: HeaderMap,
) -> Response {
    let s = match api_access(&state, &headers, &id, "history", peer) {
        Ok(s) => s,
        Err(refused) => return *refused,
    };
    let (from, to) = match q.range() {
        Ok(r) => r,
        Err(e) => return *e,
    };
    let Some((session_id, stream_id)) = q.key.as_deref().and_then(parse_key) else {
        return (StatusCode::BAD_REQUEST, "key must be session:stream\n").into_response();
    };
    let req = relay_proto::model::HistoryRequest {
        stream: Some(StreamRef {
            vehicle_id: id.clone(),
            session_id,
            stream_id,
            kind: StreamKind::Waveform as i32,
        }),
        from_capture_time_ns: from,
        to_capture_time_ns: to,
        max_records: MAX_HISTORY_RECORDS,
    };
    let h = match state.client.clone().history(req).await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            state
                .audit
                .record(&s.user, "history", Some(&id), "ingest_refused", peer);
            return (StatusCode::BAD_GATEWAY, format!("{}\n", status.message())).into_response();
        }
    };
    state
        .audit
        .record(&s.user, "history", Some(&id), "ok", peer);
    let wrap = |record| relay_proto::model::SubscribeResponse {
        cursor: 0,
        record: Some(record),
        ..Default::default()
    };
    use relay_proto::model::subscribe_response::Record;
    axum::Json(json!({
        "stream": h.stream.map(|i| feed::to_json(&wrap(Record::Stream(i)))),
        "records": h.records.into_iter().filter_map(|d| feed::to_json(&wrap(Record::Data(d)))).collect::<Vec<_>>(),
        "missing": h.missing.into_iter().filter_map(|g| feed::to_json(&wrap(Record::Gap(g)))).collect::<Vec<_>>(),
        "truncated": h.truncated,
    }))
    .into_response()
}

/// What was received of a vehicle in a time range as a FHIR R4 Bundle (read-only).
async fn fhir_export(
    State(state): State<Shared>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    Path(id): Path<String>,
    Query(q): Query<RangeQuery>,
    headers: HeaderMap,
) -> Response {
    use relay_proto::model::subscribe_response::Record;
    let s = match api_access(&state, &headers, &id, "fhir_export", peer) {
        Ok(s) => s,
        Err(refused) => return *refused,
    };
    let (from, to) = match q.range() {
        Ok(r) => r,
        Err(e) => return *e,
    };
    let req = SubscribeRequest {
        vehicle_ids: vec![id.clone()],
        kinds: vec![],
        start: Some(Start::FromCaptureTimeNs(from)),
        ..Default::default()
    };
    let mut export = crate::fhir::FhirExport::new(&id)
        .with_incident(q.incident.clone())
        .until(Some(to));
    let read = async {
        let mut stream = state.client.clone().subscribe(req).await?.into_inner();
        let mut records = 0_usize;
        while let Some(m) = stream.message().await? {
            if matches!(m.record, Some(Record::Sync(_))) {
                return Ok(true);
            }
            records += 1;
            if records > MAX_EXPORT_RECORDS {
                return Ok(false);
            }
            export.handle(&m);
        }
        Ok::<bool, tonic::Status>(true)
    };
    match tokio::time::timeout(EXPORT_TIMEOUT, read).await {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => {
            state
                .audit
                .record(&s.user, "fhir_export", Some(&id), "too_large", peer);
            return (
                StatusCode::PAYLOAD_TOO_LARGE,
                "too much data: export a shorter range\n",
            )
                .into_response();
        }
        Ok(Err(status)) => {
            state
                .audit
                .record(&s.user, "fhir_export", Some(&id), "ingest_refused", peer);
            return (StatusCode::BAD_GATEWAY, format!("{}\n", status.message())).into_response();
        }
        Err(_) => {
            state
                .audit
                .record(&s.user, "fhir_export", Some(&id), "timeout", peer);
            return (StatusCode::GATEWAY_TIMEOUT, "the ingest took too long\n").into_response();
        }
    }
    state
        .audit
        .record(&s.user, "fhir_export", Some(&id), "ok", peer);
    (
        [(header::CONTENT_TYPE, "application/fhir+json")],
        export.bundle().to_string(),
    )
        .into_response()
}

/// Keeps the board current: the vehicle list every `refresh`, and a live subscription to
/// vitals, positions and events (resumed from its cursor after a reconnect).
async fn follow_board(
    client: TelemetryClient<Channel>,
    board: Arc<Mutex<Board>>,
    refresh: Duration,
    webhook: Option<webhook::Webhook>,
) {
    let list = {
        let mut client = client.clone();
        let board = board.clone();
        async move {
            let mut tick = tokio::time::interval(refresh);
            loop {
                tick.tick().await;
                let listed = client.list_vehicles(ListVehiclesRequest {}).await;
                ::metrics::gauge!("relay_edweb_ingest_connected")
                    .set(f64::from(u8::from(listed.is_ok())));
                match listed {
                    Ok(r) => board
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .set_vehicles(&r.into_inner().vehicles),
                    Err(status) => {
                        tracing::warn!(%status, "listing vehicles");
                        board
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .connected = false;
                    }
                }
            }
        }
    };
    let live = async move {
        let mut client = client;
        loop {
            let cursor = board.lock().unwrap_or_else(PoisonError::into_inner).cursor;
            let start = match cursor {
                Some(c) => Start::AfterCursor(c),
                // Start with the last quarter hour, so the board shows alerts already raised.
                None => Start::FromCaptureTimeNs(relay_ops::now_utc_ns() - 15 * 60 * 1_000_000_000),
            };
            let req = SubscribeRequest {
                vehicle_ids: vec![],
                kinds: vec![
                    StreamKind::Vitals as i32,
                    StreamKind::Location as i32,
                    StreamKind::Events as i32,
                ],
                start: Some(start),
                ..Default::default()
            };
            match client.subscribe(req).await {
                Ok(r) => {
                    let mut stream = r.into_inner();
                    while let Ok(Some(m)) = stream.message().await {
                        board
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .apply(&m);
                        if let Some(w) = &webhook
                            && let Some(alert) = webhook::alert_of(&m)
                            && w.pages(alert.body["code"].as_str().unwrap_or_default())
                        {
                            w.offer(alert).await;
                        }
                    }
                }
                Err(status) => tracing::warn!(%status, "subscribing for the board"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    tokio::join!(list, live);
}
