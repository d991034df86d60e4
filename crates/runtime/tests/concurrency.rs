//! Budgets under concurrent proposals (I-005): spending never passes the budget.

mod common;

use common::*;
use ice_kernel::{CapabilityProposal, EventType, Outcome, Proposal};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_proposals_never_spend_past_the_budget() {
    for round in 0..5 {
        let h = H::new(POLICY);
        let id = format!("conc-{round}");
        // 100-byte writes against a 1000-byte budget: ten fit.
        let (spec, _) = h.spec(
            &id,
            "coder",
            "[budget]\nbytes = 1000\non_exhaustion = \"abort\"\n",
            "",
        );
        let session =
            h.rt.open_session(spec, "coder", &ice_runtime::Quiet)
                .await
                .unwrap();
        let proposals: Vec<Proposal> = (0..40)
            .map(|i| {
                Proposal::Request(CapabilityProposal {
                    capability: "fs.write".into(),
                    target: format!("out/{i}.txt"),
                    arguments: json!({"content": "x".repeat(100)}),
                    intent: "fill".into(),
                })
            })
            .collect();
        let results =
            futures_util::future::join_all(proposals.iter().map(|p| session.propose(p))).await;
        let done = results
            .iter()
            .filter(|r| matches!(r, Ok(Some(Outcome::Done { .. }))))
            .count();
        assert!(
            done <= 10,
            "{done} writes of 100 bytes fit in a 1000-byte budget"
        );
        let report = session.finish().await.unwrap();
        let events = h.events(&id).await;
        let settled: u64 = of_type(&events, EventType::BudgetSettled)
            .iter()
            .map(|e| e.payload["actual"]["bytes"].as_u64().unwrap_or(0))
            .sum();
        assert!(
            settled <= 1000,
            "settled {settled} bytes of a 1000-byte budget"
        );
        assert_eq!(settled, report.spent.bytes);
        assert_eq!(settled, 100 * done as u64);
        assert_eq!(of_type(&events, EventType::EffectStaged).len(), done);
        // Whatever interleaving happened, the log replays to the same books.
        let replayed =
            ice_runtime::Books::fold(ice_kernel::RunId::new(id.as_str()).unwrap(), events.iter())
                .unwrap();
        assert_eq!(replayed, report.books);
    }
}

/// A local endpoint that answers each request after a pause (so calls overlap); counts them.
fn slow_endpoint() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let h = h.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(30));
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                );
            });
        }
    });
    (port, hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_in_flight_are_recorded_before_the_run_stops() {
    let (port, hits) = slow_endpoint();
    let policy = format!(
        "{POLICY}\n@id(\"fetch\")\npermit(principal == Agent::\"fetcher\", action == Action::\"http.request\", resource == Host::\"127.0.0.1\");\n"
    );
    let h = H::new(&policy);
    let (spec, _) = h.spec(
        "inflight",
        "fetcher",
        "[budget]\ntool_calls = 10\non_exhaustion = \"abort\"\n\n[grants]\nuses = 100\n",
        "",
    );
    let session =
        h.rt.open_session(spec, "fetcher", &ice_runtime::Quiet)
            .await
            .unwrap();
    let proposals: Vec<Proposal> = (0..40)
        .map(|i| {
            Proposal::Request(CapabilityProposal {
                capability: "http.request".into(),
                target: format!("http://127.0.0.1:{port}/item/{i}"),
                arguments: json!({"method": "GET"}),
                intent: "fetch".into(),
            })
        })
        .collect();
    let results =
        futures_util::future::join_all(proposals.iter().map(|p| session.propose(p))).await;
    let done = results
        .iter()
        .filter(|r| matches!(r, Ok(Some(Outcome::Done { .. }))))
        .count();
    let report = session.finish().await.unwrap();
    assert!(
        matches!(report.outcome, ice_runtime::RunOutcome::Aborted { .. }),
        "{report:?}"
    );
    let events = h.events("inflight").await;
    let calls = of_type(&events, EventType::APIRequestExecuted);
    // Every request the endpoint saw is in the log, before the run was aborted.
    assert_eq!(calls.len(), hits.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(calls.len(), done);
    assert!(done <= 10, "{done}");
    let aborted = of_type(&events, EventType::RunAborted)[0].run_seq;
    assert!(calls.iter().all(|c| c.run_seq < aborted));
    // Every reservation was settled, and spending stayed within the budget.
    assert_eq!(
        of_type(&events, EventType::BudgetReserved).len(),
        of_type(&events, EventType::BudgetSettled).len()
    );
    assert!(report.spent.tool_calls <= 10);
    let replayed =
        ice_runtime::Books::fold(ice_kernel::RunId::new("inflight").unwrap(), events.iter())
            .unwrap();
    assert_eq!(replayed, report.books);
}
