//! Settle: capture the actual cost of items (or fail or cancel them) and
//! finish the batches whose last item this settles. Many items go in one
//! transaction: the cost of a settle is its round trips and its commit flush,
//! not its rows.
//!
//! Finishing a batch means one of three things: close it (release the rest of
//! its hold), or, for a sequential batch with items still queued, reserve the
//! next chunk and hand it out, or stop cleanly when that chunk no longer fits.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use tokio_postgres::Transaction;
use uuid::Uuid;

use super::{Ledger, Result};
use crate::messages::BatchFigures;

/// What the generator reported for one item.
#[derive(Clone, Debug, PartialEq)]
pub enum ItemOutcome {
    /// Done. `None` means no cost was reported: the reservation is charged.
    Succeeded { actual_cost: Option<i64> },
    /// Not done: never charged.
    Failed { reason: String },
    /// Never started because its batch was cancelled: never charged.
    Cancelled,
}

/// One item to settle.
#[derive(Clone, Debug)]
pub struct Settlement {
    pub batch_id: String,
    pub item_id: String,
    pub outcome: ItemOutcome,
}

/// What settling one item did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Settled {
    /// Charged `captured` (≤ the reservation); `overrun` is what was above it.
    Captured { captured: i64, overrun: i64 },
    /// Failed, charged nothing.
    Failed,
    /// Cancelled before it started, charged nothing.
    Cancelled,
    /// Settled before (a duplicate job, or the batch closed meanwhile): the first result stands.
    AlreadySettled { state: String, captured: i64 },
    /// No such item in an open batch: the job does not belong to this ledger.
    Unknown,
}

/// A batch this settle (or a reconciler) closed, with its final figures.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClosedBatch {
    pub batch_id: String,
    pub account_id: String,
    /// `completed`, `expired` or `cancelled`.
    pub state: String,
    pub figures: BatchFigures,
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
    /// From the decision to the close.
    pub seconds: f64,
}

/// The result of [`Ledger::settle`], in input order, plus per-batch news.
#[derive(Clone, Debug, Default)]
pub struct SettleReport {
    pub results: Vec<Settled>,
    /// Batches touched and still running, for progress events. Their figures
    /// are read when the (coalesced) event goes out, with [`Ledger::figures`],
    /// not in every settle: counting a large batch's overruns costs a scan.
    pub progress: Vec<String>,
    pub closed: Vec<ClosedBatch>,
    /// Sequential batches whose next chunk was just reserved: publish its jobs.
    pub advanced: Vec<String>,
}

/// What [`finish`] did with a set of batches.
#[derive(Clone, Debug, Default)]
pub(super) struct Finished {
    pub closed: Vec<ClosedBatch>,
    pub advanced: Vec<String>,
}

struct BatchRow {
    account_id: String,
    hold_id: Uuid,
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

    /// Settle `items` in one transaction. Duplicates (in the input or already
    /// settled) are no-ops that report the first result.
    pub async fn settle(&self, items: &[Settlement]) -> Result<SettleReport> {
        if items.is_empty() {
            return Ok(SettleReport::default());
        }
        let report = self.retrying("settle", || self.settle_once(items)).await?;
        crate::telemetry::record::settled(items, &report);
        Ok(report)
    }

    async fn settle_once(&self, items: &[Settlement]) -> Result<SettleReport> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;

        // Lock the batches in id order: two settles sharing batches queue, never deadlock.
        let mut batch_ids: Vec<&str> = items.iter().map(|s| s.batch_id.as_str()).collect();
        batch_ids.sort_unstable();
        batch_ids.dedup();
        let mut batches = HashMap::new();
        for row in tx
            .query(
                "SELECT id, account_id, hold_id FROM batches
                 WHERE id = ANY($1) AND state IN ('granted', 'dispatched', 'cancelling')
                 ORDER BY id FOR UPDATE",
                &[&batch_ids],
            )
            .await?
        {
            let id: String = row.get(0);
            batches.insert(
                id,
                BatchRow {
                    account_id: row.get(1),
                    hold_id: row.get(2),
                },
            );
        }

