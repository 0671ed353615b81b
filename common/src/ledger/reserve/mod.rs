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

use super::{spenders, BatchState, Cached, Ledger, LedgerError, Result};
use crate::breakdown::Pot;
use crate::messages::{BatchRequest, Decision};

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

pub fn rfc3339(t: DateTime<Utc>) -> String {
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
                Err(LedgerError::Database(e)) if decided_on_stale_credits(&e) => {
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
            self.wake_relay();
            crate::telemetry::record::decided(&reserved.decision, started.elapsed());
        }
        Ok(reserved)
    }

    /// The spendable grants of account `id` in burn-down order, as a
    /// decision would read them now (a preview prices on these).
    pub async fn pots(&self, id: &str) -> Result<Vec<Pot>> {
        self.retrying("read grants", || async {
            let client = self.pool.get().await?;
            let rows = client.query_cached(SPENDABLE, &[&vec![id]]).await?;
            if rows.is_empty() {
                return Err(LedgerError::UnknownAccount(id.into()));
            }
            Ok(rows.iter().filter_map(pot).collect())
        })
        .await
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
        if lock == AccountLock::First {
            // Its own statement: the grants are read by the next one, whose
            // snapshot (read committed) sees what a transaction we waited
            // for on the account row changed. Read in the same statement as
            // the lock, they would be as they were before the wait.
            tx.execute_cached(LOCK_ACCOUNTS, &[&accounts]).await?;
        }
        // The spender paths of the requests that name one, read like the
        // grants (after the lock when there is one), in the same round trip
        // (the two queries are pipelined on the connection).
        let mut pairs: Vec<(&str, &str)> = group
            .iter()
            .filter_map(|(_, i, _)| {
                Some((
                    i.request.account_id.as_str(),
                    i.request.spender_id.as_deref()?,
                ))
            })
            .collect();
        pairs.sort_unstable();
        pairs.dedup();
        let (spendable, mut paths) = tokio::try_join!(
            async { Ok::<_, LedgerError>(tx.query_cached(SPENDABLE, &[&accounts]).await?) },
            async {
                if pairs.is_empty() {
                    Ok(HashMap::new())
                } else {
                    spenders::read_paths(&tx, &pairs).await
                }
            }
        )?;
        let mut credits: HashMap<String, Vec<Pot>> = HashMap::new();
        for r in spendable {
            let pots = credits.entry(r.get(0)).or_default();
            pots.extend(pot(&r));
        }

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
            let Some(pots) = credits.get_mut(&req.account_id) else {
                results.push(Err(LedgerError::UnknownAccount(req.account_id.clone())));
                continue;
            };
            let path = match &req.spender_id {
                None => None,
                Some(s) => match paths.get_mut(&(req.account_id.clone(), s.clone())) {
                    Some(p) => Some(p),
                    None => {
                        results.push(Err(LedgerError::UnknownSpender {
                            account: req.account_id.clone(),
                            spender: s.clone(),
                        }));
                        continue;
                    }
                },
            };
            // A grant takes its draw from `pots` (and counts at every level
            // of `path`): the next request of the same account is priced on
            // what is left.
            let batch = NewBatch::price(input, fingerprint, pots, path);
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
        write_decisions(&tx, &new_batches).await?;
        // Last: the account rows and their grants, so that their lock lasts
        // one statement per account.
        take_from_grants(&tx, &new_batches).await?;
        tx.commit().await?;
        if !new_batches.is_empty() {
            self.wake_relay();
        }
        Ok(results)
    }
}

/// Every account of a group with its spendable grants, one row per grant in
/// burn-down order (one row with no grant for an account with none): what
/// `holdfast_take` will apply, read with the transaction's `now()`.
const SPENDABLE: &str = "SELECT a.id, g.id, g.source, g.expires_at, g.remaining - g.held
     FROM accounts a
     LEFT JOIN grants g ON g.account_id = a.id AND g.state = 'active' AND g.remaining > g.held
                       AND (g.expires_at IS NULL OR g.expires_at > now())
     WHERE a.id = ANY($1)
     ORDER BY a.id, g.priority, g.expires_at NULLS LAST, g.source_rank, g.effective_at, g.id";
/// The accounts of a group, locked in id order (the lock order).
pub(super) const LOCK_ACCOUNTS: &str =
    "SELECT 1 FROM accounts WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE";

/// The grant of a [`SPENDABLE`] row, if it has one.
fn pot(r: &tokio_postgres::Row) -> Option<Pot> {
    Some(Pot {
        grant_id: r.get::<_, Option<String>>(1)?,
        source: r.get::<_, String>(2).parse().unwrap_or_default(),
        expires_at: r.get(3),
        free: r.get(4),
    })
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

/// The take refused a decision priced on a read that another transaction
/// changed before the lock: the grants or a spender's usage (check
/// violation), or a spender removed meanwhile. Decide again under the lock.
fn decided_on_stale_credits(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::CHECK_VIOLATION)
        || (e.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION)
            && e.as_db_error().and_then(|d| d.constraint()) == Some("spender_unknown"))
}

/// Whether a group decision locks its accounts before it prices (`First`) or
/// only writes them last (`AtTheEnd`, see [`Ledger::decide_group`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AccountLock {
    First,
    AtTheEnd,
}

mod from_soft_hold;
mod rows;

use from_soft_hold::consume_reservation;
use rows::*;
