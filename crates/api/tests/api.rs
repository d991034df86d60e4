//! The operator API in process: an axum server on 127.0.0.1:0 over a temporary installation
//! whose runs are plan-driven. Authentication (401 / 403), every endpoint's happy path, and
//! the 4xx answers to malformed, oversized and unknown input.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ice_api::{ApiState, CredentialStore, Credentials, Role, token_digest};
use ice_intelligence::{Plan, PlanAgent};
use ice_kernel::Agent;
use ice_log::checkpoint::{NoteSigner, NoteVerifier};
use ice_log::clock::SystemClock;
use ice_log::ledger::Ledger;
use ice_log::proof::ProofFile;
use ice_log::sqlite::SqliteLog;
use ice_runtime::{Installation, RunSpec, Runtime};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const OPERATOR_TOKEN: &str = "test-operator-token-alice-6f1d";
const AGENT_TOKEN: &str = "test-agent-token-coder-93ab";

const POLICY: &str = r#"
@id("read")
permit(principal, action in [Action::"fs.read", Action::"fs.list"], resource in Dir::".");
@id("write-with-approval")
@approval("required")
permit(principal == Agent::"coder", action == Action::"fs.write", resource in Dir::".");
"#;

/// Read, then a write an operator must approve, then finish.
const WRITE_PLAN: &str = r#"
agent = "coder"
[[step]]
intent = "read the greeting"
capability = "fs.read"
target = "hello.txt"
[[step]]
intent = "write notes"
capability = "fs.write"
target = "notes.txt"
arguments = { content = "noted\n" }
[[step]]
finish = "done"
"#;

/// Three reads: with a budget of one tool call, the run suspends at the second.
const READS_PLAN: &str = r#"
agent = "coder"
[[step]]
intent = "read the greeting"
capability = "fs.read"
target = "hello.txt"
repeat = 3
[[step]]
finish = "done"
"#;

struct Api {
    base: String,
    dir: tempfile::TempDir,
    http: reqwest::Client,
    verifier: NoteVerifier,
    stop: CancellationToken,
    credentials: Arc<CredentialStore>,
    rt: &'static Runtime,
}

