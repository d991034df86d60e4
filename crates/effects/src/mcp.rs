//! ICE's MCP client toward the tool servers the operator configured: it starts and supervises
//! them, keeps their tool catalogs, and performs `tools/call` only under an authorization.
//!
//! [`ToolServers::start`] spawns every stdio server (or connects to every streamable-HTTP one),
//! performs the MCP handshake and lists its tools, all within the server's `start_timeout`.
//! The handshake uses rmcp's automatic lifecycle: it first probes with `server/discover`
//! (protocol 2026-07-28, no `initialize`, per-request `_meta`); a server that answers with an
//! error is a legacy server and gets the `initialize` handshake (ICE offers 2025-11-25; the
//! server may answer with an older version). The version the server settled on is recorded
//! ([`ToolServers::protocol_version`], [`ToolCallOutput::protocol_version`]). rmcp waits up to
//! 10 s for an answer to the probe, so a legacy server that ignores unknown requests needs a
//! `start_timeout` above that. A stdio server slower than 10 s to start (a first `npx`
//! download, a loaded machine) answers the probe after rmcp has sent `initialize`, and that
//! late answer breaks the handshake: ICE then starts it once more and opens with `initialize`
//! directly.
//!
//! [`ToolServers::call`] checks the authorization (`mcp.call` on exactly `Tool::"server/tool"`,
//! the same run, and an effect class at least the tool's own hint) before anything is sent,
//! then sends one `tools/call`. Many calls on one server run at once (requests are multiplexed
//! by id).
//!
//! **Bounds.** A call that is not answered within `call_timeout` is abandoned: the server gets
//! `notifications/cancelled` and stays in use. A result whose serialized JSON exceeds
//! `max_result_bytes` is refused. On stdio, no line the server writes is buffered beyond
//! [`line_bound`] (four times `max_result_bytes` plus 64 KiB, at least 1 MiB, at most
//! 256 MiB): a longer line is dropped as it streams in, and when it is a response, its call
//! gets [`ToolCallError::Oversized`] (its request id is read from the line's first and last
//! kilobyte; a response whose id cannot be found there times out instead). Over HTTP the same
//! bound applies to each response body and each SSE event. A line that is not JSON is ignored.
//!
//! **Supervision.** A stdio server runs in its own process group, with a minimal environment
//! (`HOME`, `LOGNAME`, `PATH`, `SHELL`, `TERM`, `USER` from ICE's environment, plus the
//! configured `env`: ICE's own secrets are not passed on). Its stdout is the MCP channel; its
//! stderr is read and dropped, keeping only the last few kilobytes to explain a failure (it never
//! reaches ICE's stdout, which may itself be an MCP channel). When a server dies, calls in
//! flight get [`ToolCallError::ServerGone`] and the next call restarts it (new handshake, tools
//! listed again); a server is restarted at most [`MAX_RESTARTS_PER_MINUTE`] times a minute,
//! after which calls are not sent and get [`ToolCallError::NotRunning`] saying it keeps dying.
//! An HTTP server whose connection fails is reconnected the same way (one that lets a call time
//! out and then answers no `ping` either is taken as having lost the session). [`ToolServers::shutdown`] closes each server's stdin,
//! then sends `SIGTERM` and finally `SIGKILL` to its process group; dropping [`ToolServers`]
//! kills the process groups at once. One server's failure never affects another's calls.
//!
//! **Requests from servers.** ICE does not forward server-initiated requests to agents yet:
//! sampling (`sampling/createMessage`) is refused with an error, elicitation
//! (`elicitation/create`) is declined, and `roots/list` is answered with no roots. ICE
//! declares none of these capabilities, so well-behaved servers do not ask. With protocol
//! 2026-07-28 the same answers are given to a tool's `input_required` result (at most
//! [`MAX_INPUT_ROUNDS`] rounds). A `notifications/tools/list_changed` makes ICE list the
//! server's tools again.
//!
//! Everything a server sends is untrusted: annotations are kept as sent, and a hint from them
//! ([`hint_from_annotations`]) can only raise ICE's own effect class, never lower it. Nothing a
//! server sends makes this module panic.

use std::borrow::Cow;
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

use ice_authority::{Authorization, EffectClass, Resource};
use ice_kernel::RunId;
use rmcp::model::{
    CallToolRequestParams, ClientCapabilities, ClientConfig, ElicitRequestParams, ElicitResult,
    ElicitationAction, ErrorCode, ErrorData, Implementation, PaginatedRequestParams,
    ProtocolVersion, Tool,
};
use rmcp::service::{ClientLifecycleMode, ClientServiceExt, RequestContext, RunningService};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::async_rw::AsyncRwTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{ClientHandler, RoleClient, ServiceError};
use serde_json::{Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};
use tokio::sync::{mpsc, oneshot, watch};

use crate::auth::{
    AuthorizationError, cap_bytes, cap_time, require, require_bytes, require_effect, require_run,
};

/// How many times a minute a server that keeps dying is restarted before calls are refused.
pub const MAX_RESTARTS_PER_MINUTE: usize = 5;

/// How many `input_required` rounds one call may take (each answered with a refusal).
pub const MAX_INPUT_ROUNDS: usize = 3;

/// Most tools one server may list.
pub const MAX_TOOLS_PER_SERVER: usize = 10_000;

/// Most pages of `tools/list` read from one server.
const MAX_TOOL_PAGES: usize = 100;

/// The environment variables a stdio server inherits from ICE (as the reference MCP clients do).
const INHERITED_ENV: [&str; 6] = ["HOME", "LOGNAME", "PATH", "SHELL", "TERM", "USER"];

/// How long shutdown waits for a server to exit after its stdin closes, and again after
/// `SIGTERM`, before `SIGKILL`.
const EXIT_GRACE: Duration = Duration::from_secs(1);

/// How long an error waits to learn how a server's process ended (the pipe closes a moment
/// before the process can be reaped).
const EXIT_STATUS_WAIT: Duration = Duration::from_millis(500);

/// How much of a server's stderr is kept to explain a failure.
const STDERR_KEPT: usize = 4096;

/// How much of the start and end of an oversized line is kept to find its request id.
const LINE_EDGE_KEPT: usize = 1024;

/// Buffer between the line filter and rmcp's reader.
const PIPE_BUFFER: usize = 64 * 1024;

/// What an error quotes of a server's own text, at most, in characters.
const QUOTED_CHARS: usize = 300;

/// One tool server, as the operator configured it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// ICE's name for the server: the `server` part of `Tool::"server/tool"`.
    pub name: String,
    /// How to reach it.
    pub transport: ServerTransport,
    /// Bound on spawning or connecting, the handshake and listing its tools.
    pub start_timeout: Duration,
    /// Bound on one `tools/call`.
    pub call_timeout: Duration,
    /// Bound on one result (its serialized JSON), in bytes; a larger one is
    /// [`ToolCallError::Oversized`].
    pub max_result_bytes: usize,
}

/// How a tool server is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerTransport {
    /// A child process speaking MCP on its stdin and stdout.
    Stdio {
        /// The program: a path, or a name looked up on `PATH`.
        program: String,
        /// Its arguments.
        args: Vec<String>,
        /// Environment variables it gets besides the few inherited ones.
        env: BTreeMap<String, String>,
        /// The directory it runs in (ICE's own when `None`).
        cwd: Option<PathBuf>,
    },
    /// A server speaking MCP's streamable HTTP transport at `url`.
    Http {
        /// The MCP endpoint, e.g. `http://127.0.0.1:3001/mcp`.
        url: String,
    },
}

