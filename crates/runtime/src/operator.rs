//! Starting and resuming runs, start-up recovery, and what operators do: approve, deny, kill,
//! reconfigure.
//!
//! Crash recovery ([`Runtime::recover`]) runs before a command starts or resumes a run. For
//! every run whose lock no live process holds and that is not terminated:
//!
//! | found in | becomes | why |
//! |---|---|---|
//! | CREATED, PROVISIONED, CONTEXT_READY | TERMINATED_BY_RUNTIME → TERMINATED | nothing executed; the state machine has no abort edge here |
//! | EXECUTING | SUSPENDED (`crash_recovery`) | an operator decides: reconfigure and resume, or kill |
//! | VALIDATING with a durable commit journal | COMMITTED → TERMINATED | the commit point was passed: roll forward (if that fails, the run is reported and left; an operator fixes the cause, or gives the commit up with [`Runtime::kill_abandoning_commit`]) |
//! | VALIDATING without one | ABORTED → TERMINATED | validation was interrupted; staged writes discarded |
//! | COMMITTED, ABORTED, TERMINATED_BY_RUNTIME | TERMINATED | teardown finished |
//! | SUSPENDED | unchanged | already waiting for an operator |

use std::sync::Arc;
use std::time::Instant;

use ice_authority::payload::{ApprovalDeniedPayload, ApprovalGrantedPayload};
use ice_authority::{ApprovalStatus, PolicySet};
use ice_effects::mcp::{ToolServers, ToolSpec};
use ice_effects::{Stage, Workspace};
use ice_kernel::{Agent, Digest, Draft, EventId, EventType, Origin, RunId, RunState};
use ice_log::LogError;
use ice_log::ledger::AppendError;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::act::Staging;
use crate::books::Books;
use crate::executor::{Completion, Ctx, Live, PolicyStamp, RunOutcome, RunReport, report};
use crate::spec::{Assumption, BudgetSpec, RunSpec};
use crate::{Observer, Runtime, RuntimeError};

/// Why a stopped run is attached: to drive it on (its policy must load), or to end it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Attach {
    Drive,
    End,
}

/// What [`Runtime::kill`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Killed {
    /// The run's state now: still non-terminal when a live process drives it (it stops the
    /// run before its next step).
    pub state: RunState,
    /// The run's commit had passed its commit point when its process stopped: it could not be
    /// aborted, and was completed (this many changes) and recorded instead.
    pub commit_completed: Option<usize>,
    /// Such a commit could not be completed and the operator abandoned it
    /// ([`Runtime::kill_abandoning_commit`]): where its stage directory was kept.
    pub commit_abandoned: Option<std::path::PathBuf>,
}

/// What [`Runtime::approval_listing`] finds: the approvals waiting, and the runs it could not
/// list.
#[derive(Debug, Serialize)]
pub struct ApprovalListing {
    /// Approvals waiting for an operator.
    pub approvals: Vec<PendingApproval>,
    /// Runs left out because their record does not fold.
    pub problems: Vec<RunProblem>,
}

/// A run whose record does not fold: the event its fold refuses, and why.
#[derive(Debug, Serialize)]
pub struct RunProblem {
    /// The run.
    pub run: String,
    /// The refused event.
    pub event: String,
    /// Why it is refused.
    pub problem: String,
    /// The fold error itself.
    #[serde(skip)]
    pub error: crate::FoldError,
}

impl std::fmt::Display for RunProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "run {} left out: its record does not fold at event {}: {} (`ice explain {}` shows it)",
            self.run, self.event, self.problem, self.event
        )
    }
}

/// An approval waiting for an operator.
#[derive(Clone, Debug, Serialize)]
pub struct PendingApproval {
    /// Its id (the `ApprovalRequested` event).
    pub id: String,
    /// The run.
    pub run: String,
    /// The agent asking.
    pub agent: String,
    /// What it asks for.
    pub capability: String,
    /// On what.
    pub resource: String,
    /// With which arguments.
    pub arguments: Value,
    /// The digest an approval binds to.
    pub digest: String,
    /// When it times out.
    pub expires_at: String,
    /// The policies that asked for approval.
    pub policies: Vec<String>,
    /// The agent's intent.
    pub intent: String,
    /// Whether a process waits for the answer: `false` when the process that asked stopped
    /// (answering is refused; recovery suspends the run, which is then resumed or killed);
    /// absent where it cannot be told from here (a log shared with other nodes, whose
    /// processes may be waiting).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting: Option<bool>,
    /// When nobody waits (`waiting` is `false`): what an operator can do about the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advice: Option<String>,
}

/// What an operator can do about a run whose approval nobody waits for any more (the process
/// that asked stopped): an external agent's session cannot be resumed by ICE, only ended.
fn unwaited_advice(books: &Books) -> &'static str {
    if books.spec.as_ref().is_some_and(|s| s.driver == "external") {
        "It was an external agent's MCP session, which has ended: end the run with `ice kill` (the agent's next session is a new run, and asks again)"
    } else if books.state() == RunState::Suspended {
        "Resume it with `ice reconfigure`, and its agent asks again, or end it with `ice kill`"
    } else {
        "Start-up recovery (`ice serve`, or the next `ice run`) suspends the run; then resume it with `ice reconfigure`, and its agent asks again, or end it with `ice kill`"
    }
}

/// What recovery did to one run.
#[derive(Clone, Debug, Serialize)]
pub struct Recovered {
    /// The run.
    pub run: String,
    /// Its state before.
    pub from: String,
    /// Its state after.
    pub to: String,
    /// Why.
    pub detail: String,
}

/// A reconfiguration record, as an operator writes it (TOML):
///
/// ```toml
/// reason = "config.toml was updated on purpose; continue against the new content"
/// accept_files = true          # re-baseline file assumptions to their current digests
/// accept_policy = true         # re-baseline the policy version assumption
/// [budget]                     # optional: new limits (same keys as the run spec's [budget]);
/// tool_calls = 40              # a key left out keeps its current limit
/// ```
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconfigurationFile {
    /// Why the run may continue.
    pub reason: String,
    /// Re-baseline file assumptions.
    #[serde(default)]
    pub accept_files: bool,
    /// Re-baseline the policy version assumption.
    #[serde(default)]
    pub accept_policy: bool,
    /// New budget limits.
    pub budget: Option<toml::Table>,
}

fn now_id() -> String {
    let mut b = [0u8; 4];
    let _ = getrandom::fill(&mut b);
    hex::encode(b)
}

impl Runtime {
    fn policy_dir(&self, spec: &RunSpec) -> std::path::PathBuf {
        spec.policy
            .clone()
            .unwrap_or_else(|| self.install.policy_dir.clone())
    }

    /// The spec's policy (which keeps the files it was built from: recorded at context time,
    /// so a replay can re-decide the run's requests under exactly this policy), its directory,
    /// and the stamp of the directory's files taken just before they were read: an edit made
    /// after that (while the run starts, say) differs from the stamp, so the run's first check
    /// takes it on. A stamp taken later would hide it for good.
    fn load_policy(
        &self,
        spec: &RunSpec,
    ) -> Result<(PolicySet, std::path::PathBuf, PolicyStamp), RuntimeError> {
        let dir = self.policy_dir(spec);
        let stamp = PolicyStamp::of(&dir);
        let set = PolicySet::load_dir(&dir, &self.schema)
            .map_err(|e| RuntimeError::Policy(format!("{}: {e}", dir.display())))?;
        Ok((set, dir, stamp))
    }

    pub(crate) fn open_stage(
        &self,
        run: &RunId,
        spec: &RunSpec,
        books: Option<&Books>,
    ) -> Result<Staging, RuntimeError> {
        let dir = self.run_dir(run).join("stage");
        let ws = Workspace::open(&spec.workspace)
            .map_err(|e| RuntimeError::Io(format!("workspace: {e}")))?;
        let ops: Vec<ice_effects::StagedOp> = books
            .map(|b| b.staged.iter().map(|o| o.op.clone()).collect())
            .unwrap_or_default();
        let stage = Stage::from_ops(&dir, ws, run.clone(), ops)
            .map_err(|e| RuntimeError::Io(format!("stage: {e}")))?;
        for (path, state) in books.map(|b| &b.seen).into_iter().flatten() {
            stage.remember_seen(path, *state);
        }
        Ok(Staging {
            stage: Some(stage),
            dir,
        })
    }

