//! The LLM driver end to end: `ice run` on examples/llm against a scripted OpenAI-compatible
//! server this test starts (tests/peers/openai_server.py), then `ice replay` with the server
//! gone, and tampering caught by `ice verify` and `ice replay`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn ice_cmd(home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ice"));
    c.arg("--home").arg(home).env_remove("ICE_HOME");
    c
}

fn ice(home: &Path, args: &[&str]) -> Output {
    ice_cmd(home).args(args).output().expect("ice runs")
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
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

/// The scripted model server, killed when the test drops it.
struct ModelServer {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl ModelServer {
    fn start(dir: &Path, script: &Value) -> ModelServer {
        let file = dir.join(format!("script-{}.json", rand_suffix()));
        std::fs::write(&file, script.to_string()).unwrap();
        let log = dir.join(format!("requests-{}.jsonl", rand_suffix()));
        let server = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/openai_server.py");
        let mut child = Command::new("python3")
            .arg(server)
            .arg(&file)
            .env("OPENAI_LOG", &log)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 runs");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the model server said {line:?}"));
        ModelServer { child, port, log }
    }

    /// The requests it received, in order.
    fn requests(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for ModelServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// A fresh home and a copy of examples/llm whose spec points at `port`, with `edit` applied.
fn setup(dir: &Path, port: u16, edit: impl Fn(String) -> String) -> (PathBuf, PathBuf) {
    let home = dir.join("home");
    let o = ice(&home, &["init", "--origin", "ice.test/llm"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let ex = dir.join("llm");
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/llm"),
        &ex,
    );
    let spec = ex.join("run.toml");
    let t = std::fs::read_to_string(&spec)
        .unwrap()
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"));
    std::fs::write(&spec, edit(t)).unwrap();
    (home, ex)
}

fn call(id: &str, function: &str, args: Value) -> Value {
    json!({"id": id, "type": "function", "function": {"name": function, "arguments": args.to_string()}})
}

fn reply(content: &str, calls: Vec<Value>, usage: (u64, u64)) -> Value {
    let finish = if calls.is_empty() {
        "stop"
    } else {
        "tool_calls"
    };
    let mut message = json!({"role": "assistant", "content": content});
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    json!({"message": message, "finish_reason": finish,
           "usage": {"prompt_tokens": usage.0, "completion_tokens": usage.1}})
}

fn events(home: &Path, run: &str) -> Vec<Value> {
    let o = ice(home, &["log", "--run", run, "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `ice reconfigure llm-notes --record RECORD` (which recovers and resumes the run): it must
/// succeed.
fn reconfigure(home: &Path, record: &Path) {
    let o = ice(
        home,
        &[
            "reconfigure",
            "llm-notes",
            "--record",
            record.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

/// `ice replay RUN --drive --json`, which must succeed and find no divergence; its report.
fn replay_drive_clean(home: &Path, run: &str) -> Value {
    let o = ice(home, &["replay", run, "--drive", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["divergences"], json!([]), "{r:#}");
    r
}

fn of_type<'a>(events: &'a [Value], t: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == t).collect()
}

#[test]
fn an_llm_driven_run_is_governed_recorded_and_replays_without_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let script = json!([
        // 1. Two reads: one allowed, one the policy denies.
        reply("I will read my notes and the key.", vec![
            call("c1", "fs_read", json!({"path": "notes/todo.txt"})),
            call("c2", "fs_read", json!({"path": "secret/key.txt"})),
        ], (120, 30)),
        // 2. The provider fails; the driver records it and asks again.
        {"status": 500, "body": "{\"error\": \"overloaded\"}"},
        // 3. A body that is not JSON.
        {"raw": "this is not json"},
        // 4. A tool call with arguments that are not JSON, and one to a function never offered.
        {"message": {"role": "assistant", "content": null, "tool_calls": [
            {"id": "c3", "type": "function", "function": {"name": "fs_write", "arguments": "{not json"}},
            {"id": "c4", "type": "function", "function": {"name": "rm_rf", "arguments": "{}"}}]},
         "finish_reason": "tool_calls", "usage": {"prompt_tokens": 300, "completion_tokens": 20}},
        // 5. Over-long output: cut at max_tokens with no usable call.
        {"message": {"role": "assistant", "content": "Summary: buy milk and ship the LLM dri"},
         "finish_reason": "length", "usage": {"prompt_tokens": 320, "completion_tokens": 256}},
        // 6. The writes: the notes (allowed) and the release (needs an operator).
        reply("Writing the summary, then publishing it.", vec![
            call("c5", "fs_write", json!({"path": "notes/summary.txt", "content": "buy milk; ship the LLM driver\n"})),
            call("c6", "fs_write", json!({"path": "release/summary.txt", "content": "buy milk; ship the LLM driver\n"})),
        ], (400, 60)),
        // 7. Done.
        reply("Done: summary written and published.", vec![], (450, 12)),
    ]);
    let model = ModelServer::start(dir.path(), &script);
    // Four failed replies in a row (2 to 5) stay within the driver's error limit.
    let (home, ex) = setup(dir.path(), model.port, |t| {
        t.replace("max_steps = 12", "max_steps = 12\nmax_errors = 5")
    });
    let child = ice_cmd(&home)
        .args(["run", ex.join("run.toml").to_str().unwrap(), "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The operator approves the publication from another process.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut approved = false;
    let mut child = child;
    while !approved && Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        let o = ice(&home, &["approvals", "--json"]);
        let pending: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap_or_default();
        if let Some(p) = pending.first() {
            assert_eq!(p["capability"], "fs.write");
            let id = p["id"].as_str().unwrap();
            let o = ice(&home, &["approve", id, "--operator", "alice"]);
            assert_eq!(o.status.code(), Some(0), "{}", text(&o));
            approved = true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    assert!(approved, "no approval was requested\n{}", text(&out));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["outcome"], "committed", "{report}");
    let ws = ex.join("workspace");
    assert_eq!(
        std::fs::read_to_string(ws.join("notes/summary.txt")).unwrap(),
        "buy milk; ship the LLM driver\n"
    );
    assert!(ws.join("release/summary.txt").is_file());

    // The model saw seven requests; the first offered the tools as functions.
    let requests = model.requests();
    assert_eq!(requests.len(), 7, "{requests:#?}");
    let names: Vec<&str> = requests[0]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"]["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"fs_read") && names.contains(&"fs_write"),
        "{names:?}"
    );
    // The tool result went back to the model; the denied read said why.
    let second = requests[1]["messages"].to_string();
    assert!(second.contains("buy milk"), "{second}");
    assert!(second.contains("DENIED (policy_denied)"), "{second}");

    // Every model reply is recorded, with its usage, reserved before and settled after.
    let ev = events(&home, "llm-notes");
    let steps = of_type(&ev, "InferenceStep");
    assert_eq!(steps.len(), 7);
    for s in &steps {
        assert_eq!(s["origin"], "agent:writer");
        let p = &s["payload"];
        assert_eq!(p["model"], "smollm2-135m-instruct");
        assert_eq!(p["request_digest"].as_str().unwrap().len(), 64);
    }
    let kinds: Vec<Value> = steps
        .iter()
        .map(|s| s["payload"]["error"]["kind"].clone())
        .collect();
    assert_eq!(kinds[0], Value::Null);
    assert_eq!(kinds[1], "http_status");
    assert_eq!(kinds[2], "malformed_json");
    assert_eq!(kinds[4], "truncated");
    assert_eq!(
        steps[0]["payload"]["reply"]["choices"][0]["message"]["content"],
        "I will read my notes and the key."
    );
    assert!(
        steps[3]["payload"]["rejected_tool_calls"]
            .as_array()
            .is_some_and(|r| r.len() == 2)
    );
    assert_eq!(steps[0]["cost"]["tokens_in"], 120);
    assert_eq!(steps[0]["cost"]["tokens_out"], 30);
    let reserved = of_type(&ev, "BudgetReserved");
    assert!(
        reserved
            .iter()
            .filter(|r| r["payload"]["amount"]["tokens_out"] == 256)
            .count()
            >= 7
    );
    // Requests carry the model's stated intent; the secret was denied by policy.
    let requests_ev = of_type(&ev, "CapabilityRequested");
    assert_eq!(requests_ev.len(), 4);
    assert_eq!(
        requests_ev[0]["intent"],
        "I will read my notes and the key."
    );
    let denied = of_type(&ev, "CapabilityDenied");
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0]["payload"]["reason"], "policy_denied");
    assert_eq!(of_type(&ev, "ApprovalGranted").len(), 1);

    // The model is gone: replay rebuilds the same state from the log alone.
    drop(model);
    let o = ice(&home, &["replay", "llm-notes", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["divergences"], json!([]));
    assert_eq!(r["compared"], true);
    assert_eq!(r["state"], "TERMINATED");
    assert_eq!(r["inferences"], 7);
    let r = replay_drive_clean(&home, "llm-notes");
    assert_eq!(r["drive"]["inferences"], 7, "{r:#}");
    assert_eq!(r["drive"]["decisions"], 4 + 7, "{r:#}");
    assert_eq!(r["drive"]["unchecked"], json!([]), "{r:#}");

    // Tamper with one recorded inference: verify and replay both catch it.
    let db = home.join("ice.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch("DROP TRIGGER events_no_update;")
        .unwrap();
    let n = conn
        .execute(
            "UPDATE events SET body = CAST(replace(CAST(body AS TEXT), 'Done: summary written', 'Done: summary DELETED') AS BLOB) WHERE type = 'InferenceStep' AND run_id = 'llm-notes'",
            [],
        )
        .unwrap();
    assert_eq!(n, 7);
    drop(conn);
    let o = ice(&home, &["verify"]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    let o = ice(&home, &["replay", "llm-notes"]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("hash"),
        "{}",
        text(&o)
    );
}

#[test]
fn exhausting_the_token_budget_stops_the_loop_before_the_model_is_called() {
    let dir = tempfile::tempdir().unwrap();
    let script = json!([
        reply(
            "Reading.",
            vec![call("c1", "fs_read", json!({"path": "notes/todo.txt"}))],
            (100, 60)
        ),
        reply("never sent", vec![], (1, 1)),
    ]);
    let model = ModelServer::start(dir.path(), &script);
    let (home, ex) = setup(dir.path(), model.port, |t| {
        t.replace("tokens_out = 4_000", "tokens_out = 100")
            // A whole-number float: the log writes it as an integer, and replay must still
            // see the same parameters.
            .replace("max_tokens = 256", "max_tokens = 64\ntemperature = 0.0")
    });
    let o = ice(
        &home,
        &["run", ex.join("run.toml").to_str().unwrap(), "--json"],
    );
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    let reason = report["reason"].as_str().unwrap_or_default().to_string()
        + report["outcome"].as_str().unwrap_or_default();
    assert!(
        reason.contains("tokens_out") || report.to_string().contains("tokens_out"),
        "{report}"
    );
    // One model call was made: the second did not fit (60 spent + 64 reserved > 100).
    assert_eq!(model.requests().len(), 1);
    let ev = events(&home, "llm-notes");
    assert_eq!(of_type(&ev, "InferenceStep").len(), 1);
    let abort = of_type(&ev, "AbortReasonDeclared");
    assert_eq!(abort[0]["payload"]["reason"], "budget_exhausted");
    // The replay re-makes that refusal from the record.
    drop(model);
    replay_drive_clean(&home, "llm-notes");
}

#[test]
fn a_refusal_and_a_dead_endpoint_abort_the_run_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let script = json!([
        {"message": {"role": "assistant", "content": null, "refusal": "I can't help with that."},
         "finish_reason": "stop", "usage": {"prompt_tokens": 50, "completion_tokens": 5}},
    ]);
    let model = ModelServer::start(dir.path(), &script);
    let (home, ex) = setup(dir.path(), model.port, |t| t);
    let o = ice(
        &home,
        &["run", ex.join("run.toml").to_str().unwrap(), "--json"],
    );
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(text(&o).contains("refused"), "{}", text(&o));
    drop(model);

    // Nothing listens on the port any more: every call fails, the driver gives up after its
    // error limit, and the run is aborted with the failures recorded.
    let dir2 = tempfile::tempdir().unwrap();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    let (home, ex) = setup(dir2.path(), port, |t| {
        t.replace("timeout = \"60s\"", "timeout = \"2s\"")
    });
    let o = ice(
        &home,
        &["run", ex.join("run.toml").to_str().unwrap(), "--json"],
    );
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let ev = events(&home, "llm-notes");
    let steps = of_type(&ev, "InferenceStep");
    assert_eq!(steps.len(), 3, "max_errors defaults to 3");
    assert!(
        steps
            .iter()
            .all(|s| s["payload"]["error"]["kind"] == "transport")
    );
    let o = ice(&home, &["verify"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

#[test]
fn a_memory_promoted_by_one_llm_run_is_shown_to_the_model_in_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let script = json!([
        reply(
            "Reading my notes.",
            vec![call("c1", "fs_read", json!({"path": "notes/todo.txt"}))],
            (100, 20)
        ),
        reply("Noted.", vec![], (150, 5)),
        // The second run: the model answers at once.
        reply("I remember the notes.", vec![], (200, 6)),
    ]);
    let model = ModelServer::start(dir.path(), &script);
    let promote = "\n[memory]\nmount = { scopes = [\"notes\"] }\n\n[[memory.promote]]\nevent = \"FileRead\"\npath = \"notes\"\nkind = \"file\"\nscope = \"notes\"\nconfidence = 0.8\n";
    let (home, ex) = setup(dir.path(), model.port, |t| t + promote);
    let spec = ex.join("run.toml");
    let o = ice(&home, &["run", spec.to_str().unwrap(), "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let ev = events(&home, "llm-notes");
    let promoted = of_type(&ev, "MemoryPromoted");
    assert_eq!(promoted.len(), 1, "{ev:#?}");
    let memory = format!("llm-notes:{}", promoted[0]["run_seq"]);

    // A second run of the same spec mounts it, and the model is shown it.
    let t = std::fs::read_to_string(&spec)
        .unwrap()
        .replace("id = \"llm-notes\"", "id = \"llm-notes-2\"");
    std::fs::write(&spec, t).unwrap();
    let o = ice(&home, &["run", spec.to_str().unwrap(), "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let ev2 = events(&home, "llm-notes-2");
    let mounted = of_type(&ev2, "MemoryMounted");
    assert_eq!(mounted[0]["payload"]["memories"][0]["id"], memory.as_str());
    let requests = model.requests();
    assert_eq!(requests.len(), 3);
    let system = requests[2]["messages"][0]["content"].as_str().unwrap();
    assert!(system.contains(&memory), "{system}");
    assert!(system.contains("buy milk"), "{system}");

    // Replayed without the model, the re-driven agent is shown the same memory.
    drop(model);
    let r = replay_drive_clean(&home, "llm-notes-2");
    assert_eq!(r["drive"]["inferences"], 1, "{r:#}");
}

#[test]
fn a_suspended_llm_run_resumes_its_conversation_and_replays_through_the_suspension() {
    let dir = tempfile::tempdir().unwrap();
    let summary = json!({"path": "notes/summary.txt", "content": "one line\n"});
    let script = json!([
        reply(
            "Reading.",
            vec![call("c1", "fs_read", json!({"path": "notes/todo.txt"}))],
            (100, 20)
        ),
        reply(
            "Writing.",
            vec![call("c2", "fs_write", summary.clone())],
            (120, 20)
        ),
        reply(
            "Retrying.",
            vec![call("c3", "fs_write", summary)],
            (140, 20)
        ),
        reply(
            "Done: the summary is in notes/summary.txt.",
            vec![],
            (160, 10)
        ),
    ]);
    let model = ModelServer::start(dir.path(), &script);
    let (home, ex) = setup(dir.path(), model.port, |t| {
        t.replace("tool_calls = 20", "tool_calls = 1")
            .replace("on_exhaustion = \"abort\"", "on_exhaustion = \"suspend\"")
    });
    // The write does not fit the budget of one tool call: the run suspends on it.
    let o = ice(
        &home,
        &["run", ex.join("run.toml").to_str().unwrap(), "--json"],
    );
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert_eq!(model.requests().len(), 2);
    let ev = events(&home, "llm-notes");
    assert_eq!(of_type(&ev, "RunSuspended").len(), 1);
    assert_eq!(
        of_type(&ev, "CapabilityDenied")[0]["payload"]["reason"],
        "budget_exhausted"
    );

    // A new process raises the budget and resumes the run: its agent is the same conversation
    // (rebuilt from the record without calling the model), told what happened to its write.
    let record = dir.path().join("more.toml");
    std::fs::write(
        &record,
        "reason = \"room for the write\"\n[budget]\ntool_calls = 5\n",
    )
    .unwrap();
    reconfigure(&home, &record);
    let requests = model.requests();
    assert_eq!(requests.len(), 4, "the recorded calls were not sent again");
    let messages = requests[2]["messages"].as_array().unwrap();
    let said = |id: &str| {
        messages
            .iter()
            .find(|m| m["role"] == "tool" && m["tool_call_id"] == id)
            .and_then(|m| m["content"].as_str())
            .unwrap_or_else(|| panic!("no answer to {id} in {messages:#?}"))
            .to_string()
    };
    assert_eq!(messages[1]["role"], "user");
    assert!(said("c1").contains("buy milk"), "{}", said("c1"));
    assert!(
        said("c2").starts_with("DENIED (budget_exhausted)"),
        "{}",
        said("c2")
    );
    assert_eq!(
        std::fs::read_to_string(ex.join("workspace/notes/summary.txt")).unwrap(),
        "one line\n"
    );

    // The whole run, suspension included, replays without the model.
    drop(model);
    let r = replay_drive_clean(&home, "llm-notes");
    assert_eq!(r["drive"]["inferences"], 4, "{r:#}");
    assert_eq!(r["drive"]["unchecked"], json!([]), "{r:#}");
}

#[test]
fn an_llm_run_killed_during_a_model_call_resumes_by_asking_the_same_question_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut slow = reply("never received", vec![], (1, 1));
    slow["delay_ms"] = json!(60_000);
    let script = json!([
        reply(
            "Reading.",
            vec![call("c1", "fs_read", json!({"path": "notes/todo.txt"}))],
            (100, 20)
        ),
        slow,
        reply("Done: nothing to change.", vec![], (130, 10)),
    ]);
    let model = ModelServer::start(dir.path(), &script);
    let (home, ex) = setup(dir.path(), model.port, |t| t);
    let mut child = ice_cmd(&home)
        .args(["run", ex.join("run.toml").to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Killed while the model is thinking about its second answer.
    let deadline = Instant::now() + Duration::from_secs(60);
    while model.requests().len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the second model call never came"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // The next command recovers it (suspended for review); the operator resumes it.
    let record = dir.path().join("go-on.toml");
    std::fs::write(&record, "reason = \"the host restarted\"\n").unwrap();
    reconfigure(&home, &record);
    let requests = model.requests();
    assert_eq!(requests.len(), 3);
    // The interrupted question is asked again, word for word: the conversation was rebuilt.
    assert_eq!(requests[2], requests[1]);
    let ev = events(&home, "llm-notes");
    assert_eq!(
        of_type(&ev, "RunSuspended")[0]["payload"]["reason"],
        "crash_recovery"
    );
    assert_eq!(of_type(&ev, "InferenceStep").len(), 2);
    assert_eq!(of_type(&ev, "RunCommitted").len(), 1);
    drop(model);
    let r = replay_drive_clean(&home, "llm-notes");
    assert_eq!(r["drive"]["inferences"], 2, "{r:#}");
    let unchecked = r["drive"]["unchecked"].to_string();
    assert!(unchecked.contains("a model call was interrupted"), "{r:#}");
}

/// `ice run` of the example started in the background against a model that answers "Done."
/// after `delay_ms`, once the model has the run's first request: the model, the home, the run.
fn running_on_a_slow_model(
    dir: &Path,
    delay_ms: u64,
) -> (ModelServer, PathBuf, std::process::Child) {
    let mut slow = reply("Done.", vec![], (1, 1));
    slow["delay_ms"] = json!(delay_ms);
    let model = ModelServer::start(dir, &json!([slow]));
    let (home, ex) = setup(dir, model.port, |t| t);
    let child = ice_cmd(&home)
        .args(["run", ex.join("run.toml").to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_requests(&model, 1);
    (model, home, child)
}

/// Wait until the model server has received `n` requests.
fn wait_for_requests(model: &ModelServer, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while model.requests().len() < n {
        assert!(Instant::now() < deadline, "model call {n} never came");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The finding: an operator's kill recorded while a model call ran (or a kill of a run whose
/// process died during one) made `replay --drive` report a divergence, and so did a record
/// ending during a model call. The kill is the operator's, recorded between the reservation and
/// the reply: the replay goes on past it. And the kill does not wait out the call (60 s here):
/// the call is given up and recorded as interrupted.
#[test]
fn a_kill_during_a_model_call_replays_without_a_divergence() {
    let dir = tempfile::tempdir().unwrap();
    let (model, home, child) = running_on_a_slow_model(dir.path(), 60_000);
    let o = ice(&home, &["kill", "llm-notes", "--reason", "enough"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // The kill does not wait out the model call: the call is given up.
    let killed = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(
        killed.elapsed() < Duration::from_secs(15),
        "{:?}",
        killed.elapsed()
    );
    assert_eq!(out.status.code(), Some(3));
    let ev = events(&home, "llm-notes");
    assert_eq!(of_type(&ev, "RunKillRequested").len(), 1);
    assert_eq!(of_type(&ev, "RunAborted").len(), 1);
    let steps = of_type(&ev, "InferenceStep");
    assert_eq!(
        steps[0]["payload"]["error"]["kind"], "interrupted",
        "{:#}",
        steps[0]
    );
    drop(model);
    replay_drive_clean(&home, "llm-notes");
}

/// The finding: a model call ran its full timeout (20 s here) past a wall-time budget of 2 s.
/// The call is cut where the budget ends, and the run stops on the exhausted budget.
#[test]
fn a_model_call_runs_no_longer_than_the_wall_time_budget_has_left() {
    let dir = tempfile::tempdir().unwrap();
    let mut slow = reply("too late", vec![], (1, 1));
    slow["delay_ms"] = json!(20_000);
    let model = ModelServer::start(dir.path(), &json!([slow]));
    let (home, ex) = setup(dir.path(), model.port, |t| {
        t.replace("wall_time = \"120s\"", "wall_time = \"2s\"")
            .replace("timeout = \"60s\"", "timeout = \"30s\"")
    });
    let started = Instant::now();
    let o = ice(&home, &["run", ex.join("run.toml").to_str().unwrap()]);
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let ev = events(&home, "llm-notes");
    let steps = of_type(&ev, "InferenceStep");
    assert!(
        steps[0]["payload"]
            .to_string()
            .contains("cut at the end of the run's wall_time budget"),
        "{:#}",
        steps[0]
    );
    let abort = of_type(&ev, "AbortReasonDeclared");
    assert_eq!(abort[0]["payload"]["reason"], "budget_exhausted", "{ev:#?}");
    drop(model);
    replay_drive_clean(&home, "llm-notes");
}

/// The same with the run's process gone: SIGKILLed during the model call, replayed before any
/// recovery (the record ends during the call), then killed by an operator.
#[test]
fn a_run_whose_process_died_during_a_model_call_replays_without_a_divergence() {
    let dir = tempfile::tempdir().unwrap();
    let (model, home, mut child) = running_on_a_slow_model(dir.path(), 60_000);
    child.kill().unwrap();
    child.wait().unwrap();
    drop(model);
    let r = replay_drive_clean(&home, "llm-notes");
    assert!(
        r["drive"]["unchecked"]
            .to_string()
            .contains("the record ends during a model call"),
        "{r:#}"
    );
    let o = ice(&home, &["kill", "llm-notes", "--reason", "host gone"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let ev = events(&home, "llm-notes");
    assert_eq!(of_type(&ev, "InferenceStep").len(), 0);
    assert!(!of_type(&ev, "RunAborted").is_empty(), "{ev:#?}");
    let r = replay_drive_clean(&home, "llm-notes");
    assert!(
        r["drive"]["unchecked"]
            .to_string()
            .contains("a model call was interrupted by"),
        "{r:#}"
    );
}

#[test]
fn an_llm_run_killed_twice_during_commands_resumes_twice_and_replays() {
    let dir = tempfile::tempdir().unwrap();
    let sleep = |id: &str| {
        call(
            id,
            "process_exec",
            json!({"program": "sleep", "args": ["30"]}),
        )
    };
    let script = json!([
        reply("Waiting.", vec![sleep("c1")], (100, 20)),
        reply("Waiting again.", vec![sleep("c2")], (120, 20)),
        reply("Done: nothing to change.", vec![], (140, 10)),
    ]);
    let model = ModelServer::start(dir.path(), &script);
    let (home, ex) = setup(dir.path(), model.port, |t| t);
    std::fs::write(
        ex.join("policies/exec.cedar"),
        "@external(\"permit\")\npermit(principal == Agent::\"writer\", action == Action::\"process.exec\", resource == Command::\"sleep\");\n",
    )
    .unwrap();
    let record = dir.path().join("go-on.toml");
    std::fs::write(&record, "reason = \"the host restarted\"\n").unwrap();
    // Start (or resume) the run in a child process, and kill it once the model has been asked
    // `calls` times and the command it asked for is running.
    let kill_after = |args: &[&str], calls: usize| {
        let mut child = ice_cmd(&home)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let used = events(&home, "llm-notes")
                .iter()
                .filter(|e| e["type"] == "CapabilityUsed")
                .count();
            if model.requests().len() >= calls && used >= calls {
                break;
            }
            assert!(Instant::now() < deadline, "the command never started");
            std::thread::sleep(Duration::from_millis(100));
        }
        child.kill().unwrap();
        child.wait().unwrap();
    };
    kill_after(&["run", ex.join("run.toml").to_str().unwrap()], 1);
    kill_after(
        &[
            "reconfigure",
            "llm-notes",
            "--record",
            record.to_str().unwrap(),
        ],
        2,
    );
    // The second resume re-drives the agent through both interrupted commands.
    reconfigure(&home, &record);
    let requests = model.requests();
    assert_eq!(requests.len(), 3);
    // Each interrupted command was answered at the run's recovery: the record says its outcome
    // is unknown (it may have acted), and so was the model told.
    let ev = events(&home, "llm-notes");
    let unknown: Vec<&Value> = of_type(&ev, "CapabilityDenied")
        .into_iter()
        .filter(|d| d["payload"]["reason"] == "outcome_unknown")
        .collect();
    assert_eq!(unknown.len(), 2, "{ev:#?}");
    for d in &unknown {
        let detail = d["payload"]["detail"].as_str().unwrap();
        assert!(
            detail.starts_with("interrupted:") && detail.contains("sleep"),
            "{detail}"
        );
        // The resource the grant was used on, as `CapabilityUsed` recorded it.
        assert!(
            d["payload"]["resource"].to_string().contains("sleep"),
            "{d}"
        );
        // What the call may have spent is counted: its reservation is settled in full.
        let request = &d["payload"]["request"];
        let settled: Vec<&Value> = of_type(&ev, "BudgetSettled")
            .into_iter()
            .filter(|s| s["causes"].as_array().unwrap().contains(request))
            .collect();
        assert_eq!(settled.len(), 1, "{ev:#?}");
        let reservation = &settled[0]["payload"]["reservation"];
        let reserved = of_type(&ev, "BudgetReserved")
            .into_iter()
            .find(|r| &r["payload"]["reservation"] == reservation)
            .unwrap();
        assert_eq!(
            settled[0]["payload"]["actual"], reserved["payload"]["amount"],
            "{ev:#?}"
        );
    }
    let messages = requests[2]["messages"].as_array().unwrap();
    let tool_answers: Vec<&str> = messages
        .iter()
        .filter(|m| m["role"] == "tool")
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(tool_answers.len(), 2, "{messages:#?}");
    assert!(
        tool_answers
            .iter()
            .all(|t| t.starts_with("DENIED (outcome_unknown): interrupted:")),
        "{tool_answers:?}"
    );
    drop(model);
    // Replay shows the agent the same answers, from the record.
    let r = replay_drive_clean(&home, "llm-notes");
    assert_eq!(r["drive"]["inferences"], 3, "{r:#}");
    let unchecked = r["drive"]["unchecked"].to_string();
    assert_eq!(
        unchecked.matches("the call was interrupted").count(),
        0,
        "{r:#}"
    );
}

/// A whole chat completion sent as it is (the scripted server adds `usage` to every `message`
/// entry; this one has none unless `body` does).
fn raw_reply(body: Value) -> Value {
    json!({"raw": body.to_string()})
}

fn completion(message: Value, finish: &str) -> Value {
    json!({
        "id": "chatcmpl-raw", "object": "chat.completion", "created": 1700000000, "model": "m",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
    })
}

#[test]
fn a_token_budget_stops_a_model_that_reports_no_usage() {
    let dir = tempfile::tempdir().unwrap();
    let read = |id: &str| {
        raw_reply(completion(
            json!({"role": "assistant", "content": "Reading.", "tool_calls": [
                call(id, "fs_read", json!({"path": "notes/todo.txt"}))]}),
            "tool_calls",
        ))
    };
    let script = json!([
        read("c1"),
        read("c2"),
        read("c3"),
        read("c4"),
        raw_reply(completion(
            json!({"role": "assistant", "content": "Done."}),
            "stop"
        )),
    ]);
    let model = ModelServer::start(dir.path(), &script);
    let (home, ex) = setup(dir.path(), model.port, |t| {
        t.replace("tokens_out = 4_000", "tokens_out = 3000")
            .replace("max_tokens = 256", "max_tokens = 1024")
    });
    let o = ice(
        &home,
        &["run", ex.join("run.toml").to_str().unwrap(), "--json"],
    );
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    // Each call without reported usage is costed at its reservation (1024 out): the third
    // (2048 spent + 1024 reserved > 3000) does not fit.
    assert_eq!(model.requests().len(), 2);
    let ev = events(&home, "llm-notes");
    let steps = of_type(&ev, "InferenceStep");
    assert_eq!(steps.len(), 2);
    let reserved: Vec<&Value> = of_type(&ev, "BudgetReserved")
        .into_iter()
        .filter(|r| r["payload"]["amount"]["tokens_out"] == 1024)
        .collect();
    assert_eq!(
        reserved.len(),
        2,
        "the third call was refused before its reservation"
    );
    for (s, r) in steps.iter().zip(&reserved) {
        assert_eq!(s["cost"]["tokens_out"], 1024);
        assert_eq!(s["cost"]["tokens_in"], r["payload"]["amount"]["tokens_in"]);
        assert_eq!(
            s["payload"]["usage"]["unreported"],
            json!(["prompt_tokens", "completion_tokens"])
        );
    }
    let settled = of_type(&ev, "BudgetSettled");
    assert!(
        settled
            .iter()
            .filter(|e| e["payload"]["actual"]["tokens_out"] == 1024)
            .count()
            == 2,
        "{settled:#?}"
    );
    let abort = of_type(&ev, "AbortReasonDeclared");
    assert_eq!(abort[0]["payload"]["reason"], "budget_exhausted");
    assert!(
        abort[0]["payload"].to_string().contains("tokens_out"),
        "{:#}",
        abort[0]
    );
    drop(model);
    replay_drive_clean(&home, "llm-notes");
}

/// The finding: a model reporting usage of 2^53-1 per call (with no token limit to stop it)
/// made the run's totals larger than an event can carry, so its `RunTerminated` could not be
/// recorded and the run stayed COMMITTED for good. Totals saturate at 2^53-1: the run ends,
/// verifies and replays.
#[test]
fn usage_reported_past_what_an_event_carries_still_lets_the_run_end() {
    let dir = tempfile::tempdir().unwrap();
    let max = (1u64 << 53) - 1;
    let script = json!([
        reply(
            "Reading.",
            vec![call("c1", "fs_read", json!({"path": "notes/todo.txt"}))],
            (max, max)
        ),
        reply("Done.", vec![], (max, max)),
    ]);
    let model = ModelServer::start(dir.path(), &script);
    let (home, ex) = setup(dir.path(), model.port, |t| {
        t.replace("tokens_in = 200_000\n", "")
            .replace("tokens_out = 4_000\n", "")
    });
    let o = ice(
        &home,
        &["run", ex.join("run.toml").to_str().unwrap(), "--json"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let ev = events(&home, "llm-notes");
    let ended = of_type(&ev, "RunTerminated");
    assert_eq!(ended.len(), 1, "{}", text(&o));
    let spent = &ended[0]["payload"]["projection"]["spent"];
    assert_eq!(spent["tokens_in"], max, "{spent}");
    assert_eq!(spent["tokens_out"], max, "{spent}");
    let v = ice(&home, &["verify"]);
    assert_eq!(v.status.code(), Some(0), "{}", text(&v));
    drop(model);
    replay_drive_clean(&home, "llm-notes");
}

#[test]
fn a_reply_using_the_reserved_blob_key_is_recorded_and_the_run_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut marked = completion(
        json!({"role": "assistant", "content": "Reading.", "tool_calls": [{
            "id": "c1", "type": "function",
            "function": {"name": "fs_read", "arguments": {"path": "notes/todo.txt", "$blob": "x"}}}]}),
        "tool_calls",
    );
    marked["usage"] = json!({"prompt_tokens": 100, "completion_tokens": 20});
    marked["system_fingerprint"] = json!({"$blob": "0".repeat(64), "size": 1});
    let script = json!([
        raw_reply(marked),
        reply("Done: nothing to change.", vec![], (130, 10)),
    ]);
    let model = ModelServer::start(dir.path(), &script);
    let (home, ex) = setup(dir.path(), model.port, |t| t);
    let o = ice(
        &home,
        &["run", ex.join("run.toml").to_str().unwrap(), "--json"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(model.requests().len(), 2);
    let ev = events(&home, "llm-notes");
    assert_eq!(of_type(&ev, "InferenceStep").len(), 2);
    drop(model);
    replay_drive_clean(&home, "llm-notes");
}
