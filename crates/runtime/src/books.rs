//! A run's state as a fold of its events: lifecycle, grants, approvals, budget ledger, staged
//! writes, and what the runtime needs to continue it. The live run and a replay from the
//! log use this same fold, so they cannot disagree.

use std::collections::BTreeMap;

use ice_authority::{ApprovalBook, BudgetLedger, BudgetLimits, GrantBook, PolicyVersion};
use ice_kernel::{Digest, Event, EventId, EventType, RunHead, RunId, RunState, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::spec::{Assumption, BudgetSpec, RunSpec};

/// One staged write, as recorded by its `EffectStaged` event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedOp {
    /// Workspace path.
    pub path: String,
    /// The new content's digest; `None` for a delete.
    pub after: Option<Digest>,
    /// The op as the effects layer records it (to rebuild the stage after a restart).
    pub op: ice_effects::StagedOp,
    /// The `EffectStaged` event.
    pub event: EventId,
    /// The grant it was staged under.
    pub grant: String,
    /// The intent it was staged with.
    pub intent: String,
}

/// Everything the runtime knows about a run, folded from its events.
#[derive(Clone, Debug, PartialEq)]
pub struct Books {
    /// The validator's view (state, next position).
    pub head: RunHead,
    /// Grants.
    pub grants: GrantBook,
    /// Approvals.
    pub approvals: ApprovalBook,
    /// The budget ledger.
    pub budget: BudgetLedger,
    /// The spec the run was provisioned with (from `RunProvisioned`).
    pub spec: Option<RunSpec>,
    /// Assumptions with the digests they must keep (from `ContextResolved`, renewed by a
    /// reconfiguration).
    pub assumptions: Vec<Assumption>,
    /// The policy version bound at context time or by the last reload, reconfiguration or
    /// revocation.
    pub policy_version: Option<PolicyVersion>,
    /// The version of the last policy whose files the record holds (`ContextResolved`,
    /// `PolicyReloaded`): a replay can re-decide requests under this one.
    pub policy_recorded: Option<PolicyVersion>,
    /// Agent proposals recorded so far.
    pub proposals: u64,
    /// Staged ops in order.
    pub staged: Vec<StagedOp>,
    /// `RunKillRequested`: by whom and why.
    pub kill: Option<(String, String)>,
    /// The latest `RunSuspended` payload.
    pub suspension: Option<Value>,
    /// The latest `ReconfigurationRecorded` since the suspension.
    pub reconfiguration: Option<(EventId, Value)>,
    /// When the execution window opened.
    pub window_opened: Option<Timestamp>,
    /// The execution window's current (or last) opening. See [`Books::window_elapsed_us`].
    pub window: ice_kernel::Window,
    /// Effects applied at commit.
    pub applied: u64,
    /// Denials.
    pub denials: u64,
    /// Denials that refused what the agent asked for (the policy, a grant, an operator's
    /// denial, confinement, the budget, …): what `[budget] denials` limits. Not an effect that
    /// failed or whose outcome is unknown, an approval nobody answered, or one the runtime
    /// closed (a kill, an interruption, its expiry), even after an operator granted it, nor a
    /// call an operator granted that the policy, changed while the operator was asked, then
    /// refused. A request the agent withdrew while it waited for an approval is one.
    pub refusals: u64,
    /// Whether the last refusal was a withdrawal (`closed: withdrawn`), and the run has not
    /// been suspended since. A withdrawal that brings the refusals to the budget stops the run
    /// at the agent's next request, not at once: the session may be ending (its end withdraws
    /// the requests still waiting too), and a session's end finishes its run as usual.
    pub last_refusal_withdrawn: bool,
    /// What the run saw at each workspace path: its last full read from the workspace
    /// (`FileRead`, unless its output was withheld from the agent, or the `CapabilityDenied` of a read that found no file, `seen: "absent"`),
    /// which comes before the path is staged (a staged path is read from the stage), or else
    /// what was there when it staged it (`EffectStaged`'s `seen`; `None`: absent). A stage
    /// rebuilt after a restart refuses a commit over a change made meanwhile, as the live one
    /// does; an edit the run read (an operator's, while it was suspended) is no such change.
    pub seen: std::collections::BTreeMap<String, Option<ice_effects::FileState>>,
    /// Number of reservations made (for the next id).
    pub reservations: u64,
    /// The operator's answer (`ApprovalGranted` / `ApprovalDenied` event) to each approval:
    /// its one answer (the fold refuses a second, see [`Books::apply`]).
    pub answers: BTreeMap<EventId, EventId>,
    /// Approvals the runtime stopped waiting for: each one's first `CapabilityDenied` naming it
    /// (the call it was for was refused: denied, timed out, the run killed), that denial's
    /// reason code, and why the runtime closed it where the denial says (`closed`:
    /// `withdrawn`, `killed`, `interrupted`; absent for an operator's denial and in older
    /// records). No operator's answer is taken after it.
    pub closed: BTreeMap<EventId, (EventId, String, Option<String>)>,
}

