//! The conformance suite (`ice_log::conformance`) against PostgreSQL (the machine's server at
//! 127.0.0.1:5432, database `test`, or ICE_TEST_POSTGRES_URL). Each case gets its own schema
//! and drops it; `fresh` creates the log with `PgLog::connect`, `reopen` opens it with
//! `PgLog::connect_existing`.

use std::sync::Arc;

use async_trait::async_trait;
use ice_log::conformance::{Backend, run_all};
use ice_log::postgres::PgLog;
use ice_log::{EventLog, LogError};

struct Postgres {
    url: String,
    tag: String,
    next: std::sync::atomic::AtomicU32,
}

#[async_trait]
impl Backend for Postgres {
    fn name(&self) -> String {
        "postgres".into()
    }

    fn shared(&self) -> bool {
        true
    }

    async fn fresh(&self) -> Result<(Arc<dyn EventLog>, String), LogError> {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let schema = format!("iceconf_{}_{n}", self.tag);
        let log = PgLog::connect(&self.url, Some(&schema)).await?;
        Ok((Arc::new(log), schema))
    }

    /// Another node opens the log as a reader would: only if it is there (so every case also
    /// checks that `connect_existing` opens what `connect` made).
    async fn reopen(&self, schema: &str) -> Result<Arc<dyn EventLog>, LogError> {
        Ok(Arc::new(
            PgLog::connect_existing(&self.url, Some(schema)).await?,
        ))
    }

    async fn destroy(&self, schema: &str) {
        if let Ok((client, conn)) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls).await
        {
            tokio::spawn(conn);
            let _ = client
                .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_conforms() {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).unwrap();
    let backend = Postgres {
        url: std::env::var("ICE_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into()),
        tag: hex::encode(b),
        next: Default::default(),
    };
    if let Err(e) = run_all(&backend).await {
        panic!("{e}");
    }
}
