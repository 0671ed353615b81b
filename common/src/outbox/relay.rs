//! The relay: publishes what the outbox holds, with publisher confirms, and
//! deletes each row once the broker confirmed it.
//!
//! Every process runs one ([`run`]). It is woken in memory by the ledger
//! after a commit that wrote rows ([`crate::ledger::Ledger::outbox_wake`]),
//! and polls every `poll` as the safety net (rows another process wrote, or
//! left behind when it died). No `LISTEN/NOTIFY`: a NOTIFY takes a
//! database-wide lock at commit and would serialise every ledger commit.
//!
//! Several relays share the table. Each pass claims the oldest rows with
//! `FOR UPDATE SKIP LOCKED` (rows another relay holds are skipped, not
//! waited for) and publishes, per batch, only an unbroken prefix of what is
//! left of that batch: a row whose predecessor of the same batch another
//! relay holds waits for a later pass. So a batch's events go out in the
//! order they were written, whoever relays them.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use deadpool_postgres::Pool;

use crate::events::{reply_properties, ReplyTo};
use crate::ledger::{Ledger, LedgerError};
use crate::supervise::guard;
use crate::telemetry::record;
use crate::topology::{self, json_properties, short, BrokerError, Names, Publisher, SessionError};
use lapin::{Confirmation, PublisherConfirm};

/// Rows claimed per pass.
pub const CLAIM_LIMIT: i64 = 500;

/// Confirms awaited per window within a pass.
const CONFIRM_WINDOW: usize = 500;

/// The broker's confirms of a pass, awaited in windows. Any `Ack` will do:
/// an event nobody is bound to and a summary whose reply queue is gone are
/// both fine (and with confirms answered several at a time, the client may
/// attach a reply's return to the event's ack). A `Nack` fails the pass.
struct Acks(Vec<PublisherConfirm>);

impl Acks {
    async fn push(&mut self, confirm: PublisherConfirm) -> Result<(), BrokerError> {
        self.0.push(confirm);
        if self.0.len() >= CONFIRM_WINDOW {
            self.wait().await?;
        }
        Ok(())
    }

    async fn wait(&mut self) -> Result<(), BrokerError> {
        for confirm in self.0.drain(..) {
            match confirm.await? {
                Confirmation::Ack(_) | Confirmation::NotRequested => {}
                Confirmation::Nack(_) => return Err(BrokerError::Nacked("an outbox event".into())),
            }
        }
        Ok(())
    }
}

/// One claimed row.
struct Row {
    id: i64,
    batch_id: String,
    routing_key: String,
    reply_to: Option<String>,
    correlation_id: Option<String>,
    body: Vec<u8>,
    message_id: String,
}

/// One relay pass: claim up to `limit` rows, publish the publishable ones in
/// id order with confirms, delete them, commit. Returns how many rows were
/// claimed (a full claim means: go again at once) and how many published.
pub async fn relay_once(
    pool: &Pool,
    publisher: &Publisher,
    names: &Names,
    limit: i64,
) -> Result<(usize, usize), SessionError> {
    let mut client = pool.get().await.map_err(LedgerError::from)?;
    let tx = client.transaction().await.map_err(LedgerError::from)?;
    let claimed: Vec<Row> = tx
        .query(
            "SELECT id, batch_id, routing_key, reply_to, correlation_id, body, message_id
             FROM outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
            &[&limit],
        )
        .await
        .map_err(LedgerError::from)?
        .iter()
        .map(|r| Row {
            id: r.get(0),
            batch_id: r.get(1),
            routing_key: r.get(2),
            reply_to: r.get(3),
            correlation_id: r.get(4),
            body: r.get(5),
            message_id: r.get(6),
        })
        .collect();
    if claimed.is_empty() {
        return Ok((0, 0));
    }
    let ready = publishable(&tx, &claimed).await?;
    let exchange = names.events();
    let mut confirms = Acks(Vec::new());
    let mut sent = Vec::with_capacity(ready.len());
    for row in claimed.iter().filter(|r| ready.contains(&r.id)) {
        publish(publisher, &exchange, row, &mut confirms).await?;
        sent.push(row.id);
    }
    confirms.wait().await?;
    // Published and confirmed, not deleted yet: a relay dying here leaves
    // the rows to the next pass, which publishes them again (same message_id).
    crate::faults::crash_point("outbox.after_publish");
    crate::faults::panic_point("outbox.after_publish", &names.namespace);
    tx.execute("DELETE FROM outbox WHERE id = ANY($1)", &[&sent])
        .await
        .map_err(LedgerError::from)?;
    tx.commit().await.map_err(LedgerError::from)?;
    record::outbox_relayed(sent.len());
    Ok((claimed.len(), sent.len()))
}

