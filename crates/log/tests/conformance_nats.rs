//! The conformance suite (`ice_log::conformance`) against NATS JetStream (the machine's server
//! at 127.0.0.1:4222, or ICE_TEST_NATS_URL). Each case gets its own prefix and removes it;
//! `fresh` creates the log with `NatsLog::connect`, `reopen` opens it with
//! `NatsLog::connect_existing`.

use std::sync::Arc;

use async_trait::async_trait;
use ice_log::conformance::{Backend, run_all};
use ice_log::nats::NatsLog;
use ice_log::{EventLog, LogError};

struct Nats {
    url: String,
    tag: String,
    next: std::sync::atomic::AtomicU32,
}

#[async_trait]
impl Backend for Nats {
    fn name(&self) -> String {
        format!("nats ({})", self.url)
    }

    fn shared(&self) -> bool {
        true
    }

    async fn fresh(&self) -> Result<(Arc<dyn EventLog>, String), LogError> {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let prefix = format!("iceconf_{}_{n}", self.tag);
        let log = NatsLog::connect(&self.url, &prefix).await?;
        Ok((Arc::new(log), prefix))
    }

    /// Another node opens the log as a reader would: only if it exists (so every case also
    /// checks that `connect_existing` finds what `connect` made).
    async fn reopen(&self, prefix: &str) -> Result<Arc<dyn EventLog>, LogError> {
        Ok(Arc::new(
            NatsLog::connect_existing(&self.url, prefix).await?,
        ))
    }

    async fn destroy(&self, prefix: &str) {
        let _ = ice_log::nats::destroy(&self.url, prefix).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_conforms() {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).unwrap();
    let backend = Nats {
        url: std::env::var("ICE_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into()),
        tag: hex::encode(b),
        next: Default::default(),
    };
    if let Err(e) = run_all(&backend).await {
        panic!("{e}");
    }
}
