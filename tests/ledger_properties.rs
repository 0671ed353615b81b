//! A property test of the ledger against the real PostgreSQL: random
//! interleavings of grant, reserve (all_or_nothing, first_fit, sequential),
//! replayed requests, capture with random actual costs (overruns, zero, no cost
//! reported, failures, cancelled jobs), duplicate captures, cancel, execution
//! deadlines passing and the reconciler's expiry, soft holds (taken, started,
//! cancelled, expired) keep every invariant of the design:
//!
//! - `available ≥ 0` and `held ≥ 0`, always;
//! - per hold, `amount = captured + released + open` (open holds released
//!   nothing; a resolved hold accounts for every credit), and it resolves once;
//! - a closed batch has nothing pending and its hold is resolved;
//! - each item is captured at most once, and a second capture reports the first;
//! - balances equal the journal, and `Ledger::audit` finds nothing.
//!
//! The invariants are checked after every step with SQL of this file (not the
//! ledger's), and a small model of the account predicts every answer of the
//! ledger and the balances. Some steps run two operations at once where the
//! ledger promises that exactly one wins (duplicate captures, a capture racing
//! the deadline expiry or a cancel, a soft hold started while it expires): the
//! outcome must be one of the sequential orders of the model.
//!
//! One database for the whole test, a fresh account per case. The seed is
//! fixed, so CI runs the same cases every time; `PROPTEST_RNG_SEED` and
//! `PROPTEST_CASES` explore others. A failing case is saved in
//! `tests/ledger_properties.proptest-regressions` (commit it) and replayed first.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use holdfast::fleet::Roles;
use holdfast_common::ledger::{
    ClosedBatch, ItemOutcome, Ledger, LedgerError, Reserved, SettleReport, Settled, Settlement,
};
use holdfast_common::messages::{BatchRequest, Decision, ItemRequest, Mode};
use proptest::prelude::*;
use proptest::test_runner::{
    Config as ProptestConfig, FileFailurePersistence, RngSeed, TestCaseError, TestRunner,
};
use serde_json::Value;
use support::*;
use tokio_postgres::Client;

/// Cases in CI (each runs up to 40 steps, every step checked).
const CASES: u32 = 20;
const SEED: u64 = 0x484f_4c44;
const CHUNK: usize = 2;
const LONG: Duration = Duration::from_secs(3600);

// ---------------------------------------------------------------- operations

/// What a generator reports for one item.
#[derive(Clone, Debug)]
enum Outcome {
    /// Succeeded at this actual cost (may exceed the reservation, may be 0).
    Cost(i64),
    /// Succeeded without reporting a cost: charged its reservation.
    NoCost,
    Fail,
    /// Not run because its batch was cancelled.
    Cancelled,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    AllOrNothing,
    FirstFit,
    Sequential,
}

/// One step. Indices pick a batch, item or soft hold of the case (modulo).
#[derive(Clone, Debug)]
enum Op {
    Grant(i64),
    Reserve(Kind, Vec<i64>),
    Replay(usize),
    Settle(usize, usize, Outcome),
    /// The same item twice in one settle call.
    SettleTwiceInOneCall(usize, usize, Outcome, Outcome),
    Cancel(usize),
    PassDeadline(usize),
    ExpireOverdue,
    CloseFinished,
    SoftHold(i64),
    PassTtl(usize),
    ExpireSoft,
    CancelSoft(usize),
    StartFromSoft(usize),
    RaceDuplicateCapture(usize, usize, Outcome, Outcome),
    RaceCaptureExpiry(usize, usize, Outcome),
    RaceCaptureCancel(usize, usize, Outcome),
    RaceStartExpiry(usize),
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        5 => (0i64..=45).prop_map(Outcome::Cost),
        2 => Just(Outcome::NoCost),
        2 => Just(Outcome::Fail),
        1 => Just(Outcome::Cancelled),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let ix = || 0usize..16;
    prop_oneof![
        3 => (1i64..=120).prop_map(Op::Grant),
        5 => (
            prop_oneof![Just(Kind::AllOrNothing), Just(Kind::FirstFit), Just(Kind::Sequential)],
            prop::collection::vec(1i64..=20, 1..=5)
        )
            .prop_map(|(k, c)| Op::Reserve(k, c)),
        1 => ix().prop_map(Op::Replay),
        10 => (ix(), ix(), outcome()).prop_map(|(b, i, o)| Op::Settle(b, i, o)),
        1 => (ix(), ix(), outcome(), outcome()).prop_map(|(b, i, o, p)| Op::SettleTwiceInOneCall(b, i, o, p)),
        2 => ix().prop_map(Op::Cancel),
        2 => ix().prop_map(Op::PassDeadline),
        2 => Just(Op::ExpireOverdue),
        1 => Just(Op::CloseFinished),
        2 => (1i64..=40).prop_map(Op::SoftHold),
        1 => ix().prop_map(Op::PassTtl),
        1 => Just(Op::ExpireSoft),
        1 => ix().prop_map(Op::CancelSoft),
        2 => ix().prop_map(Op::StartFromSoft),
        2 => (ix(), ix(), outcome(), outcome()).prop_map(|(b, i, o, p)| Op::RaceDuplicateCapture(b, i, o, p)),
        2 => (ix(), ix(), outcome()).prop_map(|(b, i, o)| Op::RaceCaptureExpiry(b, i, o)),
        2 => (ix(), ix(), outcome()).prop_map(|(b, i, o)| Op::RaceCaptureCancel(b, i, o)),
        1 => ix().prop_map(Op::RaceStartExpiry),
    ]
}

