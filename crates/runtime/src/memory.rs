//! Governed memory (spec §8): memory is not written, it is **promoted** from validated facts.
//!
//! - A memory is made only from a DOMAIN event (an effect or work the runtime carried out) of a
//!   run that committed: by a `[[memory.promote]]` rule of the run's spec when the run commits
//!   (recorded in the run, after `RunCommitted`), or by an operator ([`Runtime::promote_memory`],
//!   recorded in a maintenance run).
//! - Its id is the id (`run:seq`) of its `MemoryPromoted` event. The record keeps its kind,
//!   content, content digest (SHA-256 of the RFC 8785 encoding), confidence, sources
//!   (provenance), the memories mounted by the run its sources come from (`derived_from`, the
//!   lineage), scope, expiry and schema version.
//! - Lifecycle: `active → expired | deprecated | superseded(by) | invalidated`, each once, with a
//!   reason, as an event ([`Runtime::transition_memory`]); a memory that left as outdated
//!   (expired, deprecated, superseded) can still be invalidated once, when it turns out wrong.
//!   Invalidating a memory invalidates every memory derived from it, transitively, that is not
//!   invalidated yet, and names the runs that mounted them.
//! - A run mounts the active, unexpired memories its spec's `[memory] mount` names, at context
//!   time; `MemoryMounted` lists their ids, digests and kinds, and what was skipped and why.
//!
//! Everything here is a fold of the log ([`MemoryBook`]), rebuilt on demand (A-003). Operators'
//! transitions and expiries are recorded in short **maintenance runs** (A-001: no action exists
//! outside a run): one atomic batch that provisions, resolves, opens the window, records the
//! memory events, validates, commits and terminates. Transitions are serialised by the memory
//! registry's lock (an in-process mutex and the log's claim on [`REGISTRY_RUN`], with its file
//! lock), and the projection is re-read under it, so two concurrent transitions of one memory
//! cannot both pass the "still active" check.
//!
//! ```toml
//! [memory]
//! mount = { scopes = ["project"], ids = ["earlier-run:12"] }
//!
//! [[memory.promote]]
//! event = "FileRead"           # a DOMAIN event type
//! path = "docs"                # optional: only events on this workspace path or below it
//! # tool = "server/tool"       # or, for ToolInvoked: only calls to this tool
//! kind = "file"
//! scope = "project"
//! confidence = 0.9             # 0 to 1; default 1
//! ttl = "30d"                  # optional: expires this long after promotion (ms, s, m, h, d)
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ice_kernel::{
    Category, Digest, Draft, Event, EventId, EventType, MountedMemory, Origin, RunId, RunState,
    Timestamp,
};
use ice_log::EventLog;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::executor::{Ctx, Live, add_ms};
use crate::spec::RunSpec;
use crate::{Runtime, RuntimeError};

/// The memory record's schema version.
pub const SCHEMA_VERSION: u64 = 1;
/// The run id the memory registry's lock claims (it never holds events).
pub const REGISTRY_RUN: &str = "memory-registry";
/// Longest time-to-live a memory may be given: 100 years.
pub const MAX_TTL_MS: u64 = 36_500 * 86_400_000;
/// Most memories one run mounts; the rest are listed as skipped.
pub const MAX_MOUNTED: usize = 1000;
/// How long a command waits for the memory registry's lock.
const REGISTRY_WAIT: Duration = Duration::from_secs(30);
/// Memory events per appended batch at commit.
const PROMOTIONS_PER_BATCH: usize = 256;
/// `run_seq` of the first memory event of a maintenance run (after the six context events).
const MAINTENANCE_FIRST_SEQ: u64 = 6;

// ---------------------------------------------------------------------------------------------
// The run spec's `[memory]` section.

/// The `[memory]` section of a run spec: what the run promotes at commit and what it mounts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MemorySpec {
    /// `[[memory.promote]]`: rules that promote the run's DOMAIN events when it commits.
    #[serde(default)]
    pub promote: Vec<PromoteRule>,
    /// `[memory] mount`: the memories mounted at context time.
    #[serde(default)]
    pub mount: MountSpec,
}

// Confidences are checked finite (never NaN), so equality is an equivalence.
impl Eq for MemorySpec {}

/// One `[[memory.promote]]` rule: which DOMAIN events of the run become memories, and how.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PromoteRule {
    /// The DOMAIN event type (`FileRead`, `ToolInvoked`, …).
    pub event: String,
    /// Only events whose `path` (or listed `dir`) is this workspace path or below it (`.`: any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Only `ToolInvoked` calls of this `server/tool`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    /// The memory's type (`fact`, `file`, …).
    pub kind: String,
    /// The scope later runs mount it by.
    pub scope: String,
    /// Confidence in [0, 1].
    pub confidence: f64,
    /// Time to live after promotion, in milliseconds (none: no expiry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
}

impl Eq for PromoteRule {}

/// `[memory] mount = { scopes = [...], ids = [...] }`: the memories a run mounts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSpec {
    /// Every active memory of these scopes.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// These memories, by id.
    #[serde(default)]
    pub ids: Vec<EventId>,
}

