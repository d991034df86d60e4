//! The LLM driver: a tool-calling loop against any OpenAI-compatible chat-completions endpoint
//! (OpenAI, Ollama, llama.cpp server, vLLM, …).
//!
//! ```toml
//! [agent.llm]
//! base_url = "http://127.0.0.1:8080/v1"   # POST {base_url}/chat/completions
//! model = "qwen2.5-7b-instruct"
//! api_key_env = "OPENAI_API_KEY"          # optional: the variable holding the key
//! task = "Fix the typo in README.md"      # the user message
//! system = "Be brief."                    # optional, added to ICE's preamble
//! max_tokens = 1024                       # per call
//! temperature = 0.2                       # optional
//! max_steps = 16                          # model calls per run
//! timeout = "120s"                        # per call: ms, s, m or h
//! max_errors = 3                          # consecutive failed calls before giving up
//! ```
//!
//! The driver only proposes (A-002). It offers the model the run's built-in capabilities
//! (`fs_read`, `fs_list`, `fs_write`, `fs_delete`, `http_request`, `process_exec`) and the MCP tools in
//! [`AgentView::tools`] (`mcp__{server}__{tool}`) as functions; each tool call the model makes
//! becomes a [`Proposal::Request`], and the runtime's answer goes back to the model as the tool's
//! result. Each model call is a [`Proposal::Infer`] then [`Agent::infer`], recorded by the
//! runtime as `InferenceStep` with the full reply (or the error), so a run can be replayed
//! without the model: [`RecordedModel`] answers from the recorded payloads and reports where the
//! replayed conversation diverges from the recording. The driver acts on the reply as the log
//! will read it back (see `recordable`), so a live run and its replay see the same values.
//!
//! A call is costed the token usage the reply reports; a figure it does not report (missing,
//! or not a whole number) is costed at the call's reservation and named in the payload's
//! `usage.unreported`, so a token budget still stops an endpoint that omits its usage. A call
//! that failed after the provider may have generated its tokens (a timeout, a 2xx body that is
//! not JSON or too large) is costed at its reservation too; a refused or unreachable one is
//! costed nothing. At most
//! [`MAX_TOOL_CALLS_PER_REPLY`] tool calls are read from one reply; the rest are refused, the
//! refusal recorded (`tool_calls_over_limit`) and the model told once.
//!
//! Everything the driver sends is a pure function of the configuration, the view at the first
//! proposal, the replies and the outcomes: the next request (and its digest) never depends on
//! the clock or on anything not recorded.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::io::Read;
use std::time::{Duration, Instant};

use ice_kernel::blob::BLOB_KEY;
use ice_kernel::limits::MAX_SAFE_INTEGER;
use ice_kernel::{
    Agent, AgentError, AgentView, BUILTIN_TOOLS, BuiltinTool, CapabilityProposal, Cost, Digest,
    Inference, Interrupt, Outcome, Payload, Proposal,
};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value, json};

/// Default `max_tokens` per call.
pub const DEFAULT_MAX_TOKENS: u64 = 1024;
/// Default number of model calls per run.
pub const DEFAULT_MAX_STEPS: u64 = 16;
/// Default timeout of one call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// Default number of consecutive failed calls before the driver gives up.
pub const DEFAULT_MAX_ERRORS: u64 = 3;
/// Largest `max_tokens`.
pub const MAX_MAX_TOKENS: u64 = 1 << 20;
/// Largest `max_steps`.
pub const MAX_MAX_STEPS: u64 = 10_000;
/// Largest `max_errors`.
pub const MAX_MAX_ERRORS: u64 = 100;
/// Longest `timeout`.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
/// Largest reply body [`HttpModel`] reads.
pub const MAX_REPLY_BYTES: u64 = 8 << 20;
/// Largest request sent: the conversation (every reply's text and every tool result so far is
/// sent back each call) ends the run rather than grow past it. No provider takes a prompt this
/// large (the largest context windows hold a few million tokens), and memory stays bounded
/// whatever `max_steps` allows.
pub const MAX_REQUEST_BYTES: u64 = 16 << 20;

/// The shortest API key taken out of what is recorded; a shorter value is a placeholder
/// (local servers take `EMPTY`, `dummy`, `ollama`), not a secret.
pub const MIN_REDACTED_KEY_LEN: usize = 8;

/// How often a model call waiting for its answer looks at its interrupt.
const INTERRUPT_POLL: Duration = Duration::from_millis(50);
/// Longest wait a server's `Retry-After` (on 429 or 503) gets before the next call.
pub const MAX_RETRY_WAIT: Duration = Duration::from_secs(60);
/// Longest intent taken from the model's text (characters).
pub const MAX_INTENT_CHARS: usize = 500;
/// Largest tool result passed back to the model (bytes of compact JSON); longer ones are cut.
pub const MAX_TOOL_RESULT_BYTES: usize = 64 * 1024;
/// Longest function name a provider accepts.
pub const MAX_FUNCTION_NAME: usize = 64;
/// Deepest nesting of a reply kept as structure; deeper parts are recorded as their JSON text.
pub const MAX_REPLY_DEPTH: usize = 48;
/// Most tool calls read from one reply; the rest are refused, once, and the model told so.
pub const MAX_TOOL_CALLS_PER_REPLY: usize = 128;

/// ICE's fixed system preamble.
pub const PREAMBLE: &str = "You are an agent running inside ICE, a governed execution runtime. \
You act only through the tools offered to you: every call is checked against the run's policy \
and budget and recorded, and it may be denied (a denied call comes back as a tool result that \
starts with DENIED). File paths are relative to the run's workspace; writes are staged and \
kept only if the run passes validation when you finish. When the task is done, reply with a \
short summary of what you did and call no tool.";

// ---------------------------------------------------------------------------------------------
// Configuration.

/// The `[agent.llm]` table of a run spec.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmConfig {
    /// The API root, e.g. `http://127.0.0.1:8080/v1` (http or https).
    pub base_url: String,
    /// The model name sent with each request.
    pub model: String,
    /// The environment variable holding the API key (sent as `Authorization: Bearer`), if any.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// What the agent must do (the user message).
    pub task: String,
    /// Extra system text, after ICE's preamble.
    #[serde(default)]
    pub system: Option<String>,
    /// `max_tokens` of each call.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u64,
    /// Sampling temperature, when set.
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Most model calls per run.
    #[serde(default = "default_max_steps")]
    pub max_steps: u64,
    /// Timeout of one call (`"60s"`, `"1500ms"`, `"2m"`, `"1h"`).
    #[serde(default = "default_timeout", deserialize_with = "de_timeout")]
    pub timeout: Duration,
    /// Consecutive provider errors or unusable replies before the driver gives up.
    #[serde(default = "default_max_errors")]
    pub max_errors: u64,
}

fn default_max_tokens() -> u64 {
    DEFAULT_MAX_TOKENS
}
fn default_max_steps() -> u64 {
    DEFAULT_MAX_STEPS
}
fn default_timeout() -> Duration {
    DEFAULT_TIMEOUT
}
fn default_max_errors() -> u64 {
    DEFAULT_MAX_ERRORS
}
fn de_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(|e| serde::de::Error::custom(format!("`timeout`: {e}")))
}

#[derive(Clone, Copy)]
enum FieldType {
    Text,
    Count,
    Number,
}

const FIELDS: [(&str, FieldType); 10] = [
    ("base_url", FieldType::Text),
    ("model", FieldType::Text),
    ("api_key_env", FieldType::Text),
    ("task", FieldType::Text),
    ("system", FieldType::Text),
    ("max_tokens", FieldType::Count),
    ("temperature", FieldType::Number),
    ("max_steps", FieldType::Count),
    ("timeout", FieldType::Text),
    ("max_errors", FieldType::Count),
];

