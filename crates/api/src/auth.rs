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
    /// A metrics reader (a Prometheus scraper): may read `/metrics` of `ice serve`, nothing
    /// else.
    Metrics,
}

impl Role {
    /// `operator` or `agent`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Agent => "agent",
            Role::Metrics => "metrics",
        }
    }

    /// What a token of this role may not do, for a refusal's message.
    fn refused(self, name: &str, what: &str) -> ApiError {
        ApiError::forbidden(match self {
            Role::Operator => format!(
                "this is operator {name:?}'s token; operators decide through the operator API, they do not propose through MCP (use an agent's token)"
            ),
            Role::Agent => format!(
                "this is agent {name:?}'s token; agents cannot call {what} (they propose through MCP at /mcp)"
            ),
            Role::Metrics => format!(
                "this is metrics reader {name:?}'s token; it reads /metrics and nothing else"
            ),
        })
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
    /// Why no token can be checked (the configuration does not read): every request is
    /// refused, anonymous ones included.
    unusable: Option<String>,
}

/// SHA-256 of a token, as 64 lowercase hex characters: what the config stores.
pub fn token_digest(token: &str) -> String {
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

/// Check a token holder's name: an operator's becomes the origin `operator:NAME` of what the
/// operator records (an agent's `agent:NAME`), so every name follows the origin law (1 to 128
/// of `A-Z a-z 0-9 . _ - @`).
pub fn check_name(role: Role, name: &str) -> Result<(), String> {
    if role == Role::Operator {
        check_operator_name(name)?;
    }
    let origin = match role {
        Role::Agent => "agent",
        Role::Operator | Role::Metrics => "operator",
    };
    format!("{origin}:{name}")
        .parse::<ice_kernel::Origin>()
        .map(|_| ())
        .map_err(|e| match role {
            Role::Metrics => e.replacen("operator id", "metrics reader name", 1),
            _ => e,
        })
}

/// The names ICE records for the user of an MCP client who answers an approval by elicitation
/// begin with this (`operator:user-of-stdio-client`, `operator:user-of-agent.NAME`); no
/// operator is given such a name, so that a record never confuses the two.
pub const ELICITATION_PREFIX: &str = "user-of-";

/// Refuse an operator name that ICE gives the users of MCP clients ([`ELICITATION_PREFIX`]).
pub fn check_operator_name(name: &str) -> Result<(), String> {
    if name.starts_with(ELICITATION_PREFIX) {
        return Err(format!(
            "operator name {name:?} begins with {ELICITATION_PREFIX:?}, which ICE records for the user of an MCP client answering by elicitation; choose another"
        ));
    }
    Ok(())
}

/// Whether `value` holds something that may be a credential: `ice_` in any case (what `ice
/// token add` prints, quoted, upper-cased or after `Bearer`), or a `Bearer` or `token` word.
/// Such a value is never repeated in a message.
fn looks_like_token(value: &str) -> bool {
    let v = value.to_ascii_lowercase();
    v.contains("ice_") || v.contains("bearer") || v.contains("token")
}

/// What is wrong with a `token_sha256` that is not 64 hex characters. The value is quoted
/// (with its length) only when it cannot be a secret: hex digits and blanks (a digest cut
/// short or too long), or at most 8 characters with nothing token-like. Anything else (a
/// token pasted where its digest belongs, in any case or quoting, or any other string) is
/// described by its length and what is wrong, never repeated.
fn bad_digest(value: &str) -> String {
    let n = value.chars().count();
    if looks_like_token(value) {
        return format!(
            "token_sha256 holds what looks like a token itself ({n} characters, not repeated here), not its SHA-256 (64 hex characters); config.toml keeps only the digest, and anyone who read this file has the token, so remove the entry (`ice token revoke`) and make a new token with `ice token add`"
        );
    }
    let hexish = value
        .chars()
        .all(|c| c.is_ascii_hexdigit() || c.is_ascii_whitespace());
    if !hexish && n > 8 {
        return format!(
            "token_sha256 ({n} characters, not repeated here in case it is a secret) is not the SHA-256 of a token (64 hex characters): it holds characters that are not hex digits"
        );
    }
    let shown = if n > 80 {
        let head: String = value.chars().take(16).collect();
        format!("\"{}…\"", head.escape_debug())
    } else {
        format!("{value:?}")
    };
    format!(
        "token_sha256 {shown} ({n} characters) is not the SHA-256 of a token (64 hex characters)"
    )
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

    /// Credentials that refuse everyone, because `why` (the configuration holding the tokens
    /// does not read): a server fails closed rather than keep tokens an operator may have
    /// meant to revoke, or take anonymous clients.
    pub fn unusable(why: impl Into<String>) -> Credentials {
        Credentials {
            entries: Vec::new(),
            unusable: Some(why.into()),
        }
    }

    /// Why these credentials refuse everyone, if they do.
    pub fn unusable_reason(&self) -> Option<&str> {
        self.unusable.as_deref()
    }

    /// Accept the token whose SHA-256 is `token_sha256` (64 hex characters) as `name`'s.
    ///
    /// Refused: a name the record cannot carry, a `token_sha256` that is not 64 hex
    /// characters, and a digest some entry already has (a token identifies one holder: two
    /// entries with one token would make whose call it is, and which role it has, depend on
    /// the order of the file). One name may hold several tokens (rotation).
    pub fn add(&mut self, role: Role, name: &str, token_sha256: &str) -> Result<(), String> {
        let who = format!("{} {name:?}", role.name());
        check_name(role, name)?;
        let raw = token_sha256.trim().to_ascii_lowercase();
        let mut digest = [0u8; 32];
        if raw.len() != 64 || hex::decode_to_slice(&raw, &mut digest).is_err() {
            return Err(format!("{who}: {}", bad_digest(token_sha256)));
        }
        if let Some(other) = self.entries.iter().find(|e| e.digest == digest) {
            return Err(if other.role == role && other.name == name {
                format!(
                    "{who}: the same token_sha256 is listed twice for this {}; remove one of the two entries",
                    role.name()
                )
            } else {
                format!(
                    "{who}: token_sha256 is also {} {:?}'s; a token has one holder, so each needs a token of its own (remove one entry, and make a new token with `ice token add`)",
                    other.role.name(),
                    other.name
                )
            });
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
        self.count(Role::Operator)
    }

    /// How many agent tokens there are.
    pub fn agents(&self) -> usize {
        self.count(Role::Agent)
    }

    /// How many metrics readers' tokens there are.
    pub fn metrics_readers(&self) -> usize {
        self.count(Role::Metrics)
    }

    /// The names of the agents that have a token.
    pub fn agent_names(&self) -> std::collections::BTreeSet<String> {
        self.entries
            .iter()
            .filter(|e| e.role == Role::Agent)
            .map(|e| e.name.clone())
            .collect()
    }

    fn count(&self, role: Role) -> usize {
        self.entries.iter().filter(|e| e.role == role).count()
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
pub struct CredentialStore {
    now: RwLock<Credentials>,
    /// Whether any credentials it held had an agent token (see [`CredentialStore::had_agents`]).
    had_agents: std::sync::atomic::AtomicBool,
}

impl CredentialStore {
    /// A store holding `c`.
    pub fn new(c: Credentials) -> Arc<CredentialStore> {
        let had = c.agents() > 0;
        Arc::new(CredentialStore {
            now: RwLock::new(c),
            had_agents: had.into(),
        })
    }

    /// Replace the credentials.
    pub fn replace(&self, c: Credentials) {
        if c.agents() > 0 {
            self.had_agents
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        match self.now.write() {
            Ok(mut g) => *g = c,
            Err(p) => *p.into_inner() = c,
        }
    }

    /// Whether the store has ever held an agent token: once one existed, revoking every agent
    /// token must not let a revoked token's holder back in by sending none.
    pub fn had_agents(&self) -> bool {
        self.had_agents.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many agent tokens there are now.
    pub fn agents(&self) -> usize {
        self.with(Credentials::agents)
    }

    /// The credentials now (a copy).
    pub fn get(&self) -> Credentials {
        self.with(Credentials::clone)
    }

    /// `f` of the credentials now, read in place (what every request's check does: no copy).
    pub fn with<R>(&self, f: impl FnOnce(&Credentials) -> R) -> R {
        match self.now.read() {
            Ok(g) => f(&g),
            Err(p) => f(&p.into_inner()),
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

/// The operator a request's token names, as the credentials are now (a live stream asks again
/// before each event, so revoking the token ends what it opened).
pub(crate) fn authenticate(
    state: &Shared,
    headers: &axum::http::HeaderMap,
) -> Result<Operator, ApiError> {
    state
        .credentials
        .with(|creds| operator_of(creds, &state.token_hint, headers))
}

fn operator_of(
    creds: &Credentials,
    token_hint: &str,
    headers: &axum::http::HeaderMap,
) -> Result<Operator, ApiError> {
    if creds.unusable.is_some() {
        return Err(ApiError::credentials_unavailable());
    }
    if creds.operators() == 0 {
        return Err(ApiError::unauthenticated(format!(
            "this installation has no operator token yet, so the operator API refuses every request; add one with `{token_hint}` and pass it as `Authorization: Bearer TOKEN`"
        )));
    }
    let Some(token) = bearer(headers)? else {
        return Err(ApiError::unauthenticated(
            "the operator API needs `Authorization: Bearer TOKEN` with an operator's token",
        ));
    };
    match creds.identify(token) {
        Some((Role::Operator, name)) => Ok(Operator(name.to_string())),
        Some((role, name)) => Err(role.refused(name, "operator endpoints")),
        None => Err(ApiError::unauthenticated(
            "the token is not one of this installation's (tokens are added with `ice token add`)",
        )),
    }
}

/// The bearer token of a request: `None` without an `Authorization` header, an error when the
/// header is not `Bearer TOKEN`.
fn bearer(headers: &axum::http::HeaderMap) -> Result<Option<&str>, ApiError> {
    // Every reader of a token refuses two: which one counted would be the server's choice.
    crate::single_authorization(headers)?;
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .filter(|t| !t.is_empty())
        .map(Some)
        .ok_or_else(|| ApiError::unauthenticated("the Authorization header must be `Bearer TOKEN`"))
}

/// Who may open MCP sessions (`/mcp` of `ice serve`), decided per request from its headers
/// and the tokens `store` holds now:
/// - an agent's token: that agent (`Ok(Some(name))`); its sessions' runs are recorded as
///   `agent:NAME`;
/// - no `Authorization` header, while the installation has no agent token, `store` has never
///   held one, and `anonymous` (the caller's rule: `ice serve` allows it on loopback):
///   `Ok(None)`, the run spec's agent;
/// - nothing while the credentials are unusable (503, see [`Credentials::unusable`]);
/// - otherwise refused: 401 without a token (or with an unknown one), 403 with an operator's
///   (operators decide; they do not propose). `hint` is the command that adds an agent token.
pub fn agent_of(
    store: &CredentialStore,
    anonymous: bool,
    hint: &str,
    headers: &axum::http::HeaderMap,
) -> Result<Option<String>, ApiError> {
    let token = bearer(headers)?;
    let anonymous = anonymous && !store.had_agents();
    store.with(|creds| match token {
        _ if creds.unusable.is_some() => Err(ApiError::credentials_unavailable()),
        None if anonymous && creds.agents() == 0 => Ok(None),
        None if creds.agents() == 0 => Err(ApiError::unauthenticated(format!(
            "MCP here needs an agent's token and this installation has none; add one with `{hint}` and send it as `Authorization: Bearer TOKEN` (anonymous clients are taken only by a server on loopback that has never had an agent token)"
        ))),
        None => Err(ApiError::unauthenticated(format!(
            "MCP here needs `Authorization: Bearer TOKEN` with an agent's token (`{hint}` makes one)"
        ))),
        Some(token) => match creds.identify(token) {
            Some((Role::Agent, name)) => Ok(Some(name.to_string())),
            Some((role, name)) => Err(role.refused(name, "MCP")),
            None => Err(ApiError::unauthenticated(
                "the token is not one of this installation's (tokens are added with `ice token add`)",
            )),
        },
    })
}

/// Who may read `/metrics` of `ice serve`: a metrics reader's token or an operator's (what the
/// counters tell is the installation's activity, which is not for anyone who can reach the
/// port); nothing while the credentials are unusable (503). `hint` is the command that adds a
/// metrics reader's token.
pub fn metrics_reader(
    store: &CredentialStore,
    hint: &str,
    headers: &axum::http::HeaderMap,
) -> Result<(), ApiError> {
    let token = bearer(headers)?;
    store.with(|creds| match token {
        _ if creds.unusable.is_some() => Err(ApiError::credentials_unavailable()),
        None => Err(ApiError::unauthenticated(format!(
            "/metrics needs `Authorization: Bearer TOKEN` with a metrics reader's token (`{hint}` makes one; Prometheus sends it with `authorization: {{credentials: TOKEN}}`) or an operator's"
        ))),
        Some(token) => match creds.identify(token) {
            Some((Role::Metrics | Role::Operator, _)) => Ok(()),
            Some((role, name)) => Err(role.refused(name, "/metrics")),
            None => Err(ApiError::unauthenticated(
                "the token is not one of this installation's (tokens are added with `ice token add`)",
            )),
        },
    })
}

/// `routes` (the metrics endpoint) behind [`metrics_reader`].
pub fn metrics_readers_only(
    routes: axum::Router,
    store: Arc<CredentialStore>,
    hint: String,
) -> axum::Router {
    routes.layer(axum::middleware::from_fn(
        move |req: Request, next: Next| {
            let check = metrics_reader(&store, &hint, req.headers());
            async move {
                match check {
                    Ok(()) => next.run(req).await,
                    Err(e) => e.into_response(),
                }
            }
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, HeaderValue, StatusCode};

    fn with(token: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(t) = token {
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(t).unwrap());
        }
        h
    }

    fn store(agents: &[(&str, &str)], operators: &[(&str, &str)]) -> Arc<CredentialStore> {
        let mut c = Credentials::new();
        for (name, token) in agents {
            c.add(Role::Agent, name, &token_digest(token)).unwrap();
        }
        for (name, token) in operators {
            c.add(Role::Operator, name, &token_digest(token)).unwrap();
        }
        CredentialStore::new(c)
    }

    fn status(r: Result<Option<String>, ApiError>) -> Result<Option<String>, StatusCode> {
        r.map_err(|e| e.status)
    }

    /// Whoever reads a token through this module refuses a request that carries two, even
    /// when the first alone would be accepted.
    #[test]
    fn two_authorization_headers_are_refused_by_every_token_reader() {
        let s = store(&[("bob", "agent-token")], &[("alice", "op-token")]);
        let mut h = with(Some("Bearer agent-token"));
        h.append(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer op-token"),
        );
        assert_eq!(
            status(agent_of(&s, true, "hint", &h)),
            Err(StatusCode::BAD_REQUEST)
        );
        let e = s
            .with(|c| operator_of(c, "hint", &h))
            .expect_err("two headers");
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.to_string().contains("2 Authorization headers"), "{e}");
    }

    #[test]
    fn mcp_sessions_need_an_agents_token_unless_none_exists_on_loopback() {
        let none = store(&[], &[("alice", "op-token")]);
        // No agent token yet: anonymous on loopback only.
        assert_eq!(status(agent_of(&none, true, "hint", &with(None))), Ok(None));
        assert_eq!(
            status(agent_of(&none, false, "hint", &with(None))),
            Err(StatusCode::UNAUTHORIZED)
        );
        // A header is always checked, whatever else holds.
        assert_eq!(
            status(agent_of(
                &none,
                true,
                "hint",
                &with(Some("Bearer op-token"))
            )),
            Err(StatusCode::FORBIDDEN)
        );
        assert_eq!(
            status(agent_of(&none, true, "hint", &with(Some("Bearer nope")))),
            Err(StatusCode::UNAUTHORIZED)
        );
        let some = store(&[("claude", "agent-token")], &[("alice", "op-token")]);
        for anonymous in [true, false] {
            assert_eq!(
                status(agent_of(&some, anonymous, "hint", &with(None))),
                Err(StatusCode::UNAUTHORIZED)
            );
            assert_eq!(
                status(agent_of(
                    &some,
                    anonymous,
                    "hint",
                    &with(Some("bearer  agent-token "))
                )),
                Ok(Some("claude".into()))
            );
            assert_eq!(
                status(agent_of(
                    &some,
                    anonymous,
                    "hint",
                    &with(Some("agent-token"))
                )),
                Err(StatusCode::UNAUTHORIZED),
                "not `Bearer TOKEN`"
            );
            assert_eq!(
                status(agent_of(
                    &some,
                    anonymous,
                    "hint",
                    &with(Some("Bearer op-token"))
                )),
                Err(StatusCode::FORBIDDEN)
            );
        }
        // Tokens added while serving count from then on.
        none.replace(some.get());
        assert_eq!(
            status(agent_of(&none, true, "hint", &with(None))),
            Err(StatusCode::UNAUTHORIZED)
        );
        // Revoking every agent token does not re-open the door to anonymous clients, even
        // when no MCP request came while the tokens existed.
        let revoked = store(&[("claude", "agent-token")], &[]);
        revoked.replace(Credentials::new());
        assert_eq!(
            status(agent_of(&revoked, true, "hint", &with(None))),
            Err(StatusCode::UNAUTHORIZED)
        );
    }

    #[test]
    fn metrics_are_read_with_a_metrics_readers_or_an_operators_token_only() {
        let s = store(&[("claude", "agent-token")], &[("alice", "op-token")]);
        let mut c = s.get();
        c.add(Role::Metrics, "prometheus", &token_digest("scrape-token"))
            .unwrap();
        s.replace(c);
        assert_eq!(s.get().metrics_readers(), 1);
        let read = |h| metrics_reader(&s, "hint", &with(h)).map_err(|e| e.status);
        assert_eq!(read(Some("Bearer scrape-token")), Ok(()));
        assert_eq!(read(Some("Bearer op-token")), Ok(()));
        assert_eq!(read(Some("Bearer agent-token")), Err(StatusCode::FORBIDDEN));
        assert_eq!(read(Some("Bearer nope")), Err(StatusCode::UNAUTHORIZED));
        assert_eq!(read(None), Err(StatusCode::UNAUTHORIZED));
        let none = metrics_reader(&s, "ice token add --metrics NAME", &with(None)).unwrap_err();
        assert!(
            none.message.contains("ice token add --metrics NAME"),
            "{}",
            none.message
        );
        // A metrics reader's token opens nothing else.
        let e = s
            .with(|c| operator_of(c, "hint", &with(Some("Bearer scrape-token"))))
            .unwrap_err();
        assert_eq!(e.status, StatusCode::FORBIDDEN);
        assert!(
            e.message.contains("metrics reader \"prometheus\""),
            "{}",
            e.message
        );
        assert_eq!(
            status(agent_of(
                &s,
                true,
                "hint",
                &with(Some("Bearer scrape-token"))
            )),
            Err(StatusCode::FORBIDDEN)
        );
        // Unusable credentials refuse metrics too.
        s.replace(Credentials::unusable("config.toml: bad"));
        assert_eq!(
            read(Some("Bearer scrape-token")),
            Err(StatusCode::SERVICE_UNAVAILABLE)
        );
        // Names follow the same rule as operators'.
        assert!(check_name(Role::Metrics, "prometheus-1").is_ok());
        let bad = check_name(Role::Metrics, "bad name").unwrap_err();
        assert!(bad.starts_with("metrics reader name \"bad name\""), "{bad}");
    }

    #[test]
    fn a_digest_that_is_not_64_hex_characters_or_is_anothers_is_refused() {
        let mut c = Credentials::new();
        for (bad, want) in [
            (
                "zz",
                "token_sha256 \"zz\" (2 characters) is not the SHA-256",
            ),
            ("", "token_sha256 \"\" (0 characters)"),
            (
                &"g".repeat(64),
                "(64 characters, not repeated here in case it is a secret) is not the SHA-256 of a token (64 hex characters): it holds characters that are not hex digits",
            ),
            (&"a".repeat(63), "(63 characters)"),
            (&"a".repeat(200), "\"aaaaaaaaaaaaaaaa…\" (200 characters)"),
        ] {
            let e = c.add(Role::Operator, "alice", bad).unwrap_err();
            assert!(e.starts_with("operator \"alice\": "), "{e}");
            assert!(e.contains(want), "{bad:?}: {e}");
        }
        // A token pasted where its digest belongs is not repeated in the message, however it
        // is written; nor is any other string that could be a secret.
        for (bad, like) in [
            ("ice_SECRETSECRETSECRET", true),
            ("Bearer ice_SECRETSECRETSECRET", true),
            ("'ice_SECRETSECRETSECRET'", true),
            ("\"ice_SECRETSECRETSECRET\"", true),
            ("ICE_SECRETSECRETSECRET", true),
            ("Ice_SECRETSECRETSECRET", true),
            ("the token: xice_SECRETSECRETSECRET", true),
            (" ice_SECRETSECRETSECRET ", true),
            ("Bearer SECRETSECRETSECRET", true),
            ("sk-SECRETSECRETSECRET", false),
        ] {
            let e = c.add(Role::Agent, "claude", bad).unwrap_err();
            let n = bad.chars().count();
            assert!(e.contains(&format!("{n} characters")), "{bad:?}: {e}");
            assert_eq!(
                e.contains("looks like a token itself"),
                like,
                "{bad:?}: {e}"
            );
            assert!(!e.contains("SECRET"), "{bad:?}: {e}");
        }
        assert_eq!(c.operators() + c.agents(), 0, "nothing bad was taken");
        // Upper case and surrounding blanks are the same digest.
        let d = token_digest("t1");
        c.add(Role::Operator, "alice", &format!(" {} ", d.to_uppercase()))
            .unwrap();
        // One token, one holder: the same digest again is refused, in any role.
        let e = c.add(Role::Operator, "alice", &d).unwrap_err();
        assert!(e.contains("listed twice"), "{e}");
        let e = c.add(Role::Agent, "bob", &d).unwrap_err();
        assert!(
            e.contains("agent \"bob\": token_sha256 is also operator \"alice\"'s"),
            "{e}"
        );
        let e = c.add(Role::Operator, "carol", &d).unwrap_err();
        assert!(e.contains("also operator \"alice\"'s"), "{e}");
        // One holder may have several tokens (rotation).
        c.add(Role::Operator, "alice", &token_digest("t2")).unwrap();
        assert_eq!(c.operators(), 2);
        assert_eq!(c.identify("t1"), Some((Role::Operator, "alice")));
        assert_eq!(c.agents(), 0);
    }

    #[test]
    fn unusable_credentials_refuse_everyone_until_replaced() {
        let s = store(&[], &[("alice", "op-token")]);
        s.replace(Credentials::unusable("config.toml:3: expected `=`"));
        assert_eq!(
            s.get().unusable_reason(),
            Some("config.toml:3: expected `=`")
        );
        // Anonymous MCP clients on loopback, and every token, get 503.
        for h in [None, Some("Bearer op-token"), Some("Bearer nope")] {
            let e = agent_of(&s, true, "hint", &with(h)).unwrap_err();
            assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(e.code, "credentials_unavailable");
            let e = s.with(|c| operator_of(c, "hint", &with(h))).unwrap_err();
            assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        }
        // A configuration that reads again is used at once.
        let mut c = Credentials::new();
        c.add(Role::Operator, "alice", &token_digest("op-token"))
            .unwrap();
        s.replace(c);
        assert_eq!(
            s.with(|c| operator_of(c, "hint", &with(Some("Bearer op-token"))))
                .map_err(|e| e.status),
            Ok(Operator("alice".into()))
        );
    }
}
