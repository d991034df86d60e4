//! One writer drives a run at a time.
//!
//! - On one machine: `<home>/runs/<run>/lock`, an advisory file lock the operating system
//!   releases when the process dies, so a crashed run's lock is free.
//! - Across ICE nodes sharing a log (PostgreSQL, NATS JetStream): a claim in the log itself
//!   (`EventLog::claim_run`), held for [`CLAIM_TTL`] and renewed every third of it while the run
//!   is driven. Another node's claim attempt is refused while it is live; a node that dies
//!   stops renewing, so its runs can be taken over (and recovered) once the claim lapses. A
//!   node that could not renew in time has lost the run: its appends are refused from then on.
//!   The embedded backend grants every claim (the file lock does the job).

use std::fs::{File, OpenOptions, TryLockError};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use ice_kernel::{Clock, RunId};
use ice_log::{EventLog, LogError};

/// How long a claim lasts unless renewed (default; `ICE_CLAIM_TTL_MS` overrides it, for tests
/// and for operators who want faster takeover of a dead node's runs).
pub const CLAIM_TTL: Duration = Duration::from_secs(15);

/// The environment variable that sets the claim lifetime, in milliseconds.
pub const CLAIM_TTL_VAR: &str = "ICE_CLAIM_TTL_MS";

/// The shortest and the longest claim lifetime `ICE_CLAIM_TTL_MS` may set, in milliseconds.
/// Below 300 ms a renewal (every third of the lifetime) competes with the log's own latency;
/// above an hour a dead node's runs wait too long to be taken over.
pub const CLAIM_TTL_RANGE_MS: std::ops::RangeInclusive<u64> = 300..=3_600_000;

/// The claim lifetime `value` (of `ICE_CLAIM_TTL_MS`) sets: unset or empty, [`CLAIM_TTL`];
/// otherwise a whole number of milliseconds within [`CLAIM_TTL_RANGE_MS`]. Anything else is
/// refused with the variable, the value and what is wrong, never replaced by the default: a
/// node that quietly used another lifetime than its operator set would renew, or take over
/// other nodes' runs, on another schedule than the one they believe in.
pub fn parse_claim_ttl(value: Option<&std::ffi::OsStr>) -> Result<Duration, String> {
    let Some(raw) = value.filter(|v| !v.is_empty()) else {
        return Ok(CLAIM_TTL);
    };
    let (lo, hi) = (CLAIM_TTL_RANGE_MS.start(), CLAIM_TTL_RANGE_MS.end());
    let want = format!(
        "give a whole number of milliseconds from {lo} to {hi} (default {}), or unset it",
        CLAIM_TTL.as_millis()
    );
    let Some(text) = raw.to_str() else {
        return Err(format!(
            "{CLAIM_TTL_VAR}={raw:?} is not valid UTF-8; {want}"
        ));
    };
    match text.parse::<u64>() {
        Ok(ms) if CLAIM_TTL_RANGE_MS.contains(&ms) => Ok(Duration::from_millis(ms)),
        Ok(ms) => Err(format!(
            "{CLAIM_TTL_VAR}={text:?}: a claim lifetime of {ms} ms is out of range; {want}"
        )),
        Err(_) if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) => Err(format!(
            "{CLAIM_TTL_VAR}={text:?}: a claim lifetime of {text} ms is out of range; {want}"
        )),
        Err(_) => Err(format!(
            "{CLAIM_TTL_VAR}={text:?} is not a whole number of milliseconds; {want}"
        )),
    }
}

/// The claim lifetime the environment sets ([`parse_claim_ttl`] of `ICE_CLAIM_TTL_MS`); an
/// error for a bad value. ICE's commands check it when they open the runtime, and
/// [`RunLock::take`] refuses to lock a run under a bad one.
pub fn claim_ttl_setting() -> Result<Duration, String> {
    parse_claim_ttl(std::env::var_os(CLAIM_TTL_VAR).as_deref())
}