    /// Check what a run of `spec` needs before anything is recorded (its policy loads), so a
    /// long-lived host (the MCP gateway) can refuse a bad spec at start-up.
    pub fn preflight(&self, spec: &RunSpec) -> Result<(), RuntimeError> {
        self.load_policy(spec).map(|_| ())
    }

    /// Start a run from its spec with `agent` and drive it to its end (or suspension).
    /// Everything that can be wrong with the spec, the policy or the workspace is found before
    /// the first event is recorded.
    pub async fn start(
        &self,
        spec: RunSpec,
        agent: &mut dyn Agent,
        observer: &dyn Observer,
    ) -> Result<RunReport, RuntimeError> {
        self.start_by(spec, agent, observer, None).await
    }

    /// [`Self::start`], recording in `RunProvisioned` who started the run (`operator:NAME`,
    /// when an operator asked for it through an interface).
    pub async fn start_by(
        &self,
        spec: RunSpec,
        agent: &mut dyn Agent,
        observer: &dyn Observer,
        started_by: Option<Origin>,
    ) -> Result<RunReport, RuntimeError> {
        let session = self
            .open_session_inner(spec, agent.id(), observer, None, None, started_by)
            .await?;
        let outcome = self.drive_to_end(&session.ctx, agent).await?;
        session.into_report(outcome).await
    }

