//! Paging the cath lab: a clinical event whose code is configured (STEMI by default) is
//! POSTed as JSON to an HTTPS webhook, exactly once per alert across restarts of ed-web and
//! of the ingest.
//!
//! How "exactly once" holds: an alert is written to a durable outbox (redb, fsynced) together
//! with the board subscription's cursor before anything is sent; an alert already in the
//! outbox is never queued again, whoever re-reads it after a restart. Each POST carries an
//! `Idempotency-Key` header (the alert's id: vehicle, session, stream, sequence number) and the
//! same `alert_id` in its body; only a 2xx answer marks it delivered. The one window left, a
//! crash after the receiver answered and before the mark was written, re-sends with the same
//! key, which the receiver uses to drop the repeat. Failures are retried with exponential
//! backoff, in the order the alerts were raised.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};

/// Alert id -> delivery time (UTC ns; 0 while pending).
const SEEN: TableDefinition<&str, i64> = TableDefinition::new("seen");
/// Queue position -> the alert's JSON body, in the order alerts were raised.
const QUEUE: TableDefinition<u64, &[u8]> = TableDefinition::new("queue");
/// "cursor" -> the board subscription's cursor after the last alert written.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Delivered alerts older than this are forgotten (the board never re-reads that far back).
const FORGET_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);
/// Alerts waiting between the board and the outbox writer.
const HANDOFF: usize = 256;

/// Why the webhook could not start or write.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The outbox could not be opened or written.
    #[error("webhook outbox {path}: {source}")]
    Outbox {
        /// The outbox file.
        path: PathBuf,
        /// redb's error.
        #[source]
        source: Box<redb::Error>,
    },
    /// The URL is not an https:// URL with a host.
    #[error("webhook url {0:?}: must be https://host[:port]/path")]
    Url(String),
    /// The receiver's CA could not be read.
    #[error(transparent)]
    Pem(#[from] relay_ops::pem::PemError),
    /// The receiver's CA is not a usable trust anchor.
    #[error("webhook CA: {0}")]
    Tls(#[from] rustls::Error),
}

fn outbox_err(path: &Path) -> impl Fn(redb::Error) -> WebhookError + '_ {
    move |e| WebhookError::Outbox {
        path: path.to_owned(),
        source: Box::new(e),
    }
}

/// One clinical event the board saw, as it is paged.
#[derive(Debug, Clone)]
pub struct Alert {
    /// `vehicle/session/stream/seq`: unique per event, stable across restarts.
    pub id: String,
    /// The JSON body.
    pub body: Value,
    /// The board subscription's cursor of this record.
    pub cursor: u64,
}

/// The durable outbox.
#[derive(Debug)]
struct Outbox {
    db: Database,
    path: PathBuf,
}