/// The claim lifetime in force, for a caller that has already checked
/// [`claim_ttl_setting`] (as every command does before it opens the runtime): a bad value
/// gives [`CLAIM_TTL`] here, but no run is locked, and so nothing is driven, under it.
pub fn claim_ttl() -> Duration {
    claim_ttl_setting().unwrap_or(CLAIM_TTL)
}

/// A held run lock (file lock and, on a shared log, the run's claim); released when dropped.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
    claim: Option<Claim>,
}

struct Claim {
    renew: tokio::task::JoinHandle<()>,
    lost: Arc<AtomicBool>,
    /// When the claim was last taken or renewed (unix ms), where claims lapse: past that plus
    /// the lifetime, another node may have taken the run (and released it since), so the run is
    /// lost whatever a later renewal says (a node paused longer than the lifetime, say).
    lapses: Option<(Arc<AtomicI64>, i64, Arc<dyn Clock>)>,
    log: Arc<dyn EventLog>,
    run: RunId,
    holder: String,
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claim")
            .field("run", &self.run)
            .field("holder", &self.holder)
            .field("lost", &self.lost.load(Ordering::SeqCst))
            .finish()
    }
}

/// Why a run could not be locked.
#[derive(Debug)]
pub enum LockError {
    /// Another process on this machine drives it.
    Busy,
    /// Another node's claim is live.
    Claimed(LogError),
    /// The lock file or the log failed.
    Io(String),
}

fn unix_ms(clock: &dyn Clock) -> i64 {
    clock.now().unix_us() / 1000
}

