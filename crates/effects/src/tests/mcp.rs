//! The MCP client toward tool servers, against real third-party peers: the reference servers
//! `@modelcontextprotocol/server-everything` and `server-filesystem` (TypeScript SDK, protocol
//! 2025-11-25 with `initialize`), and a misbehaving server on the Python SDK (`mcp` 2.3.0,
//! protocol 2026-07-28 without `initialize`) at `tests/mcp-peers/faulty_server.py`.
//!
//! The peers are installed by `scripts/deps` into `.deps/`; a test fails (never skips) when
//! they are missing. Every test checks that the processes it started are gone at its end.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ice_authority::{Authorization, EffectClass, Resource};
use ice_kernel::RunId;
use rmcp::ServiceExt;
use rmcp::model::CallToolRequestParams;
use rmcp::transport::TokioChildProcess;
use serde_json::{Map, Value, json};

use crate::AuthorizationError;
use crate::auth::testing::{authorize, authorize_scoped};
use crate::mcp::{
    McpError, RestartPolicy, ServerConfig, ServerTransport, ToolCallError, ToolServers,
    hint_from_annotations, line_bound,
};

const DEPS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../.deps");
const FAULTY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/mcp-peers/faulty_server.py"
);

fn need(path: PathBuf) -> String {
    assert!(
        path.exists(),
        "{} is missing: run scripts/deps (it installs the third-party MCP peers these tests use)",
        path.display()
    );
    path.to_string_lossy().into_owned()
}

fn node_package(name: &str) -> String {
    need(Path::new(DEPS).join(format!(
        "node/node_modules/@modelcontextprotocol/{name}/dist/index.js"
    )))
}

fn node() -> String {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("node"))
            .find(|p| p.is_file())
    });
    let node = found.expect("`node` (v20) must be on PATH for the MCP peer tests");
    node.to_string_lossy().into_owned()
}

fn python() -> String {
    need(Path::new(DEPS).join("venv/lib/python3.11/site-packages/mcp"));
    need(Path::new(DEPS).join("venv/bin/python"))
}

fn stdio(name: &str, program: String, args: Vec<String>) -> ServerConfig {
    ServerConfig {
        name: name.to_string(),
        transport: ServerTransport::Stdio {
            program,
            args,
            env: BTreeMap::new(),
            cwd: None,
        },
        start_timeout: Duration::from_secs(30),
        call_timeout: Duration::from_secs(20),
        max_result_bytes: 1024 * 1024,
    }
}

fn everything() -> ServerConfig {
    stdio(
        "everything",
        node(),
        vec![node_package("server-everything"), "stdio".into()],
    )
}

fn faulty(name: &str) -> ServerConfig {
    let mut config = stdio(name, python(), vec![need(PathBuf::from(FAULTY))]);
    config.call_timeout = Duration::from_secs(2);
    config
}

/// Call `tool` of the server named `faulty`, under a grant for exactly that call.
async fn call_faulty(
    servers: &ToolServers,
    tool: &str,
    arguments: Value,
) -> Result<crate::mcp::ToolCallOutput, ToolCallError> {
    servers
        .call(
            &auth("faulty", tool),
            &run1(),
            "faulty",
            tool,
            args(arguments),
        )
        .await
}

fn auth(server: &str, tool: &str) -> Authorization {
    authorize(
        "mcp.call",
        Resource::tool(server, tool).expect("tool"),
        EffectClass::External,
    )
}

fn run1() -> RunId {
    RunId::new("run-1").expect("run id")
}

fn args(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => panic!("arguments must be an object"),
    }
}

