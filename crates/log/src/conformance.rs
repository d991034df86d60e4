//! One conformance suite for every [`EventLog`] backend.
//!
//! Each backend's test file implements [`Backend`] (how to make a fresh log, open it again as
//! another client, and remove it) and calls [`run_all`]; the same cases then run against the
//! embedded SQLite log, PostgreSQL and NATS JetStream. The cases only use the public interface,
//! events sealed by the kernel's validator (through [`Ledger`]), and [`verify`]: what holds for
//! one backend must hold for every other.
//!
//! Cases: append and read back (read_run, scan, get, size, runs, existing); a conflicting append
//! fails and writes nothing; racers on one run (several clients): exactly one wins each round;
//! many runs appended concurrently from several clients; blobs; the Merkle tree (roots at every
//! size equal the roots computed from the event hashes; inclusion and consistency proofs
//! verify); checkpoints; a restart (reopen: everything is there and appends continue); run
//! writer claims on shared backends; and the whole log verifies after each case.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use async_trait::async_trait;
use ice_kernel::{Clock, Draft, EventId, Origin, RunId, Timestamp};
use serde_json::json;

use crate::checkpoint::{Checkpoint, NoteSigner};
use crate::ledger::{AppendError, Ledger};
use crate::merkle::{self, Frontier};
use crate::verify::verify;
use crate::{EventLog, LogError, StoredCheckpoint, StoredEvent, range_hashes, root_at};

/// What the suite needs of a backend.
#[async_trait]
pub trait Backend: Send + Sync {
    /// Its name, for messages.
    fn name(&self) -> String;
    /// Whether several processes share the log (then run writer claims are enforced).
    fn shared(&self) -> bool;
    /// A new, empty log, and a locator naming it for [`Backend::reopen`].
    async fn fresh(&self) -> Result<(Arc<dyn EventLog>, String), LogError>;
    /// The log named by `locator`, opened again as a separate client (another node, or the
    /// same node after a restart).
    async fn reopen(&self, locator: &str) -> Result<Arc<dyn EventLog>, LogError>;
    /// Remove the log (the suite leaves nothing behind).
    async fn destroy(&self, locator: &str);
}

/// A clock for the suite: strictly increasing, one millisecond per reading, from a fixed start
/// (each client gets its own; runs never share a clock across clients in a way that matters).
struct StepClock(AtomicI64);

impl StepClock {
    fn new() -> Arc<StepClock> {
        Arc::new(StepClock(AtomicI64::new(1_700_000_000_000_000)))
    }
}

impl Clock for StepClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_unix_us(self.0.fetch_add(1_000, Ordering::SeqCst)).expect("in range")
    }
}

fn run(s: &str) -> RunId {
    RunId::new(s).expect("valid run id")
}

fn opening() -> Vec<Draft> {
    vec![
        Draft::new("RunProvisioned", Origin::Runtime).payload(json!({"spec": "conformance"})),
        Draft::new("ResourcesAllocated", Origin::Runtime),
        Draft::new("ContextResolved", Origin::Runtime),
        Draft::new("ExecutionWindowOpened", Origin::Runtime),
    ]
}

fn step(n: u64) -> Draft {
    Draft::new("InferenceStep", Origin::Agent("conformance".into()))
        .intent("think")
        .payload(json!({"n": n, "text": format!("step {n}"), "nested": {"é": [1, 1.5, null]}}))
}

/// A failed case: which and why.
fn fail(case: &str, why: impl std::fmt::Display) -> String {
    format!("{case}: {why}")
}

macro_rules! check {
    ($case:expr, $cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(fail($case, format!($($msg)+)));
        }
    };
}

async fn verified(case: &str, log: &dyn EventLog) -> Result<(), String> {
    let r = verify(log, None, |_| {})
        .await
        .map_err(|e| fail(case, format!("verify could not run: {e}")))?;
    check!(case, r.ok(), "the log does not verify: {:?}", r.failure);
    Ok(())
}

