//! A property test of the ledger against the real PostgreSQL: random
//! interleavings of grants (of every source, priority and expiry; expiries
//! passing, the reconciler expiring them, voids), reserve (all_or_nothing,
//! first_fit, sequential),
//! replayed requests, capture with random actual costs (overruns, zero, no cost
//! reported, failures, cancelled jobs), duplicate captures, cancel, execution
//! deadlines passing and the reconciler's expiry, soft holds (taken, started,
//! cancelled, expired), and allowances (created with periods already due or
//! not yet begun, with and without a rollover cap; issued by the reconciler,
//! alone or racing another issuance, an expiry of grants or a reservation;
//! periods passing; terms changed; stopped; a create replayed) keep every
//! invariant of the design:
//!
//! - `available ≥ 0` and `held ≥ 0`, always;
//! - every grant has what the model's burn-down order leaves it (`remaining`,
//!   `held`, state), never below what holds took of it; what expired or was
//!   voided is counted once;
//! - per hold, `amount = captured + released + open` (open holds released
//!   nothing; a resolved hold accounts for every credit), and it resolves once;
//! - a closed batch has nothing pending and its hold is resolved;
//! - each item is captured at most once, and a second capture reports the first;
//! - each allowance period is issued exactly once (one grant per allowance and
//!   `period_start`), on the terms in force when it began, with what the
//!   previous period left free rolled over up to the cap; allowances, their
//!   terms and their grants are what the model says;
//! - balances equal the journal, and `Ledger::audit` finds nothing.
//!
//! Periods pass the way the test's other clocks do: the database's clock
//! cannot move, so the test moves an allowance (anchor, next period, stop,
//! terms) and every grant it issued back in time until its current period has
//! ended (`Model::pass_period`); allowances are also created with anchors in
//! the past (periods due at once) or ahead (none yet).
//!
//! The invariants are checked after every step with SQL of this file (not the
//! ledger's), and a small model of the account predicts every answer of the
//! ledger and the balances. Some steps run two operations at once where the
//! ledger promises that exactly one wins (duplicate captures, a capture racing
//! the deadline expiry or a cancel, a soft hold started while it expires, two
//! issuances of allowances): the answers, and the state they leave, must be
//! those of one of the sequential orders of the model.
//!
//! One database for the whole test, a fresh account per case. The seed is
//! fixed, so CI runs the same cases every time; `PROPTEST_RNG_SEED` and
//! `PROPTEST_CASES` explore others. A failing case is saved in
//! `tests/integration/ledger_properties/mod.proptest-regressions` (commit it)
//! and replayed first; its seed stands for the same case only while the
//! strategy stays the same, so cases worth keeping are also written out in
//! [`known_cases`], which run first.
//!
//! Modules: [`model`] predicts, [`ledger`] runs the same calls on PostgreSQL,
//! [`invariants`] checks the database after every step.

use crate::support;

mod invariants;
mod ledger;
mod model;

use std::collections::BTreeSet;

use holdfast::fleet::Roles;
use holdfast_common::ledger::{AllowanceTerms, GrantSource, Ledger, Period, Settled};
use holdfast_common::messages::Mode;
use proptest::prelude::*;
use proptest::test_runner::{
    Config as ProptestConfig, FileFailurePersistence, RngSeed, TestCaseError, TestRunner,
};
use support::*;
use tokio_postgres::Client;

use self::invariants::check;
use self::ledger::{request, split, Real};
use self::model::{
    Call, GState, GrantTerms, IState, Kind, MBatch, Model, Obs, Outcome, SState, DAY,
};

/// Cases in CI (each runs up to 40 steps, every step checked).
const CASES: u32 = 40;

/// Allowances per case at most (ids `a0`..: one digit keeps their grants'
/// ids in the order of the allowances).
const ALLOWANCES: usize = 4;

/// Where a new allowance's current period ends (or its first begins), in
/// seconds from now: apart from the 1 and 2 hour expiries of other grants.
const BOUNDARIES: [i64; 3] = [1800, 3 * 3600, 12 * 3600];
const SEED: u64 = 0x484f_4c44;

