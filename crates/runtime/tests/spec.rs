//! Run spec values that parse but make no sense are refused when the spec is loaded, each
//! with the file, the place and the field.

use ice_runtime::RunSpec;

const HEAD: &str = "[run]\nagent = \"a\"\nworkspace = \"ws\"\n\n[agent]\ndriver = \"plan\"\nplan = \"plan.toml\"\n";

fn dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("ws")).unwrap();
    std::fs::write(dir.path().join("plan.toml"), "").unwrap();
    dir
}

fn load(dir: &tempfile::TempDir, text: &str) -> Result<RunSpec, String> {
    let path = dir.path().join("run.toml");
    std::fs::write(&path, text).unwrap();
    RunSpec::load(&path).map_err(|e| {
        let e = e.to_string();
        assert!(e.starts_with(&path.display().to_string()), "{e}");
        e
    })
}

#[test]
fn zero_durations_that_could_never_work_are_refused() {
    let d = dir();
    let cases = [
        (
            format!("{HEAD}[budget]\nwall_time = \"0s\"\n"),
            "run.toml:8:1: [budget] wall_time must be more than 0",
        ),
        (
            format!("{HEAD}[budget]\ntool_calls = 3\nwall_time = \"0ms\"\n"),
            "run.toml:8:1: [budget] wall_time must be more than 0",
        ),
        (
            format!("{HEAD}[approvals]\ntimeout = \"0s\"\n"),
            "run.toml:8:1: [approvals] timeout must be more than 0",
        ),
        (
            format!("{HEAD}[[check]]\nname = \"c\"\nrun = [\"true\"]\ntimeout = \"0m\"\n"),
            "run.toml:8:1: [[check]] \"c\" timeout must be more than 0",
        ),
        (
            format!("{HEAD}[servers.s]\ncommand = [\"x\"]\nstart_timeout = \"0s\"\n"),
            "[servers.s] start_timeout must be more than 0",
        ),
        (
            format!("{HEAD}[servers.s]\ncommand = [\"x\"]\ncall_timeout = \"0ms\"\n"),
            "[servers.s] call_timeout must be more than 0",
        ),
    ];
    for (text, want) in cases {
        let e = load(&d, &text).unwrap_err();
        assert!(e.contains(want), "{text}\n got: {e}\nwant: {want}");
    }
}

#[test]
fn a_wall_time_budget_is_kept_and_zero_limits_that_mean_none_allowed_stay_accepted() {
    let d = dir();
    let spec = load(&d, &format!("{HEAD}[budget]\nwall_time = \"1ms\"\n")).unwrap();
    assert_eq!(spec.budget.wall_time_us, Some(1000));
    // A limit of 0 tool calls or bytes is a run that may use none: meaningful, kept.
    let spec = load(
        &d,
        &format!("{HEAD}[budget]\ntool_calls = 0\nbytes = 0\nrisk = 0\n"),
    )
    .unwrap();
    assert_eq!(spec.budget.tool_calls, Some(0));
    assert_eq!(spec.budget.bytes, Some(0));
    assert_eq!(spec.budget.wall_time_us, None);
}

#[test]
fn empty_names_and_paths_and_repeated_or_blank_edged_check_names_are_refused() {
    let d = dir();
    let plan = "[agent]\ndriver = \"plan\"\nplan = \"plan.toml\"\n";
    let cases = [
        (
            format!("[run]\nagent = \"a\"\nworkspace = \"\"\n{plan}"),
            "run.toml:1:1: [run] workspace is empty",
        ),
        (
            format!("[run]\nagent = \"a\"\nworkspace = \"ws\"\npolicy = \" \"\n{plan}"),
            "run.toml:1:1: [run] policy is empty",
        ),
        (
            format!("{HEAD}[[check]]\nname = \"\"\nrun = [\"true\"]\n"),
            "run.toml:8:1: [[check]] `name` is empty",
        ),
        (
            format!(
                "{HEAD}[[check]]\nname = \"c\"\nrun = [\"true\"]\n[[check]]\nname = \"c\"\nrun = [\"false\"]\n"
            ),
            "run.toml:11:1: [[check]] \"c\": another check has this name",
        ),
        // Names that differ only in blanks cannot be told apart: a blank at either end is
        // refused, so "a" and "a " are never two checks.
        (
            format!(
                "{HEAD}[[check]]\nname = \"a\"\nrun = [\"true\"]\n[[check]]\nname = \"a \"\nrun = [\"false\"]\n"
            ),
            "run.toml:11:1: [[check]] \"a \": the name starts or ends with blanks; write it without them (\"a\")",
        ),
        (
            format!("{HEAD}[[check]]\nname = \"\\tb\"\nrun = [\"true\"]\n"),
            "run.toml:8:1: [[check]] \"\\tb\": the name starts or ends with blanks",
        ),
    ];
    for (text, want) in cases {
        let e = load(&d, &text).unwrap_err();
        assert!(e.contains(want), "{text}\n got: {e}\nwant: {want}");
    }
    // "." is this file's own directory, said explicitly.
    let spec = load(
        &d,
        &format!("[run]\nagent = \"a\"\nworkspace = \".\"\n{plan}"),
    )
    .unwrap();
    assert!(spec.workspace.is_dir());
}

#[test]
fn a_server_name_ending_in_an_underscore_is_refused_so_every_offered_tool_name_has_one_reading() {
    let d = dir();
    // Tools are offered as SERVER__TOOL: "a___x" would be tool "x" of "a_" and tool "_x" of "a".
    for (name, want) in [
        (
            "a_",
            "[servers.a_]: a server name may not end with \"_\" (tools are offered as SERVER__TOOL, so tool \"x\" of server \"a_\" would be offered as \"a___x\", which also reads as tool \"_x\" of server \"a\"",
        ),
        ("_", "[servers._]: a server name may not end with \"_\""),
        (
            "db_x_",
            "[servers.db_x_]: a server name may not end with \"_\"",
        ),
    ] {
        let text = format!("{HEAD}[servers.{name}]\ncommand = [\"x\"]\n");
        let e = load(&d, &text).unwrap_err();
        assert!(
            e.contains(&format!("run.toml:8:1: {want}")),
            "{text}\n got: {e}\nwant: {want}"
        );
    }
    // An underscore elsewhere, even at the start, gives no second reading and is kept.
    let spec = load(
        &d,
        &format!(
            "{HEAD}[servers.a]\ncommand = [\"x\"]\n[servers.a_b]\ncommand = [\"x\"]\n[servers._c]\ncommand = [\"x\"]\n"
        ),
    )
    .unwrap();
    let mut names: Vec<&str> = spec.servers.iter().map(|s| s.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["_c", "a", "a_b"]);
}
