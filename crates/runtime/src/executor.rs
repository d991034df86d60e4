//! The run executor: every phase of the lifecycle, the governed call, validation, commit,
//! abort, suspension and teardown.
//!
//! # The policy decides every call
//!
//! A grant never authorises what the policy would not. Every call, the first under a grant or
//! the tenth, is decided by the policy on its own request (agent, capability, target,
//! arguments, intent, budget left; Cedar decides in microseconds):
//!
//! - **deny**: the call is refused as `policy_denied`, whatever grant covers its target;
//! - **permit with approval**: an approval is asked for this exact request (its digest binds
//!   the arguments), even if a live grant covers the target: a grant never stands in for an
//!   approval. The grant the approval gives allows ONE use (`max_uses = 1`, whatever
//!   `[grants] uses` says) and is never reused, so an approval authorises exactly one call;
//! - **permit**: a live grant may serve the call instead of a new one
//!   (`GrantBook::find_reusable`: same agent, same capability, its scope covering the target,
//!   carrying exactly the constraints this permit gives, not issued on an approval), its
//!   revocation, expiry and uses checked at the moment of use as for any grant; else a new
//!   grant is issued with the spec's `[grants] uses`.
//!
//! A grant's scope is wider than the target the policy decided on (a directory's subtree,
//! every port of a host), so the scope bounds what a grant can serve; the policy's permit for
//! the call at hand is what lets it serve it. A reuse records no decision event (the request,
//! then its reservation and the use of the live grant); `ice replay` re-decides it under the
//! policy in force and expects the reuse exactly when the policy permits outright and the same
//! grant is reusable.
//!
//! # Recording a governed call
//!
//! Every call is decided the same way (the target checked, the policy's decision, an approval
//! if the policy asks for one, a live grant reused or a new one issued on a permit, the budget
//! reservation checked before the effect, the grant checked at the moment of use, every
//! refusal recorded), and leaves the same events in the same order: the request, the approval
//! request and the operator's answer if the policy asks for one, the grant if a new one is
//! issued, `BudgetReserved`, `CapabilityUsed`, the effect event, `BudgetSettled` (or, when the
//! adapter fails, `BudgetSettled` at the call's fixed cost and `CapabilityDenied`). A denial
//! by the policy records the request and its `CapabilityDenied`, nothing else. How those
//! events are batched depends on what the effect touches:
//!
//! - **Written ahead**: everything that acts outside the run (`http.request`, `mcp.call`,
//!   `process.exec`) and staged writes (`fs.write`, `fs.delete`). The request, grant,
//!   reservation and use are durable before the effect happens; the effect and settlement are
//!   recorded after it. A crash in between leaves a recorded use without its effect record,
//!   never an effect without its authority on record.
//! - **Recorded whole, after the read**: in-process reads of the run's staged view
//!   (`fs.read`, `fs.list`), performed under the run's lock. The grant is checked at the
//!   moment of use (a new grant as it will be once recorded: `GrantBook::check_new_use`) and
//!   the reservation before the read; then the read happens, and the whole call is ONE
//!   append. This is sound because a read changes nothing, inside ICE or outside it: if the
//!   process dies before the append, nothing happened in the world and the agent saw
//!   nothing; if the append fails, the agent gets the error, never the output (it is handed
//!   over only after the batch is durable). Reading again is sound too, so a conflict (an
//!   operator wrote to the run) or an effect record the law cannot carry makes the call check
//!   and read again before recording.
//!
//! Staged writes stay written ahead although a stage is rebuilt from the log after a restart
//! (`Stage::from_ops` over the recorded `EffectStaged` ops, in `operator.rs`): in process the
//! stage is changed by the write itself, and commit applies the live stage: an append that
//! fails after it makes the stage forget the write again (`Stage::truncate`, under the lock
//! held from the write to its record), so the live stage never holds a write the log does not;
//! and since a failed append may still have stored the batch (a lost answer), `finish`
//! rebuilds the stage from the log's staged ops when the two differ, before validating.
//!
//! A request the law will not record (a number JSON cannot carry exactly, a reserved key, an
//! oversized intent) is found by the validator on the first batch that would record it, and
//! its refusal is recorded instead (`Ctx::unrecordable_request`); an effect record the law
//! cannot carry is found the same way and recorded with the result withheld (`withhold`). In
//! both cases nothing of the refused batch was recorded, and no probe is sealed beforehand.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ice_authority::payload::{
    ApprovalClosed, ApprovalRequestedPayload, BudgetReservedPayload, BudgetSettledPayload,
    CapabilityDeniedPayload, CapabilityExpiredPayload, CapabilityGrantedPayload,
    CapabilityRevokedPayload, CapabilityUsedPayload, DenialCode,
};
use ice_authority::{
    ApprovalStatus, BudgetLimits, Constraints, DecisionKind, PolicySet, PolicyVersion, Request,
    Resource, approval::request_digest,
};
use ice_kernel::{
    Agent, AgentView, CapabilityProposal, Cost, Draft, EventId, EventType, Origin, Outcome,
    Proposal, RunId, RunState, Timestamp, ToolOffer,
};
use ice_log::LogError;
use ice_log::ledger::AppendError;
use serde_json::{Map, Value, json};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::act;
use crate::books::{Books, read_seen};
use crate::lock::RunLock;
use crate::spec::{Assumption, OnExhaustion, RunSpec};
use crate::{Observer, Runtime, RuntimeError};

/// How a run ended (or stopped) in this process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// Validation passed and the staged writes were applied.
    Committed,
    /// The run was aborted; nothing staged reached the workspace.
    Aborted {
        /// Why.
        reason: String,
    },
    /// The run is suspended, waiting for an operator's reconfiguration.
    Suspended {
        /// Why.
        reason: String,
    },
}

/// What a run did, for the final summary.
#[derive(Clone, Debug)]
pub struct RunReport {
    /// The run.
    pub run: RunId,
    /// How it ended.
    pub outcome: RunOutcome,
    /// Its state now.
    pub state: RunState,
    /// Events recorded in all.
    pub events: u64,
    /// Effects applied to the workspace at commit.
    pub applied: u64,
    /// Writes staged (each path's last op).
    pub staged: usize,
    /// Denials: (the `CapabilityDenied` event, reason code, detail).
    pub denials: Vec<(EventId, String, String)>,
    /// Spent against the budget.
    pub spent: Cost,
    /// The budget's limits.
    pub limits: BudgetLimits,
    /// The books as this process kept them live (a replay from the log must equal them).
    pub books: Books,
}

/// Stamp of a policy directory's files, to notice edits cheaply: for each `*.cedar` entry, the
/// file it names as the loader reads it (a symbolic link followed: its target's size, times
/// and inode; a link to nothing stamped as such), and the entry itself (a link pointed
/// elsewhere). The times include the inode's change time, which every write moves and no
/// tool can set back: a file rewritten in place at the same size with its modification time
/// restored (`cp -p`, `rsync -t --inplace`, `touch -r`) is still noticed.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub(crate) struct PolicyStamp(Vec<(String, [i128; 6])>);

impl PolicyStamp {
    pub(crate) fn of(dir: &std::path::Path) -> PolicyStamp {
        use std::os::unix::fs::MetadataExt;
        let time = |m: &std::fs::Metadata| {
            m.modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos() as i128)
        };
        let mut v = Vec::new();
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                // The entries the loader looks at (a `*.CEDAR` it refuses: adding one is an edit).
                if !ice_authority::is_policy_file_name(&e.file_name()) {
                    continue;
                }
                let name = e.file_name().to_string_lossy().into_owned();
                let changed = |m: &std::fs::Metadata| {
                    i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec())
                };
                let (own, own_changed) = e.metadata().map_or((-1, -1), |m| (time(&m), changed(&m)));
                let stamp = match std::fs::metadata(e.path()) {
                    Ok(m) => [
                        m.len() as i128,
                        time(&m),
                        m.ino() as i128,
                        changed(&m),
                        own,
                        own_changed,
                    ],
                    Err(_) => [-1, -1, -1, -1, own, own_changed],
                };
                v.push((name, stamp));
            }
        }
        v.sort();
        PolicyStamp(v)
    }
}

/// How long a policy edit that does not load is given to settle before it is refused (a file
/// saved in place is read half written in between).
const POLICY_SETTLE: Duration = Duration::from_millis(250);

/// What [`Ctx::reload_policy`] found.
enum Reload {
    /// The files did not change, or still make the policy in force.
    Unchanged,
    /// A new policy was taken on.
    TakenOn,
    /// The new files cannot be taken on: the run is to be suspended with `code`, for `why`.
    Refused { code: &'static str, why: String },
}

/// A run being driven by this process.
pub(crate) struct Live {
    pub(crate) books: Books,
    pub(crate) spec: RunSpec,
    pub(crate) policy: Arc<PolicySet>,
    pub(crate) policy_dir: PathBuf,
    pub(crate) policy_stamp: PolicyStamp,
    pub(crate) stage: act::Staging,
    pub(crate) last: Option<Outcome>,
    pub(crate) window_started: Instant,
    /// When the run last looked for others' events and policy edits (see [`POLL_EVERY`]).
    pub(crate) last_poll: Option<Instant>,
    /// Calls that released the run's lock to act (network, process) or to wait for an
    /// operator, and will record their outcome when they take it again. Nothing may stop the
    /// run while any is in flight, or an effect could happen without its record.
    pub(crate) in_flight: usize,
    /// The memories mounted at context time (`MemoryMounted`), shown to the agent.
    pub(crate) memories: Vec<ice_kernel::MountedMemory>,
}

/// How often, at most, a run looks between steps for events others appended (a kill request)
/// and for policy edits. Others' events are also folded whenever an append finds the run
/// moved on, and always before validation.
pub(crate) const POLL_EVERY: Duration = Duration::from_millis(25);

pub(crate) struct Ctx<'a> {
    pub(crate) rt: &'a Runtime,
    pub(crate) run: RunId,
    pub(crate) observer: &'a dyn Observer,
    pub(crate) live: Mutex<Live>,
    pub(crate) _lock: RunLock,
    /// The MCP tool servers this run may call (started from its spec, or shared by the gateway).
    pub(crate) tools: Option<std::sync::Arc<ice_effects::mcp::ToolServers>>,
}

/// A process that stops waiting for approvals (`ice serve` stopping): why, once set, and the
/// runs whose wait it interrupted, each suspended at its next step boundary.
pub(crate) struct Interrupts {
    /// Why approval waits stop (`None` while they may wait). A wait that begins after it is set
    /// stops at once.
    why: tokio::sync::watch::Sender<Option<String>>,
    /// The runs whose approval request was closed by it, and why: each is suspended before its
    /// next step, or instead of validating.
    runs: std::sync::Mutex<std::collections::HashMap<RunId, String>>,
}

impl Default for Interrupts {
    fn default() -> Self {
        Interrupts {
            why: tokio::sync::watch::Sender::new(None),
            runs: std::sync::Mutex::default(),
        }
    }
}

impl Interrupts {
    /// Why approval waits stop, if they do.
    fn why(&self) -> Option<String> {
        self.why.borrow().clone()
    }

    /// `run`'s approval wait was interrupted because `why`.
    fn mark(&self, run: &RunId, why: &str) {
        if let Ok(mut runs) = self.runs.lock() {
            runs.insert(run.clone(), why.to_string());
        }
    }

    /// Whether `run`'s approval wait was interrupted (the mark stays).
    fn marked(&self, run: &RunId) -> bool {
        self.runs.lock().is_ok_and(|runs| runs.contains_key(run))
    }

    /// Whether `run`'s approval wait was interrupted (and why); the mark is taken.
    fn take(&self, run: &RunId) -> Option<String> {
        self.runs.lock().ok().and_then(|mut runs| runs.remove(run))
    }
}

impl Runtime {
    /// Stop every approval wait of the runs this process drives, now and from now on (for a
    /// server that is stopping: `why` says so). Each waiting request is closed as a kill closes
    /// it (`CapabilityDenied` naming the approval, `approval_denied`, with `why`), so no answer
    /// can be recorded for it any more, and its run is suspended before its next step or
    /// instead of validating (`RunSuspended`, reason `interrupted`): the run was stopped from
    /// outside mid-task, as crash recovery suspends a run whose process stopped, and an
    /// operator decides whether to resume it or kill it. Runs not waiting for an approval are
    /// not affected. Idempotent: the first `why` is kept.
    pub fn interrupt_approval_waits(&self, why: &str) {
        self.interrupts.why.send_if_modified(|w| {
            if w.is_some() {
                return false;
            }
            *w = Some(why.to_string());
            true
        });
    }
}

/// What a governed call left behind.
pub(crate) struct CallEnd {
    pub(crate) outcome: Outcome,
    pub(crate) exhausted: Option<String>,
    /// The call was denied because the agent withdrew it while it waited for an approval.
    pub(crate) withdrawn: bool,
}

/// `BudgetSettled` for `reservation` at `actual`, caused by `cause`.
fn settle_draft(reservation: &str, actual: Cost, cause: &EventId) -> Draft {
    rt_draft(
        EventType::BudgetSettled,
        Value::Object(
            BudgetSettledPayload {
                reservation: reservation.to_string(),
                actual,
            }
            .to_payload(),
        ),
    )
    .cause(cause.clone())
}

