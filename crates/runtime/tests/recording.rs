//! How a governed call is recorded: an in-process read (`fs.read`, `fs.list`) in ONE batch
//! after the read (request, grant if new, reservation, use, effect or failure, settlement), its
//! output handed over only once that batch is durable; everything else written ahead (the
//! authority durable before the effect). A log between the runtime and SQLite sees every batch
//! and can refuse one.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use ice_kernel::{
    CapabilityProposal, Event, EventId, EventType, Outcome, Proposal, RunId, SealedBatch,
};
use ice_log::clock::SystemClock;
use ice_log::ledger::Ledger;
use ice_log::sqlite::SqliteLog;
use ice_log::{AppendReceipt, EventLog, LogError};
use ice_runtime::{Installation, Quiet, RunOutcome, RuntimeError, Session};
use serde_json::json;

/// What a [`HookedLog`] does to appends here: remembers the run positions of each batch
/// appended, and fails the next append when told to (as a full disk or a lost database would).
struct Tap {
    batches: Mutex<Vec<Vec<u64>>>,
    fail_next: AtomicBool,
    /// Fail the next append whose batch holds an event of this type.
    fail_type: Mutex<Option<&'static str>>,
    /// Store the next batch holding an event of this type, then fail as if its answer was lost.
    lose_answer_type: Mutex<Option<&'static str>>,
}

/// Whether `batch` holds an event of the type `armed` names; if so, disarm it (it fires once).
fn takes(armed: &Mutex<Option<&'static str>>, batch: &SealedBatch) -> bool {
    let mut t = armed.lock().unwrap();
    let hit = t.is_some_and(|ty| batch.events().iter().any(|e| e.event().event_type == ty));
    if hit {
        *t = None;
    }
    hit
}

impl Hooks for Tap {
    fn append<'t>(&'t self, inner: &'t SqliteLog, batch: SealedBatch) -> Fut<'t, AppendReceipt> {
        Box::pin(async move {
            let typed = takes(&self.fail_type, &batch);
            if self.fail_next.swap(false, Ordering::SeqCst) || typed {
                return Err(LogError::Storage {
                    context: "committing to disk".into(),
                    message: "injected failure".into(),
                });
            }
            let lost = takes(&self.lose_answer_type, &batch);
            let seqs = batch.events().iter().map(|e| e.event().run_seq).collect();
            let receipt = inner.append(batch).await?;
            self.batches.lock().unwrap().push(seqs);
            if lost {
                return Err(LogError::Storage {
                    context: "committing to the server".into(),
                    message: "injected: the answer was lost; the batch may still be stored".into(),
                });
            }
            Ok(receipt)
        })
    }
}

/// A runtime over a [`Tap`], in `h`'s installation.
fn tapped(h: &H) -> (ice_runtime::Runtime, Arc<HookedLog<Tap>>) {
    let home = h.base.join("home");
    let tap = Arc::new(HookedLog {
        inner: SqliteLog::create(&home.join("tap.db")).unwrap(),
        hooks: Tap {
            batches: Mutex::new(Vec::new()),
            fail_next: AtomicBool::new(false),
            fail_type: Mutex::new(None),
            lose_answer_type: Mutex::new(None),
        },
    });
    let ledger = Arc::new(Ledger::new(tap.clone(), Arc::new(SystemClock)));
    let rt = ice_runtime::Runtime::new(
        ledger,
        Arc::new(SystemClock),
        Installation {
            runs_dir: home.join("runs"),
            policy_dir: h.policies.clone(),
        },
    )
    .unwrap();
    (rt, tap)
}

fn request(capability: &str, target: &str, arguments: serde_json::Value) -> Proposal {
    Proposal::Request(CapabilityProposal {
        capability: capability.into(),
        target: target.into(),
        arguments,
        intent: format!("{capability} {target}"),
    })
}

