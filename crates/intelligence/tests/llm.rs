//! The LLM driver, with a scripted in-test model (no network) and, for `HttpModel`, a canned
//! HTTP server on a loopback `TcpListener`.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use ice_intelligence::llm::{self, request_digest, sanitize_function_name};
use ice_intelligence::{
    FailureKind, HttpModel, LlmAgent, LlmConfig, Model, ModelFailure, ModelReply, RecordedModel,
};
use ice_kernel::{
    Agent, AgentView, CapabilityProposal, Cost, EventId, Inference, MountedMemory, Outcome,
    Payload, Proposal, RunId, ToolOffer,
};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// Fixtures.

/// A model that answers from a script and remembers every request.
struct Script {
    replies: VecDeque<ModelReply>,
    seen: Arc<Mutex<Vec<Value>>>,
}

fn script(replies: Vec<ModelReply>) -> (Box<dyn Model>, Arc<Mutex<Vec<Value>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let model = Script {
        replies: replies.into(),
        seen: seen.clone(),
    };
    (Box::new(model), seen)
}

impl Model for Script {
    fn complete(&mut self, request: &Value) -> ModelReply {
        self.seen.lock().unwrap().push(request.clone());
        self.replies
            .pop_front()
            .unwrap_or(ModelReply::Failed(ModelFailure {
                kind: FailureKind::Transport,
                detail: "script exhausted".into(),
                status: None,
                latency_ms: 0,
            }))
    }
}

fn body(message: Value, finish: &str, usage: (u64, u64)) -> Value {
    json!({
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "m1",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": usage.0, "completion_tokens": usage.1, "total_tokens": usage.0 + usage.1},
    })
}

fn reply(message: Value, finish: &str, usage: (u64, u64)) -> ModelReply {
    ModelReply::Ok {
        status: 200,
        body: body(message, finish, usage),
        latency_ms: 42,
    }
}

fn call(id: &str, name: &str, args: &str) -> Value {
    json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}})
}

fn tool_reply(content: Option<&str>, calls: Vec<Value>) -> ModelReply {
    reply(
        json!({"role": "assistant", "content": content, "tool_calls": calls}),
        "tool_calls",
        (50, 20),
    )
}

fn answer(text: &str) -> ModelReply {
    reply(
        json!({"role": "assistant", "content": text}),
        "stop",
        (80, 10),
    )
}

fn failure(kind: FailureKind, detail: &str, status: Option<u16>) -> ModelReply {
    ModelReply::Failed(ModelFailure {
        kind,
        detail: detail.into(),
        status,
        latency_ms: 7,
    })
}

fn config(extra: Value) -> LlmConfig {
    let mut v = json!({
        "base_url": "http://127.0.0.1:9/v1",
        "model": "m1",
        "task": "make the greeting friendlier",
        "max_tokens": 100,
    });
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    LlmConfig::from_value(&v).unwrap()
}

fn view(last: Option<Outcome>) -> AgentView {
    AgentView {
        run_id: RunId::new("r").unwrap(),
        step: 0,
        capabilities: [
            "fs.read",
            "fs.write",
            "http.request",
            "mcp.call",
            "process.exec",
        ]
        .iter()
        .map(|c| (c.to_string(), "x".to_string()))
        .collect(),
        last,
        memories: vec![MountedMemory {
            id: "mem-1".into(),
            kind: "fact".into(),
            content: json!("greetings end with a newline"),
            digest: ice_kernel::Digest::of(b"x"),
            confidence: 0.9,
        }],
        tools: vec![ToolOffer {
            target: "notes/search".into(),
            description: "Search the notes".into(),
            input_schema: json!({"type": "object", "properties": {"q": {"type": "string"}}}),
            effect: "read".into(),
        }],
        time_left_ms: None,
    }
}

fn event_id() -> EventId {
    EventId::new(RunId::new("r").unwrap(), 3)
}

fn done(output: Value) -> Outcome {
    Outcome::Done {
        request: event_id(),
        output,
    }
}

fn denied(reason: &str, detail: &str) -> Outcome {
    Outcome::Denied {
        request: event_id(),
        reason: reason.into(),
        detail: detail.into(),
    }
}

/// Drive `agent` as the runtime does: each request is answered with the next outcome.
/// Returns every proposal (or the error that ended the loop) and every inference.
fn drive(
    agent: &mut LlmAgent,
    outcomes: Vec<Outcome>,
) -> (Vec<Result<Proposal, String>>, Vec<Inference>) {
    let mut outcomes: VecDeque<Outcome> = outcomes.into();
    let mut proposals = Vec::new();
    let mut inferences = Vec::new();
    let mut last = None;
    for _ in 0..100 {
        let v = view(last.take());
        match agent.propose(&v) {
            Err(e) => {
                proposals.push(Err(e.0));
                break;
            }
            Ok(p) => {
                proposals.push(Ok(p.clone()));
                match p {
                    Proposal::Infer { .. } => inferences.push(agent.infer(&v).unwrap()),
                    Proposal::Request(_) => {
                        last = Some(outcomes.pop_front().unwrap_or(done(json!({}))))
                    }
                    Proposal::Finish { .. } => break,
                    Proposal::Think { .. } => {}
                }
            }
        }
    }
    (proposals, inferences)
}

fn canonical(p: &Payload) -> Vec<u8> {
    ice_kernel::canonical::canonicalize(&Value::Object(p.clone())).unwrap()
}

// ---------------------------------------------------------------------------------------------
// The loop.

