//! Model-free replay (spec §9, I-002): rebuild a run from its log alone, and re-drive its agent
//! with the recorded inferences in place of the model.
//!
//! [`Runtime::replay`] reads a run's stored events and, without any network or model:
//! re-derives every event's canonical encoding and hash and checks the chain and the law (the
//! validator), checks every blob the run references, folds the events into the run's books
//! (lifecycle, grants, approvals, budget, staged writes) and compares the result with the
//! projection the runtime recorded in `RunTerminated`; it also checks that each model call's
//! settlement equals the usage its `InferenceStep` reports. Every difference is a
//! [`Divergence`].
//!
//! [`Runtime::replay_drive`] goes further: it shows the agent driver the views the run showed
//! it (built from the log: the outcome of each request is the output recorded with its effect
//! or its denial) and checks that the driver proposes the recorded sequence, then re-makes each
//! decision the runtime made (grant reuse, the policy decision under the policy files recorded
//! at context time or by the last `PolicyReloaded`, the revocations a reload made, the budget,
//! and each HTTP call's connection checks: every address its evidence lists, and the address a
//! refusal names, decided again with the budget left after the call's reservation) and checks
//! it matches the record. A model-driven agent is given
//! a model that answers from the recorded `InferenceStep`s (the caller builds it), so nothing
//! calls a model: this is a determinism check of ICE's own code and of the driver. The walk
//! goes through suspensions and resumptions: a resumed run continues the same agent, shown
//! first the outcome it had not seen when the run stopped.
//!
//! The same walk brings an agent back when a suspended run resumes in a new process
//! (`rebuild_agent`): an agent with a conversation ([`Agent::rebuild_from`]) is re-driven
//! through the record, its model calls answered from the recorded ones, so it continues the
//! conversation instead of starting over; a record it does not re-make is refused, never
//! papered over.

use std::collections::{HashMap, HashSet};

use ice_authority::payload::DenialCode;
use ice_authority::{DecisionKind, EffectClass, PolicySet, PolicySource, Request};
use ice_kernel::blob::{BLOB_KEY, blob_refs};
use ice_kernel::{
    Agent, AgentView, CapabilityProposal, Cost, Digest, Event, EventId, EventType, MountedMemory,
    Origin, Outcome, Proposal, RunHead, RunId, RunState, ToolOffer,
};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::act::{self, ToolLookup};
use crate::books::Books;
use crate::executor::tool_permitted;
use crate::{Runtime, RuntimeError};

/// A difference between what the log says and what replaying it gives.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Divergence {
    /// The event it was found at, when it is located at one.
    pub event: Option<String>,
    /// What differs.
    pub what: String,
}

/// What a replay rebuilt and found.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ReplayReport {
    /// The run.
    pub run: String,
    /// Events replayed.
    pub events: u64,
    /// The run's state, rebuilt.
    pub state: String,
    /// The rebuilt projection (the books as of the teardown, or of the last event).
    pub projection: Value,
    /// Whether the run recorded its projection (runs recorded before it did, and runs that
    /// have not ended, have none to compare with).
    pub compared: bool,
    /// Model calls recorded.
    pub inferences: u64,
    /// Blobs checked.
    pub blobs: u64,
    /// What differs (empty: the replay agrees with the record).
    pub divergences: Vec<Divergence>,
    /// What re-driving the agent checked (`replay_drive`).
    pub drive: Option<DriveReport>,
}

/// What re-driving the agent checked.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct DriveReport {
    /// Proposals the driver made that matched the record.
    pub proposals: u64,
    /// Model calls re-made from the record.
    pub inferences: u64,
    /// Decisions re-made and compared.
    pub decisions: u64,
    /// What could not be re-checked, and why (never silently skipped).
    pub unchecked: Vec<String>,
    /// The decision rules the run recorded when it began (`None`: recorded before runs recorded
    /// them; a resumption may record others from then on); the decisions were re-made by
    /// [`crate::DECISION_RULES`].
    pub decision_rules: Option<u64>,
}

impl Runtime {
    /// Replay a run from the log alone. See the module documentation.
    pub async fn replay(&self, run: &RunId) -> Result<ReplayReport, RuntimeError> {
        let log = self.ledger.log().clone();
        let mut stored = Vec::new();
        loop {
            let page = log.read_run(run, stored.len() as u64, 4096).await?;
            if page.is_empty() {
                break;
            }
            ice_log::after_page(run.as_str(), stored.len() as u64, &page)?;
            stored.extend(page);
        }
        if stored.is_empty() {
            return Err(RuntimeError::NoRun(run.to_string()));
        }
        let mut div = Vec::new();
        let mut events = Vec::with_capacity(stored.len());
        for s in &stored {
            match s.event() {
                Ok(e) => events.push(e),
                Err(e) => {
                    div.push(Divergence {
                        event: Some(format!("{}:{}", s.run_id, s.run_seq)),
                        what: e.to_string(),
                    });
                    break;
                }
            }
        }
        // Causes in other runs must exist in the log.
        let others: Vec<EventId> = events
            .iter()
            .flat_map(|e| e.causes.iter())
            .filter(|c| c.run_id != *run)
            .cloned()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let existing = log.existing(&others).await?;
        let mut head = RunHead::new(run.clone());
        let mut books = Books::new(run.clone());
        let mut snapshot: Option<Value> = None;
        let mut recorded: Option<Value> = None;
        let mut unreadable = false;
        let mut inferences = 0u64;
        let mut blobs = 0u64;
        // Reservation event → (the inference's usage, the inference event).
        let mut inferred: HashMap<EventId, (Cost, EventId)> = HashMap::new();
        let mut replayed = 0u64;
        for e in &events {
            let id = e.id();
            let at = |what: String| Divergence {
                event: Some(id.to_string()),
                what,
            };
            if let Err(err) = head.admit(e.clone(), &existing) {
                div.push(at(format!("the record does not replay: {err}")));
                break;
            }
            // Every comparison below reads the payload with its blobs put back (a large field,
            // the recorded projection among them, is a reference in the event): a blob that is
            // not stored or was altered is a divergence, and its field is read as unrecorded.
            let resolved = resolve(log.as_ref(), &e.payload).await?;
            blobs += resolved.refs;
            for problem in &resolved.problems {
                div.push(at(problem.clone()));
            }
            let inlined;
            let e = match resolved.payload {
                Some(payload) => {
                    inlined = Event {
                        payload,
                        ..e.clone()
                    };
                    &inlined
                }
                None => e,
            };
            let t = EventType::from_name(&e.event_type);
            if t == Some(EventType::ResourcesReleased) && snapshot.is_none() {
                snapshot = Some(books.projection());
            }
            if let Err(err) = books.apply(e) {
                div.push(at(format!("the run's books do not fold: {}", err.problem)));
                break;
            }
            replayed += 1;
            match t {
                Some(EventType::InferenceStep) => {
                    inferences += 1;
                    let usage = (e.cost.tokens_in, e.cost.tokens_out);
                    if let Some(u) = e.payload.get("usage").filter(|u| u.is_object()) {
                        let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
                        if (n("prompt_tokens"), n("completion_tokens")) != usage {
                            div.push(at(format!(
                                "the inference reports usage {}/{} tokens but is costed {}/{}",
                                n("prompt_tokens"),
                                n("completion_tokens"),
                                usage.0,
                                usage.1
                            )));
                        }
                    }
                    for c in &e.causes {
                        inferred.insert(c.clone(), (e.cost, id.clone()));
                    }
                }
                Some(EventType::BudgetSettled) => {
                    for c in &e.causes {
                        if let Some((usage, inference)) = inferred.get(c) {
                            let actual: Cost = e
                                .payload
                                .get("actual")
                                .and_then(|v| serde_json::from_value(v.clone()).ok())
                                .unwrap_or_default();
                            if (actual.tokens_in, actual.tokens_out)
                                != (usage.tokens_in, usage.tokens_out)
                            {
                                div.push(at(format!(
                                    "settles {}/{} tokens for inference {inference}, which used {}/{}",
                                    actual.tokens_in,
                                    actual.tokens_out,
                                    usage.tokens_in,
                                    usage.tokens_out
                                )));
                            }
                        }
                    }
                }
                Some(EventType::RunTerminated) => {
                    recorded = e.payload.get("projection").cloned();
                    // A projection still a blob reference (its blob missing, altered or the
                    // reference malformed) was recorded, but there is nothing to compare with:
                    // the blob's divergence says why.
                    unreadable = recorded
                        .as_ref()
                        .and_then(Value::as_object)
                        .is_some_and(|m| m.contains_key(BLOB_KEY));
                }
                _ => {}
            }
        }
        let projection = snapshot.clone().unwrap_or_else(|| books.projection());
        if let (Some(want), Some(got), false) = (&recorded, &snapshot, unreadable) {
            compare(want, got, "", &mut div);
        }
        Ok(ReplayReport {
            run: run.to_string(),
            events: replayed,
            state: books.state().to_string(),
            projection,
            compared: recorded.is_some(),
            inferences,
            blobs,
            divergences: div,
            drive: None,
        })
    }

