//! How long sealing takes per event, for the batches a governed tool call seals.
//!
//! Each sample seals 100 batches of five events (`BudgetReserved`, `CapabilityUsed`, a
//! `FileRead` with digests and evidence, `ToolInvoked`, `BudgetSettled`) on a run that is
//! executing, and the median over the samples is printed in nanoseconds per event. Beside it,
//! measured in the same run, a floor: `serde_json::to_vec` of the same payloads plus SHA-256
//! of the bytes, which is what any encoder that hashes must at least do.
//!
//! `cargo run --release -p ice-kernel --example seal_speed`

use std::hint::black_box;
use std::time::Instant;

use ice_kernel::{Cost, Digest, Draft, EventId, NoOtherRuns, Origin, RunHead, RunId, Timestamp};
use serde_json::json;

const BATCHES_PER_SAMPLE: usize = 100;
const SAMPLES: usize = 201;

fn at(us: i64) -> Timestamp {
    Timestamp::from_unix_us(1_780_000_000_000_000 + us).expect("in range")
}

/// A run in state EXECUTING, with a request and a grant for the batches to name as causes.
fn executing_head() -> (RunHead, EventId, EventId) {
    let run = RunId::new("run-01J8Z3Q4X5-tool-call").expect("valid");
    let mut head = RunHead::new(run.clone());
    for t in ["RunProvisioned", "ContextResolved", "ExecutionWindowOpened"] {
        head.seal(Draft::new(t, Origin::Runtime), at(0), &NoOtherRuns)
            .expect("the path to EXECUTING seals");
    }
    let req = EventId::new(run.clone(), head.next_seq);
    let request = Draft::new("CapabilityRequested", Origin::Agent("planner-7".into()))
        .intent("read the build configuration")
        .payload(
            json!({"capability": "fs.read", "resource": {"kind": "path", "path": "Cargo.toml"}}),
        );
    head.seal(request, at(1), &NoOtherRuns)
        .expect("request seals");
    let grant = EventId::new(run, head.next_seq);
    let granted = Draft::new("CapabilityGranted", Origin::Runtime)
        .authority("policy:v3")
        .payload(
            json!({"capability": "fs.read", "request": req.to_string(), "scope": "workspace/**"}),
        )
        .cause(req.clone());
    head.seal(granted, at(2), &NoOtherRuns)
        .expect("grant seals");
    (head, req, grant)
}

/// The five drafts of one governed tool call.
fn tool_call(req: &EventId, grant: &EventId) -> Vec<Draft> {
    let digest = |s: &str| Digest::of(s.as_bytes()).to_hex();
    let amount = Cost {
        tool_calls: 1,
        bytes: 65_536,
        wall_time_us: 250_000,
        ..Cost::default()
    };
    let actual = Cost {
        tool_calls: 1,
        bytes: 1_834,
        wall_time_us: 412,
        ..Cost::default()
    };
    let resource = json!({"kind": "path", "path": "Cargo.toml"});
    vec![
        Draft::new("BudgetReserved", Origin::Runtime)
            .payload(json!({"reservation": "r-000042", "amount": amount}))
            .cause(req.clone()),
        Draft::new("CapabilityUsed", Origin::Runtime)
            .intent("read the build configuration")
            .authority(grant.to_string())
            .payload(json!({"grant": grant.to_string(), "capability": "fs.read", "resource": resource}))
            .cause(req.clone())
            .cause(grant.clone()),
        Draft::new("FileRead", Origin::Runtime)
            .intent("read the build configuration")
            .authority(grant.to_string())
            .payload(json!({
                "path": "Cargo.toml",
                "bytes": 1_834,
                "digest": digest("Cargo.toml contents"),
                "evidence": {"kind": "file", "sha256": digest("evidence"), "mtime_us": 1_779_999_000_000_000u64},
            }))
            .cause(req.clone())
            .cost(actual),
        Draft::new("ToolInvoked", Origin::Runtime)
            .intent("read the build configuration")
            .authority(grant.to_string())
            .payload(json!({"tool": "fs.read", "ok": true, "output_digest": digest("out"), "exit": 0}))
            .cause(req.clone()),
        Draft::new("BudgetSettled", Origin::Runtime)
            .payload(json!({"reservation": "r-000042", "actual": actual}))
            .cause(req.clone()),
    ]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let (head, req, grant) = executing_head();
    let template = tool_call(&req, &grant);
    let per_sample = (BATCHES_PER_SAMPLE * template.len()) as f64;

    // Sealing: validation, canonical encoding and SHA-256, as the runtime calls it.
    let mut seal = Vec::with_capacity(SAMPLES);
    for s in 0..SAMPLES {
        let batches: Vec<Vec<Draft>> = (0..BATCHES_PER_SAMPLE).map(|_| template.clone()).collect();
        let mut heads: Vec<RunHead> = (0..BATCHES_PER_SAMPLE).map(|_| head.clone()).collect();
        let mut out = Vec::with_capacity(BATCHES_PER_SAMPLE);
        let t = Instant::now();
        for (h, b) in heads.iter_mut().zip(batches) {
            out.push(
                h.seal_batch(b, at(10 + s as i64), &NoOtherRuns)
                    .expect("the batch seals"),
            );
        }
        seal.push(t.elapsed().as_nanos() as f64 / per_sample);
        black_box(&out);
    }

    // The floor: serde_json of the same payloads, then SHA-256 of the bytes.
    let mut floor = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let t = Instant::now();
        for _ in 0..BATCHES_PER_SAMPLE {
            for d in &template {
                let bytes = serde_json::to_vec(black_box(&d.payload)).expect("encodes");
                black_box(Digest::of(&bytes));
            }
        }
        floor.push(t.elapsed().as_nanos() as f64 / per_sample);
    }

    println!(
        "seal: {:.0} ns/event (median of {SAMPLES} samples of {BATCHES_PER_SAMPLE} batches of {} events)",
        median(seal),
        template.len()
    );
    println!(
        "floor, serde_json::to_vec of the payload + SHA-256: {:.0} ns/event",
        median(floor)
    );
}
