//! A checkpoint is a signature over the log: it is signed only over what verification accepts.
//! `verify::sign_checkpoint` checks everything the latest checkpoint does not cover yet, as
//! deeply as `verify --deep`, at the cost of the new events (not the whole log), and refuses to
//! sign over a forged event or a log rewritten under its last checkpoint.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use ice_kernel::Draft;
use ice_log::checkpoint::NoteSigner;
use ice_log::merkle::{Frontier, leaf_hash};
use ice_log::sqlite::{Mode, SqliteLog};
use ice_log::verify::{
    SignError, SignedRecord, SignerMemory, sign_checkpoint, sign_checkpoint_with, verify_tail,
    verify_tail_with, verify_with,
};
use ice_log::{EventLog, root_at};
use rusqlite::params;
use serde_json::{Value, json};

fn signer() -> NoteSigner {
    NoteSigner::from_seed("ice.test/signing", [7u8; 32]).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn each_checkpoint_is_signed_after_checking_only_what_is_new() {
    let fx = Fixture::new();
    let s = signer();
    let (a, b, c) = (run_id("a"), run_id("b"), run_id("c"));
    fx.ledger.append(&a, opening()).await.unwrap();
    fx.ledger.append(&b, opening()).await.unwrap();
    let first = sign_checkpoint(fx.log(), &s).await.unwrap();
    assert_eq!(first.size, 8);
    assert_eq!(first.root, root_at(fx.log(), 8).await.unwrap());

    // After it: more of `a` and `b` (whose heads are read from before the checkpoint), an event
    // of `b` citing one of `a` from before it, and a new run `c`.
    fx.ledger
        .append(&a, vec![working(0, 1), working(5, 2)])
        .await
        .unwrap();
    let mut cites = working(1, 3);
    cites.causes.push(event_id("a:2"));
    fx.ledger.append(&b, vec![cites]).await.unwrap();
    fx.ledger.append(&c, opening()).await.unwrap();
    let tail = verify_tail(fx.log(), &s.verifier()).await.unwrap();
    assert!(tail.report.ok(), "{:?}", tail.report.failure);
    assert_eq!(
        tail.report.events, 7,
        "only the events after the checkpoint"
    );
    assert_eq!(tail.report.runs, 3);
    assert!(tail.report.deep);
    let second = sign_checkpoint(fx.log(), &s).await.unwrap();
    assert_eq!(second.size, 15);
    assert_eq!(second.root, root_at(fx.log(), 15).await.unwrap());

    // A cause in a run with nothing new is looked up, not read: only `c` is read.
    let mut cites = working(1, 4);
    cites.causes.push(event_id("a:1"));
    fx.ledger.append(&c, vec![cites]).await.unwrap();
    let tail = verify_tail(fx.log(), &s.verifier()).await.unwrap();
    assert!(tail.report.ok(), "{:?}", tail.report.failure);
    assert_eq!((tail.report.events, tail.report.runs), (1, 1));
    let second = sign_checkpoint(fx.log(), &s).await.unwrap();
    assert_eq!(second.size, 16);

    // Nothing new: signing again covers the same events.
    let again = sign_checkpoint(fx.log(), &s).await.unwrap();
    assert_eq!((again.size, again.root), (second.size, second.root));

    let report = verify_with(fx.log(), Some(&s.verifier()), true, |_| {})
        .await
        .unwrap();
    assert!(report.ok(), "{:?}", report.failure);
    assert_eq!(report.checkpoints_verified, 3);
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
}

/// A closed log of two runs, a checkpoint after the first 8 events and 3 events after it.
async fn signed_then_grown() -> (tempfile::TempDir, PathBuf) {
    let fx = Fixture::with_tree_floor(1);
    let s = signer();
    fx.ledger.append(&run_id("a"), opening()).await.unwrap();
    fx.ledger.append(&run_id("b"), opening()).await.unwrap();
    sign_checkpoint(fx.log(), &s).await.unwrap();
    let more: Vec<Draft> = vec![working(0, 1), working(3, 2), working(4, 3)];
    fx.ledger.append(&run_id("a"), more).await.unwrap();
    fx.close()
}

/// Play an attacker with write access to the file: replace the last event's body with
/// `forge(body)` and make everything the default verification checks agree with it (its hash,
/// the stored tree nodes its leaf completes, the head's last hash). Only its decoding or its
/// canonical encoding give it away.
fn forge_last(path: &Path, forge: impl FnOnce(Value) -> Vec<u8>) -> u64 {
    let c = tamper_connection(path);
    let hashes: Vec<Vec<u8>> = c
        .prepare("SELECT hash FROM events ORDER BY log_seq")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let last = hashes.len() as u64 - 1;
    let body: Vec<u8> = c
        .query_row(
            "SELECT body FROM events WHERE log_seq = ?1",
            [last as i64],
            |r| r.get(0),
        )
        .unwrap();
    let forged = forge(serde_json::from_slice(&body).unwrap());
    let hash = ice_kernel::Digest::of(&forged);
    c.execute(
        "UPDATE events SET body = ?1, hash = ?2 WHERE log_seq = ?3",
        params![forged, hash.0.to_vec(), last as i64],
    )
    .unwrap();
    let mut f = Frontier::new();
    for h in &hashes[..last as usize] {
        f.push(leaf_hash(h));
    }
    for (id, h) in f.push(leaf_hash(&hash.0)) {
        c.execute(
            "UPDATE tree SET hash = ?1 WHERE leaf_end = ?2 AND level = ?3",
            params![h.0.to_vec(), last as i64, id.level as i64],
        )
        .unwrap();
    }
    c.execute("UPDATE head SET last = ?1", params![hash.0.to_vec()])
        .unwrap();
    last
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forged_event_after_the_last_checkpoint_is_not_signed() {
    let (_dir, path) = signed_then_grown().await;
    let s = signer();
    type Forge = Box<dyn FnOnce(Value) -> Vec<u8>>;
    let forgeries: [(&str, Forge); 2] = [
        (
            // The same event, spaced out: not its canonical encoding.
            "spaced.db",
            Box::new(|v| serde_json::to_vec_pretty(&v).unwrap()),
        ),
        (
            // A payload the event's type does not have.
            "payload.db",
            Box::new(|mut v| {
                v["payload"] = json!("not the payload of a tool call");
                serde_json::to_vec(&v).unwrap()
            }),
        ),
    ];
    for (name, forge) in forgeries {
        let copy = copy_log(&path, name);
        let last = forge_last(&copy, forge);
        let log = SqliteLog::open(&copy, Mode::ReadWrite).unwrap();
        let deep = verify_with(&log, Some(&s.verifier()), true, |_| {})
            .await
            .unwrap();
        let found = deep.failure.expect("deep verification finds the forgery");
        assert_eq!(found.log_seq, Some(last), "{name}: {found:?}");

        let err = sign_checkpoint(&log, &s).await.unwrap_err();
        let SignError::Refused(f) = &err else {
            panic!("{name}: not refused: {err}");
        };
        assert_eq!(f.log_seq, Some(last), "{name}: {f:?}");
        assert_eq!(f.event_id.as_deref(), Some("a:6"), "{name}: {f:?}");
        let message = err.to_string();
        assert!(message.contains("nothing was signed"), "{message}");
        assert_eq!(
            log.checkpoints().await.unwrap().len(),
            1,
            "{name}: a checkpoint was stored"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_log_rewritten_under_its_checkpoint_or_cut_short_is_not_signed() {
    let (_dir, path) = signed_then_grown().await;
    let s = signer();
    let cases: [(&str, &str, &str); 3] = [
        (
            "rewritten.db",
            // The node over the first 8 leaves, which the checkpoint's root is made of.
            "UPDATE tree SET hash = zeroblob(32) WHERE leaf_end = 7 AND level = 3",
            "the log was rewritten before it",
        ),
        (
            "note.db",
            "UPDATE checkpoints SET note = replace(note, 'ice.test/signing', 'ice.test/other')",
            "the latest checkpoint (size 8)",
        ),
        (
            "short.db",
            "DELETE FROM events WHERE log_seq >= 5; DELETE FROM tree WHERE leaf_end >= 5;
             UPDATE head SET size = 5",
            "a signed checkpoint covers 8",
        ),
    ];
    for (name, sql, want) in cases {
        let copy = copy_log(&path, name);
        tamper_connection(&copy).execute_batch(sql).unwrap();
        let log = SqliteLog::open(&copy, Mode::ReadWrite).unwrap();
        let err = sign_checkpoint(&log, &s).await.unwrap_err();
        assert!(
            matches!(err, SignError::Refused(_)) && err.to_string().contains(want),
            "{name}: {err}"
        );
        assert_eq!(log.checkpoints().await.unwrap().len(), 1, "{name}");
    }
}

/// A signer that signs again and again (a server) remembers the heads of the runs it read, so
/// the next signature does not read a long run's history again: only what is new.
#[tokio::test(flavor = "multi_thread")]
async fn a_signer_that_remembers_reads_only_what_is_new() {
    let fx = Fixture::new();
    let s = signer();
    let memory = SignerMemory::default();
    let long = run_id("long");
    fx.ledger.append(&long, opening()).await.unwrap();
    let work: Vec<Draft> = (0..20).map(|i| working(0, i)).collect();
    fx.ledger.append(&long, work).await.unwrap();
    sign_checkpoint_with(fx.log(), &s, Some(&memory))
        .await
        .unwrap();

    fx.ledger.append(&long, vec![working(5, 99)]).await.unwrap();
    let mut cites = opening();
    cites[0].causes.push(event_id("long:3"));
    fx.ledger.append(&run_id("other"), cites).await.unwrap();
    // Damage under the checkpoint, in the long run's history: a check that reads that history
    // again sees it; one that remembers does not read it (the whole log's verification does).
    tamper_connection(&fx.path)
        .execute_batch(
            "UPDATE events SET body = CAST(replace(CAST(body AS TEXT), 'thought 0', 'thought 9') AS BLOB) WHERE log_seq = 4",
        )
        .unwrap();
    let fresh = verify_tail(fx.log(), &s.verifier()).await.unwrap();
    assert_eq!(
        fresh.report.failure.map(|f| f.log_seq),
        Some(Some(4)),
        "a fresh check reads the long run from its start"
    );
    let remembered = verify_tail_with(fx.log(), &s.verifier(), Some(&memory))
        .await
        .unwrap();
    assert!(
        remembered.report.ok(),
        "the remembered heads are used: {:?}",
        remembered.report.failure
    );
    assert_eq!(remembered.report.events, 5);
    let next = sign_checkpoint_with(fx.log(), &s, Some(&memory))
        .await
        .unwrap();
    assert_eq!(next.size, 29);
    // It is kept by each signature: the next check again reads only what is new.
    fx.ledger
        .append(&long, vec![working(5, 100)])
        .await
        .unwrap();
    let tail = verify_tail_with(fx.log(), &s.verifier(), Some(&memory))
        .await
        .unwrap();
    assert!(tail.report.ok(), "{:?}", tail.report.failure);
    assert_eq!(tail.report.events, 1);
}

/// A signer keeping its last checkpoint outside the log (`SignerMemory::keeping`) keeps each
/// one it signs; a record it cannot read (here a directory in its place) stops it, naming the
/// record, with nothing signed: it never signs without the check the record is for.
#[tokio::test(flavor = "multi_thread")]
async fn a_signer_keeps_each_checkpoint_it_signs_and_stops_on_a_record_it_cannot_read() {
    let fx = Fixture::new();
    let s = signer();
    fx.ledger.append(&run_id("a"), opening()).await.unwrap();
    let path = fx.dir.path().join("last-checkpoint");
    let memory = SignerMemory::keeping(SignedRecord::at(&path));
    let first = sign_checkpoint_with(fx.log(), &s, Some(&memory))
        .await
        .unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), first.note);
    fx.ledger.append(&run_id("b"), opening()).await.unwrap();
    let second = sign_checkpoint_with(fx.log(), &s, Some(&memory))
        .await
        .unwrap();
    assert!(second.size > first.size);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), second.note);
    let kept = memory.record().unwrap().kept().unwrap().unwrap();
    assert_eq!(kept.note, second.note);

    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    fx.ledger.append(&run_id("c"), opening()).await.unwrap();
    let err = sign_checkpoint_with(fx.log(), &s, Some(&memory))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains(&path.display().to_string())
            && err.to_string().contains("not a regular file"),
        "{err}"
    );
    assert_eq!(fx.log().checkpoints().await.unwrap().len(), 2);
}

