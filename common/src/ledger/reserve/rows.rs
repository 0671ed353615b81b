//! The rows a reservation writes: the new batches, their holds and items,
//! and the accounts' `held`, each kind in one statement for a whole group.

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use uuid::Uuid;

use super::super::grants;
use super::super::{BatchState, Cached, ItemState, Result, SpenderLevel};
use crate::breakdown::{self, Pot};
use crate::messages::{Decision, Draw, Granted, Insufficient, LeftOut, LevelKind, Mode};
use crate::pricing::{self, thousands, Plan};

use super::{rfc3339, ReserveInput};

/// A batch about to be inserted: its decision and, when granted, its hold.
pub(super) struct NewBatch<'a> {
    pub(super) input: &'a ReserveInput<'a>,
    pub(super) fingerprint: &'a [u8],
    pub(super) decision: Decision,
    pub(super) grant: Option<NewGrant>,
}

/// The hold of a granted batch.
pub(super) struct NewGrant {
    pub(super) hold_id: Uuid,
    pub(super) total: i64,
    /// Items that run now (sequential: the first chunk).
    pub(super) run: Vec<usize>,
    /// A hold taken earlier (a soft hold this batch consumes): nothing to insert.
    pub(super) existing_hold: bool,
    pub(super) chunk_size: Option<i32>,
    pub(super) deadline: DateTime<Utc>,
    pub(super) lease: DateTime<Utc>,
    /// The grants the hold takes `total` from, in burn-down order.
    pub(super) draws: Vec<Draw>,
}

impl NewGrant {
    pub(super) fn new(
        input: &ReserveInput<'_>,
        hold_id: Uuid,
        total: i64,
        run: Vec<usize>,
    ) -> Self {
        let now = Utc::now();
        Self {
            hold_id,
            total,
            run,
            existing_hold: false,
            chunk_size: None,
            deadline: now
                + chrono::Duration::from_std(input.execution_timeout)
                    .unwrap_or(chrono::Duration::days(1)),
            lease: now
                + chrono::Duration::from_std(input.dispatch_grace)
                    .unwrap_or(chrono::Duration::seconds(30)),
            draws: vec![],
        }
    }
}

impl<'a> NewBatch<'a> {
    /// Price `input` against the account's spendable grants (`pots`, in
    /// burn-down order) and the levels of its spender path (`path`, root
    /// first; none without a spender), against the tightest of them: a
    /// grant, which takes its draw from `pots` and counts at every level of
    /// `path`, or a denial naming the level that binds.
    pub(super) fn price(
        input: &'a ReserveInput<'a>,
        fingerprint: &'a [u8],
        pots: &mut [Pot],
        path: Option<&mut Vec<SpenderLevel>>,
    ) -> Self {
        let req = input.request;
        let chunk_size = (req.mode == Mode::Sequential).then_some(input.chunk_size.max(1));
        let spenders: Vec<_> = path
            .as_deref()
            .map(|p| p.iter().map(SpenderLevel::level).collect())
            .unwrap_or_default();
        let levels = pricing::levels(breakdown::available(pots), &spenders);
        let (bind, available) = pricing::tightest(&levels);
        match pricing::plan_chunked(req, available, input.chunk_size) {
            Plan::Short(mut s) => {
                if levels[bind].level == LevelKind::Spender {
                    pricing::limited_by_spender(&mut s, &levels[bind], Utc::now());
                }
                let first_fit_draw = breakdown::would_draw(pots, s.first_fit.cost);
                NewBatch {
                    input,
                    fingerprint,
                    decision: Decision::Insufficient(Insufficient {
                        batch_id: req.batch_id.clone(),
                        account_id: req.account_id.clone(),
                        mode: req.mode,
                        total_cost: s.total_cost,
                        available: s.available,
                        shortfall: s.shortfall,
                        items_total: s.items_total,
                        fit_count: s.first_fit.count,
                        first_fit: s.first_fit,
                        priority_fit: s.priority_fit,
                        breakdown: first_fit_draw,
                        message: s.message,
                        detail: s.detail,
                        options: s.options,
                        limited_by: Some(levels[bind].clone()),
                    }),
                    grant: None,
                }
            }
            Plan::Run {
                run,
                left_out,
                total,
            } => {
                let mut grant = NewGrant::new(input, Uuid::new_v4(), total, run);
                grant.chunk_size = chunk_size.map(|c| c as i32);
                grant.draws = breakdown::draw(pots, total);
                // The next request of the group charged to these spenders
                // is priced on what this one leaves them.
                for level in path.into_iter().flatten() {
                    level.held += total;
                }
                let item_ids = match chunk_size {
                    // Sequential: every item is meant to run, chunk by chunk.
                    Some(_) => req.items.iter().map(|i| i.item_id.clone()).collect(),
                    None => grant
                        .run
                        .iter()
                        .map(|&i| req.items[i].item_id.clone())
                        .collect(),
                };
                Self::granted(input, fingerprint, grant, item_ids, left_out)
            }
        }
    }

