//! Tamper-evident access audit: who read which patient's data, and every security-relevant
//! event. Data flow: callers hand an [`AuditEvent`] to the [`AuditLog`] handle -> a writer
//! thread seals it into a JSON line with the sans-IO [`Chain`] (sequence number, time, and the
//! SHA-256 of the previous line) -> appends, fsyncs, rotates by size (the chain continues
//! across files). [`verify`] checks the chain and names the first broken line; [`query`]
//! answers "who saw this patient's data".
//!
//! Record fields follow IHE ATNA / DICOM PS3.15 A.5 where they fit: `action` (EventID),
//! `outcome` (EventOutcomeIndicator), `client` and `remote` (ActiveParticipant: user id from
//! the certificate, network access point), `vehicles` (ParticipantObjectIdentification: the
//! patient-carrying vehicles whose data were involved), `detail` (what was asked, delivered).
//!
//! A chain detects a changed or removed line; the newest line has no successor to vouch for
//! it, so forward the log (or its latest hash) off the machine for that guarantee.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use serde::{Deserialize, Serialize};

/// `prev` of the first record ever written.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Why the audit log cannot be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A file could not be read, written or synced.
    #[error("audit file {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The last record of an existing log does not parse, so the chain cannot continue.
    #[error("audit file {path}: the last record does not parse: {reason}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// The writer thread is gone (the log was closed, or writing failed).
    #[error("the audit log is not accepting records")]
    Closed,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.to_owned(),
        source,
    }
}

/// EventOutcomeIndicator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Done as asked.
    Success,
    /// Refused: authentication, authorization or a bound.
    Denied,
    /// Failed for another reason (a store error, a client too slow, a reload that failed).
    Failure,
}

/// The client of a call, from its certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditClient {
    /// Certificate subject (RFC 4514).
    pub subject: String,
    /// Serial number, hexadecimal.
    pub serial: String,
    /// SHA-256 of the certificate, hexadecimal.
    pub fingerprint: String,
}

impl From<&crate::access::ClientIdentity> for AuditClient {
    fn from(c: &crate::access::ClientIdentity) -> Self {
        Self {
            subject: c.subject.clone(),
            serial: c.serial.clone(),
            fingerprint: c.fingerprint.clone(),
        }
    }
}

/// What happened, as a caller reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// What was done: `grpc_connect`, `list_vehicles`, `subscribe`, `subscription_end`,
    /// `tls_reload`, `vehicle_refused`, ...
    pub action: String,
    /// How it ended.
    pub outcome: Outcome,
    /// The client (a subscriber or a vehicle's certificate), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<AuditClient>,
    /// The client's network address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
    /// Vehicles whose data were involved.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vehicles: Vec<String>,
    /// Everything else: the request, what was delivered, a reason.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub detail: serde_json::Value,
}

impl AuditEvent {
    /// An event with nothing but its action and outcome.
    pub fn new(action: &str, outcome: Outcome) -> Self {
        Self {
            action: action.to_owned(),
            outcome,
            client: None,
            remote: None,
            vehicles: Vec::new(),
            detail: serde_json::Value::Null,
        }
    }
}

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the chain, from 1, across files.
    pub seq: u64,
    /// When, RFC 3339 UTC.
    pub time: String,
    /// When, nanoseconds since the Unix epoch (for queries).
    pub time_ns: i64,
    /// The event.
    #[serde(flatten)]
    pub event: AuditEvent,
    /// SHA-256 (hex) of the previous line as written, [`GENESIS`] for the first.
    pub prev: String,
}

/// SHA-256 of a line (without its newline), hexadecimal.
pub fn line_hash(line: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, line.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Where the chain stands: the next sequence number and the hash of the last line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    next_seq: u64,
    prev: String,
}

impl Chain {
    /// A new log.
    pub fn genesis() -> Self {
        Self {
            next_seq: 1,
            prev: GENESIS.to_owned(),
        }
    }

