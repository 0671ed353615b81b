//! Expiry: soft holds past their TTL and batches past their execution
//! deadline. Every query claims rows with `FOR UPDATE SKIP LOCKED`, so
//! several reconcilers share the work instead of repeating it, and a hold
//! resolves exactly once whoever gets there first. Expiry is never early.

use deadpool_postgres::Transaction;
use uuid::Uuid;

use super::close::{close_batches, ClosedBatch};
use super::grants::{self, Unused};
use super::{BatchState, Ledger, Result};

/// Expire soft holds already locked by the caller: state `expired`, the whole
/// amount released to `available`, one `expire` journal row each.
/// Returns the amounts released, one per hold expired.
pub(super) async fn expire_locked(tx: &Transaction<'_>, ids: &[Uuid]) -> Result<Vec<i64>> {
    let rows = tx
        .query(
            "UPDATE holds SET state = 'expired', released = amount, close_reason = 'ttl', closed_at = now()
             WHERE id = ANY($1) AND state = 'open' AND expires_at IS NOT NULL
             RETURNING id, account_id, amount",
            &[&ids],
        )
        .await?;
    // Each back to its grants, accounts in id order (the lock order).
    let mut expired: Vec<(String, Uuid, i64)> = rows
        .iter()
        .map(|r| (r.get(1), r.get(0), r.get(2)))
        .collect();
    expired.sort();
    for (_, hold, _) in &expired {
        grants::resolve(tx, *hold, 0, None, Unused::Expire, "ttl").await?;
    }
    let amounts = expired.iter().map(|(.., amount)| *amount).collect();
    Ok(amounts)
}

impl Ledger {
    /// Expire soft holds whose TTL has passed (never before: `expires_at <= now()`
    /// in the database's clock). Several reconcilers share the work.
    pub async fn expire_soft_holds(&self, limit: i64) -> Result<usize> {
        let expired = self
            .retrying("expire soft holds", || async {
                let mut client = self.pool.get().await?;
                let tx = client.transaction().await?;
                let ids: Vec<Uuid> = tx
                    .query(
                        "SELECT id FROM holds
                         WHERE state = 'open' AND expires_at IS NOT NULL AND expires_at <= now()
                         ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                        &[&limit],
                    )
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                let released = expire_locked(&tx, &ids).await?;
                tx.commit().await?;
                Ok(released)
            })
            .await?;
        if !expired.is_empty() {
            tracing::info!(
                expired = expired.len(),
                "soft holds expired; credits released"
            );
        }
        for amount in &expired {
            crate::telemetry::record::soft_hold("expired", *amount);
        }
        Ok(expired.len())
    }

    /// Close batches past their execution deadline: their unsettled items fail
    /// (not charged) and the rest of the hold is released.
    pub async fn expire_overdue(&self, limit: i64) -> Result<Vec<ClosedBatch>> {
        let closed = self
            .retrying("expire overdue", || async {
                let mut client = self.pool.get().await?;
                let tx = client.transaction().await?;
                let ids: Vec<String> = tx
                    .query(
                        "SELECT id FROM batches
                         WHERE state IN ('granted', 'dispatched', 'cancelling') AND deadline_at < now()
                         ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                        &[&limit],
                    )
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                if ids.is_empty() {
                    return Ok(vec![]);
                }
                tx.execute(
                    "WITH failed AS (
                         UPDATE items SET state = 'failed', reason = 'deadline', settled_at = now()
                         WHERE batch_id = ANY($1) AND state = 'pending'
                         RETURNING batch_id)
                     UPDATE batches b SET failed = b.failed + f.n
                     FROM (SELECT batch_id, count(*)::int4 AS n FROM failed GROUP BY batch_id) f
                     WHERE b.id = f.batch_id",
                    &[&ids],
                )
                .await?;
                tx.execute(
                    "UPDATE items SET state = 'skipped', reason = 'deadline' WHERE batch_id = ANY($1) AND state = 'queued'",
                    &[&ids],
                )
                .await?;
                let closed = close_batches(&tx, &ids, BatchState::Expired, "deadline").await?;
                tx.commit().await?;
                Ok(closed)
            })
            .await?;
        if !closed.is_empty() {
            self.wake_relay();
        }
        crate::telemetry::record::closed(&closed);
        Ok(closed)
    }
}
