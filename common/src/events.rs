//! Answering producers directly: a decision goes to the request's
//! `reply_to` (with its `correlation_id`), and a rejection also to the events
//! exchange. Every other event (a decision the ledger took, progress, a
//! batch's completion and its summary to `reply_to`) goes through the
//! transactional outbox ([`crate::outbox`]).

use crate::messages::{Decision, Event};
use crate::topology::{json_properties, short, BrokerError, Confirms, Names, Publisher};

/// Where to answer a request.
#[derive(Clone, Debug, Default)]
pub struct ReplyTo {
    pub queue: Option<String>,
    pub correlation_id: Option<String>,
    /// Where the request came from: `Some` over AMQP, holding the message's
    /// `user_id` property (which RabbitMQ checked against the sender's
    /// login), if it had one; `None` for other routes (HTTP).
    pub amqp_user_id: Option<Option<String>>,
}

impl ReplyTo {
    /// Where a delivery asks to be answered: its `reply_to` and `correlation_id`.
    pub fn of(properties: &lapin::BasicProperties) -> Self {
        Self {
            queue: properties.reply_to().as_ref().map(|s| s.to_string()),
            correlation_id: properties.correlation_id().as_ref().map(|s| s.to_string()),
            amqp_user_id: Some(properties.user_id().as_ref().map(|s| s.to_string())),
        }
    }
}

/// Properties of an answer to `to`: a persistent JSON message carrying the
/// request's `correlation_id`. A correlation id arrived in a short string, so
/// it fits one; if a stored one ever did not, the answer goes without it.
pub fn reply_properties(to: &ReplyTo) -> lapin::BasicProperties {
    let props = json_properties();
    let Some(c) = &to.correlation_id else {
        return props;
    };
    match short("a correlation_id", c) {
        Ok(c) => props.with_correlation_id(c),
        Err(e) => {
            tracing::warn!(error = %e, "answer sent without its correlation_id");
            props
        }
    }
}

/// Publish `body` to the reply queue, if any; the confirm goes to `confirms`.
async fn reply(
    publisher: &Publisher,
    to: &ReplyTo,
    body: &[u8],
    confirms: &mut Confirms,
) -> Result<(), BrokerError> {
    let Some(queue) = to.queue.as_deref().filter(|q| !q.is_empty()) else {
        return Ok(());
    };
    let confirm = publisher
        .publish("", queue, body, reply_properties(to))
        .await?;
    // The producer may have gone away (its reply queue is gone): the event still goes out.
    confirms.push(confirm, queue, true).await
}

/// Send a `rejected` decision to the reply queue (if any) and as a
/// `decision.rejected` event, and wait for the confirms. No ledger change
/// causes a rejection, so it does not go through the outbox: the request is
/// acknowledged only after this, and sent again if it fails.
pub async fn decision(
    publisher: &Publisher,
    names: &Names,
    to: &ReplyTo,
    decision: &Decision,
) -> Result<(), BrokerError> {
    let mut confirms = Confirms::new(usize::MAX);
    let event = Event::Decision(decision.clone());
    let body = event.to_wire().map_err(BrokerError::Encode)?;
    reply(publisher, to, &body, &mut confirms).await?;
    let exchange = names.events();
    let confirm = publisher
        .send_event(&exchange, &event.routing_key(), &body)
        .await?;
    confirms.push(confirm, &exchange, false).await?;
    confirms.wait().await
}

/// Send a decision the ledger took (granted, insufficient) to the reply
/// queue, if any, leaving the confirm to the caller (many decisions share one
/// wait). Its `decision.<kind>` event is not sent here: the ledger wrote it
/// to the outbox with the decision ([`crate::outbox`]). The producer hears
/// the decision again if the request comes back (the ledger replays it).
pub async fn send_reply(
    publisher: &Publisher,
    to: &ReplyTo,
    decision: &Decision,
    confirms: &mut Confirms,
) -> Result<(), BrokerError> {
    let event = Event::Decision(decision.clone());
    let body = event.to_wire().map_err(BrokerError::Encode)?;
    reply(publisher, to, &body, confirms).await
}
