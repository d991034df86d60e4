//! Budgets under concurrent proposals (I-005): spending never passes the budget.

mod common;

use common::*;
use ice_kernel::{CapabilityProposal, EventType, Outcome, Proposal};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_proposals_never_spend_past_the_budget() {
    for round in 0..5 {
        let h = H::new(POLICY);
        let id = format!("conc-{round}");
        // 100-byte writes against a 1000-byte budget: ten fit.
        let (spec, _) = h.spec(
            &id,
            "coder",
            "[budget]\nbytes = 1000\non_exhaustion = \"abort\"\n",
            "",
        );
        let session =
            h.rt.open_session(spec, "coder", &ice_runtime::Quiet)
                .await
                .unwrap();
        let proposals: Vec<Proposal> = (0..40)
            .map(|i| {
                Proposal::Request(CapabilityProposal {
                    capability: "fs.write".into(),
                    target: format!("out/{i}.txt"),
                    arguments: json!({"content": "x".repeat(100)}),
                    intent: "fill".into(),
                })
            })
            .collect();
        let results =
            futures_util::future::join_all(proposals.iter().map(|p| session.propose(p))).await;
        let done = results
            .iter()
            .filter(|r| matches!(r, Ok(Some(Outcome::Done { .. }))))
            .count();
        assert!(
            done <= 10,
            "{done} writes of 100 bytes fit in a 1000-byte budget"
        );
        let report = session.finish().await.unwrap();
        let events = h.events(&id).await;
        let settled: u64 = of_type(&events, EventType::BudgetSettled)
            .iter()
            .map(|e| e.payload["actual"]["bytes"].as_u64().unwrap_or(0))
            .sum();
        assert!(
            settled <= 1000,
            "settled {settled} bytes of a 1000-byte budget"
        );
        assert_eq!(settled, report.spent.bytes);
        assert_eq!(settled, 100 * done as u64);
        assert_eq!(of_type(&events, EventType::EffectStaged).len(), done);
        // Whatever interleaving happened, the log replays to the same books.
        let replayed =
            ice_runtime::Books::fold(ice_kernel::RunId::new(id.as_str()).unwrap(), events.iter())
                .unwrap();
        assert_eq!(replayed, report.books);
    }
}

/// A local endpoint that answers each request after a pause (so calls overlap); counts them.
fn slow_endpoint() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let h = h.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(30));
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                );
            });
        }
    });
    (port, hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_in_flight_are_recorded_before_the_run_stops() {
    let (port, hits) = slow_endpoint();
    let policy = format!(
        "{POLICY}\n@id(\"fetch\")\npermit(principal == Agent::\"fetcher\", action == Action::\"http.request\", resource == Host::\"127.0.0.1\");\n"
    );
    let h = H::new(&policy);
    let (spec, _) = h.spec(
        "inflight",
        "fetcher",
        "[budget]\ntool_calls = 10\non_exhaustion = \"abort\"\n\n[grants]\nuses = 100\n",
        "",
    );
    let session =
        h.rt.open_session(spec, "fetcher", &ice_runtime::Quiet)
            .await
            .unwrap();
    let proposals: Vec<Proposal> = (0..40)
        .map(|i| {
            Proposal::Request(CapabilityProposal {
                capability: "http.request".into(),
                target: format!("http://127.0.0.1:{port}/item/{i}"),
                arguments: json!({"method": "GET"}),
                intent: "fetch".into(),
            })
        })
        .collect();
    let results =
        futures_util::future::join_all(proposals.iter().map(|p| session.propose(p))).await;
    let done = results
        .iter()
        .filter(|r| matches!(r, Ok(Some(Outcome::Done { .. }))))
        .count();
    let report = session.finish().await.unwrap();
    assert!(
        matches!(report.outcome, ice_runtime::RunOutcome::Aborted { .. }),
        "{report:?}"
    );
    let events = h.events("inflight").await;
    let calls = of_type(&events, EventType::APIRequestExecuted);
    // Every request the endpoint saw is in the log, before the run was aborted.
    assert_eq!(calls.len(), hits.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(calls.len(), done);
    assert!(done <= 10, "{done}");
    let aborted = of_type(&events, EventType::RunAborted)[0].run_seq;
    assert!(calls.iter().all(|c| c.run_seq < aborted));
    // Every reservation was settled, and spending stayed within the budget.
    assert_eq!(
        of_type(&events, EventType::BudgetReserved).len(),
        of_type(&events, EventType::BudgetSettled).len()
    );
    assert!(report.spent.tool_calls <= 10);
    let replayed =
        ice_runtime::Books::fold(ice_kernel::RunId::new("inflight").unwrap(), events.iter())
            .unwrap();
    assert_eq!(replayed, report.books);
}

/// A session of agent `coder` on run `id` with `extra` spec sections.
async fn session<'h>(h: &'h H, id: &str, extra: &str) -> ice_runtime::Session<'h> {
    let (spec, _) = h.spec(id, "coder", extra, "");
    h.rt.open_session(spec, "coder", &ice_runtime::Quiet)
        .await
        .unwrap()
}

