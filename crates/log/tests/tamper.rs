//! Property tests of tamper evidence (I-003) and replay: any valid history verifies
//! and replays to the live projections; any single-byte change, deleted event, swapped pair or
//! truncated tail of the stored log is detected by `verify`, which names the first affected
//! event.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use common::*;
use ice_kernel::{EventId, Projection, RunId, RunView};
use ice_log::checkpoint::{Checkpoint, NoteSigner};
use ice_log::ledger::fold_run;
use ice_log::verify::{Failure, verify, verify_with};
use ice_log::{StoredCheckpoint, root_at};
use proptest::prelude::*;
use rusqlite::params;

/// The shape of a generated history.
#[derive(Clone, Debug)]
struct Plan {
    /// Per run: the kinds of its working events, and whether it runs to TERMINATED.
    runs: Vec<(Vec<u8>, bool)>,
    /// Interleaving: each pick chooses a run with drafts left and a chunk length.
    picks: Vec<u16>,
    /// Whether a signed checkpoint covers the whole log.
    checkpoint: bool,
    /// The log's tree floor: 0 stores every node (leaves included), 2 some, 8 (the default)
    /// none in logs this small.
    floor: u8,
}

fn plan() -> impl Strategy<Value = Plan> {
    (
        prop::collection::vec((prop::collection::vec(0u8..7, 0..6), any::<bool>()), 1..5),
        prop::collection::vec(any::<u16>(), 0..30),
        any::<bool>(),
        prop::sample::select(vec![0u8, 2, ice_log::sqlite::DEFAULT_TREE_FLOOR]),
    )
        .prop_map(|(runs, picks, checkpoint, floor)| Plan {
            runs,
            picks,
            checkpoint,
            floor,
        })
}

/// Where to damage the stored log; each seed is reduced modulo what it indexes.
#[derive(Clone, Debug)]
struct Damage {
    at: u64,
    other: u64,
    byte: u64,
    xor: u8,
}

fn damage() -> impl Strategy<Value = Damage> {
    (any::<u64>(), any::<u64>(), any::<u64>(), 1u8..=255).prop_map(|(at, other, byte, xor)| {
        Damage {
            at,
            other,
            byte,
            xor,
        }
    })
}

fn signer() -> NoteSigner {
    NoteSigner::from_seed("ice.test/tamper", [3u8; 32]).unwrap()
}

/// What building a history leaves: the closed log file and what the live side saw.
struct Built {
    _dir: tempfile::TempDir,
    path: PathBuf,
    size: u64,
    live: BTreeMap<RunId, RunView>,
}

async fn build(plan: &Plan) -> Built {
    let fx = Fixture::with_tree_floor(plan.floor);
    let ids: Vec<RunId> = (0..plan.runs.len())
        .map(|i| run_id(&format!("run-{i}")))
        .collect();
    let mut pending: Vec<std::collections::VecDeque<ice_kernel::Draft>> = plan
        .runs
        .iter()
        .map(|(kinds, close)| {
            let mut d = opening();
            d.extend(kinds.iter().enumerate().map(|(i, k)| working(*k, i as u64)));
            if *close {
                d.extend(closing());
            }
            d.into()
        })
        .collect();
    let mut live: BTreeMap<RunId, RunView> = BTreeMap::new();
    let mut appended: Vec<EventId> = Vec::new();
    let picks = plan.picks.iter().copied().chain(std::iter::repeat(0));
    for pick in picks {
        let open: Vec<usize> = (0..pending.len())
            .filter(|&r| !pending[r].is_empty())
            .collect();
        if open.is_empty() {
            break;
        }
        let r = open[pick as usize % open.len()];
        let n = (1 + (pick as usize / 7) % 4).min(pending[r].len());
        let mut drafts: Vec<_> = pending[r].drain(..n).collect();
        // Now and then an event names an earlier event of another run as its cause.
        if pick.is_multiple_of(5)
            && let Some(c) = appended.iter().find(|c| c.run_id != ids[r])
        {
            drafts[0].causes.push(c.clone());
        }
        let (_, batch) = fx
            .ledger
            .append(&ids[r], drafts)
            .await
            .expect("valid history appends");
        let view = live
            .entry(ids[r].clone())
            .or_insert_with(|| RunView::new(ids[r].clone()));
        for e in batch.events() {
            view.apply(e.event()).expect("live projection");
            appended.push(e.event().id());
        }
    }
    let size = fx.log().size().await.unwrap();
    if plan.checkpoint {
        let root = root_at(fx.log(), size).await.unwrap();
        let s = signer();
        let note = Checkpoint {
            origin: s.name().into(),
            size,
            root,
        }
        .sign(&s)
        .unwrap();
        fx.log()
            .add_checkpoint(StoredCheckpoint { size, note })
            .await
            .unwrap();
    }
    let (dir, path) = fx.close();
    Built {
        _dir: dir,
        path,
        size,
        live,
    }
}

