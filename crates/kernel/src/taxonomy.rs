//! The closed event taxonomy and the origin law, in one place.
//!
//! Adding, removing or renaming a type is a change of [`TAXONOMY_VERSION`] and is documented in
//! `docs/taxonomy.md`. Version 1 is the specification's starting set plus `RunTerminatedByRuntime`,
//! which the run state machine needs for its `→ TERMINATED_BY_RUNTIME` edge. Version 2 adds
//! `PolicyReloaded`: the policy a running run decides under changed, and the event holds the
//! new files, so that a replay decides later requests under the policy the run used.

use std::fmt;

use crate::id::Origin;

/// Version of the taxonomy this kernel enforces.
pub const TAXONOMY_VERSION: u32 = 2;

/// The row of the taxonomy a type belongs to; the row fixes which origins may emit it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Category {
    /// Lifecycle and bookkeeping facts of the runtime (`runtime` only).
    Runtime,
    /// Acts of a human operator (`operator:*` only).
    Operator,
    /// Proposals and reasoning of an agent (`agent:*` only).
    Cognitive,
    /// Effects and work the runtime carried out (`runtime` only).
    Domain,
    /// Memory lifecycle (`runtime` only).
    Memory,
    /// A capability request (`agent:*` only).
    CapabilityRequest,
    /// Capability decisions and grant lifecycle (`runtime` only).
    Capability,
}

impl Category {
    /// Whether `origin` may emit events of this category. This is the origin law.
    pub fn allows(self, origin: &Origin) -> bool {
        match self {
            Category::Runtime | Category::Domain | Category::Memory | Category::Capability => {
                matches!(origin, Origin::Runtime)
            }
            Category::Operator => matches!(origin, Origin::Operator(_)),
            Category::Cognitive | Category::CapabilityRequest => matches!(origin, Origin::Agent(_)),
        }
    }

    /// Name of the origin row, for error messages.
    pub fn origin_row(self) -> &'static str {
        match self {
            Category::Runtime | Category::Domain | Category::Memory | Category::Capability => {
                "runtime"
            }
            Category::Operator => "operator:*",
            Category::Cognitive | Category::CapabilityRequest => "agent:*",
        }
    }
}

macro_rules! taxonomy {
    ($($name:ident => $cat:ident),* $(,)?) => {
        /// Every event type of the taxonomy. The set is closed: a name not here is rejected.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[allow(missing_docs)]
        pub enum EventType { $($name),* }

        impl EventType {
            /// All types, in taxonomy order.
            pub const ALL: &'static [EventType] = &[$(EventType::$name),*];

            /// The type's name as it appears in events.
            pub fn name(self) -> &'static str {
                match self { $(EventType::$name => stringify!($name)),* }
            }

            /// Look a name up; `None` if it is not in the taxonomy.
            pub fn from_name(name: &str) -> Option<EventType> {
                match name { $(stringify!($name) => Some(EventType::$name),)* _ => None }
            }

            /// The taxonomy row of this type.
            pub fn category(self) -> Category {
                match self { $(EventType::$name => Category::$cat),* }
            }
        }
    };
}

taxonomy! {
    RunProvisioned => Runtime,
    ResourcesAllocated => Runtime,
    ContextResolved => Runtime,
    MemoryMounted => Runtime,
    CapabilitiesBound => Runtime,
    ExecutionWindowOpened => Runtime,
    ValidationStarted => Runtime,
    ValidationPassed => Runtime,
    ValidationFailed => Runtime,
    RunCommitted => Runtime,
    RunAborted => Runtime,
    AbortReasonDeclared => Runtime,
    ResourcesReleased => Runtime,
    RunTerminated => Runtime,
    RunTerminatedByRuntime => Runtime,
    RunSuspended => Runtime,
    RunResumed => Runtime,
    BudgetReserved => Runtime,
    BudgetSettled => Runtime,
    ApprovalRequested => Runtime,
    PolicyReloaded => Runtime,

    ApprovalGranted => Operator,
    ApprovalDenied => Operator,
    ReconfigurationRecorded => Operator,
    RunKillRequested => Operator,

    InferenceStep => Cognitive,
    DecisionProposed => Cognitive,
    HypothesisGenerated => Cognitive,
    UncertaintyDeclared => Cognitive,
    PlanStepProposed => Cognitive,
    AssumptionDeclared => Cognitive,

    FileRead => Domain,
    FileWritten => Domain,
    EffectStaged => Domain,
    EffectApplied => Domain,
    ToolInvoked => Domain,
    APIRequestExecuted => Domain,
    TaskStarted => Domain,
    TaskCompleted => Domain,
    UserNotificationSent => Domain,
    WorkflowAdvanced => Domain,

    MemoryPromoted => Memory,
    MemoryExpired => Memory,
    MemoryDeprecated => Memory,
    MemorySuperseded => Memory,
    MemoryInvalidated => Memory,

    CapabilityRequested => CapabilityRequest,
    CapabilityGranted => Capability,
    CapabilityDenied => Capability,
    CapabilityUsed => Capability,
    CapabilityRevoked => Capability,
    CapabilityExpired => Capability,
}

impl EventType {
    /// Effect events touch something outside the log; they must name their authority and intent.
    pub fn is_effect(self) -> bool {
        matches!(
            self,
            EventType::FileRead
                | EventType::FileWritten
                | EventType::EffectStaged
                | EventType::EffectApplied
                | EventType::ToolInvoked
                | EventType::APIRequestExecuted
                | EventType::UserNotificationSent
                | EventType::CapabilityUsed
        )
    }

    /// Whether an event of this type must carry `intent` (agent events and effect events).
    pub fn requires_intent(self) -> bool {
        self.is_effect()
            || matches!(
                self.category(),
                Category::Cognitive | Category::CapabilityRequest
            )
    }

    /// Whether an event of this type must carry `authority` (effect and grant events).
    pub fn requires_authority(self) -> bool {
        self.is_effect() || self == EventType::CapabilityGranted
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
