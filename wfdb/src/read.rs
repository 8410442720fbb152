//! Reading records: every signal format of signal(5) the relay meets (8, 16, 24, 32, 61, 80,
//! 160, 212, 310, 311 and the FLAC formats 508, 516, 524), several samples per frame, skew and
//! byte offsets.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use crate::{Header, MAX_RECORD_SAMPLES, WfdbError, parse_header};

/// A whole record in memory, in frame order: frame 0 holds `samples_per_frame(s)` samples of
/// every signal `s` in turn, then frame 1... With one sample per frame for every signal (most
/// records) that is sample 0 of every signal, then sample 1...
#[derive(Debug, Clone)]
pub struct Record {
    /// The parsed header.
    pub header: Header,
    /// Samples in frame order, skew already applied.
    pub samples: Vec<i32>,
    /// Frames read (for a signal with one sample per frame, its number of samples).
    pub frames: usize,
}

/// Signals of a record sampled at one rate: the same samples per frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateGroup {
    /// Samples of each of these signals in one frame.
    pub samples_per_frame: u32,
    /// The signals (indices into the header's list), in header order.
    pub signals: Vec<usize>,
}

impl Record {
    /// Number of signals (channels).
    pub fn num_signals(&self) -> usize {
        self.header.signals.len()
    }

    /// Samples of signal `s` in each frame.
    pub fn samples_per_frame(&self, s: usize) -> usize {
        self.header
            .signals
            .get(s)
            .map_or(1, |sig| sig.samples_per_frame as usize)
    }

    /// Samples in one frame, all signals together.
    pub fn frame_width(&self) -> usize {
        (0..self.num_signals())
            .map(|s| self.samples_per_frame(s))
            .sum()
    }

    /// Whether signals differ in samples per frame.
    pub fn is_multi_rate(&self) -> bool {
        self.rate_groups().len() > 1
    }

    /// Signals grouped by samples per frame, in the order of each group's first signal.
    pub fn rate_groups(&self) -> Vec<RateGroup> {
        let mut groups: Vec<RateGroup> = Vec::new();
        for (s, sig) in self.header.signals.iter().enumerate() {
            match groups
                .iter_mut()
                .find(|g| g.samples_per_frame == sig.samples_per_frame)
            {
                Some(g) => g.signals.push(s),
                None => groups.push(RateGroup {
                    samples_per_frame: sig.samples_per_frame,
                    signals: vec![s],
                }),
            }
        }
        groups
    }

    /// Samples of signal `s` (frames times its samples per frame).
    pub fn signal_len(&self, s: usize) -> usize {
        self.frames * self.samples_per_frame(s)
    }

    fn offset(&self, s: usize) -> usize {
        (0..s).map(|k| self.samples_per_frame(k)).sum()
    }

    /// Sample `j` of signal `s`; `None` past its end.
    pub fn sample(&self, s: usize, j: usize) -> Option<i32> {
        let spf = self.samples_per_frame(s);
        let pos = (j / spf) * self.frame_width() + self.offset(s) + j % spf;
        (s < self.num_signals() && j < self.signal_len(s))
            .then(|| self.samples.get(pos).copied())
            .flatten()
    }

    /// The samples of signal `s`, in time order.
    pub fn signal(&self, s: usize) -> impl Iterator<Item = i32> + '_ {
        let spf = self.samples_per_frame(s);
        let width = self.frame_width();
        let offset = self.offset(s);
        (0..self.frames).flat_map(move |f| {
            let start = f * width + offset;
            self.samples[start..start + spf].iter().copied()
        })
    }

    /// Appends samples `first..first + count` of the signals `signals` (all with the same
    /// samples per frame) to `out`, interleaved: sample `first` of every signal, then the next.
    /// Stops early at the end of the record.
    pub fn interleaved(&self, signals: &[usize], first: usize, count: usize, out: &mut Vec<i32>) {
        let Some(&s0) = signals.first() else { return };
        let spf = self.samples_per_frame(s0);
        let width = self.frame_width();
        let offsets: Vec<usize> = signals.iter().map(|&s| self.offset(s)).collect();
        let end = first.saturating_add(count).min(self.signal_len(s0));
        for j in first..end {
            let base = (j / spf) * width + j % spf;
            out.extend(offsets.iter().map(|o| self.samples[base + o]));
        }
    }

    /// WFDB checksum of signal `s`: the sum of its samples modulo 2^16, as i16.
    pub fn checksum(&self, s: usize) -> i16 {
        checksum(self.signal(s))
    }
}