    /// The recorded `InferenceStep` payloads of a run, in order, with their blobs put back:
    /// what a recorded model answers from.
    pub async fn recorded_inferences(
        &self,
        run: &RunId,
    ) -> Result<Vec<Map<String, Value>>, RuntimeError> {
        // A blob that cannot be put back is left a reference here: the replay reports it.
        let (events, _) = self.inlined(run).await?;
        Ok(events
            .into_iter()
            .filter(|e| e.event_type == EventType::InferenceStep.name())
            .map(|e| e.payload)
            .collect())
    }

    /// The spec a run was provisioned with; `None` for a run no agent drove (a memory
    /// maintenance run).
    pub async fn recorded_spec(&self, run: &RunId) -> Result<Option<crate::RunSpec>, RuntimeError> {
        // Folded with its blobs put back: a large spec is a blob reference in `RunProvisioned`.
        let (events, problems) = self.inlined(run).await?;
        if let Some(p) = problems.first() {
            return Err(RuntimeError::Invalid(p.what.clone()));
        }
        Ok(Books::fold(run.clone(), events.iter())?.spec)
    }

    /// A run's events with every blob reference replaced by its content, each blob checked
    /// against its reference; and what could not be put back (a blob not stored, altered, or
    /// not one JSON value), where the field keeps its reference.
    async fn inlined(&self, run: &RunId) -> Result<(Vec<Event>, Vec<Divergence>), RuntimeError> {
        let log = self.ledger.log().clone();
        let mut events = crate::read_run(log.as_ref(), run).await?;
        if events.is_empty() {
            return Err(RuntimeError::NoRun(run.to_string()));
        }
        let mut problems = Vec::new();
        for e in &mut events {
            let resolved = resolve(log.as_ref(), &e.payload).await?;
            problems.extend(resolved.problems.into_iter().map(|what| Divergence {
                event: Some(e.id().to_string()),
                what,
            }));
            if let Some(payload) = resolved.payload {
                e.payload = payload;
            }
        }
        Ok((events, problems))
    }

    /// Replay a run (as [`Self::replay`]) and re-drive its agent from the record. See the
    /// module documentation.
    pub async fn replay_drive(
        &self,
        run: &RunId,
        agent: &mut dyn Agent,
    ) -> Result<ReplayReport, RuntimeError> {
        let mut report = self.replay(run).await?;
        if !report.divergences.is_empty() {
            report.drive = Some(DriveReport {
                unchecked: vec!["the agent was not re-driven: the record itself diverges".into()],
                ..DriveReport::default()
            });
            return Ok(report);
        }
        let not_driven = |report: &mut ReplayReport, divergences: Vec<Divergence>| {
            report.divergences.extend(divergences);
            report.drive = Some(DriveReport {
                unchecked: vec!["the agent was not re-driven: the record itself diverges".into()],
                ..DriveReport::default()
            });
        };
        // The replay checked every blob; one that changed since is reported the same way.
        let (events, problems) = self.inlined(run).await?;
        if !problems.is_empty() {
            not_driven(&mut report, problems);
            return Ok(report);
        }
        let memories = match self.mounted_memories(&events).await {
            Ok(m) => m,
            Err(RuntimeError::Invalid(what)) => {
                not_driven(&mut report, vec![Divergence { event: None, what }]);
                return Ok(report);
            }
            Err(e) => return Err(e),
        };
        let mut d = Drive::new(self, run, &events, memories);
        d.walk(agent);
        report.divergences.extend(d.div);
        report.drive = Some(d.report);
        Ok(report)
    }

    /// Before a suspended run resumes: bring an agent that keeps state between proposals (an
    /// LLM's conversation) back to where the run stopped, by re-driving it through the run's
    /// record with its model calls answered from the recorded ones (see
    /// [`Agent::rebuild_from`]). Returns the outcome the agent has not been shown yet (the
    /// resumed run shows it first). An agent that keeps no such state is left as it is.
    pub(crate) async fn rebuild_agent(
        &self,
        run: &RunId,
        agent: &mut dyn Agent,
        memories: Vec<MountedMemory>,
    ) -> Result<Option<Outcome>, RuntimeError> {
        let (events, problems) = self.inlined(run).await?;
        if let Some(p) = problems.first() {
            return Err(RuntimeError::State {
                run: run.to_string(),
                state: RunState::Suspended,
                what: format!(
                    "the agent cannot be brought back to where the run stopped, so it is not resumed: at {}: {}",
                    p.event.as_deref().unwrap_or("?"),
                    p.what
                ),
            });
        }
        let recorded = events
            .iter()
            .filter(|e| e.event_type == EventType::InferenceStep.name())
            .map(|e| e.payload.clone())
            .collect();
        if !agent.rebuild_from(recorded) {
            return Ok(None);
        }
        let mut d = Drive::new(self, run, &events, memories);
        let pending = d.walk(agent);
        let rebuilt = agent.rebuilt();
        let refuse = |why: String| RuntimeError::State {
            run: run.to_string(),
            state: RunState::Suspended,
            what: format!(
                "the agent cannot be brought back to where the run stopped, so it is not resumed: {why}"
            ),
        };
        if let Some(d) = d.div.first() {
            let at = d
                .event
                .as_deref()
                .map(|e| format!(" at {e}"))
                .unwrap_or_default();
            return Err(refuse(format!(
                "re-driving it through the record diverges{at}: {}",
                d.what
            )));
        }
        rebuilt.map_err(|e| refuse(e.0))?;
        if let Some(e) = events[d.i.min(events.len())..].iter().find(|e| {
            matches!(e.origin, Origin::Agent(_)) || e.event_type == EventType::InferenceStep.name()
        }) {
            return Err(refuse(format!(
                "the re-drive stopped before {} {}",
                e.event_type,
                e.id()
            )));
        }
        Ok(pending)
    }

