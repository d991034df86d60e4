//! The library API that writes events through the kernel's validator.
//!
//! A [`Ledger`] keeps each run's [`RunHead`] (a fold of its events), looks up causes in other
//! runs, takes the time from an injected clock, lets the kernel seal the drafts, and appends
//! the sealed batch at the run's expected position. If another writer got there first the
//! append fails with [`LogError::Conflict`] and nothing was written; the cached head is then
//! brought up to date by reading only the events appended since it (a run tens of thousands of
//! events long is not folded again from its start, or a busy run's own writer would win every
//! race: an operator's kill could never land).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use ice_kernel::{
    ChainError, Clock, Digest, Draft, EventId, RunHead, RunId, RunView, SealedBatch, Timestamp,
    ValidationError,
};

use crate::{AppendReceipt, EventLog, LogError, StoredEvent};

/// Most run heads a ledger keeps in memory; past this the cache starts over (heads reload
/// from the log on demand, so this bounds memory, not correctness).
const MAX_CACHED_HEADS: usize = 10_000;
/// How many times an unpinned append is tried when other writers keep moving the run.
const CONFLICT_RETRIES: usize = 8;
/// Page size when folding a run from the log.
const PAGE: usize = 4096;

/// Why an append through the ledger failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AppendError {
    /// The validator rejected draft number `index` of the batch; nothing was appended.
    #[error("event {index} of the batch rejected: {error}")]
    Rejected {
        /// Position of the rejected draft in the batch.
        index: usize,
        /// Which rule it broke.
        error: ValidationError,
    },
    /// The log failed or refused (a conflict included); nothing was appended.
    #[error(transparent)]
    Log(#[from] LogError),
}

/// Writes events through the validator into an [`EventLog`].
pub struct Ledger {
    log: Arc<dyn EventLog>,
    clock: Arc<dyn Clock>,
    heads: Mutex<HashMap<RunId, RunHead>>,
}

impl Ledger {
    /// A ledger over `log`, taking times from `clock`.
    pub fn new(log: Arc<dyn EventLog>, clock: Arc<dyn Clock>) -> Ledger {
        Ledger {
            log,
            clock,
            heads: Mutex::new(HashMap::new()),
        }
    }

    /// The log.
    pub fn log(&self) -> &Arc<dyn EventLog> {
        &self.log
    }

    /// The head of a run, from the cache or folded from the log.
    pub async fn head(&self, run_id: &RunId) -> Result<RunHead, LogError> {
        if let Some(h) = self.heads.lock().ok().and_then(|m| m.get(run_id).cloned()) {
            return Ok(h);
        }
        let view = fold_run(self.log.as_ref(), run_id).await?;
        self.remember(view.head.clone());
        Ok(view.head)
    }

    fn remember(&self, head: RunHead) {
        if let Ok(mut m) = self.heads.lock() {
            if m.len() >= MAX_CACHED_HEADS && !m.contains_key(&head.run_id) {
                m.clear();
            }
            m.insert(head.run_id.clone(), head);
        }
    }

    /// Drop the cached head of a run (another writer appended to it; the next append folds
    /// the run again from the log).
    pub fn forget(&self, run_id: &RunId) {
        if let Ok(mut m) = self.heads.lock() {
            m.remove(run_id);
        }
    }

    /// Validate, seal and append `drafts` to the end of run `run_id`, atomically.
    pub async fn append(
        &self,
        run_id: &RunId,
        drafts: Vec<Draft>,
    ) -> Result<(AppendReceipt, SealedBatch), AppendError> {
        // Not pinned to a position: when another writer (the run's own process, say, while an
        // operator kills or answers it) appended first, the drafts are sealed again after its
        // events, and validated again (a run that ended meanwhile refuses what no longer fits).
        for _ in 1..CONFLICT_RETRIES {
            match self.append_to(run_id, None, drafts.clone()).await {
                Err(AppendError::Log(LogError::Conflict { expected, .. })) => {
                    match self.catch_up(run_id).await {
                        Ok(head) if head.next_seq > expected => {}
                        // Nothing new after the refused position, or events that do not follow
                        // the cached head: it is not the run's (the file replaced under this
                        // process, say). The next try folds the run afresh rather than failing
                        // the same way every time.
                        _ => self.forget(run_id),
                    }
                }
                other => return other,
            }
        }
        self.append_to(run_id, None, drafts).await
    }

    /// Bring the cached head of `run_id` up to the log's end, reading only the events stored
    /// after it (all of them if none is cached).
    async fn catch_up(&self, run_id: &RunId) -> Result<RunHead, LogError> {
        let cached = self.heads.lock().ok().and_then(|m| m.get(run_id).cloned());
        let Some(mut head) = cached else {
            return self.head(run_id).await;
        };
        loop {
            let from = head.next_seq;
            let page = self.log.read_run(run_id, from, PAGE).await?;
            crate::after_page(run_id.as_str(), from, &page)?;
            for s in &page {
                let (h, hash) = stored_header(s)?;
                linked(&head, &h)?;
                head.apply_header(&h, hash)
                    .map_err(|err| unlawful(&h, &err))?;
            }
            if page.len() < PAGE {
                break;
            }
        }
        self.remember(head.clone());
        Ok(head)
    }

