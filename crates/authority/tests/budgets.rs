//! Budgets: reserve before, settle after, refuse what does not fit. Properties over random
//! sequences (sequential and from 8 threads sharing one ledger): with honest settlements
//! `spent + outstanding` never passes a limit; with overshooting settlements the excess is at
//! most the overshoot of the reservations that were in flight when the last reservation was
//! accepted (one reservation's overshoot when one is in flight at a time); and folding the
//! recorded events rebuilds the live ledger exactly.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use ice_authority::{
    BookProblem, BudgetLedger, BudgetLimits, BudgetRefusal, BudgetReservedPayload,
    BudgetSettledPayload,
};
use ice_kernel::{Cost, Event, EventType, RunId};
use proptest::prelude::*;

/// Limits on tool calls and bytes; tokens are unlimited.
fn budget(limits: [u64; 2]) -> BudgetLimits {
    BudgetLimits {
        tool_calls: Some(limits[0]),
        bytes: Some(limits[1]),
        ..BudgetLimits::unlimited()
    }
}

/// The limits of the sequential properties.
const SMALL: [u64; 2] = [20, 1_000];

fn cost(tool_calls: u64, bytes: u64, tokens_in: u64) -> Cost {
    Cost {
        tool_calls,
        bytes,
        tokens_in,
        ..Cost::default()
    }
}

/// The limited attributes of a cost, in a fixed order (tool_calls, bytes).
fn limited(c: &Cost) -> [u64; 2] {
    [c.tool_calls, c.bytes]
}

/// What was done to the live ledger, in the order it was done: recorded as events afterwards.
#[derive(Debug, Clone)]
enum Done {
    Reserved(String, Cost),
    Settled(String, Cost),
}

/// An independent account of the bound: the overshoot settled since the last accepted
/// reservation (everything settled since then was in flight at that moment).
#[derive(Debug, Clone)]
struct Model {
    limits: [u64; 2],
    overshoot_since_last_accept: [u64; 2],
    largest_single_overshoot: [u64; 2],
}

impl Model {
    fn new(limits: [u64; 2]) -> Model {
        Model {
            limits,
            overshoot_since_last_accept: [0, 0],
            largest_single_overshoot: [0, 0],
        }
    }

    fn reserved(&mut self) {
        self.overshoot_since_last_accept = [0, 0];
    }

    fn settled(&mut self, amount: &Cost, actual: &Cost) {
        for i in 0..2 {
            let over = limited(actual)[i].saturating_sub(limited(amount)[i]);
            self.overshoot_since_last_accept[i] += over;
            self.largest_single_overshoot[i] = self.largest_single_overshoot[i].max(over);
        }
    }

    /// The invariants, checked after every operation.
    fn check(&self, ledger: &BudgetLedger, honest: bool, one_at_a_time: bool) {
        let spent = limited(&ledger.spent());
        let outstanding = limited(&ledger.outstanding());
        for i in 0..2 {
            let used = spent[i] + outstanding[i];
            let limit = self.limits[i];
            assert!(
                used <= limit + self.overshoot_since_last_accept[i],
                "attribute {i}: spent {} + outstanding {} > limit {limit} + in-flight overshoot {}",
                spent[i],
                outstanding[i],
                self.overshoot_since_last_accept[i]
            );
            if honest {
                assert!(used <= limit, "honest settlements kept {used} > {limit}");
            }
            if one_at_a_time {
                assert!(
                    spent[i] <= limit + self.largest_single_overshoot[i],
                    "one in flight: spent {} > limit {limit} + largest overshoot {}",
                    spent[i],
                    self.largest_single_overshoot[i]
                );
            }
        }
        let left = ledger.left();
        assert_eq!(
            left.tool_calls,
            Some(self.limits[0].saturating_sub(spent[0] + outstanding[0]))
        );
        assert_eq!(left.tokens_in, None);
    }
}

