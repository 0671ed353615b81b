//! The worker role: consume item jobs, run the generator, capture the actual
//! cost, and acknowledge only after the capture is committed.
//!
//! Each delivery runs in its own task (at most `worker_prefetch` at once, the
//! broker's QoS bounds it). Finished items go to one settler task that
//! captures whatever has accumulated in one transaction, then acks each job:
//! under load many items share a commit, idle there is no added wait.
//!
//! While PostgreSQL is away the worker keeps its deliveries and asks again
//! with backoff instead of returning them: a return counts against the job's
//! delivery limit, which is meant for poison jobs, and an outage of a minute
//! or two would otherwise dead-letter healthy jobs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use holdfast_common::dispatch::dispatch;
use holdfast_common::events;
use holdfast_common::faults::crash_point;
use holdfast_common::ledger::{
    wait_out, BatchState, ItemOutcome, ItemState, Ledger, Settled, Settlement,
};
use holdfast_common::messages::{Attempt, ItemJob};
use holdfast_common::supervise::guard;
use holdfast_common::telemetry::record;
use holdfast_common::topology::{
    self, delivery_count, json_properties, parked_headers, requeue, Names, Publisher, SessionError,
};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicNackOptions};
use lapin::Acker;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::WorkerConfig;
use crate::generator::{Generated, Generator, GeneratorError};

/// Jobs of a sequential batch's next chunk published per confirm wait.
const CHUNK_CONFIRM_WINDOW: usize = 500;

/// Return a delivery to its queue (counted against its delivery limit).
const REQUEUE: BasicNackOptions = BasicNackOptions {
    multiple: false,
    requeue: true,
};

/// A finished item waiting for its capture and ack.
struct Finished {
    settlement: Settlement,
    delivery: Delivery,
}

/// Run the worker role until `shutdown`, reconnecting when the broker goes away.
pub async fn run(
    ledger: Ledger,
    config: WorkerConfig,
    generator: Arc<dyn Generator>,
    shutdown: CancellationToken,
) {
    topology::supervise("worker", "jobs", "worker", shutdown.clone(), || {
        session(&ledger, &config, &generator, &shutdown)
    })
    .await;
}

async fn session(
    ledger: &Ledger,
    config: &WorkerConfig,
    generator: &Arc<dyn Generator>,
    shutdown: &CancellationToken,
) -> Result<(), SessionError> {
    // QoS is applied on every (re)connection: a fresh channel has none.
    let mut session = topology::Session::open(
        &config.amqp_url,
        "holdfast-worker",
        &config.names,
        &config.queues,
        &config.names.jobs(),
        config.settings.worker_prefetch,
    )
    .await?;
    let publisher = session.publisher.clone();
    let tag = session.consumer.tag();
    tracing::info!(queue = %config.names.jobs(), generator = generator.name(), "worker consuming");

    let (tx, rx) =
        mpsc::channel::<Finished>(usize::from(config.settings.worker_prefetch).max(1) * 2);
    let mut settler = tokio::spawn(settle_loop(
        ledger.clone(),
        rx,
        publisher.clone(),
        config.clone(),
        shutdown.clone(),
    ));
    let tasks = TaskTracker::new();
    let max = usize::from(config.settings.worker_prefetch).max(1);
    let result = loop {
        match session.next_group(shutdown, max).await {
            Ok(group) if group.is_empty() => break Ok(()),
            Ok(group) => {
                let item = Item {
                    ledger: ledger.clone(),
                    generator: generator.clone(),
                    publisher: publisher.clone(),
                    config: config.clone(),
                    done: tx.clone(),
                    shutdown: shutdown.clone(),
                };
                let ackers: Vec<Acker> = group.iter().map(|d| d.acker.clone()).collect();
                let started = guard("worker", "jobs", start_group(item, group, tasks.clone()));
                tasks.spawn(async move {
                    if let Err(panicked) = started.await {
                        tracing::error!(jobs = ackers.len(), panic = %panicked.0,
                            "starting a group of jobs panicked; returning them");
                        for acker in &ackers {
                            let _ = acker.nack(REQUEUE).await;
                        }
                    }
                });
            }
            Err(e) => break Err(SessionError::from(e)),
        }
    };
    // Stop taking jobs, let the running ones finish, capture and ack.
    let _ = session
        .channel
        .basic_cancel(tag, BasicCancelOptions::default())
        .await;
    tasks.close();
    let grace = Duration::from_secs(config.settings.shutdown_timeout_secs);
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        tracing::warn!(
            ?grace,
            "items still running at the shutdown timeout; they will be redelivered"
        );
    }
    drop(tx);
    if tokio::time::timeout(grace, &mut settler).await.is_err() {
        settler.abort();
        tracing::warn!(
            "captures still pending at the shutdown timeout; their jobs will be redelivered"
        );
    }
    session.close().await;
    result
}

