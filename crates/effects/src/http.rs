//! The HTTP adapter (`http.request`).
//!
//! A URL is parsed once, the WHATWG way ([`url`] crate), into an [`HttpTarget`], and everything
//! after that is decided on the parsed form: the host a policy and a grant name is the host the
//! parser found ([`ice_authority::Resource::host`] of it), the facts a policy reads
//! ([`policy_arguments`]: `url`, `scheme`, `host`, `port`, `path`, `query`) come from that same
//! parse, and [`HttpClient::send`] sends that target's serialisation, so what is checked is what
//! is contacted, byte for byte. The parser resolves dot segments (`/a/../b`, `/a/%2e%2e/b`) and
//! reads `\` as `/`; an escaped unreserved character (`%61dmin`) is decoded and every other
//! escape is written in upper case (`%2f` is `%2F`), in the path and the query: a policy on
//! `url`, `path` or `query` sees what the server will receive, in one spelling, never the text
//! the agent typed. A `%` that does not start an escape is refused. An escaped `/` or `\`
//! (`%2F`, `%5C`) stays escaped: it is not a segment separator to the URL, though some servers
//! decode it before routing (the starter policy refuses such paths, with other ambiguous ones).
//! The URL names its host as the resource does: one trailing dot is dropped, and an IPv6
//! address that embeds an IPv4 one (`[::ffff:10.0.0.1]`) is named, and sent, as that IPv4
//! address, so a policy sees one name per address. Numeric IPv4 forms
//! (`http://2130706433/`, `http://0x7f.1/`, `http://127.1/`) arrive as dotted quads, percent-
//! encoded hosts are decoded, upper case and one trailing dot are folded, and a fragment is
//! never part of the host (`http://evil.com#@allowed.com` is `evil.com`). URLs with user
//! information (`http://allowed.com@evil.com/`, `http://a:b@host/`) are refused: they are a
//! classic way to make a string look like another host, and ICE never sends credentials in a
//! URL. Only `http` and `https` are accepted.
//!
//! A request is refused, before any connection, unless the authorization is `http.request` on
//! exactly the parsed host and its effect class covers the method (`GET` and `HEAD` are
//! `read`; every other method is `external`, as the capability registry classifies them, so a
//! `GET` authorization cannot make a `POST`). Redirects are **not followed**: a 3xx is
//! returned as the response (its `Location` in the evidence), since following it would contact
//! a host nobody authorised. No proxy from the environment is used: the connection goes to the
//! authorised host itself. Names are resolved by the system resolver; a client made
//! [`HttpClient::with_admission`] puts every address the host resolves to (an IP literal
//! resolves to itself) before an admission check (the runtime's: the run's `http.connect`
//! forbids), refuses the request if any is refused, and connects only to the addresses it
//! checked, so a name cannot lead past a policy that forbids an address (`169.254.169.254`,
//! say), nor be re-resolved to another between the check and the connection. The addresses
//! are in the evidence (`http.addresses`).
//!
//! # Client
//!
//! `ureq` 3 with `rustls` on the `ring` provider (webpki roots; no gzip, no cookies, no
//! native TLS). It was chosen over `reqwest` because it is much lighter to build here: no
//! `hyper`, `hyper-util`, `tower`, `h2` or `http-body` stack, and no build script needing more
//! than a C compiler (`ring`); it exposes exactly the knobs this adapter needs (a global
//! timeout, zero redirects returned as responses, status codes not turned into errors, no
//! proxy). It is blocking: the tokio runtime calls [`HttpClient::request`] from
//! `spawn_blocking`. Each request makes its own connection (and resolves the name once, through
//! the admission check); nothing is pooled between requests.

use std::io::Read;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ice_authority::{Authorization, Classifier, EffectClass, Resource};
use serde_json::json;
use ureq::http;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{
    ConnectionDetails, Connector, DefaultConnector, NextTimeout, Transport,
};
use url::Url;