/// The text of a result's first content block.
fn text(result: &Value) -> String {
    result["content"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no text content in {result}"))
        .to_string()
}

fn alive(pid: u32) -> bool {
    // A reaped process has no /proc entry; a zombie (exited, not reaped) counts as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

async fn assert_gone(pid: u32, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid) {
        assert!(
            Instant::now() < deadline,
            "{what} (pid {pid}) is still running"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The same call through a plain rmcp client (legacy `initialize`), for comparison.
async fn direct_call(program: &str, args_: &[String], tool: &str, arguments: Value) -> Value {
    let mut command = tokio::process::Command::new(program);
    command.args(args_);
    let (transport, _) = TokioChildProcess::builder(command)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn direct peer");
    let client = ().serve(transport).await.expect("direct handshake");
    let result = client
        .call_tool(CallToolRequestParams::new(tool.to_string()).with_arguments(args(arguments)))
        .await
        .expect("direct call");
    client.cancel().await.expect("direct close");
    serde_json::to_value(result).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_over_stdio_lists_and_calls_like_a_direct_client() {
    let config = everything();
    let ServerTransport::Stdio {
        program,
        args: argv,
        ..
    } = config.transport.clone()
    else {
        unreachable!()
    };
    let servers = ToolServers::start(vec![config]).await.expect("start");
    let pid = servers.child_pid("everything").expect("a child");

    // The catalog, with the server's own (untrusted) annotations.
    let tools = servers.tools();
    for name in ["echo", "get-sum"] {
        assert!(tools.iter().any(|t| t.name == name), "{name} in {tools:?}");
    }
    let sum = servers.tool("everything", "get-sum").expect("get-sum");
    assert_eq!(sum.server, "everything");
    assert_eq!(sum.annotations.as_ref().unwrap()["readOnlyHint"], true);
    assert_eq!(sum.hint, None, "read-only never lowers ICE's class");
    assert_eq!(sum.input_schema["type"], "object");
    assert_eq!(
        servers.protocol_version("everything").as_deref(),
        Some("2025-11-25"),
        "the TypeScript SDK has no 2026-07-28: the discover probe falls back to initialize"
    );

    // Calls give exactly what a plain rmcp client gets from the same server.
    for (tool, arguments) in [
        ("echo", json!({"message": "hello from ICE"})),
        ("get-sum", json!({"a": 2, "b": 40})),
    ] {
        let out = servers
            .call(
                &auth("everything", tool),
                &run1(),
                "everything",
                tool,
                args(arguments.clone()),
            )
            .await
            .expect("call");
        let direct = direct_call(&program, &argv, tool, arguments).await;
        assert_eq!(out.result, direct, "{tool}");
        assert!(!out.is_error);
        assert_eq!(out.protocol_version, "2025-11-25");
        assert_eq!(out.bytes, serde_json::to_vec(&out.result).unwrap().len());
    }
    let out = servers
        .call(
            &auth("everything", "get-sum"),
            &run1(),
            "everything",
            "get-sum",
            args(json!({"a": 2, "b": 40})),
        )
        .await
        .expect("call");
    assert_eq!(text(&out.result), "The sum of 2 and 40 is 42.");

    // Many calls at once on one server.
    let calls = (0..24).map(|i| {
        let servers = &servers;
        async move {
            let auth = auth("everything", "get-sum");
            let out = servers
                .call(
                    &auth,
                    &run1(),
                    "everything",
                    "get-sum",
                    args(json!({"a": i, "b": 1000})),
                )
                .await
                .expect("concurrent call");
            (i, text(&out.result))
        }
    });
    let results = join_all(calls.collect()).await;
    for (i, text) in results {
        assert_eq!(text, format!("The sum of {i} and 1000 is {}.", i + 1000));
    }

    // A tool the server lacks, a server ICE lacks.
    let err = servers
        .call(
            &auth("everything", "nope"),
            &run1(),
            "everything",
            "nope",
            Map::new(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ToolCallError::UnknownTool { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "tool server \"everything\" has no tool named \"nope\""
    );
    let err = servers
        .call(
            &auth("elsewhere", "echo"),
            &run1(),
            "elsewhere",
            "echo",
            Map::new(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ToolCallError::UnknownServer(_)), "{err}");

    servers.shutdown().await;
    assert_gone(pid, "server-everything after shutdown").await;
    let err = servers
        .call(
            &auth("everything", "echo"),
            &run1(),
            "everything",
            "echo",
            args(json!({"message": "x"})),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ToolCallError::NotRunning { .. }), "{err}");
}

/// `futures::future::join_all` without the dependency: run the futures concurrently on this task.
async fn join_all<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(value) => *output = Some(value),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().map(Option::unwrap).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filesystem_server_reads_a_file_and_its_write_tool_hints_external() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dir_path = dir.path().canonicalize().expect("canonical");
    std::fs::write(dir_path.join("notes.txt"), "line one\nline two\n").expect("write");
    let config = stdio(
        "fs",
        node(),
        vec![
            node_package("server-filesystem"),
            dir_path.to_string_lossy().into_owned(),
        ],
    );
    let servers = ToolServers::start(vec![config]).await.expect("start");
    let pid = servers.child_pid("fs").expect("a child");

    let read = servers
        .tool("fs", "read_text_file")
        .expect("read_text_file");
    assert_eq!(read.hint, None);
    let write = servers.tool("fs", "write_file").expect("write_file");
    assert_eq!(
        write.hint,
        Some(EffectClass::External),
        "destructiveHint: true raises the class"
    );

    let path = dir_path.join("notes.txt").to_string_lossy().into_owned();
    let out = servers
        .call(
            &auth("fs", "read_text_file"),
            &run1(),
            "fs",
            "read_text_file",
            args(json!({ "path": path })),
        )
        .await
        .expect("read");
    assert!(!out.is_error, "{}", out.result);
    assert_eq!(text(&out.result), "line one\nline two\n");
    assert_eq!(
        out.result["structuredContent"]["content"],
        "line one\nline two\n"
    );

    // A tool-level failure is a completed call with isError.
    let outside = "/etc/hostname";
    let out = servers
        .call(
            &auth("fs", "read_text_file"),
            &run1(),
            "fs",
            "read_text_file",
            args(json!({ "path": outside })),
        )
        .await
        .expect("a completed call");
    assert!(out.is_error, "{}", out.result);

    // The hint is enforced: a grant for a lesser effect cannot call a destructive tool.
    let weak = authorize(
        "mcp.call",
        Resource::tool("fs", "write_file").unwrap(),
        EffectClass::InternalWrite,
    );
    let err = servers
        .call(
            &weak,
            &run1(),
            "fs",
            "write_file",
            args(json!({"path": path, "content": "x"})),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ToolCallError::Authorization(AuthorizationError::Effect { .. })
        ),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(dir_path.join("notes.txt")).unwrap(),
        "line one\nline two\n",
        "nothing was sent"
    );

    servers.shutdown().await;
    assert_gone(pid, "server-filesystem after shutdown").await;
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// server-everything in streamable-HTTP mode on `port`, once it listens.
async fn http_everything(port: u16) -> tokio::process::Child {
    let child = tokio::process::Command::new(node())
        .arg(node_package("server-everything"))
        .arg("streamableHttp")
        .env("PORT", port.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn server-everything streamableHttp");
    let deadline = Instant::now() + Duration::from_secs(15);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "server-everything never listened on {port}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child
}

/// The server "web" at `port` over streamable HTTP, with `call_timeout`.
fn http_config(port: u16, call_timeout: Duration) -> ServerConfig {
    ServerConfig {
        name: "web".to_string(),
        transport: ServerTransport::Http {
            url: format!("http://127.0.0.1:{port}/mcp"),
        },
        start_timeout: Duration::from_secs(20),
        call_timeout,
        max_result_bytes: 1024 * 1024,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_over_streamable_http_and_reconnects_after_it_restarts() {
    let port = free_port();
    let mut peer = http_everything(port).await;
    let servers = ToolServers::start(vec![http_config(port, Duration::from_secs(10))])
        .await
        .expect("start");
    assert_eq!(
        servers.protocol_version("web").as_deref(),
        Some("2025-11-25")
    );
    assert!(servers.tool("web", "echo").is_some());
    let echo = |message: &'static str| {
        let servers = &servers;
        async move {
            servers
                .call(
                    &auth("web", "echo"),
                    &run1(),
                    "web",
                    "echo",
                    args(json!({ "message": message })),
                )
                .await
        }
    };
    let out = echo("over http").await.expect("call");
    assert_eq!(text(&out.result), "Echo: over http");
    assert_eq!(out.protocol_version, "2025-11-25");

    // The server goes away: the call fails, and once it is back the next call reconnects.
    peer.kill().await.expect("kill");
    let err = echo("nobody there").await.unwrap_err();
    assert!(matches!(err, ToolCallError::ServerGone { .. }), "{err:?}");
    let mut peer = http_everything(port).await;
    let out = echo("back again")
        .await
        .expect("call after the server came back");
    assert_eq!(text(&out.result), "Echo: back again");

    servers.shutdown().await;
    peer.kill().await.expect("kill");
}

/// The probe's finding: a streamable-HTTP server restarted between two calls (forgetting the
/// session) left every later call waiting out its whole timeout, for good: nothing marked the
/// session lost, as there is no process to watch. A call that times out now pings the server;
/// one that does not answer the ping either is `ServerGone` and the next call connects afresh.
/// A slow tool on a server that still answers stays a timeout (its session kept).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_server_restarted_between_calls_is_connected_afresh() {
    let port = free_port();
    let mut peer = http_everything(port).await;
    let servers = ToolServers::start(vec![http_config(port, Duration::from_secs(3))])
        .await
        .expect("start");
    let call = |tool: &'static str, arguments: Value| {
        let servers = &servers;
        async move {
            servers
                .call(&auth("web", tool), &run1(), "web", tool, args(arguments))
                .await
        }
    };
    let echo = |message: &'static str| call("echo", json!({ "message": message }));
    assert_eq!(
        text(&echo("first").await.expect("call").result),
        "Echo: first"
    );

    // A slow tool on a live server: a timeout, and the session is kept.
    let slow = call(
        "trigger-long-running-operation",
        json!({"duration": 10, "steps": 5}),
    )
    .await
    .unwrap_err();
    assert!(matches!(slow, ToolCallError::Timeout { .. }), "{slow:?}");
    assert_eq!(
        text(&echo("still").await.expect("call").result),
        "Echo: still"
    );

    // Restarted between two calls: the first after it is lost, the next one gets through.
    peer.kill().await.expect("kill");
    let _ = peer.wait().await;
    let mut peer = http_everything(port).await;
    // (server-everything answers the forgotten session with 400, which leaves the call
    // unanswered until its timeout.)
    match echo("after the restart").await {
        Err(ToolCallError::ServerGone { detail, .. }) => {
            assert!(detail.contains("ping"), "{detail}");
            let out = echo("again").await.expect("the next call connects afresh");
            assert_eq!(text(&out.result), "Echo: again");
        }
        other => panic!("not taken as lost: {other:?}"),
    }
    assert_eq!(
        text(&echo("and on").await.expect("call").result),
        "Echo: and on"
    );

    servers.shutdown().await;
    peer.kill().await.expect("kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faulty_python_server_crash_hang_huge_garbage_and_refusals() {
    let marker_dir = tempfile::tempdir().expect("tempdir");
    let marker = marker_dir.path().join("cancelled");
    let mut config = faulty("faulty");
    if let ServerTransport::Stdio { env, .. } = &mut config.transport {
        env.insert(
            "FAULTY_CANCEL_MARKER".to_string(),
            marker.to_string_lossy().into_owned(),
        );
    }
    let started = Instant::now();
    let servers = ToolServers::start(vec![config, everything()])
        .await
        .expect("start");
    eprintln!("started python + node servers in {:?}", started.elapsed());
    let call = |tool: &'static str, arguments: Value| call_faulty(&servers, tool, arguments);
    let pid_of =
        |out: crate::mcp::ToolCallOutput| -> u64 { text(&out.result).parse().expect("a pid") };

    // Python's SDK serves 2026-07-28: the discover probe succeeds, no initialize is sent.
    assert_eq!(
        servers.protocol_version("faulty").as_deref(),
        Some("2026-07-28")
    );
    let ok = servers.tool("faulty", "ok").expect("ok");
    assert_eq!(ok.annotations.as_ref().unwrap()["readOnlyHint"], true);
    assert_eq!(ok.hint, None);
    assert_eq!(
        servers.tool("faulty", "crash").expect("crash").hint,
        Some(EffectClass::External)
    );
    let out = call("ok", json!({"text": "fine"})).await.expect("ok");
    assert_eq!(text(&out.result), "fine");
    assert_eq!(out.protocol_version, "2026-07-28");
    let first_pid = pid_of(call("pid", json!({})).await.expect("pid"));
    assert_eq!(u64::from(servers.child_pid("faulty").unwrap()), first_pid);

    // Refused before anything is sent: a grant for another tool, for another run. Had `crash`
    // been sent, the process would be gone.
    let err = servers
        .call(
            &auth("faulty", "ok"),
            &run1(),
            "faulty",
            "crash",
            Map::new(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ToolCallError::Authorization(AuthorizationError::Mismatch { .. })
        ),
        "{err}"
    );
    let other_run = authorize_scoped(
        "run-2",
        "mcp.call",
        Resource::tool("faulty", "crash").unwrap(),
        None,
        EffectClass::External,
    );
    let err = servers
        .call(&other_run, &run1(), "faulty", "crash", Map::new())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ToolCallError::Authorization(AuthorizationError::Run { .. })
        ),
        "{err}"
    );
    assert!(err.to_string().contains("belongs to run run-2"), "{err}");
    assert_eq!(
        pid_of(call("pid", json!({})).await.expect("pid")),
        first_pid
    );

    // A non-JSON line on the channel is ignored; the answer after it arrives.
    let out = call("garbage", json!({"text": "after garbage"}))
        .await
        .expect("garbage");
    assert_eq!(text(&out.result), "after garbage");

    // Oversized: read whole and measured (1 MiB of text, under the line bound) ...
    let err = call("huge", json!({"mb": 1})).await.unwrap_err();
    match &err {
        ToolCallError::Oversized {
            limit,
            got: Some(got),
            ..
        } => {
            assert_eq!(*limit, 1024 * 1024);
            assert!(*got > 1024 * 1024, "{got}");
        }
        other => panic!("expected a measured Oversized, got {other:?}"),
    }
    // ... or dropped as it streams in (5 MiB, over the 4 MiB + 64 KiB line bound).
    assert!(5 * 1024 * 1024 > line_bound(1024 * 1024));
    let err = call("huge", json!({"mb": 5})).await.unwrap_err();
    assert!(
        matches!(err, ToolCallError::Oversized { got: None, .. }),
        "{err:?}"
    );
    assert!(err.to_string().starts_with(
        "tool server \"faulty\" answered the call to \"huge\" with a result over the limit of 1048576 bytes"
    ), "{err}");

    // A call that never ends times out and is cancelled; calls beside it are unaffected.
    let (hang, beside) = tokio::join!(call("hang", json!({})), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        call("ok", json!({"text": "beside the hang"})).await
    });
    let err = hang.unwrap_err();
    assert!(
        matches!(err, ToolCallError::Timeout { after, .. } if after == Duration::from_secs(2)),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "tool server \"faulty\" did not answer the call to \"hang\" within 2s, so ICE cancelled it"
    );
    assert_eq!(text(&beside.expect("beside").result), "beside the hang");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !marker.exists() {
        assert!(
            Instant::now() < deadline,
            "the server never saw notifications/cancelled for the timed-out call"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = call("ok", json!({"text": "still usable"}))
        .await
        .expect("ok");
    assert_eq!(text(&out.result), "still usable");

    // A grant's constraints: arguments over max_bytes are refused before sending, the result
    // gets what they left, and timeout_ms cuts the call short.
    let constrained = |max_bytes, timeout_ms, tool| {
        crate::auth::testing::constrained(
            "mcp.call",
            Resource::tool("faulty", tool).expect("tool"),
            EffectClass::External,
            ice_authority::Constraints {
                max_bytes,
                timeout_ms,
            },
        )
    };
    let fine = || args(json!({"text": "fine"}));
    let sent = serde_json::to_string(&fine()).unwrap().len() as u64;
    let err = servers
        .call(
            &constrained(Some(sent - 1), None, "ok"),
            &run1(),
            "faulty",
            "ok",
            fine(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            ToolCallError::Authorization(AuthorizationError::Constraint { bytes, .. }) if *bytes == sent
        ),
        "{err:?}"
    );
    let err = servers
        .call(
            &constrained(Some(sent + 5), None, "ok"),
            &run1(),
            "faulty",
            "ok",
            fine(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, ToolCallError::Oversized { limit: 5, got: Some(got), .. } if got > 5),
        "{err:?}"
    );
    let out = servers
        .call(
            &constrained(Some(sent + 4096), None, "ok"),
            &run1(),
            "faulty",
            "ok",
            fine(),
        )
        .await
        .expect("within the constraint");
    assert_eq!(text(&out.result), "fine");
    let started = Instant::now();
    let err = servers
        .call(
            &constrained(None, Some(300), "hang"),
            &run1(),
            "faulty",
            "hang",
            Map::new(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, ToolCallError::Timeout { after, .. } if after == Duration::from_millis(300)),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(
        pid_of(call("pid", json!({})).await.expect("pid")),
        first_pid
    );
    assert_eq!(
        pid_of(call("pid", json!({})).await.expect("pid")),
        first_pid
    );

    // A crash mid-call: the call in flight gets ServerGone; a call to another server at the
    // same moment completes; the next call restarts the server (a new process).
    let (echo_auth, run) = (auth("everything", "echo"), run1());
    let (crash, other) = tokio::join!(
        call("crash", json!({})),
        servers.call(
            &echo_auth,
            &run,
            "everything",
            "echo",
            args(json!({"message": "unaffected"})),
        )
    );
    let err = crash.unwrap_err();
    assert!(matches!(err, ToolCallError::ServerGone { .. }), "{err:?}");
    let message = err.to_string();
    assert_eq!(
        message,
        "tool server \"faulty\" could not answer the call to \"crash\": its process exited with \
         status 3 before answering (its stderr ended with: faulty: crashing on purpose); ICE \
         restarts it for the next call (at most 5 times in 60s)"
    );
    assert_eq!(
        text(&other.expect("other server").result),
        "Echo: unaffected"
    );
    assert_gone(first_pid as u32, "the crashed server").await;
    let second_pid = pid_of(call("pid", json!({})).await.expect("pid after restart"));
    assert_ne!(second_pid, first_pid);
    assert_eq!(
        servers.protocol_version("faulty").as_deref(),
        Some("2026-07-28")
    );
    assert!(servers.tool("faulty", "ok").is_some(), "tools listed again");
    let out = call("ok", json!({"text": "restarted"})).await.expect("ok");
    assert_eq!(text(&out.result), "restarted");

    let everything_pid = servers.child_pid("everything").unwrap();
    servers.shutdown().await;
    assert_gone(second_pid as u32, "the faulty server after shutdown").await;
    assert_gone(everything_pid, "server-everything after shutdown").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_keeps_dying_is_not_restarted_forever_and_drop_kills_it() {
    let policy = RestartPolicy {
        max_restarts: 1,
        window: Duration::from_secs(60),
    };
    let servers = ToolServers::start_with(vec![faulty("flaky")], policy)
        .await
        .expect("start");
    let call = |tool: &'static str| {
        let servers = &servers;
        async move {
            servers
                .call(&auth("flaky", tool), &run1(), "flaky", tool, Map::new())
                .await
        }
    };
    let err = call("crash").await.unwrap_err();
    assert!(matches!(err, ToolCallError::ServerGone { .. }), "{err:?}");
    call("pid").await.expect("restarted once");
    let err = call("crash").await.unwrap_err();
    assert!(matches!(err, ToolCallError::ServerGone { .. }), "{err:?}");
    let err = call("pid").await.unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(err, ToolCallError::NotRunning { .. }) && message.contains("keeps dying"),
        "{message}"
    );
    assert!(
        message.starts_with("tool server \"flaky\" is not running, so the call to \"pid\" was not sent: it keeps dying (restarted 1 time(s) in the last 60s)"),
        "{message}"
    );

    drop(servers);

    // Servers that outlive their stdin: one runs on after the MCP server exits (`sleep`), one
    // also ignores SIGTERM. Dropping the set kills the first's process group at once; shutdown
    // escalates to SIGKILL for the second.
    let lingering = |name: &str, prelude: &str| {
        shell(
            name,
            format!("{prelude}{} {FAULTY}; exec sleep 60", python()),
        )
    };
    let (dropped, stubborn) = tokio::join!(
        ToolServers::start(vec![lingering("dropped", "")]),
        ToolServers::start(vec![lingering("stubborn", "trap '' TERM; ")]),
    );
    let (dropped, stubborn) = (dropped.expect("start"), stubborn.expect("start"));
    let dropped_pid = dropped.child_pid("dropped").unwrap();
    let stubborn_pid = stubborn.child_pid("stubborn").unwrap();
    drop(dropped);
    assert_gone(dropped_pid, "a server whose ToolServers was dropped").await;
    let started = Instant::now();
    stubborn.shutdown().await;
    assert!(
        !alive(stubborn_pid),
        "shutdown returned with the server running"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "it was killed only after stdin closed and SIGTERM were ignored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_python_server_gets_initialize_and_its_tool_list_changes_are_followed() {
    let mut config = faulty("legacy");
    if let ServerTransport::Stdio { args, .. } = &mut config.transport {
        args.push("--legacy".into());
    }
    let servers = ToolServers::start(vec![config]).await.expect("start");
    let pid = servers.child_pid("legacy").unwrap();
    assert_eq!(
        servers.protocol_version("legacy").as_deref(),
        Some("2025-11-25"),
        "server/discover refused, so the initialize handshake"
    );
    assert!(servers.tool("legacy", "extra").is_none());
    let call = |tool: &'static str| {
        let servers = &servers;
        async move {
            servers
                .call(&auth("legacy", tool), &run1(), "legacy", tool, Map::new())
                .await
        }
    };
    let out = call("grow").await.expect("grow");
    assert_eq!(out.protocol_version, "2025-11-25");
    let deadline = Instant::now() + Duration::from_secs(5);
    while servers.tool("legacy", "extra").is_none() {
        assert!(
            Instant::now() < deadline,
            "notifications/tools/list_changed did not refresh the catalog"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(text(&call("extra").await.expect("extra").result), "extra");
    servers.shutdown().await;
    assert_gone(pid, "the legacy server after shutdown").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_slower_to_start_than_the_discovery_probe_still_starts() {
    // Each first start sleeps past rmcp's 10 s `server/discover` probe (as a first `npx`
    // download or a loaded machine does): the probe's late answer then arrives where the
    // `initialize` answer was expected. ICE starts the server again and opens the way that
    // answer showed: `initialize` after a legacy server's refusal, `server/discover` after a
    // 2026-07-28 server's result. The first process is gone.
    let dir = tempfile::tempdir().expect("tempdir");
    let slow = |name: &str, mode: &str| {
        let pids = dir.path().join(format!("{name}.pids"));
        let script = format!(
            "echo $$ >> {p}; if [ \"$(wc -l < {p})\" -eq 1 ]; then sleep 11; fi; exec {} {} {mode}",
            python(),
            need(PathBuf::from(FAULTY)),
            p = pids.display()
        );
        let mut config = shell(name, script);
        config.start_timeout = Duration::from_secs(40);
        (config, pids)
    };
    let (legacy, legacy_pids) = slow("slow-legacy", "--legacy");
    let (modern, modern_pids) = slow("slow-modern", "");
    let servers = ToolServers::start(vec![legacy, modern])
        .await
        .expect("start");
    for (name, pids, version) in [
        ("slow-legacy", &legacy_pids, "2025-11-25"),
        ("slow-modern", &modern_pids, "2026-07-28"),
    ] {
        assert_eq!(
            servers.protocol_version(name).as_deref(),
            Some(version),
            "{name}"
        );
        let started: Vec<u32> = std::fs::read_to_string(pids)
            .unwrap()
            .lines()
            .map(|l| l.trim().parse().unwrap())
            .collect();
        assert_eq!(started.len(), 2, "{name}: started again once");
        assert_gone(started[0], "the first start").await;
        let out = servers
            .call(
                &auth(name, "ok"),
                &run1(),
                name,
                "ok",
                args(json!({"text": "hi"})),
            )
            .await
            .expect("call");
        assert_eq!(text(&out.result), "hi");
    }
    servers.shutdown().await;
}

/// A stdio config running `sh -c script` (which records its pid in `pidfile` and `exec`s).
fn shell(name: &str, script: String) -> ServerConfig {
    stdio(name, "sh".into(), vec!["-c".into(), script])
}

fn read_pid(file: &Path) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(text) = std::fs::read_to_string(file)
            && let Ok(pid) = text.trim().parse()
        {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "{} never written",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_failures_name_the_server_and_leave_nothing_running() {
    // Command not found.
    let err = ToolServers::start(vec![stdio(
        "ghost",
        "/nonexistent/mcp-server".into(),
        vec![],
    )])
    .await
    .unwrap_err();
    assert!(matches!(err, McpError::Spawn { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("tool server \"ghost\" could not be started: running \"/nonexistent/mcp-server\" failed: No such file or directory"),
        "{err}"
    );

    // A process that never speaks MCP: the handshake times out, the process is killed; a server
    // that had started already is stopped too.
    let dir = tempfile::tempdir().expect("tempdir");
    let silent_pid = dir.path().join("silent.pid");
    let good_pid = dir.path().join("good.pid");
    let mut silent = shell(
        "silent",
        format!("echo $$ > {}; exec sleep 60", silent_pid.display()),
    );
    silent.start_timeout = Duration::from_secs(3);
    let good = shell(
        "good",
        format!(
            "echo $$ > {}; exec {} {}",
            good_pid.display(),
            node(),
            node_package("server-everything")
        ) + " stdio",
    );
    let err = ToolServers::start(vec![good, silent]).await.unwrap_err();
    assert!(
        matches!(&err, McpError::Timeout { server, stage, .. } if server == "silent" && *stage == "the MCP handshake"),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "tool server \"silent\" did not finish starting within 3s: the MCP handshake took too long"
    );
    assert_gone(read_pid(&silent_pid), "the silent server").await;
    assert_gone(read_pid(&good_pid), "the server that had started").await;

    // A server that exits at once: its exit and stderr explain the handshake failure.
    let err = ToolServers::start(vec![shell(
        "quitter",
        "echo 'no such module: mcp' >&2; exit 1".into(),
    )])
    .await
    .unwrap_err();
    // (What the client library saw depends on when the pipe closed: it follows.)
    let shown = err.to_string();
    assert!(
        shown.starts_with(
            "tool server \"quitter\" failed the MCP handshake: its process exited with status 1 \
             (its stderr ended with: no such module: mcp); the handshake reported: "
        ),
        "{shown}"
    );

    // Configurations that cannot work.
    let mut bad_url = everything();
    bad_url.name = "web".into();
    bad_url.transport = ServerTransport::Http {
        url: "ftp://example.com/mcp".into(),
    };
    let mut slash = everything();
    slash.name = "a/b".into();
    for (configs, expected) in [
        (
            vec![everything(), everything()],
            "tool server \"everything\" is misconfigured: another tool server has the same name",
        ),
        (
            vec![bad_url],
            "tool server \"web\" is misconfigured: its URL has scheme \"ftp\", not http or https",
        ),
        (
            vec![slash],
            "tool server \"a/b\" is misconfigured: its name cannot name tools",
        ),
    ] {
        let err = ToolServers::start(configs).await.unwrap_err();
        assert!(err.to_string().starts_with(expected), "{err}");
    }
}

#[test]
fn hints_can_only_raise_the_class() {
    let hint = |v: Value| hint_from_annotations(Some(&v));
    assert_eq!(hint_from_annotations(None), None, "no annotations, no hint");
    assert_eq!(hint(json!({})), None);
    assert_eq!(
        hint(json!({"readOnlyHint": true})),
        None,
        "read-only never lowers"
    );
    assert_eq!(
        hint(json!({"readOnlyHint": true, "openWorldHint": false, "destructiveHint": false})),
        None
    );
    assert_eq!(
        hint(json!({"readOnlyHint": false})),
        Some(EffectClass::External)
    );
    assert_eq!(
        hint(json!({"destructiveHint": true})),
        Some(EffectClass::External)
    );
    assert_eq!(
        hint(json!({"readOnlyHint": true, "destructiveHint": true})),
        Some(EffectClass::External),
        "an explicit destructive hint raises even beside a read-only one"
    );
    assert_eq!(
        hint(json!({"openWorldHint": true})),
        Some(EffectClass::External)
    );
    assert_eq!(
        hint(json!({"destructiveHint": "yes"})),
        None,
        "only booleans count"
    );
    assert_eq!(hint(json!("destructive")), None);
}

#[test]
fn an_oversized_line_is_traced_to_its_request_id() {
    use crate::mcp::oversized_error;
    let error = |line: &str| {
        let line = line.as_bytes();
        let head = &line[..line.len().min(1024)];
        let tail = &line[line.len().saturating_sub(1024)..];
        oversized_error(head, tail, line.len(), 100, "n0nce")
            .map(|bytes| serde_json::from_slice::<Value>(&bytes).expect("json"))
    };
    let big = "x".repeat(5000);
    // Python's SDK: the id first.
    let python = format!(
        r#"{{"jsonrpc":"2.0","id":7,"result":{{"content":[{{"type":"text","text":"{big}"}}]}}}}"#
    );
    let e = error(&python).expect("a response");
    assert_eq!(e["id"], 7);
    assert_eq!(e["error"]["data"]["iceOversized"]["nonce"], "n0nce");
    // The TypeScript SDK: the id last, after a result with decoy ids inside.
    let ts = format!(
        r#"{{"result":{{"content":[{{"id":5,"text":"{big}, \"id\":9}}"}}]}},"jsonrpc":"2.0","id":"req-3"}}"#
    );
    assert_eq!(error(&(ts + "\r\n")).expect("a response")["id"], "req-3");
    // A request or notification from the server is dropped without a stand-in.
    let request = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"sampling/createMessage","params":{{"x":"{big}"}}}}"#
    );
    assert_eq!(error(&request), None);
    let notification =
        format!(r#"{{"jsonrpc":"2.0","method":"notifications/message","params":{{"x":"{big}"}}}}"#);
    assert_eq!(error(&notification), None);
    // Garbage has no id.
    assert_eq!(error(&big), None);
}

#[test]
fn the_line_bound_is_a_multiple_of_the_result_bound_within_limits() {
    assert_eq!(line_bound(1024 * 1024), 4 * 1024 * 1024 + 64 * 1024);
    assert_eq!(line_bound(10), 1024 * 1024);
    assert_eq!(line_bound(usize::MAX), 256 * 1024 * 1024);
}

/// `ToolServers` is shared as `Arc<ToolServers>` by concurrent sessions, and its futures run on
/// spawned tasks.
#[allow(dead_code)] // checked at compile time, never run
fn tool_servers_and_their_futures_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>(_: &T) {}
    send_sync::<ToolServers>();
    send_sync::<ToolCallError>();
    send_sync::<McpError>();
    fn futures(servers: &ToolServers, auth: &Authorization, run: &RunId) {
        send(&servers.call(auth, run, "s", "t", Map::new()));
        send(&servers.shutdown());
        send(&ToolServers::start(Vec::new()));
    }
}
