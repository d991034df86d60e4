//! The runtime's side of acting: resolving an agent's target, estimating what a call will
//! cost, and calling the effects layer with the authorization the grant check produced.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ice_authority::payload::DenialCode;
use ice_authority::{Authorization, EffectClass, HTTP_CONNECT, Registry, Resource, ResourceKind};
use ice_effects::{AuthorizationError, Stage, StageError};
use ice_kernel::builtin::{BuiltinTool, MAX_TIMEOUT_MS};
use ice_kernel::{CapabilityProposal, Cost, Digest, EventType};
use serde_json::{Map, Value, json};

use crate::RuntimeError;
use crate::spec::{Check, ToolServerSpec};
use ice_effects::mcp::{ToolCallError, ToolServers};

/// Most bytes one `fs.read` returns.
pub const MAX_READ_BYTES: u64 = 1 << 20;
/// Most response bytes one `http.request` keeps.
pub const MAX_HTTP_BYTES: u64 = 1 << 20;
/// Most bytes of an output shown to the agent as text.
pub const MAX_SHOWN_BYTES: usize = 64 << 10;
/// Time limit of one HTTP request.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
/// Most result bytes one `mcp.call` is budgeted for when its server's `max_result_bytes` is
/// not known (its default).
pub const MAX_TOOL_BYTES: u64 = 1 << 20;
/// Most bytes of a check's output kept in its event.
pub const MAX_CHECK_OUTPUT: usize = 4 << 10;

/// A checked target.
#[derive(Clone, Debug)]
pub enum Target {
    /// A workspace file.
    Path(String),
    /// A workspace directory.
    Dir(String),
    /// A URL whose host is the resource, parsed once: the policy decides on its serialisation
    /// and the adapter sends that same serialisation (the agent's text is kept for the record).
    Http(ice_effects::http::HttpTarget),
    /// A program.
    Command(String),
    /// A tool on a configured MCP tool server, with ICE's class for it and the server's hint.
    Tool {
        /// ICE's name of the server.
        server: String,
        /// The tool's name on that server.
        tool: String,
        /// The class ICE's configuration assigns (external when it names none).
        assigned: EffectClass,
        /// The server's annotations as a class hint (can only raise).
        hint: Option<EffectClass>,
    },
}

/// What an effect produced.
pub struct Performed {
    pub event_type: EventType,
    pub payload: Map<String, Value>,
    pub output: Value,
    pub actual: Cost,
}

/// A filesystem effect that did not take place: the denial's code and detail, and whether it
/// was a read that found no file there (the stage is told the path was seen absent once the
/// denial is recorded, and the denial says so).
pub struct FsFailed {
    pub code: DenialCode,
    pub detail: String,
    pub found_nothing: bool,
}

impl From<(DenialCode, String)> for FsFailed {
    fn from((code, detail): (DenialCode, String)) -> FsFailed {
        FsFailed {
            code,
            detail,
            found_nothing: false,
        }
    }
}

/// Resolve the agent's target for its capability into a checked resource.
/// Where a tool's server-side hint comes from: the running servers, or (in a replay) what
/// `CapabilitiesBound` recorded of them.
pub trait ToolLookup {
    /// The tool's hint, or why it cannot be called.
    fn hint(&self, server: &str, tool: &str) -> Result<Option<EffectClass>, (DenialCode, String)>;
}

impl ToolLookup for Option<&ToolServers> {
    fn hint(&self, server: &str, tool: &str) -> Result<Option<EffectClass>, (DenialCode, String)> {
        let Some(tools) = self else {
            return Err((
                DenialCode::EffectFailed,
                format!("tool server {server:?} is not running for this run"),
            ));
        };
        match tools.tool(server, tool) {
            Some(found) => Ok(found.hint),
            None => Err((
                DenialCode::InvalidTarget,
                format!("tool server {server:?} has no tool {tool:?}"),
            )),
        }
    }
}

/// Arguments a built-in capability does not take are refused here (decision rules 2), before
/// the target is resolved.
pub fn resolve_target(
    registry: &Registry,
    r: &CapabilityProposal,
    servers: &[ToolServerSpec],
    tools: &dyn ToolLookup,
) -> Result<(Resource, EffectClass, Target), (DenialCode, String)> {
    if let (Some(builtin), Value::Object(arguments)) =
        (BuiltinTool::for_capability(&r.capability), &r.arguments)
        && registry.get(&r.capability).is_some()
    {
        builtin
            .check_arguments(arguments)
            .map_err(|e| (DenialCode::InvalidTarget, format!("{}: {e}", r.capability)))?;
    }
    // A path an operator would read as another (decision rules 4).
    if let Some(cap) = registry.get(&r.capability)
        && matches!(cap.resource(), ResourceKind::Path | ResourceKind::Dir)
    {
        ice_authority::check_visible(cap.resource(), &r.target)
            .map_err(|e| (DenialCode::InvalidTarget, format!("{}: {e}", r.capability)))?;
    }
    resolve_resource(registry, r, servers, tools)
}

