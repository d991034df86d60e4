//! Approvals bind to the digest of one exact request (run, capability, resource, arguments,
//! policy version), are single-use, expire, and are re-checked at use: an approval for one call
//! never authorises another.

mod common;

use common::*;
use ice_authority::{
    ApprovalBook, ApprovalDeniedPayload, ApprovalGrantedPayload, ApprovalRefusal,
    ApprovalRequestedPayload, ApprovalStatus, BookProblem, CapabilityGrantedPayload, DenialCode,
    EffectClass, GrantBook, Resource, request_digest,
};
use ice_kernel::{Digest, Event, EventId, EventType, RunState, Timestamp};
use serde_json::{Value, json};

struct Setup {
    run: TestRun,
    book: ApprovalBook,
    approval: EventId,
    resource: Resource,
    arguments: Value,
    digest: Digest,
}

fn tool() -> Resource {
    Resource::tool("github", "create_issue").expect("tool")
}

fn requested_payload(
    run: &TestRun,
    arguments: &Value,
    request: EventId,
    expires_at: Timestamp,
) -> ApprovalRequestedPayload {
    let resource = tool();
    ApprovalRequestedPayload {
        digest: request_digest(&run.id(), "mcp.call", &resource, arguments, &version(1)),
        capability: "mcp.call".into(),
        resource,
        arguments: arguments.as_object().cloned().unwrap_or_default(),
        agent: "coder".into(),
        policy_version: version(1),
        policies: vec!["base.cedar#2".into()],
        expires_at,
        request,
    }
}

/// A run with one pending approval for `mcp.call` on github/create_issue, expiring at `at(300)`.
fn requested(id: &str) -> Setup {
    let mut run = TestRun::executing(id);
    let request = run.request("coder", "mcp.call", "github/create_issue");
    let arguments = json!({ "title": "parser crash", "labels": ["bug", "p1"] });
    let payload = requested_payload(&run, &arguments, request, at(300));
    let e = run.runtime(EventType::ApprovalRequested, payload.to_payload(), None);
    let book = fold(&run);
    Setup {
        approval: e.id(),
        resource: payload.resource,
        digest: payload.digest,
        arguments,
        run,
        book,
    }
}

fn fold(run: &TestRun) -> ApprovalBook {
    let mut book = ApprovalBook::new(run.id());
    for e in &run.events {
        book.apply(e)
            .unwrap_or_else(|err| panic!("fold refused {}: {err}", e.id()));
    }
    book
}

fn operator_grants(run: &mut TestRun, approval: &EventId, digest: Digest) -> Event {
    let payload = ApprovalGrantedPayload {
        approval: approval.clone(),
        digest,
    };
    run.operator(EventType::ApprovalGranted, payload.to_payload())
}

fn operator_denies(run: &mut TestRun, approval: &EventId, reason: &str) -> Event {
    let payload = ApprovalDeniedPayload {
        approval: approval.clone(),
        reason: reason.into(),
    };
    run.operator(EventType::ApprovalDenied, payload.to_payload())
}

/// The runtime grants the capability on the strength of the approval.
fn grant_with(run: &mut TestRun, approval: &EventId, resource: Resource) -> Event {
    let request = run.request("coder", "mcp.call", &resource.entity_id());
    let mut payload = granted(
        "mcp.call",
        resource.clone(),
        &ice_authority::Scope::for_target("mcp.call", &resource)
            .expect("scope")
            .to_string(),
        1,
        at(300),
        request,
    );
    payload.effect = EffectClass::External;
    payload.approval = Some(approval.clone());
    run.grant(&payload)
}

fn refusal(s: &Setup, digest: &Digest, now: Timestamp) -> ApprovalRefusal {
    s.book
        .authorize(&s.approval, digest, now)
        .expect_err("expected a refusal")
}

