//! Grants as a fold over sealed events: every use is checked at the moment of use (same run, not
//! revoked, not expired, uses left, capability, scope, run EXECUTING) and each refusal carries its
//! stable code; scopes are hierarchical on whole segments; replay rebuilds the same book.

mod common;

use common::*;
use ice_authority::payload::CapabilityUsedPayload;
use ice_authority::{
    BookProblem, CapabilityExpiredPayload, CapabilityGrantedPayload, CapabilityRevokedPayload,
    DenialCode, EffectClass, GrantBook, GrantRefusal, GrantStatus, PayloadError, Resource, Scope,
};
use ice_kernel::{Event, EventId, EventType, RunId, RunState, Timestamp};
use proptest::prelude::*;
use serde_json::json;

/// A run with one grant of `fs.write` within `scope_text` for `src/lib.rs`, expiring at
/// `at(60)`, allowing `max_uses`.
fn run_with_grant(id: &str, scope_text: &str, max_uses: u64) -> (TestRun, GrantBook, EventId) {
    let mut run = TestRun::executing(id);
    let request = run.request("coder", "fs.write", "src/lib.rs");
    let payload = granted(
        "fs.write",
        path("src/lib.rs"),
        scope_text,
        max_uses,
        at(60),
        request,
    );
    let grant = run.grant(&payload).id();
    let book = fold(&run.id(), &run.events);
    (run, book, grant)
}

fn fold(run: &RunId, events: &[Event]) -> GrantBook {
    let mut book = GrantBook::new(run.clone());
    for e in events {
        book.apply(e)
            .unwrap_or_else(|err| panic!("fold refused {}: {err}", e.id()));
    }
    book
}

fn use_event(run: &mut TestRun, grant: &EventId, capability: &str, resource: Resource) -> Event {
    let payload = CapabilityUsedPayload {
        grant: grant.clone(),
        capability: capability.to_string(),
        resource,
    };
    run.runtime(
        EventType::CapabilityUsed,
        payload.to_payload(),
        Some(grant.to_string()),
    )
}

fn code(
    book: &GrantBook,
    grant: &EventId,
    run: &RunId,
    capability: &str,
    resource: &Resource,
    now: Timestamp,
    state: RunState,
) -> DenialCode {
    match book.check_use(grant, run, capability, resource, now, state) {
        Ok(a) => panic!("expected a refusal, got {a:?}"),
        Err(refusal) => refusal.code(),
    }
}

#[test]
fn a_use_inside_the_scope_is_authorized_with_the_grants_terms() {
    let (run, book, grant) = run_with_grant("run-1", "fs.write:src", 5);
    for target in ["src/lib.rs", "src/deep/nested/mod.rs"] {
        let auth = book
            .check_use(
                &grant,
                &run.id(),
                "fs.write",
                &path(target),
                at(1),
                run.state(),
            )
            .unwrap_or_else(|e| panic!("{target}: {e}"));
        assert_eq!(auth.run(), &run.id());
        assert_eq!(auth.grant(), &grant);
        assert_eq!(auth.agent(), "coder");
        assert_eq!(auth.capability(), "fs.write");
        assert_eq!(auth.resource(), &path(target));
        assert_eq!(auth.scope(), &scope("fs.write:src"));
        assert_eq!(auth.effect(), EffectClass::InternalWrite);
        assert_eq!(auth.constraints().max_bytes, Some(1024));
    }
    let g = book.get(&grant).expect("grant folded");
    assert_eq!(g.issued_at, run.events[4].at);
    assert_eq!(g.request, run.events[3].id());
    assert_eq!(g.status, GrantStatus::Live);
}

#[test]
fn out_of_scope_targets_are_refused_on_whole_segments() {
    let (run, book, grant) = run_with_grant("run-1", "fs.write:src", 5);
    for target in ["srcx/lib.rs", "srcx", "lib.rs", "other/src/lib.rs", "src:x"] {
        assert_eq!(
            code(
                &book,
                &grant,
                &run.id(),
                "fs.write",
                &path(target),
                at(1),
                run.state()
            ),
            DenialCode::GrantOutOfScope,
            "{target}"
        );
    }
    // A grant for exactly one file covers that file only.
    let (run, book, grant) = run_with_grant("run-2", "fs.write:src:lib.rs", 5);
    let ok = book.check_use(
        &grant,
        &run.id(),
        "fs.write",
        &path("src/lib.rs"),
        at(1),
        run.state(),
    );
    assert!(ok.is_ok());
    let refusal = book
        .check_use(
            &grant,
            &run.id(),
            "fs.write",
            &path("src/lib.rs.bak"),
            at(1),
            run.state(),
        )
        .expect_err("a sibling file is outside");
    assert_eq!(refusal.code(), DenialCode::GrantOutOfScope);
    assert_eq!(
        refusal.to_string(),
        format!("grant {grant} covers fs.write:src:lib.rs, not Path::\"src/lib.rs.bak\"")
    );
}

