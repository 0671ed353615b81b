//! Capture: the actual cost of items (or their failure or cancellation),
//! recorded against their batch's hold. Many items go in one transaction:
//! the cost of a settle is its round trips and its commit flush, not its
//! rows. A settle that takes a batch's last item finishes it (see [`super::close`]).

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use uuid::Uuid;

use super::close::{finish, ClosedBatch};
use super::{ItemState, Ledger, Result};

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
    AlreadySettled { state: ItemState, captured: i64 },
    /// No such item in an open batch: the job does not belong to this ledger.
    Unknown,
}

/// What one settle adds to a batch: the credits captured and the items
/// settled per outcome.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Tally {
    captured: i64,
    succeeded: i32,
    failed: i32,
    cancelled: i32,
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
                ItemOutcome::Succeeded { actual_cost } => {
                    (ItemState::Succeeded, *actual_cost, None)
                }
                ItemOutcome::Failed { reason } => (ItemState::Failed, None, Some(reason.as_str())),
                ItemOutcome::Cancelled => (ItemState::Cancelled, None, Some("cancelled")),
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
        let mut per_batch: BTreeMap<String, Tally> = BTreeMap::new();
        let (mut j_acct, mut j_hold, mut j_batch, mut j_item, mut j_kind, mut j_amount) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        for row in &rows {
            let (batch, item, state): (String, String, ItemState) =
                (row.get(0), row.get(1), row.get(2));
            let (captured, overrun): (i64, i64) = (row.get(3), row.get(4));
            let meta = &batches[&batch];
            let entry = per_batch.entry(batch.clone()).or_default();
            let settled = match state {
                ItemState::Succeeded => {
                    entry.captured += captured;
                    entry.succeeded += 1;
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
                ItemState::Cancelled => {
                    entry.cancelled += 1;
                    Settled::Cancelled
                }
                _ => {
                    entry.failed += 1;
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
            let caps: Vec<i64> = per_batch.values().map(|t| t.captured).collect();
            let succ: Vec<i32> = per_batch.values().map(|t| t.succeeded).collect();
            let fail: Vec<i32> = per_batch.values().map(|t| t.failed).collect();
            let canc: Vec<i32> = per_batch.values().map(|t| t.cancelled).collect();
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
            let finished = finish(&tx, &settled, self.dispatch_grace).await?;
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
                let state: ItemState = row.get(2);
                let settled = if matches!(state, ItemState::Pending | ItemState::Queued) {
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
                            state: ItemState::Succeeded,
                            captured: *captured,
                        },
                        Settled::Cancelled => Settled::AlreadySettled {
                            state: ItemState::Cancelled,
                            captured: 0,
                        },
                        _ => Settled::AlreadySettled {
                            state: ItemState::Failed,
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