impl MountSpec {
    /// Check and build a mount selection.
    pub fn new(scopes: Vec<String>, ids: Vec<String>) -> Result<MountSpec, String> {
        for s in &scopes {
            check_scope(s).map_err(|e| format!("mount scopes: {e}"))?;
        }
        let ids = ids
            .iter()
            .map(|i| {
                i.parse::<EventId>().map_err(|e| {
                    format!("mount ids: {i:?} is not a memory id (RUN_ID:RUN_SEQ): {e}")
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MountSpec { scopes, ids })
    }

    /// Whether the run mounts nothing.
    pub fn is_empty(&self) -> bool {
        self.scopes.is_empty() && self.ids.is_empty()
    }
}

/// DOMAIN types whose payload names a workspace `path` (or `dir`).
const PATH_TYPES: &[EventType] = &[
    EventType::FileRead,
    EventType::FileWritten,
    EventType::EffectStaged,
    EventType::EffectApplied,
];

impl PromoteRule {
    /// Check and build a rule. `ttl` is a duration such as `1ms`, `30s`, `12h`, `30d`.
    pub fn new(
        event: &str,
        path: Option<&str>,
        tool: Option<&str>,
        kind: &str,
        scope: &str,
        confidence: Option<f64>,
        ttl: Option<&str>,
    ) -> Result<PromoteRule, String> {
        let t = domain_type(event).map_err(|e| format!("event: {e}"))?;
        let path = match path {
            None => None,
            Some(_) if tool.is_some() => {
                return Err("give `path` or `tool`, not both".into());
            }
            Some(p) => {
                if !PATH_TYPES.contains(&t) {
                    return Err(format!(
                        "path: {event} events name no workspace path; `path` filters {}",
                        PATH_TYPES
                            .iter()
                            .map(|t| t.name())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
                let p = p.trim_end_matches('/');
                if p != "." {
                    ice_authority::Resource::path(p).map_err(|e| format!("path {p:?}: {e}"))?;
                }
                Some(p.to_string())
            }
        };
        let tool = match tool {
            None => None,
            Some(tl) => {
                if t != EventType::ToolInvoked {
                    return Err(format!(
                        "tool: only ToolInvoked events name a tool, not {event}"
                    ));
                }
                let (server, name) = tl
                    .split_once('/')
                    .ok_or_else(|| format!("tool {tl:?} is not of the form \"server/tool\""))?;
                ice_authority::Resource::tool(server, name)
                    .map_err(|e| format!("tool {tl:?}: {e}"))?;
                Some(tl.to_string())
            }
        };
        check_kind(kind).map_err(|e| format!("kind: {e}"))?;
        check_scope(scope).map_err(|e| format!("scope: {e}"))?;
        let confidence = confidence.unwrap_or(1.0);
        check_confidence(confidence).map_err(|e| format!("confidence: {e}"))?;
        let ttl_ms = ttl
            .map(parse_ttl)
            .transpose()
            .map_err(|e| format!("ttl: {e}"))?;
        Ok(PromoteRule {
            event: t.name().to_string(),
            path,
            tool,
            kind: kind.to_string(),
            scope: scope.to_string(),
            confidence,
            ttl_ms,
        })
    }

    /// Whether the rule promotes `e` (an event of a committed run). A tool call that failed
    /// (`is_error`) is not a fact worth remembering and never matches.
    pub fn matches(&self, e: &Event) -> bool {
        if e.event_type != self.event {
            return false;
        }
        if e.payload.get("is_error") == Some(&Value::Bool(true)) {
            return false;
        }
        if let Some(prefix) = &self.path {
            let p = e
                .payload
                .get("path")
                .or_else(|| e.payload.get("dir"))
                .and_then(Value::as_str);
            if !p.is_some_and(|p| under(p, prefix)) {
                return false;
            }
        }
        if let Some(tool) = &self.tool {
            let server = e.payload.get("server").and_then(Value::as_str);
            let name = e.payload.get("tool").and_then(Value::as_str);
            match (server, name) {
                (Some(s), Some(n)) if format!("{s}/{n}") == *tool => {}
                _ => return false,
            }
        }
        true
    }

    /// The rule in words, for the record.
    fn describe(&self, index: usize) -> String {
        let mut s = format!(
            "[[memory.promote]] rule {} (event = {}",
            index + 1,
            self.event
        );
        if let Some(p) = &self.path {
            s.push_str(&format!(", path = {p}"));
        }
        if let Some(t) = &self.tool {
            s.push_str(&format!(", tool = {t}"));
        }
        s.push(')');
        s
    }
}

/// Whether workspace path `p` is `prefix` or below it (whole segments; `.` is everything).
fn under(p: &str, prefix: &str) -> bool {
    prefix == "."
        || p == prefix
        || p.strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// The DOMAIN event type named `name`, or why it is not one.
pub fn domain_type(name: &str) -> Result<EventType, String> {
    let t = EventType::from_name(name).ok_or_else(|| {
        format!(
            "{name:?} is not an event type of taxonomy v{}",
            ice_kernel::TAXONOMY_VERSION
        )
    })?;
    if t.category() != Category::Domain {
        return Err(format!(
            "{name} is a {} event; only DOMAIN events ({}) can be promoted to memory",
            category_name(t.category()),
            EventType::ALL
                .iter()
                .filter(|t| t.category() == Category::Domain)
                .map(|t| t.name())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(t)
}

fn category_name(c: Category) -> &'static str {
    match c {
        Category::Runtime => "RUNTIME",
        Category::Operator => "OPERATOR",
        Category::Cognitive => "COGNITIVE",
        Category::Domain => "DOMAIN",
        Category::Memory => "MEMORY",
        Category::CapabilityRequest | Category::Capability => "CAPABILITY",
    }
}

/// A memory kind: 1 to 64 characters of `A-Z a-z 0-9 . _ -`.
pub fn check_kind(kind: &str) -> Result<(), String> {
    if kind.is_empty() || kind.len() > 64 {
        return Err(format!("{kind:?} must be 1 to 64 characters"));
    }
    if let Some(c) = kind
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{kind:?} contains {c:?}; allowed are A-Z a-z 0-9 . _ -"
        ));
    }
    Ok(())
}

/// A scope: 1 to 128 characters of `A-Z a-z 0-9 . _ - : /`.
pub fn check_scope(scope: &str) -> Result<(), String> {
    if scope.is_empty() || scope.len() > 128 {
        return Err(format!("{scope:?} must be 1 to 128 characters"));
    }
    if let Some(c) = scope
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '/')))
    {
        return Err(format!(
            "{scope:?} contains {c:?}; allowed are A-Z a-z 0-9 . _ - : /"
        ));
    }
    Ok(())
}

/// A confidence: a number from 0 to 1.
pub fn check_confidence(c: f64) -> Result<(), String> {
    if c.is_finite() && (0.0..=1.0).contains(&c) {
        Ok(())
    } else {
        Err(format!("{c} is not a number from 0 to 1"))
    }
}

/// Parse a time to live such as `1ms`, `30s`, `5m`, `12h`, `30d` into milliseconds (at least
/// 1 ms, at most [`MAX_TTL_MS`]).
pub fn parse_ttl(s: &str) -> Result<u64, String> {
    let ms = crate::spec::parse_duration_up_to(s, MAX_TTL_MS, "100 years")?.as_millis() as u64;
    if ms == 0 {
        return Err(format!("duration {:?} must be longer than zero", s.trim()));
    }
    Ok(ms)
}

// ---------------------------------------------------------------------------------------------
// The projection.

/// Where a memory stands in its lifecycle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum MemoryStatus {
    /// Mountable (unless past its expiry, which is recorded when found).
    Active,
    /// Past its expiry (`MemoryExpired`).
    Expired,
    /// Deprecated by an operator (`MemoryDeprecated`).
    Deprecated,
    /// Replaced by another memory (`MemorySuperseded`).
    Superseded {
        /// The memory that replaces it.
        by: EventId,
    },
    /// Found wrong, directly or through what it was derived from (`MemoryInvalidated`).
    Invalidated,
}

impl MemoryStatus {
    /// The status's name: `active`, `expired`, `deprecated`, `superseded`, `invalidated`.
    pub fn name(&self) -> &'static str {
        match self {
            MemoryStatus::Active => "active",
            MemoryStatus::Expired => "expired",
            MemoryStatus::Deprecated => "deprecated",
            MemoryStatus::Superseded { .. } => "superseded",
            MemoryStatus::Invalidated => "invalidated",
        }
    }
}

impl std::fmt::Display for MemoryStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MemoryStatus::Superseded { by } => write!(f, "superseded by {by}"),
            s => f.write_str(s.name()),
        }
    }
}

/// The event that moved a memory out of `active`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Transition {
    /// The `Memory*` event.
    pub event: EventId,
    /// When.
    pub at: Timestamp,
    /// Why.
    pub reason: String,
    /// The operator who asked for it (`operator:NAME`), if one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    /// For an invalidation that cascaded: the memory whose invalidation caused it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<EventId>,
}

/// How a memory invalidated later had first left `active`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Earlier {
    /// Its status then (`expired`, `deprecated` or `superseded`).
    #[serde(flatten)]
    pub status: MemoryStatus,
    /// The event that recorded it.
    #[serde(flatten)]
    pub transition: Transition,
}

/// One memory, folded from its `MemoryPromoted` event, its transitions and the runs that
/// mounted it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MemoryRecord {
    /// Its id: the id of its `MemoryPromoted` event.
    pub id: EventId,
    /// Its type (`fact`, `file`, …).
    pub kind: String,
    /// The content as stored in the event: a blob reference when it was large (see
    /// [`MemoryRecord::content_blob`] and [`Runtime::memory_content`]).
    pub content: Value,
    /// The blob holding the content, when it was moved out of the event.
    #[serde(skip)]
    pub content_blob: Option<Digest>,
    /// SHA-256 of the content's RFC 8785 encoding.
    pub digest: Digest,
    /// Confidence in [0, 1].
    pub confidence: f64,
    /// The DOMAIN events it was promoted from (provenance).
    pub sources: Vec<EventId>,
    /// The run of its sources.
    pub source_run: RunId,
    /// The type of its (first) source event.
    pub source_type: String,
    /// The memories mounted by the source run: what this memory was derived from.
    pub derived_from: Vec<EventId>,
    /// Its scope.
    pub scope: String,
    /// When it stops being mountable.
    pub expires_at: Option<Timestamp>,
    /// The record's schema version.
    pub schema_version: u64,
    /// When it was promoted.
    pub promoted_at: Timestamp,
    /// `rule` (a run spec's rule at commit) or `operator:NAME`.
    pub promoted_by: String,
    /// Why (the rule, or the operator's reason).
    pub reason: String,
    /// Its lifecycle status.
    #[serde(flatten)]
    pub status: MemoryStatus,
    /// The event that gave it its status: the one that moved it out of `active`, or, for a
    /// memory invalidated after it left `active` another way, the invalidation.
    pub transition: Option<Transition>,
    /// For a memory invalidated after it had expired, been deprecated or been superseded: that
    /// first exit from `active`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub earlier: Option<Earlier>,
    /// The runs that mounted it, in log order.
    pub mounted_by: Vec<RunId>,
}

impl MemoryRecord {
    /// Whether its expiry has passed at `now` (whether or not that is recorded yet).
    pub fn expired_at(&self, now: Timestamp) -> bool {
        self.expires_at.is_some_and(|t| now >= t)
    }

    /// Whether it may be mounted at `now`: active and not past its expiry.
    pub fn is_live(&self, now: Timestamp) -> bool {
        self.status == MemoryStatus::Active && !self.expired_at(now)
    }

    /// Active, but past its expiry and not yet recorded as expired.
    pub fn due_to_expire(&self, now: Timestamp) -> bool {
        self.status == MemoryStatus::Active && self.expired_at(now)
    }
}

/// Why the memory events of a log do not fold (only a log written by something other than
/// ICE's validator and runtime can hold such events).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("memory fold: event {event}: {problem}")]
pub struct MemoryFoldError {
    /// The event.
    pub event: EventId,
    /// What is wrong.
    pub problem: String,
}

/// Fold the log's events from `*next` on into `book` (copied first only if another holder
/// still shares it and a memory event comes), moving `*next` past them. On an error `book` may
/// hold part of what it read.
async fn catch_up(
    book: &mut Arc<MemoryBook>,
    log: &dyn EventLog,
    next: &mut u64,
) -> Result<(), MemoryError> {
    crate::follow(log, next, |s| {
        if folds(s.event_type) {
            Arc::make_mut(book).apply(&s.event()?)?;
        }
        Ok(())
    })
    .await
}