/// Propose `p`, and return its outcome with the batches it appended (each as its events).
async fn call(
    s: &Session<'_>,
    tap: &HookedLog<Tap>,
    p: &Proposal,
) -> (Result<Option<Outcome>, RuntimeError>, Vec<Vec<Event>>) {
    let before = tap.hooks.batches.lock().unwrap().len();
    let out = s.propose(p).await;
    let batches: Vec<Vec<u64>> = tap.hooks.batches.lock().unwrap()[before..].to_vec();
    let events = ice_runtime::read_run(tap, s.run()).await.unwrap();
    let batches = batches
        .into_iter()
        .map(|seqs| {
            seqs.iter()
                .map(|&q| events[q as usize].clone())
                .collect::<Vec<_>>()
        })
        .collect();
    (out, batches)
}

fn types(batch: &[Event]) -> Vec<&str> {
    batch.iter().map(|e| e.event_type.as_str()).collect()
}

fn names(types: &[EventType]) -> Vec<&'static str> {
    types.iter().map(|t| t.name()).collect()
}

/// The id an id-valued payload field names.
fn id_at(e: &Event, field: &str) -> EventId {
    e.payload[field].as_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_is_recorded_whole_in_one_batch_after_it() {
    use EventType::*;
    let h = H::new(POLICY);
    let (rt, tap) = tapped(&h);
    let (spec, _) = h.spec("reads", "coder", "[grants]\nuses = 5", "");
    let s = rt.open_session(spec, "coder", &Quiet).await.unwrap();
    let read = request("fs.read", "hello.txt", json!({}));

    // A new grant: request, grant, reservation, use, read, settlement, in one batch.
    let (out, batches) = call(&s, &tap, &read).await;
    assert_eq!(batches.len(), 1, "{batches:?}");
    let b = &batches[0];
    assert_eq!(
        types(b),
        names(&[
            CapabilityRequested,
            CapabilityGranted,
            BudgetReserved,
            CapabilityUsed,
            FileRead,
            BudgetSettled
        ])
    );
    let (req, grant, reserved, used, effect, settled) = (&b[0], &b[1], &b[2], &b[3], &b[4], &b[5]);
    for w in b.windows(2) {
        assert_eq!(w[1].run_seq, w[0].run_seq + 1, "consecutive");
        assert_eq!(w[1].at, w[0].at, "one batch, one time");
    }
    assert_eq!(grant.causes, [req.id()]);
    assert_eq!(id_at(grant, "request"), req.id());
    assert_eq!(reserved.causes, [req.id()]);
    assert_eq!(used.causes, [req.id(), grant.id()]);
    assert_eq!(used.authority, Some(grant.id().to_string()));
    assert_eq!(id_at(used, "grant"), grant.id());
    assert_eq!(effect.causes, [req.id(), used.id()]);
    assert_eq!(effect.authority, Some(grant.id().to_string()));
    assert_eq!(
        effect.payload["evidence"]["grant"],
        json!(grant.id().to_string())
    );
    assert_eq!(settled.causes, [req.id()]);
    assert_eq!(
        settled.payload["reservation"],
        reserved.payload["reservation"]
    );
    // What the agent was shown is what the record says it was shown.
    match out.unwrap() {
        Some(Outcome::Done { request, output }) => {
            assert_eq!(request, req.id());
            assert_eq!(output["content"], "hello\n");
            assert_eq!(output, effect.payload["output"]);
        }
        other => panic!("{other:?}"),
    }

    // The live grant again: request, reservation, use, read, settlement.
    let (out, batches) = call(&s, &tap, &read).await;
    assert_eq!(batches.len(), 1, "{batches:?}");
    let b = &batches[0];
    assert_eq!(
        types(b),
        names(&[
            CapabilityRequested,
            BudgetReserved,
            CapabilityUsed,
            FileRead,
            BudgetSettled
        ])
    );
    assert_eq!(b[2].causes, [b[0].id(), grant.id()]);
    assert_eq!(b[3].causes, [b[0].id(), b[2].id()]);
    assert!(matches!(out, Ok(Some(Outcome::Done { .. }))));

    // A listing is a read too.
    let (out, batches) = call(&s, &tap, &request("fs.list", ".", json!({}))).await;
    assert_eq!(batches.len(), 1, "{batches:?}");
    assert_eq!(types(&batches[0])[4], FileRead.name());
    assert!(matches!(out, Ok(Some(Outcome::Done { .. }))));

    // A read that fails: settled at the call's fixed cost and denied, in the same batch.
    let (out, batches) = call(&s, &tap, &request("fs.read", "nope.txt", json!({}))).await;
    assert_eq!(batches.len(), 1, "{batches:?}");
    let b = &batches[0];
    assert_eq!(
        types(b),
        names(&[
            CapabilityRequested,
            CapabilityGranted,
            BudgetReserved,
            CapabilityUsed,
            BudgetSettled,
            CapabilityDenied
        ])
    );
    assert_eq!(b[5].causes, [b[0].id()]);
    assert_eq!(id_at(&b[5], "request"), b[0].id());
    assert_eq!(id_at(&b[5], "grant"), b[1].id());
    assert_eq!(b[4].payload["actual"], json!({"tool_calls": 1}));
    match out.unwrap() {
        Some(Outcome::Denied { request, .. }) => assert_eq!(request, b[0].id()),
        other => panic!("{other:?}"),
    }

    // A staged write is written ahead: its authority is durable before the write happens.
    let write = request("fs.write", "notes.txt", json!({"content": "x\n"}));
    let (out, batches) = call(&s, &tap, &write).await;
    let shapes: Vec<Vec<&str>> = batches.iter().map(|b| types(b)).collect();
    assert_eq!(
        shapes,
        [
            names(&[CapabilityRequested, CapabilityGranted]),
            names(&[BudgetReserved, CapabilityUsed]),
            names(&[EffectStaged, BudgetSettled]),
        ]
    );
    assert!(matches!(out, Ok(Some(Outcome::Done { .. }))));

    let report = s.finish().await.unwrap();
    assert_eq!(report.outcome, RunOutcome::Committed, "{report:?}");
    let r = rt.replay(&RunId::new("reads").unwrap()).await.unwrap();
    assert!(r.divergences.is_empty(), "{:?}", r.divergences);
    assert!(r.compared);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_whose_record_fails_shows_the_agent_nothing() {
    let h = H::new(POLICY);
    let (rt, tap) = tapped(&h);
    let (spec, _) = h.spec("lost", "coder", "[grants]\nuses = 5", "");
    let s = rt.open_session(spec, "coder", &Quiet).await.unwrap();
    let run = RunId::new("lost").unwrap();
    let read = request("fs.read", "hello.txt", json!({}));
    let events = |tap: Arc<HookedLog<Tap>>, run: RunId| async move {
        ice_runtime::read_run(tap.as_ref(), &run).await.unwrap()
    };

    // The first read's batch (with its new grant) and a later one's (under the live grant)
    // fail: each call fails, the agent gets no output, and nothing of the call is recorded.
    for grant_is_new in [true, false] {
        if !grant_is_new {
            let (out, _) = call(&s, &tap, &read).await;
            assert!(matches!(out, Ok(Some(Outcome::Done { .. }))));
        }
        let before = events(tap.clone(), run.clone()).await;
        tap.hooks.fail_next.store(true, Ordering::SeqCst);
        let (out, batches) = call(&s, &tap, &read).await;
        match out {
            Err(RuntimeError::Append(e)) => {
                assert!(e.to_string().contains("injected failure"), "{e}")
            }
            other => panic!("the call must fail, not answer: {other:?}"),
        }
        assert!(batches.is_empty());
        assert_eq!(events(tap.clone(), run.clone()).await, before);
    }

    // The run goes on: the next read is recorded whole and answered.
    let (out, batches) = call(&s, &tap, &read).await;
    assert_eq!(batches.len(), 1);
    assert!(matches!(out, Ok(Some(Outcome::Done { .. }))));
    let all = events(tap.clone(), run.clone()).await;
    // Two reads answered, each recorded once; the failed ones left nothing.
    assert_eq!(of_type(&all, EventType::FileRead).len(), 2);
    assert_eq!(of_type(&all, EventType::CapabilityRequested).len(), 2);
    assert_eq!(of_type(&all, EventType::CapabilityGranted).len(), 1);
    let report = s.finish().await.unwrap();
    assert_eq!(report.outcome, RunOutcome::Committed, "{report:?}");
    assert_eq!(report.books.proposals, 2);
    let r = rt.replay(&run).await.unwrap();
    assert!(r.divergences.is_empty(), "{:?}", r.divergences);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_write_whose_record_fails_never_reaches_the_workspace() {
    let h = H::new(POLICY);
    let (rt, tap) = tapped(&h);
    let (spec, _) = h.spec("unrecorded", "coder", "[grants]\nuses = 5", "");
    let s = rt.open_session(spec, "coder", &Quiet).await.unwrap();
    let run = RunId::new("unrecorded").unwrap();
    // The write changes the stage, then the batch recording it fails (a full disk, a lost
    // database): the agent gets the error, and the stage forgets the write.
    *tap.hooks.fail_type.lock().unwrap() = Some(EventType::EffectStaged.name());
    let write = request(
        "fs.write",
        "hello.txt",
        json!({"content": "never recorded\n"}),
    );
    let (out, _) = call(&s, &tap, &write).await;
    match out {
        Err(RuntimeError::Append(e)) => assert!(e.to_string().contains("injected failure"), "{e}"),
        other => panic!("the call must fail: {other:?}"),
    }
    // The run's view is the log's: the read sees the workspace's content.
    let read = request("fs.read", "hello.txt", json!({}));
    let (out, _) = call(&s, &tap, &read).await;
    match out {
        Ok(Some(Outcome::Done { output, .. })) => {
            assert_eq!(output["content"], "hello\n", "{output}")
        }
        other => panic!("the read must answer: {other:?}"),
    }
    // A later write is staged, recorded and committed as usual.
    let other = request("fs.write", "new.txt", json!({"content": "recorded\n"}));
    let (out, _) = call(&s, &tap, &other).await;
    assert!(matches!(out, Ok(Some(Outcome::Done { .. }))), "{out:?}");
    let report = s.finish().await.unwrap();
    assert_eq!(report.outcome, RunOutcome::Committed, "{report:?}");
    assert_eq!(h.read("hello.txt"), "hello\n");
    assert_eq!(h.read("new.txt"), "recorded\n");
    let all = ice_runtime::read_run(tap.as_ref(), &run).await.unwrap();
    assert_eq!(of_type(&all, EventType::EffectStaged).len(), 1);
    assert_eq!(of_type(&all, EventType::EffectApplied).len(), 1);
}

/// The review's finding: a read noted what the run saw of the workspace while it read, before
/// its batch was recorded, so a read whose record failed (the agent got an error, not the
/// content) moved what the commit checks against: an operator's edit it read that way was
/// overwritten by the run's write, unseen. The stage is told only once the read is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_whose_record_failed_does_not_count_as_seen_at_commit() {
    let h = H::new(POLICY);
    let (rt, tap) = tapped(&h);
    let (spec, _) = h.spec("unseen", "coder", "[grants]\nuses = 5", "");
    let s = rt.open_session(spec, "coder", &Quiet).await.unwrap();
    let run = RunId::new("unseen").unwrap();
    let read = request("fs.read", "hello.txt", json!({}));
    let (out, _) = call(&s, &tap, &read).await;
    assert!(matches!(out, Ok(Some(Outcome::Done { .. }))), "{out:?}");
    // An operator edits the file; the run reads it again, and that read's record fails.
    std::fs::write(h.ws.join("hello.txt"), "the operator's edit\n").unwrap();
    *tap.hooks.fail_type.lock().unwrap() = Some(EventType::FileRead.name());
    let (out, _) = call(&s, &tap, &read).await;
    assert!(matches!(out, Err(RuntimeError::Append(_))), "{out:?}");
    // Writing over it, as if on the content it was shown first, is a conflict at commit.
    let write = request("fs.write", "hello.txt", json!({"content": "mine\n"}));
    let (out, _) = call(&s, &tap, &write).await;
    assert!(matches!(out, Ok(Some(Outcome::Done { .. }))), "{out:?}");
    let all = ice_runtime::read_run(tap.as_ref(), &run).await.unwrap();
    let staged = of_type(&all, EventType::EffectStaged)[0];
    assert_eq!(
        staged.payload["seen"]["digest"],
        ice_kernel::Digest::of(b"hello\n").to_hex(),
        "{:?}",
        staged.payload
    );
    let report = s.finish().await.unwrap();
    assert!(
        matches!(&report.outcome, RunOutcome::Aborted { reason } if reason.contains("commit was refused")),
        "{report:?}"
    );
    assert_eq!(h.read("hello.txt"), "the operator's edit\n");
}

/// The second review's finding: a read of a file the run had deleted in its stage found
/// nothing there and was taken for a look at the workspace ("seen absent"), so the commit,
/// finding the file still in the workspace, was refused every time: delete, check it is gone,
/// finish could never commit. A "not found" from the stage says nothing of the workspace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_deleted_then_read_in_the_stage_still_commits() {
    let h = H::new(POLICY);
    let (rt, tap) = tapped(&h);
    let (spec, _) = h.spec("deleted", "coder", "[grants]\nuses = 5", "");
    let s = rt.open_session(spec, "coder", &Quiet).await.unwrap();
    let run = RunId::new("deleted").unwrap();
    let (out, _) = call(&s, &tap, &request("fs.delete", "hello.txt", json!({}))).await;
    assert!(matches!(out, Ok(Some(Outcome::Done { .. }))), "{out:?}");
    let (out, _) = call(&s, &tap, &request("fs.read", "hello.txt", json!({}))).await;
    match out {
        Ok(Some(Outcome::Denied { reason, .. })) => assert_eq!(reason, "effect_failed"),
        other => panic!("the read must find nothing: {other:?}"),
    }
    let report = s.finish().await.unwrap();
    assert_eq!(report.outcome, RunOutcome::Committed, "{report:?}");
    assert!(!h.ws.join("hello.txt").exists());
    let all = ice_runtime::read_run(tap.as_ref(), &run).await.unwrap();
    let denied = of_type(&all, EventType::CapabilityDenied)[0];
    assert!(denied.payload.get("seen").is_none(), "{:?}", denied.payload);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_write_stored_despite_a_lost_answer_is_committed_as_recorded() {
    let h = H::new(POLICY);
    let (rt, tap) = tapped(&h);
    let (spec, _) = h.spec("lost-answer", "coder", "[grants]\nuses = 5", "");
    let s = rt.open_session(spec, "coder", &Quiet).await.unwrap();
    let run = RunId::new("lost-answer").unwrap();
    // The batch recording the write is stored, but its answer is lost: the call fails, and the
    // log holds the write all the same.
    *tap.hooks.lose_answer_type.lock().unwrap() = Some(EventType::EffectStaged.name());
    let write = request(
        "fs.write",
        "hello.txt",
        json!({"content": "stored after all\n"}),
    );
    let (out, _) = call(&s, &tap, &write).await;
    assert!(out.is_err(), "{out:?}");
    let other = request("fs.write", "new.txt", json!({"content": "recorded\n"}));
    let (out, _) = call(&s, &tap, &other).await;
    assert!(matches!(out, Ok(Some(Outcome::Done { .. }))), "{out:?}");
    let report = s.finish().await.unwrap();
    assert_eq!(report.outcome, RunOutcome::Committed, "{report:?}");
    // What the log says was staged is what reached the workspace.
    let all = ice_runtime::read_run(tap.as_ref(), &run).await.unwrap();
    assert_eq!(of_type(&all, EventType::EffectStaged).len(), 2);
    assert_eq!(of_type(&all, EventType::EffectApplied).len(), 2);
    assert_eq!(h.read("hello.txt"), "stored after all\n");
    assert_eq!(h.read("new.txt"), "recorded\n");
}

/// An MCP tool server over stdio for the test below, run by re-executing this test binary with
/// `ICE_TEST_TOOL_SERVER` set (without it, this test does nothing). Its one tool, `big`,
/// answers with a number JSON cannot carry exactly. It speaks the `initialize` handshake
/// (the `server/discover` probe is refused, as a pre-2026 server does).
#[test]
fn tool_server_for_tests() {
    use std::io::{BufRead, Write};
    if std::env::var_os("ICE_TEST_TOOL_SERVER").is_none() {
        return;
    }
    let mut out = std::io::stdout().lock();
    // End whatever line the test harness left unfinished on the channel.
    let _ = writeln!(out);
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let Some(id) = msg.get("id").cloned() else {
            continue;
        };
        let result = match msg["method"].as_str().unwrap_or("") {
            "initialize" => json!({
                "protocolVersion": "2025-11-25",
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "odd", "version": "0"}
            }),
            "tools/list" => json!({"tools": [{
                "name": "big",
                "description": "a number JSON cannot carry exactly",
                "inputSchema": {"type": "object"}
            }]}),
            "tools/call" => json!({
                "content": [{"type": "text", "text": "big"}],
                "structuredContent": {"n": u64::MAX}
            }),
            "ping" => json!({}),
            _ => {
                let e = json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32601, "message": "no such method"}});
                let _ = writeln!(out, "{e}");
                let _ = out.flush();
                continue;
            }
        };
        let _ = writeln!(
            out,
            "{}",
            json!({"jsonrpc": "2.0", "id": id, "result": result})
        );
        let _ = out.flush();
    }
    std::process::exit(0);
}

