//! The bench's own queues on the broker, declared like Holdfast's: durable
//! quorum queues with a delivery limit. The ceilings, the broker's round trip
//! and the naive baseline publish to and consume from them directly.

use holdfast_common::topology;
use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Consumer};

fn quorum_queue_args() -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    t.insert("x-delivery-limit".into(), AMQPValue::LongInt(5));
    t
}

/// Declare `queue` as a durable quorum queue with a delivery limit, like the jobs queue.
pub(crate) async fn declare_quorum(ch: &Channel, queue: &str) -> lapin::Result<()> {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        quorum_queue_args(),
    )
    .await?;
    Ok(())
}

/// Close `consumers` (the connection holding a queue's consumers), then delete
/// `queue` over a connection of its own. In this order on purpose: RabbitMQ
/// 3.10 crashes a channel that cancels a consumer of a quorum queue already
/// deleted, and closes its connection with 541 INTERNAL_ERROR (the cancel a
/// dropped consumer sends can arrive after the delete).
pub(crate) async fn delete_after(
    consumers: lapin::Connection,
    url: &str,
    queue: &str,
) -> anyhow::Result<()> {
    topology::close(&consumers, "bench").await;
    let conn = topology::connect(url, "holdfast-bench-cleanup").await?;
    let ch = conn.create_channel().await?;
    let deleted = ch
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await;
    // The channel is closed before its connection, not dropped: lapin closes a
    // dropped channel in the background and logs an ERROR if the connection
    // closes meanwhile.
    topology::close_channel(&ch, "bench").await;
    topology::close(&conn, "bench").await;
    deleted?;
    Ok(())
}

/// Consume `queue` on `ch`, at most `prefetch` deliveries unacknowledged.
pub(crate) async fn consume(ch: &Channel, queue: &str, prefetch: u16) -> lapin::Result<Consumer> {
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    ch.basic_consume(
        queue.into(),
        "".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    )
    .await
}
