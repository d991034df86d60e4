//! A process that stops waiting for approvals (`Runtime::interrupt_approval_waits`, what
//! `ice serve` does when it stops): the waiting request is closed at once (a `CapabilityDenied`
//! naming it), no answer can be recorded for it afterwards, and its run is suspended, whether
//! an outside agent's session or a driven plan was waiting.

mod common;

use std::time::{Duration, Instant};

use common::*;
use ice_kernel::{CapabilityProposal, EventId, EventType, Outcome, Proposal, RunId};
use ice_runtime::{Quiet, RunOutcome, Runtime, RuntimeError};
use serde_json::json;

const WHY: &str = "the server is stopping";

/// The request was closed by a denial naming it, the run ended suspended (`interrupted`), and
/// an operator's late answer is refused and records nothing.
async fn closed_and_suspended(rt: &Runtime, run: &RunId, approval: &EventId) {
    let evs = events(rt, run).await;
    let denial = evs
        .iter()
        .find(|e| e.event_type == EventType::CapabilityDenied.name())
        .expect("the waiting request was closed");
    assert_eq!(denial.payload["approval"], json!(approval.to_string()));
    assert_eq!(denial.payload["reason"], json!("approval_denied"));
    assert!(
        denial.payload["detail"].as_str().unwrap().contains(WHY),
        "{:?}",
        denial.payload
    );
    let last = evs.last().unwrap();
    assert_eq!(last.event_type, EventType::RunSuspended.name());
    assert_eq!(last.payload["reason"], json!("interrupted"));
    let size = evs.len();
    let late = rt.answer_approval(approval, "alice", true, "").await;
    assert!(late.is_err(), "an answer was accepted for a closed request");
    assert_eq!(
        events(rt, run).await.len(),
        size,
        "the late answer recorded something"
    );
}

#[tokio::test]
async fn an_interrupted_approval_wait_closes_the_request_and_suspends_the_session_run() {
    let h = H::new(POLICY);
    // A budget of one refusal: the runtime closing the wait is not the agent being refused,
    // so it neither counts nor stops the run as exhausted (aborting it) before the suspension.
    let (spec, _) = h.spec(
        "int-session",
        "coder",
        "[approvals]\ntimeout = \"600s\"\n\n[budget]\ndenials = 1\n",
        "",
    );
    let run = RunId::new("int-session").unwrap();
    let session = h.rt.open_session(spec, "coder", &Quiet).await.unwrap();
    let call = Proposal::Request(CapabilityProposal {
        capability: "http.request".into(),
        target: "http://127.0.0.1:9/notify".into(),
        arguments: json!({"method": "GET"}),
        intent: "notify".into(),
    });
    let started = Instant::now();
    let (outcome, approval) = tokio::join!(session.propose(&call), async {
        let a = pending(&h.rt, &run).await;
        h.rt.interrupt_approval_waits(WHY);
        a
    });
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the wait was not interrupted"
    );
    match outcome.unwrap().unwrap() {
        Outcome::Denied { reason, detail, .. } => {
            assert_eq!(reason, "approval_denied");
            assert!(detail.contains(WHY), "{detail}");
        }
        other => panic!("the call ended {other:?}"),
    }
    // Ending the session does not validate and commit an interrupted run: it is suspended.
    let report = session.finish().await.unwrap();
    assert!(
        matches!(report.outcome, RunOutcome::Suspended { .. }),
        "{:?}",
        report.outcome
    );
    closed_and_suspended(&h.rt, &run, &approval).await;
}

#[tokio::test]
async fn an_interrupted_approval_wait_suspends_a_driven_plan_before_its_next_step() {
    let h = H::new(POLICY);
    let plan = "[[step]]\nintent = \"notify\"\ncapability = \"http.request\"\ntarget = \"http://127.0.0.1:9/notify\"\narguments = { method = \"GET\" }\n\n[[step]]\nintent = \"w\"\ncapability = \"fs.write\"\ntarget = \"hello.txt\"\narguments = { content = \"bye\\n\" }\n";
    let (spec, mut agent) = h.spec(
        "int-plan",
        "coder",
        "[approvals]\ntimeout = \"600s\"\n",
        plan,
    );
    let run = RunId::new("int-plan").unwrap();
    let started = Instant::now();
    let (report, approval) = tokio::join!(h.rt.start(spec, &mut agent, &Quiet), async {
        let a = pending(&h.rt, &run).await;
        h.rt.interrupt_approval_waits(WHY);
        a
    });
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the wait was not interrupted"
    );
    let report = report.unwrap();
    assert!(
        matches!(report.outcome, RunOutcome::Suspended { .. }),
        "{:?}",
        report.outcome
    );
    // The plan's next step (a write) was not taken.
    assert!(
        !events(&h.rt, &run)
            .await
            .iter()
            .any(|e| e.event_type == EventType::CapabilityRequested.name()
                && e.payload["capability"] == json!("fs.write")),
        "the plan went on after the interruption"
    );
    closed_and_suspended(&h.rt, &run, &approval).await;
}

#[tokio::test]
async fn a_wait_that_begins_after_the_interruption_ends_at_once() {
    let h = H::new(POLICY);
    let (spec, _) = h.spec("int-late", "coder", "[approvals]\ntimeout = \"600s\"\n", "");
    let run = RunId::new("int-late").unwrap();
    h.rt.interrupt_approval_waits(WHY);
    let session = h.rt.open_session(spec, "coder", &Quiet).await.unwrap();
    let call = Proposal::Request(CapabilityProposal {
        capability: "http.request".into(),
        target: "http://127.0.0.1:9/notify".into(),
        arguments: json!({"method": "GET"}),
        intent: "notify".into(),
    });
    let outcome = tokio::time::timeout(Duration::from_secs(10), session.propose(&call))
        .await
        .expect("a wait begun after the interruption did not end");
    assert!(
        matches!(outcome, Ok(Some(Outcome::Denied { .. }))),
        "{outcome:?}"
    );
    // The session's next proposal finds the run suspended.
    let next = session.propose(&call).await;
    assert!(matches!(next, Err(RuntimeError::State { .. })), "{next:?}");
    let report = session.finish().await.unwrap();
    assert!(matches!(report.outcome, RunOutcome::Suspended { .. }));
    let evs = events(&h.rt, &run).await;
    assert_eq!(
        evs.last().unwrap().event_type,
        EventType::RunSuspended.name()
    );
}
