//! The MCP gateway against real third-party peers: PyPI `mcp` 2.3.0 as the agent's client, npm
//! `@modelcontextprotocol/server-everything` and `server-filesystem` as tool servers. They are
//! installed at pinned versions by `scripts/deps` (which `scripts/test` runs first).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::{Value, json};

mod common;
use common::{Served, agent_script, deps, python, text};

fn npm_server(name: &str) -> PathBuf {
    deps().join(format!(
        "node/node_modules/@modelcontextprotocol/{name}/dist/index.js"
    ))
}

fn ice_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ice")
}

fn ice(home: &Path, args: &[&str]) -> Output {
    Command::new(ice_bin())
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("ICE_HOME")
        .output()
        .expect("ice runs")
}

const POLICY: &str = r#"
@id("echo-and-sum")
permit(principal == Agent::"assistant", action == Action::"mcp.call", resource)
when { resource in [Tool::"everything/echo", Tool::"everything/get-sum"] };

// The server's environment may hold secrets: an operator approves each look.
@id("env-needs-approval")
@approval("required")
permit(principal == Agent::"assistant", action == Action::"mcp.call", resource == Tool::"everything/get-env");

@id("slow-ok")
permit(principal == Agent::"assistant", action == Action::"mcp.call",
       resource == Tool::"everything/trigger-long-running-operation");

// Reading files through the filesystem server is fine; anything that is not a read is not.
@id("fs-reads")
permit(principal == Agent::"assistant", action == Action::"mcp.call", resource in ToolServer::"fs")
when { context.effect == EffectClass::"read" };
"#;

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    home: PathBuf,
    spec: PathBuf,
}

/// A fresh installation, a workspace, the policy above and a run spec with both servers.
/// `everything` is reached through a per-test symbolic link, so a test can find (and kill) its
/// own server process.
fn fixture(id: &str, approval_timeout: &str) -> Fixture {
    fixture_with(id, approval_timeout, "", "")
}

/// [`fixture`] with more run-spec text and more policy text.
fn fixture_with(id: &str, approval_timeout: &str, extra_spec: &str, extra_policy: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let home = root.join("home");
    let o = ice(&home, &["init", "--origin", "ice.test/mcp"]);
    assert!(o.status.success(), "{}", text(&o));
    let ws = root.join("ws");
    std::fs::create_dir_all(&ws).unwrap();
    std::fs::write(ws.join("notes.txt"), "hello from the workspace\n").unwrap();
    std::fs::create_dir_all(root.join("policies")).unwrap();
    std::fs::write(
        root.join("policies/gateway.cedar"),
        format!("{POLICY}\n{extra_policy}"),
    )
    .unwrap();
    let everything = root.join("everything.js");
    std::os::unix::fs::symlink(npm_server("server-everything"), &everything).unwrap();
    let spec = root.join("run.toml");
    let q = |p: &Path| serde_json::to_string(&p.display().to_string()).unwrap();
    std::fs::write(
        &spec,
        format!(
            r#"[run]
id = "{id}"
agent = "assistant"
workspace = "ws"
policy = "policies"

[agent]
driver = "external"

[approvals]
timeout = "{approval_timeout}"

[servers.everything]
command = ["node", {everything}, "stdio"]
call_timeout = "20s"
[servers.everything.tools]
echo = "read"
get-sum = "read"
get-env = "read"
trigger-long-running-operation = "read"

[servers.fs]
command = ["node", {fs}, {ws}]
[servers.fs.tools]
read_text_file = "read"
list_directory = "read"
# write_file is not named: external, so the policy above refuses it
{extra_spec}
"#,
            everything = q(&everything),
            fs = q(&npm_server("server-filesystem")),
            ws = q(&std::fs::canonicalize(&ws).unwrap()),
        ),
    )
    .unwrap();
    Fixture {
        _dir: dir,
        root,
        home,
        spec,
    }
}

/// Run the Python agent over stdio against `ice mcp`, with `script`; returns its JSON report
/// and its exit status and output (ice's stderr is the agent's).
fn agent_stdio(f: &Fixture, mode: &str, elicit: &str, script: Value) -> (Value, Output) {
    finish_agent(spawn_agent(f, mode, elicit, script))
}

fn events(f: &Fixture, run: &str) -> Vec<Value> {
    let o = ice(&f.home, &["log", "--run", run, "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn of_type<'a>(events: &'a [Value], t: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == t).collect()
}

fn id_of(e: &Value) -> String {
    format!("{}:{}", e["run_id"].as_str().unwrap(), e["run_seq"])
}

fn first_text(result: &Value) -> String {
    result["content"][0]["text"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

fn verify(f: &Fixture) {
    let o = ice(&f.home, &["verify"]);
    assert!(o.status.success(), "verify: {}", text(&o));
}

/// Call a tool of a server directly with the same Python client (no ICE in between).
fn direct_call(server: &[String], tool: &str, args: Value) -> Value {
    let mut c = Command::new(python());
    c.arg(agent_script())
        .args(["--mode", "auto", "--stdio"])
        .args(server)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let script = json!([{"op": "call", "name": tool, "args": args}]);
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.to_string().as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let r: Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)));
    r["steps"][0]["result"].clone()
}

#[test]
fn a_real_client_lists_and_calls_through_ice_over_stdio() {
    let f = fixture("stdio-1", "2s");
    let ws = std::fs::canonicalize(f.root.join("ws")).unwrap();
    let notes = ws.join("notes.txt").display().to_string();
    let (r, o) = agent_stdio(
        &f,
        "legacy",
        "none",
        json!([
            {"op": "list"},
            {"op": "call", "name": "everything__echo", "args": {"message": "hi ICE"}, "intent": "say hello"},
            {"op": "call", "name": "everything__get-sum", "args": {"a": 2, "b": 40}},
            {"op": "call", "name": "fs__read_text_file", "args": {"path": notes}},
            {"op": "call", "name": "fs__write_file", "args": {"path": notes, "content": "overwritten"}},
            {"op": "call", "name": "nosuch__tool", "args": {}},
        ]),
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("committed"),
        "{}",
        text(&o)
    );
    // tools/list shows exactly what the policy could permit.
    let mut names: Vec<&str> = r["steps"][0]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "everything__echo",
            "everything__get-env",
            "everything__get-sum",
            "everything__trigger-long-running-operation",
            "fs__list_directory",
            "fs__read_text_file",
        ],
        "{r:#}"
    );
    // Allowed calls return what the server returns.
    let echo = &r["steps"][1]["result"];
    assert_ne!(echo["isError"], true, "{echo:#}");
    let direct = direct_call(
        &[
            "node".into(),
            npm_server("server-everything").display().to_string(),
            "stdio".into(),
        ],
        "echo",
        json!({"message": "hi ICE"}),
    );
    assert_eq!(echo["content"], direct["content"], "through ICE vs direct");
    let sum = &r["steps"][2]["result"];
    let direct = direct_call(
        &[
            "node".into(),
            npm_server("server-everything").display().to_string(),
            "stdio".into(),
        ],
        "get-sum",
        json!({"a": 2, "b": 40}),
    );
    assert_eq!(sum["content"], direct["content"]);
    assert!(first_text(sum).contains("42"), "{sum:#}");
    let read = &r["steps"][3]["result"];
    assert!(
        first_text(read).contains("hello from the workspace"),
        "{read:#}"
    );
    // A write is external (not configured as read): refused, readably, and nothing written.
    let refused = &r["steps"][4]["result"];
    assert_eq!(refused["isError"], true, "{refused:#}");
    assert!(first_text(refused).contains("policy_denied"), "{refused:#}");
    assert_eq!(
        refused["structuredContent"]["ice"]["denied"],
        "policy_denied"
    );
    assert_eq!(
        std::fs::read_to_string(ws.join("notes.txt")).unwrap(),
        "hello from the workspace\n"
    );
    // An unknown tool is a protocol error, and the attempt is recorded.
    let unknown = &r["steps"][5]["error"];
    assert_eq!(unknown["code"], -32602, "{r:#}");

    // The whole session is one run that verifies.
    let ev = events(&f, "stdio-1");
    assert_eq!(ev[0]["type"], "RunProvisioned");
    assert_eq!(ev[0]["payload"]["driver"], "external");
    // Who the agent's client is, and the protocol it negotiated, are recorded.
    let client = &ev[0]["payload"]["client"];
    assert_eq!(client["lifecycle"], "initialize", "{client:#}");
    assert_eq!(client["protocol_version"], "2025-11-25", "{client:#}");
    assert_eq!(client["name"], "mcp", "{client:#}");
    assert!(of_type(&ev, "RunCommitted").len() == 1);
    let invoked = of_type(&ev, "ToolInvoked");
    assert_eq!(invoked.len(), 3, "echo, sum, read");
    let echo_ev = invoked[0];
    assert_eq!(echo_ev["payload"]["server"], "everything");
    assert_eq!(echo_ev["payload"]["tool"], "echo");
    assert_eq!(echo_ev["payload"]["arguments"]["message"], "hi ICE");
    assert_eq!(echo_ev["payload"]["result"]["content"], echo["content"]);
    assert_eq!(echo_ev["intent"], "say hello");
    assert!(echo_ev["payload"]["elapsed_us"].as_u64().is_some());
    let proto = echo_ev["payload"]["protocol_version"].as_str().unwrap();
    assert!(
        proto.starts_with("20"),
        "negotiated version recorded: {proto}"
    );
    let denied = of_type(&ev, "CapabilityDenied");
    assert_eq!(denied.len(), 2, "the write and the unknown tool");
    assert_eq!(denied[0]["payload"]["reason"], "policy_denied");
    assert_eq!(denied[1]["payload"]["reason"], "invalid_target");
    // CapabilitiesBound lists the bound tools with ICE's classes (the server's read-only hint
    // on write_file's neighbours changes nothing; its destructive hint keeps it external).
    let bound = &of_type(&ev, "CapabilitiesBound")[0]["payload"]["tools"];
    let class_of = |t: &str| {
        bound
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["tool"] == t)
            .map(|b| b["effect"].clone())
    };
    assert_eq!(class_of("fs/read_text_file"), Some(json!("read")));
    assert_eq!(class_of("fs/write_file"), Some(json!("external")));
    assert_eq!(class_of("everything/echo"), Some(json!("read")));

    // explain on a ToolInvoked: the request, the decision, the grant and the result.
    let o = ice(&f.home, &["explain", &id_of(echo_ev)]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for needle in [
        "CapabilityRequested",
        "CapabilityGranted",
        "CapabilityUsed",
        "ToolInvoked",
        "echo-and-sum",
        "say hello",
        "Echo: hi ICE",
        "protocol_version",
        "elapsed_us",
    ] {
        assert!(out.contains(needle), "explain lacks {needle}:\n{out}");
    }
    verify(&f);
}

