//! The law the validator enforces (ICE-SPEC §1 A-002, §3): the closed taxonomy, the origin law,
//! required fields, causes, time order, the chain, structure limits, and the order in which
//! the rules run (structure → taxonomy → origin law → run state → time order → causes →
//! `run_seq`/`prev`/`hash`; the first failure rejects the event and changes nothing).

mod common;

use std::collections::HashSet;

use common::*;
use ice_kernel::limits::{
    MAX_CAUSES, MAX_INLINE_PAYLOAD_BYTES, MAX_JSON_DEPTH, MAX_SAFE_INTEGER, MAX_TEXT_LEN,
};
use ice_kernel::{
    ChainError, Cost, Digest, Draft, EventId, EventType, Origin, RunState, StateError,
    TAXONOMY_VERSION, ValidationError,
};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// Taxonomy
// ---------------------------------------------------------------------------------------------

#[test]
fn the_taxonomy_is_exactly_the_spec_rows_and_the_documented_additions() {
    assert_eq!(TAXONOMY_VERSION, 2);
    let mut spec: Vec<&str> = spec_rows()
        .iter()
        .flat_map(|(_, row, _)| row.iter().copied())
        .collect();
    spec.sort_unstable();
    let before = spec.len();
    spec.dedup();
    assert_eq!(before, spec.len(), "a type appears in two rows of the spec");
    let mut kernel: Vec<&str> = EventType::ALL.iter().map(|t| t.name()).collect();
    kernel.sort_unstable();
    assert_eq!(
        kernel, spec,
        "the kernel's taxonomy differs from the spec's rows"
    );
    for t in EventType::ALL {
        assert_eq!(EventType::from_name(t.name()), Some(*t));
        assert_eq!(t.to_string(), t.name());
    }
}