// ---------------------------------------------------------------- the model

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IState {
    Queued,
    Pending,
    Succeeded,
    Failed,
    Cancelled,
    Skipped,
}

impl IState {
    fn as_str(self) -> &'static str {
        match self {
            IState::Queued => "queued",
            IState::Pending => "pending",
            IState::Succeeded => "succeeded",
            IState::Failed => "failed",
            IState::Cancelled => "cancelled",
            IState::Skipped => "skipped",
        }
    }
}

#[derive(Clone, Debug)]
struct MItem {
    id: String,
    cost: i64,
    reserved: i64,
    state: IState,
    captured: i64,
}

#[derive(Clone, Debug)]
struct MBatch {
    request: BatchRequest,
    /// denied, granted, cancelling, completed, expired, cancelled.
    state: String,
    amount: i64,
    items: Vec<MItem>,
    sequential: bool,
    overdue: bool,
    /// The soft hold this batch consumed, if any (index into `softs`).
    soft: Option<usize>,
    /// The decision as first answered; a replay repeats it.
    decision: Obs,
}

impl MBatch {
    fn open(&self) -> bool {
        matches!(self.state.as_str(), "granted" | "cancelling")
    }
    fn captured(&self) -> i64 {
        self.items.iter().map(|i| i.captured).sum()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SState {
    Open,
    Consumed,
    Closed,
    Expired,
}

#[derive(Clone, Debug)]
struct MSoft {
    id: String,
    amount: i64,
    state: SState,
    past_ttl: bool,
}

/// The expected state of one account.
#[derive(Clone, Debug)]
struct Model {
    account: String,
    balance: i64,
    held: i64,
    batches: Vec<MBatch>,
    softs: Vec<MSoft>,
}

/// A concrete call on the ledger, resolved from an [`Op`] against the model.
#[derive(Clone, Debug)]
enum Call {
    Grant(i64),
    Reserve(BatchRequest),
    Replay(usize),
    Settle(Vec<(usize, usize, Outcome)>),
    Cancel(usize),
    ExpireOverdue { skip: Option<usize> },
    CloseFinished,
    SoftHold(i64),
    ExpireSoft { skip: Option<usize> },
    CancelSoft(usize),
    StartFromSoft(usize, BatchRequest),
}

/// What a call answered, reduced to what the model can predict.
#[derive(Clone, Debug, PartialEq)]
enum Obs {
    Done,
    Decision {
        kind: String,
        reserved: i64,
        run: Vec<String>,
        replayed: bool,
    },
    Refused(String),
    Settled {
        results: Vec<Settled>,
        closed: Vec<(String, String)>,
        advanced: Vec<String>,
    },
    Cancel(String),
    Closed(Vec<(String, String)>),
    Expired(usize),
    Soft(Result<(), (i64, i64)>),
    Reservation(String),
}

fn error_kind(e: &LedgerError) -> String {
    match e {
        LedgerError::Reservation(_) => "reservation",
        LedgerError::WrongState(_) => "wrong_state",
        LedgerError::NotFound(_) => "not_found",
        LedgerError::Insufficient { .. } => "insufficient",
        LedgerError::Conflict(_) => "conflict",
        LedgerError::UnknownAccount(_) => "unknown_account",
        other => panic!("unexpected ledger error: {other}"),
    }
    .into()
}

impl Model {
    fn available(&self) -> i64 {
        self.balance - self.held
    }

    fn batch_ix(&self, id: &str) -> Option<usize> {
        self.batches.iter().position(|b| b.request.batch_id == id)
    }

    /// Predict `call`'s answer and apply its effects.
    fn apply(&mut self, call: &Call) -> Obs {
        match call {
            Call::Grant(a) => {
                self.balance += a;
                Obs::Done
            }
            Call::Reserve(req) => self.reserve(req),
            Call::Replay(b) => match &self.batches[*b].decision {
                Obs::Decision {
                    kind,
                    reserved,
                    run,
                    ..
                } => Obs::Decision {
                    kind: kind.clone(),
                    reserved: *reserved,
                    run: run.clone(),
                    replayed: true,
                },
                other => unreachable!("a batch's decision is a decision, not {other:?}"),
            },
            Call::Settle(items) => self.settle(items),
            Call::Cancel(b) => self.cancel(*b),
            Call::ExpireOverdue { skip } => {
                let ids: Vec<usize> = (0..self.batches.len())
                    .filter(|&i| {
                        self.batches[i].open() && self.batches[i].overdue && Some(i) != *skip
                    })
                    .collect();
                let mut closed = vec![];
                for i in ids {
                    for it in &mut self.batches[i].items {
                        match it.state {
                            IState::Pending => it.state = IState::Failed,
                            IState::Queued => it.state = IState::Skipped,
                            _ => {}
                        }
                    }
                    closed.push(self.close(i, "expired"));
                }
                closed.sort();
                Obs::Closed(closed)
            }
            Call::CloseFinished => Obs::Closed(vec![]),
            Call::SoftHold(amount) => {
                if *amount > self.available() {
                    Obs::Soft(Err((*amount, self.available())))
                } else {
                    self.held += amount;
                    self.softs.push(MSoft {
                        id: String::new(), // the ledger's id, set by the caller
                        amount: *amount,
                        state: SState::Open,
                        past_ttl: false,
                    });
                    Obs::Soft(Ok(()))
                }
            }
            Call::ExpireSoft { skip } => {
                let mut n = 0;
                for (i, s) in self.softs.iter_mut().enumerate() {
                    if s.state == SState::Open && s.past_ttl && Some(i) != *skip {
                        s.state = SState::Expired;
                        self.held -= s.amount;
                        n += 1;
                    }
                }
                Obs::Expired(n)
            }
            Call::CancelSoft(s) => {
                let soft = &mut self.softs[*s];
                match soft.state {
                    SState::Open => {
                        soft.state = SState::Closed;
                        self.held -= soft.amount;
                        Obs::Reservation("closed".into())
                    }
                    SState::Consumed => Obs::Refused("wrong_state".into()),
                    SState::Closed => Obs::Reservation("closed".into()),
                    SState::Expired => Obs::Reservation("expired".into()),
                }
            }
            Call::StartFromSoft(s, req) => {
                let soft = self.softs[*s].clone();
                match (soft.state, soft.past_ttl) {
                    (SState::Open, false) => {
                        self.softs[*s].state = SState::Consumed;
                        let items = req
                            .items
                            .iter()
                            .map(|i| MItem {
                                id: i.item_id.clone(),
                                cost: i.estimated_cost,
                                reserved: i.estimated_cost,
                                state: IState::Pending,
                                captured: 0,
                            })
                            .collect::<Vec<_>>();
                        let decision = Obs::Decision {
                            kind: "granted".into(),
                            reserved: soft.amount,
                            run: items.iter().map(|i| i.id.clone()).collect(),
                            replayed: false,
                        };
                        self.batches.push(MBatch {
                            request: req.clone(),
                            state: "granted".into(),
                            amount: soft.amount,
                            items,
                            sequential: false,
                            overdue: false,
                            soft: Some(*s),
                            decision: decision.clone(),
                        });
                        decision
                    }
                    (SState::Open, true) => {
                        // Started after its TTL: the start expires it and is refused.
                        self.softs[*s].state = SState::Expired;
                        self.held -= soft.amount;
                        Obs::Refused("reservation".into())
                    }
                    _ => Obs::Refused("reservation".into()),
                }
            }
        }
    }

    fn reserve(&mut self, req: &BatchRequest) -> Obs {
        let available = self.available();
        let costs: Vec<i64> = req.items.iter().map(|i| i.estimated_cost).collect();
        let run: Vec<usize> = match req.mode {
            Mode::FirstFit => {
                let mut sum = 0;
                (0..costs.len())
                    .take_while(|&i| {
                        sum += costs[i];
                        sum <= available
                    })
                    .collect()
            }
            Mode::Sequential => {
                let first: Vec<usize> = (0..costs.len().min(CHUNK)).collect();
                if first.iter().map(|&i| costs[i]).sum::<i64>() <= available {
                    first
                } else {
                    vec![]
                }
            }
            _ => {
                if costs.iter().sum::<i64>() <= available {
                    (0..costs.len()).collect()
                } else {
                    vec![]
                }
            }
        };
        let sequential = req.mode == Mode::Sequential;
        if run.is_empty() {
            let decision = Obs::Decision {
                kind: "insufficient".into(),
                reserved: 0,
                run: vec![],
                replayed: false,
            };
            self.batches.push(MBatch {
                request: req.clone(),
                state: "denied".into(),
                amount: 0,
                items: vec![],
                sequential,
                overdue: false,
                soft: None,
                decision: decision.clone(),
            });
            return decision;
        }
        let total: i64 = run.iter().map(|&i| costs[i]).sum();
        let items: Vec<MItem> = req
            .items
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let runs = run.contains(&i);
                MItem {
                    id: r.item_id.clone(),
                    cost: r.estimated_cost,
                    reserved: if runs { r.estimated_cost } else { 0 },
                    state: match (runs, sequential) {
                        (true, _) => IState::Pending,
                        (false, true) => IState::Queued,
                        (false, false) => IState::Skipped,
                    },
                    captured: 0,
                }
            })
            .collect();
        self.held += total;
        let ids = if sequential {
            req.items.iter().map(|i| i.item_id.clone()).collect()
        } else {
            run.iter().map(|&i| req.items[i].item_id.clone()).collect()
        };
        let decision = Obs::Decision {
            kind: "granted".into(),
            reserved: total,
            run: ids,
            replayed: false,
        };
        self.batches.push(MBatch {
            request: req.clone(),
            state: "granted".into(),
            amount: total,
            items,
            sequential,
            overdue: false,
            soft: None,
            decision: decision.clone(),
        });
        decision
    }