#[test]
fn a_modern_client_without_initialize_is_served_too() {
    let f = fixture("modern-1", "2s");
    let (r, o) = agent_stdio(
        &f,
        "2026-07-28",
        "none",
        json!([
            {"op": "list"},
            {"op": "call", "name": "everything__echo", "args": {"message": "no handshake"}},
        ]),
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(r["protocol_version"], "2026-07-28", "{r:#}");
    assert!(
        first_text(&r["steps"][1]["result"]).contains("no handshake"),
        "{r:#}"
    );
    let ev = events(&f, "modern-1");
    let client = &ev[0]["payload"]["client"];
    assert_eq!(client["lifecycle"], "per-request metadata", "{client:#}");
    assert_eq!(client["protocol_version"], "2026-07-28", "{client:#}");
    assert_eq!(of_type(&ev, "ToolInvoked").len(), 1);
    assert_eq!(of_type(&ev, "RunCommitted").len(), 1);
    verify(&f);
}

/// Start the Python agent over stdio without waiting for it.
fn spawn_agent(f: &Fixture, mode: &str, elicit: &str, script: Value) -> std::process::Child {
    let mut c = Command::new(python());
    c.arg(agent_script())
        .args(["--mode", mode, "--elicit", elicit, "--stdio", ice_bin()])
        .arg("--home")
        .arg(&f.home)
        .arg("mcp")
        .arg("--run-spec")
        .arg(&f.spec)
        .env_remove("ICE_HOME")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("python runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.to_string().as_bytes())
        .unwrap();
    child
}

fn finish_agent(child: std::process::Child) -> (Value, Output) {
    let o = child.wait_with_output().unwrap();
    let report: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("the agent printed no report ({e}): {}", text(&o)));
    (report, o)
}

/// Wait for a pending approval of `run` (from another process, as an operator would).
fn pending_approval(f: &Fixture, run: &str) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let o = ice(&f.home, &["approvals", "--run", run, "--json"]);
        if o.status.success() {
            let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
            if let Some(first) = v.as_array().and_then(|a| a.first()) {
                return first.clone();
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no approval appeared: {}",
            text(&o)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn an_approval_gated_tool_works_once_per_approval_and_times_out_unanswered() {
    let f = fixture("approve-1", "4s");
    let child = spawn_agent(
        &f,
        "legacy",
        "none",
        json!([
            {"op": "call", "name": "everything__get-env", "args": {}, "intent": "look at the server's environment"},
            {"op": "call", "name": "everything__get-env", "args": {}, "intent": "look again"},
        ]),
    );
    // An operator approves the first request from another process.
    let pending = pending_approval(&f, "approve-1");
    assert_eq!(pending["capability"], "mcp.call");
    let id = pending["id"].as_str().unwrap().to_string();
    let o = ice(&f.home, &["approve", &id, "--operator", "alice"]);
    assert!(o.status.success(), "{}", text(&o));
    // The same approval cannot be answered (or used) again.
    let again = ice(&f.home, &["approve", &id, "--operator", "alice"]);
    assert!(!again.status.success(), "{}", text(&again));
    // Nobody answers the second: it is denied when the timeout passes.
    let (r, o) = finish_agent(child);
    assert!(o.status.success(), "{}", text(&o));
    let first = &r["steps"][0]["result"];
    assert_ne!(first["isError"], true, "{r:#}");
    assert!(
        first_text(first).contains("PATH"),
        "the environment came back: {r:#}"
    );
    let second = &r["steps"][1]["result"];
    assert_eq!(second["isError"], true, "{r:#}");
    assert_eq!(
        second["structuredContent"]["ice"]["denied"],
        "approval_timeout"
    );

    let ev = events(&f, "approve-1");
    assert_eq!(of_type(&ev, "ApprovalRequested").len(), 2);
    let granted = of_type(&ev, "ApprovalGranted");
    assert_eq!(granted.len(), 1);
    assert_eq!(granted[0]["origin"], "operator:alice");
    let invoked = of_type(&ev, "ToolInvoked");
    assert_eq!(invoked.len(), 1, "one approval, one call");
    let grants = of_type(&ev, "CapabilityGranted");
    assert_eq!(grants.len(), 1);
    assert_eq!(grants[0]["payload"]["max_uses"], 1);
    let denied = of_type(&ev, "CapabilityDenied");
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0]["payload"]["reason"], "approval_timeout");
    // explain of the call names the operator's approval.
    let o = ice(&f.home, &["explain", &id_of(invoked[0])]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("ApprovalGranted") && out.contains("alice"),
        "{out}"
    );
    verify(&f);
}

#[test]
fn a_client_that_supports_elicitation_answers_approvals_itself() {
    let f = fixture("elicit-1", "10s");
    let (r, o) = agent_stdio(
        &f,
        "legacy",
        "approve",
        json!([{"op": "call", "name": "everything__get-env", "args": {}}]),
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(r["elicited"].as_array().unwrap().len(), 1, "{r:#}");
    assert!(
        r["elicited"][0]
            .as_str()
            .unwrap()
            .contains("everything/get-env")
    );
    assert_ne!(r["steps"][0]["result"]["isError"], true, "{r:#}");
    let ev = events(&f, "elicit-1");
    let granted = of_type(&ev, "ApprovalGranted");
    assert_eq!(granted.len(), 1);
    // Recorded as the stdio client's user, not under the name the client gave itself.
    assert_eq!(
        granted[0]["origin"], "operator:user-of-stdio-client",
        "{:#}",
        granted[0]
    );
    assert!(
        r["elicited"][0]
            .as_str()
            .unwrap()
            .contains("operator:user-of-stdio-client"),
        "{r:#}"
    );
    // Over stdio the spec's unset `[approvals] elicitation` means on, and the run records so.
    assert_eq!(
        ev[0]["payload"]["spec"]["approval_elicitation"], true,
        "{:#}",
        ev[0]
    );
    assert_eq!(of_type(&ev, "ToolInvoked").len(), 1);

    // A user who says no: a recorded denial by that operator, and no call.
    let f = fixture("elicit-2", "10s");
    let (r, o) = agent_stdio(
        &f,
        "legacy",
        "deny",
        json!([{"op": "call", "name": "everything__get-env", "args": {}}]),
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        r["steps"][0]["result"]["structuredContent"]["ice"]["denied"], "approval_denied",
        "{r:#}"
    );
    let ev = events(&f, "elicit-2");
    assert_eq!(of_type(&ev, "ApprovalDenied").len(), 1);
    assert_eq!(of_type(&ev, "ToolInvoked").len(), 0);
    verify(&f);

    // A spec that keeps approvals to operators: the client is never asked, and the call
    // times out unanswered.
    let f = fixture_with("elicit-3", "1s", "", "");
    let spec = std::fs::read_to_string(&f.spec)
        .unwrap()
        .replace("timeout = \"1s\"", "timeout = \"1s\"\nelicitation = false");
    std::fs::write(&f.spec, spec).unwrap();
    let (r, o) = agent_stdio(
        &f,
        "legacy",
        "approve",
        json!([{"op": "call", "name": "everything__get-env", "args": {}}]),
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(r["elicited"].as_array().unwrap().len(), 0, "{r:#}");
    assert_eq!(
        r["steps"][0]["result"]["structuredContent"]["ice"]["denied"], "approval_timeout",
        "{r:#}"
    );
}

/// Agent `claude` may look at the server's environment, each time with an operator's approval.
const CLAUDE_ENV: &str = r#"
@id("claude-env-needs-approval")
@approval("required")
permit(principal == Agent::"claude", action == Action::"mcp.call", resource == Tool::"everything/get-env");
"#;

/// Start the Python agent over HTTP at `url` with `token`, answering elicitations with
/// `elicit` and naming itself `client_name` in `clientInfo`.
fn spawn_agent_http(
    url: &str,
    token: &str,
    elicit: &str,
    client_name: &str,
    script: Value,
) -> std::process::Child {
    let mut c = Command::new(python());
    c.arg(agent_script())
        .args(["--mode", "legacy", "--url", url, "--elicit", elicit])
        .arg(format!("--token={token}"))
        .arg(format!("--client-name={client_name}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("python runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.to_string().as_bytes())
        .unwrap();
    child
}

/// Wait for a pending approval of any run.
fn any_pending_approval(f: &Fixture) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let o = ice(&f.home, &["approvals", "--json"]);
        if o.status.success() {
            let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
            if let Some(first) = v.as_array().and_then(|a| a.first()) {
                return first.clone();
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no approval appeared: {}",
            text(&o)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The events of the one run `f`'s installation holds.
fn only_run_events(f: &Fixture) -> Vec<Value> {
    let all = runs(f);
    assert_eq!(all.len(), 1, "{all:#?}");
    events(f, all[0]["run_id"].as_str().unwrap())
}

#[test]
fn over_http_an_agent_cannot_approve_its_own_calls_by_elicitation() {
    // The spec does not mention elicitation: over HTTP that means off.
    let f = fixture_with("self-approve", "3s", "", CLAUDE_ENV);
    let claude = token(&f, "agent", "claude");
    let (_server, url) = serve(&f);
    // The agent's client supports elicitation, would approve anything, and calls itself alice.
    let child = spawn_agent_http(
        &url,
        &claude,
        "approve",
        "alice",
        json!([
            {"op": "call", "name": "everything__get-env", "args": {}},
            {"op": "call", "name": "everything__get-env", "args": {}},
        ]),
    );
    // The first call waits for an operator, who approves it.
    let pending = any_pending_approval(&f);
    assert_eq!(pending["capability"], "mcp.call", "{pending:#}");
    let id = pending["id"].as_str().unwrap().to_string();
    let o = ice(&f.home, &["approve", &id, "--operator", "bob"]);
    assert!(o.status.success(), "approved by the operator: {}", text(&o));
    // Nobody answers the second: denied at the timeout, the agent's eagerness notwithstanding.
    let (r, o) = finish_agent(child);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        r["elicited"].as_array().unwrap().len(),
        0,
        "the agent's own client is never asked: {r:#}"
    );
    let first = &r["steps"][0]["result"];
    assert_ne!(first["isError"], true, "{r:#}");
    assert!(first_text(first).contains("PATH"), "{r:#}");
    assert_eq!(
        r["steps"][1]["result"]["structuredContent"]["ice"]["denied"], "approval_timeout",
        "{r:#}"
    );
    let ev = only_run_events(&f);
    assert_eq!(ev[0]["payload"]["spec"]["approval_elicitation"], false);
    assert_eq!(ev[0]["payload"]["agent"], "claude", "{:#}", ev[0]);
    let granted = of_type(&ev, "ApprovalGranted");
    assert_eq!(granted.len(), 1, "{granted:#?}");
    assert_eq!(granted[0]["origin"], "operator:bob");
    assert_eq!(of_type(&ev, "ApprovalRequested").len(), 2);
    assert_eq!(of_type(&ev, "ToolInvoked").len(), 1);
    for e in &ev {
        assert!(
            !e["origin"].as_str().unwrap_or("").contains("alice"),
            "a name the client chose is no one's origin: {e:#}"
        );
    }
}

#[test]
fn over_http_elicitation_is_opt_in_and_records_the_authenticated_agent() {
    let f = fixture_with("opt-in", "10s", "", CLAUDE_ENV);
    let spec = std::fs::read_to_string(&f.spec)
        .unwrap()
        .replace("timeout = \"10s\"", "timeout = \"10s\"\nelicitation = true");
    std::fs::write(&f.spec, spec).unwrap();
    let claude = token(&f, "agent", "claude");
    let (_server, url) = serve(&f);
    let child = spawn_agent_http(
        &url,
        &claude,
        "approve",
        "alice",
        json!([{"op": "call", "name": "everything__get-env", "args": {}}]),
    );
    let (r, o) = finish_agent(child);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(r["elicited"].as_array().unwrap().len(), 1, "{r:#}");
    let asked = r["elicited"][0].as_str().unwrap();
    assert!(asked.contains("everything/get-env"), "{asked}");
    assert!(asked.contains("operator:user-of-agent.claude"), "{asked}");
    assert_ne!(r["steps"][0]["result"]["isError"], true, "{r:#}");
    let ev = only_run_events(&f);
    assert_eq!(ev[0]["payload"]["spec"]["approval_elicitation"], true);
    // What the client said of itself is kept as client-reported, beside the proven agent.
    let client = &ev[0]["payload"]["client"];
    assert_eq!(client["name"], "alice", "{client:#}");
    assert_eq!(client["authenticated_agent"], "claude", "{client:#}");
    // The approver is the agent the token proved, not the client's name.
    let granted = of_type(&ev, "ApprovalGranted");
    assert_eq!(granted.len(), 1, "{granted:#?}");
    assert_eq!(
        granted[0]["origin"], "operator:user-of-agent.claude",
        "{:#}",
        granted[0]
    );
    assert_eq!(of_type(&ev, "ToolInvoked").len(), 1);
}

/// `ice serve` on a free port; returns the process and the MCP URL.
fn serve(f: &Fixture) -> (Served, String) {
    serve_with(f, &[])
}

/// [`serve`] with more arguments.
fn serve_with(f: &Fixture, extra: &[&str]) -> (Served, String) {
    let mut c = Command::new(ice_bin());
    c.arg("--home").arg(&f.home).arg("serve");
    if !extra.contains(&"--listen") {
        c.args(["--listen", "127.0.0.1:0"]);
    }
    c.arg("--run-spec")
        .arg(&f.spec)
        .args(extra)
        .env_remove("ICE_HOME");
    common::serve(c)
}

/// Wait until some run has used a grant for `tool` (its call is then in flight or done).
fn wait_for_use(f: &Fixture, tool: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let o = ice(&f.home, &["log", "--type", "CapabilityUsed", "--json"]);
        if String::from_utf8_lossy(&o.stdout).contains(tool) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{tool} was never used"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn runs(f: &Fixture) -> Vec<Value> {
    let o = ice(&f.home, &["runs", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|_| {
        Value::Array(
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect(),
        )
    });
    v.as_array().cloned().unwrap_or_default()
}

#[test]
fn http_sessions_are_runs_and_a_killed_tool_server_fails_only_its_call() {
    let f = fixture("served", "4s");
    let (mut server, url) = serve(&f);
    // Session A: a slow call whose server is killed under it, then another call.
    let a = common::agent_http(
        &url,
        "legacy",
        &json!([
            {"op": "list"},
            {"op": "call", "name": "everything__trigger-long-running-operation", "args": {"duration": 10, "steps": 5}},
            {"op": "call", "name": "everything__echo", "args": {"message": "after the crash"}},
        ]),
    );
    wait_for_use(&f, "everything/trigger-long-running-operation");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let marker = f.root.join("everything.js").display().to_string();
    let killed = Command::new("pkill")
        .args(["-9", "-f", &marker])
        .status()
        .unwrap();
    assert!(
        killed.success(),
        "the tool server process was found and killed"
    );
    // Session B (a 2026-07-28 client: no session, so each request is its own run) carries on.
    let b = common::agent_http(
        &url,
        "2026-07-28",
        &json!([{"op": "call", "name": "everything__echo", "args": {"message": "other session"}}]),
    );
    let (rb, ob) = finish_agent(b);
    assert!(ob.status.success(), "{}", text(&ob));
    assert!(
        first_text(&rb["steps"][0]["result"]).contains("other session"),
        "{rb:#}"
    );
    let (ra, oa) = finish_agent(a);
    assert!(oa.status.success(), "{}", text(&oa));
    assert_eq!(ra["protocol_version"], "2025-11-25");
    assert!(
        ra["steps"][0]["tools"].as_array().unwrap().len() >= 4,
        "{ra:#}"
    );
    let crashed = &ra["steps"][1]["result"];
    assert_eq!(crashed["isError"], true, "{ra:#}");
    assert!(
        first_text(crashed).contains("everything/trigger-long-running-operation"),
        "{ra:#}"
    );
    // Whether the call reached the tool before the server went is not known, and not claimed.
    assert!(
        first_text(crashed).contains("may have reached the tool"),
        "{ra:#}"
    );
    assert!(
        first_text(&ra["steps"][2]["result"]).contains("after the crash"),
        "{ra:#}"
    );

    // Stopping the server ends the open session's run (committed) and signs a checkpoint.
    let _ = Command::new("kill").arg(server.0.id().to_string()).status();
    let status = server.0.wait().unwrap();
    assert!(
        status.success(),
        "ice serve exits cleanly on SIGTERM: {status:?}"
    );
    let all = runs(&f);
    assert!(all.len() >= 2, "{all:#?}");
    // Session A's run holds its three requests; the crash is recorded as a failed call.
    let session_a = all
        .iter()
        .map(|r| r["run_id"].as_str().unwrap().to_string())
        .find(|run| {
            of_type(&events(&f, run), "ToolInvoked")
                .iter()
                .any(|e| e["payload"]["tool"] == "trigger-long-running-operation")
        })
        .expect("session A's run");
    let ev = events(&f, &session_a);
    let invoked = of_type(&ev, "ToolInvoked");
    assert_eq!(invoked.len(), 2, "{invoked:#?}");
    assert_eq!(
        invoked[0]["payload"]["error"]["kind"], "server_gone",
        "{:#}",
        invoked[0]
    );
    assert_eq!(
        invoked[1]["payload"]["result"]["content"][0]["text"],
        "Echo: after the crash"
    );
    assert_eq!(of_type(&ev, "RunCommitted").len(), 1);
    for r in &all {
        let run = r["run_id"].as_str().unwrap();
        let ev = events(&f, run);
        assert_eq!(
            ev.last().unwrap()["type"],
            "RunTerminated",
            "run {run} ended"
        );
    }
    verify(&f);
}

/// A free TCP port on the loopback interface.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// server-everything over streamable HTTP on `port`; killed when dropped.
struct HttpEverything(std::process::Child);

impl HttpEverything {
    fn start(port: u16) -> HttpEverything {
        let child = Command::new("node")
            .arg(npm_server("server-everything"))
            .arg("streamableHttp")
            .env("PORT", port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "server-everything did not listen"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        HttpEverything(child)
    }
}

impl Drop for HttpEverything {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn ice_proxies_a_tool_server_over_streamable_http() {
    let port = free_port();
    let _server = HttpEverything::start(port);
    let url = format!("http://127.0.0.1:{port}/mcp");
    let f = fixture_with(
        "remote-1",
        "2s",
        &format!(
            "[servers.remote]\nurl = \"{url}\"\n[servers.remote.tools]\necho = \"read\"\nget-sum = \"read\"\n"
        ),
        "@id(\"remote-reads\")\npermit(principal, action == Action::\"mcp.call\", resource in ToolServer::\"remote\") when { context.effect == EffectClass::\"read\" };\n",
    );
    let (r, o) = agent_stdio(
        &f,
        "legacy",
        "none",
        json!([
            {"op": "call", "name": "remote__echo", "args": {"message": "over HTTP"}},
            {"op": "call", "name": "remote__get-sum", "args": {"a": 20, "b": 22}},
            {"op": "call", "name": "remote__get-env", "args": {}},
        ]),
    );
    assert!(o.status.success(), "{}", text(&o));
    // The same calls, directly to the same server with the same client.
    let mut direct = Command::new(python())
        .arg(agent_script())
        .args(["--mode", "auto", "--url", &url])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    direct
        .stdin
        .take()
        .unwrap()
        .write_all(
            json!([
                {"op": "call", "name": "echo", "args": {"message": "over HTTP"}},
                {"op": "call", "name": "get-sum", "args": {"a": 20, "b": 22}},
            ])
            .to_string()
            .as_bytes(),
        )
        .unwrap();
    let od = direct.wait_with_output().unwrap();
    let d: Value =
        serde_json::from_slice(&od.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&od)));
    for i in 0..2 {
        assert_eq!(
            r["steps"][i]["result"]["content"], d["steps"][i]["result"]["content"],
            "step {i}: {r:#} vs {d:#}"
        );
    }
    // get-env is not configured as a read on this server: external, so refused.
    assert_eq!(
        r["steps"][2]["result"]["structuredContent"]["ice"]["denied"],
        "policy_denied"
    );
    let ev = events(&f, "remote-1");
    let invoked = of_type(&ev, "ToolInvoked");
    assert_eq!(invoked.len(), 2);
    assert_eq!(invoked[0]["payload"]["server"], "remote");
    assert_eq!(invoked[0]["payload"]["protocol_version"], "2025-11-25");
    verify(&f);
}

/// The MCP handshake of a 2025-11-25 client over `ice mcp`'s stdio: `initialize` (its answer
/// awaited), then `notifications/initialized`.
fn handshake(stdin: &mut std::process::ChildStdin, rx: &std::sync::mpsc::Receiver<String>) {
    send_line(
        stdin,
        &json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}),
    );
    answer_from(rx, 1);
    send_line(
        stdin,
        &json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    );
}

/// `ice mcp` on the fixture's spec: the process, its stdin, and each line it writes.
fn stdio_gateway(
    f: &Fixture,
) -> (
    std::process::Child,
    std::process::ChildStdin,
    std::sync::mpsc::Receiver<String>,
) {
    let mut child = Command::new(ice_bin())
        .arg("--home")
        .arg(&f.home)
        .args(["mcp", "--run-spec"])
        .arg(&f.spec)
        .env_remove("ICE_HOME")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut line = String::new();
        while stdout.read_line(&mut line).unwrap_or(0) > 0 {
            let _ = tx.send(line.clone());
            line.clear();
        }
    });
    (child, stdin, rx)
}

/// Raw JSON-RPC lines to `ice mcp`; returns every line it answered.
fn raw_session(f: &Fixture, lines: &[String]) -> (Vec<Value>, Output) {
    let (child, mut stdin, rx) = stdio_gateway(f);
    let mut answers = Vec::new();
    let parse = |a: &str| {
        serde_json::from_str::<Value>(a)
            .unwrap_or_else(|e| panic!("ICE wrote a non-JSON line ({e}): {a:?}"))
    };
    for l in lines {
        stdin.write_all(l.as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
        // A request with an id is answered before the next line is sent.
        // (A line over the 16 MiB line limit is dropped unanswered.)
        let id = serde_json::from_str::<Value>(l)
            .ok()
            .filter(|_| l.len() < 16 << 20)
            .and_then(|v| v.get("id").cloned());
        if let Some(id) = id {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while std::time::Instant::now() < deadline {
                match rx.recv_timeout(std::time::Duration::from_millis(100)) {
                    Ok(a) => {
                        let v = parse(&a);
                        let done = v["id"] == id;
                        answers.push(v);
                        if done {
                            break;
                        }
                    }
                    Err(_) => continue,
                }
            }
        }
    }
    drop(stdin);
    let o = child.wait_with_output().unwrap();
    while let Ok(a) = rx.try_recv() {
        answers.push(serde_json::from_str(&a).unwrap());
    }
    (answers, o)
}

/// The `Mcp-Session-Id` an HTTP response's (lowercased) head gives.
fn session_id(head: &str) -> String {
    head.lines()
        .find_map(|l| l.strip_prefix("mcp-session-id:"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| panic!("no session id: {head}"))
}

/// `f`'s log verifies and its latest checkpoint covers every event (nothing was recorded after
/// the last one was signed).
fn checkpoint_covers_all(f: &Fixture) {
    let o = ice(&f.home, &["verify", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        report["latest_checkpoint"], report["events"],
        "events were recorded after the last checkpoint: {report:#}"
    );
}

/// Write one JSON-RPC message, as a line, to `ice mcp`'s stdin.
fn send_line(stdin: &mut std::process::ChildStdin, v: &Value) {
    stdin.write_all(v.to_string().as_bytes()).unwrap();
    stdin.write_all(b"\n").unwrap();
    stdin.flush().unwrap();
}

/// The answer to request `id` among `ice mcp`'s next output lines (within 30 s each).
fn answer_from(rx: &std::sync::mpsc::Receiver<String>, id: i64) -> Value {
    loop {
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no answer to request {id}"));
        let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        if v["id"] == id {
            return v;
        }
    }
}

fn answer(answers: &[Value], id: i64) -> &Value {
    answers
        .iter()
        .find(|a| a["id"] == id)
        .unwrap_or_else(|| panic!("no answer to request {id}: {answers:#?}"))
}

/// The finding: a client that cancelled a call waiting for approval (or went away) left the
/// approval pending; once an operator approved it, the call ran and its write was applied at
/// commit, with nobody to receive the result. A cancellation withdraws the request: the
/// approval is closed unanswered, the call denied, nothing performed, and the run goes on.
#[test]
fn a_call_cancelled_while_it_waits_for_approval_is_withdrawn_not_performed() {
    let f = fixture("withdraw-1", "60s");
    let (child, mut stdin, rx) = stdio_gateway(&f);
    handshake(&mut stdin, &rx);
    let mut send = move |v: Value| send_line(&mut stdin, &v);
    let answer_to = |id: i64| answer_from(&rx, id);
    send(json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "everything__get-env", "arguments": {}}}));
    let pending = pending_approval(&f, "withdraw-1");
    let approval = pending["id"].as_str().unwrap().to_string();
    send(
        json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
        "params": {"requestId": 2, "reason": "the user pressed stop"}}),
    );
    // The approval leaves the list, and can no longer be given.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let o = ice(&f.home, &["approvals", "--run", "withdraw-1", "--json"]);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        if v.as_array().is_some_and(Vec::is_empty) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still pending: {}",
            text(&o)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let o = ice(&f.home, &["approve", &approval, "--operator", "alice"]);
    assert!(!o.status.success(), "{}", text(&o));
    // The session goes on.
    send(json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
        "params": {"name": "everything__echo", "arguments": {"message": "still here"}}}));
    assert_eq!(
        answer_to(3)["result"]["content"][0]["text"],
        "Echo: still here"
    );
    drop(send); // closes the session's stdin
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let ev = events(&f, "withdraw-1");
    let denied = of_type(&ev, "CapabilityDenied");
    assert_eq!(denied.len(), 1, "{denied:#?}");
    assert_eq!(denied[0]["payload"]["reason"], "approval_denied");
    assert_eq!(denied[0]["payload"]["approval"], approval.as_str());
    assert_eq!(denied[0]["payload"]["closed"], "withdrawn");
    assert!(
        denied[0]["payload"]["detail"]
            .as_str()
            .unwrap()
            .contains("the agent withdrew the request"),
        "{:#}",
        denied[0]
    );
    assert!(of_type(&ev, "ApprovalGranted").is_empty());
    let invoked = of_type(&ev, "ToolInvoked");
    assert_eq!(invoked.len(), 1, "only the echo ran: {invoked:#?}");
    assert_eq!(invoked[0]["payload"]["tool"], "echo");
    assert_eq!(of_type(&ev, "RunCommitted").len(), 1);
    verify(&f);
}

