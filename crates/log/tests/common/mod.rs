//! Helpers shared by the ice-log integration tests: a deterministic clock, valid run histories,
//! fresh logs in temporary directories, raw SQLite access for tampering, and the location of
//! the external test vectors.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use ice_kernel::{
    Clock, Cost, Draft, Event, EventId, Origin, Projection, RunId, RunView, Timestamp,
};
use ice_log::ledger::Ledger;
use ice_log::sqlite::{Mode, SqliteLog};
use ice_log::verify::{VerifyReport, verify};
use ice_log::{EventLog, StoredEvent};
use serde_json::json;

/// 2023-11-14T22:13:20Z: where test clocks start.
pub const T0_US: i64 = 1_700_000_000_000_000;

/// A clock that advances one millisecond per reading: deterministic, strictly increasing.
pub struct TestClock {
    next_us: AtomicI64,
}

impl TestClock {
    pub fn new() -> TestClock {
        TestClock {
            next_us: AtomicI64::new(T0_US),
        }
    }
}

impl Default for TestClock {
    fn default() -> Self {
        TestClock::new()
    }
}

impl Clock for TestClock {
    fn now(&self) -> Timestamp {
        let us = self.next_us.fetch_add(1_000, Ordering::SeqCst);
        Timestamp::from_unix_us(us).expect("test clock stays within 1970..9999")
    }
}

pub fn run_id(s: &str) -> RunId {
    RunId::new(s).expect("valid run id")
}

pub fn agent() -> Origin {
    Origin::Agent("x".into())
}

/// The drafts that take a run from CREATED to EXECUTING.
pub fn opening() -> Vec<Draft> {
    vec![
        Draft::new("RunProvisioned", Origin::Runtime).payload(json!({"spec": "test"})),
        Draft::new("ResourcesAllocated", Origin::Runtime).payload(json!({"cpu": 1})),
        Draft::new("ContextResolved", Origin::Runtime),
        Draft::new("ExecutionWindowOpened", Origin::Runtime),
    ]
}

/// The drafts that take an EXECUTING run through validation and commit to TERMINATED.
pub fn closing() -> Vec<Draft> {
    vec![
        Draft::new("ValidationStarted", Origin::Runtime),
        Draft::new("ValidationPassed", Origin::Runtime),
        Draft::new("RunCommitted", Origin::Runtime),
        Draft::new("ResourcesReleased", Origin::Runtime),
        Draft::new("RunTerminated", Origin::Runtime),
    ]
}

/// One event an EXECUTING run admits, chosen by `kind` (any number; taken modulo the choices).
/// `n` makes payloads distinct.
pub fn working(kind: u8, n: u64) -> Draft {
    match kind % 7 {
        0 => Draft::new("InferenceStep", agent())
            .intent("think")
            .payload(json!({"model": "m", "output": format!("thought {n}")}))
            .cost(Cost {
                tokens_in: 10 + n,
                tokens_out: 3,
                ..Cost::default()
            }),
        1 => Draft::new("CapabilityRequested", agent())
            .intent("write a file")
            .payload(json!({"capability": "fs.write", "target": format!("f{n}.txt")})),
        2 => Draft::new("CapabilityGranted", Origin::Runtime)
            .authority(format!("policy:p{n}"))
            .payload(json!({"grant": format!("g{n}"), "scope": "fs.write:src"})),
        3 => Draft::new("FileWritten", Origin::Runtime)
            .intent("write a file")
            .authority(format!("grant:g{n}"))
            .payload(json!({"path": format!("src/f{n}.txt"), "bytes": n}))
            .cost(Cost {
                bytes: n,
                ..Cost::default()
            }),
        4 => Draft::new("ToolInvoked", Origin::Runtime)
            .intent("run a tool")
            .authority(format!("grant:g{n}"))
            .payload(json!({"tool": "echo", "args": [n, "é", 1.5], "nested": {"k": [true, null]}}))
            .cost(Cost {
                tool_calls: 1,
                wall_time_us: 250,
                ..Cost::default()
            }),
        5 => Draft::new("PlanStepProposed", agent())
            .intent("plan")
            .payload(json!({"step": n})),
        _ => Draft::new("BudgetReserved", Origin::Runtime).payload(json!({"tokens": n})),
    }
}

/// A whole valid run: opening, the given working events, closing.
pub fn full_run(kinds: &[u8]) -> Vec<Draft> {
    let mut d = opening();
    d.extend(kinds.iter().enumerate().map(|(i, k)| working(*k, i as u64)));
    d.extend(closing());
    d
}

