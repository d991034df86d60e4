//! HTTP calls are decided on exactly what is sent: a policy on `context.arguments.url` or `path`
//! sees the URL as parsed (dot segments resolved), the server receives that same URL, and
//! `scheme`, `host`, `port`, `path` and `query` are filled from it as the schema declares them.
//! An IPv4-mapped IPv6 address is the IPv4 host it stands for.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::sync::{Arc, Mutex};

use common::*;
use ice_kernel::{CapabilityProposal, EventType, Outcome, Proposal};
use serde_json::json;

/// A local HTTP server that records each request line's target and answers 200 `ok`.
fn endpoint() -> (u16, Arc<Mutex<Vec<String>>>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    std::thread::spawn(move || {
        for stream in l.incoming() {
            let Ok(mut stream) = stream else { continue };
            let s = s.clone();
            std::thread::spawn(move || {
                // A TLS client hello has no line end: do not hold it for the client's timeout.
                let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(1)));
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                let _ = reader.read_line(&mut line);
                // Read the headers up to the blank line (GETs carry no body).
                loop {
                    let mut header = String::new();
                    match reader.read_line(&mut header) {
                        Ok(0) | Err(_) => break,
                        Ok(_) if header.trim_end().is_empty() => break,
                        Ok(_) => {}
                    }
                }
                if let Some(target) = line.split_whitespace().nth(1) {
                    s.lock().unwrap().push(target.to_string());
                }
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                );
            });
        }
    });
    (port, seen)
}

fn get(url: &str) -> Proposal {
    Proposal::Request(CapabilityProposal {
        capability: "http.request".into(),
        target: url.to_string(),
        arguments: json!({"method": "GET"}),
        intent: "fetch".into(),
    })
}

/// Open a session of agent `fetcher` under `policy`, make each proposal, finish; the outcomes
/// and the run's events.
async fn calls(
    id: &str,
    policy: &str,
    proposals: &[Proposal],
) -> (Vec<Outcome>, Vec<ice_kernel::Event>) {
    let h = H::new(policy);
    let (spec, _) = h.spec(id, "fetcher", "", "");
    let session =
        h.rt.open_session(spec, "fetcher", &ice_runtime::Quiet)
            .await
            .unwrap();
    let mut outcomes = Vec::new();
    for p in proposals {
        outcomes.push(session.propose(p).await.unwrap().expect("an outcome"));
    }
    session.finish().await.unwrap();
    let events = h.events(id).await;
    (outcomes, events)
}

fn denied_by(o: &Outcome) -> Option<(&str, &str)> {
    match o {
        Outcome::Denied { reason, detail, .. } => Some((reason.as_str(), detail.as_str())),
        Outcome::Done { .. } => None,
    }
}

/// The finding: `permit … when { context.arguments.url like "…/repos/me/*" }` used to match the
/// agent's text `…/repos/me/../../admin`, and the server received `GET /admin`. The policy now
/// sees `…/admin` and denies it; nothing reaches the server but the permitted path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_cannot_walk_out_of_a_url_policy() {
    let (port, seen) = endpoint();
    let base = format!("http://127.0.0.1:{port}");
    let policy = format!(
        r#"
@id("my-repos")
permit(principal == Agent::"fetcher", action == Action::"http.request", resource == Host::"127.0.0.1")
when {{ context.arguments has url && context.arguments.url like "{base}/repos/me/*" }};
"#
    );
    let escapes = [
        format!("{base}/repos/me/../../admin"),
        format!("{base}/repos/me/%2e%2e/%2E%2E/admin"),
        format!("{base}/repos/me/.%2e/%2e./admin"),
        format!("{base}/repos/me\\..\\..\\admin"),
        format!("{base}/repos/me/x/../../../admin?as=/repos/me/y"),
    ];
    let mut proposals: Vec<Proposal> = escapes.iter().map(|u| get(u)).collect();
    proposals.push(get(&format!("{base}/repos/me/./a/../b")));
    let (outcomes, events) = calls("dots", &policy, &proposals).await;
    for (url, o) in escapes.iter().zip(&outcomes) {
        let (reason, _) = denied_by(o).unwrap_or_else(|| panic!("{url} was permitted: {o:?}"));
        assert_eq!(reason, "policy_denied", "{url}");
    }
    assert!(
        matches!(outcomes[5], Outcome::Done { .. }),
        "{:?}",
        outcomes[5]
    );
    // The server received only the permitted request, as the policy saw it.
    assert_eq!(*seen.lock().unwrap(), ["/repos/me/b"]);
    // The record shows both what was decided on and sent, and what the agent wrote.
    let executed = of_type(&events, EventType::APIRequestExecuted);
    assert_eq!(executed.len(), 1);
    assert_eq!(executed[0].payload["url"], format!("{base}/repos/me/b"));
    assert_eq!(
        executed[0].payload["target"],
        format!("{base}/repos/me/./a/../b")
    );
    assert_eq!(
        executed[0].payload["evidence"]["http"]["url"],
        format!("{base}/repos/me/b"),
        "{:?}",
        executed[0].payload
    );
    let denials = of_type(&events, EventType::CapabilityDenied);
    assert_eq!(denials.len(), 5);
}

