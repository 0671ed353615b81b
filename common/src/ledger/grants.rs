//! Grants: the credits of an account, each with a source, a priority and an
//! optional expiry, burned down in one order (priority, soonest expiry,
//! promotion → plan → purchase → manual, oldest, grant id). The bookkeeping
//! between grants and holds lives in the database (`holdfast_take`,
//! `holdfast_resolve`, `holdfast_expire_grants`, `holdfast_void_grant` in
//! migrations/V5__grants.sql), so every path that takes or resolves a hold
//! follows the same rule; this module calls them and reads grants back.

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use serde::Serialize;
use tokio_postgres::error::SqlState;
use utoipa::ToSchema;
use uuid::Uuid;

use super::accounts::{valid_id, Account};
use super::reserve::rfc3339;
use super::{Cached, Ledger, LedgerError, Result};
pub use crate::messages::GrantSource;

/// A grant to add. `grant_id` is the idempotency key within the account: the
/// same id with the same terms is a replay, with other terms a conflict.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GrantSpec {
    pub grant_id: Option<String>,
    pub amount: i64,
    pub source: GrantSource,
    pub priority: i32,
    pub expires_at: Option<DateTime<Utc>>,
    pub note: Option<String>,
}

impl GrantSpec {
    /// `amount` manual credits that never expire.
    pub fn manual(amount: i64) -> Self {
        Self {
            amount,
            ..Self::default()
        }
    }

    fn validate(&self) -> Result<()> {
        if self.amount <= 0 {
            return Err(LedgerError::Invalid(format!(
                "a grant must be a positive number of credits, got {}",
                self.amount
            )));
        }
        if let Some(id) = &self.grant_id {
            if id.is_empty() || id.chars().count() > 128 || id.chars().any(char::is_control) {
                return Err(LedgerError::Invalid(
                    "grant_id must be 1 to 128 printable characters".into(),
                ));
            }
            if id.starts_with(ALLOWANCE_GRANT_PREFIX) {
                return Err(LedgerError::Invalid(format!(
                    "grant_id must not start with `{ALLOWANCE_GRANT_PREFIX}`: the grants of allowances are named so"
                )));
            }
        }
        if self.note.as_ref().is_some_and(|n| n.len() > 1024) {
            return Err(LedgerError::Invalid(
                "note must be at most 1024 bytes".into(),
            ));
        }
        Ok(())
    }
}

/// How the grants an allowance issues are named (`allowance:<id>:<period
/// start>`, and `…:rollover`); no other grant may use it.
pub const ALLOWANCE_GRANT_PREFIX: &str = "allowance:";

/// One grant of an account, as `account show` and `GET /v1/accounts/{id}` list it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct Grant {
    pub grant_id: String,
    pub source: GrantSource,
    pub priority: i32,
    /// Credits granted.
    pub amount: i64,
    /// Not yet spent, expired or voided; includes `held`.
    pub remaining: i64,
    /// Taken by open holds (they keep it even after the grant expires).
    pub held: i64,
    /// What new holds may take of it now: `remaining - held` while the grant
    /// is active and not past its expiry, else 0.
    pub available: i64,
    /// `active`, `expired` or `voided`.
    pub state: String,
    /// RFC 3339.
    pub effective_at: String,
    /// RFC 3339; absent: never expires.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The allowance that issued it (its period's grant, or the rollover
    /// into that period); absent for other grants.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowance_id: Option<String>,
    /// RFC 3339: the start of the allowance period it was issued for;
    /// absent for a rollover grant and for other grants.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub period_start: Option<String>,
}

/// What adding a grant did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Granted {
    pub account: Account,
    pub grant: Grant,
    /// The same `grant_id` with the same terms was granted before: nothing was added.
    pub replayed: bool,
}

/// The columns [`grant_row`] reads, in burn-down order.
const GRANT_COLUMNS: &str = "id, source, priority, amount, remaining, held,
       CASE WHEN state = 'active' AND (expires_at IS NULL OR expires_at > now())
            THEN remaining - held ELSE 0 END,
       state, effective_at, expires_at, note,
       allowance_id, period_start";