fn flip_byte(c: &rusqlite::Connection, column: &str, log_seq: u64, byte: u64, xor: u8) {
    let mut v: Vec<u8> = c
        .query_row(
            &format!("SELECT {column} FROM events WHERE log_seq = ?1"),
            [log_seq as i64],
            |r| r.get(0),
        )
        .unwrap();
    let i = (byte % v.len() as u64) as usize;
    v[i] ^= xor;
    c.execute(
        &format!("UPDATE events SET {column} = ?1 WHERE log_seq = ?2"),
        params![v, log_seq as i64],
    )
    .unwrap();
}

fn change_type_column(c: &rusqlite::Connection, log_seq: u64, byte: u64) {
    let t: String = c
        .query_row(
            "SELECT type FROM events WHERE log_seq = ?1",
            [log_seq as i64],
            |r| r.get(0),
        )
        .unwrap();
    let mut b = t.into_bytes();
    let i = (byte % b.len() as u64) as usize;
    b[i] = if b[i] == b'Z' { b'Y' } else { b'Z' };
    let t = String::from_utf8(b).unwrap();
    c.execute(
        "UPDATE events SET type = ?1 WHERE log_seq = ?2",
        params![t, log_seq as i64],
    )
    .unwrap();
}

/// What each verification depth found in one damaged copy.
struct Found {
    /// `verify` (the default depth): `None` if it saw nothing wrong.
    default: Option<Failure>,
    /// `verify_with(.., deep = true, ..)`, which also checks every stored tree node.
    deep: Failure,
}

/// Damage a copy of the log with SQL-level tampering and verify it at both depths. The deep
/// check must always find the damage; what the default depth finds is returned for the caller
/// to judge.
async fn damaged(built: &Built, name: &str, tamper: impl FnOnce(&rusqlite::Connection)) -> Found {
    let path = copy_log(&built.path, name);
    let c = tamper_connection(&path);
    tamper(&c);
    drop(c);
    let log = open_ro(&path);
    let v = signer().verifier();
    let mut found = Vec::new();
    for deep in [false, true] {
        let report = verify_with(&log, Some(&v), deep, |_| {})
            .await
            .unwrap_or_else(|e| {
                panic!("{name} (deep {deep}): verify failed to run instead of reporting: {e}")
            });
        found.push(report.failure);
    }
    let deep = found.pop().flatten();
    Found {
        default: found.pop().flatten(),
        deep: deep.unwrap_or_else(|| panic!("{name}: deep verification missed the damage")),
    }
}

