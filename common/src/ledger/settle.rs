//! Settle: capture the actual cost of items (or fail them) and close the
//! batches whose last item this settles. Many items go in one transaction:
//! the cost of a settle is its round trips and its commit flush, not its rows.

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
    /// Batches touched and still running: (batch, account, figures) for progress events.
    pub progress: Vec<(String, String, BatchFigures)>,
    pub closed: Vec<ClosedBatch>,
}

struct BatchRow {
    account_id: String,
    hold_id: Uuid,
}

impl Ledger {
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
                 WHERE id = ANY($1) AND state IN ('granted', 'dispatched')
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
        let (mut b, mut it, mut ok, mut actual, mut reason) =
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
            match &s.outcome {
                ItemOutcome::Succeeded { actual_cost } => {
                    ok.push(true);
                    actual.push(*actual_cost);
                    reason.push(None);
                }
                ItemOutcome::Failed { reason: r } => {
                    ok.push(false);
                    actual.push(None);
                    reason.push(Some(r.as_str()));
                }
            }
        }

        // Only pending items change: a duplicate finds its item settled and is left alone.
        let rows = tx
            .query(
                "WITH input AS (
                     SELECT * FROM unnest($1::text[], $2::text[], $3::bool[], $4::int8[], $5::text[])
                         AS t(batch_id, item_id, ok, actual, reason))
                 UPDATE items i SET
                     state = CASE WHEN input.ok THEN 'succeeded' ELSE 'failed' END,
                     captured = CASE WHEN input.ok
                         THEN LEAST(GREATEST(COALESCE(input.actual, i.reserved), 0), i.reserved) ELSE 0 END,
                     overrun = CASE WHEN input.ok
                         THEN GREATEST(COALESCE(input.actual, 0) - i.reserved, 0) ELSE 0 END,
                     reason = input.reason,
                     settled_at = now()
                 FROM input
                 WHERE i.batch_id = input.batch_id AND i.item_id = input.item_id AND i.state = 'pending'
                 RETURNING i.batch_id, i.item_id, i.state, i.captured, i.overrun",
                &[&b, &it, &ok, &actual, &reason],
            )
            .await?;

        let mut done: HashMap<(String, String), Settled> = HashMap::new();
        // Per batch: (captured, succeeded, failed).
        let mut per_batch: BTreeMap<String, (i64, i32, i32)> = BTreeMap::new();
        let (mut j_acct, mut j_hold, mut j_batch, mut j_item, mut j_kind, mut j_amount) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        for row in &rows {
            let (batch, item, state): (String, String, String) =
                (row.get(0), row.get(1), row.get(2));
            let (captured, overrun): (i64, i64) = (row.get(3), row.get(4));
            let meta = &batches[&batch];
            let entry = per_batch.entry(batch.clone()).or_default();
            if state == "succeeded" {
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
                done.insert((batch, item), Settled::Captured { captured, overrun });
            } else {
                entry.2 += 1;
                done.insert((batch, item), Settled::Failed);
            }
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
            tx.execute(
                "UPDATE holds h SET captured = h.captured + t.c
                 FROM unnest($1::uuid[], $2::int8[]) AS t(id, c) WHERE h.id = t.id",
                &[&holds, &caps],
            )
            .await?;
            let counted = tx
                .query(
                    "UPDATE batches b SET succeeded = b.succeeded + t.s, failed = b.failed + t.f
                     FROM unnest($1::text[], $2::int4[], $3::int4[]) AS t(id, s, f)
                     WHERE b.id = t.id
                     RETURNING b.id, b.succeeded + b.failed = b.run_count",
                    &[&ids, &succ, &fail],
                )
                .await?;
            let mut finished: Vec<String> = counted
                .iter()
                .filter(|r| r.get::<_, bool>(1))
                .map(|r| r.get(0))
                .collect();
            finished.sort();
            report.closed = close_batches(&tx, &finished, "completed", "completed").await?;
            let running: Vec<&str> = ids
                .iter()
                .copied()
                .filter(|id| !finished.iter().any(|f| f == id))
                .collect();
            report.progress = figures_of(&tx, &running).await?;
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
                let settled = if state == "pending" {
                    // Pending in a batch that is not open cannot happen; be explicit anyway.
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
            "SELECT b.id, b.account_id, b.item_count, b.run_count, b.succeeded, b.failed,
                    h.amount, h.captured, h.released,
                    (SELECT COALESCE(sum(overrun), 0)::int8 FROM items i WHERE i.batch_id = b.id)
             FROM batches b JOIN holds h ON h.id = b.hold_id
             WHERE b.id = ANY($1) ORDER BY b.id",
            &[&batch_ids],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let (items, run, succeeded, failed): (i32, i32, i32, i32) =
                (r.get(2), r.get(3), r.get(4), r.get(5));
            let figures = BatchFigures {
                items_total: items.into(),
                run: run.into(),
                succeeded: succeeded.into(),
                failed: failed.into(),
                skipped: (items - run).into(),
                pending: (run - succeeded - failed).into(),
                reserved: r.get(6),
                captured: r.get(7),
                released: r.get(8),
                overrun: r.get(9),
            };
            (r.get(0), r.get(1), figures)
        })
        .collect())
}