use crate::auth::{
    AuthorizationError, cap_bytes, cap_time, require, require_bytes, require_effect,
};
use crate::evidence::{Detail, Digested, Evidence};
use crate::limits::{MAX_HTTP_HEADERS, MAX_URL_LEN};

/// Why a URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// It does not parse as a URL.
    #[error("{url:?}: not a URL: {problem}")]
    Parse {
        /// The URL as given (cut to 200 bytes).
        url: String,
        /// The parser's reason.
        problem: String,
    },
    /// Its scheme is not `http` or `https`.
    #[error("{url:?}: scheme {scheme:?} is not http or https")]
    Scheme {
        /// The URL as given.
        url: String,
        /// Its scheme.
        scheme: String,
    },
    /// It carries user information (`user@host`, `user:password@host`).
    #[error("{url:?}: carries user information before the host (user@host); refused")]
    UserInfo {
        /// The URL as given.
        url: String,
    },
    /// It has no host.
    #[error("{url:?}: has no host")]
    NoHost {
        /// The URL as given.
        url: String,
    },
    /// Its host is not one ICE can name.
    #[error("{url:?}: host {host:?}: {problem}")]
    Host {
        /// The URL as given.
        url: String,
        /// The parsed host.
        host: String,
        /// What is wrong.
        problem: String,
    },
}

fn cut(url: &str) -> String {
    let mut end = url.len().min(200);
    while !url.is_char_boundary(end) {
        end -= 1;
    }
    url[..end].to_string()
}

/// A parsed request target: the URL (fragment removed) and its host as a resource, and the
/// text it was parsed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTarget {
    url: Url,
    host: Resource,
    given: String,
}

impl HttpTarget {
    /// The URL as it will be sent (the parser's serialisation, without fragment).
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The URL as it will be sent, as text: what a policy decides on and the request carries.
    pub fn as_str(&self) -> &str {
        self.url.as_str()
    }

    /// The text this target was parsed from, as the agent gave it (for the record: it may differ
    /// from [`HttpTarget::as_str`], which is what was decided on and sent).
    pub fn given(&self) -> &str {
        &self.given
    }

    /// The host as a resource (`Host::"127.0.0.1"`): what a grant must name.
    pub fn host(&self) -> &Resource {
        &self.host
    }

    /// The port that will be contacted.
    pub fn port(&self) -> u16 {
        // http and https always have a known default port.
        self.url.port_or_known_default().unwrap_or(0)
    }
}