impl Outbox {
    fn open(path: &Path) -> Result<Self, WebhookError> {
        let e = outbox_err(path);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            relay_ops::private::create_dir(dir).map_err(|x| e(x.into()))?;
        }
        let db = Database::create(path).map_err(|x| e(x.into()))?;
        let w = db.begin_write().map_err(|x| e(x.into()))?;
        {
            let mut seen = w.open_table(SEEN).map_err(|x| e(x.into()))?;
            w.open_table(QUEUE).map_err(|x| e(x.into()))?;
            w.open_table(META).map_err(|x| e(x.into()))?;
            let horizon = relay_ops::now_utc_ns() - FORGET_AFTER.as_nanos() as i64;
            seen.retain(|_, delivered| delivered == 0 || delivered > horizon)
                .map_err(|x| e(x.into()))?;
        }
        w.commit().map_err(|x| e(x.into()))?;
        Ok(Self {
            db,
            path: path.to_owned(),
        })
    }

    fn cursor(&self) -> Result<Option<u64>, WebhookError> {
        let e = outbox_err(&self.path);
        let r = self.db.begin_read().map_err(|x| e(x.into()))?;
        let meta = r.open_table(META).map_err(|x| e(x.into()))?;
        Ok(meta
            .get("cursor")
            .map_err(|x| e(x.into()))?
            .map(|v| v.value()))
    }

    /// Queues `alert` unless it was seen before; records the cursor either way. True when
    /// queued.
    fn offer(&self, alert: &Alert) -> Result<bool, WebhookError> {
        let e = outbox_err(&self.path);
        let w = self.db.begin_write().map_err(|x| e(x.into()))?;
        let fresh = {
            let mut seen = w.open_table(SEEN).map_err(|x| e(x.into()))?;
            let fresh = seen
                .get(alert.id.as_str())
                .map_err(|x| e(x.into()))?
                .is_none();
            if fresh {
                seen.insert(alert.id.as_str(), 0).map_err(|x| e(x.into()))?;
                let mut queue = w.open_table(QUEUE).map_err(|x| e(x.into()))?;
                let next = queue
                    .last()
                    .map_err(|x| e(x.into()))?
                    .map_or(0, |(k, _)| k.value() + 1);
                let body = alert.body.to_string();
                queue
                    .insert(next, body.as_bytes())
                    .map_err(|x| e(x.into()))?;
            }
            let mut meta = w.open_table(META).map_err(|x| e(x.into()))?;
            meta.insert("cursor", alert.cursor)
                .map_err(|x| e(x.into()))?;
            fresh
        };
        w.commit().map_err(|x| e(x.into()))?;
        Ok(fresh)
    }

    /// The oldest alert not yet delivered.
    fn first(&self) -> Result<Option<(u64, Value)>, WebhookError> {
        let e = outbox_err(&self.path);
        let r = self.db.begin_read().map_err(|x| e(x.into()))?;
        let queue = r.open_table(QUEUE).map_err(|x| e(x.into()))?;
        let Some((k, v)) = queue.first().map_err(|x| e(x.into()))? else {
            return Ok(None);
        };
        // A body that does not parse cannot have been written by us; send it as a string.
        let body = serde_json::from_slice(v.value())
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(v.value()).into_owned()));
        Ok(Some((k.value(), body)))
    }

    /// Alerts not yet delivered.
    fn pending(&self) -> Result<u64, WebhookError> {
        let e = outbox_err(&self.path);
        let r = self.db.begin_read().map_err(|x| e(x.into()))?;
        let queue = r.open_table(QUEUE).map_err(|x| e(x.into()))?;
        queue.len().map_err(|x| e(x.into()))
    }

    fn delivered(&self, position: u64, id: &str) -> Result<(), WebhookError> {
        let e = outbox_err(&self.path);
        let w = self.db.begin_write().map_err(|x| e(x.into()))?;
        {
            let mut queue = w.open_table(QUEUE).map_err(|x| e(x.into()))?;
            queue.remove(position).map_err(|x| e(x.into()))?;
            let mut seen = w.open_table(SEEN).map_err(|x| e(x.into()))?;
            seen.insert(id, relay_ops::now_utc_ns().max(1))
                .map_err(|x| e(x.into()))?;
        }
        w.commit().map_err(|x| e(x.into()))?;
        Ok(())
    }
}

/// Where and how alerts are POSTed.
#[derive(Debug, Clone)]
struct Target {
    uri: hyper::Uri,
    host: String,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
}

impl Target {
    fn new(url: &str, ca: &Path, timeout: Duration) -> Result<Self, WebhookError> {
        let uri: hyper::Uri = url.parse().map_err(|_| WebhookError::Url(url.into()))?;
        if uri.scheme_str() != Some("https") {
            return Err(WebhookError::Url(url.into()));
        }
        let host = uri
            .host()
            .ok_or_else(|| WebhookError::Url(url.into()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(443);
        let mut roots = rustls::RootCertStore::empty();
        for c in relay_ops::pem::load_certs(ca)? {
            roots.add(c)?;
        }
        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            uri,
            host,
            port,
            tls: Arc::new(tls),
            timeout,
        })
    }