/// A GET that holds the run open while it waits (for a slow server or an approval).
fn slow_get(port: u16) -> Proposal {
    Proposal::Request(CapabilityProposal {
        capability: "http.request".into(),
        target: format!("http://127.0.0.1:{port}/slow"),
        arguments: json!({"method": "GET"}),
        intent: "hold the run open".into(),
    })
}

fn write(path: &str) -> Proposal {
    Proposal::Request(CapabilityProposal {
        capability: "fs.write".into(),
        target: path.into(),
        arguments: json!({"content": "x"}),
        intent: "write".into(),
    })
}

/// The finding: the checks between steps (a kill, the wall-time budget, a policy edit) ran only
/// when no call was in flight, so an agent that always kept one call open went on acting after
/// its run was killed. A call proposed while another is in flight and a check is due waits for
/// the checks; a kill stops it, and nothing is granted after the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kill_stops_the_next_call_even_while_another_is_in_flight() {
    let port = ok_endpoint_after(std::time::Duration::from_millis(1500));
    let policy = format!(
        "{POLICY}\n@id(\"fetch\")\npermit(principal == Agent::\"coder\", action == Action::\"http.request\", resource == Host::\"127.0.0.1\");\n"
    );
    let h = H::new(&policy);
    let session = session(&h, "held-open", "[grants]\nuses = 100\n").await;
    let slow = slow_get(port);
    let run = ice_kernel::RunId::new("held-open").unwrap();
    let later = async {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        h.rt.kill(&run, "alice", "enough", &ice_runtime::Quiet)
            .await
            .unwrap();
        let after = session.propose(&write("after-kill.txt")).await;
        assert!(after.is_err(), "{after:?}");
    };
    let (held, ()) = tokio::join!(session.propose(&slow), later);
    assert!(matches!(held, Ok(Some(Outcome::Done { .. }))), "{held:?}");
    let events = h.events("held-open").await;
    let killed = of_type(&events, EventType::RunKillRequested)[0].run_seq;
    for t in [
        EventType::CapabilityRequested,
        EventType::CapabilityGranted,
        EventType::CapabilityUsed,
        EventType::EffectStaged,
    ] {
        assert!(
            of_type(&events, t).iter().all(|e| e.run_seq < killed),
            "{t:?} after the kill"
        );
    }
    assert_eq!(of_type(&events, EventType::RunAborted).len(), 1);
    assert!(!h.ws.join("after-kill.txt").exists());
}

/// The same for the wall-time budget: a call proposed while another holds the run open (here,
/// waiting for an approval) around the end of the budget is stopped by the checks, with the
/// run, on the exhausted budget. (The holder's wait itself ends with the budget: see
/// `an_approval_wait_ends_with_the_wall_time_budget`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_wall_time_budget_stops_the_next_call_even_while_another_is_in_flight() {
    // The holder waits for an approval nobody gives (POLICY: an HTTP call needs one).
    let port = ok_endpoint();
    let h = H::new(POLICY);
    let session = session(
        &h,
        "over-time",
        "[budget]\nwall_time = \"1s\"\non_exhaustion = \"abort\"\n\n[approvals]\ntimeout = \"3s\"\n",
    )
    .await;
    let slow = slow_get(port);
    let later = async {
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        let after = session.propose(&write("late.txt")).await;
        assert!(after.is_err(), "{after:?}");
    };
    let (_held, ()) = tokio::join!(session.propose(&slow), later);
    let events = h.events("over-time").await;
    assert_eq!(of_type(&events, EventType::EffectStaged).len(), 0);
    let abort = of_type(&events, EventType::AbortReasonDeclared);
    assert_eq!(abort[0].payload["reason"], "budget_exhausted", "{abort:?}");
    assert!(!h.ws.join("late.txt").exists());
}