/// A fresh log in a temporary directory, with a ledger over it.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    pub log: Arc<SqliteLog>,
    pub ledger: Ledger,
}

impl Fixture {
    pub fn new() -> Fixture {
        Fixture::with_tree_floor(ice_log::sqlite::DEFAULT_TREE_FLOOR)
    }

    /// A log that stores the tree's nodes from level `floor` up.
    pub fn with_tree_floor(floor: u8) -> Fixture {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("log.db");
        let log = Arc::new(SqliteLog::create_with_tree_floor(&path, floor).expect("create log"));
        let ledger = Ledger::new(log.clone(), Arc::new(TestClock::new()));
        Fixture {
            dir,
            path,
            log,
            ledger,
        }
    }

    pub fn log(&self) -> &dyn EventLog {
        self.log.as_ref()
    }

    /// Close the log (every connection: SQLite checkpoints the WAL into the file) and give back
    /// the directory and path.
    pub fn close(self) -> (tempfile::TempDir, PathBuf) {
        let Fixture {
            dir,
            path,
            log,
            ledger,
        } = self;
        drop(ledger);
        let log = Arc::try_unwrap(log).unwrap_or_else(|_| panic!("log still shared"));
        drop(log);
        (dir, path)
    }
}

impl Default for Fixture {
    fn default() -> Self {
        Fixture::new()
    }
}

/// Open an existing log read-only.
pub fn open_ro(path: &Path) -> SqliteLog {
    SqliteLog::open(path, Mode::ReadOnly).expect("open read-only")
}

/// Every stored event, in log order.
pub async fn all_events(log: &dyn EventLog) -> Vec<StoredEvent> {
    let mut out = Vec::new();
    loop {
        let page = log.scan(out.len() as u64, 10_000).await.expect("scan");
        if page.is_empty() {
            return out;
        }
        out.extend(page);
    }
}

/// Verify without a checkpoint key.
pub async fn verify_log(log: &dyn EventLog) -> VerifyReport {
    verify(log, None, |_| {}).await.expect("verify runs")
}

/// Assert the log verifies, with a readable message if not.
pub async fn assert_verifies(log: &dyn EventLog) -> VerifyReport {
    let r = verify_log(log).await;
    assert!(r.ok(), "log does not verify: {:?}", r.failure);
    r
}

/// Replay: rebuild every run's view from the log alone, in log order.
pub async fn replay(log: &dyn EventLog) -> std::collections::BTreeMap<RunId, RunView> {
    let mut views = std::collections::BTreeMap::new();
    for s in all_events(log).await {
        let e: Event = s.event().expect("stored event parses");
        views
            .entry(e.run_id.clone())
            .or_insert_with(|| RunView::new(e.run_id.clone()))
            .apply(&e)
            .expect("replayed event follows the law");
    }
    views
}

/// A copy of the log file beside it, to damage (the WAL folded in first, so the file is the
/// whole log).
pub fn copy_log(src: &Path, name: &str) -> PathBuf {
    let c = rusqlite::Connection::open(src).expect("raw open");
    c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
        .expect("fold the WAL in");
    drop(c);
    let dst = src.with_file_name(name);
    std::fs::copy(src, &dst).expect("copy the log");
    dst
}

/// A raw read-write connection to the file, with the append-only triggers removed, for tests
/// that play the attacker.
pub fn tamper_connection(path: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(path).expect("raw open");
    c.execute_batch(
        "DROP TRIGGER IF EXISTS events_no_update; DROP TRIGGER IF EXISTS events_no_delete;
         DROP TRIGGER IF EXISTS tree_no_update; DROP TRIGGER IF EXISTS tree_no_delete;
         DROP TRIGGER IF EXISTS blobs_no_update; DROP TRIGGER IF EXISTS blobs_no_delete;
         DROP TRIGGER IF EXISTS checkpoints_no_update; DROP TRIGGER IF EXISTS checkpoints_no_delete;
         DROP TRIGGER IF EXISTS head_only_grows; DROP TRIGGER IF EXISTS head_no_delete;",
    )
    .expect("drop triggers");
    c
}

pub fn event_id(s: &str) -> EventId {
    s.parse().expect("valid event id")
}

/// The external vectors, beside the repository (`<repo>/../shared/vectors`). Missing vectors
/// fail the test: a test that checks nothing must not pass.
pub fn vectors_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/vectors");
    assert!(
        dir.join("rfc6962").is_dir(),
        "external test vectors not found at {}: clone the `shared` folder beside the repository",
        dir.display()
    );
    dir
}
