//! Helpers shared by the kernel's integration tests.
//!
//! The taxonomy rows and the state machine's edges are written here from the specification's
//! text (ICE-SPEC §3 and §4), not copied from the kernel, so the tests check the code against
//! the spec rather than against itself.
#![allow(dead_code)] // each test crate uses a different part of this module

use ice_kernel::{
    CauseIndex, Digest, Draft, Event, EventType, NoOtherRuns, Origin, RunHead, RunId, RunState,
    SealedEvent, Timestamp, ValidationError,
};

/// Spec §3, RUNTIME row (`runtime` only), plus `RunTerminatedByRuntime`, which taxonomy v1 adds
/// so that the spec's `→ TERMINATED_BY_RUNTIME` edge has an event, and `PolicyReloaded`, which
/// v2 adds so that a policy change under a running run is recorded with the new files (spec §5:
/// a mid-run change re-evaluates live grants; I-002: policy decisions replay from the log).
pub const RUNTIME_ROW: &[&str] = &[
    "RunProvisioned",
    "ResourcesAllocated",
    "ContextResolved",
    "MemoryMounted",
    "CapabilitiesBound",
    "ExecutionWindowOpened",
    "ValidationStarted",
    "ValidationPassed",
    "ValidationFailed",
    "RunCommitted",
    "RunAborted",
    "AbortReasonDeclared",
    "ResourcesReleased",
    "RunTerminated",
    "RunSuspended",
    "RunResumed",
    "BudgetReserved",
    "BudgetSettled",
    "ApprovalRequested",
    "RunTerminatedByRuntime",
    "PolicyReloaded",
];

/// Spec §3, OPERATOR row (`operator:*` only).
pub const OPERATOR_ROW: &[&str] = &[
    "ApprovalGranted",
    "ApprovalDenied",
    "ReconfigurationRecorded",
    "RunKillRequested",
];

/// Spec §3, COGNITIVE row (`agent:*` only).
pub const COGNITIVE_ROW: &[&str] = &[
    "InferenceStep",
    "DecisionProposed",
    "HypothesisGenerated",
    "UncertaintyDeclared",
    "PlanStepProposed",
    "AssumptionDeclared",
];

/// Spec §3, DOMAIN row (`runtime` only).
pub const DOMAIN_ROW: &[&str] = &[
    "FileRead",
    "FileWritten",
    "EffectStaged",
    "EffectApplied",
    "ToolInvoked",
    "APIRequestExecuted",
    "TaskStarted",
    "TaskCompleted",
    "UserNotificationSent",
    "WorkflowAdvanced",
];

/// Spec §3, MEMORY row (`runtime` only).
pub const MEMORY_ROW: &[&str] = &[
    "MemoryPromoted",
    "MemoryExpired",
    "MemoryDeprecated",
    "MemorySuperseded",
    "MemoryInvalidated",
];

/// Spec §3, CAPABILITY row, the agent's part (`agent:*` only).
pub const CAPABILITY_REQUEST_ROW: &[&str] = &["CapabilityRequested"];

/// Spec §3, CAPABILITY row, the runtime's part (`runtime` only).
pub const CAPABILITY_DECISION_ROW: &[&str] = &[
    "CapabilityGranted",
    "CapabilityDenied",
    "CapabilityUsed",
    "CapabilityRevoked",
    "CapabilityExpired",
];

/// Which kind of origin a taxonomy row belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Runtime,
    Agent,
    Operator,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Runtime, Kind::Agent, Kind::Operator];

    pub fn of(origin: &Origin) -> Kind {
        match origin {
            Origin::Runtime => Kind::Runtime,
            Origin::Agent(_) => Kind::Agent,
            Origin::Operator(_) => Kind::Operator,
        }
    }

    /// A representative origin of this kind.
    pub fn origin(self) -> Origin {
        match self {
            Kind::Runtime => Origin::Runtime,
            Kind::Agent => Origin::Agent("x".into()),
            Kind::Operator => Origin::Operator("x".into()),
        }
    }

    /// How the validator names the row in `OriginForbidden::allowed`.
    pub fn row_name(self) -> &'static str {
        match self {
            Kind::Runtime => "runtime",
            Kind::Agent => "agent:*",
            Kind::Operator => "operator:*",
        }
    }
}