/// WFDB checksum of a sequence of samples: their sum modulo 2^16, as i16.
pub fn checksum(samples: impl Iterator<Item = i32>) -> i16 {
    samples.fold(0i16, |acc, v| acc.wrapping_add(v as i16))
}

/// The resolution (bits) a format stores when the header does not say.
pub(crate) fn default_resolution(format: u32) -> u16 {
    match format {
        8 | 80 | 508 => 8,
        212 => 12,
        310 | 311 => 10,
        24 | 524 => 24,
        32 => 32,
        _ => 16,
    }
}

/// The value a format uses for "no sample here"; skewed signals read past the end of their
/// file get it, as the WFDB library and the Python `wfdb` package do.
pub fn invalid_sample(format: u32) -> i32 {
    match format {
        8 | 80 | 508 => -128,
        212 => -2048,
        310 | 311 => -512,
        24 | 524 => -(1 << 23),
        32 => i32::MIN,
        _ => -32768,
    }
}

fn is_flac(format: u32) -> bool {
    matches!(format, 508 | 516 | 524)
}

/// Reads `<record>.hea` and every signal file it names (relative to the header's directory).
/// `record` is the path without extension, e.g. `data/ecg/100`.
pub fn read_record(record: &Path) -> Result<Record, WfdbError> {
    let hea = record.with_extension("hea");
    let text = fs::read_to_string(&hea).map_err(|source| WfdbError::Io {
        path: hea.clone(),
        source,
    })?;
    let dir = hea.parent().unwrap_or(Path::new("."));
    record_from_parts(&text, &hea, |file| {
        // A header names files beside it; never let one reach elsewhere on the disk.
        let plain = Path::new(file)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !plain {
            return Err(WfdbError::Record(
                hea.display().to_string(),
                format!("signal file {file:?} is not a plain name beside the header"),
            ));
        }
        let path = dir.join(file);
        fs::read(&path).map_err(|source| WfdbError::Io { path, source })
    })
}