/// One tool, as its server lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    /// ICE's name for the server.
    pub server: String,
    /// The tool's name.
    pub name: String,
    /// Its human-readable title (the tool's, else its annotations').
    pub title: Option<String>,
    /// Its description.
    pub description: Option<String>,
    /// The JSON Schema of its arguments.
    pub input_schema: Value,
    /// The JSON Schema of its structured result, if it declares one.
    pub output_schema: Option<Value>,
    /// Its annotations as the server sent them (untrusted).
    pub annotations: Option<Value>,
    /// The effect class its annotations claim, if they raise ICE's own ([`hint_from_annotations`]).
    pub hint: Option<EffectClass>,
}

/// The effect class a tool's annotations ask for, when they can only raise ICE's own.
///
/// An explicit `readOnlyHint: false`, `destructiveHint: true` or `openWorldHint: true` gives
/// `Some(External)`; anything else gives `None`. A hint can only raise ICE's own class, never
/// lower it, so a tool that calls itself read-only yields nothing.
pub fn hint_from_annotations(annotations: Option<&Value>) -> Option<EffectClass> {
    let annotations = annotations?.as_object()?;
    let explicit =
        |key: &str, value: bool| annotations.get(key).and_then(Value::as_bool) == Some(value);
    (explicit("readOnlyHint", false)
        || explicit("destructiveHint", true)
        || explicit("openWorldHint", true))
    .then_some(EffectClass::External)
}

/// What one completed `tools/call` returned.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCallOutput {
    /// The `CallToolResult` as JSON (`content`, `structuredContent`, `isError`, ...).
    pub result: Value,
    /// The tool's own `isError`: a tool-level failure, still a completed call.
    pub is_error: bool,
    /// The protocol version of the session that answered.
    pub protocol_version: String,
    /// How long the call took.
    pub elapsed: Duration,
    /// The size of `result` serialized as JSON, in bytes.
    pub bytes: usize,
}

/// Why a tool call did not complete.
///
/// Every variant's message is one sentence naming the server and tool (an authorization's names
/// the grant and the resource), fit to show an agent and to record.
#[derive(Debug, thiserror::Error)]
pub enum ToolCallError {
    /// The authorization does not cover this call; nothing was sent.
    #[error(transparent)]
    Authorization(AuthorizationError),
    /// No tool server has this name.
    #[error("no tool server named {0:?} is configured")]
    UnknownServer(String),
    /// The server does not list this tool.
    #[error("tool server {server:?} has no tool named {tool:?}")]
    UnknownTool {
        /// The server.
        server: String,
        /// The tool asked for.
        tool: String,
    },
    /// The server did not answer in time; the request was cancelled and the server stays in use.
    #[error(
        "tool server {server:?} did not answer the call to {tool:?} within {after:?}, so ICE \
         cancelled it"
    )]
    Timeout {
        /// The server.
        server: String,
        /// The tool.
        tool: String,
        /// The call timeout that ran out.
        after: Duration,
    },
    /// The server crashed, exited or disconnected before answering, or cannot be (re)started; a
    /// dead server is restarted for later calls.
    #[error("tool server {server:?} could not answer the call to {tool:?}: {detail}")]
    ServerGone {
        /// The server.
        server: String,
        /// The tool.
        tool: String,
        /// What happened to the server.
        detail: String,
    },
    /// The server is not running and is not (re)started now (it keeps dying, it could not
    /// be restarted, or the servers were shut down): the call was not sent.
    #[error(
        "tool server {server:?} is not running, so the call to {tool:?} was not sent: {detail}"
    )]
    NotRunning {
        /// The server.
        server: String,
        /// The tool.
        tool: String,
        /// Why it is not running.
        detail: String,
    },
    /// The result is larger than the call could take: the least of the server's
    /// `max_result_bytes`, what the grant's `max_bytes` left, and what the run's bytes budget
    /// reserved for it.
    #[error(
        "tool server {server:?} answered the call to {tool:?} with a result over the limit of \
         {limit} bytes ({}); the limit is the least of the server's max_result_bytes, what the \
         grant's max_bytes leaves and what the run's bytes budget reserved for the call", got_text(*.got)
    )]
    Oversized {
        /// The server.
        server: String,
        /// The tool.
        tool: String,
        /// The limit.
        limit: usize,
        /// The result's size, when it was read whole (`None`: the response was dropped as it
        /// streamed in, being over the transport's bound).
        got: Option<usize>,
    },
    /// The server answered with a JSON-RPC error, a malformed result, or a result ICE does not
    /// handle (a task, an input request it kept repeating).
    #[error("tool server {server:?} did not complete the call to {tool:?}: {detail}")]
    Protocol {
        /// The server.
        server: String,
        /// The tool.
        tool: String,
        /// What it answered.
        detail: String,
    },
}

fn got_text(got: Option<usize>) -> String {
    match got {
        Some(bytes) => format!("it was {bytes} bytes"),
        None => "it was too large to read: over the transport's bound".to_string(),
    }
}

impl From<AuthorizationError> for ToolCallError {
    fn from(e: AuthorizationError) -> ToolCallError {
        ToolCallError::Authorization(e)
    }
}

/// Why tool servers could not be started (or restarted). Every message is one sentence naming
/// the server.
#[derive(Debug, thiserror::Error)]
pub enum McpError {
    /// The configuration cannot work.
    #[error("tool server {server:?} is misconfigured: {problem}")]
    Config {
        /// The server.
        server: String,
        /// What is wrong.
        problem: String,
    },
    /// Its process could not be spawned.
    #[error("tool server {server:?} could not be started: running {program:?} failed: {source}")]
    Spawn {
        /// The server.
        server: String,
        /// The program.
        program: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// It did not finish starting within its `start_timeout`.
    #[error(
        "tool server {server:?} did not finish starting within {after:?}: {stage} took too long"
    )]
    Timeout {
        /// The server.
        server: String,
        /// The start timeout.
        after: Duration,
        /// The step that was still running.
        stage: &'static str,
    },
    /// The MCP handshake failed.
    #[error("tool server {server:?} failed the MCP handshake: {detail}")]
    Handshake {
        /// The server.
        server: String,
        /// What happened.
        detail: String,
    },
    /// Its tools could not be listed.
    #[error("tool server {server:?} could not list its tools: {detail}")]
    Tools {
        /// The server.
        server: String,
        /// What happened.
        detail: String,
    },
    /// The tool servers were shut down while it was starting.
    #[error("tool server {server:?} was shut down while it was starting")]
    ShutDown {
        /// The server.
        server: String,
    },
}

/// How long a streamable-HTTP server that let a call time out has to answer a `ping` before
/// its session is taken as lost.
const PING_WAIT: Duration = Duration::from_secs(2);

/// What the run's budget leaves one tool call ([`ToolServers::call_within`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct CallLimits {
    /// What the run's wall-time budget has left.
    pub time: Option<Duration>,
    /// The most result bytes the run's bytes budget reserved for the call.
    pub result_bytes: Option<u64>,
}

