//! The ceilings Holdfast is measured against, with the settings its roles
//! use: the broker's confirmed publishing and acked consuming on a quorum
//! queue declared like the jobs queue, and PostgreSQL's one-statement
//! `UPDATE`s of one hot row from as many clients as the coordinator has
//! consumers.

use std::time::{Duration, Instant};

use futures::StreamExt;
use holdfast_common::database;
use holdfast_common::messages::{ItemJob, SCHEMA_VERSION};
use holdfast_common::topology::{self, json_properties, Publisher};
use lapin::options::{BasicAckOptions, QueueDeleteOptions};
use serde_json::json;

use crate::queues::{consume, declare_quorum};

fn job_body() -> Vec<u8> {
    serde_json::to_vec(&ItemJob {
        schema_version: SCHEMA_VERSION,
        batch_id: "bench-batch-000001".into(),
        item_id: "item-000001".into(),
        account_id: "bench-account".into(),
        reserved: 12,
        payload: json!({"prompt": "a product photo of a red bicycle on a white background"}),
        attempt: 1,
    })
    .expect("serialises")
}

/// Raw persistent, confirmed publishing and acked consuming on a quorum queue.
pub(crate) async fn broker(
    url: &str,
    ns: &str,
    n: usize,
    window: usize,
    prefetch: u16,
) -> anyhow::Result<f64> {
    let queue = format!("{ns}.bench-raw");
    let conn = topology::connect(url, "holdfast-bench-publisher").await?;
    let ch = conn.create_channel().await?;
    declare_quorum(&ch, &queue).await?;
    let consumer_conn = topology::connect(url, "holdfast-bench-consumer").await?;
    let cch = consumer_conn.create_channel().await?;
    let mut consumer = consume(&cch, &queue, prefetch).await?;
    let body = job_body();
    let publisher = Publisher::new(&conn).await?;
    let started = Instant::now();
    let consume = tokio::spawn(async move {
        let mut got = 0;
        while got < n {
            let Some(Ok(d)) = consumer.next().await else {
                break;
            };
            d.acker.ack(BasicAckOptions::default()).await?;
            got += 1;
        }
        anyhow::Ok(got)
    });
    for chunk in (0..n).collect::<Vec<_>>().chunks(window) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for _ in chunk {
            confirms.push(
                publisher
                    .publish("", &queue, &body, json_properties())
                    .await?,
            );
        }
        for c in confirms {
            Publisher::confirmed(c, &queue).await?;
        }
    }
    let got = consume.await??;
    let secs = started.elapsed().as_secs_f64();
    // The consumer goes before its queue (see `delete_after`).
    topology::close(&consumer_conn, "bench").await;
    ch.queue_delete(queue.into(), QueueDeleteOptions::default())
        .await?;
    topology::close(&conn, "bench").await;
    anyhow::ensure!(got == n, "broker ceiling: consumed {got} of {n}");
    Ok(n as f64 / secs)
}

/// One-statement UPDATE transactions of one hot row from `clients` connections.
pub(crate) async fn pg_hot_row(url: &str, clients: usize, seconds: u64) -> anyhow::Result<f64> {
    let pool = database::pool(url, clients)?;
    {
        let c = pool.get().await?;
        c.batch_execute(
            "CREATE TABLE IF NOT EXISTS bench_hot (id int PRIMARY KEY, n bigint NOT NULL);
             INSERT INTO bench_hot VALUES (1, 0) ON CONFLICT DO NOTHING;",
        )
        .await?;
    }
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let c = pool.get().await?;
            let stmt = c
                .prepare("UPDATE bench_hot SET n = n + 1 WHERE id = 1")
                .await?;
            let mut done = 0u64;
            while Instant::now() < until {
                c.execute(&stmt, &[]).await?;
                done += 1;
            }
            anyhow::Ok(done)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / seconds as f64)
}
