//! ICE's authority layer: what may happen, decided before anything does.
//!
//! - [`capability`]: the capability registry, built at start-up and read-only afterwards; each
//!   capability type has a runtime-owned effect class (`read`, `internal-write`, `external`).
//! - [`request`]: a request for a decision (agent, capability, resource, context), checked and
//!   converted to Cedar's form once.
//! - [`policy`]: Cedar policies loaded from files and validated against [`schema`], pre-selected
//!   by action and resource type (and by the agent and resource entity a scope names), deciding
//!   `Deny`, `Permit` or `PermitWithApproval`.
//! - [`constraint`]: the limits a grant puts on each use ([`Constraints`]: `max_bytes`,
//!   `timeout_ms`), set by the permitting policies' annotations, enforced by the effects layer.
//! - [`grant`]: grants as a fold over a run's capability events ([`GrantBook`]), hierarchical
//!   [`Scope`]s, and [`GrantBook::check_use`] (with [`GrantBook::check_new_use`] for a grant
//!   about to be recorded), the check at the moment of use and the only source of an
//!   [`Authorization`], which the effects layer requires before it acts.
//! - [`budget`]: a run's budget ([`BudgetLedger`]): reserve before, settle after, refuse what
//!   does not fit; a fold over `BudgetReserved` and `BudgetSettled`.
//! - [`approval`]: approvals bound to the digest of one exact request ([`request_digest`]),
//!   single-use and expiring ([`ApprovalBook`]).
//! - [`payload`]: the typed payloads of the capability, budget and approval events, shared with
//!   the runtime that writes them, and the stable denial reason codes ([`DenialCode`]).
//!
//! The authority layer decides; it never executes anything, and it does no I/O beyond reading
//! policy files when they are loaded. Grants, budgets and approvals are pure functions of a
//! run's events and of the time the caller passes in, so replaying a run's events rebuilds
//! exactly the books the live run had.
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

pub mod approval;
pub mod budget;
pub mod capability;
pub mod constraint;
pub mod diagnostic;
pub mod grant;
mod index;
pub mod limits;
mod nesting;
pub mod payload;
pub mod policy;
pub mod request;
pub mod schema;

pub use approval::{Approval, ApprovalBook, ApprovalRefusal, ApprovalStatus, request_digest};
pub use budget::{BudgetLedger, BudgetLimits, BudgetRefusal};

pub use capability::{
    Capability, CapabilityError, Classifier, EffectClass, Registry, RegistryBuilder, ResourceKind,
};
pub use constraint::Constraints;
pub use diagnostic::{Diagnostic, Location, Severity};
pub use grant::{Authorization, Grant, GrantBook, GrantRefusal, GrantStatus, Scope, ScopeError};
pub use payload::{
    ApprovalClosed, ApprovalDeniedPayload, ApprovalGrantedPayload, ApprovalRequestedPayload,
    BookError, BookProblem, BudgetReservedPayload, BudgetSettledPayload, CapabilityDeniedPayload,
    CapabilityExpiredPayload, CapabilityGrantedPayload, CapabilityRevokedPayload,
    CapabilityUsedPayload, DenialCode, PayloadError,
};
pub use policy::{
    Decision, DecisionKind, DenyReason, Explanation, LoadError, PolicyEffect, PolicyError,
    PolicyInfo, PolicySet, PolicySource, PolicyVersion, Verdict, is_policy_file_name,
};
pub use request::{
    ArgumentError, ArgumentProblem, BudgetLeft, EntityCache, HTTP_CONNECT, Request, RequestBuilder,
    RequestError, Resource, ResourceError, check_visible, connection_address,
};
pub use schema::{Schema, SchemaError};
