//! The run spec: the file a user writes to start a run (TOML).
//!
//! ```toml
//! [run]
//! id = "fix-greeting"          # optional; default: the file's stem and a random suffix
//! agent = "planner"            # the agent:<id> its proposals are recorded under
//! workspace = "workspace"      # relative to this file
//! policy = "policies"          # optional: a directory of *.cedar files (default: the home's)
//!
//! [agent]
//! driver = "plan"              # the scripted plan driver ("external": an agent connected to
//! plan = "plan.toml"           # the MCP gateway proposes instead); relative to this file
//!
//! [budget]                     # any of: tool_calls, bytes, wall_time, tokens_in, tokens_out,
//! tool_calls = 20              #         credits_micro, risk, denials
//! bytes = 1_000_000
//! wall_time = "60s"
//! denials = 50                 # refused requests before the run stops (every attempt is
//!                              # recorded: this bounds what a refused agent adds to the log;
//!                              # failed effects and unanswered approvals do not count;
//!                              # a request the agent withdrew while it waited does,
//!                              # and stops the run at the agent's next request)
//! on_exhaustion = "abort"      # or "suspend"
//!
//! [grants]
//! ttl = "10m"                  # a grant expires this long after it is issued
//! uses = 1                     # how many calls one grant may serve; each is still decided by
//!                              # the policy, and a grant given on an approval allows one
//!
//! [approvals]
//! timeout = "30s"              # a request waiting for an operator is denied after this
//! elicitation = false          # MCP gateway: whether the session's own MCP client may answer
//!                              # approvals (MCP elicitation, if the client supports it).
//!                              # Default: on for `ice mcp` (stdio: the client is the user's
//!                              # app), off for `ice serve` (HTTP: the client holding an agent
//!                              # token is the agent, and could approve its own calls); when
//!                              # off only operators (`ice approve`, the API, the web UI) answer
//!
//! [[assume]]
//! file = "config.toml"         # this file keeps its content (sha256 = "…" pins a digest;
//!                              # without it, the digest when the run starts)
//! [[assume]]
//! policy_version = "current"   # or a hex digest: the policy does not change under the run
//!
//! [servers.everything]         # an MCP tool server ICE starts and calls (its tools are
//! command = ["node", "server.js", "stdio"]     # `mcp.call` on Tool::"everything/<tool>")
//! # url = "http://127.0.0.1:3001/mcp"          # or a streamable-HTTP server
//! env = { LOG = "1" }          # optional, with `cwd` (relative to this file)
//! start_timeout = "20s"        # start and handshake
//! call_timeout = "30s"         # one tools/call
//! max_result_bytes = 1048576   # a larger result is refused (as is one larger than what
//!                              # a `bytes` budget reserved for the call)
//! [servers.everything.tools]   # ICE's effect class of each tool; a tool not named here is
//! echo = "read"                # "external"; the server's annotations can raise a class only
//!
//! [[check]]
//! name = "greeting present"
//! run = ["grep", "-q", "hello", "hello.txt"]   # run in a copy of the workspace with the
//! timeout = "30s"                              # staged writes applied; must exit 0
//!
//! [memory]                     # governed memory (see `crate::memory`): mount at context
//! mount = { scopes = ["project"], ids = ["earlier-run:12"] }  # time the active memories
//!                              # of these scopes and these ids
//! [[memory.promote]]           # when the run commits, promote its DOMAIN events that match
//! event = "FileRead"           # a DOMAIN event type
//! path = "docs"                # optional: this workspace path or below (or, for
//!                              # ToolInvoked, tool = "server/tool")
//! kind = "file"                # the memory's type
//! scope = "project"            # what later runs mount it by
//! confidence = 0.9             # 0 to 1 (default 1)
//! ttl = "30d"                  # optional: it expires this long after promotion
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ice_kernel::{Digest, RunId};
use serde::{Deserialize, Serialize};

