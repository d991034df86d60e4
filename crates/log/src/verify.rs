//! Streaming verification of a whole log: every event's hash, chain and law, the stored Merkle
//! tree, every checkpoint's signature and root, and every referenced blob.
//!
//! Memory is bounded by the number of runs (one [`RunHead`] each) and one page of events, never
//! by the length of the log. The first problem found, in log order, is reported with the
//! position and id of the event it affects.

use std::collections::{HashMap, VecDeque};

use ice_kernel::blob::blob_refs;
use ice_kernel::{CauseIndex, Digest, EventId, RunHead, RunId};
use serde::Serialize;

use crate::checkpoint::{Checkpoint, NoteVerifier};
use crate::merkle::{Frontier, NodeId, leaf_hash};
use crate::{EventLog, LogError, StoredEvent};

/// Events read per page.
const PAGE: usize = 8192;

/// The first problem verification found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Failure {
    /// Position of the affected event, if the problem is located at one.
    pub log_seq: Option<u64>,
    /// Its id, when it could be read.
    pub event_id: Option<String>,
    /// What is wrong.
    pub problem: String,
}

/// What verification checked and found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Events checked.
    pub events: u64,
    /// Runs seen.
    pub runs: u64,
    /// Merkle root over all events checked.
    pub root: String,
    /// Checkpoints whose signature and root were checked.
    pub checkpoints_verified: u64,
    /// Size of the latest checkpoint.
    pub latest_checkpoint: Option<u64>,
    /// Blob references checked.
    pub blobs_checked: u64,
    /// Stored tree nodes checked.
    pub tree_nodes_checked: u64,
    /// Things that are not failures but that an auditor should know.
    pub warnings: Vec<String>,
    /// The first failure, if any.
    pub failure: Option<Failure>,
}

impl VerifyReport {
    /// Whether everything checked out.
    pub fn ok(&self) -> bool {
        self.failure.is_none()
    }
}

/// Answers cause lookups from the heads of the runs verified so far.
struct Seen<'a>(&'a HashMap<RunId, RunHead>);

impl CauseIndex for Seen<'_> {
    fn contains(&self, id: &EventId) -> bool {
        self.0
            .get(&id.run_id)
            .is_some_and(|h| id.run_seq < h.next_seq)
    }
}

fn fail(
    report: &mut VerifyReport,
    log_seq: Option<u64>,
    event_id: Option<String>,
    problem: String,
) {
    report.failure = Some(Failure {
        log_seq,
        event_id,
        problem,
    });
}

/// Verify the whole log. `verifier` checks checkpoint signatures (without it, checkpoints'
/// roots are still checked and a warning says signatures were not). `progress` is called with
/// the number of events checked after each page.
pub async fn verify(
    log: &dyn EventLog,
    verifier: Option<&NoteVerifier>,
    mut progress: impl FnMut(u64),
) -> Result<VerifyReport, LogError> {
    let mut report = VerifyReport::default();

    // Checkpoints first: their claims are what the events are checked against.
    let mut checkpoints: VecDeque<(u64, Digest)> = VecDeque::new();
    let stored = log.checkpoints().await?;
    if verifier.is_none() && !stored.is_empty() {
        report
            .warnings
            .push("no verifier key given: checkpoint signatures were not checked".into());
    }
    for cp in &stored {
        let parsed = match verifier {
            Some(v) => Checkpoint::open(&cp.note, v),
            None => Checkpoint::parse_unverified(&cp.note),
        };
        match parsed {
            Ok(c) if c.size == cp.size => checkpoints.push_back((c.size, c.root)),
            Ok(c) => {
                fail(
                    &mut report,
                    None,
                    None,
                    format!("checkpoint stored at size {} says size {}", cp.size, c.size),
                );
                return Ok(report);
            }
            Err(e) => {
                fail(
                    &mut report,
                    None,
                    None,
                    format!("checkpoint of size {}: {e}", cp.size),
                );
                return Ok(report);
            }
        }
    }
    report.latest_checkpoint = checkpoints.back().map(|c| c.0);
    if checkpoints.front().is_some_and(|c| c.0 == 0) {
        checkpoints.pop_front();
        report.checkpoints_verified += 1;
    }

    let mut heads: HashMap<RunId, RunHead> = HashMap::new();
    let mut frontier = Frontier::new();
    let mut nodes: VecDeque<(NodeId, Vec<u8>)> = VecDeque::new();
    let mut nodes_from = 0u64;
    let mut next = 0u64;
    loop {
        let page = log.scan(next, PAGE).await?;
        let n = page.len();
        for row in page {
            if let Some((log_seq, id, problem)) = check_event(&row, next, &mut heads) {
                fail(&mut report, Some(log_seq), id, problem);
                return Ok(report);
            }
            // Blobs the event references must be stored and intact.
            if memchr_blob(&row.body)
                && let Some(p) = check_blobs(log, &row, &mut report).await?
            {
                fail(
                    &mut report,
                    Some(row.log_seq),
                    Some(format!("{}:{}", row.run_id, row.run_seq)),
                    p,
                );
                return Ok(report);
            }
            // The stored tree must be the tree of these events.
            let hash: [u8; 32] = row.hash.as_slice().try_into().unwrap_or([0; 32]);
            for (id, h) in frontier.push(leaf_hash(&hash)) {
                if nodes.is_empty() {
                    nodes.extend(log.scan_nodes(nodes_from, PAGE * 2).await?);
                    nodes_from = nodes
                        .back()
                        .map(|(id, _)| id.last_leaf() + 1)
                        .unwrap_or(nodes_from);
                }
                let ok = matches!(nodes.pop_front(), Some((sid, sh)) if sid == id && sh == h.0);
                if !ok {
                    let (lo, hi) = (id.index << id.level, id.last_leaf());
                    fail(
                        &mut report,
                        Some(row.log_seq),
                        Some(format!("{}:{}", row.run_id, row.run_seq)),
                        format!(
                            "the stored Merkle tree does not match the events at log_seq {lo}..={hi} (level {} node): an event there was altered, moved or swapped since it was appended",
                            id.level
                        ),
                    );
                    return Ok(report);
                }
                report.tree_nodes_checked += 1;
            }
            next += 1;
            if let Some(&(size, root)) = checkpoints.front()
                && size == next
            {
                checkpoints.pop_front();
                if frontier.root() != root {
                    fail(
                        &mut report,
                        Some(next - 1),
                        None,
                        format!(
                            "the root of the first {size} events does not match the signed checkpoint of that size: the log was rewritten"
                        ),
                    );
                    return Ok(report);
                }
                report.checkpoints_verified += 1;
            }
        }
        report.events = next;
        progress(next);
        if n < PAGE {
            break;
        }
    }
    if let Some(&(size, _)) = checkpoints.front() {
        fail(
            &mut report,
            Some(next),
            None,
            format!(
                "the log ends at {next} events but a signed checkpoint covers {size}: events from log_seq {next} on are missing (truncated)"
            ),
        );
        return Ok(report);
    }
    let extra = log.scan_nodes(nodes_from, 1).await?;
    if nodes.front().or(extra.first()).is_some() {
        fail(
            &mut report,
            Some(next),
            None,
            format!(
                "the stored tree has nodes beyond the last event (log_seq {next} on): events were removed"
            ),
        );
        return Ok(report);
    }
    report.runs = heads.len() as u64;
    report.root = frontier.root().to_hex();
    let signed = report.latest_checkpoint.unwrap_or(0);
    if next > signed {
        report.warnings.push(format!(
            "{} event(s) after the latest checkpoint (size {signed}) are not yet covered by a signature; run `ice checkpoint`",
            next - signed
        ));
    }
    Ok(report)
}

