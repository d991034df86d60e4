//! Running a command (`process.exec`): a program and its arguments, in a directory (a
//! materialised copy of the workspace, [`crate::Stage::materialize`]), with a timeout and
//! bounded captured output.
//!
//! Two entry points:
//!
//! - [`run`] for commands an agent requested: it takes the [`Authorization`] and refuses unless
//!   it is `process.exec` on exactly this program (`Command::"cargo"` does not cover
//!   `/usr/bin/cargo` or `sh`).
//! - [`run_check`] for the runtime's own validation checks. Those come from the run spec, a
//!   file the operator wrote, not from an agent, so no grant stands behind them; the runtime
//!   records them under the run's own authority. No agent-facing path may call it.
//!
//! # What is confined, honestly
//!
//! Only the working directory and the environment. The command starts in the given directory
//! with the environment cleared except `PATH` (the runtime's absolute entries), `HOME` (set to that directory) and
//! `LANG` (the runtime's, or `C.UTF-8`); stdin is empty. It runs as the runtime's user, with that
//! user's access to the whole filesystem and to the network: **nothing here isolates the network
//! or the filesystem**, so a command can read or write outside its directory and reach any host.
//! That is why agent-requested commands need a grant on the exact program, and why the class of
//! `process.exec` is the runtime's (a policy can require approval for it).
//!
//! The command runs under a supervisor ([`crate::supervisor`]), in a process group of its own.
//! When it exits, times out or is stopped, its group and every process it started are killed
//! (SIGKILL), a process that left the group or the session (`setsid`, a daemon's double fork)
//! included, so nothing it left outlives it or holds its output open; so are they when the
//! runtime itself is killed.
//!
//! The functions block; the tokio runtime calls them from `spawn_blocking`.

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ice_authority::{Authorization, EffectClass, Resource};
use rustix::process::{Pid, WaitId, WaitIdOptions};

use crate::auth::{AuthorizationError, cap_bytes, cap_time, require};
use crate::evidence::{Detail, Digested, Evidence};
use crate::limits::MAX_EXEC_ARGS;

/// How often a running command checks whether it is to be stopped ([`run_until`]).
pub const STOP_POLL: Duration = Duration::from_millis(50);

/// How long output is still collected after the command's process group is gone.
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// The `PATH` a command gets when the runtime itself has none.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// The `PATH` a command gets: the runtime's absolute entries only. An empty or relative entry
/// (`.`, `bin`, a trailing `:`) would be looked up in the command's directory, a copy of the
/// workspace the agent writes: a grant on `pytest` would run the agent's own `bin/pytest`.
pub fn child_path(runtime: Option<std::ffi::OsString>) -> std::ffi::OsString {
    let kept: Vec<PathBuf> = runtime
        .as_deref()
        .map(|p| {
            std::env::split_paths(p)
                .filter(|d| d.is_absolute())
                .collect()
        })
        .unwrap_or_default();
    if kept.is_empty() {
        return DEFAULT_PATH.into();
    }
    std::env::join_paths(kept).unwrap_or_else(|_| DEFAULT_PATH.into())
}

/// A command to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecSpec {
    /// The program: a name looked up on `PATH`, or a path (a relative one is taken from `dir`).
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// The directory it runs in (and its `HOME`).
    pub dir: PathBuf,
    /// How long it may run before its process group is killed.
    pub timeout: Duration,
    /// The most bytes kept of stdout, and of stderr; the rest is read and dropped.
    pub max_output_bytes: u64,
}

/// How a command ended and what it printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Its exit code, if it exited.
    pub exit_code: Option<i32>,
    /// The signal that ended it, if one did (9 after a timeout).
    pub signal: Option<i32>,
    /// Whether it was killed for running out of time.
    pub timed_out: bool,
    /// Whether it was killed because it was told to stop ([`run_until`]).
    pub stopped: bool,
    /// Its stdout, up to the limit.
    pub stdout: Vec<u8>,
    /// Whether stdout was cut (or not complete when collection stopped).
    pub stdout_truncated: bool,
    /// Its stderr, up to the limit.
    pub stderr: Vec<u8>,
    /// Whether stderr was cut (or not complete when collection stopped).
    pub stderr_truncated: bool,
    /// How long it ran.
    pub wall_time: Duration,
    /// The evidence (a `ToolInvoked` event's payload).
    pub evidence: Evidence,
}

impl ExecOutput {
    /// Whether it exited with code 0 in time.
    pub fn success(&self) -> bool {
        self.exit_code == Some(0) && !self.timed_out
    }
}

