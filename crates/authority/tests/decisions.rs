//! Decisions: default deny, permit, forbid beats permit, approval by annotation, external
//! effects need approval or an explicit permit, failed forbids deny, and explanations.

use ice_authority::{
    BudgetLeft, DecisionKind, DenyReason, EffectClass, PolicySet, PolicySource, Registry, Request,
    Resource, Schema, Verdict,
};
use ice_kernel::RunId;
use serde_json::json;

fn policies(text: &str) -> PolicySet {
    let schema = Schema::ice().expect("ICE schema parses");
    PolicySet::from_sources(
        &[PolicySource {
            name: "p.cedar".to_string(),
            text: text.to_string(),
        }],
        &schema,
    )
    .unwrap_or_else(|e| panic!("policies load: {e}"))
}

fn run() -> RunId {
    RunId::new("run-1").expect("run id")
}

fn request(agent: &str, capability: &str, resource: Resource) -> Request {
    Request::builder(&run(), agent, capability, resource)
        .build(&Registry::standard())
        .expect("request builds")
}

fn write(agent: &str, path: &str) -> Request {
    request(agent, "fs.write", Resource::path(path).expect("path"))
}

fn http(method: &str, host: &str) -> Request {
    let arguments = json!({ "method": method, "url": format!("https://{host}/") });
    Request::builder(
        &run(),
        "coder",
        "http.request",
        Resource::host(host).expect("host"),
    )
    .arguments(&arguments)
    .build(&Registry::standard())
    .expect("request builds")
}

