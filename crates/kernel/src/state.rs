//! The run state machine (spec §4): exactly these edges, and which events each state admits.
//!
//! ```text
//! CREATED → PROVISIONED → CONTEXT_READY → EXECUTING ⇄ SUSPENDED
//! EXECUTING → VALIDATING → COMMITTED → TERMINATED
//! EXECUTING | SUSPENDED | VALIDATING → ABORTED → TERMINATED
//! any non-terminal → TERMINATED_BY_RUNTIME → TERMINATED
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::taxonomy::{Category, EventType};

/// The state of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[allow(missing_docs)]
pub enum RunState {
    Created,
    Provisioned,
    ContextReady,
    Executing,
    Suspended,
    Validating,
    Committed,
    Aborted,
    TerminatedByRuntime,
    Terminated,
}

impl RunState {
    /// Every state.
    pub const ALL: &'static [RunState] = &[
        RunState::Created,
        RunState::Provisioned,
        RunState::ContextReady,
        RunState::Executing,
        RunState::Suspended,
        RunState::Validating,
        RunState::Committed,
        RunState::Aborted,
        RunState::TerminatedByRuntime,
        RunState::Terminated,
    ];

    /// The name used in events, listings and errors.
    pub fn name(self) -> &'static str {
        match self {
            RunState::Created => "CREATED",
            RunState::Provisioned => "PROVISIONED",
            RunState::ContextReady => "CONTEXT_READY",
            RunState::Executing => "EXECUTING",
            RunState::Suspended => "SUSPENDED",
            RunState::Validating => "VALIDATING",
            RunState::Committed => "COMMITTED",
            RunState::Aborted => "ABORTED",
            RunState::TerminatedByRuntime => "TERMINATED_BY_RUNTIME",
            RunState::Terminated => "TERMINATED",
        }
    }

    /// A run in a non-terminal state still has work ahead of it; crash recovery looks for these.
    pub fn is_non_terminal(self) -> bool {
        matches!(
            self,
            RunState::Created
                | RunState::Provisioned
                | RunState::ContextReady
                | RunState::Executing
                | RunState::Suspended
                | RunState::Validating
        )
    }

    /// Whether `self → to` is an edge of the state machine.
    pub fn has_edge_to(self, to: RunState) -> bool {
        use RunState::*;
        match (self, to) {
            (Created, Provisioned)
            | (Provisioned, ContextReady)
            | (ContextReady, Executing)
            | (Executing, Suspended)
            | (Suspended, Executing)
            | (Executing, Validating)
            | (Validating, Committed)
            | (Committed, Terminated)
            | (Executing | Suspended | Validating, Aborted)
            | (Aborted, Terminated)
            | (TerminatedByRuntime, Terminated) => true,
            (from, TerminatedByRuntime) => from.is_non_terminal(),
            _ => false,
        }
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a run stands in its validation phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValidationOutcome {
    /// No outcome recorded in the current validation phase.
    #[default]
    Pending,
    /// `ValidationPassed` was recorded.
    Passed,
    /// `ValidationFailed` was recorded.
    Failed,
}

/// The part of a run's history the state machine needs to decide the next event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Lifecycle {
    /// The current state.
    pub state: RunState,
    /// Outcome of the current validation phase.
    pub validation: ValidationOutcome,
    /// A `ReconfigurationRecorded` was recorded since the run was last suspended (A-004).
    pub reconfigured: bool,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            state: RunState::Created,
            validation: ValidationOutcome::Pending,
            reconfigured: false,
        }
    }
}

/// Why the state machine refused an event.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The event would move the run along an edge that does not exist.
    #[error(
        "{event_type} would move the run from {from} to {to}, which is not an edge of the run state machine"
    )]
    IllegalEdge {
        /// The refused type.
        event_type: EventType,
        /// Current state.
        from: RunState,
        /// State the event leads to.
        to: RunState,
    },
    /// The current state does not admit this type at all.
    #[error("{event_type} is not allowed while the run is {state}")]
    NotAllowedIn {
        /// The refused type.
        event_type: EventType,
        /// Current state.
        state: RunState,
    },
    /// The type is allowed in this state only after something else happened.
    #[error("{event_type} is not allowed while the run is {state}: {reason}")]
    Precondition {
        /// The refused type.
        event_type: EventType,
        /// Current state.
        state: RunState,
        /// What is missing.
        reason: &'static str,
    },
}

