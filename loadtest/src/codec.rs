//! `loadtest codec`: what the waveform codec saves and costs on real records, frame by frame
//! exactly as the agent cuts them (every frame encoded on its own and decoded back, checked).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use prost::Message;
use relay_codec::Encoder;
use relay_proto::model::WaveformChunk;
use relay_wfdb::Record;
use serde::Serialize;
use tokio::time::Instant;

/// Flags of `loadtest codec`.
#[derive(Debug, clap::Args)]
pub struct CodecArgs {
    /// Records (path without extension); every rate group is a stream of its own.
    #[arg(
        long = "record",
        default_values = ["data/ecg/100", "data/ecg/s0010_re", "data/ecg-multirate/mixedsignals"]
    )]
    pub records: Vec<PathBuf>,
    /// Frame duration, as the agent's `framing.frame`.
    #[arg(long, default_value = "40ms", value_parser = relay_emulator::spec::parse_duration)]
    pub frame: Duration,
    /// Timed passes over every record; the report gives the median.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Where the JSON report goes.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

/// Figures of one stream (a record's rate group) or a whole record.
#[derive(Debug, Clone, Serialize)]
pub struct Sizes {
    /// What the figures cover.
    pub name: String,
    /// Channels and samples per channel in one frame.
    pub channels: usize,
    /// Samples per channel per frame (the last frame may hold fewer).
    pub samples_per_frame: usize,
    /// Frames.
    pub frames: u64,
    /// Samples at 16 bits (2 bytes each).
    pub raw_16bit_bytes: u64,
    /// Codec output, summed over the frames.
    pub lpc1_bytes: u64,
    /// The same samples as protobuf varints (the `samples` field, one frame at a time).
    pub varint_bytes: u64,
    /// lpc1_bytes / raw_16bit_bytes.
    pub lpc1_ratio: f64,
    /// varint_bytes / raw_16bit_bytes.
    pub varint_ratio: f64,
    /// Median over the runs, per sample.
    pub encode_ns_per_sample: f64,
    /// Median over the runs, per sample.
    pub decode_ns_per_sample: f64,
}

/// The report.
#[derive(Debug, Clone, Serialize)]
pub struct CodecReport {
    /// Frame duration, milliseconds.
    pub frame_ms: f64,
    /// Timed runs (medians reported).
    pub runs: usize,
    /// Per stream.
    pub streams: Vec<Sizes>,
    /// Per record (all its streams).
    pub records: Vec<Sizes>,
    /// A 12-lead 500 Hz stream (s0010_re's standard leads, every other sample): encode and
    /// decode per second of signal as a share of one core.
    pub twelve_lead_500hz_core_share: Option<f64>,
}

impl CodecReport {
    /// A table for the terminal.
    pub fn human(&self) -> String {
        let mut out = format!(
            "codec lpc1, {} ms frames, medians of {} runs\n{:<48} {:>4} {:>5} {:>9} {:>7} {:>7} {:>9} {:>9}\n",
            self.frame_ms,
            self.runs,
            "stream",
            "ch",
            "n",
            "frames",
            "lpc1",
            "varint",
            "enc ns/s",
            "dec ns/s"
        );
        for s in self.streams.iter().chain(&self.records) {
            out.push_str(&format!(
                "{:<48} {:>4} {:>5} {:>9} {:>7.3} {:>7.3} {:>9.1} {:>9.1}\n",
                s.name,
                s.channels,
                s.samples_per_frame,
                s.frames,
                s.lpc1_ratio,
                s.varint_ratio,
                s.encode_ns_per_sample,
                s.decode_ns_per_sample
            ));
        }
        if let Some(share) = self.twelve_lead_500hz_core_share {
            out.push_str(&format!(
                "12-lead 500 Hz: encode + decode {:.3} % of one core\n",
                share * 100.0
            ));
        }
        out
    }
}

/// One stream's frames, cut as the agent cuts them.
struct Stream {
    name: String,
    centers: Vec<i32>,
    channels: usize,
    samples_per_frame: usize,
    frames: Vec<Vec<i32>>,
}

