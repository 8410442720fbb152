//! Header files (`.hea`): the record line and one line per signal, as header(5) describes.

use std::path::Path;

use crate::WfdbError;

#[derive(Debug, Clone, PartialEq)]
/// One signal line of a header: where its samples are and how to turn them into physical units.
pub struct SignalSpec {
    /// Data file holding the signal's samples.
    pub file_name: String,
    /// Storage format (16, 212, 516, ...).
    pub format: u32,
    /// Samples of this signal in each frame (the `x` of `16x4`; 1 when absent).
    pub samples_per_frame: u32,
    /// Frames by which the signal's samples are delayed in the file (the `:` of `16:3`).
    pub skew: u64,
    /// Bytes to skip at the start of the data file (samples per channel for FLAC formats).
    pub byte_offset: u64,
    /// ADC units per physical unit.
    pub gain: f64,
    /// ADC value of physical zero.
    pub baseline: i32,
    /// Physical units (e.g. mV).
    pub units: String,
    /// ADC resolution, bits.
    pub adc_resolution: u32,
    /// ADC output for an input of zero volts.
    pub adc_zero: i32,
    /// Value of the first sample, when given.
    pub initial_value: Option<i32>,
    /// 16-bit checksum of all samples, when given.
    pub checksum: Option<i16>,
    /// Block size of the data file (0: not blocked).
    pub block_size: u32,
    /// Signal description, usually the lead name.
    pub description: String,
}

#[derive(Debug, Clone, PartialEq)]
/// A record header: its name, rate, length and signals.
pub struct Header {
    /// Record name (the file stem).
    pub record_name: String,
    /// Frames per second; a signal's rate is this times its samples per frame.
    pub sampling_frequency: f64,
    /// Counter ("tick") frequency, when given after the frame rate (`62.47/999.56`).
    pub counter_frequency: Option<f64>,
    /// Frames in the record (header(5) calls it samples per signal), when given.
    pub frames: Option<u64>,
    /// The signals, in the order of their lines.
    pub signals: Vec<SignalSpec>,
    /// Comment lines (without `#`).
    pub comments: Vec<String>,
}

/// Samples per frame at most: 1,000 Hz at a frame rate of 1 Hz is already extreme.
pub const MAX_SAMPLES_PER_FRAME: u32 = 4096;

fn header_err(path: &Path, line: usize, msg: impl Into<String>) -> WfdbError {
    WfdbError::Header {
        path: path.to_owned(),
        line,
        msg: msg.into(),
    }
}

fn positive(v: f64) -> Option<f64> {
    (v.is_finite() && v > 0.0).then_some(v)
}

/// Parses header text. Comment lines (`#`) and blank lines may appear anywhere.
pub fn parse_header(text: &str, path: &Path) -> Result<Header, WfdbError> {
    let mut comments = Vec::new();
    let mut lines = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let t = raw.trim();
        if let Some(c) = t.strip_prefix('#') {
            comments.push(c.trim().to_owned());
        } else if !t.is_empty() {
            lines.push((i + 1, t));
        }
    }
    let (rec_line_no, rec_line) = *lines
        .first()
        .ok_or_else(|| header_err(path, 0, "no record line"))?;
    let mut f = rec_line.split_whitespace();
    let name_field = f.next().unwrap_or_default();
    if name_field.contains('/') {
        return Err(header_err(
            path,
            rec_line_no,
            "multi-segment records are not supported",
        ));
    }
    let nsig: usize = f
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| header_err(path, rec_line_no, "missing or invalid number of signals"))?;
    // `fs[/counter[(base)]]`
    let fs_field = f.next().unwrap_or("250");
    let (fs_str, counter) = match fs_field.split_once('/') {
        Some((a, c)) => (a, Some(c.split('(').next().unwrap_or(c))),
        None => (fs_field, None),
    };
    let bad_fs = || {
        header_err(
            path,
            rec_line_no,
            format!("bad sampling frequency {fs_field:?}"),
        )
    };
    let sampling_frequency = fs_str
        .split('(')
        .next()
        .and_then(|s| s.parse().ok())
        .and_then(positive)
        .ok_or_else(bad_fs)?;
    let counter_frequency = match counter {
        Some(c) => Some(c.parse().ok().and_then(positive).ok_or_else(bad_fs)?),
        None => None,
    };
    let frames = match f.next() {
        Some(s) => Some(
            s.parse()
                .map_err(|_| header_err(path, rec_line_no, format!("bad sample count {s:?}")))?,
        ),
        None => None,
    };
    // `lines` holds the record line, so this cannot underflow; `1 + nsig` could overflow.
    if lines.len() - 1 < nsig {
        return Err(header_err(
            path,
            rec_line_no,
            format!(
                "{nsig} signals announced, {} signal lines found",
                lines.len() - 1
            ),
        ));
    }
    let mut signals = Vec::with_capacity(nsig);
    for &(no, line) in &lines[1..1 + nsig] {
        signals.push(parse_signal_line(line, path, no)?);
    }
    Ok(Header {
        record_name: name_field.to_owned(),
        sampling_frequency,
        counter_frequency,
        frames,
        signals,
        comments,
    })
}

