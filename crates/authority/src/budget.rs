//! Budgets: a run's limits over cost attributes, reserved before an action and settled after
//! (spec I-005), as a pure fold over `BudgetReserved` and `BudgetSettled` events.
//!
//! [`BudgetLedger::reserve`] refuses a reservation when, for any limited attribute,
//! `spent + outstanding + amount > limit`. Settling moves a reservation to `spent` at its actual
//! cost, which may exceed what was reserved: the ledger records what happened and never refuses
//! a settlement for its size. What it guarantees:
//!
//! - if every settlement costs at most what it reserved, `spent + outstanding <= limit` always;
//! - otherwise, `spent + outstanding <= limit + the overshoots (actual - amount) of the
//!   reservations that were outstanding when the last reservation was accepted`. With one
//!   reservation in flight at a time that is that one reservation's overshoot. Once `spent`
//!   passes a limit, every reservation is refused.
//!
//! The runtime records a `BudgetReserved` only for a reservation [`BudgetLedger::reserve`]
//! accepted, so folding a run's events ([`BudgetLedger::apply`]) accepts exactly what the live
//! ledger accepted and rebuilds an equal ledger.

use std::collections::{BTreeMap, BTreeSet};

use ice_kernel::{Cost, Event, EventType, RunId};
use serde::{Deserialize, Serialize};

use crate::capability::truncated;
use crate::limits::MAX_RESERVATION_ID_LEN;
use crate::payload::{BookError, BookProblem, BudgetReservedPayload, BudgetSettledPayload};
use crate::request::BudgetLeft;

/// A run's budget: a limit per cost attribute (names and units as [`Cost`]), `None` for no
/// limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetLimits {
    /// Wall-clock time, in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wall_time_us: Option<u64>,
    /// Model input tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_in: Option<u64>,
    /// Model output tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_out: Option<u64>,
    /// Tool calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<u64>,
    /// Bytes read or written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// Credits, in millionths.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credits_micro: Option<u64>,
    /// Risk points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub risk: Option<u64>,
}

impl BudgetLimits {
    /// No limit on anything.
    pub fn unlimited() -> BudgetLimits {
        BudgetLimits::default()
    }

    /// Each limit with its attribute's name, in [`Cost::fields`] order.
    pub fn fields(&self) -> [(&'static str, Option<u64>); 7] {
        [
            ("wall_time_us", self.wall_time_us),
            ("tokens_in", self.tokens_in),
            ("tokens_out", self.tokens_out),
            ("tool_calls", self.tool_calls),
            ("bytes", self.bytes),
            ("credits_micro", self.credits_micro),
            ("risk", self.risk),
        ]
    }
}

/// Why the ledger refused a reservation or a settlement.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BudgetRefusal {
    /// The reservation does not fit (the denial code `budget_exhausted`).
    #[error(
        "budget exhausted on {attribute}: limit {limit}, spent {spent}, reserved {reserved}, asked {asked}"
    )]
    Exhausted {
        /// The first attribute (in [`Cost::fields`] order) that does not fit.
        attribute: &'static str,
        /// Its limit.
        limit: u64,
        /// Spent on it so far.
        spent: u64,
        /// Held by outstanding reservations.
        reserved: u64,
        /// Asked for by this reservation.
        asked: u64,
    },
    /// A reservation id was used before in this run.
    #[error("reservation {0:?} was already made in this run")]
    Duplicate(String),
    /// A settlement names no outstanding reservation.
    #[error("reservation {0:?} is not outstanding (never made, or already settled)")]
    Unknown(String),
    /// A reservation id breaks the naming rule.
    #[error("reservation id {id:?}: {problem}")]
    InvalidId {
        /// The id given (cut to 80 bytes).
        id: String,
        /// What is wrong with it.
        problem: String,
    },
}

/// Check a reservation id: 1 to [`MAX_RESERVATION_ID_LEN`] bytes, no control characters.
pub(crate) fn check_reservation_id(id: &str) -> Result<(), BudgetRefusal> {
    let bad = |problem: String| BudgetRefusal::InvalidId {
        id: truncated(id),
        problem,
    };
    if id.is_empty() || id.len() > MAX_RESERVATION_ID_LEN {
        return Err(bad(format!("must be 1 to {MAX_RESERVATION_ID_LEN} bytes")));
    }
    if let Some(c) = id.chars().find(|c| c.is_control()) {
        return Err(bad(format!("contains the control character {c:?}")));
    }
    Ok(())
}