    /// The memories a run's `MemoryMounted` lists, as its agent was shown them (a resumed run
    /// shows them again; a replay shows the re-driven agent the same).
    pub(crate) async fn mounted_memories(
        &self,
        events: &[Event],
    ) -> Result<Vec<MountedMemory>, RuntimeError> {
        let mut memories = Vec::new();
        if let Some(m) = events
            .iter()
            .find(|e| e.event_type == EventType::MemoryMounted.name())
        {
            for item in m
                .payload
                .get("memories")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                memories.push(self.mounted(item).await?);
            }
        }
        Ok(memories)
    }

    /// A memory listed by `MemoryMounted`, as the agent was shown it (from its
    /// `MemoryPromoted` event).
    async fn mounted(&self, item: &Value) -> Result<MountedMemory, RuntimeError> {
        let id = item.get("id").and_then(Value::as_str).unwrap_or_default();
        let bad = |why: &str| RuntimeError::Invalid(format!("mounted memory {id:?}: {why}"));
        let eid: EventId = id.parse().map_err(|_| bad("not an event id"))?;
        let stored = self
            .ledger
            .log()
            .get(&eid)
            .await?
            .ok_or_else(|| bad("its MemoryPromoted event is not in the log"))?;
        let mut e = stored.event()?;
        let resolved = resolve(self.ledger.log().as_ref(), &e.payload).await?;
        if let Some(p) = resolved.problems.first() {
            return Err(bad(&format!("its MemoryPromoted event {}: {p}", e.id())));
        }
        if let Some(payload) = resolved.payload {
            e.payload = payload;
        }
        let content = e.payload.get("content").cloned().unwrap_or(Value::Null);
        let digest = item
            .get("digest")
            .and_then(Value::as_str)
            .and_then(|h| Digest::from_hex(h).ok())
            .unwrap_or_else(|| {
                Digest::of(&ice_kernel::canonical::canonicalize(&content).unwrap_or_default())
            });
        Ok(MountedMemory {
            id: id.to_string(),
            kind: e
                .payload
                .get("kind")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            content,
            digest,
            confidence: e
                .payload
                .get("confidence")
                .and_then(Value::as_f64)
                .unwrap_or(1.0),
        })
    }
}

/// A payload with its blobs put back (see [`resolve`]).
pub(crate) struct Resolved {
    /// The payload with every field whose blob checks out put back; `None` when it has no
    /// blob reference (the payload as stored is the whole of it).
    pub(crate) payload: Option<Map<String, Value>>,
    /// Blob references found.
    refs: u64,
    /// What could not be put back, and why, naming the field and the blob (that field keeps
    /// its reference).
    pub(crate) problems: Vec<String>,
}

/// Put back the payload fields the kernel moved to blobs (`{"$blob": digest, "size": n}`), from
/// the log. A blob is put back only if it is stored, hashes to its reference's digest, has the
/// size the reference records, and is one JSON value; otherwise the field keeps its reference
/// and the problem is returned (never an error: the caller reports it as a divergence).
pub(crate) async fn resolve(
    log: &dyn ice_log::EventLog,
    payload: &Map<String, Value>,
) -> Result<Resolved, ice_log::LogError> {
    let mut out = Resolved {
        payload: None,
        refs: 0,
        problems: Vec::new(),
    };
    let refs = match blob_refs(payload) {
        Ok(refs) => refs,
        Err(err) => {
            out.problems.push(format!("blob references: {err}"));
            return Ok(out);
        }
    };
    for r in refs {
        out.refs += 1;
        let hex = r.digest.to_hex();
        let field = &r.field;
        let value = match log.blob(&r.digest).await? {
            None => Err(format!(
                "payload field {field:?} names blob {hex} that is not stored"
            )),
            Some(b) if Digest::of(&b) != r.digest => {
                Err(format!("blob {hex} of payload field {field:?} was altered"))
            }
            Some(b) if b.len() as u64 != r.size => Err(format!(
                "blob {hex} of payload field {field:?} is {} bytes; its reference says {}",
                b.len(),
                r.size
            )),
            Some(b) => serde_json::from_slice::<Value>(&b).map_err(|err| {
                format!("blob {hex} of payload field {field:?} is not one JSON value: {err}")
            }),
        };
        match value {
            Ok(v) => {
                out.payload
                    .get_or_insert_with(|| payload.clone())
                    .insert(r.field, v);
            }
            Err(problem) => out.problems.push(problem),
        }
    }
    Ok(out)
}

/// Compare a recorded projection with a rebuilt one, naming each field that differs.
fn compare(want: &Value, got: &Value, path: &str, div: &mut Vec<Divergence>) {
    match (want, got) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                compare(
                    a.get(k).unwrap_or(&Value::Null),
                    b.get(k).unwrap_or(&Value::Null),
                    &p,
                    div,
                );
            }
        }
        _ if want != got => div.push(Divergence {
            event: None,
            what: format!(
                "projection {path}: the run recorded {}, the replay rebuilds {}",
                cut_json(want),
                cut_json(got)
            ),
        }),
        _ => {}
    }
}

/// Tools as `CapabilitiesBound` recorded them.
struct Bound<'a>(&'a [Value]);

impl Bound<'_> {
    fn find(&self, server: &str, tool: &str) -> Option<&Value> {
        let name = format!("{server}/{tool}");
        self.0
            .iter()
            .find(|t| t.get("tool").and_then(Value::as_str) == Some(&name))
    }
}

impl ToolLookup for Bound<'_> {
    fn hint(&self, server: &str, tool: &str) -> Result<Option<EffectClass>, (DenialCode, String)> {
        match self.find(server, tool) {
            Some(t) => Ok(t
                .get("hint")
                .and_then(Value::as_str)
                .and_then(|h| h.parse().ok())),
            None => Err((
                DenialCode::InvalidTarget,
                format!("tool server {server:?} has no tool {tool:?}"),
            )),
        }
    }
}

/// The walk through a run's record, driving the agent.
struct Drive<'a> {
    rt: &'a Runtime,
    run: RunId,
    events: &'a [Event],
    i: usize,
    books: Books,
    policy: Option<PolicySet>,
    /// Whether the run began under taxonomy v2 or later, which records every policy reload
    /// (v1 recorded none that revoked nothing).
    records_reloads: bool,
    /// The decision rules the run recorded (`None`: recorded before runs recorded them); see
    /// [`crate::DECISION_RULES`].
    rules: Option<u64>,
    agent: String,
    tools: Vec<Value>,
    memories: Vec<MountedMemory>,
    /// Each HTTP call's request, with the budget left once its reservation was made (what its
    /// connection checks saw), from its `CapabilityUsed` on.
    http_calls: HashMap<EventId, ice_authority::BudgetLeft>,
    report: DriveReport,
    div: Vec<Divergence>,
}

/// Where the walk stopped folding: the next thing the agent (or the end of its window) explains.
enum Stop {
    /// An agent event, a reservation for a model call, or a refusal of an unrecordable request.
    Proposal,
    /// The window closed for validation: the agent finished.
    Finished,
    /// The run stopped; the detail says why (the agent may have caused it).
    Stopped { code: String, detail: String },
    /// The record ends.
    End,
}

