//! Projections: state as a pure fold of events. Nothing here is a source of truth;
//! each projection can be rebuilt from the log and must equal the live one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::event::{Cost, Event};
use crate::header::Header;
use crate::id::{Digest, RunId};
use crate::state::RunState;
use crate::taxonomy::{Category, EventType};
use crate::timestamp::Timestamp;
use crate::validate::{RunHead, ValidationError};

/// A fold over events.
pub trait Projection {
    /// Take one more event into account.
    fn apply(&mut self, event: &Event) -> Result<(), ValidationError>;
}

impl Projection for RunHead {
    fn apply(&mut self, event: &Event) -> Result<(), ValidationError> {
        RunHead::apply(self, event)
    }
}

/// What an operator wants to know of a run at a glance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSummary {
    /// The run.
    pub run_id: RunId,
    /// Current state.
    pub state: RunState,
    /// Number of events.
    pub events: u64,
    /// Time of the first event.
    pub started_at: Option<Timestamp>,
    /// Time of the last event.
    pub last_at: Option<Timestamp>,
    /// Hash of the last event.
    pub head: Digest,
    /// Sum of the events' cost attributes.
    pub cost: Cost,
    /// Agent proposals (cognitive events and capability requests).
    pub proposals: u64,
    /// Effect events.
    pub effects: u64,
    /// Denials (capabilities and approvals).
    pub denials: u64,
    /// Events per type.
    pub by_type: BTreeMap<String, u64>,
    /// The execution window's current (or last) opening, what a wall-time budget is spent by.
    #[serde(default)]
    pub window: Window,
}

/// The execution window's current (or last) opening (spec §4): when it opened
/// (`ExecutionWindowOpened`, or `RunResumed` after a suspension: a wall-time limit counts from
/// there) and, once it closed, when (`ValidationStarted`, `RunSuspended`, `RunAborted`,
/// `RunTerminatedByRuntime`). A wall-time budget is spent by its elapsed time, not by the time
/// recorded on single calls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    /// When it (last) opened; `None` before it first opens.
    pub opened_at: Option<Timestamp>,
    /// When that opening closed; `None` while it is open.
    pub closed_at: Option<Timestamp>,
}

impl Window {
    /// Take an event of type `t` at `at` into account.
    pub fn apply(&mut self, t: EventType, at: Timestamp) {
        match t {
            EventType::ExecutionWindowOpened | EventType::RunResumed => {
                *self = Window {
                    opened_at: Some(at),
                    closed_at: None,
                }
            }
            EventType::ValidationStarted
            | EventType::RunSuspended
            | EventType::RunAborted
            | EventType::RunTerminatedByRuntime
                if self.opened_at.is_some() && self.closed_at.is_none() =>
            {
                self.closed_at = Some(at);
            }
            _ => {}
        }
    }

    /// How long it has been open, in microseconds: its opening up to when it closed, or up to
    /// `now` while it is open. `None` before it first opens.
    pub fn elapsed_us(&self, now: Timestamp) -> Option<u64> {
        let opened = self.opened_at?;
        let end = self.closed_at.unwrap_or(now);
        Some(end.unix_us().saturating_sub(opened.unix_us()).max(0) as u64)
    }
}

impl RunSummary {
    /// The summary of a run with no events.
    pub fn new(run_id: RunId) -> RunSummary {
        RunSummary {
            run_id,
            state: RunState::Created,
            events: 0,
            started_at: None,
            last_at: None,
            head: Digest::GENESIS,
            cost: Cost::default(),
            proposals: 0,
            effects: 0,
            denials: 0,
            by_type: BTreeMap::new(),
            window: Window::default(),
        }
    }
}

/// A run's head and summary, folded together.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunView {
    /// The validator's view.
    pub head: RunHead,
    /// The operator's view.
    pub summary: RunSummary,
}

impl RunView {
    /// The view of a run with no events.
    pub fn new(run_id: RunId) -> RunView {
        RunView {
            head: RunHead::new(run_id.clone()),
            summary: RunSummary::new(run_id),
        }
    }

    /// Fold a run's events, in order.
    pub fn fold<'a>(
        run_id: RunId,
        events: impl IntoIterator<Item = &'a Event>,
    ) -> Result<RunView, ValidationError> {
        let mut v = RunView::new(run_id);
        for e in events {
            v.apply(e)?;
        }
        Ok(v)
    }
}

impl RunView {
    /// Fold one event, given its header and hash (what replay reads from a stored log).
    pub fn apply_header(&mut self, h: &Header<'_>, hash: Digest) -> Result<(), ValidationError> {
        let t = self.head.apply_header(h, hash)?;
        let s = &mut self.summary;
        s.state = self.head.state();
        s.events += 1;
        s.started_at.get_or_insert(h.at);
        s.last_at = Some(h.at);
        s.head = hash;
        s.cost = s.cost.saturating_add(&h.cost);
        s.window.apply(t, h.at);
        if matches!(
            t.category(),
            Category::Cognitive | Category::CapabilityRequest
        ) {
            s.proposals += 1;
        }
        if t.is_effect() {
            s.effects += 1;
        }
        if matches!(t, EventType::CapabilityDenied | EventType::ApprovalDenied) {
            s.denials += 1;
        }
        match s.by_type.get_mut(t.name()) {
            Some(n) => *n += 1,
            None => {
                s.by_type.insert(t.name().to_string(), 1);
            }
        }
        Ok(())
    }
}

impl Projection for RunView {
    fn apply(&mut self, e: &Event) -> Result<(), ValidationError> {
        self.apply_header(&Header::of(e), e.hash)
    }
}