/// Run every case against `backend`, each on a fresh log that is destroyed afterwards.
/// Returns the first failure as "case: why".
pub async fn run_all(backend: &dyn Backend) -> Result<(), String> {
    type Case = for<'a> fn(
        &'a dyn Backend,
        Arc<dyn EventLog>,
        &'a str,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<(), String>> + Send + 'a>,
    >;
    let cases: [(&str, Case); 10] = [
        ("append_and_read", |b, l, loc| {
            Box::pin(append_and_read(b, l, loc))
        }),
        ("conflict_writes_nothing", |b, l, loc| {
            Box::pin(conflict_writes_nothing(b, l, loc))
        }),
        ("racers_on_one_run", |b, l, loc| {
            Box::pin(racers_on_one_run(b, l, loc))
        }),
        ("many_runs_many_clients", |b, l, loc| {
            Box::pin(many_runs_many_clients(b, l, loc))
        }),
        ("blobs", |b, l, loc| Box::pin(blobs(b, l, loc))),
        ("merkle_tree_and_proofs", |b, l, loc| {
            Box::pin(merkle_tree_and_proofs(b, l, loc))
        }),
        ("checkpoints", |b, l, loc| Box::pin(checkpoints(b, l, loc))),
        ("restart", |b, l, loc| Box::pin(restart(b, l, loc))),
        ("claims", |b, l, loc| Box::pin(claims(b, l, loc))),
        ("migrate_both_ways", |b, l, loc| {
            Box::pin(migrate_both_ways(b, l, loc))
        }),
    ];
    for (name, case) in cases {
        let (log, locator) = backend
            .fresh()
            .await
            .map_err(|e| fail(name, format!("{}: a fresh log: {e}", backend.name())))?;
        let result = case(backend, log.clone(), &locator).await;
        let result = match result {
            Ok(()) => verified(name, log.as_ref()).await,
            e => e,
        };
        drop(log);
        backend.destroy(&locator).await;
        result.map_err(|e| format!("{}: {e}", backend.name()))?;
    }
    Ok(())
}

