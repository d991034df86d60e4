//! Grants: what a run may do, as a pure fold over its capability events.
//!
//! A grant is made by a `CapabilityGranted` event (its id is that event's id), used by
//! `CapabilityUsed`, and ended by `CapabilityRevoked` or `CapabilityExpired`. [`GrantBook`] folds
//! one run's events into its grants; folding the same events always gives the same book.
//! [`GrantBook::check_use`] checks a use at the moment it happens (spec §5: same run, not
//! revoked, not expired, uses left, capability, scope covers the target, run EXECUTING) and,
//! with [`GrantBook::check_new_use`] (the same checks on a grant about to be recorded), is the
//! only way to obtain an [`Authorization`], which the effects layer requires before it acts.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use ice_kernel::{Event, EventId, EventType, RunId, RunState, Timestamp};

use crate::capability::{EffectClass, check_capability_name, truncated};
use crate::constraint::Constraints;
use crate::limits::MAX_SCOPE_LEN;
use crate::payload::{
    BookError, BookProblem, CapabilityExpiredPayload, CapabilityGrantedPayload,
    CapabilityRevokedPayload, CapabilityUsedPayload, DenialCode,
};
use crate::policy::PolicyVersion;
use crate::request::Resource;

/// What a grant covers: a capability and a path of target segments, written joined by `:`.
///
/// | target | scope |
/// |---|---|
/// | `fs.write` on `Path::"src/lib.rs"` | `fs.write:src:lib.rs` |
/// | `fs.list` on `Dir::"src"` | `fs.list:src` |
/// | `fs.list` on `Dir::"."` (the workspace root) | `fs.list` |
/// | `http.request` on `Host::"api.example.com"` | `http.request:api.example.com` (one segment: dots do not separate) |
/// | `mcp.call` on `Tool::"github/create_issue"` | `mcp.call:github:create_issue` |
/// | `process.exec` on `Command::"cargo"` | `process.exec:cargo` |
///
/// Scopes are hierarchical on whole segments: `fs.write:src` covers `fs.write:src` and
/// `fs.write:src:lib.rs` but not `fs.write:srcx`; a bare `fs.write` covers every `fs.write`
/// target; no scope covers another capability.
///
/// **Escaping.** A segment may itself contain `:` (an IPv6 host, a program path, a file name),
/// which must not forge a level of the hierarchy. In the text form, `%` is written `%25` and `:`
/// is written `%3A` inside a segment, so `:` in the text always separates segments. Parsing
/// accepts only these two escapes, in upper case, and refuses any other `%`, so each scope has
/// exactly one text form. A file named `src:x` is the single segment `src%3Ax`, which
/// `fs.write:src` does not cover.
///
/// ```
/// use ice_authority::{Resource, Scope};
/// let dir = Scope::parse("fs.write:src")?;
/// let file = Scope::for_target("fs.write", &Resource::path("src/lib.rs")?)?;
/// assert_eq!(file.to_string(), "fs.write:src:lib.rs");
/// assert!(dir.covers(&file));
/// assert!(!dir.covers(&Scope::parse("fs.write:srcx")?));
/// let forged = Scope::for_target("fs.write", &Resource::path("src:lib.rs")?)?;
/// assert_eq!(forged.to_string(), "fs.write:src%3Alib.rs");
/// assert!(!dir.covers(&forged));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope {
    capability: String,
    segments: Vec<String>,
}

/// Why a scope was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("scope {scope:?}: {problem}")]
pub struct ScopeError {
    /// The scope given (cut to 80 bytes).
    pub scope: String,
    /// What is wrong with it.
    pub problem: String,
}

fn escape_segment(segment: &str, out: &mut String) {
    for c in segment.chars() {
        match c {
            '%' => out.push_str("%25"),
            ':' => out.push_str("%3A"),
            c => out.push(c),
        }
    }
}

