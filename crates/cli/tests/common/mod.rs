//! What the gateway tests share: starting `ice serve` and stopping it with the test.
#![allow(dead_code)] // each test binary uses a different subset

use std::io::{BufRead, Read, Write};
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
    let served = Served(child);
    // Start-up recovery may report first.
    let mut before = String::new();
    let url = loop {
        let mut line = String::new();
        let n = err.read_line(&mut line).expect("ice serve's stderr");
        assert!(n > 0, "ice serve stopped before serving: {before}");
        if let Some(url) = line.trim().strip_prefix("ice serve: MCP at ") {
            break url.to_string();
        }
        assert!(
            line.starts_with("recovered run "),
            "unexpected line: {line:?}"
        );
        before.push_str(&line);
    };
    // Keep draining stderr so the server never blocks on it.
    std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut rest);
    });
    (served, url)
}

/// The `HOST:PORT` a served MCP URL (`http://HOST:PORT/mcp`) is at: where the operator API is.
pub fn addr_of(mcp: &str) -> String {
    mcp.strip_prefix("http://")
        .and_then(|a| a.strip_suffix("/mcp"))
        .unwrap_or_else(|| panic!("not a served MCP URL: {mcp}"))
        .to_string()
}

/// One HTTP/1.1 request to `addr` (with a `Host` header naming `addr` unless `headers` has
/// one), carrying `body` as JSON when it is not empty: the answer's status and body.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {resp:?}"));
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

/// A new token for `name` in the installation at `home` (`role`: `operator` or `agent`).
pub fn token(home: &Path, role: &str, name: &str) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_ice"))
        .env_remove("ICE_HOME")
        .arg("--home")
        .arg(home)
        .args(["token", "add", &format!("--{role}"), name, "--json"])
        .output()
        .expect("ice token add runs");
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["token"].as_str().unwrap().to_string()
}