/// Decodes a record from its header text and a reader for the signal files it names, so the
/// decoder can be fed from memory (fuzzing) as well as from disk.
pub fn record_from_parts(
    header_text: &str,
    header_path: &Path,
    mut signal_file: impl FnMut(&str) -> Result<Vec<u8>, WfdbError>,
) -> Result<Record, WfdbError> {
    let header = parse_header(header_text, header_path)?;
    let name = header.record_name.clone();
    let err = |msg: String| WfdbError::Record(name.clone(), msg);
    let nsig = header.signals.len();
    if nsig == 0 {
        return Err(err("record has no signals".into()));
    }
    let width: usize = header
        .signals
        .iter()
        .map(|s| s.samples_per_frame as usize)
        .sum();
    // Frames wanted: the header's count when given, bounded before anything is decoded.
    let wanted = match header.frames {
        Some(n) if n > 0 => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        _ => None,
    };
    if wanted.is_some_and(|n| n.saturating_mul(width) > MAX_RECORD_SAMPLES) {
        return Err(err("record too large".into()));
    }
    if header
        .signals
        .iter()
        .any(|s| s.skew > MAX_RECORD_SAMPLES as u64)
    {
        return Err(err("skew too large".into()));
    }
    // Signals stored in one file are interleaved in the order the header lists them.
    let mut files: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, s) in header.signals.iter().enumerate() {
        files.entry(&s.file_name).or_default().push(i);
    }
    let mut per_signal: Vec<Vec<i32>> = vec![Vec::new(); nsig];
    for (file, idx) in &files {
        let first = &header.signals[idx[0]];
        if idx.iter().any(|&i| {
            header.signals[i].format != first.format
                || header.signals[i].byte_offset != first.byte_offset
        }) {
            return Err(err(format!("signals in {file} mix formats or offsets")));
        }
        let spf: Vec<usize> = idx
            .iter()
            .map(|&i| header.signals[i].samples_per_frame as usize)
            .collect();
        // Enough file frames for the wanted frames plus the largest skew in this file.
        let max_skew = idx
            .iter()
            .map(|&i| usize::try_from(header.signals[i].skew).unwrap_or(usize::MAX))
            .max()
            .unwrap_or(0);
        let file_width: usize = spf.iter().sum();
        let limit = wanted
            .map_or(MAX_RECORD_SAMPLES, |n| {
                n.saturating_add(max_skew).saturating_mul(file_width)
            })
            .min(MAX_RECORD_SAMPLES);
        let bytes = signal_file(file)?;
        if is_flac(first.format) {
            decode_flac(
                first.format,
                first.byte_offset,
                &bytes,
                idx,
                &spf,
                limit,
                &mut per_signal,
            )
            .map_err(|msg| err(format!("{file}: {msg}")))?;
        } else {
            let start = usize::try_from(first.byte_offset).unwrap_or(usize::MAX);
            let body = bytes.get(start..).unwrap_or_default();
            let flat = decode(first.format, body, limit)?;
            let initial: Vec<i32> = idx
                .iter()
                .map(|&i| header.signals[i].initial_value.unwrap_or(0))
                .collect();
            distribute(first.format, &flat, idx, &spf, &initial, &mut per_signal);
        }
    }
    // Frames the files hold for every signal once its skew is taken off.
    let available = header
        .signals
        .iter()
        .zip(&per_signal)
        .map(|(s, v)| v.len() / s.samples_per_frame as usize)
        .min()
        .unwrap_or(0);
    let frames = match wanted {
        Some(n) if n > available => {
            return Err(err(format!(
                "header announces {n} samples per signal, files hold {available}"
            )));
        }
        Some(n) => n,
        None => available,
    };
    if frames.saturating_mul(width) > MAX_RECORD_SAMPLES {
        return Err(err("record too large".into()));
    }
    let mut samples = Vec::with_capacity(frames * width);
    for f in 0..frames {
        for (s, sig) in header.signals.iter().enumerate() {
            let spf = sig.samples_per_frame as usize;
            let skew = usize::try_from(sig.skew).unwrap_or(usize::MAX);
            let start = f.saturating_add(skew).saturating_mul(spf);
            let invalid = invalid_sample(sig.format);
            samples.extend(
                (start..start + spf).map(|j| per_signal[s].get(j).copied().unwrap_or(invalid)),
            );
        }
    }
    Ok(Record {
        header,
        samples,
        frames,
    })
}

/// Splits a file's flat sample sequence into its signals, frame by frame. Format 8 stores
/// first differences, summed here from each signal's initial value.
fn distribute(
    format: u32,
    flat: &[i32],
    idx: &[usize],
    spf: &[usize],
    initial: &[i32],
    per_signal: &mut [Vec<i32>],
) {
    let file_width: usize = spf.iter().sum();
    let mut last = initial.to_vec();
    for frame in flat.chunks_exact(file_width.max(1)) {
        let mut at = 0;
        for (k, &s) in idx.iter().enumerate() {
            for &v in &frame[at..at + spf[k]] {
                let v = if format == 8 {
                    last[k] = last[k].saturating_add(v);
                    last[k]
                } else {
                    v
                };
                per_signal[s].push(v);
            }
            at += spf[k];
        }
    }
}

