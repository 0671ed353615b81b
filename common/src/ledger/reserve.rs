//! Reserve: price a batch under the account's row lock and take one hold for
//! everything that runs, or record the denial. Idempotent on the batch id.
//!
//! Three ways to a grant: the usual one (one hold for everything that runs),
//! `sequential` (a hold for the first chunk; later chunks are added as the
//! batch goes, see `settle`), and consuming a soft hold taken earlier
//! (`reservation_id`: no second credit check).

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::Value;
use tokio_postgres::error::SqlState;
use tokio_postgres::Transaction;
use uuid::Uuid;

use super::{Ledger, LedgerError, Result};
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
}

pub(super) fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

impl Ledger {
    /// Decide `input.request`: one hold for the whole cost of what runs, or a
    /// denial that holds nothing. A batch id seen before replays its decision
    /// (same body) or fails with [`LedgerError::Conflict`] (different body).
    pub async fn reserve(&self, input: &ReserveInput<'_>) -> Result<Reserved> {
        let fingerprint = input.request.fingerprint();
        let started = std::time::Instant::now();
        let reserved = self
            .retrying("reserve", || async {
                match self.reserve_once(input, &fingerprint).await {
                    // Another coordinator inserted the same batch id between our
                    // lookup and our insert: go again, and replay its decision.
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

    async fn reserve_once(&self, input: &ReserveInput<'_>, fingerprint: &[u8]) -> Result<Reserved> {
        let req = input.request;
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;

        if let Some(row) = tx
            .query_opt(
                "SELECT request_hash, decision, state FROM batches WHERE id = $1",
                &[&req.batch_id],
            )
            .await?
        {
            let hash: Vec<u8> = row.get(0);
            if hash != fingerprint {
                return Err(LedgerError::Conflict(req.batch_id.clone()));
            }
            let decision: Value = row.get(1);
            let state: String = row.get(2);
            let decision = serde_json::from_value(decision)
                .map_err(|e| LedgerError::Invalid(format!("stored decision unreadable: {e}")))?;
            return Ok(Reserved {
                decision,
                replayed: true,
                needs_dispatch: state == "granted",
            });
        }

        if let Some(reservation) = &req.reservation_id {
            return consume_reservation(tx, input, fingerprint, reservation).await;
        }

        // The account row lock serialises every decision on this account.
        let available: i64 = tx
            .query_opt(
                "SELECT balance - held FROM accounts WHERE id = $1 FOR UPDATE",
                &[&req.account_id],
            )
            .await?
            .ok_or_else(|| LedgerError::UnknownAccount(req.account_id.clone()))?
            .get(0);
        let chunk_size = (req.mode == Mode::Sequential).then_some(input.chunk_size.max(1));
        let reserved = match pricing::plan_chunked(req, available, input.chunk_size) {
            Plan::Short(s) => {
                let decision = Decision::Insufficient(Insufficient {
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
                });
                let json = serde_json::to_value(&decision).expect("decisions serialise");
                let (mode, item_count) = (req.mode.as_str(), req.items.len() as i32);
                tx.execute(
                    "INSERT INTO batches (id, account_id, request_hash, mode, state, decision,
                                          item_count, reply_to, correlation_id, closed_at)
                     VALUES ($1, $2, $3, $4, 'denied', $5, $6, $7, $8, now())",
                    &[
                        &req.batch_id,
                        &req.account_id,
                        &fingerprint,
                        &mode,
                        &json,
                        &item_count,
                        &input.reply_to,
                        &input.correlation_id,
                    ],
                )
                .await?;
                Reserved {
                    decision,
                    replayed: false,
                    needs_dispatch: false,
                }
            }
            Plan::Run {
                run,
                left_out,
                total,
            } => {
                let hold_id: Uuid = tx
                    .query_one(
                        "INSERT INTO holds (account_id, amount) VALUES ($1, $2) RETURNING id",
                        &[&req.account_id, &total],
                    )
                    .await?
                    .get(0);
                tx.execute(
                    "UPDATE accounts SET held = held + $2, updated_at = now() WHERE id = $1",
                    &[&req.account_id, &total],
                )
                .await?;
                tx.execute(
                    "INSERT INTO journal (account_id, hold_id, batch_id, kind, amount, held_delta)
                     VALUES ($1, $2, $3, 'hold', $4, $4)",
                    &[&req.account_id, &hold_id, &req.batch_id, &total],
                )
                .await?;
                let granted = Granted {
                    batch_id: req.batch_id.clone(),
                    account_id: req.account_id.clone(),
                    mode: req.mode,
                    hold_id: hold_id.to_string(),
                    reserved: total,
                    items_total: req.items.len(),
                    item_ids: match chunk_size {
                        // Sequential: every item is meant to run, chunk by chunk.
                        Some(_) => req.items.iter().map(|i| i.item_id.clone()).collect(),
                        None => run.iter().map(|&i| req.items[i].item_id.clone()).collect(),
                    },
                    left_out,
                    deadline_at: String::new(),
                    chunk_size,
                };
                insert_granted(&tx, input, fingerprint, granted, &run).await?
            }
        };
        tx.commit().await?;
        Ok(reserved)
    }
}

/// Record a granted batch holding `granted.hold_id`, and its items.
async fn insert_granted(
    tx: &Transaction<'_>,
    input: &ReserveInput<'_>,
    fingerprint: &[u8],
    mut granted: Granted,
    run: &[usize],
) -> Result<Reserved> {
    let req = input.request;
    let deadline = Utc::now()
        + chrono::Duration::from_std(input.execution_timeout).unwrap_or(chrono::Duration::days(1));
    let lease = Utc::now()
        + chrono::Duration::from_std(input.dispatch_grace).unwrap_or(chrono::Duration::seconds(30));
    granted.deadline_at = rfc3339(deadline);
    let hold_id: Uuid = granted
        .hold_id
        .parse()
        .map_err(|_| LedgerError::Invalid("hold id is not a UUID".into()))?;
    let chunk_size = granted.chunk_size.map(|c| c as i32);
    let decision = Decision::Granted(granted);
    let json = serde_json::to_value(&decision).expect("decisions serialise");
    let (mode, item_count, run_count) =
        (req.mode.as_str(), req.items.len() as i32, run.len() as i32);
    tx.execute(
        "INSERT INTO batches (id, account_id, request_hash, mode, state, decision, hold_id,
                              item_count, run_count, reply_to, correlation_id,
                              deadline_at, dispatch_lease, chunk_size)
         VALUES ($1, $2, $3, $4, 'granted', $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        &[
            &req.batch_id,
            &req.account_id,
            &fingerprint,
            &mode,
            &json,
            &hold_id,
            &item_count,
            &run_count,
            &input.reply_to,
            &input.correlation_id,
            &deadline,
            &lease,
            &chunk_size,
        ],
    )
    .await?;
    insert_items(tx, req, run).await?;
    Ok(Reserved {
        decision,
        replayed: false,
        needs_dispatch: true,
    })
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
    let (account, amount, state): (String, i64, String) = (row.get(0), row.get(1), row.get(2));
    let (soft, past_ttl, when): (bool, Option<bool>, Option<String>) =
        (row.get(3), row.get(4), row.get(5));
    let when = when.unwrap_or_default();
    if account != req.account_id {
        return refuse(format!(
            "reservation `{reservation}` belongs to another account"
        ));
    }
    match (state.as_str(), soft, past_ttl) {
        ("open", true, Some(true)) => {
            let released = super::holds::expire_locked(&tx, &[hold_id]).await?;
            tx.commit().await?;
            for amount in released {
                crate::telemetry::record::soft_hold("expired", amount);
            }
            return refuse(format!(
                "reservation `{reservation}` expired at {when}; its credits were released"
            ));
        }
        ("open", true, _) => {}
        ("open", false, _) => {
            return refuse(format!(
                "reservation `{reservation}` is already used by a batch"
            ))
        }
        ("expired", ..) => {
            return refuse(format!(
                "reservation `{reservation}` expired at {when}; its credits were released"
            ))
        }
        (other, ..) => return refuse(format!("reservation `{reservation}` is {other}")),
    }
    if !matches!(req.mode, Mode::AllOrNothing | Mode::Selected) {
        return refuse("a reservation can start only an all_or_nothing or selected batch".into());
    }
    tx.query_one(
        "SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE",
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
    tx.execute(
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
    let granted = Granted {
        batch_id: req.batch_id.clone(),
        account_id: req.account_id.clone(),
        mode: req.mode,
        hold_id: hold_id.to_string(),
        reserved: total,
        items_total: req.items.len(),
        item_ids: run.iter().map(|&i| req.items[i].item_id.clone()).collect(),
        left_out,
        deadline_at: String::new(),
        chunk_size: None,
    };
    let reserved = insert_granted(&tx, input, fingerprint, granted, &run).await?;
    tx.commit().await?;
    Ok(reserved)
}

/// Every item of a granted batch, in one statement: run items are `pending`
/// with their reservation; in sequential mode the later chunks are `queued`;
/// the others are `skipped` with the reason.
async fn insert_items(tx: &Transaction<'_>, req: &BatchRequest, run: &[usize]) -> Result<()> {
    let n = req.items.len();
    let mut ids = Vec::with_capacity(n);
    let mut positions = Vec::with_capacity(n);
    let mut costs = Vec::with_capacity(n);
    let mut priorities = Vec::with_capacity(n);
    let mut reserved = Vec::with_capacity(n);
    let mut states = Vec::with_capacity(n);
    let mut reasons: Vec<Option<&str>> = Vec::with_capacity(n);
    let mut payloads = Vec::with_capacity(n);
    let sequential = req.mode == Mode::Sequential;
    let skip_reason = if req.mode == Mode::Selected {
        "not_selected"
    } else {
        "did_not_fit"
    };
    for (i, item) in req.items.iter().enumerate() {
        let runs = run.binary_search(&i).is_ok();
        ids.push(item.item_id.as_str());
        positions.push(i as i32);
        costs.push(item.estimated_cost);
        priorities.push(item.priority);
        reserved.push(if runs { item.estimated_cost } else { 0 });
        states.push(match (runs, sequential) {
            (true, _) => "pending",
            (false, true) => "queued",
            (false, false) => "skipped",
        });
        reasons.push(if runs || sequential {
            None
        } else {
            Some(skip_reason)
        });
        payloads.push(&item.payload);
    }
    tx.execute(
        "INSERT INTO items (batch_id, item_id, position, estimated_cost, priority, reserved, state, reason, payload)
         SELECT $1, t.item_id, t.position, t.cost, t.priority, t.reserved, t.state, t.reason, t.payload
         FROM unnest($2::text[], $3::int4[], $4::int8[], $5::int4[], $6::int8[], $7::text[], $8::text[], $9::jsonb[])
              AS t(item_id, position, cost, priority, reserved, state, reason, payload)",
        &[&req.batch_id, &ids, &positions, &costs, &priorities, &reserved, &states, &reasons, &payloads],
    )
    .await?;
    Ok(())
}
