//! Audit: verify the log, sign and list checkpoints, inclusion and consistency proofs.

use std::collections::HashSet;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::Response;
use ice_kernel::{Digest, EventId, RunId, SealedBatch};
use ice_log::checkpoint::Checkpoint;
use ice_log::{AppendReceipt, EventLog, Extent, LogError, NodeId, StoredCheckpoint, StoredEvent};
use serde_json::{Value, json};

use crate::ApiState;
use crate::Shared;
use crate::error::ApiError;
use crate::io::{PathParam, Query, event_id, json_response, ok};

/// Sign the log's current tree head with the installation's key and store the checkpoint,
/// after checking everything the latest checkpoint does not cover yet (refused: 409).
pub(crate) async fn sign_checkpoint(s: &ApiState) -> Result<Value, ApiError> {
    let log = s.runtime.ledger().log();
    let signed =
        ice_log::verify::sign_checkpoint_with(log.as_ref(), &s.signer, Some(&s.signer_memory))
            .await
            .map_err(|e| match e {
                ice_log::verify::SignError::Log(e) => e.into(),
                e @ (ice_log::verify::SignError::Refused(_)
                | ice_log::verify::SignError::Diverged { .. }) => ApiError::conflict(e.to_string()),
                e @ ice_log::verify::SignError::Sign(_) => ApiError::internal(e.to_string()),
            })?;
    Ok(json!({"size": signed.size, "root": signed.root.to_hex(), "note": signed.note}))
}

fn checkpoint_json(c: &StoredCheckpoint) -> Value {
    let root = Checkpoint::parse_unverified(&c.note)
        .map(|cp| Value::String(cp.root.to_hex()))
        .unwrap_or(Value::Null);
    json!({"size": c.size, "root": root, "note": c.note})
}

/// A request body where a route takes none (nothing, or an empty JSON object) is refused, not
/// ignored: a client that sent options there would otherwise believe they were applied.
fn no_body(body: &[u8], route: &str, options: &str) -> Result<(), ApiError> {
    let empty = body.iter().all(u8::is_ascii_whitespace)
        || serde_json::from_slice::<Value>(body)
            .is_ok_and(|v| v.as_object().is_some_and(|o| o.is_empty()));
    if empty {
        return Ok(());
    }
    Err(ApiError::bad_request(
        "bad_request",
        format!("{route} takes no fields in a request body{options}"),
    ))
}

/// `GET|POST /verify?deep=`: verify the whole log (hashes, chains, law, Merkle tree,
/// checkpoints, blobs); the report says whether it is valid (200 either way).
pub(crate) async fn verify(
    State(s): State<Shared>,
    uri: Uri,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    no_body(&body, "/verify", " (its option is the query's: ?deep=true)")?;
    let q = Query::parse(&uri, &["deep"])?;
    let deep = q.bool("deep")?.unwrap_or(false);
    let log = s.runtime.ledger().log();
    // The checkpoint this installation signed last, kept outside the log (read before the
    // log's size: it covers no more than the log holds then).
    let kept: Vec<_> = match s.signer_memory.record() {
        Some(r) => r.kept()?.into_iter().collect(),
        None => Vec::new(),
    };
    // The log as of now: runs may append while it is read, and a reading that saw some of a
    // concurrent append would report what is only a moment's difference as damage.
    let size = log.size().await?;
    let view = Prefix {
        log: log.clone(),
        size,
    };
    let report = ice_log::verify::verify_kept(&view, Some(&s.verifier), deep, &kept, |_| {})
        .await
        .map_err(|e| ApiError::internal(format!("verifying: {e}")))?;
    let mut v = serde_json::to_value(&report).map_err(|e| ApiError::internal(e.to_string()))?;
    v["ok"] = json!(report.ok());
    Ok(ok(v))
}