#[test]
fn expired_grants_are_refused_from_the_expiry_instant() {
    let (mut run, mut book, grant) = run_with_grant("run-1", "fs.write:src", 5);
    let target = path("src/lib.rs");
    let just_before = Timestamp::from_unix_us(at(60).unix_us() - 1).expect("time");
    assert!(
        book.check_use(
            &grant,
            &run.id(),
            "fs.write",
            &target,
            just_before,
            run.state()
        )
        .is_ok()
    );
    for now in [at(60), at(61), at(100_000)] {
        assert_eq!(
            code(
                &book,
                &grant,
                &run.id(),
                "fs.write",
                &target,
                now,
                run.state()
            ),
            DenialCode::GrantExpired
        );
    }
    assert_eq!(book.due_to_expire(at(60)).count(), 1);
    assert_eq!(book.live(at(60)).count(), 0);
    // Once recorded as expired, it is refused whatever time the caller gives.
    let e = run.runtime(
        EventType::CapabilityExpired,
        CapabilityExpiredPayload {
            grant: grant.clone(),
        }
        .to_payload(),
        None,
    );
    book.apply(&e).expect("expiry folds");
    assert!(matches!(
        book.get(&grant).map(|g| &g.status),
        Some(GrantStatus::Expired { .. })
    ));
    assert_eq!(
        code(
            &book,
            &grant,
            &run.id(),
            "fs.write",
            &target,
            at(1),
            run.state()
        ),
        DenialCode::GrantExpired
    );
    assert_eq!(book.due_to_expire(at(60)).count(), 0);
}

#[test]
fn revoked_grants_are_refused() {
    let (mut run, mut book, grant) = run_with_grant("run-1", "fs.write:src", 5);
    let e = run.runtime(
        EventType::CapabilityRevoked,
        CapabilityRevokedPayload {
            grant: grant.clone(),
            reason: "policy no longer permits it".into(),
            policy_version: Some(version(2)),
        }
        .to_payload(),
        None,
    );
    book.apply(&e).expect("revocation folds");
    let refusal = book
        .check_use(
            &grant,
            &run.id(),
            "fs.write",
            &path("src/lib.rs"),
            at(1),
            run.state(),
        )
        .expect_err("revoked");
    assert_eq!(refusal.code(), DenialCode::GrantRevoked);
    assert!(refusal.to_string().contains("policy no longer permits it"));
    assert_eq!(book.live(at(1)).count(), 0);
    assert!(matches!(
        &book.get(&grant).expect("grant").status,
        GrantStatus::Revoked { policy_version: Some(v), .. } if *v == version(2)
    ));
}

#[test]
fn used_up_grants_are_refused() {
    let (mut run, mut book, grant) = run_with_grant("run-1", "fs.write:src", 2);
    let target = path("src/lib.rs");
    for n in 0..2 {
        assert!(
            book.check_use(&grant, &run.id(), "fs.write", &target, at(1), run.state())
                .is_ok(),
            "use {n}"
        );
        let e = use_event(&mut run, &grant, "fs.write", target.clone());
        book.apply(&e).expect("use folds");
    }
    assert_eq!(book.get(&grant).map(|g| g.uses), Some(2));
    assert_eq!(
        code(
            &book,
            &grant,
            &run.id(),
            "fs.write",
            &target,
            at(1),
            run.state()
        ),
        DenialCode::GrantUsedUp
    );
    assert_eq!(book.live(at(1)).count(), 0);
    // A third recorded use is one the book would have refused: a fold error.
    let third = use_event(&mut run, &grant, "fs.write", target);
    let before = book.clone();
    let err = book.apply(&third).expect_err("a use past the limit");
    assert_eq!(err.event, third.id());
    assert!(matches!(
        *err.problem,
        BookProblem::UseRefused(GrantRefusal::UsedUp { .. })
    ));
    assert_eq!(book, before, "a refused event changes nothing");
}

