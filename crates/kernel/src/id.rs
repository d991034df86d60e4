//! Identifiers: run ids, event ids, origins and SHA-256 digests.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::limits::{MAX_ID_LEN, MAX_SAFE_INTEGER};
use crate::sha256x2::{Blocks, compress_pair};

/// SHA-256's initial state (FIPS 180-4, 5.3.3).
const SHA256_IV: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// A SHA-256 digest. Serialised as 64 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The `prev` of every run's first event (`run_seq` 0): 32 zero bytes.
    pub const GENESIS: Digest = Digest([0u8; 32]);

    /// SHA-256 of `bytes`. The whole blocks are compressed where they lie and only the tail is
    /// copied (every event's body is hashed when it is written and again by `verify`).
    pub fn of(bytes: &[u8]) -> Digest {
        let mut state = SHA256_IV;
        Blocks::new(bytes).compress_from(&mut state, 0);
        Digest::from_state(state)
    }

    /// SHA-256 of `a` and of `b`, the two computed side by side where the processor can (the
    /// `sha256x2` module): what `verify` hashes stored bodies with, two at a time.
    pub fn of_two(a: &[u8], b: &[u8]) -> [Digest; 2] {
        let (mut sa, mut sb) = (SHA256_IV, SHA256_IV);
        compress_pair(&Blocks::new(a), &mut sa, &Blocks::new(b), &mut sb);
        [Digest::from_state(sa), Digest::from_state(sb)]
    }

    /// SHA-256 of a message already padded into whole blocks (0x80, zeros, the length in bits
    /// as 8 big-endian bytes): for short fixed-size messages, such as the Merkle tree's leaf and
    /// node hashes, built in place without a hasher's buffering.
    pub fn of_padded(blocks: &[[u8; 64]]) -> Digest {
        let mut state = SHA256_IV;
        sha2::block_api::compress256(&mut state, blocks);
        Digest::from_state(state)
    }

    fn from_state(state: [u32; 8]) -> Digest {
        let mut out = [0u8; 32];
        for (o, w) in out.chunks_exact_mut(4).zip(state) {
            o.copy_from_slice(&w.to_be_bytes());
        }
        Digest(out)
    }

    /// Lowercase hex form.
    pub fn to_hex(&self) -> String {
        let t = self.hex_text();
        String::from_utf8_lossy(&t).into_owned()
    }

    /// Lowercase hex form as ASCII bytes, from a table of byte pairs (no allocation): every
    /// event's encoding carries one.
    pub fn hex_text(&self) -> [u8; 64] {
        const PAIRS: [[u8; 2]; 256] = {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            let mut t = [[0u8; 2]; 256];
            let mut i = 0;
            while i < 256 {
                t[i] = [HEX[i >> 4], HEX[i & 0xf]];
                i += 1;
            }
            t
        };
        let mut out = [0u8; 64];
        for (o, b) in out.chunks_exact_mut(2).zip(self.0) {
            o.copy_from_slice(&PAIRS[b as usize]);
        }
        out
    }

    /// Parse exactly 64 lowercase hex characters.
    pub fn from_hex(s: &str) -> Result<Digest, String> {
        // A table lookup per character and one check at the end: every header read by
        // `verify` and replay carries a digest.
        const BAD: u8 = 0x10;
        const NIBBLE: [u8; 256] = {
            let mut t = [BAD; 256];
            let mut i = 0;
            while i < 10 {
                t[b'0' as usize + i] = i as u8;
                i += 1;
            }
            let mut i = 0;
            while i < 6 {
                t[b'a' as usize + i] = 10 + i as u8;
                i += 1;
            }
            t
        };
        let b = s.as_bytes();
        let mut out = [0u8; 32];
        if b.len() == 64 {
            let mut bad = 0u8;
            for (o, pair) in out.iter_mut().zip(b.chunks_exact(2)) {
                let (h, l) = (NIBBLE[pair[0] as usize], NIBBLE[pair[1] as usize]);
                bad |= h | l;
                *o = h << 4 | (l & 0xf);
            }
            if bad & BAD == 0 {
                return Ok(Digest(out));
            }
        }
        Err(format!("expected 64 lowercase hex characters, got {s:?}"))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.hex_text();
        f.write_str(std::str::from_utf8(&t).map_err(|_| fmt::Error)?)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let t = self.hex_text();
        s.serialize_str(std::str::from_utf8(&t).map_err(serde::ser::Error::custom)?)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Digest::from_hex(&s).map_err(serde::de::Error::custom)
    }
}

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// The id of a run: 1 to 128 characters of `[A-Za-z0-9._-]`.
///
/// The character set keeps `run_id:run_seq` unambiguous and ids safe in paths and URLs.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunId(String);

impl RunId {
    /// Check and wrap a run id.
    pub fn new(s: impl Into<String>) -> Result<RunId, String> {
        let s = s.into();
        if s.is_empty() || s.len() > MAX_ID_LEN {
            return Err(format!(
                "run id must be 1 to {MAX_ID_LEN} characters, got {}",
                s.len()
            ));
        }
        if let Some(c) = s.chars().find(|c| !is_id_char(*c)) {
            return Err(format!(
                "run id {s:?} contains {c:?}; allowed are A-Z a-z 0-9 . _ -"
            ));
        }
        Ok(RunId(s))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RunId({})", self.0)
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for RunId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RunId::new(s)
    }
}

