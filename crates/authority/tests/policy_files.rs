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
    std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
    std::fs::write(dir.path().join("sub").join("c.cedar"), "forbid(").expect("write");
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

/// A `*.cedar` entry that is not a readable file is refused, not skipped: skipping a dangling
/// link or a directory would drop its forbids without a word.
#[test]
fn a_policy_entry_that_is_not_a_regular_file_is_refused() {
    let schema = Schema::ice().expect("ICE schema parses");
    for make in ["dangling link", "directory"] {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(
            dir.path().join("10-permit.cedar"),
            "permit(principal, action, resource);\n",
        )
        .expect("write");
        let entry = dir.path().join("20-locked.cedar");
        match make {
            "dangling link" => {
                std::os::unix::fs::symlink(dir.path().join("gone.cedar"), &entry).expect("link")
            }
            _ => std::fs::create_dir(&entry).expect("dir"),
        }
        let err = PolicySet::load_dir(dir.path(), &schema).expect_err(make);
        let shown = err.to_string();
        assert!(
            shown.contains("20-locked.cedar") && shown.contains("not a regular file"),
            "{make}: {shown}"
        );
    }
    // A link to a policy file is read through.
    let dir = tempfile::tempdir().expect("temp dir");
    let real = dir.path().join("real.txt");
    std::fs::write(&real, "forbid(principal, action, resource);\n").expect("write");
    std::os::unix::fs::symlink(&real, dir.path().join("linked.cedar")).expect("link");
    PolicySet::load_dir(dir.path(), &schema).expect("a link to a file loads");
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

/// The nesting error among these diagnostics, if any.
fn too_deep(diagnostics: &[ice_authority::Diagnostic]) -> Option<&ice_authority::Diagnostic> {
    diagnostics.iter().find(|d| {
        d.severity == Severity::Error
            && (d.message.contains("nest more than") || d.message.contains("levels deep"))
    })
}

/// The location of the `n`-th (from 1) occurrence of `needle` in `text`.
fn nth(text: &str, needle: &str, n: usize) -> Location {
    nth_after(text, "", needle, n)
}

/// The location of the `n`-th (from 1) occurrence of `needle` after the first of `after`.
fn nth_after(text: &str, after: &str, needle: &str, n: usize) -> Location {
    let start = text.find(after).expect("occurs") + after.len();
    let (offset, _) = text[start..]
        .match_indices(needle)
        .nth(n - 1)
        .expect("occurs");
    Location::of_offset(text, start + offset)
}

fn nested(open: &str, inner: &str, close: &str, n: usize) -> String {
    format!("{}{inner}{}", open.repeat(n), close.repeat(n))
}

#[test]
fn a_policy_nested_beyond_the_limit_is_refused_where_it_crosses_the_limit() {
    use ice_authority::limits::MAX_POLICY_NESTING;
    assert_eq!(MAX_POLICY_NESTING, 32);
    // `when {` is the first level, so the 32nd `(` of the condition is the 33rd.
    for (open, close) in [("(", ")"), ("[", "]"), ("{a: ", "}")] {
        for n in [MAX_POLICY_NESTING, 160, 575, 5_000] {
            let text = format!(
                "// deep\npermit(principal, action, resource)\nwhen {{ {} }};\n",
                nested(open, "true", close, n)
            );
            let errs = errors(&[source("deep.cedar", &text)]);
            assert_eq!(errs.len(), 1, "{errs:?}");
            let e = too_deep(&errs).expect("refused for its nesting");
            assert_eq!(e.file, "deep.cedar");
            let at = nth_after(&text, "when {", open, MAX_POLICY_NESTING);
            assert_eq!(at.line, 3);
            assert_eq!(e.location, Some(at), "{e}");
            let shown = e.to_string();
            assert!(
                shown.starts_with(&format!("deep.cedar:3:{}: error: ", at.column))
                    && shown.contains("more than 32 deep"),
                "{shown}"
            );
        }
    }
    // Loading the directory says the same, and nothing overflows.
    let dir = tempfile::tempdir().expect("temp dir");
    let text = format!(
        "permit(principal, action, resource) when {{ {} }};",
        nested("(", "true", ")", 575)
    );
    std::fs::write(dir.path().join("deep.cedar"), &text).expect("write");
    let schema = Schema::ice().expect("ICE schema parses");
    let err = PolicySet::load_dir(dir.path(), &schema).expect_err("too deep");
    let at = nth(&text, "(", MAX_POLICY_NESTING + 1);
    assert!(
        err.to_string()
            .contains(&format!("deep.cedar:1:{}: error: ", at.column)),
        "{err}"
    );
}

#[test]
fn if_expressions_count_as_nesting() {
    // An `else if` chain nests without brackets.
    let chain = |n: usize| {
        format!(
            "permit(principal, action, resource)\nwhen {{ {}true }};",
            "if context.intent == \"x\" then false else ".repeat(n)
        )
    };
    assert!(errors(&[source("ifs.cedar", &chain(31))]).is_empty());
    for n in [32, 2_000] {
        let text = chain(n);
        let errs = errors(&[source("ifs.cedar", &text)]);
        let e = too_deep(&errs).expect("refused for its nesting");
        assert_eq!(e.location, Some(nth(&text, "if ", 32)), "{e}");
        assert!(e.message.contains("if-expressions"), "{e}");
    }
}

#[test]
fn an_expression_deeper_than_the_limit_is_refused_where_it_crosses_the_limit() {
    use ice_authority::limits::MAX_POLICY_EXPRESSION_DEPTH;
    assert_eq!(MAX_POLICY_EXPRESSION_DEPTH, 128);
    // A chain of `+` is as deep as it is long (Cedar's tree leans left); 32,575 of them (130 KB)
    // overflowed a 2 MiB stack when the policy was dropped. Scope and `when` take 6 levels, the
    // comparison 1.
    let sum = |n: usize| {
        format!(
            "permit(principal, action, resource) when {{ 1{} > 0 }};",
            " + 1".repeat(n)
        )
    };
    assert!(errors(&[source("sum.cedar", &sum(121))]).is_empty());
    for n in [122, 123, 40_000] {
        let text = sum(n);
        let errs = errors(&[source("sum.cedar", &text)]);
        assert_eq!(errs.len(), 1, "{errs:?}");
        let e = too_deep(&errs).expect("refused for its depth");
        // The 123rd `+` makes 129 levels (with its right operand still to come); with 122, the
        // `>` does.
        let at = if n == 122 {
            nth(&text, ">", 1)
        } else {
            nth(&text, "+", 123)
        };
        assert_eq!(e.location, Some(at), "{e}");
        let shown = e.to_string();
        assert!(
            shown.starts_with("sum.cedar:1:") && shown.contains("more than 128 levels deep"),
            "{shown}"
        );
    }
    // `||` chains count once per operand, not once per token.
    let any_of = |n: usize| {
        let names: Vec<String> = (0..n)
            .map(|i| format!("context.intent == \"i{i}\""))
            .collect();
        format!(
            "permit(principal, action, resource) when {{ {} }};",
            names.join(" || ")
        )
    };
    assert!(errors(&[source("or.cedar", &any_of(121))]).is_empty());
    assert!(too_deep(&errors(&[source("or.cedar", &any_of(122))])).is_some());
}

#[test]
fn brackets_in_strings_and_comments_do_not_count() {
    let many = "([{".repeat(200);
    let text = format!(
        "// {many}\n@note(\"{many}\")\npermit(principal, action, resource)\n// {many}\nwhen {{ context.intent != \"\\\"{many}\\\\\" && context.intent like \"*{many}*\" }}; // {many}\r{}",
        "forbid(principal, action, resource) when { context.intent == \"((\" };"
    );
    let schema = Schema::ice().expect("ICE schema parses");
    let set = PolicySet::from_sources(&[source("s.cedar", &text)], &schema)
        .unwrap_or_else(|e| panic!("loads: {e}"));
    assert_eq!(set.len(), 2);
    // An unterminated string hides the rest of the file: Cedar reports the string.
    let errs = errors(&[source(
        "u.cedar",
        &format!("permit(principal, action, resource) when {{ \"{many} }};"),
    )]);
    assert!(!errs.is_empty() && too_deep(&errs).is_none(), "{errs:?}");
}

#[test]
fn policies_at_the_limits_load_and_decide_on_a_2_mib_stack() {
    use ice_authority::{DecisionKind, Registry, Request, Resource};
    // Each policy is at a limit: one more level would be refused (checked below).
    let deep_set = nested("[", "1", "]", 31);
    let deep_record = nested("{a: ", "true", "}", 31);
    let policies = [
        format!(
            "@id(\"parens\") permit(principal, action, resource) when {{ {} }};",
            nested("(", "true", ")", 31)
        ),
        format!(
            "@id(\"sets\") permit(principal, action, resource) when {{ {deep_set} == {deep_set} }};"
        ),
        format!(
            "@id(\"records\") permit(principal, action, resource) when {{ {deep_record} == {deep_record} }};"
        ),
        format!(
            "@id(\"ifs\") permit(principal, action, resource) when {{ {}true }};",
            "if context.intent == \"x\" then false else ".repeat(31)
        ),
        format!(
            "@id(\"sum\") permit(principal, action, resource) when {{ 1{} > 0 }};",
            " + 1".repeat(121)
        ),
        format!(
            "@id(\"all\") permit(principal, action, resource) when {{ context.intent == \"y\"{} }};",
            " && context.intent == \"y\"".repeat(120)
        ),
        format!(
            "@id(\"mixed\") permit(principal, action, resource) when {{ {} }};",
            nested("(1 + ", "1", ")", 30) + &" + 1".repeat(61) + " > 0"
        ),
    ];
    for p in &policies {
        assert!(errors(&[source("p.cedar", p)]).is_empty(), "{p}");
        // One level more is refused.
        let more = p
            .replacen("when { ", "when { (", 1)
            .replacen(" };", ") };", 1);
        assert!(
            too_deep(&errors(&[source("p.cedar", &more)])).is_some(),
            "{more}"
        );
    }
    let text = policies.join("\n");
    let worker = std::thread::Builder::new()
        .name("two-mib".into())
        .stack_size(2 * 1024 * 1024)
        .spawn(move || {
            let schema = Schema::ice().expect("ICE schema parses");
            let set = PolicySet::from_sources(&[source("limits.cedar", &text)], &schema)
                .unwrap_or_else(|e| panic!("loads: {e}"));
            let run = ice_kernel::RunId::new("run-1").expect("run id");
            let request = Request::builder(
                &run,
                "coder",
                "fs.read",
                Resource::path("src/lib.rs").expect("path"),
            )
            .intent("y")
            .build(&Registry::standard())
            .expect("request builds");
            let decision = set.decide(&request);
            assert_eq!(decision.kind(), DecisionKind::Permit, "{decision}");
            assert!(decision.errors.is_empty(), "{:?}", decision.errors);
            assert_eq!(
                decision.determining_policies(),
                ["all", "ifs", "mixed", "parens", "records", "sets", "sum"]
            );
            assert_eq!(set.decide_unindexed(&request), decision);
            drop(set);
        })
        .expect("spawn");
    worker.join().expect("no overflow, no panic");
}

#[test]
fn a_schema_nested_beyond_the_limit_is_refused_where_it_crosses_the_limit() {
    use ice_authority::limits::MAX_SCHEMA_NESTING;
    // 475 nested record types overflowed a 2 MiB stack while Cedar parsed the schema.
    for n in [MAX_SCHEMA_NESTING, 600] {
        let text = format!(
            "entity A = {{\n  a: {}\n}};\n",
            nested("{ a: ", "String", " }", n)
        );
        let err = Schema::parse("deep.cedarschema", &text).expect_err("too deep");
        let d = &err.diagnostics[0];
        // The entity's `{` is the first level.
        assert_eq!(
            d.location,
            Some(nth(&text, "{ a", MAX_SCHEMA_NESTING)),
            "{d}"
        );
        assert!(
            d.to_string().starts_with("deep.cedarschema:2:")
                && d.message.contains("more than 32 deep"),
            "{d}"
        );
    }
    let sets = |n: usize| {
        format!(
            "entity A = {{ a: {}String{} }};",
            "Set<".repeat(n),
            ">".repeat(n)
        )
    };
    Schema::parse("s.cedarschema", &sets(MAX_SCHEMA_NESTING - 1)).expect("at the limit");
    Schema::parse("s.cedarschema", &sets(MAX_SCHEMA_NESTING)).expect_err("over the limit");
}

/// Some editors start a UTF-8 file with a byte-order mark: not Cedar, so it is skipped (a
/// file saved that way loads as it reads), while the file's text keeps it (the version is of
/// the file as it is).
#[test]
fn a_byte_order_mark_at_the_start_of_a_file_is_not_a_syntax_error() {
    let schema = Schema::ice().expect("ICE schema parses");
    let plain = source("a.cedar", "permit(principal, action, resource);\n");
    let marked = source("a.cedar", "\u{feff}permit(principal, action, resource);\n");
    let set = PolicySet::from_sources(&[marked], &schema)
        .unwrap_or_else(|e| panic!("a file with a BOM loads: {e:?}"));
    let other = PolicySet::from_sources(&[plain], &schema).unwrap();
    assert_ne!(set.version(), other.version());
    // A syntax error after the mark is still placed on its line and column.
    let errs = errors(&[source(
        "b.cedar",
        "\u{feff}permit(principal, action, resource)\nfoo;\n",
    )]);
    assert!(
        errs.iter()
            .any(|d| d.file == "b.cedar" && d.location.is_some_and(|l| l.line == 2)),
        "{errs:?}"
    );
}

/// The finding (policy probe): a policy naming an entity in a form the runtime never builds
/// (a host in capitals or with a trailing dot, a directory with `./` or a trailing slash, an
/// absolute path, an agent id ICE refuses) passed `ice policy check` and silently matched
/// nothing: a forbid written so protected nothing. Each is a warning naming the form to write.
#[test]
fn an_entity_the_runtime_never_builds_is_a_warning() {
    let schema = Schema::ice().expect("ICE schema parses");
    let text = r#"
forbid(principal, action == Action::"http.request", resource in Domain::"Evil.COM");
forbid(principal, action == Action::"http.request", resource == Host::"evil.com.");
forbid(principal, action == Action::"http.request", resource == Host::"[::ffff:10.0.0.1]");
forbid(principal, action == Action::"http.request", resource in Domain::"10.0.0.1");
forbid(principal, action == Action::"fs.read", resource in Dir::"./secret");
forbid(principal, action == Action::"fs.read", resource in Dir::"secret/");
forbid(principal, action == Action::"fs.read", resource == Path::"/secret/a");
forbid(principal == Agent::"bad agent", action, resource);
forbid(principal, action, resource) when { resource in Dir::"../up" };
permit(principal, action == Action::"http.request", resource in Domain::"example.com");
permit(principal == Agent::"coder", action == Action::"fs.read", resource in Dir::"src/a");
"#;
    let found = PolicySet::check(&[source("e.cedar", text)], &schema);
    let messages: Vec<&str> = found.iter().map(|d| d.message.as_str()).collect();
    assert_eq!(found.len(), 9, "{messages:#?}");
    for d in &found {
        assert_eq!(d.severity, Severity::Warning, "{d}");
        assert!(d.message.contains("never matches"), "{d}");
    }
    let want = [
        (2, "Domain::\"evil.com\""),
        (3, "Host::\"evil.com\""),
        (4, "Host::\"10.0.0.1\""),
        (5, "an address is in no domain"),
    ];
    for (line, text) in want {
        let d = found
            .iter()
            .find(|d| d.location.as_ref().is_some_and(|l| l.line == line))
            .unwrap_or_else(|| panic!("no warning on line {line}: {messages:#?}"));
        assert!(d.message.contains(text), "line {line}: {d}");
    }
    // Warnings: the set still loads (a policy set that loaded before still does).
    PolicySet::from_sources(&[source("e.cedar", text)], &schema).expect("loads with warnings");
}

/// The finding (policy probe): `deny.CEDAR` in the policy directory was skipped without a
/// word, its forbids with it. A file whose extension is `cedar` in another case is refused.
#[test]
fn a_policy_file_with_its_extension_in_capitals_is_refused_not_skipped() {
    let schema = Schema::ice().expect("ICE schema parses");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.cedar"),
        "permit(principal, action, resource);",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("deny.CEDAR"),
        "forbid(principal, action, resource);",
    )
    .unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not a policy").unwrap();
    let err = PolicySet::load_dir(dir.path(), &schema)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("deny.CEDAR") && err.contains("not .cedar"),
        "{err}"
    );
    std::fs::rename(dir.path().join("deny.CEDAR"), dir.path().join("deny.cedar")).unwrap();
    let set = PolicySet::load_dir(dir.path(), &schema).unwrap();
    assert_eq!(set.len(), 2);
}