/// Largest run spec file read.
pub const MAX_SPEC_BYTES: u64 = 1 << 20;

/// A run spec that cannot be used: the file, where, and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct SpecError {
    /// The file, as given.
    pub file: String,
    /// 1-based line and column, when known.
    pub at: Option<(usize, usize)>,
    /// What is wrong.
    pub problem: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.at {
            Some((l, c)) => write!(f, "{}:{l}:{c}: {}", self.file, self.problem),
            None => write!(f, "{}: {}", self.file, self.problem),
        }
    }
}

/// What happens when a budget is exhausted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnExhaustion {
    /// Abort the run (staged writes discarded).
    #[default]
    Abort,
    /// Suspend it for an operator, who may reconfigure (for instance raise the budget) and resume.
    Suspend,
}

/// Budget limits of a run (absent = unlimited).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct BudgetSpec {
    /// Tool calls.
    pub tool_calls: Option<u64>,
    /// Bytes read or written.
    pub bytes: Option<u64>,
    /// Wall-clock time of the execution window, in microseconds.
    pub wall_time_us: Option<u64>,
    /// Model input tokens.
    pub tokens_in: Option<u64>,
    /// Model output tokens.
    pub tokens_out: Option<u64>,
    /// Credits, in millionths.
    pub credits_micro: Option<u64>,
    /// Risk points.
    pub risk: Option<u64>,
    /// Refused requests: once this many of the run's requests were refused (by the policy, a
    /// grant, an operator, confinement, the agent's withdrawal of a request waiting for an
    /// approval, …; not an effect that failed, an approval nobody answered, or one closed by
    /// a kill or an interruption) it stops as
    /// `on_exhaustion` says. Every attempt is recorded, so without a limit an agent that keeps
    /// asking for what it may not have grows the log without end. (Absent from specs recorded
    /// before it existed: read as no limit.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denials: Option<u64>,
    /// What exhaustion does.
    pub on_exhaustion: OnExhaustion,
}

/// A declared assumption.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Assumption {
    /// A workspace file keeps its content.
    File {
        /// Workspace-relative path.
        path: String,
        /// The digest it must keep; `None` until the run starts and takes it.
        sha256: Option<Digest>,
    },
    /// The policy version does not change.
    PolicyVersion {
        /// The version it must keep; `None` until the run starts and takes it.
        version: Option<Digest>,
    },
}

/// A validation check: a command run against a copy of the workspace with the staged writes
/// applied; it passes when it exits 0 within its timeout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// Its name in events and output.
    pub name: String,
    /// Program and arguments.
    pub run: Vec<String>,
    /// Time limit.
    pub timeout_ms: u64,
}

/// An MCP tool server the operator configured: how to reach it, its bounds, and ICE's own effect
/// class for each of its tools.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolServerSpec {
    /// ICE's name for it: the `server` of `Tool::"server/tool"`.
    pub name: String,
    /// Program and arguments of a server spoken to over stdio (empty when `url` is given).
    pub command: Vec<String>,
    /// The URL of a streamable-HTTP server.
    pub url: Option<String>,
    /// Environment of a stdio server (added to ICE's).
    pub env: std::collections::BTreeMap<String, String>,
    /// Working directory of a stdio server.
    pub cwd: Option<PathBuf>,
    /// Time to start and handshake, in milliseconds.
    pub start_timeout_ms: u64,
    /// Time limit of one call, in milliseconds.
    pub call_timeout_ms: u64,
    /// Largest result accepted, in bytes.
    pub max_result_bytes: u64,
    /// ICE's effect class of each named tool; every other tool is external.
    pub tools: std::collections::BTreeMap<String, ice_authority::EffectClass>,
}

impl ToolServerSpec {
    /// ICE's class for one of this server's tools before any hint: as configured, else external.
    pub fn class_of(&self, tool: &str) -> ice_authority::EffectClass {
        self.tools
            .get(tool)
            .copied()
            .unwrap_or(ice_authority::EffectClass::External)
    }
}

