//! Clinical events raised by the crew (STEMI alert, stroke alert, trauma alert, "12-lead
//! acquired", ETA or handover note), through a local Unix-socket API on the router that the
//! crew tablet and `vehicle-agent event ...` use. Each event becomes a frame of the agent's
//! `events` stream: the events class, sent before everything else and redundantly on every
//! bearer, spooled like any frame.
//!
//! Access: the socket is created owner-only (0600) in a directory the operator chooses, so
//! only the agent's own user (and root) can raise events; nothing listens on a network.
//!
//! Protocol: one JSON object per line each way, at most [`MAX_REQUEST_BYTES`] a line:
//! `{"raise": {"code": "STEMI", "text": "...", "severity": "high"}}` answers
//! `{"ok": true, "stream": 3, "seq": 0, "capture_time_ns": ...}`; `{"status": {"seq": 0}}`
//! answers whether, by whom and when the ED acknowledged it (the acknowledgement comes back
//! over the QUIC connection, [`record_ack`]); anything else answers
//! `{"ok": false, "error": "..."}`.

use std::path::{Path, PathBuf};

use relay_proto::model::{Event, Severity};
use relay_proto::wire::v1::EventAck;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Longest request line.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;
/// Longest event text.
pub const MAX_TEXT_CHARS: usize = 1000;
/// Clients served at once.
const MAX_CLIENTS: usize = 16;
/// Events waiting for the source at most.
pub const QUEUE: usize = 64;

/// The event codes the crew raises, with their default severity.
pub const CODES: &[(&str, Severity)] = &[
    ("STEMI", Severity::High),
    ("STROKE", Severity::High),
    ("TRAUMA", Severity::High),
    ("ECG_12_LEAD_ACQUIRED", Severity::Medium),
    ("ETA", Severity::Info),
    ("HANDOVER_NOTE", Severity::Info),
];

/// Acknowledgements from the ED, by event sequence number (the newest [`MAX_ACKS`]).
pub type Acks = std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<u64, EventAck>>>;
/// Acknowledgements kept at most.
pub const MAX_ACKS: usize = 1024;

/// Keeps the first acknowledgement of an event (bounded: the oldest go first).
pub fn record_ack(acks: &Acks, ack: EventAck) {
    let mut table = acks
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if table.contains_key(&ack.seq) {
        return; // the same acknowledgement over another bearer, or a later one
    }
    tracing::warn!(seq = ack.seq, by = %ack.acknowledged_by, note = %ack.note, "the ED acknowledged a clinical event");
    metrics::counter!("relay_agent_events_acknowledged_total").increment(1);
    table.insert(ack.seq, ack);
    while table.len() > MAX_ACKS {
        table.pop_first();
    }
}

/// A request on the socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Raise an event.
    Raise {
        /// One of [`CODES`] (case-insensitive).
        code: String,
        /// Free text (an ETA, a note), at most [`MAX_TEXT_CHARS`].
        #[serde(default)]
        text: String,
        /// info, low, medium or high; the code's default when absent.
        #[serde(default)]
        severity: Option<String>,
    },
    /// Whether (and by whom) the ED acknowledged the event with this sequence number.
    Status {
        /// As `raise` answered.
        seq: u64,
    },
}

/// The answer to a raise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Raised {
    /// Always true.
    pub ok: bool,
    /// The events stream's id.
    pub stream: u32,
    /// The event's sequence number within the stream (what the ED acknowledges).
    pub seq: u64,
    /// Its capture time, UTC ns (vehicle clock).
    pub capture_time_ns: i64,
}

/// An event on its way to the events source, which answers with (seq, capture time).
#[derive(Debug)]
pub struct Raise {
    /// The event.
    pub event: Event,
    /// Told where it went.
    pub placed: oneshot::Sender<(u64, i64)>,
}