/// The longest line read from a stdio server whose results are bounded by `max_result_bytes`:
/// four times the bound (a result's JSON may be escaped more verbosely on the wire than ICE
/// serializes it) plus 64 KiB for the envelope, at least 1 MiB, at most 256 MiB.
pub fn line_bound(max_result_bytes: usize) -> usize {
    max_result_bytes
        .saturating_mul(4)
        .saturating_add(64 * 1024)
        .clamp(1024 * 1024, 256 * 1024 * 1024)
}

/// The tool servers the operator configured, started and supervised; shared by every session
/// (`Arc<ToolServers>`).
pub struct ToolServers {
    servers: Vec<Arc<ServerState>>,
}

impl fmt::Debug for ToolServers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ToolServers")
            .field("servers", &self.server_names())
            .finish()
    }
}

/// Restart policy (a knob so tests need not crash a server five times).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RestartPolicy {
    pub(crate) max_restarts: usize,
    pub(crate) window: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            max_restarts: MAX_RESTARTS_PER_MINUTE,
            window: Duration::from_secs(60),
        }
    }
}

impl ToolServers {
    /// Start every server (spawn or connect, handshake, `tools/list`), concurrently. The first
    /// failure is an error naming the server and why (command not found, handshake timeout, ...);
    /// the servers already started are stopped.
    pub async fn start(configs: Vec<ServerConfig>) -> Result<ToolServers, McpError> {
        ToolServers::start_with(configs, RestartPolicy::default()).await
    }

    pub(crate) async fn start_with(
        configs: Vec<ServerConfig>,
        policy: RestartPolicy,
    ) -> Result<ToolServers, McpError> {
        let mut names = std::collections::BTreeSet::new();
        for config in &configs {
            check_config(config)?;
            if !names.insert(config.name.clone()) {
                return Err(McpError::Config {
                    server: config.name.clone(),
                    problem: "another tool server has the same name".to_string(),
                });
            }
        }
        let nonce: Arc<str> = Arc::from(nonce());
        let states: Vec<Arc<ServerState>> = configs
            .into_iter()
            .map(|config| {
                Arc::new(ServerState {
                    line_bound: line_bound(config.max_result_bytes),
                    config,
                    policy,
                    nonce: nonce.clone(),
                    live: RwLock::new(Live::default()),
                    restarts: tokio::sync::Mutex::new(VecDeque::new()),
                })
            })
            .collect();
        let mut starting = tokio::task::JoinSet::new();
        let mut tasks = BTreeMap::new();
        for state in &states {
            let name = state.config.name.clone();
            let state = state.clone();
            let task = starting.spawn(async move { state.establish().await.map(|_| ()) });
            tasks.insert(task.id(), name);
        }
        let servers = ToolServers { servers: states };
        while let Some(joined) = starting.join_next_with_id().await {
            let failure = match joined {
                Ok((_, Ok(()))) => continue,
                Ok((_, Err(e))) => e,
                Err(e) => McpError::Handshake {
                    server: tasks.get(&e.id()).cloned().unwrap_or_default(),
                    detail: format!("starting it failed inside ICE: {e}"),
                },
            };
            // Dropping a start that is still running kills what it spawned.
            starting.abort_all();
            while starting.join_next().await.is_some() {}
            servers.shutdown().await;
            return Err(failure);
        }
        Ok(servers)
    }

    /// The names of the configured servers, in configuration order.
    pub fn server_names(&self) -> Vec<String> {
        self.servers.iter().map(|s| s.config.name.clone()).collect()
    }

    /// The current catalog: every server's tools, in configuration order, each server's in the
    /// order it lists them. A server that died keeps its last catalog until it is restarted.
    pub fn tools(&self) -> Vec<ToolSpec> {
        self.servers
            .iter()
            .flat_map(|s| s.live().tools.iter().cloned().collect::<Vec<_>>())
            .collect()
    }

    /// One tool of the current catalog.
    pub fn tool(&self, server: &str, tool: &str) -> Option<ToolSpec> {
        self.server(server)?.tool(tool)
    }

    /// The protocol version negotiated with `server` (the latest session's), e.g. `2025-11-25`.
    pub fn protocol_version(&self, server: &str) -> Option<String> {
        self.server(server)?.live().protocol.clone()
    }

    /// Call `tool` on `server` with `arguments`, under `auth` (`mcp.call` on exactly
    /// `Tool::"server/tool"`, for run `run`, with an effect class at least the tool's hint).
    /// Everything is checked before anything is sent.
    pub async fn call(
        &self,
        auth: &Authorization,
        run: &RunId,
        server: &str,
        tool: &str,
        arguments: Map<String, Value>,
    ) -> Result<ToolCallOutput, ToolCallError> {
        self.call_within(auth, run, server, tool, arguments, CallLimits::default())
            .await
    }

    /// [`Self::call`], bounded also by the run's `limits`, when those are less than the
    /// server's and the grant's bounds: a larger result is refused
    /// ([`ToolCallError::Oversized`]).
    pub async fn call_within(
        &self,
        auth: &Authorization,
        run: &RunId,
        server: &str,
        tool: &str,
        arguments: Map<String, Value>,
        limits: CallLimits,
    ) -> Result<ToolCallOutput, ToolCallError> {
        let CallLimits {
            time: within,
            result_bytes: result_within,
        } = limits;
        let resource = Resource::tool(server, tool).map_err(|_| match self.server(server) {
            None => ToolCallError::UnknownServer(server.to_string()),
            Some(_) => ToolCallError::UnknownTool {
                server: server.to_string(),
                tool: tool.to_string(),
            },
        })?;
        require(auth, "mcp.call", &resource)?;
        require_run(auth, run)?;
        let state = self
            .server(server)
            .ok_or_else(|| ToolCallError::UnknownServer(server.to_string()))?;
        let conn = state.connection(tool).await?;
        let spec = state.tool(tool).ok_or_else(|| ToolCallError::UnknownTool {
            server: server.to_string(),
            tool: tool.to_string(),
        })?;
        if let Some(hint) = spec.hint {
            require_effect(auth, hint)?;
        }
        // The grant's constraints can only tighten the server's bounds: arguments over its
        // `max_bytes` are refused before sending, the result gets what they left, and its
        // `timeout_ms` bounds the call.
        let sent = json_size(&arguments) as u64;
        require_bytes(auth, "the arguments", sent)?;
        let timeout = cap_time(auth, state.config.call_timeout);
        let bounds = Bounds {
            timeout: within.map_or(timeout, |w| timeout.min(w.max(Duration::from_millis(1)))),
            max_result_bytes: usize::try_from(
                cap_bytes(auth, sent, state.config.max_result_bytes as u64)
                    .min(result_within.unwrap_or(u64::MAX)),
            )
            .unwrap_or(usize::MAX),
        };
        state.perform(&conn, tool, arguments, bounds).await
    }

    /// Stop every server: close its session and stdin, then `SIGTERM` and `SIGKILL` its process
    /// group if it does not exit. Returns when every child has exited. Later calls get
    /// [`ToolCallError::NotRunning`].
    pub async fn shutdown(&self) {
        let mut stopping = tokio::task::JoinSet::new();
        for state in &self.servers {
            let conn = {
                let mut live = state.live_mut();
                live.shut_down = true;
                live.conn.take()
            };
            if let Some(conn) = conn {
                stopping.spawn(async move { conn.close().await });
            }
        }
        while stopping.join_next().await.is_some() {}
    }