impl<'a> Drive<'a> {
    /// A walk from the start of `events`, the record of `run`.
    fn new(
        rt: &'a Runtime,
        run: &RunId,
        events: &'a [Event],
        memories: Vec<MountedMemory>,
    ) -> Drive<'a> {
        Drive {
            rt,
            run: run.clone(),
            events,
            i: 0,
            books: Books::new(run.clone()),
            policy: None,
            records_reloads: false,
            rules: Some(crate::DECISION_RULES),
            agent: String::new(),
            tools: Vec::new(),
            memories,
            http_calls: HashMap::new(),
            report: DriveReport::default(),
            div: Vec::new(),
        }
    }

    fn diverge(&mut self, what: String) {
        let event = self.events.get(self.i).map(|e| e.id().to_string());
        self.div.push(Divergence { event, what });
    }

    /// A re-made decision differs from the record. Under the run's own decision rules that is
    /// a divergence (`true`: the walk stops); under other rules it may be the rules' change, so
    /// it is listed as not checked, saying so, and the walk follows the record (`false`).
    fn decision_differs(&mut self, what: String) -> bool {
        if self.rules == Some(crate::DECISION_RULES) {
            self.diverge(what);
            return true;
        }
        let at = self
            .events
            .get(self.i)
            .map(|e| format!(" (at {})", e.id()))
            .unwrap_or_default();
        self.report.unchecked.push(format!(
            "{what}{at}: {}, so the difference may be the rules' change",
            self.rules_text()
        ));
        false
    }

    /// Say, once the rules in force differ from this ICE's, that decisions which come out
    /// otherwise are listed as not checked.
    fn note_rules(&mut self) {
        if self.rules != Some(crate::DECISION_RULES) {
            let note = format!(
                "decisions: {}; a decision that comes out otherwise is listed here, not as a divergence",
                self.rules_text()
            );
            self.report.unchecked.push(note);
        }
    }

    /// Under which rules the run was recorded, against this ICE's.
    fn rules_text(&self) -> String {
        match self.rules {
            Some(r) => format!(
                "the run was recorded under decision rules {r}; this ICE decides by rules {}",
                crate::DECISION_RULES
            ),
            None => format!(
                "the run was recorded before ICE recorded its decision rules; this ICE decides by rules {}",
                crate::DECISION_RULES
            ),
        }
    }

    fn fold(&mut self) {
        let e = &self.events[self.i];
        // The replay already folded these events once; this cannot fail differently.
        let _ = self.books.apply(e);
        match EventType::from_name(&e.event_type) {
            Some(EventType::RunProvisioned) => {
                self.records_reloads = e
                    .payload
                    .get("taxonomy")
                    .and_then(Value::as_u64)
                    .is_some_and(|v| v >= 2);
                self.rules = e.payload.get("decision_rules").and_then(Value::as_u64);
                self.report.decision_rules = self.rules;
                self.note_rules();
                self.agent = e
                    .payload
                    .get("agent")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
            }
            // A run resumed by another ICE decides from then on by that ICE's rules.
            Some(EventType::RunResumed) => {
                let rules = e.payload.get("decision_rules").and_then(Value::as_u64);
                if rules.is_some() && rules != self.rules {
                    self.rules = rules;
                    self.note_rules();
                }
            }
            Some(EventType::ContextResolved) => {
                if e.payload.contains_key("policy_sources") {
                    self.take_recorded_policy(e);
                } else {
                    self.report.unchecked.push(
                        "policy decisions: the run did not record its policy files (recorded by an older ICE)".into(),
                    );
                }
            }
            Some(EventType::PolicyReloaded) => {
                self.take_recorded_policy(e);
                self.check_reload_revocations(e);
            }
            Some(EventType::CapabilityRevoked) if self.records_reloads => {
                // A revocation names the policy it was re-decided under: the one in force.
                let named = e.payload.get("policy_version").and_then(Value::as_str);
                if let (Some(named), Some(policy)) = (named, &self.policy)
                    && named != policy.version().to_hex()
                {
                    self.diverge(format!(
                        "a revocation names policy version {named}, but the record has version {} in force here",
                        policy.version().to_hex()
                    ));
                }
            }
            Some(EventType::CapabilityUsed)
                if e.payload.get("capability").and_then(Value::as_str) == Some("http.request") =>
            {
                if let Some(req) = e.causes.first() {
                    self.http_calls
                        .insert(req.clone(), self.books.budget.left());
                }
            }
            Some(EventType::APIRequestExecuted) => self.check_connections_made(e),
            Some(EventType::CapabilityDenied)
                if e.payload.contains_key("address") || e.payload.contains_key("addresses") =>
            {
                let req = e
                    .payload
                    .get("request")
                    .and_then(Value::as_str)
                    .and_then(|r| r.parse::<EventId>().ok());
                if e.payload.contains_key("addresses") {
                    let addresses = e.payload.get("addresses").and_then(Value::as_array);
                    self.check_let_through(e, req.as_ref(), addresses);
                }
                if e.payload.contains_key("address") {
                    self.check_connection_refused(e);
                }
            }
            Some(EventType::CapabilitiesBound) => {
                self.tools = e
                    .payload
                    .get("tools")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
            }
            _ => {}
        }
        self.i += 1;
    }

    /// The connection checks of the HTTP call whose request is `req`, as the live run made
    /// them: its proposal from the record, resolved as the runtime resolves it, and the budget
    /// left once its reservation was made.
    fn connection_call(&self, req: &EventId) -> Result<act::ConnectionCall, String> {
        let requested = self
            .events
            .get(usize::try_from(req.run_seq).unwrap_or(usize::MAX))
            .filter(|x| x.id() == *req)
            .or_else(|| self.events.iter().find(|x| x.id() == *req))
            .filter(|x| x.event_type == EventType::CapabilityRequested.name())
            .ok_or_else(|| format!("its request {req} is not in the record"))?;
        // The principal is the agent that asked (a resumed run's driver may be named anew).
        let ice_kernel::Origin::Agent(agent) = &requested.origin else {
            return Err(format!("its request {req} is not an agent's"));
        };
        let agent = agent.clone();
        let proposal = CapabilityProposal::recorded(requested);
        let spec = self.books.spec.as_ref().ok_or("no recorded spec")?;
        // The call was performed under the run's rules: its connections are re-checked
        // whatever this ICE's rules say of its arguments (that is the decision's business).
        let (resource, _, target) = act::resolve_resource(
            &self.rt.registry,
            &proposal,
            &spec.servers,
            &Bound(&self.tools),
        )
        .map_err(|(_, why)| format!("its target does not resolve: {why}"))?;
        let budget_left = *self
            .http_calls
            .get(req)
            .ok_or_else(|| format!("no grant use of request {req} is recorded"))?;
        Ok(act::ConnectionCall {
            registry: self.rt.registry.clone(),
            entities: self.rt.entities.clone(),
            run: self.run.clone(),
            agent,
            resource,
            intent: proposal.intent.clone(),
            arguments: act::policy_arguments(&proposal.capability, &proposal.arguments, &target),
            budget_left,
        })
    }

    /// An HTTP call that was made: under a policy that checks connections, each address its
    /// evidence lists must be one the recorded policy lets it connect to.
    fn check_connections_made(&mut self, e: &Event) {
        let addresses = e
            .payload
            .get("evidence")
            .and_then(|v| v.get("http"))
            .and_then(|v| v.get("addresses"))
            .and_then(Value::as_array);
        self.check_let_through(e, e.causes.first(), addresses);
    }

    /// The addresses an HTTP call's resolution let through (`addresses`, of the call `req`
    /// that `e` records) must be ones the recorded policy lets it connect to, when that policy
    /// checks connections.
    fn check_let_through(
        &mut self,
        e: &Event,
        req: Option<&EventId>,
        addresses: Option<&Vec<Value>>,
    ) {
        let Some(policy) = &self.policy else {
            self.report.unchecked.push(format!(
                "connection checks of {}: the run's policy files are not in the record",
                e.id()
            ));
            return;
        };
        if !policy.checks_connections() {
            return;
        }
        let (Some(addresses), Some(req)) = (addresses, req) else {
            self.report.unchecked.push(format!(
                "connection checks of {}: the call's record does not list the addresses it resolved to",
                e.id()
            ));
            return;
        };
        let call = match self.connection_call(req) {
            Ok(c) => c,
            Err(why) => {
                self.diverge(format!("the connection checks cannot be re-made: {why}"));
                return;
            }
        };
        // Each problem, and whether it is a decision that came out otherwise.
        let mut problems = Vec::new();
        let mut decided = 0;
        for a in addresses {
            let Some(ip) = a.as_str().and_then(|t| t.parse::<std::net::IpAddr>().ok()) else {
                problems.push((false, format!("the recorded address {a} does not read")));
                continue;
            };
            match call.decide(policy, ip) {
                Ok(None) => decided += 1,
                Ok(Some(d)) => problems.push((
                    true,
                    format!(
                        "the recorded policy refuses connecting to {ip} ({d}); the run let it through"
                    ),
                )),
                Err(err) => {
                    problems.push((false, format!("the connection check of {ip}: {err}")))
                }
            }
        }
        self.report.decisions += decided;
        for (decision, p) in problems {
            if decision {
                self.decision_differs(p);
            } else {
                self.diverge(p);
            }
        }
    }

    /// A connection the live run refused: the recorded policy must refuse it too, by the same
    /// forbids.
    fn check_connection_refused(&mut self, e: &Event) {
        let Some(policy) = &self.policy else {
            self.report.unchecked.push(format!(
                "the refused connection of {}: the run's policy files are not in the record",
                e.id()
            ));
            return;
        };
        let address = e.payload.get("address").and_then(Value::as_str);
        let req = e
            .payload
            .get("request")
            .and_then(Value::as_str)
            .and_then(|r| r.parse::<EventId>().ok());
        let recorded: Vec<String> = e
            .payload
            .get("policies")
            .and_then(|p| serde_json::from_value(p.clone()).ok())
            .unwrap_or_default();
        let (Some(ip), Some(req)) = (address.and_then(|a| a.parse().ok()), req) else {
            self.diverge("a refused connection names no readable address or request".into());
            return;
        };
        let refusal = self.connection_call(&req).and_then(|call| {
            call.decide(policy, ip)
                .map_err(|err| format!("the connection check of {ip}: {err}"))
        });
        match refusal {
            Ok(Some(d)) if d.determining_policies() == recorded.as_slice() => {
                self.report.decisions += 1;
            }
            Ok(Some(d)) => {
                self.decision_differs(format!(
                    "the recorded policy refuses connecting to {ip} by {:?}; the run recorded {recorded:?}",
                    d.determining_policies()
                ));
            }
            Ok(None) => {
                self.decision_differs(format!(
                    "the recorded policy lets the call connect to {ip}; the run refused it ({recorded:?})"
                ));
            }
            Err(why) => self.diverge(format!("the connection check cannot be re-made: {why}")),
        }
    }

    /// Load the policy files an event recorded (`ContextResolved`, `PolicyReloaded`): later
    /// requests are re-decided under them. Files that do not load, or that hash to another
    /// version than the event says, are a divergence.
    fn take_recorded_policy(&mut self, e: &Event) {
        let sources = e
            .payload
            .get("policy_sources")
            .map(|v| Vec::<PolicySource>::deserialize(v).map_err(|err| err.to_string()))
            .unwrap_or_else(|| Err("missing".into()));
        let sources = match sources {
            Ok(s) => s,
            Err(err) => {
                self.policy = None;
                self.diverge(format!("the recorded policy files do not read: {err}"));
                return;
            }
        };
        match PolicySet::from_sources(&sources, &self.rt.schema) {
            Ok(p) => {
                let want = e.payload.get("policy_version").and_then(Value::as_str);
                if want != Some(p.version().to_hex().as_str()) {
                    self.diverge(format!(
                        "the recorded policy files hash to version {}, not the recorded {}",
                        p.version().to_hex(),
                        want.unwrap_or("(none)")
                    ));
                }
                self.policy = Some(p);
            }
            Err(err) => {
                self.policy = None;
                self.diverge(format!("the recorded policy files no longer load: {err}"));
            }
        }
    }

    /// A reload re-decides the live grants: those the new policy no longer permits (or limits
    /// more tightly) are revoked, in the same batch, by events it caused, and no others.
    fn check_reload_revocations(&mut self, e: &Event) {
        let Some(policy) = &self.policy else { return };
        let reload = e.id();
        let mut revoked = Vec::new();
        for x in &self.events[self.i + 1..] {
            if x.event_type != EventType::CapabilityRevoked.name() || !x.causes.contains(&reload) {
                break;
            }
            revoked.push(
                x.payload
                    .get("grant")
                    .and_then(Value::as_str)
                    .and_then(|g| g.parse::<EventId>().ok()),
            );
        }
        let verdict = |g: &ice_authority::Grant| {
            crate::executor::reload_verdict(&self.rt.registry, &self.run, policy, g)
        };
        // Each finding, and whether it is a decision re-made (which other rules may explain).
        let mut found = Vec::new();
        for g in &revoked {
            match g.as_ref().and_then(|g| self.books.grants.get(g)) {
                None => found.push((
                    false,
                    format!(
                        "the reload revokes {}, which is no grant of the run",
                        g.as_ref().map_or("an unnamed grant".into(), |g| g.to_string())
                    ),
                )),
                Some(grant) if verdict(grant).is_none() => found.push((
                    true,
                    format!(
                        "the reload revokes grant {}, which the new policy still permits as it was given",
                        grant.id
                    ),
                )),
                Some(_) => {}
            }
        }
        for g in self.books.grants.live(e.at) {
            if !revoked.contains(&Some(g.id.clone()))
                && let Some(why) = verdict(g)
            {
                found.push((
                    true,
                    format!("the run kept grant {} after the reload ({why})", g.id),
                ));
            }
        }
        for (decision, what) in found {
            if decision {
                self.decision_differs(what);
            } else {
                self.diverge(what);
            }
        }
    }

    /// Fold until the next thing a proposal explains.
    fn advance(&mut self) -> Stop {
        while let Some(e) = self.events.get(self.i) {
            let t = EventType::from_name(&e.event_type);
            let window_open = self.books.state() == RunState::Executing;
            if window_open {
                if matches!(e.origin, Origin::Agent(_)) || t == Some(EventType::BudgetReserved) {
                    return Stop::Proposal;
                }
                if t == Some(EventType::CapabilityDenied) && !e.payload.contains_key("request") {
                    return Stop::Proposal;
                }
                match t {
                    Some(EventType::ValidationStarted) => return Stop::Finished,
                    Some(EventType::RunSuspended) | Some(EventType::RunAborted) => {
                        let code = e
                            .payload
                            .get("reason")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string();
                        let detail = self
                            .events
                            .iter()
                            .skip(self.i)
                            .find_map(|x| {
                                x.payload
                                    .get("detail")
                                    .and_then(Value::as_str)
                                    .map(str::to_string)
                            })
                            .unwrap_or_default();
                        return Stop::Stopped { code, detail };
                    }
                    _ => {}
                }
            }
            self.fold();
        }
        Stop::End
    }

    fn view(&self, last: Option<Outcome>) -> AgentView {
        // The tools offered depend on the policy and the books only (not on live grants), so
        // the record re-makes them exactly.
        let mut tools = Vec::new();
        if let (Some(policy), Some(spec)) = (&self.policy, &self.books.spec) {
            for t in &self.tools {
                let name = t.get("tool").and_then(Value::as_str).unwrap_or("");
                let Some((server, tool)) = name.split_once('/') else {
                    continue;
                };
                if !spec.servers.iter().any(|s| s.name == server) {
                    continue;
                }
                let class = |k: &str| {
                    t.get(k)
                        .and_then(Value::as_str)
                        .and_then(|c| c.parse().ok())
                };
                let assigned: EffectClass = class("assigned").unwrap_or(EffectClass::External);
                if tool_permitted(
                    &self.rt.registry,
                    policy,
                    &self.books,
                    &self.agent,
                    (server, tool),
                    (assigned, class("hint")),
                ) {
                    tools.push(ToolOffer {
                        target: name.to_string(),
                        description: t
                            .get("description")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_string(),
                        input_schema: t.get("input_schema").cloned().unwrap_or(Value::Null),
                        effect: t
                            .get("effect")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_string(),
                    });
                }
            }
        }
        AgentView {
            run_id: self.run.clone(),
            step: self.books.proposals,
            capabilities: self.rt.capability_list(),
            last,
            memories: self.memories.clone(),
            tools,
            // Not what the run had: a recording answers whatever the bound.
            time_left_ms: None,
        }
    }

    /// Drive `agent` through the record: each proposal is checked against what the run
    /// recorded and answered with the recorded outcome. The walk goes on through suspensions
    /// and resumptions (a resumed run continues the same agent) and stops at the end of the
    /// record, at a divergence, or where the run ended. Returns the outcome the agent has not
    /// been shown yet (the answer to its last request, when the run stopped before asking it
    /// again), which a resumed run shows it first.
    fn walk(&mut self, agent: &mut dyn Agent) -> Option<Outcome> {
        if agent.id() != self.agent && !self.agent.is_empty() {
            self.report.unchecked.push(format!(
                "the driver calls itself {:?}; the run was driven as {:?}",
                agent.id(),
                self.agent
            ));
        }
        let mut last: Option<Outcome> = None;
        loop {
            let stop = self.advance();
            if let Stop::End = stop {
                if self.books.state() == RunState::Executing {
                    self.report
                        .unchecked
                        .push("the record ends while the run executes (it never finished)".into());
                }
                return last;
            }
            if self.books.state() != RunState::Executing {
                return last;
            }
            // Where the run stopped, it asked the agent again only if the agent failed or its
            // model call did not fit the budget; otherwise (a request that exhausted the
            // budget, a crash, a changed assumption, a kill) the agent was not asked, and what
            // it was last told waits for its first proposal after a resume.
            let suspended = self.events[self.i].event_type == EventType::RunSuspended.name();
            if let Stop::Stopped { code, detail } = &stop {
                let asked = code == "agent_failed"
                    || (code == "budget_exhausted" && detail.contains("model call was not made"));
                if !asked {
                    if !suspended {
                        return last;
                    }
                    self.fold();
                    continue;
                }
            }
            let view = self.view(last.take());
            let proposal = agent.propose(&view);
            match (stop, proposal) {
                (Stop::Stopped { code, detail }, Err(e)) if code == "agent_failed" => {
                    if !detail.contains(&e.0) {
                        self.diverge(format!(
                            "the driver failed with {:?}; the run recorded {detail:?}",
                            e.0
                        ));
                    }
                    self.report.proposals += 1;
                    return last;
                }
                (_, Err(e)) => {
                    self.diverge(format!("the driver failed where the run did not: {}", e.0));
                    return last;
                }
                (Stop::Finished, Ok(Proposal::Finish { .. })) => {
                    self.report.proposals += 1;
                    return last;
                }
                (Stop::Stopped { code, detail }, Ok(Proposal::Infer { reserve }))
                    if code == "budget_exhausted" && detail.contains("model call was not made") =>
                {
                    let id = format!("r{}", self.books.reservations + 1);
                    if self.books.budget.check_reserve(&id, reserve).is_ok() {
                        self.diverge(format!(
                            "the run refused a model call for its budget, but a reservation of {} fits the replayed budget",
                            cost_text(&reserve)
                        ));
                    }
                    self.report.proposals += 1;
                    self.report.decisions += 1;
                    if !suspended {
                        return last;
                    }
                    self.fold();
                }
                (Stop::Stopped { code, detail }, Ok(p)) => {
                    self.report.unchecked.push(format!(
                        "the run stopped ({code}: {detail}) before the driver's next proposal ({})",
                        proposal_name(&p)
                    ));
                    return last;
                }
                (Stop::Finished, Ok(p)) => {
                    self.diverge(format!(
                        "the driver proposes {} where the agent finished",
                        proposal_name(&p)
                    ));
                    return last;
                }
                (Stop::Proposal, Ok(p)) => {
                    if !self.proposal(agent, &view, p, &mut last) {
                        return last;
                    }
                }
                (Stop::End, _) => return last,
            }
        }
    }

    /// Check one proposal against the record at the cursor; false stops the walk.
    fn proposal(
        &mut self,
        agent: &mut dyn Agent,
        view: &AgentView,
        p: Proposal,
        last: &mut Option<Outcome>,
    ) -> bool {
        let e = &self.events[self.i];
        let t = EventType::from_name(&e.event_type);
        match p {
            Proposal::Think { .. } => {
                let Some(draft) = p.draft(&self.agent) else {
                    return false;
                };
                if draft.event_type != e.event_type
                    || draft.intent != e.intent
                    || !same(
                        &Value::Object(e.payload.clone()),
                        &Value::Object(draft.payload.clone()),
                    )
                {
                    self.diverge(format!(
                        "the driver proposes {} where the run recorded {}",
                        draft.event_type, e.event_type
                    ));
                    return false;
                }
                self.report.proposals += 1;
                self.fold();
                true
            }
            Proposal::Infer { reserve } => {
                if t != Some(EventType::BudgetReserved) {
                    self.diverge(format!(
                        "the driver asks for a model call where the run recorded {}",
                        e.event_type
                    ));
                    return false;
                }
                let amount: Cost = e
                    .payload
                    .get("amount")
                    .and_then(|v| serde_json::from_value(v.clone()).ok())
                    .unwrap_or_default();
                if amount != reserve {
                    self.diverge(format!(
                        "the driver reserves {} for its model call; the run reserved {}",
                        cost_text(&reserve),
                        cost_text(&amount)
                    ));
                    return false;
                }
                let id = format!("r{}", self.books.reservations + 1);
                if let Err(refusal) = self.books.budget.check_reserve(&id, reserve) {
                    self.diverge(format!(
                        "the run reserved a model call the replayed budget refuses: {refusal}"
                    ));
                    return false;
                }
                self.report.proposals += 1;
                self.report.decisions += 1;
                self.fold();
                // An operator acts while the model call runs (a kill is recorded at once; the
                // run stops once the call returns, or at once if its process is gone).
                let mut kill = None;
                while let Some(e) = self.events.get(self.i)
                    && matches!(e.origin, Origin::Operator(_))
                {
                    if e.event_type == EventType::RunKillRequested.name() {
                        kill = Some(describe(e));
                    }
                    self.fold();
                }
                let Some(rec) = self.events.get(self.i) else {
                    // The run is still waiting for the reply, or its process stopped during
                    // the call and the run was not recovered yet.
                    self.report
                        .unchecked
                        .push("the record ends during a model call (no reply was recorded)".into());
                    return false;
                };
                let stopped = rec.event_type == EventType::RunSuspended.name()
                    || (kill.is_some()
                        && rec.event_type != EventType::InferenceStep.name()
                        && rec.event_type != EventType::BudgetSettled.name());
                if stopped {
                    // The process stopped during the model call (recovery suspended the run,
                    // or an operator's kill ended it): no reply was recorded, and the agent,
                    // asked again after a resume, proposes the same call.
                    self.report.unchecked.push(format!(
                        "a model call was interrupted by {} (no reply was recorded)",
                        kill.unwrap_or_else(|| describe(rec))
                    ));
                    return true;
                }
                let inference = agent.infer(view);
                match inference {
                    Err(err) => {
                        if rec.event_type == EventType::InferenceStep.name() {
                            self.diverge(format!(
                                "the driver's model call failed ({}); the run recorded an inference",
                                err.0
                            ));
                            return false;
                        }
                    }
                    Ok(inf) => {
                        if rec.event_type != EventType::InferenceStep.name() {
                            self.diverge(format!(
                                "the driver recorded an inference; the run recorded {}",
                                rec.event_type
                            ));
                            return false;
                        }
                        if !same(
                            &Value::Object(inf.payload.clone()),
                            &Value::Object(rec.payload.clone()),
                        ) || Some(&inf.intent) != rec.intent.as_ref()
                        {
                            let what = first_difference(&rec.payload, &inf.payload);
                            self.diverge(format!(
                                "the re-driven inference differs from the recorded one: {what}"
                            ));
                            return false;
                        }
                        if (inf.usage.tokens_in, inf.usage.tokens_out)
                            != (rec.cost.tokens_in, rec.cost.tokens_out)
                        {
                            self.diverge("the re-driven inference's token usage differs".into());
                            return false;
                        }
                        self.report.inferences += 1;
                        self.fold();
                    }
                }
                true
            }
            Proposal::Request(r) => self.request(&r, last),
            Proposal::Finish { .. } => {
                self.diverge(format!(
                    "the driver finishes where the run recorded {}",
                    e.event_type
                ));
                false
            }
        }
    }

    /// Check a request, re-make its decision, and find its outcome.
    fn request(&mut self, r: &CapabilityProposal, last: &mut Option<Outcome>) -> bool {
        let e = &self.events[self.i];
        let t = EventType::from_name(&e.event_type);
        // A request the law would not record: the denial stands in for it.
        if t == Some(EventType::CapabilityDenied) {
            self.report.proposals += 1;
            *last = Some(denied(e, e.id()));
            self.fold();
            return true;
        }
        let same = t == Some(EventType::CapabilityRequested)
            && e.payload.get("capability").and_then(Value::as_str) == Some(r.capability.as_str())
            && e.payload.get("target").and_then(Value::as_str) == Some(r.target.as_str())
            && e.payload
                .get("arguments")
                .is_some_and(|a| same(a, &r.arguments))
            && e.intent.as_deref() == Some(r.intent.as_str());
        if !same {
            self.diverge(format!(
                "the driver requests {} on {:?}; the run recorded {}",
                r.capability,
                crate::executor::cut(&r.target, 120),
                describe(e)
            ));
            return false;
        }
        let req = e.id();
        let asked_at = e.at;
        // The live run decided between the event before the request and the request's record
        // (for an in-process read, recorded whole after the read, a little later than for a
        // call written ahead): a grant that expired in that interval may have been reused.
        let since = self
            .i
            .checked_sub(1)
            .and_then(|p| self.events.get(p))
            .map_or(asked_at, |p| p.at);
        self.report.proposals += 1;
        self.fold();
        // What the runtime would decide now, from the replayed books.
        let expected = self.decide(r, since, asked_at);
        // What it recorded: the first decision event answering this request.
        let recorded = self.events[self.i..].iter().find(|x| {
            let answers = x.causes.contains(&req)
                || x.payload.get("request").and_then(Value::as_str) == Some(&req.to_string());
            answers
                && matches!(
                    EventType::from_name(&x.event_type),
                    Some(EventType::CapabilityGranted)
                        | Some(EventType::CapabilityDenied)
                        | Some(EventType::ApprovalRequested)
                        | Some(EventType::CapabilityUsed)
                )
        });
        // A grant that lapsed while the live run decided: its reuse is one answer, the
        // decision without it the other.
        let expected = match expected {
            Expect::Either(g, other) => {
                let reuse = Expect::Reuse(g);
                match recorded {
                    Some(got) if mismatch(&reuse, got).is_none() => reuse,
                    _ => *other,
                }
            }
            e => e,
        };
        match (&expected, recorded) {
            (_, None) => {
                self.report.unchecked.push(format!(
                    "request {req}: the record ends before its decision"
                ));
                return false;
            }
            (Expect::Unchecked(why), Some(_)) => {
                self.report.unchecked.push(format!("request {req}: {why}"));
            }
            (want, Some(got)) => {
                if let Some(m) = mismatch(want, got) {
                    match m {
                        // Under other rules the walk follows the record.
                        Mismatch::Decision(why) => {
                            if self.decision_differs(format!("request {req}: {why}")) {
                                return false;
                            }
                        }
                        Mismatch::Record(why) => {
                            self.diverge(format!("request {req}: {why}"));
                            return false;
                        }
                    }
                } else {
                    if let Some(why) = version_mismatch(want, got) {
                        if self.records_reloads {
                            self.diverge(format!("request {req}: {why}"));
                            return false;
                        }
                        self.report.unchecked.push(format!(
                            "request {req}: {why} (the run began under taxonomy v1, which recorded no policy reload that revoked nothing)"
                        ));
                    }
                    // A permit that needed an approval: the grant issued once it was given
                    // must carry the decision's constraints too.
                    if let Expect::Policy("approval", _, want, _) = &expected
                        && let Some(grant) = self.events[self.i..].iter().find(|x| {
                            x.event_type == EventType::CapabilityGranted.name()
                                && x.payload.get("request").and_then(Value::as_str)
                                    == Some(&req.to_string())
                        })
                        && let Some(why) = constraints_mismatch(grant, want)
                            .or_else(|| approved_uses_mismatch(grant))
                    {
                        // The record disagrees with itself (the decision it made gave other
                        // limits): no change of rules explains that.
                        self.diverge(format!("request {req}: {why}"));
                        return false;
                    } else {
                        self.report.decisions += 1;
                    }
                }
            }
        }
        // Fold to the request's outcome: its effect, or its denial.
        while let Some(x) = self.events.get(self.i) {
            let xt = EventType::from_name(&x.event_type);
            let answers = x.causes.contains(&req)
                || x.payload.get("request").and_then(Value::as_str) == Some(&req.to_string());
            if answers
                && xt.is_some_and(|t| t.category() == ice_kernel::Category::Domain)
                && x.payload.contains_key("output")
            {
                *last = Some(Outcome::Done {
                    request: req.clone(),
                    output: x.payload.get("output").cloned().unwrap_or(Value::Null),
                });
                self.fold();
                return true;
            }
            if answers && xt == Some(EventType::CapabilityDenied) {
                *last = Some(denied(x, req.clone()));
                self.fold();
                return true;
            }
            if answers && xt.is_some_and(|t| t.category() == ice_kernel::Category::Domain) {
                self.report.unchecked.push(format!(
                    "request {req}: its effect was recorded without the output the agent saw (an older ICE); the replay stops here"
                ));
                return false;
            }
            if xt == Some(EventType::RunSuspended) && self.books.state() == RunState::Executing {
                // The process stopped during the call (recovery suspended the run): no outcome
                // was recorded, and none is shown to the agent when the run resumes.
                self.report.unchecked.push(format!(
                    "request {req}: the call was interrupted by {} (its outcome was not recorded)",
                    describe(x)
                ));
                *last = None;
                return true;
            }
            self.fold();
        }
        false
    }

    /// The decision the runtime would make for `r` from the replayed books, at a time between
    /// `since` and `at` (the record does not say when exactly).
    fn decide(
        &self,
        r: &CapabilityProposal,
        since: ice_kernel::Timestamp,
        at: ice_kernel::Timestamp,
    ) -> Expect {
        let Some(spec) = &self.books.spec else {
            return Expect::Unchecked("no recorded spec".into());
        };
        let bound = Bound(&self.tools);
        let (resource, _effect, target) =
            match act::resolve_target(&self.rt.registry, r, &spec.servers, &bound) {
                Ok(x) => x,
                Err((code, _)) => return Expect::Denied(code),
            };
        // The policy decides every call; only a call it permits outright may reuse a live
        // grant (for the same agent, with the decision's constraints, not issued on an
        // approval), as the live run chooses it.
        let decided = self.policy_decision(r, resource.clone(), &target);
        let reusable = |t| match &decided {
            Expect::Policy("permit", _, constraints, _) => self
                .books
                .grants
                .find_reusable(&self.agent, &r.capability, &resource, constraints, t)
                .map(|g| g.id.clone()),
            _ => None,
        };
        let (then, now) = (reusable(since), reusable(at));
        let decided = match &now {
            Some(g) => Expect::Reuse(g.clone()),
            None => decided,
        };
        // A call permitted outright (reusing a live grant or not) whose reservation does not
        // fit the budget is refused for it, before any grant is issued or used.
        let decided = match decided {
            Expect::Reuse(_) | Expect::Policy("permit", ..) if !self.fits(r) => {
                Expect::Denied(DenialCode::BudgetExhausted)
            }
            other => other,
        };
        // Time only ends grants: one the permit could reuse at `since` and no longer at `at`
        // has expired in between (no event separates the two), and may have been reused.
        match then {
            Some(g) if now.as_ref() != Some(&g) => Expect::Either(g, Box::new(decided)),
            _ => decided,
        }
    }

    /// Whether the reservation the runtime makes for `r` fits the replayed budget.
    fn fits(&self, r: &CapabilityProposal) -> bool {
        // Whether it fits depends on the least the call needs, not on the most it may move
        // (which, for a tool call, is its server's `max_result_bytes`): no server is asked.
        let amount = act::estimate(&r.capability, &r.arguments, &self.books.budget.left(), None);
        let id = format!("r{}", self.books.reservations + 1);
        self.books.budget.check_reserve(&id, amount).is_ok()
    }

    /// What the policy decides for `r` on `resource`, from the replayed books.
    fn policy_decision(
        &self,
        r: &CapabilityProposal,
        resource: ice_authority::Resource,
        target: &act::Target,
    ) -> Expect {
        let Some(policy) = &self.policy else {
            return Expect::Unchecked("the run's policy files are not in the record".into());
        };
        if let Some(v) = self.books.policy_version
            && v != policy.version()
        {
            return Expect::Unchecked(format!(
                "decided under policy version {}, whose files are not in the record (the policy changed during a run recorded before taxonomy v2)",
                v.to_hex()
            ));
        }
        let args = act::policy_arguments(&r.capability, &r.arguments, target);
        let builder = Request::builder(&self.run, &self.agent, &r.capability, resource)
            .intent(&r.intent)
            .arguments(&args)
            .budget_left(self.books.budget.left())
            .entity_cache(&self.rt.entities);
        let request = match act::classed(builder, target).build(&self.rt.registry) {
            Ok(q) => q,
            Err(_) => return Expect::Denied(DenialCode::InvalidTarget),
        };
        let d = policy.decide(&request);
        let policies = d.determining_policies().to_vec();
        let kind = match d.kind() {
            DecisionKind::Deny => "deny",
            DecisionKind::Permit => "permit",
            DecisionKind::PermitWithApproval => "approval",
        };
        Expect::Policy(kind, policies, d.constraints, d.policy_version)
    }
}

