//! The anti-pattern Holdfast replaces, measured on the same services: fire
//! every item of every batch at once and let each item check and decrement
//! the quota on its own as it runs. When credits run short, batches end half
//! done — the count this baseline reports beside Holdfast's zero.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::StreamExt;
use holdfast_common::config::Connections;
use holdfast_common::database;
use holdfast_common::topology::{self, json_properties, Publisher};
use lapin::options::BasicAckOptions;
use serde_json::{json, Value};

/// What the naive run did.
pub struct Naive {
    pub items_per_s: f64,
    pub batches: usize,
    /// Batches with some but not all items done.
    pub half_done: usize,
}

/// `batches` × `items` items of `cost`, with credits for 60 % of them,
/// consumed by `consumers` workers each decrementing the quota per item.
pub async fn run(
    conn: &Connections,
    batches: usize,
    items: usize,
    cost: i64,
    consumers: usize,
) -> anyhow::Result<Naive> {
    let pool = database::pool(&conn.database_url, consumers)?;
    let credits = (batches * items) as i64 * cost * 6 / 10;
    fill_quota(&pool, credits).await?;
    let queue = format!("{}.naive", conn.namespace);
    let amqp = topology::connect(&conn.amqp_url, "holdfast-bench-naive").await?;
    let ch = amqp.create_channel().await?;
    crate::queues::declare_quorum(&ch, &queue).await?;

    let done: Arc<Mutex<HashMap<usize, usize>>> = Arc::default();
    let total = batches * items;
    let counted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..consumers {
        let (pool, done, counted, amqp_ch) = (
            pool.clone(),
            done.clone(),
            counted.clone(),
            amqp.create_channel().await?,
        );
        let mut consumer = crate::queues::consume(&amqp_ch, &queue, 64).await?;
        tasks.push(tokio::spawn(async move {
            let client = pool.get().await?;
            let stmt = client
                .prepare("UPDATE naive_quota SET balance = balance - $1 WHERE id = 'naive' AND balance >= $1")
                .await?;
            while counted.load(std::sync::atomic::Ordering::SeqCst) < total {
                let next = tokio::time::timeout(std::time::Duration::from_millis(500), consumer.next()).await;
                let Ok(Some(Ok(d))) = next else { continue };
                let item: Value = serde_json::from_slice(&d.data)?;
                // The anti-pattern: check and decrement the quota for this item alone.
                if client.execute(&stmt, &[&item["cost"].as_i64().unwrap_or(0)]).await? == 1 {
                    *done.lock().expect("not poisoned").entry(item["batch"].as_u64().unwrap_or(0) as usize).or_default() += 1;
                }
                d.acker.ack(BasicAckOptions::default()).await?;
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            anyhow::Ok(())
        }));
    }
    let publisher = Publisher::new(&amqp).await?;
    let started = Instant::now();
    publish_interleaved(&publisher, &queue, batches, items, cost).await?;
    for t in tasks {
        t.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    crate::queues::delete_after(amqp, &conn.amqp_url, &queue).await?;
    let done = done.lock().expect("not poisoned");
    let half_done = (0..batches)
        .filter(|b| matches!(done.get(b), Some(&n) if n > 0 && n < items))
        .count();
    Ok(Naive {
        items_per_s: total as f64 / secs,
        batches,
        half_done,
    })
}

/// The naive quota: one row holding `credits`.
async fn fill_quota(pool: &deadpool_postgres::Pool, credits: i64) -> anyhow::Result<()> {
    let client = pool.get().await?;
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS naive_quota (id text PRIMARY KEY, balance bigint NOT NULL CHECK (balance >= 0))",
        )
        .await?;
    client
        .execute(
            "INSERT INTO naive_quota VALUES ('naive', $1)
             ON CONFLICT (id) DO UPDATE SET balance = EXCLUDED.balance",
            &[&credits],
        )
        .await?;
    Ok(())
}

/// Every batch fired at once, its items interleaved with the others',
/// confirmed in windows of 500.
async fn publish_interleaved(
    publisher: &Publisher,
    queue: &str,
    batches: usize,
    items: usize,
    cost: i64,
) -> anyhow::Result<()> {
    let mut confirms = Vec::new();
    for i in 0..items {
        for b in 0..batches {
            let body = json!({"batch": b, "item": i, "cost": cost}).to_string();
            confirms.push(
                publisher
                    .publish("", queue, body.as_bytes(), json_properties())
                    .await?,
            );
            if confirms.len() >= 500 {
                for c in confirms.drain(..) {
                    Publisher::confirmed(c, queue).await?;
                }
            }
        }
    }
    for c in confirms {
        Publisher::confirmed(c, queue).await?;
    }
    Ok(())
}
