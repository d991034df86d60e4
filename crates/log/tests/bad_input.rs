//! Bad input at the log's boundaries: damaged or missing database files, and malformed or
//! forged proof files. Each is refused with an error that says what and where, and nothing on
//! disk is modified by trying.

mod common;

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use common::*;
use ice_log::checkpoint::{Checkpoint, NoteSigner};
use ice_log::proof::{MAX_PROOF_BYTES, ProofFile, prove_consistency, prove_inclusion};
use ice_log::sqlite::{Mode, SqliteLog};
use ice_log::{LogError, StoredCheckpoint, root_at};
use serde_json::{Value, json};

/// A closed log with a few runs in it.
async fn sample_log() -> (tempfile::TempDir, std::path::PathBuf) {
    let fx = Fixture::new();
    for r in 0..4 {
        fx.ledger
            .append(&run_id(&format!("r{r}")), full_run(&[0, 1, 2, 3, 4, 5, 6]))
            .await
            .unwrap();
    }
    let (dir, path) = fx.close();
    // Fold the WAL into the file so the file alone is the log.
    let c = rusqlite::Connection::open(&path).unwrap();
    c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);").unwrap();
    drop(c);
    (dir, path)
}

/// Every file in the directory with its bytes, to show that nothing was modified. SQLite's
/// side files are left out when they hold no data: the shared-memory index (`-shm`) and an
/// empty write-ahead log (`-wal`), which a connection to a WAL database may leave behind.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .filter(|(name, bytes)| {
            !(name.ends_with("-shm") || (name.ends_with("-wal") && bytes.is_empty()))
        })
        .collect();
    out.sort();
    out
}

