//! One job: know where its item stands ([`crate::batches`]), run the generator (retrying what is
//! transient, catching a panic), and hand the outcome to the settler. A job
//! whose item is settled already is acknowledged without running again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use holdfast_common::faults::crash_point;
use holdfast_common::ledger::{wait_out, BatchState, ItemOutcome, ItemState, Ledger, Settlement};
use holdfast_common::messages::ItemJob;
use holdfast_common::telemetry::record;
use holdfast_common::topology::{
    delivery_count, json_properties, parked_headers, requeue, Publisher, SessionError,
};
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::batches::BatchStates;
use crate::config::WorkerConfig;
use crate::generator::{Generated, Generator, GeneratorError};
use crate::settle::Finished;

/// What a job's task needs.
#[derive(Clone)]
pub(crate) struct Item {
    pub(crate) ledger: Ledger,
    pub(crate) generator: Arc<dyn Generator>,
    pub(crate) publisher: Publisher,
    pub(crate) config: WorkerConfig,
    /// The settler; `None` when the caller settles itself ([`process_one`]).
    pub(crate) done: Option<mpsc::Sender<Finished>>,
    pub(crate) shutdown: CancellationToken,
    /// Batch states read recently, shared by every job of the session.
    pub(crate) batches: BatchStates,
}

/// What became of one job ([`process_one`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobOutcome {
    /// Ran and captured: `captured` (at most the reservation) and the
    /// `overrun` reported above it.
    Captured { captured: i64, overrun: i64 },
    /// The generator failed (or crashed on every delivery): not charged.
    Failed { reason: String },
    /// Its batch was cancelled before it started: not charged, not run.
    Cancelled,
    /// Its item was settled before (a duplicate delivery): acknowledged, not run again.
    Duplicate,
    /// The capture found no pending item (its batch closed meanwhile): acknowledged.
    Unknown,
    /// Not a job of this ledger, or not a job at all: parked in the dead-letter queue.
    Parked { reason: String },
    /// Handed back to its queue (the generator crashed before the last
    /// delivery, or the ledger was unavailable at shutdown).
    Returned,
}

/// Where a job stands once it has run: to be captured, or already dealt with.
pub(crate) enum Step {
    Settle(Settlement),
    Done(JobOutcome),
}

/// The generator either answered or crashed (panicked).
pub(crate) enum Ran {
    Answered(Result<Generated, GeneratorError>),
    Crashed(String),
}

/// (item state, batch state) by (batch id, item id).
pub(crate) type ItemStates = std::collections::HashMap<(String, String), (ItemState, BatchState)>;

impl Item {
    /// Run one job whose item is in `state` (item state, batch state), or
    /// does not exist (`None`).
    pub(crate) async fn run_job(
        &self,
        delivery: &Delivery,
        job: ItemJob,
        state: Option<(ItemState, BatchState)>,
    ) -> Result<Step, SessionError> {
        holdfast_common::faults::panic_point("worker.job", &self.config.names.namespace);
        // Look before running: a duplicate job must not pay for the work twice.
        match state {
            Some((ItemState::Pending, BatchState::Cancelling)) => {
                // The batch was cancelled before this item started: settle it
                // uncharged, without running the generator.
                let settlement = Settlement {
                    batch_id: job.batch_id,
                    item_id: job.item_id,
                    outcome: ItemOutcome::Cancelled,
                };
                return Ok(Step::Settle(settlement));
            }
            Some((ItemState::Pending, _)) => {}
            Some((item, _)) => {
                tracing::debug!(state = %item, "already settled; acknowledging the duplicate");
                counter_duplicate();
                ack(delivery).await?;
                return Ok(Step::Done(JobOutcome::Duplicate));
            }
            None => {
                let reason = "no such item in the ledger";
                self.park(delivery, reason).await?;
                return Ok(Step::Done(JobOutcome::Parked {
                    reason: reason.into(),
                }));
            }
        }
        let started = Instant::now();
        let outcome = match self.generate(&job).await {
            Ran::Answered(Ok(generated)) => ItemOutcome::Succeeded {
                actual_cost: cost_of(&job, generated),
            },
            Ran::Answered(Err(e)) => {
                tracing::info!(error = %e, "item failed; not charged");
                ItemOutcome::Failed {
                    reason: e.to_string(),
                }
            }
            Ran::Crashed(why) => {
                let deliveries = delivery_count(&delivery.properties) + 1;
                if deliveries > self.config.queues.job_delivery_limit {
                    // The last delivery RabbitMQ allows: fail the item (uncharged) and park the job.
                    tracing::error!(%why, deliveries, "generator crashed on every delivery; failing the item");
                    self.park_copy(
                        delivery,
                        &format!("generator crashed {deliveries} times: {why}"),
                    )
                    .await?;
                    ItemOutcome::Failed {
                        reason: format!("generator crashed {deliveries} times: {why}"),
                    }
                } else {
                    tracing::warn!(%why, deliveries, "generator crashed; returning the job");
                    requeue(delivery).await?;
                    return Ok(Step::Done(JobOutcome::Returned));
                }
            }
        };
        record::item_seconds(started.elapsed());
        crash_point("worker.before_capture");
        let settlement = Settlement {
            batch_id: job.batch_id,
            item_id: job.item_id,
            outcome,
        };
        Ok(Step::Settle(settlement))
    }