impl Serialize for RunId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for RunId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        RunId::new(s).map_err(serde::de::Error::custom)
    }
}

/// The id of an event: `run_id:run_seq`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventId {
    /// The run the event belongs to.
    pub run_id: RunId,
    /// Its position in that run.
    pub run_seq: u64,
}

impl EventId {
    /// Build an event id.
    pub fn new(run_id: RunId, run_seq: u64) -> EventId {
        EventId { run_id, run_seq }
    }
}

impl fmt::Debug for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventId({self})")
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.run_id, self.run_seq)
    }
}

impl FromStr for EventId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (run, seq) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("event id {s:?} is not of the form RUN_ID:RUN_SEQ"))?;
        let run_id = RunId::new(run)?;
        if seq.is_empty()
            || !seq.bytes().all(|b| b.is_ascii_digit())
            || (seq.len() > 1 && seq.starts_with('0'))
        {
            return Err(format!(
                "event id {s:?}: run_seq {seq:?} is not a plain decimal number"
            ));
        }
        let run_seq: u64 = seq
            .parse()
            .map_err(|_| format!("event id {s:?}: run_seq out of range"))?;
        if run_seq > MAX_SAFE_INTEGER {
            return Err(format!("event id {s:?}: run_seq exceeds 2^53-1"));
        }
        Ok(EventId { run_id, run_seq })
    }
}

impl Serialize for EventId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for EventId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Who caused an event: the runtime, an agent, or a human operator.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Origin {
    /// ICE itself.
    Runtime,
    /// An agent (LLM-driven or scripted), by its id.
    Agent(String),
    /// A human principal, by its id.
    Operator(String),
}

impl fmt::Debug for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Origin({self})")
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Runtime => f.write_str("runtime"),
            Origin::Agent(id) => write!(f, "agent:{id}"),
            Origin::Operator(id) => write!(f, "operator:{id}"),
        }
    }
}

fn check_principal(kind: &str, id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(format!("{kind} id must be 1 to {MAX_ID_LEN} characters"));
    }
    if let Some(c) = id.chars().find(|c| !(is_id_char(*c) || *c == '@')) {
        return Err(format!(
            "{kind} id {id:?} contains {c:?}; allowed are A-Z a-z 0-9 . _ - @"
        ));
    }
    Ok(())
}

impl Origin {
    /// Whether the origin reads back from its text form: `Ok` exactly when
    /// `self.to_string().parse::<Origin>()` succeeds (and then it gives `self`), with the same
    /// error otherwise; without writing the text.
    pub fn check(&self) -> Result<(), String> {
        match self {
            Origin::Runtime => Ok(()),
            Origin::Agent(id) => check_principal("agent", id),
            Origin::Operator(id) => check_principal("operator", id),
        }
    }
}

impl FromStr for Origin {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "runtime" {
            return Ok(Origin::Runtime);
        }
        if let Some(id) = s.strip_prefix("agent:") {
            check_principal("agent", id)?;
            return Ok(Origin::Agent(id.to_string()));
        }
        if let Some(id) = s.strip_prefix("operator:") {
            check_principal("operator", id)?;
            return Ok(Origin::Operator(id.to_string()));
        }
        Err(format!(
            "origin {s:?} is not `runtime`, `agent:<id>` or `operator:<id>`"
        ))
    }
}

impl Serialize for Origin {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Origin {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl std::borrow::Borrow<str> for RunId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::Digest;

    #[test]
    fn hex_is_every_byte_as_two_lowercase_digits() {
        for seed in 0u8..=255 {
            let d = Digest(std::array::from_fn(|i| {
                seed.wrapping_mul(31)
                    .wrapping_add((i as u8).wrapping_mul(97))
            }));
            let expected: String = d.0.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(d.hex_text().as_slice(), expected.as_bytes());
            assert_eq!(d.to_hex(), expected);
            assert_eq!(d.to_string(), expected);
            assert_eq!(format!("{d:?}"), format!("Digest({expected})"));
            assert_eq!(
                serde_json::to_string(&d).unwrap(),
                format!("\"{expected}\"")
            );
        }
    }

    #[test]
    fn digests_read_back_from_hex_and_nothing_else_reads() {
        let d = Digest::of(b"ice");
        assert_eq!(Digest::from_hex(&d.to_hex()), Ok(d));
        let all: String = (0..32).map(|i| format!("{:02x}", i * 8 + 1)).collect();
        assert_eq!(Digest::from_hex(&all).map(|d| d.to_hex()), Ok(all.clone()));
        for bad in [
            all.to_uppercase(),
            all[..63].to_string(),
            format!("{all}0"),
            format!("g{}", &all[1..]),
            format!("{}:", &all[..63]),
            format!("{}/", &all[..63]),
            format!("{}`", &all[..63]),
            format!("{}\u{e9}", &all[..62]),
        ] {
            assert!(Digest::from_hex(&bad).is_err(), "{bad:?} was read");
        }
    }
}
