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
use holdfast_common::faults::crash_point;
use holdfast_common::ledger::{wait_out, Ledger, LedgerError, ReserveInput, Transient};
use holdfast_common::messages::{Attempt, BatchRequest, Decision, Rejected};
use holdfast_common::supervise::{guard, Panicked};
use holdfast_common::telemetry::record;
use holdfast_common::topology::{
    self, json_properties, parked_headers, BrokerError, Confirms, Publisher, SessionError,
};
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::intake;
use holdfast_common::dispatch::{dispatch, dispatch_granted, DispatchError};

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

impl Transient for HandleError {
    /// Only an unavailable ledger is waited out; a broker failure ends the session.
    fn is_transient(&self) -> bool {
        matches!(self, HandleError::Ledger(e) if e.is_transient())
    }
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
        let mut outcomes = self.handle_many(&[(body, reply.clone())]).await?;
        outcomes
            .pop()
            .expect("one outcome per request")
            .map_err(HandleError::Ledger)
    }

    /// Handle many request bodies together: validate each, decide every valid
    /// one in one ledger transaction, then publish every answer and job and
    /// wait for the broker's confirms once (in windows), and record the
    /// granted batches as dispatched in one statement. One outcome per
    /// request, in order; a broker failure fails them all (nothing is
    /// acknowledged, so every request comes back and is replayed).
    pub async fn handle_many(
        &self,
        requests: &[(&[u8], ReplyTo)],
    ) -> Result<Vec<Result<Outcome, LedgerError>>, BrokerError> {
        self.decide_many(requests).await?.finish(self).await
    }

    /// The first half of [`Intake::handle_many`]: validate, decide in one
    /// transaction, and publish every answer and job. What is left (the
    /// broker's confirms, the dispatch record) is in the returned
    /// [`Published`], so a consumer can decide its next group meanwhile.
    pub async fn decide_many(
        &self,
        requests: &[(&[u8], ReplyTo)],
    ) -> Result<Published, BrokerError> {
        let mut outcomes: Vec<Option<Result<Outcome, LedgerError>>> =
            (0..requests.len()).map(|_| None).collect();
        let mut parsed = Vec::with_capacity(requests.len());
        for (i, (body, reply)) in requests.iter().enumerate() {
            match intake::parse(body, &self.config.limits) {
                Ok(request) => parsed.push((i, request)),
                Err(rejected) => outcomes[i] = Some(Ok(self.reject(body, reply, rejected).await?)),
            }
        }
        let inputs: Vec<ReserveInput> = parsed
            .iter()
            .map(|(i, request)| ReserveInput {
                request,
                reply_to: requests[*i].1.queue.clone(),
                correlation_id: requests[*i].1.correlation_id.clone(),
                execution_timeout: self.config.settings.execution_timeout(),
                dispatch_grace: self.config.dispatch_grace,
                chunk_size: self.config.settings.sequential_chunk,
            })
            .collect();
        let decided = if inputs.is_empty() {
            vec![]
        } else {
            let decided = self.ledger.reserve_many(&inputs).await;
            crash_point("coordinator.after_reserve");
            decided
        };

        let window = self.config.settings.confirm_window;
        let mut confirms = Confirms::new(window);
        // Every answer first: a producer hears its decision without waiting
        // for the jobs of the requests decided with it.
        let mut granted = Vec::new();
        for ((i, request), result) in parsed.iter().zip(decided) {
            let (body, reply) = &requests[*i];
            let reserved = match result {
                Ok(r) => r,
                Err(e) => {
                    outcomes[*i] = Some(match rejection(request, e) {
                        Ok(rejected) => Ok(self.reject(body, reply, rejected).await?),
                        Err(e) => Err(e),
                    });
                    continue;
                }
            };
            tracing::info!(batch_id = %request.batch_id, account_id = %request.account_id,
                decision = reserved.decision.kind(), replayed = reserved.replayed, "decided");
            events::send_decision(
                &self.publisher,
                &self.config.names,
                reply,
                &reserved.decision,
                &mut confirms,
            )
            .await?;
            if reserved.needs_dispatch {
                granted.push((*i, request, reserved.replayed, reserved.dispatch_now));
            }
            outcomes[*i] = Some(Ok(Outcome::Decided {
                decision: Box::new(reserved.decision),
                replayed: reserved.replayed,
                dispatched: 0,
            }));
        }
        let mut published = Published {
            outcomes,
            dispatched: vec![0; requests.len()],
            confirms,
            fresh: Vec::new(),
            replays: Vec::new(),
        };
        for (i, request, replayed, dispatch_now) in granted {
            if replayed {
                published.replays.push((i, request.batch_id.clone()));
                continue;
            }
            published.dispatched[i] = dispatch_granted(
                &self.publisher,
                &self.config.names,
                request,
                &dispatch_now,
                window,
                &mut published.confirms,
            )
            .await?;
            published.fresh.push(request.batch_id.clone());
        }
        Ok(published)
    }

    /// Answer `rejected` and park the original message, with the reason, in the dead-letter queue.
    async fn reject(
        &self,
        body: &[u8],
        reply: &ReplyTo,
        rejected: Box<Rejected>,
    ) -> Result<Outcome, BrokerError> {
        tracing::warn!(batch_id = rejected.batch_id.as_deref().unwrap_or("-"), reason = %rejected.reason,
            "request rejected");
        record::rejected();
        // Parked first: when the producer hears "rejected", the message is
        // already where an operator can find it.
        self.park(body, &rejected.reason).await?;
        events::decision(
            &self.publisher,
            &self.config.names,
            reply,
            &Decision::Rejected((*rejected).clone()),
        )
        .await?;
        Ok(Outcome::Rejected(rejected))
    }
}