/// Decodes at most `limit` samples of a non-FLAC signal file body into one flat sequence.
pub(crate) fn decode(format: u32, body: &[u8], limit: usize) -> Result<Vec<i32>, WfdbError> {
    let le16 = |c: &[u8]| i16::from_le_bytes([c[0], c[1]]) as i32;
    let mut out: Vec<i32> = match format {
        8 | 80 => body
            .iter()
            .take(limit)
            .map(|&b| {
                if format == 8 {
                    b as i8 as i32
                } else {
                    b as i32 - 128
                }
            })
            .collect(),
        16 => body.chunks_exact(2).take(limit).map(le16).collect(),
        61 => body
            .chunks_exact(2)
            .take(limit)
            .map(|c| i16::from_be_bytes([c[0], c[1]]) as i32)
            .collect(),
        160 => body
            .chunks_exact(2)
            .take(limit)
            .map(|c| u16::from_le_bytes([c[0], c[1]]) as i32 - 32768)
            .collect(),
        24 => body
            .chunks_exact(3)
            .take(limit)
            .map(|c| i32::from_le_bytes([0, c[0], c[1], c[2]]) >> 8)
            .collect(),
        32 => body
            .chunks_exact(4)
            .take(limit)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        212 => {
            // Two 12-bit samples in three bytes; a last odd sample takes two bytes.
            let mut out = Vec::with_capacity((body.len() / 3 * 2).min(limit));
            for c in body.chunks(3) {
                let b = |i: usize| c.get(i).copied().unwrap_or(0) as i32;
                if c.len() >= 2 {
                    out.push(sign_extend(b(0) | ((b(1) & 0x0f) << 8), 12));
                }
                if c.len() == 3 {
                    out.push(sign_extend(b(2) | ((b(1) & 0xf0) << 4), 12));
                }
                if out.len() >= limit {
                    break;
                }
            }
            out
        }
        310 | 311 => {
            // Three 10-bit samples in four bytes; a partial last group holds one or two.
            let mut out = Vec::with_capacity((body.len() / 4 * 3).min(limit));
            for c in body.chunks(4) {
                let b = |i: usize| c.get(i).copied().unwrap_or(0) as i32;
                let three = if format == 310 {
                    [
                        (b(0) >> 1) | ((b(1) & 0x07) << 7),
                        (b(2) >> 1) | ((b(3) & 0x07) << 7),
                        ((b(1) >> 3) & 0x1f) | (((b(3) >> 3) & 0x1f) << 5),
                    ]
                } else {
                    [
                        b(0) | ((b(1) & 0x03) << 8),
                        (b(1) >> 2) | ((b(2) & 0x0f) << 6),
                        (b(2) >> 4) | ((b(3) & 0x7f) << 4),
                    ]
                };
                // Bytes needed for the first one, two, three samples of a group.
                let complete = if format == 310 { [2, 4, 4] } else { [2, 3, 4] };
                for (v, need) in three.into_iter().zip(complete) {
                    if c.len() >= need {
                        out.push(sign_extend(v, 10));
                    }
                }
                if out.len() >= limit {
                    break;
                }
            }
            out
        }
        other => return Err(WfdbError::UnsupportedFormat(other)),
    };
    out.truncate(limit);
    Ok(out)
}

fn sign_extend(v: i32, bits: u32) -> i32 {
    let shift = 32 - bits;
    (v << shift) >> shift
}