/// The event a raise request line asks for (tests of the checks).
#[cfg(test)]
fn parse_request(line: &str) -> Result<Event, String> {
    match serde_json::from_str(line).map_err(|e| format!("not a request: {e}"))? {
        Request::Raise {
            code,
            text,
            severity,
        } => parse_raise(code, text, severity),
        Request::Status { .. } => Err("not a raise".into()),
    }
}

/// The event a raise asks for, or why it is refused (the text goes back to the client).
fn parse_raise(code: String, text: String, severity: Option<String>) -> Result<Event, String> {
    let code = code.to_ascii_uppercase();
    let Some((code, default)) = CODES.iter().find(|(c, _)| *c == code) else {
        let known: Vec<&str> = CODES.iter().map(|(c, _)| *c).collect();
        return Err(format!(
            "unknown code {code:?} (one of {})",
            known.join(", ")
        ));
    };
    if text.chars().count() > MAX_TEXT_CHARS {
        return Err(format!("text longer than {MAX_TEXT_CHARS} characters"));
    }
    let severity = match severity.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None => *default,
        Some("info") => Severity::Info,
        Some("low") => Severity::Low,
        Some("medium") => Severity::Medium,
        Some("high") => Severity::High,
        Some(other) => return Err(format!("unknown severity {other:?}")),
    };
    Ok(Event {
        code: (*code).to_owned(),
        severity: severity as i32,
        text,
        mdc_code: 0,
    })
}

/// Why the API could not start.
#[derive(Debug, thiserror::Error)]
#[error("events socket {path}: {source}")]
pub struct SocketError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// Binds the socket (replacing a stale one) owner-only and serves it until `stop`.
pub fn serve(
    path: &Path,
    stream_id: u32,
    raises: mpsc::Sender<Raise>,
    acks: Acks,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, SocketError> {
    let err = |source| SocketError {
        path: path.to_owned(),
        source,
    };
    if path.exists() {
        std::fs::remove_file(path).map_err(err)?;
    }
    // Connecting needs write permission on the socket; the usual umask leaves others without
    // it from bind() on, and the mode is narrowed to the owner at once.
    let listener = tokio::net::UnixListener::bind(path).map_err(err)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    }
    let path = path.to_owned();
    Ok(tokio::spawn(async move {
        let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
        loop {
            let conn = tokio::select! {
                c = listener.accept() => c,
                () = stop.cancelled() => break,
            };
            let Ok((conn, _)) = conn else { continue };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                continue; // dropped: too many clients at once
            };
            let (raises, acks) = (raises.clone(), acks.clone());
            tokio::spawn(async move {
                let _slot = slot;
                serve_client(conn, stream_id, raises, acks).await;
            });
        }
        let _ = std::fs::remove_file(&path);
    }))
}

/// A client that sends nothing for this long is disconnected (it holds a slot).
const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

async fn serve_client(
    conn: tokio::net::UnixStream,
    stream_id: u32,
    raises: mpsc::Sender<Raise>,
    acks: Acks,
) {
    let (read, mut write) = conn.into_split();
    let mut reader = BufReader::new(read);
    let mut line = String::new();
    loop {
        line.clear();
        let limited = (&mut reader).take(MAX_REQUEST_BYTES as u64 + 1);
        let read = tokio::time::timeout(IDLE_TIMEOUT, async move {
            let mut limited = limited;
            limited.read_line(&mut line).await.map(|n| (n, line))
        })
        .await;
        let (n, got) = match read {
            Ok(Ok(r)) => r,
            Ok(Err(_)) | Err(_) => return,
        };
        line = got;
        if n == 0 {
            return;
        }
        if !line.ends_with('\n') && line.len() > MAX_REQUEST_BYTES {
            let a = serde_json::json!({ "ok": false, "error": "request line too long" });
            let _ = write.write_all(format!("{a}\n").as_bytes()).await;
            return;
        }
        let answer = match serde_json::from_str::<Request>(line.trim_end()) {
            Err(e) => serde_json::json!({ "ok": false, "error": format!("not a request: {e}") }),
            Ok(Request::Status { seq }) => status(&acks, seq),
            Ok(Request::Raise {
                code,
                text,
                severity,
            }) => match parse_raise(code, text, severity) {
                Err(error) => serde_json::json!({ "ok": false, "error": error }),
                Ok(event) => place(event, stream_id, &raises).await,
            },
        };
        if write
            .write_all(format!("{answer}\n").as_bytes())
            .await
            .is_err()
        {
            return;
        }
    }
}

