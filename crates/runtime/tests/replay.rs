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
    assert_eq!(d.decision_rules, Some(ice_runtime::DECISION_RULES));

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
    // Claiming older decision rules changes nothing: no rules explain a grant recorded with
    // other limits than the decision it names.
    forge(&h, "r4", "r4-older", |t, p| {
        if t == "RunProvisioned" {
            p.as_object_mut().unwrap().remove("decision_rules");
        }
        if t == "CapabilityGranted" && p["capability"] == "fs.write" {
            p["constraints"] = serde_json::json!({});
        }
    })
    .await;
    let run = RunId::new("r4-older").unwrap();
    diverges_once(&h, &run, "the policy gives a grant with constraints").await;
}

/// A run recorded under other decision rules (or before runs recorded them) may have been
/// decided otherwise by the ICE of its day: a decision that comes out differently now is listed
/// as not checked, saying why, and the walk goes on; under the run's own rules it is a
/// divergence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_recorded_under_other_decision_rules_lists_a_different_decision_as_unchecked() {
    let h = H::new(POLICY);
    let (spec, mut agent) = h.spec("r6", "coder", "", PLAN);
    h.run(spec, &mut agent).await;
    let recorded = h.events("r6").await;
    let recorded_version = recorded[2].payload["policy_version"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        recorded[0].payload["decision_rules"],
        serde_json::json!(ice_runtime::DECISION_RULES)
    );
    // The same record with a policy that denies the first read: this ICE decides it otherwise.
    let forged_policy = format!(
        "{POLICY}\n@id(\"no-reading\")\nforbid(principal, action == Action::\"fs.read\", resource);\n"
    );
    forge_policy_files(
        &h,
        "r6",
        "r6-now",
        &forged_policy,
        ice_kernel::TAXONOMY_VERSION,
    )
    .await;
    diverges_once(
        &h,
        &RunId::new("r6-now").unwrap(),
        "the policy decides deny now",
    )
    .await;
    for (run, rules, says) in [
        (
            "r6-older",
            Some(0),
            "the run was recorded under decision rules 0; this ICE decides by rules",
        ),
        (
            "r6-unrecorded",
            None,
            "the run was recorded before ICE recorded its decision rules",
        ),
    ] {
        let version = version_of(&forged_policy);
        let text = forged_policy.clone();
        // Every decision names the forged files' version, as the ICE of its day would have.
        let replace = [(recorded_version.as_str(), version.as_str())];
        forge_replacing(&h, "r6", run, &replace, |t, p| {
            if t == "RunProvisioned" {
                match rules {
                    Some(r) => p["decision_rules"] = serde_json::json!(r),
                    None => {
                        p.as_object_mut().unwrap().remove("decision_rules");
                    }
                }
            }
            if t == "ContextResolved" {
                p["policy_sources"] = serde_json::json!([{"name": "p.cedar", "text": text}]);
            }
        })
        .await;
        let mut again = plan_agent(PLAN);
        let r =
            h.rt.replay_drive(&RunId::new(run).unwrap(), &mut again)
                .await
                .unwrap();
        assert!(r.divergences.is_empty(), "{run}: {:?}", r.divergences);
        let d = r.drive.unwrap();
        assert_eq!(d.decision_rules, rules, "{run}");
        // The walk went on past the decisions that differ: every proposal was re-driven, and
        // the two reads the forged policy denies are the decisions not counted.
        assert_eq!(d.proposals, 7, "{run}: {d:?}");
        assert_eq!(d.decisions, 3, "{run}: {d:?}");
        let differing: Vec<&String> = d
            .unchecked
            .iter()
            .filter(|u| u.contains("the policy decides deny now"))
            .collect();
        assert_eq!(differing.len(), 2, "{run}: {:?}", d.unchecked);
        assert!(
            differing
                .iter()
                .all(|u| u.contains(says) && u.contains("may be the rules' change")),
            "{run}: {differing:?}"
        );
        assert!(
            d.unchecked[0].starts_with("decisions: ") && d.unchecked[0].contains(says),
            "{run}: {:?}",
            d.unchecked
        );
        // Other rules explain a decision, not a driver that proposes something else.
        let other = PLAN.replace(
            "content = \"hello, governed world\\n\"",
            "content = \"other\\n\"",
        );
        let mut different = plan_agent(&other);
        let r =
            h.rt.replay_drive(&RunId::new(run).unwrap(), &mut different)
                .await
                .unwrap();
        assert_eq!(r.divergences.len(), 1, "{run}: {:?}", r.divergences);
        assert!(
            r.divergences[0]
                .what
                .contains("the driver requests fs.write"),
            "{run}: {:?}",
            r.divergences
        );
    }
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