fn unescape_segment(segment: &str) -> Result<String, String> {
    let mut out = String::with_capacity(segment.len());
    let mut rest = segment;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let escape = rest.get(i..i + 3);
        match escape {
            Some("%25") => out.push('%'),
            Some("%3A") => out.push(':'),
            _ => {
                return Err(
                    "a % in a segment must start %25 (for %) or %3A (for :), in upper case"
                        .to_string(),
                );
            }
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

impl Scope {
    /// The scope of exactly one target: the capability followed by the resource's segments
    /// (path segments; the host; the tool server and tool; the program).
    pub fn for_target(capability: &str, resource: &Resource) -> Result<Scope, ScopeError> {
        check_capability_name(capability).map_err(|e| ScopeError {
            scope: truncated(capability),
            problem: e.to_string(),
        })?;
        let segments = match resource {
            Resource::Dir(p) if p == "." => Vec::new(),
            Resource::Path(p) | Resource::Dir(p) => p.split('/').map(str::to_string).collect(),
            Resource::Host(h) => vec![h.clone()],
            Resource::Tool { server, tool } => vec![server.clone(), tool.clone()],
            Resource::Command(c) => vec![c.clone()],
        };
        Ok(Scope {
            capability: capability.to_string(),
            segments,
        })
    }

    /// Parse a scope's text form (see the escaping rule above): a capability name, then zero or
    /// more non-empty `:`-separated segments without control characters, at most
    /// [`MAX_SCOPE_LEN`] bytes in all.
    pub fn parse(text: &str) -> Result<Scope, ScopeError> {
        let bad = |problem: String| ScopeError {
            scope: truncated(text),
            problem,
        };
        if text.len() > MAX_SCOPE_LEN {
            return Err(bad(format!(
                "{} bytes; at most {MAX_SCOPE_LEN}",
                text.len()
            )));
        }
        let mut parts = text.split(':');
        let capability = parts.next().unwrap_or_default();
        check_capability_name(capability).map_err(|e| bad(e.to_string()))?;
        let mut segments = Vec::new();
        for part in parts {
            if part.is_empty() {
                return Err(bad("has an empty segment".to_string()));
            }
            if let Some(c) = part.chars().find(|c| c.is_control()) {
                return Err(bad(format!("contains the control character {c:?}")));
            }
            segments.push(unescape_segment(part).map_err(bad)?);
        }
        Ok(Scope {
            capability: capability.to_string(),
            segments,
        })
    }

    /// The capability the scope is of.
    pub fn capability(&self) -> &str {
        &self.capability
    }

    /// The target segments, unescaped.
    pub fn segments(&self) -> &[String] {
        &self.segments
    }

    /// Whether this scope covers `other`: the same capability, and this scope's segments are
    /// the first segments of `other`'s, compared whole.
    pub fn covers(&self, other: &Scope) -> bool {
        self.capability == other.capability && other.segments.starts_with(&self.segments)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = self.capability.clone();
        for segment in &self.segments {
            out.push(':');
            escape_segment(segment, &mut out);
        }
        f.write_str(&out)
    }
}

impl FromStr for Scope {
    type Err = ScopeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scope::parse(s)
    }
}

impl serde::Serialize for Scope {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Scope {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Scope::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Where a grant stands, as recorded by events. Time alone does not change it: a grant past its
/// `expires_at` stays `Live` until a `CapabilityExpired` is recorded, but is refused from that
/// instant on ([`Grant::is_live`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantStatus {
    /// Neither revoked nor recorded as expired.
    Live,
    /// Revoked by a `CapabilityRevoked`.
    Revoked {
        /// Why.
        reason: String,
        /// The policy version whose re-evaluation revoked it, if a policy change did.
        policy_version: Option<PolicyVersion>,
        /// When it was recorded.
        at: Timestamp,
    },
    /// Recorded as expired by a `CapabilityExpired`.
    Expired {
        /// When it was recorded.
        at: Timestamp,
    },
}

impl GrantStatus {
    fn name(&self) -> &'static str {
        match self {
            GrantStatus::Live => "live",
            GrantStatus::Revoked { .. } => "revoked",
            GrantStatus::Expired { .. } => "expired",
        }
    }
}

/// One grant, as the fold of its events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Its id: the id of its `CapabilityGranted` event.
    pub id: EventId,
    /// The run it is bound to.
    pub run: RunId,
    /// The agent it is for.
    pub agent: String,
    /// The capability.
    pub capability: String,
    /// The target the agent asked for.
    pub resource: Resource,
    /// What it covers.
    pub scope: Scope,
    /// The effect class the runtime assigned.
    pub effect: EffectClass,
    /// When it was granted (its event's `at`).
    pub issued_at: Timestamp,
    /// A use at or after this instant is refused.
    pub expires_at: Timestamp,
    /// How many uses it allows.
    pub max_uses: u64,
    /// How many uses are recorded.
    pub uses: u64,
    /// Limits on each use, which the effects layer enforces.
    pub constraints: Constraints,
    /// The approval that authorised it, if one did.
    pub approval: Option<EventId>,
    /// The `CapabilityRequested` it answers.
    pub request: EventId,
    /// The policy set version that permitted it.
    pub policy_version: PolicyVersion,
    /// The policies that determined the permit.
    pub policies: Vec<String>,
    /// Revoked, expired or live.
    pub status: GrantStatus,
}