/// The memory book as of the log's head when it was last asked for, and where in the log that
/// was: each use folds only the events appended since (by this process or any other writer of
/// the log), not the whole log again.
#[derive(Debug, Default)]
pub(crate) struct MemoryCache {
    book: Arc<MemoryBook>,
    next: u64,
}

/// Every memory of a log, folded from its `Memory*` and `MemoryMounted` events in log order.
/// Pure: the same events give the same book.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MemoryBook {
    records: BTreeMap<EventId, MemoryRecord>,
    order: Vec<EventId>,
    children: BTreeMap<EventId, Vec<EventId>>,
}

#[derive(Deserialize)]
struct PromotedPayload {
    schema_version: u64,
    kind: String,
    content: Value,
    digest: Digest,
    confidence: f64,
    sources: Vec<EventId>,
    source_run: RunId,
    source_type: String,
    #[serde(default)]
    derived_from: Vec<EventId>,
    scope: String,
    #[serde(default)]
    expires_at: Option<Timestamp>,
    promoted_by: String,
    // Reasons read back as stand-ins where they went to the blob store (before reasons were
    // capped): the memory book still folds.
    #[serde(default, deserialize_with = "ice_kernel::blob::text_or_blob")]
    reason: String,
}

#[derive(Deserialize)]
struct TransitionPayload {
    memory: EventId,
    #[serde(default, deserialize_with = "ice_kernel::blob::text_or_blob")]
    reason: String,
    #[serde(default)]
    operator: Option<String>,
    #[serde(default)]
    by: Option<EventId>,
    #[serde(default)]
    origin: Option<EventId>,
}

/// Whether an event of this type changes the memory book.
pub fn folds(event_type: &str) -> bool {
    matches!(
        EventType::from_name(event_type),
        Some(
            EventType::MemoryPromoted
                | EventType::MemoryExpired
                | EventType::MemoryDeprecated
                | EventType::MemorySuperseded
                | EventType::MemoryInvalidated
                | EventType::MemoryMounted
        )
    )
}

impl MemoryBook {
    /// An empty book.
    pub fn new() -> MemoryBook {
        MemoryBook::default()
    }

    /// Fold one event (events of other types are ignored).
    pub fn apply(&mut self, e: &Event) -> Result<(), MemoryFoldError> {
        let fail = |problem: String| MemoryFoldError {
            event: e.id(),
            problem,
        };
        let Some(t) = EventType::from_name(&e.event_type) else {
            return Ok(());
        };
        match t {
            EventType::MemoryPromoted => {
                let p: PromotedPayload =
                    serde_json::from_value(Value::Object(e.payload.clone()))
                        .map_err(|err| fail(format!("MemoryPromoted payload: {err}")))?;
                if p.schema_version != SCHEMA_VERSION {
                    return Err(fail(format!(
                        "schema_version {} is not known (this ICE reads {SCHEMA_VERSION})",
                        p.schema_version
                    )));
                }
                check_confidence(p.confidence).map_err(|err| fail(format!("confidence {err}")))?;
                if p.sources.is_empty() {
                    return Err(fail("a memory needs at least one source event".into()));
                }
                for d in &p.derived_from {
                    if !self.records.contains_key(d) {
                        return Err(fail(format!(
                            "derived_from names {d}, which is not a memory promoted earlier"
                        )));
                    }
                }
                let content_blob = ice_kernel::blob::blob_refs(&e.payload)
                    .map_err(|err| fail(err.to_string()))?
                    .into_iter()
                    .find(|r| r.field == "content")
                    .map(|r| r.digest);
                let id = e.id();
                if self.records.contains_key(&id) {
                    return Err(fail("this memory was already promoted".into()));
                }
                for d in &p.derived_from {
                    self.children.entry(d.clone()).or_default().push(id.clone());
                }
                self.order.push(id.clone());
                self.records.insert(
                    id.clone(),
                    MemoryRecord {
                        id,
                        kind: p.kind,
                        content: p.content,
                        content_blob,
                        digest: p.digest,
                        confidence: p.confidence,
                        sources: p.sources,
                        source_run: p.source_run,
                        source_type: p.source_type,
                        derived_from: p.derived_from,
                        scope: p.scope,
                        expires_at: p.expires_at,
                        schema_version: p.schema_version,
                        promoted_at: e.at,
                        promoted_by: p.promoted_by,
                        reason: p.reason,
                        status: MemoryStatus::Active,
                        transition: None,
                        earlier: None,
                        mounted_by: Vec::new(),
                    },
                );
            }
            EventType::MemoryExpired
            | EventType::MemoryDeprecated
            | EventType::MemorySuperseded
            | EventType::MemoryInvalidated => {
                let p: TransitionPayload = serde_json::from_value(Value::Object(e.payload.clone()))
                    .map_err(|err| fail(format!("{t} payload: {err}")))?;
                let status = match t {
                    EventType::MemoryExpired => MemoryStatus::Expired,
                    EventType::MemoryDeprecated => MemoryStatus::Deprecated,
                    EventType::MemoryInvalidated => MemoryStatus::Invalidated,
                    _ => {
                        let by =
                            p.by.clone()
                                .ok_or_else(|| fail("MemorySuperseded names no `by`".into()))?;
                        if by == p.memory || !self.records.contains_key(&by) {
                            return Err(fail(format!(
                                "MemorySuperseded: `by` {by} is not another memory promoted earlier"
                            )));
                        }
                        MemoryStatus::Superseded { by }
                    }
                };
                let r = self.records.get_mut(&p.memory).ok_or_else(|| {
                    fail(format!("{t} names {}, which is not a memory", p.memory))
                })?;
                // A memory leaves `active` once. One that left it as outdated (expired,
                // deprecated, superseded) may still be found wrong, once: its content is judged,
                // not its currency, and what was derived from it must be flagged.
                if let Some(first) = &r.transition
                    && (status != MemoryStatus::Invalidated
                        || r.status == MemoryStatus::Invalidated)
                {
                    return Err(fail(format!(
                        "memory {} already left active ({} by {}); a memory leaves active only once, and is invalidated at most once",
                        p.memory, r.status, first.event
                    )));
                }
                let now = Transition {
                    event: e.id(),
                    at: e.at,
                    reason: p.reason,
                    operator: p.operator,
                    origin: p.origin,
                };
                if let Some(first) = r.transition.replace(now) {
                    r.earlier = Some(Earlier {
                        status: std::mem::replace(&mut r.status, status),
                        transition: first,
                    });
                } else {
                    r.status = status;
                }
            }
            EventType::MemoryMounted => {
                let Some(list) = e.payload.get("memories") else {
                    return Ok(());
                };
                let list = list
                    .as_array()
                    .ok_or_else(|| fail("MemoryMounted: `memories` is not a list".into()))?;
                for item in list {
                    let id: EventId = item
                        .get("id")
                        .and_then(Value::as_str)
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| fail("MemoryMounted: an entry has no memory id".into()))?;
                    let r = self.records.get_mut(&id).ok_or_else(|| {
                        fail(format!("MemoryMounted lists {id}, which is not a memory"))
                    })?;
                    if !r.mounted_by.contains(&e.run_id) {
                        r.mounted_by.push(e.run_id.clone());
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Fold events (in log order).
    pub fn fold<'a>(
        events: impl IntoIterator<Item = &'a Event>,
    ) -> Result<MemoryBook, MemoryFoldError> {
        let mut b = MemoryBook::new();
        for e in events {
            b.apply(e)?;
        }
        Ok(b)
    }

    /// Fold the whole log, streaming it page by page (only memory records are kept).
    pub async fn load(log: &dyn EventLog) -> Result<MemoryBook, MemoryError> {
        let mut book = Arc::new(MemoryBook::new());
        catch_up(&mut book, log, &mut 0).await?;
        Ok(Arc::unwrap_or_clone(book))
    }

    /// A memory by id.
    pub fn get(&self, id: &EventId) -> Option<&MemoryRecord> {
        self.records.get(id)
    }

    /// Every memory, in the order they were promoted.
    pub fn iter(&self) -> impl Iterator<Item = &MemoryRecord> {
        self.order.iter().filter_map(|id| self.records.get(id))
    }

    /// How many memories there are.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The memories derived directly from `id` (promoted from runs that mounted it).
    pub fn derived(&self, id: &EventId) -> &[EventId] {
        self.children.get(id).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Every memory derived from `id`, transitively (through memories of any status), each
    /// with the memory it was derived from, breadth first.
    pub fn descendants(&self, id: &EventId) -> Vec<(EventId, EventId)> {
        let mut out = Vec::new();
        let mut seen: HashSet<&EventId> = HashSet::from([id]);
        let mut queue: VecDeque<&EventId> = VecDeque::from([id]);
        while let Some(parent) = queue.pop_front() {
            for child in self.derived(parent) {
                if seen.insert(child) {
                    out.push((child.clone(), parent.clone()));
                    queue.push_back(child);
                }
            }
        }
        out
    }

    /// Active memories past their expiry at `now` whose `MemoryExpired` is not recorded yet.
    pub fn due_to_expire(&self, now: Timestamp) -> Vec<&MemoryRecord> {
        self.iter().filter(|r| r.due_to_expire(now)).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Errors.

/// Why a memory operation was refused or failed. Refusals write nothing.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// No memory has this id.
    #[error(
        "no memory {0}: a memory's id is the id of its MemoryPromoted event (see `ice memory list --all`)"
    )]
    Unknown(EventId),
    /// The event to promote is not in the log.
    #[error("no event {0} in the log")]
    NoEvent(EventId),
    /// The event to promote is not a DOMAIN event.
    #[error(
        "{event} is a {event_type} event ({category}); only DOMAIN events (effects and work the runtime carried out) can be promoted to memory"
    )]
    NotDomain {
        /// The event.
        event: EventId,
        /// Its type.
        event_type: String,
        /// Its taxonomy row.
        category: String,
    },
    /// The event's run did not commit.
    #[error(
        "{event} belongs to run {run}, which is {state} and did not commit ({detail}); only facts of committed runs can be promoted"
    )]
    NotCommitted {
        /// The event.
        event: EventId,
        /// Its run.
        run: RunId,
        /// The run's state.
        state: RunState,
        /// How it ended (or that it has not).
        detail: String,
    },
    /// The memory already left `active` (and, for an invalidation, is already invalidated).
    #[error(
        "memory {memory} already left active: it is {status} (event {event}: {reason}); a memory leaves active only once, and is invalidated at most once"
    )]
    AlreadyTransitioned {
        /// The memory.
        memory: EventId,
        /// Its status.
        status: MemoryStatus,
        /// The event that gave it that status (for a memory invalidated after it left `active`
        /// another way, the invalidation).
        event: EventId,
        /// Why.
        reason: String,
    },
    /// The event is already an active memory of the same kind, scope and content: promoting
    /// it again would make a duplicate.
    #[error(
        "{source_event} is already active memory {memory} (kind {kind}, scope {scope}); it is not promoted twice"
    )]
    AlreadyActive {
        /// The event whose promotion was refused.
        source_event: EventId,
        /// The active memory it already is.
        memory: EventId,
        /// Its kind.
        kind: String,
        /// Its scope.
        scope: String,
    },
    /// A field of the request is refused. The message names the field as the request spells
    /// it (`ttl_ms`, `reason`, `by`, …: [`MemoryField::name`]), which is also how the API's
    /// bodies spell it; a front end whose callers name it otherwise (the CLI's `--ttl`) words
    /// the message with [`MemoryError::message_naming`].
    #[error("{}", problem.describe(&format!("`{}`", field.name())))]
    Field {
        /// The field.
        field: MemoryField,
        /// What is wrong with it.
        problem: FieldProblem,
    },
    /// Bad input.
    #[error("{0}")]
    Invalid(String),
    /// The log's memory events do not fold.
    #[error(transparent)]
    Fold(#[from] MemoryFoldError),
    /// The log, the validator or a lock failed.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

impl MemoryError {
    /// The error's message with the field it refuses (if any) called what `name` calls it:
    /// the CLI passes its flags (`--ttl` for [`MemoryField::TtlMs`]). Any other error's
    /// message is its `Display`.
    pub fn message_naming(&self, name: impl Fn(MemoryField) -> String) -> String {
        match self {
            MemoryError::Field { field, problem } => problem.describe(&name(*field)),
            other => other.to_string(),
        }
    }
}

/// A field of a memory operation's request: of [`PromoteRequest`], or an argument of
/// [`Runtime::transition_memory`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryField {
    /// The memory's kind.
    Kind,
    /// The memory's scope.
    Scope,
    /// The memory's confidence.
    Confidence,
    /// The memory's time to live, in milliseconds.
    TtlMs,
    /// Why (recorded).
    Reason,
    /// The memory that supersedes another.
    By,
}

