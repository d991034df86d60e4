//! The processes this process started (stdio tool servers, commands) that still run: each
//! leads a group of its own (so a terminal's Ctrl-C does not reach it), so nothing ends them
//! when this process exits at once. [`kill_child_processes`] does.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

/// How a tracked process is ended.
#[derive(Clone, Copy)]
enum Kind {
    /// A process group led by the pid: SIGKILL to the group.
    Group,
    /// A command's supervisor ([`crate::supervisor`]): SIGTERM to it, and it kills the command
    /// and everything the command started.
    Supervisor,
}

static LIVE: Mutex<BTreeMap<u32, Kind>> = Mutex::new(BTreeMap::new());

fn live() -> std::sync::MutexGuard<'static, BTreeMap<u32, Kind>> {
    LIVE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Note a process group this process started, led by `pid`.
pub(crate) fn track_group(pid: u32) {
    live().insert(pid, Kind::Group);
}

/// Note a command's supervisor this process started.
pub(crate) fn track_supervisor(pid: u32) {
    live().insert(pid, Kind::Supervisor);
}

/// Forget a process once it is killed or gone.
pub(crate) fn untrack(pid: u32) {
    live().remove(&pid);
}

/// Kill every stdio tool server and every command this process started that still runs,
/// with whatever each started. For a process about to exit at once (`std::process::exit`, a
/// second signal): no destructor runs then, and those processes would outlive it.
pub fn kill_child_processes() {
    for (pid, kind) in std::mem::take(&mut *live()) {
        let Some(pid) = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        else {
            continue;
        };
        match kind {
            Kind::Group => {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
            Kind::Supervisor => crate::supervisor::end(pid),
        }
    }
}