    /// Provision a run and open its execution window, for proposals made through
    /// [`Session::propose`] (one at a time or concurrently) instead of by an [`Agent`].
    pub async fn open_session<'a>(
        &'a self,
        spec: RunSpec,
        agent_id: &str,
        observer: &'a dyn Observer,
    ) -> Result<Session<'a>, RuntimeError> {
        self.open_session_with_tools(spec, agent_id, observer, None, None)
            .await
    }

    /// [`Self::open_session`] with MCP tool servers already running (the gateway starts the
    /// spec's servers once and shares them between its sessions; without them, the spec's
    /// servers are started for this run and stopped with it), and what the agent's side said
    /// of itself (an MCP client's name, version and negotiated protocol), recorded in
    /// `RunProvisioned`.
    pub async fn open_session_with_tools<'a>(
        &'a self,
        spec: RunSpec,
        agent_id: &str,
        observer: &'a dyn Observer,
        tools: Option<Arc<ToolServers>>,
        client: Option<Value>,
    ) -> Result<Session<'a>, RuntimeError> {
        self.open_session_inner(spec, agent_id, observer, tools, client, None)
            .await
    }

    async fn open_session_inner<'a>(
        &'a self,
        mut spec: RunSpec,
        agent_id: &str,
        observer: &'a dyn Observer,
        tools: Option<Arc<ToolServers>>,
        client: Option<Value>,
        started_by: Option<Origin>,
    ) -> Result<Session<'a>, RuntimeError> {
        let run = match &spec.id {
            Some(id) => id.clone(),
            None => {
                let stem = spec
                    .file
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "run".into());
                let clean: String = stem
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                            c
                        } else {
                            '-'
                        }
                    })
                    .take(40)
                    .collect();
                RunId::new(format!("{clean}-{}", now_id())).map_err(RuntimeError::Invalid)?
            }
        };
        spec.id = Some(run.clone());
        // Pre-flight: nothing is recorded unless all of this holds.
        if !self.ledger.log().read_run(&run, 0, 1).await?.is_empty() {
            return Err(RuntimeError::Exists(run.to_string()));
        }
        let home = self
            .install
            .runs_dir
            .parent()
            .unwrap_or(&self.install.runs_dir);
        let home = std::fs::canonicalize(home).unwrap_or_else(|_| home.to_path_buf());
        if home.starts_with(&spec.workspace) {
            return Err(RuntimeError::Spec(crate::SpecError {
                file: spec.file.display().to_string(),
                at: None,
                problem: format!(
                    "[run] workspace {} contains this ICE installation ({}), so an agent could read its keys and log; use a home outside the workspace (--home or ICE_HOME) or a workspace below it",
                    spec.workspace.display(),
                    home.display()
                ),
            }));
        }
        if spec.workspace.starts_with(&home) {
            return Err(RuntimeError::Spec(crate::SpecError {
                file: spec.file.display().to_string(),
                at: None,
                problem: format!(
                    "[run] workspace {} is inside this ICE installation ({}), beside its keys, policies and log, which an agent must not reach; use a workspace outside the home",
                    spec.workspace.display(),
                    home.display()
                ),
            }));
        }
        let (policy, policy_dir, policy_stamp) = self.load_policy(&spec)?;
        let mut assumptions = Vec::new();
        for a in &spec.assumptions {
            assumptions.push(match a {
                Assumption::File { path, sha256 } => {
                    let now =
                        crate::act::workspace_digest(&spec.workspace, path).ok_or_else(|| {
                            RuntimeError::Spec(crate::SpecError {
                                file: spec.file.display().to_string(),
                                at: None,
                                problem: format!(
                                    "[[assume]] file {path:?} cannot be read in the workspace"
                                ),
                            })
                        })?;
                    if let Some(want) = sha256
                        && *want != now
                    {
                        return Err(RuntimeError::Spec(crate::SpecError {
                            file: spec.file.display().to_string(),
                            at: None,
                            problem: format!(
                                "[[assume]] file {path:?} has sha256 {}, not the assumed {}",
                                now.to_hex(),
                                want.to_hex()
                            ),
                        }));
                    }
                    Assumption::File {
                        path: path.clone(),
                        sha256: Some(now),
                    }
                }
                Assumption::PolicyVersion { version } => {
                    let v = policy.version();
                    if let Some(want) = version
                        && *want != v.0
                    {
                        return Err(RuntimeError::Policy(format!(
                            "the run assumes policy version {}, but it is {}",
                            want.to_hex(),
                            v.to_hex()
                        )));
                    }
                    Assumption::PolicyVersion { version: Some(v.0) }
                }
            });
        }
        let tools = match tools {
            Some(t) => Some(t),
            None => start_tools(&spec).await?,
        };
        let dir = self.run_dir(&run);
        let lock = self.lock_run(&run).await?;
        let stage = self.open_stage(&run, &spec, None)?;
        let version = policy.version();
        // Governed memory: the active, unexpired memories the spec mounts (the registry stays
        // locked until `MemoryMounted` is recorded below).
        let mounting = crate::memory::mount(self, &spec, &run).await?;
        let live = Live {
            books: Books::new(run.clone()),
            spec: spec.clone(),
            policy: Arc::new(policy),
            policy_dir: policy_dir.clone(),
            policy_stamp,
            stage,
            last: None,
            window_started: Instant::now(),
            last_poll: None,
            in_flight: 0,
            memories: mounting.memories.clone(),
        };
        let bound_tools = bound_tools(&self.registry, &spec, tools.as_deref());
        let ctx = Ctx {
            rt: self,
            run: run.clone(),
            observer,
            live: Mutex::new(live),
            _lock: lock,
            tools,
        };
        // Provision, context, bind, open the window.
        {
            let mut g = ctx.live.lock().await;
            let live = &mut *g;
            let spec_json = serde_json::to_value(&spec).unwrap_or(Value::Null);
            let caps: Vec<Value> = self
                .registry
                .iter()
                .map(|c| {
                    json!({"name": c.name(), "resource": c.resource().to_string(),
                           "effect": c.classifier().floor().as_str()})
                })
                .collect();
            let agent_id = agent_id.to_string();
            let ctx_payload = json!({
                "assumptions": serde_json::to_value(&assumptions).unwrap_or(Value::Null),
                "policy_version": version.to_hex(),
                "policy_dir": policy_dir.display().to_string(),
                "policy_sources": live.policy.sources(),
                "workspace": spec.workspace.display().to_string(),
            });
            ctx.append(live, |_| {
                vec![
                    Draft::new(EventType::RunProvisioned.name(), Origin::Runtime).payload(json!({
                        "spec": spec_json,
                        "agent": agent_id,
                        "driver": spec.driver,
                        "client": client.clone(),
                        "started_by": started_by.as_ref().map(|o| o.to_string()),
                        "taxonomy": ice_kernel::TAXONOMY_VERSION,
                        "decision_rules": crate::DECISION_RULES,
                    })),
                    Draft::new(EventType::ResourcesAllocated.name(), Origin::Runtime)
                        .payload(json!({"stage": dir.join("stage").display().to_string()})),
                    Draft::new(EventType::ContextResolved.name(), Origin::Runtime)
                        .payload(ctx_payload.clone()),
                    // The memories mounted (ids, digests, kinds) and those skipped, with why.
                    Draft::new(EventType::MemoryMounted.name(), Origin::Runtime)
                        .payload(mounting.payload.clone()),
                    Draft::new(EventType::CapabilitiesBound.name(), Origin::Runtime).payload(
                        json!({
                            "capabilities": caps,
                            "tools": bound_tools,
                            "policy_version": version.to_hex(),
                        }),
                    ),
                    Draft::new(EventType::ExecutionWindowOpened.name(), Origin::Runtime)
                        .payload(json!({"agent": agent_id})),
                ]
            })
            .await?;
            live.window_started = Instant::now();
        }
        Ok(Session {
            ctx,
            agent: agent_id.to_string(),
            stopped: std::sync::Mutex::new(None),
            stopping: std::sync::atomic::AtomicBool::new(false),
        })
    }

    async fn drive_to_end(
        &self,
        ctx: &Ctx<'_>,
        agent: &mut dyn Agent,
    ) -> Result<RunOutcome, RuntimeError> {
        match ctx.drive(agent).await? {
            RunOutcome::Committed => ctx.finish().await,
            other => Ok(other),
        }
    }

    /// Take a stopped run's lock and rebuild its live state from the log. To end a run
    /// (`Attach::End`: kill, recovery) its policy need not load: nothing is decided while a
    /// run is aborted, terminated or its journalled commit completed, and a policy directory
    /// that broke must not keep an operator from stopping the run.
    async fn attach<'a>(
        &'a self,
        run: &RunId,
        observer: &'a dyn Observer,
        purpose: Attach,
    ) -> Result<Ctx<'a>, RuntimeError> {
        let dir = self.run_dir(run);
        let lock = self.lock_run(run).await?;
        let books = self.books(run).await?;
        let spec = books
            .spec
            .clone()
            .ok_or_else(|| RuntimeError::Invalid(format!("run {run} has no recorded spec")))?;
        let recorded = crate::read_run(self.ledger.log().as_ref(), run).await?;
        let memories = self.mounted_memories(&recorded).await?;
        let (policy, policy_dir, policy_stamp) = match (self.load_policy(&spec), purpose) {
            (Ok(p), _) => p,
            (Err(e), Attach::Drive) => return Err(e),
            (Err(_), Attach::End) => (
                PolicySet::from_sources(&[], &self.schema)
                    .map_err(|e| RuntimeError::Policy(e.to_string()))?,
                self.policy_dir(&spec),
                PolicyStamp::default(),
            ),
        };
        let stage = if books.state().is_non_terminal() {
            match self.open_stage(run, &spec, Some(&books)) {
                Ok(s) => s,
                Err(_) => Staging {
                    stage: None,
                    dir: dir.join("stage"),
                },
            }
        } else {
            Staging {
                stage: None,
                dir: dir.join("stage"),
            }
        };
        let live = Live {
            books,
            spec,
            policy: Arc::new(policy),
            policy_stamp,
            policy_dir,
            stage,
            last: None,
            window_started: Instant::now(),
            last_poll: None,
            in_flight: 0,
            memories,
        };
        Ok(Ctx {
            rt: self,
            run: run.clone(),
            observer,
            live: Mutex::new(live),
            _lock: lock,
            tools: None,
        })
    }

    /// Resume a suspended run that has a reconfiguration record, with `agent`.
    pub async fn resume(
        &self,
        run: &RunId,
        agent: &mut dyn Agent,
        observer: &dyn Observer,
    ) -> Result<RunReport, RuntimeError> {
        let mut ctx = self.attach(run, observer, Attach::Drive).await?;
        let spec = ctx.live.lock().await.spec.clone();
        ctx.tools = start_tools(&spec).await?;
        {
            let mut g = ctx.live.lock().await;
            let live = &mut *g;
            let state = live.books.state();
            if state != RunState::Suspended {
                return Err(RuntimeError::State {
                    run: run.to_string(),
                    state,
                    what: "only a suspended run can be resumed".into(),
                });
            }
            let Some((rec, _)) = live.books.reconfiguration.clone() else {
                return Err(RuntimeError::State {
                    run: run.to_string(),
                    state,
                    what: "resuming needs a reconfiguration record first (ice reconfigure RUN --record FILE)".into(),
                });
            };
            if let Some(why) = ctx.broken_assumption(live) {
                return Err(RuntimeError::State {
                    run: run.to_string(),
                    state,
                    what: format!(
                        "an assumption still does not hold after the reconfiguration: {why}; record one that accepts it"
                    ),
                });
            }
            // The changes it staged must be here: on a shared log, the node that staged them
            // keeps them in its own home. Refused before anything is recorded, so the run stays
            // suspended for the node that can resume it (or for a kill).
            if live.stage.stage.is_none() {
                let why = self
                    .open_stage(run, &live.spec, Some(&live.books))
                    .err()
                    .map_or_else(|| "it could not be opened".to_string(), |e| e.to_string());
                return Err(RuntimeError::State {
                    run: run.to_string(),
                    state,
                    what: format!(
                        "its stage (the changes it staged, kept in {}) cannot be used here: {why}; resume it on the node whose home holds its stage, or kill it",
                        live.stage.dir.display()
                    ),
                });
            }
            // A policy changed while the run was suspended is taken on only when an operator
            // accepted it (recorded); then the live grants are re-decided under it.
            let now_version = live.policy.version();
            if live.books.policy_version.is_some_and(|v| v != now_version) {
                return Err(RuntimeError::State {
                    run: run.to_string(),
                    state,
                    what: format!(
                        "its policy changed while it was suspended (now version {}); to resume under it, record a reconfiguration with accept_policy = true",
                        crate::executor::short(&now_version.to_hex())
                    ),
                });
            }
            // An agent with a conversation continues it rather than starting over.
            live.last = self
                .rebuild_agent(run, agent, live.memories.clone())
                .await?;
            // A policy the reconfiguration accepted is recorded with its files as the run
            // resumes, in the same batch (as is the policy of a run whose context, recorded
            // by an older ICE, did not hold its files), and live grants are re-decided.
            let why = if live.books.policy_recorded.is_some() {
                format!("the run resumed under the policy its reconfiguration {rec} accepted")
            } else {
                "the run resumed, and its record did not hold its policy files yet".to_string()
            };
            let resumed = Draft::new(EventType::RunResumed.name(), Origin::Runtime)
                .payload(json!({
                    "reconfiguration": rec.to_string(),
                    "decision_rules": crate::DECISION_RULES,
                }))
                .cause(rec.clone());
            ctx.take_on_policy(live, &why, vec![resumed]).await?;
            live.window_started = Instant::now();
        }
        let outcome = self.drive_to_end(&ctx, agent).await?;
        let books = ctx.live.into_inner().books;
        report(self, run, outcome, books).await
    }

    /// Record an operator's reconfiguration of a suspended run (I-004).
    pub async fn reconfigure(
        &self,
        run: &RunId,
        operator: &str,
        record: &ReconfigurationFile,
    ) -> Result<EventId, RuntimeError> {
        if record.reason.trim().is_empty() {
            return Err(RuntimeError::Invalid(
                "the reconfiguration record needs a `reason`".into(),
            ));
        }
        let books = self.books(run).await?;
        if books.state() != RunState::Suspended {
            return Err(RuntimeError::State {
                run: run.to_string(),
                state: books.state(),
                what: "only a suspended run can be reconfigured".into(),
            });
        }
        let spec = books
            .spec
            .clone()
            .ok_or_else(|| RuntimeError::Invalid(format!("run {run} has no recorded spec")))?;
        // An external agent's run (an MCP session) has no agent in ICE to resume it, and its
        // session is gone: no reconfiguration can let it go on.
        if spec.driver == "external" {
            return Err(RuntimeError::State {
                run: run.to_string(),
                state: books.state(),
                what: format!(
                    "run {run} was an external agent's MCP session, which has ended: no agent in ICE can resume it, whatever is reconfigured. End it with `ice kill {run}`; the agent's next session is a new run"
                ),
            });
        }
        let mut new = serde_json::Map::new();
        let mut evidence = serde_json::Map::new();
        if record.accept_files || record.accept_policy {
            let policy = if record.accept_policy {
                Some(self.load_policy(&spec)?.0.version())
            } else {
                None
            };
            let mut renewed = Vec::new();
            for a in &books.assumptions {
                renewed.push(match a {
                    Assumption::File { path, sha256 } if record.accept_files => {
                        let now = crate::act::workspace_digest(&spec.workspace, path);
                        evidence.insert(
                            path.clone(),
                            json!({"was": sha256.map(|d| d.to_hex()), "now": now.map(|d| d.to_hex())}),
                        );
                        Assumption::File {
                            path: path.clone(),
                            sha256: now,
                        }
                    }
                    Assumption::PolicyVersion { version } if record.accept_policy => {
                        let now = policy.as_ref().map(|v| v.0);
                        evidence.insert(
                            "policy_version".into(),
                            json!({"was": version.map(|d| d.to_hex()), "now": now.map(|d| d.to_hex())}),
                        );
                        Assumption::PolicyVersion { version: now }
                    }
                    other => other.clone(),
                });
            }
            new.insert(
                "assumptions".into(),
                serde_json::to_value(&renewed).unwrap_or(Value::Null),
            );
            if let Some(v) = policy {
                new.insert("policy_version".into(), Value::String(v.to_hex()));
            }
        }
        if let Some(b) = &record.budget {
            // Every limit is one value; a table would be written as a section of its own below
            // and be refused as if it were not in [budget] at all.
            if let Some((key, _)) = b.iter().find(|(_, v)| {
                v.is_table() || v.as_array().is_some_and(|a| a.iter().any(|v| v.is_table()))
            }) {
                return Err(RuntimeError::Invalid(format!(
                    "[budget]: `{key}` is a table; each limit is a single value"
                )));
            }
            let text = format!("[budget]\n{}", toml::to_string(b).unwrap_or_default());
            let probe = format!(
                "[run]\nagent = \"x\"\nworkspace = \".\"\n[agent]\ndriver = \"external\"\n{text}"
            );
            // Checked as a run spec's [budget] is; the probe's workspace is any directory that
            // exists (the run's own may be gone, and is not what is being checked).
            let parsed = RunSpec::parse(
                std::path::Path::new("reconfiguration"),
                &probe,
                &std::env::temp_dir(),
            )
            .map_err(|e| RuntimeError::Invalid(format!("[budget]: {}", e.problem)))?;
            // The keys given replace those limits; every other limit (and what exhaustion does)
            // stays as it is: a record that raises one limit does not lift the others.
            let given: BudgetSpec = parsed.budget;
            let mut budget: BudgetSpec = spec.budget;
            for key in b.keys() {
                match key.as_str() {
                    "tool_calls" => budget.tool_calls = given.tool_calls,
                    "bytes" => budget.bytes = given.bytes,
                    "wall_time" => budget.wall_time_us = given.wall_time_us,
                    "tokens_in" => budget.tokens_in = given.tokens_in,
                    "tokens_out" => budget.tokens_out = given.tokens_out,
                    "credits_micro" => budget.credits_micro = given.credits_micro,
                    "risk" => budget.risk = given.risk,
                    "denials" => budget.denials = given.denials,
                    "on_exhaustion" => budget.on_exhaustion = given.on_exhaustion,
                    // The parse above refuses any other key.
                    other => {
                        return Err(RuntimeError::Invalid(format!(
                            "[budget]: unknown key {other:?}"
                        )));
                    }
                }
            }
            new.insert(
                "budget".into(),
                serde_json::to_value(budget).unwrap_or(Value::Null),
            );
        }
        let prior = json!({
            "assumptions": serde_json::to_value(&books.assumptions).unwrap_or(Value::Null),
            "budget": serde_json::to_value(spec.budget).unwrap_or(Value::Null),
            "policy_version": books.policy_version.as_ref().map(|v| v.to_hex()),
        });
        let payload = json!({
            "invalidation": books.suspension.clone().unwrap_or(Value::Null),
            "prior": prior,
            "new": Value::Object(new),
            "scope": "run",
            "authority": format!("operator:{operator}"),
            "reason": record.reason,
            "evidence": Value::Object(evidence),
        });
        let origin = operator_origin(operator)?;
        let (_, batch) = self
            .ledger
            .append(
                run,
                vec![
                    Draft::new(EventType::ReconfigurationRecorded.name(), origin).payload(payload),
                ],
            )
            .await?;
        Ok(batch.events()[0].event().id())
    }

    /// Record an operator's request to kill a run. If no process is driving it, the run is
    /// aborted (or terminated) here and now; a run whose commit passed its commit point and
    /// was interrupted cannot be aborted: its commit is completed instead (and said so). If
    /// that commit cannot be completed (its workspace is gone, say), the kill fails and says
    /// so; [`Runtime::kill_abandoning_commit`] ends such a run anyway.
    pub async fn kill(
        &self,
        run: &RunId,
        operator: &str,
        reason: &str,
        observer: &dyn Observer,
    ) -> Result<Killed, RuntimeError> {
        self.kill_with(run, operator, reason, observer, false).await
    }

    /// [`Runtime::kill`], and if the run's interrupted commit cannot be completed, give it up:
    /// the run is terminated by the runtime with a record of the failure and of every change
    /// the commit's journal names (the workspace may hold any part of them), and the stage
    /// directory, journal and staged contents included, is kept beside the run's directory
    /// for the operator (`Killed::commit_abandoned`). A commit that can be completed still is.
    pub async fn kill_abandoning_commit(
        &self,
        run: &RunId,
        operator: &str,
        reason: &str,
        observer: &dyn Observer,
    ) -> Result<Killed, RuntimeError> {
        self.kill_with(run, operator, reason, observer, true).await
    }

    async fn kill_with(
        &self,
        run: &RunId,
        operator: &str,
        reason: &str,
        observer: &dyn Observer,
        abandon: bool,
    ) -> Result<Killed, RuntimeError> {
        let books = self.books(run).await?;
        if !books.state().is_non_terminal() {
            return Err(RuntimeError::State {
                run: run.to_string(),
                state: books.state(),
                what: "the run has already ended".into(),
            });
        }
        let origin = operator_origin(operator)?;
        self.ledger
            .append(
                run,
                vec![
                    Draft::new(EventType::RunKillRequested.name(), origin)
                        .payload(json!({"reason": reason})),
                ],
            )
            .await?;
        match self.attach(run, observer, Attach::End).await {
            Ok(ctx) => {
                let mut g = ctx.live.lock().await;
                let live = &mut *g;
                let detail = crate::executor::kill_detail(&format!("operator:{operator}"), reason);
                if live.books.state() == RunState::Validating {
                    match ctx.try_complete_interrupted_commit(live).await? {
                        Completion::Done(Some(changes)) => {
                            return Ok(Killed {
                                state: live.books.state(),
                                commit_completed: Some(changes),
                                commit_abandoned: None,
                            });
                        }
                        Completion::Done(None) => {}
                        Completion::CannotApply(e) if abandon => {
                            let kept = ctx.abandon_commit(live, &detail, &e).await?;
                            return Ok(Killed {
                                state: live.books.state(),
                                commit_completed: None,
                                commit_abandoned: Some(kept),
                            });
                        }
                        Completion::CannotApply(e) => {
                            return Err(RuntimeError::State {
                                run: run.to_string(),
                                state: live.books.state(),
                                what: format!(
                                    "it passed its commit point, so it cannot be aborted, and its commit could not be completed: {e}. Fix the cause and kill it again, or give the commit up (`ice kill {run} --abandon-commit`, or \"abandon_commit\": true in the API's kill); the workspace may then hold part of it"
                                ),
                            });
                        }
                    }
                }
                match live.books.state() {
                    RunState::Executing => {
                        // No process drives it (one stopped without recovery since): its calls
                        // left open are answered first, as recovery would.
                        ctx.answer_interrupted(live).await?;
                        ctx.abort(live, "killed", &detail).await?;
                    }
                    RunState::Suspended | RunState::Validating => {
                        ctx.abort(live, "killed", &detail).await?;
                    }
                    s if s.is_non_terminal() => {
                        ctx.terminate_by_runtime(live, &detail).await?;
                    }
                    _ => {}
                }
                Ok(Killed {
                    state: live.books.state(),
                    commit_completed: None,
                    commit_abandoned: None,
                })
            }
            // A live process (here, or on another node) drives it: it sees the request
            // before its next step.
            Err(RuntimeError::Busy(_) | RuntimeError::Claimed(_)) => Ok(Killed {
                state: books.state(),
                commit_completed: None,
                commit_abandoned: None,
            }),
            Err(e) => Err(e),
        }
    }

    /// Approvals waiting for an operator, across runs (or in one run).
    ///
    /// Across runs, a run whose record does not fold (say, a second answer to one approval,
    /// which logs written before answers were checked can hold) is left out and the others are
    /// listed: [`Runtime::approval_listing`] says which runs were left out and why. Asked about
    /// that one run (`only`), the fold error is the answer.
    pub async fn pending_approvals(
        &self,
        only: Option<&RunId>,
    ) -> Result<Vec<PendingApproval>, RuntimeError> {
        let listing = self.approval_listing(only).await?;
        if only.is_some()
            && let Some(p) = listing.problems.into_iter().next()
        {
            return Err(RuntimeError::Fold(p.error));
        }
        Ok(listing.approvals)
    }

    /// Approvals waiting for an operator, across runs (or in one run), and the runs left out
    /// because their record does not fold: each is named with the event its fold refuses, and
    /// does not keep the other runs' approvals from being listed.
    pub async fn approval_listing(
        &self,
        only: Option<&RunId>,
    ) -> Result<ApprovalListing, RuntimeError> {
        let runs = match only {
            Some(r) => vec![r.clone()],
            None => self.unfinished_runs().await?,
        };
        let now = self.clock.now();
        let mut out = Vec::new();
        let mut problems = Vec::new();
        for run in runs {
            // Only live runs can wait; the head is a fold of headers, far cheaper than events.
            if !self.ledger.head(&run).await?.state().is_non_terminal() {
                continue;
            }
            let events = crate::read_run(self.ledger.log().as_ref(), &run).await?;
            if !events
                .iter()
                .any(|e| e.event_type == EventType::ApprovalRequested.name())
            {
                continue;
            }
            let books = match Books::fold(run.clone(), events.iter()) {
                Ok(b) => b,
                Err(error) => {
                    problems.push(RunProblem {
                        run: run.to_string(),
                        event: error.event.to_string(),
                        problem: error.problem.clone(),
                        error,
                    });
                    continue;
                }
            };
            // A killed run answers no more approvals (it closes them as it stops).
            if !books.state().is_non_terminal() || books.kill.is_some() {
                continue;
            }
            // Whether the process that asked still waits: its run's file lock is held (seen
            // without taking it). On a shared log another node may be waiting: not told.
            let held = crate::lock::RunLock::held(&self.run_dir(&run));
            let waiting = match held {
                Some(true) => Some(true),
                _ if self.ledger.log().claims_lapse() => None,
                other => other,
            };
            // Nor does one the runtime already closed (the call it was for was refused).
            for a in books
                .approvals
                .pending(now)
                .filter(|a| !books.closed.contains_key(&a.id))
            {
                let intent = events
                    .get(a.request.run_seq as usize)
                    .and_then(|e| e.intent.clone())
                    .unwrap_or_default();
                out.push(PendingApproval {
                    id: a.id.to_string(),
                    run: run.to_string(),
                    agent: a.agent.clone(),
                    capability: a.capability.clone(),
                    resource: a.resource.to_string(),
                    arguments: Value::Object(a.arguments.clone()),
                    digest: a.digest.to_hex(),
                    expires_at: a.expires_at.to_string(),
                    policies: a.policies.clone(),
                    intent,
                    waiting,
                    advice: (waiting == Some(false)).then(|| unwaited_advice(&books).to_string()),
                });
            }
        }
        Ok(ApprovalListing {
            approvals: out,
            problems,
        })
    }

    /// An operator grants (`grant`) or denies an approval.
    ///
    /// An approval request takes one answer. The answer is appended only at the run's position
    /// the check below was made at ([`ice_log::ledger::Ledger::append_at`]): if anything was
    /// appended to the run meanwhile (another operator's answer, in this process or another;
    /// the run's own events: a timeout, a kill), the append fails with a conflict, writes
    /// nothing, and the run's new events are folded and the answer checked again. Refused
    /// ([`RuntimeError::Decided`], nothing recorded): an approval already answered, closed by
    /// the runtime (the call it was for was refused), or of a run an operator killed.
    pub async fn answer_approval(
        &self,
        approval: &EventId,
        operator: &str,
        grant: bool,
        reason: &str,
    ) -> Result<(), RuntimeError> {
        let run = &approval.run_id;
        let origin = operator_origin(operator)?;
        let mut books = self.books(run).await?;
        let mut attempts = 0;
        loop {
            let draft = answer_draft(&books, approval, &origin, grant, reason, self.clock.now())?;
            // An answer serves only the process waiting for it. If none drives the run any
            // more (the one that asked stopped, and took the wait with it), an answer would be
            // recorded for a call nothing will make: it is refused, and says what to do.
            if attempts == 0 && !self.driven(run).await? {
                let next = unwaited_advice(&books);
                return Err(RuntimeError::State {
                    run: run.to_string(),
                    state: books.state(),
                    what: format!(
                        "nobody waits for approval {approval} any more: no process drives the run (the one that asked for it stopped). {next}"
                    ),
                });
            }
            match self
                .ledger
                .append_at(run, books.next_seq(), vec![draft])
                .await
            {
                Err(AppendError::Log(LogError::Conflict { .. }))
                    if attempts < ANSWER_CONFLICT_RETRIES =>
                {
                    attempts += 1;
                    // Fold what was appended since (by anyone), then decide again.
                    catch_up(self, run, &mut books).await?;
                }
                Err(e) => return Err(e.into()),
                Ok(_) => return Ok(()),
            }
        }
    }

    /// Whether a live process drives `run`: it holds the run's lock on this machine, or its
    /// claim in a shared log. Found out by trying to take the lock (released at once).
    async fn driven(&self, run: &RunId) -> Result<bool, RuntimeError> {
        match self.lock_run(run).await {
            Ok(_free) => Ok(false),
            Err(RuntimeError::Busy(_) | RuntimeError::Claimed(_)) => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// Start-up recovery: move every run no live process drives to a defined state (see the
    /// module documentation), with events.
    pub async fn recover(&self, observer: &dyn Observer) -> Result<Vec<Recovered>, RuntimeError> {
        let mut out = Vec::new();
        for run in self.unfinished_runs().await? {
            let head = self.ledger.head(&run).await?;
            let state = head.state();
            // Suspended runs wait for an operator; every other state but TERMINATED has work
            // left (an ended run that was not torn down is torn down here).
            if matches!(state, RunState::Terminated | RunState::Suspended) {
                continue;
            }
            let ctx = match self.attach(&run, observer, Attach::End).await {
                Ok(c) => c,
                // Driven by another process, or another node's claim is live.
                Err(RuntimeError::Busy(_) | RuntimeError::Claimed(_)) => continue,
                Err(e) => {
                    out.push(Recovered {
                        run: run.to_string(),
                        from: state.to_string(),
                        to: state.to_string(),
                        detail: format!("not recovered: {e}"),
                    });
                    continue;
                }
            };
            let mut g = ctx.live.lock().await;
            let live = &mut *g;
            // The state as of holding the run's lock: the process that drove it may have moved
            // it on (to its end, say) between the look above and the lock.
            let state = live.books.state();
            if matches!(state, RunState::Terminated | RunState::Suspended) {
                continue;
            }
            // One run that cannot be recovered (say, its commit keeps failing to apply) is
            // reported and left as it is; it does not stop the others or the command.
            let detail: Result<String, RuntimeError> = async {
                Ok(match state {
                RunState::Created | RunState::Provisioned | RunState::ContextReady => {
                    ctx.terminate_by_runtime(
                        live,
                        "the process starting the run stopped before it executed",
                    )
                    .await?;
                    "terminated: it stopped before executing".to_string()
                }
                RunState::Executing => {
                    ctx.answer_interrupted(live).await?;
                    ctx.suspend(
                        live,
                        "crash_recovery",
                        "the process driving the run stopped; an operator may reconfigure and resume it, or kill it",
                    )
                    .await?;
                    "suspended for operator review".to_string()
                }
                RunState::Validating => {
                    match ctx.complete_interrupted_commit(live).await? {
                        Some(changes) => format!(
                            "committed: the interrupted commit was completed ({changes} change(s))"
                        ),
                        None => {
                            ctx.abort(
                                live,
                                "crash_recovery",
                                "the process stopped during validation, before the commit point; nothing was applied",
                            )
                            .await?;
                            "aborted: interrupted before the commit point".to_string()
                        }
                    }
                }
                RunState::Committed => {
                    ctx.teardown(live, "committed").await?;
                    "teardown finished".to_string()
                }
                RunState::Aborted => {
                    ctx.teardown(live, "aborted").await?;
                    "teardown finished".to_string()
                }
                RunState::TerminatedByRuntime => {
                    ctx.teardown(live, "terminated by runtime").await?;
                    "teardown finished".to_string()
                }
                _ => return Ok(String::new()),
            })
            }
            .await;
            let detail = match detail {
                Ok(d) if d.is_empty() => continue,
                Ok(d) => d,
                Err(e)
                    if state == RunState::Validating
                        && ice_effects::commit_pending(&live.stage.dir) =>
                {
                    format!(
                        "not recovered: its commit passed its commit point and could not be completed: {e}; fix the cause, or give the commit up with `ice kill {run} --abandon-commit`"
                    )
                }
                Err(e) => format!("not recovered: {e}"),
            };
            out.push(Recovered {
                run: run.to_string(),
                from: state.to_string(),
                to: live.books.state().to_string(),
                detail,
            });
        }
        Ok(out)
    }

    /// The run's staged (or, once committed, applied) changes.
    pub async fn diff(&self, run: &RunId) -> Result<Vec<Value>, RuntimeError> {
        let events = crate::read_run(self.ledger.log().as_ref(), run).await?;
        if events.is_empty() {
            return Err(RuntimeError::NoRun(run.to_string()));
        }
        let books = Books::fold(run.clone(), events.iter())?;
        let applied: Vec<&ice_kernel::Event> = events
            .iter()
            .filter(|e| e.event_type == EventType::EffectApplied.name())
            .collect();
        let committed = events
            .iter()
            .any(|e| e.event_type == EventType::RunCommitted.name());
        if committed || !applied.is_empty() {
            let mut out: Vec<Value> = applied
                .iter()
                .map(|e| {
                    let mut p = e.payload.clone();
                    p.insert("status".into(), json!("applied"));
                    p.insert("event".into(), json!(e.id().to_string()));
                    p.remove("evidence");
                    Value::Object(p)
                })
                .collect();
            // A staged write the commit did not apply: the workspace already held what it
            // staged (another run or a person had made the same change), so nothing changed.
            let done: std::collections::HashSet<&str> = applied
                .iter()
                .filter_map(|e| e.payload.get("path").and_then(Value::as_str))
                .collect();
            for (path, op) in books.staged_view() {
                if done.contains(path.as_str()) {
                    continue;
                }
                let digest = op.after.map(|d| d.to_hex());
                out.push(json!({
                    "path": path,
                    "change": "unchanged",
                    "before": digest,
                    "after": digest,
                    "status": "unchanged",
                    "event": op.event.to_string(),
                }));
            }
            return Ok(out);
        }
        // A commit an operator gave up (`abandon_commit`) may have reached the workspace in
        // part: its changes are "abandoned", not "discarded".
        let abandoned = events.iter().any(|e| {
            e.event_type == EventType::RunTerminatedByRuntime.name()
                && e.payload.contains_key("abandoned_commit")
        });
        let status = match books.state() {
            _ if abandoned => "abandoned",
            RunState::Aborted | RunState::Terminated | RunState::TerminatedByRuntime => "discarded",
            _ => "staged",
        };
        let spec = books.spec.clone();
        let mut out = Vec::new();
        for (path, op) in books.staged_view() {
            let before = spec
                .as_ref()
                .and_then(|s| crate::act::workspace_digest(&s.workspace, &path));
            out.push(json!({
                "path": path,
                "change": match (before.is_some(), op.after.is_some()) {
                    (false, true) => "added",
                    (true, true) => "modified",
                    (_, false) => "deleted",
                },
                "before": before.map(|d| d.to_hex()),
                "after": op.after.map(|d| d.to_hex()),
                "status": status,
                "event": op.event.to_string(),
            }));
        }
        Ok(out)
    }

    /// Content of a staged write (for `ice diff` to show text), if still in the stage store or
    /// in the stage of a commit an operator gave up.
    pub fn staged_content(&self, run: &RunId, digest: &Digest) -> Option<Vec<u8>> {
        let dir = self.run_dir(run);
        let object = |stage: std::path::PathBuf| {
            std::fs::read(stage.join("objects").join(digest.to_hex())).ok()
        };
        object(dir.join("stage")).or_else(|| {
            std::fs::read_dir(&dir)
                .ok()?
                .flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(crate::executor::ABANDONED_STAGE)
                })
                .find_map(|e| object(e.path()))
        })
    }
}

