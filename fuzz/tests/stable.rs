//! Every fuzz target as a bounded property run on stable: the kept libFuzzer corpus (inputs
//! that once found new coverage, and any crash turned regression), mutations of the seeds,
//! and arbitrary bytes. A body that panics fails the test with the input that made it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use proptest::prelude::*;
use relay_fuzz::{TARGETS, seeds};

/// Upper bound on kept corpus files read per target, so a large kept corpus cannot make the
/// normal test run slow; libFuzzer runs use all of it.
const MAX_CORPUS_FILES: usize = 2_000;

fn body(target: &str) -> relay_fuzz::Target {
    TARGETS.iter().find(|(t, _)| *t == target).unwrap().1
}

#[test]
fn every_target_has_seeds_and_a_libfuzzer_binary() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("libfuzzer");
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
    for (target, _) in TARGETS {
        assert!(!seeds(target).is_empty(), "{target} has no seeds");
        assert!(
            dir.join("fuzz_targets")
                .join(format!("{target}.rs"))
                .is_file(),
            "{target}"
        );
        assert!(
            manifest.contains(&format!("name = \"{target}\"")),
            "{target} not in Cargo.toml"
        );
    }
}

/// Seeds that the decoders refuse would start every run in the error paths.
#[test]
fn the_seeds_are_accepted_by_their_decoders() {
    use hospital_ingest::config::ServiceConfig;
    use prost::Message;
    use tokio::time::Instant;
    for seed in seeds("ingest_frame") {
        let frame = relay_proto::model::Frame::decode(seed.as_slice()).unwrap();
        hospital_ingest::quic::validate_frame(&frame, &relay_fuzz::declared_streams()).unwrap();
    }
    let hs = hospital_ingest::quic::handshake::ServerHandshake::new(
        Instant::now(),
        std::time::Duration::from_secs(5),
    );
    hs.handle_message(&seeds("ingest_hello")[0], relay_fuzz::VEHICLE)
        .unwrap();
    for seed in seeds("wfdb_header") {
        relay_wfdb::parse_header(std::str::from_utf8(&seed).unwrap(), Path::new("s.hea")).unwrap();
    }
    for seed in seeds("wfdb_record") {
        let split = seed.iter().position(|&b| b == 0).unwrap();
        let text = std::str::from_utf8(&seed[..split]).unwrap();
        let body = seed[split + 1..].to_vec();
        let record = relay_wfdb::record_from_parts(text, Path::new("s.hea"), |_| Ok(body.clone()));
        assert!(record.unwrap().frames > 0);
    }
    let codec_seeds = seeds("waveform_codec");
    assert_eq!(codec_seeds.len(), 2);
    for seed in codec_seeds {
        let channels = usize::from(seed[0] % 16) + 1;
        let count = usize::from(u16::from_le_bytes([seed[1], seed[2]]));
        let centers: Vec<i32> = (0..channels as i32).map(|i| i * 100 - 300).collect();
        let mut out = Vec::new();
        relay_codec::decode(&seed[3..], &centers, count, &mut out).unwrap();
        assert_eq!(out.len(), channels * count);
    }
    let text = String::from_utf8(seeds("ingest_config")[0].clone()).unwrap();
    let cfg = hospital_ingest::IngestConfig::from_toml(&text, Path::new("i.toml")).unwrap();
    cfg.validate().unwrap();
    let text = String::from_utf8(seeds("agent_config")[0].clone()).unwrap();
    let cfg = vehicle_agent::AgentConfig::from_toml(&text, Path::new("a.toml")).unwrap();
    cfg.validate().unwrap();
}

/// Files in `dir` (none when it does not exist), in name order, at most `limit`.
fn inputs(dir: &Path, limit: usize) -> Vec<Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
    paths.sort();
    paths.truncate(limit);
    paths.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

#[test]
fn the_seeds_and_the_kept_corpus_pass_every_target() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("libfuzzer/corpus");
    for (target, run) in TARGETS {
        for input in seeds(target)
            .into_iter()
            .chain(inputs(&corpus.join(target), MAX_CORPUS_FILES))
        {
            run(&input);
        }
    }
}

/// Inputs that once crashed a target, kept whatever libFuzzer's corpus minimisation does.
#[test]
fn every_crash_found_so_far_stays_fixed() {
    let regressions = Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions");
    let mut count = 0;
    for (target, run) in TARGETS {
        for input in inputs(&regressions.join(target), usize::MAX) {
            run(&input);
            count += 1;
        }
    }
    assert!(count >= 3, "the regression inputs are missing ({count})");
}

/// A seed with some bytes changed, a piece cut out, and maybe cut short: most of these still
/// parse, which is where the interesting paths are.
fn mutated(target: &'static str) -> impl Strategy<Value = Vec<u8>> {
    let seeds = seeds(target);
    (
        0..seeds.len(),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..12),
        any::<prop::sample::Index>(),
        0usize..16,
        any::<prop::sample::Index>(),
    )
        .prop_map(move |(pick, flips, cut_at, cut_len, end)| {
            let mut bytes = seeds[pick].clone();
            for (at, v) in flips {
                let i = at.index(bytes.len());
                bytes[i] ^= v;
            }
            let at = cut_at.index(bytes.len());
            bytes.drain(at..(at + cut_len).min(bytes.len()));
            let keep = end.index(bytes.len() + 1).max(bytes.len() / 2);
            bytes.truncate(keep);
            bytes
        })
}

macro_rules! stable_fuzz {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use super::*;
            proptest! {
                #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

                #[test]
                fn mutated_seeds(data in mutated(stringify!($name))) {
                    body(stringify!($name))(&data);
                }

                #[test]
                fn arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..4096)) {
                    body(stringify!($name))(&data);
                }
            }
        }
    )*};
}

stable_fuzz!(
    ingest_frame,
    ingest_hello,
    agent_control,
    wfdb_header,
    wfdb_record,
    waveform_codec,
    ingest_config,
    agent_config,
);
