//! Crash-safe spool on the router: every frame is put here before any bearer carries it and
//! deleted once the ingest acknowledged it (or it was evicted). After a crash or power cut the
//! agent resumes the same session and re-sends what the spool holds.
//!
//! Why redb: the ingest already stores with it (one engine to know), it is pure Rust (cross-builds
//! for aarch64/OpenWrt routers without a C toolchain), and its commits are copy-on-write B-tree
//! updates with a checksummed, double-buffered commit slot: a power cut during a commit leaves
//! the previous commit intact, with no write-ahead log to replay or compaction to run. On flash,
//! the working set is small (frames live seconds until acknowledged) and freed pages are reused,
//! so there is no growing log and little write amplification, unlike an LSM store (fjall),
//! whose compactions rewrite data that is about to be deleted anyway.
//!
//! Puts and deletes are batched into one transaction per `sync_interval` (fsync on commit):
//! at most that much produced data is at risk on power loss.
//!
//! Sequence numbers: frames may leave before their commit, so a restarted agent must never
//! reuse a number the ingest may already hold. Each commit reserves numbers ahead
//! (`SEQ_HEADROOM` frames per stream); frames beyond the durable reservation wait for the next
//! commit, and a restart continues after the reservation (the ingest marks the unused numbers
//! and the crash's hole as a gap).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use relay_proto::model::StreamDescriptor;
use relay_proto::wire::v1::Hello;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::scheduler::FrameId;

/// (stream id, seq) -> put time (UTC ns, 8 bytes LE) ++ kind (4 bytes LE) ++ encoded frame.
const FRAMES: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("frames");
/// "session" -> u64 LE; "streams" -> a Hello holding the stream descriptors.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// stream id -> first seq not yet reserved (a restart continues here).
const RESERVED: TableDefinition<u32, u64> = TableDefinition::new("reserved");

/// Sequence numbers reserved ahead of the highest one put, per stream and commit.
pub const SEQ_HEADROOM: u64 = 256;
/// Commands queued for the spool at most before producers wait.
const COMMAND_QUEUE: usize = 65_536;

/// Why the spool could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The spool file could not be opened or created.
    #[error("spool {path}: {source}")]
    Open {
        /// The spool file.
        path: PathBuf,
        /// What redb reported.
        #[source]
        source: redb::Error,
    },
    /// A transaction on the open spool failed (I/O error, full disk).
    #[error("spool: {0}")]
    Redb(#[from] redb::Error),
    /// The spool's directory could not be created, or a damaged file not moved aside.
    #[error("spool directory {path}: {source}")]
    Dir {
        /// The directory or file concerned.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The database was dropped after an I/O error and reopening it failed so far.
    #[error("spool closed after an I/O error and not yet reopened")]
    Closed,
}

/// The spool task is gone (it panicked or ended): frames can no longer be made crash-safe
/// and sequence numbers no longer reserved, so the agent must not go on as if they were.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the spool task has stopped: frames are no longer crash-safe")]
pub struct SpoolGone;

relay_ops::from_redb_errors!(SpoolError, Redb);

/// A frame read back from the spool.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredFrame {
    /// The frame's identity.
    pub id: FrameId,
    /// Its stream kind.
    pub kind: i32,
    /// When it was put (UTC ns).
    pub put_ns: i64,
    /// The encoded frame.
    pub bytes: Bytes,
}

/// What a (re)opened spool hands the agent.
#[derive(Debug)]
pub struct Opened {
    /// The session the agent continues or starts.
    pub session_id: u64,
    /// Whether the session of an earlier run continues.
    pub resumed: bool,
    /// Per stream: the first seq this run may use.
    pub seq_base: HashMap<u32, u64>,
    /// Unacknowledged frames of the earlier run, in (stream, seq) order.
    pub frames: Vec<StoredFrame>,
    /// Frames of an earlier run dropped because its streams differ from this run's.
    pub discarded: u64,
}

