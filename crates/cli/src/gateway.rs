//! `ice mcp` (MCP over stdio, one session = one run) and `ice serve` (MCP over streamable HTTP,
//! several sessions at once).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use clap::Args;
use ice_kernel::{Digest, EventId, RunId};
use ice_log::merkle::NodeId;
use ice_log::{AppendReceipt, EventLog, Extent, LogError, StoredCheckpoint, StoredEvent};
use ice_mcp::Gateway;
use ice_runtime::{Quiet, RunSpec, Runtime};

use crate::run::{seal, write_report};

#[derive(Args, Debug)]
pub struct McpArgs {
    /// The run spec of the session's run ([agent] driver = "external"; its [servers.*] are the
    /// tool servers offered).
    #[arg(long = "run-spec", value_name = "FILE")]
    pub spec: PathBuf,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on; MCP is served at http://ADDR/mcp.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7411")]
    pub listen: String,
    /// The run spec each session's run is made from (each run gets its own id).
    #[arg(long = "run-spec", value_name = "FILE")]
    pub spec: PathBuf,
    /// A host name clients may use to reach this server (`Host` header), besides loopback and
    /// the listening address; repeat for more (DNS-rebinding protection refuses others).
    #[arg(long = "allow-host", value_name = "NAME[:PORT]", value_parser = allowed_host)]
    pub allow_hosts: Vec<String>,
}

/// An `--allow-host` value (see [`ice_mcp::check_allowed_host`]): an empty one, or one that
/// is not a host name, would silently allow nothing, so it is a usage error naming the flag.
fn allowed_host(s: &str) -> Result<String, String> {
    ice_mcp::check_allowed_host(s).map(|()| s.trim().to_string())
}

/// Load the spec and the runtime, recover what an earlier crash left, and leak the runtime:
/// the gateway's sessions live as long as the process.
async fn open(
    home: &Path,
    url: Option<&str>,
    spec: &Path,
) -> Result<(crate::home::Home, &'static Runtime, RunSpec)> {
    open_over(home, url, spec, |log| log).await
}

/// [`open`] over the log as `wrap` returns it.
async fn open_over(
    home: &Path,
    url: Option<&str>,
    spec: &Path,
    wrap: impl FnOnce(Arc<dyn EventLog>) -> Arc<dyn EventLog>,
) -> Result<(crate::home::Home, &'static Runtime, RunSpec)> {
    let spec = RunSpec::load(spec).map_err(|e| anyhow!("{e}"))?;
    let (h, rt) = crate::run::runtime_over(home, url, wrap).await?;
    for r in rt.recover(&Quiet).await? {
        eprintln!(
            "recovered run {}: {} → {} ({})",
            r.run,
            r.from,
            r.to,
            crate::inspect::shown(&r.detail)
        );
    }
    Ok((h, Box::leak(Box::new(rt)), spec))
}

/// `ice mcp`: stdout is the MCP channel, so everything for people goes to stderr.
pub async fn mcp(home: &Path, url: Option<&str>, a: McpArgs) -> Result<u8> {
    let (h, rt, spec) = open(home, url, &a.spec).await?;
    let gw = Gateway::new(rt, spec, false).await?;
    // SIGINT or SIGTERM (a client stopping its server, a terminal's Ctrl-C): a call waiting
    // for an operator is denied at once, naming the approval, and its run suspended; the
    // session stops, and the run ends as when the client leaves (committed, or suspended) once
    // the calls in flight return, with a checkpoint signed. A second signal stops at once:
    // the run is then left to recovery, which suspends it.
    let stop = tokio_util::sync::CancellationToken::new();
    let on_signal = stop.clone();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing a SIGTERM handler")?;
    let signals = tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        rt.interrupt_approval_waits("ice mcp is stopping, so the wait for an answer ended");
        on_signal.cancel();
        eprintln!(
            "ice mcp: stopping: the session's run ends once the calls in flight return (a second signal stops at once, and recovery then suspends the run)"
        );
        crate::run::exit_on_next_signal(
            &mut term,
            "ice mcp: stopped at once: the run is left as it is; the next ICE command that opens the log recovers it (suspends it; end it with ice kill)",
        )
        .await;
    });
    let report = gw.serve_stdio_until(stop).await;
    signals.abort();
    let report = report?;
    let Some(report) = report else {
        eprintln!("ice mcp: the client left before making a run");
        return Ok(0);
    };
    let mut err = std::io::stderr().lock();
    let code = write_report(&mut err, &report, false);
    let size = seal(&h, rt).await?;
    let _ = writeln!(err, "  sealed:   checkpoint signed at log size {size}");
    Ok(code)
}