/// One step. Indices pick a batch, item or soft hold of the case (modulo).
#[derive(Clone, Debug)]
enum Op {
    Grant(i64),
    /// A grant with terms: amount, source, priority, expiry in hours.
    GrantWith(i64, GrantSource, i32, Option<u8>),
    /// The test's clock: this grant's expiry passes.
    PassExpiry(usize),
    ExpireGrants,
    VoidGrant(usize),
    /// A reservation against the reconciler's expiry of grants.
    RaceReserveExpireGrants(Kind, Vec<i64>),
    /// A capture (that may close its batch) against the expiry of grants.
    RaceCaptureExpireGrants(usize, usize, Outcome),
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
    /// A capture against the reconciler's sweep of finished batches.
    RaceCaptureSweep(usize, usize, Outcome),
    /// Two reconcilers' deadline sweeps at once (after this batch's deadline).
    RaceTwoSweeps(usize),
    /// A daily allowance: amount, rollover cap, periods already begun (0: the
    /// first begins later), where the current period ends (`BOUNDARIES`).
    CreateAllowance(i64, i64, u8, usize),
    ReplayAllowance(usize),
    /// The reconciler's issuance of every allowance due.
    IssueAllowances,
    /// Two reconcilers' issuances at once.
    RaceIssueAllowances,
    /// An issuance (of the first allowance due) against the expiry of grants.
    RaceIssueExpireGrants,
    /// An issuance (of the first allowance due) against a reservation.
    RaceIssueReserve(Kind, Vec<i64>),
    /// The test's clock: this allowance's current period ends.
    PassPeriod(usize),
    /// The same, and the reconciler issues the new period on time.
    NextPeriod(usize),
    /// The same, between the two steps of a sweep: the expiry of grants
    /// runs before the issuance (an ended grant waits for its rollover).
    BoundaryMidSweep(usize),
    /// New terms: amount, period, rollover cap.
    ChangeAllowance(usize, i64, Period, i64),
    StopAllowance(usize),
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
    let source = || {
        prop_oneof![
            Just(GrantSource::Plan),
            Just(GrantSource::Purchase),
            Just(GrantSource::Promotion),
            Just(GrantSource::Manual),
        ]
    };
    let kind = || {
        prop_oneof![
            Just(Kind::AllOrNothing),
            Just(Kind::FirstFit),
            Just(Kind::Sequential)
        ]
    };
    prop_oneof![
        3 => (1i64..=120).prop_map(Op::Grant),
        5 => (
            1i64..=80,
            source(),
            prop_oneof![3 => Just(0i32), 1 => Just(1)],
            prop_oneof![2 => Just(None), 1 => Just(Some(1u8)), 1 => Just(Some(2u8))],
        )
            .prop_map(|(a, s, p, h)| Op::GrantWith(a, s, p, h)),
        2 => ix().prop_map(Op::PassExpiry),
        2 => Just(Op::ExpireGrants),
        1 => ix().prop_map(Op::VoidGrant),
        1 => (kind(), prop::collection::vec(1i64..=20, 1..=5))
            .prop_map(|(k, c)| Op::RaceReserveExpireGrants(k, c)),
        1 => (ix(), ix(), outcome()).prop_map(|(b, i, o)| Op::RaceCaptureExpireGrants(b, i, o)),
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
        1 => (ix(), ix(), outcome()).prop_map(|(b, i, o)| Op::RaceCaptureSweep(b, i, o)),
        1 => ix().prop_map(Op::RaceTwoSweeps),
        4 => (1i64..=60, cap(), 0u8..=3, 0..BOUNDARIES.len())
            .prop_map(|(a, c, k, b)| Op::CreateAllowance(a, c, k, b)),
        1 => ix().prop_map(Op::ReplayAllowance),
        5 => Just(Op::IssueAllowances),
        2 => Just(Op::RaceIssueAllowances),
        2 => Just(Op::RaceIssueExpireGrants),
        2 => (kind(), prop::collection::vec(1i64..=20, 1..=5))
            .prop_map(|(k, c)| Op::RaceIssueReserve(k, c)),
        3 => ix().prop_map(Op::PassPeriod),
        3 => ix().prop_map(Op::NextPeriod),
        2 => ix().prop_map(Op::BoundaryMidSweep),
        3 => (
            ix(),
            1i64..=60,
            prop_oneof![3 => Just(Period::Day), 1 => Just(Period::Week)],
            cap(),
        )
            .prop_map(|(a, n, p, c)| Op::ChangeAllowance(a, n, p, c)),
        1 => ix().prop_map(Op::StopAllowance),
    ]
}

