//! Spenders: a tree of budgets inside an account (a workspace's teams, their
//! members, their keys), each with an optional limit per period. A batch
//! charged to a spender fits only if the account and every spender from it
//! up to the root cover it; the hold counts whole at every level, in the
//! period each level is in when the batch starts, and resolves at every level
//! when it resolves (captured: used; the rest: given back).
//!
//! The bookkeeping is in the database (`holdfast_spender_take`,
//! `holdfast_spender_grow`, `holdfast_spender_resolve` in
//! migrations/V10__spenders.sql), always after the account's row lock:
//! account, then spenders root to leaf. This module manages the tree and
//! reads the levels a decision prices against.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::Serialize;
use tokio_postgres::error::SqlState;
use utoipa::ToSchema;

use super::accounts::valid_id;
use super::reserve::rfc3339;
use super::{Cached, Ledger, LedgerError, Result};
use crate::messages::{Level, LevelKind, LimitPeriod};

/// At most this many levels from a root spender to the deepest one below it.
pub const MAX_SPENDER_DEPTH: usize = 8;

/// A spender to create or change (`PUT`): the whole definition.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpenderSpec {
    /// The spender above it (same account); none: a root.
    pub parent: Option<String>,
    /// What it is to people (`team`, `member`, `key`, ...); default `spender`.
    pub kind: Option<String>,
    /// Credits per period; none: no limit (usage is still counted).
    pub limit: Option<i64>,
    pub period: LimitPeriod,
    /// Start of one period; none: calendar periods in UTC.
    pub anchor: Option<DateTime<Utc>>,
}

impl SpenderSpec {
    fn validate(&self, id: &str) -> Result<()> {
        check_spender_id(id).map_err(|r| LedgerError::Invalid(format!("spender_id {r}")))?;
        if let Some(p) = &self.parent {
            check_spender_id(p).map_err(|r| LedgerError::Invalid(format!("parent {r}")))?;
            if p == id {
                return Err(LedgerError::Invalid(
                    "parent: a spender cannot be its own parent".into(),
                ));
            }
        }
        if let Some(k) = &self.kind {
            if k.is_empty() || k.chars().count() > 32 || k.chars().any(char::is_control) {
                return Err(LedgerError::Invalid(
                    "kind must be 1 to 32 printable characters".into(),
                ));
            }
        }
        if let Some(l) = self.limit {
            if l < 0 {
                return Err(LedgerError::Invalid(format!(
                    "limit must be zero or more credits, got {l}"
                )));
            }
        }
        if self.anchor.is_some() && self.period == LimitPeriod::None {
            return Err(LedgerError::Invalid(
                "anchor: a limit with period none has no periods to anchor".into(),
            ));
        }
        if self.anchor.is_some_and(|a| a > Utc::now()) {
            return Err(LedgerError::Invalid(
                "anchor must not be in the future".into(),
            ));
        }
        Ok(())
    }
}

/// A spender id: 1 to 128 characters, none of them control characters.
pub fn check_spender_id(id: &str) -> std::result::Result<(), String> {
    if id.is_empty() || id.chars().count() > 128 || id.chars().any(char::is_control) {
        Err("must be 1 to 128 printable characters".into())
    } else {
        Ok(())
    }
}

/// One spender and its usage in its current period.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct Spender {
    pub spender_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    pub kind: String,
    /// Credits per period; absent: no limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<i64>,
    pub period: LimitPeriod,
    /// RFC 3339; absent: calendar periods in UTC.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anchor: Option<String>,
    /// Captured this period by batches charged to it or below it.
    pub used: i64,
    /// Held now by open batches of this period charged to it or below it.
    pub held: i64,
    /// `limit - used - held`, at least 0; absent: no limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remaining: Option<i64>,
    /// RFC 3339: the start of the current period.
    pub period_start: String,
    /// RFC 3339: when the usage starts again from 0; absent: never.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resets_at: Option<String>,
    /// The spenders directly below it.
    pub children: Vec<String>,
}

/// One level of a spender path as a decision reads it (root first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpenderLevel {
    pub spender_id: String,
    pub kind: String,
    pub limit: Option<i64>,
    pub period: LimitPeriod,
    pub resets_at: Option<DateTime<Utc>>,
    pub held: i64,
    pub used: i64,
}

impl SpenderLevel {
    /// What a batch may take at this level now; none: no limit.
    pub fn remaining(&self) -> Option<i64> {
        self.limit.map(|l| (l - self.used - self.held).max(0))
    }

    /// As a decision names it.
    pub fn level(&self) -> Level {
        Level {
            level: LevelKind::Spender,
            spender_id: Some(self.spender_id.clone()),
            kind: Some(self.kind.clone()),
            limit: self.limit,
            period: Some(self.period),
            used: Some(self.used),
            held: Some(self.held),
            remaining: self.remaining(),
            resets_at: self.resets_at.map(rfc3339),
        }
    }
}