/// Parse a duration: a whole number followed by `ms`, `s`, `m` or `h` (`"60s"`, `"1500ms"`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let bad = || format!("{text:?} is not a duration (a whole number and ms, s, m or h: \"60s\")");
    if digits.is_empty() {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let per = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(bad()),
    };
    n.checked_mul(per)
        .map(Duration::from_millis)
        .ok_or_else(bad)
}

impl LlmConfig {
    /// A configuration with the defaults for everything but the endpoint, model and task.
    pub fn new(
        base_url: impl Into<String>,
        model: impl Into<String>,
        task: impl Into<String>,
    ) -> LlmConfig {
        LlmConfig {
            base_url: base_url.into(),
            model: model.into(),
            api_key_env: None,
            task: task.into(),
            system: None,
            max_tokens: DEFAULT_MAX_TOKENS,
            temperature: None,
            max_steps: DEFAULT_MAX_STEPS,
            timeout: DEFAULT_TIMEOUT,
            max_errors: DEFAULT_MAX_ERRORS,
        }
    }

    /// Parse and check the `[agent.llm]` table (converted to JSON). Errors name the field.
    ///
    /// The API key itself is read (and its absence reported) by [`HttpModel::new`], so a
    /// recorded run can be replayed where the key is not set.
    pub fn from_value(value: &Value) -> Result<LlmConfig, String> {
        let Value::Object(map) = value else {
            return Err("[agent.llm] must be a table".into());
        };
        for (key, v) in map {
            let Some((_, ty)) = FIELDS.iter().find(|(name, _)| name == key) else {
                let known: Vec<&str> = FIELDS.iter().map(|(n, _)| *n).collect();
                return Err(format!(
                    "[agent.llm] unknown field `{key}`; expected one of {}",
                    known.join(", ")
                ));
            };
            let ok = match ty {
                FieldType::Text => v.is_string(),
                FieldType::Count => v.is_u64(),
                FieldType::Number => v.is_number(),
            };
            if !ok {
                let want = match ty {
                    FieldType::Text => "a string",
                    FieldType::Count => "a whole number ≥ 0",
                    FieldType::Number => "a number",
                };
                return Err(format!("[agent.llm] `{key}` must be {want}, not {v}"));
            }
        }
        let config: LlmConfig =
            serde_json::from_value(value.clone()).map_err(|e| format!("[agent.llm] {e}"))?;
        config.check()?;
        Ok(config)
    }

    /// Check every field's range. Errors name the field.
    pub fn check(&self) -> Result<(), String> {
        let err = |field: &str, problem: String| Err(format!("[agent.llm] `{field}`: {problem}"));
        let url = self.base_url.as_str();
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"));
        let Some(rest) = rest else {
            return err(
                "base_url",
                format!("{url:?} must start with http:// or https://"),
            );
        };
        let authority = rest.split('/').next().unwrap_or("");
        if authority.is_empty() {
            return err("base_url", format!("{url:?} names no host"));
        }
        if authority.contains('@') {
            return err(
                "base_url",
                "credentials do not belong in the URL; name the key's variable in `api_key_env`"
                    .into(),
            );
        }
        if url.chars().any(|c| c.is_whitespace() || c.is_control()) || url.contains(['?', '#']) {
            return err(
                "base_url",
                format!("{url:?} must be a plain URL (no spaces, query or fragment)"),
            );
        }
        if self.model.trim().is_empty() {
            return err("model", "must not be empty".into());
        }
        if self.task.trim().is_empty() {
            return err(
                "task",
                "must not be empty (it is what the agent must do)".into(),
            );
        }
        if let Some(name) = &self.api_key_env {
            let mut chars = name.chars();
            let valid = chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return err(
                    "api_key_env",
                    format!("{name:?} is not an environment variable name"),
                );
            }
        }
        if !(1..=MAX_MAX_TOKENS).contains(&self.max_tokens) {
            return err(
                "max_tokens",
                format!("{} must be between 1 and {MAX_MAX_TOKENS}", self.max_tokens),
            );
        }
        if let Some(t) = self.temperature
            && !(t.is_finite() && (0.0..=2.0).contains(&t))
        {
            return err("temperature", format!("{t} must be between 0 and 2"));
        }
        if !(1..=MAX_MAX_STEPS).contains(&self.max_steps) {
            return err(
                "max_steps",
                format!("{} must be between 1 and {MAX_MAX_STEPS}", self.max_steps),
            );
        }
        if self.timeout.is_zero() || self.timeout > MAX_TIMEOUT {
            return err(
                "timeout",
                format!(
                    "{:?} must be more than 0 and at most {}s",
                    self.timeout,
                    MAX_TIMEOUT.as_secs()
                ),
            );
        }
        if !(1..=MAX_MAX_ERRORS).contains(&self.max_errors) {
            return err(
                "max_errors",
                format!("{} must be between 1 and {MAX_MAX_ERRORS}", self.max_errors),
            );
        }
        Ok(())
    }

    /// The URL requests are POSTed to: `{base_url}/chat/completions`.
    pub fn endpoint(&self) -> String {
        format!("{}/chat/completions", self.base_url.trim_end_matches('/'))
    }
}

// ---------------------------------------------------------------------------------------------
// The model seam.

/// Why a model call produced no usable HTTP reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The endpoint answered with a non-2xx status.
    HttpStatus,
    /// No complete answer within the timeout.
    Timeout,
    /// Connection, TLS or protocol failure.
    Transport,
    /// A 2xx answer whose body is not JSON.
    MalformedJson,
    /// A body larger than [`MAX_REPLY_BYTES`].
    Oversized,
    /// Replay: the request differs from the recorded one, or the recording ran out.
    ReplayDivergence,
    /// Given up while it waited: the run was killed or stopped meanwhile.
    Interrupted,
}

impl FailureKind {
    /// Every kind.
    pub const ALL: [FailureKind; 7] = [
        FailureKind::HttpStatus,
        FailureKind::Timeout,
        FailureKind::Transport,
        FailureKind::MalformedJson,
        FailureKind::Oversized,
        FailureKind::ReplayDivergence,
        FailureKind::Interrupted,
    ];

    /// The name recorded in `error.kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::HttpStatus => "http_status",
            FailureKind::Timeout => "timeout",
            FailureKind::Transport => "transport",
            FailureKind::MalformedJson => "malformed_json",
            FailureKind::Oversized => "oversized",
            FailureKind::ReplayDivergence => "replay_divergence",
            FailureKind::Interrupted => "interrupted",
        }
    }

    /// Whether the provider may have generated (and billed) the call's tokens, given the
    /// reply's status (`None` when none arrived): it timed out before or while answering 2xx,
    /// or answered 2xx with a body ICE could not use (not JSON, too large, cut off). A non-2xx
    /// status, a connection that failed and a replay divergence generated none that ICE can
    /// know of.
    pub fn may_have_generated(self, status: Option<u16>) -> bool {
        let success = status.is_some_and(|s| (200..300).contains(&s));
        match self {
            // A call given up may have been answered meanwhile: it is charged as one that
            // timed out.
            FailureKind::Timeout
            | FailureKind::Interrupted
            | FailureKind::MalformedJson
            | FailureKind::Oversized => status.is_none() || success,
            FailureKind::Transport => success,
            FailureKind::HttpStatus | FailureKind::ReplayDivergence => false,
        }
    }

    /// The kind recorded as `name`.
    pub fn parse(name: &str) -> Option<FailureKind> {
        FailureKind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A model call that produced no usable HTTP reply.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelFailure {
    /// What went wrong.
    pub kind: FailureKind,
    /// The details (never the API key).
    pub detail: String,
    /// The HTTP status, when one was received.
    pub status: Option<u16>,
    /// Time from sending to the failure, in milliseconds.
    pub latency_ms: u64,
}

/// What a model call returned.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelReply {
    /// A 2xx answer with a JSON body (which may still be unusable: the driver judges it).
    Ok {
        /// The HTTP status.
        status: u16,
        /// The parsed body.
        body: Value,
        /// Time from sending to the end of the body, in milliseconds.
        latency_ms: u64,
    },
    /// No usable answer.
    Failed(ModelFailure),
}