    pub(super) fn granted(
        input: &'a ReserveInput<'a>,
        fingerprint: &'a [u8],
        grant: NewGrant,
        item_ids: Vec<String>,
        left_out: Vec<LeftOut>,
    ) -> Self {
        let req = input.request;
        let now = Utc::now();
        let said = breakdown::describe(&grant.draws, now);
        let message = if said.is_empty() {
            format!("{} credits held.", thousands(grant.total))
        } else {
            format!("{} credits held: {said}.", thousands(grant.total))
        };
        let decision = Decision::Granted(Granted {
            batch_id: req.batch_id.clone(),
            account_id: req.account_id.clone(),
            mode: req.mode,
            hold_id: grant.hold_id.to_string(),
            reserved: grant.total,
            items_total: req.items.len(),
            item_ids,
            left_out,
            deadline_at: rfc3339(grant.deadline),
            chunk_size: grant.chunk_size.map(|c| c as usize),
            expiry_notice: breakdown::expiry_notice(&grant.draws, grant.deadline, now),
            breakdown: grant.draws.clone(),
            message,
        });
        NewBatch {
            input,
            fingerprint,
            decision,
            grant: Some(grant),
        }
    }
}

/// Take each new hold from its account's grants in burn-down order (see
/// `holdfast_take` in the migrations), one call per account in id order:
/// the allocation and `hold` journal rows per grant touched, then `held`.
/// The database refuses it (check violation) if the credits are gone.
pub(super) async fn take_from_grants(tx: &Transaction<'_>, batches: &[NewBatch<'_>]) -> Result<()> {
    let mut per_account: std::collections::BTreeMap<&str, Takes> = Default::default();
    for b in batches {
        if let Some(g) = b.grant.as_ref().filter(|g| !g.existing_hold) {
            let e = per_account
                .entry(b.input.request.account_id.as_str())
                .or_default();
            e.holds.push(g.hold_id);
            e.spenders.push(b.input.request.spender_id.as_deref());
            e.batch_ids.push(Some(b.input.request.batch_id.as_str()));
            e.amounts.push(g.total);
            let index = e.holds.len() as i32;
            for d in &g.draws {
                e.plan.holds.push(index);
                e.plan.grants.push(d.grant_id.as_str());
                e.plan.amounts.push(d.amount);
            }
        }
    }
    if per_account.len() > 1 {
        // Several accounts: lock them in id order first, so that two groups
        // sharing accounts queue instead of deadlocking.
        let ids: Vec<&str> = per_account.keys().copied().collect();
        tx.execute_cached(
            "SELECT 1 FROM accounts WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE",
            &[&ids],
        )
        .await?;
    }
    for (account, t) in &per_account {
        grants::take_planned(tx, account, &t.holds, &t.batch_ids, &t.amounts, &t.plan).await?;
    }
    // Then, with every account locked, the holds charged to spenders, all
    // accounts in one statement: account → spenders root to leaf.
    let mut charged = Charged::default();
    for (account, t) in &per_account {
        for ((hold, amount), spender) in t.holds.iter().zip(&t.amounts).zip(&t.spenders) {
            if let Some(s) = spender {
                charged.accounts.push(account);
                charged.holds.push(*hold);
                charged.spenders.push(s);
                charged.amounts.push(*amount);
            }
        }
    }
    if !charged.holds.is_empty() {
        tx.execute_cached(
            "SELECT holdfast_spender_take($1, $2, $3, $4)",
            &[
                &charged.accounts,
                &charged.holds,
                &charged.spenders,
                &charged.amounts,
            ],
        )
        .await?;
    }
    Ok(())
}