/// Parse a URL for an HTTP request: WHATWG parsing; `http` or `https` only; no user
/// information; the host canonicalised by [`Resource::host`].
pub fn parse_target(url: &str) -> Result<HttpTarget, UrlError> {
    if url.len() > MAX_URL_LEN {
        return Err(UrlError::Parse {
            url: cut(url),
            problem: format!("longer than {MAX_URL_LEN} bytes"),
        });
    }
    let mut parsed = Url::parse(url).map_err(|e| UrlError::Parse {
        url: cut(url),
        problem: e.to_string(),
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(UrlError::Scheme {
            url: cut(url),
            scheme: parsed.scheme().to_string(),
        });
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(UrlError::UserInfo { url: cut(url) });
    }
    let host_text = match parsed.host() {
        Some(url::Host::Domain(name)) => name.to_string(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        None => return Err(UrlError::NoHost { url: cut(url) }),
    };
    let host = Resource::host(&host_text).map_err(|e| UrlError::Host {
        url: cut(url),
        host: host_text.clone(),
        problem: e.problem,
    })?;
    // The URL names its host as the resource does, so `url`, `host` and the connection all say
    // one name: a name without its trailing dot, and an IPv6 address that embeds an IPv4 one
    // as that IPv4 address (see `Resource::host`).
    let named = host.entity_id();
    let rewritten = match (parsed.host(), named.parse::<std::net::Ipv4Addr>()) {
        (Some(url::Host::Ipv6(_)), Ok(v4)) => parsed.set_ip_host(std::net::IpAddr::V4(v4)),
        (Some(url::Host::Domain(d)), _) if d != named => {
            parsed.set_host(Some(&named)).map_err(|_| ())
        }
        _ => Ok(()),
    };
    let same = match parsed.host() {
        Some(url::Host::Domain(d)) => d == named,
        Some(url::Host::Ipv4(ip)) => ip.to_string() == named,
        Some(url::Host::Ipv6(ip)) => ip.to_string() == named,
        None => false,
    };
    if rewritten.is_err() || !same {
        return Err(UrlError::Host {
            url: cut(url),
            host: host_text,
            problem: format!("cannot be written as {named}"),
        });
    }
    parsed.set_fragment(None);
    // One spelling per path and query: an escaped unreserved character (`%61dmin`) is that
    // character (RFC 3986 §6.2.2.2: the server reads the two alike, so a policy must too), and
    // every other escape is written in upper case (`%2f` is `%2F`). Setting the path again
    // resolves any dot segment the decoding spelled out.
    // A `%` that does not start an escape is refused: decoding the escapes after it could
    // make it one (`/%6%31dmin` would read `/%61dmin`, which a server reads as `/admin`).
    let stray = |part: &str| UrlError::Parse {
        url: cut(url),
        problem: format!("its {part} has a `%` that is not followed by two hex digits"),
    };
    let path = normalize_escapes(parsed.path()).ok_or_else(|| stray("path"))?;
    if let Some(seq) = overlong_escape(&path) {
        return Err(UrlError::Parse {
            url: cut(url),
            problem: format!(
                "its path escapes an overlong UTF-8 sequence (`{seq}`), which some servers read as an ASCII character (`%C0%AE` as `.`) that a policy on the path would not see"
            ),
        });
    }
    if path != parsed.path() {
        parsed.set_path(&path);
    }
    if let Some(query) = parsed.query() {
        let query = normalize_escapes(query).ok_or_else(|| stray("query"))?;
        if Some(query.as_str()) != parsed.query() {
            parsed.set_query(Some(&query));
        }
    }
    if parsed.as_str().len() > MAX_URL_LEN {
        return Err(UrlError::Parse {
            url: cut(url),
            problem: format!("longer than {MAX_URL_LEN} bytes once parsed"),
        });
    }
    Ok(HttpTarget {
        url: parsed,
        host,
        given: url.to_string(),
    })
}

/// The first escaped byte sequence in `path` (whose escapes [`normalize_escapes`] wrote in upper
/// case) that is the start of an overlong UTF-8 encoding: `C0` or `C1` (never valid: each spells
/// an ASCII character in two bytes), `E0` then `80`–`9F`, or `F0` then `80`–`8F` (characters
/// written in more bytes than they need). Refused in the path only: a query may carry arbitrary
/// escaped bytes (binary ids), and nothing resolves dot segments in it.
fn overlong_escape(path: &str) -> Option<&str> {
    path.match_indices('%').find_map(|(i, _)| {
        let rest = &path[i..];
        let overlong = ["%C0", "%C1", "%E0%8", "%E0%9", "%F0%8"]
            .iter()
            .any(|p| rest.starts_with(p));
        overlong.then(|| rest.get(..6).unwrap_or(&rest[..3]))
    })
}

/// `text` with each percent-escape of an unreserved character (`A-Z a-z 0-9 - . _ ~`) decoded
/// and every other escape's hex digits in upper case; `None` if a `%` does not start an escape.
fn normalize_escapes(text: &str) -> Option<String> {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' {
            let h = b.get(i + 1).copied().and_then(hex)?;
            let l = b.get(i + 2).copied().and_then(hex)?;
            let c = (h * 16 + l) as u8;
            if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                out.push(c as char);
            } else {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                out.push('%');
                out.push(char::from(HEX[usize::from(c >> 4)]));
                out.push(char::from(HEX[usize::from(c & 15)]));
            }
            i += 3;
            continue;
        }
        // Not an escape: copy up to the next `%` (always a character boundary).
        let next = b[i + 1..]
            .iter()
            .position(|&c| c == b'%')
            .map_or(b.len(), |k| i + 1 + k);
        out.push_str(&text[i..next]);
        i = next;
    }
    Some(out)
}

