//! The MCP server an agent talks to: one handler per MCP session, one run per handler.

use std::collections::HashMap;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use ice_effects::mcp::ToolServers;
use ice_kernel::{CapabilityProposal, Event, EventId, EventType, Outcome, Proposal, RunId};
use ice_runtime::{Observer, RunReport, RunSpec, Runtime, RuntimeError, Session};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, CustomRequest,
    CustomResult, ElicitRequestParams, ElicitationAction, ElicitationSchema, Implementation,
    InitializeRequestParams, InitializeResult, ListToolsResult, PaginatedRequestParams, ResultType,
    ServerCapabilities, ServerConfig, Tool, ToolAnnotations,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, Peer, RoleServer, ServerHandler, ServiceExt};
use serde_json::{Value, json};
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;

use crate::http::json_error;

/// Where `ice serve` mounts the streamable-HTTP endpoint.
pub const MCP_PATH: &str = "/mcp";

/// The `_meta` key under which an agent may declare the intent of a `tools/call`.
pub const INTENT_META_KEY: &str = "ice/intent";

/// How long an HTTP session may stay idle before it is closed and its run aborted.
const HTTP_IDLE: Duration = Duration::from_secs(30 * 60);

/// How long a stdio handshake under way when `ice mcp` is told to stop may still take.
const HANDSHAKE_GRACE: Duration = Duration::from_secs(5);

/// How long an HTTP connection has to deliver a complete request header before it is closed:
/// for its first request, from the moment it is accepted; for each later one, from the moment the
/// previous response ended (an idle keep-alive connection). 20 s is far more than any working
/// client needs to send a header, and short enough that sockets which send nothing (or trickle a
/// header) cannot pile up: each holds one of [`MAX_CONNECTIONS`] for at most this long. It never
/// cuts a response being written, however long: an SSE stream (`GET /mcp`, a run's event
/// stream) is not waiting for a header.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a request's body has, from the moment its header was read, to arrive in full (the
/// bytes its `Content-Length` or chunks promise). Past it the request is answered 408 with a
/// JSON error and its connection closed, so a client that sends a header and part of a body and
/// then goes silent (or trickles it) holds a connection no longer than one that sends no
/// header. 20 s, like [`HEADER_READ_TIMEOUT`]: a request body here is at most a 1 MiB operator
/// API body or one MCP message, which any working client sends in far less. A handler that
/// never reads a body is not timed; a response is never cut.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(20);

/// How many HTTP connections one listener serves at once (fewer when the process's file-handle
/// limit is low: at most half of it, the rest being left to the log, tool servers and outbound
/// requests). A connection past the cap is not accepted until another closes: it waits in the
/// kernel's accept queue, holding no file handle of this process, so existing clients keep
/// being served and the process never runs out of handles. 1024 is far beyond what an operator
/// API, a UI and a few agents' MCP sessions use.
pub const MAX_CONNECTIONS: u32 = 1024;

/// How many MCP sessions one agent (one token; without tokens, all clients together) may hold
/// open over HTTP at once. Each session holds a run (its lock, its workspace) until it ends or
/// idles out, so without a bound one agent could hold memory and file handles without end and
/// lock every other agent out. An `initialize` past it is refused 429, naming the limit.
pub const MAX_SESSIONS_PER_AGENT: usize = 32;

/// How many MCP sessions all agents together may hold open over HTTP at once (fewer when the
/// process's file-handle limit is low: an eighth of it). Past it an `initialize` is refused 503.
pub const MAX_SESSIONS: usize = 256;

/// How many `/mcp` requests one agent may have in flight at once, open streams included (a
/// `GET` stream, a call waiting for approval). Past it a request is refused 429 at once, so one
/// agent cannot take the connections every client shares ([`MAX_CONNECTIONS`]).
pub const MAX_REQUESTS_PER_AGENT: usize = 64;

/// How often a response still streaming to an agent checks its token again: a revoked token's
/// streams end within this.
const RECHECK: Duration = Duration::from_secs(1);

/// How long the accept loop waits after an accept error other than a failed handshake (such as
/// running out of file handles anyway) before it tries again, instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The protections of [`Gateway::serve_http_with`]'s connection loop.
#[derive(Clone, Copy, Debug)]
struct HttpLimits {
    header_read_timeout: Duration,
    body_read_timeout: Duration,
    max_connections: u32,
}

impl HttpLimits {
    /// [`HEADER_READ_TIMEOUT`], [`BODY_READ_TIMEOUT`], and [`MAX_CONNECTIONS`] or half the
    /// soft file-handle limit, whichever is lower.
    fn for_this_process() -> Self {
        let half_of_handles = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .map_or(u64::MAX, |n| n / 2);
        let cap = u64::from(MAX_CONNECTIONS).min(half_of_handles).max(1);
        HttpLimits {
            header_read_timeout: HEADER_READ_TIMEOUT,
            body_read_timeout: BODY_READ_TIMEOUT,
            max_connections: u32::try_from(cap).unwrap_or(MAX_CONNECTIONS),
        }
    }
}

/// Serve `app` over HTTP/1.1 on `listener` until `stop` is cancelled, then stop accepting, let
/// every connection finish its in-flight request (idle ones close at once) and return when all
/// have closed. Unlike `axum::serve`, a connection that does not send a complete request header
/// within `limits.header_read_timeout` is closed, a request whose body does not arrive in full
/// within `limits.body_read_timeout` of its header is answered 408 and its connection closed,
/// and at most `limits.max_connections` are open at once. Error answers carry the JSON error
/// shape (`http::finish`, `http::ParseErrorBodies`), hyper's own ones included.
async fn serve_connections(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    stop: CancellationToken,
    limits: HttpLimits,
) -> Result<(), GatewayError> {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections as usize));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    loop {
        // A slot first: past the cap, connections stay in the kernel's queue, not accepted.
        let slot = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            slot = slots.clone().acquire_owned() => slot.map_err(|e| {
                GatewayError::Transport(format!("HTTP server: {e}"))
            })?,
        };
        let accepted = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let tcp = match accepted {
            Ok((tcp, _peer)) => tcp,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused
                        | std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                continue;
            }
            Err(_) => {
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        let routes = hyper_util::service::TowerToHyperService::new(app.clone());
        let body_limit = limits.body_read_timeout;
        let service =
            hyper::service::service_fn(move |req: axum::http::Request<hyper::body::Incoming>| {
                let routes = routes.clone();
                async move {
                    let asked = crate::http::Asked {
                        method: req.method().clone(),
                        uri: req.uri().clone(),
                        body_expired: Arc::default(),
                        body_limit,
                    };
                    let expired = asked.body_expired.clone();
                    let req = req.map(|b| crate::http::DeadlineBody::new(b, body_limit, expired));
                    let response = hyper::service::Service::call(&routes, req).await?;
                    Ok::<_, std::convert::Infallible>(crate::http::finish(response, &asked))
                }
            });
        let io = hyper_util::rt::TokioIo::new(crate::http::ParseErrorBodies::new(tcp));
        let conn = http.serve_connection(io, service).with_upgrades();
        let stop = stop.clone();
        tokio::spawn(async move {
            // The slot is held until the connection has closed.
            let _slot = slot;
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                () = stop.cancelled() => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
        });
    }
    drop(listener);
    // Every connection's task holds a slot until it ends: all slots back means all have closed.
    let _all = slots
        .acquire_many(limits.max_connections)
        .await
        .map_err(|e| GatewayError::Transport(format!("HTTP server: {e}")))?;
    Ok(())
}

/// The agent an HTTP request to [`MCP_PATH`] was authenticated as: put in the request's
/// extensions by the [`McpAuth`] check, read by the session's handler. The first request of a
/// session binds the session (and its run) to that agent.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AgentIdentity(pub String);

/// The check in front of [`MCP_PATH`]: from a request's headers, the agent it comes from
/// (`Ok(Some)`), an anonymous request that may pass and acts as the run spec's agent
/// (`Ok(None)`), or the response that refuses it.
pub type McpAuth = Arc<
    dyn Fn(&axum::http::HeaderMap) -> Result<Option<AgentIdentity>, Box<axum::response::Response>>
        + Send
        + Sync,
>;

/// Why the gateway could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The runtime refused (spec, policy, tool servers, log).
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The transport failed.
    #[error("{0}")]
    Transport(String),
}

/// The name an agent sees for `tool` of `server`.
pub fn tool_name(server: &str, tool: &str) -> String {
    format!("{server}__{tool}")
}

/// What an agent-facing name stands for.
#[derive(Debug, PartialEq, Eq)]
enum Named {
    /// Exactly one tool: `(server, tool)`.
    Tool(String, String),
    /// Several tools would be offered under the name (each as `server/tool`): none is called,
    /// and none is listed under it.
    Ambiguous(Vec<String>),
    /// No configured server's tool.
    Unknown,
}

/// The agent-facing names of the tool servers' tools, built from their current catalog: a name
/// is routed back to the tool it was made from by an exact lookup, never by guessing where a
/// server's name ends in it (with servers `a` and `a_`, `a___x` is `a_`'s tool `x` when that is
/// what the catalog holds, not `a`'s tool `_x`).
struct ToolNames {
    /// The configured servers' names.
    servers: Vec<String>,
    /// Each name the catalog's tools are offered under, with the `(server, tool)`s offered
    /// under it (more than one: the name is ambiguous).
    offered: HashMap<String, Vec<(String, String)>>,
}

impl ToolNames {
    fn new<'a>(
        servers: impl IntoIterator<Item = &'a str>,
        catalog: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Self {
        let mut offered: HashMap<String, Vec<(String, String)>> = HashMap::new();
        for (server, tool) in catalog {
            let tools = offered.entry(tool_name(server, tool)).or_default();
            if !tools.iter().any(|(s, t)| s == server && t == tool) {
                tools.push((server.to_string(), tool.to_string()));
            }
        }
        ToolNames {
            servers: servers.into_iter().map(str::to_string).collect(),
            offered,
        }
    }

    /// Which tool `name` stands for: the catalog's tool offered under it; for a name the
    /// catalog does not offer (a tool the server does not have, or no longer), the one
    /// configured server whose name and `__` begin it.
    fn resolve(&self, name: &str) -> Named {
        let named = |(s, t): &(String, String)| format!("{s}/{t}");
        let fits: Vec<(String, String)> = match self.offered.get(name) {
            Some(tools) => tools.clone(),
            None => self
                .servers
                .iter()
                .filter_map(|s| {
                    name.strip_prefix(s.as_str())?
                        .strip_prefix("__")
                        .filter(|t| !t.is_empty())
                        .map(|t| (s.clone(), t.to_string()))
                })
                .collect(),
        };
        match <[_; 1]>::try_from(fits) {
            Ok([(server, tool)]) => Named::Tool(server, tool),
            Err(fits) if fits.is_empty() => Named::Unknown,
            Err(fits) => Named::Ambiguous(fits.iter().map(named).collect()),
        }
    }

