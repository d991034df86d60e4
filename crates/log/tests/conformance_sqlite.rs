//! The conformance suite (`ice_log::conformance`) against the embedded SQLite backend.

use std::sync::Arc;

use async_trait::async_trait;
use ice_log::conformance::{Backend, run_all};
use ice_log::sqlite::{Mode, SqliteLog};
use ice_log::{EventLog, LogError};

struct Sqlite {
    dir: tempfile::TempDir,
    next: std::sync::atomic::AtomicU32,
    /// The tree floor of new logs; `None` for the default.
    floor: Option<u8>,
}

#[async_trait]
impl Backend for Sqlite {
    fn name(&self) -> String {
        match self.floor {
            None => "sqlite".into(),
            Some(f) => format!("sqlite (tree floor {f})"),
        }
    }

    fn shared(&self) -> bool {
        false
    }

    async fn fresh(&self) -> Result<(Arc<dyn EventLog>, String), LogError> {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let path = self.dir.path().join(format!("log-{n}.db"));
        let log = match self.floor {
            None => SqliteLog::create(&path)?,
            Some(f) => SqliteLog::create_with_tree_floor(&path, f)?,
        };
        Ok((Arc::new(log), path.display().to_string()))
    }

    async fn reopen(&self, locator: &str) -> Result<Arc<dyn EventLog>, LogError> {
        Ok(Arc::new(SqliteLog::open(
            std::path::Path::new(locator),
            Mode::ReadWrite,
        )?))
    }

    async fn destroy(&self, locator: &str) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{locator}{suffix}"));
        }
    }
}

/// The default layout (no node below level 8 stored: the suite's small logs compute every
/// node they prove with), every node stored (as `ice-log/1` did), and a floor of 2 (some
/// nodes stored, some computed, in the same proof).
#[tokio::test(flavor = "multi_thread")]
async fn sqlite_conforms() {
    for floor in [None, Some(0), Some(2)] {
        let backend = Sqlite {
            dir: tempfile::tempdir().unwrap(),
            next: Default::default(),
            floor,
        };
        if let Err(e) = run_all(&backend).await {
            panic!("{e}");
        }
    }
}