/// The spool file and what the agent keeps in memory about it.
#[derive(Debug)]
pub struct Spool {
    /// `None` only between dropping a database after an I/O error and reopening it.
    db: Option<Database>,
    path: PathBuf,
    /// Highest seq put per stream, and the durable reservation.
    highest: HashMap<u32, u64>,
    reserved: HashMap<u32, u64>,
    /// Depth bookkeeping for metrics: id -> (put time, bytes), and by age.
    index: HashMap<FrameId, (i64, usize)>,
    by_age: BTreeSet<(i64, FrameId)>,
    bytes: usize,
}

/// Bytes a stored value holds before the frame (put time and kind).
const VALUE_HEADER_BYTES: usize = 12;

fn encode_value(put_ns: i64, kind: i32, frame: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(VALUE_HEADER_BYTES + frame.len());
    v.extend_from_slice(&put_ns.to_le_bytes());
    v.extend_from_slice(&kind.to_le_bytes());
    v.extend_from_slice(frame);
    v
}

fn decode_value(v: &[u8]) -> Option<(i64, i32, &[u8])> {
    let put = i64::from_le_bytes(v.get(..8)?.try_into().ok()?);
    let kind = i32::from_le_bytes(v.get(8..12)?.try_into().ok()?);
    Some((put, kind, v.get(12..)?))
}

/// The file's content is unusable (as opposed to a missing directory, a full disk or a lock).
fn is_damage(e: &redb::StorageError) -> bool {
    match e {
        redb::StorageError::Corrupted(_) => true,
        redb::StorageError::Io(io) => io.kind() == std::io::ErrorKind::InvalidData,
        _ => false,
    }
}

impl Spool {
    /// Opens (or creates) the spool. If it holds a session with the same streams, that session
    /// continues; otherwise a new one starts and frames of the old one are dropped (counted).
    pub fn open(path: &Path, streams: &[StreamDescriptor]) -> Result<(Self, Opened), SpoolError> {
        // Patient data: owner-only file in an owner-only directory, from the start.
        let private = |path: &Path| {
            relay_ops::private::prepare_file(path).map_err(|source| SpoolError::Dir {
                path: path.to_owned(),
                source,
            })
        };
        private(path)?;
        let db = match Database::create(path) {
            // A damaged file must not keep the vehicle from streaming: it is kept aside for
            // inspection and a fresh spool starts (its frames are lost either way).
            Err(redb::DatabaseError::Storage(e)) if is_damage(&e) => {
                let why = e.to_string();
                let aside = path.with_extension("redb.corrupt");
                tracing::error!(path = %path.display(), aside = %aside.display(), %why, "spool corrupted; starting a fresh one");
                metrics::counter!("relay_agent_spool_errors_total").increment(1);
                std::fs::rename(path, &aside).map_err(|source| SpoolError::Dir {
                    path: aside.clone(),
                    source,
                })?;
                private(path)?;
                Database::create(path)
            }
            other => other,
        }
        .map_err(|e| SpoolError::Open {
            path: path.to_owned(),
            source: e.into(),
        })?;
        Self::from_database(db, path, streams)
    }

