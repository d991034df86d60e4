//! The validator: the one gate every event passes before it can be appended.
//!
//! Rules run in the specification's order and the first failure rejects the event:
//! structure → taxonomy → origin law → run state → time order → causes → chain (`run_seq`,
//! `prev`, `hash`). [`RunHead`] is the validator's view of one run and is itself a projection:
//! a fold of the run's events.
//!
//! [`SealedEvent`] can only be made here, by [`RunHead::seal`] (a new event) or
//! [`RunHead::admit`] (an existing event, e.g. one read back or migrated). Log backends accept
//! nothing else, so no caller can append an event that skipped the validator.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::blob::{self, Blob};
use crate::event::{Cost, Draft, Event, Payload};
use crate::header::Header;
use crate::id::{Digest, EventId, Origin, RunId};
use crate::limits::*;
use crate::state::{Lifecycle, RunState, StateError};
use crate::taxonomy::{EventType, TAXONOMY_VERSION};
use crate::timestamp::Timestamp;

/// Why an event was rejected. One variant per rule, in the order the rules run.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ValidationError {
    /// Rule 1: a field is malformed or over a limit.
    #[error("structure: {field}: {problem}")]
    Structure {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// Rule 2: the type is not in the taxonomy.
    #[error("taxonomy: {name:?} is not an event type of taxonomy v{version}")]
    UnknownType {
        /// The unknown name.
        name: String,
        /// The taxonomy version in force.
        version: u32,
    },
    /// Rule 2 (continued): the type requires a field the event lacks.
    #[error("taxonomy: {event_type} requires `{field}`")]
    MissingField {
        /// The event's type.
        event_type: EventType,
        /// The required field.
        field: &'static str,
    },
    /// Rule 3: this origin may not emit this type.
    #[error("origin law: {origin} may not emit {event_type}; only {allowed} may")]
    OriginForbidden {
        /// Who tried.
        origin: Origin,
        /// What they tried to emit.
        event_type: EventType,
        /// The origins that may.
        allowed: &'static str,
    },
    /// Rule 4: the run's state does not admit this event.
    #[error("run state: {0}")]
    State(#[from] StateError),
    /// Rule 5: time went backwards within the run.
    #[error("time order: at {at} is earlier than the run's previous event at {previous}")]
    TimeWentBackwards {
        /// The event's time.
        at: Timestamp,
        /// The previous event's time.
        previous: Timestamp,
    },
    /// Rule 6: a cause does not exist (yet).
    #[error("causes: {cause} does not exist before this event")]
    UnknownCause {
        /// The missing cause.
        cause: EventId,
    },
    /// Rule 7: the event does not continue the run's chain.
    #[error("chain: {0}")]
    Chain(ChainError),
}

/// How an event fails to continue its run's chain.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The event belongs to another run.
    #[error("event of run {got} offered to run {expected}")]
    WrongRun {
        /// The run being appended to.
        expected: RunId,
        /// The event's run.
        got: RunId,
    },
    /// `run_seq` skips ahead.
    #[error("gap: expected run_seq {expected}, got {got}")]
    Gap {
        /// The next position.
        expected: u64,
        /// The event's position.
        got: u64,
    },
    /// `run_seq` repeats or goes back.
    #[error("repeat: expected run_seq {expected}, got {got}, which the run already has")]
    Repeat {
        /// The next position.
        expected: u64,
        /// The event's position.
        got: u64,
    },
    /// `prev` is not the hash of the run's previous event.
    #[error("prev is {got} but the previous event's hash is {expected}")]
    WrongPrev {
        /// Hash of the previous event.
        expected: Digest,
        /// The event's `prev`.
        got: Digest,
    },
    /// `hash` is not the hash of the event's canonical encoding.
    #[error("hash is {stored} but the stored event hashes to {computed}")]
    HashMismatch {
        /// The event's `hash`.
        stored: Digest,
        /// What the content hashes to.
        computed: Digest,
    },
}

fn structure(field: &'static str, problem: impl Into<String>) -> ValidationError {
    ValidationError::Structure {
        field,
        problem: problem.into(),
    }
}

/// Where an event claims to stand: the fields rules 5 to 7 read.
struct Place<'a> {
    run_id: &'a str,
    run_seq: u64,
    at: Timestamp,
    causes: &'a [EventId],
    prev: Digest,
}

