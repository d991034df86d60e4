//! # ice-kernel: ICE's law as pure code
//!
//! The event and its canonical encoding, the closed taxonomy and origin law, the validator,
//! the run state machine and the projections. This crate does no I/O, reads no clock and
//! generates no randomness: time comes in as a [`Timestamp`] from an injected [`Clock`], and
//! cross-run lookups come in through [`CauseIndex`].
//!
//! ```
//! use ice_kernel::*;
//! let run = RunId::new("demo").unwrap();
//! let mut head = RunHead::new(run);
//! let at = Timestamp::from_unix_us(1_700_000_000_000_000).unwrap();
//! let (e, _) = head.seal(Draft::new("RunProvisioned", Origin::Runtime), at, &NoOtherRuns).unwrap();
//! assert_eq!(e.event().run_seq, 0);
//! assert_eq!(head.state(), RunState::Provisioned);
//! // An agent may not emit runtime events: the origin law.
//! let bad = Draft::new("RunAborted", Origin::Agent("a1".into()));
//! assert!(matches!(head.seal(bad, at, &NoOtherRuns), Err(ValidationError::OriginForbidden { .. })));
//! ```
#![warn(missing_docs)]

pub mod agent;
pub mod blob;
pub mod builtin;
pub mod canonical;
pub mod event;
pub mod header;
pub mod id;
pub mod limits;
pub mod projection;
mod sha256x2;
pub mod state;
pub mod taxonomy;
pub mod timestamp;
pub mod validate;

pub use agent::{
    Agent, AgentError, AgentView, CapabilityProposal, Inference, Interrupt, MountedMemory, Outcome,
    Proposal, Thought, ToolOffer,
};
pub use blob::{Blob, BlobRef};
pub use builtin::{BUILTIN_TOOLS, BuiltinTool};
pub use event::{Cost, Draft, Event, Payload};
pub use header::Header;
pub use id::{Digest, EventId, Origin, RunId};
pub use projection::{Projection, RunSummary, RunView, Window};
pub use state::{Lifecycle, RunState, StateError, ValidationOutcome};
pub use taxonomy::{Category, EventType, TAXONOMY_VERSION};
pub use timestamp::{Clock, Timestamp};
pub use validate::{
    CauseIndex, ChainError, HashedBody, NoOtherRuns, RunHead, SealedBatch, SealedEvent,
    ValidationError,
};