    /// Opens the spool on an already opened database (`path` names the file it lives in, for
    /// reopening after an I/O error). Tests pass a database on a failing storage backend.
    pub fn from_database(
        db: Database,
        path: &Path,
        streams: &[StreamDescriptor],
    ) -> Result<(Self, Opened), SpoolError> {
        let wanted = Hello {
            streams: streams.to_vec(),
            ..Hello::default()
        }
        .encode_to_vec();
        let (stored_session, stored_streams) = {
            let txn = db.begin_read()?;
            match txn.open_table(META) {
                Ok(t) => {
                    let session = t
                        .get("session")?
                        .and_then(|v| v.value().try_into().ok().map(u64::from_le_bytes));
                    let streams = t.get("streams")?.map(|v| v.value().to_vec());
                    (session, streams)
                }
                Err(redb::TableError::TableDoesNotExist(_)) => (None, None),
                Err(e) => return Err(e.into()),
            }
        };
        let resumed = stored_session.is_some() && stored_streams.as_deref() == Some(&wanted[..]);
        let mut spool = Self {
            db: Some(db),
            path: path.to_owned(),
            highest: HashMap::new(),
            reserved: HashMap::new(),
            index: HashMap::new(),
            by_age: BTreeSet::new(),
            bytes: 0,
        };
        let mut frames = Vec::new();
        let mut discarded = 0;
        let session_id = match (resumed, stored_session) {
            (true, Some(s)) => s,
            _ => rand::random(),
        };
        let txn = spool.db()?.begin_write()?;
        {
            let mut table = txn.open_table(FRAMES)?;
            let mut reserved = txn.open_table(RESERVED)?;
            if resumed {
                for item in reserved.iter()? {
                    let (k, v) = item?;
                    spool.reserved.insert(k.value(), v.value());
                }
                for item in table.iter()? {
                    let (k, v) = item?;
                    let (stream_id, seq) = k.value();
                    let Some((put_ns, kind, frame)) = decode_value(v.value()) else {
                        continue;
                    };
                    frames.push(StoredFrame {
                        id: FrameId { stream_id, seq },
                        kind,
                        put_ns,
                        bytes: Bytes::copy_from_slice(frame),
                    });
                }
            } else {
                discarded = table.len()?;
                table.retain(|_, _| false)?;
                reserved.retain(|_, _| false)?;
                let mut meta = txn.open_table(META)?;
                meta.insert("session", &session_id.to_le_bytes()[..])?;
                meta.insert("streams", &wanted[..])?;
            }
            // This run's numbers start after everything reserved before; reserve ahead now so
            // the first frames need not wait for a commit.
            for s in streams {
                let base = spool.reserved.get(&s.stream_id).copied().unwrap_or(0);
                spool.highest.insert(s.stream_id, base);
                let ahead = base + SEQ_HEADROOM;
                reserved.insert(s.stream_id, ahead)?;
                spool.reserved.insert(s.stream_id, ahead);
            }
        }
        txn.commit()?;
        for f in &frames {
            spool.track(f.id, f.put_ns, f.bytes.len() + VALUE_HEADER_BYTES);
        }
        let seq_base = streams
            .iter()
            .map(|s| {
                let base = spool.highest.get(&s.stream_id).copied().unwrap_or(0);
                (s.stream_id, base)
            })
            .collect();
        // `highest` holds the next seq to use until the first put.
        Ok((
            spool,
            Opened {
                session_id,
                resumed,
                seq_base,
                frames,
                discarded,
            },
        ))
    }

    fn track(&mut self, id: FrameId, put_ns: i64, len: usize) {
        if let Some((old_put, old_len)) = self.index.insert(id, (put_ns, len)) {
            self.by_age.remove(&(old_put, id));
            self.bytes -= old_len;
        }
        self.by_age.insert((put_ns, id));
        self.bytes += len;
    }

    fn untrack(&mut self, id: FrameId) {
        if let Some((put, len)) = self.index.remove(&id) {
            self.by_age.remove(&(put, id));
            self.bytes -= len;
        }
    }

    fn db(&self) -> Result<&Database, SpoolError> {
        self.db.as_ref().ok_or(SpoolError::Closed)
    }

    /// Reopens the file after a failed commit: redb refuses every later transaction on a
    /// database that saw an I/O error, and reopening runs its repair. The in-memory state is
    /// kept: it describes only what earlier, successful commits made durable.
    pub fn reopen(&mut self) -> Result<(), SpoolError> {
        // The old handle must be gone first: it holds the file lock.
        self.db = None;
        let db = Database::create(&self.path).map_err(|e| SpoolError::Open {
            path: self.path.clone(),
            source: e.into(),
        })?;
        self.db = Some(db);
        Ok(())
    }

