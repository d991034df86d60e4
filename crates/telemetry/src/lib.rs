//! # ice-telemetry: operational telemetry built from the events ICE records
//!
//! [`Telemetry`] is an [`ice_runtime::Observer`]: the runtime hands it every event it records,
//! and it keeps
//!
//! - **Prometheus metrics** ([`Telemetry::metrics_text`], [`Telemetry::metrics_router`] for
//!   `GET /metrics`): runs by state, decisions by outcome, denials by reason, effect and model
//!   call latency, tokens, budget spent, events by type, append latency, and what telemetry
//!   itself dropped. Labels are bounded (states, outcomes, reason codes, event types, cost
//!   attributes); no run id is ever a label.
//! - **OpenTelemetry traces**, exported over OTLP/HTTP (protobuf) when an endpoint is
//!   configured, and not at all by default: a run is a trace (its id derived from the run id),
//!   its root span `ice.run`; each capability request is a child span from the request to its
//!   outcome, with the decision, approval, budget and effect as span events; each model call is
//!   a `chat {model}` span after the GenAI semantic conventions. Every span and span event
//!   carries the `ice.event_id` of the event it comes from. See [`trace`] for the mapping.
//!
//! Telemetry is separate from the event log and never gates execution (spec §9): an observed
//! event updates the metrics under a short lock and is offered to a bounded queue; a full queue
//! drops it and counts the drop (`ice_telemetry_dropped_total`). Spans are built and exported on
//! a background thread of their own (a single-threaded tokio runtime, the exporter's async HTTP
//! client), so a slow or dead collector never blocks or fails a run.
#![warn(missing_docs)]

mod metrics;
pub mod trace;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use ice_kernel::{Event, Payload, RunId, RunState};
use ice_runtime::Observer;
use opentelemetry_sdk::trace::{SpanData, SpanExporter as _};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

pub use metrics::MAX_TRACKED_RUNS;
pub use trace::SpanBuilder;

/// Events that may wait for the exporter thread; beyond, events are dropped and counted.
pub const QUEUE_CAPACITY: usize = 8192;
/// Most spans sent in one export request.
pub const MAX_BATCH: usize = 512;
/// How long finished spans wait, at most, before they are exported.
pub const EXPORT_EVERY: Duration = Duration::from_secs(1);
/// Timeout of one export request (the exporter retries a failed request a few times).
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where and how to export traces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TelemetryConfig {
    /// The OTLP/HTTP endpoint (`http://127.0.0.1:4318`; `/v1/traces` is added unless the URL
    /// already ends with it). `None`, the default, exports nothing.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported resource.
    pub service_name: String,
    /// Extra HTTP headers sent with each export (an API key for a hosted collector).
    pub headers: Vec<(String, String)>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            service_name: "ice".into(),
            headers: Vec::new(),
        }
    }
}

/// Why telemetry could not be set up. Nothing here happens while a run executes.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The configuration is unusable (names what).
    #[error("telemetry: {0}")]
    Config(String),
    /// The OTLP exporter could not be built.
    #[error("telemetry: the OTLP exporter: {0}")]
    Exporter(String),
    /// The exporter thread could not be started.
    #[error("telemetry: cannot start the exporter thread: {0}")]
    Thread(#[from] std::io::Error),
}

enum Msg {
    Event(Box<Event>),
    Flush(oneshot::Sender<()>),
}

#[derive(Default)]
struct Counters {
    dropped_queue: AtomicU64,
    dropped_export: AtomicU64,
    dropped_limit: AtomicU64,
    exported: AtomicU64,
    export_errors: AtomicU64,
}

struct Inner {
    metrics: Mutex<metrics::Metrics>,
    counters: Arc<Counters>,
    tx: Option<mpsc::Sender<Msg>>,
    endpoint: Option<String>,
}

