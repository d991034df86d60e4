//! The run state machine (ICE-SPEC §4):
//!
//! ```text
//! CREATED → PROVISIONED → CONTEXT_READY → EXECUTING ⇄ SUSPENDED
//! EXECUTING → VALIDATING → COMMITTED → TERMINATED
//! EXECUTING | SUSPENDED | VALIDATING → ABORTED → TERMINATED
//! any non-terminal → TERMINATED_BY_RUNTIME → TERMINATED
//! ```
//!
//! "No other edge exists. Abort after commit is impossible. A run executes once." Resumption
//! needs a reconfiguration record (A-004, I-004).

mod common;

use common::*;
use ice_kernel::{EventType, Lifecycle, RunState, StateError, ValidationError, ValidationOutcome};
use proptest::prelude::*;

use RunState::*;

/// The spec's edges, transcribed from the diagram above.
const SPEC_EDGES: &[(RunState, RunState)] = &[
    (Created, Provisioned),
    (Provisioned, ContextReady),
    (ContextReady, Executing),
    (Executing, Suspended),
    (Suspended, Executing),
    (Executing, Validating),
    (Validating, Committed),
    (Committed, Terminated),
    (Executing, Aborted),
    (Suspended, Aborted),
    (Validating, Aborted),
    (Aborted, Terminated),
    // "any non-terminal": the states in which the run has not reached an outcome yet.
    (Created, TerminatedByRuntime),
    (Provisioned, TerminatedByRuntime),
    (ContextReady, TerminatedByRuntime),
    (Executing, TerminatedByRuntime),
    (Suspended, TerminatedByRuntime),
    (Validating, TerminatedByRuntime),
    (TerminatedByRuntime, Terminated),
];

const NON_TERMINAL: &[RunState] = &[
    Created,
    Provisioned,
    ContextReady,
    Executing,
    Suspended,
    Validating,
];

fn spec_edge(from: RunState, to: RunState) -> bool {
    SPEC_EDGES.contains(&(from, to))
}

#[test]
fn run_states_are_the_specs_ten() {
    let names: Vec<&str> = RunState::ALL.iter().map(|s| s.name()).collect();
    assert_eq!(
        names,
        [
            "CREATED",
            "PROVISIONED",
            "CONTEXT_READY",
            "EXECUTING",
            "SUSPENDED",
            "VALIDATING",
            "COMMITTED",
            "ABORTED",
            "TERMINATED_BY_RUNTIME",
            "TERMINATED",
        ]
    );
    for s in RunState::ALL {
        assert_eq!(s.to_string(), s.name());
        // The serialised name is the spec's name too.
        assert_eq!(serde_json::to_value(s).unwrap(), s.name());
    }
}

