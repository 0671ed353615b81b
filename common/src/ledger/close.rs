//! Close and release: finishing a batch whose items are all settled. That
//! means one of three things: close it (release the rest of its hold), or,
//! for a sequential batch with items still queued, reserve the next chunk and
//! hand it out, or stop cleanly when that chunk no longer fits.

use std::collections::HashMap;
use std::time::Duration;

use deadpool_postgres::Transaction;
use serde::Serialize;
use uuid::Uuid;

use super::grants::{self, Unused};
use super::{BatchState, Ledger, Result};
use crate::messages::BatchFigures;

/// A batch this settle (or a reconciler) closed, with its final figures.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClosedBatch {
    pub batch_id: String,
    pub account_id: String,
    /// `completed`, `expired` or `cancelled`.
    pub state: BatchState,
    pub figures: BatchFigures,
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
    /// From the decision to the close.
    pub seconds: f64,
}

/// What [`finish`] did with a set of batches.
#[derive(Clone, Debug, Default)]
pub(super) struct Finished {
    pub closed: Vec<ClosedBatch>,
    pub advanced: Vec<String>,
}

/// Finish batches whose run items are all settled (already locked by the
/// caller, sorted): a cancelling batch closes `cancelled`; a sequential batch
/// with queued items reserves its next chunk, or stops when it no longer fits;
/// any other closes `completed`.
/// A sequential batch whose next chunk is reserved is granted again, with a
/// dispatch lease of `dispatch_grace`, like a batch granted by a coordinator.
pub(super) async fn finish(
    tx: &Transaction<'_>,
    batch_ids: &[String],
    dispatch_grace: Duration,
) -> Result<Finished> {
    let mut out = Finished::default();
    if batch_ids.is_empty() {
        return Ok(out);
    }
    let rows = tx
        .query(
            "SELECT b.id, b.state, b.chunk_size, b.account_id, b.hold_id,
                    -- Only a sequential batch has queued items: do not scan the others.
                    b.chunk_size IS NOT NULL
                        AND EXISTS (SELECT 1 FROM items i WHERE i.batch_id = b.id AND i.state = 'queued')
             FROM batches b WHERE b.id = ANY($1) ORDER BY b.id",
            &[&batch_ids],
        )
        .await?;
    let (mut complete, mut cancelled) = (vec![], vec![]);
    for r in &rows {
        let (id, state, chunk): (String, BatchState, Option<i32>) = (r.get(0), r.get(1), r.get(2));
        let queued: bool = r.get(5);
        match (state, chunk, queued) {
            (BatchState::Cancelling, ..) => cancelled.push(id),
            (_, Some(chunk), true) => {
                if next_chunk(
                    tx,
                    &id,
                    &r.get::<_, String>(3),
                    r.get(4),
                    chunk,
                    dispatch_grace,
                )
                .await?
                {
                    out.advanced.push(id);
                } else {
                    complete.push(id);
                }
            }
            _ => complete.push(id),
        }
    }
    out.closed = close_batches(tx, &complete, BatchState::Completed, "completed").await?;
    out.closed
        .extend(close_batches(tx, &cancelled, BatchState::Cancelled, "cancelled").await?);
    Ok(out)
}

/// Reserve the next chunk of a sequential batch if the account covers it
/// (true), or mark every queued item skipped, "credits_ran_out" (false).
async fn next_chunk(
    tx: &Transaction<'_>,
    batch_id: &str,
    account: &str,
    hold: Uuid,
    chunk: i32,
    dispatch_grace: Duration,
) -> Result<bool> {
    let next = tx
        .query(
            "SELECT item_id, estimated_cost FROM items
             WHERE batch_id = $1 AND state = 'queued' ORDER BY position LIMIT $2",
            &[&batch_id, &i64::from(chunk)],
        )
        .await?;
    let ids: Vec<String> = next.iter().map(|r| r.get(0)).collect();
    let cost: i64 = next.iter().map(|r| r.get::<_, i64>(1)).sum();
    // The lock first, then the grants in a statement of their own: read in
    // the locking statement they would be as they were before any wait.
    tx.execute(
        "SELECT 1 FROM accounts WHERE id = $1 FOR NO KEY UPDATE",
        &[&account],
    )
    .await?;
    let mut available: i64 = tx
        .query_one("SELECT holdfast_available($1)", &[&account])
        .await?
        .get(0);
    // The spenders the batch counts against, in the period it started in.
    let room: Option<i64> = tx
        .query_one("SELECT holdfast_spender_room($1)", &[&hold])
        .await?
        .get(0);
    if let Some(room) = room {
        available = available.min(room);
    }
    if cost > available {
        tx.execute(
            "UPDATE items SET state = 'skipped', reason = 'credits_ran_out' WHERE batch_id = $1 AND state = 'queued'",
            &[&batch_id],
        )
        .await?;
        tracing::info!(%batch_id, next_chunk_cost = cost, available, "sequential batch stops: the next chunk does not fit");
        return Ok(false);
    }
    tx.execute(
        "UPDATE holds SET amount = amount + $2 WHERE id = $1",
        &[&hold, &cost],
    )
    .await?;
    grants::take(
        tx,
        account,
        &[hold],
        &[Some(batch_id)],
        &[cost],
        Some("next chunk"),
    )
    .await?;
    tx.execute("SELECT holdfast_spender_grow($1, $2)", &[&hold, &cost])
        .await?;
    tx.execute(
        "UPDATE items SET state = 'pending', reserved = estimated_cost WHERE batch_id = $1 AND item_id = ANY($2)",
        &[&batch_id, &ids],
    )
    .await?;
    // Granted again until its new jobs are confirmed; a reconciler sends them
    // if whoever reserved the chunk dies before publishing.
    tx.execute(
        "UPDATE batches SET run_count = run_count + $2, state = 'granted', dispatched_at = NULL,
                            dispatch_lease = now() + make_interval(secs => $3)
         WHERE id = $1",
        &[
            &batch_id,
            &(ids.len() as i32),
            &dispatch_grace.as_secs_f64(),
        ],
    )
    .await?;
    crate::telemetry::record::chunk_reserved(cost);
    Ok(true)
}