/// A plan whose run records a projection larger than the blob threshold: `reads` reads of a
/// file whose path is about 2.5 KB long, each under a grant of its own (one use), so the
/// projection lists `reads` grants naming that path.
fn long_path_plan(h: &H, reads: u32) -> String {
    let dir = (0..12)
        .map(|i| format!("{i:02}{}", "d".repeat(198)))
        .collect::<Vec<_>>()
        .join("/");
    std::fs::create_dir_all(h.ws.join(&dir)).unwrap();
    let target = format!("{dir}/data.txt");
    std::fs::write(h.ws.join(&target), "data\n").unwrap();
    format!(
        "[[step]]\nintent = \"read\"\ncapability = \"fs.read\"\ntarget = \"{target}\"\nrepeat = {reads}\n"
    )
}

/// The blob reference `RunTerminated` keeps for its projection (the test checks the run did
/// move it to a blob).
async fn projection_blob(h: &H, run: &str) -> ice_kernel::Digest {
    let events = h.events(run).await;
    let done = of_type(&events, ice_kernel::EventType::RunTerminated)[0];
    let refs = ice_kernel::blob::blob_refs(&done.payload).unwrap();
    let r = refs
        .iter()
        .find(|r| r.field == "projection")
        .unwrap_or_else(|| panic!("the projection is inline: {:?}", done.payload));
    assert!(r.size > ice_kernel::limits::BLOB_FIELD_THRESHOLD_BYTES as u64);
    r.digest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_projection_moved_to_a_blob_replays_without_divergence() {
    let h = H::new(POLICY);
    let plan = long_path_plan(&h, 8);
    let (spec, mut agent) = h.spec("big", "coder", "", &plan);
    let report = h.run(spec, &mut agent).await;
    assert_eq!(report.outcome, ice_runtime::RunOutcome::Committed);
    projection_blob(&h, "big").await;
    let run = RunId::new("big").unwrap();

    let r = h.rt.replay(&run).await.unwrap();
    assert!(r.divergences.is_empty(), "{:?}", r.divergences);
    assert!(r.compared, "the run recorded its projection");
    assert!(r.blobs >= 1);
    assert_eq!(r.projection["grants"].as_array().unwrap().len(), 8);

    let (_, mut again) = h.spec("big-replay", "coder", "", &plan);
    let r = h.rt.replay_drive(&run, &mut again).await.unwrap();
    assert!(r.divergences.is_empty(), "{:?}", r.divergences);
    let d = r.drive.unwrap();
    // Eight reads and the finish; a decision re-made for each read.
    assert_eq!(d.proposals, 9, "{d:?}");
    assert_eq!(d.decisions, 8, "{d:?}");
    assert!(d.unchecked.is_empty(), "{:?}", d.unchecked);
}

/// How [`Tampered`] answers for one blob.
#[derive(Clone, Copy)]
enum Tamper {
    Missing(ice_kernel::Digest),
    Altered(ice_kernel::Digest),
}

/// What a [`HookedLog`] does to blobs here: answers for one as if it had been lost or
/// altered on disk (SQLite's triggers keep the test from doing it to the file).
struct Tampered {
    tamper: std::sync::Mutex<Option<Tamper>>,
}

impl Hooks for Tampered {
    fn blob<'t>(
        &'t self,
        inner: &'t ice_log::sqlite::SqliteLog,
        digest: &'t ice_kernel::Digest,
    ) -> Fut<'t, Option<Vec<u8>>> {
        let tamper = *self.tamper.lock().unwrap();
        Box::pin(async move {
            let bytes = ice_log::EventLog::blob(inner, digest).await?;
            Ok(match tamper {
                Some(Tamper::Missing(d)) if d == *digest => None,
                Some(Tamper::Altered(d)) if d == *digest => bytes.map(|b| {
                    // Still one JSON value, of the same length: only the digest tells.
                    String::from_utf8(b)
                        .unwrap()
                        .replacen("\"live\"", "\"gone\"", 1)
                        .into_bytes()
                }),
                _ => bytes,
            })
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_altered_projection_blob_is_a_divergence_that_names_it() {
    let h = H::new(POLICY);
    let home = h.base.join("home");
    let log = std::sync::Arc::new(HookedLog {
        inner: ice_log::sqlite::SqliteLog::create(&home.join("tampered.db")).unwrap(),
        hooks: Tampered {
            tamper: std::sync::Mutex::new(None),
        },
    });
    let clock = std::sync::Arc::new(ice_log::clock::SystemClock);
    let rt = ice_runtime::Runtime::new(
        std::sync::Arc::new(ice_log::ledger::Ledger::new(log.clone(), clock.clone())),
        clock,
        ice_runtime::Installation {
            runs_dir: home.join("runs"),
            policy_dir: h.policies.clone(),
        },
    )
    .unwrap();
    let plan = long_path_plan(&h, 8);
    let (spec, mut agent) = h.spec("lost", "coder", "", &plan);
    let report = rt
        .start(spec, &mut agent, &ice_runtime::Quiet)
        .await
        .unwrap();
    assert_eq!(report.outcome, ice_runtime::RunOutcome::Committed);
    let run = RunId::new("lost").unwrap();
    let events = ice_runtime::read_run(rt.ledger().log().as_ref(), &run)
        .await
        .unwrap();
    let done = of_type(&events, ice_kernel::EventType::RunTerminated)[0];
    let digest = ice_kernel::blob::blob_refs(&done.payload)
        .unwrap()
        .into_iter()
        .find(|r| r.field == "projection")
        .expect("the projection is moved to a blob")
        .digest;
    let r = rt.replay(&run).await.unwrap();
    assert!(r.divergences.is_empty(), "{:?}", r.divergences);

    for (tamper, what) in [
        (Tamper::Missing(digest), "that is not stored"),
        (Tamper::Altered(digest), "was altered"),
    ] {
        *log.hooks.tamper.lock().unwrap() = Some(tamper);
        let r = rt.replay(&run).await.unwrap();
        // One divergence, at the event, naming the blob: not a field-by-field comparison of
        // the reference with the rebuilt projection.
        assert_eq!(r.divergences.len(), 1, "{:?}", r.divergences);
        let d = &r.divergences[0];
        assert!(d.what.contains(&digest.to_hex()), "{d:?}");
        assert!(d.what.contains("projection"), "{d:?}");
        assert!(d.what.contains(what), "{d:?}");
        assert_eq!(d.event.as_deref(), Some(done.id().to_string().as_str()));
        // Re-driving the agent reports it the same way, without driving it.
        let (_, mut again) = h.spec("lost-replay", "coder", "", &plan);
        let r = rt.replay_drive(&run, &mut again).await.unwrap();
        assert_eq!(r.divergences.len(), 1, "{:?}", r.divergences);
        assert!(r.divergences[0].what.contains(&digest.to_hex()));
        assert_eq!(r.drive.unwrap().proposals, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_spec_moved_to_a_blob_is_read_back_for_the_replay_and_the_re_drive() {
    let h = H::new(POLICY);
    let check = "[[check]]\nname = \"long\"\nrun = [\"test\", \"-n\", \"x\"]\n";
    let plan = "[[step]]\nintent = \"read\"\ncapability = \"fs.read\"\ntarget = \"hello.txt\"\n";
    let (spec, mut agent) = h.spec("spec", "coder", check, plan);
    let report = h.run(spec, &mut agent).await;
    assert_eq!(report.outcome, ice_runtime::RunOutcome::Committed);
    // The same record with the check's argument over the blob threshold: `RunProvisioned`
    // keeps its spec as a blob reference. (Recorded through the ledger, so the record is the
    // same run with only the spec grown; `runs.rs` starts such a run for real.)
    let long = "x".repeat(ice_kernel::limits::BLOB_FIELD_THRESHOLD_BYTES + 1);
    forge(&h, "spec", "spec-long", |t, p| {
        if t == "RunProvisioned" {
            let run = &mut p["spec"]["checks"][0]["run"];
            assert_eq!(run[2], "x", "{run}");
            run[2] = serde_json::json!(long);
        }
    })
    .await;
    // As stored (the runtime's `read_run` reads a blobbed spec back whole).
    let stored =
        h.rt.ledger()
            .log()
            .read_run(&RunId::new("spec-long").unwrap(), 0, 1)
            .await
            .unwrap();
    let provisioned = stored[0].event().unwrap();
    assert!(
        ice_kernel::blob::blob_refs(&provisioned.payload)
            .unwrap()
            .iter()
            .any(|r| r.field == "spec"),
        "the spec is inline"
    );
    let run = RunId::new("spec-long").unwrap();

    let r = h.rt.replay(&run).await.unwrap();
    assert!(r.divergences.is_empty(), "{:?}", r.divergences);
    assert!(r.compared);
    // What `ice replay --drive` builds the driver from.
    let spec = h.rt.recorded_spec(&run).await.unwrap().expect("a spec");
    assert_eq!(spec.checks[0].run[2], long);
    let (_, mut again) = h.spec("spec-replay", "coder", "", plan);
    let r = h.rt.replay_drive(&run, &mut again).await.unwrap();
    assert!(r.divergences.is_empty(), "{:?}", r.divergences);
    assert_eq!(r.drive.unwrap().decisions, 1);
}

/// A run resumed by an ICE with other decision rules decides by those from then on: the
/// resumption records them, so a decision before it that comes out otherwise is not checked,
/// and one after it is a divergence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumption_records_the_decision_rules_the_run_continues_under() {
    let h = H::new(POLICY);
    let plan = THREE_READS;
    suspend_on_changed_assumption(&h, "resumed").await;
    let run = RunId::new("resumed").unwrap();
    let accept = ice_runtime::operator::ReconfigurationFile {
        reason: "the config change is intended".into(),
        accept_files: true,
        ..Default::default()
    };
    h.rt.reconfigure(&run, "alice", &accept).await.unwrap();
    let (_, mut again) = h.spec("resumed-again", "coder", "", plan);
    let report =
        h.rt.resume(&run, &mut again, &ice_runtime::Quiet)
            .await
            .unwrap();
    assert_eq!(report.outcome, ice_runtime::RunOutcome::Committed);
    let events = h.events("resumed").await;
    let resumed = events
        .iter()
        .find(|e| e.event_type == "RunResumed")
        .expect("a RunResumed event");
    assert_eq!(
        resumed.payload["decision_rules"],
        serde_json::json!(ice_runtime::DECISION_RULES)
    );
    // Began under unrecorded rules, resumed under this ICE's, with a policy that now denies
    // every read: the two reads before the suspension are not checked, the one after the
    // resumption diverges.
    let recorded_version = events[2].payload["policy_version"]
        .as_str()
        .unwrap()
        .to_string();
    let denying = format!(
        "{POLICY}\n@id(\"no-reading\")\nforbid(principal, action == Action::\"fs.read\", resource);\n"
    );
    let version = version_of(&denying);
    let text = denying.clone();
    forge_replacing(
        &h,
        "resumed",
        "resumed-forged",
        &[(recorded_version.as_str(), version.as_str())],
        |t, p| {
            if t == "RunProvisioned" {
                p.as_object_mut().unwrap().remove("decision_rules");
            }
            if t == "ContextResolved" {
                p["policy_sources"] = serde_json::json!([{"name": "p.cedar", "text": text}]);
            }
        },
    )
    .await;
    let mut replayed = plan_agent(plan);
    let r =
        h.rt.replay_drive(&RunId::new("resumed-forged").unwrap(), &mut replayed)
            .await
            .unwrap();
    let d = r.drive.unwrap();
    assert_eq!(d.decision_rules, None);
    let before: Vec<&String> = d
        .unchecked
        .iter()
        .filter(|u| u.contains("the policy decides deny now"))
        .collect();
    assert_eq!(before.len(), 2, "{:?}", d.unchecked);
    assert_eq!(r.divergences.len(), 1, "{:?}", r.divergences);
    assert!(
        r.divergences[0]
            .what
            .contains("the policy decides deny now"),
        "{:?}",
        r.divergences
    );
}