/// Both depths found the damage, at exactly `log_seq`.
fn both_at(found: &Found, log_seq: u64, what: &str) -> Failure {
    assert_eq!(
        found.deep.log_seq,
        Some(log_seq),
        "{what} (deep): {:?}",
        found.deep
    );
    let f = found.default.clone().unwrap_or_else(|| {
        panic!(
            "{what}: `verify` did not detect it (deep found {:?})",
            found.deep
        )
    });
    assert_eq!(f.log_seq, Some(log_seq), "{what}: {f:?}");
    f
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    // Each case builds a log on disk and damages seven copies of it: keep the count modest, and
    // the shrinking short (a failure is already located by its message).
    #![proptest_config(ProptestConfig {
        cases: 40,
        max_shrink_iters: 64,
        ..ProptestConfig::default()
    })]

    #[test]
    fn valid_histories_verify_replay_and_every_damage_is_located(plan in plan(), d in damage()) {
        rt().block_on(async {
            let built = build(&plan).await;
            let n = built.size;

            // Any valid history verifies, and replay rebuilds the live projections exactly.
            {
                let log = open_ro(&built.path);
                let v = signer().verifier();
                let r = verify(&log, Some(&v), |_| {}).await.unwrap();
                assert!(r.ok(), "valid history rejected: {:?}", r.failure);
                assert_eq!(r.events, n);
                assert_eq!(r.runs, built.live.len() as u64);
                assert_eq!(r.checkpoints_verified, u64::from(plan.checkpoint));
                assert_eq!(r.root, root_at(&log, n).await.unwrap().to_hex());
                assert_eq!(replay(&log).await, built.live);
                for (id, view) in &built.live {
                    assert_eq!(&fold_run(&log, id).await.unwrap(), view);
                }
            }

            let i = d.at % n;
            let label = |seq: u64, c: &rusqlite::Connection| -> String {
                c.query_row(
                    "SELECT run_id || ':' || run_seq FROM events WHERE log_seq = ?1",
                    [seq as i64],
                    |r| r.get(0),
                )
                .unwrap()
            };
            let original = {
                let c = rusqlite::Connection::open(&built.path).unwrap();
                label(i, &c)
            };

            // A single byte changed in an event's body, its hash, its log link, or its indexed
            // type.
            for column in ["body", "hash", "log_prev"] {
                let found = damaged(&built, &format!("{column}.db"), |c| {
                    flip_byte(c, column, i, d.byte, d.xor)
                })
                .await;
                let f = both_at(&found, i, &format!("{column} byte of log_seq {i}"));
                assert!(f.event_id.is_some(), "{column} byte: {f:?}");
                if column == "hash" {
                    assert_eq!(f.event_id.as_deref(), Some(original.as_str()), "{f:?}");
                }
            }
            let found = damaged(&built, "type.db", |c| change_type_column(c, i, d.byte)).await;
            let f = both_at(&found, i, &format!("type column of log_seq {i}"));
            assert_eq!(f.event_id.as_deref(), Some(original.as_str()), "{f:?}");

            // A deleted event.
            let found = damaged(&built, "deleted.db", |c| {
                c.execute("DELETE FROM events WHERE log_seq = ?1", [i as i64]).unwrap();
            })
            .await;
            both_at(&found, i, &format!("deleted log_seq {i}"));

            // A swapped pair: two runs' events can trade places with both runs' chains intact.
            if n >= 2 {
                let j = (i + 1 + d.other % (n - 1)) % n;
                let (lo, hi) = (i.min(j), i.max(j));
                let found = damaged(&built, "swapped.db", |c| {
                    c.execute_batch(&format!(
                        "UPDATE events SET log_seq = -1 WHERE log_seq = {lo};
                         UPDATE events SET log_seq = {lo} WHERE log_seq = {hi};
                         UPDATE events SET log_seq = {hi} WHERE log_seq = -1;"
                    ))
                    .unwrap();
                })
                .await;
                // Each event's log link names the one before it: the first moved event is found,
                // with or without a checkpoint, whatever the tree floor.
                both_at(&found, lo, &format!("swapped {lo} and {hi}"));
            }

            // A truncated tail: the events alone, or the events and their tree nodes (which
            // only a signed checkpoint can reveal).
            let k = d.other % n;
            let found = damaged(&built, "truncated.db", |c| {
                c.execute("DELETE FROM events WHERE log_seq >= ?1", [k as i64]).unwrap();
            })
            .await;
            both_at(&found, k, &format!("truncated at {k}"));
            // The head moved back over a tail that is still stored (hidden from readers that
            // stop at the head): found at the first hidden event.
            let found = damaged(&built, "head-moved-back.db", |c| {
                c.execute("UPDATE head SET size = ?1", [k as i64]).unwrap();
            })
            .await;
            both_at(&found, k, &format!("head moved back to {k}"));
            if plan.checkpoint {
                let found = damaged(&built, "truncated-tree.db", |c| {
                    c.execute("DELETE FROM events WHERE log_seq >= ?1", [k as i64]).unwrap();
                    c.execute("DELETE FROM tree WHERE leaf_end >= ?1", [k as i64]).unwrap();
                })
                .await;
                let f = both_at(&found, k, &format!("truncated with its tree at {k}"));
                assert!(f.problem.contains("checkpoint"), "{f:?}");
            }
        });
    }
}

