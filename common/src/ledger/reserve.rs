//! Reserve: price a batch under the account's row lock and take one hold for
//! everything that runs, or record the denial. Idempotent on the batch id.
//!
//! Three ways to a grant: the usual one (one hold for everything that runs),
//! `sequential` (a hold for the first chunk; later chunks are added as the
//! batch goes, see `settle`), and consuming a soft hold taken earlier
//! (`reservation_id`: no second credit check).

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use deadpool_postgres::Transaction;
use serde_json::Value;
use tokio_postgres::error::SqlState;
use uuid::Uuid;

use super::{BatchState, Cached, HoldState, ItemState, Ledger, LedgerError, Result};
use crate::messages::{BatchRequest, Decision, Granted, Insufficient, LeftOut, Mode};
use crate::pricing::{self, Plan};

/// A validated request and what goes with it.
pub struct ReserveInput<'a> {
    pub request: &'a BatchRequest,
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
    /// How long a granted batch may run before the reconciler closes it.
    pub execution_timeout: Duration,
    /// How long the coordinator may take to dispatch before a reconciler does it.
    pub dispatch_grace: Duration,
    /// Sequential mode: items reserved per chunk.
    pub chunk_size: usize,
}

/// The decision, and whether the jobs still have to be published.
#[derive(Clone, Debug)]
pub struct Reserved {
    pub decision: Decision,
    /// The batch id was decided before with the same body: this is that decision.
    pub replayed: bool,
    /// Granted and not yet confirmed dispatched: publish the pending jobs.
    pub needs_dispatch: bool,
    /// A fresh grant: the positions in the request of the items to publish
    /// now (sequential: the first chunk). Empty for a replay, whose pending
    /// jobs are read back from the ledger.
    pub dispatch_now: Vec<usize>,
}

pub(super) fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

impl Ledger {
    /// Decide `input.request`: one hold for the whole cost of what runs, or a
    /// denial that holds nothing. A batch id seen before replays its decision
    /// (same body) or fails with [`LedgerError::Conflict`] (different body).
    pub async fn reserve(&self, input: &ReserveInput<'_>) -> Result<Reserved> {
        if input.request.reservation_id.is_some() {
            return self.reserve_from_soft_hold(input).await;
        }
        self.reserve_many(std::slice::from_ref(input))
            .await
            .pop()
            .expect("one result per input")
    }