/// Why an event could not be folded.
#[derive(Debug, thiserror::Error)]
#[error("event {event}: {problem}")]
pub struct FoldError {
    /// The event.
    pub event: EventId,
    /// What is wrong.
    pub problem: String,
}

/// The approval an event's payload names (`approval`), if it names one.
fn approval_named(e: &Event) -> Option<EventId> {
    e.payload
        .get("approval")
        .and_then(Value::as_str)
        .and_then(|a| a.parse::<EventId>().ok())
}

pub(crate) fn limits_of(b: &BudgetSpec) -> BudgetLimits {
    BudgetLimits {
        wall_time_us: None,
        tokens_in: b.tokens_in,
        tokens_out: b.tokens_out,
        tool_calls: b.tool_calls,
        bytes: b.bytes,
        credits_micro: b.credits_micro,
        risk: b.risk,
    }
}

impl Books {
    /// Empty books for a run.
    pub fn new(run: RunId) -> Books {
        Books {
            head: RunHead::new(run.clone()),
            grants: GrantBook::new(run.clone()),
            approvals: ApprovalBook::new(run.clone()),
            budget: BudgetLedger::new(run, BudgetLimits::unlimited()),
            spec: None,
            assumptions: Vec::new(),
            policy_version: None,
            policy_recorded: None,
            proposals: 0,
            staged: Vec::new(),
            kill: None,
            suspension: None,
            reconfiguration: None,
            window_opened: None,
            window: ice_kernel::Window::default(),
            applied: 0,
            denials: 0,
            refusals: 0,
            last_refusal_withdrawn: false,
            seen: Default::default(),
            reservations: 0,
            answers: BTreeMap::new(),
            closed: BTreeMap::new(),
        }
    }

    /// The run.
    pub fn run(&self) -> &RunId {
        &self.head.run_id
    }

    /// The run's state.
    pub fn state(&self) -> RunState {
        self.head.state()
    }

    /// The position the next event will take.
    pub fn next_seq(&self) -> u64 {
        self.head.next_seq
    }