    /// Continues after `last`, the last line written.
    pub fn after(last: &str) -> Result<Self, serde_json::Error> {
        let record: AuditRecord = serde_json::from_str(last)?;
        Ok(Self {
            next_seq: record.seq + 1,
            prev: line_hash(last),
        })
    }

    /// The sequence number the next record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Seals `event` at `time_ns` into the next line (without newline) and advances.
    pub fn seal(&mut self, event: AuditEvent, time_ns: i64) -> String {
        let time = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(time_ns.max(0) as u64);
        let record = AuditRecord {
            seq: self.next_seq,
            time: humantime::format_rfc3339_millis(time).to_string(),
            time_ns,
            event,
            prev: std::mem::take(&mut self.prev),
        };
        // A struct of strings, numbers and JSON values always serialises.
        let line = serde_json::to_string(&record).unwrap_or_default();
        self.prev = line_hash(&line);
        self.next_seq += 1;
        line
    }
}

/// Where a chain is broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}: {reason}", file.display())]
pub struct Broken {
    /// The file.
    pub file: PathBuf,
    /// The line (1-based) that was changed, removed after, or does not parse.
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

/// What a verified log holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Records checked.
    pub records: u64,
    /// Sequence numbers of the first and last record.
    pub seqs: Option<(u64, u64)>,
}

/// Lines longer than this are not records of ours (the writer's are a few hundred bytes):
/// reading a damaged or foreign file holds no more than this in memory.
pub const MAX_LINE_BYTES: usize = 1024 * 1024;

/// One line of a log file.
struct Line {
    file: PathBuf,
    /// 1-based.
    number: usize,
    text: String,
    /// It ended with a newline.
    complete: bool,
    /// It was longer than [`MAX_LINE_BYTES`] (`text` holds its start).
    too_long: bool,
}

impl Line {
    fn broken(&self, reason: String) -> Broken {
        Broken {
            file: self.file.clone(),
            line: self.number,
            reason,
        }
    }

    /// The record it holds, or why it holds none.
    fn record(&self) -> Result<AuditRecord, String> {
        if self.too_long {
            return Err(format!("the line is longer than {MAX_LINE_BYTES} bytes"));
        }
        if !self.complete {
            return Err("the record is incomplete (no newline)".into());
        }
        serde_json::from_str(&self.text).map_err(|e| format!("not an audit record: {e}"))
    }
}

/// The lines of `files`, in order, read one at a time.
struct Lines<'a> {
    files: std::slice::Iter<'a, PathBuf>,
    current: Option<(PathBuf, BufReader<File>, usize)>,
}

impl<'a> Lines<'a> {
    fn new(files: &'a [PathBuf]) -> Self {
        Self {
            files: files.iter(),
            current: None,
        }
    }
}

impl Iterator for Lines<'_> {
    type Item = Result<Line, AuditError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.current.is_none() {
                let path = self.files.next()?;
                match File::open(path) {
                    Ok(f) => self.current = Some((path.clone(), BufReader::new(f), 0)),
                    Err(e) => return Some(Err(io(path)(e))),
                }
            }
            let (path, reader, number) = self.current.as_mut()?;
            let mut buf = Vec::new();
            let limit = MAX_LINE_BYTES as u64 + 1;
            match std::io::Read::take(&mut *reader, limit).read_until(b'\n', &mut buf) {
                Err(e) => return Some(Err(io(path)(e))),
                Ok(0) => {
                    self.current = None;
                    continue;
                }
                Ok(_) => {}
            }
            *number += 1;
            let complete = buf.last() == Some(&b'\n');
            if complete {
                buf.pop();
            }
            let too_long = buf.len() > MAX_LINE_BYTES;
            if too_long {
                // The rest of the line would read as more lines: this file ends here.
                buf.truncate(MAX_LINE_BYTES);
                let line = Line {
                    file: path.clone(),
                    number: *number,
                    text: String::from_utf8_lossy(&buf).into_owned(),
                    complete,
                    too_long,
                };
                self.current = None;
                return Some(Ok(line));
            }
            return Some(Ok(Line {
                file: path.clone(),
                number: *number,
                text: String::from_utf8_lossy(&buf).into_owned(),
                complete,
                too_long,
            }));
        }
    }
}

