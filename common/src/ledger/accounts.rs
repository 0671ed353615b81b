//! Accounts: create, grant credits, read balances.

use serde::Serialize;
use utoipa::ToSchema;

use super::grants::GrantSpec;
use super::{Ledger, LedgerError, Result};

/// An account's credits: `balance` (what its grants have left), `held` (its open
/// holds) and `available` (what its active grants not past their expiry have
/// left, less what holds took of them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct Account {
    pub id: String,
    pub balance: i64,
    pub held: i64,
    pub available: i64,
    pub open_holds: i64,
}

/// One journal row, as `account show` and the demo print it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct JournalEntry {
    pub id: i64,
    pub at: String,
    pub kind: String,
    pub amount: i64,
    pub balance_delta: i64,
    pub held_delta: i64,
    pub batch_id: Option<String>,
    pub item_id: Option<String>,
    pub note: Option<String>,
}

pub(super) fn valid_id(id: &str) -> Result<()> {
    if id.is_empty() || id.chars().count() > 128 || id.chars().any(char::is_control) {
        return Err(LedgerError::Invalid(
            "account id must be 1 to 128 printable characters".into(),
        ));
    }
    Ok(())
}

impl Ledger {
    /// Create an account with a zero balance; `AccountExists` if it is there.
    pub async fn create_account(&self, id: &str) -> Result<Account> {
        valid_id(id)?;
        self.retrying("create account", || async {
            let client = self.pool.get().await?;
            let n = client
                .execute(
                    "INSERT INTO accounts (id) VALUES ($1) ON CONFLICT (id) DO NOTHING",
                    &[&id],
                )
                .await?;
            if n == 0 {
                return Err(LedgerError::AccountExists(id.into()));
            }
            Ok(())
        })
        .await?;
        self.account(id).await
    }

    /// Add `amount` manual credits that never expire (a grant with a new
    /// id), creating the account if `create` is set and it does not exist.
    /// [`Ledger::add_grant`] takes the other terms of a grant.
    pub async fn grant(
        &self,
        id: &str,
        amount: i64,
        note: Option<&str>,
        create: bool,
    ) -> Result<Account> {
        let spec = GrantSpec {
            note: note.map(str::to_owned),
            ..GrantSpec::manual(amount)
        };
        Ok(self.add_grant(id, &spec, create).await?.account)
    }

    /// Balances of one account.
    pub async fn account(&self, id: &str) -> Result<Account> {
        self.retrying("read account", || async {
            let client = self.pool.get().await?;
            let row = client
                .query_opt(
                    "SELECT a.id, a.balance, a.held,
                            (SELECT count(*) FROM holds h WHERE h.account_id = a.id AND h.state = 'open'),
                            holdfast_available(a.id)
                     FROM accounts a WHERE a.id = $1",
                    &[&id],
                )
                .await?
                .ok_or_else(|| LedgerError::UnknownAccount(id.into()))?;
            let (balance, held): (i64, i64) = (row.get(1), row.get(2));
            Ok(Account {
                id: row.get(0),
                balance,
                held,
                // Not `balance - held`: a grant past its expiry counts for
                // nothing even before the reconciler's sweep expires it.
                available: row.get(4),
                open_holds: row.get(3),
            })
        })
        .await
    }

    /// The journal of one account, oldest first.
    pub async fn journal(&self, id: &str) -> Result<Vec<JournalEntry>> {
        self.retrying("read journal", || async {
            let client = self.pool.get().await?;
            Ok(client
                .query(
                    "SELECT id, to_char(at AT TIME ZONE 'UTC', 'HH24:MI:SS.MS'), kind, amount, balance_delta,
                            held_delta, batch_id, item_id, note
                     FROM journal WHERE account_id = $1 ORDER BY id",
                    &[&id],
                )
                .await?
                .iter()
                .map(|r| JournalEntry {
                    id: r.get(0),
                    at: r.get(1),
                    kind: r.get(2),
                    amount: r.get(3),
                    balance_delta: r.get(4),
                    held_delta: r.get(5),
                    batch_id: r.get(6),
                    item_id: r.get(7),
                    note: r.get(8),
                })
                .collect())
        })
        .await
    }
}
