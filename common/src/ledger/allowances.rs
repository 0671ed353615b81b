//! Allowances: an account's periodic `plan` credits. An allowance gives
//! `amount` credits each period (a day, a week or a calendar month, from its
//! anchor); the reconciler issues each period's grant once the period has
//! begun, expiring at its end, and rolls what the previous period left
//! unused over (up to `rollover_cap`) as a grant of its own. New terms apply
//! from the next period on; a stopped allowance issues no period after the
//! current one.
//!
//! The bookkeeping lives in the database (migrations/V7__allowances.sql):
//! `holdfast_issue_allowance` issues, `holdfast_period_after` computes the
//! periods; this module manages the allowances (as holdfast_admin) and asks
//! the database to issue what is due (as holdfast_reconciler). Exactly once:
//! the issuing function locks the account row and the allowance row, and a
//! unique index allows one grant per allowance and period.

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use serde::{Deserialize, Serialize};
use tokio_postgres::error::SqlState;
use tokio_postgres::Row;
use utoipa::ToSchema;
use uuid::Uuid;

use super::accounts::valid_id;
use super::reserve::rfc3339;
use super::{Ledger, LedgerError, Result};
use crate::messages::GrantSource;

/// Longest `allowance_id`, in characters: the ids of its grants
/// (`allowance:<id>:<period start>:rollover`) stay within 128.
pub const MAX_ALLOWANCE_ID_CHARS: usize = 64;

/// How far in the past an anchor may be: its missed periods are issued at
/// once (like after a downtime), so their number stays bounded.
pub const MAX_BACKDATE_DAYS: i32 = 366;

/// Periods one transaction issues for one allowance; a longer catch-up takes
/// several transactions, in order.
const PERIODS_PER_TRANSACTION: i32 = 100;

/// How long an allowance period lasts. Months are calendar months in UTC,
/// counted from the anchor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Day,
    Week,
    Month,
}

impl Period {
    pub const ALL: [Period; 3] = [Period::Day, Period::Week, Period::Month];

    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
        }
    }
}

impl std::str::FromStr for Period {
    type Err = LedgerError;

    fn from_str(s: &str) -> Result<Self> {
        Period::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                LedgerError::Invalid(format!("period must be day, week or month, got `{s}`"))
            })
    }
}

/// What an allowance gives: `amount` credits each `period`, and at most
/// `rollover_cap` unused credits carried from one period into the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllowanceTerms {
    pub amount: i64,
    pub period: Period,
    pub rollover_cap: i64,
}

impl AllowanceTerms {
    fn validate(&self) -> Result<()> {
        if self.amount <= 0 {
            return Err(LedgerError::Invalid(format!(
                "an allowance must be a positive number of credits, got {}",
                self.amount
            )));
        }
        if self.rollover_cap < 0 {
            return Err(LedgerError::Invalid(format!(
                "rollover_cap must not be negative, got {}",
                self.rollover_cap
            )));
        }
        Ok(())
    }
}

/// An allowance to create. `allowance_id` is the idempotency key within the
/// account (default: a new id); `anchor` is the start of the first period
/// (default: now), at most [`MAX_BACKDATE_DAYS`] in the past, in whole
/// seconds (a fraction is dropped).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowanceSpec {
    pub allowance_id: Option<String>,
    pub terms: AllowanceTerms,
    pub anchor: Option<DateTime<Utc>>,
}

/// Whether `id` may name an allowance: 1 to [`MAX_ALLOWANCE_ID_CHARS`]
/// characters, none of them a control character. The reason when not.
pub fn check_allowance_id(id: &str) -> std::result::Result<(), String> {
    if id.is_empty() {
        Err("must not be empty".into())
    } else if id.chars().count() > MAX_ALLOWANCE_ID_CHARS {
        Err(format!(
            "must be at most {MAX_ALLOWANCE_ID_CHARS} characters"
        ))
    } else if id.chars().any(char::is_control) {
        Err("must not contain control characters".into())
    } else {
        Ok(())
    }
}

fn valid_allowance_id(id: &str) -> Result<()> {
    check_allowance_id(id).map_err(|why| LedgerError::Invalid(format!("allowance_id {why}")))
}

/// Terms that apply from a later period on (a change not yet in force).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct NextTerms {
    /// RFC 3339: the start of the first period they apply to.
    pub effective_from: String,
    pub amount: i64,
    pub period: Period,
    pub rollover_cap: i64,
}