async fn append_and_read(_: &dyn Backend, log: Arc<dyn EventLog>, _: &str) -> Result<(), String> {
    let case = "append_and_read";
    let ledger = Ledger::new(log.clone(), StepClock::new());
    let (a, b) = (run("run-a"), run("run-b"));
    let r1 = ledger
        .append(&a, opening())
        .await
        .map_err(|e| fail(case, e))?
        .0;
    check!(
        case,
        r1.first_log_seq == 0 && r1.count == 4 && r1.tree_size == 4,
        "first receipt {r1:?}"
    );
    ledger
        .append(&b, opening())
        .await
        .map_err(|e| fail(case, e))?;
    let r3 = ledger
        .append(&a, vec![step(1), step(2)])
        .await
        .map_err(|e| fail(case, e))?
        .0;
    check!(
        case,
        r3.first_log_seq == 8 && r3.tree_size == 10,
        "third receipt {r3:?}"
    );
    let size = log.size().await.map_err(|e| fail(case, e))?;
    check!(case, size == 10, "size {size}");
    let events = log.read_run(&a, 0, 100).await.map_err(|e| fail(case, e))?;
    let seqs: Vec<u64> = events.iter().map(|e| e.run_seq).collect();
    check!(
        case,
        seqs == [0, 1, 2, 3, 4, 5],
        "run a's run_seqs {seqs:?}"
    );
    let logs: Vec<u64> = events.iter().map(|e| e.log_seq).collect();
    check!(
        case,
        logs == [0, 1, 2, 3, 8, 9],
        "run a's log_seqs {logs:?}"
    );
    let page = log.read_run(&a, 4, 1).await.map_err(|e| fail(case, e))?;
    check!(
        case,
        page.len() == 1 && page[0].run_seq == 4,
        "a page of run a: {page:?}"
    );
    let all = log.scan(0, 100).await.map_err(|e| fail(case, e))?;
    check!(case, all.len() == 10, "scan gave {} events", all.len());
    for (i, e) in all.iter().enumerate() {
        check!(
            case,
            e.log_seq == i as u64,
            "scan out of order at {i}: {}",
            e.log_seq
        );
        let parsed = e.event().map_err(|x| fail(case, x))?;
        check!(
            case,
            parsed.hash.0.as_slice() == e.hash.as_slice(),
            "hash column differs at {i}"
        );
    }
    let tail = log.scan(7, 2).await.map_err(|e| fail(case, e))?;
    check!(
        case,
        tail.len() == 2 && tail[0].log_seq == 7,
        "scan(7, 2) gave {tail:?}"
    );
    let got = log
        .get(&EventId::new(a.clone(), 5))
        .await
        .map_err(|e| fail(case, e))?;
    check!(
        case,
        got.as_ref().is_some_and(|e| e.log_seq == 9),
        "get a:5 gave {got:?}"
    );
    let none = log
        .get(&EventId::new(a.clone(), 6))
        .await
        .map_err(|e| fail(case, e))?;
    check!(case, none.is_none(), "get a:6 (absent) gave {none:?}");
    let runs = log.runs(0, 10).await.map_err(|e| fail(case, e))?;
    check!(case, runs == [a.clone(), b.clone()], "runs {runs:?}");
    let runs = log.runs(1, 10).await.map_err(|e| fail(case, e))?;
    check!(case, runs == [b.clone()], "runs from 1: {runs:?}");
    let newest = log
        .runs_newest_first(0, 10)
        .await
        .map_err(|e| fail(case, e))?;
    check!(
        case,
        newest == [b.clone(), a.clone()],
        "newest first {newest:?}"
    );
    let newest = log
        .runs_newest_first(1, 10)
        .await
        .map_err(|e| fail(case, e))?;
    check!(
        case,
        newest == [a.clone()],
        "newest first from 1: {newest:?}"
    );
    let newest = log
        .runs_newest_first(0, 1)
        .await
        .map_err(|e| fail(case, e))?;
    check!(case, newest == [b.clone()], "the newest: {newest:?}");
    let count = log.run_count().await.map_err(|e| fail(case, e))?;
    check!(case, count == 2, "run count {count}");
    let ids = [
        EventId::new(a.clone(), 0),
        EventId::new(a.clone(), 9),
        EventId::new(b.clone(), 3),
        EventId::new(run("run-c"), 0),
    ];
    let existing = log.existing(&ids).await.map_err(|e| fail(case, e))?;
    let want: HashSet<EventId> = [ids[0].clone(), ids[2].clone()].into_iter().collect();
    check!(case, existing == want, "existing {existing:?}");
    // Positions past the largest a store can hold are past the end, on every backend.
    for from in [1u64 << 63, u64::MAX] {
        let past = log.scan(from, 10).await.map_err(|e| fail(case, e))?;
        check!(
            case,
            past.is_empty(),
            "scan from {from} gave {} events",
            past.len()
        );
        let past = log
            .read_run(&a, from, 10)
            .await
            .map_err(|e| fail(case, e))?;
        check!(
            case,
            past.is_empty(),
            "run a from {from} gave {} events",
            past.len()
        );
        let past = log.runs(from, 10).await.map_err(|e| fail(case, e))?;
        check!(case, past.is_empty(), "runs from {from}: {past:?}");
        let past = log
            .runs_newest_first(from, 10)
            .await
            .map_err(|e| fail(case, e))?;
        check!(case, past.is_empty(), "newest runs from {from}: {past:?}");
        let past = log
            .get(&EventId::new(a.clone(), from))
            .await
            .map_err(|e| fail(case, e))?;
        check!(case, past.is_none(), "get a:{from} gave {past:?}");
    }
    Ok(())
}

