//! The ledger's totals behind the reconciler's gauges.

use super::{Ledger, Result};

impl Ledger {
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