/// Record what was done as sealed events of one run.
fn record(run: &mut TestRun, done: &[Done]) -> Vec<Event> {
    for d in done {
        let (t, payload) = match d {
            Done::Reserved(id, amount) => (
                EventType::BudgetReserved,
                BudgetReservedPayload {
                    reservation: id.clone(),
                    amount: *amount,
                }
                .to_payload(),
            ),
            Done::Settled(id, actual) => (
                EventType::BudgetSettled,
                BudgetSettledPayload {
                    reservation: id.clone(),
                    actual: *actual,
                }
                .to_payload(),
            ),
        };
        run.runtime(t, payload, None);
    }
    run.events.clone()
}

fn fold(run: &RunId, limits: BudgetLimits, events: &[Event]) -> BudgetLedger {
    let mut ledger = BudgetLedger::new(run.clone(), limits);
    for e in events {
        ledger
            .apply(e)
            .unwrap_or_else(|err| panic!("fold refused {}: {err}", e.id()));
    }
    ledger
}

#[derive(Debug, Clone)]
enum Op {
    /// Reserve this much (tool calls, bytes, unlimited tokens).
    Reserve(u64, u64, u64),
    /// Settle the `n`-th outstanding reservation (modulo their number) at `quarters / 4` of
    /// what it reserved, per attribute (so 0 to 1.5 times).
    Settle(usize, u64),
}

fn op(honest: bool) -> impl Strategy<Value = Op> {
    let max_quarters = if honest { 4 } else { 6 };
    prop_oneof![
        (0u64..8, 0u64..400, 0u64..1_000).prop_map(|(c, b, t)| Op::Reserve(c, b, t)),
        (0usize..8, 0u64..=max_quarters).prop_map(|(n, q)| Op::Settle(n, q)),
    ]
}

fn scaled(amount: &Cost, quarters: u64) -> Cost {
    cost(
        amount.tool_calls * quarters / 4,
        amount.bytes * quarters / 4,
        amount.tokens_in * quarters / 4,
    )
}

/// Run `ops` against a live ledger, checking the invariants after each, then check that the
/// fold of the recorded events equals the live ledger (and that a second fold equals the first).
fn run_ops(ops: &[Op], honest: bool, one_at_a_time: bool) {
    let mut run = TestRun::executing("budget-run");
    let mut ledger = BudgetLedger::new(run.id(), budget(SMALL));
    let mut model = Model::new(SMALL);
    let mut done = Vec::new();
    let mut outstanding: Vec<(String, Cost)> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        match *op {
            Op::Reserve(c, b, t) => {
                if one_at_a_time && !outstanding.is_empty() {
                    continue;
                }
                let amount = cost(c, b, t);
                let id = format!("r{i}");
                let spent = limited(&ledger.spent());
                let held = limited(&ledger.outstanding());
                let fits = (0..2).all(|k| spent[k] + held[k] + limited(&amount)[k] <= SMALL[k]);
                let result = ledger.reserve(&id, amount);
                assert_eq!(result.is_ok(), fits, "{result:?}");
                if let Err(refusal) = result {
                    assert!(matches!(refusal, BudgetRefusal::Exhausted { .. }));
                } else {
                    model.reserved();
                    outstanding.push((id.clone(), amount));
                    done.push(Done::Reserved(id, amount));
                }
            }
            Op::Settle(n, quarters) => {
                if outstanding.is_empty() {
                    continue;
                }
                let (id, amount) = outstanding.remove(n % outstanding.len());
                let actual = scaled(&amount, quarters);
                ledger
                    .settle(&id, actual)
                    .expect("settling an outstanding reservation");
                model.settled(&amount, &actual);
                done.push(Done::Settled(id, actual));
            }
        }
        model.check(&ledger, honest, one_at_a_time);
    }
    let events = record(&mut run, &done);
    let once = fold(&run.id(), budget(SMALL), &events);
    assert_eq!(once, ledger, "fold(events) == live ledger");
    assert_eq!(
        fold(&run.id(), budget(SMALL), &events),
        once,
        "replay is stable"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn honest_settlements_never_pass_a_limit(ops in proptest::collection::vec(op(true), 0..80)) {
        run_ops(&ops, true, false);
    }

    #[test]
    fn overshoot_is_bounded_by_what_was_in_flight(ops in proptest::collection::vec(op(false), 0..80)) {
        run_ops(&ops, false, false);
    }

    #[test]
    fn one_in_flight_overshoots_by_at_most_one_reservation(
        ops in proptest::collection::vec(op(false), 0..80),
    ) {
        run_ops(&ops, false, true);
    }
}