/// The review's finding: a session's end withdraws the calls still waiting for an approval,
/// and a withdrawal counts against `[budget] denials`: a client that quit with a call waiting
/// and its refusals one short of the budget had its run aborted as budget-exhausted, not
/// committed. The run is committed; a withdrawal stops a run only at the agent's next request.
#[test]
fn a_session_that_ends_while_a_call_waits_at_the_denials_budget_is_committed() {
    let f = fixture_with("quit-waiting-1", "60s", "\n[budget]\ndenials = 1\n", "");
    let (child, mut stdin, rx) = stdio_gateway(&f);
    handshake(&mut stdin, &rx);
    let mut send = move |v: Value| send_line(&mut stdin, &v);
    send(json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "everything__get-env", "arguments": {}}}));
    pending_approval(&f, "quit-waiting-1");
    drop(send); // the client quits: its session's stdin closes
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let ev = events(&f, "quit-waiting-1");
    let denied = of_type(&ev, "CapabilityDenied");
    assert_eq!(denied.len(), 1, "{denied:#?}");
    assert_eq!(denied[0]["payload"]["closed"], "withdrawn");
    assert_eq!(of_type(&ev, "RunCommitted").len(), 1, "{ev:#?}");
    verify(&f);
}

#[test]
fn malformed_and_oversized_agent_messages_get_errors_not_a_crash() {
    let f = fixture("garbage-1", "2s");
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}});
    let call = |id: i64, params: Value| {
        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": params}).to_string()
    };
    let huge = format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":90,\"method\":\"tools/call\",\"params\":{{\"name\":\"everything__echo\",\"arguments\":{{\"message\":\"{}\"}}}}}}",
        "x".repeat(17 << 20)
    );
    let lines = vec![
        init.to_string(),
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}).to_string(),
        "this is not JSON".to_string(),
        "{\"jsonrpc\": \"2.0\", \"id\": 2, \"method\": \"tools/call\"".to_string(),
        call(3, json!({"name": 5})),
        call(
            4,
            json!({"name": "everything__echo", "arguments": "not an object"}),
        ),
        huge,
        // A number JSON cannot carry exactly cannot be recorded: refused, recorded without it.
        call(
            5,
            json!({"name": "everything__echo", "arguments": {"message": "n", "n": u64::MAX}}),
        ),
        json!({"jsonrpc": "2.0", "id": 6, "method": "no/such/method", "params": {}}).to_string(),
        // A blank intent is no intent, not a reason to refuse the call.
        call(
            8,
            json!({"name": "everything__echo", "arguments": {"message": "blank"}, "_meta": {"ice/intent": "  "}}),
        ),
        call(
            7,
            json!({"name": "everything__echo", "arguments": {"message": "still here"}}),
        ),
    ];
    let (answers, o) = raw_session(&f, &lines);
    assert!(o.status.success(), "ice mcp ended cleanly: {}", text(&o));
    assert!(answer(&answers, 1)["result"]["protocolVersion"].is_string());
    // A known method whose params do not fit is invalid params, naming what is wrong.
    for id in [3, 4] {
        let e = &answer(&answers, id)["error"];
        assert_eq!(e["code"], -32602, "{answers:#?}");
        assert!(
            e["message"]
                .as_str()
                .unwrap()
                .starts_with("the params of tools/call are not what MCP's schema for it takes: "),
            "{e}"
        );
    }
    let five = &answer(&answers, 5)["result"];
    assert_eq!(five["isError"], true, "{five:#}");
    assert!(first_text(five).contains("outside ±(2^53-1)"), "{five:#}");
    assert_eq!(answer(&answers, 6)["error"]["code"], -32601);
    let eight = &answer(&answers, 8)["result"];
    assert_eq!(first_text(eight), "Echo: blank", "{eight:#}");
    let seven = answer(&answers, 7);
    assert_eq!(
        seven["result"]["content"][0]["text"], "Echo: still here",
        "{answers:#?}"
    );
    assert!(
        answers.iter().all(|a| a["id"] != 90),
        "the oversized line was dropped"
    );
    let ev = events(&f, "garbage-1");
    assert_eq!(of_type(&ev, "RunCommitted").len(), 1);
    verify(&f);
}

