//! The coordinator role: consume batch requests, decide each one in the
//! ledger, answer, dispatch the granted ones, then acknowledge.
//!
//! The request is acknowledged only after the decision is committed, answered
//! and (when granted) every job is confirmed by the broker. A crash anywhere
//! before that leaves the request unacknowledged: RabbitMQ delivers it again,
//! the ledger replays the same decision, and the dispatch resumes.

use std::time::Duration;

use holdfast_common::config::{CoordinatorSettings, Limits, QueueSettings};
use holdfast_common::events::{self, ReplyTo};
use holdfast_common::faults::crash_point;
use holdfast_common::ledger::{Ledger, LedgerError, ReserveInput};
use holdfast_common::messages::{Decision, Rejected};
use holdfast_common::telemetry::record;
use holdfast_common::topology::{
    self, json_properties, parked_headers, BrokerError, Names, Publisher,
};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio_util::sync::CancellationToken;

use crate::intake;
use holdfast_common::dispatch::{dispatch, DispatchError};

/// Everything the coordinator role needs.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    pub amqp_url: String,
    pub names: Names,
    pub queues: QueueSettings,
    pub limits: Limits,
    pub settings: CoordinatorSettings,
    /// How long a reconciler waits before re-dispatching a batch this coordinator granted.
    pub dispatch_grace: Duration,
}

/// What became of one request.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// Decided (granted or insufficient); `dispatched` jobs were confirmed.
    Decided {
        decision: Box<Decision>,
        replayed: bool,
        dispatched: usize,
    },
    /// Refused as sent: answered with a `rejected` decision and parked.
    Rejected(Box<Rejected>),
}