/// [`resolve_target`] without the check of a built-in capability's arguments: what a replay
/// needs to re-make the connection checks of a call the run's own rules let through.
pub fn resolve_resource(
    registry: &Registry,
    r: &CapabilityProposal,
    servers: &[ToolServerSpec],
    tools: &dyn ToolLookup,
) -> Result<(Resource, EffectClass, Target), (DenialCode, String)> {
    let Some(cap) = registry.get(&r.capability) else {
        return Err((
            DenialCode::UnknownCapability,
            format!("no capability type {:?} is registered", r.capability),
        ));
    };
    if !r.arguments.is_object() {
        return Err((
            DenialCode::InvalidTarget,
            "the arguments must be a JSON object".into(),
        ));
    }
    let escape = |t: &str| t.starts_with('/') || t.split('/').any(|s| s == "..");
    let (resource, target) = match cap.resource() {
        ResourceKind::Path | ResourceKind::Dir => {
            if escape(&r.target) {
                return Err((
                    DenialCode::Confinement,
                    // The target is in the request; a long one is not repeated whole.
                    format!(
                        "{:?} leaves the workspace (absolute paths and .. segments are refused)",
                        crate::executor::cut(&r.target, 512)
                    ),
                ));
            }
            if cap.resource() == ResourceKind::Path {
                let res = Resource::path(&r.target)
                    .map_err(|e| (DenialCode::InvalidTarget, e.to_string()))?;
                (res, Target::Path(r.target.clone()))
            } else {
                let res = Resource::dir(&r.target)
                    .map_err(|e| (DenialCode::InvalidTarget, e.to_string()))?;
                (res, Target::Dir(r.target.clone()))
            }
        }
        ResourceKind::Host => {
            let t = ice_effects::http::parse_target(&r.target)
                .map_err(|e| (DenialCode::InvalidTarget, e.to_string()))?;
            (t.host().clone(), Target::Http(t))
        }
        ResourceKind::Command => {
            let res = Resource::command(&r.target)
                .map_err(|e| (DenialCode::InvalidTarget, e.to_string()))?;
            (res, Target::Command(r.target.clone()))
        }
        ResourceKind::Tool => {
            let (server, tool) = r.target.split_once('/').ok_or((
                DenialCode::InvalidTarget,
                "give the tool as server/tool".to_string(),
            ))?;
            let res = Resource::tool(server, tool)
                .map_err(|e| (DenialCode::InvalidTarget, e.to_string()))?;
            let Some(spec) = servers.iter().find(|s| s.name == server) else {
                return Err((
                    DenialCode::InvalidTarget,
                    format!("no tool server {server:?} is configured for this run"),
                ));
            };
            let hint = tools.hint(server, tool)?;
            let target = Target::Tool {
                server: server.to_string(),
                tool: tool.to_string(),
                assigned: spec.class_of(tool),
                hint,
            };
            (res, target)
        }
    };
    let effect = match &target {
        Target::Tool { assigned, hint, .. } => {
            registry.classify_assigned(&r.capability, &r.arguments, Some(*assigned), *hint)
        }
        _ => registry.classify(&r.capability, &r.arguments, None),
    };
    Ok((resource, effect, target))
}

/// ICE's class for a tool of a configured server, before and after the server's hint: the
/// spec's class (external when it names none), raised, never lowered, by the annotations.
pub fn tool_class(
    registry: &Registry,
    server: &ToolServerSpec,
    tool: &ice_effects::mcp::ToolSpec,
) -> (EffectClass, EffectClass) {
    let assigned = server.class_of(&tool.name);
    let class = registry.classify_assigned("mcp.call", &Value::Null, Some(assigned), tool.hint);
    (assigned, class)
}

/// A policy request for `target`, told ICE's class of a tool target and its server's hint.
pub fn classed<'a>(
    builder: ice_authority::RequestBuilder<'a>,
    target: &Target,
) -> ice_authority::RequestBuilder<'a> {
    match target {
        Target::Tool {
            assigned,
            hint: Some(h),
            ..
        } => builder.assigned_class(*assigned).effect_hint(*h),
        Target::Tool { assigned, .. } => builder.assigned_class(*assigned),
        _ => builder,
    }
}

/// The arguments Cedar sees: bounded facts about the call, never file contents.
pub fn policy_arguments(capability: &str, arguments: &Value, target: &Target) -> Value {
    match capability {
        "fs.write" => json!({"bytes": content_of(arguments).len() as i64}),
        "fs.read" | "fs.list" | "fs.delete" => json!({}),
        // Everything from the one parse the adapter sends (never the agent's text), as the
        // schema declares it: method, url, scheme, host, port, path, query.
        "http.request" => match target {
            Target::Http(t) => ice_effects::http::policy_arguments(t, arguments),
            _ => json!({"method": ice_effects::http::method_of(arguments)}),
        },
        "process.exec" => json!({"args": args_of(arguments)}),
        // A tool's own arguments are not declared to Cedar (see the schema's ToolContext).
        "mcp.call" => json!({}),
        _ => arguments.clone(),
    }
}

