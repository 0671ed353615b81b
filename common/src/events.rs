//! Telling producers what happened: decisions and batch summaries go to the
//! request's `reply_to` (with its `correlation_id`) and to the events exchange.

use lapin::types::ShortString;

use crate::ledger::ClosedBatch;
use crate::messages::{BatchFigures, Decision, Event};
use crate::topology::{json_properties, BrokerError, Confirms, Names, Publisher};

/// Where to answer a request.
#[derive(Clone, Debug, Default)]
pub struct ReplyTo {
    pub queue: Option<String>,
    pub correlation_id: Option<String>,
}

impl ReplyTo {
    /// Where a delivery asks to be answered: its `reply_to` and `correlation_id`.
    pub fn of(properties: &lapin::BasicProperties) -> Self {
        Self {
            queue: properties.reply_to().as_ref().map(|s| s.to_string()),
            correlation_id: properties.correlation_id().as_ref().map(|s| s.to_string()),
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
    let mut props = json_properties();
    if let Some(c) = &to.correlation_id {
        props = props.with_correlation_id(ShortString::from(c.as_str()));
    }
    let confirm = publisher.publish("", queue, body, props).await?;
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
    let body = serde_json::to_vec(&event).expect("events serialise");
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
            state: b.state.clone(),
            figures: b.figures.clone(),
        };
        let body = serde_json::to_vec(&event).expect("events serialise");
        let to = ReplyTo {
            queue: b.reply_to.clone(),
            correlation_id: b.correlation_id.clone(),
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
        let body = serde_json::to_vec(&event).expect("events serialise");
        let confirm = publisher
            .send_event(&exchange, &event.routing_key(), &body)
            .await?;
        confirms.push(confirm, &exchange, false).await?;
    }
    confirms.wait().await
}
