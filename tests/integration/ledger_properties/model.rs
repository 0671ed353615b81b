//! The model: what one account should look like, and what each ledger call
//! should answer, computed without the database.
//!
//! Time: the model counts in whole seconds from `t0`, the database's clock
//! (truncated to the second) when the case began; "now" is just after 0.
//! Allowance periods are placed so that no period boundary falls within a
//! case's run time (past ones at least a minute ago, future ones at least
//! half an hour ahead), so whether a period has begun is the same for the
//! model and for the database. The test makes periods pass by moving an
//! allowance and everything it issued back in time ([`Model::pass_period`]).

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use holdfast_common::ledger::{AllowanceTerms, GrantSource, LedgerError, Period, Settled};
use holdfast_common::messages::{BatchRequest, Mode};

/// Items per chunk of a sequential batch.
pub const CHUNK: usize = 2;

pub const DAY: i64 = 86_400;

/// Times in burn-down keys are `seconds * SCALE + tie`: the tie orders what
/// the model places in one second (grants added in a case, in the order
/// added; expiries the test moved, in the order moved).
const SCALE: i64 = 10_000;

/// "Now" in half seconds: just after `t0` (no boundary lies between).
const NOW2: i64 = 1;

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
    /// `g<index>`, or `allowance:<id>:<period start>[:rollover]`.
    pub id: String,
    pub priority: i32,
    /// The order of `expires_at` (`seconds * SCALE + tie`): `None` never; a
    /// grant whose expiry the test moved into the past sorts after allowance
    /// grants that ended and before every future one, in the order moved.
    pub expiry: Option<i64>,
    pub source_rank: u8,
    /// The order of `effective_at` (`seconds * SCALE + tie`).
    pub eff: i64,
    pub amount: i64,
    pub remaining: i64,
    pub held: i64,
    pub state: GState,
    pub past_expiry: bool,
    /// The allowance that issued it (index into `allowances`).
    pub allowance: Option<usize>,
    /// Its period's start (a period's own grant, not its rollover grant).
    pub period_start: Option<i64>,
}

impl MGrant {
    fn key(&self) -> (i32, i64, u8, i64, &str) {
        (
            self.priority,
            self.expiry.unwrap_or(i64::MAX),
            self.source_rank,
            self.eff,
            &self.id,
        )
    }