/// Why a request could not be handled now; it goes back to the queue.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    #[error("ledger unavailable: {0}")]
    Ledger(#[source] LedgerError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

impl From<DispatchError> for HandleError {
    fn from(e: DispatchError) -> Self {
        match e {
            DispatchError::Ledger(e) => HandleError::Ledger(e),
            DispatchError::Broker(e) => HandleError::Broker(e),
        }
    }
}

/// Decides requests. One per consumer; cheap to build.
pub struct Intake {
    ledger: Ledger,
    config: CoordinatorConfig,
    publisher: Publisher,
}

impl Intake {
    pub fn new(ledger: Ledger, config: CoordinatorConfig, publisher: Publisher) -> Self {
        Self {
            ledger,
            config,
            publisher,
        }
    }

    /// Handle one request body: validate, reserve, answer, dispatch. Does not
    /// acknowledge; the caller does, according to the result.
    pub async fn handle(&self, body: &[u8], reply: &ReplyTo) -> Result<Outcome, HandleError> {
        let request = match intake::parse(body, &self.config.limits) {
            Ok(r) => r,
            Err(rejected) => return self.reject(body, reply, rejected).await,
        };
        let input = ReserveInput {
            request: &request,
            reply_to: reply.queue.clone(),
            correlation_id: reply.correlation_id.clone(),
            execution_timeout: self.config.settings.execution_timeout(),
            dispatch_grace: self.config.dispatch_grace,
            chunk_size: self.config.settings.sequential_chunk,
        };
        let reserved = match self.ledger.reserve(&input).await {
            Ok(r) => r,
            Err(LedgerError::UnknownAccount(a)) => {
                let mut r = Rejected::one(
                    Some(request.batch_id.clone()),
                    "account_id",
                    format!("unknown account `{a}`"),
                );
                r.account_id = Some(a);
                return self.reject(body, reply, Box::new(r)).await;
            }
            Err(LedgerError::Conflict(b)) => {
                let r = Rejected::one(
                    Some(b),
                    "batch_id",
                    "already used for a different request; send a new batch_id for a new attempt",
                );
                return self.reject(body, reply, Box::new(r)).await;
            }
            Err(LedgerError::Reservation(why)) => {
                let r = Rejected::one(Some(request.batch_id.clone()), "reservation_id", why);
                return self.reject(body, reply, Box::new(r)).await;
            }
            Err(LedgerError::Invalid(why)) => {
                let r = Rejected::one(Some(request.batch_id.clone()), "body", why);
                return self.reject(body, reply, Box::new(r)).await;
            }
            Err(e) => return Err(HandleError::Ledger(e)),
        };
        crash_point("coordinator.after_reserve");
        tracing::info!(batch_id = %request.batch_id, account_id = %request.account_id,
            decision = reserved.decision.kind(), replayed = reserved.replayed, "decided");
        events::decision(
            &self.publisher,
            &self.config.names,
            reply,
            &reserved.decision,
        )
        .await?;
        let dispatched = if reserved.needs_dispatch {
            let attempt = if reserved.replayed { 2 } else { 1 };
            dispatch(
                &self.ledger,
                &self.publisher,
                &self.config.names,
                &request.batch_id,
                attempt,
                self.config.settings.confirm_window,
            )
            .await?
        } else {
            0
        };
        Ok(Outcome::Decided {
            decision: Box::new(reserved.decision),
            replayed: reserved.replayed,
            dispatched,
        })
    }

    /// Answer `rejected` and park the original message, with the reason, in the dead-letter queue.
    async fn reject(
        &self,
        body: &[u8],
        reply: &ReplyTo,
        rejected: Box<Rejected>,
    ) -> Result<Outcome, HandleError> {
        tracing::warn!(batch_id = rejected.batch_id.as_deref().unwrap_or("-"), reason = %rejected.reason,
            "request rejected");
        record::rejected();
        events::decision(
            &self.publisher,
            &self.config.names,
            reply,
            &Decision::Rejected((*rejected).clone()),
        )
        .await?;
        let props = json_properties().with_headers(parked_headers(&rejected.reason));
        self.publisher
            .publish_confirmed(&self.config.names.dead_exchange(), "requests", body, props)
            .await?;
        record::dead_lettered("requests");
        Ok(Outcome::Rejected(rejected))
    }
}

fn reply_of(delivery: &Delivery) -> ReplyTo {
    ReplyTo {
        queue: delivery
            .properties
            .reply_to()
            .as_ref()
            .map(|s| s.to_string()),
        correlation_id: delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(|s| s.to_string()),
    }
}

/// Run the coordinator role until `shutdown`: `coordinator_consumers`
/// consumers, each on its own connection, each restarted when it fails.
pub async fn run(ledger: Ledger, config: CoordinatorConfig, shutdown: CancellationToken) {
    let tasks = tokio_util::task::TaskTracker::new();
    for n in 0..config.settings.coordinator_consumers.max(1) {
        let (ledger, config, shutdown) = (ledger.clone(), config.clone(), shutdown.clone());
        tasks.spawn(async move {
            let name = format!("coordinator-{n}");
            topology::supervise(&name, shutdown.clone(), || {
                consume(&ledger, &config, &shutdown)
            })
            .await;
        });
    }
    {
        let (ledger, config, shutdown) = (ledger.clone(), config.clone(), shutdown.clone());
        tasks.spawn(async move {
            topology::supervise("previews", shutdown.clone(), || {
                crate::previews::consume(&ledger, &config, &shutdown)
            })
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
) -> anyhow::Result<()> {
    let mut session = topology::Session::open(
        &config.amqp_url,
        "holdfast-coordinator",
        &config.names,
        &config.queues,
        &config.names.requests(),
        config.settings.coordinator_prefetch,
    )
    .await?;
    let intake = Intake::new(ledger.clone(), config.clone(), session.publisher.clone());
    tracing::info!(queue = %config.names.requests(), "coordinator consuming");
    while let Some(delivery) = session.next(shutdown).await? {
        session
            .while_connected(process(&intake, &delivery, shutdown))
            .await??;
    }
    // Unacknowledged prefetched requests return to the queue when the channel closes.
    session.close().await;
    Ok(())
}

/// Handle one delivery and settle it with the broker. A ledger outage is
/// waited out here with backoff (the request stays ours, unacknowledged): a
/// valid request is never dead-lettered because PostgreSQL blinked.
async fn process(
    intake: &Intake,
    delivery: &Delivery,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let reply = reply_of(delivery);
    let mut delay = Duration::from_millis(250);
    loop {
        match intake.handle(&delivery.data, &reply).await {
            Ok(_) => {
                if !delivery.acker.ack(BasicAckOptions::default()).await? {
                    record::ack_lost();
                }
                return Ok(());
            }
            Err(HandleError::Ledger(e)) if e.is_transient() => {
                tracing::warn!(error = %e, ?delay, "ledger unavailable; holding the request");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => {
                        delivery.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await?;
                        return Ok(());
                    }
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(HandleError::Ledger(e)) => {
                // Not transient, and not a problem intake could name. Retry a few
                // times (RabbitMQ counts the deliveries); on the last one allowed,
                // answer and park it ourselves rather than let it vanish into the
                // dead-letter queue with no word to the producer.
                let deliveries = topology::delivery_count(&delivery.properties) + 1;
                if deliveries > intake.config.queues.request_delivery_limit {
                    tracing::error!(error = %e, deliveries, "request could not be decided; rejecting and parking it");
                    let batch_id = serde_json::from_slice::<serde_json::Value>(&delivery.data)
                        .ok()
                        .and_then(|v| v["batch_id"].as_str().map(String::from));
                    let why = format!(
                        "could not be decided after {deliveries} deliveries ({e}); parked for an operator"
                    );
                    let rejected = Rejected::one(batch_id, "body", why);
                    intake
                        .reject(&delivery.data, &reply, Box::new(rejected))
                        .await?;
                    if !delivery.acker.ack(BasicAckOptions::default()).await? {
                        record::ack_lost();
                    }
                    return Ok(());
                }
                tracing::error!(error = %e, deliveries, "request could not be decided; returning it to the queue");
                tokio::time::sleep(Duration::from_secs(1)).await;
                delivery
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await?;
                return Ok(());
            }
            Err(HandleError::Broker(e)) => return Err(e.into()),
        }
    }
}
