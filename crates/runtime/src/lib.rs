//! # ice-runtime: the run executor
//!
//! The runtime runs each unit of work as a Run through every phase of the spec's lifecycle
//! (provision → context → execute → validate → commit or abort → teardown). During the
//! execution window it shows the agent a view, records what the agent proposes, and for each
//! capability request decides (grant, policy, approval, budget) and acts through the effects
//! layer, recording every step as an event. Internal writes are staged and land only at commit,
//! after validation.
//!
//! - [`spec`]: the run spec file.
//! - [`books`]: a run's state as a fold of its events (the live run and a replay share it).
//! - [`Runtime`]: starting, resuming, recovering, killing and reconfiguring runs; approvals.
#![warn(missing_docs)]

mod act;
pub mod books;
mod executor;
pub mod lock;
pub mod memory;
pub mod operator;
pub mod replay;
pub mod spec;

use std::path::PathBuf;
use std::sync::Arc;

use ice_authority::{Registry, Schema};
use ice_kernel::{Clock, Event, RunId, RunState};
use ice_log::ledger::Ledger;

pub use books::{Books, FoldError, StagedOp};
pub use executor::{RunOutcome, RunReport};
pub use operator::{ApprovalListing, Killed, PendingApproval, Recovered, RunProblem, Session};
pub use spec::{Assumption, BudgetSpec, Check, OnExhaustion, RunSpec, SpecError};

/// The version of the rules by which the runtime turns a request into a decision: how the
/// Cedar request is built from a call (its resource, context and arguments), when a live grant
/// may stand in, and which checks a permitted call still passes. Every run records it
/// (`RunProvisioned.decision_rules`, and `RunResumed.decision_rules`: a run resumed by another
/// ICE decides by that ICE's rules from then on). `replay --drive` re-makes a run's decisions by the rules
/// of the ICE that replays; for a run recorded under other rules (or before runs recorded
/// them) a decision that comes out differently is listed as not checked, saying why, instead
/// of as a divergence. Bump it with any change that can decide a recorded request otherwise.
///
/// 1: the policy decides every call (a live grant only stands in for issuing a new grant);
/// HTTP calls are decided on the URL as sent (dot segments resolved, escapes in one spelling:
/// `%61` is `a`, others in upper case); every address an HTTP host resolves to passes the
/// policy's connection checks (`http.connect`).
///
/// 2: a request for a built-in capability is refused (`invalid_target`) before anything
/// decides on it when its arguments are not what the capability's schema takes: a write
/// with no `content` (or a misspelled one), an argument of the wrong type, one the schema
/// does not name, a `timeout_ms` out of range. (Rules 1 wrote an empty file for a write with
/// no `content`, and read a `method` that is not a string as GET.)
///
/// 3: an `http.request` whose `method` is not one the schema names (in any case) is refused
/// the same way. (Rules 2 decided on it, and the adapter refused to send it after the grant.)
///
/// 4: `process.exec` is external (nothing isolates a command), so a permit needs an operator's
/// approval for each call unless it says `@external("permit")`. (Rules 3 classed it
/// internal-write, and a plain permit let it run.) A file or directory target holding an
/// invisible formatting character (a bidirectional override, a zero-width space: what would
/// show an operator another name) is refused (`invalid_target`).
pub const DECISION_RULES: u64 = 4;

/// Something that wants to see each event a run records, as it is recorded (progress lines).
pub trait Observer: Send + Sync {
    /// An event of the run was recorded.
    fn recorded(&self, event: &Event);
    /// The run waits for something (an approval); `what` says for what and how to answer.
    fn waiting(&self, _what: &str) {}
}

/// An observer that ignores everything.
pub struct Quiet;

impl Observer for Quiet {
    fn recorded(&self, _event: &Event) {}
}

