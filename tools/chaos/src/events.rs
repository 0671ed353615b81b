//! The events check: a durable queue of the harness, bound to every
//! `batch.completed` event of the scenario's namespace from its start,
//! read after the fleet settled. Every batch the ledger closed must have
//! had its `completed` event arrive (at-least-once: duplicates, which carry
//! the same `message_id`, are noted, not failed). A batch closed without
//! one counts in the "events lost" column.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use holdfast_common::config::QueueSettings;
use holdfast_common::ledger::Ledger;
use holdfast_common::messages::Event;
use holdfast_common::topology::{self, Names};
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};

/// The harness's queue of completed events for one namespace.
pub struct EventAudit {
    amqp_url: String,
    queue: String,
}

/// What arrived: per batch, how many `completed` events and their message ids.
#[derive(Clone, Debug, Default)]
pub struct Arrived {
    pub completed: BTreeMap<String, usize>,
    pub message_ids: BTreeSet<String>,
}

impl EventAudit {
    /// Declare the topology and the durable queue `<ns>.chaos.completed`
    /// bound to `batch.completed`: events published from now on wait there,
    /// across broker restarts (persistent messages, confirmed by the broker
    /// once stored).
    pub async fn bind(
        amqp_url: &str,
        names: &Names,
        queues: &QueueSettings,
    ) -> anyhow::Result<Self> {
        let queue = format!("{}.chaos.completed", names.namespace);
        let conn = topology::connect(amqp_url, "holdfast-chaos-events").await?;
        let ch = conn.create_channel().await?;
        topology::declare(&ch, names, queues).await?;
        // On a cluster (a group size is set) a quorum queue, so that the
        // loss of the node it is on loses no event.
        let mut args = FieldTable::default();
        if let Some(size) = queues.quorum_initial_group_size {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
            args.insert(
                "x-quorum-initial-group-size".into(),
                AMQPValue::LongInt(size as i32),
            );
        }
        ch.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await?;
        ch.queue_bind(
            queue.as_str().into(),
            names.events().into(),
            "batch.completed".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        topology::close(&conn, "bound").await;
        Ok(Self {
            amqp_url: amqp_url.to_string(),
            queue,
        })
    }

    /// Read (and remove) every event in the queue, then delete it.
    pub async fn collect(&self) -> anyhow::Result<Arrived> {
        let conn = topology::connect(&self.amqp_url, "holdfast-chaos-events").await?;
        let ch = conn.create_channel().await?;
        let mut arrived = Arrived::default();
        while let Some(m) = ch
            .basic_get(self.queue.as_str().into(), BasicGetOptions::default())
            .await?
        {
            if let Ok(Event::Completed { batch_id, .. }) = serde_json::from_slice(&m.data) {
                *arrived.completed.entry(batch_id).or_default() += 1;
            }
            if let Some(id) = m.properties.message_id() {
                arrived.message_ids.insert(id.to_string());
            }
            m.ack(BasicAckOptions::default()).await?;
        }
        let _ = ch
            .queue_delete(self.queue.as_str().into(), Default::default())
            .await;
        topology::close(&conn, "collected").await;
        Ok(arrived)
    }
}

/// Batches the ledger closed whose `completed` event did not arrive.
pub async fn events_lost(ledger: &Ledger, arrived: &Arrived) -> anyhow::Result<Vec<String>> {
    let c = ledger.pool().get().await?;
    Ok(c.query(
        "SELECT id FROM batches WHERE state IN ('completed', 'expired', 'cancelled') ORDER BY id",
        &[],
    )
    .await?
    .iter()
    .map(|r| r.get::<_, String>(0))
    .filter(|id| !arrived.completed.contains_key(id))
    .collect())
}

/// Wait (up to `timeout`) until no `completed` event waits in the outbox:
/// the relays have had their chance. Returns how many still wait.
pub async fn wait_relayed(ledger: &Ledger, timeout: Duration) -> anyhow::Result<i64> {
    let deadline = Instant::now() + timeout;
    loop {
        let waiting: i64 = {
            let c = ledger.pool().get().await?;
            c.query_one("SELECT count(*) FROM outbox WHERE kind = 'completed'", &[])
                .await?
                .get(0)
        };
        if waiting == 0 || Instant::now() > deadline {
            return Ok(waiting);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
