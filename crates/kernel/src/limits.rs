//! Every limit the kernel enforces, in one place. A limit that is hit is a validation error
//! naming the limit, never a panic or a silent truncation.

/// Largest integer JSON can carry exactly (I-JSON, RFC 7493): 2^53 - 1.
pub const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;
/// Longest run, agent or operator id, in bytes.
pub const MAX_ID_LEN: usize = 128;
/// Longest `intent` or `authority`, in bytes.
pub const MAX_TEXT_LEN: usize = 4 * 1024;
/// Most causes one event may name.
pub const MAX_CAUSES: usize = 64;
/// Largest canonical payload kept inline in an event, after large fields went to blobs.
pub const MAX_INLINE_PAYLOAD_BYTES: usize = 256 * 1024;
/// A top-level payload field whose canonical encoding is larger than this goes to the blob store.
pub const BLOB_FIELD_THRESHOLD_BYTES: usize = 16 * 1024;
/// Largest single blob.
pub const MAX_BLOB_BYTES: usize = 64 * 1024 * 1024;
/// Deepest nesting of JSON arrays and objects in a payload.
pub const MAX_JSON_DEPTH: usize = 64;
/// Most events in one appended batch.
pub const MAX_BATCH_EVENTS: usize = 4096;
/// Largest plan file read (the plan driver's input, whose digest a run records).
pub const MAX_PLAN_BYTES: u64 = 4 << 20;