impl Grant {
    /// The grant a `CapabilityGranted` event with this id, run, payload and time makes.
    fn issued(id: EventId, run: RunId, p: CapabilityGrantedPayload, at: Timestamp) -> Grant {
        Grant {
            id,
            run,
            agent: p.agent,
            capability: p.capability,
            resource: p.resource,
            scope: p.scope,
            effect: p.effect,
            issued_at: at,
            expires_at: p.expires_at,
            max_uses: p.max_uses,
            uses: 0,
            constraints: p.constraints,
            approval: p.approval,
            request: p.request,
            policy_version: p.policy_version,
            policies: p.policies,
            status: GrantStatus::Live,
        }
    }

    /// Uses left.
    pub fn uses_left(&self) -> u64 {
        self.max_uses.saturating_sub(self.uses)
    }

    /// Usable at `now`: live, `now` before `expires_at`, uses left.
    pub fn is_live(&self, now: Timestamp) -> bool {
        self.status == GrantStatus::Live && now < self.expires_at && self.uses_left() > 0
    }
}

/// Why a use of a grant was refused. Each variant is one stable reason code ([`Self::code`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantRefusal {
    /// `grant_unknown`: the run has no such grant.
    #[error("grant {grant} does not exist in this run")]
    Unknown {
        /// The grant named.
        grant: EventId,
    },
    /// `grant_wrong_run`: the grant belongs to another run.
    #[error("grant {grant} belongs to run {grant_run}, not to run {run}")]
    WrongRun {
        /// The grant named.
        grant: EventId,
        /// The run it belongs to.
        grant_run: RunId,
        /// The run that tried to use it.
        run: RunId,
    },
    /// `grant_revoked`.
    #[error("grant {grant} was revoked: {reason}")]
    Revoked {
        /// The grant.
        grant: EventId,
        /// Why it was revoked.
        reason: String,
    },
    /// `grant_expired`: recorded as expired, or `now` is at or after `expires_at`.
    #[error("grant {grant} expired at {expires_at} (now {now})")]
    Expired {
        /// The grant.
        grant: EventId,
        /// Its expiry.
        expires_at: Timestamp,
        /// The time of the attempted use.
        now: Timestamp,
    },
    /// `grant_used_up`.
    #[error("grant {grant} allowed {max_uses} use(s), all used")]
    UsedUp {
        /// The grant.
        grant: EventId,
        /// Its use limit.
        max_uses: u64,
    },
    /// `grant_wrong_capability`.
    #[error("grant {grant} is for {granted}, not for {asked}")]
    WrongCapability {
        /// The grant.
        grant: EventId,
        /// The capability it grants.
        granted: String,
        /// The capability the use needs.
        asked: String,
    },
    /// `grant_out_of_scope`: the target is outside the grant's scope (or of another kind than
    /// the grant's resource).
    #[error("grant {grant} covers {scope}, not {target}")]
    OutOfScope {
        /// The grant.
        grant: EventId,
        /// Its scope.
        scope: Scope,
        /// The target, as a resource.
        target: Resource,
    },
    /// `run_not_executing`.
    #[error("the run is {state}; grants are used only while it is EXECUTING")]
    RunNotExecuting {
        /// The run's state.
        state: RunState,
    },
}

