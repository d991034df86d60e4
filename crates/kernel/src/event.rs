//! The event, its canonical encoding (RFC 8785) and its hash.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::id::{Digest, EventId, Origin, RunId};
use crate::limits::MAX_SAFE_INTEGER;
use crate::timestamp::Timestamp;

/// A JSON object: the payload of an event.
pub type Payload = Map<String, Value>;

/// Abstract cost attributes of one transition (I-005). Absent means zero.
///
/// Every figure is a whole number no larger than 2^53 - 1, so JSON carries it exactly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cost {
    /// Wall-clock time spent, in microseconds.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub wall_time_us: u64,
    /// Model input tokens.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tokens_in: u64,
    /// Model output tokens.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tokens_out: u64,
    /// Tool calls made.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tool_calls: u64,
    /// Bytes read or written.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub bytes: u64,
    /// Credits, in millionths.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub credits_micro: u64,
    /// Risk points, as the policy scores them.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub risk: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl Cost {
    /// Each attribute with its name, in a fixed order.
    pub fn fields(&self) -> [(&'static str, u64); 7] {
        [
            ("wall_time_us", self.wall_time_us),
            ("tokens_in", self.tokens_in),
            ("tokens_out", self.tokens_out),
            ("tool_calls", self.tool_calls),
            ("bytes", self.bytes),
            ("credits_micro", self.credits_micro),
            ("risk", self.risk),
        ]
    }

    /// The non-zero-able attributes in RFC 8785 key order (byte order of their ASCII names).
    pub fn fields_in_key_order(&self) -> [(&'static str, u64); 7] {
        [
            ("bytes", self.bytes),
            ("credits_micro", self.credits_micro),
            ("risk", self.risk),
            ("tokens_in", self.tokens_in),
            ("tokens_out", self.tokens_out),
            ("tool_calls", self.tool_calls),
            ("wall_time_us", self.wall_time_us),
        ]
    }

    /// The attribute-wise sum, saturating at 2^53 - 1 ([`MAX_SAFE_INTEGER`]): sums are
    /// recorded (a run's projection in `RunTerminated`), and an event can carry no larger
    /// figure, so a sum past it (one a peer's reported usage can reach) must stay recordable.
    pub fn saturating_add(&self, o: &Cost) -> Cost {
        let add = |a: u64, b: u64| a.saturating_add(b).min(MAX_SAFE_INTEGER);
        Cost {
            wall_time_us: add(self.wall_time_us, o.wall_time_us),
            tokens_in: add(self.tokens_in, o.tokens_in),
            tokens_out: add(self.tokens_out, o.tokens_out),
            tool_calls: add(self.tool_calls, o.tool_calls),
            bytes: add(self.bytes, o.bytes),
            credits_micro: add(self.credits_micro, o.credits_micro),
            risk: add(self.risk, o.risk),
        }
    }
}

/// A recorded fact. Every field but `hash` is covered by `hash`.
///
/// `event_type` stays a string here so that an unknown name reaches the validator and is
/// rejected there, by the taxonomy rule, with its name in the error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// The run it belongs to.
    pub run_id: RunId,
    /// Its position in the run: 0, 1, 2, … with no gaps.
    pub run_seq: u64,
    /// A name from the closed taxonomy.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Who caused it.
    pub origin: Origin,
    /// When it was recorded (UTC); non-decreasing within a run.
    pub at: Timestamp,
    /// Declared purpose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intent: Option<String>,
    /// Id of the grant, decision or approval that allowed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    /// Type-specific data.
    pub payload: Payload,
    /// Earlier events that caused it.
    pub causes: Vec<EventId>,
    /// Cost attributes of this transition.
    pub cost: Cost,
    /// Hash of the previous event of the run; [`Digest::GENESIS`] for `run_seq` 0.
    pub prev: Digest,
    /// SHA-256 of the canonical encoding of every other field.
    pub hash: Digest,
}

/// Every field of an event but `hash`: what the hash covers. Field names match [`Event`].
#[derive(Serialize)]
struct Unhashed<'a> {
    run_id: &'a RunId,
    run_seq: u64,
    #[serde(rename = "type")]
    event_type: &'a str,
    origin: &'a Origin,
    at: &'a Timestamp,
    #[serde(skip_serializing_if = "Option::is_none")]
    intent: &'a Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    authority: &'a Option<String>,
    payload: &'a Payload,
    causes: &'a [EventId],
    cost: &'a Cost,
    prev: &'a Digest,
}

