//! Write two demonstration runs into an ICE home through the validator (the library API), so
//! the audit commands have something to show before `ice run` exists.
//!
//! ```text
//! cargo run -p ice-cli --example seed_run -- --home DIR
//! ```
//!
//! Run `demo-1` commits: provisioned, an agent proposes a write, the runtime grants and applies
//! it (the file's new content, 40 KiB, goes to the blob store), validation passes. Run `demo-2`
//! aborts: its agent asks for an external effect that is denied. Finally the example shows the
//! law holding: an agent trying to emit a runtime event is refused and nothing is appended.

use std::sync::Arc;

use ice_kernel::{Cost, Draft, EventId, Origin, RunId};
use ice_log::clock::SystemClock;
use ice_log::ledger::{AppendError, Ledger};
use ice_log::sqlite::{Mode, SqliteLog};
use serde_json::json;

fn rt(t: &str) -> Draft {
    Draft::new(t, Origin::Runtime)
}

fn agent(t: &str, intent: &str) -> Draft {
    Draft::new(t, Origin::Agent("planner".into())).intent(intent)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let home = match (args.next().as_deref(), args.next()) {
        (Some("--home"), Some(h)) => std::path::PathBuf::from(h),
        _ => return Err("usage: seed_run --home DIR".into()),
    };
    let log = Arc::new(SqliteLog::open(&home.join("ice.db"), Mode::ReadWrite)?);
    let ledger = Ledger::new(log, Arc::new(SystemClock));

    let r1 = RunId::new("demo-1")?;
    let id = |s: u64| EventId::new(r1.clone(), s);
    ledger
        .append(
            &r1,
            vec![
                rt("RunProvisioned")
                    .payload(json!({"agent": "planner", "workspace": "./workspace"})),
                rt("ResourcesAllocated").payload(json!({"budget": {"tool_calls": 10}})),
                rt("ContextResolved"),
                rt("CapabilitiesBound").payload(json!({"capabilities": ["fs.read", "fs.write"]})),
                rt("ExecutionWindowOpened"),
            ],
        )
        .await?;
    ledger
        .append(
            &r1,
            vec![
                agent("InferenceStep", "decide how to fix the greeting")
                    .payload(json!({"model": "scripted", "output": "Write hello.txt with a friendlier greeting."})),
                agent("CapabilityRequested", "update the greeting")
                    .payload(json!({"capability": "fs.write", "target": "hello.txt"}))
                    .cause(id(5)),
            ],
        )
        .await?;
    ledger
        .append(
            &r1,
            vec![
                rt("CapabilityGranted")
                    .authority("policy:allow-workspace-writes")
                    .cause(id(6)),
            ],
        )
        .await?;
    let content = "Hello, world!\n".repeat(3000); // 42 KB: kept in the blob store
    ledger
        .append(
            &r1,
            vec![
                rt("EffectStaged")
                    .intent("update the greeting")
                    .authority("demo-1:7")
                    .payload(json!({"path": "hello.txt", "content": content}))
                    .cause(id(7))
                    .cost(Cost {
                        tool_calls: 1,
                        bytes: content.len() as u64,
                        ..Cost::default()
                    }),
                rt("ValidationStarted"),
                rt("ValidationPassed").payload(json!({"checks": ["test -s hello.txt"]})),
                rt("EffectApplied")
                    .intent("update the greeting")
                    .authority("demo-1:7")
                    .cause(id(8)),
                rt("RunCommitted"),
                rt("ResourcesReleased"),
                rt("RunTerminated"),
            ],
        )
        .await?;

    let r2 = RunId::new("demo-2")?;
    let id2 = |s: u64| EventId::new(r2.clone(), s);
    ledger
        .append(
            &r2,
            vec![
                rt("RunProvisioned").payload(json!({"agent": "planner"})),
                rt("ContextResolved"),
                rt("ExecutionWindowOpened"),
                agent("CapabilityRequested", "tell the team").payload(
                    json!({"capability": "http.request", "target": "https://chat.example/hook"}),
                ),
            ],
        )
        .await?;
    ledger
        .append(
            &r2,
            vec![
                rt("CapabilityDenied")
                    .payload(json!({"reason": "external effect without approval"}))
                    .cause(id2(3)),
                rt("RunAborted").cause(id2(4)),
                rt("AbortReasonDeclared")
                    .payload(json!({"reason": "the agent's only step was denied"})),
                rt("ResourcesReleased"),
                rt("RunTerminated"),
            ],
        )
        .await?;

    // The law holds: an agent cannot emit a runtime event, and nothing is appended.
    match ledger
        .append(
            &r2,
            vec![Draft::new("RunCommitted", Origin::Agent("planner".into()))],
        )
        .await
    {
        Err(AppendError::Rejected { error, .. }) => println!("refused as expected: {error}"),
        other => return Err(format!("the validator should have refused this: {other:?}").into()),
    }
    println!(
        "seeded runs demo-1 (committed) and demo-2 (aborted) in {}",
        home.display()
    );
    Ok(())
}