impl GrantRefusal {
    /// The stable reason code of this refusal, as `CapabilityDenied` records it.
    pub fn code(&self) -> DenialCode {
        match self {
            GrantRefusal::Unknown { .. } => DenialCode::GrantUnknown,
            GrantRefusal::WrongRun { .. } => DenialCode::GrantWrongRun,
            GrantRefusal::Revoked { .. } => DenialCode::GrantRevoked,
            GrantRefusal::Expired { .. } => DenialCode::GrantExpired,
            GrantRefusal::UsedUp { .. } => DenialCode::GrantUsedUp,
            GrantRefusal::WrongCapability { .. } => DenialCode::GrantWrongCapability,
            GrantRefusal::OutOfScope { .. } => DenialCode::GrantOutOfScope,
            GrantRefusal::RunNotExecuting { .. } => DenialCode::RunNotExecuting,
        }
    }
}

/// Proof that one use of a grant was checked at the moment of use: the value the effects layer
/// requires before it acts.
///
/// Its fields are private and it can be made only by [`GrantBook::check_use`] (or
/// [`GrantBook::check_new_use`], the same check on a grant about to be recorded); it has no
/// `Default`, no `Deserialize` and no public constructor, so code outside this crate cannot make
/// one:
///
/// ```compile_fail,E0451
/// use ice_authority::Authorization;
/// let forged = Authorization {
///     run: ice_kernel::RunId::new("r").unwrap(),
///     grant: "r:1".parse().unwrap(),
///     agent: "coder".into(),
///     capability: "fs.write".into(),
///     resource: ice_authority::Resource::path("a").unwrap(),
///     scope: ice_authority::Scope::parse("fs.write").unwrap(),
///     effect: ice_authority::EffectClass::InternalWrite,
///     constraints: Default::default(),
/// };
/// ```
///
/// ```compile_fail,E0277
/// let forged: ice_authority::Authorization = Default::default();
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    run: RunId,
    grant: EventId,
    agent: String,
    capability: String,
    resource: Resource,
    scope: Scope,
    effect: EffectClass,
    constraints: Constraints,
}

impl Authorization {
    fn new(grant: &Grant, resource: &Resource) -> Authorization {
        Authorization {
            run: grant.run.clone(),
            grant: grant.id.clone(),
            agent: grant.agent.clone(),
            capability: grant.capability.clone(),
            resource: resource.clone(),
            scope: grant.scope.clone(),
            effect: grant.effect,
            constraints: grant.constraints,
        }
    }

    /// The run the use happens in.
    pub fn run(&self) -> &RunId {
        &self.run
    }

    /// The grant that authorises it (the `authority` of the effect events).
    pub fn grant(&self) -> &EventId {
        &self.grant
    }

    /// The agent the grant is for.
    pub fn agent(&self) -> &str {
        &self.agent
    }

    /// The capability used.
    pub fn capability(&self) -> &str {
        &self.capability
    }

    /// The target of this use (within the grant's scope).
    pub fn resource(&self) -> &Resource {
        &self.resource
    }

    /// The grant's scope.
    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// The effect class the runtime assigned to the grant.
    pub fn effect(&self) -> EffectClass {
        self.effect
    }

    /// The grant's limits on this use, for the effects layer to enforce.
    pub fn constraints(&self) -> Constraints {
        self.constraints
    }
}

