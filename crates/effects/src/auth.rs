//! The authorization every agent-reachable adapter needs, and the check that it covers exactly
//! the operation about to happen.
//!
//! An authorization is what the authority layer hands the runtime when a grant passes its check
//! at the moment of use (same run, not revoked, not expired, uses left, scope covers the target,
//! run executing). It names one capability on one resource. An adapter refuses unless the
//! operation it is asked to do is that capability on that resource: an `fs.write`
//! authorization for `src/a.rs` cannot write `src/b.rs`, and an `fs.read` one cannot write
//! anything.
//!
//! Only the authority crate can make an [`Authorization`] (from `GrantBook::check_use`), so no
//! caller of an adapter can forge one.

use std::time::Duration;

use ice_authority::{Authorization, EffectClass, Resource};
use ice_kernel::RunId;

/// Why an adapter refused an authorization.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorizationError {
    /// The authorization is for another capability or another resource.
    #[error(
        "refused: grant {grant} authorizes {granted_capability} on {granted_resource}, \
         not {capability} on {resource}"
    )]
    Mismatch {
        /// The grant event behind the authorization.
        grant: String,
        /// The capability the operation needs.
        capability: String,
        /// The resource the operation acts on.
        resource: String,
        /// The capability the authorization names.
        granted_capability: String,
        /// The resource the authorization names.
        granted_resource: String,
    },
    /// The authorization is for a less severe effect than the operation has (a `GET`
    /// authorization used for a `POST`).
    #[error("refused: grant {grant} authorizes a {granted} effect; this operation is {needed}")]
    Effect {
        /// The grant event behind the authorization.
        grant: String,
        /// The class the operation has.
        needed: EffectClass,
        /// The class the authorization was given for.
        granted: EffectClass,
    },
    /// The use would go past a limit the grant puts on each use (a constraint set by the
    /// policy that permitted it); nothing was done.
    #[error(
        "refused: grant {grant} allows at most {limit} bytes per use ({constraint}); {what} is \
         {bytes} bytes"
    )]
    Constraint {
        /// The grant event behind the authorization.
        grant: String,
        /// The constraint (`max_bytes`).
        constraint: &'static str,
        /// Its value.
        limit: u64,
        /// What was measured against it (`the content`).
        what: String,
        /// Its size.
        bytes: u64,
    },
    /// The authorization belongs to another run.
    #[error("refused: grant {grant} belongs to run {granted_run}, not {run}")]
    Run {
        /// The grant event behind the authorization.
        grant: String,
        /// The run the operation belongs to.
        run: String,
        /// The run the authorization belongs to.
        granted_run: String,
    },
}

/// Refuse unless `auth` is for exactly `capability` on exactly `resource`.
pub(crate) fn require(
    auth: &Authorization,
    capability: &str,
    resource: &Resource,
) -> Result<(), AuthorizationError> {
    if auth.capability() != capability || auth.resource() != resource {
        return Err(AuthorizationError::Mismatch {
            grant: auth.grant().to_string(),
            capability: capability.to_string(),
            resource: resource.to_string(),
            granted_capability: auth.capability().to_string(),
            granted_resource: auth.resource().to_string(),
        });
    }
    Ok(())
}

/// Refuse unless `auth`'s effect class is at least `needed`.
pub(crate) fn require_effect(
    auth: &Authorization,
    needed: EffectClass,
) -> Result<(), AuthorizationError> {
    if auth.effect() < needed {
        return Err(AuthorizationError::Effect {
            grant: auth.grant().to_string(),
            needed,
            granted: auth.effect(),
        });
    }
    Ok(())
}

/// Refuse unless `auth` belongs to `run`.
pub(crate) fn require_run(auth: &Authorization, run: &RunId) -> Result<(), AuthorizationError> {
    if auth.run() != run {
        return Err(AuthorizationError::Run {
            grant: auth.grant().to_string(),
            run: run.to_string(),
            granted_run: auth.run().to_string(),
        });
    }
    Ok(())
}

/// Refuse unless `bytes` (of `what`) fit in the grant's `max_bytes`, if it has one.
pub(crate) fn require_bytes(
    auth: &Authorization,
    what: &str,
    bytes: u64,
) -> Result<(), AuthorizationError> {
    match auth.constraints().max_bytes {
        Some(limit) if bytes > limit => Err(AuthorizationError::Constraint {
            grant: auth.grant().to_string(),
            constraint: ice_authority::constraint::MAX_BYTES_ANNOTATION,
            limit,
            what: what.to_string(),
            bytes,
        }),
        _ => Ok(()),
    }
}

/// The most bytes this use may move after `already` have been: `limit`, or less where the
/// grant's `max_bytes` says so.
pub(crate) fn cap_bytes(auth: &Authorization, already: u64, limit: u64) -> u64 {
    match auth.constraints().max_bytes {
        Some(max) => limit.min(max.saturating_sub(already)),
        None => limit,
    }
}

