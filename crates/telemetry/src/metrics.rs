//! Prometheus metrics folded from the events ICE records, written in the text exposition format
//! (version 0.0.4) by hand: a fixed set of families whose labels are bounded by the taxonomy,
//! the run state machine, the denial codes and the cost attributes (never a run id).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ice_authority::payload::DenialCode;
use ice_kernel::{Cost, Event, EventType, Lifecycle, RunId, RunState};
use serde_json::Value;

/// Most runs whose state is followed at once (runs that have not terminated). A run first seen
/// beyond it is counted in `ice_events_total` and the other families, but not in `ice_runs`.
pub const MAX_TRACKED_RUNS: usize = 100_000;

/// Buckets (seconds) of `ice_effect_seconds`.
const EFFECT_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
/// Buckets (seconds) of `ice_model_call_seconds`.
const MODEL_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];
/// Buckets (seconds) of `ice_append_seconds`.
const APPEND_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// The decision outcomes of `ice_decisions_total`.
pub(crate) const OUTCOMES: [&str; 4] = ["permit", "deny", "approval", "reuse"];

/// Effect events whose cost carries the time the effect took (`ice_effect_seconds`).
pub(crate) fn is_effect(t: EventType) -> bool {
    matches!(
        t,
        EventType::FileRead
            | EventType::FileWritten
            | EventType::EffectStaged
            | EventType::ToolInvoked
            | EventType::APIRequestExecuted
    )
}

#[derive(Clone, Debug)]
struct Histogram {
    bounds: &'static [f64],
    /// Count per bucket (not cumulative), then the +Inf bucket.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i] += 1;
        self.sum += v;
        self.count += 1;
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            cumulative += self.counts[i];
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{}\"}} {cumulative}",
                float(*b)
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!("{{{s}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {}", braces(labels), float(self.sum));
        let _ = writeln!(out, "{name}_count{} {}", braces(labels), self.count);
    }
}