        // First occurrence of each (batch, item) wins; later ones replay it.
        let mut first: HashMap<(&str, &str), usize> = HashMap::new();
        let (mut b, mut it, mut kind, mut actual, mut reason) =
            (vec![], vec![], vec![], vec![], vec![]);
        for (i, s) in items.iter().enumerate() {
            if !batches.contains_key(&s.batch_id) {
                continue;
            }
            match first.entry((&s.batch_id, &s.item_id)) {
                std::collections::hash_map::Entry::Occupied(_) => continue,
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(i);
                }
            }
            b.push(s.batch_id.as_str());
            it.push(s.item_id.as_str());
            let (k, a, r) = match &s.outcome {
                ItemOutcome::Succeeded { actual_cost } => ("succeeded", *actual_cost, None),
                ItemOutcome::Failed { reason } => ("failed", None, Some(reason.as_str())),
                ItemOutcome::Cancelled => ("cancelled", None, Some("cancelled")),
            };
            kind.push(k);
            actual.push(a);
            reason.push(r);
        }

        // Only pending items change: a duplicate finds its item settled and is left alone.
        let rows = tx
            .query(
                "WITH input AS (
                     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[])
                         AS t(batch_id, item_id, kind, actual, reason))
                 UPDATE items i SET
                     state = input.kind,
                     captured = CASE WHEN input.kind = 'succeeded'
                         THEN LEAST(GREATEST(COALESCE(input.actual, i.reserved), 0), i.reserved) ELSE 0 END,
                     overrun = CASE WHEN input.kind = 'succeeded'
                         THEN GREATEST(COALESCE(input.actual, 0) - i.reserved, 0) ELSE 0 END,
                     reason = input.reason,
                     settled_at = now()
                 FROM input
                 WHERE i.batch_id = input.batch_id AND i.item_id = input.item_id AND i.state = 'pending'
                 RETURNING i.batch_id, i.item_id, i.state, i.captured, i.overrun",
                &[&b, &it, &kind, &actual, &reason],
            )
            .await?;

        let mut done: HashMap<(String, String), Settled> = HashMap::new();
        // Per batch: (captured, succeeded, failed, cancelled).
        let mut per_batch: BTreeMap<String, (i64, i32, i32, i32)> = BTreeMap::new();
        let (mut j_acct, mut j_hold, mut j_batch, mut j_item, mut j_kind, mut j_amount) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        for row in &rows {
            let (batch, item, state): (String, String, String) =
                (row.get(0), row.get(1), row.get(2));
            let (captured, overrun): (i64, i64) = (row.get(3), row.get(4));
            let meta = &batches[&batch];
            let entry = per_batch.entry(batch.clone()).or_default();
            let settled = match state.as_str() {
                "succeeded" => {
                    entry.0 += captured;
                    entry.1 += 1;
                    for (kind, amount) in [("capture", captured), ("overrun", overrun)] {
                        if kind == "overrun" && amount == 0 {
                            continue;
                        }
                        j_acct.push(meta.account_id.clone());
                        j_hold.push(meta.hold_id);
                        j_batch.push(batch.clone());
                        j_item.push(item.clone());
                        j_kind.push(kind);
                        j_amount.push(amount);
                    }
                    Settled::Captured { captured, overrun }
                }
                "cancelled" => {
                    entry.3 += 1;
                    Settled::Cancelled
                }
                _ => {
                    entry.2 += 1;
                    Settled::Failed
                }
            };
            done.insert((batch, item), settled);
        }
        if !j_acct.is_empty() {
            tx.execute(
                "INSERT INTO journal (account_id, hold_id, batch_id, item_id, kind, amount)
                 SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::int8[])",
                &[&j_acct, &j_hold, &j_batch, &j_item, &j_kind, &j_amount],
            )
            .await?;
        }

        let mut report = SettleReport::default();
        if !per_batch.is_empty() {
            let ids: Vec<&str> = per_batch.keys().map(String::as_str).collect();
            let holds: Vec<Uuid> = ids.iter().map(|id| batches[*id].hold_id).collect();
            let caps: Vec<i64> = per_batch.values().map(|v| v.0).collect();
            let succ: Vec<i32> = per_batch.values().map(|v| v.1).collect();
            let fail: Vec<i32> = per_batch.values().map(|v| v.2).collect();
            let canc: Vec<i32> = per_batch.values().map(|v| v.3).collect();
            tx.execute(
                "UPDATE holds h SET captured = h.captured + t.c
                 FROM unnest($1::uuid[], $2::int8[]) AS t(id, c) WHERE h.id = t.id",
                &[&holds, &caps],
            )
            .await?;
            let counted = tx
                .query(
                    "UPDATE batches b SET succeeded = b.succeeded + t.s, failed = b.failed + t.f,
                                          cancelled = b.cancelled + t.c
                     FROM unnest($1::text[], $2::int4[], $3::int4[], $4::int4[]) AS t(id, s, f, c)
                     WHERE b.id = t.id
                     RETURNING b.id, b.succeeded + b.failed + b.cancelled = b.run_count",
                    &[&ids, &succ, &fail, &canc],
                )
                .await?;
            let mut settled: Vec<String> = counted
                .iter()
                .filter(|r| r.get::<_, bool>(1))
                .map(|r| r.get(0))
                .collect();
            settled.sort();
            let finished = finish(&tx, &settled).await?;
            let closed: Vec<&str> = finished
                .closed
                .iter()
                .map(|c| c.batch_id.as_str())
                .collect();
            let running: Vec<&str> = ids
                .iter()
                .copied()
                .filter(|id| !closed.contains(id))
                .collect();
            report.progress = running.into_iter().map(String::from).collect();
            report.closed = finished.closed;
            report.advanced = finished.advanced;
        }

        // Whatever did not change was settled before (or does not exist): say which.
        let missing: Vec<usize> = (0..items.len())
            .filter(|&i| !done.contains_key(&(items[i].batch_id.clone(), items[i].item_id.clone())))
            .collect();
        let mut earlier: HashMap<(String, String), Settled> = HashMap::new();
        if !missing.is_empty() {
            let mb: Vec<&str> = missing
                .iter()
                .map(|&i| items[i].batch_id.as_str())
                .collect();
            let mi: Vec<&str> = missing.iter().map(|&i| items[i].item_id.as_str()).collect();
            for row in tx
                .query(
                    "SELECT i.batch_id, i.item_id, i.state, i.captured FROM items i
                     JOIN unnest($1::text[], $2::text[]) AS t(b, it) ON i.batch_id = t.b AND i.item_id = t.it",
                    &[&mb, &mi],
                )
                .await?
            {
                let state: String = row.get(2);
                let settled = if matches!(state.as_str(), "pending" | "queued") {
                    // Not settleable now (its batch is not open, or its chunk not reserved).
                    Settled::Unknown
                } else {
                    Settled::AlreadySettled { state, captured: row.get(3) }
                };
                earlier.insert((row.get(0), row.get(1)), settled);
            }
        }
        tx.commit().await?;

        report.results = items
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let key = (s.batch_id.clone(), s.item_id.clone());
                match (
                    first.get(&(s.batch_id.as_str(), s.item_id.as_str())),
                    done.get(&key),
                ) {
                    // The first occurrence in this call changed the item.
                    (Some(&f), Some(r)) if f == i => r.clone(),
                    // A later duplicate in the same call: the first result stands.
                    (Some(_), Some(r)) => match r {
                        Settled::Captured { captured, .. } => Settled::AlreadySettled {
                            state: "succeeded".into(),
                            captured: *captured,
                        },
                        Settled::Cancelled => Settled::AlreadySettled {
                            state: "cancelled".into(),
                            captured: 0,
                        },
                        _ => Settled::AlreadySettled {
                            state: "failed".into(),
                            captured: 0,
                        },
                    },
                    _ => earlier.get(&key).cloned().unwrap_or(Settled::Unknown),
                }
            })
            .collect();
        Ok(report)
    }
}

/// Finish batches whose run items are all settled (already locked by the
/// caller, sorted): a cancelling batch closes `cancelled`; a sequential batch
/// with queued items reserves its next chunk, or stops when it no longer fits;
/// any other closes `completed`.
pub(super) async fn finish(tx: &Transaction<'_>, batch_ids: &[String]) -> Result<Finished> {
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
        let (id, state, chunk): (String, String, Option<i32>) = (r.get(0), r.get(1), r.get(2));
        let queued: bool = r.get(5);
        match (state.as_str(), chunk, queued) {
            ("cancelling", ..) => cancelled.push(id),
            (_, Some(chunk), true) => {
                if next_chunk(tx, &id, &r.get::<_, String>(3), r.get(4), chunk).await? {
                    out.advanced.push(id);
                } else {
                    complete.push(id);
                }
            }
            _ => complete.push(id),
        }
    }
    out.closed = close_batches(tx, &complete, "completed", "completed").await?;
    out.closed
        .extend(close_batches(tx, &cancelled, "cancelled", "cancelled").await?);
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
                            dispatch_lease = now() + interval '30 seconds'
         WHERE id = $1",
        &[&batch_id, &(ids.len() as i32)],
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
    final_state: &str,
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
                state: final_state.into(),
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