/// `GET /checkpoints`: every stored checkpoint, by size.
pub(crate) async fn checkpoints(State(s): State<Shared>) -> Result<Response, ApiError> {
    let cps = s.runtime.ledger().log().checkpoints().await?;
    Ok(ok(json!({
        "checkpoints": cps.iter().map(checkpoint_json).collect::<Vec<_>>(),
    })))
}

/// `POST /checkpoints`: sign one now (201).
pub(crate) async fn sign(
    State(s): State<Shared>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    no_body(&body, "POST /checkpoints", "")?;
    let v = sign_checkpoint(&s).await?;
    Ok(json_response(StatusCode::CREATED, &v))
}

/// `GET /checkpoints/latest`.
pub(crate) async fn latest(State(s): State<Shared>) -> Result<Response, ApiError> {
    let cps = s.runtime.ledger().log().checkpoints().await?;
    let last = cps.last().ok_or_else(|| {
        ApiError::not_found(format!(
            "the log has no checkpoint yet; sign one with POST {}/checkpoints",
            crate::BASE_PATH
        ))
    })?;
    Ok(ok(checkpoint_json(last)))
}

/// `GET /proofs/inclusion/{event}`: the event's inclusion proof against the latest
/// checkpoint, as the proof file `ice verify-proof` checks offline.
pub(crate) async fn inclusion(
    State(s): State<Shared>,
    PathParam(id): PathParam,
) -> Result<Response, ApiError> {
    let id = event_id(&id, "event")?;
    let log = s.runtime.ledger().log();
    let stored = log
        .get(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no event {id} in the log")))?;
    let cps = log.checkpoints().await?;
    let Some(latest) = cps.last() else {
        return Err(ApiError::conflict(format!(
            "the log has no checkpoint yet; sign one with POST {}/checkpoints",
            crate::BASE_PATH
        )));
    };
    if stored.log_seq >= latest.size {
        return Err(ApiError::conflict(format!(
            "event {id} (log_seq {}) is newer than the latest checkpoint (size {}); sign one with POST {}/checkpoints",
            stored.log_seq,
            latest.size,
            crate::BASE_PATH
        )));
    }
    let proof = ice_log::proof::prove_inclusion(log.as_ref(), &id, &latest.note)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(ok(
        serde_json::to_value(&proof).map_err(|e| ApiError::internal(e.to_string()))?
    ))
}

/// `GET /proofs/consistency?from=&to=`: the checkpoint of size `from` is a prefix of the one
/// of size `to` (default: the latest).
pub(crate) async fn consistency(State(s): State<Shared>, uri: Uri) -> Result<Response, ApiError> {
    let q = Query::parse(&uri, &["from", "to"])?;
    let max = (1u64 << 53) - 1;
    let from = q.int("from", 1, max)?.ok_or_else(|| {
        ApiError::bad_request(
            "invalid_query",
            "query parameter `from` (the older checkpoint's size) is required",
        )
    })?;
    let to = q.int("to", 1, max)?;
    let cps = s.runtime.ledger().log().checkpoints().await?;
    let find = |size: u64| {
        cps.iter().find(|c| c.size == size).ok_or_else(|| {
            ApiError::not_found(format!(
                "no checkpoint of size {size}; stored sizes: {:?}",
                cps.iter().map(|c| c.size).collect::<Vec<_>>()
            ))
        })
    };
    let old = find(from)?;
    let new = match to {
        Some(t) => find(t)?,
        None => cps
            .last()
            .ok_or_else(|| ApiError::not_found("the log has no checkpoint yet"))?,
    };
    if old.size > new.size {
        return Err(ApiError::bad_request(
            "bad_request",
            format!(
                "`from` ({}) must not be larger than `to` ({})",
                old.size, new.size
            ),
        ));
    }
    let proof =
        ice_log::proof::prove_consistency(s.runtime.ledger().log().as_ref(), &old.note, &new.note)
            .await?;
    Ok(ok(
        serde_json::to_value(&proof).map_err(|e| ApiError::internal(e.to_string()))?
    ))
}

/// The first `size` events of a log, their tree nodes and the checkpoints within them: what the
/// log was when `size` was read. The log is append-only, so this prefix never changes, however
/// much is appended meanwhile. Read-only.
struct Prefix {
    log: Arc<dyn EventLog>,
    size: u64,
}

impl Prefix {
    fn within(&self, mut events: Vec<StoredEvent>) -> Vec<StoredEvent> {
        events.retain(|e| e.log_seq < self.size);
        events
    }
}

#[async_trait::async_trait]
impl EventLog for Prefix {
    async fn append(&self, _batch: SealedBatch) -> Result<AppendReceipt, LogError> {
        Err(LogError::ReadOnly)
    }

    async fn read_run(
        &self,
        run_id: &RunId,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, LogError> {
        Ok(self.within(self.log.read_run(run_id, from_seq, limit).await?))
    }

    async fn scan(&self, from_log_seq: u64, limit: usize) -> Result<Vec<StoredEvent>, LogError> {
        if from_log_seq >= self.size {
            return Ok(Vec::new());
        }
        let left = (self.size - from_log_seq).min(limit as u64) as usize;
        Ok(self.within(self.log.scan(from_log_seq, left).await?))
    }

    async fn get(&self, id: &EventId) -> Result<Option<StoredEvent>, LogError> {
        Ok(self.log.get(id).await?.filter(|e| e.log_seq < self.size))
    }

    async fn size(&self) -> Result<u64, LogError> {
        Ok(self.size)
    }

    async fn runs(&self, offset: u64, limit: usize) -> Result<Vec<RunId>, LogError> {
        self.log.runs(offset, limit).await
    }

    async fn runs_newest_first(&self, offset: u64, limit: usize) -> Result<Vec<RunId>, LogError> {
        self.log.runs_newest_first(offset, limit).await
    }

    async fn run_count(&self) -> Result<u64, LogError> {
        self.log.run_count().await
    }

    async fn existing(&self, ids: &[EventId]) -> Result<HashSet<EventId>, LogError> {
        let mut found = self.log.existing(ids).await?;
        let mut beyond = Vec::new();
        for id in &found {
            if self.get(id).await?.is_none() {
                beyond.push(id.clone());
            }
        }
        for id in beyond {
            found.remove(&id);
        }
        Ok(found)
    }

    async fn blob(&self, digest: &Digest) -> Result<Option<Vec<u8>>, LogError> {
        self.log.blob(digest).await
    }

    async fn nodes(&self, ids: &[NodeId]) -> Result<Vec<Digest>, LogError> {
        self.log.nodes(ids).await
    }

    fn tree_floor(&self) -> u8 {
        self.log.tree_floor()
    }

    async fn extent(&self) -> Result<Option<Extent>, LogError> {
        // As stored now: verification judges the edges against the size read with them, so
        // what was appended after this prefix is not mistaken for rows outside the log.
        self.log.extent().await
    }

    async fn altered_blob(&self) -> Result<Option<String>, LogError> {
        self.log.altered_blob().await
    }

    async fn index_problem(&self) -> Result<Option<String>, LogError> {
        self.log.index_problem().await
    }

    async fn scan_nodes(
        &self,
        from_leaf: u64,
        leaves: u64,
    ) -> Result<Vec<(NodeId, Option<Digest>)>, LogError> {
        if from_leaf >= self.size {
            return Ok(Vec::new());
        }
        self.log
            .scan_nodes(from_leaf, leaves.min(self.size - from_leaf))
            .await
    }

    async fn add_checkpoint(&self, _checkpoint: StoredCheckpoint) -> Result<(), LogError> {
        Err(LogError::ReadOnly)
    }

    async fn checkpoints(&self) -> Result<Vec<StoredCheckpoint>, LogError> {
        let mut cps = self.log.checkpoints().await?;
        cps.retain(|c| c.size <= self.size);
        Ok(cps)
    }
}