/// The finding: an approval wait was bounded by the approval timeout alone, so a run whose
/// wall-time budget ended while an approval nobody answered was pending went on waiting (here
/// 20 s on a 1 s budget). The wait now ends with the budget: the request records the earlier
/// expiry, the call is denied as `budget_exhausted`, an answer after that is refused, and the
/// run stops on the exhausted budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_wait_ends_with_the_wall_time_budget() {
    let port = ok_endpoint();
    let h = H::new(POLICY);
    let session = session(
        &h,
        "wait-in-budget",
        "[budget]\nwall_time = \"1s\"\non_exhaustion = \"abort\"\n\n[approvals]\ntimeout = \"20s\"\n",
    )
    .await;
    let started = std::time::Instant::now();
    let denied = session.propose(&slow_get(port)).await;
    let waited = started.elapsed();
    assert!(
        waited < std::time::Duration::from_secs(5),
        "the approval wait took {waited:?} on a 1 s budget"
    );
    let Ok(Some(Outcome::Denied { reason, detail, .. })) = &denied else {
        panic!("{denied:?}");
    };
    assert_eq!(reason, "budget_exhausted", "{detail}");
    assert!(detail.contains("wall_time budget ran out"), "{detail}");
    let events = h.events("wait-in-budget").await;
    let asked = of_type(&events, EventType::ApprovalRequested)[0];
    let expires =
        ice_kernel::Timestamp::parse(asked.payload["expires_at"].as_str().unwrap()).unwrap();
    let window = expires.unix_us() - asked.at.unix_us();
    assert!(
        (0..=1_000_000).contains(&window),
        "the request expires {window} µs after it was asked"
    );
    // Too late to answer, and the run stops on its budget.
    let late = h.rt.answer_approval(&asked.id(), "alice", true, "").await;
    assert!(late.is_err(), "{late:?}");
    let next = session.propose(&write("after.txt")).await;
    assert!(next.is_err(), "{next:?}");
    let events = h.events("wait-in-budget").await;
    let abort = of_type(&events, EventType::AbortReasonDeclared);
    assert_eq!(abort[0].payload["reason"], "budget_exhausted", "{abort:?}");
    assert!(!h.ws.join("after.txt").exists());
}

/// The finding (authority probe): an approval could be answered after the process waiting for
/// it had stopped; `ApprovalGranted` was recorded for a call nothing would make. An answer now
/// needs a process that drives the run (holds its lock); otherwise it is refused, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_nobody_waits_for_any_more_cannot_be_answered() {
    let port = ok_endpoint();
    let h = H::new(POLICY);
    let run = ice_kernel::RunId::new("orphaned").unwrap();
    let session = session(&h, "orphaned", "[approvals]\ntimeout = \"60s\"\n").await;
    let call = slow_get(port);
    let approval = tokio::select! {
        r = session.propose(&call) => panic!("decided without an operator: {r:?}"),
        a = pending(&h.rt, &run) => a,
    };
    // A reason longer than the record carries (it would go to the blob store, where the
    // approval fold cannot read it, and the run would no longer fold) is refused.
    let long =
        h.rt.answer_approval(&approval, "alice", false, &"N".repeat(17_000))
            .await;
    assert!(
        long.as_ref()
            .is_err_and(|e| e.to_string().contains("a reason is at most 4096 bytes")),
        "{long:?}"
    );
    // The listing says a process waits for it...
    let listed = h.rt.pending_approvals(Some(&run)).await.unwrap();
    assert_eq!(listed[0].waiting, Some(true), "{listed:?}");
    // The process that asked stops: its wait and its lock of the run go with it.
    drop(session);
    // ...and, once it stopped, that nobody does (an answer would be refused).
    let listed = h.rt.pending_approvals(Some(&run)).await.unwrap();
    assert_eq!(listed[0].waiting, Some(false), "{listed:?}");
    let answer = h.rt.answer_approval(&approval, "alice", true, "").await;
    let Err(e) = answer else {
        panic!("an answer was recorded for a call nothing will make");
    };
    assert!(e.to_string().contains("nobody waits for approval"), "{e}");
    let events = h.events("orphaned").await;
    assert!(of_type(&events, EventType::ApprovalGranted).is_empty());
    assert!(of_type(&events, EventType::ApprovalDenied).is_empty());
}