    /// Fold one event (of this run, in order).
    ///
    /// An approval request has one answer: an `ApprovalGranted` or `ApprovalDenied` for an
    /// approval that already has one, or that the runtime already closed (a `CapabilityDenied`
    /// naming it), is refused, and the books are unchanged. The runtime never records such an
    /// answer ([`crate::Runtime::answer_approval`] appends only at the position it checked),
    /// so a record holding one was written past it, and a replay reports it.
    pub fn apply(&mut self, e: &Event) -> Result<(), FoldError> {
        let fail = |problem: String| FoldError {
            event: e.id(),
            problem,
        };
        if let Some(EventType::ApprovalGranted | EventType::ApprovalDenied) =
            EventType::from_name(&e.event_type)
            && let Some(a) = approval_named(e)
        {
            if let Some(first) = self.answers.get(&a) {
                return Err(fail(format!(
                    "approval {a} was already answered by event {first}: a request has one answer"
                )));
            }
            if let Some((denial, code, _)) = self.closed.get(&a) {
                return Err(fail(format!(
                    "approval {a} was already closed by the runtime's denial {denial} ({code}): it takes no answer after that"
                )));
            }
        }
        self.head.apply(e).map_err(|err| fail(err.to_string()))?;
        self.grants.apply(e).map_err(|err| fail(err.to_string()))?;
        self.approvals
            .apply(e)
            .map_err(|err| fail(err.to_string()))?;
        let Some(t) = EventType::from_name(&e.event_type) else {
            return Ok(());
        };
        self.window.apply(t, e.at);
        match t {
            EventType::RunProvisioned
                if e.payload.get("kind").and_then(Value::as_str) == Some("memory") =>
            {
                // A memory maintenance run (see `crate::memory`): no agent, no spec, no budget.
            }
            EventType::RunProvisioned => {
                let spec: RunSpec =
                    serde_json::from_value(e.payload.get("spec").cloned().unwrap_or(Value::Null))
                        .map_err(|err| fail(format!("RunProvisioned spec: {err}")))?;
                self.budget = BudgetLedger::new(self.run().clone(), limits_of(&spec.budget));
                self.spec = Some(spec);
            }
            EventType::ContextResolved => {
                self.assumptions = serde_json::from_value(
                    e.payload
                        .get("assumptions")
                        .cloned()
                        .unwrap_or(Value::Array(Vec::new())),
                )
                .map_err(|err| fail(format!("ContextResolved assumptions: {err}")))?;
                self.policy_version = policy_version(e.payload.get("policy_version"))
                    .map_err(|err| fail(format!("ContextResolved policy_version: {err}")))?;
                if e.payload.contains_key("policy_sources") {
                    self.policy_recorded = self.policy_version;
                }
            }
            EventType::PolicyReloaded => {
                let v = policy_version(e.payload.get("policy_version"))
                    .map_err(|err| fail(format!("PolicyReloaded policy_version: {err}")))?
                    .ok_or_else(|| fail("PolicyReloaded has no policy_version".into()))?;
                self.policy_version = Some(v);
                self.policy_recorded = Some(v);
            }
            EventType::ExecutionWindowOpened => self.window_opened = Some(e.at),
            EventType::InferenceStep
            | EventType::DecisionProposed
            | EventType::HypothesisGenerated
            | EventType::UncertaintyDeclared
            | EventType::PlanStepProposed
            | EventType::AssumptionDeclared
            | EventType::CapabilityRequested => self.proposals += 1,
            EventType::CapabilityDenied => {
                self.denials += 1;
                if e.payload.get("seen").and_then(Value::as_str) == Some("absent")
                    && let Ok(d) = ice_authority::CapabilityDeniedPayload::from_payload(&e.payload)
                    && let Some(ice_authority::Resource::Path(p)) = d.resource
                {
                    self.seen.insert(p, None);
                }
                // An approval no operator answered, closed by the runtime (timed out, the
                // wall-time budget ran out, a kill, an interruption), is no refusal of the
                // agent's; an operator's denial is, and so is the agent's own withdrawal of
                // its request (`closed: withdrawn`): else an agent could ask for approvals and
                // withdraw them without end, each shown to operators, none counted. Nor is an
                // approval an operator granted that the runtime closed all the same (a kill
                // recorded before the waiting call took the answer): its code is
                // `approval_denied`, and nobody denied it. Nor a call an operator granted that the policy,
                // changed while the operator was asked, no longer lets through (it denies the
                // call, or no longer loads and the run is suspended): `policy_denied`, and the
                // agent asked for what was allowed when it asked.
                let named = approval_named(e);
                let closed_as = e.payload.get("closed").and_then(Value::as_str).filter(|_| {
                    e.payload.get("reason").and_then(Value::as_str) == Some("approval_denied")
                });
                let withdrawn =
                    closed_as == Some(ice_authority::ApprovalClosed::Withdrawn.as_str());
                let unanswered = !withdrawn
                    && named
                        .as_ref()
                        .is_some_and(|a| !self.answers.contains_key(a));
                let closed_after_grant = matches!(
                    e.payload.get("reason").and_then(Value::as_str),
                    Some("approval_denied" | "policy_denied")
                ) && named.as_ref().is_some_and(|a| {
                    matches!(
                        self.approvals.get(a).map(|x| &x.status),
                        Some(ice_authority::ApprovalStatus::Granted { .. })
                    )
                });
                let refused = !unanswered
                    && !closed_after_grant
                    && !matches!(
                        e.payload.get("reason").and_then(Value::as_str),
                        Some(
                            "effect_failed"
                                | "outcome_unknown"
                                | "run_not_executing"
                                | "approval_timeout"
                                | "approval_expired"
                        )
                    );
                if refused {
                    self.refusals += 1;
                    self.last_refusal_withdrawn = withdrawn;
                }
                if let Some(a) = approval_named(e) {
                    let code = e
                        .payload
                        .get("reason")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string();
                    self.closed
                        .entry(a)
                        .or_insert((e.id(), code, closed_as.map(str::to_string)));
                }
                // A request the law could not record is answered by a denial that names no
                // request event: it still counts as one of the agent's proposals.
                if !e.payload.contains_key("request") {
                    self.proposals += 1;
                }
            }
            EventType::BudgetReserved => {
                self.budget.apply(e).map_err(|err| fail(err.to_string()))?;
                self.reservations += 1;
            }
            EventType::BudgetSettled => {
                self.budget.apply(e).map_err(|err| fail(err.to_string()))?;
            }
            EventType::CapabilityRevoked => {
                if let Ok(v) = policy_version(e.payload.get("policy_version"))
                    && v.is_some()
                {
                    self.policy_version = v;
                }
            }
            EventType::FileRead => {
                if let Some((path, state)) = read_seen(&e.payload) {
                    self.seen.insert(path, Some(state));
                }
            }
            EventType::EffectStaged => {
                let op = StagedPayload::deserialize(&e.payload)
                    .map_err(|err| fail(format!("EffectStaged: {err}")))?;
                if let Some(seen) = e.payload.get("seen") {
                    let state = seen_from_json(seen)
                        .map_err(|err| fail(format!("EffectStaged seen: {err}")))?;
                    self.seen.entry(op.path.clone()).or_insert(state);
                }
                let staged = ice_effects::StagedOp::from_json(&op.staged)
                    .map_err(|err| fail(format!("EffectStaged op: {err}")))?;
                self.staged.push(StagedOp {
                    path: op.path,
                    after: op.after,
                    op: staged,
                    event: e.id(),
                    grant: e.authority.clone().unwrap_or_default(),
                    intent: e.intent.clone().unwrap_or_default(),
                });
            }
            EventType::EffectApplied => self.applied += 1,
            EventType::ApprovalGranted | EventType::ApprovalDenied => {
                if let Some(a) = approval_named(e) {
                    self.answers.insert(a, e.id());
                }
            }
            EventType::RunKillRequested => {
                let reason = e
                    .payload
                    .get("reason")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                self.kill = Some((e.origin.to_string(), reason));
            }
            EventType::RunSuspended => {
                self.suspension = Some(Value::Object(e.payload.clone()));
                self.last_refusal_withdrawn = false;
                self.reconfiguration = None;
            }
            EventType::ReconfigurationRecorded => {
                let p = Value::Object(e.payload.clone());
                if let Some(new) = p.get("new") {
                    if let Some(b) = new.get("budget") {
                        let spec: BudgetSpec = serde_json::from_value(b.clone())
                            .map_err(|err| fail(format!("reconfiguration budget: {err}")))?;
                        self.budget.set_limits(limits_of(&spec));
                        if let Some(s) = self.spec.as_mut() {
                            s.budget = spec;
                        }
                    }
                    if let Some(a) = new.get("assumptions") {
                        self.assumptions = serde_json::from_value(a.clone())
                            .map_err(|err| fail(format!("reconfiguration assumptions: {err}")))?;
                    }
                    if let Some(v) = new.get("policy_version") {
                        self.policy_version = policy_version(Some(v))
                            .map_err(|err| fail(format!("reconfiguration policy: {err}")))?;
                    }
                }
                self.reconfiguration = Some((e.id(), p));
            }
            _ => {}
        }
        Ok(())
    }

