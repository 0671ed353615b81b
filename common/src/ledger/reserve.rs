//! Reserve: price a batch under the account's row lock and take one hold for
//! everything that runs, or record the denial. Idempotent on the batch id.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::Value;
use tokio_postgres::error::SqlState;
use uuid::Uuid;

use super::{Ledger, LedgerError, Result};
use crate::messages::{BatchRequest, Decision, Granted, Insufficient};
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

fn rfc3339(t: DateTime<Utc>) -> String {
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

        // The account row lock serialises every decision on this account.
        let row = tx
            .query_opt(
                "SELECT balance - held FROM accounts WHERE id = $1 FOR UPDATE",
                &[&req.account_id],
            )
            .await?
            .ok_or_else(|| LedgerError::UnknownAccount(req.account_id.clone()))?;
        let available: i64 = row.get(0);
        let mode = req.mode.as_str();
        let item_count = req.items.len() as i32;

        let reserved = match pricing::plan(req, available) {
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
                let deadline = Utc::now()
                    + chrono::Duration::from_std(input.execution_timeout)
                        .unwrap_or(chrono::Duration::days(1));
                let lease = Utc::now()
                    + chrono::Duration::from_std(input.dispatch_grace)
                        .unwrap_or(chrono::Duration::seconds(30));
                let decision = Decision::Granted(Granted {
                    batch_id: req.batch_id.clone(),
                    account_id: req.account_id.clone(),
                    mode: req.mode,
                    hold_id: hold_id.to_string(),
                    reserved: total,
                    items_total: req.items.len(),
                    item_ids: run.iter().map(|&i| req.items[i].item_id.clone()).collect(),
                    left_out,
                    deadline_at: rfc3339(deadline),
                });
                let json = serde_json::to_value(&decision).expect("decisions serialise");
                let run_count = run.len() as i32;
                tx.execute(
                    "INSERT INTO batches (id, account_id, request_hash, mode, state, decision, hold_id,
                                          item_count, run_count, reply_to, correlation_id,
                                          deadline_at, dispatch_lease)
                     VALUES ($1, $2, $3, $4, 'granted', $5, $6, $7, $8, $9, $10, $11, $12)",
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
                    ],
                )
                .await?;
                insert_items(&tx, req, &run).await?;
                tx.execute(
                    "INSERT INTO journal (account_id, hold_id, batch_id, kind, amount, held_delta)
                     VALUES ($1, $2, $3, 'hold', $4, $4)",
                    &[&req.account_id, &hold_id, &req.batch_id, &total],
                )
                .await?;
                Reserved {
                    decision,
                    replayed: false,
                    needs_dispatch: true,
                }
            }
        };
        tx.commit().await?;
        Ok(reserved)
    }
}

/// Every item of a granted batch, in one statement: run items are `pending`
/// with their reservation, the others `skipped` with the reason.
async fn insert_items(
    tx: &tokio_postgres::Transaction<'_>,
    req: &BatchRequest,
    run: &[usize],
) -> Result<()> {
    let n = req.items.len();
    let mut ids = Vec::with_capacity(n);
    let mut positions = Vec::with_capacity(n);
    let mut costs = Vec::with_capacity(n);
    let mut priorities = Vec::with_capacity(n);
    let mut reserved = Vec::with_capacity(n);
    let mut states = Vec::with_capacity(n);
    let mut reasons: Vec<Option<&str>> = Vec::with_capacity(n);
    let mut payloads = Vec::with_capacity(n);
    let skip_reason = if req.mode == crate::messages::Mode::Selected {
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
        states.push(if runs { "pending" } else { "skipped" });
        reasons.push(if runs { None } else { Some(skip_reason) });
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