    /// Whether `tool` of `server` may be listed under its agent-facing name: the name stands
    /// for it and nothing else.
    fn lists(&self, server: &str, tool: &str) -> Result<(), String> {
        match self.resolve(&tool_name(server, tool)) {
            Named::Tool(s, t) if s == server && t == tool => Ok(()),
            Named::Ambiguous(all) => Err(format!("it is the name of {}", all.join(" and "))),
            _ => Err("the tool servers' catalog changed while it was listed".into()),
        }
    }
}

/// The gateway of one ICE process: the runtime, the run spec every session's run is made from,
/// and the tool servers those runs share.
pub struct Gateway {
    rt: &'static Runtime,
    spec: RunSpec,
    tools: Option<Arc<ToolServers>>,
    router: &'static ApprovalRouter,
    /// Whether each session's run gets a fresh id (several sessions from one spec).
    fresh_ids: bool,
    /// Every session's slot, to end their runs when the gateway stops.
    slots: StdMutex<Vec<std::sync::Weak<Slot>>>,
    /// The session runs being ended right now (in the background too), so a stopping server
    /// signs its last checkpoint only after they have recorded their last events.
    endings: Endings,
    /// The `tools/call` requests being answered right now (a stopping server lets the calls it
    /// closed answer their clients before it stops serving).
    calls: Endings,
}

/// How many session runs are being ended (validated, committed or aborted) right now: each
/// ending holds an [`Ending`] until its run's last event is recorded or it failed.
#[derive(Clone)]
struct Endings(Arc<tokio::sync::watch::Sender<usize>>);

impl Default for Endings {
    fn default() -> Self {
        Endings(Arc::new(tokio::sync::watch::channel(0).0))
    }
}

impl Endings {
    /// One more run being ended, until the returned guard drops.
    fn begin(&self) -> Ending {
        self.0.send_modify(|n| *n += 1);
        Ending(self.0.clone())
    }

    /// How many are being ended now.
    fn now(&self) -> usize {
        *self.0.borrow()
    }

    /// Until none is being ended.
    async fn none_left(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }
}

/// A run being ended (see [`Endings`]).
struct Ending(Arc<tokio::sync::watch::Sender<usize>>);

impl Drop for Ending {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Gateway {
    /// A gateway for runs made from `spec`: its tool servers are started now (a server that
    /// cannot start is an error naming it). With `fresh_ids`, each session's run gets its own
    /// id (`ice serve`); otherwise the spec's id is used as it is (`ice mcp`, one session).
    pub async fn new(
        rt: &'static Runtime,
        spec: RunSpec,
        fresh_ids: bool,
    ) -> Result<Arc<Gateway>, GatewayError> {
        if spec.driver != "external" {
            return Err(GatewayError::Runtime(RuntimeError::Invalid(format!(
                "{}: the MCP gateway serves runs whose agent is external; set [agent] driver = \"external\" (this spec has {:?})",
                spec.file.display(),
                spec.driver
            ))));
        }
        rt.preflight(&spec)?;
        let tools = ice_runtime::operator::start_tools(&spec).await?;
        let router: &'static ApprovalRouter = Box::leak(Box::default());
        Ok(Arc::new(Gateway {
            rt,
            spec,
            tools,
            router,
            fresh_ids,
            slots: StdMutex::new(Vec::new()),
            endings: Endings::default(),
            calls: Endings::default(),
        }))
    }

    /// A handler for one new MCP session over a transport whose client may be the agent itself
    /// (as over HTTP): approvals are elicited from the client only when the run spec opts in
    /// (`[approvals] elicitation = true`).
    pub fn handler(self: &Arc<Self>) -> IceMcp {
        self.handler_on(Transport::Http)
    }

    /// A handler for one new MCP session over `transport`.
    fn handler_on(self: &Arc<Self>, transport: Transport) -> IceMcp {
        let mut slot = Slot::default();
        slot.transport = transport;
        slot.endings = self.endings.clone();
        let slot = Arc::new(slot);
        if let Ok(mut slots) = self.slots.lock() {
            slots.retain(|s| s.strong_count() > 0);
            slots.push(Arc::downgrade(&slot));
        }
        IceMcp {
            gw: self.clone(),
            slot,
        }
    }

    /// The client closed HTTP session `id` (`DELETE`): withdraw its calls still waiting for
    /// an operator's approval now.
    fn session_closed(&self, id: &str) {
        let slots: Vec<Arc<Slot>> = match self.slots.lock() {
            Ok(s) => s.iter().filter_map(std::sync::Weak::upgrade).collect(),
            Err(_) => return,
        };
        for slot in slots {
            if slot
                .session_id
                .lock()
                .is_ok_and(|s| s.as_deref() == Some(id))
            {
                slot.closing.cancel();
            }
        }
    }

    /// For a gateway that has stopped serving: end every open session's run (validate and
    /// commit), and wait until every run it is ending has recorded its last event: these, and
    /// those of sessions the transport closed as it stopped (which end in the background).
    /// Each waits for the calls that hold its session (bounded by their own timeouts), so the
    /// whole wait is bounded by `limit`. Returns how many runs were still being ended when
    /// `limit` ran out (0: everything is recorded, a checkpoint signed now covers it all).
    ///
    /// First, every approval wait of this process's runs is stopped
    /// (`Runtime::interrupt_approval_waits`): a call waiting for an operator is answered with a
    /// denial naming its approval, and its run is suspended instead of committed, so no call
    /// holds a session for the rest of its approval timeout.
    pub async fn close_all(&self, limit: Duration) -> usize {
        self.rt
            .interrupt_approval_waits("the server is stopping, so the wait for an answer ended");
        let slots: Vec<Arc<Slot>> = match self.slots.lock() {
            Ok(s) => s.iter().filter_map(std::sync::Weak::upgrade).collect(),
            Err(_) => Vec::new(),
        };
        for slot in slots {
            // Counted before the task runs, so the wait below cannot miss it; the ending
            // holds this count (one per run), not one of its own.
            let ending = self.endings.begin();
            tokio::spawn(async move {
                let _ = slot.end_counted(None, ending).await;
            });
        }
        match tokio::time::timeout(limit, self.endings.none_left()).await {
            Ok(()) => 0,
            Err(_) => self.endings.now(),
        }
    }

    /// Until no `tools/call` is being answered, or `limit` passed: a stopping server calls this
    /// after `Runtime::interrupt_approval_waits`, so each call it closed answers its client
    /// with its denial before the sessions' streams close. How many calls were still running.
    pub async fn calls_answered(&self, limit: Duration) -> usize {
        match tokio::time::timeout(limit, self.calls.none_left()).await {
            Ok(()) => 0,
            Err(_) => self.calls.now(),
        }
    }

    /// Abort the run of every open session `agent` opened (its token was revoked): reason
    /// `agent_revoked`, with `detail`. Returns how many runs were ended.
    pub async fn end_sessions_of(&self, agent: &str, detail: &str) -> usize {
        let slots: Vec<Arc<Slot>> = match self.slots.lock() {
            Ok(s) => s.iter().filter_map(std::sync::Weak::upgrade).collect(),
            Err(_) => Vec::new(),
        };
        let mut ended = 0;
        for slot in slots {
            let owner = slot.agent.lock().ok().and_then(|a| a.clone()).flatten();
            if owner.is_some_and(|AgentIdentity(a)| a == agent)
                && matches!(
                    slot.end(Some(("agent_revoked", detail.to_string()))).await,
                    Ok(Some(_))
                )
            {
                ended += 1;
            }
        }
        ended
    }

    /// Serve one MCP session over this process's stdin and stdout; when the client closes the
    /// session, validate and commit its run (or abort it if the session failed) and report.
    /// Returns `None` when the client left before its session made a run.
    pub async fn serve_stdio(self: &Arc<Self>) -> Result<Option<RunReport>, GatewayError> {
        self.serve_stdio_until(CancellationToken::new()).await
    }

    /// [`Self::serve_stdio`], also ending when `stop` is cancelled (`ice mcp` stopped by a
    /// signal): the session stops reading, the answers of calls that finish within rmcp's
    /// drain still reach the client, and the run ends as when the client leaves, once the
    /// calls holding it return.
    pub async fn serve_stdio_until(
        self: &Arc<Self>,
        stop: CancellationToken,
    ) -> Result<Option<RunReport>, GatewayError> {
        let handler = self.handler_on(Transport::Stdio);
        let slot = handler.slot.clone();
        // A handshake under way when `stop` comes gets a few seconds to finish (it may be
        // recording the run's opening events); a client that never completes one does not
        // hold the stop up longer.
        let serving = handler.serve(rmcp::transport::stdio());
        tokio::pin!(serving);
        let started = tokio::select! {
            s = &mut serving => Some(s),
            _ = async {
                stop.cancelled().await;
                tokio::time::sleep(HANDSHAKE_GRACE).await;
            } => None,
        };
        let outcome = match started {
            None => {
                Err("ice mcp was stopped before the client completed its handshake".to_string())
            }
            Some(Ok(running)) => {
                let serving = running.cancellation_token();
                let stopping = tokio::spawn(async move {
                    stop.cancelled().await;
                    serving.cancel();
                });
                let waited = running.waiting().await;
                stopping.abort();
                waited
                    .map(|_| ())
                    .map_err(|e| format!("the MCP session failed: {e}"))
            }
            Some(Err(e)) => Err(format!("the MCP session did not start: {e}")),
        };
        let report = match outcome {
            Ok(()) => slot.end(None).await?,
            Err(why) => slot.end(Some(("session_failed", why))).await?,
        };
        Ok(report)
    }

    /// Serve MCP over streamable HTTP at [`MCP_PATH`] on `listener`, several sessions at once,
    /// until `stop` is cancelled. Requests must name a loopback host or the listening address
    /// in `Host` (DNS-rebinding protection), or one of `extra_hosts` (`name` or `name:port`).
    pub async fn serve_http(
        self: &Arc<Self>,
        listener: tokio::net::TcpListener,
        stop: CancellationToken,
        extra_hosts: &[String],
    ) -> Result<(), GatewayError> {
        self.serve_http_with(listener, stop, extra_hosts, axum::Router::new(), None)
            .await
    }