/// A run open for proposals: what an in-process agent host (or the MCP gateway) drives.
/// Proposals may come concurrently; each is decided, acted on and recorded in turn where the
/// run's books require it, and in parallel where the effect allows (network calls).
pub struct Session<'a> {
    pub(crate) ctx: Ctx<'a>,
    agent: String,
    /// How the run stopped, once it did (a kill, a budget, an interruption, a suspension).
    stopped: std::sync::Mutex<Option<RunOutcome>>,
    /// No new proposal is taken: the run stopped, or a call exhausted a budget and the run
    /// stops once the calls in flight end.
    stopping: std::sync::atomic::AtomicBool,
}

impl Session<'_> {
    /// The run.
    pub fn run(&self) -> &RunId {
        &self.ctx.run
    }

    /// The agent's id.
    pub fn agent(&self) -> &str {
        &self.agent
    }

    /// The MCP tools this run's policy could permit the agent to call now, each with the
    /// effect class ICE gives it. A tool is left out when the policy denies every call to it
    /// (whatever the arguments and intent: tool arguments are not shown to policies), so an
    /// agent is never offered what it may not use. A tool whose calls need an approval is
    /// offered.
    pub async fn permitted_tools(&self) -> Vec<(ToolSpec, ice_authority::EffectClass)> {
        let live = self.ctx.live.lock().await;
        self.ctx.permitted_tools(&live, &self.agent)
    }

    /// ICE's own capabilities this session's agent may be offered as tools: those the
    /// registry has and some permit policy could allow it (see [`PolicySet::may_permit`]),
    /// each with the effect class a call with no arguments has (`http.request` is then `read`,
    /// a `POST` is `external`).
    ///
    /// [`PolicySet::may_permit`]: ice_authority::PolicySet::may_permit
    pub async fn permitted_builtins(
        &self,
    ) -> Vec<(&'static ice_kernel::BuiltinTool, ice_authority::EffectClass)> {
        let live = self.ctx.live.lock().await;
        ice_kernel::BUILTIN_TOOLS
            .iter()
            .filter(|b| live.policy.may_permit(&self.agent, b.capability))
            .filter_map(|b| {
                let class = self
                    .ctx
                    .rt
                    .registry
                    .get(b.capability)?
                    .classifier()
                    .classify(&serde_json::json!({}));
                Some((b, class))
            })
            .collect()
    }

    /// The protocol version negotiated with an MCP tool server of this run.
    pub fn tool_protocol(&self, server: &str) -> Option<String> {
        self.ctx.tools.as_ref()?.protocol_version(server)
    }

    /// Make one proposal in the agent's name. A request returns how it was answered; a
    /// thought is recorded and returns `None`; `Finish` returns `None` (call [`Self::finish`]).
    /// Once the run has stopped (aborted, suspended, killed) every proposal is refused.
    pub async fn propose(
        &self,
        proposal: &ice_kernel::Proposal,
    ) -> Result<Option<ice_kernel::Outcome>, RuntimeError> {
        self.propose_withdrawable(proposal, None).await
    }

    /// [`Self::propose`], for an agent that may withdraw a request while it waits for an
    /// operator's approval (an MCP client's cancellation, or its session's end): once
    /// `withdrawn` is cancelled, an approval not yet answered is closed and the call is denied
    /// (`approval_denied`, saying the agent withdrew it), and nothing of it is performed. An
    /// answer recorded before the withdrawal stands.
    pub async fn propose_withdrawable(
        &self,
        proposal: &ice_kernel::Proposal,
        withdrawn: Option<&tokio_util::sync::CancellationToken>,
    ) -> Result<Option<ice_kernel::Outcome>, RuntimeError> {
        self.check_open().await?;
        // The checks may stop the run, so they wait until no call is in flight. Meanwhile a
        // new call goes ahead only if they have nothing to act on; else it waits for the calls
        // in flight to end and the checks to run (a kill, the wall-time budget or a policy
        // edit applies to it, however many calls the agent keeps open).
        loop {
            let mut g = self.ctx.live.lock().await;
            // Another proposal's checks may have stopped the run while this one waited for
            // the lock: it is refused as any proposal after the stop is.
            if self.has_stopped() {
                drop(g);
                return Err(self.stopped_error().await);
            }
            let live = &mut *g;
            if live.in_flight == 0 {
                if let Some(stop) = self.ctx.between_steps(live).await? {
                    return Err(self.stop(stop, live.books.state()));
                }
                break;
            }
            if !self.ctx.checks_due(live).await? {
                break;
            }
            drop(g);
            self.check_open().await?;
            // Waiting here, nothing of the request is recorded yet: a withdrawal ends it.
            if withdrawn.is_some_and(tokio_util::sync::CancellationToken::is_cancelled) {
                return Err(RuntimeError::Invalid(
                    "the request was withdrawn (its client cancelled it, or the session ended) while it waited for the calls in flight to end: nothing of it was recorded or done".into(),
                ));
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        match proposal {
            ice_kernel::Proposal::Think { .. } => {
                let draft = proposal.draft(&self.agent).expect("recorded");
                let mut live = self.ctx.live.lock().await;
                if let Some(why) = self.ctx.unrecordable(&live, &draft) {
                    return Err(RuntimeError::Invalid(format!(
                        "the proposal cannot be recorded: {why}"
                    )));
                }
                self.ctx.append(&mut live, |_| vec![draft.clone()]).await?;
                Ok(None)
            }
            ice_kernel::Proposal::Request(r) => {
                let end = self.ctx.governed_call(&self.agent, r, withdrawn).await?;
                if let Some(why) = &end.exhausted
                    && !self
                        .stopping
                        .swap(true, std::sync::atomic::Ordering::SeqCst)
                {
                    // No new proposal is taken from here on; calls in flight finish and are
                    // recorded before the run is stopped.
                    loop {
                        let mut live = self.ctx.live.lock().await;
                        if live.in_flight == 0 {
                            // Another proposal's checks may have stopped the run meanwhile (a
                            // kill, the wall-time budget): it is not stopped a second time.
                            let open = self.stopped.lock().map(|s| s.is_none()).unwrap_or(false)
                                && live.books.state() == RunState::Executing;
                            if open {
                                let stop = self.ctx.exhausted(&mut live, why).await?;
                                self.stop(stop, live.books.state());
                            }
                            break;
                        }
                        drop(live);
                        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                    }
                }
                Ok(Some(end.outcome))
            }
            ice_kernel::Proposal::Infer { .. } => Err(RuntimeError::Invalid(
                "an agent connected from outside calls its model itself; Infer is for drivers that run inside ICE".into(),
            )),
            ice_kernel::Proposal::Finish { .. } => Ok(None),
        }
    }

    async fn check_open(&self) -> Result<(), RuntimeError> {
        if self.has_stopped() {
            return Err(self.stopped_error().await);
        }
        Ok(())
    }

    /// Whether the run is stopping (a budget ran out: calls in flight finish first) or has
    /// stopped: no new proposal is taken.
    fn has_stopped(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
            || self.stopped.lock().map(|s| s.is_some()).unwrap_or(true)
    }

    async fn stopped_error(&self) -> RuntimeError {
        self.state_error("the run has stopped taking proposals")
            .await
    }

    /// `what` of the run, in the state it is in now.
    async fn state_error(&self, what: &str) -> RuntimeError {
        let state = self.ctx.live.lock().await.books.state();
        RuntimeError::State {
            run: self.ctx.run.to_string(),
            state,
            what: what.into(),
        }
    }

    /// Record that the run stopped with `outcome` (so no call stops it a second time: a call
    /// that exhausts a budget afterwards finds it stopping) and say so.
    fn stop(&self, outcome: RunOutcome, state: RunState) -> RuntimeError {
        let what = format!("the run stopped: {outcome:?}");
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Ok(mut s) = self.stopped.lock() {
            *s = Some(outcome);
        }
        RuntimeError::State {
            run: self.ctx.run.to_string(),
            state,
            what,
        }
    }

    /// Validate and commit (or abort), tear down, and report. If the run already stopped,
    /// report how.
    pub async fn finish(self) -> Result<RunReport, RuntimeError> {
        let stopped = self.stopped.lock().ok().and_then(|mut s| s.take());
        let outcome = match stopped {
            Some(o) => o,
            // A budget ran out and its stop could not be recorded (the log refused the
            // append): the run is not committed; it stays open for a restart's recovery.
            None if self.stopping.load(std::sync::atomic::Ordering::SeqCst) => {
                return Err(self
                    .state_error(
                        "a budget ran out and the run's stop could not be recorded: it is not committed",
                    )
                    .await);
            }
            None => self.ctx.finish().await?,
        };
        self.into_report(outcome).await
    }

    /// Abort the run (its staged writes are discarded) with a reason code and detail, tear it
    /// down, and report; a run that already stopped reports how. Calls still in flight finish
    /// and are recorded first.
    pub async fn abort(self, code: &str, detail: &str) -> Result<RunReport, RuntimeError> {
        let stopped = self.stopped.lock().ok().and_then(|mut s| s.take());
        let outcome = match stopped {
            Some(o) => o,
            None => loop {
                let mut live = self.ctx.live.lock().await;
                if live.in_flight == 0 {
                    break self.ctx.abort(&mut live, code, detail).await?;
                }
                drop(live);
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            },
        };
        self.into_report(outcome).await
    }

    async fn into_report(self, outcome: RunOutcome) -> Result<RunReport, RuntimeError> {
        let rt = self.ctx.rt;
        let run = self.ctx.run.clone();
        let books = self.ctx.live.into_inner().books;
        report(rt, &run, outcome, books).await
    }
}

impl Ctx<'_> {
    /// Give up an interrupted commit that could not be completed (`failure`): record what
    /// its journal says it would have applied and terminate the run; teardown then keeps the
    /// stage, journal included, beside the run's directory (never deleted: see
    /// [`Ctx::teardown`]). The record comes first: if the process stops after it, recovery
    /// finishes the teardown and keeps the stage the same way. Returns where it is kept.
    pub(crate) async fn abandon_commit(
        &self,
        live: &mut Live,
        detail: &str,
        failure: &RuntimeError,
    ) -> Result<std::path::PathBuf, RuntimeError> {
        let keep_as = crate::executor::abandoned_stage_dir(&self.rt.run_dir(&self.run));
        let changes = match ice_effects::pending_changes(&live.stage.dir) {
            Ok(changes) => Value::Array(
                changes
                    .iter()
                    .map(|c| Value::Object(crate::executor::change_fields(c)))
                    .collect(),
            ),
            Err(problem) => Value::String(format!("the journal could not be read: {problem}")),
        };
        let p = json!({
            "reason": format!(
                "{detail}; the commit had passed its commit point and could not be completed ({failure}); the operator abandoned it: the workspace may hold any part of the changes listed"
            ),
            "abandoned_commit": {
                "failure": failure.to_string(),
                "changes": changes,
                "kept_at": keep_as.display().to_string(),
            },
        });
        live.stage.stage = None;
        self.append(live, |_| {
            vec![
                Draft::new(EventType::RunTerminatedByRuntime.name(), Origin::Runtime)
                    .payload(p.clone()),
            ]
        })
        .await?;
        self.teardown(live, "terminated by runtime").await?;
        Ok(keep_as)
    }

    pub(crate) async fn terminate_by_runtime(
        &self,
        live: &mut Live,
        detail: &str,
    ) -> Result<(), RuntimeError> {
        live.stage.discard();
        let p = json!({"reason": detail});
        self.append(live, |_| {
            vec![
                Draft::new(EventType::RunTerminatedByRuntime.name(), Origin::Runtime)
                    .payload(p.clone()),
            ]
        })
        .await?;
        self.teardown(live, "terminated by runtime").await
    }
}

