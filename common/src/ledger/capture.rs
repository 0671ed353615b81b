//! Capture: the actual cost of items (or their failure or cancellation),
//! recorded against their batch's hold. Many items go in one transaction:
//! the cost of a settle is its round trips and its commit flush, not its
//! rows. A settle that takes a batch's last item finishes it (see [`super::close`]).

use std::collections::{BTreeMap, HashMap};

use deadpool_postgres::Transaction;
use serde::Serialize;
use tokio_postgres::Row;
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
        if !report.closed.is_empty() {
            self.wake_relay();
        }
        crate::telemetry::record::settled(items, &report);
        Ok(report)
    }

    async fn settle_once(&self, items: &[Settlement]) -> Result<SettleReport> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let batches = lock_batches(&tx, items).await?;
        let (first, input) = Input::of(items, &batches);
        let rows = input.apply(&tx).await?;
        let counted = Counted::of(&rows, &batches);
        counted.journal.insert(&tx).await?;
        let mut report = self.post(&tx, &batches, &counted.per_batch).await?;
        let earlier = earlier_results(&tx, items, &counted.done).await?;
        tx.commit().await?;
        report.results = results(items, &first, &counted.done, &earlier);
        Ok(report)
    }

    /// Add each batch's [`Tally`] to its hold and counters, and finish the
    /// batches whose last item this settled.
    async fn post(
        &self,
        tx: &Transaction<'_>,
        batches: &HashMap<String, BatchRow>,
        per_batch: &BTreeMap<String, Tally>,
    ) -> Result<SettleReport> {
        let mut report = SettleReport::default();
        if per_batch.is_empty() {
            return Ok(report);
        }
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
        let finished = finish(tx, &settled, self.dispatch_grace).await?;
        let closed: Vec<&str> = finished
            .closed
            .iter()
            .map(|c| c.batch_id.as_str())
            .collect();
        report.progress = ids
            .iter()
            .filter(|id| !closed.contains(id))
            .map(|id| id.to_string())
            .collect();
        report.closed = finished.closed;
        report.advanced = finished.advanced;
        Ok(report)
    }
}

/// (batch id, item id).
type Key = (String, String);

/// Lock the open batches of `items` in id order: two settles sharing
/// batches queue, never deadlock. Items of other batches are not settleable.
async fn lock_batches(
    tx: &Transaction<'_>,
    items: &[Settlement],
) -> Result<HashMap<String, BatchRow>> {
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
        let batch = BatchRow {
            account_id: row.get(1),
            hold_id: row.get(2),
        };
        batches.insert(id, batch);
    }
    Ok(batches)
}

/// The settlements to apply, as columns: the first occurrence of each item
/// of an open batch.
#[derive(Default)]
struct Input<'a> {
    batch: Vec<&'a str>,
    item: Vec<&'a str>,
    kind: Vec<ItemState>,
    actual: Vec<Option<i64>>,
    reason: Vec<Option<&'a str>>,
}

impl<'a> Input<'a> {
    /// The input, and the position of each item's first occurrence (later
    /// ones replay its result).
    fn of(
        items: &'a [Settlement],
        batches: &HashMap<String, BatchRow>,
    ) -> (HashMap<(&'a str, &'a str), usize>, Input<'a>) {
        let mut first = HashMap::new();
        let mut input = Input::default();
        for (i, s) in items.iter().enumerate() {
            if !batches.contains_key(&s.batch_id) {
                continue;
            }
            match first.entry((s.batch_id.as_str(), s.item_id.as_str())) {
                std::collections::hash_map::Entry::Occupied(_) => continue,
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(i);
                }
            }
            let (kind, actual, reason) = match &s.outcome {
                ItemOutcome::Succeeded { actual_cost } => {
                    (ItemState::Succeeded, *actual_cost, None)
                }
                ItemOutcome::Failed { reason } => (ItemState::Failed, None, Some(reason.as_str())),
                ItemOutcome::Cancelled => (ItemState::Cancelled, None, Some("cancelled")),
            };
            input.batch.push(s.batch_id.as_str());
            input.item.push(s.item_id.as_str());
            input.kind.push(kind);
            input.actual.push(actual);
            input.reason.push(reason);
        }
        (first, input)
    }

    /// Settle the items that are still pending: a duplicate finds its item
    /// settled and is left alone. The rows that changed.
    async fn apply(&self, tx: &Transaction<'_>) -> Result<Vec<Row>> {
        Ok(tx
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
                &[&self.batch, &self.item, &self.kind, &self.actual, &self.reason],
            )
            .await?)
    }
}