impl Drop for Api {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn plan_agents(spec: &RunSpec) -> Result<Box<dyn Agent>, String> {
    let file = spec.plan.as_ref().ok_or("no plan")?;
    let plan = Plan::load(file).map_err(|e| e.to_string())?;
    Ok(Box::new(PlanAgent::new(spec.agent.clone(), plan)))
}

impl Api {
    /// A temporary installation and its API; with `operators`, alice's token is known.
    async fn start(operators: bool) -> Api {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path();
        let home = base.join("home");
        std::fs::create_dir_all(home.join("runs")).unwrap();
        let policies = base.join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        std::fs::write(policies.join("p.cedar"), POLICY).unwrap();
        let ws = base.join("workspace");
        std::fs::create_dir_all(&ws).unwrap();
        std::fs::write(ws.join("hello.txt"), "hello\n").unwrap();
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
        let rt: &'static Runtime = Box::leak(Box::new(rt));
        let signer = NoteSigner::generate("api.test/log").unwrap();
        let verifier = signer.verifier();
        let mut creds = Credentials::new();
        if operators {
            creds
                .add(Role::Operator, "alice", &token_digest(OPERATOR_TOKEN))
                .unwrap();
        }
        creds
            .add(Role::Agent, "coder", &token_digest(AGENT_TOKEN))
            .unwrap();
        let stop = CancellationToken::new();
        let credentials = CredentialStore::new(creds);
        let state = ApiState::new(
            rt,
            signer,
            verifier.clone(),
            credentials.clone(),
            Arc::new(plan_agents),
        )
        .with_stop(stop.clone())
        .with_token_hint("ice token add --operator NAME --home HOME");
        let app = ice_api::router(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let until = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { until.cancelled().await })
                .await
                .unwrap();
        });
        Api {
            base: format!("http://{addr}"),
            dir,
            http: {
                // reqwest carries no TLS crypto provider of its own here (see the workspace's
                // Cargo.toml).
                let _ = rustls::crypto::ring::default_provider().install_default();
                reqwest::Client::new()
            },
            verifier,
            stop,
            credentials,
            rt,
        }
    }

    /// Write a run spec (and its plan) into the installation's directory.
    fn spec(&self, name: &str, extra: &str, plan: &str) -> PathBuf {
        let base = self.dir.path();
        std::fs::write(base.join(format!("{name}-plan.toml")), plan).unwrap();
        let file = base.join(format!("{name}.toml"));
        std::fs::write(
            &file,
            format!(
                "[run]\nagent = \"coder\"\nworkspace = \"workspace\"\npolicy = \"policies\"\n\n[agent]\ndriver = \"plan\"\nplan = \"{name}-plan.toml\"\n\n[approvals]\ntimeout = \"60s\"\n\n{extra}\n"
            ),
        )
        .unwrap();
        file
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.base)
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self.http.request(method.parse().unwrap(), self.url(path));
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap();
        let v = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| json!({"raw": String::from_utf8_lossy(&bytes).to_string()}));
        (status, v)
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call("GET", path, Some(OPERATOR_TOKEN), None).await
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call("POST", path, Some(OPERATOR_TOKEN), Some(body))
            .await
    }

    /// Start a run of `spec`: 202 and its id.
    async fn start_run(&self, spec: &std::path::Path) -> String {
        let (status, v) = self
            .post("/runs", json!({"spec": spec.display().to_string()}))
            .await;
        assert_eq!(status, 202, "{v}");
        v["run"].as_str().unwrap().to_string()
    }

    /// Wait until `run` has a pending approval; its id.
    async fn pending(&self, run: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, v) = self.get(&format!("/approvals?run={run}")).await;
            assert_eq!(status, 200, "{v}");
            if let Some(a) = v["approvals"].as_array().and_then(|a| a.first()) {
                return a["id"].as_str().unwrap().to_string();
            }
            assert!(Instant::now() < deadline, "no approval requested by {run}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Wait until `run` is in `state`.
    async fn state(&self, run: &str, state: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, v) = self.get(&format!("/runs/{run}")).await;
            assert_eq!(status, 200, "{v}");
            if v["summary"]["state"] == state {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "run {run} never became {state}: {v}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Read `run`'s SSE stream until its `end` event: every event's JSON, and whether `end`
    /// came.
    async fn stream(&self, run: &str) -> (Vec<Value>, bool) {
        stream(
            self.http.clone(),
            self.url(&format!("/runs/{run}/events/stream")),
        )
        .await
    }
}

/// Read an SSE stream of events until its `end` event: every event's JSON, and whether `end`
/// came.
async fn stream(http: reqwest::Client, url: String) -> (Vec<Value>, bool) {
    let mut resp = http
        .get(url)
        .header("authorization", format!("Bearer {OPERATOR_TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let mut text = String::new();
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        while let Some(at) = text.find("\n\n") {
            let block: String = text.drain(..at + 2).collect();
            let mut name = "message";
            let mut data = String::new();
            for line in block.lines() {
                if let Some(n) = line.strip_prefix("event:") {
                    name = if n.trim() == "end" { "end" } else { "other" };
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push_str(d.trim_start());
                }
            }
            match name {
                "end" => return (events, true),
                "message" if !data.is_empty() => {
                    events.push(serde_json::from_str(&data).unwrap());
                }
                _ => {}
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, resp.chunk()).await {
            Ok(Ok(Some(c))) => text.push_str(&String::from_utf8_lossy(&c)),
            _ => return (events, false),
        }
    }
}

fn types(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["type"].as_str().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_only_unauthenticated_401_agents_403() {
    let api = Api::start(true).await;
    for (method, path) in [
        ("GET", "/runs"),
        ("POST", "/runs"),
        ("GET", "/approvals"),
        ("POST", "/approvals/r:1/approve"),
        ("GET", "/memories"),
        ("POST", "/verify"),
        ("POST", "/checkpoints"),
        ("GET", "/runs/nope/events/stream"),
    ] {
        let (status, v) = api.call(method, path, None, Some(json!({}))).await;
        assert_eq!(status, 401, "{method} {path} without a token: {v}");
        assert_eq!(v["error"]["code"], "unauthenticated");
        let (status, _) = api
            .call(method, path, Some("not-a-known-token"), Some(json!({})))
            .await;
        assert_eq!(status, 401, "{method} {path} with an unknown token");
        let (status, v) = api
            .call(method, path, Some(AGENT_TOKEN), Some(json!({})))
            .await;
        assert_eq!(status, 403, "{method} {path} with an agent's token: {v}");
        assert_eq!(v["error"]["code"], "forbidden");
        assert!(v["error"]["message"].as_str().unwrap().contains("agent"));
    }
    // The scheme must be Bearer, and a 401 says how to authenticate.
    let resp = api
        .http
        .get(api.url("/runs"))
        .header("authorization", format!("Basic {OPERATOR_TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    assert!(
        resp.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );
    // Two Authorization headers: refused whichever comes first, even when both are the
    // operator's (which token counts would be anyone's guess).
    for pair in [
        [OPERATOR_TOKEN, AGENT_TOKEN],
        [AGENT_TOKEN, OPERATOR_TOKEN],
        [OPERATOR_TOKEN, OPERATOR_TOKEN],
        [OPERATOR_TOKEN, "not-a-known-token"],
    ] {
        let resp = api
            .http
            .get(api.url("/runs"))
            .header("authorization", format!("Bearer {}", pair[0]))
            .header("authorization", format!("Bearer {}", pair[1]))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 400, "{pair:?}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "duplicate_header", "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("2 Authorization headers"),
            "{v}"
        );
    }
    // The operator passes; the OpenAPI document is public.
    assert_eq!(api.get("/runs").await.0, 200);
    let (status, doc) = api.call("GET", "/openapi.json", None, None).await;
    assert_eq!(status, 200);
    assert_eq!(doc["openapi"], "3.1.0");

    // Without any operator token, everything is refused, saying how to add one.
    let closed = Api::start(false).await;
    let (status, v) = closed
        .call("GET", "/runs", Some(OPERATOR_TOKEN), None)
        .await;
    assert_eq!(status, 401);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ice token add --operator NAME"),
        "{v}"
    );
    assert_eq!(
        closed.call("GET", "/runs", Some(AGENT_TOKEN), None).await.0,
        401
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_started_streamed_approved_verified_and_proven() {
    let api = Api::start(true).await;
    let spec = api.spec("writer", "", WRITE_PLAN);
    let run = api.start_run(&spec).await;

    // Listed at once.
    let (status, v) = api.get("/runs").await;
    assert_eq!(status, 200);
    assert!(
        v["runs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["run_id"] == run.as_str()),
        "{v}"
    );
    assert_eq!(v["next_offset"], Value::Null);

    // Stream it while it waits for the operator.
    let streamed = tokio::spawn(stream(
        api.http.clone(),
        api.url(&format!("/runs/{run}/events/stream")),
    ));
    let approval = api.pending(&run).await;
    // An approval records no reason: one given is refused, not dropped unsaid (probe finding);
    // so is a denial's reason longer than the record carries.
    let (status, v) = api
        .post(
            &format!("/approvals/{approval}/approve"),
            json!({"reason": "fine"}),
        )
        .await;
    assert_eq!(status, 400, "{v}");
    assert!(v.to_string().contains("records no reason"), "{v}");
    let (status, v) = api
        .post(
            &format!("/approvals/{approval}/deny"),
            json!({"reason": "N".repeat(4097)}),
        )
        .await;
    assert_eq!(status, 400, "{v}");
    assert!(v.to_string().contains("at most 4096 bytes"), "{v}");
    let (status, v) = api
        .post(
            &format!("/approvals/{approval}/approve"),
            json!({"reason": ""}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["operator"], "operator:alice");
    // Answered once only.
    let (status, v) = api
        .post(&format!("/approvals/{approval}/approve"), json!({}))
        .await;
    assert_eq!(status, 409, "{v}");

    let (events, ended) = tokio::time::timeout(Duration::from_secs(60), streamed)
        .await
        .unwrap()
        .unwrap();
    assert!(
        ended,
        "the stream ends after RunTerminated: {:?}",
        types(&events)
    );
    let t = types(&events);
    assert_eq!(t.first(), Some(&"RunProvisioned"));
    // Who started the run is recorded with it.
    assert_eq!(events[0]["payload"]["started_by"], "operator:alice");
    assert_eq!(t.last(), Some(&"RunTerminated"));
    assert!(t.contains(&"RunCommitted"), "{t:?}");
    let granted = events
        .iter()
        .find(|e| e["type"] == "ApprovalGranted")
        .expect("the approval is recorded");
    assert_eq!(granted["origin"], "operator:alice");
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["run_seq"], i as u64, "in order, none missing");
    }

    // The run: summary, books, the applied write.
    let v = api.state(&run, "TERMINATED").await;
    assert_eq!(v["driver"], "plan");
    assert_eq!(v["books"]["state"], "TERMINATED");
    assert_eq!(v["changes"][0]["path"], "notes.txt");
    assert_eq!(v["changes"][0]["status"], "applied");
    assert_eq!(
        std::fs::read_to_string(api.dir.path().join("workspace/notes.txt")).unwrap(),
        "noted\n"
    );

    // Events: paged, and one by id.
    let (status, page) = api.get(&format!("/runs/{run}/events?from=2&limit=3")).await;
    assert_eq!(status, 200);
    assert_eq!(page["events"].as_array().unwrap().len(), 3);
    assert_eq!(page["events"][0]["run_seq"], 2);
    assert_eq!(page["next"], 5);
    let read = events.iter().find(|e| e["type"] == "FileRead").unwrap();
    let read_id = format!("{run}:{}", read["run_seq"]);
    let (status, one) = api.get(&format!("/events/{read_id}")).await;
    assert_eq!(status, 200);
    assert_eq!(one["hash"], read["hash"]);
    assert!(one["log_seq"].is_u64());

    // A replayed stream of a terminated run ends by itself, also from past its end.
    let (again, ended) = api.stream(&run).await;
    assert!(ended);
    assert_eq!(again.len(), events.len());
    let (none, ended) = {
        let resp = api
            .http
            .get(api.url(&format!("/runs/{run}/events/stream?from=1000")))
            .header("authorization", format!("Bearer {OPERATOR_TOKEN}"))
            .send()
            .await
            .unwrap();
        let text = tokio::time::timeout(Duration::from_secs(10), resp.text())
            .await
            .unwrap()
            .unwrap();
        (text.matches("data:").count(), text.contains("event: end"))
    };
    assert_eq!((none, ended), (1, true));

    // Verify, checkpoint, proofs.
    let (status, report) = api.post("/verify", json!({})).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["ok"], true, "{report}");
    let (status, report) = api.get("/verify?deep=true").await;
    assert_eq!((status, &report["ok"]), (200, &json!(true)));
    assert!(report["checkpoints_verified"].as_u64().unwrap() >= 1);
    // Options sent in a body the route does not read are refused, not silently ignored.
    let (status, refused) = api.post("/verify", json!({"deep": true})).await;
    assert_eq!(status, 400, "{refused}");
    assert!(
        refused["error"]["message"].as_str().unwrap().contains(
            "/verify takes no fields in a request body (its option is the query's: ?deep=true)"
        ),
        "{refused}"
    );
    let (status, refused) = api.post("/checkpoints", json!({"x": 1})).await;
    assert_eq!(status, 400, "{refused}");
    let (status, first) = api
        .call("POST", "/checkpoints", Some(OPERATOR_TOKEN), None)
        .await;
    assert_eq!(status, 201, "{first}");
    let (status, latest) = api.get("/checkpoints/latest").await;
    assert_eq!(status, 200);
    assert_eq!(latest["size"], first["size"]);
    let (status, proof) = api.get(&format!("/proofs/inclusion/{read_id}")).await;
    assert_eq!(status, 200, "{proof}");
    let parsed = ProofFile::parse(proof.to_string().as_bytes()).unwrap();
    let verdict = parsed
        .verify(&api.verifier)
        .expect("the proof checks offline");
    assert_eq!(verdict.tree_size, first["size"].as_u64().unwrap());

    // Memory: promote the read, list, show, deprecate once.
    let (status, promoted) = api
        .post(
            "/memories",
            json!({"event": read_id, "kind": "file", "scope": "project", "reason": "worth keeping", "ttl_ms": 86_400_000}),
        )
        .await;
    assert_eq!(status, 201, "{promoted}");
    let memory = promoted["memory"].as_str().unwrap().to_string();
    // The same event, kind and scope again: it is already that active memory, a conflict.
    let (status, v) = api
        .post(
            "/memories",
            json!({"event": read_id, "kind": "file", "scope": "project", "reason": "again"}),
        )
        .await;
    assert_eq!(
        (status, &v["error"]["code"]),
        (409, &json!("conflict")),
        "{v}"
    );
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("already active memory") && message.contains(&memory),
        "{v}"
    );
    let (status, list) = api.get("/memories").await;
    assert_eq!(status, 200);
    assert_eq!(list["memories"][0]["id"], memory.as_str());
    let (status, shown) = api.get(&format!("/memories/{memory}")).await;
    assert_eq!(status, 200);
    assert_eq!(shown["promoted_by"], "operator:alice");
    assert!(shown["content"].is_object());
    let (status, v) = api
        .post(
            &format!("/memories/{memory}/deprecate"),
            json!({"reason": "outdated"}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "deprecated");
    let (status, v) = api
        .post(
            &format!("/memories/{memory}/deprecate"),
            json!({"reason": "again"}),
        )
        .await;
    assert_eq!(status, 409, "a memory leaves active once: {v}");
    // Found wrong after it was deprecated: invalidated, once, the deprecation kept.
    let (status, v) = api
        .post(
            &format!("/memories/{memory}/invalidate"),
            json!({"reason": "wrong"}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "invalidated");
    let (status, v) = api
        .post(
            &format!("/memories/{memory}/invalidate"),
            json!({"reason": "wrong again"}),
        )
        .await;
    assert_eq!(status, 409, "a memory is invalidated once: {v}");
    let (_, list) = api.get("/memories?all=true").await;
    assert_eq!(list["memories"][0]["status"], "invalidated");
    assert_eq!(list["memories"][0]["earlier"]["status"], "deprecated");
    assert_eq!(list["memories"][0]["earlier"]["reason"], "outdated");

    // A consistency proof between two checkpoints (the promotion signed a later one).
    let (_, cps) = api.get("/checkpoints").await;
    let sizes: Vec<u64> = cps["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["size"].as_u64().unwrap())
        .collect();
    let from = *sizes.iter().find(|s| **s > 0).unwrap();
    let (status, proof) = api.get(&format!("/proofs/consistency?from={from}")).await;
    assert_eq!(status, 200, "{proof}");
    ProofFile::parse(proof.to_string().as_bytes())
        .unwrap()
        .verify(&api.verifier)
        .expect("the consistency proof checks offline");

    // Everything the API did is in the log, and the log verifies.
    let (_, report) = api.get("/verify").await;
    assert_eq!(report["ok"], true, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_sees_the_whole_of_a_large_request_before_approving_it() {
    let api = Api::start(true).await;
    // Arguments over the blob threshold: the request shows them as a reference.
    let content: String = (0..2000).map(|i| format!("line {i:05}\n")).collect();
    let plan = WRITE_PLAN.replace(
        "arguments = { content = \"noted\\n\" }",
        &format!(
            "arguments = {{ content = {} }}",
            serde_json::to_string(&content).unwrap()
        ),
    );
    assert_ne!(plan, WRITE_PLAN);
    let run = api.start_run(&api.spec("large", "", &plan)).await;
    let approval = api.pending(&run).await;
    let (status, v) = api.get(&format!("/events/{approval}")).await;
    assert_eq!(status, 200, "{v}");
    let request: ice_kernel::EventId = v["payload"]["request"].as_str().unwrap().parse().unwrap();
    let (_, req) = api.get(&format!("/events/{request}")).await;
    let reference = &req["payload"]["arguments"];
    let digest = reference["$blob"]
        .as_str()
        .unwrap_or_else(|| panic!("{req}"));
    let (status, blob) = api.get(&format!("/blobs/{digest}")).await;
    assert_eq!(status, 200, "{blob}");
    assert_eq!(blob["digest"], digest);
    assert_eq!(blob["size"], reference["size"]);
    assert_eq!(blob["value"]["content"], content.as_str());
    // Bad and unknown digests.
    let (status, v) = api.get("/blobs/not-a-digest").await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("invalid_id")),
        "{v}"
    );
    let (status, _) = api.get(&format!("/blobs/{}", "0".repeat(64))).await;
    assert_eq!(status, 404);
    // Only operators read blobs.
    let (status, _) = api
        .call("GET", &format!("/blobs/{digest}"), None, None)
        .await;
    assert_eq!(status, 401);
    let (status, v) = api
        .post(
            &format!("/approvals/{approval}/deny"),
            json!({"reason": "too big"}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_kill_and_reconfigure_are_the_operators() {
    let api = Api::start(true).await;

    // Deny: the write is refused, the run goes on and commits without it.
    let spec = api.spec("denied", "", WRITE_PLAN);
    let run = api.start_run(&spec).await;
    let approval = api.pending(&run).await;
    let (status, v) = api
        .post(
            &format!("/approvals/{approval}/deny"),
            json!({"reason": "not today"}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["answer"], "denied");
    api.state(&run, "TERMINATED").await;
    let (_, page) = api.get(&format!("/runs/{run}/events?limit=1000")).await;
    let denied = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "ApprovalDenied")
        .unwrap();
    assert_eq!(denied["origin"], "operator:alice");
    assert!(!api.dir.path().join("workspace/notes.txt").exists());

    // Kill: a run the server drives (waiting for an approval) stops; nothing it staged lands.
    let run = api.start_run(&spec).await;
    api.pending(&run).await;
    // A stream asked to start past the live run's end sends nothing, and ends with the run.
    let past_end = tokio::spawn(tokio::time::timeout(
        Duration::from_secs(30),
        stream(
            api.http.clone(),
            api.url(&format!("/runs/{run}/events/stream?from=1000")),
        ),
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, v) = api
        .post(&format!("/runs/{run}/kill"), json!({"reason": "enough"}))
        .await;
    assert_eq!(status, 202, "{v}");
    let (sent, ended) = past_end
        .await
        .unwrap()
        .expect("the stream past the run's end ends when the run does");
    assert_eq!((sent.len(), ended), (0, true));
    let v = api.state(&run, "TERMINATED").await;
    assert!(v["kill"]["by"].as_str().unwrap().contains("alice"), "{v}");
    // The approval the kill closed unanswered is shown closed, naming the denial that closed
    // it, not pending (found by a probe).
    // The window's elapsed time (what a wall_time budget is spent by) is in the view: the run
    // waited at least the 300 ms above, though no call recorded any time (found by a probe:
    // the page's meter showed the calls' time, 0).
    assert!(
        v["window_elapsed_us"]
            .as_u64()
            .is_some_and(|us| us >= 300_000),
        "{v:#}"
    );
    // The runs list gives the same closed window (its meters showed the calls' time too).
    let (_, list) = api.get("/runs?limit=1000").await;
    let listed = list["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["run_id"] == run.as_str())
        .unwrap_or_else(|| panic!("{list:#}"));
    assert_eq!(
        listed["window_elapsed_us"], v["window_elapsed_us"],
        "{listed:#}"
    );
    assert!(listed["window"]["closed_at"].is_string(), "{listed:#}");
    let approvals = v["books"]["approvals"].as_array().unwrap();
    assert_eq!(approvals.len(), 1, "{v:#}");
    assert_eq!(approvals[0]["status"], "closed", "{v:#}");
    assert!(approvals[0]["closed_by"].is_string(), "{v:#}");
    assert!(approvals[0]["reason"].is_string(), "{v:#}");
    let (_, page) = api.get(&format!("/runs/{run}/events?limit=1000")).await;
    let t: Vec<&str> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert!(
        t.contains(&"RunKillRequested") && t.contains(&"RunAborted"),
        "{t:?}"
    );
    let kill = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "RunKillRequested")
        .unwrap();
    assert_eq!(kill["origin"], "operator:alice");
    // A terminated run cannot be killed again (abandoning a commit or not), nor reconfigured;
    // a body with a field the operation does not take is refused before anything is done.
    let (status, v) = api.post(&format!("/runs/{run}/kill"), json!({})).await;
    assert_eq!(status, 409, "{v}");
    let (status, v) = api
        .post(
            &format!("/runs/{run}/kill"),
            json!({"reason": "again", "abandon_commit": true}),
        )
        .await;
    assert_eq!(status, 409, "{v}");
    let (status, v) = api
        .post(&format!("/runs/{run}/kill"), json!({"abandon": true}))
        .await;
    assert_eq!(status, 400, "{v}");
    assert!(v.to_string().contains("abandon"), "{v}");
    let (status, v) = api
        .post(&format!("/runs/{run}/reconfigure"), json!({"reason": "x"}))
        .await;
    assert_eq!(status, 409, "{v}");

    // Reconfigure: a run suspended by its budget gets a larger one and resumes on the server.
    let spec = api.spec(
        "reader",
        "[budget]\ntool_calls = 1\non_exhaustion = \"suspend\"",
        READS_PLAN,
    );
    let run = api.start_run(&spec).await;
    api.state(&run, "SUSPENDED").await;
    let (status, v) = api
        .post(
            &format!("/runs/{run}/reconfigure"),
            json!({"reason": "more calls are fine", "budget": {"tool_calls": 10}}),
        )
        .await;
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["resumed"], true);
    let (events, ended) = api.stream(&run).await;
    assert!(ended);
    let rec = events
        .iter()
        .find(|e| e["type"] == "ReconfigurationRecorded")
        .unwrap();
    assert_eq!(rec["origin"], "operator:alice");
    assert!(
        types(&events).contains(&"RunCommitted"),
        "{:?}",
        types(&events)
    );
}

/// Runs are listed oldest or newest first, with how many there are, and paged either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_are_listed_in_either_order_with_their_total() {
    let api = Api::start(true).await;
    let mut started = Vec::new();
    for name in ["first", "second", "third"] {
        let spec = api.spec(name, "", READS_PLAN);
        let run = api.start_run(&spec).await;
        api.state(&run, "TERMINATED").await;
        started.push(run);
    }
    let ids = |v: &Value| -> Vec<String> {
        v["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["run_id"].as_str().unwrap().to_string())
            .collect()
    };
    let (status, v) = api.get("/runs").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(ids(&v), started);
    assert_eq!(v["total"], 3);
    let (_, v) = api.get("/runs?order=oldest&limit=2").await;
    assert_eq!(ids(&v), started[..2]);
    let newest: Vec<String> = started.iter().rev().cloned().collect();
    let (_, v) = api.get("/runs?order=newest").await;
    assert_eq!(ids(&v), newest);
    assert_eq!(v["total"], 3);
    assert_eq!(v["next_offset"], Value::Null);
    let (_, v) = api.get("/runs?order=newest&limit=1").await;
    assert_eq!(ids(&v), newest[..1]);
    assert_eq!(v["next_offset"], 1);
    let (_, v) = api.get("/runs?order=newest&offset=1&limit=5").await;
    assert_eq!(ids(&v), newest[1..]);
    let (status, v) = api.get("/runs?order=sideways").await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("oldest or newest"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_4xx_answers() {
    let api = Api::start(true).await;
    let spec = api.spec("reads", "", READS_PLAN);
    let run = api.start_run(&spec).await;
    api.state(&run, "TERMINATED").await;

    let code = |v: &Value| v["error"]["code"].as_str().unwrap_or("").to_string();
    // Malformed JSON, JSON of the wrong shape, a missing body, a body not declared JSON.
    // A start request with `body` as it is (not re-encoded): its status and answer.
    let raw_start = |body: &'static str| {
        let req = api
            .http
            .post(api.url("/runs"))
            .header("authorization", format!("Bearer {OPERATOR_TOKEN}"))
            .header("content-type", "application/json")
            .body(body);
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let v: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
            (status, v)
        }
    };
    let (status, v) = raw_start("{\"spec\": ").await;
    assert_eq!(status, 400);
    assert_eq!(code(&v), "malformed_json");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );
    // A field given twice is refused, naming it (found by a probe: the last one was taken).
    let (status, v) = raw_start("{\"spec\": \"a.toml\", \"spec\": \"b.toml\"}").await;
    assert_eq!(status, 400);
    assert_eq!(code(&v), "invalid_body", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("duplicate field `spec`")),
        "{v}"
    );
    let (status, v) = api.post("/runs", json!({"spec": 7})).await;
    assert_eq!((status, code(&v)), (400, "invalid_body".into()), "{v}");
    let (status, v) = api.post("/runs", json!({"spek": "x"})).await;
    assert_eq!((status, code(&v)), (400, "invalid_body".into()), "{v}");
    let (status, v) = api.post("/runs", json!([1])).await;
    assert_eq!((status, code(&v)), (400, "invalid_body".into()), "{v}");
    let (status, v) = api.call("POST", "/runs", Some(OPERATOR_TOKEN), None).await;
    assert_eq!((status, code(&v)), (400, "missing_body".into()), "{v}");
    let resp = api
        .http
        .post(api.url(&format!("/runs/{run}/kill")))
        .header("authorization", format!("Bearer {OPERATOR_TOKEN}"))
        .header("content-type", "text/plain")
        .body("{\"reason\": \"x\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 415);

    // Oversized bodies: declared, and streamed without a length.
    let big = json!({"reason": "x".repeat(2 << 20)});
    let (status, v) = api.post(&format!("/runs/{run}/kill"), big).await;
    assert_eq!((status, code(&v)), (413, "payload_too_large".into()), "{v}");
    let addr = api.base.trim_start_matches("http://").to_string();
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /api/v1/runs HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {OPERATOR_TOKEN}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b' '; 256 * 1024];
    for _ in 0..6 {
        let mut c = format!("{:x}\r\n", chunk.len()).into_bytes();
        c.extend_from_slice(&chunk);
        c.extend_from_slice(b"\r\n");
        if tcp.write_all(&c).await.is_err() {
            break; // the server answered and closed
        }
    }
    let _ = tcp.write_all(b"0\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("payload_too_large"), "{answer}");

    // Unknown ids: 404; ids that are not ids: 400.
    for path in [
        "/runs/no-such-run".to_string(),
        "/runs/no-such-run/events".into(),
        "/runs/no-such-run/events/stream".into(),
        "/events/no-such-run:0".into(),
        format!("/events/{run}:9999"),
        "/memories/no-such-run:3".into(),
        format!("/proofs/inclusion/{run}:9999"),
        "/approvals?run=no-such-run".into(),
        "/proofs/consistency?from=123456".into(),
    ] {
        let (status, v) = api.get(&path).await;
        assert_eq!((status, code(&v)), (404, "not_found".into()), "{path}: {v}");
    }
    for (path, body) in [
        ("/runs/no-such-run/kill", json!({})),
        ("/runs/no-such-run/reconfigure", json!({"reason": "x"})),
        ("/approvals/no-such-run:4/approve", json!({})),
        ("/memories/no-such-run:4/deprecate", json!({"reason": "x"})),
        (
            "/memories",
            json!({"event": "no-such-run:4", "kind": "k", "scope": "s", "reason": "r"}),
        ),
    ] {
        let (status, v) = api.post(path, body).await;
        assert_eq!((status, code(&v)), (404, "not_found".into()), "{path}: {v}");
    }
    // An existing run's event that is not an approval request.
    let (status, v) = api
        .post(&format!("/approvals/{run}:0/deny"), json!({}))
        .await;
    assert_eq!(status, 404, "{v}");
    for path in [
        "/events/no-colon",
        "/events/r:01",
        "/runs/bad%20id",
        "/proofs/inclusion/x:y",
        "/runs?limit=0",
        "/runs?limit=many",
        "/runs?unknown=1",
        "/verify?deep=maybe",
        "/proofs/consistency",
        "/memories?all=1",
    ] {
        let (status, v) = api.get(path).await;
        assert_eq!(status, 400, "{path}: {v}");
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
    }
    // A spec file that is not there, and one that is not a run spec.
    let (status, v) = api
        .post("/runs", json!({"spec": "/no/such/spec.toml"}))
        .await;
    assert_eq!((status, code(&v)), (404, "not_found".into()), "{v}");
    let junk = api.dir.path().join("junk.toml");
    std::fs::write(&junk, "this is = not [a spec").unwrap();
    let (status, v) = api.post("/runs", json!({"spec": junk})).await;
    assert_eq!((status, code(&v)), (400, "invalid_spec".into()), "{v}");
    // The same run id twice.
    let fixed = api.spec("fixed", "", READS_PLAN);
    let text = std::fs::read_to_string(&fixed).unwrap();
    std::fs::write(
        &fixed,
        text.replace("[run]\n", "[run]\nid = \"fixed-id\"\n"),
    )
    .unwrap();
    api.start_run(&fixed).await;
    let (status, v) = api.post("/runs", json!({"spec": fixed})).await;
    assert_eq!((status, code(&v)), (409, "conflict".into()), "{v}");
    // Memory input the runtime refuses, and a promotion from a non-DOMAIN event.
    let (status, v) = api
        .post(
            "/memories",
            json!({"event": format!("{run}:0"), "kind": "no spaces", "scope": "s", "reason": "r"}),
        )
        .await;
    assert_eq!(status, 400, "{v}");
    let (status, v) = api
        .post(
            "/memories",
            json!({"event": format!("{run}:0"), "kind": "k", "scope": "s", "reason": "r"}),
        )
        .await;
    assert_eq!(status, 409, "{v}");
    // Unknown endpoints and methods.
    let (status, v) = api.get("/nothing/here").await;
    assert_eq!((status, code(&v)), (404, "not_found".into()), "{v}");
    let (status, v) = api
        .call("DELETE", "/runs", Some(OPERATOR_TOKEN), None)
        .await;
    assert_eq!(
        (status, code(&v)),
        (405, "method_not_allowed".into()),
        "{v}"
    );
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("DELETE is not allowed on /api/v1/runs") && message.contains("GET, POST"),
        "{v}"
    );
    let (status, v) = api
        .call("PUT", "/memories/r:1/deprecate", Some(OPERATOR_TOKEN), None)
        .await;
    assert_eq!(
        (status, code(&v)),
        (405, "method_not_allowed".into()),
        "{v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("takes POST"),
        "{v}"
    );

    // Nothing above broke the server or the log.
    let (_, report) = api.get("/verify").await;
    assert_eq!(report["ok"], true, "{report}");
}

/// A 400 `bad_request` whose message names the body's field `field` (as `` `ttl_ms` ``) and
/// none of the CLI's flags: the runtime's refusals speak of what the API's caller sent.
fn refused_naming(status: u16, v: &Value, field: &str) {
    assert_eq!(status, 400, "{field}: {v}");
    assert_eq!(v["error"]["code"], "bad_request", "{field}: {v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("`{field}`")),
        "names `{field}`: {v}"
    );
    for flag in [
        "--ttl",
        "--reason",
        "--by",
        "--kind",
        "--scope",
        "--confidence",
    ] {
        assert!(!message.contains(flag), "names the CLI's {flag}: {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_refusals_name_the_body_fields_not_cli_flags() {
    let api = Api::start(true).await;
    let spec = api.spec("reads", "", READS_PLAN);
    let run = api.start_run(&spec).await;
    api.state(&run, "TERMINATED").await;
    let (status, page) = api.get(&format!("/runs/{run}/events")).await;
    assert_eq!(status, 200, "{page}");
    let reads: Vec<String> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "FileRead")
        .map(|e| format!("{run}:{}", e["run_seq"]))
        .collect();
    assert_eq!(reads.len(), 3, "{page}");
    let promotion = |changes: Value| {
        let mut body =
            json!({"event": reads[0], "kind": "file", "scope": "project", "reason": "r"});
        for (k, v) in changes.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };

    // Promotions the runtime refuses before reading the log: each names its field.
    for (changes, field) in [
        (json!({"ttl_ms": 0}), "ttl_ms"),
        (json!({"ttl_ms": 36_500_u64 * 86_400_000 + 1}), "ttl_ms"),
        (json!({"reason": ""}), "reason"),
        (json!({"reason": "  "}), "reason"),
        (json!({"kind": "no spaces"}), "kind"),
        (json!({"scope": ""}), "scope"),
        (json!({"confidence": 2.0}), "confidence"),
    ] {
        let (status, v) = api.post("/memories", promotion(changes)).await;
        refused_naming(status, &v, field);
    }
    let (_, list) = api.get("/memories?all=true").await;
    assert_eq!(list["memories"], json!([]), "a refusal writes nothing");

    // Transitions: an empty reason, and a `by` that is not active (deprecated, or expired).
    let mut ids = Vec::new();
    for (read, scope, ttl) in [
        (&reads[0], "a", None),
        (&reads[1], "b", None),
        (&reads[2], "c", Some(1)),
    ] {
        let (status, v) = api
            .post(
                "/memories",
                json!({"event": read, "kind": "file", "scope": scope, "reason": "kept", "ttl_ms": ttl}),
            )
            .await;
        assert_eq!(status, 201, "{v}");
        ids.push(v["memory"].as_str().unwrap().to_string());
    }
    let (a, b, c) = (&ids[0], &ids[1], &ids[2]);
    for (action, body) in [
        ("deprecate", json!({"reason": ""})),
        ("invalidate", json!({"reason": " "})),
        ("supersede", json!({"reason": "", "by": b})),
    ] {
        let (status, v) = api.post(&format!("/memories/{a}/{action}"), body).await;
        refused_naming(status, &v, "reason");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.starts_with(action), "{v}");
    }
    // C is past its expiry, not yet recorded: refused as expired.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (status, v) = api
        .post(
            &format!("/memories/{a}/supersede"),
            json!({"reason": "newer", "by": c}),
        )
        .await;
    refused_naming(status, &v, "by");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired at"),
        "{v}"
    );
    // B deprecated (which records C's expiry): both are refused as having left active.
    let (status, v) = api
        .post(
            &format!("/memories/{b}/deprecate"),
            json!({"reason": "old"}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    for (by, status_now) in [(b, "is deprecated"), (c, "is expired")] {
        let (status, v) = api
            .post(
                &format!("/memories/{a}/supersede"),
                json!({"reason": "newer", "by": by}),
            )
            .await;
        refused_naming(status, &v, "by");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(status_now),
            "{v}"
        );
    }
    // A stays active through all of it.
    let (_, shown) = api.get(&format!("/memories/{a}")).await;
    assert_eq!(shown["status"], "active", "{shown}");
    let (_, report) = api.get("/verify").await;
    assert_eq!(report["ok"], true, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reads_the_log_as_of_the_request_while_runs_append() {
    let api = Api::start(true).await;
    let plan = READS_PLAN.replace("repeat = 3", "repeat = 300");
    let spec = api.spec("busy", "", &plan);
    let run = api.start_run(&spec).await;
    let mut verified = 0;
    loop {
        let (status, report) = api.post("/verify", json!({})).await;
        assert_eq!(status, 200);
        assert_eq!(
            report["ok"], true,
            "after {verified} verifications: {report}"
        );
        verified += 1;
        let (_, v) = api.get(&format!("/runs/{run}")).await;
        if v["summary"]["state"] == "TERMINATED" {
            break;
        }
    }
    let (_, report) = api.get("/verify").await;
    assert_eq!(report["ok"], true, "{report}");
    assert!(report["events"].as_u64().unwrap() > 1500, "{report}");
    assert!(verified > 1, "verified only once while the run appended");
}

/// Every route the router serves is in docs/openapi.json, and every operation there is served.
#[test]
fn the_router_and_the_openapi_document_agree() {
    let doc: Value = serde_json::from_str(ice_api::OPENAPI).expect("docs/openapi.json is JSON");
    assert_eq!(doc["openapi"], "3.1.0");
    let mut documented: Vec<(String, String)> = Vec::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            documented.push((method.to_uppercase(), path.clone()));
        }
    }
    let mut served = ice_api::routes();
    documented.sort();
    served.sort();
    assert_eq!(served, documented);
    // Each operation has an id and documents its success and the errors every call can get.
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            assert!(op["operationId"].is_string(), "{method} {path}");
            let responses = op["responses"].as_object().unwrap();
            assert!(
                responses.keys().any(|k| k.starts_with('2')),
                "{method} {path}"
            );
            if op.get("security") != Some(&json!([])) {
                for code in ["400", "401", "403"] {
                    assert!(responses.contains_key(code), "{method} {path} {code}");
                }
            }
        }
    }
}

/// Revoking an operator's token ends the live streams it opened, not only its next requests.
#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_operators_open_stream_ends() {
    let api = Api::start(true).await;
    let spec = api.spec("waiter", "", WRITE_PLAN);
    let run = api.start_run(&spec).await;
    api.pending(&run).await;
    let mut resp = api
        .http
        .get(api.url(&format!("/runs/{run}/events/stream")))
        .header("authorization", format!("Bearer {OPERATOR_TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut text = String::new();
    // The events so far arrive; then the token is revoked while the run still waits.
    while !text.contains("ApprovalRequested") {
        let chunk = tokio::time::timeout(Duration::from_secs(30), resp.chunk())
            .await
            .expect("events arrive")
            .unwrap()
            .expect("the stream is open");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    api.credentials.replace(Credentials::new());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, resp.chunk()).await {
            Ok(Ok(Some(c))) => text.push_str(&String::from_utf8_lossy(&c)),
            Ok(_) => break,
            Err(_) => panic!("the stream of a revoked token stayed open:\n{text}"),
        }
    }
    assert!(
        text.contains("event: error") && text.contains("this stream ends"),
        "{text}"
    );
}

/// A run whose record holds a second answer to one approval (logs written before answers were
/// checked can: the chain verifies) answers `GET /runs/RUN` with a 409 naming the refused
/// event, and does not keep another run's approval from being listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_with_a_second_recorded_answer_is_named_and_others_are_listed() {
    use ice_authority::payload::ApprovalDeniedPayload;
    use ice_kernel::{CapabilityProposal, Draft, EventType, Outcome, Proposal};
    let api = Api::start(true).await;
    let spec = RunSpec::load(&api.spec("damaged", "", WRITE_PLAN)).unwrap();
    let session = api
        .rt
        .open_session(spec, "coder", &ice_runtime::Quiet)
        .await
        .unwrap();
    let damaged = session.run().clone();
    let write = Proposal::Request(CapabilityProposal {
        capability: "fs.write".into(),
        target: "notes.txt".into(),
        arguments: json!({"content": "noted\n"}),
        intent: "write notes".into(),
    });
    let (outcome, approval) = tokio::join!(session.propose(&write), async {
        let approval = api.pending(damaged.as_str()).await;
        let (status, v) = api
            .post(&format!("/approvals/{approval}/approve"), json!({}))
            .await;
        assert_eq!(status, 200, "{v}");
        approval
    });
    assert!(matches!(outcome.unwrap(), Some(Outcome::Done { .. })));
    // A second answer, past the runtime: the ledger takes it (the law does not read payloads).
    let approval: ice_kernel::EventId = approval.parse().unwrap();
    let draft = Draft::new(
        EventType::ApprovalDenied.name(),
        "operator:mallory".parse().unwrap(),
    )
    .payload(Value::Object(
        ApprovalDeniedPayload {
            approval: approval.clone(),
            reason: "changed my mind".into(),
        }
        .to_payload(),
    ))
    .cause(approval.clone());
    let (_, batch) = api.rt.ledger().append(&damaged, vec![draft]).await.unwrap();
    let forged = batch.events()[0].event().id().to_string();

    // Another run waits for an operator: listed, the damaged run left out.
    let run = api.start_run(&api.spec("healthy", "", WRITE_PLAN)).await;
    let waiting = api.pending(&run).await;
    let (status, v) = api.get("/approvals").await;
    assert_eq!(status, 200, "{v}");
    let ids: Vec<&str> = v["approvals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [waiting.as_str()], "{v}");
    // ... and named, with the event its fold refuses.
    let problems = v["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{v}");
    assert_eq!(problems[0]["run"], damaged.to_string(), "{v}");
    assert_eq!(problems[0]["event"], forged.as_str(), "{v}");
    assert!(
        problems[0]["problem"]
            .as_str()
            .unwrap()
            .contains("already answered"),
        "{v}"
    );
    // The damaged run itself: a 409 that names the refused event.
    for path in [
        format!("/runs/{damaged}"),
        format!("/approvals?run={damaged}"),
    ] {
        let (status, v) = api.get(&path).await;
        assert_eq!(status, 409, "{path}: {v}");
        assert_eq!(v["error"]["code"], "conflict", "{v}");
        let m = v["error"]["message"].as_str().unwrap();
        assert!(m.contains(&forged) && m.contains("already answered"), "{m}");
    }
    let (status, v) = api
        .post(&format!("/approvals/{waiting}/deny"), json!({}))
        .await;
    assert_eq!(status, 200, "{v}");
    drop(session);
}