#[test]
fn a_killed_session_refuses_further_calls_and_its_run_aborts() {
    let f = fixture("killed-1", "2s");
    let child = spawn_agent(
        &f,
        "legacy",
        "none",
        json!([
            {"op": "call", "name": "everything__echo", "args": {"message": "before"}},
            {"op": "sleep", "s": 2.5},
            {"op": "call", "name": "everything__echo", "args": {"message": "after the kill"}},
        ]),
    );
    wait_for_use(&f, "everything/echo");
    let o = ice(
        &f.home,
        &[
            "kill",
            "killed-1",
            "--operator",
            "bob",
            "--reason",
            "enough",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let (r, o) = finish_agent(child);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("aborted — killed by operator:bob"),
        "ice mcp reports the aborted run: {}",
        text(&o)
    );
    assert!(first_text(&r["steps"][0]["result"]).contains("before"));
    let refused = &r["steps"][2]["error"];
    assert!(
        refused["message"]
            .as_str()
            .unwrap_or("")
            .contains("stopped"),
        "{r:#}"
    );
    let ev = events(&f, "killed-1");
    assert_eq!(of_type(&ev, "RunKillRequested").len(), 1);
    assert_eq!(of_type(&ev, "RunAborted").len(), 1);
    assert_eq!(of_type(&ev, "RunCommitted").len(), 0);
    assert_eq!(of_type(&ev, "ToolInvoked").len(), 1);
    verify(&f);
}

#[test]
fn a_large_result_reaches_the_agent_and_the_event_keeps_its_blob_digest() {
    let f = fixture("large-1", "2s");
    let ws = std::fs::canonicalize(f.root.join("ws")).unwrap();
    let big: String = (0..4000)
        .map(|i| format!("line {i:05} of a large file\n"))
        .collect();
    std::fs::write(ws.join("big.txt"), &big).unwrap();
    let (r, o) = agent_stdio(
        &f,
        "legacy",
        "none",
        json!([{"op": "call", "name": "fs__read_text_file", "args": {"path": ws.join("big.txt").display().to_string()}}]),
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        first_text(&r["steps"][0]["result"]),
        big,
        "the agent got all of it"
    );
    let ev = events(&f, "large-1");
    let invoked = of_type(&ev, "ToolInvoked");
    let result = &invoked[0]["payload"]["result"];
    assert!(
        result["$blob"].is_string(),
        "kept as a blob reference: {result:#}"
    );
    let o = ice(&f.home, &["show", &id_of(invoked[0]), "--blobs", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let shown: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        shown["payload"]["result"]["content"][0]["text"].as_str(),
        Some(big.as_str()),
        "the blob holds the whole result"
    );
    verify(&f);
}

/// The status code of a raw `initialize` POST to `url` naming `host` in its Host header.
fn status_for_host(url: &str, host: &str) -> u16 {
    use std::io::Read;
    let addr = url
        .strip_prefix("http://")
        .and_then(|r| r.split('/').next())
        .unwrap();
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}})
    .to_string();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST /mcp HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    String::from_utf8_lossy(&head[9..12]).parse().unwrap()
}

#[test]
fn ice_serve_refuses_unknown_host_names_unless_allowed() {
    let f = fixture("hosts-1", "2s");
    let (_server, url) = serve_with(&f, &["--allow-host", "ice.example"]);
    assert_eq!(
        status_for_host(&url, "evil.example"),
        403,
        "DNS rebinding refused"
    );
    assert_eq!(
        status_for_host(&url, "ice.example"),
        200,
        "an allowed name is served"
    );
    assert_eq!(status_for_host(&url, "localhost"), 200);
    // A second Host header is refused (RFC 9112 §3.2), and a target in absolute form names
    // the host whatever the Host header says, at /mcp and at the operator API alike.
    let addr = common::addr_of(&url);
    for path in ["/mcp", "/api/v1/runs"] {
        let (status, body) = common::http(
            &addr,
            "GET",
            path,
            &[("Host", "localhost"), ("Host", "evil.example")],
            "",
        );
        assert_eq!(status, 400, "{path}: {body}");
        assert!(body.contains("more than one Host header"), "{body}");
        let (status, body) = common::http(
            &addr,
            "GET",
            &format!("http://evil.example{path}"),
            &[("Host", "localhost")],
            "",
        );
        assert_eq!(status, 403, "{path}: {body}");
        assert!(body.contains("host_not_allowed"), "{body}");
    }
}

/// A new bearer token of `role` (`agent` or `operator`) named `name`.
fn token(f: &Fixture, role: &str, name: &str) -> String {
    let o = ice(
        &f.home,
        &["token", "add", &format!("--{role}"), name, "--json"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let t = v["token"].as_str().unwrap().to_string();
    // Never taken for an option on a command line.
    assert!(t.starts_with("ice_") && t.len() == 4 + 43, "{t}");
    t
}

/// A raw POST of `body` to `url` (a `/mcp` URL) with `headers`: the status, the response's
/// headers and its body, as text.
fn raw_post(url: &str, headers: &[(&str, &str)], body: &Value) -> (u16, String, String) {
    raw_request("POST", url, headers, body)
}

/// [`raw_post`] with another method.
fn raw_request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> (u16, String, String) {
    use std::io::Read;
    let addr = url
        .strip_prefix("http://")
        .and_then(|r| r.split('/').next())
        .unwrap();
    let body = body.to_string();
    let mut extra = String::new();
    for (k, v) in headers {
        extra.push_str(&format!("{k}: {v}\r\n"));
    }
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} /mcp HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nMCP-Protocol-Version: 2025-11-25\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let resp = String::from_utf8_lossy(&resp).to_string();
    let (head, rest) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {resp:?}"));
    (status, head.to_ascii_lowercase(), rest.to_string())
}

fn initialize() -> Value {
    json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}})
}