/// Start the MCP tool servers a run spec names (none: `None`).
pub async fn start_tools(spec: &RunSpec) -> Result<Option<Arc<ToolServers>>, RuntimeError> {
    if spec.servers.is_empty() {
        return Ok(None);
    }
    let configs = spec.servers.iter().map(server_config).collect();
    ToolServers::start(configs)
        .await
        .map(|t| Some(Arc::new(t)))
        .map_err(|e| RuntimeError::Io(format!("tool servers: {e}")))
}

/// The effects layer's configuration of one tool server of a spec.
pub fn server_config(s: &crate::spec::ToolServerSpec) -> ice_effects::mcp::ServerConfig {
    use ice_effects::mcp::{ServerConfig, ServerTransport};
    let transport = match &s.url {
        Some(url) => ServerTransport::Http { url: url.clone() },
        None => ServerTransport::Stdio {
            program: s.command[0].clone(),
            args: s.command[1..].to_vec(),
            env: s.env.clone(),
            cwd: s.cwd.clone(),
        },
    };
    ServerConfig {
        name: s.name.clone(),
        transport,
        start_timeout: std::time::Duration::from_millis(s.start_timeout_ms),
        call_timeout: std::time::Duration::from_millis(s.call_timeout_ms),
        max_result_bytes: s.max_result_bytes as usize,
    }
}