    fn settle(&mut self, calls: &[(usize, usize, Outcome)]) -> Obs {
        let mut results = Vec::new();
        let mut touched = BTreeSet::new();
        for (b, i, outcome) in calls {
            let batch = &mut self.batches[*b];
            let Some(item) = batch.items.get_mut(*i) else {
                results.push(Settled::Unknown); // a denied batch has no items
                continue;
            };
            let open = matches!(batch.state.as_str(), "granted" | "cancelling");
            let r = match item.state {
                IState::Pending if open => {
                    touched.insert(*b);
                    match outcome {
                        Outcome::Cost(a) => {
                            item.state = IState::Succeeded;
                            item.captured = (*a).min(item.reserved);
                            Settled::Captured {
                                captured: item.captured,
                                overrun: (a - item.reserved).max(0),
                            }
                        }
                        Outcome::NoCost => {
                            item.state = IState::Succeeded;
                            item.captured = item.reserved;
                            Settled::Captured {
                                captured: item.captured,
                                overrun: 0,
                            }
                        }
                        Outcome::Fail => {
                            item.state = IState::Failed;
                            Settled::Failed
                        }
                        Outcome::Cancelled => {
                            item.state = IState::Cancelled;
                            Settled::Cancelled
                        }
                    }
                }
                IState::Pending | IState::Queued => Settled::Unknown,
                s => Settled::AlreadySettled {
                    state: s.as_str().into(),
                    captured: item.captured,
                },
            };
            results.push(r);
        }
        let (mut closed, mut advanced) = (vec![], vec![]);
        for b in touched {
            if self.batches[b]
                .items
                .iter()
                .any(|i| i.state == IState::Pending)
            {
                continue;
            }
            if self.batches[b].state == "cancelling" {
                closed.push(self.close(b, "cancelled"));
                continue;
            }
            let queued: Vec<usize> = (0..self.batches[b].items.len())
                .filter(|&i| self.batches[b].items[i].state == IState::Queued)
                .take(CHUNK)
                .collect();
            if self.batches[b].sequential && !queued.is_empty() {
                let cost: i64 = queued.iter().map(|&i| self.batches[b].items[i].cost).sum();
                if cost <= self.available() {
                    let batch = &mut self.batches[b];
                    for &i in &queued {
                        batch.items[i].state = IState::Pending;
                        batch.items[i].reserved = batch.items[i].cost;
                    }
                    batch.amount += cost;
                    batch.state = "granted".into();
                    self.held += cost;
                    advanced.push(batch.request.batch_id.clone());
                    continue;
                }
                for it in &mut self.batches[b].items {
                    if it.state == IState::Queued {
                        it.state = IState::Skipped;
                    }
                }
            }
            closed.push(self.close(b, "completed"));
        }
        closed.sort();
        Obs::Settled {
            results,
            closed,
            advanced,
        }
    }