/// `scheme`, `host`, `port`, `path` and `query` are filled as the schema declares them: a
/// permit on all of them permits, and the server gets exactly that path and query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_declared_http_argument_is_filled() {
    let (port, seen) = endpoint();
    let policy = format!(
        r#"
@id("exact")
permit(principal, action == Action::"http.request", resource == Host::"127.0.0.1")
when {{
  context.arguments has method && context.arguments.method == "GET" &&
  context.arguments has scheme && context.arguments.scheme == "http" &&
  context.arguments has host && context.arguments.host == "127.0.0.1" &&
  context.arguments has port && context.arguments.port == {port} &&
  context.arguments has path && context.arguments.path == "/v1/items" &&
  context.arguments has query && context.arguments.query == "page=2"
}};
"#
    );
    let (outcomes, _) = calls(
        "filled",
        &policy,
        &[
            get(&format!("HTTP://127.0.0.1:{port}/v1/x/../items?page=2#top")),
            get(&format!("http://127.0.0.1:{port}/v1/items?page=3")),
        ],
    )
    .await;
    assert!(
        matches!(outcomes[0], Outcome::Done { .. }),
        "{:?}",
        outcomes[0]
    );
    assert_eq!(denied_by(&outcomes[1]).map(|d| d.0), Some("policy_denied"));
    assert_eq!(*seen.lock().unwrap(), ["/v1/items?page=2"]);
}

/// A forbid guarded with `has port` fires (it never did: `port` was never filled), with the
/// effective port: the URL's, else the scheme's default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_forbid_fires() {
    let (port, seen) = endpoint();
    let policy = r#"
@id("any-host")
permit(principal, action == Action::"http.request", resource);
@id("only-443")
forbid(principal, action == Action::"http.request", resource)
when { context.arguments has port && context.arguments.port != 443 };
"#;
    let (outcomes, events) = calls(
        "port",
        policy,
        &[get(&format!("http://127.0.0.1:{port}/x"))],
    )
    .await;
    assert_eq!(denied_by(&outcomes[0]).map(|d| d.0), Some("policy_denied"));
    let denial = of_type(&events, EventType::CapabilityDenied)[0];
    assert_eq!(denial.payload["policies"], json!(["only-443"]));
    assert!(seen.lock().unwrap().is_empty());
}

/// The starter's example, `context.arguments.scheme == "https"`, permits an https URL (it never
/// did: `scheme` was never filled) and not an http one. (The test server speaks plain HTTP, so
/// the permitted call is granted and then fails at TLS.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_scheme_permit_permits() {
    let (port, _seen) = endpoint();
    let policy = r#"
@id("https-only")
permit(principal, action == Action::"http.request", resource == Host::"127.0.0.1")
when {
  context.effect == EffectClass::"read" &&
  context.arguments has scheme && context.arguments.scheme == "https"
};
"#;
    let (outcomes, events) = calls(
        "scheme",
        policy,
        &[
            get(&format!("https://127.0.0.1:{port}/x")),
            get(&format!("http://127.0.0.1:{port}/x")),
        ],
    )
    .await;
    let granted = of_type(&events, EventType::CapabilityGranted);
    assert_eq!(granted.len(), 1, "{outcomes:?}");
    assert_eq!(granted[0].payload["policies"], json!(["https-only"]));
    assert_ne!(
        denied_by(&outcomes[0]).map(|d| d.0),
        Some("policy_denied"),
        "{:?}",
        outcomes[0]
    );
    assert_eq!(denied_by(&outcomes[1]).map(|d| d.0), Some("policy_denied"));
}