/// The finding: validation's budget check compared only what calls settled, and wall time is
/// spent by the window, not settled: a session that finished past its wall-time budget was
/// validated as within budget and committed. The window's recorded time is checked too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_finished_past_its_wall_time_budget_fails_validation() {
    let h = H::new(POLICY);
    let session = session(
        &h,
        "finished-late",
        "[budget]\nwall_time = \"1s\"\non_exhaustion = \"abort\"\n",
    )
    .await;
    let done = session.propose(&write("early.txt")).await;
    assert!(matches!(done, Ok(Some(Outcome::Done { .. }))), "{done:?}");
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let report = session.finish().await.unwrap();
    assert!(
        !matches!(report.outcome, ice_runtime::RunOutcome::Committed),
        "{report:?}"
    );
    let events = h.events("finished-late").await;
    let failed = of_type(&events, EventType::ValidationFailed);
    assert!(
        serde_json::Value::Object(failed[0].payload.clone())
            .to_string()
            .contains("wall_time: the execution window ran"),
        "{failed:?}"
    );
    assert!(!h.ws.join("early.txt").exists());
}

/// The finding (multi-node probe, High): a node paused for longer than its claim's lifetime
/// renewed the claim when it woke (the node that had recovered the run meanwhile had released
/// it), and went on appending to a run another node had suspended and resumed: two writers.
/// On a log whose claims lapse, a claim not renewed within its lifetime is lost for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_not_renewed_within_its_lifetime_is_lost_for_good() {
    use std::sync::atomic::{AtomicI64, Ordering};
    struct Shared;
    impl Hooks for Shared {
        fn claims_lapse(&self) -> bool {
            true
        }
    }
    struct Manual(AtomicI64);
    impl ice_kernel::Clock for Manual {
        fn now(&self) -> ice_kernel::Timestamp {
            ice_kernel::Timestamp::from_unix_us(self.0.load(Ordering::SeqCst)).unwrap()
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let log = std::sync::Arc::new(HookedLog {
        inner: ice_log::sqlite::SqliteLog::create(&dir.path().join("log.db")).unwrap(),
        hooks: Shared,
    });
    let clock = std::sync::Arc::new(Manual(AtomicI64::new(1_800_000_000_000_000)));
    let run = ice_kernel::RunId::new("paused").unwrap();
    let lock = ice_runtime::lock::RunLock::take(
        &dir.path().join("run"),
        log,
        clock.clone(),
        &run,
        "node-a",
    )
    .await
    .unwrap();
    assert!(!lock.lost());
    // The node pauses past the claim's lifetime: the claim lapsed, whoever holds it now.
    let ttl = ice_runtime::lock::claim_ttl().as_micros() as i64;
    clock.0.fetch_add(ttl, Ordering::SeqCst);
    assert!(lock.lost(), "a claim that lapsed is still held");
    // For good: the clock going back (or a renewal that would succeed) changes nothing.
    clock.0.fetch_sub(ttl, Ordering::SeqCst);
    assert!(lock.lost());
}

/// Waits for `run`'s approval, edits the policy file to `policy` (a write that moves its
/// modification time), answers yes as alice, and returns what the call came to, and how the
/// run ended when finished then.
async fn approve_after_editing(h: &H, id: &str, policy: &str) -> Option<Outcome> {
    approve_after_editing_with(h, id, "", policy).await.0
}

/// [`approve_after_editing`] with `extra` spec sections, giving the finished run's report too.
async fn approve_after_editing_with(
    h: &H,
    id: &str,
    extra: &str,
    policy: &str,
) -> (Option<Outcome>, ice_runtime::RunReport) {
    let port = ok_endpoint();
    let run = ice_kernel::RunId::new(id).unwrap();
    let spec = format!("[approvals]\ntimeout = \"60s\"\n\n{extra}");
    let session = session(h, id, &spec).await;
    let call = slow_get(port);
    let outcome = {
        let asked = session.propose(&call);
        tokio::pin!(asked);
        let approval = tokio::select! {
            r = &mut asked => panic!("decided without an operator: {r:?}"),
            a = pending(&h.rt, &run) => a,
        };
        std::fs::write(h.policies.join("p.cedar"), policy).unwrap();
        h.rt.answer_approval(&approval, "alice", true, "")
            .await
            .unwrap();
        asked.await.unwrap()
    };
    (outcome, session.finish().await.unwrap())
}

/// The finding (policy probe): a call waiting for approval was decided before the wait and
/// carried out after it under that decision, even when the policy files had meanwhile changed
/// to forbid it. An approval does not outrank the policy in force when the call is made: the
/// policy is taken on after the wait and the call refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_approved_after_the_policy_came_to_forbid_it_is_not_made() {
    let h = H::new(POLICY);
    let forbidding = format!(
        "{POLICY}\n@id(\"no-http\")\nforbid(principal, action == Action::\"http.request\", resource);\n"
    );
    let outcome = approve_after_editing(&h, "edited-wait", &forbidding).await;
    let Some(Outcome::Denied { reason, detail, .. }) = &outcome else {
        panic!("{outcome:?}");
    };
    assert_eq!(reason, "policy_denied", "{detail}");
    assert!(
        detail.contains("changed while approval") && detail.contains("no-http"),
        "{detail}"
    );
    let events = h.events("edited-wait").await;
    assert!(of_type(&events, EventType::CapabilityGranted).is_empty());
    assert!(of_type(&events, EventType::APIRequestExecuted).is_empty());
    // The new policy is in the record before the refusal it explains.
    let granted = of_type(&events, EventType::ApprovalGranted)[0].run_seq;
    let reloaded = of_type(&events, EventType::PolicyReloaded)[0].run_seq;
    let denied = of_type(&events, EventType::CapabilityDenied)[0].run_seq;
    assert!(granted < reloaded && reloaded < denied, "{events:#?}");
    let denial = of_type(&events, EventType::CapabilityDenied)[0];
    assert_eq!(denial.payload["policies"], serde_json::json!(["no-http"]));
    // The operator granted what the agent asked for: the refusal is not the agent's.
    let run = ice_kernel::RunId::new("edited-wait").unwrap();
    assert_eq!(
        ice_runtime::Books::fold(run, events.iter())
            .unwrap()
            .refusals,
        0
    );
    let replay =
        h.rt.replay(&ice_kernel::RunId::new("edited-wait").unwrap())
            .await
            .unwrap();
    assert!(replay.divergences.is_empty(), "{:?}", replay.divergences);
}