#[test]
fn grants_of_another_run_are_refused() {
    let (run_a, book_a, grant_a) = run_with_grant("run-a", "fs.write:src", 5);
    let (run_b, book_b, grant_b) = run_with_grant("run-b", "fs.write:src", 5);
    let target = path("src/lib.rs");
    // Run B presents run A's grant, to either book.
    for book in [&book_a, &book_b] {
        let refusal = book
            .check_use(
                &grant_a,
                &run_b.id(),
                "fs.write",
                &target,
                at(1),
                RunState::Executing,
            )
            .expect_err("another run's grant");
        assert_eq!(refusal.code(), DenialCode::GrantWrongRun);
        assert_eq!(
            refusal.to_string(),
            format!("grant {grant_a} belongs to run run-a, not to run run-b")
        );
    }
    // A grant of run B, used by run B, looked up in run A's book: that book knows no such grant.
    assert_eq!(
        code(
            &book_a,
            &grant_b,
            &run_b.id(),
            "fs.write",
            &target,
            at(1),
            RunState::Executing
        ),
        DenialCode::GrantUnknown
    );
    // Each run can use its own.
    assert!(
        book_a
            .check_use(
                &grant_a,
                &run_a.id(),
                "fs.write",
                &target,
                at(1),
                run_a.state()
            )
            .is_ok()
    );
    assert!(
        book_b
            .check_use(
                &grant_b,
                &run_b.id(),
                "fs.write",
                &target,
                at(1),
                run_b.state()
            )
            .is_ok()
    );
}

#[test]
fn unknown_grants_are_refused() {
    let (run, book, grant) = run_with_grant("run-1", "fs.write:src", 5);
    // The CapabilityRequested is an event of the run, but not a grant.
    let not_a_grant = EventId::new(run.id(), grant.run_seq - 1);
    assert_eq!(
        code(
            &book,
            &not_a_grant,
            &run.id(),
            "fs.write",
            &path("src/lib.rs"),
            at(1),
            run.state()
        ),
        DenialCode::GrantUnknown
    );
}

#[test]
fn a_grant_for_another_capability_is_refused() {
    let (run, book, grant) = run_with_grant("run-1", "fs.write:src", 5);
    for capability in ["fs.read", "fs.delete", "fs.writex"] {
        assert_eq!(
            code(
                &book,
                &grant,
                &run.id(),
                capability,
                &path("src/lib.rs"),
                at(1),
                run.state()
            ),
            DenialCode::GrantWrongCapability,
            "{capability}"
        );
    }
    // A resource of another kind is outside the grant even when its segments match.
    let dir = Resource::dir("src").expect("dir");
    assert_eq!(
        code(
            &book,
            &grant,
            &run.id(),
            "fs.write",
            &dir,
            at(1),
            run.state()
        ),
        DenialCode::GrantOutOfScope
    );
}

#[test]
fn grants_are_used_only_while_the_run_is_executing() {
    let (mut run, book, grant) = run_with_grant("run-1", "fs.write:src", 5);
    let target = path("src/lib.rs");
    for state in [
        RunState::Created,
        RunState::ContextReady,
        RunState::Suspended,
        RunState::Validating,
        RunState::Committed,
        RunState::Aborted,
        RunState::Terminated,
    ] {
        assert_eq!(
            code(&book, &grant, &run.id(), "fs.write", &target, at(1), state),
            DenialCode::RunNotExecuting,
            "{state}"
        );
    }
    // With the state the log gives after a suspension.
    run.suspend();
    let refusal = book
        .check_use(&grant, &run.id(), "fs.write", &target, at(1), run.state())
        .expect_err("suspended");
    assert_eq!(
        refusal,
        GrantRefusal::RunNotExecuting {
            state: RunState::Suspended
        }
    );
    assert_eq!(
        refusal.to_string(),
        "the run is SUSPENDED; grants are used only while it is EXECUTING"
    );
}

#[test]
fn find_covering_picks_a_live_grant_with_the_narrowest_scope() {
    let mut run = TestRun::executing("run-1");
    let r1 = run.request("coder", "fs.write", "src");
    let broad = run
        .grant(&granted(
            "fs.write",
            path("src/a.rs"),
            "fs.write",
            5,
            at(60),
            r1,
        ))
        .id();
    let r2 = run.request("coder", "fs.write", "src/a.rs");
    let narrow = run
        .grant(&granted(
            "fs.write",
            path("src/a.rs"),
            "fs.write:src",
            1,
            at(30),
            r2,
        ))
        .id();
    let book = fold(&run.id(), &run.events);
    let find = |target: &str, now| {
        book.find_covering("fs.write", &path(target), now)
            .map(|g| g.id.clone())
    };
    assert_eq!(find("src/a.rs", at(1)), Some(narrow.clone()));
    assert_eq!(find("docs/x.md", at(1)), Some(broad.clone()));
    // The narrow grant expires first; the broad one still covers.
    assert_eq!(find("src/a.rs", at(30)), Some(broad.clone()));
    assert_eq!(find("src/a.rs", at(60)), None);
    assert_eq!(
        book.find_covering("fs.read", &path("src/a.rs"), at(1)),
        None
    );
    assert_eq!(book.live(at(1)).count(), 2);
}

