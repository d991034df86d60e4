//! The payloads of the events the authority layer reads and the runtime writes: one typed struct
//! per event type, with [`to_payload`](CapabilityGrantedPayload::to_payload) to build an event's
//! payload and [`from_event`](CapabilityGrantedPayload::from_event) /
//! [`from_payload`](CapabilityGrantedPayload::from_payload) to read one back, checked.
//!
//! Ids: a grant's id is the event id (`run:seq`) of its `CapabilityGranted`; an approval's id is
//! the event id of its `ApprovalRequested`. A resource is `{"kind": "path"|"dir"|"host"|"tool"|
//! "command", "id": "<Resource::entity_id>"}` (see [`Resource`]'s serde form); a policy version
//! is its bare 64-character hex digest; times are [`Timestamp`]s; costs are [`Cost`] objects
//! with zeros omitted.
//!
//! | event | origin | `authority` | payload struct |
//! |---|---|---|---|
//! | `CapabilityGranted` | runtime | the approval id, else `policy:<policy version hex>` | [`CapabilityGrantedPayload`] |
//! | `CapabilityUsed` | runtime | the grant id | [`CapabilityUsedPayload`] |
//! | `CapabilityRevoked` | runtime | | [`CapabilityRevokedPayload`] |
//! | `CapabilityExpired` | runtime | | [`CapabilityExpiredPayload`] |
//! | `CapabilityDenied` | runtime | | [`CapabilityDeniedPayload`] |
//! | `BudgetReserved` | runtime | | [`BudgetReservedPayload`] |
//! | `BudgetSettled` | runtime | | [`BudgetSettledPayload`] |
//! | `ApprovalRequested` | runtime | | [`ApprovalRequestedPayload`] |
//! | `ApprovalGranted` | operator | | [`ApprovalGrantedPayload`] |
//! | `ApprovalDenied` | operator | | [`ApprovalDeniedPayload`] |
//!
//! Unknown payload fields are refused: a field this version does not understand might be a
//! constraint it would silently ignore.
//!
//! ```
//! use ice_authority::payload::CapabilityExpiredPayload;
//! use ice_kernel::{Draft, EventId, Origin};
//!
//! let grant: EventId = "run-1:7".parse()?;
//! let payload = CapabilityExpiredPayload { grant };
//! let draft = Draft::new(CapabilityExpiredPayload::EVENT_TYPE.name(), Origin::Runtime)
//!     .payload(payload.to_payload().into());
//! assert_eq!(CapabilityExpiredPayload::from_payload(&draft.payload)?, payload);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::str::FromStr;

use ice_kernel::{Cost, Digest, Event, EventId, EventType, Origin, Payload, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::budget::{BudgetRefusal, check_reservation_id};
use crate::capability::{EffectClass, check_capability_name, truncated};
use crate::constraint::Constraints;
use crate::grant::{GrantRefusal, Scope};
use crate::policy::PolicyVersion;
use crate::request::Resource;

/// The stable reason codes of `CapabilityDenied` (its `reason` field). Their spelling is part of
/// the event format: tools match on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DenialCode {
    /// The policy denied the request.
    PolicyDenied,
    /// The target could not be parsed as a resource of the capability's kind, or the
    /// arguments are not what the capability takes (one missing, of the wrong type, unknown).
    InvalidTarget,
    /// The registry does not know the capability.
    UnknownCapability,
    /// The grant named does not exist in this run.
    GrantUnknown,
    /// The grant belongs to another run.
    GrantWrongRun,
    /// The grant was revoked.
    GrantRevoked,
    /// The grant has expired.
    GrantExpired,
    /// The grant has no uses left.
    GrantUsedUp,
    /// The target is outside the grant's scope.
    GrantOutOfScope,
    /// The grant is for another capability.
    GrantWrongCapability,
    /// The use would go past a limit the grant puts on each use (its constraints).
    GrantConstraint,
    /// The run is not EXECUTING.
    RunNotExecuting,
    /// No operator decided the approval in time (the runtime stopped waiting).
    ApprovalTimeout,
    /// An operator denied the approval, or (with [`CapabilityDeniedPayload::closed`]) the
    /// runtime closed it unanswered: that field says why.
    ApprovalDenied,
    /// The approval was for another call (or is not an approval of this run).
    ApprovalMismatch,
    /// The approval was already used.
    ApprovalUsed,
    /// The approval has expired.
    ApprovalExpired,
    /// The budget cannot hold the reservation.
    BudgetExhausted,
    /// The effects layer refused the target (it would leave the workspace or allowed hosts).
    Confinement,
    /// The effect was attempted and failed.
    EffectFailed,
    /// The effect was attempted, and the process driving the run stopped before its result
    /// was recorded: whether it took place is unknown (an HTTP call, command or tool call
    /// answered at the run's recovery).
    OutcomeUnknown,
}