/// Something that answers chat-completion requests: the network ([`HttpModel`]), a recording
/// ([`RecordedModel`]) or a test script.
pub trait Model: Send {
    /// Answer one request (the JSON body of `POST /chat/completions`).
    fn complete(&mut self, request: &Value) -> ModelReply;

    /// Bound the next calls to `within` (what the run's wall-time budget has left), where
    /// that is less than the model's own timeout. A recording ignores it.
    fn bound(&mut self, within: Option<Duration>) {
        let _ = within;
    }

    /// The flag this model watches while it waits for an answer, if it can give a call up.
    fn interrupt(&self) -> Option<Interrupt> {
        None
    }

    /// Where a replay departed from its recording (empty for a live model).
    fn divergences(&self) -> &[String] {
        &[]
    }

    /// How many recorded replies are left unused (0 for a live model).
    fn remaining(&self) -> usize {
        0
    }
}

/// SHA-256 (lowercase hex) of the request's RFC 8785 encoding: `request_digest` in the record.
pub fn request_digest(request: &Value) -> String {
    let mut bytes = Vec::with_capacity(1024);
    ice_kernel::canonical::write_value(request, &mut bytes);
    Digest::of(&bytes).to_hex()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The live model: `POST {base_url}/chat/completions` with ureq.
pub struct HttpModel {
    agent: ureq::Agent,
    endpoint: String,
    key: Option<String>,
    /// The configured time limit of one call.
    timeout: Duration,
    /// What the run's wall-time budget had left when the agent was last shown a view.
    within: Option<Duration>,
    /// Raised by the runtime to give the call under way up.
    interrupt: Interrupt,
    /// Not before then: the last reply was 429 or 503 with a `Retry-After`.
    retry_at: std::cell::Cell<Option<Instant>>,
}

impl fmt::Debug for HttpModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpModel")
            .field("endpoint", &self.endpoint)
            .field("key", &self.key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl HttpModel {
    /// A client for `config`'s endpoint, with its timeout and, if `api_key_env` names one, the
    /// key read from the environment now (a named variable that is unset or empty is an error).
    pub fn new(config: &LlmConfig) -> Result<HttpModel, String> {
        config.check()?;
        let key = match &config.api_key_env {
            None => None,
            Some(name) => match std::env::var(name) {
                Ok(k) if !k.trim().is_empty() => {
                    if !k.bytes().all(|b| b.is_ascii_graphic()) {
                        return Err(format!(
                            "[agent.llm] `api_key_env`: the value of {name} is not a usable API \
                             key (it has spaces or non-ASCII characters)"
                        ));
                    }
                    Some(k)
                }
                _ => {
                    return Err(format!(
                        "[agent.llm] `api_key_env`: the environment variable {name} is not set \
                         (it must hold the API key)"
                    ));
                }
            },
        };
        let agent_config = ureq::Agent::config_builder()
            .timeout_global(Some(config.timeout))
            .http_status_as_error(false)
            .max_redirects(0)
            .user_agent(concat!("ice/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(HttpModel {
            agent: ureq::Agent::new_with_config(agent_config),
            endpoint: config.endpoint(),
            key,
            timeout: config.timeout,
            within: None,
            interrupt: Interrupt::new(),
            retry_at: std::cell::Cell::new(None),
        })
    }

    /// The URL requests go to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The key, if it is one to take out of what is recorded: a value shorter than
    /// [`MIN_REDACTED_KEY_LEN`] is a placeholder (`EMPTY`, `dummy`, `ollama`, what local
    /// servers take), and taking every `e` or `dummy` out of replies would change them.
    fn secret(&self) -> Option<&str> {
        self.key
            .as_deref()
            .filter(|k| k.len() >= MIN_REDACTED_KEY_LEN)
    }

    fn redact(&self, text: String) -> String {
        match self.secret() {
            Some(k) if text.contains(k) => text.replace(k, "[redacted]"),
            _ => text,
        }
    }

    fn redact_bytes(&self, body: Vec<u8>) -> Vec<u8> {
        match self.secret() {
            Some(k) if body.windows(k.len()).any(|w| w == k.as_bytes()) => self
                .redact(String::from_utf8_lossy(&body).into_owned())
                .into_bytes(),
            _ => body,
        }
    }

    /// [`Self::redact`] every string of a parsed reply, object keys included: JSON can write
    /// the key with escapes (`\u0073k-…`, `\/`) that the raw bytes do not show. A string that
    /// is itself JSON text (a tool call's `arguments`, which the agent decodes later) is
    /// redacted as decoded too, for the same reason, and written back if that changed it.
    fn redact_value(&self, v: &mut Value) {
        if self.secret().is_some() {
            self.redact_found(v);
        }
    }

    /// [`Self::redact_value`]; whether anything was redacted.
    fn redact_found(&self, v: &mut Value) -> bool {
        let Some(secret) = self.secret() else {
            return false;
        };
        match v {
            Value::String(s) => {
                let mut found = s.contains(secret);
                if found {
                    *s = s.replace(secret, "[redacted]");
                }
                // A URL with the key written in percent-escapes (`%73k-…`) is decoded when it is
                // normalised: the decoded text is redacted and kept.
                if s.contains('%') {
                    let decoded = percent_decoded(s);
                    if decoded.contains(secret) {
                        *s = decoded.replace(secret, "[redacted]");
                        found = true;
                    }
                }
                // Escapes are only there to decode if a backslash is.
                if s.contains('\\')
                    && matches!(s.trim_start().as_bytes().first(), Some(b'{' | b'[' | b'"'))
                    && let Ok(mut inner) = serde_json::from_str::<Value>(s)
                    && self.redact_found(&mut inner)
                {
                    *s = inner.to_string();
                    found = true;
                }
                found
            }
            Value::Array(a) => a
                .iter_mut()
                .fold(false, |found, v| self.redact_found(v) | found),
            Value::Object(m) => {
                let mut found = false;
                let taken = std::mem::take(m);
                for (k, mut v) in taken {
                    found |= self.redact_found(&mut v);
                    let k = if k.contains(secret) {
                        found = true;
                        k.replace(secret, "[redacted]")
                    } else {
                        k
                    };
                    m.insert(k, v);
                }
                found
            }
            _ => false,
        }
    }
}

/// `s` with every `%XX` escape decoded (bytes that are not UTF-8 replaced).
fn percent_decoded(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A `Retry-After` of whole seconds (the form model providers send; an HTTP date is not read).
fn retry_after(headers: &ureq::http::HeaderMap) -> Option<Duration> {
    let v = headers.get("retry-after")?.to_str().ok()?.trim();
    v.parse::<u64>().ok().map(Duration::from_secs)
}

impl Model for HttpModel {
    fn bound(&mut self, within: Option<Duration>) {
        self.within = within;
    }

    fn interrupt(&self) -> Option<Interrupt> {
        Some(self.interrupt.clone())
    }

    fn complete(&mut self, request: &Value) -> ModelReply {
        // A server that asked to be left alone for a while (429, 503) is, up to
        // MAX_RETRY_WAIT and what the run's wall-time budget has left; a stop ends the wait.
        if let Some(at) = self.retry_at.take() {
            let mut wait = at.saturating_duration_since(Instant::now());
            if let Some(w) = self.within {
                wait = wait.min(w);
            }
            // The call after the wait gets only what the run's budget still has.
            self.within = self.within.map(|w| w.saturating_sub(wait));
            let until = Instant::now() + wait;
            while Instant::now() < until {
                if self.interrupt.is_raised() {
                    return ModelReply::Failed(ModelFailure {
                        kind: FailureKind::Interrupted,
                        detail: "the call was given up: the run was stopped while it waited for the server's Retry-After".into(),
                        status: None,
                        latency_ms: 0,
                    });
                }
                std::thread::sleep(
                    INTERRUPT_POLL.min(until.saturating_duration_since(Instant::now())),
                );
            }
        }
        let started = Instant::now();
        let fail = |kind: FailureKind, detail: String, status: Option<u16>| {
            ModelReply::Failed(ModelFailure {
                kind,
                detail: self.redact(detail),
                status,
                latency_ms: millis(started.elapsed()),
            })
        };
        let from_ureq = |e: ureq::Error| match e {
            ureq::Error::Timeout(t) => (FailureKind::Timeout, format!("timed out ({t})")),
            other => (FailureKind::Transport, other.to_string()),
        };
        let body = match serde_json::to_vec(request) {
            Ok(b) => b,
            Err(e) => return fail(FailureKind::Transport, e.to_string(), None),
        };
        let mut call = self
            .agent
            .post(&self.endpoint)
            .header("content-type", "application/json")
            .header("accept", "application/json");
        // The run's wall-time budget ends before the model's own timeout would.
        let budget_cut = self.within.filter(|w| *w < self.timeout);
        if let Some(w) = budget_cut {
            call = call
                .config()
                .timeout_global(Some(w.max(Duration::from_millis(1))))
                .build();
        }
        let from_ureq = |e: ureq::Error| match (e, budget_cut) {
            (ureq::Error::Timeout(t), Some(w)) => (
                FailureKind::Timeout,
                format!(
                    "timed out ({t}), cut at the end of the run's wall_time budget, which had {} ms left",
                    w.as_millis()
                ),
            ),
            (e, _) => from_ureq(e),
        };
        if let Some(k) = &self.key {
            call = call.header("authorization", format!("Bearer {k}"));
        }
        // The exchange runs on a thread of its own, so the call can be given up when the
        // runtime raises the interrupt (the thread ends by itself, within the timeout).
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let exchange = match call.send(&body[..]) {
                Err(e) => Err((None, e)),
                Ok(response) => {
                    let status = response.status().as_u16();
                    let retry_after = retry_after(response.headers());
                    let mut raw = Vec::new();
                    let read = response
                        .into_body()
                        .into_with_config()
                        .limit(u64::MAX)
                        .reader()
                        .take(MAX_REPLY_BYTES + 1)
                        .read_to_end(&mut raw);
                    match read {
                        Ok(_) => Ok((status, retry_after, raw)),
                        Err(e) => Err((Some(status), ureq::Error::from(e))),
                    }
                }
            };
            let _ = tx.send(exchange);
        });
        let exchange = loop {
            match rx.recv_timeout(INTERRUPT_POLL) {
                Ok(x) => break x,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if self.interrupt.is_raised() {
                        return fail(
                            FailureKind::Interrupted,
                            "the call was given up: the run was stopped while it waited".into(),
                            None,
                        );
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return fail(
                        FailureKind::Transport,
                        "the model call's thread ended without an answer".into(),
                        None,
                    );
                }
            }
        };
        let (status, retry_after, raw) = match exchange {
            Ok(x) => x,
            Err((status, e)) => {
                let (kind, detail) = from_ureq(e);
                return fail(kind, detail, status);
            }
        };
        if raw.len() as u64 > MAX_REPLY_BYTES {
            return fail(
                FailureKind::Oversized,
                format!("the reply is larger than {MAX_REPLY_BYTES} bytes"),
                Some(status),
            );
        }
        let raw = self.redact_bytes(raw);
        let waits = match retry_after {
            Some(wait) if matches!(status, 429 | 503) => {
                let wait = wait.min(MAX_RETRY_WAIT);
                self.retry_at.set(Some(Instant::now() + wait));
                format!(
                    " (it asked to be called again after {} s: the next call waits that long, up to {} s)",
                    wait.as_secs(),
                    MAX_RETRY_WAIT.as_secs()
                )
            }
            _ => String::new(),
        };
        if !(200..300).contains(&status) {
            // An error body that is JSON is shown decoded (and redacted as decoded).
            let text = match serde_json::from_slice::<Value>(&raw) {
                Ok(mut v) => {
                    self.redact_value(&mut v);
                    v.to_string()
                }
                Err(_) => String::from_utf8_lossy(&raw).into_owned(),
            };
            return fail(
                FailureKind::HttpStatus,
                format!("HTTP {status}{waits}: {}", cut(text.trim(), 2000)),
                Some(status),
            );
        }
        match serde_json::from_slice::<Value>(&raw) {
            Ok(mut body) => {
                self.redact_value(&mut body);
                ModelReply::Ok {
                    status,
                    body,
                    latency_ms: millis(started.elapsed()),
                }
            }
            Err(e) => {
                let text = String::from_utf8_lossy(&raw);
                fail(
                    FailureKind::MalformedJson,
                    format!("the reply is not JSON ({e}): {:?}", cut(&text, 200)),
                    Some(status),
                )
            }
        }
    }
}

/// Model-free replay: answers each request with the reply (or error) recorded in the next
/// `InferenceStep` payload, after checking that the request's digest is the recorded
/// `request_digest`. A mismatch, or a request past the end of the recording, is answered with a
/// [`FailureKind::ReplayDivergence`] failure and listed in [`RecordedModel::divergences`].
#[derive(Clone, Debug)]
pub struct RecordedModel {
    steps: Vec<Payload>,
    next: usize,
    divergences: Vec<String>,
}

impl RecordedModel {
    /// A model that replays these `InferenceStep` payloads, in order.
    pub fn new(steps: Vec<Payload>) -> RecordedModel {
        RecordedModel {
            steps,
            next: 0,
            divergences: Vec::new(),
        }
    }

    /// Where the replay departed from the recording, one sentence each.
    pub fn divergences(&self) -> &[String] {
        &self.divergences
    }

    /// How many recorded calls have not been replayed yet.
    pub fn remaining(&self) -> usize {
        self.steps.len().saturating_sub(self.next)
    }

    fn diverge(&mut self, detail: String) -> ModelReply {
        self.divergences.push(detail.clone());
        ModelReply::Failed(ModelFailure {
            kind: FailureKind::ReplayDivergence,
            detail,
            status: None,
            latency_ms: 0,
        })
    }
}

impl Model for RecordedModel {
    fn complete(&mut self, request: &Value) -> ModelReply {
        let digest = request_digest(request);
        let n = self.next + 1;
        let Some(step) = self.steps.get(self.next).cloned() else {
            self.next += 1;
            let len = self.steps.len();
            return self.diverge(format!(
                "model call {n}: the recording has only {len} model calls (request digest {digest})"
            ));
        };
        self.next += 1;
        let recorded = step
            .get("request_digest")
            .and_then(Value::as_str)
            .unwrap_or("(none)");
        if recorded != digest {
            let detail = format!(
                "model call {n}: the request digest is {digest}, the recording has {recorded}"
            );
            return self.diverge(detail);
        }
        let latency_ms = step.get("latency_ms").and_then(Value::as_u64).unwrap_or(0);
        let status = step
            .get("status")
            .and_then(Value::as_u64)
            .and_then(|s| u16::try_from(s).ok());
        if let Some(body) = step.get("reply") {
            return ModelReply::Ok {
                status: status.unwrap_or(200),
                body: body.clone(),
                latency_ms,
            };
        }
        let error = step.get("error");
        let kind = error
            .and_then(|e| e.get("kind"))
            .and_then(Value::as_str)
            .and_then(FailureKind::parse);
        match (kind, error) {
            (Some(kind), Some(e)) => ModelReply::Failed(ModelFailure {
                kind,
                detail: e
                    .get("detail")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                status: e
                    .get("status")
                    .and_then(Value::as_u64)
                    .and_then(|s| u16::try_from(s).ok()),
                latency_ms,
            }),
            _ => self.diverge(format!(
                "model call {n}: the recorded payload has neither a reply nor a provider error"
            )),
        }
    }

    fn divergences(&self) -> &[String] {
        &self.divergences
    }

    fn remaining(&self) -> usize {
        RecordedModel::remaining(self)
    }
}

// ---------------------------------------------------------------------------------------------
// Tools.

/// What an offered function stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolBinding {
    /// One of ICE's own capabilities (its capability and target argument are the tool's).
    Builtin(&'static BuiltinTool),
    /// An MCP tool, called through `mcp.call`.
    Mcp {
        /// `server/tool`.
        target: String,
    },
}

/// A function name providers accept: `[A-Za-z0-9_-]`, at most [`MAX_FUNCTION_NAME`] characters.
pub fn sanitize_function_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(MAX_FUNCTION_NAME)
        .collect()
}

