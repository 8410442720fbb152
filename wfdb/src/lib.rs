//! PhysioNet WFDB records: header parsing, reading formats 212 and 16, writing format 16.
//!
//! A crate of its own because both ends need it and neither protocol crate should: the agent
//! replays records and the ED client writes what it received back out. Plain synchronous file
//! I/O, no dependency but thiserror. Specification: WFDB "header(5)" and "signal(5)".
#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Refuse records whose samples would not fit comfortably in memory on a router.
pub const MAX_RECORD_SAMPLES: usize = 200_000_000;
/// Highest sample index (per channel) a writer accepts: 2^32 samples is 49 days at 1000 Hz.
/// Bounds the file a malicious or corrupt index could make the writer create.
pub const MAX_WRITE_SAMPLE_INDEX: u64 = 1 << 32;
/// Format 16's "no sample here" value, written for every sample the relay never received.
pub const INVALID_SAMPLE_16: i32 = -32768;

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
    #[error("signal format {0} is not supported (supported: 16, 212)")]
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

#[derive(Debug, Clone, PartialEq)]
/// One signal line of a header: where its samples are and how to turn them into physical units.
pub struct SignalSpec {
    /// Data file holding the signal's samples.
    pub file_name: String,
    /// Storage format (16, 212, ...).
    pub format: u32,
    /// Bytes to skip at the start of the data file.
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
    /// Samples per second per signal.
    pub sampling_frequency: f64,
    /// Samples per signal, when given.
    pub samples_per_signal: Option<u64>,
    /// The signals, in the order of their lines.
    pub signals: Vec<SignalSpec>,
    /// Comment lines (without `#`).
    pub comments: Vec<String>,
}

/// A whole record in memory: `samples` interleaved, sample 0 of every signal, then sample 1...
#[derive(Debug, Clone)]
pub struct Record {
    /// The parsed header.
    pub header: Header,
    /// Samples, interleaved by signal.
    pub samples: Vec<i32>,
    /// Samples per signal actually read.
    pub samples_per_signal: usize,
}

impl Record {
    /// Number of signals (channels).
    pub fn num_signals(&self) -> usize {
        self.header.signals.len()
    }

    /// WFDB checksum of signal `s`: the sum of its samples modulo 2^16, as i16.
    pub fn checksum(&self, s: usize) -> i16 {
        checksum(
            self.samples
                .iter()
                .skip(s)
                .step_by(self.num_signals().max(1))
                .copied(),
        )
    }
}

/// WFDB checksum of a sequence of samples: their sum modulo 2^16, as i16.
pub fn checksum(samples: impl Iterator<Item = i32>) -> i16 {
    samples.fold(0i16, |acc, v| acc.wrapping_add(v as i16))
}

fn header_err(path: &Path, line: usize, msg: impl Into<String>) -> WfdbError {
    WfdbError::Header {
        path: path.to_owned(),
        line,
        msg: msg.into(),
    }
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
    let fs_field = f.next().unwrap_or("250");
    let fs_str = fs_field.split(['/', '(']).next().unwrap_or(fs_field);
    let sampling_frequency: f64 = fs_str
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite() && *v > 0.0)
        .ok_or_else(|| {
            header_err(
                path,
                rec_line_no,
                format!("bad sampling frequency {fs_field:?}"),
            )
        })?;
    let samples_per_signal = match f.next() {
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
        samples_per_signal,
        signals,
        comments,
    })
}

