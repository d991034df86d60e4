//! Policy files: parsing and schema errors are located by file, line and column; the policy
//! version is a digest of the text; loading reads only `*.cedar` files.

use ice_authority::{
    LoadError, Location, PolicySet, PolicySource, PolicyVersion, Schema, Severity,
};

fn source(name: &str, text: &str) -> PolicySource {
    PolicySource {
        name: name.to_string(),
        text: text.to_string(),
    }
}

fn errors(sources: &[PolicySource]) -> Vec<ice_authority::Diagnostic> {
    let schema = Schema::ice().expect("ICE schema parses");
    PolicySet::check(sources, &schema)
        .into_iter()
        .filter(|d| d.severity == Severity::Error)
        .collect()
}

#[test]
fn ice_schema_parses_without_warnings() {
    let schema = Schema::ice().expect("ICE schema parses");
    assert!(schema.warnings().is_empty(), "{:?}", schema.warnings());
}

#[test]
fn syntax_error_names_file_line_and_column() {
    let text = "permit(principal, action, resource);\n\npermit(principal, action resource);\n";
    let errs = errors(&[source("broken.cedar", text)]);
    assert!(!errs.is_empty());
    let e = &errs[0];
    assert_eq!(e.file, "broken.cedar");
    // The missing comma is noticed at `resource` on line 3, column 26.
    assert_eq!(
        e.location,
        Some(Location {
            line: 3,
            column: 26
        }),
        "{e}"
    );
    let shown = e.to_string();
    assert!(shown.starts_with("broken.cedar:3:26: error: "), "{shown}");
}

#[test]
fn schema_violation_names_file_line_and_column() {
    let text = concat!(
        "// writes under src\n",
        "permit(principal == Agent::\"coder\", action == Action::\"fs.write\", resource)\n",
        "when { context.arguments.bytez < 100 };\n",
    );
    let errs = errors(&[source("typo.cedar", text)]);
    assert_eq!(errs.len(), 1, "{errs:?}");
    let e = &errs[0];
    assert_eq!(e.file, "typo.cedar");
    assert_eq!(e.policy.as_deref(), Some("typo.cedar#1"));
    let at = e.location.expect("a schema error has a location");
    assert_eq!(at.line, 3, "{e}");
    assert!(at.column >= 8, "{e}");
    assert!(e.message.contains("bytez"), "{e}");
}

#[test]
fn unknown_entity_type_and_action_are_schema_errors() {
    let text = "permit(principal == User::\"x\", action, resource);\npermit(principal, action == Action::\"fs.wirte\", resource);\n";
    let errs = errors(&[source("a.cedar", text)]);
    assert!(
        errs.iter().any(|e| e.location.map(|l| l.line) == Some(1)),
        "{errs:?}"
    );
    assert!(
        errs.iter().any(|e| e.location.map(|l| l.line) == Some(2)),
        "{errs:?}"
    );
}

#[test]
fn errors_in_several_files_are_all_reported() {
    let errs = errors(&[
        source("a.cedar", "permit(principal, action, resource)"),
        source(
            "b.cedar",
            "forbid(principal, action, resource) when { context.nope };",
        ),
        source("c.cedar", "permit(principal, action, resource);"),
    ]);
    let files: Vec<&str> = errs.iter().map(|e| e.file.as_str()).collect();
    assert!(
        files.contains(&"a.cedar") && files.contains(&"b.cedar"),
        "{errs:?}"
    );
    assert!(!files.contains(&"c.cedar"), "{errs:?}");
}