fn cost_of(values: [u64; 7]) -> Cost {
    let [
        wall_time_us,
        tokens_in,
        tokens_out,
        tool_calls,
        bytes,
        credits_micro,
        risk,
    ] = values;
    Cost {
        wall_time_us,
        tokens_in,
        tokens_out,
        tool_calls,
        bytes,
        credits_micro,
        risk,
    }
}

fn values(cost: &Cost) -> [u64; 7] {
    cost.fields().map(|(_, v)| v)
}

/// One run's budget: its limits, what it has spent, and its outstanding reservations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetLedger {
    run: RunId,
    limits: BudgetLimits,
    spent: Cost,
    reserved: BTreeMap<String, Cost>,
    settled: BTreeSet<String>,
}

impl BudgetLedger {
    /// An empty ledger for `run` with these limits.
    pub fn new(run: RunId, limits: BudgetLimits) -> BudgetLedger {
        BudgetLedger {
            run,
            limits,
            spent: Cost::default(),
            reserved: BTreeMap::new(),
            settled: BTreeSet::new(),
        }
    }

    /// The run.
    pub fn run(&self) -> &RunId {
        &self.run
    }

    /// The limits.
    pub fn limits(&self) -> &BudgetLimits {
        &self.limits
    }

    /// Replace the limits (an operator's reconfiguration of a suspended run, recorded as an
    /// event the runtime folds). What was spent and reserved stays; later reservations are
    /// checked against the new limits.
    pub fn set_limits(&mut self, limits: BudgetLimits) {
        self.limits = limits;
    }

    /// What settled reservations cost in all.
    pub fn spent(&self) -> Cost {
        self.spent
    }

    /// What outstanding reservations hold in all (saturating at `u64::MAX` per attribute).
    pub fn outstanding(&self) -> Cost {
        let sum = self.outstanding_exact();
        // Recorded in a run's projection: at most what an event can carry.
        let max = u128::from(ice_kernel::limits::MAX_SAFE_INTEGER);
        cost_of(sum.map(|v| v.min(max) as u64))
    }

    fn outstanding_exact(&self) -> [u128; 7] {
        let mut sum = [0u128; 7];
        for amount in self.reserved.values() {
            for (total, v) in sum.iter_mut().zip(values(amount)) {
                *total += u128::from(v);
            }
        }
        sum
    }

    /// The outstanding reservation with this id.
    pub fn reservation(&self, id: &str) -> Option<&Cost> {
        self.reserved.get(id)
    }

    /// Every outstanding reservation, by id.
    pub fn reservations(&self) -> impl Iterator<Item = (&str, &Cost)> {
        self.reserved.iter().map(|(id, cost)| (id.as_str(), cost))
    }

    /// What is left per limited attribute: `limit - spent - outstanding`, at least 0; `None`
    /// where there is no limit.
    pub fn left(&self) -> BudgetLeft {
        let outstanding = self.outstanding_exact();
        let spent = values(&self.spent);
        let mut left = [None; 7];
        for (i, (_, limit)) in self.limits.fields().into_iter().enumerate() {
            left[i] = limit.map(|l| {
                let used = u128::from(spent[i]) + outstanding[i];
                u64::try_from(u128::from(l).saturating_sub(used)).unwrap_or(0)
            });
        }
        let [
            wall_time_us,
            tokens_in,
            tokens_out,
            tool_calls,
            bytes,
            credits_micro,
            risk,
        ] = left;
        BudgetLeft {
            wall_time_us,
            tokens_in,
            tokens_out,
            tool_calls,
            bytes,
            credits_micro,
            risk,
        }
    }

    /// Reserve `amount` under `id` (unique within the run). Refused if the id is invalid or was
    /// used before, or if for any limited attribute `spent + outstanding + amount > limit`
    /// (the refusal names the first such attribute). On refusal nothing changes.
    pub fn reserve(&mut self, id: &str, amount: Cost) -> Result<(), BudgetRefusal> {
        self.check_reserve(id, amount)?;
        self.reserved.insert(id.to_string(), amount);
        Ok(())
    }

