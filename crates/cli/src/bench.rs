//! `ice bench`: ICE's speed, each figure beside a baseline measured in the same run.
//!
//! - durable append through the validator and group commit, vs raw SQLite inserts of the same
//!   rows (same bytes, WAL, `synchronous=FULL`), at 1 and at N concurrent appenders;
//! - verify and replay rate, vs a raw read-and-hash of the same rows, and per CPU-second;
//! - verify's peak memory on a log and on one four times longer (it must stay flat).
//!
//! Every figure is the median of `--repeat` measurements.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use ice_kernel::{Clock, Draft, Origin, RunId, Timestamp};
use ice_log::EventLog;
use ice_log::ledger::Ledger;
use ice_log::sqlite::{Mode, SqliteLog};
use rusqlite::{Connection, params};
use serde_json::json;

#[derive(Args, Clone)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(value_enum, default_value = "all")]
    what: What,
    /// Durable appends per measurement.
    #[arg(long, default_value_t = 2000)]
    appends: u64,
    /// Concurrent appenders to measure (besides 1).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Events in the log for the verify and replay measurements.
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// Measurements per figure (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Working directory (default: a temporary one, removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print the figures as JSON.
    #[arg(long)]
    json: bool,
    /// The MCP tool server for `ice bench mcp` (program and arguments; its `echo` tool is
    /// called), e.g. "node .deps/node/node_modules/@modelcontextprotocol/server-everything/dist/index.js stdio".
    #[arg(long, value_name = "COMMAND")]
    mcp_server: Option<String>,
    /// PostgreSQL for `ice bench backends` (a schema of its own is made and dropped).
    #[arg(
        long,
        value_name = "URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    postgres: String,
    /// NATS JetStream for `ice bench backends` (a prefix of its own is made and removed).
    #[arg(long, value_name = "URL", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// MCP tool calls per measurement.
    #[arg(long, default_value_t = 1000)]
    mcp_calls: usize,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
enum What {
    All,
    Append,
    Verify,
    Memory,
    Governed,
    /// The MCP gateway's added latency (needs --mcp-server).
    Mcp,
    /// Appends and verification on each log backend (embedded, PostgreSQL, NATS JetStream).
    Backends,
    /// Running a command (`true`) as `process.exec` does, under its supervisor.
    Exec,
}

/// A deterministic clock: one microsecond per reading.
struct TickClock(AtomicI64);

impl Clock for TickClock {
    fn now(&self) -> Timestamp {
        let us = self.0.fetch_add(1, Ordering::Relaxed);
        Timestamp::from_unix_us(us).unwrap_or_else(|| Timestamp::from_unix_us(0).expect("epoch"))
    }
}