/// A kill's reason detail: who killed the run, and why when they said.
pub(crate) fn kill_detail(who: &str, why: &str) -> String {
    if why.is_empty() {
        format!("killed by {who}")
    } else {
        format!("killed by {who}: {why}")
    }
}

fn rt_draft(t: EventType, payload: Value) -> Draft {
    Draft::new(t.name(), Origin::Runtime).payload(payload)
}

impl Ctx<'_> {
    fn eid(&self, seq: u64) -> EventId {
        EventId::new(self.run.clone(), seq)
    }

    pub(crate) fn now(&self) -> Timestamp {
        self.rt.clock.now()
    }

    /// Append drafts built for the run's next position; on a conflict (an operator wrote to
    /// the run meanwhile) fold what they wrote and build again. Returns the ids recorded.
    pub(crate) async fn append(
        &self,
        live: &mut Live,
        build: impl Fn(u64) -> Vec<Draft>,
    ) -> Result<Vec<EventId>, RuntimeError> {
        let mut attempts = 0;
        loop {
            match self.try_append(live, build(live.books.next_seq())).await {
                Err(e) if is_conflict(&e) && attempts < 8 => {
                    attempts += 1;
                    self.catch_up(live).await?;
                }
                done => return done,
            }
        }
    }

    /// Seal `drafts` and append them as one batch at the run's end, then fold them into the
    /// books. Returns the ids recorded. A refusal comes back as the ledger gave it
    /// ([`RuntimeError::Append`]: a conflict, or a draft the validator rejects, with its index),
    /// and then nothing was recorded.
    pub(crate) async fn try_append(
        &self,
        live: &mut Live,
        drafts: Vec<Draft>,
    ) -> Result<Vec<EventId>, RuntimeError> {
        if self._lock.lost() {
            return Err(RuntimeError::Claimed(format!(
                "run {} was taken over by another ICE node (this node could not renew its claim in time); nothing more is recorded here",
                self.run
            )));
        }
        // At the position the drafts were built for (their causes name events by position).
        let (_, batch) = self
            .rt
            .ledger
            .append_at(&self.run, live.books.next_seq(), drafts)
            .await?;
        let mut out = Vec::with_capacity(batch.events().len());
        for s in batch.events() {
            let e = s.event();
            // The books read the run's spec field by field: one the kernel moved to a blob
            // (over the threshold) is folded as it was given (the batch carries the bytes).
            if e.event_type == "RunProvisioned" && !batch.blobs().is_empty() {
                let mut whole = e.clone();
                whole.payload = ice_kernel::blob::inline(&e.payload, |d| {
                    batch
                        .blobs()
                        .iter()
                        .find(|b| b.digest == *d)
                        .map(|b| b.bytes.clone())
                });
                live.books.apply(&whole)?;
            } else {
                live.books.apply(e)?;
            }
            self.observer.recorded(e);
            out.push(e.id());
        }
        Ok(out)
    }

    /// Fold events others (operators) appended to the run since we last looked.
    pub(crate) async fn catch_up(&self, live: &mut Live) -> Result<(), RuntimeError> {
        loop {
            let page = self
                .rt
                .ledger
                .log()
                .read_run(&self.run, live.books.next_seq(), 256)
                .await?;
            if page.is_empty() {
                return Ok(());
            }
            ice_log::after_page(self.run.as_str(), live.books.next_seq(), &page)?;
            // Someone else wrote to the run: the ledger's cached head is stale, and the next
            // append (pinned past it) catches it up on these events alone.
            for s in &page {
                let e = s.event()?;
                live.books.apply(&e)?;
                self.observer.recorded(&e);
            }
        }
    }

    /// The request's draft to record first (none if it is `recorded` already) and its id,
    /// for a batch that starts at position `next`.
    fn request_unless(
        &self,
        recorded: &Option<EventId>,
        draft: &Draft,
        next: u64,
    ) -> (Vec<Draft>, EventId) {
        match recorded {
            Some(req) => (Vec::new(), req.clone()),
            None => (vec![draft.clone()], self.eid(next)),
        }
    }

    /// Whether the validator would accept `draft` as the run's next event: an agent's proposal
    /// that breaks the law (a number JSON cannot carry exactly, a reserved key, an oversized
    /// intent) is answered, never allowed to stop the run. This seals a probe; a governed call
    /// needs none (see `unrecordable_request` and `withhold`).
    pub(crate) fn unrecordable(&self, live: &Live, draft: &Draft) -> Option<String> {
        let mut probe = live.books.head.clone();
        let at = probe.last_at.unwrap_or_else(|| self.now());
        probe
            .seal(draft.clone(), at, &ice_kernel::NoOtherRuns)
            .err()
            .map(|e| e.to_string())
    }

    /// Answer `err`, the failure of an append whose first draft was the agent's request, when
    /// it is the validator's refusal of that request: a request the law will not record (a
    /// number JSON cannot carry exactly, a reserved key, an oversized intent) is refused and
    /// the refusal recorded in its place (no request event: the outcome names the denial),
    /// never allowed to stop the run. Nothing of the refused batch was recorded. Any other error
    /// is returned as it is.
    ///
    /// This is the exact check: the validator itself, on the batch that would record the
    /// request, so no probe is sealed beforehand. Whatever the runtime decided or read before
    /// (a policy decision, a grant it meant to issue, a read whose output nobody saw) leaves no
    /// trace.
    /// `request_first` says whether the refused batch began with the request (when the request
    /// was recorded earlier, a refusal of the batch's first event is not about it).
    async fn unrecordable_request(
        &self,
        live: &mut Live,
        r: &CapabilityProposal,
        request_first: bool,
        err: RuntimeError,
    ) -> Result<CallEnd, RuntimeError> {
        let RuntimeError::Append(AppendError::Rejected { index: 0, error }) = err else {
            return Err(err);
        };
        if !request_first {
            return Err(RuntimeError::Append(AppendError::Rejected {
                index: 0,
                error,
            }));
        }
        let d = Self::denial(
            r,
            None,
            DenialCode::InvalidTarget,
            format!("the request cannot be recorded: {error}"),
        );
        let p = Value::Object(d.to_payload());
        let rec = self
            .append(live, |_| {
                vec![rt_draft(EventType::CapabilityDenied, p.clone())]
            })
            .await?;
        Ok(CallEnd {
            outcome: Outcome::Denied {
                request: rec[0].clone(),
                reason: d.reason.as_str().to_string(),
                detail: d.detail,
            },
            exhausted: None,
            withdrawn: false,
        })
    }

    /// Record a denial of the request `request` (already recorded).
    async fn deny(
        &self,
        live: &mut Live,
        denial: CapabilityDeniedPayload,
        request: &EventId,
    ) -> Result<Outcome, RuntimeError> {
        self.deny_after(live, Vec::new(), denial, request).await
    }

    /// [`Ctx::deny`], recording `before` (a settlement) in the same batch as the denial: a
    /// crash between them would leave a request settled and unanswered, which recovery could
    /// only call an unknown outcome.
    async fn deny_after(
        &self,
        live: &mut Live,
        before: Vec<Draft>,
        mut denial: CapabilityDeniedPayload,
        request: &EventId,
    ) -> Result<Outcome, RuntimeError> {
        denial.request = Some(request.clone());
        let payload = Value::Object(denial.to_payload());
        let req = request.clone();
        self.append(live, |_| {
            let mut drafts = before.clone();
            drafts.push(rt_draft(EventType::CapabilityDenied, payload.clone()).cause(req.clone()));
            drafts
        })
        .await?;
        Ok(Outcome::Denied {
            request: request.clone(),
            reason: denial.reason.as_str().to_string(),
            detail: denial.detail,
        })
    }

    fn denial(
        r: &CapabilityProposal,
        resource: Option<&Resource>,
        reason: DenialCode,
        detail: String,
    ) -> CapabilityDeniedPayload {
        CapabilityDeniedPayload {
            capability: r.capability.clone(),
            resource: resource.cloned(),
            target: cut(&r.target, 512),
            reason,
            detail,
            policies: Vec::new(),
            address: None,
            addresses: Vec::new(),
            grant: None,
            approval: None,
            request: None,
            seen: None,
            closed: None,
        }
    }

    /// The governed call: record the request, decide, reserve, use the grant, act, settle.
    /// A refusal that brings the run's refusals to its `denials` budget ends the call
    /// exhausted: the caller stops the run as the spec says. Not when the call was closed by
    /// a kill or an interruption (those stop the run their own way), nor by the agent's
    /// withdrawal: it counts, and the run stops at the agent's next request
    /// ([`withdrawals_over_budget`]).
    pub(crate) async fn governed_call(
        &self,
        agent: &str,
        r: &CapabilityProposal,
        withdrawn: Option<&CancellationToken>,
    ) -> Result<CallEnd, RuntimeError> {
        // A denial that is no refusal of the agent's (an effect that failed, a call the operator
        // granted and the policy then refused) does not stop the run, even with the refusals
        // already at the budget (a run resumed without raising it): only one that counts does.
        let refusals_before = self.live.lock().await.books.refusals;
        let mut end = self.decide_and_act(agent, r, withdrawn).await?;
        if end.exhausted.is_none() && matches!(end.outcome, Outcome::Denied { .. }) {
            let live = self.live.lock().await;
            if let Some(max) = live.spec.budget.denials
                && live.books.refusals > refusals_before
                && live.books.refusals >= max
                // A withdrawal stops the run at the agent's next request (`Books`).
                && !end.withdrawn
                && live.books.kill.is_none()
                && !self.rt.interrupts.marked(&self.run)
            {
                end.exhausted = Some(format!(
                    "{} of the agent's requests were refused, and the budget allows {max} (denials)",
                    live.books.refusals
                ));
            }
        }
        Ok(end)
    }

    async fn decide_and_act(
        &self,
        agent: &str,
        r: &CapabilityProposal,
        withdrawn: Option<&CancellationToken>,
    ) -> Result<CallEnd, RuntimeError> {
        let mut guard = self.live.lock().await;
        let live = &mut *guard;
        if live.books.state() != RunState::Executing {
            return Err(RuntimeError::State {
                run: self.run.to_string(),
                state: live.books.state(),
                what: "requests are taken only while the run is executing".into(),
            });
        }
        let capability = r.capability.clone();
        // A request the law will not record is refused where it would be recorded (see
        // `unrecordable_request`): the validator's check, not a probe sealed here.
        // 1. The target, checked and in canonical form.
        let (resource, effect, target) = match act::resolve_target(
            &self.rt.registry,
            r,
            &live.spec.servers,
            &self.tools.as_deref(),
        ) {
            Ok(t) => t,
            Err((code, detail)) => {
                let d = Self::denial(r, None, code, detail);
                return self.refuse(live, agent, r, None, d, None).await;
            }
        };
        let now = self.now();
        // 2. The policy decides, every call (a grant never stands in for a decision; see the
        //    module documentation, "The policy decides every call").
        let policy_args = act::policy_arguments(&capability, &r.arguments, &target);
        let builder = Request::builder(&self.run, agent, &capability, resource.clone())
            .intent(&r.intent)
            .arguments(&policy_args)
            .budget_left(live.books.budget.left())
            .entity_cache(&self.rt.entities);
        let built = act::classed(builder, &target).build(&self.rt.registry);
        let request = match built {
            Ok(q) => q,
            Err(e) => {
                let d = Self::denial(r, Some(&resource), DenialCode::InvalidTarget, e.to_string());
                return self.refuse(live, agent, r, None, d, None).await;
            }
        };
        let decision = live.policy.decide(&request);
        let mut policies = decision.determining_policies().to_vec();
        let mut version = decision.policy_version;
        let constraints = decision.constraints;
        match decision.kind() {
            DecisionKind::Deny => {
                let mut d = Self::denial(
                    r,
                    Some(&resource),
                    DenialCode::PolicyDenied,
                    decision.to_string(),
                );
                d.policies = policies;
                self.refuse(live, agent, r, None, d, None).await
            }
            DecisionKind::Permit => {
                // A live grant this permit may use (for this agent, with this decision's
                // constraints, not issued on an approval), else a new one.
                if let Some(g) = live
                    .books
                    .grants
                    .find_reusable(agent, &capability, &resource, &constraints, now)
                    .map(|g| g.id.clone())
                {
                    return self
                        .proceed(
                            guard,
                            agent,
                            r,
                            &resource,
                            &target,
                            Grant::Existing(g),
                            None,
                        )
                        .await;
                }
                let g = self.grant_payload(
                    live,
                    agent,
                    r,
                    &resource,
                    effect,
                    (&version, policies, constraints),
                    None,
                    now,
                );
                self.proceed(
                    guard,
                    agent,
                    r,
                    &resource,
                    &target,
                    Grant::New(Box::new(g), None),
                    None,
                )
                .await
            }
            DecisionKind::PermitWithApproval => {
                // Record the request and the approval request; wait for an operator. A live
                // grant that covers the target changes nothing: an approval is asked for this
                // exact request, and the grant it gives serves this call alone.
                // What the operator is shown and the approval binds: the arguments, and for an
                // HTTP call the URL as decided and sent (the resource is only its host).
                let mut shown = act::obj(r.arguments.clone());
                if let act::Target::Http(t) = &target {
                    shown.insert("url".into(), Value::String(t.as_str().to_string()));
                }
                let digest = request_digest(
                    &self.run,
                    &capability,
                    &resource,
                    &Value::Object(shown.clone()),
                    &version,
                );
                // The wait ends at the approval timeout, or earlier where the run's wall-time
                // budget ends: an approval nobody answers does not hold the run past its
                // budget. The request records when it really expires.
                let configured = Duration::from_millis(live.spec.approval_timeout_ms);
                let (timeout, budget_cut) = act::bounded(configured, wall_time_left(live));
                let expires_at = add_ms(now, timeout.as_millis() as u64);
                let draft = request_draft(agent, r);
                let rec = self
                    .append(live, |next| {
                        let req = self.eid(next);
                        let p = ApprovalRequestedPayload {
                            digest,
                            capability: capability.clone(),
                            resource: resource.clone(),
                            arguments: shown.clone(),
                            agent: agent.to_string(),
                            policy_version: version,
                            policies: policies.clone(),
                            expires_at,
                            request: req.clone(),
                        };
                        vec![
                            draft.clone(),
                            rt_draft(EventType::ApprovalRequested, Value::Object(p.to_payload()))
                                .cause(req),
                        ]
                    })
                    .await;
                let rec = match rec {
                    Ok(rec) => rec,
                    Err(e) => return self.unrecordable_request(live, r, true, e).await,
                };
                let req = rec[0].clone();
                let approval = rec[1].clone();
                guard.in_flight += 1;
                drop(guard);
                self.observer.waiting(&format!(
                    "approval {approval} for {capability} {}: answer with `ice approve {approval}` or `ice deny {approval}` (times out in {}s)",
                    cut(&r.target, 120),
                    timeout.as_secs_f64()
                ));
                let answered = self.wait_for_approval(&approval, timeout, withdrawn).await;
                let mut guard = self.live.lock().await;
                guard.in_flight -= 1;
                let answered = answered?;
                let live = &mut *guard;
                let now = self.now();
                // Why the runtime, not an operator, closed the approval, if it did.
                let closed = match &answered {
                    ApprovalWait::Killed => Some(ApprovalClosed::Killed),
                    ApprovalWait::Withdrawn => Some(ApprovalClosed::Withdrawn),
                    ApprovalWait::Interrupted(_) => Some(ApprovalClosed::Interrupted),
                    _ => None,
                };
                let refusal = match answered {
                    ApprovalWait::Granted => {
                        match live.books.approvals.authorize(&approval, &digest, now) {
                            // The policy may have changed while the operator was asked.
                            Ok(()) => {
                                let decided = (&mut version, &mut policies, &constraints);
                                self.policy_after_wait(live, &request, &approval, decided)
                                    .await?
                            }
                            Err(e) => Some((e.code(), e.to_string())),
                        }
                    }
                    ApprovalWait::Denied(reason) => Some((
                        DenialCode::ApprovalDenied,
                        format!("operator denied approval {approval}: {reason}"),
                    )),
                    ApprovalWait::TimedOut if budget_cut.is_some() => Some((
                        DenialCode::BudgetExhausted,
                        format!(
                            "nobody answered approval {approval} before the run's wall_time budget ran out ({} ms were left when it was asked; the approval timeout is {}s)",
                            timeout.as_millis(),
                            configured.as_secs_f64()
                        ),
                    )),
                    ApprovalWait::TimedOut => Some((
                        DenialCode::ApprovalTimeout,
                        format!(
                            "nobody answered approval {approval} within {}s",
                            timeout.as_secs_f64()
                        ),
                    )),
                    ApprovalWait::Killed => Some((
                        DenialCode::ApprovalDenied,
                        "the run was killed while waiting for approval".to_string(),
                    )),
                    ApprovalWait::Withdrawn => Some((
                        DenialCode::ApprovalDenied,
                        format!(
                            "approval {approval} was closed unanswered: the agent withdrew the request (its client cancelled the call or ended the session)"
                        ),
                    )),
                    ApprovalWait::Interrupted(why) => {
                        // Closed here; the run is suspended before its next step.
                        self.rt.interrupts.mark(&self.run, &why);
                        Some((
                            DenialCode::ApprovalDenied,
                            format!("approval {approval} was closed unanswered: {why}"),
                        ))
                    }
                };
                if let Some((code, detail)) = refusal {
                    let mut d = Self::denial(r, Some(&resource), code, detail);
                    d.approval = Some(approval.clone());
                    d.closed = closed;
                    d.policies = policies;
                    return self.refuse(live, agent, r, Some(req), d, None).await;
                }
                let answer = live.books.answers.get(&approval).cloned();
                let g = self.grant_payload(
                    live,
                    agent,
                    r,
                    &resource,
                    effect,
                    (&version, policies, constraints),
                    Some((approval, req.clone())),
                    now,
                );
                self.proceed(
                    guard,
                    agent,
                    r,
                    &resource,
                    &target,
                    Grant::New(Box::new(g), answer),
                    Some(req),
                )
                .await
            }
        }
    }

    /// Record the request (unless already recorded) and its denial.
    async fn refuse(
        &self,
        live: &mut Live,
        agent: &str,
        r: &CapabilityProposal,
        recorded: Option<EventId>,
        denial: CapabilityDeniedPayload,
        exhausted: Option<String>,
    ) -> Result<CallEnd, RuntimeError> {
        let req = match recorded {
            Some(req) => req,
            None => {
                let draft = request_draft(agent, r);
                match self.append(live, |_| vec![draft.clone()]).await {
                    Ok(rec) => rec[0].clone(),
                    Err(e) => return self.unrecordable_request(live, r, true, e).await,
                }
            }
        };
        let withdrawn = denial.closed == Some(ApprovalClosed::Withdrawn);
        let outcome = self.deny(live, denial, &req).await?;
        Ok(CallEnd {
            outcome,
            exhausted,
            withdrawn,
        })
    }

    /// The grant a permit gives: `decided` is the policy version, the determining policies and
    /// the constraints of the decision. A grant given on an operator's approval allows one use
    /// whatever the spec's `[grants] uses` says (an approval authorises exactly one call);
    /// otherwise it allows the spec's number of uses, each for a call the policy permits.
    #[allow(clippy::too_many_arguments)]
    fn grant_payload(
        &self,
        live: &Live,
        agent: &str,
        r: &CapabilityProposal,
        resource: &Resource,
        effect: ice_authority::EffectClass,
        decided: (
            &ice_authority::PolicyVersion,
            Vec<String>,
            ice_authority::Constraints,
        ),
        approval: Option<(EventId, EventId)>,
        now: Timestamp,
    ) -> CapabilityGrantedPayload {
        let (version, policies, constraints) = decided;
        let scope = ice_authority::Scope::for_target(&r.capability, resource)
            .expect("a checked resource has a scope");
        let (approval, request, max_uses) = match approval {
            Some((a, req)) => (Some(a), req, 1),
            // The request's id is filled in when its batch is built.
            None => (
                None,
                EventId::new(self.run.clone(), 0),
                u64::from(live.spec.grant_uses),
            ),
        };
        CapabilityGrantedPayload {
            capability: r.capability.clone(),
            resource: resource.clone(),
            scope,
            agent: agent.to_string(),
            effect,
            expires_at: add_ms(now, live.spec.grant_ttl_ms),
            max_uses,
            constraints,
            policy_version: *version,
            policies,
            approval,
            request,
        }
    }

    /// Reserve the budget, check the grant at the moment of use, act, settle, recording every
    /// step. How the call is recorded depends on what the effect touches (see the module
    /// documentation, "Recording a governed call"):
    /// an in-process read is recorded whole in one batch after it ([`Self::read_call`]);
    /// anything else is written ahead ([`Self::written_ahead_call`]).
    #[allow(clippy::too_many_arguments)]
    async fn proceed(
        &self,
        mut guard: tokio::sync::MutexGuard<'_, Live>,
        agent: &str,
        r: &CapabilityProposal,
        resource: &Resource,
        target: &act::Target,
        grant: Grant,
        recorded: Option<EventId>,
    ) -> Result<CallEnd, RuntimeError> {
        if act::reads_only(&r.capability, target) {
            return self
                .read_call(&mut guard, agent, r, resource, target, &grant, recorded)
                .await;
        }
        self.written_ahead_call(guard, agent, r, resource, target, grant, recorded)
            .await
    }

    /// The budget check of a call: the amount to reserve and the reservation's id, or why it
    /// is refused (a reservation that does not fit is refused before any grant is issued or
    /// used).
    fn reserve_check(
        &self,
        live: &Live,
        r: &CapabilityProposal,
        target: &act::Target,
    ) -> Result<(Cost, String), String> {
        // A tool call reserves what its server may answer with (its `max_result_bytes`).
        let tool_result_max = match (target, &self.tools) {
            (act::Target::Tool { server, .. }, Some(tools)) => tools.max_result_bytes(server),
            _ => None,
        };
        let amount = act::estimate(
            &r.capability,
            &r.arguments,
            &live.books.budget.left(),
            tool_result_max,
        );
        let reservation = format!("r{}", live.books.reservations + 1);
        match live.books.budget.check_reserve(&reservation, amount) {
            Ok(_) => Ok((amount, reservation)),
            Err(refusal) => Err(refusal.to_string()),
        }
    }

    /// Check one use of `grant` for `r` on `resource`, now.
    fn check_grant(
        &self,
        live: &Live,
        r: &CapabilityProposal,
        resource: &Resource,
        grant: &EventId,
    ) -> Result<ice_authority::Authorization, Box<ice_authority::GrantRefusal>> {
        live.books
            .grants
            .check_use(
                grant,
                &self.run,
                &r.capability,
                resource,
                self.now(),
                live.books.state(),
            )
            .map_err(Box::new)
    }

    /// `BudgetReserved` of `amount` as `reservation`, caused by the request `req`.
    fn reserve_draft(reservation: &str, amount: Cost, req: &EventId) -> Draft {
        rt_draft(
            EventType::BudgetReserved,
            Value::Object(
                BudgetReservedPayload {
                    reservation: reservation.to_string(),
                    amount,
                }
                .to_payload(),
            ),
        )
        .cause(req.clone())
    }

    /// `CapabilityUsed` of `grant` for `r` on `resource`, caused by the request and the grant.
    fn use_draft(
        r: &CapabilityProposal,
        resource: &Resource,
        req: &EventId,
        grant: &EventId,
    ) -> Draft {
        Draft::new(EventType::CapabilityUsed.name(), Origin::Runtime)
            .intent(r.intent.clone())
            .authority(grant.to_string())
            .payload(Value::Object(
                CapabilityUsedPayload {
                    grant: grant.clone(),
                    capability: r.capability.clone(),
                    resource: resource.clone(),
                }
                .to_payload(),
            ))
            .cause(req.clone())
            .cause(grant.clone())
    }

    /// `CapabilityGranted` for the grant `p`, caused by the request and the operator's answer
    /// to its approval, if any. A grant without approval answers the request `req`.
    fn grant_draft(
        p: &CapabilityGrantedPayload,
        answer: &Option<EventId>,
        req: &EventId,
    ) -> (Draft, CapabilityGrantedPayload) {
        let mut p = p.clone();
        if p.approval.is_none() {
            p.request = req.clone();
        }
        let mut d = rt_draft(EventType::CapabilityGranted, Value::Object(p.to_payload()))
            .authority(p.authority())
            .cause(req.clone());
        if let Some(a) = answer {
            d = d.cause(a.clone());
        }
        (d, p)
    }

    /// The effect event of a performed call.
    fn effect_draft(
        r: &CapabilityProposal,
        p: &act::Performed,
        payload: Map<String, Value>,
        grant: &EventId,
        cost: Cost,
        req: &EventId,
        used: &EventId,
    ) -> Draft {
        let mut d = Draft::new(p.event_type.name(), Origin::Runtime)
            .intent(r.intent.clone())
            .authority(grant.to_string())
            .cost(cost)
            .cause(req.clone())
            .cause(used.clone());
        d.payload = payload;
        d
    }

    /// An in-process read (`fs.read`, `fs.list` on the run's staged view): checked like any
    /// call, then performed under the run's lock, then recorded whole in ONE batch: the request
    /// (unless recorded), the grant (if new), `BudgetReserved`, `CapabilityUsed`, the effect
    /// (or, if the read failed, `BudgetSettled` at the fixed cost and the `CapabilityDenied`),
    /// `BudgetSettled`. The output reaches the agent only once that batch is durable; if the
    /// append fails, the call fails with nothing shown and nothing recorded. See the module
    /// documentation, "Recording a governed call".
    #[allow(clippy::too_many_arguments)]
    async fn read_call(
        &self,
        live: &mut Live,
        agent: &str,
        r: &CapabilityProposal,
        resource: &Resource,
        target: &act::Target,
        grant: &Grant,
        recorded: Option<EventId>,
    ) -> Result<CallEnd, RuntimeError> {
        // Set when the validator refused the effect record: the read is then recorded with its
        // output withheld (see `withhold`).
        let mut withheld: Option<String> = None;
        let mut conflicts = 0;
        loop {
            // a. The budget, before the read.
            let (amount, reservation) = match self.reserve_check(live, r, target) {
                Ok(x) => x,
                Err(why) => {
                    let d =
                        Self::denial(r, Some(resource), DenialCode::BudgetExhausted, why.clone());
                    return self.refuse(live, agent, r, recorded, d, Some(why)).await;
                }
            };
            // b. The call's events take the run's next positions, in this order.
            let mut pos = live.books.next_seq();
            let mut drafts = Vec::with_capacity(7);
            let req = match &recorded {
                Some(req) => req.clone(),
                None => {
                    drafts.push(request_draft(agent, r));
                    pos += 1;
                    self.eid(pos - 1)
                }
            };
            // c. The grant, checked at the moment of use: a live one, or the new one (checked
            //    as it will be once recorded, in this batch).
            let (grant_id, auth) = match grant {
                Grant::Existing(g) => match self.check_grant(live, r, resource, g) {
                    Ok(a) => (g.clone(), a),
                    Err(refusal) => {
                        let mut d =
                            Self::denial(r, Some(resource), refusal.code(), refusal.to_string());
                        d.grant = Some(g.clone());
                        return self.refuse(live, agent, r, recorded, d, None).await;
                    }
                },
                Grant::New(p, answer) => {
                    let id = self.eid(pos);
                    pos += 1;
                    let (draft, p) = Self::grant_draft(p, answer, &req);
                    let checked = live.books.grants.check_new_use(
                        &id,
                        &p,
                        &self.run,
                        &r.capability,
                        resource,
                        self.now(),
                        live.books.state(),
                    );
                    match checked {
                        Ok(a) => {
                            drafts.push(draft);
                            (id, a)
                        }
                        Err(refusal) => {
                            // As for any new grant whose use is refused: the request and the
                            // grant are recorded, then the denial.
                            let rec = self
                                .append(live, |next| {
                                    let (mut v, req) = self.request_unless(
                                        &recorded,
                                        &request_draft(agent, r),
                                        next,
                                    );
                                    v.push(Self::grant_draft(&p, answer, &req).0);
                                    v
                                })
                                .await;
                            let rec = match rec {
                                Ok(rec) => rec,
                                Err(e) => {
                                    return self
                                        .unrecordable_request(live, r, recorded.is_none(), e)
                                        .await;
                                }
                            };
                            let req = recorded.clone().unwrap_or_else(|| rec[0].clone());
                            let grant = rec.last().expect("grant recorded").clone();
                            let mut d = Self::denial(
                                r,
                                Some(resource),
                                refusal.code(),
                                refusal.to_string(),
                            );
                            d.grant = Some(grant);
                            return self.refuse(live, agent, r, Some(req), d, None).await;
                        }
                    }
                }
            };
            // d. The reservation and the use.
            drafts.push(Self::reserve_draft(&reservation, amount, &req));
            let used = self.eid(pos + 1);
            drafts.push(Self::use_draft(r, resource, &req, &grant_id));
            // e. Read, under the run's lock (the stage is only read).
            let started = Instant::now();
            let performed = act::perform_fs(&mut live.stage, &auth, target, &r.arguments, &amount);
            let wall = started.elapsed().as_micros() as u64;
            let settle = |actual: Cost| settle_draft(&reservation, actual, &req);
            // What the run is shown of the workspace, noted by the stage once it is recorded
            // (the commit checks against it): not before, and not a read whose output is
            // withheld, which the agent did not see. Read from the record it makes, as
            // `Books` reads it, so a stage rebuilt from the log agrees.
            let mut shown: Option<(String, Option<ice_effects::FileState>)> = None;
            // f. The effect and the settlement (or the failure, settled at the call's fixed
            //    cost, and its denial), in the same batch.
            let (effect_index, outcome) = match performed {
                Ok(mut p) => {
                    // What the agent is shown is recorded with the effect (I-002).
                    p.payload.insert("output".into(), p.output.clone());
                    if let Some(why) = &withheld {
                        withhold(&mut p, why);
                    }
                    shown = read_seen(&p.payload).map(|(path, state)| (path, Some(state)));
                    let actual = Cost {
                        tool_calls: amount.tool_calls,
                        ..p.actual
                    };
                    let cost = Cost {
                        wall_time_us: wall,
                        ..actual
                    };
                    let payload = std::mem::take(&mut p.payload);
                    drafts.push(Self::effect_draft(
                        r, &p, payload, &grant_id, cost, &req, &used,
                    ));
                    drafts.push(settle(actual));
                    let outcome = Outcome::Done {
                        request: req.clone(),
                        output: p.output,
                    };
                    (Some(drafts.len() - 2), outcome)
                }
                Err(act::FsFailed {
                    code,
                    detail,
                    found_nothing,
                }) => {
                    drafts.push(settle(Cost {
                        tool_calls: amount.tool_calls,
                        ..Cost::default()
                    }));
                    let mut d = Self::denial(r, Some(resource), code, detail);
                    d.grant = Some(grant_id.clone());
                    d.request = Some(req.clone());
                    // A read that found no file: what the run saw, for the record (a stage
                    // rebuilt after a restart is told it again).
                    if let Resource::Path(p) = resource
                        && found_nothing
                    {
                        d.seen = Some("absent".into());
                        shown = Some((p.clone(), None));
                    }
                    let outcome = Outcome::Denied {
                        request: req.clone(),
                        reason: d.reason.as_str().to_string(),
                        detail: d.detail.clone(),
                    };
                    drafts.push(
                        rt_draft(EventType::CapabilityDenied, Value::Object(d.to_payload()))
                            .cause(req.clone()),
                    );
                    (None, outcome)
                }
            };
            match self.try_append(live, drafts).await {
                Ok(_) => {
                    if let Some((path, state)) = shown
                        && let Some(stage) = live.stage.stage.as_ref()
                    {
                        stage.saw(&path, state);
                    }
                    return Ok(CallEnd {
                        outcome,
                        exhausted: None,
                        withdrawn: false,
                    });
                }
                // The effect record is one the law cannot carry: read again and record it
                // with the output withheld (a read changes nothing, so reading twice is sound;
                // nothing of the refused batch was recorded or shown).
                Err(RuntimeError::Append(AppendError::Rejected { index, error }))
                    if Some(index) == effect_index && withheld.is_none() =>
                {
                    withheld = Some(error.to_string());
                }
                // Someone else wrote to the run: fold it, then check, read and record again at
                // the new positions (the grant's id, which the read's evidence names, may move).
                Err(e) if is_conflict(&e) && conflicts < 8 => {
                    conflicts += 1;
                    self.catch_up(live).await?;
                }
                Err(e) => {
                    return self
                        .unrecordable_request(live, r, recorded.is_none(), e)
                        .await;
                }
            }
        }
    }

    /// A call that acts outside the run (network, tool servers, processes) or changes its stage
    /// (staged writes), written ahead: the request (unless recorded), the grant (if new), the
    /// reservation and the use are durable before the effect; then the effect and the
    /// settlement are recorded. See the module documentation, "Recording a governed call".
    #[allow(clippy::too_many_arguments)]
    async fn written_ahead_call(
        &self,
        mut guard: tokio::sync::MutexGuard<'_, Live>,
        agent: &str,
        r: &CapabilityProposal,
        resource: &Resource,
        target: &act::Target,
        grant: Grant,
        recorded: Option<EventId>,
    ) -> Result<CallEnd, RuntimeError> {
        let live = &mut *guard;
        // a. A reservation that does not fit is refused before any grant is issued or used.
        let (amount, reservation) = match self.reserve_check(live, r, target) {
            Ok(x) => x,
            Err(why) => {
                let d = Self::denial(r, Some(resource), DenialCode::BudgetExhausted, why.clone());
                return self.refuse(live, agent, r, recorded, d, Some(why)).await;
            }
        };
        let draft = request_draft(agent, r);
        let (req, grant, auth, used) = match &grant {
            // b. A live grant: checked at the moment of use, then the request (if not yet
            //    recorded), the reservation and the use are recorded together.
            Grant::Existing(g) => {
                let auth = match self.check_grant(live, r, resource, g) {
                    Ok(a) => a,
                    Err(refusal) => {
                        let mut d =
                            Self::denial(r, Some(resource), refusal.code(), refusal.to_string());
                        d.grant = Some(g.clone());
                        return self.refuse(live, agent, r, recorded, d, None).await;
                    }
                };
                let rec = self
                    .append(live, |next| {
                        let (mut v, req) = self.request_unless(&recorded, &draft, next);
                        v.push(Self::reserve_draft(&reservation, amount, &req));
                        v.push(Self::use_draft(r, resource, &req, g));
                        v
                    })
                    .await;
                let rec = match rec {
                    Ok(rec) => rec,
                    Err(e) => {
                        return self
                            .unrecordable_request(live, r, recorded.is_none(), e)
                            .await;
                    }
                };
                let req = recorded.clone().unwrap_or_else(|| rec[0].clone());
                let used = rec.last().expect("use recorded").clone();
                (req, g.clone(), auth, used)
            }
            // b'. A new grant: the request (if not yet recorded) and the grant are recorded,
            //     the grant is checked as recorded, then the reservation and the use.
            Grant::New(p, answer) => {
                let rec = self
                    .append(live, |next| {
                        let (mut v, req) = self.request_unless(&recorded, &draft, next);
                        v.push(Self::grant_draft(p, answer, &req).0);
                        v
                    })
                    .await;
                let rec = match rec {
                    Ok(rec) => rec,
                    Err(e) => {
                        return self
                            .unrecordable_request(live, r, recorded.is_none(), e)
                            .await;
                    }
                };
                let req = recorded.clone().unwrap_or_else(|| rec[0].clone());
                let grant = rec.last().expect("grant recorded").clone();
                let auth = match self.check_grant(live, r, resource, &grant) {
                    Ok(a) => a,
                    Err(refusal) => {
                        let mut d =
                            Self::denial(r, Some(resource), refusal.code(), refusal.to_string());
                        d.grant = Some(grant);
                        return self.refuse(live, agent, r, Some(req), d, None).await;
                    }
                };
                let rec = self
                    .append(live, |_| {
                        vec![
                            Self::reserve_draft(&reservation, amount, &req),
                            Self::use_draft(r, resource, &req, &grant),
                        ]
                    })
                    .await?;
                let used = rec[1].clone();
                (req, grant, auth, used)
            }
        };
        // e. Act. Filesystem effects touch only the stage (under the lock); network and process
        //    effects run without it.
        let started = Instant::now();
        // A filesystem effect changes the live stage under the lock, which is held until the
        // effect is recorded: if that record fails, the stage forgets it again (commit applies
        // the live stage, which must hold only what the log says was staged).
        let staged_before = matches!(target, act::Target::Path(_) | act::Target::Dir(_))
            .then(|| guard.stage.ops().len());
        // Crash tests only (debug builds): ICE_TEST_PAUSE_BEFORE_EFFECT=1 stops a call here,
        // its use recorded and its effect not, so the test can kill the process there.
        if cfg!(debug_assertions)
            && std::env::var("ICE_TEST_PAUSE_BEFORE_EFFECT").is_ok_and(|v| v == "1")
        {
            eprintln!("ICE_TEST: paused before the effect of {req}");
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
        // What an HTTP call's resolution let through and refused.
        let connections = act::ConnectionRecord::default();
        // An effect may run no longer than the wall-time budget has left (I-005: time is
        // spent while it runs, and only checked between steps).
        let time_left = wall_time_left(&guard);
        let performed = match target {
            act::Target::Http(_) => {
                // Every address the host resolves to is decided before anything is sent
                // (`http.connect`), by the policy that decided the call, with its context.
                let check = act::ConnectionCheck {
                    call: act::ConnectionCall {
                        registry: self.rt.registry.clone(),
                        entities: self.rt.entities.clone(),
                        run: self.run.clone(),
                        agent: agent.to_string(),
                        resource: resource.clone(),
                        intent: r.intent.clone(),
                        arguments: act::policy_arguments(&r.capability, &r.arguments, target),
                        budget_left: guard.books.budget.left(),
                    },
                    policy: guard
                        .policy
                        .checks_connections()
                        .then(|| guard.policy.clone()),
                    record: connections.clone(),
                };
                guard.in_flight += 1;
                drop(guard);
                let p = act::perform_remote(&auth, target, &r.arguments, &amount, check, time_left)
                    .await;
                guard = self.live.lock().await;
                guard.in_flight -= 1;
                p
            }
            act::Target::Tool { .. } => match self.tools.clone() {
                Some(tools) => {
                    guard.in_flight += 1;
                    drop(guard);
                    let p = act::perform_tool(
                        &tools,
                        &self.run,
                        &auth,
                        target,
                        &r.arguments,
                        &amount,
                        time_left,
                    )
                    .await;
                    guard = self.live.lock().await;
                    guard.in_flight -= 1;
                    p
                }
                None => Err((
                    DenialCode::EffectFailed,
                    "no tool server is running for this run".to_string(),
                )),
            },
            act::Target::Command(program) => match act::prepare_exec(&guard.stage) {
                Ok(copy) => {
                    guard.in_flight += 1;
                    drop(guard);
                    // A kill (recorded by anyone) kills the command too: it would otherwise run
                    // on to its timeout.
                    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
                    let exec = act::perform_exec(
                        &auth,
                        program,
                        &r.arguments,
                        copy,
                        time_left,
                        &amount,
                        stop.clone(),
                    );
                    tokio::pin!(exec);
                    let p = loop {
                        tokio::select! {
                            p = &mut exec => break p,
                            () = tokio::time::sleep(Duration::from_millis(100)) => {
                                if self.stop_asked().await {
                                    stop.store(true, std::sync::atomic::Ordering::SeqCst);
                                }
                            }
                        }
                    };
                    guard = self.live.lock().await;
                    guard.in_flight -= 1;
                    p
                }
                Err(e) => Err(e),
            },
            _ => act::perform_fs(&mut guard.stage, &auth, target, &r.arguments, &amount)
                .map_err(|f| (f.code, f.detail)),
        };
        let live = &mut *guard;
        let wall = started.elapsed().as_micros() as u64;
        let settle = |actual: Cost| settle_draft(&reservation, actual, &req);
        // f. Record the effect and settle. A result the log cannot carry (a number JSON cannot
        //    hold exactly, a reserved key, too large) is withheld from the agent, and the record
        //    says why instead: the validator's refusal of the effect record (nothing of that
        //    batch is recorded) is the check, then the record is made again without the result.
        match performed {
            Ok(mut p) => {
                let actual = Cost {
                    tool_calls: amount.tool_calls,
                    ..p.actual
                };
                let cost = Cost {
                    wall_time_us: wall,
                    ..actual
                };
                // What the agent is shown is recorded with the effect (I-002), so a replay
                // gives the driver exactly what it saw without touching the world again.
                p.payload.insert("output".into(), p.output.clone());
                let recorded: Result<(), RuntimeError> = async {
                    let (mut withheld, mut attempts) = (false, 0);
                    loop {
                        // The ledger takes the drafts: a retry needs the payload again.
                        let drafts = vec![
                            Self::effect_draft(r, &p, p.payload.clone(), &grant, cost, &req, &used),
                            settle(actual),
                        ];
                        match self.try_append(live, drafts).await {
                            Ok(_) => return Ok(()),
                            Err(RuntimeError::Append(AppendError::Rejected {
                                index: 0,
                                error,
                            })) if !withheld => {
                                withhold(&mut p, &error.to_string());
                                withheld = true;
                            }
                            Err(e) if is_conflict(&e) && attempts < 8 => {
                                attempts += 1;
                                self.catch_up(live).await?;
                            }
                            Err(e) => return Err(e),
                        }
                    }
                }
                .await;
                if let Err(e) = recorded {
                    if let Some(n) = staged_before {
                        live.stage.truncate(n);
                    }
                    return Err(e);
                }
                Ok(CallEnd {
                    outcome: Outcome::Done {
                        request: req,
                        output: p.output,
                    },
                    exhausted: None,
                    withdrawn: false,
                })
            }
            Err((code, detail)) => {
                // The adapter refused or failed: settle at the call's fixed cost, record why,
                // in one batch.
                let actual = Cost {
                    tool_calls: amount.tool_calls,
                    ..Cost::default()
                };
                // A refused connection is the policy's only when forbids refused it; a check
                // that could not be made failed the effect (closed, all the same).
                // The addresses let through are recorded too: a call that failed after connecting
                // (a timeout after a POST was sent) says where it went.
                let seen = std::mem::take(
                    &mut *connections
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner),
                );
                let code = match (code, &seen.refused) {
                    (DenialCode::PolicyDenied, None) => DenialCode::EffectFailed,
                    (other, _) => other,
                };
                let mut d = Self::denial(r, Some(resource), code, detail);
                d.grant = Some(grant);
                d.addresses = seen.allowed;
                if let Some((address, policies)) = seen.refused {
                    d.address = Some(address);
                    d.policies = policies;
                }
                let outcome = self.deny_after(live, vec![settle(actual)], d, &req).await?;
                Ok(CallEnd {
                    outcome,
                    exhausted: None,
                    withdrawn: false,
                })
            }
        }
    }

    /// At the recovery of a run the stopped process was executing: each request whose grant
    /// was used and whose effect was never recorded is answered now, so the resumed agent is
    /// shown what became of it and the operator sees it among the denials (before, a file
    /// request's write was silently gone and the run could commit without it; an HTTP call,
    /// command or tool call had no outcome in the record at all). Every such request is
    /// answered, not only the last (a session's concurrent calls may have recorded others
    /// after it, while it waited for an approval).
    ///
    /// - A file request did nothing the record does not hold (what it staged is staged only
    ///   once recorded): its reservation is settled at the call's fixed cost and the denial is
    ///   `effect_failed`, saying it was interrupted.
    /// - Any other request left ICE before the process stopped, or may have: whether it acted
    ///   is unknown. Its reservation is settled in full (what may have been spent is counted)
    ///   and the denial is `outcome_unknown`, naming the target to check before repeating it.
    pub(crate) async fn answer_interrupted(&self, live: &mut Live) -> Result<(), RuntimeError> {
        let events = crate::read_run(self.rt.ledger.log().as_ref(), &self.run).await?;
        // What each request's later events say of it: used, its reservations, answered.
        #[derive(Default)]
        struct Seen {
            used: bool,
            grant: Option<EventId>,
            /// The resource the grant was used on (`CapabilityUsed`).
            resource: Option<Resource>,
            reservations: Vec<String>,
            answered: bool,
        }
        let mut requests: Vec<(EventId, CapabilityProposal)> = Vec::new();
        let mut seen: std::collections::HashMap<EventId, Seen> = Default::default();
        for x in &events {
            let t = EventType::from_name(&x.event_type);
            if t == Some(EventType::CapabilityRequested) {
                seen.insert(x.id(), Seen::default());
                requests.push((x.id(), CapabilityProposal::recorded(x)));
                continue;
            }
            let named = x
                .payload
                .get("request")
                .and_then(Value::as_str)
                .and_then(|r| r.parse::<EventId>().ok());
            for req in x.causes.iter().chain(named.iter()) {
                let Some(s) = seen.get_mut(req) else {
                    continue;
                };
                match t {
                    Some(EventType::CapabilityUsed) => {
                        s.used = true;
                        s.resource = ice_authority::CapabilityUsedPayload::from_payload(&x.payload)
                            .ok()
                            .map(|u| u.resource);
                        s.grant = x
                            .payload
                            .get("grant")
                            .and_then(Value::as_str)
                            .and_then(|g| g.parse::<EventId>().ok());
                    }
                    Some(EventType::BudgetReserved) => {
                        if let Some(id) = x.payload.get("reservation").and_then(Value::as_str) {
                            s.reservations.push(id.to_string());
                        }
                    }
                    Some(EventType::CapabilityDenied) => s.answered = true,
                    Some(t) if t.category() == ice_kernel::Category::Domain => s.answered = true,
                    _ => {}
                }
            }
        }
        for (req, r) in requests {
            let Some(s) = seen.remove(&req) else {
                continue;
            };
            if !s.used || s.answered {
                continue;
            }
            let file = r.capability.starts_with("fs.");
            let settles: Vec<Draft> = live
                .books
                .budget
                .reservations()
                .filter(|(id, _)| s.reservations.iter().any(|r| r == id))
                .map(|(id, c)| {
                    let actual = if file {
                        Cost {
                            tool_calls: c.tool_calls,
                            ..Cost::default()
                        }
                    } else {
                        *c
                    };
                    settle_draft(id, actual, &req)
                })
                .collect();
            let (resource, code, detail) = if file {
                let resource = match r.capability.as_str() {
                    "fs.list" => Resource::dir(&r.target).ok(),
                    _ => Resource::path(&r.target).ok(),
                };
                (
                    resource,
                    DenialCode::EffectFailed,
                    "interrupted: the process driving the run stopped after this call's grant was used and before its effect was recorded; nothing of it was staged, so nothing of it will be committed".to_string(),
                )
            } else {
                (
                    s.resource.clone(),
                    DenialCode::OutcomeUnknown,
                    format!(
                        "interrupted: the process driving the run stopped after this call's grant was used and before its result was recorded; the call may have reached {} and acted, or not, and the record cannot say which; check it before repeating the call{}",
                        cut(&r.target, 200),
                        if settles.is_empty() {
                            ""
                        } else {
                            " (its reservation is counted as spent)"
                        }
                    ),
                )
            };
            let mut d = Self::denial(&r, resource.as_ref(), code, detail);
            d.grant = s.grant;
            // The settlement and the answer in one batch, as for a call that failed live.
            self.deny_after(live, settles, d, &req).await?;
        }
        Ok(())
    }

    /// Whether the run is to stop now: a kill is recorded (by this process or another). ICE
    /// stopping is not one: calls in flight are waited for then (a second signal exits at
    /// once, killing every command started). A log that cannot be read now answers no (the
    /// call goes on to its end).
    async fn stop_asked(&self) -> bool {
        let mut live = self.live.lock().await;
        self.catch_up(&mut live).await.is_ok() && live.books.kill.is_some()
    }

    async fn wait_for_approval(
        &self,
        approval: &EventId,
        timeout: Duration,
        withdrawn: Option<&CancellationToken>,
    ) -> Result<ApprovalWait, RuntimeError> {
        let never = CancellationToken::new();
        let withdrawn = withdrawn.unwrap_or(&never);
        let deadline = Instant::now() + timeout;
        let mut interrupted = self.rt.interrupts.why.subscribe();
        loop {
            {
                let mut live = self.live.lock().await;
                self.catch_up(&mut live).await?;
                if live.books.kill.is_some() {
                    return Ok(ApprovalWait::Killed);
                }
                match live.books.approvals.get(approval).map(|a| a.status.clone()) {
                    Some(ApprovalStatus::Granted { .. }) => return Ok(ApprovalWait::Granted),
                    Some(ApprovalStatus::Denied { reason, .. }) => {
                        return Ok(ApprovalWait::Denied(reason));
                    }
                    _ => {}
                }
            }
            // An answer recorded before the interruption was taken above; none can be now.
            if let Some(why) = self.rt.interrupts.why() {
                return Ok(ApprovalWait::Interrupted(why));
            }
            if withdrawn.is_cancelled() {
                return Ok(ApprovalWait::Withdrawn);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(ApprovalWait::TimedOut);
            }
            tokio::select! {
                () = tokio::time::sleep(left.min(Duration::from_millis(50))) => {}
                _ = interrupted.changed() => {}
                () = withdrawn.cancelled() => {}
            }
        }
    }
}

