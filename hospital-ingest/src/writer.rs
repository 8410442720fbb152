//! The single store writer: batches frames from every connection into one transaction,
//! runs reassembly, commits durably, then acknowledges and publishes what was committed.
//! It runs on its own thread because redb is synchronous and a commit waits for fsync.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use relay_proto::model::{
    DataRecord, Frame, GapClosed, GapRecord, StreamDescriptor, StreamInfo, StreamKind, StreamRef,
    SubscribeResponse, frame::Payload, subscribe_response::Record,
};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::reassembly::{Reassembler, StreamKey, Verdict};
use crate::store::{LogEntry, SeqRef, Store, StoreError};

/// Frames written per transaction at most; bounds commit latency and memory.
const MAX_BATCH: usize = 1024;
/// Open gaps tracked per stream.
const MAX_GAPS_PER_STREAM: usize = 65_536;

/// (stream id, seq) the ingest now holds durably.
pub type AckSender = mpsc::Sender<(u32, u64)>;

#[derive(Debug)]
pub enum WriterCmd {
    /// Registers the streams of a vehicle session (from its Hello).
    Streams {
        vehicle: Arc<str>,
        session: u64,
        streams: Vec<StreamDescriptor>,
        done: oneshot::Sender<Result<(), String>>,
    },
    Frame {
        vehicle: Arc<str>,
        session: u64,
        frame: Frame,
        received_ns: i64,
        ack: AckSender,
    },
}

#[derive(Debug, Clone)]
pub struct RetentionPolicy {
    pub max_age: Duration,
    pub max_bytes: u64,
    pub interval: Duration,
}

struct StreamMeta {
    kind: i32,
    rate_hz: f64,
}

struct Writer {
    store: Store,
    reassembler: Reassembler,
    meta: HashMap<StreamKey, StreamMeta>,
    bus: broadcast::Sender<Arc<LogEntry>>,
}

fn stream_ref(key: &StreamKey, kind: i32) -> StreamRef {
    StreamRef {
        vehicle_id: key.vehicle.to_string(),
        session_id: key.session,
        stream_id: key.stream_id,
        kind,
    }
}

/// Capture time just after the last sample of `frame`.
fn frame_end_ns(frame: &Frame, rate_hz: f64) -> i64 {
    match &frame.payload {
        Some(Payload::Waveform(w)) if rate_hz > 0.0 => frame
            .capture_time_ns
            .saturating_add((w.sample_count as f64 * 1e9 / rate_hz).round() as i64),
        _ => frame.capture_time_ns,
    }
}

impl Writer {
    fn open(store: Store, bus: broadcast::Sender<Arc<LogEntry>>) -> Result<Self, StoreError> {
        let mut meta = HashMap::new();
        for info in store.streams()? {
            if let (Some(s), Some(d)) = (info.stream, info.descriptor) {
                let key = StreamKey {
                    vehicle: s.vehicle_id.into(),
                    session: s.session_id,
                    stream_id: s.stream_id,
                };
                let rate_hz = d.waveform.map_or(0.0, |w| w.sample_rate_hz);
                meta.insert(
                    key,
                    StreamMeta {
                        kind: d.kind,
                        rate_hz,
                    },
                );
            }
        }
        let mut reassembler = Reassembler::new(MAX_GAPS_PER_STREAM);
        for (key, seqs, last_cursor) in store.stored_seqs()? {
            let rate = meta.get(&key).map_or(0.0, |m| m.rate_hz);
            let end = match store.record(last_cursor)?.and_then(|m| m.record) {
                Some(Record::Data(DataRecord { frame: Some(f), .. })) => frame_end_ns(&f, rate),
                _ => 0,
            };
            reassembler.restore(key, seqs, end);
        }
        Ok(Self {
            store,
            reassembler,
            meta,
            bus,
        })
    }