/// Damage outside the events table: a stored tree node (which proofs are built from) is caught
/// by the deep check; a checkpoint note altered or re-signed by another key by either depth.
#[tokio::test(flavor = "multi_thread")]
async fn a_changed_tree_node_or_checkpoint_is_detected() {
    let built = build(&Plan {
        runs: vec![(vec![0, 1, 2, 3], true), (vec![4, 5], false)],
        picks: vec![1, 2, 3, 4, 5, 6, 7, 8],
        checkpoint: true,
        floor: 1,
    })
    .await;
    // The level-1 node over leaves 2..=3, completed by leaf 3.
    let found = damaged(&built, "node.db", |c| {
        let mut h: Vec<u8> = c
            .query_row(
                "SELECT hash FROM tree WHERE leaf_end = 3 AND level = 1",
                [],
                |r| r.get(0),
            )
            .unwrap();
        h[0] ^= 1;
        c.execute(
            "UPDATE tree SET hash = ?1 WHERE leaf_end = 3 AND level = 1",
            params![h],
        )
        .unwrap();
    })
    .await;
    assert_eq!(found.deep.log_seq, Some(3), "{:?}", found.deep);
    assert!(
        found.deep.problem.contains("Merkle tree"),
        "{:?}",
        found.deep
    );

    // A node deleted, and one inserted where no subtree ends, are named as what they are.
    for (name, sql, want) in [
        (
            "deleted-node.db",
            "DELETE FROM tree WHERE leaf_end = 3 AND level = 1",
            "the stored tree has no node over log_seq 2..=3 at level 1, which the events complete: it was deleted",
        ),
        (
            "inserted-node.db",
            "INSERT INTO tree(leaf_end, level, hash) VALUES (4, 1, zeroblob(32))",
            "the stored tree has a level 1 node that the events do not make, before the node over log_seq 4..=5 they make next: it was inserted",
        ),
        (
            // A row no subtree could be stored under (1024 leaves ending at leaf 5).
            "impossible-node.db",
            "INSERT INTO tree(leaf_end, level, hash) VALUES (5, 10, zeroblob(32))",
            "the stored tree has a level 10 node that the events do not make",
        ),
    ] {
        let found = damaged(&built, name, |c| c.execute_batch(sql).unwrap()).await;
        let at = match name {
            "deleted-node.db" => 3,
            "inserted-node.db" => 5,
            _ => 7,
        };
        let f = both_at(&found, at, name);
        for f in [f, found.deep] {
            assert!(f.problem.contains(want), "{name}: {f:?}");
        }
    }

    // The finding (audit probe): the lowest stored level the log records, raised, was reported
    // as events missing; it is named as a stored node below that level.
    let found = damaged(&built, "floor.db", |c| {
        c.execute_batch("UPDATE meta SET value = '3' WHERE key = 'tree_floor'")
            .unwrap();
    })
    .await;
    for f in [found.default.expect("raised floor"), found.deep] {
        assert!(
            f.problem
                .contains("below the lowest level the log records that it stores (3)"),
            "{f:?}"
        );
        assert!(!f.problem.contains("missing"), "{f:?}");
    }

    let found = damaged(&built, "note.db", |c| {
        c.execute(
            "UPDATE checkpoints SET note = replace(note, 'ice.test', 'ice.evil')",
            [],
        )
        .unwrap();
    })
    .await;
    for f in [found.default.expect("altered note"), found.deep] {
        assert!(f.problem.contains("checkpoint"), "{f:?}");
    }

    // A checkpoint whose root was forged and signed by another key.
    let found = damaged(&built, "forged.db", |c| {
        let other = NoteSigner::from_seed("ice.test/tamper", [4u8; 32]).unwrap();
        let note = Checkpoint {
            origin: other.name().into(),
            size: built.size,
            root: ice_kernel::Digest([7u8; 32]),
        }
        .sign(&other)
        .unwrap();
        c.execute("UPDATE checkpoints SET note = ?1", [note])
            .unwrap();
    })
    .await;
    for f in [found.default.expect("forged note"), found.deep] {
        assert!(f.problem.contains("signature"), "{f:?}");
    }
}

/// The order of events across runs is held only by the Merkle tree: two adjacent events of
/// different runs, swapped, leave both runs' chains intact. I-003 says a reordered log is
/// detected by `ice verify`, and §9 that it checks the Merkle tree and names the first bad
/// event, so `verify` must catch this without a checkpoint, at the first moved event.
#[tokio::test(flavor = "multi_thread")]
async fn two_runs_events_swapped_are_caught_without_a_checkpoint() {
    let fx = Fixture::new();
    let (a, b) = (run_id("a"), run_id("b"));
    fx.ledger.append(&a, opening()).await.unwrap();
    fx.ledger.append(&b, opening()).await.unwrap();
    fx.ledger.append(&a, vec![working(0, 1)]).await.unwrap(); // log_seq 8
    fx.ledger.append(&b, vec![working(0, 2)]).await.unwrap(); // log_seq 9
    let (_dir, path) = fx.close();
    let built = Built {
        _dir,
        path,
        size: 10,
        live: BTreeMap::new(),
    };
    let found = damaged(&built, "swapped.db", |c| {
        c.execute_batch(
            "UPDATE events SET log_seq = -1 WHERE log_seq = 8;
             UPDATE events SET log_seq = 8 WHERE log_seq = 9;
             UPDATE events SET log_seq = 9 WHERE log_seq = -1;",
        )
        .unwrap();
    })
    .await;
    assert_eq!(found.deep.log_seq, Some(8), "{:?}", found.deep);
    let f = found.default.unwrap_or_else(|| {
        panic!(
            "`verify` (default depth) accepted a log whose events 8 and 9 were swapped; \
             only `verify_with(.., deep = true, ..)` noticed: {:?}",
            found.deep
        )
    });
    assert_eq!(f.log_seq, Some(8), "{f:?}");
}