/// Whether an append failed on a conflict: someone else wrote to the run meanwhile.
fn is_conflict(e: &RuntimeError) -> bool {
    matches!(
        e,
        RuntimeError::Append(AppendError::Log(LogError::Conflict { .. }))
    )
}

/// Withhold a result the log cannot carry exactly (the validator refused its record): the
/// record keeps, for each field left out, the digest and size of its JSON text, and says why;
/// the agent is shown an error instead of the result.
fn withhold(p: &mut act::Performed, why: &str) {
    let detail = format!(
        "the result cannot be recorded, so it is withheld: {}",
        cut(why, 400)
    );
    for k in ["result", "arguments", "output"] {
        if let Some(v) = p.payload.remove(k) {
            let text = v.to_string();
            p.payload.insert(
                format!("{k}_withheld"),
                json!({"sha256": ice_kernel::Digest::of(text.as_bytes()).to_hex(), "bytes": text.len()}),
            );
        }
    }
    p.payload.insert(
        "error".into(),
        json!({"kind": "unrecordable", "detail": detail}),
    );
    p.payload.insert("is_error".into(), Value::Bool(true));
    p.output = act::tool_error_result(&detail);
    p.payload.insert("output".into(), p.output.clone());
}

/// The grant a call will use.
enum Grant {
    Existing(EventId),
    /// A grant to issue, and the operator's approval event that allows it, if any.
    New(Box<CapabilityGrantedPayload>, Option<EventId>),
}