/// Metrics and traces from the events ICE records. Cheap to clone: clones share everything.
///
/// The exporter thread ends, after exporting what it holds, when the last clone is dropped;
/// [`Telemetry::flush`] waits for what was observed so far to be exported.
#[derive(Clone)]
pub struct Telemetry {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("otlp_endpoint", &self.inner.endpoint)
            .finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Metrics, and trace export if `config.otlp_endpoint` is set. Makes no network request:
    /// a wrong or dead endpoint shows only as export errors and dropped spans in the metrics.
    pub fn new(config: TelemetryConfig) -> Result<Telemetry, TelemetryError> {
        let counters = Arc::new(Counters::default());
        let (tx, endpoint) = match &config.otlp_endpoint {
            None => (None, None),
            Some(endpoint) => {
                let Target {
                    url,
                    shown,
                    basic_auth,
                } = traces_url(endpoint)?;
                let exporter = exporter(&url, &config, basic_auth)?;
                let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
                let c = counters.clone();
                std::thread::Builder::new()
                    .name("ice-telemetry".into())
                    .spawn(move || {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build();
                        if let Ok(rt) = rt {
                            rt.block_on(export_loop(exporter, rx, c));
                        }
                    })?;
                (Some(tx), Some(shown))
            }
        };
        Ok(Telemetry {
            inner: Arc::new(Inner {
                metrics: Mutex::new(metrics::Metrics::new()),
                counters,
                tx,
                endpoint,
            }),
        })
    }

    /// Metrics only, no export (what [`TelemetryConfig::default`] gives).
    pub fn metrics_only() -> Telemetry {
        Telemetry::new(TelemetryConfig::default()).expect("no exporter to set up")
    }

    /// The URL traces are posted to, if export is on, as it may be shown: its password and
    /// query values, if any, replaced by `***`.
    pub fn otlp_traces_url(&self) -> Option<&str> {
        self.inner.endpoint.as_deref()
    }

    /// Seed `ice_runs` with the runs the log holds at start-up and their states (runs seen
    /// later move from there as their events are observed).
    pub fn seed_runs(&self, runs: &[(RunId, RunState)]) {
        let mut m = self.metrics();
        for (run, state) in runs {
            m.seed(run, *state);
        }
    }

    /// Record how long one append to the event log took (`ice_append_seconds`). Once this has
    /// been called, the estimate made from observed events stops, so the two never mix.
    pub fn observe_append(&self, took: Duration) {
        let mut m = self.metrics();
        m.append_exact = true;
        m.observe_append(took);
    }

    /// The metrics in the Prometheus text exposition format, version 0.0.4.
    pub fn metrics_text(&self) -> String {
        let c = &self.inner.counters;
        let dropped = [
            c.dropped_queue.load(Ordering::Relaxed),
            c.dropped_export.load(Ordering::Relaxed),
            c.dropped_limit.load(Ordering::Relaxed),
        ];
        self.metrics().render(
            dropped,
            c.exported.load(Ordering::Relaxed),
            c.export_errors.load(Ordering::Relaxed),
        )
    }