/// What `CapabilitiesBound` records of the tool servers: each tool with ICE's class for it,
/// the server's hint, and the protocol version negotiated with its server.
fn bound_tools(
    registry: &ice_authority::Registry,
    spec: &RunSpec,
    tools: Option<&ToolServers>,
) -> Vec<Value> {
    let Some(tools) = tools else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for server in &spec.servers {
        for t in tools
            .tools()
            .into_iter()
            .filter(|t| t.server == server.name)
        {
            let (assigned, class) = crate::act::tool_class(registry, server, &t);
            out.push(json!({
                "tool": format!("{}/{}", t.server, t.name),
                "effect": class.as_str(),
                "assigned": assigned.as_str(),
                "hint": t.hint.map(|h| h.as_str()),
                "protocol_version": tools.protocol_version(&t.server),
                "description": t.description,
                "input_schema": t.input_schema,
            }));
        }
    }
    out
}

/// How many times an operator's answer is checked again when the run keeps moving under it
/// (each retry means someone else appended to the run).
const ANSWER_CONFLICT_RETRIES: usize = 32;

/// Fold into `books` the events appended to `run` since they were folded.
async fn catch_up(rt: &Runtime, run: &RunId, books: &mut Books) -> Result<(), RuntimeError> {
    loop {
        let page = rt.ledger.log().read_run(run, books.next_seq(), 256).await?;
        if page.is_empty() {
            return Ok(());
        }
        ice_log::after_page(run.as_str(), books.next_seq(), &page)?;
        for s in &page {
            books.apply(&s.event()?)?;
        }
    }
}

