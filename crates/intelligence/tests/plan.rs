use ice_intelligence::{Plan, PlanAgent};
use ice_kernel::{Agent, AgentView, Proposal, RunId, Thought};

const PLAN: &str = r#"
agent = "planner"

[[step]]
intent = "read"
capability = "fs.read"
target = "a.txt"

[[step]]
intent = "guess"
think = "hypothesis"
text = "a is short"

[[step]]
intent = "loop"
capability = "http.request"
target = "http://127.0.0.1:9/"
arguments = { method = "GET", headers = { accept = "text/plain" } }
repeat = 3

[[step]]
finish = "done"
"#;

fn view(step: u64) -> AgentView {
    AgentView {
        run_id: RunId::new("r").unwrap(),
        step,
        capabilities: vec![],
        last: None,
        memories: vec![],
        tools: vec![],
        time_left_ms: None,
    }
}

#[test]
fn proposes_steps_in_order_with_repeats_and_finishes() {
    let plan = Plan::parse("plan.toml", PLAN).unwrap();
    assert_eq!(plan.agent.as_deref(), Some("planner"));
    let mut agent = PlanAgent::new("planner", plan);
    let kinds: Vec<String> = (0..7)
        .map(|n| match agent.propose(&view(n)).unwrap() {
            Proposal::Request(r) => format!("{}:{}", r.capability, r.target),
            Proposal::Think { kind, .. } => format!("{kind:?}"),
            Proposal::Finish { summary } => format!("finish:{summary}"),
            Proposal::Infer { .. } => "infer".into(),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "fs.read:a.txt",
            "HypothesisGenerated",
            "http.request:http://127.0.0.1:9/",
            "http.request:http://127.0.0.1:9/",
            "http.request:http://127.0.0.1:9/",
            "finish:done",
            "finish:plan complete",
        ]
    );
    // Deterministic: asking again for a step gives the same proposal (resume).
    assert_eq!(
        agent.propose(&view(2)).unwrap(),
        agent.propose(&view(3)).unwrap()
    );
    if let Proposal::Request(r) = agent.propose(&view(2)).unwrap() {
        assert_eq!(r.arguments["headers"]["accept"], "text/plain");
    }
    if let Proposal::Think { kind, payload, .. } = agent.propose(&view(1)).unwrap() {
        assert_eq!(kind, Thought::HypothesisGenerated);
        assert_eq!(payload["text"], "a is short");
    }
}

#[test]
fn bad_plans_name_file_line_and_problem() {
    let cases: [(&str, &str); 9] = [
        (
            "[[step]]\nintent = \"x\"\ncapability = 3\n",
            "plan.toml:3:14: invalid type",
        ),
        (
            "[[step]]\nintent = \"x\"\nfinish = \"\"\n\n[[step]]\ncapability = \"fs.read\"\ntarget = \"a\"\n",
            "plan.toml:5:1: step 2: every proposal needs an `intent`",
        ),
        (
            "[[step]]\nintent = \"x\"\n",
            "plan.toml:1:1: step 1: give exactly one of",
        ),
        (
            "[[step]]\nintent = \"x\"\ncapability = \"fs.read\"\n",
            "step 1: `fs.read` needs a `target`",
        ),
        (
            "[[step]]\nintent = \"x\"\nthink = \"daydream\"\n",
            "unknown thought kind \"daydream\"",
        ),
        (
            "[[step]]\nintent = \"x\"\ncapability = \"fs.read\"\ntarget = \"a\"\nrepeat = 0\n",
            "repeat = 0",
        ),
        (
            "[[step]]\nintent = \"x\"\ncapability = \"fs.read\"\ntarget = \"a\"\narguments = 5\n",
            "`arguments` must be a table",
        ),
        (
            "[[step]]\nintent = \"x\"\ncapabilty = \"fs.read\"\n",
            "plan.toml:3:1: unknown field `capabilty`",
        ),
        ("agent = \"bad agent\"\n", "not a valid agent id"),
    ];
    for (text, want) in cases {
        let e = Plan::parse("plan.toml", text).unwrap_err().to_string();
        assert!(e.contains(want), "{text:?}: got {e:?}, want {want:?}");
    }
}

#[test]
fn load_reports_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let e = Plan::load(&dir.path().join("nope.toml")).unwrap_err();
    assert!(e.to_string().contains("nope.toml"));
}

/// A-002 by construction: agent drivers can reach the kernel's agent protocol and nothing else
/// of ICE (no log, authority, effects or runtime), so no driver can cause an effect.
#[test]
fn drivers_depend_on_the_kernel_alone() {
    let manifest =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
    let doc: toml::Table = manifest.parse().unwrap();
    let ice: Vec<&String> = ["dependencies", "build-dependencies"]
        .iter()
        .filter_map(|s| doc.get(*s).and_then(|d| d.as_table()))
        .flat_map(|t| t.keys())
        .filter(|k| k.starts_with("ice-"))
        .collect();
    assert_eq!(ice, ["ice-kernel"]);
}