    /// One POST; the status code, or why there was none.
    async fn post(&self, id: &str, body: &Value) -> Result<u16, String> {
        let attempt = async {
            let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| format!("connecting: {e}"))?;
            let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                .map_err(|e| format!("server name: {e}"))?;
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                    .await
                    .map_err(|e| format!("HTTP: {e}"))?;
            tokio::spawn(conn);
            let path = self
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned();
            let authority = self.uri.authority().map_or("", |a| a.as_str()).to_owned();
            let req = hyper::Request::post(path)
                .header(hyper::header::HOST, authority)
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .header("idempotency-key", id)
                .body(Full::new(Bytes::from(body.to_string())))
                .map_err(|e| format!("request: {e}"))?;
            let res = sender
                .send_request(req)
                .await
                .map_err(|e| format!("HTTP: {e}"))?;
            let status = res.status().as_u16();
            // Read the (small) answer so the exchange completes; its content does not matter.
            let _ = res.into_body().collect().await;
            Ok(status)
        };
        tokio::time::timeout(self.timeout, attempt)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {:?}", self.timeout)))
    }
}

/// The webhook's handle for the board: alerts go in here.
#[derive(Debug, Clone)]
pub struct Webhook {
    tx: mpsc::Sender<Alert>,
    codes: Arc<Vec<String>>,
    resume: Option<u64>,
}

impl Webhook {
    /// Opens the outbox and starts the writer and the sender.
    pub fn start(cfg: &super::config::WebhookConfig) -> Result<Option<Self>, WebhookError> {
        let Some(url) = &cfg.url else {
            return Ok(None);
        };
        let target = Target::new(url, &cfg.ca, cfg.timeout)?;
        let outbox = Arc::new(Outbox::open(&cfg.outbox)?);
        let resume = outbox.cursor()?;
        metrics::gauge!("relay_edweb_webhook_pending").set(outbox.pending()? as f64);
        let (tx, mut rx) = mpsc::channel::<Alert>(HANDOFF);
        let wake = Arc::new(Notify::new());
        {
            let outbox = outbox.clone();
            let wake = wake.clone();
            tokio::spawn(async move {
                while let Some(alert) = rx.recv().await {
                    let ob = outbox.clone();
                    let a = alert.clone();
                    match tokio::task::spawn_blocking(move || ob.offer(&a)).await {
                        Ok(Ok(true)) => {
                            metrics::gauge!("relay_edweb_webhook_pending").increment(1.0);
                            tracing::warn!(
                                alert = alert.id,
                                "paging: alert queued for the webhook"
                            );
                            wake.notify_one();
                        }
                        Ok(Ok(false)) => {}
                        Ok(Err(e)) => {
                            tracing::error!(error = %e, alert = alert.id, "webhook outbox")
                        }
                        Err(e) => tracing::error!(error = %e, "webhook outbox task"),
                    }
                }
            });
        }
        tokio::spawn(send_loop(outbox, target, wake, cfg.max_backoff));
        Ok(Some(Self {
            tx,
            codes: Arc::new(cfg.codes.iter().map(|c| c.to_ascii_uppercase()).collect()),
            resume,
        }))
    }

    /// The cursor the board should resume after (the last alert written), if any.
    pub fn resume_cursor(&self) -> Option<u64> {
        self.resume
    }

    /// Whether events with `code` page.
    pub fn pages(&self, code: &str) -> bool {
        self.codes.iter().any(|c| c.eq_ignore_ascii_case(code))
    }

    /// Hands an alert to the outbox (waits when the writer is behind, so none is dropped).
    pub async fn offer(&self, alert: Alert) {
        if self.tx.send(alert).await.is_err() {
            tracing::error!("webhook outbox writer ended");
        }
    }
}