/// The other side: an edit that leaves the call decided as before (here, a rule added for
/// something else) does not void the approval; the new policy is recorded before the grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_approved_after_an_unrelated_policy_edit_is_made() {
    let h = H::new(POLICY);
    let unrelated = format!(
        "{POLICY}\n@id(\"no-deletes\")\nforbid(principal, action == Action::\"fs.delete\", resource);\n"
    );
    let outcome = approve_after_editing(&h, "unrelated-wait", &unrelated).await;
    assert!(matches!(outcome, Some(Outcome::Done { .. })), "{outcome:?}");
    let events = h.events("unrelated-wait").await;
    let reloaded = of_type(&events, EventType::PolicyReloaded)[0].run_seq;
    let granted = of_type(&events, EventType::CapabilityGranted)[0].run_seq;
    assert!(reloaded < granted, "{events:#?}");
    // The grant names the policy it was issued under: the new one.
    let new_version = &of_type(&events, EventType::PolicyReloaded)[0].payload["policy_version"];
    let grant = of_type(&events, EventType::CapabilityGranted)[0];
    assert_eq!(&grant.payload["policy_version"], new_version);
    let replay =
        h.rt.replay(&ice_kernel::RunId::new("unrelated-wait").unwrap())
            .await
            .unwrap();
    assert!(replay.divergences.is_empty(), "{:?}", replay.divergences);
}

