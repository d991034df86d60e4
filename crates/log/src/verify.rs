//! Streaming verification of a whole log: every event's hash, chain and law, the stored Merkle
//! tree, every checkpoint's signature and root, and every referenced blob.
//!
//! Memory is bounded by the number of runs (one [`RunHead`] each) and two pages of events,
//! never by the length of the log. The next page is read while the current one is checked.
//! The first problem found, in log order, is reported with the position and id of the event
//! it affects.
//!
//! Two depths:
//! - default: each event's stored body must hash to its hash; its header (ids, type, origin,
//!   time, causes, `prev`) must pass the validator's sequence rules; the order of the log must
//!   be the order events were appended in (each event's `log_prev` link, where the backend
//!   keeps one, names the event before it; otherwise the stored leaves record it); every stored
//!   tree node, every checkpoint and every blob must match; the log must be as long as the
//!   backend says it is. Every stored byte is covered by a hash that is checked (blob rows
//!   no event references included).
//! - deep: additionally decodes every payload, re-runs the structural rules, and requires the
//!   stored body to be exactly the RFC 8785 encoding of the event (an independent re-derivation
//!   of every hash from the fields).

use std::collections::{HashMap, HashSet, VecDeque};

use ice_kernel::blob::blob_refs;
use ice_kernel::{CauseIndex, Digest, EventId, HashedBody, RunHead, RunId};
use serde::Serialize;

use crate::checkpoint::{Checkpoint, NoteSigner, NoteVerifier};
use crate::merkle::{Frontier, NodeId, leaf_hash};
use crate::{EventLog, EventPage, LogError, StoredRef};

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
    /// Whether payloads and canonical encodings were re-derived (`--deep`).
    pub deep: bool,
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
pub(crate) struct Seen<'a>(pub(crate) &'a HashMap<RunId, RunHead>);

impl CauseIndex for Seen<'_> {
    fn contains(&self, id: &EventId) -> bool {
        self.0
            .get(&id.run_id)
            .is_some_and(|h| id.run_seq < h.next_seq)
    }
}

/// [`Seen`], and events of runs not read, looked up and found before where checking started.
struct SeenOrBefore<'a>(&'a HashMap<RunId, RunHead>, &'a HashSet<EventId>);

impl CauseIndex for SeenOrBefore<'_> {
    fn contains(&self, id: &EventId) -> bool {
        Seen(self.0).contains(id) || (!self.0.contains_key(&id.run_id) && self.1.contains(id))
    }
}

/// Where a run's causes in other runs are not in question (events a signed checkpoint covers).
struct AnyCause;

impl CauseIndex for AnyCause {
    fn contains(&self, _: &EventId) -> bool {
        true
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.log_seq, &self.event_id) {
            (Some(at), Some(id)) => write!(f, "log_seq {at} ({id}): {}", self.problem),
            (Some(at), None) => write!(f, "log_seq {at}: {}", self.problem),
            (None, _) => f.write_str(&self.problem),
        }
    }
}

/// Verify the whole log at the default depth. See [`verify_with`].
pub async fn verify(
    log: &dyn EventLog,
    verifier: Option<&NoteVerifier>,
    progress: impl FnMut(u64),
) -> Result<VerifyReport, LogError> {
    verify_with(log, verifier, false, progress).await
}

/// Verify the whole log. `verifier` checks checkpoint signatures (without it, checkpoints'
/// roots are still checked and a warning says signatures were not). `deep` re-derives every
/// payload and canonical encoding. `progress` is called with the number of events checked
/// after each page.
pub async fn verify_with(
    log: &dyn EventLog,
    verifier: Option<&NoteVerifier>,
    deep: bool,
    progress: impl FnMut(u64),
) -> Result<VerifyReport, LogError> {
    verify_against(log, verifier, deep, &[], progress).await
}

/// [`verify_with`], also against `kept`: signed checkpoint notes kept outside the log (an
/// auditor's copy, a witness's). The log's own checkpoints live in the same store as its
/// events, so whoever can rewrite the events can also remove the checkpoints that would give
/// the rewrite away; a note kept elsewhere cannot be removed that way. Each must be signed by
/// `verifier`'s key, and the log must have grown from it: its first `size` events must have
/// that root.
pub async fn verify_against(
    log: &dyn EventLog,
    verifier: Option<&NoteVerifier>,
    deep: bool,
    kept: &[String],
    progress: impl FnMut(u64),
) -> Result<VerifyReport, LogError> {
    let kept: Vec<KeptNote> = kept
        .iter()
        .enumerate()
        .map(|(i, note)| KeptNote::given(note.clone(), i, kept.len(), None))
        .collect();
    verify_kept(log, verifier, deep, &kept, progress).await
}

/// A signed checkpoint note kept outside the log, and where it came from (said in what
/// verification reports about it: "the signed checkpoint given to check against").
#[derive(Clone, Debug)]
pub struct KeptNote {
    /// The signed note.
    pub note: String,
    /// Where it was kept, as a noun phrase.
    pub from: String,
    /// Why the note could not be read, if it could not (a record that is not a regular file,
    /// too large, or not text): checking against it then fails, naming this.
    pub unreadable: Option<String>,
}

impl KeptNote {
    /// The `index`th of `count` notes given to check against, read from `source` if said.
    pub fn given(note: String, index: usize, count: usize, source: Option<&str>) -> KeptNote {
        let which = if count == 1 {
            "the signed checkpoint given to check against".to_string()
        } else {
            format!("signed checkpoint {} given to check against", index + 1)
        };
        KeptNote {
            note,
            from: match source {
                Some(s) => format!("{which} ({s})"),
                None => which,
            },
            unreadable: None,
        }
    }
}

/// [`verify_against`], with each kept note saying where it came from.
pub async fn verify_kept(
    log: &dyn EventLog,
    verifier: Option<&NoteVerifier>,
    deep: bool,
    kept: &[KeptNote],
    mut progress: impl FnMut(u64),
) -> Result<VerifyReport, LogError> {
    let mut v = Verifier::new(log, deep);
    if !v.load_checkpoints(log, verifier).await? || !v.add_kept(verifier, kept) {
        return Ok(v.report);
    }
    // The log as it is now: events appended while it is verified are left for the next run
    // (reading events and tree nodes in separate calls would otherwise see one and not the
    // other). Checkpoints were read first, so none covers more than this.
    let size = log.size().await?;
    if v.stream(log, size, &mut progress).await? {
        v.finish(log, size).await?;
    }
    Ok(v.report)
}