async fn conflict_writes_nothing(
    b: &dyn Backend,
    log: Arc<dyn EventLog>,
    loc: &str,
) -> Result<(), String> {
    let case = "conflict_writes_nothing";
    let other = b.reopen(loc).await.map_err(|e| fail(case, e))?;
    let first = Ledger::new(log.clone(), StepClock::new());
    let second = Ledger::new(other.clone(), StepClock::new());
    let r = run("contested");
    first
        .append(&r, opening())
        .await
        .map_err(|e| fail(case, e))?;
    // The second client learns the head, then the first moves on.
    second.head(&r).await.map_err(|e| fail(case, e))?;
    first
        .append(&r, vec![step(1)])
        .await
        .map_err(|e| fail(case, e))?;
    let before = log.size().await.map_err(|e| fail(case, e))?;
    // Pinned to where it believes the run ends (an unpinned append would be sealed again after
    // the first client's event: the ledger retries conflicts).
    match second.append_at(&r, 4, vec![step(2), step(3)]).await {
        Err(AppendError::Log(LogError::Conflict {
            expected, actual, ..
        })) => {
            check!(
                case,
                expected == 4 && actual == 5,
                "conflict said expected {expected}, actual {actual}"
            );
        }
        other => {
            return Err(fail(
                case,
                format!("a stale append gave {other:?}, not a conflict"),
            ));
        }
    }
    let after = log.size().await.map_err(|e| fail(case, e))?;
    check!(
        case,
        after == before,
        "the losing batch left {} events",
        after - before
    );
    let events = other
        .read_run(&r, 0, 100)
        .await
        .map_err(|e| fail(case, e))?;
    check!(
        case,
        events.len() == 5,
        "the run has {} events",
        events.len()
    );
    // After reloading, the second client appends where the run is.
    second.forget(&r);
    second
        .append(&r, vec![step(2)])
        .await
        .map_err(|e| fail(case, e))?;
    Ok(())
}

async fn racers_on_one_run(
    b: &dyn Backend,
    log: Arc<dyn EventLog>,
    loc: &str,
) -> Result<(), String> {
    let case = "racers_on_one_run";
    let r = run("raced");
    Ledger::new(log.clone(), StepClock::new())
        .append(&r, opening())
        .await
        .map_err(|e| fail(case, e))?;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(Arc::new(Ledger::new(
            b.reopen(loc).await.map_err(|e| fail(case, e))?,
            StepClock::new(),
        )));
    }
    for round in 0..5u64 {
        for c in &clients {
            c.forget(&r);
            c.head(&r).await.map_err(|e| fail(case, e))?;
        }
        let mut tasks = Vec::new();
        for (i, c) in clients.iter().enumerate() {
            let c = c.clone();
            let r = r.clone();
            // Pinned to the position they all learned: exactly one may take it.
            tasks.push(tokio::spawn(async move {
                c.append_at(&r, 4 + round, vec![step(round * 10 + i as u64)])
                    .await
            }));
        }
        let mut wins = 0;
        for t in tasks {
            match t.await.map_err(|e| fail(case, e))? {
                Ok(_) => wins += 1,
                Err(AppendError::Log(LogError::Conflict { .. })) => {}
                Err(e) => return Err(fail(case, format!("round {round}: {e}"))),
            }
        }
        check!(case, wins == 1, "round {round}: {wins} racers won");
    }
    let events = log.read_run(&r, 0, 100).await.map_err(|e| fail(case, e))?;
    check!(
        case,
        events.len() == 9,
        "the run has {} events, not 4 + 5",
        events.len()
    );
    Ok(())
}

async fn many_runs_many_clients(
    b: &dyn Backend,
    log: Arc<dyn EventLog>,
    loc: &str,
) -> Result<(), String> {
    let case = "many_runs_many_clients";
    let mut tasks = Vec::new();
    for c in 0..3 {
        let client = b.reopen(loc).await.map_err(|e| fail(case, e))?;
        let ledger = Arc::new(Ledger::new(client, StepClock::new()));
        for k in 0..4 {
            let ledger = ledger.clone();
            tasks.push(tokio::spawn(async move {
                let r = run(&format!("client{c}-run{k}"));
                ledger.append(&r, opening()).await?;
                for n in 0..5 {
                    ledger.append(&r, vec![step(n)]).await?;
                }
                Ok::<_, AppendError>(())
            }));
        }
    }
    for t in tasks {
        t.await
            .map_err(|e| fail(case, e))?
            .map_err(|e| fail(case, e))?;
    }
    let size = log.size().await.map_err(|e| fail(case, e))?;
    check!(case, size == 12 * 9, "size {size}, not {}", 12 * 9);
    let all = log.scan(0, 1000).await.map_err(|e| fail(case, e))?;
    for (i, e) in all.iter().enumerate() {
        check!(
            case,
            e.log_seq == i as u64,
            "a gap or reordering at {i}: {}",
            e.log_seq
        );
    }
    let runs = log.runs(0, 100).await.map_err(|e| fail(case, e))?;
    check!(case, runs.len() == 12, "{} runs", runs.len());
    let count = log.run_count().await.map_err(|e| fail(case, e))?;
    check!(case, count == 12, "run count {count}");
    let mut newest = log
        .runs_newest_first(0, 100)
        .await
        .map_err(|e| fail(case, e))?;
    newest.reverse();
    check!(
        case,
        newest == runs,
        "newest first is not the reverse: {newest:?}"
    );
    Ok(())
}