/// The operator's answer to `approval` as the next event of its run, if the run as `books`
/// folds it still takes one (see [`Runtime::answer_approval`]).
fn answer_draft(
    books: &Books,
    approval: &EventId,
    origin: &Origin,
    grant: bool,
    reason: &str,
    now: ice_kernel::Timestamp,
) -> Result<Draft, RuntimeError> {
    let run = books.run();
    if let Some(p) = crate::memory::reason_too_long(reason) {
        return Err(RuntimeError::Invalid(p.describe("the reason")));
    }
    let Some(a) = books.approvals.get(approval) else {
        return Err(RuntimeError::Invalid(format!(
            "{approval} is not an approval request of run {run}"
        )));
    };
    let decided = |answer: String, by: String| RuntimeError::Decided {
        approval: approval.to_string(),
        answer,
        by,
    };
    // Answered first by an operator: name who, and how.
    let first = books
        .answers
        .get(approval)
        .map(|e| format!(" (event {e})"))
        .unwrap_or_default();
    match &a.status {
        ApprovalStatus::Pending => {}
        ApprovalStatus::Granted { by, .. } => {
            return Err(decided(format!("granted{first}"), by.to_string()));
        }
        ApprovalStatus::Mismatch { by, .. } => {
            return Err(decided(
                format!("granted for another request digest{first}"),
                by.to_string(),
            ));
        }
        ApprovalStatus::Denied { by, reason, .. } => {
            return Err(decided(format!("denied{first}: {reason}"), by.to_string()));
        }
        ApprovalStatus::Used { by, grant } => {
            return Err(decided(
                format!("granted{first}, and used since by grant {grant}"),
                by.to_string(),
            ));
        }
    }
    let because = |reason: &str| {
        if reason.is_empty() {
            String::new()
        } else {
            format!(": {reason}")
        }
    };
    if let Some((denial, code, _)) = books.closed.get(approval) {
        let why = match &books.kill {
            Some((by, reason)) => format!(", after {by} killed the run{}", because(reason)),
            None => String::new(),
        };
        return Err(decided(
            format!("closed, the call it was for was refused ({code}, event {denial}){why}"),
            "runtime".into(),
        ));
    }
    if let Some((by, reason)) = &books.kill {
        return Err(decided(
            format!("closed, the run was killed{}", because(reason)),
            by.clone(),
        ));
    }
    let state = books.state();
    if !matches!(
        state,
        RunState::Executing | RunState::Suspended | RunState::Validating
    ) {
        return Err(RuntimeError::State {
            run: run.to_string(),
            state,
            what: format!("approval {approval} can no longer be answered"),
        });
    }
    if now >= a.expires_at {
        return Err(RuntimeError::Invalid(format!(
            "approval {approval} expired at {}",
            a.expires_at
        )));
    }
    let draft = if grant {
        books
            .approvals
            .check_grant(approval, &a.digest)
            .map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        Draft::new(EventType::ApprovalGranted.name(), origin.clone()).payload(Value::Object(
            ApprovalGrantedPayload {
                approval: approval.clone(),
                digest: a.digest,
            }
            .to_payload(),
        ))
    } else {
        Draft::new(EventType::ApprovalDenied.name(), origin.clone()).payload(Value::Object(
            ApprovalDeniedPayload {
                approval: approval.clone(),
                reason: if reason.is_empty() {
                    "denied by operator".into()
                } else {
                    reason.to_string()
                },
            }
            .to_payload(),
        ))
    };
    Ok(draft.cause(approval.clone()))
}