#[test]
fn with_agent_tokens_each_mcp_session_is_its_authenticated_agents_and_no_one_elses() {
    // The policy knows agents by the names their tokens prove.
    let f = fixture_with(
        "agents-1",
        "2s",
        "",
        r#"permit(principal == Agent::"claude", action == Action::"mcp.call", resource == Tool::"everything/echo");"#,
    );
    let claude = token(&f, "agent", "claude");
    let other = token(&f, "agent", "other");
    let alice = token(&f, "operator", "alice");
    let (mut server, url) = serve(&f);
    let bearer = |t: &str| format!("Bearer {t}");

    // Refused before any run exists: no token, a token that is not one, an operator's token.
    let (status, head, body) = raw_post(&url, &[], &initialize());
    assert_eq!(status, 401, "{body}");
    assert!(head.contains("www-authenticate: bearer"), "{head}");
    assert!(body.contains("agent's token"), "{body}");
    assert!(body.contains("ice token add --agent"), "{body}");
    let (status, _, body) = raw_post(
        &url,
        &[("Authorization", &bearer("not-a-token"))],
        &initialize(),
    );
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("not one of this installation's"), "{body}");
    let (status, _, body) = raw_post(&url, &[("Authorization", &bearer(&alice))], &initialize());
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("operator \\\"alice\\\"") || body.contains("operator \"alice\""),
        "{body}"
    );
    let (status, _, body) = raw_post(&url, &[("Authorization", "Basic abc")], &initialize());
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("Bearer TOKEN"), "{body}");
    assert!(runs(&f).is_empty(), "a refused request makes no run");

    // An agent with its token: its session's run is that agent's, and says it was proven.
    let a = common::agent_http_as(
        &url,
        Some(&claude),
        "legacy",
        &json!([
            {"op": "list"},
            {"op": "call", "name": "everything__echo", "args": {"message": "hello as claude"}},
        ]),
    );
    let (ra, oa) = finish_agent(a);
    assert!(oa.status.success(), "{}", text(&oa));
    assert!(
        first_text(&ra["steps"][1]["result"]).contains("hello as claude"),
        "{ra:#}"
    );

    // Another agent is itself to the policy, which permits it nothing.
    let b = common::agent_http_as(
        &url,
        Some(&other),
        "legacy",
        &json!([{"op": "call", "name": "everything__echo", "args": {"message": "hello as other"}}]),
    );
    let (rb, ob) = finish_agent(b);
    assert!(ob.status.success(), "{}", text(&ob));
    assert_eq!(rb["steps"][0]["result"]["isError"], true, "{rb:#}");
    assert_eq!(
        rb["steps"][0]["result"]["structuredContent"]["ice"]["denied"], "policy_denied",
        "{rb:#}"
    );

    // Another agent cannot use claude's session, even knowing its id.
    let (status, head, body) =
        raw_post(&url, &[("Authorization", &bearer(&claude))], &initialize());
    assert_eq!(status, 200, "{body}");
    let session = session_id(&head);
    let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}});
    let theirs = [
        ("Authorization", bearer(&other)),
        ("Mcp-Session-Id", session.clone()),
    ];
    let theirs: Vec<(&str, &str)> = theirs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    for method in ["POST", "GET", "DELETE"] {
        let (status, _, body) = raw_request(method, &url, &theirs, &list);
        assert_eq!(status, 403, "{method}: {body}");
        assert!(body.contains("belongs to agent"), "{method}: {body}");
        assert!(body.contains("claude"), "{method}: {body}");
    }
    let (_, _, body) = raw_post(&url, &[("Mcp-Session-Id", &session)], &list);
    assert!(body.contains("agent's token"), "no token at all: {body}");
    // Its owner still can.
    let (_, _, body) = raw_post(
        &url,
        &[
            ("Authorization", &bearer(&claude)),
            ("Mcp-Session-Id", &session),
        ],
        &list,
    );
    assert!(body.contains("everything__echo"), "{body}");

    // A session id that no session has is refused, whoever asks.
    let (status, _, body) = raw_post(
        &url,
        &[
            ("Authorization", &bearer(&claude)),
            ("Mcp-Session-Id", "not-a-session"),
        ],
        &list,
    );
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("no open MCP session"), "{body}");

    // A revoked token is refused within seconds, on the session it opened too.
    let listed = ice(&f.home, &["token", "list", "--json"]);
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 3, "{listed:#}");
    let o = ice(&f.home, &["token", "revoke", "--agent", "claude"]);
    assert!(o.status.success(), "{}", text(&o));
    let owner = [
        ("Authorization", bearer(&claude)),
        ("Mcp-Session-Id", session.clone()),
    ];
    let owner: Vec<(&str, &str)> = owner.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (status, _, body) = raw_post(&url, &owner, &list);
        if status == 401 {
            assert!(body.contains("not one of this installation's"), "{body}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a revoked token still works: {status} {body}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // And the runs of the sessions it had open are aborted, saying why.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let revoked = loop {
        let found = runs(&f).into_iter().find_map(|r| {
            let run = r["run_id"].as_str().unwrap().to_string();
            let ev = events(&f, &run);
            of_type(&ev, "AbortReasonDeclared")
                .first()
                .map(|e| (run.clone(), e["payload"].clone()))
        });
        if let Some(found) = found {
            break found;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the revoked agent's open run was not aborted"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(revoked.1["reason"], "agent_revoked", "{:#}", revoked.1);
    let ev = events(&f, &revoked.0);
    assert_eq!(
        of_type(&ev, "RunProvisioned")[0]["payload"]["agent"],
        "claude"
    );
    let again = ice(&f.home, &["token", "revoke", "--agent", "claude"]);
    assert!(!again.status.success());
    assert!(
        text(&again).contains("holds no token of agent"),
        "{}",
        text(&again)
    );

    let _ = Command::new("kill").arg(server.0.id().to_string()).status();
    assert!(server.0.wait().unwrap().success());
    let all = runs(&f);
    assert_eq!(all.len(), 3, "{all:#?}");
    let mut agents = Vec::new();
    for r in &all {
        let ev = events(&f, r["run_id"].as_str().unwrap());
        let provisioned = &of_type(&ev, "RunProvisioned")[0]["payload"];
        let agent = provisioned["agent"].as_str().unwrap().to_string();
        assert_eq!(
            provisioned["client"]["authenticated_agent"], agent,
            "{provisioned:#}"
        );
        for e in of_type(&ev, "CapabilityRequested") {
            assert_eq!(e["origin"], format!("agent:{agent}"), "{e:#}");
        }
        agents.push(agent);
    }
    agents.sort();
    assert_eq!(agents, ["claude", "claude", "other"]);
    verify(&f);
}

#[test]
fn without_agent_tokens_only_a_loopback_server_takes_anonymous_sessions() {
    // On loopback, with no agent token yet: anyone local, as the spec's agent (recorded so).
    let f = fixture("agents-2", "2s");
    let (mut server, url) = serve(&f);
    let (status, _, body) = raw_post(&url, &[], &initialize());
    assert_eq!(status, 200, "{body}");
    // Once an agent token has existed, revoking it does not let anonymous clients back in.
    token(&f, "agent", "first");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while raw_post(&url, &[], &initialize()).0 != 401 {
        assert!(
            std::time::Instant::now() < deadline,
            "the new token was not picked up"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let o = ice(&f.home, &["token", "revoke", "--agent", "first"]);
    assert!(o.status.success(), "{}", text(&o));
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let (status, _, body) = raw_post(&url, &[], &initialize());
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("has never had an agent token"), "{body}");
    let _ = Command::new("kill").arg(server.0.id().to_string()).status();
    assert!(server.0.wait().unwrap().success());
    // The first initialize (and any made before the token was picked up) were anonymous runs.
    let all = runs(&f);
    assert!(!all.is_empty());
    for r in &all {
        let ev = events(&f, r["run_id"].as_str().unwrap());
        let provisioned = &of_type(&ev, "RunProvisioned")[0]["payload"];
        assert_eq!(provisioned["agent"], "assistant", "{provisioned:#}");
        assert_eq!(
            provisioned["client"]["authenticated_agent"],
            Value::Null,
            "{provisioned:#}"
        );
    }
    // Listening beyond loopback: nothing without an agent's token.
    let g = fixture("agents-3", "2s");
    let (_open, wide) = serve_with(&g, &["--listen", "0.0.0.0:0"]);
    let port = wide.rsplit(':').next().unwrap().trim_end_matches("/mcp");
    let local = format!("http://127.0.0.1:{port}/mcp");
    let (status, _, body) = raw_post(&local, &[], &initialize());
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("only by a server on loopback"), "{body}");
    assert!(runs(&g).is_empty());
}

#[test]
fn a_config_edit_that_does_not_read_refuses_every_token_until_it_is_fixed() {
    let f = fixture("broken-config", "2s");
    let claude = token(&f, "agent", "claude");
    let (_server, url) = serve(&f);
    let bearer = format!("Bearer {claude}");
    let (status, _, body) = raw_post(&url, &[("Authorization", &bearer)], &initialize());
    assert_eq!(status, 200, "{body}");
    // A hand edit breaks the file (say, one meant to revoke a token): the server fails closed.
    let config = f.home.join("config.toml");
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{good}\n[[agents]\nname = \"typo\"\n")).unwrap();
    let wait_for = |want: u16| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let (status, _, body) = raw_post(&url, &[("Authorization", &bearer)], &initialize());
            if status == want {
                return body;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "still {status} (waiting for {want}): {body}"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    };
    let body = wait_for(503);
    assert!(body.contains("credentials_unavailable"), "{body}");
    // No token and no header get in either (not even on loopback).
    let (status, _, _) = raw_post(&url, &[], &initialize());
    assert_eq!(status, 503);
    // Fixed: the tokens it holds work again.
    std::fs::write(&config, &good).unwrap();
    wait_for(200);
}

#[test]
fn an_mcp_client_uses_ices_own_workspace_tools_staged_until_the_session_commits() {
    let f = fixture_with(
        "builtin-1",
        "2s",
        "",
        r#"@id("ws-read")
permit(principal == Agent::"assistant", action in [Action::"fs.read", Action::"fs.list"], resource in Dir::".");
@id("ws-write")
@max_bytes("64")
permit(principal == Agent::"assistant", action == Action::"fs.write", resource in Dir::".");
@id("cat")
@external("permit")
permit(principal == Agent::"assistant", action == Action::"process.exec", resource == Command::"cat");"#,
    );
    let ws = std::fs::canonicalize(f.root.join("ws")).unwrap();
    let notes = ws.join("notes.txt");
    let (r, o) = agent_stdio(
        &f,
        "legacy",
        "none",
        json!([
            {"op": "list"},
            {"op": "call", "name": "fs_read", "args": {"path": "notes.txt"}, "intent": "look"},
            {"op": "call", "name": "fs_write", "args": {"path": "notes.txt", "content": "rewritten through ICE\n"}},
            {"op": "call", "name": "fs_read", "args": {"path": "notes.txt"}},
            {"op": "call", "name": "fs_write", "args": {"path": "../escape.txt", "content": "x"}},
            {"op": "call", "name": "fs_write", "args": {"path": "big.txt", "content": "x".repeat(65)}},
            {"op": "call", "name": "fs_write", "args": {"path": 3}},
            {"op": "call", "name": "fs_list", "args": {"path": "."}},
            {"op": "call", "name": "process_exec", "args": {"program": "cat", "args": ["notes.txt"]}},
            {"op": "call", "name": "process_exec", "args": {"program": "rm", "args": ["notes.txt"]}},
        ]),
    );
    assert!(o.status.success(), "{}", text(&o));
    // Listed: what some permit could allow this agent (no delete, no HTTP), beside the
    // servers' tools.
    let names: Vec<&str> = r["steps"][0]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    for want in [
        "fs_list",
        "fs_read",
        "fs_write",
        "process_exec",
        "everything__echo",
    ] {
        assert!(names.contains(&want), "{want} not in {names:?}");
    }
    for not in ["fs_delete", "http_request"] {
        assert!(!names.contains(&not), "{not} listed: {names:?}");
    }
    let read = &r["steps"][1]["result"];
    assert_eq!(first_text(read), "hello from the workspace\n", "{read:#}");
    assert_eq!(read["structuredContent"]["truncated"], false, "{read:#}");
    // The write is staged: the session reads it back; the workspace is untouched until commit.
    assert_ne!(r["steps"][2]["result"]["isError"], true, "{r:#}");
    assert_eq!(
        first_text(&r["steps"][3]["result"]),
        "rewritten through ICE\n"
    );
    // Confinement, the grant's @max_bytes, and arguments that make no request.
    let escape = &r["steps"][4]["result"];
    assert_eq!(
        escape["structuredContent"]["ice"]["denied"], "confinement",
        "{escape:#}"
    );
    let big = &r["steps"][5]["result"];
    assert_eq!(
        big["structuredContent"]["ice"]["denied"], "grant_constraint",
        "{big:#}"
    );
    assert_eq!(r["steps"][6]["error"]["code"], -32602, "{r:#}");
    assert!(
        first_text(&r["steps"][7]["result"]).contains("notes.txt"),
        "{r:#}"
    );
    // A command runs on a copy of the workspace with the staged write applied; a program no
    // policy permits is refused.
    let cat = &r["steps"][8]["result"]["structuredContent"];
    assert_eq!(cat["stdout"], "rewritten through ICE\n", "{r:#}");
    assert_eq!(cat["exit"], 0, "{r:#}");
    let rm = &r["steps"][9]["result"];
    assert_eq!(
        rm["structuredContent"]["ice"]["denied"], "policy_denied",
        "{rm:#}"
    );
    // The session ended: its run validated and committed the staged write, and only it.
    assert_eq!(
        std::fs::read_to_string(&notes).unwrap(),
        "rewritten through ICE\n"
    );
    assert!(!f.root.join("escape.txt").exists());
    assert!(!ws.join("big.txt").exists());
    let ev = events(&f, "builtin-1");
    assert_eq!(of_type(&ev, "EffectStaged").len(), 1);
    assert_eq!(of_type(&ev, "EffectApplied").len(), 1);
    assert_eq!(of_type(&ev, "RunCommitted").len(), 1);
    let granted = of_type(&ev, "CapabilityGranted");
    let write = granted
        .iter()
        .find(|g| g["payload"]["capability"] == "fs.write")
        .unwrap();
    assert_eq!(write["payload"]["constraints"], json!({"max_bytes": 64}));
    assert_eq!(of_type(&ev, "FileRead")[0]["intent"], "look");
    verify(&f);
}

/// A raw HTTP/1.1 request to the server of `url` (`ice serve`'s MCP URL): `method` `target`
/// with `headers` and `body`; the status, the head (lowercased) and the body, as text.
fn raw_at(
    url: &str,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    use std::io::Read;
    let addr = url
        .strip_prefix("http://")
        .and_then(|r| r.split('/').next())
        .unwrap();
    let mut extra = String::new();
    for (k, v) in headers {
        extra.push_str(&format!("{k}: {v}\r\n"));
    }
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    write!(
        s,
        "{method} {target} HTTP/1.1\r\nHost: localhost\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let resp = String::from_utf8_lossy(&resp).to_string();
    let (head, rest) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {resp:?}"));
    (status, head.to_ascii_lowercase(), rest.to_string())
}

/// The `{"error": {"code", "message"}}` of a JSON error answer.
fn json_error_of(head: &str, body: &str) -> (String, String) {
    assert!(
        head.contains("content-type: application/json"),
        "{head}\n\n{body}"
    );
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    (
        v["error"]["code"].as_str().unwrap_or_default().to_string(),
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

#[test]
fn ice_serve_refuses_two_authorization_headers_wherever_it_reads_a_token() {
    let f = fixture("two-tokens", "2s");
    let claude = token(&f, "agent", "claude");
    let alice = token(&f, "operator", "alice");
    let (_server, url) = serve(&f);
    let (claude, alice) = (format!("Bearer {claude}"), format!("Bearer {alice}"));
    let init = initialize().to_string();
    let mcp_headers = |first: &str, second: &str| {
        vec![
            ("Authorization", first.to_string()),
            ("Authorization", second.to_string()),
            ("Content-Type", "application/json".to_string()),
            ("Accept", "application/json, text/event-stream".to_string()),
            ("MCP-Protocol-Version", "2025-11-25".to_string()),
        ]
    };
    for (method, target, body) in [
        ("POST", "/mcp", init.as_str()),
        ("GET", "/api/v1/runs", ""),
        ("GET", "/metrics", ""),
    ] {
        // Whichever comes first, and even when both would be accepted alone.
        for (first, second) in [(&claude, &alice), (&alice, &claude), (&alice, &alice)] {
            let headers = mcp_headers(first, second);
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let (status, head, answer) = raw_at(&url, method, target, &headers, body);
            assert_eq!(status, 400, "{method} {target}: {answer}");
            let (code, message) = json_error_of(&head, &answer);
            assert_eq!(code, "duplicate_header", "{method} {target}: {answer}");
            assert!(
                message.contains("2 Authorization headers"),
                "{method} {target}: {answer}"
            );
        }
    }
    assert!(runs(&f).is_empty(), "a refused request makes no run");
    // One header of each is served as before.
    let one = |t: &str| {
        vec![
            ("Authorization", t.to_string()),
            ("Content-Type", "application/json".to_string()),
            ("Accept", "application/json, text/event-stream".to_string()),
        ]
    };
    for (method, target, token, body) in [
        ("POST", "/mcp", &claude, init.as_str()),
        ("GET", "/api/v1/runs", &alice, ""),
        ("GET", "/metrics", &alice, ""),
    ] {
        let headers = one(token);
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, _, answer) = raw_at(&url, method, target, &headers, body);
        assert_eq!(status, 200, "{method} {target}: {answer}");
    }
}

#[test]
fn ice_serve_answers_405_414_and_431_with_a_json_error() {
    let f = fixture("refusals-json", "2s");
    let alice = format!("Bearer {}", token(&f, "operator", "alice"));
    let (_server, url) = serve(&f);
    let auth = [("Authorization", alice.as_str())];
    // A method a path does not take: the API's, MCP's and the UI's 405s name it, and `Allow`.
    // (No agent token exists, so /mcp takes anonymous loopback clients, without a header.)
    for (method, target, allow) in [
        ("DELETE", "/api/v1/runs", "get,head,post"),
        ("PUT", "/mcp", "get, post, delete"),
        ("POST", "/ui/", "get,head"),
    ] {
        let headers: &[(&str, &str)] = if target == "/mcp" { &[] } else { &auth };
        let (status, head, body) = raw_at(&url, method, target, headers, "");
        assert_eq!(status, 405, "{method} {target}: {body}");
        let (code, message) = json_error_of(&head, &body);
        assert_eq!(code, "method_not_allowed", "{body}");
        assert!(
            message.contains(&format!("{method} is not allowed on {target}")),
            "{body}"
        );
        assert!(
            head.contains(&format!("allow: {allow}")),
            "{method} {target}: {head}"
        );
    }
    // A URI longer than the server reads: 414, on the API and on MCP alike.
    for target in ["/api/v1/runs", "/mcp"] {
        let long = format!("{target}?{}", "x".repeat(70_000));
        let (status, head, body) = raw_at(&url, "GET", &long, &[], "");
        assert_eq!(status, 414, "{body}");
        let (code, message) = json_error_of(&head, &body);
        assert_eq!(code, "uri_too_long", "{body}");
        assert!(message.contains("URI"), "{body}");
    }
    // More header fields than the server reads: 431.
    let many: Vec<(String, String)> = (0..150)
        .map(|i| (format!("X-Field-{i}"), i.to_string()))
        .collect();
    let mut headers: Vec<(&str, &str)> =
        many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    headers.extend(auth);
    let (status, head, body) = raw_at(&url, "GET", "/api/v1/runs", &headers, "");
    assert_eq!(status, 431, "{body}");
    let (code, message) = json_error_of(&head, &body);
    assert_eq!(code, "headers_too_large", "{body}");
    assert!(message.contains("header"), "{body}");
    // The server is still serving.
    let (status, _, body) = raw_at(&url, "GET", "/api/v1/runs", &auth, "");
    assert_eq!(status, 200, "{body}");
}

#[test]
fn ice_serve_refuses_an_empty_or_malformed_allowed_host() {
    let f = fixture("hosts-2", "2s");
    for bad in [
        "",
        "  ",
        "http://ice.example",
        "ice.example/mcp",
        "ice.example:",
        "ice.example:99999",
        "ice.example:0",
        "*.example.com",
    ] {
        let mut child = Command::new(ice_bin())
            .arg("--home")
            .arg(&f.home)
            .args(["serve", "--listen", "127.0.0.1:0", "--run-spec"])
            .arg(&f.spec)
            .args(["--allow-host", bad])
            .env_remove("ICE_HOME")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("ice serve --allow-host {bad:?} started serving");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert_eq!(status.code(), Some(2), "--allow-host {bad:?}: {err}");
        assert!(err.contains("--allow-host"), "--allow-host {bad:?}: {err}");
        assert!(
            err.contains("host name"),
            "--allow-host {bad:?} says what is wrong: {err}"
        );
    }
}

#[test]
fn stopping_ice_serve_signs_its_last_checkpoint_after_every_run_has_recorded() {
    let f = fixture("stopping", "2s");
    let (mut server, url) = serve(&f);
    // Sessions whose runs are open (anonymous, on loopback).
    let sessions = 8;
    let mut ids = Vec::new();
    for _ in 0..sessions {
        let (status, head, body) = raw_post(&url, &[], &initialize());
        assert_eq!(status, 200, "{body}");
        let id = session_id(&head);
        ids.push(id);
    }
    let open = runs(&f);
    assert_eq!(open.len(), sessions, "{open:#?}");
    // Half are closed by their clients just before the server is told to stop (their runs
    // end in the background as the transport drops them); the rest are still open then.
    let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}});
    for id in &ids[..sessions / 2] {
        let (status, _, body) = raw_request("DELETE", &url, &[("Mcp-Session-Id", id)], &list);
        assert!((200..300).contains(&status), "{status}: {body}");
    }
    let _ = Command::new("kill").arg(server.0.id().to_string()).status();
    let status = server.0.wait().unwrap();
    assert!(
        status.success(),
        "ice serve exits cleanly on SIGTERM: {status:?}"
    );
    // Every run ended, and the final checkpoint covers its last event.
    for r in &runs(&f) {
        let run = r["run_id"].as_str().unwrap();
        let ev = events(&f, run);
        assert_eq!(ev.last().unwrap()["type"], "RunTerminated", "run {run}");
    }
    checkpoint_covers_all(&f);
}

