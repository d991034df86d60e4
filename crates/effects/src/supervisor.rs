//! A command's supervisor: a small process between the runtime and the command, so that
//! nothing the command starts outlives it, whatever process group or session it moves to.
//!
//! [`install`] makes `std::process::Command` fork once more before it executes the program:
//! the first child (the supervisor, the process the runtime waits for) is a child subreaper
//! (`PR_SET_CHILD_SUBREAPER`), so every process the command starts that loses its parent is
//! re-parented to it rather than to init, `setsid` or not; the second child execs the program,
//! in a process group of its own. The supervisor waits until the program exits or it is told
//! to end it (SIGTERM, from [`end`]), then kills the program's group and every process it
//! adopted, until it has no child left, and exits as the program did (its exit code, or the
//! signal that ended it).
//!
//! The supervisor is also told when the runtime thread that started it is gone
//! (`PR_SET_PDEATHSIG`): a runtime killed with SIGKILL leaves no command running. The program
//! is killed when the supervisor is gone, however it went.
//!
//! A set-user-ID or file-capability program loses its death signal at exec (the kernel
//! clears it): such a program outlives a supervisor that is killed, though not one that ends
//! it.
//!
//! The cost: `pre_exec` makes the standard library fork `ice` rather than `posix_spawn` the
//! program, and the supervisor, which never execs, keeps a copy-on-write image of `ice` for as
//! long as the command runs (pages `ice` writes meanwhile are copied once per command
//! running). Where the kernel does not list a process's children
//! (`/proc/thread-self/children`, `CONFIG_PROC_CHILDREN`), only the program's group is killed,
//! as before.
//!
//! Between `fork` and `exec` only async-signal-safe calls may be made (the runtime has other
//! threads, whose locks the child inherits held). The supervisor never returns to Rust's
//! standard library: it makes raw system calls, allocates nothing, and leaves with `_exit`. It
//! forks with a bare `clone` (no `pthread_atfork` handler runs).
//!
//! What it cannot stop: a process that leaves through something else that starts processes
//! for it (a service manager, `at`, a container engine); that is not a confinement (see
//! [`crate::exec`]).

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

/// How long the supervisor takes at most to kill what the command left, once asked: past
/// it, the runtime kills the supervisor's group itself ([`end`]).
pub(crate) const END_GRACE: Duration = Duration::from_secs(5);

/// Start `command` under a supervisor (see the module). The pid `spawn` returns is the
/// supervisor's; its exit status is the program's.
pub(crate) fn install(command: &mut Command) {
    // SAFETY: the closure runs in the child between fork and exec and makes only
    // async-signal-safe system calls (see `supervise`).
    // Taken here: a child that asks after the fork gets init's pid if `ice` is gone already.
    let runtime = std::process::id() as libc::pid_t;
    unsafe {
        command.pre_exec(move || supervise(runtime));
    }
}

/// Ask the supervisor `pid` to end its command (it kills the program and everything it
/// started). Returns at once.
pub(crate) fn end(pid: rustix::process::Pid) {
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
}

/// The last resort, for a supervisor that did not end its command in time: SIGKILL each of
/// its children (the program, with its group, and the processes it adopted), then its own
/// group. A process that left the program's group and still has a parent other than the
/// supervisor is missed.
pub(crate) fn kill_hard(pid: rustix::process::Pid) {
    let raw = pid.as_raw_nonzero().get();
    let children =
        std::fs::read_to_string(format!("/proc/{raw}/task/{raw}/children")).unwrap_or_default();
    for child in children
        .split_ascii_whitespace()
        .filter_map(|c| c.parse::<i32>().ok())
        .filter_map(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process_group(child, rustix::process::Signal::KILL);
        let _ = rustix::process::kill_process(child, rustix::process::Signal::KILL);
    }
    let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
}

/// In the forked child: become the supervisor, fork the program, and supervise it. Returns
/// only in the program's process (which then execs) or with an error before it exists.
///
/// # Safety
/// Called only between fork and exec (`pre_exec`).
unsafe fn supervise(runtime: libc::pid_t) -> io::Result<()> {
    // SAFETY: each call below is a plain system call on values owned here.
    unsafe {
        if libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0
            || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0) != 0
        {
            return Err(io::Error::last_os_error());
        }
        // SIGCHLD and the signals that end the command (SIGTERM, and the terminal's, should
        // anyone send them) are taken with sigwaitinfo, never by a handler or their default
        // action: blocked before the program exists, so none is lost.
        let mut waited: libc::sigset_t = std::mem::zeroed();
        let mut before: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut waited);
        for signal in [
            libc::SIGCHLD,
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGHUP,
            libc::SIGQUIT,
        ] {
            libc::sigaddset(&mut waited, signal);
        }
        if libc::sigprocmask(libc::SIG_BLOCK, &waited, &mut before) != 0 {
            return Err(io::Error::last_os_error());
        }
        let supervisor = libc::getpid();
        // A bare fork: `clone` with no flags but the exit signal runs no atfork handler.
        let program = libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_long, 0, 0, 0, 0);
        if program < 0 {
            return Err(io::Error::last_os_error());
        }
        if program == 0 {
            // The program: killed if its supervisor dies, however it dies (the OOM killer, a
            // stray SIGKILL), in a process group of its own (the supervisor's is its own),
            // with the signal mask it was started with.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != supervisor {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            libc::sigprocmask(libc::SIG_SETMASK, &before, std::ptr::null_mut());
            if libc::setpgid(0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            return Ok(());
        }
        run(program as libc::pid_t, runtime, &waited)
    }
}

