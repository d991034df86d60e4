//! Governed memory (spec §8), in process, on the embedded log: promotion by rule at commit and
//! by an operator, refusals, the lifecycle, expiry, mounting, the invalidation cascade, and a
//! log that verifies after all of it.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use ice_kernel::{AgentView, Event, EventId, EventType, MountedMemory, RunId};
use ice_runtime::memory::{
    MemoryAction, MemoryBook, MemoryError, MemoryStatus, PromoteRequest, content_digest,
};
use ice_runtime::{Books, RunOutcome};

const READ_HELLO: &str = r#"
[[step]]
intent = "think first"
think = "plan_step"
text = "read the greeting"

[[step]]
intent = "list the workspace"
capability = "fs.list"
target = "."

[[step]]
intent = "read the greeting"
capability = "fs.read"
target = "hello.txt"
"#;

const READ_CONFIG: &str = r#"
[[step]]
intent = "read the config"
capability = "fs.read"
target = "config.toml"
"#;

/// A rule that promotes reads of hello.txt into scope `project`, plus `extra` rule lines.
fn rule(scope: &str, path: &str, extra: &str) -> String {
    format!(
        "[[memory.promote]]\nevent = \"FileRead\"\npath = \"{path}\"\nkind = \"file\"\nscope = \"{scope}\"\nconfidence = 0.75\n{extra}\n"
    )
}

fn memory_events(events: &[Event]) -> Vec<&Event> {
    events
        .iter()
        .filter(|e| e.event_type.starts_with("Memory") && e.event_type != "MemoryMounted")
        .collect()
}

fn mounted(events: &[Event]) -> &Event {
    of_type(events, EventType::MemoryMounted)[0]
}

/// The runtime's memory book (kept between uses and brought up to date from the log), checked
/// to be the book folded from the whole log.
async fn book(h: &H) -> MemoryBook {
    let kept = h.rt.memories().await.unwrap();
    let folded = MemoryBook::load(h.rt.ledger().log().as_ref())
        .await
        .unwrap();
    assert_eq!(*kept, folded, "the kept memory book is the log's");
    folded
}

/// Run a spec and return its report, asserting it committed.
async fn committed(h: &H, id: &str, extra: &str, plan: &str) -> ice_runtime::RunReport {
    let (spec, mut agent) = h.spec(id, "coder", extra, plan);
    let report = h.run(spec, &mut agent).await;
    assert_eq!(report.outcome, RunOutcome::Committed, "{id}: {report:?}");
    report
}

/// What an agent was shown of the memories, at its last proposal.
type Seen = Arc<Mutex<Vec<MountedMemory>>>;

/// An agent that records the memories it was shown.
fn watching(
    h: &H,
    id: &str,
    extra: &str,
    plan: &str,
) -> (
    ice_runtime::RunSpec,
    Hooked<impl FnMut(&AgentView) + Send>,
    Seen,
) {
    let (spec, inner) = h.spec(id, "coder", extra, plan);
    let seen: Seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let agent = Hooked {
        inner,
        hook: move |v: &AgentView| *s.lock().unwrap() = v.memories.clone(),
    };
    (spec, agent, seen)
}

async fn verify(h: &H) {
    let report = ice_log::verify::verify_with(h.rt.ledger().log().as_ref(), None, true, |_| {})
        .await
        .unwrap();
    assert!(report.ok(), "{report:?}");
}