/// A rollover cap: none, or a few credits (often less than a period's amount).
fn cap() -> impl Strategy<Value = i64> {
    prop_oneof![2 => Just(0i64), 3 => 1i64..=40]
}

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
    let grant = |g: usize| (!model.grants.is_empty()).then(|| g % model.grants.len());
    let allowance = |a: usize| (!model.allowances.is_empty()).then(|| a % model.allowances.len());
    let issue = |limit| Call::IssueAllowances { limit, only: None };
    let mode = |kind: &Kind| match kind {
        Kind::AllOrNothing => Mode::AllOrNothing,
        Kind::FirstFit => Mode::FirstFit,
        Kind::Sequential => Mode::Sequential,
    };
    Some(match op {
        Op::Grant(a) => vec![Call::Grant(GrantTerms {
            amount: *a,
            source: GrantSource::Manual,
            priority: 0,
            hours: None,
        })],
        Op::GrantWith(a, source, priority, hours) => vec![Call::Grant(GrantTerms {
            amount: *a,
            source: *source,
            priority: *priority,
            hours: *hours,
        })],
        Op::ExpireGrants | Op::BoundaryMidSweep(_) => vec![Call::ExpireGrants],
        Op::VoidGrant(g) => vec![Call::VoidGrant(grant(*g)?)],
        Op::RaceReserveExpireGrants(kind, costs) => vec![
            Call::Reserve(request(model, n, mode(kind), costs, None)),
            Call::ExpireGrants,
        ],
        Op::RaceCaptureExpireGrants(b, i, o) => {
            let b = running(*b)?;
            vec![
                Call::Settle(vec![(b, item(b, *i), o.clone())]),
                Call::ExpireGrants,
            ]
        }
        Op::Reserve(kind, costs) => {
            vec![Call::Reserve(request(model, n, mode(kind), costs, None))]
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
        Op::ExpireOverdue => vec![Call::ExpireOverdue { skip: vec![] }],
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
                Call::ExpireOverdue { skip: vec![] },
            ]
        }
        Op::RaceCaptureCancel(b, i, o) => {
            let b = running(*b)?;
            vec![
                Call::Settle(vec![(b, item(b, *i), o.clone())]),
                Call::Cancel(b),
            ]
        }
        Op::RaceCaptureSweep(b, i, o) => {
            let b = running(*b)?;
            vec![
                Call::Settle(vec![(b, item(b, *i), o.clone())]),
                Call::CloseFinished,
            ]
        }
        Op::RaceTwoSweeps(_) => vec![
            Call::ExpireOverdue { skip: vec![] },
            Call::ExpireOverdue { skip: vec![] },
        ],
        Op::CreateAllowance(amount, cap, begun, at) => {
            if model.allowances.len() >= ALLOWANCES {
                return None;
            }
            let terms = AllowanceTerms {
                amount: *amount,
                period: Period::Day,
                rollover_cap: *cap,
            };
            vec![Call::CreateAllowance(
                terms,
                BOUNDARIES[*at] - i64::from(*begun) * DAY,
            )]
        }
        Op::ReplayAllowance(a) => vec![Call::ReplayAllowance(allowance(*a)?)],
        Op::IssueAllowances | Op::NextPeriod(_) => vec![issue(None)],
        Op::RaceIssueAllowances => vec![issue(None), issue(None)],
        // One allowance: its issuance is one transaction (several would let
        // the other call run between them).
        Op::RaceIssueExpireGrants => vec![issue(Some(1)), Call::ExpireGrants],
        Op::RaceIssueReserve(kind, costs) => vec![
            issue(Some(1)),
            Call::Reserve(request(model, n, mode(kind), costs, None)),
        ],
        Op::ChangeAllowance(a, amount, period, cap) => vec![Call::ChangeAllowance(
            allowance(*a)?,
            AllowanceTerms {
                amount: *amount,
                period: *period,
                rollover_cap: *cap,
            },
        )],
        Op::StopAllowance(a) => vec![Call::StopAllowance(allowance(*a)?)],
        Op::PassDeadline(_) | Op::PassTtl(_) | Op::PassExpiry(_) | Op::PassPeriod(_) => vec![],
    })
}