/// Rule 2: the type is in the taxonomy and the event has the fields the type requires.
fn check_type(
    name: &str,
    has_intent: bool,
    has_authority: bool,
) -> Result<EventType, ValidationError> {
    let t = EventType::from_name(name).ok_or_else(|| ValidationError::UnknownType {
        name: name.to_string(),
        version: TAXONOMY_VERSION,
    })?;
    if t.requires_intent() && !has_intent {
        return Err(ValidationError::MissingField {
            event_type: t,
            field: "intent",
        });
    }
    if t.requires_authority() && !has_authority {
        return Err(ValidationError::MissingField {
            event_type: t,
            field: "authority",
        });
    }
    Ok(t)
}

/// Answers whether an event of *another* run exists. Causes in the event's own run are checked
/// against the run's head; the caller looks up the others (I/O is not the kernel's) and passes
/// the answers in.
pub trait CauseIndex {
    /// Whether the event exists in the log.
    fn contains(&self, id: &EventId) -> bool;
}

impl CauseIndex for HashSet<EventId> {
    fn contains(&self, id: &EventId) -> bool {
        HashSet::contains(self, id)
    }
}

/// A cause index that knows no other run (for runs whose causes are all their own).
pub struct NoOtherRuns;

impl CauseIndex for NoOtherRuns {
    fn contains(&self, _: &EventId) -> bool {
        false
    }
}

/// An event that passed the validator, with the canonical bytes its hash covers. Only the
/// kernel makes one (sealing a draft, admitting a checked event), so its hash is always the
/// SHA-256 of its body: a log can store it without hashing it again.
#[derive(Clone, Debug, PartialEq)]
pub struct SealedEvent {
    event: Event,
    event_type: EventType,
    body: Vec<u8>,
}

impl SealedEvent {
    /// The event.
    pub fn event(&self) -> &Event {
        &self.event
    }
    /// Its resolved type.
    pub fn event_type(&self) -> EventType {
        self.event_type
    }
    /// The canonical encoding of every field but `hash` (what is stored and hashed).
    pub fn body(&self) -> &[u8] {
        &self.body
    }
    /// Unwrap the event.
    pub fn into_event(self) -> Event {
        self.event
    }
}

/// Events of one run, sealed in order by one [`RunHead`], ready to append at `first_seq`.
///
/// Immutable once sealed, and shared: a clone (the caller keeps the batch a log takes) copies
/// no event.
#[derive(Clone, Debug, PartialEq)]
pub struct SealedBatch {
    run_id: RunId,
    first_seq: u64,
    prev: Digest,
    events: std::sync::Arc<[SealedEvent]>,
    blobs: std::sync::Arc<[Blob]>,
}

impl SealedBatch {
    /// The run.
    pub fn run_id(&self) -> &RunId {
        &self.run_id
    }
    /// The run position the batch must be appended at (optimistic concurrency).
    pub fn first_seq(&self) -> u64 {
        self.first_seq
    }
    /// The hash the run's stored head must have.
    pub fn prev(&self) -> Digest {
        self.prev
    }
    /// The events, in order.
    pub fn events(&self) -> &[SealedEvent] {
        &self.events
    }
    /// Blobs the events reference.
    pub fn blobs(&self) -> &[Blob] {
        &self.blobs
    }
    /// Whether the batch holds no event.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

/// The validator's view of one run: where its chain ends and what its state machine allows.
/// It is a pure fold of the run's events ([`RunHead::apply`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunHead {
    /// The run.
    pub run_id: RunId,
    /// The `run_seq` the next event must have (= number of events).
    pub next_seq: u64,
    /// Hash of the last event ([`Digest::GENESIS`] if none).
    pub last_hash: Digest,
    /// Time of the last event.
    pub last_at: Option<Timestamp>,
    /// State machine position.
    pub lifecycle: Lifecycle,
}

/// A stored event's body and its SHA-256, computed from it here (a caller cannot pair a body
/// with a digest of its own choosing): what [`RunHead::admit_hashed`] checks against the
/// stored hash.
#[derive(Clone, Copy, Debug)]
pub struct HashedBody<'b> {
    body: &'b [u8],
    computed: Digest,
}

impl<'b> HashedBody<'b> {
    /// Hash one body.
    pub fn new(body: &'b [u8]) -> HashedBody<'b> {
        HashedBody {
            body,
            computed: Digest::of(body),
        }
    }

    /// Hash two bodies at once ([`Digest::of_two`]).
    pub fn two(a: &'b [u8], b: &'b [u8]) -> [HashedBody<'b>; 2] {
        let [da, db] = Digest::of_two(a, b);
        [
            HashedBody {
                body: a,
                computed: da,
            },
            HashedBody {
                body: b,
                computed: db,
            },
        ]
    }

    /// The body.
    pub fn body(&self) -> &'b [u8] {
        self.body
    }