impl DenialCode {
    /// Every code.
    pub const ALL: [DenialCode; 21] = [
        DenialCode::PolicyDenied,
        DenialCode::InvalidTarget,
        DenialCode::UnknownCapability,
        DenialCode::GrantUnknown,
        DenialCode::GrantWrongRun,
        DenialCode::GrantRevoked,
        DenialCode::GrantExpired,
        DenialCode::GrantUsedUp,
        DenialCode::GrantOutOfScope,
        DenialCode::GrantWrongCapability,
        DenialCode::GrantConstraint,
        DenialCode::RunNotExecuting,
        DenialCode::ApprovalTimeout,
        DenialCode::ApprovalDenied,
        DenialCode::ApprovalMismatch,
        DenialCode::ApprovalUsed,
        DenialCode::ApprovalExpired,
        DenialCode::BudgetExhausted,
        DenialCode::Confinement,
        DenialCode::EffectFailed,
        DenialCode::OutcomeUnknown,
    ];

    /// The code as events spell it (`grant_out_of_scope`).
    pub fn as_str(self) -> &'static str {
        match self {
            DenialCode::PolicyDenied => "policy_denied",
            DenialCode::InvalidTarget => "invalid_target",
            DenialCode::UnknownCapability => "unknown_capability",
            DenialCode::GrantUnknown => "grant_unknown",
            DenialCode::GrantWrongRun => "grant_wrong_run",
            DenialCode::GrantRevoked => "grant_revoked",
            DenialCode::GrantExpired => "grant_expired",
            DenialCode::GrantUsedUp => "grant_used_up",
            DenialCode::GrantOutOfScope => "grant_out_of_scope",
            DenialCode::GrantWrongCapability => "grant_wrong_capability",
            DenialCode::GrantConstraint => "grant_constraint",
            DenialCode::RunNotExecuting => "run_not_executing",
            DenialCode::ApprovalTimeout => "approval_timeout",
            DenialCode::ApprovalDenied => "approval_denied",
            DenialCode::ApprovalMismatch => "approval_mismatch",
            DenialCode::ApprovalUsed => "approval_used",
            DenialCode::ApprovalExpired => "approval_expired",
            DenialCode::BudgetExhausted => "budget_exhausted",
            DenialCode::Confinement => "confinement",
            DenialCode::EffectFailed => "effect_failed",
            DenialCode::OutcomeUnknown => "outcome_unknown",
        }
    }
}

impl fmt::Display for DenialCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DenialCode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DenialCode::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| format!("{:?} is not a denial reason code", truncated(s)))
    }
}

impl Serialize for DenialCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for DenialCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Why an event's payload could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// The event is of another type than the payload struct reads.
    #[error("expected a {expected} event, got {got:?}")]
    WrongType {
        /// The type the struct reads.
        expected: EventType,
        /// The event's type.
        got: String,
    },
    /// The payload does not have the contract's shape, or a value in it is invalid.
    #[error("{event_type} payload: {problem}")]
    Invalid {
        /// The event type whose payload was read.
        event_type: EventType,
        /// What is wrong, naming the field.
        problem: String,
    },
}

/// Why an event could not be folded into a grant book, budget ledger or approval book. The
/// fold is unchanged when it fails.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event {event} ({event_type}): {problem}")]
pub struct BookError {
    /// The event that was refused.
    pub event: EventId,
    /// Its type.
    pub event_type: String,
    /// What is wrong with it (boxed: folds return it through every `?`, and it is rare).
    pub problem: Box<BookProblem>,
}

impl BookError {
    pub(crate) fn new(event: &Event, problem: impl Into<BookProblem>) -> BookError {
        BookError {
            event: event.id(),
            event_type: event.event_type.clone(),
            problem: Box::new(problem.into()),
        }
    }
}