/// Why the runtime could not do what was asked. Bad input names what was wrong; nothing was
/// executed when a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The run spec is unusable.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The policy could not be loaded.
    #[error("policy: {0}")]
    Policy(String),
    /// The log failed.
    #[error("log: {0}")]
    Log(#[from] ice_log::LogError),
    /// An append was refused by the validator (a runtime bug or a concurrent writer).
    #[error("append: {0}")]
    Append(#[from] ice_log::ledger::AppendError),
    /// The run's events do not fold.
    #[error(transparent)]
    Fold(#[from] FoldError),
    /// No such run.
    #[error("no run {0}")]
    NoRun(String),
    /// The run is not in a state that allows this.
    #[error("run {run} is {state}: {what}")]
    State {
        /// The run.
        run: String,
        /// Its state.
        state: RunState,
        /// What was refused.
        what: String,
    },
    /// Another process is running this run.
    #[error("run {0} is being run by another process (its lock is held)")]
    Busy(String),
    /// Another ICE node holds this run's claim in the shared log (or took it over from us).
    #[error("{0}")]
    Claimed(String),
    /// A run id is taken.
    #[error("run {0} already exists; give another [run] id or leave it out")]
    Exists(String),
    /// An approval request already has its one answer: an operator's, or the runtime's when
    /// it stopped waiting (a timeout, a kill). Nothing was recorded for this answer.
    #[error(
        "approval {approval} was already answered by {by}: {answer}; this answer was not recorded"
    )]
    Decided {
        /// The approval request.
        approval: String,
        /// How it was decided (`granted (event …)`, `denied (event …): <reason>`, `closed, …`).
        answer: String,
        /// Who decided it first (`operator:<id>`, `runtime`).
        by: String,
    },
    /// Bad input to an operator command.
    #[error("{0}")]
    Invalid(String),
    /// A file-system or effects problem the run cannot continue past.
    #[error("{0}")]
    Io(String),
    /// The commit was refused before its commit point: the workspace is unchanged (someone
    /// else changed a path the run changes, or a path cannot be written).
    #[error("the commit was refused before it changed anything: {0}")]
    CommitRefused(String),
}

/// Where the runtime keeps per-run files inside an installation.
#[derive(Clone, Debug)]
pub struct Installation {
    /// `<home>/runs`: one directory per run (lock, staged content, commit journal).
    pub runs_dir: PathBuf,
    /// The installation's policy directory (used when a run spec names none).
    pub policy_dir: PathBuf,
}

/// The runtime of one installation.
pub struct Runtime {
    pub(crate) ledger: Arc<Ledger>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) registry: Arc<Registry>,
    /// Resources' Cedar entities, built once and shared by every run's requests.
    pub(crate) entities: Arc<ice_authority::EntityCache>,
    pub(crate) schema: Arc<Schema>,
    pub(crate) install: Installation,
    /// This process's name as a run writer on a shared log (host, process, random).
    pub(crate) node: String,
    /// The memory book, kept up to date from the log as it is used.
    pub(crate) memory: Arc<tokio::sync::Mutex<memory::MemoryCache>>,
    /// The runs that have not ended, kept up to date from the log as it is used.
    pub(crate) unfinished: Arc<tokio::sync::Mutex<operator::Unfinished>>,
    /// Whether this process has stopped waiting for approvals, and which runs that interrupted
    /// ([`Runtime::interrupt_approval_waits`]).
    pub(crate) interrupts: Arc<executor::Interrupts>,
}

impl Runtime {
    /// A runtime writing through `ledger`, with the standard capability registry.
    pub fn new(
        ledger: Arc<Ledger>,
        clock: Arc<dyn Clock>,
        install: Installation,
    ) -> Result<Runtime, RuntimeError> {
        let schema = Schema::ice().map_err(|e| RuntimeError::Policy(e.to_string()))?;
        Ok(Runtime {
            ledger,
            clock,
            registry: Arc::new(Registry::standard()),
            entities: Arc::default(),
            schema: Arc::new(schema),
            install,
            node: node_id(),
            memory: Arc::default(),
            unfinished: Arc::default(),
            interrupts: Arc::default(),
        })
    }

    /// The registered capability types with their resource kinds, as agents are shown them.
    pub(crate) fn capability_list(&self) -> Vec<(String, String)> {
        self.registry
            .iter()
            .map(|c| (c.name().to_string(), c.resource().to_string()))
            .collect()
    }