/// The paths of (account, spender) pairs, root first, with their usage now:
/// a pair with no path is an unknown spender.
pub(super) const PATHS: &str =
    "SELECT r.account_id, r.spender_id, p.spender_id, p.kind, p.credit_limit,
            p.period, p.resets_at, p.held, p.used
     FROM unnest($1::text[], $2::text[]) AS r(account_id, spender_id)
     CROSS JOIN LATERAL holdfast_spender_path(r.account_id, r.spender_id, now()) p
     ORDER BY r.account_id, r.spender_id, p.depth";

/// Read the paths of `pairs` (account, spender) with [`PATHS`].
pub(super) async fn read_paths<C: GenericClient>(
    client: &C,
    pairs: &[(&str, &str)],
) -> Result<HashMap<(String, String), Vec<SpenderLevel>>> {
    let accounts: Vec<&str> = pairs.iter().map(|p| p.0).collect();
    let spenders: Vec<&str> = pairs.iter().map(|p| p.1).collect();
    let mut paths: HashMap<(String, String), Vec<SpenderLevel>> = HashMap::new();
    for r in client.query_cached(PATHS, &[&accounts, &spenders]).await? {
        let period: String = r.get(5);
        paths
            .entry((r.get(0), r.get(1)))
            .or_default()
            .push(SpenderLevel {
                spender_id: r.get(2),
                kind: r.get(3),
                limit: r.get(4),
                period: LimitPeriod::parse(&period).unwrap_or_default(),
                resets_at: r.get(6),
                held: r.get(7),
                used: r.get(8),
            });
    }
    Ok(paths)
}

const SPENDER_COLUMNS: &str = "s.id, s.parent_id, s.kind, s.credit_limit, s.period, s.anchor,
       COALESCE(u.used, 0), COALESCE(u.held, 0), p.period_start, p.resets_at,
       COALESCE((SELECT array_agg(c.id ORDER BY c.id) FROM spenders c
                 WHERE c.account_id = s.account_id AND c.parent_id = s.id), '{}')
     FROM spenders s
     CROSS JOIN LATERAL holdfast_spender_period(s.period, s.anchor, now()) p
     LEFT JOIN spender_usage u
       ON u.account_id = s.account_id AND u.spender_id = s.id AND u.period_start = p.period_start";

fn spender_row(r: &tokio_postgres::Row) -> Spender {
    let period: String = r.get(4);
    let limit: Option<i64> = r.get(3);
    let used: i64 = r.get(6);
    let held: i64 = r.get(7);
    Spender {
        spender_id: r.get(0),
        parent: r.get(1),
        kind: r.get(2),
        limit,
        period: LimitPeriod::parse(&period).unwrap_or_default(),
        anchor: r.get::<_, Option<DateTime<Utc>>>(5).map(rfc3339),
        used,
        held,
        remaining: limit.map(|l| (l - used - held).max(0)),
        period_start: rfc3339(r.get(8)),
        resets_at: r.get::<_, Option<DateTime<Utc>>>(9).map(rfc3339),
        children: r.get(10),
    }
}

/// What `PUT` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpenderPut {
    pub spender: Spender,
    /// The spender did not exist before.
    pub created: bool,
}

impl Ledger {
    /// Create or change spender `id` of `account`. Its usage stays: a new
    /// limit applies to what the current period has used already. Open holds
    /// keep counting against the spenders they were charged to, even when
    /// the spender moves to another parent.
    pub async fn put_spender(
        &self,
        account: &str,
        id: &str,
        spec: &SpenderSpec,
    ) -> Result<SpenderPut> {
        valid_id(account)?;
        spec.validate(id)?;
        let kind = spec.kind.clone().unwrap_or_else(|| "spender".into());
        let created = self
            .retrying("put spender", || async {
                let mut client = self.pool.get().await?;
                let tx = client.transaction().await?;
                lock_account(&tx, account).await?;
                if let Some(p) = &spec.parent {
                    let exists = tx
                        .query_opt(
                            "SELECT 1 FROM spenders WHERE account_id = $1 AND id = $2",
                            &[&account, p],
                        )
                        .await?;
                    if exists.is_none() {
                        return Err(LedgerError::Invalid(format!(
                            "parent: account `{account}` has no spender `{p}`"
                        )));
                    }
                }
                let row = tx
                    .query_one(
                        "INSERT INTO spenders (account_id, id, parent_id, kind, credit_limit, period, anchor)
                         VALUES ($1, $2, $3, $4, $5, $6, $7)
                         ON CONFLICT (account_id, id) DO UPDATE
                         SET parent_id = EXCLUDED.parent_id, kind = EXCLUDED.kind,
                             credit_limit = EXCLUDED.credit_limit, period = EXCLUDED.period,
                             anchor = EXCLUDED.anchor, updated_at = now()
                         RETURNING (xmax = 0)",
                        &[
                            &account,
                            &id,
                            &spec.parent,
                            &kind,
                            &spec.limit,
                            &spec.period.as_str(),
                            &spec.anchor,
                        ],
                    )
                    .await
                    .map_err(tree_error)?;
                tx.commit().await?;
                Ok(row.get::<_, bool>(0))
            })
            .await?;
        Ok(SpenderPut {
            spender: self.spender(account, id).await?,
            created,
        })
    }

