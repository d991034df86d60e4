//! Helpers shared by the grant, budget and approval tests: runs whose events are sealed by the
//! kernel's validator (`RunHead::seal`), so the folds are tested on exactly what a log holds.
#![allow(dead_code)] // each test binary uses a different subset

use ice_authority::{CapabilityGrantedPayload, EffectClass, PolicyVersion, Resource, Scope};
use ice_kernel::{
    Digest, Draft, Event, EventId, EventType, NoOtherRuns, Origin, Payload, RunHead, RunId,
    RunState, Timestamp, ValidationError,
};
use serde_json::{Value, json};

/// 2023-11-14T22:13:20Z: where test clocks start.
pub const T0_US: i64 = 1_700_000_000_000_000;

/// `T0 + seconds`.
pub fn at(seconds: i64) -> Timestamp {
    Timestamp::from_unix_us(T0_US + seconds * 1_000_000).expect("test time in range")
}

pub fn run_id(s: &str) -> RunId {
    RunId::new(s).expect("test run ids are valid")
}

/// A policy version made of one repeated byte.
pub fn version(n: u8) -> PolicyVersion {
    PolicyVersion(Digest([n; 32]))
}

pub fn path(p: &str) -> Resource {
    Resource::path(p).expect("test path is valid")
}

pub fn scope(s: &str) -> Scope {
    Scope::parse(s).expect("test scope is valid")
}

/// A run under test: its validator head, a clock that ticks one millisecond per event, and
/// every event sealed so far.
pub struct TestRun {
    pub head: RunHead,
    pub clock_us: i64,
    pub events: Vec<Event>,
}

impl TestRun {
    /// A run that is EXECUTING (provisioned, context resolved, window opened).
    pub fn executing(id: &str) -> TestRun {
        let mut run = TestRun {
            head: RunHead::new(run_id(id)),
            clock_us: T0_US,
            events: Vec::new(),
        };
        for t in [
            EventType::RunProvisioned,
            EventType::ContextResolved,
            EventType::ExecutionWindowOpened,
        ] {
            run.seal(Draft::new(t.name(), Origin::Runtime));
        }
        assert_eq!(run.state(), RunState::Executing);
        run
    }

    pub fn id(&self) -> RunId {
        self.head.run_id.clone()
    }

    pub fn state(&self) -> RunState {
        self.head.state()
    }

    /// The time of the last event.
    pub fn now(&self) -> Timestamp {
        Timestamp::from_unix_us(self.clock_us).expect("in range")
    }

    /// Seal `draft` one millisecond after the previous event.
    pub fn try_seal(&mut self, draft: Draft) -> Result<Event, ValidationError> {
        self.clock_us += 1_000;
        let at = Timestamp::from_unix_us(self.clock_us).expect("in range");
        let (sealed, _blobs) = self.head.seal(draft, at, &NoOtherRuns)?;
        let event = sealed.into_event();
        self.events.push(event.clone());
        Ok(event)
    }

    pub fn seal(&mut self, draft: Draft) -> Event {
        let t = draft.event_type.clone();
        self.try_seal(draft)
            .unwrap_or_else(|e| panic!("the kernel refused {t}: {e}"))
    }

    /// The agent's `CapabilityRequested`.
    pub fn request(&mut self, agent: &str, capability: &str, target: &str) -> EventId {
        let draft = Draft::new(
            EventType::CapabilityRequested.name(),
            Origin::Agent(agent.into()),
        )
        .intent(format!("{capability} on {target}"))
        .payload(json!({ "capability": capability, "target": target }));
        self.seal(draft).id()
    }

    /// A runtime event of type `t` with this payload and optional authority (and an intent,
    /// which effect events need).
    pub fn runtime(&mut self, t: EventType, payload: Payload, authority: Option<String>) -> Event {
        let mut draft = Draft::new(t.name(), Origin::Runtime)
            .intent(format!("test {t}"))
            .payload(Value::Object(payload));
        draft.authority = authority;
        self.seal(draft)
    }

    /// An operator event of type `t` with this payload.
    pub fn operator(&mut self, t: EventType, payload: Payload) -> Event {
        self.seal(
            Draft::new(t.name(), Origin::Operator("alice".into())).payload(Value::Object(payload)),
        )
    }

    /// Record a grant (authority as the contract requires) and return its event.
    pub fn grant(&mut self, payload: &CapabilityGrantedPayload) -> Event {
        self.runtime(
            EventType::CapabilityGranted,
            payload.to_payload(),
            Some(payload.authority()),
        )
    }

    /// Suspend the run.
    pub fn suspend(&mut self) {
        self.seal(Draft::new(EventType::RunSuspended.name(), Origin::Runtime));
    }
}

/// A grant payload for `agent` "coder": `capability` on `resource` within `scope`, expiring at
/// `expires_at`, with `max_uses`, permitted by policy version 1.
pub fn granted(
    capability: &str,
    resource: Resource,
    scope_text: &str,
    max_uses: u64,
    expires_at: Timestamp,
    request: EventId,
) -> CapabilityGrantedPayload {
    let constraints = ice_authority::Constraints {
        max_bytes: Some(1024),
        timeout_ms: None,
    };
    CapabilityGrantedPayload {
        capability: capability.to_string(),
        resource,
        scope: scope(scope_text),
        agent: "coder".to_string(),
        effect: EffectClass::InternalWrite,
        expires_at,
        max_uses,
        constraints,
        policy_version: version(1),
        policies: vec!["base.cedar#1".to_string()],
        approval: None,
        request,
    }
}