fn memchr_blob(body: &[u8]) -> bool {
    body.windows(7).any(|w| w == b"\"$blob\"")
}

/// Check one stored event against its position, its hash and the law. Returns the failure.
fn check_event(
    row: &StoredEvent,
    expected: u64,
    heads: &mut HashMap<RunId, RunHead>,
) -> Option<(u64, Option<String>, String)> {
    let label = format!("{}:{}", row.run_id, row.run_seq);
    if row.log_seq != expected {
        return Some((
            expected,
            None,
            format!(
                "event at log_seq {expected} is missing (the next stored event is at log_seq {})",
                row.log_seq
            ),
        ));
    }
    let event = match row.event() {
        Ok(e) => e,
        Err(e) => return Some((expected, Some(label), e.to_string())),
    };
    let id = event.id().to_string();
    if event.run_id.as_str() != row.run_id
        || event.run_seq != row.run_seq
        || event.event_type != row.event_type
    {
        return Some((
            expected,
            Some(id),
            "the indexed columns disagree with the stored event".into(),
        ));
    }
    let head = heads
        .get(&event.run_id)
        .cloned()
        .unwrap_or_else(|| RunHead::new(event.run_id.clone()));
    let mut head = head;
    let sealed = match head.admit(event, &Seen(heads)) {
        Ok(s) => s,
        Err(e) => return Some((expected, Some(id), e.to_string())),
    };
    if sealed.body() != row.body.as_slice() {
        return Some((
            expected,
            Some(id),
            "the stored body is not the canonical encoding of the event".into(),
        ));
    }
    heads.insert(head.run_id.clone(), head);
    None
}

async fn check_blobs(
    log: &dyn EventLog,
    row: &StoredEvent,
    report: &mut VerifyReport,
) -> Result<Option<String>, LogError> {
    let event = row.event()?;
    let refs = match blob_refs(&event.payload) {
        Ok(r) => r,
        Err(e) => return Ok(Some(e)),
    };
    for r in refs {
        report.blobs_checked += 1;
        match log.blob(&r.digest).await? {
            None => {
                return Ok(Some(format!(
                    "blob {} (payload field {:?}) is missing",
                    r.digest, r.field
                )));
            }
            Some(b) if Digest::of(&b) != r.digest => {
                return Ok(Some(format!(
                    "blob {} (payload field {:?}) does not hash to its name: altered",
                    r.digest, r.field
                )));
            }
            Some(b) if b.len() as u64 != r.size => {
                return Ok(Some(format!(
                    "blob {} has {} bytes, the event says {}",
                    r.digest,
                    b.len(),
                    r.size
                )));
            }
            Some(_) => {}
        }
    }
    Ok(None)
}