/// A call that acts outside the run is written ahead, and a result the log cannot carry is
/// withheld: the validator refuses the effect record (nothing of it is recorded), and the
/// effect is recorded again with the result's digest instead of the result; the agent is told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_result_the_log_cannot_carry_is_withheld_and_said_so() {
    use EventType::*;
    let policy = format!(
        "{POLICY}\n@id(\"odd\")\npermit(principal, action == Action::\"mcp.call\", resource == Tool::\"odd/big\");\n"
    );
    let h = H::new(&policy);
    let (rt, tap) = tapped(&h);
    let exe = std::env::current_exe().unwrap().display().to_string();
    let servers = format!(
        "[servers.odd]\ncommand = [{exe:?}, \"tool_server_for_tests\", \"--exact\", \"-q\"]\nenv = {{ ICE_TEST_TOOL_SERVER = \"1\" }}\n[servers.odd.tools]\nbig = \"read\"\n"
    );
    let (spec, _) = h.spec("odd-tool", "coder", &servers, "");
    let s = rt.open_session(spec, "coder", &Quiet).await.unwrap();
    let (out, batches) = call(&s, &tap, &request("mcp.call", "odd/big", json!({}))).await;
    let shapes: Vec<Vec<&str>> = batches.iter().map(|b| types(b)).collect();
    assert_eq!(
        shapes,
        [
            names(&[CapabilityRequested, CapabilityGranted]),
            names(&[BudgetReserved, CapabilityUsed]),
            names(&[ToolInvoked, BudgetSettled]),
        ]
    );
    let effect = &batches[2][0];
    assert_eq!(effect.causes, [batches[0][0].id(), batches[1][1].id()]);
    assert!(effect.payload.contains_key("output_withheld"), "{effect:?}");
    assert_eq!(effect.payload["error"]["kind"], "unrecordable");
    assert_eq!(effect.payload["is_error"], true);
    match out.unwrap() {
        Some(Outcome::Done { output, .. }) => {
            assert_eq!(output["isError"], true);
            assert!(
                output["content"][0]["text"]
                    .as_str()
                    .unwrap()
                    .contains("cannot be recorded"),
                "{output}"
            );
            assert_eq!(output, effect.payload["output"]);
        }
        other => panic!("{other:?}"),
    }
    let report = s.finish().await.unwrap();
    assert_eq!(report.outcome, RunOutcome::Committed, "{report:?}");
    let r = rt.replay(&RunId::new("odd-tool").unwrap()).await.unwrap();
    assert!(r.divergences.is_empty(), "{:?}", r.divergences);
}
