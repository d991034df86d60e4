//! Governed runs end to end, in process, on the embedded log.

mod common;

use common::*;
use ice_kernel::{EventType, RunId, RunState};
use ice_runtime::{Books, RunOutcome, RunReport};

const MAIN_PLAN: &str = r#"
[[step]]
intent = "plan"
think = "plan_step"
text = "read, rewrite, check"

[[step]]
intent = "list"
capability = "fs.list"
target = "."

[[step]]
intent = "read"
capability = "fs.read"
target = "hello.txt"

[[step]]
intent = "escape"
capability = "fs.read"
target = "../outside.txt"

[[step]]
intent = "rewrite"
capability = "fs.write"
target = "hello.txt"
arguments = { content = "hello, governed world\n" }

[[step]]
intent = "new file"
capability = "fs.write"
target = "notes/todo.txt"
arguments = { content = "more\n" }

[[step]]
intent = "forbidden"
capability = "fs.write"
target = "locked/release.txt"
arguments = { content = "2.0\n" }

[[step]]
intent = "read back"
capability = "fs.read"
target = "hello.txt"

[[step]]
intent = "no such capability"
capability = "fs.teleport"
target = "x"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_reads_stages_validates_and_commits() {
    let h = H::new(POLICY);
    let (spec, plan) = h.spec(
        "main",
        "coder",
        "[budget]\ntool_calls = 20\n\n[[check]]\nname = \"friendlier\"\nrun = [\"grep\", \"-q\", \"governed\", \"hello.txt\"]\n",
        MAIN_PLAN,
    );
    let ws = h.ws.clone();
    // The workspace does not change during the run: writes are staged.
    let mut agent = Hooked {
        inner: plan,
        hook: move |v: &ice_kernel::AgentView| {
            assert_eq!(
                std::fs::read_to_string(ws.join("hello.txt")).unwrap(),
                "hello\n"
            );
            if v.step == 8 {
                // The read after the write saw the staged content.
                match &v.last {
                    Some(ice_kernel::Outcome::Done { output, .. }) => {
                        assert_eq!(output["content"], "hello, governed world\n")
                    }
                    other => panic!("read back: {other:?}"),
                }
            }
        },
    };
    let report = h.run(spec, &mut agent).await;
    assert_eq!(report.outcome, RunOutcome::Committed, "{report:?}");
    assert_eq!(report.state, RunState::Terminated);
    assert_eq!(h.read("hello.txt"), "hello, governed world\n");
    assert_eq!(h.read("notes/todo.txt"), "more\n");
    assert_eq!(h.read("locked/release.txt"), "1.0\n");
    let events = h.events("main").await;
    assert_eq!(
        denial_codes(&events),
        ["confinement", "policy_denied", "unknown_capability"]
    );
    let forbidden = &of_type(&events, EventType::CapabilityDenied)[1];
    assert_eq!(forbidden.payload["policies"][0], "locked");
    assert_eq!(of_type(&events, EventType::EffectApplied).len(), 2);
    assert_eq!(of_type(&events, EventType::ValidationPassed).len(), 1);
    // Every phase, in order.
    let phases: Vec<&str> = events
        .iter()
        .map(|e| e.event_type.as_str())
        .filter(|t| {
            [
                "RunProvisioned",
                "ResourcesAllocated",
                "ContextResolved",
                "MemoryMounted",
                "CapabilitiesBound",
                "ExecutionWindowOpened",
                "ValidationStarted",
                "ValidationPassed",
                "RunCommitted",
                "ResourcesReleased",
                "RunTerminated",
            ]
            .contains(t)
        })
        .collect();
    assert_eq!(
        phases,
        [
            "RunProvisioned",
            "ResourcesAllocated",
            "ContextResolved",
            "MemoryMounted",
            "CapabilitiesBound",
            "ExecutionWindowOpened",
            "ValidationStarted",
            "ValidationPassed",
            "RunCommitted",
            "ResourcesReleased",
            "RunTerminated",
        ]
    );
    // Every effect names a grant and follows a recorded use of it.
    for e in &events {
        if ["FileRead", "EffectStaged"].contains(&e.event_type.as_str()) {
            let g = e.authority.as_deref().unwrap();
            assert!(e.causes.iter().any(|c| {
                let u = &events[c.run_seq as usize];
                u.event_type == "CapabilityUsed" && u.authority.as_deref() == Some(g)
            }));
        }
    }
    // Replay: the books folded from the log equal the ones the run kept live.
    let replayed = Books::fold(RunId::new("main").unwrap(), events.iter()).unwrap();
    assert_eq!(replayed, report.books);
    assert_eq!(replayed.budget.spent().tool_calls, 5);
}