    /// Every spender of `account`, roots first, then by id.
    pub async fn spenders(&self, account: &str) -> Result<Vec<Spender>> {
        self.retrying("read spenders", || async {
            let client = self.pool.get().await?;
            if client
                .query_opt("SELECT 1 FROM accounts WHERE id = $1", &[&account])
                .await?
                .is_none()
            {
                return Err(LedgerError::UnknownAccount(account.into()));
            }
            let rows = client
                .query(
                    &format!(
                        "SELECT {SPENDER_COLUMNS} WHERE s.account_id = $1
                         ORDER BY s.parent_id IS NOT NULL, s.id"
                    ),
                    &[&account],
                )
                .await?;
            Ok(rows.iter().map(spender_row).collect())
        })
        .await
    }

    /// Spender `id` of `account`.
    pub async fn spender(&self, account: &str, id: &str) -> Result<Spender> {
        self.retrying("read spender", || async {
            let client = self.pool.get().await?;
            let row = client
                .query_opt(
                    &format!("SELECT {SPENDER_COLUMNS} WHERE s.account_id = $1 AND s.id = $2"),
                    &[&account, &id],
                )
                .await?;
            match row {
                Some(r) => Ok(spender_row(&r)),
                None => Err(unknown(&client, account, id).await),
            }
        })
        .await
    }

    /// The levels spender `id` of `account` prices a batch against, root first.
    pub async fn spender_path(&self, account: &str, id: &str) -> Result<Vec<SpenderLevel>> {
        self.retrying("read spender path", || async {
            let client = self.pool.get().await?;
            let mut paths = read_paths(&client, &[(account, id)]).await?;
            match paths.remove(&(account.to_string(), id.to_string())) {
                Some(p) => Ok(p),
                None => Err(unknown(&client, account, id).await),
            }
        })
        .await
    }

    /// The spender levels a preview of a request charged to `spender` shows
    /// (root first); none without a spender.
    pub async fn spender_levels(&self, account: &str, spender: Option<&str>) -> Result<Vec<Level>> {
        match spender {
            None => Ok(vec![]),
            Some(s) => Ok(self
                .spender_path(account, s)
                .await?
                .iter()
                .map(SpenderLevel::level)
                .collect()),
        }
    }

    /// Remove spender `id` of `account`: refused while spenders are below it
    /// or open holds count against it. Its past usage stays in the ledger
    /// (and counts again if a spender of the same id is created in the same
    /// period).
    pub async fn delete_spender(&self, account: &str, id: &str) -> Result<()> {
        self.retrying("delete spender", || async {
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            lock_account(&tx, account).await?;
            let row = tx
                .query_opt(
                    "SELECT (SELECT count(*) FROM spenders c WHERE c.account_id = s.account_id AND c.parent_id = s.id),
                            (SELECT count(*) FROM hold_spenders l JOIN holds h ON h.id = l.hold_id
                             WHERE l.account_id = s.account_id AND l.spender_id = s.id AND h.state = 'open')
                     FROM spenders s WHERE s.account_id = $1 AND s.id = $2",
                    &[&account, &id],
                )
                .await?
                .ok_or_else(|| LedgerError::NotFound(format!("account `{account}` has no spender `{id}`")))?;
            let (children, open): (i64, i64) = (row.get(0), row.get(1));
            if children > 0 {
                return Err(LedgerError::WrongState(format!(
                    "spender `{id}` has {children} spender(s) below it; delete or move them first"
                )));
            }
            if open > 0 {
                return Err(LedgerError::WrongState(format!(
                    "spender `{id}` has {open} open hold(s); delete it when they have resolved"
                )));
            }
            tx.execute(
                "DELETE FROM spenders WHERE account_id = $1 AND id = $2",
                &[&account, &id],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }
}

/// Lock the account row (the first lock of everything that changes its
/// spenders), or say it does not exist.
async fn lock_account(tx: &deadpool_postgres::Transaction<'_>, account: &str) -> Result<()> {
    tx.query_opt(
        "SELECT 1 FROM accounts WHERE id = $1 FOR NO KEY UPDATE",
        &[&account],
    )
    .await?
    .ok_or_else(|| LedgerError::UnknownAccount(account.into()))?;
    Ok(())
}

/// Unknown account, or an account without spender `id`.
async fn unknown<C: GenericClient>(client: &C, account: &str, id: &str) -> LedgerError {
    match client
        .query_opt("SELECT 1 FROM accounts WHERE id = $1", &[&account])
        .await
    {
        Ok(None) => LedgerError::UnknownAccount(account.into()),
        Ok(Some(_)) => LedgerError::UnknownSpender {
            account: account.into(),
            spender: id.into(),
        },
        Err(e) => e.into(),
    }
}

/// The tree's refusals (a cycle, too deep) say what is wrong with the request.
fn tree_error(e: tokio_postgres::Error) -> LedgerError {
    match e.as_db_error() {
        Some(db) if e.code() == Some(&SqlState::CHECK_VIOLATION) => {
            LedgerError::Invalid(format!("parent: {}", db.message()))
        }
        _ => e.into(),
    }
}
