#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ice_intelligence::{Plan, PlanAgent};
use ice_kernel::{
    Agent, AgentError, AgentView, Digest, Event, EventId, EventType, Proposal, RunId, SealedBatch,
};
use ice_log::clock::SystemClock;
use ice_log::ledger::Ledger;
use ice_log::sqlite::SqliteLog;
use ice_log::{AppendReceipt, EventLog, Extent, LogError, NodeId, StoredCheckpoint, StoredEvent};
use ice_runtime::{Installation, Quiet, RunReport, RunSpec, Runtime};

pub const POLICY: &str = r#"
@id("read")
permit(principal, action in [Action::"fs.read", Action::"fs.list"], resource in Dir::".");
@id("write")
permit(principal == Agent::"coder", action in [Action::"fs.write", Action::"fs.delete"], resource in Dir::".");
@id("locked")
forbid(principal, action in [Action::"fs.write", Action::"fs.delete"], resource in Dir::"locked");
@id("notify")
@approval("required")
permit(principal == Agent::"coder", action == Action::"http.request", resource == Host::"127.0.0.1");
"#;

pub struct H {
    pub dir: tempfile::TempDir,
    pub rt: Runtime,
    pub ws: PathBuf,
    pub policies: PathBuf,
    pub base: PathBuf,
}

impl H {
    pub fn new(policy: &str) -> H {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().to_path_buf();
        let home = base.join("home");
        std::fs::create_dir_all(home.join("runs")).unwrap();
        let policies = base.join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        std::fs::write(policies.join("p.cedar"), policy).unwrap();
        let ws = base.join("workspace");
        std::fs::create_dir_all(ws.join("locked")).unwrap();
        std::fs::write(ws.join("hello.txt"), "hello\n").unwrap();
        std::fs::write(ws.join("config.toml"), "x = 1\n").unwrap();
        std::fs::write(ws.join("locked/release.txt"), "1.0\n").unwrap();
        std::fs::write(base.join("outside.txt"), "secret\n").unwrap();
        let log = Arc::new(SqliteLog::create(&home.join("ice.db")).unwrap());
        let ledger = Arc::new(Ledger::new(log, Arc::new(SystemClock)));
        let rt = Runtime::new(
            ledger,
            Arc::new(SystemClock),
            Installation {
                runs_dir: home.join("runs"),
                policy_dir: policies.clone(),
            },
        )
        .unwrap();
        H {
            dir,
            rt,
            ws,
            policies,
            base,
        }
    }

    /// Write a run spec (header + `extra`) and a plan, and load them.
    pub fn spec(&self, id: &str, agent: &str, extra: &str, plan: &str) -> (RunSpec, PlanAgent) {
        let plan_file = self.base.join(format!("{id}-plan.toml"));
        std::fs::write(&plan_file, plan).unwrap();
        let spec_file = self.base.join(format!("{id}.toml"));
        std::fs::write(
            &spec_file,
            format!(
                "[run]\nid = \"{id}\"\nagent = \"{agent}\"\nworkspace = \"workspace\"\npolicy = \"policies\"\n\n[agent]\ndriver = \"plan\"\nplan = \"{id}-plan.toml\"\n\n{extra}\n"
            ),
        )
        .unwrap();
        let spec = RunSpec::load(&spec_file).unwrap();
        let plan = Plan::load(&plan_file).unwrap();
        (spec, PlanAgent::new(agent, plan))
    }

    pub async fn run(&self, spec: RunSpec, agent: &mut dyn Agent) -> RunReport {
        self.rt.start(spec, agent, &Quiet).await.unwrap()
    }

    pub async fn events(&self, run: &str) -> Vec<Event> {
        ice_runtime::read_run(self.rt.ledger().log().as_ref(), &RunId::new(run).unwrap())
            .await
            .unwrap()
    }

    pub fn read(&self, p: &str) -> String {
        std::fs::read_to_string(self.ws.join(p)).unwrap()
    }
}

