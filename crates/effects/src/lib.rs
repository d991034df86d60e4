//! ICE's effects layer: the adapters through which the runtime acts on the world, each of which
//! acts only under an authorization the runtime hands over (spec §2).
//!
//! - [`workspace`]: filesystem access confined to a directory (no `..`, no absolute path, no
//!   symbolic link followed, no hard-linked file read or written).
//! - [`staging`]: a run's internal writes, staged outside the workspace; reads see the staged
//!   view; a crash-safe commit applies them (journal, then write-to-temp + fsync + rename);
//!   recovery rolls a journalled commit forward.
//! - [`http`]: HTTP requests to exactly the authorised host, parsed the WHATWG way, without
//!   following redirects.
//! - [`exec`]: running a command in a materialised copy of the workspace, with a timeout and
//!   bounded output.
//! - [`mcp`]: ICE's MCP client toward the operator's tool servers: starts and supervises them
//!   (stdio or streamable HTTP), keeps their tool catalogs, and calls tools, with timeouts and
//!   size bounds.
//! - [`evidence`]: what each effect leaves behind for its event.
//!
//! Every adapter function an agent's request can reach takes the authorization and refuses
//! unless it names exactly the capability and resource of the operation. The runtime's own acts
//! (computing a diff, materialising, committing, recovering, running the run spec's validation
//! checks) take none: they are not an agent's requests.
#![warn(missing_docs)]

mod auth;
mod children;
pub mod evidence;
pub mod exec;
pub mod http;
pub mod limits;
pub mod mcp;
pub mod staging;
mod supervisor;
pub mod workspace;

#[cfg(test)]
mod tests;

pub use auth::AuthorizationError;
pub use children::kill_child_processes;
pub use evidence::{Detail, Digested, Evidence};
pub use exec::{ExecError, ExecOutput, ExecSpec, run, run_check, run_until};
pub use http::{
    HttpClient, HttpError, HttpLimits, HttpRequest, HttpResponse, HttpTarget, UrlError,
    parse_target,
};
pub use ice_authority::Authorization;
pub use mcp::{
    McpError, ServerConfig, ServerTransport, ToolCallError, ToolCallOutput, ToolServers, ToolSpec,
    hint_from_annotations,
};
pub use staging::{
    Change, ChangeKind, CommitPoint, CommitReport, Materialized, Recovery, Stage, StageError,
    StagedEffect, StagedOp, abandon, commit_pending, pending_changes, recover, release,
    roll_forward,
};
pub use workspace::{
    Confinement, ConfinementError, Entry, EntryKind, FileRead, FileState, FsError, Listing, Stat,
    Workspace,
};