/// The operator HTTP API of this installation (`/api/v1`), with the tokens its config lists;
/// the config is read again when it changes (`ice token add` while serving).
fn operator_api(
    h: &crate::home::Home,
    rt: &'static Runtime,
    addr: std::net::SocketAddr,
    store: Arc<ice_api::CredentialStore>,
    stop: tokio_util::sync::CancellationToken,
) -> Result<(ice_api::Router, ice_api::RunsInFlight)> {
    let n = store.with(ice_api::Credentials::operators);
    let hint = format!("ice token add --operator NAME --home {}", h.dir.display());
    if n == 0 {
        eprintln!(
            "ice serve: operator API at http://{addr}{} refuses every request until an operator token exists: {hint}",
            ice_api::BASE_PATH
        );
    } else {
        eprintln!(
            "ice serve: operator API at http://{addr}{} ({n} operator token(s)); web UI at http://{addr}{}",
            ice_api::BASE_PATH,
            ice_ui::UI_PATH
        );
    }
    let signer = h.signer()?;
    let verifier = h.verifier()?;
    let agents: ice_api::AgentFactory = std::sync::Arc::new(|spec: &RunSpec| {
        crate::agents::load_agent(spec).map_err(|e| format!("{e:#}"))
    });
    let mut state = ice_api::ApiState::new(rt, signer, verifier, store, agents);
    if let Some(record) = h.signed_record() {
        state = state.with_signed_record(record);
    }
    let state = state.with_stop(stop).with_token_hint(hint);
    let driving = state.runs_in_flight();
    // The operator web UI (`/ui/`, static files only; its data comes from the API above).
    Ok((ice_api::router(state).merge(ice_ui::router()), driving))
}

/// The tokens of the installation's config, read again when the config changes (`ice token
/// add` while serving), until `stop`. `revoked` is called with each agent that had a token and
/// has none any more.
fn credential_store(
    h: &crate::home::Home,
    stop: tokio_util::sync::CancellationToken,
    revoked: impl Fn(String) + Send + 'static,
) -> Result<Arc<ice_api::CredentialStore>> {
    let store = ice_api::CredentialStore::new(h.credentials()?);
    let dir = h.dir.clone();
    let watched = store.clone();
    let watching = stop;
    tokio::spawn(async move {
        let file = dir.join("config.toml");
        // Time, size and inode: `token add` and `revoke` replace the file by renaming, and two
        // edits within the file system's time granularity still differ in one of these.
        let stamp = |f: &Path| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(f)
                .ok()
                .map(|m| (m.modified().ok(), m.len(), m.ino()))
        };
        let mut seen = stamp(&file);
        // The agents of the last configuration that read (a broken one in between has none).
        let mut agents = watched.with(ice_api::Credentials::agent_names);
        loop {
            tokio::select! {
                _ = watching.cancelled() => return,
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            }
            let now = stamp(&file);
            if now == seen {
                continue;
            }
            seen = now;
            match crate::home::Home::open(&dir).and_then(|h| h.credentials()) {
                Ok(c) => {
                    let after = c.agent_names();
                    watched.replace(c);
                    for gone in agents.difference(&after) {
                        revoked(gone.clone());
                    }
                    agents = after;
                }
                Err(e) => {
                    // Fail closed: a broken edit may have been meant to revoke a token.
                    eprintln!(
                        "ice serve: {} does not read, so every token is refused until it is fixed: {e:#}",
                        file.display()
                    );
                    watched.replace(ice_api::Credentials::unusable(format!("{e:#}")));
                }
            }
        }
    });
    Ok(store)
}