#[test]
fn unknown_types_are_rejected_by_the_taxonomy_rule() {
    let names = [
        "",
        "runprovisioned",
        "RUNPROVISIONED",
        "RunProvisioned ",
        " RunProvisioned",
        "FileDeleted",
        "CapabilityRequest",
        "RunTerminatedByOperator",
        "ExecutionWindowClosed",
    ];
    for state in [RunState::Created, RunState::Executing] {
        let run = Run::at(state);
        for name in names {
            for kind in Kind::ALL {
                let d = Draft::new(name, kind.origin()).intent("i").authority("a");
                assert_eq!(
                    run.try_seal(d),
                    Err(ValidationError::UnknownType {
                        name: name.into(),
                        version: TAXONOMY_VERSION
                    }),
                    "{name:?} from {kind:?} in {state}"
                );
            }
            // The same on the read path: an event read back is held to the same taxonomy.
            let e = run.next_event(name, Origin::Runtime);
            assert!(
                matches!(run.try_admit(e), Err(ValidationError::UnknownType { .. })),
                "{name:?} admitted in {state}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Origin law
// ---------------------------------------------------------------------------------------------

/// Every type of `row`, from every origin kind, in a state that admits the type: exactly the
/// row's own kind is accepted; every other kind gets `OriginForbidden` and changes nothing.
fn assert_row_emitted_only_by(row: &[&str], allowed: Kind) {
    let mut broken = Vec::new();
    for name in row {
        let t = ty(name);
        let run = Run::after("run", &admitting_path(t));
        for kind in Kind::ALL {
            for origin in origins_of(kind) {
                let d = Draft::new(*name, origin.clone())
                    .intent("declared purpose")
                    .authority("grant:1");
                let got = run.try_seal(d);
                let ok = if kind == allowed {
                    got.is_ok()
                } else {
                    got == Err(ValidationError::OriginForbidden {
                        origin: origin.clone(),
                        event_type: t,
                        allowed: allowed.row_name(),
                    })
                };
                if !ok {
                    broken.push(format!(
                        "{origin} emitting {name} in {}: {got:?}",
                        run.head.state()
                    ));
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "only {allowed:?} may emit these types:\n{}",
        broken.join("\n")
    );
}

fn origins_of(kind: Kind) -> Vec<Origin> {
    match kind {
        Kind::Runtime => vec![Origin::Runtime],
        Kind::Agent => vec![
            Origin::Agent("x".into()),
            Origin::Agent("planner-7".into()),
            Origin::Agent("claude@host".into()),
        ],
        Kind::Operator => vec![
            Origin::Operator("x".into()),
            Origin::Operator("alice@example.org".into()),
        ],
    }
}

#[test]
fn runtime_row_is_emitted_by_runtime_only() {
    assert_row_emitted_only_by(RUNTIME_ROW, Kind::Runtime);
}

#[test]
fn operator_row_is_emitted_by_operators_only() {
    assert_row_emitted_only_by(OPERATOR_ROW, Kind::Operator);
}

#[test]
fn cognitive_row_is_emitted_by_agents_only() {
    assert_row_emitted_only_by(COGNITIVE_ROW, Kind::Agent);
}

#[test]
fn domain_row_is_emitted_by_runtime_only() {
    assert_row_emitted_only_by(DOMAIN_ROW, Kind::Runtime);
}

#[test]
fn memory_row_is_emitted_by_runtime_only() {
    assert_row_emitted_only_by(MEMORY_ROW, Kind::Runtime);
}

#[test]
fn capability_request_is_emitted_by_agents_only() {
    assert_row_emitted_only_by(CAPABILITY_REQUEST_ROW, Kind::Agent);
}

#[test]
fn capability_decisions_are_emitted_by_runtime_only() {
    assert_row_emitted_only_by(CAPABILITY_DECISION_ROW, Kind::Runtime);
}

/// an agent emits cognitive events and `CapabilityRequested`, nothing else.
#[test]
fn agent_cannot_emit_anything_but_proposals() {
    let proposals: Vec<&str> = COGNITIVE_ROW
        .iter()
        .chain(CAPABILITY_REQUEST_ROW)
        .copied()
        .collect();
    for t in EventType::ALL {
        let run = Run::after("run", &admitting_path(*t));
        let got = run.try_seal(
            Draft::new(t.name(), Origin::Agent("a1".into()))
                .intent("i")
                .authority("a"),
        );
        if proposals.contains(&t.name()) {
            assert!(got.is_ok(), "agent refused {t}: {got:?}");
        } else {
            assert!(
                matches!(got, Err(ValidationError::OriginForbidden { .. })),
                "agent emitted {t}: {got:?}"
            );
        }
    }
}

/// The origin law runs before the run-state rule, so a forbidden pair is reported as such in
/// every state, including states that would refuse the type anyway.
#[test]
fn origin_law_is_checked_before_run_state() {
    for state in RunState::ALL {
        let run = Run::at(*state);
        for t in EventType::ALL {
            let allowed = spec_kind(t.name());
            for kind in Kind::ALL.into_iter().filter(|k| *k != allowed) {
                let got = run.try_seal(
                    Draft::new(t.name(), kind.origin())
                        .intent("i")
                        .authority("a"),
                );
                assert_eq!(
                    got,
                    Err(ValidationError::OriginForbidden {
                        origin: kind.origin(),
                        event_type: *t,
                        allowed: allowed.row_name(),
                    }),
                    "{kind:?} emitting {t} in {state}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Required fields
// ---------------------------------------------------------------------------------------------

/// The kernel's effect events. The spec names the category ("effect events") without listing
/// it; this pins the kernel's choice so a change to it is a visible decision.
const EFFECT_EVENTS: &[&str] = &[
    "FileRead",
    "FileWritten",
    "EffectStaged",
    "EffectApplied",
    "ToolInvoked",
    "APIRequestExecuted",
    "UserNotificationSent",
    "CapabilityUsed",
];

/// Spec §3: `intent` is required on agent events and effect events.
fn requires_intent(name: &str) -> bool {
    EFFECT_EVENTS.contains(&name)
        || COGNITIVE_ROW.contains(&name)
        || CAPABILITY_REQUEST_ROW.contains(&name)
}

/// Spec §3: `authority` is required on effect events and grant events.
fn requires_authority(name: &str) -> bool {
    EFFECT_EVENTS.contains(&name) || name == "CapabilityGranted"
}

#[test]
fn agent_and_effect_events_without_intent_are_rejected() {
    for t in EventType::ALL.iter().filter(|t| requires_intent(t.name())) {
        let run = Run::after("run", &admitting_path(*t));
        let d = Draft::new(t.name(), spec_kind(t.name()).origin()).authority("grant:1");
        assert_eq!(
            run.try_seal(d),
            Err(ValidationError::MissingField {
                event_type: *t,
                field: "intent"
            }),
            "{t} without intent"
        );
    }
}

#[test]
fn effect_and_grant_events_without_authority_are_rejected() {
    for t in EventType::ALL
        .iter()
        .filter(|t| requires_authority(t.name()))
    {
        let run = Run::after("run", &admitting_path(*t));
        let d = Draft::new(t.name(), spec_kind(t.name()).origin()).intent("purpose");
        assert_eq!(
            run.try_seal(d),
            Err(ValidationError::MissingField {
                event_type: *t,
                field: "authority"
            }),
            "{t} without authority"
        );
    }
}

#[test]
fn events_that_require_neither_field_are_accepted_without_them() {
    for t in EventType::ALL
        .iter()
        .filter(|t| !requires_intent(t.name()) && !requires_authority(t.name()))
    {
        let run = Run::after("run", &admitting_path(*t));
        let d = Draft::new(t.name(), spec_kind(t.name()).origin());
        assert!(run.try_seal(d).is_ok(), "{t} needs no intent or authority");
    }
}

#[test]
fn a_missing_required_field_is_reported_before_the_origin_law() {
    // An agent writing a file without intent: the event is malformed for its type before it is
    // forbidden for its origin.
    let run = Run::at(RunState::Executing);
    let d = Draft::new("FileWritten", Origin::Agent("a1".into())).authority("grant:1");
    assert_eq!(
        run.try_seal(d),
        Err(ValidationError::MissingField {
            event_type: EventType::FileWritten,
            field: "intent"
        })
    );
}

// ---------------------------------------------------------------------------------------------
// Causes
// ---------------------------------------------------------------------------------------------

fn file_written() -> Draft {
    draft(EventType::FileWritten)
}

#[test]
fn a_cause_in_the_same_run_must_already_exist() {
    let run = Run::at(RunState::Executing); // events 0, 1, 2
    let id = |seq| EventId::new(run_id("run"), seq);
    // The event itself (seq 3) and later ones do not exist yet.
    for seq in [3, 4, 100] {
        assert_eq!(
            run.try_seal(file_written().cause(id(seq))),
            Err(ValidationError::UnknownCause { cause: id(seq) }),
            "cause run:{seq}"
        );
    }
    for seq in [0, 1, 2] {
        assert!(run.try_seal(file_written().cause(id(seq))).is_ok());
    }
}

#[test]
fn a_cause_in_a_run_the_index_does_not_know_is_rejected() {
    let run = Run::at(RunState::Executing);
    let other = EventId::new(run_id("other-run"), 0);
    let empty: HashSet<EventId> = HashSet::new();
    assert_eq!(
        run.try_seal_with(file_written().cause(other.clone()), &empty),
        Err(ValidationError::UnknownCause {
            cause: other.clone()
        })
    );
    // NoOtherRuns knows no other run at all.
    assert_eq!(
        run.try_seal(file_written().cause(other.clone())),
        Err(ValidationError::UnknownCause { cause: other })
    );
}

#[test]
fn a_cause_in_another_run_that_exists_is_accepted() {
    let mut run = Run::at(RunState::Executing);
    let other = EventId::new(run_id("other-run"), 7);
    let index: HashSet<EventId> = [other.clone()].into_iter().collect();
    let e = run
        .seal_with(
            file_written()
                .cause(other.clone())
                .cause(EventId::new(run_id("run"), 2)),
            &index,
        )
        .expect("an existing cause in another run");
    assert_eq!(e.event().causes[0], other);
    // A neighbour of the indexed event is still unknown.
    let missing = EventId::new(run_id("other-run"), 8);
    assert_eq!(
        run.try_seal_with(file_written().cause(missing.clone()), &index),
        Err(ValidationError::UnknownCause { cause: missing })
    );
}

// ---------------------------------------------------------------------------------------------
// Time order
// ---------------------------------------------------------------------------------------------

#[test]
fn time_going_backwards_within_a_run_is_rejected() {
    let run = Run::at(RunState::Executing);
    let previous = run.head.last_at.expect("the run has events");
    let mut e = run.next_event("TaskStarted", Origin::Runtime);
    e.at = time(run.clock_us - 1);
    let e = rehashed(e);
    assert_eq!(
        run.try_admit(e.clone()),
        Err(ValidationError::TimeWentBackwards { at: e.at, previous })
    );
    // The same on the write path: sealing at an earlier reading of the clock.
    let mut head = run.head.clone();
    let got = head.seal(
        draft(EventType::TaskStarted),
        e.at,
        &ice_kernel::NoOtherRuns,
    );
    assert!(matches!(
        got,
        Err(ValidationError::TimeWentBackwards { .. })
    ));
    assert_eq!(head, run.head);
}

#[test]
fn equal_times_within_a_run_are_accepted() {
    let run = Run::at(RunState::Executing);
    let mut e = run.next_event("TaskStarted", Origin::Runtime);
    e.at = run.head.last_at.expect("the run has events");
    assert!(run.try_admit(rehashed(e)).is_ok(), "time is non-decreasing");
}

// ---------------------------------------------------------------------------------------------
// The chain
// ---------------------------------------------------------------------------------------------

#[test]
fn a_gap_in_run_seq_is_rejected() {
    let run = Run::at(RunState::Executing);
    let mut e = run.next_event("TaskStarted", Origin::Runtime);
    e.run_seq += 1;
    assert_eq!(
        run.try_admit(rehashed(e)),
        Err(ValidationError::Chain(ChainError::Gap {
            expected: 3,
            got: 4
        }))
    );
}

#[test]
fn a_repeated_run_seq_is_rejected() {
    let run = Run::at(RunState::Executing);
    for seq in [2, 0] {
        let mut e = run.next_event("TaskStarted", Origin::Runtime);
        e.run_seq = seq;
        assert_eq!(
            run.try_admit(rehashed(e)),
            Err(ValidationError::Chain(ChainError::Repeat {
                expected: 3,
                got: seq
            }))
        );
    }
}

#[test]
fn a_prev_that_is_not_the_previous_hash_is_rejected() {
    let run = Run::at(RunState::Executing);
    for wrong in [Digest::GENESIS, Digest([0xab; 32])] {
        let mut e = run.next_event("TaskStarted", Origin::Runtime);
        e.prev = wrong;
        assert_eq!(
            run.try_admit(rehashed(e)),
            Err(ValidationError::Chain(ChainError::WrongPrev {
                expected: run.head.last_hash,
                got: wrong
            }))
        );
    }
}

#[test]
fn a_genesis_event_must_have_the_genesis_prev() {
    let run = Run::new("run");
    let mut e = run.next_event("RunProvisioned", Origin::Runtime);
    assert_eq!(e.prev, Digest::GENESIS);
    assert_eq!(Digest::GENESIS.to_hex(), "0".repeat(64));
    e.prev = Digest([1; 32]);
    assert!(matches!(
        run.try_admit(rehashed(e)),
        Err(ValidationError::Chain(ChainError::WrongPrev { .. }))
    ));
}

#[test]
fn an_event_of_another_run_is_rejected() {
    let run = Run::at(RunState::Executing);
    let mut e = run.next_event("TaskStarted", Origin::Runtime);
    e.run_id = run_id("another");
    assert_eq!(
        run.try_admit(rehashed(e)),
        Err(ValidationError::Chain(ChainError::WrongRun {
            expected: run_id("run"),
            got: run_id("another")
        }))
    );
}

#[test]
fn a_hash_that_does_not_match_the_content_is_rejected() {
    let run = Run::at(RunState::Executing);
    let good = run.next_event("TaskStarted", Origin::Runtime);
    // A wrong hash on untouched content.
    let mut e = good.clone();
    e.hash = Digest([7; 32]);
    assert_eq!(
        run.try_admit(e),
        Err(ValidationError::Chain(ChainError::HashMismatch {
            stored: Digest([7; 32]),
            computed: good.hash
        }))
    );
    // Content changed after hashing.
    let mut e = good.clone();
    e.payload.insert("k".into(), json!("v"));
    assert!(matches!(
        run.try_admit(e),
        Err(ValidationError::Chain(ChainError::HashMismatch { .. }))
    ));
    assert!(run.try_admit(good).is_ok());
}

// ---------------------------------------------------------------------------------------------
// A refused event changes nothing
// ---------------------------------------------------------------------------------------------

#[test]
fn a_rejected_seal_leaves_the_run_head_unchanged() {
    let run = Run::at(RunState::Executing);
    let before = run.head.clone();
    let bad: Vec<Draft> = vec![
        draft(EventType::TaskStarted).intent(""),
        Draft::new("NoSuchType", Origin::Runtime),
        Draft::new("FileWritten", Origin::Runtime).authority("grant:1"),
        Draft {
            origin: Origin::Agent("a".into()),
            ..draft(EventType::RunAborted)
        },
        draft(EventType::RunCommitted),
        draft(EventType::TaskStarted).cause(EventId::new(run_id("run"), 99)),
    ];
    for d in bad {
        let mut head = run.head.clone();
        let got = head.seal(d.clone(), time(run.clock_us + 1), &ice_kernel::NoOtherRuns);
        assert!(got.is_err(), "{d:?} was accepted");
        assert_eq!(head, before, "refusing {d:?} moved the head");
    }
    // Time going backwards.
    let mut head = run.head.clone();
    assert!(
        head.seal(
            draft(EventType::TaskStarted),
            time(0),
            &ice_kernel::NoOtherRuns
        )
        .is_err()
    );
    assert_eq!(head, before);
}

#[test]
fn a_rejected_batch_seals_nothing_and_names_the_failing_draft() {
    let run = Run::at(RunState::Executing);
    let mut head = run.head.clone();
    let drafts = vec![
        draft(EventType::TaskStarted),
        draft(EventType::TaskCompleted),
        Draft::new("RunAborted", Origin::Agent("a".into())),
        draft(EventType::TaskStarted),
    ];
    let got = head.seal_batch(drafts, time(run.clock_us + 1), &ice_kernel::NoOtherRuns);
    assert!(matches!(
        got,
        Err((2, ValidationError::OriginForbidden { .. }))
    ));
    assert_eq!(head, run.head);
}

// ---------------------------------------------------------------------------------------------
// The order of the rules
// ---------------------------------------------------------------------------------------------

#[test]
fn an_unknown_type_is_reported_before_a_wrong_prev() {
    let run = Run::at(RunState::Executing);
    let mut e = run.next_event("NoSuchType", Origin::Runtime);
    e.prev = Digest([9; 32]);
    assert!(matches!(
        run.try_admit(rehashed(e)),
        Err(ValidationError::UnknownType { .. })
    ));
}

#[test]
fn a_forbidden_origin_is_reported_before_a_bad_state() {
    // ValidationPassed is refused in EXECUTING and forbidden to agents: the origin law wins.
    let run = Run::at(RunState::Executing);
    assert!(matches!(
        run.try_seal(Draft::new("ValidationPassed", Origin::Agent("a".into()))),
        Err(ValidationError::OriginForbidden { .. })
    ));
}

/// One event that breaks every rule at once; mending one rule at a time, the reported error
/// walks down the spec's list, one rule at a time, until the event is accepted.
#[test]
fn validation_reports_the_earliest_broken_rule() {
    let run = Run::at(RunState::ContextReady); // events 0, 1 at ticks 1, 2
    let mut e = run.next_event("FileWritten", Origin::Agent("a".into()));
    e.intent = Some("   ".into()); // 1. structure: blank intent
    e.authority = None; // 2. taxonomy: FileWritten needs authority
    e.at = time(1); // 5. earlier than the last event (tick 2)
    e.causes = vec![EventId::new(run_id("run"), 7)]; // 6. does not exist
    e.run_seq = 5; // 7. a gap
    e.prev = Digest([1; 32]); // 7. and a wrong prev
    e.hash = Digest([2; 32]); // 7. and a wrong hash

    let step = |e: &ice_kernel::Event| run.try_admit(e.clone()).map(|_| ());

    assert!(matches!(
        step(&e),
        Err(ValidationError::Structure {
            field: "intent",
            ..
        })
    ));
    e.intent = Some("write the plan".into());

    e.event_type = "FileWriten".into();
    assert!(matches!(step(&e), Err(ValidationError::UnknownType { .. })));
    e.event_type = "FileWritten".into();

    assert!(matches!(
        step(&e),
        Err(ValidationError::MissingField {
            field: "authority",
            ..
        })
    ));
    e.authority = Some("grant:1".into());

    assert!(matches!(
        step(&e),
        Err(ValidationError::OriginForbidden { .. })
    ));
    e.origin = Origin::Runtime;

    // FileWritten is refused while the run is CONTEXT_READY.
    assert!(matches!(
        step(&e),
        Err(ValidationError::State(StateError::NotAllowedIn { .. }))
    ));
    e.event_type = "CapabilitiesBound".into();

    assert!(matches!(
        step(&e),
        Err(ValidationError::TimeWentBackwards { .. })
    ));
    e.at = time(2);

    assert!(matches!(
        step(&e),
        Err(ValidationError::UnknownCause { .. })
    ));
    e.causes = vec![EventId::new(run_id("run"), 1)];

    assert!(matches!(
        step(&e),
        Err(ValidationError::Chain(ChainError::Gap { .. }))
    ));
    e.run_seq = 2;

    assert!(matches!(
        step(&e),
        Err(ValidationError::Chain(ChainError::WrongPrev { .. }))
    ));
    e.prev = run.head.last_hash;

    assert!(matches!(
        step(&e),
        Err(ValidationError::Chain(ChainError::HashMismatch { .. }))
    ));
    e.hash = e.compute_hash();

    assert_eq!(step(&e), Ok(()));
}

// ---------------------------------------------------------------------------------------------
// Structure limits
// ---------------------------------------------------------------------------------------------

fn assert_structure(got: Result<ice_kernel::SealedEvent, ValidationError>, field: &str) {
    assert_structure_says(got, field, "");
}

/// A structure error on `field` whose message mentions `needle`.
fn assert_structure_says(
    got: Result<ice_kernel::SealedEvent, ValidationError>,
    field: &str,
    needle: &str,
) {
    match got {
        Err(ValidationError::Structure { field: f, problem }) if f == field => assert!(
            problem.contains(needle),
            "structure error on {field} should mention {needle:?}: {problem}"
        ),
        other => panic!("expected a structure error on {field}, got {other:?}"),
    }
}

fn with_payload(p: Value) -> Draft {
    draft(EventType::TaskStarted).payload(p)
}

#[test]
fn payload_integers_beyond_2_pow_53_minus_1_are_rejected() {
    let run = Run::at(RunState::Executing);
    let max = MAX_SAFE_INTEGER;
    assert_eq!(max, 9_007_199_254_740_991);
    for bad in [
        json!({ "n": max + 1 }),
        json!({ "n": -(max as i64) - 1 }),
        json!({ "n": u64::MAX }),
        json!({ "n": i64::MIN }),
        json!({ "deep": { "list": [1, 2, max + 1] } }),
    ] {
        assert_structure_says(run.try_seal(with_payload(bad)), "payload", "2^53-1");
    }
    for good in [
        json!({ "n": max }),
        json!({ "n": -(max as i64) }),
        json!({ "n": 0, "f": 0.5, "big_float": 1e300 }),
    ] {
        assert!(run.try_seal(with_payload(good.clone())).is_ok(), "{good}");
    }
}

#[test]
fn other_integers_beyond_2_pow_53_minus_1_are_rejected() {
    let run = Run::at(RunState::Executing);
    let cost = Cost {
        tokens_in: MAX_SAFE_INTEGER + 1,
        ..Cost::default()
    };
    assert_structure(
        run.try_seal(draft(EventType::TaskStarted).cost(cost)),
        "cost",
    );
    let mut e = run.next_event("TaskStarted", Origin::Runtime);
    e.run_seq = MAX_SAFE_INTEGER + 1;
    assert_structure(run.try_admit(rehashed(e)), "run_seq");
}

fn nested_arrays(levels: usize) -> Value {
    let mut v = json!([]);
    for _ in 1..levels {
        v = json!([v]);
    }
    v
}

#[test]
fn payload_nesting_deeper_than_the_limit_is_rejected() {
    let run = Run::at(RunState::Executing);
    let limit = MAX_JSON_DEPTH;
    assert!(
        run.try_seal(with_payload(json!({ "x": nested_arrays(limit) })))
            .is_ok(),
        "{limit} nested arrays are within the limit"
    );
    for levels in [limit + 1, limit + 2, 2 * limit] {
        assert_structure_says(
            run.try_seal(with_payload(json!({ "x": nested_arrays(levels) }))),
            "payload",
            "deeper",
        );
    }
    // Objects count as arrays do.
    let mut v = json!({});
    for _ in 0..limit {
        v = json!({ "k": v });
    }
    assert_structure_says(
        run.try_seal(with_payload(json!({ "x": v }))),
        "payload",
        "deeper",
    );
}

#[test]
fn duplicate_causes_are_rejected() {
    let run = Run::at(RunState::Executing);
    let c = EventId::new(run_id("run"), 1);
    assert_structure_says(
        run.try_seal(file_written().cause(c.clone()).cause(c)),
        "causes",
        "twice",
    );
}

#[test]
fn more_than_the_maximum_number_of_causes_is_rejected() {
    let run = Run::at(RunState::Executing);
    let ids: Vec<EventId> = (0..=MAX_CAUSES as u64)
        .map(|i| EventId::new(run_id("earlier"), i))
        .collect();
    let index: HashSet<EventId> = ids.iter().cloned().collect();
    let with = |n: usize| {
        let mut d = file_written();
        d.causes = ids[..n].to_vec();
        run.try_seal_with(d, &index)
    };
    assert!(with(MAX_CAUSES).is_ok(), "{MAX_CAUSES} causes are allowed");
    assert_structure(with(MAX_CAUSES + 1), "causes");
}

#[test]
fn over_long_intent_or_authority_is_rejected() {
    let run = Run::at(RunState::Executing);
    let at_limit = "i".repeat(MAX_TEXT_LEN);
    let over = "i".repeat(MAX_TEXT_LEN + 1);
    assert!(
        run.try_seal(file_written().intent(at_limit.clone()))
            .is_ok()
    );
    assert!(run.try_seal(file_written().authority(at_limit)).is_ok());
    assert_structure(run.try_seal(file_written().intent(over.clone())), "intent");
    assert_structure(run.try_seal(file_written().authority(over)), "authority");
    // The limit is in bytes, not characters.
    let multibyte = "é".repeat(MAX_TEXT_LEN / 2 + 1);
    assert_structure(run.try_seal(file_written().intent(multibyte)), "intent");
}

#[test]
fn empty_intent_or_authority_is_rejected() {
    let run = Run::at(RunState::Executing);
    for blank in ["", " ", "\t\n"] {
        assert_structure(run.try_seal(file_written().intent(blank)), "intent");
        assert_structure(run.try_seal(file_written().authority(blank)), "authority");
        // Also on types that do not require the field: present means non-empty.
        assert_structure(
            run.try_seal(Draft::new("TaskStarted", Origin::Runtime).intent(blank)),
            "intent",
        );
    }
}

#[test]
fn the_reserved_blob_key_in_a_draft_is_rejected() {
    let run = Run::at(RunState::Executing);
    let forged = json!({ "$blob": Digest([3; 32]).to_hex(), "size": 10 });
    for bad in [
        json!({ "out": forged }),
        json!({ "out": { "$blob": 1 } }),
        json!({ "a": { "b": [ { "c": { "$blob": "x" } } ] } }),
    ] {
        assert_structure_says(run.try_seal(with_payload(bad)), "payload", "$blob");
    }
    // A key merely containing the word is fine.
    assert!(
        run.try_seal(with_payload(json!({ "blob": 1, "x$blob": 2 })))
            .is_ok()
    );
}

/// blob.rs: "a draft that already contains a `$blob` key anywhere is refused". A `$blob` key
/// at the top level of the payload is not refused.
#[test]

fn the_reserved_blob_key_is_rejected_at_the_top_level_of_a_draft_payload() {
    let run = Run::at(RunState::Executing);
    assert_structure_says(
        run.try_seal(with_payload(json!({ "$blob": "abc" }))),
        "payload",
        "$blob",
    );
}

#[test]
fn a_payload_too_large_to_keep_inline_is_rejected() {
    // Each field stays under the blob threshold, so nothing moves out; together they are over
    // the inline limit.
    let run = Run::at(RunState::Executing);
    let field = "x".repeat(16 * 1024 - 16);
    let n = MAX_INLINE_PAYLOAD_BYTES / field.len() + 1;
    let mut p = serde_json::Map::new();
    for i in 0..n {
        p.insert(format!("f{i:03}"), json!(field));
    }
    assert_structure_says(
        run.try_seal(with_payload(Value::Object(p))),
        "payload",
        "inline",
    );
}

#[test]
fn a_large_payload_field_moves_to_a_blob_named_by_its_digest() {
    let run = Run::at(RunState::Executing);
    let big = "y".repeat(20 * 1024);
    let mut head = run.head.clone();
    let (e, blobs) = head
        .seal(
            with_payload(json!({ "small": 1, "output": big })),
            time(run.clock_us + 1),
            &ice_kernel::NoOtherRuns,
        )
        .expect("a large field is moved, not refused");
    assert_eq!(blobs.len(), 1);
    let blob = &blobs[0];
    let canonical_field = ice_kernel::canonical::canonicalize(&json!(big)).unwrap();
    assert_eq!(blob.bytes, canonical_field);
    assert_eq!(blob.digest, Digest::of(&canonical_field));
    assert_eq!(
        e.event().payload["output"],
        json!({ "$blob": blob.digest.to_hex(), "size": canonical_field.len() })
    );
    assert_eq!(e.event().payload["small"], json!(1));
    // Read back, the reference is well formed and the event is admitted again.
    let mut again = run.head.clone();
    assert!(
        again
            .admit(e.event().clone(), &ice_kernel::NoOtherRuns)
            .is_ok()
    );
    // A malformed reference is not.
    let mut e2 = e.into_event();
    e2.payload
        .insert("output".into(), json!({ "$blob": "not-hex", "size": 1 }));
    assert_structure(run.try_admit(rehashed(e2)), "payload");
}

/// A-002 as a type: every proposal an agent can make becomes an event of the agent row of the
/// taxonomy, and the validator accepts it from that agent.
#[test]
fn every_proposal_is_an_agent_row_event() {
    use ice_kernel::{CapabilityProposal, Category, EventType, Proposal, Thought};
    let mut proposals: Vec<Proposal> = Thought::ALL
        .iter()
        .map(|k| Proposal::Think {
            kind: *k,
            intent: "think".into(),
            payload: Default::default(),
        })
        .collect();
    proposals.push(Proposal::Request(CapabilityProposal {
        capability: "fs.write".into(),
        target: "src/lib.rs".into(),
        arguments: serde_json::json!({"content": "x"}),
        intent: "write".into(),
    }));
    for p in &proposals {
        let d = p.draft("a1").expect("recorded");
        let t = EventType::from_name(&d.event_type).expect("known type");
        assert!(
            matches!(
                t.category(),
                Category::Cognitive | Category::CapabilityRequest
            ),
            "{t} is not an agent event"
        );
        assert_eq!(d.origin.to_string(), "agent:a1");
    }
    assert!(
        Proposal::Finish {
            summary: String::new()
        }
        .draft("a1")
        .is_none()
    );
}