/// A decision as the replay expects it.
enum Expect {
    /// Refused before the policy (target, capability) with this code.
    Denied(DenialCode),
    /// The policy permits it outright, and this live grant serves it.
    Reuse(EventId),
    /// The policy decides: `deny`, `permit` or `approval`, by these policies, with these
    /// constraints on the grant it gives.
    Policy(
        &'static str,
        Vec<String>,
        ice_authority::Constraints,
        ice_authority::PolicyVersion,
    ),
    /// Cannot be re-made, and why.
    Unchecked(String),
    /// This grant covered the target when the live run may have decided, and had expired by
    /// the request's record: its reuse, or the other decision.
    Either(EventId, Box<Expect>),
}

/// How a recorded decision differs from the one re-made.
enum Mismatch {
    /// The decision comes out otherwise (which other decision rules may explain).
    Decision(String),
    /// The record disagrees with itself: the decision it names gives other limits than it
    /// recorded, whatever the rules.
    Record(String),
}

fn mismatch(want: &Expect, got: &Event) -> Option<Mismatch> {
    let t = EventType::from_name(&got.event_type);
    let reason = got
        .payload
        .get("reason")
        .and_then(Value::as_str)
        .unwrap_or("");
    let policies: Vec<String> = got
        .payload
        .get("policies")
        .and_then(|p| serde_json::from_value(p.clone()).ok())
        .unwrap_or_default();
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    match want {
        Expect::Denied(code) => (t != Some(EventType::CapabilityDenied) || reason != code.as_str())
            .then(|| {
                Mismatch::Decision(format!(
                    "the replay refuses it ({code}); the run recorded {}",
                    describe(got)
                ))
            }),
        Expect::Reuse(g) => {
            let grant = got.payload.get("grant").and_then(Value::as_str);
            (grant != Some(&g.to_string())).then(|| {
                Mismatch::Decision(format!(
                    "the replay reuses grant {g}; the run recorded {}",
                    describe(got)
                ))
            })
        }
        Expect::Policy(kind, want_policies, want_constraints, _) => {
            let recorded = match t {
                Some(EventType::CapabilityDenied)
                    if reason == DenialCode::PolicyDenied.as_str() =>
                {
                    "deny"
                }
                Some(EventType::CapabilityGranted)
                    if got.payload.get("approval").is_none_or(Value::is_null) =>
                {
                    "permit"
                }
                Some(EventType::ApprovalRequested) => "approval",
                _ => "other",
            };
            if recorded != *kind {
                return Some(Mismatch::Decision(format!(
                    "the policy decides {kind} now; the run recorded {}",
                    describe(got)
                )));
            }
            if sorted(policies) != sorted(want_policies.clone()) {
                return Some(Mismatch::Decision(format!(
                    "the policy decides {kind} by {want_policies:?}; the run recorded it by other policies"
                )));
            }
            if recorded == "permit" {
                return constraints_mismatch(got, want_constraints).map(Mismatch::Record);
            }
            None
        }
        Expect::Unchecked(_) => None,
        Expect::Either(g, other) => {
            mismatch(&Expect::Reuse(g.clone()), got).and_then(|_| mismatch(other, got))
        }
    }
}

