//! `ice run` (the main job) and the commands around a run: `diff`, `explain`, `approvals`,
//! `approve`, `deny`, `reconfigure`, `kill`.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use clap::Args;
use ice_kernel::{Event, EventId, EventType, Origin, RunId};
use ice_log::clock::SystemClock;
use ice_log::ledger::Ledger;
use ice_log::sqlite::Mode;
use ice_runtime::operator::ReconfigurationFile;
use ice_runtime::{Installation, Observer, RunOutcome, RunReport, RunSpec, Runtime};
use serde_json::{Value, json};

use crate::home::Home;
use crate::inspect::{shown, shown_line, truncate};

/// Exit code: the run ended aborted or failed validation.
const EXIT_ABORTED: u8 = 3;
/// Exit code: the run is suspended or waits for an operator.
const EXIT_SUSPENDED: u8 = 4;

#[derive(Args)]
pub struct RunArgs {
    /// The run spec (TOML): agent, workspace, policy, budgets, assumptions, checks.
    spec: PathBuf,
    /// Print the final report as JSON (progress lines still go to stderr on a terminal).
    #[arg(long)]
    json: bool,
    /// Print progress lines even when stderr is not a terminal.
    #[arg(long, short)]
    verbose: bool,
}

#[derive(Args)]
pub struct DiffArgs {
    /// The run.
    run: String,
    /// One JSON document.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ExplainArgs {
    /// The event (RUN_ID:RUN_SEQ).
    event: String,
    /// One JSON document.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ApprovalsArgs {
    /// Only this run's approvals.
    #[arg(long)]
    run: Option<String>,
    /// One JSON document.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct AnswerArgs {
    /// The approval (the id `ice approvals` shows: RUN_ID:RUN_SEQ).
    approval: String,
    /// Who answers (recorded as operator:NAME); default $USER.
    #[arg(long, value_name = "NAME")]
    operator: Option<String>,
    /// Why (recorded).
    #[arg(long, default_value = "")]
    reason: String,
}

#[derive(Args)]
pub struct ReconfigureArgs {
    /// The suspended run.
    run: String,
    /// The reconfiguration record (TOML: reason, accept_files, accept_policy, [budget]).
    #[arg(long, value_name = "FILE")]
    record: PathBuf,
    /// Who reconfigures (recorded as operator:NAME); default $USER.
    #[arg(long, value_name = "NAME")]
    operator: Option<String>,
    /// Record the reconfiguration without resuming the run.
    #[arg(long)]
    no_resume: bool,
    /// Print progress lines even when stderr is not a terminal.
    #[arg(long, short)]
    verbose: bool,
}

#[derive(Args)]
pub struct KillArgs {
    /// The run.
    run: String,
    /// Who (recorded as operator:NAME); default $USER.
    #[arg(long, value_name = "NAME")]
    operator: Option<String>,
    /// Why (recorded).
    #[arg(long, default_value = "")]
    reason: String,
    /// If the run stopped past its commit point and its commit cannot be completed (its
    /// workspace is gone, say), give the commit up: the run is terminated with a record of
    /// the failure and of every change the commit named (the workspace may hold any part of
    /// them), and its stage is kept in the run's directory.
    #[arg(long)]
    abandon_commit: bool,
}

/// The operator's name for the record: `--operator` as given (a name the record cannot carry
/// is refused, as `ice token add` refuses it), else `$USER` made a valid id.
pub(crate) fn operator(name: &Option<String>) -> Result<String> {
    if let Some(n) = name {
        format!("operator:{n}")
            .parse::<ice_kernel::Origin>()
            .map_err(|e| anyhow!("--operator {n:?}: {e}"))?;
        ice_api::check_operator_name(n).map_err(|e| anyhow!("--operator: {e}"))?;
        return Ok(n.clone());
    }
    let n = std::env::var("USER").unwrap_or_else(|_| "operator".into());
    let n: String = n
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-@".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    if n.is_empty() {
        return Ok("operator".into());
    }
    ice_api::check_operator_name(&n).map_err(|e| anyhow!("$USER: {e}; give --operator NAME"))?;
    Ok(n)
}