    /// Decide many requests in one transaction, with a handful of set-based
    /// statements whatever their number: each request is priced in order
    /// against what the ones before it left available, the holds, batches and
    /// items are inserted together, and each account's `held` is raised once,
    /// last (`decide_group` says why the lock comes last). One result per
    /// input, in order.
    ///
    /// A request that starts from a soft hold is decided on its own. When the
    /// group transaction fails for a reason that is not transient (a refused
    /// row), every request is decided on its own, so that one bad request
    /// cannot hold up the others.
    pub async fn reserve_many(&self, inputs: &[ReserveInput<'_>]) -> Vec<Result<Reserved>> {
        let mut results: Vec<Option<Result<Reserved>>> = (0..inputs.len()).map(|_| None).collect();
        let mut group = Vec::with_capacity(inputs.len());
        for (i, input) in inputs.iter().enumerate() {
            if input.request.reservation_id.is_some() {
                results[i] = Some(self.reserve_from_soft_hold(input).await);
            } else {
                group.push((i, input, input.request.fingerprint()));
            }
        }
        if !group.is_empty() {
            let started = std::time::Instant::now();
            let decided = match self.decide_group(&group).await {
                Err(e) if group.len() > 1 && !e.is_transient() => {
                    tracing::warn!(error = %e, requests = group.len(),
                        "group decision refused; deciding each request on its own");
                    let mut each = Vec::with_capacity(group.len());
                    for g in &group {
                        each.push(match self.decide_group(std::slice::from_ref(g)).await {
                            Ok(mut r) => r.pop().expect("one result per input"),
                            Err(e) => Err(e),
                        });
                    }
                    Ok(each)
                }
                other => other,
            };
            match decided {
                Ok(decided) => {
                    let elapsed = started.elapsed();
                    for ((i, ..), result) in group.iter().zip(decided) {
                        if let Ok(r) = &result {
                            if !r.replayed {
                                crate::telemetry::record::decided(&r.decision, elapsed);
                            }
                        }
                        results[*i] = Some(result);
                    }
                }
                Err(e) => {
                    // Every request of the group shares the failure. For a group
                    // of several it is transient: anything else was decided
                    // request by request above.
                    let message = e.to_string();
                    let mut e = Some(e);
                    for (i, ..) in &group {
                        results[*i] = Some(Err(e
                            .take()
                            .unwrap_or_else(|| LedgerError::Unavailable(message.clone()))));
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.expect("every input decided"))
            .collect()
    }

    /// Decide `group` in one transaction, retrying transient failures.
    ///
    /// First with the account rows read, not locked: every row is written
    /// and the accounts' `held` raised in the last statement before the
    /// commit, so a hot account is locked for one statement and one commit
    /// flush, whatever the size of the group. If another transaction spent
    /// the same credits meanwhile, the database's `available >= 0` check
    /// refuses that last statement; the group is then decided again with the
    /// accounts locked first. Either way no decision rests on credits that
    /// were not there when it committed.
    async fn decide_group(
        &self,
        group: &[(usize, &ReserveInput<'_>, Vec<u8>)],
    ) -> Result<Vec<Result<Reserved>>> {
        self.retrying("reserve", || async {
            let decided = match self.reserve_group_once(group, AccountLock::AtTheEnd).await {
                Err(LedgerError::Database(e)) if e.code() == Some(&SqlState::CHECK_VIOLATION) => {
                    tracing::debug!(
                        requests = group.len(),
                        "credits spent meanwhile; deciding again under the account lock"
                    );
                    crate::telemetry::record::reservation_retried();
                    self.reserve_group_once(group, AccountLock::First).await
                }
                other => other,
            };
            match decided {
                // Another coordinator inserted one of the batch ids between our
                // lookup and our insert: go again, and replay its decision.
                Err(LedgerError::Database(e)) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                    Err(LedgerError::Unavailable(format!(
                        "concurrent insert of the same batch: {e}"
                    )))
                }
                other => other,
            }
        })
        .await
    }

    async fn reserve_from_soft_hold(&self, input: &ReserveInput<'_>) -> Result<Reserved> {
        let fingerprint = input.request.fingerprint();
        let reservation = input.request.reservation_id.as_deref().unwrap_or_default();
        let started = std::time::Instant::now();
        let reserved = self
            .retrying("reserve", || async {
                let mut client = self.pool.get().await?;
                let tx = client.transaction().await?;
                if let Some(replay) = replay_of(&tx, input.request, &fingerprint).await? {
                    return Ok(replay);
                }
                match consume_reservation(tx, input, &fingerprint, reservation).await {
                    Err(LedgerError::Database(e))
                        if e.code() == Some(&SqlState::UNIQUE_VIOLATION) =>
                    {
                        Err(LedgerError::Unavailable(format!(
                            "concurrent insert of the same batch: {e}"
                        )))
                    }
                    other => other,
                }
            })
            .await?;
        if !reserved.replayed {
            crate::telemetry::record::decided(&reserved.decision, started.elapsed());
        }
        Ok(reserved)
    }

    /// One try at deciding `group` (input index, input, fingerprint) in one transaction.
    async fn reserve_group_once(
        &self,
        group: &[(usize, &ReserveInput<'_>, Vec<u8>)],
        lock: AccountLock,
    ) -> Result<Vec<Result<Reserved>>> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;

        // Batch ids decided before: replay (same body) or conflict (another body).
        let ids: Vec<&str> = group
            .iter()
            .map(|(_, i, _)| i.request.batch_id.as_str())
            .collect();
        let mut seen: HashMap<String, (Vec<u8>, Decision, bool)> = HashMap::new();
        for row in tx
            .query_cached(
                "SELECT id, request_hash, decision, state FROM batches WHERE id = ANY($1)",
                &[&ids],
            )
            .await?
        {
            let decision = stored_decision(row.get(2))?;
            let state: BatchState = row.get(3);
            seen.insert(
                row.get(0),
                (row.get(1), decision, state == BatchState::Granted),
            );
        }

        // Every account of the group once, in id order (the lock order).
        let mut accounts: Vec<&str> = group
            .iter()
            .map(|(_, i, _)| i.request.account_id.as_str())
            .collect();
        accounts.sort_unstable();
        accounts.dedup();
        let read = match lock {
            AccountLock::AtTheEnd => "SELECT id, balance - held FROM accounts WHERE id = ANY($1)",
            AccountLock::First => {
                "SELECT id, balance - held FROM accounts WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE"
            }
        };
        let mut available: HashMap<String, i64> = tx
            .query_cached(read, &[&accounts])
            .await?
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();

        let mut results = Vec::with_capacity(group.len());
        let mut new_batches: Vec<NewBatch> = Vec::new();
        for (_, input, fingerprint) in group {
            let req = input.request;
            if let Some((hash, decision, undispatched)) = seen.get(&req.batch_id) {
                results.push(if hash == fingerprint {
                    Ok(Reserved {
                        decision: decision.clone(),
                        replayed: true,
                        // A duplicate within this group is dispatched by its first copy.
                        needs_dispatch: *undispatched,
                        dispatch_now: vec![],
                    })
                } else {
                    Err(LedgerError::Conflict(req.batch_id.clone()))
                });
                continue;
            }
            let Some(credits) = available.get_mut(&req.account_id) else {
                results.push(Err(LedgerError::UnknownAccount(req.account_id.clone())));
                continue;
            };
            let batch = NewBatch::price(input, fingerprint, *credits);
            if let Some(grant) = &batch.grant {
                *credits -= grant.total;
            }
            seen.insert(
                req.batch_id.clone(),
                (fingerprint.clone(), batch.decision.clone(), false),
            );
            results.push(Ok(Reserved {
                decision: batch.decision.clone(),
                replayed: false,
                needs_dispatch: batch.grant.is_some(),
                dispatch_now: batch
                    .grant
                    .as_ref()
                    .map(|g| g.run.clone())
                    .unwrap_or_default(),
            }));
            new_batches.push(batch);
        }
        insert_holds(&tx, &new_batches).await?;
        insert_batches(&tx, &new_batches).await?;
        insert_items(&tx, &new_batches).await?;
        // Last: the account rows, so that their lock lasts one statement.
        raise_held(&tx, &new_batches).await?;
        tx.commit().await?;
        Ok(results)
    }
}

/// The decision stored for a batch.
fn stored_decision(json: Value) -> Result<Decision> {
    serde_json::from_value(json)
        .map_err(|e| LedgerError::Invalid(format!("stored decision unreadable: {e}")))
}

/// The stored decision of `req.batch_id` if it was decided before with the same body.
async fn replay_of(
    tx: &Transaction<'_>,
    req: &BatchRequest,
    fingerprint: &[u8],
) -> Result<Option<Reserved>> {
    let Some(row) = tx
        .query_opt(
            "SELECT request_hash, decision, state FROM batches WHERE id = $1",
            &[&req.batch_id],
        )
        .await?
    else {
        return Ok(None);
    };
    let hash: Vec<u8> = row.get(0);
    if hash != fingerprint {
        return Err(LedgerError::Conflict(req.batch_id.clone()));
    }
    let state: BatchState = row.get(2);
    Ok(Some(Reserved {
        decision: stored_decision(row.get(1))?,
        replayed: true,
        needs_dispatch: state == BatchState::Granted,
        dispatch_now: vec![],
    }))
}

/// A batch about to be inserted: its decision and, when granted, its hold.
struct NewBatch<'a> {
    input: &'a ReserveInput<'a>,
    fingerprint: &'a [u8],
    decision: Decision,
    grant: Option<NewGrant>,
}

/// The hold of a granted batch.
struct NewGrant {
    hold_id: Uuid,
    total: i64,
    /// Items that run now (sequential: the first chunk).
    run: Vec<usize>,
    /// A hold taken earlier (a soft hold this batch consumes): nothing to insert.
    existing_hold: bool,
    chunk_size: Option<i32>,
    deadline: DateTime<Utc>,
    lease: DateTime<Utc>,
}

impl NewGrant {
    fn new(input: &ReserveInput<'_>, hold_id: Uuid, total: i64, run: Vec<usize>) -> Self {
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
        }
    }
}

impl<'a> NewBatch<'a> {
    /// Price `input` against `available` credits: a grant or a denial.
    fn price(input: &'a ReserveInput<'a>, fingerprint: &'a [u8], available: i64) -> Self {
        let req = input.request;
        let chunk_size = (req.mode == Mode::Sequential).then_some(input.chunk_size.max(1));
        match pricing::plan_chunked(req, available, input.chunk_size) {
            Plan::Short(s) => NewBatch {
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
                    message: s.message,
                    detail: s.detail,
                    options: s.options,
                }),
                grant: None,
            },
            Plan::Run {
                run,
                left_out,
                total,
            } => {
                let mut grant = NewGrant::new(input, Uuid::new_v4(), total, run);
                grant.chunk_size = chunk_size.map(|c| c as i32);
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

    fn granted(
        input: &'a ReserveInput<'a>,
        fingerprint: &'a [u8],
        grant: NewGrant,
        item_ids: Vec<String>,
        left_out: Vec<LeftOut>,
    ) -> Self {
        let req = input.request;
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
        });
        NewBatch {
            input,
            fingerprint,
            decision,
            grant: Some(grant),
        }
    }
}

/// Whether a group decision locks its accounts before it prices (`First`) or
/// only writes them last (`AtTheEnd`, see [`Ledger::decide_group`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AccountLock {
    First,
    AtTheEnd,
}

/// Raise each account's `held` by its new holds, one update per account in id
/// order. The `available >= 0` check refuses it if the credits are gone.
async fn raise_held(tx: &Transaction<'_>, batches: &[NewBatch<'_>]) -> Result<()> {
    let mut per_account: std::collections::BTreeMap<&str, i64> = Default::default();
    for b in batches {
        if let Some(g) = b.grant.as_ref().filter(|g| !g.existing_hold) {
            *per_account
                .entry(b.input.request.account_id.as_str())
                .or_default() += g.total;
        }
    }
    if per_account.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = per_account.keys().copied().collect();
    let totals: Vec<i64> = per_account.values().copied().collect();
    if ids.len() > 1 {
        // Several accounts: lock them in id order first, so that two groups
        // sharing accounts queue instead of deadlocking.
        tx.execute_cached(
            "SELECT 1 FROM accounts WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE",
            &[&ids],
        )
        .await?;
    }
    tx.execute_cached(
        "UPDATE accounts a SET held = a.held + t.total, updated_at = now()
         FROM unnest($1::text[], $2::int8[]) AS t(id, total)
         WHERE a.id = t.id",
        &[&ids, &totals],
    )
    .await?;
    Ok(())
}

/// The new holds of granted batches and their journal rows.
async fn insert_holds(tx: &Transaction<'_>, batches: &[NewBatch<'_>]) -> Result<()> {
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
    let batch_ids: Vec<&str> = grants
        .iter()
        .map(|(b, _)| b.input.request.batch_id.as_str())
        .collect();
    let holds: Vec<Uuid> = grants.iter().map(|(_, g)| g.hold_id).collect();
    let totals: Vec<i64> = grants.iter().map(|(_, g)| g.total).collect();
    tx.execute_cached(
        "INSERT INTO holds (id, account_id, amount)
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::int8[])",
        &[&holds, &accounts, &totals],
    )
    .await?;
    tx.execute_cached(
        "INSERT INTO journal (account_id, hold_id, batch_id, kind, amount, held_delta)
         SELECT a, h, b, 'hold', t, t FROM unnest($1::text[], $2::uuid[], $3::text[], $4::int8[]) AS u(a, h, b, t)",
        &[&accounts, &holds, &batch_ids, &totals],
    )
    .await?;
    Ok(())
}