/// What is wrong with an event a fold refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BookProblem {
    /// The payload does not parse or breaks the contract.
    #[error(transparent)]
    Payload(#[from] PayloadError),
    /// The event's `authority` is not what its payload says it must be.
    #[error("authority is {got:?}, but this payload requires {expected:?}")]
    Authority {
        /// What the authority must be.
        expected: String,
        /// What the event has.
        got: Option<String>,
    },
    /// The event names a grant this run never made.
    #[error("names grant {0}, which this run never granted")]
    UnknownGrant(EventId),
    /// A grant's status changes twice (revoked or expired when it is no longer live).
    #[error("grant {grant} is already {status}")]
    GrantNotLive {
        /// The grant.
        grant: EventId,
        /// Its status (`revoked`, `expired`).
        status: &'static str,
    },
    /// A recorded use the grant book would have refused.
    #[error("a use the grant book refuses: {0}")]
    UseRefused(GrantRefusal),
    /// A budget event the ledger refuses (a reservation that does not fit, an unknown or
    /// repeated reservation id).
    #[error("{0}")]
    Budget(BudgetRefusal),
    /// The event names an approval this run never requested.
    #[error("names approval {0}, which this run never requested")]
    UnknownApproval(EventId),
    /// An answer to an approval that is no longer pending: a request has one answer.
    #[error("answers approval {approval}, which is already {status}: a request has one answer")]
    ApprovalAnswered {
        /// The approval.
        approval: EventId,
        /// Its status.
        status: String,
    },
    /// A grant cites an approval that is not granted (or is already used).
    #[error("cites approval {approval}, which is {status}")]
    ApprovalNotGranted {
        /// The approval.
        approval: EventId,
        /// Its status.
        status: String,
    },
    /// A grant cites an approval of another capability or resource.
    #[error("grants {granted}, but approval {approval} is for {approved}")]
    ApprovalOtherCall {
        /// The approval.
        approval: EventId,
        /// What the grant is for (`capability on resource`).
        granted: String,
        /// What the approval is for.
        approved: String,
    },
    /// An `ApprovalRequested` whose digest is not the digest of its own request.
    #[error("digest {recorded} is not the request's digest {computed}")]
    RequestDigest {
        /// The digest recorded.
        recorded: Digest,
        /// [`crate::approval::request_digest`] of the payload's fields.
        computed: Digest,
    },
}

fn to_payload<T: Serialize>(value: &T) -> Payload {
    // These structs hold only strings, integers, digests and JSON objects, which always
    // serialise to a JSON object; the tests round-trip every one.
    match serde_json::to_value(value) {
        Ok(Value::Object(map)) => map,
        _ => Payload::new(),
    }
}

fn invalid(event_type: EventType, problem: impl Into<String>) -> PayloadError {
    PayloadError::Invalid {
        event_type,
        problem: problem.into(),
    }
}

pub(crate) fn check_agent(agent: &str) -> Result<(), String> {
    Origin::from_str(&format!("agent:{agent}"))
        .map(|_| ())
        .map_err(|e| format!("agent: {e}"))
}

fn check_capability(capability: &str) -> Result<(), String> {
    check_capability_name(capability).map_err(|e| format!("capability: {e}"))
}

fn check_text(field: &str, text: &str) -> Result<(), String> {
    if text.trim().is_empty() {
        return Err(format!("{field} must not be empty"));
    }
    Ok(())
}

/// Is this payload value a blob reference the kernel put in place of a large field?
pub(crate) fn is_blob_ref(value: &Map<String, Value>) -> bool {
    value.contains_key(ice_kernel::blob::BLOB_KEY)
}

macro_rules! event_payload {
    ($ty:ident, $event:ident) => {
        impl $ty {
            /// The event type this payload belongs to.
            pub const EVENT_TYPE: EventType = EventType::$event;

            /// This payload as an event's payload object.
            pub fn to_payload(&self) -> Payload {
                to_payload(self)
            }

            /// Read and check a payload of this event type.
            pub fn from_payload(payload: &Payload) -> Result<Self, PayloadError> {
                // Read from the payload in place: a fold reads every such event, and copying
                // the payload first would cost a deep clone each time.
                let parsed = Self::deserialize(payload)
                    .map_err(|e| invalid(Self::EVENT_TYPE, e.to_string()))?;
                parsed
                    .check()
                    .map_err(|problem| invalid(Self::EVENT_TYPE, problem))?;
                Ok(parsed)
            }

            /// Read and check the payload of `event`, which must be of this type.
            pub fn from_event(event: &Event) -> Result<Self, PayloadError> {
                if event.event_type != Self::EVENT_TYPE.name() {
                    return Err(PayloadError::WrongType {
                        expected: Self::EVENT_TYPE,
                        got: truncated(&event.event_type),
                    });
                }
                Self::from_payload(&event.payload)
            }
        }
    };
}