/// A float as Prometheus writes it (shortest round-trip form; integers without a fraction).
fn float(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// What the metrics keep of one run that has not terminated.
#[derive(Debug, Default)]
struct RunTrack {
    life: Option<Lifecycle>,
    /// Requests (`run_seq`) recorded and not yet decided.
    undecided: HashSet<u64>,
    /// The last event seen: (`run_seq`, `at`), to find where an appended batch starts.
    last: Option<(u64, i64)>,
}

/// Every metric, folded from the events observed.
#[derive(Debug)]
pub(crate) struct Metrics {
    runs: HashMap<RunId, RunTrack>,
    /// Runs seeded or observed in a state, by state, that are no longer tracked individually
    /// (TERMINATED runs).
    settled_states: BTreeMap<&'static str, u64>,
    events: BTreeMap<&'static str, u64>,
    decisions: [u64; 4],
    denials: BTreeMap<&'static str, u64>,
    effects: BTreeMap<&'static str, Histogram>,
    model: Histogram,
    tokens: [u64; 2],
    spent: [u64; 7],
    append: Histogram,
    /// `observe_append` was called: the exact feed replaces the estimate from events.
    pub(crate) append_exact: bool,
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        Metrics {
            runs: HashMap::new(),
            settled_states: BTreeMap::new(),
            events: BTreeMap::new(),
            decisions: [0; 4],
            denials: BTreeMap::new(),
            effects: BTreeMap::new(),
            model: Histogram::new(MODEL_BUCKETS),
            tokens: [0; 2],
            spent: [0; 7],
            append: Histogram::new(APPEND_BUCKETS),
            append_exact: false,
        }
    }

    /// A run known to be in `state` at start-up (from the log).
    pub(crate) fn seed(&mut self, run: &RunId, state: RunState) {
        if state == RunState::Terminated {
            *self.settled_states.entry(state.name()).or_default() += 1;
            return;
        }
        if self.runs.len() >= MAX_TRACKED_RUNS && !self.runs.contains_key(run) {
            return;
        }
        let t = self.runs.entry(run.clone()).or_default();
        t.life = Some(Lifecycle {
            state,
            ..Lifecycle::default()
        });
    }

    pub(crate) fn observe_append(&mut self, d: Duration) {
        self.append.observe(d.as_secs_f64());
    }

    /// Fold one event.
    pub(crate) fn record(&mut self, e: &Event, now: SystemTime) {
        let Some(t) = EventType::from_name(&e.event_type) else {
            *self.events.entry("other").or_default() += 1;
            return;
        };
        *self.events.entry(t.name()).or_default() += 1;
        let tracked = self.runs.contains_key(&e.run_id) || self.runs.len() < MAX_TRACKED_RUNS;
        let mut decided: Option<usize> = None;
        if tracked {
            let track = self.runs.entry(e.run_id.clone()).or_default();
            // Append latency, estimated: a batch's events share the `at` the ledger stamped
            // just before the durable append, and the runtime tells its observer right after
            // the append returns. Operators' events arrive later, by polling: not counted.
            let at = e.at.unix_us();
            let starts_batch = match track.last {
                Some((seq, last_at)) => !(e.run_seq == seq + 1 && at == last_at),
                None => true,
            };
            track.last = Some((e.run_seq, at));
            if starts_batch && !self.append_exact && !e.origin.to_string().starts_with("operator:")
            {
                let now_us = now
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros() as i64);
                let lag = now_us - at;
                if (0..60_000_000).contains(&lag) {
                    self.append.observe(lag as f64 / 1e6);
                }
            }
            // The run's state.
            let life = track.life.unwrap_or_default();
            track.life = Some(match life.step(t) {
                Ok(next) => next,
                // Seen from the middle (seeded without its history): follow the state edges.
                Err(_) => Lifecycle {
                    state: target_state(t).unwrap_or(life.state),
                    ..life
                },
            });
            // The decision taken on each request: the first of grant, approval request,
            // use of a live grant or denial that answers it.
            let request = e.causes.iter().find(|c| c.run_id == e.run_id);
            match t {
                EventType::CapabilityRequested => {
                    track.undecided.insert(e.run_seq);
                }
                EventType::CapabilityGranted if e.payload.get("approval").is_none() => {
                    decided = take(&mut track.undecided, request).then_some(0);
                }
                EventType::ApprovalRequested => {
                    decided = take(&mut track.undecided, request).then_some(2);
                }
                EventType::CapabilityUsed => {
                    decided = take(&mut track.undecided, request).then_some(3);
                }
                EventType::CapabilityDenied => {
                    // A request the law would not record is denied without a request event.
                    decided =
                        (request.is_none() || take(&mut track.undecided, request)).then_some(1);
                }
                _ => {}
            }
            if track.life.map(|l| l.state) == Some(RunState::Terminated) {
                self.runs.remove(&e.run_id);
                *self
                    .settled_states
                    .entry(RunState::Terminated.name())
                    .or_default() += 1;
            }
        } else if t == EventType::CapabilityDenied {
            decided = Some(1);
        }
        if let Some(i) = decided {
            self.decisions[i] += 1;
        }
        match t {
            EventType::CapabilityDenied => {
                let reason = e
                    .payload
                    .get("reason")
                    .and_then(Value::as_str)
                    .and_then(|r| r.parse::<DenialCode>().ok())
                    .map_or("other", DenialCode::as_str);
                *self.denials.entry(reason).or_default() += 1;
            }
            EventType::InferenceStep => {
                let secs = if e.cost.wall_time_us > 0 {
                    e.cost.wall_time_us as f64 / 1e6
                } else {
                    e.payload
                        .get("latency_ms")
                        .and_then(Value::as_u64)
                        .unwrap_or(0) as f64
                        / 1e3
                };
                self.model.observe(secs);
                self.tokens[0] += e.cost.tokens_in;
                self.tokens[1] += e.cost.tokens_out;
            }
            EventType::BudgetSettled => {
                if let Some(actual) = e
                    .payload
                    .get("actual")
                    .and_then(|v| serde_json::from_value::<Cost>(v.clone()).ok())
                {
                    for (i, (_, v)) in actual.fields().into_iter().enumerate() {
                        self.spent[i] = self.spent[i].saturating_add(v);
                    }
                }
            }
            t if is_effect(t) => {
                self.effects
                    .entry(t.name())
                    .or_insert_with(|| Histogram::new(EFFECT_BUCKETS))
                    .observe(e.cost.wall_time_us as f64 / 1e6);
            }
            _ => {}
        }
    }

    /// The text exposition (format 0.0.4). `dropped` (queue, export, limit) and the export
    /// counters are kept outside, by the exporter.
    pub(crate) fn render(&self, dropped: [u64; 3], exported: u64, export_errors: u64) -> String {
        let mut out = String::with_capacity(8 * 1024);
        let head = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
        };
        head(
            &mut out,
            "ice_runs",
            "gauge",
            "Runs by current state, as folded from the events this process observed (and the states seeded at start-up).",
        );
        let mut by_state: BTreeMap<&'static str, u64> =
            RunState::ALL.iter().map(|s| (s.name(), 0)).collect();
        for (s, n) in &self.settled_states {
            *by_state.entry(s).or_default() += n;
        }
        for t in self.runs.values() {
            if let Some(l) = t.life {
                *by_state.entry(l.state.name()).or_default() += 1;
            }
        }
        for (s, n) in &by_state {
            let _ = writeln!(out, "ice_runs{{state=\"{s}\"}} {n}");
        }
        head(
            &mut out,
            "ice_decisions_total",
            "counter",
            "Capability requests by decision: permit (a new grant by policy), deny, approval (an operator's approval requested), reuse (a live grant covered it).",
        );
        for (i, o) in OUTCOMES.iter().enumerate() {
            let _ = writeln!(
                out,
                "ice_decisions_total{{outcome=\"{o}\"}} {}",
                self.decisions[i]
            );
        }
        head(
            &mut out,
            "ice_denials_total",
            "counter",
            "CapabilityDenied events by reason code.",
        );
        for (r, n) in &self.denials {
            let _ = writeln!(out, "ice_denials_total{{reason=\"{r}\"}} {n}");
        }
        head(
            &mut out,
            "ice_effect_seconds",
            "histogram",
            "Time an effect took (the effect event's cost.wall_time_us), by event type.",
        );
        for (t, h) in &self.effects {
            h.write(&mut out, "ice_effect_seconds", &format!("type=\"{t}\""));
        }
        head(
            &mut out,
            "ice_model_call_seconds",
            "histogram",
            "Time a model call took (InferenceStep).",
        );
        self.model.write(&mut out, "ice_model_call_seconds", "");
        head(
            &mut out,
            "ice_tokens_total",
            "counter",
            "Model tokens as providers reported them (InferenceStep), by direction.",
        );
        let _ = writeln!(
            out,
            "ice_tokens_total{{direction=\"in\"}} {}",
            self.tokens[0]
        );
        let _ = writeln!(
            out,
            "ice_tokens_total{{direction=\"out\"}} {}",
            self.tokens[1]
        );
        head(
            &mut out,
            "ice_budget_spent_total",
            "counter",
            "Budget spent (BudgetSettled actual), by cost attribute.",
        );
        for (i, (name, _)) in Cost::default().fields().into_iter().enumerate() {
            let _ = writeln!(
                out,
                "ice_budget_spent_total{{attribute=\"{name}\"}} {}",
                self.spent[i]
            );
        }
        head(
            &mut out,
            "ice_events_total",
            "counter",
            "Events observed, by type.",
        );
        for (t, n) in &self.events {
            let _ = writeln!(out, "ice_events_total{{type=\"{t}\"}} {n}");
        }
        head(
            &mut out,
            "ice_append_seconds",
            "histogram",
            "Event log append latency (Telemetry::observe_append; until that is called, estimated per appended batch as the time from the batch's sealed `at` to its observation).",
        );
        self.append.write(&mut out, "ice_append_seconds", "");
        head(
            &mut out,
            "ice_telemetry_dropped_total",
            "counter",
            "Telemetry dropped so as never to hold up a run: events when the export queue was full (stage=queue), spans whose export failed (stage=export), spans given up at the tracing limits (stage=limit).",
        );
        for (stage, n) in ["queue", "export", "limit"].iter().zip(dropped) {
            let _ = writeln!(out, "ice_telemetry_dropped_total{{stage=\"{stage}\"}} {n}");
        }
        head(
            &mut out,
            "ice_telemetry_spans_exported_total",
            "counter",
            "Spans the OTLP exporter delivered.",
        );
        let _ = writeln!(out, "ice_telemetry_spans_exported_total {exported}");
        head(
            &mut out,
            "ice_telemetry_export_errors_total",
            "counter",
            "OTLP export requests that failed (after the exporter's retries).",
        );
        let _ = writeln!(out, "ice_telemetry_export_errors_total {export_errors}");
        out
    }
}

fn take(undecided: &mut HashSet<u64>, request: Option<&ice_kernel::EventId>) -> bool {
    request.is_some_and(|r| undecided.remove(&r.run_seq))
}

/// The state an event of type `t` leads to, for a run followed from the middle.
fn target_state(t: EventType) -> Option<RunState> {
    Some(match t {
        EventType::RunProvisioned => RunState::Provisioned,
        EventType::ContextResolved => RunState::ContextReady,
        EventType::ExecutionWindowOpened | EventType::RunResumed => RunState::Executing,
        EventType::RunSuspended => RunState::Suspended,
        EventType::ValidationStarted => RunState::Validating,
        EventType::RunCommitted => RunState::Committed,
        EventType::RunAborted => RunState::Aborted,
        EventType::RunTerminatedByRuntime => RunState::TerminatedByRuntime,
        EventType::RunTerminated => RunState::Terminated,
        _ => return None,
    })
}