/// A parsed, checked run spec. Paths are absolute.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSpec {
    /// The run id (given, or made when the run starts).
    pub id: Option<RunId>,
    /// The agent id.
    pub agent: String,
    /// The workspace directory.
    pub workspace: PathBuf,
    /// A policy directory, if the spec names one.
    pub policy: Option<PathBuf>,
    /// The agent driver: `plan` (a scripted plan) or `external` (an agent connected through the
    /// MCP gateway). Specs recorded before drivers were named are `plan`.
    #[serde(default = "plan_driver")]
    pub driver: String,
    /// The plan file (the plan driver's input).
    pub plan: Option<PathBuf>,
    /// The SHA-256 (hex) of the plan file's bytes when the spec was read: what the run was
    /// driven by. A resume or a replay that re-drives the plan refuses a file that differs.
    /// (Runs recorded before it was kept have none.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_sha256: Option<String>,
    /// The LLM driver's settings (`[agent.llm]`: endpoint, model, the name of the environment
    /// variable holding the API key, never the key itself), checked by the driver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub llm: Option<serde_json::Value>,
    /// The MCP tool servers the run may call, by name.
    #[serde(default)]
    pub servers: Vec<ToolServerSpec>,
    /// Budget limits.
    pub budget: BudgetSpec,
    /// Grant lifetime, in milliseconds.
    pub grant_ttl_ms: u64,
    /// Uses per grant.
    pub grant_uses: u32,
    /// How long a request waits for an operator, in milliseconds.
    pub approval_timeout_ms: u64,
    /// Whether the MCP gateway may ask the session's MCP client to answer approvals (MCP
    /// elicitation): `[approvals] elicitation`. `None` when the spec does not say: the gateway
    /// then decides by transport (on over stdio, `ice mcp`; off over HTTP, `ice serve`, where
    /// the client is the agent itself) and records its choice in the run's spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_elicitation: Option<bool>,
    /// Assumptions.
    pub assumptions: Vec<Assumption>,
    /// Validation checks.
    pub checks: Vec<Check>,
    /// `[memory]`: what the run mounts at context time and promotes at commit. Specs recorded
    /// before memory existed have none.
    #[serde(default)]
    pub memory: crate::memory::MemorySpec,
    /// The spec file.
    pub file: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    run: toml::Spanned<RawRun>,
    agent: toml::Spanned<RawAgent>,
    #[serde(default)]
    budget: Option<toml::Spanned<RawBudget>>,
    #[serde(default)]
    grants: Option<toml::Spanned<RawGrants>>,
    #[serde(default)]
    approvals: Option<toml::Spanned<RawApprovals>>,
    #[serde(default)]
    assume: Vec<toml::Spanned<RawAssume>>,
    #[serde(default)]
    check: Vec<toml::Spanned<RawCheck>>,
    #[serde(default)]
    servers: std::collections::BTreeMap<String, toml::Spanned<RawServer>>,
    #[serde(default)]
    memory: Option<toml::Spanned<RawMemory>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMemory {
    #[serde(default)]
    mount: Option<RawMount>,
    #[serde(default)]
    promote: Vec<toml::Spanned<RawPromote>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMount {
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default)]
    ids: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPromote {
    event: String,
    path: Option<String>,
    tool: Option<String>,
    kind: String,
    scope: String,
    confidence: Option<f64>,
    ttl: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    #[serde(default)]
    command: Vec<String>,
    url: Option<String>,
    #[serde(default)]
    env: std::collections::BTreeMap<String, String>,
    cwd: Option<String>,
    start_timeout: Option<String>,
    call_timeout: Option<String>,
    max_result_bytes: Option<u64>,
    #[serde(default)]
    tools: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRun {
    id: Option<String>,
    agent: String,
    workspace: String,
    policy: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    driver: String,
    plan: Option<String>,
    llm: Option<toml::Table>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    tool_calls: Option<u64>,
    bytes: Option<u64>,
    wall_time: Option<String>,
    tokens_in: Option<u64>,
    tokens_out: Option<u64>,
    credits_micro: Option<u64>,
    risk: Option<u64>,
    denials: Option<u64>,
    on_exhaustion: Option<OnExhaustion>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrants {
    ttl: Option<String>,
    uses: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApprovals {
    timeout: Option<String>,
    elicitation: Option<bool>,
}

/// The SHA-256 (hex) of a plan file's bytes, read whole (a regular file of at most
/// [`ice_kernel::limits::MAX_PLAN_BYTES`]).
pub fn plan_digest(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let max = ice_kernel::limits::MAX_PLAN_BYTES;
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.len() as u64 > max {
        return Err(format!(
            "{} is larger than a plan may be ({max} bytes)",
            path.display()
        ));
    }
    Ok(ice_kernel::Digest::of(&bytes).to_hex())
}

fn plan_driver() -> String {
    "plan".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAssume {
    file: Option<String>,
    sha256: Option<String>,
    policy_version: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    name: String,
    run: Vec<String>,
    timeout: Option<String>,
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Parse a duration such as `250ms`, `30s`, `5m`, `2h`, `7d`, of at most a year.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    parse_duration_up_to(s, 366 * 86_400_000, "a year")
}

/// Parse a duration (`ms`, `s`, `m`, `h` or `d`) of at most `max_ms` (`max_text` in words).
pub fn parse_duration_up_to(s: &str, max_ms: u64, max_text: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("duration {s:?} needs a unit (ms, s, m, h or d)"))?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("duration {s:?} must start with a whole number"))?;
    let per = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("duration {s:?}: unit must be ms, s, m, h or d")),
    };
    let ms = n
        .checked_mul(per)
        .filter(|ms| *ms <= max_ms)
        .ok_or_else(|| format!("duration {s:?} is longer than {max_text}"))?;
    Ok(Duration::from_millis(ms))
}