fn request(source: &EventId) -> PromoteRequest {
    PromoteRequest {
        source: source.clone(),
        kind: "fact".into(),
        scope: "ops".into(),
        confidence: 0.5,
        ttl_ms: None,
        reason: "worth keeping".into(),
        operator: "alice".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_promotes_domain_events_at_commit() {
    let h = H::new(POLICY);
    let report = committed(&h, "r1", &rule("project", "hello.txt", ""), READ_HELLO).await;
    let events = h.events("r1").await;
    // Exactly one MemoryPromoted: the read of hello.txt (the listing of "." is not under the
    // rule's path), recorded after RunCommitted and before the teardown.
    let promoted = of_type(&events, EventType::MemoryPromoted);
    assert_eq!(promoted.len(), 1);
    let p = promoted[0];
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    let at = p.run_seq as usize;
    assert_eq!(types[at - 1], "RunCommitted");
    assert_eq!(types[at + 1], "ResourcesReleased");
    let read = of_type(&events, EventType::FileRead)
        .into_iter()
        .find(|e| e.payload.get("path") == Some(&serde_json::json!("hello.txt")))
        .unwrap();
    assert_eq!(p.causes, vec![read.id()]);
    assert_eq!(p.payload["sources"][0], read.id().to_string());
    assert_eq!(p.payload["kind"], "file");
    assert_eq!(p.payload["scope"], "project");
    assert_eq!(p.payload["schema_version"], 1);
    assert_eq!(p.payload["derived_from"].as_array().unwrap().len(), 0);
    assert!(p.payload["content"].get("evidence").is_none());
    assert_eq!(p.payload["content"]["output"]["content"], "hello\n");
    // The book: one active memory, id = the MemoryPromoted event, digest of its content.
    let b = book(&h).await;
    assert_eq!(b.len(), 1);
    let m = b.get(&p.id()).unwrap();
    assert_eq!(m.status, MemoryStatus::Active);
    assert_eq!(m.digest, content_digest(&m.content));
    assert_eq!(m.confidence, 0.75);
    assert_eq!(m.sources, vec![read.id()]);
    assert_eq!(m.source_run.as_str(), "r1");
    assert_eq!(m.expires_at, None);
    // Folding is pure: the same events give the same book, and the run's books replay.
    assert_eq!(MemoryBook::fold(events.iter()).unwrap(), b);
    assert_eq!(
        Books::fold(RunId::new("r1").unwrap(), events.iter()).unwrap(),
        report.books
    );
    verify(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotion_from_an_aborted_run_is_refused() {
    let h = H::new(POLICY);
    // A check that fails: the run aborts, and its rule promotes nothing.
    let extra = format!(
        "{}\n[[check]]\nname = \"fails\"\nrun = [\"false\"]\n",
        rule("project", ".", "")
    );
    let (spec, mut agent) = h.spec("aborted", "coder", &extra, READ_HELLO);
    let report = h.run(spec, &mut agent).await;
    assert!(matches!(report.outcome, RunOutcome::Aborted { .. }));
    let events = h.events("aborted").await;
    assert!(memory_events(&events).is_empty());
    let read = of_type(&events, EventType::FileRead)[1].id();
    let size = h.rt.ledger().log().size().await.unwrap();
    let err = h.rt.promote_memory(&request(&read)).await.unwrap_err();
    match &err {
        MemoryError::NotCommitted { run, detail, .. } => {
            assert_eq!(run.as_str(), "aborted");
            assert!(detail.contains("aborted"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("did not commit"), "{err}");
    // Nothing was written.
    assert_eq!(h.rt.ledger().log().size().await.unwrap(), size);
    assert!(book(&h).await.is_empty());
    verify(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_promote_only_domain_events() {
    let h = H::new(POLICY);
    committed(&h, "r1", "", READ_HELLO).await;
    let events = h.events("r1").await;
    let size = h.rt.ledger().log().size().await.unwrap();
    // A cognitive event (the agent's plan step) is refused, naming its category.
    let thought = of_type(&events, EventType::PlanStepProposed)[0].id();
    let err = h.rt.promote_memory(&request(&thought)).await.unwrap_err();
    assert!(
        matches!(&err, MemoryError::NotDomain { category, .. } if category == "COGNITIVE"),
        "{err:?}"
    );
    assert!(err.to_string().contains("only DOMAIN events"), "{err}");
    // So is a runtime event, and an event that does not exist.
    let committed_ev = of_type(&events, EventType::RunCommitted)[0].id();
    assert!(matches!(
        h.rt.promote_memory(&request(&committed_ev)).await,
        Err(MemoryError::NotDomain { .. })
    ));
    let missing: EventId = "r1:9999".parse().unwrap();
    assert!(matches!(
        h.rt.promote_memory(&request(&missing)).await,
        Err(MemoryError::NoEvent(_))
    ));
    assert_eq!(h.rt.ledger().log().size().await.unwrap(), size);
    // A DOMAIN event of the committed run is promoted, in a maintenance run.
    let read = of_type(&events, EventType::FileRead)[1].id();
    let mut req = request(&read);
    req.ttl_ms = Some(30 * 86_400_000);
    let rep = h.rt.promote_memory(&req).await.unwrap();
    assert!(rep.expires_at.is_some());
    let m_events = h.events(rep.run.as_str()).await;
    let types: Vec<&str> = m_events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(
        types,
        [
            "RunProvisioned",
            "ResourcesAllocated",
            "ContextResolved",
            "MemoryMounted",
            "CapabilitiesBound",
            "ExecutionWindowOpened",
            "MemoryPromoted",
            "ValidationStarted",
            "ValidationPassed",
            "RunCommitted",
            "ResourcesReleased",
            "RunTerminated",
        ]
    );
    assert_eq!(m_events[0].payload["kind"], "memory");
    assert_eq!(m_events[0].payload["operator"], "operator:alice");
    let m = book(&h).await.get(&rep.memory).unwrap().clone();
    assert_eq!(m.promoted_by, "operator:alice");
    assert_eq!(m.reason, "worth keeping");
    assert_eq!(m.sources, vec![read.clone()]);
    // The same event, kind and scope again: refused, it is already that memory.
    let err = h.rt.promote_memory(&req).await.unwrap_err();
    assert!(err.to_string().contains("already active memory"), "{err}");
    verify(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_leaves_active_once() {
    let h = H::new(POLICY);
    committed(&h, "r1", &rule("project", "hello.txt", ""), READ_HELLO).await;
    committed(&h, "r2", &rule("project", "config.toml", ""), READ_CONFIG).await;
    let b = book(&h).await;
    let ids: Vec<EventId> = b.iter().map(|r| r.id.clone()).collect();
    let (a, c) = (ids[0].clone(), ids[1].clone());
    let dep =
        h.rt.transition_memory(&a, MemoryAction::Deprecate, "outdated", "alice")
            .await
            .unwrap();
    assert_eq!(dep.status, "deprecated");
    // A second deprecation or supersession is refused and names the first.
    for action in [
        MemoryAction::Deprecate,
        MemoryAction::Supersede { by: c.clone() },
    ] {
        let err =
            h.rt.transition_memory(&a, action, "again", "bob")
                .await
                .unwrap_err();
        match &err {
            MemoryError::AlreadyTransitioned { event, status, .. } => {
                assert_eq!(event, &dep.memory.event);
                assert_eq!(status, &MemoryStatus::Deprecated);
            }
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains(&dep.memory.event.to_string()));
    }
    // Superseding by a memory that is not active is refused; unknown ids are named.
    let err =
        h.rt.transition_memory(&c, MemoryAction::Supersede { by: a.clone() }, "x", "bob")
            .await
            .unwrap_err();
    assert!(err.to_string().contains("deprecated"), "{err}");
    // Found wrong after it was deprecated: invalidated, once; the deprecation stays in its
    // record.
    let inv =
        h.rt.transition_memory(&a, MemoryAction::Invalidate, "wrong after all", "bob")
            .await
            .unwrap();
    assert_eq!(inv.status, "invalidated");
    let r = book(&h).await.get(&a).unwrap().clone();
    assert_eq!(r.status, MemoryStatus::Invalidated);
    assert_eq!(r.transition.as_ref().unwrap().event, inv.memory.event);
    let earlier = r.earlier.as_ref().unwrap();
    assert_eq!(earlier.status, MemoryStatus::Deprecated);
    assert_eq!(earlier.transition.event, dep.memory.event);
    for action in [MemoryAction::Invalidate, MemoryAction::Deprecate] {
        match h.rt.transition_memory(&a, action, "again", "bob").await {
            Err(MemoryError::AlreadyTransitioned { event, status, .. }) => {
                assert_eq!(event, inv.memory.event);
                assert_eq!(status, MemoryStatus::Invalidated);
            }
            other => panic!("{other:?}"),
        }
    }
    let nobody: EventId = "nope:1".parse().unwrap();
    assert!(matches!(
        h.rt.transition_memory(&nobody, MemoryAction::Deprecate, "x", "bob")
            .await,
        Err(MemoryError::Unknown(_))
    ));
    // Two concurrent exits from active of one memory: exactly one passes; and so for two
    // concurrent invalidations.
    let (x, y) = tokio::join!(
        h.rt.transition_memory(&c, MemoryAction::Deprecate, "outdated", "alice"),
        h.rt.transition_memory(&c, MemoryAction::Deprecate, "old", "bob"),
    );
    assert_eq!(x.is_ok() as u8 + y.is_ok() as u8, 1, "x = {x:?}\ny = {y:?}");
    let err = x.err().or(y.err()).unwrap();
    assert!(
        matches!(err, MemoryError::AlreadyTransitioned { .. }),
        "{err:?}"
    );
    let (x, y) = tokio::join!(
        h.rt.transition_memory(&c, MemoryAction::Invalidate, "wrong", "alice"),
        h.rt.transition_memory(&c, MemoryAction::Invalidate, "false", "bob"),
    );
    assert_eq!(x.is_ok() as u8 + y.is_ok() as u8, 1, "x = {x:?}\ny = {y:?}");
    // Each memory has exactly two transition events in the log: its deprecation and its
    // invalidation.
    let mut transitions = 0;
    for run in all_runs(&h).await {
        transitions += memory_events(&h.events(&run).await)
            .iter()
            .filter(|e| e.event_type != "MemoryPromoted")
            .count();
    }
    assert_eq!(transitions, 4);
    verify(&h).await;
}

async fn all_runs(h: &H) -> Vec<String> {
    h.rt.ledger()
        .log()
        .runs(0, 10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_memory_does_not_mount() {
    let h = H::new(POLICY);
    committed(
        &h,
        "r1",
        &rule("project", "hello.txt", "ttl = \"1ms\""),
        READ_HELLO,
    )
    .await;
    let id = book(&h).await.iter().next().unwrap().id.clone();
    assert!(book(&h).await.get(&id).unwrap().expires_at.is_some());
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let mount = "[memory]\nmount = { scopes = [\"project\"] }\n";
    let (spec, mut agent, seen) = watching(&h, "r2", mount, READ_CONFIG);
    let report = h.run(spec, &mut agent).await;
    assert_eq!(report.outcome, RunOutcome::Committed);
    // Not mounted: the agent saw nothing, MemoryMounted lists it as skipped, expired.
    assert!(seen.lock().unwrap().is_empty());
    let events = h.events("r2").await;
    let m = mounted(&events);
    assert_eq!(m.payload["memories"].as_array().unwrap().len(), 0);
    let skipped = &m.payload["skipped"][0];
    assert_eq!(skipped["id"], id.to_string());
    assert!(skipped["reason"].as_str().unwrap().contains("expired"));
    // Its expiry is an event, recorded once, in a maintenance run.
    let b = book(&h).await;
    let r = b.get(&id).unwrap();
    assert_eq!(r.status, MemoryStatus::Expired);
    let t = r.transition.clone().unwrap();
    assert!(t.event.run_id.as_str().starts_with("memory-expire-"));
    assert!(r.mounted_by.is_empty());
    // A later run does not mount it either, and no second expiry is recorded.
    committed(&h, "r3", mount, READ_CONFIG).await;
    let r3 = h.events("r3").await;
    assert_eq!(
        mounted(&r3).payload["memories"].as_array().unwrap().len(),
        0
    );
    let mut expiries = 0;
    for run in all_runs(&h).await {
        expiries += of_type(&h.events(&run).await, EventType::MemoryExpired).len();
    }
    assert_eq!(expiries, 1);
    // Deprecating an expired memory is refused, naming the expiry; invalidating it is not.
    let err =
        h.rt.transition_memory(&id, MemoryAction::Deprecate, "late", "alice")
            .await
            .unwrap_err();
    assert!(err.to_string().contains(&t.event.to_string()), "{err}");
    h.rt.transition_memory(&id, MemoryAction::Invalidate, "wrong", "alice")
        .await
        .unwrap();
    let r = book(&h).await.get(&id).unwrap().clone();
    assert_eq!(r.status, MemoryStatus::Invalidated);
    assert_eq!(r.earlier.unwrap().transition.event, t.event);
    verify(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_run_mounts_active_memories() {
    let h = H::new(POLICY);
    committed(&h, "r1", &rule("project", "hello.txt", ""), READ_HELLO).await;
    committed(&h, "r0", &rule("other", "config.toml", ""), READ_CONFIG).await;
    let b = book(&h).await;
    let a = b.iter().find(|r| r.scope == "project").unwrap().clone();
    let o = b.iter().find(|r| r.scope == "other").unwrap().clone();
    // By scope (project) and by id (the other one, and one that does not exist).
    let mount = format!(
        "[memory]\nmount = {{ scopes = [\"project\"], ids = [\"{}\", \"ghost:3\"] }}\n",
        o.id
    );
    let (spec, mut agent, seen) = watching(&h, "r2", &mount, READ_CONFIG);
    let report = h.run(spec, &mut agent).await;
    assert_eq!(report.outcome, RunOutcome::Committed);
    let events = h.events("r2").await;
    let m = mounted(&events);
    let listed = m.payload["memories"].as_array().unwrap();
    assert_eq!(listed.len(), 2);
    for (item, r) in listed.iter().zip([&a, &o]) {
        assert_eq!(item["id"], r.id.to_string());
        assert_eq!(item["digest"], r.digest.to_hex());
        assert_eq!(item["kind"], "file");
    }
    assert_eq!(m.payload["skipped"][0]["id"], "ghost:3");
    assert_eq!(m.payload["skipped"][0]["reason"], "no such memory");
    // The agent was shown them, content and all.
    let shown = seen.lock().unwrap().clone();
    assert_eq!(shown.len(), 2);
    assert_eq!(shown[0].id, a.id.to_string());
    assert_eq!(shown[0].content["output"]["content"], "hello\n");
    assert_eq!(shown[0].digest, content_digest(&shown[0].content));
    assert_eq!(shown[0].confidence, 0.75);
    // The book knows who mounted what; the run's books replay from the log.
    let b = book(&h).await;
    assert_eq!(
        b.get(&a.id).unwrap().mounted_by,
        vec![RunId::new("r2").unwrap()]
    );
    assert_eq!(
        Books::fold(RunId::new("r2").unwrap(), events.iter()).unwrap(),
        report.books
    );
    // A deprecated memory no longer mounts: by scope it is left out, by id it is skipped.
    h.rt.transition_memory(&o.id, MemoryAction::Deprecate, "old", "alice")
        .await
        .unwrap();
    let (spec, mut agent, seen) = watching(&h, "r3", &mount, READ_CONFIG);
    h.run(spec, &mut agent).await;
    assert_eq!(seen.lock().unwrap().len(), 1);
    let r3 = h.events("r3").await;
    let skipped = mounted(&r3).payload["skipped"].as_array().unwrap().clone();
    assert!(
        skipped.iter().any(|s| s["id"] == o.id.to_string()
            && s["reason"].as_str().unwrap().starts_with("deprecated")),
        "{skipped:?}"
    );
    verify(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidation_cascades_to_derived_memories() {
    let h = H::new(POLICY);
    // A is promoted from r1.
    committed(&h, "r1", &rule("project", "hello.txt", ""), READ_HELLO).await;
    let a = book(&h).await.iter().next().unwrap().id.clone();
    // r2 mounts A and commits; its rule promotes B from it, so B derives from A.
    let mount = "[memory]\nmount = { scopes = [\"project\"] }\n";
    let extra = format!("{mount}\n{}", rule("derived", "config.toml", ""));
    committed(&h, "r2", &extra, READ_CONFIG).await;
    let b_book = book(&h).await;
    let b = b_book
        .iter()
        .find(|r| r.scope == "derived")
        .unwrap()
        .clone();
    assert_eq!(b.derived_from, vec![a.clone()]);
    assert_eq!(b_book.derived(&a), std::slice::from_ref(&b.id));
    // r3 mounts B (by its scope); C is promoted from r3 by an operator, so C derives from B.
    committed(
        &h,
        "r3",
        "[memory]\nmount = { scopes = [\"derived\"] }\n",
        READ_HELLO,
    )
    .await;
    let read = of_type(&h.events("r3").await, EventType::FileRead)[1].id();
    let c = h.rt.promote_memory(&request(&read)).await.unwrap();
    assert_eq!(c.derived_from, vec![b.id.clone()]);
    // Invalidating A invalidates B and C (transitively), and names the mounting runs.
    let rep =
        h.rt.transition_memory(&a, MemoryAction::Invalidate, "hello.txt was wrong", "alice")
            .await
            .unwrap();
    assert_eq!(rep.status, "invalidated");
    assert_eq!(rep.memory.mounted_by, vec![RunId::new("r2").unwrap()]);
    let cascaded: Vec<&EventId> = rep.cascaded.iter().map(|t| &t.memory).collect();
    assert_eq!(cascaded, vec![&b.id, &c.memory]);
    assert_eq!(rep.cascaded[0].mounted_by, vec![RunId::new("r3").unwrap()]);
    assert_eq!(
        rep.mounting_runs(),
        vec![RunId::new("r2").unwrap(), RunId::new("r3").unwrap()]
    );
    let after = book(&h).await;
    for id in [&a, &b.id, &c.memory] {
        assert_eq!(
            after.get(id).unwrap().status,
            MemoryStatus::Invalidated,
            "{id}"
        );
    }
    let tb = after.get(&b.id).unwrap().transition.clone().unwrap();
    assert_eq!(tb.origin.as_ref(), Some(&a));
    assert!(tb.reason.contains(&a.to_string()), "{}", tb.reason);
    // All in one maintenance run: the root's event causes the cascaded ones.
    let m = h.events(rep.run.as_str()).await;
    let inv = of_type(&m, EventType::MemoryInvalidated);
    assert_eq!(inv.len(), 3);
    assert!(inv[1].causes.contains(&inv[0].id()));
    // An invalidated memory no longer mounts; a run that mounted it can no longer have its
    // facts promoted by an operator.
    let (spec, mut agent, seen) = watching(&h, "r4", mount, READ_CONFIG);
    h.run(spec, &mut agent).await;
    assert!(seen.lock().unwrap().is_empty());
    let r2_read = of_type(&h.events("r2").await, EventType::FileRead)[0].id();
    let err = h.rt.promote_memory(&request(&r2_read)).await.unwrap_err();
    assert!(err.to_string().contains("invalidated"), "{err}");
    verify(&h).await;
}

/// Probe finding (session 20): a memory that had left `active` (deprecated, expired) could not
/// be invalidated, so the memories derived from it stayed active and mountable when it turned
/// out wrong, and facts of runs that had mounted it could still be promoted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_found_wrong_after_it_left_active_takes_what_derived_from_it_along() {
    let h = H::new(POLICY);
    // A (project) from r1, and E (expiring in 1 ms, unrecorded) from r0.
    committed(&h, "r1", &rule("project", "hello.txt", ""), READ_HELLO).await;
    let a = book(&h).await.iter().next().unwrap().id.clone();
    // r2 mounts A; its rules promote B and D from it.
    let mount = "[memory]\nmount = { scopes = [\"project\"] }\n";
    let extra = format!(
        "{mount}\n{}\n{}",
        rule("derived", "config.toml", ""),
        rule("short", "config.toml", "ttl = \"1ms\"")
    );
    committed(&h, "r2", &extra, READ_CONFIG).await;
    let b0 = book(&h).await;
    let of_scope = |scope: &str| b0.iter().find(|r| r.scope == scope).unwrap().id.clone();
    let (b, d) = (of_scope("derived"), of_scope("short"));
    assert_eq!(b0.derived(&a), &[b.clone(), d.clone()]);
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    // A is deprecated (outdated); later it turns out wrong.
    let dep =
        h.rt.transition_memory(&a, MemoryAction::Deprecate, "outdated", "alice")
            .await
            .unwrap();
    assert!(dep.cascaded.is_empty());
    // (D's expiry, found then, was recorded in the same maintenance run.)
    assert_eq!(dep.expired.len(), 1);
    assert_eq!(dep.expired[0].0, d);
    let rep =
        h.rt.transition_memory(&a, MemoryAction::Invalidate, "it was wrong", "bob")
            .await
            .unwrap();
    // B (active) and D (expired) go with it.
    let cascaded: Vec<&EventId> = rep.cascaded.iter().map(|t| &t.memory).collect();
    assert_eq!(cascaded, vec![&b, &d]);
    assert!(rep.expired.is_empty());
    assert_eq!(rep.memory.mounted_by, vec![RunId::new("r2").unwrap()]);
    let after = book(&h).await;
    for id in [&a, &b, &d] {
        assert_eq!(
            after.get(id).unwrap().status,
            MemoryStatus::Invalidated,
            "{id}"
        );
    }
    assert_eq!(
        after.get(&a).unwrap().earlier.as_ref().unwrap().status,
        MemoryStatus::Deprecated
    );
    assert_eq!(
        after.get(&d).unwrap().earlier.as_ref().unwrap().status,
        MemoryStatus::Expired
    );
    assert!(after.get(&b).unwrap().earlier.is_none());
    // B no longer mounts; r2's facts can no longer be promoted (it mounted A).
    let (spec, mut agent, seen) = watching(
        &h,
        "r3",
        "[memory]\nmount = { scopes = [\"derived\"] }\n",
        READ_HELLO,
    );
    h.run(spec, &mut agent).await;
    assert!(seen.lock().unwrap().is_empty());
    let r2_read = of_type(&h.events("r2").await, EventType::FileRead)[0].id();
    let err = h.rt.promote_memory(&request(&r2_read)).await.unwrap_err();
    assert!(err.to_string().contains("invalidated"), "{err}");
    // A memory past its expiry, not yet recorded, found wrong: its expiry, then its
    // invalidation, in one maintenance run.
    committed(
        &h,
        "r4",
        &rule("brief", "hello.txt", "ttl = \"1ms\""),
        READ_HELLO,
    )
    .await;
    let e = book(&h)
        .await
        .iter()
        .find(|r| r.scope == "brief")
        .unwrap()
        .id
        .clone();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let rep =
        h.rt.transition_memory(&e, MemoryAction::Invalidate, "wrong", "bob")
            .await
            .unwrap();
    assert_eq!(rep.expired.len(), 1);
    assert_eq!(rep.expired[0].0, e);
    let r = book(&h).await.get(&e).unwrap().clone();
    assert_eq!(r.status, MemoryStatus::Invalidated);
    let earlier = r.earlier.unwrap();
    assert_eq!(earlier.status, MemoryStatus::Expired);
    assert_eq!(earlier.transition.event.run_id, rep.run);
    verify(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_invalidated_during_a_run_taints_what_the_run_promotes() {
    let h = H::new(POLICY);
    committed(&h, "r1", &rule("project", "hello.txt", ""), READ_HELLO).await;
    let a = book(&h).await.iter().next().unwrap().id.clone();
    // r2 mounts A; while it executes, an operator invalidates A. What r2 promotes at commit
    // derives from A, so it is recorded and invalidated in the same batch.
    let extra = format!(
        "[memory]\nmount = {{ scopes = [\"project\"] }}\n\n{}",
        rule("derived", "config.toml", "")
    );
    let (spec, inner) = h.spec("r2", "coder", &extra, READ_CONFIG);
    let rt = &h.rt;
    let target = a.clone();
    let mut agent = Hooked {
        inner,
        hook: move |v: &AgentView| {
            if v.step == 0 {
                assert_eq!(v.memories.len(), 1);
                let handle = tokio::runtime::Handle::current();
                handle
                    .block_on(rt.transition_memory(
                        &target,
                        MemoryAction::Invalidate,
                        "wrong",
                        "alice",
                    ))
                    .unwrap();
            }
        },
    };
    let report = h.run(spec, &mut agent).await;
    assert_eq!(report.outcome, RunOutcome::Committed);
    let events = h.events("r2").await;
    let promoted = of_type(&events, EventType::MemoryPromoted);
    let invalidated = of_type(&events, EventType::MemoryInvalidated);
    assert_eq!((promoted.len(), invalidated.len()), (1, 1));
    assert_eq!(
        invalidated[0].payload["memory"],
        promoted[0].id().to_string()
    );
    assert_eq!(invalidated[0].payload["origin"], a.to_string());
    let b = book(&h).await;
    let r = b.get(&promoted[0].id()).unwrap();
    assert_eq!(r.status, MemoryStatus::Invalidated);
    assert_eq!(r.derived_from, vec![a]);
    verify(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_fact_mounts_once() {
    let h = H::new(POLICY);
    // Two runs read the same, unchanged file: two memories (two provenances), one content.
    committed(&h, "r1", &rule("project", "hello.txt", ""), READ_HELLO).await;
    committed(&h, "r2", &rule("project", "hello.txt", ""), READ_HELLO).await;
    let b = book(&h).await;
    let ids: Vec<EventId> = b.iter().map(|r| r.id.clone()).collect();
    assert_eq!(ids.len(), 2);
    assert_eq!(
        b.get(&ids[0]).unwrap().digest,
        b.get(&ids[1]).unwrap().digest
    );
    let mount = "[memory]\nmount = { scopes = [\"project\"] }\n";
    let (spec, mut agent, seen) = watching(&h, "r3", mount, READ_CONFIG);
    h.run(spec, &mut agent).await;
    assert_eq!(seen.lock().unwrap().len(), 1);
    let events = h.events("r3").await;
    let m = mounted(&events);
    assert_eq!(m.payload["memories"][0]["id"], ids[0].to_string());
    assert_eq!(m.payload["skipped"][0]["id"], ids[1].to_string());
    assert!(
        m.payload["skipped"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("same kind and content")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_memory_sections_are_refused_with_their_place() {
    let h = H::new(POLICY);
    for (extra, want) in [
        (
            "[[memory.promote]]\nevent = \"PlanStepProposed\"\nkind = \"f\"\nscope = \"s\"\n",
            "only DOMAIN events",
        ),
        (
            "[[memory.promote]]\nevent = \"FileRead\"\nkind = \"f\"\nscope = \"s\"\nconfidence = 1.5\n",
            "confidence",
        ),
        (
            "[[memory.promote]]\nevent = \"FileRead\"\nkind = \"f\"\nscope = \"s\"\nttl = \"soon\"\n",
            "ttl",
        ),
        (
            "[[memory.promote]]\nevent = \"FileRead\"\ntool = \"a/b\"\nkind = \"f\"\nscope = \"s\"\n",
            "only ToolInvoked",
        ),
        (
            "[memory]\nmount = { ids = [\"not-an-id\"] }\n",
            "not a memory id",
        ),
    ] {
        let spec_file = h.base.join("bad.toml");
        std::fs::write(
            &spec_file,
            format!(
                "[run]\nagent = \"coder\"\nworkspace = \"workspace\"\n\n[agent]\ndriver = \"external\"\n\n{extra}"
            ),
        )
        .unwrap();
        let err = ice_runtime::RunSpec::load(&spec_file).unwrap_err();
        assert!(err.at.is_some(), "{err}");
        assert!(err.to_string().contains(want), "{err} (wanted {want:?})");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kept_memory_book_sees_what_other_writers_of_the_log_append() {
    let h = H::new(POLICY);
    committed(&h, "w1", "", READ_HELLO).await;
    assert!(book(&h).await.is_empty());
    // Another runtime on the same log (another process, or another node of a shared log)
    // promotes a memory: this runtime's kept book learns it from the log.
    let other = ice_runtime::Runtime::new(
        h.rt.ledger().clone(),
        Arc::new(ice_log::clock::SystemClock),
        ice_runtime::Installation {
            runs_dir: h.base.join("home/runs"),
            policy_dir: h.policies.clone(),
        },
    )
    .unwrap();
    let read = of_type(&h.events("w1").await, EventType::FileRead)[0].id();
    let promoted = other.promote_memory(&request(&read)).await.unwrap();
    let b = book(&h).await;
    assert_eq!(b.len(), 1);
    assert_eq!(
        b.get(&promoted.memory).map(|r| r.status.clone()),
        Some(MemoryStatus::Active)
    );
    // And its transitions, whoever records them.
    other
        .transition_memory(&promoted.memory, MemoryAction::Deprecate, "stale", "alice")
        .await
        .unwrap();
    let b = book(&h).await;
    assert_eq!(
        b.get(&promoted.memory).map(|r| r.status.clone()),
        Some(MemoryStatus::Deprecated)
    );
}