/// Close `batch_ids` (already locked by the caller, sorted): release each hold's
/// remainder exactly once, post the captures to the account, set the final state.
/// A batch whose hold is no longer open is skipped: somebody closed it first.
pub(super) async fn close_batches(
    tx: &Transaction<'_>,
    batch_ids: &[String],
    final_state: BatchState,
    reason: &str,
) -> Result<Vec<ClosedBatch>> {
    if batch_ids.is_empty() {
        return Ok(vec![]);
    }
    // Resolve the holds; `state = 'open'` makes a second close a no-op.
    let rows = tx
        .query(
            "UPDATE holds h SET state = 'closed', released = h.amount - h.captured,
                    close_reason = $2, closed_at = now()
             FROM batches b
             WHERE b.id = ANY($1) AND h.id = b.hold_id AND h.state = 'open'
             RETURNING b.id, h.account_id, h.id, h.amount, h.captured, h.released",
            &[&batch_ids, &reason],
        )
        .await?;
    if rows.is_empty() {
        return Ok(vec![]);
    }
    // Each hold posted to its grants and its account, accounts in id order
    // (the lock order).
    let mut resolved: Vec<(String, String, Uuid, i64)> = rows
        .iter()
        .map(|r| (r.get(1), r.get(0), r.get(2), r.get(4)))
        .collect();
    resolved.sort();
    let mut closed_ids = Vec::with_capacity(resolved.len());
    for (_, batch, hold, captured) in resolved {
        grants::resolve(tx, hold, captured, Some(&batch), Unused::Release, reason).await?;
        closed_ids.push(batch);
    }
    tx.execute(
        "UPDATE batches SET state = $2, closed_at = now(), dispatch_lease = NULL WHERE id = ANY($1)",
        &[&closed_ids, &final_state],
    )
    .await?;
    let figures = figures_of(
        tx,
        &closed_ids.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await?;
    let extra: HashMap<String, (Option<String>, Option<String>, f64)> = tx
        .query(
            "SELECT id, reply_to, correlation_id, extract(epoch FROM now() - created_at)::float8
             FROM batches WHERE id = ANY($1)",
            &[&closed_ids],
        )
        .await?
        .into_iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
        .collect();
    let closed: Vec<ClosedBatch> = figures
        .into_iter()
        .map(|(batch_id, account_id, figures)| {
            let (reply_to, correlation_id, seconds) =
                extra.get(&batch_id).cloned().unwrap_or_default();
            ClosedBatch {
                batch_id,
                account_id,
                state: final_state,
                figures,
                reply_to,
                correlation_id,
                seconds,
            }
        })
        .collect();
    // Their `completed` events, in this transaction: a batch closes once (only
    // an open hold is closed above), so it has one; `outbox_one_completed`
    // refuses a second while the first waits for its relay.
    let events: Vec<_> = closed.iter().map(crate::outbox::completed).collect();
    crate::outbox::write(tx, &events).await?;
    Ok(closed)
}

/// Current figures of `batch_ids`: counts per item state and credits.
pub(super) async fn figures_of(
    tx: &Transaction<'_>,
    batch_ids: &[&str],
) -> Result<Vec<(String, String, BatchFigures)>> {
    if batch_ids.is_empty() {
        return Ok(vec![]);
    }
    let rows = tx
        .query(
            "SELECT b.id, b.account_id, b.item_count, b.run_count, b.succeeded, b.failed, b.cancelled,
                    h.amount, h.captured, h.released,
                    (SELECT COALESCE(sum(overrun), 0)::int8 FROM items i WHERE i.batch_id = b.id)
             FROM batches b JOIN holds h ON h.id = b.hold_id
             WHERE b.id = ANY($1) ORDER BY b.id",
            &[&batch_ids],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), figures(r)))
        .collect())
}

fn figures(r: &tokio_postgres::Row) -> BatchFigures {
    let (items, run, succeeded, failed, cancelled): (i32, i32, i32, i32, i32) =
        (r.get(2), r.get(3), r.get(4), r.get(5), r.get(6));
    BatchFigures {
        items_total: items.into(),
        run: run.into(),
        succeeded: succeeded.into(),
        failed: failed.into(),
        cancelled: cancelled.into(),
        skipped: (items - run).into(),
        pending: (run - succeeded - failed - cancelled).into(),
        reserved: r.get(7),
        captured: r.get(8),
        released: r.get(9),
        overrun: r.get(10),
    }
}

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
                let finished = finish(&tx, &ids, self.dispatch_grace).await?;
                tx.commit().await?;
                Ok(finished)
            })
            .await?;
        if !finished.closed.is_empty() {
            self.wake_relay();
        }
        crate::telemetry::record::closed(&finished.closed);
        Ok((finished.closed, finished.advanced))
    }
}
