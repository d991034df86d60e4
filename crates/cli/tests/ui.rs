//! The operator web UI served by `ice serve`, in a real headless Chromium (Debian's `chromium`
//! driven by npm `playwright-core`, both installed by scripts/deps; this test installs
//! nothing): a run started through the API waits for an approval; the browser opens the run,
//! sees its timeline, approves the request, watches the run commit live, and opens the causal
//! graph of the effect (tests/peers/ui_check.mjs). More runs than the runs page lists are
//! written first (it must list the newest); a second run keeps its spec, a request's
//! arguments and its failed validation's results as blobs (the page must still show every
//! event and its inspector, fetch and show those values — the real budget, the staged file's
//! content, the results — and say plainly when a fetch fails); a third waits for approval of a
//! call whose arguments are a blob (the card must show the whole call before Approve works;
//! the browser denies it). A screenshot is saved under the test's directory and copied to
//! `target/ui-screenshot.png`.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn ice(home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ice"));
    c.arg("--home").arg(home).env_remove("ICE_HOME");
    c
}

fn ok(mut c: Command) -> String {
    let out = c.output().expect("ice runs");
    assert!(out.status.success(), "{}", common::text(&out));
    String::from_utf8(out.stdout).unwrap()
}

/// One HTTP/1.1 request over a fresh connection: status and body.
fn http(addr: &str, method: &str, path: &str, token: &str, body: Option<&Value>) -> (u16, String) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let bearer = format!("Bearer {token}");
    common::http(addr, method, path, &[("Authorization", &bearer)], &body)
}

/// A local endpoint answering every request with 200 (the team the plan notifies); returns its
/// port and the requests it saw.
fn endpoint() -> (u16, std::sync::mpsc::Receiver<String>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            s.set_read_timeout(Some(Duration::from_millis(500))).ok();
            let mut got = Vec::new();
            let mut buf = [0u8; 8192];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                let t = String::from_utf8_lossy(&got);
                if let Some(i) = t.find("\r\n\r\n") {
                    let len = t[..i]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if got.len() >= i + 4 + len {
                        break;
                    }
                }
            }
            let _ = tx.send(String::from_utf8_lossy(&got).into_owned());
            let _ = s.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\nconnection: close\r\n\r\nthanks\n",
            );
        }
    });
    (port, rx)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &p);
        } else {
            std::fs::copy(e.path(), p).unwrap();
        }
    }
}

/// Debian's chromium, which scripts/deps installs; the test fails (never skips) without it.
fn chromium() -> PathBuf {
    let out = Command::new("sh")
        .args(["-c", "command -v chromium"])
        .output()
        .expect("sh runs");
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success() && !path.is_empty(),
        "Debian's `chromium` is not installed: run scripts/deps"
    );
    PathBuf::from(path)
}

