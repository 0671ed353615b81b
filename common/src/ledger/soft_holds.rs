//! Soft holds: credits set aside between a preview and the click, for a TTL.
//! A batch naming the hold's `reservation_id` consumes it (see `reserve`);
//! otherwise the reconciler expires it once its deadline has passed, never
//! before, and the credits come back exactly once.

use std::time::Duration;

use tokio_postgres::Row;
use uuid::Uuid;

use super::grants::{self, Unused};
use super::{HoldState, Ledger, LedgerError, Result};
use crate::messages::Reservation;

const SELECT: &str = "SELECT h.id::text, h.account_id, h.amount, h.state,
        to_char(h.expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), b.id,
        (SELECT l.spender_id FROM hold_spenders l WHERE l.hold_id = h.id ORDER BY l.depth DESC LIMIT 1)
    FROM holds h LEFT JOIN batches b ON b.hold_id = h.id";

fn reservation(r: &Row) -> Reservation {
    Reservation {
        reservation_id: r.get(0),
        account_id: r.get(1),
        amount: r.get(2),
        state: r.get(3),
        expires_at: r.get(4),
        batch_id: r.get(5),
        spender_id: r.get(6),
    }
}

fn parse_id(id: &str) -> Result<Uuid> {
    id.parse()
        .map_err(|_| LedgerError::NotFound(format!("no reservation `{id}`")))
}

impl Ledger {
    /// Hold `amount` credits of `account_id` for `ttl`, or fail with
    /// [`LedgerError::Insufficient`] holding nothing.
    pub async fn reserve_soft(
        &self,
        account_id: &str,
        amount: i64,
        ttl: Duration,
    ) -> Result<Reservation> {
        self.reserve_soft_for(account_id, None, amount, ttl).await
    }

    /// Like [`Ledger::reserve_soft`], charged to `spender` (and every
    /// spender above it) when given: the amount must fit each level's
    /// remaining limit too, else [`LedgerError::Insufficient`] names the
    /// tightest level's remaining as `available`.
    pub async fn reserve_soft_for(
        &self,
        account_id: &str,
        spender: Option<&str>,
        amount: i64,
        ttl: Duration,
    ) -> Result<Reservation> {
        if amount <= 0 {
            return Err(LedgerError::Invalid(format!(
                "amount must be a positive number of credits, got {amount}"
            )));
        }
        let secs = ttl.as_secs_f64();
        let id: Uuid = self
            .retrying("reserve soft hold", || async {
                let mut client = self.pool.get().await?;
                let tx = client.transaction().await?;
                // The lock first, then the grants in a statement of their
                // own: read in the locking statement they would be as they
                // were before any wait for the lock.
                tx.query_opt(
                    "SELECT 1 FROM accounts WHERE id = $1 FOR NO KEY UPDATE",
                    &[&account_id],
                )
                .await?
                .ok_or_else(|| LedgerError::UnknownAccount(account_id.into()))?;
                let mut available: i64 = tx
                    .query_one("SELECT holdfast_available($1)", &[&account_id])
                    .await?
                    .get(0);
                if let Some(s) = spender {
                    let path = super::spenders::read_paths(&tx, &[(account_id, s)])
                        .await?
                        .remove(&(account_id.to_string(), s.to_string()))
                        .ok_or_else(|| LedgerError::UnknownSpender {
                            account: account_id.into(),
                            spender: s.into(),
                        })?;
                    if let Some(room) = path.iter().filter_map(|l| l.remaining()).min() {
                        available = available.min(room);
                    }
                }
                if amount > available {
                    return Err(LedgerError::Insufficient {
                        requested: amount,
                        available,
                    });
                }
                let id: Uuid = tx
                    .query_one(
                        "INSERT INTO holds (account_id, amount, expires_at)
                         VALUES ($1, $2, now() + make_interval(secs => $3)) RETURNING id",
                        &[&account_id, &amount, &secs],
                    )
                    .await?
                    .get(0);
                grants::take(
                    &tx,
                    account_id,
                    &[id],
                    &[None],
                    &[amount],
                    Some("soft hold"),
                )
                .await?;
                if let Some(s) = spender {
                    tx.execute(
                        "SELECT holdfast_spender_take($1, $2, $3, $4)",
                        &[&vec![account_id], &vec![id], &vec![s], &vec![amount]],
                    )
                    .await?;
                }
                tx.commit().await?;
                Ok(id)
            })
            .await?;
        crate::telemetry::record::soft_hold("reserved", amount);
        self.reservation(&id.to_string()).await
    }

    /// One soft hold (or any hold, by id).
    pub async fn reservation(&self, id: &str) -> Result<Reservation> {
        let uuid = parse_id(id)?;
        self.retrying("read reservation", || async {
            let client = self.pool.get().await?;
            let row = client
                .query_opt(&format!("{SELECT} WHERE h.id = $1"), &[&uuid])
                .await?
                .ok_or_else(|| LedgerError::NotFound(format!("no reservation `{id}`")))?;
            Ok(reservation(&row))
        })
        .await
    }

    /// The open holds of an account: soft holds and the holds of running batches.
    pub async fn open_holds(&self, account_id: &str) -> Result<Vec<Reservation>> {
        self.retrying("read holds", || async {
            let client = self.pool.get().await?;
            Ok(client
                .query(
                    &format!("{SELECT} WHERE h.account_id = $1 AND h.state = 'open' ORDER BY h.created_at"),
                    &[&account_id],
                )
                .await?
                .iter()
                .map(reservation)
                .collect())
        })
        .await
    }

    /// Cancel a soft hold that no batch has consumed: its credits return at
    /// once. Cancelling one that already closed or expired reports its state.
    pub async fn cancel_soft(&self, id: &str) -> Result<Reservation> {
        let uuid = parse_id(id)?;
        let released = self
            .retrying("cancel soft hold", || async {
                let mut client = self.pool.get().await?;
                let tx = client.transaction().await?;
                let row = tx
                    .query_opt(
                        "SELECT amount, state, expires_at IS NOT NULL FROM holds WHERE id = $1 FOR UPDATE",
                        &[&uuid],
                    )
                    .await?
                    .ok_or_else(|| LedgerError::NotFound(format!("no reservation `{id}`")))?;
                let (amount, state, soft): (i64, HoldState, bool) =
                    (row.get(0), row.get(1), row.get(2));
                if state != HoldState::Open {
                    return Ok(0);
                }
                if !soft {
                    return Err(LedgerError::WrongState(format!(
                        "reservation `{id}` is in use by a batch; cancel the batch instead"
                    )));
                }
                tx.execute(
                    "UPDATE holds SET state = 'closed', released = amount, close_reason = 'cancelled',
                                      closed_at = now(), expires_at = NULL
                     WHERE id = $1",
                    &[&uuid],
                )
                .await?;
                grants::resolve(&tx, uuid, 0, None, Unused::Release, "cancelled").await?;
                tx.commit().await?;
                Ok(amount)
            })
            .await?;
        if released > 0 {
            crate::telemetry::record::soft_hold("cancelled", released);
        }
        self.reservation(id).await
    }
}