impl Intake {
    /// Put a request in the requests dead-letter queue with `reason`.
    async fn park(&self, body: &[u8], reason: &str) -> Result<(), BrokerError> {
        let props = json_properties().with_headers(parked_headers(reason));
        self.publisher
            .publish_confirmed(&self.config.names.dead_exchange(), "requests", body, props)
            .await?;
        record::dead_lettered("requests");
        Ok(())
    }
}

/// A group decided and published by [`Intake::decide_many`], waiting for
/// the broker's confirms and the record of its dispatch.
pub struct Published {
    outcomes: Vec<Option<Result<Outcome, LedgerError>>>,
    dispatched: Vec<usize>,
    confirms: Confirms,
    /// Granted batches whose jobs were just published.
    fresh: Vec<String>,
    /// Replayed grants never confirmed dispatched: (request, batch), resent from the ledger.
    replays: Vec<(usize, String)>,
}

impl Published {
    /// Wait for the confirms, record the dispatch, resend what replayed
    /// grants left pending. One outcome per request, in order.
    pub async fn finish(
        mut self,
        intake: &Intake,
    ) -> Result<Vec<Result<Outcome, LedgerError>>, BrokerError> {
        self.confirms.wait().await?;
        let fresh: Vec<&str> = self.fresh.iter().map(String::as_str).collect();
        if let Err(e) = intake.ledger.mark_dispatched(&fresh).await {
            // The jobs are out; a reconciler re-sends them after the lease,
            // and workers settle each item once.
            tracing::warn!(error = %e, "could not record the dispatch; a reconciler will resend");
        }
        for (i, batch_id) in &self.replays {
            match dispatch(
                &intake.ledger,
                &intake.publisher,
                &intake.config.names,
                batch_id,
                Attempt::Again,
                intake.config.settings.confirm_window,
            )
            .await
            {
                Ok(n) => self.dispatched[*i] = n,
                Err(DispatchError::Broker(e)) => return Err(e),
                Err(DispatchError::Ledger(e)) => self.outcomes[*i] = Some(Err(e)),
            }
        }
        Ok(self
            .outcomes
            .into_iter()
            .zip(self.dispatched)
            .map(|(o, n)| match o.expect("every request handled") {
                Ok(Outcome::Decided {
                    decision, replayed, ..
                }) => Ok(Outcome::Decided {
                    decision,
                    replayed,
                    dispatched: n,
                }),
                other => other,
            })
            .collect())
    }
}