#[test]
fn the_state_machine_has_exactly_the_specs_edges() {
    let mut wrong = Vec::new();
    for from in RunState::ALL {
        for to in RunState::ALL {
            let (code, spec) = (from.has_edge_to(*to), spec_edge(*from, *to));
            if code != spec {
                wrong.push(format!(
                    "{from} → {to}: kernel says {code}, spec says {spec}"
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "edges differ:\n{}", wrong.join("\n"));
}

#[test]
fn non_terminal_states_are_those_without_an_outcome() {
    for s in RunState::ALL {
        assert_eq!(
            s.is_non_terminal(),
            NON_TERMINAL.contains(s),
            "{s} non-terminal?"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Walking the machine with events
// ---------------------------------------------------------------------------------------------

fn refused_by_state(got: Result<ice_kernel::SealedEvent, ValidationError>) -> StateError {
    match got {
        Err(ValidationError::State(e)) => e,
        other => panic!("expected a run-state refusal, got {other:?}"),
    }
}

#[test]
fn the_happy_path_walks_every_phase_to_terminated() {
    use EventType as E;
    let mut run = Run::new("happy");
    let steps = [
        (E::RunProvisioned, Provisioned),
        (E::ResourcesAllocated, Provisioned),
        (E::ContextResolved, ContextReady),
        (E::MemoryMounted, ContextReady),
        (E::CapabilitiesBound, ContextReady),
        (E::ExecutionWindowOpened, Executing),
        (E::InferenceStep, Executing),
        (E::CapabilityRequested, Executing),
        (E::CapabilityGranted, Executing),
        (E::FileWritten, Executing),
        (E::ValidationStarted, Validating),
        (E::ValidationPassed, Validating),
        (E::EffectApplied, Validating),
        (E::RunCommitted, Committed),
        (E::ResourcesReleased, Committed),
        (E::RunTerminated, Terminated),
    ];
    for (i, (t, state)) in steps.iter().enumerate() {
        let e = run.push(*t);
        assert_eq!(e.event().run_seq, i as u64);
        assert_eq!(e.event_type(), *t);
        assert_eq!(run.head.state(), *state, "after {t}");
        let expected = match t {
            E::InferenceStep | E::CapabilityRequested => Kind::Agent,
            _ => Kind::Runtime,
        };
        assert_eq!(Kind::of(&e.event().origin), expected, "origin of {t}");
    }
    assert_eq!(run.head.lifecycle.validation, ValidationOutcome::Passed);
}

#[test]
fn abort_after_commit_is_impossible() {
    let run = Run::at(Committed);
    assert_eq!(
        refused_by_state(run.try_seal(draft(EventType::RunAborted))),
        StateError::IllegalEdge {
            event_type: EventType::RunAborted,
            from: Committed,
            to: Aborted
        }
    );
    // Nor after the teardown that follows a commit.
    let mut run = run;
    run.push(EventType::ResourcesReleased);
    refused_by_state(run.try_seal(draft(EventType::RunAborted)));
}

#[test]
fn abort_is_possible_only_while_executing_suspended_or_validating() {
    for state in RunState::ALL {
        let got = Run::at(*state).try_seal(draft(EventType::RunAborted));
        if [Executing, Suspended, Validating].contains(state) {
            assert!(got.is_ok(), "abort refused in {state}: {got:?}");
        } else {
            refused_by_state(got);
        }
    }
}

#[test]
fn a_run_commits_only_after_validation_passed() {
    // Straight from EXECUTING: no such edge.
    assert_eq!(
        refused_by_state(Run::at(Executing).try_seal(draft(EventType::RunCommitted))),
        StateError::IllegalEdge {
            event_type: EventType::RunCommitted,
            from: Executing,
            to: Committed
        }
    );
    // VALIDATING, no outcome yet.
    assert!(matches!(
        refused_by_state(Run::at(Validating).try_seal(draft(EventType::RunCommitted))),
        StateError::Precondition { .. }
    ));
    // VALIDATING, passed.
    let mut run = Run::at(Validating);
    run.push(EventType::ValidationPassed);
    run.push(EventType::RunCommitted);
    assert_eq!(run.head.state(), Committed);
}

#[test]
fn a_run_whose_validation_failed_cannot_commit() {
    let mut run = Run::at(Validating);
    run.push(EventType::ValidationFailed);
    assert!(matches!(
        refused_by_state(run.try_seal(draft(EventType::RunCommitted))),
        StateError::Precondition { .. }
    ));
    assert!(matches!(
        refused_by_state(run.try_seal(draft(EventType::EffectApplied))),
        StateError::Precondition { .. }
    ));
    // It aborts instead, and tears down.
    for t in [
        EventType::RunAborted,
        EventType::AbortReasonDeclared,
        EventType::ResourcesReleased,
        EventType::RunTerminated,
    ] {
        run.push(t);
    }
    assert_eq!(run.head.state(), Terminated);
}

#[test]
fn a_validation_phase_has_one_outcome() {
    for (first, second) in [
        (EventType::ValidationPassed, EventType::ValidationFailed),
        (EventType::ValidationFailed, EventType::ValidationPassed),
        (EventType::ValidationPassed, EventType::ValidationPassed),
    ] {
        let mut run = Run::at(Validating);
        run.push(first);
        assert!(
            matches!(
                refused_by_state(run.try_seal(draft(second))),
                StateError::Precondition { .. }
            ),
            "{second} after {first}"
        );
    }
}

#[test]
fn staged_effects_apply_only_after_validation_passed() {
    for state in RunState::ALL {
        refused_by_state(Run::at(*state).try_seal(draft(EventType::EffectApplied)));
    }
    let mut run = Run::at(Validating);
    run.push(EventType::ValidationPassed);
    run.push(EventType::EffectApplied);
    run.push(EventType::EffectApplied);
}

#[test]
fn resume_without_a_reconfiguration_record_is_refused() {
    let run = Run::at(Suspended);
    assert!(matches!(
        refused_by_state(run.try_seal(draft(EventType::RunResumed))),
        StateError::Precondition { .. }
    ));
}

#[test]
fn resume_after_a_reconfiguration_record_is_accepted() {
    let mut run = Run::at(Suspended);
    let r = run.push(EventType::ReconfigurationRecorded);
    assert_eq!(Kind::of(&r.event().origin), Kind::Operator);
    assert_eq!(run.head.state(), Suspended, "recording does not resume");
    run.push(EventType::RunResumed);
    assert_eq!(run.head.state(), Executing);
}

#[test]
fn each_suspension_needs_its_own_reconfiguration_record() {
    let mut run = Run::at(Suspended);
    run.push(EventType::ReconfigurationRecorded);
    run.push(EventType::RunResumed);
    run.push(EventType::RunSuspended);
    assert!(matches!(
        refused_by_state(run.try_seal(draft(EventType::RunResumed))),
        StateError::Precondition { .. }
    ));
}

#[test]
fn a_reconfiguration_is_recorded_only_while_suspended() {
    for state in RunState::ALL.iter().filter(|s| **s != Suspended) {
        refused_by_state(Run::at(*state).try_seal(draft(EventType::ReconfigurationRecorded)));
    }
}

#[test]
fn the_runtime_can_terminate_a_run_from_every_non_terminal_state() {
    for state in NON_TERMINAL {
        let mut run = Run::at(*state);
        run.push(EventType::RunTerminatedByRuntime);
        assert_eq!(run.head.state(), TerminatedByRuntime, "from {state}");
        run.push(EventType::ResourcesReleased);
        run.push(EventType::RunTerminated);
        assert_eq!(run.head.state(), Terminated, "from {state}");
    }
}

#[test]
fn the_runtime_cannot_terminate_a_run_that_has_ended() {
    for state in [Committed, Aborted, TerminatedByRuntime, Terminated] {
        let got = Run::at(state).try_seal(draft(EventType::RunTerminatedByRuntime));
        assert!(
            matches!(
                refused_by_state(got),
                StateError::IllegalEdge {
                    to: TerminatedByRuntime,
                    ..
                }
            ),
            "from {state}"
        );
    }
}

#[test]
fn nothing_follows_terminated() {
    let ways = [
        path_to(Terminated),
        {
            let mut p = path_to(Aborted);
            p.push(EventType::RunTerminated);
            p
        },
        {
            let mut p = path_to(Created);
            p.extend([EventType::RunTerminatedByRuntime, EventType::RunTerminated]);
            p
        },
    ];
    for path in ways {
        let run = Run::after("run", &path);
        assert_eq!(run.head.state(), Terminated);
        for t in EventType::ALL {
            refused_by_state(run.try_seal(draft(*t)));
        }
    }
}

#[test]
fn a_run_executes_once() {
    // The execution window opens from CONTEXT_READY only; once the run has moved on to
    // validation (or ended), nothing brings it back to EXECUTING.
    for state in RunState::ALL
        .iter()
        .filter(|s| ![ContextReady, Suspended].contains(s))
    {
        refused_by_state(Run::at(*state).try_seal(draft(EventType::ExecutionWindowOpened)));
    }
    for outcome in [
        None,
        Some(EventType::ValidationPassed),
        Some(EventType::ValidationFailed),
    ] {
        let mut run = Run::at(Validating);
        if let Some(o) = outcome {
            run.push(o);
        }
        for t in EventType::ALL {
            let mut copy = run.clone();
            if copy.seal(draft(*t)).is_ok() {
                assert_ne!(
                    copy.head.state(),
                    Executing,
                    "{t} took a validating run back to EXECUTING"
                );
            }
        }
    }
}

/// A suspended run returns to EXECUTING only by `RunResumed` after a reconfiguration record
/// (A-004); a second `ExecutionWindowOpened` must not reopen it.
#[test]

fn a_suspended_run_cannot_be_reopened_by_an_execution_window() {
    let run = Run::at(Suspended);
    refused_by_state(run.try_seal(draft(EventType::ExecutionWindowOpened)));
}

#[test]
fn phase_events_happen_in_their_phase() {
    use EventType as E;
    // Spec §4: provision (RunProvisioned, ResourcesAllocated); context (ContextResolved,
    // MemoryMounted, CapabilitiesBound); abort (RunAborted, AbortReasonDeclared).
    let phases: &[(EventType, &[RunState])] = &[
        (E::ResourcesAllocated, &[Provisioned]),
        (E::MemoryMounted, &[ContextReady]),
        (E::CapabilitiesBound, &[ContextReady]),
        (E::ValidationPassed, &[Validating]),
        (E::ValidationFailed, &[Validating]),
        (E::AbortReasonDeclared, &[Aborted]),
        (
            E::ResourcesReleased,
            &[Committed, Aborted, TerminatedByRuntime],
        ),
        // Taxonomy v2: a policy reload is recorded while the run executes (a suspended run
        // takes a new policy on only when it resumes, after RunResumed).
        (E::PolicyReloaded, &[Executing]),
    ];
    for (t, states) in phases {
        for s in RunState::ALL {
            let got = Run::at(*s).try_seal(draft(*t));
            assert_eq!(got.is_ok(), states.contains(s), "{t} in {s}: {got:?}");
        }
    }
}

#[test]
fn agents_propose_only_while_executing() {
    for t in EventType::ALL
        .iter()
        .filter(|t| spec_kind(t.name()) == Kind::Agent)
    {
        for s in RunState::ALL {
            let got = Run::at(*s).try_seal(draft(*t));
            assert_eq!(got.is_ok(), *s == Executing, "{t} in {s}: {got:?}");
        }
    }
}

#[test]
fn a_grant_is_used_only_while_executing() {
    // Spec §5: use is checked at the moment of use: … run is EXECUTING.
    for s in RunState::ALL {
        let got = Run::at(*s).try_seal(draft(EventType::CapabilityUsed));
        assert_eq!(got.is_ok(), *s == Executing, "CapabilityUsed in {s}");
    }
}

#[test]
fn a_kill_request_is_accepted_until_the_run_ends_and_changes_no_state() {
    for s in RunState::ALL {
        let mut run = Run::at(*s);
        let got = run.seal(draft(EventType::RunKillRequested));
        if s.is_non_terminal() {
            assert!(got.is_ok(), "kill request refused in {s}");
            assert_eq!(run.head.state(), *s);
        } else {
            refused_by_state(got);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Property: any sequence of events moves only along the spec's edges
// ---------------------------------------------------------------------------------------------

/// Pick the next type: mostly one the lifecycle admits (so runs get far), sometimes any type.
fn pick(lc: &Lifecycle, any: bool, index: usize) -> EventType {
    let admitted: Vec<EventType> = EventType::ALL
        .iter()
        .copied()
        .filter(|t| lc.step(*t).is_ok())
        .collect();
    if any || admitted.is_empty() {
        EventType::ALL[index % EventType::ALL.len()]
    } else {
        admitted[index % admitted.len()]
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_accepted_step_moves_along_a_spec_edge(
        choices in prop::collection::vec((any::<u8>(), any::<usize>()), 0..80)
    ) {
        let mut lc = Lifecycle::default();
        for (coin, index) in choices {
            let t = pick(&lc, coin < 64, index);
            let from = lc.state;
            // A refused step changes nothing: `step` is pure and `lc` keeps its value.
            if let Ok(next) = lc.step(t) {
                prop_assert!(
                    from == next.state || spec_edge(from, next.state),
                    "{t} moved {from} → {} which is not a spec edge", next.state
                );
                prop_assert!(from == next.state || from.has_edge_to(next.state));
                prop_assert_ne!(from, Terminated, "{} accepted after TERMINATED", t);
                lc = next;
            }
        }
    }

    #[test]
    fn terminated_is_final(
        prefix in prop::sample::select(vec![Committed, Aborted, TerminatedByRuntime]),
        tail in prop::collection::vec(any::<usize>(), 1..40)
    ) {
        let mut run = Run::at(prefix);
        run.push(EventType::RunTerminated);
        let end = run.head.clone();
        for index in tail {
            let t = EventType::ALL[index % EventType::ALL.len()];
            prop_assert!(end.lifecycle.step(t).is_err(), "{} accepted after TERMINATED", t);
            prop_assert!(run.try_seal(draft(t)).is_err());
        }
        prop_assert_eq!(run.head, end);
    }
}

/// The execution window a wall-time budget is spent by: it opens at `ExecutionWindowOpened`,
/// closes at a suspension, reopens (counting afresh) at `RunResumed`, and closes for good when
/// validation starts or the run is stopped; events in between change nothing.
#[test]
fn the_execution_window_opens_closes_and_reopens_on_resume() {
    use ice_kernel::{Timestamp, Window};
    let at = |s: i64| Timestamp::from_unix_us(1_700_000_000_000_000 + s * 1_000_000).unwrap();
    let mut w = Window::default();
    assert_eq!(w.elapsed_us(at(100)), None);
    w.apply(EventType::RunProvisioned, at(0));
    assert_eq!(w.elapsed_us(at(100)), None);
    w.apply(EventType::ExecutionWindowOpened, at(1));
    w.apply(EventType::CapabilityRequested, at(2));
    assert_eq!(w.elapsed_us(at(5)), Some(4_000_000));
    w.apply(EventType::RunSuspended, at(6));
    assert_eq!(w.elapsed_us(at(100)), Some(5_000_000));
    w.apply(EventType::RunResumed, at(50));
    assert_eq!(w.elapsed_us(at(53)), Some(3_000_000));
    w.apply(EventType::ValidationStarted, at(60));
    // Closed once: a later stop does not move its end.
    w.apply(EventType::RunTerminatedByRuntime, at(70));
    assert_eq!(w.elapsed_us(at(100)), Some(10_000_000));
    for stop in [EventType::RunAborted, EventType::RunTerminatedByRuntime] {
        let mut w = Window::default();
        w.apply(EventType::ExecutionWindowOpened, at(1));
        w.apply(stop, at(3));
        assert_eq!(w.elapsed_us(at(100)), Some(2_000_000), "{stop:?}");
    }
}