    /// The same as [`Ledger::append`], only if the run ends at `first_seq`: the position the
    /// caller built `drafts` for (their causes name events by position). If the run has moved
    /// (another writer, in this process or not, appended since the caller looked), nothing is
    /// written and the error is [`LogError::Conflict`] (with the `prev` this ledger knows the
    /// run to end at): fold what was appended and build the drafts again.
    pub async fn append_at(
        &self,
        run_id: &RunId,
        first_seq: u64,
        drafts: Vec<Draft>,
    ) -> Result<(AppendReceipt, SealedBatch), AppendError> {
        self.append_to(run_id, Some(first_seq), drafts).await
    }

    async fn append_to(
        &self,
        run_id: &RunId,
        first_seq: Option<u64>,
        drafts: Vec<Draft>,
    ) -> Result<(AppendReceipt, SealedBatch), AppendError> {
        let mut head = self.head(run_id).await?;
        if let Some(expected) = first_seq
            && expected > head.next_seq
        {
            // The caller has seen more of the run than the cached head: the head is stale.
            head = self.catch_up(run_id).await?;
        }
        if let Some(expected) = first_seq
            && expected != head.next_seq
        {
            return Err(AppendError::Log(LogError::Conflict {
                run_id: run_id.to_string(),
                expected,
                expected_prev: head.last_hash,
                actual: head.next_seq,
            }));
        }
        let others: Vec<EventId> = drafts
            .iter()
            .flat_map(|d| d.causes.iter())
            .filter(|c| &c.run_id != run_id)
            .cloned()
            .collect();
        let index: HashSet<EventId> = if others.is_empty() {
            HashSet::new()
        } else {
            self.log.existing(&others).await?
        };
        // Time within a run never goes back, even if the system clock does.
        let now = self.clock.now();
        let at: Timestamp = match head.last_at {
            Some(last) if last > now => last,
            _ => now,
        };
        let batch = head
            .seal_batch(drafts, at, &index)
            .map_err(|(index, error)| AppendError::Rejected { index, error })?;
        match self.log.append(batch.clone()).await {
            Ok(receipt) => {
                self.remember(head);
                Ok((receipt, batch))
            }
            // Others appended first: the cached head (sealing worked on a copy) is still a
            // true prefix of the run, from which [`Ledger::catch_up`] reads on.
            Err(e @ LogError::Conflict { .. }) => Err(e.into()),
            Err(e) => {
                self.forget(run_id);
                Err(e.into())
            }
        }
    }
}

/// A stored event's law-relevant fields and hash.
fn stored_header(s: &StoredEvent) -> Result<(ice_kernel::Header<'_>, Digest), LogError> {
    let h = ice_kernel::Header::parse(&s.body).map_err(|e| LogError::Corrupt {
        what: format!("event at log_seq {}: body does not parse: {e}", s.log_seq),
    })?;
    let hash = Digest(
        s.hash
            .as_slice()
            .try_into()
            .map_err(|_| LogError::Corrupt {
                what: format!(
                    "event at log_seq {}: hash column is not 32 bytes",
                    s.log_seq
                ),
            })?,
    );
    Ok((h, hash))
}

/// A stored event names the event before it in its run (`prev`): a head folded from events
/// that do not chain (the log altered under this process) would sign new events onto a
/// history that is not the run's.
fn linked(head: &RunHead, h: &ice_kernel::Header<'_>) -> Result<(), LogError> {
    if h.prev == head.last_hash {
        return Ok(());
    }
    Err(unlawful(
        h,
        &ValidationError::Chain(ChainError::WrongPrev {
            expected: head.last_hash,
            got: h.prev,
        }),
    ))
}

/// A stored event its run's law refuses.
fn unlawful(h: &ice_kernel::Header<'_>, err: &ValidationError) -> LogError {
    LogError::Corrupt {
        what: format!(
            "event {}:{} does not follow its run's law: {err}; run `ice verify`",
            h.run_id, h.run_seq
        ),
    }
}

/// Fold a run's events from the log into its head and summary.
pub async fn fold_run(log: &dyn EventLog, run_id: &RunId) -> Result<RunView, LogError> {
    let mut view = RunView::new(run_id.clone());
    let mut from = 0u64;
    loop {
        let page = log.read_run(run_id, from, PAGE).await?;
        let n = page.len();
        let next = crate::after_page(run_id.as_str(), from, &page)?;
        for s in &page {
            let (h, hash) = stored_header(s)?;
            linked(&view.head, &h)?;
            view.apply_header(&h, hash)
                .map_err(|err| unlawful(&h, &err))?;
        }
        if n < PAGE {
            return Ok(view);
        }
        from = next;
    }
}

/// Read all of a run's events (bounded by the run's length; use [`EventLog::read_run`] pages
/// for very long runs).
pub async fn read_whole_run(
    log: &dyn EventLog,
    run_id: &RunId,
) -> Result<Vec<StoredEvent>, LogError> {
    let mut out = Vec::new();
    loop {
        let page = log.read_run(run_id, out.len() as u64, PAGE).await?;
        let n = page.len();
        crate::after_page(run_id.as_str(), out.len() as u64, &page)?;
        out.extend(page);
        if n < PAGE {
            return Ok(out);
        }
    }
}