/// Checks the chain through `files` (in order; a chain that starts in a later file, older
/// ones archived, is taken from its first record). Names the first broken line. Reads one
/// line at a time: any size of log in bounded memory.
pub fn verify(files: &[PathBuf]) -> Result<Result<Verified, Broken>, AuditError> {
    let mut lines = Lines::new(files);
    let mut records = 0u64;
    let mut first_seq = None;
    let mut last: Option<(Line, AuditRecord)> = None;
    while let Some(line) = lines.next() {
        let line = line?;
        let record = match line.record() {
            Ok(r) => r,
            Err(reason) => return Ok(Err(line.broken(reason))),
        };
        if let Some((prev_line, prev)) = &last {
            if record.seq != prev.seq + 1 {
                return Ok(Err(line.broken(format!(
                    "records {}..{} are missing before this one",
                    prev.seq + 1,
                    record.seq
                ))));
            }
            if record.prev != line_hash(&prev_line.text) {
                // Either the previous line was changed, or this line's own link was: if this
                // line no longer hashes to what the next one holds, this one is the changed one.
                let next = lines.next().transpose()?;
                let this_changed = next
                    .and_then(|n| n.record().ok())
                    .is_some_and(|n| n.prev != line_hash(&line.text));
                return Ok(Err(if this_changed {
                    line.broken("the record was changed (its link and its hash disagree)".into())
                } else {
                    prev_line.broken(format!(
                        "the record was changed: it does not hash to what record {} holds",
                        record.seq
                    ))
                }));
            }
        }
        records += 1;
        first_seq.get_or_insert(record.seq);
        last = Some((line, record));
    }
    Ok(Ok(Verified {
        records,
        seqs: first_seq.zip(last.map(|(_, r)| r.seq)),
    }))
}

/// Calls `found` with each record of `files` that involves `vehicle` (any, when None), from
/// `since_ns` on, reading one line at a time.
pub fn query_each(
    files: &[PathBuf],
    vehicle: Option<&str>,
    since_ns: i64,
    mut found: impl FnMut(AuditRecord),
) -> Result<(), AuditError> {
    for line in Lines::new(files) {
        let line = line?;
        let record = line.record().map_err(|reason| AuditError::Unreadable {
            path: line.file.join(format!("line {}", line.number)),
            reason,
        })?;
        let involves = vehicle.is_none_or(|v| record.event.vehicles.iter().any(|x| x == v));
        if involves && record.time_ns >= since_ns {
            found(record);
        }
    }
    Ok(())
}

/// The records of `files` that involve `vehicle` (any, when None), from `since_ns` on.
pub fn query(
    files: &[PathBuf],
    vehicle: Option<&str>,
    since_ns: i64,
) -> Result<Vec<AuditRecord>, AuditError> {
    let mut out = Vec::new();
    query_each(files, vehicle, since_ns, |r| out.push(r))?;
    Ok(out)
}

/// The log files in `dir`, oldest first.
pub fn files_in(dir: &Path) -> Result<Vec<PathBuf>, AuditError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("audit-") && n.ends_with(".jsonl"))
        })
        .collect();
    // Names carry the zero-padded first sequence number.
    files.sort();
    Ok(files)
}

/// Bounds of the log on disk and in memory.
#[derive(Debug, Clone)]
pub struct AuditSettings {
    /// Directory of the log files (created owner-only).
    pub dir: PathBuf,
    /// A file that reaches this size is closed and the next one started.
    pub max_file_bytes: u64,
    /// Files kept; the oldest beyond are deleted (archive them first).
    pub max_files: usize,
    /// Records waiting for the writer at most.
    pub queue: usize,
    /// Where durable records are forwarded (syslog over TLS), if anywhere.
    pub forward: Option<crate::syslog::Forwarder>,
}

enum Command {
    Record(AuditEvent, Option<tokio::sync::oneshot::Sender<bool>>),
}