async fn send_loop(outbox: Arc<Outbox>, target: Target, wake: Arc<Notify>, max_backoff: Duration) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let ob = outbox.clone();
        let next = match tokio::task::spawn_blocking(move || ob.first()).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "reading the webhook outbox");
                None
            }
            Err(_) => None,
        };
        let Some((position, body)) = next else {
            // Nothing pending: wait for a new alert (or check again in a while).
            let _ = tokio::time::timeout(Duration::from_secs(30), wake.notified()).await;
            continue;
        };
        let id = body["alert_id"].as_str().unwrap_or_default().to_owned();
        match target.post(&id, &body).await {
            Ok(status) if (200..300).contains(&status) => {
                tracing::warn!(alert = id, status, "paged: webhook delivered");
                let ob = outbox.clone();
                let idc = id.clone();
                match tokio::task::spawn_blocking(move || ob.delivered(position, &idc)).await {
                    Ok(Ok(())) => {
                        metrics::counter!("relay_edweb_webhook_delivered_total").increment(1);
                        metrics::gauge!("relay_edweb_webhook_pending").decrement(1.0);
                        backoff = Duration::from_secs(1);
                    }
                    Ok(Err(e)) => tracing::error!(error = %e, alert = id, "webhook outbox"),
                    Err(e) => tracing::error!(error = %e, "webhook outbox task"),
                }
            }
            other => {
                metrics::counter!("relay_edweb_webhook_failed_attempts_total").increment(1);
                tracing::warn!(alert = id, answer = ?other, retry_in = ?backoff, "webhook not delivered");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(max_backoff);
            }
        }
    }
}

/// The page body of one event record, if it is an event.
pub fn alert_of(msg: &relay_proto::model::SubscribeResponse) -> Option<Alert> {
    use relay_proto::model::{frame::Payload, subscribe_response::Record};
    let Some(Record::Data(d)) = &msg.record else {
        return None;
    };
    let (s, f) = (d.stream.as_ref()?, d.frame.as_ref()?);
    let Some(Payload::Event(e)) = &f.payload else {
        return None;
    };
    let id = format!(
        "{}/{}/{}/{}",
        s.vehicle_id, s.session_id, s.stream_id, f.seq
    );
    let body = json!({
        "alert_id": id,
        "vehicle_id": s.vehicle_id,
        "code": e.code,
        "severity": super::feed::severity_name(e.severity),
        "text": e.text,
        "capture_time_ns": f.capture_time_ns,
        "received_time_ns": d.received_time_ns,
        // What the ED view needs to acknowledge it.
        "stream": super::feed::stream_key(s),
        "seq": f.seq,
    });
    Some(Alert {
        id,
        body,
        cursor: msg.cursor,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn alert(seq: u64, cursor: u64) -> Alert {
        let id = format!("amb-1/7/3/{seq}");
        Alert {
            body: json!({"alert_id": id, "code": "STEMI"}),
            id,
            cursor,
        }
    }

    #[test]
    fn an_alert_is_queued_once_across_reopening_and_leaves_the_queue_when_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.redb");
        {
            let o = Outbox::open(&path).unwrap();
            assert_eq!(o.cursor().unwrap(), None);
            assert!(o.offer(&alert(0, 10)).unwrap());
            assert!(o.offer(&alert(1, 11)).unwrap());
            assert!(!o.offer(&alert(0, 12)).unwrap(), "seen before");
            assert_eq!(o.cursor().unwrap(), Some(12));
        }
        let o = Outbox::open(&path).unwrap();
        let (pos, body) = o.first().unwrap().unwrap();
        assert_eq!(
            body["alert_id"], "amb-1/7/3/0",
            "oldest first, after a restart"
        );
        o.delivered(pos, "amb-1/7/3/0").unwrap();
        assert!(!o.offer(&alert(0, 13)).unwrap(), "delivered stays seen");
        let (_, body) = o.first().unwrap().unwrap();
        assert_eq!(body["alert_id"], "amb-1/7/3/1");
    }

    #[test]
    fn only_https_urls_are_taken() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "").unwrap();
        for url in [
            "http://cathlab.example/page",
            "cathlab.example",
            "https:///x",
        ] {
            assert!(matches!(
                Target::new(url, &ca, Duration::from_secs(1)),
                Err(WebhookError::Url(_))
            ));
        }
    }
}
