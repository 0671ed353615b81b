//! The reconciler's ledger work. Every query claims rows with
//! `FOR UPDATE SKIP LOCKED`, so several reconcilers share the work instead of
//! repeating it, and a batch closes exactly once whoever gets there first.

use std::time::Duration;

use super::settle::{close_batches, finish, ClosedBatch};
use super::{Ledger, Result};

impl Ledger {
    /// Finish batches whose items are all settled but which are still open (a
    /// safety net: the worker settling the last item normally does it). Returns
    /// the closed batches and the sequential ones whose next chunk was reserved.
    pub async fn close_finished(&self, limit: i64) -> Result<(Vec<ClosedBatch>, Vec<String>)> {
        let finished = self
            .retrying("close finished", || async {
                let mut client = self.pool.get().await?;
                let tx = client.transaction().await?;
                let ids: Vec<String> = tx
                    .query(
                        "SELECT id FROM batches
                         WHERE state IN ('granted', 'dispatched', 'cancelling')
                           AND succeeded + failed + cancelled = run_count
                         ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                        &[&limit],
                    )
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                let finished = finish(&tx, &ids).await?;
                tx.commit().await?;
                Ok(finished)
            })
            .await?;
        crate::telemetry::record::closed(&finished.closed);
        Ok((finished.closed, finished.advanced))
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
                let closed = close_batches(&tx, &ids, "expired", "deadline").await?;
                tx.commit().await?;
                Ok(closed)
            })
            .await?;
        crate::telemetry::record::closed(&closed);
        Ok(closed)
    }

    /// Claim granted batches whose dispatch lease ran out (their coordinator
    /// died before the broker confirmed every job). The claim lasts `lease`;
    /// the claimer re-publishes the pending jobs and marks them dispatched.
    pub async fn claim_undispatched(&self, lease: Duration, limit: i64) -> Result<Vec<String>> {
        let secs = lease.as_secs_f64();
        self.retrying("claim undispatched", || async {
            let client = self.pool.get().await?;
            Ok(client
                .query(
                    "UPDATE batches SET dispatch_lease = now() + make_interval(secs => $1)
                     WHERE id IN (
                         SELECT id FROM batches
                         WHERE (state = 'granted' OR (state = 'cancelling' AND dispatched_at IS NULL))
                           AND (dispatch_lease IS NULL OR dispatch_lease < now())
                         ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED)
                     RETURNING id",
                    &[&secs, &limit],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect())
        })
        .await
    }

    /// Items of granted batches not yet fully dispatched, and open holds past
    /// their deadline (a soft hold's TTL, a batch's execution deadline), per
    /// the ledger (for gauges).
    pub async fn backlog_totals(&self) -> Result<(i64, i64)> {
        self.retrying("backlog totals", || async {
            let client = self.pool.get().await?;
            let r = client
                .query_one(
                    "SELECT (SELECT COALESCE(sum(run_count), 0)::int8 FROM batches WHERE state = 'granted'),
                            (SELECT count(*) FROM holds h LEFT JOIN batches b ON b.hold_id = h.id
                             WHERE h.state = 'open' AND (h.expires_at < now() OR b.deadline_at < now()))",
                    &[],
                )
                .await?;
            Ok((r.get(0), r.get(1)))
        })
        .await
    }

    /// Credits held and holds open, per the ledger (for gauges).
    pub async fn held_totals(&self) -> Result<(i64, i64)> {
        self.retrying("held totals", || async {
            let client = self.pool.get().await?;
            let r = client
                .query_one(
                    "SELECT COALESCE(sum(amount), 0)::int8, count(*) FROM holds WHERE state = 'open'",
                    &[],
                )
                .await?;
            Ok((r.get(0), r.get(1)))
        })
        .await
    }
}