/// The supervisor proper. Never returns.
unsafe fn run(program: libc::pid_t, runtime: libc::pid_t, waited: &libc::sigset_t) -> ! {
    // SAFETY: plain system calls on values owned here.
    unsafe {
        // Its copies of the command's pipes (and of the standard library's pipe that reports
        // a failed exec) would hold them open: the program and what it starts have theirs.
        close_all();
        // The runtime may have died before the death signal was set.
        let mut asked = libc::getppid() != runtime;
        // Until the program has exited (left unreaped, so that neither its pid nor its group's
        // id can be taken by a new process before the group is killed) or the supervisor is
        // asked to end it; processes adopted meanwhile are reaped as they end.
        while !exited(program) {
            reap_others(program);
            if asked {
                break;
            }
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let signal = libc::sigwaitinfo(waited, &mut info);
            if signal > 0 && signal != libc::SIGCHLD {
                asked = true;
            }
        }
        // What the command left: the program's group, the program itself if it moved, then
        // every process adopted, as each is re-parented here, until none is left.
        libc::kill(-program, libc::SIGKILL);
        libc::kill(program, libc::SIGKILL);
        let mut status: Option<libc::c_int> = None;
        // 2 ms at a time, for at most END_GRACE less a margin; where the kernel does not list
        // a process's children, 100 ms for the group to go.
        for round in 0..2000 {
            let listed = kill_children();
            if reap(program, &mut status) || (!listed && round >= 50 && status.is_some()) {
                break;
            }
            let pause = libc::timespec {
                tv_sec: 0,
                tv_nsec: 2_000_000,
            };
            libc::nanosleep(&pause, std::ptr::null_mut());
        }
        leave_as(status)
    }
}

/// Whether the program has exited (not reaping it).
unsafe fn exited(program: libc::pid_t) -> bool {
    // SAFETY: waitid on this process's own child, into a value on the stack.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        libc::waitid(
            libc::P_PID,
            program as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        ) == 0
            && info.si_pid() == program
    }
}

/// Reap the children that have ended, up to the program if it has (it is left unreaped).
unsafe fn reap_others(program: libc::pid_t) {
    // SAFETY: waitid and waitpid on this process's own children.
    unsafe {
        loop {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            if libc::waitid(
                libc::P_ALL,
                0,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            ) != 0
            {
                return;
            }
            let pid = info.si_pid();
            if pid == 0 || pid == program {
                return;
            }
            let mut st: libc::c_int = 0;
            libc::waitpid(pid, &mut st, libc::WNOHANG);
        }
    }
}

/// Reap every child that has ended (`status` takes the program's). `true` once there is no
/// child left.
unsafe fn reap(program: libc::pid_t, status: &mut Option<libc::c_int>) -> bool {
    // SAFETY: waitpid on this process's own children.
    unsafe {
        loop {
            let mut st: libc::c_int = 0;
            match libc::waitpid(-1, &mut st, libc::WNOHANG) {
                0 => return false,
                p if p == program => *status = Some(st),
                p if p > 0 => {}
                _ => return io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD),
            }
        }
    }
}

/// SIGKILL every child this process has (`/proc/thread-self/children`: the supervisor has one
/// thread). `false` where the kernel does not list a process's children (then only the
/// program's group was killed).
unsafe fn kill_children() -> bool {
    // SAFETY: open/read/close of a proc file into a buffer on the stack.
    unsafe {
        let fd = libc::open(
            c"/proc/thread-self/children".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        );
        if fd < 0 {
            return false;
        }
        let mut buf = [0u8; 4096];
        let mut pid: libc::pid_t = 0;
        let mut digits = false;
        loop {
            let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
            if n <= 0 {
                break;
            }
            for &b in &buf[..n as usize] {
                if b.is_ascii_digit() {
                    pid = pid
                        .saturating_mul(10)
                        .saturating_add((b - b'0') as libc::pid_t);
                    digits = true;
                } else {
                    if digits && pid > 0 {
                        libc::kill(pid, libc::SIGKILL);
                    }
                    pid = 0;
                    digits = false;
                }
            }
        }
        if digits && pid > 0 {
            libc::kill(pid, libc::SIGKILL);
        }
        libc::close(fd);
        true
    }
}

/// Close every open file descriptor.
unsafe fn close_all() {
    // SAFETY: closing descriptors this process no longer uses.
    unsafe {
        if libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32) != 0 {
            for fd in 0..65536 {
                libc::close(fd);
            }
        }
    }
}

/// Exit as the program did: its exit code, or the signal that ended it (raised on this
/// process, without a core dump). A program not reaped in time was killed: SIGKILL.
unsafe fn leave_as(status: Option<libc::c_int>) -> ! {
    // SAFETY: plain system calls; `_exit` does not return.
    unsafe {
        let signal = match status {
            Some(st) if libc::WIFEXITED(st) => libc::_exit(libc::WEXITSTATUS(st)),
            Some(st) if libc::WIFSIGNALED(st) => libc::WTERMSIG(st),
            _ => libc::SIGKILL,
        };
        let none = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &none);
        // Nor through a core-dump helper (which ignores the limit): the program's crash is
        // not the runtime's.
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        libc::signal(signal, libc::SIG_DFL);
        let mut only: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut only);
        libc::sigaddset(&mut only, signal);
        libc::sigprocmask(libc::SIG_UNBLOCK, &only, std::ptr::null_mut());
        libc::kill(libc::getpid(), signal);
        libc::_exit(128 + signal)
    }
}