/// The functions offered to the model, fixed at the first proposal.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Toolbox {
    /// The OpenAI `tools` array, sorted by function name.
    pub tools: Vec<Value>,
    /// Function name → what it stands for.
    pub bindings: BTreeMap<String, ToolBinding>,
}

impl Toolbox {
    /// The functions for `view`: the built-in capabilities it lists, then its MCP tools.
    pub fn for_view(view: &AgentView) -> Toolbox {
        let mut entries: Vec<(String, String, Value, ToolBinding)> = Vec::new();
        for b in &BUILTIN_TOOLS {
            if view.capabilities.iter().any(|(c, _)| c == b.capability) {
                entries.push((
                    b.name.to_string(),
                    b.description().to_string(),
                    b.input_schema(),
                    ToolBinding::Builtin(b),
                ));
            }
        }
        let mut offers: Vec<_> = view.tools.iter().collect();
        offers.sort_by(|a, b| a.target.cmp(&b.target));
        offers.dedup_by(|a, b| a.target == b.target);
        let mut used: BTreeSet<String> = entries.iter().map(|e| e.0.clone()).collect();
        for o in offers {
            let (server, tool) = o.target.split_once('/').unwrap_or(("", o.target.as_str()));
            let base = sanitize_function_name(&format!("mcp__{server}__{tool}"));
            let mut name = base.clone();
            let mut n = 2u64;
            while used.contains(&name) {
                let suffix = format!("_{n}");
                let keep = MAX_FUNCTION_NAME - suffix.len();
                name = format!("{}{suffix}", base.chars().take(keep).collect::<String>());
                n += 1;
            }
            used.insert(name.clone());
            let schema = match &o.input_schema {
                Value::Object(m) if m.get("type").is_none_or(|t| t == "object") => {
                    let mut m = m.clone();
                    m.insert("type".into(), json!("object"));
                    Value::Object(m)
                }
                _ => json!({"type": "object", "properties": {}}),
            };
            let description = if o.description.trim().is_empty() {
                format!("MCP tool {} (effect class {})", o.target, o.effect)
            } else {
                format!(
                    "{} (MCP tool {}; effect class {})",
                    o.description.trim(),
                    o.target,
                    o.effect
                )
            };
            entries.push((
                name,
                description,
                schema,
                ToolBinding::Mcp {
                    target: o.target.clone(),
                },
            ));
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let mut toolbox = Toolbox::default();
        for (name, description, schema, binding) in entries {
            toolbox.tools.push(json!({
                "type": "function",
                "function": {"name": name, "description": description, "parameters": schema},
            }));
            toolbox.bindings.insert(name, binding);
        }
        toolbox
    }

    /// The offered function names, sorted, comma-separated.
    pub fn names(&self) -> String {
        let names: Vec<&str> = self.bindings.keys().map(String::as_str).collect();
        names.join(", ")
    }

    /// The capability request a call of `function` with `arguments` (the model's JSON text, or
    /// an object) stands for, or why it cannot be made. An unknown function's error names only
    /// that function ([`Toolbox::names`] lists the offered ones).
    pub fn proposal(
        &self,
        function: &str,
        arguments: &Value,
        intent: &str,
    ) -> Result<CapabilityProposal, String> {
        let Some(binding) = self.bindings.get(function) else {
            return Err(format!("no function {:?} is offered", cut(function, 100)));
        };
        let args = match arguments {
            Value::String(s) if s.trim().is_empty() => Map::new(),
            Value::String(s) => match serde_json::from_str::<Value>(s) {
                Ok(Value::Object(m)) => m,
                Ok(_) => return Err("the arguments must be a JSON object".into()),
                Err(e) => return Err(format!("the arguments are not valid JSON ({e})")),
            },
            Value::Object(m) => m.clone(),
            Value::Null => Map::new(),
            _ => return Err("the arguments must be a JSON object".into()),
        };
        match binding {
            ToolBinding::Mcp { target } => Ok(CapabilityProposal {
                capability: "mcp.call".into(),
                target: target.clone(),
                arguments: Value::Object(args),
                intent: intent.to_string(),
            }),
            ToolBinding::Builtin(b) => b.proposal(args, intent),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The driver.

/// Cut `s` to at most `max` characters, marking the cut with `…`.
fn cut(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_string(),
        Some((i, _)) => format!("{}…", &s[..i]),
    }
}

/// Compact JSON text in RFC 8785 order, whatever the map's order: what the model is shown of a
/// value never depends on how it was parsed (live or from the log).
fn compact(v: &Value) -> String {
    let mut out = Vec::with_capacity(256);
    ice_kernel::canonical::write_value(v, &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// The reply as the log will read it back, so that what the driver acts on live is what a
/// replay or a resume acts on: a whole-number float within ±(2^53-1) becomes that integer (RFC
/// 8785 writes `12.0` as `12`, which reads back as an integer); numbers outside what the log
/// carries exactly become strings; an object using the reserved key `$blob` (which the log
/// refuses in a draft) and structure nested deeper than [`MAX_REPLY_DEPTH`] become their JSON
/// text. Idempotent, so a recorded reply replays to the same value.
fn recordable(v: Value, depth: usize) -> Value {
    match v {
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) if i.unsigned_abs() <= MAX_SAFE_INTEGER => Value::Number(n),
            (None, Some(u), _) if u <= MAX_SAFE_INTEGER => Value::Number(n),
            (None, None, Some(f)) if f.fract() == 0.0 && f.abs() <= MAX_SAFE_INTEGER as f64 => {
                // Exact: |f| < 2^53, a whole number (and -0.0 is 0, as RFC 8785 writes it).
                Value::from(f as i64)
            }
            (None, None, Some(f)) if !(f.abs() > MAX_SAFE_INTEGER as f64 && f.abs() < 1e21) => {
                Value::Number(n)
            }
            _ => Value::String(n.to_string()),
        },
        v @ (Value::Array(_) | Value::Object(_)) if depth >= MAX_REPLY_DEPTH => {
            Value::String(compact(&v))
        }
        Value::Object(m) if m.contains_key(BLOB_KEY) => Value::String(compact(&Value::Object(m))),
        Value::Array(a) => Value::Array(a.into_iter().map(|x| recordable(x, depth + 1)).collect()),
        Value::Object(m) => Value::Object(
            m.into_iter()
                .map(|(k, x)| (k, recordable(x, depth + 1)))
                .collect(),
        ),
        other => other,
    }
}

/// What the last reply asked of the driver.
#[derive(Clone, Debug, PartialEq)]
enum Next {
    /// Call the model (again).
    Infer,
    /// The model gave its final answer.
    Finish(String),
    /// The model refused.
    Refused(String),
}

/// A tool call waiting to be proposed.
#[derive(Clone, Debug, PartialEq)]
struct Queued {
    call_id: String,
    proposal: CapabilityProposal,
}

/// The LLM agent: the conversation, the offered functions and the loop's counters.
pub struct LlmAgent {
    id: String,
    config: LlmConfig,
    model: Box<dyn Model>,
    toolbox: Option<Toolbox>,
    messages: Vec<Value>,
    queue: VecDeque<Queued>,
    awaiting: Option<String>,
    /// Messages for the model once every queued call is answered (tool messages must follow
    /// their assistant message at once).
    pending: Vec<Value>,
    next: Next,
    calls: u64,
    errors: u64,
    last_error: Option<String>,
    /// While a resumed run re-drives the agent through its record: the live model, set aside
    /// while `model` answers from the recording.
    live: Option<Box<dyn Model>>,
}

impl fmt::Debug for LlmAgent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LlmAgent")
            .field("id", &self.id)
            .field("model", &self.config.model)
            .field("messages", &self.messages.len())
            .field("calls", &self.calls)
            .field("errors", &self.errors)
            .finish()
    }
}

impl LlmAgent {
    /// An agent `id` that follows `config`, asking `model`.
    pub fn new(id: impl Into<String>, config: LlmConfig, model: Box<dyn Model>) -> LlmAgent {
        LlmAgent {
            id: id.into(),
            config,
            model,
            toolbox: None,
            messages: Vec::new(),
            queue: VecDeque::new(),
            awaiting: None,
            pending: Vec::new(),
            next: Next::Infer,
            calls: 0,
            errors: 0,
            last_error: None,
            live: None,
        }
    }