/// The rejection a ledger refusal of `request` deserves, or the error back
/// when it is not the request's fault (retry it).
fn rejection(request: &BatchRequest, e: LedgerError) -> Result<Box<Rejected>, LedgerError> {
    let batch_id = Some(request.batch_id.clone());
    let mut r = match e {
        LedgerError::UnknownAccount(a) => {
            Rejected::one(batch_id, "account_id", format!("unknown account `{a}`"))
        }
        LedgerError::Conflict(_) => Rejected::one(
            batch_id,
            "batch_id",
            "already used for a different request; send a new batch_id for a new attempt",
        ),
        LedgerError::Reservation(why) => Rejected::one(batch_id, "reservation_id", why),
        LedgerError::Invalid(why) => Rejected::one(batch_id, "body", why),
        e => return Err(e),
    };
    r.account_id = Some(request.account_id.clone());
    Ok(Box::new(r))
}

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
    let intake = Arc::new(Intake::new(
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
        let decided = guard("coordinator", "requests", intake.decide_many(&requests));
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
                        .while_connected(process_alone(&intake, delivery, shutdown))
                        .await??;
                }
                continue;
            }
        };
        let (intake, shutdown) = (intake.clone(), shutdown.clone());
        tail = Some(AbortOnDropHandle::new(tokio::spawn(async move {
            finish_group(&intake, &group, published, &shutdown).await
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
    intake: &Intake,
    group: &[Delivery],
    published: Published,
    shutdown: &CancellationToken,
) -> Result<(), SessionError> {
    let outcomes = match guard("coordinator", "requests", published.finish(intake)).await {
        Ok(outcomes) => outcomes?,
        Err(panicked) => {
            tracing::error!(batch_ids = ?batch_ids(group), panic = %panicked.0,
                "finishing a group of requests panicked; handling each on its own");
            for delivery in group {
                process_alone(intake, delivery, shutdown).await?;
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
            Err(_) => process_alone(intake, delivery, shutdown).await?,
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
    intake: &Intake,
    delivery: &Delivery,
    shutdown: &CancellationToken,
) -> Result<(), SessionError> {
    match guard(
        "coordinator",
        "requests",
        process(intake, delivery, shutdown),
    )
    .await
    {
        Ok(processed) => processed,
        Err(panicked) => poisoned(intake, delivery, panicked).await,
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
    intake: &Intake,
    delivery: &Delivery,
    panicked: Panicked,
) -> Result<(), SessionError> {
    let batch_id = batch_id_of(&delivery.data);
    let deliveries = topology::delivery_count(&delivery.properties) + 1;
    tracing::error!(batch_id = batch_id.as_deref().unwrap_or("-"), deliveries, panic = %panicked.0,
        "handling the request panicked");
    if deliveries <= intake.config.queues.request_delivery_limit {
        topology::requeue(delivery).await?;
        return Ok(());
    }
    let why = format!(
        "handling it panicked on {deliveries} deliveries ({}); parked for an operator",
        panicked.0
    );
    let mut answered = false;
    if let Some(id) = &batch_id {
        match intake.ledger.cancel_batch(id).await {
            Ok(cancelled) => {
                tracing::warn!(batch_id = %id, state = %cancelled.state,
                    "cancelled the batch of a request that kept panicking; its credits are released");
                if let Some(closed) = cancelled.closed {
                    events::completed(&intake.publisher, &intake.config.names, &[closed]).await?;
                }
                answered = true;
            }
            // Denied, finished, or never decided: it holds nothing.
            Err(LedgerError::NotFound(_) | LedgerError::WrongState(_)) => {}
            Err(e) => tracing::error!(batch_id = %id, error = %e,
                "could not cancel the batch of a request that kept panicking; the reconciler releases it at its deadline"),
        }
    }
    intake.park(&delivery.data, &why).await?;
    if !answered {
        let rejected = Rejected::one(batch_id, "body", why);
        events::decision(
            &intake.publisher,
            &intake.config.names,
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
    intake: &Intake,
    delivery: &Delivery,
    shutdown: &CancellationToken,
) -> Result<(), SessionError> {
    let reply = reply_of(delivery);
    let handled = wait_out("a batch request", shutdown, || {
        intake.handle(&delivery.data, &reply)
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
            if deliveries > intake.config.queues.request_delivery_limit {
                tracing::error!(error = %e, deliveries, "request could not be decided; rejecting and parking it");
                let batch_id = batch_id_of(&delivery.data);
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
            topology::requeue(delivery).await?;
            Ok(())
        }
        Err(HandleError::Broker(e)) => Err(e.into()),
    }
}