    /// An allowance grant's `expires_at` and `effective_at`, in seconds from `t0`.
    pub fn times(&self) -> (i64, i64) {
        (
            self.expiry.expect("an allowance grant expires") / SCALE,
            self.eff / SCALE,
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

/// One set of an allowance's terms (a row of `allowance_terms`): from the
/// period starting at `from` on, on the grid `grid + k·period`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MTerms {
    pub from: i64,
    pub amount: i64,
    pub period: Period,
    pub grid: i64,
    pub cap: i64,
}

impl MTerms {
    fn terms(&self) -> AllowanceTerms {
        AllowanceTerms {
            amount: self.amount,
            period: self.period,
            rollover_cap: self.cap,
        }
    }
}

/// An allowance as the model has it (times in seconds from `t0`).
#[derive(Clone, Debug)]
pub struct MAllowance {
    /// `a<index>`.
    pub id: String,
    pub anchor: i64,
    pub next: i64,
    pub stops_at: Option<i64>,
    /// By `from`, ascending.
    pub terms: Vec<MTerms>,
    /// The terms it was created with (a replayed create sends them again).
    pub created: AllowanceTerms,
    /// Periods the test made pass.
    pub passes: i64,
}

/// The length of `period` in seconds (the test uses no calendar months).
pub fn seconds(period: Period) -> i64 {
    match period {
        Period::Day => DAY,
        Period::Week => 7 * DAY,
        Period::Month => unreachable!("the property test uses no months"),
    }
}

/// `holdfast_period_after`: the first start of the grid `grid + k·period`
/// (k ≥ 0) strictly after `at2` (half seconds).
pub fn period_after(grid: i64, period: Period, at2: i64) -> i64 {
    if at2 < 2 * grid {
        return grid;
    }
    let len = seconds(period);
    grid + ((at2 - 2 * grid) / (2 * len) + 1) * len
}

impl MAllowance {
    /// The terms in force at `at2` (half seconds): the latest from at or before it.
    fn terms_at(&self, at2: i64) -> Option<usize> {
        self.terms.iter().rposition(|t| 2 * t.from <= at2)
    }

    /// The instant a change or a stop takes the current period at: now, or
    /// just before the next period to issue when that is later.
    fn at2(&self) -> i64 {
        NOW2.max(2 * self.next - 1)
    }

    fn due(&self) -> bool {
        self.next <= 0 && self.stops_at.is_none_or(|s| self.next < s)
    }

    /// The allowance as the ledger shows it.
    pub fn view(&self) -> AView {
        let cur = self.terms_at(NOW2).unwrap_or(0);
        let c = &self.terms[cur];
        AView {
            anchor: self.anchor,
            state: if self.stops_at.is_some() {
                "stopped"
            } else {
                "active"
            }
            .into(),
            stops_at: self.stops_at,
            next: self
                .stops_at
                .is_none_or(|s| self.next < s)
                .then_some(self.next),
            amount: c.amount,
            period: c.period,
            cap: c.cap,
            next_terms: self
                .terms
                .get(cur + 1)
                .map(|n| (n.from, n.amount, n.period, n.cap)),
        }
    }
}

/// What the ledger shows of an allowance (times in seconds from `t0`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AView {
    pub anchor: i64,
    pub state: String,
    pub stops_at: Option<i64>,
    pub next: Option<i64>,
    pub amount: i64,
    pub period: Period,
    pub cap: i64,
    /// effective_from, amount, period, rollover_cap.
    pub next_terms: Option<(i64, i64, Period, i64)>,
}

/// The id of the grant of allowance `id`'s period starting at `start`.
pub fn period_label(t0: DateTime<Utc>, id: &str, start: i64) -> String {
    let at = t0 + chrono::Duration::seconds(start);
    format!("allowance:{id}:{}", at.format("%Y-%m-%dT%H:%M:%SZ"))
}

/// The expected state of one account.
#[derive(Clone, Debug)]
pub struct Model {
    pub account: String,
    /// The database's clock when the case began, in whole seconds: the
    /// origin of the model's time.
    pub t0: DateTime<Utc>,
    pub grants: Vec<MGrant>,
    /// Expiries the test moved into the past so far.
    pub passes: i64,
    /// Credits expired or voided with their grants.
    pub lost: i64,
    /// Credits granted: manual grants and allowance periods (not rollovers).
    pub granted: i64,
    /// Credits moved by rollovers into the next period.
    pub rolled: i64,
    /// Rollovers the cap cut short.
    pub capped: usize,
    /// Rollovers from a period whose grant an open hold had taken from.
    pub rolled_past_holds: usize,
    pub batches: Vec<MBatch>,
    pub softs: Vec<MSoft>,
    pub allowances: Vec<MAllowance>,
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
    /// An allowance `a<index>` with `terms` anchored at this second.
    CreateAllowance(AllowanceTerms, i64),
    /// The same create again: its first terms, no anchor.
    ReplayAllowance(usize),
    /// The reconciler's issuance (`Ledger::issue_allowances`) of up to
    /// `limit` allowances; `only`: those of them it gets to (racing another).
    IssueAllowances {
        limit: Option<usize>,
        only: Option<Vec<usize>>,
    },
    ChangeAllowance(usize, AllowanceTerms),
    StopAllowance(usize),
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
    Allowance(AView, bool),
    /// Credits the issuance issued (rollovers not counted).
    Issued(i64),
}

pub fn error_kind(e: &LedgerError) -> String {
    match e {
        LedgerError::Reservation(_) => "reservation",
        LedgerError::WrongState(_) => "wrong_state",
        LedgerError::NotFound(_) => "not_found",
        LedgerError::Insufficient { .. } => "insufficient",
        LedgerError::Conflict(_) => "conflict",
        LedgerError::AllowanceConflict { .. } => "allowance_conflict",
        LedgerError::UnknownAccount(_) => "unknown_account",
        other => panic!("unexpected ledger error: {other}"),
    }
    .into()
}

impl Model {
    pub fn new(account: String, t0: DateTime<Utc>) -> Self {
        Model {
            account,
            t0,
            grants: vec![],
            passes: 0,
            lost: 0,
            granted: 0,
            rolled: 0,
            capped: 0,
            rolled_past_holds: 0,
            batches: vec![],
            softs: vec![],
            allowances: vec![],
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
        ix.sort_by(|&a, &b| self.grants[a].key().cmp(&self.grants[b].key()));
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

    /// The test's clock for allowance `a`: its current period ends (or its
    /// first begins), by moving the allowance, its terms and its grants back
    /// by the seconds returned, so that the boundary is `60 × passes` s in the
    /// past. A different margin each time keeps the ids of periods issued
    /// before and after a move apart (they are their start, to the second).
    pub fn pass_period(&mut self, a: usize) -> i64 {
        let al = &mut self.allowances[a];
        let mut boundary = al.next;
        while boundary <= 0 {
            let t = &al.terms[al.terms_at(2 * boundary).expect("terms from the anchor")];
            boundary = period_after(t.grid, t.period, 2 * boundary);
        }
        al.passes += 1;
        let d = boundary + 60 * al.passes;
        al.anchor -= d;
        al.next -= d;
        al.stops_at = al.stops_at.map(|s| s - d);
        for t in &mut al.terms {
            t.from -= d;
            t.grid -= d;
        }
        for g in self.grants.iter_mut().filter(|g| g.allowance == Some(a)) {
            g.expiry = g.expiry.map(|e| e - d * SCALE);
            g.eff -= d * SCALE;
            g.period_start = g.period_start.map(|s| s - d);
            g.past_expiry = g.times().0 <= 0;
        }
        d
    }

    /// The allowances with a period to issue, in the order the reconciler
    /// takes them.
    pub fn due(&self) -> Vec<usize> {
        let mut due: Vec<usize> = (0..self.allowances.len())
            .filter(|&a| self.allowances[a].due())
            .collect();
        due.sort_by_key(|&a| (self.allowances[a].next, self.allowances[a].id.clone()));
        due
    }

    /// `holdfast_awaits_rollover`: grant `g` is past its expiry but waits for
    /// the next period of its allowance to take its unused credits.
    fn awaits_rollover(&self, g: &MGrant) -> bool {
        let Some(a) = g.allowance else { return false };
        let (x, _) = g.times();
        let al = &self.allowances[a];
        al.next <= x
            && al.stops_at.is_none_or(|s| x < s)
            && al.terms_at(2 * x).is_some_and(|t| al.terms[t].cap > 0)
    }

    /// `holdfast_issue_allowance`: every period of allowance `a` that has
    /// begun, in order; each its own grant and, when its terms roll over,
    /// what the previous period's grants left unused (never what an open
    /// hold took), up to the cap, as a second grant. The credits issued.
    fn issue(&mut self, a: usize) -> i64 {
        let mut total = 0;
        loop {
            let al = &self.allowances[a];
            let s = al.next;
            if !al.due() {
                break;
            }
            let t = al.terms[al.terms_at(2 * s).expect("terms from the anchor")].clone();
            let e = period_after(t.grid, t.period, 2 * s);
            let label = period_label(self.t0, &al.id, s);
            let mut carry = 0;
            if t.cap > 0 {
                let mut from: Vec<usize> = (0..self.grants.len())
                    .filter(|&g| {
                        let g = &self.grants[g];
                        g.allowance == Some(a)
                            && g.times().0 == s
                            && g.state == GState::Active
                            && g.remaining > g.held
                    })
                    .collect();
                from.sort_by(|&x, &y| {
                    let (x, y) = (&self.grants[x], &self.grants[y]);
                    (x.priority, x.source_rank, x.eff, &x.id).cmp(&(
                        y.priority,
                        y.source_rank,
                        y.eff,
                        &y.id,
                    ))
                });
                let free: i64 = from
                    .iter()
                    .map(|&g| self.grants[g].remaining - self.grants[g].held)
                    .sum();
                for g in from {
                    if carry == t.cap {
                        break;
                    }
                    let g = &mut self.grants[g];
                    let part = (t.cap - carry).min(g.remaining - g.held);
                    g.remaining -= part;
                    carry += part;
                }
                if free > t.cap {
                    self.capped += 1;
                }
                let ended = |g: &MGrant| g.allowance == Some(a) && g.times().0 == s;
                if self.grants.iter().any(|g| ended(g) && g.held > 0) {
                    self.rolled_past_holds += 1;
                }
            }
            let grant = |id: String, amount: i64, period_start: Option<i64>| MGrant {
                id,
                priority: 0,
                expiry: Some(e * SCALE),
                source_rank: 1,
                eff: s * SCALE,
                amount,
                remaining: amount,
                held: 0,
                state: GState::Active,
                past_expiry: e <= 0,
                allowance: Some(a),
                period_start,
            };
            self.grants.push(grant(label.clone(), t.amount, Some(s)));
            if carry > 0 {
                self.grants
                    .push(grant(format!("{label}:rollover"), carry, None));
            }
            self.rolled += carry;
            self.granted += t.amount;
            total += t.amount;
            self.allowances[a].next = e;
        }
        total
    }

    fn allowance_call(&mut self, call: &Call) -> Obs {
        match call {
            Call::CreateAllowance(terms, anchor) => {
                let id = format!("a{}", self.allowances.len());
                self.allowances.push(MAllowance {
                    id,
                    anchor: *anchor,
                    next: *anchor,
                    stops_at: None,
                    terms: vec![MTerms {
                        from: *anchor,
                        amount: terms.amount,
                        period: terms.period,
                        grid: *anchor,
                        cap: terms.rollover_cap,
                    }],
                    created: *terms,
                    passes: 0,
                });
                Obs::Allowance(self.allowances.last().unwrap().view(), false)
            }
            Call::ReplayAllowance(a) => {
                let al = &self.allowances[*a];
                let latest = al.terms.last().expect("terms").terms();
                if latest == al.created {
                    Obs::Allowance(al.view(), true)
                } else {
                    Obs::Refused("allowance_conflict".into())
                }
            }
            Call::IssueAllowances { limit, only } => {
                let mut due = self.due();
                due.truncate(limit.unwrap_or(usize::MAX));
                let mut total = 0;
                for a in due {
                    if only.as_ref().is_none_or(|o| o.contains(&a)) {
                        total += self.issue(a);
                    }
                }
                Obs::Issued(total)
            }
            Call::ChangeAllowance(a, new) => {
                let al = &mut self.allowances[*a];
                if al.stops_at.is_some() {
                    return Obs::Refused("wrong_state".into());
                }
                let at2 = al.at2();
                match al.terms_at(at2) {
                    // Before the first period: it starts on the new terms.
                    None => {
                        for t in &mut al.terms {
                            (t.amount, t.period, t.cap) =
                                (new.amount, new.period, new.rollover_cap);
                        }
                    }
                    Some(c) => {
                        let cur = al.terms[c].clone();
                        al.terms.retain(|t| 2 * t.from <= at2);
                        if cur.terms() != *new {
                            let from = period_after(cur.grid, cur.period, at2);
                            al.terms.push(MTerms {
                                from,
                                amount: new.amount,
                                period: new.period,
                                grid: if new.period == cur.period {
                                    cur.grid
                                } else {
                                    from
                                },
                                cap: new.rollover_cap,
                            });
                        }
                    }
                }
                Obs::Allowance(al.view(), false)
            }
            Call::StopAllowance(a) => {
                let al = &mut self.allowances[*a];
                if al.stops_at.is_none() {
                    let at2 = al.at2();
                    al.stops_at = Some(match al.terms_at(at2) {
                        None => al.anchor,
                        Some(c) => {
                            let cur = al.terms[c].clone();
                            al.terms.retain(|t| 2 * t.from <= at2);
                            period_after(cur.grid, cur.period, at2)
                        }
                    });
                }
                Obs::Allowance(al.view(), false)
            }
            other => unreachable!("not an allowance call: {other:?}"),
        }
    }

    pub fn batch_ix(&self, id: &str) -> Option<usize> {
        self.batches.iter().position(|b| b.request.batch_id == id)
    }

    /// Predict `call`'s answer and apply its effects.
    pub fn apply(&mut self, call: &Call) -> Obs {
        match call {
            Call::Grant(t) => {
                let seq = self.grants.len();
                // Added now, back-dated ten days (see `Real::apply`).
                let tie = seq as i64;
                self.grants.push(MGrant {
                    id: format!("g{seq}"),
                    priority: t.priority,
                    expiry: t.hours.map(|h| 3600 * i64::from(h) * SCALE + tie),
                    source_rank: match t.source {
                        GrantSource::Promotion => 0,
                        GrantSource::Plan => 1,
                        GrantSource::Purchase => 2,
                        GrantSource::Manual => 3,
                    },
                    eff: -10 * DAY * SCALE + tie,
                    amount: t.amount,
                    remaining: t.amount,
                    held: 0,
                    state: GState::Active,
                    past_expiry: false,
                    allowance: None,
                    period_start: None,
                });
                self.granted += t.amount;
                Obs::Done
            }
            Call::ExpireGrants => {
                let due: Vec<usize> = (0..self.grants.len())
                    .filter(|&g| {
                        let g = &self.grants[g];
                        g.state == GState::Active && g.past_expiry && !self.awaits_rollover(g)
                    })
                    .collect();
                for g in due {
                    let g = &mut self.grants[g];
                    self.lost += g.remaining - g.held;
                    g.remaining = g.held;
                    g.state = GState::Expired;
                }
                Obs::Done
            }
            Call::CreateAllowance(..)
            | Call::ReplayAllowance(_)
            | Call::IssueAllowances { .. }
            | Call::ChangeAllowance(..)
            | Call::StopAllowance(_) => self.allowance_call(call),
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