    /// How long the execution window has been open, in microseconds, as the record's times
    /// say: its current (or last) opening up to when it closed, or up to `now` while it is
    /// open. This is what the spec's wall-time limit applies to (the runtime checks it between
    /// steps); `None` before the window first opens.
    pub fn window_elapsed_us(&self, now: Timestamp) -> Option<u64> {
        self.window.elapsed_us(now)
    }

    /// Fold a whole run.
    pub fn fold<'a>(
        run: RunId,
        events: impl IntoIterator<Item = &'a Event>,
    ) -> Result<Books, FoldError> {
        let mut b = Books::new(run);
        for e in events {
            b.apply(e)?;
        }
        Ok(b)
    }

    /// [`Books::projection`] as shown to an operator (the API's run view): an approval the
    /// runtime closed without an answer (its call denied, timed out or withdrawn, the run
    /// stopped) is `closed`, naming the denial that closed it and why, rather than `pending`.
    /// (The projection itself keeps its recorded form, so runs recorded before stay replayable.)
    pub fn view(&self) -> Value {
        let mut v = self.projection();
        v["approvals"] = Value::Array(self.approvals_json(true));
        // What a `denials` budget counts (not in the projection, whose recorded form older
        // runs' replays compare against).
        v["refusals"] = self.refusals.into();
        v
    }

    /// Each approval and its status; with `closed`, a pending one the runtime closed unanswered
    /// is `closed`, naming the denial that closed it and its reason code ([`Books::view`]).
    fn approvals_json(&self, closed: bool) -> Vec<Value> {
        self.approvals
            .iter()
            .map(|a| {
                let status = match &a.status {
                    ice_authority::ApprovalStatus::Pending => "pending",
                    ice_authority::ApprovalStatus::Granted { .. } => "granted",
                    ice_authority::ApprovalStatus::Mismatch { .. } => "mismatch",
                    ice_authority::ApprovalStatus::Denied { .. } => "denied",
                    ice_authority::ApprovalStatus::Used { .. } => "used",
                };
                match self.closed.get(&a.id) {
                    Some((denial, code, kind)) if closed && status == "pending" => {
                        let mut v = serde_json::json!({
                            "id": a.id.to_string(), "status": "closed",
                            "closed_by": denial.to_string(), "reason": code,
                        });
                        if let Some(kind) = kind {
                            v["closed_as"] = kind.as_str().into();
                        }
                        v
                    }
                    _ => serde_json::json!({"id": a.id.to_string(), "status": status}),
                }
            })
            .collect()
    }

    /// What the books hold, as plain data: the run's projection as `ice replay` compares it.
    /// The runtime records it in `RunTerminated` (the books as of the events before the
    /// teardown), so a replay that folds the log to something else is reported, naming the
    /// fields that differ.
    pub fn projection(&self) -> Value {
        let cost = |c: ice_kernel::Cost| serde_json::to_value(c).unwrap_or(Value::Null);
        let grants: Vec<Value> = self
            .grants
            .iter()
            .map(|g| {
                let status = match &g.status {
                    ice_authority::GrantStatus::Live => "live",
                    ice_authority::GrantStatus::Revoked { .. } => "revoked",
                    ice_authority::GrantStatus::Expired { .. } => "expired",
                };
                serde_json::json!({
                    "id": g.id.to_string(),
                    "capability": g.capability,
                    "resource": g.resource.entity_id(),
                    "effect": g.effect.as_str(),
                    "uses": g.uses,
                    "status": status,
                })
            })
            .collect();
        let approvals = self.approvals_json(false);
        let staged: BTreeMap<String, Value> = self
            .staged_view()
            .into_iter()
            .map(|(p, op)| (p, serde_json::json!(op.after.map(|d| d.to_hex()))))
            .collect();
        serde_json::json!({
            "state": self.state().to_string(),
            "events": self.next_seq(),
            "proposals": self.proposals,
            "denials": self.denials,
            "reservations": self.reservations,
            "spent": cost(self.budget.spent()),
            "outstanding": cost(self.budget.outstanding()),
            "grants": grants,
            "approvals": approvals,
            "staged": staged,
            "applied": self.applied,
            "policy_version": self.policy_version.map(|v| v.to_hex()),
        })
    }

    /// The staged view: each path's last op.
    pub fn staged_view(&self) -> BTreeMap<String, &StagedOp> {
        let mut m = BTreeMap::new();
        for op in &self.staged {
            m.insert(op.path.clone(), op);
        }
        m
    }
}

