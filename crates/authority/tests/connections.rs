//! Connection checks (`http.connect`): the addresses an HTTP call's host resolves to are decided
//! only by the forbids written for them. A policy for any action (which decided the call) is
//! not asked again, a permit has no effect, a broken forbid refuses, and an IPv6 address that
//! embeds an IPv4 one is seen as that IPv4 address.

use std::net::IpAddr;

use ice_authority::{
    BudgetLeft, DenyReason, PolicySet, PolicySource, Registry, Request, RequestError, Resource,
    Schema, Severity, Verdict,
};
use ice_kernel::RunId;
use serde_json::json;

fn policies(text: &str) -> PolicySet {
    PolicySet::from_sources(
        &[PolicySource {
            name: "p.cedar".to_string(),
            text: text.to_string(),
        }],
        &Schema::ice().expect("ICE schema parses"),
    )
    .unwrap_or_else(|e| panic!("policies load: {e}"))
}

fn run() -> RunId {
    RunId::new("run-1").expect("run id")
}

/// The connection check of `GET http://host:port/` to `address`.
fn connection(host: &str, port: u16, address: &str, budget: BudgetLeft) -> Request {
    let arguments = json!({
        "method": "GET",
        "url": format!("http://{host}:{port}/"),
        "scheme": "http",
        "host": host,
        "port": port,
        "path": "/",
        "query": "",
    });
    let address: IpAddr = address.parse().expect("test address");
    Request::builder(
        &run(),
        "fetcher",
        "http.request",
        Resource::host(host).expect("host"),
    )
    .arguments(&arguments)
    .budget_left(budget)
    .connecting_to(address)
    .build(&Registry::standard())
    .expect("connection check builds")
}

/// The forbids of one `p.cedar` that refuse `request`, or `None`; checked against the
/// unindexed reference.
fn refused(set: &PolicySet, request: &Request) -> Option<Vec<String>> {
    let indexed = set.refuses_connection(request);
    let reference = set.decide_unindexed(request);
    match &indexed {
        Some(d) => assert_eq!(d.verdict, reference.verdict, "index and reference differ"),
        None => assert!(
            !matches!(
                reference.verdict,
                Verdict::Deny(DenyReason::Forbidden { .. } | DenyReason::ForbidFailed { .. })
            ),
            "the reference refuses: {reference}"
        ),
    }
    indexed.map(|d| d.determining_policies().to_vec())
}

const PRIVATE: &str = r#"
@id("allow-example")
permit(principal == Agent::"fetcher", action == Action::"http.request", resource in Domain::"example.com");

@id("only-example")
forbid(principal, action, resource) unless { resource in Domain::"example.com" };

@id("no-private-addresses")
forbid(principal, action == Action::"http.connect", resource)
when {
  context.address.isLoopback() ||
  context.address.isInRange(ip("0.0.0.0/8")) ||
  context.address.isInRange(ip("10.0.0.0/8")) ||
  context.address.isInRange(ip("169.254.0.0/16"))
}
unless { resource in Domain::"lab.example.com" };
"#;

#[test]
fn only_forbids_naming_the_connection_check_refuse_an_address() {
    let set = policies(PRIVATE);
    assert!(set.checks_connections());
    let none = BudgetLeft::default();
    // A public address of a permitted name: the allowlist written for every action holds for
    // the address's call, and is not asked about the address.
    assert_eq!(
        refused(
            &set,
            &connection("api.example.com", 80, "93.184.215.14", none)
        ),
        None
    );
    for address in [
        "127.0.0.1",
        "127.9.9.9",
        "::1",
        "0.0.0.0",
        "10.1.2.3",
        "169.254.169.254",
        // Mapped and compatible forms are their IPv4 address.
        "::ffff:169.254.169.254",
        "::ffff:127.0.0.1",
        "::10.0.0.1",
        // NAT64's well-known prefix reaches the IPv4 address in its last 32 bits.
        "64:ff9b::7f00:1",
        "64:ff9b::a9fe:a9fe",
    ] {
        assert_eq!(
            refused(&set, &connection("api.example.com", 80, address, none)),
            Some(vec!["no-private-addresses".to_string()]),
            "{address}"
        );
    }
    // The forbid's own exception: the call's host name is its resource.
    assert_eq!(
        refused(
            &set,
            &connection("db.lab.example.com", 80, "10.0.0.5", none)
        ),
        None
    );
    // Public IPv6, a public address through NAT64, and a prefix that is not NAT64's.
    for address in ["2606:4700::1111", "64:ff9b::808:808", "64:ff9c::7f00:1"] {
        assert_eq!(
            refused(&set, &connection("api.example.com", 443, address, none)),
            None,
            "{address}"
        );
    }
}

