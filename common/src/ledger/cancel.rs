//! Cancel: stop a batch. Nothing new starts (workers settle the remaining
//! jobs as `cancelled` without running them), items already running finish
//! and are captured, and when the last one settles the hold closes and
//! everything not captured is released.

use serde::Serialize;

use super::close::{finish, ClosedBatch};
use super::{BatchState, Ledger, LedgerError, Result};

/// What a cancel request did.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Cancelled {
    pub batch_id: String,
    /// `cancelling` (items still running) or `cancelled` (closed now).
    pub state: BatchState,
    /// The close, when nothing was running.
    pub closed: Option<ClosedBatch>,
}

impl Ledger {
    /// Cancel `batch_id`. Idempotent while the batch is cancelling; a batch
    /// that already finished (or was denied) is [`LedgerError::WrongState`].
    pub async fn cancel_batch(&self, batch_id: &str) -> Result<Cancelled> {
        let cancelled = self
            .retrying("cancel batch", || async {
                let mut client = self.pool.get().await?;
                let tx = client.transaction().await?;
                let state: BatchState = tx
                    .query_opt("SELECT state FROM batches WHERE id = $1 FOR UPDATE", &[&batch_id])
                    .await?
                    .ok_or_else(|| LedgerError::NotFound(format!("no batch `{batch_id}`")))?
                    .get(0);
                match state {
                    BatchState::Granted | BatchState::Dispatched => {}
                    BatchState::Cancelling => {
                        return Ok(Cancelled { batch_id: batch_id.into(), state, closed: None });
                    }
                    other => {
                        return Err(LedgerError::WrongState(format!(
                            "batch `{batch_id}` is {other}; only a running batch can be cancelled"
                        )))
                    }
                }
                // Items waiting for a later chunk were never held: they are skipped.
                tx.execute(
                    "UPDATE items SET state = 'skipped', reason = 'cancelled' WHERE batch_id = $1 AND state = 'queued'",
                    &[&batch_id],
                )
                .await?;
                let all_settled: bool = tx
                    .query_one(
                        "UPDATE batches SET state = 'cancelling', cancel_requested_at = now() WHERE id = $1
                         RETURNING succeeded + failed + cancelled = run_count",
                        &[&batch_id],
                    )
                    .await?
                    .get(0);
                let mut closed = None;
                if all_settled {
                    closed = finish(&tx, &[batch_id.to_string()], self.dispatch_grace).await?.closed.pop();
                }
                tx.commit().await?;
                let state = if closed.is_some() { BatchState::Cancelled } else { BatchState::Cancelling };
                Ok(Cancelled { batch_id: batch_id.into(), state, closed })
            })
            .await?;
        if let Some(c) = &cancelled.closed {
            self.wake_relay();
            crate::telemetry::record::closed(std::slice::from_ref(c));
        }
        tracing::info!(%batch_id, state = %cancelled.state, "batch cancel requested");
        Ok(cancelled)
    }
}