/// The runtime for a command that drives runs (takes or renews run claims: `run`,
/// `reconfigure`, `kill`, the memory actions, `mcp`, `serve`): a bad `ICE_CLAIM_TTL_MS` is
/// refused first.
pub(crate) async fn runtime(home: &Path, url: Option<&str>) -> Result<(Home, Runtime)> {
    runtime_over(home, url, |log| log).await
}

/// The runtime for a command that drives no run and takes no claim (`approvals`, `approve`,
/// `deny`, `diff`, `replay`): `ICE_CLAIM_TTL_MS` is not its business, as it is not that of
/// `runs`, `verify` or `checkpoint`, so a bad value does not refuse it (a run lock taken through
/// it would still refuse a bad value: [`ice_runtime::lock::RunLock::take`]).
pub(crate) async fn runtime_unclaimed(home: &Path, url: Option<&str>) -> Result<(Home, Runtime)> {
    open_runtime(home, url, |log| log).await
}

/// [`runtime`] over the log as `wrap` returns it (`ice serve` times its appends).
pub(crate) async fn runtime_over(
    home: &Path,
    url: Option<&str>,
    wrap: impl FnOnce(Arc<dyn ice_log::EventLog>) -> Arc<dyn ice_log::EventLog>,
) -> Result<(Home, Runtime)> {
    // A bad ICE_CLAIM_TTL_MS is refused before anything is opened (every run lock would
    // refuse it anyway; this says so once, up front, for every command that drives runs).
    ice_runtime::lock::claim_ttl_setting().map_err(|e| anyhow!("{e}"))?;
    open_runtime(home, url, wrap).await
}

async fn open_runtime(
    home: &Path,
    url: Option<&str>,
    wrap: impl FnOnce(Arc<dyn ice_log::EventLog>) -> Arc<dyn ice_log::EventLog>,
) -> Result<(Home, Runtime)> {
    let h = Home::open(home)?;
    let log = wrap(h.log(url, Mode::ReadWrite).await?);
    let ledger = Arc::new(Ledger::new(log, Arc::new(SystemClock)));
    let install = Installation {
        runs_dir: h.dir.join("runs"),
        policy_dir: h.policy_dir(),
    };
    let rt = Runtime::new(ledger, Arc::new(SystemClock), install)?;
    Ok((h, rt))
}

/// Progress lines: proposal → decision → effect, one line per event that matters.
struct Progress {
    on: bool,
}

impl Observer for Progress {
    fn recorded(&self, e: &Event) {
        if !self.on {
            return;
        }
        if let Some(line) = progress_line(e) {
            let _ = writeln!(std::io::stderr(), "{}", shown(&line));
        }
    }

    fn waiting(&self, what: &str) {
        if self.on {
            let _ = writeln!(std::io::stderr(), "  … waiting for {}", shown(what));
        }
    }
}

fn s<'a>(e: &'a Event, k: &str) -> &'a str {
    e.payload.get(k).and_then(Value::as_str).unwrap_or("")
}