#[test]
fn without_a_forbid_naming_it_no_connection_is_refused() {
    let set = policies(
        r#"
permit(principal, action, resource);
forbid(principal, action, resource == Host::"127.0.0.1");
forbid(principal, action == Action::"http.request", resource) when { resource == Host::"localhost" };
"#,
    );
    assert!(!set.checks_connections());
    for host in ["localhost", "127.0.0.1", "example.com"] {
        assert_eq!(
            refused(
                &set,
                &connection(host, 80, "127.0.0.1", BudgetLeft::default())
            ),
            None,
            "{host}"
        );
    }
}

#[test]
fn a_permit_naming_the_connection_check_is_warned_about_and_changes_nothing() {
    let text = r#"
@id("connect-anywhere")
permit(principal, action == Action::"http.connect", resource);
@id("no-loopback")
forbid(principal, action in [Action::"http.connect"], resource) when { context.address.isLoopback() };
"#;
    let set = policies(text);
    let warning = set
        .warnings()
        .iter()
        .find(|d| d.policy.as_deref() == Some("connect-anywhere"))
        .unwrap_or_else(|| panic!("no warning: {:?}", set.warnings()));
    assert_eq!(warning.severity, Severity::Warning);
    assert!(warning.message.contains("no effect"), "{warning}");
    assert!(
        set.warnings()
            .iter()
            .all(|d| d.policy.as_deref() != Some("no-loopback"))
    );
    let none = BudgetLeft::default();
    assert_eq!(
        refused(&set, &connection("example.com", 80, "127.0.0.1", none)),
        Some(vec!["no-loopback".to_string()])
    );
    assert_eq!(
        refused(&set, &connection("example.com", 80, "8.8.8.8", none)),
        None
    );
}

#[test]
fn a_connection_forbid_that_fails_to_evaluate_refuses() {
    let set = policies(
        r#"
@id("overflows")
forbid(principal, action == Action::"http.connect", resource)
when { context.budget has tokens_in && context.budget.tokens_in * 1000000 < 5 };
"#,
    );
    let big = BudgetLeft {
        tokens_in: Some(u64::MAX),
        ..BudgetLeft::default()
    };
    let request = connection("example.com", 80, "8.8.8.8", big);
    let decision = set.refuses_connection(&request).expect("refused");
    assert_eq!(
        decision.verdict,
        Verdict::Deny(DenyReason::ForbidFailed {
            policies: vec!["overflows".to_string()]
        })
    );
    assert_eq!(
        refused(
            &set,
            &connection("example.com", 80, "8.8.8.8", BudgetLeft::default())
        ),
        None
    );
}

#[test]
fn the_connection_check_sees_the_calls_arguments() {
    let set = policies(
        r#"
@id("no-local-admin-port")
forbid(principal, action == Action::"http.connect", resource)
when { context.address.isLoopback() && context.arguments has port && context.arguments.port == 8080 };
"#,
    );
    let none = BudgetLeft::default();
    assert!(refused(&set, &connection("example.com", 8080, "127.0.0.1", none)).is_some());
    assert!(refused(&set, &connection("example.com", 8081, "127.0.0.1", none)).is_none());
}