/// Why a command could not be run.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The authorization does not cover the command.
    #[error(transparent)]
    Refused(Box<AuthorizationError>),
    /// The command itself is not one the adapter runs.
    #[error("command refused: {0}")]
    Spec(String),
    /// It could not be started.
    #[error("{program:?}: cannot start: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Waiting for it failed.
    #[error("{program:?}: {source}")]
    Wait {
        /// The program.
        program: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl From<AuthorizationError> for ExecError {
    fn from(e: AuthorizationError) -> ExecError {
        ExecError::Refused(Box::new(e))
    }
}

/// Run a command an agent requested, under `auth` (`process.exec` on exactly
/// `spec.program`).
pub fn run(auth: &Authorization, spec: &ExecSpec) -> Result<ExecOutput, ExecError> {
    run_until(auth, spec, &AtomicBool::new(false))
}

/// [`run`], stopped early once `stop` is set (the run was killed): the
/// command's process group is killed within [`STOP_POLL`] and the output says so
/// ([`ExecOutput::stopped`]).
pub fn run_until(
    auth: &Authorization,
    spec: &ExecSpec,
    stop: &AtomicBool,
) -> Result<ExecOutput, ExecError> {
    let program = check_spec(spec)?;
    require(auth, "process.exec", &program)?;
    // The grant's constraints can only tighten the spec's limits: its `timeout_ms` bounds the
    // run, its `max_bytes` the output kept (stdout first, then stderr).
    let bounded = ExecSpec {
        timeout: cap_time(auth, spec.timeout),
        max_output_bytes: cap_bytes(auth, 0, spec.max_output_bytes),
        ..spec.clone()
    };
    execute(&bounded, program, Some(auth), "agent", stop)
}

/// Run one of the run spec's validation checks. The operator wrote it; no agent asked for it,
/// so it takes no authorization (the runtime records it under the run's own authority).
pub fn run_check(spec: &ExecSpec) -> Result<ExecOutput, ExecError> {
    let program = check_spec(spec)?;
    execute(spec, program, None, "check", &AtomicBool::new(false))
}

fn check_spec(spec: &ExecSpec) -> Result<Resource, ExecError> {
    let program = Resource::command(&spec.program).map_err(|e| ExecError::Spec(e.to_string()))?;
    if spec.args.len() > MAX_EXEC_ARGS {
        return Err(ExecError::Spec(format!(
            "more than {MAX_EXEC_ARGS} arguments"
        )));
    }
    if let Some(arg) = spec.args.iter().find(|a| a.contains('\0')) {
        return Err(ExecError::Spec(format!("argument {arg:?} contains NUL")));
    }
    if !spec.dir.is_dir() {
        return Err(ExecError::Spec(format!(
            "{} is not a directory",
            spec.dir.display()
        )));
    }
    Ok(program)
}

/// Output captured from one pipe: the bytes kept and how many were read in all.
#[derive(Default)]
struct Capture {
    kept: Vec<u8>,
    total: u64,
}

fn capture(
    mut pipe: impl Read + Send + 'static,
    limit: u64,
) -> (Arc<Mutex<Capture>>, mpsc::Receiver<()>) {
    let shared = Arc::new(Mutex::new(Capture::default()));
    let (tx, rx) = mpsc::channel();
    let out = shared.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            let mut c = out.lock().unwrap_or_else(|p| p.into_inner());
            let room = limit.saturating_sub(c.kept.len() as u64) as usize;
            let keep = room.min(n);
            c.kept.extend_from_slice(&buf[..keep]);
            c.total += n as u64;
        }
        let _ = tx.send(());
    });
    (shared, rx)
}

fn take(capture: &Mutex<Capture>, finished: bool, limit: u64) -> (Vec<u8>, bool) {
    let c = capture.lock().unwrap_or_else(|p| p.into_inner());
    (c.kept.clone(), !finished || c.total > limit)
}

