#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ice_intelligence::{Plan, PlanAgent};
use ice_kernel::{Agent, AgentError, AgentView, Event, EventType, Proposal, RunId};
use ice_log::clock::SystemClock;
use ice_log::ledger::Ledger;
use ice_log::sqlite::SqliteLog;
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
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
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
    let (spec, first) = h.spec(
        id,
        "coder",
        "[[assume]]\nfile = \"config.toml\"\n",
        THREE_READS,
    );
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