const BURN_DOWN: &str = "priority, expires_at NULLS LAST, source_rank, effective_at, id";

fn grant_row(r: &tokio_postgres::Row) -> Grant {
    let source: String = r.get(1);
    Grant {
        grant_id: r.get(0),
        source: source.parse().unwrap_or_default(),
        priority: r.get(2),
        amount: r.get(3),
        remaining: r.get(4),
        held: r.get(5),
        available: r.get(6),
        state: r.get(7),
        effective_at: rfc3339(r.get(8)),
        expires_at: r.get::<_, Option<DateTime<Utc>>>(9).map(rfc3339),
        note: r.get(10),
        allowance_id: r.get(11),
        period_start: r.get::<_, Option<DateTime<Utc>>>(12).map(rfc3339),
    }
}

/// `holdfast_take`: hold `amounts[i]` for `holds[i]` (of batch `batch_ids[i]`,
/// none for a soft hold) from the grants of `account`, in burn-down order.
/// Locks the account row first; a check violation means the credits are gone.
pub(super) async fn take(
    tx: &Transaction<'_>,
    account: &str,
    holds: &[Uuid],
    batch_ids: &[Option<&str>],
    amounts: &[i64],
    note: Option<&str>,
) -> Result<()> {
    tx.execute_cached(
        "SELECT holdfast_take($1, $2, $3, $4, $5)",
        &[&account, &holds, &batch_ids, &amounts, &note],
    )
    .await?;
    Ok(())
}

/// The draws a group of holds was priced on: `holds[k]` is the 1-based
/// index of the hold (in the `take_planned` call) that draws `amounts[k]`
/// from grant `grants[k]`, in burn-down order per hold.
#[derive(Default)]
pub(super) struct Plan<'a> {
    pub(super) holds: Vec<i32>,
    pub(super) grants: Vec<&'a str>,
    pub(super) amounts: Vec<i64>,
}

/// Like [`take`], and the database checks that the burn-down it applies is
/// `plan`: a check violation if the grants changed since the pricing read.
pub(super) async fn take_planned(
    tx: &Transaction<'_>,
    account: &str,
    holds: &[Uuid],
    batch_ids: &[Option<&str>],
    amounts: &[i64],
    plan: &Plan<'_>,
) -> Result<()> {
    tx.execute_cached(
        "SELECT holdfast_take($1, $2, $3, $4, NULL, $5, $6, $7)",
        &[
            &account,
            &holds,
            &batch_ids,
            &amounts,
            &plan.holds,
            &plan.grants,
            &plan.amounts,
        ],
    )
    .await?;
    Ok(())
}

/// How the unused part of a resolving hold goes back: `release` (a batch
/// closed, a soft hold was cancelled) or `expire` (a soft hold's TTL).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Unused {
    Release,
    Expire,
}

/// `holdfast_resolve`: post `captured` of hold `hold` (which the caller has
/// just marked resolved) to the grants it took from and return the rest to
/// them, or let it expire with a grant that expired meanwhile. Counts those
/// expired credits by source. Then the same for the spenders the hold counts
/// against (`holdfast_resolve_spending`, V10): captured is used, the rest
/// goes back to every level.
pub(super) async fn resolve(
    tx: &Transaction<'_>,
    hold: Uuid,
    captured: i64,
    batch_id: Option<&str>,
    unused: Unused,
    note: &str,
) -> Result<()> {
    let kind = match unused {
        Unused::Release => "release",
        Unused::Expire => "expire",
    };
    let expired = tx
        .query_cached(
            "SELECT source, expired FROM holdfast_resolve_spending($1, $2, $3, $4, $5)",
            &[&hold, &captured, &batch_id, &kind, &note],
        )
        .await?;
    for r in &expired {
        let source: String = r.get(0);
        crate::telemetry::record::credits_expired(
            source.parse().unwrap_or_default(),
            r.get::<_, i64>(1),
        );
    }
    Ok(())
}