impl RunLock {
    /// Take the lock of the run whose directory is `dir` (created if missing), or `Ok(None)` if
    /// another process holds it.
    pub fn try_take(dir: &Path) -> std::io::Result<Option<RunLock>> {
        std::fs::create_dir_all(dir)?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(RunLock {
                _file: file,
                claim: None,
            })),
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(e)) => Err(e),
        }
    }

    /// Whether a process on this machine holds the run's file lock in `dir` (it drives the
    /// run), found without taking it: a shared lock is tried on the lock file and let go at
    /// once. `Some(false)` where there is no lock file (nothing here ever drove the run);
    /// `None` where the file cannot be read.
    pub fn held(dir: &Path) -> Option<bool> {
        let file = match std::fs::File::open(dir.join("lock")) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Some(false),
            Err(_) => return None,
        };
        match file.try_lock_shared() {
            Ok(()) => Some(false),
            Err(TryLockError::WouldBlock) => Some(true),
            Err(TryLockError::Error(_)) => None,
        }
    }

    /// Take the file lock, then claim the run in the log for `holder` and keep renewing the
    /// claim while the lock is held.
    pub async fn take(
        dir: &Path,
        log: Arc<dyn EventLog>,
        clock: Arc<dyn Clock>,
        run: &RunId,
        holder: &str,
    ) -> Result<RunLock, LockError> {
        let mut lock = match RunLock::try_take(dir) {
            Ok(Some(l)) => l,
            Ok(None) => return Err(LockError::Busy),
            Err(e) => return Err(LockError::Io(format!("{}: {e}", dir.display()))),
        };
        let every = claim_ttl_setting().map_err(LockError::Io)?;
        let ttl = every.as_millis() as i64;
        let now = unix_ms(clock.as_ref());
        match log.claim_run(run, holder, now, now + ttl).await {
            Ok(()) => {}
            Err(e @ LogError::Claimed { .. }) => return Err(LockError::Claimed(e)),
            Err(e) => return Err(LockError::Io(format!("claiming run {run}: {e}"))),
        }
        let lost = Arc::new(AtomicBool::new(false));
        let renewed = Arc::new(AtomicI64::new(now));
        let lapses = log
            .claims_lapse()
            .then(|| (renewed.clone(), ttl, clock.clone()));
        let renew = {
            let (log, run, holder, lost) =
                (log.clone(), run.clone(), holder.to_string(), lost.clone());
            let lapse = lapses.is_some();
            tokio::spawn(async move {
                let mut last_ok = now;
                loop {
                    tokio::time::sleep(every / 3).await;
                    let now = unix_ms(clock.as_ref());
                    // Not renewed within its lifetime: the claim lapsed, and another node may
                    // have driven the run meanwhile. Taking it again would make two writers.
                    if lapse && now - last_ok >= ttl {
                        lost.store(true, Ordering::SeqCst);
                        return;
                    }
                    match log.claim_run(&run, &holder, now, now + ttl).await {
                        Ok(()) => {
                            last_ok = now;
                            renewed.store(now, Ordering::SeqCst);
                        }
                        Err(LogError::Claimed { .. }) => {
                            lost.store(true, Ordering::SeqCst);
                            return;
                        }
                        // The log is unreachable: keep trying until the claim would lapse.
                        Err(_) if now - last_ok < ttl => {}
                        Err(_) => {
                            lost.store(true, Ordering::SeqCst);
                            return;
                        }
                    }
                }
            })
        };
        lock.claim = Some(Claim {
            renew,
            lost,
            lapses,
            log,
            run: run.clone(),
            holder: holder.to_string(),
        });
        Ok(lock)
    }

    /// Whether this node lost the run's claim (another node may be driving it now).
    pub fn lost(&self) -> bool {
        self.claim.as_ref().is_some_and(|c| {
            if c.lost.load(Ordering::SeqCst) {
                return true;
            }
            // Checked here too, not only by the renewal: a node that wakes from a pause may
            // append before its renewal task runs.
            let lapsed = c.lapses.as_ref().is_some_and(|(renewed, ttl, clock)| {
                unix_ms(clock.as_ref()) - renewed.load(Ordering::SeqCst) >= *ttl
            });
            if lapsed {
                c.lost.store(true, Ordering::SeqCst);
            }
            lapsed
        })
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.renew.abort();
        if self.lost.load(Ordering::SeqCst) {
            return;
        }
        let (log, run, holder) = (self.log.clone(), self.run.clone(), self.holder.clone());
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.spawn(async move {
                let _ = log.release_run(&run, &holder).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn a_claim_lifetime_is_a_whole_number_of_milliseconds_in_range_or_refused() {
        let ttl = |v: &str| parse_claim_ttl(Some(OsStr::new(v)));
        assert_eq!(parse_claim_ttl(None), Ok(CLAIM_TTL));
        assert_eq!(ttl(""), Ok(CLAIM_TTL), "empty is unset");
        assert_eq!(ttl("300"), Ok(Duration::from_millis(300)));
        assert_eq!(ttl("1500"), Ok(Duration::from_millis(1500)));
        assert_eq!(ttl("3600000"), Ok(Duration::from_secs(3600)));
        for (bad, why) in [
            ("abc", "is not a whole number of milliseconds"),
            ("-5", "is not a whole number of milliseconds"),
            ("1.5", "is not a whole number of milliseconds"),
            ("15s", "is not a whole number of milliseconds"),
            (" 1500", "is not a whole number of milliseconds"),
            ("0", "a claim lifetime of 0 ms is out of range"),
            ("299", "of 299 ms is out of range"),
            ("3600001", "of 3600001 ms is out of range"),
            (
                "99999999999999999999999",
                "of 99999999999999999999999 ms is out of range",
            ),
        ] {
            let e = ttl(bad).unwrap_err();
            assert!(
                e.starts_with(&format!("ICE_CLAIM_TTL_MS={bad:?}")),
                "{bad:?}: {e}"
            );
            assert!(e.contains(why), "{bad:?}: {e}");
            assert!(e.contains("from 300 to 3600000 (default 15000)"), "{e}");
        }
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStrExt;
            let e = parse_claim_ttl(Some(OsStr::from_bytes(b"\xff"))).unwrap_err();
            assert!(e.contains("not valid UTF-8"), "{e}");
        }
    }
}