/// One allowance of an account, as `account show` and `GET /v1/accounts/{id}` list it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct Allowance {
    pub allowance_id: String,
    /// Credits issued each period (the terms of the current period, or of
    /// the first one before it begins).
    pub amount: i64,
    pub period: Period,
    /// Most unused credits carried from one period into the next.
    pub rollover_cap: i64,
    /// RFC 3339: the start of the first period.
    pub anchor: String,
    /// `active`, or `stopped` (no period starts at or after `stops_at`).
    pub state: String,
    /// RFC 3339: stopped allowances issue no period starting then or later.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stops_at: Option<String>,
    /// RFC 3339: the start of the next period to issue; absent when no
    /// period is left to issue.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_period_start: Option<String>,
    /// A change of terms that applies from a later period on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_terms: Option<NextTerms>,
}

/// What creating an allowance did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allowed {
    pub allowance: Allowance,
    /// The same `allowance_id` with the same terms existed: nothing changed.
    pub replayed: bool,
}

/// One period's grant, as the reconciler issued it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issued {
    pub account_id: String,
    pub allowance_id: String,
    pub grant_id: String,
    pub period_start: DateTime<Utc>,
    pub amount: i64,
    /// Credits of the previous period carried into this one.
    pub rolled_over: i64,
}

/// The columns [`allowance_row`] reads: the allowance, the terms of the
/// current period (or of the first, before it begins) and the next terms.
const ALLOWANCE_VIEW: &str = "
    SELECT a.id, a.anchor, a.state, a.stops_at,
           CASE WHEN a.stops_at IS NULL OR a.next_period_start < a.stops_at
                THEN a.next_period_start END,
           c.amount, c.period, c.rollover_cap,
           n.effective_from, n.amount, n.period, n.rollover_cap
    FROM allowances a
    CROSS JOIN LATERAL (
        SELECT t.effective_from, t.amount, t.period, t.rollover_cap FROM allowance_terms t
        WHERE t.account_id = a.account_id AND t.allowance_id = a.id
        ORDER BY t.effective_from <= now() DESC,
                 CASE WHEN t.effective_from <= now() THEN t.effective_from END DESC,
                 t.effective_from
        LIMIT 1) c
    LEFT JOIN LATERAL (
        SELECT t.effective_from, t.amount, t.period, t.rollover_cap FROM allowance_terms t
        WHERE t.account_id = a.account_id AND t.allowance_id = a.id
          AND t.effective_from > c.effective_from
        ORDER BY t.effective_from LIMIT 1) n ON true
    WHERE a.account_id = $1";

fn period(r: &Row, i: usize) -> Period {
    r.get::<_, String>(i).parse().unwrap_or(Period::Month)
}

fn allowance_row(r: &Row) -> Allowance {
    let time = |i: usize| r.get::<_, Option<DateTime<Utc>>>(i).map(rfc3339);
    Allowance {
        allowance_id: r.get(0),
        anchor: rfc3339(r.get(1)),
        state: r.get(2),
        stops_at: time(3),
        next_period_start: time(4),
        amount: r.get(5),
        period: period(r, 6),
        rollover_cap: r.get(7),
        next_terms: r.get::<_, Option<DateTime<Utc>>>(8).map(|from| NextTerms {
            effective_from: rfc3339(from),
            amount: r.get(9),
            period: period(r, 10),
            rollover_cap: r.get(11),
        }),
    }
}

/// Lock the account row (the lock order: account, allowance, grants) and
/// check that it exists.
async fn lock_account(tx: &Transaction<'_>, account: &str) -> Result<()> {
    tx.query_opt(
        "SELECT 1 FROM accounts WHERE id = $1 FOR NO KEY UPDATE",
        &[&account],
    )
    .await?
    .map(|_| ())
    .ok_or_else(|| LedgerError::UnknownAccount(account.into()))
}

/// Lock an allowance row; its state and the instant its "current period"
/// is taken at: now, or just before its next period to issue when that is
/// later (a period already issued is never changed nor stopped).
async fn lock_allowance(
    tx: &Transaction<'_>,
    account: &str,
    allowance: &str,
) -> Result<(String, DateTime<Utc>)> {
    let row = tx
        .query_opt(
            "SELECT state, greatest(now(), next_period_start - interval '1 microsecond')
             FROM allowances WHERE account_id = $1 AND id = $2 FOR NO KEY UPDATE",
            &[&account, &allowance],
        )
        .await?
        .ok_or_else(|| {
            LedgerError::NotFound(format!(
                "account `{account}` has no allowance `{allowance}`"
            ))
        })?;
    Ok((row.get(0), row.get(1)))
}