/// A staged write whose content the workspace already holds at commit is not applied; the
/// diff says so ("unchanged") rather than calling it discarded or leaving it out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_write_the_workspace_already_held_shows_as_unchanged() {
    let h = H::new(POLICY);
    let same = "[[step]]\nintent = \"w\"\ncapability = \"fs.write\"\ntarget = \"hello.txt\"\narguments = { content = \"hello\\n\" }\n";
    let new = format!(
        "{same}\n[[step]]\nintent = \"n\"\ncapability = \"fs.write\"\ntarget = \"new.txt\"\narguments = {{ content = \"n\\n\" }}\n"
    );
    for (run, plan, want) in [
        (
            "same",
            same.to_string(),
            vec![("hello.txt", "unchanged", "unchanged")],
        ),
        (
            "mixed",
            new,
            vec![
                ("new.txt", "added", "applied"),
                ("hello.txt", "unchanged", "unchanged"),
            ],
        ),
    ] {
        let (spec, mut agent) = h.spec(run, "coder", "", &plan);
        let report = h.run(spec, &mut agent).await;
        assert_eq!(report.outcome, RunOutcome::Committed, "{report:?}");
        let diff = h.rt.diff(&RunId::new(run).unwrap()).await.unwrap();
        let got: Vec<(&str, &str, &str)> = diff
            .iter()
            .map(|c| {
                (
                    c["path"].as_str().unwrap(),
                    c["change"].as_str().unwrap(),
                    c["status"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(got, want, "{run}: {diff:?}");
        let unchanged = diff.iter().find(|c| c["path"] == "hello.txt").unwrap();
        assert_eq!(unchanged["before"], unchanged["after"], "{unchanged}");
        assert!(unchanged["event"].as_str().unwrap().starts_with(run));
    }
    assert_eq!(h.read("hello.txt"), "hello\n");
    assert_eq!(h.read("new.txt"), "n\n");
}

/// The probe's finding: a denial whose detail was long enough to be kept as a blob showed in
/// the run's summary with no reason at all, and a path that leaves the workspace was repeated
/// whole in its denial (3 MB for a 3 MB path). The path is cut; a detail kept as a blob is
/// named as one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_denial_details_are_cut_or_named_in_the_summary() {
    let h = H::new(POLICY);
    let long = "p".repeat(40_000);
    let plan = format!(
        "[[step]]\nintent = \"escape\"\ncapability = \"fs.read\"\ntarget = \"../{long}\"\n\n[[step]]\nintent = \"odd\"\ncapability = \"fs.read\"\ntarget = \"hello.txt\"\narguments = {{ {long} = 1 }}\n"
    );
    let (spec, mut agent) = h.spec("long-denials", "coder", "", &plan);
    let report = h.run(spec, &mut agent).await;
    assert_eq!(report.denials.len(), 2, "{:?}", report.denials);
    let (_, code, detail) = &report.denials[0];
    assert_eq!(code, "confinement");
    assert!(
        detail.contains("leaves the workspace") && detail.len() < 1_000,
        "{} bytes: {}",
        detail.len(),
        &detail[..detail.len().min(200)]
    );
    let (id, _, detail) = &report.denials[1];
    assert!(
        detail.contains("kept as blob") && detail.contains(&format!("ice show {id}")),
        "{}",
        &detail[..detail.len().min(300)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_validation_aborts_and_discards() {
    let h = H::new(POLICY);
    let plan = "[[step]]\nintent = \"w\"\ncapability = \"fs.write\"\ntarget = \"hello.txt\"\narguments = { content = \"bye\\n\" }\n";
    let (spec, mut agent) = h.spec(
        "bad-check",
        "coder",
        "[[check]]\nname = \"must say hello\"\nrun = [\"grep\", \"-q\", \"hello\", \"hello.txt\"]\n",
        plan,
    );
    let report = h.run(spec, &mut agent).await;
    assert!(
        matches!(report.outcome, RunOutcome::Aborted { .. }),
        "{report:?}"
    );
    assert_eq!(h.read("hello.txt"), "hello\n");
    let events = h.events("bad-check").await;
    assert_eq!(of_type(&events, EventType::ValidationFailed).len(), 1);
    assert_eq!(of_type(&events, EventType::EffectApplied).len(), 0);
    assert_eq!(of_type(&events, EventType::RunAborted).len(), 1);
    let results = &of_type(&events, EventType::ValidationFailed)[0].payload["results"];
    assert!(results.to_string().contains("must say hello"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_stops_a_runaway_loop() {
    let h = H::new(POLICY);
    let plan = "[[step]]\nintent = \"again\"\ncapability = \"fs.read\"\ntarget = \"hello.txt\"\nrepeat = 1000\n";
    let (spec, mut agent) = h.spec(
        "runaway",
        "looper",
        "[budget]\ntool_calls = 7\non_exhaustion = \"abort\"\n\n[grants]\nuses = 100\n",
        plan,
    );
    let report = h.run(spec, &mut agent).await;
    assert!(
        matches!(report.outcome, RunOutcome::Aborted { .. }),
        "{report:?}"
    );
    let events = h.events("runaway").await;
    assert_eq!(of_type(&events, EventType::FileRead).len(), 7);
    assert_eq!(denial_codes(&events), ["budget_exhausted"]);
    assert_eq!(report.spent.tool_calls, 7);
    // One grant served every use (uses = 100, scope covers the target).
    assert_eq!(of_type(&events, EventType::CapabilityGranted).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhaustion_can_suspend_instead() {
    let h = H::new(POLICY);
    let plan = "[[step]]\nintent = \"again\"\ncapability = \"fs.read\"\ntarget = \"hello.txt\"\nrepeat = 5\n";
    let (spec, mut agent) = h.spec(
        "suspends",
        "looper",
        "[budget]\ntool_calls = 2\non_exhaustion = \"suspend\"\n",
        plan,
    );
    let report = h.run(spec, &mut agent).await;
    assert!(matches!(report.outcome, RunOutcome::Suspended { .. }));
    assert_eq!(report.state, RunState::Suspended);
    // Raise the budget with a reconfiguration; the run resumes where it stopped and finishes.
    let rec = ice_runtime::operator::ReconfigurationFile {
        reason: "give it room".into(),
        budget: Some(toml::from_str("tool_calls = 10").unwrap()),
        ..Default::default()
    };
    let run = RunId::new("suspends").unwrap();
    h.rt.reconfigure(&run, "alice", &rec).await.unwrap();
    let (_, mut agent) = h.spec("suspends-again", "looper", "", "[[step]]\nintent = \"again\"\ncapability = \"fs.read\"\ntarget = \"hello.txt\"\nrepeat = 5\n");
    let report =
        h.rt.resume(&run, &mut agent, &ice_runtime::Quiet)
            .await
            .unwrap();
    assert_eq!(report.outcome, RunOutcome::Committed, "{report:?}");
    let events = h.events("suspends").await;
    // Two reads, one refused (the run suspended on it), then the rest of the plan: steps 3, 4.
    assert_eq!(of_type(&events, EventType::FileRead).len(), 4);
    assert_eq!(denial_codes(&events), ["budget_exhausted"]);
}

/// The second review's finding: a read that found no file was noted (absent) by the live
/// stage only, so after a restart a file someone created there was overwritten by the run's
/// write. The denial now records `seen: "absent"`, and the rebuilt stage refuses the commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_run_does_not_commit_over_a_file_created_where_it_found_none() {
    let h = H::new(POLICY);
    let plan = r#"
[[step]]
intent = "look for it"
capability = "fs.read"
target = "new.txt"

[[step]]
intent = "read"
capability = "fs.read"
target = "hello.txt"
repeat = 2

[[step]]
intent = "create it"
capability = "fs.write"
target = "new.txt"
arguments = { content = "the agent's\n" }
"#;
    // Two calls, then the third (the second read) is refused and the run suspends; resumed,
    // it goes on with the write.
    let (spec, mut agent) = h.spec(
        "created",
        "coder",
        "[budget]\ntool_calls = 2\non_exhaustion = \"suspend\"\n",
        plan,
    );
    let report = h.run(spec, &mut agent).await;
    assert_eq!(report.state, RunState::Suspended, "{report:?}");
    let events = h.events("created").await;
    let denied = of_type(&events, EventType::CapabilityDenied);
    assert_eq!(
        denied[0].payload["seen"], "absent",
        "{:?}",
        denied[0].payload
    );
    std::fs::write(h.ws.join("new.txt"), "a human's file\n").unwrap();
    let report = reconfigure_and_resume(&h, "created", "tool_calls = 10", plan).await;
    refused_over(&report, "new.txt");
    assert_eq!(h.read("new.txt"), "a human's file\n");
}

/// The projection is recorded in `RunTerminated`, and `ice replay` compares every key of it:
/// a key added to it makes every run recorded before report a divergence. New facts go in
/// `Books::view` (the review's finding: `refusals` had been added to the projection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recorded_projection_keeps_its_keys_and_the_view_adds_refusals() {
    let h = H::new(POLICY);
    let (spec, mut agent) = h.spec(
        "keys",
        "coder",
        "",
        "[[step]]\nintent = \"read\"\ncapability = \"fs.read\"\ntarget = \"hello.txt\"\n",
    );
    h.run(spec, &mut agent).await;
    let books = h.rt.books(&RunId::new("keys").unwrap()).await.unwrap();
    let mut keys: Vec<String> = books
        .projection()
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "applied",
            "approvals",
            "denials",
            "events",
            "grants",
            "outstanding",
            "policy_version",
            "proposals",
            "reservations",
            "spent",
            "staged",
            "state"
        ]
    );
    assert_eq!(books.view()["refusals"], 0);
}

/// Every attempt is recorded, so an agent that keeps asking for what it may not have grew
/// the log without end: denials counted against no budget. `[budget] denials` stops the run
/// once that many of its requests were denied; an operator may raise it and resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denials_budget_stops_an_agent_that_keeps_asking_for_what_is_denied() {
    let h = H::new(POLICY);
    let plan = "[[step]]\nintent = \"try\"\ncapability = \"fs.write\"\ntarget = \"locked/release.txt\"\narguments = { content = \"2.0\\n\" }\nrepeat = 1000\n";
    let (spec, mut agent) = h.spec(
        "refused",
        "coder",
        "[budget]\ndenials = 3\non_exhaustion = \"suspend\"\n",
        plan,
    );
    let report = h.run(spec, &mut agent).await;
    match &report.outcome {
        RunOutcome::Suspended { reason } => assert!(
            reason.contains("3 of the agent's requests were refused, and the budget allows 3"),
            "{reason}"
        ),
        other => panic!("{other:?}"),
    }
    let events = h.events("refused").await;
    assert_eq!(of_type(&events, EventType::CapabilityRequested).len(), 3);
    assert_eq!(
        denial_codes(&events),
        ["policy_denied", "policy_denied", "policy_denied"]
    );
    assert_eq!(
        of_type(&events, EventType::RunSuspended)[0].payload["reason"],
        "budget_exhausted"
    );
    // Two more denials allowed: the run resumes, is refused twice more, and stops again.
    let report = reconfigure_and_resume(&h, "refused", "denials = 5", plan).await;
    assert!(
        matches!(report.outcome, RunOutcome::Suspended { .. }),
        "{report:?}"
    );
    let events = h.events("refused").await;
    assert_eq!(of_type(&events, EventType::CapabilityRequested).len(), 5);
    assert_eq!(h.read("locked/release.txt"), "1.0\n");
    // Without the key, nothing changes: a run's denials have no limit.
    let (spec, mut agent) = h.spec(
        "unlimited",
        "coder",
        "",
        "[[step]]\nintent = \"try\"\ncapability = \"fs.write\"\ntarget = \"locked/release.txt\"\narguments = { content = \"2.0\\n\" }\nrepeat = 20\n",
    );
    let report = h.run(spec, &mut agent).await;
    assert_eq!(report.outcome, RunOutcome::Committed, "{report:?}");
    assert_eq!(denial_codes(&h.events("unlimited").await).len(), 20);
    // Effects that failed are not refusals: reading a missing file five times does not stop
    // a run whose budget allows two refusals.
    let (spec, mut agent) = h.spec(
        "missing",
        "coder",
        "[budget]\ndenials = 2\n",
        "[[step]]\nintent = \"look\"\ncapability = \"fs.read\"\ntarget = \"missing.txt\"\nrepeat = 5\n",
    );
    let report = h.run(spec, &mut agent).await;
    assert_eq!(report.outcome, RunOutcome::Committed, "{report:?}");
    assert_eq!(
        denial_codes(&h.events("missing").await),
        ["effect_failed"; 5]
    );
}

/// The review's finding: the denials budget stopped the run after any denial once the refusals
/// had reached it, not only after a refusal: a run suspended for its refusals and resumed
/// without raising the budget was stopped again by its next failed read. Only a denial that
/// counts as a refusal stops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_refusal_stops_a_run_at_its_denials_budget() {
    let h = H::new(POLICY);
    let (spec, mut agent) = h.spec(
        "at-limit",
        "coder",
        "[budget]\ndenials = 1\non_exhaustion = \"suspend\"\n",
        "[[step]]\nintent = \"try\"\ncapability = \"fs.write\"\ntarget = \"locked/release.txt\"\narguments = { content = \"2.0\\n\" }\n",
    );
    let report = h.run(spec, &mut agent).await;
    assert!(
        matches!(report.outcome, RunOutcome::Suspended { .. }),
        "{report:?}"
    );
    // Resumed with the same denials budget (another limit changed): reading a missing file
    // fails, which is no refusal, and the run goes on to commit.
    let report = reconfigure_and_resume(
        &h,
        "at-limit",
        "tool_calls = 100",
        "[[step]]\nintent = \"look\"\ncapability = \"fs.read\"\ntarget = \"missing.txt\"\nrepeat = 3\n",
    )
    .await;
    assert_eq!(report.outcome, RunOutcome::Committed, "{report:?}");
    assert_eq!(
        denial_codes(&h.events("at-limit").await),
        [
            "policy_denied",
            // The resumed plan goes on from its second step: two reads are left.
            "effect_failed",
            "effect_failed"
        ]
    );
}

/// The probe's finding: what the run first saw at each path (to refuse a commit over someone
/// else's change) was kept in memory only, so a run suspended, its files edited meanwhile,
/// then resumed (its stage rebuilt from the record) committed over the edits. The record now
/// holds it (`FileRead`'s digest; `EffectStaged`'s `seen`), and the rebuilt stage refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_run_does_not_commit_over_edits_made_while_it_was_suspended() {
    let h = H::new(POLICY);
    let plan = r#"
[[step]]
intent = "change the config, unread"
capability = "fs.write"
target = "config.toml"
arguments = { content = "x = 2\n" }

[[step]]
intent = "read"
capability = "fs.read"
target = "hello.txt"

[[step]]
intent = "rewrite"
capability = "fs.write"
target = "hello.txt"
arguments = { content = "the agent's\n" }

[[step]]
intent = "look again"
capability = "fs.read"
target = "hello.txt"
repeat = 2
"#;
    // Each file in its own run: one the run only wrote, one it read and then wrote.
    for (id, file, edit) in [
        ("edited", "config.toml", "x = 3\n"),
        ("edited2", "hello.txt", "a human's edit\n"),
    ] {
        std::fs::write(h.ws.join("config.toml"), "x = 1\n").unwrap();
        std::fs::write(h.ws.join("hello.txt"), "hello\n").unwrap();
        let (spec, mut agent) = h.spec(
            id,
            "coder",
            "[budget]\ntool_calls = 3\non_exhaustion = \"suspend\"\n",
            plan,
        );
        let report = h.run(spec, &mut agent).await;
        assert_eq!(report.state, RunState::Suspended, "{report:?}");
        std::fs::write(h.ws.join(file), edit).unwrap();
        let report = reconfigure_and_resume(&h, id, "tool_calls = 10", plan).await;
        refused_over(&report, file);
        assert_eq!(h.read(file), edit);
    }
}

/// The other side: an operator who edits a file while the run is suspended, and whose edit the
/// resumed run reads before writing the file, is no change behind its back: the run saw it,
/// and its commit goes through (it used to be refused, the first read's content winning). Not
/// re-read, the same edit still refuses the commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_run_that_reads_an_operators_edit_before_writing_commits() {
    let h = H::new(POLICY);
    for (id, reread, commits) in [
        ("reread", "hello.txt", true),
        ("not-reread", "config.toml", false),
    ] {
        let plan = format!(
            r#"
[[step]]
intent = "read"
capability = "fs.read"
target = "hello.txt"

[[step]]
intent = "the budget stops the run here"
capability = "fs.read"
target = "config.toml"

[[step]]
intent = "look again"
capability = "fs.read"
target = "{reread}"

[[step]]
intent = "rewrite"
capability = "fs.write"
target = "hello.txt"
arguments = {{ content = "the agent's\n" }}
"#
        );
        std::fs::write(h.ws.join("hello.txt"), "hello\n").unwrap();
        let (spec, mut agent) = h.spec(
            id,
            "coder",
            "[budget]\ntool_calls = 1\non_exhaustion = \"suspend\"\n",
            &plan,
        );
        let report = h.run(spec, &mut agent).await;
        assert_eq!(report.state, RunState::Suspended, "{report:?}");
        std::fs::write(h.ws.join("hello.txt"), "an operator's fix\n").unwrap();
        let report = reconfigure_and_resume(&h, id, "tool_calls = 10", &plan).await;
        if commits {
            assert_eq!(report.outcome, RunOutcome::Committed, "{report:?}");
            assert_eq!(h.read("hello.txt"), "the agent's\n");
            // The record says what it saw last, and a fold of it agrees.
            let events = h.events(id).await;
            let reads = of_type(&events, EventType::FileRead);
            let last = reads
                .iter()
                .rev()
                .find(|e| e.payload["path"] == "hello.txt")
                .unwrap();
            assert_eq!(
                last.payload["digest"],
                ice_kernel::Digest::of(b"an operator's fix\n").to_hex()
            );
            let books = Books::fold(RunId::new(id).unwrap(), events.iter()).unwrap();
            assert_eq!(
                books.seen["hello.txt"].map(|s| s.digest),
                Some(ice_kernel::Digest::of(b"an operator's fix\n"))
            );
        } else {
            refused_over(&report, "hello.txt");
            assert_eq!(h.read("hello.txt"), "an operator's fix\n");
        }
    }
}

/// Record an operator's reconfiguration of suspended run `id` giving it `budget` (keys of
/// `[budget]`), and resume it with `plan` (the plan driver goes on where the run stopped).
async fn reconfigure_and_resume(h: &H, id: &str, budget: &str, plan: &str) -> RunReport {
    let rec = ice_runtime::operator::ReconfigurationFile {
        reason: "a new budget".into(),
        budget: Some(toml::from_str(budget).unwrap()),
        ..Default::default()
    };
    let run = RunId::new(id).unwrap();
    h.rt.reconfigure(&run, "alice", &rec).await.unwrap();
    let (_, mut again) = h.spec(&format!("{id}-again"), "coder", "", plan);
    h.rt.resume(&run, &mut again, &ice_runtime::Quiet)
        .await
        .unwrap()
}

/// The run ended aborted, its commit refused because `path` changed in the workspace.
fn refused_over(report: &RunReport, path: &str) {
    match &report.outcome {
        RunOutcome::Aborted { reason } => assert!(
            reason.contains(&format!(
                "{path:?} changed in the workspace while the run worked on it"
            )),
            "{reason}"
        ),
        other => panic!("{path}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconfigured_budget_changes_only_the_limits_it_names() {
    let h = H::new(POLICY);
    let plan = "[[step]]\nintent = \"again\"\ncapability = \"fs.read\"\ntarget = \"hello.txt\"\nrepeat = 5\n";
    let (spec, mut agent) = h.spec(
        "partial",
        "looper",
        "[budget]\ntool_calls = 2\nbytes = 100000\nwall_time = \"1h\"\non_exhaustion = \"suspend\"\n",
        plan,
    );
    let report = h.run(spec, &mut agent).await;
    assert_eq!(report.state, RunState::Suspended);
    let rec = ice_runtime::operator::ReconfigurationFile {
        reason: "two more calls, nothing else".into(),
        budget: Some(toml::from_str("tool_calls = 10").unwrap()),
        ..Default::default()
    };
    let run = RunId::new("partial").unwrap();
    h.rt.reconfigure(&run, "alice", &rec).await.unwrap();
    let budget = h.rt.books(&run).await.unwrap().spec.unwrap().budget;
    assert_eq!(budget.tool_calls, Some(10));
    assert_eq!(budget.bytes, Some(100_000));
    assert_eq!(budget.wall_time_us, Some(3_600_000_000));
    assert_eq!(
        budget.on_exhaustion,
        ice_runtime::spec::OnExhaustion::Suspend
    );
    // A key given replaces that limit; a bad value is refused naming it.
    let bad = ice_runtime::operator::ReconfigurationFile {
        reason: "x".into(),
        budget: Some(toml::from_str("wall_time = \"0s\"").unwrap()),
        ..Default::default()
    };
    let e = h.rt.reconfigure(&run, "alice", &bad).await.unwrap_err();
    assert!(e.to_string().contains("wall_time"), "{e}");
    // A table where a limit goes is refused naming the key, not as a section of its own.
    let nested = ice_runtime::operator::ReconfigurationFile {
        reason: "x".into(),
        budget: Some(toml::from_str("tool_calls = 3\n[bytes]\nmax = 1").unwrap()),
        ..Default::default()
    };
    let e = h.rt.reconfigure(&run, "alice", &nested).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "[budget]: `bytes` is a table; each limit is a single value",
        "{e}"
    );
    let budget = h.rt.books(&run).await.unwrap().spec.unwrap().budget;
    assert_eq!(budget.tool_calls, Some(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_assumption_suspends_and_resume_needs_a_record() {
    let h = H::new(POLICY);
    let plan = THREE_READS;
    suspend_on_changed_assumption(&h, "assumes").await;
    let run = RunId::new("assumes").unwrap();
    // Resuming without a reconfiguration record is refused.
    let (_, mut again) = h.spec("assumes2", "coder", "", plan);
    let err =
        h.rt.resume(&run, &mut again, &ice_runtime::Quiet)
            .await
            .unwrap_err();
    assert!(err.to_string().contains("reconfiguration"), "{err}");
    // A record that does not accept the change leaves the assumption broken: still refused.
    let weak = ice_runtime::operator::ReconfigurationFile {
        reason: "looked at it".into(),
        ..Default::default()
    };
    h.rt.reconfigure(&run, "alice", &weak).await.unwrap();
    let err =
        h.rt.resume(&run, &mut again, &ice_runtime::Quiet)
            .await
            .unwrap_err();
    assert!(err.to_string().contains("config.toml changed"), "{err}");
    // Accepting the new content resumes it, and the record is in the log.
    let ok = ice_runtime::operator::ReconfigurationFile {
        reason: "the config change is intended".into(),
        accept_files: true,
        ..Default::default()
    };
    h.rt.reconfigure(&run, "alice", &ok).await.unwrap();
    let report =
        h.rt.resume(&run, &mut again, &ice_runtime::Quiet)
            .await
            .unwrap();
    assert_eq!(report.outcome, RunOutcome::Committed, "{report:?}");
    let events = h.events("assumes").await;
    let recs = of_type(&events, EventType::ReconfigurationRecorded);
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[1].origin.to_string(), "operator:alice");
    assert!(
        recs[1].payload["invalidation"]["detail"]
            .as_str()
            .unwrap()
            .contains("config.toml")
    );
    assert_eq!(of_type(&events, EventType::RunResumed).len(), 1);
    assert_eq!(of_type(&events, EventType::FileRead).len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_reload_revokes_grants_no_longer_permitted() {
    let h = H::new(POLICY);
    let plan =
        "[[step]]\nintent = \"r\"\ncapability = \"fs.read\"\ntarget = \"hello.txt\"\nrepeat = 3\n";
    let (spec, plan_agent) = h.spec("reload", "coder", "[grants]\nuses = 10\n", plan);
    let mut agent = reads_withdrawn_at_step_1(plan_agent, h.policies.join("p.cedar"));
    let report = h.run(spec, &mut agent).await;
    assert_eq!(report.outcome, RunOutcome::Committed);
    let events = h.events("reload").await;
    let revoked = of_type(&events, EventType::CapabilityRevoked);
    assert_eq!(revoked.len(), 1, "{events:#?}");
    assert!(
        revoked[0].payload["reason"]
            .as_str()
            .unwrap()
            .contains("policy reload")
    );
    // Read 0 under the grant; the policy changes before read 1, which the grant still covers
    // (the change is noticed between steps); then the grant is revoked and read 2 is decided
    // afresh, and denied.
    assert_eq!(of_type(&events, EventType::FileRead).len(), 2);
    assert_eq!(denial_codes(&events), ["policy_denied"]);
    assert!(revoked[0].run_seq < of_type(&events, EventType::CapabilityDenied)[0].run_seq);
    // The reload is recorded, with the new files, and the revocation is its consequence.
    let reloads = of_type(&events, EventType::PolicyReloaded);
    assert_eq!(reloads.len(), 1, "{events:#?}");
    assert!(revoked[0].causes.contains(&reloads[0].id()));
    assert_eq!(reloads[0].run_seq + 1, revoked[0].run_seq);
    // Re-driven from the record, the run re-makes every decision, the revocation included,
    // and the denial of read 2 under the new files.
    assert_eq!(replays_cleanly(&h, "reload", "coder", plan).await, 3);
}

/// The finding: a policy file that is a symbolic link was stamped by the link's own size and
/// time, so an edit of the file it points to was never noticed while the run went on. The
/// stamp follows the link as the loader does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_of_a_policy_file_behind_a_symbolic_link_is_taken_on() {
    let h = H::new(POLICY);
    let real = h.dir.path().join("real.cedar");
    std::fs::write(&real, POLICY).unwrap();
    std::fs::remove_file(h.policies.join("p.cedar")).unwrap();
    std::os::unix::fs::symlink(&real, h.policies.join("p.cedar")).unwrap();
    let plan =
        "[[step]]\nintent = \"r\"\ncapability = \"fs.read\"\ntarget = \"hello.txt\"\nrepeat = 3\n";
    let (spec, plan_agent) = h.spec("linked", "coder", "[grants]\nuses = 10\n", plan);
    let mut agent = reads_withdrawn_at_step_1(plan_agent, real);
    let report = h.run(spec, &mut agent).await;
    assert_eq!(report.outcome, RunOutcome::Committed);
    let events = h.events("linked").await;
    assert_eq!(
        of_type(&events, EventType::PolicyReloaded).len(),
        1,
        "{events:#?}"
    );
    assert_eq!(of_type(&events, EventType::CapabilityRevoked).len(), 1);
    assert_eq!(denial_codes(&events), ["policy_denied"]);
}

/// The finding (policy probe): the stamp of the policy files was their size, modification
/// time and inode, so a file rewritten in place at the same size with its modification time
/// put back (`cp -p`, `rsync -t --inplace`, `touch -r`) was never taken on. The inode's change
/// time, which no tool sets back, is in the stamp.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_same_size_policy_edit_with_its_time_put_back_is_taken_on() {
    let h = H::new(POLICY);
    let plan =
        "[[step]]\nintent = \"r\"\ncapability = \"fs.read\"\ntarget = \"hello.txt\"\nrepeat = 3\n";
    let (spec, plan_agent) = h.spec("same-size", "coder", "", plan);
    let file = h.policies.join("p.cedar");
    let mut agent = Hooked {
        inner: plan_agent,
        hook: move |v: &ice_kernel::AgentView| {
            if v.step == 1 {
                let read = "@id(\"read\")\npermit(principal, action in [Action::\"fs.read\"";
                let text = POLICY.replace(read, &read.replace("permit", "forbid"));
                assert_eq!(text.len(), POLICY.len());
                assert_ne!(text, POLICY);
                let before = std::fs::metadata(&file).unwrap().modified().unwrap();
                std::thread::sleep(std::time::Duration::from_millis(30));
                std::fs::write(&file, text).unwrap();
                std::fs::File::options()
                    .write(true)
                    .open(&file)
                    .unwrap()
                    .set_modified(before)
                    .unwrap();
                assert_eq!(
                    std::fs::metadata(&file).unwrap().modified().unwrap(),
                    before
                );
            }
        },
    };
    let report = h.run(spec, &mut agent).await;
    assert_eq!(report.outcome, RunOutcome::Committed);
    let events = h.events("same-size").await;
    assert_eq!(
        of_type(&events, EventType::PolicyReloaded).len(),
        1,
        "{events:#?}"
    );
    // Read 1 was decided before the edit was looked for (between steps); read 2 after.
    assert_eq!(of_type(&events, EventType::FileRead).len(), 2);
    assert_eq!(denial_codes(&events), ["policy_denied"]);
}

/// `plan_agent`, which before its step 1 rewrites the policy file `file` as POLICY without
/// the rule permitting reads.
fn reads_withdrawn_at_step_1(
    plan_agent: ice_intelligence::PlanAgent,
    file: std::path::PathBuf,
) -> Hooked<impl FnMut(&ice_kernel::AgentView) + Send> {
    Hooked {
        inner: plan_agent,
        hook: move |v: &ice_kernel::AgentView| {
            if v.step == 1 {
                let text = POLICY.replace("@id(\"read\")\npermit(principal, action in [Action::\"fs.read\", Action::\"fs.list\"], resource in Dir::\".\");", "");
                assert_ne!(text, POLICY);
                // Edits are looked for at most every 25 ms between steps.
                std::thread::sleep(std::time::Duration::from_millis(30));
                std::fs::write(&file, text).unwrap();
            }
        },
    }
}

/// Re-drive `run` from its record with a fresh agent following `plan`: every decision must be
/// re-made (no divergence, nothing unchecked). Returns how many decisions were.
async fn replays_cleanly(h: &H, run: &str, agent: &str, plan: &str) -> u64 {
    let (_, mut again) = h.spec(&format!("{run}-replay"), agent, "", plan);
    let id = RunId::new(run).unwrap();
    let r = h.rt.replay_drive(&id, &mut again).await.unwrap();
    assert!(r.divergences.is_empty(), "{:?}", r.divergences);
    let d = r.drive.unwrap();
    assert!(d.unchecked.is_empty(), "{:?}", d.unchecked);
    d.decisions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_reload_that_revokes_nothing_is_recorded_and_later_requests_replay_under_it() {
    let h = H::new(POLICY);
    let plan = "[[step]]\nintent = \"r\"\ncapability = \"fs.read\"\ntarget = \"hello.txt\"\nrepeat = 2\n\n[[step]]\nintent = \"w\"\ncapability = \"fs.write\"\ntarget = \"hello.txt\"\narguments = { content = \"x\" }\n";
    let (spec, plan_agent) = h.spec("quiet-reload", "coder", "[grants]\nuses = 10\n", plan);
    let policies = h.policies.clone();
    // Reads stay permitted (the live read grant stands); writing becomes forbidden.
    let new_text = format!(
        "{POLICY}\n@id(\"no-writing\")\nforbid(principal, action == Action::\"fs.write\", resource);\n"
    );
    let written = new_text.clone();
    let mut agent = Hooked {
        inner: plan_agent,
        hook: move |v: &ice_kernel::AgentView| {
            if v.step == 1 {
                std::thread::sleep(std::time::Duration::from_millis(30));
                std::fs::write(policies.join("p.cedar"), &written).unwrap();
            }
        },
    };
    let report = h.run(spec, &mut agent).await;
    assert_eq!(report.outcome, RunOutcome::Committed);
    let events = h.events("quiet-reload").await;
    assert!(of_type(&events, EventType::CapabilityRevoked).is_empty());
    assert_eq!(denial_codes(&events), ["policy_denied"]);
    assert_eq!(h.read("hello.txt"), "hello\n");
    let reloads = of_type(&events, EventType::PolicyReloaded);
    assert_eq!(reloads.len(), 1, "{events:#?}");
    let reload = &reloads[0].payload;
    let context = &of_type(&events, EventType::ContextResolved)[0].payload;
    assert_eq!(reload["previous_version"], context["policy_version"]);
    assert_ne!(reload["policy_version"], context["policy_version"]);
    assert_eq!(
        reload["policy_sources"],
        serde_json::json!([{"name": "p.cedar", "text": new_text}])
    );
    assert!(reloads[0].run_seq < of_type(&events, EventType::CapabilityDenied)[0].run_seq);
    // The replay decides the write under the reloaded files (under the files the run started
    // with it would be permitted, and the record would look divergent).
    let run = RunId::new("quiet-reload").unwrap();
    let r = h.rt.replay(&run).await.unwrap();
    assert!(r.divergences.is_empty(), "{:?}", r.divergences);
    assert_eq!(replays_cleanly(&h, "quiet-reload", "coder", plan).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_policy_no_longer_loads_can_still_be_killed() {
    let h = H::new(POLICY);
    let plan = "[[step]]\nintent = \"w\"\ncapability = \"fs.write\"\ntarget = \"hello.txt\"\narguments = { content = \"x\" }\n\n[[step]]\nintent = \"r\"\ncapability = \"fs.read\"\ntarget = \"hello.txt\"\nrepeat = 3\n";
    let (spec, mut agent) = h.spec(
        "broken-policy",
        "coder",
        "[budget]\ntool_calls = 2\non_exhaustion = \"suspend\"\n",
        plan,
    );
    let report = h.run(spec, &mut agent).await;
    assert_eq!(report.state, RunState::Suspended);
    // The policy directory breaks while the run waits for an operator.
    std::fs::write(h.policies.join("broken.cedar"), "permit(").unwrap();
    let run = RunId::new("broken-policy").unwrap();
    let killed =
        h.rt.kill(&run, "bob", "enough", &ice_runtime::Quiet)
            .await
            .unwrap();
    assert_eq!(killed.state, RunState::Terminated);
    assert_eq!(h.read("hello.txt"), "hello\n");
    let events = h.events("broken-policy").await;
    assert_eq!(of_type(&events, EventType::RunKillRequested).len(), 1);
    assert_eq!(of_type(&events, EventType::RunAborted).len(), 1);
    let reason = &of_type(&events, EventType::AbortReasonDeclared)[0].payload;
    assert_eq!(reason["detail"], "killed by operator:bob: enough");
    // Ending the run decided nothing: no policy reload and no grant revoked on its way out.
    let after_kill: Vec<&str> = events
        .iter()
        .skip_while(|e| e.event_type != EventType::RunKillRequested.name())
        .map(|e| e.event_type.as_str())
        .collect();
    assert_eq!(
        after_kill,
        [
            "RunKillRequested",
            "RunAborted",
            "AbortReasonDeclared",
            "ResourcesReleased",
            "RunTerminated"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_aborts_a_suspended_run() {
    let h = H::new(POLICY);
    let plan = "[[step]]\nintent = \"w\"\ncapability = \"fs.write\"\ntarget = \"hello.txt\"\narguments = { content = \"x\" }\n\n[[step]]\nintent = \"r\"\ncapability = \"fs.read\"\ntarget = \"hello.txt\"\nrepeat = 3\n";
    let (spec, mut agent) = h.spec(
        "killed",
        "coder",
        "[budget]\ntool_calls = 2\non_exhaustion = \"suspend\"\n",
        plan,
    );
    let report = h.run(spec, &mut agent).await;
    assert_eq!(report.state, RunState::Suspended);
    let run = RunId::new("killed").unwrap();
    let killed =
        h.rt.kill(&run, "bob", "enough", &ice_runtime::Quiet)
            .await
            .unwrap();
    assert_eq!(killed.state, RunState::Terminated);
    assert_eq!(killed.commit_completed, None);
    assert_eq!(h.read("hello.txt"), "hello\n");
    let events = h.events("killed").await;
    assert_eq!(
        of_type(&events, EventType::RunKillRequested)[0]
            .origin
            .to_string(),
        "operator:bob"
    );
    assert_eq!(of_type(&events, EventType::RunAborted).len(), 1);
    // A second kill is refused: the run has ended.
    assert!(
        h.rt.kill(&run, "bob", "", &ice_runtime::Quiet)
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_before_anything_is_recorded() {
    let h = H::new(POLICY);
    // A run id that exists already.
    let (spec, mut agent) = h.spec("twice", "coder", "", "[[step]]\nfinish = \"x\"\n");
    h.run(spec.clone(), &mut agent).await;
    let n = h.events("twice").await.len();
    let err =
        h.rt.start(spec, &mut agent, &ice_runtime::Quiet)
            .await
            .unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    assert_eq!(h.events("twice").await.len(), n);
    // A policy that does not load: the error names file, line and column; nothing recorded.
    std::fs::write(
        h.policies.join("broken.cedar"),
        "permit(principal, action, resource)\n",
    )
    .unwrap();
    let (spec, mut agent) = h.spec("broken-policy", "coder", "", "[[step]]\nfinish = \"x\"\n");
    let err =
        h.rt.start(spec, &mut agent, &ice_runtime::Quiet)
            .await
            .unwrap_err();
    assert!(err.to_string().contains("broken.cedar:1:"), "{err}");
    assert!(h.events("broken-policy").await.is_empty());
    std::fs::remove_file(h.policies.join("broken.cedar")).unwrap();
    // An assumption that does not hold at start.
    let (spec, mut agent) = h.spec(
        "bad-assume",
        "coder",
        "[[assume]]\nfile = \"config.toml\"\nsha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\n",
        "[[step]]\nfinish = \"x\"\n",
    );
    let err =
        h.rt.start(spec, &mut agent, &ice_runtime::Quiet)
            .await
            .unwrap_err();
    assert!(err.to_string().contains("config.toml"), "{err}");
    assert!(h.events("bad-assume").await.is_empty());
}

#[test]
fn bad_run_specs_name_file_line_and_problem() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("ws")).unwrap();
    std::fs::write(dir.path().join("plan.toml"), "").unwrap();
    let head = "[run]\nagent = \"a\"\nworkspace = \"ws\"\n\n[agent]\ndriver = \"plan\"\nplan = \"plan.toml\"\n";
    let cases = [
        (format!("{head}[budget]\nwall_time = \"ten\"\n"), "run.toml:8:1: [budget] wall_time"),
        (format!("{head}[budget]\nwall_tme = \"1s\"\n"), "run.toml:9:1: unknown field `wall_tme`"),
        (format!("{head}[[check]]\nname = \"c\"\nrun = []\n"), "run.toml:8:1: [[check]] \"c\": `run` needs a program"),
        (format!("{head}[[assume]]\nfile = \"../x\"\n"), "[[assume]] file"),
        (format!("{head}[grants]\nttl = \"0s\"\n"), "run.toml:8:1: [grants] ttl must be more than 0"),
        (format!("{head}[servers.a__b]\ncommand = [\"x\"]\n"), "[servers.a__b]: a server name may not contain \"__\""),
        (format!("{head}[[assume]]\nfile = \"x\"\npolicy_version = \"current\"\n"), "either `file`"),
        ("[run]\nagent = \"a b\"\nworkspace = \"ws\"\n[agent]\ndriver = \"plan\"\nplan = \"plan.toml\"\n".to_string(), "run.toml:1:1: [run] agent \"a b\""),
        ("[run]\nagent = \"a\"\nworkspace = \"nope\"\n[agent]\ndriver = \"plan\"\nplan = \"plan.toml\"\n".to_string(), "[run] workspace \"nope\""),
        ("[run]\nagent = \"a\"\nworkspace = \"ws\"\n[agent]\ndriver = \"llm\"\n".to_string(), "run.toml:4:1: [agent] the llm driver needs an [agent.llm] table"),
        ("[run]\nagent = \"a\"\nworkspace = \"ws\"\n[agent]\ndriver = \"sorcery\"\n".to_string(), "run.toml:4:1: [agent] driver \"sorcery\" is not available"),
        ("[run]\nagent = \"a\"\nworkspace = \"ws\"\n".to_string(), "missing field `agent`"),
        (format!("{head}[grants]\nuses = 0\n"), "uses must be at least 1"),
    ];
    for (text, want) in cases {
        let path = dir.path().join("run.toml");
        std::fs::write(&path, &text).unwrap();
        let err = ice_runtime::RunSpec::load(&path).unwrap_err().to_string();
        assert!(err.contains(want), "{text}\n got: {err}\nwant: {want}");
        assert!(err.starts_with(&path.display().to_string()), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workspace_holding_the_installation_is_refused() {
    let h = H::new(POLICY);
    // The home is <base>/home; a workspace of <base> would contain it.
    let spec_file = h.base.join("wide.toml");
    std::fs::write(h.base.join("wide-plan.toml"), "").unwrap();
    std::fs::write(
        &spec_file,
        "[run]\nid = \"wide\"\nagent = \"coder\"\nworkspace = \".\"\npolicy = \"policies\"\n[agent]\ndriver = \"plan\"\nplan = \"wide-plan.toml\"\n",
    )
    .unwrap();
    let spec = ice_runtime::RunSpec::load(&spec_file).unwrap();
    let (_, mut agent) = h.spec("unused", "coder", "", "");
    let err =
        h.rt.start(spec, &mut agent, &ice_runtime::Quiet)
            .await
            .unwrap_err();
    assert!(
        err.to_string().contains("contains this ICE installation"),
        "{err}"
    );
    assert!(h.events("wide").await.is_empty());

    // Nor may a workspace lie inside the installation (its keys, policies, log or runs).
    let keys = h.base.join("home/keys");
    std::fs::create_dir_all(&keys).unwrap();
    std::fs::write(keys.join("checkpoint.key"), "PRIVATE").unwrap();
    std::fs::write(
        &spec_file,
        "[run]\nid = \"inside\"\nagent = \"coder\"\nworkspace = \"home/keys\"\npolicy = \"policies\"\n[agent]\ndriver = \"plan\"\nplan = \"wide-plan.toml\"\n",
    )
    .unwrap();
    let spec = ice_runtime::RunSpec::load(&spec_file).unwrap();
    let err =
        h.rt.start(spec, &mut agent, &ice_runtime::Quiet)
            .await
            .unwrap_err();
    assert!(
        err.to_string().contains("is inside this ICE installation"),
        "{err}"
    );
    assert!(h.events("inside").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_the_law_cannot_record_is_refused_not_fatal() {
    let h = H::new(POLICY);
    // 1e16 is a float JSON cannot carry exactly (the kernel's number rule refuses it).
    let plan = "[[step]]\nintent = \"odd\"\ncapability = \"fs.read\"\ntarget = \"hello.txt\"\narguments = { n = 1e16 }\n\n[[step]]\nintent = \"fine\"\ncapability = \"fs.read\"\ntarget = \"hello.txt\"\n";
    let (spec, mut agent) = h.spec("odd", "coder", "", plan);
    let report = h.run(spec, &mut agent).await;
    assert_eq!(report.outcome, RunOutcome::Committed, "{report:?}");
    let events = h.events("odd").await;
    assert_eq!(denial_codes(&events), ["invalid_target"]);
    let d = &of_type(&events, EventType::CapabilityDenied)[0];
    assert!(
        d.payload["detail"]
            .as_str()
            .unwrap()
            .contains("cannot be recorded"),
        "{d:?}"
    );
    assert_eq!(of_type(&events, EventType::FileRead).len(), 1);
}

/// The finding: a write whose `content` was missing, misspelled or not a string wrote an
/// empty file, and the run committed it. A request whose arguments are not what its built-in
/// capability takes is refused before anything decides on it, naming what is wrong, and the
/// run goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_arguments_its_capability_does_not_take_is_refused() {
    let h = H::new(POLICY);
    let step = |target: &str, capability: &str, arguments: &str| {
        format!(
            "[[step]]\nintent = \"x\"\ncapability = \"{capability}\"\ntarget = \"{target}\"\narguments = {arguments}\n\n"
        )
    };
    let cases = [
        ("empty.txt", "fs.write", "{}", "`content` is required"),
        // A name an operator would read as another (shown as `evilhs.txt`).
        (
            "evil\\u202Etxt.sh",
            "fs.write",
            "{ content = \"x\" }",
            "contains the invisible formatting character U+202E",
        ),
        (
            "typo.txt",
            "fs.write",
            "{ contents = \"x\" }",
            "`content` is required",
        ),
        (
            "number.txt",
            "fs.write",
            "{ content = 3 }",
            "`content` must be a string",
        ),
        (
            "hello.txt",
            "fs.write",
            "{ content = \"x\", mode = \"755\" }",
            "`mode` is not an argument of fs.write (its other arguments are `content`)",
        ),
        (
            "hello.txt",
            "fs.read",
            "{ path = \"config.toml\" }",
            "`path` is the request's target",
        ),
        (
            "ls",
            "process.exec",
            "{ args = \"-la\" }",
            "`args` must be an array of strings",
        ),
        (
            "ls",
            "process.exec",
            "{ timeout_ms = 0 }",
            "`timeout_ms` must be from 1 to 600000",
        ),
        (
            "http://127.0.0.1:9/x",
            "http.request",
            "{ method = 1 }",
            "`method` must be a string",
        ),
        (
            "http://127.0.0.1:9/x",
            "http.request",
            "{ method = \"TRACE\" }",
            "`method` \"TRACE\" is not one of GET, HEAD",
        ),
    ];
    let mut plan: String = cases.iter().map(|(t, c, a, _)| step(t, c, a)).collect();
    plan.push_str(&step("ok.txt", "fs.write", "{ content = \"fine\\n\" }"));
    let (spec, mut agent) = h.spec("args", "coder", "[budget]\ntool_calls = 20\n", &plan);
    let report = h.run(spec, &mut agent).await;
    assert_eq!(report.outcome, RunOutcome::Committed, "{report:?}");
    let events = h.events("args").await;
    let denied = of_type(&events, EventType::CapabilityDenied);
    assert_eq!(denied.len(), cases.len());
    for (d, (target, capability, _, why)) in denied.iter().zip(&cases) {
        assert_eq!(d.payload["reason"], "invalid_target", "{d:?}");
        let detail = d.payload["detail"].as_str().unwrap();
        assert!(detail.starts_with(&format!("{capability}: ")), "{detail}");
        assert!(detail.contains(why), "{target}: {detail}");
    }
    // Nothing was written but the one well-formed write.
    for absent in ["empty.txt", "typo.txt", "number.txt"] {
        assert!(!h.ws.join(absent).exists(), "{absent}");
    }
    assert_eq!(
        std::fs::read_to_string(h.ws.join("hello.txt")).unwrap(),
        "hello\n"
    );
    assert_eq!(
        std::fs::read_to_string(h.ws.join("ok.txt")).unwrap(),
        "fine\n"
    );
}

/// Every run's id whose head says it is not torn down: what `unfinished_runs` must equal.
async fn unfinished_by_folding(h: &H) -> Vec<RunId> {
    let log = h.rt.ledger().log().clone();
    let mut out = Vec::new();
    for run in log.runs(0, 1000).await.unwrap() {
        let view = ice_log::ledger::fold_run(log.as_ref(), &run).await.unwrap();
        if view.summary.state != RunState::Terminated {
            out.push(run);
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unfinished_runs_are_those_whose_state_has_not_ended() {
    let h = H::new(POLICY);
    let read = "[[step]]\nintent = \"read\"\ncapability = \"fs.read\"\ntarget = \"hello.txt\"\n";
    let check = |want: &[&str]| {
        let want: Vec<RunId> = want.iter().map(|r| RunId::new(*r).unwrap()).collect();
        want
    };
    assert_eq!(h.rt.unfinished_runs().await.unwrap(), check(&[]));
    // Committed: ended.
    let (spec, mut agent) = h.spec("done", "a", "", read);
    h.run(spec, &mut agent).await;
    // Suspended on an exhausted budget: not ended.
    let (spec, mut agent) = h.spec(
        "waits",
        "a",
        "[budget]\ntool_calls = 0\non_exhaustion = \"suspend\"\n",
        read,
    );
    let report = h.run(spec, &mut agent).await;
    assert_eq!(report.state, RunState::Suspended);
    // Executing (a session still open): not ended.
    let (spec, _) = h.spec("open", "a", "", read);
    let session =
        h.rt.open_session(spec, "a", &ice_runtime::Quiet)
            .await
            .unwrap();
    assert_eq!(
        h.rt.unfinished_runs().await.unwrap(),
        check(&["open", "waits"])
    );
    assert_eq!(unfinished_by_folding(&h).await, check(&["open", "waits"]));
    // Killed by an operator, and committed: both ended.
    h.rt.kill(
        &RunId::new("waits").unwrap(),
        "alice",
        "not needed",
        &ice_runtime::Quiet,
    )
    .await
    .unwrap();
    session.finish().await.unwrap();
    assert_eq!(h.rt.unfinished_runs().await.unwrap(), check(&[]));
    assert_eq!(unfinished_by_folding(&h).await, check(&[]));
}

const CONSTRAINED_POLICY: &str = r#"
@id("read")
@max_bytes("3")
permit(principal, action in [Action::"fs.read", Action::"fs.list"], resource in Dir::".");
@id("write")
@max_bytes("8")
permit(principal == Agent::"coder", action in [Action::"fs.write", Action::"fs.delete"], resource in Dir::".");
"#;

const CONSTRAINED_PLAN: &str = r#"
[[step]]
intent = "small write"
capability = "fs.write"
target = "hello.txt"
arguments = { content = "short\n" }

[[step]]
intent = "large write, same grant"
capability = "fs.write"
target = "hello.txt"
arguments = { content = "far too long for the grant\n" }

[[step]]
intent = "read"
capability = "fs.read"
target = "config.toml"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policys_constraints_are_recorded_in_the_grant_and_bound_every_use() {
    let h = H::new(CONSTRAINED_POLICY);
    let (spec, plan) = h.spec("bounded", "coder", "[grants]\nuses = 5", CONSTRAINED_PLAN);
    let mut agent = Hooked {
        inner: plan,
        hook: |v: &ice_kernel::AgentView| match (v.step, &v.last) {
            (2, Some(ice_kernel::Outcome::Denied { reason, detail, .. })) => {
                assert_eq!(reason, "grant_constraint");
                assert!(
                    detail.contains("at most 8 bytes per use (max_bytes)")
                        && detail.contains("27 bytes"),
                    "{detail}"
                );
            }
            (2, other) => panic!("the large write was not refused: {other:?}"),
            (3, _) => {}
            _ => {}
        },
    };
    let report = h.run(spec, &mut agent).await;
    assert_eq!(report.outcome, RunOutcome::Committed, "{report:?}");
    assert_eq!(h.read("hello.txt"), "short\n");
    let events = h.events("bounded").await;
    assert_eq!(denial_codes(&events), ["grant_constraint"]);
    let grants = of_type(&events, EventType::CapabilityGranted);
    assert_eq!(grants.len(), 2, "the large write reused the write grant");
    assert_eq!(
        grants[0].payload["constraints"],
        serde_json::json!({"max_bytes": 8})
    );
    assert_eq!(
        grants[1].payload["constraints"],
        serde_json::json!({"max_bytes": 3})
    );
    // The denial names the grant it was refused under; the read was cut and says so.
    let denied = of_type(&events, EventType::CapabilityDenied)[0];
    assert_eq!(
        denied.payload["grant"].as_str(),
        Some(grants[0].id().to_string().as_str())
    );
    let read = of_type(&events, EventType::FileRead)[0];
    assert_eq!(read.payload["output"]["content"], "x =");
    assert_eq!(read.payload["truncated"], true);
    assert_eq!(read.payload["size"], 6);
    // The books fold the constraints back.
    let replayed = Books::fold(RunId::new("bounded").unwrap(), events.iter()).unwrap();
    assert_eq!(replayed, report.books);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_changed_while_suspended_needs_accepting_and_then_rebinds_live_grants() {
    let h = H::new(POLICY);
    let plan = "[[step]]\nintent = \"again\"\ncapability = \"fs.read\"\ntarget = \"hello.txt\"\nrepeat = 5\n";
    let (spec, mut agent) = h.spec(
        "repolicy",
        "looper",
        "[budget]\ntool_calls = 2\non_exhaustion = \"suspend\"\n\n[grants]\nuses = 10\n",
        plan,
    );
    let report = h.run(spec, &mut agent).await;
    assert!(matches!(report.outcome, RunOutcome::Suspended { .. }));
    // While it waits, an operator limits reads to 3 bytes.
    std::fs::write(
        h.policies.join("p.cedar"),
        POLICY.replace("@id(\"read\")", "@id(\"read\")\n@max_bytes(\"3\")"),
    )
    .unwrap();
    let run = RunId::new("repolicy").unwrap();
    let more = |accept_policy| ice_runtime::operator::ReconfigurationFile {
        reason: "room".into(),
        accept_policy,
        budget: Some(toml::from_str("tool_calls = 10").unwrap()),
        ..Default::default()
    };
    h.rt.reconfigure(&run, "alice", &more(false)).await.unwrap();
    let (_, mut again) = h.spec("repolicy-2", "looper", "", plan);
    let err =
        h.rt.resume(&run, &mut again, &ice_runtime::Quiet)
            .await
            .unwrap_err();
    assert!(err.to_string().contains("accept_policy = true"), "{err}");
    // Accepted: the run resumes under it, and the live read grant, looser than the new policy
    // allows, is revoked and re-decided.
    h.rt.reconfigure(&run, "alice", &more(true)).await.unwrap();
    let report =
        h.rt.resume(&run, &mut again, &ice_runtime::Quiet)
            .await
            .unwrap();
    assert_eq!(report.outcome, RunOutcome::Committed, "{report:?}");
    let events = h.events("repolicy").await;
    let revoked = of_type(&events, EventType::CapabilityRevoked);
    assert_eq!(revoked.len(), 1, "{revoked:?}");
    assert!(
        revoked[0].payload["reason"]
            .as_str()
            .unwrap()
            .contains("more tightly"),
        "{:?}",
        revoked[0].payload
    );
    let reads = of_type(&events, EventType::FileRead);
    assert_eq!(
        reads.first().unwrap().payload["output"]["content"],
        "hello\n"
    );
    assert_eq!(reads.last().unwrap().payload["output"]["content"], "hel");
    // The accepted policy is recorded with its files when the run resumes under it, and the
    // revocation follows from it; a replay re-makes all of it.
    let reloads = of_type(&events, EventType::PolicyReloaded);
    assert_eq!(reloads.len(), 1, "{reloads:?}");
    let resumed = of_type(&events, EventType::RunResumed);
    assert_eq!(reloads[0].run_seq, resumed.last().unwrap().run_seq + 1);
    let context = &of_type(&events, EventType::ContextResolved)[0].payload;
    assert_eq!(
        reloads[0].payload["previous_version"],
        context["policy_version"]
    );
    assert_ne!(
        reloads[0].payload["policy_version"],
        context["policy_version"]
    );
    assert!(revoked[0].causes.contains(&reloads[0].id()));
    replays_cleanly(&h, "repolicy", "looper", plan).await;
}

/// A run spec over the blob threshold is recorded with its body in a blob (the kernel moves any
/// payload field over 16 KiB): the run still starts, its books fold, and it commits and replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_spec_larger_than_the_blob_threshold_runs_and_replays() {
    let h = H::new(POLICY);
    let long = "x".repeat(20_000);
    let plan = "[[step]]\nintent = \"look\"\ncapability = \"fs.read\"\ntarget = \"hello.txt\"\n";
    let (spec, mut agent) = h.spec(
        "big-spec",
        "coder",
        &format!("[[check]]\nname = \"long\"\nrun = [\"test\", \"-n\", \"{long}\"]\n"),
        plan,
    );
    let report = h.run(spec, &mut agent).await;
    assert_eq!(report.outcome, RunOutcome::Committed, "{report:?}");
    let raw =
        h.rt.ledger()
            .log()
            .read_run(&RunId::new("big-spec").unwrap(), 0, 1)
            .await
            .unwrap();
    let first = raw[0].event().unwrap();
    assert!(
        !ice_kernel::blob::blob_refs(&first.payload)
            .unwrap()
            .is_empty(),
        "the spec was moved to a blob: {:?}",
        first.payload.keys().collect::<Vec<_>>()
    );
    let books = h.rt.books(&RunId::new("big-spec").unwrap()).await.unwrap();
    assert!(books.spec.is_some());
    let r = h.rt.replay(&RunId::new("big-spec").unwrap()).await.unwrap();
    assert!(r.divergences.is_empty(), "{:?}", r.divergences);
}

/// The finding: a command's output was kept up to 4 KiB per stream whatever its call reserved,
/// so with 100 bytes of budget left the agent was given 3 893 bytes (the overshoot larger than
/// the reservation, I-005). The output given is at most what the call reserved, and the
/// evidence says it was cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commands_output_is_cut_at_what_its_call_reserved() {
    let (report, events) = run_with_100_bytes("counted", "seq", r#"["1", "1000"]"#).await;
    let ran = of_type(&events, EventType::ToolInvoked);
    assert_eq!(ran.len(), 1, "{report:?}");
    let p = &ran[0].payload;
    assert_eq!(p["evidence"]["exec"]["stdout_truncated"], true, "{p:?}");
    let shown = p["output"]["stdout"].as_str().unwrap();
    assert_eq!(shown.len(), 100, "{shown}");
    assert!(shown.starts_with("1\n2\n3\n"), "{shown}");
    let settled = of_type(&events, EventType::BudgetSettled);
    assert!(
        settled
            .iter()
            .all(|s| s.payload["actual"]["bytes"].as_u64().unwrap_or(0) <= 100),
        "{settled:?}"
    );
    assert_eq!(report.spent.bytes, 100);
}

/// The same when both streams write: stdout first, then what the reservation leaves for
/// stderr; the record says where the output given was cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commands_two_streams_together_are_cut_at_what_its_call_reserved() {
    let (_, events) = run_with_100_bytes(
        "streams",
        "sh",
        r#"["-c", "printf '%060d' 0; printf '%060d' 1 >&2"]"#,
    )
    .await;
    let ran = of_type(&events, EventType::ToolInvoked);
    assert_eq!(ran.len(), 1);
    let p = &ran[0].payload;
    assert_eq!(
        p.get("output_cut_at"),
        Some(&serde_json::json!(100)),
        "{p:?}"
    );
    assert_eq!(p["output"]["stdout"].as_str().unwrap().len(), 60, "{p:?}");
    assert_eq!(p["output"]["stderr"].as_str().unwrap().len(), 40, "{p:?}");
}

/// Run `id`: one `process.exec` of `command` with `args` (a TOML array), permitted, with a
/// budget of 100 bytes; its report and events.
async fn run_with_100_bytes(
    id: &str,
    command: &str,
    args: &str,
) -> (ice_runtime::RunReport, Vec<ice_kernel::Event>) {
    let policy = format!(
        "{POLICY}\n@id(\"exec\")\n@external(\"permit\")\npermit(principal == Agent::\"coder\", action == Action::\"process.exec\", resource == Command::\"{command}\");\n"
    );
    let h = H::new(&policy);
    let plan = format!(
        "[[step]]\nintent = \"run\"\ncapability = \"process.exec\"\ntarget = \"{command}\"\narguments = {{ args = {args} }}\n"
    );
    let (spec, mut agent) = h.spec(id, "coder", "[budget]\nbytes = 100\n", &plan);
    let report = h.run(spec, &mut agent).await;
    (report, h.events(id).await)
}

/// The finding (multi-node probe): resuming on one node a run whose changes another node had
/// staged recorded `RunResumed`, then failed on the missing stage and left the run EXECUTING
/// with nothing driving it. The stage is checked before anything is recorded: the run stays
/// suspended, for the node that holds its stage (here the stage is removed, as it would be
/// absent on another node's home).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_stage_is_not_here_is_not_resumed() {
    let h = H::new(POLICY);
    let plan = "[[step]]\nintent = \"w\"\ncapability = \"fs.write\"\ntarget = \"staged.txt\"\narguments = { content = \"x\" }\n[[step]]\nintent = \"r\"\ncapability = \"fs.read\"\ntarget = \"hello.txt\"\nrepeat = 2\n";
    suspend_on_changed_assumption_with(&h, "elsewhere", plan).await;
    let run = RunId::new("elsewhere").unwrap();
    std::fs::remove_dir_all(h.base.join("home/runs/elsewhere/stage")).unwrap();
    let ok = ice_runtime::operator::ReconfigurationFile {
        reason: "resume it".into(),
        accept_files: true,
        ..Default::default()
    };
    h.rt.reconfigure(&run, "alice", &ok).await.unwrap();
    let (_, mut again) = h.spec("elsewhere2", "coder", "", plan);
    let err =
        h.rt.resume(&run, &mut again, &ice_runtime::Quiet)
            .await
            .unwrap_err();
    assert!(err.to_string().contains("cannot be used here"), "{err}");
    let events = h.events("elsewhere").await;
    assert!(of_type(&events, EventType::RunResumed).is_empty());
    assert_eq!(h.rt.books(&run).await.unwrap().state(), RunState::Suspended);
}

/// Run a plan that reads and rewrites hello.txt and adds added.txt, with `hook` called at its
/// second step; its commit must be refused before anything is applied, the run aborted
/// (`commit_refused`) with a reason starting `why`. Returns the run's events.
async fn refused_commit(
    h: &H,
    id: &str,
    hook: impl FnMut(&ice_kernel::AgentView) + Send,
    why: &str,
) -> Vec<ice_kernel::Event> {
    let plan = r#"
[[step]]
intent = "read"
capability = "fs.read"
target = "hello.txt"

[[step]]
intent = "rewrite"
capability = "fs.write"
target = "hello.txt"
arguments = { content = "the agent's\n" }

[[step]]
intent = "add"
capability = "fs.write"
target = "added.txt"
arguments = { content = "new\n" }
"#;
    let (spec, plan_agent) = h.spec(id, "coder", "", plan);
    let mut agent = Hooked {
        inner: plan_agent,
        hook,
    };
    let report = h.run(spec, &mut agent).await;
    match &report.outcome {
        RunOutcome::Aborted { reason } => assert!(reason.starts_with(why), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(report.state, RunState::Terminated);
    assert!(!h.ws.join("added.txt").exists());
    let events = h.events(id).await;
    assert!(of_type(&events, EventType::EffectApplied).is_empty());
    assert_eq!(
        of_type(&events, EventType::RunAborted)[0].payload["reason"],
        "commit_refused"
    );
    events
}

/// A commit whose journal cannot be written (a full disk; here, the journal's temporary
/// file's name leads nowhere) never reaches its commit point: the run ends aborted at once,
/// saying why, with the workspace as it was (it was left validating, its stage used up, until
/// a restart's recovery aborted it).
#[tokio::test]
async fn a_commit_whose_journal_cannot_be_written_aborts_the_run_with_nothing_applied() {
    let h = H::new(POLICY);
    let stage = h.base.join("home/runs/unjournalled/stage");
    let hook = move |v: &ice_kernel::AgentView| {
        if v.step == 1 {
            std::os::unix::fs::symlink(
                stage.join("no-such-dir/journal"),
                stage.join("journal.json.tmp"),
            )
            .unwrap();
        }
    };
    refused_commit(
        &h,
        "unjournalled",
        hook,
        "the commit was refused before it changed anything: commit: the journal could not be written, so nothing was applied",
    )
    .await;
    assert_eq!(h.read("hello.txt"), "hello\n");
}

/// The probe's finding: a file someone else edited while the run worked on it was overwritten
/// by the commit, with nothing recorded. Now the commit is refused before it applies anything,
/// and the run ends aborted saying which path changed (it was left stuck validating when a
/// commit failed before its commit point).
#[tokio::test]
async fn a_commit_over_someone_elses_edit_is_refused_and_the_run_aborts() {
    let h = H::new(POLICY);
    let ws = h.ws.clone();
    let hook = move |v: &ice_kernel::AgentView| {
        if v.step == 1 {
            std::fs::write(ws.join("hello.txt"), "a human's edit\n").unwrap();
        }
    };
    let events = refused_commit(
        &h,
        "raced",
        hook,
        "the commit was refused before it changed anything: \"hello.txt\" changed",
    )
    .await;
    assert_eq!(h.read("hello.txt"), "a human's edit\n");
    let why = of_type(&events, EventType::AbortReasonDeclared)[0].payload["detail"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        why.contains("\"hello.txt\" changed in the workspace while the run worked on it"),
        "{why}"
    );
}

/// The probe's finding: a kill did not stop a command that was running; it ran on to its end
/// (or its timeout), and outlived a process that exited. Now the kill kills its process group
/// within moments, and the record says the command was stopped part-way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_stops_a_running_command() {
    let policy = format!(
        "{POLICY}\n@id(\"exec\")\n@external(\"permit\")\npermit(principal == Agent::\"coder\", action == Action::\"process.exec\", resource == Command::\"sh\");\n"
    );
    let h = H::new(&policy);
    let pid_file = h.base.join("pid");
    let plan = format!(
        "[[step]]\nintent = \"long job\"\ncapability = \"process.exec\"\ntarget = \"sh\"\narguments = {{ args = [\"-c\", \"echo $$ > {}; exec sleep 30\"], timeout_ms = 60000 }}\n",
        pid_file.display()
    );
    let (spec, mut agent) = h.spec("long", "coder", "", &plan);
    let started = std::time::Instant::now();
    let run = RunId::new("long").unwrap();
    let killer = async {
        let pid = loop {
            if let Some(pid) = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|t| t.trim().parse::<u32>().ok())
            {
                break pid;
            }
            assert!(started.elapsed() < std::time::Duration::from_secs(20));
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        h.rt.kill(&run, "alice", "enough", &ice_runtime::Quiet)
            .await
            .unwrap();
        pid
    };
    let (report, pid) = tokio::join!(h.run(spec, &mut agent), killer);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "the command ran on: {:?}",
        started.elapsed()
    );
    assert!(
        matches!(report.outcome, RunOutcome::Aborted { .. }),
        "{report:?}"
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the command still runs"
    );
    let events = h.events("long").await;
    let invoked = of_type(&events, EventType::ToolInvoked);
    assert_eq!(invoked.len(), 1, "the command's end is recorded");
    assert!(
        invoked[0].payload["stopped"]
            .as_str()
            .is_some_and(|s| s.contains("killed part-way")),
        "{:?}",
        invoked[0].payload
    );
    assert_eq!(invoked[0].payload["timed_out"], false);
}
