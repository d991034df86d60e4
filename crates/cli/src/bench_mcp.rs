//! `ice bench mcp`: the latency an MCP `tools/call` gains by going through ICE's gateway
//! (`ice mcp` over stdio, every call governed and recorded) against calling the same tool
//! server directly over stdio, with the same client, interleaved call by call so both see the
//! same machine.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use rmcp::model::CallToolRequestParams;
use rmcp::service::RunningService;
use rmcp::transport::TokioChildProcess;
use rmcp::{RoleClient, ServiceExt};
use serde_json::json;

pub struct McpFigures {
    pub ice_p50: f64,
    pub ice_p99: f64,
    pub direct_p50: f64,
    pub direct_p99: f64,
    pub added_p50: f64,
    pub added_p99: f64,
}

async fn connect(program: &str, args: &[String]) -> Result<RunningService<RoleClient, ()>> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args);
    let (transport, _) = TokioChildProcess::builder(cmd)
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    ().serve(transport)
        .await
        .map_err(|e| anyhow!("MCP handshake with {program}: {e}"))
}

async fn call(client: &RunningService<RoleClient, ()>, tool: &str, i: usize) -> Result<f64> {
    let args = json!({"message": format!("call {i}")});
    let serde_json::Value::Object(args) = args else {
        unreachable!()
    };
    let t = Instant::now();
    let r = client
        .call_tool(CallToolRequestParams::new(tool.to_string()).with_arguments(args))
        .await
        .map_err(|e| anyhow!("calling {tool}: {e}"))?;
    let us = t.elapsed().as_secs_f64() * 1e6;
    if r.is_error == Some(true) {
        return Err(anyhow!("{tool} failed: {:?}", r.content));
    }
    Ok(us)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// One measurement: a fresh installation under `base`, `calls` echo calls each way.
pub async fn measure(base: &Path, server: &[String], calls: usize) -> Result<McpFigures> {
    let dir = tempfile::Builder::new()
        .prefix("ice-bench-mcp-")
        .tempdir_in(base)
        .with_context(|| format!("a scratch directory in {}", base.display()))?;
    let home = dir.path().join("home");
    crate::home::Home::init(&home, Some("ice.bench/mcp".into()))?;
    let ws = dir.path().join("ws");
    std::fs::create_dir_all(dir.path().join("policies"))?;
    std::fs::create_dir_all(&ws)?;
    std::fs::write(
        dir.path().join("policies/bench.cedar"),
        "@id(\"echo\")\npermit(principal, action == Action::\"mcp.call\", resource == Tool::\"srv/echo\");\n",
    )?;
    let command = serde_json::to_string(server)?;
    let spec = dir.path().join("bench.toml");
    std::fs::write(
        &spec,
        format!(
            "[run]\nid = \"bench-mcp\"\nagent = \"bench\"\nworkspace = \"ws\"\npolicy = \"policies\"\n\
             [agent]\ndriver = \"external\"\n[grants]\nuses = 1000000\nttl = \"1h\"\n\
             [servers.srv]\ncommand = {command}\n[servers.srv.tools]\necho = \"read\"\n"
        ),
    )?;
    let exe = std::env::current_exe().context("finding the ice binary")?;
    let ice_args: Vec<String> = vec![
        "--home".into(),
        home.display().to_string(),
        "mcp".into(),
        "--run-spec".into(),
        spec.display().to_string(),
    ];
    let direct = connect(&server[0], &server[1..]).await?;
    let ice = connect(&exe.display().to_string(), &ice_args).await?;
    let warm = (calls / 10).max(20);
    for i in 0..warm {
        call(&direct, "echo", i).await?;
        call(&ice, "srv__echo", i).await?;
    }
    let (mut d, mut g) = (Vec::with_capacity(calls), Vec::with_capacity(calls));
    for i in 0..calls {
        d.push(call(&direct, "echo", i).await?);
        g.push(call(&ice, "srv__echo", i).await?);
    }
    let _ = direct.cancel().await;
    let _ = ice.cancel().await;
    let (d50, d99, g50, g99) = (
        pct(&mut d, 0.5),
        pct(&mut d, 0.99),
        pct(&mut g, 0.5),
        pct(&mut g, 0.99),
    );
    Ok(McpFigures {
        ice_p50: g50,
        ice_p99: g99,
        direct_p50: d50,
        direct_p99: d99,
        added_p50: g50 - d50,
        added_p99: g99 - d99,
    })
}
