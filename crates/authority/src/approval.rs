//! Approvals: an operator's consent to one exact call, as a pure fold over approval events.
//!
//! An approval binds to the digest of the exact request ([`request_digest`]: run, capability,
//! resource, arguments, policy version), is single-use, expires, and is re-checked at use
//! ([`ApprovalBook::authorize`]). An approval for one call never authorises another: any
//! difference in the call gives another digest.
//!
//! Lifecycle, as [`ApprovalBook::apply`] folds it:
//!
//! - `ApprovalRequested` (runtime) opens a [`ApprovalStatus::Pending`] approval; its event id is
//!   the approval's id.
//! - An approval takes exactly one answer, `ApprovalGranted` or `ApprovalDenied` (operator),
//!   and only while pending: a second answer, or an answer after use, is refused by the fold
//!   (a record holding one was written past the runtime, which checks first).
//! - `ApprovalGranted` with the request's digest grants it; with another digest it records
//!   [`ApprovalStatus::Mismatch`], which authorises nothing and is final (the CLI refuses such
//!   a grant before recording it, with [`ApprovalBook::check_grant`]).
//! - `ApprovalDenied` denies it; a denial is final.
//! - `CapabilityGranted` (runtime) citing the approval marks it [`ApprovalStatus::Used`].
//!
//! Expiry is by time: at or after `expires_at` a pending approval is no longer listed by
//! [`ApprovalBook::pending`] and a granted one no longer authorises.

use std::collections::BTreeMap;

use ice_kernel::canonical::write_value;
use ice_kernel::{Digest, Event, EventId, EventType, Origin, RunId, Timestamp};
use serde_json::{Map, Value, json};

use crate::payload::{
    ApprovalDeniedPayload, ApprovalGrantedPayload, ApprovalRequestedPayload, BookError,
    BookProblem, CapabilityGrantedPayload, DenialCode, is_blob_ref,
};
use crate::policy::PolicyVersion;
use crate::request::Resource;

/// The version tag in the digested object; a change of the object's shape changes it.
pub const REQUEST_DIGEST_VERSION: &str = "ice-approval-request-v1";

/// The digest an approval binds to: SHA-256 of the RFC 8785 canonical JSON
/// ([`ice_kernel::canonical`]) of exactly this object:
///
/// ```json
/// {
///   "v": "ice-approval-request-v1",
///   "run": "<run id>",
///   "capability": "<capability name>",
///   "resource": {"kind": "<path|dir|host|tool|command>", "id": "<Resource::entity_id>"},
///   "arguments": <the call's arguments, as given>,
///   "policy_version": "<policy set version, 64 lower-case hex characters>"
/// }
/// ```
///
/// (canonical JSON orders the members by name: `arguments`, `capability`, `policy_version`,
/// `resource`, `run`, `v`).
pub fn request_digest(
    run: &RunId,
    capability: &str,
    resource: &Resource,
    arguments: &Value,
    policy_version: &PolicyVersion,
) -> Digest {
    let object = json!({
        "v": REQUEST_DIGEST_VERSION,
        "run": run.as_str(),
        "capability": capability,
        "resource": {"kind": resource.kind().name(), "id": resource.entity_id()},
        "arguments": arguments,
        "policy_version": policy_version.to_hex(),
    });
    let mut bytes = Vec::with_capacity(256);
    write_value(&object, &mut bytes);
    Digest::of(&bytes)
}

/// Where an approval stands, as recorded by events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApprovalStatus {
    /// Requested; no operator has decided.
    Pending,
    /// Granted by an operator for the request's digest.
    Granted {
        /// The operator.
        by: Origin,
        /// When.
        at: Timestamp,
    },
    /// An operator's grant named another digest: it authorises nothing.
    Mismatch {
        /// The operator.
        by: Origin,
        /// The digest the operator confirmed.
        digest: Digest,
        /// When.
        at: Timestamp,
    },
    /// Denied by an operator.
    Denied {
        /// The operator.
        by: Origin,
        /// Why.
        reason: String,
        /// When.
        at: Timestamp,
    },
    /// Granted, then used by a `CapabilityGranted`.
    Used {
        /// The operator who granted it.
        by: Origin,
        /// The grant that used it.
        grant: EventId,
    },
}

