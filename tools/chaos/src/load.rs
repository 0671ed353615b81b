//! The load: producers that publish batch requests the way any AMQP client
//! does (through [`Producer`]), and that keep their promise through broker
//! restarts: a request is sent again, same `batch_id`, until the broker
//! confirms it. The ledger's idempotency makes the resend safe.

use std::time::Duration;

use holdfast_common::config::QueueSettings;
use holdfast_common::messages::Decision;
use holdfast_common::topology::Names;
use serde_json::{json, Value};
use tokio::task::JoinSet;

use crate::checks::Sent;
use holdfast::producer::Producer;

/// How long one request may take to be confirmed, resends included.
const SEND_DEADLINE: Duration = Duration::from_secs(180);

/// The account the scenarios' producers charge (the concurrency run has its own).
pub const ACCOUNT: &str = "acme";

/// One batch request.
#[derive(Clone, Debug)]
pub struct Request {
    pub batch_id: String,
    pub body: Vec<u8>,
}

impl Request {
    /// A request of `mode` for `items` (JSON item objects).
    pub fn new(batch_id: &str, account: &str, mode: &str, items: Vec<Value>) -> Self {
        Self::from_json(
            batch_id,
            json!({"batch_id": batch_id, "account_id": account, "mode": mode, "items": items}),
        )
    }

    pub fn from_json(batch_id: &str, body: Value) -> Self {
        Self {
            batch_id: batch_id.to_string(),
            body: body.to_string().into_bytes(),
        }
    }
}

/// `n` items costing `cost` each, each taking `latency_ms` in the simulate generator.
pub fn items(n: usize, cost: i64, latency_ms: u64) -> Vec<Value> {
    (0..n)
        .map(|i| {
            json!({"item_id": format!("i{i}"), "estimated_cost": cost,
                   "payload": {"simulate": {"latency_ms": latency_ms}}})
        })
        .collect()
}

/// A producer that reconnects by itself and re-sends what was not confirmed.
pub struct ResilientProducer {
    amqp_url: String,
    names: Names,
    queues: QueueSettings,
    inner: Option<Producer>,
}

impl ResilientProducer {
    pub fn new(amqp_url: &str, names: &Names, queues: &QueueSettings) -> Self {
        Self {
            amqp_url: amqp_url.to_string(),
            names: names.clone(),
            queues: queues.clone(),
            inner: None,
        }
    }

    /// Publish `request` until the broker confirms it (the correlation id is the batch id).
    pub async fn send(&mut self, request: &Request) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + SEND_DEADLINE;
        loop {
            let attempt = async {
                if self.inner.is_none() {
                    self.inner =
                        Some(Producer::connect(&self.amqp_url, &self.names, &self.queues).await?);
                }
                let producer = self.inner.as_ref().expect("connected above");
                tokio::time::timeout(
                    Duration::from_secs(30),
                    producer.send(&request.body, &request.batch_id),
                )
                .await
                .map_err(|_| anyhow::anyhow!("no confirm within 30s"))?
            };
            match attempt.await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    // Unconfirmed: the broker may or may not have it. Send it
                    // again on a fresh connection; a duplicate is replayed.
                    self.inner = None;
                    anyhow::ensure!(
                        tokio::time::Instant::now() < deadline,
                        "request {} not confirmed within {SEND_DEADLINE:?}: {e:#}",
                        request.batch_id
                    );
                    tracing::debug!(batch_id = %request.batch_id, error = format!("{e:#}"), "resending");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
    }

    /// The decision for `batch_id`, if it arrives within `timeout` (a reply
    /// queue does not survive a broker restart: `None` then).
    pub async fn decision(&mut self, batch_id: &str, timeout: Duration) -> Option<Decision> {
        let producer = self.inner.as_mut()?;
        match producer.decision_for(batch_id, timeout).await {
            Ok(d) => Some(d),
            Err(_) => {
                self.inner = None;
                None
            }
        }
    }

    pub async fn close(self) {
        if let Some(p) = self.inner {
            p.close().await;
        }
    }
}

/// What one producer got done.
#[derive(Default)]
struct Report {
    confirmed: Vec<String>,
    rejected: Vec<String>,
}

/// Producers running their plans; aborted if dropped before [`Load::finish`].
pub struct Load {
    tasks: JoinSet<anyhow::Result<Report>>,
}

impl Load {
    /// One producer task per plan. Each sends its requests in order, `pace`
    /// apart; with `await_decisions`, it waits for each decision (and counts
    /// the `rejected` ones, which never reach the ledger).
    pub fn start(
        amqp_url: &str,
        names: &Names,
        queues: &QueueSettings,
        plans: Vec<Vec<Request>>,
        pace: Duration,
        await_decisions: bool,
    ) -> Self {
        let mut tasks = JoinSet::new();
        for plan in plans {
            let mut producer = ResilientProducer::new(amqp_url, names, queues);
            tasks.spawn(async move {
                let mut report = Report::default();
                for request in plan {
                    producer.send(&request).await?;
                    report.confirmed.push(request.batch_id.clone());
                    if await_decisions {
                        if let Some(Decision::Rejected(_)) = producer
                            .decision(&request.batch_id, Duration::from_secs(60))
                            .await
                        {
                            report.rejected.push(request.batch_id.clone());
                        }
                    }
                    tokio::time::sleep(pace).await;
                }
                producer.close().await;
                Ok(report)
            });
        }
        Self { tasks }
    }

    /// Wait for every producer; what they sent.
    pub async fn finish(mut self) -> anyhow::Result<Sent> {
        let mut sent = Sent::default();
        while let Some(joined) = self.tasks.join_next().await {
            let report = joined??;
            sent.confirmed.extend(report.confirmed);
            sent.rejected.extend(report.rejected);
        }
        Ok(sent)
    }
}

/// `producers` plans of `each` all-or-nothing batches of varied sizes and costs.
pub fn plans(
    prefix: &str,
    producers: usize,
    each: usize,
    sizes: std::ops::Range<usize>,
    latency_ms: u64,
) -> Vec<Vec<Request>> {
    let span = sizes.end.saturating_sub(sizes.start).max(1);
    (0..producers)
        .map(|p| {
            (0..each)
                .map(|b| {
                    let id = format!("{prefix}-p{p}-b{b}");
                    let n = sizes.start + (p * 7 + b * 5) % span;
                    let cost = 1 + ((p + 3 * b) % 9) as i64;
                    Request::new(&id, ACCOUNT, "all_or_nothing", items(n, cost, latency_ms))
                })
                .collect()
        })
        .collect()
}
