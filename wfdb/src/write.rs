//! Writing records in format 16 as samples arrive, one rate group at a time.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::WfdbError;

/// Highest sample index (per channel) a writer accepts: 2^32 samples is 49 days at 1000 Hz.
/// Bounds the file a malicious or corrupt index could make the writer create.
pub const MAX_WRITE_SAMPLE_INDEX: u64 = 1 << 32;
/// Format 16's "no sample here" value, written for every sample the relay never received.
pub const INVALID_SAMPLE_16: i32 = -32768;

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
    /// Samples of this channel in each frame (0 is taken as 1).
    pub samples_per_frame: u32,
}

/// Channels written together (one stream): the same samples per frame, received ranges in
/// their own sample indices.
#[derive(Debug)]
struct WriteGroup {
    channels: Vec<usize>,
    spf: u64,
    /// Received sample-index ranges [start, end), merged.
    filled: BTreeMap<u64, u64>,
}

impl WriteGroup {
    fn end(&self) -> u64 {
        self.filled.values().next_back().copied().unwrap_or(0)
    }

    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.filled
            .range(..end)
            .next_back()
            .is_some_and(|(_, &e)| e > start)
    }

    fn insert(&mut self, mut start: u64, mut end: u64) {
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
}

/// Channels written together, their samples per frame, and the sample ranges [start, end) to
/// fill with the invalid value.
type Fill = (Vec<usize>, u64, Vec<(u64, u64)>);

/// Writes one record in format 16 as samples arrive, in any order (a late frame lands at its
/// sample index); samples never received are written as [`INVALID_SAMPLE_16`] on `finish`.
/// Channels may differ in samples per frame (a multi-rate record); each rate group is written
/// with [`Format16Writer::write_channels`] in its own sample indices.
#[derive(Debug)]
pub struct Format16Writer {
    dir: PathBuf,
    name: String,
    fs: f64,
    counter_frequency: Option<f64>,
    channels: Vec<ChannelSpec>,
    file: fs::File,
    /// Frame stored at the start of the file.
    base: u64,
    /// Holes longer than this (frames) are refused rather than filled.
    max_gap: u64,
    /// Position of each channel's first sample within a frame, and the frame's width.
    offsets: Vec<u64>,
    width: u64,
    groups: Vec<WriteGroup>,
    sums: Vec<i16>,
    first_values: Vec<Option<i32>>,
}

