//! The `ice` command line as scripts see it: exit codes, refusals, JSON, and the audit loop
//! (verify, checkpoint, prove, verify-proof) on a real installation.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use ice_kernel::{Draft, EventId, Origin, RunId};
use ice_log::clock::SystemClock;
use ice_log::ledger::Ledger;
use ice_log::sqlite::{Mode, SqliteLog};
use serde_json::{Value, json};

fn ice(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ice"))
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("ICE_HOME")
        .output()
        .expect("ice runs")
}

/// Run `ice` with `args`, expect exit 5 (the log is invalid), and give its output.
fn invalid(home: &Path, args: &[&str]) -> String {
    let o = ice(home, args);
    assert_eq!(code(&o), 5, "ice {args:?}: {}{}", stdout(&o), stderr(&o));
    stdout(&o)
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn rt(t: &str) -> Draft {
    Draft::new(t, Origin::Runtime)
}

/// A home with two runs written through the validator.
fn seeded() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let o = ice(&home, &["init", "--origin", "ice.test/cli"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let rt_ = tokio::runtime::Runtime::new().unwrap();
    rt_.block_on(async {
        let log = Arc::new(SqliteLog::open(&home.join("ice.db"), Mode::ReadWrite).unwrap());
        let ledger = Ledger::new(log, Arc::new(SystemClock));
        for name in ["alpha", "beta"] {
            let run = RunId::new(name).unwrap();
            ledger
                .append(
                    &run,
                    vec![
                        rt("RunProvisioned"),
                        rt("ContextResolved"),
                        rt("ExecutionWindowOpened"),
                        Draft::new("InferenceStep", Origin::Agent("a1".into()))
                            .intent("think")
                            .payload(json!({"output": format!("plan for {name}"), "big": "x".repeat(20_000)})),
                        Draft::new("CapabilityRequested", Origin::Agent("a1".into()))
                            .intent("write a file")
                            .cause(EventId::new(run.clone(), 3)),
                    ],
                )
                .await
                .unwrap();
        }
    });
    (dir, home)
}

#[test]
fn init_creates_a_home_and_refuses_to_overwrite_one() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("h");
    let o = ice(&home, &["init", "--json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(v["verifier_key"].as_str().unwrap().contains('+'));
    assert!(v["policies"].as_str().unwrap().ends_with("policies"));
    assert!(home.join("policies/default.cedar").exists());
    for f in [
        "config.toml",
        "ice.db",
        "keys/checkpoint.key",
        "keys/checkpoint.pub",
    ] {
        assert!(home.join(f).exists(), "{f}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(home.join("keys/checkpoint.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the signing key is private");
    }
    let before = std::fs::read(home.join("keys/checkpoint.key")).unwrap();
    let o = ice(&home, &["init"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("already an ICE home"), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(home.join("keys/checkpoint.key")).unwrap(),
        before
    );
}

#[test]
fn every_command_refuses_a_directory_that_is_not_a_home() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["log"][..],
        &["verify"],
        &["checkpoint"],
        &["runs"],
        &["show", "a:0"],
        &["prove", "a:0"],
    ] {
        let o = ice(dir.path(), args);
        assert_eq!(code(&o), 1, "{args:?}");
        assert!(
            stderr(&o).contains("is not an ICE home"),
            "{args:?}: {}",
            stderr(&o)
        );
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing was created"
    );
}

#[test]
fn usage_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(code(&ice(dir.path(), &["no-such-command"])), 2);
    assert_eq!(code(&ice(dir.path(), &["log", "--limit", "many"])), 2);
}

#[test]
fn home_comes_from_ice_home_when_no_flag() {
    let (_d, home) = seeded();
    let o = Command::new(env!("CARGO_BIN_EXE_ice"))
        .args(["runs", "--json"])
        .env("ICE_HOME", &home)
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let runs: Vec<Value> = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0]["state"], "EXECUTING");
    assert_eq!(runs[0]["events"], 5);
}

/// The finding: an error quoting what it was given echoed a 100 000-character id in full
/// (twice, for `explain`). An error message is printed up to 2000 characters.
#[test]
fn an_error_about_a_huge_argument_does_not_echo_all_of_it() {
    let (_d, home) = seeded();
    let huge = "a".repeat(100_000);
    for cmd in ["replay", "diff", "explain", "show", "kill"] {
        let o = ice(&home, &[cmd, &huge]);
        assert_eq!(code(&o), 1, "{cmd}");
        let err = stderr(&o);
        assert!(err.len() < 2_200 * 4, "{cmd}: {} bytes", err.len());
        assert!(err.starts_with("error: "), "{cmd}: {err:.200}");
        assert!(
            err.contains("bytes of this message left out"),
            "{cmd}: {err:.200}"
        );
        // The reason, at the end, is kept.
        let reason = err.trim_end();
        assert!(
            reason.ends_with("characters, got 100000")
                || reason.ends_with("is not of the form RUN_ID:RUN_SEQ"),
            "{cmd}: {err}"
        );
    }
}