    /// [`Self::serve_http`], with `extra` (ICE's operator API) served beside [`MCP_PATH`] on the
    /// same listener, behind the same `Host` check: a request naming another host is refused
    /// (403) before it reaches `extra`'s routes or fallback. With `auth`, every request to
    /// [`MCP_PATH`] passes that check first (after the `Host` check), and each session's run is
    /// its authenticated agent's; without it, every session's agent is the run spec's.
    ///
    /// A connection that does not send a complete request header within
    /// [`HEADER_READ_TIMEOUT`] (the first, or the next on an idle keep-alive connection) is
    /// closed, and at most [`MAX_CONNECTIONS`] are served at once (the rest wait to be
    /// accepted). When `stop` is cancelled, in-flight requests finish before this returns.
    pub async fn serve_http_with(
        self: &Arc<Self>,
        listener: tokio::net::TcpListener,
        stop: CancellationToken,
        extra_hosts: &[String],
        extra: axum::Router,
        auth: Option<McpAuth>,
    ) -> Result<(), GatewayError> {
        use rmcp::transport::streamable_http_server::{
            StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
        };
        let gw = self.clone();
        let mut sessions = LocalSessionManager::default();
        sessions.session_config.keep_alive = Some(HTTP_IDLE);
        let mut config = StreamableHttpServerConfig::default();
        config.cancellation_token = stop.child_token();
        if let Ok(addr) = listener.local_addr() {
            config.allowed_hosts = vec![
                "localhost".into(),
                "127.0.0.1".into(),
                "[::1]".into(),
                addr.to_string(),
                format!("localhost:{}", addr.port()),
            ];
        }
        for h in extra_hosts {
            check_allowed_host(h)
                .map_err(|e| GatewayError::Transport(format!("an allowed host name: {e}")))?;
        }
        config
            .allowed_hosts
            .extend(extra_hosts.iter().map(|h| h.trim().to_string()));
        let allowed: Arc<[String]> = config.allowed_hosts.clone().into();
        let for_extra = allowed.clone();
        let extra = extra.layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let allowed = for_extra.clone();
                async move {
                    match host_refusal(&req, &allowed) {
                        Some(refused) => refused,
                        None => next.run(req).await,
                    }
                }
            },
        ));
        let sessions = Arc::new(sessions);
        let service =
            StreamableHttpService::new(move || Ok(gw.handler()), sessions.clone(), config);
        // rmcp's own refusals (plain text) get the JSON error shape.
        let mut mcp = axum::Router::new()
            .nest_service(MCP_PATH, service)
            .layer(axum::middleware::map_response(crate::http::json_refusal));
        let owners = Arc::new(Owners::default());
        let admission = Arc::new(Admission::for_this_process());
        let closed = self.clone();
        mcp = mcp.layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let (auth, allowed, owners) = (auth.clone(), allowed.clone(), owners.clone());
                let (sessions, admission) = (sessions.clone(), admission.clone());
                let closed = closed.clone();
                async move {
                    let on_close = |id: &str| closed.session_closed(id);
                    let gates = Gates {
                        auth,
                        allowed: &allowed,
                        owners: &owners,
                        admission: &admission,
                        sessions: &*sessions,
                        on_close: &on_close,
                    };
                    guard(req, next, gates).await
                }
            },
        ));
        let app = mcp.merge(extra);
        serve_connections(listener, app, stop, HttpLimits::for_this_process()).await
    }

    async fn open(&self, slot: &Slot) -> Result<Arc<Session<'static>>, ErrorData> {
        let mut guard = slot.session.lock().await;
        if let Some(s) = guard.as_ref() {
            return Ok(s.clone());
        }
        if slot.ended.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ErrorData::internal_error(
                "this MCP session has ended; its run is closed",
                None,
            ));
        }
        let mut spec = self.spec.clone();
        if self.fresh_ids {
            spec.id = None;
        }
        let bound = slot.agent.lock().ok().and_then(|a| a.clone()).flatten();
        let agent = match &bound {
            Some(AgentIdentity(name)) => name.clone(),
            None => self.spec.agent.clone(),
        };
        // Whether the session's client answers approvals: as the spec says, else by transport
        // (a stdio client is the user's app; over HTTP the client is the agent). The run's
        // recorded spec says which.
        let elicit = self
            .spec
            .approval_elicitation
            .unwrap_or(slot.transport == Transport::Stdio);
        spec.approval_elicitation = Some(elicit);
        let answerer = elicitation_answerer(slot.transport, bound.as_ref());
        // The record says whether the agent's identity was proven by a token.
        let mut client = slot.client.lock().ok().and_then(|c| c.clone());
        if let Some(Value::Object(c)) = &mut client {
            c.insert(
                "authenticated_agent".into(),
                bound.map_or(Value::Null, |AgentIdentity(n)| Value::String(n)),
            );
        }
        let session = self
            .rt
            .open_session_with_tools(
                spec,
                &agent,
                self.router as &dyn Observer,
                self.tools.clone(),
                client,
            )
            .await
            .map_err(|e| {
                ErrorData::internal_error(format!("ICE could not open a run: {e}"), None)
            })?;
        let session = Arc::new(session);
        // Without elicitation only operators answer: nothing is routed to the client.
        if elicit {
            let (tx, rx) = mpsc::unbounded_channel();
            self.router.register(session.run().clone(), tx);
            if let Ok(mut r) = slot.registered.lock() {
                *r = Some((self.router, session.run().clone()));
            }
            tokio::spawn(elicit_approvals(self.rt, rx, slot.peer.clone(), answerer));
        }
        *guard = Some(session.clone());
        Ok(session)
    }
}

/// How a session reaches ICE, which decides whether its client is asked to answer approvals
/// when the run spec does not say, and who such an answer is recorded as.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Transport {
    /// `ice mcp`: the client launched ICE as a process of its user (a person's app).
    Stdio,
    /// `ice serve`: the client holds an agent's token (or none, on loopback); it is the agent.
    #[default]
    Http,
}

/// One MCP session's run, opened on first use.
#[derive(Default)]
struct Slot {
    session: Mutex<Option<Arc<Session<'static>>>>,
    ended: std::sync::atomic::AtomicBool,
    /// How the session's client reaches ICE.
    transport: Transport,
    /// The agent's peer, for elicitation (the latest request's).
    peer: Arc<StdMutex<Option<Peer<RoleServer>>>>,
    /// What the client said of itself: name, version, protocol version and style.
    client: StdMutex<Option<Value>>,
    /// The approval router this session's run is registered with (removed when it ends).
    registered: StdMutex<Option<(&'static ApprovalRouter, RunId)>>,
    /// When the session last made a request (an HTTP session idle for [`HTTP_IDLE`] is
    /// abandoned: its run aborts).
    last_active: StdMutex<Option<std::time::Instant>>,
    /// Who the session belongs to, bound by its first request: an authenticated agent, or
    /// `Some(None)` for an anonymous session (the run spec's agent).
    agent: StdMutex<Option<Option<AgentIdentity>>>,
    /// The gateway's count of runs being ended, which this session's ending joins.
    endings: Endings,
    /// The HTTP session's `Mcp-Session-Id` (from its requests after `initialize`).
    session_id: StdMutex<Option<String>>,
    /// Cancelled when the client closes the HTTP session (`DELETE`): its calls still waiting
    /// for an operator are withdrawn at once, not once the transport gets round to cancelling
    /// them (seconds later, in which an approval would still have run the call).
    closing: CancellationToken,
}

impl Slot {
    /// Stop routing the run's approval requests here (its elicitation task then ends).
    fn unregister(&self) {
        if let Some((router, run)) = self.registered.lock().ok().and_then(|mut r| r.take()) {
            router.unregister(&run);
        }
    }