struct Verifier {
    report: VerifyReport,
    deep: bool,
    /// Checkpoints to match, by size: (size, root, which kept note it is, if it was kept
    /// outside the log: an index into `kept_from`).
    checkpoints: VecDeque<(u64, Digest, Option<usize>)>,
    /// Where each kept note came from ([`KeptNote::from`]).
    kept_from: Vec<String>,
    /// Size of the last checkpoint matched so far (where a rewrite can start at the earliest).
    matched: u64,
    heads: HashMap<RunId, RunHead>,
    /// The run of the last event checked, and its head (not in `heads` meanwhile).
    current: Option<(RunId, RunHead)>,
    frontier: Frontier,
    /// The lowest tree level the log stores.
    floor: u8,
    /// The hash column of the last event checked (what the next one's `log_prev` must be).
    last: Digest,
    next: u64,
    /// Where checking started: 0, or the size of the checkpoint [`verify_tail`] starts from
    /// (a run is then read up to it the first time one of its events is checked).
    base: u64,
    /// Checking from a checkpoint on: causes in runs not read, found stored before `base`.
    before: HashSet<EventId>,
}

impl Verifier {
    /// Checking from the start of the log; [`verify_tail`] moves the start to a checkpoint.
    fn new(log: &dyn EventLog, deep: bool) -> Verifier {
        Verifier {
            report: VerifyReport {
                deep,
                ..VerifyReport::default()
            },
            deep,
            checkpoints: VecDeque::new(),
            kept_from: Vec::new(),
            matched: 0,
            heads: HashMap::new(),
            current: None,
            frontier: Frontier::new(),
            floor: log.tree_floor(),
            last: Digest::GENESIS,
            next: 0,
            base: 0,
            before: HashSet::new(),
        }
    }

    fn fail(&mut self, log_seq: Option<u64>, event_id: Option<String>, problem: String) {
        self.report.failure = Some(Failure {
            log_seq,
            event_id,
            problem,
        });
    }

    /// Check the events from `self.next` up to `size`, a page at a time, reading the next page
    /// while this one is checked. `Ok(false)` once a failure is recorded.
    async fn stream(
        &mut self,
        log: &dyn EventLog,
        size: u64,
        progress: &mut impl FnMut(u64),
    ) -> Result<bool, LogError> {
        let take = |from: u64| size.saturating_sub(from).min(PAGE as u64);
        let start = self.next;
        let mut page = log
            .scan_page(start, take(start) as usize, true, EventPage::default())
            .await?;
        // The page before this one, whose memory the next read reuses.
        let mut spare = EventPage::default();
        loop {
            let n = page.len() as u64;
            let from = self.next + n;
            // Read the next page while this one is checked.
            let (next, outcome) = tokio::join!(
                async {
                    if n > 0 && take(from) > 0 {
                        let reuse = std::mem::take(&mut spare);
                        Some(log.scan_page(from, take(from) as usize, true, reuse).await)
                    } else {
                        None
                    }
                },
                self.check_page(log, &page)
            );
            self.report.events = self.next - self.base;
            if !outcome? {
                return Ok(false);
            }
            progress(self.next);
            match next {
                Some(p) => spare = std::mem::replace(&mut page, p?),
                None => return Ok(true),
            }
        }
    }

    /// Checkpoints first: their claims are what the events are checked against.
    async fn load_checkpoints(
        &mut self,
        log: &dyn EventLog,
        verifier: Option<&NoteVerifier>,
    ) -> Result<bool, LogError> {
        let stored = log.checkpoints().await?;
        if verifier.is_none() && !stored.is_empty() {
            self.report
                .warnings
                .push("no verifier key given: checkpoint signatures were not checked".into());
        }
        for (i, cp) in stored.iter().enumerate() {
            // One checkpoint per size (the store's key): a second one means the checkpoints
            // were altered, whatever they say.
            if i > 0 && stored[i - 1].size >= cp.size {
                self.fail(
                    None,
                    None,
                    format!(
                        "the log stores a checkpoint of size {} after one of size {}: checkpoints are kept one per size, in order; the checkpoints were altered",
                        cp.size,
                        stored[i - 1].size
                    ),
                );
                return Ok(false);
            }
            let parsed = match verifier {
                Some(v) => Checkpoint::open(&cp.note, v),
                None => Checkpoint::parse_unverified(&cp.note),
            };
            match parsed {
                Ok(c) if c.size == cp.size => self.checkpoints.push_back((c.size, c.root, None)),
                Ok(c) => {
                    self.fail(
                        None,
                        None,
                        format!("checkpoint stored at size {} says size {}", cp.size, c.size),
                    );
                    return Ok(false);
                }
                Err(e) => {
                    self.fail(None, None, format!("checkpoint of size {}: {e}", cp.size));
                    return Ok(false);
                }
            }
        }
        self.report.latest_checkpoint = self.checkpoints.back().map(|c| c.0);
        Ok(true)
    }