async fn blobs(_: &dyn Backend, log: Arc<dyn EventLog>, _: &str) -> Result<(), String> {
    let case = "blobs";
    let ledger = Ledger::new(log.clone(), StepClock::new());
    let r = run("blobby");
    let big = "x".repeat(40_000);
    let mut drafts = opening();
    drafts.push(
        Draft::new("InferenceStep", Origin::Agent("conformance".into()))
            .intent("a long answer")
            .payload(json!({"output": big, "small": 1})),
    );
    ledger.append(&r, drafts).await.map_err(|e| fail(case, e))?;
    let stored = log
        .get(&EventId::new(r.clone(), 4))
        .await
        .map_err(|e| fail(case, e))?
        .ok_or_else(|| fail(case, "the event is missing"))?;
    let event = stored.event().map_err(|e| fail(case, e))?;
    let refs = ice_kernel::blob::blob_refs(&event.payload).map_err(|e| fail(case, e))?;
    check!(
        case,
        refs.len() == 1 && refs[0].field == "output",
        "blob refs {refs:?}"
    );
    let bytes = log
        .blob(&refs[0].digest)
        .await
        .map_err(|e| fail(case, e))?
        .ok_or_else(|| fail(case, "the blob is missing"))?;
    check!(
        case,
        bytes.len() as u64 == refs[0].size,
        "blob of {} bytes",
        bytes.len()
    );
    check!(
        case,
        ice_kernel::Digest::of(&bytes) == refs[0].digest,
        "the blob's bytes do not hash to its digest"
    );
    let absent = log
        .blob(&ice_kernel::Digest::of(b"never stored"))
        .await
        .map_err(|e| fail(case, e))?;
    check!(case, absent.is_none(), "an unknown blob was found");
    Ok(())
}