/// The review's finding: with two calls waiting for approval when the policy came to forbid
/// them, the first to wake took the new policy on and was refused, and the second, finding
/// the files as last stamped, was carried out under the decision made before its wait. Each
/// call compares the policy in force with the one that decided it, whoever took it on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_calls_approved_after_the_policy_came_to_forbid_them_are_both_refused() {
    let h = H::new(POLICY);
    let port = ok_endpoint();
    let run = ice_kernel::RunId::new("two-waits").unwrap();
    let session = session(&h, "two-waits", "[approvals]\ntimeout = \"60s\"\n").await;
    let (a, b) = (slow_get(port), slow_get(port));
    let forbidding = format!(
        "{POLICY}\n@id(\"no-http\")\nforbid(principal, action == Action::\"http.request\", resource);\n"
    );
    let operator = async {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let waiting = loop {
            let p = h.rt.pending_approvals(Some(&run)).await.unwrap();
            if p.len() == 2 {
                break p;
            }
            assert!(std::time::Instant::now() < deadline, "{p:?}");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        std::fs::write(h.policies.join("p.cedar"), &forbidding).unwrap();
        for w in waiting {
            h.rt.answer_approval(&w.id.parse().unwrap(), "alice", true, "")
                .await
                .unwrap();
        }
    };
    let (x, y, ()) = tokio::join!(session.propose(&a), session.propose(&b), operator);
    for outcome in [x, y] {
        let outcome = outcome.unwrap();
        let Some(Outcome::Denied { reason, detail, .. }) = &outcome else {
            panic!("{outcome:?}");
        };
        assert_eq!(reason, "policy_denied", "{detail}");
        assert!(detail.contains("changed while approval"), "{detail}");
    }
    session.finish().await.unwrap();
    let events = h.events("two-waits").await;
    assert!(of_type(&events, EventType::CapabilityGranted).is_empty());
    assert!(of_type(&events, EventType::APIRequestExecuted).is_empty());
    assert_eq!(of_type(&events, EventType::PolicyReloaded).len(), 1);
}

/// The finding: a call an operator approved while the policy files came to no longer load was
/// refused as `policy_denied` and counted as one of the agent's refusals, so a run whose budget
/// allows one refusal ended budget-exhausted instead of being suspended for the operator to fix
/// the files. The call is still refused; the agent is not charged; the run is suspended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_approved_while_the_policy_stopped_loading_suspends_the_run_and_charges_nobody() {
    let h = H::new(POLICY);
    let run = ice_kernel::RunId::new("broken-wait").unwrap();
    let (outcome, report) = approve_after_editing_with(
        &h,
        "broken-wait",
        "[budget]\ndenials = 1\n",
        "permit(principal, action, resource",
    )
    .await;
    let Some(Outcome::Denied { reason, detail, .. }) = &outcome else {
        panic!("{outcome:?}");
    };
    assert_eq!(reason, "policy_denied", "{detail}");
    assert!(detail.contains("no longer loads"), "{detail}");
    // The run is suspended for the policy, not stopped for the agent's refusals.
    assert!(
        matches!(&report.outcome, ice_runtime::RunOutcome::Suspended { .. }),
        "{report:?}"
    );
    let events = h.events("broken-wait").await;
    let suspended = of_type(&events, EventType::RunSuspended);
    assert_eq!(suspended.len(), 1, "{events:#?}");
    assert_eq!(suspended[0].payload["reason"], "policy_invalid");
    assert!(of_type(&events, EventType::RunTerminatedByRuntime).is_empty());
    assert!(of_type(&events, EventType::RunAborted).is_empty());
    assert!(of_type(&events, EventType::APIRequestExecuted).is_empty());
    let books = ice_runtime::Books::fold(run, events.iter()).unwrap();
    assert_eq!(books.refusals, 0);
}