fn progress_line(e: &Event) -> Option<String> {
    let t = EventType::from_name(&e.event_type)?;
    let id = e.id();
    Some(match t {
        EventType::RunProvisioned => format!("run {} started", e.run_id),
        EventType::ExecutionWindowOpened => format!("{id} executing"),
        EventType::CapabilityRequested => format!(
            "{id} → {} {}  \"{}\"",
            s(e, "capability"),
            s(e, "target"),
            e.intent.as_deref().unwrap_or("")
        ),
        EventType::CapabilityGranted => format!(
            "{id}   ✓ granted {} ({})",
            e.payload.get("scope").and_then(Value::as_str).unwrap_or(""),
            e.authority.as_deref().unwrap_or("")
        ),
        EventType::CapabilityDenied => {
            format!("{id}   ✗ denied: {} — {}", s(e, "reason"), s(e, "detail"))
        }
        EventType::ApprovalRequested => format!("{id}   ? approval requested"),
        EventType::ApprovalGranted => format!("{id}   ✓ approved by {}", e.origin),
        EventType::ApprovalDenied => format!("{id}   ✗ approval denied by {}", e.origin),
        EventType::FileRead => format!(
            "{id}   = read {}{}",
            if s(e, "path").is_empty() {
                s(e, "dir")
            } else {
                s(e, "path")
            },
            e.payload
                .get("bytes")
                .map(|b| format!(" ({b} bytes)"))
                .unwrap_or_default()
        ),
        EventType::EffectStaged => format!("{id}   = staged {}", s(e, "path")),
        EventType::APIRequestExecuted => format!(
            "{id}   = {} {} → {}",
            s(e, "method"),
            s(e, "url"),
            match e.payload.get("outcome").and_then(Value::as_str) {
                // Sent, and no whole answer came back.
                Some("unknown") => format!("no whole answer, outcome unknown: {}", s(e, "error")),
                _ => e
                    .payload
                    .get("status")
                    .cloned()
                    .unwrap_or(Value::Null)
                    .to_string(),
            }
        ),
        EventType::CapabilityRevoked => format!("{id}   ! grant revoked: {}", s(e, "reason")),
        EventType::PolicyReloaded => format!(
            "{id}   ! policy now version {}: {}",
            s(e, "policy_version").get(..12).unwrap_or(""),
            s(e, "reason")
        ),
        EventType::InferenceStep
        | EventType::DecisionProposed
        | EventType::HypothesisGenerated
        | EventType::UncertaintyDeclared
        | EventType::PlanStepProposed
        | EventType::AssumptionDeclared => format!(
            "{id} · {} \"{}\"",
            e.event_type,
            e.intent.as_deref().unwrap_or("")
        ),
        EventType::ValidationStarted => format!("{id} validating"),
        EventType::ValidationPassed => format!("{id}   ✓ validation passed"),
        EventType::ValidationFailed => format!("{id}   ✗ validation failed"),
        EventType::EffectApplied => format!("{id}   = applied {}", s(e, "path")),
        EventType::RunCommitted => format!("{id} committed"),
        EventType::RunAborted => format!("{id} aborted: {}", s(e, "reason")),
        EventType::RunSuspended => format!("{id} suspended: {}", s(e, "detail")),
        EventType::RunResumed => format!("{id} resumed"),
        EventType::RunKillRequested => format!("{id} kill requested by {}", e.origin),
        _ => return None,
    })
}

fn print_report(r: &RunReport, json_out: bool) -> u8 {
    write_report(&mut std::io::stdout().lock(), r, json_out)
}

