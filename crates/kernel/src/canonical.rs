//! RFC 8785 (JSON Canonicalization Scheme), the one encoding ICE hashes.
//!
//! [`write_value`] is ICE's hot-path encoder for `serde_json` values: objects are written in
//! the map's key order when that already is RFC 8785's UTF-16 order (always, unless a key holds
//! characters from U+E000–U+FFFF beside ones above U+FFFF), numbers with `ryu-js` (ECMAScript's
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

/// Append the canonical encoding of an object.
pub fn write_object(m: &Map<String, Value>, out: &mut Vec<u8>) {
    out.push(b'{');
    if m.keys().all(|k| utf8_order_is_utf16_order(k)) {
        for (i, (k, x)) in m.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_str(k, out);
            out.push(b':');
            write_value(x, out);
        }
    } else {
        let mut entries: Vec<(&String, &Value)> = m.iter().collect();
        entries.sort_by(|a, b| a.0.encode_utf16().cmp(b.0.encode_utf16()));
        for (i, (k, x)) in entries.into_iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_str(k, out);
            out.push(b':');
            write_value(x, out);
        }
    }
    out.push(b'}');
}

/// Keys whose characters are all below U+E000 sort the same by code point (the map's order)
/// and by UTF-16 code unit (the RFC's order).
fn utf8_order_is_utf16_order(k: &str) -> bool {
    // Bytes 0xEE and above start characters at or above U+E000.
    k.bytes().all(|b| b < 0xEE)
}

fn write_number(n: &Number, out: &mut Vec<u8>) {
    if let Some(u) = n.as_u64() {
        out.extend_from_slice(itoa(u as u128, false).as_bytes());
    } else if let Some(i) = n.as_i64() {
        out.extend_from_slice(itoa(i.unsigned_abs() as u128, i < 0).as_bytes());
    } else if let Some(f) = n.as_f64() {
        // serde_json holds only finite floats.
        let mut buf = ryu_js::Buffer::new();
        out.extend_from_slice(buf.format_finite(f).as_bytes());
    }
}

fn itoa(mut u: u128, negative: bool) -> String {
    // Integers within ±2^64: ECMAScript prints them as digits when |n| < 10^21. serde_json
    // integers beyond 2^53 lose precision in ECMAScript; the validator refuses them anyway.
    if u >= 1_000_000_000_000_000_000_000 {
        let mut buf = ryu_js::Buffer::new();
        let f = if negative { -(u as f64) } else { u as f64 };
        return buf.format_finite(f).to_string();
    }
    let mut digits = [0u8; 40];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (u % 10) as u8;
        u /= 10;
        if u == 0 {
            break;
        }
    }
    let mut s = String::with_capacity(41 - i);
    if negative {
        s.push('-');
    }
    s.push_str(std::str::from_utf8(&digits[i..]).unwrap_or("0"));
    s
}

/// Append a string with RFC 8785's escapes: `"` and `\`, the short forms for backspace, tab,
/// line feed, form feed and carriage return, `\u00xx` (lowercase) for other control characters;
/// everything else as UTF-8.
pub fn write_str(s: &str, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = s.as_bytes();
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
    out.push(b'"');
}