/// Who may open MCP sessions at `/mcp` (see [`ice_api::agent_of`]): agents with a token;
/// without a header, anyone while the installation has no agent token and `addr` is a
/// loopback address.
fn mcp_auth(
    h: &crate::home::Home,
    addr: std::net::SocketAddr,
    store: Arc<ice_api::CredentialStore>,
) -> ice_mcp::McpAuth {
    let anonymous = addr.ip().is_loopback();
    let hint = format!("ice token add --agent NAME --home {}", h.dir.display());
    match (store.agents(), anonymous) {
        (0, true) => eprintln!(
            "ice serve: MCP accepts any local client, as the run spec's agent, until an agent token exists: {hint}"
        ),
        (0, false) => eprintln!(
            "ice serve: MCP refuses every request until an agent token exists (this address is reachable beyond loopback): {hint}"
        ),
        (n, _) => eprintln!(
            "ice serve: MCP needs an agent's token ({n} configured); each session's run is its agent's"
        ),
    }
    // Once an agent token has existed, anonymous clients stay refused for good, even if every
    // agent token is revoked (the store remembers): a revoked token's holder must not get back
    // in by sending none.
    Arc::new(move |headers| {
        ice_api::single_authorization(headers).map_err(|e| Box::new(e.into()))?;
        ice_api::agent_of(&store, anonymous, &hint, headers)
            .map(|who| who.map(ice_mcp::AgentIdentity))
            .map_err(|e| Box::new(e.into()))
    })
}

/// How long `ice serve`, stopping, waits for runs to record their last events (open sessions'
/// runs ending, runs the API drives finishing) before it signs its final checkpoint. A run
/// ends once the calls holding it return (approval waits end at once when the server stops;
/// other calls are bounded by their own timeouts), so this is a bound for the rare call still
/// out, well inside a service manager's stop timeout (systemd's
/// default is 90 s).
const RECORDING_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// How long a stopping `ice serve` waits for the `tools/call`s in flight to answer (the calls
/// whose approval wait it closed answer at once; a tool still running may take this long).
const CALLS_ANSWER: std::time::Duration = std::time::Duration::from_secs(5);

/// How long it then gives the answers to reach their clients' streams before it stops serving.
const ANSWERS_SENT: std::time::Duration = std::time::Duration::from_millis(200);

/// [`RECORDING_GRACE`], or `ICE_SERVE_GRACE_MS` milliseconds (1 to 600000) when that is set:
/// a knob for tests, which cannot wait 30 s to see what is left unrecorded.
fn recording_grace() -> Result<std::time::Duration> {
    match std::env::var("ICE_SERVE_GRACE_MS") {
        Err(std::env::VarError::NotPresent) => Ok(RECORDING_GRACE),
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(ms @ 1..=600_000) => Ok(std::time::Duration::from_millis(ms)),
            _ => Err(anyhow!(
                "ICE_SERVE_GRACE_MS is {v:?}: give milliseconds from 1 to 600000, or unset it (30 s)"
            )),
        },
        Err(e) => Err(anyhow!("ICE_SERVE_GRACE_MS: {e}")),
    }
}

