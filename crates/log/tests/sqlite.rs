//! The embedded SQLite backend through the `EventLog` interface and the ledger: what is
//! appended is read back exactly, in order, across reopenings; what the validator or the log
//! refuses leaves nothing behind.

mod common;

use std::sync::Arc;

use common::*;
use ice_kernel::{Draft, EventId, NoOtherRuns, Origin, RunHead, ValidationError};
use ice_log::ledger::{AppendError, Ledger, fold_run, read_whole_run};
use ice_log::merkle::{Frontier, leaf_hash};
use ice_log::sqlite::{Mode, SqliteLog};
use ice_log::{EventLog, LogError, StoredCheckpoint, root_at};
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn appended_events_read_back_exactly_in_run_and_log_order() {
    let fx = Fixture::new();
    let a = run_id("run-a");
    let b = run_id("run-b");
    let (ra, batch_a) = fx.ledger.append(&a, opening()).await.unwrap();
    assert_eq!((ra.first_log_seq, ra.count, ra.tree_size), (0, 4, 4));
    let (rb, batch_b) = fx.ledger.append(&b, full_run(&[0, 1, 2])).await.unwrap();
    assert_eq!((rb.first_log_seq, rb.count, rb.tree_size), (4, 12, 16));
    let (rc, batch_c) = fx
        .ledger
        .append(&a, vec![working(0, 1), working(4, 2)])
        .await
        .unwrap();
    assert_eq!((rc.first_log_seq, rc.tree_size), (16, 18));
    assert_eq!(fx.log().size().await.unwrap(), 18);

    // Run order: each run's events, as sealed, with their canonical bodies.
    let stored_a = read_whole_run(fx.log(), &a).await.unwrap();
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
    // Log order: positions 0..n with no gaps, and a page boundary in the middle.
    let all = all_events(fx.log()).await;
    assert_eq!(
        all.iter().map(|s| s.log_seq).collect::<Vec<_>>(),
        (0..18).collect::<Vec<_>>()
    );
    let page = fx.log().scan(5, 3).await.unwrap();
    assert_eq!(page, all[5..8].to_vec());
    assert!(fx.log().scan(18, 10).await.unwrap().is_empty());
    let part = fx.log().read_run(&b, 10, 100).await.unwrap();
    assert_eq!(part.len(), 2);
    assert_eq!(part[0].run_seq, 10);
    assert_eq!(
        part[0].event().unwrap(),
        batch_b.events()[10].event().clone()
    );

    // Lookup by id, runs in order of first appearance, existence.
    let id = EventId::new(b.clone(), 3);
    assert_eq!(fx.log().get(&id).await.unwrap().unwrap().log_seq, 7);
    assert_eq!(
        fx.log().get(&EventId::new(b.clone(), 12)).await.unwrap(),
        None
    );
    assert_eq!(
        fx.log().runs(0, 10).await.unwrap(),
        vec![a.clone(), b.clone()]
    );
    assert_eq!(fx.log().runs(1, 10).await.unwrap(), vec![b.clone()]);
    let missing = EventId::new(run_id("nope"), 0);
    let found = fx
        .log()
        .existing(&[id.clone(), missing.clone()])
        .await
        .unwrap();
    assert!(found.contains(&id) && !found.contains(&missing));

    // The stored tree is the RFC 6962 tree over the event hashes, in log order.
    let mut f = Frontier::new();
    for s in &all {
        f.push(leaf_hash(&s.hash));
    }
    assert_eq!(root_at(fx.log(), 18).await.unwrap(), f.root());
    let r = assert_verifies(fx.log()).await;
    assert_eq!((r.events, r.runs), (18, 2));
    assert_eq!(r.root, f.root().to_hex());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reopened_log_holds_everything_and_continues_the_same_tree() {
    let fx = Fixture::new();
    let a = run_id("a");
    fx.ledger.append(&a, opening()).await.unwrap();
    for i in 0..5 {
        fx.ledger
            .append(&a, vec![working(i, i as u64)])
            .await
            .unwrap();
    }
    let before = all_events(fx.log()).await;
    let (_dir, path) = fx.close();

    let log = Arc::new(SqliteLog::open(&path, Mode::ReadWrite).unwrap());
    assert_eq!(all_events(log.as_ref()).await, before);
    // A new ledger folds the run's head from the log and continues its chain.
    let ledger = ice_log::ledger::Ledger::new(log.clone(), Arc::new(TestClock::new()));
    let head = ledger.head(&a).await.unwrap();
    assert_eq!(head.next_seq, 9);
    assert_eq!(head.last_hash.0.to_vec(), before[8].hash);
    let (r, _) = ledger.append(&a, closing()).await.unwrap();
    assert_eq!((r.first_log_seq, r.tree_size), (9, 14));
    // The writer's tree frontier was rebuilt from the stored nodes: the tree is still right.
    let all = all_events(log.as_ref()).await;
    let mut f = Frontier::new();
    for s in &all {
        f.push(leaf_hash(&s.hash));
    }
    assert_eq!(root_at(log.as_ref(), 14).await.unwrap(), f.root());
    assert_verifies(log.as_ref()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rejected_draft_appends_nothing_of_its_batch() {
    let fx = Fixture::new();
    let a = run_id("a");
    fx.ledger.append(&a, opening()).await.unwrap();
    // The third draft breaks the origin law: the two before it must not be written either.
    let drafts = vec![
        working(0, 1),
        working(3, 2),
        Draft::new("RunCommitted", agent()),
        working(0, 3),
    ];
    let err = fx.ledger.append(&a, drafts).await.unwrap_err();
    assert!(
        matches!(
            err,
            AppendError::Rejected {
                index: 2,
                error: ValidationError::OriginForbidden { .. }
            }
        ),
        "{err:?}"
    );
    assert_eq!(fx.log().size().await.unwrap(), 4);
    // A cause that does not exist is refused by name.
    let ghost = EventId::new(run_id("ghost"), 0);
    let err = fx
        .ledger
        .append(&a, vec![working(0, 4).cause(ghost.clone())])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, AppendError::Rejected { error: ValidationError::UnknownCause { cause }, .. } if *cause == ghost),
        "{err:?}"
    );
    // A cause in another run that does exist is accepted.
    let b = run_id("b");
    fx.ledger.append(&b, opening()).await.unwrap();
    let cause = EventId::new(b.clone(), 3);
    let (_, batch) = fx
        .ledger
        .append(&a, vec![working(0, 5).cause(cause.clone())])
        .await
        .unwrap();
    assert_eq!(batch.events()[0].event().causes, vec![cause]);
    assert_eq!(fx.log().size().await.unwrap(), 9);
    assert_verifies(fx.log()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_log_refuses_writes() {
    let fx = Fixture::new();
    let a = run_id("a");
    let (_, batch) = fx.ledger.append(&a, opening()).await.unwrap();
    let (_dir, path) = fx.close();
    let ro = open_ro(&path);
    let mut head = RunHead::new(a.clone());
    for e in batch.events() {
        head.admit(e.event().clone(), &NoOtherRuns).unwrap();
    }
    let next = head
        .seal_batch(
            vec![working(0, 0)],
            ice_kernel::Timestamp::from_unix_us(T0_US * 2).unwrap(),
            &NoOtherRuns,
        )
        .unwrap();
    assert_eq!(ro.append(next).await, Err(LogError::ReadOnly));
    assert_eq!(
        ro.add_checkpoint(StoredCheckpoint {
            size: 1,
            note: "x".into()
        })
        .await,
        Err(LogError::ReadOnly)
    );
    assert_eq!(ro.size().await.unwrap(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn create_refuses_an_existing_file_and_keeps_it() {
    let fx = Fixture::new();
    fx.ledger.append(&run_id("a"), opening()).await.unwrap();
    let (_dir, path) = fx.close();
    let bytes = std::fs::read(&path).unwrap();
    match SqliteLog::create(&path) {
        Err(LogError::Invalid(m)) => assert!(m.contains("already exists"), "{m}"),
        Err(e) => panic!("unexpected error {e:?}"),
        Ok(_) => panic!("created over an existing log"),
    }
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
}

#[tokio::test(flavor = "multi_thread")]
async fn checkpoints_are_stored_once_per_size_and_never_beyond_the_log() {
    let fx = Fixture::new();
    fx.ledger.append(&run_id("a"), opening()).await.unwrap();
    let cp = |size: u64, note: &str| StoredCheckpoint {
        size,
        note: note.into(),
    };
    assert!(matches!(
        fx.log().add_checkpoint(cp(5, "too far")).await,
        Err(LogError::Invalid(_))
    ));
    fx.log().add_checkpoint(cp(4, "four")).await.unwrap();
    // The same note again is a no-op; another note for the same size is refused.
    fx.log().add_checkpoint(cp(4, "four")).await.unwrap();
    assert!(matches!(
        fx.log().add_checkpoint(cp(4, "other")).await,
        Err(LogError::Invalid(_))
    ));
    fx.log().add_checkpoint(cp(2, "two")).await.unwrap();
    assert_eq!(
        fx.log().checkpoints().await.unwrap(),
        vec![cp(2, "two"), cp(4, "four")]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_rebuilds_the_live_projections_and_the_ledger_heads() {
    let fx = Fixture::new();
    let runs: Vec<_> = (0..3).map(|i| run_id(&format!("r{i}"))).collect();
    let mut live = std::collections::BTreeMap::new();
    for (i, r) in runs.iter().enumerate() {
        let mut drafts = opening();
        if i != 1 {
            drafts.extend((0..7).map(|k| working(k, k as u64)));
            drafts.extend(closing());
        }
        let (_, batch) = fx.ledger.append(r, drafts).await.unwrap();
        let view = live
            .entry(r.clone())
            .or_insert_with(|| ice_kernel::RunView::new(r.clone()));
        for e in batch.events() {
            ice_kernel::Projection::apply(view, e.event()).unwrap();
        }
    }
    let replayed = replay(fx.log()).await;
    assert_eq!(replayed, live);
    for r in &runs {
        assert_eq!(fold_run(fx.log(), r).await.unwrap(), live[r]);
        assert_eq!(fx.ledger.head(r).await.unwrap(), live[r].head);
    }
    assert_eq!(
        live[&runs[0]].summary.state,
        ice_kernel::RunState::Terminated
    );
    assert_eq!(
        live[&runs[1]].summary.state,
        ice_kernel::RunState::Executing
    );
    // A runtime event appended for the agent is refused by the law, not by the log.
    let err = fx
        .ledger
        .append(
            &runs[1],
            vec![Draft::new("FileWritten", Origin::Runtime).payload(json!({}))],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, AppendError::Rejected { index: 0, .. }),
        "{err:?}"
    );
}

/// Two writers on one file (two `ice` processes on one home): each continues from the log as
/// the other left it, nothing forks, and the log verifies.
#[tokio::test(flavor = "multi_thread")]
async fn two_writers_on_one_file_take_turns_without_forking() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    drop(SqliteLog::create(&path).unwrap());
    let a = Arc::new(SqliteLog::open(&path, Mode::ReadWrite).unwrap());
    let b = Arc::new(SqliteLog::open(&path, Mode::ReadWrite).unwrap());
    let la = Ledger::new(a.clone(), Arc::new(ice_log::clock::SystemClock));
    let lb = Ledger::new(b.clone(), Arc::new(ice_log::clock::SystemClock));
    let (ra, rb) = (
        ice_kernel::RunId::new("writer-a").unwrap(),
        ice_kernel::RunId::new("writer-b").unwrap(),
    );
    let open = || {
        ["RunProvisioned", "ContextResolved", "ExecutionWindowOpened"]
            .map(|t| ice_kernel::Draft::new(t, ice_kernel::Origin::Runtime))
            .to_vec()
    };
    la.append(&ra, open()).await.unwrap();
    lb.append(&rb, open()).await.unwrap();
    for i in 0..20 {
        let step = |run: &str| {
            ice_kernel::Draft::new("TaskStarted", ice_kernel::Origin::Runtime)
                .payload(serde_json::json!({"run": run, "i": i}))
        };
        let ra_receipt = la.append(&ra, vec![step("a")]).await.unwrap().0;
        let rb_receipt = lb.append(&rb, vec![step("b")]).await.unwrap().0;
        assert_eq!(rb_receipt.first_log_seq, ra_receipt.first_log_seq + 1);
    }
    assert_eq!(a.size().await.unwrap(), 46);
    let report = ice_log::verify::verify(b.as_ref(), None, |_| {})
        .await
        .unwrap();
    assert!(report.ok(), "{:?}", report.failure);
    assert_eq!(report.events, 46);
}

/// The probe's finding: while another process held the file's write lock past the busy
/// timeout, an append failed with "the log writer has stopped" (its request was dropped
/// unanswered), which reads as a dead server. It fails with SQLite's own reason, and the
/// writer goes on once the lock is released.
#[tokio::test(flavor = "multi_thread")]
async fn an_append_blocked_by_another_process_says_why_and_the_writer_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("locked.db");
    drop(SqliteLog::create(&path).unwrap());
    let log = Arc::new(SqliteLog::open(&path, Mode::ReadWrite).unwrap());
    let ledger = Ledger::new(log.clone(), Arc::new(ice_log::clock::SystemClock));
    let run = ice_kernel::RunId::new("blocked").unwrap();
    let open = || {
        ["RunProvisioned", "ContextResolved", "ExecutionWindowOpened"]
            .map(|t| ice_kernel::Draft::new(t, ice_kernel::Origin::Runtime))
            .to_vec()
    };
    let holder = rusqlite::Connection::open(&path).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    let err = ledger.append(&run, open()).await.unwrap_err().to_string();
    assert!(
        !err.contains("has stopped") && err.contains("locked"),
        "{err}"
    );
    holder.execute_batch("ROLLBACK").unwrap();
    ledger.append(&run, open()).await.unwrap();
    assert_eq!(log.size().await.unwrap(), 3);
}

/// A log of the first format, `ice-log/1` (every tree node stored, leaves included; no log
/// links, no head record), as an earlier `ice` wrote it: the quickstart's runaway run, 63
/// events, and a checkpoint it signed at 63. It still opens read-only, verifies against its
/// signed checkpoint, proves an event; opened to write, it takes appends in its own format and
/// still verifies, under a new checkpoint consistent with the old one.
#[tokio::test(flavor = "multi_thread")]
async fn a_log_of_the_first_format_still_reads_verifies_proves_and_appends() {
    use ice_log::checkpoint::{Checkpoint, NoteSigner, NoteVerifier};
    let fixture = |f: &str| format!("{}/tests/fixtures/{f}", env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ice.db");
    std::fs::copy(fixture("ice-log-1.db"), &path).unwrap();
    let verifier = NoteVerifier::parse(
        std::fs::read_to_string(fixture("ice-log-1.pub"))
            .unwrap()
            .trim(),
    )
    .unwrap();

    let log = open_ro(&path);
    assert_eq!(log.tree_floor(), 0);
    let r = ice_log::verify::verify(&log, Some(&verifier), |_| {})
        .await
        .unwrap();
    assert!(r.ok(), "{:?}", r.failure);
    assert_eq!((r.events, r.checkpoints_verified), (63, 1));
    assert_eq!(
        r.tree_nodes_checked, 120,
        "every node of 63 leaves is stored"
    );
    let old = log.checkpoints().await.unwrap().pop().unwrap();
    let first = log
        .scan(0, 1)
        .await
        .unwrap()
        .remove(0)
        .event()
        .unwrap()
        .id();
    let proof = ice_log::proof::prove_inclusion(&log, &first, &old.note)
        .await
        .unwrap();
    proof.verify(&verifier).unwrap();
    drop(log);

    let log = Arc::new(SqliteLog::open(&path, Mode::ReadWrite).unwrap());
    let ledger = ice_log::ledger::Ledger::new(log.clone(), Arc::new(TestClock::new()));
    ledger.append(&run_id("later"), opening()).await.unwrap();
    let n = log.size().await.unwrap();
    assert_eq!(n, 63 + opening().len() as u64);
    // Its nodes are stored as the first format stores them: every one, leaves included.
    assert_eq!(
        log.scan_nodes(63, 100).await.unwrap().len() as u64,
        (64..=n)
            .map(|k| u64::from(k.trailing_zeros()) + 1)
            .sum::<u64>()
    );
    let signer = NoteSigner::parse(
        std::fs::read_to_string(fixture("ice-log-1.key"))
            .unwrap()
            .trim(),
    )
    .unwrap();
    let note = Checkpoint {
        origin: signer.name().into(),
        size: n,
        root: root_at(log.as_ref(), n).await.unwrap(),
    }
    .sign(&signer)
    .unwrap();
    log.add_checkpoint(StoredCheckpoint {
        size: n,
        note: note.clone(),
    })
    .await
    .unwrap();
    let r = ice_log::verify::verify(log.as_ref(), Some(&verifier), |_| {})
        .await
        .unwrap();
    assert!(r.ok(), "{:?}", r.failure);
    assert_eq!((r.events, r.checkpoints_verified), (n, 2));
    ice_log::proof::prove_consistency(log.as_ref(), &old.note, &note)
        .await
        .unwrap()
        .verify(&verifier)
        .unwrap();
    drop(ledger);
    drop(log);
    let meta: String = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("SELECT value FROM meta WHERE key = 'format'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(
        meta, "ice-log/1",
        "appending does not change a file's format"
    );
}

/// `append_at` writes only at the position the caller built its drafts for: once another
/// writer (here another ledger over the same log) has moved the run, it writes nothing and
/// says where the run is; folding again lets it continue.
#[tokio::test(flavor = "multi_thread")]
async fn append_at_writes_only_at_the_position_the_drafts_were_built_for() {
    let fx = Fixture::new();
    let run = run_id("at");
    let n = opening().len() as u64;
    let (r, _) = fx.ledger.append_at(&run, 0, opening()).await.unwrap();
    assert_eq!(r.count, n);
    // A position other than the run's end is refused before anything is sealed or written.
    for wrong in [0, n + 1] {
        match fx.ledger.append_at(&run, wrong, vec![working(0, 1)]).await {
            Err(AppendError::Log(LogError::Conflict {
                expected, actual, ..
            })) => assert_eq!((expected, actual), (wrong, n)),
            other => panic!("append_at({wrong}) on a run at {n}: {other:?}"),
        }
    }
    assert_eq!(fx.log().size().await.unwrap(), n);
    fx.ledger
        .append_at(&run, n, vec![working(0, 1)])
        .await
        .unwrap();
    // Another writer appends; this ledger's cached head is now behind the log, and the log
    // refuses the batch sealed on it.
    let other = ice_log::ledger::Ledger::new(fx.log.clone(), Arc::new(TestClock::new()));
    other.append(&run, vec![working(1, 2)]).await.unwrap();
    let refused = fx.ledger.append_at(&run, n + 1, vec![working(2, 3)]).await;
    assert!(
        matches!(refused, Err(AppendError::Log(LogError::Conflict { actual, .. })) if actual == n + 2),
        "{refused:?}"
    );
    // Built for the run's real end, the batch goes in (the stale head was dropped).
    let (r, batch) = fx
        .ledger
        .append_at(&run, n + 2, vec![working(2, 3)])
        .await
        .unwrap();
    assert_eq!((r.first_log_seq, batch.first_seq()), (n + 2, n + 2));
    // A caller whose view is behind this ledger's (an in-process writer got there first) is
    // refused by the ledger itself, before anything is sealed.
    match fx.ledger.append_at(&run, n + 2, vec![working(3, 4)]).await {
        Err(AppendError::Log(LogError::Conflict {
            expected, actual, ..
        })) => {
            assert_eq!((expected, actual), (n + 2, n + 3))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(fx.log().size().await.unwrap(), n + 3);
    assert!(verify_log(fx.log()).await.ok());
}

/// The file itself refuses, with the reason, statements that would rewrite or shrink the log
/// (a tool, a script or a person editing it by hand), and a refused statement changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn the_file_refuses_changes_that_rewrite_or_shrink_the_log() {
    let fx = Fixture::new();
    let a = run_id("a");
    fx.ledger.append(&a, opening()).await.unwrap();
    fx.ledger.append(&a, vec![working(0, 0)]).await.unwrap();
    let (_dir, path) = fx.close();
    let bytes_before = {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.query_row("SELECT size, last FROM head", [], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
        })
        .unwrap()
    };
    assert_eq!(bytes_before.0, 5);
    let c = rusqlite::Connection::open(&path).unwrap();
    for (sql, why) in [
        (
            "UPDATE head SET size = size - 1",
            "the event log only grows",
        ),
        ("DELETE FROM head", "the event log is append-only"),
        (
            "UPDATE events SET body = x'00' WHERE log_seq = 4",
            "the event log is append-only",
        ),
        (
            "DELETE FROM events WHERE log_seq = 4",
            "the event log is append-only",
        ),
    ] {
        match c.execute(sql, []) {
            Err(e) => assert!(e.to_string().contains(why), "{sql}: {e}"),
            Ok(n) => panic!("{sql} changed {n} row(s)"),
        }
        // Refused inside a transaction too, with nothing of it kept.
        c.execute_batch("BEGIN").unwrap();
        assert!(c.execute(sql, []).is_err(), "{sql}");
        c.execute_batch("COMMIT").unwrap();
    }
    let head = c
        .query_row("SELECT size, last FROM head", [], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
        })
        .unwrap();
    assert_eq!(head, bytes_before);
    drop(c);
    let log = open_ro(&path);
    let report = ice_log::verify::verify(&log, None, |_| {}).await.unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.events, 5);
    // A head that grows is what every append records.
    let rw = SqliteLog::open(&path, Mode::ReadWrite).unwrap();
    assert_eq!(rw.size().await.unwrap(), 5);
}

/// SQLite ends a transaction on its own after some errors (a full disk, an I/O error). A
/// request of the group that ran after that was written alone, outside the transaction, and
/// committed, while the group was answered as failed: the caller was told an append failed
/// that the log holds. Simulated with a trigger that rolls the whole transaction back when a
/// checkpoint is stored, in a group of a checkpoint and then an append.
#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_sqlite_ended_on_its_own_writes_nothing_more_of_the_group() {
    let fx = Fixture::new();
    fx.ledger.append(&run_id("a"), opening()).await.unwrap();
    let raw = rusqlite::Connection::open(&fx.path).unwrap();
    raw.execute_batch(
        "CREATE TRIGGER simulated_full BEFORE INSERT ON checkpoints
         BEGIN SELECT RAISE(ROLLBACK, 'simulated: database or disk is full'); END;",
    )
    .unwrap();
    // Hold the write lock. The first append commits in its caller's task and waits for the
    // lock; the second goes to the writer thread, which waits for the first; the next two
    // queue up behind them, and the writer takes them as one group.
    raw.execute_batch("BEGIN IMMEDIATE").unwrap();
    let ledger = Arc::new(Ledger::new(fx.log.clone(), Arc::new(TestClock::new())));
    let mut firsts = Vec::new();
    for r in ["first", "second"] {
        let l = Ledger::new(fx.log.clone(), Arc::new(TestClock::new()));
        firsts.push(tokio::spawn(async move {
            l.append(&run_id(r), opening()).await
        }));
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let checkpoint = {
        let log = fx.log.clone();
        tokio::spawn(async move {
            log.add_checkpoint(StoredCheckpoint {
                size: 1,
                note: "one".into(),
            })
            .await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    // A ledger of its own: one ledger's appends may wait for each other.
    let after = {
        let l = Ledger::new(fx.log.clone(), Arc::new(TestClock::new()));
        tokio::spawn(async move { l.append(&run_id("after"), opening()).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    raw.execute_batch("COMMIT").unwrap();
    for f in firsts {
        f.await.unwrap().unwrap();
    }
    let cp = checkpoint.await.unwrap();
    assert!(cp.is_err(), "{cp:?}");
    let after = after.await.unwrap();
    let stored = fx.log.read_run(&run_id("after"), 0, 100).await.unwrap();
    // What the caller was told is what the log holds: the group failed, nothing of it stored.
    let Err(e) = after else {
        panic!("the append after the rolled-back checkpoint was answered as stored");
    };
    assert!(
        stored.is_empty(),
        "answered {e}, yet {} event(s) stored",
        stored.len()
    );
    assert!(e.to_string().contains("rolled the transaction back"), "{e}");
    assert!(fx.log.checkpoints().await.unwrap().is_empty());
    // The writer goes on: the same append succeeds once the cause is gone.
    raw.execute_batch("DROP TRIGGER simulated_full").unwrap();
    ledger.append(&run_id("after"), opening()).await.unwrap();
    assert_verifies(fx.log()).await;
}

/// A run's head is folded from its stored events: if they do not chain (one's `prev` is not
/// the hash of the event before it: the log altered under the process), the fold and a
/// catch-up after another writer's append fail, naming the event, rather than a ledger
/// signing new events onto a history that is not the run's.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_whose_stored_events_do_not_chain_is_not_folded_or_appended_to() {
    let fx = Fixture::new();
    let a = run_id("a");
    fx.ledger.append(&a, opening()).await.unwrap();
    // Another writer (another process) appends; this ledger's cached head stays at 4.
    let other = Ledger::new(fx.log.clone(), Arc::new(TestClock::new()));
    other
        .append_at(&a, 4, vec![working(0, 0), working(1, 1)])
        .await
        .unwrap();
    // The first of those events is altered to name another event before it.
    let raw = tamper_connection(&fx.path);
    let body: Vec<u8> = raw
        .query_row(
            "SELECT body FROM events WHERE run_id = 'a' AND run_seq = 4",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let text = String::from_utf8(body).unwrap();
    let at = text.rfind(",\"prev\":\"").unwrap() + 9;
    let altered = format!("{}{}{}", &text[..at], "f".repeat(64), &text[at + 64..]);
    raw.execute(
        "UPDATE events SET body = ?1 WHERE run_id = 'a' AND run_seq = 4",
        [altered.into_bytes()],
    )
    .unwrap();
    let e = fold_run(fx.log(), &a).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("event a:4 does not follow its run's law: chain: prev is"),
        "{e}"
    );
    // The ledger that saw the run up to 4 catches up to append at 6: refused the same way.
    let e = fx
        .ledger
        .append_at(&a, 6, vec![working(2, 2)])
        .await
        .unwrap_err();
    assert!(e.to_string().contains("event a:4"), "{e}");
    assert_eq!(fx.log().size().await.unwrap(), 6);
}
