//! Numbers in payloads must survive the canonical form exactly (I-002): what is sealed is
//! what reads back, on every platform.

use ice_kernel::{
    Digest, Draft, Event, NoOtherRuns, Origin, RunHead, RunId, Timestamp, ValidationError,
};
use serde_json::json;

fn executing() -> RunHead {
    let mut h = RunHead::new(RunId::new("numbers").unwrap());
    let at = Timestamp::from_unix_us(1).unwrap();
    for t in ["RunProvisioned", "ContextResolved", "ExecutionWindowOpened"] {
        h.seal(Draft::new(t, Origin::Runtime), at, &NoOtherRuns)
            .unwrap();
    }
    h
}

fn seal(v: serde_json::Value) -> Result<Event, ValidationError> {
    let mut h = executing();
    let d = Draft::new("TaskStarted", Origin::Runtime).payload(json!({ "n": v }));
    h.seal(d, Timestamp::from_unix_us(2).unwrap(), &NoOtherRuns)
        .map(|(e, _)| e.into_event())
}

#[test]
fn numbers_that_round_trip_are_accepted_and_read_back_equal() {
    for v in [
        json!(0),
        json!(-0.0),
        json!(1.0),
        json!(1.5),
        json!(9007199254740991i64),
        json!(-9007199254740991i64),
        json!(1e21),
        json!(1e300),
        json!(5e-324),
    ] {
        let e = seal(v.clone()).unwrap_or_else(|err| panic!("{v} refused: {err}"));
        let back = Event::from_body(&e.canonical_body(), e.hash).unwrap();
        assert_eq!(back, e, "{v} reads back as another value");
        assert_eq!(Digest::of(&back.canonical_body()), e.hash);
    }
}

#[test]
fn numbers_the_canonical_form_would_change_are_refused_with_a_clear_error() {
    for v in [
        json!(9007199254740992u64),
        json!(-9007199254740992i64),
        json!(1e16),
        json!(9007199254740992.0),
        json!(1e20),
        json!(u64::MAX),
    ] {
        match seal(v.clone()) {
            Err(ValidationError::Structure {
                field: "payload",
                problem,
            }) => {
                assert!(problem.contains("send it as a string"), "{v}: {problem}")
            }
            other => panic!("{v} must be refused as a structure error, got {other:?}"),
        }
    }
}

#[test]
fn an_admitted_event_equals_the_event_read_back_from_the_log() {
    let mut h = executing();
    let mut e = Event {
        run_id: RunId::new("numbers").unwrap(),
        run_seq: 3,
        event_type: "TaskStarted".into(),
        origin: Origin::Runtime,
        at: Timestamp::from_unix_us(3).unwrap(),
        intent: None,
        authority: None,
        payload: json!({"float_one": 1.0}).as_object().unwrap().clone(),
        causes: vec![],
        cost: Default::default(),
        prev: h.last_hash,
        hash: Digest::GENESIS,
    };
    e.hash = e.compute_hash();
    let sealed = h.admit(e, &NoOtherRuns).unwrap();
    let back = Event::from_body(sealed.body(), sealed.event().hash).unwrap();
    assert_eq!(&back, sealed.event());
}