/// The final summary of a run, to `out` (stderr where stdout carries a protocol).
pub(crate) fn write_report(out: &mut dyn Write, r: &RunReport, json_out: bool) -> u8 {
    let code = match r.outcome {
        RunOutcome::Committed => 0,
        RunOutcome::Aborted { .. } => EXIT_ABORTED,
        RunOutcome::Suspended { .. } => EXIT_SUSPENDED,
    };
    let (outcome, why) = match &r.outcome {
        RunOutcome::Committed => ("committed", String::new()),
        RunOutcome::Aborted { reason } => ("aborted", reason.clone()),
        RunOutcome::Suspended { reason } => ("suspended", reason.clone()),
    };
    // The wall-time limit is the spec's (the execution window's, which the runtime checks
    // between steps), not the budget ledger's, which has none: shown from the spec, so a run
    // with only a wall-time budget is not said to have none.
    let mut limits = r.limits;
    if let Some(us) = r.books.spec.as_ref().and_then(|s| s.budget.wall_time_us) {
        limits.wall_time_us = Some(us);
    }
    // Against that limit, what it counts: the execution window's elapsed time (its last
    // opening, as the record's times say), not the time spent inside effects, which the budget
    // ledger sums and which is 0 for a run that spent its time thinking.
    let mut spent = r.spent;
    if limits.wall_time_us.is_some()
        && let Some(us) = r
            .books
            .window_elapsed_us(ice_kernel::Clock::now(&SystemClock))
    {
        spent.wall_time_us = us;
    }
    let mut budget: Vec<Value> = limits
        .fields()
        .into_iter()
        .zip(spent.fields())
        .filter(|((_, l), (_, s))| l.is_some() || *s > 0)
        .map(|((n, l), (_, s))| json!({"attribute": n, "spent": s, "limit": l}))
        .collect();
    // Refusals are no cost, but a limit on them is a budget the run is held to.
    if let Some(l) = r.books.spec.as_ref().and_then(|s| s.budget.denials) {
        budget.push(json!({"attribute": "denials", "spent": r.books.refusals, "limit": l}));
    }
    if json_out {
        let doc = json!({
            "run": r.run.as_str(),
            "outcome": outcome,
            "reason": why,
            "state": r.state.name(),
            "events": r.events,
            "applied": r.applied,
            "staged": r.staged,
            "denials": r.denials.iter().map(|(id, code, detail)| json!({"event": id.to_string(), "reason": code, "detail": detail})).collect::<Vec<_>>(),
            "budget": budget,
        });
        let _ = writeln!(out, "{doc}");
        return code;
    }
    let _ = writeln!(
        out,
        "\nrun {}: {outcome}{}",
        r.run,
        if why.is_empty() {
            String::new()
        } else {
            format!(" — {}", shown(&why))
        }
    );
    let _ = writeln!(out, "  state:    {}  ({} events)", r.state, r.events);
    let _ = writeln!(
        out,
        "  effects:  {} applied to the workspace{}",
        r.applied,
        if r.applied == 0 && r.staged > 0 {
            format!(" ({} staged write(s) discarded)", r.staged)
        } else {
            String::new()
        }
    );
    let _ = writeln!(out, "  denials:  {}", r.denials.len());
    for (id, code, detail) in &r.denials {
        let _ = writeln!(out, "    {id}  {code}: {}", shown(detail));
    }
    let _ = write!(out, "  budget:  ");
    if budget.is_empty() {
        let _ = write!(out, " none set");
    }
    for b in &budget {
        let attribute = b["attribute"].as_str().unwrap_or("");
        let _ = write!(
            out,
            " {attribute} {}/{}{}",
            b["spent"],
            b["limit"]
                .as_u64()
                .map_or("∞".to_string(), |l| l.to_string()),
            if attribute == "wall_time_us" && !b["limit"].is_null() {
                " (execution window elapsed)"
            } else {
                ""
            }
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "  inspect:  ice log --run {0} · ice diff {0} · ice explain {0}:N · ice verify",
        r.run
    );
    if let RunOutcome::Suspended { .. } = r.outcome {
        let _ = writeln!(
            out,
            "  continue: ice reconfigure {0} --record FILE   or   ice kill {0}",
            r.run
        );
    }
    code
}

/// Start-up crash recovery, before a command starts or resumes a run: runs a stopped process
/// left behind are moved to a defined state (each one said on stderr).
async fn recover(rt: &Runtime, progress: &Progress) -> Result<()> {
    for r in rt.recover(progress).await? {
        let _ = writeln!(
            std::io::stderr(),
            "recovered run {}: {} → {} ({})",
            r.run,
            r.from,
            r.to,
            shown(&r.detail)
        );
    }
    Ok(())
}

pub async fn run(home: &Path, url: Option<&str>, a: RunArgs) -> Result<u8> {
    // Everything that can be wrong with the input is found before anything is recorded.
    let spec = RunSpec::load(&a.spec).map_err(|e| anyhow!("{e}"))?;
    let mut agent = crate::agents::load_agent(&spec)?;
    let (h, rt) = runtime(home, url).await?;
    // The run ends with a signed checkpoint: a key that cannot sign one is found now, before
    // the run acts, not after.
    h.signer()?;
    let progress = Progress {
        on: a.verbose || std::io::stderr().is_terminal(),
    };
    recover(&rt, &progress).await?;
    let watching = Watching {
        inner: &progress,
        run: std::sync::Mutex::new(None),
    };
    // SIGINT or SIGTERM (Ctrl-C, a supervisor stopping it): the run is killed as `ice kill`
    // kills it (recorded, waits and model calls given up, aborted), then reported and sealed
    // with a checkpoint. A second signal stops at once; recovery then suspends the run.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing a SIGTERM handler")?;
    // SIGHUP too: the terminal `ice run` was started from closed (its default would end the
    // process with nothing recorded, the run left executing until some later recovery).
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing a SIGHUP handler")?;
    // Who a signal's kill is recorded as ($USER, or "operator" if the record cannot carry it):
    // found now, so nothing about it can stop the kill later.
    let who = operator(&None).unwrap_or_else(|_| "operator".into());
    let started = rt.start(spec, agent.as_mut(), &watching);
    tokio::pin!(started);
    let signal = tokio::select! {
        r = &mut started => Err(r),
        _ = tokio::signal::ctrl_c() => Ok("SIGINT"),
        _ = term.recv() => Ok("SIGTERM"),
        _ = hup.recv() => Ok("SIGHUP"),
    };
    let report = match signal {
        Err(report) => report?,
        Ok(name) => {
            eprintln!(
                "ice run: {name}: killing the run (a second signal stops at once, and recovery then suspends the run)"
            );
            let reason = format!("ice run was stopped by {name}");
            let again = exit_on_next_signal(
                &mut term,
                "ice run: stopped at once: the run is left as it is; the next ICE command that opens the log recovers it (suspends it)",
            );
            let stopping = async {
                // The run's id comes with its first event, which may still be on its way.
                let run = loop {
                    if let Some(r) = watching
                        .run
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone()
                    {
                        break r;
                    }
                    tokio::select! {
                        r = &mut started => return r,
                        _ = tokio::time::sleep(std::time::Duration::from_millis(20)) => {}
                    }
                };
                let kill = async {
                    if let Err(e) = rt.kill(&run, &who, &reason, &ice_runtime::Quiet).await {
                        eprintln!("ice run: the kill of run {run} was not recorded: {e}");
                    }
                };
                tokio::join!(&mut started, kill).0
            };
            tokio::select! {
                report = stopping => report?,
                () = again => unreachable!("a second signal exits"),
            }
        }
    };
    let code = print_report(&report, a.json);
    // Signing reads what the last checkpoint does not cover, which takes a while on a large
    // log: SIGINT and SIGTERM are ICE's to handle now, so a signal then stops at once rather
    // than going unheard. The run is recorded in full either way.
    tokio::select! {
        sealed = seal_with_checkpoint(&h, &rt, a.json) => sealed?,
        () = exit_on_next_signal(
            &mut term,
            "ice run: stopped while sealing the run with a checkpoint: the run is recorded in full, but may be left unsealed (`ice checkpoint` seals it)",
        ) => unreachable!("a signal exits"),
    }
    Ok(code)
}

/// Wait for the next SIGINT, SIGTERM or SIGHUP, then say `what` and exit at once (130). Exiting runs no
/// destructor: the tool servers, in process groups of their own, are killed first, or they
/// would outlive this process.
pub(crate) async fn exit_on_next_signal(term: &mut tokio::signal::unix::Signal, what: &str) {
    let hangup = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(mut hup) => {
                hup.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        () = hangup => {}
    }
    eprintln!("{what}");
    ice_effects::kill_child_processes();
    std::process::exit(130);
}

/// The progress observer, noting the run's id from its first event (what a signal kills).
struct Watching<'a> {
    inner: &'a Progress,
    run: std::sync::Mutex<Option<RunId>>,
}