pub fn of_type(events: &[Event], t: EventType) -> Vec<&Event> {
    events.iter().filter(|e| e.event_type == t.name()).collect()
}

pub fn denial_codes(events: &[Event]) -> Vec<String> {
    of_type(events, EventType::CapabilityDenied)
        .iter()
        .map(|e| e.payload["reason"].as_str().unwrap_or("").to_string())
        .collect()
}

/// A plan agent with a hook that runs before each proposal (tests use it to change the world
/// mid-run).
pub struct Hooked<F: FnMut(&AgentView) + Send> {
    pub inner: PlanAgent,
    pub hook: F,
}

impl<F: FnMut(&AgentView) + Send> Agent for Hooked<F> {
    fn id(&self) -> &str {
        self.inner.id()
    }
    fn propose(&mut self, view: &AgentView) -> Result<Proposal, AgentError> {
        (self.hook)(view);
        self.inner.propose(view)
    }
}

pub fn path(p: &Path) -> String {
    p.display().to_string()
}

/// The run's pending approval, once it asks.
pub async fn pending(rt: &Runtime, run: &RunId) -> ice_kernel::EventId {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Some(a) = rt.pending_approvals(Some(run)).await.unwrap().first() {
            return a.id.parse().unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no approval requested by {run}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

pub async fn events(rt: &Runtime, run: &RunId) -> Vec<Event> {
    ice_runtime::read_run(rt.ledger().log().as_ref(), run)
        .await
        .unwrap()
}

/// A local HTTP endpoint on 127.0.0.1 that answers every request with 200 `ok`; its port.
pub fn ok_endpoint() -> u16 {
    ok_endpoint_after(std::time::Duration::ZERO)
}

/// [`ok_endpoint`], answering each request after `pause`.
pub fn ok_endpoint_after(pause: std::time::Duration) -> u16 {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                std::thread::sleep(pause);
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                );
            });
        }
    });
    port
}

/// Copy run `from` into a new run `to` through the ledger (as a forger with write access
/// would), changing each event's payload with `edit`.
pub async fn forge(h: &H, from: &str, to: &str, edit: impl Fn(&str, &mut serde_json::Value)) {
    forge_replacing(h, from, to, &[], edit).await
}

/// [`forge`], with each `(old, new)` of `replace` replaced in every payload and authority too.
pub async fn forge_replacing(
    h: &H,
    from: &str,
    to: &str,
    replace: &[(&str, &str)],
    edit: impl Fn(&str, &mut serde_json::Value),
) {
    let events = h.events(from).await;
    let to_id = RunId::new(to).unwrap();
    let mut drafts = Vec::new();
    for e in events {
        let mut text = serde_json::Value::Object(e.payload.clone())
            .to_string()
            .replace(&format!("\"{from}:"), &format!("\"{to}:"));
        for (old, new) in replace {
            text = text.replace(old, new);
        }
        let mut payload: serde_json::Value = serde_json::from_str(&text).unwrap();
        edit(&e.event_type, &mut payload);
        let mut d = ice_kernel::Draft::new(e.event_type.clone(), e.origin.clone()).payload(payload);
        if let Some(i) = e.intent {
            d = d.intent(i);
        }
        if let Some(a) = e.authority {
            let mut a = a.replace(&format!("{from}:"), &format!("{to}:"));
            for (old, new) in replace {
                a = a.replace(old, new);
            }
            d = d.authority(a);
        }
        for c in e.causes {
            d = d.cause(ice_kernel::EventId::new(to_id.clone(), c.run_seq));
        }
        drafts.push(d.cost(e.cost));
    }
    h.rt.ledger().append(&to_id, drafts).await.unwrap();
}

