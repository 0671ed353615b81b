//! The coordinator role: consume batch requests, decide each one in the
//! ledger, answer, dispatch the granted ones, then acknowledge.
//!
//! The request is acknowledged only after the decision is committed, answered
//! and (when granted) every job is confirmed by the broker. A crash anywhere
//! before that leaves the request unacknowledged: RabbitMQ delivers it again,
//! the ledger replays the same decision, and the dispatch resumes.

use std::sync::Arc;
use std::time::Duration;

use crate::config::CoordinatorConfig;
use holdfast_common::events::{self, ReplyTo};
use holdfast_common::ledger::{wait_out, Ledger, LedgerError};
use holdfast_common::messages::{Decision, Rejected};
use holdfast_common::supervise::{guard, Panicked};
use holdfast_common::telemetry::record;
use holdfast_common::topology::{self, SessionError};
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::decide::{Decider, HandleError, Published};

fn reply_of(delivery: &Delivery) -> ReplyTo {
    ReplyTo::of(&delivery.properties)
}

/// Run the coordinator role until `shutdown`: `coordinator_consumers`
/// consumers, each on its own connection, each restarted when it fails.
pub async fn run(ledger: Ledger, config: CoordinatorConfig, shutdown: CancellationToken) {
    let tasks = tokio_util::task::TaskTracker::new();
    for n in 0..config.settings.coordinator_consumers.max(1) {
        let (ledger, config, shutdown) = (ledger.clone(), config.clone(), shutdown.clone());
        tasks.spawn(async move {
            let name = format!("coordinator-{n}");
            topology::supervise("coordinator", "requests", &name, shutdown.clone(), || {
                consume(&ledger, &config, &shutdown)
            })
            .await;
        });
    }
    {
        let (ledger, config, shutdown) = (ledger.clone(), config.clone(), shutdown.clone());
        tasks.spawn(async move {
            topology::supervise(
                "coordinator",
                "previews",
                "previews",
                shutdown.clone(),
                || crate::previews::consume(&ledger, &config, &shutdown),
            )
            .await;
        });
    }
    tasks.close();
    tasks.wait().await;
}

/// One consumer session: connect, declare, consume until shutdown or failure.
async fn consume(
    ledger: &Ledger,
    config: &CoordinatorConfig,
    shutdown: &CancellationToken,
) -> Result<(), SessionError> {
    let mut session = topology::Session::open(
        &config.amqp_url,
        "holdfast-coordinator",
        &config.names,
        &config.queues,
        &config.names.requests(),
        config.settings.coordinator_prefetch,
    )
    .await?;
    let decider = Arc::new(Decider::new(
        ledger.clone(),
        config.clone(),
        session.publisher.clone(),
    ));
    tracing::info!(queue = %config.names.requests(), "coordinator consuming");
    let max = usize::from(config.settings.coordinator_prefetch).max(1);
    // The previous group's tail (its confirms, dispatch record and acks),
    // running while this consumer takes and decides the next group. One at a
    // time, so a broker or ledger failure surfaces before a third group
    // starts. Dropping the handle (a lost connection) stops the tail: its
    // requests are unacknowledged and come back, as after a crash.
    let mut tail: Option<AbortOnDropHandle<Result<(), SessionError>>> = None;
    loop {
        let group = session.next_group(shutdown, max).await?;
        if group.is_empty() {
            break;
        }
        let requests: Vec<(&[u8], ReplyTo)> = group
            .iter()
            .map(|d| (d.data.as_slice(), reply_of(d)))
            .collect();
        let decided = guard("coordinator", "requests", decider.decide_many(&requests));
        let decided = session.while_connected(decided).await?;
        drop(requests);
        if let Some(previous) = tail.take() {
            session.while_connected(previous).await???;
        }
        let published = match decided {
            Ok(published) => published?,
            Err(panicked) => {
                // Nothing of the group was acknowledged: take its requests
                // one at a time, so that only the one at fault is held back.
                tracing::error!(batch_ids = ?batch_ids(&group), panic = %panicked.0,
                    "deciding a group of requests panicked; handling each on its own");
                for delivery in &group {
                    session
                        .while_connected(process_alone(&decider, delivery, shutdown))
                        .await??;
                }
                continue;
            }
        };
        let (decider, shutdown) = (decider.clone(), shutdown.clone());
        tail = Some(AbortOnDropHandle::new(tokio::spawn(async move {
            finish_group(&decider, &group, published, &shutdown).await
        })));
    }
    if let Some(previous) = tail.take() {
        session.while_connected(previous).await???;
    }
    // Unacknowledged prefetched requests return to the queue when the channel closes.
    session.close().await;
    Ok(())
}

/// Wait for a decided group's confirms and dispatch record, then settle each
/// delivery with the broker. A request the ledger could not decide now goes
/// through [`process`] on its own, which waits out an outage or parks what
/// keeps failing.
async fn finish_group(
    decider: &Decider,
    group: &[Delivery],
    published: Published,
    shutdown: &CancellationToken,
) -> Result<(), SessionError> {
    let outcomes = match guard("coordinator", "requests", published.finish(decider)).await {
        Ok(outcomes) => outcomes?,
        Err(panicked) => {
            tracing::error!(batch_ids = ?batch_ids(group), panic = %panicked.0,
                "finishing a group of requests panicked; handling each on its own");
            for delivery in group {
                process_alone(decider, delivery, shutdown).await?;
            }
            return Ok(());
        }
    };
    for (delivery, outcome) in group.iter().zip(outcomes) {
        match outcome {
            Ok(_) => {
                if !delivery.acker.ack(BasicAckOptions::default()).await? {
                    record::ack_lost();
                }
            }
            Err(_) => process_alone(decider, delivery, shutdown).await?,
        }
    }
    Ok(())
}