impl Ledger {
    /// Add a grant to account `id` (creating the account first if `create`).
    /// The same `grant_id` with the same terms replays; with other terms it
    /// fails with [`LedgerError::GrantConflict`].
    pub async fn add_grant(&self, id: &str, spec: &GrantSpec, create: bool) -> Result<Granted> {
        valid_id(id)?;
        spec.validate()?;
        let grant_id = spec
            .grant_id
            .clone()
            .unwrap_or_else(|| format!("g-{}", Uuid::new_v4()));
        let replayed = self
            .retrying("grant", || async {
                let mut client = self.pool.get().await?;
                let tx = client.transaction().await?;
                if create {
                    tx.execute(
                        "INSERT INTO accounts (id) VALUES ($1) ON CONFLICT (id) DO NOTHING",
                        &[&id],
                    )
                    .await?;
                }
                // The account row first (the lock order), and its existence.
                if tx
                    .query_opt(
                        "SELECT 1 FROM accounts WHERE id = $1 FOR NO KEY UPDATE",
                        &[&id],
                    )
                    .await?
                    .is_none()
                {
                    return Err(LedgerError::UnknownAccount(id.into()));
                }
                let inserted = tx
                    .execute(
                        "INSERT INTO grants (account_id, id, amount, remaining, source, priority, expires_at, note)
                         SELECT $1, $2, $3, $3, $4, $5, $6, $7
                         WHERE $6::timestamptz IS NULL OR $6 > now()
                         ON CONFLICT (account_id, id) DO NOTHING",
                        &[
                            &id,
                            &grant_id,
                            &spec.amount,
                            &spec.source.as_str(),
                            &spec.priority,
                            &spec.expires_at,
                            &spec.note,
                        ],
                    )
                    .await?;
                if inserted == 0 {
                    return match same_terms(&tx, id, &grant_id, spec).await? {
                        Some(true) => Ok(true),
                        Some(false) => Err(LedgerError::GrantConflict {
                            account: id.into(),
                            grant: grant_id.clone(),
                        }),
                        None => Err(LedgerError::Invalid(
                            "expires_at must be in the future".into(),
                        )),
                    };
                }
                tx.execute(
                    "UPDATE accounts SET balance = balance + $2, updated_at = now() WHERE id = $1",
                    &[&id, &spec.amount],
                )
                .await
                .map_err(|e| match e.code() {
                    Some(&SqlState::NUMERIC_VALUE_OUT_OF_RANGE) => {
                        LedgerError::Invalid("the balance would overflow".into())
                    }
                    _ => e.into(),
                })?;
                tx.execute(
                    "INSERT INTO journal (account_id, grant_id, kind, amount, balance_delta, note)
                     VALUES ($1, $2, 'grant', $3, $3, $4)",
                    &[&id, &grant_id, &spec.amount, &spec.note],
                )
                .await?;
                tx.commit().await?;
                Ok(false)
            })
            .await?;
        if !replayed {
            crate::telemetry::record::granted(spec.source, spec.amount);
        }
        let grant = self
            .grants(id)
            .await?
            .into_iter()
            .find(|g| g.grant_id == grant_id)
            .ok_or_else(|| LedgerError::NotFound(format!("no grant `{grant_id}`")))?;
        Ok(Granted {
            account: self.account(id).await?,
            grant,
            replayed,
        })
    }