/// The method of an `http.request` call from its arguments, as the runtime sends it and a policy
/// sees it: `method` in upper case, `GET` when absent.
pub fn method_of(arguments: &serde_json::Value) -> String {
    arguments
        .get("method")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("GET")
        .to_ascii_uppercase()
}

/// What a policy sees of an `http.request` call (`context.arguments`, as ICE's schema declares
/// it), all from the one parse that is also sent: `method` ([`method_of`] the call's
/// arguments), `url` (the serialisation [`HttpClient::send`] sends, not the text the agent
/// gave), `scheme` (`http` or `https`), `host` (the host as the resource names it: lower case,
/// IPv6 without brackets), `port` (the port contacted: the URL's, else the scheme's default),
/// `path` (percent-encoded as sent, dot segments resolved) and `query` (after the `?`, as sent;
/// empty when there is none). The runtime and `ice policy explain` both build a request's
/// arguments with this function.
pub fn policy_arguments(target: &HttpTarget, arguments: &serde_json::Value) -> serde_json::Value {
    json!({
        "method": method_of(arguments),
        "url": target.as_str(),
        "scheme": target.url.scheme(),
        "host": target.host.entity_id(),
        "port": target.port(),
        "path": target.url.path(),
        "query": target.url.query().unwrap_or(""),
    })
}

/// Limits of one client's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// The whole request, from resolving the name to the end of the response body.
    pub timeout: Duration,
    /// The most response body bytes kept; a longer body is cut and marked truncated.
    pub max_response_bytes: u64,
}

impl Default for HttpLimits {
    fn default() -> HttpLimits {
        HttpLimits {
            timeout: Duration::from_secs(30),
            max_response_bytes: 10 * 1024 * 1024,
        }
    }
}

/// An HTTP request as an agent proposes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    /// The method, case-sensitive (`GET`, `POST`, …).
    pub method: String,
    /// The URL.
    pub url: String,
    /// Extra request headers. `Host`, `Content-Length`, `Transfer-Encoding`, `Connection`,
    /// `TE`, `Upgrade` and `Proxy-*` are refused: the adapter sets what framing needs, and the
    /// host is the URL's.
    pub headers: Vec<(String, String)>,
    /// The request body (must be empty for `GET` and `HEAD`).
    pub body: Vec<u8>,
}

/// The response to an HTTP request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// The status code (a redirect is a response like any other).
    pub status: u16,
    /// The response headers, in order (values that are not UTF-8 are decoded lossily).
    pub headers: Vec<(String, String)>,
    /// The body, up to the limit.
    pub body: Vec<u8>,
    /// Whether the body was cut at the limit.
    pub body_truncated: bool,
    /// The evidence of the request (an `APIRequestExecuted` event's payload).
    pub evidence: Evidence,
}

/// Why an HTTP request failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The URL was refused.
    #[error(transparent)]
    Url(#[from] UrlError),
    /// The authorization does not cover the request.
    #[error(transparent)]
    Refused(Box<AuthorizationError>),
    /// The request itself is not one the adapter sends (method, header, body).
    #[error("request refused: {0}")]
    Request(String),
    /// The request ran out of time.
    #[error("{url}: timed out after {timeout:?}")]
    Timeout {
        /// The URL.
        url: String,
        /// The limit.
        timeout: Duration,
    },
    /// The host's name resolves to an address the admission check refused; nothing was sent.
    #[error("{host} resolves to {address}, which is refused: {why}")]
    AddressRefused {
        /// The host's name.
        host: String,
        /// The address refused.
        address: std::net::IpAddr,
        /// Why.
        why: String,
    },
    /// The request failed after its connection was made: it may have reached the server in
    /// part or whole, and what the server did with it is unknown. `evidence` is what was sent
    /// and where (with the response's status if one came before the failure).
    #[error("{error}")]
    Unanswered {
        /// The failure (a timeout or a transport error).
        error: Box<HttpError>,
        /// The request's evidence.
        evidence: Box<Evidence>,
    },
    /// The connection, TLS or HTTP exchange failed.
    #[error("{url}: {source}")]
    Transport {
        /// The URL.
        url: String,
        /// The client's error.
        #[source]
        source: Box<ureq::Error>,
    },
}

