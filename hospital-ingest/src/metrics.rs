//! Metric descriptions of the ingest (names follow Prometheus conventions; labels are bounded).

pub use relay_proto::kind_label;

/// Every reason of `relay_ingest_security_events_total`.
pub const SECURITY_EVENT_REASONS: &[&str] = &[
    "identity_mismatch",
    "session_mismatch",
    "revoked",
    "no_certificate",
    "unparseable_certificate",
    "no_common_name",
    "invalid_vehicle_id",
];

/// Series that dashboards and alert rules query, registered at zero (counters) or with no
/// change (gauges) so they exist from the start: `increase()` then sees the first event,
/// and panels show 0 rather than "no data". Registering never changes a value.
fn export_from_start() {
    for name in [
        "relay_ingest_frames_duplicate_total",
        "relay_ingest_frames_late_total",
        "relay_ingest_gaps_total",
        "relay_ingest_subscriber_lagged_total",
        "relay_ingest_subscribers_cut_off_total",
        "relay_ingest_store_errors_total",
        "relay_ingest_vehicle_quota_deleted_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    for name in ["relay_ingest_store_log_bytes", "relay_ingest_subscribers"] {
        metrics::gauge!(name).increment(0.0);
    }
    for code in (0..=u64::from(u8::MAX)).filter_map(relay_proto::CloseCode::from_u64) {
        metrics::counter!("relay_ingest_protocol_errors_total", "reason" => code.label())
            .increment(0);
    }
    for reason in SECURITY_EVENT_REASONS {
        metrics::counter!("relay_ingest_security_events_total", "reason" => *reason).increment(0);
    }
    for reason in crate::quic::HANDSHAKE_FAILURE_REASONS {
        metrics::counter!("relay_ingest_handshake_failures_total", "reason" => *reason)
            .increment(0);
    }
    for reason in crate::detect::Reason::ALL {
        metrics::counter!("relay_ingest_security_events_total", "reason" => reason.label())
            .increment(0);
    }
}