fn clock() -> Arc<dyn Clock> {
    Arc::new(TickClock(AtomicI64::new(1_764_000_000_000_000)))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

fn run_id(i: usize) -> Result<RunId> {
    RunId::new(format!("bench-{i}")).map_err(|e| anyhow!(e))
}

/// The events that open a run, so agent events are admitted after them.
fn opening() -> Vec<Draft> {
    [
        "RunProvisioned",
        "ResourcesAllocated",
        "ContextResolved",
        "ExecutionWindowOpened",
    ]
    .into_iter()
    .map(|t| Draft::new(t, Origin::Runtime))
    .collect()
}

fn step(i: u64) -> Draft {
    Draft::new("InferenceStep", Origin::Agent("bench".into()))
        .intent("benchmark step")
        .payload(json!({"model": "scripted", "step": i, "output": "the quick brown fox jumps over the lazy dog; ".repeat(3)}))
}

pub async fn run(a: BenchArgs) -> Result<u8> {
    if a.repeat == 0 || a.appends == 0 || a.concurrency == 0 || a.events == 0 {
        bail!("--repeat, --appends, --concurrency and --events must be at least 1");
    }
    let tmp;
    let dir = match &a.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir().context("creating a temporary directory")?;
            tmp.path().to_path_buf()
        }
    };
    let mut figures = serde_json::Map::new();
    let say = |s: String| {
        if !a.json {
            println!("{s}");
        }
    };
    if matches!(a.what, What::All | What::Append) {
        let mut levels = vec![1usize, a.concurrency];
        levels.dedup();
        for c in levels {
            let mut ice = Vec::new();
            let mut raw = Vec::new();
            let mut batched = Vec::new();
            for r in 0..a.repeat {
                let (ice_rate, rows) =
                    append_ice(&dir.join(format!("append-{c}-{r}.db")), c, a.appends).await?;
                ice.push(ice_rate);
                raw.push(append_raw(&dir.join(format!("raw-{c}-{r}.db")), c, &rows)?);
                batched.push(append_raw_batched(
                    &dir.join(format!("rawb-{c}-{r}.db")),
                    c,
                    &rows,
                )?);
            }
            let (ice, raw, batched) = (median(ice), median(raw), median(batched));
            say(format!(
                "durable append, {c:>2} appender(s): ICE {ice:>9.0} ev/s | raw SQLite, {c} connection(s), 1 row/commit {raw:>9.0} ev/s | ratio {:.2} (target ≥ 0.80)",
                ice / raw
            ));
            if c > 1 {
                say(format!(
                    "                              (reference) raw SQLite, 1 connection, {c} rows/commit {batched:>9.0} ev/s | ratio {:.2}",
                    ice / batched
                ));
            }
            figures.insert(
                format!("append_c{c}"),
                json!({"ice_events_per_s": ice, "raw_events_per_s": raw, "ratio": ice / raw,
                       "raw_batched_events_per_s": batched, "ratio_to_batched": ice / batched}),
            );
        }
    }
    if matches!(a.what, What::All | What::Verify) {
        let path = dir.join("verify.db");
        build_log(&path, a.events).await?;
        let log = SqliteLog::open(&path, Mode::ReadOnly)?;
        let (mut vw, mut vc, mut rw, mut rc, mut bw) = (vec![], vec![], vec![], vec![], vec![]);
        for _ in 0..a.repeat {
            let (w, c) = timed(|| async {
                let r = ice_log::verify::verify(&log, None, |_| {}).await?;
                if !r.ok() {
                    bail!("the benchmark log does not verify: {:?}", r.failure);
                }
                Ok(r.events)
            })
            .await?;
            vw.push(w);
            vc.push(c);
            let (w, c) = timed(|| replay(&log)).await?;
            rw.push(w);
            rc.push(c);
            bw.push(raw_read_and_hash(&path)?);
        }
        let (vw, vc, rw, rc, bw) = (median(vw), median(vc), median(rw), median(rc), median(bw));
        say(format!(
            "verify  ({} events): {:>6.2} M ev/s wall, {:>6.2} M ev/s per CPU-second (target ≥ 1.00) | raw read + SHA-256 of the same rows {:>6.2} M ev/s | ratio {:.2}",
            a.events,
            vw / 1e6,
            vc / 1e6,
            bw / 1e6,
            vw / bw
        ));
        say(format!(
            "replay  ({} events): {:>6.2} M ev/s wall, {:>6.2} M ev/s per CPU-second (target ≥ 1.00) | raw read + SHA-256 of the same rows {:>6.2} M ev/s | ratio {:.2}",
            a.events,
            rw / 1e6,
            rc / 1e6,
            bw / 1e6,
            rw / bw
        ));
        figures.insert(
            "verify".into(),
            json!({"events": a.events, "events_per_s": vw, "events_per_cpu_s": vc, "baseline_events_per_s": bw, "ratio": vw / bw}),
        );
        figures.insert(
            "replay".into(),
            json!({"events": a.events, "events_per_s": rw, "events_per_cpu_s": rc, "baseline_events_per_s": bw, "ratio": rw / bw}),
        );
    }
    if matches!(a.what, What::All | What::Memory) {
        let small = a.events / 4;
        let big = a.events;
        let mut rss = Vec::new();
        for n in [small, big] {
            let home = dir.join(format!("mem-{n}"));
            crate::home::Home::init(&home, Some("ice.bench/memory".into()))?;
            std::fs::remove_file(home.join("ice.db")).context("replacing the bench log")?;
            build_log(&home.join("ice.db"), n).await?;
            rss.push(child_verify_peak_rss_kib(&home)?);
        }
        say(format!(
            "verify peak memory: {} events {:>7} KiB | {} events {:>7} KiB | ratio {:.2} for 4x the events (flat ≈ 1.0)",
            small,
            rss[0],
            big,
            rss[1],
            rss[1] as f64 / rss[0] as f64
        ));
        figures.insert("verify_memory".into(), json!({"small_events": small, "small_peak_rss_kib": rss[0], "big_events": big, "big_peak_rss_kib": rss[1]}));
    }
    if matches!(a.what, What::All | What::Governed) {
        let calls = a.appends.max(500) as usize;
        let mut runs: [Vec<GovernedFigures>; 3] = Default::default();
        for r in 0..a.repeat {
            runs[0].push(governed_calls(&format!("gov-{r}"), calls, 1_000_000, false).await?);
            runs[1].push(governed_calls(&format!("fresh-{r}"), calls / 4, 1, false).await?);
            runs[2].push(governed_calls(&format!("mem-{r}"), calls, 1_000_000, true).await?);
        }
        // Medians over the repeats, figure by figure.
        let m = |k: usize, f: fn(&GovernedFigures) -> f64| median(runs[k].iter().map(f).collect());
        let (g50, d50, s50) = (
            m(0, |x| x.governed_p50),
            m(0, |x| x.direct_p50),
            m(0, |x| x.store_p50),
        );
        let (w50, w99) = (m(0, |x| x.with_store_p50), m(0, |x| x.with_store_p99));
        let (a50, a99) = (m(0, |x| x.added_p50), m(0, |x| x.added_p99));
        let (f50, fs50) = (m(1, |x| x.added_p50), m(1, |x| x.with_store_p50));
        let (m50, m99) = (m(2, |x| x.added_p50), m(2, |x| x.added_p99));
        say(format!(
            "governed fs.read of a 16-byte file under a live grant, SQLite log on tmpfs: {g50:.1} µs p50 | baselines: the read directly {d50:.1} µs, plain SQLite committing the call's rows {s50:.1} µs | added by ICE beyond both {a50:.1} µs p50, {a99:.1} µs p99 (target ≤ 20 / ≤ 100); beyond the read alone {w50:.1} µs p50, {w99:.1} µs p99"
        ));
        say(format!(
            "  with a policy decision and a new grant on every call: added {f50:.1} µs p50 beyond both baselines ({fs50:.1} µs beyond the read alone)"
        ));
        say(format!(
            "  with an in-memory log instead (events sealed by the validator, nothing stored): added {m50:.1} µs p50, {m99:.1} µs p99"
        ));
        figures.insert(
            "governed_call".into(),
            json!({"governed_p50_us": g50, "direct_p50_us": d50, "plain_commit_p50_us": s50, "added_p50_us": a50, "added_p99_us": a99, "added_beyond_read_p50_us": w50, "added_beyond_read_p99_us": w99, "added_p50_new_grant_us": f50, "added_p50_no_log_write_us": m50, "added_p99_no_log_write_us": m99}),
        );
    }
    if a.what == What::Mcp || (a.what == What::All && a.mcp_server.is_some()) {
        let Some(server) = &a.mcp_server else {
            bail!(
                "ice bench mcp needs --mcp-server COMMAND, e.g. \"node .deps/node/node_modules/@modelcontextprotocol/server-everything/dist/index.js stdio\" (scripts/deps installs it)"
            );
        };
        let command: Vec<String> = server.split_whitespace().map(str::to_string).collect();
        if command.is_empty() || a.mcp_calls == 0 {
            bail!("--mcp-server needs a program and --mcp-calls must be at least 1");
        }
        for (label, base) in [
            ("tmpfs, no disk sync", shm_dir()),
            ("disk, durable log", Some(dir.clone())),
        ] {
            let Some(base) = base else { continue };
            let (mut p50s, mut p99s, mut d50s, mut d99s, mut i50s, mut i99s) = (
                Vec::new(),
                Vec::new(),
                Vec::new(),
                Vec::new(),
                Vec::new(),
                Vec::new(),
            );
            for _ in 0..a.repeat {
                let m = crate::bench_mcp::measure(&base, &command, a.mcp_calls).await?;
                p50s.push(m.added_p50);
                p99s.push(m.added_p99);
                d50s.push(m.direct_p50);
                d99s.push(m.direct_p99);
                i50s.push(m.ice_p50);
                i99s.push(m.ice_p99);
            }
            let (a50, a99) = (median(p50s), median(p99s));
            let (d50, d99, i50, i99) = (median(d50s), median(d99s), median(i50s), median(i99s));
            say(format!(
                "MCP tools/call `echo` over stdio ({label}): through ICE {i50:.0} µs p50, {i99:.0} µs p99 | directly to the same server {d50:.0} µs p50, {d99:.0} µs p99 | added {a50:.0} µs p50 (target ≤ 1000), {a99:.0} µs p99 | ratio {:.2}",
                i50 / d50
            ));
            figures.insert(
                format!("mcp_gateway_{}", if label.starts_with("tmpfs") { "tmpfs" } else { "disk" }),
                json!({"calls": a.mcp_calls, "ice_p50_us": i50, "ice_p99_us": i99, "direct_p50_us": d50, "direct_p99_us": d99, "added_p50_us": a50, "added_p99_us": a99}),
            );
        }
    }
    if matches!(a.what, What::All | What::Exec) {
        let (mut ice, mut direct) = (Vec::new(), Vec::new());
        for _ in 0..a.repeat {
            let (i, d) = exec_latencies(&dir, 200)?;
            ice.push(i);
            direct.push(d);
        }
        let (i50, d50) = (median(ice), median(direct));
        say(format!(
            "process.exec of `true` (supervised, output captured): {i50:.0} µs p50 | baseline: std::process::Command output() of `true` {d50:.0} µs p50 | ratio {:.2}, added {:.0} µs",
            i50 / d50,
            i50 - d50
        ));
        figures.insert(
            "exec".into(),
            json!({"ice_p50_us": i50, "direct_p50_us": d50, "ratio": i50 / d50, "added_p50_us": i50 - d50}),
        );
    }
    if a.what == What::Backends {
        let f = crate::bench_backends::measure(&dir, &a.postgres, &a.nats, a.repeat, &say).await?;
        figures.insert("backends".into(), f);
    }
    if a.json {
        println!("{}", serde_json::Value::Object(figures));
    }
    Ok(0)
}