/// The version of a policy set made of one file `p.cedar` holding `text`.
pub fn version_of(text: &str) -> String {
    let sources = vec![ice_authority::PolicySource {
        name: "p.cedar".into(),
        text: text.into(),
    }];
    let schema = ice_authority::Schema::ice().unwrap();
    ice_authority::PolicySet::from_sources(&sources, &schema)
        .unwrap()
        .version()
        .to_hex()
}

/// Three reads of hello.txt, as a plan.
pub const THREE_READS: &str =
    "[[step]]\nintent = \"r\"\ncapability = \"fs.read\"\ntarget = \"hello.txt\"\nrepeat = 3\n";

/// Run [`THREE_READS`] as `coder` in run `id`, which assumes config.toml; the file changes
/// before the second step, so the run suspends (asserted).
pub async fn suspend_on_changed_assumption(h: &H, id: &str) {
    suspend_on_changed_assumption_with(h, id, THREE_READS).await;
}

/// [`suspend_on_changed_assumption`], with `plan` (of at least two steps) in place of
/// [`THREE_READS`].
pub async fn suspend_on_changed_assumption_with(h: &H, id: &str, plan: &str) {
    let (spec, first) = h.spec(id, "coder", "[[assume]]\nfile = \"config.toml\"\n", plan);
    let ws = h.ws.clone();
    let mut agent = Hooked {
        inner: first,
        hook: move |v: &AgentView| {
            if v.step == 1 {
                std::fs::write(ws.join("config.toml"), "x = 2\n").unwrap();
            }
        },
    };
    let report = h.run(spec, &mut agent).await;
    assert!(
        matches!(report.outcome, ice_runtime::RunOutcome::Suspended { .. }),
        "{report:?}"
    );
}

/// What an `EventLog` method returns.
pub type Fut<'t, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, LogError>> + Send + 't>>;

/// What a test's log changes of SQLite's answers; every other call passes through.
pub trait Hooks: Send + Sync + 'static {
    /// Append `batch` (to `inner`, unless the test says otherwise).
    fn append<'t>(&'t self, inner: &'t SqliteLog, batch: SealedBatch) -> Fut<'t, AppendReceipt> {
        inner.append(batch)
    }
    /// The blob stored under `digest` (as `inner` has it, unless the test says otherwise).
    fn blob<'t>(&'t self, inner: &'t SqliteLog, digest: &'t Digest) -> Fut<'t, Option<Vec<u8>>> {
        inner.blob(digest)
    }
    /// Whether claims lapse, as on a shared log (SQLite's do not, unless the test says so).
    fn claims_lapse(&self) -> bool {
        false
    }
}

/// A log that passes everything to SQLite except what its hooks change (a failure to inject,
/// an answer to tamper with).
pub struct HookedLog<K> {
    pub inner: SqliteLog,
    pub hooks: K,
}