    fn cancel(&mut self, b: usize) -> Obs {
        match self.batches[b].state.as_str() {
            "granted" => {
                let batch = &mut self.batches[b];
                for it in &mut batch.items {
                    if it.state == IState::Queued {
                        it.state = IState::Skipped;
                    }
                }
                batch.state = "cancelling".into();
                if batch.items.iter().any(|i| i.state == IState::Pending) {
                    Obs::Cancel("cancelling".into())
                } else {
                    self.close(b, "cancelled");
                    Obs::Cancel("cancelled".into())
                }
            }
            "cancelling" => Obs::Cancel("cancelling".into()),
            _ => Obs::Refused("wrong_state".into()),
        }
    }

    /// Close batch `b`: post its captures, release the rest of its hold.
    fn close(&mut self, b: usize, state: &str) -> (String, String) {
        let captured = self.batches[b].captured();
        let amount = self.batches[b].amount;
        self.balance -= captured;
        self.held -= amount;
        let batch = &mut self.batches[b];
        batch.state = state.into();
        if let Some(s) = batch.soft {
            self.softs[s].state = SState::Closed;
        }
        (self.batches[b].request.batch_id.clone(), state.into())
    }
}

// ---------------------------------------------------------------- the real ledger

struct Real<'a> {
    ledger: &'a Ledger,
    db: &'a Client,
    account: &'a str,
    /// What the audit found before this case began.
    drift_before: Vec<holdfast_common::ledger::Drift>,
}

fn ours(account: &str, closed: &[ClosedBatch]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = closed
        .iter()
        .filter(|c| c.account_id == account)
        .map(|c| (c.batch_id.clone(), c.state.clone()))
        .collect();
    v.sort();
    v
}

fn decision_obs(r: Result<Reserved, LedgerError>) -> Obs {
    match r {
        Ok(r) => match r.decision {
            Decision::Granted(g) => Obs::Decision {
                kind: "granted".into(),
                reserved: g.reserved,
                run: g.item_ids,
                replayed: r.replayed,
            },
            Decision::Insufficient(_) => Obs::Decision {
                kind: "insufficient".into(),
                reserved: 0,
                run: vec![],
                replayed: r.replayed,
            },
            Decision::Rejected(r) => panic!("the ledger rejected a valid request: {r:?}"),
        },
        Err(e) => Obs::Refused(error_kind(&e)),
    }
}

impl Real<'_> {
    async fn apply(&self, model: &Model, call: &Call) -> Obs {
        let l = self.ledger;
        match call {
            Call::Grant(a) => {
                l.grant(self.account, *a, Some("property"), false)
                    .await
                    .unwrap();
                Obs::Done
            }
            Call::Reserve(req) => decision_obs(l.reserve(&input(req)).await),
            Call::Replay(b) => decision_obs(l.reserve(&input(&model.batches[*b].request)).await),
            Call::Settle(items) => {
                let s: Vec<Settlement> = items
                    .iter()
                    .map(|(b, i, o)| settlement(model, *b, *i, o))
                    .collect();
                self.settled(l.settle(&s).await.unwrap())
            }
            Call::Cancel(b) => match l.cancel_batch(&model.batches[*b].request.batch_id).await {
                Ok(c) => Obs::Cancel(c.state),
                Err(e) => Obs::Refused(error_kind(&e)),
            },
            Call::ExpireOverdue { .. } => {
                Obs::Closed(ours(self.account, &l.expire_overdue(1000).await.unwrap()))
            }
            Call::CloseFinished => {
                let (closed, advanced) = l.close_finished(1000).await.unwrap();
                assert!(
                    !advanced.iter().any(|b| b.starts_with(self.account)),
                    "close_finished advanced {advanced:?}: a settle should have"
                );
                Obs::Closed(ours(self.account, &closed))
            }
            Call::SoftHold(amount) => match l.reserve_soft(self.account, *amount, LONG).await {
                Ok(_) => Obs::Soft(Ok(())),
                Err(LedgerError::Insufficient {
                    requested,
                    available,
                }) => Obs::Soft(Err((requested, available))),
                Err(e) => panic!("soft hold: {e}"),
            },
            Call::ExpireSoft { .. } => Obs::Expired(l.expire_soft_holds(1000).await.unwrap()),
            Call::CancelSoft(s) => match l.cancel_soft(&model.softs[*s].id).await {
                Ok(r) => Obs::Reservation(r.state),
                Err(e) => Obs::Refused(error_kind(&e)),
            },
            Call::StartFromSoft(_, req) => decision_obs(l.reserve(&input(req)).await),
        }
    }

    fn settled(&self, r: SettleReport) -> Obs {
        let mut advanced = r.advanced;
        advanced.sort();
        Obs::Settled {
            results: r.results,
            closed: ours(self.account, &r.closed),
            advanced,
        }
    }

    /// Move a batch's execution deadline into the past (instead of waiting).
    async fn pass_deadline(&self, batch_id: &str) {
        self.db
            .execute(
                "UPDATE batches SET deadline_at = now() - interval '1 second' WHERE id = $1",
                &[&batch_id],
            )
            .await
            .unwrap();
    }

    /// Move a soft hold's TTL into the past.
    async fn pass_ttl(&self, id: &str) {
        let id: uuid::Uuid = id.parse().unwrap();
        self.db
            .execute(
                "UPDATE holds SET expires_at = now() - interval '1 second'
                 WHERE id = $1 AND expires_at IS NOT NULL",
                &[&id],
            )
            .await
            .unwrap();
    }
}