/// Rows stored outside the log a verification covers: an event row at a negative position
/// (the backend's readers of runs would see it), a tree node past the last event (the append
/// that completes that node would fail on it) or before the first, and a head whose last hash
/// is not the last event's (the next append would link to it). Each is caught at both depths.
#[tokio::test(flavor = "multi_thread")]
async fn rows_outside_the_log_and_a_wrong_head_are_caught() {
    let built = build(&Plan {
        runs: vec![(vec![0, 1, 2, 3], true), (vec![4, 5], false)],
        picks: vec![1, 2, 3, 4, 5, 6, 7, 8],
        checkpoint: true,
        floor: 1,
    })
    .await;
    let cases: [(&str, &str, &str); 5] = [
        (
            "ghost.db",
            "INSERT INTO events(log_seq, run_id, run_seq, type, hash, log_prev, body)
             SELECT -1000, 'ghost', 0, type, hash, log_prev, body FROM events WHERE log_seq = 0",
            "negative positions (the lowest at log_seq -1000)",
        ),
        (
            "future-node.db",
            "INSERT INTO tree(leaf_end, level, hash) VALUES (511, 8, zeroblob(32))",
            "node ending at leaf 511, past the log's last event",
        ),
        (
            "early-node.db",
            "INSERT INTO tree(leaf_end, level, hash) VALUES (-3, 1, zeroblob(32))",
            "node at leaf -3, before the first event",
        ),
        (
            "head-last.db",
            "UPDATE head SET last = zeroblob(32)",
            "the next append would link to an event that is not there",
        ),
        (
            "hidden.db",
            "INSERT INTO events(log_seq, run_id, run_seq, type, hash, log_prev, body)
             SELECT 100000, 'hidden', 0, type, hash, log_prev, body FROM events WHERE log_seq = 0",
            "is stored at log_seq 100000",
        ),
    ];
    for (name, sql, want) in cases {
        let found = damaged(&built, name, |c| c.execute_batch(sql).unwrap()).await;
        let default = found
            .default
            .unwrap_or_else(|| panic!("{name}: `verify` accepted it: deep said {:?}", found.deep));
        for f in [default, found.deep] {
            assert!(f.problem.contains(want), "{name}: {f:?}");
        }
    }
}

/// Setting a current file's format record back to `ice-log/1` would have it read without its
/// `log_prev` links and head record, so a tail cut with it would pass `verify` with no
/// checkpoint to say otherwise. The altered record is refused as damage, naming it.
#[tokio::test(flavor = "multi_thread")]
async fn a_format_record_set_back_to_the_first_format_is_damage() {
    let built = build(&Plan {
        runs: vec![(vec![0, 1, 2], true)],
        picks: vec![1, 2, 3],
        checkpoint: false,
        floor: 0,
    })
    .await;
    let path = copy_log(&built.path, "downgraded.db");
    tamper_connection(&path)
        .execute_batch(
            "UPDATE meta SET value = 'ice-log/1' WHERE key = 'format';
             DELETE FROM events WHERE log_seq >= 5; DELETE FROM tree WHERE leaf_end >= 5;",
        )
        .unwrap();
    for mode in [
        ice_log::sqlite::Mode::ReadOnly,
        ice_log::sqlite::Mode::ReadWrite,
    ] {
        let err = ice_log::sqlite::SqliteLog::open(&path, mode)
            .err()
            .unwrap_or_else(|| panic!("{mode:?}: the downgraded file opened"));
        assert!(
            matches!(&err, ice_log::LogError::Corrupt { what } if what.contains("the format record was altered")),
            "{mode:?}: {err}"
        );
    }
}
