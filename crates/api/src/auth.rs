//! Who is calling: bearer tokens, kept only as SHA-256 digests, each belonging to an operator
//! or to an agent. Operator endpoints answer 401 without a known token and 403 to an agent's.

use std::sync::{Arc, RwLock};

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::Digest as _;

use crate::Shared;
use crate::error::ApiError;

/// Whose token it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// An operator: may call the operator API; actions are recorded as `operator:NAME`.
    Operator,
    /// An agent: may not call operator endpoints.
    Agent,
}

impl Role {
    /// `operator` or `agent`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Agent => "agent",
        }
    }
}

/// The operator a request was authenticated as (a request extension on operator endpoints).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operator(pub String);

#[derive(Clone, Debug)]
struct Entry {
    role: Role,
    name: String,
    digest: [u8; 32],
}

/// The tokens an installation accepts, by SHA-256 digest (the tokens themselves are never
/// stored).
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    entries: Vec<Entry>,
}

/// SHA-256 of a token, as 64 lowercase hex characters: what the config stores.
pub fn token_digest(token: &str) -> String {
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

/// Check an operator's or agent's name: it becomes the origin `operator:NAME` of what the
/// operator records, so it follows the origin law (1 to 128 of `A-Z a-z 0-9 . _ - @`).
pub fn check_name(role: Role, name: &str) -> Result<(), String> {
    format!("{}:{name}", role.name())
        .parse::<ice_kernel::Origin>()
        .map(|_| ())
}

/// Equality of two digests in time independent of where they differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

impl Credentials {
    /// No tokens.
    pub fn new() -> Credentials {
        Credentials::default()
    }

    /// Accept the token whose SHA-256 is `token_sha256` (64 hex characters) as `name`'s.
    pub fn add(&mut self, role: Role, name: &str, token_sha256: &str) -> Result<(), String> {
        check_name(role, name)?;
        let raw = token_sha256.trim().to_ascii_lowercase();
        let mut digest = [0u8; 32];
        if raw.len() != 64 || hex::decode_to_slice(&raw, &mut digest).is_err() {
            return Err(format!(
                "{} {name:?}: token_sha256 must be 64 hex characters (the SHA-256 of the token)",
                role.name()
            ));
        }
        self.entries.push(Entry {
            role,
            name: name.to_string(),
            digest,
        });
        Ok(())
    }

    /// How many operator tokens there are.
    pub fn operators(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| e.role == Role::Operator)
            .count()
    }

    /// Whose token `token` is. Every stored digest is compared, in constant time, whatever
    /// matches.
    pub fn identify(&self, token: &str) -> Option<(Role, &str)> {
        let d: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for e in &self.entries {
            if same(&e.digest, &d) && found.is_none() {
                found = Some((e.role, e.name.as_str()));
            }
        }
        found
    }
}

/// Credentials that can be replaced while the server runs (when the installation's config
/// changes).
#[derive(Debug, Default)]
pub struct CredentialStore(RwLock<Credentials>);

impl CredentialStore {
    /// A store holding `c`.
    pub fn new(c: Credentials) -> Arc<CredentialStore> {
        Arc::new(CredentialStore(RwLock::new(c)))
    }

    /// Replace the credentials.
    pub fn replace(&self, c: Credentials) {
        match self.0.write() {
            Ok(mut g) => *g = c,
            Err(p) => *p.into_inner() = c,
        }
    }

    /// The credentials now.
    pub fn get(&self) -> Credentials {
        match self.0.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

/// The middleware in front of every operator endpoint.
pub(crate) async fn operators_only(
    State(state): State<Shared>,
    mut req: Request,
    next: Next,
) -> Response {
    match authenticate(&state, req.headers()) {
        Ok(op) => {
            req.extensions_mut().insert(op);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

fn authenticate(state: &Shared, headers: &axum::http::HeaderMap) -> Result<Operator, ApiError> {
    let creds = state.credentials.get();
    if creds.operators() == 0 {
        return Err(ApiError::unauthenticated(format!(
            "this installation has no operator token yet, so the operator API refuses every request; add one with `{}` and pass it as `Authorization: Bearer TOKEN`",
            state.token_hint
        )));
    }
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(ApiError::unauthenticated(
            "the operator API needs `Authorization: Bearer TOKEN` with an operator's token",
        ));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ApiError::unauthenticated("the Authorization header must be `Bearer TOKEN`")
        })?;
    match creds.identify(token) {
        Some((Role::Operator, name)) => Ok(Operator(name.to_string())),
        Some((Role::Agent, name)) => Err(ApiError::forbidden(format!(
            "this is agent {name:?}'s token; agents cannot call operator endpoints (they propose through MCP at /mcp)"
        ))),
        None => Err(ApiError::unauthenticated(
            "the token is not one of this installation's (tokens are added with `ice token add`)",
        )),
    }
}