/// The format field: `format[xspf][:skew][+offset]`, the three modifiers in any order.
fn parse_format_field(
    field: &str,
    path: &Path,
    no: usize,
) -> Result<(u32, u32, u64, u64), WfdbError> {
    let bad = || header_err(path, no, format!("bad format {field:?}"));
    let end = field
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(field.len());
    let format: u32 = field[..end].parse().map_err(|_| bad())?;
    let (mut spf, mut skew, mut offset) = (1u32, 0u64, 0u64);
    let mut rest = &field[end..];
    while let Some(marker) = rest.chars().next() {
        let tail = &rest[marker.len_utf8()..];
        let len = tail
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(tail.len());
        let value = &tail[..len];
        match marker {
            'x' => spf = value.parse().map_err(|_| bad())?,
            ':' => skew = value.parse().map_err(|_| bad())?,
            '+' => {
                offset = value
                    .parse()
                    .map_err(|_| header_err(path, no, format!("bad byte offset {value:?}")))?
            }
            _ => return Err(bad()),
        }
        rest = &tail[len..];
    }
    if spf == 0 || spf > MAX_SAMPLES_PER_FRAME {
        return Err(header_err(
            path,
            no,
            format!("samples per frame {spf} outside 1..={MAX_SAMPLES_PER_FRAME}"),
        ));
    }
    Ok((format, spf, skew, offset))
}