    /// Checkpoints kept outside the log join the stored ones (signed by `verifier`'s key; one
    /// the log also stores must name the same root). `false` once a failure is recorded.
    fn add_kept(&mut self, verifier: Option<&NoteVerifier>, kept: &[KeptNote]) -> bool {
        for KeptNote {
            note,
            from: which,
            unreadable,
        } in kept
        {
            let index = self.kept_from.len();
            self.kept_from.push(which.clone());
            if let Some(why) = unreadable {
                self.fail(
                    None,
                    None,
                    format!(
                        "{which} cannot be read: {why}, so the log cannot be checked against it"
                    ),
                );
                return false;
            }
            let Some(verifier) = verifier else {
                self.fail(
                    None,
                    None,
                    format!("{which}: no verifier key to check its signature with"),
                );
                return false;
            };
            let c = match Checkpoint::open(note, verifier) {
                Ok(c) => c,
                Err(e) => {
                    self.fail(None, None, format!("{which}: {e}"));
                    return false;
                }
            };
            let at = self
                .checkpoints
                .partition_point(|&(size, _, _)| size < c.size);
            match self.checkpoints.get_mut(at) {
                Some(same) if same.0 == c.size => {
                    if same.1 != c.root {
                        self.fail(
                            None,
                            None,
                            format!(
                                "{which} (size {}) and the log's own signed checkpoint of that size name different roots: the log was rewritten and its checkpoint signed again",
                                c.size
                            ),
                        );
                        return false;
                    }
                    // Named after the first note that gave it.
                    same.2.get_or_insert(index);
                }
                _ => self.checkpoints.insert(at, (c.size, c.root, Some(index))),
            }
        }
        self.report.latest_checkpoint = self.checkpoints.back().map(|c| c.0);
        while let Some(&(0, root, _)) = self.checkpoints.front() {
            self.checkpoints.pop_front();
            if root != crate::merkle::empty_root() {
                self.fail(
                    Some(0),
                    None,
                    "the signed checkpoint of size 0 does not have the empty tree's root".into(),
                );
                return false;
            }
            self.report.checkpoints_verified += 1;
        }
        true
    }

    /// Check one page of events and the tree nodes their leaves completed. `Ok(false)` once a
    /// failure is recorded.
    async fn check_page(&mut self, log: &dyn EventLog, rows: &EventPage) -> Result<bool, LogError> {
        if self.base > 0 && !self.load_heads(log, rows).await? {
            return Ok(false);
        }
        let mut nodes = rows.nodes().iter().copied();
        let blob_key = memchr::memmem::Finder::new(b"\"$blob\"");
        // Bodies are hashed two at a time (`HashedBody::two`): the second one waits here.
        let mut hashed: Option<HashedBody<'_>> = None;
        let mut it = rows.iter().peekable();
        while let Some(row) = it.next() {
            let label = || Some(format!("{}:{}", row.run_id, row.run_seq));
            let body = match (hashed.take(), it.peek()) {
                (Some(h), _) => h,
                // `--deep` re-derives every hash from the decoded event: no pairing.
                (None, _) if self.deep => HashedBody::new(row.body),
                (None, Some(next)) => {
                    let [this, next] = HashedBody::two(row.body, next.body);
                    hashed = Some(next);
                    this
                }
                (None, None) => HashedBody::new(row.body),
            };
            if let Some((id, problem)) = self.check_event(row, body) {
                let at = if row.log_seq == self.next {
                    Some(row.log_seq)
                } else {
                    Some(self.next)
                };
                self.fail(at, id, problem);
                return Ok(false);
            }
            // Blobs the event references must be stored and intact.
            if blob_key.find(row.body).is_some()
                && let Some(p) = self.check_blobs(log, row).await?
            {
                self.fail(Some(row.log_seq), label(), p);
                return Ok(false);
            }
            let hash: [u8; 32] = row.hash.try_into().unwrap_or([0; 32]);
            // The log's order is the order of appending: the event links to the one before it.
            if let Some(link) = row.log_prev
                && link != self.last.0
            {
                self.fail(
                    Some(row.log_seq),
                    label(),
                    if link.is_empty() {
                        format!(
                            "event at log_seq {} has no log_prev link (the column is empty or NULL): it was altered",
                            row.log_seq
                        )
                    } else {
                        format!(
                            "event at log_seq {} does not follow the event before it in the log (its log_prev names another event): events were moved, removed or inserted, or the event before it was altered and its hash computed again",
                            row.log_seq
                        )
                    },
                );
                return Ok(false);
            }
            self.last = Digest(hash);
            // The stored tree (which proofs are built from; with a floor of 0 its leaves record
            // the order the events were appended in) must be the tree of these events.
            let mut mismatch = None;
            let mut checked = 0;
            let floor = self.floor;
            self.frontier.push_each(leaf_hash(&hash), |id, h| {
                if id.level < floor {
                    return;
                }
                let stored = nodes.next();
                if mismatch.is_none() {
                    mismatch = stored
                        .and_then(|(sid, _)| below_floor(sid, floor))
                        .or_else(|| tree_mismatch(id, h, stored));
                }
                checked += 1;
            });
            if let Some(problem) = mismatch {
                self.fail(Some(row.log_seq), label(), problem);
                return Ok(false);
            }
            self.report.tree_nodes_checked += checked;
            self.next += 1;
            if let Some(&(size, root, kept)) = self.checkpoints.front()
                && size == self.next
            {
                self.checkpoints.pop_front();
                if self.frontier.root() != root {
                    // Every stored node and link agreed with the events so far, so the events,
                    // links and nodes were rewritten together: only the signed root says where
                    // (somewhere after the last checkpoint that matched).
                    let from = self.matched;
                    self.fail(
                        Some(size - 1),
                        None,
                        format!(
                            "the root of the first {size} events does not match the signed checkpoint of that size{}: the log was rewritten between log_seq {from} and {}",
                            kept.map_or_else(String::new, |i| format!(" ({})", self.kept_from[i])),
                            size - 1
                        ),
                    );
                    return Ok(false);
                }
                self.matched = size;
                self.report.checkpoints_verified += 1;
            }
        }
        if let Some((id, _)) = nodes.next() {
            if let Some(problem) = below_floor(id, self.floor) {
                self.fail(Some(id.index << id.level), None, problem);
                return Ok(false);
            }
            // A node over leaves past the last event: those events are missing (the first of
            // them is the first affected), or the node was added.
            self.fail(
                Some(id.last_leaf().min(self.next)),
                None,
                format!("the stored tree has a node ({id:?}) that no event completed: events from log_seq {} on are missing, or the tree was altered", self.next),
            );
            return Ok(false);
        }
        Ok(true)
    }