/// The last link of the client's connector chain: notes that a connection was made (TCP, and
/// TLS for https) and passes it on.
#[derive(Debug)]
struct Connected(Arc<std::sync::atomic::AtomicBool>);

impl<In: Transport> Connector<In> for Connected {
    type Out = In;

    fn connect(
        &self,
        _: &ConnectionDetails,
        chained: Option<In>,
    ) -> Result<Option<In>, ureq::Error> {
        if chained.is_some() {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(chained)
    }
}

impl From<AuthorizationError> for HttpError {
    fn from(e: AuthorizationError) -> HttpError {
        HttpError::Refused(Box::new(e))
    }
}

/// Methods the adapter sends: the ones the kernel's schema names.
const METHODS: [&str; 7] = ice_kernel::builtin::HTTP_METHODS;

/// Request headers the adapter sets itself or refuses outright.
fn forbidden_header(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    matches!(
        name.as_str(),
        "host"
            | "content-length"
            | "transfer-encoding"
            | "connection"
            | "te"
            | "upgrade"
            | "keep-alive"
    ) || name.starts_with("proxy-")
}

/// An HTTP client bound to limits; requests go through [`HttpClient::request`].
#[derive(Clone)]
pub struct HttpClient {
    config: ureq::config::Config,
    limits: HttpLimits,
    admit: Admission,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// An admission check on the addresses a host's name resolves to: `Err(why)` refuses one. An
/// IPv6 address that reaches an IPv4 one is given as that IPv4 address
/// ([`ice_authority::connection_address`]).
pub type Admission = Arc<dyn Fn(IpAddr) -> Result<(), String> + Send + Sync>;

/// What one request's resolution found: every address checked, and the one refused.
#[derive(Default)]
struct Resolution {
    addresses: Vec<IpAddr>,
    refused: Option<(String, IpAddr, String)>,
}

/// The system resolver, with every address it returns put before an admission check; the
/// request connects only to what it returns. One per request, so what it records is that
/// request's.
struct AdmittingResolver {
    inner: DefaultResolver,
    admit: Admission,
    seen: Arc<Mutex<Resolution>>,
}

impl std::fmt::Debug for AdmittingResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdmittingResolver").finish_non_exhaustive()
    }
}

impl Resolver for AdmittingResolver {
    fn resolve(
        &self,
        uri: &http::Uri,
        config: &ureq::config::Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let addrs = self.inner.resolve(uri, config, timeout)?;
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        for addr in addrs.iter() {
            seen.addresses.push(addr.ip());
            // Checked as the IPv4 address it reaches, if it reaches one (`::ffff:127.0.0.1`).
            if let Err(why) = (self.admit)(ice_authority::connection_address(addr.ip())) {
                let host = uri.host().unwrap_or_default().to_string();
                let message = format!("{host} resolves to {}, which is refused: {why}", addr.ip());
                seen.refused = Some((host, addr.ip(), why));
                return Err(ureq::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    message,
                )));
            }
        }
        Ok(addrs)
    }
}

impl HttpClient {
    /// A client with these limits: no redirects followed, status codes returned as responses,
    /// no proxy.
    pub fn new(limits: HttpLimits) -> HttpClient {
        HttpClient::with_admission(limits, Arc::new(|_| Ok(())))
    }

