//! The JetStream store backend (issue 13) on a real 3-node cluster on loopback (the shipped
//! configuration: mutual TLS for clients and routes, R3, `sync_interval: always`):
//! - the shared store suite (`hospital_ingest::store::suite`; the embedded backend runs the
//!   same cases in its unit tests), each case on its own stream and bucket, a "reopen"
//!   being a new store (new connection, index rebuilt from the log);
//! - what only a shared log has: a second writer is fenced, not interleaved;
//! - durability: every committed batch survives SIGKILL of all three servers, and a killed
//!   stream leader costs a stall of the commits (measured), not a record.
//!
//! The clusters are started one at a time (2-core machine).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hospital_ingest::store::{JetStreamStore, SeqRef, Store, StoreError, suite};
use relay_e2e::Pki;
use relay_e2e::nats::{Cluster, store_options};
use relay_proto::model::subscribe_response::Record;
use tokio::time::Instant;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Appends frames `seqs` of amb-1's stream 0 (session 1) that `store` does not hold yet,
/// in one batch; the cursors committed.
fn append(store: &Store, seqs: impl IntoIterator<Item = u64>) -> Result<Vec<u64>, StoreError> {
    let v: Arc<str> = "amb-1".into();
    let mut b = store.begin()?;
    for seq in seqs {
        let r = SeqRef {
            vehicle: &v,
            session: 1,
            stream_id: 0,
            seq,
        };
        if !b.contains(r)? {
            b.append(&v, 2, suite::data(&v, seq, 1), Some(r))?;
        }
    }
    Ok(b.commit()?.into_iter().map(|e| e.cursor).collect())
}

/// The seqs of amb-1's frames in the log, in cursor order.
fn logged_seqs(store: &Store) -> Vec<u64> {
    let head = store.head().unwrap();
    let mut out = Vec::new();
    let mut after = 0;
    while after < head {
        let page = store.read_after(after, head, 1_000).unwrap();
        let Some((last, _)) = page.last() else { break };
        after = *last;
        out.extend(page.into_iter().filter_map(|(_, m)| match m.record {
            Some(Record::Data(d)) => Some(d.frame?.seq),
            _ => None,
        }));
    }
    out
}