impl Lifecycle {
    /// The lifecycle after an event of type `t`, or why the event is refused. Pure.
    pub fn step(&self, t: EventType) -> Result<Lifecycle, StateError> {
        use EventType as E;
        use RunState as S;
        let s = self.state;
        let mut next = *self;
        let goto = |to: RunState| -> Result<RunState, StateError> {
            if s.has_edge_to(to) {
                Ok(to)
            } else {
                Err(StateError::IllegalEdge {
                    event_type: t,
                    from: s,
                    to,
                })
            }
        };
        let only_in = |states: &[RunState]| -> Result<(), StateError> {
            if states.contains(&s) {
                Ok(())
            } else {
                Err(StateError::NotAllowedIn {
                    event_type: t,
                    state: s,
                })
            }
        };
        let pre = |ok: bool, reason: &'static str| -> Result<(), StateError> {
            if ok {
                Ok(())
            } else {
                Err(StateError::Precondition {
                    event_type: t,
                    state: s,
                    reason,
                })
            }
        };
        // Once a run has ended (committed, aborted, terminated), nothing but teardown may follow.
        let live = [S::Executing, S::Suspended, S::Validating];
        match t {
            E::RunProvisioned => next.state = goto(S::Provisioned)?,
            E::ResourcesAllocated => only_in(&[S::Provisioned])?,
            E::ContextResolved => next.state = goto(S::ContextReady)?,
            E::MemoryMounted | E::CapabilitiesBound => only_in(&[S::ContextReady])?,
            E::ExecutionWindowOpened => {
                // A run executes once: the window opens only from CONTEXT_READY. Coming back
                // from SUSPENDED is RunResumed, which needs a reconfiguration record.
                only_in(&[S::ContextReady])?;
                next.state = goto(S::Executing)?;
            }
            E::RunSuspended => {
                next.state = goto(S::Suspended)?;
                next.reconfigured = false;
            }
            E::ReconfigurationRecorded => {
                only_in(&[S::Suspended])?;
                next.reconfigured = true;
            }
            E::RunResumed => {
                // A-004: resumption needs renewed authority, recorded before it.
                only_in(&[S::Suspended])?;
                pre(
                    self.reconfigured,
                    "no ReconfigurationRecorded since the run was suspended",
                )?;
                next.state = goto(S::Executing)?;
                next.reconfigured = false;
            }
            E::ValidationStarted => {
                next.state = goto(S::Validating)?;
                next.validation = ValidationOutcome::Pending;
            }
            E::ValidationPassed | E::ValidationFailed => {
                only_in(&[S::Validating])?;
                pre(
                    self.validation == ValidationOutcome::Pending,
                    "this validation phase already has an outcome",
                )?;
                next.validation = if t == E::ValidationPassed {
                    ValidationOutcome::Passed
                } else {
                    ValidationOutcome::Failed
                };
            }
            E::EffectApplied => {
                only_in(&[S::Validating])?;
                pre(
                    self.validation == ValidationOutcome::Passed,
                    "staged effects apply only after ValidationPassed",
                )?;
            }
            E::RunCommitted => {
                if s == S::Validating {
                    pre(
                        self.validation == ValidationOutcome::Passed,
                        "a run commits only after ValidationPassed",
                    )?;
                }
                next.state = goto(S::Committed)?;
            }
            E::RunAborted => next.state = goto(S::Aborted)?,
            E::AbortReasonDeclared => only_in(&[S::Aborted])?,
            E::RunTerminatedByRuntime => next.state = goto(S::TerminatedByRuntime)?,
            E::ResourcesReleased => only_in(&[S::Committed, S::Aborted, S::TerminatedByRuntime])?,
            E::RunTerminated => next.state = goto(S::Terminated)?,
            E::RunKillRequested => {
                if !s.is_non_terminal() {
                    return Err(StateError::NotAllowedIn {
                        event_type: t,
                        state: s,
                    });
                }
            }
            E::ApprovalRequested => only_in(&[S::Executing])?,
            // The policy changes under a run that is deciding requests: while it executes.
            E::PolicyReloaded => only_in(&[S::Executing])?,
            E::ApprovalGranted | E::ApprovalDenied => only_in(&live)?,
            E::BudgetReserved | E::BudgetSettled => only_in(&[S::Executing, S::Validating])?,
            E::CapabilityGranted => only_in(&[S::ContextReady, S::Executing])?,
            // Spec §5: a grant is used only while the run is EXECUTING.
            E::CapabilityRequested | E::CapabilityDenied | E::CapabilityUsed => {
                only_in(&[S::Executing])?
            }
            E::CapabilityRevoked | E::CapabilityExpired => only_in(&live)?,
            E::MemoryPromoted
            | E::MemoryExpired
            | E::MemoryDeprecated
            | E::MemorySuperseded
            | E::MemoryInvalidated => only_in(&[S::Executing, S::Committed])?,
            _ => match t.category() {
                Category::Cognitive => only_in(&[S::Executing])?,
                // Validation checks are work too (process.exec against the staged tree).
                Category::Domain => only_in(&[S::Executing, S::Validating])?,
                _ => unreachable_category(t)?,
            },
        }
        Ok(next)
    }
}

/// Every type is matched above; this keeps the match total without a panic if one is added.
fn unreachable_category(t: EventType) -> Result<(), StateError> {
    Err(StateError::NotAllowedIn {
        event_type: t,
        state: RunState::Terminated,
    })
}
