//! RFC 8785 (JSON Canonicalization Scheme), the one encoding ICE hashes.
//!
//! [`write_value`] is ICE's hot-path encoder for `serde_json` values: object members sorted by
//! UTF-16 code units (checked, not assumed from the map), numbers with `ryu-js` (ECMAScript's
//! `Number.prototype.toString`), strings with the RFC's escapes. `serde_jcs` is the reference:
//! the tests check this encoder against it byte for byte, and against the RFC's own vectors.

use serde_json::{Map, Number, Value};

/// Canonical bytes of a JSON text. Fails on text that is not JSON or not I-JSON (e.g. lone
/// surrogates, which `serde_json` refuses).
pub fn canonicalize_text(json: &[u8]) -> Result<Vec<u8>, serde_json::Error> {
    let v: Value = serde_json::from_slice(json)?;
    canonicalize(&v)
}

/// Canonical bytes of a JSON value.
pub fn canonicalize(value: &Value) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = Vec::with_capacity(128);
    write_value(value, &mut out);
    Ok(out)
}

/// Append the canonical encoding of `v` to `out`.
pub fn write_value(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => write_number(n, out),
        Value::String(s) => write_str(s, out),
        Value::Array(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(x, out);
            }
            out.push(b']');
        }
        Value::Object(m) => write_object(m, out),
    }
}

/// Append the canonical encoding of an object: members sorted by their keys' UTF-16 code units.
///
/// The map's own order is not trusted: `serde_json` keeps insertion order when any crate in the
/// build enables its `preserve_order` feature (Cargo unifies features), and sorts otherwise.
/// Already-sorted maps (the common case) are written as they are; others are sorted first.
pub fn write_object(m: &Map<String, Value>, out: &mut Vec<u8>) {
    let member = |out: &mut Vec<u8>, i: usize, k: &str, x: &Value| {
        if i > 0 {
            out.push(b',');
        }
        write_str(k, out);
        out.push(b':');
        write_value(x, out);
    };
    out.push(b'{');
    let sorted = m
        .keys()
        .zip(m.keys().skip(1))
        .all(|(a, b)| key_order(a, b).is_lt());
    if sorted {
        for (i, (k, x)) in m.iter().enumerate() {
            member(out, i, k, x);
        }
    } else if m.len() <= SMALL_OBJECT {
        // Sorted on the stack: payloads are small objects, often in insertion order.
        let mut entries: [Option<(&String, &Value)>; SMALL_OBJECT] = [None; SMALL_OBJECT];
        for (e, kv) in entries.iter_mut().zip(m.iter()) {
            *e = Some(kv);
        }
        let entries = &mut entries[..m.len()];
        // Keys are distinct, so an unstable sort gives the one order.
        entries.sort_unstable_by(|a, b| match (a, b) {
            (Some(a), Some(b)) => key_order(a.0, b.0),
            _ => std::cmp::Ordering::Equal,
        });
        for (i, (k, x)) in entries.iter().flatten().enumerate() {
            member(out, i, k, x);
        }
    } else {
        let mut entries: Vec<(&String, &Value)> = m.iter().collect();
        entries.sort_by(|a, b| key_order(a.0, b.0));
        for (i, (k, x)) in entries.into_iter().enumerate() {
            member(out, i, k, x);
        }
    }
    out.push(b'}');
}

/// Objects up to this many members are sorted without allocating.
const SMALL_OBJECT: usize = 16;

/// RFC 8785's member order: by UTF-16 code units. For keys whose characters are all below
/// U+E000 that is byte order (UTF-8 preserves code point order, and such characters are one
/// UTF-16 unit each); only keys with characters from U+E000 up need the UTF-16 comparison.
fn key_order(a: &str, b: &str) -> std::cmp::Ordering {
    let (x, y) = (a.as_bytes(), b.as_bytes());
    // The common case first: keys that first differ at an ASCII byte in both. That byte starts
    // a character in both, after the same characters, and ASCII is one UTF-16 unit of the same
    // value; a key that is a prefix of the other comes first in both orders.
    match x.iter().zip(y).position(|(p, q)| p != q) {
        None => return x.len().cmp(&y.len()),
        Some(i) if x[i] < 0x80 && y[i] < 0x80 => return x[i].cmp(&y[i]),
        Some(_) => {}
    }
    // Bytes 0xEE and above start characters at or above U+E000.
    if a.bytes().all(|c| c < 0xEE) && b.bytes().all(|c| c < 0xEE) {
        a.as_bytes().cmp(b.as_bytes())
    } else {
        a.encode_utf16().cmp(b.encode_utf16())
    }
}

fn write_number(n: &Number, out: &mut Vec<u8>) {
    if let Some(u) = n.as_u64() {
        write_u64(u, out);
    } else if let Some(i) = n.as_i64() {
        if i < 0 {
            out.push(b'-');
        }
        write_u64(i.unsigned_abs(), out);
    } else if let Some(f) = n.as_f64() {
        // serde_json holds only finite floats.
        let mut buf = ryu_js::Buffer::new();
        out.extend_from_slice(buf.format_finite(f).as_bytes());
    }
}

/// Append an unsigned integer as ECMAScript prints it: plain decimal digits below 10^21, which
/// every `u64` is (integers beyond 2^53 lose precision in ECMAScript; the validator refuses
/// them anyway).
pub fn write_u64(mut u: u64, out: &mut Vec<u8>) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (u % 10) as u8;
        u /= 10;
        if u == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Append a string with RFC 8785's escapes: `"` and `\`, the short forms for backspace, tab,
/// line feed, form feed and carriage return, `\u00xx` (lowercase) for other control characters;
/// everything else as UTF-8.
pub fn write_str(s: &str, out: &mut Vec<u8>) {
    out.reserve(s.len() + 2);
    out.push(b'"');
    write_str_contents(s, out);
    out.push(b'"');
}

/// [`write_str`] without the quotes: the escaped characters alone, so a string can be written
/// in parts (escaping is character by character, so the parts' escapes are the whole's).
pub fn write_str_contents(s: &str, out: &mut Vec<u8>) {
    let bytes = s.as_bytes();
    // Most strings need no escape: one pass that vectorises (a fold, not a search) decides.
    let clean = !bytes.iter().fold(false, |esc, &c| {
        esc | (c < 0x20) | (c == b'"') | (c == b'\\')
    });
    if clean {
        out.extend_from_slice(bytes);
        return;
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x08 => b"\\b",
            0x09 => b"\\t",
            0x0a => b"\\n",
            0x0c => b"\\f",
            0x0d => b"\\r",
            0x00..=0x1f => {
                out.extend_from_slice(&bytes[start..i]);
                out.extend_from_slice(&[
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[(b >> 4) as usize],
                    HEX[(b & 0xf) as usize],
                ]);
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(esc);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}
