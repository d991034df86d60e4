//! The agent protocol: what an agent may see and what it may propose.
//!
//! An agent is anything that implements [`Agent`]: it is shown an [`AgentView`] (plain data) and
//! returns a [`Proposal`] (plain data). That is all it can do. It holds no handle to the log,
//! to the authority layer or to any effect adapter, and the crates that implement agents depend
//! on this kernel only, so no agent code can reach an effect even by accident.
//!
//! The proposal types are the origin law for agents written as types: a [`Proposal`] can become
//! only a cognitive event or a `CapabilityRequested` ([`Proposal::draft`]), which is exactly the
//! `agent:*` row of the taxonomy. The runtime records a proposal only through that function.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::event::{Cost, Draft, Event, Payload};
use crate::id::{Digest, EventId, Origin, RunId};
use crate::taxonomy::EventType;

/// The cognitive events an agent may record: its row of the taxonomy, minus the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Thought {
    /// A model call and its output.
    InferenceStep,
    /// A decision the agent proposes.
    DecisionProposed,
    /// A hypothesis.
    HypothesisGenerated,
    /// Something the agent is unsure of.
    UncertaintyDeclared,
    /// The next step of a plan.
    PlanStepProposed,
    /// An assumption the agent relies on.
    AssumptionDeclared,
}

impl Thought {
    /// Every kind, in taxonomy order.
    pub const ALL: [Thought; 6] = [
        Thought::InferenceStep,
        Thought::DecisionProposed,
        Thought::HypothesisGenerated,
        Thought::UncertaintyDeclared,
        Thought::PlanStepProposed,
        Thought::AssumptionDeclared,
    ];

    /// The event type this kind is recorded as.
    pub fn event_type(self) -> EventType {
        match self {
            Thought::InferenceStep => EventType::InferenceStep,
            Thought::DecisionProposed => EventType::DecisionProposed,
            Thought::HypothesisGenerated => EventType::HypothesisGenerated,
            Thought::UncertaintyDeclared => EventType::UncertaintyDeclared,
            Thought::PlanStepProposed => EventType::PlanStepProposed,
            Thought::AssumptionDeclared => EventType::AssumptionDeclared,
        }
    }
}

/// A request for a capability, as the agent states it: the runtime checks the target, decides,
/// and (maybe) acts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CapabilityProposal {
    /// The capability type (`fs.read`, `http.request`, …).
    pub capability: String,
    /// The target as the agent writes it (a workspace path, a URL, `server/tool`, a program).
    pub target: String,
    /// The call's arguments (a JSON object).
    pub arguments: Value,
    /// Why.
    pub intent: String,
}

impl CapabilityProposal {
    /// The request a `CapabilityRequested` event records (what [`Proposal::draft`] wrote); a
    /// field the record lacks is empty.
    pub fn recorded(e: &Event) -> CapabilityProposal {
        let text = |k: &str| {
            e.payload
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        CapabilityProposal {
            capability: text("capability"),
            target: text("target"),
            arguments: e.payload.get("arguments").cloned().unwrap_or_default(),
            intent: e.intent.clone().unwrap_or_default(),
        }
    }
}

/// What an agent may propose.
#[derive(Clone, Debug, PartialEq)]
pub enum Proposal {
    /// Record a cognitive event.
    Think {
        /// Which kind.
        kind: Thought,
        /// Why.
        intent: String,
        /// What the agent thought (an object).
        payload: Payload,
    },
    /// Ask for a capability.
    Request(CapabilityProposal),
    /// The agent wants to call its model. The runtime reserves `reserve` from the run's budget
    /// first (a reservation that does not fit stops the loop), then calls [`Agent::infer`],
    /// records its [`Inference`] as `InferenceStep` and settles the reservation with the
    /// reported usage.
    Infer {
        /// What the call may cost at most: output tokens = the request's `max_tokens`, input
        /// tokens = the driver's estimate of the prompt.
        reserve: Cost,
    },
    /// The agent's work is done: the runtime moves on to validation.
    Finish {
        /// The agent's own summary of what it did.
        summary: String,
    },
}

impl Proposal {
    /// The event that records this proposal in the name of `agent`, or `None` for
    /// [`Proposal::Finish`] (the runtime records the end of the execution window itself).
    ///
    /// This is the only place an agent-origin draft is made, and it makes only the `agent:*` row
    /// of the taxonomy.
    pub fn draft(&self, agent: &str) -> Option<Draft> {
        let origin = Origin::Agent(agent.to_string());
        match self {
            Proposal::Think {
                kind,
                intent,
                payload,
            } => Some(
                Draft::new(kind.event_type().name(), origin)
                    .intent(intent.clone())
                    .payload(Value::Object(payload.clone())),
            ),
            Proposal::Request(r) => {
                let mut p = Payload::new();
                p.insert("capability".into(), Value::String(r.capability.clone()));
                p.insert("target".into(), Value::String(r.target.clone()));
                p.insert("arguments".into(), r.arguments.clone());
                Some(
                    Draft::new(EventType::CapabilityRequested.name(), origin)
                        .intent(r.intent.clone())
                        .payload(Value::Object(p)),
                )
            }
            Proposal::Infer { .. } | Proposal::Finish { .. } => None,
        }
    }
}

/// One model call, as the driver reports it: recorded as `InferenceStep` in the agent's name.
#[derive(Clone, Debug, PartialEq)]
pub struct Inference {
    /// Why (the driver's words: which step of its loop this is).
    pub intent: String,
    /// What to record: model, parameters, request digest, the full reply (or the error),
    /// usage, latency.
    pub payload: Payload,
    /// What the call cost: tokens in and out as the provider reported them, wall time.
    pub usage: Cost,
}

impl Inference {
    /// The `InferenceStep` draft that records this inference in the name of `agent`.
    pub fn draft(&self, agent: &str) -> Draft {
        Draft::new(
            EventType::InferenceStep.name(),
            Origin::Agent(agent.to_string()),
        )
        .intent(self.intent.clone())
        .payload(Value::Object(self.payload.clone()))
        .cost(self.usage)
    }
}

/// A memory mounted into the run at context time (spec §8), as the agent is shown it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MountedMemory {
    /// The memory's id (the id of its `MemoryPromoted` event).
    pub id: String,
    /// Its type (`fact`, `file`, … as promoted).
    pub kind: String,
    /// The content.
    pub content: Value,
    /// SHA-256 of the content's canonical encoding.
    pub digest: Digest,
    /// Confidence in [0, 1].
    pub confidence: f64,
}

