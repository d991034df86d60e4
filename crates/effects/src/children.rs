//! The process groups this process started (stdio tool servers, commands) that still run:
//! each leads a group of its own (so a terminal's Ctrl-C does not reach it), so nothing ends
//! them when this process exits at once. [`kill_child_processes`] does.

use std::collections::BTreeSet;
use std::sync::{Mutex, PoisonError};

static LIVE_GROUPS: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

fn groups() -> std::sync::MutexGuard<'static, BTreeSet<u32>> {
    LIVE_GROUPS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Note a process group this process started, led by `pid`.
pub(crate) fn track_group(pid: u32) {
    groups().insert(pid);
}

/// Forget a process group once it is killed or gone.
pub(crate) fn untrack_group(pid: u32) {
    groups().remove(&pid);
}

/// Kill every stdio tool server and every command this process started that still runs,
/// with whatever each started in its process group. For a process about to exit at once
/// (`std::process::exit`, a second signal): no destructor runs then, and those processes would
/// outlive it.
pub fn kill_child_processes() {
    for pid in std::mem::take(&mut *groups()) {
        if let Some(pid) = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
    }
}