/// The grants of one run: a pure fold of its `CapabilityGranted`, `CapabilityUsed`,
/// `CapabilityRevoked` and `CapabilityExpired` events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantBook {
    run: RunId,
    grants: BTreeMap<EventId, Grant>,
    /// The grants still recorded live with uses left: what a use can find, so a run that has
    /// made thousands of single-use grants does not search them all at every call. Derived
    /// from `grants`, kept as each event is folded.
    usable: BTreeSet<EventId>,
    /// The grants still recorded live, by `expires_at`: what can fall due to expire.
    by_expiry: BTreeSet<(Timestamp, EventId)>,
}

impl GrantBook {
    /// An empty book for `run`.
    pub fn new(run: RunId) -> GrantBook {
        GrantBook {
            run,
            grants: BTreeMap::new(),
            usable: BTreeSet::new(),
            by_expiry: BTreeSet::new(),
        }
    }

    /// A grant that ends live (revoked or recorded expired) leaves both indexes.
    fn end(&mut self, id: &EventId, expires_at: Timestamp) {
        self.usable.remove(id);
        self.by_expiry.remove(&(expires_at, id.clone()));
    }

    /// The run.
    pub fn run(&self) -> &RunId {
        &self.run
    }

    /// Fold one event. Events of other runs and of other types are ignored. On error the book
    /// is unchanged. Refused:
    /// - a payload that breaks the contract ([`crate::payload`]);
    /// - a `CapabilityGranted` whose `authority` is not its approval id, or
    ///   `policy:<policy version hex>` when it has no approval;
    /// - a `CapabilityUsed`, `CapabilityRevoked` or `CapabilityExpired` of a grant this run never
    ///   made;
    /// - a `CapabilityUsed` whose `authority` is not the grant, or that [`Self::check_use`] would
    ///   have refused for a reason other than time and run state (revoked, recorded expired, used
    ///   up, other capability, out of scope): the runtime records a use only after checking it.
    ///   Expiry by time is not re-checked, since the record's `at` follows the check; the kernel
    ///   admits `CapabilityUsed` only while the run is EXECUTING;
    /// - a `CapabilityRevoked` or `CapabilityExpired` of a grant already revoked or expired.
    pub fn apply(&mut self, event: &Event) -> Result<(), BookError> {
        if event.run_id != self.run {
            return Ok(());
        }
        match EventType::from_name(&event.event_type) {
            Some(EventType::CapabilityGranted) => self.apply_granted(event),
            Some(EventType::CapabilityUsed) => self.apply_used(event),
            Some(EventType::CapabilityRevoked) => {
                let p = CapabilityRevokedPayload::from_event(event)
                    .map_err(|e| BookError::new(event, e))?;
                let grant = self.live_grant_mut(event, &p.grant)?;
                grant.status = GrantStatus::Revoked {
                    reason: p.reason,
                    policy_version: p.policy_version,
                    at: event.at,
                };
                let expires_at = grant.expires_at;
                self.end(&p.grant, expires_at);
                Ok(())
            }
            Some(EventType::CapabilityExpired) => {
                let p = CapabilityExpiredPayload::from_event(event)
                    .map_err(|e| BookError::new(event, e))?;
                let grant = self.live_grant_mut(event, &p.grant)?;
                grant.status = GrantStatus::Expired { at: event.at };
                let expires_at = grant.expires_at;
                self.end(&p.grant, expires_at);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn apply_granted(&mut self, event: &Event) -> Result<(), BookError> {
        let p =
            CapabilityGrantedPayload::from_event(event).map_err(|e| BookError::new(event, e))?;
        let expected = p.authority();
        if event.authority.as_deref() != Some(expected.as_str()) {
            return Err(BookError::new(
                event,
                BookProblem::Authority {
                    expected,
                    got: event.authority.clone(),
                },
            ));
        }
        let grant = Grant::issued(event.id(), event.run_id.clone(), p, event.at);
        // Event ids are unique in a verified log; a repeat would be a second fold of the event.
        if grant.uses_left() > 0 {
            self.usable.insert(grant.id.clone());
        }
        self.by_expiry.insert((grant.expires_at, grant.id.clone()));
        self.grants.insert(grant.id.clone(), grant);
        Ok(())
    }

    fn apply_used(&mut self, event: &Event) -> Result<(), BookError> {
        let p = CapabilityUsedPayload::from_event(event).map_err(|e| BookError::new(event, e))?;
        let expected = p.grant.to_string();
        if event.authority.as_deref() != Some(expected.as_str()) {
            return Err(BookError::new(
                event,
                BookProblem::Authority {
                    expected,
                    got: event.authority.clone(),
                },
            ));
        }
        if !self.grants.contains_key(&p.grant) {
            return Err(BookError::new(event, BookProblem::UnknownGrant(p.grant)));
        }
        self.check(&p.grant, &event.run_id, &p.capability, &p.resource, None)
            .map_err(|refusal| BookError::new(event, BookProblem::UseRefused(refusal)))?;
        if let Some(grant) = self.grants.get_mut(&p.grant) {
            grant.uses += 1;
            if grant.uses_left() == 0 {
                self.usable.remove(&p.grant);
            }
        }
        Ok(())
    }

    fn live_grant_mut(&mut self, event: &Event, id: &EventId) -> Result<&mut Grant, BookError> {
        let grant = self
            .grants
            .get_mut(id)
            .ok_or_else(|| BookError::new(event, BookProblem::UnknownGrant(id.clone())))?;
        if grant.status != GrantStatus::Live {
            return Err(BookError::new(
                event,
                BookProblem::GrantNotLive {
                    grant: id.clone(),
                    status: grant.status.name(),
                },
            ));
        }
        Ok(grant)
    }

    /// The grant with this id.
    pub fn get(&self, grant: &EventId) -> Option<&Grant> {
        self.grants.get(grant)
    }

    /// Every grant, in the order they were made.
    pub fn iter(&self) -> impl Iterator<Item = &Grant> {
        self.grants.values()
    }

    /// The grants usable at `now` ([`Grant::is_live`]), in the order they were made. A policy
    /// change re-evaluates these.
    pub fn live(&self, now: Timestamp) -> impl Iterator<Item = &Grant> {
        self.usable
            .iter()
            .filter_map(|id| self.grants.get(id))
            .filter(move |g| g.is_live(now))
    }

    /// Grants still recorded as live whose `expires_at` has passed at `now`: the runtime records
    /// a `CapabilityExpired` for each.
    pub fn due_to_expire(&self, now: Timestamp) -> impl Iterator<Item = &Grant> {
        // In the order they were made, as before the index by expiry.
        let mut due: Vec<&EventId> = self
            .by_expiry
            .iter()
            .take_while(|(expires_at, _)| now >= *expires_at)
            .map(|(_, id)| id)
            .collect();
        due.sort();
        due.into_iter().filter_map(|id| self.grants.get(id))
    }

    /// A grant usable at `now` for `capability` on `resource`: live, of that capability, of the
    /// resource's kind, its scope covering the target. Of several, the one with the narrowest
    /// scope (most segments), then the earliest.
    ///
    /// This says only what a grant covers, not that a call may use it: the runtime uses
    /// [`Self::find_reusable`], after the policy has permitted the call.
    pub fn find_covering(
        &self,
        capability: &str,
        resource: &Resource,
        now: Timestamp,
    ) -> Option<&Grant> {
        self.narrowest(capability, resource, now, |_| true)
    }

    /// The live grant a call the policy has just permitted outright may use instead of a new
    /// one: as [`Self::find_covering`], and also for `agent`, carrying exactly `constraints`
    /// (the limits the permit gives now, so a reused grant never limits a call more loosely, or
    /// otherwise, than its own decision), and issued without an approval (a grant an operator
    /// approved serves only the call that was approved). Of several, the narrowest, then the
    /// earliest.
    ///
    /// A grant never stands in for a decision: the policy decides every call, and a grant is
    /// reused only for a call it permits without approval. A grant's scope is wider than the
    /// target the policy decided on when it was issued (a directory's subtree, every port of a
    /// host), which is why a reuse needs the policy's permit for the call at hand.
    pub fn find_reusable(
        &self,
        agent: &str,
        capability: &str,
        resource: &Resource,
        constraints: &Constraints,
        now: Timestamp,
    ) -> Option<&Grant> {
        self.narrowest(capability, resource, now, |g| {
            g.agent == agent && g.approval.is_none() && g.constraints == *constraints
        })
    }

    /// The live grant of `capability` covering `resource` at `now` that `also` accepts, with
    /// the narrowest scope, then the earliest.
    fn narrowest(
        &self,
        capability: &str,
        resource: &Resource,
        now: Timestamp,
        also: impl Fn(&Grant) -> bool,
    ) -> Option<&Grant> {
        let target = Scope::for_target(capability, resource).ok()?;
        let mut best: Option<&Grant> = None;
        for grant in self.live(now) {
            if grant.capability == capability
                && grant.resource.kind() == resource.kind()
                && grant.scope.covers(&target)
                && best.is_none_or(|b| grant.scope.segments.len() > b.scope.segments.len())
                && also(grant)
            {
                best = Some(grant);
            }
        }
        best
    }

    /// Check one use of `grant` by `run` for `capability` on `resource` at `now`, with the run
    /// in `state`, in this order: the grant is of `run` (`grant_wrong_run`), this book (of
    /// `run`) knows it (`grant_unknown`), not revoked, not expired (`now >= expires_at` is
    /// expired), uses left, capability matches, scope covers the target (and the target is of
    /// the grant's resource kind), run EXECUTING.
    ///
    /// The check changes nothing: the use counts once its `CapabilityUsed` is folded in.
    #[expect(
        clippy::result_large_err,
        reason = "a refusal is the cold path, and carries the typed facts CapabilityDenied records"
    )]
    pub fn check_use(
        &self,
        grant: &EventId,
        run: &RunId,
        capability: &str,
        resource: &Resource,
        now: Timestamp,
        state: RunState,
    ) -> Result<Authorization, GrantRefusal> {
        let found = self.check(grant, run, capability, resource, Some(now))?;
        if state != RunState::Executing {
            return Err(GrantRefusal::RunNotExecuting { state });
        }
        Ok(Authorization::new(found, resource))
    }

    /// [`Self::check_use`] for the first use of a grant that is not recorded yet: the grant
    /// `granted` will make once its `CapabilityGranted` is folded as event `id` of `run`.
    ///
    /// The runtime records an in-process read's whole call in one batch after the read
    /// (request, grant, reservation, use, effect, settlement), so the use of a new grant is
    /// checked, at the moment of use, before the grant is in the book. The checks and their
    /// order are those of [`Self::check_use`] on the grant as the fold would make it; `id` must
    /// be an id of `run` that this book (of `run`) does not hold yet, else `grant_wrong_run` or
    /// `grant_unknown`. The book is not changed.
    #[expect(
        clippy::result_large_err,
        reason = "a refusal is the cold path, and carries the typed facts CapabilityDenied records"
    )]
    #[allow(clippy::too_many_arguments)]
    pub fn check_new_use(
        &self,
        id: &EventId,
        granted: &CapabilityGrantedPayload,
        run: &RunId,
        capability: &str,
        resource: &Resource,
        now: Timestamp,
        state: RunState,
    ) -> Result<Authorization, GrantRefusal> {
        if id.run_id != *run {
            return Err(GrantRefusal::WrongRun {
                grant: id.clone(),
                grant_run: id.run_id.clone(),
                run: run.clone(),
            });
        }
        if self.run != *run || self.grants.contains_key(id) {
            return Err(GrantRefusal::Unknown { grant: id.clone() });
        }
        let grant = Grant::issued(id.clone(), run.clone(), granted.clone(), now);
        check_grant(&grant, capability, resource, Some(now))?;
        if state != RunState::Executing {
            return Err(GrantRefusal::RunNotExecuting { state });
        }
        Ok(Authorization::new(&grant, resource))
    }

    /// Every check of [`Self::check_use`] but the run's state; expiry by time only when `now` is
    /// given (the fold of a recorded use does not re-check it).
    #[expect(
        clippy::result_large_err,
        reason = "a refusal is the cold path, and carries the typed facts CapabilityDenied records"
    )]
    fn check(
        &self,
        id: &EventId,
        run: &RunId,
        capability: &str,
        resource: &Resource,
        now: Option<Timestamp>,
    ) -> Result<&Grant, GrantRefusal> {
        if id.run_id != *run {
            return Err(GrantRefusal::WrongRun {
                grant: id.clone(),
                grant_run: id.run_id.clone(),
                run: run.clone(),
            });
        }
        // A book of another run (a caller's mistake) knows no grant of `run`.
        let grant = self
            .grants
            .get(id)
            .filter(|_| self.run == *run)
            .ok_or_else(|| GrantRefusal::Unknown { grant: id.clone() })?;
        check_grant(grant, capability, resource, now)?;
        Ok(grant)
    }
}

