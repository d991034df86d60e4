//! One approval request, one answer: concurrent and late answers are refused and record
//! nothing, whether they come from one process or from several on the same log; and the
//! run's fold (what `ice replay` rebuilds) refuses a record that holds a second answer.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use ice_authority::payload::{ApprovalDeniedPayload, ApprovalGrantedPayload};
use ice_kernel::{
    CapabilityProposal, Draft, Event, EventId, EventType, Origin, Outcome, Proposal, RunId,
};
use ice_runtime::{Books, Quiet, RunSpec, Runtime, RuntimeError};
use serde_json::{Value, json};

/// A run whose agent `coder` will ask to call the endpoint (the policy wants an approval).
struct Fixture {
    dir: tempfile::TempDir,
    rt: Arc<Runtime>,
    spec: RunSpec,
    run: RunId,
    call: Proposal,
}

fn fixture(id: &str) -> Fixture {
    fixture_with(id, "")
}

/// [`fixture`] with more run-spec text.
fn fixture_with(id: &str, extra: &str) -> Fixture {
    let port = ok_endpoint();
    let h = H::new(POLICY);
    let (spec, _) = h.spec(
        id,
        "coder",
        &format!("[approvals]\ntimeout = \"60s\"\n{extra}"),
        "",
    );
    let H { dir, rt, .. } = h;
    Fixture {
        dir,
        rt: Arc::new(rt),
        spec,
        run: RunId::new(id).unwrap(),
        call: Proposal::Request(CapabilityProposal {
            capability: "http.request".into(),
            target: format!("http://127.0.0.1:{port}/notify"),
            arguments: json!({"method": "GET"}),
            intent: "notify".into(),
        }),
    }
}

/// The operators' answers recorded for `approval`.
fn answers<'a>(events: &'a [Event], approval: &EventId) -> Vec<&'a Event> {
    events
        .iter()
        .filter(|e| {
            (e.event_type == EventType::ApprovalGranted.name()
                || e.event_type == EventType::ApprovalDenied.name())
                && e.payload.get("approval") == Some(&Value::String(approval.to_string()))
        })
        .collect()
}