fn content_of(arguments: &Value) -> &str {
    arguments
        .get("content")
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn args_of(arguments: &Value) -> Vec<String> {
    arguments
        .get("args")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// What a call reserves: one tool call, and the most bytes it can move (bounded by what the
/// budget has left, so reads never spend past it). A tool call may receive `tool_result_max`
/// bytes (its server's `max_result_bytes`; [`MAX_TOOL_BYTES`] when `None`); the call is then
/// given no more than its reservation leaves after its arguments.
pub fn estimate(
    capability: &str,
    arguments: &Value,
    left: &ice_authority::BudgetLeft,
    tool_result_max: Option<u64>,
) -> Cost {
    // The most a call may move: `max`, or what the budget has left when that is less. A call
    // that needs at least `min` bytes reserves `min` when less is left, which will not fit.
    let bounded = |min: u64, max: u64| match left.bytes {
        Some(l) if l < min.max(1) => min.max(1),
        Some(l) => max.min(l),
        None => max,
    };
    let bytes = match capability {
        "fs.read" => bounded(1, MAX_READ_BYTES),
        "fs.write" => content_of(arguments).len() as u64,
        "http.request" => {
            let body = arguments
                .get("body")
                .and_then(Value::as_str)
                .map_or(0, |b| b.len() as u64);
            bounded(body + 1, body + MAX_HTTP_BYTES)
        }
        "process.exec" => bounded(1, 2 * MAX_CHECK_OUTPUT as u64),
        "mcp.call" => {
            let sent = serde_json::to_string(arguments).map_or(0, |a| a.len() as u64);
            bounded(
                sent + 1,
                sent.saturating_add(tool_result_max.unwrap_or(MAX_TOOL_BYTES)),
            )
        }
        _ => 0,
    };
    Cost {
        tool_calls: 1,
        bytes,
        ..Cost::default()
    }
}

/// The run's stage (absent once committed or discarded).
pub struct Staging {
    pub(crate) stage: Option<Stage>,
    pub(crate) dir: PathBuf,
}

impl Staging {
    pub(crate) fn discard(&mut self) {
        if let Some(s) = self.stage.take() {
            let _ = s.discard();
        }
    }

    /// The live stage's ops (none when it is closed).
    pub(crate) fn ops(&self) -> &[ice_effects::StagedOp] {
        self.stage.as_ref().map_or(&[], |s| s.ops())
    }

    /// Forget the ops after the first `len` (a write whose record failed).
    pub(crate) fn truncate(&mut self, len: usize) {
        if let Some(s) = self.stage.as_mut() {
            s.truncate(len);
        }
    }

    /// Remove the run's stage directory (a commit journal first, durably): only once the
    /// run's end is recorded, so a journal never disappears before its commit is on record.
    pub(crate) fn remove_store(&mut self) {
        self.stage = None;
        let _ = ice_effects::release(&self.dir);
    }

    fn get(&mut self) -> Result<&mut Stage, (DenialCode, String)> {
        self.stage.as_mut().ok_or((
            DenialCode::EffectFailed,
            "the run's stage is closed".to_string(),
        ))
    }
}

fn fs_refusal(e: StageError) -> (DenialCode, String) {
    let code = match &e {
        StageError::Fs(ice_effects::FsError::Refused(r)) if is_constraint(r) => {
            DenialCode::GrantConstraint
        }
        StageError::Fs(f) if f.is_confinement() => DenialCode::Confinement,
        _ => DenialCode::EffectFailed,
    };
    (code, e.to_string())
}

/// Whether the effects layer refused a use for going past its grant's constraints.
fn is_constraint(e: &AuthorizationError) -> bool {
    matches!(e, AuthorizationError::Constraint { .. })
}

fn text(bytes: &[u8]) -> String {
    let shown = &bytes[..bytes.len().min(MAX_SHOWN_BYTES)];
    String::from_utf8_lossy(shown).into_owned()
}

/// Whether an effect only reads the run's staged view of the workspace (`fs.read` of a file,
/// `fs.list` of a directory): performed in process, under the run's lock, it changes nothing
/// inside ICE (the stage is only read) or outside it. Such a call is recorded whole after it
/// happens (see the executor's module documentation); every other one is written ahead.
pub fn reads_only(capability: &str, target: &Target) -> bool {
    matches!(
        (capability, target),
        ("fs.read", Target::Path(_)) | ("fs.list", Target::Dir(_))
    )
}

/// A filesystem effect, on the stage.
pub fn perform_fs(
    staging: &mut Staging,
    auth: &Authorization,
    target: &Target,
    arguments: &Value,
    reserved: &Cost,
) -> Result<Performed, FsFailed> {
    let stage = staging.get()?;
    match (auth.capability(), target) {
        ("fs.read", Target::Path(p)) => {
            // Nothing found in the workspace, not a file this run deleted in its stage.
            let in_workspace = !stage.is_staged(p);
            let read = stage.read(auth, p, reserved.bytes).map_err(|e| {
                let found_nothing = in_workspace
                    && matches!(
                        e,
                        ice_effects::StageError::Fs(ice_effects::FsError::NotFound { .. })
                    );
                let (code, detail) = fs_refusal(e);
                FsFailed {
                    code,
                    detail,
                    found_nothing,
                }
            })?;
            let n = read.content.len() as u64;
            // The evidence has hashed the content already.
            let digest = read
                .evidence
                .outputs
                .iter()
                .find(|o| o.name == "content" && o.bytes == n)
                .map_or_else(|| Digest::of(&read.content), |o| o.digest);
            // Built field by field: `json!` would copy each value it is given once more.
            let mut payload = Map::new();
            payload.insert("path".into(), Value::String(p.clone()));
            payload.insert("bytes".into(), n.into());
            payload.insert("size".into(), read.size.into());
            payload.insert("truncated".into(), read.truncated.into());
            payload.insert("digest".into(), Value::String(digest.to_hex()));
            payload.insert("evidence".into(), read.evidence.to_json());
            let mut output = Map::new();
            output.insert("content".into(), Value::String(text(&read.content)));
            output.insert("bytes".into(), n.into());
            output.insert("truncated".into(), read.truncated.into());
            Ok(Performed {
                event_type: EventType::FileRead,
                payload,
                output: Value::Object(output),
                actual: Cost {
                    bytes: n,
                    ..Cost::default()
                },
            })
        }
        ("fs.list", Target::Dir(d)) => {
            let listing = stage.list(auth, d).map_err(fs_refusal)?;
            let entries: Vec<Value> = listing
                .entries
                .iter()
                .map(|e| json!({"name": e.name, "kind": e.kind.as_str(), "size": e.size}))
                .collect();
            let mut payload = Map::new();
            payload.insert("dir".into(), Value::String(d.clone()));
            payload.insert("entries".into(), entries.len().into());
            payload.insert("digest".into(), Value::String(listing.digest().to_hex()));
            payload.insert(
                "evidence".into(),
                listing.evidence(Some(&auth.grant().to_string())).to_json(),
            );
            let mut output = Map::new();
            output.insert("entries".into(), Value::Array(entries));
            Ok(Performed {
                event_type: EventType::FileRead,
                payload,
                output: Value::Object(output),
                actual: Cost::default(),
            })
        }
        ("fs.write", Target::Path(p)) => {
            // Checked by `resolve_target`; never written as an empty file when absent.
            let Some(content) = arguments.get("content").and_then(Value::as_str) else {
                return Err((
                    DenialCode::InvalidTarget,
                    "fs.write: `content` is required and must be a string".to_string(),
                )
                    .into());
            };
            let content = content.as_bytes();
            let staged = stage.write(auth, p, content).map_err(fs_refusal)?;
            Ok(staged_performed(p, staged, content.len() as u64))
        }
        ("fs.delete", Target::Path(p)) => {
            let staged = stage.delete(auth, p).map_err(fs_refusal)?;
            Ok(staged_performed(p, staged, 0))
        }
        (cap, _) => Err((
            DenialCode::EffectFailed,
            format!("{cap} is not a filesystem capability"),
        )
            .into()),
    }
}

fn staged_performed(path: &str, staged: ice_effects::StagedEffect, bytes: u64) -> Performed {
    let after = match &staged.op {
        ice_effects::StagedOp::Write { digest, .. } => Some(*digest),
        ice_effects::StagedOp::Delete { .. } => None,
    };
    let mut payload = obj(json!({
        "path": path,
        "staged": staged.op.to_json(),
        "after": after.map(|d| d.to_hex()),
        "bytes": bytes,
        "evidence": staged.evidence.to_json(),
    }));
    // What the run saw there: a stage rebuilt from the record checks the commit against
    // it as the live one does.
    if let Some(seen) = staged.seen {
        payload.insert("seen".into(), crate::books::seen_json(seen));
    }
    Performed {
        event_type: EventType::EffectStaged,
        payload,
        output: json!({"staged": path, "digest": after.map(|d| d.to_hex())}),
        actual: Cost {
            bytes,
            ..Cost::default()
        },
    }
}

/// An HTTP call, as its connection checks see it: each address its host resolves to is
/// decided (`http.connect`, [`ice_authority::PolicySet::refuses_connection`]) with the call's
/// own principal, resource and context. The live run and the replay decide through it alike.
pub struct ConnectionCall {
    pub registry: std::sync::Arc<Registry>,
    pub entities: std::sync::Arc<ice_authority::EntityCache>,
    pub run: ice_kernel::RunId,
    pub agent: String,
    pub resource: Resource,
    pub intent: String,
    /// What the policy read as `context.arguments` for the call.
    pub arguments: Value,
    /// The budget left once the call's reservation was made.
    pub budget_left: ice_authority::BudgetLeft,
}

impl ConnectionCall {
    /// The forbids of `policy` that refuse connecting to `address` (`None`: none does).
    pub fn decide(
        &self,
        policy: &ice_authority::PolicySet,
        address: std::net::IpAddr,
    ) -> Result<Option<ice_authority::Decision>, ice_authority::RequestError> {
        let request = ice_authority::Request::builder(
            &self.run,
            &self.agent,
            "http.request",
            self.resource.clone(),
        )
        .intent(&self.intent)
        .arguments(&self.arguments)
        .budget_left(self.budget_left)
        .entity_cache(&self.entities)
        .connecting_to(address)
        .build(&self.registry)?;
        Ok(policy.refuses_connection(&request))
    }
}

/// What one HTTP call's resolution let through and refused, for the record of a call that
/// failed: each address as decided ([`ice_authority::connection_address`]).
#[derive(Debug, Default)]
pub struct Connections {
    /// The addresses let through, in the resolver's order.
    pub allowed: Vec<String>,
    /// The address refused, and the forbids that refused it.
    pub refused: Option<(String, Vec<String>)>,
}

/// Shared between the HTTP client's resolver and the call that records the outcome.
pub type ConnectionRecord = std::sync::Arc<std::sync::Mutex<Connections>>;

/// The live run's connection checks of one call, under the policy that decided it (none when
/// no forbid names `http.connect`: every address is let through, and still recorded).
pub struct ConnectionCheck {
    pub call: ConnectionCall,
    pub policy: Option<std::sync::Arc<ice_authority::PolicySet>>,
    pub record: ConnectionRecord,
}

impl ConnectionCheck {
    /// `Err(why)` if a forbid refuses a connection to `address` (or the check cannot be made).
    pub fn check(&self, address: std::net::IpAddr) -> Result<(), String> {
        let decided = ice_authority::connection_address(address).to_string();
        let refusal = match &self.policy {
            Some(policy) => self
                .call
                .decide(policy, address)
                .map_err(|e| format!("the connection check could not be made: {e}"))?,
            None => None,
        };
        let mut record = self
            .record
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match refusal {
            Some(decision) => {
                record.refused = Some((decided, decision.determining_policies().to_vec()));
                Err(format!("{HTTP_CONNECT} {decision}"))
            }
            None => {
                record.allowed.push(decided);
                Ok(())
            }
        }
    }
}

/// The record of an HTTP call that was sent (a connection was made) and then failed before a
/// whole answer came back: an `APIRequestExecuted` whose outcome is unknown, with the
/// request's evidence, so neither the agent nor an auditor takes it that nothing happened.
fn unanswered(
    method: &str,
    url: &ice_effects::http::HttpTarget,
    body: &[u8],
    reserved: &Cost,
    error: &ice_effects::http::HttpError,
    evidence: &ice_effects::evidence::Evidence,
    cut: Option<&str>,
) -> Performed {
    let error = format!("{error}{}", cut.unwrap_or_default());
    let status = match &evidence.detail {
        ice_effects::evidence::Detail::Http { status, .. } => *status,
        _ => None,
    };
    let note = "the request was sent and no whole answer came back: it may have reached the server, and what the server did with it is unknown";
    Performed {
        event_type: EventType::APIRequestExecuted,
        payload: obj(json!({
            "method": method,
            "url": url.as_str(),
            "target": url.given(),
            "status": status,
            "outcome": "unknown",
            "error": error,
            "bytes": 0,
            "truncated": false,
            "evidence": evidence.to_json(),
        })),
        output: json!({"status": status, "outcome": "unknown", "error": error, "note": note}),
        actual: Cost {
            bytes: (body.len() as u64).min(reserved.bytes),
            ..Cost::default()
        },
    }
}

/// How long an effect may run: `limit`, or what the run's wall-time budget has left if that is
/// less (at least 1 ms); and, when the budget is what bounds it, the words for a failure.
pub(crate) fn bounded(limit: Duration, time_left: Option<Duration>) -> (Duration, Option<String>) {
    match time_left {
        Some(left) if left < limit => {
            let left = left.max(Duration::from_millis(1));
            (
                left,
                Some(format!(
                    " (cut at the end of the run's wall_time budget, which had {} ms left)",
                    left.as_millis()
                )),
            )
        }
        _ => (limit, None),
    }
}

/// A network or process effect, run no longer than `time_left` (what the run's wall-time
/// budget has left). An HTTP call connects only to addresses `connections` lets it.
pub async fn perform_remote(
    auth: &Authorization,
    target: &Target,
    arguments: &Value,
    reserved: &Cost,
    connections: ConnectionCheck,
    time_left: Option<Duration>,
) -> Result<Performed, (DenialCode, String)> {
    match (auth.capability(), target) {
        ("http.request", Target::Http(url)) => {
            let method = ice_effects::http::method_of(arguments);
            let body = arguments
                .get("body")
                .and_then(Value::as_str)
                .unwrap_or("")
                .as_bytes()
                .to_vec();
            let limit = reserved.bytes.saturating_sub(body.len() as u64);
            let (timeout, cut) = bounded(HTTP_TIMEOUT, time_left);
            let limits = ice_effects::http::HttpLimits {
                timeout,
                max_response_bytes: limit,
            };
            let client = ice_effects::http::HttpClient::with_admission(
                limits,
                std::sync::Arc::new(move |ip| connections.check(ip)),
            );
            // The target the policy decided on, sent as it is (not parsed again).
            let (target, sent) = (url.clone(), method.clone());
            let auth = auth.clone();
            let request_body = body.clone();
            let sent = tokio::task::spawn_blocking(move || {
                client.send(&auth, &target, &sent, &[], &request_body)
            })
            .await
            .map_err(|e| {
                (
                    DenialCode::EffectFailed,
                    format!("the HTTP call failed: {e}"),
                )
            })?;
            // A timeout is put down to the budget when the budget's bound is the one that
            // fired, not a grant's shorter `timeout_ms`.
            let budget_cut = |e: &ice_effects::http::HttpError| match e {
                ice_effects::http::HttpError::Timeout { timeout: t, .. } if *t == timeout => {
                    cut.as_deref()
                }
                _ => None,
            };
            let response = match sent {
                Ok(r) => r,
                // Sent, and then no whole answer: the effect happened as far as anyone can
                // know, with an unknown outcome. Recorded as the call it was.
                Err(ice_effects::http::HttpError::Unanswered { error, evidence }) => {
                    let cut = budget_cut(&error);
                    return Ok(unanswered(
                        &method, url, &body, reserved, &error, &evidence, cut,
                    ));
                }
                Err(e) => {
                    let code = match &e {
                        ice_effects::http::HttpError::Url(_) => DenialCode::InvalidTarget,
                        ice_effects::http::HttpError::Refused(r) if is_constraint(r) => {
                            DenialCode::GrantConstraint
                        }
                        ice_effects::http::HttpError::Refused(_) => DenialCode::Confinement,
                        ice_effects::http::HttpError::AddressRefused { .. } => {
                            DenialCode::PolicyDenied
                        }
                        _ => DenialCode::EffectFailed,
                    };
                    return Err((code, format!("{e}{}", budget_cut(&e).unwrap_or_default())));
                }
            };
            let n = response.body.len() as u64 + body.len() as u64;
            Ok(Performed {
                event_type: EventType::APIRequestExecuted,
                // `url` is what was decided on and sent; `target` the agent's text for it.
                payload: obj(json!({
                    "method": method,
                    "url": url.as_str(),
                    "target": url.given(),
                    "status": response.status,
                    "bytes": response.body.len(),
                    "truncated": response.body_truncated,
                    "evidence": response.evidence.to_json(),
                })),
                output: json!({"status": response.status, "body": text(&response.body), "truncated": response.body_truncated}),
                actual: Cost {
                    bytes: n.min(reserved.bytes),
                    ..Cost::default()
                },
            })
        }
        (cap, _) => Err((
            DenialCode::EffectFailed,
            format!(
                "{cap} cannot be carried out by this runtime yet (no adapter is configured for it)"
            ),
        )),
    }
}

/// `mcp.call`: call the tool on its server. A call that reached the server is a `ToolInvoked`
/// whatever came back (a result, the tool's own error, a timeout, a crash, an oversized or
/// malformed answer): the agent is told, and the record says what happened. A call the adapter
/// refused before sending anything is a refusal.
pub async fn perform_tool(
    tools: &ToolServers,
    run: &ice_kernel::RunId,
    auth: &Authorization,
    target: &Target,
    arguments: &Value,
    reserved: &Cost,
    time_left: Option<Duration>,
) -> Result<Performed, (DenialCode, String)> {
    let Target::Tool { server, tool, .. } = target else {
        return Err((DenialCode::EffectFailed, "not a tool target".into()));
    };
    let args = match arguments {
        Value::Object(m) => m.clone(),
        _ => {
            return Err((
                DenialCode::InvalidTarget,
                "the arguments must be a JSON object".into(),
            ));
        }
    };
    let sent = serde_json::to_string(arguments).map_or(0, |a| a.len() as u64);
    let started = std::time::Instant::now();
    let protocol = tools.protocol_version(server);
    let mut payload = obj(json!({
        "server": server,
        "tool": tool,
        "arguments": arguments,
    }));
    // The result gets what the reservation leaves after the arguments (the bytes budget
    // bounds what the call moves, as it does an HTTP response).
    let result_within = reserved.bytes.saturating_sub(sent);
    match tools
        .call_within(
            auth,
            run,
            server,
            tool,
            args,
            ice_effects::mcp::CallLimits {
                time: time_left,
                result_bytes: Some(result_within),
            },
        )
        .await
    {
        Ok(out) => {
            payload.insert("result".into(), out.result.clone());
            payload.insert("is_error".into(), Value::Bool(out.is_error));
            payload.insert("bytes".into(), json!(out.bytes));
            payload.insert("elapsed_us".into(), json!(out.elapsed.as_micros() as u64));
            payload.insert("protocol_version".into(), json!(out.protocol_version));
            Ok(Performed {
                event_type: EventType::ToolInvoked,
                payload,
                output: out.result,
                actual: Cost {
                    bytes: (sent + out.bytes as u64).min(reserved.bytes),
                    ..Cost::default()
                },
            })
        }
        Err(ToolCallError::Authorization(e)) if is_constraint(&e) => {
            Err((DenialCode::GrantConstraint, e.to_string()))
        }
        Err(
            e @ (ToolCallError::Authorization(_)
            | ToolCallError::UnknownServer(_)
            | ToolCallError::NotRunning { .. }
            | ToolCallError::UnknownTool { .. }),
        ) => Err((DenialCode::EffectFailed, e.to_string())),
        Err(e) => {
            let kind = match &e {
                ToolCallError::Timeout { .. } => "timeout",
                ToolCallError::ServerGone { .. } => "server_gone",
                ToolCallError::Oversized { .. } => "oversized",
                _ => "protocol",
            };
            let detail = e.to_string();
            payload.insert("error".into(), json!({"kind": kind, "detail": detail}));
            payload.insert("is_error".into(), Value::Bool(true));
            payload.insert(
                "elapsed_us".into(),
                json!(started.elapsed().as_micros() as u64),
            );
            payload.insert("protocol_version".into(), json!(protocol));
            Ok(Performed {
                event_type: EventType::ToolInvoked,
                payload,
                // A server lost mid-call (or a send that failed) may or may not have taken
                // the request: the agent is not told either way for certain.
                output: tool_error_result(&if kind == "server_gone" {
                    format!(
                        "the call to {server}/{tool} failed, and may have reached the tool before it did: {detail}"
                    )
                } else {
                    format!("the call reached {server}/{tool} but failed: {detail}")
                }),
                actual: Cost {
                    bytes: sent.min(reserved.bytes),
                    ..Cost::default()
                },
            })
        }
    }
}

/// An MCP `CallToolResult` that reports an error to the agent as text it can read.
pub fn tool_error_result(text: &str) -> Value {
    json!({"content": [{"type": "text", "text": text}], "isError": true})
}

/// A copy of the workspace with the staged writes applied, for a command to run in.
pub fn prepare_exec(staging: &Staging) -> Result<tempfile::TempDir, (DenialCode, String)> {
    let Some(stage) = staging.stage.as_ref() else {
        return Err((DenialCode::EffectFailed, "the run's stage is closed".into()));
    };
    let copy = tempfile::Builder::new()
        .prefix("ice-exec-")
        .tempdir()
        .map_err(|e| (DenialCode::EffectFailed, format!("temp dir: {e}")))?;
    stage
        .materialize(copy.path().join("workspace"))
        .map_err(fs_refusal)?;
    Ok(copy)
}

/// What the record of a command killed part-way says.
const STOPPED_COMMAND: &str = "the run was killed while the command ran: its process group was killed part-way, so what it did before is unknown";

/// `process.exec`: run the authorised program in a throw-away copy of the staged workspace
/// (what it changes there is discarded with the copy). Once `stop` is set (the run is being
/// killed) the command's process group is killed, and the record says so.
pub async fn perform_exec(
    auth: &Authorization,
    program: &str,
    arguments: &Value,
    copy: tempfile::TempDir,
    time_left: Option<Duration>,
    reserved: &Cost,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<Performed, (DenialCode, String)> {
    // What the agent is given (stdout and stderr together) is at most what the call reserved.
    let cap = reserved.bytes;
    let asked = arguments
        .get("timeout_ms")
        .and_then(Value::as_u64)
        .unwrap_or(60_000)
        .min(MAX_TIMEOUT_MS);
    let (timeout, _) = bounded(Duration::from_millis(asked), time_left);
    let spec = ice_effects::exec::ExecSpec {
        program: program.to_string(),
        args: args_of(arguments),
        dir: copy.path().join("workspace"),
        timeout,
        max_output_bytes: (MAX_CHECK_OUTPUT as u64).min(cap),
    };
    let auth = auth.clone();
    let o = tokio::task::spawn_blocking(move || {
        let r = ice_effects::exec::run_until(&auth, &spec, &stop);
        drop(copy);
        r
    })
    .await
    .map_err(|e| {
        (
            DenialCode::EffectFailed,
            format!("the command could not run: {e}"),
        )
    })?
    .map_err(|e| (DenialCode::EffectFailed, e.to_string()))?;
    let (mut stdout, mut stderr) = (o.stdout, o.stderr);
    // stdout first, then what the reservation has left for stderr.
    let cut = (stdout.len() + stderr.len()) as u64 > cap;
    stdout.truncate(cap.min(stdout.len() as u64) as usize);
    stderr.truncate(
        cap.saturating_sub(stdout.len() as u64)
            .min(stderr.len() as u64) as usize,
    );
    let n = (stdout.len() + stderr.len()) as u64;
    Ok(Performed {
        event_type: EventType::ToolInvoked,
        payload: {
            let mut p = obj(json!({
                "program": program,
                "args": args_of(arguments),
                "exit": o.exit_code,
                "timed_out": o.timed_out,
                "evidence": o.evidence.to_json(),
            }));
            if o.stopped {
                // Killed part-way: what it did before is unknown to ICE.
                p.insert("stopped".into(), json!(STOPPED_COMMAND));
            }
            if cut {
                // The evidence's digests are of what was read; the agent was given this much.
                p.insert("output_cut_at".into(), json!(cap));
            }
            p
        },
        output: {
            let mut out = json!({"exit": o.exit_code, "timed_out": o.timed_out,
                                 "stdout": text(&stdout), "stderr": text(&stderr)});
            if o.stopped {
                out["stopped"] = json!(STOPPED_COMMAND);
            }
            out
        },
        actual: Cost {
            bytes: n,
            ..Cost::default()
        },
    })
}

pub(crate) fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// A workspace file's digest as the world sees it (not the staged view), for assumptions.
pub fn workspace_digest(workspace: &Path, path: &str) -> Option<Digest> {
    std::fs::read(workspace.join(path))
        .ok()
        .map(|b| Digest::of(&b))
}

/// Run the declared checks on a copy of the workspace with the staged writes applied.
pub async fn run_checks(staging: &Staging, checks: &[Check]) -> Vec<Result<Value, String>> {
    let Some(stage) = staging.stage.as_ref() else {
        return checks
            .iter()
            .map(|_| Err("the run's stage is closed".to_string()))
            .collect();
    };
    let copy = match tempfile::Builder::new().prefix("ice-check-").tempdir() {
        Ok(d) => d,
        Err(e) => {
            return checks
                .iter()
                .map(|_| Err(format!("temp dir: {e}")))
                .collect();
        }
    };
    let dest = copy.path().join("workspace");
    if let Err(e) = stage.materialize(&dest) {
        return checks
            .iter()
            .map(|_| Err(format!("materializing the staged workspace: {e}")))
            .collect();
    }
    let mut out = Vec::new();
    for c in checks {
        let spec = ice_effects::exec::ExecSpec {
            program: c.run[0].clone(),
            args: c.run[1..].to_vec(),
            dir: dest.clone(),
            timeout: Duration::from_millis(c.timeout_ms),
            max_output_bytes: MAX_CHECK_OUTPUT as u64,
        };
        let res = tokio::task::spawn_blocking(move || ice_effects::exec::run_check(&spec))
            .await
            .map_err(|e| format!("the check could not run: {e}"))
            .and_then(|r| r.map_err(|e| e.to_string()));
        out.push(match res {
            Ok(o) => Ok(json!({
                "check": c.name,
                "passed": o.success(),
                "exit": o.exit_code,
                "timed_out": o.timed_out,
                "stdout": text(&o.stdout),
                "stderr": text(&o.stderr),
                "evidence": o.evidence.to_json(),
            })),
            Err(e) => Err(e),
        });
    }
    out
}

/// Apply the staged writes to the workspace (crash-safe: the journal is the commit point).
/// The journal stays until the commit is recorded and the run torn down
/// ([`Staging::remove_store`]): a crash before the record leaves it for recovery to roll
/// forward and record, never a workspace changed under a log that says nothing was.
///
/// A commit refused before its commit point (a path someone else changed meanwhile, one that
/// cannot be written) is [`RuntimeError::CommitRefused`]: the stage is kept, to be discarded
/// by the abort that follows, and the workspace is as it was. So is a journal that could not
/// be written (a full disk): nothing was applied, and the stage, used up, goes with the run.
pub fn commit(staging: &mut Staging) -> Result<Vec<ice_effects::Change>, RuntimeError> {
    let Some(stage) = staging.stage.take() else {
        return Err(RuntimeError::Io("the run's stage is closed".into()));
    };
    let changes = match stage.prepare() {
        Ok(changes) => changes,
        Err(e) => {
            // The stage stays: an abort discards it, or a later try commits it.
            staging.stage = Some(stage);
            // What the workspace will not take ends the run; a failure to read may pass.
            return Err(if e.is_refusal() {
                RuntimeError::CommitRefused(e.to_string())
            } else {
                RuntimeError::Io(format!("commit: {e}"))
            });
        }
    };
    // Crash tests only (debug builds): ICE_TEST_PAUSE_IN_COMMIT=N stops the commit after N
    // applied changes (0: before the journal is written; `applied`: once every change is
    // applied, before the commit is recorded) so the test can kill the process there.
    let var = std::env::var("ICE_TEST_PAUSE_IN_COMMIT")
        .ok()
        .filter(|_| cfg!(debug_assertions));
    let pause: Option<usize> = var.as_deref().and_then(|v| v.parse().ok());
    let mut hook = |p: ice_effects::CommitPoint<'_>| {
        let at = match p {
            ice_effects::CommitPoint::Prepared { .. } => Some(0),
            ice_effects::CommitPoint::Applied { index, .. } => Some(index + 1),
            ice_effects::CommitPoint::JournalDurable => None,
        };
        if pause.is_some() && at == pause {
            eprintln!(
                "ICE_TEST: paused in commit after {} change(s)",
                at.unwrap_or(0)
            );
            std::thread::sleep(Duration::from_secs(3600));
        }
    };
    let report = stage
        .apply_prepared(changes, &mut hook)
        .map_err(|e| match e {
            // Before the commit point, with no journal left: the run aborts now rather than
            // staying in validation with its stage used up until a restart aborts it.
            e @ ice_effects::StageError::JournalUnwritten { .. } => {
                RuntimeError::CommitRefused(e.to_string())
            }
            e => RuntimeError::Io(format!("commit: {e}")),
        })?;
    if var.as_deref() == Some("applied") {
        eprintln!("ICE_TEST: paused in commit after every change was applied");
        std::thread::sleep(Duration::from_secs(3600));
    }
    Ok(report.changes)
}
