//! Policy decision latency with 5, 50 and 500 policies, beside a baseline measured in the same
//! run: the same Cedar request evaluated against the whole, un-preselected policy set with
//! Cedar's `Authorizer` directly.
//!
//! `cargo bench -p ice-authority` (release). Each figure is the p50 and p99 of single-decision
//! timings over many iterations, cycling through requests of every capability type. The target
//! (spec §11) is ≤ 10 µs p50 at 50 policies.
//!
//! - ICE decide: `PolicySet::decide` on a built request (pre-selection, evaluation, verdict).
//! - ICE build+decide: the request built from its parts first (checks, effect class, conversion
//!   to Cedar's form, resource entity with its ancestors), for a resource not seen before.
//! - cached entity: the same, the resource's entity taken from an `EntityCache` that has seen
//!   it, as the runtime does for a resource named again.
//! - baseline: `Authorizer::is_authorized` on the same Cedar request against the whole set.

use std::hint::black_box;
use std::time::Instant;

use cedar_policy as cedar;
use ice_authority::{EntityCache, PolicySet, PolicySource, Registry, Request, Resource, Schema};
use ice_kernel::RunId;
use serde_json::{Value, json};

const SAMPLES: usize = 200_000;
const WARMUP: usize = 20_000;

/// `n` policies of the shapes a real installation has: per-agent read and write areas, shared
/// forbids on secrets, HTTP reads to per-agent service domains, deletes that need approval,
/// validation commands, and MCP tool servers.
fn generate(n: usize) -> String {
    let mut out = String::new();
    let agents = (n / 5).max(1);
    for i in 0..n {
        let agent = format!("agent-{}", i % agents);
        let project = format!("proj{}", i % 17);
        let policy = match i % 10 {
            0 | 1 => format!(
                "permit(principal == Agent::\"{agent}\", action in [Action::\"fs.read\", Action::\"fs.list\"], resource in Dir::\"{project}\");"
            ),
            2 | 3 => format!(
                "permit(principal == Agent::\"{agent}\", action == Action::\"fs.write\", resource in Dir::\"{project}/src\")\nwhen {{ context.budget has bytes && context.budget.bytes > 0 }};"
            ),
            4 => format!(
                "@id(\"no-secrets-{i}\")\nforbid(principal, action, resource in Dir::\"{project}/secrets\");"
            ),
            5 => format!(
                "permit(principal == Agent::\"{agent}\", action == Action::\"http.request\", resource in Domain::\"svc{i}.example.com\")\nwhen {{ context.arguments has method && (context.arguments.method == \"GET\" || context.arguments.method == \"HEAD\") }};"
            ),
            6 => format!(
                "@approval(\"required\")\npermit(principal == Agent::\"{agent}\", action == Action::\"fs.delete\", resource in Dir::\"{project}\");"
            ),
            7 => format!(
                "permit(principal == Agent::\"{agent}\", action == Action::\"process.exec\", resource == Command::\"cargo\")\nwhen {{ context.intent like \"*check*\" && context.arguments has args && context.arguments.args.contains(\"test\") }};"
            ),
            8 => format!(
                "@external(\"permit\")\npermit(principal == Agent::\"{agent}\", action == Action::\"mcp.call\", resource in ToolServer::\"srv{}\")\nunless {{ context.budget has tool_calls && context.budget.tool_calls < 1 }};",
                i % 7
            ),
            _ => format!(
                "forbid(principal == Agent::\"{agent}\", action == Action::\"fs.write\", resource is Path in Dir::\"{project}\")\nwhen {{ resource.path like \"*.lock\" }};"
            ),
        };
        out.push_str(&policy);
        out.push('\n');
    }
    out
}

/// One request, as the runtime would receive it.
struct Spec {
    agent: String,
    capability: &'static str,
    resource: Resource,
    arguments: Value,
}

impl Spec {
    fn build(&self, run: &RunId, registry: &Registry, cache: Option<&EntityCache>) -> Request {
        let builder = Request::builder(run, &self.agent, self.capability, self.resource.clone())
            .intent("check and fix the build")
            .arguments(&self.arguments)
            .budget_left(ice_authority::BudgetLeft {
                bytes: Some(1 << 20),
                tool_calls: Some(10),
                ..Default::default()
            });
        match cache {
            Some(cache) => builder.entity_cache(cache),
            None => builder,
        }
        .build(registry)
        .expect("request builds")
    }
}