fn operator_origin(operator: &str) -> Result<Origin, RuntimeError> {
    format!("operator:{operator}")
        .parse::<Origin>()
        .map_err(|e| RuntimeError::Invalid(format!("operator {operator:?}: {e}")))
}

/// The runs that may still have work ahead of them, as of the log position `next`: those that
/// started and have no `RunTerminated` (torn down) yet. Kept by the runtime and brought up to
/// date from the log's tail, so crash recovery and the approvals listing look at these runs,
/// not at every run the log holds.
#[derive(Debug, Default)]
pub(crate) struct Unfinished {
    runs: std::collections::BTreeSet<RunId>,
    next: u64,
}

impl Runtime {
    /// The runs not yet torn down (any state but `TERMINATED`: live, suspended, or ended and
    /// waiting for their teardown), in id order, as of the log's head now, whoever wrote them.
    /// Each call reads only the events appended since the last (the first call in a process
    /// reads the log once).
    pub async fn unfinished_runs(&self) -> Result<Vec<RunId>, RuntimeError> {
        let mut u = self.unfinished.lock().await;
        let Unfinished { runs, next } = &mut *u;
        crate::follow(self.ledger.log().as_ref(), next, |e| {
            match EventType::from_name(e.event_type) {
                // The state machine's last state: nothing follows it.
                Some(EventType::RunTerminated) => {
                    runs.remove(e.run_id);
                }
                _ if e.run_seq == 0 => {
                    if let Ok(r) = RunId::new(e.run_id) {
                        runs.insert(r);
                    }
                }
                _ => {}
            }
            Ok::<_, RuntimeError>(())
        })
        .await?;
        Ok(runs.iter().cloned().collect())
    }
}