/// What a job's task needs.
#[derive(Clone)]
struct Item {
    ledger: Ledger,
    generator: Arc<dyn Generator>,
    publisher: Publisher,
    config: WorkerConfig,
    done: mpsc::Sender<Finished>,
    shutdown: CancellationToken,
}

/// The generator either answered or crashed (panicked).
enum Ran {
    Answered(Result<Generated, GeneratorError>),
    Crashed(String),
}

/// (item state, batch state) by (batch id, item id).
type ItemStates = std::collections::HashMap<(String, String), (ItemState, BatchState)>;

/// Look up the items of a group of deliveries in one query, then start a
/// task for each job that still has work to do. Runs as a task of its own, so
/// the consumer goes on taking deliveries (the prefetch bounds them).
async fn start_group(item: Item, group: Vec<Delivery>, tasks: TaskTracker) {
    let mut jobs = Vec::with_capacity(group.len());
    for delivery in group {
        match serde_json::from_slice::<ItemJob>(&delivery.data) {
            Ok(job) => jobs.push((delivery, job)),
            Err(e) => {
                let (item, why) = (item.clone(), format!("not an item job: {e}"));
                tasks.spawn(async move { report(item.park(&delivery, &why).await) });
            }
        }
    }
    if jobs.is_empty() {
        return;
    }
    let keys: Vec<(&str, &str)> = jobs
        .iter()
        .map(|(_, j)| (j.batch_id.as_str(), j.item_id.as_str()))
        .collect();
    let states = match item.item_states(&keys).await {
        Ok(states) => states,
        Err(e) => {
            tracing::warn!(error = %e, jobs = jobs.len(), "no answer from the ledger; returning the jobs");
            if !item.shutdown.is_cancelled() {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            for (delivery, _) in &jobs {
                let _ = requeue(delivery).await;
            }
            return;
        }
    };
    for (delivery, job) in jobs {
        let state = states
            .get(&(job.batch_id.clone(), job.item_id.clone()))
            .cloned();
        let span = tracing::info_span!("item", batch_id = %job.batch_id, item_id = %job.item_id);
        let item = item.clone();
        let acker = delivery.acker.clone();
        tasks.spawn(
            async move {
                match guard("worker", "jobs", item.run_job(delivery, job, state)).await {
                    Ok(ran) => report(ran),
                    // The generator's own panics are caught in `generate`;
                    // this is one of ours. The job comes back, and past its
                    // delivery limit RabbitMQ parks it; the batch's deadline
                    // fails the item, uncharged.
                    Err(panicked) => {
                        tracing::error!(panic = %panicked.0, "handling the job panicked; returning it");
                        let _ = acker.nack(REQUEUE).await;
                    }
                }
            }
            .instrument(span),
        );
    }
}

/// Log a job that could not be settled (it stays unacknowledged).
fn report(result: Result<(), SessionError>) {
    if let Err(e) = result {
        tracing::warn!(
            error = format!("{e:#}"),
            "job not settled; it will be redelivered"
        );
    }
}

impl Item {
    /// Run one job whose item is in `state` (item state, batch state), or
    /// does not exist (`None`).
    async fn run_job(
        self,
        delivery: Delivery,
        job: ItemJob,
        state: Option<(ItemState, BatchState)>,
    ) -> Result<(), SessionError> {
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
                return self.finished(settlement, delivery).await;
            }
            Some((ItemState::Pending, _)) => {}
            Some((item, _)) => {
                tracing::debug!(state = %item, "already settled; acknowledging the duplicate");
                counter_duplicate();
                ack(&delivery).await?;
                return Ok(());
            }
            None => return self.park(&delivery, "no such item in the ledger").await,
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
                        &delivery,
                        &format!("generator crashed {deliveries} times: {why}"),
                    )
                    .await?;
                    ItemOutcome::Failed {
                        reason: format!("generator crashed {deliveries} times: {why}"),
                    }
                } else {
                    tracing::warn!(%why, deliveries, "generator crashed; returning the job");
                    requeue(&delivery).await?;
                    return Ok(());
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
        self.finished(settlement, delivery).await
    }

    /// The state of each job's item and batch. While the ledger is
    /// unavailable the jobs are kept (unacknowledged) and the ledger asked
    /// again with backoff, not returned to the queue: each return counts
    /// against a job's delivery limit, which is there for poison jobs, not for
    /// a database restart. An error means a shutdown came meanwhile, or a
    /// non-transient failure: the caller returns the jobs.
    async fn item_states(
        &self,
        keys: &[(&str, &str)],
    ) -> Result<ItemStates, holdfast_common::ledger::LedgerError> {
        wait_out("the jobs of a group", &self.shutdown, || {
            self.ledger.item_states(keys)
        })
        .await
    }

    /// Hand a settled item to the settler, which captures it and then acks.
    async fn finished(
        &self,
        settlement: Settlement,
        delivery: Delivery,
    ) -> Result<(), SessionError> {
        self.done
            .send(Finished {
                settlement,
                delivery,
            })
            .await
            .map_err(|_| SessionError::Task("the settler stopped".into()))
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
    async fn park(&self, delivery: &Delivery, reason: &str) -> Result<(), SessionError> {
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
fn cost_of(job: &ItemJob, generated: Generated) -> Option<i64> {
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

fn panic_message(e: tokio::task::JoinError) -> String {
    let payload = e.into_panic();
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

fn counter_duplicate() {
    record::duplicate_job();
}

async fn ack(delivery: &Delivery) -> Result<(), SessionError> {
    if !delivery.acker.ack(BasicAckOptions::default()).await? {
        record::ack_lost();
    }
    Ok(())
}

/// Capture finished items in batches, ack them after the commit, announce
/// closed batches, and publish coalesced progress.
async fn settle_loop(
    ledger: Ledger,
    mut rx: mpsc::Receiver<Finished>,
    publisher: Publisher,
    config: WorkerConfig,
    shutdown: CancellationToken,
) {
    let names = &config.names;
    let max = config.settings.settle_batch.max(1);
    let mut progress: std::collections::BTreeSet<String> = Default::default();
    let mut tick = tokio::time::interval(Duration::from_millis(
        config.settings.progress_interval_ms.max(10),
    ));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            f = rx.recv() => match f {
                Some(f) => f,
                None => break,
            },
            _ = tick.tick() => {
                publish_progress(&ledger, &publisher, names, &mut progress).await;
                continue;
            }
        };
        let mut batch = vec![first];
        while batch.len() < max {
            match rx.try_recv() {
                Ok(f) => batch.push(f),
                Err(_) => break,
            }
        }
        let settled = guard(
            "worker",
            "settler",
            settle_and_ack(
                &ledger,
                &publisher,
                &config,
                &batch,
                &mut progress,
                &shutdown,
            ),
        )
        .await;
        if let Err(panicked) = settled {
            // Whatever the capture did rolled back or committed whole: the
            // jobs come back, and a redelivery captures each at most once.
            let items: Vec<(&str, &str)> = batch
                .iter()
                .map(|f| {
                    (
                        f.settlement.batch_id.as_str(),
                        f.settlement.item_id.as_str(),
                    )
                })
                .collect();
            tracing::error!(?items, panic = %panicked.0, "capturing panicked; returning the jobs");
            for f in &batch {
                let _ = requeue(&f.delivery).await;
            }
        }
    }
    publish_progress(&ledger, &publisher, names, &mut progress).await;
}

/// Capture one batch of finished items, ack their jobs after the commit,
/// announce what closed and dispatch what a sequential batch reserved next.
async fn settle_and_ack(
    ledger: &Ledger,
    publisher: &Publisher,
    config: &WorkerConfig,
    batch: &[Finished],
    progress: &mut std::collections::BTreeSet<String>,
    shutdown: &CancellationToken,
) {
    let names = &config.names;
    holdfast_common::faults::panic_point("worker.settle", &names.namespace);
    let settlements: Vec<Settlement> = batch.iter().map(|f| f.settlement.clone()).collect();
    let report = match settle_patiently(ledger, &settlements, shutdown).await {
        Ok(r) => r,
        Err(e) => {
            // The work is done but not captured: return the jobs; the
            // redelivery captures them (each at most once).
            tracing::error!(error = %e, items = batch.len(), "capture failed; returning the jobs");
            for f in batch {
                let _ = requeue(&f.delivery).await;
            }
            return;
        }
    };
    crash_point("worker.after_capture");
    for (f, result) in batch.iter().zip(&report.results) {
        if *result == Settled::Unknown {
            tracing::warn!(batch_id = %f.settlement.batch_id, item_id = %f.settlement.item_id,
                    "captured nothing: no such pending item");
        }
        match f.delivery.acker.ack(BasicAckOptions::default()).await {
            Ok(true) => {}
            Ok(false) | Err(_) => record::ack_lost(),
        }
    }
    progress.extend(report.progress);
    for closed in &report.closed {
        progress.remove(&closed.batch_id);
    }
    if let Err(e) = events::completed(publisher, names, &report.closed).await {
        tracing::warn!(error = %e, "could not announce a closed batch");
    }
    // Sequential batches whose next chunk this settle reserved: send its jobs
    // (a reconciler does it after the lease if this fails).
    for batch_id in &report.advanced {
        if let Err(e) = dispatch(
            ledger,
            publisher,
            names,
            batch_id,
            Attempt::First,
            CHUNK_CONFIRM_WINDOW,
        )
        .await
        {
            tracing::warn!(%batch_id, error = %e, "next chunk not dispatched; the reconciler will");
        }
    }
}

/// Settle, asking again with backoff while the ledger is unavailable (the
/// deliveries stay unacknowledged meanwhile, so no delivery is spent on an
/// outage). Gives up on a non-transient error, or once shutting down.
async fn settle_patiently(
    ledger: &Ledger,
    settlements: &[Settlement],
    shutdown: &CancellationToken,
) -> Result<holdfast_common::ledger::SettleReport, holdfast_common::ledger::LedgerError> {
    wait_out("captures", shutdown, || ledger.settle(settlements)).await
}

/// One `batch.progress` event for each batch settled since the last one,
/// with its figures as they are now.
async fn publish_progress(
    ledger: &Ledger,
    publisher: &Publisher,
    names: &Names,
    progress: &mut std::collections::BTreeSet<String>,
) {
    if progress.is_empty() {
        return;
    }
    let ids: Vec<&str> = progress.iter().map(String::as_str).collect();
    let figures = match ledger.figures(&ids).await {
        // A batch that finished meanwhile gets its `completed` event instead.
        Ok(f) => f
            .into_iter()
            .filter(|(.., f)| f.pending > 0)
            .collect::<Vec<_>>(),
        Err(e) => {
            tracing::debug!(error = %e, "progress figures not read");
            return;
        }
    };
    progress.clear();
    if let Err(e) = events::progress(publisher, names, &figures).await {
        tracing::debug!(error = %e, "progress events not sent");
    }
}