#[test]
fn an_operator_approves_a_run_in_the_web_ui_and_watches_it_commit() {
    let started = Instant::now();
    let node_modules = common::deps().join("node/node_modules");
    assert!(
        node_modules.join("playwright-core/package.json").is_file(),
        "npm playwright-core is not installed in {}: run scripts/deps",
        node_modules.display()
    );
    let chromium = chromium();

    // An installation, an operator, and a copy of the quickstart's workspace and policies with
    // a plan whose second step (telling the team) needs an operator's approval.
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    let home = base.join("home");
    ok({
        let mut c = ice(&home);
        c.args(["init", "--origin", "ice.test/ui"]);
        c
    });
    let token: Value = serde_json::from_str(&ok({
        let mut c = ice(&home);
        c.args(["token", "add", "--operator", "alice", "--json"]);
        c
    }))
    .unwrap();
    let token = token["token"].as_str().unwrap().to_string();
    let (port, calls) = endpoint();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/quickstart");
    let spec_dir = base.join("spec");
    copy_dir(&example.join("workspace"), &spec_dir.join("workspace"));
    copy_dir(&example.join("policies"), &spec_dir.join("policies"));
    let policy = spec_dir.join("policies/quickstart.cedar");
    let text = std::fs::read_to_string(&policy).unwrap();
    assert!(text.contains("notify-needs-approval"));
    std::fs::write(&policy, text.replace("8765", &port.to_string())).unwrap();
    std::fs::write(
        spec_dir.join("plan.toml"),
        format!(
            r#"agent = "coder"

[[step]]
# Markup in what an agent says must reach the page as text.
intent = "rewrite the greeting <img src=x onerror=alert(1)>"
capability = "fs.write"
target = "hello.txt"
arguments = {{ content = "hello, governed world\n" }}

[[step]]
intent = "tell the team the greeting changed"
capability = "http.request"
target = "http://127.0.0.1:{port}/notify"
arguments = {{ method = "POST", body = "hello.txt changed" }}

[[step]]
intent = "bump the release while at it"
capability = "fs.write"
target = "locked/release.txt"
arguments = {{ content = "release = \"2.0\"\n" }}

[[step]]
finish = "greeting updated"
"#
        ),
    )
    .unwrap();
    std::fs::write(
        spec_dir.join("run.toml"),
        r#"[run]
agent = "coder"
workspace = "workspace"
policy = "policies"

[agent]
driver = "plan"
plan = "plan.toml"

[budget]
tool_calls = 20
bytes = 1_000_000
wall_time = "300s"
on_exhaustion = "abort"

[approvals]
timeout = "300s"

[[check]]
name = "the greeting is friendlier"
run = ["grep", "-q", "governed", "hello.txt"]
timeout = "10s"
"#,
    )
    .unwrap();
    // `ice serve` needs a spec for its MCP sessions; none are opened here.
    std::fs::write(
        base.join("mcp.toml"),
        "[run]\nagent = \"mcp-agent\"\nworkspace = \"spec/workspace\"\n[agent]\ndriver = \"external\"\n",
    )
    .unwrap();

    let mut serve = ice(&home);
    serve
        .current_dir(base)
        .args(["serve", "--listen", "127.0.0.1:0", "--run-spec"])
        .arg(base.join("mcp.toml"));
    let (served, mcp) = common::serve(serve);
    // Written beside the server, as another process with the file could: more runs than the
    // runs page lists (it must list the newest, and say how many older ones it leaves out),
    // and a run whose record does not fold.
    seed_finished_runs(&home, SEEDED_RUNS);
    seed_a_run_that_does_not_fold(&home);
    let root = mcp.strip_suffix("/mcp").unwrap().to_string();
    let addr = root.strip_prefix("http://").unwrap().to_string();

    // The run, started through the API; it stops at its second step for an approval.
    let (status, body) = http(
        &addr,
        "POST",
        "/api/v1/runs",
        &token,
        Some(&serde_json::json!({"spec": spec_dir.join("run.toml")})),
    );
    assert_eq!(status, 202, "{body}");
    let run = serde_json::from_str::<Value>(&body).unwrap()["run"]
        .as_str()
        .unwrap()
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = http(
            &addr,
            "GET",
            &format!("/api/v1/approvals?run={run}"),
            &token,
            None,
        );
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        if v["approvals"].as_array().is_some_and(|a| !a.is_empty()) {
            break;
        }
        assert!(Instant::now() < deadline, "no approval request appeared");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        calls.try_recv().is_err(),
        "nothing is called before approval"
    );
    // An operator edits the policy while the run waits: the run takes the new version on at
    // its next decision (the locked write after the approved call), and the timeline says so.
    std::fs::write(
        &policy,
        format!(
            "{}\n// reviewed while the greeting run waited for its approval\n",
            std::fs::read_to_string(&policy).unwrap()
        ),
    )
    .unwrap();
    // A run that waits for approval of a call whose arguments are over the blob threshold: the
    // operator must see the whole call before approving it (the browser denies it).
    let approval_run = start_a_run_asking_approval_of_blob_arguments(&addr, &token, base, port);
    // A second run whose record keeps large payload fields as blobs: a spec over the blob
    // threshold (its checks carry long arguments), a write over it (the request's
    // `arguments`), and two checks that print enough and fail (the `ValidationFailed`
    // event's `results`). It aborts on its own; the page must still explain it. Started last,
    // it is the newest run.
    let blob_run = start_a_run_with_blobs(&addr, &token, base);
    let ready = started.elapsed();

    // The browser.
    let shots = base.join("screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let shot = shots.join("ui.png");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/ui_check.mjs");
    let browsing = Instant::now();
    let mut child = Command::new("node")
        .arg(&script)
        .arg("--url")
        .arg(&root)
        .args(["--run", &run])
        .args(["--blob-run", &blob_run])
        .args(["--blob-approval-run", &approval_run])
        .args(["--oldest-run", &seeded_run(0)])
        // Every run in the log: the seeded ones, the damaged one, and the three started here.
        .args(["--runs", &(SEEDED_RUNS + 4).to_string()])
        .arg("--screenshot")
        .arg(&shot)
        .arg("--chromium")
        .arg(&chromium)
        .arg("--node-modules")
        .arg(&node_modules)
        .env("ICE_TOKEN", &token)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node runs (Node.js 20, as the README says)");
    // Read both pipes on threads so neither fills; give up (and kill the browser) after 3 min.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let limit = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (stdout, stderr) = (out_t.join().unwrap(), err_t.join().unwrap());
    let failed = shots.join("ui.failed.png");
    let _ = std::fs::remove_file(workspace_target().join("ui-screenshot.failed.png"));
    if failed.is_file() {
        let _ = std::fs::copy(&failed, workspace_target().join("ui-screenshot.failed.png"));
    }
    assert!(
        status.is_some_and(|s| s.success()),
        "the browser check failed ({}; a screenshot of the page, if any, is in target/ui-screenshot.failed.png):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        match status {
            Some(s) => format!("exit {s}"),
            None => "timed out after 180 s".into(),
        }
    );
    let browsed = browsing.elapsed();

    // The screenshot is a PNG, kept where a person can look at it.
    let png = std::fs::read(&shot).expect("the screenshot was saved");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "not a PNG screenshot"
    );
    let kept = workspace_target().join("ui-screenshot.png");
    std::fs::create_dir_all(kept.parent().unwrap()).unwrap();
    std::fs::copy(&shot, &kept).unwrap();
    for (shot, kept) in [
        ("ui-pending.png", "pending"),
        ("ui-blobs.png", "blobs"),
        ("ui-blob-approval.png", "blob-approval"),
    ] {
        let _ = std::fs::copy(
            shots.join(shot),
            workspace_target().join(format!("ui-screenshot-{kept}.png")),
        );
    }

    // What the browser did happened: approved by alice, the call made once, the run committed
    // and its write landed.
    let call = calls
        .recv_timeout(Duration::from_secs(5))
        .expect("the approved call was made");
    assert!(
        call.starts_with("POST /notify") && call.contains("hello.txt changed"),
        "{call}"
    );
    assert!(calls.try_recv().is_err(), "the call was made once");
    let (status, body) = http(&addr, "GET", &format!("/api/v1/runs/{run}"), &token, None);
    assert_eq!(status, 200, "{body}");
    let shown: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(shown["summary"]["state"], "TERMINATED", "{body}");
    assert_eq!(shown["summary"]["by_type"]["RunCommitted"], 1, "{body}");
    assert_eq!(shown["summary"]["by_type"]["ApprovalGranted"], 1, "{body}");
    assert_eq!(shown["changes"][0]["status"], "applied", "{body}");
    assert_eq!(
        std::fs::read_to_string(spec_dir.join("workspace/hello.txt")).unwrap(),
        "hello, governed world\n"
    );
    let log = ok({
        let mut c = ice(&home);
        c.args(["log", "--run", &run, "--type", "ApprovalGranted", "--json"]);
        c
    });
    assert!(log.contains("operator:alice"), "{log}");
    // The call with blob arguments was denied in the browser, once it had been shown whole.
    let denied = ok({
        let mut c = ice(&home);
        c.args([
            "log",
            "--run",
            &approval_run,
            "--type",
            "ApprovalDenied",
            "--json",
        ]);
        c
    });
    assert!(
        denied.contains("operator:alice") && denied.contains("too long to send"),
        "{denied}"
    );

    // The server took everything the page did, and still serves; the log verifies.
    let (status, _) = http(&addr, "GET", "/ui/", &token, None);
    assert_eq!(status, 200);
    ok({
        let mut c = ice(&home);
        c.arg("verify");
        c
    });
    drop(served);
    eprintln!(
        "{stdout}web UI check passed: run ready in {ready:?}, browser {browsed:?}, total {:?}; screenshot {}",
        started.elapsed(),
        kept.display()
    );
}

