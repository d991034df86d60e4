//! Runs: list, show, start from a run spec, kill, reconfigure; approvals: list, approve, deny.

use std::sync::Mutex;

use axum::Extension;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;
use ice_kernel::{Event, EventId, RunId};
use ice_runtime::operator::ReconfigurationFile;
use ice_runtime::{Observer, Quiet, RunOutcome, RunReport, RunSpec, RuntimeError};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::Shared;
use crate::auth::Operator;
use crate::error::ApiError;
use crate::io::{PathParam, Query, event_id, json_response, ok, read_json, require_json, run_id};

/// Most runs one page lists.
const MAX_PAGE: u64 = 1000;

/// `GET /runs?offset=&limit=&order=`: run summaries in order of first appearance (`order=oldest`,
/// the default) or newest first (`order=newest`), and how many runs the log holds.
pub(crate) async fn list(State(s): State<Shared>, uri: Uri) -> Result<Response, ApiError> {
    let q = Query::parse(&uri, &["offset", "limit", "order"])?;
    let offset = q.int("offset", 0, u64::MAX >> 11)?.unwrap_or(0);
    let limit = q.int("limit", 1, MAX_PAGE)?.unwrap_or(100);
    let newest = match q.str("order") {
        None | Some("oldest") => false,
        Some("newest") => true,
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("query parameter order={other:?} must be oldest or newest"),
            ));
        }
    };
    let log = s.runtime.ledger().log();
    // Counted first: a run started while the page is read is in the page, not the count.
    let total = log.run_count().await?;
    let ids = if newest {
        log.runs_newest_first(offset, limit as usize + 1).await?
    } else {
        log.runs(offset, limit as usize + 1).await?
    };
    let more = ids.len() as u64 > limit;
    let mut runs = Vec::new();
    let now = ice_kernel::Clock::now(&ice_log::clock::SystemClock);
    for id in ids.iter().take(limit as usize) {
        let view = ice_log::ledger::fold_run(log.as_ref(), id).await?;
        let mut run = serde_json::to_value(&view.summary).unwrap_or(Value::Null);
        // What a `wall_time` budget is spent by (as on `GET /runs/{run}`).
        run["window_elapsed_us"] = json!(view.summary.window.elapsed_us(now));
        runs.push(run);
    }
    Ok(ok(json!({
        "runs": runs,
        "next_offset": more.then(|| offset + limit),
        "total": total,
    })))
}

