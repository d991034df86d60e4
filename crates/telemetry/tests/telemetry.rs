//! Telemetry from real runs: a plan run (grants, reuse, denials, an operator's denied approval,
//! validation, commit) and an LLM run with a scripted model (GenAI spans), observed by
//! [`Telemetry`]; traces exported over OTLP/HTTP to a receiver the test starts; metrics checked
//! as Prometheus text; export off by default; a dead or stuck collector never holds up a run.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ice_intelligence::{LlmAgent, LlmConfig, Model, ModelReply, Plan, PlanAgent};
use ice_kernel::{Event, EventType, RunId, RunState};
use ice_log::clock::SystemClock;
use ice_log::ledger::Ledger;
use ice_log::sqlite::SqliteLog;
use ice_runtime::{Installation, Observer, RunOutcome, RunReport, RunSpec, Runtime};
use ice_telemetry::trace::{event_span_id, run_span_id, trace_id};
use ice_telemetry::{Tee, Telemetry, TelemetryConfig};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::{Span, span};
use prost::Message;
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// An installation, runs, and an approver.

const POLICY: &str = r#"
@id("read")
permit(principal, action in [Action::"fs.read", Action::"fs.list"], resource in Dir::".");
@id("write")
permit(principal == Agent::"coder", action in [Action::"fs.write", Action::"fs.delete"], resource in Dir::".");
@id("locked")
forbid(principal, action in [Action::"fs.write", Action::"fs.delete"], resource in Dir::"locked");
@id("notify")
@approval("required")
permit(principal == Agent::"coder", action == Action::"http.request", resource == Host::"127.0.0.1");
"#;

const PLAN: &str = r#"
[[step]]
intent = "plan"
think = "plan_step"
text = "read, rewrite, notify"

[[step]]
intent = "list"
capability = "fs.list"
target = "."

[[step]]
intent = "read"
capability = "fs.read"
target = "hello.txt"

[[step]]
intent = "read again"
capability = "fs.read"
target = "hello.txt"

[[step]]
intent = "escape"
capability = "fs.read"
target = "../outside.txt"

[[step]]
intent = "missing"
capability = "fs.read"
target = "nope.txt"

[[step]]
intent = "rewrite"
capability = "fs.write"
target = "hello.txt"
arguments = { content = "hello, governed world\n" }

[[step]]
intent = "forbidden"
capability = "fs.write"
target = "locked/release.txt"
arguments = { content = "2.0\n" }

[[step]]
intent = "tell someone"
capability = "http.request"
target = "http://127.0.0.1:9/notify"
arguments = { method = "POST", body = "done" }
"#;

struct H {
    _dir: tempfile::TempDir,
    rt: Runtime,
    base: std::path::PathBuf,
}

impl H {
    fn new() -> H {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().to_path_buf();
        let home = base.join("home");
        std::fs::create_dir_all(home.join("runs")).unwrap();
        let policies = base.join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        std::fs::write(policies.join("p.cedar"), POLICY).unwrap();
        let ws = base.join("workspace");
        std::fs::create_dir_all(ws.join("locked")).unwrap();
        std::fs::write(ws.join("hello.txt"), "hello\n").unwrap();
        std::fs::write(ws.join("locked/release.txt"), "1.0\n").unwrap();
        std::fs::write(base.join("outside.txt"), "secret\n").unwrap();
        let log = Arc::new(SqliteLog::create(&home.join("ice.db")).unwrap());
        let ledger = Arc::new(Ledger::new(log, Arc::new(SystemClock)));
        let rt = Runtime::new(
            ledger,
            Arc::new(SystemClock),
            Installation {
                runs_dir: home.join("runs"),
                policy_dir: policies,
            },
        )
        .unwrap();
        H {
            _dir: dir,
            rt,
            base,
        }
    }

    fn spec(&self, id: &str, agent_table: &str) -> RunSpec {
        let file = self.base.join(format!("{id}.toml"));
        std::fs::write(
            &file,
            format!(
                "[run]\nid = \"{id}\"\nagent = \"coder\"\nworkspace = \"workspace\"\npolicy = \"policies\"\n\n{agent_table}\n\n[budget]\ntool_calls = 20\n\n[grants]\nuses = 5\n\n[approvals]\ntimeout = \"20s\"\n"
            ),
        )
        .unwrap();
        RunSpec::load(&file).unwrap()
    }

    fn plan_run(&self, id: &str) -> (RunSpec, PlanAgent) {
        let plan = self.base.join(format!("{id}-plan.toml"));
        std::fs::write(&plan, PLAN).unwrap();
        let spec = self.spec(
            id,
            &format!("[agent]\ndriver = \"plan\"\nplan = \"{id}-plan.toml\""),
        );
        (spec, PlanAgent::new("coder", Plan::load(&plan).unwrap()))
    }

