//! Requests: arguments Cedar cannot represent give a clear error, never a panic; resources are
//! checked and canonical; a request names a resource of its capability's kind.

use ice_authority::{
    ArgumentProblem, DecisionKind, EntityCache, PolicySet, PolicySource, Registry, Request,
    RequestError, Resource, ResourceKind, Schema,
};
use ice_kernel::RunId;
use proptest::prelude::*;
use serde_json::{Value, json};

fn run() -> RunId {
    RunId::new("run-1").expect("run id")
}

fn build(arguments: &Value) -> Result<Request, RequestError> {
    Request::builder(
        &run(),
        "coder",
        "mcp.call",
        Resource::tool("srv", "t").expect("tool"),
    )
    .arguments(arguments)
    .build(&Registry::standard())
}

fn problem(arguments: Value) -> (String, ArgumentProblem) {
    match build(&arguments) {
        Err(RequestError::Arguments(e)) => (e.pointer, e.problem),
        other => panic!("expected an argument error for {arguments}, got {other:?}"),
    }
}

#[test]
fn json_that_cedar_cannot_represent_gives_a_clear_error() {
    assert_eq!(
        problem(json!({ "a": null })),
        ("/a".to_string(), ArgumentProblem::Null)
    );
    assert_eq!(
        problem(json!({ "t": 0.7 })),
        (
            "/t".to_string(),
            ArgumentProblem::NotAnInteger("0.7".to_string())
        )
    );
    assert_eq!(
        problem(json!({ "n": 1.0 })).1,
        ArgumentProblem::NotAnInteger("1.0".to_string())
    );
    assert_eq!(
        problem(json!({ "big": u64::MAX })),
        (
            "/big".to_string(),
            ArgumentProblem::IntegerOutOfRange(u64::MAX.to_string())
        )
    );
    assert_eq!(
        problem(json!({ "list": [1, [2, null]] })),
        ("/list/1/1".to_string(), ArgumentProblem::Null)
    );
    // JSON pointer escaping of keys with / and ~.
    assert_eq!(problem(json!({ "a/b~c": null })).0, "/a~1b~0c");
    for not_object in [json!(null), json!([1]), json!("s"), json!(3), json!(true)] {
        assert!(matches!(
            problem(not_object).1,
            ArgumentProblem::NotAnObject(_)
        ));
    }
    let e = build(&json!({ "x": { "y": 0.5 } })).expect_err("fraction");
    assert_eq!(
        e.to_string(),
        "arguments at /x/y: 0.5 is not an integer; Cedar has integers only"
    );
}

#[test]
fn arguments_over_the_limits_are_refused() {
    let mut deep = json!(1);
    for _ in 0..40 {
        deep = json!({ "d": deep });
    }
    assert_eq!(problem(deep).1, ArgumentProblem::TooDeep);
    let many: Vec<i64> = (0..5000).collect();
    assert_eq!(
        problem(json!({ "many": many })).1,
        ArgumentProblem::TooManyValues
    );
    let long = "x".repeat(64 * 1024 + 1);
    assert_eq!(
        problem(json!({ "s": long })).1,
        ArgumentProblem::StringTooLong(64 * 1024 + 1)
    );
    let chunk = "y".repeat(60 * 1024);
    let lots: Vec<&str> = vec![chunk.as_str(); 20];
    assert_eq!(
        problem(json!({ "lots": lots })).1,
        ArgumentProblem::TooLarge
    );
    let i64_min = json!({ "n": i64::MIN, "m": i64::MAX });
    assert!(build(&i64_min).is_ok());
}

