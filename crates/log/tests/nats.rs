//! The NATS JetStream backend (`ice_log::nats::NatsLog`) against a real server: it must behave
//! exactly as the embedded SQLite backend does (same events, same positions, same tree, same
//! errors), and hold up with several nodes ("connections") appending at once, across a
//! reconnect and a server restart.
//!
//! The server is `nats://127.0.0.1:4222` or `$ICE_TEST_NATS_URL`; if it cannot be reached the
//! tests fail (they never skip). Each test uses its own random prefix and deletes its streams and
//! buckets at the end, even when it fails. The restart test runs its own `nats-server`
//! (`$ICE_TEST_NATS_SERVER`, or `nats-server` on the PATH) on a free port.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use ice_kernel::blob::blob_refs;
use ice_kernel::limits::BLOB_FIELD_THRESHOLD_BYTES;
use ice_kernel::{Digest, Draft, EventId, NoOtherRuns, Origin, RunHead, SealedBatch, Timestamp};
use ice_log::checkpoint::{Checkpoint, NoteSigner};
use ice_log::ledger::{AppendError, Ledger, read_whole_run};
use ice_log::merkle::{self, Frontier, NodeId};
use ice_log::nats::{self, NatsLog, Options};
use ice_log::verify::verify;
use ice_log::{EventLog, LogError, StoredCheckpoint, range_hashes, root_at};
use serde_json::json;

fn url() -> String {
    std::env::var("ICE_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

fn fresh_prefix() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "icetest_{}_{nanos:x}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

async fn connect_at(url: &str, prefix: &str) -> NatsLog {
    NatsLog::connect(url, prefix).await.unwrap_or_else(|e| {
        panic!(
            "cannot open a NATS log at {url}: {e}\n\
             These tests need a nats-server with JetStream (nats-server -js); \
             set ICE_TEST_NATS_URL to use another server."
        )
    })
}

/// One log under a fresh prefix; deletes it when dropped (also when a test panics).
struct Shared {
    url: String,
    prefix: String,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            url: url(),
            prefix: fresh_prefix(),
        }
    }

    /// Another node: a separate connection to the same log.
    async fn node(&self) -> Arc<NatsLog> {
        Arc::new(connect_at(&self.url, &self.prefix).await)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let (url, prefix) = (self.url.clone(), self.prefix.clone());
        // Drop cannot await, and may run inside a runtime: clean up from a thread of its own.
        let done = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime")
                .block_on(async {
                    // The rate test's baseline stream, if it got that far.
                    if let Ok(c) = async_nats::connect(url.as_str()).await {
                        let _ = async_nats::jetstream::new(c)
                            .delete_stream(format!("{prefix}_RAW"))
                            .await;
                    }
                    nats::destroy(&url, &prefix).await
                })
        })
        .join();
        if let Ok(Err(e)) = done
            && !std::thread::panicking()
        {
            panic!("could not delete the test log {}: {e}", self.prefix);
        }
    }
}

fn at(ms: i64) -> Timestamp {
    Timestamp::from_unix_us(T0_US + ms * 1_000).unwrap()
}

fn big_output(tag: &str, bytes: usize) -> Draft {
    Draft::new("ToolInvoked", Origin::Runtime)
        .intent("run a tool")
        .authority("grant:g1")
        .payload(
            json!({"tool": "cat", "tag": tag, "output": format!("{tag}{}", "o".repeat(bytes))}),
        )
}

/// Batches of several runs and sizes (some with blobs), sealed in a fixed interleaving.
fn workload() -> Vec<SealedBatch> {
    let mut heads: Vec<RunHead> = ["w.a", "w_b", "w-c", "w.d_e"]
        .iter()
        .map(|r| RunHead::new(run_id(r)))
        .collect();
    let mut out = Vec::new();
    let mut t = 0;
    let mut seal = |h: &mut RunHead, drafts: Vec<Draft>| {
        t += 1;
        h.seal_batch(drafts, at(t), &NoOtherRuns).unwrap()
    };
    for h in heads.iter_mut() {
        out.push(seal(h, opening()));
    }
    for round in 0..6u64 {
        for (k, h) in heads.iter_mut().enumerate() {
            let n = (round as usize + k) % 4 + 1;
            let mut drafts: Vec<Draft> = (0..n)
                .map(|i| working((round as u8) + i as u8, round * 10 + i as u64))
                .collect();
            if (round + k as u64).is_multiple_of(5) {
                drafts.push(big_output(
                    &format!("{k}-{round}"),
                    BLOB_FIELD_THRESHOLD_BYTES + 100,
                ));
            }
            out.push(seal(h, drafts));
        }
    }
    out
}

