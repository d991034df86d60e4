//! A commit killed with SIGKILL at any point, then recovered, leaves the workspace exactly as
//! before (killed before the journal was durable) or exactly as after (killed after).
//!
//! The test re-executes its own binary as a child process, filtered to the ignored test
//! `crash_child` and told by environment variables where to stop: the child rebuilds the stage
//! from its recorded ops, commits, and at the chosen [`CommitPoint`] prints a marker and waits.
//! The parent reads the marker, kills the child with SIGKILL, and runs recovery.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use ice_kernel::RunId;

use super::{Node, Scratch, tree};
use crate::auth::testing::{delete, write};
use crate::staging::{CommitPoint, Recovery, Stage, StagedOp, recover};
use crate::workspace::Workspace;

const CHILD_DIR: &str = "ICE_EFFECTS_CRASH_DIR";
const CHILD_AT: &str = "ICE_EFFECTS_CRASH_AT";
const MARKER: &str = "ICE-EFFECTS-CRASH-POINT";

fn run() -> RunId {
    RunId::new("run-1").unwrap()
}

/// The child: commit the recorded stage under `$ICE_EFFECTS_CRASH_DIR`, and stop (print the
/// marker, then wait to be killed) at `$ICE_EFFECTS_CRASH_AT` (`prepared`, `journal`, or
/// `applied:N`). Does nothing when run without those variables.
#[test]
#[ignore = "child process of the SIGKILL commit tests"]
fn crash_child() {
    let (Ok(base), Ok(at)) = (std::env::var(CHILD_DIR), std::env::var(CHILD_AT)) else {
        return;
    };
    let base = Path::new(&base);
    let ops: Vec<StagedOp> =
        serde_json::from_slice(&std::fs::read(base.join("ops.json")).unwrap()).unwrap();
    let ws = Workspace::open(base.join("ws")).unwrap();
    let stage = Stage::from_ops(base.join("stage"), ws, run(), ops).unwrap();
    let stop = |point: &str| {
        if point == at {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{MARKER}").unwrap();
            out.flush().unwrap();
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    };
    stage
        .commit_with_hook(&mut |p| match p {
            CommitPoint::Prepared { .. } => stop("prepared"),
            CommitPoint::JournalDurable => stop("journal"),
            CommitPoint::Applied { index, .. } => stop(&format!("applied:{index}")),
        })
        .unwrap();
    panic!("the commit was not stopped at {at}");
}

/// Set up a workspace and a stage with five changes, record the ops, and return the scratch
/// area with the trees before and after.
fn prepare() -> (Scratch, BTreeMap<String, Node>, BTreeMap<String, Node>) {
    let s = Scratch::new();
    s.file("a.txt", b"old a");
    s.file("b.txt", b"old b");
    s.file("src/lib.rs", b"old lib");
    let before = tree(&s.ws);
    let ws = Workspace::open(&s.ws).unwrap();
    let mut stage = Stage::create(s.stage_dir(), ws, run()).unwrap();
    stage.write(&write("a.txt"), "a.txt", b"new a").unwrap();
    stage.delete(&delete("b.txt"), "b.txt").unwrap();
    stage
        .write(&write("new/dir/c.txt"), "new/dir/c.txt", b"c")
        .unwrap();
    stage.write(&write("d.txt"), "d.txt", b"d").unwrap();
    stage
        .write(&write("src/lib.rs"), "src/lib.rs", b"new lib")
        .unwrap();
    assert_eq!(stage.diff().unwrap().len(), 5);
    std::fs::write(
        s.base.join("ops.json"),
        serde_json::to_vec(stage.ops()).unwrap(),
    )
    .unwrap();

    let mut after = before.clone();
    after.insert("a.txt".into(), Node::File(b"new a".to_vec()));
    after.remove("b.txt");
    after.insert("d.txt".into(), Node::File(b"d".to_vec()));
    after.insert("new".into(), Node::Dir);
    after.insert("new/dir".into(), Node::Dir);
    after.insert("new/dir/c.txt".into(), Node::File(b"c".to_vec()));
    after.insert("src/lib.rs".into(), Node::File(b"new lib".to_vec()));
    (s, before, after)
}

/// Run the child until it reaches `at`, then SIGKILL it.
fn commit_and_kill_at(s: &Scratch, at: &str) {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "tests::crash::crash_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR, &s.base)
        .env(CHILD_AT, at)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // libtest prints `test name ... ` before the test's own output.
            if line.ends_with(MARKER) {
                let _ = tx.send(());
                break;
            }
        }
    });
    let reached = rx.recv_timeout(Duration::from_secs(120));
    child.kill().unwrap();
    let status = child.wait().unwrap();
    if reached.is_err() {
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        panic!("the child never reached {at}: {status:?}\n{stderr}");
    }
    assert_eq!(status.signal(), Some(9), "killed with SIGKILL");
}