    /// Its SHA-256.
    pub fn digest(&self) -> Digest {
        self.computed
    }
}

impl RunHead {
    /// The head of a run with no events (state CREATED).
    pub fn new(run_id: RunId) -> RunHead {
        RunHead {
            run_id,
            next_seq: 0,
            last_hash: Digest::GENESIS,
            last_at: None,
            lifecycle: Lifecycle::default(),
        }
    }

    /// The run's state.
    pub fn state(&self) -> RunState {
        self.lifecycle.state
    }

    /// Check `event` against every rule, in order, without changing the head.
    pub fn check(
        &self,
        event: &Event,
        others: &dyn CauseIndex,
    ) -> Result<(EventType, Lifecycle), ValidationError> {
        self.check_with(event, None, others)
    }

    /// [`RunHead::check`], given the canonical payload's length when the caller knows it.
    fn check_with(
        &self,
        event: &Event,
        payload_len: Option<usize>,
        others: &dyn CauseIndex,
    ) -> Result<(EventType, Lifecycle), ValidationError> {
        // 1. structure
        check_structure(
            event.run_seq,
            &event.intent,
            &event.authority,
            &event.payload,
            &event.causes,
            &event.cost,
            payload_len,
        )?;
        blob::blob_refs(&event.payload).map_err(|e| structure("payload", e))?;
        check_reserved(&event.payload, true)?;
        // Rules 2 to 7 as `check_header` runs them on `Header::of(event)`, without writing the
        // origin out to read it back: `Origin::check` fails exactly when that reading would.
        let t = check_type(
            &event.event_type,
            event.intent.is_some(),
            event.authority.is_some(),
        )?;
        event.origin.check().map_err(|e| structure("origin", e))?;
        self.check_place(
            t,
            &event.origin,
            &Place {
                run_id: event.run_id.as_str(),
                run_seq: event.run_seq,
                at: event.at,
                causes: &event.causes,
                prev: event.prev,
            },
            others,
        )
    }

    /// Rules 2 to 7 (taxonomy, origin law, run state, time order, causes, chain) on a header.
    /// Returns the resolved type and the lifecycle the event leads to.
    pub fn check_header(
        &self,
        h: &Header<'_>,
        others: &dyn CauseIndex,
    ) -> Result<(EventType, Lifecycle), ValidationError> {
        // 2. taxonomy
        let t = check_type(h.event_type, h.has_intent, h.has_authority)?;
        // 3. origin law
        let origin: Origin = h
            .origin
            .parse()
            .map_err(|e: String| structure("origin", e))?;
        self.check_place(
            t,
            &origin,
            &Place {
                run_id: h.run_id,
                run_seq: h.run_seq,
                at: h.at,
                causes: &h.causes,
                prev: h.prev,
            },
            others,
        )
    }

    /// Rules 3 (once the origin is read) to 7 on an event of type `t` from `origin`.
    fn check_place(
        &self,
        t: EventType,
        origin: &Origin,
        h: &Place<'_>,
        others: &dyn CauseIndex,
    ) -> Result<(EventType, Lifecycle), ValidationError> {
        // 3. origin law
        let cat = t.category();
        if !cat.allows(origin) {
            return Err(ValidationError::OriginForbidden {
                origin: origin.clone(),
                event_type: t,
                allowed: cat.origin_row(),
            });
        }
        // 4. run state
        let next = self.lifecycle.step(t)?;
        // 5. time order
        if let Some(prev) = self.last_at
            && h.at < prev
        {
            return Err(ValidationError::TimeWentBackwards {
                at: h.at,
                previous: prev,
            });
        }
        // 6. causes
        for c in h.causes.iter() {
            let exists = if c.run_id.as_str() == h.run_id {
                c.run_seq < h.run_seq && c.run_seq < self.next_seq
            } else {
                others.contains(c)
            };
            if !exists {
                return Err(ValidationError::UnknownCause { cause: c.clone() });
            }
        }
        // 7. chain
        if h.run_id != self.run_id.as_str() {
            return Err(ValidationError::Chain(ChainError::WrongRun {
                expected: self.run_id.clone(),
                got: RunId::new(h.run_id).map_err(|e| structure("run_id", e))?,
            }));
        }
        if h.run_seq > self.next_seq {
            return Err(ValidationError::Chain(ChainError::Gap {
                expected: self.next_seq,
                got: h.run_seq,
            }));
        }
        if h.run_seq < self.next_seq {
            return Err(ValidationError::Chain(ChainError::Repeat {
                expected: self.next_seq,
                got: h.run_seq,
            }));
        }
        if h.prev != self.last_hash {
            return Err(ValidationError::Chain(ChainError::WrongPrev {
                expected: self.last_hash,
                got: h.prev,
            }));
        }
        Ok((t, next))
    }