    /// A router serving `GET /metrics` (content type `text/plain; version=0.0.4`), to merge
    /// into a server's router or serve alone.
    pub fn metrics_router(&self) -> axum::Router {
        let t = self.clone();
        axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let t = t.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        t.metrics_text(),
                    )
                }
            }),
        )
    }

    /// Trace (again) the events of a run read from the log, without counting them in the
    /// metrics: the spans have the same ids and times as when the run was observed live.
    pub fn export_events<'a>(&self, events: impl IntoIterator<Item = &'a Event>) {
        for e in events {
            self.enqueue(e);
        }
    }

    /// Wait until every event observed so far has been turned into spans and the finished ones
    /// exported (or their export failed). True if that happened within `timeout`; immediately
    /// true when export is off.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let Some(tx) = &self.inner.tx else {
            return true;
        };
        let (done, wait) = oneshot::channel();
        tokio::time::timeout(timeout, async {
            tx.send(Msg::Flush(done)).await.is_ok() && wait.await.is_ok()
        })
        .await
        .unwrap_or(false)
    }

    fn metrics(&self) -> std::sync::MutexGuard<'_, metrics::Metrics> {
        self.inner
            .metrics
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn enqueue(&self, e: &Event) {
        if let Some(tx) = &self.inner.tx
            && tx.try_send(Msg::Event(Box::new(slim(e)))).is_err()
        {
            self.inner
                .counters
                .dropped_queue
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Observer for Telemetry {
    fn recorded(&self, event: &Event) {
        let now = SystemTime::now();
        self.metrics().record(event, now);
        self.enqueue(event);
    }
}

/// Two observers as one (the command line's progress lines and telemetry, say).
pub struct Tee<'a>(pub &'a dyn Observer, pub &'a dyn Observer);

impl Observer for Tee<'_> {
    fn recorded(&self, event: &Event) {
        self.0.recorded(event);
        self.1.recorded(event);
    }
    fn waiting(&self, what: &str) {
        self.0.waiting(what);
        self.1.waiting(what);
    }
}

/// Where traces go: the URL to post to, the form of it that may be shown ([`shown_url`]), and
/// the `Authorization` header its user info stands for.
struct Target {
    url: String,
    shown: String,
    basic_auth: Option<String>,
}

/// The URL to post traces to: the endpoint with `/v1/traces` added to its path (the OTLP/HTTP
/// convention for a base endpoint) unless the path already ends with it; a query is kept as
/// it is. User info (`https://USER:KEY@host/`) is sent as HTTP Basic authentication, not in the
/// URL (the HTTP client would drop it without a word).
fn traces_url(endpoint: &str) -> Result<Target, TelemetryError> {
    let e = endpoint.trim();
    // Not echoed: an endpoint can carry a password or a key.
    let mut url = url::Url::parse(e)
        .map_err(|err| TelemetryError::Config(format!("otlp_endpoint is not a URL: {err}")))?;
    let problem = if !matches!(url.scheme(), "http" | "https") {
        Some("must be an http:// or https:// URL")
    } else if url.host_str().is_none_or(str::is_empty) {
        Some("names no host")
    } else if url.fragment().is_some() {
        Some("has a fragment (#…), which no collector receives")
    } else {
        None
    };
    if let Some(problem) = problem {
        return Err(TelemetryError::Config(format!(
            "otlp_endpoint {:?} {problem}",
            shown_url(&url)
        )));
    }
    let base = url.path().trim_end_matches('/').to_string();
    if base.ends_with("/v1/traces") {
        url.set_path(&base);
    } else {
        url.set_path(&format!("{base}/v1/traces"));
    }
    let shown = shown_url(&url);
    let basic_auth = (!url.username().is_empty() || url.password().is_some()).then(|| {
        use base64::Engine;
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        let pair = format!(
            "{}:{}",
            decode(url.username()),
            decode(url.password().unwrap_or_default())
        );
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        )
    });
    let _ = url.set_username("");
    let _ = url.set_password(None);
    Ok(Target {
        url: url.to_string(),
        shown,
        basic_auth,
    })
}

/// `url` as it may be printed: its user info and its query replaced by `***` (a hosted
/// collector's key travels in one or the other, as a name, a password or a query value).
fn shown_url(url: &url::Url) -> String {
    let mut shown = url.clone();
    if !shown.username().is_empty() {
        let _ = shown.set_username("***");
    }
    if shown.password().is_some() {
        let _ = shown.set_password(Some("***"));
    }
    if shown.query().is_some() {
        shown.set_query(Some("***"));
    }
    shown.to_string()
}

fn exporter(
    url: &str,
    config: &TelemetryConfig,
    basic_auth: Option<String>,
) -> Result<opentelemetry_otlp::SpanExporter, TelemetryError> {
    use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
    // Checked here, where a bad one would otherwise be dropped or fail each export unsaid.
    if let Some((name, _)) = config.headers.iter().find(|(n, v)| {
        axum::http::HeaderName::from_bytes(n.as_bytes()).is_err()
            || axum::http::HeaderValue::from_str(v).is_err()
    }) {
        return Err(TelemetryError::Config(format!(
            "header {name:?} is not a valid HTTP header (its name, or its value)"
        )));
    }
    let mut headers: HashMap<String, String> = config.headers.iter().cloned().collect();
    // A header given explicitly wins over the URL's user info.
    if let Some(auth) = basic_auth
        && !headers
            .keys()
            .any(|k| k.eq_ignore_ascii_case("authorization"))
    {
        headers.insert("authorization".into(), auth);
    }
    // reqwest is built without a TLS crypto provider of its own (see the workspace's
    // Cargo.toml): ring, unless the process installed one already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url)
        .with_timeout(EXPORT_TIMEOUT)
        .with_headers(headers)
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(config.service_name.clone())
        .build();
    exporter.set_resource(&resource);
    Ok(exporter)
}