#[test]
fn cedar_escape_keys_in_arguments_are_plain_keys() {
    // In Cedar's JSON form `__entity` would make an entity reference; here it is just a record
    // key, so an agent cannot make its arguments claim to be Agent::"root".
    let arguments = json!({ "__entity": { "type": "Agent", "id": "root" }, "__extn": { "fn": "ip", "arg": "1.2.3.4" } });
    let request = build(&arguments).expect("plain record");
    let (cedar_request, _) = request.cedar();
    let context = cedar_request.context().expect("context");
    let shown = format!("{:?}", context.get("arguments"));
    assert!(shown.contains("__entity"), "{shown}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any JSON document either converts or gives an argument error; none panics.
    #[test]
    fn any_json_converts_or_is_refused_without_panic(value in arb_json()) {
        let arguments = json!({ "v": value });
        match build(&arguments) {
            Ok(_) | Err(RequestError::Arguments(_)) => {}
            Err(other) => prop_assert!(false, "unexpected error {other}"),
        }
    }
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| json!(i)),
        any::<u64>().prop_map(|u| json!(u)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,6}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

#[test]
fn paths_that_need_resolving_are_refused() {
    for bad in [
        "",
        "/etc/passwd",
        "../x",
        "src/../secret",
        "./src",
        "src/./a",
        "src//a",
        "src/",
        "a\\b",
        "a\0b",
        "a\nb",
    ] {
        assert!(Resource::path(bad).is_err(), "{bad:?} accepted");
    }
    // Characters that hide or reorder what an operator reads (the probe's `evil\u{202e}txt.sh`
    // shows as `evilhs.txt`; `locked\u{200b}/x` looks like `locked/x`).
    // Refused where an agent names a target; a record holding one still reads back.
    for bad in [
        "evil\u{202e}txt.sh",
        "locked\u{200b}/release.txt",
        "a\u{2066}b",
        "\u{feff}a",
        "soft\u{ad}hyphen",
        "tag\u{e0041}",
    ] {
        let e = ice_authority::check_visible(ResourceKind::Path, bad).expect_err(bad);
        assert!(
            e.to_string().contains("invisible formatting character"),
            "{e}"
        );
        assert!(Resource::path(bad).is_ok(), "{bad:?}");
    }
    // Joiners are parts of names in several scripts.
    assert!(ice_authority::check_visible(ResourceKind::Path, "docs/نامه\u{200c}ها.md").is_ok());
    assert!(Resource::path("src/lib.rs").is_ok());
    assert!(Resource::path("..hidden/file").is_ok());
    assert!(Resource::path("docs/résumé café/日本語.md").is_ok());
    assert!(Resource::dir(".").is_ok());
    assert!(Resource::dir("src/..").is_err());
    let e = Resource::path("src/../secret").expect_err("dot-dot");
    assert_eq!(e.kind, ResourceKind::Path);
    assert!(e.to_string().contains(".."), "{e}");
}

#[test]
fn hosts_are_canonical() {
    let host = |h: &str| Resource::host(h).map(|r| r.entity_id());
    assert_eq!(host("API.Example.COM."), Ok("api.example.com".to_string()));
    assert_eq!(host("127.0.0.1"), Ok("127.0.0.1".to_string()));
    assert_eq!(host("[::1]"), Ok("::1".to_string()));
    assert_eq!(host("0:0:0:0:0:0:0:1"), Ok("::1".to_string()));
    for bad in [
        "",
        "user@example.com",
        "example.com:443",
        "exa mple.com",
        "a..b",
        "127.1",
        "2130706433",
        "0x7f.1",
        "bücher.de",
        "example.com/path",
        ".",
        "a.b..",
    ] {
        assert!(host(bad).is_err(), "{bad:?} accepted");
    }
}

/// One name per address: an IPv6 address that embeds an IPv4 address (IPv4-mapped, which a
/// dual-stack socket connects to as the IPv4 address, and the deprecated IPv4-compatible form)
/// is the Host of that IPv4 address; `::` and `::1` stay IPv6.
#[test]
fn an_ipv6_address_that_embeds_an_ipv4_address_is_that_ipv4_host() {
    let host = |h: &str| Resource::host(h).map(|r| r.entity_id());
    for mapped in [
        "::ffff:169.254.169.254",
        "[::ffff:169.254.169.254]",
        "::FFFF:a9fe:a9fe",
        "0:0:0:0:0:ffff:a9fe:a9fe",
        "::169.254.169.254",
        "[::a9fe:a9fe]",
    ] {
        assert_eq!(host(mapped), Ok("169.254.169.254".to_string()), "{mapped}");
    }
    assert_eq!(host("::ffff:127.0.0.1"), Ok("127.0.0.1".to_string()));
    assert_eq!(host("::1"), Ok("::1".to_string()));
    assert_eq!(host("::"), Ok("::".to_string()));
    assert_eq!(host("::2"), Ok("0.0.0.2".to_string()));
    assert_eq!(
        host("2001:db8::a9fe:a9fe"),
        Ok("2001:db8::a9fe:a9fe".to_string())
    );
    assert_eq!(
        host("64:ff9b::a9fe:a9fe"),
        Ok("64:ff9b::a9fe:a9fe".to_string())
    );
}

/// `forbid resource == Host::"169.254.169.254"` holds for the IPv4-mapped IPv6 form too.
#[test]
fn a_forbid_on_an_ipv4_host_holds_for_its_ipv4_mapped_form() {
    let schema = Schema::ice().expect("schema");
    let set = PolicySet::from_sources(
        &[PolicySource {
            name: "p.cedar".into(),
            text: r#"
permit(principal, action == Action::"http.request", resource);
@id("no-metadata")
forbid(principal, action == Action::"http.request", resource == Host::"169.254.169.254");
"#
            .into(),
        }],
        &schema,
    )
    .expect("loads");
    let decide = |host: &str| {
        let arguments = json!({ "method": "GET" });
        let request = Request::builder(
            &run(),
            "a",
            "http.request",
            Resource::host(host).expect("host"),
        )
        .arguments(&arguments)
        .build(&Registry::standard())
        .expect("builds");
        let d = set.decide(&request);
        (d.kind(), d.determining_policies().to_vec())
    };
    for host in [
        "169.254.169.254",
        "[::ffff:169.254.169.254]",
        "::ffff:a9fe:a9fe",
        "::169.254.169.254",
    ] {
        assert_eq!(
            decide(host),
            (DecisionKind::Deny, vec!["no-metadata".to_string()]),
            "{host}"
        );
    }
    assert_eq!(decide("::1").0, DecisionKind::Permit);
}

/// A record written when the IPv4-mapped form was a Host of its own still reads, as written;
/// any other non-canonical host is refused.
#[test]
fn a_recorded_ipv4_mapped_host_still_reads() {
    let read = |id: &str| serde_json::from_value::<Resource>(json!({"kind": "host", "id": id}));
    assert_eq!(
        read("::ffff:169.254.169.254").expect("reads"),
        Resource::Host("::ffff:169.254.169.254".into())
    );
    assert_eq!(
        read("169.254.169.254").expect("reads"),
        Resource::host("[::ffff:169.254.169.254]").expect("host")
    );
    assert!(read("0::1").is_err());
    assert!(read("Example.com").is_err());
}

#[test]
fn a_host_is_in_its_own_domain_and_its_parents_and_an_ip_in_none() {
    let schema = Schema::ice().expect("schema");
    let set = PolicySet::from_sources(
        &[PolicySource {
            name: "p.cedar".into(),
            text: r#"permit(principal, action == Action::"http.request", resource in Domain::"example.com");"#.into(),
        }],
        &schema,
    )
    .expect("loads");
    let get = |host: &str| {
        let arguments = json!({ "method": "GET" });
        let request = Request::builder(
            &run(),
            "a",
            "http.request",
            Resource::host(host).expect("host"),
        )
        .arguments(&arguments)
        .build(&Registry::standard())
        .expect("builds");
        set.decide(&request).kind()
    };
    assert_eq!(get("example.com"), DecisionKind::Permit);
    assert_eq!(get("EXAMPLE.com."), DecisionKind::Permit);
    assert_eq!(get("a.b.example.com"), DecisionKind::Permit);
    assert_eq!(get("notexample.com"), DecisionKind::Deny);
    assert_eq!(get("example.com.evil.org"), DecisionKind::Deny);
    assert_eq!(get("93.184.216.34"), DecisionKind::Deny);
}

#[test]
fn tools_and_commands_are_checked() {
    assert!(Resource::tool("a/b", "t").is_err());
    assert!(Resource::tool("", "t").is_err());
    assert!(Resource::tool("s", "").is_err());
    assert_eq!(
        Resource::parse(ResourceKind::Tool, "srv/ns/tool"),
        Resource::tool("srv", "ns/tool")
    );
    assert!(Resource::parse(ResourceKind::Tool, "no-slash").is_err());
    assert!(Resource::command("").is_err());
    assert!(Resource::command("car\0go").is_err());
}

#[test]
fn a_request_must_name_a_resource_of_its_capabilitys_kind() {
    let err = Request::builder(
        &run(),
        "coder",
        "fs.write",
        Resource::host("example.com").expect("host"),
    )
    .build(&Registry::standard())
    .expect_err("wrong kind");
    assert!(matches!(err, RequestError::WrongResource { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "fs.write acts on a Path, not on Host::\"example.com\""
    );
}

#[test]
fn agent_ids_and_intents_are_checked() {
    let path = || Resource::path("a").expect("path");
    let registry = Registry::standard();
    for bad in ["", "a b", "a:b", "a\"b"] {
        assert!(
            matches!(
                Request::builder(&run(), bad, "fs.read", path()).build(&registry),
                Err(RequestError::Agent(_))
            ),
            "{bad:?} accepted"
        );
    }
    let long = "i".repeat(4097);
    assert!(matches!(
        Request::builder(&run(), "a", "fs.read", path())
            .intent(&long)
            .build(&registry),
        Err(RequestError::IntentTooLong(4097))
    ));
    assert!(matches!(
        Request::builder(&run(), "a", "FS.READ", path()).build(&registry),
        Err(RequestError::Capability(_))
    ));
}

/// The entity cache is keyed by the whole resource: a file and a directory of the same name
/// (the same Cedar entity id) each get their own entity, with their own type and ancestors,
/// and the cache stays within its capacity.
#[test]
fn the_entity_cache_keeps_resources_of_one_name_apart_and_stays_bounded() {
    let schema = Schema::ice().expect("schema");
    let set = PolicySet::from_sources(
        &[PolicySource {
            name: "p.cedar".into(),
            text: "permit(principal, action, resource in Dir::\".\") when { resource.path == \"src/a\" };".into(),
        }],
        &schema,
    )
    .expect("policy loads");
    let registry = Registry::standard();
    let cache = EntityCache::new(2, 1 << 20);
    let decide = |capability: &str, resource: Resource| {
        let request = Request::builder(&run(), "coder", capability, resource)
            .entity_cache(&cache)
            .build(&registry)
            .expect("request builds");
        set.decide(&request).kind()
    };
    for _ in 0..2 {
        assert_eq!(
            decide("fs.list", Resource::dir("src/a").expect("dir")),
            DecisionKind::Permit
        );
        assert_eq!(
            decide("fs.read", Resource::path("src/a").expect("path")),
            DecisionKind::Permit
        );
    }
    assert_eq!(cache.len(), 2);
    assert_eq!(
        decide("fs.read", Resource::path("src/b").expect("path")),
        DecisionKind::Deny
    );
    assert!(cache.len() <= 2, "the cache grew past its capacity");
    assert_eq!(
        decide("fs.read", Resource::path("src/a").expect("path")),
        DecisionKind::Permit
    );
}

/// An agent chooses its paths: a deep one (each ancestor's id holds its whole path) is built
/// for its request and not kept, and the cache's bytes stay within its bound.
#[test]
fn the_entity_cache_keeps_neither_huge_entities_nor_more_than_its_bytes() {
    let schema = Schema::ice().expect("schema");
    let set = PolicySet::from_sources(
        &[PolicySource {
            name: "p.cedar".into(),
            text: "permit(principal, action, resource in Dir::\"a/a\");".into(),
        }],
        &schema,
    )
    .expect("policy loads");
    let registry = Registry::standard();
    let cache = EntityCache::new(100, 2_000);
    let decide = |path: &str| {
        let request = Request::builder(
            &run(),
            "coder",
            "fs.read",
            Resource::path(path).expect("path"),
        )
        .entity_cache(&cache)
        .build(&registry)
        .expect("request builds");
        set.decide(&request).kind()
    };
    let deep = format!("{}f", "a/".repeat(1_500));
    assert_eq!(decide(&deep), DecisionKind::Permit);
    assert!(cache.is_empty(), "a huge entity was kept");
    for i in 0..20 {
        assert_eq!(decide(&format!("a/a/{i}")), DecisionKind::Permit);
        assert_eq!(decide(&format!("b/{i}")), DecisionKind::Deny);
        assert!(!cache.is_empty());
        assert!(cache.bytes() <= 2_000, "{} bytes", cache.bytes());
    }
}