/// Every row of the spec's taxonomy with the one origin kind that may emit it.
pub fn spec_rows() -> Vec<(&'static str, &'static [&'static str], Kind)> {
    vec![
        ("RUNTIME", RUNTIME_ROW, Kind::Runtime),
        ("OPERATOR", OPERATOR_ROW, Kind::Operator),
        ("COGNITIVE", COGNITIVE_ROW, Kind::Agent),
        ("DOMAIN", DOMAIN_ROW, Kind::Runtime),
        ("MEMORY", MEMORY_ROW, Kind::Runtime),
        ("CAPABILITY (request)", CAPABILITY_REQUEST_ROW, Kind::Agent),
        (
            "CAPABILITY (decisions)",
            CAPABILITY_DECISION_ROW,
            Kind::Runtime,
        ),
    ]
}

/// The origin kind the spec lets emit `name`.
pub fn spec_kind(name: &str) -> Kind {
    spec_rows()
        .into_iter()
        .find(|(_, row, _)| row.contains(&name))
        .map(|(_, _, k)| k)
        .unwrap_or_else(|| panic!("{name} is in no row of the spec's taxonomy"))
}

/// The resolved type of a name the test knows is in the taxonomy.
pub fn ty(name: &str) -> EventType {
    EventType::from_name(name).unwrap_or_else(|| panic!("{name} is not an event type"))
}

pub fn run_id(s: &str) -> RunId {
    RunId::new(s).expect("test run ids are valid")
}

/// A fixed instant plus `offset_us` microseconds.
pub fn time(offset_us: i64) -> Timestamp {
    Timestamp::from_unix_us(1_700_000_000_000_000 + offset_us).expect("in range")
}

/// A draft of `t` from the origin the spec allows, carrying intent and authority so that no
/// type lacks a field it requires.
pub fn draft(t: EventType) -> Draft {
    Draft::new(t.name(), spec_kind(t.name()).origin())
        .intent(format!("test {}", t.name()))
        .authority("grant:test")
}

/// Events that lead a fresh run to `state` along the spec's happy edges.
pub fn path_to(state: RunState) -> Vec<EventType> {
    use EventType as E;
    let exec = vec![
        E::RunProvisioned,
        E::ContextResolved,
        E::ExecutionWindowOpened,
    ];
    let with = |mut base: Vec<EventType>, more: &[EventType]| {
        base.extend_from_slice(more);
        base
    };
    match state {
        RunState::Created => vec![],
        RunState::Provisioned => vec![E::RunProvisioned],
        RunState::ContextReady => vec![E::RunProvisioned, E::ContextResolved],
        RunState::Executing => exec,
        RunState::Suspended => with(exec, &[E::RunSuspended]),
        RunState::Validating => with(exec, &[E::ValidationStarted]),
        RunState::Committed => with(
            exec,
            &[E::ValidationStarted, E::ValidationPassed, E::RunCommitted],
        ),
        RunState::Aborted => with(exec, &[E::RunAborted]),
        RunState::TerminatedByRuntime => with(exec, &[E::RunTerminatedByRuntime]),
        RunState::Terminated => with(
            exec,
            &[
                E::ValidationStarted,
                E::ValidationPassed,
                E::RunCommitted,
                E::ResourcesReleased,
                E::RunTerminated,
            ],
        ),
    }
}

/// Events after which the run admits `t` (so a test of another rule is not masked by state).
pub fn admitting_path(t: EventType) -> Vec<EventType> {
    use EventType as E;
    use RunState as S;
    match t {
        E::RunProvisioned => path_to(S::Created),
        E::ResourcesAllocated | E::ContextResolved => path_to(S::Provisioned),
        E::MemoryMounted | E::CapabilitiesBound | E::ExecutionWindowOpened => {
            path_to(S::ContextReady)
        }
        E::ValidationPassed | E::ValidationFailed => path_to(S::Validating),
        E::RunCommitted | E::EffectApplied => {
            let mut p = path_to(S::Validating);
            p.push(E::ValidationPassed);
            p
        }
        E::AbortReasonDeclared | E::RunTerminated => path_to(S::Aborted),
        E::ResourcesReleased => path_to(S::Committed),
        E::ReconfigurationRecorded => path_to(S::Suspended),
        E::RunResumed => {
            let mut p = path_to(S::Suspended);
            p.push(E::ReconfigurationRecorded);
            p
        }
        _ => path_to(S::Executing),
    }
}

/// A run under test: a head and a clock that ticks one microsecond per event.
#[derive(Clone, Debug, PartialEq)]
pub struct Run {
    pub head: RunHead,
    pub clock_us: i64,
}

impl Run {
    pub fn new(id: &str) -> Run {
        Run {
            head: RunHead::new(run_id(id)),
            clock_us: 0,
        }
    }

    /// A run named `id` after the events of `path` (each from its spec origin).
    pub fn after(id: &str, path: &[EventType]) -> Run {
        let mut r = Run::new(id);
        for t in path {
            r.push(*t);
        }
        r
    }

    pub fn at(state: RunState) -> Run {
        let r = Run::after("run", &path_to(state));
        assert_eq!(r.head.state(), state, "path_to({state}) did not reach it");
        r
    }

    /// Seal `d` one tick after the previous event.
    pub fn seal(&mut self, d: Draft) -> Result<SealedEvent, ValidationError> {
        self.seal_with(d, &NoOtherRuns)
    }

    pub fn seal_with(
        &mut self,
        d: Draft,
        others: &dyn CauseIndex,
    ) -> Result<SealedEvent, ValidationError> {
        self.clock_us += 1;
        self.head
            .seal(d, time(self.clock_us), others)
            .map(|(e, _blobs)| e)
    }

    /// Seal a valid draft of `t`; panics (naming the state) if the run refuses it.
    pub fn push(&mut self, t: EventType) -> SealedEvent {
        let state = self.head.state();
        self.seal(draft(t))
            .unwrap_or_else(|e| panic!("{t} refused in {state}: {e}"))
    }

    /// Seal `d` on a copy and check the head did not move when it is refused.
    pub fn try_seal(&self, d: Draft) -> Result<SealedEvent, ValidationError> {
        self.try_seal_with(d, &NoOtherRuns)
    }

    pub fn try_seal_with(
        &self,
        d: Draft,
        others: &dyn CauseIndex,
    ) -> Result<SealedEvent, ValidationError> {
        let mut copy = self.clone();
        let r = copy.seal_with(d, others);
        if r.is_err() {
            assert_eq!(copy.head, self.head, "a refused event moved the run head");
        }
        r
    }

    /// A hand-built event that would continue this run: right seq, prev, time and hash.
    pub fn next_event(&self, event_type: &str, origin: Origin) -> Event {
        let mut e = Event {
            run_id: self.head.run_id.clone(),
            run_seq: self.head.next_seq,
            event_type: event_type.into(),
            origin,
            at: time(self.clock_us + 1),
            intent: None,
            authority: None,
            payload: Default::default(),
            causes: vec![],
            cost: Default::default(),
            prev: self.head.last_hash,
            hash: Digest::GENESIS,
        };
        e.hash = e.compute_hash();
        e
    }

    /// Admit `e` on a copy of the head; a refused event must leave the head unchanged.
    pub fn try_admit(&self, e: Event) -> Result<SealedEvent, ValidationError> {
        self.try_admit_with(e, &NoOtherRuns)
    }

    pub fn try_admit_with(
        &self,
        e: Event,
        others: &dyn CauseIndex,
    ) -> Result<SealedEvent, ValidationError> {
        let mut head = self.head.clone();
        let r = head.admit(e, others);
        if r.is_err() {
            assert_eq!(head, self.head, "a refused event moved the run head");
        }
        r
    }
}

/// Recompute `e`'s hash after a test changed it.
pub fn rehashed(mut e: Event) -> Event {
    e.hash = e.compute_hash();
    e
}