/// Opening must fail, clearly, naming the file; the directory must be as it was.
fn assert_open_refused(path: &Path, mode: Mode) -> LogError {
    let dir = path.parent().unwrap();
    let before = snapshot(dir);
    let err = match SqliteLog::open(path, mode) {
        Err(e) => e,
        Ok(_) => panic!(
            "{} opened ({mode:?}) although it is damaged",
            path.display()
        ),
    };
    assert!(
        matches!(
            err,
            LogError::NotALog { .. } | LogError::Corrupt { .. } | LogError::Storage { .. }
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    eprintln!("{mode:?}: {msg}");
    assert!(
        msg.contains(&path.display().to_string()),
        "the error does not name the file: {msg}"
    );
    let after = snapshot(dir);
    assert!(
        before == after,
        "opening modified the directory: {:?} -> {:?}",
        before.iter().map(|(n, b)| (n, b.len())).collect::<Vec<_>>(),
        after.iter().map(|(n, b)| (n, b.len())).collect::<Vec<_>>()
    );
    err
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_with_a_damaged_header_is_not_a_log() {
    let (_dir, path) = sample_log().await;
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[..16].copy_from_slice(b"NOT A DATABASE!\0");
    std::fs::write(&path, &bytes).unwrap();
    for mode in [Mode::ReadOnly, Mode::ReadWrite] {
        // What SQLite reports as no database is damage (a verdict for `ice verify`).
        let err = assert_open_refused(&path, mode);
        assert!(
            matches!(&err, LogError::Corrupt { what } if what.contains("not an ICE log, or one too damaged to read")),
            "{err:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_truncated_file_is_refused_when_opened_for_writing() {
    let (_dir, path) = sample_log().await;
    let bytes = std::fs::read(&path).unwrap();
    assert!(
        bytes.len() >= 8 * 4096,
        "sample log is only {} bytes",
        bytes.len()
    );
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert_open_refused(&path, Mode::ReadWrite);
    // Read-only, the damage may only show where the missing pages are read; then verification
    // must fail clearly rather than report a healthy log.
    let before = snapshot(path.parent().unwrap());
    match SqliteLog::open(&path, Mode::ReadOnly) {
        Err(e) => assert!(e.to_string().contains(&path.display().to_string()), "{e}"),
        Ok(log) => match ice_log::verify::verify(&log, None, |_| {}).await {
            Err(e) => {
                eprintln!("read-only verify: {e}");
                assert!(
                    matches!(e, LogError::Corrupt { .. } | LogError::Storage { .. }),
                    "{e:?}"
                )
            }
            Ok(r) => {
                eprintln!("read-only verify: {:?}", r.failure);
                assert!(!r.ok(), "a truncated log verified: {r:?}")
            }
        },
    }
    assert!(
        before == snapshot(path.parent().unwrap()),
        "reading modified the file"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_empty_file_or_another_database_is_not_a_log() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.db");
    std::fs::write(&empty, b"").unwrap();
    for mode in [Mode::ReadOnly, Mode::ReadWrite] {
        let err = assert_open_refused(&empty, mode);
        assert!(matches!(err, LogError::NotALog { .. }), "{err:?}");
    }
    let other = dir.path().join("other.db");
    let c = rusqlite::Connection::open(&other).unwrap();
    c.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
        .unwrap();
    drop(c);
    for mode in [Mode::ReadOnly, Mode::ReadWrite] {
        let err = assert_open_refused(&other, mode);
        assert!(matches!(err, LogError::NotALog { .. }), "{err:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_file_is_not_a_log_and_is_not_created() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing.db");
    for mode in [Mode::ReadOnly, Mode::ReadWrite] {
        match SqliteLog::open(&path, mode) {
            Err(LogError::NotALog { path: p, reason }) => {
                assert_eq!(p, path.display().to_string());
                assert!(reason.contains("no such file"), "{reason}");
            }
            Err(e) => panic!("{e:?}"),
            Ok(_) => panic!("opened a missing file"),
        }
        assert!(!path.exists());
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

// ---- proof files ----

fn signer() -> NoteSigner {
    NoteSigner::from_seed("ice.test/bad", [5u8; 32]).unwrap()
}

/// A log with two checkpoints; returns a valid inclusion and consistency proof as JSON values.
async fn good_proofs() -> (Value, Value) {
    let fx = Fixture::new();
    let s = signer();
    let mut notes = Vec::new();
    for r in 0..2 {
        fx.ledger
            .append(&run_id(&format!("r{r}")), full_run(&[0, 3, 4]))
            .await
            .unwrap();
        let size = fx.log().size().await.unwrap();
        let root = root_at(fx.log(), size).await.unwrap();
        let note = Checkpoint {
            origin: s.name().into(),
            size,
            root,
        }
        .sign(&s)
        .unwrap();
        fx.log()
            .add_checkpoint(StoredCheckpoint {
                size,
                note: note.clone(),
            })
            .await
            .unwrap();
        notes.push(note);
    }
    let inc = prove_inclusion(fx.log(), &event_id("r0:5"), &notes[1])
        .await
        .unwrap();
    let con = prove_consistency(fx.log(), &notes[0], &notes[1])
        .await
        .unwrap();
    (
        serde_json::to_value(&inc).unwrap(),
        serde_json::to_value(&con).unwrap(),
    )
}

/// Parse and verify a proof file given as JSON; the error, if any, as one message.
fn check(v: &Value) -> Result<String, String> {
    let p = ProofFile::parse(&serde_json::to_vec(v).unwrap())?;
    p.verify(&signer().verifier()).map(|v| v.statement)
}

fn expect_err(v: &Value, needle: &str) {
    match check(v) {
        Ok(s) => panic!("a bad proof verified: {s}"),
        Err(e) => assert!(e.contains(needle), "error {e:?} does not say {needle:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_is_not_a_proof_file() {
    for bad in [
        &b"garbage"[..],
        b"",
        b"{}",
        b"[1,2,3]",
        b"{\"format\":\"ice-inclusion-proof/9\"}",
        b"{\"format\":\"ice-consistency-proof/1\",\"old_checkpoint\":\"x\"}",
    ] {
        let e = ProofFile::parse(bad).unwrap_err();
        assert!(e.contains("not an ICE proof file"), "{e}");
    }
    let (inc, _) = good_proofs().await;
    let text = serde_json::to_vec(&inc).unwrap();
    let e = ProofFile::parse(&text[..text.len() / 2]).unwrap_err();
    assert!(e.contains("not an ICE proof file"), "{e}");
    let mut extra = inc.clone();
    extra["note"] = json!("unknown field");
    assert!(ProofFile::parse(&serde_json::to_vec(&extra).unwrap()).is_err());
    let huge = vec![b' '; MAX_PROOF_BYTES + 1];
    let e = ProofFile::parse(&huge).unwrap_err();
    assert!(e.contains("at most"), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_or_altered_inclusion_proofs_are_rejected() {
    let (inc, _) = good_proofs().await;
    check(&inc).expect("the good proof verifies");
    assert!(!inc["proof"].as_array().unwrap().is_empty());

    // A proof hash of the wrong length, or not base64.
    let mut v = inc.clone();
    v["proof"][0] = json!(B64.encode([0u8; 31]));
    expect_err(&v, "not 32 bytes");
    let mut v = inc.clone();
    v["proof"][0] = json!("not base64!");
    expect_err(&v, "not base64");
    // A flipped bit in a proof hash, a hash too many, a hash too few.
    let mut v = inc.clone();
    let mut h = B64.decode(v["proof"][0].as_str().unwrap()).unwrap();
    h[0] ^= 1;
    v["proof"][0] = json!(B64.encode(h));
    expect_err(&v, "does not verify");
    let mut v = inc.clone();
    v["proof"]
        .as_array_mut()
        .unwrap()
        .push(json!(B64.encode([1u8; 32])));
    expect_err(&v, "does not verify");
    let mut v = inc.clone();
    v["proof"].as_array_mut().unwrap().pop();
    expect_err(&v, "does not verify");
    // Another position.
    let mut v = inc.clone();
    v["log_seq"] = json!(inc["log_seq"].as_u64().unwrap() + 1);
    expect_err(&v, "does not verify");

    // The event altered: its stated hash no longer matches.
    let mut v = inc.clone();
    v["event"]["payload"]["extra"] = json!("forged");
    expect_err(&v, "altered");
    let mut v = inc.clone();
    v["event"]["origin"] = json!("agent:mallory");
    expect_err(&v, "altered");
    // The event altered and re-hashed: then it is not the event the log holds.
    let mut v = inc.clone();
    v["event"]["payload"]["extra"] = json!("forged");
    let mut e: ice_kernel::Event = serde_json::from_value(v["event"].clone()).unwrap();
    e.hash = e.compute_hash();
    v["event"] = serde_json::to_value(&e).unwrap();
    expect_err(&v, "does not verify");

    // The checkpoint altered, or signed by another key.
    let mut v = inc.clone();
    let note = v["checkpoint"].as_str().unwrap().replacen('\n', "\n1", 1);
    v["checkpoint"] = json!(note);
    expect_err(&v, "checkpoint");
    let other = NoteSigner::from_seed("ice.test/bad", [6u8; 32]).unwrap();
    let cp = Checkpoint::parse_unverified(inc["checkpoint"].as_str().unwrap()).unwrap();
    let mut v = inc.clone();
    v["checkpoint"] = json!(cp.sign(&other).unwrap());
    expect_err(&v, "no signature by key ice.test/bad");
    // Verified with another key than the log's.
    let p = ProofFile::parse(&serde_json::to_vec(&inc).unwrap()).unwrap();
    let e = p.verify(&other.verifier()).unwrap_err();
    assert!(e.contains("checkpoint"), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_or_altered_consistency_proofs_are_rejected() {
    let (_, con) = good_proofs().await;
    check(&con).expect("the good proof verifies");
    let mut v = con.clone();
    v["proof"][0] = json!(B64.encode([0u8; 33]));
    expect_err(&v, "not 32 bytes");
    let mut v = con.clone();
    v["proof"].as_array_mut().unwrap().clear();
    expect_err(&v, "does not verify");
    let mut v = con.clone();
    let mut h = B64.decode(v["proof"][0].as_str().unwrap()).unwrap();
    h[31] ^= 0x80;
    v["proof"][0] = json!(B64.encode(h));
    expect_err(&v, "does not verify");
    let mut v = con.clone();
    v["proof"] = json!(vec![B64.encode([0u8; 32]); 65]);
    expect_err(&v, "at most 64");
    // Swapped checkpoints.
    let mut v = con.clone();
    v["old_checkpoint"] = con["new_checkpoint"].clone();
    v["new_checkpoint"] = con["old_checkpoint"].clone();
    expect_err(&v, "larger");
    // A new checkpoint signed by someone else.
    let other = NoteSigner::from_seed("ice.test/bad", [6u8; 32]).unwrap();
    let cp = Checkpoint::parse_unverified(con["new_checkpoint"].as_str().unwrap()).unwrap();
    let mut v = con.clone();
    v["new_checkpoint"] = json!(cp.sign(&other).unwrap());
    expect_err(&v, "new checkpoint");
    // A forged new checkpoint (another root) signed by the log's key: the proof exposes it.
    let forged = Checkpoint {
        root: ice_kernel::Digest([9u8; 32]),
        ..cp
    };
    let mut v = con.clone();
    v["new_checkpoint"] = json!(forged.sign(&signer()).unwrap());
    expect_err(&v, "does not verify");
}