/// `forbid resource == Host::"127.0.0.1"` holds for `[::ffff:127.0.0.1]`, which a dual-stack
/// socket connects to as 127.0.0.1; nothing reaches the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv4_mapped_address_is_denied_by_the_ipv4_forbid() {
    let (port, seen) = endpoint();
    let policy = r#"
@id("any-host")
permit(principal, action == Action::"http.request", resource);
@id("no-loopback")
forbid(principal, action == Action::"http.request", resource == Host::"127.0.0.1");
"#;
    let urls = [
        format!("http://[::ffff:127.0.0.1]:{port}/"),
        format!("http://[::ffff:7f00:1]:{port}/"),
        format!("http://[0:0:0:0:0:ffff:7f00:0001]:{port}/"),
    ];
    let proposals: Vec<Proposal> = urls.iter().map(|u| get(u)).collect();
    let (outcomes, events) = calls("mapped", policy, &proposals).await;
    for (url, o) in urls.iter().zip(&outcomes) {
        assert_eq!(denied_by(o).map(|d| d.0), Some("policy_denied"), "{url}");
    }
    for d in of_type(&events, EventType::CapabilityDenied) {
        assert_eq!(d.payload["policies"], json!(["no-loopback"]));
        assert_eq!(
            d.payload["resource"],
            json!({"kind": "host", "id": "127.0.0.1"})
        );
    }
    assert!(seen.lock().unwrap().is_empty());
}

/// An approval of an HTTP call shows the operator the URL as it will be sent (the resource is
/// only its host) and binds to it: its digest covers the URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_approval_shows_and_binds_the_url_as_sent() {
    let (port, seen) = endpoint();
    let base = format!("http://127.0.0.1:{port}");
    let policy = r#"
@id("ask")
@approval("required")
permit(principal == Agent::"fetcher", action == Action::"http.request", resource == Host::"127.0.0.1");
"#;
    let h = H::new(policy);
    let (spec, _) = h.spec("asked", "fetcher", "", "");
    let session =
        h.rt.open_session(spec, "fetcher", &ice_runtime::Quiet)
            .await
            .unwrap();
    let run = ice_kernel::RunId::new("asked").unwrap();
    let url = format!("{base}/repos/me/../../admin");
    let operator = async {
        let approval = pending(&h.rt, &run).await;
        let events = events(&h.rt, &run).await;
        let asked = events
            .iter()
            .find(|e| e.event_type == EventType::ApprovalRequested.name())
            .unwrap();
        assert_eq!(asked.payload["arguments"]["url"], format!("{base}/admin"));
        let p =
            ice_authority::payload::ApprovalRequestedPayload::from_payload(&asked.payload).unwrap();
        let digest_of = |arguments: serde_json::Map<String, serde_json::Value>| {
            ice_authority::request_digest(
                &run,
                &p.capability,
                &p.resource,
                &serde_json::Value::Object(arguments),
                &p.policy_version,
            )
        };
        assert_eq!(p.digest, digest_of(p.arguments.clone()));
        let mut without_url = p.arguments.clone();
        without_url.remove("url");
        assert_ne!(
            p.digest,
            digest_of(without_url),
            "the digest must cover the URL"
        );
        h.rt.answer_approval(&approval, "alice", true, "fine")
            .await
            .unwrap();
    };
    let proposal = get(&url);
    let (out, ()) = tokio::join!(session.propose(&proposal), operator);
    let out = out.unwrap().unwrap();
    assert!(matches!(out, Outcome::Done { .. }), "{out:?}");
    assert_eq!(seen.lock().unwrap().as_slice(), ["/admin"]);
    session.finish().await.unwrap();
}

/// A plan of one GET per URL.
fn gets(urls: &[String]) -> String {
    urls.iter()
        .map(|u| {
            format!(
                "[[step]]\nintent = \"fetch\"\ncapability = \"http.request\"\ntarget = \"{u}\"\narguments = {{ method = \"GET\" }}\n\n"
            )
        })
        .collect()
}