/// `CapabilityGranted` (origin `runtime`). Its event id is the grant's id; its `authority` is the
/// approval's id when an approval authorised it, `policy:<policy version hex>` otherwise
/// ([`Self::authority`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapabilityGrantedPayload {
    /// The capability granted (`fs.write`).
    pub capability: String,
    /// The target the agent asked for.
    pub resource: Resource,
    /// What the grant covers; must cover `resource` and name `capability`.
    pub scope: Scope,
    /// The agent the grant is for.
    pub agent: String,
    /// The effect class the runtime assigned.
    pub effect: EffectClass,
    /// When the grant expires (a use at or after this instant is refused).
    pub expires_at: Timestamp,
    /// How many uses it allows (at least 1).
    pub max_uses: u64,
    /// Limits on each use, which the effects layer enforces (`{}`: none).
    pub constraints: Constraints,
    /// The policy set version that permitted it.
    pub policy_version: PolicyVersion,
    /// The policies that determined the permit.
    pub policies: Vec<String>,
    /// The approval that authorised it, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<EventId>,
    /// The `CapabilityRequested` it answers.
    pub request: EventId,
}

impl CapabilityGrantedPayload {
    /// The `authority` the event must carry: the approval's id, or `policy:<policy version hex>`.
    pub fn authority(&self) -> String {
        match &self.approval {
            Some(approval) => approval.to_string(),
            None => format!("policy:{}", self.policy_version.to_hex()),
        }
    }

    fn check(&self) -> Result<(), String> {
        check_capability(&self.capability)?;
        check_agent(&self.agent)?;
        if self.scope.capability() != self.capability {
            return Err(format!(
                "scope {} is not a scope of {}",
                self.scope, self.capability
            ));
        }
        let target = Scope::for_target(&self.capability, &self.resource)
            .map_err(|e| format!("resource: {e}"))?;
        if !self.scope.covers(&target) {
            return Err(format!(
                "scope {} does not cover the resource {} ({target})",
                self.scope, self.resource
            ));
        }
        if self.max_uses == 0 {
            return Err("max_uses must be at least 1".to_string());
        }
        self.constraints.check()?;
        Ok(())
    }
}
event_payload!(CapabilityGrantedPayload, CapabilityGranted);

/// `CapabilityUsed` (origin `runtime`, `authority` = the grant id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapabilityUsedPayload {
    /// The grant used.
    pub grant: EventId,
    /// The capability used.
    pub capability: String,
    /// The target it was used on.
    pub resource: Resource,
}

impl CapabilityUsedPayload {
    fn check(&self) -> Result<(), String> {
        check_capability(&self.capability)
    }
}
event_payload!(CapabilityUsedPayload, CapabilityUsed);

/// `CapabilityRevoked` (origin `runtime`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapabilityRevokedPayload {
    /// The grant revoked.
    pub grant: EventId,
    /// Why.
    pub reason: String,
    /// The policy version whose re-evaluation revoked it, when a policy change did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_version: Option<PolicyVersion>,
}

impl CapabilityRevokedPayload {
    fn check(&self) -> Result<(), String> {
        check_text("reason", &self.reason)
    }
}
event_payload!(CapabilityRevokedPayload, CapabilityRevoked);

/// `CapabilityExpired` (origin `runtime`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapabilityExpiredPayload {
    /// The grant that expired.
    pub grant: EventId,
}

impl CapabilityExpiredPayload {
    fn check(&self) -> Result<(), String> {
        Ok(())
    }
}
event_payload!(CapabilityExpiredPayload, CapabilityExpired);

