//! Telling producers what happened: decisions and batch summaries go to the
//! request's `reply_to` (with its `correlation_id`) and to the events exchange.

use crate::ledger::ClosedBatch;
use crate::messages::{BatchFigures, Decision, Event};
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

/// Send `decision` to the reply queue (if any) and as a `decision.<kind>` event.
pub async fn decision(
    publisher: &Publisher,
    names: &Names,
    to: &ReplyTo,
    decision: &Decision,
) -> Result<(), BrokerError> {
    let mut confirms = Confirms::new(usize::MAX);
    send_decision(publisher, names, to, decision, &mut confirms).await?;
    confirms.wait().await
}

/// Like [`decision`], leaving the confirms to the caller (many decisions share one wait).
pub async fn send_decision(
    publisher: &Publisher,
    names: &Names,
    to: &ReplyTo,
    decision: &Decision,
    confirms: &mut Confirms,
) -> Result<(), BrokerError> {
    let event = Event::Decision(decision.clone());
    let body = event.to_wire().map_err(BrokerError::Encode)?;
    reply(publisher, to, &body, confirms).await?;
    let exchange = names.events();
    let confirm = publisher
        .send_event(&exchange, &event.routing_key(), &body)
        .await?;
    confirms.push(confirm, &exchange, false).await
}

/// Announce closed batches: `batch.completed` events, and the summary to each
/// reply queue; every message is published before the confirms are awaited.
pub async fn completed(
    publisher: &Publisher,
    names: &Names,
    closed: &[ClosedBatch],
) -> Result<(), BrokerError> {
    let exchange = names.events();
    let mut confirms = Confirms::new(1_000);
    for b in closed {
        let event = Event::Completed {
            batch_id: b.batch_id.clone(),
            account_id: b.account_id.clone(),
            state: b.state.to_string(),
            figures: b.figures.clone(),
        };
        let body = event.to_wire().map_err(BrokerError::Encode)?;
        let to = ReplyTo {
            queue: b.reply_to.clone(),
            correlation_id: b.correlation_id.clone(),
            amqp_user_id: None,
        };
        reply(publisher, &to, &body, &mut confirms).await?;
        let confirm = publisher
            .send_event(&exchange, &event.routing_key(), &body)
            .await?;
        confirms.push(confirm, &exchange, false).await?;
    }
    confirms.wait().await?;
    for b in closed {
        tracing::info!(batch_id = %b.batch_id, state = %b.state, captured = b.figures.captured,
            released = b.figures.released, "batch closed");
    }
    Ok(())
}

/// Coalesced `batch.progress` events, one per (batch, account, figures),
/// published together and confirmed with one wait.
pub async fn progress(
    publisher: &Publisher,
    names: &Names,
    batches: &[(String, String, BatchFigures)],
) -> Result<(), BrokerError> {
    let exchange = names.events();
    let mut confirms = Confirms::new(1_000);
    for (batch_id, account_id, figures) in batches {
        let event = Event::Progress {
            batch_id: batch_id.clone(),
            account_id: account_id.clone(),
            figures: figures.clone(),
        };
        let body = event.to_wire().map_err(BrokerError::Encode)?;
        let confirm = publisher
            .send_event(&exchange, &event.routing_key(), &body)
            .await?;
        confirms.push(confirm, &exchange, false).await?;
    }
    confirms.wait().await
}