    /// The state of each job's item and batch. While the ledger is
    /// unavailable the jobs are kept (unacknowledged) and the ledger asked
    /// again with backoff, not returned to the queue: each return counts
    /// against a job's delivery limit, which is there for poison jobs, not for
    /// a database restart. An error means a shutdown came meanwhile, or a
    /// non-transient failure: the caller returns the jobs.
    pub(crate) async fn item_states(
        &self,
        keys: &[(&str, &str)],
    ) -> Result<ItemStates, holdfast_common::ledger::LedgerError> {
        wait_out("the jobs of a group", &self.shutdown, || {
            self.ledger.item_states(keys)
        })
        .await
    }

    /// The state of each batch among `ids` (absent: unknown), waiting out
    /// an unavailable ledger as [`Item::item_states`] does.
    pub(crate) async fn batch_states(
        &self,
        ids: &[&str],
    ) -> Result<std::collections::HashMap<String, BatchState>, holdfast_common::ledger::LedgerError>
    {
        wait_out("the batches of a group", &self.shutdown, || {
            self.ledger.batch_states(ids)
        })
        .await
    }

    /// Hand a settled item to the settler, which captures it and then acks.
    pub(crate) async fn finished(
        &self,
        settlement: Settlement,
        delivery: Delivery,
    ) -> Result<(), SessionError> {
        let stopped = || SessionError::Task("the settler stopped".into());
        self.done
            .as_ref()
            .ok_or_else(stopped)?
            .send(Finished {
                settlement,
                delivery,
            })
            .await
            .map_err(|_| stopped())
    }

    /// Run the generator, retrying transient failures with backoff. A panic
    /// is caught (the generator runs in its own task) and reported as a crash.
    async fn generate(&self, job: &ItemJob) -> Ran {
        enum Failure {
            Generator(GeneratorError),
            Crash(String),
        }
        let policy = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(
                self.config.settings.generator_retry_ms,
            ))
            .with_max_delay(Duration::from_secs(10))
            .with_max_times(self.config.settings.generator_retries)
            .with_jitter();
        let attempt = || {
            let (generator, job) = (self.generator.clone(), job.clone());
            async move {
                match tokio::spawn(async move { generator.generate(&job).await }).await {
                    Ok(result) => result.map_err(Failure::Generator),
                    Err(e) if e.is_panic() => Err(Failure::Crash(panic_message(e))),
                    Err(e) => Err(Failure::Crash(e.to_string())),
                }
            }
        };
        let result = attempt
            .retry(policy)
            .when(|f| matches!(f, Failure::Generator(e) if e.is_transient()))
            .notify(|f, after| {
                if let Failure::Generator(e) = f {
                    tracing::info!(error = %e, ?after, "generator: retrying");
                }
            })
            .await;
        match result {
            Ok(g) => Ran::Answered(Ok(g)),
            Err(Failure::Generator(e)) => Ran::Answered(Err(e)),
            Err(Failure::Crash(why)) => Ran::Crashed(why),
        }
    }

    /// Park the job in the jobs dead-letter queue with the reason, then ack it.
    pub(crate) async fn park(&self, delivery: &Delivery, reason: &str) -> Result<(), SessionError> {
        tracing::warn!(%reason, "parking job in the dead-letter queue");
        self.park_copy(delivery, reason).await?;
        ack(delivery).await
    }

    async fn park_copy(&self, delivery: &Delivery, reason: &str) -> Result<(), SessionError> {
        let mut props = json_properties().with_headers(parked_headers(reason));
        if let Some(id) = delivery.properties.message_id() {
            props = props.with_message_id(id.clone());
        }
        self.publisher
            .publish_confirmed(
                &self.config.names.dead_exchange(),
                "jobs",
                &delivery.data,
                props,
            )
            .await?;
        record::dead_lettered("jobs");
        Ok(())
    }
}

/// The cost to capture: a negative report is a generator bug; charge the reservation.
pub(crate) fn cost_of(job: &ItemJob, generated: Generated) -> Option<i64> {
    match generated.actual_cost {
        Some(c) if c < 0 => {
            tracing::warn!(
                reported = c,
                "generator reported a negative cost; charging the reservation"
            );
            None
        }
        other => other,
    }
    .inspect(|&c| {
        if c > job.reserved {
            tracing::warn!(
                actual = c,
                reserved = job.reserved,
                "actual cost above the reservation; capped"
            );
        }
    })
}

pub(crate) fn panic_message(e: tokio::task::JoinError) -> String {
    let payload = e.into_panic();
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

pub(crate) fn counter_duplicate() {
    record::duplicate_job();
}

pub(crate) async fn ack(delivery: &Delivery) -> Result<(), SessionError> {
    if !delivery.acker.ack(BasicAckOptions::default()).await? {
        record::ack_lost();
    }
    Ok(())
}