/// A handle to the audit log: cheap to clone, records go to one writer thread.
#[derive(Debug, Clone)]
pub struct AuditLog {
    tx: mpsc::SyncSender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command")
    }
}

impl AuditLog {
    /// Opens the log in `settings.dir` (continuing its chain; an incomplete last line, left by
    /// a crash in mid-write, is cut off and noted in the log) and starts its writer.
    pub fn open(
        settings: AuditSettings,
    ) -> Result<(Self, std::thread::JoinHandle<()>), AuditError> {
        relay_ops::private::create_dir(&settings.dir).map_err(io(&settings.dir))?;
        let mut writer = Writer::open(settings.clone())?;
        let (tx, rx) = mpsc::sync_channel(settings.queue.max(1));
        let handle = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(&rx))
            .map_err(io(&settings.dir))?;
        Ok((Self { tx }, handle))
    }

    /// Queues `event`; when the queue is full it is counted as dropped, never waited for.
    pub fn record(&self, event: AuditEvent) {
        if self.tx.try_send(Command::Record(event, None)).is_err() {
            metrics::counter!("relay_ingest_audit_dropped_total").increment(1);
        }
    }

    /// Writes `event` and waits until it is on disk (fsynced); false when it could not be
    /// written, in which case the access it describes must not happen.
    pub async fn record_durable(&self, event: AuditEvent) -> bool {
        let (done, written) = tokio::sync::oneshot::channel();
        let tx = self.tx.clone();
        let queued = tokio::task::spawn_blocking(move || {
            tx.send(Command::Record(event, Some(done))).is_ok()
        })
        .await
        .unwrap_or(false);
        queued && written.await.unwrap_or(false)
    }
}

struct Writer {
    settings: AuditSettings,
    chain: Chain,
    file: File,
    path: PathBuf,
    size: u64,
}