/// Run `plan` as agent `fetcher` under `policy`; its events, after checking that the run
/// replays, re-driven, without a divergence, and how many decisions that re-made.
async fn run_and_replay(id: &str, policy: &str, plan: &str) -> (Vec<ice_kernel::Event>, u64) {
    let h = H::new(policy);
    let (spec, mut agent) = h.spec(id, "fetcher", "", plan);
    let report = h.run(spec, &mut agent).await;
    assert_eq!(
        report.outcome,
        ice_runtime::RunOutcome::Committed,
        "{report:?}"
    );
    let (_, mut again) = h.spec(&format!("{id}-again"), "fetcher", "", plan);
    let run = ice_kernel::RunId::new(id).unwrap();
    let replayed = h.rt.replay_drive(&run, &mut again).await.unwrap();
    assert!(
        replayed.divergences.is_empty(),
        "{:?}",
        replayed.divergences
    );
    let drive = replayed.drive.unwrap();
    assert!(drive.unchecked.is_empty(), "{:?}", drive.unchecked);
    (h.events(id).await, drive.decisions)
}

const LOCAL_CALLS: &str = r#"
@id("local-names")
permit(principal == Agent::"fetcher", action == Action::"http.request", resource)
when { resource == Host::"localhost" || resource == Host::"127.0.0.1" };

@id("only-local")
forbid(principal, action, resource)
unless { resource == Host::"localhost" || resource == Host::"127.0.0.1" };
"#;

/// [`LOCAL_CALLS`] and a forbid `id` on connections `when { condition }`.
fn with_connection_forbid(id: &str, condition: &str) -> String {
    format!(
        "{LOCAL_CALLS}\n@id({id:?})\nforbid(principal, action == Action::\"http.connect\", resource) when {{ {condition} }};\n"
    )
}

/// A name cannot lead past a forbid on addresses: every address the host resolves to is decided
/// (`http.connect`) before anything is sent, the denial names the address and the forbid, and
/// the replay re-makes those decisions from the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_resolves_to_a_forbidden_address_is_never_contacted() {
    let (port, seen) = endpoint();
    let policy = with_connection_forbid("no-loopback", r#"context.address.isLoopback()"#);
    let plan = gets(&[
        format!("http://localhost:{port}/a"),
        format!("http://127.0.0.1:{port}/a"),
    ]);
    let (events, decisions) = run_and_replay("resolved-forbidden", &policy, &plan).await;
    assert!(seen.lock().unwrap().is_empty(), "the server was contacted");
    assert!(of_type(&events, EventType::APIRequestExecuted).is_empty());
    // Each call was permitted and its grant used: the refusal is the connection's.
    assert_eq!(of_type(&events, EventType::CapabilityUsed).len(), 2);
    assert_eq!(denial_codes(&events), ["policy_denied", "policy_denied"]);
    let denied = of_type(&events, EventType::CapabilityDenied);
    for (d, host) in denied.iter().zip(["localhost", "127.0.0.1"]) {
        assert_eq!(d.payload["policies"], json!(["no-loopback"]));
        let address = d.payload["address"].as_str().unwrap();
        let ip: std::net::IpAddr = address.parse().unwrap();
        assert!(ip.is_loopback(), "{address}");
        let detail = d.payload["detail"].as_str().unwrap();
        assert!(
            detail.contains(&format!("{host} resolves to")) && detail.contains("http.connect"),
            "{detail}"
        );
    }
    // Two calls and their two refused connections.
    assert_eq!(decisions, 4);
}

/// Only forbids naming `http.connect` take part: a call whose addresses none refuses goes
/// through, its evidence names the address, and the replay re-decides it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_no_connection_forbid_refuses_goes_through() {
    let (port, seen) = endpoint();
    let policy = with_connection_forbid(
        "no-metadata",
        r#"context.address.isInRange(ip("169.254.0.0/16"))"#,
    );
    let plan = gets(&[format!("http://127.0.0.1:{port}/b")]);
    let (events, decisions) = run_and_replay("resolved-allowed", &policy, &plan).await;
    assert_eq!(*seen.lock().unwrap(), ["/b"]);
    let executed = of_type(&events, EventType::APIRequestExecuted);
    assert_eq!(
        executed[0].payload["evidence"]["http"]["addresses"],
        json!(["127.0.0.1"])
    );
    // The call, and its one connection.
    assert_eq!(decisions, 2);
}