    /// End the session's run: commit when `failure` is `None`, abort otherwise (with its
    /// reason code and detail).
    async fn end(
        &self,
        failure: Option<(&'static str, String)>,
    ) -> Result<Option<RunReport>, RuntimeError> {
        self.end_counted(failure, self.endings.begin()).await
    }

    /// [`Self::end`], counted among the runs being ended by `_ending` (until it returns).
    async fn end_counted(
        &self,
        failure: Option<(&'static str, String)>,
        _ending: Ending,
    ) -> Result<Option<RunReport>, RuntimeError> {
        self.ended.store(true, std::sync::atomic::Ordering::SeqCst);
        self.unregister();
        let Some(session) = self.session.lock().await.take() else {
            return Ok(None);
        };
        end_run(session, failure).await.map(Some)
    }
}

/// End a session's run once no call holds it (each call is bounded by its timeout): commit
/// when `failure` is `None`, abort otherwise (with its reason code and detail).
async fn end_run(
    mut session: Arc<Session<'static>>,
    failure: Option<(&'static str, String)>,
) -> Result<RunReport, RuntimeError> {
    let session = loop {
        match Arc::try_unwrap(session) {
            Ok(s) => break s,
            Err(back) => {
                session = back;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    match failure {
        None => session.finish().await,
        Some((code, why)) => session.abort(code, &why).await,
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // An HTTP session closed: ended by its client (committed) or abandoned, idle past
        // HTTP_IDLE (aborted). Its run is ended in the background.
        self.unregister();
        let Some(session) = self.session.get_mut().take() else {
            return;
        };
        let idle = self
            .last_active
            .get_mut()
            .ok()
            .and_then(|t| *t)
            .is_some_and(|t| t.elapsed() >= HTTP_IDLE);
        let failure = idle.then(|| {
            (
                "session_failed",
                format!(
                    "the MCP session was idle for {} minutes and was closed",
                    HTTP_IDLE.as_secs() / 60
                ),
            )
        });
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            // Counted now, so a gateway that is stopping waits for this run's last events
            // before it signs its final checkpoint.
            let ending = self.endings.begin();
            handle.spawn(async move {
                let _ = end_run(session, failure).await;
                drop(ending);
            });
        }
    }
}

/// The MCP handler of one session.
#[derive(Clone)]
pub struct IceMcp {
    gw: Arc<Gateway>,
    slot: Arc<Slot>,
}

impl IceMcp {
    /// Bind the session to the agent of its first request; refuse a later request that comes
    /// from another agent (or without the identity the session was opened with).
    fn check_agent(&self, context: &RequestContext<RoleServer>) -> Result<(), ErrorData> {
        let who = context
            .extensions
            .get::<axum::http::request::Parts>()
            .and_then(|p| p.extensions.get::<AgentIdentity>())
            .cloned();
        let Ok(mut bound) = self.slot.agent.lock() else {
            return Err(ErrorData::internal_error(
                "the session's agent binding is unusable",
                None,
            ));
        };
        match &*bound {
            None => {
                *bound = Some(who);
                Ok(())
            }
            Some(owner) if *owner == who => Ok(()),
            Some(owner) => Err(ErrorData::invalid_request(not_yours(owner, &who), None)),
        }
    }

    fn remember_peer(&self, context: &RequestContext<RoleServer>) -> Result<(), ErrorData> {
        self.check_agent(context)?;
        if let Some(id) = context
            .extensions
            .get::<axum::http::request::Parts>()
            .and_then(|p| p.headers.get("mcp-session-id"))
            .and_then(|v| v.to_str().ok())
            && let Ok(mut known) = self.slot.session_id.lock()
            && known.is_none()
        {
            *known = Some(id.to_string());
        }
        if let Ok(mut t) = self.slot.last_active.lock() {
            *t = Some(std::time::Instant::now());
        }
        if let Ok(mut p) = self.slot.peer.lock() {
            *p = Some(context.peer.clone());
        }
        if let Ok(mut c) = self.slot.client.lock()
            && c.is_none()
        {
            // A 2026-07-28 client says who it is in each request's metadata.
            let info = context.client_info();
            *c = Some(json!({
                "name": info.as_ref().map(|i| i.name.clone()),
                "version": info.as_ref().map(|i| i.version.clone()),
                "protocol_version": context.protocol_version().map(|v| v.to_string()),
                "lifecycle": "per-request metadata",
            }));
        }
        Ok(())
    }

    /// The agent-facing names of the tool servers' current catalog.
    fn tool_names(&self) -> ToolNames {
        let catalog = self
            .gw
            .tools
            .as_deref()
            .map(ToolServers::tools)
            .unwrap_or_default();
        ToolNames::new(
            self.gw.spec.servers.iter().map(|s| s.name.as_str()),
            catalog.iter().map(|t| (t.server.as_str(), t.name.as_str())),
        )
    }
}

impl ServerHandler for IceMcp {
    /// The legacy handshake: negotiate, note who the client is, and open the session's run
    /// (provision, context, execution window).
    async fn initialize(
        &self,
        request: InitializeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<InitializeResult, ErrorData> {
        // One handshake per session: a second would renegotiate what the run recorded
        // (`RunProvisioned.client`) and the record would no longer match the session.
        let initialized = self
            .slot
            .client
            .lock()
            .ok()
            .and_then(|c| c.as_ref().map(|c| c["lifecycle"] == "initialize"))
            .unwrap_or(false);
        if initialized {
            return Err(ErrorData::invalid_request(
                "this session is already initialized: a session has one initialize (start a new session to negotiate again)",
                None,
            ));
        }
        context.peer.set_peer_info(request.clone());
        let result = self.negotiate_initialize(&request)?;
        if let Ok(mut c) = self.slot.client.lock() {
            *c = Some(json!({
                "name": request.client_info.name,
                "version": request.client_info.version,
                "protocol_version": result.protocol_version.to_string(),
                "lifecycle": "initialize",
            }));
        }
        self.remember_peer(&context)?;
        self.gw.open(&self.slot).await?;
        Ok(result)
    }

    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("ice", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "ICE governs every tool call: each is decided by policy, grants, budgets and \
                 approvals, and recorded. A refused call returns isError with the reason. You \
                 may declare the purpose of a call in _meta[\"ice/intent\"].",
            )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        self.remember_peer(&context)?;
        let session = self.gw.open(&self.slot).await?;
        let mut tools = Vec::new();
        // ICE's own capabilities first: the workspace (staged, applied when the session's run
        // commits) and HTTP, under the same governance.
        for (b, class) in session.permitted_builtins().await {
            let Value::Object(schema) = b.input_schema() else {
                continue;
            };
            let mut tool = Tool::new(
                b.name,
                format!(
                    "{} [ICE's own {} capability; every call is governed and recorded]",
                    b.description(),
                    b.capability
                ),
                Arc::new(schema),
            );
            tool.annotations = Some(annotations(class, b.capability == "http.request"));
            tools.push(tool);
        }
        // A tool is listed only under a name that is routed back to it and to nothing else.
        let names = self.tool_names();
        let mut listed = std::collections::HashSet::new();
        for (t, class) in session.permitted_tools().await {
            let Value::Object(schema) = t.input_schema.clone() else {
                continue;
            };
            let name = tool_name(&t.server, &t.name);
            if let Err(why) = names.lists(&t.server, &t.name) {
                eprintln!(
                    "ice: tools/list leaves out tool {:?} of server {:?}: its name {name:?} would not reach it alone ({why})",
                    t.name, t.server
                );
                continue;
            }
            if !listed.insert(name.clone()) {
                continue;
            }
            let mut tool = Tool::new(
                name,
                format!(
                    "{} [via ICE: tool {} of server {}; effect class {class}; every call is governed and recorded]",
                    t.description.clone().unwrap_or_default(),
                    t.name,
                    t.server
                ),
                Arc::new(schema),
            );
            tool.title = t.title.clone();
            if let Some(Value::Object(out)) = &t.output_schema {
                tool.output_schema = Some(Arc::new(out.clone()));
            }
            // ICE's class, not the server's hints, is what the agent is told.
            tool.annotations = Some(annotations(class, false));
            tools.push(tool);
        }
        Ok(ListToolsResult::with_all_items(tools))
    }

    /// rmcp hands here every request it could not read as one it knows, among them a known
    /// method whose params are not what MCP's schema takes (`tools/call` with `name: 5`):
    /// that is invalid params (-32602), saying what is wrong, not an unknown method.
    async fn on_custom_request(
        &self,
        request: CustomRequest,
        _context: RequestContext<RoleServer>,
    ) -> Result<CustomResult, ErrorData> {
        Err(unread_request(&request.method, request.params))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let _answering = self.gw.calls.begin();
        self.remember_peer(&context)?;
        let session = self.gw.open(&self.slot).await?;
        let name = request.name.to_string();
        let intent = context
            .meta
            .get(INTENT_META_KEY)
            .and_then(Value::as_str)
            // A blank intent declares nothing (the law records none): the default says so.
            .filter(|i| !i.trim().is_empty())
            .map(str::to_string)
            .unwrap_or_else(|| format!("MCP tools/call {name} (the client declared no intent)"));
        let arguments = request.arguments.unwrap_or_default();
        let builtin = ice_kernel::BuiltinTool::named(&name);
        // Why the name is no tool's, when it is not: a protocol error (the attempt is recorded).
        let (proposal, not_a_tool) = if let Some(b) = builtin {
            // Arguments that make no request are the client's error; nothing is proposed.
            let p = b
                .proposal(arguments, &intent)
                .map_err(|why| ErrorData::invalid_params(format!("{name}: {why}"), None))?;
            (p, None)
        } else {
            let (target, not_a_tool) = match self.tool_names().resolve(&name) {
                Named::Tool(server, tool) => (format!("{server}/{tool}"), None),
                Named::Unknown => (name.clone(), Some(format!("unknown tool {name:?}"))),
                Named::Ambiguous(all) => (
                    name.clone(),
                    Some(format!(
                        "tool name {name:?} is ambiguous: it is the name of {}, so none is called",
                        all.join(" and ")
                    )),
                ),
            };
            let p = CapabilityProposal {
                capability: "mcp.call".into(),
                target,
                arguments: Value::Object(arguments),
                intent,
            };
            (p, not_a_tool)
        };
        let proposal = Proposal::Request(proposal);
        // A cancelled call (or the session's end, or its client closing it) withdraws a
        // request still waiting for an operator's approval.
        let withdraw = self.slot.closing.child_token();
        let linked = {
            let (call, withdraw) = (context.ct.clone(), withdraw.clone());
            tokio::spawn(async move {
                call.cancelled().await;
                withdraw.cancel();
            })
        };
        let proposed = session
            .propose_withdrawable(&proposal, Some(&withdraw))
            .await;
        linked.abort();
        // The session was busy until now (a long call, an approval wait): its idleness counts
        // from here, not from when the call was made. Not when the transport cancelled the
        // call (the session idled out, its client silent): that session is abandoned, and its
        // run must be aborted as such, not committed.
        if !context.ct.is_cancelled()
            && let Ok(mut t) = self.slot.last_active.lock()
        {
            *t = Some(std::time::Instant::now());
        }
        match proposed {
            Ok(Some(Outcome::Done { output, .. })) if builtin.is_some() => {
                Ok(builtin_result(output).into())
            }
            Ok(Some(Outcome::Done { output, .. })) => Ok(to_result(output).into()),
            Ok(Some(Outcome::Denied {
                request,
                reason,
                detail,
            })) => {
                if let Some(not_a_tool) = not_a_tool {
                    // An unknown tool is a protocol error (the attempt is still recorded).
                    return Err(ErrorData::invalid_params(
                        format!("{not_a_tool}: {detail} (recorded as {request})"),
                        Some(json!({"ice": {"denied": reason, "request": request.to_string()}})),
                    ));
                }
                Ok(denied(&request, &reason, &detail).into())
            }
            Ok(None) => Err(ErrorData::internal_error(
                "the runtime gave no answer to the call",
                None,
            )),
            Err(RuntimeError::State { state, what, .. }) => Err(ErrorData::invalid_request(
                format!("ICE refuses the call: the run is {state}: {what}"),
                None,
            )),
            Err(RuntimeError::Invalid(why)) => Err(ErrorData::invalid_params(
                format!("ICE refuses the call: {why}"),
                None,
            )),
            Err(e) => Err(ErrorData::internal_error(format!("ICE failed: {e}"), None)),
        }
    }
}

/// What a listed tool's annotations tell the client: ICE's effect class (`open_world` for HTTP,
/// whose class depends on the method).
fn annotations(class: ice_authority::EffectClass, open_world: bool) -> ToolAnnotations {
    let read = class == ice_authority::EffectClass::Read;
    let mut a = ToolAnnotations::new();
    a.read_only_hint = Some(read && !open_world);
    a.destructive_hint = Some(!read);
    a.open_world_hint = Some(open_world || class == ice_authority::EffectClass::External);
    a
}

/// Which agent each HTTP session belongs to (by `Mcp-Session-Id`), recorded when the session
/// opens: every request naming a session, whatever its method (a `GET` stream, a `DELETE`, a
/// `POST` request or response), must come from the agent that opened it, and a session id this
/// map does not hold is refused. Entries go when a `DELETE` closes the session, or when the map
/// has grown and the transport no longer has the session.
#[derive(Default)]
struct Owners(StdMutex<HashMap<String, Option<AgentIdentity>>>);

/// What [`Owners`] says of a session id.
enum Owner {
    Known(Option<AgentIdentity>),
    Unknown,
    Unusable,
}

impl Owners {
    fn owner(&self, session: &str) -> Owner {
        match self.0.lock() {
            Ok(map) => match map.get(session) {
                Some(who) => Owner::Known(who.clone()),
                None => Owner::Unknown,
            },
            Err(_) => Owner::Unusable,
        }
    }

    /// Record `session` as `who`'s; when the map has grown to a power of two (from 1024 on),
    /// first forget the sessions `sessions` no longer has (ended by idleness or by the
    /// transport).
    async fn insert<M: rmcp::transport::streamable_http_server::SessionManager>(
        &self,
        session: String,
        who: Option<AgentIdentity>,
        sessions: &M,
    ) {
        let held: Vec<String> = match self.0.lock() {
            Ok(map) if map.len() >= 1024 && map.len().is_power_of_two() => {
                map.keys().cloned().collect()
            }
            _ => Vec::new(),
        };
        let mut gone = Vec::new();
        for id in held {
            if !matches!(
                sessions.has_session(&Arc::from(id.as_str())).await,
                Ok(true)
            ) {
                gone.push(id);
            }
        }
        if let Ok(mut map) = self.0.lock() {
            for id in &gone {
                map.remove(id);
            }
            map.insert(session, who);
        }
    }

    fn remove(&self, session: &str) {
        if let Ok(mut map) = self.0.lock() {
            map.remove(session);
        }
    }

    /// How many open sessions `who` holds, and all agents together, after forgetting the
    /// sessions `sessions` no longer has.
    async fn held<M: rmcp::transport::streamable_http_server::SessionManager>(
        &self,
        who: &Option<AgentIdentity>,
        sessions: &M,
    ) -> (usize, usize) {
        let known: Vec<(String, Option<AgentIdentity>)> = match self.0.lock() {
            Ok(map) => map.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            Err(_) => Vec::new(),
        };
        let (mut mine, mut all) = (0, 0);
        let mut gone = Vec::new();
        for (id, owner) in known {
            if matches!(
                sessions.has_session(&Arc::from(id.as_str())).await,
                Ok(true)
            ) {
                all += 1;
                if &owner == who {
                    mine += 1;
                }
            } else {
                gone.push(id);
            }
        }
        if let Ok(mut map) = self.0.lock() {
            for id in &gone {
                map.remove(id);
            }
        }
        (mine, all)
    }
}

/// The bounds on what agents hold of the MCP endpoint ([`MAX_SESSIONS_PER_AGENT`],
/// [`MAX_SESSIONS`], [`MAX_REQUESTS_PER_AGENT`]) and each agent's requests in flight.
struct Admission {
    sessions_per_agent: usize,
    sessions: usize,
    requests_per_agent: usize,
    in_flight: Arc<StdMutex<HashMap<Option<AgentIdentity>, usize>>>,
    /// Sessions being opened (an `initialize` admitted, its session not yet recorded), so
    /// requests racing each other cannot all pass the caps.
    opening: Arc<StdMutex<HashMap<Option<AgentIdentity>, usize>>>,
}

impl Admission {
    fn for_this_process() -> Self {
        let eighth_of_handles = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .map_or(u64::MAX, |n| n / 8);
        Admission {
            sessions_per_agent: MAX_SESSIONS_PER_AGENT,
            sessions: usize::try_from(eighth_of_handles)
                .unwrap_or(MAX_SESSIONS)
                .clamp(1, MAX_SESSIONS),
            requests_per_agent: MAX_REQUESTS_PER_AGENT,
            in_flight: Arc::default(),
            opening: Arc::default(),
        }
    }

    /// A session `who` may open, held until the returned mark drops (once its session is
    /// recorded), given that it holds `mine` of the `all` open ones; or why not.
    fn open(
        &self,
        who: &Option<AgentIdentity>,
        mine: usize,
        all: usize,
    ) -> Result<InFlight, Box<axum::response::Response>> {
        let Ok(mut map) = self.opening.lock() else {
            return Err(Box::new(json_error(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the record of MCP sessions being opened is unusable; restart ice serve",
            )));
        };
        let mine = mine + map.get(who).copied().unwrap_or(0);
        let all = all + map.values().sum::<usize>();
        if mine >= self.sessions_per_agent {
            let whose = whose(who);
            return Err(Box::new(json_error(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                "too_many_sessions",
                &format!(
                    "{whose} already holds {mine} open MCP sessions, the most one agent may: end one (DELETE {MCP_PATH} with its Mcp-Session-Id) or let one idle out"
                ),
            )));
        }
        if all >= self.sessions {
            return Err(Box::new(json_error(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "too_many_sessions",
                &format!(
                    "ICE holds {all} open MCP sessions, the most it serves at once; try again when one ends"
                ),
            )));
        }
        *map.entry(who.clone()).or_insert(0) += 1;
        Ok(InFlight {
            who: who.clone(),
            map: self.opening.clone(),
        })
    }

    /// A request of `who`'s in flight until the returned mark is dropped; `None` when `who`
    /// already has as many as it may.
    fn enter(&self, who: &Option<AgentIdentity>) -> Option<InFlight> {
        let mut map = self.in_flight.lock().ok()?;
        let n = map.entry(who.clone()).or_insert(0);
        if *n >= self.requests_per_agent {
            return None;
        }
        *n += 1;
        Some(InFlight {
            who: who.clone(),
            map: self.in_flight.clone(),
        })
    }
}

/// The methods of MCP's client requests (those rmcp reads, which come to
/// [`IceMcp::on_custom_request`] only when their params do not fit).
const MCP_REQUEST_METHODS: [&str; 21] = [
    "initialize",
    "ping",
    "server/discover",
    "completion/complete",
    "logging/setLevel",
    "prompts/get",
    "prompts/list",
    "resources/list",
    "resources/templates/list",
    "resources/read",
    "resources/directory/read",
    "resources/subscribe",
    "resources/unsubscribe",
    "subscriptions/listen",
    "tools/call",
    "tools/list",
    "tasks/get",
    "tasks/update",
    "tasks/cancel",
    "skills/list",
    "skills/get",
];

/// The error for a request rmcp could not read: invalid params (-32602) for one of MCP's
/// methods (with serde's reason, for `tools/call`), method not found (-32601) for any other.
fn unread_request(method: &str, params: Option<Value>) -> ErrorData {
    if !MCP_REQUEST_METHODS.contains(&method) {
        return ErrorData::new(
            rmcp::model::ErrorCode::METHOD_NOT_FOUND,
            format!("{method:?} is not a method ICE's MCP gateway serves"),
            None,
        );
    }
    let why = match (method, params) {
        ("tools/call", Some(p)) => serde_json::from_value::<CallToolRequestParams>(p)
            .err()
            .map(|e| format!(": {e}")),
        ("tools/call", None) => Some(": params are required".to_string()),
        _ => None,
    }
    .unwrap_or_default();
    ErrorData::invalid_params(
        format!("the params of {method} are not what MCP's schema for it takes{why}"),
        None,
    )
}

/// Whose bounds a refusal speaks of: the agent's, or (without agent tokens) every client's.
fn whose(who: &Option<AgentIdentity>) -> String {
    match who {
        Some(AgentIdentity(n)) => format!("agent {n:?}"),
        None => "this endpoint's clients (no agent tokens are configured)".to_string(),
    }
}

/// One request in flight (its response streaming included), or one session being opened,
/// counted until dropped.
#[derive(Debug)]
struct InFlight {
    who: Option<AgentIdentity>,
    map: Arc<StdMutex<HashMap<Option<AgentIdentity>, usize>>>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut map) = self.map.lock()
            && let Some(n) = map.get_mut(&self.who)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.who);
            }
        }
    }
}

/// `req` back, if it is a `DELETE` or a POST whose body (at most 64 KiB) is one JSON-RPC
/// message that is not a request (a notification or a response): what an agent at its bound
/// on requests in flight may still send.
async fn not_a_request(req: axum::extract::Request) -> Result<axum::extract::Request, ()> {
    if req.method() == axum::http::Method::DELETE {
        return Ok(req);
    }
    if req.method() != axum::http::Method::POST {
        return Err(());
    }
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, 64 << 10).await.map_err(|_| ())?;
    let message: Value = serde_json::from_slice(&bytes).map_err(|_| ())?;
    let request = message.get("method").is_some() && message.get("id").is_some();
    if !message.is_object() || request {
        return Err(());
    }
    Ok(axum::extract::Request::from_parts(
        parts,
        axum::body::Body::from(bytes),
    ))
}

