//! `ice run` and the operator commands as scripts see them, in separate processes: the
//! quickstart example, approvals answered from another process, kill, and a SIGKILL in the
//! middle of a commit followed by recovery.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;

fn ice_cmd(home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ice"));
    c.arg("--home").arg(home).env_remove("ICE_HOME");
    c
}

fn ice(home: &Path, args: &[&str]) -> Output {
    ice_cmd(home).args(args).output().expect("ice runs")
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited")
}

fn text(o: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &p);
        } else {
            std::fs::copy(e.path(), p).unwrap();
        }
    }
}

/// A fresh home and a copy of examples/quickstart, its endpoint on `port`.
fn setup(port: u16) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let o = ice(&home, &["init", "--origin", "ice.test/runs"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let qs = dir.path().join("quickstart");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/quickstart");
    copy_dir(&example, &qs);
    std::fs::write(dir.path().join("outside.txt"), "not yours\n").unwrap();
    for f in ["plan.toml", "policies/quickstart.cedar"] {
        let p = qs.join(f);
        let t = std::fs::read_to_string(&p)
            .unwrap()
            .replace("8765", &port.to_string());
        std::fs::write(p, t).unwrap();
    }
    let spec = qs.join("run.toml");
    let t = std::fs::read_to_string(&spec)
        .unwrap()
        .replace("timeout = \"3s\"", "timeout = \"2s\"");
    std::fs::write(&spec, t).unwrap();
    (dir, home, qs)
}

/// A local endpoint answering every request with 200; returns its port and what it saw.
fn endpoint() -> (u16, std::sync::mpsc::Receiver<String>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut buf = vec![0u8; 65536];
            let mut got = Vec::new();
            s.set_read_timeout(Some(Duration::from_millis(500))).ok();
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                let t = String::from_utf8_lossy(&got);
                if let Some(i) = t.find("\r\n\r\n") {
                    let len = t[..i]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if got.len() >= i + 4 + len {
                        break;
                    }
                }
            }
            let _ = tx.send(String::from_utf8_lossy(&got).into_owned());
            let _ = s.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\nconnection: close\r\n\r\nthanks\n",
            );
        }
    });
    (port, rx)
}