/// Decodes a FLAC signal file (formats 508/516/524): one FLAC channel per signal of the file,
/// all with the same samples per frame; `sample_offset` samples per channel are skipped.
#[allow(clippy::too_many_arguments)]
fn decode_flac(
    format: u32,
    sample_offset: u64,
    bytes: &[u8],
    idx: &[usize],
    spf: &[usize],
    limit: usize,
    per_signal: &mut [Vec<i32>],
) -> Result<(), String> {
    if spf.iter().any(|&s| s != spf[0]) {
        return Err("signals of a FLAC file must have the same samples per frame".into());
    }
    let mut reader = claxon::FlacReader::new(bytes).map_err(|e| format!("FLAC: {e}"))?;
    let info = reader.streaminfo();
    if info.channels as usize != idx.len() {
        return Err(format!(
            "FLAC stream has {} channels, the header {} signals",
            info.channels,
            idx.len()
        ));
    }
    let max_bits = format - 500;
    if info.bits_per_sample > max_bits {
        return Err(format!(
            "FLAC stream has {} bits per sample, format {format} at most {max_bits}",
            info.bits_per_sample
        ));
    }
    let skip = usize::try_from(sample_offset)
        .unwrap_or(usize::MAX)
        .saturating_mul(idx.len());
    let n = idx.len();
    for (k, sample) in reader.samples().enumerate() {
        let v = sample.map_err(|e| format!("FLAC: {e}"))?;
        if k < skip {
            continue;
        }
        let k = k - skip;
        if k >= limit {
            break;
        }
        per_signal[idx[k % n]].push(v);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn data(dir: &str, name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../data")
            .join(dir)
            .join(name)
    }

    #[test]
    fn decodes_every_packed_format() {
        // 212: samples 0x123 and -1 (0xfff): bytes 0x23, (0xf << 4) | 0x1, 0xff
        assert_eq!(
            decode(212, &[0x23, 0xf1, 0xff], 9).unwrap(),
            vec![0x123, -1]
        );
        // an odd last sample takes two bytes
        assert_eq!(
            decode(212, &[0x23, 0xf1, 0xff, 0x05, 0x00], 9).unwrap(),
            vec![0x123, -1, 5]
        );
        // 310: s0 = 5, s1 = -1 (0x3ff), s2 = 0x155: w0 = (s0 << 1) | (s2 & 0x1f) << 11,
        // w1 = (s1 << 1) | (s2 >> 5) << 11
        let (s0, s1, s2) = (5u16, 0x3ffu16, 0x155u16);
        let w0 = (s0 << 1) | ((s2 & 0x1f) << 11);
        let w1 = (s1 << 1) | ((s2 >> 5) << 11);
        let mut b = w0.to_le_bytes().to_vec();
        b.extend(w1.to_le_bytes());
        assert_eq!(decode(310, &b, 9).unwrap(), vec![5, -1, 0x155]);
        // 311: one little-endian word, 10 bits each from the bottom
        let w = 5u32 | (0x3ff << 10) | (0x0aa << 20);
        assert_eq!(decode(311, &w.to_le_bytes(), 9).unwrap(), vec![5, -1, 0xaa]);
        assert_eq!(decode(311, &w.to_le_bytes()[..3], 9).unwrap(), vec![5, -1]);
        assert_eq!(
            decode(61, &[0xff, 0xfe, 0x01, 0x00], 9).unwrap(),
            vec![-2, 256]
        );
        assert_eq!(decode(80, &[0, 128, 255], 9).unwrap(), vec![-128, 0, 127]);
        assert_eq!(decode(160, &[0, 0, 0, 0x80], 9).unwrap(), vec![-32768, 0]);
        assert_eq!(
            decode(24, &[0xff, 0xff, 0xff, 1, 0, 0], 9).unwrap(),
            vec![-1, 1]
        );
        assert_eq!(decode(32, &(-7i32).to_le_bytes(), 9).unwrap(), vec![-7]);
        assert_eq!(decode(16, &[1, 0, 2, 0, 3, 0], 2).unwrap(), vec![1, 2]);
        assert!(matches!(
            decode(0, &[], 9),
            Err(WfdbError::UnsupportedFormat(0))
        ));
    }

    #[test]
    fn format_8_sums_differences_from_the_initial_value() {
        let text = "d 2 100 3\nd.dat 8 200 8 0 10 0 0 a\nd.dat 8 200 8 0 -3 0 0 b\n";
        let body = vec![0u8, 0, 1, 0xff, 2, 0xfe];
        let r = record_from_parts(text, Path::new("d.hea"), |_| Ok(body.clone())).unwrap();
        assert_eq!(r.signal(0).collect::<Vec<_>>(), vec![10, 11, 13]);
        assert_eq!(r.signal(1).collect::<Vec<_>>(), vec![-3, -4, -6]);
    }

    #[test]
    fn several_samples_per_frame_skew_and_offset() {
        // Frame: a (x2), b (x1). b is skewed by one frame; the file starts after 2 bytes.
        let text = "r 2 10 3\nr.dat 16x2+2 1 16 0 0 0 0 a\nr.dat 16:1+2 1 16 0 0 0 0 b\n";
        let mut body = vec![0xaa, 0xbb];
        for v in [1i16, 2, 100, 3, 4, 101, 5, 6, 102] {
            body.extend(v.to_le_bytes());
        }
        let r = record_from_parts(text, Path::new("r.hea"), |_| Ok(body.clone())).unwrap();
        assert_eq!(r.frames, 3);
        assert_eq!(r.frame_width(), 3);
        assert!(r.is_multi_rate());
        assert_eq!(r.signal(0).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5, 6]);
        // b's first stored sample belongs to frame -1; past the end it is invalid
        assert_eq!(r.signal(1).collect::<Vec<_>>(), vec![101, 102, -32768]);
        assert_eq!(r.sample(0, 5), Some(6));
        assert_eq!(r.sample(0, 6), None);
        let mut out = Vec::new();
        r.interleaved(&[0], 3, 10, &mut out);
        assert_eq!(out, vec![4, 5, 6]);
        assert_eq!(
            r.rate_groups(),
            vec![
                RateGroup {
                    samples_per_frame: 2,
                    signals: vec![0]
                },
                RateGroup {
                    samples_per_frame: 1,
                    signals: vec![1]
                }
            ]
        );
    }

    #[test]
    fn record_100_checksums_match_header() {
        let r = read_record(&data("ecg", "100")).unwrap();
        assert_eq!(r.frames, 650_000);
        assert_eq!(&r.samples[..2], &[995, 1011]);
        for s in 0..2 {
            assert_eq!(Some(r.checksum(s)), r.header.signals[s].checksum);
        }
    }

    #[test]
    fn record_s0010_multi_file_checksums_match_header() {
        let r = read_record(&data("ecg", "s0010_re")).unwrap();
        assert_eq!(r.num_signals(), 15);
        assert_eq!(r.frames, 38_400);
        for s in 0..15 {
            assert_eq!(
                Some(r.checksum(s)),
                r.header.signals[s].checksum,
                "signal {s}"
            );
            assert_eq!(Some(r.samples[s]), r.header.signals[s].initial_value);
        }
        assert_eq!(r.header.signals[12].file_name, "s0010_re.xyz");
    }

    #[test]
    fn flac_multi_rate_record_checksums_match_header() {
        // Three FLAC files at 4, 2 and 1 samples per frame (PhysioNet's wfdb-python test data).
        let r = read_record(&data("ecg-multirate", "mixedsignals")).unwrap();
        assert_eq!(r.frames, 14_400);
        assert_eq!(r.header.counter_frequency, Some(999.56));
        let spf: Vec<usize> = (0..6).map(|s| r.samples_per_frame(s)).collect();
        assert_eq!(spf, vec![4, 4, 4, 2, 2, 1]);
        for (s, k) in spf.into_iter().enumerate() {
            assert_eq!(r.signal(s).count(), 14_400 * k);
            assert_eq!(
                Some(r.checksum(s)),
                r.header.signals[s].checksum,
                "signal {s}"
            );
        }
        assert_eq!(r.rate_groups().len(), 3);
    }

    #[test]
    fn skewed_record_pads_with_the_invalid_value() {
        let plain = read_record(&data("ecg-multirate", "test01_00s_frame")).unwrap();
        let skewed = read_record(&data("ecg-multirate", "test01_00s_skewframe")).unwrap();
        for s in 0..3 {
            assert_eq!(Some(plain.checksum(s)), plain.header.signals[s].checksum);
        }
        assert_eq!(plain.signal(1).count(), 8000);
        let a: Vec<i32> = plain.signal(0).collect();
        let b: Vec<i32> = skewed.signal(0).collect();
        assert_eq!(&b[..3997], &a[3..]);
        assert_eq!(&b[3997..], &[-32768; 3]);
        assert!(plain.signal(1).eq(skewed.signal(1)));
    }

    #[test]
    fn flac_bombs_and_bad_streams_are_refused() {
        let text = "f 1 100 10\nf.dat 516 200 16 0 0 0 0 a\n";
        let r = record_from_parts(text, Path::new("f.hea"), |_| Ok(b"fLaC garbage".to_vec()));
        assert!(r.is_err());
        // A real stream of three channels named as one signal.
        let flac = std::fs::read(data("ecg-multirate", "mixedsignals_e.dat")).unwrap();
        let r = record_from_parts(text, Path::new("f.hea"), |_| Ok(flac.clone()));
        let e = r.unwrap_err().to_string();
        assert!(e.contains("3 channels"), "{e}");
        // ... and as 8-bit samples, which it is not.
        let text = "f 3 100 10\nf.dat 508 200\nf.dat 508 200\nf.dat 508 200\n";
        let e = record_from_parts(text, Path::new("f.hea"), |_| Ok(flac.clone())).unwrap_err();
        assert!(e.to_string().contains("bits per sample"), "{e}");
    }
}