/// What a permitted call may reuse: a covering live grant for the same agent, with exactly the
/// permit's constraints, never one given on an approval (that one serves its own call alone).
#[test]
fn find_reusable_takes_only_a_grant_of_the_agent_with_the_permits_constraints_and_no_approval() {
    let mut run = TestRun::executing("run-1");
    let limits = ice_authority::Constraints {
        max_bytes: Some(1024),
        timeout_ms: None,
    };
    // Given on an approval, narrowest of all: never reused.
    let r0 = run.request("coder", "fs.write", "src/a.rs");
    let mut approved = granted(
        "fs.write",
        path("src/a.rs"),
        "fs.write:src:a.rs",
        1,
        at(60),
        r0.clone(),
    );
    approved.approval = Some(EventId::new(run.id(), 2));
    approved.request = r0;
    let approved = run.grant(&approved).id();
    // Another agent's grant, narrower than the plain one.
    let r1 = run.request("coder", "fs.write", "src");
    let mut others = granted("fs.write", path("src/a.rs"), "fs.write:src", 5, at(60), r1);
    others.agent = "reviewer".to_string();
    let others = run.grant(&others).id();
    // The plain one: the coder's, with the permit's limits.
    let r2 = run.request("coder", "fs.write", "src");
    let plain = run
        .grant(&granted(
            "fs.write",
            path("src/a.rs"),
            "fs.write",
            5,
            at(60),
            r2,
        ))
        .id();
    let book = fold(&run.id(), &run.events);
    let target = path("src/a.rs");
    assert_eq!(
        book.find_covering("fs.write", &target, at(1))
            .map(|g| g.id.clone()),
        Some(approved.clone()),
        "find_covering says what covers, whatever the grant"
    );
    let reusable = |agent: &str, c: &ice_authority::Constraints| {
        book.find_reusable(agent, "fs.write", &target, c, at(1))
            .map(|g| g.id.clone())
    };
    assert_eq!(reusable("coder", &limits), Some(plain.clone()));
    assert_eq!(reusable("reviewer", &limits), Some(others));
    // Another permit's limits (tighter or looser): a new grant, not this one.
    let tighter = ice_authority::Constraints {
        max_bytes: Some(8),
        timeout_ms: None,
    };
    assert_eq!(reusable("coder", &tighter), None);
    assert_eq!(reusable("coder", &ice_authority::Constraints::NONE), None);
    assert_eq!(reusable("nobody", &limits), None);
    assert_eq!(
        book.find_reusable("coder", "fs.write", &target, &limits, at(60)),
        None,
        "expired"
    );
    assert!(book.get(&approved).is_some());
}

