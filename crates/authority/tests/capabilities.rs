//! The capability registry: runtime-owned effect classes, unknown capabilities are external,
//! hints only raise, HTTP methods decide the class, and the schema knows every capability.

use ice_authority::{
    Capability, CapabilityError, Classifier, EffectClass, Registry, RegistryBuilder, ResourceKind,
    Schema,
};
use serde_json::json;

#[test]
fn standard_capabilities_have_their_classes() {
    let registry = Registry::standard();
    let none = json!({});
    let class = |name: &str| registry.classify(name, &none, None);
    assert_eq!(class("fs.read"), EffectClass::Read);
    assert_eq!(class("fs.list"), EffectClass::Read);
    assert_eq!(class("fs.write"), EffectClass::InternalWrite);
    assert_eq!(class("fs.delete"), EffectClass::InternalWrite);
    // A command is not isolated (it runs with ICE's user's access): external.
    assert_eq!(class("process.exec"), EffectClass::External);
    assert_eq!(class("mcp.call"), EffectClass::External);
    let names: Vec<&str> = registry.iter().map(Capability::name).collect();
    assert_eq!(
        names,
        [
            "fs.delete",
            "fs.list",
            "fs.read",
            "fs.write",
            "http.request",
            "mcp.call",
            "process.exec"
        ]
    );
}

#[test]
fn unknown_capability_is_external() {
    let registry = Registry::standard();
    assert_eq!(
        registry.classify("shell.run", &json!({}), None),
        EffectClass::External
    );
    // No hint can lower it.
    for hint in EffectClass::ALL {
        assert_eq!(
            registry.classify("shell.run", &json!({}), Some(hint)),
            EffectClass::External
        );
    }
    // An empty registry knows nothing, so everything is external.
    let empty = RegistryBuilder::new().build();
    assert_eq!(
        empty.classify("fs.read", &json!({}), None),
        EffectClass::External
    );
}

#[test]
fn a_hint_raises_a_class_but_never_lowers_it() {
    for class in EffectClass::ALL {
        for hint in EffectClass::ALL {
            let raised = class.raise(hint);
            assert!(raised >= class, "{class} raised by {hint} gave {raised}");
            assert!(raised >= hint, "{class} raised by {hint} gave {raised}");
            assert!(raised == class || raised == hint);
        }
    }
    assert_eq!(
        EffectClass::External.raise(EffectClass::Read),
        EffectClass::External
    );
    assert_eq!(
        EffectClass::Read.raise(EffectClass::External),
        EffectClass::External
    );
    let registry = Registry::standard();
    assert_eq!(
        registry.classify("fs.read", &json!({}), Some(EffectClass::External)),
        EffectClass::External
    );
    assert_eq!(
        registry.classify("mcp.call", &json!({}), Some(EffectClass::Read)),
        EffectClass::External
    );
}

#[test]
fn an_mcp_tool_has_the_class_ice_assigns_raised_by_the_servers_hint() {
    let registry = Registry::standard();
    let args = json!({"anything": 1});
    let class = |assigned, hint| registry.classify_assigned("mcp.call", &args, assigned, hint);
    // Nothing assigned: external, whatever the server says.
    assert_eq!(class(None, None), EffectClass::External);
    assert_eq!(class(None, Some(EffectClass::Read)), EffectClass::External);
    // The operator's class holds; a hint can raise it and never lower it.
    assert_eq!(class(Some(EffectClass::Read), None), EffectClass::Read);
    assert_eq!(
        class(Some(EffectClass::Read), Some(EffectClass::External)),
        EffectClass::External
    );
    assert_eq!(
        class(Some(EffectClass::External), Some(EffectClass::Read)),
        EffectClass::External
    );
    // Only the Assigned classifier listens to an assignment.
    assert_eq!(
        registry.classify_assigned("fs.write", &args, Some(EffectClass::Read), None),
        EffectClass::InternalWrite
    );
    assert_eq!(
        registry.classify_assigned("shell.run", &args, Some(EffectClass::Read), None),
        EffectClass::External
    );
    assert_eq!(Classifier::Assigned.floor(), EffectClass::Read);
}