    /// Whether [`Self::reserve`] would accept this reservation now, changing nothing (the
    /// runtime asks before it records anything for a call).
    pub fn check_reserve(&self, id: &str, amount: Cost) -> Result<(), BudgetRefusal> {
        check_reservation_id(id)?;
        if self.reserved.contains_key(id) || self.settled.contains(id) {
            return Err(BudgetRefusal::Duplicate(id.to_string()));
        }
        let outstanding = self.outstanding_exact();
        let spent = values(&self.spent);
        let asked = values(&amount);
        for (i, (attribute, limit)) in self.limits.fields().into_iter().enumerate() {
            let Some(limit) = limit else { continue };
            let total = u128::from(spent[i]) + outstanding[i] + u128::from(asked[i]);
            if total > u128::from(limit) {
                return Err(BudgetRefusal::Exhausted {
                    attribute,
                    limit,
                    spent: spent[i],
                    reserved: u64::try_from(outstanding[i]).unwrap_or(u64::MAX),
                    asked: asked[i],
                });
            }
        }
        Ok(())
    }

    /// Settle the outstanding reservation `id` at its `actual` cost, which moves to `spent`
    /// (saturating). `actual` may exceed the amount reserved. An id that is not outstanding is
    /// refused and nothing changes.
    pub fn settle(&mut self, id: &str, actual: Cost) -> Result<(), BudgetRefusal> {
        if self.reserved.remove(id).is_none() {
            return Err(BudgetRefusal::Unknown(truncated(id)));
        }
        self.settled.insert(id.to_string());
        self.spent = self.spent.saturating_add(&actual);
        Ok(())
    }

    /// Fold one event: `BudgetReserved` reserves and `BudgetSettled` settles, exactly as the
    /// live calls do; events of other runs and types are ignored. A recorded reservation the
    /// ledger refuses (it does not fit, or repeats an id) or a settlement of an unknown
    /// reservation is an error, and the ledger is unchanged.
    pub fn apply(&mut self, event: &Event) -> Result<(), BookError> {
        if event.run_id != self.run {
            return Ok(());
        }
        match EventType::from_name(&event.event_type) {
            Some(EventType::BudgetReserved) => {
                let p = BudgetReservedPayload::from_event(event)
                    .map_err(|e| BookError::new(event, e))?;
                self.reserve(&p.reservation, p.amount)
                    .map_err(|r| BookError::new(event, BookProblem::Budget(r)))
            }
            Some(EventType::BudgetSettled) => {
                let p = BudgetSettledPayload::from_event(event)
                    .map_err(|e| BookError::new(event, e))?;
                self.settle(&p.reservation, p.actual)
                    .map_err(|r| BookError::new(event, BookProblem::Budget(r)))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger(limit: u64) -> BudgetLedger {
        let run = RunId::new("r").unwrap_or_else(|e| panic!("{e}"));
        BudgetLedger::new(
            run,
            BudgetLimits {
                tool_calls: Some(limit),
                ..BudgetLimits::default()
            },
        )
    }

    fn calls(n: u64) -> Cost {
        Cost {
            tool_calls: n,
            ..Cost::default()
        }
    }

    #[test]
    fn exactly_full_fits_one_more_does_not() {
        let mut l = ledger(3);
        assert_eq!(l.reserve("a", calls(2)), Ok(()));
        assert_eq!(l.reserve("b", calls(1)), Ok(()));
        assert_eq!(
            l.reserve("c", calls(1)),
            Err(BudgetRefusal::Exhausted {
                attribute: "tool_calls",
                limit: 3,
                spent: 0,
                reserved: 3,
                asked: 1
            })
        );
        assert_eq!(l.left().tool_calls, Some(0));
        assert_eq!(l.left().bytes, None);
    }

    #[test]
    fn ids_are_single_use_and_settling_needs_an_outstanding_one() {
        let mut l = ledger(10);
        assert_eq!(l.reserve("a", calls(1)), Ok(()));
        assert_eq!(
            l.reserve("a", calls(1)),
            Err(BudgetRefusal::Duplicate("a".into()))
        );
        assert_eq!(l.settle("a", calls(1)), Ok(()));
        assert_eq!(
            l.reserve("a", calls(1)),
            Err(BudgetRefusal::Duplicate("a".into()))
        );
        assert_eq!(
            l.settle("a", calls(1)),
            Err(BudgetRefusal::Unknown("a".into()))
        );
        assert!(matches!(
            l.reserve("", calls(1)),
            Err(BudgetRefusal::InvalidId { .. })
        ));
    }
}