/// The holds of a group charged to spenders, for `holdfast_spender_take`.
#[derive(Default)]
struct Charged<'b> {
    accounts: Vec<&'b str>,
    holds: Vec<Uuid>,
    spenders: Vec<&'b str>,
    amounts: Vec<i64>,
}

/// The holds one account takes in a group, and the draws they were priced on.
#[derive(Default)]
struct Takes<'b> {
    holds: Vec<Uuid>,
    batch_ids: Vec<Option<&'b str>>,
    amounts: Vec<i64>,
    plan: grants::Plan<'b>,
    /// The spender each hold is charged to, if any.
    spenders: Vec<Option<&'b str>>,
}

/// The new holds of granted batches (their journal rows come with the grants
/// they take, in [`take_from_grants`]).
pub(super) async fn insert_holds(tx: &Transaction<'_>, batches: &[NewBatch<'_>]) -> Result<()> {
    let grants: Vec<(&NewBatch, &NewGrant)> = batches
        .iter()
        .filter_map(|b| Some((b, b.grant.as_ref()?)))
        .filter(|(_, g)| !g.existing_hold)
        .collect();
    if grants.is_empty() {
        return Ok(());
    }
    let accounts: Vec<&str> = grants
        .iter()
        .map(|(b, _)| b.input.request.account_id.as_str())
        .collect();
    let holds: Vec<Uuid> = grants.iter().map(|(_, g)| g.hold_id).collect();
    let totals: Vec<i64> = grants.iter().map(|(_, g)| g.total).collect();
    tx.execute_cached(
        "INSERT INTO holds (id, account_id, amount)
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::int8[])",
        &[&holds, &accounts, &totals],
    )
    .await?;
    Ok(())
}

/// The batch rows, granted and denied, in one statement.
pub(super) async fn insert_batches(tx: &Transaction<'_>, batches: &[NewBatch<'_>]) -> Result<()> {
    if batches.is_empty() {
        return Ok(());
    }
    let n = batches.len();
    let (mut ids, mut accounts, mut hashes, mut modes, mut states, mut decisions) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut holds, mut item_counts, mut run_counts, mut replies, mut correlations) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut deadlines, mut leases, mut chunks) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for b in batches {
        let req = b.input.request;
        ids.push(req.batch_id.as_str());
        accounts.push(req.account_id.as_str());
        hashes.push(b.fingerprint);
        modes.push(req.mode.as_str());
        states.push(if b.grant.is_some() {
            BatchState::Granted
        } else {
            BatchState::Denied
        });
        decisions.push(serde_json::to_value(&b.decision).expect("decisions serialise"));
        item_counts.push(req.items.len() as i32);
        replies.push(b.input.reply_to.as_deref());
        correlations.push(b.input.correlation_id.as_deref());
        let g = b.grant.as_ref();
        holds.push(g.map(|g| g.hold_id));
        run_counts.push(g.map_or(0, |g| g.run.len() as i32));
        deadlines.push(g.map(|g| g.deadline));
        leases.push(g.map(|g| g.lease));
        chunks.push(g.and_then(|g| g.chunk_size));
    }
    tx.execute_cached(
        "INSERT INTO batches (id, account_id, request_hash, mode, state, decision, hold_id,
                              item_count, run_count, reply_to, correlation_id,
                              deadline_at, dispatch_lease, chunk_size, closed_at)
         SELECT t.*, CASE WHEN t.state = 'denied' THEN now() END
         FROM unnest($1::text[], $2::text[], $3::bytea[], $4::text[], $5::text[], $6::jsonb[],
                     $7::uuid[], $8::int4[], $9::int4[], $10::text[], $11::text[],
                     $12::timestamptz[], $13::timestamptz[], $14::int4[])
              AS t(id, account_id, request_hash, mode, state, decision, hold_id, item_count,
                   run_count, reply_to, correlation_id, deadline_at, dispatch_lease, chunk_size)",
        &[
            &ids,
            &accounts,
            &hashes,
            &modes,
            &states,
            &decisions,
            &holds,
            &item_counts,
            &run_counts,
            &replies,
            &correlations,
            &deadlines,
            &leases,
            &chunks,
        ],
    )
    .await?;
    Ok(())
}

