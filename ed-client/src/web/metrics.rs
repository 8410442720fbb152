//! Metric descriptions of ed-web (names follow Prometheus conventions; labels are bounded).

/// Every outcome of `relay_edweb_logins_total`.
pub const LOGIN_OUTCOMES: &[&str] = &["ok", "bad_credentials", "locked_out"];

/// Registers the description of every ed-web metric, and the series alert rules query at
/// zero, so `increase()` sees the first event.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_counter!(
        "relay_edweb_logins_total",
        "Login attempts by outcome (ok, bad_credentials, locked_out)"
    );
    for outcome in LOGIN_OUTCOMES {
        metrics::counter!("relay_edweb_logins_total", "outcome" => *outcome).increment(0);
    }
    describe_counter!(
        "relay_edweb_access_denied_total",
        "Requests for a vehicle outside the user's scope (403)"
    );
    describe_gauge!(
        "relay_edweb_streams_open",
        "Live streams (server-sent events) open to browsers"
    );
    describe_counter!(
        "relay_edweb_streams_refused_total",
        "Live streams refused at http.max_streams or http.max_streams_per_user (429)"
    );
    describe_counter!(
        "relay_edweb_browsers_dropped_total",
        "Browsers disconnected for staying behind longer than http.slow_browser_timeout"
    );
    describe_gauge!(
        "relay_edweb_ingest_connected",
        "1 while the ingest answered the latest vehicle list, else 0"
    );
    describe_gauge!(
        "relay_edweb_webhook_pending",
        "Alerts in the webhook outbox not yet delivered to the pager"
    );
    describe_counter!(
        "relay_edweb_webhook_delivered_total",
        "Alerts the pager accepted (2xx)"
    );
    describe_counter!(
        "relay_edweb_webhook_failed_attempts_total",
        "Webhook POSTs that failed (no answer, TLS, or not 2xx); each is retried"
    );
    for name in [
        "relay_edweb_access_denied_total",
        "relay_edweb_streams_refused_total",
        "relay_edweb_browsers_dropped_total",
        "relay_edweb_webhook_delivered_total",
        "relay_edweb_webhook_failed_attempts_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    for name in [
        "relay_edweb_streams_open",
        "relay_edweb_ingest_connected",
        "relay_edweb_webhook_pending",
    ] {
        metrics::gauge!(name).increment(0.0);
    }
}