/// The batch ids of a group's requests, as far as they parse (for logs).
fn batch_ids(group: &[Delivery]) -> Vec<String> {
    group
        .iter()
        .map(|d| batch_id_of(&d.data).unwrap_or_else(|| "-".into()))
        .collect()
}

/// The `batch_id` of a request body, if it has one.
fn batch_id_of(body: &[u8]) -> Option<String> {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("batch_id").and_then(|b| b.as_str()).map(String::from))
}

/// [`process`], with a panic caught: see [`poisoned`].
async fn process_alone(
    decider: &Decider,
    delivery: &Delivery,
    shutdown: &CancellationToken,
) -> Result<(), SessionError> {
    match guard(
        "coordinator",
        "requests",
        process(decider, delivery, shutdown),
    )
    .await
    {
        Ok(processed) => processed,
        Err(panicked) => poisoned(decider, delivery, panicked).await,
    }
}

/// A request whose handling panicked. Before its last delivery it goes back
/// to the queue (RabbitMQ counts the delivery). On the last one it is parked
/// with the reason, and whatever it holds is let go: a granted batch is
/// cancelled (nothing new starts, everything not captured is released, and
/// its `completed` event says so); a request that was never decided is
/// answered `rejected`. If the ledger cannot be reached for the cancel, the
/// reconciler releases the hold at the batch's execution deadline.
async fn poisoned(
    decider: &Decider,
    delivery: &Delivery,
    panicked: Panicked,
) -> Result<(), SessionError> {
    let batch_id = batch_id_of(&delivery.data);
    let deliveries = topology::delivery_count(&delivery.properties) + 1;
    tracing::error!(batch_id = batch_id.as_deref().unwrap_or("-"), deliveries, panic = %panicked.0,
        "handling the request panicked");
    if deliveries <= decider.config.queues.request_delivery_limit {
        topology::requeue(delivery).await?;
        return Ok(());
    }
    let why = format!(
        "handling it panicked on {deliveries} deliveries ({}); parked for an operator",
        panicked.0
    );
    let mut answered = false;
    if let Some(id) = &batch_id {
        match decider.ledger.cancel_batch(id).await {
            Ok(cancelled) => {
                tracing::warn!(batch_id = %id, state = %cancelled.state,
                    "cancelled the batch of a request that kept panicking; its credits are released");
                // A batch that closed at once: its completed event is in the outbox.
                answered = true;
            }
            // Denied, finished, or never decided: it holds nothing.
            Err(LedgerError::NotFound(_) | LedgerError::WrongState(_)) => {}
            Err(e) => tracing::error!(batch_id = %id, error = %e,
                "could not cancel the batch of a request that kept panicking; the reconciler releases it at its deadline"),
        }
    }
    decider.park(&delivery.data, &why).await?;
    if !answered {
        let rejected = Rejected::one(batch_id, "body", why);
        events::decision(
            &decider.publisher,
            &decider.config.names,
            &reply_of(delivery),
            &Decision::Rejected(rejected),
        )
        .await?;
    }
    if !delivery.acker.ack(BasicAckOptions::default()).await? {
        record::ack_lost();
    }
    Ok(())
}

/// Handle one delivery and settle it with the broker. A ledger outage is
/// waited out here with backoff (the request stays ours, unacknowledged): a
/// valid request is never dead-lettered because PostgreSQL blinked.
async fn process(
    decider: &Decider,
    delivery: &Delivery,
    shutdown: &CancellationToken,
) -> Result<(), SessionError> {
    let reply = reply_of(delivery);
    let handled = wait_out("a batch request", shutdown, || {
        decider.handle(&delivery.data, &reply)
    })
    .await;
    match handled {
        Ok(_) => {
            if !delivery.acker.ack(BasicAckOptions::default()).await? {
                record::ack_lost();
            }
            Ok(())
        }
        // Still unavailable when the shutdown came: another coordinator takes it.
        Err(HandleError::Ledger(e)) if e.is_transient() => {
            topology::requeue(delivery).await?;
            Ok(())
        }
        Err(HandleError::Ledger(e)) => {
            // Not transient, and not a problem intake could name. Retry a few
            // times (RabbitMQ counts the deliveries); on the last one allowed,
            // answer and park it ourselves rather than let it vanish into the
            // dead-letter queue with no word to the producer.
            let deliveries = topology::delivery_count(&delivery.properties) + 1;
            if deliveries > decider.config.queues.request_delivery_limit {
                tracing::error!(error = %e, deliveries, "request could not be decided; rejecting and parking it");
                let batch_id = batch_id_of(&delivery.data);
                let why = format!(
                        "could not be decided after {deliveries} deliveries ({e}); parked for an operator"
                    );
                let rejected = Rejected::one(batch_id, "body", why);
                decider
                    .reject(&delivery.data, &reply, Box::new(rejected))
                    .await?;
                if !delivery.acker.ack(BasicAckOptions::default()).await? {
                    record::ack_lost();
                }
                return Ok(());
            }
            tracing::error!(error = %e, deliveries, "request could not be decided; returning it to the queue");
            tokio::time::sleep(Duration::from_secs(1)).await;
            topology::requeue(delivery).await?;
            Ok(())
        }
        Err(HandleError::Broker(e)) => Err(e.into()),
    }
}
