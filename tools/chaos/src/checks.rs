//! The checker: after a scenario settles, count in the ledger what the
//! guarantees forbid, the way a Jepsen checker counts lost and duplicated
//! messages. Each count must be zero.
//!
//! - lost: a request the broker confirmed that the ledger never decided (and
//!   that was not answered `rejected`), an item of a granted batch that never
//!   reached a final state, a granted batch that never closed;
//! - captured twice: an item with more than one capture journal row;
//! - overspend: `available < 0` in any sample, or captures above a hold or
//!   above an item's reservation;
//! - open holds: holds still open after the fleet settled;
//! - drift: what `holdfast audit` reports;
//! - events lost: closed batches whose `completed` event never arrived
//!   (counted by [`crate::events`], not from the ledger).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use holdfast_common::ledger::Ledger;
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What the checker counted for one scenario.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Counts {
    /// Batch requests decided by the ledger (granted or denied).
    pub batches: i64,
    /// Items of granted batches.
    pub items: i64,
    pub lost: i64,
    pub captured_twice: i64,
    pub overspend: i64,
    pub open_holds: i64,
    pub drift: i64,
    /// Batches the ledger closed whose `batch.completed` event never reached
    /// the harness's queue (see [`crate::events`]); filled in by the stage.
    pub events_lost: i64,
}

impl Counts {
    /// True when nothing forbidden was counted.
    pub fn clean(&self) -> bool {
        self.lost == 0
            && self.captured_twice == 0
            && self.overspend == 0
            && self.open_holds == 0
            && self.drift == 0
            && self.events_lost == 0
    }
}

/// Requests a scenario's producers sent: confirmed by the broker, and the
/// subset answered `rejected` (those never reach the ledger).
#[derive(Clone, Debug, Default)]
pub struct Sent {
    pub confirmed: BTreeSet<String>,
    pub rejected: BTreeSet<String>,
}

async fn scalar(ledger: &Ledger, sql: &str) -> anyhow::Result<i64> {
    let c = ledger.pool().get().await?;
    Ok(c.query_one(sql, &[]).await?.get(0))
}

const UNFINISHED_ITEMS: &str = "SELECT count(*) FROM items i JOIN batches b ON b.id = i.batch_id
     WHERE i.state IN ('pending', 'queued')";
const UNCLOSED_BATCHES: &str =
    "SELECT count(*) FROM batches WHERE state IN ('granted', 'dispatched', 'cancelling')";
const OPEN_HOLDS: &str = "SELECT count(*) FROM holds WHERE state = 'open'";
const DOUBLE_CAPTURES: &str = "SELECT count(*) FROM (SELECT 1 FROM journal WHERE kind = 'capture'
     GROUP BY batch_id, item_id HAVING count(*) > 1) d";
const OVER_CAPTURES: &str = "SELECT
       (SELECT count(*) FROM items WHERE captured > reserved)
     + (SELECT count(*) FROM holds h
        WHERE h.captured > h.amount
           OR h.captured < (SELECT COALESCE(sum(i.captured), 0) FROM items i
                            JOIN batches b ON b.id = i.batch_id WHERE b.hold_id = h.id)
           OR (SELECT COALESCE(sum(i.captured), 0) FROM items i
               JOIN batches b ON b.id = i.batch_id WHERE b.hold_id = h.id) > h.amount)
     + (SELECT count(*) FROM accounts WHERE balance - held < 0)";

/// Confirmed requests with no decision in the ledger (rejected ones excepted).
async fn undecided(ledger: &Ledger, sent: &Sent) -> anyhow::Result<i64> {
    let ids: Vec<&str> = sent
        .confirmed
        .iter()
        .filter(|id| !sent.rejected.contains(*id))
        .map(String::as_str)
        .collect();
    let c = ledger.pool().get().await?;
    let known: i64 = c
        .query_one("SELECT count(*) FROM batches WHERE id = ANY($1)", &[&ids])
        .await?
        .get(0);
    Ok(ids.len() as i64 - known)
}

/// True once every confirmed request is decided, every granted batch closed
/// and every hold resolved: the fleet has nothing left to do.
pub async fn settled(ledger: &Ledger, sent: &Sent) -> anyhow::Result<bool> {
    Ok(undecided(ledger, sent).await? == 0
        && scalar(ledger, UNFINISHED_ITEMS).await? == 0
        && scalar(ledger, UNCLOSED_BATCHES).await? == 0
        && scalar(ledger, OPEN_HOLDS).await? == 0)
}

/// Poll [`settled`] until it holds or `timeout` passes; returns when it held.
/// Errors while polling (a service restarting) count as not settled yet.
pub async fn wait_settled(ledger: &Ledger, sent: &Sent, timeout: Duration) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(true) = settled(ledger, sent).await {
            return Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    None
}

/// Count everything forbidden. `negative_samples`: samples of `available < 0`.
pub async fn count(ledger: &Ledger, sent: &Sent, negative_samples: u64) -> anyhow::Result<Counts> {
    let drift = ledger.audit().await?;
    for d in &drift {
        tracing::error!(subject = %d.subject, problem = %d.problem, "ledger drift");
    }
    Ok(Counts {
        batches: scalar(ledger, "SELECT count(*) FROM batches").await?,
        items: scalar(
            ledger,
            "SELECT count(*) FROM items i JOIN batches b ON b.id = i.batch_id WHERE b.state <> 'denied'",
        )
        .await?,
        lost: undecided(ledger, sent).await?
            + scalar(ledger, UNFINISHED_ITEMS).await?
            + scalar(ledger, UNCLOSED_BATCHES).await?,
        captured_twice: scalar(ledger, DOUBLE_CAPTURES).await?,
        overspend: negative_samples as i64 + scalar(ledger, OVER_CAPTURES).await?,
        open_holds: scalar(ledger, OPEN_HOLDS).await?,
        drift: drift.len() as i64,
        events_lost: 0,
    })
}

/// Samples `available` of every account until stopped, counting negatives.
pub struct Sampler {
    stop: CancellationToken,
    task: JoinHandle<()>,
    samples: Arc<AtomicU64>,
    negative: Arc<AtomicU64>,
}

impl Sampler {
    pub fn start(ledger: Ledger) -> Self {
        let stop = CancellationToken::new();
        let samples = Arc::new(AtomicU64::new(0));
        let negative = Arc::new(AtomicU64::new(0));
        let task = {
            let (stop, samples, negative) = (stop.clone(), samples.clone(), negative.clone());
            tokio::spawn(async move {
                while !stop.is_cancelled() {
                    // A failed sample (PostgreSQL restarting) is skipped, not counted.
                    if let Ok(n) = scalar(
                        &ledger,
                        "SELECT count(*) FILTER (WHERE balance - held < 0 OR held < 0) FROM accounts",
                    )
                    .await
                    {
                        samples.fetch_add(1, Ordering::Relaxed);
                        negative.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                        _ = stop.cancelled() => {}
                    }
                }
            })
        };
        Self {
            stop,
            task,
            samples,
            negative,
        }
    }

    /// Stop sampling; returns (samples taken, negative samples).
    pub async fn finish(mut self) -> (u64, u64) {
        self.stop.cancel();
        let _ = (&mut self.task).await;
        (
            self.samples.load(Ordering::Relaxed),
            self.negative.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}
