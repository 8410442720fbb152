//! PhysioNet WFDB records: header parsing, reading every common signal format (including the
//! FLAC-compressed ones of MIMIC-IV), several samples per frame and skew, writing format 16.
//!
//! A crate of its own because both ends need it and neither protocol crate should: the agent
//! replays records and the ED client writes what it received back out. Plain synchronous file
//! I/O. Specification: WFDB "header(5)" and "signal(5)".
#![warn(missing_docs)]

use std::path::PathBuf;

mod header;
mod read;
mod write;

pub use header::{Header, MAX_SAMPLES_PER_FRAME, SignalSpec, parse_header};
pub use read::{RateGroup, Record, checksum, invalid_sample, read_record, record_from_parts};
pub use write::{ChannelSpec, Format16Writer, INVALID_SAMPLE_16, MAX_WRITE_SAMPLE_INDEX};

/// Refuse records whose samples would not fit comfortably in memory on a router.
pub const MAX_RECORD_SAMPLES: usize = 200_000_000;

#[derive(Debug, thiserror::Error)]
/// Why a record could not be read or written.
pub enum WfdbError {
    #[error("reading {path}: {source}")]
    /// A file could not be read or written.
    Io {
        /// The file.
        path: PathBuf,
        #[source]
        /// The operating system's error.
        source: std::io::Error,
    },
    #[error("header {path} line {line}: {msg}")]
    /// A header line does not follow header(5).
    Header {
        /// The header file.
        path: PathBuf,
        /// The line (1-based).
        line: usize,
        /// What is wrong with it.
        msg: String,
    },
    #[error(
        "signal format {0} is not supported (supported: 8, 16, 24, 32, 61, 80, 160, 212, 310, 311, 508, 516, 524)"
    )]
    /// A signal format this reader does not decode.
    UnsupportedFormat(u32),
    /// A write would leave a hole longer than the writer's gap bound after what it holds (or
    /// lands before its first sample): the caller starts another record (segment) there.
    #[error(
        "record {name}: sample {at} is out of reach (holds {base}..{end}, gap bound {max_gap})"
    )]
    OutOfReach {
        /// The record.
        name: String,
        /// The first sample of the write.
        at: u64,
        /// The record's first sample index.
        base: u64,
        /// One past the last sample written.
        end: u64,
        /// The longest hole it fills.
        max_gap: u64,
    },
    #[error("record {0}: {1}")]
    /// The record's data contradict its header (record name, what).
    Record(String, String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn writer_round_trips_out_of_order_with_holes() {
        let dir = tempfile::tempdir().unwrap();
        let ch = |n: &str| ChannelSpec {
            name: n.into(),
            gain: 200.0,
            baseline: 1024,
            units: "mV".into(),
            adc_resolution: 11,
            adc_zero: 1024,
            samples_per_frame: 1,
        };
        let mut w =
            Format16Writer::create(dir.path(), "out", 360.0, vec![ch("a"), ch("b")], 0, 1000)
                .unwrap();
        w.write(4, &[9, 10, 11, 12]).unwrap();
        w.write(0, &[1, 2, 3, 4]).unwrap();
        w.write(0, &[100, 100, 100, 100]).unwrap(); // duplicate: ignored
        assert_eq!(w.received_samples(), 4);
        w.finish(&["note".into()]).unwrap();
        let r = read_record(&dir.path().join("out")).unwrap();
        assert_eq!(r.frames, 6);
        let inv = INVALID_SAMPLE_16;
        assert_eq!(
            r.samples,
            vec![1, 2, 3, 4, inv, inv, inv, inv, 9, 10, 11, 12]
        );
        for s in 0..2 {
            assert_eq!(Some(r.checksum(s)), r.header.signals[s].checksum);
        }
        assert_eq!(r.header.signals[0].initial_value, Some(1));
        assert_eq!(r.header.comments, vec!["note"]);
    }

    #[test]
    fn writer_refuses_absurd_sample_indices() {
        let dir = tempfile::tempdir().unwrap();
        let ch = ChannelSpec {
            name: "a".into(),
            gain: 1.0,
            baseline: 0,
            units: "mV".into(),
            adc_resolution: 16,
            adc_zero: 0,
            samples_per_frame: 1,
        };
        let mut w = Format16Writer::create(dir.path(), "x", 1.0, vec![ch.clone()], 0, 100).unwrap();
        assert!(w.write(u64::MAX - 1, &[1, 2, 3]).is_err());
        assert!(w.write(MAX_WRITE_SAMPLE_INDEX, &[1]).is_err());
        assert!(w.write(0, &[1, 2]).is_ok());
        // A huge index is out of reach instead of gigabytes of fill.
        let far = w.write(1 << 31, &[1]);
        assert!(matches!(far, Err(WfdbError::OutOfReach { .. })), "{far:?}");
        assert!(
            w.write(102, &[3]).is_ok(),
            "a hole of 100 samples is filled"
        );
        w.finish(&[]).unwrap();
        let len = std::fs::metadata(dir.path().join("x.dat")).unwrap().len();
        assert_eq!(len, 103 * 2);
        assert!(Format16Writer::create(dir.path(), "y", f64::NAN, vec![ch], 0, 1).is_err());
    }

    #[test]
    fn text_from_the_network_cannot_break_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let ch = ChannelSpec {
            name: "II\n999 bogus.dat 16".into(),
            gain: 200.0,
            baseline: 0,
            units: "m V\r\n#".into(),
            adc_resolution: 16,
            adc_zero: 0,
            samples_per_frame: 1,
        };
        let mut w = Format16Writer::create(dir.path(), "z", 250.0, vec![ch], 5000, 10).unwrap();
        w.write(5000, &[7, 8]).unwrap();
        let hea = w.finish(&["two\nlines".into()]).unwrap();
        let text = std::fs::read_to_string(&hea).unwrap();
        assert_eq!(text.lines().count(), 4, "{text}");
        let r = read_record(&dir.path().join("z")).unwrap();
        assert_eq!(r.samples, vec![7, 8]);
        assert_eq!(r.header.signals[0].units, "m_V__#");
        assert_eq!(r.header.signals[0].description, "II 999 bogus.dat 16");
        assert_eq!(
            r.header.comments,
            vec!["first sample index 5000", "two lines"]
        );
        assert!(w_reaches_nothing_below_base(dir.path()));
    }

    fn w_reaches_nothing_below_base(dir: &Path) -> bool {
        let ch = ChannelSpec {
            name: "a".into(),
            gain: 1.0,
            baseline: 0,
            units: "mV".into(),
            adc_resolution: 16,
            adc_zero: 0,
            samples_per_frame: 1,
        };
        let mut w = Format16Writer::create(dir, "b", 1.0, vec![ch], 10, 5).unwrap();
        matches!(w.write(9, &[1]), Err(WfdbError::OutOfReach { .. })) && w.write(10, &[1]).is_ok()
    }

    #[test]
    fn writer_round_trips_a_multi_rate_record_written_group_by_group() {
        let dir = tempfile::tempdir().unwrap();
        let ch = |n: &str, spf: u32| ChannelSpec {
            name: n.into(),
            gain: 12.5,
            baseline: -3,
            units: "mmHg".into(),
            adc_resolution: 12,
            adc_zero: 0,
            samples_per_frame: spf,
        };
        // Header order a (x1), b (x2), c (x1): b's group sits between a and c in each frame.
        let chans = vec![ch("a", 1), ch("b", 2), ch("c", 1)];
        let mut w = Format16Writer::create(dir.path(), "m", 10.0, chans, 0, 100)
            .unwrap()
            .with_counter_frequency(Some(999.5));
        // b: samples 0..5 in two writes that start and end mid-frame, out of order.
        w.write_channels(&[1], 3, &[13, 14]).unwrap();
        w.write_channels(&[1], 0, &[10, 11, 12]).unwrap();
        // a and c together: frames 0..2, then frame 3 after a hole.
        w.write_channels(&[0, 2], 0, &[1, 101, 2, 102]).unwrap();
        w.write_channels(&[0, 2], 3, &[4, 104]).unwrap();
        assert!(
            w.write_channels(&[0], 5, &[1]).is_err(),
            "a channel moved group"
        );
        assert!(
            w.write_channels(&[0, 1], 5, &[1, 2]).is_err(),
            "mixed rates"
        );
        assert_eq!(w.end(), 4);
        w.finish(&[]).unwrap();
        let r = read_record(&dir.path().join("m")).unwrap();
        let inv = INVALID_SAMPLE_16;
        assert_eq!(r.frames, 4);
        assert_eq!(r.header.counter_frequency, Some(999.5));
        assert_eq!(r.signal(0).collect::<Vec<_>>(), vec![1, 2, inv, 4]);
        assert_eq!(
            r.signal(1).collect::<Vec<_>>(),
            vec![10, 11, 12, 13, 14, inv, inv, inv]
        );
        assert_eq!(r.signal(2).collect::<Vec<_>>(), vec![101, 102, inv, 104]);
        for s in 0..3 {
            assert_eq!(
                Some(r.checksum(s)),
                r.header.signals[s].checksum,
                "signal {s}"
            );
        }
        assert_eq!(r.header.signals[1].samples_per_frame, 2);
        assert_eq!(r.header.signals[1].gain, 12.5);
        assert_eq!(r.header.signals[1].baseline, -3);
        assert_eq!(r.header.signals[1].initial_value, Some(10));
    }
}