impl ApprovalStatus {
    fn name(&self) -> &'static str {
        match self {
            ApprovalStatus::Pending => "pending",
            ApprovalStatus::Granted { .. } => "granted",
            ApprovalStatus::Mismatch { .. } => "granted for another digest",
            ApprovalStatus::Denied { .. } => "denied",
            ApprovalStatus::Used { .. } => "used",
        }
    }
}

impl Approval {
    /// Why it can no longer be granted nor authorise anything, if it is over: denied, used, or
    /// answered with another request's digest (each a final answer).
    fn ended(&self) -> Option<ApprovalRefusal> {
        match &self.status {
            ApprovalStatus::Denied { reason, .. } => Some(ApprovalRefusal::Denied {
                approval: self.id.clone(),
                reason: reason.clone(),
            }),
            ApprovalStatus::Used { grant, .. } => Some(ApprovalRefusal::Used {
                approval: self.id.clone(),
                grant: grant.clone(),
            }),
            ApprovalStatus::Mismatch { digest, .. } => Some(ApprovalRefusal::Mismatch {
                approval: self.id.clone(),
                expected: self.digest,
                got: *digest,
            }),
            ApprovalStatus::Pending | ApprovalStatus::Granted { .. } => None,
        }
    }
}

/// One approval, as the fold of its events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approval {
    /// Its id: the id of its `ApprovalRequested` event.
    pub id: EventId,
    /// The run.
    pub run: RunId,
    /// The digest of the exact request.
    pub digest: Digest,
    /// The capability.
    pub capability: String,
    /// The target.
    pub resource: Resource,
    /// The call's arguments (or the kernel's blob reference to them, if they were large).
    pub arguments: Map<String, Value>,
    /// The agent asking.
    pub agent: String,
    /// The policy set version that asked for approval.
    pub policy_version: PolicyVersion,
    /// The policies that determined the permit-with-approval.
    pub policies: Vec<String>,
    /// When it was requested.
    pub requested_at: Timestamp,
    /// When it expires.
    pub expires_at: Timestamp,
    /// The `CapabilityRequested` that needs it.
    pub request: EventId,
    /// Where it stands.
    pub status: ApprovalStatus,
}

/// Why an approval cannot be granted or cannot authorise a call. Each variant has a stable
/// reason code ([`Self::code`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApprovalRefusal {
    /// The approval id belongs to another run (`approval_mismatch`).
    #[error("approval {approval} belongs to run {}, not to run {run}", approval.run_id)]
    WrongRun {
        /// The approval named.
        approval: EventId,
        /// The book's run.
        run: RunId,
    },
    /// The run has no such approval request (`approval_mismatch`).
    #[error("approval {approval} was never requested in this run")]
    Unknown {
        /// The approval named.
        approval: EventId,
    },
    /// No operator has decided yet (`approval_timeout` once the runtime stops waiting).
    #[error("approval {approval} is still pending")]
    Pending {
        /// The approval.
        approval: EventId,
    },
    /// An operator denied it (`approval_denied`).
    #[error("approval {approval} was denied: {reason}")]
    Denied {
        /// The approval.
        approval: EventId,
        /// Why.
        reason: String,
    },
    /// The digests differ: the call (or the operator's grant) is not the request
    /// (`approval_mismatch`).
    #[error("approval {approval} is for request {expected}, not {got}")]
    Mismatch {
        /// The approval.
        approval: EventId,
        /// The request's digest.
        expected: Digest,
        /// The digest offered.
        got: Digest,
    },
    /// It was already used (`approval_used`).
    #[error("approval {approval} was already used by grant {grant}")]
    Used {
        /// The approval.
        approval: EventId,
        /// The grant that used it.
        grant: EventId,
    },
    /// It is already granted; only [`ApprovalBook::check_grant`] refuses this
    /// (`approval_used`).
    #[error("approval {approval} is already granted")]
    AlreadyGranted {
        /// The approval.
        approval: EventId,
    },
    /// It expired (`approval_expired`).
    #[error("approval {approval} expired at {expires_at} (now {now})")]
    Expired {
        /// The approval.
        approval: EventId,
        /// Its expiry.
        expires_at: Timestamp,
        /// The time of the attempted use.
        now: Timestamp,
    },
}

