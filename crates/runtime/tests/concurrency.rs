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
