//! The PostgreSQL backend against a real server (spec §10): what is appended reads back
//! exactly; the tree, roots and proofs equal the SQLite backend's for the same events; several
//! nodes (separate `PgLog`s, separate sessions) appending at once keep one gapless order and
//! never fork a run; claims give a run one writer; lost sessions are survived without anything
//! half-written.
//!
//! The server: `postgres://postgres@127.0.0.1:5432/test`, or `ICE_TEST_POSTGRES_URL`. These tests
//! fail, they do not skip, when it cannot be reached. Each test works in a fresh schema that it
//! drops (with everything in it) when it ends, even by panicking.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use ice_kernel::{Blob, Draft, EventId, NoOtherRuns, RunHead, RunId, SealedBatch, Timestamp};
use ice_log::checkpoint::{Checkpoint, NoteSigner};
use ice_log::ledger::{AppendError, Ledger, fold_run, read_whole_run};
use ice_log::merkle::{self, NodeId};
use ice_log::postgres::{CONNECT_TIMEOUT, Options, PgLog};
use ice_log::proof::{prove_consistency, prove_inclusion};
use ice_log::sqlite::SqliteLog;
use ice_log::verify::verify;
use ice_log::{EventLog, LogError, StoredCheckpoint, range_hashes, root_at};
use serde_json::json;
use tokio_postgres::{Client, NoTls};

fn server_url() -> String {
    std::env::var("ICE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

async fn raw_connect(url: &str) -> Client {
    let (client, conn) = match tokio_postgres::connect(url, NoTls).await {
        Ok(c) => c,
        Err(e) => panic!(
            "PostgreSQL is not reachable at {url} ({e}{}). These tests need a running server: \
             start it, or point ICE_TEST_POSTGRES_URL at one.",
            std::error::Error::source(&e)
                .map(|s| format!(": {s}"))
                .unwrap_or_default()
        ),
    };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A fresh schema for one test, dropped with everything in it when this is dropped.
struct Pg {
    url: String,
    schema: String,
    /// The `application_name` this test's `PgLog` sessions carry (so the test can find and
    /// end them from the server side).
    app: String,
}

impl Pg {
    async fn new() -> Pg {
        let url = server_url();
        // Fail here, loudly, if there is no server.
        drop(raw_connect(&url).await);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let schema = format!(
            "ice_test_{}_{}_{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let app = format!("ice-t-{schema}");
        Pg { url, schema, app }
    }

    /// The URL a node of this test connects with.
    fn node_url(&self) -> String {
        let sep = if self.url.contains('?') { '&' } else { '?' };
        format!("{}{sep}application_name={}", self.url, self.app)
    }

    async fn log(&self) -> PgLog {
        PgLog::connect(&self.node_url(), Some(&self.schema))
            .await
            .unwrap_or_else(|e| panic!("connecting a node to schema {}: {e}", self.schema))
    }

    async fn raw(&self) -> Client {
        raw_connect(&self.url).await
    }

    fn q(&self) -> String {
        format!("\"{}\"", self.schema)
    }

    /// End every session of this test's nodes from the server side, as a server restart or a
    /// network failure would, and wait until they are gone.
    async fn kill_nodes(&self, raw: &Client) -> usize {
        let rows = raw
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                &[&self.app],
            )
            .await
            .unwrap();
        self.wait_gone(raw, None).await;
        rows.len()
    }

    /// Wait until no session of this test's nodes (or just `pid`) is left.
    async fn wait_gone(&self, raw: &Client, pid: Option<i32>) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let n: i64 = raw
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND ($2::int4 IS NULL OR pid = $2)",
                    &[&self.app, &pid],
                )
                .await
                .unwrap()
                .get(0);
            if n == 0 {
                return;
            }
            assert!(Instant::now() < deadline, "sessions did not end");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A session of this test's nodes that waits on a lock (other than those in `not`): its
    /// pid and the statement it is running.
    async fn waiting(&self, raw: &Client, wait_event: Option<&str>, not: &[i32]) -> (i32, String) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let rows = raw
                .query(
                    "SELECT pid, query FROM pg_stat_activity WHERE application_name = $1 \
                     AND wait_event_type = 'Lock' AND ($2::text IS NULL OR wait_event = $2)",
                    &[&self.app, &wait_event],
                )
                .await
                .unwrap();
            if let Some(found) = rows
                .iter()
                .map(|r| (r.get::<_, i32>(0), r.get::<_, String>(1)))
                .find(|(p, _)| !not.contains(p))
            {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "no session of this test waits on a lock"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn terminate(&self, raw: &Client, pid: i32) {
        raw.execute("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .unwrap();
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let (url, schema) = (self.url.clone(), self.schema.clone());
        // A thread of its own: this may run inside (or after) the test's runtime.
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let c = raw_connect(&url).await;
                c.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
                    .await
            })
        })
        .join();
        if let Ok(Err(e)) = done {
            eprintln!("dropping schema {}: {e}", self.schema);
        }
    }
}

fn at(us: i64) -> Timestamp {
    Timestamp::from_unix_us(T0_US + us).unwrap()
}

fn ledger(log: &Arc<PgLog>) -> Ledger {
    Ledger::new(log.clone(), Arc::new(TestClock::new()))
}

fn big(who: &str, n: u64) -> Draft {
    Draft::new("InferenceStep", agent())
        .intent("think")
        .payload(json!({
            "who": who,
            // Over the blob threshold: this field is stored as a blob.
            "output": format!("{who}{n}{}", "x".repeat(ice_kernel::limits::BLOB_FIELD_THRESHOLD_BYTES)),
        }))
}

fn head_of(run: &RunId, batches: &[&SealedBatch]) -> RunHead {
    let mut head = RunHead::new(run.clone());
    for b in batches {
        for e in b.events() {
            head.admit(e.event().clone(), &NoOtherRuns).unwrap();
        }
    }
    head
}

