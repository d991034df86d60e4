//! Crash safety of the embedded log: a process killed with SIGKILL in the middle of appending
//! leaves a log that verifies and holds every event whose append returned success.
//!
//! The test re-executes its own binary as the appending child (`crash_child`, an ignored test
//! that does nothing unless `ICE_CRASH_CHILD_DB` names a log), reads the ids the child
//! acknowledges, kills it, and inspects what is on disk.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use ice_kernel::{Draft, EventId};
use ice_log::EventLog;
use ice_log::ledger::Ledger;
use ice_log::sqlite::{Mode, SqliteLog};
use serde_json::json;

const DB_VAR: &str = "ICE_CRASH_CHILD_DB";
const ROUND_VAR: &str = "ICE_CRASH_CHILD_ROUND";
/// Appending tasks in the child.
const CHILD_TASKS: usize = 6;
/// The parent kills the child after this many acknowledgements (one figure per round, so the
/// kill lands at different points) or this long, whichever comes first.
const KILL_AFTER_ACKS: [usize; 3] = [120, 300, 500];
const KILL_AFTER: Duration = Duration::from_secs(3);
/// A child left alive by a broken parent stops by itself.
const CHILD_LIFETIME: Duration = Duration::from_secs(60);
const ACK: &str = "ICE-ACK ";

/// The child: append as fast as possible from several tasks, one acknowledgement line per
/// event that the log confirmed. Does nothing when run as an ordinary test.
#[test]
#[ignore = "run by `killed_appender_loses_nothing_acknowledged` as a child process"]
fn crash_child() {
    let Some(db) = std::env::var_os(DB_VAR) else {
        return;
    };
    let round = std::env::var(ROUND_VAR).unwrap_or_default();
    let path = PathBuf::from(db);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
        .block_on(child(path, round));
}

async fn child(path: PathBuf, round: String) {
    let log = Arc::new(if path.exists() {
        SqliteLog::open(&path, Mode::ReadWrite).expect("child opens the log")
    } else {
        SqliteLog::create(&path).expect("child creates the log")
    });
    let ledger = Arc::new(Ledger::new(log, Arc::new(ice_log::clock::SystemClock)));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..CHILD_TASKS {
        let ledger = ledger.clone();
        let round = round.clone();
        tasks.push(tokio::spawn(async move {
            let run = run_id(&format!("crash-{round}-{t}"));
            let ack = |ids: Vec<EventId>| {
                let mut out = std::io::stdout().lock();
                for id in ids {
                    writeln!(out, "{ACK}{id}").unwrap();
                }
                out.flush().unwrap();
            };
            let (_, b) = ledger.append(&run, opening()).await.expect("open run");
            ack(b.events().iter().map(|e| e.event().id()).collect());
            let mut i = 0u64;
            while started.elapsed() < CHILD_LIFETIME {
                // Batches of 1 to 3 events, some with a blob, so a kill can land anywhere.
                let n = 1 + (i % 3) as usize;
                let drafts: Vec<Draft> = (0..n as u64)
                    .map(|k| {
                        let mut d = working((i + k) as u8, i * 10 + k);
                        if (i + k).is_multiple_of(7) {
                            d = d.payload(json!({
                                "big": format!("{i}-{k}-{}", "y".repeat(ice_kernel::limits::BLOB_FIELD_THRESHOLD_BYTES))
                            }));
                        }
                        d
                    })
                    .collect();
                let (_, b) = ledger.append(&run, drafts).await.expect("append");
                ack(b.events().iter().map(|e| e.event().id()).collect());
                i += 1;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Run one child against `db`, kill it, and return every id it acknowledged.
fn run_and_kill(db: &Path, round: usize) -> Vec<EventId> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--ignored"])
        .env(DB_VAR, db)
        .env(ROUND_VAR, round.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the child");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(id) = line.strip_prefix(ACK) {
                let _ = tx.send(id.to_string());
            }
        }
    });
    let mut acked = Vec::new();
    let deadline = Instant::now() + KILL_AFTER;
    while acked.len() < KILL_AFTER_ACKS[round % KILL_AFTER_ACKS.len()] {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(id) => acked.push(id),
            Err(_) => break,
        }
    }
    // SIGKILL on Unix: no destructor, no flush, no checkpoint runs in the child.
    child.kill().expect("kill the child");
    let status = child.wait().unwrap();
    assert!(!status.success(), "the child ended by itself: {status}");
    // Lines the child wrote before it died were acknowledged too.
    reader.join().unwrap();
    acked.extend(rx.try_iter());
    assert!(
        !acked.is_empty(),
        "round {round}: the child acknowledged nothing before it was killed"
    );
    acked
        .iter()
        .map(|s| s.parse().expect("child prints event ids"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_appender_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("crash.db");
    let mut all_acked: Vec<EventId> = Vec::new();
    for round in 0..KILL_AFTER_ACKS.len() {
        let acked = run_and_kill(&db, round);
        all_acked.extend(acked.iter().cloned());
        // Recovery: the writer reloads its state from what is on disk...
        let log = Arc::new(SqliteLog::open(&db, Mode::ReadWrite).expect("reopen after the kill"));
        // ...which verifies, chains, tree, blobs and all...
        let report = assert_verifies(log.as_ref()).await;
        // ...and holds every acknowledged event (from this round and the ones before).
        let present = log.existing(&all_acked).await.unwrap();
        let lost: Vec<_> = all_acked
            .iter()
            .filter(|id| !present.contains(id))
            .collect();
        assert!(
            lost.is_empty(),
            "round {round}: {} acknowledged events lost, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        );
        assert!(report.events >= all_acked.len() as u64);
        // The recovered log takes new appends at the right place.
        let ledger = Ledger::new(log.clone(), Arc::new(TestClock::new()));
        let run = run_id(&format!("after-{round}"));
        let (r, _) = ledger.append(&run, opening()).await.unwrap();
        assert_eq!(r.first_log_seq, report.events);
        all_acked.push(EventId::new(run, 0));
        assert_verifies(log.as_ref()).await;
        eprintln!(
            "round {round}: {} acknowledged, {} stored after the kill",
            acked.len(),
            report.events
        );
    }
}