#[test]
fn the_fold_refuses_events_that_break_the_contract_and_changes_nothing() {
    let (mut run, mut book, grant) = run_with_grant("run-1", "fs.write:src", 5);
    let before = book.clone();
    let unknown = EventId::new(run.id(), 999);

    // A use of a grant this run never made names the event and the grant.
    let e = use_event(&mut run, &unknown, "fs.write", path("src/lib.rs"));
    let err = book.apply(&e).expect_err("unknown grant");
    assert_eq!(err.event, e.id());
    assert_eq!(*err.problem, BookProblem::UnknownGrant(unknown.clone()));
    assert!(
        err.to_string()
            .starts_with(&format!("event {} (CapabilityUsed)", e.id()))
    );

    // A revocation of an unknown grant.
    let e = run.runtime(
        EventType::CapabilityRevoked,
        CapabilityRevokedPayload {
            grant: unknown.clone(),
            reason: "r".into(),
            policy_version: None,
        }
        .to_payload(),
        None,
    );
    assert_eq!(
        *book.apply(&e).expect_err("unknown grant").problem,
        BookProblem::UnknownGrant(unknown)
    );

    // A use whose authority is not its grant.
    let payload = CapabilityUsedPayload {
        grant: grant.clone(),
        capability: "fs.write".into(),
        resource: path("src/lib.rs"),
    };
    let e = run.runtime(
        EventType::CapabilityUsed,
        payload.to_payload(),
        Some("policy:x".into()),
    );
    assert!(matches!(
        *book.apply(&e).expect_err("authority").problem,
        BookProblem::Authority { .. }
    ));

    // A recorded use outside the scope.
    let e = use_event(&mut run, &grant, "fs.write", path("srcx/lib.rs"));
    assert!(matches!(
        *book.apply(&e).expect_err("out of scope").problem,
        BookProblem::UseRefused(GrantRefusal::OutOfScope { .. })
    ));

    // A grant whose authority names neither its approval nor its policy version.
    let request = run.request("coder", "fs.write", "src/x.rs");
    let p = granted(
        "fs.write",
        path("src/x.rs"),
        "fs.write:src",
        1,
        at(60),
        request,
    );
    let e = run.runtime(
        EventType::CapabilityGranted,
        p.to_payload(),
        Some("policy:0000".into()),
    );
    assert!(matches!(
        *book.apply(&e).expect_err("authority").problem,
        BookProblem::Authority { .. }
    ));

    assert_eq!(book, before);

    // A second revocation of the same grant.
    let revoke = |run: &mut TestRun| {
        run.runtime(
            EventType::CapabilityRevoked,
            CapabilityRevokedPayload {
                grant: grant.clone(),
                reason: "r".into(),
                policy_version: None,
            }
            .to_payload(),
            None,
        )
    };
    let first = revoke(&mut run);
    book.apply(&first).expect("first revocation");
    let second = revoke(&mut run);
    assert!(matches!(
        *book.apply(&second).expect_err("twice").problem,
        BookProblem::GrantNotLive {
            status: "revoked",
            ..
        }
    ));
    // And a use after the revocation.
    let e = use_event(&mut run, &grant, "fs.write", path("src/lib.rs"));
    assert!(matches!(
        *book.apply(&e).expect_err("revoked").problem,
        BookProblem::UseRefused(GrantRefusal::Revoked { .. })
    ));
}

#[test]
fn replaying_the_same_events_rebuilds_the_same_book() {
    let mut run = TestRun::executing("run-1");
    let mut live = GrantBook::new(run.id());
    let mut other = TestRun::executing("run-2");
    let mut grants = Vec::new();
    for (i, (target, scope_text)) in [
        ("src/a.rs", "fs.write:src"),
        ("src/b.rs", "fs.write:src:b.rs"),
        ("docs/c.md", "fs.write"),
    ]
    .into_iter()
    .enumerate()
    {
        let request = run.request("coder", "fs.write", target);
        let p = granted(
            "fs.write",
            path(target),
            scope_text,
            3,
            at(60 + i as i64),
            request,
        );
        let e = run.grant(&p);
        live.apply(&e).expect("grant");
        grants.push((e.id(), path(target)));
    }
    for (grant, target) in &grants {
        live.check_use(grant, &run.id(), "fs.write", target, run.now(), run.state())
            .expect("use allowed");
        let e = use_event(&mut run, grant, "fs.write", target.clone());
        live.apply(&e).expect("use");
    }
    let e = run.runtime(
        EventType::CapabilityRevoked,
        CapabilityRevokedPayload {
            grant: grants[1].0.clone(),
            reason: "operator".into(),
            policy_version: None,
        }
        .to_payload(),
        None,
    );
    live.apply(&e).expect("revoke");
    // Another run's events interleaved in the log are ignored.
    let r = other.request("coder", "fs.write", "x");
    let foreign = other.grant(&granted("fs.write", path("x"), "fs.write", 1, at(60), r));
    live.apply(&foreign).expect("ignored");

    let mut log = run.events.clone();
    log.push(foreign);
    let once = fold(&run.id(), &log);
    let twice = fold(&run.id(), &log);
    assert_eq!(once, twice);
    assert_eq!(once, live);
    assert_eq!(once.iter().count(), 3);
    assert_eq!(once.get(&grants[0].0).map(|g| g.uses), Some(1));
}

/// A change to a payload object.
type Edit = dyn Fn(&mut serde_json::Map<String, serde_json::Value>);