/// Check one `[servers.NAME]` table.
fn parse_server(name: &str, raw: RawServer, base: &Path) -> Result<ToolServerSpec, String> {
    let at = format!("[servers.{name}]");
    ice_authority::Resource::tool(name, "tool")
        .map_err(|e| format!("{at}: {name:?} is not a usable server name: {e}"))?;
    // Tools are offered as SERVER__TOOL. With no `__` inside a server's name and no `_` at its
    // end, no two servers' tools are offered under one name: were a name both SHORT__... and
    // LONG__..., LONG would be SHORT followed by `_` (ending in `_`) or by `__` (holding it).
    if name.contains("__") {
        return Err(format!(
            "{at}: a server name may not contain \"__\" (tools are offered as SERVER__TOOL, so a call could not be told apart from one to another server)"
        ));
    }
    if let Some(stem) = name.strip_suffix('_') {
        return Err(format!(
            "{at}: a server name may not end with \"_\" (tools are offered as SERVER__TOOL, so tool \"x\" of server {name:?} would be offered as \"{name}__x\", which also reads as tool \"_x\" of server {stem:?}, and a call could not be told apart from one to another server)"
        ));
    }
    match (&raw.url, raw.command.is_empty()) {
        (Some(_), false) => return Err(format!("{at}: give either `command` or `url`, not both")),
        (None, true) => {
            return Err(format!(
                "{at}: give `command = [\"program\", ...]` (stdio) or `url = \"http://...\"` (streamable HTTP)"
            ));
        }
        (None, false) if raw.command[0].is_empty() => {
            return Err(format!("{at}: `command` needs a program"));
        }
        (Some(u), true) => {
            let parsed = url::Url::parse(u).map_err(|e| format!("{at}: url {u:?}: {e}"))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(format!("{at}: url {u:?} must be http or https"));
            }
            if !raw.env.is_empty() || raw.cwd.is_some() {
                return Err(format!(
                    "{at}: `env` and `cwd` are for stdio servers (`command`)"
                ));
            }
        }
        _ => {}
    }
    let ms = |v: &Option<String>, what: &str, default: u64| -> Result<u64, String> {
        match v {
            Some(t) => match parse_duration(t)
                .map_err(|e| format!("{at} {what}: {e}"))?
                .as_millis() as u64
            {
                0 => Err(format!(
                    "{at} {what} must be more than 0 (the server could never {})",
                    if what == "start_timeout" {
                        "start"
                    } else {
                        "answer a call"
                    }
                )),
                ms => Ok(ms),
            },
            None => Ok(default),
        }
    };
    let max_result_bytes = raw.max_result_bytes.unwrap_or(1 << 20);
    if max_result_bytes == 0 || max_result_bytes > MAX_TOOL_RESULT_BYTES {
        return Err(format!(
            "{at} max_result_bytes must be 1 to {MAX_TOOL_RESULT_BYTES}"
        ));
    }
    let mut tools = std::collections::BTreeMap::new();
    for (tool, class) in raw.tools {
        ice_authority::Resource::tool(name, &tool)
            .map_err(|e| format!("{at} tools: {tool:?}: {e}"))?;
        let class = class
            .parse::<ice_authority::EffectClass>()
            .map_err(|e| format!("{at} tools.{tool}: {e}"))?;
        tools.insert(tool, class);
    }
    let cwd = match &raw.cwd {
        Some(c) => {
            let dir = base.join(c);
            if !dir.is_dir() {
                return Err(format!(
                    "{at} cwd {c:?}: {} is not a directory",
                    dir.display()
                ));
            }
            Some(dir)
        }
        None => None,
    };
    Ok(ToolServerSpec {
        name: name.to_string(),
        command: raw.command,
        url: raw.url,
        env: raw.env,
        cwd,
        start_timeout_ms: ms(&raw.start_timeout, "start_timeout", 20_000)?,
        call_timeout_ms: ms(&raw.call_timeout, "call_timeout", 30_000)?,
        max_result_bytes,
        tools,
    })
}