/// The sequential orders a race of `a` and `b` may be explained by, as
/// (first, second, whether the first is `a`). The reconciler's sweeps skip
/// rows another transaction has locked (`SKIP LOCKED`), so a sweep racing a
/// settle or a start may also leave that batch or hold for the next sweep.
///
/// Two deadline sweeps at once may split the overdue batches between them:
/// the first (in either order) closes what it reported and skips the rest,
/// the second must then close exactly the rest. Two issuances may split the
/// allowances due likewise (each allowance is issued whole by one of them).
fn orders(model: &Model, a: &Call, b: &Call, seen: (&Obs, &Obs)) -> Vec<(Call, Call, bool)> {
    let mut out = vec![(a.clone(), b.clone(), true), (b.clone(), a.clone(), false)];
    if let (Call::IssueAllowances { limit: None, .. }, Call::IssueAllowances { limit: None, .. }) =
        (a, b)
    {
        let due = model.due();
        for set in 0..1usize << due.len() {
            let only: Vec<usize> = (0..due.len())
                .filter(|i| set & (1 << i) != 0)
                .map(|i| due[i])
                .collect();
            let first = Call::IssueAllowances {
                limit: None,
                only: Some(only),
            };
            let rest = Call::IssueAllowances {
                limit: None,
                only: None,
            };
            out.push((first.clone(), rest.clone(), true));
            out.push((first, rest, false));
        }
    }
    if let (Call::ExpireOverdue { .. }, Call::ExpireOverdue { .. }) = (a, b) {
        for (first, a_first) in [(seen.0, true), (seen.1, false)] {
            let Obs::Closed(closed) = first else { continue };
            let skip = (0..model.batches.len())
                .filter(|&i| {
                    !closed
                        .iter()
                        .any(|(id, _)| *id == model.batches[i].request.batch_id)
                })
                .collect();
            let rest = Call::ExpireOverdue { skip: vec![] };
            out.push((Call::ExpireOverdue { skip }, rest, a_first));
        }
    }
    let skipped = match (a, b) {
        (Call::Settle(items), Call::ExpireOverdue { .. }) => Some(Call::ExpireOverdue {
            skip: vec![items[0].0],
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
            Obs::Allowance(a, true) => self.add(format!("allowance replayed ({})", a.state)),
            Obs::Issued(n) if *n > 0 => self.add("issuance that issued"),
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
    // Whatever an earlier (failed) case left past its deadline or due goes
    // now, so that the sweeps' counts below are this case's.
    ledger.expire_overdue(10_000).await.unwrap();
    ledger.expire_soft_holds(10_000).await.unwrap();
    ledger.issue_allowances(10_000).await.unwrap();
    // What the database would not issue (only ever after a failure) stops
    // there, so that the issuances of this case issue this case's periods.
    db.execute(
        "UPDATE allowances SET state = 'stopped', stops_at = next_period_start
         WHERE next_period_start <= now() AND (stops_at IS NULL OR next_period_start < stops_at)",
        &[],
    )
    .await
    .unwrap();
    let t0 = db
        .query_one("SELECT date_trunc('second', now())", &[])
        .await
        .unwrap()
        .get(0);
    let real = Real {
        ledger,
        db,
        account: &account,
        t0,
        drift_before: ledger.audit().await.unwrap(),
    };
    let mut model = Model::new(account.clone(), t0);
    for (n, op) in ops.iter().enumerate() {
        let Some(calls) = resolve(&model, n, op) else {
            continue;
        };
        // Time, controlled: deadlines and TTLs pass when the test says so.
        let deadline = match (op, calls.first()) {
            (Op::PassDeadline(b) | Op::RaceTwoSweeps(b), _) if !model.batches.is_empty() => {
                Some(b % model.batches.len())
            }
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
        // Grants of allowances expire with their periods (below), not alone.
        let own: Vec<usize> = (0..model.grants.len())
            .filter(|&g| model.grants[g].allowance.is_none())
            .collect();
        let expiry = match op {
            Op::PassExpiry(g) if !own.is_empty() => Some(own[g % own.len()]),
            // A race with the expiry of grants: the first grant in use expires.
            Op::RaceReserveExpireGrants(..) | Op::RaceCaptureExpireGrants(..) => own
                .iter()
                .copied()
                .find(|&g| model.grants[g].held > 0 || model.grants[g].remaining > 0),
            _ => None,
        };
        if let Some(g) = expiry.filter(|&g| {
            let g = &model.grants[g];
            g.state == GState::Active && !g.past_expiry
        }) {
            real.pass_expiry(&model.grants[g].id).await;
            model.pass_expiry(g);
        }
        if let (Op::PassPeriod(a) | Op::NextPeriod(a) | Op::BoundaryMidSweep(a), false) =
            (op, model.allowances.is_empty())
        {
            // Half the time, a period ends under a running hold if one took
            // from a current allowance grant (a reset during a running batch).
            let held: BTreeSet<usize> = model
                .grants
                .iter()
                .filter(|g| g.held > 0 && !g.past_expiry)
                .filter_map(|g| g.allowance)
                .collect();
            let held: Vec<usize> = held.into_iter().collect();
            let a = match (a % 2, held.is_empty()) {
                (0, false) => held[a / 2 % held.len()],
                _ => a % model.allowances.len(),
            };
            let secs = model.pass_period(a);
            real.pass_period(&model.allowances[a].id, secs).await;
            tally.add(if held.contains(&a) {
                "period passed under a running hold"
            } else {
                "period passed"
            });
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
                let explained: Vec<Model> = orders(&model, a, b, (&ga, &gb))
                    .into_iter()
                    .filter_map(|(x, y, a_first)| {
                        let mut m = model.clone();
                        let first = m.apply(&x);
                        let second = m.apply(&y);
                        let (wa, wb) = if a_first {
                            (first, second)
                        } else {
                            (second, first)
                        };
                        (wa == ga && wb == gb).then_some(m)
                    })
                    .collect();
                // Orders that answer alike may still leave different states
                // (an issuance and an expiry of grants, either first, both
                // answer the same): the database's state says which ran first.
                let mut chosen = None;
                let mut refuted = None;
                let several = explained.len() > 1;
                for m in explained {
                    if !several {
                        chosen = Some(m);
                        break;
                    }
                    match check(&real, &m).await {
                        Ok(()) => {
                            chosen = Some(m);
                            break;
                        }
                        Err(e) => {
                            refuted.get_or_insert(e);
                        }
                    }
                }
                match (chosen, refuted) {
                    (Some(m), _) => {
                        model = m;
                        tally.add(format!(
                            "race {}",
                            format!("{op:?}").split('(').next().unwrap_or("")
                        ));
                        tally.obs(&ga);
                        tally.obs(&gb);
                    }
                    (None, Some(e)) => {
                        return Err(TestCaseError::fail(format!(
                            "step {n}: {op:?}: answered {ga:?} and {gb:?}, but no sequential order leaves this state: {e}"
                        )))
                    }
                    (None, None) => {
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
    for g in &model.grants {
        tally.add(format!("grant ended {}", g.state.as_str()));
        match (g.allowance, g.period_start) {
            (Some(_), Some(_)) => tally.add("allowance period issued"),
            (Some(_), None) => tally.add("rollover grant issued"),
            _ => {}
        }
    }
    for a in &model.allowances {
        tally.add(format!(
            "allowance ended {}{}",
            a.view().state,
            if a.terms.len() > 1 {
                " with changed terms"
            } else {
                ""
            }
        ));
    }
    (0..model.capped).for_each(|_| tally.add("rollover cut at its cap"));
    (0..model.rolled_past_holds).for_each(|_| tally.add("rollover of a period a hold took from"));
    if model
        .grants
        .iter()
        .any(|g| g.allowance.is_some() && g.held > 0 && g.past_expiry)
    {
        tally.add("case with a hold on an ended period");
    }
    for b in &model.batches {
        let grants: BTreeSet<usize> = b.alloc.iter().map(|(g, _)| *g).collect();
        if grants.len() > 1 {
            tally.add("hold spanning grants");
        }
    }
    if model.lost > 0 {
        tally.add("case with credits expired or voided");
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
    let lost: i64 = db
        .query_one(
            "SELECT COALESCE(sum(amount), 0)::int8 FROM journal
             WHERE account_id = $1 AND kind IN ('grant_expire', 'void')",
            &[&account],
        )
        .await
        .unwrap()
        .get(0);
    prop_assert_eq!(lost, model.lost, "credits expired or voided");
    prop_assert_eq!(model.balance(), granted - charged - lost);
    Ok(())
}

/// Cases found before, written out: they run first, whatever the strategy.
fn known_cases() -> Vec<Vec<Op>> {
    use Op::*;
    vec![
        // A capture closing its batch while the reconciler sweeps finished ones.
        vec![
            Grant(3),
            Grant(17),
            Reserve(Kind::AllOrNothing, vec![4]),
            Grant(1),
            Grant(1),
            RaceCaptureSweep(0, 0, Outcome::Cost(4)),
        ],
        // A reservation priced before a grant expired, taken after.
        vec![
            Grant(1),
            Grant(1),
            GrantWith(11, GrantSource::Promotion, 0, None),
            SoftHold(1),
            Grant(1),
            RaceReserveExpireGrants(Kind::AllOrNothing, vec![2]),
        ],
        // An issuance and an expiry of grants answer alike in either order;
        // only the state says which ran first.
        vec![
            Grant(1),
            CreateAllowance(1, 0, 2, 0),
            RaceIssueExpireGrants,
            Grant(1),
            Grant(1),
            RaceCaptureExpireGrants(0, 2, Outcome::Cost(41)),
        ],
        // A period ends under a running batch: what its hold took stays with
        // it, the rest rolls over up to the cap; new terms from the next
        // period, then a stop after it.
        vec![
            Grant(50),
            CreateAllowance(40, 15, 1, 1),
            IssueAllowances,
            Reserve(Kind::AllOrNothing, vec![10, 10]),
            Settle(0, 0, Outcome::Cost(10)),
            ChangeAllowance(0, 25, Period::Week, 30),
            PassPeriod(0),
            ExpireGrants,
            RaceIssueAllowances,
            ExpireGrants,
            Settle(0, 1, Outcome::Cost(4)),
            StopAllowance(0),
            PassPeriod(0),
            IssueAllowances,
            ExpireGrants,
            ReplayAllowance(0),
        ],
    ]
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
    for ops in known_cases() {
        case.set(case.get() + 1);
        steps.set(steps.get() + ops.len());
        let r = rt.block_on(run_case(
            &t.ledger,
            &db,
            case.get(),
            &ops,
            &mut tally.borrow_mut(),
        ));
        if let Err(e) = r {
            panic!("known case {ops:?}: {e}");
        }
    }
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