fn execute(
    spec: &ExecSpec,
    program: Resource,
    auth: Option<&Authorization>,
    origin: &'static str,
    stop: &AtomicBool,
) -> Result<ExecOutput, ExecError> {
    let name = spec.program.clone();
    let executable: PathBuf =
        if spec.program.contains('/') && !Path::new(&spec.program).is_absolute() {
            spec.dir.join(&spec.program)
        } else {
            PathBuf::from(&spec.program)
        };
    let mut command = Command::new(&executable);
    command
        .args(&spec.args)
        .current_dir(&spec.dir)
        .env_clear()
        .env("PATH", child_path(std::env::var_os("PATH")))
        .env("HOME", &spec.dir)
        .env(
            "LANG",
            std::env::var_os("LANG").unwrap_or_else(|| "C.UTF-8".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    crate::supervisor::install(&mut command);
    let started = Instant::now();
    let mut child = command.spawn().map_err(|source| ExecError::Spawn {
        program: name.clone(),
        source,
    })?;
    let pid = Pid::from_child(&child);
    let limit = spec.max_output_bytes;
    let (stdout, stdout_done) = match child.stdout.take() {
        Some(pipe) => capture(pipe, limit),
        None => return Err(wait_err(&name, "stdout was not captured")),
    };
    let (stderr, stderr_done) = match child.stderr.take() {
        Some(pipe) => capture(pipe, limit),
        None => return Err(wait_err(&name, "stderr was not captured")),
    };
    // From here every way out ends the command and forgets it.
    crate::children::track_supervisor(child.id());

    // Wait for the supervisor to exit without reaping it, so its pid cannot be reused before
    // the last resort (`kill_hard`) reads its children and kills its group.
    let (exited_tx, exited_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let result = loop {
            match rustix::process::waitid(
                WaitId::Pid(pid),
                WaitIdOptions::EXITED | WaitIdOptions::NOWAIT,
            ) {
                Err(rustix::io::Errno::INTR) => continue,
                other => break other.map(|_| ()),
            }
        };
        let _ = exited_tx.send(result);
    });
    let deadline = started + spec.timeout;
    let (timed_out, stopped) = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match exited_rx.recv_timeout(left.min(STOP_POLL)) {
            Ok(result) => {
                if let Err(e) = result {
                    crate::supervisor::kill_hard(pid);
                    crate::children::untrack(child.id());
                    return Err(ExecError::Wait {
                        program: name.clone(),
                        source: e.into(),
                    });
                }
                break (false, false);
            }
            Err(mpsc::RecvTimeoutError::Timeout) if stop.load(Ordering::SeqCst) => {
                break (false, true);
            }
            Err(mpsc::RecvTimeoutError::Timeout) if !left.is_zero() => {}
            Err(_) => break (true, false),
        }
    };
    // Once the program has exited, the supervisor has killed everything it started. Timed
    // out or stopped, the supervisor kills it and all it started, then exits as the program
    // did (SIGKILL); one that does not, in time, is killed after its children.
    if timed_out || stopped {
        crate::supervisor::end(pid);
        if exited_rx
            .recv_timeout(crate::supervisor::END_GRACE)
            .is_err()
        {
            crate::supervisor::kill_hard(pid);
        }
    }
    crate::children::untrack(child.id());
    let status = child.wait().map_err(|source| ExecError::Wait {
        program: name.clone(),
        source,
    })?;
    let wall_time = started.elapsed();
    let deadline = Instant::now() + OUTPUT_GRACE;
    let stdout_finished = stdout_done
        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        .is_ok();
    let stderr_finished = stderr_done
        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        .is_ok();
    let (stdout, stdout_truncated) = take(&stdout, stdout_finished, limit);
    let (mut stderr, mut stderr_truncated) = take(&stderr, stderr_finished, limit);
    // A grant's `max_bytes` bounds both streams together: stderr gets what stdout left.
    let room = auth.map_or(u64::MAX, |a| cap_bytes(a, stdout.len() as u64, u64::MAX));
    if stderr.len() as u64 > room {
        stderr.truncate(room as usize);
        stderr_truncated = true;
    }

    let mut invocation = vec![spec.program.clone()];
    invocation.extend(spec.args.iter().cloned());
    let invocation = serde_json::to_vec(&invocation).unwrap_or_default();
    let evidence = Evidence {
        // An operator's check is a command like any other: not isolated, so external.
        effect: auth.map_or(EffectClass::External, Authorization::effect),
        capability: "process.exec".into(),
        target: program,
        grant: auth.map(|a| a.grant().to_string()),
        inputs: vec![Digested::of("command", &invocation)],
        outputs: vec![
            Digested::of("stdout", &stdout),
            Digested::of("stderr", &stderr),
        ],
        detail: Detail::Exec {
            program: spec.program.clone(),
            args: spec.args.clone(),
            origin,
            exit_code: status.code(),
            signal: status.signal(),
            timed_out,
            wall_time_ms: u64::try_from(wall_time.as_millis()).unwrap_or(u64::MAX),
            stdout_truncated,
            stderr_truncated,
        },
    };
    Ok(ExecOutput {
        exit_code: status.code(),
        signal: status.signal(),
        timed_out,
        stopped,
        stdout,
        stdout_truncated,
        stderr,
        stderr_truncated,
        wall_time,
        evidence,
    })
}

fn wait_err(program: &str, problem: &str) -> ExecError {
    ExecError::Wait {
        program: program.to_string(),
        source: std::io::Error::other(problem.to_string()),
    }
}
