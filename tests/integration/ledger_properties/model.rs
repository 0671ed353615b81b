//! The model: what one account should look like, and what each ledger call
//! should answer, computed without the database.

use std::collections::BTreeSet;

use holdfast_common::ledger::{GrantSource, LedgerError, Settled};
use holdfast_common::messages::{BatchRequest, Mode};

/// Items per chunk of a sequential batch.
pub const CHUNK: usize = 2;

/// What a generator reports for one item.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// Succeeded at this actual cost (may exceed the reservation, may be 0).
    Cost(i64),
    /// Succeeded without reporting a cost: charged its reservation.
    NoCost,
    Fail,
    /// Not run because its batch was cancelled.
    Cancelled,
}

#[derive(Clone, Copy, Debug)]
pub enum Kind {
    AllOrNothing,
    FirstFit,
    Sequential,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IState {
    Queued,
    Pending,
    Succeeded,
    Failed,
    Cancelled,
    Skipped,
}

impl IState {
    pub fn as_str(self) -> &'static str {
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
pub struct MItem {
    pub id: String,
    pub cost: i64,
    pub reserved: i64,
    pub state: IState,
    pub captured: i64,
}

#[derive(Clone, Debug)]
pub struct MBatch {
    pub request: BatchRequest,
    /// denied, granted, cancelling, completed, expired, cancelled.
    pub state: String,
    pub amount: i64,
    pub items: Vec<MItem>,
    pub sequential: bool,
    pub overdue: bool,
    /// The soft hold this batch consumed, if any (index into `softs`).
    pub soft: Option<usize>,
    /// The decision as first answered; a replay repeats it.
    pub decision: Obs,
    /// What its hold took from each grant (index into `grants`).
    pub alloc: Vec<(usize, i64)>,
}

impl MBatch {
    pub fn open(&self) -> bool {
        matches!(self.state.as_str(), "granted" | "cancelling")
    }
    pub fn captured(&self) -> i64 {
        self.items.iter().map(|i| i.captured).sum()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SState {
    Open,
    Consumed,
    Closed,
    Expired,
}

#[derive(Clone, Debug)]
pub struct MSoft {
    pub id: String,
    pub amount: i64,
    pub state: SState,
    pub past_ttl: bool,
    pub alloc: Vec<(usize, i64)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GState {
    Active,
    Expired,
    Voided,
}

impl GState {
    pub fn as_str(self) -> &'static str {
        match self {
            GState::Active => "active",
            GState::Expired => "expired",
            GState::Voided => "voided",
        }
    }
}

/// The terms of a grant the test adds.
#[derive(Clone, Debug)]
pub struct GrantTerms {
    pub amount: i64,
    pub source: GrantSource,
    pub priority: i32,
    /// Expires this many hours from now; `None`: never.
    pub hours: Option<u8>,
}

#[derive(Clone, Debug)]
pub struct MGrant {
    /// `g<index>`.
    pub id: String,
    pub priority: i32,
    /// The order of `expires_at`: `None` never; a grant whose expiry the test
    /// moved into the past sorts before every future one, in the order moved.
    pub expiry: Option<i64>,
    pub source_rank: u8,
    /// Creation order (`effective_at`).
    pub seq: usize,
    pub remaining: i64,
    pub held: i64,
    pub state: GState,
    pub past_expiry: bool,
}

impl MGrant {
    fn key(&self) -> (i32, i64, u8, usize) {
        (
            self.priority,
            self.expiry.unwrap_or(i64::MAX),
            self.source_rank,
            self.seq,
        )
    }
    fn spendable(&self) -> i64 {
        if self.state == GState::Active && !self.past_expiry {
            self.remaining - self.held
        } else {
            0
        }
    }
}

/// The expected state of one account.
#[derive(Clone, Debug)]
pub struct Model {
    pub account: String,
    pub grants: Vec<MGrant>,
    /// Expiries the test moved into the past so far.
    pub passes: i64,
    /// Credits expired or voided with their grants.
    pub lost: i64,
    pub batches: Vec<MBatch>,
    pub softs: Vec<MSoft>,
}

/// A concrete call on the ledger, resolved from an [`Op`] against the model.
#[derive(Clone, Debug)]
pub enum Call {
    Grant(GrantTerms),
    /// The reconciler's expiry of grants past their `expires_at`.
    ExpireGrants,
    VoidGrant(usize),
    Reserve(BatchRequest),
    Replay(usize),
    Settle(Vec<(usize, usize, Outcome)>),
    Cancel(usize),
    /// The reconciler's deadline sweep; `skip`: batches it finds locked.
    ExpireOverdue {
        skip: Vec<usize>,
    },
    CloseFinished,
    SoftHold(i64),
    ExpireSoft {
        skip: Option<usize>,
    },
    CancelSoft(usize),
    StartFromSoft(usize, BatchRequest),
}

/// What a call answered, reduced to what the model can predict.
#[derive(Clone, Debug, PartialEq)]
pub enum Obs {
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
    /// A voided grant's state and remaining credits afterwards.
    Voided(String, i64),
}

pub fn error_kind(e: &LedgerError) -> String {
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
    pub fn new(account: String) -> Self {
        Model {
            account,
            grants: vec![],
            passes: 0,
            lost: 0,
            batches: vec![],
            softs: vec![],
        }
    }

    pub fn balance(&self) -> i64 {
        self.grants.iter().map(|g| g.remaining).sum()
    }

    pub fn held(&self) -> i64 {
        self.grants.iter().map(|g| g.held).sum()
    }

    /// What active grants not past their expiry have left, less what holds took.
    pub fn available(&self) -> i64 {
        self.grants.iter().map(MGrant::spendable).sum()
    }

    /// The grants in burn-down order.
    fn order(&self) -> Vec<usize> {
        let mut ix: Vec<usize> = (0..self.grants.len()).collect();
        ix.sort_by_key(|&i| self.grants[i].key());
        ix
    }

    /// Take `amount` (which `available` covers) in burn-down order.
    fn take(&mut self, amount: i64) -> Vec<(usize, i64)> {
        let mut need = amount;
        let mut alloc = vec![];
        for g in self.order() {
            let part = need.min(self.grants[g].spendable());
            if part > 0 {
                self.grants[g].held += part;
                alloc.push((g, part));
                need -= part;
            }
        }
        assert_eq!(need, 0, "the model took more than was available");
        alloc
    }

    /// Resolve a hold that took `alloc` with `captured` spent: captures in
    /// burn-down order, the rest back to active grants or gone with the others.
    fn resolve(&mut self, alloc: &[(usize, i64)], captured: i64) {
        let mut per_grant: std::collections::BTreeMap<usize, i64> = Default::default();
        for (g, a) in alloc {
            *per_grant.entry(*g).or_default() += a;
        }
        let mut left = captured;
        for g in self.order() {
            let Some(&a) = per_grant.get(&g) else {
                continue;
            };
            let c = a.min(left);
            left -= c;
            let grant = &mut self.grants[g];
            grant.remaining -= c;
            grant.held -= a;
            if grant.state != GState::Active {
                grant.remaining -= a - c;
                self.lost += a - c;
            }
        }
        assert_eq!(left, 0, "captured more than the hold");
    }

    /// Move grant `g`'s expiry into the past (the test's clock).
    pub fn pass_expiry(&mut self, g: usize) {
        self.grants[g].expiry = Some(self.passes);
        self.grants[g].past_expiry = true;
        self.passes += 1;
    }

    pub fn batch_ix(&self, id: &str) -> Option<usize> {
        self.batches.iter().position(|b| b.request.batch_id == id)
    }

    /// Predict `call`'s answer and apply its effects.
    pub fn apply(&mut self, call: &Call) -> Obs {
        match call {
            Call::Grant(t) => {
                let seq = self.grants.len();
                self.grants.push(MGrant {
                    id: format!("g{seq}"),
                    priority: t.priority,
                    expiry: t.hours.map(|h| 1_000_000 * i64::from(h) + seq as i64),
                    source_rank: match t.source {
                        GrantSource::Promotion => 0,
                        GrantSource::Plan => 1,
                        GrantSource::Purchase => 2,
                        GrantSource::Manual => 3,
                    },
                    seq,
                    remaining: t.amount,
                    held: 0,
                    state: GState::Active,
                    past_expiry: false,
                });
                Obs::Done
            }
            Call::ExpireGrants => {
                for g in &mut self.grants {
                    if g.state == GState::Active && g.past_expiry {
                        self.lost += g.remaining - g.held;
                        g.remaining = g.held;
                        g.state = GState::Expired;
                    }
                }
                Obs::Done
            }
            Call::VoidGrant(g) => {
                let g = &mut self.grants[*g];
                if g.state == GState::Active {
                    self.lost += g.remaining - g.held;
                    g.remaining = g.held;
                    g.state = GState::Voided;
                }
                Obs::Voided(g.state.as_str().into(), g.remaining)
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
                        self.batches[i].open() && self.batches[i].overdue && !skip.contains(&i)
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
                    let alloc = self.take(*amount);
                    self.softs.push(MSoft {
                        id: String::new(), // the ledger's id, set by the caller
                        amount: *amount,
                        state: SState::Open,
                        past_ttl: false,
                        alloc,
                    });
                    Obs::Soft(Ok(()))
                }
            }
            Call::ExpireSoft { skip } => {
                let mut n = 0;
                for i in 0..self.softs.len() {
                    let s = &self.softs[i];
                    if s.state == SState::Open && s.past_ttl && Some(i) != *skip {
                        self.softs[i].state = SState::Expired;
                        let alloc = self.softs[i].alloc.clone();
                        self.resolve(&alloc, 0);
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
                        let alloc = soft.alloc.clone();
                        self.resolve(&alloc, 0);
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
                            alloc: soft.alloc.clone(),
                        });
                        decision
                    }
                    (SState::Open, true) => {
                        // Started after its TTL: the start expires it and is refused.
                        self.softs[*s].state = SState::Expired;
                        self.resolve(&soft.alloc, 0);
                        Obs::Refused("reservation".into())
                    }
                    _ => Obs::Refused("reservation".into()),
                }
            }
        }
    }

    pub fn reserve(&mut self, req: &BatchRequest) -> Obs {
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
                alloc: vec![],
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
        let alloc = self.take(total);
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
            alloc,
        });
        decision
    }

    pub fn settle(&mut self, calls: &[(usize, usize, Outcome)]) -> Obs {
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
                    state: holdfast_common::ledger::ItemState::parse(s.as_str())
                        .expect("a model state is a ledger state"),
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
                    let more = self.take(cost);
                    let batch = &mut self.batches[b];
                    for &i in &queued {
                        batch.items[i].state = IState::Pending;
                        batch.items[i].reserved = batch.items[i].cost;
                    }
                    batch.amount += cost;
                    batch.state = "granted".into();
                    batch.alloc.extend(more);
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

    pub fn cancel(&mut self, b: usize) -> Obs {
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
    pub fn close(&mut self, b: usize, state: &str) -> (String, String) {
        let captured = self.batches[b].captured();
        let alloc = self.batches[b].alloc.clone();
        self.resolve(&alloc, captured);
        let batch = &mut self.batches[b];
        batch.state = state.into();
        if let Some(s) = batch.soft {
            self.softs[s].state = SState::Closed;
        }
        (self.batches[b].request.batch_id.clone(), state.into())
    }
}