#[test]
fn http_get_and_head_are_reads_and_other_methods_are_external() {
    let registry = Registry::standard();
    let class = |arguments| registry.classify("http.request", &arguments, None);
    assert_eq!(class(json!({ "method": "GET" })), EffectClass::Read);
    assert_eq!(class(json!({ "method": "HEAD" })), EffectClass::Read);
    for method in [
        "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE", "PROPFIND",
    ] {
        assert_eq!(
            class(json!({ "method": method })),
            EffectClass::External,
            "{method}"
        );
    }
    // Anything unclear is external: lower case, a missing method, a method that is not a string.
    assert_eq!(class(json!({ "method": "get" })), EffectClass::External);
    assert_eq!(class(json!({ "method": " GET" })), EffectClass::External);
    assert_eq!(class(json!({})), EffectClass::External);
    assert_eq!(class(json!({ "method": ["GET"] })), EffectClass::External);
    assert_eq!(class(json!(null)), EffectClass::External);
    // A GET hinted as external is external.
    assert_eq!(
        registry.classify(
            "http.request",
            &json!({ "method": "GET" }),
            Some(EffectClass::External)
        ),
        EffectClass::External
    );
}

#[test]
fn registering_a_capability_twice_is_refused() {
    let fs_read = Capability::new(
        "fs.read",
        ResourceKind::Path,
        Classifier::Fixed(EffectClass::Read),
        "again",
    )
    .expect("valid name");
    let err = RegistryBuilder::standard()
        .register(fs_read)
        .expect_err("duplicate");
    assert_eq!(err, CapabilityError::Duplicate("fs.read".to_string()));
}

#[test]
fn a_registered_capability_keeps_its_class() {
    let search = Capability::new(
        "web.search",
        ResourceKind::Host,
        Classifier::Fixed(EffectClass::Read),
        "search the web",
    )
    .expect("valid name");
    let registry = RegistryBuilder::standard()
        .register(search)
        .expect("new name")
        .build();
    assert_eq!(
        registry.classify("web.search", &json!({}), None),
        EffectClass::Read
    );
    assert_eq!(
        registry.get("web.search").map(Capability::resource),
        Some(ResourceKind::Host)
    );
}

#[test]
fn capability_names_are_checked() {
    for bad in [
        "", "FS.read", "fs..read", ".fs", "fs.", "fs read", "fs/read", "1fs.read",
    ] {
        assert!(
            Capability::new(
                bad,
                ResourceKind::Path,
                Classifier::Fixed(EffectClass::Read),
                ""
            )
            .is_err(),
            "{bad:?} accepted"
        );
    }
    let long = "a".repeat(65);
    assert!(ice_authority::capability::check_capability_name(&long).is_err());
    assert!(ice_authority::capability::check_capability_name("mcp.call_v2-beta").is_ok());
}

#[test]
fn effect_classes_read_and_print_as_policies_spell_them() {
    for class in EffectClass::ALL {
        assert_eq!(class.as_str().parse::<EffectClass>(), Ok(class));
    }
    assert!("External".parse::<EffectClass>().is_err());
    assert!(EffectClass::Read < EffectClass::InternalWrite);
    assert!(EffectClass::InternalWrite < EffectClass::External);
}

#[test]
fn every_standard_capability_is_an_action_of_the_schema_on_its_resource_type() {
    let schema = Schema::ice().expect("ICE schema parses");
    for capability in Registry::standard().iter() {
        let action: cedar_policy::EntityUid = format!("Action::{:?}", capability.name())
            .parse()
            .expect("action uid");
        let resources: Vec<String> = schema
            .cedar()
            .resources_for_action(&action)
            .unwrap_or_else(|| panic!("{} is not an action of the schema", capability.name()))
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            resources,
            [capability.resource().entity_type()],
            "{}",
            capability.name()
        );
    }
}

#[test]
fn resource_kinds_index_their_own_position() {
    for (i, kind) in ResourceKind::ALL.into_iter().enumerate() {
        assert_eq!(kind.index(), i, "{kind}");
    }
}