/// The same review: finishing did not look at the policy files (only the checks between steps
/// did, on their 100 ms schedule), so a run that assumed the policy would not change, edited
/// just before the run finished, was validated against the policy it had loaded and committed;
/// and a file the run assumed unchanged, changed just before it finished, failed validation
/// and aborted it, where the same change found between two steps suspends the run for the
/// operator to decide (spec A-004). At the end as between steps: suspended, nothing applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_finished_right_after_a_change_it_assumed_away_is_suspended() {
    let h = H::new(POLICY);
    let policy = format!(
        "{POLICY}\n@id(\"extra\")\nforbid(principal, action == Action::\"fs.delete\", resource);\n"
    );
    let cases = [
        (
            "policy_version = \"current\"",
            h.policies.join("p.cedar"),
            policy,
        ),
        (
            "file = \"config.toml\"",
            h.ws.join("config.toml"),
            "x = 2\n".to_string(),
        ),
    ];
    for (i, (assume, edited, edit)) in cases.into_iter().enumerate() {
        let id = format!("assumed-{i}");
        let session = session(&h, &id, &format!("[[assume]]\n{assume}\n")).await;
        let staged = session.propose(&write("a.txt")).await.unwrap();
        assert!(matches!(staged, Some(Outcome::Done { .. })), "{staged:?}");
        std::fs::write(edited, edit).unwrap();
        let report = session.finish().await.unwrap();
        assert!(
            matches!(&report.outcome, ice_runtime::RunOutcome::Suspended { .. }),
            "{assume}: {report:?}"
        );
        let events = h.events(&id).await;
        let suspended = of_type(&events, EventType::RunSuspended);
        assert_eq!(suspended[0].payload["reason"], "assumption_invalidated");
        assert!(of_type(&events, EventType::ValidationStarted).is_empty());
        assert!(!h.ws.join("a.txt").exists());
    }
}

/// The review's finding: a policy file read while an editor was saving it in place (truncated,
/// then written) did not load, and the run was suspended for it, an MCP session for good
/// (sessions are not resumed). A policy that does not load is looked at once more a moment
/// later: the edit, complete by then, is taken on and the call goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_file_caught_half_saved_is_read_again_before_the_run_is_suspended() {
    let h = H::new(POLICY);
    let session = session(&h, "half-saved", "").await;
    let first = session.propose(&write("a.txt")).await.unwrap();
    assert!(matches!(first, Some(Outcome::Done { .. })), "{first:?}");
    // Past the step checks' 100 ms schedule, so the next proposal looks at the files.
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    let path = h.policies.join("p.cedar");
    let complete = format!(
        "{POLICY}\n@id(\"no-deletes\")\nforbid(principal, action == Action::\"fs.delete\", resource);\n"
    );
    std::fs::write(&path, &complete[..complete.len() / 2]).unwrap();
    let saver = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(40));
        std::fs::write(&path, complete).unwrap();
    });
    let second = session.propose(&write("b.txt")).await;
    saver.join().unwrap();
    assert!(
        matches!(second, Ok(Some(Outcome::Done { .. }))),
        "{second:?}"
    );
    let report = session.finish().await.unwrap();
    assert_eq!(
        report.outcome,
        ice_runtime::RunOutcome::Committed,
        "{report:?}"
    );
    let events = h.events("half-saved").await;
    assert_eq!(of_type(&events, EventType::PolicyReloaded).len(), 1);
    assert!(of_type(&events, EventType::RunSuspended).is_empty());
}

