//! Every limit of the authority layer, in one place. A limit that is hit is an error that names
//! it, never a hang or a truncation.

/// Most policy files read from one directory.
pub const MAX_POLICY_FILES: usize = 1_000;
/// Largest policy file, in bytes.
pub const MAX_POLICY_FILE_BYTES: usize = 1024 * 1024;
/// Most policies in one set, over all files.
pub const MAX_POLICIES: usize = 10_000;
/// Longest policy id given with `@id("...")`, in bytes.
pub const MAX_POLICY_ID_LEN: usize = 128;

/// Longest workspace path, in bytes.
pub const MAX_PATH_LEN: usize = 4096;
/// Longest host name, in bytes (RFC 1035 allows 253 plus a trailing dot).
pub const MAX_HOST_LEN: usize = 254;
/// Longest tool server or tool name, in bytes.
pub const MAX_TOOL_NAME_LEN: usize = 128;
/// Longest program name or path, in bytes.
pub const MAX_COMMAND_LEN: usize = 4096;
/// Longest intent, in bytes (the kernel's text limit).
pub const MAX_INTENT_LEN: usize = ice_kernel::limits::MAX_TEXT_LEN;

/// Deepest nesting of a call's arguments (the top-level object is depth 0).
pub const MAX_ARGUMENT_DEPTH: usize = 32;
/// Most values (objects, arrays, strings, numbers, booleans) in a call's arguments.
pub const MAX_ARGUMENT_VALUES: usize = 4096;
/// Longest string in a call's arguments, in bytes. Large contents (a file to write) reach policy
/// as a size or a digest, not as themselves.
pub const MAX_ARGUMENT_STRING_BYTES: usize = 64 * 1024;
/// Most bytes of strings and keys in a call's arguments, in all.
pub const MAX_ARGUMENT_TOTAL_BYTES: usize = 1024 * 1024;

/// Longest grant scope in its text form, in bytes (a path at [`MAX_PATH_LEN`] with every byte
/// escaped still fits).
pub const MAX_SCOPE_LEN: usize = 4 * MAX_PATH_LEN;
/// Longest budget reservation id, in bytes.
pub const MAX_RESERVATION_ID_LEN: usize = 128;