    fn run_batch(&mut self, cmds: Vec<WriterCmd>) -> Result<(), StoreError> {
        let now = crate::now_utc_ns();
        let mut batch = self.store.begin()?;
        let mut acks: Vec<(AckSender, u32, u64)> = Vec::new();
        let mut replies = Vec::new();
        let mut touched: HashSet<Arc<str>> = HashSet::new();
        for cmd in cmds {
            match cmd {
                WriterCmd::Streams {
                    vehicle,
                    session,
                    streams,
                    done,
                } => {
                    for d in streams {
                        let key = StreamKey {
                            vehicle: vehicle.clone(),
                            session,
                            stream_id: d.stream_id,
                        };
                        let rate_hz = d.waveform.as_ref().map_or(0.0, |w| w.sample_rate_hz);
                        let info = StreamInfo {
                            stream: Some(stream_ref(&key, d.kind)),
                            descriptor: Some(d.clone()),
                        };
                        if batch.put_stream(&info, now)? {
                            let msg = SubscribeResponse {
                                cursor: 0,
                                record: Some(Record::Stream(info)),
                            };
                            batch.append(&vehicle, d.kind, msg, None)?;
                        }
                        self.meta.insert(
                            key,
                            StreamMeta {
                                kind: d.kind,
                                rate_hz,
                            },
                        );
                    }
                    touched.insert(vehicle);
                    replies.push(done);
                }
                WriterCmd::Frame {
                    vehicle,
                    session,
                    frame,
                    received_ns,
                    ack,
                } => {
                    let key = StreamKey {
                        vehicle: vehicle.clone(),
                        session,
                        stream_id: frame.stream_id,
                    };
                    let seq_ref = SeqRef {
                        vehicle: &vehicle,
                        session,
                        stream_id: frame.stream_id,
                        seq: frame.seq,
                    };
                    let (kind, rate) = self
                        .meta
                        .get(&key)
                        .map_or((StreamKind::Unspecified as i32, 0.0), |m| {
                            (m.kind, m.rate_hz)
                        });
                    if batch.contains(seq_ref)? {
                        metrics::counter!("relay_ingest_frames_duplicate_total").increment(1);
                    } else {
                        let end = frame_end_ns(&frame, rate);
                        match self
                            .reassembler
                            .on_frame(&key, frame.seq, frame.capture_time_ns, end)
                        {
                            Verdict::Stale => {
                                metrics::counter!("relay_ingest_frames_duplicate_total")
                                    .increment(1);
                            }
                            Verdict::Accept { late, gap, closed } => {
                                let sref = stream_ref(&key, kind);
                                if let Some(g) = gap {
                                    metrics::counter!("relay_ingest_gaps_total").increment(1);
                                    let rec = GapRecord {
                                        stream: Some(sref.clone()),
                                        start_seq: g.start_seq,
                                        end_seq: g.end_seq,
                                        start_time_ns: g.start_time_ns,
                                        end_time_ns: g.end_time_ns,
                                    };
                                    batch.append(
                                        &vehicle,
                                        kind,
                                        SubscribeResponse {
                                            cursor: 0,
                                            record: Some(Record::Gap(rec)),
                                        },
                                        None,
                                    )?;
                                }
                                let seq = frame.seq;
                                let data = DataRecord {
                                    stream: Some(sref.clone()),
                                    frame: Some(frame),
                                    late,
                                    received_time_ns: received_ns,
                                };
                                batch.append(
                                    &vehicle,
                                    kind,
                                    SubscribeResponse {
                                        cursor: 0,
                                        record: Some(Record::Data(data)),
                                    },
                                    Some(SeqRef {
                                        vehicle: &vehicle,
                                        session,
                                        stream_id: key.stream_id,
                                        seq,
                                    }),
                                )?;
                                metrics::counter!("relay_ingest_frames_stored_total", "kind" => crate::metrics::kind_label(kind)).increment(1);
                                if late {
                                    metrics::counter!("relay_ingest_frames_late_total")
                                        .increment(1);
                                }
                                if let Some((start_seq, end_seq)) = closed {
                                    let rec = GapClosed {
                                        stream: Some(sref),
                                        start_seq,
                                        end_seq,
                                    };
                                    batch.append(
                                        &vehicle,
                                        kind,
                                        SubscribeResponse {
                                            cursor: 0,
                                            record: Some(Record::GapClosed(rec)),
                                        },
                                        None,
                                    )?;
                                }
                            }
                        }
                        acks.push((ack, key.stream_id, seq_ref.seq));
                        touched.insert(vehicle);
                        continue;
                    }
                    acks.push((ack, frame.stream_id, frame.seq));
                    touched.insert(vehicle);
                }
            }
        }
        for v in &touched {
            batch.touch_vehicle(v, now)?;
        }
        let started = tokio::time::Instant::now();
        let appended = batch.commit()?;
        metrics::histogram!("relay_ingest_store_commit_seconds")
            .record(started.elapsed().as_secs_f64());
        // Durable now: acknowledge, answer, publish.
        for (tx, stream, seq) in acks {
            if tx.try_send((stream, seq)).is_err() {
                // The connection is gone or not draining its acks; it will be closed for the
                // latter, and the agent re-sends unacknowledged frames after reconnecting.
                metrics::counter!("relay_ingest_acks_dropped_total").increment(1);
            }
        }
        for r in replies {
            let _ = r.send(Ok(()));
        }
        for e in appended {
            // No subscriber is fine: the log holds it.
            let _ = self.bus.send(Arc::new(e));
        }
        Ok(())
    }
}