    /// Admit a stored event by its body and hash alone, reading only its header: the hash must
    /// be the SHA-256 of the body, and the header must pass rules 2 to 7. This is how `verify`
    /// and replay read a log at full speed; the hash vouches for the payload, which only the
    /// validator wrote. On success the head advances and the header is returned.
    pub fn admit_stored<'b>(
        &mut self,
        body: &'b [u8],
        hash: Digest,
        others: &dyn CauseIndex,
    ) -> Result<Header<'b>, ValidationError> {
        self.admit_hashed(HashedBody::new(body), hash, others)
    }

    /// [`RunHead::admit_stored`] with the body's SHA-256 already computed (two bodies are
    /// hashed at once by [`HashedBody::two`]).
    pub fn admit_hashed<'b>(
        &mut self,
        body: HashedBody<'b>,
        hash: Digest,
        others: &dyn CauseIndex,
    ) -> Result<Header<'b>, ValidationError> {
        let HashedBody { body, computed } = body;
        let h = Header::parse(body)
            .map_err(|e| structure("event", format!("stored body does not parse: {e}")))?;
        if computed != hash {
            return Err(ValidationError::Chain(ChainError::HashMismatch {
                stored: hash,
                computed,
            }));
        }
        let (_, next) = self.check_header(&h, others)?;
        self.advance_to(h.run_seq, hash, h.at, next);
        Ok(h)
    }

    /// Check an existing event (hash included) and, if it passes, advance the head past it.
    pub fn admit(
        &mut self,
        event: Event,
        others: &dyn CauseIndex,
    ) -> Result<SealedEvent, ValidationError> {
        let (body, payload_len) = event.canonical_body_and_payload_len();
        let (t, next) = self.check_with(&event, Some(payload_len), others)?;
        let computed = Digest::of(&body);
        if computed != event.hash {
            return Err(ValidationError::Chain(ChainError::HashMismatch {
                stored: event.hash,
                computed,
            }));
        }
        // Hold the event as it reads back from its canonical form (1.0 and 1 encode alike), so
        // what was admitted equals what a reader of the log gets.
        let event = Event::from_body(&body, event.hash)
            .map_err(|e| structure("event", format!("canonical form does not read back: {e}")))?;
        self.advance(&event, next);
        Ok(SealedEvent {
            event,
            event_type: t,
            body,
        })
    }

    /// Place a draft at the end of the run at time `at`, validate it, hash it and advance.
    /// Large payload fields are moved to blobs, which are returned with the event.
    pub fn seal(
        &mut self,
        draft: Draft,
        at: Timestamp,
        others: &dyn CauseIndex,
    ) -> Result<(SealedEvent, Vec<Blob>), ValidationError> {
        let Draft {
            event_type,
            origin,
            intent,
            authority,
            mut payload,
            causes,
            cost,
        } = draft;
        check_reserved(&payload, false)?;
        check_payload(&payload)?;
        let blobs = blob::externalize(&mut payload).map_err(|e| structure("payload", e))?;
        // Normalise floats through the canonical form (1.0 and 1 encode alike), so the event
        // held in memory equals the one read back from the log. Integers need no normalising.
        if payload.values().any(has_float) {
            let mut canonical = Vec::with_capacity(256);
            crate::canonical::write_object(&payload, &mut canonical);
            payload = serde_json::from_slice(&canonical)
                .map_err(|e| structure("payload", e.to_string()))?;
        }
        let mut event = Event {
            run_id: self.run_id.clone(),
            run_seq: self.next_seq,
            event_type,
            origin,
            at,
            intent,
            authority,
            payload,
            causes,
            cost,
            prev: self.last_hash,
            hash: Digest::GENESIS,
        };
        let (body, payload_len) = event.canonical_body_and_payload_len();
        let (t, next) = self.check_with(&event, Some(payload_len), others)?;
        event.hash = Digest::of(&body);
        self.advance(&event, next);
        Ok((
            SealedEvent {
                event,
                event_type: t,
                body,
            },
            blobs,
        ))
    }

    /// Seal several drafts as one batch, all at time `at`. Nothing is sealed if any fails; the
    /// error carries the index of the failing draft.
    pub fn seal_batch(
        &mut self,
        drafts: Vec<Draft>,
        at: Timestamp,
        others: &dyn CauseIndex,
    ) -> Result<SealedBatch, (usize, ValidationError)> {
        if drafts.len() > MAX_BATCH_EVENTS {
            return Err((
                MAX_BATCH_EVENTS,
                structure(
                    "batch",
                    format!(
                        "{} events; at most {MAX_BATCH_EVENTS} per batch",
                        drafts.len()
                    ),
                ),
            ));
        }
        let mut scratch = self.clone();
        let first_seq = scratch.next_seq;
        let prev = scratch.last_hash;
        let mut events = Vec::with_capacity(drafts.len());
        let mut blobs = Vec::new();
        for (i, d) in drafts.into_iter().enumerate() {
            let (e, b) = scratch.seal(d, at, others).map_err(|e| (i, e))?;
            events.push(e);
            blobs.extend(b);
        }
        *self = scratch;
        Ok(SealedBatch {
            run_id: self.run_id.clone(),
            first_seq,
            prev,
            events: events.into(),
            blobs: blobs.into(),
        })
    }

    /// Batch already-admitted events (e.g. when copying a log) for appending.
    pub fn batch_of(
        run_id: RunId,
        events: Vec<SealedEvent>,
        blobs: Vec<Blob>,
    ) -> Result<SealedBatch, String> {
        let first = events.first().ok_or("an empty batch")?;
        let (first_seq, prev) = (first.event.run_seq, first.event.prev);
        for w in events.windows(2) {
            if w[1].event.run_seq != w[0].event.run_seq + 1 || w[1].event.prev != w[0].event.hash {
                return Err(format!(
                    "events {} and {} are not consecutive",
                    w[0].event.id(),
                    w[1].event.id()
                ));
            }
        }
        if events.iter().any(|e| e.event.run_id != run_id) {
            return Err(format!(
                "a batch for run {run_id} holds another run's event"
            ));
        }
        Ok(SealedBatch {
            run_id,
            first_seq,
            prev,
            events: events.into(),
            blobs: blobs.into(),
        })
    }

    /// Fold one event into the head without checking it (the event came from a verified log).
    /// Returns an error only if the state machine refuses it, which a verified log never does.
    pub fn apply(&mut self, event: &Event) -> Result<(), ValidationError> {
        let t = EventType::from_name(&event.event_type).ok_or_else(|| {
            ValidationError::UnknownType {
                name: event.event_type.clone(),
                version: TAXONOMY_VERSION,
            }
        })?;
        let next = self.lifecycle.step(t)?;
        self.advance(event, next);
        Ok(())
    }

    fn advance(&mut self, event: &Event, next: Lifecycle) {
        self.advance_to(event.run_seq, event.hash, event.at, next);
    }

    fn advance_to(&mut self, run_seq: u64, hash: Digest, at: Timestamp, next: Lifecycle) {
        self.next_seq = run_seq + 1;
        self.last_hash = hash;
        self.last_at = Some(at);
        self.lifecycle = next;
    }

    /// Fold one header into the head without checking it (it came from a verified log).
    pub fn apply_header(
        &mut self,
        h: &Header<'_>,
        hash: Digest,
    ) -> Result<EventType, ValidationError> {
        let t = EventType::from_name(h.event_type).ok_or_else(|| ValidationError::UnknownType {
            name: h.event_type.to_string(),
            version: TAXONOMY_VERSION,
        })?;
        let next = self.lifecycle.step(t)?;
        self.advance_to(h.run_seq, hash, h.at, next);
        Ok(t)
    }
}