    /// Run `spec` with `observer`, denying (as operator alice) any approval it waits for.
    async fn run(
        &self,
        spec: RunSpec,
        agent: &mut dyn ice_kernel::Agent,
        observer: &dyn Observer,
    ) -> RunReport {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let approver = Approver(tx);
        let both = Tee(observer, &approver);
        let run = self.rt.start(spec, agent, &both);
        let answer = async {
            while let Some(id) = rx.recv().await {
                self.rt
                    .answer_approval(&id, "alice", false, "not today")
                    .await
                    .unwrap();
            }
        };
        tokio::select! {
            r = run => r.unwrap(),
            _ = answer => unreachable!("the approver never stops first"),
        }
    }

    async fn events(&self, run: &str) -> Vec<Event> {
        ice_runtime::read_run(self.rt.ledger().log().as_ref(), &RunId::new(run).unwrap())
            .await
            .unwrap()
    }
}

/// Sends the id of each approval the run waits for.
struct Approver(tokio::sync::mpsc::UnboundedSender<ice_kernel::EventId>);

impl Observer for Approver {
    fn recorded(&self, _: &Event) {}
    fn waiting(&self, what: &str) {
        let id = what.split_whitespace().nth(1).unwrap().parse().unwrap();
        self.0.send(id).unwrap();
    }
}

/// A model that answers from a script.
struct Script(VecDeque<ModelReply>);

impl Model for Script {
    fn complete(&mut self, _: &Value) -> ModelReply {
        self.0.pop_front().expect("script exhausted")
    }
}

fn chat(message: Value, finish: &str, usage: (u64, u64)) -> ModelReply {
    ModelReply::Ok {
        status: 200,
        body: json!({
            "id": "chatcmpl-7",
            "object": "chat.completion",
            "created": 1700000000,
            "model": "m1-2026",
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"prompt_tokens": usage.0, "completion_tokens": usage.1, "total_tokens": usage.0 + usage.1},
        }),
        latency_ms: 42,
    }
}

fn llm_agent() -> LlmAgent {
    let config = LlmConfig::from_value(&json!({
        "base_url": "http://127.0.0.1:9/v1",
        "model": "m1",
        "task": "read the greeting",
        "max_tokens": 100,
        "temperature": 0.2,
    }))
    .unwrap();
    let model = Script(VecDeque::from([
        chat(
            json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_a", "type": "function", "function": {"name": "fs_read", "arguments": "{\"path\":\"hello.txt\"}"}}
            ]}),
            "tool_calls",
            (50, 20),
        ),
        chat(
            json!({"role": "assistant", "content": "It says hello."}),
            "stop",
            (80, 10),
        ),
    ]));
    LlmAgent::new("coder", config, Box::new(model))
}

const LLM_TABLE: &str = "[agent]\ndriver = \"llm\"\n\n[agent.llm]\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"m1\"\ntask = \"read the greeting\"\nmax_tokens = 100\ntemperature = 0.2";

// ---------------------------------------------------------------------------------------------
// An OTLP/HTTP receiver.

#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

impl Received {
    fn spans(&self) -> Vec<Span> {
        let mut out = Vec::new();
        for req in self.0.lock().unwrap().iter() {
            for rs in &req.resource_spans {
                for ss in &rs.scope_spans {
                    out.extend(ss.spans.iter().cloned());
                }
            }
        }
        out
    }

    fn service_names(&self) -> Vec<String> {
        let mut out = Vec::new();
        for req in self.0.lock().unwrap().iter() {
            for rs in &req.resource_spans {
                if let Some(r) = &rs.resource {
                    out.extend(str_attr(&r.attributes, "service.name"));
                }
            }
        }
        out
    }
}

/// Start a receiver on 127.0.0.1:0 accepting `POST /v1/traces` (protobuf); its base URL.
async fn receiver() -> (String, Received) {
    let got = Received::default();
    let store = got.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let store = store.clone();
                async move {
                    assert_eq!(
                        headers.get("content-type").unwrap(),
                        "application/x-protobuf"
                    );
                    let req = ExportTraceServiceRequest::decode(body).expect("an OTLP request");
                    store.0.lock().unwrap().push(req);
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/x-protobuf")],
                        Vec::<u8>::new(),
                    )
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), got)
}

fn value(v: &Option<AnyValue>) -> Option<&any_value::Value> {
    v.as_ref().and_then(|v| v.value.as_ref())
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| value(&kv.value))
}

fn str_attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    match attr(attrs, key) {
        Some(any_value::Value::StringValue(s)) => Some(s.clone()),
        _ => None,
    }
}

fn int_attr(attrs: &[KeyValue], key: &str) -> Option<i64> {
    match attr(attrs, key) {
        Some(any_value::Value::IntValue(i)) => Some(*i),
        _ => None,
    }
}

fn of_type(events: &[Event], t: EventType) -> Vec<&Event> {
    events.iter().filter(|e| e.event_type == t.name()).collect()
}

fn find_event<'a>(span: &'a Span, name: &str) -> Vec<&'a span::Event> {
    span.events.iter().filter(|e| e.name == name).collect()
}

fn event_id_of(ev: &span::Event) -> String {
    str_attr(&ev.attributes, "ice.event_id").expect("every span event carries ice.event_id")
}

fn nanos(e: &Event) -> u64 {
    e.at.unix_us() as u64 * 1000
}