#[test]
fn load_refuses_a_set_with_any_error() {
    let schema = Schema::ice().expect("ICE schema parses");
    let result = PolicySet::from_sources(
        &[
            source("good.cedar", "permit(principal, action, resource);"),
            source(
                "bad.cedar",
                "permit(principal, action, resource) when { 1 };",
            ),
        ],
        &schema,
    );
    match result {
        Err(LoadError::Invalid { diagnostics }) => {
            assert!(diagnostics.iter().any(|d| d.file == "bad.cedar"));
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn approval_annotation_must_say_required_and_only_on_permits() {
    let errs = errors(&[source(
        "a.cedar",
        "@approval(\"maybe\")\npermit(principal, action, resource);\n\n  @approval(\"required\") forbid(principal, action, resource);\n",
    )]);
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert_eq!(errs[0].location, Some(Location { line: 1, column: 1 }));
    assert!(errs[0].message.contains("maybe"));
    assert_eq!(errs[1].location, Some(Location { line: 4, column: 3 }));
    assert!(errs[1].message.contains("forbid"));
}

#[test]
fn approval_and_external_permit_together_are_refused() {
    let errs = errors(&[source(
        "a.cedar",
        "@approval(\"required\") @external(\"permit\") permit(principal, action, resource);",
    )]);
    assert_eq!(errs.len(), 1, "{errs:?}");
}

#[test]
fn templates_are_refused_with_their_location() {
    let errs = errors(&[source(
        "t.cedar",
        "permit(principal, action, resource);\npermit(principal == ?principal, action, resource);",
    )]);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].location, Some(Location { line: 2, column: 1 }));
    assert!(errs[0].message.contains("template"));
}

#[test]
fn policy_ids_come_from_id_annotations_or_file_and_position() {
    let schema = Schema::ice().expect("ICE schema parses");
    let set = PolicySet::from_sources(
        &[source(
            "base.cedar",
            "permit(principal, action == Action::\"fs.read\", resource);\n@id(\"no-secrets\")\nforbid(principal, action, resource in Dir::\"secrets\");\n",
        )],
        &schema,
    )
    .expect("loads");
    let first = set
        .policy("base.cedar#1")
        .expect("first policy by position");
    assert_eq!(first.location, Location { line: 1, column: 1 });
    let named = set.policy("no-secrets").expect("second policy by @id");
    assert_eq!(named.location, Location { line: 2, column: 1 });
    assert!(set.policy("base.cedar#2").is_none());
}

#[test]
fn duplicate_policy_ids_are_refused() {
    let errs = errors(&[
        source("a.cedar", "@id(\"x\") permit(principal, action, resource);"),
        source("b.cedar", "@id(\"x\") forbid(principal, action, resource);"),
    ]);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].file, "b.cedar");
    assert!(errs[0].message.contains("a.cedar"));
}

#[test]
fn policy_version_changes_when_text_changes() {
    let a = [source("p.cedar", "permit(principal, action, resource);")];
    let b = [source("p.cedar", "permit(principal, action, resource); ")];
    let renamed = [source("q.cedar", "permit(principal, action, resource);")];
    assert_ne!(PolicyVersion::of(&a), PolicyVersion::of(&b));
    assert_ne!(PolicyVersion::of(&a), PolicyVersion::of(&renamed));
    assert_eq!(PolicyVersion::of(&a), PolicyVersion::of(&a.clone()));
    // Bytes moved between a file's name and its text give another version.
    let shifted_1 = [source("ab", "c")];
    let shifted_2 = [source("a", "bc")];
    assert_ne!(PolicyVersion::of(&shifted_1), PolicyVersion::of(&shifted_2));
    // The order sources are given in does not matter.
    let x = source("x.cedar", "permit(principal, action, resource);");
    let y = source("y.cedar", "forbid(principal, action, resource);");
    assert_eq!(
        PolicyVersion::of(&[x.clone(), y.clone()]),
        PolicyVersion::of(&[y, x])
    );
    let shown = PolicyVersion::of(&a).to_string();
    assert!(
        shown.starts_with("sha256:") && shown.len() == 7 + 64,
        "{shown}"
    );

    let schema = Schema::ice().expect("ICE schema parses");
    let set = PolicySet::from_sources(&a, &schema).expect("loads");
    assert_eq!(set.version(), PolicyVersion::of(&a));
}

#[test]
fn load_dir_reads_only_cedar_files_in_name_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("b.cedar"),
        "forbid(principal, action, resource in Dir::\"secrets\");",
    )
    .expect("write");
    std::fs::write(
        dir.path().join("a.cedar"),
        "permit(principal, action == Action::\"fs.read\", resource);",
    )
    .expect("write");
    std::fs::write(dir.path().join("notes.txt"), "not a policy (").expect("write");
    std::fs::create_dir(dir.path().join("sub.cedar")).expect("mkdir");
    let schema = Schema::ice().expect("ICE schema parses");
    let set = PolicySet::load_dir(dir.path(), &schema).expect("loads");
    let ids: Vec<&str> = set.policies().iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, ["a.cedar#1", "b.cedar#1"]);
    // The set keeps the files it was read from, in name order: what a run records so that a
    // replay rebuilds the same set.
    let names: Vec<&str> = set.sources().iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a.cedar", "b.cedar"]);
    assert!(set.sources()[1].text.contains("secrets"));
    let again = PolicySet::from_sources(set.sources(), &schema).expect("reloads");
    assert_eq!(again.version(), set.version());
}

#[test]
fn load_dir_names_the_missing_directory() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("nope");
    let schema = Schema::ice().expect("ICE schema parses");
    let err = PolicySet::load_dir(&missing, &schema).expect_err("missing dir");
    let shown = err.to_string();
    assert!(
        shown.contains("nope") && shown.contains("policy directory"),
        "{shown}"
    );
}