/// How many finished runs are written before the test's own: more than the runs page lists.
const SEEDED_RUNS: usize = 505;

fn seeded_run(i: usize) -> String {
    format!("seeded-{i:04}")
}

/// `n` short runs, each provisioned and terminated by the runtime, written in one go.
fn seed_finished_runs(home: &Path, n: usize) {
    use ice_kernel::{Draft, Origin, RunId};
    use ice_log::clock::SystemClock;
    use ice_log::ledger::Ledger;
    use ice_log::sqlite::{Mode, SqliteLog};
    use std::sync::Arc;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let log = Arc::new(SqliteLog::open(&home.join("ice.db"), Mode::ReadWrite).unwrap());
        let ledger = Ledger::new(log, Arc::new(SystemClock));
        let runtime = |t: &str| Draft::new(t, Origin::Runtime);
        for i in 0..n {
            ledger
                .append(
                    &RunId::new(seeded_run(i)).unwrap(),
                    vec![
                        runtime("RunProvisioned")
                            .payload(serde_json::json!({"agent": "seeded", "driver": "plan"})),
                        runtime("RunTerminatedByRuntime")
                            .payload(serde_json::json!({"reason": "seeded by the test"})),
                        runtime("RunTerminated"),
                    ],
                )
                .await
                .unwrap();
        }
    });
}

