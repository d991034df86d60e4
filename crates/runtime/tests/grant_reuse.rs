//! A grant never authorises what the policy would not: the policy decides every call, even one
//! a live grant covers. With `[grants] uses = 5` (a grant may serve several calls):
//! - an approval authorises exactly one call: a second call of the same capability on the
//!   same target (other content, other path or body on the same host) asks again;
//! - a forbid on a target inside a grant's scope (a `.env` file under a directory read
//!   before, a directory under the workspace root listed before) still fires;
//! - a permit's condition on the arguments is checked on every call, not on the first only;
//! - a call the policy permits outright still reuses the live grant.
//!
//! Each run replays, re-driven, without a divergence.

mod common;

use common::*;
use ice_kernel::{Event, EventType, RunId};
use ice_runtime::RunOutcome;

/// Drive a replay of `run` with a plan agent proposing `plan` again: no divergence, every
/// decision re-made. Returns how many decisions were checked.
async fn replays_cleanly(h: &H, run: &str, agent: &str, plan: &str) -> u64 {
    let (_, mut again) = h.spec(&format!("{run}-replay"), agent, "", plan);
    let id = RunId::new(run).unwrap();
    let r = h.rt.replay_drive(&id, &mut again).await.unwrap();
    assert!(r.divergences.is_empty(), "{:?}", r.divergences);
    let d = r.drive.unwrap();
    assert!(d.unchecked.is_empty(), "{:?}", d.unchecked);
    d.decisions
}

/// The grant each `CapabilityUsed` names, in order.
fn used_grants(events: &[Event]) -> Vec<String> {
    of_type(events, EventType::CapabilityUsed)
        .iter()
        .map(|e| e.payload["grant"].as_str().unwrap().to_string())
        .collect()
}