/// Registers the description and unit of every ingest metric.
pub fn describe() {
    export_from_start();
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "relay_ingest_cluster_ownership_taken_total",
        "Vehicles this ingest node took because no node owned them (JetStream store)"
    );
    describe_counter!(
        "relay_ingest_cluster_takeovers_total",
        "Vehicles this ingest node took over from an owner node that was gone"
    );
    describe_counter!(
        "relay_ingest_cluster_forward_failures_total",
        "Commands (Hellos, frames) this node could not hand to the vehicle's owner node; the agent re-sends"
    );
    describe_gauge!(
        "relay_ingest_quic_socket_receive_buffer_bytes",
        Unit::Bytes,
        "Receive buffer the kernel granted the QUIC socket (Linux reports twice the effective request)"
    );
    describe_counter!(
        "relay_ingest_quic_socket_receive_drops_total",
        "Datagrams the kernel dropped at the QUIC socket, mostly for a full receive buffer: the ingest fell behind its packets (Linux)"
    );
    describe_counter!(
        "relay_ingest_connections_total",
        "Vehicle connections accepted (certificate verified)"
    );
    describe_counter!(
        "relay_ingest_handshake_failures_total",
        "Vehicle QUIC/TLS handshakes that failed, by reason (revoked, unknown_ca, expired, no_certificate, alpn, timeout, abandoned: a peer dropping its own attempt, as agents do with the dials that lose)"
    );
    describe_counter!(
        "relay_ingest_grpc_handshake_failures_total",
        "gRPC (ED client) TLS handshakes that failed, by reason (revoked, unknown_ca, expired, no_certificate, timeout, busy, ...)"
    );
    // Exported at zero from the start, so alert rules with increase() see the first failure.
    for reason in crate::grpc::listener::HANDSHAKE_FAILURE_REASONS {
        metrics::counter!("relay_ingest_grpc_handshake_failures_total", "reason" => *reason)
            .increment(0);
    }
    describe_counter!(
        "relay_ingest_grpc_denied_total",
        "gRPC calls refused by the access policy or a per-client bound, by reason (no_grant, vehicle, kind, call_rate, subscriptions, unauthenticated)"
    );
    for reason in crate::grpc::DENIAL_REASONS {
        metrics::counter!("relay_ingest_grpc_denied_total", "reason" => *reason).increment(0);
    }
    describe_counter!(
        "relay_ingest_audit_records_total",
        "Records written to the access audit log"
    );
    describe_counter!(
        "relay_ingest_audit_write_failures_total",
        "Audit writes (or rotations) that failed; calls that needed the record were refused"
    );
    describe_counter!(
        "relay_ingest_audit_dropped_total",
        "Audit records dropped because the writer's queue was full (never those of data access)"
    );
    describe_counter!(
        "relay_ingest_audit_forwarded_total",
        "Audit records forwarded to the syslog receiver (audit.syslog_address)"
    );
    describe_counter!(
        "relay_ingest_audit_forward_dropped_total",
        "Audit records not forwarded because the receiver was away longer than audit.queue lasted (they are in the local file)"
    );
    describe_gauge!(
        "relay_ingest_audit_forward_connected",
        "1 while the connection to the syslog receiver is up (only when forwarding is configured)"
    );
    for name in [
        "relay_ingest_audit_records_total",
        "relay_ingest_audit_write_failures_total",
        "relay_ingest_audit_dropped_total",
        "relay_ingest_audit_forwarded_total",
        "relay_ingest_audit_forward_dropped_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    describe_counter!(
        "relay_ingest_security_events_total",
        "Security events by reason: unusable certificate names, Hellos claiming another vehicle or redeclaring a session, revoked certificates, and the detector's findings (timestamps, movement, rates, sequence jumps, session storms, addresses)"
    );
    describe_gauge!(
        "relay_ingest_certificate_expiry_timestamp_seconds",
        Unit::Seconds,
        "When the ingest's certificate and the CAs it trusts stop being valid (Unix time), by certificate"
    );
    describe_gauge!(
        "relay_ingest_vehicle_certificate_expiry_timestamp_seconds",
        Unit::Seconds,
        "The earliest expiry (Unix time) among the certificates of the vehicles connected now"
    );
    describe_counter!(
        "relay_ingest_handshake_retries_total",
        "Incoming connections asked to validate their address (QUIC Retry) under handshake pressure"
    );
    describe_counter!(
        "relay_ingest_handshakes_refused_total",
        "Incoming connections refused before they became sessions, by reason (pending_full, per_source, handshake_timeout, sessions_full)"
    );
    describe_gauge!(
        "relay_ingest_pending_handshakes",
        "Handshakes in progress (not yet sessions)"
    );
    describe_counter!(
        "relay_ingest_streams_stopped_total",
        "Frame streams the ingest stopped reading, by reason (deadline: not complete in quic.frame_read_timeout)"
    );
    describe_counter!(
        "relay_ingest_protocol_errors_total",
        "Connections closed by the ingest, by reason (malformed, frame_too_large, ...)"
    );
    describe_gauge!(
        "relay_ingest_vehicles_online",
        "Vehicles with at least one connected bearer"
    );
    describe_counter!(
        "relay_ingest_waveform_frames_total",
        "Valid waveform frames received, by how their samples travelled (samples, lpc1)"
    );
    describe_counter!(
        "relay_ingest_frames_received_total",
        "Valid frames received (before deduplication)"
    );
    describe_counter!(
        "relay_ingest_frame_bytes_total",
        Unit::Bytes,
        "Encoded frame bytes received"
    );
    describe_counter!(
        "relay_ingest_frames_stored_total",
        "Frames stored for the first time, by kind"
    );
    describe_counter!(
        "relay_ingest_frames_duplicate_total",
        "Frames received again after being stored (acknowledged, not stored twice)"
    );
    describe_counter!(
        "relay_ingest_frames_late_total",
        "Frames that arrived after newer ones of their stream (filling a gap)"
    );
    describe_counter!("relay_ingest_gaps_total", "Gaps announced to subscribers");
    describe_gauge!(
        "relay_ingest_reorder_held_frames",
        "Frames waiting in the reorder window for frames they overtook"
    );
    describe_counter!(
        "relay_ingest_acks_dropped_total",
        "Acknowledgements that could not be queued to their connection"
    );
    describe_histogram!(
        "relay_ingest_store_commit_seconds",
        Unit::Seconds,
        "Duration of one durable store commit"
    );
    describe_gauge!(
        "relay_ingest_store_queue_depth",
        "Commands waiting for the store writer"
    );
    describe_counter!(
        "relay_ingest_store_errors_total",
        "Store commits that failed (nothing of the batch was acknowledged)"
    );
    describe_counter!(
        "relay_ingest_retention_deleted_total",
        "Records deleted by retention"
    );
    describe_counter!(
        "relay_ingest_vehicle_quota_deleted_total",
        "Records deleted because their vehicle held more than store.max_bytes_per_vehicle"
    );
    describe_gauge!(
        "relay_ingest_store_log_bytes",
        Unit::Bytes,
        "Bytes held in the store's log"
    );
    describe_gauge!("relay_ingest_subscribers", "Active gRPC subscriptions");
    describe_counter!(
        "relay_ingest_subscriber_lagged_total",
        "Times a subscriber fell behind the live buffer and was served from the store"
    );
    describe_counter!(
        "relay_ingest_subscriber_early_frames_total",
        "Frames sent to early subscribers before they were durable (confirmed later)"
    );
    describe_counter!(
        "relay_ingest_subscribers_cut_off_total",
        "Subscribers cut off because their queue stayed full"
    );
}
