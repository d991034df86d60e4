//! Content-addressed blobs: large payload fields leave the event, which keeps their digest.
//!
//! A top-level payload field whose canonical encoding exceeds
//! [`BLOB_FIELD_THRESHOLD_BYTES`](crate::limits::BLOB_FIELD_THRESHOLD_BYTES) is replaced by a
//! reference `{"$blob": "<sha256 hex>", "size": <bytes>}`; the blob holds the field's canonical
//! encoding. Only the kernel writes references: a draft that already contains a `$blob` key
//! anywhere is refused, so a reference in the log always names a blob the runtime stored.

use serde_json::Value;

use crate::event::Payload;
use crate::id::Digest;
use crate::limits::{BLOB_FIELD_THRESHOLD_BYTES, MAX_BLOB_BYTES};

/// The reserved key that marks a blob reference.
pub const BLOB_KEY: &str = "$blob";

/// Bytes stored outside the event, named by their SHA-256.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blob {
    /// SHA-256 of `bytes`.
    pub digest: Digest,
    /// The content: the canonical JSON of one payload field.
    pub bytes: Vec<u8>,
}

impl Blob {
    /// A blob of these bytes.
    pub fn new(bytes: Vec<u8>) -> Blob {
        Blob {
            digest: Digest::of(&bytes),
            bytes,
        }
    }
}

/// A reference to a blob found in a payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobRef {
    /// The payload field that was moved out.
    pub field: String,
    /// SHA-256 of the blob.
    pub digest: Digest,
    /// Its length in bytes.
    pub size: u64,
}

/// Move large top-level fields to blobs. Returns the blobs; `payload` keeps references.
pub fn externalize(payload: &mut Payload) -> Result<Vec<Blob>, String> {
    let mut blobs = Vec::new();
    for (key, value) in payload.iter_mut() {
        if max_canonical_len(value) <= BLOB_FIELD_THRESHOLD_BYTES {
            continue; // certainly small: no need to encode it to find out
        }
        let bytes = crate::canonical::canonicalize(value)
            .map_err(|e| format!("payload field {key:?}: {e}"))?;
        if bytes.len() <= BLOB_FIELD_THRESHOLD_BYTES {
            continue;
        }
        if bytes.len() > MAX_BLOB_BYTES {
            return Err(format!(
                "payload field {key:?} is {} bytes; the largest blob is {MAX_BLOB_BYTES} bytes",
                bytes.len()
            ));
        }
        let blob = Blob::new(bytes);
        *value = blob_ref_value(&blob.digest, blob.bytes.len() as u64);
        blobs.push(blob);
    }
    Ok(blobs)
}

/// An upper bound of a value's canonical length, without encoding it: a string's bytes can at
/// most sextuple (`\u00XX` escapes) plus quotes; a number takes at most 32 characters.
fn max_canonical_len(v: &Value) -> usize {
    fn str_len(s: &str) -> usize {
        s.len().saturating_mul(6).saturating_add(2)
    }
    match v {
        Value::Null | Value::Bool(_) => 5,
        Value::Number(_) => 32,
        Value::String(s) => str_len(s),
        Value::Array(a) => a
            .iter()
            .fold(2 + a.len(), |n, x| n.saturating_add(max_canonical_len(x))),
        Value::Object(m) => m.iter().fold(2 + 2 * m.len(), |n, (k, x)| {
            n.saturating_add(str_len(k))
                .saturating_add(max_canonical_len(x))
        }),
    }
}

fn blob_ref_value(digest: &Digest, size: u64) -> Value {
    let mut m = serde_json::Map::new();
    m.insert(BLOB_KEY.into(), Value::String(digest.to_hex()));
    m.insert("size".into(), Value::from(size));
    Value::Object(m)
}

/// The blob references of a payload (top-level fields only, where [`externalize`] puts them).
/// A field that uses the reserved key but is not a well-formed reference is an error.
pub fn blob_refs(payload: &Payload) -> Result<Vec<BlobRef>, String> {
    let mut out = Vec::new();
    for (key, value) in payload {
        let Value::Object(m) = value else { continue };
        let Some(d) = m.get(BLOB_KEY) else { continue };
        let bad = || format!("payload field {key:?} is not a well-formed blob reference");
        if m.len() != 2 {
            return Err(bad());
        }
        let digest = d
            .as_str()
            .and_then(|s| Digest::from_hex(s).ok())
            .ok_or_else(bad)?;
        let size = m.get("size").and_then(Value::as_u64).ok_or_else(bad)?;
        out.push(BlobRef {
            field: key.clone(),
            digest,
            size,
        });
    }
    Ok(out)
}

/// Whether `value` uses the reserved key anywhere.
pub fn uses_reserved_key(value: &Value) -> bool {
    match value {
        Value::Object(m) => m.contains_key(BLOB_KEY) || m.values().any(uses_reserved_key),
        Value::Array(a) => a.iter().any(uses_reserved_key),
        _ => false,
    }
}

/// Put blob contents back in place of their references (for display and export).
/// References whose blob `fetch` cannot find are left as they are.
pub fn inline(payload: &Payload, mut fetch: impl FnMut(&Digest) -> Option<Vec<u8>>) -> Payload {
    let mut out = payload.clone();
    if let Ok(refs) = blob_refs(payload) {
        for r in refs {
            if let Some(v) = fetch(&r.digest).and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            {
                out.insert(r.field, v);
            }
        }
    }
    out
}

/// Deserialize a text field that the kernel may have moved to the blob store: the text itself,
/// or, for a reference, a stand-in naming the blob (`[text of N bytes, kept in blob DIGEST]`).
/// For folds that read a field such as a reason as text: a record whose text went to the store
/// (possible before such fields were capped) still folds, and the blob still holds the text.
pub fn text_or_blob<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum TextOrRef {
        Text(String),
        Ref {
            #[serde(rename = "$blob")]
            blob: String,
            size: u64,
        },
    }
    match <TextOrRef as serde::Deserialize>::deserialize(d)? {
        TextOrRef::Text(t) => Ok(t),
        TextOrRef::Ref { blob, size } => match Digest::from_hex(&blob) {
            Ok(_) => Ok(format!("[text of {size} bytes, kept in blob {blob}]")),
            Err(e) => Err(serde::de::Error::custom(format!(
                "a blob reference whose digest is not one: {e}"
            ))),
        },
    }
}