/// Every item of the granted batches, in one statement: run items are
/// `pending` with their reservation; in sequential mode the later chunks are
/// `queued`; the others are `skipped` with the reason.
pub(super) async fn insert_items(tx: &Transaction<'_>, batches: &[NewBatch<'_>]) -> Result<()> {
    let n: usize = batches
        .iter()
        .filter(|b| b.grant.is_some())
        .map(|b| b.input.request.items.len())
        .sum();
    if n == 0 {
        return Ok(());
    }
    let mut batch_ids = Vec::with_capacity(n);
    let mut ids = Vec::with_capacity(n);
    let mut positions = Vec::with_capacity(n);
    let mut costs = Vec::with_capacity(n);
    let mut priorities = Vec::with_capacity(n);
    let mut reserved = Vec::with_capacity(n);
    let mut states = Vec::with_capacity(n);
    let mut reasons: Vec<Option<&str>> = Vec::with_capacity(n);
    let mut payloads = Vec::with_capacity(n);
    for b in batches {
        let (Some(grant), req) = (&b.grant, b.input.request) else {
            continue;
        };
        let sequential = req.mode == Mode::Sequential;
        let skip_reason = if req.mode == Mode::Selected {
            "not_selected"
        } else {
            "did_not_fit"
        };
        for (i, item) in req.items.iter().enumerate() {
            let runs = grant.run.binary_search(&i).is_ok();
            batch_ids.push(req.batch_id.as_str());
            ids.push(item.item_id.as_str());
            positions.push(i as i32);
            costs.push(item.estimated_cost);
            priorities.push(item.priority);
            reserved.push(if runs { item.estimated_cost } else { 0 });
            states.push(match (runs, sequential) {
                (true, _) => ItemState::Pending,
                (false, true) => ItemState::Queued,
                (false, false) => ItemState::Skipped,
            });
            reasons.push(if runs || sequential {
                None
            } else {
                Some(skip_reason)
            });
            payloads.push(&item.payload);
        }
    }
    tx.execute_cached(
        "INSERT INTO items (batch_id, item_id, position, estimated_cost, priority, reserved, state, reason, payload)
         SELECT * FROM unnest($1::text[], $2::text[], $3::int4[], $4::int8[], $5::int4[], $6::int8[],
                              $7::text[], $8::text[], $9::jsonb[])",
        &[&batch_ids, &ids, &positions, &costs, &priorities, &reserved, &states, &reasons, &payloads],
    )
    .await?;
    Ok(())
}

/// The `decision.<kind>` event of each new batch, to the outbox in the
/// reservation's transaction: a decision that commits is announced, one
/// that rolls back never is. A replayed decision writes nothing (its event
/// was written when it was first decided).
pub(super) async fn write_decisions(tx: &Transaction<'_>, batches: &[NewBatch<'_>]) -> Result<()> {
    let events: Vec<_> = batches
        .iter()
        .filter_map(|b| crate::outbox::decision(&b.decision))
        .collect();
    crate::outbox::write(tx, &events).await?;
    Ok(())
}
