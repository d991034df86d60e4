//! Model-free replay: a run rebuilt from the log alone equals what it recorded, and re-driving
//! its agent from the record re-makes every decision; a different agent, a changed record or
//! a changed policy shows up as a divergence.

mod common;

use common::*;
use ice_intelligence::{Plan, PlanAgent};
use ice_kernel::RunId;

const PLAN: &str = r#"
[[step]]
intent = "plan"
think = "plan_step"
text = "read, rewrite"

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
intent = "forbidden"
capability = "fs.write"
target = "locked/release.txt"
arguments = { content = "2.0\n" }

[[step]]
intent = "read back"
capability = "fs.read"
target = "hello.txt"
"#;

fn plan_agent(text: &str) -> PlanAgent {
    PlanAgent::new("coder", Plan::parse("plan.toml", text).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_rebuilds_the_recorded_projection_and_re_makes_every_decision() {
    let h = H::new(POLICY);
    let (spec, mut agent) = h.spec("r1", "coder", "[grants]\nuses = 5", PLAN);
    let report = h.run(spec, &mut agent).await;
    assert_eq!(report.outcome, ice_runtime::RunOutcome::Committed);
    let run = RunId::new("r1").unwrap();

    let r = h.rt.replay(&run).await.unwrap();
    assert!(r.divergences.is_empty(), "{:?}", r.divergences);
    assert!(r.compared, "the run recorded its projection");
    assert_eq!(r.state, "TERMINATED");
    assert_eq!(r.projection["applied"], 1);
    assert_eq!(r.projection["denials"], 2);

    // The same plan, re-driven from the record: every request and decision matches.
    let mut again = plan_agent(PLAN);
    let r = h.rt.replay_drive(&run, &mut again).await.unwrap();
    assert!(r.divergences.is_empty(), "{:?}", r.divergences);
    let d = r.drive.unwrap();
    assert_eq!(d.proposals, 7, "{d:?}");
    assert_eq!(d.decisions, 5, "{d:?}");
    assert!(d.unchecked.is_empty(), "{:?}", d.unchecked);

    // A different agent proposes something else: the replay names where it departs.
    let other = PLAN.replace(
        "content = \"hello, governed world\\n\"",
        "content = \"other\\n\"",
    );
    let mut different = plan_agent(&other);
    let r = h.rt.replay_drive(&run, &mut different).await.unwrap();
    assert_eq!(r.divergences.len(), 1, "{:?}", r.divergences);
    assert!(
        r.divergences[0]
            .what
            .contains("the driver requests fs.write"),
        "{:?}",
        r.divergences
    );
    assert!(r.divergences[0].event.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_that_decides_differently_now_is_a_divergence() {
    // The recorded policy files are what the replay decides with; a record whose policy text
    // was changed (and re-hashed, as a forger would) decides differently and is reported.
    let h = H::new(POLICY);
    let (spec, mut agent) = h.spec("r2", "coder", "", PLAN);
    h.run(spec, &mut agent).await;
    let run = RunId::new("r2").unwrap();
    // Editing the policy directory afterwards changes nothing: the replay uses the record.
    std::fs::write(
        h.policies.join("p.cedar"),
        "forbid(principal, action, resource);",
    )
    .unwrap();
    let mut again = plan_agent(PLAN);
    let r = h.rt.replay_drive(&run, &mut again).await.unwrap();
    assert!(r.divergences.is_empty(), "{:?}", r.divergences);
}

/// Copy run `from` into a new run `to` through the ledger (as a forger with write access
/// would), changing each event's payload with `edit`.
async fn forge(h: &H, from: &str, to: &str, edit: impl Fn(&str, &mut serde_json::Value)) {
    let events = h.events(from).await;
    let to_id = RunId::new(to).unwrap();
    let mut drafts = Vec::new();
    for e in events {
        let text = serde_json::Value::Object(e.payload.clone())
            .to_string()
            .replace(&format!("\"{from}:"), &format!("\"{to}:"));
        let mut payload: serde_json::Value = serde_json::from_str(&text).unwrap();
        edit(&e.event_type, &mut payload);
        let mut d = ice_kernel::Draft::new(e.event_type.clone(), e.origin.clone()).payload(payload);
        if let Some(i) = e.intent {
            d = d.intent(i);
        }
        if let Some(a) = e.authority {
            d = d.authority(a.replace(&format!("{from}:"), &format!("{to}:")));
        }
        for c in e.causes {
            d = d.cause(ice_kernel::EventId::new(to_id.clone(), c.run_seq));
        }
        drafts.push(d.cost(e.cost));
    }
    h.rt.ledger().append(&to_id, drafts).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_record_whose_policy_decides_otherwise_is_caught() {
    let h = H::new(POLICY);
    let (spec, mut agent) = h.spec("r3", "coder", "", PLAN);
    h.run(spec, &mut agent).await;
    // A forger rewrites the run with a policy that forbids reading, keeping the decisions it
    // recorded (and a policy version that matches the forged files, so the record is
    // self-consistent and hashes and chains verify).
    let forged_policy = format!(
        "{POLICY}\n@id(\"no-reading\")\nforbid(principal, action == Action::\"fs.read\", resource);\n"
    );
    forge_policy_files(
        &h,
        "r3",
        "r3-forged",
        &forged_policy,
        ice_kernel::TAXONOMY_VERSION,
    )
    .await;
    let run = RunId::new("r3-forged").unwrap();
    // The plain replay sees a consistent record...
    let r = h.rt.replay(&run).await.unwrap();
    assert!(r.divergences.is_empty(), "{:?}", r.divergences);
    // ...re-making the decisions shows the recorded ones do not follow from its policy.
    diverges_once(&h, &run, "the policy decides deny now").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_recorded_without_the_constraints_its_policy_sets_is_caught() {
    let policy = POLICY.replace(
        "@id(\"write\")",
        "@id(\"write\")\n@max_bytes(\"4096\")\n@timeout_ms(\"1000\")",
    );
    let h = H::new(&policy);
    let (spec, mut agent) = h.spec("r4", "coder", "", PLAN);
    h.run(spec, &mut agent).await;
    let run = RunId::new("r4").unwrap();
    let mut again = plan_agent(PLAN);
    let r = h.rt.replay_drive(&run, &mut again).await.unwrap();
    assert!(r.divergences.is_empty(), "{:?}", r.divergences);
    // A forger lifts the write grant's limits; everything else stays consistent.
    forge(&h, "r4", "r4-forged", |t, p| {
        if t == "CapabilityGranted" && p["capability"] == "fs.write" {
            assert_eq!(
                p["constraints"],
                serde_json::json!({"max_bytes": 4096, "timeout_ms": 1000})
            );
            p["constraints"] = serde_json::json!({});
        }
    })
    .await;
    let run = RunId::new("r4-forged").unwrap();
    diverges_once(&h, &run, "the policy gives a grant with constraints {\"max_bytes\":4096,\"timeout_ms\":1000}; the run recorded {}").await;
}

/// The version of a policy set made of one file `p.cedar` holding `text`.
fn version_of(text: &str) -> String {
    let sources = vec![ice_authority::PolicySource {
        name: "p.cedar".into(),
        text: text.into(),
    }];
    let schema = ice_authority::Schema::ice().unwrap();
    ice_authority::PolicySet::from_sources(&sources, &schema)
        .unwrap()
        .version()
        .to_hex()
}

/// Re-drive `run` (a forged record) with the test plan: exactly one divergence, saying `what`.
async fn diverges_once(h: &H, run: &RunId, what: &str) {
    let mut again = plan_agent(PLAN);
    let r = h.rt.replay_drive(run, &mut again).await.unwrap();
    assert_eq!(r.divergences.len(), 1, "{:?}", r.divergences);
    assert!(r.divergences[0].what.contains(what), "{:?}", r.divergences);
}

/// Copy run `from` into `to` with its recorded policy files replaced by one file `p.cedar`
/// holding `text`, under that text's version (a self-consistent record: hashes, chains and the
/// projection all agree), saying it began under taxonomy `taxonomy`.
async fn forge_policy_files(h: &H, from: &str, to: &str, text: &str, taxonomy: u32) {
    let version = version_of(text);
    forge(h, from, to, |t, p| {
        if t == "RunProvisioned" {
            p["taxonomy"] = serde_json::json!(taxonomy);
        }
        if t == "ContextResolved" {
            p["policy_sources"] = serde_json::json!([{"name": "p.cedar", "text": text}]);
            p["policy_version"] = serde_json::json!(version);
        }
        if t == "RunTerminated" {
            p["projection"]["policy_version"] = serde_json::json!(version);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_recorded_under_a_policy_version_the_record_never_loaded_is_caught() {
    let h = H::new(POLICY);
    let (spec, mut agent) = h.spec("r5", "coder", "", PLAN);
    h.run(spec, &mut agent).await;
    // A forger swaps the recorded files for others that decide every request alike (so each
    // decision matches) but are not the files the grants were decided under.
    let other = format!("{POLICY}\n// reviewed\n");
    forge_policy_files(&h, "r5", "r5-forged", &other, ice_kernel::TAXONOMY_VERSION).await;
    // A run that began under taxonomy v1 could not record a reload that revoked nothing: the
    // same mismatch there is unchecked, and says why.
    forge_policy_files(&h, "r5", "r5-v1", &other, 1).await;
    let mut again = plan_agent(PLAN);
    let r =
        h.rt.replay_drive(&RunId::new("r5-v1").unwrap(), &mut again)
            .await
            .unwrap();
    assert!(r.divergences.is_empty(), "{:?}", r.divergences);
    let unchecked = r.drive.unwrap().unchecked;
    assert!(
        unchecked.iter().any(|u| u.contains("taxonomy v1")),
        "{unchecked:?}"
    );
    let run = RunId::new("r5-forged").unwrap();
    diverges_once(
        &h,
        &run,
        "the run recorded this decision under policy version",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_whose_recorded_files_do_not_explain_its_revocations_is_caught() {
    let h = H::new(POLICY);
    let plan =
        "[[step]]\nintent = \"r\"\ncapability = \"fs.read\"\ntarget = \"hello.txt\"\nrepeat = 3\n";
    let (spec, plan_agent) = h.spec("r6", "coder", "[grants]\nuses = 10\n", plan);
    let policies = h.policies.clone();
    // Reading is forbidden mid-run: the read grant is revoked with the reload.
    let mut agent = Hooked {
        inner: plan_agent,
        hook: move |v: &ice_kernel::AgentView| {
            if v.step == 1 {
                std::thread::sleep(std::time::Duration::from_millis(30));
                let text = format!(
                    "{POLICY}\n@id(\"no-reading\")\nforbid(principal, action == Action::\"fs.read\", resource);\n"
                );
                std::fs::write(policies.join("p.cedar"), text).unwrap();
            }
        },
    };
    h.run(spec, &mut agent).await;
    let run = RunId::new("r6").unwrap();
    let (_, mut again) = h.spec("r6-replay", "coder", "", plan);
    let r = h.rt.replay_drive(&run, &mut again).await.unwrap();
    assert!(r.divergences.is_empty(), "{:?}", r.divergences);
    // A forger makes the reload record harmless files (still self-consistent): the revocation
    // it recorded no longer follows from them.
    let harmless = format!("{POLICY}\n// nothing changed\n");
    let version = version_of(&harmless);
    forge(&h, "r6", "r6-forged", |t, p| {
        if t == "PolicyReloaded" {
            p["policy_sources"] = serde_json::json!([{"name": "p.cedar", "text": harmless}]);
            p["policy_version"] = serde_json::json!(version);
        }
    })
    .await;
    // A forger makes the revocation name another policy than the reload put in force (and the
    // projection agree).
    let context_version = h.events("r6").await[2].payload["policy_version"].clone();
    assert!(context_version.is_string());
    forge(&h, "r6", "r6-renamed", |t, p| {
        if t == "CapabilityRevoked" {
            p["policy_version"] = context_version.clone();
        }
        if t == "RunTerminated" {
            p["projection"]["policy_version"] = context_version.clone();
        }
    })
    .await;
    let (_, mut again) = h.spec("r6-replay-3", "coder", "", plan);
    let r =
        h.rt.replay_drive(&RunId::new("r6-renamed").unwrap(), &mut again)
            .await
            .unwrap();
    assert!(
        r.divergences
            .iter()
            .any(|d| d.what.contains("a revocation names policy version")),
        "{:?}",
        r.divergences
    );
    let run = RunId::new("r6-forged").unwrap();
    let (_, mut again) = h.spec("r6-replay-2", "coder", "", plan);
    let r = h.rt.replay_drive(&run, &mut again).await.unwrap();
    assert!(
        r.divergences
            .iter()
            .any(|d| d.what.contains("which the new policy still permits")),
        "{:?}",
        r.divergences
    );
}
