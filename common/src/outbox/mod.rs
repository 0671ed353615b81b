//! The transactional outbox: every event on the events exchange (a
//! decision, a batch's progress, a batch's completion) is written to the
//! `outbox` table in the same transaction as the ledger change that causes
//! it, and a relay ([`relay`]) publishes it afterwards with publisher
//! confirms. A crash or a broker outage between the commit and the publish
//! loses nothing: the row waits for the next relay.
//!
//! Delivery is at-least-once. A relay that dies after the broker confirmed a
//! message and before it deleted the row publishes it again; each message
//! carries a stable AMQP `message_id` ([`message_id`]) so consumers drop
//! duplicates.
//!
//! What goes through here and what does not:
//! - events on `<ns>.events` for a batch the ledger decided (`granted`,
//!   `insufficient`), `batch.progress` and `batch.completed`: here;
//! - a batch's completed summary to the producer's `reply_to`: here too (a
//!   row with `reply_to` set), since nothing else would send it again;
//! - the decision reply to `reply_to`: sent directly by the coordinator
//!   before it acknowledges the request. A crash before the confirm leaves
//!   the request unacknowledged; RabbitMQ delivers it again and the ledger
//!   replays the stored decision, which is answered again;
//! - `rejected` decisions: no ledger change causes them (the request is
//!   parked, then answered and its event published before the ack), so they
//!   are sent directly, like the reply.

pub mod relay;

use deadpool_postgres::Transaction;

use crate::ledger::ClosedBatch;
use crate::messages::{short_id, BatchFigures, Decision, Event};

/// `decision`: a batch the ledger granted or denied.
pub const DECISION: &str = "decision";
/// `progress`: a coalesced snapshot of a running batch.
pub const PROGRESS: &str = "progress";
/// `completed`: the batch closed and its hold resolved; one per batch.
pub const COMPLETED: &str = "completed";

/// The AMQP `message_id` of an event, stable over every publish of it:
/// `<batch_id>:decision`, `<batch_id>:completed`, or
/// `<batch_id>:progress:<seq>` (`seq`: the batch's settled items when the
/// snapshot was taken, so two snapshots of the same state share an id). When
/// that is longer than an AMQP short string (255 bytes; batch ids may have
/// 128 characters of UTF-8), `sha256:` and the hex SHA-256 of it, as long
/// job ids are bounded ([`crate::messages::job_message_id`]).
pub fn message_id(batch_id: &str, kind: &str, seq: Option<i64>) -> String {
    let id = match seq {
        Some(seq) => format!("{batch_id}:{kind}:{seq}"),
        None => format!("{batch_id}:{kind}"),
    };
    short_id(&id).into_owned()
}

/// One event to write to the outbox.
#[derive(Clone, Debug, PartialEq)]
pub struct Pending {
    pub batch_id: String,
    pub kind: &'static str,
    pub routing_key: String,
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
    pub body: Vec<u8>,
    pub message_id: String,
}

fn encode(event: &Event) -> Vec<u8> {
    // Strings, integers and JSON values always serialise.
    event.to_wire().expect("events serialise")
}

/// The `decision.<kind>` event of a decided batch; none for a rejection
/// (no ledger change causes one: it is sent directly).
pub fn decision(decision: &Decision) -> Option<Pending> {
    if matches!(decision, Decision::Rejected(_)) {
        return None;
    }
    let batch_id = decision.batch_id()?.to_string();
    let event = Event::Decision(decision.clone());
    Some(Pending {
        message_id: message_id(&batch_id, DECISION, None),
        batch_id,
        kind: DECISION,
        routing_key: event.routing_key(),
        reply_to: None,
        correlation_id: None,
        body: encode(&event),
    })
}

/// The `batch.completed` event of a closed batch, also sent to the
/// producer's `reply_to` when it gave one.
pub fn completed(b: &ClosedBatch) -> Pending {
    let event = Event::Completed {
        batch_id: b.batch_id.clone(),
        account_id: b.account_id.clone(),
        state: b.state.to_string(),
        figures: b.figures.clone(),
    };
    Pending {
        batch_id: b.batch_id.clone(),
        kind: COMPLETED,
        routing_key: event.routing_key(),
        reply_to: b.reply_to.clone().filter(|q| !q.is_empty()),
        correlation_id: b.correlation_id.clone(),
        body: encode(&event),
        message_id: message_id(&b.batch_id, COMPLETED, None),
    }
}

/// A `batch.progress` snapshot.
pub fn progress(batch_id: &str, account_id: &str, figures: &BatchFigures) -> Pending {
    let event = Event::Progress {
        batch_id: batch_id.to_string(),
        account_id: account_id.to_string(),
        figures: figures.clone(),
    };
    let settled = figures.succeeded + figures.failed + figures.cancelled;
    Pending {
        batch_id: batch_id.to_string(),
        kind: PROGRESS,
        routing_key: event.routing_key(),
        reply_to: None,
        correlation_id: None,
        body: encode(&event),
        message_id: message_id(batch_id, PROGRESS, Some(settled)),
    }
}

/// Write `rows` in one statement, in the caller's transaction: they commit
/// (and become visible to a relay) with the ledger change, or not at all.
pub async fn write(tx: &Transaction<'_>, rows: &[Pending]) -> Result<(), tokio_postgres::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let n = rows.len();
    let (mut batches, mut kinds, mut keys, mut replies, mut correlations, mut bodies, mut ids) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for r in rows {
        batches.push(r.batch_id.as_str());
        kinds.push(r.kind);
        keys.push(r.routing_key.as_str());
        replies.push(r.reply_to.as_deref());
        correlations.push(r.correlation_id.as_deref());
        bodies.push(r.body.as_slice());
        ids.push(r.message_id.as_str());
    }
    // WITH ORDINALITY keeps the ids in the order of `rows`.
    tx.execute(
        "INSERT INTO outbox (batch_id, kind, routing_key, reply_to, correlation_id, body, message_id)
         SELECT b, k, r, q, c, body, m
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bytea[], $7::text[])
              WITH ORDINALITY AS t(b, k, r, q, c, body, m, n)
         ORDER BY n",
        &[&batches, &kinds, &keys, &replies, &correlations, &bodies, &ids],
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::MAX_SHORT_STRING;

    #[test]
    fn message_ids_are_stable_and_fit_a_short_string() {
        assert_eq!(message_id("b1", COMPLETED, None), "b1:completed");
        assert_eq!(message_id("b1", PROGRESS, Some(7)), "b1:progress:7");
        let long = "é".repeat(128);
        let id = message_id(&long, PROGRESS, Some(3));
        assert!(id.len() <= MAX_SHORT_STRING && id.starts_with("sha256:"));
        assert_eq!(id, message_id(&long, PROGRESS, Some(3)));
        assert_ne!(id, message_id(&long, PROGRESS, Some(4)));
        assert_ne!(
            message_id(&long, DECISION, None),
            message_id(&long, COMPLETED, None)
        );
    }

    #[test]
    fn a_rejection_has_no_outbox_row() {
        let d = Decision::Rejected(crate::messages::Rejected::one(
            Some("b".into()),
            "body",
            "no",
        ));
        assert_eq!(decision(&d), None);
    }
}
