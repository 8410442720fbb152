//! ED-side client library: a TLS gRPC connection to the ingest, a resumable subscription,
//! and a sink that writes every waveform stream it receives as a WFDB record.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use relay_proto::model::telemetry_client::TelemetryClient;
use relay_proto::model::{
    StreamInfo, StreamKind, StreamRef, SubscribeResponse, WaveformChunk, frame::Payload,
    subscribe_response::Record,
};
use relay_wfdb::{ChannelSpec, Format16Writer, WfdbError};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

#[derive(Debug, thiserror::Error)]
/// Why the client could not connect or write.
pub enum ClientError {
    #[error("reading {path}: {source}")]
    /// A certificate, key or output file could not be read or written.
    Io {
        /// The file.
        path: PathBuf,
        #[source]
        /// The operating system's error.
        source: std::io::Error,
    },
    #[error("gRPC transport: {0}")]
    /// The gRPC connection failed.
    Transport(#[from] tonic::transport::Error),
    #[error("invalid server address {0:?}")]
    /// The server address is not a valid URI.
    Address(String),
}

/// Files and name for the client's mutual TLS.
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// CA of the ingest's certificate (the hospital CA).
    pub ca: PathBuf,
    /// This client's certificate chain (PEM).
    pub cert: PathBuf,
    /// This client's private key (PEM).
    pub key: PathBuf,
    /// Name the ingest's certificate must carry.
    pub domain: String,
}

impl ClientTls {
    /// The usual file names of the development PKI in `dir` for client `name`.
    pub fn from_dev_dir(dir: &Path, name: &str) -> Self {
        Self {
            ca: dir.join("hospital-ca.pem"),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
            domain: "localhost".into(),
        }
    }
}

/// Command-line flags naming the ingest and this client's certificate (shared by the ED
/// binaries).
#[derive(Debug, Clone, clap::Args)]
pub struct IngestArgs {
    /// gRPC address of the ingest.
    #[arg(long, default_value = "https://127.0.0.1:50051")]
    pub server: String,
    /// Name the ingest certificate must carry.
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
    /// CA of the ingest certificate.
    #[arg(long, default_value = "certs/hospital-ca.pem")]
    pub ca: PathBuf,
    /// This client's certificate and key (its access policy decides what it may read).
    #[arg(long, default_value = "certs/ed-console.pem")]
    pub cert: PathBuf,
    /// This client's private key.
    #[arg(long, default_value = "certs/ed-console.key")]
    pub key: PathBuf,
}

impl IngestArgs {
    /// The TLS files the flags name.
    pub fn tls(&self) -> ClientTls {
        ClientTls {
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            domain: self.server_name.clone(),
        }
    }
}

fn endpoint(url: &str, tls: &ClientTls) -> Result<tonic::transport::Endpoint, ClientError> {
    relay_ops::install_crypto_provider();
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| ClientError::Io {
            path: p.to_owned(),
            source,
        })
    };
    let tls_cfg = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&tls.ca)?))
        .identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?))
        .domain_name(tls.domain.clone());
    Ok(Channel::from_shared(url.to_owned())
        .map_err(|_| ClientError::Address(url.to_owned()))?
        .tls_config(tls_cfg)?)
}

fn client(channel: Channel) -> TelemetryClient<Channel> {
    TelemetryClient::new(channel)
        .max_decoding_message_size(relay_proto::DEFAULT_MAX_FRAME_BYTES * 2)
}

/// Connects to `url` (e.g. `https://127.0.0.1:50051`) with mutual TLS.
pub async fn connect(url: &str, tls: &ClientTls) -> Result<TelemetryClient<Channel>, ClientError> {
    Ok(client(endpoint(url, tls)?.connect().await?))
}

/// A client for `url` that connects on first use and reconnects after a failure (for
/// long-running services: the ingest may start later or restart).
pub fn connect_lazy(url: &str, tls: &ClientTls) -> Result<TelemetryClient<Channel>, ClientError> {
    Ok(client(endpoint(url, tls)?.connect_lazy()))
}

/// Identity of a stream as a map key.
pub type StreamId = (String, u64, u32);

/// The (vehicle, session, stream) a stream reference names.
pub fn stream_id(r: &StreamRef) -> StreamId {
    (r.vehicle_id.clone(), r.session_id, r.stream_id)
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .take(40)
        .collect()
}