#[test]
fn payloads_round_trip_and_contract_breaches_are_refused() {
    let mut run = TestRun::executing("run-1");
    let request = run.request("coder", "fs.write", "src/lib.rs");
    let p = granted(
        "fs.write",
        path("src/lib.rs"),
        "fs.write:src",
        1,
        at(60),
        request,
    );
    let e = run.grant(&p);
    assert_eq!(CapabilityGrantedPayload::from_event(&e), Ok(p.clone()));
    assert_eq!(
        e.authority.as_deref(),
        Some(format!("policy:{}", "01".repeat(32)).as_str())
    );
    assert_eq!(
        e.payload["resource"],
        json!({"kind": "path", "id": "src/lib.rs"})
    );
    assert_eq!(e.payload["scope"], json!("fs.write:src"));
    assert_eq!(e.payload["policy_version"], json!("01".repeat(32)));
    assert_eq!(e.payload["effect"], json!("internal-write"));
    assert!(!e.payload.contains_key("approval"));

    assert!(matches!(
        CapabilityUsedPayload::from_event(&e),
        Err(PayloadError::WrongType { .. })
    ));
    let breach = |edit: &Edit| {
        let mut payload = p.to_payload();
        edit(&mut payload);
        CapabilityGrantedPayload::from_payload(&payload).expect_err("breach refused")
    };
    let cases: Vec<(&str, Box<Edit>)> = vec![
        (
            "unknown field",
            Box::new(|m| {
                m.insert("extra".into(), json!(1));
            }),
        ),
        (
            "missing field",
            Box::new(|m| {
                m.remove("expires_at");
            }),
        ),
        (
            "scope not covering",
            Box::new(|m| {
                m.insert("scope".into(), json!("fs.write:docs"));
            }),
        ),
        (
            "scope of another capability",
            Box::new(|m| {
                m.insert("scope".into(), json!("fs.read:src"));
            }),
        ),
        (
            "zero uses",
            Box::new(|m| {
                m.insert("max_uses".into(), json!(0));
            }),
        ),
        (
            "bad kind",
            Box::new(|m| {
                m.insert("resource".into(), json!({"kind": "file", "id": "a"}));
            }),
        ),
        (
            "escaping path",
            Box::new(|m| {
                m.insert("resource".into(), json!({"kind": "path", "id": "../a"}));
            }),
        ),
        (
            "non-canonical host",
            Box::new(|m| {
                m.insert("capability".into(), json!("http.request"));
                m.insert("scope".into(), json!("http.request"));
                m.insert(
                    "resource".into(),
                    json!({"kind": "host", "id": "API.example.com"}),
                );
            }),
        ),
        (
            "bad effect",
            Box::new(|m| {
                m.insert("effect".into(), json!("write"));
            }),
        ),
        (
            "bad agent",
            Box::new(|m| {
                m.insert("agent".into(), json!("a b"));
            }),
        ),
        (
            "bad time",
            Box::new(|m| {
                m.insert("expires_at".into(), json!("tomorrow"));
            }),
        ),
        (
            "bad version",
            Box::new(|m| {
                m.insert("policy_version".into(), json!("sha256:00"));
            }),
        ),
    ];
    for (name, edit) in cases {
        let err = breach(edit.as_ref());
        assert!(
            err.to_string().starts_with("CapabilityGranted payload: "),
            "{name}: {err}"
        );
    }
}

#[test]
fn scopes_follow_the_table() {
    let cases = [
        ("fs.write", path("src/lib.rs"), "fs.write:src:lib.rs"),
        ("fs.list", Resource::dir("src").expect("dir"), "fs.list:src"),
        ("fs.list", Resource::dir(".").expect("dir"), "fs.list"),
        (
            "http.request",
            Resource::host("API.Example.com.").expect("host"),
            "http.request:api.example.com",
        ),
        (
            "mcp.call",
            Resource::tool("github", "create_issue").expect("tool"),
            "mcp.call:github:create_issue",
        ),
        (
            "process.exec",
            Resource::command("cargo").expect("command"),
            "process.exec:cargo",
        ),
        (
            "process.exec",
            Resource::command("C:\\bin\\x.exe").expect("command"),
            "process.exec:C%3A\\bin\\x.exe",
        ),
    ];
    for (capability, resource, text) in cases {
        let s = Scope::for_target(capability, &resource).expect("scope");
        assert_eq!(s.to_string(), text);
        assert_eq!(Scope::parse(text), Ok(s));
    }
    let host = Scope::parse("http.request:example.com").expect("scope");
    let sub = Scope::for_target(
        "http.request",
        &Resource::host("api.example.com").expect("h"),
    )
    .expect("scope");
    assert!(!host.covers(&sub), "dots are not separators");
    let bare = Scope::parse("fs.write").expect("scope");
    assert!(bare.covers(&scope("fs.write:anything:at:all")));
    assert!(!bare.covers(&scope("fs.read:a")));
    assert!(!bare.covers(&scope("fs.writer:a")));
    assert!(scope("mcp.call:github").covers(&scope("mcp.call:github:create_issue")));
    assert!(!scope("mcp.call:git").covers(&scope("mcp.call:github:create_issue")));
}