/// The longest this use may run: `limit`, or less where the grant's `timeout_ms` says so.
pub(crate) fn cap_time(auth: &Authorization, limit: Duration) -> Duration {
    match auth.constraints().timeout_ms {
        Some(ms) => limit.min(Duration::from_millis(ms)),
        None => limit,
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Authorizations made the only way they can be: a grant recorded in a run's log (events
    //! sealed by the kernel's validator), folded by `GrantBook`, and checked at the moment of
    //! use by `GrantBook::check_use`.

    use ice_authority::{
        Authorization, CapabilityGrantedPayload, Constraints, EffectClass, GrantBook,
        PolicyVersion, Resource, Scope,
    };
    use ice_kernel::{
        Digest, Draft, EventType, NoOtherRuns, Origin, RunHead, RunId, RunState, Timestamp,
    };
    use serde_json::{Value, json};

    /// `capability` on `resource` in run `run`, from a grant whose scope is `scope` (the
    /// resource's own scope when `None`).
    pub(crate) fn authorize_scoped(
        run: &str,
        capability: &str,
        resource: Resource,
        scope: Option<&str>,
        effect: EffectClass,
    ) -> Authorization {
        authorize_with(run, capability, resource, scope, effect, Constraints::NONE)
    }

    /// `capability` on `resource` in run `run-1`, from a grant with these constraints.
    pub(crate) fn constrained(
        capability: &str,
        resource: Resource,
        effect: EffectClass,
        constraints: Constraints,
    ) -> Authorization {
        authorize_with("run-1", capability, resource, None, effect, constraints)
    }

    fn authorize_with(
        run: &str,
        capability: &str,
        resource: Resource,
        scope: Option<&str>,
        effect: EffectClass,
        constraints: Constraints,
    ) -> Authorization {
        let run_id = RunId::new(run).expect("run id");
        let mut head = RunHead::new(run_id.clone());
        const T0_US: i64 = 1_700_000_000_000_000;
        let mut clock_us: i64 = T0_US;
        let mut events = Vec::new();
        let mut seal = |draft: Draft| {
            clock_us += 1_000;
            let at = Timestamp::from_unix_us(clock_us).expect("time");
            let (sealed, _) = head.seal(draft, at, &NoOtherRuns).expect("sealed");
            let event = sealed.into_event();
            events.push(event.clone());
            event
        };
        for t in [
            EventType::RunProvisioned,
            EventType::ContextResolved,
            EventType::ExecutionWindowOpened,
        ] {
            seal(Draft::new(t.name(), Origin::Runtime));
        }
        let target = resource.entity_id();
        let request = seal(
            Draft::new(
                EventType::CapabilityRequested.name(),
                Origin::Agent("coder".into()),
            )
            .intent(format!("{capability} on {target}"))
            .payload(json!({ "capability": capability, "target": target })),
        )
        .id();
        let scope = match scope {
            Some(text) => Scope::parse(text).expect("scope"),
            None => Scope::for_target(capability, &resource).expect("scope"),
        };
        let payload = CapabilityGrantedPayload {
            capability: capability.to_string(),
            resource: resource.clone(),
            scope,
            agent: "coder".into(),
            effect,
            expires_at: Timestamp::from_unix_us(T0_US + 3_600_000_000).expect("time"),
            max_uses: 10,
            constraints,
            policy_version: PolicyVersion(Digest([1; 32])),
            policies: vec!["test.cedar#1".into()],
            approval: None,
            request,
        };
        let mut draft = Draft::new(EventType::CapabilityGranted.name(), Origin::Runtime)
            .intent("grant for the test")
            .payload(Value::Object(payload.to_payload()));
        draft.authority = Some(payload.authority());
        let grant = seal(draft).id();
        let now = Timestamp::from_unix_us(T0_US + 60_000_000).expect("time");
        let mut book = GrantBook::new(run_id.clone());
        for event in &events {
            book.apply(event).expect("the book folds the grant");
        }
        book.check_use(
            &grant,
            &run_id,
            capability,
            &resource,
            now,
            RunState::Executing,
        )
        .expect("the grant covers its own target")
    }

    /// `capability` on `resource` in run `run-1`.
    pub(crate) fn authorize(
        capability: &str,
        resource: Resource,
        effect: EffectClass,
    ) -> Authorization {
        authorize_scoped("run-1", capability, resource, None, effect)
    }

    /// `fs.read` on a path.
    pub(crate) fn read(path: &str) -> Authorization {
        authorize(
            "fs.read",
            Resource::path(path).expect("path"),
            EffectClass::Read,
        )
    }
    /// `fs.list` on a directory.
    pub(crate) fn list(dir: &str) -> Authorization {
        authorize(
            "fs.list",
            Resource::dir(dir).expect("dir"),
            EffectClass::Read,
        )
    }
    /// `fs.write` on a path.
    pub(crate) fn write(path: &str) -> Authorization {
        authorize(
            "fs.write",
            Resource::path(path).expect("path"),
            EffectClass::InternalWrite,
        )
    }
    /// `fs.write` on a path, in another run.
    pub(crate) fn write_in(run: &str, path: &str) -> Authorization {
        authorize_scoped(
            run,
            "fs.write",
            Resource::path(path).expect("path"),
            None,
            EffectClass::InternalWrite,
        )
    }
    /// `fs.delete` on a path.
    pub(crate) fn delete(path: &str) -> Authorization {
        authorize(
            "fs.delete",
            Resource::path(path).expect("path"),
            EffectClass::InternalWrite,
        )
    }
}