/// The finding: a proposal that passed the open check while another proposal's checks were
/// stopping the run (here, on a kill) went on to run the checks again on the stopped run, or,
/// had its call exhausted a budget, to stop the run a second time. Every proposal made at once
/// after a kill is refused as made on a stopped run, and the run is aborted exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proposals_made_at_once_after_a_kill_are_all_refused_and_the_run_aborts_once() {
    for round in 0..5 {
        let h = H::new(POLICY);
        let id = format!("killed-at-once-{round}");
        let session = session(&h, &id, "[grants]\nuses = 100\n").await;
        let run = ice_kernel::RunId::new(id.as_str()).unwrap();
        h.rt.kill(&run, "alice", "enough", &ice_runtime::Quiet)
            .await
            .unwrap();
        let proposals: Vec<Proposal> = (0..20).map(|i| write(&format!("late-{i}.txt"))).collect();
        let results =
            futures_util::future::join_all(proposals.iter().map(|p| session.propose(p))).await;
        for r in &results {
            assert!(
                matches!(r, Err(ice_runtime::RuntimeError::State { .. })),
                "a proposal after the kill: {r:?}"
            );
        }
        let report = session.finish().await.unwrap();
        assert!(
            matches!(&report.outcome, ice_runtime::RunOutcome::Aborted { reason } if reason.starts_with("killed")),
            "{:?}",
            report.outcome
        );
        let events = h.events(&id).await;
        assert_eq!(of_type(&events, EventType::RunAborted).len(), 1);
        assert!(of_type(&events, EventType::CapabilityRequested).is_empty());
        assert!((0..20).all(|i| !h.ws.join(format!("late-{i}.txt")).exists()));
    }
}

/// Two calls in flight when the process driving their run stops (here, the session is dropped
/// mid-call, as a killed process would leave it): the next start's recovery answers each one
/// (`outcome_unknown`, naming its request and target, its reservation settled in full) before
/// it suspends the run, and the record folds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recovery_answers_every_call_the_stopped_process_had_in_flight() {
    let port = ok_endpoint_after(std::time::Duration::from_secs(8));
    let policy = format!(
        "{POLICY}\n@id(\"fetch\")\npermit(principal == Agent::\"coder\", action == Action::\"http.request\", resource == Host::\"127.0.0.1\");\n"
    );
    let h = H::new(&policy);
    let id = "two-in-flight";
    {
        let session = session(&h, id, "[grants]\nuses = 100\n[budget]\ntool_calls = 10\n").await;
        let slow = slow_get(port);
        let calls = futures_util::future::join(session.propose(&slow), session.propose(&slow));
        let both_used = async {
            while of_type(&h.events(id).await, EventType::CapabilityUsed).len() < 2 {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        };
        tokio::select! {
            r = calls => panic!("the slow calls ended: {r:?}"),
            () = both_used => {}
        }
    }
    let restarted = another_process(h.dir.path());
    let recovered = restarted.recover(&ice_runtime::Quiet).await.unwrap();
    assert_eq!(recovered.len(), 1, "{recovered:?}");
    assert_eq!(recovered[0].to, "SUSPENDED", "{recovered:?}");
    let events = h.events(id).await;
    let requests = of_type(&events, EventType::CapabilityRequested);
    let unknown = of_type(&events, EventType::CapabilityDenied);
    assert_eq!(requests.len(), 2);
    assert_eq!(unknown.len(), 2, "{events:#?}");
    for r in &requests {
        let answers: Vec<_> = unknown
            .iter()
            .filter(|d| d.payload["request"] == r.id().to_string())
            .collect();
        assert_eq!(answers.len(), 1, "request {}: {events:#?}", r.id());
        assert_eq!(answers[0].payload["reason"], "outcome_unknown");
        assert!(
            answers[0].payload["detail"]
                .as_str()
                .unwrap()
                .contains(&format!("127.0.0.1:{port}/slow")),
            "{:?}",
            answers[0].payload
        );
    }
    // Each reservation settled once, in full.
    let reserved = of_type(&events, EventType::BudgetReserved);
    let settled = of_type(&events, EventType::BudgetSettled);
    assert_eq!(reserved.len(), 2);
    assert_eq!(settled.len(), 2);
    for s in &settled {
        let r = reserved
            .iter()
            .find(|r| r.payload["reservation"] == s.payload["reservation"])
            .unwrap();
        assert_eq!(s.payload["actual"], r.payload["amount"]);
    }
    let books =
        ice_runtime::Books::fold(ice_kernel::RunId::new(id).unwrap(), events.iter()).unwrap();
    assert_eq!(books.state(), ice_kernel::RunState::Suspended);
    assert_eq!(books.budget.spent().tool_calls, 2);
    assert_eq!(books.budget.reservations().count(), 0);
}