/// `ice serve`: until SIGINT or SIGTERM; then approval waits end (their runs are suspended) and
/// open sessions' runs are committed.
pub async fn serve(home: &Path, url: Option<&str>, a: ServeArgs) -> Result<u8> {
    let grace = recording_grace()?;
    // Telemetry is built from the log, whoever wrote to it (this node's MCP sessions and API
    // runs, other processes, other nodes): Prometheus metrics at /metrics, and OTLP traces when
    // the config names a collector. This process's appends are timed as they happen.
    let config = crate::home::Home::open(home)?;
    let section = config.config.telemetry.clone().unwrap_or_default();
    let mut headers = Vec::new();
    for (name, var) in &section.headers_env {
        let value = std::env::var(var).map_err(|_| {
            anyhow!(
                "[telemetry] headers_env in {}: header {name:?} is to be read from ${var}, which is not set (or not UTF-8)",
                config.dir.join("config.toml").display()
            )
        })?;
        headers.push((name.clone(), value));
    }
    let telemetry = ice_telemetry::Telemetry::new(ice_telemetry::TelemetryConfig {
        otlp_endpoint: section.otlp_endpoint.clone(),
        headers,
        ..Default::default()
    })
    .map_err(|e| {
        anyhow!(
            "[telemetry] in {}: {e}",
            config.dir.join("config.toml").display()
        )
    })?;
    let timed = telemetry.clone();
    let (h, rt, spec) = open_over(home, url, &a.spec, move |log| {
        Arc::new(TimedLog {
            inner: log,
            telemetry: timed,
        })
    })
    .await?;
    let gw = Gateway::new(rt, spec, true).await?;
    let listener = tokio::net::TcpListener::bind(&a.listen)
        .await
        .with_context(|| format!("listening on {}", a.listen))?;
    let addr = listener.local_addr()?;
    eprintln!("ice serve: MCP at http://{addr}{}", ice_mcp::MCP_PATH);
    let stop = tokio_util::sync::CancellationToken::new();
    let on_signal = stop.clone();
    let answering = gw.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        // No run waits for an operator any more: each waiting request is closed (its call
        // denied, naming the approval) and its run suspended, so nothing holds the stop up.
        rt.interrupt_approval_waits("ice serve is stopping, so the wait for an answer ended");
        // The closed calls answer their clients (at most a few seconds, for calls still
        // running), and the answers reach the sessions' streams, before serving stops.
        answering.calls_answered(CALLS_ANSWER).await;
        tokio::time::sleep(ANSWERS_SENT).await;
        on_signal.cancel();
    });
    // On a shared log another node may die mid-run: once its claims lapse, this node recovers
    // its runs (the crash-recovery rule), so keep looking. (Harmless on the embedded log.)
    let recovering = {
        let stop = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(ice_runtime::lock::claim_ttl()) => {}
                }
                if let Ok(done) = rt.recover(&Quiet).await {
                    for r in done {
                        eprintln!(
                            "recovered run {}: {} → {} ({})",
                            r.run,
                            r.from,
                            r.to,
                            crate::inspect::shown(&r.detail)
                        );
                    }
                }
            }
        })
    };
    // `ice_runs` starts from the runs the log holds now; the tail moves them from there.
    {
        let log = rt.ledger().log().clone();
        let mut seeds = Vec::new();
        let mut offset = 0;
        loop {
            let ids = log.runs(offset, 1000).await?;
            for id in &ids {
                if let Ok(v) = ice_log::ledger::fold_run(log.as_ref(), id).await {
                    seeds.push((id.clone(), v.summary.state));
                }
            }
            if ids.len() < 1000 {
                break;
            }
            offset += ids.len() as u64;
        }
        telemetry.seed_runs(&seeds);
    }
    if let Some(url) = telemetry.otlp_traces_url() {
        eprintln!("ice serve: exporting traces to {url}");
    }
    let tailing = tokio::spawn(tail_log(
        rt.ledger().log().clone(),
        telemetry.clone(),
        stop.clone(),
    ));
    // An agent whose last token is revoked loses its open sessions: their runs are aborted.
    let ending = gw.clone();
    let store = credential_store(&h, stop.clone(), move |agent| {
        let gw = ending.clone();
        tokio::spawn(async move {
            let n = gw
                .end_sessions_of(&agent, &format!("agent {agent}'s token was revoked"))
                .await;
            if n > 0 {
                eprintln!(
                    "ice serve: agent {agent}'s token was revoked; aborted its {n} open run(s)"
                );
            }
        });
    })?;
    let auth = mcp_auth(&h, addr, store.clone());
    // `/metrics` tells the installation's activity: a metrics reader's token (or an
    // operator's) reads it.
    let metrics = ice_api::single_authorization_only(ice_api::metrics_readers_only(
        telemetry.metrics_router(),
        store.clone(),
        format!("ice token add --metrics NAME --home {}", h.dir.display()),
    ));
    let (api, driving) = operator_api(&h, rt, addr, store, stop.clone())?;
    let api = api.merge(metrics);
    gw.serve_http_with(listener, stop, &a.allow_hosts, api, Some(auth))
        .await?;
    recovering.abort();
    tailing.abort();
    // The final checkpoint must cover every run's last events: open sessions' runs are ended
    // (and those of sessions closed as the transport stopped finish ending), and runs the API
    // drives finish, before it is signed; all within RECORDING_GRACE.
    let (sessions, driven) = tokio::join!(gw.close_all(grace), driving.settled(grace));
    if sessions + driven > 0 {
        eprintln!(
            "ice serve: {sessions} session run(s) and {driven} API-driven run(s) were still recording after {} s; the final checkpoint does not cover what they record from now on (a run this process leaves unfinished is recovered when ICE next opens the log)",
            grace.as_secs_f64()
        );
    }
    telemetry.flush(std::time::Duration::from_secs(2)).await;
    let size = seal(&h, rt).await?;
    eprintln!("ice serve: stopped; checkpoint signed at log size {size}");
    Ok(0)
}

