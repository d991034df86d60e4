//! Events: a page of a run's, one by id, and a live stream of a run's over server-sent events;
//! and the blobs large payload fields are kept in.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, Uri};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream};
use ice_kernel::{EventType, RunId};
use ice_log::{EventLog, StoredEvent};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::error::ApiError;
use crate::io::{PathParam, Query, event_id, ok, run_id};

/// Most events one page returns.
const MAX_PAGE: u64 = 1000;
/// How often a live stream looks for new events.
const POLL: Duration = Duration::from_millis(200);
/// Largest `run_seq` (the kernel's safe-integer range).
const MAX_SEQ: u64 = (1 << 53) - 1;

/// An event as the API shows it: the event, plus its global position `log_seq`.
pub(crate) fn event_json(s: &StoredEvent) -> Result<Value, ApiError> {
    let e = s.event()?;
    let mut v = serde_json::to_value(&e).map_err(|e| ApiError::internal(e.to_string()))?;
    if let Value::Object(m) = &mut v {
        m.insert("log_seq".into(), json!(s.log_seq));
    }
    Ok(v)
}

async fn existing_run(log: &dyn EventLog, run: &RunId) -> Result<(), ApiError> {
    if log.read_run(run, 0, 1).await?.is_empty() {
        return Err(ApiError::not_found(format!("no run {run}")));
    }
    Ok(())
}

/// `GET /runs/{run}/events?from=&limit=`: the run's events from `run_seq` `from`.
pub(crate) async fn page(
    State(s): State<Shared>,
    PathParam(run): PathParam,
    uri: Uri,
) -> Result<Response, ApiError> {
    let run = run_id(&run)?;
    let q = Query::parse(&uri, &["from", "limit"])?;
    let from = q.int("from", 0, MAX_SEQ)?.unwrap_or(0);
    let limit = q.int("limit", 1, MAX_PAGE)?.unwrap_or(100);
    let log = s.runtime.ledger().log();
    existing_run(log.as_ref(), &run).await?;
    let page = log.read_run(&run, from, limit as usize).await?;
    let next = ice_log::after_page(run.as_str(), from, &page)?;
    let events = page.iter().map(event_json).collect::<Result<Vec<_>, _>>()?;
    Ok(ok(json!({
        "run": run.as_str(),
        "from": from,
        "events": events,
        "next": next,
    })))
}

/// `GET /events/{id}`: one event.
pub(crate) async fn one(
    State(s): State<Shared>,
    PathParam(id): PathParam,
) -> Result<Response, ApiError> {
    let id = event_id(&id, "event")?;
    let stored = s
        .runtime
        .ledger()
        .log()
        .get(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no event {id} in the log")))?;
    Ok(ok(event_json(&stored)?))
}

/// `GET /blobs/{digest}`: a payload field kept as a blob (an event shows it as
/// `{"$blob": DIGEST, "size": N}`), as the JSON value it holds. The bytes are checked against
/// their digest before they are shown.
pub(crate) async fn blob(
    State(s): State<Shared>,
    PathParam(digest): PathParam,
) -> Result<Response, ApiError> {
    let d = ice_kernel::Digest::from_hex(&digest).map_err(|e| {
        ApiError::bad_request("invalid_id", format!("blob: not a SHA-256 digest: {e}"))
    })?;
    let bytes = s
        .runtime
        .ledger()
        .log()
        .blob(&d)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no blob {d} in the log")))?;
    let found = ice_kernel::Digest::of(&bytes);
    if found != d {
        return Err(ApiError::internal(format!(
            "blob {d} is damaged: its bytes hash to {found} (`ice verify` names what else is)"
        )));
    }
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::internal(format!("blob {d} does not hold a JSON value: {e}")))?;
    Ok(ok(
        json!({"digest": d.to_hex(), "size": bytes.len(), "value": value}),
    ))
}