/// The ids of `claimed` that may go now: per batch, the claimed rows that
/// come before the first row of that batch this pass does not hold (another
/// relay holds it, or it is past the claim).
async fn publishable(
    tx: &deadpool_postgres::Transaction<'_>,
    claimed: &[Row],
) -> Result<HashSet<i64>, SessionError> {
    let held: HashSet<i64> = claimed.iter().map(|r| r.id).collect();
    let mut batches: Vec<&str> = claimed.iter().map(|r| r.batch_id.as_str()).collect();
    batches.sort_unstable();
    batches.dedup();
    let last = claimed.iter().map(|r| r.id).max().unwrap_or(0);
    // Every row of those batches up to the last claimed one, locked or not.
    let rows = tx
        .query(
            "SELECT id, batch_id FROM outbox WHERE batch_id = ANY($1) AND id <= $2 ORDER BY id",
            &[&batches, &last],
        )
        .await
        .map_err(LedgerError::from)?;
    let mut blocked: HashMap<String, bool> = HashMap::new();
    let mut ready = HashSet::new();
    for r in rows {
        let (id, batch): (i64, String) = (r.get(0), r.get(1));
        let stop = blocked.entry(batch).or_insert(false);
        if *stop {
            continue;
        }
        if held.contains(&id) {
            ready.insert(id);
        } else {
            *stop = true;
        }
    }
    Ok(ready)
}

/// Publish one row to the events exchange and, when it names one, to the
/// producer's reply queue (a queue that is gone is fine).
async fn publish(
    publisher: &Publisher,
    exchange: &str,
    row: &Row,
    confirms: &mut Acks,
) -> Result<(), SessionError> {
    // Built by Holdfast and checked by the table: always a short string.
    let id = short("an event's message_id", &row.message_id)?;
    let props = json_properties().with_message_id(id.clone());
    let confirm = publisher
        .channel()
        .basic_publish(
            short("an exchange name", exchange)?,
            short("a routing key", &row.routing_key)?,
            Default::default(),
            &row.body,
            props,
        )
        .await
        .map_err(topology::BrokerError::from)?;
    confirms.push(confirm).await?;
    let Some(queue) = row.reply_to.as_deref() else {
        return Ok(());
    };
    let to = ReplyTo {
        queue: Some(queue.to_string()),
        correlation_id: row.correlation_id.clone(),
        amqp_user_id: None,
    };
    if short("a reply_to queue", queue).is_err() {
        // Not a queue name AMQP can carry: the event above is all there is.
        tracing::warn!(batch_id = %row.batch_id, "reply_to too long; summary sent as an event only");
        return Ok(());
    }
    let props = reply_properties(&to).with_message_id(id);
    // Mandatory: a queue that is gone returns it, which is fine (see `Acks`).
    let confirm = publisher.publish("", queue, &row.body, props).await?;
    confirms.push(confirm).await?;
    Ok(())
}

/// Rows waiting in the outbox, and the age in seconds of the oldest (0 when empty).
pub async fn depth(pool: &Pool) -> Result<(i64, f64), LedgerError> {
    let client = pool.get().await?;
    let row = client
        .query_one(
            "SELECT count(*), COALESCE(extract(epoch FROM now() - min(created_at)), 0)::float8 FROM outbox",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// Run a relay until `shutdown`: a pass whenever the ledger wakes it and
/// every `poll`, until the outbox has nothing this relay may publish; one
/// last pass at shutdown. Its AMQP session is supervised like every role's:
/// a broker outage ends it, the rows wait, and it reconnects with backoff.
pub async fn run(
    ledger: Ledger,
    amqp_url: String,
    names: Names,
    poll: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let name = format!("holdfast-relay/{}", names.namespace);
    topology::supervise("relay", "outbox", &name, shutdown.clone(), || async {
        // Connecting retries for about a minute: stop waiting at shutdown.
        let conn = tokio::select! {
            c = topology::connect(&amqp_url, &name) => c?,
            _ = shutdown.cancelled() => return Ok(()),
        };
        let lost = topology::watch(&conn);
        tokio::pin!(lost);
        let publisher = Publisher::new(&conn).await?;
        let wake = ledger.outbox_wake();
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let stopping = tokio::select! {
                _ = wake.notified() => false,
                _ = tick.tick() => {
                    match depth(ledger.pool()).await {
                        Ok((rows, lag)) => record::outbox(rows, lag),
                        Err(e) => tracing::debug!(error = %e, "outbox depth not read"),
                    }
                    false
                }
                e = &mut lost => return Err(e.into()),
                _ = shutdown.cancelled() => true,
            };
            // A confirm awaited on a connection the broker dropped may never
            // come: give the pass up when the connection goes.
            loop {
                let pass = relay_once(ledger.pool(), &publisher, &names, CLAIM_LIMIT);
                let done = tokio::select! {
                    r = guard("relay", "outbox", pass) => r,
                    e = &mut lost => return Err(e.into()),
                };
                match done {
                    Ok(Ok((claimed, sent))) => {
                        if (claimed as i64) < CLAIM_LIMIT || sent == 0 {
                            break;
                        }
                    }
                    Ok(Err(SessionError::Ledger(e))) if e.is_transient() => {
                        tracing::warn!(error = %e, "outbox not relayed; trying again at the next poll");
                        break;
                    }
                    Ok(Err(e)) => return Err(e),
                    Err(panicked) => {
                        // The pass rolled back: its rows wait for the next one.
                        tracing::error!(panic = %panicked.0, "outbox relay pass panicked; the rows wait for the next pass");
                        break;
                    }
                }
            }
            if stopping {
                break;
            }
        }
        topology::close(&conn, "shutdown").await;
        Ok(())
    })
    .await;
}