/// A connection the run let through but a re-made check refuses: under the run's own decision
/// rules a divergence; under other rules (a run recorded before ICE checked connections, say)
/// it is listed as not checked, naming both rules, and nothing diverges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_re_decided_under_other_rules_is_not_called_a_divergence() {
    let (port, _seen) = endpoint();
    let allowing = with_connection_forbid(
        "no-metadata",
        r#"context.address.isInRange(ip("169.254.0.0/16"))"#,
    );
    let h = H::new(&allowing);
    let plan = gets(&[format!("http://127.0.0.1:{port}/c")]);
    let (spec, mut agent) = h.spec("conn", "fetcher", "", &plan);
    let report = h.run(spec, &mut agent).await;
    assert_eq!(report.outcome, ice_runtime::RunOutcome::Committed);
    let events = h.events("conn").await;
    let recorded_version = events[2].payload["policy_version"]
        .as_str()
        .unwrap()
        .to_string();
    // The same record under a policy that refuses loopback connections.
    let refusing = with_connection_forbid("no-loopback", "context.address.isLoopback()");
    let version = version_of(&refusing);
    for (run, rules) in [("conn-now", true), ("conn-older", false)] {
        let text = refusing.clone();
        forge_replacing(
            &h,
            "conn",
            run,
            &[(recorded_version.as_str(), version.as_str())],
            |t, p| {
                if t == "RunProvisioned" && !rules {
                    p.as_object_mut().unwrap().remove("decision_rules");
                }
                if t == "ContextResolved" {
                    p["policy_sources"] = json!([{"name": "p.cedar", "text": text}]);
                }
            },
        )
        .await;
        let (_, mut again) = h.spec(&format!("{run}-again"), "fetcher", "", &plan);
        let r =
            h.rt.replay_drive(&ice_kernel::RunId::new(run).unwrap(), &mut again)
                .await
                .unwrap();
        let d = r.drive.unwrap();
        let says = "the recorded policy refuses connecting to 127.0.0.1";
        if rules {
            assert_eq!(r.divergences.len(), 1, "{:?}", r.divergences);
            assert!(r.divergences[0].what.contains(says), "{:?}", r.divergences);
        } else {
            assert!(r.divergences.is_empty(), "{:?}", r.divergences);
            assert!(
                d.unchecked
                    .iter()
                    .any(|u| u.contains(says)
                        && u.contains("before ICE recorded its decision rules")),
                "{:?}",
                d.unchecked
            );
        }
    }
}

/// A connection forbid that fails to evaluate refuses, as every broken forbid does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_forbid_that_fails_to_evaluate_refuses() {
    let (port, seen) = endpoint();
    let policy = with_connection_forbid(
        "overflows",
        r#"context.arguments has port && context.arguments.port * 9223372036854775807 > 1"#,
    );
    let plan = gets(&[format!("http://127.0.0.1:{port}/c")]);
    let (events, _) = run_and_replay("broken-connection-forbid", &policy, &plan).await;
    assert!(seen.lock().unwrap().is_empty(), "the server was contacted");
    assert_eq!(denial_codes(&events), ["policy_denied"]);
    let denied = of_type(&events, EventType::CapabilityDenied);
    assert_eq!(denied[0].payload["policies"], json!(["overflows"]));
    assert_eq!(denied[0].payload["address"], "127.0.0.1");
}

/// A call that fails after its connection was made (the server hangs up) was sent: it is
/// recorded as the call it was, its outcome unknown, with where it went (the replay re-decides
/// the connection) and what was sent; the agent is told so, not that it was denied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_fails_after_connecting_records_where_it_went() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let accepted = Arc::new(Mutex::new(0));
    let a = accepted.clone();
    std::thread::spawn(move || {
        for stream in l.incoming() {
            // Hang up without answering.
            drop(stream);
            *a.lock().unwrap() += 1;
        }
    });
    let policy = with_connection_forbid(
        "no-metadata",
        r#"context.address.isInRange(ip("169.254.0.0/16"))"#,
    );
    let plan = gets(&[format!("http://127.0.0.1:{port}/d")]);
    let (events, decisions) = run_and_replay("failed-after-connecting", &policy, &plan).await;
    assert_eq!(*accepted.lock().unwrap(), 1);
    assert!(denial_codes(&events).is_empty());
    let sent = of_type(&events, EventType::APIRequestExecuted);
    assert_eq!(sent.len(), 1);
    let p = &sent[0].payload;
    assert_eq!(p["outcome"], "unknown", "{p:?}");
    assert_eq!(p["status"], serde_json::Value::Null, "{p:?}");
    assert_eq!(p["evidence"]["http"]["addresses"], json!(["127.0.0.1"]));
    assert_eq!(p["evidence"]["inputs"][0]["name"], "request_body");
    assert!(
        p["output"]["note"]
            .as_str()
            .unwrap()
            .contains("it may have reached the server"),
        "{p:?}"
    );
    // The call, and the connection it made.
    assert_eq!(decisions, 2);
}

