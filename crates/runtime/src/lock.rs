//! One process at a time drives a run: it holds `<home>/runs/<run>/lock` (an advisory file
//! lock the operating system releases when the process dies, so a crashed run's lock is free).

use std::fs::{File, OpenOptions, TryLockError};
use std::path::Path;

/// A held run lock; released when dropped.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
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
            Ok(()) => Ok(Some(RunLock { _file: file })),
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(e)) => Err(e),
        }
    }
}
