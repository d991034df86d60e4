//! # ice-api: the operator HTTP API (interfaces layer)
//!
//! JSON over HTTP under `/api/v1`, served by `ice serve` beside MCP (`/mcp`), for operators:
//! runs (list, show, start from a run spec, kill, reconfigure), events (a page of a run's, one
//! by id, a live stream over server-sent events), approvals (list, approve, deny), governed
//! memory (list, show, promote, invalidate, deprecate, supersede), verification, checkpoints
//! and proofs. [`OPENAPI`] (`docs/openapi.json`, served at `/api/v1/openapi.json`) describes
//! every operation; a test checks that the router and the document name the same routes.
//!
//! - **Who may call.** Every operation but the OpenAPI document needs
//!   `Authorization: Bearer TOKEN` with an operator's token ([`Credentials`]; tokens are kept
//!   only as SHA-256 digests and compared in constant time). No token or an unknown one: 401.
//!   An agent's token: 403 (agents propose through MCP; they never act as operators).
//! - **What is recorded.** The API decides nothing and writes no event itself: each action is
//!   the runtime's own operator function (`kill`, `reconfigure`, `answer_approval`,
//!   `promote_memory`, `transition_memory`, `start`), called with the authenticated operator's
//!   name, so the log records it as `operator:NAME`.
//! - **Errors.** `{"error": {"code", "message"}}`: malformed JSON or a body of the wrong shape
//!   400, a body over 1 MiB 413, a body that is not declared JSON 415, a bad id 400, an
//!   unknown one 404, a method the path does not take 405, more than one `Authorization`
//!   header 400, an action the run's (or memory's) state refuses 409 (promoting an event that
//!   is already that active memory included).
//! - **Runs started here** are driven on the server by the driver their spec names (plan or
//!   LLM, through the [`AgentFactory`] the host gives); the response (202) comes once the run
//!   has recorded its first event, and a checkpoint is signed when it stops.

#![warn(missing_docs)]

mod audit;
mod auth;
mod error;
mod events;
mod io;
mod memory;
mod runs;

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use ice_kernel::Agent;
use ice_log::checkpoint::{NoteSigner, NoteVerifier};
use ice_runtime::{RunSpec, Runtime};
use tokio_util::sync::CancellationToken;

pub use auth::{
    CredentialStore, Credentials, ELICITATION_PREFIX, Operator, Role, agent_of, check_name,
    check_operator_name, metrics_reader, metrics_readers_only, token_digest,
};
/// The router type [`router`] returns (axum's), for hosts that serve it.
pub use axum::Router;
pub use error::ApiError;
pub use io::MAX_BODY_BYTES;

/// Where the API is mounted.
pub const BASE_PATH: &str = "/api/v1";

/// The OpenAPI 3.1 description of the API (`docs/openapi.json` in the repository).
pub const OPENAPI: &str = include_str!("../../../docs/openapi.json");

/// Builds the agent a run spec names (its driver: a plan, an LLM), for runs the API starts or
/// resumes; `Err` says why there is none (an external driver connects through MCP).
pub type AgentFactory = Arc<dyn Fn(&RunSpec) -> Result<Box<dyn Agent>, String> + Send + Sync>;

/// What the API works with: the installation's runtime, its checkpoint keys, the tokens it
/// accepts and how to build agents.
pub struct ApiState {
    pub(crate) runtime: &'static Runtime,
    pub(crate) signer: NoteSigner,
    pub(crate) verifier: NoteVerifier,
    pub(crate) credentials: Arc<CredentialStore>,
    pub(crate) agents: AgentFactory,
    pub(crate) stop: CancellationToken,
    pub(crate) token_hint: String,
    pub(crate) driving: RunsInFlight,
    /// What the last checkpoint's check read, so the next one reads only what is new.
    pub(crate) signer_memory: ice_log::verify::SignerMemory,
}

/// The runs the API is driving on the server (started or resumed through it), so a server that
/// stops can wait until they have recorded their last events before it signs its final
/// checkpoint ([`RunsInFlight::settled`]).
#[derive(Clone)]
pub struct RunsInFlight(Arc<tokio::sync::watch::Sender<usize>>);

