//! The conformance suite (`ice_log::conformance`) against the embedded SQLite backend.

use std::sync::Arc;

use async_trait::async_trait;
use ice_log::conformance::{Backend, run_all};
use ice_log::sqlite::{Mode, SqliteLog};
use ice_log::{EventLog, LogError};

struct Sqlite {
    dir: tempfile::TempDir,
    next: std::sync::atomic::AtomicU32,
}

#[async_trait]
impl Backend for Sqlite {
    fn name(&self) -> String {
        "sqlite".into()
    }

    fn shared(&self) -> bool {
        false
    }

    async fn fresh(&self) -> Result<(Arc<dyn EventLog>, String), LogError> {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let path = self.dir.path().join(format!("log-{n}.db"));
        let log = SqliteLog::create(&path)?;
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

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_conforms() {
    let backend = Sqlite {
        dir: tempfile::tempdir().unwrap(),
        next: Default::default(),
    };
    if let Err(e) = run_all(&backend).await {
        panic!("{e}");
    }
}