/// A signer killed between writing its record aside and renaming it into place leaves the
/// copy (`.last-checkpoint.PID.N`); the next signer to keep the record (holding the record's
/// lock, as every writer does until its rename) removes it, and nothing else.
#[tokio::test(flavor = "multi_thread")]
async fn keeping_a_record_removes_what_a_killed_signer_left_aside() {
    let fx = Fixture::new();
    fx.ledger.append(&run_id("a"), opening()).await.unwrap();
    let path = fx.dir.path().join("last-checkpoint");
    let left = fx.dir.path().join(".last-checkpoint.4242.7");
    let others = [
        ".last-checkpoint.notes",
        ".last-checkpoint.12.x",
        ".other.4242.7",
    ]
    .map(|n| fx.dir.path().join(n));
    for p in others.iter().chain([&left]) {
        std::fs::write(p, "x").unwrap();
    }
    let memory = SignerMemory::keeping(SignedRecord::at(&path));
    let signed = sign_checkpoint_with(fx.log(), &signer(), Some(&memory))
        .await
        .unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), signed.note);
    assert!(!left.exists(), "the copy left aside is still there");
    for p in &others {
        assert!(p.exists(), "{} was removed", p.display());
    }
}

#[tokio::test]
async fn a_signer_waits_for_another_process_keeping_the_record() {
    // Another process (here a thread holding the same file lock) is keeping a checkpoint: the
    // record must not change under it, or a larger checkpoint could be replaced by a smaller.
    let fx = Fixture::new();
    let s = signer();
    fx.ledger.append(&run_id("a"), opening()).await.unwrap();
    let path = fx.dir.path().join("last-checkpoint");
    let record = SignedRecord::at(&path);
    let lock_path = record.lock_path();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let watch = path.clone();
    let holder = std::thread::spawn(move || {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .unwrap();
        f.lock().unwrap();
        ready_tx.send(()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(400));
        let seen = std::fs::read_to_string(&watch).ok();
        drop(f);
        seen
    });
    ready_rx.recv().unwrap();
    let memory = SignerMemory::keeping(record);
    let signed = sign_checkpoint_with(fx.log(), &s, Some(&memory))
        .await
        .unwrap();
    let seen_while_locked = holder.join().unwrap();
    assert_eq!(
        seen_while_locked, None,
        "the record changed while it was locked"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), signed.note);
}