/// A small deterministic generator, so each thread has its own reproducible stream.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Shared {
    ledger: BudgetLedger,
    model: Model,
    done: Vec<Done>,
}

fn threads(honest: bool) {
    const THREADS: u64 = 8;
    const OPS: u64 = 400;
    // Room for a few hundred reservations: the threads see both acceptances and refusals.
    const LARGE: [u64; 2] = [600, 30_000];
    let mut run = TestRun::executing("budget-threads");
    let shared = Arc::new(Mutex::new(Shared {
        ledger: BudgetLedger::new(run.id(), budget(LARGE)),
        model: Model::new(LARGE),
        done: Vec::new(),
    }));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || {
                let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ (t + 1).wrapping_mul(0x2545_F491));
                let mut mine: Vec<(String, Cost)> = Vec::new();
                let (mut accepted, mut refused) = (0u32, 0u32);
                for i in 0..OPS {
                    let reserve = mine.is_empty() || rng.below(2) == 0;
                    let mut guard = shared.lock().expect("no thread panicked holding the lock");
                    let s = &mut *guard;
                    if reserve && i < OPS - 8 {
                        let amount = cost(rng.below(4), rng.below(120), rng.below(50));
                        let id = format!("t{t}-{i}");
                        match s.ledger.reserve(&id, amount) {
                            Ok(()) => {
                                accepted += 1;
                                s.model.reserved();
                                s.done.push(Done::Reserved(id.clone(), amount));
                                mine.push((id, amount));
                            }
                            Err(BudgetRefusal::Exhausted { .. }) => refused += 1,
                            Err(other) => panic!("unexpected refusal {other}"),
                        }
                    } else if let Some((id, amount)) = mine.pop() {
                        // Actual cost: at most the amount, or (when not honest) sometimes more.
                        let quarters = if honest || rng.below(4) != 0 {
                            rng.below(5)
                        } else {
                            5 + rng.below(4)
                        };
                        let actual = scaled(&amount, quarters);
                        s.ledger
                            .settle(&id, actual)
                            .expect("own reservation is outstanding");
                        s.model.settled(&amount, &actual);
                        s.done.push(Done::Settled(id, actual));
                    }
                    s.model.check(&s.ledger, honest, false);
                }
                // Settle what is left.
                for (id, amount) in mine {
                    let mut guard = shared.lock().expect("lock");
                    let s = &mut *guard;
                    s.ledger.settle(&id, amount).expect("own reservation");
                    s.model.settled(&amount, &amount);
                    s.done.push(Done::Settled(id, amount));
                    s.model.check(&s.ledger, honest, false);
                }
                (accepted, refused)
            })
        })
        .collect();
    let (mut accepted, mut refused) = (0, 0);
    for h in handles {
        let (a, r) = h.join().expect("thread finished");
        accepted += a;
        refused += r;
    }
    assert!(
        accepted > 100,
        "the test must exercise acceptance ({accepted})"
    );
    assert!(refused > 100, "the test must exercise refusal ({refused})");
    let shared = Arc::try_unwrap(shared)
        .ok()
        .expect("threads joined")
        .into_inner()
        .expect("lock");
    assert_eq!(shared.ledger.outstanding(), Cost::default());
    let events = record(&mut run, &shared.done);
    assert_eq!(fold(&run.id(), budget(LARGE), &events), shared.ledger);
}

#[test]
fn eight_threads_with_honest_settlements_never_pass_a_limit() {
    threads(true);
}

#[test]
fn eight_threads_with_overshooting_settlements_stay_within_the_in_flight_bound() {
    threads(false);
}

