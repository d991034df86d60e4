//! Concurrent appenders (spec §10): nothing is lost, nothing duplicated, every run's chain stays
//! intact, and two writers racing for one run position never fork it: exactly one wins.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use common::*;
use ice_kernel::{Blob, Digest, Draft, NoOtherRuns, RunHead, Timestamp};
use ice_log::ledger::{AppendError, Ledger, read_whole_run};
use ice_log::{EventLog, LogError};
use serde_json::json;

const RUNS: usize = 24;
const EVENTS_PER_RUN: usize = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn many_tasks_on_many_runs_lose_and_duplicate_nothing() {
    let fx = Fixture::new();
    let ledger = Arc::new(fx.ledger);
    let mut tasks = Vec::new();
    for r in 0..RUNS {
        let ledger = ledger.clone();
        tasks.push(tokio::spawn(async move {
            let run = run_id(&format!("conc-{r}"));
            let mut hashes = Vec::new();
            let mut receipts = Vec::new();
            let mut drafts: Vec<Draft> = opening();
            drafts.extend((0..EVENTS_PER_RUN).map(|i| working((i + r) as u8, i as u64)));
            drafts.extend(closing());
            // One event per append, so the writer sees as many concurrent requests as possible.
            for d in drafts {
                let (receipt, batch) = ledger.append(&run, vec![d]).await.expect("append");
                hashes.push(batch.events()[0].event().hash);
                receipts.push(receipt);
            }
            (run, hashes, receipts)
        }));
    }
    let mut acked: BTreeMap<_, Vec<Digest>> = BTreeMap::new();
    let mut positions = Vec::new();
    for t in tasks {
        let (run, hashes, receipts) = t.await.unwrap();
        for r in receipts {
            assert_eq!(r.count, 1);
            positions.push(r.first_log_seq);
        }
        acked.insert(run, hashes);
    }
    let per_run = 4 + EVENTS_PER_RUN + 5;
    let total = (RUNS * per_run) as u64;
    // Every receipt names a distinct position, and together they are exactly 0..total.
    positions.sort_unstable();
    assert_eq!(positions, (0..total).collect::<Vec<_>>());
    let log = ledger.log().as_ref();
    assert_eq!(log.size().await.unwrap(), total);
    // Each run holds exactly the events its task was told were appended, in order.
    for (run, hashes) in &acked {
        let stored = read_whole_run(log, run).await.unwrap();
        let got: Vec<Digest> = stored
            .iter()
            .map(|s| Digest(s.hash.as_slice().try_into().unwrap()))
            .collect();
        assert_eq!(&got, hashes, "run {run}");
        assert_eq!(stored.last().unwrap().event_type, "RunTerminated");
    }
    let all = all_events(log).await;
    let unique: HashSet<_> = all.iter().map(|s| s.hash.clone()).collect();
    assert_eq!(unique.len() as u64, total, "an event was stored twice");
    let r = assert_verifies(log).await;
    assert_eq!((r.events, r.runs), (total, RUNS as u64));
}