/// `CapabilityDenied` (origin `runtime`): every refused attempt leaves one.
///
/// `capability` is kept as the agent wrote it (it may be no valid name: `unknown_capability`),
/// and `resource` is absent when the target itself was invalid (`invalid_target`); `target` is
/// always what the agent asked for, as text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapabilityDeniedPayload {
    /// The capability asked for, as given.
    pub capability: String,
    /// The target as a resource, when it was a valid one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<Resource>,
    /// What the agent asked for, as text.
    pub target: String,
    /// The stable reason code.
    pub reason: DenialCode,
    /// Human-readable detail.
    pub detail: String,
    /// The policies that determined a policy denial (may be empty; absent reads as empty).
    #[serde(default)]
    pub policies: Vec<String>,
    /// For a connection the policy refused (`http.connect`): the address, as decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// For an HTTP call that failed or was refused after resolving its host: the addresses
    /// let through before it failed, as decided.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// The grant whose use was refused, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<EventId>,
    /// The approval whose use was refused, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<EventId>,
    /// The `CapabilityRequested` refused, if the denial answers one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<EventId>,
    /// A file read that found no file in the workspace: `"absent"`, what the run saw there (a
    /// stage rebuilt from the record after a restart then refuses a commit over a file
    /// someone adds there meanwhile, as the live stage does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen: Option<String>,
    /// With `approval_denied`: the runtime closed the approval unanswered, and why (absent:
    /// an operator denied it, or the event was recorded before this field existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed: Option<ApprovalClosed>,
}

/// Why the runtime closed an approval nobody answered, in a `CapabilityDenied` with reason
/// `approval_denied` (the event format: tools match on these).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalClosed {
    /// The agent withdrew its request (its MCP client cancelled the call or ended the
    /// session): the agent's own act, so it counts as one of its refused requests.
    Withdrawn,
    /// The run was killed while the request waited.
    Killed,
    /// The run was interrupted (it is suspended before its next step).
    Interrupted,
}

impl ApprovalClosed {
    /// The name recorded.
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalClosed::Withdrawn => "withdrawn",
            ApprovalClosed::Killed => "killed",
            ApprovalClosed::Interrupted => "interrupted",
        }
    }
}

impl CapabilityDeniedPayload {
    fn check(&self) -> Result<(), String> {
        if let Some(c) = self.closed {
            if self.reason != DenialCode::ApprovalDenied {
                return Err(format!(
                    "closed ({}) comes with reason {}, not {}",
                    c.as_str(),
                    DenialCode::ApprovalDenied.as_str(),
                    self.reason.as_str()
                ));
            }
            if self.approval.is_none() {
                return Err(format!(
                    "closed ({}) needs the approval it closed",
                    c.as_str()
                ));
            }
        }
        if let Some(s) = &self.seen
            && s != "absent"
        {
            return Err(format!("seen is {s:?}; the only value is \"absent\""));
        }
        let decided = |a: &str| match a.parse::<std::net::IpAddr>() {
            Ok(ip) if crate::request::connection_address(ip) == ip => Ok(()),
            Ok(ip) => Err(format!(
                "address {a:?} is not as decided (it is {})",
                crate::request::connection_address(ip)
            )),
            Err(_) => Err(format!("address {a:?} is not an IP address")),
        };
        if let Some(a) = &self.address {
            if self.reason != DenialCode::PolicyDenied {
                return Err(format!(
                    "a refused address comes with reason {}, not {}",
                    DenialCode::PolicyDenied.as_str(),
                    self.reason.as_str()
                ));
            }
            decided(a)?;
        }
        self.addresses.iter().try_for_each(|a| decided(a))
    }
}
event_payload!(CapabilityDeniedPayload, CapabilityDenied);

/// `BudgetReserved` (origin `runtime`): recorded only for a reservation that fit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetReservedPayload {
    /// The reservation's id, unique within the run.
    pub reservation: String,
    /// The amount reserved.
    pub amount: Cost,
}

impl BudgetReservedPayload {
    fn check(&self) -> Result<(), String> {
        check_reservation_id(&self.reservation).map_err(|e| e.to_string())
    }
}
event_payload!(BudgetReservedPayload, BudgetReserved);

/// `BudgetSettled` (origin `runtime`): what a reservation actually cost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetSettledPayload {
    /// The reservation settled.
    pub reservation: String,
    /// What was actually spent (may be more than was reserved).
    pub actual: Cost,
}