/// Hand every event appended from now on to `telemetry`, until `stop`.
async fn tail_log(
    log: std::sync::Arc<dyn ice_log::EventLog>,
    telemetry: ice_telemetry::Telemetry,
    stop: tokio_util::sync::CancellationToken,
) {
    use ice_runtime::Observer;
    let mut from = log.size().await.unwrap_or(0);
    loop {
        // A page out of place (a damaged store) is not counted again and again: the tail
        // waits for the log to be repaired, and `ice verify` names the damage.
        if let Ok(page) = log.scan(from, 1024).await
            && let Ok(next) = ice_log::after_scan(from, &page)
        {
            for s in &page {
                if let Ok(e) = s.event() {
                    telemetry.recorded(&e);
                }
            }
            from = next;
            if page.len() == 1024 {
                continue;
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
        }
    }
}

/// The log, with each append's duration handed to telemetry (`ice_append_seconds`).
struct TimedLog {
    inner: Arc<dyn EventLog>,
    telemetry: ice_telemetry::Telemetry,
}

#[async_trait::async_trait]
impl EventLog for TimedLog {
    async fn append(&self, batch: ice_kernel::SealedBatch) -> Result<AppendReceipt, LogError> {
        let started = std::time::Instant::now();
        let r = self.inner.append(batch).await;
        if r.is_ok() {
            self.telemetry.observe_append(started.elapsed());
        }
        r
    }
    async fn read_run(
        &self,
        run_id: &RunId,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, LogError> {
        self.inner.read_run(run_id, from_seq, limit).await
    }
    async fn scan(&self, from_log_seq: u64, limit: usize) -> Result<Vec<StoredEvent>, LogError> {
        self.inner.scan(from_log_seq, limit).await
    }
    async fn scan_page(
        &self,
        from_log_seq: u64,
        limit: usize,
        nodes: bool,
        reuse: ice_log::EventPage,
    ) -> Result<ice_log::EventPage, LogError> {
        self.inner
            .scan_page(from_log_seq, limit, nodes, reuse)
            .await
    }
    async fn get(&self, id: &EventId) -> Result<Option<StoredEvent>, LogError> {
        self.inner.get(id).await
    }
    async fn size(&self) -> Result<u64, LogError> {
        self.inner.size().await
    }
    async fn runs(&self, offset: u64, limit: usize) -> Result<Vec<RunId>, LogError> {
        self.inner.runs(offset, limit).await
    }
    async fn runs_newest_first(&self, offset: u64, limit: usize) -> Result<Vec<RunId>, LogError> {
        self.inner.runs_newest_first(offset, limit).await
    }
    async fn run_count(&self) -> Result<u64, LogError> {
        self.inner.run_count().await
    }
    async fn existing(
        &self,
        ids: &[EventId],
    ) -> Result<std::collections::HashSet<EventId>, LogError> {
        self.inner.existing(ids).await
    }
    async fn blob(&self, digest: &Digest) -> Result<Option<Vec<u8>>, LogError> {
        self.inner.blob(digest).await
    }
    async fn nodes(&self, ids: &[NodeId]) -> Result<Vec<Digest>, LogError> {
        self.inner.nodes(ids).await
    }
    fn tree_floor(&self) -> u8 {
        self.inner.tree_floor()
    }
    async fn extent(&self) -> Result<Option<Extent>, LogError> {
        self.inner.extent().await
    }

    async fn altered_blob(&self) -> Result<Option<String>, LogError> {
        self.inner.altered_blob().await
    }

    async fn index_problem(&self) -> Result<Option<String>, LogError> {
        self.inner.index_problem().await
    }

    async fn scan_nodes(
        &self,
        from_leaf: u64,
        leaves: u64,
    ) -> Result<Vec<(NodeId, Option<Digest>)>, LogError> {
        self.inner.scan_nodes(from_leaf, leaves).await
    }
    async fn add_checkpoint(&self, checkpoint: StoredCheckpoint) -> Result<(), LogError> {
        self.inner.add_checkpoint(checkpoint).await
    }
    async fn checkpoints(&self) -> Result<Vec<StoredCheckpoint>, LogError> {
        self.inner.checkpoints().await
    }
    async fn claim_run(
        &self,
        run: &RunId,
        holder: &str,
        now_unix_ms: i64,
        until_unix_ms: i64,
    ) -> Result<(), LogError> {
        self.inner
            .claim_run(run, holder, now_unix_ms, until_unix_ms)
            .await
    }
    async fn release_run(&self, run: &RunId, holder: &str) -> Result<(), LogError> {
        self.inner.release_run(run, holder).await
    }
    fn claims_lapse(&self) -> bool {
        self.inner.claims_lapse()
    }
}
