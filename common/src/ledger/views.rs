//! Reading batches: what a person sees in `batch show`, the figures of
//! progress events, and the states workers look up before running a job.

use std::collections::HashMap;

use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::close::figures_of;
use super::{BatchState, HoldState, ItemState, Ledger, Result};
use crate::messages::BatchFigures;

/// One item as `batch show` prints it.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ItemView {
    pub item_id: String,
    pub state: ItemState,
    pub estimated_cost: i64,
    pub reserved: i64,
    pub captured: i64,
    pub overrun: i64,
    pub reason: Option<String>,
}

/// A batch with its hold and items.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct BatchView {
    pub batch_id: String,
    pub account_id: String,
    pub mode: String,
    pub state: BatchState,
    pub hold_id: Option<String>,
    pub hold_state: Option<HoldState>,
    pub created_at: String,
    pub deadline_at: Option<String>,
    pub closed_at: Option<String>,
    pub figures: BatchFigures,
    /// The decision as it was sent (granted, or insufficient for a denied batch).
    #[schema(value_type = crate::messages::Decision)]
    pub decision: Value,
    pub items: Vec<ItemView>,
}

impl Ledger {
    /// Current figures of `batch_ids`: (batch, account, figures), in id order.
    pub async fn figures(&self, batch_ids: &[&str]) -> Result<Vec<(String, String, BatchFigures)>> {
        self.retrying("figures", || async {
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            let figures = figures_of(&tx, batch_ids).await?;
            tx.commit().await?;
            Ok(figures)
        })
        .await
    }

    /// Write a `batch.progress` event to the outbox for each of `batch_ids`
    /// still running with items pending, with its figures as they are now
    /// (a coalesced snapshot; a batch that closed has its `completed` event
    /// instead). The batch rows are locked (`FOR NO KEY UPDATE`, in id order,
    /// like every writer of a batch's events) so that the snapshot's row
    /// takes its place in the batch's event order: never after its
    /// `completed`. Returns how many were written.
    pub async fn write_progress(&self, batch_ids: &[&str]) -> Result<usize> {
        if batch_ids.is_empty() {
            return Ok(0);
        }
        let written = self
            .retrying("progress", || async {
                let mut client = self.pool.get().await?;
                let tx = client.transaction().await?;
                let open: Vec<String> = tx
                    .query(
                        "SELECT id FROM batches
                         WHERE id = ANY($1) AND state IN ('granted', 'dispatched', 'cancelling')
                         ORDER BY id FOR NO KEY UPDATE",
                        &[&batch_ids],
                    )
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                let open: Vec<&str> = open.iter().map(String::as_str).collect();
                let events: Vec<_> = figures_of(&tx, &open)
                    .await?
                    .iter()
                    .filter(|(.., f)| f.pending > 0)
                    .map(|(batch, account, f)| crate::outbox::progress(batch, account, f))
                    .collect();
                crate::outbox::write(&tx, &events).await?;
                tx.commit().await?;
                Ok(events.len())
            })
            .await?;
        if written > 0 {
            self.wake_relay();
        }
        Ok(written)
    }

    /// The state of each item and of its batch, keyed by (batch, item);
    /// items that do not exist are absent. Workers look before they run: a
    /// duplicate job must not pay for the work twice, and a cancelled batch
    /// starts nothing new. One query for a whole group of deliveries.
    pub async fn item_states(
        &self,
        items: &[(&str, &str)],
    ) -> Result<HashMap<(String, String), (ItemState, BatchState)>> {
        let batches: Vec<&str> = items.iter().map(|(b, _)| *b).collect();
        let ids: Vec<&str> = items.iter().map(|(_, i)| *i).collect();
        self.retrying("item state", || async {
            let client = self.pool.get().await?;
            Ok(client
                .query(
                    "SELECT i.batch_id, i.item_id, i.state, b.state
                     FROM unnest($1::text[], $2::text[]) AS t(batch_id, item_id)
                     JOIN items i ON i.batch_id = t.batch_id AND i.item_id = t.item_id
                     JOIN batches b ON b.id = i.batch_id",
                    &[&batches, &ids],
                )
                .await?
                .into_iter()
                .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3))))
                .collect())
        })
        .await
    }

    /// The state of each known batch among `batch_ids`, in one query on the
    /// batches' primary key. A worker asks this once per batch (and caches
    /// it briefly) for first deliveries, instead of looking each item up.
    pub async fn batch_states(&self, batch_ids: &[&str]) -> Result<HashMap<String, BatchState>> {
        self.retrying("batch state", || async {
            let client = self.pool.get().await?;
            Ok(client
                .query(
                    "SELECT id, state FROM batches WHERE id = ANY($1::text[])",
                    &[&batch_ids],
                )
                .await?
                .into_iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect())
        })
        .await
    }

    /// The account of a batch; `None` if unknown (a cheap look-up before
    /// acting on a batch for someone who may use some accounts only).
    pub async fn batch_account(&self, batch_id: &str) -> Result<Option<String>> {
        self.retrying("read batch account", || async {
            let client = self.pool.get().await?;
            let row = client
                .query_opt("SELECT account_id FROM batches WHERE id = $1", &[&batch_id])
                .await?;
            Ok(row.map(|r| r.get(0)))
        })
        .await
    }

    /// One batch with its hold, figures and items; `None` if unknown.
    pub async fn batch(&self, batch_id: &str) -> Result<Option<BatchView>> {
        self.retrying("read batch", || async {
            let client = self.pool.get().await?;
            let Some(r) = client
                .query_opt(
                    "SELECT b.id, b.account_id, b.mode, b.state, h.id::text, h.state,
                            to_char(b.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
                            to_char(b.deadline_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
                            to_char(b.closed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
                            b.item_count, b.run_count, b.succeeded, b.failed,
                            COALESCE(h.amount, 0), COALESCE(h.captured, 0), COALESCE(h.released, 0),
                            b.decision, b.cancelled
                     FROM batches b LEFT JOIN holds h ON h.id = b.hold_id WHERE b.id = $1",
                    &[&batch_id],
                )
                .await?
            else {
                return Ok(None);
            };
            let items: Vec<ItemView> = client
                .query(
                    "SELECT item_id, state, estimated_cost, reserved, captured, overrun, reason
                     FROM items WHERE batch_id = $1 ORDER BY position",
                    &[&batch_id],
                )
                .await?
                .iter()
                .map(|i| ItemView {
                    item_id: i.get(0),
                    state: i.get(1),
                    estimated_cost: i.get(2),
                    reserved: i.get(3),
                    captured: i.get(4),
                    overrun: i.get(5),
                    reason: i.get(6),
                })
                .collect();
            let (count, run, succeeded, failed, cancelled): (i32, i32, i32, i32, i32) =
                (r.get(9), r.get(10), r.get(11), r.get(12), r.get(17));
            let figures = BatchFigures {
                items_total: count.into(),
                run: run.into(),
                succeeded: succeeded.into(),
                failed: failed.into(),
                cancelled: cancelled.into(),
                skipped: (count - run).into(),
                pending: (run - succeeded - failed - cancelled).into(),
                reserved: r.get(13),
                captured: r.get(14),
                released: r.get(15),
                overrun: items.iter().map(|i| i.overrun).sum(),
            };
            Ok(Some(BatchView {
                batch_id: r.get(0),
                account_id: r.get(1),
                mode: r.get(2),
                state: r.get(3),
                hold_id: r.get(4),
                hold_state: r.get(5),
                created_at: r.get(6),
                deadline_at: r.get(7),
                closed_at: r.get(8),
                figures,
                decision: r.get(16),
                items,
            }))
        })
        .await
    }
}
