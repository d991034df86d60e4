//! Governed memory: list, show, promote, invalidate, deprecate, supersede (the runtime's
//! operator functions, recorded in maintenance runs as `operator:NAME`).

use axum::Extension;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;
use ice_kernel::{Clock, Timestamp};
use ice_log::clock::SystemClock;
use ice_runtime::memory::{
    MemoryAction, MemoryError, MemoryRecord, PromoteRequest, TransitionReport,
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::Shared;
use crate::auth::Operator;
use crate::error::ApiError;
use crate::io::{PathParam, Query, event_id, json_response, ok, require_json};

/// A memory without its content, with whether it mounts now.
fn summary(r: &MemoryRecord, now: Timestamp) -> Value {
    let mut v = serde_json::to_value(r).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.remove("content");
        m.insert("live".into(), json!(r.is_live(now)));
        m.insert("due_to_expire".into(), json!(r.due_to_expire(now)));
    }
    v
}

/// `GET /memories?all=`: the active memories (all: every one, whatever its status).
pub(crate) async fn list(State(s): State<Shared>, uri: Uri) -> Result<Response, ApiError> {
    let q = Query::parse(&uri, &["all"])?;
    let all = q.bool("all")?.unwrap_or(false);
    let book = s.runtime.memories().await?;
    let now = SystemClock.now();
    let memories: Vec<Value> = book
        .iter()
        .filter(|r| all || r.is_live(now))
        .map(|r| summary(r, now))
        .collect();
    Ok(ok(json!({"memories": memories})))
}

/// `GET /memories/{id}`: one memory with its content, provenance, lineage and mounts.
pub(crate) async fn show(
    State(s): State<Shared>,
    PathParam(id): PathParam,
) -> Result<Response, ApiError> {
    let id = event_id(&id, "memory")?;
    let book = s.runtime.memories().await?;
    let r = book
        .get(&id)
        .ok_or_else(|| MemoryError::Unknown(id.clone()))?;
    let content = s.runtime.memory_content(r).await?;
    let mut v = summary(r, SystemClock.now());
    v["content"] = content;
    v["derived"] = json!(
        book.derived(&id)
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
    );
    Ok(ok(v))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PromoteBody {
    /// The DOMAIN event to promote (`RUN_ID:RUN_SEQ`).
    event: String,
    kind: String,
    scope: String,
    #[serde(default = "one")]
    confidence: f64,
    /// Time to live, in milliseconds.
    #[serde(default, deserialize_with = "crate::io::opt_whole")]
    ttl_ms: Option<u64>,
    reason: String,
}

fn one() -> f64 {
    1.0
}

/// `POST /memories`: promote a DOMAIN event of a committed run (201).
pub(crate) async fn promote(
    State(s): State<Shared>,
    Extension(Operator(operator)): Extension<Operator>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let b: PromoteBody = require_json(&headers, body).await?;
    let source = event_id(&b.event, "event")?;
    let report = s
        .runtime
        .promote_memory(&PromoteRequest {
            source,
            kind: b.kind,
            scope: b.scope,
            confidence: b.confidence,
            ttl_ms: b.ttl_ms,
            reason: b.reason,
            operator,
        })
        .await?;
    let _ = crate::audit::sign_checkpoint(&s).await;
    let v = serde_json::to_value(&report).map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(json_response(StatusCode::CREATED, &v))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TransitionBody {
    reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SupersedeBody {
    reason: String,
    /// The active memory that replaces it.
    by: String,
}

fn transitioned(r: &TransitionReport) -> Result<Value, ApiError> {
    let mut v = serde_json::to_value(r).map_err(|e| ApiError::internal(e.to_string()))?;
    v["mounting_runs"] = json!(r.mounting_runs());
    Ok(v)
}

async fn transition(
    s: &Shared,
    operator: &str,
    id: &str,
    action: MemoryAction,
    reason: &str,
) -> Result<Response, ApiError> {
    let id = event_id(id, "memory")?;
    let report = s
        .runtime
        .transition_memory(&id, action, reason, operator)
        .await?;
    let _ = crate::audit::sign_checkpoint(s).await;
    Ok(ok(transitioned(&report)?))
}

/// `POST /memories/{id}/invalidate {"reason"}`: with every memory derived from it not
/// invalidated yet (also for a memory that expired, or was deprecated or superseded).
pub(crate) async fn invalidate(
    State(s): State<Shared>,
    Extension(Operator(operator)): Extension<Operator>,
    PathParam(id): PathParam,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let b: TransitionBody = require_json(&headers, body).await?;
    transition(&s, &operator, &id, MemoryAction::Invalidate, &b.reason).await
}

/// `POST /memories/{id}/deprecate {"reason"}`.
pub(crate) async fn deprecate(
    State(s): State<Shared>,
    Extension(Operator(operator)): Extension<Operator>,
    PathParam(id): PathParam,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let b: TransitionBody = require_json(&headers, body).await?;
    transition(&s, &operator, &id, MemoryAction::Deprecate, &b.reason).await
}

/// `POST /memories/{id}/supersede {"reason", "by"}`.
pub(crate) async fn supersede(
    State(s): State<Shared>,
    Extension(Operator(operator)): Extension<Operator>,
    PathParam(id): PathParam,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let b: SupersedeBody = require_json(&headers, body).await?;
    let by = event_id(&b.by, "by")?;
    transition(
        &s,
        &operator,
        &id,
        MemoryAction::Supersede { by },
        &b.reason,
    )
    .await
}