impl Default for RunsInFlight {
    fn default() -> Self {
        RunsInFlight(Arc::new(tokio::sync::watch::channel(0).0))
    }
}

impl RunsInFlight {
    /// One more run being driven, until the returned guard drops.
    pub(crate) fn begin(&self) -> Driving {
        self.0.send_modify(|n| *n += 1);
        Driving(self.0.clone())
    }

    /// How many runs are being driven now.
    pub fn now(&self) -> usize {
        *self.0.borrow()
    }

    /// Wait, at most `limit`, until no run is being driven; returns how many still were when
    /// `limit` ran out (0: all of them have stopped and recorded their last events).
    pub async fn settled(&self, limit: std::time::Duration) -> usize {
        let mut rx = self.0.subscribe();
        match tokio::time::timeout(limit, rx.wait_for(|n| *n == 0)).await {
            Ok(_) => 0,
            Err(_) => self.now(),
        }
    }
}

/// A run being driven (see [`RunsInFlight`]).
pub(crate) struct Driving(Arc<tokio::sync::watch::Sender<usize>>);

impl Drop for Driving {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl ApiState {
    /// The API of `runtime`'s installation: checkpoints are signed with `signer` and verified
    /// with `verifier`; `credentials` are the tokens accepted; `agents` builds run drivers.
    pub fn new(
        runtime: &'static Runtime,
        signer: NoteSigner,
        verifier: NoteVerifier,
        credentials: Arc<CredentialStore>,
        agents: AgentFactory,
    ) -> ApiState {
        ApiState {
            runtime,
            signer,
            verifier,
            credentials,
            agents,
            stop: CancellationToken::new(),
            token_hint: "ice token add --operator NAME".into(),
            driving: RunsInFlight::default(),
            signer_memory: ice_log::verify::SignerMemory::default(),
        }
    }

    /// The runs this API drives on the server (those it starts or resumes), to wait for when
    /// the server stops.
    pub fn runs_in_flight(&self) -> RunsInFlight {
        self.driving.clone()
    }

    /// Keep the last checkpoint signed in `record` (outside the log): no checkpoint is signed
    /// over a log that did not grow from it, and `/verify` checks the log against it.
    pub fn with_signed_record(mut self, record: ice_log::verify::SignedRecord) -> ApiState {
        self.signer_memory = ice_log::verify::SignerMemory::keeping(record);
        self
    }

    /// Live event streams end when `stop` is cancelled (so a server can shut down gracefully).
    pub fn with_stop(mut self, stop: CancellationToken) -> ApiState {
        self.stop = stop;
        self
    }