/// How long a hole in a stream the sink fills with the invalid value; past it a new record
/// (segment) begins, so a bogus or far-off sample index never makes gigabytes of fill.
pub const DEFAULT_MAX_GAP_FILL: Duration = Duration::from_secs(600);
/// Records (segments) per stream at most; further ones are refused.
pub const MAX_SEGMENTS: usize = 64;

/// Which record a waveform stream is written into.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum RecordKey {
    /// A single-rate stream: a record of its own.
    Stream(StreamId),
    /// A rate group of a multi-rate source: one record for all its groups, found by vehicle,
    /// session, source name, frame rate (bits) and layout.
    Source(String, u64, String, u64, Vec<u32>),
}

/// Where a stream's channels go: its record and the record channels, in the stream's order.
#[derive(Debug)]
struct Place {
    record: RecordKey,
    channels: Vec<usize>,
    samples_per_frame: u64,
}

/// One record being written (a stream, or all rate groups of a multi-rate source): its
/// announcements and its segments, by first frame.
#[derive(Debug)]
struct Segments {
    infos: Vec<StreamInfo>,
    name: String,
    frame_rate_hz: f64,
    counter_frequency_hz: Option<f64>,
    channels: Vec<ChannelSpec>,
    records: Vec<Format16Writer>,
}

/// Writes every waveform stream as `<dir>/<vehicle>_<stream>_<session>` in WFDB format 16.
/// The rate groups of a multi-rate source (streams naming the same source and layout) are
/// written together as one multi-rate record named after the stream holding its first signal,
/// each signal back at its place and samples per frame. A record whose samples leave a hole
/// longer than the gap bound continues in another record named `..._s<N>` whose header names
/// its first frame.
#[derive(Debug)]
pub struct WfdbSink {
    dir: PathBuf,
    max_gap_fill: Duration,
    records: HashMap<RecordKey, Segments>,
    streams: HashMap<StreamId, Place>,
}

/// Channels of a multi-rate record at most (the ingest's bound on a source's signals).
const MAX_RECORD_CHANNELS: usize = 256;

fn channel_spec(c: &relay_proto::model::ChannelInfo, samples_per_frame: u32) -> ChannelSpec {
    ChannelSpec {
        name: c.name.clone(),
        gain: c.gain,
        baseline: c.baseline,
        units: if c.unit.is_empty() {
            "mV".into()
        } else {
            c.unit.clone()
        },
        adc_resolution: c.adc_resolution,
        adc_zero: c.adc_zero,
        samples_per_frame,
    }
}

impl WfdbSink {
    /// A sink writing one record per waveform stream into `dir`, filling holes of up to
    /// [`DEFAULT_MAX_GAP_FILL`].
    pub fn new(dir: &Path) -> Self {
        Self::with_max_gap_fill(dir, DEFAULT_MAX_GAP_FILL)
    }

    /// A sink filling holes of up to `max_gap_fill` of signal time.
    pub fn with_max_gap_fill(dir: &Path, max_gap_fill: Duration) -> Self {
        Self {
            dir: dir.to_owned(),
            max_gap_fill,
            records: HashMap::new(),
            streams: HashMap::new(),
        }
    }

    /// Samples per channel received so far for a stream (all its records).
    pub fn received_samples(&self, id: &StreamId) -> u64 {
        let Some(place) = self.streams.get(id) else {
            return 0;
        };
        let Some(&c) = place.channels.first() else {
            return 0;
        };
        self.records.get(&place.record).map_or(0, |seg| {
            seg.records.iter().map(|r| r.received_samples_of(c)).sum()
        })
    }

    /// The streams it has seen so far.
    pub fn streams(&self) -> impl Iterator<Item = &StreamId> {
        self.streams.keys()
    }