/// `n` operators answer at once (even: approve, odd: deny), each from its own task, spread
/// over `rts` (one runtime: one process; several: several processes on one log).
async fn answer_at_once(
    rts: &[Arc<Runtime>],
    approval: &EventId,
    n: usize,
) -> Vec<(usize, bool, Result<(), RuntimeError>)> {
    let start = Arc::new(tokio::sync::Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let rt = rts[i % rts.len()].clone();
            let start = start.clone();
            let approval = approval.clone();
            let grant = i % 2 == 0;
            tokio::spawn(async move {
                start.wait().await;
                let r = rt
                    .answer_approval(&approval, &format!("op{i}"), grant, "no")
                    .await;
                (i, grant, r)
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Exactly one answer recorded, by the one call that succeeded; every other call refused,
/// naming who answered first.
fn exactly_one(
    events: &[Event],
    approval: &EventId,
    results: &[(usize, bool, Result<(), RuntimeError>)],
) {
    let recorded = answers(events, approval);
    assert_eq!(
        recorded.len(),
        1,
        "one approval request got {} answers: {:?}",
        recorded.len(),
        recorded
            .iter()
            .map(|e| (&e.event_type, e.origin.to_string()))
            .collect::<Vec<_>>()
    );
    let first = recorded[0];
    let ok: Vec<_> = results.iter().filter(|r| r.2.is_ok()).collect();
    assert_eq!(ok.len(), 1, "{} answers were accepted", ok.len());
    let (i, grant, _) = ok[0];
    assert_eq!(first.origin.to_string(), format!("operator:op{i}"));
    assert_eq!(
        first.event_type,
        if *grant {
            EventType::ApprovalGranted.name()
        } else {
            EventType::ApprovalDenied.name()
        }
    );
    for (_, _, r) in results.iter().filter(|r| r.2.is_err()) {
        match r {
            Err(RuntimeError::Decided {
                approval: a, by, ..
            }) => {
                assert_eq!(a, &approval.to_string());
                assert_eq!(by, &first.origin.to_string());
            }
            other => panic!("a concurrent answer was not refused as decided: {other:?}"),
        }
    }
}

async fn concurrent_round(id: &str, processes: usize) {
    let f = fixture(id);
    let mut rts = vec![f.rt.clone()];
    for _ in 1..processes {
        rts.push(another_process(f.dir.path()));
    }
    let session =
        f.rt.open_session(f.spec.clone(), "coder", &Quiet)
            .await
            .unwrap();
    let (outcome, (approval, results)) = tokio::join!(session.propose(&f.call), async {
        let approval = pending(&f.rt, &f.run).await;
        let results = answer_at_once(&rts, &approval, 8).await;
        (approval, results)
    });
    let outcome = outcome.unwrap().unwrap();
    let report = session.finish().await.unwrap();
    let events = events(&f.rt, &f.run).await;
    exactly_one(&events, &approval, &results);
    // The run went the way the one recorded answer said.
    let granted = answers(&events, &approval)[0].event_type == EventType::ApprovalGranted.name();
    match (&outcome, granted) {
        (Outcome::Done { .. }, true) => {}
        (Outcome::Denied { reason, .. }, false) => assert_eq!(reason, "approval_denied"),
        other => panic!("the call ended {other:?}"),
    }
    // Nothing was recorded after the run stopped waiting either.
    assert!(
        f.rt.pending_approvals(Some(&f.run))
            .await
            .unwrap()
            .is_empty()
    );
    // The record folds and replays to what the run had.
    assert_eq!(
        Books::fold(f.run.clone(), events.iter()).unwrap(),
        report.books
    );
    let replay = f.rt.replay(&f.run).await.unwrap();
    assert!(replay.divergences.is_empty(), "{:?}", replay.divergences);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_answers_in_one_process_record_exactly_one() {
    for round in 0..4 {
        concurrent_round(&format!("one-{round}"), 1).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_answers_from_several_processes_record_exactly_one() {
    for round in 0..4 {
        concurrent_round(&format!("many-{round}"), 3).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_answer_after_the_first_is_refused_and_records_nothing() {
    let f = fixture("late");
    let other = another_process(f.dir.path());
    let session =
        f.rt.open_session(f.spec.clone(), "coder", &Quiet)
            .await
            .unwrap();
    let (outcome, approval) = tokio::join!(session.propose(&f.call), async {
        let approval = pending(&f.rt, &f.run).await;
        f.rt.answer_approval(&approval, "alice", true, "")
            .await
            .unwrap();
        approval
    });
    assert!(matches!(outcome.unwrap(), Some(Outcome::Done { .. })));
    let before = events(&f.rt, &f.run).await;
    // A denial after the grant, a second grant, from this process or another: refused.
    for (rt, who, grant) in [
        (&f.rt, "bob", false),
        (&f.rt, "carol", true),
        (&other, "dave", false),
    ] {
        match rt.answer_approval(&approval, who, grant, "too late").await {
            Err(RuntimeError::Decided { by, answer, .. }) => {
                assert_eq!(by, "operator:alice");
                assert!(answer.contains("granted"), "{answer}");
            }
            other => panic!("a late answer by {who} was not refused: {other:?}"),
        }
    }
    let after = events(&f.rt, &f.run).await;
    assert_eq!(
        after.len(),
        before.len(),
        "a refused answer appended something"
    );
    assert_eq!(answers(&after, &approval).len(), 1);
    let report = session.finish().await.unwrap();
    assert_eq!(
        Books::fold(f.run.clone(), after.iter()).unwrap().approvals,
        report.books.approvals
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_answer_after_a_kill_closed_the_request_is_refused() {
    let f = fixture("killed");
    let other = another_process(f.dir.path());
    let session =
        f.rt.open_session(f.spec.clone(), "coder", &Quiet)
            .await
            .unwrap();
    let (outcome, (approval, early)) = tokio::join!(session.propose(&f.call), async {
        let approval = pending(&f.rt, &f.run).await;
        f.rt.kill(&f.run, "bob", "enough", &Quiet).await.unwrap();
        // Right after the kill: the run may or may not have closed the request yet.
        let early = f.rt.answer_approval(&approval, "alice", true, "").await;
        (approval, early)
    });
    match outcome.unwrap() {
        Some(Outcome::Denied { reason, .. }) => assert_eq!(reason, "approval_denied"),
        other => panic!("the call waiting for approval ended {other:?}"),
    }
    match early {
        Err(RuntimeError::Decided { by, .. }) => {
            assert!(by == "operator:bob" || by == "runtime", "{by}")
        }
        other => panic!("an answer after a kill was not refused: {other:?}"),
    }
    // The run closed the request (its denial names the approval); it is no longer pending.
    let before = events(&f.rt, &f.run).await;
    assert!(
        of_type(&before, EventType::CapabilityDenied)
            .iter()
            .any(|e| e.payload.get("approval") == Some(&Value::String(approval.to_string())))
    );
    assert!(
        f.rt.pending_approvals(Some(&f.run))
            .await
            .unwrap()
            .is_empty()
    );
    for (rt, who, grant) in [(&f.rt, "alice", true), (&other, "carol", false)] {
        match rt.answer_approval(&approval, who, grant, "").await {
            Err(RuntimeError::Decided { .. }) => {}
            other => panic!("an answer by {who} after the kill was not refused: {other:?}"),
        }
    }
    let after = events(&f.rt, &f.run).await;
    assert_eq!(
        after.len(),
        before.len(),
        "a refused answer appended something"
    );
    assert!(answers(&after, &approval).is_empty());
    let report = session.finish().await.unwrap();
    assert!(
        matches!(report.outcome, ice_runtime::RunOutcome::Aborted { .. }),
        "{:?}",
        report.outcome
    );
}

/// Append `draft` past the runtime, straight through the ledger (as a forger, or an ICE
/// from before answers were checked, could): the kernel's law does not read payloads, so the
/// log takes it; the run's books refuse to fold it, `ice replay` reports it, and the runtime
/// records no answer on top of it.
async fn forged_answer_is_caught(f: &Fixture, approval: &EventId, draft: Draft) {
    let (_, batch) =
        f.rt.ledger()
            .append(&f.run, vec![draft.cause(approval.clone())])
            .await
            .unwrap();
    let forged = batch.events()[0].event().id();
    let events = events(&f.rt, &f.run).await;
    let err = Books::fold(f.run.clone(), events.iter()).unwrap_err();
    assert_eq!(err.event, forged);
    assert!(err.problem.contains("already"), "{}", err.problem);
    let replay = f.rt.replay(&f.run).await.unwrap();
    assert!(
        replay
            .divergences
            .iter()
            .any(|d| d.event.as_deref() == Some(forged.to_string().as_str())),
        "{:?}",
        replay.divergences
    );
    assert!(
        f.rt.answer_approval(approval, "erin", false, "")
            .await
            .is_err()
    );
    assert_eq!(events.len(), self::events(&f.rt, &f.run).await.len());
}

fn mallory() -> Origin {
    "operator:mallory".parse().unwrap()
}

/// The session's call, approved through the runtime and made; and a denial of that approval
/// by someone else, not recorded yet: a second answer.
async fn granted_then_a_forged_denial(
    f: &Fixture,
    session: &ice_runtime::Session<'_>,
) -> (EventId, Draft) {
    let (outcome, approval) = tokio::join!(session.propose(&f.call), async {
        let approval = pending(&f.rt, &f.run).await;
        f.rt.answer_approval(&approval, "alice", true, "")
            .await
            .unwrap();
        approval
    });
    assert!(matches!(outcome.unwrap(), Some(Outcome::Done { .. })));
    let draft = Draft::new(EventType::ApprovalDenied.name(), mallory()).payload(Value::Object(
        ApprovalDeniedPayload {
            approval: approval.clone(),
            reason: "changed my mind".into(),
        }
        .to_payload(),
    ));
    (approval, draft)
}

/// A denial recorded after a grant: two contradictory answers to one request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_recorded_answer_does_not_fold_or_replay() {
    let f = fixture("forged");
    let session =
        f.rt.open_session(f.spec.clone(), "coder", &Quiet)
            .await
            .unwrap();
    let (approval, draft) = granted_then_a_forged_denial(&f, &session).await;
    forged_answer_is_caught(&f, &approval, draft).await;
    drop(session);
}

/// A grant recorded after the run closed the request (killed while it waited).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_answer_recorded_after_the_run_closed_the_request_does_not_fold() {
    let f = fixture("forged-kill");
    let session =
        f.rt.open_session(f.spec.clone(), "coder", &Quiet)
            .await
            .unwrap();
    let (outcome, approval) = tokio::join!(session.propose(&f.call), async {
        let approval = pending(&f.rt, &f.run).await;
        f.rt.kill(&f.run, "bob", "enough", &Quiet).await.unwrap();
        approval
    });
    assert!(matches!(outcome.unwrap(), Some(Outcome::Denied { .. })));
    let digest =
        f.rt.books(&f.run)
            .await
            .unwrap()
            .approvals
            .get(&approval)
            .unwrap()
            .digest;
    let draft = Draft::new(EventType::ApprovalGranted.name(), mallory()).payload(Value::Object(
        ApprovalGrantedPayload {
            approval: approval.clone(),
            digest,
        }
        .to_payload(),
    ));
    forged_answer_is_caught(&f, &approval, draft).await;
    drop(session);
}

/// A run whose record holds a second answer (a log written before answers were checked can)
/// does not keep the other runs' approvals from being listed: it is left out, and the
/// listing names it and the event its fold refuses; asked about that run alone, the answer
/// is the fold error.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_with_a_second_recorded_answer_does_not_hide_other_runs_approvals() {
    let f = fixture("damaged");
    let session =
        f.rt.open_session(f.spec.clone(), "coder", &Quiet)
            .await
            .unwrap();
    let (approval, draft) = granted_then_a_forged_denial(&f, &session).await;
    let (_, batch) =
        f.rt.ledger()
            .append(&f.run, vec![draft.cause(approval.clone())])
            .await
            .unwrap();
    let forged = batch.events()[0].event().id();

    // Another run waits for an operator meanwhile.
    let mut spec = f.spec.clone();
    let other = RunId::new("healthy").unwrap();
    spec.id = Some(other.clone());
    let waiting = f.rt.open_session(spec, "coder", &Quiet).await.unwrap();
    let (_, listed) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(60), waiting.propose(&f.call)),
        async {
            let a = pending(&f.rt, &other).await;
            let all = f.rt.pending_approvals(None).await.unwrap();
            let listing = f.rt.approval_listing(None).await.unwrap();
            f.rt.answer_approval(&a, "alice", false, "done looking")
                .await
                .unwrap();
            (a, all, listing)
        }
    );
    let (a, all, listing) = listed;
    let ids: Vec<&str> = all.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, vec![a.to_string().as_str()]);
    assert_eq!(listing.approvals.len(), 1);
    assert_eq!(listing.problems.len(), 1, "{:?}", listing.problems);
    let p = &listing.problems[0];
    assert_eq!(p.run, "damaged");
    assert_eq!(p.event, forged.to_string());
    assert!(p.problem.contains("already answered"), "{}", p.problem);
    assert!(p.to_string().contains(&forged.to_string()), "{p}");
    // Asked about the damaged run alone: the error names the refused event.
    match f.rt.pending_approvals(Some(&f.run)).await {
        Err(RuntimeError::Fold(e)) => assert_eq!(e.event, forged),
        other => panic!("{other:?}"),
    }
    drop(waiting);
    drop(session);
}

/// The finding: a kill recorded right after an operator granted an approval (before the call
/// waiting on it took the answer) closes the call with an `approval_denied` denial naming an
/// approval the operator granted, and the run counted that as one of the agent's refusals (what
/// `[budget] denials` limits): nobody refused the agent anything. Each round answers and kills
/// back to back; the waiting call sees the kill first in most rounds (it looks every 50 ms),
/// and in one at least, or the test proves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kill_right_after_an_operator_granted_counts_no_refusal() {
    let mut closed_after_grant = 0;
    for round in 0..8 {
        let f = fixture(&format!("granted-then-killed-{round}"));
        let session =
            f.rt.open_session(f.spec.clone(), "coder", &Quiet)
                .await
                .unwrap();
        let (outcome, ()) = tokio::join!(session.propose(&f.call), async {
            let approval = pending(&f.rt, &f.run).await;
            f.rt.answer_approval(&approval, "alice", true, "")
                .await
                .unwrap();
            f.rt.kill(&f.run, "bob", "enough", &Quiet).await.unwrap();
        });
        if let Some(Outcome::Denied { reason, .. }) = outcome.unwrap() {
            assert_eq!(reason, "approval_denied");
            closed_after_grant += 1;
        }
        let report = session.finish().await.unwrap();
        assert_eq!(report.books.refusals, 0, "round {round}: {report:?}");
        let replayed = Books::fold(f.run.clone(), events(&f.rt, &f.run).await.iter()).unwrap();
        assert_eq!(replayed.refusals, 0);
    }
    assert!(
        closed_after_grant > 0,
        "no round saw the kill before the grant"
    );
}

/// The review's finding: a request the agent withdrew while it waited for an approval counted
/// as no refusal (it was "unanswered"), so an agent could ask for approvals and withdraw them
/// without end, each round recorded and shown to operators, none counted against
/// `[budget] denials`. A withdrawal is recorded `closed: withdrawn` and counts: the second one
/// stops this run at the agent's next request. Not at once: a session's end withdraws the
/// requests still waiting too, and a session that ends with its refusals at the budget is
/// finished (committed) as usual. A kill's closing is recorded `closed: killed` and does not
/// count.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn withdrawn_approval_requests_count_against_the_denials_budget() {
    let f = fixture_with(
        "withdrawer",
        "\n[budget]\ndenials = 2\non_exhaustion = \"suspend\"\n",
    );
    let session =
        f.rt.open_session(f.spec.clone(), "coder", &Quiet)
            .await
            .unwrap();
    for round in 0..2 {
        let withdraw = tokio_util::sync::CancellationToken::new();
        let (outcome, ()) = tokio::join!(
            session.propose_withdrawable(&f.call, Some(&withdraw)),
            async {
                pending(&f.rt, &f.run).await;
                withdraw.cancel();
            }
        );
        match outcome {
            Ok(Some(Outcome::Denied { reason, detail, .. })) => {
                assert_eq!(reason, "approval_denied", "round {round}");
                assert!(detail.contains("withdrew"), "{detail}");
            }
            other => panic!("round {round}: {other:?}"),
        }
    }
    // The second withdrawal reached the budget: the agent's next request stops the run (it is
    // suspended) and is not recorded.
    assert!(session.propose(&f.call).await.is_err());
    let withdrawn = events(&f.rt, &f.run).await;
    let denied = of_type(&withdrawn, EventType::CapabilityDenied);
    assert_eq!(denied.len(), 2);
    for d in &denied {
        assert_eq!(d.payload["closed"], "withdrawn", "{:?}", d.payload);
    }
    let suspended = of_type(&withdrawn, EventType::RunSuspended);
    assert_eq!(suspended.len(), 1, "{withdrawn:#?}");
    assert_eq!(suspended[0].payload["reason"], "budget_exhausted");
    assert_eq!(of_type(&withdrawn, EventType::CapabilityRequested).len(), 2);
    let replayed = Books::fold(f.run.clone(), withdrawn.iter()).unwrap();
    assert_eq!(replayed.refusals, 2);
    // The run's books say how each approval was closed.
    let view = replayed.view();
    let closed = view["approvals"].as_array().unwrap();
    assert_eq!(closed.len(), 2, "{view:#}");
    for a in closed {
        assert_eq!(
            (&a["status"], &a["closed_as"]),
            (&json!("closed"), &json!("withdrawn"))
        );
    }

    // The session ends while a request waits (its end withdraws it), the refusals now at the
    // budget: the run is committed, as a session's end commits it.
    let f = fixture_with("withdrawn-at-the-end", "\n[budget]\ndenials = 1\n");
    let session =
        f.rt.open_session(f.spec.clone(), "coder", &Quiet)
            .await
            .unwrap();
    let ending = tokio_util::sync::CancellationToken::new();
    let (outcome, ()) = tokio::join!(
        session.propose_withdrawable(&f.call, Some(&ending)),
        async {
            pending(&f.rt, &f.run).await;
            ending.cancel();
        }
    );
    assert!(
        matches!(&outcome, Ok(Some(Outcome::Denied { reason, .. })) if reason == "approval_denied"),
        "{outcome:?}"
    );
    let report = session.finish().await.unwrap();
    assert_eq!(
        report.outcome,
        ice_runtime::RunOutcome::Committed,
        "{report:?}"
    );
    assert_eq!(report.books.refusals, 1);

    // A kill closes the wait too, recorded as such, and is no refusal.
    let f = fixture_with("killed-while-waiting", "\n[budget]\ndenials = 1\n");
    let session =
        f.rt.open_session(f.spec.clone(), "coder", &Quiet)
            .await
            .unwrap();
    let (outcome, ()) = tokio::join!(session.propose(&f.call), async {
        pending(&f.rt, &f.run).await;
        f.rt.kill(&f.run, "bob", "enough", &Quiet).await.unwrap();
    });
    assert!(
        matches!(&outcome, Ok(Some(Outcome::Denied { reason, .. })) if reason == "approval_denied"),
        "{outcome:?}"
    );
    let killed = events(&f.rt, &f.run).await;
    let denied = of_type(&killed, EventType::CapabilityDenied);
    assert_eq!(denied.len(), 1);
    assert_eq!(
        denied[0].payload["closed"], "killed",
        "{:?}",
        denied[0].payload
    );
    let view = Books::fold(f.run.clone(), killed.iter()).unwrap().view();
    assert_eq!(view["approvals"][0]["closed_as"], "killed", "{view:#}");
    assert_eq!(
        Books::fold(f.run.clone(), killed.iter()).unwrap().refusals,
        0
    );
}

/// The second review's finding: a request made while the run's refusals stood at the budget
/// through a withdrawal, with another call in flight, waits for that call to end (here an
/// approval, up to its timeout) before the run is stopped, and its own withdrawal did not
/// release it. It ends at once, nothing of it recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_waiting_behind_a_call_in_flight_can_be_withdrawn() {
    use tokio_util::sync::CancellationToken;
    let f = fixture_with("parked", "\n[budget]\ndenials = 1\n");
    let session =
        f.rt.open_session(f.spec.clone(), "coder", &Quiet)
            .await
            .unwrap();
    let (stays, goes, parked) = (
        CancellationToken::new(),
        CancellationToken::new(),
        CancellationToken::new(),
    );
    let waiting = |n: usize| {
        let rt = f.rt.clone();
        let run = f.run.clone();
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while rt.pending_approvals(Some(&run)).await.unwrap().len() != n {
                assert!(std::time::Instant::now() < deadline, "not {n} pending");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    let (_, _, third) = tokio::join!(
        session.propose_withdrawable(&f.call, Some(&stays)),
        session.propose_withdrawable(&f.call, Some(&goes)),
        async {
            waiting(2).await;
            // One withdrawn: the refusals are at the budget, the other call still in flight.
            goes.cancel();
            waiting(1).await;
            let third = tokio::time::timeout(Duration::from_secs(20), async {
                let (r, ()) = tokio::join!(
                    session.propose_withdrawable(&f.call, Some(&parked)),
                    async {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        parked.cancel();
                    }
                );
                r
            })
            .await;
            stays.cancel();
            third
        }
    );
    match third {
        Ok(Err(RuntimeError::Invalid(why))) => assert!(why.contains("withdrawn"), "{why}"),
        other => panic!("the waiting request was not released by its withdrawal: {other:?}"),
    }
    let events = events(&f.rt, &f.run).await;
    assert_eq!(of_type(&events, EventType::CapabilityRequested).len(), 2);
}