impl Format16Writer {
    /// Creates `<dir>/<name>.dat` and the writer for it; the header is written on `finish`.
    /// `fs` is the frame rate. The file starts at frame `base`; a write that would leave a
    /// hole of more than `max_gap` frames after what it holds is refused with
    /// [`WfdbError::OutOfReach`], so no index, however large, makes the writer fill more than
    /// that. Text that would break the header (whitespace in units, line breaks anywhere) is
    /// replaced.
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
            .any(|c| !(c.gain.is_finite() && c.gain != 0.0))
        {
            return bad("gains must be finite and non-zero");
        }
        if channels
            .iter()
            .any(|c| c.samples_per_frame > crate::MAX_SAMPLES_PER_FRAME)
        {
            return bad("too many samples per frame");
        }
        if base >= MAX_WRITE_SAMPLE_INDEX {
            return bad("first sample index out of range");
        }
        let channels: Vec<ChannelSpec> = channels
            .into_iter()
            .map(|c| ChannelSpec {
                name: header_text(&c.name, false, "signal"),
                units: header_text(&c.units, true, "mV"),
                samples_per_frame: c.samples_per_frame.max(1),
                ..c
            })
            .collect();
        let mut offsets = Vec::with_capacity(channels.len());
        let mut width = 0u64;
        for c in &channels {
            offsets.push(width);
            width += u64::from(c.samples_per_frame);
        }
        fs::create_dir_all(dir).map_err(io)?;
        let dat = dir.join(format!("{name}.dat"));
        let file = fs::File::create(&dat).map_err(|source| WfdbError::Io { path: dat, source })?;
        let n = channels.len();
        Ok(Self {
            dir: dir.to_owned(),
            name: name.to_owned(),
            fs,
            counter_frequency: None,
            channels,
            file,
            base,
            max_gap,
            offsets,
            width,
            groups: Vec::new(),
            sums: vec![0; n],
            first_values: vec![None; n],
        })
    }

    /// Writes `counter` into the header's record line (`fs/counter`), as the source had it.
    pub fn with_counter_frequency(mut self, counter: Option<f64>) -> Self {
        self.counter_frequency = counter.filter(|c| c.is_finite() && *c > 0.0);
        self
    }

    /// Number of channels of the record.
    pub fn num_channels(&self) -> usize {
        self.channels.len()
    }

    /// Samples per frame of channel `c` (1 when out of range).
    pub fn samples_per_frame(&self, c: usize) -> u64 {
        self.channels
            .get(c)
            .map_or(1, |ch| u64::from(ch.samples_per_frame))
    }

    /// The frame at the start of the record.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// One past the last frame written to (the base when nothing was).
    pub fn end(&self) -> u64 {
        self.groups
            .iter()
            .map(|g| g.end().div_ceil(g.spf))
            .max()
            .unwrap_or(self.base)
            .max(self.base)
    }

    /// Whether a write starting in frame `frame` is within reach (see [`Format16Writer::create`]).
    pub fn reaches(&self, frame: u64) -> bool {
        frame >= self.base && frame <= self.end().saturating_add(self.max_gap)
    }

    /// Samples per channel written so far for channel 0 (ranges received, ignoring holes).
    pub fn received_samples(&self) -> u64 {
        self.received_samples_of(0)
    }

    /// Samples written so far for channel `c` (ranges received, ignoring holes).
    pub fn received_samples_of(&self, c: usize) -> u64 {
        self.groups
            .iter()
            .find(|g| g.channels.contains(&c))
            .map_or(0, |g| g.filled.iter().map(|(s, e)| e - s).sum())
    }

    /// Replaces what the header says of channel `c` (name, calibration, units), for a
    /// description that arrives after the writer was created; its samples per frame stay.
    pub fn describe_channel(&mut self, c: usize, spec: ChannelSpec) {
        if !(spec.gain.is_finite() && spec.gain != 0.0) {
            return;
        }
        if let Some(ch) = self.channels.get_mut(c) {
            *ch = ChannelSpec {
                name: header_text(&spec.name, false, "signal"),
                units: header_text(&spec.units, true, "mV"),
                samples_per_frame: ch.samples_per_frame,
                ..spec
            };
        }
    }

    /// Writes `interleaved` samples of every channel (all with the same samples per frame)
    /// starting at sample index `first`.
    pub fn write(&mut self, first: u64, interleaved: &[i32]) -> Result<(), WfdbError> {
        let all: Vec<usize> = (0..self.channels.len()).collect();
        self.write_channels(&all, first, interleaved)
    }

    /// Writes `interleaved` samples of `channels` (one rate group: the same samples per frame,
    /// always written together) starting at their sample index `first`. Values outside i16 are
    /// clamped (format 16 cannot hold them); a range already written is ignored.
    pub fn write_channels(
        &mut self,
        channels: &[usize],
        first: u64,
        interleaved: &[i32],
    ) -> Result<(), WfdbError> {
        let n = channels.len();
        let err = |msg: String| Err(WfdbError::Record(self.name.clone(), msg));
        if n == 0 || !interleaved.len().is_multiple_of(n) {
            return err("sample count not a multiple of channels".into());
        }
        if channels.iter().any(|&c| c >= self.channels.len()) {
            return err("channel out of range".into());
        }
        let spf = self.samples_per_frame(channels[0]);
        if channels.iter().any(|&c| self.samples_per_frame(c) != spf) {
            return err("channels written together differ in samples per frame".into());
        }
        let group = match self.groups.iter().position(|g| g.channels == channels) {
            Some(g) => g,
            None => {
                if self
                    .groups
                    .iter()
                    .any(|g| g.channels.iter().any(|c| channels.contains(c)))
                {
                    return err("a channel was written in another group".into());
                }
                self.groups.push(WriteGroup {
                    channels: channels.to_vec(),
                    spf,
                    filled: BTreeMap::new(),
                });
                self.groups.len() - 1
            }
        };
        let count = (interleaved.len() / n) as u64;
        let end = first.saturating_add(count);
        if end.div_ceil(spf) > MAX_WRITE_SAMPLE_INDEX {
            return err(format!(
                "sample index {first} beyond {MAX_WRITE_SAMPLE_INDEX} frames"
            ));
        }
        let frame = first / spf;
        if !self.reaches(frame) || first < self.base * spf {
            return Err(WfdbError::OutOfReach {
                name: self.name.clone(),
                at: frame,
                base: self.base,
                end: self.end(),
                max_gap: self.max_gap,
            });
        }
        if self.groups[group].overlaps(first, end) {
            return Ok(());
        }
        self.store(channels, spf, first, count, |k, ci| {
            interleaved[k as usize * n + ci].clamp(i16::MIN as i32, i16::MAX as i32)
        })?;
        self.groups[group].insert(first, end);
        Ok(())
    }

    /// Writes samples `first..first + count` of `channels` (value of sample `first + k` of
    /// channel `channels[ci]` from `value(k, ci)`) at their places in the frames, coalescing
    /// runs that are adjacent in the file.
    fn store(
        &mut self,
        channels: &[usize],
        spf: u64,
        first: u64,
        count: u64,
        value: impl Fn(u64, usize) -> i32,
    ) -> Result<(), WfdbError> {
        let mut order: Vec<usize> = (0..channels.len()).collect();
        order.sort_by_key(|&ci| self.offsets[channels[ci]]);
        let end = first + count;
        let mut run_start = 0u64;
        let mut buf: Vec<u8> = Vec::new();
        let mut frame = first / spf;
        while frame * spf < end {
            let lo = (frame * spf).max(first);
            let hi = ((frame + 1) * spf).min(end);
            for &ci in &order {
                let c = channels[ci];
                let pos = (frame - self.base) * self.width + self.offsets[c] + lo % spf;
                if buf.is_empty() {
                    run_start = pos;
                } else if run_start + (buf.len() / 2) as u64 != pos {
                    self.write_at(run_start, &buf)?;
                    buf.clear();
                    run_start = pos;
                }
                for j in lo..hi {
                    let v = value(j - first, ci);
                    self.sums[c] = self.sums[c].wrapping_add(v as i16);
                    if j == self.base * spf {
                        self.first_values[c] = Some(v);
                    }
                    buf.extend_from_slice(&(v as i16).to_le_bytes());
                }
            }
            frame += 1;
        }
        if !buf.is_empty() {
            self.write_at(run_start, &buf)?;
        }
        Ok(())
    }

    fn write_at(&mut self, position: u64, buf: &[u8]) -> Result<(), WfdbError> {
        let dat = self.dir.join(format!("{}.dat", self.name));
        let io = |source| WfdbError::Io {
            path: dat.clone(),
            source,
        };
        self.file.seek(SeekFrom::Start(position * 2)).map_err(io)?;
        self.file.write_all(buf).map_err(io)
    }

    /// Fills holes with the invalid value, writes the header and returns its path.
    pub fn finish(mut self, comments: &[String]) -> Result<PathBuf, WfdbError> {
        let end = self.end();
        let total = end - self.base;
        // Every rate group's holes, including channels never written at all.
        let mut fills: Vec<Fill> = Vec::new();
        for g in &self.groups {
            let mut holes = Vec::new();
            let mut cursor = self.base * g.spf;
            for (&s, &e) in &g.filled {
                if s > cursor {
                    holes.push((cursor, s));
                }
                cursor = cursor.max(e);
            }
            if cursor < end * g.spf {
                holes.push((cursor, end * g.spf));
            }
            fills.push((g.channels.clone(), g.spf, holes));
        }
        for c in 0..self.channels.len() {
            if !self.groups.iter().any(|g| g.channels.contains(&c)) {
                let spf = self.samples_per_frame(c);
                fills.push((vec![c], spf, vec![(self.base * spf, end * spf)]));
            }
        }
        // Holes are filled in bounded chunks: a long outage must not need a huge buffer.
        const CHUNK: u64 = 65_536;
        for (channels, spf, holes) in fills {
            for (s, e) in holes {
                let mut at = s;
                while at < e {
                    let len = (e - at).min(CHUNK);
                    self.store(&channels, spf, at, len, |_, _| INVALID_SAMPLE_16)?;
                    at += len;
                }
            }
        }
        let hea = self.dir.join(format!("{}.hea", self.name));
        let io = |source| WfdbError::Io {
            path: hea.clone(),
            source,
        };
        self.file.sync_all().map_err(io)?;
        let rate = match self.counter_frequency {
            Some(c) => format!("{}/{}", fmt_num(self.fs), fmt_num(c)),
            None => fmt_num(self.fs),
        };
        let mut text = format!("{} {} {} {}\n", self.name, self.channels.len(), rate, total);
        for (c, ch) in self.channels.iter().enumerate() {
            let init = self.first_values[c].unwrap_or(INVALID_SAMPLE_16);
            let format = match ch.samples_per_frame {
                1 => "16".to_owned(),
                spf => format!("16x{spf}"),
            };
            text.push_str(&format!(
                "{}.dat {} {}({})/{} {} {} {} {} 0 {}\n",
                self.name,
                format,
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
