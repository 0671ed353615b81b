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
use std::time::Duration;

use holdfast_common::ledger::{ItemOutcome, Ledger, Settled};
use holdfast_common::messages::ItemJob;
use holdfast_common::supervise::guard;
use holdfast_common::topology::{self, requeue, Publisher, SessionError};
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicNackOptions};
use lapin::Acker;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::batches::BatchStates;
use crate::config::WorkerConfig;
use crate::generator::Generator;
use crate::job::{Item, JobOutcome, Step};
use crate::settle::{settle_and_ack, settle_loop, Finished};

/// Return a delivery to its queue (counted against its delivery limit).
pub(crate) const REQUEUE: BasicNackOptions = BasicNackOptions {
    multiple: false,
    requeue: true,
};

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
    let batches = BatchStates::new(Duration::from_millis(config.settings.batch_state_ttl_ms));
    let result = loop {
        match session.next_group(shutdown, max).await {
            Ok(group) if group.is_empty() => break Ok(()),
            Ok(group) => {
                let item = Item {
                    ledger: ledger.clone(),
                    generator: generator.clone(),
                    publisher: publisher.clone(),
                    config: config.clone(),
                    done: Some(tx.clone()),
                    shutdown: shutdown.clone(),
                    batches: batches.clone(),
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

/// Find where the jobs of a group of deliveries stand (their batches' states
/// for first deliveries, their items' otherwise: [`crate::batches`]), then
/// start a task for each job that still has work to do. Runs as a task of its own, so
/// the consumer goes on taking deliveries (the prefetch bounds them).
pub(crate) async fn start_group(item: Item, group: Vec<Delivery>, tasks: TaskTracker) {
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
    let keys: Vec<(&Delivery, &ItemJob)> = jobs.iter().map(|(d, j)| (d, j)).collect();
    let states = match item.job_states(&keys).await {
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
                let ran = async {
                    match item.run_job(&delivery, job, state).await? {
                        Step::Settle(settlement) => item.finished(settlement, delivery).await,
                        Step::Done(_) => Ok(()),
                    }
                };
                match guard("worker", "jobs", ran).await {
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
pub(crate) fn report(result: Result<(), SessionError>) {
    if let Err(e) = result {
        tracing::warn!(
            error = format!("{e:#}"),
            "job not settled; it will be redelivered"
        );
    }
}

/// Process one delivery of the jobs queue from start to end, as the worker
/// role would, without a session or a settler: find where it stands, run
/// `generator`, capture, acknowledge, announce a batch it closes, and send a
/// sequential batch's next chunk. For tests and tools that drive the worker
/// one step at a time; a panic is not caught here.
pub async fn process_one(
    ledger: &Ledger,
    generator: Arc<dyn Generator>,
    publisher: &Publisher,
    config: &WorkerConfig,
    delivery: Delivery,
) -> Result<JobOutcome, SessionError> {
    let item = Item {
        ledger: ledger.clone(),
        generator,
        publisher: publisher.clone(),
        config: config.clone(),
        done: None,
        shutdown: CancellationToken::new(),
        batches: BatchStates::new(Duration::ZERO),
    };
    let job = match serde_json::from_slice::<ItemJob>(&delivery.data) {
        Ok(job) => job,
        Err(e) => {
            let reason = format!("not an item job: {e}");
            item.park(&delivery, &reason).await?;
            return Ok(JobOutcome::Parked { reason });
        }
    };
    let key = (job.batch_id.clone(), job.item_id.clone());
    let states = item.job_states(&[(&delivery, &job)]).await?;
    let settlement = match item
        .run_job(&delivery, job, states.get(&key).copied())
        .await?
    {
        Step::Settle(settlement) => settlement,
        Step::Done(outcome) => return Ok(outcome),
    };
    let finished = [Finished {
        settlement,
        delivery,
    }];
    let mut progress = Default::default();
    let settled = settle_and_ack(
        ledger,
        publisher,
        config,
        &finished,
        &mut progress,
        &item.shutdown,
    )
    .await;
    Ok(match settled.into_iter().next() {
        Some(Settled::Captured { captured, overrun }) => JobOutcome::Captured { captured, overrun },
        Some(Settled::Failed) => JobOutcome::Failed {
            reason: match &finished[0].settlement.outcome {
                ItemOutcome::Failed { reason } => reason.clone(),
                _ => String::new(),
            },
        },
        Some(Settled::Cancelled) => JobOutcome::Cancelled,
        Some(Settled::AlreadySettled { .. }) => JobOutcome::Duplicate,
        Some(Settled::Unknown) => JobOutcome::Unknown,
        None => JobOutcome::Returned,
    })
}