    /// An agent that asks the endpoint of `config` over HTTP ([`HttpModel`]).
    pub fn http(id: impl Into<String>, config: LlmConfig) -> Result<LlmAgent, String> {
        let model = HttpModel::new(&config)?;
        Ok(LlmAgent::new(id, config, Box::new(model)))
    }

    /// The configuration.
    pub fn config(&self) -> &LlmConfig {
        &self.config
    }

    /// The conversation so far (system, user, then assistant and tool messages).
    pub fn messages(&self) -> &[Value] {
        &self.messages
    }

    /// The functions offered, once the first proposal fixed them.
    pub fn toolbox(&self) -> Option<&Toolbox> {
        self.toolbox.as_ref()
    }

    /// How many times the model was called.
    pub fn model_calls(&self) -> u64 {
        self.calls
    }

    /// Where a replay departed from its recording (see [`RecordedModel`]).
    pub fn divergences(&self) -> &[String] {
        self.model.divergences()
    }

    /// The next request, exactly as it will be sent.
    pub fn request(&self) -> Value {
        let mut r = Map::new();
        r.insert("model".into(), json!(self.config.model));
        r.insert("messages".into(), Value::Array(self.messages.clone()));
        if let Some(tb) = &self.toolbox
            && !tb.tools.is_empty()
        {
            r.insert("tools".into(), Value::Array(tb.tools.clone()));
            r.insert("tool_choice".into(), json!("auto"));
        }
        r.insert("max_tokens".into(), json!(self.config.max_tokens));
        if let Some(t) = self.config.temperature {
            r.insert("temperature".into(), json!(t));
        }
        Value::Object(r)
    }