/// An operator answers the run's approval requests in turn: `answers[i]` for the i-th.
async fn operator(h: &H, run: &str, answers: &[bool]) {
    let run = RunId::new(run).unwrap();
    for (i, grant) in answers.iter().enumerate() {
        let approval = loop {
            let a = pending(&h.rt, &run).await;
            // `pending` returns the open request; wait for the i-th one to be asked.
            let asked = of_type(&events(&h.rt, &run).await, EventType::ApprovalRequested).len();
            if asked > i {
                break a;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        h.rt.answer_approval(&approval, "alice", *grant, "test")
            .await
            .unwrap();
    }
}

const APPROVED_WRITES: &str = r#"
@id("read")
permit(principal, action in [Action::"fs.read", Action::"fs.list"], resource in Dir::".");
@id("write-with-approval")
@approval("required")
permit(principal == Agent::"coder", action == Action::"fs.write", resource in Dir::".");
"#;

const TWO_WRITES: &str = r#"
[[step]]
intent = "write A"
capability = "fs.write"
target = "hello.txt"
arguments = { content = "content A\n" }

[[step]]
intent = "write B, same path"
capability = "fs.write"
target = "hello.txt"
arguments = { content = "content B\n" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_authorises_one_call_and_the_next_write_asks_again() {
    let h = H::new(APPROVED_WRITES);
    let extra = "[grants]\nuses = 5\n\n[approvals]\ntimeout = \"60s\"\n";
    let (spec, mut agent) = h.spec("approve-once", "coder", extra, TWO_WRITES);
    // Write A approved; write B (same path, other content) must ask again: denied here.
    let (report, ()) = tokio::join!(
        h.run(spec, &mut agent),
        operator(&h, "approve-once", &[true, false])
    );
    assert_eq!(report.outcome, RunOutcome::Committed, "{report:?}");
    assert_eq!(h.read("hello.txt"), "content A\n");
    let events = h.events("approve-once").await;
    let asked = of_type(&events, EventType::ApprovalRequested);
    assert_eq!(asked.len(), 2, "the second write did not ask for approval");
    assert_eq!(
        asked[1].payload["arguments"]["content"], "content B\n",
        "the second approval is asked for the second request"
    );
    assert_ne!(asked[0].payload["digest"], asked[1].payload["digest"]);
    assert_eq!(denial_codes(&events), ["approval_denied"]);
    // The grant the approval gave allows one use, whatever `[grants] uses` says.
    let grants = of_type(&events, EventType::CapabilityGranted);
    assert_eq!(grants.len(), 1);
    assert_eq!(grants[0].payload["max_uses"], 1);
    assert_eq!(
        grants[0].payload["approval"].as_str(),
        Some(asked[0].id().to_string().as_str())
    );
    assert_eq!(used_grants(&events), [grants[0].id().to_string()]);
    assert_eq!(of_type(&events, EventType::EffectStaged).len(), 1);
    replays_cleanly(&h, "approve-once", "coder", TWO_WRITES).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_approved_writes_each_get_their_own_single_use_grant() {
    let h = H::new(APPROVED_WRITES);
    let extra = "[grants]\nuses = 5\n\n[approvals]\ntimeout = \"60s\"\n";
    let (spec, mut agent) = h.spec("approve-twice", "coder", extra, TWO_WRITES);
    let (report, ()) = tokio::join!(
        h.run(spec, &mut agent),
        operator(&h, "approve-twice", &[true, true])
    );
    assert_eq!(report.outcome, RunOutcome::Committed, "{report:?}");
    assert_eq!(h.read("hello.txt"), "content B\n");
    let events = h.events("approve-twice").await;
    assert_eq!(of_type(&events, EventType::ApprovalRequested).len(), 2);
    let grants = of_type(&events, EventType::CapabilityGranted);
    assert_eq!(grants.len(), 2, "one grant per approved call");
    for g in &grants {
        assert_eq!(g.payload["max_uses"], 1);
    }
    assert_eq!(
        used_grants(&events),
        [grants[0].id().to_string(), grants[1].id().to_string()]
    );
    assert!(denial_codes(&events).is_empty());
    replays_cleanly(&h, "approve-twice", "coder", TWO_WRITES).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approved_http_call_does_not_authorise_another_path_or_body_on_the_host() {
    let port = ok_endpoint();
    // POLICY: an http.request to 127.0.0.1 needs an operator's approval.
    let h = H::new(POLICY);
    let plan = format!(
        r#"
[[step]]
intent = "notify"
capability = "http.request"
target = "http://127.0.0.1:{port}/notify"
arguments = {{ method = "GET" }}

[[step]]
intent = "something else"
capability = "http.request"
target = "http://127.0.0.1:{port}/other"
arguments = {{ method = "POST", body = "not what was approved" }}
"#
    );
    let extra = "[grants]\nuses = 5\n\n[approvals]\ntimeout = \"60s\"\n";
    let (spec, mut agent) = h.spec("http-once", "coder", extra, &plan);
    let (report, ()) = tokio::join!(
        h.run(spec, &mut agent),
        operator(&h, "http-once", &[true, false])
    );
    assert_eq!(report.outcome, RunOutcome::Committed, "{report:?}");
    let events = h.events("http-once").await;
    assert_eq!(of_type(&events, EventType::ApprovalRequested).len(), 2);
    assert_eq!(of_type(&events, EventType::APIRequestExecuted).len(), 1);
    assert_eq!(denial_codes(&events), ["approval_denied"]);
    let grants = of_type(&events, EventType::CapabilityGranted);
    assert_eq!(grants.len(), 1);
    assert_eq!(grants[0].payload["max_uses"], 1);
    replays_cleanly(&h, "http-once", "coder", &plan).await;
}

/// The starter policy's shape: read anything, never a `.env` file; and a directory nobody
/// lists.
const STARTER_LIKE: &str = r#"
@id("read-workspace")
permit(principal, action in [Action::"fs.read", Action::"fs.list"], resource in Dir::".");
@id("no-env-files")
forbid (
  principal,
  action in [Action::"fs.read", Action::"fs.write", Action::"fs.delete"],
  resource
)
when { resource.path like ".env*" || resource.path like "*/.env*" };
@id("no-listing-secret")
forbid(principal, action == Action::"fs.list", resource in Dir::"secret");
"#;

const INSIDE_THE_SCOPE: &str = r#"
[[step]]
intent = "read a directory (fails, but its grant covers the subtree)"
capability = "fs.read"
target = "app"

[[step]]
intent = "read the secrets inside it"
capability = "fs.read"
target = "app/.env"

[[step]]
intent = "list the root (its grant covers every directory)"
capability = "fs.list"
target = "."

[[step]]
intent = "list the directory nobody lists"
capability = "fs.list"
target = "secret"

[[step]]
intent = "read a plain file in the directory"
capability = "fs.read"
target = "app/main.rs"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbid_inside_a_live_grants_scope_still_fires() {
    let h = H::new(STARTER_LIKE);
    std::fs::create_dir_all(h.ws.join("app")).unwrap();
    std::fs::write(h.ws.join("app/.env"), "TOKEN=hunter2\n").unwrap();
    std::fs::write(h.ws.join("app/main.rs"), "fn main() {}\n").unwrap();
    std::fs::create_dir_all(h.ws.join("secret")).unwrap();
    std::fs::write(h.ws.join("secret/key"), "k\n").unwrap();
    let (spec, mut agent) = h.spec("env", "coder", "[grants]\nuses = 5\n", INSIDE_THE_SCOPE);
    let report = h.run(spec, &mut agent).await;
    assert_eq!(report.outcome, RunOutcome::Committed, "{report:?}");
    let events = h.events("env").await;
    let codes = denial_codes(&events);
    assert_eq!(codes.len(), 3, "{codes:?}");
    assert_ne!(
        codes[0], "policy_denied",
        "reading a directory fails as an effect"
    );
    assert_eq!(codes[1..], ["policy_denied", "policy_denied"]);
    let denials = of_type(&events, EventType::CapabilityDenied);
    assert_eq!(denials[1].payload["target"], "app/.env");
    assert_eq!(
        denials[1].payload["policies"],
        serde_json::json!(["no-env-files"])
    );
    assert_eq!(denials[2].payload["target"], "secret");
    assert_eq!(
        denials[2].payload["policies"],
        serde_json::json!(["no-listing-secret"])
    );
    // Nothing of the secrets reached the record, and so nothing reached the agent.
    for e in &events {
        let text = serde_json::to_string(&e.payload).unwrap();
        assert!(!text.contains("hunter2"), "{e:?}");
    }
    // The plain read reused the directory's grant: the policy permits it.
    let grants = of_type(&events, EventType::CapabilityGranted);
    assert_eq!(grants.len(), 2, "one read grant, one list grant");
    let used = used_grants(&events);
    assert_eq!(used.len(), 3, "{used:?}");
    assert_eq!(used[2], grants[0].id().to_string());
    replays_cleanly(&h, "env", "coder", INSIDE_THE_SCOPE).await;
}

const SMALL_WRITES: &str = r#"
@id("read")
permit(principal, action in [Action::"fs.read", Action::"fs.list"], resource in Dir::".");
@id("small-writes")
permit(principal == Agent::"coder", action == Action::"fs.write", resource in Dir::".")
when { context.arguments has bytes && context.arguments.bytes < 10 };
"#;

const GROWING_WRITES: &str = r#"
[[step]]
intent = "small write"
capability = "fs.write"
target = "hello.txt"
arguments = { content = "short\n" }

[[step]]
intent = "large write under the same live grant"
capability = "fs.write"
target = "hello.txt"
arguments = { content = "far longer than the policy allows\n" }

[[step]]
intent = "small again"
capability = "fs.write"
target = "hello.txt"
arguments = { content = "tiny\n" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permits_condition_on_the_arguments_is_checked_on_every_call() {
    let h = H::new(SMALL_WRITES);
    let (spec, mut agent) = h.spec("sizes", "coder", "[grants]\nuses = 5\n", GROWING_WRITES);
    let report = h.run(spec, &mut agent).await;
    assert_eq!(report.outcome, RunOutcome::Committed, "{report:?}");
    assert_eq!(h.read("hello.txt"), "tiny\n");
    let events = h.events("sizes").await;
    assert_eq!(denial_codes(&events), ["policy_denied"]);
    let denied = of_type(&events, EventType::CapabilityDenied)[0];
    assert!(
        denied.payload.get("grant").is_none(),
        "{:?}",
        denied.payload
    );
    // The denial comes straight after its request, as for a first call.
    let at = events.iter().position(|e| e.id() == denied.id()).unwrap();
    assert_eq!(
        events[at - 1].event_type,
        EventType::CapabilityRequested.name()
    );
    assert_eq!(denied.causes, [events[at - 1].id()]);
    // The two permitted writes share the one grant.
    let grants = of_type(&events, EventType::CapabilityGranted);
    assert_eq!(grants.len(), 1);
    let g = grants[0].id().to_string();
    assert_eq!(used_grants(&events), [g.clone(), g]);
    replays_cleanly(&h, "sizes", "coder", GROWING_WRITES).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permitted_repeated_read_still_reuses_the_live_grant() {
    let h = H::new(POLICY);
    let plan = "[[step]]\nintent = \"again\"\ncapability = \"fs.read\"\ntarget = \"hello.txt\"\nrepeat = 4\n";
    let (spec, mut agent) = h.spec("reuse", "coder", "[grants]\nuses = 5\n", plan);
    let report = h.run(spec, &mut agent).await;
    assert_eq!(report.outcome, RunOutcome::Committed, "{report:?}");
    let events = h.events("reuse").await;
    assert_eq!(of_type(&events, EventType::FileRead).len(), 4);
    let grants = of_type(&events, EventType::CapabilityGranted);
    assert_eq!(grants.len(), 1, "a new grant per call");
    let g = grants[0].id().to_string();
    assert_eq!(used_grants(&events), vec![g; 4]);
    assert!(denial_codes(&events).is_empty());
    // The replay re-decides each call under the policy and expects the reuse.
    assert_eq!(replays_cleanly(&h, "reuse", "coder", plan).await, 4);
}

// ---------------------------------------------------------------------------------------------
// Replay re-decides each reuse: a record that reused a grant for a call its policy does not
// permit outright (as ICE did before every call was decided), or that gave an approval a grant
// of several uses, diverges.

/// Copy run `from` into a new run `to` through the ledger (as a forger with write access
/// would), changing each event's payload with `edit`. Approval digests (bound to the run) are
/// re-made for `to`, and a grant's `policy:` authority follows its (edited) policy version.
async fn forge(h: &H, from: &str, to: &str, edit: impl Fn(&str, &mut serde_json::Value)) {
    let events = h.events(from).await;
    let to_id = RunId::new(to).unwrap();
    let digests: Vec<(String, String)> = of_type(&events, EventType::ApprovalRequested)
        .iter()
        .map(|e| {
            let p = ice_authority::payload::ApprovalRequestedPayload::from_event(e).unwrap();
            let digest = ice_authority::approval::request_digest(
                &to_id,
                &p.capability,
                &p.resource,
                &serde_json::Value::Object(p.arguments),
                &p.policy_version,
            );
            (p.digest.to_hex(), digest.to_hex())
        })
        .collect();
    let mut drafts = Vec::new();
    for e in events {
        let mut text = serde_json::Value::Object(e.payload.clone())
            .to_string()
            .replace(&format!("\"{from}:"), &format!("\"{to}:"));
        for (old, new) in &digests {
            text = text.replace(old, new);
        }
        let mut payload: serde_json::Value = serde_json::from_str(&text).unwrap();
        edit(&e.event_type, &mut payload);
        let mut d = ice_kernel::Draft::new(e.event_type.clone(), e.origin.clone());
        if let Some(i) = e.intent {
            d = d.intent(i);
        }
        if let Some(a) = e.authority {
            let a = match payload["policy_version"].as_str() {
                Some(v) if a.starts_with("policy:") => format!("policy:{v}"),
                _ => a.replace(&format!("{from}:"), &format!("{to}:")),
            };
            d = d.authority(a);
        }
        d = d.payload(payload);
        for c in e.causes {
            d = d.cause(ice_kernel::EventId::new(to_id.clone(), c.run_seq));
        }
        drafts.push(d.cost(e.cost));
    }
    h.rt.ledger().append(&to_id, drafts).await.unwrap();
}

/// Re-drive `run` with `plan`: exactly one divergence, saying `what`.
async fn diverges_once(h: &H, run: &str, plan: &str, what: &str) {
    let (_, mut again) = h.spec(&format!("{run}-replay"), "coder", "", plan);
    let r =
        h.rt.replay_drive(&RunId::new(run).unwrap(), &mut again)
            .await
            .unwrap();
    assert_eq!(r.divergences.len(), 1, "{:?}", r.divergences);
    assert!(r.divergences[0].what.contains(what), "{:?}", r.divergences);
}

const READ_ALL: &str = r#"
@id("read-workspace")
permit(principal, action in [Action::"fs.read", Action::"fs.list"], resource in Dir::".");
"#;

const INTO_THE_DIRECTORY: &str = r#"
[[step]]
intent = "read a directory"
capability = "fs.read"
target = "app"

[[step]]
intent = "read inside it"
capability = "fs.read"
target = "app/.env"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_reuse_the_policy_would_deny_diverges_on_replay() {
    let h = H::new(READ_ALL);
    std::fs::create_dir_all(h.ws.join("app")).unwrap();
    std::fs::write(h.ws.join("app/.env"), "TOKEN=x\n").unwrap();
    let (spec, mut agent) = h.spec("all", "coder", "[grants]\nuses = 5\n", INTO_THE_DIRECTORY);
    let report = h.run(spec, &mut agent).await;
    assert_eq!(report.outcome, RunOutcome::Committed, "{report:?}");
    let events = h.events("all").await;
    // Permitted outright: the second read reused the directory's grant.
    assert_eq!(of_type(&events, EventType::CapabilityGranted).len(), 1);
    assert_eq!(of_type(&events, EventType::CapabilityUsed).len(), 2);
    replays_cleanly(&h, "all", "coder", INTO_THE_DIRECTORY).await;
    // The same record under the starter-like policy (files and version consistent, as a record
    // made by an ICE that let a grant stand in for the policy would be): the reuse diverges.
    let schema = ice_authority::Schema::ice().unwrap();
    let sources = vec![ice_authority::PolicySource {
        name: "p.cedar".into(),
        text: STARTER_LIKE.into(),
    }];
    let version = ice_authority::PolicySet::from_sources(&sources, &schema)
        .unwrap()
        .version()
        .to_hex();
    forge(&h, "all", "all-forged", |t, p| {
        if t == "ContextResolved" {
            p["policy_sources"] = serde_json::json!([{"name": "p.cedar", "text": STARTER_LIKE}]);
            p["policy_version"] = serde_json::json!(version);
        }
        if t == "CapabilityGranted" {
            p["policy_version"] = serde_json::json!(version);
        }
        if t == "RunTerminated" {
            p["projection"]["policy_version"] = serde_json::json!(version);
        }
    })
    .await;
    let r =
        h.rt.replay(&RunId::new("all-forged").unwrap())
            .await
            .unwrap();
    assert!(r.divergences.is_empty(), "{:?}", r.divergences);
    diverges_once(
        &h,
        "all-forged",
        INTO_THE_DIRECTORY,
        "the policy decides deny now",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_approval_grant_of_several_uses_diverges_on_replay() {
    let h = H::new(APPROVED_WRITES);
    let plan = &TWO_WRITES[..TWO_WRITES.find("\n[[step]]\nintent = \"write B").unwrap()];
    let extra = "[grants]\nuses = 5\n\n[approvals]\ntimeout = \"60s\"\n";
    let (spec, mut agent) = h.spec("one-approval", "coder", extra, plan);
    let (report, ()) = tokio::join!(
        h.run(spec, &mut agent),
        operator(&h, "one-approval", &[true])
    );
    assert_eq!(report.outcome, RunOutcome::Committed, "{report:?}");
    replays_cleanly(&h, "one-approval", "coder", plan).await;
    forge(&h, "one-approval", "one-approval-forged", |t, p| {
        if t == "CapabilityGranted" {
            assert_eq!(p["max_uses"], 1);
            p["max_uses"] = serde_json::json!(5);
        }
        if t == "RunTerminated" {
            // The projection's grants follow the record (it is folded from it).
            let text = p.to_string().replace("\"max_uses\":1", "\"max_uses\":5");
            *p = serde_json::from_str(&text).unwrap();
        }
    })
    .await;
    diverges_once(
        &h,
        "one-approval-forged",
        plan,
        "a grant given on an approval allows one use; the run recorded 5",
    )
    .await;
}
