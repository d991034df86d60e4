//! `ice serve`'s telemetry, as an operator's collector and scraper see it: a run another process
//! records shows up in `/metrics`, and its trace is exported over OTLP/HTTP to the collector the
//! config names (a listener this test starts).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn ice(home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ice"));
    c.arg("--home").arg(home).env_remove("ICE_HOME");
    c
}

/// What the collector saw of a request: its line, content type, body length and `x-collector-key`.
type Seen = (String, String, usize, String);

/// A collector that answers 200 to everything and reports each request's line and content type.
fn collector() -> (u16, std::sync::mpsc::Receiver<Seen>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            if r.read_line(&mut line).is_err() {
                continue;
            }
            let (mut kind, mut len, mut key) = (String::new(), 0usize, String::new());
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
                let lower = h.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("content-type:") {
                    kind = v.trim().to_string();
                }
                if let Some(v) = lower.strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                if lower.starts_with("x-collector-key:") {
                    key = h["x-collector-key:".len()..].trim().to_string();
                }
            }
            let mut body = vec![0u8; len];
            let _ = r.read_exact(&mut body);
            let _ = tx.send((line.trim().to_string(), kind, body.len(), key));
            let _ =
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    (port, rx)
}

fn get(addr: &str, path: &str, token: Option<&str>) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn a_run_shows_in_metrics_and_its_trace_reaches_the_collector() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    let home = base.join("home");
    std::fs::create_dir_all(base.join("ws")).unwrap();
    std::fs::write(base.join("ws/hello.txt"), "hello\n").unwrap();
    std::fs::write(
        base.join("plan.toml"),
        "agent = \"reader\"\n[[step]]\nintent = \"read\"\ncapability = \"fs.read\"\ntarget = \"hello.txt\"\n[[step]]\nintent = \"escape\"\ncapability = \"fs.read\"\ntarget = \"../x\"\n",
    )
    .unwrap();
    std::fs::write(
        base.join("run.toml"),
        "[run]\nid = \"traced\"\nagent = \"reader\"\nworkspace = \"ws\"\n[agent]\ndriver = \"plan\"\nplan = \"plan.toml\"\n",
    )
    .unwrap();
    std::fs::write(
        base.join("mcp.toml"),
        "[run]\nagent = \"mcp-agent\"\nworkspace = \"ws\"\n[agent]\ndriver = \"external\"\n",
    )
    .unwrap();
    assert!(ice(&home).arg("init").status().unwrap().success());
    // A run recorded before the server starts is counted from the start.
    std::fs::write(
        base.join("run0.toml"),
        "[run]\nid = \"before\"\nagent = \"reader\"\nworkspace = \"ws\"\n[agent]\ndriver = \"plan\"\nplan = \"plan.toml\"\n",
    )
    .unwrap();
    let o = ice(&home)
        .args(["run", "--json"])
        .arg(base.join("run0.toml"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", common::text(&o));
    let (port, received) = collector();
    let config = home.join("config.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[telemetry]\notlp_endpoint = \"http://127.0.0.1:{port}\"\nheaders_env = {{ \"x-collector-key\" = \"ICE_TEST_OTLP_KEY\" }}\n"
    ));
    std::fs::write(&config, text).unwrap();

    // The scraper's token: it reads /metrics and nothing else.
    let o = ice(&home)
        .args(["token", "add", "--metrics", "prometheus", "--json"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", common::text(&o));
    let made: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(made["role"], "metrics");
    let scraper = made["token"].as_str().unwrap().to_string();
    // The collector's key is read from the environment (unset: serve refuses to start).
    let o = ice(&home)
        .args(["serve", "--listen", "127.0.0.1:0", "--run-spec"])
        .arg(base.join("mcp.toml"))
        .env_remove("ICE_TEST_OTLP_KEY")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", common::text(&o));
    assert!(
        common::text(&o).contains("$ICE_TEST_OTLP_KEY, which is not set"),
        "{}",
        common::text(&o)
    );
    let mut serve = ice(&home);
    serve
        .args(["serve", "--listen", "127.0.0.1:0", "--run-spec"])
        .arg(base.join("mcp.toml"))
        .env("ICE_TEST_OTLP_KEY", "K3Y-123");
    let (_served, mcp) = common::serve(serve);
    let addr = common::addr_of(&mcp);

    // Another process records a run in the same log.
    let o = ice(&home)
        .args(["run", "--json"])
        .arg(base.join("run.toml"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", common::text(&o));

    // The scraper sees it: one permit, one denial (confinement), the run terminated.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut metrics = String::new();
    while Instant::now() < deadline {
        metrics = get(&addr, "/metrics", Some(&scraper));
        if metrics.contains("ice_runs{state=\"TERMINATED\"} 2") {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(metrics.contains("text/plain; version=0.0.4"), "{metrics}");
    // Without a token, or with one that is not its own, the scraper learns nothing.
    let anonymous = get(&addr, "/metrics", None);
    assert!(anonymous.starts_with("HTTP/1.1 401"), "{anonymous}");
    assert!(
        anonymous.contains("ice token add --metrics NAME"),
        "{anonymous}"
    );
    assert!(!anonymous.contains("ice_runs"), "{anonymous}");
    let wrong = get(&addr, "/metrics", Some("ice_not-a-token"));
    assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
    assert!(
        metrics.contains("ice_runs{state=\"TERMINATED\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ice_decisions_total{outcome=\"permit\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ice_denials_total{reason=\"confinement\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("# TYPE ice_effect_seconds histogram"),
        "{metrics}"
    );

    // A run this server drives (started through the API) has its appends timed.
    let o = ice(&home)
        .args(["token", "add", "--operator", "alice", "--json"])
        .output()
        .unwrap();
    let token: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let token = token["token"].as_str().unwrap().to_string();
    std::fs::write(
        base.join("run2.toml"),
        "[run]\nid = \"served\"\nagent = \"reader\"\nworkspace = \"ws\"\n[agent]\ndriver = \"plan\"\nplan = \"plan.toml\"\n",
    )
    .unwrap();
    let body = serde_json::json!({"spec": base.join("run2.toml")}).to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut answer = String::new();
    // The server re-reads its tokens within seconds.
    while Instant::now() < deadline {
        let mut s = TcpStream::connect(&addr).unwrap();
        write!(
            s,
            "POST /api/v1/runs HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        answer.clear();
        s.read_to_string(&mut answer).unwrap();
        if answer.starts_with("HTTP/1.1 202") {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    // The scraper's token opens nothing but /metrics.
    let elsewhere = get(&addr, "/api/v1/runs", Some(&scraper));
    assert!(elsewhere.starts_with("HTTP/1.1 403"), "{elsewhere}");
    assert!(elsewhere.contains("metrics reader"), "{elsewhere}");
    let count = |m: &str| {
        m.lines()
            .find_map(|l| l.strip_prefix("ice_append_seconds_count "))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        // An operator's token reads the metrics too.
        metrics = get(&addr, "/metrics", Some(&token));
        if metrics.contains("ice_runs{state=\"TERMINATED\"} 3") {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        metrics.contains("ice_runs{state=\"TERMINATED\"} 3"),
        "{metrics}"
    );
    assert!(count(&metrics) > 0, "{metrics}");

    // The collector receives the runs' traces over OTLP/HTTP.
    let (line, kind, len, key) = received
        .recv_timeout(Duration::from_secs(30))
        .expect("the trace is exported");
    assert_eq!(key, "K3Y-123");
    assert_eq!(line, "POST /v1/traces HTTP/1.1");
    assert_eq!(kind, "application/x-protobuf");
    assert!(len > 100, "a trace with spans ({len} bytes)");
}