/// [`serve_with`], with `env` set and ice serve's stderr (after its first line) kept.
fn serve_keeping_stderr(
    f: &Fixture,
    env: &[(&str, &str)],
) -> (Served, String, std::sync::Arc<std::sync::Mutex<String>>) {
    use std::io::BufRead;
    let mut child = Command::new(ice_bin())
        .arg("--home")
        .arg(&f.home)
        .args(["serve", "--listen", "127.0.0.1:0", "--run-spec"])
        .arg(&f.spec)
        .envs(env.iter().copied())
        .env_remove("ICE_HOME")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    let served = Served(child);
    let url = line
        .trim()
        .strip_prefix("ice serve: MCP at ")
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .to_string();
    let kept = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let into = kept.clone();
    std::thread::spawn(move || {
        for l in err.lines().map_while(Result::ok) {
            let mut k = into.lock().unwrap();
            k.push_str(&l);
            k.push('\n');
        }
    });
    (served, url, kept)
}

/// Every pending approval, once there are `n`.
fn pending_approvals(f: &Fixture, n: usize) -> Vec<Value> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let o = ice(&f.home, &["approvals", "--json"]);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        if let Some(a) = v.as_array().filter(|a| a.len() >= n) {
            return a.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{n} approvals did not appear: {}",
            text(&o)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// SIGTERM to `server`; how long it took to exit (cleanly).
fn stop(server: &mut Served) -> std::time::Duration {
    let started = std::time::Instant::now();
    let _ = Command::new("kill")
        .args(["-TERM", &server.0.id().to_string()])
        .status();
    let status = server.0.wait().unwrap();
    assert!(
        status.success(),
        "ice serve exits cleanly on SIGTERM: {status:?}"
    );
    started.elapsed()
}

#[test]
fn stopping_ice_serve_closes_approval_waits_and_suspends_their_runs_at_once() {
    // The plan run the API starts asks to notify a local endpoint, with an operator's approval.
    let notify = r#"
@id("notify-needs-approval")
@approval("required")
permit(principal == Agent::"assistant", action == Action::"http.request", resource == Host::"127.0.0.1");
"#;
    let f = fixture_with("stop-waiting", "120s", "", notify);
    std::fs::write(
        f.root.join("plan.toml"),
        "[[step]]\nintent = \"notify\"\ncapability = \"http.request\"\ntarget = \"http://127.0.0.1:9/notify\"\narguments = { method = \"GET\" }\n\n[[step]]\nintent = \"note\"\ncapability = \"fs.read\"\ntarget = \"notes.txt\"\n",
    )
    .unwrap();
    let plan_spec = f.root.join("plan-run.toml");
    std::fs::write(
        &plan_spec,
        "[run]\nagent = \"assistant\"\nworkspace = \"ws\"\npolicy = \"policies\"\n\n[agent]\ndriver = \"plan\"\nplan = \"plan.toml\"\n\n[approvals]\ntimeout = \"120s\"\n",
    )
    .unwrap();
    let alice = format!("Bearer {}", token(&f, "operator", "alice"));
    let (mut server, url, stderr) = serve_keeping_stderr(&f, &[]);
    // An MCP session's call waits for an operator.
    let mut agent = common::agent_http(
        &url,
        "legacy",
        &json!([{"op": "call", "name": "everything__get-env", "args": {}}]),
    );
    // So does the plan run started through the API.
    let body = json!({"spec": plan_spec.display().to_string()}).to_string();
    let (status, _, answer) = raw_at(
        &url,
        "POST",
        "/api/v1/runs",
        &[
            ("Authorization", alice.as_str()),
            ("Content-Type", "application/json"),
        ],
        &body,
    );
    assert_eq!(status, 202, "{answer}");
    let waiting = pending_approvals(&f, 2);
    assert_eq!(waiting.len(), 2, "{waiting:#?}");
    // Stopping does not wait for the approvals' 120 s (nor for the 30 s grace).
    let took = stop(&mut server);
    assert!(
        took < std::time::Duration::from_secs(15),
        "ice serve took {took:?} to stop"
    );
    // The MCP client waiting for its call got the denial (found by a probe: it got nothing).
    let _ = agent.stdin.take();
    let o = agent.wait_with_output().unwrap();
    let report: Value =
        serde_json::from_slice(o.stdout.split(|b| *b == b'\n').next().unwrap_or_default())
            .unwrap_or_else(|e| panic!("the agent reported nothing ({e}): {}", text(&o)));
    let result = &report["steps"][0]["result"];
    assert_eq!(result["isError"], true, "{report:#}");
    assert_eq!(
        result["structuredContent"]["ice"]["denied"], "approval_denied",
        "{report:#}"
    );
    assert!(
        first_text(result).contains("ice serve is stopping"),
        "{report:#}"
    );
    let err = stderr.lock().unwrap().clone();
    assert!(!err.contains("still recording"), "{err}");
    for pending in &waiting {
        let approval = pending["id"].as_str().unwrap();
        let run = pending["run"].as_str().unwrap();
        let ev = events(&f, run);
        // The request was closed, naming the approval and why.
        let denied: Vec<_> = of_type(&ev, "CapabilityDenied")
            .into_iter()
            .filter(|e| e["payload"]["approval"] == approval)
            .collect();
        assert_eq!(denied.len(), 1, "run {run}: {ev:#?}");
        assert_eq!(denied[0]["payload"]["reason"], "approval_denied");
        assert!(
            denied[0]["payload"]["detail"]
                .as_str()
                .unwrap()
                .contains("ice serve is stopping"),
            "{:#}",
            denied[0]
        );
        // The run was suspended, as crash recovery would have, not committed: nothing after.
        let last = ev.last().unwrap();
        assert_eq!(last["type"], "RunSuspended", "run {run}: {last:#}");
        assert_eq!(last["payload"]["reason"], "interrupted", "{last:#}");
        assert!(of_type(&ev, "ValidationStarted").is_empty(), "run {run}");
        // No answer can be recorded for it any more.
        let o = ice(&f.home, &["approve", approval, "--operator", "bob"]);
        assert!(!o.status.success(), "approved after the stop: {}", text(&o));
        assert_eq!(events(&f, run).len(), ev.len(), "run {run}");
        // The record replays to the books the run kept, and its decisions are re-made.
        for args in [vec!["replay", run], vec!["replay", run, "--drive"]] {
            let o = ice(&f.home, &args);
            assert!(o.status.success(), "{args:?}: {}", text(&o));
        }
    }
    // The plan did not take its next step.
    let plan_run = waiting
        .iter()
        .find(|p| p["capability"] == "http.request")
        .expect("the plan run's approval");
    let ev = events(&f, plan_run["run"].as_str().unwrap());
    assert_eq!(of_type(&ev, "CapabilityRequested").len(), 1, "{ev:#?}");
    // The final checkpoint covers both runs' ends.
    checkpoint_covers_all(&f);
}

#[test]
fn stopping_ice_serve_counts_each_run_still_recording_once() {
    let f = fixture("stop-count", "2s");
    // A grace shorter than the call in flight, so the run is still recording when it ends.
    let (mut server, url, stderr) = serve_keeping_stderr(&f, &[("ICE_SERVE_GRACE_MS", "500")]);
    let mut agent = common::agent_http(
        &url,
        "legacy",
        &json!([{"op": "call", "name": "everything__trigger-long-running-operation", "args": {"duration": 8, "steps": 4}}]),
    );
    wait_for_use(&f, "everything/trigger-long-running-operation");
    stop(&mut server);
    let _ = agent.kill();
    let _ = agent.wait();
    let err = stderr.lock().unwrap().clone();
    assert!(
        err.contains("1 session run(s) and 0 API-driven run(s) were still recording after 0.5 s"),
        "{err}"
    );
}

#[test]
fn ice_serve_refuses_a_bad_recording_grace() {
    let f = fixture("stop-grace", "2s");
    for bad in ["0", "x", "600001"] {
        let o = Command::new(ice_bin())
            .arg("--home")
            .arg(&f.home)
            .args(["serve", "--listen", "127.0.0.1:0", "--run-spec"])
            .arg(&f.spec)
            .env("ICE_SERVE_GRACE_MS", bad)
            .env_remove("ICE_HOME")
            .output()
            .unwrap();
        assert!(
            !o.status.success(),
            "ICE_SERVE_GRACE_MS={bad}: {}",
            text(&o)
        );
        assert!(text(&o).contains("ICE_SERVE_GRACE_MS"), "{}", text(&o));
    }
}

#[test]
fn ice_serve_answers_mcp_transport_refusals_with_a_json_error() {
    let f = fixture("mcp-refusals", "2s");
    let (_server, url) = serve(&f);
    // A stream asked for without a session: rmcp's refusal, in the JSON error shape.
    let (status, head, body) = raw_at(&url, "GET", "/mcp", &[("Accept", "text/event-stream")], "");
    assert_eq!(status, 400, "{head}\n\n{body}");
    let (code, message) = json_error_of(&head, &body);
    assert_eq!(code, "bad_request", "{body}");
    assert!(message.contains("Session ID is required"), "{body}");
    // A body that is no JSON-RPC message (cut short, a batch, another version): 400, saying
    // what a message must be, not rmcp's 415 as if the media type were wrong.
    let headers = [
        ("Accept", "application/json, text/event-stream"),
        ("Content-Type", "application/json"),
    ];
    for bad in [
        r#"{"jsonrpc":"2.0","id":1,"method":"initialize""#,
        r#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#,
        r#"{"jsonrpc":"1.0","id":1,"method":"ping"}"#,
    ] {
        let (status, head, body) = raw_at(&url, "POST", "/mcp", &headers, bad);
        assert_eq!(status, 400, "{bad}: {head}\n\n{body}");
        let (code, message) = json_error_of(&head, &body);
        assert_eq!(code, "invalid_message", "{body}");
        assert!(message.contains("not one JSON-RPC 2.0 message"), "{body}");
    }
    // A 405's message lists what the path takes, one space after each comma.
    let (status, head, body) = raw_at(&url, "PUT", "/mcp", &[], "");
    assert_eq!(status, 405, "{body}");
    let (_, message) = json_error_of(&head, &body);
    assert!(
        message.ends_with("it takes GET, POST, DELETE"),
        "{message:?}"
    );
}

/// The finding: one agent's token could open sessions without end (each holding a run, its
/// lock and a workspace handle) and hold every connection with `GET` streams, locking out the
/// other agents and the operators; revoking the token left its streams open. Sessions and
/// requests in flight are bounded per agent, and a revoked token's streams end.
#[test]
fn one_agent_cannot_hold_every_session_and_a_revoked_tokens_streams_end() {
    let f = fixture("capped", "4s");
    let hog = token(&f, "agent", "hog");
    let other = token(&f, "agent", "other");
    let (_server, url) = serve(&f);
    let auth = |t: &str| format!("Bearer {t}");
    let mut first = None;
    for i in 0..32 {
        let (status, head, body) = raw_post(&url, &[("Authorization", &auth(&hog))], &initialize());
        assert_eq!(status, 200, "session {i}: {body}");
        first.get_or_insert_with(|| session_id(&head));
    }
    let (status, _, body) = raw_post(&url, &[("Authorization", &auth(&hog))], &initialize());
    assert_eq!(status, 429, "{body}");
    let refusal: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(refusal["error"]["code"], "too_many_sessions", "{body}");
    assert!(
        refusal["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("agent \"hog\" already holds 32 open MCP sessions"),
        "{body}"
    );
    // Another agent is still served.
    let (status, _, body) = raw_post(&url, &[("Authorization", &auth(&other))], &initialize());
    assert_eq!(status, 200, "{body}");
    // Ending a session makes room for one more.
    let first = first.unwrap();
    let (status, _, body) = raw_request(
        "DELETE",
        &url,
        &[("Authorization", &auth(&hog)), ("Mcp-Session-Id", &first)],
        &Value::Null,
    );
    assert!(status < 300, "{status} {body}");
    let (status, head, body) = raw_post(&url, &[("Authorization", &auth(&hog))], &initialize());
    assert_eq!(status, 200, "{first}: {body}");
    let session = session_id(&head);

    // A stream the agent holds open ends once its token is revoked.
    let stream = open_stream(&url, Some(&auth(&hog)), &session);
    let o = ice(&f.home, &["token", "revoke", "--agent", "hog"]);
    assert!(o.status.success(), "{}", text(&o));
    ends_within_30s(stream, "the token was revoked");
}

/// A `GET /mcp` event stream of `session` (with `authorization`, if given), its status read.
fn open_stream(
    url: &str,
    authorization: Option<&str>,
    session: &str,
) -> std::io::BufReader<std::net::TcpStream> {
    let addr = url
        .strip_prefix("http://")
        .and_then(|r| r.split('/').next())
        .unwrap()
        .to_string();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    let authorization = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET /mcp HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\nMCP-Protocol-Version: 2025-11-25\r\n{authorization}Mcp-Session-Id: {session}\r\n\r\n"
    )
    .unwrap();
    let mut reader = std::io::BufReader::new(s);
    let mut status_line = String::new();
    std::io::BufRead::read_line(&mut reader, &mut status_line).unwrap();
    assert!(status_line.contains(" 200 "), "{status_line}");
    reader
}

