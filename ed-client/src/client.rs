//! ED-side client library: a TLS gRPC connection to the ingest, a resumable subscription,
//! and a sink that writes every waveform stream it receives as a WFDB record.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use relay_proto::model::telemetry_client::TelemetryClient;
use relay_proto::model::{
    StreamInfo, StreamKind, StreamRef, SubscribeResponse, frame::Payload,
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

/// Connects to `url` (e.g. `https://127.0.0.1:50051`) with mutual TLS.
pub async fn connect(url: &str, tls: &ClientTls) -> Result<TelemetryClient<Channel>, ClientError> {
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
    let channel = Channel::from_shared(url.to_owned())
        .map_err(|_| ClientError::Address(url.to_owned()))?
        .tls_config(tls_cfg)?
        .connect()
        .await?;
    Ok(TelemetryClient::new(channel)
        .max_decoding_message_size(relay_proto::DEFAULT_MAX_FRAME_BYTES * 2))
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

/// Writes every waveform stream as `<dir>/<vehicle>_<stream>_<session>` in WFDB format 16.
#[derive(Debug)]
pub struct WfdbSink {
    dir: PathBuf,
    writers: HashMap<StreamId, (Format16Writer, StreamInfo)>,
}

impl WfdbSink {
    /// A sink writing one record per waveform stream into `dir`.
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            writers: HashMap::new(),
        }
    }

    /// Samples per channel received so far for a stream.
    pub fn received_samples(&self, id: &StreamId) -> u64 {
        self.writers
            .get(id)
            .map_or(0, |(w, _)| w.received_samples())
    }

    /// The streams it has seen so far.
    pub fn streams(&self) -> impl Iterator<Item = &StreamId> {
        self.writers.keys()
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
                match self.writers.get_mut(&stream_id(s)) {
                    Some((writer, _)) => writer.write(w.first_sample_index, &w.samples),
                    None => Ok(()), // a stream never announced cannot be interpreted; skip
                }
            }
            _ => Ok(()),
        }
    }

    fn open(&mut self, info: &StreamInfo) -> Result<(), WfdbError> {
        let (Some(s), Some(d)) = (&info.stream, &info.descriptor) else {
            return Ok(());
        };
        if s.kind != StreamKind::Waveform as i32 || self.writers.contains_key(&stream_id(s)) {
            return Ok(());
        }
        let Some(w) = &d.waveform else { return Ok(()) };
        let name = format!(
            "{}_{}_{:08x}",
            sanitize(&s.vehicle_id),
            sanitize(&d.name),
            s.session_id as u32
        );
        let channels = w
            .channels
            .iter()
            .map(|c| ChannelSpec {
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
            })
            .collect();
        let writer = Format16Writer::create(&self.dir, &name, w.sample_rate_hz, channels)?;
        self.writers.insert(stream_id(s), (writer, info.clone()));
        Ok(())
    }

    /// Fills holes with the invalid value, writes the headers; returns (stream, header path).
    pub fn finish(self) -> Result<Vec<(StreamId, PathBuf)>, WfdbError> {
        let mut out = Vec::new();
        for (id, (writer, info)) in self.writers {
            let source = info
                .descriptor
                .as_ref()
                .and_then(|d| d.waveform.as_ref())
                .map(|w| w.source.clone())
                .unwrap_or_default();
            let comments = vec![
                format!("vehicle {} session {:016x} stream {}", id.0, id.1, id.2),
                format!(
                    "source {source}; written by ed-monitor from the ambulance telemetry relay"
                ),
            ];
            out.push((id, writer.finish(&comments)?));
        }
        out.sort();
        Ok(out)
    }
}