    /// The most bytes `server`'s results may have (its `max_result_bytes`).
    pub fn max_result_bytes(&self, server: &str) -> Option<u64> {
        Some(self.server(server)?.config.max_result_bytes as u64)
    }

    fn server(&self, name: &str) -> Option<&Arc<ServerState>> {
        self.servers.iter().find(|s| s.config.name == name)
    }

    /// The process id of a stdio server's current child (tests check it is gone after shutdown).
    #[cfg(test)]
    pub(crate) fn child_pid(&self, server: &str) -> Option<u32> {
        let state = self.server(server)?;
        let conn = state.live().conn.clone()?;
        conn.child.as_ref()?.pid
    }
}

fn check_config(config: &ServerConfig) -> Result<(), McpError> {
    let bad = |problem: String| McpError::Config {
        server: config.name.clone(),
        problem,
    };
    if let Err(e) = Resource::tool(&config.name, "tool") {
        return Err(bad(format!("its name cannot name tools: {e}")));
    }
    if config.start_timeout.is_zero() || config.call_timeout.is_zero() {
        return Err(bad("its timeouts must be above zero".to_string()));
    }
    if config.max_result_bytes == 0 {
        return Err(bad("max_result_bytes must be above zero".to_string()));
    }
    match &config.transport {
        ServerTransport::Stdio { program, .. } if program.is_empty() => {
            Err(bad("its program is empty".to_string()))
        }
        ServerTransport::Stdio { .. } => Ok(()),
        ServerTransport::Http { url } => match url::Url::parse(url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => Ok(()),
            Ok(u) => Err(bad(format!(
                "its URL has scheme {:?}, not http or https",
                u.scheme()
            ))),
            Err(e) => Err(bad(format!("its URL {url:?} does not parse: {e}"))),
        },
    }
}

/// A value that makes ICE's own oversized-response marker hard for a server to forge.
fn nonce() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

/// One configured server: its config, its current session, its catalog.
struct ServerState {
    config: ServerConfig,
    line_bound: usize,
    policy: RestartPolicy,
    nonce: Arc<str>,
    live: RwLock<Live>,
    /// When it was restarted recently (held while restarting, so one call restarts it).
    restarts: tokio::sync::Mutex<VecDeque<Instant>>,
}

#[derive(Default)]
struct Live {
    conn: Option<Arc<Connection>>,
    tools: Arc<Vec<ToolSpec>>,
    protocol: Option<String>,
    shut_down: bool,
}

impl ServerState {
    fn live(&self) -> std::sync::RwLockReadGuard<'_, Live> {
        self.live.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn live_mut(&self) -> std::sync::RwLockWriteGuard<'_, Live> {
        self.live.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn tool(&self, tool: &str) -> Option<ToolSpec> {
        self.live().tools.iter().find(|t| t.name == tool).cloned()
    }

    /// A call that got no answer within `after`. A streamable-HTTP server has no process to
    /// watch: one that stopped or restarted (forgetting the session) leaves every later call
    /// waiting out its whole timeout. So it is pinged; if it does not answer that either, the
    /// session is lost: the call is `ServerGone` and the next call connects afresh. A slow tool
    /// on a server that still answers is a timeout, as on stdio.
    async fn timed_out(&self, conn: &Connection, tool: &str, after: Duration) -> ToolCallError {
        // The ping is bounded by half the call's own bound (which the run's time budget may
        // have cut), so it adds little past it.
        let wait = PING_WAIT.min(after / 2);
        if conn.child.is_none() && !conn.answers_ping(wait).await {
            conn.mark_dead();
            return self.gone(
                tool,
                format!(
                    "it did not answer within {} ms, nor a ping within {} ms after that: its session is taken as lost (the server stopped, restarted and forgot the session, or is too busy to answer anything) and the next call connects afresh",
                    after.as_millis(),
                    wait.as_millis()
                ),
            );
        }
        ToolCallError::Timeout {
            server: self.config.name.clone(),
            tool: tool.to_string(),
            after,
        }
    }

    fn gone(&self, tool: &str, detail: String) -> ToolCallError {
        ToolCallError::ServerGone {
            server: self.config.name.clone(),
            tool: tool.to_string(),
            detail,
        }
    }

    fn not_running(&self, tool: &str, detail: String) -> ToolCallError {
        ToolCallError::NotRunning {
            server: self.config.name.clone(),
            tool: tool.to_string(),
            detail,
        }
    }

    /// The live session, if any.
    fn alive(&self, tool: &str) -> Result<Option<Arc<Connection>>, ToolCallError> {
        let live = self.live();
        if live.shut_down {
            return Err(self.not_running(tool, "the tool servers have been shut down".to_string()));
        }
        Ok(live.conn.clone().filter(|c| c.is_alive()))
    }

