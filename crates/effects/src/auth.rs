//! The authorization every agent-reachable adapter needs, and the check that it covers exactly
//! the operation about to happen.
//!
//! An authorization is what the authority layer hands the runtime when a grant passes its check
//! at the moment of use (same run, not revoked, not expired, uses left, scope covers the target,
//! run executing). It names one capability on one resource. An adapter refuses unless the
//! operation it is asked to do is that capability on that resource: an `fs.write`
//! authorization for `src/a.rs` cannot write `src/b.rs`, and an `fs.read` one cannot write
//! anything.

use ice_authority::{EffectClass, Resource};
use ice_kernel::{EventId, RunId};

/// Stand-in for `ice_authority::Authorization` until it lands: the getters it will have.
///
/// The trait is private to this crate, so no other crate can implement it, and so no other
/// crate can call an adapter yet. When the real type lands, [`Auth`] becomes that type and the
/// adapters' signatures do not change.
pub(crate) trait Authorizes {
    /// The run the grant is bound to.
    fn run(&self) -> &RunId;
    /// The grant event that allowed this use.
    fn grant(&self) -> &EventId;
    /// The capability used (`fs.write`).
    fn capability(&self) -> &str;
    /// The exact target of this use.
    fn resource(&self) -> &Resource;
    /// The effect class the runtime assigned to this use.
    fn effect(&self) -> EffectClass;
    /// The grant's constraints.
    #[allow(dead_code)]
    fn constraints(&self) -> &serde_json::Map<String, serde_json::Value>;
}

/// The authorization adapters take.
pub(crate) type Auth = dyn Authorizes;

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
    auth: &Auth,
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
pub(crate) fn require_effect(auth: &Auth, needed: EffectClass) -> Result<(), AuthorizationError> {
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
pub(crate) fn require_run(auth: &Auth, run: &RunId) -> Result<(), AuthorizationError> {
    if auth.run() != run {
        return Err(AuthorizationError::Run {
            grant: auth.grant().to_string(),
            run: run.to_string(),
            granted_run: auth.run().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod testing {
    //! A test authorization, standing in for one the authority crate makes.

    use super::Authorizes;
    use ice_authority::{EffectClass, Resource};
    use ice_kernel::{EventId, RunId};

    pub(crate) struct TestAuth {
        run: RunId,
        grant: EventId,
        capability: String,
        resource: Resource,
        effect: EffectClass,
        constraints: serde_json::Map<String, serde_json::Value>,
    }

    impl TestAuth {
        pub(crate) fn new(capability: &str, resource: Resource, effect: EffectClass) -> TestAuth {
            let run = RunId::new("run-1").expect("run id");
            TestAuth {
                grant: EventId::new(run.clone(), 7),
                run,
                capability: capability.to_string(),
                resource,
                effect,
                constraints: serde_json::Map::new(),
            }
        }

        pub(crate) fn in_run(mut self, run: &str) -> TestAuth {
            self.run = RunId::new(run).expect("run id");
            self
        }
    }

    impl Authorizes for TestAuth {
        fn run(&self) -> &RunId {
            &self.run
        }
        fn grant(&self) -> &EventId {
            &self.grant
        }
        fn capability(&self) -> &str {
            &self.capability
        }
        fn resource(&self) -> &Resource {
            &self.resource
        }
        fn effect(&self) -> EffectClass {
            self.effect
        }
        fn constraints(&self) -> &serde_json::Map<String, serde_json::Value> {
            &self.constraints
        }
    }

    /// `fs.read` on a path.
    pub(crate) fn read(path: &str) -> TestAuth {
        TestAuth::new(
            "fs.read",
            Resource::path(path).expect("path"),
            EffectClass::Read,
        )
    }
    /// `fs.list` on a directory.
    pub(crate) fn list(dir: &str) -> TestAuth {
        TestAuth::new(
            "fs.list",
            Resource::dir(dir).expect("dir"),
            EffectClass::Read,
        )
    }
    /// `fs.write` on a path.
    pub(crate) fn write(path: &str) -> TestAuth {
        TestAuth::new(
            "fs.write",
            Resource::path(path).expect("path"),
            EffectClass::InternalWrite,
        )
    }
    /// `fs.delete` on a path.
    pub(crate) fn delete(path: &str) -> TestAuth {
        TestAuth::new(
            "fs.delete",
            Resource::path(path).expect("path"),
            EffectClass::InternalWrite,
        )
    }
}