/// `GET /runs/{run}`: the summary, the books' projection and the staged (or applied) changes.
pub(crate) async fn show(
    State(s): State<Shared>,
    PathParam(run): PathParam,
) -> Result<Response, ApiError> {
    let run = run_id(&run)?;
    let rt = s.runtime;
    let books = rt.books(&run).await?;
    let view = ice_log::ledger::fold_run(rt.ledger().log().as_ref(), &run).await?;
    let changes = rt.diff(&run).await?;
    let spec = books.spec.as_ref();
    Ok(ok(json!({
        "run": run.as_str(),
        "agent": spec.map(|s| s.agent.clone()),
        "driver": spec.map(|s| s.driver.clone()),
        "summary": view.summary,
        "books": books.view(),
        // What a `wall_time` budget is enforced on: the execution window's elapsed time
        // (since its last opening; up to its close once closed), in µs.
        "window_elapsed_us": books.window_elapsed_us(ice_kernel::Clock::now(&ice_log::clock::SystemClock)),
        "kill": books.kill.as_ref().map(|(by, why)| json!({"by": by, "reason": why})),
        "suspension": books.suspension,
        "changes": changes,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartBody {
    /// A run spec file on the server.
    spec: String,
}

/// Tells the API which run a background task started, once it recorded its first event.
struct Started {
    tx: Mutex<Option<oneshot::Sender<RunId>>>,
}

impl Started {
    fn new() -> (Started, oneshot::Receiver<RunId>) {
        let (tx, rx) = oneshot::channel();
        (
            Started {
                tx: Mutex::new(Some(tx)),
            },
            rx,
        )
    }
}

impl Observer for Started {
    fn recorded(&self, event: &Event) {
        if let Some(tx) = self.tx.lock().ok().and_then(|mut g| g.take()) {
            let _ = tx.send(event.run_id.clone());
        }
    }
}

type Driven = Result<RunReport, RuntimeError>;

/// Wait until the background task's run has recorded something (its id), or the task failed
/// before it did (why).
async fn handshake(
    mut rx: oneshot::Receiver<RunId>,
    mut task: tokio::task::JoinHandle<Driven>,
) -> Result<RunId, ApiError> {
    let ended = tokio::select! {
        biased;
        id = &mut rx => match id {
            Ok(id) => return Ok(id),
            Err(_) => task.await,
        },
        ended = &mut task => match rx.try_recv() {
            Ok(id) => return Ok(id),
            Err(_) => ended,
        },
    };
    match ended {
        Ok(Ok(_)) => Err(ApiError::internal(
            "the run ended without recording anything",
        )),
        Ok(Err(RuntimeError::Io(m))) => Err(ApiError::bad_request("bad_request", m)),
        Ok(Err(e)) => Err(e.into()),
        Err(e) => Err(ApiError::internal(format!("the run's task failed: {e}"))),
    }
}

/// After a run the API drove stops: a line for the server's operator, and a signed checkpoint
/// (so cutting the run's events is caught by `ice verify`, as after `ice run`).
async fn stopped(s: &Shared, what: &str, result: &Driven) {
    match result {
        Ok(r) => {
            let outcome = match &r.outcome {
                RunOutcome::Committed => "committed".to_string(),
                RunOutcome::Aborted { reason } => format!("aborted: {reason}"),
                RunOutcome::Suspended { reason } => format!("suspended: {reason}"),
            };
            eprintln!("ice api: run {} ({what}) {outcome}", r.run);
        }
        Err(e) => eprintln!("ice api: a run ({what}) failed: {e}"),
    }
    if let Err(e) = crate::audit::sign_checkpoint(s).await {
        eprintln!("ice api: signing a checkpoint after the run: {e}");
    }
}

/// `POST /runs {"spec": PATH}`: start a run of a spec file on the server, driven here by the
/// driver it names; 202 with the run's id once it has recorded its first event.
pub(crate) async fn start(
    State(s): State<Shared>,
    Extension(Operator(operator)): Extension<Operator>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let b: StartBody = require_json(&headers, body).await?;
    if b.spec.trim().is_empty() {
        return Err(ApiError::bad_request(
            "invalid_body",
            "`spec` must name a run spec file on the server",
        ));
    }
    let path = std::path::PathBuf::from(&b.spec);
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() => {}
        _ => {
            return Err(ApiError::not_found(format!(
                "no run spec file at {} on the server",
                path.display()
            )));
        }
    }
    let spec =
        RunSpec::load(&path).map_err(|e| ApiError::bad_request("invalid_spec", e.to_string()))?;
    let mut agent = (s.agents)(&spec).map_err(|e| ApiError::bad_request("invalid_spec", e))?;
    let (observer, rx) = Started::new();
    let rt = s.runtime;
    let st = s.clone();
    let driving = s.driving.begin();
    let task = tokio::spawn(async move {
        let by = format!("operator:{operator}")
            .parse::<ice_kernel::Origin>()
            .ok();
        let result = rt.start_by(spec, agent.as_mut(), &observer, by).await;
        stopped(&st, &format!("started by operator:{operator}"), &result).await;
        drop(driving);
        result
    });
    let run = handshake(rx, task).await?;
    Ok(json_response(
        StatusCode::ACCEPTED,
        &json!({
            "run": run.as_str(),
            "status": "started",
            "events": format!("{}/runs/{run}/events", crate::BASE_PATH),
            "stream": format!("{}/runs/{run}/events/stream", crate::BASE_PATH),
        }),
    ))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReasonBody {
    #[serde(default)]
    reason: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct KillBody {
    #[serde(default)]
    reason: String,
    #[serde(default)]
    abandon_commit: bool,
}

/// `POST /runs/{run}/kill {"reason", "abandon_commit"}`: the runtime's kill, as the operator.
pub(crate) async fn kill(
    State(s): State<Shared>,
    Extension(Operator(operator)): Extension<Operator>,
    PathParam(run): PathParam,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let run = run_id(&run)?;
    let b: KillBody = read_json(&headers, body).await?.unwrap_or_default();
    let killed = if b.abandon_commit {
        s.runtime
            .kill_abandoning_commit(&run, &operator, &b.reason, &Quiet)
            .await?
    } else {
        s.runtime.kill(&run, &operator, &b.reason, &Quiet).await?
    };
    let state = killed.state;
    if let Some(kept) = &killed.commit_abandoned {
        let _ = crate::audit::sign_checkpoint(&s).await;
        return Ok(ok(json!({
            "run": run.as_str(),
            "state": state.name(),
            "killed": true,
            "commit_abandoned": kept.display().to_string(),
            "detail": "the run's commit had passed its commit point and could not be completed: it was abandoned and the run terminated; the workspace may hold part of it",
        })));
    }
    if let Some(n) = killed.commit_completed {
        let _ = crate::audit::sign_checkpoint(&s).await;
        return Ok(ok(json!({
            "run": run.as_str(),
            "state": state.name(),
            "killed": false,
            "commit_completed": n,
            "detail": "the run's commit had passed its commit point when its process stopped: it was completed and recorded, not aborted",
        })));
    }
    if state.is_non_terminal() {
        return Ok(json_response(
            StatusCode::ACCEPTED,
            &json!({
                "run": run.as_str(),
                "state": state.name(),
                "killed": false,
                "detail": "kill requested: the process driving the run stops it before its next step",
            }),
        ));
    }
    let _ = crate::audit::sign_checkpoint(&s).await;
    Ok(ok(
        json!({"run": run.as_str(), "state": state.name(), "killed": true}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReconfigureBody {
    reason: String,
    #[serde(default)]
    accept_files: bool,
    #[serde(default)]
    accept_policy: bool,
    /// New budget limits (the keys of a run spec's `[budget]`), read once the run is known.
    budget: Option<serde_json::Map<String, Value>>,
    /// Resume the run afterwards (with its spec's driver), as `ice reconfigure` does.
    #[serde(default = "yes")]
    resume: bool,
}

fn yes() -> bool {
    true
}

/// `POST /runs/{run}/reconfigure`: record an operator's reconfiguration of a suspended run
/// (the record `ice reconfigure --record FILE` reads, as JSON) and, unless `resume` is false,
/// resume it here with its driver.
pub(crate) async fn reconfigure(
    State(s): State<Shared>,
    Extension(Operator(operator)): Extension<Operator>,
    PathParam(run): PathParam,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let run = run_id(&run)?;
    let b: ReconfigureBody = require_json(&headers, body).await?;
    let rt = s.runtime;
    // Which run, and whether it can be reconfigured, before what the record says of it (the
    // runtime checks the same again).
    let state = rt.books(&run).await?.state();
    if state != ice_kernel::RunState::Suspended {
        return Err(ApiError::conflict(format!(
            "run {run} is {state}: only a suspended run can be reconfigured"
        )));
    }
    // Whole numbers as integers (JSON Schema's `integer` admits `10.0`; TOML's does not).
    let budget = b
        .budget
        .map(|m| {
            let m: serde_json::Map<String, Value> = m
                .into_iter()
                .map(|(k, v)| match crate::io::whole(&v) {
                    Some(n) if v.is_number() => (k, json!(n)),
                    _ => (k, v),
                })
                .collect();
            serde_json::from_value::<toml::Table>(Value::Object(m))
        })
        .transpose()
        .map_err(|e| ApiError::bad_request("invalid_body", format!("`budget`: {e}")))?;
    let record = ReconfigurationFile {
        reason: b.reason,
        accept_files: b.accept_files,
        accept_policy: b.accept_policy,
        budget,
    };
    let id = rt.reconfigure(&run, &operator, &record).await?;
    let recorded = json!({"run": run.as_str(), "reconfiguration": id.to_string()});
    let not_resumed = |why: String| {
        let mut v = recorded.clone();
        v["resumed"] = json!(false);
        v["detail"] = json!(why);
        Ok(ok(v))
    };
    if !b.resume {
        return not_resumed("recorded; not resumed (resume: false)".into());
    }
    let books = rt.books(&run).await?;
    let Some(spec) = books.spec.clone() else {
        return not_resumed(format!(
            "recorded; run {run} has no recorded spec to resume with"
        ));
    };
    let mut agent = match (s.agents)(&spec) {
        Ok(a) => a,
        Err(why) => return not_resumed(format!("recorded; not resumed here: {why}")),
    };
    let (observer, rx) = Started::new();
    let st = s.clone();
    let resumed = run.clone();
    let driving = s.driving.begin();
    let task = tokio::spawn(async move {
        let result = rt.resume(&resumed, agent.as_mut(), &observer).await;
        stopped(&st, &format!("resumed by operator:{operator}"), &result).await;
        drop(driving);
        result
    });
    match handshake(rx, task).await {
        Ok(_) => {
            let mut v = recorded;
            v["resumed"] = json!(true);
            Ok(json_response(StatusCode::ACCEPTED, &v))
        }
        Err(e) => not_resumed(format!("recorded; the run could not resume: {}", e.message)),
    }
}

/// `GET /approvals?run=`: approvals waiting for an operator.
pub(crate) async fn approvals(State(s): State<Shared>, uri: Uri) -> Result<Response, ApiError> {
    let q = Query::parse(&uri, &["run"])?;
    let run = q.str("run").map(run_id).transpose()?;
    if let Some(r) = &run
        && s.runtime.ledger().log().read_run(r, 0, 1).await?.is_empty()
    {
        return Err(ApiError::not_found(format!("no run {r}")));
    }
    // Across runs, a run whose record does not fold is left out and named, hiding no other
    // run's approvals; for that run alone, its fold error is the answer (409).
    let listing = match &run {
        Some(r) => ice_runtime::ApprovalListing {
            approvals: s.runtime.pending_approvals(Some(r)).await?,
            problems: Vec::new(),
        },
        None => s.runtime.approval_listing(None).await?,
    };
    Ok(ok(
        json!({"approvals": listing.approvals, "problems": listing.problems}),
    ))
}

/// `POST /approvals/{id}/approve`.
pub(crate) async fn approve(
    s: State<Shared>,
    op: Extension<Operator>,
    id: PathParam,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    answer(s, op, id, headers, body, true).await
}

/// `POST /approvals/{id}/deny {"reason"}`.
pub(crate) async fn deny(
    s: State<Shared>,
    op: Extension<Operator>,
    id: PathParam,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    answer(s, op, id, headers, body, false).await
}

async fn answer(
    State(s): State<Shared>,
    Extension(Operator(operator)): Extension<Operator>,
    PathParam(id): PathParam,
    headers: HeaderMap,
    body: Body,
    grant: bool,
) -> Result<Response, ApiError> {
    let id: EventId = event_id(&id, "approval")?;
    let b: ReasonBody = read_json(&headers, body).await?.unwrap_or_default();
    // What the body says that cannot be recorded is the request's fault (400), not the
    // approval's state: an approval records no reason, and a reason is at most 4096 bytes.
    if grant && !b.reason.is_empty() {
        return Err(ApiError::bad_request(
            "bad_request",
            "`reason`: an approval records no reason (a denial does); leave it out",
        ));
    }
    if let Some(p) = ice_runtime::memory::reason_too_long(&b.reason) {
        return Err(ApiError::bad_request("bad_request", p.describe("`reason`")));
    }
    let books = s.runtime.books(&id.run_id).await?;
    if books.approvals.get(&id).is_none() {
        return Err(ApiError::not_found(format!(
            "{id} is not an approval request of run {} (see GET {}/approvals)",
            id.run_id,
            crate::BASE_PATH
        )));
    }
    // Whether it still takes an answer is the runtime's to decide, at the position it appends
    // at: answered already (by anyone, meanwhile included), closed by the run, or of a killed
    // run is `RuntimeError::Decided`, a 409 naming who answered first.
    s.runtime
        .answer_approval(&id, &operator, grant, &b.reason)
        .await
        .map_err(|e| match e {
            // The request exists: what is left is its state (expired, answered meanwhile).
            RuntimeError::Invalid(m) => ApiError::conflict(m),
            other => other.into(),
        })?;
    Ok(ok(json!({
        "approval": id.to_string(),
        "answer": if grant { "approved" } else { "denied" },
        "operator": format!("operator:{operator}"),
    })))
}