    /// The live session, restarting the server if it died.
    async fn connection(self: &Arc<Self>, tool: &str) -> Result<Arc<Connection>, ToolCallError> {
        if let Some(conn) = self.alive(tool)? {
            return Ok(conn);
        }
        let mut restarts = self.restarts.lock().await;
        // Another call may have restarted it meanwhile.
        if let Some(conn) = self.alive(tool)? {
            return Ok(conn);
        }
        let now = Instant::now();
        while restarts
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.policy.window)
        {
            restarts.pop_front();
        }
        if restarts.len() >= self.policy.max_restarts {
            let wait = restarts
                .front()
                .map(|t| self.policy.window.saturating_sub(now.duration_since(*t)))
                .unwrap_or_default();
            return Err(self.not_running(
                tool,
                format!(
                    "it keeps dying (restarted {} time(s) in the last {}s) and is not restarted \
                     again for {}s",
                    restarts.len(),
                    self.policy.window.as_secs(),
                    wait.as_secs() + 1
                ),
            ));
        }
        restarts.push_back(now);
        let old = self.live_mut().conn.take();
        if let Some(old) = old {
            old.abort();
        }
        self.establish().await.map_err(|e| {
            self.not_running(tool, format!("it stopped and could not be restarted ({e})"))
        })
    }

    /// Start a session (within `start_timeout`) and make it the current one.
    async fn establish(self: &Arc<Self>) -> Result<Arc<Connection>, McpError> {
        let stage = Mutex::new("starting it");
        let connecting = connect(&self.config, self.line_bound, &self.nonce, &stage);
        let (conn, tools, changed) =
            match tokio::time::timeout(self.config.start_timeout, connecting).await {
                Ok(result) => result?,
                Err(_) => {
                    return Err(McpError::Timeout {
                        server: self.config.name.clone(),
                        after: self.config.start_timeout,
                        stage: *stage.lock().unwrap_or_else(PoisonError::into_inner),
                    });
                }
            };
        let conn = Arc::new(conn);
        {
            let mut live = self.live_mut();
            if live.shut_down {
                drop(live);
                conn.abort();
                return Err(McpError::ShutDown {
                    server: self.config.name.clone(),
                });
            }
            live.conn = Some(conn.clone());
            live.tools = Arc::new(tools);
            live.protocol = Some(conn.protocol_version.clone());
        }
        tokio::spawn(refresh_on_change(
            Arc::downgrade(self),
            Arc::downgrade(&conn),
            changed,
        ));
        Ok(conn)
    }

    /// One `tools/call` on `conn`, within `bounds`.
    async fn perform(
        &self,
        conn: &Connection,
        tool: &str,
        arguments: Map<String, Value>,
        bounds: Bounds,
    ) -> Result<ToolCallOutput, ToolCallError> {
        let started = Instant::now();
        let params = CallToolRequestParams::new(tool.to_string()).with_arguments(arguments);
        let calling = conn
            .service
            .call_tool_with_mrtr_max_rounds(params, MAX_INPUT_ROUNDS);
        // Dropping the call on timeout makes rmcp send notifications/cancelled for it.
        let answer = match tokio::time::timeout(bounds.timeout, calling).await {
            Ok(answer) => answer,
            Err(_) => return Err(self.timed_out(conn, tool, bounds.timeout).await),
        };
        let protocol = |detail: String| ToolCallError::Protocol {
            server: self.config.name.clone(),
            tool: tool.to_string(),
            detail,
        };
        let oversized = |got: Option<usize>| ToolCallError::Oversized {
            server: self.config.name.clone(),
            tool: tool.to_string(),
            limit: bounds.max_result_bytes,
            got,
        };
        let result = match answer {
            Ok(result) => result,
            Err(ServiceError::McpError(error)) if self.is_own_oversized_marker(&error) => {
                return Err(oversized(None));
            }
            Err(ServiceError::McpError(error)) => {
                return Err(protocol(format!(
                    "it answered with JSON-RPC error {}: {}",
                    error.code.0,
                    quoted(&error.message)
                )));
            }
            Err(ServiceError::TransportSend(error)) if over_http_bound(&error) => {
                return Err(oversized(None));
            }
            Err(e @ (ServiceError::TransportClosed | ServiceError::TransportSend(_))) => {
                conn.mark_dead();
                let detail = conn.gone_detail(&e).await;
                return Err(self.gone(
                    tool,
                    format!(
                        "{detail}; ICE restarts it for the next call (at most {} times in {}s)",
                        self.policy.max_restarts,
                        self.policy.window.as_secs()
                    ),
                ));
            }
            Err(ServiceError::Timeout { timeout }) => {
                return Err(self.timed_out(conn, tool, timeout).await);
            }
            Err(ServiceError::UnexpectedResponse) => {
                return Err(protocol(
                    "its answer is not a complete CallToolResult (a task, an input request, or \
                     a malformed result)"
                        .to_string(),
                ));
            }
            Err(ServiceError::InputRequiredRoundsExceeded { max_rounds }) => {
                return Err(protocol(format!(
                    "it still asked for input after {max_rounds} rounds of ICE declining"
                )));
            }
            Err(ServiceError::Cancelled { reason }) => {
                return Err(protocol(format!(
                    "the request was cancelled ({})",
                    quoted(reason.as_deref().unwrap_or("no reason given"))
                )));
            }
            Err(e) => return Err(protocol(quoted(&e.to_string()))),
        };
        if result
            .result_type
            .as_ref()
            .is_some_and(|t| !t.is_complete())
        {
            return Err(protocol(
                "its result is not of type \"complete\"".to_string(),
            ));
        }
        let is_error = result.is_error.unwrap_or(false);
        let result = serde_json::to_value(&result)
            .map_err(|e| protocol(format!("its result cannot be represented as JSON: {e}")))?;
        let bytes = json_size(&result);
        if bytes > bounds.max_result_bytes {
            return Err(oversized(Some(bytes)));
        }
        Ok(ToolCallOutput {
            result,
            is_error,
            protocol_version: conn.protocol_version.clone(),
            elapsed: started.elapsed(),
            bytes,
        })
    }

    fn is_own_oversized_marker(&self, error: &ErrorData) -> bool {
        error
            .data
            .as_ref()
            .and_then(|d| d.get("iceOversized"))
            .and_then(|o| o.get("nonce"))
            .and_then(Value::as_str)
            == Some(&*self.nonce)
    }
}

/// Whether an HTTP transport error is a response over the configured size bounds.
fn over_http_bound(error: &rmcp::transport::DynamicTransportError) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&*error.error);
    while let Some(e) = source {
        let text = e.to_string();
        if text.contains("exceeded the maximum size") {
            return true;
        }
        source = e.source();
    }
    false
}

/// What one call may take: the server's bounds, tightened by the grant's constraints.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    timeout: Duration,
    max_result_bytes: usize,
}

/// The size of `value` serialized as JSON.
fn json_size(value: &impl serde::Serialize) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

/// A server's own text, made fit for a one-line message: control characters become spaces, and
/// it is cut to [`QUOTED_CHARS`] characters.
fn quoted(text: &str) -> String {
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(QUOTED_CHARS)
        .collect();
    if text.chars().count() > QUOTED_CHARS {
        out.push('…');
    }
    out.trim().to_string()
}

/// Keep a server's catalog current when it says its tools changed.
async fn refresh_on_change(
    state: Weak<ServerState>,
    conn: Weak<Connection>,
    mut changed: mpsc::Receiver<()>,
) {
    while changed.recv().await.is_some() {
        let (Some(state), Some(conn)) = (state.upgrade(), conn.upgrade()) else {
            return;
        };
        let listing = list_tools(&state.config.name, &conn.service);
        let Ok(Ok(tools)) = tokio::time::timeout(state.config.start_timeout, listing).await else {
            continue;
        };
        let mut live = state.live_mut();
        if live.conn.as_ref().is_some_and(|c| Arc::ptr_eq(c, &conn)) {
            live.tools = Arc::new(tools);
        }
    }
}

/// ICE's side of a session: it declines what servers ask of clients.
#[derive(Clone)]
struct IceClient {
    /// Told when the server's tools changed.
    changed: mpsc::Sender<()>,
}

#[allow(deprecated)] // sampling and roots are deprecated by SEP-2577, yet servers may still ask
impl ClientHandler for IceClient {
    fn get_info(&self) -> ClientConfig {
        ClientConfig::new(
            ClientCapabilities::default(),
            Implementation::new("ice", env!("CARGO_PKG_VERSION")),
        )
        .with_protocol_version(ProtocolVersion::LATEST_WITH_INITIALIZE)
    }

    async fn create_message(
        &self,
        _params: rmcp::model::CreateMessageRequestParams,
        _context: RequestContext<RoleClient>,
    ) -> Result<rmcp::model::CreateMessageResult, ErrorData> {
        Err(ErrorData::new(
            ErrorCode::METHOD_NOT_FOUND,
            "ICE does not forward sampling requests from tool servers",
            None,
        ))
    }

    async fn list_roots(
        &self,
        _context: RequestContext<RoleClient>,
    ) -> Result<rmcp::model::ListRootsResult, ErrorData> {
        Ok(rmcp::model::ListRootsResult::default())
    }

    async fn create_elicitation(
        &self,
        _request: ElicitRequestParams,
        _context: RequestContext<RoleClient>,
    ) -> Result<ElicitResult, ErrorData> {
        Ok(ElicitResult::new(ElicitationAction::Decline))
    }

    async fn on_tool_list_changed(&self, _context: rmcp::service::NotificationContext<RoleClient>) {
        let _ = self.changed.try_send(());
    }
}

/// One session with a server (and, for stdio, its process).
struct Connection {
    service: RunningService<RoleClient, IceClient>,
    protocol_version: String,
    child: Option<ChildProc>,
    /// Set when a call found the session broken (HTTP has no process to watch).
    dead: std::sync::atomic::AtomicBool,
}

