//! Properties of sealed histories (proptest): whatever sequence of drafts a caller offers,
//! what the kernel seals is a hash chain; every event read back from its stored body is the
//! event that was sealed; projections rebuilt from the log equal the live ones; the
//! canonical encoding survives a JSON round trip (I-002); any valid history verifies, and any
//! single change to a stored event is caught at that event (I-003).

mod common;

use common::*;
use ice_kernel::limits::MAX_SAFE_INTEGER;
use ice_kernel::{
    Cost, Digest, Draft, Event, EventId, EventType, NoOtherRuns, Origin, Projection, RunHead,
    RunView, SealedEvent,
};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

// ---------------------------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------------------------

fn arb_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z]{0,6}",
        prop::collection::vec(any::<char>(), 0..6).prop_map(String::from_iter),
        prop::sample::select(vec![
            "", "é", "😂", "A\u{30a}", "\u{0}", "\"\\/", "\u{2028}", "\r\n\t", "\u{fb33}",
        ])
        .prop_map(str::to_owned),
    ]
}

fn arb_number() -> impl Strategy<Value = Value> {
    let max = MAX_SAFE_INTEGER as i64;
    prop_oneof![
        (-max..=max).prop_map(Value::from),
        (-1000i64..1000).prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON numbers are finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        prop::sample::select(vec![0.0, -0.0, 1.0, 0.5, 1e21, 1e-7, 5e-324, 1.5e300])
            .prop_map(|f| json!(f)),
    ]
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        arb_number(),
        arb_text().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 24, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(arb_text(), inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn arb_payload() -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::btree_map(arb_text(), arb_json(), 0..5).prop_map(|m| m.into_iter().collect())
}

fn arb_cost() -> impl Strategy<Value = Cost> {
    let attr = || prop_oneof![3 => Just(0u64), 1 => 0..=MAX_SAFE_INTEGER];
    (attr(), attr(), attr(), attr(), attr(), attr(), attr()).prop_map(
        |(wall_time_us, tokens_in, tokens_out, tool_calls, bytes, credits_micro, risk)| Cost {
            wall_time_us,
            tokens_in,
            tokens_out,
            tool_calls,
            bytes,
            credits_micro,
            risk,
        },
    )
}

/// What a caller offers for one step; most offers are valid, some are not.
#[derive(Clone, Debug)]
struct Offer {
    /// Which kind of type to offer (see `seal_offers`).
    coin: u8,
    index: usize,
    /// Below 230: the origin the spec allows; otherwise another kind.
    origin_coin: u8,
    intent: Option<String>,
    authority: Option<String>,
    payload: Map<String, Value>,
    causes: Vec<u64>,
    cost: Cost,
    tick_us: i64,
}

fn arb_offer() -> impl Strategy<Value = Offer> {
    (
        any::<u8>(),
        any::<usize>(),
        any::<u8>(),
        prop::option::weighted(0.8, "[a-z ]{1,12}"),
        prop::option::weighted(0.8, "grant:[0-9]{1,3}"),
        arb_payload(),
        prop::collection::vec(0u64..12, 0..3),
        arb_cost(),
        0i64..2_000,
    )
        .prop_map(
            |(coin, index, origin_coin, intent, authority, payload, causes, cost, tick_us)| Offer {
                coin,
                index,
                origin_coin,
                intent,
                authority,
                payload,
                causes,
                cost,
                tick_us,
            },
        )
}

/// A run sealed from offers: the events that passed, the live view folded as they passed,
/// and the head that sealed them.
#[derive(Debug)]
struct History {
    head: RunHead,
    events: Vec<SealedEvent>,
    live: RunView,
}

fn seal_offers(offers: Vec<Offer>) -> History {
    let run = run_id("prop-run");
    let mut head = RunHead::new(run.clone());
    let mut live = RunView::new(run.clone());
    let mut events = Vec::new();
    let mut now_us = 0;
    for o in offers {
        let admitted: Vec<EventType> = EventType::ALL
            .iter()
            .copied()
            .filter(|t| head.lifecycle.step(*t).is_ok())
            .collect();
        // Mostly types that keep the run going, so histories get long; sometimes an ending or
        // any type at all (most of which the run refuses).
        let ending = [
            EventType::RunAborted,
            EventType::RunTerminatedByRuntime,
            EventType::RunTerminated,
        ];
        let going: Vec<EventType> = admitted
            .iter()
            .copied()
            .filter(|t| !ending.contains(t))
            .collect();
        let t = match o.coin {
            0..16 => EventType::ALL[o.index % EventType::ALL.len()],
            16..28 if !admitted.is_empty() => admitted[o.index % admitted.len()],
            _ if !going.is_empty() => going[o.index % going.len()],
            _ if !admitted.is_empty() => admitted[o.index % admitted.len()],
            _ => EventType::ALL[o.index % EventType::ALL.len()],
        };
        let origin = if o.origin_coin < 230 {
            spec_kind(t.name()).origin()
        } else {
            Kind::ALL[o.origin_coin as usize % 3].origin()
        };
        let mut d = Draft::new(t.name(), origin);
        d.intent = o.intent;
        d.authority = o.authority;
        d.payload = o.payload;
        d.causes = o
            .causes
            .into_iter()
            .map(|s| EventId::new(run.clone(), s))
            .collect();
        d.cost = o.cost;
        now_us += o.tick_us;
        let before = head.clone();
        match head.seal(d, time(now_us), &NoOtherRuns) {
            Ok((e, _blobs)) => {
                live.apply(e.event())
                    .expect("the live view takes every sealed event");
                events.push(e);
            }
            Err(_) => assert_eq!(head, before, "a refused draft moved the head"),
        }
    }
    History { head, events, live }
}

fn arb_history() -> impl Strategy<Value = History> {
    prop::collection::vec(arb_offer(), 0..64).prop_map(seal_offers)
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn sealed_events_form_a_hash_chain(h in arb_history()) {
        let mut prev = Digest::GENESIS;
        for (i, e) in h.events.iter().enumerate() {
            let ev = e.event();
            prop_assert_eq!(ev.run_seq, i as u64);
            prop_assert_eq!(ev.prev, prev, "event {} does not link to its predecessor", i);
            prop_assert_eq!(e.body(), &ev.canonical_body()[..]);
            prop_assert_eq!(ev.hash, Digest::of(e.body()));
            prop_assert_eq!(ev.hash, ev.compute_hash());
            prev = ev.hash;
        }
        prop_assert_eq!(h.head.last_hash, prev);
        prop_assert_eq!(h.head.next_seq, h.events.len() as u64);
    }

    #[test]
    fn an_event_rebuilt_from_its_stored_body_equals_the_sealed_event(h in arb_history()) {
        for e in &h.events {
            let rebuilt = Event::from_body(e.body(), e.event().hash);
            prop_assert!(rebuilt.is_ok(), "stored body does not parse: {:?}", rebuilt);
            prop_assert_eq!(&rebuilt.unwrap(), e.event());
        }
    }

    #[test]
    fn a_projection_folded_from_the_log_equals_the_live_one(h in arb_history()) {
        let run = h.head.run_id.clone();
        let folded = RunView::fold(run, h.events.iter().map(SealedEvent::event));
        prop_assert!(folded.is_ok(), "fold refused a sealed history: {:?}", folded);
        let folded = folded.unwrap();
        prop_assert_eq!(&folded, &h.live);
        prop_assert_eq!(&folded.head, &h.head);
        prop_assert_eq!(folded.summary.events, h.events.len() as u64);
        prop_assert_eq!(folded.summary.head, h.head.last_hash);
        prop_assert_eq!(folded.summary.state, h.head.state());
    }

    #[test]
    fn canonical_body_survives_a_json_round_trip(h in arb_history()) {
        for e in &h.events {
            let text = serde_json::to_string(e.event()).expect("an event serialises");
            let back: Result<Event, _> = serde_json::from_str(&text);
            prop_assert!(back.is_ok(), "{} does not parse back: {:?}", text, back);
            let back = back.unwrap();
            prop_assert_eq!(back.canonical_body(), e.body().to_vec());
            prop_assert_eq!(&back, e.event());
            // The whole-event canonical form parses back to the same event, too.
            let whole: Event = serde_json::from_slice(&e.event().canonical_json())
                .expect("canonical JSON of an event parses");
            prop_assert_eq!(&whole, e.event());
        }
    }

    #[test]
    fn a_sealed_history_read_back_verifies(h in arb_history()) {
        let mut verifier = RunHead::new(h.head.run_id.clone());
        for e in &h.events {
            let stored = Event::from_body(e.body(), e.event().hash).expect("parses");
            let admitted = verifier.admit(stored, &NoOtherRuns);
            prop_assert!(admitted.is_ok(), "{} refused on read-back: {:?}", e.event().id(), admitted);
            prop_assert_eq!(&admitted.unwrap(), e);
        }
        prop_assert_eq!(verifier, h.head);
    }

    #[test]
    fn any_single_change_to_a_stored_event_is_caught_at_that_event(
        h in arb_history(),
        pick in any::<prop::sample::Index>(),
        change in 0usize..10,
    ) {
        prop_assume!(!h.events.is_empty());
        let k = pick.index(h.events.len());
        let mut stored: Vec<Event> =
            h.events.iter().map(|e| e.event().clone()).collect();
        let original = stored[k].clone();
        let e = &mut stored[k];
        match change {
            0 => { e.payload.insert("\u{0}tampered".into(), json!(true)); }
            1 => e.at = ice_kernel::Timestamp::from_unix_us(e.at.unix_us() + 1).unwrap(),
            2 => e.origin = match &e.origin {
                Origin::Runtime => Origin::Operator("mallory".into()),
                _ => Origin::Runtime,
            },
            3 => e.event_type = if e.event_type == "TaskStarted" {
                "TaskCompleted".into()
            } else {
                "TaskStarted".into()
            },
            4 => e.intent = Some(format!("{} (tampered)", e.intent.clone().unwrap_or_default())),
            5 => e.cost.risk = e.cost.risk.wrapping_add(1),
            6 => e.causes.push(EventId::new(e.run_id.clone(), 0)),
            7 => e.run_seq += 1,
            8 => e.prev.0[0] ^= 1,
            _ => e.hash.0[31] ^= 1,
        }
        prop_assert_ne!(&stored[k], &original);
        let mut verifier = RunHead::new(h.head.run_id.clone());
        for (i, ev) in stored.into_iter().enumerate() {
            let r = verifier.admit(ev, &NoOtherRuns);
            if i < k {
                prop_assert!(r.is_ok(), "untouched event {} refused: {:?}", i, r);
            } else {
                prop_assert!(r.is_err(), "change {} to event {} went unnoticed", change, k);
                break;
            }
        }
    }
}

// The fast path that `verify` and replay use reads only headers; it must agree with the full
// validator on every history, and catch every single-byte change to a stored body.
proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn admitting_stored_headers_agrees_with_admitting_whole_events(h in arb_history()) {
        let mut fast = RunHead::new(h.head.run_id.clone());
        let mut view = RunView::new(h.head.run_id.clone());
        for e in &h.events {
            let header = fast.admit_stored(e.body(), e.event().hash, &NoOtherRuns);
            prop_assert!(header.is_ok(), "{} refused by the header path: {:?}", e.event().id(), header);
            let header = header.unwrap();
            prop_assert_eq!(&header, &ice_kernel::Header::of(e.event()));
            view.apply_header(&header, e.event().hash).expect("a sealed history folds");
        }
        prop_assert_eq!(&fast, &h.head);
        prop_assert_eq!(&view, &h.live);
    }

    #[test]
    fn any_single_byte_change_to_a_stored_body_is_refused_by_the_header_path(
        h in arb_history(),
        pick in any::<prop::sample::Index>(),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        prop_assume!(!h.events.is_empty());
        let k = pick.index(h.events.len());
        let mut head = RunHead::new(h.head.run_id.clone());
        for e in &h.events[..k] {
            head.admit_stored(e.body(), e.event().hash, &NoOtherRuns).expect("prefix admits");
        }
        let mut body = h.events[k].body().to_vec();
        let i = at.index(body.len());
        body[i] ^= 1 << bit;
        let before = head.clone();
        prop_assert!(head.admit_stored(&body, h.events[k].event().hash, &NoOtherRuns).is_err());
        prop_assert_eq!(head, before, "a refused event moved the head");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Sealing measures the inline payload from the event's body instead of encoding the
    /// payload again; the two must agree exactly, or the size limit would drift.
    #[test]
    fn the_payload_length_read_off_the_body_is_the_canonical_payload_length(h in arb_history()) {
        for e in &h.events {
            let ev = e.event();
            let direct = serde_jcs::to_vec(&ev.payload).expect("payload encodes").len();
            prop_assert_eq!(ev.canonical_payload_len(e.body().len()), direct);
        }
    }
}

/// Keys that exercise RFC 8785's UTF-16 ordering: characters just below and above U+E000,
/// and above U+FFFF (surrogate pairs in UTF-16), which sort differently by code point.
fn arb_tricky_key() -> impl Strategy<Value = String> {
    prop_oneof![
        arb_text(),
        prop::collection::vec(
            prop::sample::select(vec![
                'a',
                '\u{d7ff}',
                '\u{e000}',
                '\u{ffff}',
                '\u{10000}',
                '😂',
                '\u{fb33}',
                '\u{7f}'
            ]),
            0..4
        )
        .prop_map(String::from_iter),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// ICE's canonical encoder agrees with `serde_jcs` (the reference) on every JSON value.
    #[test]
    fn the_fast_canonical_encoder_agrees_with_the_reference(
        v in arb_json(),
        keys in prop::collection::btree_map(arb_tricky_key(), arb_json(), 0..6),
    ) {
        let fast = ice_kernel::canonical::canonicalize(&v).unwrap();
        prop_assert_eq!(&fast, &serde_jcs::to_vec(&v).unwrap());
        let obj = Value::Object(keys.into_iter().collect());
        let fast = ice_kernel::canonical::canonicalize(&obj).unwrap();
        prop_assert_eq!(String::from_utf8(fast).unwrap(), String::from_utf8(serde_jcs::to_vec(&obj).unwrap()).unwrap());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The event body written field by field is byte for byte the reference encoding.
    #[test]
    fn the_event_body_agrees_with_the_reference_encoding(h in arb_history()) {
        for e in &h.events {
            prop_assert_eq!(e.body(), &e.event().canonical_body_reference()[..]);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The fast header reader (used by verify and replay) reads every body the validator
    /// writes, and reads it exactly as the general reader does.
    #[test]
    fn the_fast_header_reader_reads_every_sealed_body_as_the_general_one(h in arb_history()) {
        for e in &h.events {
            let fast = ice_kernel::Header::parse_canonical(e.body());
            prop_assert!(fast.is_some(), "the fast reader refused {}", String::from_utf8_lossy(e.body()));
            let general = ice_kernel::Header::parse_general(e.body());
            prop_assert_eq!(fast, Some(general.expect("the general reader reads it")));
        }
    }

    /// Whatever a changed body looks like, the fast reader either declines it or agrees with
    /// the general reader: it never accepts what the general one refuses, or reads it otherwise.
    #[test]
    fn the_fast_header_reader_never_disagrees_on_a_changed_body(
        h in arb_history(),
        pick in any::<prop::sample::Index>(),
        at in any::<prop::sample::Index>(),
        byte in prop_oneof![Just(b'"'), Just(b'\\'), Just(b','), Just(b'}'), Just(b'0'), Just(b'a'), Just(0x01u8), Just(0xffu8), any::<u8>()],
        cut in any::<bool>(),
    ) {
        prop_assume!(!h.events.is_empty());
        let e = &h.events[pick.index(h.events.len())];
        let mut body = e.body().to_vec();
        let i = at.index(body.len());
        if cut {
            body.truncate(i);
        } else {
            body[i] = byte;
        }
        if let Some(fast) = ice_kernel::Header::parse_canonical(&body) {
            let general = ice_kernel::Header::parse_general(&body);
            prop_assert!(general.is_ok(), "fast read {:?}, general refused: {:?}", fast, general);
            prop_assert_eq!(fast, general.unwrap());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The event body against an independent encoding
// ---------------------------------------------------------------------------------------------

/// A time as its text form, written here by `format!` from its parts (not by the kernel), and
/// the kernel's reading of that text.
fn arb_time() -> impl Strategy<Value = (String, ice_kernel::Timestamp)> {
    let parts = (
        prop_oneof![Just(1970i64), Just(9999), 1970i64..=9999],
        1i64..=12,
        1i64..=31,
        0i64..24,
        0i64..60,
        0i64..60,
        prop_oneof![Just(0i64), Just(999_999), 0i64..1_000_000],
    );
    parts.prop_filter_map("a real date", |(y, mo, d, h, mi, s, us)| {
        let text = format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{us:06}Z");
        let t = ice_kernel::Timestamp::parse(&text).ok()?;
        Some((text, t))
    })
}

fn arb_run_id() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9._-]{1,12}",
        "[A-Za-z0-9._-]{120,128}",
        Just("prop-run".to_string()),
    ]
}

fn arb_seq() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..20, 0..=MAX_SAFE_INTEGER, Just(MAX_SAFE_INTEGER)]
}

/// Any origin the type can hold, ids the law would refuse included: the writer must encode
/// whatever it is handed exactly as the reference does.
fn arb_origin() -> impl Strategy<Value = Origin> {
    prop_oneof![
        Just(Origin::Runtime),
        prop_oneof!["[a-z0-9@._-]{1,10}", arb_text()].prop_map(Origin::Agent),
        prop_oneof!["[a-z0-9@._-]{1,10}", arb_text()].prop_map(Origin::Operator),
    ]
}

/// An event with every field drawn independently (not sealed: no law applies), and its
/// canonical body built by `serde_jcs` from a JSON value whose strings are written here:
/// the time by `format!`, the digest's hex byte by byte, ids and origins by `format!`.
#[derive(Debug)]
struct Drawn {
    event: Event,
    reference: Vec<u8>,
}

fn arb_drawn_event() -> impl Strategy<Value = Drawn> {
    (
        (
            arb_run_id(),
            arb_seq(),
            arb_text(),
            arb_origin(),
            arb_time(),
        ),
        (
            prop::option::of(arb_text()),
            prop::option::of(arb_text()),
            prop_oneof![
                arb_payload(),
                prop::collection::btree_map(arb_tricky_key(), arb_json(), 0..6)
                    .prop_map(|m| m.into_iter().collect()),
                // In any insertion order, which the map keeps when serde_json's
                // `preserve_order` is on (as in the workspace build): unsorted objects, small
                // and large.
                prop::collection::vec((arb_tricky_key(), arb_json()), 0..24)
                    .prop_map(|v| v.into_iter().collect()),
            ],
            prop::collection::vec((arb_run_id(), arb_seq()), 0..4),
            arb_cost(),
            any::<[u8; 32]>(),
        ),
    )
        .prop_map(
            |(
                (run, run_seq, event_type, origin, (at_text, at)),
                (intent, authority, payload, causes, cost, prev),
            )| {
                let cause_text: Vec<String> =
                    causes.iter().map(|(r, s)| format!("{r}:{s}")).collect();
                let origin_text = match &origin {
                    Origin::Runtime => "runtime".to_string(),
                    Origin::Agent(id) => format!("agent:{id}"),
                    Origin::Operator(id) => format!("operator:{id}"),
                };
                let prev_text: String = prev.iter().map(|b| format!("{b:02x}")).collect();
                let mut cost_obj = Map::new();
                for (name, v) in [
                    ("wall_time_us", cost.wall_time_us),
                    ("tokens_in", cost.tokens_in),
                    ("tokens_out", cost.tokens_out),
                    ("tool_calls", cost.tool_calls),
                    ("bytes", cost.bytes),
                    ("credits_micro", cost.credits_micro),
                    ("risk", cost.risk),
                ] {
                    if v != 0 {
                        cost_obj.insert(name.to_string(), json!(v));
                    }
                }
                let mut obj = json!({
                    "run_id": run,
                    "run_seq": run_seq,
                    "type": event_type,
                    "origin": origin_text,
                    "at": at_text,
                    "payload": payload,
                    "causes": cause_text,
                    "cost": cost_obj,
                    "prev": prev_text,
                });
                if let Some(i) = &intent {
                    obj["intent"] = json!(i);
                }
                if let Some(a) = &authority {
                    obj["authority"] = json!(a);
                }
                let run_id = run_id(&run);
                let event = Event {
                    run_id,
                    run_seq,
                    event_type,
                    origin,
                    at,
                    intent,
                    authority,
                    payload,
                    causes: causes
                        .into_iter()
                        .map(|(r, s)| EventId::new(common::run_id(&r), s))
                        .collect(),
                    cost,
                    prev: Digest(prev),
                    hash: Digest::GENESIS,
                };
                Drawn {
                    event,
                    reference: serde_jcs::to_vec(&obj).expect("the reference encodes"),
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The body the validator hashes is, byte for byte, `serde_jcs` of the same fields written
    /// out independently; the payload length measured while writing it is the payload's own
    /// canonical length; and the slower measure agrees.
    #[test]
    fn the_event_body_agrees_with_an_independent_encoding(d in arb_drawn_event()) {
        let (body, payload_len) = d.event.canonical_body_and_payload_len();
        prop_assert_eq!(String::from_utf8_lossy(&body), String::from_utf8_lossy(&d.reference));
        prop_assert_eq!(&d.event.canonical_body(), &body);
        prop_assert_eq!(&d.event.canonical_body_reference(), &body);
        let direct = serde_jcs::to_vec(&d.event.payload).expect("payload encodes").len();
        prop_assert_eq!(payload_len, direct);
        prop_assert_eq!(d.event.canonical_payload_len(body.len()), direct);
        prop_assert_eq!(d.event.compute_hash(), Digest::of(&d.reference));
    }

    /// `Origin::check` (what sealing runs) fails exactly when reading the origin's text back
    /// (what the header path runs) fails, with the same message, and reading back gives the
    /// same origin.
    #[test]
    fn checking_an_origin_agrees_with_reading_its_text_back(o in arb_origin()) {
        let read: Result<Origin, String> = o.to_string().parse();
        prop_assert_eq!(o.check(), read.clone().map(|_| ()));
        if let Ok(r) = read {
            prop_assert_eq!(r, o);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// `Digest::of` (whole blocks in place, the padded tail copied) is SHA-256 as the `sha2`
    /// hasher computes it, at every length, the block and padding boundaries included.
    #[test]
    fn digest_of_is_sha256_at_every_length(
        bytes in prop::collection::vec(any::<u8>(), 0..300),
        cut in 0usize..300,
    ) {
        use sha2::Digest as _;
        let bytes = &bytes[..cut.min(bytes.len())];
        let want: [u8; 32] = sha2::Sha256::digest(bytes).into();
        prop_assert_eq!(Digest::of(bytes).0, want);
    }
}

#[test]
fn digest_of_known_answers() {
    // FIPS 180-2 examples: "abc" and the two-block 56-byte message.
    assert_eq!(
        Digest::of(b"abc").to_hex(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_eq!(
        Digest::of(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq").to_hex(),
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
    );
    assert_eq!(
        Digest::of(b"").to_hex(),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
}