#[test]
fn a_policy_for_calls_cannot_read_an_address() {
    let err = PolicySet::from_sources(
        &[PolicySource {
            name: "p.cedar".to_string(),
            text: r#"forbid(principal, action == Action::"http.request", resource) when { context.address.isLoopback() };"#.to_string(),
        }],
        &Schema::ice().expect("schema"),
    )
    .expect_err("http.request has no address");
    assert!(err.to_string().contains("p.cedar"), "{err}");
}

#[test]
fn only_an_http_call_on_a_host_has_a_connection_check() {
    let address: IpAddr = "127.0.0.1".parse().expect("address");
    let err = Request::builder(
        &run(),
        "fetcher",
        "fs.read",
        Resource::path("a").expect("path"),
    )
    .connecting_to(address)
    .build(&Registry::standard())
    .expect_err("fs.read has no connection");
    assert!(matches!(err, RequestError::Cedar(_)), "{err}");
    assert!(err.to_string().contains("fs.read"), "{err}");
    // And an ordinary request is not a connection check.
    let set = policies("");
    let read = Request::builder(
        &run(),
        "fetcher",
        "fs.read",
        Resource::path("a").expect("path"),
    )
    .build(&Registry::standard())
    .expect("request");
    assert!(set.refuses_connection(&read).is_some());
}

/// A policy for any action is not asked about addresses, even one that would hold for every
/// connection check; it is warned about, since it can never apply to one.
#[test]
fn a_policy_for_any_action_is_not_asked_about_addresses() {
    let set = policies(
        r#"
@id("everything-with-an-address")
forbid(principal, action, resource) when { context has address };
@id("loopback-connections")
forbid(principal, action in [Action::"http.request", Action::"http.connect"], resource)
when { context has address && context.address.isLoopback() };
"#,
    );
    let warned: Vec<_> = set
        .warnings()
        .iter()
        .filter_map(|d| d.policy.as_deref())
        .collect();
    assert_eq!(
        warned,
        ["everything-with-an-address"],
        "{:?}",
        set.warnings()
    );
    let none = BudgetLeft::default();
    assert_eq!(
        refused(&set, &connection("example.com", 80, "8.8.8.8", none)),
        None
    );
    assert_eq!(
        refused(&set, &connection("example.com", 80, "127.0.0.1", none)),
        Some(vec!["loopback-connections".to_string()])
    );
}

/// A denial names a refused address only for a policy denial, and every address it names in
/// the form the check decided it in.
#[test]
fn a_denial_names_addresses_as_decided() {
    use ice_authority::CapabilityDeniedPayload;
    let payload = |extra: serde_json::Value| {
        let mut p = json!({
            "capability": "http.request",
            "target": "http://example.com/",
            "reason": "policy_denied",
            "detail": "refused",
        });
        for (k, v) in extra.as_object().unwrap() {
            p[k] = v.clone();
        }
        p.as_object().unwrap().clone()
    };
    let read = |extra| CapabilityDeniedPayload::from_payload(&payload(extra));
    let ok = read(json!({"address": "127.0.0.1", "addresses": ["8.8.8.8", "2606:4700::1111"]}))
        .expect("as decided");
    assert_eq!(ok.address.as_deref(), Some("127.0.0.1"));
    for bad in [
        json!({"address": "::ffff:127.0.0.1"}),
        json!({"address": "64:ff9b::7f00:1"}),
        json!({"address": "localhost"}),
        json!({"addresses": ["::ffff:10.0.0.1"]}),
        json!({"address": "127.0.0.1", "reason": "effect_failed"}),
    ] {
        assert!(read(bad.clone()).is_err(), "{bad}");
    }
    // A failed call lists where it went without a refused address.
    read(json!({"addresses": ["127.0.0.1"], "reason": "effect_failed"})).expect("failed call");
}