impl Connection {
    fn is_alive(&self) -> bool {
        !self.dead.load(std::sync::atomic::Ordering::Relaxed)
            && !self.service.is_transport_closed()
            && self.child.as_ref().is_none_or(|c| c.ended().is_none())
    }

    fn mark_dead(&self) {
        self.dead.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the server answers a `ping` within `wait` (an error answer is an answer: a
    /// server that does not implement `ping` is there all the same).
    async fn answers_ping(&self, wait: Duration) -> bool {
        let ping = rmcp::model::ClientRequest::PingRequest(rmcp::model::PingRequest {
            method: Default::default(),
            extensions: Default::default(),
        });
        matches!(
            tokio::time::timeout(wait, self.service.send_request(ping)).await,
            Ok(Ok(_) | Err(ServiceError::McpError(_)))
        )
    }

    /// Stop at once: end the session and kill the process group.
    fn abort(&self) {
        self.mark_dead();
        self.service.cancellation_token().cancel();
        if let Some(child) = &self.child {
            child.kill();
        }
    }

    /// Stop gracefully: end the session (closing the child's stdin), then TERM and KILL the
    /// process group if it lingers; returns when the child has exited.
    async fn close(&self) {
        self.mark_dead();
        self.service.cancellation_token().cancel();
        if let Some(child) = &self.child {
            child.stop().await;
        }
    }

    /// What happened to the server, for a call that lost it.
    async fn gone_detail(&self, error: &ServiceError) -> String {
        let Some(child) = &self.child else {
            return match error {
                ServiceError::TransportSend(e) => format!(
                    "the connection to it failed before it answered ({})",
                    quoted(&error_chain(&*e.error))
                ),
                _ => "the connection to it closed before it answered".to_string(),
            };
        };
        match child.wait_ended(EXIT_STATUS_WAIT).await {
            Some(how) => format!(
                "its process {how} before answering{}",
                child.stderr_note().await
            ),
            None => "it closed its end of the connection before answering".to_string(),
        }
    }
}

/// A stdio server's process, supervised by a task that reaps it.
struct ChildProc {
    pid: Option<u32>,
    /// How the process ended, once it has.
    ended: watch::Receiver<Option<String>>,
    stop: Mutex<Option<oneshot::Sender<()>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    /// Whether its stderr has been read to the end.
    stderr_read: watch::Receiver<bool>,
}

impl ChildProc {
    fn supervise(mut child: Child, stderr: Option<ChildStderr>) -> ChildProc {
        let pid = child.id();
        if let Some(pid) = pid {
            crate::children::track_group(pid);
        }
        let (ended_tx, ended) = watch::channel(None);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let tail = Arc::new(Mutex::new(Vec::new()));
        let (read_tx, stderr_read) = watch::channel(false);
        match stderr {
            Some(stderr) => {
                tokio::spawn(keep_tail(stderr, tail.clone(), read_tx));
            }
            None => {
                let _ = read_tx.send(true);
            }
        }
        tokio::spawn(async move {
            let status = tokio::select! {
                status = child.wait() => status,
                _ = stop_rx => {
                    match tokio::time::timeout(EXIT_GRACE, child.wait()).await {
                        Ok(status) => status,
                        Err(_) => {
                            signal_group(pid, rustix::process::Signal::TERM);
                            match tokio::time::timeout(EXIT_GRACE, child.wait()).await {
                                Ok(status) => status,
                                Err(_) => {
                                    signal_group(pid, rustix::process::Signal::KILL);
                                    child.wait().await
                                }
                            }
                        }
                    }
                }
            };
            // Whatever it started in its group goes with it.
            signal_group(pid, rustix::process::Signal::KILL);
            if let Some(pid) = pid {
                crate::children::untrack(pid);
            }
            let _ = ended_tx.send(Some(describe_exit(status)));
        });
        ChildProc {
            pid,
            ended,
            stop: Mutex::new(Some(stop_tx)),
            stderr: tail,
            stderr_read,
        }
    }

    fn ended(&self) -> Option<String> {
        self.ended.borrow().clone()
    }

    async fn wait_ended(&self, at_most: Duration) -> Option<String> {
        let mut ended = self.ended.clone();
        let waited = tokio::time::timeout(at_most, ended.wait_for(Option::is_some)).await;
        match waited {
            Ok(Ok(how)) => how.clone(),
            _ => self.ended(),
        }
    }

    fn kill(&self) {
        if self.ended().is_none() {
            signal_group(self.pid, rustix::process::Signal::KILL);
        }
    }

    async fn stop(&self) {
        let stop = self
            .stop
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(stop) = stop {
            let _ = stop.send(());
        }
        // The supervisor escalates to SIGKILL after two grace periods; wait a little beyond.
        self.wait_ended(EXIT_GRACE * 3).await;
    }

    /// The last line the process wrote to stderr, as a clause (waiting briefly for the pipe to
    /// be read to its end: the process may have exited a moment before).
    async fn stderr_note(&self) -> String {
        let mut read = self.stderr_read.clone();
        let _ = tokio::time::timeout(EXIT_STATUS_WAIT, read.wait_for(|done| *done)).await;
        let tail = self.stderr.lock().unwrap_or_else(PoisonError::into_inner);
        let text = String::from_utf8_lossy(&tail);
        match text.lines().rev().find(|l| !l.trim().is_empty()) {
            Some(line) => format!(" (its stderr ended with: {})", quoted(line)),
            None => String::new(),
        }
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn signal_group(pid: Option<u32>, signal: rustix::process::Signal) {
    let pid = pid
        .and_then(|p| i32::try_from(p).ok())
        .and_then(rustix::process::Pid::from_raw);
    if let Some(pid) = pid {
        let _ = rustix::process::kill_process_group(pid, signal);
    }
}

fn describe_exit(status: std::io::Result<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(signal)) => format!("was killed by signal {signal}"),
            (None, None) => "ended".to_string(),
        },
        Err(e) => format!("ended (waiting for it failed: {e})"),
    }
}

/// Read a child's stderr to its end, keeping the last [`STDERR_KEPT`] bytes.
async fn keep_tail(mut stderr: ChildStderr, tail: Arc<Mutex<Vec<u8>>>, done: watch::Sender<bool>) {
    let mut buf = vec![0u8; 8192];
    loop {
        let n = match stderr.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = done.send(true);
                return;
            }
            Ok(n) => n,
        };
        let mut tail = tail.lock().unwrap_or_else(PoisonError::into_inner);
        keep_last(&mut tail, &buf[..n], STDERR_KEPT);
    }
}

/// Append `bytes` to `kept`, keeping only its last `max` bytes.
fn keep_last(kept: &mut Vec<u8>, bytes: &[u8], max: usize) {
    if bytes.len() >= max {
        kept.clear();
        kept.extend_from_slice(&bytes[bytes.len() - max..]);
    } else {
        kept.extend_from_slice(bytes);
        if kept.len() > max {
            kept.drain(..kept.len() - max);
        }
    }
}

fn lifecycle() -> ClientLifecycleMode {
    ClientLifecycleMode::Auto {
        preferred_versions: vec![ProtocolVersion::V_2026_07_28],
        legacy_version: Some(ProtocolVersion::V_2025_11_25),
    }
}

fn set_stage(stage: &Mutex<&'static str>, now: &'static str) {
    *stage.lock().unwrap_or_else(PoisonError::into_inner) = now;
}