/// Median latencies (µs) of running `true` `n` times as `process.exec` does (a supervisor,
/// output captured, the group killed after) and, interleaved run by run, directly with
/// `std::process::Command::output` (spawned by `posix_spawn`, no supervisor).
fn exec_latencies(dir: &Path, n: usize) -> Result<(f64, f64)> {
    let spec = ice_effects::exec::ExecSpec {
        program: "true".into(),
        args: Vec::new(),
        dir: dir.to_path_buf(),
        timeout: std::time::Duration::from_secs(20),
        max_output_bytes: 1024,
    };
    let (mut ice, mut direct) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        let t0 = Instant::now();
        let out = ice_effects::exec::run_check(&spec)?;
        ice.push(t0.elapsed().as_secs_f64() * 1e6);
        if !out.success() {
            bail!("`true` failed under the supervisor: {out:?}");
        }
        let t0 = Instant::now();
        let out = std::process::Command::new("true")
            .current_dir(dir)
            .output()
            .context("running true directly")?;
        direct.push(t0.elapsed().as_secs_f64() * 1e6);
        if !out.status.success() {
            bail!("`true` failed run directly");
        }
    }
    Ok((percentile(&mut ice, 0.5), percentile(&mut direct, 0.5)))
}

/// The machine's tmpfs, if it has one.
fn shm_dir() -> Option<PathBuf> {
    let d = Path::new("/dev/shm");
    d.is_dir().then(|| d.to_path_buf())
}