    /// [`HttpClient::new`], with every address a host's name resolves to put before `admit`:
    /// a request whose host resolves to any address it refuses fails with
    /// [`HttpError::AddressRefused`] before anything is sent.
    pub fn with_admission(limits: HttpLimits, admit: Admission) -> HttpClient {
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(limits.timeout))
            .max_redirects(0)
            .http_status_as_error(false)
            .proxy(None)
            .user_agent(concat!("ice/", env!("CARGO_PKG_VERSION")))
            .build();
        HttpClient {
            config,
            limits,
            admit,
        }
    }

    /// The client's limits.
    pub fn limits(&self) -> HttpLimits {
        self.limits
    }

    /// Send `request` under `auth` (`http.request` on exactly the URL's parsed host, with an
    /// effect class that covers the method): [`parse_target`] its URL, then [`HttpClient::send`].
    pub fn request(
        &self,
        auth: &Authorization,
        request: &HttpRequest,
    ) -> Result<HttpResponse, HttpError> {
        let target = parse_target(&request.url)?;
        self.send(
            auth,
            &target,
            &request.method,
            &request.headers,
            &request.body,
        )
    }

    /// Send `method` to `target` (parsed once, before a policy decided on it) under `auth`
    /// (`http.request` on exactly the target's host, with an effect class that covers the
    /// method). The request line carries [`HttpTarget::as_str`], exactly what the policy saw.
    /// Everything is checked before any connection. The grant's constraints tighten the client's
    /// limits: a body over its `max_bytes` is refused, the response is cut at what is left of it,
    /// and its `timeout_ms` bounds the request.
    pub fn send(
        &self,
        auth: &Authorization,
        target: &HttpTarget,
        method: &str,
        headers: &[(String, String)],
        request_body: &[u8],
    ) -> Result<HttpResponse, HttpError> {
        require(auth, "http.request", target.host())?;
        let effect = method_effect(method);
        require_effect(auth, effect)?;
        if !METHODS.contains(&method) {
            return Err(HttpError::Request(format!(
                "method {method:?} is not one of {}",
                METHODS.join(", ")
            )));
        }
        if matches!(method, "GET" | "HEAD") && !request_body.is_empty() {
            return Err(HttpError::Request(format!(
                "a {method} request has no body"
            )));
        }
        require_bytes(auth, "the request body", request_body.len() as u64)?;
        if headers.len() > MAX_HTTP_HEADERS {
            return Err(HttpError::Request(format!(
                "more than {MAX_HTTP_HEADERS} headers"
            )));
        }
        let mut builder = http::Request::builder().method(method).uri(target.as_str());
        for (name, value) in headers {
            if forbidden_header(name) {
                return Err(HttpError::Request(format!(
                    "header {name:?} is set by the adapter, not the request"
                )));
            }
            let name = http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| HttpError::Request(format!("header name {name:?}: {e}")))?;
            let value = http::HeaderValue::from_str(value)
                .map_err(|e| HttpError::Request(format!("header {name}: {e}")))?;
            builder = builder.header(name, value);
        }
        let built = builder
            .body(request_body.to_vec())
            .map_err(|e| HttpError::Request(e.to_string()))?;
        // The grant's constraints can only tighten the client's limits.
        let timeout = cap_time(auth, self.limits.timeout);
        let limit = cap_bytes(
            auth,
            request_body.len() as u64,
            self.limits.max_response_bytes,
        );
        // An agent of its own: its resolver records this request's addresses, and it connects
        // only to those (nothing resolves the name again between the check and the connection).
        let seen = Arc::new(Mutex::new(Resolution::default()));
        let resolver = AdmittingResolver {
            inner: DefaultResolver::default(),
            admit: self.admit.clone(),
            seen: seen.clone(),
        };
        // Whether a connection was made: past it, a failure may follow a request the server
        // received.
        let connected = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let agent = ureq::Agent::with_parts(
            self.config.clone(),
            DefaultConnector::new().chain(Connected(connected.clone())),
            resolver,
        );
        let built = agent
            .configure_request(built)
            .timeout_global(Some(timeout))
            .build();
        // Assert in pairs: the client's own reading of the URL must name the same host and
        // port the authorization was checked against, and the same path and query the policy
        // decided on (the request line it will send).
        let uri_host = built.uri().host().map(Resource::host);
        let uri_port = built.uri().port_u16().or(match built.uri().scheme_str() {
            Some("https") => Some(443),
            Some("http") => Some(80),
            _ => None,
        });
        let sent_path = built.uri().path_and_query().map(|p| p.as_str());
        let decided_path = &target.url()[url::Position::BeforePath..url::Position::AfterQuery];
        if !matches!(&uri_host, Some(Ok(h)) if h == target.host())
            || uri_port != Some(target.port())
            || sent_path != Some(decided_path)
        {
            return Err(HttpError::Request(format!(
                "the client reads {} differently from the URL parser",
                target.url()
            )));
        }
        let url = target.url().to_string();
        let transport = |e: ureq::Error| match e {
            ureq::Error::Timeout(_) => HttpError::Timeout {
                url: url.clone(),
                timeout,
            },
            other => HttpError::Transport {
                url: url.clone(),
                source: Box::new(other),
            },
        };
        let sent = if request_body.is_empty() {
            agent.run(built.map(|_| ()))
        } else {
            agent.run(built)
        };
        let resolution = std::mem::take(&mut *seen.lock().unwrap_or_else(PoisonError::into_inner));
        let addresses: Vec<String> = resolution
            .addresses
            .iter()
            .map(ToString::to_string)
            .collect();
        // The evidence of a request that went out, with what came back of a response.
        let evidence =
            |status: Option<u16>, location: Option<String>, body: &[u8], cut: bool| Evidence {
                effect,
                capability: "http.request".into(),
                target: target.host().clone(),
                grant: Some(auth.grant().to_string()),
                inputs: vec![Digested::of("request_body", request_body)],
                outputs: vec![Digested::of("response_body", body)],
                detail: Detail::Http {
                    method: method.to_string(),
                    url: url.clone(),
                    status,
                    location,
                    body_truncated: cut,
                    addresses: addresses.clone(),
                },
            };
        let unanswered = |e: HttpError, status: Option<u16>| {
            if connected.load(std::sync::atomic::Ordering::Relaxed) {
                HttpError::Unanswered {
                    error: Box::new(e),
                    evidence: Box::new(evidence(status, None, &[], false)),
                }
            } else {
                e
            }
        };
        let response = sent.map_err(|e| match resolution.refused {
            Some((host, address, why)) => HttpError::AddressRefused { host, address, why },
            None => unanswered(transport(e), None),
        })?;
        let status = response.status().as_u16();
        let headers: Vec<(String, String)> = response
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let location = if (300..400).contains(&status) {
            response
                .headers()
                .get(http::header::LOCATION)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        } else {
            None
        };
        let mut body = Vec::new();
        let reader = response
            .into_body()
            .into_with_config()
            .limit(u64::MAX)
            .reader();
        reader
            .take(limit.saturating_add(1))
            .read_to_end(&mut body)
            .map_err(|e| unanswered(transport(ureq::Error::from(e)), Some(status)))?;
        let body_truncated = body.len() as u64 > limit;
        if body_truncated {
            body.truncate(limit as usize);
        }
        let evidence = evidence(Some(status), location, &body, body_truncated);
        Ok(HttpResponse {
            status,
            headers,
            body,
            body_truncated,
            evidence,
        })
    }
}

/// The class an HTTP method has, as the capability registry classifies it.
pub fn method_effect(method: &str) -> EffectClass {
    Classifier::HttpMethod.classify(&json!({ "method": method }))
}