/// The terms that apply at `at`: (effective_from, anchor, period, terms).
async fn terms_at(
    tx: &Transaction<'_>,
    account: &str,
    allowance: &str,
    at: DateTime<Utc>,
) -> Result<Option<(DateTime<Utc>, DateTime<Utc>, AllowanceTerms)>> {
    Ok(tx
        .query_opt(
            "SELECT effective_from, anchor, amount, period, rollover_cap FROM allowance_terms
             WHERE account_id = $1 AND allowance_id = $2 AND effective_from <= $3
             ORDER BY effective_from DESC LIMIT 1",
            &[&account, &allowance, &at],
        )
        .await?
        .map(|r| {
            (
                r.get(0),
                r.get(1),
                AllowanceTerms {
                    amount: r.get(2),
                    period: period(&r, 3),
                    rollover_cap: r.get(4),
                },
            )
        }))
}

/// The first period start after `at` on the grid from `anchor`.
async fn period_after(
    tx: &Transaction<'_>,
    anchor: DateTime<Utc>,
    period: Period,
    at: DateTime<Utc>,
) -> Result<DateTime<Utc>> {
    Ok(tx
        .query_one(
            "SELECT holdfast_period_after($1, $2, $3)",
            &[&anchor, &period.as_str(), &at],
        )
        .await?
        .get(0))
}

impl Ledger {
    /// Create an allowance on account `account`. Its first period starts at
    /// the anchor; the reconciler issues each period once it has begun. The
    /// same `allowance_id` with the terms it has now (and the same anchor,
    /// when one is given) replays; otherwise it fails with
    /// [`LedgerError::AllowanceConflict`].
    pub async fn create_allowance(&self, account: &str, spec: &AllowanceSpec) -> Result<Allowed> {
        valid_id(account)?;
        spec.terms.validate()?;
        if let Some(id) = &spec.allowance_id {
            valid_allowance_id(id)?;
        }
        let id = spec
            .allowance_id
            .clone()
            .unwrap_or_else(|| format!("a-{}", Uuid::new_v4()));
        let terms = spec.terms;
        let replayed = self
            .retrying("create allowance", || async {
                let mut client = self.pool.get().await?;
                let tx = client.transaction().await?;
                lock_account(&tx, account).await?;
                // Whole seconds, in UTC whatever the session's time zone.
                let created = tx
                    .query_opt(
                        "INSERT INTO allowances (account_id, id, anchor, next_period_start)
                         SELECT $1, $2, x.anchor, x.anchor FROM (
                             SELECT date_trunc('second', COALESCE($3::timestamptz, now()) AT TIME ZONE 'UTC')
                                    AT TIME ZONE 'UTC' AS anchor) x
                         WHERE x.anchor >= now() - make_interval(days => $4)
                         ON CONFLICT (account_id, id) DO NOTHING
                         RETURNING anchor",
                        &[&account, &id, &spec.anchor, &MAX_BACKDATE_DAYS],
                    )
                    .await?;
                let Some(created) = created else {
                    return match same_terms(&tx, account, &id, &terms, spec.anchor).await? {
                        Some(true) => Ok(true),
                        Some(false) => Err(LedgerError::AllowanceConflict {
                            account: account.into(),
                            allowance: id.clone(),
                        }),
                        None => Err(LedgerError::Invalid(format!(
                            "anchor must be at most {MAX_BACKDATE_DAYS} days in the past"
                        ))),
                    };
                };
                let anchor: DateTime<Utc> = created.get(0);
                tx.execute(
                    "INSERT INTO allowance_terms
                         (account_id, allowance_id, effective_from, amount, period, anchor, rollover_cap)
                     VALUES ($1, $2, $3, $4, $5, $3, $6)",
                    &[
                        &account,
                        &id,
                        &anchor,
                        &terms.amount,
                        &terms.period.as_str(),
                        &terms.rollover_cap,
                    ],
                )
                .await?;
                tx.commit().await?;
                Ok(false)
            })
            .await?;
        Ok(Allowed {
            allowance: self.allowance(account, &id).await?,
            replayed,
        })
    }