    /// The command that adds an operator token, quoted when the API refuses everything for
    /// want of one.
    pub fn with_token_hint(mut self, hint: impl Into<String>) -> ApiState {
        self.token_hint = hint.into();
        self
    }
}

pub(crate) type Shared = Arc<ApiState>;

/// Refuse a request that carries more than one `Authorization` header (400, naming it): which
/// of its tokens would count is anyone's guess (a proxy may keep the first, a server the last),
/// so ICE takes neither. Every place `ice serve` reads a token (the operator API, `/mcp`,
/// `/metrics`) checks this first.
pub fn single_authorization(headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
    let n = headers
        .get_all(axum::http::header::AUTHORIZATION)
        .iter()
        .count();
    if n > 1 {
        return Err(ApiError::bad_request(
            "duplicate_header",
            format!(
                "the request has {n} Authorization headers; send exactly one (`Authorization: Bearer TOKEN`)"
            ),
        ));
    }
    Ok(())
}

/// `routes` behind [`single_authorization`]: a request with more than one `Authorization`
/// header is refused before anything reads a token.
pub fn single_authorization_only(routes: Router) -> Router {
    routes.layer(axum::middleware::from_fn(refuse_repeated_authorization))
}

async fn refuse_repeated_authorization(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match single_authorization(req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// A 405 (the path exists, the method does not) as the API's JSON error, naming the method, the
/// path and the methods it takes (axum's own has an empty body; it adds the `Allow` header
/// after this).
async fn method_not_allowed_as_json(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let response = next.run(req).await;
    if response.status() != StatusCode::METHOD_NOT_ALLOWED {
        return response;
    }
    let takes: Vec<String> = routes()
        .into_iter()
        .filter(|(_, p)| path_matches(p, &path))
        .map(|(m, _)| m)
        .collect();
    let takes = if takes.is_empty() {
        "other methods".to_string()
    } else {
        takes.join(", ")
    };
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{method} is not allowed on {path}; it takes {takes} (see {BASE_PATH}{OPENAPI_PATH})"
        ),
    )
    .into_response()
}

/// Whether `path` is one of `route`'s (a `{param}` segment matches any one segment).
fn path_matches(route: &str, path: &str) -> bool {
    let (mut r, mut p) = (route.split('/'), path.split('/'));
    loop {
        match (r.next(), p.next()) {
            (None, None) => return true,
            (Some(a), Some(b)) if a == b || (a.starts_with('{') && !b.is_empty()) => {}
            _ => return false,
        }
    }
}

/// Every operator endpoint: method, path under [`BASE_PATH`], handler.
fn table() -> Vec<(&'static str, &'static str, MethodRouter<Shared>)> {
    vec![
        ("GET", "/runs", get(runs::list)),
        ("POST", "/runs", post(runs::start)),
        ("GET", "/runs/{run}", get(runs::show)),
        ("POST", "/runs/{run}/kill", post(runs::kill)),
        ("POST", "/runs/{run}/reconfigure", post(runs::reconfigure)),
        ("GET", "/runs/{run}/events", get(events::page)),
        ("GET", "/runs/{run}/events/stream", get(events::stream)),
        ("GET", "/events/{id}", get(events::one)),
        ("GET", "/blobs/{digest}", get(events::blob)),
        ("GET", "/approvals", get(runs::approvals)),
        ("POST", "/approvals/{id}/approve", post(runs::approve)),
        ("POST", "/approvals/{id}/deny", post(runs::deny)),
        ("GET", "/memories", get(memory::list)),
        ("POST", "/memories", post(memory::promote)),
        ("GET", "/memories/{id}", get(memory::show)),
        (
            "POST",
            "/memories/{id}/invalidate",
            post(memory::invalidate),
        ),
        ("POST", "/memories/{id}/deprecate", post(memory::deprecate)),
        ("POST", "/memories/{id}/supersede", post(memory::supersede)),
        ("GET", "/verify", get(audit::verify)),
        ("POST", "/verify", post(audit::verify)),
        ("GET", "/checkpoints", get(audit::checkpoints)),
        ("POST", "/checkpoints", post(audit::sign)),
        ("GET", "/checkpoints/latest", get(audit::latest)),
        ("GET", "/proofs/inclusion/{event}", get(audit::inclusion)),
        ("GET", "/proofs/consistency", get(audit::consistency)),
    ]
}

/// The public endpoint (no token needed).
const OPENAPI_PATH: &str = "/openapi.json";

/// Every route the router serves, as (method, full path), operator endpoints and the public
/// OpenAPI document alike.
pub fn routes() -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = table()
        .into_iter()
        .map(|(m, p, _)| (m.to_string(), format!("{BASE_PATH}{p}")))
        .collect();
    out.push(("GET".into(), format!("{BASE_PATH}{OPENAPI_PATH}")));
    out
}

/// The API's router: operator endpoints under [`BASE_PATH`] behind the token check, the
/// OpenAPI document, and a JSON 404 for anything else.
pub fn router(state: ApiState) -> Router {
    let shared: Shared = Arc::new(state);
    let mut ops: Router<Shared> = Router::new();
    for (_, path, handler) in table() {
        ops = ops.route(path, handler);
    }
    // Layers run outside in: one Authorization header at most, then the token check.
    let api = ops
        .route_layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            auth::operators_only,
        ))
        .route_layer(axum::middleware::from_fn(refuse_repeated_authorization))
        .route(OPENAPI_PATH, get(openapi));
    Router::new()
        .nest(BASE_PATH, api)
        .fallback(no_route)
        .layer(axum::middleware::from_fn(method_not_allowed_as_json))
        .with_state(shared)
}

async fn openapi() -> Response {
    let mut r = OPENAPI.into_response();
    r.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    r
}

async fn no_route(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!(
            "no such endpoint: {}; the operator API is described at {BASE_PATH}{OPENAPI_PATH}",
            uri.path()
        ),
    )
}