/// Opens a store on `options`, retrying while the cluster recovers (bounded).
fn open_when_ready(options: &hospital_ingest::store::JetStreamOptions, within: Duration) -> Store {
    let deadline = Instant::now() + within;
    loop {
        match JetStreamStore::open(options) {
            Ok(s) => return Store::new(s),
            Err(e) if Instant::now() < deadline => {
                eprintln!("store not ready yet: {e}");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("store not ready within {within:?}: {e}"),
        }
    }
}

#[test]
fn the_store_suite_passes_on_jetstream_and_a_second_writer_is_fenced() {
    let _one = serial();
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cluster = rt.block_on(Cluster::start(&pki, work.path(), 3));
    for (i, (name, case)) in suite::CASES.iter().enumerate() {
        let options = store_options(&cluster, &pki, &format!("c{i}"));
        let mut open = || Store::new(JetStreamStore::open(&options).unwrap());
        let started = Instant::now();
        case(&mut open);
        eprintln!("{name}: passed in {:?}", started.elapsed());
    }

    // Two ingest nodes writing one vehicle: a batch that began before the other's commit
    // expects the vehicle's records to end where they ended then, and is refused whole; the
    // next batch, after catching up, counts the other's frames as stored and follows them.
    let options = store_options(&cluster, &pki, "fence");
    let a = Store::new(JetStreamStore::open(&options).unwrap());
    let b = Store::new(JetStreamStore::open(&options).unwrap());
    let v: Arc<str> = "amb-1".into();
    let frame = |seq| SeqRef {
        vehicle: "amb-1",
        session: 1,
        stream_id: 0,
        seq,
    };
    let mut late = b.begin().unwrap();
    late.append(&v, 2, suite::data(&v, 100, 1), Some(frame(100)))
        .unwrap();
    assert_eq!(append(&a, 0..10).unwrap(), (1..=10).collect::<Vec<_>>());
    let err = late.commit().unwrap_err();
    assert!(
        matches!(err, StoreError::Fenced { expected: 0, .. }),
        "{err}"
    );
    assert_eq!(
        a.log_len().unwrap(),
        10,
        "nothing of the refused batch is stored"
    );
    assert_eq!(append(&b, [5, 100]).unwrap(), vec![11]);
    assert_eq!(
        logged_seqs(&a),
        [(0..10).collect::<Vec<_>>(), vec![100]].concat()
    );
    // Another vehicle is no conflict: both nodes write at once.
    let mut other = b.begin().unwrap();
    let w: Arc<str> = "amb-2".into();
    let r = SeqRef {
        vehicle: "amb-2",
        session: 1,
        stream_id: 0,
        seq: 0,
    };
    other.append(&w, 2, suite::data(&w, 0, 1), Some(r)).unwrap();
    append(&a, 10..12).unwrap();
    assert_eq!(other.commit().unwrap().len(), 1);
    // Each follows the other: a's index knows b's frames.
    let b1 = a.begin().unwrap();
    drop(b1);
    assert_eq!(a.stored_streams(4).unwrap().len(), 2);

    // Only the ingest nodes' certificates map to a user: an ED client's certificate from the
    // same CA, and the NATS nodes' own, are refused.
    for stem in ["ed-console", relay_devcerts::NATS_NODE] {
        let mut intruder = store_options(&cluster, &pki, "intruder");
        intruder.cert = pki.path().join(format!("{stem}.pem"));
        intruder.key = pki.path().join(format!("{stem}.key"));
        intruder.request_timeout = Duration::from_secs(3);
        let err = JetStreamStore::open(&intruder).unwrap_err().to_string();
        eprintln!("{stem} refused: {err}");
        assert!(err.contains("authorization"), "{stem}: {err}");
    }
    drop(cluster);
}

#[test]
fn every_committed_batch_survives_sigkill_of_all_three_servers() {
    let _one = serial();
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut cluster = rt.block_on(Cluster::start(&pki, work.path(), 3));
    let options = store_options(&cluster, &pki, "kill_all");
    let store = Store::new(JetStreamStore::open(&options).unwrap());
    for batch in 0..20u64 {
        append(&store, batch * 50..(batch + 1) * 50).unwrap();
    }
    drop(store);
    // Every server at once, no clean shutdown: only what was fsynced remains.
    rt.block_on(async {
        for i in 0..3 {
            cluster.kill(i).await;
        }
    });
    for i in 0..3 {
        rt.block_on(async { cluster.start_node(i) });
    }
    let restarted = Instant::now();
    rt.block_on(cluster.meta_leader(Duration::from_secs(60)));
    let store = open_when_ready(&options, Duration::from_secs(60));
    eprintln!(
        "cluster and store back {:?} after the restart",
        restarted.elapsed()
    );
    assert_eq!(logged_seqs(&store), (0..1_000).collect::<Vec<_>>());
    // The dedup index came back with the log: re-sent frames are not stored again.
    assert!(append(&store, 990..1_010).unwrap().len() == 10);
    assert_eq!(store.log_len().unwrap(), 1_010);
}

#[test]
fn a_killed_stream_leader_stalls_commits_briefly_and_loses_nothing_committed() {
    let _one = serial();
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut cluster = rt.block_on(Cluster::start(&pki, work.path(), 3));
    let mut options = store_options(&cluster, &pki, "leader");
    // A commit that cannot finish is given up after a while and retried, as the ingest's
    // writer does (its agents re-send what was not acknowledged).
    options.request_timeout = Duration::from_secs(2);
    let store = Store::new(JetStreamStore::open(&options).unwrap());
    append(&store, 0..10).unwrap();
    let leader = rt
        .block_on(cluster.stream_leader("LOG_leader"))
        .expect("the log has a leader");

    // Frames 10.. arrive every 10 ms; the leader dies after the first second.
    let mut committed: Vec<u64> = Vec::new();
    let mut pending: Vec<u64> = Vec::new();
    let mut last_commit = Instant::now();
    let mut longest_stall = Duration::ZERO;
    let mut failures = 0;
    let started = Instant::now();
    let mut next_seq = 10u64;
    let mut killed = false;
    while next_seq < 500 || !pending.is_empty() {
        assert!(started.elapsed() < Duration::from_secs(120), "no progress");
        if !killed && started.elapsed() > Duration::from_secs(1) {
            rt.block_on(cluster.kill(leader));
            killed = true;
        }
        if next_seq < 500 {
            pending.push(next_seq);
            next_seq += 1;
        }
        match append(&store, pending.clone()) {
            Ok(_) => {
                committed.append(&mut pending);
                longest_stall = longest_stall.max(last_commit.elapsed());
                last_commit = Instant::now();
            }
            Err(e) => {
                failures += 1;
                eprintln!("commit failed (retried): {e}");
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(killed);
    eprintln!(
        "stream leader {} killed: longest stall between commits {longest_stall:?}, \
         {failures} commits failed and were retried",
        cluster.nodes[leader].name
    );
    // Every frame is in the log exactly once (a commit that failed after being stored was
    // found stored on retry, not stored twice).
    let mut seqs = logged_seqs(&store);
    let total = seqs.len();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), total, "no frame stored twice");
    assert_eq!(seqs, (0..500).collect::<Vec<_>>());
    assert!(committed.len() == 490);
    // Generous: elections take seconds; a stall of a minute would be a bug.
    assert!(longest_stall < Duration::from_secs(30), "{longest_stall:?}");
}