impl MemoryField {
    /// The field's name in a request: `kind`, `scope`, `confidence`, `ttl_ms`, `reason`, `by`.
    pub fn name(self) -> &'static str {
        match self {
            MemoryField::Kind => "kind",
            MemoryField::Scope => "scope",
            MemoryField::Confidence => "confidence",
            MemoryField::TtlMs => "ttl_ms",
            MemoryField::Reason => "reason",
            MemoryField::By => "by",
        }
    }
}

/// What is wrong with a [`MemoryField`].
#[derive(Clone, Debug, PartialEq)]
pub enum FieldProblem {
    /// The value does not check; why.
    Invalid(String),
    /// A time to live (ms) that is not from 1 ms to 100 years ([`MAX_TTL_MS`]).
    TtlOutOfRange(u64),
    /// Empty (or only whitespace) where the operation records it.
    Missing {
        /// The operation: `a promotion`, `invalidate`, `deprecate`, `supersede`.
        operation: &'static str,
    },
    /// The memory named is no longer active, so it cannot supersede another.
    NotActive {
        /// The memory named.
        memory: EventId,
        /// Its status.
        status: MemoryStatus,
        /// The event that moved it out of `active`.
        event: EventId,
    },
    /// The memory named is past its expiry, so it cannot supersede another.
    Expired {
        /// The memory named.
        memory: EventId,
        /// When it expired.
        at: Timestamp,
    },
}

/// A reason is recorded in the event's payload as a string, where the folds read it: one
/// longer than [`ice_kernel::limits::MAX_TEXT_LEN`] is refused (past the blob threshold it would
/// be moved to the blob store, and the record would no longer fold).
pub fn reason_too_long(reason: &str) -> Option<FieldProblem> {
    let max = ice_kernel::limits::MAX_TEXT_LEN;
    (reason.len() > max).then(|| {
        FieldProblem::Invalid(format!(
            "{} bytes; a reason is at most {max} bytes",
            reason.len()
        ))
    })
}

impl FieldProblem {
    /// The problem in words, calling the field `field` (`` `ttl_ms` ``, `--ttl`).
    pub fn describe(&self, field: &str) -> String {
        match self {
            FieldProblem::Invalid(why) => format!("{field}: {why}"),
            FieldProblem::TtlOutOfRange(ms) => {
                format!("{field} must be from 1 ms to 100 years, not {ms} ms")
            }
            FieldProblem::Missing { operation } => {
                format!("{operation} needs a {field} (it is recorded)")
            }
            FieldProblem::NotActive {
                memory,
                status,
                event,
            } => format!(
                "{field} {memory} is {status} (event {event}); a memory is superseded only by an active one"
            ),
            FieldProblem::Expired { memory, at } => format!(
                "{field} {memory} expired at {at}; a memory is superseded only by an active one"
            ),
        }
    }
}

impl From<ice_log::LogError> for MemoryError {
    fn from(e: ice_log::LogError) -> Self {
        MemoryError::Runtime(RuntimeError::Log(e))
    }
}

impl From<ice_log::ledger::AppendError> for MemoryError {
    fn from(e: ice_log::ledger::AppendError) -> Self {
        MemoryError::Runtime(RuntimeError::Append(e))
    }
}