/// `body`, counted as in flight while it streams, and ended once `still_allowed` says the
/// token that opened it no longer authenticates (checked every [`RECHECK`]).
fn held_body(
    body: axum::body::Body,
    mark: Option<InFlight>,
    still_allowed: Option<Box<dyn Fn() -> bool + Send + Sync>>,
) -> axum::body::Body {
    use axum::body::HttpBody;
    use futures_util::StreamExt;
    if body.size_hint().exact().is_some() {
        // Whole already (a JSON answer, an error): nothing streams; its length is kept.
        return body;
    }
    let state = (
        body.into_data_stream(),
        mark,
        still_allowed,
        tokio::time::interval(RECHECK),
    );
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        loop {
            tokio::select! {
                item = st.0.next() => return item.map(|i| (i, st)),
                _ = st.3.tick(), if st.2.is_some() => {
                    if !st.2.as_ref().is_some_and(|allowed| allowed()) {
                        return None;
                    }
                }
            }
        }
    });
    axum::body::Body::from_stream(stream)
}

/// Why a request from `who` may not use a session `owner` opened.
fn not_yours(owner: &Option<AgentIdentity>, who: &Option<AgentIdentity>) -> String {
    let name = |a: &Option<AgentIdentity>| match a {
        Some(AgentIdentity(n)) => format!("agent {n:?}"),
        None => "an anonymous client".to_string(),
    };
    format!(
        "this MCP session belongs to {}; a request from {} cannot use it",
        name(owner),
        name(who)
    )
}

/// In front of [`MCP_PATH`] when `ice serve` authenticates agents: the `Host` check first (rmcp
/// makes it inside the service, but this runs before it, so a rebinding page learns nothing
/// from the token check), then `auth`, then the session's owner; the request then carries its
/// [`AgentIdentity`] for the handler. A session a response opens is recorded as the
/// requester's; one a `DELETE` closes is forgotten.
/// What [`guard`] checks a request against, and whom it tells of a closed session.
struct Gates<'a, M> {
    auth: Option<McpAuth>,
    allowed: &'a [String],
    owners: &'a Owners,
    admission: &'a Admission,
    sessions: &'a M,
    /// Called with a session's id once a `DELETE` closed it.
    on_close: &'a (dyn Fn(&str) + Send + Sync),
}