    /// Check one stored event against its position, hash and the law. Returns the failure.
    fn check_event(
        &mut self,
        row: StoredRef<'_>,
        body: HashedBody<'_>,
    ) -> Option<(Option<String>, String)> {
        let label = || format!("{}:{}", row.run_id, row.run_seq);
        if row.log_seq != self.next {
            return Some((
                None,
                format!(
                    "event at log_seq {} is missing (the next stored event is at log_seq {})",
                    self.next, row.log_seq
                ),
            ));
        }
        let Ok(hash) = <[u8; 32]>::try_from(row.hash) else {
            return Some((
                Some(label()),
                format!("hash column is {} bytes, not 32", row.hash.len()),
            ));
        };
        let hash = Digest(hash);
        // The run's head is out of the map while its events are checked (the others answer
        // cause lookups), and goes back when an event of another run comes: a run's events
        // mostly come in batches, and no id is copied or hashed per event.
        let (key, mut head) = match self.current.take() {
            Some((k, h)) if k.as_str() == row.run_id => (k, h),
            other => {
                if let Some((k, h)) = other {
                    self.heads.insert(k, h);
                }
                match self.heads.remove_entry(row.run_id) {
                    Some(kh) => kh,
                    None => match RunId::new(row.run_id) {
                        Ok(r) => (r.clone(), RunHead::new(r)),
                        Err(e) => return Some((Some(label()), format!("run id column: {e}"))),
                    },
                }
            }
        };
        let outcome = if self.deep {
            deep_check(
                &mut head,
                row,
                hash,
                &SeenOrBefore(&self.heads, &self.before),
            )
        } else {
            match head.admit_hashed(body, hash, &SeenOrBefore(&self.heads, &self.before)) {
                Ok(h)
                    if h.run_id != row.run_id
                        || h.run_seq != row.run_seq
                        || h.event_type != row.event_type =>
                {
                    Err("the indexed columns disagree with the stored event".to_string())
                }
                Ok(_) => Ok(()),
                Err(e) => Err(e.to_string()),
            }
        };
        self.current = Some((key, head));
        outcome.err().map(|p| (Some(label()), p))
    }