/// Every field of an event but `hash`, owned; the stored form of an event.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnhashedOwned {
    run_id: RunId,
    run_seq: u64,
    #[serde(rename = "type")]
    event_type: String,
    origin: Origin,
    at: Timestamp,
    #[serde(default)]
    intent: Option<String>,
    #[serde(default)]
    authority: Option<String>,
    payload: Payload,
    causes: Vec<EventId>,
    cost: Cost,
    prev: Digest,
}

impl Event {
    /// The event's id, `run_id:run_seq`.
    pub fn id(&self) -> EventId {
        EventId::new(self.run_id.clone(), self.run_seq)
    }

    /// The RFC 8785 canonical encoding of every field but `hash`: the bytes the hash covers.
    ///
    /// Written field by field in the RFC's key order (the field names are ASCII, so that is
    /// byte order); the tests check it against `serde_jcs` for every event they make.
    pub fn canonical_body(&self) -> Vec<u8> {
        self.canonical_body_and_payload_len().0
    }

    /// [`Event::canonical_body`] and the length of the canonical payload inside it, measured
    /// while writing (the validator's inline-payload limit needs it).
    pub fn canonical_body_and_payload_len(&self) -> (Vec<u8>, usize) {
        // Room for the fixed fields, so a typical body is written without growing.
        let texts = self.intent.as_ref().map_or(0, String::len)
            + self.authority.as_ref().map_or(0, String::len)
            + self.causes.len() * (self.run_id.as_str().len() + 20);
        let mut out = Vec::with_capacity(512 + texts);
        let payload_len = self.write_body(&self.payload, &mut out);
        (out, payload_len)
    }

    /// Write the body with `payload` in place of the event's; returns the payload's length.
    fn write_body(&self, payload: &Payload, out: &mut Vec<u8>) -> usize {
        use crate::canonical::{write_object, write_str, write_str_contents, write_u64};
        // Keys are written in RFC 8785 order (the field names are ASCII, so byte order), each
        // with its comma and quotes in one constant. Timestamps, digests and numbers need no
        // escaping and are written straight from their digits.
        out.push(b'{');
        out.extend_from_slice(b"\"at\":\"");
        out.extend_from_slice(&self.at.to_text());
        out.push(b'"');
        if let Some(a) = &self.authority {
            out.extend_from_slice(b",\"authority\":");
            write_str(a, out);
        }
        out.extend_from_slice(b",\"causes\":[");
        for (i, c) in self.causes.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            // `run_id:run_seq`, as `EventId`'s `Display` writes it.
            out.push(b'"');
            write_str_contents(c.run_id.as_str(), out);
            out.push(b':');
            write_u64(c.run_seq, out);
            out.push(b'"');
        }
        out.extend_from_slice(b"],\"cost\":{");
        let mut first = true;
        for (name, v) in self.cost.fields_in_key_order() {
            if v == 0 {
                continue;
            }
            if !first {
                out.push(b',');
            }
            first = false;
            out.push(b'"');
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"\":");
            write_u64(v, out);
        }
        out.push(b'}');
        if let Some(i) = &self.intent {
            out.extend_from_slice(b",\"intent\":");
            write_str(i, out);
        }
        // The origin as its `Display` writes it: `runtime`, `agent:<id>`, `operator:<id>`.
        out.extend_from_slice(b",\"origin\":\"");
        match &self.origin {
            Origin::Runtime => out.extend_from_slice(b"runtime"),
            Origin::Agent(id) => {
                out.extend_from_slice(b"agent:");
                write_str_contents(id, out);
            }
            Origin::Operator(id) => {
                out.extend_from_slice(b"operator:");
                write_str_contents(id, out);
            }
        }
        out.extend_from_slice(b"\",\"payload\":");
        let payload_at = out.len();
        write_object(payload, out);
        let payload_len = out.len() - payload_at;
        out.extend_from_slice(b",\"prev\":\"");
        out.extend_from_slice(&self.prev.hex_text());
        out.extend_from_slice(b"\",\"run_id\":");
        write_str(self.run_id.as_str(), out);
        out.extend_from_slice(b",\"run_seq\":");
        write_u64(self.run_seq, out);
        out.extend_from_slice(b",\"type\":");
        write_str(&self.event_type, out);
        out.push(b'}');
        payload_len
    }

    /// The canonical encoding by way of `serde_jcs`, the reference the fast writer is tested
    /// against.
    pub fn canonical_body_reference(&self) -> Vec<u8> {
        let view = Unhashed {
            run_id: &self.run_id,
            run_seq: self.run_seq,
            event_type: &self.event_type,
            origin: &self.origin,
            at: &self.at,
            intent: &self.intent,
            authority: &self.authority,
            payload: &self.payload,
            causes: &self.causes,
            cost: &self.cost,
            prev: &self.prev,
        };
        serde_jcs::to_vec(&view).unwrap_or_default()
    }

    /// Length of the canonical payload inside a canonical body of `body_len` bytes, found by
    /// encoding the event with an empty payload (`{}`): the two encodings differ only there.
    /// (Sealing measures it while writing, with [`Event::canonical_body_and_payload_len`].)
    pub fn canonical_payload_len(&self, body_len: usize) -> usize {
        let mut shell = Vec::with_capacity(256);
        self.write_body(&Payload::new(), &mut shell);
        (body_len + 2).saturating_sub(shell.len())
    }

    /// SHA-256 of [`Event::canonical_body`].
    pub fn compute_hash(&self) -> Digest {
        Digest::of(&self.canonical_body())
    }

    /// The canonical encoding of the whole event, `hash` included (for export and test vectors).
    pub fn canonical_json(&self) -> Vec<u8> {
        serde_jcs::to_vec(self).unwrap_or_default()
    }

    /// Rebuild an event from its stored body (the canonical encoding without `hash`) and hash.
    /// This parses only; the caller checks (see [`crate::validate`]).
    pub fn from_body(body: &[u8], hash: Digest) -> Result<Event, serde_json::Error> {
        let u: UnhashedOwned = serde_json::from_slice(body)?;
        Ok(Event {
            run_id: u.run_id,
            run_seq: u.run_seq,
            event_type: u.event_type,
            origin: u.origin,
            at: u.at,
            intent: u.intent,
            authority: u.authority,
            payload: u.payload,
            causes: u.causes,
            cost: u.cost,
            prev: u.prev,
            hash,
        })
    }
}

