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
/// Deepest nesting in a policy file of brackets (`(`, `[`, `{`) and `if`-expressions (open until
/// the end of their `else` branch), counting the policy's own `(...)` and `when { ... }`;
/// brackets inside strings and comments do not count.
///
/// Cedar turns its parse tree into a syntax tree recursively, about ten calls for each bracket
/// (14 KiB of stack in a release build, 18 KiB in the test profile): 144 nested brackets (114
/// in tests) overflow a 2 MiB stack, the size of a tokio worker's, where `ice serve` and the
/// runtime load and decide policies; 583 (462) overflow the main thread's 8 MiB. 32 levels take
/// at most about 600 KiB; real policies nest a handful of levels deep.
pub const MAX_POLICY_NESTING: usize = 32;
/// Deepest expression in a policy: an upper bound on the depth of the syntax tree Cedar builds,
/// counting every operator, attribute access, method call, bracket and `if` along the path it is
/// on (`&&` and `||` once per operand; the rules are in `src/nesting.rs`).
///
/// Cedar validates, evaluates and drops a policy's tree recursively. Its evaluator needs about
/// 4.3 KiB of stack per level and gives up with "recursion limit reached" (a failed policy)
/// when less than 100 KiB is left: at 458 levels on a 2 MiB stack (465 in a release build).
/// Its validator (about 2.3 KiB per level) silently stops checking types at 843 levels, and
/// dropping the tree overflows the stack outright at about 32,600 levels (130,900 on 8 MiB),
/// which a chain of `+ 1` reaches in 130 KB. 128 levels still allow a `||` chain of about 120
/// conditions. Policies at both limits load, validate and decide in 768 KiB of stack (test
/// profile), well within a 2 MiB worker's.
pub const MAX_POLICY_EXPRESSION_DEPTH: usize = 128;
/// Deepest nesting in a schema file of brackets (`(`, `[`, `{`) and the `<` of `Set<...>`.
/// Cedar parses a schema recursively too: 475 nested record types overflow a 2 MiB stack.
pub const MAX_SCHEMA_NESTING: usize = 32;

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