fn segment() -> impl Strategy<Value = String> {
    // Characters that matter to the text form, and ordinary ones.
    proptest::collection::vec(
        prop_oneof![Just(':'), Just('%'), Just('a'), Just('b'), Just('.')],
        1..5,
    )
    .prop_map(|cs| cs.into_iter().collect())
}

proptest! {
    /// `covers` is exactly "same capability and the segments are a prefix", whatever the
    /// segments hold, and the text form round-trips.
    #[test]
    fn covers_is_a_whole_segment_prefix(
        cap_a in prop_oneof![Just("fs.write"), Just("fs.read")],
        cap_b in prop_oneof![Just("fs.write"), Just("fs.read")],
        a in proptest::collection::vec(segment(), 0..4),
        b in proptest::collection::vec(segment(), 0..4),
    ) {
        let target_a = Resource::path(&a.join("/")).ok();
        let target_b = Resource::path(&b.join("/")).ok();
        // Build scopes through the text form, escaping as documented.
        let text = |cap: &str, segs: &[String]| {
            let mut t = cap.to_string();
            for s in segs {
                t.push(':');
                t.push_str(&s.replace('%', "%25").replace(':', "%3A"));
            }
            t
        };
        let sa = Scope::parse(&text(cap_a, &a)).expect("scope a");
        let sb = Scope::parse(&text(cap_b, &b)).expect("scope b");
        prop_assert_eq!(sa.segments(), &a[..]);
        prop_assert_eq!(Scope::parse(&sa.to_string()), Ok(sa.clone()));
        prop_assert_eq!(sa.covers(&sb), cap_a == cap_b && b.starts_with(&a));
        // A scope built from a path target agrees with the one built from the text.
        if let (Some(ta), false) = (target_a, a.is_empty()) {
            prop_assert_eq!(Scope::for_target(cap_a, &ta).expect("target"), sa.clone());
        }
        if let (Some(tb), false) = (target_b, b.is_empty()) {
            prop_assert_eq!(Scope::for_target(cap_b, &tb).expect("target"), sb);
        }
    }
}