fn pending(home: &Path) -> Vec<Value> {
    let o = ice(home, &["approvals", "--json"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn the_quickstart_run_commits_with_an_operator_in_another_process() {
    let (port, seen) = endpoint();
    let (_dir, home, qs) = setup(port);
    let child = ice_cmd(&home)
        .args(["run", qs.join("run.toml").to_str().unwrap(), "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The operator: leaves the first approval unanswered (it times out), approves the second.
    let mut first: Option<String> = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut approved = false;
    while !approved && Instant::now() < deadline {
        for p in pending(&home) {
            let id = p["id"].as_str().unwrap().to_string();
            assert_eq!(p["capability"], "http.request");
            match &first {
                None => first = Some(id),
                Some(f) if *f == id => {}
                Some(_) => {
                    let o = ice(&home, &["approve", &id, "--operator", "alice"]);
                    assert_eq!(code(&o), 0, "{}", text(&o));
                    approved = true;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(approved, "no second approval request appeared");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["outcome"], "committed");
    let reasons: Vec<&str> = report["denials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons,
        ["confinement", "policy_denied", "approval_timeout"]
    );
    // Two of them refused what the agent asked for; an approval nobody answered is no refusal.
    assert!(
        report["budget"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!({"attribute": "denials", "spent": 2, "limit": 5})),
        "{report}"
    );
    assert_eq!(
        std::fs::read_to_string(qs.join("workspace/hello.txt")).unwrap(),
        "hello, governed world\n"
    );
    assert_eq!(
        std::fs::read_to_string(qs.join("workspace/locked/release.txt")).unwrap(),
        "release = \"1.0\"\n"
    );
    // The endpoint was called exactly once, after the approval.
    let req = seen.recv_timeout(Duration::from_secs(1)).unwrap();
    assert!(req.starts_with("POST /notify"), "{req}");
    assert!(req.ends_with("hello.txt changed"), "{req}");
    assert!(seen.try_recv().is_err());
    // The approval was recorded by the operator, and explain links the call to it.
    let call = first_event(&home, "APIRequestExecuted").expect("an APIRequestExecuted event");
    let id = format!("quickstart:{}", call["run_seq"]);
    let o = ice(&home, &["explain", &id, "--json"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let chain: Value = serde_json::from_slice(&o.stdout).unwrap();
    let types: Vec<&str> = chain["chain"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    for t in [
        "RunProvisioned",
        "CapabilityRequested",
        "ApprovalRequested",
        "ApprovalGranted",
        "CapabilityGranted",
        "CapabilityUsed",
        "APIRequestExecuted",
    ] {
        assert!(types.contains(&t), "{t} missing from {types:?}");
    }
    let granted = chain["chain"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "ApprovalGranted")
        .unwrap();
    assert_eq!(granted["origin"], "operator:alice");
    // The diff shows what landed.
    let o = ice(&home, &["diff", "quickstart", "--json"]);
    let diff: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(diff[0]["path"], "hello.txt");
    assert_eq!(diff[0]["status"], "applied");
    // Approvals cannot be answered twice.
    let o = ice(&home, &["approve", first.as_deref().unwrap()]);
    assert_eq!(code(&o), 1, "{}", text(&o));
    // The runaway run is stopped by its budget: exit 3.
    let o = ice(&home, &["run", qs.join("runaway.toml").to_str().unwrap()]);
    assert_eq!(code(&o), 3, "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("budget_exhausted"),
        "{}",
        text(&o)
    );
    let o = ice(&home, &["verify"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    // Each run ended with a signed checkpoint, so cutting the log's tail is caught.
    let o = ice(&home, &["verify", "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["checkpoints_verified"], 2, "{v}");
    assert_eq!(v["latest_checkpoint"], v["events"], "{v}");
    let db = rusqlite::Connection::open(home.join("ice.db")).unwrap();
    db.execute_batch(
        "DROP TRIGGER IF EXISTS events_no_delete; DELETE FROM events WHERE log_seq = (SELECT MAX(log_seq) FROM events);",
    )
    .unwrap();
    drop(db);
    let o = ice(&home, &["verify"]);
    assert_eq!(code(&o), 5, "{}", text(&o));
}

/// The finding: an agent's intent (and any text it wrote) reached the operator's terminal
/// raw, so an escape sequence could clear the screen and draw a harmless-looking line beside
/// an approval. Every human-readable view shows control and bidirectional characters escaped.
#[test]
fn text_an_agent_wrote_cannot_drive_the_operators_terminal() {
    let (_dir, home, qs) = setup(1);
    let plan = "agent = \"coder\"\n\n[[step]]\nintent = \"\\u001B[2J\\u001B[1;1Hinnocent\\rOVERWRITE\\u009B31m\\nfake line \\u202Eevil\"\ncapability = \"fs.write\"\ntarget = \"hello.txt\"\narguments = { content = \"ok governed\\u001B[31m\\tred\\n\" }\n\n[[step]]\nintent = \"odd key\"\ncapability = \"fs.read\"\ntarget = \"hello.txt\"\narguments = { \"\\u001B[2Jkey\" = 1 }\n";
    std::fs::write(qs.join("plan.toml"), plan).unwrap();
    let o = ice(
        &home,
        &["run", "--verbose", qs.join("run.toml").to_str().unwrap()],
    );
    assert_eq!(code(&o), 0, "{}", text(&o));
    let escaped =
        "\\u{1b}[2J\\u{1b}[1;1Hinnocent\\u{d}OVERWRITE\\u{9b}31m\\u{a}fake line \\u{202e}evil";
    let raw = |b: &[u8]| {
        let t = String::from_utf8_lossy(b);
        t.contains('\u{1b}') || t.contains('\u{9b}') || t.contains('\u{202e}') || t.contains('\r')
    };
    assert!(
        !raw(&o.stderr) && String::from_utf8_lossy(&o.stderr).contains(escaped),
        "{}",
        text(&o)
    );
    // The summary's denials (the refused argument's name is the agent's) are escaped too.
    assert!(!raw(&o.stdout), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout)
            .contains("`\\u{1b}[2Jkey` is not an argument of fs.read"),
        "{}",
        text(&o)
    );
    let o = ice(&home, &["log", "--run", "quickstart"]);
    assert!(!raw(&o.stdout), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("\\u{1b}[2J"),
        "{}",
        text(&o)
    );
    let requested = first_event(&home, "CapabilityRequested").unwrap();
    let id = format!("quickstart:{}", requested["run_seq"]);
    let o = ice(&home, &["explain", &id]);
    assert!(
        !raw(&o.stdout) && String::from_utf8_lossy(&o.stdout).contains(escaped),
        "{}",
        text(&o)
    );
    // `ice show` prints the event as JSON, which escapes C0 controls but not C1 or bidi.
    let o = ice(&home, &["show", &id]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert!(
        !raw(&o.stdout) && String::from_utf8_lossy(&o.stdout).contains("\\u{202e}evil"),
        "{}",
        text(&o)
    );
    // The machine-readable forms keep the text as recorded.
    let o = ice(&home, &["show", &id, "--json"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains('\u{202e}'),
        "{}",
        text(&o)
    );
    let o = ice(&home, &["log", "--run", "quickstart", "--json"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("\\u001b[2J"),
        "{}",
        text(&o)
    );
}

/// The finding: `replay --drive` of a plan run read the plan file as it is now, so an edited
/// plan showed as a divergence of the run (and a resume would follow the new plan). The run
/// records the plan's digest; a plan that differs is not used to drive it, and says why.
#[test]
fn a_plan_changed_since_the_run_is_not_used_to_re_drive_it() {
    let (_dir, home, qs) = setup(1);
    let plan = writes(1);
    std::fs::write(qs.join("plan.toml"), &plan).unwrap();
    let o = ice(&home, &["run", qs.join("run.toml").to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let provisioned = first_event(&home, "RunProvisioned").unwrap();
    let digest = provisioned["payload"]["spec"]["plan_sha256"]
        .as_str()
        .unwrap_or_else(|| panic!("{provisioned}"))
        .to_string();
    assert_eq!(digest.len(), 64);
    let o = ice(&home, &["replay", "--drive", "quickstart", "--json"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["drive"]["unchecked"], json!([]), "{r:#}");
    std::fs::write(
        qs.join("plan.toml"),
        plan.replace("intent = \"w\"", "intent = \"x\""),
    )
    .unwrap();
    // No divergence, but nothing was re-driven either: not a pass (the probe's finding: it
    // exited 0, "no divergence", as if every decision had been re-made).
    let o = ice(&home, &["replay", "--drive", "quickstart", "--json"]);
    assert_eq!(code(&o), 1, "{}", text(&o));
    assert!(
        text(&o).contains("--drive re-drove nothing, so no decision was re-made"),
        "{}",
        text(&o)
    );
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["divergences"], json!([]), "{r:#}");
    let unchecked = r["drive"]["unchecked"].to_string();
    assert!(
        unchecked.contains("the plan file is not the one the run was started with")
            && unchecked.contains(&digest),
        "{r:#}"
    );
    // Without --drive, the replay from the log alone still passes.
    let o = ice(&home, &["replay", "quickstart"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
}

/// A plan (agent `coder`, no approvals) of the first `n` of three writes: `hello.txt`, `b.txt`,
/// `c.txt`, with intents `w`, `w2`, `w3`.
fn writes(n: usize) -> String {
    let steps = [
        ("w", "hello.txt", "hello, governed world"),
        ("w2", "b.txt", "b"),
        ("w3", "c.txt", "c"),
    ];
    let mut plan = "agent = \"coder\"\n".to_string();
    for (intent, target, content) in &steps[..n] {
        plan.push_str(&format!(
            "\n[[step]]\nintent = \"{intent}\"\ncapability = \"fs.write\"\ntarget = \"{target}\"\narguments = {{ content = \"{content}\\n\" }}\n"
        ));
    }
    plan
}

/// Start-up recovery runs before the next run: run the quickstart's runaway spec, which
/// recovers run `quickstart` first and says so.
fn recovered_by_the_next_run(home: &Path, qs: &Path) {
    let o = ice(home, &["run", qs.join("runaway.toml").to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("recovered run quickstart"),
        "{}",
        text(&o)
    );
}

/// Run the quickstart spec with a pause inside the commit, SIGKILL it there, recover.
fn killed_in_commit(pause_after: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let (dir, home, qs) = setup(1);
    // No approvals in this plan: only the file steps.
    let plan = writes(3);
    std::fs::write(qs.join("plan.toml"), &plan).unwrap();
    kill_when_paused(
        &home,
        &qs,
        ("ICE_TEST_PAUSE_IN_COMMIT", pause_after),
        "paused in commit",
    );
    (dir, home, qs)
}

/// Run the quickstart spec with the test hook `env` set, and SIGKILL it once it says `marker`.
fn kill_when_paused(home: &Path, qs: &Path, env: (&str, &str), marker: &str) {
    sigkill_when_paused(
        home,
        &["run", qs.join("run.toml").to_str().unwrap()],
        env,
        marker,
    );
}

/// Run `ice ARGS` with the test hook `env` set, and SIGKILL it once it says `marker`.
fn sigkill_when_paused(home: &Path, args: &[&str], env: (&str, &str), marker: &str) {
    let mut child = ice_cmd(home)
        .args(args)
        .env(env.0, env.1)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "the run ended without pausing"
        );
        if line.contains(marker) {
            break;
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

fn workspace_files(qs: &Path) -> Vec<(String, String)> {
    let ws = qs.join("workspace");
    ["hello.txt", "b.txt", "c.txt"]
        .iter()
        .map(|f| {
            (
                f.to_string(),
                std::fs::read_to_string(ws.join(f)).unwrap_or_else(|_| "<absent>".into()),
            )
        })
        .collect()
}

#[test]
#[cfg_attr(
    not(debug_assertions),
    ignore = "pauses the ice binary with its debug-only test hooks"
)]
fn sigkill_during_commit_then_recovery_leaves_everything_applied_and_says_so() {
    let (_dir, home, qs) = killed_in_commit("1");
    // Killed after the first of three changes was applied.
    let before = workspace_files(&qs);
    assert_eq!(
        before.iter().filter(|(_, c)| c != "<absent>").count(),
        2,
        "{before:?}"
    );
    recovered_by_the_next_run(&home, &qs);
    assert_eq!(
        workspace_files(&qs),
        [
            (
                "hello.txt".to_string(),
                "hello, governed world\n".to_string()
            ),
            ("b.txt".to_string(), "b\n".to_string()),
            ("c.txt".to_string(), "c\n".to_string()),
        ]
    );
    let e = first_event(&home, "RunCommitted").expect("a RunCommitted event");
    assert_eq!(e["payload"]["completed_by_recovery"], true);
    assert_eq!(code(&ice(&home, &["verify"])), 0);
}

#[test]
#[cfg_attr(
    not(debug_assertions),
    ignore = "pauses the ice binary with its debug-only test hooks"
)]
fn sigkill_before_the_commit_point_leaves_nothing_applied_and_says_so() {
    let (_dir, home, qs) = killed_in_commit("0");
    let o = ice(&home, &["run", qs.join("runaway.toml").to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("recovered run quickstart"),
        "{}",
        text(&o)
    );
    assert_eq!(
        workspace_files(&qs),
        [
            ("hello.txt".to_string(), "hello\n".to_string()),
            ("b.txt".to_string(), "<absent>".to_string()),
            ("c.txt".to_string(), "<absent>".to_string()),
        ]
    );
    assert!(first_event(&home, "RunAborted").is_some());
    assert_eq!(code(&ice(&home, &["verify"])), 0);
}

/// The first event of type `ty` in run `quickstart`, as `ice log --json` prints it.
fn first_event(home: &Path, ty: &str) -> Option<Value> {
    let o = ice(
        home,
        &["log", "--run", "quickstart", "--type", ty, "--json"],
    );
    assert_eq!(code(&o), 0, "{}", text(&o));
    let line = o.stdout.split(|b| *b == b'\n').next()?;
    (!line.is_empty()).then(|| serde_json::from_slice(line).unwrap())
}

/// The types of run `quickstart`'s events, in order.
fn run_types(home: &Path) -> Vec<String> {
    let o = ice(home, &["log", "--run", "quickstart", "--json"]);
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

fn all_three_applied() -> Vec<(String, String)> {
    vec![
        (
            "hello.txt".to_string(),
            "hello, governed world\n".to_string(),
        ),
        ("b.txt".to_string(), "b\n".to_string()),
        ("c.txt".to_string(), "c\n".to_string()),
    ]
}

#[test]
#[cfg_attr(
    not(debug_assertions),
    ignore = "pauses the ice binary with its debug-only test hooks"
)]
fn sigkill_after_the_last_change_was_applied_then_recovery_records_the_commit() {
    // Every change is in the workspace, the commit is not yet recorded: recovery must not take
    // it for a commit that never started (abort, "nothing was applied").
    let (_dir, home, qs) = killed_in_commit("applied");
    assert_eq!(workspace_files(&qs), all_three_applied());
    let o = ice(&home, &["run", qs.join("runaway.toml").to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("recovered run quickstart"),
        "{}",
        text(&o)
    );
    assert_eq!(workspace_files(&qs), all_three_applied());
    let types = run_types(&home);
    assert!(types.contains(&"RunCommitted".to_string()), "{types:?}");
    assert!(!types.contains(&"RunAborted".to_string()), "{types:?}");
    assert_eq!(types.iter().filter(|t| *t == "EffectApplied").count(), 3);
    assert_eq!(code(&ice(&home, &["verify"])), 0);
}

#[test]
#[cfg_attr(
    not(debug_assertions),
    ignore = "pauses the ice binary with its debug-only test hooks"
)]
fn killing_a_run_stopped_past_its_commit_point_completes_the_commit() {
    // Stopped after the first of three changes: the commit point was passed, so a kill cannot
    // undo it; discarding the journal would leave the workspace part-way under a log that says
    // nothing reached it.
    let (_dir, home, qs) = killed_in_commit("1");
    let o = ice(&home, &["kill", "quickstart", "--reason", "stop"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout)
            .contains("was not killed: its commit had passed the commit point"),
        "{}",
        text(&o)
    );
    assert_eq!(workspace_files(&qs), all_three_applied());
    let types = run_types(&home);
    assert!(types.contains(&"RunKillRequested".to_string()), "{types:?}");
    assert!(types.contains(&"RunCommitted".to_string()), "{types:?}");
    assert!(!types.contains(&"RunAborted".to_string()), "{types:?}");
    assert_eq!(types.last().map(String::as_str), Some("RunTerminated"));
    assert_eq!(code(&ice(&home, &["verify"])), 0);
}

#[test]
#[cfg_attr(
    not(debug_assertions),
    ignore = "pauses the ice binary with its debug-only test hooks"
)]
fn a_commit_that_cannot_be_completed_is_abandoned_only_when_the_operator_says_so() {
    // Stopped past its commit point; then its workspace disappears, so the commit can be
    // neither completed nor undone.
    let (_dir, home, qs) = killed_in_commit("1");
    std::fs::remove_dir_all(qs.join("workspace")).unwrap();
    let o = ice(&home, &["kill", "quickstart", "--reason", "stop"]);
    assert_ne!(code(&o), 0, "{}", text(&o));
    assert!(
        text(&o).contains("cannot be aborted") && text(&o).contains("--abandon-commit"),
        "{}",
        text(&o)
    );
    let types = run_types(&home);
    assert!(!types.contains(&"RunTerminated".to_string()), "{types:?}");
    assert_eq!(code(&ice(&home, &["verify"])), 0);

    // The operator gives the commit up, and that process is SIGKILLed once the run's end is
    // recorded, before its teardown: the stage (journal included) is still where it was.
    sigkill_when_paused(
        &home,
        &["kill", "quickstart", "--reason", "gone", "--abandon-commit"],
        ("ICE_TEST_PAUSE_BEFORE_TEARDOWN", "1"),
        "paused before teardown",
    );
    let types = run_types(&home);
    assert_eq!(
        types.last().map(String::as_str),
        Some("RunTerminatedByRuntime")
    );
    assert!(home.join("runs/quickstart/stage/journal.json").exists());
    // Start-up recovery (before the next run, in a workspace made anew) finishes the
    // teardown, and keeps the stage rather than deleting it.
    std::fs::create_dir(qs.join("workspace")).unwrap();
    let o = ice(&home, &["run", qs.join("runaway.toml").to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("recovered run quickstart"),
        "{}",
        text(&o)
    );
    let types = run_types(&home);
    assert!(
        types.contains(&"RunTerminatedByRuntime".to_string()),
        "{types:?}"
    );
    assert!(!types.contains(&"RunCommitted".to_string()), "{types:?}");
    assert!(!types.contains(&"RunAborted".to_string()), "{types:?}");
    assert_eq!(types.last().map(String::as_str), Some("RunTerminated"));
    // The record names every change the commit would have made, and the stage is kept.
    let e = first_event(&home, "RunTerminatedByRuntime").expect("a RunTerminatedByRuntime event");
    let abandoned = &e["payload"]["abandoned_commit"];
    let paths: Vec<&str> = abandoned["changes"]
        .as_array()
        .unwrap_or_else(|| panic!("{e}"))
        .iter()
        .map(|c| c["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["b.txt", "c.txt", "hello.txt"], "{e}");
    let kept = PathBuf::from(abandoned["kept_at"].as_str().unwrap());
    assert!(kept.starts_with(home.join("runs")), "{kept:?}");
    assert!(kept.join("journal.json").exists(), "{kept:?}");
    assert!(!home.join("runs/quickstart/stage").exists());
    assert_eq!(code(&ice(&home, &["verify"])), 0);
    // `ice diff` shows the changes as abandoned (the workspace may hold them), not discarded,
    // with their content from the kept stage.
    let o = ice(&home, &["diff", "quickstart", "--json"]);
    let diff: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|_| panic!("{}", text(&o)));
    let statuses: Vec<&str> = diff
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["abandoned"; 3], "{diff}");
    let o = ice(&home, &["diff", "quickstart"]);
    assert!(text(&o).contains("hello, governed world"), "{}", text(&o));
    // The record replays as it was written, re-driven decisions included.
    for args in [
        &["replay", "quickstart"][..],
        &["replay", "--drive", "quickstart"][..],
    ] {
        let o = ice(&home, args);
        assert_eq!(code(&o), 0, "{args:?}: {}", text(&o));
    }
    // Ended: nothing more to kill.
    let o = ice(&home, &["kill", "quickstart", "--abandon-commit"]);
    assert_ne!(code(&o), 0, "{}", text(&o));
    assert!(text(&o).contains("already ended"), "{}", text(&o));
}

/// The same over the operator API: `POST /api/v1/runs/{run}/kill` refuses to abort a commit
/// past its commit point that cannot be completed, and with `abandon_commit` gives it up,
/// terminates the run and says where the stage was kept.
#[test]
#[cfg_attr(
    not(debug_assertions),
    ignore = "pauses the ice binary with its debug-only test hooks"
)]
fn the_api_abandons_a_commit_only_when_the_operator_says_so() {
    let (dir, home, qs) = killed_in_commit("1");
    std::fs::remove_dir_all(qs.join("workspace")).unwrap();
    let operator = common::token(&home, "operator", "alice");
    std::fs::create_dir_all(dir.path().join("ws")).unwrap();
    let spec = dir.path().join("mcp.toml");
    std::fs::write(
        &spec,
        "[run]\nagent = \"mcp-agent\"\nworkspace = \"ws\"\n[agent]\ndriver = \"external\"\n",
    )
    .unwrap();
    let mut serve = ice_cmd(&home);
    serve
        .current_dir(dir.path())
        .args(["serve", "--listen", "127.0.0.1:0", "--run-spec"])
        .arg(&spec);
    let (_served, mcp) = common::serve(serve);
    let addr = common::addr_of(&mcp);
    let bearer = format!("Bearer {operator}");
    let kill = |body: &str| {
        common::http(
            &addr,
            "POST",
            "/api/v1/runs/quickstart/kill",
            &[("Authorization", &bearer)],
            body,
        )
    };
    // Start-up recovery could neither complete nor undo the commit: the run is still there.
    let types = run_types(&home);
    assert!(!types.contains(&"RunTerminated".to_string()), "{types:?}");
    let (status, body) = kill(r#"{"reason": "stop"}"#);
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("abandon_commit"), "{body}");
    let types = run_types(&home);
    assert!(!types.contains(&"RunTerminated".to_string()), "{types:?}");

    let (status, body) = kill(r#"{"reason": "gone", "abandon_commit": true}"#);
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["run"], "quickstart", "{v}");
    assert_eq!(v["state"], "TERMINATED", "{v}");
    assert_eq!(v["killed"], true, "{v}");
    let kept = PathBuf::from(v["commit_abandoned"].as_str().unwrap());
    assert!(kept.starts_with(home.join("runs")), "{kept:?}");
    assert!(kept.join("journal.json").exists(), "{kept:?}");
    assert!(!home.join("runs/quickstart/stage").exists());
    let types = run_types(&home);
    assert!(
        types.contains(&"RunTerminatedByRuntime".to_string()),
        "{types:?}"
    );
    assert!(!types.contains(&"RunCommitted".to_string()), "{types:?}");
    assert_eq!(types.last().map(String::as_str), Some("RunTerminated"));
    let e = first_event(&home, "RunTerminatedByRuntime").expect("a RunTerminatedByRuntime event");
    assert_eq!(
        e["payload"]["abandoned_commit"]["kept_at"], v["commit_abandoned"],
        "{e}"
    );
    assert_eq!(code(&ice(&home, &["verify"])), 0);
    // Ended: nothing more to kill.
    let (status, body) = kill(r#"{"abandon_commit": true}"#);
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("already ended"), "{body}");
}

#[test]
fn bad_run_specs_and_plans_are_refused_with_file_and_line() {
    let (_dir, home, qs) = setup(1);
    std::fs::write(
        qs.join("plan.toml"),
        "[[step]]\nintent = \"x\"\ncapability = \"fs.read\"\n",
    )
    .unwrap();
    let o = ice(&home, &["run", qs.join("run.toml").to_str().unwrap()]);
    assert_eq!(code(&o), 1, "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("plan.toml:1:1: step 1: `fs.read` needs a `target`"),
        "{}",
        text(&o)
    );
    std::fs::write(qs.join("run.toml"), "[run]\nagent = 5\n").unwrap();
    let o = ice(&home, &["run", qs.join("run.toml").to_str().unwrap()]);
    assert_eq!(code(&o), 1, "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("run.toml:2:9"),
        "{}",
        text(&o)
    );
    // A run's id names its directory under the home and is typed into commands.
    for (id, why) in [
        ("..", "would name a directory above the run's own"),
        (".", "would name a directory above the run's own"),
        ("-1", "commands would read it as an option"),
    ] {
        std::fs::write(
            qs.join("run.toml"),
            format!("[run]\nid = \"{id}\"\nagent = \"coder\"\nworkspace = \"workspace\"\n[agent]\ndriver = \"plan\"\nplan = \"plan.toml\"\n"),
        )
        .unwrap();
        let o = ice(&home, &["run", qs.join("run.toml").to_str().unwrap()]);
        assert_eq!(code(&o), 1, "{id}: {}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("run.toml:1:1") && err.contains(why),
            "{id}: {}",
            text(&o)
        );
        assert!(
            !home.join("lock").exists(),
            "{id}: nothing is created in the home"
        );
    }
    // Nothing was recorded.
    let o = ice(&home, &["runs", "--json"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "[]");
}

#[test]
#[cfg_attr(
    not(debug_assertions),
    ignore = "pauses the ice binary with its debug-only test hooks"
)]
fn a_run_killed_after_it_ended_but_before_its_teardown_is_torn_down_by_recovery() {
    let (_dir, home, qs) = setup(1);
    let plan = writes(1);
    std::fs::write(qs.join("plan.toml"), &plan).unwrap();
    kill_when_paused(
        &home,
        &qs,
        ("ICE_TEST_PAUSE_BEFORE_TEARDOWN", "1"),
        "paused before teardown",
    );
    let last = |home: &Path| {
        let o = ice(home, &["log", "--run", "quickstart", "--json"]);
        let lines: Vec<Value> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        lines.last().unwrap()["type"].as_str().unwrap().to_string()
    };
    assert_eq!(last(&home), "RunCommitted");
    // Start-up recovery (before the next run) tears it down.
    let o = ice(&home, &["run", qs.join("runaway.toml").to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        err.contains("recovered run quickstart") && err.contains("teardown finished"),
        "{}",
        text(&o)
    );
    assert_eq!(last(&home), "RunTerminated");
    assert_eq!(code(&ice(&home, &["verify"])), 0);
}

/// A run whose only budget is its wall time is shown with that limit, not as having none;
/// a wall time of 0 is refused when the spec is loaded.
#[test]
fn a_wall_time_budget_is_shown_in_the_summary_and_zero_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let o = ice(&home, &["init", "--origin", "ice.test/runs"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let work = dir.path().join("work");
    std::fs::create_dir_all(work.join("ws")).unwrap();
    std::fs::write(work.join("plan.toml"), "[[step]]\nfinish = \"done\"\n").unwrap();
    let spec = work.join("run.toml");
    let write = |id: &str, wall: &str| {
        std::fs::write(
            &spec,
            format!("[run]\nid = \"{id}\"\nagent = \"coder\"\nworkspace = \"ws\"\n[agent]\ndriver = \"plan\"\nplan = \"plan.toml\"\n[budget]\nwall_time = \"{wall}\"\n"),
        )
        .unwrap();
    };
    write("timed", "60s");
    let o = ice(&home, &["run", spec.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with("budget:"))
        .unwrap_or_else(|| panic!("{}", text(&o)));
    assert!(!line.contains("none set"), "{line}");
    // What is counted against it: the execution window's elapsed time (what the limit applies
    // to), as the record's times say, not only time spent in effects (none here).
    let spent: u64 = line
        .split("wall_time_us ")
        .nth(1)
        .and_then(|t| t.split('/').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(
        line.contains(&format!(
            "wall_time_us {spent}/60000000 (execution window elapsed)"
        )),
        "{line}"
    );
    let window = |run: &str| {
        let o = ice(&home, &["log", "--run", run, "--json"]);
        let at = |t: &str| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .find(|e| e["type"] == t)
                .map(|e| e["at"].as_str().unwrap().to_string())
                .unwrap_or_else(|| panic!("no {t}"))
        };
        let us = |t: &str| {
            // RFC 3339 with microseconds, UTC: the seconds of the day are enough here.
            let at = at(t);
            let time = at.split('T').nth(1).unwrap().trim_end_matches('Z');
            let mut p = time.split(':');
            let (h, m, s): (i64, i64, f64) = (
                p.next().unwrap().parse().unwrap(),
                p.next().unwrap().parse().unwrap(),
                p.next().unwrap().parse().unwrap(),
            );
            (h * 3600 + m * 60) * 1_000_000 + (s * 1_000_000.0).round() as i64
        };
        (us("ValidationStarted") - us("ExecutionWindowOpened")).rem_euclid(86_400_000_000) as u64
    };
    assert_eq!(spent, window("timed"), "{line}");
    assert!(spent > 0, "{line}");
    write("timed-json", "2m");
    let o = ice(&home, &["run", spec.to_str().unwrap(), "--json"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let doc: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        doc["budget"],
        serde_json::json!([{"attribute": "wall_time_us", "spent": window("timed-json"), "limit": 120_000_000u64}]),
        "{doc}"
    );
    write("untimed", "0s");
    let o = ice(&home, &["run", spec.to_str().unwrap()]);
    assert_eq!(code(&o), 1, "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("run.toml:8:1: [budget] wall_time must be more than 0"),
        "{}",
        text(&o)
    );
    let o = ice(&home, &["runs", "--json"]);
    let runs: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(runs.len(), 2, "nothing recorded for the refused spec");
}

/// A run whose record holds a second answer to one approval (logs written before answers were
/// checked can; the chain verifies): `ice approvals` leaves it out with a warning naming it
/// and the refused event, and `ice explain` on that event says the fold refuses it.
#[test]
fn a_run_with_a_second_recorded_answer_is_left_out_of_approvals_and_explained() {
    use std::sync::Arc;

    use ice_authority::payload::ApprovalDeniedPayload;
    use ice_kernel::{CapabilityProposal, Draft, EventType, Outcome, Proposal};
    use ice_log::clock::SystemClock;
    use ice_log::ledger::Ledger;
    use ice_log::sqlite::{Mode, SqliteLog};
    use ice_runtime::{Installation, Quiet, RunSpec, Runtime};

    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    let home = base.join("home");
    let o = ice(&home, &["init", "--origin", "ice.test/runs"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    std::fs::create_dir_all(base.join("policies")).unwrap();
    std::fs::write(
        base.join("policies/p.cedar"),
        "@id(\"write-with-approval\")\n@approval(\"required\")\npermit(principal == Agent::\"coder\", action == Action::\"fs.write\", resource in Dir::\".\");\n",
    )
    .unwrap();
    std::fs::create_dir_all(base.join("workspace")).unwrap();
    std::fs::write(
        base.join("plan.toml"),
        "agent = \"coder\"\n[[step]]\nfinish = \"done\"\n",
    )
    .unwrap();
    std::fs::write(
        base.join("run.toml"),
        "[run]\nid = \"damaged\"\nagent = \"coder\"\nworkspace = \"workspace\"\npolicy = \"policies\"\n\n[agent]\ndriver = \"plan\"\nplan = \"plan.toml\"\n\n[approvals]\ntimeout = \"60s\"\n",
    )
    .unwrap();
    let forged = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let log = Arc::new(SqliteLog::open(&home.join("ice.db"), Mode::ReadWrite).unwrap());
        let ledger = Arc::new(Ledger::new(log, Arc::new(SystemClock)));
        let rt = Runtime::new(
            ledger,
            Arc::new(SystemClock),
            Installation {
                runs_dir: home.join("runs"),
                policy_dir: base.join("policies"),
            },
        )
        .unwrap();
        let spec = RunSpec::load(&base.join("run.toml")).unwrap();
        let session = rt.open_session(spec, "coder", &Quiet).await.unwrap();
        let run = session.run().clone();
        let write = Proposal::Request(CapabilityProposal {
            capability: "fs.write".into(),
            target: "notes.txt".into(),
            arguments: serde_json::json!({"content": "noted\n"}),
            intent: "write notes".into(),
        });
        let (outcome, approval) = tokio::join!(session.propose(&write), async {
            let deadline = Instant::now() + Duration::from_secs(30);
            let approval: ice_kernel::EventId = loop {
                if let Some(a) = rt.pending_approvals(Some(&run)).await.unwrap().first() {
                    break a.id.parse().unwrap();
                }
                assert!(Instant::now() < deadline, "no approval requested");
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            rt.answer_approval(&approval, "alice", true, "")
                .await
                .unwrap();
            approval
        });
        assert!(matches!(outcome.unwrap(), Some(Outcome::Done { .. })));
        // A second answer, past the runtime (the law does not read payloads).
        let draft = Draft::new(
            EventType::ApprovalDenied.name(),
            "operator:mallory".parse().unwrap(),
        )
        .payload(Value::Object(
            ApprovalDeniedPayload {
                approval: approval.clone(),
                reason: "changed my mind".into(),
            }
            .to_payload(),
        ))
        .cause(approval);
        let (_, batch) = rt.ledger().append(&run, vec![draft]).await.unwrap();
        drop(session);
        batch.events()[0].event().id().to_string()
    });
    let o = ice(&home, &["approvals"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("run damaged left out") && err.contains(&forged),
        "{}",
        text(&o)
    );
    let o = ice(&home, &["approvals", "--json"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert_eq!(
        serde_json::from_slice::<Value>(&o.stdout).unwrap(),
        serde_json::json!([])
    );
    let o = ice(&home, &["explain", &forged]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("REFUSED by the run's fold") && out.contains("already answered"),
        "{}",
        text(&o)
    );
    let o = ice(&home, &["explain", &forged, "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let refused: Vec<&Value> = v["chain"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e.get("refused_by_fold").is_some())
        .collect();
    assert_eq!(refused.len(), 1, "{v}");
    assert_eq!(
        refused[0]["run_seq"],
        forged.rsplit(':').next().unwrap().parse::<u64>().unwrap()
    );
}

/// The finding (policy probe): `ice reconfigure` printed "recorded reconfiguration …", then
/// failed to resume (the policy had changed and the record did not accept it) with an error
/// that did not say the record stays and the run is still suspended.
#[test]
fn a_reconfiguration_that_cannot_resume_the_run_says_it_is_recorded_and_the_run_suspended() {
    let (_dir, home, qs) = setup(1);
    std::fs::write(
        qs.join("plan2.toml"),
        "agent = \"coder\"\n\n[[step]]\nintent = \"r\"\ncapability = \"fs.read\"\ntarget = \"hello.txt\"\nrepeat = 2\n",
    )
    .unwrap();
    std::fs::write(
        qs.join("run2.toml"),
        "[run]\nid = \"budgeted\"\nagent = \"coder\"\nworkspace = \"workspace\"\npolicy = \"policies\"\n\n[agent]\ndriver = \"plan\"\nplan = \"plan2.toml\"\n\n[budget]\ntool_calls = 1\non_exhaustion = \"suspend\"\n",
    )
    .unwrap();
    let o = ice(&home, &["run", qs.join("run2.toml").to_str().unwrap()]);
    assert_eq!(code(&o), 4, "{}", text(&o));
    let policy = qs.join("policies/quickstart.cedar");
    let edited = std::fs::read_to_string(&policy).unwrap() + "\n// edited while suspended\n";
    std::fs::write(&policy, edited).unwrap();
    let record = qs.join("more.toml");
    std::fs::write(
        &record,
        "reason = \"more calls\"\n\n[budget]\ntool_calls = 5\n",
    )
    .unwrap();
    let o = ice(
        &home,
        &[
            "reconfigure",
            "budgeted",
            "--record",
            record.to_str().unwrap(),
        ],
    );
    assert_eq!(code(&o), 1, "{}", text(&o));
    assert!(
        text(&o).contains("is recorded, but run budgeted was not resumed and stays suspended"),
        "{}",
        text(&o)
    );
    let o = ice(&home, &["runs", "--json"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("SUSPENDED"),
        "{}",
        text(&o)
    );
}

/// `ice run` of the quickstart, its approvals given 60 s, started in the background (stdout
/// as given): it soon waits for an operator.
fn quickstart_waiting(stdout: Stdio) -> (tempfile::TempDir, PathBuf, std::process::Child) {
    quickstart_waiting_with(stdout, Stdio::null())
}

/// [`quickstart_waiting`], its stderr as given too.
fn quickstart_waiting_with(
    stdout: Stdio,
    stderr: Stdio,
) -> (tempfile::TempDir, PathBuf, std::process::Child) {
    let (port, _seen) = endpoint();
    let (dir, home, qs) = setup(port);
    let spec = qs.join("run.toml");
    let t = std::fs::read_to_string(&spec)
        .unwrap()
        .replace("timeout = \"2s\"", "timeout = \"60s\"");
    std::fs::write(&spec, t).unwrap();
    let child = ice_cmd(&home)
        .args(["run", spec.to_str().unwrap(), "--json"])
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .unwrap();
    (dir, home, child)
}

/// An approval whose waiting process died is listed as such (session 20 left it listed like
/// any other, answering refused): `ice approvals` says nobody waits and what happens next.
#[test]
fn an_approval_whose_process_died_is_listed_as_waited_for_by_nobody() {
    let (_dir, home, mut child) = quickstart_waiting(Stdio::null());
    let deadline = Instant::now() + Duration::from_secs(60);
    let id = loop {
        if let Some(p) = pending(&home).first() {
            assert_eq!(p["waiting"], true, "{p}");
            break p["id"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "no approval was asked for");
        std::thread::sleep(Duration::from_millis(100));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    let listed = pending(&home);
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(listed[0]["waiting"], false, "{listed:?}");
    // It says what can be done about this run (a run ICE drives: resume or kill it).
    assert!(
        listed[0]["advice"]
            .as_str()
            .is_some_and(|a| a.contains("ice reconfigure") && a.contains("ice kill")),
        "{listed:?}"
    );
    let o = ice(&home, &["approvals"]);
    assert!(
        text(&o).contains("nobody waits for it: the process that asked stopped"),
        "{}",
        text(&o)
    );
    assert!(text(&o).contains("ice reconfigure"), "{}", text(&o));
    let o = ice(&home, &["approve", &id, "--operator", "alice"]);
    assert_ne!(code(&o), 0, "{}", text(&o));
}

/// The probe's finding: `ice run` had no signal handling, so SIGTERM or Ctrl-C while a run
/// waited (for the model, an approval) left it EXECUTING with nothing recorded and no
/// checkpoint. A signal now kills the run as `ice kill` does (recorded, the wait given up,
/// aborted), and the run is reported and sealed: exit 3.
#[test]
fn a_signal_kills_the_run_ice_run_drives_and_seals_it() {
    a_run_waiting_for_an_approval_is_killed_and_sealed_by("TERM");
}

/// `ice run` of the quickstart, waiting for an approval, sent SIG`signal`: the kill is recorded
/// naming the signal, the run is aborted (exit 3) within moments, the approval closed, and a
/// checkpoint covers every event.
fn a_run_waiting_for_an_approval_is_killed_and_sealed_by(signal: &str) {
    let (_dir, home, child) = quickstart_waiting(Stdio::piped());
    let deadline = Instant::now() + Duration::from_secs(60);
    while pending(&home).is_empty() {
        assert!(Instant::now() < deadline, "no approval was asked for");
        std::thread::sleep(Duration::from_millis(100));
    }
    let started = Instant::now();
    let _ = Command::new("kill")
        .args([format!("-{signal}"), child.id().to_string()])
        .status();
    let o = child.wait_with_output().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(o.status.code(), Some(3), "aborted: {:?}", o.status);
    let kill = first_event(&home, "RunKillRequested").expect("the kill is recorded");
    assert!(
        kill["payload"]["reason"]
            .as_str()
            .unwrap()
            .contains(&format!("SIG{signal}")),
        "{kill}"
    );
    let types = run_types(&home);
    assert!(types.contains(&"RunAborted".to_string()), "{types:?}");
    assert_eq!(types.last().map(String::as_str), Some("RunTerminated"));
    assert!(pending(&home).is_empty(), "the approval was closed");
    // Sealed: a checkpoint covers every event.
    let o = ice(&home, &["verify", "--json"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["latest_checkpoint"], v["events"], "{v}");
}

/// Sealing after the run (signing a checkpoint: reading what the last one does not cover, and
/// keeping the note) can take a while; a signal then went unheard (session 23's review). Here
/// the sealing waits for the record's lock, which the test holds: a second signal stops it.
#[test]
fn a_signal_while_ice_run_seals_stops_it_at_once() {
    let (_dir, home, mut child) = quickstart_waiting_with(Stdio::null(), Stdio::piped());
    let deadline = Instant::now() + Duration::from_secs(60);
    while pending(&home).is_empty() {
        assert!(Instant::now() < deadline, "no approval was asked for");
        std::thread::sleep(Duration::from_millis(100));
    }
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(home.join("keys/last-checkpoint.lock"))
        .unwrap();
    lock.lock().unwrap();
    let signal = |child: &std::process::Child| {
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
    };
    signal(&child);
    // The run is killed and its checkpoint stored; keeping it waits for the lock.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = ice(&home, &["verify", "--json"]);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        if run_types(&home).last().map(String::as_str) == Some("RunTerminated")
            && v["latest_checkpoint"] == v["events"]
        {
            break;
        }
        assert!(Instant::now() < deadline, "the run was not sealed: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(child.try_wait().unwrap().is_none(), "it waits for the lock");
    signal(&child);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            drop(lock);
            panic!("a signal while sealing went unheard");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(130), "{status:?}");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.contains("stopped while sealing"), "{err}");
    drop(lock);
    // Everything recorded verifies, and signing again completes the seal.
    let o = ice(&home, &["checkpoint"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let o = ice(&home, &["verify"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
}

/// The probe's finding: SIGHUP (the terminal closed) ended `ice run` at once with nothing
/// recorded and no checkpoint, the run left executing. It is handled as SIGTERM is.
#[test]
fn a_hangup_kills_the_run_and_seals_it_like_sigterm() {
    a_run_waiting_for_an_approval_is_killed_and_sealed_by("HUP");
}

/// The review's finding: a run its process left executing (no recovery since), killed by an
/// operator, was aborted with the call it was making left unanswered (and its reservation
/// open). The kill answers it first, as recovery would.
#[test]
#[cfg_attr(
    not(debug_assertions),
    ignore = "pauses the ice binary with its debug-only test hooks"
)]
fn killing_a_run_its_process_left_executing_answers_the_interrupted_call_first() {
    let (_dir, home, qs) = setup(1);
    std::fs::write(qs.join("plan.toml"), writes(2)).unwrap();
    kill_when_paused(
        &home,
        &qs,
        ("ICE_TEST_PAUSE_BEFORE_EFFECT", "1"),
        "paused before the effect",
    );
    let o = ice(&home, &["kill", "quickstart", "--reason", "host gone"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let types = run_types(&home);
    let denied = types.iter().position(|t| t == "CapabilityDenied").unwrap();
    let aborted = types.iter().position(|t| t == "RunAborted").unwrap();
    assert!(denied < aborted, "{types:?}");
    assert_eq!(types[denied - 1], "BudgetSettled", "{types:?}");
    let d = first_event(&home, "CapabilityDenied").unwrap();
    assert_eq!(d["payload"]["reason"], "effect_failed", "{d}");
    assert!(
        d["payload"]["detail"]
            .as_str()
            .unwrap()
            .starts_with("interrupted:"),
        "{d}"
    );
    assert_eq!(code(&ice(&home, &["verify"])), 0);
}

/// The probe's finding: a run killed after a write's grant was used and before its effect was
/// recorded was recovered (suspended) and resumed with the write silently gone; the agent
/// went on as if it had been done, and the run committed without it. Recovery now answers
/// that request with a denial saying it was interrupted, which the resumed agent is shown
/// first and the operator sees; nothing of it reaches the workspace.
#[test]
#[cfg_attr(
    not(debug_assertions),
    ignore = "pauses the ice binary with its debug-only test hooks"
)]
fn a_write_interrupted_by_a_crash_is_answered_as_failed_when_the_run_is_recovered() {
    let (_dir, home, qs) = setup(1);
    let plan = writes(2);
    std::fs::write(qs.join("plan.toml"), &plan).unwrap();
    kill_when_paused(
        &home,
        &qs,
        ("ICE_TEST_PAUSE_BEFORE_EFFECT", "1"),
        "paused before the effect",
    );
    recovered_by_the_next_run(&home, &qs);
    let types = run_types(&home);
    let n = types.len();
    assert_eq!(
        &types[n - 3..],
        ["BudgetSettled", "CapabilityDenied", "RunSuspended"],
        "{types:?}"
    );
    let denied = first_event(&home, "CapabilityDenied").unwrap();
    assert_eq!(denied["payload"]["reason"], "effect_failed", "{denied}");
    assert!(
        denied["payload"]["detail"]
            .as_str()
            .unwrap()
            .starts_with("interrupted:"),
        "{denied}"
    );
    assert_eq!(code(&ice(&home, &["verify"])), 0);
    // Resumed: the first write stays undone, so the spec's check on it fails and the run
    // aborts, rather than committing as if it had been made.
    let record = qs.join("go-on.toml");
    std::fs::write(&record, "reason = \"the host restarted\"\n").unwrap();
    let o = ice(
        &home,
        &[
            "reconfigure",
            "quickstart",
            "--record",
            record.to_str().unwrap(),
        ],
    );
    assert_eq!(code(&o), 3, "{}", text(&o));
    assert!(text(&o).contains("failed"), "{}", text(&o));
    let ws = qs.join("workspace");
    assert!(!ws.join("b.txt").exists());
    assert_ne!(
        std::fs::read_to_string(ws.join("hello.txt")).unwrap(),
        "hello, governed world\n"
    );
    let o = ice(&home, &["replay", "quickstart", "--drive"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
}