/// The largest `max_result_bytes` a server may be given (a result is one payload field of its
/// `ToolInvoked` event, stored as a blob when large).
pub const MAX_TOOL_RESULT_BYTES: u64 = 16 << 20;

impl RunSpec {
    /// Read and check a run spec file. Relative paths in it are taken from its directory.
    pub fn load(path: &Path) -> Result<RunSpec, SpecError> {
        let file = path.display().to_string();
        let io = |e: std::io::Error| SpecError {
            file: file.clone(),
            at: None,
            problem: e.to_string(),
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        // A device or a pipe has no size to check and may never end.
        if !meta.is_file() {
            return Err(SpecError {
                file,
                at: None,
                problem: "not a regular file".into(),
            });
        }
        if meta.len() > MAX_SPEC_BYTES {
            return Err(SpecError {
                file,
                at: None,
                problem: format!(
                    "{} bytes; a run spec may have at most {MAX_SPEC_BYTES}",
                    meta.len()
                ),
            });
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        let base = std::path::absolute(path)
            .map_err(io)?
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        RunSpec::parse(path, &text, &base)
    }

    /// Parse a run spec's text; relative paths are taken from `base`. Checks that the workspace
    /// and plan exist.
    pub fn parse(path: &Path, text: &str, base: &Path) -> Result<RunSpec, SpecError> {
        let file = path.display().to_string();
        let err = |offset: Option<usize>, problem: String| SpecError {
            file: file.clone(),
            at: offset.map(|o| line_col(text, o)),
            problem,
        };
        let raw: Raw = toml::from_str(text).map_err(|e| {
            err(
                e.span().map(|s| s.start),
                e.message().trim_end().to_string(),
            )
        })?;
        let run_at = raw.run.span().start;
        let run = raw.run.into_inner();
        let id = match &run.id {
            Some(id) => {
                let run_id = RunId::new(id.clone())
                    .map_err(|e| err(Some(run_at), format!("[run] id {id:?}: {e}")))?;
                // The id names the run's directory and is typed into commands.
                if id.chars().all(|c| c == '.') {
                    return Err(err(
                        Some(run_at),
                        format!("[run] id {id:?} would name a directory above the run's own"),
                    ));
                }
                if id.starts_with('-') {
                    return Err(err(
                        Some(run_at),
                        format!(
                            "[run] id {id:?} starts with '-': commands would read it as an option"
                        ),
                    ));
                }
                Some(run_id)
            }
            None => None,
        };
        if format!("agent:{}", run.agent)
            .parse::<ice_kernel::Origin>()
            .is_err()
        {
            return Err(err(
                Some(run_at),
                format!(
                    "[run] agent {:?} is not a valid agent id (A-Z a-z 0-9 . _ - @)",
                    run.agent
                ),
            ));
        }
        // An empty path would quietly mean this file's directory: say so instead.
        for (what, value) in [
            ("workspace", Some(&run.workspace)),
            ("policy", run.policy.as_ref()),
        ] {
            if value.is_some_and(|v| v.trim().is_empty()) {
                return Err(err(
                    Some(run_at),
                    format!(
                        "[run] {what} is empty; name a directory (relative to this file; \".\" is this file's own)"
                    ),
                ));
            }
        }
        let workspace = base.join(&run.workspace);
        if !workspace.is_dir() {
            return Err(err(
                Some(run_at),
                format!(
                    "[run] workspace {:?}: {} is not a directory",
                    run.workspace,
                    workspace.display()
                ),
            ));
        }
        let policy = match &run.policy {
            Some(p) => {
                let dir = base.join(p);
                if !dir.is_dir() {
                    return Err(err(
                        Some(run_at),
                        format!("[run] policy {p:?}: {} is not a directory", dir.display()),
                    ));
                }
                Some(dir)
            }
            None => None,
        };
        let agent_at = raw.agent.span().start;
        let agent = raw.agent.into_inner();
        if agent.llm.is_some() && agent.driver != "llm" {
            return Err(err(
                Some(agent_at),
                format!(
                    "[agent.llm] is for driver = \"llm\", not {:?}",
                    agent.driver
                ),
            ));
        }
        let llm = match agent.llm {
            Some(t) => Some(
                serde_json::to_value(&t)
                    .map_err(|e| err(Some(agent_at), format!("[agent.llm] cannot be read: {e}")))?,
            ),
            None => None,
        };
        let mut plan_sha256 = None;
        let plan = match (agent.driver.as_str(), agent.plan) {
            ("plan", None) => {
                return Err(err(
                    Some(agent_at),
                    "[agent] the plan driver needs `plan = \"FILE\"`".into(),
                ));
            }
            ("plan", Some(plan)) => {
                let plan_path = base.join(&plan);
                if !plan_path.is_file() {
                    return Err(err(
                        Some(agent_at),
                        format!(
                            "[agent] plan {plan:?}: {} is not a file",
                            plan_path.display()
                        ),
                    ));
                }
                let digest = plan_digest(&plan_path)
                    .map_err(|e| err(Some(agent_at), format!("[agent] plan {plan:?}: {e}")))?;
                plan_sha256 = Some(digest);
                Some(plan_path)
            }
            ("external", None) | ("llm", None) => None,
            (d @ ("external" | "llm"), Some(_)) => {
                return Err(err(
                    Some(agent_at),
                    format!(
                        "[agent] the {d} driver has no `plan` (a plan is for driver = \"plan\")"
                    ),
                ));
            }
            (other, _) => {
                return Err(err(
                    Some(agent_at),
                    format!(
                        "[agent] driver {other:?} is not available; this version has \"plan\", \"llm\" and \"external\""
                    ),
                ));
            }
        };
        if agent.driver == "llm" && llm.is_none() {
            return Err(err(
                Some(agent_at),
                "[agent] the llm driver needs an [agent.llm] table (base_url, model, task)".into(),
            ));
        }
        let mut servers = Vec::new();
        for (name, raw_server) in raw.servers {
            let at = raw_server.span().start;
            servers.push(
                parse_server(&name, raw_server.into_inner(), base).map_err(|e| err(Some(at), e))?,
            );
        }
        let mut budget = BudgetSpec::default();
        if let Some(b) = raw.budget {
            let at = b.span().start;
            let b = b.into_inner();
            budget = BudgetSpec {
                tool_calls: b.tool_calls,
                bytes: b.bytes,
                wall_time_us: match &b.wall_time {
                    Some(w) => match parse_duration(w)
                        .map_err(|e| err(Some(at), format!("[budget] wall_time: {e}")))?
                        .as_micros() as u64
                    {
                        // Unlike a limit of 0 tool calls or bytes (a run that may not use
                        // any), no time at all stops the run before its first step.
                        0 => {
                            return Err(err(
                                Some(at),
                                "[budget] wall_time must be more than 0 (the run would be out of time before its first step); leave it out for no limit".into(),
                            ));
                        }
                        us => Some(us),
                    },
                    None => None,
                },
                tokens_in: b.tokens_in,
                tokens_out: b.tokens_out,
                credits_micro: b.credits_micro,
                risk: b.risk,
                denials: b.denials,
                on_exhaustion: b.on_exhaustion.unwrap_or_default(),
            };
            let max = (1u64 << 53) - 1;
            for (name, v) in [
                ("tool_calls", budget.tool_calls),
                ("bytes", budget.bytes),
                ("tokens_in", budget.tokens_in),
                ("tokens_out", budget.tokens_out),
                ("credits_micro", budget.credits_micro),
                ("risk", budget.risk),
                ("denials", budget.denials),
            ] {
                if v.is_some_and(|v| v > max) {
                    return Err(err(Some(at), format!("[budget] {name} is above 2^53 - 1")));
                }
            }
        }
        let (mut grant_ttl_ms, mut grant_uses) = (600_000u64, 1u32);
        if let Some(g) = raw.grants {
            let at = g.span().start;
            let g = g.into_inner();
            if let Some(t) = &g.ttl {
                grant_ttl_ms = parse_duration(t)
                    .map_err(|e| err(Some(at), format!("[grants] ttl: {e}")))?
                    .as_millis() as u64;
                if grant_ttl_ms == 0 {
                    return Err(err(
                        Some(at),
                        "[grants] ttl must be more than 0 (every grant would expire before its use)"
                            .into(),
                    ));
                }
            }
            if let Some(u) = g.uses {
                if u == 0 {
                    return Err(err(Some(at), "[grants] uses must be at least 1".into()));
                }
                grant_uses = u;
            }
        }
        let mut approval_timeout_ms = 60_000u64;
        let mut approval_elicitation = None;
        if let Some(a) = raw.approvals {
            let at = a.span().start;
            let a = a.into_inner();
            if let Some(t) = &a.timeout {
                approval_timeout_ms = parse_duration(t)
                    .map_err(|e| err(Some(at), format!("[approvals] timeout: {e}")))?
                    .as_millis() as u64;
                if approval_timeout_ms == 0 {
                    return Err(err(
                        Some(at),
                        "[approvals] timeout must be more than 0 (every request would be denied before an operator could answer it; a policy's forbid refuses calls outright)".into(),
                    ));
                }
            }
            approval_elicitation = a.elicitation;
        }
        let mut assumptions = Vec::new();
        for a in raw.assume {
            let at = a.span().start;
            let a = a.into_inner();
            let digest = |s: &Option<String>, what: &str| -> Result<Option<Digest>, SpecError> {
                match s.as_deref() {
                    None | Some("current") => Ok(None),
                    Some(h) => Digest::from_hex(h)
                        .map(Some)
                        .map_err(|e| err(Some(at), format!("[[assume]] {what}: {e}"))),
                }
            };
            match (&a.file, &a.policy_version) {
                (Some(f), None) => {
                    ice_authority::Resource::path(f)
                        .map_err(|e| err(Some(at), format!("[[assume]] file: {e}")))?;
                    assumptions.push(Assumption::File {
                        path: f.clone(),
                        sha256: digest(&a.sha256, "sha256")?,
                    });
                }
                (None, Some(_)) if a.sha256.is_none() => {
                    assumptions.push(Assumption::PolicyVersion {
                        version: digest(&a.policy_version, "policy_version")?,
                    });
                }
                _ => {
                    return Err(err(
                        Some(at),
                        "[[assume]] give either `file` (and optionally `sha256`) or `policy_version`"
                            .into(),
                    ));
                }
            }
        }
        let mut checks = Vec::new();
        for c in raw.check {
            let at = c.span().start;
            let c = c.into_inner();
            if c.name.trim().is_empty() {
                return Err(err(
                    Some(at),
                    "[[check]] `name` is empty; give each check a name (its results are recorded and shown by it)".into(),
                ));
            }
            if c.name.trim() != c.name {
                return Err(err(
                    Some(at),
                    format!(
                        "[[check]] {:?}: the name starts or ends with blanks; write it without them ({:?}), since names that differ only in blanks cannot be told apart where results are shown",
                        c.name,
                        c.name.trim()
                    ),
                ));
            }
            if checks.iter().any(|k: &Check| k.name == c.name) {
                return Err(err(
                    Some(at),
                    format!(
                        "[[check]] {:?}: another check has this name; give each its own (its results are recorded and shown by it)",
                        c.name
                    ),
                ));
            }
            if c.run.is_empty() || c.run[0].is_empty() {
                return Err(err(
                    Some(at),
                    format!("[[check]] {:?}: `run` needs a program", c.name),
                ));
            }
            let timeout_ms = match &c.timeout {
                Some(t) => parse_duration(t)
                    .map_err(|e| err(Some(at), format!("[[check]] {:?} timeout: {e}", c.name)))?
                    .as_millis() as u64,
                None => 60_000,
            };
            if timeout_ms == 0 {
                return Err(err(
                    Some(at),
                    format!(
                        "[[check]] {:?} timeout must be more than 0 (the check could never pass)",
                        c.name
                    ),
                ));
            }
            checks.push(Check {
                name: c.name,
                run: c.run,
                timeout_ms,
            });
        }
        let mut memory = crate::memory::MemorySpec::default();
        if let Some(m) = raw.memory {
            let at = m.span().start;
            let m = m.into_inner();
            if let Some(mount) = m.mount {
                memory.mount = crate::memory::MountSpec::new(mount.scopes, mount.ids)
                    .map_err(|e| err(Some(at), format!("[memory] {e}")))?;
            }
            for (i, r) in m.promote.into_iter().enumerate() {
                let at = r.span().start;
                let r = r.into_inner();
                memory.promote.push(
                    crate::memory::PromoteRule::new(
                        &r.event,
                        r.path.as_deref(),
                        r.tool.as_deref(),
                        &r.kind,
                        &r.scope,
                        r.confidence,
                        r.ttl.as_deref(),
                    )
                    .map_err(|e| {
                        err(Some(at), format!("[[memory.promote]] rule {}: {e}", i + 1))
                    })?,
                );
            }
        }
        Ok(RunSpec {
            id,
            agent: run.agent,
            workspace: std::fs::canonicalize(&workspace).unwrap_or(workspace),
            policy,
            driver: agent.driver,
            plan,
            plan_sha256,
            llm,
            servers,
            budget,
            grant_ttl_ms,
            grant_uses,
            approval_timeout_ms,
            approval_elicitation,
            assumptions,
            checks,
            memory,
            file: base.join(path.file_name().unwrap_or_default()),
        })
    }
}
