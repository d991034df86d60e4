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
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ice_kernel::{Clock, RunId};
use ice_log::{EventLog, LogError};

/// How long a claim lasts unless renewed (default; `ICE_CLAIM_TTL_MS` overrides it, for tests
/// and for operators who want faster takeover of a dead node's runs).
pub const CLAIM_TTL: Duration = Duration::from_secs(15);

/// The claim lifetime in force.
pub fn claim_ttl() -> Duration {
    std::env::var("ICE_CLAIM_TTL_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|ms| (300..=3_600_000).contains(ms))
        .map(Duration::from_millis)
        .unwrap_or(CLAIM_TTL)
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
        let every = claim_ttl();
        let ttl = every.as_millis() as i64;
        let now = unix_ms(clock.as_ref());
        match log.claim_run(run, holder, now, now + ttl).await {
            Ok(()) => {}
            Err(e @ LogError::Claimed { .. }) => return Err(LockError::Claimed(e)),
            Err(e) => return Err(LockError::Io(format!("claiming run {run}: {e}"))),
        }
        let lost = Arc::new(AtomicBool::new(false));
        let renew = {
            let (log, run, holder, lost) =
                (log.clone(), run.clone(), holder.to_string(), lost.clone());
            tokio::spawn(async move {
                let mut last_ok = now;
                loop {
                    tokio::time::sleep(every / 3).await;
                    let now = unix_ms(clock.as_ref());
                    match log.claim_run(&run, &holder, now, now + ttl).await {
                        Ok(()) => last_ok = now,
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
            log,
            run: run.clone(),
            holder: holder.to_string(),
        });
        Ok(lock)
    }

    /// Whether this node lost the run's claim (another node may be driving it now).
    pub fn lost(&self) -> bool {
        self.claim
            .as_ref()
            .is_some_and(|c| c.lost.load(Ordering::SeqCst))
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