/// What the ED said about event `seq`.
fn status(acks: &Acks, seq: u64) -> serde_json::Value {
    let table = acks
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match table.get(&seq) {
        Some(a) => serde_json::json!({
            "ok": true,
            "seq": seq,
            "acknowledged": true,
            "acknowledged_by": a.acknowledged_by,
            "acknowledged_at_ns": a.acknowledged_at_ns,
            "note": a.note,
        }),
        None => serde_json::json!({ "ok": true, "seq": seq, "acknowledged": false }),
    }
}

/// Hands `event` to the events source and answers with where it went.
async fn place(event: Event, stream_id: u32, raises: &mpsc::Sender<Raise>) -> serde_json::Value {
    let stopping = serde_json::json!({ "ok": false, "error": "the agent is stopping" });
    let code = event.code.clone();
    let (placed, answer) = oneshot::channel();
    if raises.send(Raise { event, placed }).await.is_err() {
        return stopping;
    }
    match answer.await {
        Ok((seq, capture_time_ns)) => {
            tracing::warn!(code, seq, "clinical event raised by the crew");
            metrics::counter!("relay_agent_events_raised_total").increment(1);
            serde_json::to_value(Raised {
                ok: true,
                stream: stream_id,
                seq,
                capture_time_ns,
            })
            .unwrap_or(stopping)
        }
        Err(_) => stopping,
    }
}

/// What `vehicle-agent event ...` does: sends one request to the agent's socket and returns
/// the answer; fails when the agent refused it.
pub async fn request(socket: &Path, request: &Request) -> anyhow::Result<serde_json::Value> {
    use anyhow::Context as _;
    let conn = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| {
            format!(
                "connecting to the agent's events socket {}",
                socket.display()
            )
        })?;
    let (read, mut write) = conn.into_split();
    let line = serde_json::to_string(request)?;
    write.write_all(format!("{line}\n").as_bytes()).await?;
    let mut answer = String::new();
    BufReader::new(read.take(MAX_REQUEST_BYTES as u64))
        .read_line(&mut answer)
        .await?;
    let value: serde_json::Value =
        serde_json::from_str(answer.trim_end()).context("the agent's answer")?;
    if value["ok"] != true {
        anyhow::bail!("the agent refused: {}", value["error"]);
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked_and_codes_have_a_default_severity() {
        let e = parse_request(r#"{"raise": {"code": "stemi", "text": "inferior STE"}}"#).unwrap();
        assert_eq!(
            (e.code.as_str(), e.severity),
            ("STEMI", Severity::High as i32)
        );
        let e = parse_request(r#"{"raise": {"code": "ETA", "text": "12 min", "severity": "low"}}"#)
            .unwrap();
        assert_eq!(e.severity, Severity::Low as i32);
        for bad in [
            r#"{"raise": {"code": "PIZZA"}}"#,
            r#"{"raise": {"code": "STEMI", "severity": "apocalyptic"}}"#,
            r#"{"raise": {"code": "STEMI", "extra": 1}}"#,
            r#"{"lower": {}}"#,
            "not json",
        ] {
            assert!(parse_request(bad).is_err(), "{bad}");
        }
        let long = format!(
            r#"{{"raise": {{"code": "ETA", "text": "{}"}}}}"#,
            "x".repeat(MAX_TEXT_CHARS + 1)
        );
        assert!(parse_request(&long).unwrap_err().contains("longer"));
    }
}