/// Start (through the API) a run whose spec, one request's arguments and its validation
/// results are all over the blob threshold, and wait until it has ended. Returns its id.
fn start_a_run_with_blobs(addr: &str, token: &str, base: &Path) -> String {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/quickstart");
    let dir = base.join("blobs");
    copy_dir(&example.join("workspace"), &dir.join("workspace"));
    copy_dir(&example.join("policies"), &dir.join("policies"));
    let content: String = (0..1500).map(|i| format!("line {i:05}\n")).collect();
    assert!(content.len() > 16 * 1024);
    std::fs::write(
        dir.join("plan.toml"),
        format!(
            r#"agent = "coder"

[[step]]
intent = "write a large file"
capability = "fs.write"
target = "big.txt"
arguments = {{ content = {content} }}

[[step]]
finish = "wrote it"
"#,
            content = toml_string(&content)
        ),
    )
    .unwrap();
    // Each check prints 4 KiB (all that is kept) to stdout and to stderr, and fails; its last
    // argument (the script's $0) is there to make the spec large.
    let check = |name: &str| {
        format!(
            r#"
[[check]]
name = "{name}"
run = ["sh", "-c", {script}, "{padding}"]
timeout = "10s"
"#,
            script = toml_string(
                r"head -c 5000 /dev/zero | tr '\0' o; head -c 5000 /dev/zero | tr '\0' e >&2; exit 1"
            ),
            padding = "p".repeat(9000),
        )
    };
    std::fs::write(
        dir.join("run.toml"),
        format!(
            r#"[run]
agent = "coder"
workspace = "workspace"
policy = "policies"

[agent]
driver = "plan"
plan = "plan.toml"

[budget]
tool_calls = 7
bytes = 1_000_000
wall_time = "300s"
on_exhaustion = "abort"
{}{}"#,
            check("loud check one"),
            check("loud check two")
        ),
    )
    .unwrap();
    let (status, body) = http(
        addr,
        "POST",
        "/api/v1/runs",
        token,
        Some(&serde_json::json!({"spec": dir.join("run.toml")})),
    );
    assert_eq!(status, 202, "{body}");
    let run = serde_json::from_str::<Value>(&body).unwrap()["run"]
        .as_str()
        .unwrap()
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = http(addr, "GET", &format!("/api/v1/runs/{run}"), token, None);
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        if v["summary"]["state"] == "TERMINATED" {
            assert_eq!(v["summary"]["by_type"]["ValidationFailed"], 1, "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the run with blobs did not end: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The fields the page must cope with are references in what the API returns.
    let (_, body) = http(
        addr,
        "GET",
        &format!("/api/v1/runs/{run}/events?limit=1000"),
        token,
        None,
    );
    let events: Value = serde_json::from_str(&body).unwrap();
    let field = |t: &str, f: &str| {
        events["events"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["type"] == t)
            .map(|e| e["payload"][f].clone())
            .unwrap_or_else(|| panic!("no {t} in {body}"))
    };
    for (t, f) in [
        ("RunProvisioned", "spec"),
        ("CapabilityRequested", "arguments"),
        ("ValidationFailed", "results"),
    ] {
        assert!(
            field(t, f)["$blob"].is_string(),
            "{t}'s {f} is not a blob: {body}"
        );
    }
    run
}

/// Start (through the API) a run whose one call needs an operator's approval and carries
/// arguments over the blob threshold, and wait until its approval is pending with the
/// arguments as a blob reference. Returns its id.
fn start_a_run_asking_approval_of_blob_arguments(
    addr: &str,
    token: &str,
    base: &Path,
    port: u16,
) -> String {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/quickstart");
    let dir = base.join("blob-approval");
    copy_dir(&example.join("workspace"), &dir.join("workspace"));
    copy_dir(&example.join("policies"), &dir.join("policies"));
    // Markers at both ends: the card must show all of it.
    let body: String = std::iter::once("BEGIN big notice\n".to_string())
        .chain((0..1200).map(|i| format!("notice line {i:05}\n")))
        .chain(std::iter::once("END big notice\n".to_string()))
        .collect();
    assert!(body.len() > 16 * 1024);
    std::fs::write(
        dir.join("plan.toml"),
        format!(
            r#"agent = "coder"

[[step]]
intent = "send the team the whole report"
capability = "http.request"
target = "http://127.0.0.1:{port}/notify"
arguments = {{ method = "POST", body = {body} }}

[[step]]
finish = "reported"
"#,
            body = toml_string(&body)
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("run.toml"),
        r#"[run]
agent = "coder"
workspace = "workspace"
policy = "policies"

[agent]
driver = "plan"
plan = "plan.toml"

[budget]
tool_calls = 5

[approvals]
timeout = "300s"
"#,
    )
    .unwrap();
    let (status, body) = http(
        addr,
        "POST",
        "/api/v1/runs",
        token,
        Some(&serde_json::json!({"spec": dir.join("run.toml")})),
    );
    assert_eq!(status, 202, "{body}");
    let run = serde_json::from_str::<Value>(&body).unwrap()["run"]
        .as_str()
        .unwrap()
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = http(
            addr,
            "GET",
            &format!("/api/v1/approvals?run={run}"),
            token,
            None,
        );
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        if let Some(a) = v["approvals"].as_array().and_then(|a| a.first()) {
            // What the page is given is a reference; what it must show is the value.
            assert!(a["arguments"]["$blob"].is_string(), "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no approval request appeared: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    run
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// A run whose record does not fold (its provisioning carries no run spec), with an approval
/// request: the approvals page must name it as left out, not hide it or fail.
fn seed_a_run_that_does_not_fold(home: &Path) {
    use ice_kernel::{Draft, Origin, RunId};
    use ice_log::clock::SystemClock;
    use ice_log::ledger::Ledger;
    use ice_log::sqlite::{Mode, SqliteLog};
    use std::sync::Arc;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let log = Arc::new(SqliteLog::open(&home.join("ice.db"), Mode::ReadWrite).unwrap());
        let ledger = Ledger::new(log, Arc::new(SystemClock));
        let runtime = |t: &str| Draft::new(t, Origin::Runtime);
        ledger
            .append(
                &RunId::new("damaged").unwrap(),
                vec![
                    runtime("RunProvisioned")
                        .payload(serde_json::json!({"spec": "not a run spec"})),
                    runtime("ResourcesAllocated"),
                    runtime("ContextResolved"),
                    runtime("ExecutionWindowOpened"),
                    runtime("ApprovalRequested")
                        .payload(serde_json::json!({"capability": "fs.write"})),
                ],
            )
            .await
            .unwrap();
    });
}

/// The workspace's `target/` directory.
fn workspace_target() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"))
}