#[tokio::test]
async fn an_unreachable_server_or_a_bad_address_is_a_clear_error() {
    let err = PgLog::connect("postgres://postgres@127.0.0.1:1/test", None)
        .await
        .err()
        .expect("nothing listens on port 1");
    match &err {
        LogError::Storage { context, .. } => assert!(
            context.contains("connecting to postgres://postgres@127.0.0.1:1/test (schema public)"),
            "{err}"
        ),
        other => panic!("{other:?}"),
    }
    let err = PgLog::connect("postgres://u:secret@127.0.0.1:1/test", None)
        .await
        .err()
        .unwrap();
    assert!(!err.to_string().contains("secret"), "{err}");
    assert!(matches!(
        PgLog::connect("postgres://[::1", None).await.err(),
        Some(LogError::Invalid(m)) if m.contains("PostgreSQL URL")
    ));
    for bad in ["", "a-b", "1abc", "x\"; DROP TABLE y; --", &"s".repeat(64)] {
        match PgLog::connect(&server_url(), Some(bad)).await.err() {
            Some(LogError::Invalid(m)) => assert!(m.contains("schema name"), "{m}"),
            other => panic!("schema {bad:?}: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn appended_events_read_back_exactly_in_run_and_log_order() {
    let pg = Pg::new().await;
    let log = Arc::new(pg.log().await);
    let l = ledger(&log);
    let a = run_id("run-a");
    let b = run_id("run-b");
    let (ra, batch_a) = l.append(&a, opening()).await.unwrap();
    assert_eq!((ra.first_log_seq, ra.count, ra.tree_size), (0, 4, 4));
    let (rb, batch_b) = l.append(&b, full_run(&[0, 1, 2])).await.unwrap();
    assert_eq!((rb.first_log_seq, rb.count, rb.tree_size), (4, 12, 16));
    let (rc, batch_c) = l
        .append(&a, vec![working(0, 1), working(4, 2)])
        .await
        .unwrap();
    assert_eq!((rc.first_log_seq, rc.tree_size), (16, 18));
    assert_eq!(log.size().await.unwrap(), 18);

    let stored_a = read_whole_run(log.as_ref(), &a).await.unwrap();
    let sealed_a: Vec<_> = batch_a.events().iter().chain(batch_c.events()).collect();
    assert_eq!(stored_a.len(), sealed_a.len());
    for (s, e) in stored_a.iter().zip(&sealed_a) {
        assert_eq!(s.body, e.body());
        assert_eq!(s.hash, e.event().hash.0.to_vec());
        assert_eq!(&s.event().unwrap(), e.event());
        assert_eq!(s.run_id, "run-a");
        assert_eq!(s.event_type, e.event().event_type);
    }
    assert_eq!(
        stored_a.iter().map(|s| s.log_seq).collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 16, 17]
    );
    let all = all_events(log.as_ref()).await;
    assert_eq!(
        all.iter().map(|s| s.log_seq).collect::<Vec<_>>(),
        (0..18).collect::<Vec<_>>()
    );
    assert_eq!(log.scan(5, 3).await.unwrap(), all[5..8].to_vec());
    assert!(log.scan(18, 10).await.unwrap().is_empty());
    assert!(log.scan(5, 0).await.unwrap().is_empty());
    let part = log.read_run(&b, 10, 100).await.unwrap();
    assert_eq!(part.len(), 2);
    assert_eq!(part[0].run_seq, 10);
    assert_eq!(
        part[0].event().unwrap(),
        batch_b.events()[10].event().clone()
    );
    assert_eq!(log.read_run(&b, 3, 2).await.unwrap(), all[7..9].to_vec());

    let id = EventId::new(b.clone(), 3);
    assert_eq!(log.get(&id).await.unwrap().unwrap().log_seq, 7);
    assert_eq!(log.get(&EventId::new(b.clone(), 12)).await.unwrap(), None);
    assert_eq!(log.runs(0, 10).await.unwrap(), vec![a.clone(), b.clone()]);
    assert_eq!(log.runs(1, 10).await.unwrap(), vec![b.clone()]);
    assert_eq!(log.runs(0, 1).await.unwrap(), vec![a.clone()]);
    assert!(log.runs(2, 10).await.unwrap().is_empty());
    let missing = EventId::new(run_id("nope"), 0);
    let found = log
        .existing(&[id.clone(), missing.clone(), EventId::new(a.clone(), 5)])
        .await
        .unwrap();
    assert_eq!(
        found,
        HashSet::from([id.clone(), EventId::new(a.clone(), 5)])
    );
    assert!(log.existing(&[]).await.unwrap().is_empty());

    // The ledger folds runs from this backend as from any other.
    let view = fold_run(log.as_ref(), &b).await.unwrap();
    assert_eq!(view.head.next_seq, 12);
    let r = assert_verifies(log.as_ref()).await;
    assert_eq!((r.events, r.runs), (18, 2));
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_out_of_range_are_answered_and_bad_claims_refused() {
    let pg = Pg::new().await;
    let log = Arc::new(pg.log().await);
    let l = ledger(&log);
    let a = run_id("a");
    l.append(&a, opening()).await.unwrap();
    assert!(log.read_run(&a, u64::MAX, 10).await.unwrap().is_empty());
    assert!(log.scan(u64::MAX, 10).await.unwrap().is_empty());
    assert!(log.runs(u64::MAX, 10).await.unwrap().is_empty());
    assert_eq!(
        log.get(&EventId::new(a.clone(), u64::MAX)).await.unwrap(),
        None
    );
    assert!(
        log.existing(&[EventId::new(a.clone(), u64::MAX)])
            .await
            .unwrap()
            .is_empty()
    );
    assert!(log.scan_nodes(u64::MAX, u64::MAX).await.unwrap().is_empty());
    assert!(matches!(
        log.nodes(&[NodeId { level: 0, index: u64::MAX }]).await,
        Err(LogError::Invalid(m)) if m.contains("beyond")
    ));
    assert!(matches!(
        log.nodes(&[NodeId {
            level: 70,
            index: 0
        }])
        .await,
        Err(LogError::Invalid(_))
    ));
    // A root of more events than the log holds: a missing node, as SQLite says.
    assert!(matches!(
        root_at(log.as_ref(), 5).await,
        Err(LogError::Corrupt { .. })
    ));
    // An empty batch.
    let mut h = head_of(&a, &[]);
    let empty = h.seal_batch(vec![], at(0), &NoOtherRuns).unwrap();
    assert!(matches!(log.append(empty).await, Err(LogError::Invalid(m)) if m.contains("empty")));
    assert!(matches!(
        log.claim_run(&a, "", 0, 10).await,
        Err(LogError::Invalid(m)) if m.contains("holder")
    ));
    assert!(matches!(
        log.claim_run(&a, "n1", 10, 5).await,
        Err(LogError::Invalid(m)) if m.contains("before now")
    ));
    assert_eq!(log.size().await.unwrap(), 4);
    assert_verifies(log.as_ref()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_conflicting_append_fails_whole_and_writes_nothing() {
    let pg = Pg::new().await;
    let log = Arc::new(pg.log().await);
    let run = run_id("c");
    let clock = Arc::new(TestClock::new());
    let l1 = Ledger::new(log.clone(), clock.clone());
    let l2 = Ledger::new(log.clone(), clock.clone());
    l1.append(&run, opening()).await.unwrap();
    assert_eq!(l2.head(&run).await.unwrap().next_seq, 4);
    l1.append(&run, vec![working(0, 1)]).await.unwrap();
    // A batch of two (one with a blob) at a position that is taken.
    let err = l2
        .append_at(&run, 4, vec![working(0, 2), big("l2", 0)])
        .await
        .unwrap_err();
    match &err {
        AppendError::Log(LogError::Conflict {
            run_id,
            expected: 4,
            actual: 5,
            ..
        }) => assert_eq!(run_id, "c"),
        other => panic!("{other:?}"),
    }
    assert_eq!(log.size().await.unwrap(), 5);
    // Same position, another history: `prev` differs.
    let mut other = RunHead::new(run.clone());
    let mut drafts = opening();
    drafts[0] = Draft::new("RunProvisioned", ice_kernel::Origin::Runtime)
        .payload(json!({"spec": "another"}));
    drafts.push(working(0, 1));
    other.seal_batch(drafts, at(0), &NoOtherRuns).unwrap();
    assert_eq!(other.next_seq, 5);
    let forked = other
        .seal_batch(vec![working(0, 9)], at(10_000_000), &NoOtherRuns)
        .unwrap();
    match log.append(forked).await {
        Err(LogError::Conflict {
            expected: 5,
            actual: 5,
            expected_prev,
            ..
        }) => assert_ne!(expected_prev, l1.head(&run).await.unwrap().last_hash),
        other => panic!("{other:?}"),
    }
    // A brand-new run must start at 0.
    let mut fresh = RunHead::new(run_id("fresh"));
    fresh.seal_batch(opening(), at(0), &NoOtherRuns).unwrap();
    let late = fresh
        .seal_batch(vec![working(0, 1)], at(1), &NoOtherRuns)
        .unwrap();
    assert!(matches!(
        log.append(late).await,
        Err(LogError::Conflict {
            expected: 4,
            actual: 0,
            ..
        })
    ));
    let (ok, _) = l1.append(&run, vec![working(1, 3)]).await.unwrap();
    assert_eq!(ok.first_log_seq, 5);
    assert_eq!(log.size().await.unwrap(), 6);
    assert!(log.runs(0, 10).await.unwrap() == vec![run.clone()]);
    assert_verifies(log.as_ref()).await;
}

/// Appends queued together on one node share a commit: each is judged against the run as the
/// earlier ones leave it, so a continuation lands and a conflicting batch fails alone.
#[tokio::test(flavor = "multi_thread")]
async fn one_group_holds_a_continuation_and_a_conflict_and_only_the_conflict_fails() {
    let pg = Pg::new().await;
    let log = Arc::new(pg.log().await);
    let run = run_id("g");
    let (_, opened) = ledger(&log).append(&run, opening()).await.unwrap();
    for round in 0..10i64 {
        let stored = read_whole_run(log.as_ref(), &run).await.unwrap();
        let mut h = RunHead::new(run.clone());
        for s in &stored {
            h.admit(s.event().unwrap(), &NoOtherRuns).unwrap();
        }
        let mut rival = h.clone();
        let t = at(1_000_000 * (round + 1));
        let first = h
            .seal_batch(vec![working(0, 1), big("g", round as u64)], t, &NoOtherRuns)
            .unwrap();
        let second = h.seal_batch(vec![working(1, 2)], t, &NoOtherRuns).unwrap();
        let clash = rival
            .seal_batch(vec![working(2, 3)], t, &NoOtherRuns)
            .unwrap();
        let other = {
            let mut o = RunHead::new(run_id(&format!("o{round}")));
            o.seal_batch(opening(), t, &NoOtherRuns).unwrap()
        };
        // Queued in this order: first, clash, second, other.
        let (a, b, c, d) = tokio::join!(
            biased;
            log.append(first),
            log.append(clash),
            log.append(second),
            log.append(other),
        );
        let (a, c, d) = (a.unwrap(), c.unwrap(), d.unwrap());
        assert!(
            matches!(b, Err(LogError::Conflict { expected, actual, .. }) if expected == stored.len() as u64 && actual == expected + 2),
            "{b:?}"
        );
        assert_eq!(c.first_log_seq, a.first_log_seq + 2);
        assert_eq!(d.first_log_seq, c.first_log_seq + 1);
        assert_eq!(d.tree_size, d.first_log_seq + 4);
    }
    // Rows one transaction wrote share its xmin: 30 appends took fewer commits.
    let commits: i64 = pg
        .raw()
        .await
        .query_one(
            &format!(
                "SELECT count(DISTINCT xmin::text) FROM {}.events WHERE log_seq >= 4",
                pg.q()
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(commits < 30, "{commits} commits for 30 appends");
    eprintln!("30 appends in {commits} commits");
    assert_eq!(
        read_whole_run(log.as_ref(), &run).await.unwrap().len(),
        opened.events().len() + 30
    );
    assert_verifies(log.as_ref()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn large_fields_become_blobs_and_bad_blobs_are_refused() {
    let pg = Pg::new().await;
    let log = Arc::new(pg.log().await);
    let run = run_id("blobs");
    let (_, opened) = ledger(&log).append(&run, opening()).await.unwrap();
    let mut head = head_of(&run, &[&opened]);

    let sealed = head
        .clone()
        .seal_batch(vec![big("a", 1)], at(1_000_000), &NoOtherRuns)
        .unwrap();
    assert_eq!(sealed.blobs().len(), 1);
    let blob = sealed.blobs()[0].clone();
    let events = sealed.events().to_vec();

    // Bytes that do not hash to the blob's name.
    let forged = Blob {
        digest: blob.digest,
        bytes: b"\"something else\"".to_vec(),
    };
    let bad = RunHead::batch_of(run.clone(), events.clone(), vec![forged]).unwrap();
    match log.append(bad).await {
        Err(LogError::Invalid(m)) => {
            assert!(
                m.contains(&blob.digest.to_string()) && m.contains("does not hash"),
                "{m}"
            )
        }
        other => panic!("{other:?}"),
    }
    // The blob is not carried and not stored.
    let missing = RunHead::batch_of(run.clone(), events.clone(), vec![]).unwrap();
    match log.append(missing).await {
        Err(LogError::Invalid(m)) => assert!(
            m.contains("blobs:4") && m.contains("that is not stored"),
            "{m}"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(log.size().await.unwrap(), 4);
    assert_eq!(log.blob(&blob.digest).await.unwrap(), None);

    // Bytes planted under the blob's name (a plain insert) do not stand in for the real ones:
    // the append that carries the blob fails, names it, and writes nothing.
    let raw = pg.raw().await;
    let q = pg.q();
    raw.execute(
        &format!("INSERT INTO {q}.blobs(digest, bytes) VALUES ($1, $2)"),
        &[&&blob.digest.0[..], &&b"garbage"[..]],
    )
    .await
    .unwrap();
    match log.append(sealed.clone()).await {
        Err(LogError::Corrupt { what }) => assert!(
            what.contains(&blob.digest.to_string()) && what.contains("do not hash to its name"),
            "{what}"
        ),
        other => panic!("a planted blob was used: {other:?}"),
    }
    assert_eq!(log.size().await.unwrap(), 4);
    raw.batch_execute(&format!(
        "DROP TRIGGER blobs_append_only ON {q}.blobs; DELETE FROM {q}.blobs"
    ))
    .await
    .unwrap();

    let r = log.append(sealed.clone()).await.unwrap();
    assert_eq!((r.first_log_seq, r.count), (4, 1));
    head = head_of(&run, &[&opened, &sealed]);
    assert_eq!(
        log.blob(&blob.digest).await.unwrap(),
        Some(blob.bytes.clone())
    );
    let stored = log
        .get(&EventId::new(run.clone(), 4))
        .await
        .unwrap()
        .unwrap();
    let refs = ice_kernel::blob::blob_refs(&stored.event().unwrap().payload).unwrap();
    assert_eq!(refs.len(), 1);
    assert_eq!(refs[0].digest, blob.digest);

    // A later event may reference a blob that is already stored without carrying it.
    let again = head
        .clone()
        .seal_batch(vec![big("a", 1)], at(2_000_000), &NoOtherRuns)
        .unwrap();
    assert_eq!(again.blobs()[0].digest, blob.digest);
    let bare = RunHead::batch_of(run.clone(), again.events().to_vec(), vec![]).unwrap();
    assert_eq!(log.append(bare).await.unwrap().first_log_seq, 5);
    let r = assert_verifies(log.as_ref()).await;
    assert_eq!(r.blobs_checked, 2);
}

/// Sealed batches for several runs, interleaved, some with blobs, all at fixed times: the same
/// bytes for any backend.
fn corpus() -> Vec<SealedBatch> {
    let mut heads: BTreeMap<String, RunHead> = BTreeMap::new();
    let mut out = Vec::new();
    let mut t = 0i64;
    let mut seal = |name: &str, drafts: Vec<Draft>| {
        let h = heads
            .entry(name.to_string())
            .or_insert_with(|| RunHead::new(run_id(name)));
        t += 1000;
        h.seal_batch(drafts, at(t), &NoOtherRuns).unwrap()
    };
    out.push(seal("t0", opening()));
    out.push(seal("t1", full_run(&[0, 1, 2, 3])));
    out.push(seal("t0", vec![working(4, 1)]));
    out.push(seal("t2", opening()));
    for i in 0..9u64 {
        out.push(seal(
            if i % 2 == 0 { "t0" } else { "t2" },
            (0..=i % 3)
                .map(|k| working((i + k) as u8, i * 10 + k))
                .collect(),
        ));
    }
    out.push(seal("t2", vec![big("t2", 7)]));
    out.push(seal("t0", closing()));
    out.push(seal("t3", full_run(&[6, 5, 4, 3, 2, 1, 0])));
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn tree_roots_and_proofs_equal_the_sqlite_backend() {
    let pg = Pg::new().await;
    let log = pg.log().await;
    let dir = tempfile::tempdir().unwrap();
    // Stores every tree node, as PostgreSQL does: the stored nodes must be equal.
    let lite = SqliteLog::create_with_tree_floor(&dir.path().join("log.db"), 0).unwrap();
    for b in corpus() {
        let r1 = log.append(b.clone()).await.unwrap();
        let r2 = lite.append(b).await.unwrap();
        assert_eq!(r1, r2);
    }
    let n = log.size().await.unwrap();
    assert_eq!(n, lite.size().await.unwrap());
    assert!(n > 60, "{n}");
    assert_eq!(all_events(&log).await, all_events(&lite).await);
    assert_eq!(
        log.scan_nodes(0, n).await.unwrap(),
        lite.scan_nodes(0, n).await.unwrap()
    );
    assert_eq!(
        log.scan_nodes(17, 9).await.unwrap(),
        lite.scan_nodes(17, 9).await.unwrap()
    );
    let leaves: Vec<Vec<u8>> = all_events(&log).await.into_iter().map(|s| s.hash).collect();
    for size in 1..=n {
        let root = root_at(&log, size).await.unwrap();
        assert_eq!(root, root_at(&lite, size).await.unwrap(), "size {size}");
        for m in [0, size / 3, size / 2, size - 1] {
            let ranges = merkle::inclusion_ranges(m, size);
            let proof = range_hashes(&log, &ranges).await.unwrap();
            assert_eq!(proof, range_hashes(&lite, &ranges).await.unwrap());
            merkle::verify_inclusion(&leaves[m as usize], m, size, &root, &proof)
                .unwrap_or_else(|e| panic!("leaf {m} of {size}: {e}"));
        }
        for old in [1, size / 2, size - 1] {
            if old == 0 {
                continue;
            }
            let ranges = merkle::consistency_ranges(old, size);
            let proof = range_hashes(&log, &ranges).await.unwrap();
            assert_eq!(proof, range_hashes(&lite, &ranges).await.unwrap());
            let r1 = root_at(&log, old).await.unwrap();
            merkle::verify_consistency(old, &r1, size, &root, &proof)
                .unwrap_or_else(|e| panic!("{old} -> {size}: {e}"));
        }
    }
    let (a, b) = (assert_verifies(&log).await, assert_verifies(&lite).await);
    assert_eq!(a.root, b.root);
    assert_eq!(
        (a.events, a.runs, a.tree_nodes_checked),
        (b.events, b.runs, b.tree_nodes_checked)
    );
}

fn signer() -> NoteSigner {
    NoteSigner::from_seed("ice.test/postgres", [7u8; 32]).unwrap()
}

async fn checkpoint(log: &dyn EventLog, s: &NoteSigner) -> String {
    let size = log.size().await.unwrap();
    let root = root_at(log, size).await.unwrap();
    let note = Checkpoint {
        origin: s.name().into(),
        size,
        root,
    }
    .sign(s)
    .unwrap();
    log.add_checkpoint(StoredCheckpoint {
        size,
        note: note.clone(),
    })
    .await
    .unwrap();
    note
}

#[tokio::test(flavor = "multi_thread")]
async fn checkpoints_are_stored_once_and_prove_events_offline() {
    let pg = Pg::new().await;
    let log = Arc::new(pg.log().await);
    let l = ledger(&log);
    let s = signer();
    let v = s.verifier();
    for r in 0..3 {
        l.append(&run_id(&format!("p{r}")), full_run(&[0, 1, 2]))
            .await
            .unwrap();
    }
    let note1 = checkpoint(log.as_ref(), &s).await;
    // Storing the same checkpoint again is harmless; a different note of that size is not.
    log.add_checkpoint(StoredCheckpoint {
        size: 36,
        note: note1.clone(),
    })
    .await
    .unwrap();
    assert!(matches!(
        log.add_checkpoint(StoredCheckpoint { size: 36, note: "forged".into() }).await,
        Err(LogError::Invalid(m)) if m.contains("different checkpoint of size 36")
    ));
    assert!(matches!(
        log.add_checkpoint(StoredCheckpoint { size: 37, note: "ahead".into() }).await,
        Err(LogError::Invalid(m)) if m.contains("covers 37 events but the log has 36")
    ));
    l.append(&run_id("p3"), full_run(&[4, 5])).await.unwrap();
    let note2 = checkpoint(log.as_ref(), &s).await;
    assert_eq!(
        log.checkpoints().await.unwrap(),
        vec![
            StoredCheckpoint {
                size: 36,
                note: note1.clone()
            },
            StoredCheckpoint {
                size: 47,
                note: note2.clone()
            },
        ]
    );
    for e in all_events(log.as_ref()).await.iter().step_by(5) {
        let id = e.event().unwrap().id();
        let p = prove_inclusion(log.as_ref(), &id, &note2).await.unwrap();
        p.verify(&v)
            .unwrap_or_else(|err| panic!("inclusion of {id}: {err}"));
    }
    let p = prove_consistency(log.as_ref(), &note1, &note2)
        .await
        .unwrap();
    p.verify(&v).unwrap();
    let r = verify(log.as_ref(), Some(&v), |_| {}).await.unwrap();
    assert!(r.ok(), "{:?}", r.failure);
    assert_eq!((r.checkpoints_verified, r.latest_checkpoint), (2, Some(47)));

    // A blob row no event references, whose bytes are not what its name says, is caught.
    let raw = pg.raw().await;
    let q = pg.q();
    raw.batch_execute(&format!(
        "INSERT INTO {q}.blobs(digest, bytes) VALUES (sha256('\\x01'::bytea), '\\x02'::bytea)"
    ))
    .await
    .unwrap();
    let r = verify(log.as_ref(), Some(&v), |_| {}).await.unwrap();
    let f = r.failure.expect("an altered blob row is caught");
    assert!(
        f.problem.contains(&ice_kernel::Digest::of(&[1u8]).to_hex())
            && f.problem.contains("no event references it"),
        "{f:?}"
    );
    raw.batch_execute(&format!(
        "ALTER TABLE {q}.blobs DISABLE TRIGGER blobs_append_only; \
         DELETE FROM {q}.blobs WHERE digest = sha256('\\x01'::bytea)"
    ))
    .await
    .unwrap();
    let r = verify(log.as_ref(), Some(&v), |_| {}).await.unwrap();
    assert!(r.ok(), "{:?}", r.failure);

    // Rows outside the log, added by someone with access to the database, are caught: a tree
    // node past the last event, an event at a negative position (which readers of runs see).
    raw.batch_execute(&format!(
        "INSERT INTO {q}.tree(leaf_end, level, hash) VALUES (1023, 9, '\\x00'::bytea)"
    ))
    .await
    .unwrap();
    let r = verify(log.as_ref(), Some(&v), |_| {}).await.unwrap();
    let f = r
        .failure
        .expect("a tree node past the last event is caught");
    assert!(f.problem.contains("node ending at leaf 1023"), "{f:?}");
    raw.batch_execute(&format!(
        "ALTER TABLE {q}.events DROP CONSTRAINT events_log_seq_check; \
         INSERT INTO {q}.events SELECT -7, 'ghost', 0, type, hash, body FROM {q}.events WHERE log_seq = 0"
    ))
    .await
    .unwrap();
    let r = verify(log.as_ref(), Some(&v), |_| {}).await.unwrap();
    let f = r
        .failure
        .expect("an event row at a negative position is caught");
    assert!(
        f.problem
            .contains("negative positions (the lowest at log_seq -7)"),
        "{f:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn claims_grant_renew_refuse_take_over_and_release() {
    let pg = Pg::new().await;
    let n1 = pg.log().await;
    let n2 = pg.log().await;
    let run = run_id("claimed");
    let other = run_id("other");
    n1.claim_run(&run, "node-1", 1_000, 2_000).await.unwrap();
    // Renewing is granted, earlier or later.
    n1.claim_run(&run, "node-1", 1_500, 3_000).await.unwrap();
    match n2.claim_run(&run, "node-2", 2_999, 9_000).await {
        Err(LogError::Claimed {
            run_id,
            holder,
            until_unix_ms,
        }) => assert_eq!(
            (run_id.as_str(), holder.as_str(), until_unix_ms),
            ("claimed", "node-1", 3_000)
        ),
        other => panic!("{other:?}"),
    }
    // Another run is free.
    n2.claim_run(&other, "node-2", 2_999, 9_000).await.unwrap();
    // At the moment node-1's claim lapses, node-2 takes it over.
    n2.claim_run(&run, "node-2", 3_000, 9_000).await.unwrap();
    let err = n1
        .claim_run(&run, "node-1", 3_001, 4_000)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, LogError::Claimed { holder, until_unix_ms: 9_000, .. } if holder == "node-2"),
        "{err:?}"
    );
    assert!(err.to_string().contains("node-2"), "{err}");
    // Releasing someone else's claim does nothing; releasing one's own frees the run.
    n1.release_run(&run, "node-1").await.unwrap();
    assert!(n1.claim_run(&run, "node-1", 3_002, 4_000).await.is_err());
    n2.release_run(&run, "node-2").await.unwrap();
    n2.release_run(&run, "node-2").await.unwrap();
    n1.claim_run(&run, "node-1", 3_003, 4_000).await.unwrap();
    assert!(n2.claim_run(&other, "node-1", 3_003, 4_000).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_claims_from_many_nodes_grant_exactly_one() {
    let pg = Pg::new().await;
    let mut nodes = Vec::new();
    for _ in 0..4 {
        nodes.push(Arc::new(pg.log().await));
    }
    for round in 0..20i64 {
        let run = run_id(&format!("race-{}", round % 3));
        let now = 10_000 * (round + 1);
        let mut tasks = Vec::new();
        for (i, n) in nodes.iter().enumerate() {
            for k in 0..3 {
                let (n, run) = (n.clone(), run.clone());
                tasks.push(tokio::spawn(async move {
                    n.claim_run(&run, &format!("node-{i}-{k}-{round}"), now, now + 5_000)
                        .await
                }));
            }
        }
        let mut granted = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(()) => granted += 1,
                Err(LogError::Claimed { until_unix_ms, .. }) => {
                    assert_eq!(until_unix_ms, now + 5_000)
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(granted, 1, "round {round}");
    }
}

/// Each round, every node races for the same position of one run (exactly one wins, the
/// others get `Conflict` and leave nothing, not even a blob) and appends to its own run at the
/// same time (every one lands).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_racing_for_one_position_exactly_one_wins() {
    const NODES: usize = 4;
    const ROUNDS: u64 = 25;
    let pg = Pg::new().await;
    let mut nodes = Vec::new();
    for _ in 0..NODES {
        nodes.push(Arc::new(pg.log().await));
    }
    let shared = run_id("contested");
    let (_, opened) = ledger(&nodes[0]).append(&shared, opening()).await.unwrap();
    let mut head = head_of(&shared, &[&opened]);
    let mut own: Vec<RunHead> = (0..NODES)
        .map(|i| RunHead::new(run_id(&format!("own-{i}"))))
        .collect();
    for (i, h) in own.iter_mut().enumerate() {
        let b = h.seal_batch(opening(), at(0), &NoOtherRuns).unwrap();
        nodes[i].append(b).await.unwrap();
    }
    let mut wins = [0u32; NODES];
    for round in 0..ROUNDS {
        let size_before = nodes[0].size().await.unwrap();
        let t = at(1_000_000 + round as i64);
        let mut contest = Vec::new();
        let mut mine = Vec::new();
        for (i, own) in own.iter_mut().enumerate() {
            let mut h = head.clone();
            let drafts = if i == 0 {
                vec![big(&format!("n{i}"), round)]
            } else {
                vec![working(i as u8, round), big(&format!("n{i}"), round)]
            };
            let b = h.seal_batch(drafts, t, &NoOtherRuns).unwrap();
            contest.push((h, b));
            mine.push(
                own.seal_batch(vec![working(round as u8, round)], t, &NoOtherRuns)
                    .unwrap(),
            );
        }
        let mut tasks = Vec::new();
        for (i, ((_, b), m)) in contest.iter().zip(&mine).enumerate() {
            let (n, b, m) = (nodes[i].clone(), b.clone(), m.clone());
            tasks.push(tokio::spawn(async move {
                let (x, y) = tokio::join!(n.append(b), n.append(m));
                (x, y)
            }));
        }
        let mut winner = None;
        for (i, t) in tasks.into_iter().enumerate() {
            let (contested, mine) = t.await.unwrap();
            mine.unwrap_or_else(|e| panic!("round {round}: node {i}'s own run: {e}"));
            match contested {
                Ok(_) => {
                    assert!(winner.is_none(), "round {round}: two winners");
                    winner = Some(i);
                }
                Err(LogError::Conflict {
                    expected, actual, ..
                }) => {
                    assert_eq!(expected, head.next_seq);
                    assert!(actual > head.next_seq);
                }
                Err(e) => panic!("round {round}: node {i}: {e}"),
            }
        }
        let w = winner.unwrap_or_else(|| panic!("round {round}: nobody won"));
        wins[w] += 1;
        let won = contest[w].1.events().len() as u64;
        assert_eq!(
            nodes[1].size().await.unwrap(),
            size_before + won + NODES as u64
        );
        for (i, (_, b)) in contest.iter().enumerate() {
            let stored = nodes[2].blob(&b.blobs()[0].digest).await.unwrap();
            assert_eq!(stored.is_some(), i == w, "round {round}: blob of node {i}");
        }
        head = contest.swap_remove(w).0;
    }
    let log = nodes[3].as_ref();
    let all = all_events(log).await;
    assert_eq!(
        all.iter().map(|s| s.log_seq).collect::<Vec<_>>(),
        (0..all.len() as u64).collect::<Vec<_>>()
    );
    let r = assert_verifies(log).await;
    assert_eq!(r.runs, 1 + NODES as u64);
    assert_eq!(
        read_whole_run(log, &shared).await.unwrap().len() as u64,
        head.next_seq
    );
    eprintln!("wins per node: {wins:?}");
}

/// Many tasks on several nodes, each task with its own ledger: some on runs of their own,
/// several sharing runs (they conflict and retry). Nothing is lost or duplicated, positions are
/// 0..n without gaps, and the log verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_tasks_on_several_nodes_keep_one_order_and_every_chain_whole() {
    const NODES: usize = 3;
    const OWN_RUNS: usize = 9;
    const SHARED_RUNS: usize = 3;
    const WRITERS_PER_SHARED: usize = 3;
    const EVENTS: usize = 8;
    let pg = Pg::new().await;
    let mut nodes = Vec::new();
    for _ in 0..NODES {
        nodes.push(Arc::new(pg.log().await));
    }
    let clock = Arc::new(TestClock::new());
    for r in 0..SHARED_RUNS {
        Ledger::new(nodes[r % NODES].clone(), clock.clone())
            .append(&run_id(&format!("shared-{r}")), opening())
            .await
            .unwrap();
    }
    let mut tasks = Vec::new();
    for r in 0..OWN_RUNS {
        let l = Ledger::new(nodes[r % NODES].clone(), clock.clone());
        tasks.push(tokio::spawn(async move {
            let run = run_id(&format!("own-{r}"));
            let mut drafts = opening();
            drafts.extend((0..EVENTS).map(|i| working((i + r) as u8, i as u64)));
            drafts.extend(closing());
            let mut positions = Vec::new();
            for d in drafts {
                let (receipt, _) = l.append(&run, vec![d]).await.expect("own run");
                positions.push(receipt.first_log_seq);
            }
            (positions, 0u32)
        }));
    }
    for r in 0..SHARED_RUNS {
        for w in 0..WRITERS_PER_SHARED {
            let l = Ledger::new(nodes[(r + w) % NODES].clone(), clock.clone());
            tasks.push(tokio::spawn(async move {
                let run = run_id(&format!("shared-{r}"));
                let (mut positions, mut conflicts) = (Vec::new(), 0u32);
                for i in 0..EVENTS {
                    loop {
                        let d = Draft::new("InferenceStep", agent())
                            .intent("think")
                            .payload(json!({"writer": w, "i": i}));
                        match l.append(&run, vec![d]).await {
                            Ok((receipt, _)) => {
                                positions.push(receipt.first_log_seq);
                                break;
                            }
                            Err(AppendError::Log(LogError::Conflict { .. })) => {
                                conflicts += 1;
                                assert!(
                                    conflicts < 10_000,
                                    "writer {w} of run {r} never got through"
                                );
                            }
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
                (positions, conflicts)
            }));
        }
    }
    let mut positions = Vec::new();
    let mut conflicts = 0;
    for t in tasks {
        let (p, c) = t.await.unwrap();
        positions.extend(p);
        conflicts += c;
    }
    let log = nodes[0].as_ref();
    let total = log.size().await.unwrap();
    let opening_events = (SHARED_RUNS * 4) as u64;
    assert_eq!(
        total,
        opening_events
            + (OWN_RUNS * (4 + EVENTS + 5)) as u64
            + (SHARED_RUNS * WRITERS_PER_SHARED * EVENTS) as u64
    );
    positions.sort_unstable();
    assert_eq!(positions, (opening_events..total).collect::<Vec<_>>());
    for r in 0..SHARED_RUNS {
        let stored = read_whole_run(log, &run_id(&format!("shared-{r}")))
            .await
            .unwrap();
        assert_eq!(stored.len(), 4 + WRITERS_PER_SHARED * EVENTS);
        let mut seen = HashSet::new();
        for s in &stored[4..] {
            let e = s.event().unwrap();
            assert!(seen.insert((e.payload["writer"].clone(), e.payload["i"].clone())));
        }
    }
    let all = all_events(log).await;
    let unique: HashSet<_> = all.iter().map(|s| s.hash.clone()).collect();
    assert_eq!(unique.len() as u64, total);
    let r = assert_verifies(log).await;
    assert_eq!((r.events, r.runs), (total, (OWN_RUNS + SHARED_RUNS) as u64));
    eprintln!("{conflicts} conflicts were retried");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_session_ended_by_the_server_is_replaced_on_the_next_call() {
    let pg = Pg::new().await;
    let raw = pg.raw().await;
    let log = Arc::new(pg.log().await);
    let l = ledger(&log);
    let run = run_id("r");
    l.append(&run, opening()).await.unwrap();
    assert!(pg.kill_nodes(&raw).await >= 2, "the reader and the writer");
    // Reads first: the reader reconnects.
    assert_eq!(log.size().await.unwrap(), 4);
    assert_eq!(all_events(log.as_ref()).await.len(), 4);
    // Then an append: the writer reconnects.
    let (r, _) = l.append(&run, vec![working(0, 1)]).await.unwrap();
    assert_eq!(r.first_log_seq, 4);
    // Append first this time, and a claim and a checkpoint.
    pg.kill_nodes(&raw).await;
    let (r, _) = l.append(&run, vec![working(1, 2)]).await.unwrap();
    assert_eq!(r.first_log_seq, 5);
    pg.kill_nodes(&raw).await;
    log.claim_run(&run, "n", 0, 10).await.unwrap();
    pg.kill_nodes(&raw).await;
    checkpoint(log.as_ref(), &signer()).await;
    assert_eq!(log.checkpoints().await.unwrap().len(), 1);
    assert_verifies(log.as_ref()).await;
}

/// The session dies while the append's write is executing (a trigger the test adds holds it
/// there): the append fails with a storage error that says nothing was written, nothing was,
/// and the next append lands where it should.
#[tokio::test(flavor = "multi_thread")]
async fn an_append_whose_session_dies_mid_write_fails_and_leaves_nothing() {
    let pg = Pg::new().await;
    let raw = pg.raw().await;
    let log = Arc::new(pg.log().await);
    let l = Arc::new(ledger(&log));
    let run = run_id("mid");
    l.append(&run, opening()).await.unwrap();
    let key: i64 = 0x1ce_0000_0000 + NEXT.fetch_add(1, Ordering::SeqCst) as i64;
    let s = pg.q();
    raw.batch_execute(&format!(
        "CREATE FUNCTION {s}.hold() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM pg_advisory_xact_lock_shared({key}); RETURN NULL; END $$; \
         CREATE TRIGGER hold AFTER INSERT ON {s}.events FOR EACH STATEMENT EXECUTE FUNCTION {s}.hold();"
    ))
    .await
    .unwrap();
    raw.execute("SELECT pg_advisory_lock($1)", &[&key])
        .await
        .unwrap();
    // The first time in the writer's locked transaction (the write statement of the careful
    // path); the second in the one-statement path (the writer saw no other writer since).
    for path in ["WITH b AS", "WITH ok AS"] {
        let task = {
            let (l, run) = (l.clone(), run.clone());
            tokio::spawn(async move { l.append(&run, vec![working(0, 1), big("mid", 1)]).await })
        };
        let (pid, query) = pg.waiting(&raw, Some("advisory"), &[]).await;
        assert!(query.trim_start().starts_with(path), "{path}: {query}");
        pg.terminate(&raw, pid).await;
        let err = task.await.unwrap().unwrap_err();
        match &err {
            AppendError::Log(LogError::Storage { context, message }) => {
                assert!(
                    context.contains("appending 2 event(s) to run mid"),
                    "{context}"
                );
                assert!(
                    context.contains("connection was lost while committing"),
                    "{context}"
                );
                assert!(context.contains("nothing was written"), "{context}");
                assert!(!message.is_empty());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(log.size().await.unwrap(), 4);
    }
    raw.execute("SELECT pg_advisory_unlock($1)", &[&key])
        .await
        .unwrap();
    raw.batch_execute(&format!("DROP TRIGGER hold ON {s}.events"))
        .await
        .unwrap();
    assert_eq!(log.size().await.unwrap(), 4);
    assert_eq!(read_whole_run(log.as_ref(), &run).await.unwrap().len(), 4);
    let n: i64 = raw
        .query_one(&format!("SELECT (SELECT count(*) FROM {s}.blobs) + (SELECT count(*) FROM {s}.tree WHERE leaf_end >= 4)"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "a blob or tree node of the failed append was stored");
    let (r, _) = l
        .append(&run, vec![working(0, 1), big("mid", 1)])
        .await
        .unwrap();
    assert_eq!((r.first_log_seq, r.tree_size), (4, 6));
    assert_verifies(log.as_ref()).await;
}

/// The session dies while the append waits for the log's write lock (the test holds it): no
/// COMMIT was sent, so the append is tried once more on a new session; if that one dies too,
/// it fails, saying nothing was written.
#[tokio::test(flavor = "multi_thread")]
async fn an_append_waiting_for_the_lock_is_retried_once_then_fails_cleanly() {
    let pg = Pg::new().await;
    let raw = pg.raw().await;
    let log = Arc::new(pg.log().await);
    let l = Arc::new(ledger(&log));
    let run = run_id("wait");
    l.append(&run, opening()).await.unwrap();
    let s = pg.q();
    let mut holder = pg.raw().await;
    let tx = holder.transaction().await.unwrap();
    tx.query_one(
        &format!("SELECT size FROM {s}.head WHERE id = 0 FOR UPDATE"),
        &[],
    )
    .await
    .unwrap();

    let append = |n: u64| {
        let (l, run) = (l.clone(), run.clone());
        tokio::spawn(async move { l.append(&run, vec![working(0, n)]).await })
    };
    let lock_query = "FOR UPDATE";
    // Killed once: retried on a new session. Killed twice: it fails.
    let task = append(1);
    let (first, q) = pg.waiting(&raw, None, &[]).await;
    assert!(q.contains(lock_query), "{q}");
    pg.terminate(&raw, first).await;
    let (second, q) = pg.waiting(&raw, None, &[first]).await;
    assert!(q.contains(lock_query), "{q}");
    pg.terminate(&raw, second).await;
    match task.await.unwrap() {
        Err(AppendError::Log(LogError::Storage { context, .. })) => {
            assert!(
                context.contains("waiting for the log's write lock"),
                "{context}"
            );
            assert!(context.contains("nothing was written"), "{context}");
        }
        other => panic!("{other:?}"),
    }
    // Killed once, then the lock is released: the retry lands.
    let task = append(2);
    let (third, _) = pg.waiting(&raw, None, &[first, second]).await;
    pg.terminate(&raw, third).await;
    pg.waiting(&raw, None, &[first, second, third]).await;
    tx.rollback().await.unwrap();
    let (r, _) = task.await.unwrap().unwrap();
    assert_eq!(r.first_log_seq, 4);
    assert_eq!(log.size().await.unwrap(), 5);

    // The writer saw no other writer since: its next append is one statement, sent whole, so
    // a session lost while it waits has an unknown outcome. The writer finds out from the log
    // (not stored) and says so; it does not try again by itself.
    let tx = holder.transaction().await.unwrap();
    tx.query_one(
        &format!("SELECT size FROM {s}.head WHERE id = 0 FOR UPDATE"),
        &[],
    )
    .await
    .unwrap();
    let task = append(3);
    let (fourth, q) = pg.waiting(&raw, None, &[first, second, third]).await;
    assert!(q.trim_start().starts_with("WITH ok AS"), "{q}");
    pg.terminate(&raw, fourth).await;
    match task.await.unwrap() {
        Err(AppendError::Log(LogError::Storage { context, .. })) => {
            assert!(
                context.contains("connection was lost while committing"),
                "{context}"
            );
            assert!(context.contains("the batch is not stored"), "{context}");
        }
        other => panic!("{other:?}"),
    }
    tx.rollback().await.unwrap();
    let (r, _) = append(4).await.unwrap().unwrap();
    assert_eq!(r.first_log_seq, 5);
    assert_verifies(log.as_ref()).await;
}

/// A caller that gives up on an append (drops it: a timeout) while it waits for the log's
/// write lock: its session is dropped with it. Whether the batch then lands is decided by the
/// server alone, whole or not at all, and the writer's next append continues from the log as
/// it finds it.
#[tokio::test(flavor = "multi_thread")]
async fn an_append_dropped_by_its_caller_leaves_the_log_whole() {
    let pg = Pg::new().await;
    let raw = pg.raw().await;
    let log = Arc::new(pg.log().await);
    let run = run_id("dropped");
    let (_, opened) = ledger(&log).append(&run, opening()).await.unwrap();
    let s = pg.q();
    let mut holder = pg.raw().await;
    // Twice: the first time the writer takes the careful path, the second time the short one.
    let mut head = head_of(&run, &[&opened]);
    for round in 0..2i64 {
        let size = log.size().await.unwrap();
        let tx = holder.transaction().await.unwrap();
        tx.query_one(
            &format!("SELECT size FROM {s}.head WHERE id = 0 FOR UPDATE"),
            &[],
        )
        .await
        .unwrap();
        let t = at(1_000_000 * (round + 1));
        let dropped = head
            .clone()
            .seal_batch(vec![working(0, 1), big("x", round as u64)], t, &NoOtherRuns)
            .unwrap();
        let gave_up =
            tokio::time::timeout(Duration::from_millis(300), log.append(dropped.clone())).await;
        assert!(gave_up.is_err(), "the append should still be waiting");
        tx.rollback().await.unwrap();
        // The dropped session's server process finishes on its own; wait for it.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let n: i64 = raw
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND state <> 'idle'",
                    &[&pg.app],
                )
                .await
                .unwrap()
                .get(0);
            if n == 0 {
                break;
            }
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut next = head.clone();
        let other = next
            .seal_batch(vec![working(1, 2)], t, &NoOtherRuns)
            .unwrap();
        match log.append(other).await {
            Ok(r) => {
                eprintln!("round {round}: the dropped batch did not land");
                assert_eq!(r.first_log_seq, size);
                head = next;
            }
            Err(LogError::Conflict { .. }) => {
                eprintln!("round {round}: the dropped batch landed");
                let stored = read_whole_run(log.as_ref(), &run).await.unwrap();
                let n = stored.len();
                assert_eq!(
                    stored[n - 2..]
                        .iter()
                        .map(|e| e.hash.clone())
                        .collect::<Vec<_>>(),
                    dropped
                        .events()
                        .iter()
                        .map(|e| e.event().hash.0.to_vec())
                        .collect::<Vec<_>>()
                );
                assert_eq!(
                    log.blob(&dropped.blobs()[0].digest)
                        .await
                        .unwrap()
                        .map(|b| b.len()),
                    Some(dropped.blobs()[0].bytes.len())
                );
                head = head_of(&run, &[&opened]);
                for e in &stored[4..] {
                    head.admit(e.event().unwrap(), &NoOtherRuns).unwrap();
                }
            }
            Err(e) => panic!("{e}"),
        }
        assert_verifies(log.as_ref()).await;
    }
}

/// The commit's reply is lost (injected): the writer re-reads the log, finds the batch there
/// and returns its receipt, rather than an error or a second copy.
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_commit_reply_is_answered_from_the_log() {
    let pg = Pg::new().await;
    let log = Arc::new(pg.log().await);
    let l = ledger(&log);
    let run = run_id("lost");
    l.append(&run, opening()).await.unwrap();
    // Once in the writer's locked transaction, once in its one-statement path.
    log.lose_next_commit_reply();
    let (r, _) = l
        .append(&run, vec![working(0, 1), working(1, 2)])
        .await
        .unwrap();
    assert_eq!((r.first_log_seq, r.count, r.tree_size), (4, 2, 6));
    log.lose_next_commit_reply();
    let (r, _) = l.append(&run, vec![big("lost", 0)]).await.unwrap();
    assert_eq!((r.first_log_seq, r.count, r.tree_size), (6, 1, 7));
    let (r, _) = l.append(&run, vec![working(2, 3)]).await.unwrap();
    assert_eq!(r.first_log_seq, 7);
    assert_eq!(log.size().await.unwrap(), 8);
    assert_verifies(log.as_ref()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_that_restarts_finds_everything_and_continues() {
    let pg = Pg::new().await;
    let s = signer();
    let (events, cps, root) = {
        let log = Arc::new(pg.log().await);
        let l = ledger(&log);
        for r in 0..4 {
            l.append(&run_id(&format!("r{r}")), full_run(&[0, 1, 2, 4]))
                .await
                .unwrap();
        }
        l.append(&run_id("live"), opening()).await.unwrap();
        l.append(&run_id("live"), vec![big("live", 0)])
            .await
            .unwrap();
        checkpoint(log.as_ref(), &s).await;
        let n = log.size().await.unwrap();
        (
            all_events(log.as_ref()).await,
            log.checkpoints().await.unwrap(),
            root_at(log.as_ref(), n).await.unwrap(),
        )
    };
    let log = Arc::new(pg.log().await);
    assert_eq!(all_events(log.as_ref()).await, events);
    assert_eq!(log.checkpoints().await.unwrap(), cps);
    let n = events.len() as u64;
    assert_eq!(root_at(log.as_ref(), n).await.unwrap(), root);
    // A new ledger folds the live run from the log and continues it.
    let l = ledger(&log);
    let (r, _) = l.append(&run_id("live"), closing()).await.unwrap();
    assert_eq!(r.first_log_seq, n);
    l.append(&run_id("after"), opening()).await.unwrap();
    checkpoint(log.as_ref(), &s).await;
    let r = verify(log.as_ref(), Some(&s.verifier()), |_| {})
        .await
        .unwrap();
    assert!(r.ok(), "{:?}", r.failure);
    assert_eq!((r.runs, r.checkpoints_verified), (6, 2));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_schema_that_is_not_an_ice_log_is_refused_and_left_alone() {
    async fn refused(pg: &Pg, setup: &str) -> String {
        let raw = pg.raw().await;
        let s = pg.q();
        raw.batch_execute(&format!("CREATE SCHEMA {s}; {}", setup.replace("{s}", &s)))
            .await
            .unwrap();
        let before: Vec<String> = tables(&raw, &pg.schema).await;
        // Refused alike whether the log may be created or must exist.
        let existing = PgLog::connect_existing(&pg.node_url(), Some(&pg.schema))
            .await
            .err()
            .unwrap_or_else(|| panic!("{setup}: accepted by connect_existing"));
        assert_eq!(tables(&raw, &pg.schema).await, before, "{setup}: changed");
        let err = PgLog::connect(&pg.node_url(), Some(&pg.schema))
            .await
            .err()
            .unwrap_or_else(|| panic!("{setup}: accepted"));
        assert_eq!(tables(&raw, &pg.schema).await, before, "{setup}: changed");
        assert_eq!(existing, err, "{setup}");
        match err {
            LogError::NotALog { path, reason } => {
                assert!(path.contains(&pg.schema), "{path}");
                reason
            }
            other => panic!("{setup}: {other:?}"),
        }
    }
    async fn tables(raw: &Client, schema: &str) -> Vec<String> {
        raw.query(
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1 ORDER BY 1",
            &[&schema],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    }
    let reason = refused(
        &Pg::new().await,
        "CREATE TABLE {s}.meta(key TEXT PRIMARY KEY, value TEXT); INSERT INTO {s}.meta VALUES ('format', 'ice-log/9');",
    )
    .await;
    assert!(
        reason.contains("\"ice-log/9\"") && reason.contains("ice-log/1"),
        "{reason}"
    );
    let reason = refused(
        &Pg::new().await,
        "CREATE TABLE {s}.meta(key TEXT PRIMARY KEY, value TEXT);",
    )
    .await;
    assert!(reason.contains("no format record"), "{reason}");
    let reason = refused(&Pg::new().await, "CREATE TABLE {s}.meta(x INT);").await;
    assert!(
        reason.contains("meta table is not an ICE log's"),
        "{reason}"
    );
    let reason = refused(
        &Pg::new().await,
        "CREATE TABLE {s}.events(id INT); CREATE TABLE {s}.unrelated(id INT);",
    )
    .await;
    assert!(
        reason.contains("events") && reason.contains("no meta table"),
        "{reason}"
    );
    // A schema with only other tables in it is fine: ICE's tables go beside them.
    let pg = Pg::new().await;
    pg.raw()
        .await
        .batch_execute(&format!(
            "CREATE SCHEMA {0}; CREATE TABLE {0}.unrelated(id INT);",
            pg.q()
        ))
        .await
        .unwrap();
    let log = pg.log().await;
    assert_eq!(log.size().await.unwrap(), 0);
    assert_eq!(log.schema(), pg.schema);
    assert!(log.location().contains(&pg.schema));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_starting_together_create_the_log_once() {
    let pg = Pg::new().await;
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let (url, schema) = (pg.node_url(), pg.schema.clone());
            tokio::spawn(async move { PgLog::connect(&url, Some(&schema)).await })
        })
        .collect();
    let mut nodes = Vec::new();
    for t in tasks {
        nodes.push(Arc::new(t.await.unwrap().expect("connect")));
    }
    for (i, n) in nodes.iter().enumerate() {
        ledger(n)
            .append(&run_id(&format!("n{i}")), opening())
            .await
            .unwrap();
    }
    let raw = pg.raw().await;
    let rows = raw
        .query(
            &format!("SELECT key, value FROM {}.meta ORDER BY key", pg.q()),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].get::<_, String>(1), "ice-log/1");
    let r = assert_verifies(nodes[0].as_ref()).await;
    assert_eq!(r.events, 24);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_record_tables_refuse_update_delete_and_truncate() {
    let pg = Pg::new().await;
    let log = Arc::new(pg.log().await);
    ledger(&log)
        .append(
            &run_id("r"),
            opening().into_iter().chain([big("r", 0)]).collect(),
        )
        .await
        .unwrap();
    checkpoint(log.as_ref(), &signer()).await;
    let raw = pg.raw().await;
    let s = pg.q();
    for sql in [
        format!("UPDATE {s}.events SET type = 'X'"),
        format!("DELETE FROM {s}.events"),
        format!("TRUNCATE {s}.events"),
        format!("UPDATE {s}.tree SET hash = ''"),
        format!("DELETE FROM {s}.tree"),
        format!("UPDATE {s}.blobs SET bytes = ''"),
        format!("TRUNCATE {s}.blobs"),
        format!("DELETE FROM {s}.checkpoints"),
    ] {
        let err = raw.batch_execute(&sql).await.unwrap_err();
        let db = err.as_db_error().unwrap_or_else(|| panic!("{sql}: {err}"));
        assert!(
            db.message().contains("append-only"),
            "{sql}: {}",
            db.message()
        );
    }
    assert_verifies(log.as_ref()).await;
}

/// Durable appends per second: this backend against raw tokio-postgres INSERTs of the same
/// rows (same columns and bytes, one row per transaction), measured in the same run, with 1
/// appender (one connection) and 16 concurrent appenders (16 tasks on one node, which share
/// group commits; 16 tasks on 16 nodes, whose commits the log's write lock serializes; raw: 16
/// connections). The disk's sync time drifts, so the two alternate in short blocks and each
/// side's rate is its appends over its own time. Appenders append single-event batches sealed
/// beforehand, so the kernel is not what is measured.
/// `cargo test -p ice-log --test postgres --release -- --ignored --nocapture bench`
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a benchmark: run explicitly"]
async fn bench_durable_appends_against_raw_inserts() {
    const ROUNDS: usize = 20;
    let per_run: usize = std::env::var("ICE_BENCH_PER_RUN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let pg = Pg::new().await;
    let sealed = |name: String| -> Arc<Vec<SealedBatch>> {
        let mut h = RunHead::new(run_id(&name));
        let mut drafts = opening();
        drafts.extend((0..per_run).map(|i| working(i as u8, i as u64)));
        Arc::new(
            drafts
                .into_iter()
                .enumerate()
                .map(|(i, d)| h.seal_batch(vec![d], at(i as i64), &NoOtherRuns).unwrap())
                .collect(),
        )
    };
    let raw = pg.raw().await;
    let s = pg.q();
    let one = Arc::new(pg.log().await);
    let mut sixteen = Vec::new();
    for _ in 0..16 {
        sixteen.push(Arc::new(pg.log().await));
    }
    raw.batch_execute(&format!(
        "CREATE TABLE {s}.raw(log_seq BIGINT PRIMARY KEY, run_id TEXT NOT NULL, run_seq BIGINT NOT NULL, \
         type TEXT NOT NULL, hash BYTEA NOT NULL, body BYTEA NOT NULL, UNIQUE (run_id, run_seq))"
    ))
    .await
    .unwrap();
    let insert = format!("INSERT INTO {s}.raw VALUES ($1, $2, $3, $4, $5, $6)");
    let seq = Arc::new(AtomicU64::new(0));
    let mut raws = Vec::new();
    for _ in 0..16 {
        let c = Arc::new(raw_connect(&pg.url).await);
        let st = c.prepare(&insert).await.unwrap();
        raws.push((c, st));
    }
    // One block: each run's batches lo..hi, a task per run, through ICE or raw INSERTs.
    let block =
        |ice: Option<Vec<Arc<PgLog>>>, runs: Vec<Arc<Vec<SealedBatch>>>, lo: usize, hi: usize| {
            let (raws, seq) = (raws.clone(), seq.clone());
            async move {
                let t0 = Instant::now();
                let mut tasks = Vec::new();
                for (i, run) in runs.into_iter().enumerate() {
                    let node = ice.as_ref().map(|n| n[i % n.len()].clone());
                    let (c, st) = raws[i % raws.len()].clone();
                    let seq = seq.clone();
                    tasks.push(tokio::spawn(async move {
                        for b in &run[lo..hi] {
                            match &node {
                                Some(n) => {
                                    n.append(b.clone()).await.unwrap();
                                }
                                None => {
                                    let (e, body) = (b.events()[0].event(), b.events()[0].body());
                                    let ls = seq.fetch_add(1, Ordering::SeqCst) as i64;
                                    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] = [
                                        &ls,
                                        &e.run_id.as_str(),
                                        &(e.run_seq as i64),
                                        &e.event_type,
                                        &&e.hash.0[..],
                                        &body,
                                    ];
                                    c.execute(&st, &params).await.unwrap();
                                }
                            }
                        }
                    }));
                }
                for t in tasks {
                    t.await.unwrap();
                }
                t0.elapsed()
            }
        };
    // Alternate ICE and raw blocks; returns ICE's and raw's appends per second (each side's
    // appends over its own time) and the median of the rounds' ratios (robust to the drift).
    let compare = |nodes: Vec<Arc<PgLog>>, runs: Vec<Arc<Vec<SealedBatch>>>| {
        let block = &block;
        async move {
            let n = runs[0].len();
            let (mut ice_t, mut raw_t) = (Duration::ZERO, Duration::ZERO);
            let mut ratios = Vec::new();
            for r in 0..ROUNDS {
                let (lo, hi) = (r * n / ROUNDS, (r + 1) * n / ROUNDS);
                let (i, w) = if r % 2 == 0 {
                    let w = block(None, runs.clone(), lo, hi).await;
                    (block(Some(nodes.clone()), runs.clone(), lo, hi).await, w)
                } else {
                    let i = block(Some(nodes.clone()), runs.clone(), lo, hi).await;
                    (i, block(None, runs.clone(), lo, hi).await)
                };
                ice_t += i;
                raw_t += w;
                ratios.push(w.as_secs_f64() / i.as_secs_f64());
            }
            ratios.sort_by(f64::total_cmp);
            let total = (n * runs.len()) as f64;
            (
                total / ice_t.as_secs_f64(),
                total / raw_t.as_secs_f64(),
                ratios[ROUNDS / 2],
            )
        }
    };
    // Warm up both paths.
    compare(vec![one.clone()], vec![sealed("w".into())]).await;
    let (ice1, raw1, m1) = compare(vec![one.clone()], vec![sealed("a".into())]).await;
    let runs16 = |tag: &str| {
        (0..16)
            .map(|r| sealed(format!("{tag}-{r}")))
            .collect::<Vec<_>>()
    };
    let (ice16, raw16, m16) = compare(vec![one.clone()], runs16("b")).await;
    let (ice16n, raw16n, m16n) = compare(sixteen.clone(), runs16("c")).await;
    eprintln!(
        "durable appends/s on PostgreSQL, single-event batches, {} per appender, {ROUNDS} alternating blocks:",
        per_run + 4
    );
    eprintln!(
        "  1 appender:              ice {ice1:7.0}/s   raw INSERT, 1 connection    {raw1:7.0}/s   ice/raw {:.2} (median of rounds {m1:.2})",
        ice1 / raw1
    );
    eprintln!(
        "  16 appenders, one node:  ice {ice16:7.0}/s   raw INSERT, 16 connections  {raw16:7.0}/s   ice/raw {:.2} (median of rounds {m16:.2})",
        ice16 / raw16
    );
    eprintln!(
        "  16 appenders, 16 nodes:  ice {ice16n:7.0}/s   raw INSERT, 16 connections  {raw16n:7.0}/s   ice/raw {:.2} (median of rounds {m16n:.2})",
        ice16n / raw16n
    );
    assert_verifies(one.as_ref()).await;
}

/// A TCP forwarder in front of the server, to play a server or network that stops answering.
/// `stall` holds every connection, open or new: nothing is forwarded either way and nothing is
/// closed (a frozen server, a partition). `stall_replies` holds only the server's replies on
/// the connections open now (new ones are forwarded): the replies to what those sent are lost.
/// `resume` cuts the held connections, dropping what they held (the partition heals after the
/// sessions died), and forwards new ones again.
struct Proxy {
    port: u16,
    state: Arc<ProxyState>,
}

#[derive(Default)]
struct ProxyState {
    /// The generation of connections accepted from now on.
    generation: AtomicU64,
    stall_all: AtomicBool,
    /// Connections of earlier generations have their replies held.
    stall_replies_below: AtomicU64,
    /// Connections of earlier generations are closed.
    cut_below: AtomicU64,
}

impl Proxy {
    fn start() -> Proxy {
        let upstream: tokio_postgres::Config = server_url().parse().unwrap();
        let host = match upstream.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            other => panic!("the proxy needs a TCP server address, not {other:?}"),
        };
        let upstream = (host, upstream.get_ports().first().copied().unwrap_or(5432));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(ProxyState::default());
        let st = state.clone();
        // Lives as long as the test process (a test's proxy is cut when it is dropped).
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let generation = st.generation.load(Ordering::SeqCst);
                let Ok(server) = std::net::TcpStream::connect((upstream.0.as_str(), upstream.1))
                else {
                    continue;
                };
                for (from, to, reply) in [
                    (
                        client.try_clone().unwrap(),
                        server.try_clone().unwrap(),
                        false,
                    ),
                    (server, client, true),
                ] {
                    let st = st.clone();
                    std::thread::spawn(move || pump(from, to, reply, generation, &st));
                }
            }
        });
        Proxy { port, state }
    }

    /// The URL a node of `pg` connects with through this proxy.
    fn url(&self, pg: &Pg) -> String {
        let c: tokio_postgres::Config = pg.url.parse().unwrap();
        let password = c
            .get_password()
            .map(|p| format!(":{}", String::from_utf8_lossy(p)))
            .unwrap_or_default();
        format!(
            "postgres://{}{password}@127.0.0.1:{}/{}?application_name={}",
            c.get_user().unwrap_or("postgres"),
            self.port,
            c.get_dbname().unwrap_or("postgres"),
            pg.app
        )
    }

    fn stall(&self) {
        self.state.stall_all.store(true, Ordering::SeqCst);
    }

    fn stall_replies(&self) {
        let g = self.state.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.state.stall_replies_below.store(g, Ordering::SeqCst);
    }

    fn resume(&self) {
        let g = self.state.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.state.cut_below.store(g, Ordering::SeqCst);
        self.state.stall_all.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.resume();
    }
}

/// Forward one direction of one connection until either side closes or the proxy cuts it.
fn pump(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    reply: bool,
    generation: u64,
    st: &ProxyState,
) {
    use std::io::{Read, Write};
    let cut = || st.cut_below.load(Ordering::SeqCst) > generation;
    let held = || {
        st.stall_all.load(Ordering::SeqCst)
            || (reply && st.stall_replies_below.load(Ordering::SeqCst) > generation)
    };
    from.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    'forward: while !cut() {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(_) => break,
        };
        while held() {
            if cut() {
                break 'forward;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if cut() || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// Room for a loaded machine on top of a time bound (a call that hangs takes forever, not this).
const SLACK: Duration = Duration::from_secs(5);

/// Await `f`, which must be done within `bound` (plus [`SLACK`]); fails, not hangs, if not.
async fn within<T>(bound: Duration, f: impl std::future::Future<Output = T>) -> T {
    let t = Instant::now();
    let out = tokio::time::timeout(bound + SLACK + Duration::from_secs(30), f)
        .await
        .unwrap_or_else(|_| panic!("still waiting after {:?}", t.elapsed()));
    assert!(
        t.elapsed() <= bound + SLACK,
        "took {:?}, bound {bound:?}",
        t.elapsed()
    );
    out
}

fn timeouts(bound: Duration) -> Options {
    Options {
        connect_timeout: bound,
        request_timeout: bound,
    }
}

/// `url` with a password in it (the test server trusts, so any will do), and that password.
fn with_password(url: &str) -> (String, String) {
    let c: tokio_postgres::Config = url.parse().unwrap();
    if let Some(p) = c.get_password() {
        return (url.to_string(), String::from_utf8_lossy(p).into_owned());
    }
    let (scheme, rest) = url.split_once("://").unwrap();
    let (user, host) = rest.split_once('@').unwrap();
    (
        format!("{scheme}://{user}:s3cret-pw@{host}"),
        "s3cret-pw".into(),
    )
}

/// A listener that never accepts: the kernel completes the TCP handshake, the server never
/// says a word. Connecting fails within the connect timeout (the default one, a shorter one
/// from Options, or the URL's `connect_timeout`), naming where and what, never the password.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_never_answers_fails_the_connect_within_its_bound() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let url = format!("postgres://postgres:s3cret-pw@127.0.0.1:{port}/test");
    let check = |err: LogError| match &err {
        LogError::Storage { context, message } => {
            assert!(
                context.contains(&format!(
                    "connecting to postgres://postgres@127.0.0.1:{port}/test (schema"
                )),
                "{err}"
            );
            assert!(message.contains("timed out after"), "{err}");
            assert!(message.contains("did not complete the connection"), "{err}");
            assert!(!err.to_string().contains("s3cret"), "{err}");
        }
        other => panic!("{other:?}"),
    };
    let t = Instant::now();
    check(
        within(CONNECT_TIMEOUT, PgLog::connect(&url, None))
            .await
            .err()
            .unwrap(),
    );
    assert!(t.elapsed() >= CONNECT_TIMEOUT - Duration::from_millis(100));
    let short = Duration::from_secs(1);
    check(
        within(
            short,
            PgLog::connect_existing_with(&url, Some("x"), timeouts(short)),
        )
        .await
        .err()
        .unwrap(),
    );
    check(
        within(
            short,
            PgLog::connect(&format!("{url}?connect_timeout=1"), None),
        )
        .await
        .err()
        .unwrap(),
    );
    drop(listener);
}

/// A node connects through a proxy and appends; then the proxy stops forwarding, closing
/// nothing (a frozen server, a partition). Every call fails within its bound with an error
/// that says what timed out; an append whose write got no answer says it does not know
/// whether it landed, never that nothing was written. Once the network is back, the log holds
/// exactly what was acknowledged, verifies, and the node carries on.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_stops_answering_fails_each_call_within_its_bound() {
    const BOUND: Duration = Duration::from_secs(2);
    let pg = Pg::new().await;
    let proxy = Proxy::start();
    let log = PgLog::connect_with(&proxy.url(&pg), Some(&pg.schema), timeouts(BOUND))
        .await
        .unwrap();
    let run = run_id("stalled");
    let mut head = RunHead::new(run.clone());
    // Twice: the second commit found the log as the first left it, so the writer's next
    // append is one statement, sent whole (a commit).
    log.append(head.seal_batch(opening(), at(0), &NoOtherRuns).unwrap())
        .await
        .unwrap();
    log.append(
        head.seal_batch(vec![working(0, 1)], at(1), &NoOtherRuns)
            .unwrap(),
    )
    .await
    .unwrap();
    let acknowledged = all_events(&log).await;
    assert_eq!(acknowledged.len(), 5);
    let next = head
        .seal_batch(vec![working(1, 2)], at(2), &NoOtherRuns)
        .unwrap();

    proxy.stall();
    let timed_out = |err: &LogError, what: &str| match err {
        LogError::Storage { context, message } => {
            assert!(context.contains(what), "{err}");
            assert!(message.contains("timed out"), "{err}");
        }
        other => panic!("{what}: {other:?}"),
    };
    // A read on the open session: cut after the bound.
    let err = within(BOUND, log.size()).await.unwrap_err();
    timed_out(&err, "reading the log size in postgres://");
    assert!(
        err.to_string().contains("did not answer within 2 s"),
        "{err}"
    );
    // An append on the writer's open session: its write got no answer, and finding out
    // whether it landed needs the server too.
    let err = within(2 * BOUND, log.append(next.clone()))
        .await
        .unwrap_err();
    timed_out(&err, "appending 1 event(s) to run stalled");
    let text = err.to_string();
    assert!(
        text.contains("did not answer the commit within 2 s")
            && text.contains("could not find out whether the batch is stored")
            && !text.contains("nothing was written"),
        "{text}"
    );
    // Calls that need a new session: connecting times out.
    let err = within(BOUND, log.claim_run(&run, "node-a", 0, 10))
        .await
        .unwrap_err();
    timed_out(&err, "claiming a run: connecting to");
    let err = within(BOUND, log.read_run(&run, 0, 100)).await.unwrap_err();
    timed_out(&err, "reading a run: connecting to");
    let err = within(BOUND, log.append(next.clone())).await.unwrap_err();
    timed_out(&err, "connecting; nothing was written");

    proxy.resume();
    assert_eq!(log.size().await.unwrap(), 5);
    assert_eq!(all_events(&log).await, acknowledged);
    let r = log.append(next).await.unwrap();
    assert_eq!((r.first_log_seq, r.tree_size), (5, 6));
    log.claim_run(&run, "node-a", 0, 10).await.unwrap();
    assert_verifies(&log).await;
    let direct = pg.log().await;
    let stored = all_events(&direct).await;
    assert_eq!(stored.len(), 6);
    assert_eq!(stored[..5], acknowledged[..]);
    assert_eq!(all_events(&log).await, stored);
}

/// The server commits an append but its answer never comes (the open sessions' replies are
/// held; new sessions work): after the bound the writer cuts the session, ends its server
/// process, re-reads the run, finds the batch and returns its receipt. A read on a session
/// whose replies are held fails within the bound; the next one reconnects.
#[tokio::test(flavor = "multi_thread")]
async fn a_commit_whose_answer_never_comes_is_answered_from_the_log() {
    const BOUND: Duration = Duration::from_secs(2);
    let pg = Pg::new().await;
    let proxy = Proxy::start();
    let log = PgLog::connect_with(&proxy.url(&pg), Some(&pg.schema), timeouts(BOUND))
        .await
        .unwrap();
    let run = run_id("unanswered");
    let mut head = RunHead::new(run.clone());
    // Three events, then one: the writer saw no other, so its next append is one statement.
    let mut drafts = opening();
    let last = drafts.pop().unwrap();
    log.append(head.seal_batch(drafts, at(0), &NoOtherRuns).unwrap())
        .await
        .unwrap();
    log.append(head.seal_batch(vec![last], at(0), &NoOtherRuns).unwrap())
        .await
        .unwrap();
    proxy.stall_replies();
    // (A batch without blobs: one carrying or naming blobs first looks them up, and that
    // request's answer would be held, before anything is written.)
    let next = head
        .seal_batch(vec![working(0, 1), working(1, 2)], at(1), &NoOtherRuns)
        .unwrap();
    let t = Instant::now();
    let r = within(2 * BOUND, log.append(next.clone())).await.unwrap();
    assert!(t.elapsed() >= BOUND, "the answer came after all");
    assert_eq!((r.first_log_seq, r.count, r.tree_size), (4, 2, 6));
    let err = within(BOUND, log.size()).await.unwrap_err();
    assert!(err.to_string().contains("timed out"), "{err}");
    assert_eq!(log.size().await.unwrap(), 6);
    let stored = read_whole_run(&log, &run).await.unwrap();
    assert_eq!(stored[4].hash, next.events()[0].event().hash.0.to_vec());
    let r = log
        .append(
            head.seal_batch(vec![working(2, 3)], at(2), &NoOtherRuns)
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.first_log_seq, 6);
    assert_verifies(&log).await;
}

/// The server takes longer than the bound over an append's write (a trigger the test adds
/// holds it), on the careful path and then the one-statement path: each time the writer cuts
/// the session, ends its server process, re-reads the run and says the batch is not stored;
/// it is not, and the next append lands where it should.
#[tokio::test(flavor = "multi_thread")]
async fn a_write_held_past_its_bound_is_settled_from_the_log() {
    const BOUND: Duration = Duration::from_secs(2);
    let pg = Pg::new().await;
    let raw = pg.raw().await;
    let log = PgLog::connect_with(&pg.node_url(), Some(&pg.schema), timeouts(BOUND))
        .await
        .unwrap();
    let key: i64 = 0x1ce_0000_0000 + NEXT.fetch_add(1, Ordering::SeqCst) as i64;
    let s = pg.q();
    raw.batch_execute(&format!(
        "CREATE FUNCTION {s}.hold() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM pg_advisory_xact_lock_shared({key}); RETURN NULL; END $$; \
         CREATE TRIGGER hold AFTER INSERT ON {s}.events FOR EACH STATEMENT EXECUTE FUNCTION {s}.hold();"
    ))
    .await
    .unwrap();
    let run = run_id("held");
    let mut head = RunHead::new(run.clone());
    let batches = [
        head.seal_batch(opening(), at(0), &NoOtherRuns).unwrap(),
        head.seal_batch(vec![working(0, 1)], at(1), &NoOtherRuns)
            .unwrap(),
    ];
    // A fresh writer takes the careful path; after its first commit, the one-statement path.
    for (i, batch) in batches.iter().enumerate() {
        raw.execute("SELECT pg_advisory_lock($1)", &[&key])
            .await
            .unwrap();
        let err = within(2 * BOUND, log.append(batch.clone()))
            .await
            .unwrap_err();
        match &err {
            LogError::Storage { context, message } => {
                assert!(
                    context.contains("did not answer the commit within 2 s"),
                    "{context}"
                );
                assert!(context.contains("the batch is not stored"), "{context}");
                assert!(context.contains("nothing was written"), "{context}");
                assert!(message.contains("timed out"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        let before = if i == 0 { 0 } else { 4 };
        assert_eq!(log.size().await.unwrap(), before);
        raw.execute("SELECT pg_advisory_unlock($1)", &[&key])
            .await
            .unwrap();
        let r = log.append(batch.clone()).await.unwrap();
        assert_eq!(r.first_log_seq, before);
    }
    raw.batch_execute(&format!("DROP TRIGGER hold ON {s}.events"))
        .await
        .unwrap();
    assert_eq!(log.size().await.unwrap(), 5);
    assert_verifies(&log).await;
}

/// A read that waits past its bound (a lock another session holds) fails here, and its server
/// process stops too (the read session's `statement_timeout`): no statement ICE gave up on
/// goes on waiting on the server while the lock is held.
#[tokio::test(flavor = "multi_thread")]
async fn a_read_past_its_bound_does_not_go_on_waiting_on_the_server() {
    const BOUND: Duration = Duration::from_secs(2);
    let pg = Pg::new().await;
    let raw = pg.raw().await;
    let log = Arc::new(
        PgLog::connect_with(&pg.node_url(), Some(&pg.schema), timeouts(BOUND))
            .await
            .unwrap(),
    );
    let run = run_id("locked");
    ledger(&log).append(&run, opening()).await.unwrap();
    let mut holder = pg.raw().await;
    let tx = holder.transaction().await.unwrap();
    tx.batch_execute(&format!(
        "LOCK TABLE {}.events IN ACCESS EXCLUSIVE MODE",
        pg.q()
    ))
    .await
    .unwrap();
    let err = within(BOUND, log.read_run(&run, 0, 10)).await.unwrap_err();
    assert!(
        matches!(&err, LogError::Storage { context, .. } if context.contains("reading a run")),
        "{err}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n: i64 = raw
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'",
                &[&pg.app],
            )
            .await
            .unwrap()
            .get(0);
        if n == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the read ICE gave up on still waits on the server"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tx.rollback().await.unwrap();
    assert_eq!(log.read_run(&run, 0, 10).await.unwrap().len(), 4);
}

/// `connect_existing` opens a log that is there and nothing else: a schema that does not
/// exist, or holds none of the log's tables, is refused as not a log (naming where, never the
/// password) and left as it was; an existing log reads the same through it, unchanged.
#[tokio::test(flavor = "multi_thread")]
async fn connect_existing_opens_only_a_log_that_is_there_and_creates_nothing() {
    let pg = Pg::new().await;
    let raw = pg.raw().await;
    let (url, password) = with_password(&pg.node_url());
    let schemas = || async {
        raw.query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname = $1",
            &[&pg.schema],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
    };
    let relations = || async {
        raw.query(
            "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 ORDER BY 1",
            &[&pg.schema],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
    };
    let refused = |err: Option<LogError>, why: &str| match err {
        Some(LogError::NotALog { path, reason }) => {
            assert!(
                path.contains(&format!("(schema {})", pg.schema)) && path.contains("/test"),
                "{path}"
            );
            assert!(!path.contains(&password) && !reason.contains(&password));
            assert!(
                reason.contains(&format!("no ICE log in schema {}", pg.schema)),
                "{reason}"
            );
            assert!(reason.contains(why), "{reason}");
        }
        other => panic!("{other:?}"),
    };
    // No such schema: refused, and still none.
    refused(
        PgLog::connect_existing(&url, Some(&pg.schema)).await.err(),
        "no such schema",
    );
    assert_eq!(schemas().await, 0);
    // An empty schema: refused, and still empty.
    raw.batch_execute(&format!("CREATE SCHEMA {}", pg.q()))
        .await
        .unwrap();
    refused(
        PgLog::connect_existing(&url, Some(&pg.schema)).await.err(),
        "none of the log's tables",
    );
    assert_eq!(relations().await, Vec::<String>::new());

    // A log with events, blobs and a checkpoint.
    let log = Arc::new(pg.log().await);
    let l = ledger(&log);
    l.append(&run_id("a"), opening()).await.unwrap();
    l.append(&run_id("a"), vec![big("a", 0)]).await.unwrap();
    checkpoint(log.as_ref(), &signer()).await;
    let state = || async {
        let q = pg.q();
        let row = raw
            .query_one(
                &format!(
                    "SELECT (SELECT string_agg(key || '=' || value, ',' ORDER BY key) FROM {q}.meta), \
                     (SELECT size FROM {q}.head), (SELECT count(*) FROM {q}.events), \
                     (SELECT count(*) FROM {q}.tree), (SELECT count(*) FROM {q}.blobs), \
                     (SELECT count(*) FROM {q}.checkpoints), (SELECT count(*) FROM {q}.claims)"
                ),
                &[],
            )
            .await
            .unwrap();
        (
            relations().await,
            row.get::<_, String>(0),
            (1..7).map(|i| row.get::<_, i64>(i)).collect::<Vec<_>>(),
        )
    };
    let before = state().await;
    let existing = PgLog::connect_existing(&url, Some(&pg.schema))
        .await
        .unwrap();
    assert_eq!(all_events(&existing).await, all_events(log.as_ref()).await);
    assert_eq!(
        existing.checkpoints().await.unwrap(),
        log.checkpoints().await.unwrap()
    );
    let r = verify(&existing, Some(&signer().verifier()), |_| {})
        .await
        .unwrap();
    assert!(r.ok(), "{:?}", r.failure);
    assert_eq!(state().await, before);
}

/// The check for altered blob rows goes through the store a bounded page at a time (so no one
/// request outlasts its bound on a large store): intact pages pass, and an altered row past
/// the first page is found.
#[tokio::test(flavor = "multi_thread")]
async fn altered_blob_rows_are_found_past_the_first_page() {
    let pg = Pg::new().await;
    let log = pg.log().await;
    let raw = pg.raw().await;
    let q = pg.q();
    raw.batch_execute(&format!(
        "INSERT INTO {q}.blobs(digest, bytes) SELECT sha256(b), b \
         FROM (SELECT int4send(g) AS b FROM generate_series(1, 10000) g) s"
    ))
    .await
    .unwrap();
    assert_eq!(log.altered_blob().await.unwrap(), None);
    let last = "ff".repeat(32);
    raw.batch_execute(&format!(
        "INSERT INTO {q}.blobs(digest, bytes) VALUES ('\\x{last}'::bytea, '\\x00'::bytea)"
    ))
    .await
    .unwrap();
    assert_eq!(log.altered_blob().await.unwrap(), Some(last));
}