// ---------------------------------------------------------------------------------------------
// (1) OTLP export: the trace of a run has its decisions and effects.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_is_a_trace_with_its_decisions_and_effects() {
    let (url, got) = receiver().await;
    let t = Telemetry::new(TelemetryConfig {
        otlp_endpoint: Some(url.clone()),
        service_name: "ice-test".into(),
        headers: vec![("x-ice-test".into(), "1".into())],
    })
    .unwrap();
    assert_eq!(
        t.otlp_traces_url(),
        Some(format!("{url}/v1/traces").as_str())
    );
    let h = H::new();

    let (spec, mut plan) = h.plan_run("main");
    let report = h.run(spec, &mut plan, &t).await;
    assert_eq!(report.outcome, RunOutcome::Committed, "{report:?}");
    let spec = h.spec("llm", LLM_TABLE);
    let report = h.run(spec, &mut llm_agent(), &t).await;
    assert_eq!(report.outcome, RunOutcome::Committed, "{report:?}");
    assert!(t.flush(Duration::from_secs(10)).await, "flushed");

    assert!(got.service_names().iter().all(|s| s == "ice-test"));
    let spans = got.spans();
    let metrics = t.metrics_text();
    assert!(
        metrics.contains(&format!(
            "ice_telemetry_spans_exported_total {}\n",
            spans.len()
        )),
        "{metrics}"
    );

    for run in ["main", "llm"] {
        let events = h.events(run).await;
        let run_id = RunId::new(run).unwrap();
        let trace = trace_id(&run_id).to_bytes().to_vec();
        let mine: Vec<&Span> = spans.iter().filter(|s| s.trace_id == trace).collect();
        // One root span, the run, from RunProvisioned to RunTerminated.
        let roots: Vec<&&Span> = mine
            .iter()
            .filter(|s| s.parent_span_id.is_empty())
            .collect();
        assert_eq!(roots.len(), 1, "{run}: one root");
        let root = roots[0];
        assert_eq!(root.name, "ice.run");
        assert_eq!(root.span_id, run_span_id(&run_id).to_bytes().to_vec());
        assert_eq!(str_attr(&root.attributes, "ice.run.id").unwrap(), run);
        assert_eq!(str_attr(&root.attributes, "ice.agent").unwrap(), "coder");
        assert_eq!(
            str_attr(&root.attributes, "ice.run.state").unwrap(),
            "COMMITTED"
        );
        assert_eq!(root.start_time_unix_nano, nanos(&events[0]));
        assert_eq!(
            root.end_time_unix_nano,
            nanos(events.last().unwrap()),
            "{run}: the run span ends at RunTerminated"
        );
        // Every other span is a child of the run span.
        for s in &mine {
            if s.span_id != root.span_id {
                assert_eq!(s.parent_span_id, root.span_id, "{run}: {}", s.name);
            }
        }
        // Every event of the run is exactly one span event, carrying its id and type.
        let mut seen: HashMap<String, (String, String)> = HashMap::new();
        for s in &mine {
            for ev in &s.events {
                let id = event_id_of(ev);
                let prior = seen.insert(id.clone(), (ev.name.clone(), s.name.clone()));
                assert!(prior.is_none(), "{run}: {id} appears twice");
            }
        }
        assert_eq!(seen.len(), events.len(), "{run}: every event traced");
        for e in &events {
            let (name, _) = &seen[&e.id().to_string()];
            assert_eq!(name, &e.event_type);
        }
        // A span per capability request, with its decision and outcome.
        let requests = of_type(&events, EventType::CapabilityRequested);
        for req in &requests {
            let id = req.id().to_string();
            let span = mine
                .iter()
                .find(|s| s.span_id == event_span_id(&req.id()).to_bytes().to_vec())
                .unwrap_or_else(|| panic!("{run}: a span for request {id}"));
            assert_eq!(str_attr(&span.attributes, "ice.event_id").unwrap(), id);
            // It starts at the request, or earlier by the time its effect took when the effect
            // was recorded in the same instant (a read, recorded with its request).
            let effect_ns: u64 = events
                .iter()
                .filter(|e| e.causes.contains(&req.id()))
                .map(|e| e.cost.wall_time_us * 1000)
                .max()
                .unwrap_or(0);
            assert!(
                span.start_time_unix_nano <= nanos(req)
                    && span.start_time_unix_nano >= nanos(req) - effect_ns,
                "{run}: span of {id} starts at {}, the request at {}",
                span.start_time_unix_nano,
                nanos(req)
            );
            assert_eq!(
                span.name,
                format!("request {}", req.payload["capability"].as_str().unwrap())
            );
            // Each event that answers the request is in this span.
            for e in events.iter().filter(|e| e.causes.contains(&req.id())) {
                assert_eq!(
                    seen[&e.id().to_string()].1,
                    span.name,
                    "{run}: {} ({}) in the request's span",
                    e.id(),
                    e.event_type
                );
            }
        }
        assert_eq!(
            mine.iter()
                .filter(|s| s.name.starts_with("request "))
                .count(),
            requests.len()
        );
        // Run lifecycle events are span events of the run span.
        for t in ["ValidationPassed", "RunCommitted", "ExecutionWindowOpened"] {
            assert_eq!(find_event(root, t).len(), 1, "{run}: {t} on the run span");
        }
    }

    // The plan run, request by request.
    let events = h.events("main").await;
    let trace = trace_id(&RunId::new("main").unwrap()).to_bytes().to_vec();
    let mine: Vec<&Span> = spans.iter().filter(|s| s.trace_id == trace).collect();
    let by_intent = |intent: &str| -> &Span {
        let req = events
            .iter()
            .find(|e| e.event_type == "CapabilityRequested" && e.intent.as_deref() == Some(intent))
            .unwrap();
        mine.iter()
            .find(|s| s.span_id == event_span_id(&req.id()).to_bytes().to_vec())
            .unwrap()
    };
    let id_of = |t: EventType, n: usize| of_type(&events, t)[n].id().to_string();
    // A new grant by policy, then the effect: decision, reservation, use, effect, settlement.
    let read = by_intent("read");
    assert_eq!(
        str_attr(&read.attributes, "ice.decision").unwrap(),
        "permit"
    );
    assert_eq!(str_attr(&read.attributes, "ice.outcome").unwrap(), "done");
    let names: Vec<&str> = read.events.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "CapabilityRequested",
            "CapabilityGranted",
            "BudgetReserved",
            "CapabilityUsed",
            "FileRead",
            "BudgetSettled"
        ]
    );
    let granted = find_event(read, "CapabilityGranted")[0];
    assert_eq!(event_id_of(granted), id_of(EventType::CapabilityGranted, 1));
    assert_eq!(
        attr(&granted.attributes, "ice.policies"),
        Some(&any_value::Value::ArrayValue(
            opentelemetry_proto::tonic::common::v1::ArrayValue {
                values: vec![AnyValue {
                    value: Some(any_value::Value::StringValue("read".into()))
                }]
            }
        ))
    );
    let effect = find_event(read, "FileRead")[0];
    assert_eq!(event_id_of(effect), id_of(EventType::FileRead, 1));
    assert_eq!(
        str_attr(&read.attributes, "ice.effect.event_id").unwrap(),
        event_id_of(effect)
    );
    let wall_us = int_attr(&effect.attributes, "ice.cost.wall_time_us").expect("the effect's time");
    // The read and its records share one instant; the span still covers the read's own time.
    let span_ns = read.end_time_unix_nano - read.start_time_unix_nano;
    assert!(
        span_ns >= wall_us as u64 * 1000,
        "span {span_ns} ns, read {wall_us} µs"
    );
    assert!(
        wall_us == 0 || span_ns > 0,
        "a read that took time has a span of zero length"
    );
    assert_eq!(read.end_time_unix_nano, {
        let settled = find_event(read, "BudgetSettled")[0];
        settled.time_unix_nano
    });
    // The same target again: the live grant is reused.
    let again = by_intent("read again");
    assert_eq!(
        str_attr(&again.attributes, "ice.decision").unwrap(),
        "reuse"
    );
    assert!(find_event(again, "CapabilityGranted").is_empty());
    assert_eq!(find_event(again, "FileRead").len(), 1);
    // Denied by policy, with the policy that decided.
    let forbidden = by_intent("forbidden");
    assert_eq!(
        str_attr(&forbidden.attributes, "ice.decision").unwrap(),
        "deny"
    );
    assert_eq!(
        str_attr(&forbidden.attributes, "ice.denial.reason").unwrap(),
        "policy_denied"
    );
    let denied = find_event(forbidden, "CapabilityDenied")[0];
    assert_eq!(
        str_attr(&denied.attributes, "ice.reason").unwrap(),
        "policy_denied"
    );
    assert!(attr(&denied.attributes, "ice.policies").is_some());
    // A target outside the workspace: denied before any grant.
    let escape = by_intent("escape");
    assert_eq!(
        str_attr(&escape.attributes, "ice.decision").unwrap(),
        "deny"
    );
    assert_eq!(
        str_attr(&escape.attributes, "ice.denial.reason").unwrap(),
        "confinement"
    );
    let names: Vec<&str> = escape.events.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["CapabilityRequested", "CapabilityDenied"]);
    // Granted, then the effect failed: settled, then denied.
    let missing = by_intent("missing");
    assert_eq!(
        str_attr(&missing.attributes, "ice.decision").unwrap(),
        "permit"
    );
    let names: Vec<&str> = missing.events.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "CapabilityRequested",
            "CapabilityGranted",
            "BudgetReserved",
            "CapabilityUsed",
            "BudgetSettled",
            "CapabilityDenied"
        ]
    );
    assert_eq!(
        str_attr(&missing.attributes, "ice.denial.reason").unwrap(),
        "effect_failed"
    );
    let status = missing.status.as_ref().unwrap();
    assert_eq!(
        status.code,
        opentelemetry_proto::tonic::trace::v1::status::StatusCode::Error as i32
    );
    assert!(
        status.message.starts_with("effect_failed: "),
        "{}",
        status.message
    );
    // A request denied by a decision is not an error.
    assert_eq!(forbidden.status.as_ref().map_or(0, |s| s.code), 0);
    // An approval an operator denied: the operator is named.
    let notify = by_intent("tell someone");
    assert_eq!(
        str_attr(&notify.attributes, "ice.decision").unwrap(),
        "approval"
    );
    let names: Vec<&str> = notify.events.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "CapabilityRequested",
            "ApprovalRequested",
            "ApprovalDenied",
            "CapabilityDenied"
        ]
    );
    let answer = find_event(notify, "ApprovalDenied")[0];
    assert_eq!(event_id_of(answer), id_of(EventType::ApprovalDenied, 0));
    assert_eq!(
        str_attr(&answer.attributes, "ice.operator").unwrap(),
        "alice"
    );
    assert_eq!(
        str_attr(&answer.attributes, "ice.reason").unwrap(),
        "not today"
    );
    assert_eq!(
        str_attr(&notify.attributes, "ice.denial.reason").unwrap(),
        "approval_denied"
    );

    // The LLM run: each model call is a GenAI span.
    let events = h.events("llm").await;
    let trace = trace_id(&RunId::new("llm").unwrap()).to_bytes().to_vec();
    let chats: Vec<&Span> = spans
        .iter()
        .filter(|s| s.trace_id == trace && s.name.starts_with("chat "))
        .collect();
    let steps = of_type(&events, EventType::InferenceStep);
    assert_eq!(chats.len(), 2);
    assert_eq!(steps.len(), 2);
    for (span, (step, usage, finish)) in chats.iter().zip([
        (steps[0], (50, 20), "tool_calls"),
        (steps[1], (80, 10), "stop"),
    ]) {
        assert_eq!(span.name, "chat m1");
        assert_eq!(span.kind, span::SpanKind::Client as i32);
        assert_eq!(span.span_id, event_span_id(&step.id()).to_bytes().to_vec());
        let a = &span.attributes;
        assert_eq!(str_attr(a, "ice.event_id").unwrap(), step.id().to_string());
        assert_eq!(str_attr(a, "gen_ai.operation.name").unwrap(), "chat");
        assert_eq!(str_attr(a, "gen_ai.provider.name").unwrap(), "openai");
        assert_eq!(str_attr(a, "gen_ai.system").unwrap(), "openai");
        assert_eq!(str_attr(a, "gen_ai.request.model").unwrap(), "m1");
        assert_eq!(str_attr(a, "gen_ai.response.model").unwrap(), "m1-2026");
        assert_eq!(str_attr(a, "gen_ai.response.id").unwrap(), "chatcmpl-7");
        assert_eq!(int_attr(a, "gen_ai.request.max_tokens"), Some(100));
        assert_eq!(
            attr(a, "gen_ai.request.temperature"),
            Some(&any_value::Value::DoubleValue(0.2))
        );
        assert_eq!(int_attr(a, "gen_ai.usage.input_tokens"), Some(usage.0));
        assert_eq!(int_attr(a, "gen_ai.usage.output_tokens"), Some(usage.1));
        assert_eq!(
            attr(a, "gen_ai.response.finish_reasons"),
            Some(&any_value::Value::ArrayValue(
                opentelemetry_proto::tonic::common::v1::ArrayValue {
                    values: vec![AnyValue {
                        value: Some(any_value::Value::StringValue(finish.into()))
                    }]
                }
            ))
        );
        // Start = recorded time - latency; the reservation and settlement are its events.
        assert_eq!(
            span.end_time_unix_nano - span.start_time_unix_nano,
            42_000_000
        );
        assert_eq!(span.end_time_unix_nano, nanos(step));
        let names: Vec<&str> = span.events.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["BudgetReserved", "InferenceStep", "BudgetSettled"]);
    }
    // The tool call the model made is a request span of the same trace.
    assert_eq!(
        spans
            .iter()
            .filter(|s| s.trace_id == trace && s.name == "request fs.read")
            .count(),
        1
    );

    // A re-export from the log builds the same spans (same ids and times).
    let (url2, again) = receiver().await;
    let t2 = Telemetry::new(TelemetryConfig {
        otlp_endpoint: Some(format!("{url2}/v1/traces")),
        ..TelemetryConfig::default()
    })
    .unwrap();
    t2.export_events(&h.events("main").await);
    assert!(t2.flush(Duration::from_secs(10)).await);
    let key = |s: &Span| {
        (
            s.span_id.clone(),
            s.parent_span_id.clone(),
            s.name.clone(),
            s.start_time_unix_nano,
            s.end_time_unix_nano,
            s.events.len(),
        )
    };
    let trace = trace_id(&RunId::new("main").unwrap()).to_bytes().to_vec();
    let mut live: Vec<_> = spans
        .iter()
        .filter(|s| s.trace_id == trace)
        .map(key)
        .collect();
    let mut replayed: Vec<_> = again.spans().iter().map(key).collect();
    live.sort();
    replayed.sort();
    assert_eq!(live, replayed);
    // A re-export is not counted in the metrics.
    assert!(!t2.metrics_text().contains("ice_events_total{type="));
}