#[test]
fn full_loop_two_tool_calls_then_a_final_answer() {
    let (model, seen) = script(vec![
        tool_reply(
            Some("Read the greeting, then rewrite it."),
            vec![
                call("call_a", "fs_read", r#"{"path":"hello.txt"}"#),
                call(
                    "call_b",
                    "fs_write",
                    r#"{"path":"hello.txt","content":"hello, world\n"}"#,
                ),
            ],
        ),
        answer("The greeting now says hello, world."),
    ]);
    let mut agent = LlmAgent::new("writer", config(json!({"temperature": 0.2})), model);
    assert_eq!(agent.id(), "writer");

    // 1. The first proposal is a model call, reserving max_tokens and the prompt's estimate.
    let v = view(None);
    let Proposal::Infer { reserve } = agent.propose(&v).unwrap() else {
        panic!("expected Infer")
    };
    let bytes = serde_json::to_vec(&agent.request()).unwrap().len() as u64;
    assert_eq!(
        reserve,
        Cost {
            tokens_in: bytes.div_ceil(3),
            tokens_out: 100,
            ..Cost::default()
        }
    );
    let first = agent.infer(&v).unwrap();
    assert_eq!(first.usage.tokens_in, 50);
    assert_eq!(first.usage.tokens_out, 20);
    assert_eq!(first.usage.wall_time_us, 0);
    assert_eq!(first.intent, "model call 1/16: 2 tool call(s)");
    let p = &first.payload;
    assert_eq!(p["model"], "m1");
    assert_eq!(
        p["parameters"],
        json!({"max_tokens": 100, "temperature": 0.2, "tool_choice": "auto"})
    );
    assert_eq!(p["messages"], 2);
    assert_eq!(p["status"], 200);
    assert_eq!(p["latency_ms"], 42);
    assert_eq!(p["finish_reason"], "tool_calls");
    assert_eq!(
        p["usage"],
        json!({"prompt_tokens": 50, "completion_tokens": 20})
    );
    assert_eq!(
        p["reply"]["choices"][0]["message"]["tool_calls"][0]["id"],
        "call_a"
    );
    assert!(p.get("error").is_none());
    let sent = seen.lock().unwrap()[0].clone();
    assert_eq!(p["request_digest"], json!(request_digest(&sent)));
    assert_eq!(p["request_digest"].as_str().unwrap().len(), 64);

    // The first request: system (preamble, memories), user (task), the tools, sorted.
    assert_eq!(sent["model"], "m1");
    assert_eq!(sent["max_tokens"], 100);
    assert_eq!(sent["temperature"], 0.2);
    assert_eq!(sent["tool_choice"], "auto");
    let system = sent["messages"][0]["content"].as_str().unwrap();
    assert!(system.starts_with(llm::PREAMBLE));
    assert!(system.contains("- [mem-1] (fact, confidence 0.9): greetings end with a newline"));
    assert_eq!(
        sent["messages"][1],
        json!({"role": "user", "content": "make the greeting friendlier"})
    );
    let names: Vec<&str> = sent["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "fs_read",
            "fs_write",
            "http_request",
            "mcp__notes__search",
            "process_exec"
        ]
    );
    assert_eq!(sent["tools"][0]["type"], "function");
    assert_eq!(
        sent["tools"][0]["function"]["parameters"]["required"],
        json!(["path"])
    );

    // 2. The two tool calls, in order, with the assistant's text as the intent.
    let intent = "Read the greeting, then rewrite it.";
    assert_eq!(
        agent.propose(&view(None)).unwrap(),
        Proposal::Request(CapabilityProposal {
            capability: "fs.read".into(),
            target: "hello.txt".into(),
            arguments: json!({}),
            intent: intent.into(),
        })
    );
    assert_eq!(
        agent
            .propose(&view(Some(done(json!({"content": "hello", "bytes": 5})))))
            .unwrap(),
        Proposal::Request(CapabilityProposal {
            capability: "fs.write".into(),
            target: "hello.txt".into(),
            arguments: json!({"content": "hello, world\n"}),
            intent: intent.into(),
        })
    );

    // 3. Both outcomes answered, the model is called again.
    let v = view(Some(denied("policy_denied", "writes need approval")));
    assert!(matches!(agent.propose(&v).unwrap(), Proposal::Infer { .. }));
    let second = agent.infer(&v).unwrap();
    assert_eq!(second.intent, "model call 2/16: final answer");
    assert_eq!(second.payload["messages"], 5);
    let sent = seen.lock().unwrap()[1].clone();
    let messages = sent["messages"].as_array().unwrap();
    assert_eq!(
        messages[2],
        json!({
            "role": "assistant",
            "content": "Read the greeting, then rewrite it.",
            "tool_calls": [
                call("call_a", "fs_read", r#"{"path":"hello.txt"}"#),
                call("call_b", "fs_write", r#"{"path":"hello.txt","content":"hello, world\n"}"#),
            ],
        })
    );
    assert_eq!(
        messages[3],
        json!({"role": "tool", "tool_call_id": "call_a", "content": r#"{"bytes":5,"content":"hello"}"#})
    );
    assert_eq!(
        messages[4],
        json!({"role": "tool", "tool_call_id": "call_b", "content": "DENIED (policy_denied): writes need approval"})
    );

    // 4. The final answer finishes the run.
    assert_eq!(
        agent.propose(&view(None)).unwrap(),
        Proposal::Finish {
            summary: "The greeting now says hello, world.".into()
        }
    );
    assert_eq!(agent.model_calls(), 2);
}

#[test]
fn intent_defaults_and_http_and_mcp_calls_map_to_their_capabilities() {
    let (model, _) = script(vec![tool_reply(
        None,
        vec![
            call(
                "c1",
                "http_request",
                r#"{"url":"https://example.com/x","method":"POST","body":"hi"}"#,
            ),
            call("c2", "mcp__notes__search", r#"{"q":"greeting","limit":3}"#),
        ],
    )]);
    let mut agent = LlmAgent::new("a", config(json!({})), model);
    let (proposals, _) = drive(&mut agent, vec![]);
    assert_eq!(
        proposals[1],
        Ok(Proposal::Request(CapabilityProposal {
            capability: "http.request".into(),
            target: "https://example.com/x".into(),
            arguments: json!({"method": "POST", "body": "hi"}),
            intent: "model m1 called http_request".into(),
        }))
    );
    assert_eq!(
        proposals[2],
        Ok(Proposal::Request(CapabilityProposal {
            capability: "mcp.call".into(),
            target: "notes/search".into(),
            arguments: json!({"q": "greeting", "limit": 3}),
            intent: "model m1 called mcp__notes__search".into(),
        }))
    );
}

#[test]
fn long_intents_are_cut() {
    let long = "x".repeat(900);
    let (model, _) = script(vec![tool_reply(
        Some(&long),
        vec![call("c1", "fs_read", r#"{"path":"a"}"#)],
    )]);
    let mut agent = LlmAgent::new("a", config(json!({})), model);
    let (proposals, _) = drive(&mut agent, vec![]);
    let Ok(Proposal::Request(r)) = &proposals[1] else {
        panic!()
    };
    assert_eq!(r.intent.chars().count(), 501);
    assert!(r.intent.ends_with('…'));
}

#[test]
fn function_names_are_sanitised_bounded_and_unique() {
    assert_eq!(
        sanitize_function_name("mcp__my server__a.b/c!"),
        "mcp__my_server__a_b_c_"
    );
    assert_eq!(sanitize_function_name(&"y".repeat(100)).len(), 64);
    let offer = |target: &str| ToolOffer {
        target: target.into(),
        description: String::new(),
        input_schema: json!({"type": "object"}),
        effect: "external".into(),
    };
    let long = format!("srv/{}", "t".repeat(80));
    let long2 = format!("srv/{}x", "t".repeat(80));
    let mut v = view(None);
    v.capabilities = vec![("fs.list".into(), "dir".into())];
    v.tools = vec![
        offer("a_b/c"),
        offer("a.b/c"),
        offer(&long),
        offer(&long2),
        offer("a.b/c"),
    ];
    let tb = ice_intelligence::Toolbox::for_view(&v);
    let names: Vec<&String> = tb.bindings.keys().collect();
    let t64 = format!("mcp__srv__{}", "t".repeat(54));
    let t64_2 = format!("mcp__srv__{}_2", "t".repeat(52));
    assert_eq!(
        names,
        [
            "fs_list",
            "mcp__a_b__c",
            "mcp__a_b__c_2",
            // "_" sorts before "t".
            t64_2.as_str(),
            t64.as_str(),
        ]
    );
    // Sorted targets are named first: "a.b/c" < "a_b/c".
    assert_eq!(
        tb.bindings["mcp__a_b__c"],
        ice_intelligence::ToolBinding::Mcp {
            target: "a.b/c".into()
        }
    );
    assert_eq!(
        tb.bindings["mcp__a_b__c_2"],
        ice_intelligence::ToolBinding::Mcp {
            target: "a_b/c".into()
        }
    );
    assert_eq!(
        tb.bindings[&t64_2],
        ice_intelligence::ToolBinding::Mcp { target: long2 }
    );
    assert!(names.iter().all(|n| n.len() <= 64));
    assert_eq!(tb.tools.len(), 5);
    assert_eq!(
        tb.tools[1]["function"]["description"],
        "MCP tool a.b/c (effect class external)"
    );
    // fs_list defaults to the workspace root.
    let p = tb.proposal("fs_list", &json!("{}"), "look").unwrap();
    assert_eq!((p.capability.as_str(), p.target.as_str()), ("fs.list", "."));
}

#[test]
fn the_tool_list_is_fixed_at_the_first_proposal() {
    let (model, seen) = script(vec![
        tool_reply(None, vec![call("c1", "fs_read", r#"{"path":"a"}"#)]),
        answer("ok"),
    ]);
    let mut agent = LlmAgent::new("a", config(json!({})), model);
    let v = view(None);
    agent.propose(&v).unwrap();
    agent.infer(&v).unwrap();
    let mut fewer = view(None);
    fewer.tools.clear();
    agent.propose(&fewer).unwrap();
    fewer.last = Some(done(json!({})));
    agent.propose(&fewer).unwrap();
    agent.infer(&fewer).unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0]["tools"], seen[1]["tools"]);
}

#[test]
fn a_provider_error_is_recorded_and_the_loop_recovers() {
    let (model, seen) = script(vec![
        failure(FailureKind::HttpStatus, "HTTP 429: slow down", Some(429)),
        answer("nothing to do"),
    ]);
    let mut agent = LlmAgent::new("a", config(json!({})), model);
    let (proposals, inferences) = drive(&mut agent, vec![]);
    assert_eq!(inferences.len(), 2);
    let p = &inferences[0].payload;
    assert_eq!(
        p["error"],
        json!({"kind": "http_status", "detail": "HTTP 429: slow down", "status": 429})
    );
    assert_eq!(p["latency_ms"], 7);
    assert!(p.get("reply").is_none());
    assert_eq!(inferences[0].usage, Cost::default());
    assert_eq!(inferences[0].intent, "model call 1/16 failed: http_status");
    // The retry sends the same conversation.
    let seen = seen.lock().unwrap();
    assert_eq!(request_digest(&seen[0]), request_digest(&seen[1]));
    assert_eq!(
        proposals.last().unwrap(),
        &Ok(Proposal::Finish {
            summary: "nothing to do".into()
        })
    );
}

#[test]
fn consecutive_errors_exhaust_max_errors() {
    let (model, _) = script(vec![
        failure(FailureKind::Timeout, "timed out", None),
        failure(FailureKind::Transport, "connection refused", None),
        failure(FailureKind::Timeout, "timed out again", None),
    ]);
    let mut agent = LlmAgent::new("a", config(json!({"max_errors": 3})), model);
    let (proposals, inferences) = drive(&mut agent, vec![]);
    assert_eq!(inferences.len(), 3);
    let err = proposals.last().unwrap().clone().unwrap_err();
    assert!(err.contains("3 times in a row"), "{err}");
    assert!(err.contains("timeout: timed out again"), "{err}");
}

#[test]
fn a_call_that_may_have_generated_tokens_is_costed_at_the_reservation() {
    let (model, _) = script(vec![
        failure(FailureKind::Timeout, "timed out", None),
        failure(FailureKind::MalformedJson, "not JSON", Some(200)),
        failure(FailureKind::Oversized, "too big", Some(200)),
        // A 2xx body cut off mid-way: the answer was generated.
        failure(FailureKind::Transport, "body cut off", Some(200)),
        failure(FailureKind::HttpStatus, "HTTP 429: slow down", Some(429)),
        failure(FailureKind::Transport, "connection refused", None),
        // A non-2xx reply too large to read generated nothing, as any non-2xx.
        failure(FailureKind::Oversized, "too big", Some(503)),
        answer("done"),
    ]);
    let mut agent = LlmAgent::new("a", config(json!({"max_errors": 9})), model);
    let mut costs = Vec::new();
    loop {
        let v = view(None);
        match agent.propose(&v).unwrap() {
            Proposal::Infer { reserve } => {
                let i = agent.infer(&v).unwrap();
                costs.push((reserve, i));
            }
            Proposal::Finish { .. } => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(costs.len(), 8);
    for (reserve, i) in &costs[..4] {
        assert!(reserve.tokens_out > 0);
        assert_eq!(
            (i.usage.tokens_in, i.usage.tokens_out),
            (reserve.tokens_in, reserve.tokens_out),
            "{}",
            i.intent
        );
        assert_eq!(
            i.payload["usage"]["unreported"],
            json!(["prompt_tokens", "completion_tokens"])
        );
        assert_eq!(i.payload["usage"]["completion_tokens"], reserve.tokens_out);
    }
    for (_, i) in &costs[4..7] {
        assert_eq!(i.usage, Cost::default(), "{}", i.intent);
        assert_eq!(
            i.payload["usage"],
            json!({"prompt_tokens": null, "completion_tokens": null})
        );
    }
}

#[test]
fn a_good_reply_resets_the_error_count() {
    let (model, _) = script(vec![
        failure(FailureKind::Timeout, "t", None),
        tool_reply(None, vec![call("c1", "fs_read", r#"{"path":"a"}"#)]),
        failure(FailureKind::Timeout, "t", None),
        answer("done"),
    ]);
    let mut agent = LlmAgent::new("a", config(json!({"max_errors": 2})), model);
    let (proposals, _) = drive(&mut agent, vec![]);
    assert_eq!(
        proposals.last().unwrap(),
        &Ok(Proposal::Finish {
            summary: "done".into()
        })
    );
}

#[test]
fn max_steps_ends_the_loop() {
    let replies = (0..5)
        .map(|i| {
            tool_reply(
                None,
                vec![call(&format!("c{i}"), "fs_read", r#"{"path":"a"}"#)],
            )
        })
        .collect();
    let (model, _) = script(replies);
    let mut agent = LlmAgent::new("a", config(json!({"max_steps": 2})), model);
    let (proposals, inferences) = drive(&mut agent, vec![]);
    assert_eq!(inferences.len(), 2);
    assert_eq!(inferences[1].intent, "model call 2/2: 1 tool call(s)");
    let err = proposals.last().unwrap().clone().unwrap_err();
    assert!(err.contains("loop limit"), "{err}");
    assert!(err.contains("max_steps = 2"), "{err}");
}

/// The probe's finding: every reply's text is sent back with each later call, so replies of
/// a few MiB made each request larger than the last (212 MB by call 30; memory several times
/// that) for as long as `max_steps` allowed. The run ends once the conversation would be sent
/// larger than `MAX_REQUEST_BYTES`, before any such request is sent.
#[test]
fn a_conversation_grown_past_the_request_limit_ends_the_loop() {
    let big = "x".repeat(7 << 20);
    let replies = (0..10)
        .map(|i| {
            tool_reply(
                Some(&big),
                vec![call(&format!("c{i}"), "fs_read", r#"{"path":"a"}"#)],
            )
        })
        .collect();
    let (model, seen) = script(replies);
    let mut agent = LlmAgent::new("a", config(json!({"max_steps": 10})), model);
    let (proposals, inferences) = drive(&mut agent, vec![]);
    let sent = seen.lock().unwrap();
    assert!(inferences.len() < 4, "{} calls", inferences.len());
    for r in sent.iter() {
        assert!(
            serde_json::to_vec(r).unwrap().len() as u64 <= llm::MAX_REQUEST_BYTES,
            "a request over the limit was sent"
        );
    }
    let err = proposals.last().unwrap().clone().unwrap_err();
    assert!(
        err.contains("the conversation has grown to")
            && err.contains(&llm::MAX_REQUEST_BYTES.to_string()),
        "{err}"
    );
}

#[test]
fn malformed_arguments_and_unknown_functions_are_rejected_and_the_model_is_told() {
    let (model, seen) = script(vec![
        tool_reply(
            Some("trying"),
            vec![
                call("c1", "fs_read", r#"{"path": "a.txt""#),
                call("c2", "rm_rf", "{}"),
                call("c3", "fs_write", r#"{"path":"b.txt"}"#),
                call("c4", "fs_read", r#"{"path":"ok.txt"}"#),
            ],
        ),
        answer("gave up"),
    ]);
    let mut agent = LlmAgent::new("a", config(json!({})), model);
    let (proposals, inferences) = drive(&mut agent, vec![done(json!({"content": "x"}))]);
    // Only the usable call is proposed.
    let requests: Vec<&CapabilityProposal> = proposals
        .iter()
        .filter_map(|p| match p {
            Ok(Proposal::Request(r)) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].target, "ok.txt");
    let p = &inferences[0].payload;
    assert_eq!(p["error"]["kind"], "rejected_tool_calls");
    assert_eq!(
        inferences[0].intent,
        "model call 1/16: 1 tool call(s), 3 rejected"
    );
    let rejected = p["rejected_tool_calls"].as_array().unwrap();
    assert_eq!(rejected.len(), 3);
    assert_eq!(rejected[0]["id"], "c1");
    assert!(
        rejected[0]["problem"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );
    assert_eq!(rejected[1]["function"], "rm_rf");
    assert!(
        rejected[1]["problem"]
            .as_str()
            .unwrap()
            .contains("no function \"rm_rf\" is offered")
    );
    assert!(
        rejected[2]["problem"]
            .as_str()
            .unwrap()
            .contains("`content`")
    );
    // The second request answers every call: three errors, one outcome.
    let sent = seen.lock().unwrap()[1].clone();
    let tools: Vec<(String, String)> = sent["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "tool")
        .map(|m| {
            (
                m["tool_call_id"].as_str().unwrap().to_string(),
                m["content"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(tools.len(), 4);
    assert_eq!(tools[0].0, "c1");
    assert!(
        tools[0]
            .1
            .starts_with("ERROR: this call was not made: the arguments are not valid JSON")
    );
    assert_eq!(tools[1].0, "c2");
    assert_eq!(tools[2].0, "c3");
    assert_eq!(tools[3], ("c4".into(), r#"{"content":"x"}"#.into()));
}

#[test]
fn a_refusal_ends_the_loop() {
    let (model, _) = script(vec![reply(
        json!({"role": "assistant", "content": null, "refusal": "I can't help with that."}),
        "stop",
        (10, 5),
    )]);
    let mut agent = LlmAgent::new("a", config(json!({})), model);
    let (proposals, inferences) = drive(&mut agent, vec![]);
    assert_eq!(inferences[0].payload["error"]["kind"], "refusal");
    assert_eq!(
        proposals.last().unwrap(),
        &Err("the model refused: I can't help with that.".into())
    );

    let (model, _) = script(vec![reply(
        json!({"role": "assistant", "content": ""}),
        "content_filter",
        (10, 0),
    )]);
    let mut agent = LlmAgent::new("a", config(json!({})), model);
    let (proposals, _) = drive(&mut agent, vec![]);
    assert!(
        proposals
            .last()
            .unwrap()
            .clone()
            .unwrap_err()
            .starts_with("the model refused: ")
    );
}

#[test]
fn malformed_and_truncated_replies_count_as_errors() {
    let (model, seen) = script(vec![
        ModelReply::Ok {
            status: 200,
            body: json!({"error": {"message": "model overloaded"}}),
            latency_ms: 3,
        },
        reply(
            json!({"role": "assistant", "content": "a very long ans"}),
            "length",
            (10, 100),
        ),
        reply(
            json!({"role": "assistant", "content": null, "tool_calls": [call("c1", "fs_write", r#"{"path":"a","content":"xx"#)]}),
            "length",
            (10, 100),
        ),
    ]);
    let mut agent = LlmAgent::new("a", config(json!({})), model);
    let (proposals, inferences) = drive(&mut agent, vec![]);
    assert_eq!(inferences.len(), 3);
    assert_eq!(inferences[0].payload["error"]["kind"], "malformed_reply");
    assert!(
        inferences[0].payload["error"]["detail"]
            .as_str()
            .unwrap()
            .contains("model overloaded")
    );
    assert_eq!(
        inferences[0].payload["reply"]["error"]["message"],
        "model overloaded"
    );
    assert_eq!(inferences[1].payload["error"]["kind"], "truncated");
    assert_eq!(inferences[1].payload["finish_reason"], "length");
    assert_eq!(inferences[1].usage.tokens_out, 100);
    assert_eq!(inferences[2].payload["error"]["kind"], "truncated");
    assert_eq!(inferences[2].payload["rejected_tool_calls"][0]["id"], "c1");
    let err = proposals.last().unwrap().clone().unwrap_err();
    assert!(err.contains("truncated"), "{err}");
    // The model was told its reply was cut.
    let sent = seen.lock().unwrap()[2].clone();
    let last = sent["messages"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["role"], "user");
    assert!(
        last["content"]
            .as_str()
            .unwrap()
            .contains("max_tokens (100)")
    );
}

#[test]
fn missing_tool_call_ids_are_made_up_deterministically() {
    let (model, seen) = script(vec![
        tool_reply(
            None,
            vec![
                json!({"type": "function", "function": {"name": "fs_read", "arguments": {"path": "a"}}}),
            ],
        ),
        answer("ok"),
    ]);
    let mut agent = LlmAgent::new("a", config(json!({})), model);
    drive(&mut agent, vec![]);
    let sent = seen.lock().unwrap()[1].clone();
    assert_eq!(sent["messages"][2]["tool_calls"][0]["id"], "call_1_1");
    assert_eq!(sent["messages"][3]["tool_call_id"], "call_1_1");
}

#[test]
fn unrecordable_numbers_in_a_reply_become_strings() {
    let mut b = body(
        json!({"role": "assistant", "content": "ok"}),
        "stop",
        (1, 1),
    );
    b["seed"] = json!(u64::MAX);
    let (model, _) = script(vec![ModelReply::Ok {
        status: 200,
        body: b,
        latency_ms: 1,
    }]);
    let mut agent = LlmAgent::new("a", config(json!({})), model);
    let (_, inferences) = drive(&mut agent, vec![]);
    assert_eq!(
        inferences[0].payload["reply"]["seed"],
        json!(u64::MAX.to_string())
    );
}

// ---------------------------------------------------------------------------------------------
// Replay.

fn recorded_run() -> Vec<ModelReply> {
    vec![
        tool_reply(
            Some("look first"),
            vec![
                call("c1", "fs_read", r#"{"path":"hello.txt"}"#),
                call("c2", "mcp__notes__search", r#"{"q":"tone"}"#),
            ],
        ),
        failure(FailureKind::HttpStatus, "HTTP 500: oops", Some(500)),
        tool_reply(None, vec![call("c3", "fs_read", "{bad json")]),
        tool_reply(
            None,
            vec![call(
                "c4",
                "fs_write",
                r#"{"path":"hello.txt","content":"hi\n"}"#,
            )],
        ),
        answer("rewrote hello.txt"),
    ]
}

fn outcomes() -> Vec<Outcome> {
    vec![
        done(json!({"content": "hello", "bytes": 5, "truncated": false})),
        denied("policy_denied", "no notes for you"),
        done(json!({"staged": "hello.txt"})),
    ]
}

#[test]
fn a_recorded_model_replays_byte_identically() {
    let (model, _) = script(recorded_run());
    let mut live = LlmAgent::new("a", config(json!({"temperature": 0})), model);
    let (live_proposals, live_inferences) = drive(&mut live, outcomes());
    assert_eq!(live_inferences.len(), 5);
    assert_eq!(
        live_proposals.last().unwrap(),
        &Ok(Proposal::Finish {
            summary: "rewrote hello.txt".into()
        })
    );

    let recording: Vec<Payload> = live_inferences.iter().map(|i| i.payload.clone()).collect();
    let replay = RecordedModel::new(recording);
    let mut again = LlmAgent::new("a", config(json!({"temperature": 0})), Box::new(replay));
    let (proposals, inferences) = drive(&mut again, outcomes());
    assert_eq!(proposals, live_proposals);
    assert_eq!(inferences.len(), live_inferences.len());
    for (a, b) in live_inferences.iter().zip(&inferences) {
        assert_eq!(canonical(&a.payload), canonical(&b.payload));
        assert_eq!(a.intent, b.intent);
        assert_eq!(a.usage, b.usage);
    }
    assert!(again.divergences().is_empty());
}

#[test]
fn a_replay_reports_a_divergence_when_an_outcome_differs() {
    let (model, _) = script(recorded_run());
    let mut live = LlmAgent::new("a", config(json!({})), model);
    let (_, live_inferences) = drive(&mut live, outcomes());
    let recording: Vec<Payload> = live_inferences.iter().map(|i| i.payload.clone()).collect();

    let mut changed = outcomes();
    changed[0] = done(json!({"content": "HELLO", "bytes": 5, "truncated": false}));
    let mut again = LlmAgent::new(
        "a",
        config(json!({"max_errors": 2})),
        Box::new(RecordedModel::new(recording.clone())),
    );
    let (proposals, inferences) = drive(&mut again, changed);
    assert_eq!(canonical(&inferences[0].payload), canonical(&recording[0]));
    assert_eq!(inferences[1].payload["error"]["kind"], "replay_divergence");
    let div = again.divergences();
    assert!(!div.is_empty());
    assert!(
        div[0].starts_with("model call 2: the request digest is "),
        "{}",
        div[0]
    );
    assert!(
        div[0].contains(recording[1]["request_digest"].as_str().unwrap()),
        "{}",
        div[0]
    );
    assert!(proposals.last().unwrap().is_err());

    // A recording that runs out is a divergence too.
    let short = RecordedModel::new(recording[..1].to_vec());
    let mut agent = LlmAgent::new("a", config(json!({})), Box::new(short));
    let (_, inferences) = drive(&mut agent, outcomes());
    assert_eq!(inferences[1].payload["error"]["kind"], "replay_divergence");
    assert!(
        agent.divergences()[0].contains("the recording has only 1 model calls"),
        "{:?}",
        agent.divergences()
    );
}

/// Re-drive `agent` as a resumed run does: the views and outcomes of the recorded run, up to
/// (not including) model call `calls + 1`.
fn redrive(agent: &mut LlmAgent, calls: usize) {
    let mut outcomes: VecDeque<Outcome> = outcomes().into();
    let (mut last, mut n) = (None, 0);
    loop {
        let v = view(last.take());
        match agent.propose(&v).expect("the re-drive proposes") {
            Proposal::Infer { .. } if n == calls => return,
            Proposal::Infer { .. } => {
                agent.infer(&v).expect("the re-drive infers");
                n += 1;
            }
            Proposal::Request(_) => last = outcomes.pop_front(),
            other => panic!("the re-drive ended early with {other:?}"),
        }
    }
}

#[test]
fn a_resumed_agent_rebuilds_its_conversation_from_the_record_then_asks_the_live_model() {
    let (model, _) = script(recorded_run());
    let mut first = LlmAgent::new("a", config(json!({})), model);
    let (_, inferences) = drive(&mut first, outcomes());
    let recording: Vec<Payload> = inferences.iter().map(|i| i.payload.clone()).collect();
    // The run stopped after four model calls and the write they asked for, as its agent asked
    // for a fifth; a new process resumes it.
    let (live, seen) = script(vec![answer("rewrote hello.txt")]);
    let mut resumed = LlmAgent::new("a", config(json!({})), live);
    assert!(resumed.rebuild_from(recording[..4].to_vec()));
    redrive(&mut resumed, 4);
    assert!(
        seen.lock().unwrap().is_empty(),
        "the re-drive called no model"
    );
    resumed.rebuilt().expect("rebuilt");
    // It carries on where it stopped: the fifth call, now live, is exactly the request the
    // first agent made.
    let v = view(None);
    assert!(matches!(resumed.propose(&v), Ok(Proposal::Infer { .. })));
    let fifth = resumed.infer(&v).unwrap();
    assert_eq!(
        request_digest(&seen.lock().unwrap()[0]),
        recording[4]["request_digest"].as_str().unwrap()
    );
    assert_eq!(canonical(&fifth.payload), canonical(&recording[4]));
    assert_eq!(resumed.model_calls(), 5);

    // A recorded call the re-drive never reached, or one the record lacks, is refused.
    let (live, _) = script(vec![]);
    let mut short = LlmAgent::new("a", config(json!({})), live);
    short.rebuild_from(recording[..4].to_vec());
    redrive(&mut short, 3);
    let e = short.rebuilt().unwrap_err();
    assert!(
        e.0.contains("1 recorded model call(s) were not reached"),
        "{e}"
    );
    let (live, seen) = script(vec![]);
    let mut long = LlmAgent::new("a", config(json!({})), live);
    long.rebuild_from(recording[..2].to_vec());
    redrive(&mut long, 3);
    let e = long.rebuilt().unwrap_err();
    assert!(
        e.0.contains("could not be rebuilt: model call 3: the recording has only 2 model calls"),
        "{e}"
    );
    assert!(seen.lock().unwrap().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Configuration.

#[test]
fn config_defaults_and_parsing() {
    let c = LlmConfig::from_value(&json!({
        "base_url": "https://api.example.com/v1/",
        "model": "gpt",
        "task": "t",
        "timeout": "1500ms",
        "temperature": 1,
    }))
    .unwrap();
    assert_eq!(c.max_tokens, 1024);
    assert_eq!(c.max_steps, 16);
    assert_eq!(c.max_errors, 3);
    assert_eq!(c.timeout, Duration::from_millis(1500));
    assert_eq!(c.temperature, Some(1.0));
    assert_eq!(c.endpoint(), "https://api.example.com/v1/chat/completions");
    assert_eq!(llm::parse_duration("60s"), Ok(Duration::from_secs(60)));
    assert_eq!(llm::parse_duration("2m"), Ok(Duration::from_secs(120)));
    assert_eq!(llm::parse_duration("1h"), Ok(Duration::from_secs(3600)));
    assert!(llm::parse_duration("1.5s").is_err());
    assert!(llm::parse_duration("s").is_err());
    assert_eq!(
        LlmConfig::from_value(&json!({"base_url": "http://h/v1", "model": "m", "task": "t"}))
            .unwrap()
            .timeout,
        Duration::from_secs(120)
    );
}

#[test]
fn config_errors_name_the_field() {
    let base = json!({"base_url": "http://127.0.0.1:8080/v1", "model": "m", "task": "t"});
    let with = |k: &str, v: Value| {
        let mut x = base.clone();
        x[k] = v;
        LlmConfig::from_value(&x).unwrap_err()
    };
    let cases = [
        (with("temprature", json!(1)), "`temprature`"),
        (with("max_tokens", json!(0)), "`max_tokens`"),
        (with("max_tokens", json!(-5)), "`max_tokens`"),
        (with("max_tokens", json!("many")), "`max_tokens`"),
        (with("max_steps", json!(0)), "`max_steps`"),
        (with("max_errors", json!(0)), "`max_errors`"),
        (with("temperature", json!(3.5)), "`temperature`"),
        (with("timeout", json!("soon")), "`timeout`"),
        (with("timeout", json!("0s")), "`timeout`"),
        (with("timeout", json!(60)), "`timeout`"),
        (with("base_url", json!("ftp://x/v1")), "`base_url`"),
        (with("base_url", json!("http://user:pw@x/v1")), "`base_url`"),
        (with("base_url", json!("http://")), "`base_url`"),
        (with("model", json!(" ")), "`model`"),
        (with("task", json!("")), "`task`"),
        (with("api_key_env", json!("MY KEY")), "`api_key_env`"),
    ];
    for (err, field) in cases {
        assert!(err.starts_with("[agent.llm] "), "{err}");
        assert!(err.contains(field), "{field}: {err}");
    }
    let missing =
        LlmConfig::from_value(&json!({"base_url": "http://h/v1", "model": "m"})).unwrap_err();
    assert!(missing.contains("`task`"), "{missing}");
    assert!(LlmConfig::from_value(&json!("x")).is_err());
}

#[test]
fn an_unset_api_key_variable_is_an_error_at_construction() {
    let c = config(json!({"api_key_env": "ICE_TEST_SURELY_UNSET_KEY_VAR"}));
    let err = HttpModel::new(&c).unwrap_err();
    assert!(err.contains("ICE_TEST_SURELY_UNSET_KEY_VAR"), "{err}");
    assert!(err.contains("`api_key_env`"), "{err}");
    assert!(LlmAgent::http("a", c).is_err());
}

// ---------------------------------------------------------------------------------------------
// HttpModel against a canned server.

/// Read one HTTP request (headers and a Content-Length body) from `s`.
fn read_request(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).unwrap_or(0);
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                break;
            }
        }
    }
    String::from_utf8_lossy(&buf).to_string()
}

/// Serve one connection: `respond` makes the raw response from the raw request.
fn serve_once(
    respond: impl FnOnce(&str) -> Option<Vec<u8>> + Send + 'static,
) -> (String, thread::JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let request = read_request(&mut s);
        match respond(&request) {
            Some(response) => {
                let _ = s.write_all(&response);
                let _ = s.flush();
            }
            None => thread::sleep(Duration::from_secs(3)),
        }
        request
    });
    (format!("http://127.0.0.1:{port}/v1"), handle)
}

fn http_response(status: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

fn http_config(url: &str, extra: Value) -> LlmConfig {
    let mut v = json!({"base_url": url, "model": "m1", "task": "t", "timeout": "1s"});
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    LlmConfig::from_value(&v).unwrap()
}

#[test]
fn http_model_posts_and_parses_a_reply() {
    let reply_body = body(
        json!({"role": "assistant", "content": "hi"}),
        "stop",
        (3, 1),
    );
    let canned = http_response("200 OK", reply_body.to_string().as_bytes());
    let (url, server) = serve_once(move |_| Some(canned));
    let mut model = HttpModel::new(&http_config(&url, json!({}))).unwrap();
    let request = json!({"model": "m1", "messages": []});
    let got = model.complete(&request);
    let raw = server.join().unwrap();
    assert!(
        raw.starts_with("POST /v1/chat/completions HTTP/1.1\r\n"),
        "{raw}"
    );
    assert!(
        raw.to_ascii_lowercase()
            .contains("content-type: application/json")
    );
    assert!(!raw.to_ascii_lowercase().contains("authorization"));
    assert!(raw.ends_with(&request.to_string()));
    let ModelReply::Ok { status, body, .. } = got else {
        panic!("{got:?}")
    };
    assert_eq!(status, 200);
    assert_eq!(body, reply_body);
}

#[test]
fn http_model_reports_a_status_error() {
    let (url, server) = serve_once(|_| {
        Some(http_response(
            "500 Internal Server Error",
            b"{\"error\":\"boom\"}",
        ))
    });
    let mut model = HttpModel::new(&http_config(&url, json!({}))).unwrap();
    let got = model.complete(&json!({}));
    server.join().unwrap();
    let ModelReply::Failed(f) = got else {
        panic!("{got:?}")
    };
    assert_eq!(f.kind, FailureKind::HttpStatus);
    assert_eq!(f.status, Some(500));
    assert!(f.detail.contains("boom"), "{}", f.detail);
}

#[test]
fn http_model_reports_a_body_that_is_not_json() {
    let (url, server) = serve_once(|_| Some(http_response("200 OK", b"not json at all")));
    let mut model = HttpModel::new(&http_config(&url, json!({}))).unwrap();
    let got = model.complete(&json!({}));
    server.join().unwrap();
    let ModelReply::Failed(f) = got else {
        panic!("{got:?}")
    };
    assert_eq!(f.kind, FailureKind::MalformedJson);
    assert_eq!(f.status, Some(200));
    assert!(f.detail.contains("not json at all"), "{}", f.detail);
}

#[test]
fn http_model_times_out() {
    let (url, _server) = serve_once(|_| None);
    let mut model = HttpModel::new(&http_config(&url, json!({}))).unwrap();
    let started = std::time::Instant::now();
    let got = model.complete(&json!({}));
    let ModelReply::Failed(f) = got else {
        panic!("{got:?}")
    };
    assert_eq!(f.kind, FailureKind::Timeout, "{}", f.detail);
    assert!(started.elapsed() < Duration::from_millis(2900));
    assert!(f.latency_ms >= 900, "{}", f.latency_ms);
}

/// The finding: a model call ran its full timeout whatever the run's wall-time budget had
/// left. Bounded, it is cut at the budget's end, and says so.
#[test]
fn http_model_is_cut_at_the_end_of_the_wall_time_budget() {
    let (url, _server) = serve_once(|_| None);
    let mut model = HttpModel::new(&http_config(&url, json!({"timeout": "20s"}))).unwrap();
    model.bound(Some(Duration::from_millis(800)));
    let started = std::time::Instant::now();
    let ModelReply::Failed(f) = model.complete(&json!({})) else {
        panic!()
    };
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(f.kind, FailureKind::Timeout, "{}", f.detail);
    assert!(
        f.detail
            .contains("cut at the end of the run's wall_time budget, which had 800 ms left"),
        "{}",
        f.detail
    );
}

#[test]
fn http_model_reports_transport_and_oversized_failures() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}/v1");
    let mut model = HttpModel::new(&http_config(&url, json!({}))).unwrap();
    let ModelReply::Failed(f) = model.complete(&json!({})) else {
        panic!()
    };
    assert_eq!(f.kind, FailureKind::Transport, "{}", f.detail);

    let big = vec![b' '; (llm::MAX_REPLY_BYTES + 10) as usize];
    let (url, server) = serve_once(move |_| Some(http_response("200 OK", &big)));
    let mut model = HttpModel::new(&http_config(&url, json!({"timeout": "20s"}))).unwrap();
    let ModelReply::Failed(f) = model.complete(&json!({})) else {
        panic!()
    };
    assert_eq!(f.kind, FailureKind::Oversized, "{}", f.detail);
    server.join().unwrap();
}

#[test]
fn the_api_key_is_sent_but_never_recorded() {
    const VAR: &str = "ICE_TEST_LLM_API_KEY_7f3a";
    const KEY: &str = "sk-test-very-secret-0123456789";
    // SAFETY: this variable is set only here, before any thread of this test reads it.
    unsafe { std::env::set_var(VAR, KEY) };
    // The server echoes the Authorization header back in the reply: the driver must not record it.
    let (url, server) = serve_once(|request| {
        let auth = request
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("authorization:"))
            .unwrap_or("")
            .to_string();
        let b = body(
            json!({"role": "assistant", "content": auth}),
            "stop",
            (1, 1),
        );
        Some(http_response("200 OK", b.to_string().as_bytes()))
    });
    let c = http_config(&url, json!({"api_key_env": VAR}));
    let mut agent = LlmAgent::http("a", c.clone()).unwrap();
    let v = view(None);
    assert!(matches!(agent.propose(&v).unwrap(), Proposal::Infer { .. }));
    let inference = agent.infer(&v).unwrap();
    let raw = server.join().unwrap();
    assert!(raw.contains(&format!("Bearer {KEY}")), "{raw}");
    let recorded = String::from_utf8(canonical(&inference.payload)).unwrap();
    assert!(!recorded.contains(KEY), "{recorded}");
    assert!(recorded.contains("[redacted]"), "{recorded}");
    assert!(!format!("{c:?}").contains(KEY));
    assert!(!format!("{agent:?}").contains(KEY));
    let Proposal::Finish { summary } = agent.propose(&v).unwrap() else {
        panic!()
    };
    assert!(!summary.contains(KEY));
}

/// One model call, with the key in `var`, to a server answering `response`: the reply's body.
fn reply_with_key(var: &str, response: Vec<u8>) -> Value {
    let (url, server) = serve_once(move |_| Some(response));
    let mut model = HttpModel::new(&http_config(&url, json!({"api_key_env": var}))).unwrap();
    let got = model.complete(&json!({}));
    server.join().unwrap();
    let ModelReply::Ok { body, .. } = got else {
        panic!("{got:?}")
    };
    body
}

/// The finding: a server that echoed the key JSON-escaped (`\u0073k-…`) got it recorded in
/// clear, since only the raw bytes were searched. Replies are redacted as decoded too (object
/// keys included), and so is a JSON error body.
#[test]
fn the_api_key_written_with_json_escapes_is_not_recorded_either() {
    const VAR: &str = "ICE_TEST_LLM_API_KEY_escaped_91c2";
    const KEY: &str = "sk-live/SECRETKEY123";
    // SAFETY: this variable is set only here, before any thread of this test reads it.
    unsafe { std::env::set_var(VAR, KEY) };
    let escaped: String = KEY
        .chars()
        .map(|c| match c {
            's' => "\\u0073".to_string(),
            '/' => "\\/".to_string(),
            c => c.to_string(),
        })
        .collect();
    assert!(!escaped.contains(KEY));
    let ok = format!(
        r#"{{"id":"x","object":"chat.completion","created":1,"model":"m","choices":[{{"index":0,"message":{{"role":"assistant","content":"key: {escaped}"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":1,"completion_tokens":1}},"{escaped}":1}}"#
    );
    let body = reply_with_key(VAR, http_response("200 OK", ok.as_bytes()));
    let text = body.to_string();
    assert!(!text.contains("SECRETKEY"), "{text}");
    assert_eq!(body["choices"][0]["message"]["content"], "key: [redacted]");
    assert_eq!(body["[redacted]"], 1, "{text}");
    // The probe's finding: a tool call's `arguments` is JSON text inside a string, decoded by
    // the agent after the reply was redacted, so escapes in it carried the key through (into
    // the proposal's arguments and a denial's detail). It is redacted as decoded too.
    let arguments = format!(r#"{{"path":"../{escaped}","content":"{escaped}","{escaped}":1}}"#);
    assert!(!arguments.contains(KEY));
    let call = json!({"id": "c1", "type": "function", "function": {"name": "fs_write", "arguments": arguments}});
    let ok = json!({"id": "x", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "tool_calls": [call]},
            "finish_reason": "tool_calls"}]})
    .to_string();
    let body = reply_with_key(VAR, http_response("200 OK", ok.as_bytes()));
    let arguments = body["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
        .as_str()
        .unwrap();
    let decoded: Value = serde_json::from_str(arguments).unwrap();
    assert!(!decoded.to_string().contains("SECRETKEY"), "{decoded}");
    assert_eq!(decoded["content"], "[redacted]", "{decoded}");
    assert_eq!(decoded["path"], "../[redacted]", "{decoded}");
    assert_eq!(decoded["[redacted]"], 1, "{decoded}");
    // Nor in percent-escapes, which a URL's normalisation decodes (found by a review).
    let pct: String = KEY.bytes().map(|c| format!("%{c:02X}")).collect();
    let ok = json!({"id": "x", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("https://h.example/{pct}")},
            "finish_reason": "stop"}]})
    .to_string();
    let body = reply_with_key(VAR, http_response("200 OK", ok.as_bytes()));
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "https://h.example/[redacted]"
    );
    let err = format!(r#"{{"error":{{"message":"bad key {escaped}"}}}}"#);
    let (url, server) =
        serve_once(move |_| Some(http_response("401 Unauthorized", err.as_bytes())));
    let mut model = HttpModel::new(&http_config(&url, json!({"api_key_env": VAR}))).unwrap();
    let got = model.complete(&json!({}));
    server.join().unwrap();
    let ModelReply::Failed(f) = got else {
        panic!("{got:?}")
    };
    assert!(!f.detail.contains("SECRETKEY"), "{}", f.detail);
    assert!(f.detail.contains("bad key [redacted]"), "{}", f.detail);
}

/// The finding: a one-letter "key" (local servers take any) had every `e` taken out of the
/// replies, breaking them. A value shorter than 8 bytes is a placeholder, not redacted.
#[test]
fn a_placeholder_key_leaves_replies_as_they_are() {
    const VAR: &str = "ICE_TEST_LLM_API_KEY_placeholder_5d1e";
    // SAFETY: this variable is set only here, before any thread of this test reads it.
    unsafe { std::env::set_var(VAR, "EMPTY") };
    let (url, server) = serve_once(|_| {
        let b = body(
            json!({"role": "assistant", "content": "EMPTY message"}),
            "stop",
            (1, 1),
        );
        Some(http_response("200 OK", b.to_string().as_bytes()))
    });
    let mut model = HttpModel::new(&http_config(&url, json!({"api_key_env": VAR}))).unwrap();
    let got = model.complete(&json!({}));
    let raw = server.join().unwrap();
    assert!(raw.contains("Bearer EMPTY"), "{raw}");
    let ModelReply::Ok { body, .. } = got else {
        panic!("{got:?}")
    };
    assert_eq!(body["choices"][0]["message"]["content"], "EMPTY message");
}

// ---------------------------------------------------------------------------------------------
// What the log carries: usage, numbers, reserved keys, many calls.

/// A chat completion with no `usage` at all.
fn body_without_usage(message: Value, finish: &str) -> Value {
    let mut b = body(message, finish, (0, 0));
    b.as_object_mut().unwrap().remove("usage");
    b
}

fn ok(body: Value) -> ModelReply {
    ModelReply::Ok {
        status: 200,
        body,
        latency_ms: 5,
    }
}

/// Seal `inference` as the runtime records it (an `InferenceStep` of a run in its execution
/// window) and read the payload back from the event's canonical body and its blobs: exactly
/// what a replay or a resume is given. An error is the kernel's refusal.
fn logged(inference: &Inference) -> Result<Payload, String> {
    use ice_kernel::{Draft, Event, NoOtherRuns, Origin, RunHead, Timestamp};
    let mut head = RunHead::new(RunId::new("r").unwrap());
    let at = Timestamp::from_unix_us(1).unwrap();
    for t in ["RunProvisioned", "ContextResolved", "ExecutionWindowOpened"] {
        head.seal(Draft::new(t, Origin::Runtime), at, &NoOtherRuns)
            .unwrap();
    }
    let (sealed, blobs) = head
        .seal(inference.draft("a"), at, &NoOtherRuns)
        .map_err(|e| e.to_string())?;
    let e = sealed.into_event();
    let back = Event::from_body(&e.canonical_body(), e.hash).map_err(|e| e.to_string())?;
    Ok(ice_kernel::blob::inline(&back.payload, |d| {
        blobs
            .iter()
            .find(|b| &b.digest == d)
            .map(|b| b.bytes.clone())
    }))
}

/// Drive a live agent on `replies`, then replay it from what the log reads back of each of its
/// inferences: both must propose, record and cost the same, with no divergence.
fn live_and_replayed_agree(replies: Vec<ModelReply>, outcomes: Vec<Outcome>) -> Vec<Inference> {
    let (model, _) = script(replies);
    let mut live = LlmAgent::new("a", config(json!({})), model);
    let (live_proposals, live_inferences) = drive(&mut live, outcomes.clone());
    let recording: Vec<Payload> = live_inferences
        .iter()
        .map(|i| logged(i).unwrap_or_else(|e| panic!("the log refuses {:?}: {e}", i.intent)))
        .collect();
    let mut again = LlmAgent::new(
        "a",
        config(json!({})),
        Box::new(RecordedModel::new(recording.clone())),
    );
    let (proposals, inferences) = drive(&mut again, outcomes);
    assert!(again.divergences().is_empty(), "{:?}", again.divergences());
    assert_eq!(proposals, live_proposals);
    assert_eq!(inferences.len(), live_inferences.len());
    for ((a, b), rec) in live_inferences.iter().zip(&inferences).zip(&recording) {
        assert_eq!(canonical(&a.payload), canonical(&b.payload));
        assert_eq!(canonical(&a.payload), canonical(rec));
        assert_eq!(a.intent, b.intent);
        assert_eq!(a.usage, b.usage);
    }
    live_inferences
}

#[test]
fn usage_the_provider_does_not_report_is_costed_at_the_reservation() {
    let message = json!({"role": "assistant", "content": null, "tool_calls": [call("c1", "fs_read", r#"{"path":"a"}"#)]});
    let mut fractional = body(message.clone(), "tool_calls", (0, 0));
    fractional["usage"] = json!({"prompt_tokens": 12.5, "completion_tokens": -3});
    let mut partial = body(message.clone(), "tool_calls", (0, 0));
    partial["usage"] = json!({"prompt_tokens": 40, "completion_tokens": "7"});
    let (model, _) = script(vec![
        ok(body_without_usage(message, "tool_calls")),
        ok(fractional),
        ok(partial),
        ok(json!({"error": {"message": "overloaded"}})),
        answer("done"),
    ]);
    let mut agent = LlmAgent::new("a", config(json!({"max_errors": 5})), model);
    let mut last = None;
    let mut costs = Vec::new();
    loop {
        let v = view(last.take());
        match agent.propose(&v).unwrap() {
            Proposal::Infer { reserve } => {
                let i = agent.infer(&v).unwrap();
                costs.push((reserve, i));
            }
            Proposal::Request(_) => last = Some(done(json!({}))),
            Proposal::Finish { .. } => break,
            Proposal::Think { .. } => unreachable!(),
        }
    }
    assert_eq!(costs.len(), 5);
    let both = json!(["prompt_tokens", "completion_tokens"]);
    for (n, unreported) in [(0, both.clone()), (1, both.clone()), (3, both)] {
        let (reserve, i) = &costs[n];
        assert!(reserve.tokens_in > 0 && reserve.tokens_out == 100);
        assert_eq!(
            (i.usage.tokens_in, i.usage.tokens_out),
            (reserve.tokens_in, reserve.tokens_out),
            "call {n}"
        );
        assert_eq!(
            i.payload["usage"],
            json!({"prompt_tokens": reserve.tokens_in, "completion_tokens": 100, "unreported": unreported}),
            "call {n}"
        );
    }
    // One figure reported, the other not: each on its own.
    let (reserve, i) = &costs[2];
    assert_eq!(
        (i.usage.tokens_in, i.usage.tokens_out),
        (40, reserve.tokens_out)
    );
    assert_eq!(
        i.payload["usage"],
        json!({"prompt_tokens": 40, "completion_tokens": 100, "unreported": ["completion_tokens"]})
    );
    // A reported figure is taken as it is, and the payload says nothing more.
    let (_, i) = &costs[4];
    assert_eq!((i.usage.tokens_in, i.usage.tokens_out), (80, 10));
    assert_eq!(
        i.payload["usage"],
        json!({"prompt_tokens": 80, "completion_tokens": 10})
    );
}

#[test]
fn whole_number_floats_are_the_same_value_live_and_in_replay() {
    let mut first = body(
        json!({"role": "assistant", "content": "list it", "tool_calls": [{
            "id": "c1", "type": "function",
            "function": {"name": "process_exec", "arguments": {"program": "ls", "timeout_ms": 5000.0}},
        }]}),
        "tool_calls",
        (0, 0),
    );
    first["usage"] = json!({"prompt_tokens": 12.0, "completion_tokens": 3.0, "total_tokens": 15.0});
    first["created"] = json!(1.7e9);
    first["choices"][0]["index"] = json!(-0.0);
    let inferences = live_and_replayed_agree(vec![ok(first), answer("done")], vec![]);
    // Live, the call is made (5000.0 is 5000, as the log will write it) and the usage counts.
    assert_eq!(inferences[0].intent, "model call 1/16: 1 tool call(s)");
    assert_eq!(
        (
            inferences[0].usage.tokens_in,
            inferences[0].usage.tokens_out
        ),
        (12, 3)
    );
    let reply = &inferences[0].payload["reply"];
    assert!(reply["usage"]["prompt_tokens"].is_u64());
    assert!(reply["created"].is_u64());
    assert!(reply["choices"][0]["index"].is_u64());
    assert!(
        reply["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]["timeout_ms"]
            .is_u64()
    );
}

#[test]
fn a_reserved_blob_key_in_a_reply_is_recorded_and_never_refused() {
    let args = json!({"path": "a", "$blob": "0".repeat(64), "size": 3});
    let in_args = tool_reply(
        Some("read it"),
        vec![
            json!({"id": "c1", "type": "function", "function": {"name": "fs_read", "arguments": args}}),
        ],
    );
    let mut at_top = body(
        json!({"role": "assistant", "content": "hi"}),
        "stop",
        (5, 5),
    );
    at_top["$blob"] = json!("x");
    let mut in_usage = body(
        json!({"role": "assistant", "content": null, "tool_calls": [call("c2", "fs_read", r#"{"path":"b"}"#)]}),
        "tool_calls",
        (5, 5),
    );
    in_usage["usage"]["$blob"] = json!({"size": 1});
    let inferences = live_and_replayed_agree(
        vec![ok(at_top), in_args, ok(in_usage), answer("done")],
        vec![],
    );
    assert_eq!(inferences.len(), 4);
    // A reply that is itself marked is unusable: a malformed reply, counted as one.
    assert_eq!(inferences[0].payload["error"]["kind"], "malformed_reply");
    // Arguments so marked are kept as their JSON text: still the call the model made.
    assert!(inferences[1].payload["reply"]["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"].is_string());
    assert!(inferences[1].payload.get("error").is_none());
    // Usage so marked is not reported usage.
    assert_eq!(
        inferences[2].payload["usage"]["unreported"],
        json!(["prompt_tokens", "completion_tokens"])
    );
    for i in &inferences {
        assert!(!ice_kernel::blob::uses_reserved_key(&Value::Object(
            i.payload.clone()
        )));
    }
}

#[test]
fn a_reply_with_too_many_tool_calls_is_read_up_to_the_limit_and_says_so_once() {
    let total = 1000;
    let calls: Vec<Value> = (0..total)
        .map(|i| call(&format!("c{i}"), &format!("nope_{i}"), "{}"))
        .collect();
    let (model, seen) = script(vec![tool_reply(None, calls), answer("gave up")]);
    let mut agent = LlmAgent::new("a", config(json!({})), model);
    let (_, inferences) = drive(&mut agent, vec![]);
    let limit = llm::MAX_TOOL_CALLS_PER_REPLY;
    assert_eq!(limit, 128);
    let p = &inferences[0].payload;
    assert_eq!(p["error"]["kind"], "too_many_tool_calls");
    let detail = p["error"]["detail"].as_str().unwrap();
    assert!(
        detail.contains("1000") && detail.contains("872"),
        "{detail}"
    );
    assert_eq!(p["tool_calls_over_limit"], 872);
    assert_eq!(p["rejected_tool_calls"].as_array().unwrap().len(), limit);
    assert!(
        inferences[0].intent.contains("872"),
        "{}",
        inferences[0].intent
    );
    logged(&inferences[0]).unwrap();
    // The recorded rejections do not list the offered functions.
    let rejected = serde_json::to_string(&p["rejected_tool_calls"]).unwrap();
    assert!(!rejected.contains("fs_read"), "{rejected}");
    assert!(rejected.len() < 16 * 1024, "{} bytes", rejected.len());

    // The next request: the calls read are echoed and answered, the functions named once, and
    // the model is told once how many calls were not made.
    let sent = seen.lock().unwrap()[1].clone();
    let messages = sent["messages"].as_array().unwrap();
    assert_eq!(messages[2]["tool_calls"].as_array().unwrap().len(), limit);
    let answers: Vec<&str> = messages
        .iter()
        .filter(|m| m["role"] == "tool")
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(answers.len(), limit);
    let text = serde_json::to_string(&messages[2..]).unwrap();
    assert_eq!(text.matches("fs_read").count(), 1, "{text}");
    assert!(text.len() < 64 * 1024, "{} bytes", text.len());
    let note = messages.last().unwrap();
    assert_eq!(note["role"], "user");
    let note = note["content"].as_str().unwrap();
    assert!(note.contains("1000") && note.contains("872"), "{note}");
}

#[test]
fn a_made_up_tool_call_id_never_repeats_one_the_model_used() {
    let (model, seen) = script(vec![
        tool_reply(
            None,
            vec![
                call("call_1_2", "fs_read", r#"{"path":"a"}"#),
                call("call_1_2", "fs_read", r#"{"path":"b"}"#),
                call("call_1_3", "fs_read", r#"{"path":"c"}"#),
            ],
        ),
        answer("ok"),
    ]);
    let mut agent = LlmAgent::new("a", config(json!({})), model);
    drive(&mut agent, vec![]);
    let sent = seen.lock().unwrap()[1].clone();
    let echoed: Vec<&str> = sent["messages"][2]["tool_calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    let answered: Vec<&str> = sent["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "tool")
        .map(|m| m["tool_call_id"].as_str().unwrap())
        .collect();
    assert_eq!(echoed, answered);
    let unique: std::collections::BTreeSet<&str> = echoed.iter().copied().collect();
    assert_eq!(unique.len(), 3, "{echoed:?}");
    assert_eq!(echoed[0], "call_1_2");
    assert_eq!(echoed[2], "call_1_3");
    assert_eq!(echoed[1], "call_1_4");
}

/// The probe's finding: a 429 or 503 with `Retry-After` was retried at once, so a provider
/// that was only rate limiting made the run fail `max_errors` times within a fraction of a
/// second. The next call now waits what the server asked (up to `MAX_RETRY_WAIT` and the time
/// the run has left), and the recorded error says so; a stop ends the wait at once.
#[test]
fn a_retry_after_is_waited_for_before_the_next_call() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "http://127.0.0.1:{}/v1",
        listener.local_addr().unwrap().port()
    );
    let server = thread::spawn(move || {
        let mut at = Vec::new();
        let ok = body(
            json!({"role": "assistant", "content": "hi"}),
            "stop",
            (1, 1),
        )
        .to_string();
        for i in 0..2 {
            let (mut s, _) = listener.accept().unwrap();
            read_request(&mut s);
            at.push(std::time::Instant::now());
            let reply = if i == 0 {
                let mut r = http_response("429 Too Many Requests", br#"{"error":"slow down"}"#);
                let head = b"HTTP/1.1 429 Too Many Requests\r\n";
                r.splice(
                    ..head.len(),
                    b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\n"
                        .iter()
                        .copied(),
                );
                r
            } else {
                http_response("200 OK", ok.as_bytes())
            };
            let _ = s.write_all(&reply);
        }
        at
    });
    let mut model = HttpModel::new(&http_config(&url, json!({}))).unwrap();
    let ModelReply::Failed(f) = model.complete(&json!({})) else {
        panic!("the 429 is a failure")
    };
    assert_eq!(f.status, Some(429));
    assert!(f.detail.contains("called again after 1 s"), "{}", f.detail);
    let got = model.complete(&json!({}));
    assert!(matches!(got, ModelReply::Ok { .. }), "{got:?}");
    let at = server.join().unwrap();
    let waited = at[1] - at[0];
    assert!(
        waited >= Duration::from_millis(950),
        "retried after {waited:?}"
    );

    // A stop while it waits ends the wait at once.
    let (url, server) = serve_once(|_| {
        let mut r = http_response("503 Service Unavailable", b"{}");
        let head = b"HTTP/1.1 503 Service Unavailable\r\n";
        r.splice(
            ..head.len(),
            b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 3600\r\n"
                .iter()
                .copied(),
        );
        Some(r)
    });
    let mut model = HttpModel::new(&http_config(&url, json!({}))).unwrap();
    let ModelReply::Failed(f) = model.complete(&json!({})) else {
        panic!("the 503 is a failure")
    };
    server.join().unwrap();
    assert!(
        f.detail.contains("called again after 60 s"),
        "capped: {}",
        f.detail
    );
    let interrupt = model.interrupt().unwrap();
    let raise = thread::spawn(move || {
        thread::sleep(Duration::from_millis(300));
        interrupt.raise();
    });
    let started = std::time::Instant::now();
    let ModelReply::Failed(f) = model.complete(&json!({})) else {
        panic!("given up")
    };
    raise.join().unwrap();
    assert_eq!(f.kind, FailureKind::Interrupted, "{f:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}