    /// New terms for allowance `allowance` of `account`, from its next
    /// period on (the period under way keeps its grant and its terms; before
    /// the first period begins, the first period's terms are replaced). A
    /// change of `period` starts the new grid at that next period. Terms
    /// equal to the current ones withdraw a pending change.
    pub async fn change_allowance(
        &self,
        account: &str,
        allowance: &str,
        terms: &AllowanceTerms,
    ) -> Result<Allowance> {
        valid_id(account)?;
        valid_allowance_id(allowance)?;
        terms.validate()?;
        self.retrying("change allowance", || async {
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            lock_account(&tx, account).await?;
            let (state, at) = lock_allowance(&tx, account, allowance).await?;
            if state != "active" {
                return Err(LedgerError::WrongState(format!(
                    "allowance `{allowance}` of account `{account}` is stopped; create a new allowance"
                )));
            }
            match terms_at(&tx, account, allowance, at).await? {
                // The first period has not begun: it starts with the new terms.
                None => {
                    tx.execute(
                        "UPDATE allowance_terms SET amount = $3, period = $4, rollover_cap = $5
                         WHERE account_id = $1 AND allowance_id = $2",
                        &[
                            &account,
                            &allowance,
                            &terms.amount,
                            &terms.period.as_str(),
                            &terms.rollover_cap,
                        ],
                    )
                    .await?;
                }
                Some((_, anchor, current)) => {
                    // At most one pending change: this one replaces it.
                    tx.execute(
                        "DELETE FROM allowance_terms
                         WHERE account_id = $1 AND allowance_id = $2 AND effective_from > $3",
                        &[&account, &allowance, &at],
                    )
                    .await?;
                    if current != *terms {
                        let from = period_after(&tx, anchor, current.period, at).await?;
                        // The same grid when the period stays; a new one from there otherwise.
                        let grid = if terms.period == current.period { anchor } else { from };
                        tx.execute(
                            "INSERT INTO allowance_terms
                                 (account_id, allowance_id, effective_from, amount, period, anchor, rollover_cap)
                             VALUES ($1, $2, $3, $4, $5, $6, $7)",
                            &[
                                &account,
                                &allowance,
                                &from,
                                &terms.amount,
                                &terms.period.as_str(),
                                &grid,
                                &terms.rollover_cap,
                            ],
                        )
                        .await?;
                    }
                }
            }
            tx.execute(
                "UPDATE allowances SET updated_at = now() WHERE account_id = $1 AND id = $2",
                &[&account, &allowance],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
        .await?;
        self.allowance(account, allowance).await
    }

    /// Stop allowance `allowance` of `account` after its current period: the
    /// current period's grant stays, no later period is issued (before the
    /// first period begins: none is). Stopping a stopped allowance changes
    /// nothing and reports it as it is.
    pub async fn stop_allowance(&self, account: &str, allowance: &str) -> Result<Allowance> {
        valid_id(account)?;
        valid_allowance_id(allowance)?;
        self.retrying("stop allowance", || async {
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            lock_account(&tx, account).await?;
            let (state, at) = lock_allowance(&tx, account, allowance).await?;
            if state != "active" {
                return Ok(());
            }
            let stops_at: DateTime<Utc> = match terms_at(&tx, account, allowance, at).await? {
                None => tx
                    .query_one(
                        "SELECT anchor FROM allowances WHERE account_id = $1 AND id = $2",
                        &[&account, &allowance],
                    )
                    .await?
                    .get(0),
                Some((_, anchor, current)) => {
                    tx.execute(
                        "DELETE FROM allowance_terms
                         WHERE account_id = $1 AND allowance_id = $2 AND effective_from > $3",
                        &[&account, &allowance, &at],
                    )
                    .await?;
                    period_after(&tx, anchor, current.period, at).await?
                }
            };
            tx.execute(
                "UPDATE allowances SET state = 'stopped', stops_at = $3, updated_at = now()
                 WHERE account_id = $1 AND id = $2",
                &[&account, &allowance, &stops_at],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
        .await?;
        self.allowance(account, allowance).await
    }

    /// The allowances of account `account`, oldest first.
    pub async fn allowances(&self, account: &str) -> Result<Vec<Allowance>> {
        self.retrying("read allowances", || async {
            let client = self.pool.get().await?;
            Ok(client
                .query(
                    &format!("{ALLOWANCE_VIEW} ORDER BY a.created_at, a.id"),
                    &[&account],
                )
                .await?
                .iter()
                .map(allowance_row)
                .collect())
        })
        .await
    }

    /// One allowance of account `account`.
    pub async fn allowance(&self, account: &str, allowance: &str) -> Result<Allowance> {
        self.retrying("read allowance", || async {
            let client = self.pool.get().await?;
            client
                .query_opt(
                    &format!("{ALLOWANCE_VIEW} AND a.id = $2"),
                    &[&account, &allowance],
                )
                .await?
                .map(|r| allowance_row(&r))
                .ok_or_else(|| {
                    LedgerError::NotFound(format!(
                        "account `{account}` has no allowance `{allowance}`"
                    ))
                })
        })
        .await
    }

    /// Issue the periods that have begun of up to `limit` allowances, each
    /// allowance's periods in order, every one of them exactly once (several
    /// reconcilers may run this at once). Returns the credits issued (not
    /// counting rollovers, which move credits, and add none).
    ///
    /// An allowance the database refuses to issue (its balance would pass
    /// the largest number of credits) is logged and left for the next
    /// sweep; the others go on.
    pub async fn issue_allowances(&self, limit: i64) -> Result<i64> {
        let due: Vec<(String, String)> = self
            .retrying("find allowances to issue", || async {
                let client = self.pool.get().await?;
                Ok(client
                    .query(
                        "SELECT account_id, id FROM allowances
                         WHERE next_period_start <= now()
                           AND (stops_at IS NULL OR next_period_start < stops_at)
                         ORDER BY next_period_start, account_id, id LIMIT $1",
                        &[&limit],
                    )
                    .await?
                    .iter()
                    .map(|r| (r.get(0), r.get(1)))
                    .collect())
            })
            .await?;
        let mut total = 0;
        for (account, allowance) in &due {
            loop {
                let issued = match self.issue_allowance(account, allowance).await {
                    Ok(issued) => issued,
                    Err(e) if e.is_transient() || matches!(e, LedgerError::Forbidden(_)) => {
                        return Err(e)
                    }
                    Err(e) => {
                        refused(account, allowance, &e);
                        break;
                    }
                };
                for i in &issued {
                    tracing::info!(account = %i.account_id, allowance = %i.allowance_id,
                        grant = %i.grant_id, credits = i.amount, rolled_over = i.rolled_over,
                        "allowance period issued");
                    crate::telemetry::record::granted(GrantSource::Plan, i.amount);
                    total += i.amount;
                }
                if issued.len() < PERIODS_PER_TRANSACTION as usize {
                    break;
                }
            }
        }
        Ok(total)
    }

    /// `holdfast_issue_allowance`: the due periods of one allowance, up to
    /// [`PERIODS_PER_TRANSACTION`] of them, in one transaction.
    async fn issue_allowance(&self, account: &str, allowance: &str) -> Result<Vec<Issued>> {
        self.retrying("issue allowance", || async {
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            let rows = tx
                .query(
                    "SELECT grant_id, period_start, amount, rolled_over
                     FROM holdfast_issue_allowance($1, $2, $3)",
                    &[&account, &allowance, &PERIODS_PER_TRANSACTION],
                )
                .await?;
            tx.commit().await?;
            Ok(rows
                .iter()
                .map(|r| Issued {
                    account_id: account.into(),
                    allowance_id: allowance.into(),
                    grant_id: r.get(0),
                    period_start: r.get(1),
                    amount: r.get(2),
                    rolled_over: r.get(3),
                })
                .collect())
        })
        .await
    }
}

/// Log an allowance the database refused to issue.
fn refused(account: &str, allowance: &str, e: &LedgerError) {
    let overflow = matches!(e, LedgerError::Database(db)
        if db.code() == Some(&SqlState::NUMERIC_VALUE_OUT_OF_RANGE));
    if overflow {
        tracing::warn!(%account, %allowance,
            "allowance not issued: the account's balance would pass the largest number of credits; trying again next sweep");
    } else {
        tracing::error!(%account, %allowance, error = %e,
            "allowance not issued; trying again next sweep");
    }
}

/// Whether allowance `allowance` of `account` has the terms `terms` now
/// (its latest terms) and, when `anchor` is given, that anchor; `None` if
/// there is no such allowance (the insert was refused for its anchor).
async fn same_terms(
    tx: &Transaction<'_>,
    account: &str,
    allowance: &str,
    terms: &AllowanceTerms,
    anchor: Option<DateTime<Utc>>,
) -> Result<Option<bool>> {
    let Some(row) = tx
        .query_opt(
            "SELECT a.anchor, t.amount, t.period, t.rollover_cap FROM allowances a
             CROSS JOIN LATERAL (
                 SELECT amount, period, rollover_cap FROM allowance_terms t
                 WHERE t.account_id = a.account_id AND t.allowance_id = a.id
                 ORDER BY t.effective_from DESC LIMIT 1) t
             WHERE a.account_id = $1 AND a.id = $2",
            &[&account, &allowance],
        )
        .await?
    else {
        return Ok(None);
    };
    let stored: DateTime<Utc> = row.get(0);
    let latest = AllowanceTerms {
        amount: row.get(1),
        period: period(&row, 2),
        rollover_cap: row.get(3),
    };
    Ok(Some(
        latest == *terms && anchor.is_none_or(|a| a.timestamp() == stored.timestamp()),
    ))
}