impl ApprovalRefusal {
    /// The stable reason code, as `CapabilityDenied` records it.
    pub fn code(&self) -> DenialCode {
        match self {
            ApprovalRefusal::WrongRun { .. }
            | ApprovalRefusal::Unknown { .. }
            | ApprovalRefusal::Mismatch { .. } => DenialCode::ApprovalMismatch,
            ApprovalRefusal::Pending { .. } => DenialCode::ApprovalTimeout,
            ApprovalRefusal::Denied { .. } => DenialCode::ApprovalDenied,
            ApprovalRefusal::Used { .. } | ApprovalRefusal::AlreadyGranted { .. } => {
                DenialCode::ApprovalUsed
            }
            ApprovalRefusal::Expired { .. } => DenialCode::ApprovalExpired,
        }
    }
}

/// The approvals of one run: a pure fold of its `ApprovalRequested`, `ApprovalGranted`,
/// `ApprovalDenied` events and of the `CapabilityGranted` events that use them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalBook {
    run: RunId,
    approvals: BTreeMap<EventId, Approval>,
}

impl ApprovalBook {
    /// An empty book for `run`.
    pub fn new(run: RunId) -> ApprovalBook {
        ApprovalBook {
            run,
            approvals: BTreeMap::new(),
        }
    }

    /// The run.
    pub fn run(&self) -> &RunId {
        &self.run
    }

    /// The approval with this id.
    pub fn get(&self, approval: &EventId) -> Option<&Approval> {
        self.approvals.get(approval)
    }

    /// Every approval, in the order they were requested.
    pub fn iter(&self) -> impl Iterator<Item = &Approval> {
        self.approvals.values()
    }

    /// Requests awaiting an operator at `now`: neither granted, denied nor expired.
    pub fn pending(&self, now: Timestamp) -> impl Iterator<Item = &Approval> {
        self.approvals
            .values()
            .filter(move |a| a.status == ApprovalStatus::Pending && now < a.expires_at)
    }

    fn find(&self, approval: &EventId) -> Result<&Approval, ApprovalRefusal> {
        if approval.run_id != self.run {
            return Err(ApprovalRefusal::WrongRun {
                approval: approval.clone(),
                run: self.run.clone(),
            });
        }
        self.approvals
            .get(approval)
            .ok_or_else(|| ApprovalRefusal::Unknown {
                approval: approval.clone(),
            })
    }

    /// Whether an operator may grant `approval` by confirming `digest`; the CLI calls this before
    /// it records an `ApprovalGranted`. Refuses another run's or an unknown approval, one already
    /// answered (granted, denied, granted for another request) or used, and a digest other than
    /// the request's. Expiry is not checked here: [`Self::authorize`] refuses an expired approval
    /// at use.
    pub fn check_grant(&self, approval: &EventId, digest: &Digest) -> Result<(), ApprovalRefusal> {
        let found = self.find(approval)?;
        let id = approval.clone();
        if let Some(refusal) = found.ended() {
            return Err(refusal);
        }
        match &found.status {
            ApprovalStatus::Granted { .. } => Err(ApprovalRefusal::AlreadyGranted { approval: id }),
            _ => {
                if *digest != found.digest {
                    return Err(ApprovalRefusal::Mismatch {
                        approval: id,
                        expected: found.digest,
                        got: *digest,
                    });
                }
                Ok(())
            }
        }
    }

    /// Whether `approval` authorises the call whose [`request_digest`] is `digest`, at `now`.
    /// Checked in this order: another run's or unknown approval, denied, already used, still
    /// pending, granted for another digest, expired (`now >= expires_at`), and finally the
    /// call's digest against the request's (other arguments, run, capability, resource or policy
    /// version all give another digest).
    pub fn authorize(
        &self,
        approval: &EventId,
        digest: &Digest,
        now: Timestamp,
    ) -> Result<(), ApprovalRefusal> {
        let found = self.find(approval)?;
        let id = approval.clone();
        if let Some(refusal) = found.ended() {
            return Err(refusal);
        }
        match &found.status {
            ApprovalStatus::Pending => Err(ApprovalRefusal::Pending { approval: id }),
            _ => {
                if now >= found.expires_at {
                    return Err(ApprovalRefusal::Expired {
                        approval: id,
                        expires_at: found.expires_at,
                        now,
                    });
                }
                if *digest != found.digest {
                    return Err(ApprovalRefusal::Mismatch {
                        approval: id,
                        expected: found.digest,
                        got: *digest,
                    });
                }
                Ok(())
            }
        }
    }