    /// This process's name as the writer of the runs it drives (`host-pid-random`).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Take a run's lock: the file lock, and on a shared log the run's claim for this node.
    pub(crate) async fn lock_run(&self, run: &RunId) -> Result<lock::RunLock, RuntimeError> {
        let dir = self.run_dir(run);
        lock::RunLock::take(
            &dir,
            self.ledger.log().clone(),
            self.clock.clone(),
            run,
            &self.node,
        )
        .await
        .map_err(|e| match e {
            lock::LockError::Busy => RuntimeError::Busy(run.to_string()),
            lock::LockError::Claimed(e) => RuntimeError::Claimed(e.to_string()),
            lock::LockError::Io(m) => RuntimeError::Io(m),
        })
    }

    /// The ledger.
    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    /// A run's directory.
    pub(crate) fn run_dir(&self, run: &RunId) -> PathBuf {
        self.install.runs_dir.join(run.as_str())
    }

    /// Fold a run's events from the log.
    pub async fn books(&self, run: &RunId) -> Result<Books, RuntimeError> {
        let events = read_run(self.ledger.log().as_ref(), run).await?;
        if events.is_empty() {
            return Err(RuntimeError::NoRun(run.to_string()));
        }
        Ok(Books::fold(run.clone(), events.iter())?)
    }
}

fn node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    let mut b = [0u8; 3];
    let _ = getrandom::fill(&mut b);
    format!("{host}-{}-{}", std::process::id(), hex::encode(b))
}

/// Every event of a run, in order. The run's spec (in `RunProvisioned`), which the books fold
/// reads field by field, is read back whole if the kernel moved it to a blob (a spec over the
/// blob threshold); other large fields (tool outputs, file contents) stay references.
pub async fn read_run(
    log: &dyn ice_log::EventLog,
    run: &RunId,
) -> Result<Vec<Event>, ice_log::LogError> {
    let mut out = Vec::new();
    loop {
        let page = log.read_run(run, out.len() as u64, 4096).await?;
        if page.is_empty() {
            return Ok(out);
        }
        ice_log::after_page(run.as_str(), out.len() as u64, &page)?;
        for s in &page {
            let mut e = s.event()?;
            if e.event_type == "RunProvisioned" {
                e.payload = inline_blobs(log, &e).await?;
            }
            out.push(e);
        }
    }
}

/// `e`'s payload with every blobbed field read back from the log (as replay reads them); a
/// blob that is missing or does not match its reference is an error naming it.
async fn inline_blobs(
    log: &dyn ice_log::EventLog,
    e: &Event,
) -> Result<ice_kernel::Payload, ice_log::LogError> {
    let resolved = replay::resolve(log, &e.payload).await?;
    if !resolved.problems.is_empty() {
        return Err(ice_log::LogError::Corrupt {
            what: format!(
                "event {}: {}; run `ice verify`",
                e.id(),
                resolved.problems.join("; ")
            ),
        });
    }
    Ok(resolved.payload.unwrap_or_else(|| e.payload.clone()))
}

/// Hand every event stored from `*next` on to `each`, in log order, a page at a time, moving
/// `*next` past each page handed over whole: how the views the runtime keeps (the memory book,
/// the unfinished runs) catch up with the log's tail. Rows are read into one reused page, not
/// an allocation per event.
pub(crate) async fn follow<E: From<ice_log::LogError>>(
    log: &dyn ice_log::EventLog,
    next: &mut u64,
    mut each: impl FnMut(ice_log::StoredRef<'_>) -> Result<(), E>,
) -> Result<(), E> {
    const PAGE: usize = 4096;
    let mut page = ice_log::EventPage::default();
    loop {
        page = log.scan_page(*next, PAGE, false, page).await?;
        if page.is_empty() {
            return Ok(());
        }
        let mut want = *next;
        for row in page.iter() {
            // Positions are dense: a row elsewhere (a gap, or one stored far past the log's
            // end) is damage, said as such, never a page read again and again.
            if row.log_seq != want {
                return Err(ice_log::misplaced(row.log_seq, want).into());
            }
            each(row)?;
            want += 1;
        }
        *next = want;
    }
}
