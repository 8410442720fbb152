//! Structured property tests of what the agent takes from the network or a file: an
//! acknowledgement never releases a frame that was not sent on its connection, configuration
//! text in TOML's alphabet never panics. Arbitrary bytes as the ingest's answers are the fuzz
//! targets' job (`fuzz/`, run on stable by `relay-fuzz`'s tests).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use relay_proto::model::StreamKind;
use tokio::time::Instant;
use vehicle_agent::AgentConfig;
use vehicle_agent::config::ServiceConfig;
use vehicle_agent::scheduler::{Action, FrameId, Scheduler};
use vehicle_agent::uplink::scheduler_config;

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_configuration_text_never_panics(text in "[\\[\\]a-z_.=\"0-9 \\n#:-]{0,300}") {
        if let Ok(cfg) = AgentConfig::from_toml(&text, Path::new("fuzz.toml")) {
            let _ = cfg.validate();
        }
    }

    #[test]
    fn acknowledgements_release_only_what_was_sent_on_their_connection(
        held in prop::collection::btree_set(0u64..200, 1..60),
        ranges in prop::collection::vec((0u32..3, any::<u64>(), any::<u64>()), 0..6),
        bearer in 0usize..2,
    ) {
        let t0 = Instant::now();
        let cfg = AgentConfig::default();
        let mut s = Scheduler::new(scheduler_config(&cfg), vec![None, None], t0);
        s.on_connected(0, 1, t0);
        let kind = StreamKind::Waveform as i32;
        for &seq in &held {
            s.insert(FrameId { stream_id: 0, seq }, kind, Bytes::from_static(b"frame"), t0);
        }
        let mut sent_on = std::collections::HashMap::new();
        for a in s.poll(t0) {
            if let Action::Transmit(t) = a {
                sent_on.entry(t.id).or_insert_with(Vec::new).push(t.bearer);
            }
        }
        let before = s.len();
        let acked = s.on_ack(bearer, &ranges, t0 + Duration::from_millis(50));
        for (id, _, _) in &acked.released {
            prop_assert!(sent_on.get(id).is_some_and(|b| b.contains(&bearer)), "{:?}", id);
        }
        prop_assert_eq!(s.len(), before - acked.released.len());
        if acked.bogus > 0 {
            prop_assert!(acked.released.is_empty());
        }
    }
}
