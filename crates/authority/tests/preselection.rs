//! Pre-selection by action and resource type never changes a decision: for any policy set and
//! any request, `decide` (pre-selected) equals `decide_unindexed` (every policy evaluated; for
//! a connection check, every policy whose scope names `http.connect`), verdict, determining
//! policies, errors and version alike.

use std::collections::HashSet;

use ice_authority::{
    BudgetLeft, Decision, DenyReason, EntityCache, PolicySet, PolicySource, Registry, Request,
    Resource, Schema, Verdict,
};
use ice_kernel::RunId;
use proptest::prelude::*;
use serde_json::json;

const ACTIONS: [&str; 8] = [
    "fs.read",
    "fs.list",
    "fs.write",
    "fs.delete",
    "http.request",
    "process.exec",
    "mcp.call",
    // Not a capability: a request for it is an http.request call's connection check.
    "http.connect",
];

const PRINCIPALS: [&str; 6] = [
    "principal",
    "principal == Agent::\"a1\"",
    "principal == Agent::\"a2\"",
    "principal is Agent",
    "principal in Agent::\"a1\"",
    "principal == Agent::\"a3\"",
];

const RESOURCES: [&str; 22] = [
    "resource",
    "resource == Path::\"src/lib.rs\"",
    "resource == Path::\"secrets/key\"",
    "resource == Dir::\"src\"",
    "resource == Host::\"api.example.com\"",
    "resource == Tool::\"gh/create\"",
    "resource == Command::\"cargo\"",
    "resource in Dir::\"src\"",
    "resource in Dir::\".\"",
    "resource in Dir::\"secrets\"",
    "resource in Domain::\"example.com\"",
    "resource in Domain::\"com\"",
    "resource in ToolServer::\"gh\"",
    "resource in Path::\"src/lib.rs\"",
    "resource in Host::\"api.example.com\"",
    "resource is Path",
    "resource is Dir",
    "resource is Host",
    "resource is Command",
    "resource is Tool in ToolServer::\"gh\"",
    "resource is Path in Dir::\"src\"",
    "resource is Host in Domain::\"example.org\"",
];

const CONDITIONS: [&str; 9] = [
    "",
    " when { context.effect == EffectClass::\"external\" }",
    " when { context.effect != EffectClass::\"read\" }",
    // Overflows, so fails to evaluate, when the token budget left is large.
    " when { context.budget has tokens_in && context.budget.tokens_in * 1000000 > 5 }",
    " unless { context.intent like \"*deploy*\" }",
    " when { context.run == \"run-1\" }",
    " when { context.budget has tool_calls && context.budget.tool_calls < 3 }",
    // Only a connection check has an address.
    " when { context has address && context.address.isLoopback() }",
    " unless { context has address && context.address.isInRange(ip(\"10.0.0.0/8\")) }",
];

const ANNOTATIONS: [&str; 3] = ["", "@approval(\"required\") ", "@external(\"permit\") "];

#[derive(Debug, Clone)]
struct PolicySpec {
    forbid: bool,
    annotation: usize,
    principal: usize,
    actions: Option<Vec<usize>>,
    resource: usize,
    condition: usize,
}