fn parse_signal_line(line: &str, path: &Path, no: usize) -> Result<SignalSpec, WfdbError> {
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
    let (fmt_main, byte_offset) = match fmt_field.split_once('+') {
        Some((a, b)) => (
            a,
            b.parse()
                .map_err(|_| header_err(path, no, format!("bad byte offset {b:?}")))?,
        ),
        None => (fmt_field, 0),
    };
    if fmt_main.contains('x') {
        return Err(header_err(
            path,
            no,
            "multi-frequency signals are not supported",
        ));
    }
    let fmt_num = fmt_main.split(':').next().unwrap_or(fmt_main);
    let format: u32 = fmt_num
        .parse()
        .map_err(|_| header_err(path, no, format!("bad format {fmt_field:?}")))?;
    let default_res = match format {
        212 => 12,
        _ => 16,
    };
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
            .map_err(|_| header_err(path, no, format!("bad gain {g:?}")))?;
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
    let adc_resolution = next_num("ADC resolution")?.unwrap_or(default_res) as u32;
    let adc_zero = next_num("ADC zero")?.unwrap_or(0) as i32;
    let initial_value = next_num("initial value")?.map(|v| v as i32);
    let checksum = next_num("checksum")?.map(|v| v as i16);
    let block_size = next_num("block size")?.unwrap_or(0) as u32;
    let description = f.collect::<Vec<_>>().join(" ");
    Ok(SignalSpec {
        file_name,
        format,
        byte_offset,
        gain,
        baseline: baseline.unwrap_or(adc_zero),
        units,
        adc_resolution: if adc_resolution == 0 {
            default_res as u32
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
    let nsig = header.signals.len();
    if nsig == 0 {
        return Err(WfdbError::Record(
            header.record_name,
            "record has no signals".into(),
        ));
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
            return Err(WfdbError::Record(
                header.record_name.clone(),
                format!("signals in {file} mix formats or offsets"),
            ));
        }
        let bytes = signal_file(file)?;
        let start = usize::try_from(first.byte_offset).unwrap_or(usize::MAX);
        let body = bytes.get(start..).unwrap_or_default();
        let decoded = decode(first.format, body)?;
        let width = idx.len();
        for (k, v) in decoded.into_iter().enumerate() {
            per_signal[idx[k % width]].push(v);
        }
    }
    let available = per_signal.iter().map(Vec::len).min().unwrap_or(0);
    let n = match header.samples_per_signal {
        Some(n) if n > 0 => {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            if n > available {
                return Err(WfdbError::Record(
                    header.record_name.clone(),
                    format!("header announces {n} samples per signal, files hold {available}"),
                ));
            }
            n
        }
        _ => available,
    };
    if n.saturating_mul(nsig) > MAX_RECORD_SAMPLES {
        return Err(WfdbError::Record(
            header.record_name.clone(),
            "record too large".into(),
        ));
    }
    let mut samples = Vec::with_capacity(n * nsig);
    for t in 0..n {
        for sig in &per_signal {
            samples.push(sig[t]);
        }
    }
    Ok(Record {
        header,
        samples,
        samples_per_signal: n,
    })
}

fn decode(format: u32, body: &[u8]) -> Result<Vec<i32>, WfdbError> {
    match format {
        16 => Ok(body
            .chunks_exact(2)
            .map(|c| i16::from_le_bytes([c[0], c[1]]) as i32)
            .collect()),
        212 => {
            let mut out = Vec::with_capacity(body.len() / 3 * 2);
            for c in body.chunks_exact(3) {
                let a = (c[0] as i32) | (((c[1] as i32) & 0x0f) << 8);
                let b = (c[2] as i32) | (((c[1] as i32) & 0xf0) << 4);
                out.push(sign_extend_12(a));
                out.push(sign_extend_12(b));
            }
            Ok(out)
        }
        other => Err(WfdbError::UnsupportedFormat(other)),
    }
}

fn sign_extend_12(v: i32) -> i32 {
    if v & 0x800 != 0 { v - 0x1000 } else { v }
}

/// What a written channel looks like in the header.
#[derive(Debug, Clone)]
pub struct ChannelSpec {
    /// Lead or channel name (the header's description field).
    pub name: String,
    /// ADC units per physical unit.
    pub gain: f64,
    /// ADC value of physical zero.
    pub baseline: i32,
    /// Physical units.
    pub units: String,
    /// ADC resolution, bits.
    pub adc_resolution: u32,
    /// ADC output for zero volts.
    pub adc_zero: i32,
}

/// Writes one record in format 16 as samples arrive, in any order (a late frame lands at its
/// sample index); samples never received are written as [`INVALID_SAMPLE_16`] on `finish`.
#[derive(Debug)]
pub struct Format16Writer {
    dir: PathBuf,
    name: String,
    fs: f64,
    channels: Vec<ChannelSpec>,
    file: fs::File,
    /// Sample index stored at the start of the file.
    base: u64,
    /// Holes longer than this (samples) are refused rather than filled.
    max_gap: u64,
    /// Received sample-index ranges [start, end), merged.
    filled: BTreeMap<u64, u64>,
    sums: Vec<i16>,
    first_values: Vec<Option<i32>>,
}

impl Format16Writer {
    /// Creates `<dir>/<name>.dat` and the writer for it; the header is written on `finish`.
    /// The file starts at sample index `base`; a write that would leave a hole of more than
    /// `max_gap` samples after what it holds is refused with [`WfdbError::OutOfReach`], so
    /// no index, however large, makes the writer fill more than that. Text that would break
    /// the header (whitespace in units, line breaks anywhere) is replaced.
    pub fn create(
        dir: &Path,
        name: &str,
        fs: f64,
        channels: Vec<ChannelSpec>,
        base: u64,
        max_gap: u64,
    ) -> Result<Self, WfdbError> {
        let io = |source| WfdbError::Io {
            path: dir.to_owned(),
            source,
        };
        let bad = |what: &str| Err(WfdbError::Record(name.to_owned(), what.to_owned()));
        if !(fs.is_finite() && fs > 0.0) {
            return bad("sampling frequency must be positive");
        }
        if channels
            .iter()
            .any(|c| !(c.gain.is_finite() && c.gain > 0.0))
        {
            return bad("gains must be positive");
        }
        if base >= MAX_WRITE_SAMPLE_INDEX {
            return bad("first sample index out of range");
        }
        let channels: Vec<ChannelSpec> = channels
            .into_iter()
            .map(|c| ChannelSpec {
                name: header_text(&c.name, false, "signal"),
                units: header_text(&c.units, true, "mV"),
                ..c
            })
            .collect();
        fs::create_dir_all(dir).map_err(io)?;
        let dat = dir.join(format!("{name}.dat"));
        let file = fs::File::create(&dat).map_err(|source| WfdbError::Io { path: dat, source })?;
        let n = channels.len();
        Ok(Self {
            dir: dir.to_owned(),
            name: name.to_owned(),
            fs,
            channels,
            file,
            base,
            max_gap,
            filled: BTreeMap::new(),
            sums: vec![0; n],
            first_values: vec![None; n],
        })
    }

    /// Number of channels of the record.
    pub fn num_channels(&self) -> usize {
        self.channels.len()
    }

    /// The sample index at the start of the record.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// One past the highest sample index written (the base when nothing was).
    pub fn end(&self) -> u64 {
        self.filled
            .values()
            .next_back()
            .copied()
            .unwrap_or(self.base)
    }

    /// Whether a write at `first` is within reach (see [`Format16Writer::create`]).
    pub fn reaches(&self, first: u64) -> bool {
        first >= self.base && first <= self.end().saturating_add(self.max_gap)
    }

    /// Samples per channel written so far (ranges received, ignoring holes).
    pub fn received_samples(&self) -> u64 {
        self.filled.iter().map(|(s, e)| e - s).sum()
    }

    /// Writes `interleaved` samples starting at sample index `first`. Values outside i16 are
    /// clamped (format 16 cannot hold them); a range already written is ignored.
    pub fn write(&mut self, first: u64, interleaved: &[i32]) -> Result<(), WfdbError> {
        let n = self.channels.len();
        if n == 0 || !interleaved.len().is_multiple_of(n) {
            return Err(WfdbError::Record(
                self.name.clone(),
                "sample count not a multiple of channels".into(),
            ));
        }
        let count = (interleaved.len() / n) as u64;
        let end = first.saturating_add(count);
        if end > MAX_WRITE_SAMPLE_INDEX {
            return Err(WfdbError::Record(
                self.name.clone(),
                format!("sample index {first} beyond {MAX_WRITE_SAMPLE_INDEX}"),
            ));
        }
        if !self.reaches(first) {
            return Err(WfdbError::OutOfReach {
                name: self.name.clone(),
                at: first,
                base: self.base,
                end: self.end(),
                max_gap: self.max_gap,
            });
        }
        if self.overlaps(first, end) {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(interleaved.len() * 2);
        for (k, &v) in interleaved.iter().enumerate() {
            let v = v.clamp(i16::MIN as i32, i16::MAX as i32);
            self.sums[k % n] = self.sums[k % n].wrapping_add(v as i16);
            buf.extend_from_slice(&(v as i16).to_le_bytes());
        }
        if first == self.base {
            for (c, v) in interleaved.iter().take(n).enumerate() {
                self.first_values[c] = Some(*v);
            }
        }
        self.write_at(first, &buf)?;
        self.insert_range(first, end);
        Ok(())
    }

    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.filled
            .range(..end)
            .next_back()
            .is_some_and(|(_, &e)| e > start)
    }

    fn insert_range(&mut self, mut start: u64, mut end: u64) {
        if let Some((&s, &e)) = self.filled.range(..=start).next_back()
            && e >= start
        {
            start = s;
            end = end.max(e);
            self.filled.remove(&s);
        }
        while let Some((&s, &e)) = self.filled.range(start..=end).next() {
            end = end.max(e);
            self.filled.remove(&s);
        }
        self.filled.insert(start, end);
    }

    fn write_at(&mut self, first_sample: u64, buf: &[u8]) -> Result<(), WfdbError> {
        let pos = (first_sample - self.base) * self.channels.len() as u64 * 2;
        let dat = self.dir.join(format!("{}.dat", self.name));
        let io = |source| WfdbError::Io {
            path: dat.clone(),
            source,
        };
        self.file.seek(SeekFrom::Start(pos)).map_err(io)?;
        self.file.write_all(buf).map_err(io)
    }

    /// Fills holes with the invalid value, writes the header and returns its path.
    pub fn finish(mut self, comments: &[String]) -> Result<PathBuf, WfdbError> {
        let total = self.end() - self.base;
        let mut holes = Vec::new();
        let mut cursor = self.base;
        for (&s, &e) in &self.filled {
            if s > cursor {
                holes.push((cursor, s));
            }
            cursor = e;
        }
        let n = self.channels.len();
        // Holes are filled in bounded chunks: a long outage must not need a huge buffer.
        const CHUNK: u64 = 65_536;
        for (s, e) in holes {
            let mut at = s;
            while at < e {
                let len = (e - at).min(CHUNK);
                let count = len as usize * n;
                let buf: Vec<u8> =
                    std::iter::repeat_n((INVALID_SAMPLE_16 as i16).to_le_bytes(), count)
                        .flatten()
                        .collect();
                for k in 0..count {
                    self.sums[k % n] = self.sums[k % n].wrapping_add(INVALID_SAMPLE_16 as i16);
                }
                self.write_at(at, &buf)?;
                at += len;
            }
        }
        let hea = self.dir.join(format!("{}.hea", self.name));
        let io = |source| WfdbError::Io {
            path: hea.clone(),
            source,
        };
        self.file.sync_all().map_err(io)?;
        let mut text = format!("{} {} {} {}\n", self.name, n, fmt_num(self.fs), total);
        for (c, ch) in self.channels.iter().enumerate() {
            let init = self.first_values[c].unwrap_or(INVALID_SAMPLE_16);
            text.push_str(&format!(
                "{}.dat 16 {}({})/{} {} {} {} {} 0 {}\n",
                self.name,
                fmt_num(ch.gain),
                ch.baseline,
                ch.units,
                ch.adc_resolution,
                ch.adc_zero,
                init,
                self.sums[c],
                ch.name
            ));
        }
        if self.base > 0 {
            text.push_str(&format!("# first sample index {}\n", self.base));
        }
        for c in comments {
            text.push_str(&format!("# {}\n", header_text(c, false, "")));
        }
        fs::write(&hea, text).map_err(io)?;
        Ok(hea)
    }
}

/// `text` made safe for one header field: no line breaks or other control characters
/// (replaced by spaces), and for fields that end at whitespace (units) no whitespace either
/// (replaced by `_`); bounded to 64 characters; `empty` when nothing is left.
fn header_text(text: &str, no_spaces: bool, empty: &str) -> String {
    let out: String = text
        .chars()
        .map(|c| match c {
            c if no_spaces && (c.is_control() || c.is_whitespace()) => '_',
            c if c.is_control() => ' ',
            c => c,
        })
        .take(64)
        .collect();
    let out = out.trim();
    if out.is_empty() {
        empty.to_owned()
    } else {
        out.to_owned()
    }
}

fn fmt_num(v: f64) -> String {
    format!("{v}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../data/ecg")
            .join(name)
    }

    #[test]
    fn parses_header_with_comments_and_blank_lines() {
        let text = "# leading comment\n100 2 360 650000\n100.dat 212 200 11 1024 995 -22131 0 MLII\n\n100.dat 212 200 11 1024 1011 20052 0 V5\n# 69 M\n";
        let h = parse_header(text, Path::new("100.hea")).unwrap();
        assert_eq!(h.signals.len(), 2);
        assert_eq!(h.sampling_frequency, 360.0);
        assert_eq!(h.samples_per_signal, Some(650_000));
        assert_eq!(h.signals[0].baseline, 1024);
        assert_eq!(h.signals[0].units, "mV");
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
    fn rejects_bad_headers_with_a_clear_error() {
        for bad in [
            "",
            "rec",
            "rec 2 360\nx.dat 16\n",
            "rec 1 abc\nx.dat 16\n",
            "rec 1 360\nx.dat 16 g\n",
            // Found by libFuzzer: a signal count of usize::MAX overflowed the line check.
            "rec 18446744073709551615\n",
        ] {
            let err = parse_header(bad, Path::new("bad.hea")).unwrap_err();
            assert!(err.to_string().contains("bad.hea"), "{err}");
        }
    }

    #[test]
    fn decodes_212() {
        // samples 0x123 and -1 (0xfff): bytes 0x23, (0xf << 4) | 0x1, 0xff
        assert_eq!(decode(212, &[0x23, 0xf1, 0xff]).unwrap(), vec![0x123, -1]);
    }

    #[test]
    fn record_100_checksums_match_header() {
        let r = read_record(&shared("100")).unwrap();
        assert_eq!(r.samples_per_signal, 650_000);
        assert_eq!(&r.samples[..2], &[995, 1011]);
        for s in 0..2 {
            assert_eq!(Some(r.checksum(s)), r.header.signals[s].checksum);
        }
    }

    #[test]
    fn record_s0010_multi_file_checksums_match_header() {
        let r = read_record(&shared("s0010_re")).unwrap();
        assert_eq!(r.num_signals(), 15);
        assert_eq!(r.samples_per_signal, 38_400);
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
    fn writer_round_trips_out_of_order_with_holes() {
        let dir = tempfile::tempdir().unwrap();
        let ch = |n: &str| ChannelSpec {
            name: n.into(),
            gain: 200.0,
            baseline: 1024,
            units: "mV".into(),
            adc_resolution: 11,
            adc_zero: 1024,
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
        assert_eq!(r.samples_per_signal, 6);
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
        };
        let mut w = Format16Writer::create(dir, "b", 1.0, vec![ch], 10, 5).unwrap();
        matches!(w.write(9, &[1]), Err(WfdbError::OutOfReach { .. })) && w.write(10, &[1]).is_ok()
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