/// 20 requests aimed at policies spread over the set, so each reaches the policies a real
/// request would (permits, forbids, approvals, conditions), with every capability type.
fn specs(n: usize) -> Vec<Spec> {
    let agents = (n / 5).max(1);
    let mut out = Vec::new();
    for k in 0..20usize {
        let i = if n >= 10 {
            (k % 10) + 10 * ((k * 13) % (n / 10))
        } else {
            k % n
        };
        let agent = format!("agent-{}", i % agents);
        let project = format!("proj{}", i % 17);
        let none = json!({});
        let (capability, resource, arguments) = match i % 10 {
            0 => (
                "fs.read",
                Resource::path(&format!("{project}/README.md")),
                none,
            ),
            1 => ("fs.list", Resource::dir(&project), none),
            2 | 3 => (
                "fs.write",
                Resource::path(&format!("{project}/src/lib.rs")),
                none,
            ),
            4 => (
                "fs.read",
                Resource::path(&format!("{project}/secrets/key.pem")),
                none,
            ),
            5 => (
                "http.request",
                Resource::host(&format!("api.svc{i}.example.com")),
                json!({ "method": "GET", "url": format!("https://api.svc{i}.example.com/v1") }),
            ),
            6 => (
                "fs.delete",
                Resource::path(&format!("{project}/old.txt")),
                none,
            ),
            7 => (
                "process.exec",
                Resource::command("cargo"),
                json!({ "args": ["test", "--workspace"] }),
            ),
            8 => (
                "mcp.call",
                Resource::tool(&format!("srv{}", i % 7), "create_issue"),
                none,
            ),
            _ => (
                "fs.write",
                Resource::path(&format!("{project}/Cargo.lock")),
                none,
            ),
        };
        out.push(Spec {
            agent,
            capability,
            resource: resource.expect("valid resource"),
            arguments,
        });
    }
    out
}

struct Figures {
    p50_us: f64,
    p99_us: f64,
}

fn measure(mut one: impl FnMut(usize)) -> Figures {
    for i in 0..WARMUP {
        one(i);
    }
    let mut ns = Vec::with_capacity(SAMPLES);
    for i in 0..SAMPLES {
        let start = Instant::now();
        one(i);
        ns.push(start.elapsed().as_nanos() as u64);
    }
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() as f64 - 1.0) * q) as usize] as f64 / 1000.0;
    Figures {
        p50_us: at(0.50),
        p99_us: at(0.99),
    }
}

fn main() {
    let schema = Schema::ice().expect("ICE schema");
    let registry = Registry::standard();
    let run = RunId::new("bench-run").expect("run id");
    let authorizer = cedar::Authorizer::new();
    println!(
        "policy decision latency, µs (p50 / p99 of {SAMPLES} single decisions, 20 requests over all capability types)"
    );
    println!(
        "{:>8}  {:>17}  {:>19}  {:>19}  {:>28}  {:>9}  {:>11}",
        "policies",
        "ICE decide",
        "ICE build+decide",
        "cached entity",
        "baseline: Authorizer, whole",
        "ratio p50",
        "considered"
    );
    let mut mix = Vec::new();
    for n in [5usize, 50, 500] {
        let sources = [PolicySource {
            name: "bench.cedar".to_string(),
            text: generate(n),
        }];
        let set = PolicySet::from_sources(&sources, &schema)
            .unwrap_or_else(|e| panic!("generated policies load: {e}"));
        assert_eq!(set.len(), n);
        let specs = specs(n);
        let reqs: Vec<Request> = specs
            .iter()
            .map(|s| s.build(&run, &registry, None))
            .collect();
        // The same decisions both ways, before timing anything.
        let mut considered = 0;
        let mut kinds = std::collections::BTreeMap::new();
        for r in &reqs {
            assert_eq!(set.decide(r), set.decide_unindexed(r));
            let explanation = set.explain(r);
            considered += explanation.considered;
            *kinds
                .entry(explanation.decision.kind().to_string())
                .or_insert(0) += 1;
        }
        mix.push(format!("{n}: {kinds:?}"));
        let ice = measure(|i| {
            black_box(set.decide(black_box(&reqs[i % reqs.len()])));
        });
        let ice_full = measure(|i| {
            let request = specs[i % specs.len()].build(&run, &registry, None);
            black_box(set.decide(&request));
        });
        let cache = EntityCache::default();
        let ice_cached = measure(|i| {
            let request = specs[i % specs.len()].build(&run, &registry, Some(&cache));
            black_box(set.decide(&request));
        });
        let whole = set.cedar();
        let baseline = measure(|i| {
            let (request, entities) = reqs[i % reqs.len()].cedar();
            black_box(authorizer.is_authorized(black_box(request), whole, entities));
        });
        println!(
            "{:>8}  {:>7.2} / {:>7.2}  {:>8.2} / {:>8.2}  {:>8.2} / {:>8.2}  {:>13.2} / {:>12.2}  {:>9.2}  {:>11.1}",
            n,
            ice.p50_us,
            ice.p99_us,
            ice_full.p50_us,
            ice_full.p99_us,
            ice_cached.p50_us,
            ice_cached.p99_us,
            baseline.p50_us,
            baseline.p99_us,
            baseline.p50_us / ice.p50_us,
            considered as f64 / reqs.len() as f64,
        );
    }
    println!(
        "ratio = baseline p50 / ICE decide p50 (> 1: pre-selection is faster); considered = mean policies evaluated per request after pre-selection"
    );
    println!("decisions of the requests: {}", mix.join("; "));
    println!("target (spec §11): ICE decide ≤ 10 µs p50 at 50 policies");
}
