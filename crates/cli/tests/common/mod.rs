//! What the gateway tests share: starting `ice serve` and stopping it with the test.
#![allow(dead_code)] // each test binary uses a different subset

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// The pinned third-party MCP peers `scripts/deps` installs; the tests fail (never skip) without
/// them.
pub fn deps() -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.deps");
    assert!(
        d.join(".stamp").is_file(),
        "the third-party MCP peers are not installed in {}: run scripts/deps",
        d.display()
    );
    d
}

/// The virtualenv's Python, with PyPI `mcp` 2.3.0.
pub fn python() -> PathBuf {
    deps().join("venv/bin/python")
}

/// The test agent: a real MCP client (PyPI `mcp`) driven by a JSON script.
pub fn agent_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/agent.py")
}

/// A process's exit status and output, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Start the test agent against the MCP server at `url` (protocol `mode`) with `script`.
pub fn agent_http(url: &str, mode: &str, script: &serde_json::Value) -> Child {
    agent_http_as(url, None, mode, script)
}

/// [`agent_http`], sending `token` as `Authorization: Bearer TOKEN` when given.
pub fn agent_http_as(
    url: &str,
    token: Option<&str>,
    mode: &str,
    script: &serde_json::Value,
) -> Child {
    let mut c = Command::new(python());
    c.arg(agent_script()).args(["--mode", mode, "--url", url]);
    if let Some(t) = token {
        c.arg(format!("--token={t}"));
    }
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(script.to_string().as_bytes())
        .expect("the script is written");
    child
}

/// An `ice serve` process, killed if the test ends (or fails) while it runs.
pub struct Served(pub Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `ice serve` as `command` describes (its stderr is taken over here); returns the
/// process and the MCP URL it announced.
pub fn serve(mut command: Command) -> (Served, String) {
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ice serve starts");
    let mut err = std::io::BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    err.read_line(&mut line).expect("ice serve's first line");
    let served = Served(child);
    let url = line
        .trim()
        .strip_prefix("ice serve: MCP at ")
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .to_string();
    // Keep draining stderr so the server never blocks on it.
    std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut rest);
    });
    (served, url)
}