    /// What a call with `request` reserves: `max_tokens` out, an estimate of the prompt in
    /// (a token per 3 bytes of the request). It is also what the call is costed when the
    /// provider does not report its usage.
    fn reservation(&self, request: &Value) -> Cost {
        let bytes = serde_json::to_vec(request).map_or(0, |b| b.len() as u64);
        Cost {
            tokens_in: bytes.div_ceil(3).min(MAX_SAFE_INTEGER),
            tokens_out: self.config.max_tokens,
            ..Cost::default()
        }
    }

    fn start(&mut self, view: &AgentView) {
        if self.toolbox.is_some() {
            return;
        }
        self.toolbox = Some(Toolbox::for_view(view));
        let mut system = PREAMBLE.to_string();
        if let Some(extra) = &self.config.system
            && !extra.trim().is_empty()
        {
            system.push_str("\n\n");
            system.push_str(extra.trim());
        }
        if !view.memories.is_empty() {
            system.push_str("\n\nMemories mounted into this run (id, kind, confidence):");
            for m in &view.memories {
                let content = match &m.content {
                    Value::String(s) => s.clone(),
                    other => compact(other),
                };
                system.push_str(&format!(
                    "\n- [{}] ({}, confidence {}): {}",
                    m.id, m.kind, m.confidence, content
                ));
            }
        }
        self.messages
            .push(json!({"role": "system", "content": system}));
        self.messages
            .push(json!({"role": "user", "content": self.config.task}));
    }

    fn answer(&mut self, call_id: &str, content: String) {
        self.messages.push(json!({
            "role": "tool",
            "tool_call_id": call_id,
            "content": content,
        }));
    }

    fn outcome_text(outcome: &Outcome) -> String {
        let text = match outcome {
            Outcome::Done { output, .. } => compact(output),
            Outcome::Denied { reason, detail, .. } => format!("DENIED ({reason}): {detail}"),
        };
        if text.len() <= MAX_TOOL_RESULT_BYTES {
            return text;
        }
        let mut end = MAX_TOOL_RESULT_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        format!(
            "{}… [cut: {} more bytes not shown]",
            &text[..end],
            text.len() - end
        )
    }

    fn failed(&mut self, kind: &str, detail: &str) {
        self.errors += 1;
        self.last_error = Some(format!("{kind}: {}", cut(detail, 300)));
        self.next = Next::Infer;
    }