/// A grant or approval request names the policy version that decided it; with the decision
/// re-made under the policy the record has in force, how the two differ, if they do (a change
/// of policy the record does not hold).
fn version_mismatch(want: &Expect, got: &Event) -> Option<String> {
    let Expect::Policy(_, _, _, version) = want else {
        return None;
    };
    let named = got.payload.get("policy_version")?;
    (named.as_str() != Some(version.to_hex().as_str())).then(|| {
        format!(
            "the run recorded this decision under policy version {}, but the record has version {} in force here (no PolicyReloaded records a change)",
            cut_json(named),
            version.to_hex()
        )
    })
}

/// How the constraints recorded in `grant` (a `CapabilityGranted`) differ from `want`, the
/// ones the policy gives, if they do.
fn constraints_mismatch(grant: &Event, want: &ice_authority::Constraints) -> Option<String> {
    let recorded = grant.payload.get("constraints");
    let got = recorded
        .and_then(|c| <ice_authority::Constraints as serde::Deserialize>::deserialize(c).ok());
    (got != Some(*want)).then(|| {
        format!(
            "the policy gives a grant with constraints {}; the run recorded {} in {}",
            serde_json::json!(want),
            recorded.unwrap_or(&Value::Null),
            grant.id()
        )
    })
}

/// A grant given on an operator's approval allows exactly one use (an approval authorises one
/// call); how `grant` (a `CapabilityGranted` on an approval) differs, if it does.
fn approved_uses_mismatch(grant: &Event) -> Option<String> {
    let uses = grant.payload.get("max_uses");
    (uses.and_then(Value::as_u64) != Some(1)).then(|| {
        format!(
            "a grant given on an approval allows one use; the run recorded {} in {}",
            uses.unwrap_or(&Value::Null),
            grant.id()
        )
    })
}