fn input(req: &BatchRequest) -> holdfast_common::ledger::ReserveInput<'_> {
    let mut i = reserve_input(req, LONG, LONG);
    i.chunk_size = CHUNK;
    i
}

fn settlement(model: &Model, b: usize, i: usize, o: &Outcome) -> Settlement {
    let batch = &model.batches[b];
    Settlement {
        batch_id: batch.request.batch_id.clone(),
        item_id: batch
            .request
            .items
            .get(i)
            .map(|it| it.item_id.clone())
            .unwrap_or_default(),
        outcome: match o {
            Outcome::Cost(a) => ItemOutcome::Succeeded {
                actual_cost: Some(*a),
            },
            Outcome::NoCost => ItemOutcome::Succeeded { actual_cost: None },
            Outcome::Fail => ItemOutcome::Failed {
                reason: "generator failed".into(),
            },
            Outcome::Cancelled => ItemOutcome::Cancelled,
        },
    }
}

fn request(model: &Model, n: usize, mode: Mode, costs: &[i64], soft: Option<&str>) -> BatchRequest {
    BatchRequest {
        batch_id: format!("{}-b{n}", model.account),
        account_id: model.account.clone(),
        items: costs
            .iter()
            .enumerate()
            .map(|(i, c)| ItemRequest {
                item_id: format!("i{i}"),
                estimated_cost: *c,
                priority: 0,
                payload: Value::Null,
            })
            .collect(),
        mode,
        item_ids: None,
        reservation_id: soft.map(str::to_string),
    }
}

/// Split `amount` into 1 to 3 item costs.
fn split(amount: i64, parts: usize) -> Vec<i64> {
    let parts = (parts as i64).clamp(1, amount.min(3));
    let mut v = vec![amount / parts; parts as usize];
    v[0] += amount % parts;
    v
}

// ---------------------------------------------------------------- invariants