/// An event before the runtime places it in a run: no `run_seq`, `at`, `prev` or `hash` yet.
#[derive(Clone, Debug, PartialEq)]
pub struct Draft {
    /// A name from the taxonomy (checked when sealed).
    pub event_type: String,
    /// Who causes it.
    pub origin: Origin,
    /// Declared purpose.
    pub intent: Option<String>,
    /// The grant, decision or approval that allows it.
    pub authority: Option<String>,
    /// Type-specific data.
    pub payload: Payload,
    /// Earlier events that caused it.
    pub causes: Vec<EventId>,
    /// Cost attributes.
    pub cost: Cost,
}

impl Draft {
    /// A draft with an empty payload, no intent, authority, causes or cost.
    pub fn new(event_type: impl Into<String>, origin: Origin) -> Draft {
        Draft {
            event_type: event_type.into(),
            origin,
            intent: None,
            authority: None,
            payload: Payload::new(),
            causes: Vec::new(),
            cost: Cost::default(),
        }
    }

    /// Set the intent.
    pub fn intent(mut self, intent: impl Into<String>) -> Draft {
        self.intent = Some(intent.into());
        self
    }

    /// Set the authority.
    pub fn authority(mut self, authority: impl Into<String>) -> Draft {
        self.authority = Some(authority.into());
        self
    }

    /// Set the payload from a JSON value; anything but an object becomes `{"value": v}`.
    pub fn payload(mut self, payload: Value) -> Draft {
        self.payload = match payload {
            Value::Object(m) => m,
            other => {
                let mut m = Payload::new();
                m.insert("value".into(), other);
                m
            }
        };
        self
    }

    /// Add a cause.
    pub fn cause(mut self, id: EventId) -> Draft {
        self.causes.push(id);
        self
    }

    /// Set the cost.
    pub fn cost(mut self, cost: Cost) -> Draft {
        self.cost = cost;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sum_of_costs_stays_a_figure_an_event_can_carry() {
        let big = Cost {
            tokens_in: MAX_SAFE_INTEGER,
            bytes: MAX_SAFE_INTEGER - 1,
            tool_calls: 2,
            ..Cost::default()
        };
        let sum = big.saturating_add(&big);
        assert_eq!(sum.tokens_in, MAX_SAFE_INTEGER);
        assert_eq!(sum.bytes, MAX_SAFE_INTEGER);
        assert_eq!(sum.tool_calls, 4);
        assert_eq!(sum.risk, 0);
    }
}