/// The journal rows of the captures (and overruns) of one settle, as columns.
#[derive(Default)]
struct CaptureRows {
    account: Vec<String>,
    hold: Vec<Uuid>,
    batch: Vec<String>,
    item: Vec<String>,
    kind: Vec<&'static str>,
    amount: Vec<i64>,
}

impl CaptureRows {
    fn push(&mut self, meta: &BatchRow, key: &Key, kind: &'static str, amount: i64) {
        self.account.push(meta.account_id.clone());
        self.hold.push(meta.hold_id);
        self.batch.push(key.0.clone());
        self.item.push(key.1.clone());
        self.kind.push(kind);
        self.amount.push(amount);
    }

    async fn insert(&self, tx: &Transaction<'_>) -> Result<()> {
        if self.account.is_empty() {
            return Ok(());
        }
        tx.execute(
            "INSERT INTO journal (account_id, hold_id, batch_id, item_id, kind, amount)
             SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::int8[])",
            &[&self.account, &self.hold, &self.batch, &self.item, &self.kind, &self.amount],
        )
        .await?;
        Ok(())
    }
}

/// What the changed rows add up to: each item's result, each batch's
/// [`Tally`], and the journal rows of the captures.
struct Counted {
    done: HashMap<Key, Settled>,
    per_batch: BTreeMap<String, Tally>,
    journal: CaptureRows,
}

impl Counted {
    fn of(rows: &[Row], batches: &HashMap<String, BatchRow>) -> Counted {
        let mut counted = Counted {
            done: HashMap::new(),
            per_batch: BTreeMap::new(),
            journal: CaptureRows::default(),
        };
        for row in rows {
            let key: Key = (row.get(0), row.get(1));
            let state: ItemState = row.get(2);
            let (captured, overrun): (i64, i64) = (row.get(3), row.get(4));
            let meta = &batches[&key.0];
            let tally = counted.per_batch.entry(key.0.clone()).or_default();
            let settled = match state {
                ItemState::Succeeded => {
                    tally.captured += captured;
                    tally.succeeded += 1;
                    counted.journal.push(meta, &key, "capture", captured);
                    if overrun > 0 {
                        counted.journal.push(meta, &key, "overrun", overrun);
                    }
                    Settled::Captured { captured, overrun }
                }
                ItemState::Cancelled => {
                    tally.cancelled += 1;
                    Settled::Cancelled
                }
                _ => {
                    tally.failed += 1;
                    Settled::Failed
                }
            };
            counted.done.insert(key, settled);
        }
        counted
    }
}

/// What the items this settle did not change had become before: settled
/// already, or not settleable now (its batch is not open, or its chunk not
/// reserved).
async fn earlier_results(
    tx: &Transaction<'_>,
    items: &[Settlement],
    done: &HashMap<Key, Settled>,
) -> Result<HashMap<Key, Settled>> {
    let missing: Vec<&Settlement> = items
        .iter()
        .filter(|s| !done.contains_key(&(s.batch_id.clone(), s.item_id.clone())))
        .collect();
    let mut earlier = HashMap::new();
    if missing.is_empty() {
        return Ok(earlier);
    }
    let mb: Vec<&str> = missing.iter().map(|s| s.batch_id.as_str()).collect();
    let mi: Vec<&str> = missing.iter().map(|s| s.item_id.as_str()).collect();
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
            Settled::Unknown
        } else {
            Settled::AlreadySettled {
                state,
                captured: row.get(3),
            }
        };
        earlier.insert((row.get(0), row.get(1)), settled);
    }
    Ok(earlier)
}

/// One result per input, in order: the first occurrence of an item reports
/// what this settle did, a later duplicate in the same call reports it as
/// already settled, and the rest what they had become before.
fn results(
    items: &[Settlement],
    first: &HashMap<(&str, &str), usize>,
    done: &HashMap<Key, Settled>,
    earlier: &HashMap<Key, Settled>,
) -> Vec<Settled> {
    items
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let key = (s.batch_id.clone(), s.item_id.clone());
            match (
                first.get(&(s.batch_id.as_str(), s.item_id.as_str())),
                done.get(&key),
            ) {
                (Some(&f), Some(r)) if f == i => r.clone(),
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
        .collect()
}