    /// Fold one event (see the module's lifecycle). Events of other runs and other types are
    /// ignored. On error the book is unchanged. Refused:
    /// - a payload that breaks the contract;
    /// - an `ApprovalRequested` whose digest is not [`request_digest`] of its own fields (checked
    ///   when its arguments are inline, not moved to a blob);
    /// - an `ApprovalGranted` or `ApprovalDenied` naming an approval this run never requested,
    ///   or one that is no longer pending (already answered or used: one answer per request;
    ///   the runtime checks first);
    /// - a `CapabilityGranted` citing an approval this run never requested, one not granted (or
    ///   already used), or one for another capability or resource.
    pub fn apply(&mut self, event: &Event) -> Result<(), BookError> {
        if event.run_id != self.run {
            return Ok(());
        }
        let fail = |problem: BookProblem| BookError::new(event, problem);
        match EventType::from_name(&event.event_type) {
            Some(EventType::ApprovalRequested) => {
                let p = ApprovalRequestedPayload::from_event(event).map_err(|e| fail(e.into()))?;
                if !is_blob_ref(&p.arguments) {
                    let computed = request_digest(
                        &event.run_id,
                        &p.capability,
                        &p.resource,
                        &Value::Object(p.arguments.clone()),
                        &p.policy_version,
                    );
                    if computed != p.digest {
                        return Err(fail(BookProblem::RequestDigest {
                            recorded: p.digest,
                            computed,
                        }));
                    }
                }
                let approval = Approval {
                    id: event.id(),
                    run: event.run_id.clone(),
                    digest: p.digest,
                    capability: p.capability,
                    resource: p.resource,
                    arguments: p.arguments,
                    agent: p.agent,
                    policy_version: p.policy_version,
                    policies: p.policies,
                    requested_at: event.at,
                    expires_at: p.expires_at,
                    request: p.request,
                    status: ApprovalStatus::Pending,
                };
                self.approvals.insert(approval.id.clone(), approval);
                Ok(())
            }
            Some(EventType::ApprovalGranted) => {
                let p = ApprovalGrantedPayload::from_event(event).map_err(|e| fail(e.into()))?;
                let approval = self.pending_mut(event, &p.approval)?;
                approval.status = if p.digest == approval.digest {
                    ApprovalStatus::Granted {
                        by: event.origin.clone(),
                        at: event.at,
                    }
                } else {
                    ApprovalStatus::Mismatch {
                        by: event.origin.clone(),
                        digest: p.digest,
                        at: event.at,
                    }
                };
                Ok(())
            }
            Some(EventType::ApprovalDenied) => {
                let p = ApprovalDeniedPayload::from_event(event).map_err(|e| fail(e.into()))?;
                let approval = self.pending_mut(event, &p.approval)?;
                approval.status = ApprovalStatus::Denied {
                    by: event.origin.clone(),
                    reason: p.reason,
                    at: event.at,
                };
                Ok(())
            }
            Some(EventType::CapabilityGranted) => {
                let p = CapabilityGrantedPayload::from_event(event).map_err(|e| fail(e.into()))?;
                let Some(id) = p.approval else {
                    return Ok(());
                };
                let approval = self.known_mut(event, &id)?;
                let by = match &approval.status {
                    ApprovalStatus::Granted { by, .. } => by.clone(),
                    other => {
                        return Err(fail(BookProblem::ApprovalNotGranted {
                            approval: id,
                            status: other.name().to_string(),
                        }));
                    }
                };
                if approval.capability != p.capability || approval.resource != p.resource {
                    return Err(fail(BookProblem::ApprovalOtherCall {
                        approval: id,
                        granted: format!("{} on {}", p.capability, p.resource),
                        approved: format!("{} on {}", approval.capability, approval.resource),
                    }));
                }
                approval.status = ApprovalStatus::Used {
                    by,
                    grant: event.id(),
                };
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The approval `event` answers, which must still be pending: a request has one answer.
    fn pending_mut(&mut self, event: &Event, id: &EventId) -> Result<&mut Approval, BookError> {
        let approval = self.known_mut(event, id)?;
        if approval.status != ApprovalStatus::Pending {
            let status = approval.status.name().to_string();
            return Err(BookError::new(
                event,
                BookProblem::ApprovalAnswered {
                    approval: id.clone(),
                    status,
                },
            ));
        }
        Ok(approval)
    }

    fn known_mut(&mut self, event: &Event, id: &EventId) -> Result<&mut Approval, BookError> {
        self.approvals
            .get_mut(id)
            .ok_or_else(|| BookError::new(event, BookProblem::UnknownApproval(id.clone())))
    }
}
