//! # ice-intelligence: agent drivers
//!
//! Agents only propose. Every driver here implements [`ice_kernel::Agent`]: it is shown
//! an [`ice_kernel::AgentView`] and returns an [`ice_kernel::Proposal`]. This crate depends on
//! the kernel and nothing else of ICE, so no driver can reach the log, the authority layer or an
//! effect adapter: the runtime alone records, decides and acts.
//!
//! - [`plan`]: a scripted agent that proposes the steps of a TOML file (deterministic; tests and
//!   demos).
//! - [`llm`]: a tool-calling loop against any OpenAI-compatible chat-completions endpoint; each
//!   model call is recorded as `InferenceStep`, and [`RecordedModel`] replays a run without the
//!   model.
#![warn(missing_docs)]

pub mod llm;
pub mod plan;

pub use llm::{
    FailureKind, HttpModel, LlmAgent, LlmConfig, Model, ModelFailure, ModelReply, RecordedModel,
    ToolBinding, Toolbox,
};
pub use plan::{Plan, PlanAgent, PlanError, Step};
