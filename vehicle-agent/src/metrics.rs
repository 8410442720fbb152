//! Metric names, descriptions and the class mappings they share with the scheduler.

use relay_proto::Class;

use crate::scheduler::Lane;

pub use relay_proto::kind_label;

/// quinn's `SendStream::set_priority` sends the *higher* value first; this is the one place
/// that maps our ranks onto it. Every live-lane class goes before any catch-up frame.
pub fn quinn_priority(kind: i32, lane: Lane) -> i32 {
    let base = match lane {
        Lane::Live => 100,
        Lane::CatchUp => 50,
    };
    // Class::index is at most 4, so the cast cannot truncate.
    base - 10 * Class::of_kind(kind).index() as i32
}

/// Registers the description and unit of every agent metric, and the series dashboards and
/// alert rules query at zero, so they exist before their first event.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    for name in [
        "relay_agent_frames_resent_total",
        "relay_agent_spool_errors_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    for code in (0..=u64::from(u8::MAX)).filter_map(relay_proto::CloseCode::from_u64) {
        metrics::counter!("relay_agent_refusals_total", "code" => code.label()).increment(0);
    }
    for result in ["accepted", "error", "rejected"] {
        metrics::counter!("relay_agent_hl7_messages_total", "result" => result).increment(0);
    }
    describe_counter!(
        "relay_agent_hl7_messages_total",
        "HL7 messages from a patient monitor (MLLP), by result: accepted (AA), error (AE: content refused, e.g. a value that is not a number), rejected (AR: not ORU^R01, not HL7, framing)"
    );
    describe_counter!(
        "relay_agent_gps_lines_total",
        "Lines read from a GPS input (input nmea or gpsd), by result: fix (completed a fix), ignored (other sentence or report), invalid (bad checksum, not JSON, too long)"
    );
    describe_counter!(
        "relay_agent_refusals_total",
        "Connections the ingest closed with a close code (quota_exceeded, revoked, identity_mismatch, ...), by code"
    );
    for kind in ["events", "waveform", "vitals", "location"] {
        metrics::counter!("relay_agent_frames_evicted_total", "kind" => kind).increment(0);
    }
    describe_counter!(
        "relay_agent_frames_produced_total",
        "Frames produced by sources, by kind"
    );
    describe_counter!(
        "relay_agent_frames_sent_total",
        "Frames written to a QUIC stream (first send and re-sends), by kind"
    );
    describe_counter!(
        "relay_agent_frames_resent_total",
        "Frames sent again (another bearer, or after a reconnect) because they were not acknowledged"
    );
    describe_counter!(
        "relay_agent_frames_acked_total",
        "Frames acknowledged by the ingest and released"
    );
    describe_counter!(
        "relay_agent_frames_evicted_total",
        "Frames dropped unacknowledged because the buffer was full, by kind"
    );
    describe_counter!(
        "relay_agent_bogus_acked_frames_total",
        "Frames an acknowledgement claimed that were never sent on its connection (the message was ignored)"
    );
    describe_counter!(
        "relay_agent_frame_send_errors_total",
        "Frame writes that failed (connection lost mid-write)"
    );
    describe_gauge!(
        "relay_agent_unacked_frames",
        "Frames held until the ingest acknowledges them"
    );
    describe_gauge!(
        "relay_agent_unacked_bytes",
        Unit::Bytes,
        "Bytes held until the ingest acknowledges them"
    );
    describe_gauge!(
        "relay_agent_connected",
        "Bearers with a connection to the ingest now"
    );
    let bearer_gauges = [
        (
            "relay_agent_bearer_state",
            "Bearer health: 2 up, 1 suspect (nothing acknowledged for 2*SRTT+4*RTTVAR), 0 down",
        ),
        (
            "relay_agent_bearer_loss_ratio",
            "Packet loss ratio of the bearer's QUIC connection (smoothed)",
        ),
        (
            "relay_agent_bearer_delivery_rate_bytes_per_second",
            "Bytes per second the bearer is expected to deliver",
        ),
    ];
    for (name, help) in bearer_gauges {
        describe_gauge!(name, help);
    }
    describe_gauge!(
        "relay_agent_bearer_rtt_seconds",
        Unit::Seconds,
        "Smoothed round trip from sending a frame to its acknowledgement, per bearer"
    );
    describe_gauge!(
        "relay_agent_bearer_rtt_variance_seconds",
        Unit::Seconds,
        "Round-trip variation (RTTVAR), per bearer"
    );
    describe_gauge!(
        "relay_agent_bearer_in_flight_bytes",
        Unit::Bytes,
        "Bytes sent on the bearer and not yet acknowledged"
    );
    let bearer_counters = [
        (
            "relay_agent_bearer_frames_sent_total",
            "Frame copies sent on the bearer",
        ),
        (
            "relay_agent_bearer_frames_acked_total",
            "Frames acknowledged through the bearer",
        ),
        (
            "relay_agent_bearer_frames_resent_total",
            "Frames sent again on the bearer because another copy was overdue or its bearer lost",
        ),
        (
            "relay_agent_bearer_failovers_total",
            "Times the bearer stopped being up while it carried frames",
        ),
        (
            "relay_agent_bearer_connect_failures_total",
            "Failed or lost connections of the bearer",
        ),
    ];
    for (name, help) in bearer_counters {
        describe_counter!(name, help);
    }
    describe_counter!(
        "relay_agent_bearer_sent_bytes_total",
        Unit::Bytes,
        "Frame bytes sent on the bearer"
    );
    describe_gauge!(
        "relay_agent_queued_frames",
        "Frames waiting for a bearer, per class"
    );
    describe_gauge!(
        "relay_agent_spool_frames",
        "Frames in the crash-safe spool (unacknowledged)"
    );
    describe_gauge!(
        "relay_agent_spool_bytes",
        Unit::Bytes,
        "Bytes in the crash-safe spool"
    );
    describe_gauge!(
        "relay_agent_spool_oldest_frame_age_seconds",
        Unit::Seconds,
        "Age of the oldest frame in the spool"
    );
    describe_histogram!(
        "relay_agent_spool_commit_seconds",
        Unit::Seconds,
        "Duration of a spool commit (fsync included)"
    );
    describe_counter!(
        "relay_agent_spool_errors_total",
        "Spool commits that failed"
    );
    describe_counter!(
        "relay_agent_spool_discarded_frames_total",
        "Frames dropped at start because the spool held a session with other streams"
    );
    describe_counter!(
        "relay_agent_connects_total",
        "Successful connections (handshake and Hello done)"
    );
    describe_counter!(
        "relay_agent_connect_failures_total",
        "Failed connection attempts, by reason"
    );
    describe_counter!(
        "relay_agent_tls_reload_errors_total",
        "Changed certificate files that did not load (the previous ones stay in use)"
    );
    describe_counter!(
        "relay_agent_events_raised_total",
        "Clinical events the crew raised through the local event API"
    );
    describe_counter!(
        "relay_agent_events_acknowledged_total",
        "Clinical events the ED acknowledged (the first acknowledgement of each)"
    );
    describe_gauge!(
        "relay_agent_clock_offset_seconds",
        Unit::Seconds,
        "This vehicle's clock minus the ingest's, from the clock exchange with the shortest round trip (absent until one completed)"
    );
    describe_gauge!(
        "relay_agent_clock_offset_uncertainty_seconds",
        Unit::Seconds,
        "Half the round trip of that exchange: the true offset lies within the estimate plus or minus this"
    );
    describe_gauge!(
        "relay_agent_certificate_expiry_timestamp_seconds",
        Unit::Seconds,
        "When the vehicle's certificate and the pinned ingest CA stop being valid (Unix time)"
    );
    describe_gauge!(
        "relay_agent_spool_up",
        "1 while the spool task commits, 0 once it died (the agent then stops and restarts)"
    );
    describe_histogram!(
        "relay_agent_ack_latency_seconds",
        Unit::Seconds,
        "Time from writing a frame to its acknowledgement"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_proto::model::StreamKind;

    #[test]
    fn priority_is_strict_and_higher_means_sooner() {
        let order = [
            StreamKind::Events,
            StreamKind::Waveform,
            StreamKind::Vitals,
            StreamKind::Location,
            StreamKind::Unspecified,
        ];
        let prio: Vec<i32> = [Lane::Live, Lane::CatchUp]
            .iter()
            .flat_map(|lane| order.iter().map(|k| quinn_priority(*k as i32, *lane)))
            .collect();
        assert!(prio.windows(2).all(|w| w[0] > w[1]), "{prio:?}");
        assert_eq!(kind_label(999), "other");
    }
}