/// The batch rows, granted and denied, in one statement.
async fn insert_batches(tx: &Transaction<'_>, batches: &[NewBatch<'_>]) -> Result<()> {
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

/// Grant a batch from a soft hold: no second credit check, provided the hold
/// is still open, belongs to the account, is not used yet, and holds exactly
/// what the batch costs. A hold past its TTL is expired here and now (its
/// credits released once) and the batch refused: when a start races an
/// expiry, the hold's row lock lets exactly one of them win.
async fn consume_reservation(
    tx: deadpool_postgres::Transaction<'_>,
    input: &ReserveInput<'_>,
    fingerprint: &[u8],
    reservation: &str,
) -> Result<Reserved> {
    let req = input.request;
    let refuse = |why: String| Err(LedgerError::Reservation(why));
    let Ok(hold_id) = reservation.parse::<Uuid>() else {
        return refuse(format!("`{reservation}` is not a reservation id"));
    };
    // Hold row first, then the account: the lock order of every transaction.
    let Some(row) = tx
        .query_opt(
            "SELECT account_id, amount, state, expires_at IS NOT NULL, expires_at <= now(),
                    to_char(COALESCE(expires_at, closed_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')
             FROM holds WHERE id = $1 FOR UPDATE",
            &[&hold_id],
        )
        .await?
    else {
        return refuse(format!("no reservation `{reservation}`"));
    };
    let (account, amount, state): (String, i64, HoldState) = (row.get(0), row.get(1), row.get(2));
    let (soft, past_ttl, when): (bool, Option<bool>, Option<String>) =
        (row.get(3), row.get(4), row.get(5));
    let when = when.unwrap_or_default();
    if account != req.account_id {
        return refuse(format!(
            "reservation `{reservation}` belongs to another account"
        ));
    }
    match (state, soft, past_ttl) {
        (HoldState::Open, true, Some(true)) => {
            let released = super::expire::expire_locked(&tx, &[hold_id]).await?;
            tx.commit().await?;
            for amount in released {
                crate::telemetry::record::soft_hold("expired", amount);
            }
            return refuse(format!(
                "reservation `{reservation}` expired at {when}; its credits were released"
            ));
        }
        (HoldState::Open, true, _) => {}
        (HoldState::Open, false, _) => {
            return refuse(format!(
                "reservation `{reservation}` is already used by a batch"
            ))
        }
        (HoldState::Expired, ..) => {
            return refuse(format!(
                "reservation `{reservation}` expired at {when}; its credits were released"
            ))
        }
        (other, ..) => return refuse(format!("reservation `{reservation}` is {other}")),
    }
    if !matches!(req.mode, Mode::AllOrNothing | Mode::Selected) {
        return refuse("a reservation can start only an all_or_nothing or selected batch".into());
    }
    tx.query_one_cached(
        "SELECT 1 FROM accounts WHERE id = $1 FOR NO KEY UPDATE",
        &[&req.account_id],
    )
    .await?;
    let run = pricing::requested(req);
    let total = pricing::cost_of(&req.items, &run);
    if total != amount {
        return refuse(format!(
            "the batch costs {total} credits but reservation `{reservation}` holds {amount}; \
             reserve exactly the batch's total"
        ));
    }
    // The hold is the batch's now: no TTL any more, the execution deadline applies.
    tx.execute_cached(
        "UPDATE holds SET expires_at = NULL WHERE id = $1",
        &[&hold_id],
    )
    .await?;
    let left_out = (0..req.items.len())
        .filter(|i| run.binary_search(i).is_err())
        .map(|i| LeftOut {
            item_id: req.items[i].item_id.clone(),
            reason: "not_selected".into(),
        })
        .collect();
    let item_ids = run.iter().map(|&i| req.items[i].item_id.clone()).collect();
    let mut grant = NewGrant::new(input, hold_id, total, run);
    grant.existing_hold = true;
    let batch = NewBatch::granted(input, fingerprint, grant, item_ids, left_out);
    insert_batches(&tx, std::slice::from_ref(&batch)).await?;
    insert_items(&tx, std::slice::from_ref(&batch)).await?;
    tx.commit().await?;
    Ok(Reserved {
        decision: batch.decision,
        replayed: false,
        needs_dispatch: true,
        dispatch_now: batch.grant.map(|g| g.run).unwrap_or_default(),
    })
}

/// Every item of the granted batches, in one statement: run items are
/// `pending` with their reservation; in sequential mode the later chunks are
/// `queued`; the others are `skipped` with the reason.
async fn insert_items(tx: &Transaction<'_>, batches: &[NewBatch<'_>]) -> Result<()> {
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