#[test]
fn default_is_deny() {
    let set = policies("");
    let decision = set.decide(&write("coder", "src/lib.rs"));
    assert_eq!(decision.verdict, Verdict::Deny(DenyReason::NoPermit));
    assert!(decision.determining_policies().is_empty());
    let set = policies(r#"permit(principal == Agent::"other", action, resource);"#);
    assert_eq!(
        set.decide(&write("coder", "src/lib.rs")).kind(),
        DecisionKind::Deny
    );
}

#[test]
fn a_matching_permit_permits() {
    let set = policies(
        r#"permit(principal == Agent::"coder", action == Action::"fs.write", resource in Dir::"src");"#,
    );
    let decision = set.decide(&write("coder", "src/parser/mod.rs"));
    assert_eq!(
        decision.verdict,
        Verdict::Permit {
            policies: vec!["p.cedar#1".to_string()]
        }
    );
    assert_eq!(decision.policy_version, set.version());
    // Outside the directory, a prefix of the name is not the directory.
    assert_eq!(
        set.decide(&write("coder", "srcx/lib.rs")).kind(),
        DecisionKind::Deny
    );
    assert_eq!(
        set.decide(&write("coder", "README.md")).kind(),
        DecisionKind::Deny
    );
}

#[test]
fn forbid_beats_permit() {
    let set = policies(
        r#"
        permit(principal, action == Action::"fs.write", resource);
        @id("no-secrets")
        forbid(principal, action, resource in Dir::"secrets");
        "#,
    );
    assert_eq!(
        set.decide(&write("coder", "src/a.rs")).kind(),
        DecisionKind::Permit
    );
    let decision = set.decide(&write("coder", "secrets/key.pem"));
    assert_eq!(
        decision.verdict,
        Verdict::Deny(DenyReason::Forbidden {
            policies: vec!["no-secrets".to_string()]
        })
    );
}

#[test]
fn approval_annotation_gives_permit_with_approval() {
    let set = policies(
        r#"
        @approval("required")
        permit(principal, action == Action::"fs.delete", resource);
        "#,
    );
    let decision = set.decide(&request(
        "coder",
        "fs.delete",
        Resource::path("a.txt").expect("path"),
    ));
    assert_eq!(
        decision.verdict,
        Verdict::PermitWithApproval {
            policies: vec!["p.cedar#1".to_string()]
        }
    );
}

#[test]
fn forbid_beats_permit_with_approval() {
    let set = policies(
        r#"
        @approval("required")
        permit(principal, action == Action::"fs.delete", resource);
        forbid(principal, action == Action::"fs.delete", resource == Path::"Cargo.toml");
        "#,
    );
    let decision = set.decide(&request(
        "coder",
        "fs.delete",
        Resource::path("Cargo.toml").expect("path"),
    ));
    assert_eq!(
        decision.verdict,
        Verdict::Deny(DenyReason::Forbidden {
            policies: vec!["p.cedar#2".to_string()]
        })
    );
}

#[test]
fn an_outright_permit_wins_over_one_that_needs_approval() {
    let set = policies(
        r#"
        @approval("required")
        permit(principal, action == Action::"fs.write", resource);
        permit(principal == Agent::"coder", action == Action::"fs.write", resource in Dir::"src");
        "#,
    );
    assert_eq!(
        set.decide(&write("coder", "src/a.rs")).verdict,
        Verdict::Permit {
            policies: vec!["p.cedar#2".to_string()]
        }
    );
    assert_eq!(
        set.decide(&write("coder", "docs/a.md")).kind(),
        DecisionKind::PermitWithApproval
    );
}

#[test]
fn an_external_effect_needs_approval_unless_a_permit_says_external() {
    let set = policies(
        r#"
        permit(principal, action == Action::"http.request", resource in Domain::"example.com");
        @external("permit")
        permit(principal, action == Action::"http.request", resource == Host::"hooks.example.com")
        when { context.arguments has method && context.arguments.method == "POST" };
        "#,
    );
    // A GET is a read: the plain permit permits it.
    assert_eq!(
        set.decide(&http("GET", "api.example.com")).kind(),
        DecisionKind::Permit
    );
    // A POST is external: the plain permit only permits it with approval.
    let post = http("POST", "api.example.com");
    assert_eq!(post.effect(), EffectClass::External);
    assert_eq!(
        set.decide(&post).verdict,
        Verdict::PermitWithApproval {
            policies: vec!["p.cedar#1".to_string()]
        }
    );
    // Where a permit says @external("permit"), the POST is permitted outright.
    assert_eq!(
        set.decide(&http("POST", "hooks.example.com")).verdict,
        Verdict::Permit {
            policies: vec!["p.cedar#2".to_string()]
        }
    );
    // Another host is not in the domain.
    assert_eq!(
        set.decide(&http("GET", "example.org")).kind(),
        DecisionKind::Deny
    );
}

#[test]
fn policies_can_require_approval_by_effect_class() {
    let set = policies(
        r#"
        permit(principal, action, resource) when { context.effect == EffectClass::"read" };
        @approval("required")
        permit(principal, action, resource) when { context.effect == EffectClass::"internal-write" };
        "#,
    );
    assert_eq!(
        set.decide(&request(
            "coder",
            "fs.read",
            Resource::path("a").expect("path")
        ))
        .kind(),
        DecisionKind::Permit
    );
    assert_eq!(
        set.decide(&write("coder", "a")).kind(),
        DecisionKind::PermitWithApproval
    );
    assert_eq!(
        set.decide(&http("DELETE", "example.com")).kind(),
        DecisionKind::Deny
    );
}

#[test]
fn a_forbid_that_fails_to_evaluate_denies() {
    // Multiplying the budget left overflows for a large budget: the forbid errors at run time.
    let set = policies(
        r#"
        permit(principal, action, resource);
        forbid(principal, action, resource)
        when { context.budget has tokens_in && context.budget.tokens_in * 1000000 < 5 };
        "#,
    );
    let big = Request::builder(
        &run(),
        "coder",
        "fs.write",
        Resource::path("a").expect("path"),
    )
    .budget_left(BudgetLeft {
        tokens_in: Some(u64::MAX),
        ..BudgetLeft::default()
    })
    .build(&Registry::standard())
    .expect("request builds");
    let decision = set.decide(&big);
    assert_eq!(
        decision.verdict,
        Verdict::Deny(DenyReason::ForbidFailed {
            policies: vec!["p.cedar#2".to_string()]
        })
    );
    assert_eq!(decision.errors.len(), 1);
    assert_eq!(decision.errors[0].policy, "p.cedar#2");
    // Without the overflow, the forbid is simply not satisfied.
    assert_eq!(
        set.decide(&write("coder", "a")).kind(),
        DecisionKind::Permit
    );
}

#[test]
fn a_permit_that_fails_to_evaluate_does_not_permit() {
    let set = policies(
        r#"
        permit(principal, action, resource)
        when { context.budget has tokens_in && context.budget.tokens_in * 1000000 > 5 };
        "#,
    );
    let big = Request::builder(
        &run(),
        "coder",
        "fs.write",
        Resource::path("a").expect("path"),
    )
    .budget_left(BudgetLeft {
        tokens_in: Some(u64::MAX),
        ..BudgetLeft::default()
    })
    .build(&Registry::standard())
    .expect("request builds");
    let decision = set.decide(&big);
    assert_eq!(decision.verdict, Verdict::Deny(DenyReason::NoPermit));
    assert_eq!(decision.errors.len(), 1);
    // What a denial records says so (the policy probe: "no permit policy matched" alone hid
    // that the permit meant to match had failed).
    let said = decision.to_string();
    assert!(
        said.contains("no permit policy matched")
            && said.contains(&format!(
                "failed to evaluate: {} (",
                decision.errors[0].policy
            )),
        "{said}"
    );
}

#[test]
fn policies_see_the_context() {
    let set = policies(
        r#"
        @external("permit")
        permit(principal, action == Action::"process.exec", resource == Command::"cargo")
        when {
            context.run == "run-1" && context.intent like "*validation*" &&
            context.arguments has args && context.arguments.args.contains("test")
        };
        "#,
    );
    let args = json!({ "args": ["test", "--workspace"] });
    let exec = |intent: &str| {
        Request::builder(
            &run(),
            "ci",
            "process.exec",
            Resource::command("cargo").expect("command"),
        )
        .intent(intent)
        .arguments(&args)
        .build(&Registry::standard())
        .expect("request builds")
    };
    assert_eq!(
        set.decide(&exec("run the validation checks")).kind(),
        DecisionKind::Permit
    );
    assert_eq!(
        set.decide(&exec("something else")).kind(),
        DecisionKind::Deny
    );
}

#[test]
fn tools_are_in_their_server() {
    let set = policies(
        r#"@external("permit") permit(principal, action == Action::"mcp.call", resource in ToolServer::"github");"#,
    );
    let call = |server: &str, tool: &str| {
        set.decide(&request(
            "coder",
            "mcp.call",
            Resource::tool(server, tool).expect("tool"),
        ))
        .kind()
    };
    assert_eq!(call("github", "create_issue"), DecisionKind::Permit);
    assert_eq!(call("gitlab", "create_issue"), DecisionKind::Deny);
}

#[test]
fn listing_a_directory_is_in_that_directory() {
    let set =
        policies(r#"permit(principal, action == Action::"fs.list", resource in Dir::"src");"#);
    let list = |dir: &str| {
        set.decide(&request(
            "coder",
            "fs.list",
            Resource::dir(dir).expect("dir"),
        ))
        .kind()
    };
    assert_eq!(list("src"), DecisionKind::Permit);
    assert_eq!(list("src/a"), DecisionKind::Permit);
    assert_eq!(list("."), DecisionKind::Deny);
    let root = policies(r#"permit(principal, action == Action::"fs.read", resource in Dir::".");"#);
    assert_eq!(
        root.decide(&request(
            "coder",
            "fs.read",
            Resource::path("a/b/c").expect("path")
        ))
        .kind(),
        DecisionKind::Permit
    );
}

#[test]
fn an_unknown_capability_is_denied_unless_a_policy_covers_every_action() {
    let set = policies(r#"permit(principal, action == Action::"fs.read", resource);"#);
    let unknown = request(
        "coder",
        "shell.run",
        Resource::command("rm").expect("command"),
    );
    assert_eq!(unknown.effect(), EffectClass::External);
    assert_eq!(set.decide(&unknown).kind(), DecisionKind::Deny);
    let broad = policies(r#"permit(principal == Agent::"root", action, resource);"#);
    let unknown = request(
        "root",
        "shell.run",
        Resource::command("rm").expect("command"),
    );
    // An unknown capability is external, so even a blanket permit needs approval.
    assert_eq!(
        broad.decide(&unknown).kind(),
        DecisionKind::PermitWithApproval
    );
}

#[test]
fn explain_names_the_deciding_policies_and_where_they_are() {
    let set = policies(
        "permit(principal, action == Action::\"fs.write\", resource);\n\nforbid(principal, action, resource in Dir::\"secrets\");\npermit(principal, action == Action::\"fs.read\", resource);\n",
    );
    let explanation = set.explain(&write("coder", "secrets/k"));
    assert_eq!(explanation.decision.kind(), DecisionKind::Deny);
    assert_eq!(explanation.total, 3);
    // fs.read's permit was not considered for an fs.write.
    assert_eq!(explanation.considered, 2);
    assert_eq!(explanation.policies.len(), 1);
    assert_eq!(explanation.policies[0].id, "p.cedar#2");
    assert_eq!(explanation.policies[0].location.line, 3);
    let shown = explanation.to_string();
    assert!(shown.contains("forbid p.cedar#2 at p.cedar:3:1"), "{shown}");
    assert!(shown.contains("Agent::\"coder\""), "{shown}");
}

#[test]
fn a_permit_carries_the_tightest_constraints_of_every_satisfied_permit() {
    let set = policies(
        "@max_bytes(\"100\") permit(principal, action == Action::\"fs.write\", resource);\n\
         @max_bytes(\"10\") @timeout_ms(\"50\") permit(principal, action == Action::\"fs.write\", resource in Dir::\"src\");\n\
         permit(principal, action == Action::\"fs.read\", resource);\n\
         @max_bytes(\"1\") @approval(\"required\") permit(principal, action == Action::\"fs.write\", resource in Dir::\"src\");\n\
         forbid(principal, action, resource in Dir::\"secrets\");\n",
    );
    let src = set.decide(&write("coder", "src/lib.rs"));
    assert_eq!(src.kind(), DecisionKind::Permit);
    // The approval-needing permit matched too: its tighter limit is not loosened by the others.
    assert_eq!(
        src.constraints,
        ice_authority::Constraints {
            max_bytes: Some(1),
            timeout_ms: Some(50)
        }
    );
    let docs = set.decide(&write("coder", "docs/a.md"));
    assert_eq!(docs.constraints.max_bytes, Some(100));
    assert_eq!(docs.constraints.timeout_ms, None);
    let read = set.decide(&request(
        "coder",
        "fs.read",
        Resource::path("src/lib.rs").expect("path"),
    ));
    assert_eq!(read.kind(), DecisionKind::Permit);
    assert!(read.constraints.is_empty());
    let denied = set.decide(&write("coder", "secrets/k"));
    assert_eq!(denied.kind(), DecisionKind::Deny);
    assert!(denied.constraints.is_empty());
    // Pre-selection does not change them.
    assert_eq!(set.decide_unindexed(&write("coder", "src/lib.rs")), src);
    let shown = set.explain(&write("coder", "src/lib.rs")).to_string();
    assert!(
        shown.contains("@max_bytes(\"10\") @timeout_ms(\"50\")")
            && shown.contains("constraints: each use at most 1 bytes, at most 50 ms"),
        "{shown}"
    );
}

#[test]
fn may_permit_says_whether_any_permit_could_apply_to_an_agent_and_capability() {
    let set = policies(
        "permit(principal == Agent::\"coder\", action in [Action::\"fs.read\", Action::\"fs.write\"], resource in Dir::\"src\") when { context.intent != \"\" };\n\
         permit(principal, action == Action::\"fs.list\", resource);\n\
         forbid(principal, action == Action::\"fs.delete\", resource);\n\
         permit(principal == Agent::\"ops\", action, resource);\n",
    );
    assert!(set.may_permit("coder", "fs.write"));
    assert!(set.may_permit("coder", "fs.read"));
    assert!(set.may_permit("anyone", "fs.list"));
    assert!(!set.may_permit("other", "fs.write"));
    assert!(!set.may_permit("coder", "http.request"));
    // A forbid permits nothing.
    assert!(!set.may_permit("coder", "fs.delete"));
    // An unconstrained action matches every capability.
    assert!(set.may_permit("ops", "http.request"));
    assert!(!policies("").may_permit("coder", "fs.read"));
}