/// The server ends `stream` within 30 s (of `what`).
fn ends_within_30s(mut stream: std::io::BufReader<std::net::TcpStream>, what: &str) {
    // A deadline on the whole read (keep-alive comments would reset a socket timeout).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut rest = Vec::new();
        let _ = tx.send(std::io::Read::read_to_end(&mut stream, &mut rest).is_ok());
    });
    let ended = rx.recv_timeout(std::time::Duration::from_secs(30));
    assert_eq!(
        ended,
        Ok(true),
        "the stream was still open 30 s after {what}"
    );
}

/// From the review: an anonymous stream on a server without agent tokens stayed open after
/// the first token was added (from then on anonymous requests are refused).
#[test]
fn an_anonymous_stream_ends_once_agent_tokens_exist() {
    let f = fixture("anon-stream", "4s");
    let (_server, url) = serve(&f);
    let (status, head, body) = raw_post(&url, &[], &initialize());
    assert_eq!(status, 200, "{body}");
    let session = session_id(&head);
    let stream = open_stream(&url, None, &session);
    token(&f, "agent", "first");
    ends_within_30s(stream, "the first agent token was added");
}

/// An MCP tool call runs no longer than the run's wall-time budget has left (its server's
/// `call_timeout` is 20 s here, the budget 2 s, the call would take 30 s): the call is cut,
/// recorded with the timeout, and the run stops on the exhausted budget. (The whole agent, its
/// Python client and the Node server included, must end well before the call would have: the
/// bound leaves room for a loaded machine, where it once took 8 s.)
#[test]
fn a_tool_call_runs_no_longer_than_the_wall_time_budget_has_left() {
    let f = fixture_with(
        "walltime-tool",
        "2s",
        "[budget]\nwall_time = \"2s\"\non_exhaustion = \"abort\"\n",
        "",
    );
    let started = std::time::Instant::now();
    let (_r, o) = agent_stdio(
        &f,
        "legacy",
        "none",
        json!([{"op": "call", "name": "everything__trigger-long-running-operation", "args": {"duration": 30, "steps": 5}}]),
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(18),
        "took {:?}: {}",
        started.elapsed(),
        text(&o)
    );
    let ev = events(&f, "walltime-tool");
    let invoked = of_type(&ev, "ToolInvoked");
    assert_eq!(invoked.len(), 1, "{ev:#?}");
    assert_eq!(
        invoked[0]["payload"]["error"]["kind"], "timeout",
        "{:#}",
        invoked[0]
    );
    assert_eq!(of_type(&ev, "RunCommitted").len(), 0, "{ev:#?}");
}

/// Send `signal` to `child`, and wait (at most 20 s) for it to exit.
fn signal_and_wait(child: &mut std::process::Child, signal: &str) -> std::process::ExitStatus {
    let _ = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            panic!("ice mcp did not exit within 20 s of {signal}: {err}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The probe's finding: `ice mcp` had no signal handling, so an MCP client stopping its
/// server (SIGTERM, as the SDKs do once stdin is closed) killed it mid-run: the run stayed
/// EXECUTING with nothing recorded, an approval wait stayed listed, and no checkpoint covered
/// the session's last events. A signal now ends the session as a client's leaving does: the
/// run commits and a checkpoint covers it.
#[test]
fn ice_mcp_stopped_by_a_signal_ends_its_run_and_signs_a_checkpoint() {
    for (run, signal) in [("stop-term", "-TERM"), ("stop-int", "-INT")] {
        let f = fixture(run, "60s");
        let (mut child, mut stdin, rx) = stdio_gateway(&f);
        handshake(&mut stdin, &rx);
        let mut send = |v: Value| send_line(&mut stdin, &v);
        let answer_to = |id: i64| answer_from(&rx, id);
        send(json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
            "params": {"name": "everything__echo", "arguments": {"message": "before the stop"}}}));
        assert_eq!(
            answer_to(2)["result"]["content"][0]["text"],
            "Echo: before the stop"
        );
        // The client keeps its stdin open: only the signal ends the session.
        let status = signal_and_wait(&mut child, signal);
        assert!(status.success(), "{run}: {status:?}");
        drop(stdin);
        let ev = events(&f, run);
        assert_eq!(of_type(&ev, "ToolInvoked").len(), 1, "{run}: {ev:#?}");
        assert_eq!(of_type(&ev, "RunCommitted").len(), 1, "{run}: {ev:#?}");
        assert_eq!(ev.last().unwrap()["type"], "RunTerminated", "{run}");
        checkpoint_covers_all(&f);
    }
}

/// Live processes (not zombies) as (pid, parent, process group), from /proc.
fn processes() -> Vec<(u32, u32, u32)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid pgrp …": the name may hold spaces and parentheses.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 3 && f[0] != "Z" {
            out.push((pid, f[1].parse().unwrap_or(0), f[2].parse().unwrap_or(0)));
        }
    }
    out
}

/// The probe's finding: a second signal made `ice mcp` exit at once (as it says), but its
/// stdio tool servers, in process groups of their own, kept running. They are killed with it.
#[test]
fn a_second_signal_stops_ice_mcp_and_its_tool_servers_at_once() {
    let run = "stop-twice";
    let f = fixture(run, "60s");
    let (mut child, mut stdin, rx) = stdio_gateway(&f);
    handshake(&mut stdin, &rx);
    let mut send = |v: Value| send_line(&mut stdin, &v);
    send(json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "everything__trigger-long-running-operation", "arguments": {"duration": 60, "steps": 5}}}));
    wait_for_use(&f, "everything/trigger-long-running-operation");
    let gateway = child.id();
    let groups: Vec<u32> = processes()
        .into_iter()
        .filter(|&(_, parent, _)| parent == gateway)
        .map(|(pid, _, _)| pid)
        .collect();
    assert!(!groups.is_empty(), "no tool server runs under ice mcp");
    let _ = Command::new("kill")
        .args(["-TERM", &gateway.to_string()])
        .status();
    // The first signal waits for the call in flight (a minute): still running.
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "ice mcp stopped at the first signal"
    );
    let status = signal_and_wait(&mut child, "-TERM");
    assert_eq!(status.code(), Some(130), "{status:?}");
    drop(stdin);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let left: Vec<_> = processes()
            .into_iter()
            .filter(|(_, _, group)| groups.contains(group))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "tool server processes outlived ice mcp: {left:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // The run is left to recovery, which suspends it; the log verifies.
    verify(&f);
}