fn policy_version(v: Option<&Value>) -> Result<Option<PolicyVersion>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => PolicyVersion::from_hex(s).map(Some),
        Some(other) => Err(format!("expected a hex string, got {other}")),
    }
}

/// A staged op's `seen`, as `EffectStaged` records it: `"absent"`, or the file's digest and
/// size.
pub(crate) fn seen_json(seen: Option<ice_effects::FileState>) -> Value {
    match seen {
        None => Value::String("absent".into()),
        Some(s) => serde_json::json!({"digest": s.digest.to_hex(), "size": s.size}),
    }
}

fn seen_from_json(v: &Value) -> Result<Option<ice_effects::FileState>, String> {
    if v.as_str() == Some("absent") {
        return Ok(None);
    }
    ice_effects::FileState::deserialize(v)
        .map(Some)
        .map_err(|e| e.to_string())
}

/// What a `FileRead` of a whole file from the workspace saw: its path, digest and size (a
/// listing, a cut read or a read of the run's own staged content says nothing of it).
pub(crate) fn read_seen(
    p: &serde_json::Map<String, Value>,
) -> Option<(String, ice_effects::FileState)> {
    // A read whose output was withheld (the log could not carry it) was not shown to the agent.
    if p.get("is_error").and_then(Value::as_bool) == Some(true) {
        return None;
    }
    let file = p.get("evidence")?.get("file")?;
    if file.get("staged")?.as_bool()? || p.get("truncated")?.as_bool()? {
        return None;
    }
    let digest = Digest::from_hex(p.get("digest")?.as_str()?).ok()?;
    let size = p.get("size")?.as_u64()?;
    Some((
        p.get("path")?.as_str()?.to_string(),
        ice_effects::FileState { digest, size },
    ))
}

/// The payload of `EffectStaged`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StagedPayload {
    /// Workspace path.
    pub path: String,
    /// The effects layer's op.
    pub staged: Value,
    /// Digest after (absent: deleted).
    #[serde(default)]
    pub after: Option<Digest>,
    /// Bytes written.
    #[serde(default)]
    pub bytes: u64,
    /// Evidence from the effects layer.
    #[serde(default)]
    pub evidence: Value,
}