/// `GET /runs/{run}/events/stream?from=`: server-sent events, one per event of the run (its
/// JSON as `data`, its `run_seq` as `id`), the existing ones first, then new ones as they are
/// appended. After `RunTerminated` (nothing follows it) an `end` event closes the stream. A
/// reconnecting client's `Last-Event-ID` continues after that event.
pub(crate) async fn stream(
    State(s): State<Shared>,
    PathParam(run): PathParam,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let run = run_id(&run)?;
    let q = Query::parse(&uri, &["from"])?;
    let mut from = q.int("from", 0, MAX_SEQ)?.unwrap_or(0);
    if let Some(last) = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        && last < MAX_SEQ
    {
        from = from.max(last + 1);
    }
    let log = s.runtime.ledger().log().clone();
    let view = ice_log::ledger::fold_run(log.as_ref(), &run).await?;
    if view.summary.events == 0 {
        return Err(ApiError::not_found(format!("no run {run}")));
    }
    // A terminated run gets nothing more: past its end, the stream ends at once.
    let ended =
        view.summary.state == ice_kernel::RunState::Terminated && from >= view.summary.events;
    let cursor = Cursor {
        log,
        run,
        next: from,
        // Asked to start past the run's end: the events before `from` are not sent, but they
        // are still looked at as they come, so the run's end (if it comes among them) ends
        // the stream.
        skipped: view.summary.events.min(from),
        buffered: VecDeque::new(),
        ended,
        stop: s.stop.clone(),
        state: s.clone(),
        headers,
    };
    Ok(Sse::new(events(cursor))
        .keep_alive(KeepAlive::default())
        .into_response())
}

struct Cursor {
    log: Arc<dyn EventLog>,
    run: RunId,
    next: u64,
    /// Below `next`, the events not sent were looked at up to here (for the run's end).
    skipped: u64,
    buffered: VecDeque<StoredEvent>,
    ended: bool,
    stop: CancellationToken,
    /// The server's state and the request's headers: the token that opened the stream is
    /// checked again before each event and each wait, so a revoked one stops it.
    state: Shared,
    headers: HeaderMap,
}

fn events(cursor: Cursor) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    stream::unfold(Some(cursor), |c| async move {
        let mut c = c?;
        loop {
            if let Err(e) = crate::auth::authenticate(&c.state, &c.headers) {
                let err = SseEvent::default().event("error").data(
                    json!({"error": {"code": e.code, "message": format!("this stream ends: {}", e.message)}})
                        .to_string(),
                );
                return Some((Ok(err), None));
            }
            if c.ended {
                let end = SseEvent::default()
                    .event("end")
                    .data(json!({"run": c.run.as_str(), "state": "TERMINATED"}).to_string());
                return Some((Ok(end), None));
            }
            if let Some(s) = c.buffered.pop_front() {
                let ev = match event_json(&s) {
                    Ok(v) => v,
                    Err(e) => {
                        let err = SseEvent::default().event("error").data(
                            json!({"error": {"code": e.code, "message": e.message}}).to_string(),
                        );
                        return Some((Ok(err), None));
                    }
                };
                if s.event_type == EventType::RunTerminated.name() {
                    c.ended = true;
                }
                let out = SseEvent::default()
                    .id(s.run_seq.to_string())
                    .data(ev.to_string());
                return Some((Ok(out), Some(c)));
            }
            if c.stop.is_cancelled() {
                return None;
            }
            match c.log.read_run(&c.run, c.next, 256).await {
                Ok(page) if !page.is_empty() => {
                    match ice_log::after_page(c.run.as_str(), c.next, &page) {
                        Ok(next) => {
                            c.next = next;
                            c.buffered.extend(page);
                        }
                        Err(e) => {
                            let err = SseEvent::default().event("error").data(
                                json!({"error": {"code": "internal", "message": e.to_string()}})
                                    .to_string(),
                            );
                            return Some((Ok(err), None));
                        }
                    }
                }
                Ok(_) if c.skipped < c.next => {
                    // Nothing from `next` on: look at the events the client skipped.
                    let take = (c.next - c.skipped).min(256) as usize;
                    match c.log.read_run(&c.run, c.skipped, take).await {
                        Ok(skipped) if !skipped.is_empty() => {
                            c.skipped += skipped.len() as u64;
                            if skipped
                                .iter()
                                .any(|e| e.event_type == EventType::RunTerminated.name())
                            {
                                c.ended = true;
                            }
                        }
                        Ok(_) => {
                            tokio::select! {
                                _ = c.stop.cancelled() => return None,
                                _ = tokio::time::sleep(POLL) => {}
                            }
                        }
                        Err(e) => {
                            let err = SseEvent::default().event("error").data(
                                json!({"error": {"code": "internal", "message": e.to_string()}})
                                    .to_string(),
                            );
                            return Some((Ok(err), None));
                        }
                    }
                }
                Ok(_) => {
                    tokio::select! {
                        _ = c.stop.cancelled() => return None,
                        _ = tokio::time::sleep(POLL) => {}
                    }
                }
                Err(e) => {
                    let err = SseEvent::default().event("error").data(
                        json!({"error": {"code": "internal", "message": e.to_string()}})
                            .to_string(),
                    );
                    return Some((Ok(err), None));
                }
            }
        }
    })
}
