//! `ice policy check` and `ice policy explain` as scripts see them: the starter policy `ice init`
//! writes, diagnostics at file:line:col with exit 1, decisions with the policies that made them,
//! bad input named, and JSON that parses.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn ice(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ice"))
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("ICE_HOME")
        .output()
        .expect("ice runs")
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A fresh installation made by `ice init`.
fn home() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let o = ice(&home, &["init", "--origin", "ice.test/policy"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    (dir, home)
}

/// A policy directory (outside any home) holding these files.
fn policy_dir(files: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    for (name, text) in files {
        std::fs::write(policies.join(name), text).unwrap();
    }
    (dir, policies)
}

fn explain(home: &Path, args: &[&str]) -> Output {
    let mut all = vec!["policy", "explain"];
    all.extend_from_slice(args);
    ice(home, &all)
}

fn explain_json(home: &Path, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let o = explain(home, &all);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    serde_json::from_str(&stdout(&o)).expect("one JSON document")
}

#[test]
fn init_writes_a_starter_policy_that_checks_clean() {
    let (_d, home) = home();
    let starter = home.join("policies/default.cedar");
    let text = std::fs::read_to_string(&starter).unwrap();
    for needle in [
        "@approval(\"required\")",
        "@external(\"permit\")",
        "Dir::\".\"",
    ] {
        assert!(text.contains(needle), "the starter explains {needle}");
    }
    let o = ice(&home, &["policy", "check"]);
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("6 policies in 1 file, policy version sha256:"),
        "{out}"
    );
    assert!(!out.contains("warning"), "{out}");

    let o = ice(&home, &["policy", "check", "--json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["valid"], true);
    assert_eq!(v["diagnostics"].as_array().unwrap().len(), 0);
    assert!(v["policy_version"].as_str().unwrap().starts_with("sha256:"));
    let policies = v["policies"].as_array().unwrap();
    assert_eq!(policies.len(), 6);
    let write = policies
        .iter()
        .find(|p| p["id"] == "write-with-approval")
        .expect("the write policy");
    assert_eq!(write["effect"], "permit");
    assert_eq!(write["annotations"]["approval"], "required");
    assert_eq!(write["file"], "default.cedar");
    assert!(write["line"].as_u64().unwrap() > 1);

    // The same directory checks the same without a home, by path.
    let elsewhere = tempfile::tempdir().unwrap();
    let dir = home.join("policies");
    let o = ice(
        elsewhere.path(),
        &["policy", "check", dir.to_str().unwrap()],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

#[test]
fn a_syntax_error_is_reported_at_file_line_and_column_with_exit_1() {
    let (_d, dir) = policy_dir(&[(
        "broken.cedar",
        "permit(principal, action, resource);\n\npermit(principal, action resource);\n",
    )]);
    let o = ice(&dir, &["policy", "check", dir.to_str().unwrap()]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    let out = stdout(&o);
    let expected = format!("{}:3:26: error: ", dir.join("broken.cedar").display());
    assert!(out.contains(&expected), "{out}");
    assert!(out.contains("invalid: 1 error"), "{out}");

    let o = ice(&dir, &["policy", "check", "--json", dir.to_str().unwrap()]);
    assert_eq!(code(&o), 1);
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["valid"], false);
    let d = &v["diagnostics"][0];
    assert_eq!(
        (&d["severity"], &d["file"], &d["line"], &d["column"]),
        (
            &Value::from("error"),
            &Value::from("broken.cedar"),
            &Value::from(3),
            &Value::from(26)
        )
    );
}

#[test]
fn schema_errors_are_reported_at_file_line_and_column_with_exit_1() {
    let (_d, dir) = policy_dir(&[
        (
            "action.cedar",
            "// an action ICE does not have\npermit(principal, action == Action::\"fs.raed\", resource);\n",
        ),
        (
            "attribute.cedar",
            "permit(principal, action == Action::\"fs.write\", resource)\nwhen { context.arguments.bytez < 100 };\n",
        ),
    ]);
    let o = ice(&dir, &["policy", "check", dir.to_str().unwrap()]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    let out = stdout(&o);
    let action = format!("{}:2:29: error: ", dir.join("action.cedar").display());
    let attribute = format!("{}:2:8: error: ", dir.join("attribute.cedar").display());
    for (expected, names) in [(action, "fs.raed"), (attribute, "bytez")] {
        let line = out
            .lines()
            .find(|l| l.starts_with(&expected))
            .unwrap_or_else(|| panic!("no {expected} in {out}"));
        assert!(line.contains(names), "{line}");
    }
    assert!(out.contains("invalid: 2 errors"), "{out}");

    // A runtime command that loads these policies refuses them, naming the same places.
    let o = explain(
        &dir,
        &[
            "--dir",
            dir.to_str().unwrap(),
            "--agent",
            "coder",
            "--action",
            "fs.read",
            "--resource",
            "a",
        ],
    );
    assert_eq!(code(&o), 1);
    let err = stderr(&o);
    assert!(err.contains("are not valid (2 errors)"), "{err}");
    assert!(err.contains("action.cedar:2:29: error"), "{err}");
}

#[test]
fn explain_a_permitted_read() {
    let (_d, home) = home();
    let o = explain(
        &home,
        &[
            "--agent",
            "coder",
            "--action",
            "fs.read",
            "--resource",
            "src/lib.rs",
        ],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("decision: permit\n"), "{out}");
    assert!(out.contains("effect:   read"), "{out}");
    assert!(out.contains("permit read-workspace at "), "{out}");
    assert!(out.contains("default.cedar:"), "{out}");
}

#[test]
fn explain_a_forbidden_write_names_the_forbid() {
    let (_d, home) = home();
    let o = explain(
        &home,
        &[
            "--agent",
            "coder",
            "--action",
            "fs.write",
            "--resource",
            ".git/config",
            "--intent",
            "fix the hooks",
        ],
    );
    // A deny is a successful explanation.
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("decision: deny\n"), "{out}");
    assert!(out.contains("forbid no-git-writes at "), "{out}");
    assert!(out.contains("a matching forbid always denies"), "{out}");

    let v = explain_json(
        &home,
        &[
            "--agent",
            "coder",
            "--action",
            "fs.write",
            "--resource",
            ".git/config",
        ],
    );
    assert_eq!(v["decision"], "deny");
    assert_eq!(v["reason"], "forbidden");
    assert_eq!(v["effect"], "internal-write");
    assert_eq!(v["policies"][0]["id"], "no-git-writes");
    assert_eq!(v["policies"][0]["effect"], "forbid");
}

#[test]
fn explain_a_write_that_needs_approval() {
    let (_d, home) = home();
    let v = explain_json(
        &home,
        &[
            "--agent",
            "coder",
            "--action",
            "fs.write",
            "--resource",
            "src/lib.rs",
            "--arg",
            "bytes=120",
        ],
    );
    assert_eq!(v["decision"], "permit-with-approval");
    assert_eq!(v["effect"], "internal-write");
    assert_eq!(v["request"]["arguments"]["bytes"], 120);
    assert_eq!(v["request"]["resource"]["kind"], "Path");
    let p = &v["policies"][0];
    assert_eq!(p["id"], "write-with-approval");
    assert_eq!(p["annotations"]["approval"], "required");
    assert!(p["why"].as_str().unwrap().contains("@approval"), "{p}");
    assert!(v["policy_version"].as_str().unwrap().starts_with("sha256:"));

    let o = explain(
        &home,
        &[
            "--agent",
            "coder",
            "--action",
            "fs.write",
            "--resource",
            "src/lib.rs",
        ],
    );
    assert!(
        stdout(&o).starts_with("decision: permit-with-approval\n"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn explain_an_external_http_post() {
    let http = r#"
@id("example-api")
permit (principal, action == Action::"http.request", resource in Domain::"example.com");

@id("deployer-posts")
@external("permit")
permit (principal == Agent::"deployer", action == Action::"http.request", resource == Host::"api.example.com")
when { context.arguments has method && context.arguments.method == "POST" };
"#;
    let (_d, dir) = policy_dir(&[("http.cedar", http)]);
    let dir_arg = dir.to_str().unwrap();
    let post = |agent: &str| {
        explain_json(
            &dir,
            &[
                "--dir",
                dir_arg,
                "--agent",
                agent,
                "--action",
                "http.request",
                "--resource",
                "API.Example.com.",
                "--args-json",
                r#"{"url": "https://api.example.com/v1/deploy", "scheme": "https"}"#,
                "--arg",
                "method=POST",
            ],
        )
    };
    // A POST is external, so a plain permit needs an operator's approval.
    let v = post("coder");
    assert_eq!(v["effect"], "external");
    assert_eq!(v["decision"], "permit-with-approval");
    assert_eq!(v["request"]["resource"]["id"], "api.example.com");
    assert_eq!(v["policies"][0]["id"], "example-api");
    assert!(
        v["policies"][0]["why"]
            .as_str()
            .unwrap()
            .contains("effect is external"),
        "{v}"
    );
    // A permit that says @external("permit") permits it outright.
    let v = post("deployer");
    assert_eq!(v["effect"], "external");
    assert_eq!(v["decision"], "permit");
    assert_eq!(v["policies"][0]["id"], "deployer-posts");
    assert_eq!(v["policies"][0]["annotations"]["external"], "permit");

    // A GET is a read.
    let v = explain_json(
        &dir,
        &[
            "--dir",
            dir_arg,
            "--agent",
            "coder",
            "--action",
            "http.request",
            "--resource",
            "api.example.com",
            "--arg",
            "method=GET",
        ],
    );
    assert_eq!(
        (&v["effect"], &v["decision"]),
        (&"read".into(), &"permit".into())
    );

    // The text form says the effect and why.
    let o = explain(
        &dir,
        &[
            "--dir",
            dir_arg,
            "--agent",
            "coder",
            "--action",
            "http.request",
            "--resource",
            "api.example.com",
            "--arg",
            "method=POST",
        ],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("effect:   external"), "{out}");
    assert!(out.contains("permit example-api at "), "{out}");
}

#[test]
fn explain_with_nothing_permitting_is_a_default_deny() {
    let (_d, home) = home();
    let v = explain_json(
        &home,
        &[
            "--agent",
            "coder",
            "--action",
            "process.exec",
            "--resource",
            "cargo",
            "--args-json",
            r#"{"args": ["test"]}"#,
        ],
    );
    assert_eq!(v["decision"], "deny");
    assert_eq!(v["reason"], "no-permit");
    assert_eq!(v["policies"].as_array().unwrap().len(), 0);
}

#[test]
fn bad_input_is_refused_naming_the_problem() {
    let (_d, home) = home();
    let base = ["--agent", "coder", "--action", "fs.read", "--resource"];
    let refused = |extra: &[&str], needles: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let o = explain(&home, &args);
        assert_eq!(code(&o), 1, "{extra:?}: {}", stdout(&o));
        assert!(stdout(&o).is_empty(), "{extra:?}: {}", stdout(&o));
        let err = stderr(&o);
        for needle in needles {
            assert!(err.contains(needle), "{extra:?}: {err}");
        }
    };
    refused(
        &["../etc/passwd"],
        &["--resource", "../etc/passwd", ".. segment"],
    );
    refused(&["/etc/passwd"], &["--resource", "absolute"]);
    refused(
        &["a", "--kind", "host"],
        &["--kind/--resource", "fs.read acts on a Path"],
    );
    refused(&["a", "--arg", "novalue"], &["--arg", "KEY=VALUE"]);
    refused(
        &["a", "--arg", "x=1.5"],
        &["--arg/--args-json", "/x", "not an integer"],
    );
    refused(
        &["a", "--args-json", "[1]"],
        &["--args-json", "JSON object"],
    );
    refused(
        &["a", "--args-json", "{"],
        &["--args-json", "not valid JSON"],
    );
    refused(&["a", "--run", "no spaces"], &["--run"]);

    let o = explain(
        &home,
        &[
            "--agent",
            "co der",
            "--action",
            "fs.read",
            "--resource",
            "a",
        ],
    );
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("--agent"), "{}", stderr(&o));

    let o = explain(
        &home,
        &["--agent", "coder", "--action", "fs.raed", "--resource", "a"],
    );
    assert_eq!(code(&o), 1);
    let err = stderr(&o);
    assert!(err.contains("unknown capability \"fs.raed\""), "{err}");
    assert!(err.contains("fs.read"), "{err}");

    // clap's own usage errors exit 2.
    assert_eq!(code(&explain(&home, &["--agent", "coder"])), 2);
    assert_eq!(
        code(&explain(
            &home,
            &[
                "--agent",
                "a",
                "--action",
                "fs.read",
                "--resource",
                "a",
                "--kind",
                "file"
            ]
        )),
        2
    );
}

#[test]
fn a_home_without_a_policy_directory_says_how_to_create_one() {
    let (_d, home) = home();
    std::fs::remove_dir_all(home.join("policies")).unwrap();
    for args in [
        &["policy", "check"][..],
        &[
            "policy",
            "explain",
            "--agent",
            "a",
            "--action",
            "fs.read",
            "--resource",
            "a",
        ],
    ] {
        let o = ice(&home, args);
        assert_eq!(code(&o), 1, "{args:?}");
        let err = stderr(&o);
        assert!(err.contains("does not exist"), "{err}");
        assert!(err.contains("ice policy init"), "{err}");
    }
    // A directory given that is a file, or is not there, is named as such.
    let file = home.join("config.toml");
    let o = ice(&home, &["policy", "check", file.to_str().unwrap()]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains(&format!("{} is not a directory", file.display())),
        "{}",
        stderr(&o)
    );
    let o = ice(&home, &["policy", "check", "/no/such/dir"]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("policy directory /no/such/dir does not exist"),
        "{}",
        stderr(&o)
    );
    let o = ice(&home, &["policy", "init"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(home.join("policies/default.cedar").is_file());
    assert_eq!(code(&ice(&home, &["policy", "check"])), 0);
    // It never overwrites a policy directory.
    let o = ice(&home, &["policy", "init"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
}

#[test]
fn policy_commands_refuse_a_directory_that_is_not_a_home() {
    let dir = tempfile::tempdir().unwrap();
    let o = ice(dir.path(), &["policy", "check"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("is not an ICE home"), "{}", stderr(&o));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn an_empty_policy_directory_is_valid_and_denies_everything() {
    let (_d, dir) = policy_dir(&[]);
    let o = ice(&dir, &["policy", "check", dir.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stdout(&o).contains("0 policies in 0 files"),
        "{}",
        stdout(&o)
    );
    assert!(stdout(&o).contains("every request will be denied"));
}

#[test]
fn explain_shows_the_limits_a_permit_puts_on_each_use() {
    let (_d, home) = home();
    std::fs::write(
        home.join("policies/limits.cedar"),
        "@id(\"small-writes\")\n@max_bytes(\"4096\")\n@timeout_ms(\"500\")\npermit (principal, action == Action::\"fs.write\", resource in Dir::\"src\");\n",
    )
    .unwrap();
    let args = [
        "--agent",
        "coder",
        "--action",
        "fs.write",
        "--resource",
        "src/lib.rs",
    ];
    let o = explain(&home, &args);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("decision: permit\n"), "{out}");
    assert!(
        out.contains("limits:   each use at most 4096 bytes, at most 500 ms"),
        "{out}"
    );
    let doc = explain_json(&home, &args);
    assert_eq!(
        doc["constraints"],
        serde_json::json!({"max_bytes": 4096, "timeout_ms": 500})
    );
    // Elsewhere only the starter's approval permit matches: no limits.
    let doc = explain_json(
        &home,
        &[
            "--agent",
            "coder",
            "--action",
            "fs.write",
            "--resource",
            "docs/a.md",
        ],
    );
    assert_eq!(doc["constraints"], serde_json::json!({}));
    // A bad value is an error `ice policy check` locates.
    std::fs::write(
        home.join("policies/limits.cedar"),
        "@max_bytes(\"4 KiB\")\npermit (principal, action == Action::\"fs.write\", resource);\n",
    )
    .unwrap();
    let o = ice(&home, &["policy", "check"]);
    assert_eq!(code(&o), 1, "{}", stdout(&o));
    let all = format!("{}{}", stdout(&o), stderr(&o));
    assert!(
        all.contains("limits.cedar:1:1") && all.contains("@max_bytes(\"4 KiB\") is not understood"),
        "{all}"
    );
}

/// `ice policy explain` decides an HTTP call on what the runtime would decide it on: the URL
/// parsed as the runtime parses an agent's, its host the resource, and `context.arguments`
/// exactly what the runtime gives ([`ice_effects::http::policy_arguments`], the function the
/// runtime calls), so a `..` cannot walk out of a URL policy here either, `port` and `scheme` are
/// filled, and an IPv4-mapped address is its IPv4 host.
#[test]
fn explain_decides_an_http_call_on_the_url_as_the_runtime_does() {
    let http = r#"
@id("my-repos")
permit (principal, action == Action::"http.request", resource == Host::"api.example.com")
when {
  context.arguments has url && context.arguments.url like "https://api.example.com/repos/me/*"
};

@id("https-anywhere")
permit (principal, action == Action::"http.request", resource)
when { context.arguments has scheme && context.arguments.scheme == "https" };

@id("only-443")
forbid (principal, action == Action::"http.request", resource)
when { context.arguments has port && context.arguments.port != 443 };

@id("no-metadata")
forbid (principal, action == Action::"http.request", resource == Host::"169.254.169.254");
"#;
    let (_d, dir) = policy_dir(&[("http.cedar", http)]);
    let dir_arg = dir.to_str().unwrap();
    let ask = |extra: &[&str]| {
        let mut args = vec![
            "--dir",
            dir_arg,
            "--agent",
            "coder",
            "--action",
            "http.request",
        ];
        args.extend_from_slice(extra);
        explain_json(&dir, &args)
    };
    let runtime_arguments = |url: &str| {
        let target = ice_effects::http::parse_target(url).unwrap();
        ice_effects::http::policy_arguments(&target, &serde_json::json!({}))
    };
    let policies = |v: &Value| -> Vec<String> {
        v["policies"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["id"].as_str().unwrap().to_string())
            .collect()
    };

    // The URL as the resource: its host is the resource; the arguments are the runtime's.
    let url = "https://API.example.com/repos/me/x?y=1";
    let v = ask(&["--resource", url]);
    assert_eq!(v["decision"], "permit", "{v}");
    assert_eq!(v["request"]["resource"]["id"], "api.example.com");
    assert_eq!(v["request"]["arguments"], runtime_arguments(url));
    assert_eq!(
        v["request"]["arguments"],
        serde_json::json!({
            "method": "GET", "url": "https://api.example.com/repos/me/x?y=1",
            "scheme": "https", "host": "api.example.com", "port": 443,
            "path": "/repos/me/x", "query": "y=1",
        })
    );

    // Dot segments are resolved before the policy reads the URL, given either way.
    for given in [
        "https://api.example.com/repos/me/../../admin",
        "https://api.example.com/repos/me/%2e%2e/%2e%2e/admin",
    ] {
        for v in [
            ask(&["--resource", given]),
            ask(&[
                "--resource",
                "api.example.com",
                "--arg",
                &format!("url={given}"),
            ]),
        ] {
            assert_eq!(
                v["request"]["arguments"]["url"],
                "https://api.example.com/admin"
            );
            assert_eq!(v["request"]["arguments"]["path"], "/admin");
            assert_eq!(v["request"]["url_given"], given);
            // Not my-repos; only the https permit matches.
            assert_eq!(policies(&v), ["https-anywhere"], "{v}");
        }
    }

    // The effective port: a forbid on it fires.
    let v = ask(&["--resource", "https://api.example.com:8443/repos/me/x"]);
    assert_eq!(
        (&v["decision"], &v["reason"]),
        (&"deny".into(), &"forbidden".into())
    );
    assert_eq!(policies(&v), ["only-443"]);
    assert_eq!(v["request"]["arguments"]["port"], 8443);

    // The IPv4-mapped form is the IPv4 host.
    let v = ask(&[
        "--resource",
        "https://[::ffff:169.254.169.254]/latest/meta-data",
    ]);
    assert_eq!(v["request"]["resource"]["id"], "169.254.169.254");
    assert_eq!(
        v["request"]["arguments"]["url"],
        "https://169.254.169.254/latest/meta-data"
    );
    assert_eq!(
        (&v["decision"], &v["reason"]),
        (&"deny".into(), &"forbidden".into())
    );
    assert_eq!(policies(&v), ["no-metadata"]);

    // The text form shows both URLs.
    let o = explain(
        &dir,
        &[
            "--dir",
            dir_arg,
            "--agent",
            "coder",
            "--action",
            "http.request",
            "--resource",
            "https://api.example.com/repos/me/../../admin",
        ],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("url:      https://api.example.com/admin (as parsed and sent; given as \"https://api.example.com/repos/me/../../admin\")"),
        "{out}"
    );

    // What the runtime would not decide on is refused, naming why.
    let refused = |extra: &[&str], needle: &str| {
        let mut args = vec![
            "policy",
            "explain",
            "--dir",
            dir_arg,
            "--agent",
            "coder",
            "--action",
            "http.request",
        ];
        args.extend_from_slice(extra);
        let o = ice(&dir, &args);
        assert_eq!(code(&o), 1, "{extra:?}: {}", stdout(&o));
        assert!(stderr(&o).contains(needle), "{extra:?}: {}", stderr(&o));
    };
    refused(
        &[
            "--resource",
            "evil.example",
            "--arg",
            "url=https://api.example.com/",
        ],
        "the URL's host is Host::\"api.example.com\"",
    );
    refused(
        &["--resource", "https://api.example.com/", "--arg", "port=80"],
        "--arg port",
    );
    refused(
        &["--resource", "https://api.example.com/", "--arg", "body=x"],
        "no argument \"body\"",
    );
    refused(
        &[
            "--resource",
            "https://api.example.com/",
            "--arg",
            "url=https://api.example.com/x",
        ],
        "name different URLs",
    );
    refused(&["--resource", "ftp://api.example.com/"], "the URL");
}

/// `--address` decides the call's connection checks too: the starter policy refuses this
/// machine and the private networks, and a policy for any action is not asked about addresses.
#[test]
fn explain_decides_the_connection_to_each_address_given() {
    let (_d, home) = home();
    let (_p, dir) = policy_dir(&[(
        "extra.cedar",
        r#"
@id("fetch-example")
permit(principal == Agent::"fetcher", action == Action::"http.request", resource == Host::"api.example.com");
@id("only-example")
forbid(principal, action, resource) unless { resource == Host::"api.example.com" };
"#,
    )]);
    std::fs::copy(
        home.join("policies/default.cedar"),
        dir.join("default.cedar"),
    )
    .unwrap();
    let dir_arg = dir.to_str().unwrap();
    let args = [
        "--agent",
        "fetcher",
        "--action",
        "http.request",
        "--resource",
        "https://api.example.com/v1",
        "--dir",
        dir_arg,
        "--address",
        "169.254.169.254",
        "--address",
        "93.184.215.14",
        "--address",
        "64:ff9b::a9fe:a9fe",
    ];
    let v = explain_json(&home, &args);
    assert_eq!(v["decision"], "permit", "{v}");
    assert_eq!(v["connections"][0]["address"], "169.254.169.254");
    assert_eq!(v["connections"][0]["refused"], true);
    assert_eq!(
        v["connections"][0]["policies"],
        serde_json::json!(["no-private-addresses"])
    );
    assert_eq!(v["connections"][1]["refused"], false, "{v}");
    // Through NAT64's well-known prefix, the metadata address is that address.
    assert_eq!(v["connections"][2]["decided_as"], "169.254.169.254");
    assert_eq!(v["connections"][2]["refused"], true, "{v}");
    let o = explain(&home, &args);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("connect:  169.254.169.254: refused") && out.contains("no-private-addresses"),
        "{out}"
    );
    assert!(out.contains("connect:  93.184.215.14: allowed"), "{out}");
    assert!(
        out.contains("connect:  64:ff9b::a9fe:a9fe (decided as 169.254.169.254): refused"),
        "{out}"
    );
    // Only an HTTP call connects to an address.
    let o = explain(
        &home,
        &[
            "--agent",
            "fetcher",
            "--action",
            "fs.read",
            "--resource",
            "a.txt",
            "--dir",
            dir_arg,
            "--address",
            "127.0.0.1",
        ],
    );
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("--address"), "{}", stderr(&o));
}

/// The finding (policy probe): `explain` gave each listed policy the decision's reason, so a
/// permit that failed to evaluate read "this permit matched and needs no approval" beside its
/// error, and a permit in a denial read "this forbid matched". Each now says what it is.
#[test]
fn explain_says_what_a_policy_that_failed_counts_for() {
    let (_d, home) = home();
    let broken = "context.arguments has bytes && context.arguments.bytes + 9223372036854775807 > 0";
    let text = format!(
        "@id(\"reads\")\npermit(principal, action == Action::\"fs.read\", resource);\n\
         @id(\"broken-permit\")\npermit(principal, action == Action::\"fs.read\", resource) when {{ {broken} }};\n\
         @id(\"broken-forbid\")\nforbid(principal, action == Action::\"fs.read\", resource in Dir::\"f\") when {{ {broken} }};\n"
    );
    let (_p, dir) = policy_dir(&[("p.cedar", &text)]);
    let dir = dir.to_str().unwrap();
    let why_of = |resource: &str| -> (Value, Vec<(String, String)>) {
        let v = explain_json(
            &home,
            &[
                "--dir",
                dir,
                "--agent",
                "coder",
                "--action",
                "fs.read",
                "--resource",
                resource,
                "--arg",
                "bytes=1",
            ],
        );
        let whys = v["policies"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["id"].as_str().unwrap().to_string(),
                    p["why"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        (v["decision"].clone(), whys)
    };
    let (decision, whys) = why_of("z");
    assert_eq!(decision, "permit");
    let of = |whys: &[(String, String)], id: &str| {
        whys.iter()
            .find(|(i, _)| i == id)
            .map(|(_, w)| w.clone())
            .unwrap_or_else(|| panic!("{id} not listed: {whys:?}"))
    };
    assert!(
        of(&whys, "reads").contains("this permit matched"),
        "{whys:?}"
    );
    assert_eq!(
        of(&whys, "broken-permit"),
        "this permit failed to evaluate, so it permits nothing"
    );
    let (decision, whys) = why_of("f/x");
    assert_eq!(decision, "deny");
    assert!(of(&whys, "broken-forbid").contains("this forbid failed to evaluate"));
    assert_eq!(
        of(&whys, "broken-permit"),
        "this permit failed to evaluate, so it permits nothing"
    );
    for (id, why) in &whys {
        if id != "broken-forbid" {
            assert!(!why.contains("forbid matched"), "{id}: {why}");
        }
    }
}

/// The finding (policy probe): `explain` had no way to give the budget a run gives
/// (`context.budget`), so a policy on it decided otherwise than in a run, without a word.
#[test]
fn explain_decides_with_the_budget_left_it_is_given() {
    let (_d, home) = home();
    let text = "@id(\"while-calls-last\")\npermit(principal, action == Action::\"fs.read\", resource) when { context.budget has tool_calls && context.budget.tool_calls > 2 };\n";
    let (_p, dir) = policy_dir(&[("p.cedar", text)]);
    let dir = dir.to_str().unwrap();
    let base = [
        "--dir",
        dir,
        "--agent",
        "coder",
        "--action",
        "fs.read",
        "--resource",
        "a.txt",
    ];
    let decide = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        explain_json(&home, &args)["decision"].clone()
    };
    assert_eq!(decide(&[]), "deny");
    assert_eq!(decide(&["--budget-left", "tool_calls=5"]), "permit");
    assert_eq!(decide(&["--budget-left", "tool_calls=1"]), "deny");
    for (bad, why) in [
        ("tool_call=5", "not a budget attribute"),
        ("tool_calls=-1", "not a whole number"),
        ("tool_calls", "expected NAME=N"),
    ] {
        let mut args = base.to_vec();
        args.extend_from_slice(&["--budget-left", bad]);
        let o = explain(&home, &args);
        assert_eq!(code(&o), 1, "{bad}");
        assert!(stderr(&o).contains(why), "{bad}: {}", stderr(&o));
    }
}
