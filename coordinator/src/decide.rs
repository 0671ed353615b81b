//! The decider: validate a group of batch requests, decide every valid one
//! in one ledger transaction, answer each, and publish the jobs of the
//! granted ones. It does not acknowledge: the coordinator role
//! ([`crate::requests`]) and the HTTP API call it and settle with the broker
//! (or the HTTP client) according to the outcome.

use crate::config::CoordinatorConfig;
use holdfast_common::events::{self, ReplyTo};
use holdfast_common::faults::crash_point;
use holdfast_common::ledger::{Ledger, LedgerError, ReserveInput, Transient};
use holdfast_common::messages::{Attempt, BatchRequest, Decision, Rejected};
use holdfast_common::telemetry::record;
use holdfast_common::topology::{
    json_properties, parked_headers, BrokerError, Confirms, Publisher,
};

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

/// The decider: validates requests, decides them in the ledger, answers,
/// and dispatches the granted ones. One per consumer; cheap to build.
pub struct Decider {
    pub(crate) ledger: Ledger,
    pub(crate) config: CoordinatorConfig,
    pub(crate) publisher: Publisher,
}

impl Decider {
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

    /// The first half of [`Decider::handle_many`]: validate, decide in one
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
                Ok(request) => match self.unbound(&request, reply) {
                    None => parsed.push((i, request)),
                    Some(rejected) => {
                        outcomes[i] = Some(Ok(self.reject(body, reply, rejected).await?))
                    }
                },
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
            // The reply only: the event is in the outbox, written with the decision.
            events::send_reply(&self.publisher, reply, &reserved.decision, &mut confirms).await?;
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

    /// The rejection of a request over AMQP whose `user_id` is not bound to
    /// its account, when account bindings are on (see [`crate::bindings`]).
    fn unbound(&self, request: &BatchRequest, reply: &ReplyTo) -> Option<Box<Rejected>> {
        let bindings = self.config.settings.amqp_account_bindings.as_ref()?;
        let user_id = reply.amqp_user_id.as_ref()?;
        let reason = bindings
            .check(user_id.as_deref(), &request.account_id)
            .err()?;
        let mut r = Rejected::one(Some(request.batch_id.clone()), "user_id", reason);
        r.account_id = Some(request.account_id.clone());
        Some(Box::new(r))
    }

    /// Answer `rejected` and park the original message, with the reason, in the dead-letter queue.
    pub(crate) async fn reject(
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

impl Decider {
    /// Put a request in the requests dead-letter queue with `reason`.
    pub(crate) async fn park(&self, body: &[u8], reason: &str) -> Result<(), BrokerError> {
        let props = json_properties().with_headers(parked_headers(reason));
        self.publisher
            .publish_confirmed(&self.config.names.dead_exchange(), "requests", body, props)
            .await?;
        record::dead_lettered("requests");
        Ok(())
    }
}

/// A group decided and published by [`Decider::decide_many`], waiting for
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
        decider: &Decider,
    ) -> Result<Vec<Result<Outcome, LedgerError>>, BrokerError> {
        self.confirms.wait().await?;
        let fresh: Vec<&str> = self.fresh.iter().map(String::as_str).collect();
        if let Err(e) = decider.ledger.mark_dispatched(&fresh).await {
            // The jobs are out; a reconciler re-sends them after the lease,
            // and workers settle each item once.
            tracing::warn!(error = %e, "could not record the dispatch; a reconciler will resend");
        }
        for (i, batch_id) in &self.replays {
            match dispatch(
                &decider.ledger,
                &decider.publisher,
                &decider.config.names,
                batch_id,
                Attempt::Again,
                decider.config.settings.confirm_window,
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
        e @ LedgerError::UnknownSpender { .. } => {
            Rejected::one(batch_id, "spender_id", e.to_string())
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
