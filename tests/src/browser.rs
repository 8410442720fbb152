//! Headless Chromium (Debian's package) driven over the DevTools protocol: an independent
//! browser for the ed-web tests. One page per browser; every call has a deadline.

use std::path::PathBuf;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Deadline of one DevTools call.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The Chromium binary: `$CHROMIUM`, else Debian's `/usr/bin/chromium`.
pub fn chromium_path() -> PathBuf {
    std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

/// A headless Chromium with one page attached.
pub struct Browser {
    child: tokio::process::Child,
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium with a fresh profile (no cookies) and a 1400 x 1000 page at device
    /// scale 1. Certificates are not checked: the test's server uses a throw-away CA.
    pub async fn launch() -> Self {
        let profile = tempfile::tempdir().unwrap();
        let exe = chromium_path();
        let child = tokio::process::Command::new(&exe)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-default-apps",
                "--mute-audio",
                "--ignore-certificate-errors",
                "--remote-debugging-port=0",
                "--window-size=1400,1000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("starting {} (tests/run.sh installs it): {e}", exe.display())
            });
        let port_file = profile.path().join("DevToolsActivePort");
        let mut text = String::new();
        for _ in 0..300 {
            if let Ok(t) = std::fs::read_to_string(&port_file)
                && t.lines().count() >= 2
            {
                text = t;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut lines = text.lines();
        let (Some(port), Some(path)) = (lines.next(), lines.next()) else {
            panic!("Chromium did not open its DevTools port within 30 s");
        };
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}{path}"))
            .await
            .unwrap();
        let mut b = Self {
            child,
            ws,
            next_id: 0,
            session: String::new(),
            _profile: profile,
        };
        let target = b
            .send(None, "Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let target_id = target["targetId"].as_str().unwrap().to_owned();
        let attached = b
            .send(
                None,
                "Target.attachToTarget",
                json!({"targetId": target_id, "flatten": true}),
            )
            .await;
        b.session = attached["sessionId"].as_str().unwrap().to_owned();
        b.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1400, "height": 1000, "deviceScaleFactor": 1, "mobile": false}),
        )
        .await;
        b.call("Page.enable", json!({})).await;
        b
    }

    async fn send(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        let reply = self.try_send(session, method, params).await;
        assert!(reply.get("error").is_none(), "{method}: {reply}");
        reply["result"].clone()
    }

    /// The whole reply (`result` or `error`).
    async fn try_send(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        self.ws.send(Message::text(msg.to_string())).await.unwrap();
        tokio::time::timeout(CALL_TIMEOUT, async {
            while let Some(m) = self.ws.next().await {
                let Message::Text(t) = m.unwrap() else {
                    continue;
                };
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if v["id"] == json!(id) {
                    return v;
                }
            }
            panic!("DevTools connection closed");
        })
        .await
        .unwrap_or_else(|_| panic!("{method} took longer than {CALL_TIMEOUT:?}"))
    }

    /// A DevTools command on the page.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        let session = self.session.clone();
        self.send(Some(&session), method, params).await
    }

    /// Evaluates `expression` in the page (promises awaited) and returns its value as JSON.
    pub async fn eval(&mut self, expression: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "awaitPromise": true, "returnByValue": true}),
            )
            .await;
        assert!(
            r.get("exceptionDetails").is_none(),
            "{expression}: {}",
            r["exceptionDetails"]
        );
        r["result"]["value"].clone()
    }

    /// Opens `url` and waits until its document has loaded.
    pub async fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url})).await;
        self.wait_for(
            "document.readyState === 'complete' && location.href !== 'about:blank'",
            Duration::from_secs(30),
        )
        .await;
    }

    /// Polls `expression` until it is truthy (returns its value) or `timeout` passes; an
    /// evaluation that fails (the page is navigating, a variable is not there yet) counts as
    /// not yet.
    pub async fn wait_for(&mut self, expression: &str, timeout: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let session = self.session.clone();
            let r = self
                .try_send(
                    Some(&session),
                    "Runtime.evaluate",
                    json!({"expression": expression, "awaitPromise": true, "returnByValue": true}),
                )
                .await;
            let v = if r["result"].get("exceptionDetails").is_some() {
                Value::Null
            } else {
                r["result"]["result"]["value"].clone()
            };
            if !(v.is_null() || v == json!(false) || v == json!(0) || v == json!("")) {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "not true within {timeout:?}: {expression}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A PNG of the page, or of the CSS-pixel rectangle `clip` (x, y, width, height).
    pub async fn screenshot(&mut self, clip: Option<(f64, f64, f64, f64)>) -> Vec<u8> {
        use base64::Engine;
        let mut params = json!({"format": "png", "captureBeyondViewport": false});
        if let Some((x, y, width, height)) = clip {
            params["clip"] = json!({"x": x, "y": y, "width": width, "height": height, "scale": 1});
        }
        let r = self.call("Page.captureScreenshot", params).await;
        base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap()
    }

    /// Ends Chromium.
    pub async fn close(mut self) {
        let _ = self.child.kill().await;
    }
}