/// Several writers share each run, each with its own ledger (and so its own idea of the run's
/// head): they conflict, retry, and in the end every event is in the run exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn writers_sharing_runs_conflict_retry_and_keep_every_chain_whole() {
    const SHARED_RUNS: usize = 4;
    const WRITERS_PER_RUN: usize = 4;
    const EVENTS_PER_WRITER: usize = 15;
    let fx = Fixture::new();
    let clock = Arc::new(TestClock::new());
    for r in 0..SHARED_RUNS {
        fx.ledger
            .append(&run_id(&format!("shared-{r}")), opening())
            .await
            .unwrap();
    }
    let mut tasks = Vec::new();
    for r in 0..SHARED_RUNS {
        for w in 0..WRITERS_PER_RUN {
            let ledger = Ledger::new(fx.log.clone(), clock.clone());
            tasks.push(tokio::spawn(async move {
                let run = run_id(&format!("shared-{r}"));
                let mut conflicts = 0u32;
                for i in 0..EVENTS_PER_WRITER {
                    let mut tries = 0;
                    loop {
                        let d = Draft::new("InferenceStep", agent())
                            .intent("think")
                            .payload(json!({"writer": w, "i": i}));
                        match ledger.append(&run, vec![d]).await {
                            Ok(_) => break,
                            Err(AppendError::Log(LogError::Conflict { .. })) => {
                                conflicts += 1;
                                tries += 1;
                                assert!(tries < 10_000, "writer {w} of run {r} never got through");
                                tokio::task::yield_now().await;
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
    let log = fx.log();
    for r in 0..SHARED_RUNS {
        let stored = read_whole_run(log, &run_id(&format!("shared-{r}")))
            .await
            .unwrap();
        assert_eq!(stored.len(), 4 + WRITERS_PER_RUN * EVENTS_PER_WRITER);
        let mut seen = HashSet::new();
        for s in &stored[4..] {
            let e = s.event().unwrap();
            let key = (e.payload["writer"].clone(), e.payload["i"].clone());
            assert!(seen.insert(key.to_owned()), "duplicate {key:?} in run {r}");
        }
    }
    assert_verifies(log).await;
    eprintln!("{conflicts} conflicts were retried");
}

fn at(us: i64) -> Timestamp {
    Timestamp::from_unix_us(T0_US + us).unwrap()
}

/// Two batches sealed from the same head race for the same run position, many times over:
/// exactly one is stored, the other gets `Conflict` and leaves nothing, not even its blob.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_appenders_racing_for_one_position_exactly_one_wins() {
    let fx = Fixture::new();
    let run = run_id("race");
    let (_, opened) = fx.ledger.append(&run, opening()).await.unwrap();
    let mut head = RunHead::new(run.clone());
    for e in opened.events() {
        head.admit(e.event().clone(), &NoOtherRuns).unwrap();
    }
    let log = fx.log.clone();
    let big = |who: &str, round: u64| {
        Draft::new("InferenceStep", agent())
            .intent("think")
            .payload(json!({
                "who": who,
                // Over the blob threshold: the loser's blob must not be stored either.
                "output": format!(
                    "{who}{round}{}",
                    "x".repeat(ice_kernel::limits::BLOB_FIELD_THRESHOLD_BYTES)
                ),
            }))
    };
    let mut wins = [0u32; 2];
    for round in 0..40u64 {
        let size_before = log.size().await.unwrap();
        let t = at(1_000_000 + round as i64);
        let mut ha = head.clone();
        let mut hb = head.clone();
        let a = ha
            .seal_batch(vec![big("a", round)], t, &NoOtherRuns)
            .unwrap();
        let b = hb
            .seal_batch(vec![big("b", round)], t, &NoOtherRuns)
            .unwrap();
        assert_eq!((a.first_seq(), a.prev()), (b.first_seq(), b.prev()));
        let blob = |x: &ice_kernel::SealedBatch| -> Blob { x.blobs()[0].clone() };
        let (blob_a, blob_b) = (blob(&a), blob(&b));
        let (la, lb) = (log.clone(), log.clone());
        let (ra, rb) = tokio::join!(
            tokio::spawn(async move { la.append(a).await }),
            tokio::spawn(async move { lb.append(b).await })
        );
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        let (winner, loser, loser_blob, winner_head, loser_result) = match (&ra, &rb) {
            (Ok(_), Err(_)) => (0, 1, blob_b, ha, rb),
            (Err(_), Ok(_)) => (1, 0, blob_a, hb, ra),
            _ => panic!("round {round}: expected exactly one winner, got {ra:?} and {rb:?}"),
        };
        wins[winner] += 1;
        match loser_result {
            Err(LogError::Conflict {
                expected, actual, ..
            }) => {
                assert_eq!(expected, head.next_seq, "loser {loser}");
                assert_eq!(actual, head.next_seq + 1, "loser {loser}");
            }
            other => panic!("round {round}: the loser got {other:?}, not a conflict"),
        }
        assert_eq!(log.size().await.unwrap(), size_before + 1);
        assert_eq!(log.blob(&loser_blob.digest).await.unwrap(), None);
        let stored = log
            .get(&ice_kernel::EventId::new(run.clone(), head.next_seq))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.hash, winner_head.last_hash.0.to_vec());
        head = winner_head;
    }
    assert_verifies(log.as_ref()).await;
    eprintln!("wins: a {}, b {}", wins[0], wins[1]);
}

/// The same race through two ledgers: the one that loses is told so, and its next append
/// (its cached head brought up to date) succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn a_ledger_that_loses_a_race_reloads_and_continues() {
    let fx = Fixture::new();
    let run = run_id("two-ledgers");
    let clock = Arc::new(TestClock::new());
    let l1 = Ledger::new(fx.log.clone(), clock.clone());
    let l2 = Ledger::new(fx.log.clone(), clock.clone());
    l1.append(&run, opening()).await.unwrap();
    // Both ledgers now cache the head at run_seq 4.
    assert_eq!(l2.head(&run).await.unwrap().next_seq, 4);
    l1.append(&run, vec![working(0, 1)]).await.unwrap();
    // Pinned to the position it knew, l2's batch conflicts and nothing is written.
    let err = l2
        .append_at(&run, 4, vec![working(0, 2)])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            AppendError::Log(LogError::Conflict {
                expected: 4,
                actual: 5,
                ..
            })
        ),
        "{err:?}"
    );
    assert_eq!(fx.log().size().await.unwrap(), 5);
    let (r, _) = l2.append(&run, vec![working(0, 2)]).await.unwrap();
    assert_eq!(r.first_log_seq, 5);
    assert_eq!(l2.head(&run).await.unwrap().next_seq, 6);
    // Not pinned, a batch sealed on a stale head is sealed again after the other writer's
    // events (the ledger retries the conflict): l2 still believes the run ends at 6.
    l1.append(&run, vec![working(0, 3)]).await.unwrap();
    assert_eq!(
        l2.head(&run).await.unwrap().next_seq,
        6,
        "l2's head is stale"
    );
    let (r, batch) = l2.append(&run, vec![working(0, 4)]).await.unwrap();
    assert_eq!(r.first_log_seq, 7);
    assert_eq!(batch.events()[0].event().run_seq, 7);
    assert_verifies(fx.log()).await;
}

/// Verification while others append checks the log as it was when it started: it never reports
/// the events (or tree nodes) appended meanwhile as a problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verifying_while_others_append_never_reports_a_false_problem() {
    let fx = Fixture::new();
    let ledger = Arc::new(fx.ledger);
    let writer = {
        let ledger = ledger.clone();
        tokio::spawn(async move {
            for r in 0..40 {
                let run = run_id(&format!("busy-{r}"));
                let mut drafts: Vec<Draft> = opening();
                drafts.extend((0..20).map(|i| working(i as u8, i as u64)));
                drafts.extend(closing());
                for d in drafts {
                    ledger.append(&run, vec![d]).await.expect("append");
                }
            }
        })
    };
    let mut checks = 0;
    while !writer.is_finished() {
        let report = verify_log(ledger.log().as_ref()).await;
        assert!(report.failure.is_none(), "{:?}", report.failure);
        checks += 1;
    }
    writer.await.unwrap();
    assert!(checks > 1, "verification ran while appends went on");
    assert_verifies(ledger.log().as_ref()).await;
}

/// A log that notes where each `read_run` starts, and whose store a test can swap.
struct Reads {
    inner: std::sync::Mutex<Arc<dyn EventLog>>,
    from: std::sync::Mutex<Vec<u64>>,
}

impl Reads {
    fn new(inner: Arc<dyn EventLog>) -> Reads {
        Reads {
            inner: std::sync::Mutex::new(inner),
            from: Default::default(),
        }
    }

    fn log(&self) -> Arc<dyn EventLog> {
        self.inner.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl EventLog for Reads {
    async fn append(
        &self,
        batch: ice_kernel::SealedBatch,
    ) -> Result<ice_log::AppendReceipt, LogError> {
        self.log().append(batch).await
    }
    async fn read_run(
        &self,
        run_id: &ice_kernel::RunId,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<ice_log::StoredEvent>, LogError> {
        self.from.lock().unwrap().push(from_seq);
        self.log().read_run(run_id, from_seq, limit).await
    }
    async fn scan(
        &self,
        from_log_seq: u64,
        limit: usize,
    ) -> Result<Vec<ice_log::StoredEvent>, LogError> {
        self.log().scan(from_log_seq, limit).await
    }
    async fn scan_page(
        &self,
        from_log_seq: u64,
        limit: usize,
        nodes: bool,
        reuse: ice_log::EventPage,
    ) -> Result<ice_log::EventPage, LogError> {
        self.log()
            .scan_page(from_log_seq, limit, nodes, reuse)
            .await
    }
    async fn get(
        &self,
        id: &ice_kernel::EventId,
    ) -> Result<Option<ice_log::StoredEvent>, LogError> {
        self.log().get(id).await
    }
    async fn size(&self) -> Result<u64, LogError> {
        self.log().size().await
    }
    async fn runs(&self, offset: u64, limit: usize) -> Result<Vec<ice_kernel::RunId>, LogError> {
        self.log().runs(offset, limit).await
    }
    async fn runs_newest_first(
        &self,
        offset: u64,
        limit: usize,
    ) -> Result<Vec<ice_kernel::RunId>, LogError> {
        self.log().runs_newest_first(offset, limit).await
    }
    async fn run_count(&self) -> Result<u64, LogError> {
        self.log().run_count().await
    }
    async fn existing(
        &self,
        ids: &[ice_kernel::EventId],
    ) -> Result<HashSet<ice_kernel::EventId>, LogError> {
        self.log().existing(ids).await
    }
    async fn blob(&self, digest: &Digest) -> Result<Option<Vec<u8>>, LogError> {
        self.log().blob(digest).await
    }
    async fn nodes(&self, ids: &[ice_log::NodeId]) -> Result<Vec<Digest>, LogError> {
        self.log().nodes(ids).await
    }
    fn tree_floor(&self) -> u8 {
        self.log().tree_floor()
    }
    async fn scan_nodes(
        &self,
        from_leaf: u64,
        leaves: u64,
    ) -> Result<Vec<(ice_log::NodeId, Option<Digest>)>, LogError> {
        self.log().scan_nodes(from_leaf, leaves).await
    }
    async fn extent(&self) -> Result<Option<ice_log::Extent>, LogError> {
        self.log().extent().await
    }
    async fn altered_blob(&self) -> Result<Option<String>, LogError> {
        self.log().altered_blob().await
    }
    async fn index_problem(&self) -> Result<Option<String>, LogError> {
        self.log().index_problem().await
    }
    async fn add_checkpoint(&self, checkpoint: ice_log::StoredCheckpoint) -> Result<(), LogError> {
        self.log().add_checkpoint(checkpoint).await
    }
    async fn checkpoints(&self) -> Result<Vec<ice_log::StoredCheckpoint>, LogError> {
        self.log().checkpoints().await
    }
}

/// The probe's finding: an operator's kill of a run another process kept appending to failed
/// with a conflict 6 times in 8, because each of the ledger's retries folded the whole run
/// again (tens of thousands of events) and lost the race every time. A ledger that loses a
/// race now reads only what was appended since the head it had.
#[tokio::test(flavor = "multi_thread")]
async fn a_ledger_that_loses_a_race_reads_only_what_was_appended_since() {
    let fx = Fixture::new();
    let log = Arc::new(Reads::new(fx.log.clone()));
    let run = run_id("busy");
    let clock = Arc::new(TestClock::new());
    let driver = Ledger::new(log.clone(), clock.clone());
    let operator = Ledger::new(log.clone(), clock.clone());
    driver.append(&run, opening()).await.unwrap();
    for n in 0..40 {
        driver.append(&run, vec![working(0, n)]).await.unwrap();
    }
    // The operator's ledger reads the run once (from its start) and appends.
    operator.append(&run, vec![working(0, 100)]).await.unwrap();
    let known = operator.head(&run).await.unwrap().next_seq;
    assert_eq!(known, 45);
    // The driver goes on; the operator's head is stale by three events.
    for n in 0..3 {
        driver
            .append(&run, vec![working(0, 200 + n)])
            .await
            .unwrap();
    }
    log.from.lock().unwrap().clear();
    let (r, batch) = operator.append(&run, vec![working(0, 300)]).await.unwrap();
    assert_eq!(batch.events()[0].event().run_seq, 48);
    assert_eq!(r.first_log_seq, 48);
    let reads = log.from.lock().unwrap().clone();
    assert!(!reads.is_empty(), "the conflict was caught up on");
    assert!(
        reads.iter().all(|&from| from >= known),
        "the run was read again from before the head the ledger had: {reads:?}"
    );
    // A pinned append whose caller has seen more than the cached head catches up too.
    driver.append(&run, vec![working(0, 400)]).await.unwrap();
    log.from.lock().unwrap().clear();
    operator
        .append_at(&run, 50, vec![working(0, 500)])
        .await
        .unwrap();
    assert!(
        log.from.lock().unwrap().iter().all(|&from| from >= 49),
        "{:?}",
        log.from.lock().unwrap()
    );
    assert_verifies(fx.log()).await;
}

/// The second review's finding: after a lost race the ledger trusts its cached head as a
/// prefix of the run; when it is not (the store replaced under a running process), every
/// append failed the same way. A catch-up that cannot follow the cached head drops it, and the
/// next try folds the run afresh.
#[tokio::test(flavor = "multi_thread")]
async fn a_cached_head_that_is_not_the_runs_is_dropped_and_the_run_folded_again() {
    let first = Fixture::new();
    let second = Fixture::new();
    let run = run_id("replaced");
    let clock = Arc::new(TestClock::new());
    let log = Arc::new(Reads::new(first.log.clone()));
    let ledger = Ledger::new(log.clone(), clock.clone());
    ledger.append(&run, opening()).await.unwrap();
    // Another store holds the same run, as long, with other events (other times): the
    // cached head's position is the run's end there, but not its last hash.
    let other = Ledger::new(second.log.clone(), clock.clone());
    other.append(&run, opening()).await.unwrap();
    *log.inner.lock().unwrap() = second.log.clone();
    let (r, batch) = ledger.append(&run, vec![working(0, 1)]).await.unwrap();
    assert_eq!(batch.events()[0].event().run_seq, 4);
    assert_eq!(r.first_log_seq, 4);
    assert_verifies(second.log()).await;
}
