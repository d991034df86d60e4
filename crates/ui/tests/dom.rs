//! The page's helpers that hold no DOM, run by Node (which the MCP peer tests need too).

use std::path::Path;
use std::process::Command;

/// Run `script` as an ES module next to the page's assets; its standard output.
fn node(script: &str) -> String {
    let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets");
    let o = Command::new("node")
        .arg("--input-type=module")
        .arg("-e")
        .arg(script.replace(
            "ASSETS",
            &format!("file://{}", assets.canonicalize().unwrap().display()),
        ))
        .output()
        .expect("node runs (Node 20, as for the MCP peers)");
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// A refresh on a timer never runs twice at once, and calls made while one runs are folded
/// into one more run after it, so the last change is still shown.
#[test]
fn one_at_a_time_never_overlaps_and_never_drops_the_last_call() {
    let out = node(
        r#"
import { oneAtATime } from 'ASSETS/dom.js';
let running = 0, most = 0, runs = 0;
const slow = oneAtATime(async () => {
  running += 1; runs += 1; most = Math.max(most, running);
  await new Promise((r) => setTimeout(r, 20));
  running -= 1;
});
// Ten calls while the first runs: one more run after it, not ten, and never two at once.
const first = slow();
await new Promise((r) => setTimeout(r, 5));
for (let i = 0; i < 10; i++) slow();
await first;
console.log(`runs=${runs} most=${most}`);
// Idle again: the next call runs at once.
await slow();
console.log(`runs=${runs} most=${most}`);
// A run that throws does not wedge it.
let failing = true;
const flaky = oneAtATime(async () => { if (failing) throw new Error('x'); runs += 1; });
await flaky().catch(() => {});
failing = false;
await flaky();
console.log(`runs=${runs}`);
// What a timer calls does nothing while a run is under way: no run is queued behind it.
let ticks = 0;
const timed = oneAtATime(async () => {
  ticks += 1;
  await new Promise((r) => setTimeout(r, 20));
});
const t = timed.ifIdle();
timed.ifIdle();
timed.ifIdle();
await t;
await new Promise((r) => setTimeout(r, 50));
console.log(`ticks=${ticks}`);
// A function that throws at once (not async) does not wedge it either.
let calls = 0;
const sync = oneAtATime(() => {
  calls += 1;
  if (calls === 1) throw new Error('at once');
  return Promise.resolve();
});
await sync().catch(() => {});
await sync();
console.log(`calls=${calls}`);
"#,
    );
    assert_eq!(
        out,
        "runs=2 most=1\nruns=3 most=1\nruns=4\nticks=1\ncalls=2\n"
    );
}

/// The probe's finding: a target holding U+202E (right-to-left override) read in the approval
/// card as another file (`report\u{202e}fdp.exe` showed as `reportexe.pdf`). Every string the
/// page shows goes through `visible`, which writes such characters out; letters of
/// right-to-left scripts, tabs and newlines are kept.
#[test]
fn invisible_and_reordering_characters_are_shown_written_out() {
    let out = node(
        r#"
import { visible } from 'ASSETS/dom.js';
const cases = [
  'report\u202efdp.exe', 'a\u200bb', 'x\u2066y\u2069', '\ufeffbom', 'bell\u0007', 'cr\rlf',
  'tab\tand\nnewline', 'שלום עולם', 'plain',
];
console.log(JSON.stringify(cases.map(visible)));
"#,
    );
    // As JSON: a written-out character is a backslash (`\\`), a kept tab or newline `\t`, `\n`.
    assert_eq!(
        out.trim(),
        r#"["report\\u{202e}fdp.exe","a\\u{200b}b","x\\u{2066}y\\u{2069}","\\u{feff}bom","bell\\u{7}","cr\\u{d}lf","tab\tand\nnewline","שלום עולם","plain"]"#
    );
}
