//! Dispatch in the ledger: the jobs of a granted batch still to be
//! published, the record that they were, and the claim a reconciler takes on
//! a batch whose coordinator died before the broker confirmed every job.

use std::time::Duration;

use serde_json::Value;

use super::{Cached, Ledger, LedgerError, Result};

/// An item job still to be (re-)published.
#[derive(Clone, Debug)]
pub struct PendingJob {
    pub item_id: String,
    pub reserved: i64,
    pub payload: Value,
}

impl Ledger {
    /// The items of `batch_id` still pending, in request order, with the account.
    pub async fn pending_jobs(&self, batch_id: &str) -> Result<(String, Vec<PendingJob>)> {
        self.retrying("pending jobs", || async {
            let client = self.pool.get().await?;
            let account: String = client
                .query_opt("SELECT account_id FROM batches WHERE id = $1", &[&batch_id])
                .await?
                .ok_or_else(|| LedgerError::Invalid(format!("no batch `{batch_id}`")))?
                .get(0);
            let jobs = client
                .query(
                    "SELECT item_id, reserved, payload FROM items
                     WHERE batch_id = $1 AND state = 'pending' ORDER BY position",
                    &[&batch_id],
                )
                .await?
                .iter()
                .map(|r| PendingJob {
                    item_id: r.get(0),
                    reserved: r.get(1),
                    payload: r.get(2),
                })
                .collect();
            Ok((account, jobs))
        })
        .await
    }

    /// Record that the broker confirmed every job of `batch_ids`.
    pub async fn mark_dispatched(&self, batch_ids: &[&str]) -> Result<()> {
        if batch_ids.is_empty() {
            return Ok(());
        }
        self.retrying("mark dispatched", || async {
            let client = self.pool.get().await?;
            client
                .execute_cached(
                    "UPDATE batches SET dispatched_at = now(), dispatch_lease = NULL,
                            state = CASE WHEN state = 'granted' THEN 'dispatched' ELSE state END
                     WHERE id = ANY($1) AND state IN ('granted', 'cancelling') AND dispatched_at IS NULL",
                    &[&batch_ids],
                )
                .await?;
            Ok(())
        })
        .await
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
}
