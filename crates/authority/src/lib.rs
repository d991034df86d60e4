//! ICE's authority layer: what may happen, decided before anything does.
//!
//! - [`capability`]: the capability registry, built at start-up and read-only afterwards; each
//!   capability type has a runtime-owned effect class (`read`, `internal-write`, `external`).
//! - [`request`]: a request for a decision (agent, capability, resource, context), checked and
//!   converted to Cedar's form once.
//! - [`policy`]: Cedar policies loaded from files and validated against [`schema`], pre-selected
//!   by action and resource type (and by the agent and resource entity a scope names), deciding
//!   `Deny`, `Permit` or `PermitWithApproval`.
//!
//! The authority layer decides; it never executes anything, and it does no I/O beyond reading
//! policy files when they are loaded.
//!
//! ```
//! use ice_authority::{PolicySet, PolicySource, Registry, Request, Resource, Schema};
//! use ice_kernel::RunId;
//!
//! let schema = Schema::ice()?;
//! let source = PolicySource {
//!     name: "base.cedar".into(),
//!     text: r#"permit(principal == Agent::"coder", action == Action::"fs.write",
//!                     resource in Dir::"src");"#.into(),
//! };
//! let policies = PolicySet::from_sources(&[source], &schema)?;
//! let registry = Registry::standard();
//! let run = RunId::new("run-1")?;
//! let request = Request::builder(&run, "coder", "fs.write", Resource::path("src/lib.rs")?)
//!     .intent("fix the parser")
//!     .build(&registry)?;
//! let decision = policies.decide(&request);
//! assert_eq!(decision.kind(), ice_authority::DecisionKind::Permit);
//! assert_eq!(decision.determining_policies(), ["base.cedar#1"]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

pub mod capability;
pub mod diagnostic;
mod index;
pub mod limits;
pub mod policy;
pub mod request;
pub mod schema;

pub use capability::{
    Capability, CapabilityError, Classifier, EffectClass, Registry, RegistryBuilder, ResourceKind,
};
pub use diagnostic::{Diagnostic, Location, Severity};
pub use policy::{
    Decision, DecisionKind, DenyReason, Explanation, LoadError, PolicyEffect, PolicyError,
    PolicyInfo, PolicySet, PolicySource, PolicyVersion, Verdict,
};
pub use request::{
    ArgumentError, ArgumentProblem, BudgetLeft, Request, RequestBuilder, RequestError, Resource,
    ResourceError,
};
pub use schema::{Schema, SchemaError};