fn request_draft(agent: &str, r: &CapabilityProposal) -> Draft {
    Proposal::Request(r.clone())
        .draft(agent)
        .expect("a request is recorded")
}

enum ApprovalWait {
    Granted,
    Denied(String),
    TimedOut,
    Killed,
    /// This process stopped waiting for approvals ([`Runtime::interrupt_approval_waits`]).
    Interrupted(String),
    /// The agent withdrew the request before it was answered (its MCP client cancelled the
    /// call, or its session ended): the approval is closed, the call denied, the run goes on.
    Withdrawn,
}

/// Whether the policy could permit `agent` to call an MCP tool now (it does not deny every
/// call to it): the tools an agent is offered. A live grant for the tool does not count: the
/// policy decides every call, so a tool it denies is not offered whatever grant is live. The
/// live run and a replay decide this with the same function.
pub(crate) fn tool_permitted(
    registry: &ice_authority::Registry,
    policy: &PolicySet,
    books: &Books,
    agent: &str,
    (server, tool): (&str, &str),
    (assigned, hint): (
        ice_authority::EffectClass,
        Option<ice_authority::EffectClass>,
    ),
) -> bool {
    let Ok(resource) = Resource::tool(server, tool) else {
        return false;
    };
    let target = act::Target::Tool {
        server: server.to_string(),
        tool: tool.to_string(),
        assigned,
        hint,
    };
    let empty = json!({});
    let builder = Request::builder(books.run(), agent, "mcp.call", resource)
        .arguments(&empty)
        .budget_left(books.budget.left());
    match act::classed(builder, &target).build(registry) {
        Ok(q) => policy.decide(&q).kind() != DecisionKind::Deny,
        Err(_) => false,
    }
}