struct GovernedFigures {
    governed_p50: f64,
    direct_p50: f64,
    /// Plain SQLite committing a call's rows (0 for the in-memory log).
    store_p50: f64,
    /// Governed minus direct, call by call: with the log's write.
    with_store_p50: f64,
    with_store_p99: f64,
    /// The same percentiles less the plain commit's.
    added_p50: f64,
    added_p99: f64,
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Latency of a governed `fs.read` through a session (request, grant or decision, budget,
/// use, effect, settle, all recorded) against two baselines measured in the same run: reading
/// the same file directly (the tool's own time; interleaved call by call), and committing the
/// rows each call recorded, byte for byte, to a plain SQLite table with the log's settings, a
/// transaction per call (the cost of making that record durable: the "disk sync" the target
/// leaves out, which on tmpfs is the database's own work rather than the device's). What
/// remains is ICE's own work, its log layer's work beyond that plain commit included.
async fn governed_calls(
    name: &str,
    calls: usize,
    grant_uses: u32,
    in_memory: bool,
) -> Result<GovernedFigures> {
    use ice_kernel::{CapabilityProposal, Proposal};
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .context("creating a temporary directory")?;
    let base = dir.path().join(name);
    let ws = base.join("workspace");
    std::fs::create_dir_all(&ws)?;
    std::fs::create_dir_all(base.join("policies"))?;
    // The installation beside the workspace, not around it (a run refuses a workspace inside
    // its home).
    std::fs::create_dir_all(base.join("home/runs"))?;
    std::fs::write(ws.join("noop.txt"), "sixteen bytes!!\n")?;
    std::fs::write(
        base.join("policies/p.cedar"),
        "permit(principal, action == Action::\"fs.read\", resource in Dir::\".\");\n",
    )?;
    std::fs::write(base.join("plan.toml"), "")?;
    std::fs::write(
        base.join("run.toml"),
        format!(
            "[run]\nid = \"bench\"\nagent = \"bench\"\nworkspace = \"workspace\"\npolicy = \"policies\"\n[agent]\ndriver = \"plan\"\nplan = \"plan.toml\"\n[grants]\nuses = {grant_uses}\nttl = \"1h\"\n"
        ),
    )?;
    let spec =
        ice_runtime::RunSpec::load(&base.join("run.toml")).map_err(|e| anyhow::anyhow!("{e}"))?;
    let log: Arc<dyn EventLog> = if in_memory {
        Arc::new(MemoryLog::default())
    } else {
        Arc::new(SqliteLog::create(&base.join("home/ice.db"))?)
    };
    let ledger = Arc::new(Ledger::new(
        log.clone(),
        Arc::new(ice_log::clock::SystemClock),
    ));
    let rt = ice_runtime::Runtime::new(
        ledger,
        Arc::new(ice_log::clock::SystemClock),
        ice_runtime::Installation {
            runs_dir: base.join("home/runs"),
            policy_dir: base.join("policies"),
        },
    )?;
    let session = rt.open_session(spec, "bench", &ice_runtime::Quiet).await?;
    let proposal = Proposal::Request(CapabilityProposal {
        capability: "fs.read".into(),
        target: "noop.txt".into(),
        arguments: json!({}),
        intent: "measure".into(),
    });
    let file = ws.join("noop.txt");
    let mut governed = Vec::with_capacity(calls);
    let mut direct = Vec::with_capacity(calls);
    let warm_up = calls / 10;
    let first = log.size().await?;
    for i in 0..calls + warm_up {
        let t = std::time::Instant::now();
        let out = session.propose(&proposal).await?;
        let g = t.elapsed().as_secs_f64() * 1e6;
        if !matches!(out, Some(ice_kernel::Outcome::Done { .. })) {
            bail!("the governed call was not carried out: {out:?}");
        }
        let t = std::time::Instant::now();
        let bytes = std::hint::black_box(std::fs::read(&file)?);
        let d = t.elapsed().as_secs_f64() * 1e6;
        std::hint::black_box(bytes);
        if i >= warm_up {
            governed.push(g);
            direct.push(d);
        }
    }
    session.finish().await?;
    // The second baseline, once the calls are done (run between them, its SQLite work evicted
    // the call's from the caches and slowed both): each call's rows, as stored, committed
    // again to a plain table, one transaction per call.
    let mut stored = Vec::with_capacity(calls);
    if !in_memory {
        let c = raw_conn(&base.join("raw.db"))?;
        c.execute_batch(RAW_SCHEMA)?;
        let mut calls_rows: Vec<Vec<Row>> = Vec::new();
        let mut from = first;
        let mut page = ice_log::EventPage::default();
        'read: loop {
            page = log.scan_page(from, 10_000, false, page).await?;
            if page.is_empty() {
                break;
            }
            from += page.len() as u64;
            for e in page.iter() {
                // Each call's batch opens with its request; the run's closing events end it.
                match e.event_type {
                    "CapabilityRequested" => calls_rows.push(Vec::new()),
                    t if t.starts_with("Run") || t.starts_with("ExecutionWindow") => break 'read,
                    _ => {}
                }
                if let Some(call) = calls_rows.last_mut() {
                    call.push(row_of(&e));
                }
            }
        }
        if calls_rows.len() != calls + warm_up {
            bail!(
                "found {} calls' rows in the log, not {}",
                calls_rows.len(),
                calls + warm_up
            );
        }
        let mut st_sql = c.prepare_cached(RAW_INSERT)?;
        for (i, rows) in calls_rows.iter().enumerate() {
            let t = std::time::Instant::now();
            c.execute_batch("BEGIN IMMEDIATE")?;
            for e in rows {
                st_sql.execute(params![e.0, e.1, e.2, e.3, e.4, e.5, e.6])?;
            }
            c.execute_batch("COMMIT")?;
            if i >= warm_up {
                stored.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
    } else {
        stored.resize(calls, 0.0);
    }
    let mut beyond_read: Vec<f64> = governed.iter().zip(&direct).map(|(g, d)| g - d).collect();
    let (w50, w99) = (
        percentile(&mut beyond_read, 0.5),
        percentile(&mut beyond_read, 0.99),
    );
    let (s50, s99) = (percentile(&mut stored, 0.5), percentile(&mut stored, 0.99));
    Ok(GovernedFigures {
        governed_p50: percentile(&mut governed, 0.5),
        direct_p50: percentile(&mut direct, 0.5),
        store_p50: s50,
        with_store_p50: w50,
        with_store_p99: w99,
        added_p50: w50 - s50,
        added_p99: w99 - s99,
    })
}

/// Wall-clock and per-CPU-second rates of `f`, which returns how many events it processed.
async fn timed<F, Fut>(f: F) -> Result<(f64, f64)>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<u64>>,
{
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let n = f().await? as f64;
    let wall = t0.elapsed().as_secs_f64();
    let cpu = (cpu_seconds() - cpu0).max(1e-9);
    Ok((n / wall, n / cpu))
}

/// CPU time of this process (all threads), in seconds.
fn cpu_seconds() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we own; RUSAGE_SELF is always valid.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Rows as stored, for the raw baselines: (log_seq, run_id, run_seq, type, hash, log_prev,
/// body).
type Row = (i64, String, i64, String, Vec<u8>, Vec<u8>, Vec<u8>);

/// A stored event as a baseline's row, byte for byte.
fn row_of(e: &ice_log::StoredRef<'_>) -> Row {
    (
        e.log_seq as i64,
        e.run_id.to_string(),
        e.run_seq as i64,
        e.event_type.to_string(),
        e.hash.to_vec(),
        e.log_prev.unwrap_or_default().to_vec(),
        e.body.to_vec(),
    )
}

/// ICE: `c` tasks, each on its own run, each append one durable event through the ledger.
async fn append_ice(path: &Path, c: usize, total: u64) -> Result<(f64, Vec<Row>)> {
    let log = Arc::new(SqliteLog::create(path)?);
    let rate = append_rate(log.clone(), c, total).await?;
    // The appended rows, byte for byte, for the baselines.
    let mut rows = Vec::new();
    let mut from = 0;
    let mut page = ice_log::EventPage::default();
    loop {
        page = log.scan_page(from, 10_000, false, page).await?;
        if page.is_empty() {
            break;
        }
        from += page.len() as u64;
        rows.extend(
            page.iter()
                .filter(|e| e.event_type == "InferenceStep")
                .map(|e| row_of(&e)),
        );
    }
    Ok((rate, rows))
}

/// Durable single-event appends per second through the ledger, `c` appenders on their own
/// runs, about `total` events in all.
pub(crate) async fn append_rate(log: Arc<dyn EventLog>, c: usize, total: u64) -> Result<f64> {
    let ledger = Arc::new(Ledger::new(log, clock()));
    for i in 0..c {
        ledger.append(&run_id(i)?, opening()).await?;
    }
    let per = total.div_ceil(c as u64);
    // The drafts are the caller's; building them is not ICE's work, so it happens before the
    // clock starts (as the baseline's rows are built before its clock starts).
    let drafts: Vec<Vec<Draft>> = (0..c).map(|_| (0..per).map(step).collect()).collect();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (i, mine) in drafts.into_iter().enumerate() {
        let ledger = ledger.clone();
        let run = run_id(i)?;
        tasks.push(tokio::spawn(async move {
            for d in mine {
                ledger.append(&run, vec![d]).await?;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await.context("an appender task failed")??;
    }
    Ok((per * c as u64) as f64 / t0.elapsed().as_secs_f64())
}

fn raw_conn(path: &Path) -> Result<Connection> {
    let c = Connection::open(path)?;
    c.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))?;
    c.execute_batch("PRAGMA synchronous=FULL; PRAGMA busy_timeout=60000;")?;
    Ok(c)
}

const RAW_SCHEMA: &str = "CREATE TABLE events(log_seq INTEGER PRIMARY KEY, run_id TEXT NOT NULL, run_seq INTEGER NOT NULL, type TEXT NOT NULL, hash BLOB NOT NULL, log_prev BLOB NOT NULL, body BLOB NOT NULL, UNIQUE(run_id, run_seq));";
const RAW_INSERT: &str = "INSERT INTO events(log_seq, run_id, run_seq, type, hash, log_prev, body) VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7)";

/// Baseline: `c` threads, each with its own connection, one row per transaction.
fn append_raw(path: &Path, c: usize, rows: &[Row]) -> Result<f64> {
    raw_conn(path)?.execute_batch(RAW_SCHEMA)?;
    let chunks: Vec<Vec<Row>> = (0..c)
        .map(|i| rows.iter().skip(i).step_by(c).cloned().collect())
        .collect();
    let t0 = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let hs: Vec<_> = chunks
            .iter()
            .map(|chunk| {
                s.spawn(move || -> Result<()> {
                    let conn = raw_conn(path)?;
                    let mut st = conn.prepare(RAW_INSERT)?;
                    for r in chunk {
                        st.execute(params![r.0, r.1, r.2, r.3, r.4, r.5, r.6])?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in hs {
            h.join()
                .map_err(|_| anyhow!("a baseline thread panicked"))??;
        }
        Ok(())
    })?;
    Ok(rows.len() as f64 / t0.elapsed().as_secs_f64())
}

/// Reference: one connection, `c` rows per transaction (ideal grouping, no validation).
fn append_raw_batched(path: &Path, c: usize, rows: &[Row]) -> Result<f64> {
    let mut conn = raw_conn(path)?;
    conn.execute_batch(RAW_SCHEMA)?;
    let t0 = Instant::now();
    for chunk in rows.chunks(c) {
        let tx = conn.transaction()?;
        {
            let mut st = tx.prepare_cached(RAW_INSERT)?;
            for r in chunk {
                st.execute(params![r.0, r.1, r.2, r.3, r.4, r.5, r.6])?;
            }
        }
        tx.commit()?;
    }
    Ok(rows.len() as f64 / t0.elapsed().as_secs_f64())
}

/// A log of `n` events over 100 runs, appended in large batches (fast to build).
async fn build_log(path: &Path, n: u64) -> Result<()> {
    fill_log(Arc::new(SqliteLog::create(path)?), n).await
}

/// Fill `log` with `n` events in 100 runs, appended in batches of up to 500.
pub(crate) async fn fill_log(log: Arc<dyn EventLog>, n: u64) -> Result<()> {
    let ledger = Ledger::new(log, clock());
    let runs = 100usize;
    for i in 0..runs {
        ledger.append(&run_id(i)?, opening()).await?;
    }
    let mut left = n.saturating_sub(4 * runs as u64);
    let mut s = 0u64;
    while left > 0 {
        for i in 0..runs {
            let k = left.min(500);
            if k == 0 {
                break;
            }
            ledger
                .append(&run_id(i)?, (0..k).map(|j| step(s + j)).collect())
                .await?;
            left -= k;
            s += k;
        }
    }
    Ok(())
}

/// Replay: rebuild every run's projection from the log alone, streaming.
async fn replay(log: &dyn EventLog) -> Result<u64> {
    let mut views: std::collections::HashMap<RunId, ice_kernel::RunView> =
        std::collections::HashMap::new();
    let mut from = 0u64;
    let mut page = ice_log::EventPage::default();
    loop {
        page = log.scan_page(from, 8192, false, page).await?;
        if page.is_empty() {
            break;
        }
        from += page.len() as u64;
        for s in page.iter() {
            let h = ice_kernel::Header::parse(s.body)?;
            let hash = ice_kernel::Digest(
                s.hash
                    .try_into()
                    .map_err(|_| anyhow!("hash is not 32 bytes"))?,
            );
            match views.get_mut(h.run_id) {
                Some(v) => v.apply_header(&h, hash)?,
                None => {
                    let id = RunId::new(h.run_id).map_err(|e| anyhow!(e))?;
                    let mut v = ice_kernel::RunView::new(id.clone());
                    v.apply_header(&h, hash)?;
                    views.insert(id, v);
                }
            }
        }
    }
    Ok(from)
}

/// Baseline: read every row and SHA-256 its body, the least any verifier must do.
fn raw_read_and_hash(path: &Path) -> Result<f64> {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let t0 = Instant::now();
    let mut st = conn.prepare("SELECT hash, body FROM events ORDER BY log_seq")?;
    let mut rows = st.query([])?;
    let mut n = 0u64;
    let mut acc = 0u8;
    while let Some(r) = rows.next()? {
        let body = r.get_ref(1)?.as_blob()?;
        let d = ice_kernel::Digest::of(body);
        acc ^= d.0[0] ^ r.get_ref(0)?.as_blob()?[0];
        n += 1;
    }
    std::hint::black_box(acc);
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

/// Run `ice verify` on `home` in a child process and return its peak resident memory.
///
/// The child's own high-water mark (`VmHWM`) is read from /proc while it runs: the kernel's
/// `ru_maxrss` for a child would include this (large) benchmark process's memory at fork.
fn child_verify_peak_rss_kib(home: &Path) -> Result<i64> {
    let exe = std::env::current_exe().context("locating the ice binary")?;
    let mut child = std::process::Command::new(exe)
        .args(["verify", "--json", "--home"])
        .arg(home)
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("starting ice verify")?;
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak = 0i64;
    let deadline = Instant::now() + std::time::Duration::from_secs(600);
    let status = loop {
        if let Ok(text) = std::fs::read_to_string(&status_path)
            && let Some(kib) = text
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
        {
            peak = peak.max(kib);
        }
        if let Some(st) = child.try_wait().context("waiting for ice verify")? {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("ice verify on the benchmark log took over 10 minutes");
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    };
    if !status.success() {
        bail!("ice verify on the benchmark log failed ({status})");
    }
    if peak == 0 {
        bail!("could not read the verifier's memory from /proc");
    }
    Ok(peak)
}

/// A log that keeps sealed events in memory and nothing else: what a governed call costs when
/// the log write is left out. Only what a session uses is implemented.
#[derive(Default)]
struct MemoryLog {
    events: std::sync::Mutex<Vec<ice_log::StoredEvent>>,
}

#[async_trait::async_trait]
impl EventLog for MemoryLog {
    async fn append(
        &self,
        batch: ice_kernel::SealedBatch,
    ) -> Result<ice_log::AppendReceipt, ice_log::LogError> {
        let mut all = self.events.lock().map_err(|_| ice_log::LogError::Closed)?;
        let at = all
            .iter()
            .rev()
            .find(|e| e.run_id == batch.run_id().as_str())
            .map_or(0, |e| e.run_seq + 1);
        if at != batch.first_seq() {
            return Err(ice_log::LogError::Conflict {
                run_id: batch.run_id().to_string(),
                expected: batch.first_seq(),
                expected_prev: batch.prev(),
                actual: at,
            });
        }
        let first = all.len() as u64;
        for s in batch.events() {
            let e = s.event();
            let log_seq = all.len() as u64;
            all.push(ice_log::StoredEvent {
                log_seq,
                run_id: e.run_id.to_string(),
                run_seq: e.run_seq,
                event_type: e.event_type.clone(),
                hash: e.hash.0.to_vec(),
                body: s.body().to_vec(),
            });
        }
        Ok(ice_log::AppendReceipt {
            first_log_seq: first,
            count: batch.events().len() as u64,
            tree_size: all.len() as u64,
        })
    }
    async fn read_run(
        &self,
        run_id: &RunId,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<ice_log::StoredEvent>, ice_log::LogError> {
        let all = self.events.lock().map_err(|_| ice_log::LogError::Closed)?;
        // One run per bench log: its events are in run_seq order from position 0.
        Ok(all
            .iter()
            .skip(from_seq as usize)
            .filter(|e| e.run_id == run_id.as_str() && e.run_seq >= from_seq)
            .take(limit)
            .cloned()
            .collect())
    }
    async fn scan(&self, _: u64, _: usize) -> Result<Vec<ice_log::StoredEvent>, ice_log::LogError> {
        Err(ice_log::LogError::Invalid("not kept".into()))
    }
    async fn get(
        &self,
        _: &ice_kernel::EventId,
    ) -> Result<Option<ice_log::StoredEvent>, ice_log::LogError> {
        Err(ice_log::LogError::Invalid("not kept".into()))
    }
    async fn size(&self) -> Result<u64, ice_log::LogError> {
        Ok(self
            .events
            .lock()
            .map_err(|_| ice_log::LogError::Closed)?
            .len() as u64)
    }
    async fn runs(&self, _: u64, _: usize) -> Result<Vec<RunId>, ice_log::LogError> {
        Ok(Vec::new())
    }
    async fn runs_newest_first(&self, _: u64, _: usize) -> Result<Vec<RunId>, ice_log::LogError> {
        Ok(Vec::new())
    }
    async fn run_count(&self) -> Result<u64, ice_log::LogError> {
        Ok(0)
    }
    async fn existing(
        &self,
        _: &[ice_kernel::EventId],
    ) -> Result<std::collections::HashSet<ice_kernel::EventId>, ice_log::LogError> {
        Ok(Default::default())
    }
    async fn blob(&self, _: &ice_kernel::Digest) -> Result<Option<Vec<u8>>, ice_log::LogError> {
        Ok(None)
    }
    async fn nodes(
        &self,
        _: &[ice_log::merkle::NodeId],
    ) -> Result<Vec<ice_kernel::Digest>, ice_log::LogError> {
        Err(ice_log::LogError::Invalid("not kept".into()))
    }
    fn tree_floor(&self) -> u8 {
        0
    }
    async fn extent(&self) -> Result<Option<ice_log::Extent>, ice_log::LogError> {
        Ok(None)
    }
    async fn altered_blob(&self) -> Result<Option<String>, ice_log::LogError> {
        Ok(None)
    }
    async fn index_problem(&self) -> Result<Option<String>, ice_log::LogError> {
        // Kept in memory: no indexes apart from its rows.
        Ok(None)
    }

    async fn scan_nodes(
        &self,
        _: u64,
        _: u64,
    ) -> Result<Vec<(ice_log::merkle::NodeId, Option<ice_kernel::Digest>)>, ice_log::LogError> {
        Err(ice_log::LogError::Invalid("not kept".into()))
    }
    async fn add_checkpoint(&self, _: ice_log::StoredCheckpoint) -> Result<(), ice_log::LogError> {
        Err(ice_log::LogError::Invalid("not kept".into()))
    }
    async fn checkpoints(&self) -> Result<Vec<ice_log::StoredCheckpoint>, ice_log::LogError> {
        Ok(Vec::new())
    }
}