fn denied(e: &Event, request: EventId) -> Outcome {
    let s = |k: &str| {
        e.payload
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    Outcome::Denied {
        request,
        reason: s("reason"),
        detail: s("detail"),
    }
}

fn describe(e: &Event) -> String {
    let reason = e
        .payload
        .get("reason")
        .and_then(Value::as_str)
        .map(|r| format!(" ({r})"))
        .unwrap_or_default();
    format!("{} {}{reason}", e.event_type, e.id())
}

fn proposal_name(p: &Proposal) -> String {
    match p {
        Proposal::Think { kind, .. } => kind.event_type().name().to_string(),
        Proposal::Request(r) => format!("a {} request", r.capability),
        Proposal::Infer { .. } => "a model call".into(),
        Proposal::Finish { .. } => "to finish".into(),
    }
}

fn cost_text(c: &Cost) -> String {
    c.fields()
        .iter()
        .filter(|(_, v)| *v > 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The first field where two payloads differ, for a divergence message.
fn first_difference(want: &Map<String, Value>, got: &Map<String, Value>) -> String {
    let keys: std::collections::BTreeSet<&String> = want.keys().chain(got.keys()).collect();
    for k in keys {
        let (a, b) = (want.get(k), got.get(k));
        let equal = match (a, b) {
            (Some(x), Some(y)) => same(x, y),
            (x, y) => x == y,
        };
        if !equal {
            return format!(
                "field {k:?}: recorded {}, re-driven {}",
                a.map(cut_json).unwrap_or_else(|| "(absent)".into()),
                b.map(cut_json).unwrap_or_else(|| "(absent)".into())
            );
        }
    }
    "the intent".into()
}

/// A JSON value as short text.
fn cut_json(v: &Value) -> String {
    crate::executor::cut(&v.to_string(), 200)
}

/// Whether two values are the same fact: equal canonical encodings (the log writes `0.0` as
/// `0`, so a float the driver makes and the integer read back are one value).
fn same(a: &Value, b: &Value) -> bool {
    match (
        ice_kernel::canonical::canonicalize(a),
        ice_kernel::canonical::canonicalize(b),
    ) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}