/// A connection forbid added while the run goes applies once the run takes the reload on: the
/// calls before it (no forbid names `http.connect`, so nothing is checked) go through, the one
/// after is refused, and the replay re-makes each under the policy in force at it. (The file is
/// written while the second call is proposed; the run notices it between steps.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_forbid_added_mid_run_applies_from_the_next_call() {
    let (port, seen) = endpoint();
    let h = H::new(LOCAL_CALLS);
    let plan = gets(&[
        format!("http://127.0.0.1:{port}/first"),
        format!("http://127.0.0.1:{port}/second"),
        format!("http://127.0.0.1:{port}/third"),
    ]);
    let (spec, plan_agent) = h.spec("reload-connect", "fetcher", "", &plan);
    let policies = h.policies.clone();
    let stricter = with_connection_forbid("no-loopback", "context.address.isLoopback()");
    let mut agent = Hooked {
        inner: plan_agent,
        hook: move |v: &ice_kernel::AgentView| {
            if v.step == 1 {
                std::thread::sleep(std::time::Duration::from_millis(30));
                std::fs::write(policies.join("p.cedar"), &stricter).unwrap();
            }
        },
    };
    let report = h.run(spec, &mut agent).await;
    assert_eq!(report.outcome, ice_runtime::RunOutcome::Committed);
    assert_eq!(*seen.lock().unwrap(), ["/first", "/second"]);
    let events = h.events("reload-connect").await;
    assert_eq!(of_type(&events, EventType::PolicyReloaded).len(), 1);
    assert_eq!(of_type(&events, EventType::APIRequestExecuted).len(), 2);
    assert_eq!(denial_codes(&events), ["policy_denied"]);
    let denied = of_type(&events, EventType::CapabilityDenied);
    assert_eq!(denied[0].payload["policies"], json!(["no-loopback"]));
    let (_, mut again) = h.spec("reload-connect-again", "fetcher", "", &plan);
    let run = ice_kernel::RunId::new("reload-connect").unwrap();
    let replayed = h.rt.replay_drive(&run, &mut again).await.unwrap();
    assert!(
        replayed.divergences.is_empty(),
        "{:?}",
        replayed.divergences
    );
    // Three calls, and the refused connection (the others were not checked: no forbid named
    // http.connect then).
    assert_eq!(replayed.drive.unwrap().decisions, 4);
}

/// The finding: an HTTP call to a server that never answers ran its full 30 s whatever the
/// run's wall-time budget had left (only checked between steps), so a run with a 2 s budget
/// spent 30. A call runs no longer than the budget has left; the run then stops on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_call_runs_no_longer_than_the_wall_time_budget_has_left() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in l.incoming() {
            // Keep the connection open and never answer.
            held.push(stream);
        }
    });
    let policy = with_connection_forbid(
        "no-metadata",
        r#"context.address.isInRange(ip("169.254.0.0/16"))"#,
    );
    let h = H::new(&policy);
    let plan = gets(&[format!("http://127.0.0.1:{port}/hang")]);
    let (spec, mut agent) = h.spec(
        "hangs",
        "fetcher",
        "[budget]\nwall_time = \"2s\"\non_exhaustion = \"abort\"\n",
        &plan,
    );
    let started = std::time::Instant::now();
    let report = h.run(spec, &mut agent).await;
    assert!(
        started.elapsed() < std::time::Duration::from_secs(12),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        matches!(report.outcome, ice_runtime::RunOutcome::Aborted { .. }),
        "{report:?}"
    );
    let events = h.events("hangs").await;
    let sent = of_type(&events, EventType::APIRequestExecuted);
    let p = &sent[0].payload;
    assert_eq!(p["outcome"], "unknown", "{p:?}");
    let error = p["error"].as_str().unwrap();
    assert!(
        error.contains("cut at the end of the run's wall_time budget"),
        "{error}"
    );
    let abort = of_type(&events, EventType::AbortReasonDeclared);
    assert_eq!(abort[0].payload["reason"], "budget_exhausted", "{abort:?}");
}