// ---------------------------------------------------------------------------------------------
// (2) Metrics: Prometheus text, with the counts the events give.

/// Parse the text exposition format (0.0.4) strictly: every line a HELP, a TYPE or a sample of
/// a declared family; returns each sample's value by `name{labels}`.
fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helped: Vec<String> = Vec::new();
    let mut samples = BTreeMap::new();
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !n.starts_with(|c: char| c.is_ascii_digit())
    };
    assert!(text.ends_with('\n'));
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP name text");
            assert!(name_ok(name) && !help.is_empty(), "{line}");
            assert!(
                !helped.contains(&name.to_string()),
                "one HELP per family: {line}"
            );
            helped.push(name.to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(name_ok(name), "{line}");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            assert!(types.insert(name.to_string(), kind.to_string()).is_none());
            continue;
        }
        assert!(!line.starts_with('#') && !line.is_empty(), "{line:?}");
        let (series, value) = line.rsplit_once(' ').expect("sample: series value");
        let v: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("a number: {line}")),
        };
        let name = match series.split_once('{') {
            Some((name, labels)) => {
                let labels = labels.strip_suffix('}').expect("labels end with }");
                for pair in labels.split(',') {
                    let (k, val) = pair.split_once('=').expect("label=value");
                    assert!(name_ok(k), "{line}");
                    assert!(
                        val.len() >= 2 && val.starts_with('"') && val.ends_with('"'),
                        "{line}"
                    );
                    assert!(!val[1..val.len() - 1].contains('"'), "{line}");
                }
                name
            }
            None => series,
        };
        assert!(name_ok(name), "{line}");
        let family = types
            .keys()
            .find(|f| {
                name == f.as_str()
                    || (types[f.as_str()] == "histogram"
                        && [
                            format!("{f}_bucket"),
                            format!("{f}_sum"),
                            format!("{f}_count"),
                        ]
                        .contains(&name.to_string()))
            })
            .unwrap_or_else(|| panic!("a sample of a declared family: {line}"));
        assert!(helped.contains(family), "{line}");
        assert!(
            samples.insert(series.to_string(), v).is_none(),
            "one sample per series: {line}"
        );
    }
    // Histograms: cumulative buckets ending in +Inf = _count.
    for (f, kind) in &types {
        if kind != "histogram" {
            continue;
        }
        let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for (s, v) in &samples {
            if let Some(rest) = s.strip_prefix(&format!("{f}_bucket{{")) {
                let (others, le) = rest.rsplit_once("le=\"").unwrap();
                let le = le.trim_end_matches("\"}");
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                };
                series.entry(others.to_string()).or_default().push((le, *v));
            }
        }
        for (others, mut buckets) in series {
            buckets.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
            assert!(
                buckets.windows(2).all(|w| w[0].1 <= w[1].1),
                "{f} cumulative"
            );
            assert_eq!(buckets.last().unwrap().0, f64::INFINITY);
            let labels = others.trim_end_matches(',');
            let count = if labels.is_empty() {
                format!("{f}_count")
            } else {
                format!("{f}_count{{{labels}}}")
            };
            assert_eq!(
                samples[&count],
                buckets.last().unwrap().1,
                "{f} +Inf = count"
            );
        }
    }
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_the_events_say() {
    // Export off: metrics only.
    let t = Telemetry::metrics_only();
    assert_eq!(t.otlp_traces_url(), None);
    t.seed_runs(&[
        (RunId::new("old-1").unwrap(), RunState::Terminated),
        (RunId::new("old-2").unwrap(), RunState::Suspended),
    ]);
    let h = H::new();
    let (spec, mut plan) = h.plan_run("main");
    h.run(spec, &mut plan, &t).await;
    let spec = h.spec("llm", LLM_TABLE);
    h.run(spec, &mut llm_agent(), &t).await;
    let text = t.metrics_text();
    let m = parse_prometheus(&text);
    let get = |s: &str| *m.get(s).unwrap_or_else(|| panic!("{s} in\n{text}"));

    let mut events = h.events("main").await;
    events.extend(h.events("llm").await);
    // Events by type.
    let mut by_type: BTreeMap<String, f64> = BTreeMap::new();
    for e in &events {
        *by_type.entry(e.event_type.clone()).or_default() += 1.0;
    }
    for (ty, n) in &by_type {
        assert_eq!(
            get(&format!("ice_events_total{{type=\"{ty}\"}}")),
            *n,
            "{ty}"
        );
    }
    // Runs by state: the two runs ended, plus the seeded ones.
    assert_eq!(get("ice_runs{state=\"TERMINATED\"}"), 3.0);
    assert_eq!(get("ice_runs{state=\"SUSPENDED\"}"), 1.0);
    assert_eq!(get("ice_runs{state=\"EXECUTING\"}"), 0.0);
    // Decisions: list, read, missing, rewrite and the LLM's read were permitted by policy; the
    // second read reused a grant; escape and forbidden were denied; the notification needed an
    // approval.
    assert_eq!(get("ice_decisions_total{outcome=\"permit\"}"), 5.0);
    assert_eq!(get("ice_decisions_total{outcome=\"reuse\"}"), 1.0);
    assert_eq!(get("ice_decisions_total{outcome=\"deny\"}"), 2.0);
    assert_eq!(get("ice_decisions_total{outcome=\"approval\"}"), 1.0);
    let requests = by_type["CapabilityRequested"];
    assert_eq!(
        ["permit", "reuse", "deny", "approval"]
            .iter()
            .map(|o| get(&format!("ice_decisions_total{{outcome=\"{o}\"}}")))
            .sum::<f64>(),
        requests,
        "one decision per request"
    );
    // Denials by reason.
    for reason in [
        "policy_denied",
        "confinement",
        "approval_denied",
        "effect_failed",
    ] {
        assert_eq!(
            get(&format!("ice_denials_total{{reason=\"{reason}\"}}")),
            1.0
        );
    }
    // Effects by type, from each effect event's cost.
    for ty in ["FileRead", "EffectStaged"] {
        let of: Vec<&Event> = events.iter().filter(|e| e.event_type == ty).collect();
        assert_eq!(
            get(&format!("ice_effect_seconds_count{{type=\"{ty}\"}}")),
            of.len() as f64
        );
        let sum: f64 = of.iter().map(|e| e.cost.wall_time_us as f64 / 1e6).sum();
        assert!((get(&format!("ice_effect_seconds_sum{{type=\"{ty}\"}}")) - sum).abs() < 1e-9);
    }
    // Model calls and tokens.
    assert_eq!(get("ice_model_call_seconds_count"), 2.0);
    assert_eq!(get("ice_tokens_total{direction=\"in\"}"), 130.0);
    assert_eq!(get("ice_tokens_total{direction=\"out\"}"), 30.0);
    // Budget spent: the settlements, attribute by attribute.
    let mut spent: BTreeMap<String, f64> = BTreeMap::new();
    for e in of_type(&events, EventType::BudgetSettled) {
        for (k, v) in e.payload["actual"].as_object().unwrap() {
            *spent.entry(k.clone()).or_default() += v.as_f64().unwrap();
        }
    }
    assert!(spent["tool_calls"] > 0.0 && spent["tokens_in"] == 130.0);
    for attribute in [
        "wall_time_us",
        "tokens_in",
        "tokens_out",
        "tool_calls",
        "bytes",
        "credits_micro",
        "risk",
    ] {
        assert_eq!(
            get(&format!(
                "ice_budget_spent_total{{attribute=\"{attribute}\"}}"
            )),
            spent.get(attribute).copied().unwrap_or(0.0),
            "{attribute}"
        );
    }
    // Append latency, estimated from the events (one per appended batch).
    let appended = get("ice_append_seconds_count");
    assert!(
        appended > 10.0 && appended < events.len() as f64,
        "{appended}"
    );
    // Once the caller times appends, only its figures count.
    t.observe_append(Duration::from_micros(300));
    let m = parse_prometheus(&t.metrics_text());
    assert_eq!(m["ice_append_seconds_count"], appended + 1.0);
    assert_eq!(m["ice_telemetry_dropped_total{stage=\"queue\"}"], 0.0);

    // GET /metrics.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = t.metrics_router();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let (head, body) = http_get(addr, "/metrics").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    parse_prometheus(&body);
    assert!(body.contains("ice_runs{state=\"TERMINATED\"} 3\n"));
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8(buf).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.to_string(), body.to_string())
}