#[test]
fn a_refusal_names_the_attribute_limit_spent_reserved_and_asked() {
    let mut ledger = BudgetLedger::new(run_id("r"), budget(SMALL));
    ledger.reserve("a", cost(5, 100, 0)).expect("fits");
    ledger.settle("a", cost(4, 300, 0)).expect("settles");
    ledger.reserve("b", cost(1, 500, 0)).expect("fits");
    let refusal = ledger
        .reserve("c", cost(1, 201, 7))
        .expect_err("bytes do not fit");
    assert_eq!(
        refusal,
        BudgetRefusal::Exhausted {
            attribute: "bytes",
            limit: 1_000,
            spent: 300,
            reserved: 500,
            asked: 201,
        }
    );
    assert_eq!(
        refusal.to_string(),
        "budget exhausted on bytes: limit 1000, spent 300, reserved 500, asked 201"
    );
    // Refused: nothing changed; exactly what is left fits.
    assert_eq!(ledger.reservation("c"), None);
    assert_eq!(ledger.left().bytes, Some(200));
    assert_eq!(ledger.left().tool_calls, Some(15));
    ledger.reserve("c", cost(1, 200, 7)).expect("exactly fits");
    assert_eq!(ledger.left().bytes, Some(0));
    assert_eq!(ledger.outstanding(), cost(2, 700, 7));
    assert_eq!(ledger.spent(), cost(4, 300, 0));
    // Once spent passes a limit, nothing more is reserved, not even zero on that attribute.
    ledger
        .settle("b", cost(1, 900, 0))
        .expect("overshoot is recorded");
    assert_eq!(ledger.left().bytes, Some(0));
    assert!(matches!(
        ledger.reserve("d", cost(0, 0, 1)),
        Err(BudgetRefusal::Exhausted {
            attribute: "bytes",
            ..
        })
    ));
}

#[test]
fn the_fold_refuses_what_the_live_ledger_would_refuse() {
    let mut run = TestRun::executing("r");
    let reserve = |run: &mut TestRun, id: &str, amount: Cost| {
        run.runtime(
            EventType::BudgetReserved,
            BudgetReservedPayload {
                reservation: id.into(),
                amount,
            }
            .to_payload(),
            None,
        )
    };
    let settle = |run: &mut TestRun, id: &str, actual: Cost| {
        run.runtime(
            EventType::BudgetSettled,
            BudgetSettledPayload {
                reservation: id.into(),
                actual,
            }
            .to_payload(),
            None,
        )
    };
    let mut ledger = BudgetLedger::new(run.id(), budget(SMALL));
    let e = reserve(&mut run, "a", cost(15, 0, 0));
    ledger.apply(&e).expect("fits");
    assert_eq!(e.payload["amount"], serde_json::json!({"tool_calls": 15}));
    let before = ledger.clone();

    let too_big = reserve(&mut run, "b", cost(6, 0, 0));
    let err = ledger.apply(&too_big).expect_err("does not fit");
    assert_eq!(err.event, too_big.id());
    assert!(matches!(
        *err.problem,
        BookProblem::Budget(BudgetRefusal::Exhausted {
            attribute: "tool_calls",
            ..
        })
    ));
    let repeat = reserve(&mut run, "a", cost(1, 0, 0));
    assert_eq!(
        *ledger.apply(&repeat).expect_err("repeated id").problem,
        BookProblem::Budget(BudgetRefusal::Duplicate("a".into()))
    );
    let unknown = settle(&mut run, "zz", cost(1, 0, 0));
    assert_eq!(
        *ledger.apply(&unknown).expect_err("unknown").problem,
        BookProblem::Budget(BudgetRefusal::Unknown("zz".into()))
    );
    assert_eq!(ledger, before, "refused events change nothing");

    let ok = settle(&mut run, "a", cost(16, 0, 0));
    ledger.apply(&ok).expect("settles");
    assert_eq!(ledger.spent(), cost(16, 0, 0));
    let twice = settle(&mut run, "a", cost(1, 0, 0));
    assert!(ledger.apply(&twice).is_err(), "a reservation settles once");

    // Another run's budget events are not this ledger's.
    let mut other = TestRun::executing("other");
    let foreign = reserve(&mut other, "x", cost(100, 0, 0));
    let snapshot = ledger.clone();
    ledger.apply(&foreign).expect("ignored");
    assert_eq!(ledger, snapshot);
}
