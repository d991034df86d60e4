//! RFC 8785 (JSON Canonicalization Scheme), the one encoding ICE hashes.
//!
//! `serde_jcs` does the encoding; this module is the kernel's single entry point to it, so
//! every hash in ICE goes through the same code.

use serde_json::Value;

/// Canonical bytes of a JSON text. Fails on text that is not JSON or not I-JSON (e.g. lone
/// surrogates, which `serde_json` refuses).
pub fn canonicalize_text(json: &[u8]) -> Result<Vec<u8>, serde_json::Error> {
    let v: Value = serde_json::from_slice(json)?;
    canonicalize(&v)
}

/// Canonical bytes of a JSON value.
pub fn canonicalize(value: &Value) -> Result<Vec<u8>, serde_json::Error> {
    serde_jcs::to_vec(value)
}