// ---------------------------------------------------------------------------------------------
// (3) Export never holds up a run.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_endpoint_exports_nothing_and_a_dead_or_stuck_collector_never_blocks() {
    // Off by default.
    assert_eq!(TelemetryConfig::default().otlp_endpoint, None);
    let off = Telemetry::new(TelemetryConfig::default()).unwrap();
    assert!(off.flush(Duration::from_millis(1)).await);
    assert!(
        Telemetry::new(TelemetryConfig {
            otlp_endpoint: Some("127.0.0.1:4318".into()),
            ..TelemetryConfig::default()
        })
        .is_err()
    );

    // A dead endpoint: nothing listens on the port.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    // A stuck one: it accepts connections (the kernel's backlog) and never answers.
    let stuck = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let stuck_url = format!("http://{}", stuck.local_addr().unwrap());

    let h = H::new();
    let mut took = Vec::new();
    for (name, endpoint) in [
        ("off", None),
        ("dead", Some(dead_url)),
        ("stuck", Some(stuck_url)),
    ] {
        let t = Telemetry::new(TelemetryConfig {
            otlp_endpoint: endpoint,
            ..TelemetryConfig::default()
        })
        .unwrap();
        let (spec, mut plan) = h.plan_run(name);
        let started = Instant::now();
        let report = h.run(spec, &mut plan, &t).await;
        took.push(started.elapsed());
        assert_eq!(report.outcome, RunOutcome::Committed, "{name}");
        assert_eq!(report.state, RunState::Terminated);
        if name == "dead" {
            // The export fails (after the exporter's retries); the spans are dropped, counted.
            assert!(t.flush(Duration::from_secs(30)).await);
            let m = parse_prometheus(&t.metrics_text());
            assert!(m["ice_telemetry_export_errors_total"] >= 1.0);
            assert!(m["ice_telemetry_dropped_total{stage=\"export\"}"] >= 1.0);
            assert_eq!(m["ice_telemetry_spans_exported_total"], 0.0);
        }
        if name == "stuck" {
            // The exporter thread waits on the collector; the run did not. Flooding the queue
            // drops (and counts) events instead of waiting for room.
            // The exporter thread waits on the collector.
            assert!(!t.flush(Duration::from_millis(300)).await);
            let events = h.events("stuck").await;
            let started = Instant::now();
            for _ in 0..(ice_telemetry::QUEUE_CAPACITY / events.len() + 2) {
                for e in &events {
                    t.recorded(e);
                }
            }
            assert!(started.elapsed() < Duration::from_secs(5));
            let m = parse_prometheus(&t.metrics_text());
            assert!(m["ice_telemetry_dropped_total{stage=\"queue\"}"] >= 1.0);
            assert!(!t.flush(Duration::from_millis(200)).await);
        }
    }
    // The stuck collector's timeout is 5 s per request: a run that waited for it would show.
    assert!(
        took[2] < took[0] + Duration::from_secs(4),
        "off {:?}, stuck {:?}",
        took[0],
        took[2]
    );
    drop(stuck);
}