impl Observer for Watching<'_> {
    fn recorded(&self, e: &Event) {
        self.run
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(|| e.run_id.clone());
        self.inner.recorded(e);
    }

    fn waiting(&self, what: &str) {
        self.inner.waiting(what);
    }
}

/// After a run stops, sign a checkpoint of the log: from then on, removing or rewriting any of
/// the run's events (a truncated tail included) is caught by `ice verify`.
async fn seal_with_checkpoint(h: &Home, rt: &Runtime, quiet: bool) -> Result<()> {
    let size = seal(h, rt).await?;
    if !quiet {
        println!("  sealed:   checkpoint signed at log size {size}");
    }
    Ok(())
}

/// Sign a checkpoint of the log as it is now; returns its size.
pub(crate) async fn seal(h: &Home, rt: &Runtime) -> Result<u64> {
    let signed = crate::audit::sign_checkpoint(h, rt.ledger().log().as_ref())
        .await
        .context("signing a checkpoint after the run")?;
    Ok(signed.size)
}

pub async fn reconfigure(home: &Path, url: Option<&str>, a: ReconfigureArgs) -> Result<u8> {
    let run = RunId::new(a.run.clone()).map_err(|e| anyhow!("run {:?}: {e}", a.run))?;
    let text = String::from_utf8(crate::home::read_regular(&a.record, 1 << 20)?)
        .map_err(|_| anyhow!("{}: not UTF-8 text", a.record.display()))?;
    let record: ReconfigurationFile = toml::from_str(&text).map_err(|e| {
        let at = e
            .span()
            .map(|s| {
                let before = &text[..s.start.min(text.len())];
                format!(
                    "{}:{}:",
                    before.matches('\n').count() + 1,
                    before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1
                )
            })
            .unwrap_or_default();
        anyhow!("{}:{at} {}", a.record.display(), e.message())
    })?;
    let (h, rt) = runtime(home, url).await?;
    h.signer()?;
    let progress = Progress {
        on: a.verbose || std::io::stderr().is_terminal(),
    };
    // A run whose process was killed is suspended by recovery first, so it can be reconfigured.
    recover(&rt, &progress).await?;
    let id = rt
        .reconfigure(&run, &operator(&a.operator)?, &record)
        .await?;
    println!("recorded reconfiguration {id}");
    if a.no_resume {
        return Ok(EXIT_SUSPENDED);
    }
    let books = rt.books(&run).await?;
    let spec = books
        .spec
        .clone()
        .ok_or_else(|| anyhow!("run {run} has no recorded spec"))?;
    // The reconfiguration is recorded whatever follows: an error here says so, and what the run
    // was left as (read back: a resume that failed after `RunResumed` left it running).
    let left = |e: anyhow::Error, state: Option<ice_kernel::RunState>| {
        match state {
        Some(ice_kernel::RunState::Suspended) | None => e.context(format!(
            "reconfiguration {id} is recorded, but run {run} was not resumed and stays suspended; record another reconfiguration (ice reconfigure {run} --record FILE) that addresses this"
        )),
        Some(s) => e.context(format!(
            "reconfiguration {id} is recorded and run {run} was resumed, but driving it failed; it is {s} (`ice runs`, `ice log --run {run}`)"
        )),
    }
    };
    let mut agent = match crate::agents::load_agent(&spec) {
        Ok(a) => a,
        Err(e) => return Err(left(e, None)),
    };
    let report = match rt.resume(&run, agent.as_mut(), &progress).await {
        Ok(r) => r,
        Err(e) => {
            let state = rt.books(&run).await.ok().map(|b| b.state());
            return Err(left(e.into(), state));
        }
    };
    let code = print_report(&report, false);
    seal_with_checkpoint(&h, &rt, false).await?;
    Ok(code)
}