pub(crate) fn parse_signal_line(
    line: &str,
    path: &Path,
    no: usize,
) -> Result<SignalSpec, WfdbError> {
    let mut f = line
        .splitn(9, char::is_whitespace)
        .filter(|s| !s.is_empty());
    let file_name = f
        .next()
        .ok_or_else(|| header_err(path, no, "missing file name"))?
        .to_owned();
    let fmt_field = f
        .next()
        .ok_or_else(|| header_err(path, no, "missing format"))?;
    let (format, samples_per_frame, skew, byte_offset) = parse_format_field(fmt_field, path, no)?;
    let default_res = crate::read::default_resolution(format);
    let mut gain = 200.0;
    let mut baseline = None;
    let mut units = "mV".to_owned();
    if let Some(g) = f.next() {
        let (g, rest_units) = match g.split_once('/') {
            Some((a, u)) => (a, Some(u)),
            None => (g, None),
        };
        let (g, base) = match g.split_once('(') {
            Some((a, b)) => (a, Some(b.trim_end_matches(')'))),
            None => (g, None),
        };
        gain = g
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite())
            .ok_or_else(|| header_err(path, no, format!("bad gain {g:?}")))?;
        if gain == 0.0 {
            gain = 200.0; // WFDB: 0 means uncalibrated, use the default
        }
        if let Some(b) = base {
            baseline = Some(
                b.parse()
                    .map_err(|_| header_err(path, no, format!("bad baseline {b:?}")))?,
            );
        }
        if let Some(u) = rest_units {
            units = u.to_owned();
        }
    }
    let mut next_num = |what: &str| -> Result<Option<i64>, WfdbError> {
        match f.next() {
            Some(s) => s
                .parse()
                .map(Some)
                .map_err(|_| header_err(path, no, format!("bad {what} {s:?}"))),
            None => Ok(None),
        }
    };
    let adc_resolution = next_num("ADC resolution")?.unwrap_or(default_res.into()) as u32;
    let adc_zero = next_num("ADC zero")?.unwrap_or(0) as i32;
    let initial_value = next_num("initial value")?.map(|v| v as i32);
    // Checksums are 16-bit; headers write them signed or unsigned.
    let checksum = next_num("checksum")?.map(|v| v as i16);
    let block_size = next_num("block size")?.unwrap_or(0) as u32;
    let description = f.collect::<Vec<_>>().join(" ");
    Ok(SignalSpec {
        file_name,
        format,
        samples_per_frame,
        skew,
        byte_offset,
        gain,
        baseline: baseline.unwrap_or(adc_zero),
        units,
        adc_resolution: if adc_resolution == 0 {
            default_res.into()
        } else {
            adc_resolution
        },
        adc_zero,
        initial_value,
        checksum,
        block_size,
        description,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_header_with_comments_and_blank_lines() {
        let text = "# leading comment\n100 2 360 650000\n100.dat 212 200 11 1024 995 -22131 0 MLII\n\n100.dat 212 200 11 1024 1011 20052 0 V5\n# 69 M\n";
        let h = parse_header(text, Path::new("100.hea")).unwrap();
        assert_eq!(h.signals.len(), 2);
        assert_eq!(h.sampling_frequency, 360.0);
        assert_eq!(h.counter_frequency, None);
        assert_eq!(h.frames, Some(650_000));
        assert_eq!(h.signals[0].baseline, 1024);
        assert_eq!(h.signals[0].units, "mV");
        assert_eq!(h.signals[0].samples_per_frame, 1);
        assert_eq!(h.signals[1].checksum, Some(20052));
        assert_eq!(h.signals[1].description, "V5");
        assert_eq!(h.comments, vec!["leading comment", "69 M"]);
    }

    #[test]
    fn parses_gain_baseline_units_and_offset() {
        let s = parse_signal_line(
            "x.dat 16+24 2000(-5)/uV 16 3 7 -9 0 lead I",
            Path::new("x"),
            2,
        )
        .unwrap();
        assert_eq!((s.byte_offset, s.gain, s.baseline), (24, 2000.0, -5));
        assert_eq!(s.units, "uV");
        assert_eq!(s.description, "lead I");
    }

    #[test]
    fn parses_samples_per_frame_skew_offset_and_counter_frequency() {
        let h = parse_header(
            "m 2 62.4725/999.56(12) 14400\nm_e.dat 516x4:3+8 200/mV 14 8192 0 49347 0 II\nm_r.dat 516 4093(2)/Ohm 12 2048 0 35395 0 Resp\n",
            Path::new("m.hea"),
        )
        .unwrap();
        assert_eq!(h.sampling_frequency, 62.4725);
        assert_eq!(h.counter_frequency, Some(999.56));
        let s = &h.signals[0];
        assert_eq!(
            (s.format, s.samples_per_frame, s.skew, s.byte_offset),
            (516, 4, 3, 8)
        );
        // An unsigned checksum above 32767 is the same 16 bits.
        assert_eq!(s.checksum, Some(49347u16 as i16));
        assert_eq!(h.signals[1].gain, 4093.0);
        assert_eq!(h.signals[1].baseline, 2);
        assert_eq!(h.signals[1].units, "Ohm");
        let t = parse_signal_line("x.dat 16:3x2 1.5/mmHg", Path::new("x"), 2).unwrap();
        assert_eq!((t.samples_per_frame, t.skew, t.gain), (2, 3, 1.5));
    }

    #[test]
    fn rejects_bad_headers_with_a_clear_error() {
        for bad in [
            "",
            "rec",
            "rec 2 360\nx.dat 16\n",
            "rec 1 abc\nx.dat 16\n",
            "rec 1 360/0\nx.dat 16\n",
            "rec 1 360\nx.dat 16 g\n",
            "rec 1 360\nx.dat 16x0\n",
            "rec 1 360\nx.dat 16x99999\n",
            "rec 1 360\nx.dat 16y2\n",
            // Found by the fuzz corpus: a multi-byte character after the format number.
            "rec 1 360\nx.dat 16\u{e9}2\n",
            "rec 1 360\nx.dat 16 inf\n",
            // Found by libFuzzer: a signal count of usize::MAX overflowed the line check.
            "rec 18446744073709551615\n",
        ] {
            let err = parse_header(bad, Path::new("bad.hea")).unwrap_err();
            assert!(err.to_string().contains("bad.hea"), "{err}");
        }
    }

    #[test]
    fn arbitrary_header_text_never_panics() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let alphabet = b"0123456789 ./+()x:#-abcdefmV\n\t";
        for _ in 0..2000 {
            let len = (seed % 120) as usize;
            let text: String = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    alphabet[(seed % alphabet.len() as u64) as usize] as char
                })
                .collect();
            let _ = parse_header(&text, Path::new("fuzz.hea"));
        }
    }
}
