//! Bounded property tests of the WFDB reader and writer: arbitrary header text and data files
//! never panic the reader, what it accepts holds as many samples as it claims, and what the
//! writer writes reads back exactly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use proptest::prelude::*;
use relay_wfdb::{ChannelSpec, Format16Writer, INVALID_SAMPLE_16, parse_header, read_record};

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_header_text_never_panics(text in "[0-9a-zA-Z ./+()x:#\\-\\n\\t]{0,400}") {
        let _ = parse_header(&text, Path::new("fuzz.hea"));
    }

    #[test]
    fn arbitrary_records_never_panic_and_hold_what_they_claim(
        signals in 1usize..4,
        format in prop_oneof![
            Just(16u32), Just(212u32), Just(310u32), Just(311u32), Just(8u32), Just(24u32),
            Just(516u32), 0u32..600
        ],
        spf in prop::collection::vec(1u32..4, 4),
        skew in prop::collection::vec(0u64..4, 4),
        length in prop::option::of(0u64..500),
        offset in 0u64..64,
        dat in prop::collection::vec(any::<u8>(), 0..1500),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut hea = format!("r {signals} 250");
        if let Some(n) = length {
            hea.push_str(&format!(" {n}"));
        }
        hea.push('\n');
        for s in 0..signals {
            hea.push_str(&format!(
                "r.dat {format}x{}:{}+{offset} 200 11 1024 0 0 0 s{s}\n",
                spf[s], skew[s]
            ));
        }
        std::fs::write(dir.path().join("r.hea"), hea).unwrap();
        std::fs::write(dir.path().join("r.dat"), &dat).unwrap();
        if let Ok(r) = read_record(&dir.path().join("r")) {
            prop_assert_eq!(r.samples.len(), r.frames * r.frame_width());
        }
    }

    #[test]
    fn what_the_writer_writes_reads_back_exactly(
        chunks in prop::collection::vec((0u64..300, prop::collection::vec(-32767i32..=32767, 2..20)), 1..12),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let ch = |n: &str| ChannelSpec {
            name: n.into(),
            gain: 200.0,
            baseline: 0,
            units: "mV".into(),
            adc_resolution: 16,
            adc_zero: 0,
            samples_per_frame: 1,
        };
        let mut w = Format16Writer::create(dir.path(), "w", 360.0, vec![ch("a"), ch("b")], 0, 1000).unwrap();
        let mut expected: std::collections::BTreeMap<u64, (i32, i32)> = Default::default();
        for (first, mut samples) in chunks {
            samples.truncate(samples.len() / 2 * 2);
            let end = first + samples.len() as u64 / 2;
            // The writer ignores a chunk that overlaps what it holds.
            if expected.range(first..end).next().is_some() {
                continue;
            }
            w.write(first, &samples).unwrap();
            for (k, pair) in samples.chunks(2).enumerate() {
                expected.insert(first + k as u64, (pair[0], pair[1]));
            }
        }
        w.finish(&[]).unwrap();
        let r = read_record(&dir.path().join("w")).unwrap();
        let total = expected.keys().next_back().map_or(0, |k| k + 1) as usize;
        prop_assert_eq!(r.frames, total);
        for i in 0..total {
            let want = expected.get(&(i as u64)).copied().unwrap_or((INVALID_SAMPLE_16, INVALID_SAMPLE_16));
            prop_assert_eq!((r.samples[2 * i], r.samples[2 * i + 1]), want);
        }
        for s in 0..2 {
            prop_assert_eq!(Some(r.checksum(s)), r.header.signals[s].checksum);
        }
    }

    #[test]
    fn any_multi_rate_record_survives_a_write_in_random_chunks(
        spf in prop::collection::vec(1u32..5, 1..5),
        frames in 1u64..40,
        chunk in 1u64..9,
        seed in any::<u64>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let chans: Vec<ChannelSpec> = spf.iter().enumerate().map(|(i, &k)| ChannelSpec {
            name: format!("s{i}"), gain: 1.0, baseline: 0, units: "mV".into(),
            adc_resolution: 16, adc_zero: 0, samples_per_frame: k,
        }).collect();
        let mut w = Format16Writer::create(dir.path(), "p", 7.0, chans, 0, 1000).unwrap();
        let value = |c: usize, j: u64| ((seed >> (c % 8)) as i64 + j as i64 * 37 - c as i64 * 1000) as i16 as i32;
        // One group per distinct rate, chunks written in reverse order.
        let mut rates: Vec<u32> = spf.clone();
        rates.sort_unstable();
        rates.dedup();
        for k in rates {
            let group: Vec<usize> = (0..spf.len()).filter(|&c| spf[c] == k).collect();
            let len = frames * u64::from(k);
            let starts: Vec<u64> = (0..len).step_by(chunk as usize).collect();
            for &s in starts.iter().rev() {
                let e = (s + chunk).min(len);
                let mut buf = Vec::new();
                for j in s..e {
                    buf.extend(group.iter().map(|&c| value(c, j)));
                }
                w.write_channels(&group, s, &buf).unwrap();
            }
        }
        w.finish(&[]).unwrap();
        let r = read_record(&dir.path().join("p")).unwrap();
        prop_assert_eq!(r.frames as u64, frames);
        for (c, &k) in spf.iter().enumerate() {
            let want: Vec<i32> = (0..frames * u64::from(k)).map(|j| value(c, j)).collect();
            prop_assert_eq!(r.signal(c).collect::<Vec<_>>(), want);
            prop_assert_eq!(Some(r.checksum(c)), r.header.signals[c].checksum);
        }
    }
}