    /// Writes one batch durably (fsync) and returns the reservations now durable. Nothing in
    /// memory changes unless the commit succeeded, so a failed batch can be retried as it is
    /// and no reservation is ever published before it is on disk.
    pub fn commit(&mut self, batch: &[SpoolCmd]) -> Result<HashMap<u32, u64>, SpoolError> {
        let mut highest = self.highest.clone();
        let mut reserved = self.reserved.clone();
        let txn = self.db()?.begin_write()?;
        {
            let mut table = txn.open_table(FRAMES)?;
            for cmd in batch {
                match cmd {
                    SpoolCmd::Put {
                        id,
                        kind,
                        put_ns,
                        bytes,
                    } => {
                        let value = encode_value(*put_ns, *kind, bytes);
                        table.insert((id.stream_id, id.seq), &value[..])?;
                        let h = highest.entry(id.stream_id).or_default();
                        *h = (*h).max(id.seq + 1);
                    }
                    SpoolCmd::Delete(id) => {
                        table.remove((id.stream_id, id.seq))?;
                    }
                }
            }
            let mut table = txn.open_table(RESERVED)?;
            for (&stream, &next) in &highest {
                let r = reserved.get(&stream).copied().unwrap_or(0);
                if next + SEQ_HEADROOM / 2 > r {
                    let ahead = next + SEQ_HEADROOM;
                    table.insert(stream, ahead)?;
                    reserved.insert(stream, ahead);
                }
            }
        }
        txn.commit()?;
        for cmd in batch {
            match cmd {
                SpoolCmd::Put {
                    id, put_ns, bytes, ..
                } => self.track(*id, *put_ns, bytes.len() + VALUE_HEADER_BYTES),
                SpoolCmd::Delete(id) => self.untrack(*id),
            }
        }
        self.highest = highest;
        self.reserved = reserved;
        Ok(self.reserved.clone())
    }

    /// Sequence numbers reserved durably, per stream (the first not reserved).
    pub fn reserved(&self) -> HashMap<u32, u64> {
        self.reserved.clone()
    }

    /// Frames and bytes held, and the put time of the oldest (UTC ns).
    pub fn depth(&self) -> (usize, usize, Option<i64>) {
        (
            self.index.len(),
            self.bytes,
            self.by_age.first().map(|(t, _)| *t),
        )
    }
}

#[derive(Debug, Clone)]
/// One change for the next commit.
pub enum SpoolCmd {
    /// Keep a frame.
    Put {
        /// Its identity.
        id: FrameId,
        /// Its stream kind.
        kind: i32,
        /// When it was put (UTC ns).
        put_ns: i64,
        /// The encoded frame.
        bytes: Bytes,
    },
    /// Forget a frame (acknowledged or evicted).
    Delete(FrameId),
}

/// Handle of the spool task.
#[derive(Debug, Clone)]
pub struct SpoolHandle {
    tx: mpsc::Sender<SpoolCmd>,
    reserved: watch::Receiver<HashMap<u32, u64>>,
}

impl SpoolHandle {
    /// Queues a frame for the next commit.
    pub async fn put(&self, id: FrameId, kind: i32, bytes: Bytes) -> Result<(), SpoolGone> {
        let put_ns = crate::now_utc_ns();
        self.tx
            .send(SpoolCmd::Put {
                id,
                kind,
                put_ns,
                bytes,
            })
            .await
            .map_err(|_| SpoolGone)
    }

    /// Queues the deletion of acknowledged or evicted frames for the next commit.
    pub async fn delete(&self, ids: impl IntoIterator<Item = FrameId>) -> Result<(), SpoolGone> {
        for id in ids {
            self.tx
                .send(SpoolCmd::Delete(id))
                .await
                .map_err(|_| SpoolGone)?;
        }
        Ok(())
    }

    /// Waits until `seq` of `stream` is durably reserved (it may leave the vehicle).
    pub async fn reserved_beyond(&mut self, stream: u32, seq: u64) -> Result<(), SpoolGone> {
        self.reserved
            .wait_for(|r| r.get(&stream).is_some_and(|&n| seq < n))
            .await
            .map(|_| ())
            .map_err(|_| SpoolGone)
    }
}