pub async fn kill(home: &Path, url: Option<&str>, a: KillArgs) -> Result<u8> {
    let run = RunId::new(a.run.clone()).map_err(|e| anyhow!("run {:?}: {e}", a.run))?;
    let (h, rt) = runtime(home, url).await?;
    let progress = Progress { on: false };
    let operator = operator(&a.operator)?;
    let killed = if a.abandon_commit {
        rt.kill_abandoning_commit(&run, &operator, &a.reason, &progress)
            .await?
    } else {
        rt.kill(&run, &operator, &a.reason, &progress).await?
    };
    let state = killed.state;
    if let Some(kept) = &killed.commit_abandoned {
        println!(
            "run {run} killed: {state}; its commit had passed the commit point and could not be completed, so it was abandoned (the workspace may hold part of it; `ice log --run {run}` lists its changes); its stage is kept at {}",
            kept.display()
        );
        seal_with_checkpoint(&h, &rt, false).await?;
    } else if let Some(n) = killed.commit_completed {
        println!(
            "run {run} was not killed: its commit had passed the commit point when its process stopped, so it was completed ({n} change(s) applied) and recorded: {state}"
        );
        seal_with_checkpoint(&h, &rt, false).await?;
    } else if state.is_non_terminal() {
        println!("kill requested; the process driving run {run} stops it before its next step");
    } else {
        println!("run {run} killed: {state}");
        seal_with_checkpoint(&h, &rt, false).await?;
    }
    Ok(0)
}