async fn export_loop(
    exporter: opentelemetry_otlp::SpanExporter,
    mut rx: mpsc::Receiver<Msg>,
    counters: Arc<Counters>,
) {
    let mut builder = SpanBuilder::new();
    let mut batch: Vec<SpanData> = Vec::new();
    let mut tick = tokio::time::interval(EXPORT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(Msg::Event(e)) => {
                    let before = builder.over_limit;
                    builder.feed(&e, &mut batch);
                    counters
                        .dropped_limit
                        .fetch_add(builder.over_limit - before, Ordering::Relaxed);
                    if batch.len() >= MAX_BATCH {
                        export(&exporter, &mut batch, &counters).await;
                    }
                }
                Some(Msg::Flush(done)) => {
                    export(&exporter, &mut batch, &counters).await;
                    let _ = done.send(());
                }
                None => {
                    export(&exporter, &mut batch, &counters).await;
                    break;
                }
            },
            _ = tick.tick() => export(&exporter, &mut batch, &counters).await,
        }
    }
    let _ = exporter.shutdown();
}

async fn export(
    exporter: &opentelemetry_otlp::SpanExporter,
    batch: &mut Vec<SpanData>,
    counters: &Counters,
) {
    while !batch.is_empty() {
        let n = batch.len().min(MAX_BATCH);
        let spans: Vec<SpanData> = batch.drain(..n).collect();
        match exporter.export(spans).await {
            Ok(()) => {
                counters.exported.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(_) => {
                counters.export_errors.fetch_add(1, Ordering::Relaxed);
                counters
                    .dropped_export
                    .fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
}

/// Payload fields never copied into telemetry: contents, outputs and anything bulky (they stay
/// in the log, where the audit trail is).
const BULKY: &[&str] = &[
    "arguments",
    "output",
    "result",
    "spec",
    "projection",
    "evidence",
    "messages",
];
/// Payload objects small and useful enough to copy (one level deep).
const SMALL_OBJECTS: &[&str] = &[
    "amount",
    "actual",
    "usage",
    "parameters",
    "error",
    "resource",
];

/// What telemetry keeps of an event: everything but the payload's bulky parts, strings cut
/// short. Cheap enough to do on the run's path.
fn slim(e: &Event) -> Event {
    let mut payload = Payload::new();
    for (k, v) in &e.payload {
        if BULKY.contains(&k.as_str()) {
            continue;
        }
        let kept = match v {
            Value::String(s) => Some(Value::String(trace::cut(s, 512))),
            Value::Null | Value::Bool(_) | Value::Number(_) => Some(v.clone()),
            Value::Array(items) => {
                let scalars: Vec<Value> = items
                    .iter()
                    .filter(|i| matches!(i, Value::String(_) | Value::Number(_) | Value::Bool(_)))
                    .take(32)
                    .map(|i| match i {
                        Value::String(s) => Value::String(trace::cut(s, 256)),
                        other => other.clone(),
                    })
                    .collect();
                (!scalars.is_empty() || items.is_empty()).then_some(Value::Array(scalars))
            }
            Value::Object(m) if SMALL_OBJECTS.contains(&k.as_str()) => Some(Value::Object(
                m.iter()
                    .filter(|(_, v)| !v.is_object() && !v.is_array())
                    .map(|(k, v)| {
                        let v = match v {
                            Value::String(s) => Value::String(trace::cut(s, 512)),
                            other => other.clone(),
                        };
                        (k.clone(), v)
                    })
                    .collect(),
            )),
            // A model's reply: its id and model name only.
            Value::Object(m) if k == "reply" => Some(Value::Object(
                ["id", "model"]
                    .iter()
                    .filter_map(|f| {
                        m.get(*f)
                            .and_then(Value::as_str)
                            .map(|s| (f.to_string(), Value::String(trace::cut(s, 256))))
                    })
                    .collect(),
            )),
            // Validation results: the names of the checks that failed.
            Value::Object(_) => None,
        };
        if let Some(v) = kept {
            payload.insert(k.clone(), v);
        }
    }
    if let Some(Value::Array(results)) = e.payload.get("results") {
        let failed: Vec<Value> = results
            .iter()
            .filter(|r| r.get("passed").and_then(Value::as_bool) == Some(false))
            .filter_map(|r| r.get("check").cloned())
            .take(32)
            .collect();
        payload.insert("results".into(), Value::from(results.len()));
        if !failed.is_empty() {
            payload.insert("failed_checks".into(), Value::Array(failed));
        }
    }
    Event {
        run_id: e.run_id.clone(),
        run_seq: e.run_seq,
        event_type: e.event_type.clone(),
        origin: e.origin.clone(),
        at: e.at,
        intent: e.intent.as_deref().map(|i| trace::cut(i, 512)),
        authority: e.authority.clone(),
        payload,
        causes: e.causes.clone(),
        cost: e.cost,
        prev: e.prev,
        hash: e.hash,
    }
}