impl From<MemoryError> for RuntimeError {
    fn from(e: MemoryError) -> Self {
        match e {
            MemoryError::Runtime(e) => e,
            other => RuntimeError::Invalid(other.to_string()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The registry lock.

/// The memory registry's lock: held while a transition (or a mount, or a promotion with
/// lineage) checks the projection and appends, so no two of them interleave.
pub(crate) struct RegistryGuard {
    _lock: crate::lock::RunLock,
    _local: tokio::sync::OwnedMutexGuard<()>,
}

/// The in-process half of the registry lock, one per installation.
fn local_registry(runs_dir: &Path) -> Arc<tokio::sync::Mutex<()>> {
    type Locks = std::sync::Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>;
    static LOCKS: OnceLock<Locks> = OnceLock::new();
    let mut m = LOCKS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    m.entry(runs_dir.to_path_buf()).or_default().clone()
}

fn registry_run() -> RunId {
    RunId::new(REGISTRY_RUN).expect("a valid run id")
}

impl Runtime {
    /// Take the memory registry's lock: this process's mutex, then the registry's file lock
    /// and, on a shared log, its claim (waiting up to 30 s for other processes and nodes).
    pub(crate) async fn lock_registry(&self) -> Result<RegistryGuard, RuntimeError> {
        let local = local_registry(&self.install.runs_dir).lock_owned().await;
        let run = registry_run();
        let deadline = Instant::now() + REGISTRY_WAIT;
        loop {
            match self.lock_run(&run).await {
                Ok(lock) => {
                    return Ok(RegistryGuard {
                        _lock: lock,
                        _local: local,
                    });
                }
                Err(RuntimeError::Busy(_) | RuntimeError::Claimed(_))
                    if Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(RuntimeError::Busy(_) | RuntimeError::Claimed(_)) => {
                    return Err(RuntimeError::Busy(format!(
                        "{REGISTRY_RUN} (the memory registry; waited {}s)",
                        REGISTRY_WAIT.as_secs()
                    )));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shared pieces: content, lineage, drafts, maintenance runs.

/// SHA-256 of a value's RFC 8785 encoding.
pub fn content_digest(content: &Value) -> Digest {
    Digest::of(&ice_kernel::canonical::canonicalize(content).unwrap_or_default())
}

/// What a memory promoted from `e` holds: the event's payload with large fields fetched back
/// from the blob store, without its `evidence` (which stays in the source event, cited by the
/// memory's `sources`).
async fn content_of(log: &dyn EventLog, e: &Event) -> Result<Value, MemoryError> {
    let mut fetched = HashMap::new();
    for r in ice_kernel::blob::blob_refs(&e.payload).map_err(MemoryError::Invalid)? {
        let bytes = log.blob(&r.digest).await?.ok_or_else(|| {
            MemoryError::Invalid(format!(
                "{}: blob {} of field {:?} is missing from the log",
                e.id(),
                r.digest,
                r.field
            ))
        })?;
        fetched.insert(r.digest, bytes);
    }
    let mut payload = ice_kernel::blob::inline(&e.payload, |d| fetched.get(d).cloned());
    payload.remove("evidence");
    Ok(Value::Object(payload))
}

/// The memories a run mounted (from its `MemoryMounted` event).
fn mounted_ids(events: &[Event]) -> Vec<EventId> {
    let mut out = Vec::new();
    for e in events
        .iter()
        .filter(|e| e.event_type == EventType::MemoryMounted.name())
    {
        for item in e
            .payload
            .get("memories")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(id) = item
                .get("id")
                .and_then(Value::as_str)
                .and_then(|s| s.parse::<EventId>().ok())
                && !out.contains(&id)
            {
                out.push(id);
            }
        }
    }
    out
}

/// What one `MemoryPromoted` will say.
struct Promotion {
    source: EventId,
    source_type: String,
    kind: String,
    scope: String,
    confidence: f64,
    ttl_ms: Option<u64>,
    content: Value,
    derived_from: Vec<EventId>,
    promoted_by: String,
    reason: String,
    rule: Option<usize>,
}

impl Promotion {
    fn draft(&self, now: Timestamp) -> Draft {
        let expires_at = self.ttl_ms.map(|ms| add_ms(now, ms).to_string());
        let mut p = json!({
            "schema_version": SCHEMA_VERSION,
            "kind": self.kind,
            "content": self.content,
            "digest": content_digest(&self.content).to_hex(),
            "confidence": self.confidence,
            "sources": [self.source.to_string()],
            "source_run": self.source.run_id.as_str(),
            "source_type": self.source_type,
            "derived_from": self.derived_from.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "scope": self.scope,
            "expires_at": expires_at,
            "promoted_by": self.promoted_by,
            "reason": self.reason,
        });
        if let Some(ms) = self.ttl_ms {
            p["ttl_ms"] = json!(ms);
        }
        if let Some(i) = self.rule {
            p["rule"] = json!(i + 1);
        }
        Draft::new(EventType::MemoryPromoted.name(), Origin::Runtime)
            .payload(p)
            .cause(self.source.clone())
    }
}

fn transition_draft(t: EventType, memory: &EventId, payload: Map<String, Value>) -> Draft {
    let mut p = payload;
    p.insert("memory".into(), json!(memory.to_string()));
    Draft::new(t.name(), Origin::Runtime)
        .payload(Value::Object(p))
        .cause(memory.clone())
}

fn expiry_draft(r: &MemoryRecord, found: &str) -> Draft {
    let at = r.expires_at.map(|t| t.to_string()).unwrap_or_default();
    let mut p = Map::new();
    p.insert("reason".into(), json!(format!("expired at {at}; {found}")));
    p.insert("expires_at".into(), json!(at));
    transition_draft(EventType::MemoryExpired, &r.id, p)
}

fn operator_origin(operator: &str) -> Result<String, MemoryError> {
    let o = format!("operator:{operator}");
    o.parse::<Origin>()
        .map_err(|e| MemoryError::Invalid(format!("operator {operator:?}: {e}")))?;
    Ok(o)
}

fn random_suffix() -> String {
    let mut b = [0u8; 4];
    let _ = getrandom::fill(&mut b);
    hex::encode(b)
}

impl Runtime {
    /// Record memory events in a maintenance run: one atomic batch that provisions the run,
    /// resolves its context, mounts nothing, binds no capability, opens the window, records
    /// `build(run)` (whose first event is at `run_seq` 6), validates, commits and terminates.
    /// Returns the run and the memory events as recorded.
    async fn maintenance(
        &self,
        op: &str,
        operator: Option<&str>,
        reason: &str,
        subject: Value,
        build: impl Fn(&RunId) -> Vec<Draft>,
    ) -> Result<(RunId, Vec<Event>), MemoryError> {
        let by = operator.map_or_else(|| "runtime".to_string(), str::to_string);
        let rt = |t: EventType, p: Value| Draft::new(t.name(), Origin::Runtime).payload(p);
        for _ in 0..4 {
            let run = RunId::new(format!("memory-{op}-{}", random_suffix()))
                .map_err(MemoryError::Invalid)?;
            if !self.ledger.log().read_run(&run, 0, 1).await?.is_empty() {
                continue;
            }
            let memory = build(&run);
            let n = memory.len();
            let mut drafts = vec![
                rt(
                    EventType::RunProvisioned,
                    json!({
                        "kind": "memory",
                        "op": op,
                        "operator": by,
                        "reason": reason,
                        "subject": subject,
                        "taxonomy": ice_kernel::TAXONOMY_VERSION,
                        "decision_rules": crate::DECISION_RULES,
                    }),
                ),
                rt(EventType::ResourcesAllocated, json!({"kind": "memory"})),
                rt(
                    EventType::ContextResolved,
                    json!({"kind": "memory", "registry": REGISTRY_RUN}),
                ),
                rt(
                    EventType::MemoryMounted,
                    json!({"memories": [], "skipped": []}),
                ),
                rt(EventType::CapabilitiesBound, json!({})),
                rt(EventType::ExecutionWindowOpened, json!({"operator": by})),
            ];
            drafts.extend(memory);
            drafts.extend([
                rt(EventType::ValidationStarted, json!({"checks": ["memory_registry"]})),
                rt(
                    EventType::ValidationPassed,
                    json!({"results": [{"check": "memory_registry", "passed": true,
                        "detail": "each transition checked against the memory projection, re-read under the registry lock"}]}),
                ),
                rt(
                    EventType::RunCommitted,
                    json!({"applied": 0, "memory_events": n}),
                ),
                rt(EventType::ResourcesReleased, json!({"stage": "none"})),
                rt(EventType::RunTerminated, json!({"outcome": "committed"})),
            ]);
            match self.ledger.append(&run, drafts).await {
                Ok((_, batch)) => {
                    let events = batch
                        .events()
                        .iter()
                        .skip(MAINTENANCE_FIRST_SEQ as usize)
                        .take(n)
                        .map(|s| s.event().clone())
                        .collect();
                    return Ok((run, events));
                }
                Err(ice_log::ledger::AppendError::Log(ice_log::LogError::Conflict { .. })) => {
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(MemoryError::Invalid(
            "could not find a free maintenance run id; try again".into(),
        ))
    }

    /// Record `MemoryExpired` for every memory past its expiry, in a maintenance run (none if
    /// nothing is due). Call under the registry lock.
    async fn record_expiries(
        &self,
        book: &MemoryBook,
        now: Timestamp,
        found: &str,
    ) -> Result<Vec<(EventId, EventId)>, MemoryError> {
        let due = book.due_to_expire(now);
        if due.is_empty() {
            return Ok(Vec::new());
        }
        let (_, events) = self
            .maintenance(
                "expire",
                None,
                found,
                json!({"memories": due.iter().map(|r| r.id.to_string()).collect::<Vec<_>>()}),
                |_| due.iter().map(|r| expiry_draft(r, found)).collect(),
            )
            .await?;
        Ok(due
            .iter()
            .zip(events)
            .map(|(r, e)| (r.id.clone(), e.id()))
            .collect())
    }

    /// The memory book as of the log's head now (the fold of the whole log): the one kept from
    /// the last call, brought up to date with the events appended since, shared, not copied.
    /// A fold error drops what was kept, so the next call folds the whole log again (and
    /// reports the error again if it is in the log).
    pub async fn memories(&self) -> Result<Arc<MemoryBook>, MemoryError> {
        let mut cache = self.memory.lock().await;
        let MemoryCache { book, next } = &mut *cache;
        match catch_up(book, self.ledger.log().as_ref(), next).await {
            Ok(()) => Ok(cache.book.clone()),
            Err(e) => {
                *cache = MemoryCache::default();
                Err(e)
            }
        }
    }

    /// A memory's content (fetched from the blob store when it was large).
    pub async fn memory_content(&self, record: &MemoryRecord) -> Result<Value, MemoryError> {
        resolve_content(self.ledger.log().as_ref(), record).await
    }
}

/// A memory's content, fetched from the blob store when it was moved out of its event.
pub async fn resolve_content(
    log: &dyn EventLog,
    record: &MemoryRecord,
) -> Result<Value, MemoryError> {
    let Some(d) = record.content_blob else {
        return Ok(record.content.clone());
    };
    let bytes = log.blob(&d).await?.ok_or_else(|| {
        MemoryError::Invalid(format!(
            "memory {}: its content blob {d} is missing from the log",
            record.id
        ))
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        MemoryError::Invalid(format!(
            "memory {}: its content blob {d} is not JSON: {e}",
            record.id
        ))
    })
}

// ---------------------------------------------------------------------------------------------
// Promotion by rule, at commit.

/// Promote the committed run's DOMAIN events its spec's `[[memory.promote]]` rules match:
/// one `MemoryPromoted` per (event, matching rule), the same content once per rule, recorded
/// in the run after `RunCommitted` and before its teardown. Each memory is derived from the
/// memories the run mounted; if one of those was invalidated meanwhile, the new memory is
/// invalidated in the same batch (the registry lock is held while this is checked and
/// recorded, so an invalidation cannot slip in between). A promotion the log could not carry
/// is left out.
pub(crate) async fn promote_at_commit(ctx: &Ctx<'_>, live: &mut Live) -> Result<(), RuntimeError> {
    let rules = live.spec.memory.promote.clone();
    if rules.is_empty() || live.books.state() != RunState::Committed {
        return Ok(());
    }
    let log = ctx.rt.ledger.log().clone();
    let events = crate::read_run(log.as_ref(), &ctx.run).await?;
    let derived_from = mounted_ids(&events);
    let mut planned = Vec::new();
    // The same fact seen twice in a run (two reads of one unchanged file) is promoted once
    // per rule.
    let mut seen: HashSet<(usize, Digest)> = HashSet::new();
    for e in &events {
        let Some(t) = EventType::from_name(&e.event_type) else {
            continue;
        };
        if t.category() != Category::Domain {
            continue;
        }
        let mut content = None;
        for (i, rule) in rules.iter().enumerate() {
            if !rule.matches(e) {
                continue;
            }
            if content.is_none() {
                let c = content_of(log.as_ref(), e).await?;
                let d = content_digest(&c);
                content = Some((c, d));
            }
            let Some((content, digest)) = &content else {
                continue;
            };
            if !seen.insert((i, *digest)) {
                continue;
            }
            planned.push(Promotion {
                source: e.id(),
                source_type: e.event_type.clone(),
                kind: rule.kind.clone(),
                scope: rule.scope.clone(),
                confidence: rule.confidence,
                ttl_ms: rule.ttl_ms,
                content: content.clone(),
                derived_from: derived_from.clone(),
                promoted_by: "rule".into(),
                reason: rule.describe(i),
                rule: Some(i),
            });
        }
    }
    if planned.is_empty() {
        return Ok(());
    }
    let now = ctx.now();
    planned.retain(|p| ctx.unrecordable(live, &p.draft(now)).is_none());
    // Lineage: the memories this run mounted must still be valid, checked under the lock.
    let (_guard, tainted) = if derived_from.is_empty() {
        (None, Vec::new())
    } else {
        let guard = ctx.rt.lock_registry().await?;
        let book = ctx.rt.memories().await?;
        let tainted: Vec<(EventId, EventId, String)> = derived_from
            .iter()
            .filter_map(|d| book.get(d))
            .filter(|r| r.status == MemoryStatus::Invalidated)
            .filter_map(|r| {
                let t = r.transition.as_ref()?;
                Some((r.id.clone(), t.event.clone(), t.reason.clone()))
            })
            .collect();
        (Some(guard), tainted)
    };
    for chunk in planned.chunks(PROMOTIONS_PER_BATCH) {
        ctx.append(live, |next| {
            let mut out = Vec::new();
            for p in chunk {
                let id = EventId::new(ctx.run.clone(), next + out.len() as u64);
                out.push(p.draft(now));
                if let Some((origin, event, why)) = tainted.first() {
                    let mut m = Map::new();
                    m.insert(
                        "reason".into(),
                        json!(format!(
                            "derived from memory {origin}, which was invalidated by {event} before this memory was promoted: {why}"
                        )),
                    );
                    m.insert("origin".into(), json!(origin.to_string()));
                    m.insert("via".into(), json!(origin.to_string()));
                    out.push(
                        transition_draft(EventType::MemoryInvalidated, &id, m)
                            .cause(event.clone()),
                    );
                }
            }
            out
        })
        .await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Mounting, at context time.

/// The memories a run mounts, and the `MemoryMounted` payload that records them.
pub(crate) struct Mounting {
    /// What the agent is shown.
    pub(crate) memories: Vec<MountedMemory>,
    /// `{memories: [{id, digest, kind}], skipped: [{id, reason}]}` (and the selection).
    pub(crate) payload: Value,
    /// Held until the run's `MemoryMounted` is recorded, so no transition interleaves.
    _guard: Option<RegistryGuard>,
}

/// Select the active, unexpired memories `spec`'s `[memory] mount` names (by scope or by id).
/// Memories found past their expiry are skipped and their `MemoryExpired` recorded (in a
/// maintenance run); a memory named by id that is not active is skipped with its status; a
/// memory whose content does not match its digest is skipped, and so is one of the same kind
/// and content as one already mounted (the same fact promoted from several runs).
pub(crate) async fn mount(
    rt: &Runtime,
    spec: &RunSpec,
    run: &RunId,
) -> Result<Mounting, RuntimeError> {
    let sel = &spec.memory.mount;
    if sel.is_empty() {
        return Ok(Mounting {
            memories: Vec::new(),
            payload: json!({"memories": [], "skipped": []}),
            _guard: None,
        });
    }
    let guard = rt.lock_registry().await?;
    let log = rt.ledger.log().clone();
    let book = rt.memories().await?;
    let now = rt.clock.now();
    let expired: HashMap<EventId, EventId> = rt
        .record_expiries(&book, now, &format!("found at mount by run {run}"))
        .await?
        .into_iter()
        .collect();
    let scopes: BTreeSet<&str> = sel.scopes.iter().map(String::as_str).collect();
    let mut memories = Vec::new();
    let mut listed = Vec::new();
    let mut skipped = Vec::new();
    let mut contents: HashMap<(String, Digest), EventId> = HashMap::new();
    let mut skip = |id: &EventId, reason: String| {
        skipped.push(json!({"id": id.to_string(), "reason": reason}));
    };
    for id in &sel.ids {
        if book.get(id).is_none() {
            skip(id, "no such memory".into());
        }
    }
    for r in book.iter() {
        let by_id = sel.ids.contains(&r.id);
        if !by_id && !scopes.contains(r.scope.as_str()) {
            continue;
        }
        if let Some(event) = expired.get(&r.id) {
            let at = r.expires_at.map(|t| t.to_string()).unwrap_or_default();
            skip(&r.id, format!("expired at {at} (recorded as {event})"));
            continue;
        }
        if r.status != MemoryStatus::Active {
            // Memories of a mounted scope that left active long ago are not candidates; one
            // named by id is reported.
            if by_id {
                let event = r
                    .transition
                    .as_ref()
                    .map(|t| t.event.to_string())
                    .unwrap_or_default();
                skip(&r.id, format!("{} (event {event})", r.status));
            }
            continue;
        }
        if let Some(same) = contents.get(&(r.kind.clone(), r.digest)) {
            skip(&r.id, format!("same kind and content as {same}, mounted"));
            continue;
        }
        if memories.len() >= MAX_MOUNTED {
            skip(&r.id, format!("more than {MAX_MOUNTED} memories selected"));
            continue;
        }
        let content = match resolve_content(log.as_ref(), r).await {
            Ok(c) => c,
            Err(e) => {
                skip(&r.id, format!("content unavailable: {e}"));
                continue;
            }
        };
        if content_digest(&content) != r.digest {
            skip(
                &r.id,
                "its content does not match its recorded digest".into(),
            );
            continue;
        }
        contents.insert((r.kind.clone(), r.digest), r.id.clone());
        listed.push(json!({"id": r.id.to_string(), "digest": r.digest.to_hex(), "kind": r.kind}));
        memories.push(MountedMemory {
            id: r.id.to_string(),
            kind: r.kind.clone(),
            content,
            digest: r.digest,
            confidence: r.confidence,
        });
    }
    let payload = json!({
        "memories": listed,
        "skipped": skipped,
        "selection": {
            "scopes": sel.scopes,
            "ids": sel.ids.iter().map(ToString::to_string).collect::<Vec<_>>(),
        },
    });
    Ok(Mounting {
        memories,
        payload,
        _guard: Some(guard),
    })
}

// ---------------------------------------------------------------------------------------------
// Operators: promotion and lifecycle transitions.

/// An operator's promotion of a DOMAIN event of a committed run.
#[derive(Clone, Debug, PartialEq)]
pub struct PromoteRequest {
    /// The DOMAIN event.
    pub source: EventId,
    /// The memory's type.
    pub kind: String,
    /// Its scope.
    pub scope: String,
    /// Confidence in [0, 1].
    pub confidence: f64,
    /// Time to live, in milliseconds.
    pub ttl_ms: Option<u64>,
    /// Why (recorded).
    pub reason: String,
    /// Who (recorded as `operator:NAME`).
    pub operator: String,
}

/// What a promotion recorded.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PromoteReport {
    /// The maintenance run it was recorded in.
    pub run: RunId,
    /// The new memory's id.
    pub memory: EventId,
    /// Its content digest.
    pub digest: Digest,
    /// The memories it was derived from (those its source run mounted).
    pub derived_from: Vec<EventId>,
    /// When it expires.
    pub expires_at: Option<Timestamp>,
    /// Memories found past their expiry, whose `MemoryExpired` was recorded in the same run:
    /// (memory, event).
    pub expired: Vec<(EventId, EventId)>,
}

/// A lifecycle transition an operator asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemoryAction {
    /// The memory is wrong: invalidate it and every memory derived from it (transitively) that
    /// is not invalidated yet. Allowed also for a memory that already expired, was deprecated
    /// or was superseded: being outdated does not make it right.
    Invalidate,
    /// The memory is outdated.
    Deprecate,
    /// Another memory replaces it.
    Supersede {
        /// The memory that replaces it.
        by: EventId,
    },
}

impl MemoryAction {
    fn event_type(&self) -> EventType {
        match self {
            MemoryAction::Invalidate => EventType::MemoryInvalidated,
            MemoryAction::Deprecate => EventType::MemoryDeprecated,
            MemoryAction::Supersede { .. } => EventType::MemorySuperseded,
        }
    }

    fn op(&self) -> &'static str {
        match self {
            MemoryAction::Invalidate => "invalidate",
            MemoryAction::Deprecate => "deprecate",
            MemoryAction::Supersede { .. } => "supersede",
        }
    }
}

/// One memory moved out of `active`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Transitioned {
    /// The memory.
    pub memory: EventId,
    /// The event that records it.
    pub event: EventId,
    /// For a cascaded invalidation: the memory it was derived from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via: Option<EventId>,
    /// The runs that mounted this memory.
    pub mounted_by: Vec<RunId>,
}

/// What a lifecycle transition recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TransitionReport {
    /// The maintenance run it was recorded in.
    pub run: RunId,
    /// `invalidated`, `deprecated` or `superseded`.
    pub status: String,
    /// The memory the operator named.
    pub memory: Transitioned,
    /// Memories invalidated because they were derived from it (transitively).
    pub cascaded: Vec<Transitioned>,
    /// Memories found past their expiry, recorded in the same run: (memory, event).
    pub expired: Vec<(EventId, EventId)>,
}

impl TransitionReport {
    /// Every run that mounted a memory this transition moved out of `active`, once each.
    pub fn mounting_runs(&self) -> Vec<RunId> {
        let mut out: Vec<RunId> = Vec::new();
        for t in std::iter::once(&self.memory).chain(&self.cascaded) {
            for r in &t.mounted_by {
                if !out.contains(r) {
                    out.push(r.clone());
                }
            }
        }
        out
    }
}

impl Runtime {
    /// An operator promotes a DOMAIN event of a committed run to memory. Refused, with nothing
    /// written, when the event is missing or not DOMAIN, when its run did not commit, when a
    /// memory its run mounted (what it derives from) was invalidated, or when the same event is
    /// already an active memory of that kind and scope.
    pub async fn promote_memory(&self, req: &PromoteRequest) -> Result<PromoteReport, MemoryError> {
        let refuse = |field, problem| MemoryError::Field { field, problem };
        let invalid = |field| move |e| refuse(field, FieldProblem::Invalid(e));
        check_kind(&req.kind).map_err(invalid(MemoryField::Kind))?;
        check_scope(&req.scope).map_err(invalid(MemoryField::Scope))?;
        check_confidence(req.confidence).map_err(invalid(MemoryField::Confidence))?;
        if let Some(ms) = req.ttl_ms
            && (ms == 0 || ms > MAX_TTL_MS)
        {
            return Err(refuse(MemoryField::TtlMs, FieldProblem::TtlOutOfRange(ms)));
        }
        let reason = req.reason.trim();
        if reason.is_empty() {
            return Err(refuse(
                MemoryField::Reason,
                FieldProblem::Missing {
                    operation: "a promotion",
                },
            ));
        }
        if let Some(p) = reason_too_long(reason) {
            return Err(refuse(MemoryField::Reason, p));
        }
        let operator = operator_origin(&req.operator)?;
        let log = self.ledger.log().clone();
        let stored = log
            .get(&req.source)
            .await?
            .ok_or_else(|| MemoryError::NoEvent(req.source.clone()))?;
        let source = stored.event()?;
        let t = EventType::from_name(&source.event_type);
        if t.map(EventType::category) != Some(Category::Domain) {
            return Err(MemoryError::NotDomain {
                event: req.source.clone(),
                event_type: source.event_type.clone(),
                category: t
                    .map_or("unknown", |t| category_name(t.category()))
                    .to_string(),
            });
        }
        let run = source.run_id.clone();
        let events = crate::read_run(log.as_ref(), &run).await?;
        let has = |t: EventType| events.iter().any(|e| e.event_type == t.name());
        if !has(EventType::RunCommitted) {
            let state = self.ledger.head(&run).await?.state();
            let detail = if has(EventType::RunAborted) {
                "it was aborted"
            } else if has(EventType::RunTerminatedByRuntime) {
                "it was terminated by the runtime"
            } else {
                "it has not finished"
            };
            return Err(MemoryError::NotCommitted {
                event: req.source.clone(),
                run,
                state,
                detail: detail.into(),
            });
        }
        let content = content_of(log.as_ref(), &source).await?;
        let digest = content_digest(&content);
        let derived_from = mounted_ids(&events);
        let _guard = self.lock_registry().await?;
        let book = self.memories().await?;
        for d in &derived_from {
            if let Some(r) = book.get(d)
                && r.status == MemoryStatus::Invalidated
            {
                return Err(MemoryError::Invalid(format!(
                    "run {run} mounted memory {d}, which is invalidated ({}); a memory derived from it cannot be promoted",
                    r.transition
                        .as_ref()
                        .map(|t| format!("event {}: {}", t.event, t.reason))
                        .unwrap_or_default()
                )));
            }
        }
        // A memory past its expiry is no longer active, recorded or not: promoting the event
        // again is no duplicate.
        let at = self.clock.now();
        if let Some(dup) = book.iter().find(|r| {
            r.status == MemoryStatus::Active
                && !r.expired_at(at)
                && r.sources.contains(&req.source)
                && r.kind == req.kind
                && r.scope == req.scope
                && r.digest == digest
        }) {
            return Err(MemoryError::AlreadyActive {
                source_event: req.source.clone(),
                memory: dup.id.clone(),
                kind: dup.kind.clone(),
                scope: dup.scope.clone(),
            });
        }
        let now = self.clock.now();
        let due: Vec<&MemoryRecord> = book.due_to_expire(now);
        let promotion = Promotion {
            source: req.source.clone(),
            source_type: source.event_type.clone(),
            kind: req.kind.clone(),
            scope: req.scope.clone(),
            confidence: req.confidence,
            ttl_ms: req.ttl_ms,
            content,
            derived_from: derived_from.clone(),
            promoted_by: operator.clone(),
            reason: reason.to_string(),
            rule: None,
        };
        let found = format!("found by {operator}'s promotion of {}", req.source);
        let (run, recorded) = self
            .maintenance(
                "promote",
                Some(&operator),
                reason,
                json!({"source": req.source.to_string()}),
                |_| {
                    let mut v: Vec<Draft> = due.iter().map(|r| expiry_draft(r, &found)).collect();
                    let mut d = promotion.draft(now);
                    d.payload.insert("operator".into(), json!(operator));
                    v.push(d);
                    v
                },
            )
            .await?;
        let promoted = recorded.last().ok_or_else(|| {
            MemoryError::Invalid("the maintenance run recorded no promotion".into())
        })?;
        let expires_at = promoted
            .payload
            .get("expires_at")
            .and_then(Value::as_str)
            .and_then(|s| Timestamp::parse(s).ok());
        Ok(PromoteReport {
            run,
            memory: promoted.id(),
            digest,
            derived_from,
            expires_at,
            expired: due
                .iter()
                .zip(&recorded)
                .map(|(r, e)| (r.id.clone(), e.id()))
                .collect(),
        })
    }

    /// An operator moves a memory out of `active`: invalidate (cascading to every memory derived
    /// from it, transitively, that is not invalidated yet), deprecate, or supersede by another
    /// active memory. A memory leaves `active` once: a second deprecation or supersession is
    /// refused, naming the first. A memory that left `active` as outdated (expired, deprecated,
    /// superseded) can still be invalidated, once, so that what was derived from it is flagged;
    /// its first exit stays in its record ([`MemoryRecord::earlier`]). The check and the
    /// record happen under the registry lock, against the log re-read under it. Memories found
    /// past their expiry are recorded as expired in the same maintenance run (and if the named
    /// memory is one of them, a deprecation or supersession is refused; an invalidation is
    /// recorded after its expiry).
    pub async fn transition_memory(
        &self,
        memory: &EventId,
        action: MemoryAction,
        reason: &str,
        operator: &str,
    ) -> Result<TransitionReport, MemoryError> {
        let reason = reason.trim();
        if reason.is_empty() {
            return Err(MemoryError::Field {
                field: MemoryField::Reason,
                problem: FieldProblem::Missing {
                    operation: action.op(),
                },
            });
        }
        if let Some(problem) = reason_too_long(reason) {
            return Err(MemoryError::Field {
                field: MemoryField::Reason,
                problem,
            });
        }
        let operator = operator_origin(operator)?;
        let _guard = self.lock_registry().await?;
        let book = self.memories().await?;
        let now = self.clock.now();
        let refuse_if_left =
            |id: &EventId, invalidating: bool| -> Result<&MemoryRecord, MemoryError> {
                let r = book
                    .get(id)
                    .ok_or_else(|| MemoryError::Unknown(id.clone()))?;
                // A memory that left `active` as outdated may still be found wrong (once).
                if let Some(t) = &r.transition
                    && (!invalidating || r.status == MemoryStatus::Invalidated)
                {
                    return Err(MemoryError::AlreadyTransitioned {
                        memory: id.clone(),
                        status: r.status.clone(),
                        event: t.event.clone(),
                        reason: t.reason.clone(),
                    });
                }
                Ok(r)
            };
        let invalidating = action == MemoryAction::Invalidate;
        let target = refuse_if_left(memory, invalidating)?;
        if let MemoryAction::Supersede { by } = &action {
            if by == memory {
                return Err(MemoryError::Invalid(format!(
                    "memory {memory} cannot supersede itself"
                )));
            }
            let b = refuse_if_left(by, false).map_err(|e| match e {
                MemoryError::AlreadyTransitioned { status, event, .. } => MemoryError::Field {
                    field: MemoryField::By,
                    problem: FieldProblem::NotActive {
                        memory: by.clone(),
                        status,
                        event,
                    },
                },
                other => other,
            })?;
            if let Some(at) = b.expires_at
                && b.expired_at(now)
            {
                return Err(MemoryError::Field {
                    field: MemoryField::By,
                    problem: FieldProblem::Expired {
                        memory: by.clone(),
                        at,
                    },
                });
            }
        }
        let found = format!("found by {operator}'s {} of {memory}", action.op());
        // Found past its expiry: recorded as expired, and only invalidation goes on (below, in
        // the same maintenance run, after the expiry).
        if target.due_to_expire(now) && !invalidating {
            let expired = self.record_expiries(&book, now, &found).await?;
            let event = expired
                .iter()
                .find(|(m, _)| m == memory)
                .map(|(_, e)| e.clone())
                .ok_or_else(|| MemoryError::Invalid(format!("memory {memory} expired")))?;
            return Err(MemoryError::AlreadyTransitioned {
                memory: memory.clone(),
                status: MemoryStatus::Expired,
                event,
                reason: format!(
                    "expired at {}",
                    target.expires_at.map(|t| t.to_string()).unwrap_or_default()
                ),
            });
        }
        let due: Vec<&MemoryRecord> = book.due_to_expire(now);
        // Every memory derived from it, whatever its status, unless already invalidated (those
        // past their expiry are recorded as expired first, in the same run).
        let cascade: Vec<(EventId, EventId)> = if invalidating {
            book.descendants(memory)
                .into_iter()
                .filter(|(d, _)| {
                    book.get(d)
                        .is_some_and(|r| r.status != MemoryStatus::Invalidated)
                })
                .collect()
        } else {
            Vec::new()
        };
        let t = action.event_type();
        let subject = json!({"memory": memory.to_string()});
        let (run, recorded) = self
            .maintenance(action.op(), Some(&operator), reason, subject, |run| {
                let mut v: Vec<Draft> = due.iter().map(|r| expiry_draft(r, &found)).collect();
                let root_event = EventId::new(run.clone(), MAINTENANCE_FIRST_SEQ + v.len() as u64);
                let mut p = Map::new();
                p.insert("reason".into(), json!(reason));
                p.insert("operator".into(), json!(operator));
                v.push(match &action {
                    MemoryAction::Supersede { by } => {
                        p.insert("by".into(), json!(by.to_string()));
                        transition_draft(t, memory, p).cause(by.clone())
                    }
                    _ => transition_draft(t, memory, p),
                });
                for (m, via) in &cascade {
                    let mut p = Map::new();
                    p.insert(
                        "reason".into(),
                        json!(format!(
                            "derived from memory {via}, invalidated by the invalidation of {memory} ({root_event}): {reason}"
                        )),
                    );
                    p.insert("operator".into(), json!(operator));
                    p.insert("origin".into(), json!(memory.to_string()));
                    p.insert("via".into(), json!(via.to_string()));
                    v.push(
                        transition_draft(EventType::MemoryInvalidated, m, p)
                            .cause(root_event.clone()),
                    );
                }
                v
            })
            .await?;
        let mounted = |id: &EventId| {
            book.get(id)
                .map(|r| r.mounted_by.clone())
                .unwrap_or_default()
        };
        let root = &recorded[due.len()];
        Ok(TransitionReport {
            run,
            status: match action {
                MemoryAction::Invalidate => "invalidated",
                MemoryAction::Deprecate => "deprecated",
                MemoryAction::Supersede { .. } => "superseded",
            }
            .to_string(),
            memory: Transitioned {
                memory: memory.clone(),
                event: root.id(),
                via: None,
                mounted_by: mounted(memory),
            },
            cascaded: cascade
                .iter()
                .zip(&recorded[due.len() + 1..])
                .map(|((m, via), e)| Transitioned {
                    memory: m.clone(),
                    event: e.id(),
                    via: Some(via.clone()),
                    mounted_by: mounted(m),
                })
                .collect(),
            expired: due
                .iter()
                .zip(&recorded)
                .map(|(r, e)| (r.id.clone(), e.id()))
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The finding (memory probe): a reason over the blob threshold was moved to the blob store
    /// and its reference did not read as text, so the memory book stopped folding and every
    /// memory command failed for good. Such records read back with a stand-in naming the blob.
    #[test]
    fn reasons_moved_to_the_blob_store_still_fold() {
        let digest = "cd".repeat(32);
        let reason = serde_json::json!({"$blob": digest, "size": 17_002});
        let t: TransitionPayload = serde_json::from_value(serde_json::json!({
            "memory": "maint-1:3",
            "reason": reason,
        }))
        .unwrap();
        assert_eq!(
            t.reason,
            format!("[text of 17002 bytes, kept in blob {digest}]")
        );
        let p: PromotedPayload = serde_json::from_value(serde_json::json!({
            "schema_version": 1, "kind": "file", "content": "x", "digest": "ab".repeat(32),
            "confidence": 0.5, "sources": ["src:10"], "source_run": "src",
            "source_type": "FileRead", "scope": "project", "promoted_by": "operator:alice",
            "reason": reason,
        }))
        .unwrap();
        assert!(p.reason.starts_with("[text of 17002 bytes"), "{}", p.reason);
    }
}