/// How the runtime answered one of the agent's requests.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum Outcome {
    /// The request was carried out.
    Done {
        /// The `CapabilityRequested` event.
        request: EventId,
        /// What the effect returned (file content, a listing, an HTTP status and body, …).
        output: Value,
    },
    /// The request was refused.
    Denied {
        /// The `CapabilityRequested` event.
        request: EventId,
        /// The stable reason code.
        reason: String,
        /// The explanation.
        detail: String,
    },
}

/// What an agent is shown before each proposal. Plain data: nothing in it can act.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentView {
    /// The run.
    pub run_id: RunId,
    /// How many proposals the agent has made in this run so far (a resumed run continues the
    /// count, so a scripted agent picks up where it stopped).
    pub step: u64,
    /// The capability types the run may request, with their effect classes.
    pub capabilities: Vec<(String, String)>,
    /// The answer to the agent's previous request, if its previous proposal was one.
    pub last: Option<Outcome>,
    /// The memories mounted into this run (empty when none).
    pub memories: Vec<MountedMemory>,
    /// The tools the run may call through `mcp.call`: `(server/tool, description, input
    /// schema)`, so a model-driven agent can offer them as functions.
    pub tools: Vec<ToolOffer>,
    /// What the run's wall-time budget has left, in milliseconds, if it has one: a driver
    /// bounds its model calls by it (the runtime checks the budget only between proposals).
    pub time_left_ms: Option<u64>,
}

/// An MCP tool the run may call, as offered to the agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolOffer {
    /// `server/tool` (the `mcp.call` target).
    pub target: String,
    /// The server's description of the tool.
    pub description: String,
    /// Its JSON Schema for arguments.
    pub input_schema: Value,
    /// ICE's effect class for it (`read`, `internal-write`, `external`).
    pub effect: String,
}

/// A flag the runtime raises while an agent calls its model, to ask it to give the call up (the
/// run was killed or is being stopped). Shared state only: raising it does no I/O, and an agent
/// that never looks at it is simply not interrupted.
#[derive(Clone, Debug, Default)]
pub struct Interrupt(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Interrupt {
    /// A flag not raised.
    pub fn new() -> Interrupt {
        Interrupt::default()
    }

    /// Ask for the call under way to be given up.
    pub fn raise(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Lower it (before a call).
    pub fn clear(&self) {
        self.0.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether it is raised.
    pub fn is_raised(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Why an agent could not propose.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AgentError(pub String);

/// An agent: shown a view, it proposes. It can do nothing else.
pub trait Agent: Send {
    /// The agent's id (the `agent:<id>` origin of its events).
    fn id(&self) -> &str;
    /// The next proposal.
    fn propose(&mut self, view: &AgentView) -> Result<Proposal, AgentError>;
    /// Call the model, after the runtime reserved what [`Proposal::Infer`] asked for. A provider
    /// error, a timeout or a malformed reply is an [`Inference`] that says so (it is recorded);
    /// an `Err` ends the run (the runtime aborts it). Agents that never propose
    /// [`Proposal::Infer`] keep the default.
    fn infer(&mut self, _view: &AgentView) -> Result<Inference, AgentError> {
        Err(AgentError(
            "this agent does not call a model (it never proposes Infer)".into(),
        ))
    }

    /// The flag this agent watches during [`Agent::infer`], if it can give a model call up
    /// when asked: the runtime raises it when the run is killed meanwhile, and the call ends
    /// (as an inference that says it was interrupted) instead of running to its timeout.
    fn interrupt(&self) -> Option<Interrupt> {
        None
    }

    /// Before a suspended run resumes: `recorded` are the run's model calls so far (its
    /// `InferenceStep` payloads, in order). An agent whose state lives between proposals (a
    /// model's conversation) keeps them to answer its model calls from while the runtime
    /// re-drives it through the run's record, and returns true; the runtime then re-drives it
    /// and calls [`Agent::rebuilt`]. The default keeps no such state: false, and nothing is
    /// re-driven.
    fn rebuild_from(&mut self, _recorded: Vec<Payload>) -> bool {
        false
    }

    /// The re-drive after [`Agent::rebuild_from`] reached the end of the record: from now on the
    /// agent acts live. An error says its state was not rebuilt (a model call the record did
    /// not answer, or one left unused), and the run is not resumed.
    fn rebuilt(&mut self) -> Result<(), AgentError> {
        Ok(())
    }
}
