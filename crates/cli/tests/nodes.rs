//! Several ICE nodes on one shared log (PostgreSQL at 127.0.0.1:5432 and NATS JetStream at
//! 127.0.0.1:4222, the machine's services), and `ice migrate` between backends: runs start on
//! either node, any node lists, verifies and explains any run, a live run's
//! claim keeps other nodes from driving it, and when a node is killed mid-run another node
//! recovers its run under the crash-recovery rule (EXECUTING → SUSPENDED).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;
use common::{Served, deps, text};

fn pg_base() -> String {
    std::env::var("ICE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn ice_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ice")
}

/// A PostgreSQL schema of its own, dropped at the end.
struct Schema(String);

impl Drop for Schema {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "test",
                "-q",
                "-c",
            ])
            .arg(format!("DROP SCHEMA IF EXISTS {} CASCADE", self.0))
            .output();
    }
}

struct Node {
    home: PathBuf,
    url: String,
}

impl Node {
    fn ice(&self, args: &[&str]) -> Output {
        Command::new(ice_bin())
            .arg("--home")
            .arg(&self.home)
            .arg("--log")
            .arg(&self.url)
            .args(args)
            .env_remove("ICE_HOME")
            .output()
            .unwrap()
    }

    /// One JSON document (`runs --json`).
    fn json(&self, args: &[&str]) -> Value {
        let o = self.ice(args);
        assert!(o.status.success(), "{}", text(&o));
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)))
    }

    /// JSON Lines (`log --json`), as an array.
    fn lines(&self, args: &[&str]) -> Value {
        let o = self.ice(args);
        assert!(o.status.success(), "{}", text(&o));
        Value::Array(
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect(),
        )
    }

    fn serve(&self, spec: &Path) -> (Served, String) {
        let mut c = Command::new(ice_bin());
        c.arg("--home")
            .arg(&self.home)
            .arg("--log")
            .arg(&self.url)
            .args(["serve", "--listen", "127.0.0.1:0", "--run-spec"])
            .arg(spec)
            .env_remove("ICE_HOME")
            .env("ICE_CLAIM_TTL_MS", "1500");
        common::serve(c)
    }

    fn state_of(&self, run: &str) -> String {
        self.json(&["runs", "--json"])
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["run_id"] == run)
            .map(|r| r["state"].as_str().unwrap().to_string())
            .unwrap_or_default()
    }
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A new installation at `home`, with `origin`.
fn init_home(home: &Path, origin: &str) -> PathBuf {
    let o = Command::new(ice_bin())
        .arg("--home")
        .arg(home)
        .args(["init", "--origin", origin])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    home.to_path_buf()
}

fn tag() -> String {
    let mut b = [0u8; 6];
    getrandom::fill(&mut b).unwrap();
    hex::encode(b)
}

#[test]
fn two_nodes_share_one_postgres_log() {
    let schema = Schema(format!("ice_nodes_{}", tag()));
    two_nodes_share_one_log(&format!("{}?schema={}", pg_base(), schema.0));
}

/// A NATS prefix of its own, removed at the end.
struct Prefix(String, String);

impl Drop for Prefix {
    fn drop(&mut self) {
        let (url, prefix) = (self.0.clone(), self.1.clone());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _ = rt.block_on(ice_log::nats::destroy(&url, &prefix));
    }
}

