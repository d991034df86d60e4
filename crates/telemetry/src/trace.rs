//! Spans built from events: a run is a trace, each capability request and each model call a
//! child span of the run's span, everything else a span event carrying its `ice.event_id`.
//!
//! The builder is a pure fold (events in, finished [`SpanData`] out): ids and times come from
//! the events alone, so every node, and a later re-export from the log, builds the same spans.

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ice_kernel::{Event, EventType, Lifecycle, RunId, RunState, Timestamp};
use opentelemetry::trace::{
    Event as SpanEvent, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{Array, InstrumentationScope, KeyValue, StringValue, Value as OtelValue};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
use serde_json::Value;
use sha2::{Digest as _, Sha256};

/// Most runs followed at once. When a new run would pass it, the run that has been quiet
/// longest is let go: its open child spans are exported as they stand and its run span is
/// dropped (counted in [`SpanBuilder::over_limit`]).
pub const MAX_TRACED_RUNS: usize = 10_000;
/// Most spans open at once in one run (requests waiting for an outcome, model calls waiting
/// for their settlement).
pub const MAX_OPEN_SPANS: usize = 1_000;
/// Most span events kept on one span (the rest are counted in the span's dropped count).
pub const MAX_SPAN_EVENTS: usize = 1_000;

/// The trace id of a run: the first 16 bytes of SHA-256 of its id.
pub fn trace_id(run: &RunId) -> TraceId {
    let d = Sha256::digest(run.as_str().as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    if b == [0; 16] {
        b[15] = 1;
    }
    TraceId::from_bytes(b)
}

/// The span id of a run's root span: the first 8 bytes of SHA-256 of `run:<run id>`.
pub fn run_span_id(run: &RunId) -> SpanId {
    span_id_of(&format!("run:{run}"))
}

/// The span id of the span an event opens (a request, a model call): the first 8 bytes of
/// SHA-256 of `span:<event id>`.
pub fn event_span_id(event: &ice_kernel::EventId) -> SpanId {
    span_id_of(&format!("span:{event}"))
}

fn span_id_of(s: &str) -> SpanId {
    let d = Sha256::digest(s.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    if b == [0; 8] {
        b[7] = 1;
    }
    SpanId::from_bytes(b)
}

pub(crate) fn time(t: Timestamp) -> SystemTime {
    let us = t.unix_us();
    if us >= 0 {
        UNIX_EPOCH + Duration::from_micros(us as u64)
    } else {
        UNIX_EPOCH
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OpenKind {
    Request,
    Model,
}

/// A child span waiting for its outcome.
struct Open {
    kind: OpenKind,
    id: SpanId,
    name: String,
    start: SystemTime,
    end: SystemTime,
    attributes: Vec<KeyValue>,
    events: Vec<SpanEvent>,
    dropped: u32,
    status: Status,
    effect: bool,
}

impl Open {
    fn push(&mut self, ev: SpanEvent) {
        self.end = self.end.max(ev.timestamp);
        if self.events.len() < MAX_SPAN_EVENTS {
            self.events.push(ev);
        } else {
            self.dropped += 1;
        }
    }
}

/// What the builder keeps of one run until it terminates.
struct RunTrace {
    trace: TraceId,
    root: SpanId,
    /// `RunProvisioned`'s time, or the first event seen (a run followed from the middle).
    start: SystemTime,
    partial: bool,
    attributes: Vec<KeyValue>,
    events: Vec<SpanEvent>,
    dropped: u32,
    life: Lifecycle,
    /// The time of the last event seen.
    last: SystemTime,
    /// The state before TERMINATED (COMMITTED, ABORTED, TERMINATED_BY_RUNTIME).
    ending: Option<RunState>,
    abort: Option<String>,
    open: HashMap<u64, Open>,
    /// Event (`run_seq`) → the open span it belongs to (the key in `open`): later events that
    /// name it as a cause join that span.
    anchors: HashMap<u64, u64>,
    /// Budget reservations not (yet) tied to a span: a model call's reservation precedes it.
    reservations: HashMap<u64, SpanEvent>,
}

impl RunTrace {
    fn push(&mut self, ev: SpanEvent) {
        if self.events.len() < MAX_SPAN_EVENTS {
            self.events.push(ev);
        } else {
            self.dropped += 1;
        }
    }
}

/// Builds spans from a stream of events (several runs interleaved).
pub struct SpanBuilder {
    runs: HashMap<RunId, RunTrace>,
    scope: InstrumentationScope,
    /// Spans given up because [`MAX_TRACED_RUNS`] or [`MAX_OPEN_SPANS`] was reached.
    pub over_limit: u64,
}

impl Default for SpanBuilder {
    fn default() -> Self {
        SpanBuilder::new()
    }
}

impl SpanBuilder {
    /// An empty builder.
    pub fn new() -> SpanBuilder {
        SpanBuilder {
            runs: HashMap::new(),
            scope: InstrumentationScope::builder("ice-telemetry")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
            over_limit: 0,
        }
    }

    /// Runs with a trace in progress.
    pub fn open_runs(&self) -> usize {
        self.runs.len()
    }

    /// Let go of the run that has been quiet longest (see [`MAX_TRACED_RUNS`]).
    fn evict_quietest(&mut self, out: &mut Vec<SpanData>) {
        let Some(quietest) = self
            .runs
            .iter()
            .min_by_key(|(_, r)| r.last)
            .map(|(id, _)| id.clone())
        else {
            return;
        };
        let mut run = self.runs.remove(&quietest).expect("present");
        let mut open: Vec<(u64, Open)> = run.open.drain().collect();
        open.sort_by_key(|(k, _)| *k);
        for (_, o) in open {
            out.push(finish(run.trace, run.root, o, &self.scope));
        }
        self.over_limit += 1;
    }

    /// Fold one event; spans it finishes are pushed to `out`.
    pub fn feed(&mut self, e: &Event, out: &mut Vec<SpanData>) {
        let Some(t) = EventType::from_name(&e.event_type) else {
            return;
        };
        let at = time(e.at);
        if !self.runs.contains_key(&e.run_id) {
            if self.runs.len() >= MAX_TRACED_RUNS {
                self.evict_quietest(out);
            }
            self.runs.insert(
                e.run_id.clone(),
                RunTrace {
                    trace: trace_id(&e.run_id),
                    root: run_span_id(&e.run_id),
                    start: at,
                    partial: t != EventType::RunProvisioned,
                    attributes: vec![KeyValue::new("ice.run.id", e.run_id.to_string())],
                    events: Vec::new(),
                    dropped: 0,
                    life: Lifecycle::default(),
                    last: at,
                    ending: None,
                    abort: None,
                    open: HashMap::new(),
                    anchors: HashMap::new(),
                    reservations: HashMap::new(),
                },
            );
        }
        let scope = self.scope.clone();
        let run = self.runs.get_mut(&e.run_id).expect("inserted above");
        run.last = run.last.max(at);
        if let Ok(next) = run.life.step(t) {
            run.life = next;
        }
        if matches!(
            t,
            EventType::RunCommitted | EventType::RunAborted | EventType::RunTerminatedByRuntime
        ) {
            run.ending = Some(run.life.state);
        }
        // The open span this event joins: the first of its causes (in this run) that is one.
        let joined = e
            .causes
            .iter()
            .filter(|c| c.run_id == e.run_id)
            .find_map(|c| run.anchors.get(&c.run_seq).copied());
        let ev = span_event(e);
        match t {
            EventType::RunProvisioned => {
                run.start = at;
                run.partial = false;
                let p = &e.payload;
                for (key, field) in [
                    ("ice.agent", "agent"),
                    ("ice.driver", "driver"),
                    ("ice.run.kind", "kind"),
                    ("ice.client", "client"),
                ] {
                    if let Some(v) = p.get(field).and_then(Value::as_str) {
                        run.attributes.push(KeyValue::new(key, v.to_string()));
                    }
                }
                run.attributes
                    .push(KeyValue::new("ice.event_id", e.id().to_string()));
                run.push(ev);
            }
            EventType::CapabilityRequested => {
                if run.open.len() >= MAX_OPEN_SPANS {
                    self.over_limit += 1;
                    run.push(ev);
                    return;
                }
                let capability = str_of(e, "capability");
                let mut attributes = vec![
                    KeyValue::new("ice.event_id", e.id().to_string()),
                    KeyValue::new("ice.capability", capability.clone()),
                    KeyValue::new("ice.target", cut(&str_of(e, "target"), 512)),
                    KeyValue::new("ice.agent", agent_of(e)),
                ];
                if let Some(i) = &e.intent {
                    attributes.push(KeyValue::new("ice.intent", cut(i, 512)));
                }
                let mut open = Open {
                    kind: OpenKind::Request,
                    id: event_span_id(&e.id()),
                    name: format!("request {capability}"),
                    start: at,
                    end: at,
                    attributes,
                    events: Vec::new(),
                    dropped: 0,
                    status: Status::Unset,
                    effect: false,
                };
                open.push(ev);
                run.open.insert(e.run_seq, open);
                run.anchors.insert(e.run_seq, e.run_seq);
            }
            EventType::InferenceStep => {
                let key = e.run_seq;
                let mut open = model_span(e, at);
                // Its reservation (recorded before the call) joins it; the settlement that
                // names the reservation as its cause closes it.
                for c in e.causes.iter().filter(|c| c.run_id == e.run_id) {
                    if let Some(r) = run.reservations.remove(&c.run_seq) {
                        open.events.insert(0, r);
                        run.anchors.insert(c.run_seq, key);
                    }
                }
                open.push(ev);
                if run.open.len() >= MAX_OPEN_SPANS {
                    self.over_limit += 1;
                    out.push(finish(run.trace, run.root, open, &scope));
                    return;
                }
                run.open.insert(key, open);
                run.anchors.insert(key, key);
            }
            EventType::BudgetReserved if joined.is_none() => {
                run.reservations.insert(e.run_seq, ev);
            }
            EventType::BudgetSettled
                if joined.is_none()
                    && e.causes
                        .iter()
                        .any(|c| run.reservations.contains_key(&c.run_seq)) =>
            {
                // A model call that failed before it was recorded: both go to the run span.
                for c in &e.causes {
                    if let Some(r) = run.reservations.remove(&c.run_seq) {
                        run.push(r);
                    }
                }
                run.push(ev);
            }
            _ if joined.is_some() => {
                let key = joined.expect("checked");
                let Some(open) = run.open.get_mut(&key) else {
                    run.push(ev);
                    return;
                };
                open.push(ev);
                run.anchors.insert(e.run_seq, key);
                let close = match (open.kind, t) {
                    (OpenKind::Request, EventType::CapabilityGranted) => {
                        let decision = if e.payload.get("approval").is_some_and(|a| !a.is_null()) {
                            "approval"
                        } else {
                            "permit"
                        };
                        set(&mut open.attributes, "ice.decision", decision);
                        set(&mut open.attributes, "ice.grant", e.id().to_string());
                        false
                    }
                    (OpenKind::Request, EventType::ApprovalRequested) => {
                        set(&mut open.attributes, "ice.decision", "approval");
                        set(&mut open.attributes, "ice.approval", e.id().to_string());
                        false
                    }
                    (OpenKind::Request, EventType::CapabilityUsed) => {
                        if !has(&open.attributes, "ice.decision") {
                            set(&mut open.attributes, "ice.decision", "reuse");
                        }
                        if let Some(g) = &e.authority {
                            set(&mut open.attributes, "ice.grant", g.clone());
                        }
                        false
                    }
                    (OpenKind::Request, EventType::CapabilityDenied) => {
                        if !has(&open.attributes, "ice.decision") {
                            set(&mut open.attributes, "ice.decision", "deny");
                        }
                        set(&mut open.attributes, "ice.outcome", "denied");
                        let reason = str_of(e, "reason");
                        set(&mut open.attributes, "ice.denial.reason", reason.clone());
                        set(
                            &mut open.attributes,
                            "ice.denial.event_id",
                            e.id().to_string(),
                        );
                        if reason == "effect_failed" || reason == "outcome_unknown" {
                            open.status = Status::error(format!(
                                "{reason}: {}",
                                cut(&str_of(e, "detail"), 256)
                            ));
                        }
                        true
                    }
                    (OpenKind::Request, t) if crate::metrics::is_effect(t) => {
                        open.effect = true;
                        // The effect took its own time before it was recorded (a read is
                        // recorded in one batch with its request, all at one instant): the
                        // span covers at least that time, ending when it was recorded.
                        if let Some(s) = at.checked_sub(Duration::from_micros(e.cost.wall_time_us))
                        {
                            open.start = open.start.min(s);
                        }
                        set(&mut open.attributes, "ice.outcome", "done");
                        set(&mut open.attributes, "ice.effect", t.name());
                        set(
                            &mut open.attributes,
                            "ice.effect.event_id",
                            e.id().to_string(),
                        );
                        if e.payload.get("is_error").and_then(Value::as_bool) == Some(true) {
                            open.status = Status::error(format!("{} reported an error", t.name()));
                        }
                        false
                    }
                    (OpenKind::Request, EventType::BudgetSettled) => open.effect,
                    (OpenKind::Model, EventType::BudgetSettled) => true,
                    _ => false,
                };
                if close {
                    let open = run.open.remove(&key).expect("present");
                    run.anchors.retain(|_, k| *k != key);
                    out.push(finish(run.trace, run.root, open, &scope));
                }
            }
            EventType::RunAborted | EventType::AbortReasonDeclared => {
                if let Some(r) = e.payload.get("reason").and_then(Value::as_str) {
                    run.abort.get_or_insert_with(|| r.to_string());
                }
                run.push(ev);
            }
            EventType::RunTerminated => {
                run.push(ev);
                let mut run = self.runs.remove(&e.run_id).expect("present");
                // Spans still open (an approval never answered, a model call never settled)
                // end with their last event.
                let mut open: Vec<(u64, Open)> = run.open.drain().collect();
                open.sort_by_key(|(k, _)| *k);
                for (_, o) in open {
                    out.push(finish(run.trace, run.root, o, &scope));
                }
                let mut rest: Vec<(u64, SpanEvent)> = run.reservations.drain().collect();
                rest.sort_by_key(|(k, _)| *k);
                let mut events = Vec::with_capacity(rest.len() + run.events.len());
                events.extend(rest.into_iter().map(|(_, r)| r));
                events.append(&mut run.events);
                events.sort_by_key(|ev| ev.timestamp);
                run.events = events;
                out.push(finish_run(run, e, at, &scope));
            }
            _ => run.push(ev),
        }
    }
}

/// `chat {model}`: a model call, after the GenAI semantic conventions.
fn model_span(e: &Event, at: SystemTime) -> Open {
    let p = &e.payload;
    let model = p.get("model").and_then(Value::as_str).unwrap_or("unknown");
    let latency = p
        .get("latency_ms")
        .and_then(Value::as_u64)
        .map(Duration::from_millis)
        .filter(|d| !d.is_zero())
        .unwrap_or(Duration::from_micros(e.cost.wall_time_us));
    let mut a = vec![
        KeyValue::new("gen_ai.operation.name", "chat"),
        KeyValue::new("gen_ai.system", "openai"),
        KeyValue::new("gen_ai.provider.name", "openai"),
        KeyValue::new("gen_ai.request.model", model.to_string()),
        KeyValue::new("ice.event_id", e.id().to_string()),
        KeyValue::new("ice.agent", agent_of(e)),
    ];
    let params = p.get("parameters");
    if let Some(n) = params
        .and_then(|v| v.get("max_tokens"))
        .and_then(Value::as_i64)
    {
        a.push(KeyValue::new("gen_ai.request.max_tokens", n));
    }
    if let Some(t) = params
        .and_then(|v| v.get("temperature"))
        .and_then(Value::as_f64)
    {
        a.push(KeyValue::new("gen_ai.request.temperature", t));
    }
    if let Some(f) = p.get("finish_reason").and_then(Value::as_str) {
        a.push(KeyValue::new(
            "gen_ai.response.finish_reasons",
            OtelValue::Array(Array::String(vec![StringValue::from(f.to_string())])),
        ));
    }
    let usage = p.get("usage");
    if let Some(n) = usage
        .and_then(|u| u.get("prompt_tokens"))
        .and_then(Value::as_i64)
    {
        a.push(KeyValue::new("gen_ai.usage.input_tokens", n));
    }
    if let Some(n) = usage
        .and_then(|u| u.get("completion_tokens"))
        .and_then(Value::as_i64)
    {
        a.push(KeyValue::new("gen_ai.usage.output_tokens", n));
    }
    if let Some(r) = p.get("reply") {
        if let Some(id) = r.get("id").and_then(Value::as_str) {
            a.push(KeyValue::new("gen_ai.response.id", cut(id, 256)));
        }
        if let Some(m) = r.get("model").and_then(Value::as_str) {
            a.push(KeyValue::new("gen_ai.response.model", cut(m, 256)));
        }
    }
    if let Some(d) = p.get("request_digest").and_then(Value::as_str) {
        a.push(KeyValue::new("ice.request_digest", d.to_string()));
    }
    let mut status = Status::Unset;
    if let Some(err) = p.get("error").filter(|v| !v.is_null()) {
        let kind = err
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("error")
            .to_string();
        let detail = err.get("detail").and_then(Value::as_str).unwrap_or("");
        status = Status::error(format!("{kind}: {}", cut(detail, 256)));
        a.push(KeyValue::new("error.type", kind));
    }
    Open {
        kind: OpenKind::Model,
        id: event_span_id(&e.id()),
        name: format!("chat {model}"),
        start: at.checked_sub(latency).unwrap_or(at),
        end: at,
        attributes: a,
        events: Vec::new(),
        dropped: 0,
        status,
        effect: false,
    }
}

fn finish(trace: TraceId, root: SpanId, o: Open, scope: &InstrumentationScope) -> SpanData {
    let mut events = SpanEvents::default();
    events.events = o.events;
    events.dropped_count = o.dropped;
    SpanData {
        span_context: SpanContext::new(trace, o.id, TraceFlags::SAMPLED, false, TraceState::NONE),
        parent_span_id: root,
        parent_span_is_remote: false,
        span_kind: match o.kind {
            OpenKind::Model => SpanKind::Client,
            OpenKind::Request => SpanKind::Internal,
        },
        name: Cow::Owned(o.name),
        start_time: o.start,
        end_time: o.end.max(o.start),
        attributes: o.attributes,
        dropped_attributes_count: 0,
        events,
        links: SpanLinks::default(),
        status: o.status,
        instrumentation_scope: scope.clone(),
    }
}

fn finish_run(
    mut run: RunTrace,
    terminated: &Event,
    at: SystemTime,
    scope: &InstrumentationScope,
) -> SpanData {
    let ending = run.ending.unwrap_or(RunState::Terminated);
    run.attributes
        .push(KeyValue::new("ice.run.state", ending.name()));
    if let Some(o) = terminated.payload.get("outcome").and_then(Value::as_str) {
        run.attributes
            .push(KeyValue::new("ice.run.outcome", o.to_string()));
    }
    if run.partial {
        run.attributes.push(KeyValue::new("ice.run.partial", true));
    }
    let status = match (ending, &run.abort) {
        (RunState::Committed, _) => Status::Ok,
        (_, Some(r)) => {
            run.attributes
                .push(KeyValue::new("ice.run.abort_reason", r.clone()));
            Status::error(format!("run {}: {r}", ending.name()))
        }
        (RunState::TerminatedByRuntime, None) => Status::error("terminated by the runtime"),
        _ => Status::Unset,
    };
    let mut events = SpanEvents::default();
    events.events = run.events;
    events.dropped_count = run.dropped;
    SpanData {
        span_context: SpanContext::new(
            run.trace,
            run.root,
            TraceFlags::SAMPLED,
            false,
            TraceState::NONE,
        ),
        parent_span_id: SpanId::INVALID,
        parent_span_is_remote: false,
        span_kind: SpanKind::Internal,
        name: Cow::Borrowed("ice.run"),
        start_time: run.start,
        end_time: at.max(run.start),
        attributes: run.attributes,
        dropped_attributes_count: 0,
        events,
        links: SpanLinks::default(),
        status,
        instrumentation_scope: scope.clone(),
    }
}

/// The span event of an event: named by its type, at its time, with `ice.event_id`, its
/// origin, authority, non-zero costs and the (slimmed) payload's fields as `ice.<field>`.
fn span_event(e: &Event) -> SpanEvent {
    let mut a = vec![KeyValue::new("ice.event_id", e.id().to_string())];
    let origin = e.origin.to_string();
    if let Some(op) = origin.strip_prefix("operator:") {
        a.push(KeyValue::new("ice.operator", op.to_string()));
    }
    if origin != "runtime" {
        a.push(KeyValue::new("ice.origin", origin));
    }
    if let Some(auth) = &e.authority {
        a.push(KeyValue::new("ice.authority", auth.clone()));
    }
    for (name, v) in e.cost.fields() {
        if v > 0 {
            a.push(KeyValue::new(format!("ice.cost.{name}"), v as i64));
        }
    }
    for (k, v) in &e.payload {
        flatten(&mut a, &format!("ice.{k}"), v, 0);
    }
    SpanEvent::new(e.event_type.clone(), time(e.at), a, 0)
}

fn flatten(a: &mut Vec<KeyValue>, key: &str, v: &Value, depth: usize) {
    match v {
        Value::Null => {}
        Value::Bool(b) => a.push(KeyValue::new(key.to_string(), *b)),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                a.push(KeyValue::new(key.to_string(), i));
            } else if let Some(f) = n.as_f64() {
                a.push(KeyValue::new(key.to_string(), f));
            }
        }
        Value::String(s) => a.push(KeyValue::new(key.to_string(), s.clone())),
        Value::Array(items) => {
            let strings: Vec<StringValue> = items
                .iter()
                .filter_map(|i| match i {
                    Value::String(s) => Some(StringValue::from(s.clone())),
                    Value::Number(n) => Some(StringValue::from(n.to_string())),
                    Value::Bool(b) => Some(StringValue::from(b.to_string())),
                    _ => None,
                })
                .collect();
            a.push(KeyValue::new(
                key.to_string(),
                OtelValue::Array(Array::String(strings)),
            ));
        }
        Value::Object(m) if depth == 0 => {
            for (k, v) in m {
                flatten(a, &format!("{key}.{k}"), v, depth + 1);
            }
        }
        Value::Object(_) => {}
    }
}

fn has(a: &[KeyValue], key: &str) -> bool {
    a.iter().any(|kv| kv.key.as_str() == key)
}

fn set(a: &mut Vec<KeyValue>, key: &'static str, v: impl Into<OtelValue>) {
    let v = v.into();
    match a.iter_mut().find(|kv| kv.key.as_str() == key) {
        Some(kv) => kv.value = v,
        None => a.push(KeyValue::new(key, v)),
    }
}

fn str_of(e: &Event, field: &str) -> String {
    e.payload
        .get(field)
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

fn agent_of(e: &Event) -> String {
    let o = e.origin.to_string();
    o.strip_prefix("agent:").map_or(o.clone(), str::to_string)
}

pub(crate) fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use ice_kernel::{Cost, Digest, EventId, Origin};
    use serde_json::json;

    fn ev(run: &str, seq: u64, t: &str, at_us: i64, causes: &[u64], payload: Value) -> Event {
        let run_id = RunId::new(run).unwrap();
        let origin: Origin = if t == "CapabilityRequested" {
            "agent:coder".parse().unwrap()
        } else {
            "runtime".parse().unwrap()
        };
        Event {
            run_id: run_id.clone(),
            run_seq: seq,
            event_type: t.into(),
            origin,
            at: Timestamp::from_unix_us(1_700_000_000_000_000 + at_us).unwrap(),
            intent: None,
            authority: None,
            payload: payload.as_object().unwrap().clone(),
            causes: causes
                .iter()
                .map(|c| EventId::new(run_id.clone(), *c))
                .collect(),
            cost: Cost::default(),
            prev: Digest::GENESIS,
            hash: Digest::GENESIS,
        }
    }

    #[test]
    fn ids_are_derived_from_the_run_and_event_ids() {
        let run = RunId::new("r-1").unwrap();
        let d = Sha256::digest(b"r-1");
        assert_eq!(trace_id(&run).to_bytes(), d[..16]);
        assert_ne!(
            run_span_id(&run),
            event_span_id(&EventId::new(run.clone(), 0))
        );
        assert_eq!(
            event_span_id(&EventId::new(run.clone(), 3)),
            event_span_id(&"r-1:3".parse().unwrap())
        );
    }

    #[test]
    fn the_quietest_run_is_let_go_at_the_limit_and_its_open_spans_exported() {
        let mut b = SpanBuilder::new();
        let mut out = Vec::new();
        let req = json!({"capability": "fs.read", "target": "a.txt"});
        b.feed(&ev("r0", 0, "RunProvisioned", 0, &[], json!({})), &mut out);
        b.feed(&ev("r0", 1, "CapabilityRequested", 1, &[], req), &mut out);
        for i in 1..MAX_TRACED_RUNS {
            let run = format!("r{i}");
            b.feed(
                &ev(&run, 0, "RunProvisioned", 10 + i as i64, &[], json!({})),
                &mut out,
            );
        }
        assert!(out.is_empty());
        assert_eq!(b.open_runs(), MAX_TRACED_RUNS);
        b.feed(
            &ev("new", 0, "RunProvisioned", 1_000_000, &[], json!({})),
            &mut out,
        );
        assert_eq!(b.open_runs(), MAX_TRACED_RUNS);
        assert_eq!(b.over_limit, 1);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].name, "request fs.read");
        assert_eq!(
            out[0].span_context.trace_id(),
            trace_id(&RunId::new("r0").unwrap())
        );
    }

    #[test]
    fn a_run_that_ends_with_spans_open_exports_them_and_its_run_span() {
        let mut b = SpanBuilder::new();
        let mut out = Vec::new();
        let req = json!({"capability": "http.request", "target": "http://h/x"});
        b.feed(
            &ev(
                "r",
                0,
                "RunProvisioned",
                0,
                &[],
                json!({"agent": "coder", "driver": "plan"}),
            ),
            &mut out,
        );
        b.feed(&ev("r", 1, "CapabilityRequested", 5, &[], req), &mut out);
        b.feed(
            &ev("r", 2, "ApprovalRequested", 6, &[1], json!({})),
            &mut out,
        );
        // A model call whose settlement never came, and a reservation no call used.
        b.feed(
            &ev(
                "r",
                3,
                "BudgetReserved",
                7,
                &[],
                json!({"reservation": "r1"}),
            ),
            &mut out,
        );
        b.feed(
            &ev(
                "r",
                4,
                "InferenceStep",
                9,
                &[3],
                json!({"model": "m", "latency_ms": 0}),
            ),
            &mut out,
        );
        b.feed(
            &ev(
                "r",
                5,
                "BudgetReserved",
                10,
                &[],
                json!({"reservation": "r2"}),
            ),
            &mut out,
        );
        b.feed(
            &ev("r", 6, "RunTerminatedByRuntime", 11, &[], json!({})),
            &mut out,
        );
        assert!(out.is_empty());
        b.feed(
            &ev(
                "r",
                7,
                "RunTerminated",
                12,
                &[],
                json!({"outcome": "killed"}),
            ),
            &mut out,
        );
        let names: Vec<&str> = out.iter().map(|s| s.name.as_ref()).collect();
        assert_eq!(names, ["request http.request", "chat m", "ice.run"]);
        assert_eq!(out[0].events.len(), 2);
        assert_eq!(
            out[0].end_time,
            time(Timestamp::from_unix_us(1_700_000_000_000_006).unwrap())
        );
        assert_eq!(
            out[1].events.len(),
            2,
            "the reservation joined the model call"
        );
        let run = &out[2];
        assert_eq!(run.parent_span_id, SpanId::INVALID);
        let events: Vec<&str> = run.events.iter().map(|e| e.name.as_ref()).collect();
        assert_eq!(
            events,
            [
                "RunProvisioned",
                "BudgetReserved",
                "RunTerminatedByRuntime",
                "RunTerminated"
            ]
        );
        assert!(
            run.attributes
                .iter()
                .any(|kv| kv.key.as_str() == "ice.run.state"
                    && kv.value.as_str() == "TERMINATED_BY_RUNTIME")
        );
        assert!(matches!(run.status, Status::Error { .. }));
        assert_eq!(b.open_runs(), 0);
    }
}