pub async fn approvals(home: &Path, url: Option<&str>, a: ApprovalsArgs) -> Result<u8> {
    let run = a
        .run
        .as_deref()
        .map(RunId::new)
        .transpose()
        .map_err(|e| anyhow!("--run: {e}"))?;
    let (_h, rt) = runtime_unclaimed(home, url).await?;
    // A run whose record does not fold is left out and named; asked about it alone, its fold
    // error is the answer.
    let pending = match run.as_ref() {
        Some(r) => rt.pending_approvals(Some(r)).await?,
        None => {
            let listing = rt.approval_listing(None).await?;
            for p in &listing.problems {
                eprintln!("warning: {p}");
            }
            listing.approvals
        }
    };
    let mut out = std::io::stdout().lock();
    if a.json {
        let _ = writeln!(out, "{}", serde_json::to_string(&pending)?);
        return Ok(0);
    }
    if pending.is_empty() {
        let _ = writeln!(out, "no approvals are waiting");
    }
    for p in &pending {
        let _ = writeln!(
            out,
            "{}  {} {} by agent:{}  \"{}\"\n    arguments {}  digest {}  expires {}\n    answer: ice approve {} | ice deny {}",
            p.id,
            p.capability,
            shown(&p.resource.to_string()),
            p.agent,
            shown(&p.intent),
            truncate(&p.arguments.to_string(), 160),
            &p.digest[..16],
            p.expires_at,
            p.id,
            p.id
        );
        if p.waiting == Some(false) {
            let _ = writeln!(
                out,
                "    nobody waits for it: the process that asked stopped, so an answer is refused. {}",
                p.advice.as_deref().unwrap_or("")
            );
        }
    }
    Ok(0)
}

pub async fn answer(home: &Path, url: Option<&str>, a: AnswerArgs, grant: bool) -> Result<u8> {
    let id: EventId = a
        .approval
        .parse()
        .map_err(|e| anyhow!("approval {:?}: {e}", a.approval))?;
    let (_h, rt) = runtime_unclaimed(home, url).await?;
    rt.answer_approval(&id, &operator(&a.operator)?, grant, &a.reason)
        .await?;
    println!("{} {id}", if grant { "approved" } else { "denied" });
    Ok(0)
}

pub async fn diff(home: &Path, url: Option<&str>, a: DiffArgs) -> Result<u8> {
    let run = RunId::new(a.run.clone()).map_err(|e| anyhow!("run {:?}: {e}", a.run))?;
    let (_h, rt) = runtime_unclaimed(home, url).await?;
    let changes = rt.diff(&run).await?;
    let mut out = std::io::stdout().lock();
    if a.json {
        let _ = writeln!(out, "{}", Value::Array(changes));
        return Ok(0);
    }
    if changes.is_empty() {
        let _ = writeln!(out, "run {run} changed nothing");
    }
    for c in &changes {
        let _ = writeln!(
            out,
            "{} {}  ({}, {})",
            match c["change"].as_str() {
                Some("added") => "A",
                Some("deleted") => "D",
                Some("unchanged") => "=",
                _ => "M",
            },
            shown(c["path"].as_str().unwrap_or("")),
            c["status"].as_str().unwrap_or(""),
            c["event"].as_str().unwrap_or("")
        );
        if let Some(after) = c["after"].as_str()
            && let Ok(d) = ice_kernel::Digest::from_hex(after)
            && let Some(bytes) = rt.staged_content(&run, &d)
            && let Ok(text) = std::str::from_utf8(&bytes)
        {
            for l in text.lines().take(40) {
                let _ = writeln!(out, "    + {}", shown_line(l));
            }
        }
    }
    Ok(0)
}