async fn merkle_tree_and_proofs(
    _: &dyn Backend,
    log: Arc<dyn EventLog>,
    _: &str,
) -> Result<(), String> {
    let case = "merkle_tree_and_proofs";
    let ledger = Ledger::new(log.clone(), StepClock::new());
    for k in 0..3 {
        let r = run(&format!("tree-{k}"));
        ledger
            .append(&r, opening())
            .await
            .map_err(|e| fail(case, e))?;
        for n in 0..(k * 3 + 1) {
            ledger
                .append(&r, vec![step(n)])
                .await
                .map_err(|e| fail(case, e))?;
        }
    }
    let all = log.scan(0, 1000).await.map_err(|e| fail(case, e))?;
    let mut frontier = Frontier::new();
    let mut roots = vec![merkle::empty_root()];
    for e in &all {
        frontier.push(merkle::leaf_hash(&e.hash));
        roots.push(frontier.root());
    }
    for (size, want) in roots.iter().enumerate().skip(1) {
        let got = root_at(log.as_ref(), size as u64)
            .await
            .map_err(|e| fail(case, e))?;
        check!(case, &got == want, "the root at size {size} differs");
    }
    let n = all.len() as u64;
    let root = roots[n as usize];
    for i in [0, n / 2, n - 1] {
        let proof = range_hashes(log.as_ref(), &merkle::inclusion_ranges(i, n))
            .await
            .map_err(|e| fail(case, e))?;
        merkle::verify_inclusion(&all[i as usize].hash, i, n, &root, &proof)
            .map_err(|e| fail(case, format!("inclusion of {i}: {e}")))?;
    }
    for m in [1, n / 3, n - 1] {
        let proof = range_hashes(log.as_ref(), &merkle::consistency_ranges(m, n))
            .await
            .map_err(|e| fail(case, e))?;
        merkle::verify_consistency(m, &roots[m as usize], n, &root, &proof)
            .map_err(|e| fail(case, format!("consistency {m} → {n}: {e}")))?;
    }
    // The stored nodes, paged by whole leaves, are each node of the tree at or above the
    // backend's floor exactly once.
    let floor = log.tree_floor();
    let mut seen = HashSet::new();
    let mut from = 0;
    while from < n {
        for (id, _) in log.scan_nodes(from, 5).await.map_err(|e| fail(case, e))? {
            check!(case, seen.insert(id), "node {id:?} listed twice");
            check!(
                case,
                id.level >= floor,
                "node {id:?} is below the tree floor {floor}"
            );
        }
        from += 5;
    }
    let want: usize = (1..=n)
        .map(|k| (k.trailing_zeros() as usize + 1).saturating_sub(floor as usize))
        .sum();
    check!(
        case,
        seen.len() == want,
        "{} stored nodes, not {want}",
        seen.len()
    );
    // A page (what verify streams through, reusing its memory) holds exactly what `scan` and
    // `scan_nodes` return for the same range, wherever it starts and however far it reaches.
    let mut page = crate::EventPage::default();
    for (from, limit) in [(0, 7), (3, 5), (n - 2, 10), (n, 3)] {
        page = log
            .scan_page(from, limit, true, page)
            .await
            .map_err(|e| fail(case, e))?;
        let rows = log.scan(from, limit).await.map_err(|e| fail(case, e))?;
        let got: Vec<StoredEvent> = page.iter().map(|r| r.to_stored()).collect();
        check!(
            case,
            got == rows,
            "scan_page({from}, {limit}) differs from scan"
        );
        let nodes = log
            .scan_nodes(from, limit as u64)
            .await
            .map_err(|e| fail(case, e))?;
        check!(
            case,
            page.nodes() == nodes.as_slice(),
            "scan_page({from}, {limit}) nodes differ from scan_nodes"
        );
        page = log
            .scan_page(from, limit, false, page)
            .await
            .map_err(|e| fail(case, e))?;
        check!(
            case,
            page.nodes().is_empty(),
            "nodes given when not asked for"
        );
    }
    Ok(())
}

async fn checkpoints(_: &dyn Backend, log: Arc<dyn EventLog>, _: &str) -> Result<(), String> {
    let case = "checkpoints";
    let ledger = Ledger::new(log.clone(), StepClock::new());
    let signer = NoteSigner::generate("ice.test/conformance").map_err(|e| fail(case, e))?;
    let mut notes = Vec::new();
    for k in 0..2 {
        ledger
            .append(&run(&format!("cp-{k}")), opening())
            .await
            .map_err(|e| fail(case, e))?;
        let size = log.size().await.map_err(|e| fail(case, e))?;
        let root = root_at(log.as_ref(), size)
            .await
            .map_err(|e| fail(case, e))?;
        let note = Checkpoint {
            origin: signer.name().into(),
            size,
            root,
        }
        .sign(&signer)
        .map_err(|e| fail(case, e))?;
        log.add_checkpoint(StoredCheckpoint {
            size,
            note: note.clone(),
        })
        .await
        .map_err(|e| fail(case, e))?;
        notes.push((size, note));
    }
    let stored = log.checkpoints().await.map_err(|e| fail(case, e))?;
    let got: Vec<(u64, String)> = stored.into_iter().map(|c| (c.size, c.note)).collect();
    check!(case, got == notes, "checkpoints {got:?}");
    // A checkpoint beyond the log is refused.
    let size = log.size().await.map_err(|e| fail(case, e))?;
    let beyond = log
        .add_checkpoint(StoredCheckpoint {
            size: size + 1,
            note: notes[1].1.clone(),
        })
        .await;
    check!(
        case,
        beyond.is_err(),
        "a checkpoint beyond the log was stored"
    );
    let r = verify(log.as_ref(), Some(&signer.verifier()), |_| {})
        .await
        .map_err(|e| fail(case, e))?;
    check!(case, r.ok() && r.checkpoints_verified == 2, "verify: {r:?}");
    // Signing checks what is new since the latest checkpoint, reading the heads of the runs
    // it touches from the backend: here a run from before it, cited across runs.
    let mut more = opening();
    more[0].causes.push(EventId::new(run("cp-0"), 1));
    ledger
        .append(&run("cp-2"), more)
        .await
        .map_err(|e| fail(case, e))?;
    ledger
        .append(
            &run("cp-1"),
            vec![Draft::new("ValidationStarted", Origin::Runtime)],
        )
        .await
        .map_err(|e| fail(case, e))?;
    let signed = crate::verify::sign_checkpoint(log.as_ref(), &signer)
        .await
        .map_err(|e| fail(case, e))?;
    let size = log.size().await.map_err(|e| fail(case, e))?;
    check!(
        case,
        signed.size == size,
        "signed {} of {size}",
        signed.size
    );
    let r = verify(log.as_ref(), Some(&signer.verifier()), |_| {})
        .await
        .map_err(|e| fail(case, e))?;
    check!(case, r.ok() && r.checkpoints_verified == 3, "verify: {r:?}");
    Ok(())
}