/// Start a stdio server's process (in a process group of its own, with only the inherited
/// environment ICE passes), its stdout filtered into the transport.
fn spawn_stdio(
    config: &ServerConfig,
    line_bound: usize,
    nonce: &Arc<str>,
) -> Result<
    (
        AsyncRwTransport<RoleClient, tokio::io::DuplexStream, tokio::process::ChildStdin>,
        ChildProc,
    ),
    McpError,
> {
    let ServerTransport::Stdio {
        program,
        args,
        env,
        cwd,
    } = &config.transport
    else {
        return Err(McpError::Handshake {
            server: config.name.clone(),
            detail: "it is not a stdio server".to_string(),
        });
    };
    let mut command = Command::new(program);
    command
        .args(args)
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    for name in INHERITED_ENV {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    command.envs(env);
    if let Some(cwd) = cwd {
        command.current_dir(cwd);
    }
    let mut spawned = command.spawn().map_err(|source| McpError::Spawn {
        server: config.name.clone(),
        program: program.clone(),
        source,
    })?;
    let (Some(stdin), Some(stdout)) = (spawned.stdin.take(), spawned.stdout.take()) else {
        return Err(McpError::Handshake {
            server: config.name.clone(),
            detail: "its stdio pipes are missing".to_string(),
        });
    };
    let stderr = spawned.stderr.take();
    let child = ChildProc::supervise(spawned, stderr);
    let (filtered_in, filtered_out) = tokio::io::duplex(PIPE_BUFFER);
    tokio::spawn(filter_lines(stdout, filtered_in, line_bound, nonce.clone()));
    let transport = AsyncRwTransport::new(filtered_out, stdin)
        .with_max_line_length(line_bound.saturating_add(4096));
    Ok((transport, child))
}

/// Whether a handshake failed because an answer to the discovery probe came after rmcp had
/// given up on it and moved on to `initialize` (the one answer arriving in the other's place),
/// and if so how to open the next time: a late refusal is a legacy server's (`initialize`), a
/// late result a 2026-07-28 server's (`server/discover`, with no deadline of rmcp's own).
fn answered_too_late(e: &rmcp::service::ClientInitializeError) -> Option<ClientLifecycleMode> {
    use rmcp::service::ClientInitializeError as E;
    match e {
        E::UncorrelatedErrorResponse { .. } => Some(ClientLifecycleMode::Initialize),
        E::ConflictInitResponseId(..) => Some(ClientLifecycleMode::Discover {
            preferred_versions: vec![ProtocolVersion::V_2026_07_28],
        }),
        _ => None,
    }
}

/// Spawn or connect, handshake, list tools. Everything it started is dropped (and killed) if
/// the future is.
async fn connect(
    config: &ServerConfig,
    line_bound: usize,
    nonce: &Arc<str>,
    stage: &Mutex<&'static str>,
) -> Result<(Connection, Vec<ToolSpec>, mpsc::Receiver<()>), McpError> {
    let server = config.name.clone();
    let (changed_tx, changed) = mpsc::channel(1);
    let client = IceClient {
        changed: changed_tx,
    };
    let handshake_error = |detail: String| McpError::Handshake {
        server: server.clone(),
        detail,
    };
    let (service, child) = match &config.transport {
        ServerTransport::Stdio { .. } => {
            let mut mode = lifecycle();
            let mut late = None;
            loop {
                set_stage(stage, "starting its process");
                let (transport, child) = spawn_stdio(config, line_bound, nonce)?;
                set_stage(stage, "the MCP handshake");
                match client
                    .clone()
                    .serve_with_lifecycle(transport, mode.clone())
                    .await
                {
                    Ok(service) => break (service, Some(child)),
                    Err(e) if late.is_none() && answered_too_late(&e).is_some() => {
                        // rmcp gives a `server/discover` probe 10 s, then sends `initialize`;
                        // a server slower than that to start (a first `npx` download, a
                        // loaded machine) answers the probe late, and that answer breaks the
                        // handshake. Start it again and open the way its answer showed.
                        mode = answered_too_late(&e).unwrap_or(ClientLifecycleMode::Initialize);
                        late = Some(error_chain(&e));
                        child.kill();
                        child.wait_ended(EXIT_GRACE).await;
                    }
                    Err(e) => {
                        let mut detail = quoted(&error_chain(&e));
                        if let Some(how) = child.wait_ended(EXIT_STATUS_WAIT).await {
                            detail = format!(
                                "its process {how}{}; the handshake reported: {detail}",
                                child.stderr_note().await
                            );
                        }
                        if let Some(first) = &late {
                            detail.push_str(&format!(
                                "; a first start answered the discovery probe too late ({})",
                                quoted(first)
                            ));
                        }
                        return Err(handshake_error(detail));
                    }
                }
            }
        }
        ServerTransport::Http { url } => {
            set_stage(stage, "connecting and the MCP handshake");
            let transport_config = StreamableHttpClientTransportConfig::with_uri(url.as_str())
                .max_json_response_size(line_bound)
                .max_sse_event_size(line_bound);
            // reqwest is built without a TLS crypto provider of its own (see the workspace's
            // Cargo.toml): ring, unless the process installed one already.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let transport = StreamableHttpClientTransport::from_config(transport_config);
            match client.serve_with_lifecycle(transport, lifecycle()).await {
                Ok(service) => (service, None),
                Err(e) => {
                    return Err(handshake_error(format!(
                        "at {url}: {}",
                        quoted(&error_chain(&e))
                    )));
                }
            }
        }
    };
    let protocol_version = service
        .peer_info()
        .map(|info| info.protocol_version.to_string())
        .unwrap_or_default();
    set_stage(stage, "listing its tools");
    let tools = list_tools(&config.name, &service).await?;
    let conn = Connection {
        service,
        protocol_version,
        child,
        dead: std::sync::atomic::AtomicBool::new(false),
    };
    Ok((conn, tools, changed))
}

/// An error and its sources, as one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

/// Every tool the server lists (following pages), as ICE's catalog entries. A tool whose name
/// cannot form `Tool::"server/tool"` cannot be authorized, and is left out.
async fn list_tools(
    server: &str,
    service: &RunningService<RoleClient, IceClient>,
) -> Result<Vec<ToolSpec>, McpError> {
    let failed = |detail: String| McpError::Tools {
        server: server.to_string(),
        detail,
    };
    let mut tools: Vec<ToolSpec> = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..MAX_TOOL_PAGES {
        let params = PaginatedRequestParams::default().with_cursor(cursor.take());
        let page = service
            .list_tools(Some(params))
            .await
            .map_err(|e| failed(quoted(&e.to_string())))?;
        for tool in page.tools {
            if Resource::tool(server, &tool.name).is_err()
                || tools.iter().any(|t| t.name == tool.name)
            {
                continue;
            }
            if tools.len() == MAX_TOOLS_PER_SERVER {
                return Err(failed(format!(
                    "it lists more than {MAX_TOOLS_PER_SERVER} tools"
                )));
            }
            tools.push(tool_spec(server, tool));
        }
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => return Ok(tools),
        }
    }
    Err(failed(format!(
        "its tools/list runs to more than {MAX_TOOL_PAGES} pages"
    )))
}