// `EventLog` is an `async_trait`; its methods are written out here as the macro expands them
// (a boxed future per call), so this test needs no dependency of its own.
impl<K: Hooks> EventLog for HookedLog<K> {
    fn append<'a, 't>(&'a self, batch: SealedBatch) -> Fut<'t, AppendReceipt>
    where
        'a: 't,
        Self: 't,
    {
        self.hooks.append(&self.inner, batch)
    }
    fn read_run<'a, 'b, 't>(
        &'a self,
        run_id: &'b RunId,
        from_seq: u64,
        limit: usize,
    ) -> Fut<'t, Vec<StoredEvent>>
    where
        'a: 't,
        'b: 't,
        Self: 't,
    {
        self.inner.read_run(run_id, from_seq, limit)
    }
    fn scan<'a, 't>(&'a self, from_log_seq: u64, limit: usize) -> Fut<'t, Vec<StoredEvent>>
    where
        'a: 't,
        Self: 't,
    {
        self.inner.scan(from_log_seq, limit)
    }
    fn get<'a, 'b, 't>(&'a self, id: &'b EventId) -> Fut<'t, Option<StoredEvent>>
    where
        'a: 't,
        'b: 't,
        Self: 't,
    {
        self.inner.get(id)
    }
    fn size<'a, 't>(&'a self) -> Fut<'t, u64>
    where
        'a: 't,
        Self: 't,
    {
        self.inner.size()
    }
    fn runs<'a, 't>(&'a self, offset: u64, limit: usize) -> Fut<'t, Vec<RunId>>
    where
        'a: 't,
        Self: 't,
    {
        self.inner.runs(offset, limit)
    }
    fn runs_newest_first<'a, 't>(&'a self, offset: u64, limit: usize) -> Fut<'t, Vec<RunId>>
    where
        'a: 't,
        Self: 't,
    {
        self.inner.runs_newest_first(offset, limit)
    }
    fn run_count<'a, 't>(&'a self) -> Fut<'t, u64>
    where
        'a: 't,
        Self: 't,
    {
        self.inner.run_count()
    }
    fn existing<'a, 'b, 't>(
        &'a self,
        ids: &'b [EventId],
    ) -> Fut<'t, std::collections::HashSet<EventId>>
    where
        'a: 't,
        'b: 't,
        Self: 't,
    {
        self.inner.existing(ids)
    }
    fn blob<'a, 'b, 't>(&'a self, digest: &'b Digest) -> Fut<'t, Option<Vec<u8>>>
    where
        'a: 't,
        'b: 't,
        Self: 't,
    {
        self.hooks.blob(&self.inner, digest)
    }
    fn nodes<'a, 'b, 't>(&'a self, ids: &'b [NodeId]) -> Fut<'t, Vec<Digest>>
    where
        'a: 't,
        'b: 't,
        Self: 't,
    {
        self.inner.nodes(ids)
    }
    fn tree_floor(&self) -> u8 {
        self.inner.tree_floor()
    }
    fn extent<'a, 't>(&'a self) -> Fut<'t, Option<Extent>>
    where
        'a: 't,
        Self: 't,
    {
        self.inner.extent()
    }

    fn altered_blob<'a, 't>(&'a self) -> Fut<'t, Option<String>>
    where
        'a: 't,
        Self: 't,
    {
        self.inner.altered_blob()
    }
    fn claims_lapse(&self) -> bool {
        self.hooks.claims_lapse()
    }
    fn index_problem<'a, 't>(&'a self) -> Fut<'t, Option<String>>
    where
        'a: 't,
        Self: 't,
    {
        self.inner.index_problem()
    }
    fn scan_nodes<'a, 't>(
        &'a self,
        from_leaf: u64,
        leaves: u64,
    ) -> Fut<'t, Vec<(NodeId, Option<Digest>)>>
    where
        'a: 't,
        Self: 't,
    {
        self.inner.scan_nodes(from_leaf, leaves)
    }
    fn add_checkpoint<'a, 't>(&'a self, checkpoint: StoredCheckpoint) -> Fut<'t, ()>
    where
        'a: 't,
        Self: 't,
    {
        self.inner.add_checkpoint(checkpoint)
    }
    fn checkpoints<'a, 't>(&'a self) -> Fut<'t, Vec<StoredCheckpoint>>
    where
        'a: 't,
        Self: 't,
    {
        self.inner.checkpoints()
    }
}

/// Another process on the same installation: its own connection to the same SQLite file,
/// its own ledger (and cached run heads).
pub fn another_process(base: &Path) -> Arc<Runtime> {
    let home = base.join("home");
    let log =
        Arc::new(SqliteLog::open(&home.join("ice.db"), ice_log::sqlite::Mode::ReadWrite).unwrap());
    let ledger = Arc::new(Ledger::new(log, Arc::new(SystemClock)));
    Arc::new(
        Runtime::new(
            ledger,
            Arc::new(SystemClock),
            Installation {
                runs_dir: home.join("runs"),
                policy_dir: base.join("policies"),
            },
        )
        .unwrap(),
    )
}