impl Writer {
    fn open(settings: AuditSettings) -> Result<Self, AuditError> {
        let files = files_in(&settings.dir)?;
        let mut chain = Chain::genesis();
        let mut repaired = None;
        // The chain continues from the newest record, in the newest file that holds one.
        for path in files.iter().rev() {
            let (last, cut) = last_complete_line(path)?;
            if let Some(cut) = cut {
                repaired = Some((path.clone(), cut));
            }
            if let Some(last) = last {
                chain = Chain::after(&last).map_err(|e| AuditError::Unreadable {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                break;
            }
        }
        let path = match files.last() {
            Some(p) => p.clone(),
            None => settings.dir.join(file_name(chain.next_seq())),
        };
        relay_ops::private::prepare_file(&path).map_err(io(&path))?;
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        let size = file.metadata().map_err(io(&path))?.len();
        let mut writer = Self {
            settings,
            chain,
            file,
            path,
            size,
        };
        if let Some((file, bytes)) = repaired {
            let mut event = AuditEvent::new("audit_repaired", Outcome::Failure);
            event.detail = serde_json::json!({
                "file": file.display().to_string(),
                "incomplete_bytes_removed": bytes,
            });
            writer.write(vec![(event, None)]);
        }
        Ok(writer)
    }

    fn run(&mut self, rx: &mpsc::Receiver<Command>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while batch.len() < 256 {
                match rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            let batch = batch
                .into_iter()
                .map(|Command::Record(e, done)| (e, done))
                .collect();
            self.write(batch);
        }
    }

    /// Appends the batch, fsyncs, then tells the waiters; rotates when the file is full.
    fn write(&mut self, batch: Vec<(AuditEvent, Option<tokio::sync::oneshot::Sender<bool>>)>) {
        let mut text = String::new();
        let mut waiters = Vec::new();
        let before = self.chain.clone();
        let mut sealed = Vec::new();
        for (event, done) in batch {
            let line = self.chain.seal(event, relay_ops::now_utc_ns());
            text.push_str(&line);
            text.push('\n');
            if self.settings.forward.is_some() {
                sealed.push(line);
            }
            waiters.extend(done);
        }
        let written = self
            .file
            .write_all(text.as_bytes())
            .and_then(|()| self.file.sync_data());
        let ok = match written {
            Ok(()) => {
                self.size += text.len() as u64;
                metrics::counter!("relay_ingest_audit_records_total")
                    .increment(text.lines().count() as u64);
                // Off the machine only what is on its disk: the forward never holds a
                // record the file lacks.
                if let Some(forward) = &self.settings.forward {
                    for line in sealed {
                        forward.offer(line);
                    }
                }
                true
            }
            Err(e) => {
                // Whatever reached the file of this batch is cut off again, so the chain on
                // disk stays whole and the next batch continues it.
                tracing::error!(file = %self.path.display(), error = %e, "audit write failed");
                metrics::counter!("relay_ingest_audit_write_failures_total").increment(1);
                let _ = self.file.set_len(self.size);
                self.chain = before;
                false
            }
        };
        for done in waiters {
            let _ = done.send(ok);
        }
        if ok
            && self.size >= self.settings.max_file_bytes
            && let Err(e) = self.rotate()
        {
            tracing::error!(error = %e, "audit rotation failed; writing on");
            metrics::counter!("relay_ingest_audit_write_failures_total").increment(1);
        }
    }

    fn rotate(&mut self) -> Result<(), AuditError> {
        let path = self.settings.dir.join(file_name(self.chain.next_seq()));
        relay_ops::private::prepare_file(&path).map_err(io(&path))?;
        self.file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        self.path = path;
        self.size = 0;
        // The new name is durable before records go into it.
        File::open(&self.settings.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.settings.dir))?;
        let files = files_in(&self.settings.dir)?;
        let excess = files.len().saturating_sub(self.settings.max_files.max(1));
        for old in &files[..excess] {
            std::fs::remove_file(old).map_err(io(old))?;
            tracing::info!(file = %old.display(), "old audit file deleted (audit.max_files)");
        }
        Ok(())
    }
}

fn file_name(first_seq: u64) -> String {
    format!("audit-{first_seq:012}.jsonl")
}

/// The last complete line of a file, after cutting off an incomplete one (returns how many
/// bytes were cut).
fn last_complete_line(path: &Path) -> Result<(Option<String>, Option<u64>), AuditError> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io(path))?;
    let len = file.metadata().map_err(io(path))?.len();
    let mut reader = BufReader::new(&mut file);
    let (mut last, mut end) = (None, 0u64);
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line).map_err(io(path))?;
        if n == 0 || !line.ends_with('\n') {
            break;
        }
        end += n as u64;
        last = Some(line.trim_end_matches('\n').to_owned());
    }
    drop(reader);
    let cut = (end < len).then(|| len - end);
    if cut.is_some() {
        file.set_len(end).map_err(io(path))?;
        file.seek(SeekFrom::End(0)).map_err(io(path))?;
        file.sync_all().map_err(io(path))?;
    }
    Ok((last, cut))
}