fn tool_spec(server: &str, tool: Tool) -> ToolSpec {
    let annotations = tool
        .annotations
        .as_ref()
        .and_then(|a| serde_json::to_value(a).ok());
    let annotated_title = tool.annotations.as_ref().and_then(|a| a.title.clone());
    ToolSpec {
        server: server.to_string(),
        name: tool.name.into_owned(),
        title: tool.title.or(annotated_title),
        description: tool.description.map(Cow::into_owned),
        input_schema: Value::Object((*tool.input_schema).clone()),
        output_schema: tool.output_schema.map(|s| Value::Object((*s).clone())),
        hint: hint_from_annotations(annotations.as_ref()),
        annotations,
    }
}

/// Copy a stdio server's output to rmcp line by line, never holding more than `bound` bytes of
/// one line. An over-long line is dropped as it streams in; when it is a response whose id can
/// be read from its first or last kilobyte, a JSON-RPC error marked with ICE's `nonce` takes
/// its place, so its call fails as oversized instead of waiting for its timeout.
async fn filter_lines(
    stdout: ChildStdout,
    mut out: tokio::io::DuplexStream,
    bound: usize,
    nonce: Arc<str>,
) {
    struct Dropped {
        head: Vec<u8>,
        tail: Vec<u8>,
        bytes: usize,
    }
    let mut reader = BufReader::with_capacity(PIPE_BUFFER, stdout);
    let mut line: Vec<u8> = Vec::new();
    let mut dropped: Option<Dropped> = None;
    loop {
        let (take, ends_line) = {
            let buf = match reader.fill_buf().await {
                Ok(buf) if !buf.is_empty() => buf,
                _ => return,
            };
            let newline = buf.iter().position(|b| *b == b'\n');
            let take = newline.map_or(buf.len(), |i| i + 1);
            let chunk = &buf[..take];
            if let Some(d) = dropped.as_mut() {
                d.bytes = d.bytes.saturating_add(take);
                keep_last(&mut d.tail, chunk, LINE_EDGE_KEPT);
            } else if line.len().saturating_add(take) > bound {
                let mut d = Dropped {
                    head: Vec::new(),
                    tail: Vec::new(),
                    bytes: line.len() + take,
                };
                let from_line = line.len().min(LINE_EDGE_KEPT);
                d.head.extend_from_slice(&line[..from_line]);
                let from_chunk = chunk.len().min(LINE_EDGE_KEPT - from_line);
                d.head.extend_from_slice(&chunk[..from_chunk]);
                keep_last(&mut d.tail, &line, LINE_EDGE_KEPT);
                keep_last(&mut d.tail, chunk, LINE_EDGE_KEPT);
                line = Vec::new();
                dropped = Some(d);
            } else {
                line.extend_from_slice(chunk);
            }
            (take, newline.is_some())
        };
        reader.consume(take);
        if !ends_line {
            continue;
        }
        let written = match dropped.take() {
            Some(d) => match oversized_error(&d.head, &d.tail, d.bytes, bound, &nonce) {
                Some(error) => out.write_all(&error).await,
                None => Ok(()),
            },
            None => out.write_all(&line).await,
        };
        if written.is_err() {
            return;
        }
        line.clear();
        if line.capacity() > 1024 * 1024 {
            line = Vec::new();
        }
    }
}

/// The JSON-RPC error line that replaces a dropped response, if the dropped line was a response
/// and its id can be read.
pub(crate) fn oversized_error(
    head: &[u8],
    tail: &[u8],
    bytes: usize,
    bound: usize,
    nonce: &str,
) -> Option<Vec<u8>> {
    let tail = tail.strip_suffix(b"\n").unwrap_or(tail);
    let tail = tail.strip_suffix(b"\r").unwrap_or(tail);
    let mut members = leading_members(head);
    members.extend(trailing_members(tail));
    if members.iter().any(|(k, _)| k == b"\"method\"") {
        return None;
    }
    let (_, id) = members.iter().find(|(k, _)| k == b"\"id\"")?;
    let id: Value = serde_json::from_slice(id).ok()?;
    if !(id.is_number() || id.is_string()) {
        return None;
    }
    let error = serde_json::json!({
        "jsonrpc": "2.0",
        "id": id,
        "error": {
            "code": -32001,
            "message": format!("ICE dropped this {bytes}-byte response: over its bound of {bound} bytes"),
            "data": { "iceOversized": { "nonce": nonce, "bytes": bytes } },
        },
    });
    let mut line = serde_json::to_vec(&error).ok()?;
    line.push(b'\n');
    Some(line)
}

/// A scanner for the few JSON shapes an oversized line's edges need.
struct Scan<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Scan<'a> {
    fn ws(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b'\r' | b'\n') {
            self.i += 1;
        }
    }

    fn eat(&mut self, b: u8) -> bool {
        if self.s.get(self.i) == Some(&b) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn at_end(&self) -> bool {
        self.i == self.s.len()
    }

    /// A string, quotes included.
    fn string(&mut self) -> Option<&'a [u8]> {
        let start = self.i;
        if !self.eat(b'"') {
            return None;
        }
        while self.i < self.s.len() {
            match self.s[self.i] {
                b'\\' => self.i += 2,
                b'"' => {
                    self.i += 1;
                    return Some(&self.s[start..self.i]);
                }
                _ => self.i += 1,
            }
        }
        None
    }

    /// A string, number or literal (not an object or array).
    fn scalar(&mut self) -> Option<&'a [u8]> {
        match self.s.get(self.i)? {
            b'"' => self.string(),
            b'-' | b'0'..=b'9' => {
                let start = self.i;
                while self.i < self.s.len()
                    && matches!(
                        self.s[self.i],
                        b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'
                    )
                {
                    self.i += 1;
                }
                Some(&self.s[start..self.i])
            }
            b't' | b'f' | b'n' => {
                for literal in [&b"true"[..], b"false", b"null"] {
                    if self.s[self.i..].starts_with(literal) {
                        self.i += literal.len();
                        return Some(literal);
                    }
                }
                None
            }
            _ => None,
        }
    }

    /// `"key": scalar`.
    fn member(&mut self) -> Option<(Vec<u8>, Vec<u8>)> {
        self.ws();
        let key = self.string()?;
        self.ws();
        if !self.eat(b':') {
            return None;
        }
        self.ws();
        let value = self.scalar()?;
        Some((key.to_vec(), value.to_vec()))
    }
}

/// The scalar members an object opens with, up to its first object or array value (or the end
/// of what was kept).
fn leading_members(head: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut scan = Scan { s: head, i: 0 };
    let mut members = Vec::new();
    scan.ws();
    if !scan.eat(b'{') {
        return members;
    }
    while let Some(member) = scan.member() {
        members.push(member);
        scan.ws();
        if !scan.eat(b',') {
            break;
        }
    }
    members
}

/// The scalar members an object closes with: the longest run `,"k":v,...}` that ends `tail`.
/// (A run inside a nested value cannot end the line: its object's `}` is followed by more.)
fn trailing_members(tail: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    for start in (0..tail.len()).filter(|i| tail[*i] == b',') {
        let mut scan = Scan {
            s: &tail[start + 1..],
            i: 0,
        };
        let mut members = Vec::new();
        while let Some(member) = scan.member() {
            members.push(member);
            scan.ws();
            if scan.eat(b',') {
                continue;
            }
            if scan.eat(b'}') {
                scan.ws();
                if scan.at_end() {
                    return members;
                }
            }
            break;
        }
    }
    Vec::new()
}