fn has_float(v: &Value) -> bool {
    match v {
        Value::Number(n) => n.is_f64(),
        Value::Array(a) => a.iter().any(has_float),
        Value::Object(m) => m.values().any(has_float),
        _ => false,
    }
}

/// The reserved key `$blob` appears only in blob references the kernel made: as a top-level
/// field's `{"$blob": …, "size": …}` when `refs_allowed` (an event already sealed), nowhere in
/// a draft.
fn check_reserved(payload: &Payload, refs_allowed: bool) -> Result<(), ValidationError> {
    for (k, v) in payload {
        if k == blob::BLOB_KEY {
            return Err(structure(
                "payload",
                "the key \"$blob\" is reserved for blob references",
            ));
        }
        if refs_allowed
            && let Value::Object(m) = v
            && m.contains_key(blob::BLOB_KEY)
        {
            continue; // a top-level blob reference; blob_refs checked its shape
        }
        if blob::uses_reserved_key(v) {
            return Err(structure(
                "payload",
                format!("field {k:?} uses the reserved key \"$blob\""),
            ));
        }
    }
    Ok(())
}

fn check_text(field: &'static str, v: &Option<String>) -> Result<(), ValidationError> {
    if let Some(s) = v {
        if s.trim().is_empty() {
            return Err(structure(field, "must not be empty when present"));
        }
        if s.len() > MAX_TEXT_LEN {
            return Err(structure(
                field,
                format!("{} bytes; at most {MAX_TEXT_LEN}", s.len()),
            ));
        }
    }
    Ok(())
}