/// Every stored event of a run, read in small pages.
async fn run_in_pages(log: &dyn EventLog, run: &ice_kernel::RunId) -> Vec<ice_log::StoredEvent> {
    let mut out = Vec::new();
    loop {
        let page = log.read_run(run, out.len() as u64, 3).await.unwrap();
        if page.is_empty() {
            return out;
        }
        out.extend(page);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_read_matches_the_embedded_backend() {
    let shared = Shared::new();
    let nats = shared.node().await;
    let fx = Fixture::new();
    let batches = workload();
    for b in &batches {
        let want = fx.log.append(b.clone()).await.unwrap();
        let got = nats.append(b.clone()).await.unwrap();
        assert_eq!(got, want, "receipts differ");
    }
    let (sq, nt): (&dyn EventLog, &dyn EventLog) = (fx.log(), nats.as_ref());
    let total = sq.size().await.unwrap();
    assert_eq!(nt.size().await.unwrap(), total);
    assert_eq!(all_events(nt).await, all_events(sq).await);
    for (from, limit) in [
        (0, 1),
        (0, 7),
        (3, 5),
        (total - 1, 10),
        (total, 5),
        (total + 9, 5),
        (5, 0),
    ] {
        assert_eq!(
            nt.scan(from, limit).await.unwrap(),
            sq.scan(from, limit).await.unwrap(),
            "scan({from}, {limit})"
        );
    }
    let runs = sq.runs(0, 100).await.unwrap();
    assert_eq!(nt.runs(0, 100).await.unwrap(), runs);
    assert_eq!(nt.runs(2, 1).await.unwrap(), sq.runs(2, 1).await.unwrap());
    assert_eq!(nt.runs(9, 1).await.unwrap(), Vec::new());
    for r in &runs {
        assert_eq!(
            run_in_pages(nt, r).await,
            run_in_pages(sq, r).await,
            "run {r}"
        );
        for (from, limit) in [(0, 1000), (2, 4), (40, 4), (3, 0)] {
            assert_eq!(
                nt.read_run(r, from, limit).await.unwrap(),
                sq.read_run(r, from, limit).await.unwrap(),
                "read_run({r}, {from}, {limit})"
            );
        }
    }
    let absent_run = run_id("never");
    assert!(nt.read_run(&absent_run, 0, 10).await.unwrap().is_empty());
    let mut ids = Vec::new();
    for r in &runs {
        for s in [0, 3, 9, 30] {
            ids.push(EventId::new(r.clone(), s));
        }
    }
    ids.push(EventId::new(absent_run, 0));
    for id in &ids {
        assert_eq!(
            nt.get(id).await.unwrap(),
            sq.get(id).await.unwrap(),
            "get {id}"
        );
    }
    assert_eq!(
        nt.existing(&ids).await.unwrap(),
        sq.existing(&ids).await.unwrap()
    );
    // Blobs: every referenced one, and one never stored.
    let mut blobs = 0;
    for e in all_events(sq).await {
        for r in blob_refs(&e.event().unwrap().payload).unwrap() {
            assert_eq!(
                nt.blob(&r.digest).await.unwrap(),
                sq.blob(&r.digest).await.unwrap()
            );
            blobs += 1;
        }
    }
    assert!(blobs >= 4, "the workload stores blobs");
    assert_eq!(nt.blob(&Digest::of(b"never stored")).await.unwrap(), None);
    // Another node sees the same.
    let other = shared.node().await;
    assert_eq!(all_events(other.as_ref()).await, all_events(sq).await);
    let r = assert_verifies(nt).await;
    assert_eq!(r.root, assert_verifies(sq).await.root);
}

#[tokio::test(flavor = "multi_thread")]
async fn tree_nodes_roots_and_proofs_equal_the_embedded_backend_at_every_size() {
    let shared = Shared::new();
    let nats = shared.node().await;
    // An embedded log that stores every node, as NATS does: their stored nodes must be equal.
    let fx = Fixture::with_tree_floor(0);
    let (sq, nt): (&dyn EventLog, &dyn EventLog) = (fx.log(), nats.as_ref());
    let mut head = RunHead::new(run_id("tree"));
    let mut t = 0;
    let mut sizes = Vec::new();
    // Batch sizes chosen so the tree passes through many shapes (and several powers of two).
    for (i, n) in [4usize, 1, 3, 8, 1, 1, 16, 5, 2, 31, 1, 7]
        .into_iter()
        .enumerate()
    {
        t += 1;
        let drafts = if i == 0 {
            opening()
        } else {
            (0..n)
                .map(|k| working(k as u8, (i * 100 + k) as u64))
                .collect()
        };
        let b = head.seal_batch(drafts, at(t), &NoOtherRuns).unwrap();
        sq.append(b.clone()).await.unwrap();
        nt.append(b).await.unwrap();
        let size = sq.size().await.unwrap();
        sizes.push(size);
        for s in 1..=size {
            assert_eq!(
                root_at(nt, s).await.unwrap(),
                root_at(sq, s).await.unwrap(),
                "root at {s} (log of {size})"
            );
        }
        for m in [0, size / 2, size - 1] {
            let ranges = merkle::inclusion_ranges(m, size);
            assert_eq!(
                range_hashes(nt, &ranges).await.unwrap(),
                range_hashes(sq, &ranges).await.unwrap()
            );
        }
        for m in [1, size / 3, size - 1].into_iter().filter(|m| *m >= 1) {
            let ranges = merkle::consistency_ranges(m, size);
            assert_eq!(
                range_hashes(nt, &ranges).await.unwrap(),
                range_hashes(sq, &ranges).await.unwrap()
            );
        }
    }
    let n = *sizes.last().unwrap();
    for page in [1u64, 5, 7, 1000] {
        let mut from = 0;
        while from <= n {
            assert_eq!(
                nt.scan_nodes(from, page).await.unwrap(),
                sq.scan_nodes(from, page).await.unwrap(),
                "scan_nodes({from}, {page})"
            );
            from += page;
        }
    }
    // Proofs from the NATS log verify against roots computed from the events alone.
    let all = all_events(nt).await;
    let mut frontier = Frontier::new();
    let mut roots = vec![merkle::empty_root()];
    for e in &all {
        frontier.push(merkle::leaf_hash(&e.hash));
        roots.push(frontier.root());
    }
    let root = roots[n as usize];
    for i in 0..n {
        let proof = range_hashes(nt, &merkle::inclusion_ranges(i, n))
            .await
            .unwrap();
        merkle::verify_inclusion(&all[i as usize].hash, i, n, &root, &proof).unwrap();
    }
    for m in 1..n {
        let proof = range_hashes(nt, &merkle::consistency_ranges(m, n))
            .await
            .unwrap();
        merkle::verify_consistency(m, &roots[m as usize], n, &root, &proof).unwrap();
    }
    // A node beyond the log is missing, as in the embedded log.
    let beyond = [NodeId { level: 0, index: n }];
    assert!(matches!(
        nt.nodes(&beyond).await,
        Err(LogError::Corrupt { .. })
    ));
    assert!(matches!(
        sq.nodes(&beyond).await,
        Err(LogError::Corrupt { .. })
    ));
    assert_verifies(nt).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_conflicting_append_fails_whole_and_writes_nothing() {
    let shared = Shared::new();
    let a = shared.node().await;
    let b = shared.node().await;
    let run = run_id("contested");
    let mut head = RunHead::new(run.clone());
    a.append(head.seal_batch(opening(), at(1), &NoOtherRuns).unwrap())
        .await
        .unwrap();
    // Two batches sealed from the same head; both carry a blob.
    let mut ha = head.clone();
    let mut hb = head.clone();
    let ba = ha
        .seal_batch(
            vec![big_output("a", BLOB_FIELD_THRESHOLD_BYTES * 2)],
            at(2),
            &NoOtherRuns,
        )
        .unwrap();
    let bb = hb
        .seal_batch(
            vec![
                working(0, 1),
                big_output("b", BLOB_FIELD_THRESHOLD_BYTES * 2),
            ],
            at(2),
            &NoOtherRuns,
        )
        .unwrap();
    a.append(ba.clone()).await.unwrap();
    // `b` has not read the run since `a` appended: it still learns of the conflict.
    match b.append(bb.clone()).await {
        Err(LogError::Conflict {
            run_id,
            expected,
            expected_prev,
            actual,
        }) => {
            assert_eq!(run_id, "contested");
            assert_eq!((expected, actual), (4, 5));
            assert_eq!(expected_prev, head.last_hash);
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(b.size().await.unwrap(), 5);
    assert_eq!(a.blob(&bb.blobs()[0].digest).await.unwrap(), None);
    assert_eq!(b.blob(&bb.blobs()[0].digest).await.unwrap(), None);
    assert!(b.blob(&ba.blobs()[0].digest).await.unwrap().is_some());
    // The same batch again (its place is taken by itself): a conflict, as in the embedded log.
    for node in [&a, &b] {
        assert!(
            matches!(
                node.append(ba.clone()).await,
                Err(LogError::Conflict {
                    expected: 4,
                    actual: 5,
                    ..
                })
            ),
            "re-appending a stored batch"
        );
    }
    // A batch that starts beyond the run's end conflicts too.
    let mut ahead = ha.clone();
    ahead
        .seal_batch(vec![working(1, 2)], at(3), &NoOtherRuns)
        .unwrap();
    let gap = ahead
        .seal_batch(vec![working(1, 3)], at(4), &NoOtherRuns)
        .unwrap();
    assert!(matches!(
        b.append(gap).await,
        Err(LogError::Conflict {
            expected: 6,
            actual: 5,
            ..
        })
    ));
    assert_eq!(a.size().await.unwrap(), 5);
    // A node that has not read the latest batch offers that very batch: the server knows the
    // message (same id) and stores nothing; the node answers a conflict, as the embedded log.
    let c = shared.node().await;
    let mut hx = ha.clone();
    let bx = hx
        .seal_batch(vec![working(2, 9)], at(5), &NoOtherRuns)
        .unwrap();
    a.append(bx.clone()).await.unwrap();
    assert!(matches!(
        c.append(bx).await,
        Err(LogError::Conflict {
            expected: 5,
            actual: 6,
            ..
        })
    ));
    assert_eq!(c.read_run(&run, 0, 100).await.unwrap().len(), 6);
    assert_verifies(a.as_ref()).await;
    assert_verifies(b.as_ref()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn blobs_and_batches_over_the_message_limit_are_stored_and_read_back() {
    let shared = Shared::new();
    let log = shared.node().await;
    let ledger = Ledger::new(log.clone(), Arc::new(TestClock::new()));
    let run = run_id("large");
    ledger.append(&run, opening()).await.unwrap();
    // One field of 3 MiB (over the default 1 MiB max_payload): the record goes to the object
    // store; two fields of 20 KiB share one blob.
    let huge = "h".repeat(3 * 1024 * 1024);
    let (_, b1) = ledger
        .append(
            &run,
            vec![
                Draft::new("InferenceStep", agent())
                    .intent("a long answer")
                    .payload(json!({"output": huge})),
            ],
        )
        .await
        .unwrap();
    let twenty = "t".repeat(20 * 1024);
    let (_, b2) = ledger
        .append(
            &run,
            vec![
                big_output(&twenty, 0),
                Draft::new("ToolInvoked", Origin::Runtime)
                    .intent("run a tool")
                    .authority("grant:g1")
                    .payload(json!({"tool": "cat", "tag": twenty})),
            ],
        )
        .await
        .unwrap();
    assert_eq!(b1.blobs().len(), 1);
    // Many events in one batch, over the limit without any blob.
    let many: Vec<Draft> = (0..600)
        .map(|i| {
            Draft::new("InferenceStep", agent())
                .intent("think")
                .payload(json!({"i": i, "text": "w".repeat(2000)}))
        })
        .collect();
    let (r3, b3) = ledger.append(&run, many).await.unwrap();
    assert_eq!(r3.count, 600);
    for node in [log.clone(), shared.node().await] {
        let got = node.blob(&b1.blobs()[0].digest).await.unwrap().unwrap();
        assert_eq!(got, b1.blobs()[0].bytes);
        for b in b2.blobs() {
            assert_eq!(node.blob(&b.digest).await.unwrap().unwrap(), b.bytes);
        }
        let stored = read_whole_run(node.as_ref(), &run).await.unwrap();
        assert_eq!(stored.len(), 4 + 1 + 2 + 600);
        assert_eq!(stored[7].body, b3.events()[0].body());
        let report = assert_verifies(node.as_ref()).await;
        assert!(report.blobs_checked >= 2);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn checkpoints_are_shared_write_once_and_never_beyond_the_log() {
    let shared = Shared::new();
    let a = shared.node().await;
    let b = shared.node().await;
    let ledger = Ledger::new(a.clone(), Arc::new(TestClock::new()));
    let signer = NoteSigner::from_seed("ice.test/nats", [7u8; 32]).unwrap();
    let mut notes = Vec::new();
    for k in 0..3 {
        ledger
            .append(&run_id(&format!("cp-{k}")), opening())
            .await
            .unwrap();
        let size = a.size().await.unwrap();
        let root = root_at(a.as_ref(), size).await.unwrap();
        let note = Checkpoint {
            origin: signer.name().into(),
            size,
            root,
        }
        .sign(&signer)
        .unwrap();
        // The other node stores it: it has not read the latest append yet.
        b.add_checkpoint(StoredCheckpoint {
            size,
            note: note.clone(),
        })
        .await
        .unwrap();
        notes.push(StoredCheckpoint { size, note });
    }
    assert_eq!(a.checkpoints().await.unwrap(), notes);
    assert_eq!(b.checkpoints().await.unwrap(), notes);
    // Storing the same note again is fine; a different note for the same size is not.
    a.add_checkpoint(notes[1].clone()).await.unwrap();
    let other = StoredCheckpoint {
        size: notes[1].size,
        note: notes[2].note.clone(),
    };
    assert!(matches!(
        a.add_checkpoint(other).await,
        Err(LogError::Invalid(_))
    ));
    let beyond = StoredCheckpoint {
        size: 13,
        note: notes[2].note.clone(),
    };
    assert!(matches!(
        b.add_checkpoint(beyond).await,
        Err(LogError::Invalid(_))
    ));
    assert_eq!(b.checkpoints().await.unwrap(), notes);
    let r = verify(b.as_ref(), Some(&signer.verifier()), |_| {})
        .await
        .unwrap();
    assert!(r.ok(), "{:?}", r.failure);
    assert_eq!(r.checkpoints_verified, 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn claims_grant_renew_refuse_take_over_lapsed_and_release() {
    let shared = Shared::new();
    let a = shared.node().await;
    let b = shared.node().await;
    let t0 = 1_700_000_000_000i64;
    for name in ["claimed", "claimed.x_y", "claimed_dx_uy"] {
        let r = run_id(name);
        a.claim_run(&r, "node-a", t0, t0 + 10_000).await.unwrap();
        a.claim_run(&r, "node-a", t0 + 5_000, t0 + 15_000)
            .await
            .unwrap();
        match b.claim_run(&r, "node-b", t0 + 6_000, t0 + 16_000).await {
            Err(LogError::Claimed {
                run_id,
                holder,
                until_unix_ms,
            }) => {
                assert_eq!(run_id, name);
                assert_eq!(holder, "node-a");
                assert_eq!(until_unix_ms, t0 + 15_000);
            }
            other => panic!("{name}: a live claim was taken over: {other:?}"),
        }
        // Exactly at its expiry a claim has lapsed.
        b.claim_run(&r, "node-b", t0 + 15_000, t0 + 25_000)
            .await
            .unwrap();
        assert!(matches!(
            a.claim_run(&r, "node-a", t0 + 16_000, t0 + 26_000).await,
            Err(LogError::Claimed { .. })
        ));
        // Releasing what one does not hold changes nothing.
        a.release_run(&r, "node-a").await.unwrap();
        assert!(
            a.claim_run(&r, "node-a", t0 + 16_500, t0 + 26_000)
                .await
                .is_err()
        );
        b.release_run(&r, "node-b").await.unwrap();
        b.release_run(&r, "node-b").await.unwrap();
        a.claim_run(&r, "node-a", t0 + 17_000, t0 + 27_000)
            .await
            .unwrap();
    }
    // Many nodes race for one free claim: exactly one gets it.
    let r = run_id("raced-claim");
    let mut tasks = Vec::new();
    for i in 0..6 {
        let node = shared.node().await;
        let r = r.clone();
        tasks.push(tokio::spawn(async move {
            node.claim_run(&r, &format!("node-{i}"), t0, t0 + 60_000)
                .await
        }));
    }
    let mut granted = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => granted += 1,
            Err(LogError::Claimed { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(granted, 1);
}

/// Several nodes seal a batch from the same head and append at once, many rounds over:
/// exactly one wins each round, the others get `Conflict` and leave nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racers_on_one_run_from_separate_nodes_exactly_one_wins() {
    let shared = Shared::new();
    let mut nodes = Vec::new();
    for _ in 0..4 {
        nodes.push(shared.node().await);
    }
    let run = run_id("race");
    let mut head = RunHead::new(run.clone());
    nodes[0]
        .append(head.seal_batch(opening(), at(0), &NoOtherRuns).unwrap())
        .await
        .unwrap();
    let mut wins = vec![0u32; nodes.len()];
    for round in 0..25u64 {
        let size_before = nodes[0].size().await.unwrap();
        let mut heads = Vec::new();
        let mut tasks = Vec::new();
        for (i, node) in nodes.iter().enumerate() {
            let mut h = head.clone();
            let mut drafts = vec![
                Draft::new("InferenceStep", agent())
                    .intent("think")
                    .payload(json!({"node": i, "round": round})),
            ];
            if round.is_multiple_of(5) {
                drafts.push(big_output(
                    &format!("{i}-{round}"),
                    BLOB_FIELD_THRESHOLD_BYTES + 1,
                ));
            }
            let b = h
                .seal_batch(drafts, at(1 + round as i64), &NoOtherRuns)
                .unwrap();
            heads.push((h, b.clone()));
            let node = node.clone();
            tasks.push(tokio::spawn(async move { node.append(b).await }));
        }
        let mut winner = None;
        for (i, t) in tasks.into_iter().enumerate() {
            match t.await.unwrap() {
                Ok(_) => {
                    assert!(winner.is_none(), "round {round}: two winners");
                    winner = Some(i);
                }
                Err(LogError::Conflict {
                    expected, actual, ..
                }) => {
                    assert_eq!(expected, head.next_seq);
                    assert!(actual > head.next_seq, "round {round}");
                }
                Err(e) => panic!("round {round}: {e}"),
            }
        }
        let w = winner.unwrap_or_else(|| panic!("round {round}: nobody won"));
        wins[w] += 1;
        let grew = nodes[w].size().await.unwrap() - size_before;
        assert_eq!(grew, heads[w].1.events().len() as u64, "round {round}");
        for (i, (_, b)) in heads.iter().enumerate() {
            for blob in b.blobs() {
                let stored = nodes[(i + 1) % nodes.len()]
                    .blob(&blob.digest)
                    .await
                    .unwrap();
                assert_eq!(stored.is_some(), i == w, "round {round}: blob of node {i}");
            }
        }
        head = heads.swap_remove(w).0;
    }
    for node in &nodes {
        let r = assert_verifies(node.as_ref()).await;
        assert_eq!(r.events, 4 + 25 + 5);
    }
    eprintln!("wins per node: {wins:?}");
}

/// Nodes appending to their own runs at once never conflict; every acknowledged event is in
/// the log exactly once, at the position its receipt named.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_nodes_on_many_runs_lose_and_duplicate_nothing() {
    const NODES: usize = 4;
    const RUNS_PER_NODE: usize = 5;
    const EVENTS: usize = 12;
    let shared = Shared::new();
    let mut tasks = Vec::new();
    for n in 0..NODES {
        let ledger = Arc::new(Ledger::new(shared.node().await, Arc::new(TestClock::new())));
        for k in 0..RUNS_PER_NODE {
            let ledger = ledger.clone();
            tasks.push(tokio::spawn(async move {
                let run = run_id(&format!("n{n}.r{k}"));
                let mut drafts = opening();
                drafts.extend((0..EVENTS).map(|i| working((i + k) as u8, i as u64)));
                drafts.extend(closing());
                let mut acked = Vec::new();
                for d in drafts {
                    let (receipt, batch) = ledger.append(&run, vec![d]).await.expect("append");
                    acked.push((receipt.first_log_seq, batch.events()[0].event().hash));
                }
                (run, acked)
            }));
        }
    }
    let mut acked = BTreeMap::new();
    let mut positions = Vec::new();
    for t in tasks {
        let (run, a) = t.await.unwrap();
        positions.extend(a.iter().map(|(p, _)| *p));
        acked.insert(run, a);
    }
    let total = (NODES * RUNS_PER_NODE * (4 + EVENTS + 5)) as u64;
    positions.sort_unstable();
    assert_eq!(positions, (0..total).collect::<Vec<_>>());
    let reader = shared.node().await;
    let all = all_events(reader.as_ref()).await;
    assert_eq!(all.len() as u64, total);
    for (run, a) in &acked {
        let stored = read_whole_run(reader.as_ref(), run).await.unwrap();
        let got: Vec<(u64, Digest)> = stored
            .iter()
            .map(|s| (s.log_seq, Digest(s.hash.as_slice().try_into().unwrap())))
            .collect();
        assert_eq!(&got, a, "run {run}");
    }
    let r = assert_verifies(reader.as_ref()).await;
    assert_eq!(r.runs, (NODES * RUNS_PER_NODE) as u64);
    assert_eq!(replay(reader.as_ref()).await.len(), NODES * RUNS_PER_NODE);
}

/// Ledgers on different nodes share runs: they conflict, reload, retry, and every event ends
/// up in its run exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writers_on_separate_nodes_sharing_runs_retry_and_keep_every_chain_whole() {
    const RUNS: usize = 3;
    const WRITERS: usize = 3;
    const EACH: usize = 8;
    let shared = Shared::new();
    let first = Ledger::new(shared.node().await, Arc::new(TestClock::new()));
    for r in 0..RUNS {
        first
            .append(&run_id(&format!("shared-{r}")), opening())
            .await
            .unwrap();
    }
    let clock = Arc::new(TestClock::new());
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let ledger = Arc::new(Ledger::new(shared.node().await, clock.clone()));
        for r in 0..RUNS {
            let ledger = ledger.clone();
            tasks.push(tokio::spawn(async move {
                let run = run_id(&format!("shared-{r}"));
                let mut conflicts = 0u32;
                for i in 0..EACH {
                    loop {
                        let d = Draft::new("InferenceStep", agent())
                            .intent("think")
                            .payload(json!({"writer": w, "i": i}));
                        match ledger.append(&run, vec![d]).await {
                            Ok(_) => break,
                            Err(AppendError::Log(LogError::Conflict { .. })) => {
                                conflicts += 1;
                                assert!(conflicts < 10_000, "writer {w} never got through");
                            }
                            Err(e) => panic!("unexpected error: {e}"),
                        }
                    }
                }
                conflicts
            }));
        }
    }
    let mut conflicts = 0;
    for t in tasks {
        conflicts += t.await.unwrap();
    }
    let reader = shared.node().await;
    for r in 0..RUNS {
        let stored = read_whole_run(reader.as_ref(), &run_id(&format!("shared-{r}")))
            .await
            .unwrap();
        assert_eq!(stored.len(), 4 + WRITERS * EACH);
        let mut seen = HashSet::new();
        for s in &stored[4..] {
            let e = s.event().unwrap();
            let key = (e.payload["writer"].to_string(), e.payload["i"].to_string());
            assert!(seen.insert(key.clone()), "duplicate {key:?} in run {r}");
        }
    }
    assert_verifies(reader.as_ref()).await;
    eprintln!("{conflicts} conflicts were retried");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reconnected_node_finds_everything_and_appends_continue() {
    let shared = Shared::new();
    let log = shared.node().await;
    let ledger = Ledger::new(log.clone(), Arc::new(TestClock::new()));
    for k in 0..3 {
        ledger
            .append(
                &run_id(&format!("keep-{k}")),
                full_run(&[0, 1, 2, 3, 4, 5, 6]),
            )
            .await
            .unwrap();
    }
    let before = all_events(log.as_ref()).await;
    let root = root_at(log.as_ref(), before.len() as u64).await.unwrap();
    drop(ledger);
    drop(log);
    let again = shared.node().await;
    assert_eq!(all_events(again.as_ref()).await, before);
    assert_eq!(
        root_at(again.as_ref(), before.len() as u64).await.unwrap(),
        root
    );
    let ledger = Ledger::new(again.clone(), Arc::new(TestClock::new()));
    let live = run_id("keep-live");
    ledger.append(&live, opening()).await.unwrap();
    let (r, _) = ledger.append(&live, vec![working(0, 1)]).await.unwrap();
    assert_eq!(r.first_log_seq, before.len() as u64 + 4);
    assert_verifies(again.as_ref()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn names_stay_under_the_prefix_and_destroy_leaves_nothing() {
    let shared = Shared::new();
    let log = shared.node().await;
    Ledger::new(log.clone(), Arc::new(TestClock::new()))
        .append(&run_id("x"), opening())
        .await
        .unwrap();
    let client = async_nats::connect(url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let ours = || async {
        use futures_util::StreamExt;
        let names: Vec<String> = js
            .stream_names()
            .filter_map(|n| async move { n.ok() })
            .collect()
            .await;
        let mut v: Vec<String> = names
            .into_iter()
            .filter(|n| n.contains(&shared.prefix))
            .collect();
        v.sort();
        v
    };
    let p = &shared.prefix;
    assert_eq!(
        ours().await,
        vec![
            format!("KV_{p}_CHECKPOINTS"),
            format!("KV_{p}_CLAIMS"),
            format!("OBJ_{p}_RECORDS"),
            format!("{p}_EVENTS"),
        ]
    );
    drop(log);
    nats::destroy(&shared.url, p).await.unwrap();
    assert!(ours().await.is_empty());
    // Destroying what is gone is not an error.
    nats::destroy(&shared.url, p).await.unwrap();
    // A prefix that cannot name NATS objects is refused.
    for bad in ["", "a.b", "a b", "a*"] {
        assert!(matches!(
            NatsLog::connect(&shared.url, bad).await,
            Err(LogError::Invalid(_))
        ));
    }
    // A stream of that name that is not an ICE log is not opened.
    let foreign = fresh_prefix();
    js.create_stream(async_nats::jetstream::stream::Config {
        name: format!("{foreign}_EVENTS"),
        subjects: vec![format!("{foreign}.other")],
        ..Default::default()
    })
    .await
    .unwrap();
    let opened = NatsLog::connect(&shared.url, &foreign).await;
    nats::destroy(&shared.url, &foreign).await.unwrap();
    assert!(
        matches!(opened, Err(LogError::NotALog { .. })),
        "{:?}",
        opened.err()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_server_is_a_clear_storage_error() {
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    match NatsLog::connect(&url, "nobody").await {
        Err(LogError::Storage { context, .. }) => assert!(context.contains(&url), "{context}"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("connected to nothing"),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A nats-server of the test's own, on a free port, storing in a temporary directory.
struct OwnServer {
    child: std::process::Child,
    port: u16,
    dir: std::path::PathBuf,
    /// Further arguments (authorization).
    args: Vec<String>,
}

impl OwnServer {
    fn start(port: u16, dir: &std::path::Path) -> OwnServer {
        OwnServer::start_with(port, dir, &[])
    }

    fn start_with(port: u16, dir: &std::path::Path, args: &[&str]) -> OwnServer {
        let bin = std::env::var("ICE_TEST_NATS_SERVER").unwrap_or_else(|_| "nats-server".into());
        let child = std::process::Command::new(&bin)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {bin} ({e}): install nats-server or set ICE_TEST_NATS_SERVER")
            });
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "{bin} did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        OwnServer {
            child,
            port,
            dir: dir.to_path_buf(),
            args: args.iter().map(|a| a.to_string()).collect(),
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stop (`SIGSTOP`) or continue (`SIGCONT`) the server process: it stops answering
    /// without closing connections.
    fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill {sig} {} failed", self.child.id());
    }

    fn restart(&mut self) {
        self.kill();
        let args = self.args.clone();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        *self = OwnServer::start_with(self.port, &self.dir.clone(), &args);
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_restart_fails_appends_cleanly_and_appends_continue_after() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = OwnServer::start(free_port(), dir.path());
    let opts = Options {
        request_timeout: Duration::from_millis(500),
        append_deadline: Duration::from_secs(2),
        ..Options::default()
    };
    let log = Arc::new(
        NatsLog::connect_with(&server.url(), "restart", opts)
            .await
            .expect("connect to our own server"),
    );
    let ledger = Ledger::new(log.clone(), Arc::new(TestClock::new()));
    let run = run_id("survivor");
    ledger.append(&run, opening()).await.unwrap();

    server.kill();
    let started = Instant::now();
    match ledger
        .append(&run, vec![working(0, 1), working(1, 2)])
        .await
    {
        Err(AppendError::Log(LogError::Storage { context, message })) => {
            assert!(
                context.contains("appending 2 events to run survivor"),
                "{context}"
            );
            assert!(message.contains("may still be stored"), "{message}");
        }
        other => panic!("an append with the server down gave {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(10));

    server.restart();
    // The client reconnects by itself; appends go through again.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match ledger.append(&run, vec![working(2, 3)]).await {
            Ok(_) => break,
            Err(AppendError::Log(LogError::Storage { .. })) => {
                assert!(Instant::now() < deadline, "appends never resumed");
            }
            Err(e) => panic!("{e}"),
        }
    }
    // The batch whose append failed is there whole or not at all (its publish, buffered by
    // the client while disconnected, may have reached the server after the error).
    let stored = read_whole_run(log.as_ref(), &run).await.unwrap();
    assert!(
        stored.len() == 4 + 1 || stored.len() == 4 + 2 + 1,
        "{} events",
        stored.len()
    );
    assert_verifies(log.as_ref()).await;
    // A new connection (the node restarted too) sees the same.
    let again = NatsLog::connect(&server.url(), "restart").await.unwrap();
    assert_eq!(all_events(&again).await, all_events(log.as_ref()).await);
    again.destroy().await.unwrap();
}

/// The server stops answering while an append is in flight: the append's acknowledgements are
/// lost, it sends the batch again under the same message id, and when the server wakes up the
/// batch is stored once and the append succeeds with its true position.
#[tokio::test(flavor = "multi_thread")]
async fn a_publish_whose_ack_was_lost_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = OwnServer::start(free_port(), dir.path());
    let opts = Options {
        request_timeout: Duration::from_millis(300),
        append_deadline: Duration::from_secs(20),
        ..Options::default()
    };
    let log = Arc::new(
        NatsLog::connect_with(&server.url(), "lost_ack", opts)
            .await
            .expect("connect to our own server"),
    );
    let ledger = Ledger::new(log.clone(), Arc::new(TestClock::new()));
    let run = run_id("lost.ack");
    ledger.append(&run, opening()).await.unwrap();
    server.signal("-STOP");
    let appending = {
        let log = log.clone();
        let mut head = ledger.head(&run).await.unwrap();
        let b = head
            .seal_batch(vec![working(0, 1), working(3, 2)], at(100), &NoOtherRuns)
            .unwrap();
        tokio::spawn(async move { log.append(b).await })
    };
    // Several attempts time out meanwhile.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.signal("-CONT");
    let receipt = appending
        .await
        .unwrap()
        .expect("the append succeeds once the server answers");
    assert_eq!(
        (receipt.first_log_seq, receipt.count, receipt.tree_size),
        (4, 2, 6)
    );
    assert_eq!(log.size().await.unwrap(), 6);
    let again = NatsLog::connect(&server.url(), "lost_ack").await.unwrap();
    assert_eq!(again.read_run(&run, 0, 100).await.unwrap().len(), 6);
    ledger.forget(&run);
    ledger.append(&run, vec![working(4, 3)]).await.unwrap();
    assert_verifies(&again).await;
    again.destroy().await.unwrap();
}

/// Durable appends per second, one appender and 16 at once, beside the raw JetStream publish
/// rate (publish and wait for the ack) of messages of the same sizes on the same server, with
/// and without the headers NatsLog sends. Prints the rates and ratios (run with --nocapture).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn durable_append_rate_against_raw_jetstream() {
    const APPENDS: usize = 2000;
    const TASKS: usize = 16;
    const ROUNDS: usize = 3;
    let shared = Shared::new();
    let log = shared.node().await;
    let client = async_nats::connect(url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let raw_stream = format!("{}_RAW", shared.prefix);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: raw_stream.clone(),
        subjects: vec![format!("{}.raw.*", shared.prefix)],
        storage: async_nats::jetstream::stream::StorageType::File,
        duplicate_window: nats::DUPLICATE_WINDOW,
        ..Default::default()
    })
    .await
    .unwrap();

    // Batches of one event, sealed beforehand: `lanes` runs, `APPENDS / lanes` each.
    let seal = |tag: &str, lanes: usize| -> Vec<Vec<SealedBatch>> {
        (0..lanes)
            .map(|l| {
                let mut h = RunHead::new(run_id(&format!("{tag}-{l}")));
                let mut t = 0;
                let mut out = Vec::new();
                for d in opening()
                    .into_iter()
                    .chain((0..APPENDS / lanes - 4).map(|i| working(i as u8, i as u64)))
                {
                    t += 1;
                    out.push(h.seal_batch(vec![d], at(t), &NoOtherRuns).unwrap());
                }
                out
            })
            .collect()
    };
    // The size of the record NatsLog publishes for a batch (see the format in nats.rs).
    let record_len = |b: &SealedBatch| -> usize {
        4 + 1
            + 2
            + b.run_id().as_str().len()
            + 8
            + 32
            + 4
            + 4
            + b.events()
                .iter()
                .map(|e| 2 + e.event().event_type.len() + 32 + 4 + e.body().len())
                .sum::<usize>()
    };
    /// Publish and wait for each ack in turn; `headered`: with the headers NatsLog sends (a
    /// message id, the expected stream and the expected last sequence of the subject).
    async fn raw(
        js: &async_nats::jetstream::Context,
        stream: String,
        subject: String,
        sizes: Vec<usize>,
        headered: bool,
    ) {
        let mut last = 0;
        for (i, n) in sizes.into_iter().enumerate() {
            let mut m = async_nats::jetstream::message::PublishMessage::build()
                .payload(vec![b'x'; n].into());
            if headered {
                m = m
                    .message_id(format!("{subject}-{i}-{}", "0".repeat(64)))
                    .expected_stream(&stream)
                    .expected_last_subject_sequence(last);
            }
            let ack = js
                .send_publish(subject.clone(), m)
                .await
                .unwrap()
                .await
                .unwrap();
            last = ack.sequence;
        }
    }
    // The machine is shared: each measurement is taken ROUNDS times, interleaved with its
    // baselines, and the medians are compared.
    let median = |mut v: Vec<f64>| -> f64 {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut report = Vec::new();
    for lanes in [1usize, TASKS] {
        let (mut raw_rates, mut headered_rates, mut ice_rates) = (vec![], vec![], vec![]);
        for round in 0..ROUNDS {
            let tag = format!("l{lanes}r{round}");
            let lanes_batches = seal(&tag, lanes);
            let count: usize = lanes_batches.iter().map(|l| l.len()).sum();
            // Baseline: as many messages of the same sizes, at the same concurrency; then the
            // same with NatsLog's headers (what the server's checks cost).
            for headered in [false, true] {
                let start = Instant::now();
                let mut tasks = Vec::new();
                for (l, lane) in lanes_batches.iter().enumerate() {
                    let js = js.clone();
                    let stream = raw_stream.clone();
                    let subject = format!("{}.raw.{tag}l{l}{headered}", shared.prefix);
                    let sizes: Vec<usize> = lane.iter().map(record_len).collect();
                    tasks.push(tokio::spawn(async move {
                        raw(&js, stream, subject, sizes, headered).await
                    }));
                }
                for t in tasks {
                    t.await.unwrap();
                }
                let rate = count as f64 / start.elapsed().as_secs_f64();
                if headered {
                    headered_rates.push(rate);
                } else {
                    raw_rates.push(rate);
                }
            }
            let start = Instant::now();
            let mut tasks = Vec::new();
            for lane in lanes_batches {
                let log = log.clone();
                tasks.push(tokio::spawn(async move {
                    for b in lane {
                        log.append(b).await.unwrap();
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            ice_rates.push(count as f64 / start.elapsed().as_secs_f64());
        }
        let (raw_rate, headered_rate, ice_rate) =
            (median(raw_rates), median(headered_rates), median(ice_rates));
        report.push(format!(
            "{lanes:>2} appender(s), median of {ROUNDS} x {APPENDS}: NatsLog {ice_rate:>6.0} appends/s; raw JetStream publish+ack {raw_rate:>6.0} msgs/s (ratio {:.2}); raw with NatsLog's headers {headered_rate:>6.0} msgs/s (ratio {:.2})",
            ice_rate / raw_rate,
            ice_rate / headered_rate
        ));
    }
    for line in &report {
        eprintln!("{line}");
    }
    js.delete_stream(&raw_stream).await.unwrap();
    assert_eq!(log.size().await.unwrap(), (APPENDS * 2 * ROUNDS) as u64);
    assert_verifies(log.as_ref()).await;
}

/// `nats://USER:PASSWORD@HOST` and `nats://TOKEN@HOST` authenticate (the client library itself
/// ignores user info in a URL), and a refused login names the server, not the password.
#[tokio::test(flavor = "multi_thread")]
async fn credentials_in_the_url_authenticate_and_are_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    let server = OwnServer::start_with(
        free_port(),
        dir.path(),
        &["--user", "ice", "--pass", "s3cret-pw"],
    );
    let host = format!("127.0.0.1:{}", server.port);
    let good = format!("nats://ice:s3cret-pw@{host}");
    let log = NatsLog::connect(&good, "auth")
        .await
        .expect("the URL's user and password authenticate");
    assert!(!log.url().contains("s3cret-pw"), "{}", log.url());
    assert!(log.url().contains(&host), "{}", log.url());
    let ledger = Ledger::new(Arc::new(log), Arc::new(TestClock::new()));
    ledger.append(&run_id("a"), opening()).await.unwrap();
    for (url, secret) in [
        (format!("nats://ice:wrong-pw@{host}"), "wrong-pw"),
        (format!("nats://{host}"), "s3cret-pw"),
    ] {
        match NatsLog::connect(&url, "auth").await {
            Err(e @ LogError::Storage { .. }) => {
                let text = format!("{e} {e:?}");
                assert!(!text.contains(secret), "{text}");
                assert!(text.contains(&host), "{text}");
            }
            other => panic!("connecting with {url:?} gave {:?}", other.err()),
        }
    }
    NatsLog::connect_existing(&good, "auth")
        .await
        .unwrap()
        .destroy()
        .await
        .unwrap();
    drop(server);

    let server = OwnServer::start_with(free_port(), dir.path(), &["--auth", "t0ken-xyz"]);
    let host = format!("127.0.0.1:{}", server.port);
    let log = NatsLog::connect(&format!("nats://t0ken-xyz@{host}"), "token")
        .await
        .expect("the URL's token authenticates");
    assert!(!log.url().contains("t0ken-xyz"), "{}", log.url());
    log.destroy().await.unwrap();
    match NatsLog::connect(&format!("nats://bad-t0ken@{host}"), "token").await {
        Err(e) => assert!(!format!("{e} {e:?}").contains("bad-t0ken"), "{e}"),
        Ok(_) => panic!("a wrong token was accepted"),
    }
}

/// The names of the streams on the server whose names hold `prefix`, sorted.
async fn streams_of(url: &str, prefix: &str) -> Vec<String> {
    use futures_util::StreamExt;
    let js = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
    let mut v: Vec<String> = js
        .stream_names()
        .filter_map(|n| async move { n.ok() })
        .filter(|n| std::future::ready(n.contains(prefix)))
        .collect()
        .await;
    v.sort();
    v
}

/// `url` with the user info `u:secretpw@` (the shared server needs none and ignores it).
fn with_password(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) if !rest.contains('@') => format!("{scheme}://u:secretpw@{rest}"),
        _ => url.to_string(),
    }
}

/// Opening for reading: an existing log opens with the same events; a missing, foreign or
/// incomplete one is `NotALog` and nothing is created.
#[tokio::test(flavor = "multi_thread")]
async fn connect_existing_opens_only_an_existing_log_and_creates_nothing() {
    let shared = Shared::new();
    let p = shared.prefix.clone();
    let secret_url = with_password(&shared.url);
    match NatsLog::connect_existing(&secret_url, &p).await {
        Err(LogError::NotALog { path, reason }) => {
            assert!(!path.contains("secretpw"), "{path}");
            assert!(path.contains(&p), "{path}");
            assert!(
                path.contains(shared.url.split("://").last().unwrap()),
                "{path}"
            );
            assert!(
                reason.contains(&format!("no ICE log with prefix {p}")),
                "{reason}"
            );
            assert!(
                reason.contains(&format!("{p}_EVENTS does not exist")),
                "{reason}"
            );
        }
        other => panic!("opening a missing log gave {:?}", other.err()),
    }
    assert!(
        streams_of(&shared.url, &p).await.is_empty(),
        "a read-only open created {:?}",
        streams_of(&shared.url, &p).await
    );

    // An existing log: the same events, checkpoints and runs as the node that wrote them.
    let writer = shared.node().await;
    for b in workload().into_iter().take(9) {
        writer.append(b).await.unwrap();
    }
    let signer = NoteSigner::from_seed("ice.test/nats", [7u8; 32]).unwrap();
    let size = writer.size().await.unwrap();
    let note = Checkpoint {
        origin: signer.name().into(),
        size,
        root: root_at(writer.as_ref(), size).await.unwrap(),
    }
    .sign(&signer)
    .unwrap();
    writer
        .add_checkpoint(StoredCheckpoint { size, note })
        .await
        .unwrap();
    let reader = NatsLog::connect_existing_with(
        &secret_url,
        &p,
        Options {
            request_timeout: Duration::from_secs(2),
            ..Options::default()
        },
    )
    .await
    .unwrap();
    assert!(!reader.url().contains("secretpw"), "{}", reader.url());
    assert_eq!(all_events(&reader).await, all_events(writer.as_ref()).await);
    assert_eq!(
        reader.checkpoints().await.unwrap(),
        writer.checkpoints().await.unwrap()
    );
    assert_eq!(
        reader.runs(0, 100).await.unwrap(),
        writer.runs(0, 100).await.unwrap()
    );
    assert_verifies(&reader).await;
    let before = streams_of(&shared.url, &p).await;
    assert_eq!(before.len(), 4, "{before:?}");

    // An incomplete log (a bucket is gone): refused, and the bucket is not made again.
    let js = async_nats::jetstream::new(async_nats::connect(shared.url.as_str()).await.unwrap());
    js.delete_stream(format!("KV_{p}_CLAIMS")).await.unwrap();
    match NatsLog::connect_existing(&shared.url, &p).await {
        Err(LogError::NotALog { reason, .. }) => {
            assert!(reason.contains(&format!("{p}_CLAIMS")), "{reason}")
        }
        other => panic!("opening an incomplete log gave {:?}", other.err()),
    }
    assert_eq!(streams_of(&shared.url, &p).await.len(), 3);
    // Opening it for writing completes it.
    drop(NatsLog::connect(&shared.url, &p).await.unwrap());
    assert_eq!(streams_of(&shared.url, &p).await, before);

    // A stream of that name that is not an ICE log.
    let foreign = fresh_prefix();
    js.create_stream(async_nats::jetstream::stream::Config {
        name: format!("{foreign}_EVENTS"),
        subjects: vec![format!("{foreign}.other")],
        ..Default::default()
    })
    .await
    .unwrap();
    let opened = NatsLog::connect_existing(&shared.url, &foreign).await;
    let left = streams_of(&shared.url, &foreign).await;
    nats::destroy(&shared.url, &foreign).await.unwrap();
    match opened {
        Err(LogError::NotALog { reason, .. }) => {
            assert!(reason.contains("is not an ICE log"), "{reason}")
        }
        other => panic!("opening a foreign stream gave {:?}", other.err()),
    }
    assert_eq!(left, vec![format!("{foreign}_EVENTS")]);
    // A prefix that cannot name NATS objects is refused as by `connect`.
    assert!(matches!(
        NatsLog::connect_existing(&shared.url, "a.b").await,
        Err(LogError::Invalid(_))
    ));
}

/// The URL's password is kept out of every error and of `url()`: here an append that gives
/// up with the server gone (its context names the server).
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_append_names_the_server_but_not_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = OwnServer::start(free_port(), dir.path());
    let host = format!("127.0.0.1:{}", server.port);
    let opts = Options {
        request_timeout: Duration::from_millis(300),
        append_deadline: Duration::from_secs(1),
        ..Options::default()
    };
    let log = Arc::new(
        NatsLog::connect_with(&format!("nats://u:secretpw@{host}"), "leak", opts)
            .await
            .expect("connect to our own server"),
    );
    assert_eq!(log.url(), format!("nats://u:***@{host}"));
    let ledger = Ledger::new(log.clone(), Arc::new(TestClock::new()));
    ledger.append(&run_id("r"), opening()).await.unwrap();
    server.kill();
    match ledger.append(&run_id("r"), vec![working(0, 1)]).await {
        Err(AppendError::Log(e @ LogError::Storage { .. })) => {
            let text = format!("{e} {e:?}");
            assert!(!text.contains("secretpw"), "{text}");
            assert!(
                text.contains(&format!("on NATS at nats://u:***@{host}")),
                "{text}"
            );
            assert!(text.contains("may still be stored"), "{text}");
        }
        other => panic!("an append with the server down gave {other:?}"),
    }
    // Nor does a failed connection show it.
    match NatsLog::connect(&format!("nats://u:secretpw@{host}"), "leak").await {
        Err(e) => {
            let text = format!("{e} {e:?}");
            assert!(!text.contains("secretpw"), "{text}");
            assert!(text.contains(&host), "{text}");
        }
        Ok(_) => panic!("connected to a stopped server"),
    }
}

/// The server stores a batch, then reading the other node's message before it fails: the
/// error says the batch is stored and where, not that the append failed; it is there after.
#[tokio::test(flavor = "multi_thread")]
async fn a_stored_batch_whose_position_cannot_be_read_is_reported_as_stored() {
    let shared = Shared::new();
    let a = shared.node().await;
    let b = shared.node().await;
    let run = run_id("kept");
    let mut head = RunHead::new(run.clone());
    a.append(head.seal_batch(opening(), at(1), &NoOtherRuns).unwrap())
        .await
        .unwrap();
    // Another node appends to another run: `a` must read that message to place its own.
    let mut other = RunHead::new(run_id("other"));
    b.append(other.seal_batch(opening(), at(2), &NoOtherRuns).unwrap())
        .await
        .unwrap();
    let batch = head
        .seal_batch(vec![working(0, 1), working(1, 2)], at(3), &NoOtherRuns)
        .unwrap();
    a.fail_next_server_read();
    match a.append(batch.clone()).await {
        Err(LogError::Storage { context, message }) => {
            assert!(
                context.contains("appending 2 events to run kept"),
                "{context}"
            );
            assert!(
                message.contains(&format!(
                    "the batch IS stored, as message 3 of stream {}_EVENTS",
                    shared.prefix
                )),
                "{message}"
            );
            assert!(
                message.contains("(test) the server did not answer"),
                "{message}"
            );
            assert!(
                message.contains("do not append the batch again"),
                "{message}"
            );
        }
        other => panic!("expected a storage error saying the batch is stored, got {other:?}"),
    }
    // It is: every node reads it, and offering it again is a conflict.
    assert_eq!(b.read_run(&run, 0, 100).await.unwrap().len(), 6);
    assert_eq!(a.read_run(&run, 0, 100).await.unwrap().len(), 6);
    assert!(matches!(
        a.append(batch).await,
        Err(LogError::Conflict {
            expected: 4,
            actual: 6,
            ..
        })
    ));
    assert_eq!(a.size().await.unwrap(), 10);
    assert_verifies(a.as_ref()).await;
}