#[test]
fn two_nodes_share_one_jetstream_log() {
    let nats =
        std::env::var("ICE_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let prefix = Prefix(nats.clone(), format!("icenodes_{}", tag()));
    two_nodes_share_one_log(&format!("{nats}?prefix={}", prefix.1));
}

/// Two `ice serve` nodes on the log at `url`.
fn two_nodes_share_one_log(url: &str) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let url = url.to_string();
    let nodes: Vec<Node> = ["a", "b"]
        .iter()
        .map(|n| Node {
            home: init_home(&root.join(format!("node-{n}")), "ice.test/nodes"),
            url: url.clone(),
        })
        .collect();
    // Both nodes sign checkpoints with one key (they are one log).
    std::fs::copy(
        nodes[0].home.join("keys/checkpoint.key"),
        nodes[1].home.join("keys/checkpoint.key"),
    )
    .unwrap();
    std::fs::copy(
        nodes[0].home.join("keys/checkpoint.pub"),
        nodes[1].home.join("keys/checkpoint.pub"),
    )
    .unwrap();
    let ws = root.join("ws");
    std::fs::create_dir_all(&ws).unwrap();
    std::fs::create_dir_all(root.join("policies")).unwrap();
    std::fs::write(
        root.join("policies/p.cedar"),
        "@id(\"echo\")\npermit(principal, action == Action::\"mcp.call\", resource == Tool::\"everything/echo\");\n",
    )
    .unwrap();
    let everything =
        deps().join("node/node_modules/@modelcontextprotocol/server-everything/dist/index.js");
    let spec = root.join("shared.toml");
    std::fs::write(
        &spec,
        format!(
            "[run]\nagent = \"assistant\"\nworkspace = \"ws\"\npolicy = \"policies\"\n[agent]\ndriver = \"external\"\n\
             [servers.everything]\ncommand = [\"node\", {}, \"stdio\"]\n[servers.everything.tools]\necho = \"read\"\n",
            serde_json::to_string(&everything.display().to_string()).unwrap()
        ),
    )
    .unwrap();
    let (mut serve_a, url_a) = nodes[0].serve(&spec);
    let (mut serve_b, url_b) = nodes[1].serve(&spec);

    // A session on node A that stays open.
    let mut long = common::agent_http(
        &url_a,
        "legacy",
        &json!([
            {"op": "call", "name": "everything__echo", "args": {"message": "on node a"}},
            {"op": "sleep", "s": 60},
        ]),
    );
    let mut run_a = String::new();
    wait_until("node a's call, seen from node b", 30, || {
        let events = nodes[1].lines(&["log", "--type", "ToolInvoked", "--json"]);
        match events.as_array().and_then(|a| a.first()) {
            Some(e) => {
                run_a = e["run_id"].as_str().unwrap().to_string();
                true
            }
            None => false,
        }
    });
    // Node B sees, verifies and explains node A's live run...
    assert_eq!(nodes[1].state_of(&run_a), "EXECUTING");
    let o = nodes[1].ice(&["verify"]);
    assert!(o.status.success(), "{}", text(&o));
    let invoked = nodes[1].lines(&["log", "--run", &run_a, "--type", "ToolInvoked", "--json"]);
    let seq = invoked[0]["run_seq"].as_u64().unwrap();
    let o = nodes[1].ice(&["explain", &format!("{run_a}:{seq}")]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("CapabilityGranted"));
    // ...and while A renews its claim, B's recovery (every claim period) leaves the run alone.
    std::thread::sleep(Duration::from_millis(4000));
    assert_eq!(
        nodes[1].state_of(&run_a),
        "EXECUTING",
        "node b took a live run"
    );

    // A run starts and ends on node B meanwhile.
    let short = common::agent_http(
        &url_b,
        "legacy",
        &json!([{"op": "call", "name": "everything__echo", "args": {"message": "on node b"}}]),
    );
    let o = short.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        r["steps"][0]["result"]["content"][0]["text"],
        "Echo: on node b"
    );

    // A kill from node B of a run node A drives is recorded and succeeds; node A ends the run
    // at its next step. (It exited 1, "being written by", though the kill had been recorded:
    // multi-node probe.)
    let mut doomed = common::agent_http(
        &url_a,
        "legacy",
        &json!([
            {"op": "call", "name": "everything__echo", "args": {"message": "doomed"}},
            {"op": "sleep", "s": 3},
            {"op": "call", "name": "everything__echo", "args": {"message": "after the kill"}},
            {"op": "sleep", "s": 60},
        ]),
    );
    let mut run_d = String::new();
    wait_until("the doomed run's call", 30, || {
        let events = nodes[1].lines(&["log", "--type", "ToolInvoked", "--json"]);
        let found = events.as_array().unwrap().iter().find(|e| {
            let r = e["run_id"].as_str().unwrap();
            r != run_a && nodes[1].state_of(r) == "EXECUTING"
        });
        match found {
            Some(e) => {
                run_d = e["run_id"].as_str().unwrap().to_string();
                true
            }
            None => false,
        }
    });
    let o = nodes[1].ice(&["kill", &run_d, "--reason", "from node b"]);
    assert!(o.status.success(), "{}", text(&o));
    wait_until("node a to end the killed run", 30, || {
        nodes[1].state_of(&run_d) != "EXECUTING"
    });
    let _ = doomed.kill();
    let _ = doomed.wait();

    // Node A dies mid-run. Once its claim lapses, node B recovers the run.
    let _ = serve_a.0.kill();
    let _ = serve_a.0.wait();
    wait_until("node b to recover node a's run", 30, || {
        nodes[1].state_of(&run_a) == "SUSPENDED"
    });
    let _ = long.kill();
    let _ = long.wait();

    // Stop B; every run verifies from either node's view, with checkpoints signed by both.
    let _ = Command::new("kill")
        .arg(serve_b.0.id().to_string())
        .status();
    assert!(serve_b.0.wait().unwrap().success());
    for n in &nodes {
        let o = n.ice(&["verify"]);
        assert!(o.status.success(), "{}", text(&o));
    }
    let runs = nodes[0].json(&["runs", "--json"]);
    assert!(runs.as_array().unwrap().len() >= 2, "{runs:#}");
    // Any node replays any run, whichever node wrote it, from the shared log alone.
    for r in runs.as_array().unwrap() {
        let id = r["run_id"].as_str().unwrap();
        for n in &nodes {
            let o = n.ice(&["replay", id, "--json"]);
            assert!(o.status.success(), "replay {id}: {}", text(&o));
            let v: Value = serde_json::from_slice(&o.stdout).unwrap();
            assert_eq!(v["divergences"], json!([]), "{v:#}");
            assert!(v["events"].as_u64().unwrap() > 0);
        }
    }
}