/// Run an agent's (synchronous, maybe network-bound) code without stalling the async workers
/// that carry other runs' calls.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

pub(crate) fn add_ms(t: Timestamp, ms: u64) -> Timestamp {
    Timestamp::from_unix_us(t.unix_us().saturating_add((ms as i64).saturating_mul(1000)))
        .unwrap_or(t)
}

pub(crate) fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// The refusals reached `[budget] denials` with a withdrawal (see
/// [`Books::last_refusal_withdrawn`]): why the run stops before the agent's next request.
fn withdrawals_over_budget(live: &Live) -> Option<String> {
    let max = live.spec.budget.denials?;
    (live.books.last_refusal_withdrawn
        && live.books.refusals >= max
        && live.books.state() == RunState::Executing)
        .then(|| {
            format!(
                "{} of the agent's requests were refused, the last one a request it withdrew while it waited for an approval, and the budget allows {max} (denials)",
                live.books.refusals
            )
        })
}

// ---------------------------------------------------------------------------------------------
// The run loop.

impl Ctx<'_> {
    /// Drive the execution window until the agent finishes, the run is suspended or aborted.
    pub(crate) async fn drive(&self, agent: &mut dyn Agent) -> Result<RunOutcome, RuntimeError> {
        let agent_id = agent.id().to_string();
        loop {
            let view = {
                let mut guard = self.live.lock().await;
                let live = &mut *guard;
                if let Some(stop) = self.between_steps(live).await? {
                    return Ok(stop);
                }
                AgentView {
                    run_id: self.run.clone(),
                    step: live.books.proposals,
                    capabilities: self.rt.capability_list(),
                    last: live.last.take(),
                    memories: live.memories.clone(),
                    tools: self
                        .permitted_tools(live, &agent_id)
                        .into_iter()
                        .map(|(t, class)| ToolOffer {
                            target: format!("{}/{}", t.server, t.name),
                            description: t.description.clone().unwrap_or_default(),
                            input_schema: t.input_schema.clone(),
                            effect: class.as_str().to_string(),
                        })
                        .collect(),
                    time_left_ms: wall_time_left(live).map(|d| d.as_millis() as u64),
                }
            };
            let proposal = match blocking(|| agent.propose(&view)) {
                Ok(p) => p,
                Err(e) => {
                    let mut live = self.live.lock().await;
                    return self
                        .abort(&mut live, "agent_failed", &format!("the agent failed: {e}"))
                        .await;
                }
            };
            match &proposal {
                Proposal::Think { .. } => {
                    let draft = proposal.draft(&agent_id).expect("recorded");
                    let mut live = self.live.lock().await;
                    if let Some(why) = self.unrecordable(&live, &draft) {
                        return self
                            .abort(
                                &mut live,
                                "agent_failed",
                                &format!("the agent proposed what cannot be recorded: {why}"),
                            )
                            .await;
                    }
                    self.append(&mut live, |_| vec![draft.clone()]).await?;
                }
                Proposal::Infer { reserve } => {
                    if let Some(stop) = self.inference(agent, &agent_id, &view, *reserve).await? {
                        return Ok(stop);
                    }
                }
                Proposal::Request(r) => {
                    let end = self.governed_call(&agent_id, r, None).await?;
                    let mut live = self.live.lock().await;
                    live.last = Some(end.outcome);
                    if let Some(why) = end.exhausted {
                        return self.exhausted(&mut live, &why).await;
                    }
                }
                Proposal::Finish { .. } => return Ok(RunOutcome::Committed),
            }
        }
    }

    /// One model call (I-005): reserve what it may cost, let the agent call its model, record
    /// the `InferenceStep` and settle the reservation with the usage the agent reports (the
    /// provider's figures; a driver costs a figure its provider did not report at the
    /// reservation, never 0, or a budget could not stop it). A reservation that does not fit
    /// stops the run as the spec's `on_exhaustion` says.
    async fn inference(
        &self,
        agent: &mut dyn Agent,
        agent_id: &str,
        view: &AgentView,
        reserve: Cost,
    ) -> Result<Option<RunOutcome>, RuntimeError> {
        let (reservation, reserved) = {
            let mut guard = self.live.lock().await;
            let live = &mut *guard;
            let reservation = format!("r{}", live.books.reservations + 1);
            if let Err(refusal) = live.books.budget.check_reserve(&reservation, reserve) {
                let why = format!("the model call was not made: {refusal}");
                return self.exhausted(live, &why).await.map(Some);
            }
            let p = Value::Object(
                BudgetReservedPayload {
                    reservation: reservation.clone(),
                    amount: reserve,
                }
                .to_payload(),
            );
            let rec = self
                .append(live, |_| {
                    vec![rt_draft(EventType::BudgetReserved, p.clone())]
                })
                .await?;
            (reservation, rec[0].clone())
        };
        let started = Instant::now();
        let inferred = self.infer_watched(agent, view);
        let wall = started.elapsed().as_micros() as u64;
        let mut guard = self.live.lock().await;
        let live = &mut *guard;
        let settle = |actual: Cost| settle_draft(&reservation, actual, &reserved);
        let inference = match inferred {
            Ok(i) => i,
            Err(e) => {
                let spent = Cost {
                    wall_time_us: wall,
                    ..Cost::default()
                };
                self.append(live, |_| vec![settle(spent)]).await?;
                return self
                    .abort(live, "agent_failed", &format!("the agent failed: {e}"))
                    .await
                    .map(Some);
            }
        };
        let usage = Cost {
            wall_time_us: wall,
            ..inference.usage
        };
        let draft = inference
            .draft(agent_id)
            .cost(usage)
            .cause(reserved.clone());
        if let Some(why) = self.unrecordable(live, &draft) {
            self.append(live, |_| vec![settle(usage)]).await?;
            return self
                .abort(
                    live,
                    "agent_failed",
                    &format!("the model's reply cannot be recorded: {why}"),
                )
                .await
                .map(Some);
        }
        self.append(live, |_| vec![draft.clone(), settle(usage)])
            .await?;
        Ok(None)
    }

    /// The MCP tools this run's policy could permit `agent` to call now, each with the effect
    /// class ICE gives it. A tool is left out when the policy denies every call to it (whatever
    /// the arguments and intent: tool arguments are not shown to policies), so an agent is
    /// never offered what it may not use. A tool whose calls need an approval is offered.
    pub(crate) fn permitted_tools(
        &self,
        live: &Live,
        agent: &str,
    ) -> Vec<(ice_effects::mcp::ToolSpec, ice_authority::EffectClass)> {
        let Some(tools) = &self.tools else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for t in tools.tools() {
            let Some(server) = live.spec.servers.iter().find(|s| s.name == t.server) else {
                continue;
            };
            let (assigned, class) = act::tool_class(&self.rt.registry, server, &t);
            let permitted = tool_permitted(
                &self.rt.registry,
                &live.policy,
                &live.books,
                agent,
                (&t.server, &t.name),
                (assigned, t.hint),
            );
            if permitted {
                out.push((t, class));
            }
        }
        out
    }

    /// `agent.infer(view)`, given up (through the agent's [`ice_kernel::Interrupt`], if it
    /// has one) once the run is killed or its approval waits interrupted meanwhile: a kill
    /// does not wait out a model call. On a runtime with one thread the call is not watched.
    fn infer_watched(
        &self,
        agent: &mut dyn Agent,
        view: &AgentView,
    ) -> Result<ice_kernel::Inference, ice_kernel::AgentError> {
        let handle = tokio::runtime::Handle::try_current()
            .ok()
            .filter(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let (Some(flag), Some(handle)) = (agent.interrupt(), handle) else {
            return blocking(|| agent.infer(view));
        };
        flag.clear();
        blocking(|| {
            std::thread::scope(|s| {
                let call = s.spawn(|| agent.infer(view));
                while !call.is_finished() {
                    std::thread::sleep(POLL_EVERY.max(Duration::from_millis(50)));
                    if !flag.is_raised() && handle.block_on(self.stop_pending()) {
                        flag.raise();
                    }
                }
                call.join().unwrap_or_else(|_| {
                    Err(ice_kernel::AgentError(
                        "the agent's model call panicked".into(),
                    ))
                })
            })
        })
    }

    /// Whether the run was killed (by this process or, as the log says, another) or its
    /// approval waits interrupted.
    async fn stop_pending(&self) -> bool {
        let mut live = self.live.lock().await;
        if self.catch_up(&mut live).await.is_err() {
            return false;
        }
        live.books.kill.is_some() || self.rt.interrupts.marked(&self.run)
    }

    /// Whether [`Self::between_steps`] has something to act on now: a kill recorded (this
    /// process's or another's), an interrupted approval wait, the wall-time budget spent, or the
    /// policy files changed. A session with calls in flight takes no new call while one is
    /// (the checks run once they end), so an agent cannot keep a run going past a kill, its
    /// budget or a policy edit by always keeping a call open. Catches up with the log on
    /// [`Self::between_steps`]'s schedule, without taking its turn.
    pub(crate) async fn checks_due(&self, live: &mut Live) -> Result<bool, RuntimeError> {
        let poll = live.last_poll.is_none_or(|t| t.elapsed() >= POLL_EVERY);
        if poll {
            self.catch_up(live).await?;
        }
        Ok(live.books.kill.is_some()
            || self.rt.interrupts.marked(&self.run)
            || wall_time_over(live).is_some()
            || withdrawals_over_budget(live).is_some()
            || (poll
                && live.books.state() == RunState::Executing
                && PolicyStamp::of(&live.policy_dir) != live.policy_stamp))
    }

    /// Checks between two proposals: kill, deadline, grant expiry, policy change, assumptions.
    pub(crate) async fn between_steps(
        &self,
        live: &mut Live,
    ) -> Result<Option<RunOutcome>, RuntimeError> {
        let poll = live.last_poll.is_none_or(|t| t.elapsed() >= POLL_EVERY);
        if poll {
            live.last_poll = Some(Instant::now());
            self.catch_up(live).await?;
        }
        if let Some((who, why)) = live.books.kill.clone() {
            return self
                .abort(live, "killed", &kill_detail(&who, &why))
                .await
                .map(Some);
        }
        if let Some(why) = self.rt.interrupts.take(&self.run) {
            return self.interrupted(live, &why).await.map(Some);
        }
        if let Some((used, limit)) = wall_time_over(live) {
            let why = format!(
                "wall_time: the execution window has run {}ms, over its budget of {}ms",
                used / 1000,
                limit / 1000
            );
            return self.exhausted(live, &why).await.map(Some);
        }
        if let Some(why) = withdrawals_over_budget(live) {
            return self.exhausted(live, &why).await.map(Some);
        }
        let now = self.now();
        let due: Vec<EventId> = live
            .books
            .grants
            .due_to_expire(now)
            .map(|g| g.id.clone())
            .collect();
        if !due.is_empty() {
            self.append(live, |_| {
                due.iter()
                    .map(|g| {
                        rt_draft(
                            EventType::CapabilityExpired,
                            Value::Object(
                                CapabilityExpiredPayload { grant: g.clone() }.to_payload(),
                            ),
                        )
                        .cause(g.clone())
                    })
                    .collect()
            })
            .await?;
        }
        if poll && let Some(stop) = self.policy_check(live).await? {
            return Ok(Some(stop));
        }
        if let Some(why) = self.broken_assumption(live) {
            return self
                .suspend(live, "assumption_invalidated", &why)
                .await
                .map(Some);
        }
        Ok(None)
    }

    /// After an operator granted approval `approval`: the policy files may have changed during
    /// the wait (minutes, perhaps), and the approval does not outrank the policy in force when
    /// the call is made. Unchanged, or changed to a policy that decides `request` as before
    /// (permitted, with or without approval, under the same constraints), the call goes on
    /// (`None`); the new policy is taken on first (`PolicyReloaded`, live grants re-decided),
    /// and `decided`'s version and policies become the new decision's (the grant, or the
    /// denial, names them).
    /// Otherwise the call is refused, saying why: the new policy denies it or decides it under
    /// other limits (the agent may ask again), or it does not load or the run assumed it would
    /// not change (the run is then suspended before its next step, as any step would find).
    async fn policy_after_wait(
        &self,
        live: &mut Live,
        request: &Request,
        approval: &EventId,
        decided: (&mut PolicyVersion, &mut Vec<String>, &Constraints),
    ) -> Result<Option<(DenialCode, String)>, RuntimeError> {
        let (version, policies, constraints) = decided;
        let during = format!("the policy files changed while approval {approval} was awaited");
        if let Reload::Refused { why, .. } = self.reload_policy(live, &during).await? {
            // The next step's check suspends the run (it looks at once).
            live.last_poll = None;
            return Ok(Some((
                DenialCode::PolicyDenied,
                format!("{during}, and {why}: the call is not made; the run is suspended"),
            )));
        }
        // Whoever took the new policy on (this call, or another of the run's calls while this
        // one waited), the policy in force may not be the one that decided the request.
        if live.policy.version() == *version {
            return Ok(None);
        }
        let change = format!(
            "{during} (version {} to {})",
            short(&version.to_hex()),
            short(&live.policy.version().to_hex())
        );
        let now = live.policy.decide(request);
        *version = now.policy_version;
        *policies = now.determining_policies().to_vec();
        Ok(match now.kind() {
            DecisionKind::Deny => Some((
                DenialCode::PolicyDenied,
                format!("{change}, and the policy now in force denies the call: {now}"),
            )),
            _ if now.constraints != *constraints => Some((
                DenialCode::PolicyDenied,
                format!(
                    "{change}, and the policy now in force permits the call under other limits than the approval was asked under ({now}): the call is not made; ask again"
                ),
            )),
            _ => None,
        })
    }

    /// Notice a policy edit: re-evaluate live grants and revoke those no longer permitted, or
    /// suspend when the run assumed the policy would not change.
    async fn policy_check(&self, live: &mut Live) -> Result<Option<RunOutcome>, RuntimeError> {
        // A run another call has just stopped takes no policy on (the next resume does).
        if live.books.state() != RunState::Executing {
            return Ok(None);
        }
        match self
            .reload_policy(live, "the policy files changed while the run executed")
            .await?
        {
            Reload::Refused { code, why } => self.suspend(live, code, &why).await.map(Some),
            Reload::Unchanged | Reload::TakenOn => Ok(None),
        }
    }

    /// Look for an edit of the policy files and take a new policy on (recorded, live grants
    /// re-decided: [`Self::take_on_policy`], `why` saying what happened). A policy that does
    /// not load, or that the run assumed would not change, is not taken on (nor its stamp):
    /// the caller refuses, and the run is suspended with the code given.
    async fn reload_policy(&self, live: &mut Live, why: &str) -> Result<Reload, RuntimeError> {
        let mut stamp = PolicyStamp::of(&live.policy_dir);
        if stamp == live.policy_stamp {
            return Ok(Reload::Unchanged);
        }
        let new = match PolicySet::load_dir(&live.policy_dir, &self.rt.schema) {
            Ok(p) => p,
            // A file caught half written (an editor saving in place: truncated, then written)
            // loads a moment later: looked at once more before the run is suspended for it.
            Err(_) => {
                tokio::time::sleep(POLICY_SETTLE).await;
                stamp = PolicyStamp::of(&live.policy_dir);
                match PolicySet::load_dir(&live.policy_dir, &self.rt.schema) {
                    Ok(p) => p,
                    Err(e) => {
                        return Ok(Reload::Refused {
                            code: "policy_invalid",
                            why: format!("the policy changed and no longer loads: {e}"),
                        });
                    }
                }
            }
        };
        if new.version() == live.policy.version() {
            live.policy_stamp = stamp;
            return Ok(Reload::Unchanged);
        }
        if live
            .books
            .assumptions
            .iter()
            .any(|a| matches!(a, Assumption::PolicyVersion { .. }))
        {
            return Ok(Reload::Refused {
                code: "assumption_invalidated",
                why: format!(
                    "the policy changed from version {} to {} and the run assumed it would not",
                    short(&live.policy.version().to_hex()),
                    short(&new.version().to_hex())
                ),
            });
        }
        live.policy_stamp = stamp;
        live.policy = Arc::new(new);
        self.take_on_policy(live, why, Vec::new()).await?;
        Ok(Reload::TakenOn)
    }

    /// Take on `live.policy` (a policy that changed): record it, with its files, unless the
    /// record already holds them, and re-decide every live grant under it, revoking (in the
    /// same batch) each one it no longer permits, or permits only under tighter constraints
    /// than the grant carries.
    ///
    /// `lead` goes first in the same batch (a resume's `RunResumed`, so that a run never
    /// executes under a policy its record does not hold yet).
    pub(crate) async fn take_on_policy(
        &self,
        live: &mut Live,
        why: &str,
        lead: Vec<Draft>,
    ) -> Result<(), RuntimeError> {
        let new_version = live.policy.version();
        let now = self.now();
        let revoke: Vec<(EventId, String)> = live
            .books
            .grants
            .live(now)
            .filter_map(|g| {
                reload_verdict(&self.rt.registry, &self.run, &live.policy, g)
                    .map(|why| (g.id.clone(), why))
            })
            .collect();
        let reload = (live.books.policy_recorded != Some(new_version)).then(|| {
            rt_draft(
                EventType::PolicyReloaded,
                reloaded_payload(
                    &live.policy,
                    live.books.policy_recorded.or(live.books.policy_version),
                    why,
                ),
            )
        });
        if lead.is_empty() && reload.is_none() && revoke.is_empty() {
            return Ok(());
        }
        self.append(live, |next| {
            let cause = reload.as_ref().map(|_| self.eid(next + lead.len() as u64));
            lead.iter()
                .cloned()
                .chain(reload.iter().cloned())
                .chain(revoke.iter().map(|(g, reason)| {
                    let d = rt_draft(
                        EventType::CapabilityRevoked,
                        Value::Object(
                            CapabilityRevokedPayload {
                                grant: g.clone(),
                                reason: reason.clone(),
                                policy_version: Some(new_version),
                            }
                            .to_payload(),
                        ),
                    )
                    .cause(g.clone());
                    match &cause {
                        Some(c) => d.cause(c.clone()),
                        None => d,
                    }
                }))
                .collect()
        })
        .await?;
        Ok(())
    }

    /// The first assumption that no longer holds, described.
    pub(crate) fn broken_assumption(&self, live: &Live) -> Option<String> {
        for a in &live.books.assumptions {
            match a {
                Assumption::File { path, sha256 } => {
                    let now = act::workspace_digest(&live.spec.workspace, path);
                    if now != *sha256 {
                        return Some(format!(
                            "{path} changed: assumed sha256 {}, now {}",
                            sha256.map_or("absent".into(), |d| short(&d.to_hex()).to_string()),
                            now.map_or("absent".into(), |d| short(&d.to_hex()).to_string())
                        ));
                    }
                }
                Assumption::PolicyVersion { version } => {
                    let v = live.policy.version();
                    if version.is_some_and(|d| d != v.0) {
                        return Some(format!(
                            "the policy version is {}, not the assumed {}",
                            short(&v.to_hex()),
                            short(&version.map(|d| d.to_hex()).unwrap_or_default())
                        ));
                    }
                }
            }
        }
        None
    }

    pub(crate) async fn exhausted(
        &self,
        live: &mut Live,
        why: &str,
    ) -> Result<RunOutcome, RuntimeError> {
        match live.spec.budget.on_exhaustion {
            OnExhaustion::Abort => {
                self.abort(
                    live,
                    "budget_exhausted",
                    &format!("budget exhausted: {why}"),
                )
                .await
            }
            OnExhaustion::Suspend => {
                self.suspend(
                    live,
                    "budget_exhausted",
                    &format!("budget exhausted: {why}"),
                )
                .await
            }
        }
    }

    /// Suspend a run whose approval wait this process interrupted
    /// ([`Runtime::interrupt_approval_waits`]).
    async fn interrupted(&self, live: &mut Live, why: &str) -> Result<RunOutcome, RuntimeError> {
        // An external agent's session (MCP) has no agent in ICE to resume it: only killing
        // the run ends it (reconfiguration is refused for it).
        let next = if live.spec.driver == "external" {
            "the agent's session has ended, so an operator can only kill the run (its next session is a new run)"
        } else {
            "an operator may reconfigure and resume the run, or kill it"
        };
        let detail = format!("an approval wait was interrupted ({why}); {next}");
        self.suspend(live, "interrupted", &detail).await
    }

    pub(crate) async fn suspend(
        &self,
        live: &mut Live,
        code: &str,
        detail: &str,
    ) -> Result<RunOutcome, RuntimeError> {
        let payload = json!({"reason": code, "detail": detail});
        self.append(live, |_| {
            vec![rt_draft(EventType::RunSuspended, payload.clone())]
        })
        .await?;
        Ok(RunOutcome::Suspended {
            reason: detail.to_string(),
        })
    }

    /// Abort: discard the stage, record why, tear down.
    pub(crate) async fn abort(
        &self,
        live: &mut Live,
        code: &str,
        detail: &str,
    ) -> Result<RunOutcome, RuntimeError> {
        // A commit past its commit point can only be completed: discarding its stage would
        // leave a workspace part-way changed under a log that says nothing reached it.
        if ice_effects::commit_pending(&live.stage.dir) {
            return Err(RuntimeError::State {
                run: self.run.to_string(),
                state: live.books.state(),
                what: format!(
                    "its commit passed the commit point and was interrupted (journal in {}); it cannot be aborted ({code}), only completed, which crash recovery does (ice run, resume or serve start it)",
                    live.stage.dir.display()
                ),
            });
        }
        let staged = live.books.staged_view().len();
        live.stage.discard();
        let a = json!({"reason": code, "discarded": staged});
        let b = json!({"reason": code, "detail": detail});
        self.append(live, |_| {
            vec![
                rt_draft(EventType::RunAborted, a.clone()),
                rt_draft(EventType::AbortReasonDeclared, b.clone()),
            ]
        })
        .await?;
        self.teardown(live, "aborted").await?;
        Ok(RunOutcome::Aborted {
            reason: detail.to_string(),
        })
    }

    pub(crate) async fn teardown(
        &self,
        live: &mut Live,
        outcome: &str,
    ) -> Result<(), RuntimeError> {
        // Crash tests only (debug builds): ICE_TEST_PAUSE_BEFORE_TEARDOWN=1 stops an ended run
        // here (committed, aborted or terminated by the runtime, not yet torn down) so the
        // test can kill the process there.
        if cfg!(debug_assertions)
            && std::env::var("ICE_TEST_PAUSE_BEFORE_TEARDOWN").is_ok_and(|v| v == "1")
        {
            eprintln!("ICE_TEST: paused before teardown ({outcome})");
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
        let committed = live.books.state() == RunState::Committed;
        let released = json!({"stage": "released"});
        let done = json!({"outcome": outcome, "projection": live.books.projection()});
        self.append(live, |_| {
            vec![
                rt_draft(EventType::ResourcesReleased, released.clone()),
                rt_draft(EventType::RunTerminated, done.clone()),
            ]
        })
        .await?;
        if !committed && ice_effects::commit_pending(&live.stage.dir) {
            // A commit journal outlives only a commit given up by an operator
            // (`abandon_commit`): what it would have written is kept, never deleted.
            live.stage.stage = None;
            let keep_as = abandoned_stage_dir(&self.rt.run_dir(&self.run));
            // If it cannot be moved, it stays where it is: kept all the same, and nothing
            // rolls a terminated run's journal forward.
            let _ = ice_effects::abandon(&live.stage.dir, &keep_as);
        } else {
            live.stage.remove_store();
        }
        Ok(())
    }

    /// Validate, then commit or abort, then tear down.
    pub(crate) async fn finish(&self) -> Result<RunOutcome, RuntimeError> {
        let mut guard = self.live.lock().await;
        let live = &mut *guard;
        self.catch_up(live).await?;
        if let Some((who, why)) = live.books.kill.clone() {
            return self.abort(live, "killed", &kill_detail(&who, &why)).await;
        }
        if let Some(why) = self.rt.interrupts.take(&self.run) {
            return self.interrupted(live, &why).await;
        }
        // The policy in force when the run ends, whatever the poll's schedule: files that no
        // longer load, or a change the run assumed would not happen, suspend it rather than
        // let it commit; a new policy is taken on (and recorded) before validation.
        if let Some(stop) = self.policy_check(live).await? {
            return Ok(stop);
        }
        // An assumption that no longer holds suspends the run, at its end as between its steps
        // (the operator decides), rather than failing its validation.
        if let Some(why) = self.broken_assumption(live) {
            return self.suspend(live, "assumption_invalidated", &why).await;
        }
        // What is validated and committed is what the log says was staged. They differ only
        // when a write's record failed in a way that may still have stored it (a lost answer:
        // the live stage forgot the write, the log has it): the stage is rebuilt from the log.
        let recorded: Vec<ice_effects::StagedOp> =
            live.books.staged.iter().map(|o| o.op.clone()).collect();
        if live.stage.ops() != recorded.as_slice() {
            live.stage = self
                .rt
                .open_stage(&self.run, &live.spec, Some(&live.books))?;
        }
        let started = json!({"checks": live_check_names(&live.spec)});
        self.append(live, |_| {
            vec![rt_draft(EventType::ValidationStarted, started.clone())]
        })
        .await?;
        let mut results = Vec::new();
        let mut failed: Option<String> = None;
        // 1. Every effect has valid authority evidence.
        match self.authority_evidence(live).await? {
            Ok(n) => results.push(json!({"check": "authority", "passed": true, "effects": n})),
            Err(why) => {
                results.push(json!({"check": "authority", "passed": false, "detail": why}));
                failed.get_or_insert(why);
            }
        }
        // 2. Budgets held.
        let spent = live.books.budget.spent();
        let over = live
            .books
            .budget
            .limits()
            .fields()
            .into_iter()
            .zip(spent.fields())
            .find(|((_, lim), (_, s))| lim.is_some_and(|l| *s > l))
            .map(|((n, l), (_, s))| format!("{n}: spent {s} of {}", l.unwrap_or(0)));
        // Wall time is spent by the window, not settled by calls: the record's own times say
        // how long the window ran.
        let now = self.now();
        let over = over.or_else(|| {
            let limit = live.spec.budget.wall_time_us?;
            let used = live.books.window_elapsed_us(now)?;
            (used > limit).then(|| {
                format!(
                    "wall_time: the execution window ran {}ms of {}ms",
                    used / 1000,
                    limit / 1000
                )
            })
        });
        match over {
            None => results.push(json!({"check": "budget", "passed": true})),
            Some(why) => {
                results.push(json!({"check": "budget", "passed": false, "detail": why}));
                failed.get_or_insert(format!("budget overspent: {why}"));
            }
        }
        // 3. Assumptions still hold.
        match self.broken_assumption(live) {
            None => results.push(json!({"check": "assumptions", "passed": true})),
            Some(why) => {
                results.push(json!({"check": "assumptions", "passed": false, "detail": why}));
                failed.get_or_insert(format!("assumption invalidated: {why}"));
            }
        }
        // 4. The declared checks, on a copy of the workspace with the staged writes applied.
        if failed.is_none() && !live.spec.checks.is_empty() {
            let outcomes = act::run_checks(&live.stage, &live.spec.checks).await;
            for (check, res) in live.spec.checks.iter().zip(outcomes) {
                match res {
                    Ok(v) => {
                        let passed = v.get("passed").and_then(Value::as_bool).unwrap_or(false);
                        if !passed {
                            failed.get_or_insert(format!("check {:?} failed", check.name));
                        }
                        results.push(v);
                    }
                    Err(why) => {
                        results.push(json!({"check": check.name, "passed": false, "detail": why}));
                        failed.get_or_insert(format!("check {:?}: {why}", check.name));
                    }
                }
            }
        }
        let verdict = if failed.is_none() {
            EventType::ValidationPassed
        } else {
            EventType::ValidationFailed
        };
        let payload = json!({"results": results});
        self.append(live, |_| vec![rt_draft(verdict, payload.clone())])
            .await?;
        if let Some(why) = failed {
            return self.abort(live, "validation_failed", &why).await;
        }
        match self.commit(live).await {
            // Nothing was applied: the run ends aborted, saying why, rather than stuck
            // validating with a commit that never started.
            Err(RuntimeError::CommitRefused(why)) => {
                self.abort(
                    live,
                    "commit_refused",
                    &format!("the commit was refused before it changed anything: {why}"),
                )
                .await
            }
            r => r.map(|()| RunOutcome::Committed),
        }
    }

    /// A commit that passed its commit point and was interrupted (its journal is in the stage
    /// directory): apply its changes again (they are idempotent), record them and the commit,
    /// and tear the run down. `Ok(None)` when no commit is pending.
    pub(crate) async fn complete_interrupted_commit(
        &self,
        live: &mut Live,
    ) -> Result<Option<usize>, RuntimeError> {
        match self.try_complete_interrupted_commit(live).await? {
            Completion::Done(n) => Ok(n),
            Completion::CannotApply(e) => Err(e),
        }
    }

    /// [`Ctx::complete_interrupted_commit`], telling apart a commit whose changes cannot be
    /// applied (its workspace is gone, say: only an operator can give it up) from any later
    /// failure, when the changes are applied and only their record failed.
    pub(crate) async fn try_complete_interrupted_commit(
        &self,
        live: &mut Live,
    ) -> Result<Completion, RuntimeError> {
        if !ice_effects::commit_pending(&live.stage.dir) {
            return Ok(Completion::Done(None));
        }
        let ws = match ice_effects::Workspace::open(&live.spec.workspace) {
            Ok(ws) => ws,
            Err(e) => {
                return Ok(Completion::CannotApply(RuntimeError::Io(format!(
                    "workspace: {e}"
                ))));
            }
        };
        match ice_effects::roll_forward(&live.stage.dir, &ws) {
            Err(e) => Ok(Completion::CannotApply(RuntimeError::Io(format!(
                "recovery: {e}"
            )))),
            Ok(ice_effects::Recovery::RolledForward { changes }) => {
                live.stage.stage = None;
                self.record_commit(live, &changes, true).await?;
                Ok(Completion::Done(Some(changes.len())))
            }
            Ok(ice_effects::Recovery::NothingPending) => Ok(Completion::Done(None)),
        }
    }

    /// Apply the staged writes (crash-safe, see the effects layer's journal) and record them.
    pub(crate) async fn commit(&self, live: &mut Live) -> Result<(), RuntimeError> {
        let changes = act::commit(&mut live.stage)?;
        self.record_commit(live, &changes, false).await
    }

    /// Record applied changes and the commit, then tear down.
    pub(crate) async fn record_commit(
        &self,
        live: &mut Live,
        changes: &[ice_effects::Change],
        recovered: bool,
    ) -> Result<(), RuntimeError> {
        let view: std::collections::BTreeMap<String, crate::books::StagedOp> = live
            .books
            .staged_view()
            .into_iter()
            .map(|(k, v)| (k, v.clone()))
            .collect();
        let applied: Vec<Draft> = changes
            .iter()
            .map(|c| {
                let op = view.get(&c.path);
                let mut d = Draft::new(EventType::EffectApplied.name(), Origin::Runtime)
                    .intent(
                        op.map_or_else(|| "apply a staged write".to_string(), |o| o.intent.clone()),
                    )
                    .authority(op.map_or_else(|| "run-commit".to_string(), |o| o.grant.clone()))
                    .payload({
                        let mut p = change_fields(c);
                        p.insert("evidence".into(), c.evidence().to_json());
                        Value::Object(p)
                    });
                if let Some(o) = op {
                    d = d.cause(o.event.clone());
                }
                d
            })
            .collect();
        drop(view);
        let n = applied.len();
        self.append(live, |_| {
            let mut v = applied.clone();
            v.push(rt_draft(
                EventType::RunCommitted,
                json!({"applied": n, "completed_by_recovery": recovered}),
            ));
            v
        })
        .await?;
        // Governed memory: the spec's promotion rules, after RunCommitted, before teardown.
        crate::memory::promote_at_commit(self, live).await?;
        self.teardown(live, "committed").await?;
        Ok(())
    }

    /// Check that every effect event of the run names a grant of the run and follows a recorded
    /// use of it. Returns the number of effects checked, or why one fails.
    async fn authority_evidence(&self, live: &Live) -> Result<Result<u64, String>, RuntimeError> {
        let events = crate::read_run(self.rt.ledger.log().as_ref(), &self.run).await?;
        let mut n = 0;
        for e in &events {
            let Some(t) = EventType::from_name(&e.event_type) else {
                continue;
            };
            if !matches!(
                t,
                EventType::FileRead
                    | EventType::EffectStaged
                    | EventType::APIRequestExecuted
                    | EventType::ToolInvoked
            ) {
                continue;
            }
            n += 1;
            let Some(g) = e
                .authority
                .as_deref()
                .and_then(|a| a.parse::<EventId>().ok())
            else {
                return Ok(Err(format!("{} names no grant as its authority", e.id())));
            };
            if live.books.grants.get(&g).is_none() {
                return Ok(Err(format!(
                    "{}: authority {g} is not a grant of this run",
                    e.id()
                )));
            }
            let used = e.causes.iter().any(|c| {
                c.run_id == self.run
                    && events.get(c.run_seq as usize).is_some_and(|u| {
                        u.event_type == EventType::CapabilityUsed.name()
                            && u.authority.as_deref() == Some(&g.to_string())
                    })
            });
            if !used {
                return Ok(Err(format!(
                    "{}: no recorded use of grant {g} caused it",
                    e.id()
                )));
            }
        }
        Ok(Ok(n))
    }
}

fn live_check_names(spec: &RunSpec) -> Vec<String> {
    spec.checks.iter().map(|c| c.name.clone()).collect()
}

/// Whether a grant stands under `policy` (a policy that changed while it was live): `None` if
/// the policy still permits it at least as loosely, else why it is revoked. The live run and
/// its replay both ask this.
pub(crate) fn reload_verdict(
    registry: &ice_authority::Registry,
    run: &RunId,
    policy: &PolicySet,
    g: &ice_authority::Grant,
) -> Option<String> {
    let version = short(&policy.version().to_hex()).to_string();
    let q = match Request::builder(run, &g.agent, &g.capability, g.resource.clone()).build(registry)
    {
        Ok(q) => q,
        Err(e) => return Some(format!("policy reload: {e}")),
    };
    let d = policy.decide(&q);
    let permitted = match d.kind() {
        DecisionKind::Permit => true,
        DecisionKind::PermitWithApproval => g.approval.is_some(),
        DecisionKind::Deny => false,
    };
    if !permitted {
        Some(format!(
            "policy reload: the new policy ({version}) decides {} for {} on {}",
            d.kind(),
            g.capability,
            g.resource
        ))
    } else if d.constraints.tightest(g.constraints) != g.constraints {
        Some(format!(
            "policy reload: the new policy ({version}) limits {} on {} more tightly ({})",
            g.capability, g.resource, d.constraints
        ))
    } else {
        None
    }
}

/// The payload of `PolicyReloaded`: the new version, the one before it, and the new files.
pub(crate) fn reloaded_payload(
    policy: &PolicySet,
    previous: Option<PolicyVersion>,
    why: &str,
) -> Value {
    json!({
        "policy_version": policy.version().to_hex(),
        "previous_version": previous.map(|v| v.to_hex()),
        "policy_sources": policy.sources(),
        "reason": why,
    })
}

pub(crate) fn short(hex: &str) -> &str {
    &hex[..hex.len().min(12)]
}

/// The report of a run, folded from the log.
pub(crate) async fn report(
    rt: &Runtime,
    run: &RunId,
    outcome: RunOutcome,
    live: Books,
) -> Result<RunReport, RuntimeError> {
    let events = crate::read_run(rt.ledger.log().as_ref(), run).await?;
    let books = live;
    let denials = events
        .iter()
        .filter(|e| e.event_type == EventType::CapabilityDenied.name())
        .map(|e| {
            (
                e.id(),
                e.payload
                    .get("reason")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                match e.payload.get("detail") {
                    Some(Value::String(d)) => d.clone(),
                    // A detail over the blob threshold is kept as a blob: say so, not nothing.
                    Some(d) => match (d.get(ice_kernel::blob::BLOB_KEY), d.get("size")) {
                        (Some(Value::String(digest)), Some(size)) => format!(
                            "(its detail, {size} bytes, is kept as blob {digest}: `ice show {}`)",
                            e.id()
                        ),
                        _ => d.to_string(),
                    },
                    None => String::new(),
                },
            )
        })
        .collect();
    Ok(RunReport {
        run: run.clone(),
        outcome,
        state: books.state(),
        events: events.len() as u64,
        applied: books.applied,
        staged: books.staged_view().len(),
        denials,
        spent: books.budget.spent(),
        limits: *books.budget.limits(),
        books,
    })
}

/// What completing an interrupted commit came to.
pub(crate) enum Completion {
    /// Completed and recorded (this many changes), or none was pending.
    Done(Option<usize>),
    /// Its changes cannot be applied: why.
    CannotApply(RuntimeError),
}

/// A change as the log names it: its path, kind and before/after digests.
pub(crate) fn change_fields(c: &ice_effects::Change) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("path".into(), json!(c.path));
    m.insert("change".into(), json!(c.kind.as_str()));
    m.insert("before".into(), json!(c.before.map(|s| s.digest.to_hex())));
    m.insert("after".into(), json!(c.after.map(|s| s.digest.to_hex())));
    m
}