/// The causal chain of an event back to the run's start: each event's origin, intent,
/// authority (grant → decision/approval) and evidence.
pub async fn explain(home: &Path, url: Option<&str>, a: ExplainArgs) -> Result<u8> {
    let id: EventId = a
        .event
        .parse()
        .map_err(|e| anyhow!("event {:?}: {e}", a.event))?;
    let h = Home::open(home)?;
    let log = h.log(url, Mode::ReadOnly).await?;
    let events = ice_runtime::read_run(log.as_ref(), &id.run_id).await?;
    let Some(target) = events.get(id.run_seq as usize) else {
        return Err(anyhow!("no event {id}"));
    };
    let by_id: HashMap<String, &Event> = events.iter().map(|e| (e.id().to_string(), e)).collect();
    // Walk causes and authority links breadth-first, then print in log order.
    let mut seen: Vec<u64> = vec![target.run_seq];
    let mut queue = vec![target];
    let mut roles: HashMap<u64, &'static str> = HashMap::new();
    roles.insert(target.run_seq, "explained");
    while let Some(e) = queue.pop() {
        let mut links: Vec<(String, &'static str)> =
            e.causes.iter().map(|c| (c.to_string(), "cause")).collect();
        if let Some(auth) = &e.authority
            && by_id.contains_key(auth.as_str())
        {
            links.push((auth.clone(), "authority"));
        }
        for key in ["request", "approval", "grant"] {
            if let Some(v) = e.payload.get(key).and_then(Value::as_str) {
                links.push((v.to_string(), "authority"));
            }
        }
        for (l, role) in links {
            if let Some(c) = by_id.get(l.as_str())
                && !seen.contains(&c.run_seq)
            {
                seen.push(c.run_seq);
                roles.insert(c.run_seq, role);
                queue.push(c);
            }
        }
    }
    // The run's start (provisioning, context, policy binding) always frames the chain.
    for e in events.iter().take_while(|e| {
        !matches!(
            EventType::from_name(&e.event_type),
            Some(EventType::CapabilityRequested) | None
        ) && e.run_seq <= target.run_seq
    }) {
        if !seen.contains(&e.run_seq)
            && matches!(
                EventType::from_name(&e.event_type),
                Some(
                    EventType::RunProvisioned
                        | EventType::ContextResolved
                        | EventType::MemoryMounted
                        | EventType::CapabilitiesBound
                        | EventType::ExecutionWindowOpened
                )
            )
        {
            seen.push(e.run_seq);
            roles.insert(e.run_seq, "run start");
        }
    }
    // An event the run's fold refuses (say, a second answer to one approval, which logs
    // from before answers were checked can hold): the record holds it, the books do not.
    let refused = ice_runtime::Books::fold(id.run_id.clone(), events.iter()).err();
    if let Some(f) = &refused
        && !seen.contains(&f.event.run_seq)
        && f.event.run_seq <= target.run_seq
        && let Some(e) = events.get(f.event.run_seq as usize)
    {
        seen.push(e.run_seq);
        roles.insert(e.run_seq, "refused by the fold");
    }
    let refused_problem = |e: &Event| {
        refused
            .as_ref()
            .filter(|f| f.event.run_seq == e.run_seq)
            .map(|f| f.problem.clone())
    };
    seen.sort_unstable();
    let chain: Vec<&Event> = seen
        .iter()
        .filter_map(|s| events.get(*s as usize))
        .collect();
    let mut out = std::io::stdout().lock();
    if a.json {
        let doc: Vec<Value> = chain
            .iter()
            .map(|e| {
                let mut v = serde_json::to_value(e).unwrap_or(Value::Null);
                if let Value::Object(m) = &mut v {
                    m.insert(
                        "role".into(),
                        json!(roles.get(&e.run_seq).copied().unwrap_or("")),
                    );
                    if let Some(why) = refused_problem(e) {
                        m.insert("refused_by_fold".into(), json!(why));
                    }
                }
                v
            })
            .collect();
        let _ = writeln!(out, "{}", json!({"event": id.to_string(), "chain": doc}));
        return Ok(0);
    }
    for e in chain {
        let who = match &e.origin {
            Origin::Runtime => "runtime".to_string(),
            o => o.to_string(),
        };
        let _ = writeln!(
            out,
            "{:<10} {:<24} {:<22} {}",
            e.id().to_string(),
            e.event_type,
            who,
            roles.get(&e.run_seq).copied().unwrap_or("")
        );
        if let Some(why) = refused_problem(e) {
            let _ = writeln!(
                out,
                "           REFUSED by the run's fold (the log holds it; the run's books do not): {why}"
            );
        }
        if let Some(i) = &e.intent {
            let _ = writeln!(out, "           intent:    {}", shown(i));
        }
        if let Some(au) = &e.authority {
            let _ = writeln!(out, "           authority: {au}");
        }
        let p = &e.payload;
        for key in [
            "capability",
            "target",
            "scope",
            "policies",
            "policy_version",
            "reason",
            "detail",
            "digest",
            "path",
            "url",
            "status",
            "before",
            "after",
            // An MCP tool call: what was called, with what, what came back, how long it
            // took and over which protocol version.
            "server",
            "tool",
            "arguments",
            "result",
            "is_error",
            "error",
            "elapsed_us",
            "protocol_version",
        ] {
            if let Some(v) = p.get(key) {
                let text = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                let _ = writeln!(out, "           {key:<10} {}", truncate(&text, 120));
            }
        }
    }
    Ok(0)
}
