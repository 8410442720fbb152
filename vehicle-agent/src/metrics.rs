//! Metric names, descriptions and the class mappings they share with the scheduler.

use relay_proto::model::StreamKind;

pub use relay_proto::kind_label;

/// Strict priority rank: lower is more urgent (events > waveforms > vitals > location > rest).
pub fn class_rank(kind: i32) -> u8 {
    match StreamKind::try_from(kind) {
        Ok(StreamKind::Events) => 0,
        Ok(StreamKind::Waveform) => 1,
        Ok(StreamKind::Vitals) => 2,
        Ok(StreamKind::Location) => 3,
        _ => 4,
    }
}

/// quinn's `SendStream::set_priority` sends the *higher* value first; this is the one place
/// that maps our ranks onto it.
pub fn quinn_priority(kind: i32) -> i32 {
    100 - 10 * i32::from(class_rank(kind))
}

pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
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
        "Frames sent again after a reconnect because they were not acknowledged"
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
        "1 while a bearer connection to the ingest is up"
    );
    describe_counter!(
        "relay_agent_connects_total",
        "Successful connections (handshake and Hello done)"
    );
    describe_counter!(
        "relay_agent_connect_failures_total",
        "Failed connection attempts, by reason"
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

    #[test]
    fn priority_is_strict_and_higher_means_sooner() {
        let order = [
            StreamKind::Events,
            StreamKind::Waveform,
            StreamKind::Vitals,
            StreamKind::Location,
            StreamKind::Unspecified,
        ];
        let prio: Vec<i32> = order.iter().map(|k| quinn_priority(*k as i32)).collect();
        assert!(prio.windows(2).all(|w| w[0] > w[1]), "{prio:?}");
        assert_eq!(kind_label(999), "other");
    }
}