/// The distinct clients (subject and serial) among `records`.
pub fn clients(records: &[AuditRecord]) -> BTreeSet<(String, String)> {
    records
        .iter()
        .filter_map(|r| r.event.client.as_ref())
        .map(|c| (c.subject.clone(), c.serial.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(i: usize, vehicle: &str) -> AuditEvent {
        let mut e = AuditEvent::new("subscribe", Outcome::Success);
        e.vehicles = vec![vehicle.into()];
        e.client = Some(AuditClient {
            subject: format!("CN=ed-{i}"),
            serial: format!("{i:02x}"),
            fingerprint: "f".into(),
        });
        e
    }

    fn write_log(dir: &Path, n: usize, max_file_bytes: u64) -> Vec<PathBuf> {
        let settings = AuditSettings {
            dir: dir.to_owned(),
            max_file_bytes,
            max_files: 100,
            queue: 16,
            forward: None,
        };
        let mut w = Writer::open(settings).unwrap();
        for i in 0..n {
            w.write(vec![(
                event(i, if i % 2 == 0 { "amb-1" } else { "amb-2" }),
                None,
            )]);
        }
        files_in(dir).unwrap()
    }

    #[test]
    fn a_sealed_chain_verifies_across_files_and_continues_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_log(dir.path(), 20, 1000);
        assert!(files.len() > 2, "rotated by size: {files:?}");
        let ok = verify(&files).unwrap().unwrap();
        assert_eq!((ok.records, ok.seqs), (20, Some((1, 20))));
        // Reopened, the chain goes on where it stopped.
        let files = write_log(dir.path(), 5, 1000);
        let ok = verify(&files).unwrap().unwrap();
        assert_eq!(ok.seqs, Some((1, 25)));
        // Older files archived away: the rest still verifies from its first record.
        assert!(verify(&files[1..]).unwrap().is_ok());
    }

    #[test]
    fn one_changed_byte_is_found_at_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_log(dir.path(), 8, u64::MAX);
        let text = std::fs::read_to_string(&files[0]).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        // Change one byte of a value (line 4), of the link field (line 6), and break JSON.
        for (line, from, to) in [
            (4usize, "ed-3", "ed-9"),
            (6, "\"prev\":\"", "\"prev\":\"1"),
            (3, "{", "["),
        ] {
            let mut changed: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
            changed[line - 1] = changed[line - 1].replacen(from, to, 1);
            if from.starts_with("\"prev") {
                // Keep the length: drop the hash's last digit.
                let l = &mut changed[line - 1];
                let at = l.rfind('"').unwrap();
                l.remove(at - 1);
            }
            std::fs::write(&files[0], changed.join("\n") + "\n").unwrap();
            let broken = verify(&files).unwrap().unwrap_err();
            assert_eq!(broken.line, line, "{broken}");
        }
        // A removed line is found where the sequence jumps.
        let mut removed: Vec<&str> = lines.clone();
        removed.remove(4);
        std::fs::write(&files[0], removed.join("\n") + "\n").unwrap();
        let broken = verify(&files).unwrap().unwrap_err();
        assert_eq!(broken.line, 5, "{broken}");
        assert!(broken.reason.contains("missing"), "{broken}");
    }

    #[test]
    fn an_incomplete_last_line_is_cut_off_on_reopening_and_noted() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_log(dir.path(), 3, u64::MAX);
        let mut f = OpenOptions::new().append(true).open(&files[0]).unwrap();
        f.write_all(b"{\"seq\":4,\"ti").unwrap();
        drop(f);
        assert!(
            verify(&files).unwrap().is_err(),
            "a torn line does not verify"
        );
        let files = write_log(dir.path(), 1, u64::MAX);
        let ok = verify(&files).unwrap().unwrap();
        assert_eq!(ok.seqs, Some((1, 5)), "repair note + the new record");
        let all = query(&files, None, 0).unwrap();
        assert_eq!(all[3].event.action, "audit_repaired");
    }

    #[test]
    fn a_line_too_long_for_a_record_is_named_without_reading_it_whole() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_log(dir.path(), 3, u64::MAX);
        let mut f = OpenOptions::new().append(true).open(&files[0]).unwrap();
        // 8 MiB without a newline, then a line that would parse.
        f.write_all(&vec![b'x'; 8 * MAX_LINE_BYTES]).unwrap();
        f.write_all(b"\n{}\n").unwrap();
        drop(f);
        let broken = verify(&files).unwrap().unwrap_err();
        assert_eq!(broken.line, 4, "{broken}");
        assert!(broken.reason.contains("longer than"), "{broken}");
        let err = query(&files, None, 0).unwrap_err().to_string();
        assert!(
            err.contains("line 4") && err.contains("longer than"),
            "{err}"
        );
    }

    #[test]
    fn query_finds_the_records_of_a_vehicle_since_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_log(dir.path(), 6, u64::MAX);
        let amb1 = query(&files, Some("amb-1"), 0).unwrap();
        assert_eq!(amb1.len(), 3);
        let who = clients(&amb1);
        assert!(who.contains(&("CN=ed-0".to_string(), "00".to_string())));
        assert!(query(&files, Some("amb-1"), i64::MAX).unwrap().is_empty());
    }
}