/// The name an abandoned commit's stage is kept under in the run's directory (with `-N` after
/// the first).
pub(crate) const ABANDONED_STAGE: &str = "abandoned-commit";

/// Where an abandoned commit's stage is kept: [`ABANDONED_STAGE`] in the run's directory (or
/// `abandoned-commit-N`, the first that is free).
pub(crate) fn abandoned_stage_dir(run_dir: &std::path::Path) -> std::path::PathBuf {
    (1..10_000)
        .map(|n| match n {
            1 => run_dir.join(ABANDONED_STAGE),
            n => run_dir.join(format!("{ABANDONED_STAGE}-{n}")),
        })
        .find(|p| !p.exists())
        .unwrap_or_else(|| run_dir.join(format!("{ABANDONED_STAGE}-last")))
}

/// The run's wall-time budget, if it has one, and what its execution window has used of it,
/// in microseconds: `(used, limit)`.
fn wall_time_used(live: &Live) -> Option<(u64, u64)> {
    let limit = live.spec.budget.wall_time_us?;
    Some((live.window_started.elapsed().as_micros() as u64, limit))
}

/// `(used, limit)` once the window has run past the wall-time budget.
fn wall_time_over(live: &Live) -> Option<(u64, u64)> {
    wall_time_used(live).filter(|(used, limit)| used > limit)
}

/// What the run's wall-time budget has left, if it has one.
fn wall_time_left(live: &Live) -> Option<Duration> {
    wall_time_used(live).map(|(used, limit)| Duration::from_micros(limit.saturating_sub(used)))
}
