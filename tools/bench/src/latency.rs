//! Decision latency at a steady offered rate, and the broker's own round
//! trip at the same rate: the floor under it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use holdfast_common::config::{Connections, QueueSettings};
use holdfast_common::topology::{self, json_properties, Names, Publisher};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use tokio::task::JoinHandle;

use crate::queues::{consume, declare_quorum, delete_after};
use crate::requests::request;

/// The floor under decision latency: requests at `rate` on a quorum queue
/// declared like the requests queue, one consumer (with the coordinator's
/// prefetch) that answers each at once to its `reply_to` and acks it, timed
/// like [`decisions`]. No PostgreSQL, no decision: the broker's part alone.
pub(crate) async fn broker_round_trip(
    conn: &Connections,
    names: &Names,
    queues: &QueueSettings,
    rate: f64,
    seconds: u64,
    prefetch: u16,
) -> anyhow::Result<(f64, f64)> {
    let queue = format!("{}.bench-echo", conn.namespace);
    let amqp = topology::connect(&conn.amqp_url, "holdfast-bench-echo").await?;
    let ch = amqp.create_channel().await?;
    declare_quorum(&ch, &queue).await?;
    let mut deliveries = consume(&ch, &queue, prefetch).await?;
    let tag = deliveries.tag();
    let publisher = Publisher::new(&amqp).await?;
    let mut echo = tokio::spawn(async move {
        while let Some(Ok(d)) = deliveries.next().await {
            let to = holdfast_common::events::ReplyTo::of(&d.properties);
            let mut props = json_properties();
            if let Some(c) = to.correlation_id {
                props = props.with_correlation_id(c.into());
            }
            let _confirm = publisher
                .publish("", to.queue.as_deref().unwrap_or_default(), &d.data, props)
                .await?;
            d.acker.ack(BasicAckOptions::default()).await?;
        }
        anyhow::Ok(())
    });
    let measured = decisions(conn, names, queues, &queue, "echo-", rate, seconds).await;
    // The echo stops when its consumer is cancelled (its stream ends).
    let _ = ch.basic_cancel(tag, BasicCancelOptions::default()).await;
    if tokio::time::timeout(Duration::from_secs(5), &mut echo)
        .await
        .is_err()
    {
        echo.abort();
    }
    delete_after(amqp, &conn.amqp_url, &queue).await?;
    measured
}

/// Send requests at `rate` per second for `seconds` and time each decision,
/// from its publish to the arrival of its decision on the reply queue (read
/// concurrently, so a reply is timed when it arrives, not when looked at).
pub(crate) async fn decisions(
    conn: &Connections,
    names: &Names,
    queues: &QueueSettings,
    queue: &str,
    prefix: &str,
    rate: f64,
    seconds: u64,
) -> anyhow::Result<(f64, f64)> {
    let amqp = topology::connect(&conn.amqp_url, "holdfast-bench-latency").await?;
    let ch = amqp.create_channel().await?;
    topology::declare(&ch, names, queues).await?;
    let n = (rate * seconds as f64) as usize;
    let (reply_queue, arrived) = arrivals(&ch, n).await?;
    let publisher = Publisher::new(&amqp).await?;
    let gap = Duration::from_secs_f64(1.0 / rate);
    let mut sent = Vec::with_capacity(n);
    let start = tokio::time::Instant::now();
    for i in 0..n {
        tokio::time::sleep_until(start + gap * i as u32).await;
        let id = format!("{prefix}{i}");
        let props = json_properties()
            .with_reply_to(reply_queue.clone().into())
            .with_correlation_id(id.clone().into());
        let at = Instant::now();
        // Not waiting for the confirm here keeps the offered rate steady.
        let _confirm = publisher
            .publish("", queue, &request(&id, "hot", 1, 1), props)
            .await?;
        sent.push((id, at));
    }
    let arrived = arrived.await?;
    topology::close(&amqp, "bench").await;
    let mut ms: Vec<f64> = sent
        .iter()
        .filter_map(|(id, at)| {
            arrived
                .get(id)
                .map(|got| got.duration_since(*at).as_secs_f64() * 1000.0)
        })
        .collect();
    anyhow::ensure!(
        ms.len() == n,
        "latency: {} of {n} decisions arrived",
        ms.len()
    );
    ms.sort_by(f64::total_cmp);
    Ok((percentile(&ms, 0.5), percentile(&ms, 0.99)))
}

/// An exclusive reply queue on `ch`, and a task noting when the first
/// answer to each correlation id arrives there, until `n` have (or none for
/// a minute).
async fn arrivals(
    ch: &lapin::Channel,
    n: usize,
) -> anyhow::Result<(String, JoinHandle<HashMap<String, Instant>>)> {
    let reply = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let reply_queue = reply.name().to_string();
    let mut replies = ch
        .basic_consume(
            reply_queue.clone().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let arrived = tokio::spawn(async move {
        let mut at = HashMap::with_capacity(n);
        while at.len() < n {
            match tokio::time::timeout(Duration::from_secs(60), replies.next()).await {
                Ok(Some(Ok(d))) => {
                    let id = d
                        .properties
                        .correlation_id()
                        .as_ref()
                        .map(|c| c.to_string())
                        .unwrap_or_default();
                    // The first answer per request is its decision (a summary may follow).
                    at.entry(id).or_insert_with(Instant::now);
                }
                _ => break,
            }
        }
        at
    });
    Ok((reply_queue, arrived))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}