/// The findings (replay and telemetry probe): `ice serve` printed the collector's URL with its
/// password, and an endpoint with a query (`?api_key=…`, how hosted collectors take a key)
/// had `/v1/traces` appended after the query, corrupting the key and leaving the path `/`.
/// The path gets `/v1/traces`, the query is sent as it is, and the URL shown hides both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoints_key_is_sent_where_it_belongs_and_never_shown() {
    type Seen = (Option<String>, Option<String>);
    let queries = Arc::new(Mutex::new(Vec::<Seen>::new()));
    let store = queries.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(
            move |uri: axum::http::Uri, headers: axum::http::HeaderMap| {
                let store = store.clone();
                async move {
                    let auth = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    store
                        .lock()
                        .unwrap()
                        .push((uri.query().map(str::to_string), auth));
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/x-protobuf")],
                        Vec::<u8>::new(),
                    )
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    // The user info is percent-encoded in a URL (%40 is @); the header carries it decoded.
    let t = Telemetry::new(TelemetryConfig {
        otlp_endpoint: Some(format!("http://alice:S3CRET%40x@{addr}/?api_key=K3Y")),
        ..TelemetryConfig::default()
    })
    .unwrap();
    let shown = t.otlp_traces_url().unwrap().to_string();
    assert_eq!(shown, format!("http://***:***@{addr}/v1/traces?***"));
    assert!(!format!("{t:?}").contains("S3CRET"), "{t:?}");
    let h = H::new();
    let (spec, mut plan) = h.plan_run("keyed");
    h.run(spec, &mut plan, &t).await;
    assert!(t.flush(Duration::from_secs(10)).await, "flushed");
    let got = queries.lock().unwrap().clone();
    assert!(!got.is_empty(), "nothing reached /v1/traces");
    // alice:S3CRET@x, in base64.
    let basic = "Basic YWxpY2U6UzNDUkVUQHg=";
    assert!(
        got.iter()
            .all(|(q, auth)| q.as_deref() == Some("api_key=K3Y") && auth.as_deref() == Some(basic)),
        "{got:?}"
    );
    // A key with no value, or as the user name, is not shown either; a trailing slash after
    // /v1/traces is not a second /v1/traces.
    for (endpoint, want) in [
        (
            "http://127.0.0.1:9/?S3CRET",
            "http://127.0.0.1:9/v1/traces?***",
        ),
        (
            "http://S3CRET@127.0.0.1:9/",
            "http://***@127.0.0.1:9/v1/traces",
        ),
        (
            "http://127.0.0.1:9/v1/traces/",
            "http://127.0.0.1:9/v1/traces",
        ),
    ] {
        let t = Telemetry::new(TelemetryConfig {
            otlp_endpoint: Some(endpoint.into()),
            ..TelemetryConfig::default()
        })
        .unwrap();
        assert_eq!(t.otlp_traces_url(), Some(want), "{endpoint}");
    }
    // Refused without echoing the URL's secrets.
    for (bad, why) in [
        ("ftp://u:S3CRET@h/", "http:// or https://"),
        ("http://u:S3CRET@h/#x", "fragment"),
        ("not a url S3CRET", "not a URL"),
    ] {
        let e = Telemetry::new(TelemetryConfig {
            otlp_endpoint: Some(bad.into()),
            ..TelemetryConfig::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains(why) && !e.contains("S3CRET"), "{bad}: {e}");
    }
    // A header that is not valid HTTP is refused, its value not repeated.
    let e = Telemetry::new(TelemetryConfig {
        otlp_endpoint: Some("http://127.0.0.1:9/".into()),
        headers: vec![("x-key".into(), "S3CRET\nx".into())],
        ..TelemetryConfig::default()
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("\"x-key\" is not a valid HTTP header") && !e.contains("S3CRET"),
        "{e}"
    );
}
