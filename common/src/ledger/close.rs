//! Close and release: finishing a batch whose items are all settled. That
//! means one of three things: close it (release the rest of its hold), or,
//! for a sequential batch with items still queued, reserve the next chunk and
//! hand it out, or stop cleanly when that chunk no longer fits.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::Serialize;
use tokio_postgres::Transaction;
use uuid::Uuid;

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
    let available: i64 = tx
        .query_one(
            "SELECT balance - held FROM accounts WHERE id = $1 FOR NO KEY UPDATE",
            &[&account],
        )
        .await?
        .get(0);
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
    tx.execute(
        "UPDATE accounts SET held = held + $2, updated_at = now() WHERE id = $1",
        &[&account, &cost],
    )
    .await?;
    tx.execute(
        "INSERT INTO journal (account_id, hold_id, batch_id, kind, amount, held_delta, note)
         VALUES ($1, $2, $3, 'hold', $4, $4, 'next chunk')",
        &[&account, &hold, &batch_id, &cost],
    )
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
    // Account rows last, in id order (the lock order).
    let mut per_account: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    let (mut j_acct, mut j_hold, mut j_batch, mut j_kind, mut j_amount, mut j_bal, mut j_held) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut closed_ids = Vec::with_capacity(rows.len());
    for row in &rows {
        let (batch, account, hold): (String, String, Uuid) = (row.get(0), row.get(1), row.get(2));
        let (amount, captured, released): (i64, i64, i64) = (row.get(3), row.get(4), row.get(5));
        let e = per_account.entry(account.clone()).or_default();
        e.0 += captured;
        e.1 += amount;
        for (kind, amt, bal, held) in [
            ("settle", captured, -captured, -captured),
            ("release", released, 0, -released),
        ] {
            j_acct.push(account.clone());
            j_hold.push(hold);
            j_batch.push(batch.clone());
            j_kind.push(kind);
            j_amount.push(amt);
            j_bal.push(bal);
            j_held.push(held);
        }
        closed_ids.push(batch);
    }
    for (account, (captured, amount)) in &per_account {
        tx.execute(
            "UPDATE accounts SET balance = balance - $2, held = held - $3, updated_at = now() WHERE id = $1",
            &[account, captured, amount],
        )
        .await?;
    }
    let notes: Vec<&str> = j_kind.iter().map(|_| reason).collect();
    tx.execute(
        "INSERT INTO journal (account_id, hold_id, batch_id, kind, amount, balance_delta, held_delta, note)
         SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::int8[], $6::int8[], $7::int8[], $8::text[])",
        &[&j_acct, &j_hold, &j_batch, &j_kind, &j_amount, &j_bal, &j_held, &notes],
    )
    .await?;
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
    Ok(figures
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
        .collect())
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
        crate::telemetry::record::closed(&finished.closed);
        Ok((finished.closed, finished.advanced))
    }
}
