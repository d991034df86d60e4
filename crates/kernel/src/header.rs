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
        // The canonical layout, read directly; anything else (other key order, whitespace,
        // escapes in a header string, an error) takes the general path, which gives the same
        // header for any body the fast path accepts and names the problem for the rest.
        if let Some(h) = Self::parse_canonical(body) {
            return Ok(h);
        }
        Self::parse_general(body)
    }

    /// The fast reader alone: the header of a body in the canonical layout, or `None` for
    /// anything else (which [`Header::parse_general`] then reads or refuses). Whenever it
    /// returns a header, the general reader returns the same one.
    pub fn parse_canonical(body: &'a [u8]) -> Option<Header<'a>> {
        fast::parse(body)
    }

    /// The general reader: any key order and spacing serde accepts.
    pub fn parse_general(body: &'a [u8]) -> Result<Header<'a>, serde_json::Error> {
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

/// The reader for bodies in the canonical layout (RFC 8785, as the validator writes them):
/// `{"at":…,["authority":…,]"causes":[…],"cost":{…},["intent":…,]"origin":…,"payload":{…},
/// "prev":…,"run_id":…,"run_seq":…,"type":…}`. The tail after the payload is found from the
/// end (none of its strings may hold a quote), so the payload is never scanned field by field:
/// it is only checked to be one well-formed JSON value, as the general reader checks it.
mod fast {
    use std::borrow::Cow;

    use serde::de::IgnoredAny;

    use super::Header;
    use crate::event::Cost;
    use crate::id::{Digest, EventId};
    use crate::timestamp::Timestamp;

    struct Cursor<'a> {
        /// The whole body, checked to be UTF-8 once (strings are cut from it at quotes, which
        /// are always character boundaries).
        s: &'a str,
        b: &'a [u8],
        at: usize,
    }

    impl<'a> Cursor<'a> {
        fn lit(&mut self, l: &[u8]) -> Option<()> {
            if self.b.get(self.at..self.at + l.len())? == l {
                self.at += l.len();
                Some(())
            } else {
                None
            }
        }

        fn try_lit(&mut self, l: &[u8]) -> bool {
            self.lit(l).is_some()
        }

        /// A string without escapes (its opening quote already read), up to its closing quote.
        fn plain_str(&mut self) -> Option<&'a str> {
            let rest = &self.b[self.at..];
            let end = memchr::memchr(b'"', rest)?;
            // No escape or control character before it (a fold, not a search: it vectorises).
            let raw = &rest[..end];
            if raw
                .iter()
                .fold(false, |bad, &c| bad | (c == b'\\') | (c < 0x20))
            {
                return None;
            }
            let s = self.s.get(self.at..self.at + end)?;
            self.at += end + 1;
            Some(s)
        }

        /// A whole number as serde reads a `u64`: no sign, no leading zero, no fraction.
        fn number(&mut self) -> Option<u64> {
            let rest = &self.b[self.at..];
            let len = rest.iter().take_while(|c| c.is_ascii_digit()).count();
            if len == 0 || (len > 1 && rest[0] == b'0') {
                return None;
            }
            if matches!(rest.get(len), Some(b'.' | b'e' | b'E')) {
                return None;
            }
            let mut v: u64 = 0;
            for &c in &rest[..len] {
                v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
            }
            self.at += len;
            Some(v)
        }
    }

    const COST_KEYS: [&[u8]; 7] = [
        b"bytes",
        b"credits_micro",
        b"risk",
        b"tokens_in",
        b"tokens_out",
        b"tool_calls",
        b"wall_time_us",
    ];

    pub(super) fn parse(b: &[u8]) -> Option<Header<'_>> {
        // Not UTF-8: the general reader names what is wrong.
        let s = std::str::from_utf8(b).ok()?;
        let mut c = Cursor { s, b, at: 0 };
        c.lit(b"{\"at\":\"")?;
        let at = Timestamp::parse(c.plain_str()?).ok()?;
        let has_authority = c.try_lit(b",\"authority\":\"");
        if has_authority {
            c.plain_str()?;
        }
        c.lit(b",\"causes\":[")?;
        let mut causes = Vec::new();
        if !c.try_lit(b"]") {
            loop {
                c.lit(b"\"")?;
                causes.push(c.plain_str()?.parse::<EventId>().ok()?);
                if c.try_lit(b"]") {
                    break;
                }
                c.lit(b",")?;
            }
        }
        c.lit(b",\"cost\":{")?;
        let mut cost = Cost::default();
        if !c.try_lit(b"}") {
            let mut next_key = 0;
            loop {
                c.lit(b"\"")?;
                let name = c.plain_str()?.as_bytes();
                let k = next_key + COST_KEYS[next_key..].iter().position(|k| *k == name)?;
                next_key = k + 1;
                c.lit(b":")?;
                let v = c.number()?;
                let slot = match k {
                    0 => &mut cost.bytes,
                    1 => &mut cost.credits_micro,
                    2 => &mut cost.risk,
                    3 => &mut cost.tokens_in,
                    4 => &mut cost.tokens_out,
                    5 => &mut cost.tool_calls,
                    _ => &mut cost.wall_time_us,
                };
                *slot = v;
                if c.try_lit(b"}") {
                    break;
                }
                c.lit(b",")?;
                if next_key == COST_KEYS.len() {
                    return None;
                }
            }
        }
        let has_intent = c.try_lit(b",\"intent\":\"");
        if has_intent {
            c.plain_str()?;
        }
        c.lit(b",\"origin\":\"")?;
        let origin = c.plain_str()?;
        c.lit(b",\"payload\":")?;
        let payload_start = c.at;
        // The tail, from the last `,"prev":"` on: its strings hold no quote, so that is the one.
        const PREV: &[u8] = b",\"prev\":\"";
        let mut end = b.len();
        let prev_at = loop {
            end = memchr::memrchr(b',', &b[..end])?;
            if b[end..].starts_with(PREV) {
                break end;
            }
        };
        if prev_at < payload_start {
            return None;
        }
        let mut t = Cursor { s, b, at: prev_at };
        t.lit(PREV)?;
        let prev = Digest::from_hex(t.plain_str()?).ok()?;
        t.lit(b",\"run_id\":\"")?;
        let run_id = t.plain_str()?;
        t.lit(b",\"run_seq\":")?;
        let run_seq = t.number()?;
        t.lit(b",\"type\":\"")?;
        let event_type = t.plain_str()?;
        t.lit(b"}")?;
        if t.at != b.len() {
            return None;
        }
        // Exactly one JSON value between the two, as the general reader requires of `payload`.
        serde_json::from_slice::<IgnoredAny>(&b[payload_start..prev_at]).ok()?;
        if b[payload_start] != b'{' {
            // Not an object: let the general reader decide (and name what is wrong).
            return None;
        }
        Some(Header {
            run_id,
            run_seq,
            event_type,
            origin: Cow::Borrowed(origin),
            at,
            has_intent,
            has_authority,
            causes: Cow::Owned(causes),
            cost,
            prev,
        })
    }
}
