//! Pre-selection: which policies can possibly apply to a request, worked out from their scopes
//! once at load time, so a decision evaluates only those.
//!
//! Each policy is filed under:
//! - every action its scope allows (a policy for any action is filed under every action some
//!   policy names but `http.connect`, which only policies naming it decide, and under "any
//!   other action");
//! - every resource entity type its scope allows;
//! - its principal anchor: the agent its scope names (`principal == Agent::"a"`, or `in`, which
//!   is the same because the runtime gives agents no parents), or none;
//! - its resource anchor: the entity its scope names (`resource == E`, `resource in E`,
//!   `resource is T in E`), or none. A request's resource can only be `==` or `in` an entity
//!   that is itself or one of its ancestors, which the request lists.
//!
//! A Cedar policy set is built for each group at load time. A decision looks up the groups of
//! its action and resource type, for its agent and for any agent, for no anchor and for each of
//! its resource's anchors, and evaluates the non-empty ones. Cedar evaluates a policy's scope
//! before its conditions and stops at the first false, so a policy left out could only have been
//! "not satisfied", with no error: the union of the groups' results is the whole set's result.

use std::collections::HashMap;

use cedar_policy as cedar;

use crate::capability::ResourceKind;
use crate::request::{HTTP_CONNECT, Request, ancestor_types, anchor_key};

/// Where a policy can apply, read off its scope.
struct Scope {
    /// `None`: any action.
    actions: Option<Vec<String>>,
    kinds: [bool; ResourceKind::ALL.len()],
    /// `None`: any agent.
    principal: Option<String>,
    /// `None`: no anchor.
    anchor: Option<String>,
}

fn kind_of_type(ty: &cedar::EntityTypeName) -> Option<ResourceKind> {
    let ty = ty.to_string();
    ResourceKind::ALL
        .into_iter()
        .find(|k| k.entity_type() == ty)
}

/// Could a resource of `kind` be `in` an entity of type `ty`, as the runtime builds resources?
fn can_be_in(kind: ResourceKind, ty: &cedar::EntityTypeName) -> bool {
    let ty = ty.to_string();
    kind.entity_type() == ty || ancestor_types(kind).contains(&ty.as_str())
}

fn uid_anchor(uid: &cedar::EntityUid) -> String {
    anchor_key(&uid.type_name().to_string(), uid.id().unescaped())
}

fn scope_of(policy: &cedar::Policy) -> Scope {
    // Requests always name their action as `Action::"name"`, so an action of another type can
    // never match; leaving it out of every group is exact.
    let action_id = |uid: &cedar::EntityUid| {
        (uid.type_name().to_string() == "Action").then(|| uid.id().unescaped().to_string())
    };
    let actions = match policy.action_constraint() {
        cedar::ActionConstraint::Any => None,
        cedar::ActionConstraint::Eq(uid) => Some(action_id(&uid).into_iter().collect()),
        cedar::ActionConstraint::In(uids) => Some(uids.iter().filter_map(action_id).collect()),
    };
    // An anchor on an agent is exact; on any other type the policy is filed for any agent,
    // which is never wrong, only slower.
    let agent = |uid: &cedar::EntityUid| {
        (uid.type_name().to_string() == "Agent").then(|| uid.id().unescaped().to_string())
    };
    let principal = match policy.principal_constraint() {
        cedar::PrincipalConstraint::Any | cedar::PrincipalConstraint::Is(_) => None,
        cedar::PrincipalConstraint::Eq(uid)
        | cedar::PrincipalConstraint::In(uid)
        | cedar::PrincipalConstraint::IsIn(_, uid) => agent(&uid),
    };
    let mut kinds = [false; ResourceKind::ALL.len()];
    let mut allow = |pred: &dyn Fn(ResourceKind) -> bool| {
        for kind in ResourceKind::ALL {
            if pred(kind) {
                kinds[kind.index()] = true;
            }
        }
    };
    let anchor = match policy.resource_constraint() {
        cedar::ResourceConstraint::Any => {
            allow(&|_| true);
            None
        }
        cedar::ResourceConstraint::Is(ty) => {
            let kind = kind_of_type(&ty);
            allow(&|k| Some(k) == kind);
            None
        }
        cedar::ResourceConstraint::Eq(uid) => {
            let kind = kind_of_type(uid.type_name());
            allow(&|k| Some(k) == kind);
            Some(uid_anchor(&uid))
        }
        cedar::ResourceConstraint::IsIn(ty, uid) => {
            let kind = kind_of_type(&ty);
            allow(&|k| Some(k) == kind && can_be_in(k, uid.type_name()));
            Some(uid_anchor(&uid))
        }
        cedar::ResourceConstraint::In(uid) => {
            allow(&|k| can_be_in(k, uid.type_name()));
            Some(uid_anchor(&uid))
        }
    };
    Scope {
        actions,
        kinds,
        principal,
        anchor,
    }
}