impl BudgetSettledPayload {
    fn check(&self) -> Result<(), String> {
        check_reservation_id(&self.reservation).map_err(|e| e.to_string())
    }
}
event_payload!(BudgetSettledPayload, BudgetSettled);

/// `ApprovalRequested` (origin `runtime`). Its event id is the approval's id.
///
/// `digest` must be [`crate::approval::request_digest`] of the run, `capability`, `resource`,
/// `arguments` and `policy_version`; the approval book checks it when it folds the event (unless
/// the kernel moved `arguments` to a blob, when it trusts the recorded digest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalRequestedPayload {
    /// The digest of the exact request, which the operator confirms.
    pub digest: Digest,
    /// The capability.
    pub capability: String,
    /// The target.
    pub resource: Resource,
    /// The call's arguments (a JSON object).
    pub arguments: Map<String, Value>,
    /// The agent asking.
    pub agent: String,
    /// The policy set version that asked for approval.
    pub policy_version: PolicyVersion,
    /// The policies that determined the permit-with-approval.
    pub policies: Vec<String>,
    /// When the request lapses if nobody decides it, and when a granted approval expires.
    pub expires_at: Timestamp,
    /// The `CapabilityRequested` that needs the approval.
    pub request: EventId,
}

impl ApprovalRequestedPayload {
    fn check(&self) -> Result<(), String> {
        check_capability(&self.capability)?;
        check_agent(&self.agent)
    }
}
event_payload!(ApprovalRequestedPayload, ApprovalRequested);

/// `ApprovalGranted` (origin `operator:*`): the operator approves exactly the request with this
/// digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalGrantedPayload {
    /// The approval (the `ApprovalRequested` event's id).
    pub approval: EventId,
    /// The digest the operator confirms.
    pub digest: Digest,
}

impl ApprovalGrantedPayload {
    fn check(&self) -> Result<(), String> {
        Ok(())
    }
}
event_payload!(ApprovalGrantedPayload, ApprovalGranted);

/// `ApprovalDenied` (origin `operator:*`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalDeniedPayload {
    /// The approval (the `ApprovalRequested` event's id).
    pub approval: EventId,
    /// Why (read back as a stand-in if it went to the blob store: see
    /// [`ice_kernel::blob::text_or_blob`]).
    #[serde(deserialize_with = "ice_kernel::blob::text_or_blob")]
    pub reason: String,
}

impl ApprovalDeniedPayload {
    fn check(&self) -> Result<(), String> {
        check_text("reason", &self.reason)
    }
}
event_payload!(ApprovalDeniedPayload, ApprovalDenied);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denial_codes_round_trip_and_are_distinct() {
        let mut seen = std::collections::HashSet::new();
        for code in DenialCode::ALL {
            assert!(seen.insert(code.as_str()));
            assert_eq!(code.as_str().parse::<DenialCode>(), Ok(code));
            let json = serde_json::to_value(code).unwrap_or_default();
            assert_eq!(json, Value::String(code.as_str().to_string()));
        }
        assert!("grant_gone".parse::<DenialCode>().is_err());
    }

    /// The finding (memory probe): a denial reason over the blob threshold was moved to the
    /// blob store, and its reference did not read back as the string the fold expects, so the
    /// run's books never folded again (nothing could kill or recover the run). Such a record
    /// reads back with a stand-in that names the blob.
    #[test]
    fn a_denial_reason_moved_to_the_blob_store_reads_back() {
        let digest = "ab".repeat(32);
        let p: ApprovalDeniedPayload = serde_json::from_value(serde_json::json!({
            "approval": "r:7",
            "reason": {"$blob": digest, "size": 17002},
        }))
        .unwrap();
        assert_eq!(
            p.reason,
            format!("[text of 17002 bytes, kept in blob {digest}]")
        );
        let plain: ApprovalDeniedPayload =
            serde_json::from_value(serde_json::json!({"approval": "r:7", "reason": "no"})).unwrap();
        assert_eq!(plain.reason, "no");
        for bad in [
            serde_json::json!({"$blob": "zz", "size": 1}),
            serde_json::json!({"size": 1}),
            serde_json::json!(5),
        ] {
            let r = serde_json::from_value::<ApprovalDeniedPayload>(
                serde_json::json!({"approval": "r:7", "reason": bad}),
            );
            assert!(r.is_err(), "{bad}: {r:?}");
        }
    }
}
