//! `ice bench backends`: durable appends per second and verification speed on each log
//! backend, beside the embedded SQLite log, measured in the same run.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use ice_log::EventLog;
use serde_json::{Value, json};

use crate::bench::{append_rate, fill_log};

const APPENDS: u64 = 2000;
const VERIFY_EVENTS: u64 = 20_000;

enum Kind {
    Sqlite,
    Postgres,
    Nats,
}

struct Made {
    log: Arc<dyn EventLog>,
    name: String,
}

fn tag() -> String {
    let mut b = [0u8; 4];
    let _ = getrandom::fill(&mut b);
    hex::encode(b)
}

async fn make(kind: &Kind, dir: &Path, pg: &str, nats: &str, n: usize) -> Result<Made> {
    let name = format!("icebench_{}_{n}", tag());
    Ok(match kind {
        Kind::Sqlite => Made {
            log: Arc::new(ice_log::sqlite::SqliteLog::create(
                &dir.join(format!("{name}.db")),
            )?),
            name,
        },
        Kind::Postgres => Made {
            log: Arc::new(
                ice_log::postgres::PgLog::connect(pg, Some(&name))
                    .await
                    .with_context(|| format!("PostgreSQL at {pg}"))?,
            ),
            name,
        },
        Kind::Nats => Made {
            log: Arc::new(
                ice_log::nats::NatsLog::connect(nats, &name)
                    .await
                    .with_context(|| format!("NATS at {nats}"))?,
            ),
            name,
        },
    })
}

async fn remove(kind: &Kind, made: Made, dir: &Path, pg: &str, nats: &str) {
    drop(made.log);
    match kind {
        Kind::Sqlite => {
            for s in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(dir.join(format!("{}.db{s}", made.name)));
            }
        }
        Kind::Postgres => {
            if let Ok((c, conn)) = tokio_postgres::connect(pg, tokio_postgres::NoTls).await {
                tokio::spawn(conn);
                let _ = c
                    .batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", made.name))
                    .await;
            }
        }
        Kind::Nats => {
            let _ = ice_log::nats::destroy(nats, &made.name).await;
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Every figure, each backend beside the embedded one.
pub async fn measure(
    dir: &Path,
    pg: &str,
    nats: &str,
    repeat: usize,
    say: &dyn Fn(String),
) -> Result<Value> {
    let mut out = serde_json::Map::new();
    let mut base: Option<(f64, f64, f64)> = None;
    for (label, kind) in [
        ("embedded SQLite", Kind::Sqlite),
        ("PostgreSQL", Kind::Postgres),
        ("NATS JetStream", Kind::Nats),
    ] {
        let (mut one, mut many, mut ver) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..repeat {
            let m = make(&kind, dir, pg, nats, r * 3).await?;
            one.push(append_rate(m.log.clone(), 1, APPENDS).await?);
            remove(&kind, m, dir, pg, nats).await;
            let m = make(&kind, dir, pg, nats, r * 3 + 1).await?;
            many.push(append_rate(m.log.clone(), 16, APPENDS * 2).await?);
            remove(&kind, m, dir, pg, nats).await;
            let m = make(&kind, dir, pg, nats, r * 3 + 2).await?;
            fill_log(m.log.clone(), VERIFY_EVENTS).await?;
            let t = Instant::now();
            let report = ice_log::verify::verify(m.log.as_ref(), None, |_| {}).await?;
            anyhow::ensure!(
                report.ok(),
                "{label}: the bench log does not verify: {:?}",
                report.failure
            );
            ver.push(report.events as f64 / t.elapsed().as_secs_f64());
            remove(&kind, m, dir, pg, nats).await;
        }
        let (o, m, v) = (median(one), median(many), median(ver));
        let (bo, bm, bv) = *base.get_or_insert((o, m, v));
        say(format!(
            "{label:<16} durable appends: {o:>8.0} ev/s with 1 appender ({:.2}× embedded), {m:>8.0} ev/s with 16 ({:.2}×) | verify {VERIFY_EVENTS} events: {v:>9.0} ev/s ({:.2}×)",
            o / bo,
            m / bm,
            v / bv
        ));
        out.insert(
            label.to_string(),
            json!({"append_1_per_s": o, "append_16_per_s": m, "verify_per_s": v,
                   "ratio_to_embedded": {"append_1": o / bo, "append_16": m / bm, "verify": v / bv}}),
        );
    }
    Ok(Value::Object(out))
}