/// The checks of a use that depend on the grant alone, in [`GrantBook::check_use`]'s order:
/// not revoked, not expired (by time only when `now` is given), uses left, capability, scope.
#[expect(
    clippy::result_large_err,
    reason = "a refusal is the cold path, and carries the typed facts CapabilityDenied records"
)]
fn check_grant(
    grant: &Grant,
    capability: &str,
    resource: &Resource,
    now: Option<Timestamp>,
) -> Result<(), GrantRefusal> {
    let id = &grant.id;
    match &grant.status {
        GrantStatus::Revoked { reason, .. } => {
            return Err(GrantRefusal::Revoked {
                grant: id.clone(),
                reason: reason.clone(),
            });
        }
        GrantStatus::Expired { at } => {
            return Err(GrantRefusal::Expired {
                grant: id.clone(),
                expires_at: grant.expires_at,
                now: now.unwrap_or(*at),
            });
        }
        GrantStatus::Live => {}
    }
    if let Some(now) = now
        && now >= grant.expires_at
    {
        return Err(GrantRefusal::Expired {
            grant: id.clone(),
            expires_at: grant.expires_at,
            now,
        });
    }
    if grant.uses_left() == 0 {
        return Err(GrantRefusal::UsedUp {
            grant: id.clone(),
            max_uses: grant.max_uses,
        });
    }
    if grant.capability != capability {
        return Err(GrantRefusal::WrongCapability {
            grant: id.clone(),
            granted: grant.capability.clone(),
            asked: truncated(capability),
        });
    }
    let covered = resource.kind() == grant.resource.kind()
        && Scope::for_target(capability, resource).is_ok_and(|t| grant.scope.covers(&t));
    if !covered {
        return Err(GrantRefusal::OutOfScope {
            grant: id.clone(),
            scope: grant.scope.clone(),
            target: resource.clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_round_trip_and_only_canonical_escapes_parse() {
        let r = Resource::path("a%b/c:d").unwrap_or_else(|e| panic!("{e}"));
        let s = Scope::for_target("fs.write", &r).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.to_string(), "fs.write:a%25b:c%3Ad");
        assert_eq!(Scope::parse(&s.to_string()), Ok(s));
        for bad in [
            "fs.write:a%3ab",
            "fs.write:a%2",
            "fs.write:%",
            "fs.write:a%41",
            "fs.write:",
            "fs.write::x",
            "Fs.write:x",
            "fs.write:a\nb",
        ] {
            assert!(Scope::parse(bad).is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn ipv6_hosts_are_one_segment() {
        let r = Resource::host("::1").unwrap_or_else(|e| panic!("{e}"));
        let s = Scope::for_target("http.request", &r).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.segments(), ["::1"]);
        assert_eq!(s.to_string(), "http.request:%3A%3A1");
        assert!(!Scope::parse("http.request:").is_ok_and(|p| p.covers(&s)));
    }
}