async fn restart(b: &dyn Backend, log: Arc<dyn EventLog>, loc: &str) -> Result<(), String> {
    let case = "restart";
    let r = run("survivor");
    Ledger::new(log.clone(), StepClock::new())
        .append(&r, opening())
        .await
        .map_err(|e| fail(case, e))?;
    let before = log.scan(0, 100).await.map_err(|e| fail(case, e))?;
    drop(log);
    let again = b.reopen(loc).await.map_err(|e| fail(case, e))?;
    let after = again.scan(0, 100).await.map_err(|e| fail(case, e))?;
    check!(case, after == before, "the log changed across a restart");
    let ledger = Ledger::new(again.clone(), StepClock::new());
    ledger
        .append(&r, vec![step(1)])
        .await
        .map_err(|e| fail(case, e))?;
    let size = again.size().await.map_err(|e| fail(case, e))?;
    check!(case, size == 5, "size after the restart's append {size}");
    Ok(())
}

async fn claims(b: &dyn Backend, log: Arc<dyn EventLog>, loc: &str) -> Result<(), String> {
    let case = "claims";
    let r = run("claimed");
    let other = b.reopen(loc).await.map_err(|e| fail(case, e))?;
    let t0 = 1_700_000_000_000i64;
    log.claim_run(&r, "node-a", t0, t0 + 10_000)
        .await
        .map_err(|e| fail(case, e))?;
    // The holder renews.
    log.claim_run(&r, "node-a", t0 + 5_000, t0 + 15_000)
        .await
        .map_err(|e| fail(case, e))?;
    let refused = other.claim_run(&r, "node-b", t0 + 6_000, t0 + 16_000).await;
    if !b.shared() {
        // One process owns this log (its runs' file locks do this job): every claim is granted.
        check!(
            case,
            refused.is_ok(),
            "an unshared backend refused a claim: {refused:?}"
        );
        return Ok(());
    }
    match refused {
        Err(LogError::Claimed {
            holder,
            until_unix_ms,
            ..
        }) => {
            check!(
                case,
                holder == "node-a" && until_unix_ms == t0 + 15_000,
                "refusal named {holder} until {until_unix_ms}"
            );
        }
        other => {
            return Err(fail(
                case,
                format!("a live claim was taken over: {other:?}"),
            ));
        }
    }
    // A lapsed claim (its node died) can be taken over; then the old holder is refused.
    other
        .claim_run(&r, "node-b", t0 + 15_001, t0 + 25_000)
        .await
        .map_err(|e| fail(case, format!("taking over a lapsed claim: {e}")))?;
    let back = log.claim_run(&r, "node-a", t0 + 16_000, t0 + 26_000).await;
    check!(
        case,
        matches!(back, Err(LogError::Claimed { .. })),
        "the old holder got it back: {back:?}"
    );
    // Releasing lets another take it at once; releasing what one does not hold does nothing.
    log.release_run(&r, "node-a")
        .await
        .map_err(|e| fail(case, e))?;
    let still = log.claim_run(&r, "node-a", t0 + 16_500, t0 + 26_000).await;
    check!(
        case,
        still.is_err(),
        "a release by a non-holder freed the claim"
    );
    other
        .release_run(&r, "node-b")
        .await
        .map_err(|e| fail(case, e))?;
    log.claim_run(&r, "node-a", t0 + 17_000, t0 + 27_000)
        .await
        .map_err(|e| fail(case, format!("claiming a released run: {e}")))?;
    // Claims of different runs are independent.
    other
        .claim_run(&run("another"), "node-b", t0 + 17_000, t0 + 27_000)
        .await
        .map_err(|e| fail(case, e))?;
    Ok(())
}