#[test]
fn killed_mid_commit_then_recovered_is_exactly_after() {
    let (s, before, after) = prepare();
    commit_and_kill_at(&s, "applied:1");
    // Killed after two of five changes: the workspace is part-way and the journal is there.
    let partial = tree(&s.ws);
    assert_ne!(partial, before);
    assert_ne!(partial, after);
    assert_eq!(partial["a.txt"], Node::File(b"new a".to_vec()));
    assert!(!partial.contains_key("b.txt"));
    assert_eq!(partial["src/lib.rs"], Node::File(b"old lib".to_vec()));
    assert!(s.stage_dir().join("journal.json").exists());

    let ws = Workspace::open(&s.ws).unwrap();
    let recovery = recover(s.stage_dir(), &ws).unwrap();
    let Recovery::RolledForward { changes } = recovery else {
        panic!("expected a roll-forward, got {recovery:?}");
    };
    assert_eq!(changes.len(), 5);
    assert_eq!(tree(&s.ws), after);
    assert!(!s.stage_dir().exists());
    // Recovery is done once: a second finds nothing.
    assert_eq!(
        recover(s.stage_dir(), &ws).unwrap(),
        Recovery::NothingPending
    );
    assert_eq!(tree(&s.ws), after);
}

#[test]
fn killed_right_after_the_journal_then_recovered_is_exactly_after() {
    let (s, before, after) = prepare();
    commit_and_kill_at(&s, "journal");
    assert_eq!(tree(&s.ws), before);
    let ws = Workspace::open(&s.ws).unwrap();
    assert!(matches!(
        recover(s.stage_dir(), &ws).unwrap(),
        Recovery::RolledForward { .. }
    ));
    assert_eq!(tree(&s.ws), after);
}

#[test]
fn killed_before_the_journal_is_durable_then_recovered_is_exactly_before() {
    let (s, before, _after) = prepare();
    commit_and_kill_at(&s, "prepared");
    assert_eq!(tree(&s.ws), before);
    assert!(!s.stage_dir().join("journal.json").exists());
    let ws = Workspace::open(&s.ws).unwrap();
    assert_eq!(
        recover(s.stage_dir(), &ws).unwrap(),
        Recovery::NothingPending
    );
    assert_eq!(tree(&s.ws), before);
    // The stage is intact: it can be rebuilt from its ops and committed (or discarded) later.
    let ops: Vec<StagedOp> =
        serde_json::from_slice(&std::fs::read(s.base.join("ops.json")).unwrap()).unwrap();
    let stage = Stage::from_ops(s.stage_dir(), ws, run(), ops).unwrap();
    assert_eq!(stage.diff().unwrap().len(), 5);
}

#[test]
fn a_journal_torn_before_its_rename_is_not_a_commit() {
    let (s, before, _after) = prepare();
    std::fs::write(
        s.stage_dir().join("journal.json.tmp"),
        b"{\"format\": \"ice-com",
    )
    .unwrap();
    let ws = Workspace::open(&s.ws).unwrap();
    assert_eq!(
        recover(s.stage_dir(), &ws).unwrap(),
        Recovery::NothingPending
    );
    assert!(!s.stage_dir().join("journal.json.tmp").exists());
    assert_eq!(tree(&s.ws), before);
}

#[test]
fn a_stage_with_a_pending_journal_cannot_be_reopened_or_discarded() {
    let (s, _before, _after) = prepare();
    commit_and_kill_at(&s, "journal");
    let ws = Workspace::open(&s.ws).unwrap();
    assert!(matches!(
        Stage::create(s.stage_dir(), ws, run()),
        Err(crate::StageError::PendingCommit { .. })
    ));
}