/// Starts the writer thread. Returns the command sender; the thread ends when every sender is
/// dropped, after finishing its last batch.
pub fn spawn(
    store: Store,
    bus: broadcast::Sender<Arc<LogEntry>>,
    queue: usize,
    retention: RetentionPolicy,
    runtime: tokio::runtime::Handle,
) -> Result<(mpsc::Sender<WriterCmd>, std::thread::JoinHandle<()>), StoreError> {
    let mut writer = Writer::open(store, bus)?;
    let (tx, mut rx) = mpsc::channel::<WriterCmd>(queue);
    let handle = std::thread::Builder::new()
        .name("store-writer".into())
        .spawn(move || {
            let mut last_sweep = tokio::time::Instant::now();
            loop {
                let first = runtime
                    .block_on(async { tokio::time::timeout(retention.interval, rx.recv()).await });
                let mut cmds = Vec::new();
                match first {
                    Ok(Some(cmd)) => cmds.push(cmd),
                    Ok(None) => break,
                    Err(_) => {}
                }
                while cmds.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(c) => cmds.push(c),
                        Err(_) => break,
                    }
                }
                metrics::gauge!("relay_ingest_store_queue_depth").set(rx.len() as f64);
                if !cmds.is_empty()
                    && let Err(e) = writer.run_batch(cmds)
                {
                    // Nothing was acknowledged; agents keep their frames and re-send. The
                    // reassembler saw frames that were not stored: rebuild it from the store.
                    tracing::error!(error = %e, "store commit failed; batch not acknowledged");
                    metrics::counter!("relay_ingest_store_errors_total").increment(1);
                    match Writer::open(writer.store.clone(), writer.bus.clone()) {
                        Ok(w) => writer = w,
                        Err(e) => {
                            tracing::error!(error = %e, "reloading reassembly state failed")
                        }
                    }
                }
                if last_sweep.elapsed() >= retention.interval {
                    last_sweep = tokio::time::Instant::now();
                    let cutoff = crate::now_utc_ns().saturating_sub(
                        i64::try_from(retention.max_age.as_nanos()).unwrap_or(i64::MAX),
                    );
                    match writer
                        .store
                        .enforce_retention(cutoff, retention.max_bytes, 100_000)
                    {
                        Ok(outcome) => {
                            metrics::counter!("relay_ingest_retention_deleted_total")
                                .increment(outcome.deleted);
                            metrics::gauge!("relay_ingest_store_log_bytes")
                                .set(outcome.bytes_left as f64);
                            for key in outcome.pruned_streams {
                                writer.reassembler.forget(&key);
                                writer.meta.remove(&key);
                            }
                        }
                        Err(e) => tracing::error!(error = %e, "retention sweep failed"),
                    }
                }
            }
            tracing::debug!("store writer stopped");
        })
        .map_err(|e| StoreError::Redb(redb::Error::Io(e)))?;
    Ok((tx, handle))
}