#[test]
fn a_pending_approval_authorises_nothing_and_is_listed() {
    let s = requested("run-1");
    let r = refusal(&s, &s.digest, at(1));
    assert_eq!(
        r,
        ApprovalRefusal::Pending {
            approval: s.approval.clone()
        }
    );
    assert_eq!(r.code(), DenialCode::ApprovalTimeout);
    let pending: Vec<_> = s.book.pending(at(1)).map(|a| a.id.clone()).collect();
    assert_eq!(pending, std::slice::from_ref(&s.approval));
    assert_eq!(
        s.book.pending(at(300)).count(),
        0,
        "expired requests are not pending"
    );
    let a = s.book.get(&s.approval).expect("approval");
    assert_eq!(a.agent, "coder");
    assert_eq!(a.policies, ["base.cedar#2"]);
    assert_eq!(a.requested_at, s.run.events[4].at);
}

#[test]
fn an_approval_authorises_exactly_its_request() {
    let mut s = requested("run-1");
    // The CLI refuses to record a grant of another digest.
    let other = Digest::of(b"something else");
    assert_eq!(
        s.book.check_grant(&s.approval, &other),
        Err(ApprovalRefusal::Mismatch {
            approval: s.approval.clone(),
            expected: s.digest,
            got: other
        })
    );
    assert_eq!(s.book.check_grant(&s.approval, &s.digest), Ok(()));
    let e = operator_grants(&mut s.run, &s.approval, s.digest);
    s.book.apply(&e).expect("grant folds");
    assert_eq!(s.book.pending(at(1)).count(), 0);
    assert_eq!(s.book.authorize(&s.approval, &s.digest, at(1)), Ok(()));
    assert_eq!(
        s.book
            .check_grant(&s.approval, &s.digest)
            .map_err(|r| r.code()),
        Err(DenialCode::ApprovalUsed),
        "granted once"
    );

    // The same arguments in another key order are the same request.
    let reordered: Value =
        serde_json::from_str(r#"{"labels": ["bug", "p1"], "title": "parser crash"}"#)
            .expect("json");
    let same = request_digest(
        &s.run.id(),
        "mcp.call",
        &s.resource,
        &reordered,
        &version(1),
    );
    assert_eq!(same, s.digest);
    assert_eq!(s.book.authorize(&s.approval, &same, at(1)), Ok(()));

    // Any other call gives another digest, which the approval does not authorise.
    let other_run = run_id("run-2");
    let other_tool = Resource::tool("github", "delete_repo").expect("tool");
    let calls = [
        (
            "other arguments",
            request_digest(
                &s.run.id(),
                "mcp.call",
                &s.resource,
                &json!({ "title": "parser crash", "labels": ["bug"] }),
                &version(1),
            ),
        ),
        (
            "other run",
            request_digest(
                &other_run,
                "mcp.call",
                &s.resource,
                &s.arguments,
                &version(1),
            ),
        ),
        (
            "other resource",
            request_digest(
                &s.run.id(),
                "mcp.call",
                &other_tool,
                &s.arguments,
                &version(1),
            ),
        ),
        (
            "other capability",
            request_digest(
                &s.run.id(),
                "mcp.list",
                &s.resource,
                &s.arguments,
                &version(1),
            ),
        ),
        (
            "other policy version",
            request_digest(
                &s.run.id(),
                "mcp.call",
                &s.resource,
                &s.arguments,
                &version(2),
            ),
        ),
    ];
    for (name, digest) in calls {
        assert_ne!(digest, s.digest, "{name}");
        let r = refusal(&s, &digest, at(1));
        assert_eq!(
            r,
            ApprovalRefusal::Mismatch {
                approval: s.approval.clone(),
                expected: s.digest,
                got: digest
            },
            "{name}"
        );
        assert_eq!(r.code(), DenialCode::ApprovalMismatch);
    }
}

#[test]
fn an_approval_is_single_use() {
    let mut s = requested("run-1");
    let e = operator_grants(&mut s.run, &s.approval, s.digest);
    s.book.apply(&e).expect("grant folds");
    let grant = grant_with(&mut s.run, &s.approval, s.resource.clone());
    assert_eq!(
        grant.authority.as_deref(),
        Some(s.approval.to_string().as_str())
    );
    s.book.apply(&grant).expect("the grant uses the approval");
    let r = refusal(&s, &s.digest, at(1));
    assert_eq!(
        r,
        ApprovalRefusal::Used {
            approval: s.approval.clone(),
            grant: grant.id()
        }
    );
    assert_eq!(r.code(), DenialCode::ApprovalUsed);
    assert_eq!(
        s.book
            .check_grant(&s.approval, &s.digest)
            .map_err(|r| r.code()),
        Err(DenialCode::ApprovalUsed)
    );
    // A second grant citing the used approval is not a fold the book accepts.
    let again = grant_with(&mut s.run, &s.approval, s.resource.clone());
    let before = s.book.clone();
    assert!(matches!(
        *s.book.apply(&again).expect_err("used").problem,
        BookProblem::ApprovalNotGranted { ref status, .. } if status == "used"
    ));
    assert_eq!(s.book, before);

    // The grant itself is an ordinary grant, authorised by the approval.
    let mut grants = GrantBook::new(s.run.id());
    for e in &s.run.events[..s.run.events.len() - 2] {
        grants.apply(e).expect("grant book folds");
    }
    let auth = grants
        .check_use(
            &grant.id(),
            &s.run.id(),
            "mcp.call",
            &s.resource,
            at(1),
            RunState::Executing,
        )
        .expect("use");
    assert_eq!(auth.effect(), EffectClass::External);
}

#[test]
fn an_expired_approval_authorises_nothing() {
    let mut s = requested("run-1");
    let e = operator_grants(&mut s.run, &s.approval, s.digest);
    s.book.apply(&e).expect("grant folds");
    let just_before = Timestamp::from_unix_us(at(300).unix_us() - 1).expect("time");
    assert_eq!(
        s.book.authorize(&s.approval, &s.digest, just_before),
        Ok(())
    );
    for now in [at(300), at(301), at(86_400)] {
        let r = refusal(&s, &s.digest, now);
        assert_eq!(
            r,
            ApprovalRefusal::Expired {
                approval: s.approval.clone(),
                expires_at: at(300),
                now
            }
        );
        assert_eq!(r.code(), DenialCode::ApprovalExpired);
    }
}

#[test]
fn a_denied_approval_authorises_nothing() {
    let mut s = requested("run-1");
    let e = operator_denies(&mut s.run, &s.approval, "not on a Friday");
    s.book.apply(&e).expect("denial folds");
    let r = refusal(&s, &s.digest, at(1));
    assert_eq!(r.code(), DenialCode::ApprovalDenied);
    assert_eq!(
        r.to_string(),
        format!("approval {} was denied: not on a Friday", s.approval)
    );
    assert_eq!(
        s.book
            .check_grant(&s.approval, &s.digest)
            .map_err(|r| r.code()),
        Err(DenialCode::ApprovalDenied)
    );
    // A request has one answer: a grant recorded after the denial (the runtime never records
    // one) is refused by the fold, and the book is unchanged.
    let e = operator_grants(&mut s.run, &s.approval, s.digest);
    let err = s.book.apply(&e).expect_err("a second answer");
    assert!(
        matches!(
            &*err.problem,
            BookProblem::ApprovalAnswered { approval, status }
                if *approval == s.approval && status == "denied"
        ),
        "{err}"
    );
    assert_eq!(
        refusal(&s, &s.digest, at(1)).code(),
        DenialCode::ApprovalDenied
    );

    // Nor does a denial after a grant withdraw it: the operator answered once.
    let mut s = requested("run-2");
    let e = operator_grants(&mut s.run, &s.approval, s.digest);
    s.book.apply(&e).expect("grant folds");
    let e = operator_denies(&mut s.run, &s.approval, "changed my mind");
    let err = s.book.apply(&e).expect_err("a second answer");
    assert!(
        err.to_string()
            .contains("which is already granted: a request has one answer"),
        "{err}"
    );
    assert_eq!(s.book.authorize(&s.approval, &s.digest, at(1)), Ok(()));

    // Nor is a used approval answered again.
    let e = grant_with(&mut s.run, &s.approval, s.resource.clone());
    s.book.apply(&e).expect("the grant uses it");
    let e = operator_denies(&mut s.run, &s.approval, "too late");
    let err = s.book.apply(&e).expect_err("an answer after use");
    assert!(err.to_string().contains("already used"), "{err}");
}

#[test]
fn a_grant_of_another_digest_is_recorded_as_a_mismatch_and_authorises_nothing() {
    let mut s = requested("run-1");
    let wrong = Digest::of(b"what the operator saw was different");
    let e = operator_grants(&mut s.run, &s.approval, wrong);
    s.book
        .apply(&e)
        .expect("the log holds it; the fold records it");
    assert!(matches!(
        &s.book.get(&s.approval).expect("approval").status,
        ApprovalStatus::Mismatch { digest, .. } if *digest == wrong
    ));
    let r = refusal(&s, &s.digest, at(1));
    assert_eq!(
        r,
        ApprovalRefusal::Mismatch {
            approval: s.approval.clone(),
            expected: s.digest,
            got: wrong
        }
    );
    // A capability grant citing it is refused by the fold.
    let e = grant_with(&mut s.run, &s.approval, s.resource.clone());
    assert!(matches!(
        *s.book.apply(&e).expect_err("not granted").problem,
        BookProblem::ApprovalNotGranted { .. }
    ));
    // It was the operator's one answer: granting the right digest now is refused up front
    // and by the fold; the agent must ask again (a new request).
    assert_eq!(
        s.book.check_grant(&s.approval, &s.digest),
        Err(ApprovalRefusal::Mismatch {
            approval: s.approval.clone(),
            expected: s.digest,
            got: wrong
        })
    );
    let e = operator_grants(&mut s.run, &s.approval, s.digest);
    assert!(matches!(
        *s.book.apply(&e).expect_err("a second answer").problem,
        BookProblem::ApprovalAnswered { .. }
    ));
    assert_eq!(
        s.book
            .authorize(&s.approval, &s.digest, at(1))
            .map_err(|r| r.code()),
        Err(DenialCode::ApprovalMismatch)
    );
}

#[test]
fn approvals_of_another_run_or_never_requested_authorise_nothing() {
    let mut a = requested("run-a");
    let e = operator_grants(&mut a.run, &a.approval, a.digest);
    a.book.apply(&e).expect("grant folds");
    let b = requested("run-b");
    // Run B presents run A's approval for the same call made in run B.
    let digest_b = request_digest(
        &b.run.id(),
        "mcp.call",
        &a.resource,
        &a.arguments,
        &version(1),
    );
    let r = b
        .book
        .authorize(&a.approval, &digest_b, at(1))
        .expect_err("another run's approval");
    assert_eq!(
        r,
        ApprovalRefusal::WrongRun {
            approval: a.approval.clone(),
            run: b.run.id()
        }
    );
    assert_eq!(r.code(), DenialCode::ApprovalMismatch);
    // Or asks run A's book with run B's digest.
    assert_eq!(
        a.book
            .authorize(&a.approval, &digest_b, at(1))
            .map_err(|r| r.code()),
        Err(DenialCode::ApprovalMismatch)
    );
    // An event of the run that is not an approval request.
    let not_an_approval = EventId::new(a.run.id(), 3);
    assert_eq!(
        a.book.authorize(&not_an_approval, &a.digest, at(1)),
        Err(ApprovalRefusal::Unknown {
            approval: not_an_approval.clone()
        })
    );
    assert!(matches!(
        a.book.check_grant(&not_an_approval, &a.digest),
        Err(ApprovalRefusal::Unknown { .. })
    ));
}

#[test]
fn the_fold_refuses_inconsistent_events_and_changes_nothing() {
    let mut s = requested("run-1");
    let before = s.book.clone();

    // A request whose digest is not that of its own fields.
    let request = s.run.request("coder", "mcp.call", "github/create_issue");
    let mut p = requested_payload(&s.run, &json!({ "title": "x" }), request, at(300));
    let honest = p.digest;
    p.digest = Digest::of(b"not this request");
    let e = s
        .run
        .runtime(EventType::ApprovalRequested, p.to_payload(), None);
    let err = s.book.apply(&e).expect_err("digest");
    assert_eq!(err.event, e.id());
    assert_eq!(
        *err.problem,
        BookProblem::RequestDigest {
            recorded: p.digest,
            computed: honest
        }
    );

    // A decision on an approval never requested.
    let ghost = EventId::new(s.run.id(), 2);
    let e = operator_grants(&mut s.run, &ghost, s.digest);
    assert_eq!(
        *s.book.apply(&e).expect_err("unknown").problem,
        BookProblem::UnknownApproval(ghost.clone())
    );
    let e = operator_denies(&mut s.run, &ghost, "no");
    assert_eq!(
        *s.book.apply(&e).expect_err("unknown").problem,
        BookProblem::UnknownApproval(ghost)
    );

    // A capability grant citing a pending approval.
    let e = grant_with(&mut s.run, &s.approval, s.resource.clone());
    assert!(matches!(
        *s.book.apply(&e).expect_err("pending").problem,
        BookProblem::ApprovalNotGranted { ref status, .. } if status == "pending"
    ));
    assert_eq!(s.book, before);

    // A capability grant citing an approval of another call.
    let e = operator_grants(&mut s.run, &s.approval, s.digest);
    s.book.apply(&e).expect("grant folds");
    let granted_once = s.book.clone();
    let other = Resource::tool("github", "delete_repo").expect("tool");
    let e = grant_with(&mut s.run, &s.approval, other);
    assert!(matches!(
        *s.book.apply(&e).expect_err("other call").problem,
        BookProblem::ApprovalOtherCall { .. }
    ));
    assert_eq!(s.book, granted_once);
}

#[test]
fn replaying_the_same_events_rebuilds_the_same_book() {
    let mut run = TestRun::executing("run-1");
    let mut live = ApprovalBook::new(run.id());
    let mut ids = Vec::new();
    for i in 0..4 {
        let request = run.request("coder", "mcp.call", "github/create_issue");
        let p = requested_payload(&run, &json!({ "n": i }), request, at(300));
        let e = run.runtime(EventType::ApprovalRequested, p.to_payload(), None);
        live.apply(&e).expect("request");
        ids.push((e.id(), p.digest));
    }
    for e in [
        operator_grants(&mut run, &ids[0].0, ids[0].1),
        operator_grants(&mut run, &ids[1].0, ids[1].1),
        operator_denies(&mut run, &ids[2].0, "no"),
        operator_grants(&mut run, &ids[3].0, Digest::of(b"wrong")),
    ] {
        live.apply(&e).expect("decision");
    }
    let e = grant_with(&mut run, &ids[1].0, tool());
    live.apply(&e).expect("use");
    let once = fold(&run);
    assert_eq!(once, fold(&run));
    assert_eq!(once, live);
    let statuses: Vec<_> = once
        .iter()
        .map(|a| match a.status {
            ApprovalStatus::Pending => "pending",
            ApprovalStatus::Granted { .. } => "granted",
            ApprovalStatus::Mismatch { .. } => "mismatch",
            ApprovalStatus::Denied { .. } => "denied",
            ApprovalStatus::Used { .. } => "used",
        })
        .collect();
    assert_eq!(statuses, ["granted", "used", "denied", "mismatch"]);
}

#[test]
fn the_request_digest_is_sha256_of_the_documented_canonical_object() {
    let run = run_id("run-1");
    let digest = request_digest(
        &run,
        "mcp.call",
        &tool(),
        &json!({ "title": "bug", "n": 1.0 }),
        &version(1),
    );
    let expected = format!(
        concat!(
            r#"{{"arguments":{{"n":1,"title":"bug"}},"capability":"mcp.call","#,
            r#""policy_version":"{}","resource":{{"id":"github/create_issue","kind":"tool"}},"#,
            r#""run":"run-1","v":"ice-approval-request-v1"}}"#
        ),
        "01".repeat(32)
    );
    assert_eq!(digest, Digest::of(expected.as_bytes()));
}

#[test]
fn large_arguments_moved_to_a_blob_keep_their_approval() {
    let mut run = TestRun::executing("run-1");
    let request = run.request("coder", "mcp.call", "github/create_issue");
    let arguments = json!({ "body": "x".repeat(20_000) });
    let p = requested_payload(&run, &arguments, request, at(300));
    let e = run.runtime(EventType::ApprovalRequested, p.to_payload(), None);
    assert!(
        e.payload["arguments"].get("$blob").is_some(),
        "the kernel moved the arguments to a blob"
    );
    let mut book = fold(&run);
    let e = operator_grants(&mut run, &e.id(), p.digest);
    book.apply(&e).expect("grant folds");
    let approval = EventId::new(run.id(), 4);
    assert_eq!(book.authorize(&approval, &p.digest, at(1)), Ok(()));
    let shorter = request_digest(
        &run.id(),
        "mcp.call",
        &tool(),
        &json!({ "body": "x".repeat(19_999) }),
        &version(1),
    );
    assert_eq!(
        book.authorize(&approval, &shorter, at(1))
            .map_err(|r| r.code()),
        Err(DenialCode::ApprovalMismatch)
    );
}

#[test]
fn approval_payloads_round_trip() {
    let s = requested("run-1");
    let e = &s.run.events[4];
    let p = ApprovalRequestedPayload::from_event(e).expect("parses");
    assert_eq!(p.digest, s.digest);
    assert_eq!(e.payload["digest"], json!(s.digest.to_hex()));
    assert_eq!(
        ApprovalRequestedPayload::from_payload(&p.to_payload()),
        Ok(p)
    );
    let g = ApprovalGrantedPayload {
        approval: s.approval.clone(),
        digest: s.digest,
    };
    assert_eq!(ApprovalGrantedPayload::from_payload(&g.to_payload()), Ok(g));
    let mut bad = ApprovalDeniedPayload {
        approval: s.approval.clone(),
        reason: "no".into(),
    }
    .to_payload();
    bad.insert("reason".into(), json!("  "));
    assert!(ApprovalDeniedPayload::from_payload(&bad).is_err());
    // The grant payload used above is a real one.
    assert!(
        CapabilityGrantedPayload::from_payload(
            &granted(
                "mcp.call",
                tool(),
                "mcp.call:github",
                1,
                at(1),
                s.approval.clone()
            )
            .to_payload()
        )
        .is_ok()
    );
}

/// Why the runtime closed an approval nobody answered is recorded only on an `approval_denied`
/// denial that names the approval, and only as one of the known reasons.
#[test]
fn a_closed_approval_says_why_only_where_it_can() {
    use ice_authority::{ApprovalClosed, CapabilityDeniedPayload};
    let approval = "run-a:3";
    let read = |extra: serde_json::Value| {
        let mut p = serde_json::json!({
            "capability": "fs.write",
            "target": "notes.txt",
            "reason": "approval_denied",
            "detail": "closed",
        });
        for (k, v) in extra.as_object().unwrap() {
            p[k] = v.clone();
        }
        CapabilityDeniedPayload::from_payload(p.as_object().unwrap())
    };
    let ok = read(serde_json::json!({"approval": approval, "closed": "withdrawn"})).unwrap();
    assert_eq!(ok.closed, Some(ApprovalClosed::Withdrawn));
    for kind in ["killed", "interrupted"] {
        read(serde_json::json!({"approval": approval, "closed": kind})).unwrap();
    }
    // An operator's denial, or one recorded before the field existed: no `closed`.
    assert_eq!(
        read(serde_json::json!({"approval": approval}))
            .unwrap()
            .closed,
        None
    );
    for bad in [
        serde_json::json!({"closed": "withdrawn"}),
        serde_json::json!({"approval": approval, "closed": "withdrawn", "reason": "policy_denied"}),
        serde_json::json!({"approval": approval, "closed": "expired"}),
    ] {
        assert!(read(bad.clone()).is_err(), "{bad}");
    }
}