impl PolicySpec {
    fn text(&self) -> String {
        let action = match &self.actions {
            None => "action".to_string(),
            Some(list) if list.len() == 1 => format!("action == Action::{:?}", ACTIONS[list[0]]),
            Some(list) => format!(
                "action in [{}]",
                list.iter()
                    .map(|a| format!("Action::{:?}", ACTIONS[*a]))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let (annotation, effect) = if self.forbid {
            ("", "forbid")
        } else {
            (ANNOTATIONS[self.annotation], "permit")
        };
        format!(
            "{annotation}{effect}({}, {action}, {}){};",
            PRINCIPALS[self.principal], RESOURCES[self.resource], CONDITIONS[self.condition]
        )
    }
}

#[derive(Debug, Clone)]
struct RequestSpec {
    agent: usize,
    action: usize, // ACTIONS.len() means an unknown capability
    resource: usize,
    method: bool,
    intent: bool,
    tokens: Option<u64>,
    tool_calls: Option<u64>,
}

fn resource_for(kind_choice: usize, pick: usize) -> Resource {
    let paths = ["src/lib.rs", "secrets/key", "README.md", "src/a/b.rs"];
    let dirs = [".", "src", "src/a", "secrets"];
    let hosts = ["api.example.com", "example.com", "example.org", "10.0.0.1"];
    let tools = [
        ("gh", "create"),
        ("gh", "close"),
        ("jira", "create"),
        ("x", "y"),
    ];
    let commands = ["cargo", "rm", "make", "sh"];
    let i = pick % 4;
    let built = match kind_choice % 5 {
        0 => Resource::path(paths[i]),
        1 => Resource::dir(dirs[i]),
        2 => Resource::host(hosts[i]),
        3 => Resource::tool(tools[i].0, tools[i].1),
        _ => Resource::command(commands[i]),
    };
    built.expect("fixed resources are valid")
}

fn kind_of_action(action: &str) -> usize {
    match action {
        "fs.read" | "fs.write" | "fs.delete" => 0,
        "fs.list" => 1,
        "http.request" | "http.connect" => 2,
        "mcp.call" => 3,
        _ => 4,
    }
}

fn build_request(spec: &RequestSpec) -> Request {
    build_request_with(spec, None)
}

/// The request, its resource's entity taken from `cache` when one is given.
fn build_request_with(spec: &RequestSpec, cache: Option<&EntityCache>) -> Request {
    let run = RunId::new("run-1").expect("run id");
    let agent = ["a1", "a2", "a3"][spec.agent % 3];
    let (capability, kind) = if spec.action < ACTIONS.len() {
        (ACTIONS[spec.action], kind_of_action(ACTIONS[spec.action]))
    } else {
        ("shell.run", spec.resource / 4)
    };
    let arguments = json!({ "method": if spec.method { "GET" } else { "POST" } });
    let no_arguments = json!({});
    let intent = if spec.intent {
        "deploy the site"
    } else {
        "fix a bug"
    };
    let connect = capability == "http.connect";
    let asked = if connect { "http.request" } else { capability };
    let builder = Request::builder(&run, agent, asked, resource_for(kind, spec.resource))
        .arguments(if asked == "http.request" {
            &arguments
        } else {
            &no_arguments
        })
        .intent(intent)
        .budget_left(BudgetLeft {
            tokens_in: spec.tokens,
            tool_calls: spec.tool_calls,
            ..BudgetLeft::default()
        });
    let builder = match cache {
        Some(cache) => builder.entity_cache(cache),
        None => builder,
    };
    let addresses = ["127.0.0.1", "10.1.2.3", "8.8.8.8", "::ffff:10.0.0.1", "::1"];
    if connect {
        builder.connecting_to(
            addresses[spec.resource % addresses.len()]
                .parse()
                .expect("address"),
        )
    } else {
        builder
    }
    .build(&Registry::standard())
    .expect("request builds")
}

/// Load the policies that are valid against the schema (each alone), as one set.
fn load_valid(specs: &[PolicySpec]) -> PolicySet {
    let schema = Schema::ice().expect("schema");
    let valid: Vec<String> = specs
        .iter()
        .map(PolicySpec::text)
        .filter(|text| {
            PolicySet::from_sources(
                &[PolicySource {
                    name: "one.cedar".into(),
                    text: text.clone(),
                }],
                &schema,
            )
            .is_ok()
        })
        .collect();
    // Spread the policies over three files so ids and indexing cross files.
    let sources: Vec<PolicySource> = (0..3)
        .map(|f| PolicySource {
            name: format!("f{f}.cedar"),
            text: valid
                .iter()
                .skip(f)
                .step_by(3)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n"),
        })
        .collect();
    PolicySet::from_sources(&sources, &schema)
        .unwrap_or_else(|e| panic!("valid policies load: {e}"))
}

fn arb_policy() -> impl Strategy<Value = PolicySpec> {
    (
        any::<bool>(),
        0..ANNOTATIONS.len(),
        0..PRINCIPALS.len(),
        prop_oneof![
            1 => Just(None),
            4 => prop::collection::vec(0..ACTIONS.len(), 1..3).prop_map(Some),
        ],
        0..RESOURCES.len(),
        0..CONDITIONS.len(),
    )
        .prop_map(
            |(forbid, annotation, principal, actions, resource, condition)| PolicySpec {
                forbid,
                annotation,
                principal,
                actions,
                resource,
                condition,
            },
        )
}

fn arb_request() -> impl Strategy<Value = RequestSpec> {
    (
        0..3usize,
        0..=ACTIONS.len(),
        0..20usize,
        any::<bool>(),
        any::<bool>(),
        prop_oneof![Just(None), Just(Some(10u64)), Just(Some(u64::MAX))],
        prop_oneof![Just(None), Just(Some(1u64)), Just(Some(100u64))],
    )
        .prop_map(
            |(agent, action, resource, method, intent, tokens, tool_calls)| RequestSpec {
                agent,
                action,
                resource,
                method,
                intent,
                tokens,
                tool_calls,
            },
        )
}

fn assert_same(set: &PolicySet, request: &Request) -> Decision {
    let fast = set.decide(request);
    let reference = set.decide_unindexed(request);
    assert_eq!(
        fast, reference,
        "pre-selection changed the decision for {request:?}"
    );
    fast
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn preselection_never_changes_a_decision(
        policies in prop::collection::vec(arb_policy(), 0..40),
        requests in prop::collection::vec(arb_request(), 1..30),
    ) {
        let set = load_valid(&policies);
        // Small, so it fills and starts again within a case.
        let cache = EntityCache::new(3, 1 << 20);
        for spec in &requests {
            let request = build_request(spec);
            let fast = set.decide(&request);
            let reference = set.decide_unindexed(&request);
            prop_assert_eq!(&fast, &reference, "request {:?}", spec);
            let cached = set.decide(&build_request_with(spec, Some(&cache)));
            prop_assert_eq!(cached, fast, "the entity cache changed the decision for {:?}", spec);
            prop_assert!(cache.len() <= 3);
        }
    }
}

/// Every policy form above, every request shape: a thorough table, and proof that the table
/// reaches every kind of verdict, so the equivalence is not only shown on default denies.
#[test]
fn preselection_agrees_on_every_policy_form_and_request_shape() {
    let mut specs = Vec::new();
    for resource in 0..RESOURCES.len() {
        for (n, actions) in [
            None,
            Some(vec![2]),
            Some(vec![0, 4]),
            Some(vec![5]),
            Some(vec![6, 1]),
            Some(vec![7]),
            Some(vec![4, 7]),
        ]
        .into_iter()
        .enumerate()
        {
            specs.push(PolicySpec {
                forbid: (resource + n) % 5 == 1,
                annotation: (resource + n) % 3,
                principal: (resource * 7 + n + 1) % PRINCIPALS.len(),
                actions,
                resource,
                condition: (resource + 2 * n) % CONDITIONS.len(),
            });
        }
    }
    let set = load_valid(&specs);
    assert!(set.len() > 60, "only {} policies were valid", set.len());
    let mut seen = HashSet::new();
    let mut decisions = 0;
    let mut connect_refusals = HashSet::new();
    // Holds every resource of the table, so later requests take their entities from it.
    let cache = EntityCache::new(64, 1 << 20);
    for agent in 0..3 {
        for action in 0..=ACTIONS.len() {
            for resource in 0..20 {
                for (method, intent) in [(true, false), (false, true)] {
                    for tokens in [None, Some(10), Some(u64::MAX)] {
                        for tool_calls in [None, Some(1)] {
                            let spec = RequestSpec {
                                agent,
                                action,
                                resource,
                                method,
                                intent,
                                tokens,
                                tool_calls,
                            };
                            let request = build_request(&spec);
                            let decision = assert_same(&set, &request);
                            let cached = build_request_with(&spec, Some(&cache));
                            assert_eq!(
                                set.decide(&cached),
                                decision,
                                "the entity cache changed the decision for {spec:?}"
                            );
                            decisions += 1;
                            if ACTIONS.get(action) == Some(&"http.connect") {
                                connect_refusals.insert(set.refuses_connection(&request).is_some());
                            }
                            seen.insert(match decision.verdict {
                                Verdict::Permit { .. } => "permit",
                                Verdict::PermitWithApproval { .. } => "approval",
                                Verdict::Deny(DenyReason::NoPermit) => "no-permit",
                                Verdict::Deny(DenyReason::Forbidden { .. }) => "forbidden",
                                Verdict::Deny(DenyReason::ForbidFailed { .. }) => "forbid-failed",
                            });
                        }
                    }
                }
            }
        }
    }
    assert_eq!(decisions, 3 * 9 * 20 * 2 * 3 * 2);
    assert_eq!(
        connect_refusals.len(),
        2,
        "connection checks were only ever {connect_refusals:?}"
    );
    for kind in [
        "permit",
        "approval",
        "no-permit",
        "forbidden",
        "forbid-failed",
    ] {
        assert!(
            seen.contains(kind),
            "the table never reached {kind}: {seen:?}"
        );
    }
}

#[test]
fn preselection_considers_fewer_policies() {
    let specs: Vec<PolicySpec> = (0..ACTIONS.len())
        .flat_map(|a| {
            (0..4).map(move |c| PolicySpec {
                forbid: false,
                annotation: 0,
                principal: 1,
                actions: Some(vec![a]),
                resource: 0,
                condition: c,
            })
        })
        .collect();
    let set = load_valid(&specs);
    let request = build_request(&RequestSpec {
        agent: 0,
        action: 2,
        resource: 0,
        method: true,
        intent: false,
        tokens: None,
        tool_calls: None,
    });
    let explanation = set.explain(&request);
    assert_eq!(explanation.total, 32);
    assert_eq!(explanation.considered, 4);
}