fn streams_of(path: &Path, record: &Record, frame: Duration) -> Vec<Stream> {
    let groups = record.rate_groups();
    let multi = groups.len() > 1;
    groups
        .into_iter()
        .map(|g| {
            let rate = record.header.sampling_frequency * f64::from(g.samples_per_frame);
            let per_frame = ((rate * frame.as_secs_f64()).round() as usize).max(1);
            let total = g.signals.first().map_or(0, |&s| record.signal_len(s));
            let mut frames = Vec::new();
            let mut first = 0;
            while first < total {
                let count = per_frame.min(total - first);
                let mut samples = Vec::new();
                record.interleaved(&g.signals, first, count, &mut samples);
                frames.push(samples);
                first += count;
            }
            let name = if multi {
                format!("{} ({} Hz)", path.display(), (rate * 10.0).round() / 10.0)
            } else {
                path.display().to_string()
            };
            Stream {
                name,
                centers: g
                    .signals
                    .iter()
                    .filter_map(|&s| record.header.signals.get(s).map(|x| x.baseline))
                    .collect(),
                channels: g.signals.len(),
                samples_per_frame: per_frame,
                frames,
            }
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Encodes and decodes every frame `runs` times; checks each round trip.
fn measure(s: &Stream, runs: usize) -> anyhow::Result<Sizes> {
    let samples: u64 = s.frames.iter().map(|f| f.len() as u64).sum();
    let varint_bytes: u64 = s
        .frames
        .iter()
        .map(|f| {
            WaveformChunk {
                samples: f.clone(),
                ..WaveformChunk::default()
            }
            .encoded_len() as u64
        })
        .sum();
    let (mut encode, mut decode, mut lpc1_bytes) = (Vec::new(), Vec::new(), 0u64);
    let mut packed: Vec<Vec<u8>> = vec![Vec::new(); s.frames.len()];
    let mut out = Vec::new();
    for _ in 0..runs.max(1) {
        let mut encoder = Encoder::new(&s.centers)?;
        let t0 = Instant::now();
        for (f, p) in s.frames.iter().zip(packed.iter_mut()) {
            p.clear();
            encoder.encode(f, p)?;
        }
        encode.push(t0.elapsed().as_secs_f64());
        let t1 = Instant::now();
        for (f, p) in s.frames.iter().zip(&packed) {
            out.clear();
            relay_codec::decode(p, &s.centers, f.len() / s.channels, &mut out)?;
            if out != *f {
                bail!("{}: a frame did not round-trip", s.name);
            }
        }
        decode.push(t1.elapsed().as_secs_f64());
        lpc1_bytes = packed.iter().map(|p| p.len() as u64).sum();
    }
    let per_sample = |v: Vec<f64>| median(v) * 1e9 / samples.max(1) as f64;
    let raw = samples * 2;
    Ok(Sizes {
        name: s.name.clone(),
        channels: s.channels,
        samples_per_frame: s.samples_per_frame,
        frames: s.frames.len() as u64,
        raw_16bit_bytes: raw,
        lpc1_bytes,
        varint_bytes,
        lpc1_ratio: lpc1_bytes as f64 / raw.max(1) as f64,
        varint_ratio: varint_bytes as f64 / raw.max(1) as f64,
        encode_ns_per_sample: per_sample(encode),
        decode_ns_per_sample: per_sample(decode),
    })
}

fn total(name: String, parts: &[Sizes]) -> Sizes {
    let sum = |f: fn(&Sizes) -> u64| parts.iter().map(f).sum::<u64>();
    let raw = sum(|s| s.raw_16bit_bytes);
    let samples = (raw / 2).max(1) as f64;
    let weighted = |f: fn(&Sizes) -> f64| {
        parts
            .iter()
            .map(|s| f(s) * (s.raw_16bit_bytes / 2) as f64)
            .sum::<f64>()
            / samples
    };
    Sizes {
        name,
        channels: parts.iter().map(|s| s.channels).sum(),
        samples_per_frame: 0,
        frames: sum(|s| s.frames),
        raw_16bit_bytes: raw,
        lpc1_bytes: sum(|s| s.lpc1_bytes),
        varint_bytes: sum(|s| s.varint_bytes),
        lpc1_ratio: sum(|s| s.lpc1_bytes) as f64 / raw.max(1) as f64,
        varint_ratio: sum(|s| s.varint_bytes) as f64 / raw.max(1) as f64,
        encode_ns_per_sample: weighted(|s| s.encode_ns_per_sample),
        decode_ns_per_sample: weighted(|s| s.decode_ns_per_sample),
    }
}

/// Runs `loadtest codec`.
pub fn run(a: &CodecArgs) -> anyhow::Result<CodecReport> {
    let mut streams = Vec::new();
    let mut records = Vec::new();
    let mut twelve_lead = None;
    for path in &a.records {
        let record = relay_wfdb::read_record(path)
            .with_context(|| format!("reading record {}", path.display()))?;
        let mut parts = Vec::new();
        for s in streams_of(path, &record, a.frame) {
            parts.push(measure(&s, a.runs)?);
        }
        if parts.len() > 1 {
            records.push(total(format!("{} (whole record)", path.display()), &parts));
        }
        streams.extend(parts);
        if record.header.record_name == "s0010_re" && record.num_signals() >= 12 {
            twelve_lead = Some(twelve_lead_share(&record, a)?);
        }
    }
    let report = CodecReport {
        frame_ms: a.frame.as_secs_f64() * 1000.0,
        runs: a.runs,
        streams,
        records,
        twelve_lead_500hz_core_share: twelve_lead,
    };
    if let Some(path) = &a.report {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}

/// Encode + decode time per second of a 12-lead 500 Hz signal, as a share of one core:
/// s0010_re's twelve standard leads at every other sample.
fn twelve_lead_share(record: &Record, a: &CodecArgs) -> anyhow::Result<f64> {
    let leads: Vec<usize> = (0..12).collect();
    let len = record.signal_len(0);
    let mut decimated = Vec::new();
    let mut row = Vec::new();
    for j in (0..len).step_by(2) {
        row.clear();
        record.interleaved(&leads, j, 1, &mut row);
        decimated.extend_from_slice(&row);
    }
    let per_frame = ((500.0 * a.frame.as_secs_f64()).round() as usize).max(1);
    let stream = Stream {
        name: "s0010_re 12-lead 500 Hz".into(),
        centers: leads
            .iter()
            .filter_map(|&s| record.header.signals.get(s).map(|x| x.baseline))
            .collect(),
        channels: 12,
        samples_per_frame: per_frame,
        frames: decimated
            .chunks(per_frame * 12)
            .map(<[i32]>::to_vec)
            .collect(),
    };
    let sizes = measure(&stream, a.runs)?;
    let samples_per_second = 500.0 * 12.0;
    Ok((sizes.encode_ns_per_sample + sizes.decode_ns_per_sample) * samples_per_second / 1e9)
}