    /// Judge a 2xx JSON reply; fills in the payload and returns the intent.
    fn judge(&mut self, body: &Value, payload: &mut Payload, n: u64) -> String {
        let max = self.config.max_steps;
        let choice = body.get("choices").and_then(|c| c.get(0));
        let finish_reason = choice
            .and_then(|c| c.get("finish_reason"))
            .cloned()
            .unwrap_or(Value::Null);
        payload.insert("finish_reason".into(), finish_reason.clone());
        let finish_reason = finish_reason.as_str().unwrap_or("");
        let Some(message) = choice
            .and_then(|c| c.get("message"))
            .and_then(Value::as_object)
        else {
            let detail = match body.get("error") {
                Some(e) => format!(
                    "the reply has no choices[0].message; it says: {}",
                    cut(&compact(e), 500)
                ),
                None => "the reply has no choices[0].message".to_string(),
            };
            payload.insert(
                "error".into(),
                json!({"kind": "malformed_reply", "detail": detail}),
            );
            self.failed("malformed_reply", &detail);
            return format!("model call {n}/{max}: malformed reply");
        };
        let content = match message.get("content") {
            Some(Value::String(s)) => s.clone(),
            _ => String::new(),
        };
        let refusal = match message.get("refusal") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => Some(compact(other)),
        };
        if refusal.is_some() || finish_reason == "content_filter" {
            let why = refusal.unwrap_or_else(|| {
                if content.trim().is_empty() {
                    "the provider's content filter stopped the reply".to_string()
                } else {
                    content.clone()
                }
            });
            payload.insert("error".into(), json!({"kind": "refusal", "detail": why}));
            self.next = Next::Refused(cut(&why, 1000));
            return format!("model call {n}/{max}: the model refused");
        }
        // At most MAX_TOOL_CALLS_PER_REPLY calls are read; the rest are refused below, once.
        let (calls, asked): (Vec<Value>, usize) = match message.get("tool_calls") {
            Some(Value::Array(a)) => (
                a.iter().take(MAX_TOOL_CALLS_PER_REPLY).cloned().collect(),
                a.len(),
            ),
            _ => (Vec::new(), 0),
        };
        let over = asked - calls.len();
        let mut assistant = Map::new();
        assistant.insert("role".into(), json!("assistant"));
        if calls.is_empty() {
            if finish_reason == "tool_calls" {
                let detail = "finish_reason is tool_calls but the message has no tool calls";
                payload.insert(
                    "error".into(),
                    json!({"kind": "malformed_reply", "detail": detail}),
                );
                self.failed("malformed_reply", detail);
                return format!("model call {n}/{max}: malformed reply");
            }
            assistant.insert("content".into(), json!(content));
            self.messages.push(Value::Object(assistant));
            if finish_reason == "length" {
                let detail = format!(
                    "the reply was cut at max_tokens ({}) without a tool call",
                    self.config.max_tokens
                );
                payload.insert(
                    "error".into(),
                    json!({"kind": "truncated", "detail": detail}),
                );
                self.messages.push(json!({
                    "role": "user",
                    "content": format!(
                        "Your reply was cut off at max_tokens ({}). Be shorter: call one tool, \
                         or give your final answer briefly.",
                        self.config.max_tokens
                    ),
                }));
                self.failed("truncated", &detail);
                return format!("model call {n}/{max}: reply cut at max_tokens");
            }
            self.errors = 0;
            self.next = Next::Finish(content);
            return format!("model call {n}/{max}: final answer");
        }
        // Tool calls: map each, answer the unusable ones at once, queue the rest.
        let intent = if content.trim().is_empty() {
            None
        } else {
            Some(cut(content.trim(), MAX_INTENT_CHARS))
        };
        let toolbox = self.toolbox.clone().unwrap_or_default();
        // Every id the model gave: a made-up id takes none of them, so each call keeps the
        // model's id unless an earlier call of the reply already used it.
        let given: BTreeSet<String> = calls
            .iter()
            .filter_map(|c| c.get("id").and_then(Value::as_str))
            .map(str::to_string)
            .collect();
        let mut seen = BTreeSet::new();
        let mut echoed = Vec::with_capacity(calls.len());
        let mut queued = Vec::new();
        let mut rejected: Vec<(String, String, String)> = Vec::new();
        // The call whose answer names the offered functions (the first to an unknown one).
        let mut listed: Option<String> = None;
        for (i, call) in calls.into_iter().enumerate() {
            let mut call = match call {
                Value::Object(m) => m,
                other => {
                    let mut m = Map::new();
                    m.insert("unexpected".into(), other);
                    m
                }
            };
            let id = match call.get("id").and_then(Value::as_str) {
                Some(id) if !id.is_empty() && !seen.contains(id) => id.to_string(),
                _ => {
                    // `call_{n}_{i+1}`, or the next number no call of the reply uses.
                    let id = (i + 1..)
                        .map(|k| format!("call_{n}_{k}"))
                        .find(|id| !seen.contains(id) && !given.contains(id))
                        .expect("an unused id");
                    call.insert("id".into(), json!(id));
                    id
                }
            };
            seen.insert(id.clone());
            let function = call.get("function");
            let name = function
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let arguments = function
                .and_then(|f| f.get("arguments"))
                .cloned()
                .unwrap_or(Value::Null);
            let intent = intent.clone().unwrap_or_else(|| {
                format!("model {} called {}", self.config.model, cut(&name, 100))
            });
            match toolbox.proposal(&name, &arguments, &intent) {
                Ok(proposal) => queued.push(Queued {
                    call_id: id.clone(),
                    proposal,
                }),
                Err(problem) => {
                    if listed.is_none() && !toolbox.bindings.contains_key(&name) {
                        listed = Some(id.clone());
                    }
                    rejected.push((id.clone(), name, problem));
                }
            }
            echoed.push(Value::Object(call));
        }
        assistant.insert(
            "content".into(),
            message.get("content").cloned().unwrap_or(Value::Null),
        );
        assistant.insert("tool_calls".into(), Value::Array(echoed));
        self.messages.push(Value::Object(assistant));
        // The offered functions are named once per reply: in the answer to the first call of
        // an unknown function; the answers to later ones point there.
        for (id, name, problem) in &rejected {
            let unknown = !toolbox.bindings.contains_key(name);
            let problem = match &listed {
                Some(first) if unknown && first == id => {
                    format!("{problem}; the functions are: {}", toolbox.names())
                }
                Some(first) if unknown => {
                    format!("{problem} (the functions are named in the answer to call {first})")
                }
                _ => problem.clone(),
            };
            self.answer(
                id,
                format!("ERROR: this call was not made: {problem}. Correct it and call again."),
            );
        }
        if over > 0 {
            self.pending.push(json!({
                "role": "user",
                "content": format!(
                    "Your reply asked for {asked} tool calls; at most {MAX_TOOL_CALLS_PER_REPLY} \
                     are read from one reply, so the last {over} were not made. Make the ones you \
                     still need in a later reply."
                ),
            }));
            payload.insert("tool_calls_over_limit".into(), json!(over));
        }
        let usable = queued.len();
        self.queue.extend(queued);
        self.next = Next::Infer;
        if !rejected.is_empty() {
            payload.insert(
                "rejected_tool_calls".into(),
                Value::Array(
                    rejected
                        .iter()
                        .map(|(id, name, problem)| {
                            json!({"id": id, "function": cut(name, 100), "problem": problem})
                        })
                        .collect(),
                ),
            );
        }
        if usable == 0 && finish_reason == "length" {
            let detail = format!(
                "the reply was cut at max_tokens ({}) with no usable tool call",
                self.config.max_tokens
            );
            payload.insert(
                "error".into(),
                json!({"kind": "truncated", "detail": detail}),
            );
            self.messages.push(json!({
                "role": "user",
                "content": format!(
                    "Your reply was cut off at max_tokens ({}), so its tool calls could not be \
                     read. Make smaller calls.",
                    self.config.max_tokens
                ),
            }));
            self.failed("truncated", &detail);
            return format!("model call {n}/{max}: reply cut at max_tokens");
        }
        if over > 0 || !rejected.is_empty() {
            let mut details = Vec::new();
            if over > 0 {
                details.push(format!(
                    "the reply asked for {asked} tool calls; at most {MAX_TOOL_CALLS_PER_REPLY} \
                     are read from one reply, so {over} were refused"
                ));
            }
            if !rejected.is_empty() {
                details.push(format!(
                    "{} of {} tool calls rejected: {}",
                    rejected.len(),
                    rejected.len() + usable,
                    cut(&rejected[0].2, 300)
                ));
            }
            let kind = if over > 0 {
                "too_many_tool_calls"
            } else {
                "rejected_tool_calls"
            };
            let detail = details.join("; ");
            payload.insert("error".into(), json!({"kind": kind, "detail": detail}));
            self.failed(kind, &detail);
            let refused = if over > 0 {
                format!(", {over} refused (over {MAX_TOOL_CALLS_PER_REPLY} in one reply)")
            } else {
                String::new()
            };
            return format!(
                "model call {n}/{max}: {usable} tool call(s), {} rejected{refused}",
                rejected.len()
            );
        }
        self.errors = 0;
        format!("model call {n}/{max}: {usable} tool call(s)")
    }
}