/// A signal while a call waits for an operator: the call is denied at once, naming the
/// approval (the client gets the denial), the approval leaves the list, and the run is
/// suspended for an operator to resume or kill, as when `ice serve` stops.
#[test]
fn ice_mcp_stopped_while_a_call_waits_for_approval_denies_it_and_suspends_the_run() {
    let run = "stop-waiting-stdio";
    let f = fixture(run, "120s");
    let (mut child, mut stdin, rx) = stdio_gateway(&f);
    let mut send = |v: Value| send_line(&mut stdin, &v);
    send(
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}),
    );
    send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
    send(json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "everything__get-env", "arguments": {}}}));
    let pending = pending_approval(&f, run);
    let approval = pending["id"].as_str().unwrap().to_string();
    let started = std::time::Instant::now();
    let status = signal_and_wait(&mut child, "-TERM");
    // Not the approval's 120 s.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(status.code(), Some(4), "suspended: {status:?}");
    drop(stdin);
    // The client got the denial.
    let denial = answer_from(&rx, 2);
    assert_eq!(denial["result"]["isError"], true, "{denial:#}");
    assert!(
        first_text(&denial["result"]).contains("ice mcp is stopping"),
        "{denial:#}"
    );
    let ev = events(&f, run);
    let denied = of_type(&ev, "CapabilityDenied");
    assert_eq!(denied.len(), 1, "{ev:#?}");
    assert_eq!(denied[0]["payload"]["approval"], approval.as_str());
    assert!(of_type(&ev, "ToolInvoked").is_empty(), "{ev:#?}");
    let o = ice(&f.home, &["approvals", "--json"]);
    let listed: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    assert_eq!(listed, json!([]), "{}", text(&o));
    let o = ice(&f.home, &["runs", "--json"]);
    let runs: Value = serde_json::from_slice(&o.stdout).unwrap();
    let state = runs
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["run_id"] == run)
        .map(|r| r["state"].clone());
    assert_eq!(state, Some(json!("SUSPENDED")), "{runs:#}");
    verify(&f);
}

/// The probe's finding: a `bytes` budget did not bound tool results. A call reserved at most
/// what the budget had left but was given whatever its server sent (up to the server's
/// `max_result_bytes`), and the books settled the reservation, not what was moved: a budget of
/// 60 000 bytes let 100 000 through and recorded less. A call's result now gets no more than
/// its reservation leaves after its arguments; a larger one is refused (recorded, the agent
/// told why), and what is settled is what was moved. A server whose results may be larger than
/// 1 MiB gets them, where no budget says otherwise.
#[test]
fn a_bytes_budget_bounds_tool_results_and_the_books_say_what_was_moved() {
    let run = "bytes-budget";
    let extra = r#"
[servers.big]
command = ["node", BIG_FS, BIG_WS]
max_result_bytes = 4194304
[servers.big.tools]
read_text_file = "read"
"#;
    let big_reads = r#"
@id("big-reads")
permit(principal == Agent::"assistant", action == Action::"mcp.call", resource in ToolServer::"big")
when { context.effect == EffectClass::"read" };
"#;
    let f = fixture_with(run, "2s", "", big_reads);
    // The second server (the same filesystem server, allowed larger results) and a budget.
    let ws = std::fs::canonicalize(f.root.join("ws")).unwrap();
    let q = |p: &Path| serde_json::to_string(&p.display().to_string()).unwrap();
    let spec = std::fs::read_to_string(&f.spec).unwrap();
    let budgeted = f.root.join("budgeted.toml");
    std::fs::write(
        &budgeted,
        format!(
            "{}\n[budget]\nbytes = 60000\non_exhaustion = \"abort\"\n",
            spec.replace(&format!("id = \"{run}\""), "id = \"bytes-budget-2\"")
        ),
    )
    .unwrap();
    std::fs::write(
        &f.spec,
        format!(
            "{spec}{}",
            extra
                .replace("BIG_FS", &q(&npm_server("server-filesystem")))
                .replace("BIG_WS", &q(&ws))
        ),
    )
    .unwrap();
    std::fs::write(ws.join("big.txt"), "x".repeat(100_000)).unwrap();
    std::fs::write(ws.join("huge.txt"), "y".repeat(1_500_000)).unwrap();
    let read = |name: &str, file: &str| json!({"op": "call", "name": name, "args": {"path": ws.join(file).display().to_string()}});

    // Without a bytes budget: a 1.5 MB result from the server allowed 4 MiB reaches the agent.
    let (r, o) = agent_stdio(
        &f,
        "legacy",
        "none",
        json!([read("big__read_text_file", "huge.txt")]),
    );
    assert!(o.status.success(), "{}", text(&o));
    let got = first_text(&r["steps"][0]["result"]);
    assert!(
        r["steps"][0]["result"]["isError"] != true,
        "{}",
        &got[..got.len().min(500)]
    );
    assert_eq!(got.len(), 1_500_000);

    // With 60 000 bytes: the 100 000-byte file is refused, a small one still fits.
    let g = Fixture {
        _dir: tempfile::tempdir().unwrap(),
        root: f.root.clone(),
        home: f.home.clone(),
        spec: budgeted,
    };
    let (r, o) = agent_stdio(
        &g,
        "legacy",
        "none",
        json!([
            read("fs__read_text_file", "big.txt"),
            read("fs__read_text_file", "notes.txt")
        ]),
    );
    assert!(o.status.success(), "{}", text(&o));
    let refused = &r["steps"][0]["result"];
    assert_eq!(refused["isError"], true, "{r:#}");
    assert!(
        first_text(refused).contains("bytes budget"),
        "the agent is told what limited it: {refused:#}"
    );
    assert_eq!(
        first_text(&r["steps"][1]["result"]),
        "hello from the workspace\n",
        "{r:#}"
    );
    let ev = events(&g, "bytes-budget-2");
    let invoked = of_type(&ev, "ToolInvoked");
    assert_eq!(
        invoked[0]["payload"]["error"]["kind"], "oversized",
        "{:#}",
        invoked[0]
    );
    // What was settled is what was moved: the arguments of the refused call, then the
    // arguments and the result of the small one; never more than the budget.
    let settled: Vec<u64> = of_type(&ev, "BudgetSettled")
        .iter()
        .filter_map(|e| e["payload"]["actual"]["bytes"].as_u64())
        .collect();
    assert_eq!(settled.len(), 2, "{settled:?}");
    assert!(settled[0] < 1000, "only the arguments moved: {settled:?}");
    assert_eq!(
        settled[1],
        invoked[1]["payload"]["bytes"].as_u64().unwrap()
            + serde_json::to_string(&invoked[1]["payload"]["arguments"])
                .unwrap()
                .len() as u64,
        "{:#}",
        invoked[1]
    );
    assert!(settled.iter().sum::<u64>() <= 60_000, "{settled:?}");
    verify(&g);
}

/// The probe's finding: a client that closed its HTTP session (`DELETE /mcp`) while a call
/// waited for an operator left the approval open for seconds (until the transport cancelled
/// the call), and an operator's approval in that window still ran the call, for nobody. The
/// close now withdraws the request at once: the approval leaves the list, and answering it
/// is refused.
#[test]
fn closing_an_http_session_withdraws_its_calls_waiting_for_approval_at_once() {
    let f = fixture("delete-waiting", "120s");
    let (mut server, url) = serve(&f);
    let (status, head, body) = raw_post(&url, &[], &initialize());
    assert_eq!(status, 200, "{body}");
    let id = session_id(&head);
    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    let (status, _, body) = raw_post(&url, &[("Mcp-Session-Id", &id)], &initialized);
    assert!((200..300).contains(&status), "{status}: {body}");
    let call = {
        let (url, id) = (url.clone(), id.clone());
        std::thread::spawn(move || {
            raw_post(
                &url,
                &[("Mcp-Session-Id", &id)],
                &json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                    "params": {"name": "everything__get-env", "arguments": {}}}),
            )
        })
    };
    let pending = any_pending_approval(&f);
    let approval = pending["id"].as_str().unwrap().to_string();
    let (status, _, body) = raw_request("DELETE", &url, &[("Mcp-Session-Id", &id)], &json!({}));
    // 204: what clients take as "closed" (rmcp's 202 made the Python SDK warn of a failure).
    assert_eq!(status, 204, "{body}");
    // At once: well within the transport's two or more seconds of draining.
    let started = std::time::Instant::now();
    loop {
        let o = ice(&f.home, &["approvals", "--json"]);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        if v.as_array().is_some_and(Vec::is_empty) {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_millis(1500),
            "still pending {:?} after the session was closed: {}",
            started.elapsed(),
            text(&o)
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let o = ice(&f.home, &["approve", &approval, "--operator", "alice"]);
    assert!(!o.status.success(), "{}", text(&o));
    let _ = call.join();
    stop(&mut server);
    let run = pending["run"].as_str().unwrap();
    let ev = events(&f, run);
    assert!(of_type(&ev, "ToolInvoked").is_empty(), "{ev:#?}");
    let denied = of_type(&ev, "CapabilityDenied");
    assert_eq!(denied.len(), 1, "{ev:#?}");
    assert_eq!(denied[0]["payload"]["approval"], approval.as_str());
    verify(&f);
}

/// The probe's finding: a second `initialize` in a session was accepted and renegotiated the
/// protocol version, while the run's record (`RunProvisioned.client`) kept the first. A session
/// has one handshake: the second is refused and the session goes on as negotiated.
#[test]
fn a_second_initialize_in_a_session_is_refused() {
    let f = fixture("reinit-1", "2s");
    let again = json!({"jsonrpc": "2.0", "id": 2, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "other", "version": "9"}}});
    let (answers, o) = raw_session(
        &f,
        &[
            initialize().to_string(),
            json!({"jsonrpc": "2.0", "method": "notifications/initialized"}).to_string(),
            again.to_string(),
            json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                "params": {"name": "everything__echo", "arguments": {"message": "on"}}})
            .to_string(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        answer(&answers, 1)["result"]["protocolVersion"],
        "2025-11-25"
    );
    let refused = answer(&answers, 2);
    assert!(
        refused["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("already initialized")),
        "{refused:#}"
    );
    assert_eq!(
        answer(&answers, 3)["result"]["content"][0]["text"],
        "Echo: on"
    );
    let ev = events(&f, "reinit-1");
    let provisioned = of_type(&ev, "RunProvisioned");
    assert_eq!(
        provisioned[0]["payload"]["client"]["protocol_version"], "2025-11-25",
        "{:#}",
        provisioned[0]
    );
    verify(&f);
}

/// The probe's finding: an MCP session's run left by a killed `ice mcp` (recovered: suspended)
/// was met with advice that could not work: `ice approve` said to resume it with `ice
/// reconfigure` "and its agent asks again", and `ice reconfigure` recorded a reconfiguration,
/// then failed and advised recording another. No agent in ICE can resume an external agent's
/// session: both now say to kill the run, and `reconfigure` records nothing.
#[test]
fn an_ended_mcp_sessions_run_is_pointed_to_kill_not_reconfigure() {
    let run = "ended-session";
    let f = fixture(run, "120s");
    let (mut child, mut stdin, _rx) = stdio_gateway(&f);
    for v in [
        initialize(),
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
            "params": {"name": "everything__get-env", "arguments": {}}}),
    ] {
        send_line(&mut stdin, &v);
    }
    let pending = pending_approval(&f, run);
    let approval = pending["id"].as_str().unwrap().to_string();
    child.kill().unwrap();
    let _ = child.wait();
    drop(stdin);
    // The listing says so too (it said "resume or kill it").
    let o = ice(&f.home, &["approvals", "--run", run, "--json"]);
    let listed: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(listed[0]["waiting"], false, "{listed:#}");
    let advice = listed[0]["advice"].as_str().unwrap_or_default();
    assert!(
        advice.contains("ice kill") && !advice.contains("ice reconfigure"),
        "{listed:#}"
    );
    let o = ice(&f.home, &["approvals", "--run", run]);
    assert!(
        text(&o).contains("ice kill") && !text(&o).contains("reconfigure"),
        "{}",
        text(&o)
    );
    let o = ice(&f.home, &["approve", &approval, "--operator", "alice"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("ice kill") && !text(&o).contains("ice reconfigure"),
        "{}",
        text(&o)
    );
    let record = f.root.join("rec.toml");
    std::fs::write(&record, "reason = \"try again\"\n").unwrap();
    let o = ice(
        &f.home,
        &[
            "reconfigure",
            run,
            "--record",
            record.to_str().unwrap(),
            "--operator",
            "alice",
        ],
    );
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("ice kill {run}")),
        "{}",
        text(&o)
    );
    let ev = events(&f, run);
    assert!(
        of_type(&ev, "ReconfigurationRecorded").is_empty(),
        "nothing recorded: {ev:#?}"
    );
    let o = ice(
        &f.home,
        &[
            "kill",
            run,
            "--operator",
            "alice",
            "--reason",
            "session gone",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    verify(&f);
}