    /// Checking from a checkpoint on: the head, as of that checkpoint, of every run the page's
    /// events belong to that was not read yet; and for causes in runs that were not read (and
    /// have no events since the checkpoint before the citing one), whether the event is stored
    /// before the checkpoint. `Ok(false)` once a failure is recorded.
    async fn load_heads(&mut self, log: &dyn EventLog, rows: &EventPage) -> Result<bool, LogError> {
        let known = |v: &Verifier, run: &str| {
            v.heads.contains_key(run) || v.current.as_ref().is_some_and(|(k, _)| k.as_str() == run)
        };
        let mut wanted: Vec<RunId> = Vec::new();
        for row in rows.iter() {
            if !known(self, row.run_id)
                && !wanted.iter().any(|w| w.as_str() == row.run_id)
                && let Ok(r) = RunId::new(row.run_id)
            {
                wanted.push(r);
            }
        }
        for run in wanted {
            let mut head = RunHead::new(run.clone());
            let mut from = 0;
            'run: loop {
                let events = log.read_run(&run, from, PAGE).await?;
                let n = events.len();
                for e in events {
                    if e.log_seq >= self.base {
                        break 'run;
                    }
                    // Covered by the checkpoint's signature: read to learn the run's head
                    // (what its next event must follow), which checks its chain as well.
                    let hash = <[u8; 32]>::try_from(e.hash.as_slice()).unwrap_or([0; 32]);
                    if let Err(p) = head.admit_stored(&e.body, Digest(hash), &AnyCause) {
                        self.fail(
                            Some(e.log_seq),
                            Some(format!("{}:{}", e.run_id, e.run_seq)),
                            p.to_string(),
                        );
                        return Ok(false);
                    }
                }
                if n < PAGE {
                    break;
                }
                from += n as u64;
            }
            self.heads.insert(run, head);
        }
        // Causes in runs with no events on this page or since the checkpoint: looked up one by
        // one (a run need not be read whole to know one of its events is there).
        for row in rows.iter() {
            // A payload that does not read is reported when the event is checked.
            let Ok(e) = row.event() else { continue };
            for c in e.causes {
                if !known(self, c.run_id.as_str())
                    && !self.before.contains(&c)
                    && log.get(&c).await?.is_some_and(|s| s.log_seq < self.base)
                {
                    self.before.insert(c);
                }
            }
        }
        Ok(true)
    }

    async fn check_blobs(
        &mut self,
        log: &dyn EventLog,
        row: StoredRef<'_>,
    ) -> Result<Option<String>, LogError> {
        let event = match row.event() {
            Ok(e) => e,
            Err(e) => return Ok(Some(format!("the event does not read: {e}"))),
        };
        let refs = match blob_refs(&event.payload) {
            Ok(r) => r,
            Err(e) => return Ok(Some(e)),
        };
        for r in refs {
            self.report.blobs_checked += 1;
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

    async fn finish(&mut self, log: &dyn EventLog, size: u64) -> Result<(), LogError> {
        let next = self.next;
        if let Some(&(size, _, kept)) = self.checkpoints.front() {
            let which = kept.map_or("a signed checkpoint", |i| self.kept_from[i].as_str());
            self.fail(
                Some(next),
                None,
                format!("the log ends at {next} events but {which} covers {size}: events from log_seq {next} on are missing (truncated)"),
            );
            return Ok(());
        }
        if next < size {
            self.fail(
                Some(next),
                None,
                format!("the log says it holds {size} events but they end at {next}: events from log_seq {next} on are missing (truncated)"),
            );
            return Ok(());
        }
        // Tree nodes past the last event verified mean events were removed, unless an event
        // is there now (appended while the log was verified). Nodes are read first: an event
        // and its nodes are appended together.
        if let Some((id, _)) = log.scan_nodes(next, 1).await?.first()
            && log.scan(next, 1).await?.is_empty()
        {
            self.fail(
                Some(next),
                None,
                format!("the stored tree has nodes beyond the last event ({id:?}): events from log_seq {next} on were removed"),
            );
            return Ok(());
        }
        // Events stored past the log's size: its head was moved back over a tail that is still
        // there (readers that stop at the head would not see it), unless the log grew to cover
        // them while it was verified (the head moves in the same commit as the events).
        if let Some(e) = log.scan(next, 1).await?.first() {
            let now = log.size().await?;
            if e.log_seq >= now {
                self.fail(
                    Some(next),
                    None,
                    format!(
                        "the log says it holds {now} events but event {}:{} is stored at log_seq {}: its head was moved back, hiding events from log_seq {next} on",
                        e.run_id,
                        e.run_seq,
                        e.log_seq
                    ),
                );
                return Ok(());
            }
        }
        if let Some(problem) = self.check_extent(log).await? {
            self.fail(None, None, problem);
            return Ok(());
        }
        // Blob rows no event references (a referenced one was checked with its event).
        if let Some(name) = log.altered_blob().await? {
            self.fail(
                None,
                None,
                format!("the stored blob {name} does not hash to its name, and no event references it: its bytes were altered or planted (an append that referenced it would be refused)"),
            );
            return Ok(());
        }
        // Deep: the store's own indexes, which lookups by run and by id go through.
        if self.deep
            && let Some(problem) = log.index_problem().await?
        {
            self.fail(None, None, problem);
            return Ok(());
        }
        if let Some((k, h)) = self.current.take() {
            self.heads.insert(k, h);
        }
        self.report.runs = self.heads.len() as u64;
        self.report.root = self.frontier.root().to_hex();
        match self.report.latest_checkpoint {
            Some(signed) if next > signed => self.report.warnings.push(format!(
                "{} event(s) after the latest checkpoint (size {signed}) are not yet covered by a signature; run `ice checkpoint`",
                next - signed
            )),
            None if next > 0 => self.report.warnings.push(format!(
                "no signed checkpoint: none of the {next} event(s) is covered by a signature yet; run `ice checkpoint`"
            )),
            _ => {}
        }
        Ok(())
    }
}

impl Verifier {
    /// Nothing may be stored outside the log just verified: no event row before position 0 or
    /// past the head (the backend's other readers would see events no verification covers), no
    /// tree node past the last event (the append that completes that node would fail on it),
    /// and the head must name the last event as the one the next append links to. The edges
    /// are judged against the size read with them: what was appended meanwhile is no problem.
    async fn check_extent(&self, log: &dyn EventLog) -> Result<Option<String>, LogError> {
        let Some(x) = log.extent().await? else {
            return Ok(None);
        };
        let next = self.next;
        if x.size < next {
            return Ok(Some(format!(
                "the log's head says it holds {} events, but {next} were verified: the head was moved back",
                x.size
            )));
        }
        if let Some((lo, hi)) = x.events {
            if lo < 0 {
                return Ok(Some(format!(
                    "event rows are stored at negative positions (the lowest at log_seq {lo}): they are no part of the log, yet readers of runs would see them; they were inserted"
                )));
            }
            if hi >= x.size as i64 {
                return Ok(Some(format!(
                    "an event row is stored at log_seq {hi}, past the log's head ({} events): the head was moved back over it, or it was inserted",
                    x.size
                )));
            }
        }
        if let Some(rows) = x.rows
            && x.size == next
            && rows != next
        {
            return Ok(Some(format!(
                "{rows} event rows are stored, but the log holds {next} events: rows at no position in the log (a NULL log_seq) were inserted, the table rebuilt to allow them"
            )));
        }
        if let Some((lo, hi)) = x.nodes {
            if lo < 0 {
                return Ok(Some(format!(
                    "the stored tree has a node at leaf {lo}, before the first event: it was inserted"
                )));
            }
            if hi >= x.size as i64 {
                return Ok(Some(format!(
                    "the stored tree has a node ending at leaf {hi}, past the log's last event (log_seq {}): it was inserted, and the append that reaches it would fail on it",
                    x.size as i64 - 1
                )));
            }
        }
        if let Some(last) = x.last
            && x.size == next
            && last != self.last
        {
            return Ok(Some(format!(
                "the log's head names {} as its last event's hash, but the last event{} hashes to {}: the next append would link to an event that is not there",
                last.to_hex(),
                next.checked_sub(1)
                    .map(|s| format!(" (log_seq {s})"))
                    .unwrap_or_default(),
                self.last.to_hex()
            )));
        }
        Ok(None)
    }
}

/// A stored node below the lowest level the log says it stores: the floor it records was
/// raised, or the node inserted (either way, not events missing).
fn below_floor(id: NodeId, floor: u8) -> Option<String> {
    (id.level < floor).then(|| {
        format!(
            "the stored tree has a level {} node (over log_seq {}..={}) below the lowest level the log records that it stores ({floor}): the recorded level was changed, or the node was inserted",
            id.level,
            id.index << id.level,
            id.last_leaf()
        )
    })
}

/// What is wrong with the stored tree where the events complete node `id` with hash `h` and
/// the next stored node (in `scan_nodes` order: by last leaf, then level) is `stored`; `None`
/// if they agree.
fn tree_mismatch(
    id: NodeId,
    h: Digest,
    stored: Option<(NodeId, Option<Digest>)>,
) -> Option<String> {
    let span = |id: NodeId| (id.index << id.level, id.last_leaf());
    let (lo, hi) = span(id);
    let order = |n: NodeId| (n.last_leaf(), n.level);
    match stored {
        Some((sid, sh)) if sid == id && sh == Some(h) => None,
        Some((sid, _)) if sid == id && id.level == 0 => Some(format!(
            "the stored Merkle leaf for log_seq {lo} does not match the event there: it was altered, moved or swapped since it was appended"
        )),
        Some((sid, _)) if sid == id => Some(format!(
            "the stored Merkle tree does not match the events at log_seq {lo}..={hi} (level {} node): an event there was altered, moved or swapped since it was appended, or the node itself was",
            id.level
        )),
        Some((sid, _)) if order(sid) < order(id) || sid.last_leaf() == u64::MAX => Some(format!(
            "the stored tree has a level {} node that the events do not make, before the node over log_seq {lo}..={hi} they make next: it was inserted",
            sid.level
        )),
        _ => Some(format!(
            "the stored tree has no node over log_seq {lo}..={hi} at level {}, which the events complete: it was deleted",
            id.level
        )),
    }
}

/// The deep check: parse the whole event, run every rule, re-derive the canonical encoding.
fn deep_check(
    head: &mut RunHead,
    row: StoredRef<'_>,
    hash: Digest,
    seen: &dyn CauseIndex,
) -> Result<(), String> {
    let event = row.event().map_err(|e| e.to_string())?;
    if event.run_id.as_str() != row.run_id
        || event.run_seq != row.run_seq
        || event.event_type != row.event_type
    {
        return Err("the indexed columns disagree with the stored event".into());
    }
    debug_assert_eq!(event.hash, hash);
    let sealed = head.admit(event, seen).map_err(|e| e.to_string())?;
    if sealed.body() != row.body {
        return Err("the stored body is not the canonical encoding of the event".into());
    }
    Ok(())
}

/// What [`verify_tail`] checked: the report (its `events` are those after the checkpoint), and
/// the size and root of the log it read.
#[derive(Clone, Debug)]
pub struct Tail {
    /// The report; `failure` says what is wrong.
    pub report: VerifyReport,
    /// The size of the log checked.
    pub size: u64,
    /// Its Merkle root, computed from the events (equal to the stored tree's, when `report` is ok).
    pub root: Digest,
    /// The heads of the runs read, as of `size` (what a [`SignerMemory`] keeps).
    heads: HashMap<RunId, RunHead>,
}

/// Verify what the latest stored checkpoint does not cover yet, as deeply as
/// [`verify_with`]`(deep = true)` checks every event: the latest checkpoint must open with
/// `verifier` and name the stored tree's root at its size; every event after it must hash to
/// its hash, decode, be its own canonical encoding, pass the law against the heads its runs had
/// at the checkpoint, and sit where the stored tree and `log_prev` links say. The cost is that
/// of the new events and of reading the runs they belong to or cite, not of the whole log.
/// This is what is checked before a checkpoint is signed ([`sign_checkpoint`]).
pub async fn verify_tail(log: &dyn EventLog, verifier: &NoteVerifier) -> Result<Tail, LogError> {
    verify_tail_with(log, verifier, None).await
}

/// What a signer keeps between signatures: the heads of the runs it has read, as of the size
/// it checked last (in memory: when the latest checkpoint is the one it then signed,
/// [`verify_tail_with`] starts from them and reads none of those runs again, so a signature
/// costs the events since, even while a long run stays open); and, with
/// [`SignerMemory::keeping`], the last checkpoint it signed, in a file outside the log.
#[derive(Default)]
pub struct SignerMemory {
    heads: std::sync::Mutex<Option<Remembered>>,
    record: Option<SignedRecord>,
}

impl SignerMemory {
    /// A memory that also keeps the last checkpoint signed in `record`: no checkpoint is signed
    /// over a log that did not grow from it.
    pub fn keeping(record: SignedRecord) -> SignerMemory {
        SignerMemory {
            heads: Default::default(),
            record: Some(record),
        }
    }

    /// Where it keeps the last checkpoint signed, if it does.
    pub fn record(&self) -> Option<&SignedRecord> {
        self.record.as_ref()
    }
}

/// The last checkpoint a signer signed, kept in a file outside the log (beside its key).
///
/// The log's own checkpoints are stored with its events, so whoever can rewrite the events can
/// also delete the checkpoints that would give the rewrite away; a signer that checked only what
/// the log holds would then sign the rewritten events. With its own copy it refuses to sign a
/// log whose first events no longer have the root it signed for them, and `ice verify` checks
/// the log against it (a [`KeptNote`]).
#[derive(Clone, Debug)]
pub struct SignedRecord {
    path: std::path::PathBuf,
}

/// Largest record file read (a signed note is a few hundred bytes).
const MAX_RECORD_BYTES: u64 = 64 << 10;

impl SignedRecord {
    /// The record kept at `path`.
    pub fn at(path: impl Into<std::path::PathBuf>) -> SignedRecord {
        SignedRecord { path: path.into() }
    }

    /// Where it is kept.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The record as a [`KeptNote`] to verify against, if one was kept. A record whose content
    /// cannot be a signed note (not a regular file, too large, not text) is a note that fails
    /// the check ([`KeptNote::unreadable`]): someone may have replaced it to stop the check. A
    /// record that cannot be read at all (permissions, I/O) is an error.
    pub fn kept(&self) -> Result<Option<KeptNote>, LogError> {
        let from = format!(
            "the checkpoint this installation signed last (kept in {})",
            self.path.display()
        );
        Ok(self.load()?.map(|read| match read {
            Ok(note) => KeptNote {
                note,
                from,
                unreadable: None,
            },
            Err(why) => KeptNote {
                note: String::new(),
                from,
                unreadable: Some(why),
            },
        }))
    }

    /// The file whose lock signers in any process hold while they keep a checkpoint.
    pub fn lock_path(&self) -> std::path::PathBuf {
        let mut name = self
            .path
            .file_name()
            .map_or_else(|| "record".into(), |n| n.to_os_string());
        name.push(".lock");
        self.path.with_file_name(name)
    }

    /// Hold the record's lock (blocking until no other signer holds it); released when the
    /// returned file is closed.
    fn lock(&self) -> std::io::Result<std::fs::File> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.lock_path())?;
        f.lock()?;
        Ok(f)
    }

    /// The note kept, if any (none before the first signature); a record that cannot be one
    /// is an error.
    pub fn read(&self) -> Result<Option<String>, LogError> {
        self.load()?
            .map(|read| read.map_err(|why| self.read_failed(why)))
            .transpose()
    }

    fn read_failed(&self, what: String) -> LogError {
        LogError::Storage {
            context: format!(
                "reading the last signed checkpoint, {}",
                self.path.display()
            ),
            message: what,
        }
    }

    /// The record: none, its text, or why its content cannot be a note.
    fn load(&self) -> Result<Option<Result<String, String>>, LogError> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        // Opened without following a link or waiting on a FIFO, then looked at: what is read
        // is what was checked, and never more than a note's size.
        let flags = rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK;
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(flags.bits() as i32)
            .open(&self.path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) => {
                return Ok(Some(
                    Err("it is a symbolic link, not a regular file".into()),
                ));
            }
            Err(e) => return Err(self.read_failed(e.to_string())),
        };
        let meta = file
            .metadata()
            .map_err(|e| self.read_failed(e.to_string()))?;
        if !meta.is_file() {
            return Ok(Some(Err("it is not a regular file".into())));
        }
        let too_big = |n: u64| {
            Ok(Some(Err(format!(
                "it holds {n} bytes, more than a signed note ever does ({MAX_RECORD_BYTES})"
            ))))
        };
        if meta.len() > MAX_RECORD_BYTES {
            return too_big(meta.len());
        }
        let mut bytes = Vec::new();
        file.take(MAX_RECORD_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| self.read_failed(e.to_string()))?;
        if bytes.len() as u64 > MAX_RECORD_BYTES {
            return too_big(bytes.len() as u64);
        }
        Ok(Some(
            String::from_utf8(bytes).map_err(|_| "it is not UTF-8 text".to_string()),
        ))
    }

    /// Keep `note`, a checkpoint of `size` events just signed, durably (written aside, synced,
    /// renamed into place) unless the note kept already covers more (another process signing
    /// with the same key got there first: the log grew from both).
    fn keep(&self, note: &str, size: u64, verifier: &NoteVerifier) -> Result<(), LogError> {
        let fail = |what: String| LogError::Storage {
            context: format!(
                "keeping the checkpoint just signed (it is signed and stored in the log) in {}",
                self.path.display()
            ),
            message: what,
        };
        // Signers keep one at a time, so the larger checkpoint is not replaced by a smaller one
        // read before it was kept: in one process (a server's runs ending together) by a mutex,
        // across processes (an `ice checkpoint` beside a server) by a lock on a file beside the
        // record, held until the new record is in place.
        static KEEPING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = KEEPING.lock().unwrap_or_else(|p| p.into_inner());
        let _all = self
            .lock()
            .map_err(|e| fail(format!("locking {}: {e}", self.lock_path().display())))?;
        if let Some(old) = self.read()?
            && let Ok(c) = Checkpoint::open(&old, verifier)
            && c.size > size
        {
            return Ok(());
        }
        let dir = self
            .path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        let name = self
            .path
            .file_name()
            .map_or_else(|| "record".into(), |n| n.to_string_lossy());
        sweep_stale_writes(dir, &name);
        // A name of its own per write: signers in one process (a server's) may keep at once.
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let temp = dir.join(format!(
            ".{name}.{}.{}",
            std::process::id(),
            WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&temp)?;
            f.write_all(note.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&temp, &self.path)?;
            std::fs::File::open(dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&temp);
            fail(e.to_string())
        })
    }

    /// Whether the log grew from the checkpoint kept: it holds at least as many events, and its
    /// stored tree (checked against the events since the latest checkpoint by
    /// [`verify_tail_with`] first) gives the first `size` of them the root signed. The failure
    /// if not.
    async fn extended_by(
        &self,
        note: &str,
        log: &dyn EventLog,
        verifier: &NoteVerifier,
        size: u64,
    ) -> Result<Option<Failure>, LogError> {
        let at = self.path.display();
        let refuse = |log_seq: Option<u64>, problem: String| {
            Ok(Some(Failure {
                log_seq,
                event_id: None,
                problem,
            }))
        };
        let c = match Checkpoint::open(note, verifier) {
            Ok(c) => c,
            Err(e) => {
                return refuse(
                    None,
                    format!(
                        "the checkpoint this installation signed last (kept in {at}) does not open with its key: {e}"
                    ),
                );
            }
        };
        if c.size > size {
            return refuse(
                Some(size),
                format!(
                    "the log holds {size} events, but this installation signed a checkpoint of {} (kept in {at}): events from log_seq {size} on were removed, and the log's checkpoints with them",
                    c.size
                ),
            );
        }
        if c.size == 0 {
            return Ok(None);
        }
        let ids = crate::merkle::range_nodes(0, c.size);
        let stored: HashMap<NodeId, Digest> =
            ids.iter().copied().zip(log.nodes(&ids).await?).collect();
        let root = Frontier::from_nodes(c.size, |id| stored.get(&id).copied()).map(|f| f.root());
        if root != Some(c.root) {
            return refuse(
                Some(c.size - 1),
                format!(
                    "the first {} events do not have the root this installation signed for them (kept in {at}): the log was rewritten before log_seq {}, and the checkpoints that would show it removed or replaced",
                    c.size, c.size
                ),
            );
        }
        Ok(None)
    }
}