/// The groups of one (action, resource type) pair: by principal anchor (`""` for any agent),
/// then by resource anchor (`""` for none).
type Groups = HashMap<String, HashMap<String, cedar::PolicySet>>;

/// The policy index. Immutable once built.
#[derive(Debug)]
pub(crate) struct PolicyIndex {
    by_action: HashMap<String, Vec<Groups>>,
    any_action: Vec<Groups>,
}

impl PolicyIndex {
    /// File every policy into its groups and build a Cedar policy set per group.
    pub(crate) fn build(policies: &[cedar::Policy]) -> Result<PolicyIndex, String> {
        let scopes: Vec<Scope> = policies.iter().map(scope_of).collect();
        let mut actions: Vec<&str> = scopes
            .iter()
            .filter_map(|s| s.actions.as_ref())
            .flatten()
            .map(String::as_str)
            .collect();
        actions.sort_unstable();
        actions.dedup();
        let group = |applies: &dyn Fn(&Scope) -> bool| -> Result<Vec<Groups>, String> {
            let mut out = Vec::with_capacity(ResourceKind::ALL.len());
            for kind in ResourceKind::ALL {
                let mut chosen: HashMap<&str, HashMap<&str, Vec<cedar::Policy>>> = HashMap::new();
                for (policy, scope) in policies.iter().zip(&scopes) {
                    if scope.kinds[kind.index()] && applies(scope) {
                        chosen
                            .entry(scope.principal.as_deref().unwrap_or(""))
                            .or_default()
                            .entry(scope.anchor.as_deref().unwrap_or(""))
                            .or_default()
                            .push(policy.clone());
                    }
                }
                let mut groups = Groups::with_capacity(chosen.len());
                for (principal, anchors) in chosen {
                    let mut by_anchor = HashMap::with_capacity(anchors.len());
                    for (anchor, list) in anchors {
                        let set =
                            cedar::PolicySet::from_policies(list).map_err(|e| e.to_string())?;
                        by_anchor.insert(anchor.to_string(), set);
                    }
                    groups.insert(principal.to_string(), by_anchor);
                }
                out.push(groups);
            }
            Ok(out)
        };
        let mut by_action = HashMap::with_capacity(actions.len());
        for action in actions {
            // A connection check is decided only by the policies written for it.
            let any = action != HTTP_CONNECT;
            let groups = group(&|s: &Scope| match &s.actions {
                None => any,
                Some(list) => list.iter().any(|a| a == action),
            })?;
            by_action.insert(action.to_string(), groups);
        }
        let any_action = group(&|s: &Scope| s.actions.is_none())?;
        Ok(PolicyIndex {
            by_action,
            any_action,
        })
    }

    /// The non-empty policy sets that can apply to `request`, passed to `each` in turn.
    pub(crate) fn candidates<'a>(
        &'a self,
        request: &Request,
        mut each: impl FnMut(&'a cedar::PolicySet),
    ) {
        let per_kind = match self.by_action.get(request.capability()) {
            Some(groups) => groups,
            // No policy names a connection check: none applies to it.
            None if request.capability() == HTTP_CONNECT => return,
            None => &self.any_action,
        };
        // Every list has one entry per resource kind.
        let Some(groups) = per_kind.get(request.resource().kind().index()) else {
            return;
        };
        for principal in [request.agent(), ""] {
            let Some(by_anchor) = groups.get(principal) else {
                continue;
            };
            for anchor in std::iter::once("").chain(request.anchors().iter().map(String::as_str)) {
                if let Some(set) = by_anchor.get(anchor) {
                    each(set);
                }
            }
        }
    }
}
