//! Large payload fields go to the content-addressed blob store; the event keeps the digest, and
//! verification checks every blob an event references.

mod common;

use common::*;
use ice_kernel::blob::blob_refs;
use ice_kernel::limits::BLOB_FIELD_THRESHOLD_BYTES;
use ice_kernel::{Digest, Draft, Origin};
use rusqlite::params;
use serde_json::{Value, json};

fn tool_output(output: Value) -> Draft {
    Draft::new("ToolInvoked", Origin::Runtime)
        .intent("run a tool")
        .authority("grant:g1")
        .payload(json!({"tool": "cat", "output": output}))
}

/// A string whose canonical JSON encoding (quotes included) is exactly `n` bytes.
fn encoded_len(n: usize) -> Value {
    Value::String("o".repeat(n - 2))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_field_is_stored_as_a_blob_and_the_event_keeps_its_digest() {
    let fx = Fixture::new();
    let run = run_id("blobs");
    fx.ledger.append(&run, opening()).await.unwrap();
    let big = encoded_len(BLOB_FIELD_THRESHOLD_BYTES + 1);
    let at_limit = encoded_len(BLOB_FIELD_THRESHOLD_BYTES);
    let (_, batch) = fx
        .ledger
        .append(
            &run,
            vec![tool_output(big.clone()), tool_output(at_limit.clone())],
        )
        .await
        .unwrap();
    assert_eq!(batch.blobs().len(), 1);

    // Over the threshold: a reference in the event, the bytes in the store.
    let stored = fx.log().get(&event_id("blobs:4")).await.unwrap().unwrap();
    let e = stored.event().unwrap();
    let refs = blob_refs(&e.payload).unwrap();
    assert_eq!(refs.len(), 1);
    let r = &refs[0];
    assert_eq!(r.field, "output");
    let bytes = serde_json::to_vec(&big).unwrap();
    assert_eq!(r.digest, Digest::of(&bytes));
    assert_eq!(r.size, bytes.len() as u64);
    assert_eq!(fx.log().blob(&r.digest).await.unwrap(), Some(bytes));
    assert!(stored.body.len() < BLOB_FIELD_THRESHOLD_BYTES);
    assert_eq!(e.payload["tool"], "cat");
    // Inlining restores the payload as it was proposed.
    let inlined = ice_kernel::blob::inline(&e.payload, |d| {
        (*d == r.digest).then(|| serde_json::to_vec(&big).unwrap())
    });
    assert_eq!(inlined["output"], big);

    // At the threshold: inline.
    let e5 = fx
        .log()
        .get(&event_id("blobs:5"))
        .await
        .unwrap()
        .unwrap()
        .event()
        .unwrap();
    assert!(blob_refs(&e5.payload).unwrap().is_empty());
    assert_eq!(e5.payload["output"], at_limit);

    let report = assert_verifies(fx.log()).await;
    assert_eq!(report.blobs_checked, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn identical_large_fields_share_one_blob() {
    let fx = Fixture::new();
    let run = run_id("dedup");
    fx.ledger.append(&run, opening()).await.unwrap();
    let big = encoded_len(BLOB_FIELD_THRESHOLD_BYTES * 2);
    fx.ledger
        .append(&run, vec![tool_output(big.clone())])
        .await
        .unwrap();
    fx.ledger
        .append(&run, vec![tool_output(big)])
        .await
        .unwrap();
    let (_dir, path) = fx.close();
    let c = rusqlite::Connection::open(&path).unwrap();
    let n: i64 = c
        .query_row("SELECT COUNT(*) FROM blobs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
    drop(c);
    let log = open_ro(&path);
    assert_eq!(assert_verifies(&log).await.blobs_checked, 2);
}

/// Build a log whose event `blobs:5` references a blob, close it, and return the blob's digest.
async fn log_with_a_blob() -> (tempfile::TempDir, std::path::PathBuf, Digest) {
    let fx = Fixture::new();
    let run = run_id("blobs");
    fx.ledger.append(&run, opening()).await.unwrap();
    fx.ledger.append(&run, vec![working(0, 0)]).await.unwrap();
    let (_, batch) = fx
        .ledger
        .append(
            &run,
            vec![tool_output(encoded_len(BLOB_FIELD_THRESHOLD_BYTES + 100))],
        )
        .await
        .unwrap();
    fx.ledger.append(&run, vec![working(1, 1)]).await.unwrap();
    let digest = batch.blobs()[0].digest;
    let (dir, path) = fx.close();
    (dir, path, digest)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tampered_blob_fails_verification_naming_its_event() {
    let (_dir, path, digest) = log_with_a_blob().await;
    let c = tamper_connection(&path);
    let mut bytes: Vec<u8> = c
        .query_row(
            "SELECT bytes FROM blobs WHERE digest = ?1",
            [&digest.0[..]],
            |r| r.get(0),
        )
        .unwrap();
    bytes[100] = b'X';
    c.execute(
        "UPDATE blobs SET bytes = ?1 WHERE digest = ?2",
        params![bytes, &digest.0[..]],
    )
    .unwrap();
    drop(c);
    let log = open_ro(&path);
    let r = verify_log(&log).await;
    let f = r.failure.expect("a tampered blob must be detected");
    assert_eq!(f.log_seq, Some(5), "{f:?}");
    assert_eq!(f.event_id.as_deref(), Some("blobs:5"), "{f:?}");
    assert!(f.problem.contains(&digest.to_hex()), "{f:?}");
    assert!(f.problem.contains("altered"), "{f:?}");
}

/// Every blob row is checked, not only those events reference: bytes planted or altered under a
/// name no event uses yet are reported at both depths; an intact unreferenced row is not.
#[tokio::test(flavor = "multi_thread")]
async fn an_altered_blob_no_event_references_fails_verification() {
    let (_dir, path, _) = log_with_a_blob().await;
    let spare = b"bytes no event references";
    let name = Digest::of(spare);
    let c = tamper_connection(&path);
    c.execute(
        "INSERT INTO blobs(digest, bytes) VALUES (?1, ?2)",
        params![&name.0[..], &spare[..]],
    )
    .unwrap();
    drop(c);
    let r = verify_log(&open_ro(&path)).await;
    assert!(r.ok(), "an intact row is no problem: {:?}", r.failure);

    let planted = Digest::of(b"what a future event will carry");
    let c = tamper_connection(&path);
    c.execute(
        "INSERT INTO blobs(digest, bytes) VALUES (?1, ?2)",
        params![&planted.0[..], &b"something else"[..]],
    )
    .unwrap();
    drop(c);
    let log = open_ro(&path);
    for deep in [false, true] {
        let r = ice_log::verify::verify_with(&log, None, deep, |_| {})
            .await
            .unwrap();
        let f = r.failure.expect("an altered blob row is caught");
        assert!(
            f.problem.contains(&planted.to_hex()) && f.problem.contains("no event references it"),
            "deep {deep}: {f:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_or_resized_blob_fails_verification_naming_its_event() {
    let (_dir, path, digest) = log_with_a_blob().await;
    let c = tamper_connection(&path);
    c.execute("DELETE FROM blobs WHERE digest = ?1", [&digest.0[..]])
        .unwrap();
    drop(c);
    let f = verify_log(&open_ro(&path))
        .await
        .failure
        .expect("missing blob");
    assert_eq!(f.log_seq, Some(5), "{f:?}");
    assert_eq!(f.event_id.as_deref(), Some("blobs:5"), "{f:?}");
    assert!(f.problem.contains("missing"), "{f:?}");
}

/// Bytes planted under a blob's name before any event needs it (a plain insert, which the
/// append-only triggers allow) must not stand in for the real ones: an append that carries or
/// references that blob fails, names it, and writes nothing, so the real bytes are not lost
/// and no honest event is made to point at garbage.
#[tokio::test(flavor = "multi_thread")]
async fn a_blob_planted_under_a_future_name_is_refused_not_used() {
    let fx = Fixture::new();
    let run = run_id("victim");
    fx.ledger.append(&run, opening()).await.unwrap();
    let big = encoded_len(BLOB_FIELD_THRESHOLD_BYTES + 100);
    let digest = Digest::of(&serde_json::to_vec(&big).unwrap());
    let c = rusqlite::Connection::open(&fx.path).unwrap();
    c.execute(
        "INSERT INTO blobs(digest, bytes) VALUES (?1, ?2)",
        params![&digest.0[..], b"garbage".to_vec()],
    )
    .unwrap();
    drop(c);
    let before = fx.log().size().await.unwrap();
    let err = fx
        .ledger
        .append(&run, vec![tool_output(big)])
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!(
            "blob {digest} is stored with 7 bytes that do not hash to its name"
        )),
        "{err}"
    );
    assert_eq!(
        fx.log().size().await.unwrap(),
        before,
        "nothing was appended"
    );
    // The events are intact; the planted row is what verification reports.
    let f = verify_log(fx.log())
        .await
        .failure
        .expect("the planted row is reported");
    assert!(
        f.problem.contains(&digest.to_hex()) && f.problem.contains("no event references it"),
        "{f:?}"
    );
}