struct Remembered {
    size: u64,
    root: Digest,
    heads: HashMap<RunId, RunHead>,
}

/// Runs a [`SignerMemory`] keeps at most (beyond that it starts again from the log).
const REMEMBERED_RUNS: usize = 100_000;

/// Remove what a signer that stopped half way through keeping a record left (`.NAME.PID.N`,
/// written aside and not yet renamed into place: a process killed in between). Called with the
/// record's lock held, which every writer of the record holds from writing aside to renaming:
/// whatever of that form is there now, no writer will rename. Best effort: what cannot be
/// removed only stays.
fn sweep_stale_writes(dir: &std::path::Path, name: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let prefix = format!(".{name}.");
    for e in entries.flatten() {
        let file = e.file_name();
        let ours = file
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|rest| rest.split_once('.'))
            .is_some_and(|(pid, n)| {
                [pid, n]
                    .iter()
                    .all(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            });
        if ours {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// [`verify_tail`], starting from the heads `memory` kept when it signed the latest checkpoint
/// ([`sign_checkpoint_with`] keeps them).
pub async fn verify_tail_with(
    log: &dyn EventLog,
    verifier: &NoteVerifier,
    memory: Option<&SignerMemory>,
) -> Result<Tail, LogError> {
    let mut v = Verifier::new(log, true);
    let done = |v: Verifier, size: u64| Tail {
        root: v.frontier.root(),
        report: v.report,
        size,
        heads: v.heads,
    };
    let latest = log.checkpoints().await?.pop();
    let size = log.size().await?;
    if let Some(cp) = latest {
        let c = match Checkpoint::open(&cp.note, verifier) {
            Ok(c) if c.size == cp.size => c,
            Ok(c) => {
                v.fail(
                    None,
                    None,
                    format!(
                        "the latest checkpoint is stored at size {} but says size {}",
                        cp.size, c.size
                    ),
                );
                return Ok(done(v, size));
            }
            Err(e) => {
                v.fail(
                    None,
                    None,
                    format!("the latest checkpoint (size {}): {e}", cp.size),
                );
                return Ok(done(v, size));
            }
        };
        v.report.latest_checkpoint = Some(c.size);
        if size < c.size {
            v.fail(
                Some(size),
                None,
                format!("the log ends at {size} events but a signed checkpoint covers {}: events from log_seq {size} on are missing (truncated)", c.size),
            );
            return Ok(done(v, size));
        }
        if c.size > 0 {
            let ids = crate::merkle::range_nodes(0, c.size);
            let stored: HashMap<NodeId, Digest> =
                ids.iter().copied().zip(log.nodes(&ids).await?).collect();
            let frontier = Frontier::from_nodes(c.size, |id| stored.get(&id).copied());
            let last = log.scan(c.size - 1, 1).await?;
            match (frontier, last.first()) {
                (Some(f), Some(e)) if f.root() == c.root && e.log_seq == c.size - 1 => {
                    v.frontier = f;
                    v.last = Digest(<[u8; 32]>::try_from(e.hash.as_slice()).unwrap_or([0; 32]));
                }
                _ => {
                    v.fail(
                        Some(c.size - 1),
                        None,
                        format!("the stored tree of the first {} events does not have the root of the signed checkpoint of that size: the log was rewritten before it", c.size),
                    );
                    return Ok(done(v, size));
                }
            }
            v.next = c.size;
            v.base = c.size;
            v.matched = c.size;
            if let Some(m) = memory
                && let Some(r) = m.heads.lock().unwrap_or_else(|p| p.into_inner()).as_ref()
                && (r.size, r.root) == (c.size, c.root)
            {
                v.heads = r.heads.clone();
            }
        }
        v.report.checkpoints_verified = 1;
    }
    if v.stream(log, size, &mut |_| {}).await? {
        v.finish(log, size).await?;
    }
    v.report.warnings.clear();
    if let Some((k, h)) = v.current.take() {
        v.heads.insert(k, h);
    }
    v.report.runs = v.heads.len() as u64;
    v.report.root = v.frontier.root().to_hex();
    Ok(done(v, size))
}

/// Why no checkpoint was signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The log could not be read or the checkpoint stored.
    #[error(transparent)]
    Log(#[from] LogError),
    /// What the checkpoint would cover does not verify: a signature would vouch for it.
    #[error(
        "refusing to sign a checkpoint: the log does not verify since its latest checkpoint: {0}; nothing was signed (`ice verify --deep` checks the whole log)"
    )]
    Refused(Failure),
    /// The log did not grow from the last checkpoint this signer signed (kept in `record`,
    /// outside the log): its events were removed or rewritten, and its checkpoints with them.
    #[error(
        "refusing to sign a checkpoint: {failure}; nothing was signed (if this log is meant to replace the one signed, restored from an older copy say, move {} aside first: checks then trust what the log holds)",
        record.display()
    )]
    Diverged {
        /// What does not match.
        failure: Failure,
        /// Where the signer keeps its last checkpoint.
        record: std::path::PathBuf,
    },
    /// The signer failed.
    #[error("signing the checkpoint: {0}")]
    Sign(#[from] crate::checkpoint::CheckpointError),
}

