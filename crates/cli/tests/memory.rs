//! `ice memory` as scripts see it, in separate processes: rule promotion at commit, mounting,
//! operator promotion and its refusals, the lifecycle and the invalidation cascade, and a log
//! that `ice verify` accepts after all of it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn ice(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ice"))
        .arg("--home")
        .arg(home)
        .env_remove("ICE_HOME")
        .args(args)
        .output()
        .expect("ice runs")
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited")
}

fn text(o: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Run `ice`, expect exit 0, and return stdout parsed as JSON.
fn json(home: &Path, args: &[&str]) -> Value {
    let o = ice(home, args);
    assert_eq!(code(&o), 0, "ice {args:?}\n{}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}\n{}", text(&o)))
}

/// Run `ice`, expect exit 1, and return stderr.
fn refused(home: &Path, args: &[&str]) -> String {
    let o = ice(home, args);
    assert_eq!(code(&o), 1, "ice {args:?}\n{}", text(&o));
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const POLICY: &str = r#"
@id("read")
permit(principal, action in [Action::"fs.read", Action::"fs.list"], resource in Dir::".");
"#;

const PLAN: &str = r#"
[[step]]
intent = "think first"
think = "plan_step"
text = "read the greeting and the config"

[[step]]
intent = "read the greeting"
capability = "fs.read"
target = "hello.txt"

[[step]]
intent = "read the config"
capability = "fs.read"
target = "config.toml"
"#;

struct Env {
    _dir: tempfile::TempDir,
    home: PathBuf,
    base: PathBuf,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().to_path_buf();
        let home = base.join("home");
        let o = ice(&home, &["init", "--origin", "ice.test/memory"]);
        assert_eq!(code(&o), 0, "{}", text(&o));
        std::fs::create_dir_all(base.join("workspace")).unwrap();
        std::fs::write(base.join("workspace/hello.txt"), "hello\n").unwrap();
        // A bidirectional override in a file's text, to see it escaped where a terminal shows it.
        std::fs::write(base.join("workspace/config.toml"), "x = 1 # \u{202e}\n").unwrap();
        std::fs::create_dir_all(base.join("policies")).unwrap();
        std::fs::write(base.join("policies/p.cedar"), POLICY).unwrap();
        std::fs::write(base.join("plan.toml"), PLAN).unwrap();
        Env {
            _dir: dir,
            home,
            base,
        }
    }

    /// Write run spec `id` with `extra` sections and run it; returns the exit code.
    fn run(&self, id: &str, extra: &str) -> i32 {
        let spec = self.base.join(format!("{id}.toml"));
        std::fs::write(
            &spec,
            format!(
                "[run]\nid = \"{id}\"\nagent = \"coder\"\nworkspace = \"workspace\"\npolicy = \"policies\"\n\n[agent]\ndriver = \"plan\"\nplan = \"plan.toml\"\n\n{extra}\n"
            ),
        )
        .unwrap();
        let o = ice(&self.home, &["run", spec.to_str().unwrap()]);
        assert!(matches!(code(&o), 0 | 3), "{}", text(&o));
        code(&o)
    }

    fn events(&self, run: &str) -> Vec<Value> {
        let o = ice(&self.home, &["log", "--run", run, "--json"]);
        assert_eq!(code(&o), 0, "{}", text(&o));
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The id of the first event of `run` of type `t` (whose payload `path` is `path`, if given).
    fn event(&self, run: &str, t: &str, path: Option<&str>) -> String {
        let e = self
            .events(run)
            .into_iter()
            .find(|e| e["type"] == t && path.is_none_or(|p| e["payload"]["path"] == p))
            .unwrap_or_else(|| panic!("no {t} in {run}"));
        format!("{run}:{}", e["run_seq"])
    }
}

fn ids(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn memories_are_promoted_mounted_and_invalidated_with_their_descendants() {
    let env = Env::new();
    let home = env.home.as_path();
    let empty = ice(home, &["memory", "list"]);
    assert_eq!(code(&empty), 0);
    assert!(String::from_utf8_lossy(&empty.stdout).contains("no active memories"));
    // A run whose rule promotes its read of hello.txt: memory A.
    let rule_a = "[[memory.promote]]\nevent = \"FileRead\"\npath = \"hello.txt\"\nkind = \"file\"\nscope = \"project\"\n";
    assert_eq!(env.run("first", rule_a), 0);
    let list = json(home, &["memory", "list", "--json"]);
    let a = ids(&list)[0].clone();
    assert_eq!(list[0]["status"], "active");
    assert_eq!(list[0]["kind"], "file");
    assert_eq!(
        list[0]["sources"][0],
        env.event("first", "FileRead", Some("hello.txt"))
    );
    let shown = json(home, &["memory", "show", &a, "--json"]);
    assert_eq!(shown["content"]["output"]["content"], "hello\n");
    assert_eq!(shown["schema_version"], 1);
    let human = ice(home, &["memory", "show", &a]);
    assert_eq!(code(&human), 0);
    assert!(String::from_utf8_lossy(&human.stdout).contains("status:       active"));
    // A later run mounts scope project and promotes its read of config.toml: B, derived from A.
    let second = "[memory]\nmount = { scopes = [\"project\"] }\n\n[[memory.promote]]\nevent = \"FileRead\"\npath = \"config.toml\"\nkind = \"fact\"\nscope = \"derived\"\nconfidence = 0.5\nttl = \"30d\"\n";
    assert_eq!(env.run("second", second), 0);
    let mounted = env
        .events("second")
        .into_iter()
        .find(|e| e["type"] == "MemoryMounted")
        .unwrap();
    assert_eq!(ids(&mounted["payload"]["memories"]), vec![a.clone()]);
    assert_eq!(
        mounted["payload"]["memories"][0]["digest"],
        list[0]["digest"]
    );
    let list = json(home, &["memory", "list", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 2);
    let b = list
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["scope"] == "derived")
        .unwrap()
        .clone();
    assert_eq!(b["derived_from"][0], a);
    assert!(b["expires_at"].is_string());
    let b = b["id"].as_str().unwrap().to_string();
    let human = ice(home, &["memory", "show", &b]);
    assert_eq!(code(&human), 0);
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(
        !human.contains('\u{202e}') && human.contains("x = 1 # \\u{202e}"),
        "{human}"
    );
    assert!(
        json(home, &["memory", "show", &b, "--json"])
            .to_string()
            .contains('\u{202e}')
    );
    // An operator promotes the second run's read of hello.txt: C, derived from A as well.
    let read = env.event("second", "FileRead", Some("hello.txt"));
    let c = json(
        home,
        &[
            "memory",
            "promote",
            &read,
            "--kind",
            "fact",
            "--scope",
            "ops",
            "--confidence",
            "0.9",
            "--ttl",
            "7d",
            "--reason",
            "seen twice",
            "--operator",
            "alice",
            "--json",
        ],
    );
    assert_eq!(c["derived_from"][0], a);
    let c = c["memory"].as_str().unwrap().to_string();
    // Refusals name what was wrong and write nothing.
    let size = |h: &Path| json(h, &["runs", "--json"]).as_array().unwrap().len();
    let before = size(home);
    let thought = env.event("second", "PlanStepProposed", None);
    let err = refused(
        home,
        &[
            "memory", "promote", &thought, "--kind", "k", "--scope", "s", "--reason", "r",
        ],
    );
    assert!(err.contains("only DOMAIN events"), "{err}");
    assert!(refused(home, &["memory", "show", "second:999"]).contains("no memory second:999"));
    let err = refused(
        home,
        &[
            "memory", "promote", &read, "--kind", "k", "--scope", "s", "--reason", "r", "--ttl",
            "soon",
        ],
    );
    assert!(err.contains("--ttl"), "{err}");
    // The runtime's refusals of a field name the flag that set it (not the API's `reason`).
    for (flag, value, says) in [
        (
            "--reason",
            " ",
            "a promotion needs a --reason (it is recorded)",
        ),
        ("--kind", "no spaces", "--kind: \"no spaces\" contains ' '"),
        ("--scope", "", "--scope: \"\" must be 1 to 128 characters"),
        (
            "--confidence",
            "2",
            "--confidence: 2 is not a number from 0 to 1",
        ),
    ] {
        let mut args = vec!["memory", "promote", read.as_str()];
        for (f, v) in [("--kind", "k"), ("--scope", "s"), ("--reason", "r")] {
            if f != flag {
                args.extend([f, v]);
            }
        }
        args.extend([flag, value]);
        let err = refused(home, &args);
        assert!(err.contains(says), "{flag}: {err}");
        assert!(!err.contains('`'), "{flag}: {err}");
    }
    assert_eq!(size(home), before);
    // A run that aborts: its facts cannot be promoted.
    assert_eq!(
        env.run("aborted", "[[check]]\nname = \"no\"\nrun = [\"false\"]\n"),
        3
    );
    let aborted = env.event("aborted", "FileRead", Some("hello.txt"));
    let err = refused(
        home,
        &[
            "memory", "promote", &aborted, "--kind", "k", "--scope", "s", "--reason", "r",
        ],
    );
    assert!(err.contains("did not commit"), "{err}");
    // Invalidating A invalidates B and C, and names the run that mounted A.
    let out = json(
        home,
        &[
            "memory",
            "invalidate",
            &a,
            "--reason",
            "the greeting was wrong",
            "--operator",
            "bob",
            "--json",
        ],
    );
    assert_eq!(out["status"], "invalidated");
    let cascaded: Vec<&str> = out["cascaded"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["memory"].as_str().unwrap())
        .collect();
    assert_eq!(cascaded, vec![b.as_str(), c.as_str()]);
    assert_eq!(out["mounting_runs"], serde_json::json!(["second"]));
    let all = json(home, &["memory", "list", "--all", "--json"]);
    for m in all.as_array().unwrap() {
        assert_eq!(m["status"], "invalidated", "{m}");
    }
    assert!(
        json(home, &["memory", "list", "--json"])
            .as_array()
            .unwrap()
            .is_empty()
    );
    // A second transition is refused, naming the first.
    let err = refused(home, &["memory", "deprecate", &b, "--reason", "old"]);
    assert!(err.contains("already left active"), "{err}");
    assert!(err.contains("invalidated"), "{err}");
    // Human output of an invalidation lists the mounting runs too.
    assert_eq!(env.run("third", rule_a), 0);
    let d = ids(&json(home, &["memory", "list", "--json"]))[0].clone();
    assert_eq!(
        env.run("fourth", "[memory]\nmount = { scopes = [\"project\"] }\n"),
        0
    );
    let o = ice(
        home,
        &[
            "memory",
            "invalidate",
            &d,
            "--reason",
            "wrong again",
            "--operator",
            "bob",
        ],
    );
    assert_eq!(code(&o), 0, "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("runs that mounted the invalidated memories: fourth"),
        "{stdout}"
    );
    // The whole log verifies, and every run (the maintenance runs too) replays from it alone;
    // a run that mounted memories is re-driven with them.
    let o = ice(home, &["verify"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let runs = json(home, &["runs", "--json"]);
    for r in runs.as_array().unwrap() {
        let id = r["run_id"].as_str().unwrap();
        let o = ice(home, &["replay", id, "--drive", "--json"]);
        assert_eq!(code(&o), 0, "replay {id}: {}", text(&o));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["divergences"], serde_json::json!([]), "{v:#}");
    }
}

#[test]
fn supersede_and_deprecate() {
    let env = Env::new();
    let home = env.home.as_path();
    let rules = "[[memory.promote]]\nevent = \"FileRead\"\nkind = \"file\"\nscope = \"project\"\n";
    assert_eq!(env.run("first", rules), 0);
    let list = ids(&json(home, &["memory", "list", "--json"]));
    assert_eq!(list.len(), 2);
    let (old, new) = (&list[0], &list[1]);
    let err = refused(
        home,
        &["memory", "supersede", old, "--by", old, "--reason", "x"],
    );
    assert!(err.contains("itself"), "{err}");
    let err = refused(
        home,
        &["memory", "supersede", old, "--by", new, "--reason", " "],
    );
    assert!(
        err.contains("supersede needs a --reason (it is recorded)"),
        "{err}"
    );
    // The finding (memory probe): a reason over 16 KiB went to the blob store, where the
    // memory fold could not read it, and every memory command failed from then on. A reason
    // is at most 4096 bytes; a longer one is refused and nothing is recorded.
    let long = "R".repeat(17_000);
    let read = env.event("first", "FileRead", Some("hello.txt"));
    for args in [
        vec!["memory", "deprecate", old.as_str(), "--reason", &long],
        vec![
            "memory", "promote", &read, "--kind", "k", "--scope", "s", "--reason", &long,
        ],
    ] {
        let err = refused(home, &args);
        assert!(err.contains("a reason is at most 4096 bytes"), "{err}");
    }
    assert_eq!(
        ids(&json(home, &["memory", "list", "--json"])).len(),
        2,
        "the memory book still folds, and nothing was added"
    );
    let out = json(
        home,
        &[
            "memory",
            "supersede",
            old,
            "--by",
            new,
            "--reason",
            "newer",
            "--json",
        ],
    );
    assert_eq!(out["status"], "superseded");
    let shown = json(home, &["memory", "show", old, "--json"]);
    assert_eq!(shown["status"], "superseded");
    assert_eq!(shown["by"], new.as_str());
    assert_eq!(shown["transition"]["reason"], "newer");
    // Only an active memory supersedes: one that left active, or one past its expiry, is
    // refused, and the refusal names --by.
    let err = refused(
        home,
        &["memory", "supersede", new, "--by", old, "--reason", "x"],
    );
    assert!(
        err.contains(&format!("--by {old} is superseded by {new} (event ")),
        "{err}"
    );
    let read = env.event("first", "FileRead", Some("hello.txt"));
    let brief = json(
        home,
        &[
            "memory",
            "promote",
            &read,
            "--kind",
            "note",
            "--scope",
            "brief",
            "--ttl",
            "1ms",
            "--reason",
            "short-lived",
            "--json",
        ],
    );
    let brief = brief["memory"].as_str().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(5));
    let err = refused(
        home,
        &["memory", "supersede", new, "--by", brief, "--reason", "x"],
    );
    assert!(err.contains(&format!("--by {brief} expired at ")), "{err}");
    // The finding (memory probe): the same event, kind and scope promoted again after the
    // memory expired was refused as "already active" until something recorded the expiry.
    let again = json(
        home,
        &[
            "memory", "promote", &read, "--kind", "note", "--scope", "brief", "--reason", "again",
            "--json",
        ],
    );
    assert_ne!(again["memory"].as_str().unwrap(), brief, "{again}");
    assert!(!err.contains('`'), "{err}");
    let o = ice(home, &["memory", "deprecate", new, "--reason", "stale"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let err = refused(home, &["memory", "deprecate", new, "--reason", "x"]);
    assert!(err.contains("deprecated"), "{err}");
    // Found wrong after it was deprecated: invalidated, and `show` gives both.
    let o = ice(home, &["memory", "invalidate", new, "--reason", "wrong"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let o = ice(home, &["memory", "show", new]);
    let shown = text(&o);
    assert!(
        shown.contains("invalidated") && shown.contains("after it was deprecated"),
        "{shown}"
    );
    let err = refused(home, &["memory", "invalidate", new, "--reason", "x"]);
    assert!(err.contains("invalidated"), "{err}");
    let err = refused(home, &["memory", "deprecate", "not-an-id", "--reason", "x"]);
    assert!(err.contains("not a memory id"), "{err}");
    // A mount that names them finds nothing to mount.
    let mount = format!("[memory]\nmount = {{ ids = [\"{old}\", \"{new}\"] }}\n");
    assert_eq!(env.run("second", &mount), 0);
    let mounted = env
        .events("second")
        .into_iter()
        .find(|e| e["type"] == "MemoryMounted")
        .unwrap();
    assert!(ids(&mounted["payload"]["memories"]).is_empty());
    assert_eq!(
        ids(&mounted["payload"]["skipped"]),
        vec![old.clone(), new.clone()]
    );
    let o = ice(home, &["verify"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
}
