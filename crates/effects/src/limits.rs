//! Every fixed limit of the effects layer, in one place. A limit that is hit is an error that
//! names it, or a result marked as truncated, never a hang or a silent cut.

/// Most entries one directory listing returns; a larger directory is an error, not a partial
/// list.
pub const MAX_LIST_ENTRIES: usize = 100_000;

/// Largest content one staged write may hold, in bytes.
pub const MAX_STAGED_FILE_BYTES: usize = 256 * 1024 * 1024;

/// Largest commit journal read back by recovery, in bytes.
pub const MAX_JOURNAL_BYTES: u64 = 256 * 1024 * 1024;

/// Longest URL an HTTP request may have, in bytes.
pub const MAX_URL_LEN: usize = 8 * 1024;

/// Most request headers an HTTP request may carry.
pub const MAX_HTTP_HEADERS: usize = 64;

/// Most arguments one command may have.
pub const MAX_EXEC_ARGS: usize = 1024;