fn check_structure(
    run_seq: u64,
    intent: &Option<String>,
    authority: &Option<String>,
    payload: &Payload,
    causes: &[EventId],
    cost: &Cost,
    payload_len: Option<usize>,
) -> Result<(), ValidationError> {
    if run_seq > MAX_SAFE_INTEGER {
        return Err(structure("run_seq", "exceeds 2^53-1"));
    }
    check_text("intent", intent)?;
    check_text("authority", authority)?;
    check_payload(payload)?;
    let inline = match payload_len {
        Some(n) => n,
        None => {
            let mut v = Vec::with_capacity(128);
            crate::canonical::write_object(payload, &mut v);
            v.len()
        }
    };
    if inline > MAX_INLINE_PAYLOAD_BYTES {
        return Err(structure(
            "payload",
            format!(
                "{inline} bytes inline after large fields moved to blobs; at most {MAX_INLINE_PAYLOAD_BYTES}"
            ),
        ));
    }
    if causes.len() > MAX_CAUSES {
        return Err(structure(
            "causes",
            format!("{} causes; at most {MAX_CAUSES}", causes.len()),
        ));
    }
    // The first cause that repeats an earlier one is named. Events name few causes: those are
    // compared pairwise, without building a set.
    let repeat = if causes.len() <= 8 {
        causes
            .iter()
            .enumerate()
            .find(|&(i, c)| causes[..i].contains(c))
            .map(|(_, c)| c)
    } else {
        let mut seen = HashSet::with_capacity(causes.len());
        causes.iter().find(|&c| !seen.insert(c))
    };
    if let Some(c) = repeat {
        return Err(structure("causes", format!("{c} is named twice")));
    }
    for (name, v) in cost.fields() {
        if v > MAX_SAFE_INTEGER {
            return Err(structure("cost", format!("{name} = {v} exceeds 2^53-1")));
        }
    }
    Ok(())
}

/// I-JSON (RFC 7493) and ICE's limits: depth, integer range. Such payloads encode identically
/// on every platform, which the hash needs.
fn check_payload(payload: &Payload) -> Result<(), ValidationError> {
    // `depth` is the nesting level of `v` among arrays and objects, a payload field being level 1.
    fn walk(v: &Value, depth: usize) -> Result<(), String> {
        match v {
            Value::Number(n) => {
                // Every number must round-trip exactly through the canonical form: integers
                // within ±(2^53-1); and no float in 2^53 ≤ |f| < 1e21, which RFC 8785 prints
                // as integer digits (1e16 → 10000000000000000) that read back as an integer.
                let big = match (n.as_i64(), n.as_u64(), n.as_f64()) {
                    (Some(i), _, _) => i.unsigned_abs() > MAX_SAFE_INTEGER,
                    (None, Some(u), _) => u > MAX_SAFE_INTEGER,
                    (None, None, Some(f)) => f.abs() > MAX_SAFE_INTEGER as f64 && f.abs() < 1e21,
                    _ => true,
                };
                if big {
                    return Err(format!(
                        "number {n} is outside ±(2^53-1); send it as a string"
                    ));
                }
                Ok(())
            }
            Value::Array(_) | Value::Object(_) if depth > MAX_JSON_DEPTH => Err(format!(
                "arrays and objects nested deeper than {MAX_JSON_DEPTH} levels"
            )),
            Value::Array(a) => a.iter().try_for_each(|x| walk(x, depth + 1)),
            Value::Object(m) => m.values().try_for_each(|x| walk(x, depth + 1)),
            _ => Ok(()),
        }
    }
    payload.iter().try_for_each(|(k, v)| {
        walk(v, 1).map_err(|e| structure("payload", format!("field {k:?}: {e}")))
    })
}