/// Runs the spool: commits what arrived every `sync_interval` until `finish` fires (or every
/// handle is dropped), then commits what is queued and ends.
///
/// A failed commit changes nothing in memory: its batch is kept and retried first in the next
/// round, after the database was reopened (redb refuses further transactions after an I/O
/// error); meanwhile reservations do not advance, so the intake waits rather than let numbers
/// leave that a restart could reuse. Errors are logged and counted. If the task itself dies,
/// every handle call returns [`SpoolGone`].
pub fn start(
    spool: Spool,
    sync_interval: Duration,
    finish: CancellationToken,
) -> (SpoolHandle, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel(COMMAND_QUEUE);
    let (reserved_tx, reserved_rx) = watch::channel(spool.reserved());
    metrics::gauge!("relay_agent_spool_up").set(1.0);
    let task = tokio::spawn(async move {
        let mut spool = Some(spool);
        let mut open = true;
        // What a failed commit left to write; retried before anything newer.
        let mut batch: Vec<SpoolCmd> = Vec::new();
        let mut needs_reopen = false;
        while open || !batch.is_empty() {
            let deadline = tokio::time::Instant::now() + sync_interval;
            while open {
                tokio::select! {
                    cmd = rx.recv() => match cmd {
                        Some(c) => batch.push(c),
                        None => open = false,
                    },
                    () = tokio::time::sleep_until(deadline) => break,
                    () = finish.cancelled() => {
                        while let Ok(c) = rx.try_recv() {
                            batch.push(c);
                        }
                        open = false;
                    }
                }
            }
            if batch.is_empty() {
                continue;
            }
            let Some(mut s) = spool.take() else { break };
            let started = tokio::time::Instant::now();
            let reopen = needs_reopen;
            let work = std::mem::take(&mut batch);
            let joined = tokio::task::spawn_blocking(move || {
                let r = if reopen { s.reopen() } else { Ok(()) }.and_then(|()| s.commit(&work));
                (s, work, r)
            })
            .await;
            let (s, work, result) = match joined {
                Ok(v) => v,
                Err(e) => {
                    // Dropping the receiver and the watch makes every handle see SpoolGone.
                    metrics::counter!("relay_agent_spool_errors_total").increment(1);
                    metrics::gauge!("relay_agent_spool_up").set(0.0);
                    tracing::error!(error = %e, "spool task died; frames are no longer crash-safe");
                    return;
                }
            };
            metrics::histogram!("relay_agent_spool_commit_seconds")
                .record(started.elapsed().as_secs_f64());
            match result {
                Ok(reserved) => {
                    needs_reopen = false;
                    reserved_tx.send_replace(reserved);
                }
                Err(e) => {
                    metrics::counter!("relay_agent_spool_errors_total").increment(1);
                    tracing::error!(error = %e, commands = work.len(), "spool commit failed; retrying");
                    needs_reopen = true;
                    batch = work;
                    if !open {
                        // Stopping: one more try was made above; what is left is lost as on a
                        // power cut, and the next start resumes from the last commit.
                        break;
                    }
                }
            }
            let (frames, bytes, oldest) = s.depth();
            metrics::gauge!("relay_agent_spool_frames").set(frames as f64);
            metrics::gauge!("relay_agent_spool_bytes").set(bytes as f64);
            let age = oldest.map_or(0.0, |t| {
                (crate::now_utc_ns().saturating_sub(t)).max(0) as f64 / 1e9
            });
            metrics::gauge!("relay_agent_spool_oldest_frame_age_seconds").set(age);
            spool = Some(s);
        }
    });
    (
        SpoolHandle {
            tx,
            reserved: reserved_rx,
        },
        task,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_proto::model::StreamKind;

    fn stream(id: u32, kind: StreamKind) -> StreamDescriptor {
        StreamDescriptor {
            stream_id: id,
            kind: kind as i32,
            name: format!("s{id}"),
            waveform: None,
        }
    }

    fn put(stream_id: u32, seq: u64, data: &'static [u8]) -> SpoolCmd {
        SpoolCmd::Put {
            id: FrameId { stream_id, seq },
            kind: 2,
            put_ns: 1_000 + seq as i64,
            bytes: Bytes::from_static(data),
        }
    }

    #[test]
    fn reopened_spool_resumes_the_session_with_what_was_not_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool/agent.redb");
        let streams = vec![
            stream(0, StreamKind::Waveform),
            stream(1, StreamKind::Vitals),
        ];
        let (mut s, first) = Spool::open(&path, &streams).unwrap();
        assert!(!first.resumed);
        assert_eq!(first.seq_base[&0], 0);
        s.commit(&[put(0, 0, b"a"), put(0, 1, b"b"), put(1, 0, b"c")])
            .unwrap();
        s.commit(&[SpoolCmd::Delete(FrameId {
            stream_id: 0,
            seq: 0,
        })])
        .unwrap();
        assert_eq!(s.depth().0, 2);
        assert_eq!(
            s.depth().2,
            Some(1_000),
            "stream 1 seq 0 is the oldest left"
        );
        drop(s);

        let (s, again) = Spool::open(&path, &streams).unwrap();
        assert!(again.resumed);
        assert_eq!(again.session_id, first.session_id);
        let got: Vec<(u32, u64, &[u8])> = again
            .frames
            .iter()
            .map(|f| (f.id.stream_id, f.id.seq, &f.bytes[..]))
            .collect();
        assert_eq!(got, vec![(0, 1, &b"b"[..]), (1, 0, &b"c"[..])]);
        assert_eq!(again.frames[0].kind, 2);
        // Numbers continue after everything reserved before: none can be reused.
        assert_eq!(again.seq_base[&0], SEQ_HEADROOM);
        assert_eq!(s.reserved()[&0], 2 * SEQ_HEADROOM);
        assert_eq!(s.depth().0, 2);
    }

    #[cfg(unix)]
    #[test]
    fn the_spool_is_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/spool.redb");
        let (s, _) = Spool::open(&path, &[stream(0, StreamKind::Waveform)]).unwrap();
        drop(s);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.path().join("state")), 0o700);
    }

    #[test]
    fn reservations_move_ahead_of_what_is_put() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.redb");
        let (mut s, _) = Spool::open(&path, &[stream(0, StreamKind::Waveform)]).unwrap();
        let r = s.commit(&[put(0, 10, b"x")]).unwrap();
        assert_eq!(r[&0], SEQ_HEADROOM, "far enough ahead still");
        let r = s.commit(&[put(0, SEQ_HEADROOM / 2, b"x")]).unwrap();
        assert_eq!(r[&0], SEQ_HEADROOM / 2 + 1 + SEQ_HEADROOM);
    }

    #[test]
    fn other_streams_start_a_new_session_and_drop_the_old_frames() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.redb");
        let (mut s, first) = Spool::open(&path, &[stream(0, StreamKind::Waveform)]).unwrap();
        s.commit(&[put(0, 0, b"a")]).unwrap();
        drop(s);
        let (_, other) = Spool::open(
            &path,
            &[
                stream(0, StreamKind::Waveform),
                stream(1, StreamKind::Location),
            ],
        )
        .unwrap();
        assert!(!other.resumed);
        assert_ne!(other.session_id, first.session_id);
        assert_eq!((other.discarded, other.frames.len()), (1, 0));
        assert_eq!(other.seq_base[&0], 0);
    }

    #[test]
    fn a_corrupted_file_is_kept_aside_and_a_fresh_spool_starts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.redb");
        std::fs::write(&path, vec![0x5a; 64 * 1024]).unwrap();
        let (_, opened) = Spool::open(&path, &[stream(0, StreamKind::Waveform)]).unwrap();
        assert!(!opened.resumed);
        assert!(opened.frames.is_empty());
        assert!(
            dir.path().join("a.redb.corrupt").exists(),
            "kept for inspection"
        );
    }

    #[tokio::test]
    async fn the_task_commits_in_batches_and_publishes_reservations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.redb");
        let streams = [stream(0, StreamKind::Waveform)];
        let (s, _) = Spool::open(&path, &streams).unwrap();
        let (mut h, task) = start(s, Duration::from_millis(20), CancellationToken::new());
        for seq in 0..200 {
            h.reserved_beyond(0, seq).await.unwrap();
            h.put(FrameId { stream_id: 0, seq }, 2, Bytes::from_static(b"f"))
                .await
                .unwrap();
        }
        // Beyond the first reservation: waits for a commit that moves it.
        tokio::time::timeout(
            Duration::from_secs(10),
            h.reserved_beyond(0, SEQ_HEADROOM + 10),
        )
        .await
        .unwrap()
        .unwrap();
        h.delete((0..100).map(|seq| FrameId { stream_id: 0, seq }))
            .await
            .unwrap();
        drop(h);
        task.await.unwrap();
        let (_, again) = Spool::open(&path, &streams).unwrap();
        assert_eq!(again.frames.len(), 100);
        assert_eq!(again.frames[0].id.seq, 100);
    }

    /// A storage backend that fails every fsync while `fail` is set, like flash that went
    /// read-only or a full disk.
    #[derive(Debug)]
    struct FlakyBackend {
        inner: redb::backends::FileBackend,
        fail: std::sync::Arc<std::sync::atomic::AtomicBool>,
    }

    impl redb::StorageBackend for FlakyBackend {
        fn len(&self) -> Result<u64, std::io::Error> {
            self.inner.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
            self.inner.read(offset, out)
        }
        fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
            self.inner.set_len(len)
        }
        fn sync_data(&self) -> Result<(), std::io::Error> {
            if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(std::io::Error::other("injected fsync failure"));
            }
            self.inner.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
            self.inner.write(offset, data)
        }
    }

    #[test]
    fn a_failed_commit_changes_nothing_and_a_restart_never_reuses_a_published_number() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.redb");
        let streams = [stream(0, StreamKind::Waveform)];
        let fail = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .unwrap();
        let backend = FlakyBackend {
            inner: redb::backends::FileBackend::new(file).unwrap(),
            fail: fail.clone(),
        };
        let db = Database::builder().create_with_backend(backend).unwrap();
        let (mut s, _) = Spool::from_database(db, &path, &streams).unwrap();
        s.commit(&[put(0, 0, b"a")]).unwrap();
        let before = s.reserved();
        assert_eq!(before[&0], SEQ_HEADROOM);

        // This batch would move the reservation; its commit fails.
        fail.store(true, std::sync::atomic::Ordering::SeqCst);
        let batch = [put(0, SEQ_HEADROOM - 1, b"b")];
        assert!(s.commit(&batch).is_err());
        assert_eq!(
            s.reserved(),
            before,
            "nothing published that is not on disk"
        );
        assert_eq!(s.depth().0, 1, "the failed put is not counted as held");

        // The disk recovers; the spool task reopens and retries the same batch.
        fail.store(false, std::sync::atomic::Ordering::SeqCst);
        s.reopen().unwrap();
        let published = s.commit(&batch).unwrap();
        assert_eq!(published[&0], 2 * SEQ_HEADROOM);
        assert_eq!(s.depth().0, 2);
        drop(s);

        // A restart continues after every number that was ever published.
        let (_, again) = Spool::open(&path, &streams).unwrap();
        assert!(again.resumed);
        assert_eq!(again.seq_base[&0], published[&0]);
        let seqs: Vec<u64> = again.frames.iter().map(|f| f.id.seq).collect();
        assert_eq!(seqs, vec![0, SEQ_HEADROOM - 1]);
    }

    #[tokio::test]
    async fn handles_report_a_dead_spool_task() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.redb");
        let (s, _) = Spool::open(&path, &[stream(0, StreamKind::Waveform)]).unwrap();
        let (mut h, task) = start(s, Duration::from_millis(20), CancellationToken::new());
        task.abort();
        let _ = task.await;
        let id = FrameId {
            stream_id: 0,
            seq: 0,
        };
        assert_eq!(h.put(id, 2, Bytes::from_static(b"f")).await, Err(SpoolGone));
        assert_eq!(h.delete([id]).await, Err(SpoolGone));
        assert_eq!(h.reserved_beyond(0, SEQ_HEADROOM).await, Err(SpoolGone));
    }
}