/// A checkpoint signed and stored by [`sign_checkpoint`].
#[derive(Clone, Debug)]
pub struct Signed {
    /// Events it covers.
    pub size: u64,
    /// Their Merkle root.
    pub root: Digest,
    /// The signed note.
    pub note: String,
}

/// Sign the log's current tree head with `signer` and store the checkpoint, after checking
/// everything since the latest checkpoint ([`verify_tail`], with `signer`'s own public key): a
/// signature is an attestation, and is never put on events verification would reject.
pub async fn sign_checkpoint(log: &dyn EventLog, signer: &NoteSigner) -> Result<Signed, SignError> {
    sign_checkpoint_with(log, signer, None).await
}

/// [`sign_checkpoint`] for a signer that signs again and again (a server): `memory` carries
/// what the last check read into the next one ([`verify_tail_with`]).
pub async fn sign_checkpoint_with(
    log: &dyn EventLog,
    signer: &NoteSigner,
    memory: Option<&SignerMemory>,
) -> Result<Signed, SignError> {
    let record = memory.and_then(|m| m.record.as_ref());
    let kept = record.map(SignedRecord::read).transpose()?.flatten();
    let verifier = signer.verifier();
    let tail = verify_tail_with(log, &verifier, memory).await?;
    if let Some(f) = tail.report.failure {
        return Err(SignError::Refused(f));
    }
    if let (Some(record), Some(note)) = (record, &kept)
        && let Some(failure) = record.extended_by(note, log, &verifier, tail.size).await?
    {
        return Err(SignError::Diverged {
            failure,
            record: record.path.clone(),
        });
    }
    let cp = Checkpoint {
        origin: signer.name().to_string(),
        size: tail.size,
        root: tail.root,
    };
    let note = cp.sign(signer)?;
    log.add_checkpoint(crate::StoredCheckpoint {
        size: tail.size,
        note: note.clone(),
    })
    .await?;
    if let Some(record) = record {
        // Off the async threads: it may wait for another process's signer, and it syncs.
        let (record, kept_note, verifier, size) =
            (record.clone(), note.clone(), verifier.clone(), tail.size);
        tokio::task::spawn_blocking(move || record.keep(&kept_note, size, &verifier))
            .await
            .map_err(|e| LogError::Storage {
                context: "keeping the checkpoint just signed".into(),
                message: e.to_string(),
            })??;
    }
    if let Some(m) = memory {
        *m.heads.lock().unwrap_or_else(|p| p.into_inner()) = (tail.heads.len() <= REMEMBERED_RUNS)
            .then_some(Remembered {
                size: tail.size,
                root: tail.root,
                heads: tail.heads,
            });
    }
    Ok(Signed {
        size: tail.size,
        root: tail.root,
        note,
    })
}
