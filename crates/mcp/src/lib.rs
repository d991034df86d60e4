//! # ice-mcp: ICE's MCP gateway (interfaces layer)
//!
//! To an agent, ICE is an MCP server; each MCP session is one run. The tools it offers are the
//! tools of the MCP tool servers the run spec configures (`[servers.NAME]`), under ICE-assigned
//! names `SERVER__TOOL`, and only those the run's policy could permit. Every `tools/call` is a
//! proposal to the runtime: `CapabilityRequested` → decision → grant or denial → the call
//! through the effects layer → `ToolInvoked` (arguments, result or its blob digest, timing, the
//! negotiated protocol version). The gateway itself decides nothing and keeps no state of its
//! own beyond which run a session is.
//!
//! - A denial comes back as a tool result with `isError: true` whose text says why (the agent
//!   can read it and act on it), with the denial's details under `structuredContent.ice`.
//! - A call that needs approval waits (bounded by the spec's `[approvals] timeout`) for an
//!   operator (`ice approve`, the HTTP API, the web UI) and is recorded either way. The
//!   session's own client is also asked, by MCP elicitation when it supports it, if the run
//!   spec's `[approvals] elicitation` says so; unset, that is on over stdio (`ice mcp`: the
//!   client is its user's app) and off over HTTP (`ice serve`: the client holding an agent's
//!   token is the agent, and would approve its own calls). An elicited answer is recorded as
//!   `operator:user-of-stdio-client` or `operator:user-of-agent.<authenticated agent>`, never
//!   under a name the client gives itself.
//! - A session's run is opened at `initialize` (or at the first request of a client without
//!   one), recording who the client is and the protocol it negotiated. When the session ends,
//!   the run is validated and committed; a stdio session that fails, or an HTTP session left
//!   idle for 30 minutes, aborts its run; `ice kill` ends it from outside (later calls are
//!   refused with the reason).
//! - Protocol styles: clients on 2025-06-18 / 2025-11-25 (initialize handshake and sessions) and
//!   on 2026-07-28 (no initialize; per-request metadata) are both served by rmcp. Over HTTP a
//!   2026-07-28 client has no session, so each of its requests that needs a run gets its own.

#![warn(missing_docs)]

mod handler;
mod http;

pub use handler::{
    AgentIdentity, Gateway, GatewayError, IceMcp, MCP_PATH, McpAuth, check_allowed_host, tool_name,
};
