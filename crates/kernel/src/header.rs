//! The header of an event: every field the law and the projections need, without the payload.
//!
//! Verification and replay read millions of stored events; they parse only this much of each
//! (the payload is skipped, not decoded) and let the stored hash vouch for the rest. The
//! validator runs the same rules on a header as on a whole event, so there is one law.

use std::borrow::Cow;

use serde::Deserialize;
use serde::de::IgnoredAny;

use crate::event::{Cost, Event};
use crate::id::{Digest, EventId};
use crate::timestamp::Timestamp;

/// The law-relevant fields of one event.
#[derive(Clone, Debug, PartialEq)]
pub struct Header<'a> {
    /// The run.
    pub run_id: &'a str,
    /// Position in the run.
    pub run_seq: u64,
    /// The type's name.
    pub event_type: &'a str,
    /// The origin, as written (`runtime`, `agent:<id>`, `operator:<id>`).
    pub origin: Cow<'a, str>,
    /// When it was recorded.
    pub at: Timestamp,
    /// Whether `intent` is present.
    pub has_intent: bool,
    /// Whether `authority` is present.
    pub has_authority: bool,
    /// The causes.
    pub causes: Cow<'a, [EventId]>,
    /// Cost attributes.
    pub cost: Cost,
    /// Hash of the previous event of the run.
    pub prev: Digest,
}

/// The stored body, read field by field; `payload`, `intent` and `authority` are skipped.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw<'a> {
    #[serde(borrow)]
    run_id: &'a str,
    run_seq: u64,
    #[serde(rename = "type", borrow)]
    event_type: &'a str,
    #[serde(borrow)]
    origin: &'a str,
    at: Timestamp,
    #[serde(default)]
    intent: Option<IgnoredAny>,
    #[serde(default)]
    authority: Option<IgnoredAny>,
    #[allow(dead_code)]
    payload: IgnoredAny,
    causes: Vec<EventId>,
    cost: Cost,
    prev: Digest,
}

impl<'a> Header<'a> {
    /// Read the header of a stored body (the canonical encoding of an event without its hash).
    /// Ids, types and origins are plain ASCII in a valid event, so they are borrowed, not copied.
    pub fn parse(body: &'a [u8]) -> Result<Header<'a>, serde_json::Error> {
        let r: Raw<'a> = serde_json::from_slice(body)?;
        Ok(Header {
            run_id: r.run_id,
            run_seq: r.run_seq,
            event_type: r.event_type,
            origin: Cow::Borrowed(r.origin),
            at: r.at,
            has_intent: r.intent.is_some(),
            has_authority: r.authority.is_some(),
            causes: Cow::Owned(r.causes),
            cost: r.cost,
            prev: r.prev,
        })
    }

    /// The header of a whole event.
    pub fn of(e: &'a Event) -> Header<'a> {
        Header {
            run_id: e.run_id.as_str(),
            run_seq: e.run_seq,
            event_type: &e.event_type,
            origin: Cow::Owned(e.origin.to_string()),
            at: e.at,
            has_intent: e.intent.is_some(),
            has_authority: e.authority.is_some(),
            causes: Cow::Borrowed(&e.causes),
            cost: e.cost,
            prev: e.prev,
        }
    }
}