async fn guard<M: rmcp::transport::streamable_http_server::SessionManager>(
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
    gates: Gates<'_, M>,
) -> axum::response::Response {
    let Gates {
        auth,
        allowed,
        owners,
        admission,
        sessions,
        on_close,
    } = gates;
    const SESSION: &str = "mcp-session-id";
    if let Some(refused) = host_refusal(&req, allowed) {
        return refused;
    }
    let who = match auth.as_ref().map_or(Ok(None), |auth| auth(req.headers())) {
        Ok(who) => who,
        Err(refused) => return *refused,
    };
    let session = req
        .headers()
        .get(SESSION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if let Some(id) = &session {
        match owners.owner(id) {
            Owner::Known(owner) if owner == who => {}
            Owner::Known(owner) => {
                let message = not_yours(&owner, &who);
                return json_error(axum::http::StatusCode::FORBIDDEN, "forbidden", &message);
            }
            Owner::Unknown => {
                return json_error(
                    axum::http::StatusCode::NOT_FOUND,
                    "unknown_session",
                    "no open MCP session has this Mcp-Session-Id (it ended, or never existed): start a new one with initialize",
                );
            }
            Owner::Unusable => {
                return json_error(
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "the record of MCP sessions is unusable; restart ice serve",
                );
            }
        }
    }
    let _opening = if session.is_none() && req.method() == axum::http::Method::POST {
        let (mine, all) = owners.held(&who, sessions).await;
        match admission.open(&who, mine, all) {
            Ok(opening) => Some(opening),
            Err(refused) => return *refused,
        }
    } else {
        None
    };
    let mark = match admission.enter(&who) {
        Some(mark) => Some(mark),
        None => {
            // At the bound, what ends work is still taken (uncounted): closing a session, and
            // a message that is not a request (a cancellation, an answer to an elicitation).
            match not_a_request(req).await {
                Ok(r) => {
                    req = r;
                    None
                }
                Err(()) => {
                    let message = format!(
                        "{} already has {} requests to {MCP_PATH} in flight (open streams included), the most one agent may",
                        whose(&who),
                        admission.requests_per_agent
                    );
                    return json_error(
                        axum::http::StatusCode::TOO_MANY_REQUESTS,
                        "too_many_requests",
                        &message,
                    );
                }
            }
        }
    };
    // A response still streaming ends once the token that opened it is revoked.
    // (An anonymous stream, on a server without agent tokens, ends once the first is added.)
    let still_allowed: Option<Box<dyn Fn() -> bool + Send + Sync>> = match (&auth, &who) {
        (Some(auth), _) => {
            let (auth, headers, who) = (auth.clone(), req.headers().clone(), who.clone());
            Some(Box::new(move || auth(&headers).is_ok_and(|now| now == who)))
        }
        _ => None,
    };
    let closing = req.method() == axum::http::Method::DELETE;
    if let Some(w) = &who {
        req.extensions_mut().insert(w.clone());
    }
    let response = next
        .run(req)
        .await
        .map(|body| held_body(body, mark, still_allowed));
    match &session {
        None => {
            if let Some(opened) = response
                .headers()
                .get(SESSION)
                .and_then(|v| v.to_str().ok())
            {
                owners.insert(opened.to_string(), who, sessions).await;
            }
        }
        Some(s) if closing && response.status().is_success() => {
            owners.remove(s);
            on_close(s);
        }
        Some(_) => {}
    }
    // rmcp accepts a `DELETE` with 202; clients (the official Python SDK) take only 200 or
    // 204 as "the session is closed" and warn of a failed termination otherwise.
    let mut response = response;
    if closing && response.status() == axum::http::StatusCode::ACCEPTED {
        *response.status_mut() = axum::http::StatusCode::NO_CONTENT;
    }
    response
}

/// Why a request to the routes served beside MCP is refused by the DNS-rebinding check (the
/// same rule rmcp applies to `/mcp`: the `Host` header, or the URI's authority, must be one of
/// `allowed`, where an entry without a port allows any port; an empty list allows all), as a
/// JSON error response; `None` if it may pass.
fn host_refusal(
    req: &axum::extract::Request,
    allowed: &[String],
) -> Option<axum::response::Response> {
    use axum::http::{StatusCode, header, uri::Authority};
    let refuse =
        |status: StatusCode, message: &str| Some(json_error(status, "host_not_allowed", message));
    if allowed.is_empty() {
        return None;
    }
    let normal = |host: &str| {
        host.trim_matches('[')
            .trim_matches(']')
            .to_ascii_lowercase()
    };
    // RFC 9112 §3.2: more than one Host is refused, and a request target in absolute form
    // names the host whatever its Host header says.
    if req.headers().get_all(header::HOST).iter().count() > 1 {
        return refuse(
            StatusCode::BAD_REQUEST,
            "the request has more than one Host header",
        );
    }
    let (host, port) = match (req.uri().authority(), req.headers().get(header::HOST)) {
        (Some(a), _) => (normal(a.host()), a.port_u16()),
        (None, Some(v)) => match v.to_str().ok().and_then(|s| Authority::try_from(s).ok()) {
            Some(a) => (normal(a.host()), a.port_u16()),
            None => return refuse(StatusCode::BAD_REQUEST, "the Host header is malformed"),
        },
        (None, None) => return refuse(StatusCode::BAD_REQUEST, "the request names no Host"),
    };
    let ok = allowed.iter().any(|a| {
        let a = a.trim();
        let (ah, ap) = match Authority::try_from(a) {
            Ok(auth) => (normal(auth.host()), auth.port_u16()),
            Err(_) => (normal(a), None),
        };
        !a.is_empty() && ah == host && ap.is_none_or(|p| port == Some(p))
    });
    if ok {
        None
    } else {
        refuse(
            StatusCode::FORBIDDEN,
            "the Host header names a host this server does not serve (DNS-rebinding protection); start `ice serve` with --allow-host NAME to allow it",
        )
    }
}

/// Check one extra host name a server is to allow (`ice serve --allow-host`): a host name or
/// address with an optional port, as a client puts it in its `Host` header (`ice.example`,
/// `ice.example:7411`, `[::1]:7411`). An empty value, or one with a scheme, path, user or
/// spaces, would match no request and silently allow nothing; the error says what is wrong.
pub fn check_allowed_host(value: &str) -> Result<(), String> {
    let v = value.trim();
    if v.is_empty() {
        return Err("the host name is empty; give the name clients use to reach this server, such as ice.example or ice.example:7411".into());
    }
    let refuse = |why: &str| {
        Err(format!(
            "{v:?} {why}; give a host name with an optional port, such as ice.example or ice.example:7411"
        ))
    };
    if v.contains(['/', '@', '?', '#']) || v.contains(char::is_whitespace) {
        return refuse("is not a host name (no scheme, path, user or spaces)");
    }
    if v.contains('*') {
        return refuse(
            "is a wildcard, which is not supported: a request's Host must equal an allowed name; give each name with its own --allow-host",
        );
    }
    match axum::http::uri::Authority::try_from(v) {
        Ok(a) if !a.host().is_empty() && !v.ends_with(':') => {
            // After the host, only `:PORT`, with a port a client can connect to.
            match v.get(a.host().len()..).and_then(|r| r.strip_prefix(':')) {
                None => Ok(()),
                Some(p) if p.parse::<u16>().is_ok_and(|p| p != 0) => Ok(()),
                Some(p) => refuse(&format!(
                    "has port {p}, which no client can connect to (a port is from 1 to 65535)"
                )),
            }
        }
        _ => refuse("is not a host name"),
    }
}

/// A tool's result as the effects layer recorded it, as an MCP result.
fn to_result(output: Value) -> CallToolResult {
    match serde_json::from_value::<CallToolResult>(output.clone()) {
        // A tool server on an older protocol sends no result type; rmcp drops it again for
        // agents on older protocols.
        Ok(mut r) => {
            r.result_type = Some(ResultType::COMPLETE);
            r
        }
        Err(_) => CallToolResult::success(vec![ContentBlock::text(output.to_string())]),
    }
}

/// What one of ICE's own capabilities returned, as a tool result: a file's text as the text (a
/// read's `content`), anything else as its JSON; the whole output as structured content.
fn builtin_result(output: Value) -> CallToolResult {
    let text = match output.get("content") {
        Some(Value::String(content)) => content.clone(),
        _ => output.to_string(),
    };
    let mut r = CallToolResult::success(vec![ContentBlock::text(text)]);
    r.structured_content = Some(output);
    r
}

/// A denial as a tool result the agent can read and act on.
fn denied(request: &EventId, reason: &str, detail: &str) -> CallToolResult {
    let mut r = CallToolResult::error(vec![ContentBlock::text(format!(
        "ICE denied this call ({reason}): {detail}. The attempt is recorded as {request}."
    ))]);
    r.structured_content = Some(json!({
        "ice": {"denied": reason, "detail": detail, "request": request.to_string()}
    }));
    r
}

/// Who an approval answered by MCP elicitation is recorded as (`operator:<this>`): made of what
/// ICE itself established about the session (its transport and the agent its token proved),
/// never of what the client says of itself (`clientInfo`, which it chooses freely and which
/// stays in the run's `RunProvisioned.client` as client-reported).
///
/// - stdio (`ice mcp`): `user-of-stdio-client`, the user of the app that launched ICE;
/// - HTTP with an agent's token: `user-of-agent.<agent>`, whoever holds that agent's token
///   (over HTTP that is the agent itself, which is why elicitation there is opt-in);
/// - HTTP without a token (loopback, no agent token yet): `user-of-anonymous-http-client`.
fn elicitation_answerer(transport: Transport, agent: Option<&AgentIdentity>) -> String {
    match (transport, agent) {
        (Transport::Stdio, _) => "user-of-stdio-client".into(),
        (Transport::Http, None) => "user-of-anonymous-http-client".into(),
        (Transport::Http, Some(AgentIdentity(name))) => {
            let id = format!("user-of-agent.{name}");
            if ice_kernel::Origin::Operator(id.clone()).check().is_ok() {
                id
            } else {
                // A name the origin rules do not take whole (too long): its digest stands in.
                let digest = ice_kernel::Digest::of(name.as_bytes()).to_hex();
                format!("user-of-agent.sha256-{}", &digest[..32])
            }
        }
    }
}

/// Passes each run's `ApprovalRequested` events to the session that owns the run.
#[derive(Default)]
pub(crate) struct ApprovalRouter {
    runs: StdMutex<HashMap<RunId, mpsc::UnboundedSender<Event>>>,
}

impl ApprovalRouter {
    fn register(&self, run: RunId, tx: mpsc::UnboundedSender<Event>) {
        if let Ok(mut m) = self.runs.lock() {
            m.retain(|_, s| !s.is_closed());
            m.insert(run, tx);
        }
    }

    fn unregister(&self, run: &RunId) {
        if let Ok(mut m) = self.runs.lock() {
            m.remove(run);
        }
    }
}

impl Observer for ApprovalRouter {
    fn recorded(&self, event: &Event) {
        if event.event_type != EventType::ApprovalRequested.name() {
            return;
        }
        if let Ok(m) = self.runs.lock()
            && let Some(tx) = m.get(&event.run_id)
        {
            let _ = tx.send(event.clone());
        }
    }
}

/// For each approval the session's run asks for (only for sessions whose client may answer:
/// see [`Gateway::handler`]): when the client supports elicitation, ask it; record the answer
/// as `operator:<answerer>` (from [`elicitation_answerer`]). Otherwise (or when the client
/// declines to answer) the call keeps waiting for an operator until the spec's timeout.
async fn elicit_approvals(
    rt: &'static Runtime,
    mut rx: mpsc::UnboundedReceiver<Event>,
    peer: Arc<StdMutex<Option<Peer<RoleServer>>>>,
    answerer: String,
) {
    while let Some(event) = rx.recv().await {
        let Some(peer) = peer.lock().ok().and_then(|p| p.clone()) else {
            continue;
        };
        if peer.supported_elicitation_modes().is_empty() {
            continue;
        }
        let operator = answerer.clone();
        tokio::spawn(async move {
            let id = event.id();
            let p = &event.payload;
            let what = format!(
                "ICE: agent {} asks to call {} {} with arguments {} (approval {id}). Approve this one call? (Your answer is recorded as operator:{operator}.)",
                p.get("agent").and_then(Value::as_str).unwrap_or("?"),
                p.get("capability").and_then(Value::as_str).unwrap_or("?"),
                p.get("resource")
                    .and_then(|r| r.get("id"))
                    .and_then(Value::as_str)
                    .unwrap_or("?"),
                cut(
                    &p.get("arguments").map(Value::to_string).unwrap_or_default(),
                    400
                ),
            );
            let Ok(schema) = ElicitationSchema::builder()
                .required_bool("approve")
                .optional_string("reason")
                .build()
            else {
                return;
            };
            let params = ElicitRequestParams::FormElicitationParams {
                meta: None,
                message: what,
                requested_schema: schema,
            };
            let Ok(answer) = peer.create_elicitation(params).await else {
                return;
            };
            if answer.action != ElicitationAction::Accept {
                return;
            }
            let content = answer.content.unwrap_or(Value::Null);
            let Some(approve) = content.get("approve").and_then(Value::as_bool) else {
                return;
            };
            let reason = content
                .get("reason")
                .and_then(Value::as_str)
                .unwrap_or("answered through MCP elicitation");
            // The client's answer stands whatever the length of its reason: a reason longer
            // than the record carries is cut (the `…` room included), not refused.
            let reason = cut(reason, ice_kernel::limits::MAX_TEXT_LEN - 3);
            let _ = rt.answer_approval(&id, &operator, approve, &reason).await;
        });
    }
}

fn cut(s: &str, n: usize) -> String {
    if s.len() <= n {
        return s.to_string();
    }
    let mut end = n;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(server: &str, tool: &str) -> Named {
        Named::Tool(server.into(), tool.into())
    }

    #[test]
    fn a_listed_tool_name_is_routed_back_to_the_one_tool_it_was_made_from() {
        // Servers "a" and "a_" (a spec that `RunSpec::load` refuses, built here by hand): "a_"'s
        // tool "x" is offered as "a___x", which "a" and "__" begin too.
        let names = ToolNames::new(["a", "a_"], [("a", "y"), ("a_", "x")]);
        assert_eq!(names.resolve("a___x"), tool("a_", "x"));
        assert_eq!(names.lists("a_", "x"), Ok(()));
        assert_eq!(names.resolve("a__y"), tool("a", "y"));
        // A name the catalog does not offer goes to the one server whose name begins it, which
        // then refuses it (the tool does not exist); when two servers' names could begin it,
        // or none, it is no tool's.
        assert_eq!(names.resolve("a__z"), tool("a", "z"));
        assert_eq!(
            names.resolve("a___z"),
            Named::Ambiguous(vec!["a/_z".into(), "a_/z".into()])
        );
        for unknown in ["b__x", "a__", "a_", "ax", "fs_read"] {
            assert_eq!(names.resolve(unknown), Named::Unknown, "{unknown}");
        }
        // "a" with a tool "_x" of its own: both are offered as "a___x", so neither is listed and
        // a call reaches neither.
        let names = ToolNames::new(["a", "a_"], [("a", "_x"), ("a_", "x"), ("a", "y")]);
        let both = Named::Ambiguous(vec!["a/_x".into(), "a_/x".into()]);
        assert_eq!(names.resolve("a___x"), both);
        for (server, t) in [("a", "_x"), ("a_", "x")] {
            let why = names.lists(server, t).unwrap_err();
            assert_eq!(why, "it is the name of a/_x and a_/x");
        }
        assert_eq!(names.lists("a", "y"), Ok(()));
        // A tool the catalog holds twice is still one tool.
        let names = ToolNames::new(["a"], [("a", "x"), ("a", "x")]);
        assert_eq!(names.resolve("a__x"), tool("a", "x"));
        // Tool names may hold "__" themselves: the catalog says which server's they are.
        let names = ToolNames::new(["a", "b"], [("a", "b__c"), ("b", "c")]);
        assert_eq!(names.resolve("a__b__c"), tool("a", "b__c"));
        assert_eq!(names.resolve("b__c"), tool("b", "c"));
    }

    #[test]
    fn elicited_answers_are_recorded_as_what_ice_authenticated() {
        let valid = |id: &str| ice_kernel::Origin::Operator(id.into()).check().is_ok();
        let claude = AgentIdentity("claude".into());
        assert_eq!(
            elicitation_answerer(Transport::Stdio, None),
            "user-of-stdio-client"
        );
        assert_eq!(
            elicitation_answerer(Transport::Http, Some(&claude)),
            "user-of-agent.claude"
        );
        assert_eq!(
            elicitation_answerer(Transport::Http, None),
            "user-of-anonymous-http-client"
        );
        // An agent name too long to prefix whole still gives a valid, distinct operator id.
        let long = AgentIdentity("a".repeat(128));
        let longer = AgentIdentity(format!("{}b", "a".repeat(127)));
        let (x, y) = (
            elicitation_answerer(Transport::Http, Some(&long)),
            elicitation_answerer(Transport::Http, Some(&longer)),
        );
        assert!(valid(&x) && valid(&y) && x != y, "{x} {y}");
        assert!(x.starts_with("user-of-agent.sha256-"), "{x}");
    }

    #[test]
    fn an_allowed_host_needs_a_port_a_client_can_use_and_no_wildcard() {
        for good in [
            "ice.example",
            "ice.example:7411",
            "ice.example:1",
            "ice.example:65535",
            "[::1]:7411",
            "10.0.0.1",
        ] {
            assert_eq!(check_allowed_host(good), Ok(()), "{good}");
        }
        for (bad, says) in [
            ("ice.example:99999", "port 99999"),
            ("ice.example:65536", "port 65536"),
            ("ice.example:0", "port 0"),
            ("[::1]:70000", "port 70000"),
            ("*.example.com", "wildcard"),
            ("*", "wildcard"),
            ("ice.*.example:7411", "wildcard"),
        ] {
            let why = check_allowed_host(bad).expect_err(bad);
            assert!(why.contains(says), "{bad}: {why}");
            assert!(why.contains("host name"), "{bad}: {why}");
        }
    }

    #[test]
    fn each_agent_has_its_own_bound_on_requests_in_flight_freed_as_they_end() {
        let a = Admission {
            sessions_per_agent: 1,
            sessions: 1,
            requests_per_agent: 2,
            in_flight: Arc::default(),
            opening: Arc::default(),
        };
        let hog = Some(AgentIdentity("hog".into()));
        let first = a.enter(&hog).unwrap();
        let _second = a.enter(&hog).unwrap();
        assert!(a.enter(&hog).is_none(), "a third is refused");
        // Another agent, and clients without a token, count on their own.
        let _other = a.enter(&Some(AgentIdentity("other".into()))).unwrap();
        let _anonymous = a.enter(&None).unwrap();
        drop(first);
        assert!(a.enter(&hog).is_some(), "an ended request makes room");
        // A session being opened counts until it is recorded: two racing `initialize`s
        // cannot both pass the bound.
        let opening = a.open(&hog, 0, 0).unwrap();
        assert_eq!(a.open(&hog, 0, 0).unwrap_err().status(), 429);
        assert_eq!(a.open(&None, 0, 0).unwrap_err().status(), 503, "all: 1");
        drop(opening);
        assert!(a.open(&hog, 0, 0).is_ok());
    }

    #[tokio::test]
    async fn at_the_bound_only_what_ends_work_is_still_taken() {
        let post = |body: &str| {
            axum::http::Request::post("/mcp")
                .body(axum::body::Body::from(body.to_string()))
                .unwrap()
        };
        let delete = axum::http::Request::delete("/mcp")
            .body(axum::body::Body::empty())
            .unwrap();
        assert!(not_a_request(delete).await.is_ok());
        let cancel =
            r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":2}}"#;
        let passed = not_a_request(post(cancel)).await.unwrap();
        let body = axum::body::to_bytes(passed.into_body(), 1 << 20)
            .await
            .unwrap();
        assert_eq!(body, cancel.as_bytes(), "the body is passed on whole");
        assert!(
            not_a_request(post(r#"{"jsonrpc":"2.0","id":1,"result":{}}"#))
                .await
                .is_ok()
        );
        for refused in [
            r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{}}"#,
            r#"[{"jsonrpc":"2.0","method":"notifications/cancelled"}]"#,
            "not json",
        ] {
            assert!(not_a_request(post(refused)).await.is_err(), "{refused}");
        }
        let get = axum::http::Request::get("/mcp")
            .body(axum::body::Body::empty())
            .unwrap();
        assert!(not_a_request(get).await.is_err());
    }

    #[test]
    fn a_405_lists_the_methods_with_single_spaces() {
        for allow in ["GET, POST, DELETE", "GET,POST,DELETE", "GET ,POST,  DELETE"] {
            assert_eq!(crate::http::list_methods(allow), "GET, POST, DELETE");
        }
    }

    #[test]
    fn a_known_method_rmcp_could_not_read_is_invalid_params_not_unknown() {
        let e = unread_request("tools/call", Some(json!({"name": 5})));
        assert_eq!(e.code, rmcp::model::ErrorCode::INVALID_PARAMS);
        assert!(
            e.message
                .starts_with("the params of tools/call are not what MCP's schema for it takes: "),
            "{}",
            e.message
        );
        let e = unread_request("tools/call", None);
        assert!(e.message.ends_with("params are required"), "{}", e.message);
        let e = unread_request("tools/list", Some(json!({"cursor": 5})));
        assert_eq!(e.code, rmcp::model::ErrorCode::INVALID_PARAMS);
        let e = unread_request("tools/destroy", None);
        assert_eq!(e.code, rmcp::model::ErrorCode::METHOD_NOT_FOUND);
        assert_eq!(
            e.message,
            "\"tools/destroy\" is not a method ICE's MCP gateway serves"
        );
    }

    #[tokio::test]
    async fn a_plain_text_refusal_gets_the_json_error_shape() {
        use axum::http::{StatusCode, header};
        let plain = |status: StatusCode, text: &'static str| {
            let mut r = axum::response::Response::new(axum::body::Body::from(text));
            *r.status_mut() = status;
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                "text/plain; charset=utf-8".parse().unwrap(),
            );
            r
        };
        let body = |r: axum::response::Response| async move {
            assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
            assert!(r.headers().get(header::CONTENT_LENGTH).is_none());
            let b = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
            serde_json::from_slice::<Value>(&b).unwrap()
        };
        let r = crate::http::json_refusal(plain(
            StatusCode::BAD_REQUEST,
            "Bad Request: Session ID is required",
        ))
        .await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            body(r).await,
            json!({"error": {"code": "bad_request", "message": "Bad Request: Session ID is required"}})
        );
        // rmcp's 415 for a body that is no JSON-RPC message is a 400 saying what one is.
        let r = crate::http::json_refusal(plain(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "fail to deserialize request body expected value at line 1 column 1",
        ))
        .await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let v = body(r).await;
        assert_eq!(v["error"]["code"], "invalid_message");
        let m = v["error"]["message"].as_str().unwrap();
        assert!(
            m.starts_with("the body is not one JSON-RPC 2.0 message")
                && m.ends_with(": expected value at line 1 column 1"),
            "{m}"
        );
        // rmcp's other 415 (a body not declared JSON) stays what it is.
        let r = crate::http::json_refusal(plain(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Unsupported Media Type: Content-Type must be application/json",
        ))
        .await;
        assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
        let mut untyped = plain(StatusCode::NOT_ACCEPTABLE, "");
        untyped.headers_mut().remove(header::CONTENT_TYPE);
        let r = crate::http::json_refusal(untyped).await;
        assert_eq!(
            body(r).await,
            json!({"error": {"code": "not_acceptable", "message": "Not Acceptable"}})
        );
        // Successes, JSON, and 405s (which `finish` words) pass as they are.
        for r in [
            plain(StatusCode::OK, "fine"),
            plain(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed"),
            json_error(StatusCode::FORBIDDEN, "forbidden", "no"),
        ] {
            let (status, ct) = (r.status(), r.headers()[header::CONTENT_TYPE].clone());
            let out = crate::http::json_refusal(r).await;
            assert_eq!(
                (out.status(), &out.headers()[header::CONTENT_TYPE]),
                (status, &ct)
            );
        }
    }

    mod connections {
        use super::super::{GatewayError, HttpLimits, serve_connections};
        use std::net::SocketAddr;
        use std::time::{Duration, Instant};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio::net::TcpStream;
        use tokio::task::JoinHandle;
        use tokio_util::sync::CancellationToken;

        /// A bound far above every limit under test: a step that should end but hangs fails.
        const PATIENCE: Duration = Duration::from_secs(10);

        fn app() -> axum::Router {
            use axum::routing::get;
            axum::Router::new()
                .route("/ok", get(|| async { "ok" }))
                .route(
                    "/echo",
                    axum::routing::post(|body: axum::body::Bytes| async move { body }),
                )
                .route(
                    "/slow",
                    get(|| async {
                        tokio::time::sleep(Duration::from_millis(800)).await;
                        "slow"
                    }),
                )
                .route(
                    // An SSE-like response: a chunk every 300 ms for 3 s.
                    "/stream",
                    get(|| async {
                        let chunks = futures_util::stream::unfold(0u32, |i| async move {
                            if i == 10 {
                                return None;
                            }
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            Some((
                                Ok::<_, std::convert::Infallible>(format!("data: {i}\n\n")),
                                i + 1,
                            ))
                        });
                        axum::body::Body::from_stream(chunks)
                    }),
                )
        }

        async fn start(
            header_read_timeout: Duration,
            max_connections: u32,
        ) -> (
            SocketAddr,
            CancellationToken,
            JoinHandle<Result<(), GatewayError>>,
        ) {
            start_with(HttpLimits {
                header_read_timeout,
                body_read_timeout: Duration::from_secs(60),
                max_connections,
            })
            .await
        }

        async fn start_with(
            limits: HttpLimits,
        ) -> (
            SocketAddr,
            CancellationToken,
            JoinHandle<Result<(), GatewayError>>,
        ) {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let stop = CancellationToken::new();
            let server = tokio::spawn(serve_connections(listener, app(), stop.clone(), limits));
            (addr, stop, server)
        }

        /// Everything the server sends on `tcp` until it closes the connection.
        async fn until_closed(tcp: &mut TcpStream) -> String {
            let mut got = Vec::new();
            match tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut got)).await {
                Ok(_) => String::from_utf8_lossy(&got).into_owned(),
                Err(_) => panic!("the server kept the connection open"),
            }
        }

        async fn request(tcp: &mut TcpStream, path: &str, close: bool) {
            let connection = if close { "close" } else { "keep-alive" };
            let head = format!(
                "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: {connection}\r\n\r\n"
            );
            tcp.write_all(head.as_bytes()).await.unwrap();
        }

        async fn get(addr: SocketAddr, path: &str) -> String {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            request(&mut tcp, path, true).await;
            until_closed(&mut tcp).await
        }

        #[tokio::test]
        async fn a_connection_without_a_complete_header_is_closed_while_others_are_served() {
            let timeout = Duration::from_secs(2);
            let (addr, stop, server) = start(timeout, 64).await;
            let began = Instant::now();
            let mut silent = TcpStream::connect(addr).await.unwrap();
            let mut half = TcpStream::connect(addr).await.unwrap();
            half.write_all(b"GET /ok HTTP/1.1\r\nHost: loc")
                .await
                .unwrap();
            // An idle keep-alive connection: one request answered, then nothing.
            let mut idle = TcpStream::connect(addr).await.unwrap();
            request(&mut idle, "/ok", false).await;
            let mut answer = [0u8; 512];
            let n = tokio::time::timeout(PATIENCE, idle.read(&mut answer))
                .await
                .unwrap()
                .unwrap();
            assert!(answer[..n].starts_with(b"HTTP/1.1 200"), "{answer:?}");
            // Meanwhile, ordinary requests on other connections are answered at once.
            let ok = get(addr, "/ok").await;
            assert!(ok.starts_with("HTTP/1.1 200") && ok.ends_with("ok"), "{ok}");
            assert!(began.elapsed() < timeout, "{:?}", began.elapsed());
            // A response streamed for longer than the timeout is not cut.
            let streamed = get(addr, "/stream").await;
            assert!(streamed.contains("data: 9"), "{streamed}");
            // The three are closed once the timeout has run (the idle one answered, then closed).
            until_closed(&mut silent).await;
            until_closed(&mut half).await;
            let rest = until_closed(&mut idle).await;
            assert!(!rest.contains("HTTP/1.1 200"), "{rest}");
            assert!(began.elapsed() >= timeout, "{:?}", began.elapsed());
            assert!(get(addr, "/ok").await.starts_with("HTTP/1.1 200"));
            stop.cancel();
            tokio::time::timeout(PATIENCE, server)
                .await
                .unwrap()
                .unwrap()
                .unwrap();
        }

        /// The status and the JSON body of a whole answer.
        fn json_answer(answer: &str) -> (u16, serde_json::Value) {
            let status = answer
                .split(' ')
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
            let (head, body) = answer.split_once("\r\n\r\n").unwrap();
            assert!(
                head.to_ascii_lowercase()
                    .contains("content-type: application/json"),
                "{answer}"
            );
            let body = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer}"));
            (status, body)
        }

        #[tokio::test]
        async fn a_body_that_stops_partway_is_answered_408_and_its_connection_closed() {
            let limit = Duration::from_secs(2);
            let (addr, stop, server) = start_with(HttpLimits {
                header_read_timeout: Duration::from_secs(60),
                body_read_timeout: limit,
                max_connections: 64,
            })
            .await;
            let began = Instant::now();
            // A header promising 100 bytes, 10 of them, then silence.
            let mut stalled = TcpStream::connect(addr).await.unwrap();
            stalled
                .write_all(
                    b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n0123456789",
                )
                .await
                .unwrap();
            // A body sent slowly but whole within the limit is served.
            let mut slow = TcpStream::connect(addr).await.unwrap();
            slow.write_all(
                b"POST /echo HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 10\r\n\r\n01234",
            )
            .await
            .unwrap();
            tokio::time::sleep(limit / 2).await;
            slow.write_all(b"56789").await.unwrap();
            let answer = until_closed(&mut slow).await;
            assert!(
                answer.starts_with("HTTP/1.1 200") && answer.ends_with("0123456789"),
                "{answer}"
            );
            // The stalled one: 408 with a JSON error once the limit has run, then closed.
            let answer = until_closed(&mut stalled).await;
            assert!(began.elapsed() >= limit, "{:?}", began.elapsed());
            let (status, body) = json_answer(&answer);
            assert_eq!(status, 408, "{answer}");
            assert_eq!(body["error"]["code"], "request_timeout", "{answer}");
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("did not arrive in full within 2 s"),
                "{answer}"
            );
            assert!(get(addr, "/ok").await.starts_with("HTTP/1.1 200"));
            stop.cancel();
            tokio::time::timeout(PATIENCE, server)
                .await
                .unwrap()
                .unwrap()
                .unwrap();
        }

        #[tokio::test]
        async fn refusals_before_any_route_carry_a_json_error() {
            let (addr, stop, server) = start(Duration::from_secs(60), 64).await;
            let ask = |raw: Vec<u8>| async move {
                let mut tcp = TcpStream::connect(addr).await.unwrap();
                tcp.write_all(&raw).await.unwrap();
                until_closed(&mut tcp).await
            };
            // A URI past hyper's limit: 414.
            let long = format!(
                "GET /ok?{} HTTP/1.1\r\nHost: localhost\r\n\r\n",
                "a".repeat(70_000)
            );
            let answer = ask(long.into_bytes()).await;
            let (status, body) = json_answer(&answer);
            assert_eq!(
                (status, &body["error"]["code"]),
                (414, &"uri_too_long".into())
            );
            // More header fields than hyper reads: 431.
            let mut many = String::from("GET /ok HTTP/1.1\r\nHost: localhost\r\n");
            for i in 0..150 {
                many.push_str(&format!("X-Field-{i}: {i}\r\n"));
            }
            many.push_str("\r\n");
            let answer = ask(many.into_bytes()).await;
            let (status, body) = json_answer(&answer);
            assert_eq!(
                (status, &body["error"]["code"]),
                (431, &"headers_too_large".into()),
                "{answer}"
            );
            // A malformed header line: 400.
            let answer = ask(b"GET /ok HTTP/1.1\r\nHost localhost\r\n\r\n".to_vec()).await;
            let (status, body) = json_answer(&answer);
            assert_eq!(
                (status, &body["error"]["code"]),
                (400, &"malformed_request".into())
            );
            // A method the route does not take: 405 naming it, with Allow.
            let answer = ask(
                b"DELETE /ok HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".to_vec(),
            )
            .await;
            let (status, body) = json_answer(&answer);
            assert_eq!(status, 405, "{answer}");
            assert_eq!(body["error"]["code"], "method_not_allowed");
            let message = body["error"]["message"].as_str().unwrap();
            assert!(
                message.contains("DELETE is not allowed on /ok") && message.contains("GET"),
                "{answer}"
            );
            assert!(
                answer.to_ascii_lowercase().contains("allow: get"),
                "{answer}"
            );
            // Ordinary answers are untouched, and the server is still serving.
            assert!(get(addr, "/ok").await.ends_with("\r\n\r\nok"));
            stop.cancel();
            tokio::time::timeout(PATIENCE, server)
                .await
                .unwrap()
                .unwrap()
                .unwrap();
        }

        #[tokio::test]
        async fn connections_past_the_cap_wait_until_one_closes() {
            // A long header timeout: only the cap is under test.
            let (addr, stop, server) = start(Duration::from_secs(60), 2).await;
            let first = TcpStream::connect(addr).await.unwrap();
            let _second = TcpStream::connect(addr).await.unwrap();
            let mut third = TcpStream::connect(addr).await.unwrap();
            request(&mut third, "/ok", true).await;
            let mut got = Vec::new();
            let early =
                tokio::time::timeout(Duration::from_millis(700), third.read_to_end(&mut got)).await;
            assert!(
                early.is_err() && got.is_empty(),
                "served past the cap: {got:?}"
            );
            // One closes: the waiting request is served, and so are later ones.
            drop(first);
            let answer = until_closed(&mut third).await;
            assert!(
                answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok"),
                "{answer}"
            );
            assert!(get(addr, "/ok").await.starts_with("HTTP/1.1 200"));
            // Stopping does not wait for connections still queued past the cap or idle.
            stop.cancel();
            tokio::time::timeout(PATIENCE, server)
                .await
                .unwrap()
                .unwrap()
                .unwrap();
        }

        #[tokio::test]
        async fn stopping_lets_in_flight_requests_finish() {
            let (addr, stop, server) = start(Duration::from_secs(60), 64).await;
            let mut slow = TcpStream::connect(addr).await.unwrap();
            request(&mut slow, "/slow", true).await;
            let _idle = TcpStream::connect(addr).await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
            stop.cancel();
            let answer = until_closed(&mut slow).await;
            assert!(
                answer.starts_with("HTTP/1.1 200") && answer.ends_with("slow"),
                "{answer}"
            );
            tokio::time::timeout(PATIENCE, server)
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            assert!(
                TcpStream::connect(addr).await.is_err(),
                "still accepting after stop"
            );
        }
    }
}