impl Agent for LlmAgent {
    fn id(&self) -> &str {
        &self.id
    }

    fn interrupt(&self) -> Option<Interrupt> {
        self.model.interrupt()
    }

    /// The conversation is rebuilt, not restarted: until [`Agent::rebuilt`], model calls are
    /// answered from the run's recorded ones (and checked against their request digests), so
    /// the re-drive calls no model.
    fn rebuild_from(&mut self, recorded: Vec<Payload>) -> bool {
        let replay: Box<dyn Model> = Box::new(RecordedModel::new(recorded));
        let live = std::mem::replace(&mut self.model, replay);
        self.live.get_or_insert(live);
        true
    }

    fn rebuilt(&mut self) -> Result<(), AgentError> {
        let Some(live) = self.live.take() else {
            return Ok(());
        };
        let replay = std::mem::replace(&mut self.model, live);
        if let Some(first) = replay.divergences().first() {
            return Err(AgentError(format!(
                "the recorded conversation could not be rebuilt: {first}"
            )));
        }
        let left = replay.remaining();
        if left > 0 {
            return Err(AgentError(format!(
                "the recorded conversation could not be rebuilt: {left} recorded model call(s) were not reached"
            )));
        }
        Ok(())
    }

    fn propose(&mut self, view: &AgentView) -> Result<Proposal, AgentError> {
        self.start(view);
        if let Some(call_id) = self.awaiting.take() {
            let text = match &view.last {
                Some(outcome) => LlmAgent::outcome_text(outcome),
                None => "ERROR: no outcome was reported for this call".to_string(),
            };
            self.answer(&call_id, text);
        }
        if let Some(q) = self.queue.pop_front() {
            self.awaiting = Some(q.call_id);
            return Ok(Proposal::Request(q.proposal));
        }
        self.messages.append(&mut self.pending);
        match &self.next {
            Next::Finish(summary) => {
                return Ok(Proposal::Finish {
                    summary: summary.clone(),
                });
            }
            Next::Refused(why) => return Err(AgentError(format!("the model refused: {why}"))),
            Next::Infer => {}
        }
        if self.calls >= self.config.max_steps {
            return Err(AgentError(format!(
                "loop limit: the model was called {} times (max_steps = {}) without giving a \
                 final answer",
                self.calls, self.config.max_steps
            )));
        }
        if self.errors >= self.config.max_errors {
            return Err(AgentError(format!(
                "the model failed {} times in a row (max_errors = {}); the last error: {}",
                self.errors,
                self.config.max_errors,
                self.last_error.as_deref().unwrap_or("unknown")
            )));
        }
        let request = self.request();
        let bytes = serde_json::to_vec(&request).map_or(0, |b| b.len() as u64);
        if bytes > MAX_REQUEST_BYTES {
            return Err(AgentError(format!(
                "the conversation has grown to {bytes} bytes, more than a request may be \
                 ({MAX_REQUEST_BYTES}): the model is not called again"
            )));
        }
        Ok(Proposal::Infer {
            reserve: self.reservation(&request),
        })
    }

    fn infer(&mut self, view: &AgentView) -> Result<Inference, AgentError> {
        self.start(view);
        let request = self.request();
        let digest = request_digest(&request);
        let reserved = self.reservation(&request);
        self.calls += 1;
        let n = self.calls;
        let max = self.config.max_steps;
        self.model
            .bound(view.time_left_ms.map(Duration::from_millis));
        let reply = self.model.complete(&request);
        let mut payload = Payload::new();
        payload.insert("model".into(), json!(self.config.model));
        let mut parameters = Map::new();
        parameters.insert("max_tokens".into(), json!(self.config.max_tokens));
        parameters.insert(
            "temperature".into(),
            self.config.temperature.map_or(Value::Null, |t| json!(t)),
        );
        if request.get("tool_choice").is_some() {
            parameters.insert("tool_choice".into(), json!("auto"));
        }
        payload.insert("parameters".into(), Value::Object(parameters));
        payload.insert("request_digest".into(), json!(digest));
        payload.insert("messages".into(), json!(self.messages.len()));
        let mut usage = Cost::default();
        let intent = match reply {
            ModelReply::Failed(f) => {
                payload.insert("latency_ms".into(), json!(f.latency_ms));
                let mut error = Map::new();
                error.insert("kind".into(), json!(f.kind.as_str()));
                error.insert("detail".into(), json!(f.detail));
                if let Some(s) = f.status {
                    error.insert("status".into(), json!(s));
                }
                payload.insert("error".into(), Value::Object(error));
                payload.insert("finish_reason".into(), Value::Null);
                // A call that timed out, or answered 2xx with a body ICE could not use, may
                // have had its tokens generated (and billed): it is costed at the reservation,
                // as an answer without usage is. A refused or unreachable call generated none.
                if f.kind.may_have_generated(f.status) {
                    usage.tokens_in = reserved.tokens_in;
                    usage.tokens_out = reserved.tokens_out;
                    payload.insert(
                        "usage".into(),
                        json!({
                            "prompt_tokens": usage.tokens_in,
                            "completion_tokens": usage.tokens_out,
                            "unreported": ["prompt_tokens", "completion_tokens"],
                        }),
                    );
                } else {
                    payload.insert(
                        "usage".into(),
                        json!({"prompt_tokens": null, "completion_tokens": null}),
                    );
                }
                self.failed(f.kind.as_str(), &f.detail);
                format!("model call {n}/{max} failed: {}", f.kind)
            }
            ModelReply::Ok {
                status,
                body,
                latency_ms,
            } => {
                let body = recordable(body, 1);
                payload.insert("status".into(), json!(status));
                payload.insert("latency_ms".into(), json!(latency_ms));
                // A figure the provider did not report as a whole number ≥ 0 (`recordable` made
                // `12.0` 12, and anything past 2^53-1 a string) is costed at the reservation
                // (`max_tokens` out, the request's estimate in), never as 0: a budget must stop
                // an endpoint that omits its usage (I-005). The payload's figures are what the
                // call is costed (as the event's cost); `unreported` names those that are the
                // reservation's rather than the provider's.
                let reported = |name: &str| {
                    body.get("usage")
                        .and_then(|u| u.get(name))
                        .and_then(Value::as_u64)
                };
                let (prompt, completion) =
                    (reported("prompt_tokens"), reported("completion_tokens"));
                usage.tokens_in = prompt.unwrap_or(reserved.tokens_in);
                usage.tokens_out = completion.unwrap_or(reserved.tokens_out);
                let mut figures = Map::new();
                figures.insert("prompt_tokens".into(), json!(usage.tokens_in));
                figures.insert("completion_tokens".into(), json!(usage.tokens_out));
                let unreported: Vec<&str> = [
                    ("prompt_tokens", prompt.is_none()),
                    ("completion_tokens", completion.is_none()),
                ]
                .into_iter()
                .filter_map(|(name, missing)| missing.then_some(name))
                .collect();
                if !unreported.is_empty() {
                    figures.insert("unreported".into(), json!(unreported));
                }
                payload.insert("usage".into(), Value::Object(figures));
                let intent = self.judge(&body, &mut payload, n);
                payload.insert("reply".into(), body);
                intent
            }
        };
        Ok(Inference {
            intent,
            payload,
            usage,
        })
    }
}