/// `--from` within a run longer than a page: the first page read holds nothing from `--from`
/// on, and is still not the run's last.
#[test]
fn log_of_a_run_from_a_position_past_its_first_page() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    assert_eq!(code(&ice(&home, &["init"])), 0);
    let total = 4_200u64;
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let log = Arc::new(SqliteLog::open(&home.join("ice.db"), Mode::ReadWrite).unwrap());
        let ledger = Ledger::new(log, Arc::new(SystemClock));
        let run = RunId::new("long").unwrap();
        let opening = ["RunProvisioned", "ContextResolved", "ExecutionWindowOpened"];
        ledger
            .append(&run, opening.into_iter().map(rt).collect())
            .await
            .unwrap();
        let mut n = opening.len() as u64;
        while n < total {
            let batch = (total - n).min(700);
            let steps = (0..batch)
                .map(|i| {
                    Draft::new("InferenceStep", Origin::Agent("a1".into()))
                        .intent("think")
                        .payload(json!({"step": n + i}))
                })
                .collect();
            ledger.append(&run, steps).await.unwrap();
            n += batch;
        }
    });
    let o = ice(&home, &["log", "--json", "--run", "long", "--from", "4150"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let seqs: Vec<u64> = stdout(&o)
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["log_seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs, (4150..total).collect::<Vec<_>>());
}

#[test]
fn log_filters_by_run_and_type_and_prints_json_lines() {
    let (_d, home) = seeded();
    let o = ice(&home, &["log", "--json"]);
    assert_eq!(code(&o), 0);
    let lines: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 10);
    assert_eq!(lines[9]["log_seq"], 9);
    let o = ice(
        &home,
        &["log", "--json", "--run", "beta", "--type", "InferenceStep"],
    );
    let lines: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["run_id"], "beta");
    assert_eq!(lines[0]["type"], "InferenceStep");
    let o = ice(&home, &["log", "--type", "NoSuchType"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("not an event type"));
    let o = ice(&home, &["log", "--limit", "3"]);
    assert_eq!(stdout(&o).lines().count(), 3);
}

#[test]
fn show_prints_one_event_and_inlines_blobs_on_request() {
    let (_d, home) = seeded();
    let o = ice(&home, &["show", "alpha:3", "--json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["type"], "InferenceStep");
    assert!(
        v["payload"]["big"]["$blob"].is_string(),
        "a large field is kept as a blob reference"
    );
    let o = ice(&home, &["show", "alpha:3", "--json", "--blobs"]);
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["payload"]["big"].as_str().unwrap().len(), 20_000);
    let o = ice(&home, &["show", "alpha:99"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("no event alpha:99"));
    let o = ice(&home, &["show", "not an id"]);
    assert_eq!(code(&o), 1);
}

#[test]
fn the_audit_loop_verify_checkpoint_prove_verify_proof() {
    let (d, home) = seeded();
    let o = ice(&home, &["verify"]);
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains("no signed checkpoint: none of the"),
        "{}",
        stdout(&o)
    );
    let o = ice(&home, &["prove", "alpha:1"]);
    assert_eq!(code(&o), 1, "no checkpoint yet");
    assert!(stderr(&o).contains("ice checkpoint"));

    let o = ice(&home, &["checkpoint", "--json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let cp: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(cp["size"], 10);
    assert!(
        cp["note"]
            .as_str()
            .unwrap()
            .starts_with("ice.test/cli\n10\n")
    );

    let o = ice(&home, &["verify", "--json"]);
    let r: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(r["checkpoints_verified"], 1);
    assert_eq!(r["events"], 10);
    assert_eq!(r["blobs_checked"], 2);
    let o = ice(&home, &["verify", "--deep", "--json"]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));

    let proof = d.path().join("p.json");
    let o = ice(&home, &["prove", "beta:3", "-o", proof.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // Offline: only the public key, no home.
    let key = home.join("keys/checkpoint.pub");
    let nohome = d.path().join("nowhere");
    let o = ice(
        &nohome,
        &[
            "verify-proof",
            proof.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ],
    );
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("event beta:3"));

    // The same proof with the event altered is invalid.
    let mut p: Value = serde_json::from_slice(&std::fs::read(&proof).unwrap()).unwrap();
    p["event"]["intent"] = json!("something else");
    let bad = d.path().join("bad.json");
    std::fs::write(&bad, serde_json::to_vec(&p).unwrap()).unwrap();
    let o = ice(&home, &["verify-proof", bad.to_str().unwrap()]);
    assert_eq!(code(&o), 5, "{}", stdout(&o));
    assert!(stdout(&o).contains("altered"), "{}", stdout(&o));

    // Another log's key does not accept it.
    let other = d.path().join("other");
    assert_eq!(code(&ice(&other, &["init", "--origin", "ice.test/cli"])), 0);
    let o = ice(
        &home,
        &[
            "verify-proof",
            proof.to_str().unwrap(),
            "--key",
            other.join("keys/checkpoint.pub").to_str().unwrap(),
        ],
    );
    assert_eq!(code(&o), 5);
    assert!(
        stdout(&o).contains("no signature by key") || stdout(&o).contains("does not verify"),
        "{}",
        stdout(&o)
    );

    // Garbage is a clear INVALID, not a crash; a missing file is an error.
    std::fs::write(
        &bad,
        b"{\"format\": \"ice-inclusion-proof/1\", \"proof\": 3}",
    )
    .unwrap();
    let o = ice(&home, &["verify-proof", bad.to_str().unwrap()]);
    assert_eq!(code(&o), 5);
    assert!(
        stdout(&o).contains("not an ICE proof file"),
        "{}",
        stdout(&o)
    );
    let o = ice(
        &home,
        &[
            "verify-proof",
            d.path().join("missing.json").to_str().unwrap(),
        ],
    );
    assert_eq!(code(&o), 1);

    // Consistency between two checkpoints.
    let rt_ = tokio::runtime::Runtime::new().unwrap();
    rt_.block_on(async {
        let log = Arc::new(SqliteLog::open(&home.join("ice.db"), Mode::ReadWrite).unwrap());
        let ledger = Ledger::new(log, Arc::new(SystemClock));
        ledger
            .append(&RunId::new("gamma").unwrap(), vec![rt("RunProvisioned")])
            .await
            .unwrap();
    });
    assert_eq!(code(&ice(&home, &["checkpoint"])), 0);
    let cons = d.path().join("c.json");
    let o = ice(
        &home,
        &["prove", "--from", "10", "-o", cons.to_str().unwrap()],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = ice(&home, &["verify-proof", cons.to_str().unwrap(), "--json"]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["tree_size"], 11);
}

/// Fold the log's write-ahead file into it, so its bytes are all in the one file.
fn fold_wal(db: &Path) {
    rusqlite::Connection::open(db)
        .unwrap()
        .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
        .unwrap();
}

fn tamper(db: &Path, sql: &str) {
    let c = rusqlite::Connection::open(db).unwrap();
    c.execute_batch("DROP TRIGGER events_no_update;").unwrap();
    c.execute_batch(sql).unwrap();
}

#[test]
fn verify_exits_5_naming_the_first_bad_event_and_changes_nothing() {
    let (_d, home) = seeded();
    assert_eq!(code(&ice(&home, &["checkpoint"])), 0);
    let db = home.join("ice.db");
    // One byte of one stored event changes (the run id column stays).
    tamper(
        &db,
        "UPDATE events SET body = CAST(replace(CAST(body AS TEXT), 'plan for beta', 'plan for bet4') AS BLOB) WHERE log_seq = 8;",
    );
    // Fold everything into the main file so the before/after comparison sees all bytes.
    fold_wal(&db);
    let before = std::fs::read(&db).unwrap();
    let o = ice(&home, &["verify"]);
    assert_eq!(code(&o), 5, "{}", stdout(&o));
    assert!(
        stdout(&o).contains("INVALID at log_seq 8 (event beta:3)"),
        "{}",
        stdout(&o)
    );
    assert!(stdout(&o).contains("hash"), "{}", stdout(&o));
    assert_eq!(
        std::fs::read(&db).unwrap(),
        before,
        "verify modifies nothing"
    );
    let o = ice(&home, &["verify", "--json"]);
    let r: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(r["failure"]["log_seq"], 8);
    assert_eq!(r["failure"]["event_id"], "beta:3");
}

/// The finding (audit probe): `ice migrate` verified the copy without a key, so a log whose
/// checkpoint signature was forged was copied and reported as verifying. The copy is checked
/// with `--key`, else the home's key; with neither, the output says signatures were not
/// checked.
#[test]
fn migrate_checks_the_copied_checkpoints_signatures() {
    let (d, home) = seeded();
    assert_eq!(code(&ice(&home, &["checkpoint"])), 0);
    let db = home.join("ice.db");
    // Five characters of the signature, just before the note's final newline, change.
    let c = rusqlite::Connection::open(&db).unwrap();
    c.execute_batch(
        "DROP TRIGGER checkpoints_no_update;
         UPDATE checkpoints SET note = substr(note, 1, length(note) - 6) || 'AAAAA' || substr(note, length(note));",
    )
    .unwrap();
    drop(c);
    // `ice prove` refuses to write a proof ending in that checkpoint (audit probe).
    let proof = d.path().join("proof.json");
    let o = ice(&home, &["prove", "alpha:1", "-o", proof.to_str().unwrap()]);
    assert_eq!(code(&o), 5, "{}{}", stdout(&o), stderr(&o));
    assert!(stderr(&o).contains("does not verify"), "{}", stderr(&o));
    assert!(!proof.exists());
    let from = format!("sqlite:{}", db.display());
    let copy = |name: &str| format!("sqlite:{}", d.path().join(name).display());
    let o = ice(&home, &["migrate", "--from", &from, "--to", &copy("a.db")]);
    assert_eq!(code(&o), 5, "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("does NOT verify"), "{}", stdout(&o));
    assert!(stdout(&o).contains("signature"), "{}", stdout(&o));
    // From outside an installation: with the key given, the same verdict; without one, the
    // copy verifies as far as it can be checked, and the output says what was not.
    let elsewhere = d.path().join("not-a-home");
    let key = home.join("keys/checkpoint.pub");
    let key = key.to_str().unwrap();
    let o = ice(
        &elsewhere,
        &[
            "migrate",
            "--from",
            &from,
            "--to",
            &copy("b.db"),
            "--key",
            key,
        ],
    );
    assert_eq!(code(&o), 5, "{}{}", stdout(&o), stderr(&o));
    let o = ice(
        &elsewhere,
        &["migrate", "--from", &from, "--to", &copy("c.db")],
    );
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains("signatures were not checked") && stdout(&o).contains("--key"),
        "{}",
        stdout(&o)
    );
    let o = ice(
        &elsewhere,
        &["migrate", "--from", &from, "--to", &copy("d.db"), "--json"],
    );
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(
        v["warnings"]
            .to_string()
            .contains("signatures were not checked"),
        "{v}"
    );
}

/// The finding (audit probe): `verify` reads the event table in log order, not its indexes,
/// and the readers trusted the indexes: with two index entries' row pointers swapped, `verify`
/// said ok while `ice show alpha:2` printed alpha:3. Readers now refuse a row that is not the
/// one asked for, and `verify --deep` runs SQLite's integrity check of the indexes.
#[test]
fn altered_indexes_are_refused_by_readers_and_caught_by_deep_verify() {
    let (_d, home) = seeded();
    let db = home.join("ice.db");
    fold_wal(&db);
    // The `(run_id, run_seq)` index entries of alpha:2 and alpha:3 (a record header of four
    // bytes, the run id, then run_seq and the row id as one-byte integers): swap the row ids.
    let mut bytes = std::fs::read(&db).unwrap();
    let entry = |seq: u8| [&b"\x04\x17\x01\x01alpha"[..], &[seq, seq]].concat();
    let find = |b: &[u8], pat: &[u8]| {
        let at: Vec<usize> = (0..=b.len() - pat.len())
            .filter(|&i| &b[i..i + pat.len()] == pat)
            .collect();
        assert_eq!(at.len(), 1, "{pat:?} found {} times", at.len());
        at[0] + pat.len() - 1
    };
    let (two, three) = (find(&bytes, &entry(2)), find(&bytes, &entry(3)));
    bytes[two] = 3;
    bytes[three] = 2;
    std::fs::write(&db, &bytes).unwrap();
    let o = ice(&home, &["show", "alpha:2"]);
    assert_ne!(code(&o), 0, "{}", stdout(&o));
    assert!(
        stderr(&o).contains("the file's indexes, or that row's columns, were altered"),
        "{}{}",
        stdout(&o),
        stderr(&o)
    );
    let out = invalid(&home, &["verify", "--deep"]);
    assert!(out.contains("integrity check"), "{out}");
}

/// The finding (audit probe): in a file whose table was rebuilt to allow them, a NULL
/// `log_prev` skipped the log-order link check and a row with a NULL `log_seq` (in no scan)
/// passed `verify`. The first is an event without its link; the second a row outside the log.
#[test]
fn rows_without_their_link_or_position_fail_verify() {
    let rebuild = |home: &Path, then: &str| {
        let c = rusqlite::Connection::open(home.join("ice.db")).unwrap();
        c.execute_batch(&format!(
            "DROP TRIGGER events_no_update; DROP TRIGGER events_no_delete;
             CREATE TABLE loose(log_seq INTEGER, run_id TEXT, run_seq INTEGER, type TEXT, hash BLOB, log_prev BLOB, body BLOB);
             INSERT INTO loose SELECT * FROM events;
             DROP TABLE events;
             ALTER TABLE loose RENAME TO events;
             {then}"
        ))
        .unwrap();
    };
    let (_d, home) = seeded();
    rebuild(
        &home,
        "UPDATE events SET log_prev = NULL WHERE log_seq = 6;",
    );
    let out = invalid(&home, &["verify"]);
    assert!(out.contains("at log_seq 6"), "{out}");
    assert!(out.contains("no log_prev link"), "{out}");
    let (_d, home) = seeded();
    rebuild(
        &home,
        "INSERT INTO events SELECT NULL, 'zz', 0, type, hash, log_prev, body FROM events WHERE log_seq = 0;",
    );
    let out = invalid(&home, &["verify"]);
    assert!(out.contains("11 event rows are stored"), "{out}");
}

/// The findings (audit probe): a checkpoint note that is not UTF-8 made `verify` exit 1 (an
/// error) instead of 5 (the log is invalid), and a head moved past the last event made
/// `ice checkpoint` exit 1 at opening. Both are verdicts on the store: exit 5, nothing signed.
#[test]
fn damage_found_by_checkpoint_or_in_a_note_is_a_verdict() {
    let (_d, home) = seeded();
    assert_eq!(code(&ice(&home, &["checkpoint"])), 0);
    let c = rusqlite::Connection::open(home.join("ice.db")).unwrap();
    c.execute_batch(
        "DROP TRIGGER checkpoints_no_update; UPDATE checkpoints SET note = CAST(x'ff00fe' AS TEXT);",
    )
    .unwrap();
    drop(c);
    invalid(&home, &["verify"]);
    let (_d, home) = seeded();
    let c = rusqlite::Connection::open(home.join("ice.db")).unwrap();
    c.execute_batch("UPDATE head SET size = 11;").unwrap();
    drop(c);
    let o = ice(&home, &["checkpoint"]);
    assert_eq!(code(&o), 5, "{}{}", stdout(&o), stderr(&o));
    assert!(stderr(&o).contains("nothing was signed"), "{}", stderr(&o));
    let c = rusqlite::Connection::open(home.join("ice.db")).unwrap();
    let n: i64 = c
        .query_row("SELECT count(*) FROM checkpoints", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 0);
}

/// The finding (audit probe): a checkpoint row stored twice (the table rebuilt without its
/// key) was reported as events missing ("truncated"); it is reported as what it is.
#[test]
fn a_checkpoint_stored_twice_is_named_as_such() {
    let (_d, home) = seeded();
    assert_eq!(code(&ice(&home, &["checkpoint"])), 0);
    let c = rusqlite::Connection::open(home.join("ice.db")).unwrap();
    c.execute_batch(
        "DROP TRIGGER checkpoints_no_update; DROP TRIGGER checkpoints_no_delete;
         CREATE TABLE loose(size INTEGER, note TEXT);
         INSERT INTO loose SELECT size, note FROM checkpoints;
         INSERT INTO loose SELECT size, note FROM checkpoints;
         DROP TABLE checkpoints;
         ALTER TABLE loose RENAME TO checkpoints;",
    )
    .unwrap();
    drop(c);
    let out = invalid(&home, &["verify"]);
    assert!(
        out.contains("checkpoint of size 10 after one of size 10"),
        "{out}"
    );
    assert!(!out.contains("truncated"), "{out}");
}

/// The finding (memory and API probe): an operator could be named `user-of-agent.claude`, and
/// the approvals that operator gave were recorded exactly as the answers of the user of agent
/// claude's MCP client (elicitation). Operator names beginning with `user-of-` are refused.
#[test]
fn operators_cannot_take_the_names_of_mcp_clients_users() {
    let (_d, home) = seeded();
    for name in ["user-of-agent.claude", "user-of-stdio-client"] {
        let o = ice(&home, &["token", "add", "--operator", name]);
        assert_ne!(code(&o), 0, "{}", stdout(&o));
        assert!(stderr(&o).contains("user-of-"), "{}", stderr(&o));
        let o = ice(&home, &["approve", "alpha:4", "--operator", name]);
        assert_ne!(code(&o), 0, "{}", stdout(&o));
        assert!(stderr(&o).contains("choose another"), "{}", stderr(&o));
    }
    let o = ice(&home, &["token", "list", "--json"]);
    assert!(!stdout(&o).contains("user-of-"), "{}", stdout(&o));
}

#[test]
fn a_corrupt_or_missing_database_is_a_clear_error_and_is_not_modified() {
    let (_d, home) = seeded();
    let db = home.join("ice.db");
    fold_wal(&db);
    let mut bytes = std::fs::read(&db).unwrap();
    bytes[..16].copy_from_slice(b"this is no db!!\0");
    std::fs::write(&db, &bytes).unwrap();
    for args in [&["verify"][..], &["log"], &["checkpoint"]] {
        let o = ice(&home, args);
        // For verify and checkpoint the damage is a verdict (exit 5; verify's on stdout); for
        // the others, an error.
        let verdict = args != ["log"];
        assert_eq!(code(&o), if verdict { 5 } else { 1 }, "{args:?}");
        let e = if args == ["verify"] {
            stdout(&o)
        } else {
            stderr(&o)
        };
        assert!(
            e.contains("ice.db") && e.contains("not an ICE log"),
            "{args:?}: {e}"
        );
        assert_eq!(
            std::fs::read(&db).unwrap(),
            bytes,
            "{args:?} modified the file"
        );
    }
    // Truncated to half.
    let (_d2, home2) = seeded();
    let db2 = home2.join("ice.db");
    fold_wal(&db2);
    let full = std::fs::read(&db2).unwrap();
    std::fs::write(&db2, &full[..full.len() / 2]).unwrap();
    let _ = std::fs::remove_file(home2.join("ice.db-wal"));
    let _ = std::fs::remove_file(home2.join("ice.db-shm"));
    let o = ice(&home2, &["verify"]);
    assert_ne!(code(&o), 0, "{}", stdout(&o));
    assert!(
        code(&o) == 1 || code(&o) == 5,
        "a clear failure: {} {}",
        stdout(&o),
        stderr(&o)
    );
    // Missing.
    std::fs::remove_file(&db).unwrap();
    let o = ice(&home, &["verify"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("no such file"), "{}", stderr(&o));
}

#[test]
fn a_missing_or_wrong_key_is_a_clear_error() {
    let (d, home) = seeded();
    std::fs::rename(home.join("keys/checkpoint.pub"), d.path().join("pub")).unwrap();
    let o = ice(&home, &["verify"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("checkpoint.pub"), "{}", stderr(&o));
    std::fs::write(
        home.join("keys/checkpoint.pub"),
        "ice.test/cli+00000000+AAAA\n",
    )
    .unwrap();
    let o = ice(&home, &["verify"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("malformed key"), "{}", stderr(&o));
    std::fs::write(home.join("keys/checkpoint.key"), "PRIVATE+KEY+nonsense\n").unwrap();
    let o = ice(&home, &["checkpoint"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("checkpoint.key"), "{}", stderr(&o));
}

#[test]
fn a_log_url_of_an_unknown_kind_is_refused() {
    let (_d, home) = seeded();
    let o = ice(&home, &["--log", "mysql://x", "log"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("not of a known form"), "{}", stderr(&o));
    // The finding (multi-node probe): a password in a URL of another form, or one holding an
    // unescaped `@`, was printed. Neither is repeated now.
    for url in [
        "host=127.0.0.1 user=postgres password=s3cretPW dbname=test",
        "postgres://postgres:s3cret@PW@127.0.0.1:5432/test?schema=x",
        "nats://user:s3cret@PW@127.0.0.1:4222",
    ] {
        let o = ice(&home, &["--log", url, "verify"]);
        assert_eq!(code(&o), 1, "{url}: {}", stderr(&o));
        let said = format!("{}{}", stdout(&o), stderr(&o));
        assert!(
            !said.contains("s3cret") && !said.contains("PW"),
            "{url}: {said}"
        );
    }
}

#[test]
fn bench_prints_each_figure_beside_its_baseline() {
    let d = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_ice"))
        .args([
            "bench",
            "--appends",
            "16",
            "--concurrency",
            "4",
            "--events",
            "2000",
            "--repeat",
            "1",
            "--json",
            "--dir",
        ])
        .arg(d.path())
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    for k in ["append_c1", "append_c4"] {
        assert!(v[k]["ice_events_per_s"].as_f64().unwrap() > 0.0, "{k}");
        assert!(v[k]["raw_events_per_s"].as_f64().unwrap() > 0.0, "{k}");
    }
    assert!(v["verify"]["baseline_events_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["verify_memory"]["big_peak_rss_kib"].as_i64().unwrap() > 0);
    // The governed call beside both of its baselines: the read alone, and plain SQLite
    // committing the rows each call recorded (found call by call in the log, or it fails).
    let g = &v["governed_call"];
    let f = |k: &str| {
        g[k].as_f64()
            .unwrap_or_else(|| panic!("governed_call.{k}: {g}"))
    };
    assert!(f("plain_commit_p50_us") > 0.0);
    assert!(f("governed_p50_us") > f("direct_p50_us"));
    assert!(f("added_beyond_read_p50_us") > f("added_p50_us"));
    assert!(f("added_p50_no_log_write_us") > 0.0);
    // A command run as process.exec runs it, beside running it directly.
    assert!(
        v["exec"]["ice_p50_us"].as_f64().unwrap() > 0.0,
        "{}",
        v["exec"]
    );
    assert!(
        v["exec"]["direct_p50_us"].as_f64().unwrap() > 0.0,
        "{}",
        v["exec"]
    );
}

#[test]
fn log_follow_prints_events_appended_after_it_started() {
    use std::io::{BufRead, BufReader};
    let (_d, home) = seeded();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ice"))
        .arg("--home")
        .arg(&home)
        .args(["log", "--follow", "--json", "--run", "delta"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    std::thread::sleep(std::time::Duration::from_millis(400));
    let rt_ = tokio::runtime::Runtime::new().unwrap();
    rt_.block_on(async {
        let log = Arc::new(SqliteLog::open(&home.join("ice.db"), Mode::ReadWrite).unwrap());
        let ledger = Ledger::new(log, Arc::new(SystemClock));
        ledger
            .append(
                &RunId::new("delta").unwrap(),
                vec![rt("RunProvisioned"), rt("ContextResolved")],
            )
            .await
            .unwrap();
    });
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for _ in 0..2 {
            let _ = tx.send(lines.next().and_then(Result::ok));
        }
    });
    for want in ["RunProvisioned", "ContextResolved"] {
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("follow printed in time")
            .expect("a line");
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["type"], want);
        assert_eq!(v["run_id"], "delta");
    }
    child.kill().unwrap();
    let _ = child.wait();
}

#[test]
fn a_reader_that_goes_away_ends_ice_quietly() {
    let (_d, home) = seeded();
    for args in [&["verify"][..], &["show", "alpha:3"], &["runs"], &["log"]] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ice"))
            .arg("--home")
            .arg(&home)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take()); // like `ice … | true`: the reader is gone before ice writes
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(
            out.status.code().is_none_or(|c| c == 0),
            "{args:?}: {:?} {err}",
            out.status
        );
    }
}

#[test]
fn concurrent_token_edits_keep_every_change_and_the_files_permissions() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("h");
    assert!(ice(&home, &["init"]).status.success());
    let config = home.join("config.toml");
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(
        ice(&home, &["token", "add", "--agent", "a0"])
            .status
            .success()
    );
    // Fifteen adds and a revoke at once, each a read-modify-write of config.toml: none may undo
    // another.
    let bin = env!("CARGO_BIN_EXE_ice");
    let spawned: Vec<_> = (1..16)
        .map(|i| {
            Command::new(bin)
                .arg("--home")
                .arg(&home)
                .args(["token", "add", "--agent", &format!("a{i}")])
                .env_remove("ICE_HOME")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let revoke = Command::new(bin)
        .arg("--home")
        .arg(&home)
        .args(["token", "revoke", "--agent", "a0"])
        .env_remove("ICE_HOME")
        .spawn()
        .unwrap();
    for mut c in spawned.into_iter().chain([revoke]) {
        assert!(c.wait().unwrap().success());
    }
    let o = ice(&home, &["token", "list", "--json"]);
    let listed: Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut names: Vec<String> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    let mut want: Vec<String> = (1..16).map(|i| format!("a{i}")).collect();
    want.sort();
    assert_eq!(names, want);
    let mode = std::fs::metadata(&config).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "config.toml keeps its permissions");
    // Nothing temporary is left behind.
    let left: Vec<_> = std::fs::read_dir(&home)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn revoking_removes_tokens_written_as_an_inline_list_too() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("h");
    assert!(ice(&home, &["init"]).status.success());
    let config = home.join("config.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    let d = |c: char| c.to_string().repeat(64);
    text.push_str(&format!(
        "agents = [{{ name = \"x\", token_sha256 = \"{}\" }}, {{ name = \"y\", token_sha256 = \"{}\" }}]\n",
        d('a'),
        d('b')
    ));
    std::fs::write(&config, text).unwrap();
    let o = ice(&home, &["token", "revoke", "--agent", "x"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = ice(&home, &["token", "list", "--json"]);
    let listed: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        listed,
        json!([{"role": "agent", "name": "y", "token_sha256": d('b')}])
    );
    let o = ice(&home, &["token", "revoke", "--agent", "y"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!std::fs::read_to_string(&config).unwrap().contains("agents"));
    assert_eq!(code(&ice(&home, &["token", "revoke", "--agent", "y"])), 1);
}

#[test]
fn a_metrics_readers_token_is_its_own_role_listed_and_revoked_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("h");
    assert!(ice(&home, &["init"]).status.success());
    for (role, name) in [("--operator", "prom"), ("--metrics", "prom")] {
        let o = ice(&home, &["token", "add", role, name, "--json"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let text = std::fs::read_to_string(home.join("config.toml")).unwrap();
    assert!(text.contains("[[metrics_readers]]"), "{text}");
    let o = ice(&home, &["token", "list", "--json"]);
    let listed: Value = serde_json::from_slice(&o.stdout).unwrap();
    let roles: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["operator", "metrics"]);
    // Revoking the metrics reader leaves the operator of the same name alone.
    let o = ice(&home, &["token", "revoke", "--metrics", "prom"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = ice(&home, &["token", "list", "--json"]);
    let listed: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["role"], "operator");
    assert!(
        !std::fs::read_to_string(home.join("config.toml"))
            .unwrap()
            .contains("metrics_readers")
    );
    assert_eq!(
        code(&ice(&home, &["token", "revoke", "--metrics", "prom"])),
        1
    );
    // One role at a time, and names follow the origin rule.
    let o = ice(&home, &["token", "add", "--metrics", "a", "--agent", "b"]);
    assert_eq!(code(&o), 2, "{}", String::from_utf8_lossy(&o.stderr));
    let o = ice(&home, &["token", "add", "--metrics", "bad name"]);
    assert_ne!(code(&o), 0);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--metrics: metrics reader name \"bad name\""),
        "{err}"
    );
}

/// A checkpoint is kept forever: one signed by a key whose public half is not the home's would
/// make the log fail verification for good. A mismatched pair signs nothing and says why.
#[test]
fn a_signing_key_that_is_not_the_homes_pair_signs_nothing() {
    let (d, home) = seeded();
    let other = d.path().join("other");
    assert_eq!(code(&ice(&other, &["init", "--origin", "ice.test/cli"])), 0);
    std::fs::copy(
        other.join("keys/checkpoint.key"),
        home.join("keys/checkpoint.key"),
    )
    .unwrap();
    let o = ice(&home, &["checkpoint"]);
    assert_eq!(code(&o), 1, "{}{}", stdout(&o), stderr(&o));
    assert!(
        stderr(&o).contains("checkpoint.key is not the signing half of")
            && stderr(&o).contains("nothing was signed"),
        "{}",
        stderr(&o)
    );
    // Nothing was stored: the log still verifies, with no checkpoint.
    let o = ice(&home, &["verify"]);
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains("0 checkpoint(s) verified"),
        "{}",
        stdout(&o)
    );
}

/// Damage that stops the store from being read is a verdict of `verify` (exit 5, naming what
/// is damaged), not a failure to run.
#[test]
fn a_store_too_damaged_to_read_is_invalid_not_an_error() {
    let damaged = |sql: &str| {
        let (d, home) = seeded();
        let c = rusqlite::Connection::open(home.join("ice.db")).unwrap();
        c.execute_batch(sql).unwrap();
        c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);").unwrap();
        drop(c);
        (d, home)
    };
    let (_d, home) = damaged("DROP TRIGGER head_no_delete; DELETE FROM head;");
    let o = ice(&home, &["verify"]);
    assert_eq!(code(&o), 5, "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o)
            .contains("INVALID: the store is damaged: the head record (the log's size) is missing"),
        "{}",
        stdout(&o)
    );
    // A body SQLite holds as text, not bytes: the row cannot be read as an event; the verdict
    // names where.
    let (_d, home) = damaged(
        "DROP TRIGGER events_no_update; UPDATE events SET body = CAST(body AS TEXT) WHERE log_seq = 3;",
    );
    let o = ice(&home, &["verify"]);
    assert_eq!(code(&o), 5, "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o)
            .contains("INVALID: the store is damaged: scanning the log at the row of log_seq 3"),
        "{}",
        stdout(&o)
    );
    // The file's first page overwritten: it is no longer a database at all.
    let (_d, home) = damaged("");
    let db = home.join("ice.db");
    let mut bytes = std::fs::read(&db).unwrap();
    bytes[..100].fill(0x5a);
    std::fs::write(&db, &bytes).unwrap();
    let o = ice(&home, &["verify"]);
    assert_eq!(code(&o), 5, "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains("INVALID: the store is damaged:")
            && stdout(&o).contains("not an ICE log"),
        "{}",
        stdout(&o)
    );
    // No store at all is not a verdict on one.
    std::fs::remove_file(&db).unwrap();
    let o = ice(&home, &["verify"]);
    assert_eq!(code(&o), 1, "{}{}", stdout(&o), stderr(&o));
}

/// `ice` with a deadline: a command that does not finish in `limit` is killed and the test
/// fails (a hang is a defect, not a slow test).
fn ice_within(home: &Path, args: &[&str], limit: std::time::Duration) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_ice"))
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("ICE_HOME")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ice runs");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(o) => o.expect("ice runs"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("`ice {}` did not finish within {limit:?}", args.join(" "));
        }
    }
}

/// The finding: a pipe in place of a home's file (config.toml, a key) or of `--key` made ice
/// wait forever for a writer, or read without end. Each is refused as not a regular file.
#[test]
fn a_pipe_in_place_of_a_file_ice_reads_is_refused_not_waited_on() {
    let limit = std::time::Duration::from_secs(60);
    let fifo = |p: &Path| {
        let _ = std::fs::remove_file(p);
        let ok = Command::new("mkfifo").arg(p).status().unwrap().success();
        assert!(ok, "mkfifo {}", p.display());
    };
    let (d, home) = seeded();
    assert_eq!(code(&ice(&home, &["checkpoint"])), 0);
    let proof = d.path().join("p.json");
    let o = ice(&home, &["prove", "beta:3", "-o", proof.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let pipe = d.path().join("key.pipe");
    fifo(&pipe);
    let o = ice_within(
        &home,
        &[
            "verify-proof",
            proof.to_str().unwrap(),
            "--key",
            pipe.to_str().unwrap(),
        ],
        limit,
    );
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("key.pipe: not a regular file"),
        "{}",
        stderr(&o)
    );
    for (file, args) in [
        ("keys/checkpoint.key", &["checkpoint"][..]),
        ("keys/checkpoint.pub", &["verify"]),
        ("config.toml", &["runs"]),
    ] {
        let (_d, home) = seeded();
        fifo(&home.join(file));
        let o = ice_within(&home, args, limit);
        assert_eq!(code(&o), 1, "{file}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(&format!("{file}: not a regular file")),
            "{file}: {}",
            stderr(&o)
        );
    }
}

/// The finding: with a gap in a run's positions in the store (an event's `run_seq` column
/// rewritten), every command that reads the run whole read its last page again and again,
/// without end and with memory growing. Now each says which event is out of place and ends.
#[test]
fn a_run_with_an_event_missing_is_reported_not_read_forever() {
    let (_d, home) = seeded();
    tamper(
        &home.join("ice.db"),
        "UPDATE events SET run_seq = 7 WHERE run_id = 'beta' AND run_seq = 3;",
    );
    let limit = std::time::Duration::from_secs(60);
    for args in [
        &["log", "--run", "beta"][..],
        &["explain", "beta:4"],
        &["replay", "beta"],
        &["diff", "beta"],
        &["kill", "beta"],
    ] {
        let o = ice_within(&home, args, limit);
        assert_ne!(code(&o), 0, "{args:?}: {}{}", stdout(&o), stderr(&o));
        assert!(
            stderr(&o).contains(
                "run beta: event at log_seq 9 is stored at run position 4, where 3 was expected"
            ),
            "{args:?}: {}{}",
            stdout(&o),
            stderr(&o)
        );
        // Said once (multi-node probe: an error that shows its cause and also chains it was
        // printed with the cause twice).
        assert_eq!(
            stderr(&o).matches("is stored at run position 4").count(),
            1,
            "{args:?}: {}",
            stderr(&o)
        );
    }
    let o = ice_within(&home, &["verify"], limit);
    assert_eq!(code(&o), 5, "{}", stdout(&o));

    // The same for the log's order: a row moved to the last position SQLite can hold made
    // `ice memory list` (which follows the log) read that row forever.
    let (_d, home) = seeded();
    tamper(
        &home.join("ice.db"),
        "UPDATE events SET log_seq = 9223372036854775807 WHERE log_seq = 9;",
    );
    for args in [&["memory", "list"][..], &["log"]] {
        let o = ice_within(&home, args, limit);
        assert_ne!(code(&o), 0, "{args:?}: {}{}", stdout(&o), stderr(&o));
        assert!(
            stderr(&o).contains(
                "the event row at log_seq 9223372036854775807 is where log_seq 9 was expected"
            ),
            "{args:?}: {}{}",
            stdout(&o),
            stderr(&o)
        );
    }
}

/// A log URL's password never reaches a message, not even inside the client library's own
/// error (which repeats the URL it was given).
#[test]
fn a_log_urls_password_stays_out_of_error_messages() {
    let (_d, home) = seeded();
    for url in [
        "nats://u:secretpw@127.0.0.1:1",
        "nats://secretpw@127.0.0.1:1",
        "postgres://u:secretpw@127.0.0.1:1/test",
        "postgres://u@127.0.0.1:1/test?password=secretpw",
    ] {
        let o = ice(&home, &["--log", url, "runs"]);
        assert_eq!(code(&o), 1, "{url}: {}{}", stdout(&o), stderr(&o));
        let all = format!("{}{}", stdout(&o), stderr(&o));
        assert!(!all.contains("secretpw"), "{url}: {all}");
        assert!(
            all.contains("opening the log") && all.contains("***"),
            "{url}: {all}"
        );
    }
}

/// A device or a pipe given where a file is expected has no size to check and may never end:
/// refused at once, naming it, instead of being read until memory runs out.
#[test]
fn a_device_given_for_a_file_is_refused_not_read_forever() {
    let (_d, home) = seeded();
    for args in [
        vec!["run", "/dev/zero"],
        vec!["verify-proof", "/dev/zero"],
        vec!["reconfigure", "alpha", "--record", "/dev/zero"],
    ] {
        let started = std::time::Instant::now();
        let o = ice(&home, &args);
        assert_eq!(code(&o), 1, "{args:?}: {}{}", stdout(&o), stderr(&o));
        assert!(
            stderr(&o).contains("/dev/zero") && stderr(&o).contains("not a regular file"),
            "{args:?}: {}",
            stderr(&o)
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "{args:?}"
        );
    }
}

/// The log's own checkpoints are stored beside its events: whoever truncates or rewrites the
/// events can remove those too. The checkpoint the installation signed last, which it keeps
/// outside the log (keys/last-checkpoint), catches it: `verify` fails and `checkpoint` refuses
/// to sign. A checkpoint kept elsewhere (`verify --checkpoint`, as `ice checkpoint` printed it)
/// catches it too.
#[test]
fn a_checkpoint_kept_outside_the_log_catches_a_truncation_that_removed_the_stored_ones() {
    let (d, home) = seeded();
    let o = ice(&home, &["checkpoint", "--json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let kept_json = d.path().join("kept.json");
    std::fs::write(&kept_json, stdout(&o)).unwrap();
    let note: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let kept_note = d.path().join("kept.note");
    std::fs::write(&kept_note, note["note"].as_str().unwrap()).unwrap();
    let record = home.join("keys/last-checkpoint");
    assert_eq!(
        std::fs::read_to_string(&record).unwrap(),
        note["note"].as_str().unwrap(),
        "the home keeps the note it signed"
    );
    for kept in [&kept_json, &kept_note] {
        let o = ice(&home, &["verify", "--checkpoint", kept.to_str().unwrap()]);
        assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    }

    // Cut the last run away, with the stored checkpoint and the tree above it.
    let cut = |home: &Path| {
        let c = rusqlite::Connection::open(home.join("ice.db")).unwrap();
        c.execute_batch(
            "DROP TRIGGER IF EXISTS events_no_delete; DROP TRIGGER IF EXISTS tree_no_delete;
             DROP TRIGGER IF EXISTS checkpoints_no_delete; DROP TRIGGER IF EXISTS head_only_grows;
             DELETE FROM events WHERE log_seq >= 5; DELETE FROM tree WHERE leaf_end >= 5;
             DELETE FROM checkpoints;
             UPDATE head SET size = 5, last = (SELECT hash FROM events WHERE log_seq = 4);
             PRAGMA wal_checkpoint(TRUNCATE);",
        )
        .unwrap();
    };
    // Another log opened with --log (an older copy, cut short) is not held to the record,
    // which is this installation's log's, nor does signing it move the record (found by a
    // review: a scratch log's seal made the home's own log fail as rewritten).
    let copy = d.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    rusqlite::Connection::open(home.join("ice.db"))
        .unwrap()
        .execute("VACUUM INTO ?1", [copy.join("ice.db").to_str().unwrap()])
        .unwrap();
    cut(&copy);
    let other = format!("sqlite:{}", copy.join("ice.db").display());
    for args in [["verify"], ["checkpoint"]] {
        let mut all = vec!["--log", other.as_str()];
        all.extend(args);
        let o = ice(&home, &all);
        assert_eq!(code(&o), 0, "{args:?}: {}{}", stdout(&o), stderr(&o));
    }
    assert_eq!(
        std::fs::read_to_string(&record).unwrap(),
        note["note"].as_str().unwrap()
    );
    cut(&home);
    let stored = |home: &Path| -> (i64, i64) {
        let c = rusqlite::Connection::open(home.join("ice.db")).unwrap();
        let n = |t: &str| {
            c.query_row(&format!("SELECT COUNT(*) FROM {t}"), [], |r| r.get(0))
                .unwrap()
        };
        (n("events"), n("checkpoints"))
    };
    let o = ice(&home, &["verify"]);
    assert_eq!(code(&o), 5, "{}", stdout(&o));
    assert!(
        stdout(&o).contains(
            "the log ends at 5 events but the checkpoint this installation signed last (kept in"
        ) && stdout(&o).contains("covers 10"),
        "{}",
        stdout(&o)
    );
    let o = ice(&home, &["checkpoint"]);
    assert_eq!(code(&o), 5, "{}{}", stdout(&o), stderr(&o));
    assert!(
        stderr(&o).contains("refusing to sign a checkpoint")
            && stderr(&o).contains(
                "the log holds 5 events, but this installation signed a checkpoint of 10"
            ),
        "{}",
        stderr(&o)
    );
    assert_eq!(stored(&home), (5, 0), "nothing was signed");

    // The cut log grown back past 10 with other events: the first 10 no longer have the root
    // signed for them.
    let rt_ = tokio::runtime::Runtime::new().unwrap();
    rt_.block_on(async {
        let log = Arc::new(SqliteLog::open(&home.join("ice.db"), Mode::ReadWrite).unwrap());
        let ledger = Ledger::new(log, Arc::new(SystemClock));
        let run = RunId::new("gamma").unwrap();
        let drafts = ["RunProvisioned", "ContextResolved", "ExecutionWindowOpened"]
            .into_iter()
            .map(rt)
            .chain((0..4).map(|i| {
                Draft::new("InferenceStep", Origin::Agent("a1".into()))
                    .intent("think")
                    .payload(json!({"output": format!("step {i}")}))
            }))
            .collect();
        ledger.append(&run, drafts).await.unwrap();
    });
    let o = ice(&home, &["verify"]);
    assert_eq!(code(&o), 5, "{}", stdout(&o));
    assert!(
        stdout(&o).contains("the root of the first 10 events does not match the signed checkpoint of that size (the checkpoint this installation signed last"),
        "{}",
        stdout(&o)
    );
    let o = ice(&home, &["checkpoint"]);
    assert_eq!(code(&o), 5, "{}{}", stdout(&o), stderr(&o));
    assert!(
        stderr(&o)
            .contains("the first 10 events do not have the root this installation signed for them"),
        "{}",
        stderr(&o)
    );
    assert_eq!(stored(&home), (12, 0), "nothing was signed");

    // Given a key (an auditor's), the home's record is not used; a kept note still catches it.
    let key = home.join("keys/checkpoint.pub");
    let o = ice(&home, &["verify", "--key", key.to_str().unwrap()]);
    assert_eq!(
        code(&o),
        0,
        "alone, with the stored checkpoints removed, verify sees a consistent log: {}",
        stdout(&o)
    );
    for kept in [&kept_json, &kept_note] {
        let o = ice(
            &home,
            &[
                "verify",
                "--key",
                key.to_str().unwrap(),
                "--checkpoint",
                kept.to_str().unwrap(),
            ],
        );
        assert_eq!(code(&o), 5, "{}{}", stdout(&o), stderr(&o));
        assert!(
            stdout(&o).contains(&format!(
                "(the signed checkpoint given to check against ({}))",
                kept.display()
            )),
            "{}",
            stdout(&o)
        );
    }

    // A kept note must be signed by the log's key.
    let other = d.path().join("other");
    assert_eq!(code(&ice(&other, &["init", "--origin", "ice.test/cli"])), 0);
    let o = ice(&other, &["checkpoint"]);
    let foreign = d.path().join("foreign.note");
    std::fs::write(&foreign, stdout(&o)).unwrap();
    let o = ice(
        &home,
        &["verify", "--checkpoint", foreign.to_str().unwrap()],
    );
    assert_eq!(code(&o), 5, "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains("the signed checkpoint given to check against (")
            && stdout(&o).contains("foreign.note"),
        "{}",
        stdout(&o)
    );
    // So must the home's record: one replaced by another key's note is refused, not trusted.
    std::fs::copy(other.join("keys/last-checkpoint"), &record).unwrap();
    let o = ice(&home, &["verify"]);
    assert_eq!(code(&o), 5, "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains("the checkpoint this installation signed last"),
        "{}",
        stdout(&o)
    );
    let o = ice(&home, &["checkpoint"]);
    assert_eq!(code(&o), 5, "{}{}", stdout(&o), stderr(&o));
    // Moved aside (the documented way out, for a log restored from an older copy), signing
    // trusts what the log holds again.
    std::fs::remove_file(&record).unwrap();
    let o = ice(&home, &["checkpoint"]);
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    assert!(record.exists());
}

/// An operator's name given with --operator is recorded as given or refused, never quietly
/// changed (`ice token add` refuses the same names).
#[test]
fn an_operator_name_the_record_cannot_carry_is_refused_not_rewritten() {
    let (_d, home) = seeded();
    let before = stdout(&ice(&home, &["log", "--json"])).lines().count();
    let o = ice(&home, &["kill", "alpha", "--operator", "a:b"]);
    assert_eq!(code(&o), 1, "{}{}", stdout(&o), stderr(&o));
    assert!(stderr(&o).contains("--operator \"a:b\""), "{}", stderr(&o));
    assert_eq!(
        stdout(&ice(&home, &["log", "--json"])).lines().count(),
        before,
        "nothing was recorded"
    );
}

/// Checked with another log's key, the stored checkpoints do not verify: `verify` says so
/// (exit 5) and says which key it used, since the log itself may well be intact.
#[test]
fn verify_with_another_logs_key_names_the_key_it_used() {
    let (d, home) = seeded();
    assert_eq!(code(&ice(&home, &["checkpoint"])), 0);
    let other = d.path().join("other");
    assert_eq!(
        code(&ice(&other, &["init", "--origin", "ice.test/other"])),
        0
    );
    let key = other.join("keys/checkpoint.pub");
    let o = ice(&home, &["verify", "--key", key.to_str().unwrap()]);
    assert_eq!(code(&o), 5, "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains(&format!("the key checked with is {}", key.display()))
            && stdout(&o).contains("the log may be intact"),
        "{}",
        stdout(&o)
    );
}

/// A checkpoint vouches for the events it covers, so `ice checkpoint` checks what the latest
/// one does not cover yet as deeply as `verify --deep` before signing. An event forged after
/// it, with its hash, tree nodes and the head made to agree (which the default `verify`
/// accepts: only its encoding gives it away), is refused with exit 5, and nothing is signed.
#[test]
fn a_forged_event_after_the_last_checkpoint_is_never_signed() {
    let (_d, home) = seeded();
    // No checkpoint yet: all ten events are new; the last one (beta:4) is forged.
    let db = home.join("ice.db");
    let c = rusqlite::Connection::open(&db).unwrap();
    c.execute_batch("DROP TRIGGER events_no_update; DROP TRIGGER tree_no_update;")
        .unwrap();
    let hashes: Vec<Vec<u8>> = c
        .prepare("SELECT hash FROM events ORDER BY log_seq")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(hashes.len(), 10);
    let body: Vec<u8> = c
        .query_row("SELECT body FROM events WHERE log_seq = 9", [], |r| {
            r.get(0)
        })
        .unwrap();
    let mut event: Value = serde_json::from_slice(&body).unwrap();
    event["intent"] = json!("write a file, with feeling");
    let forged = serde_json::to_vec_pretty(&event).unwrap();
    let hash = ice_kernel::Digest::of(&forged);
    let mut tree = ice_log::merkle::Frontier::new();
    for h in &hashes[..9] {
        tree.push(ice_log::merkle::leaf_hash(h));
    }
    let nodes = tree.push(ice_log::merkle::leaf_hash(&hash.0));
    c.execute(
        "UPDATE events SET body = ?1, hash = ?2 WHERE log_seq = 9",
        rusqlite::params![forged, hash.0.to_vec()],
    )
    .unwrap();
    for (id, h) in nodes {
        c.execute(
            "UPDATE tree SET hash = ?1 WHERE leaf_end = 9 AND level = ?2",
            rusqlite::params![h.0.to_vec(), id.level as i64],
        )
        .unwrap();
    }
    c.execute(
        "UPDATE head SET last = ?1",
        rusqlite::params![hash.0.to_vec()],
    )
    .unwrap();
    drop(c);

    let o = ice(&home, &["verify"]);
    assert_eq!(
        code(&o),
        0,
        "the default depth does not decode payloads: {}",
        stdout(&o)
    );
    let o = ice(&home, &["checkpoint"]);
    assert_eq!(code(&o), 5, "{}{}", stdout(&o), stderr(&o));
    assert!(
        stderr(&o).contains(
            "refusing to sign a checkpoint: the log does not verify since its latest checkpoint: log_seq 9 (beta:4)"
        ) && stderr(&o).contains("nothing was signed"),
        "{}",
        stderr(&o)
    );
    let o = ice(&home, &["verify", "--deep"]);
    assert_eq!(code(&o), 5, "{}", stdout(&o));
    let checkpoints: i64 = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("SELECT count(*) FROM checkpoints", [], |r| r.get(0))
        .unwrap();
    assert_eq!(checkpoints, 0, "nothing was signed");
}

/// A token entry that cannot be used is refused by every command that reads config.toml (not
/// only by `ice serve`, which uses the tokens), naming the file, the entry and what is wrong;
/// `ice token revoke` can still remove it.
#[test]
fn a_bad_token_entry_in_config_toml_is_refused_by_every_command_that_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("h");
    assert!(ice(&home, &["init"]).status.success());
    let config = home.join("config.toml");
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!(
            "{good}\n[[agents]]\nname = \"claude\"\ntoken_sha256 = \"{}\"\n\n[[agents]]\nname = \"bob\"\ntoken_sha256 = \"zz\"\n",
            "c".repeat(64)
        ),
    )
    .unwrap();
    let bad = std::fs::read_to_string(&config).unwrap();
    let want = format!(
        "{}: [[agents]] entry 2: agent \"bob\": token_sha256 \"zz\" (2 characters) is not the SHA-256 of a token (64 hex characters)",
        config.display()
    );
    for args in [
        &["token", "list"][..],
        &["token", "list", "--json"],
        &["token", "add", "--operator", "alice"],
        &["runs"],
        &["log"],
        &["verify"],
        &["checkpoint"],
        &["approvals"],
        &["policy", "check"],
    ] {
        let o = ice(&home, args);
        assert_eq!(code(&o), 1, "{args:?}: {}{}", stdout(&o), stderr(&o));
        assert!(stderr(&o).contains(&want), "{args:?}: {}", stderr(&o));
        assert!(stdout(&o).is_empty(), "{args:?}: {}", stdout(&o));
    }
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        bad,
        "nothing was added"
    );
    // The bad entry's own removal is not refused; the config then reads again.
    let o = ice(&home, &["token", "revoke", "--agent", "bob"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = ice(&home, &["token", "list", "--json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let listed: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["name"], "claude");

    // A bad name, and one token listed for two holders, are refused the same way.
    for (extra, want) in [
        (
            format!(
                "[[operators]]\nname = \"a b\"\ntoken_sha256 = \"{}\"\n",
                "d".repeat(64)
            ),
            "[[operators]] entry 1: operator id \"a b\"".to_string(),
        ),
        (
            format!(
                "[[metrics_readers]]\nname = \"prom\"\ntoken_sha256 = \"{}\"\n",
                "C".repeat(64)
            ),
            "[[metrics_readers]] entry 1: metrics \"prom\": token_sha256 is also agent \"claude\"'s"
                .to_string(),
        ),
    ] {
        std::fs::write(&config, format!("{good}\n[[agents]]\nname = \"claude\"\ntoken_sha256 = \"{}\"\n\n{extra}", "c".repeat(64))).unwrap();
        let o = ice(&home, &["token", "list"]);
        assert_eq!(code(&o), 1, "{}", stderr(&o));
        assert!(stderr(&o).contains(&want), "{want}: {}", stderr(&o));
        assert!(stderr(&o).contains("config.toml: "), "{}", stderr(&o));
    }
}

/// `ice init --home FILE` says FILE is a file, not that a directory is not empty.
#[test]
fn init_on_a_file_says_it_is_a_file_not_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, "mine\n").unwrap();
    let o = ice(&file, &["init"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains(&format!("{} is a file, not a directory", file.display())),
        "{err}"
    );
    assert!(!err.contains("not empty"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine\n");
    // Other commands say it is not a directory, hence not a home.
    let o = ice(&file, &["runs"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("is not a directory, so not an ICE home"),
        "{}",
        stderr(&o)
    );
    // A non-empty directory is still "not empty".
    let o = ice(dir.path(), &["init"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("is not empty"), "{}", stderr(&o));
}

/// A bad `ICE_CLAIM_TTL_MS` is refused by the commands that drive runs (take or renew run
/// claims), naming the variable and the value; nothing is recorded. Commands that take no
/// claim (reading, answering an approval) are not its business and are not refused for it.
#[test]
fn a_bad_claim_ttl_in_the_environment_is_refused_not_ignored() {
    let (_d, home) = seeded();
    let before = stdout(&ice(&home, &["log", "--json"])).lines().count();
    for (value, why) in [
        ("abc", "is not a whole number of milliseconds"),
        ("-1", "is not a whole number of milliseconds"),
        ("0", "a claim lifetime of 0 ms is out of range"),
        ("99999999999", "out of range"),
    ] {
        for args in [
            &["kill", "alpha"][..],
            &["memory", "deprecate", "alpha:3", "--reason", "old"],
        ] {
            let o = Command::new(env!("CARGO_BIN_EXE_ice"))
                .arg("--home")
                .arg(&home)
                .args(args)
                .env_remove("ICE_HOME")
                .env("ICE_CLAIM_TTL_MS", value)
                .output()
                .unwrap();
            assert_eq!(code(&o), 1, "{value} {args:?}: {}", stderr(&o));
            let err = stderr(&o);
            assert!(
                err.contains(&format!("ICE_CLAIM_TTL_MS={value:?}")) && err.contains(why),
                "{value} {args:?}: {err}"
            );
        }
        // Commands that drive no run, as `runs`, `verify` and `checkpoint`: not refused.
        for args in [
            &["approvals"][..],
            &["diff", "alpha"],
            &["replay", "alpha", "--json"],
            &["runs"],
        ] {
            let o = Command::new(env!("CARGO_BIN_EXE_ice"))
                .arg("--home")
                .arg(&home)
                .args(args)
                .env_remove("ICE_HOME")
                .env("ICE_CLAIM_TTL_MS", value)
                .output()
                .unwrap();
            assert!(
                !stderr(&o).contains("ICE_CLAIM_TTL_MS"),
                "{value} {args:?}: {}",
                stderr(&o)
            );
        }
        let o = Command::new(env!("CARGO_BIN_EXE_ice"))
            .arg("--home")
            .arg(&home)
            .args(["approvals"])
            .env_remove("ICE_HOME")
            .env("ICE_CLAIM_TTL_MS", value)
            .output()
            .unwrap();
        assert_eq!(code(&o), 0, "{value}: {}", stderr(&o));
    }
    assert_eq!(
        stdout(&ice(&home, &["log", "--json"])).lines().count(),
        before,
        "nothing was recorded"
    );
    // A good value is taken.
    let o = Command::new(env!("CARGO_BIN_EXE_ice"))
        .arg("--home")
        .arg(&home)
        .args(["approvals"])
        .env_remove("ICE_HOME")
        .env("ICE_CLAIM_TTL_MS", "1500")
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

/// A token pasted where its digest belongs is never printed, however it is written (quoted,
/// upper-cased, after `Bearer`, inside other text, or unquoted, which makes config.toml fail
/// to parse): every command says which line, its length and what is wrong.
#[test]
fn a_token_in_config_toml_is_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("h");
    assert!(ice(&home, &["init"]).status.success());
    let config = home.join("config.toml");
    let good = std::fs::read_to_string(&config).unwrap();
    let secret = "ice_SECRETxSECRETxSECRETxSECRETxSECRETxSECRETx";
    let head = format!("{good}\n[[agents]]\nname = \"bob\"\n");
    let at = format!(":{}:16: not a valid ICE config", head.lines().count() + 1);
    for (value, want) in [
        (format!("\"Bearer {secret}\""), "looks like a token itself"),
        (format!("\"'{secret}'\""), "looks like a token itself"),
        (
            format!("\"{}\"", secret.to_ascii_uppercase()),
            "looks like a token itself",
        ),
        (format!("\"my {secret} here\""), "looks like a token itself"),
        (format!("'{secret}'"), "looks like a token itself"),
        (secret.to_string(), at.as_str()),
        (format!("{secret} # pasted"), at.as_str()),
    ] {
        std::fs::write(&config, format!("{head}token_sha256 = {value}\n")).unwrap();
        for args in [&["runs"][..], &["approvals"], &["token", "list"]] {
            let o = ice(&home, args);
            assert_eq!(code(&o), 1, "{value} {args:?}: {}", stderr(&o));
            let err = stderr(&o);
            assert!(err.contains(want), "{value} {args:?}: {err}");
            assert!(
                !err.to_ascii_lowercase().contains("secretx"),
                "{value} {args:?}: {err}"
            );
            assert!(!stdout(&o).to_ascii_lowercase().contains("secretx"));
        }
    }
    // The parse error still says where, and what the line is when it holds no token.
    std::fs::write(&config, format!("{good}\nlog = = 1\n")).unwrap();
    let o = ice(&home, &["runs"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("log = = 1"), "{}", stderr(&o));
}

/// `ice token revoke` removes an entry whose `token_sha256` is missing or not a string (the
/// config does not read as an ICE config then): the file is edited as TOML.
#[test]
fn token_revoke_removes_an_entry_whose_digest_is_missing_or_not_a_string() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("h");
    assert!(ice(&home, &["init"]).status.success());
    let config = home.join("config.toml");
    let good = std::fs::read_to_string(&config).unwrap();
    for entry in ["token_sha256 = 5\n", "", "token_sha256 = [1]\n"] {
        std::fs::write(
            &config,
            format!(
                "{good}\n[[agents]]\nname = \"claude\"\ntoken_sha256 = \"{}\"\n\n[[agents]]\nname = \"bob\"\n{entry}",
                "c".repeat(64)
            ),
        )
        .unwrap();
        let o = ice(&home, &["runs"]);
        assert_eq!(code(&o), 1, "{entry:?}: {}", stderr(&o));
        let o = ice(&home, &["token", "revoke", "--agent", "bob"]);
        assert_eq!(code(&o), 0, "{entry:?}: {}", stderr(&o));
        let o = ice(&home, &["token", "list", "--json"]);
        assert_eq!(code(&o), 0, "{entry:?}: {}", stderr(&o));
        let listed: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
        assert_eq!(listed[0]["name"], "claude");
    }
    // A name that is not there: said, nothing written.
    let before = std::fs::read_to_string(&config).unwrap();
    let o = ice(&home, &["token", "revoke", "--agent", "nobody"]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("holds no token of agent \"nobody\""),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read_to_string(&config).unwrap(), before);
}

/// A command ICE runs (an agent's `process.exec`, a validation check, a tool server) runs as
/// ICE's user: it must not read ICE's environment (model API keys, log URLs) from
/// /proc/PPID/environ. A process of the same user that is not ICE (`sleep`) shows the check can
/// see an environment at all.
#[test]
fn another_process_of_the_same_user_cannot_read_ices_environment() {
    use std::os::unix::fs::PermissionsExt;
    let (d, home) = seeded();
    // As root, both sides run as `nobody` (root reads every process's files); otherwise as the
    // user running the test.
    let root = unsafe { libc::geteuid() } == 0;
    let as_user = |program: &str| {
        let mut c = if root {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", program]);
            c
        } else {
            Command::new(program)
        };
        c.env("ICE_TEST_SECRET", "s3cr3t-in-the-environment");
        c
    };
    if root {
        for entry in walk(d.path()) {
            let mode = if entry.is_dir() { 0o777 } else { 0o666 };
            std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(mode)).unwrap();
        }
    }
    let readable = |pid: u32| {
        let o = as_user("cat")
            .arg(format!("/proc/{pid}/environ"))
            .output()
            .unwrap();
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("s3cr3t")
    };
    let mut control = as_user("sleep").arg("30").spawn().unwrap();
    let mut ice = as_user(env!("CARGO_BIN_EXE_ice"))
        .arg("--home")
        .arg(&home)
        .args(["log", "--follow"])
        .env_remove("ICE_HOME")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let (control_seen, ice_seen) = (readable(control.id()), readable(ice.id()));
    let _ = control.kill();
    let _ = ice.kill();
    let _ = control.wait();
    let status = ice.wait().unwrap();
    assert!(
        control_seen,
        "the check cannot read a same-user process's environment here"
    );
    assert!(
        !ice_seen,
        "ICE's environment was readable by another process of its user ({status})"
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_kept_checkpoint_replaced_by_what_cannot_be_one_is_a_verdict() {
    // Replacing the record with something that is not a note must not turn `verify`'s verdict
    // into an error that could be taken for a broken tool (found in session 23's review).
    let (_d, home) = seeded();
    let o = ice(&home, &["checkpoint"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let record = home.join("keys/last-checkpoint");
    let replace_with_dir = |p: &Path| {
        std::fs::remove_file(p).unwrap();
        std::fs::create_dir(p).unwrap();
    };
    let replace_with_bytes = |p: &Path| std::fs::write(p, [0xff, 0xfe, 0x00]).unwrap();
    // A link to an endless file: never followed, never read (the review's finding: the
    // record was checked, then read following links, with no limit).
    let replace_with_link = |p: &Path| {
        std::fs::remove_dir(p).unwrap();
        std::os::unix::fs::symlink("/dev/zero", p).unwrap();
    };
    for (replace, why) in [
        (
            &replace_with_bytes as &dyn Fn(&Path),
            "it is not UTF-8 text",
        ),
        (&replace_with_dir, "it is not a regular file"),
        (&replace_with_link, "it is a symbolic link"),
    ] {
        replace(&record);
        let o = ice(&home, &["verify"]);
        assert_eq!(code(&o), 5, "{}{}", stdout(&o), stderr(&o));
        assert!(
            stdout(&o).contains("the checkpoint this installation signed last (kept in")
                && stdout(&o).contains(&format!("cannot be read: {why}")),
            "{}",
            stdout(&o)
        );
        let o = ice(&home, &["verify", "--json"]);
        assert_eq!(code(&o), 5, "{}", stderr(&o));
        let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
        assert!(
            v["failure"]["problem"].as_str().unwrap().contains(why),
            "{v}"
        );
        // Signing over it is refused (the record is not replaced by a new one), exit non-zero.
        let o = ice(&home, &["checkpoint"]);
        assert_ne!(code(&o), 0, "{}", stdout(&o));
        assert!(stderr(&o).contains(why), "{}", stderr(&o));
    }
}

/// The probe's finding: `ice migrate` into a log that is not empty (the source itself, say)
/// was refused with advice to remove "the partial copy" it had not written: following it
/// would delete a whole log. The refusal says nothing was written, and names the source.
#[test]
fn migrate_into_a_log_that_is_not_empty_says_nothing_was_written() {
    let (_d, home) = seeded();
    let db = home.join("ice.db");
    let before = std::fs::read(&db).unwrap();
    let url = format!("sqlite:{}", db.display());
    let o = ice(&home, &["migrate", "--from", &url, "--to", &url]);
    assert_eq!(code(&o), 1, "{}{}", stdout(&o), stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("Nothing was written")
            && err.contains("it is the source")
            && !err.contains("partial copy"),
        "{err}"
    );
    assert_eq!(std::fs::read(&db).unwrap(), before);
}

/// The probe's finding: a log SQLite could not open for want of file descriptors was called
/// "not an ICE log", which sends its owner looking for damage that is not there. How many
/// descriptors `verify` needs differs between hosts (threads, SQLite's files), so every limit
/// from nothing up to the first that suffices is tried: each failure must be a clear error.
#[test]
fn a_log_that_cannot_be_opened_for_want_of_descriptors_is_not_called_foreign() {
    let (_d, home) = seeded();
    let mut failures = 0;
    let mut verified_at = None;
    for limit in 4..=64 {
        let o = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ulimit -n {limit}; exec {} --home {} verify",
                env!("CARGO_BIN_EXE_ice"),
                home.display()
            ))
            .output()
            .unwrap();
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        if o.status.code() == Some(0) {
            verified_at = Some(limit);
            break;
        }
        failures += 1;
        assert_ne!(
            o.status.code(),
            Some(101),
            "a panic at {limit} descriptors: {all}"
        );
        assert!(
            !all.contains("not an ICE log"),
            "at {limit} descriptors: {all}"
        );
        assert!(!all.trim().is_empty(), "no message at {limit} descriptors");
    }
    assert!(failures > 0, "verify needed no descriptors at all");
    assert!(
        verified_at.is_some(),
        "verify failed even with 64 descriptors"
    );
    // With descriptors enough, the same log verifies.
    assert_eq!(code(&ice(&home, &["verify"])), 0);
}

/// A carried gap: `ice init` removes what it made when it fails part way (so the same command
/// can run again once the cause is fixed), and nothing else, but no test made it fail part
/// way. Here the home's path leaves no room for `keys/checkpoint.key` (PATH_MAX): the keys
/// directory is made, the key cannot be written.
#[test]
fn a_failed_init_removes_what_it_made_and_nothing_else() {
    let base = tempfile::tempdir().unwrap();
    // Parents the test makes (they stay), then the home: 4076 bytes, so that
    // `HOME/keys/checkpoint.key` is 4096, one more than a path may be.
    let mut parent = base.path().to_path_buf();
    while parent.as_os_str().len() + 201 < 4076 - 40 {
        parent.push("d".repeat(200));
    }
    std::fs::create_dir_all(&parent).unwrap();
    let room = 4076 - parent.as_os_str().len() - 1;
    let home = parent.join("h".repeat(room));
    assert_eq!(home.as_os_str().len(), 4076);
    std::fs::write(parent.join("mine.txt"), "keep\n").unwrap();

    // The home did not exist: it is gone again.
    let o = ice(&home, &["init"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("checkpoint.key"), "{}", stderr(&o));
    assert!(!home.exists(), "the half-made home was left");
    // It existed, empty: it is empty again.
    std::fs::create_dir(&home).unwrap();
    let o = ice(&home, &["init"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(home.is_dir());
    assert_eq!(std::fs::read_dir(&home).unwrap().count(), 0);
    // Nothing beside it was touched.
    assert_eq!(
        std::fs::read_to_string(parent.join("mine.txt")).unwrap(),
        "keep\n"
    );
}