/// Every invariant of the design for `account`, in SQL of this test; then the
/// model's balances and states; then the ledger's own audit of the database.
async fn check(real: &Real<'_>, model: &Model) -> Result<(), TestCaseError> {
    let (db, a) = (real.db, real.account);
    let q = |sql: &'static str| async move {
        db.query(sql, &[&a])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    };
    let rows = q("SELECT balance, held FROM accounts WHERE id = $1").await;
    let row = &rows[0];
    let (balance, held): (i64, i64) = (row.get(0), row.get(1));
    prop_assert!(
        held >= 0 && balance - held >= 0,
        "balance {balance}, held {held}"
    );
    prop_assert_eq!(
        (balance, held),
        (model.balance, model.held),
        "balance and held vs the model"
    );

    // Balances equal the journal; held equals the open holds.
    let rows = q(
        "SELECT COALESCE(sum(balance_delta), 0)::int8, COALESCE(sum(held_delta), 0)::int8
                  FROM journal WHERE account_id = $1",
    )
    .await;
    let row = &rows[0];
    prop_assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i64>(1)),
        (balance, held),
        "journal sums"
    );
    let open: i64 = q(
        "SELECT COALESCE(sum(amount), 0)::int8 FROM holds WHERE account_id = $1 AND state = 'open'",
    )
    .await[0]
        .get(0);
    prop_assert_eq!(open, held, "held vs open holds");

    // Per hold: amount = captured + released + open; resolved exactly once.
    let bad = q("SELECT h.id::text, h.state, h.amount, h.captured, h.released,
                        (SELECT count(*) FROM journal j WHERE j.hold_id = h.id AND j.kind IN ('release', 'expire')),
                        (SELECT count(*) FROM journal j WHERE j.hold_id = h.id AND j.kind = 'settle')
                 FROM holds h WHERE h.account_id = $1")
    .await;
    for r in &bad {
        let (id, state, amount, captured, released, resolutions, settles): (
            String,
            String,
            i64,
            i64,
            i64,
            i64,
            i64,
        ) = (
            r.get(0),
            r.get(1),
            r.get(2),
            r.get(3),
            r.get(4),
            r.get(5),
            r.get(6),
        );
        let open_part = if state == "open" {
            amount - captured
        } else {
            0
        };
        prop_assert!(
            amount == captured + released + open_part
                && captured <= amount
                && (state != "open" || released == 0),
            "hold {} {}: amount {} captured {} released {}",
            id,
            state,
            amount,
            captured,
            released
        );
        let once = if state == "open" {
            resolutions == 0 && settles == 0
        } else {
            resolutions == 1 && settles <= 1
        };
        prop_assert!(
            once,
            "hold {} {} resolved {} times ({} settles)",
            id,
            state,
            resolutions,
            settles
        );
    }

    // Per batch: the hold's captures are its items'; a closed batch is settled and its hold resolved.
    let batches = q("SELECT b.id, b.state, h.state, h.captured, h.amount,
                            (SELECT COALESCE(sum(captured), 0)::int8 FROM items i WHERE i.batch_id = b.id),
                            (SELECT count(*) FROM items i WHERE i.batch_id = b.id AND i.state IN ('pending', 'queued'))
                     FROM batches b LEFT JOIN holds h ON h.id = b.hold_id WHERE b.account_id = $1")
    .await;
    for r in &batches {
        let (id, state, hold_state): (String, String, Option<String>) =
            (r.get(0), r.get(1), r.get(2));
        let (hold_captured, items_captured, unsettled): (Option<i64>, i64, i64) =
            (r.get(3), r.get(5), r.get(6));
        if state == "denied" {
            prop_assert!(
                hold_state.is_none() && items_captured == 0,
                "denied batch {} holds something",
                id
            );
            continue;
        }
        prop_assert_eq!(
            hold_captured,
            Some(items_captured),
            "batch {} hold vs items captured",
            id
        );
        if matches!(state.as_str(), "completed" | "expired" | "cancelled") {
            prop_assert!(
                unsettled == 0 && hold_state.as_deref() == Some("closed"),
                "closed batch {} ({}) has {} unsettled items, hold {:?}",
                id,
                state,
                unsettled,
                hold_state
            );
        } else {
            prop_assert_eq!(
                hold_state.as_deref(),
                Some("open"),
                "running batch {} hold",
                id
            );
        }
        // The model's view of the batch and its items.
        let m = &model.batches[model.batch_ix(&id).expect("a batch the model knows")];
        prop_assert_eq!(&state, &m.state, "state of batch {}", id);
        prop_assert_eq!(
            r.get::<_, Option<i64>>(4),
            Some(m.amount),
            "hold amount of batch {}",
            id
        );
        let items = db
            .query(
                "SELECT item_id, state, captured FROM items WHERE batch_id = $1 ORDER BY position",
                &[&id],
            )
            .await
            .unwrap();
        let got: Vec<(String, String, i64)> = items
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        let want: Vec<(String, String, i64)> = m
            .items
            .iter()
            .map(|i| (i.id.clone(), i.state.as_str().to_string(), i.captured))
            .collect();
        prop_assert_eq!(got, want, "items of batch {}", id);
    }
    prop_assert_eq!(batches.len(), model.batches.len(), "batches recorded");

    // Each item captured at most once, and its capture row is its charge.
    let twice: i64 = q("SELECT count(*) FROM (SELECT batch_id, item_id FROM journal
                         WHERE account_id = $1 AND kind = 'capture' GROUP BY 1, 2 HAVING count(*) > 1) t")
    .await[0]
    .get(0);
    prop_assert_eq!(twice, 0, "items captured twice");
    let mismatched: i64 = q("SELECT count(*) FROM items i JOIN batches b ON b.id = i.batch_id
                              LEFT JOIN journal j ON j.batch_id = i.batch_id AND j.item_id = i.item_id AND j.kind = 'capture'
                              WHERE b.account_id = $1
                                AND ((i.state = 'succeeded') <> (j.id IS NOT NULL) OR COALESCE(j.amount, 0) <> i.captured)")
    .await[0]
    .get(0);
    prop_assert_eq!(
        mismatched,
        0,
        "items whose capture row disagrees with the item"
    );

    // Soft holds.
    for s in &model.softs {
        let id: uuid::Uuid = s.id.parse().unwrap();
        let state: String = db
            .query_one("SELECT state FROM holds WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        let want = match s.state {
            SState::Open | SState::Consumed => "open",
            SState::Closed => "closed",
            SState::Expired => "expired",
        };
        prop_assert_eq!(state.as_str(), want, "soft hold {} ({:?})", s.id, s.state);
    }

    // The ledger's own audit, of the whole database: nothing new since the
    // case began (an earlier failing case, while shrinking, leaves its drift).
    let drift: Vec<_> = real
        .ledger
        .audit()
        .await
        .unwrap()
        .into_iter()
        .filter(|d| !real.drift_before.contains(d))
        .collect();
    prop_assert!(drift.is_empty(), "audit: {:?}", drift);
    Ok(())
}

// ---------------------------------------------------------------- running a case

/// Resolve `op` into calls against the model; `None` when it does not apply.
fn resolve(model: &Model, n: usize, op: &Op) -> Option<Vec<Call>> {
    let batch = |b: usize| (!model.batches.is_empty()).then(|| b % model.batches.len());
    let soft = |s: usize| (!model.softs.is_empty()).then(|| s % model.softs.len());
    // Settles aim at running batches and their pending items when there are
    // any (duplicates and late captures still come: races, second settles).
    let running = |b: usize| {
        let open: Vec<usize> = (0..model.batches.len())
            .filter(|&i| model.batches[i].open())
            .collect();
        match open.is_empty() {
            true => batch(b),
            false => Some(open[b % open.len()]),
        }
    };
    let item = |b: usize, i: usize| {
        let items = &model.batches[b].items;
        let pending: Vec<usize> = (0..items.len())
            .filter(|&i| items[i].state == IState::Pending)
            .collect();
        match pending.is_empty() {
            true => i % model.batches[b].request.items.len(),
            false => pending[i % pending.len()],
        }
    };
    Some(match op {
        Op::Grant(a) => vec![Call::Grant(*a)],
        Op::Reserve(kind, costs) => {
            let mode = match kind {
                Kind::AllOrNothing => Mode::AllOrNothing,
                Kind::FirstFit => Mode::FirstFit,
                Kind::Sequential => Mode::Sequential,
            };
            vec![Call::Reserve(request(model, n, mode, costs, None))]
        }
        Op::Replay(b) => vec![Call::Replay(batch(*b)?)],
        Op::Settle(b, i, o) => {
            let b = running(*b)?;
            vec![Call::Settle(vec![(b, item(b, *i), o.clone())])]
        }
        Op::SettleTwiceInOneCall(b, i, o, p) => {
            let b = running(*b)?;
            let i = item(b, *i);
            vec![Call::Settle(vec![(b, i, o.clone()), (b, i, p.clone())])]
        }
        Op::Cancel(b) => vec![Call::Cancel(batch(*b)?)],
        Op::ExpireOverdue => vec![Call::ExpireOverdue { skip: None }],
        Op::CloseFinished => vec![Call::CloseFinished],
        Op::SoftHold(a) => vec![Call::SoftHold(*a)],
        Op::ExpireSoft => vec![Call::ExpireSoft { skip: None }],
        Op::CancelSoft(s) => vec![Call::CancelSoft(soft(*s)?)],
        Op::StartFromSoft(s) | Op::RaceStartExpiry(s) => {
            let s = soft(*s)?;
            let costs = split(model.softs[s].amount, n % 3 + 1);
            let req = request(
                model,
                n,
                Mode::AllOrNothing,
                &costs,
                Some(&model.softs[s].id),
            );
            if matches!(op, Op::RaceStartExpiry(_)) {
                vec![Call::StartFromSoft(s, req), Call::ExpireSoft { skip: None }]
            } else {
                vec![Call::StartFromSoft(s, req)]
            }
        }
        Op::RaceDuplicateCapture(b, i, o, p) => {
            let b = running(*b)?;
            let i = item(b, *i);
            vec![
                Call::Settle(vec![(b, i, o.clone())]),
                Call::Settle(vec![(b, i, p.clone())]),
            ]
        }
        Op::RaceCaptureExpiry(b, i, o) => {
            let b = running(*b)?;
            vec![
                Call::Settle(vec![(b, item(b, *i), o.clone())]),
                Call::ExpireOverdue { skip: None },
            ]
        }
        Op::RaceCaptureCancel(b, i, o) => {
            let b = running(*b)?;
            vec![
                Call::Settle(vec![(b, item(b, *i), o.clone())]),
                Call::Cancel(b),
            ]
        }
        Op::PassDeadline(_) | Op::PassTtl(_) => vec![],
    })
}

/// The sequential orders a race of `a` and `b` may be explained by, as
/// (first, second, whether the first is `a`). The reconciler's sweeps skip
/// rows another transaction has locked (`SKIP LOCKED`), so a sweep racing a
/// settle or a start may also leave that batch or hold for the next sweep.
fn orders(a: &Call, b: &Call) -> Vec<(Call, Call, bool)> {
    let mut out = vec![(a.clone(), b.clone(), true), (b.clone(), a.clone(), false)];
    let skipped = match (a, b) {
        (Call::Settle(items), Call::ExpireOverdue { .. }) => Some(Call::ExpireOverdue {
            skip: Some(items[0].0),
        }),
        (Call::StartFromSoft(s, _), Call::ExpireSoft { .. }) => {
            Some(Call::ExpireSoft { skip: Some(*s) })
        }
        _ => None,
    };
    if let Some(skipped) = skipped {
        out.push((a.clone(), skipped.clone(), true));
        out.push((skipped, a.clone(), false));
    }
    out
}

/// What the cases exercised, so a run shows that it tested something.
#[derive(Default)]
struct Tally(std::collections::BTreeMap<String, usize>);

impl Tally {
    fn add(&mut self, what: impl Into<String>) {
        *self.0.entry(what.into()).or_default() += 1;
    }

    fn obs(&mut self, o: &Obs) {
        match o {
            Obs::Decision { kind, replayed, .. } => self.add(if *replayed {
                format!("replayed {kind}")
            } else {
                kind.clone()
            }),
            Obs::Settled {
                results,
                closed,
                advanced,
            } => {
                for r in results {
                    self.add(match r {
                        Settled::Captured { overrun, .. } if *overrun > 0 => {
                            "captured with overrun"
                        }
                        Settled::Captured { .. } => "captured",
                        Settled::Failed => "failed",
                        Settled::Cancelled => "cancelled job",
                        Settled::AlreadySettled { .. } => "second capture reported the first",
                        Settled::Unknown => "not settleable",
                    });
                }
                for (_, state) in closed {
                    self.add(format!("closed {state} by a settle"));
                }
                for _ in advanced {
                    self.add("next chunk reserved");
                }
            }
            Obs::Closed(c) => {
                for (_, state) in c {
                    self.add(format!("closed {state} by the reconciler"));
                }
            }
            Obs::Expired(n) => {
                (0..*n).for_each(|_| self.add("soft hold expired by the reconciler"))
            }
            Obs::Refused(kind) => self.add(format!("refused: {kind}")),
            Obs::Cancel(state) => self.add(format!("cancel: {state}")),
            _ => {}
        }
    }
}

async fn run_case(
    ledger: &Ledger,
    db: &Client,
    case: usize,
    ops: &[Op],
    tally: &mut Tally,
) -> Result<(), TestCaseError> {
    let account = format!("acct{case:05}");
    ledger.create_account(&account).await.unwrap();
    // Whatever an earlier (failed) case left past its deadline goes now, so
    // that the sweeps' counts below are this case's.
    ledger.expire_overdue(10_000).await.unwrap();
    ledger.expire_soft_holds(10_000).await.unwrap();
    let real = Real {
        ledger,
        db,
        account: &account,
        drift_before: ledger.audit().await.unwrap(),
    };
    let mut model = Model {
        account: account.clone(),
        balance: 0,
        held: 0,
        batches: vec![],
        softs: vec![],
    };
    for (n, op) in ops.iter().enumerate() {
        let Some(calls) = resolve(&model, n, op) else {
            continue;
        };
        // Time, controlled: deadlines and TTLs pass when the test says so.
        let deadline = match (op, calls.first()) {
            (Op::PassDeadline(b), _) if !model.batches.is_empty() => Some(b % model.batches.len()),
            (Op::RaceCaptureExpiry(..), Some(Call::Settle(items))) => Some(items[0].0),
            _ => None,
        };
        if let Some(b) = deadline.filter(|&b| model.batches[b].open()) {
            real.pass_deadline(&model.batches[b].request.batch_id).await;
            model.batches[b].overdue = true;
        }
        let ttl = match (op, calls.first()) {
            (Op::PassTtl(s), _) if !model.softs.is_empty() => Some(s % model.softs.len()),
            (Op::RaceStartExpiry(_), Some(Call::StartFromSoft(s, _))) => Some(*s),
            _ => None,
        };
        if let Some(s) = ttl.filter(|&s| model.softs[s].state == SState::Open) {
            real.pass_ttl(&model.softs[s].id).await;
            model.softs[s].past_ttl = true;
        }
        match calls.as_slice() {
            [] => {}
            [call] => {
                let got = real.apply(&model, call).await;
                let want = model.apply(call);
                prop_assert_eq!(&got, &want, "step {}: {:?}", n, op);
                tally.obs(&got);
                if let (Call::SoftHold(_), Obs::Soft(Ok(()))) = (call, &got) {
                    let id = ledger.open_holds(&account).await.unwrap();
                    let known: BTreeSet<&str> = model.softs.iter().map(|s| s.id.as_str()).collect();
                    let new = id
                        .iter()
                        .find(|r| {
                            r.batch_id.is_none() && !known.contains(r.reservation_id.as_str())
                        })
                        .expect("the new soft hold");
                    model.softs.last_mut().unwrap().id = new.reservation_id.clone();
                }
            }
            [a, b] => {
                let (ga, gb) = tokio::join!(real.apply(&model, a), real.apply(&model, b));
                let explained = orders(a, b).into_iter().find_map(|(x, y, a_first)| {
                    let mut m = model.clone();
                    let first = m.apply(&x);
                    let second = m.apply(&y);
                    let (wa, wb) = if a_first {
                        (first, second)
                    } else {
                        (second, first)
                    };
                    (wa == ga && wb == gb).then_some(m)
                });
                match explained {
                    Some(m) => {
                        model = m;
                        tally.add(format!(
                            "race {}",
                            format!("{op:?}").split('(').next().unwrap_or("")
                        ));
                        tally.obs(&ga);
                        tally.obs(&gb);
                    }
                    None => {
                        return Err(TestCaseError::fail(format!(
                            "step {n}: {op:?}: no sequential order explains {ga:?} and {gb:?}"
                        )))
                    }
                }
            }
            _ => unreachable!(),
        }
        check(&real, &model).await?;
    }
    // Exactly-once charging, whatever happened: what left the account is
    // what the succeeded items were charged.
    let charged: i64 = model
        .batches
        .iter()
        .filter(|b| !b.open())
        .map(MBatch::captured)
        .sum();
    let granted: i64 = db
        .query_one(
            "SELECT COALESCE(sum(amount), 0)::int8 FROM journal WHERE account_id = $1 AND kind = 'grant'",
            &[&account],
        )
        .await
        .unwrap()
        .get(0);
    prop_assert_eq!(model.balance, granted - charged);
    Ok(())
}

#[test]
fn random_interleavings_keep_every_ledger_invariant() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let t = rt.block_on(TestFleet::start_with(
        fast_settings(),
        Roles::default(),
        None,
    ));
    let db = rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&t.conn.database_url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    });

    let mut config = ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        source_file: Some(file!()),
        max_shrink_iters: 256,
        ..ProptestConfig::default()
    };
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = CASES;
    }
    if std::env::var_os("PROPTEST_RNG_SEED").is_none() {
        config.rng_seed = RngSeed::Fixed(SEED);
    }
    let mut runner = TestRunner::new(config);
    let case = std::cell::Cell::new(0usize);
    let steps = std::cell::Cell::new(0usize);
    let tally = std::cell::RefCell::new(Tally::default());
    // Every case starts with a grant, then 5 to 40 random steps.
    let case_ops = (
        (1i64..=200).prop_map(Op::Grant),
        prop::collection::vec(op(), 5..=40),
    )
        .prop_map(|(first, mut rest)| {
            rest.insert(0, first);
            rest
        });
    let result = runner.run(&case_ops, |ops| {
        case.set(case.get() + 1);
        steps.set(steps.get() + ops.len());
        rt.block_on(run_case(
            &t.ledger,
            &db,
            case.get(),
            &ops,
            &mut tally.borrow_mut(),
        ))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    eprintln!(
        "ledger properties: {} cases, {} steps, each checked",
        case.get(),
        steps.get()
    );
    for (what, n) in &tally.borrow().0 {
        eprintln!("  {n:>5}  {what}");
    }
    drop(db);
    rt.block_on(async move { t.stop().await });
}