/// A copy into this backend, and from it into an embedded log, keeps every event hash, every
/// position, every blob, the roots and the checkpoints.
async fn migrate_both_ways(_: &dyn Backend, log: Arc<dyn EventLog>, _: &str) -> Result<(), String> {
    let case = "migrate_both_ways";
    let dir = tempfile_dir().map_err(|e| fail(case, e))?;
    let source: Arc<dyn EventLog> = Arc::new(
        crate::sqlite::SqliteLog::create(&dir.join("source.db")).map_err(|e| fail(case, e))?,
    );
    let ledger = Ledger::new(source.clone(), StepClock::new());
    let signer = NoteSigner::generate("ice.test/migrate").map_err(|e| fail(case, e))?;
    for k in 0..4u64 {
        let r = run(&format!("m-{k}"));
        ledger
            .append(&r, opening())
            .await
            .map_err(|e| fail(case, e))?;
        let mut d = vec![step(k)];
        if k == 2 {
            d.push(
                Draft::new("InferenceStep", Origin::Agent("conformance".into()))
                    .intent("long")
                    .payload(json!({"output": "y".repeat(20_000)})),
            );
        }
        ledger.append(&r, d).await.map_err(|e| fail(case, e))?;
        let size = source.size().await.map_err(|e| fail(case, e))?;
        let root = root_at(source.as_ref(), size)
            .await
            .map_err(|e| fail(case, e))?;
        let note = Checkpoint {
            origin: signer.name().into(),
            size,
            root,
        }
        .sign(&signer)
        .map_err(|e| fail(case, e))?;
        source
            .add_checkpoint(StoredCheckpoint { size, note })
            .await
            .map_err(|e| fail(case, e))?;
    }
    let report = crate::migrate::copy_log(source.as_ref(), log.as_ref(), |_| {})
        .await
        .map_err(|e| fail(case, e))?;
    check!(
        case,
        report.events == 21 && report.checkpoints == 4 && report.blobs == 1,
        "{report:?}"
    );
    let a = source.scan(0, 1000).await.map_err(|e| fail(case, e))?;
    let b = log.scan(0, 1000).await.map_err(|e| fail(case, e))?;
    check!(case, a == b, "the copy's events differ from the source's");
    let n = a.len() as u64;
    let (ra, rb) = (
        root_at(source.as_ref(), n)
            .await
            .map_err(|e| fail(case, e))?,
        root_at(log.as_ref(), n).await.map_err(|e| fail(case, e))?,
    );
    check!(case, ra == rb, "roots differ");
    let v = verify(log.as_ref(), Some(&signer.verifier()), |_| {})
        .await
        .map_err(|e| fail(case, e))?;
    check!(
        case,
        v.ok() && v.checkpoints_verified == 4 && v.blobs_checked == 1,
        "verify of the copy: {v:?}"
    );
    // A second copy into a non-empty log is refused and changes nothing.
    let again = crate::migrate::copy_log(source.as_ref(), log.as_ref(), |_| {}).await;
    check!(
        case,
        again.is_err(),
        "a copy into a non-empty log was accepted"
    );
    // And back out into a fresh embedded log.
    let back: Arc<dyn EventLog> = Arc::new(
        crate::sqlite::SqliteLog::create(&dir.join("back.db")).map_err(|e| fail(case, e))?,
    );
    crate::migrate::copy_log(log.as_ref(), back.as_ref(), |_| {})
        .await
        .map_err(|e| fail(case, e))?;
    let c = back.scan(0, 1000).await.map_err(|e| fail(case, e))?;
    check!(case, c == a, "the copy back differs");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A fresh scratch directory under the system's temporary directory.
fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    let d = std::env::temp_dir().join(format!("ice-conformance-{}", hex::encode(b)));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