/// `check_new_use` checks a grant about to be recorded exactly as `check_use` checks it once its
/// `CapabilityGranted` is folded: the same authorization, the same refusals.
#[test]
fn a_grant_about_to_be_recorded_is_checked_as_it_will_be_folded() {
    type Case = (
        &'static str,
        &'static str,
        u64,
        &'static str,
        &'static str,
        i64,
    );
    let cases: [Case; 6] = [
        // scope, capability asked, max uses, target, run state, now (s)
        ("fs.write:src", "fs.write", 1, "src/lib.rs", "executing", 1),
        ("fs.write:src", "fs.write", 1, "srcx/lib.rs", "executing", 1),
        ("fs.write:src", "fs.read", 1, "src/lib.rs", "executing", 1),
        ("fs.write:src", "fs.write", 1, "src/lib.rs", "executing", 60),
        (
            "fs.write:src:lib.rs",
            "fs.write",
            2,
            "src/lib.rs",
            "suspended",
            1,
        ),
        ("fs.write", "fs.write", 3, "a/b/c.rs", "executing", 59),
    ];
    for (scope_text, capability, uses, target, state, now) in cases {
        let mut run = TestRun::executing("run-new");
        let request = run.request("coder", "fs.write", target);
        // The run's state as the caller reports it (the kernel records no grant while the run
        // is suspended, so the state is passed, not made).
        let state_now = if state == "suspended" {
            RunState::Suspended
        } else {
            run.state()
        };
        // The grant is for the file its scope names (or src/lib.rs); the use asks for `target`.
        let granted_path = scope_text
            .strip_prefix("fs.write:")
            .filter(|s| s.contains(':'))
            .map_or("src/lib.rs".to_string(), |s| s.replace(':', "/"));
        let payload = granted(
            "fs.write",
            path(&granted_path),
            scope_text,
            uses,
            at(60),
            request,
        );
        let before = fold(&run.id(), &run.events);
        let id = EventId::new(run.id(), run.head.next_seq);
        let ahead = before.check_new_use(
            &id,
            &payload,
            &run.id(),
            capability,
            &path(target),
            at(now),
            state_now,
        );
        // The same grant recorded and folded, then checked.
        let recorded = run.seal(
            ice_kernel::Draft::new(
                EventType::CapabilityGranted.name(),
                ice_kernel::Origin::Runtime,
            )
            .intent("grant")
            .authority(payload.authority())
            .payload(serde_json::Value::Object(payload.to_payload())),
        );
        assert_eq!(recorded.id(), id);
        let after = fold(&run.id(), &run.events);
        let folded = after.check_use(
            &id,
            &run.id(),
            capability,
            &path(target),
            at(now),
            state_now,
        );
        assert_eq!(
            ahead, folded,
            "{scope_text} {capability} {target} {state} {now}"
        );
    }
    // An id the book already holds, or of another run, is not a new grant.
    let (run, book, grant) = run_with_grant("run-1", "fs.write:src", 5);
    let payload = granted(
        "fs.write",
        path("src/lib.rs"),
        "fs.write:src",
        5,
        at(60),
        run.events[3].id(),
    );
    let held = book.check_new_use(
        &grant,
        &payload,
        &run.id(),
        "fs.write",
        &path("src/lib.rs"),
        at(1),
        run.state(),
    );
    assert_eq!(held.map_err(|r| r.code()), Err(DenialCode::GrantUnknown));
    let other = EventId::new(run_id("run-2"), 9);
    let foreign = book.check_new_use(
        &other,
        &payload,
        &run.id(),
        "fs.write",
        &path("src/lib.rs"),
        at(1),
        run.state(),
    );
    assert_eq!(
        foreign.map_err(|r| r.code()),
        Err(DenialCode::GrantWrongRun)
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// However grants are made, used, revoked and expired, what a use can find (`live`) and
    /// what falls due (`due_to_expire`) are exactly the book's grants that the definitions
    /// name, in the order they were made: the book's indexes never drift from its grants.
    #[test]
    fn the_live_and_due_grants_are_exactly_those_the_definitions_name(
        steps in proptest::collection::vec((0u8..4, 0usize..8, 1u64..4, 1i64..40), 1..40),
        probes in proptest::collection::vec(0i64..50, 1..6),
    ) {
        let mut run = TestRun::executing("run-1");
        let mut book = GrantBook::new(run.id());
        let mut made: Vec<EventId> = Vec::new();
        for (op, pick, uses, expires) in steps {
            let chosen = (!made.is_empty()).then(|| made[pick % made.len()].clone());
            match (op, chosen) {
                (0, _) | (_, None) => {
                    let request = run.request("coder", "fs.write", "src/a.rs");
                    let p = granted("fs.write", path("src/a.rs"), "fs.write:src", uses, at(expires), request);
                    let e = run.grant(&p);
                    book.apply(&e).expect("grant");
                    made.push(e.id());
                }
                (1, Some(g)) => {
                    // A use is recorded only once checked (before the run's clock passes the
                    // grant's expiry in this test: uses are checked at `at(0)`).
                    if book.check_use(&g, &run.id(), "fs.write", &path("src/a.rs"), at(0), run.state()).is_ok() {
                        let e = use_event(&mut run, &g, "fs.write", path("src/a.rs"));
                        book.apply(&e).expect("use");
                    }
                }
                (kind, Some(g)) => {
                    if book.get(&g).map(|x| &x.status) == Some(&GrantStatus::Live) {
                        let e = if kind == 2 {
                            run.runtime(
                                EventType::CapabilityRevoked,
                                CapabilityRevokedPayload { grant: g.clone(), reason: "r".into(), policy_version: None }.to_payload(),
                                None,
                            )
                        } else {
                            run.runtime(
                                EventType::CapabilityExpired,
                                CapabilityExpiredPayload { grant: g.clone() }.to_payload(),
                                None,
                            )
                        };
                        book.apply(&e).expect("end");
                    }
                }
            }
            for &t in &probes {
                let now = at(t);
                let live: Vec<EventId> = book.live(now).map(|g| g.id.clone()).collect();
                let want: Vec<EventId> = book.iter().filter(|g| g.is_live(now)).map(|g| g.id.clone()).collect();
                prop_assert_eq!(live, want);
                let due: Vec<EventId> = book.due_to_expire(now).map(|g| g.id.clone()).collect();
                let want: Vec<EventId> = book
                    .iter()
                    .filter(|g| g.status == GrantStatus::Live && now >= g.expires_at)
                    .map(|g| g.id.clone())
                    .collect();
                prop_assert_eq!(due, want);
            }
        }
        // And a fold of the same events builds the same book, indexes included.
        prop_assert_eq!(fold(&run.id(), &run.events), book);
    }
}