#[test]
fn check_dir_locates_errors_in_files_on_disk() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("x.cedar"),
        "permit(principal, action, resource)\nwhen { context.run == 1 };\n",
    )
    .expect("write");
    let schema = Schema::ice().expect("ICE schema parses");
    let diags = PolicySet::check_dir(dir.path(), &schema).expect("reads");
    let e = diags
        .iter()
        .find(|d| d.severity == Severity::Error)
        .expect("an error");
    assert_eq!(e.file, "x.cedar");
    assert_eq!(e.location.map(|l| l.line), Some(2), "{e}");
}

#[test]
fn a_schema_with_an_error_is_located() {
    let err = Schema::parse(
        "mine.cedarschema",
        "entity A;\nentity B in [A] = {\n  x: Strin,\n};\n",
    )
    .expect_err("unknown type");
    let d = &err.diagnostics[0];
    assert_eq!(d.file, "mine.cedarschema");
    assert!(d.location.is_some(), "{d}");
}

#[test]
fn an_oversized_policy_file_is_refused_before_it_is_parsed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let big = "// padding\n".repeat(100_000);
    std::fs::write(dir.path().join("big.cedar"), big).expect("write");
    let schema = Schema::ice().expect("ICE schema parses");
    let err = PolicySet::load_dir(dir.path(), &schema).expect_err("too big");
    assert!(err.to_string().contains("over the limit"), "{err}");
}

#[test]
fn constraint_annotations_need_a_positive_whole_number_and_a_permit() {
    let errs = errors(&[source(
        "c.cedar",
        "@max_bytes(\"ten\")\npermit(principal, action, resource);\n@timeout_ms(\"0\") permit(principal, action, resource);\n@max_bytes(\"10\") forbid(principal, action, resource);\n",
    )]);
    assert_eq!(errs.len(), 3, "{errs:?}");
    assert_eq!(errs[0].location, Some(Location { line: 1, column: 1 }));
    assert!(
        errs[0].message.contains("@max_bytes(\"ten\")"),
        "{}",
        errs[0].message
    );
    assert_eq!(errs[1].location, Some(Location { line: 3, column: 1 }));
    assert!(
        errs[1].message.contains("@timeout_ms(\"0\")"),
        "{}",
        errs[1].message
    );
    assert_eq!(errs[2].location, Some(Location { line: 4, column: 1 }));
    assert!(errs[2].message.contains("forbid"), "{}", errs[2].message);
    let ok = errors(&[source(
        "c.cedar",
        "@max_bytes(\"10\") @timeout_ms(\"250\") permit(principal, action, resource);",
    )]);
    assert!(ok.is_empty(), "{ok:?}");
}

#[test]
fn an_annotation_ice_does_not_act_on_is_a_warning_not_silence() {
    let schema = Schema::ice().expect("ICE schema parses");
    let found = PolicySet::check(
        &[source(
            "w.cedar",
            "@max_byte(\"10\")\npermit(principal, action, resource);",
        )],
        &schema,
    );
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].severity, Severity::Warning);
    assert!(
        found[0]
            .message
            .contains("@max_byte is not an annotation ICE acts on")
            && found[0].message.contains("@max_bytes"),
        "{}",
        found[0].message
    );
    // A warning does not stop the set from loading.
    PolicySet::from_sources(
        &[source(
            "w.cedar",
            "@note(\"x\") permit(principal, action, resource);",
        )],
        &schema,
    )
    .expect("loads with a warning");
}

#[test]
fn a_limit_on_actions_that_cannot_exceed_it_is_a_warning() {
    let schema = Schema::ice().expect("ICE schema parses");
    let warnings = |text: &str| -> Vec<String> {
        PolicySet::check(&[source("l.cedar", text)], &schema)
            .into_iter()
            .map(|d| {
                assert_eq!(d.severity, Severity::Warning, "{d}");
                d.message
            })
            .collect()
    };
    let w =
        warnings("@timeout_ms(\"5\") permit(principal, action == Action::\"fs.read\", resource);");
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("@timeout_ms limits nothing this permit allows"),
        "{w:?}"
    );
    let w = warnings(
        "@max_bytes(\"5\") permit(principal, action in [Action::\"fs.list\", Action::\"fs.delete\"], resource);",
    );
    assert!(w[0].contains("@max_bytes limits nothing"), "{w:?}");
    assert!(
        warnings("@timeout_ms(\"5\") @max_bytes(\"5\") permit(principal, action, resource);")
            .is_empty()
    );
    assert!(
        warnings("@max_bytes(\"5\") permit(principal, action in [Action::\"fs.list\", Action::\"fs.write\"], resource);")
            .is_empty()
    );
}