/// Every event hash, in log order, of the log at `url`.
fn hashes(home: &Path, url: &str) -> Vec<(String, u64, String)> {
    let o = Command::new(ice_bin())
        .arg("--home")
        .arg(home)
        .arg("--log")
        .arg(url)
        .args(["log", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["run_id"].as_str().unwrap().to_string(),
                v["run_seq"].as_u64().unwrap(),
                v["hash"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn ice_migrate_copies_a_log_between_backends_hash_for_hash() {
    let dir = tempfile::tempdir().unwrap();
    let home = init_home(&dir.path().join("home"), "ice.test/migrate");
    // A real run (the quickstart's runaway: reads until its budget stops it) on the embedded log.
    let qs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/quickstart");
    let o = Command::new(ice_bin())
        .arg("--home")
        .arg(&home)
        .arg("run")
        .arg(qs.join("runaway.toml"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let sqlite = format!("sqlite:{}", home.join("ice.db").display());
    let schema = Schema(format!("ice_migrate_{}", tag()));
    let pg = format!("{}?schema={}", pg_base(), schema.0);
    let migrate = |from: &str, to: &str| {
        Command::new(ice_bin())
            .args(["migrate", "--from", from, "--to", to])
            .output()
            .unwrap()
    };
    let o = migrate(&sqlite, &pg);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("the copy verifies"),
        "{}",
        text(&o)
    );
    let back = format!("sqlite:{}", dir.path().join("back.db").display());
    let o = migrate(&pg, &back);
    assert!(o.status.success(), "{}", text(&o));
    let original = hashes(&home, &sqlite);
    assert!(original.len() > 20, "{original:?}");
    assert_eq!(hashes(&home, &pg), original, "PostgreSQL copy");
    assert_eq!(hashes(&home, &back), original, "copy of the copy");
    // The checkpoint `ice run` signed verifies against the copy, with the home's key.
    for url in [&pg, &back] {
        let o = Command::new(ice_bin())
            .arg("--home")
            .arg(&home)
            .arg("--log")
            .arg(url)
            .args(["verify", "--json"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert!(v["checkpoints_verified"].as_u64().unwrap() >= 1, "{v:#}");
    }
    // A copy into a log that is not empty is refused, and changes nothing.
    let o = migrate(&sqlite, &pg);
    assert!(!o.status.success(), "{}", text(&o));
    assert_eq!(hashes(&home, &pg), original);
}

/// A command that only reads (verify, migrate --from) given a shared log URL that names no
/// log (a mistyped schema or prefix) fails, naming it, and creates nothing: before, it created
/// an empty log there, which then verified ("ok: 0 events").
#[test]
fn reading_a_shared_log_that_does_not_exist_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let home = init_home(&dir.path().join("home"), "ice.test/missing");
    let schema = Schema(format!("ice_missing_{}", tag()));
    let nats_prefix = format!("missing{}", tag());
    for url in [
        format!("{}?schema={}", pg_base(), schema.0),
        format!("nats://127.0.0.1:4222?prefix={nats_prefix}"),
    ] {
        // Twice: had the first created the log, the second would find it and pass.
        for _ in 0..2 {
            let o = Command::new(ice_bin())
                .arg("--home")
                .arg(&home)
                .args(["--log", &url, "verify"])
                .output()
                .unwrap();
            assert_ne!(o.status.code(), Some(0), "{url}: {}", text(&o));
            assert!(text(&o).contains("not an ICE log"), "{url}: {}", text(&o));
        }
        let to = dir.path().join(format!("copy-{}.db", tag()));
        let o = Command::new(ice_bin())
            .args(["migrate", "--from", &url, "--to"])
            .arg(format!("sqlite:{}", to.display()))
            .output()
            .unwrap();
        assert_ne!(o.status.code(), Some(0), "{url}: {}", text(&o));
        assert!(text(&o).contains("not an ICE log"), "{url}: {}", text(&o));
    }
    let o = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "test",
            "-tA",
            "-c",
        ])
        .arg(format!(
            "SELECT count(*) FROM pg_namespace WHERE nspname = '{}'",
            schema.0
        ))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "0",
        "{}",
        text(&o)
    );
}

/// The finding (audit probe): on PostgreSQL, a head moved back over events was reported by
/// `verify` as an error opening the log (exit 1): the opening error kept only the text of the
/// backend's `Corrupt`. It is a verdict on the log, as on the embedded one (exit 5).
#[test]
fn a_postgres_head_moved_back_is_a_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let home = init_home(&dir.path().join("home"), "ice.test/head");
    let schema = Schema(format!("ice_head_{}", tag()));
    let node = Node {
        home,
        url: format!("{}?schema={}", pg_base(), schema.0),
    };
    let qs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/quickstart");
    let o = node.ice(&["run", qs.join("runaway.toml").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let o = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "test",
            "-q",
            "-c",
        ])
        .arg(format!(
            "ALTER TABLE {0}.head DISABLE TRIGGER ALL; UPDATE {0}.head SET size = size - 5;",
            schema.0
        ))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let o = node.ice(&["verify"]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("the head row says the log holds"),
        "{}",
        text(&o)
    );
}