    /// Takes one subscription message: descriptors open a record, data records add samples.
    pub fn handle(&mut self, msg: &SubscribeResponse) -> Result<(), WfdbError> {
        match &msg.record {
            Some(Record::Stream(info)) => self.open(info),
            Some(Record::Data(d)) => {
                let (Some(s), Some(f)) = (&d.stream, &d.frame) else {
                    return Ok(());
                };
                let Some(Payload::Waveform(w)) = &f.payload else {
                    return Ok(());
                };
                let Some(place) = self.streams.get(&stream_id(s)) else {
                    return Ok(()); // a stream never announced cannot be interpreted; skip
                };
                match self.records.get_mut(&place.record) {
                    Some(seg) => seg.write(&self.dir, self.max_gap_fill, place, w),
                    None => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }

    fn open(&mut self, info: &StreamInfo) -> Result<(), WfdbError> {
        let (Some(s), Some(d)) = (&info.stream, &info.descriptor) else {
            return Ok(());
        };
        if s.kind != StreamKind::Waveform as i32 || self.streams.contains_key(&stream_id(s)) {
            return Ok(());
        }
        let Some(w) = &d.waveform else { return Ok(()) };
        let layout = &w.source_samples_per_frame;
        let multi_rate = !layout.is_empty()
            && !w.channels.is_empty()
            && layout.len() <= MAX_RECORD_CHANNELS
            && w.frame_rate_hz > 0.0
            && w.channels
                .iter()
                .all(|c| (c.source_signal as usize) < layout.len());
        let record_name = |stream: &str| {
            format!(
                "{}_{}_{:08x}",
                sanitize(&s.vehicle_id),
                sanitize(stream),
                s.session_id as u32
            )
        };
        let counter = Some(w.counter_frequency_hz).filter(|c| *c > 0.0);
        let (key, place, seg) = if multi_rate {
            let key = RecordKey::Source(
                s.vehicle_id.clone(),
                s.session_id,
                w.source.clone(),
                w.frame_rate_hz.to_bits(),
                layout.clone(),
            );
            let channels: Vec<usize> = w
                .channels
                .iter()
                .map(|c| c.source_signal as usize)
                .collect();
            let spf = u64::from(layout[channels[0]]);
            // Until every group has announced itself its channels are placeholders.
            let seg = Segments {
                infos: Vec::new(),
                name: record_name(&d.name),
                frame_rate_hz: w.frame_rate_hz,
                counter_frequency_hz: counter,
                channels: layout
                    .iter()
                    .enumerate()
                    .map(|(i, &k)| ChannelSpec {
                        name: format!("sig{i}"),
                        gain: 200.0,
                        baseline: 0,
                        units: "mV".into(),
                        adc_resolution: 16,
                        adc_zero: 0,
                        samples_per_frame: k,
                    })
                    .collect(),
                records: Vec::new(),
            };
            let place = Place {
                record: key.clone(),
                channels,
                samples_per_frame: spf,
            };
            (key, place, seg)
        } else {
            let key = RecordKey::Stream(stream_id(s));
            let seg = Segments {
                infos: Vec::new(),
                name: record_name(&d.name),
                frame_rate_hz: w.sample_rate_hz,
                counter_frequency_hz: counter,
                channels: w.channels.iter().map(|c| channel_spec(c, 1)).collect(),
                records: Vec::new(),
            };
            let place = Place {
                record: key.clone(),
                channels: (0..w.channels.len()).collect(),
                samples_per_frame: 1,
            };
            (key, place, seg)
        };
        let seg = self.records.entry(key).or_insert(seg);
        if multi_rate {
            for (c, &at) in w.channels.iter().zip(&place.channels) {
                let spec = channel_spec(c, layout[at]);
                seg.channels[at] = spec.clone();
                for r in &mut seg.records {
                    r.describe_channel(at, spec.clone());
                }
            }
            // The record is named after the stream holding the source's first signal.
            if place.channels.contains(&0) && seg.records.is_empty() {
                seg.name = record_name(&d.name);
            }
        }
        seg.infos.push(info.clone());
        self.streams.insert(stream_id(s), place);
        Ok(())
    }

    /// Fills holes with the invalid value, writes the headers; returns (stream, header path),
    /// one per record (a stream with segments has several; a multi-rate record is listed
    /// under the first of its streams).
    pub fn finish(self) -> Result<Vec<(StreamId, PathBuf)>, WfdbError> {
        let mut out = Vec::new();
        for seg in self.records.into_values() {
            let mut ids: Vec<StreamId> = seg
                .infos
                .iter()
                .filter_map(|i| i.stream.as_ref().map(stream_id))
                .collect();
            ids.sort();
            let Some(id) = ids.first().cloned() else {
                continue;
            };
            let source = seg
                .infos
                .first()
                .and_then(|i| i.descriptor.as_ref())
                .and_then(|d| d.waveform.as_ref())
                .map(|w| w.source.clone())
                .unwrap_or_default();
            let streams: Vec<String> = ids.iter().map(|i| i.2.to_string()).collect();
            let comments = vec![
                format!(
                    "vehicle {} session {:016x} stream {}",
                    id.0,
                    id.1,
                    streams.join(",")
                ),
                format!(
                    "source {source}; written by ed-monitor from the ambulance telemetry relay"
                ),
            ];
            for record in seg.records {
                out.push((id.clone(), record.finish(&comments)?));
            }
        }
        out.sort();
        Ok(out)
    }
}

impl Segments {
    /// Writes a chunk into the record that reaches it, or starts a new one at its frame.
    fn write(
        &mut self,
        dir: &Path,
        max_gap: Duration,
        place: &Place,
        w: &WaveformChunk,
    ) -> Result<(), WfdbError> {
        let first = w.first_sample_index;
        let frame = first / place.samples_per_frame;
        let reach = (max_gap.as_secs_f64() * self.frame_rate_hz).min(u64::MAX as f64) as u64;
        // The latest-starting record that reaches this frame takes it.
        if let Some(r) = self
            .records
            .iter_mut()
            .filter(|r| r.reaches(frame))
            .max_by_key(|r| r.base())
        {
            return r.write_channels(&place.channels, first, &w.samples);
        }
        if self.records.len() >= MAX_SEGMENTS {
            return Err(WfdbError::Record(
                self.name.clone(),
                format!("more than {MAX_SEGMENTS} segments"),
            ));
        }
        // The first record starts at frame 0 unless the stream starts far into it (a
        // subscriber that joined late); later ones start where the data resumes.
        let base = if self.records.is_empty() && frame <= reach {
            0
        } else {
            frame
        };
        let name = match self.records.len() {
            0 => self.name.clone(),
            n => format!("{}_s{}", self.name, n + 1),
        };
        let mut record = Format16Writer::create(
            dir,
            &name,
            self.frame_rate_hz,
            self.channels.clone(),
            base,
            reach,
        )?
        .with_counter_frequency(self.counter_frequency_hz);
        record.write_channels(&place.channels, first, &w.samples)?;
        self.records.push(record);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_proto::model::{
        ChannelInfo, DataRecord, Frame, StreamDescriptor, WaveformInfo, frame::Payload,
    };

    fn stream() -> StreamRef {
        StreamRef {
            vehicle_id: "amb-1".into(),
            session_id: 7,
            stream_id: 0,
            kind: StreamKind::Waveform as i32,
        }
    }

    fn data(first: u64, samples: Vec<i32>) -> SubscribeResponse {
        SubscribeResponse {
            provisional: false,
            cursor: 0,
            record: Some(Record::Data(DataRecord {
                stream: Some(stream()),
                frame: Some(Frame {
                    stream_id: 0,
                    seq: 0,
                    capture_time_ns: 0,
                    payload: Some(Payload::Waveform(WaveformChunk {
                        first_sample_index: first,
                        sample_count: samples.len() as u32,
                        samples,
                        ..Default::default()
                    })),
                }),
                late: false,
                received_time_ns: 0,
                ..DataRecord::default()
            })),
        }
    }

    #[test]
    fn a_far_off_sample_index_starts_a_new_record_instead_of_filling() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = WfdbSink::with_max_gap_fill(dir.path(), Duration::from_secs(10));
        let info = StreamInfo {
            stream: Some(stream()),
            descriptor: Some(StreamDescriptor {
                stream_id: 0,
                kind: StreamKind::Waveform as i32,
                name: "ecg".into(),
                waveform: Some(WaveformInfo {
                    sample_rate_hz: 100.0,
                    channels: vec![ChannelInfo {
                        name: "II".into(),
                        unit: "mV".into(),
                        gain: 200.0,
                        ..ChannelInfo::default()
                    }],
                    ..WaveformInfo::default()
                }),
            }),
        };
        sink.handle(&SubscribeResponse {
            cursor: 0,
            record: Some(Record::Stream(info)),
            ..Default::default()
        })
        .unwrap();
        sink.handle(&data(0, vec![1, 2])).unwrap();
        sink.handle(&data(900, vec![3])).unwrap(); // a 9 s hole: filled
        sink.handle(&data(1 << 31, vec![4, 5])).unwrap(); // 250 days on: a new record
        sink.handle(&data(5, vec![6])).unwrap(); // late data for the first record
        assert_eq!(sink.received_samples(&stream_id(&stream())), 6);
        let written = sink.finish().unwrap();
        assert_eq!(written.len(), 2);
        let first = relay_wfdb::read_record(&written[0].1.with_extension("")).unwrap();
        assert_eq!(first.frames, 901);
        assert_eq!(first.samples[5], 6);
        let second = relay_wfdb::read_record(&written[1].1.with_extension("")).unwrap();
        assert_eq!(second.samples, vec![4, 5]);
        assert!(second.header.comments[0].contains(&(1u64 << 31).to_string()));
        let bytes: u64 = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(bytes < 10_000, "{bytes} bytes written");
    }
}