    /// Void what grant `grant_id` of account `id` has left; what open holds
    /// took of it goes when they release it. Voiding a grant that is no
    /// longer active changes nothing and reports it as it is.
    pub async fn void_grant(&self, id: &str, grant_id: &str, note: Option<&str>) -> Result<Grant> {
        self.retrying("void grant", || async {
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            let exists = tx
                .query_opt(
                    "SELECT 1 FROM grants WHERE account_id = $1 AND id = $2",
                    &[&id, &grant_id],
                )
                .await?
                .is_some();
            if !exists {
                return Err(LedgerError::NotFound(format!(
                    "account `{id}` has no grant `{grant_id}`"
                )));
            }
            tx.query_one(
                "SELECT holdfast_void_grant($1, $2, $3)",
                &[&id, &grant_id, &note],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
        .await?;
        self.grants(id)
            .await?
            .into_iter()
            .find(|g| g.grant_id == grant_id)
            .ok_or_else(|| LedgerError::NotFound(format!("no grant `{grant_id}`")))
    }

    /// The grants of account `id`, in burn-down order (active ones first).
    pub async fn grants(&self, id: &str) -> Result<Vec<Grant>> {
        self.retrying("read grants", || async {
            let client = self.pool.get().await?;
            Ok(client
                .query(
                    &format!(
                        "SELECT {GRANT_COLUMNS} FROM grants WHERE account_id = $1
                         ORDER BY state <> 'active', {BURN_DOWN}"
                    ),
                    &[&id],
                )
                .await?
                .iter()
                .map(grant_row)
                .collect())
        })
        .await
    }

    /// Expire what is left of grants past their expiry, up to `limit`
    /// accounts' worth, each account in its own transaction. Never early;
    /// several reconcilers may run it at once: each waits for the account's
    /// lock and expires only what is still there. A grant of an allowance whose next period
    /// rolls its unused credits over waits for that period's issuance
    /// (`holdfast_awaits_rollover`, migrations/V7__allowances.sql). Returns
    /// the credits expired.
    pub async fn expire_grants(&self, limit: i64) -> Result<i64> {
        let accounts: Vec<String> = self
            .retrying("find grants to expire", || async {
                let client = self.pool.get().await?;
                Ok(client
                    .query(
                        "SELECT DISTINCT account_id FROM grants
                         WHERE state = 'active' AND expires_at <= now()
                           AND NOT holdfast_awaits_rollover(account_id, allowance_id, expires_at)
                         ORDER BY account_id LIMIT $1",
                        &[&limit],
                    )
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect())
            })
            .await?;
        let mut total = 0;
        for account in &accounts {
            let expired = self
                .retrying("expire grants", || async {
                    let mut client = self.pool.get().await?;
                    let tx = client.transaction().await?;
                    let rows = tx
                        .query(
                            "SELECT grant_id, source, expired FROM holdfast_expire_grants($1)",
                            &[account],
                        )
                        .await?;
                    tx.commit().await?;
                    Ok(rows
                        .iter()
                        .map(|r| {
                            (
                                r.get::<_, String>(0),
                                r.get::<_, String>(1),
                                r.get::<_, i64>(2),
                            )
                        })
                        .collect::<Vec<_>>())
                })
                .await?;
            for (grant, source, credits) in expired {
                tracing::info!(account = %account, grant = %grant, credits, "grant expired");
                crate::telemetry::record::credits_expired(
                    source.parse().unwrap_or_default(),
                    credits,
                );
                total += credits;
            }
        }
        Ok(total)
    }
}

/// Whether grant `grant_id` of `account` has the terms of `spec`; `None` if
/// there is no such grant (the insert was refused for its expiry).
async fn same_terms(
    tx: &Transaction<'_>,
    account: &str,
    grant_id: &str,
    spec: &GrantSpec,
) -> Result<Option<bool>> {
    let Some(row) = tx
        .query_opt(
            "SELECT amount, source, priority, expires_at, note FROM grants
             WHERE account_id = $1 AND id = $2",
            &[&account, &grant_id],
        )
        .await?
    else {
        return Ok(None);
    };
    let expires_at: Option<DateTime<Utc>> = row.get(3);
    Ok(Some(
        row.get::<_, i64>(0) == spec.amount
            && row.get::<_, String>(1) == spec.source.as_str()
            && row.get::<_, i32>(2) == spec.priority
            && expires_at.map(|t| t.timestamp_micros())
                == spec.expires_at.map(|t| t.timestamp_micros())
            && row.get::<_, Option<String>>(4) == spec.note,
    ))
}
