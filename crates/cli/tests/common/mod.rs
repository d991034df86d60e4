//! What the gateway tests share: starting `ice serve` and stopping it with the test.
#![allow(dead_code)] // each test binary uses a different subset

use std::io::BufRead;
use std::process::{Child, Command, Stdio};

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
