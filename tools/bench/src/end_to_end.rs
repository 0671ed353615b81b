//! Runs through the whole fleet: batches published by one producer, timed
//! until the ledger shows them closed (or, for decisions alone, decided).
//! Each phase runs on the one hot account unless said otherwise.

use std::time::{Duration, Instant};

use holdfast::producer::Producer;
use holdfast_common::ledger::Ledger;

use crate::cpu::{CpuMeter, CpuSplit};
use crate::requests::{numbered, request};

/// The account most phases charge, whatever the batch.
fn hot(_: usize) -> String {
    "hot".to_string()
}

/// A few batches through the whole fleet before anything is timed.
pub(crate) async fn warm_up(producer: &Producer, ledger: &Ledger) -> anyhow::Result<()> {
    publish_all(producer, &numbered("warm-", 20, 10, hot)).await?;
    wait_closed(ledger, "warm-", 20).await?;
    Ok(())
}

/// Items per second over `n` batches of 10 items, and where the CPU went;
/// `roles` names the role processes for the [`CpuMeter`].
pub(crate) async fn small_batches(
    producer: &Producer,
    ledger: &Ledger,
    roles: Vec<(u32, String)>,
    n: usize,
) -> anyhow::Result<(f64, CpuSplit)> {
    holdfast::progress::phase(
        "bench",
        format!("end to end, {n} batches of 10 items on one account"),
    );
    let small = numbered("small-", n, 10, hot);
    let cpu = CpuMeter::start(roles);
    let started = Instant::now();
    publish_all(producer, &small).await?;
    let done = wait_closed(ledger, "small-", small.len() as i64).await?;
    let split = cpu.stop(&format!("{} items in 10-item batches", small.len() * 10));
    let rate = (small.len() * 10) as f64 / (done - started).as_secs_f64();
    Ok((rate, split))
}

/// Items per second through one batch of `items`, and where the CPU went.
pub(crate) async fn large_batch(
    producer: &Producer,
    ledger: &Ledger,
    roles: Vec<(u32, String)>,
    items: usize,
) -> anyhow::Result<(f64, CpuSplit)> {
    holdfast::progress::phase("bench", format!("end to end, one batch of {items} items"));
    let cpu = CpuMeter::start(roles);
    let started = Instant::now();
    publish_all(
        producer,
        &[("large-0".into(), request("large-0", "hot", items, 1))],
    )
    .await?;
    let done = wait_closed(ledger, "large-", 1).await?;
    let split = cpu.stop(&format!("{items} items in one batch"));
    Ok((items as f64 / (done - started).as_secs_f64(), split))
}

/// Microseconds per item at batch sizes 10 to 10,000, each size over
/// `items` items in all.
pub(crate) async fn growth(
    producer: &Producer,
    ledger: &Ledger,
    items: usize,
) -> anyhow::Result<Vec<(usize, f64)>> {
    holdfast::progress::phase("bench", "time per item by batch size");
    let mut per_item = Vec::new();
    for (k, size) in [10usize, 100, 1_000, 10_000].into_iter().enumerate() {
        let prefix = format!("growth{k}-");
        // The same number of items at every size: a size timed over less
        // work would be timed mostly on the pipeline filling and draining.
        let n = (items / size).max(1);
        let bodies = numbered(&prefix, n, size, hot);
        let started = Instant::now();
        publish_all(producer, &bodies).await?;
        let done = wait_closed(ledger, &prefix, n as i64).await?;
        per_item.push((
            size,
            (done - started).as_secs_f64() * 1e6 / (n * size) as f64,
        ));
    }
    Ok(per_item)
}

/// Decisions per second, `n` one-item requests on the hot account, then
/// over 100 accounts (granted here). Meant to run with the workers paused,
/// so that the jobs wait in the queue.
pub(crate) async fn decisions(
    producer: &Producer,
    ledger: &Ledger,
    n: usize,
) -> anyhow::Result<(f64, f64)> {
    holdfast::progress::phase(
        "bench",
        format!("decisions on one hot account ({n} requests)"),
    );
    let bodies = numbered("dh-", n, 1, hot);
    let started = Instant::now();
    publish_all(producer, &bodies).await?;
    let done = wait_decided(ledger, "dh-", bodies.len() as i64).await?;
    let hot = bodies.len() as f64 / (done - started).as_secs_f64();
    holdfast::progress::phase("bench", "decisions over 100 accounts");
    for a in 0..100 {
        ledger
            .grant(&format!("acct-{a}"), 1_000_000, None, true)
            .await?;
    }
    let bodies = numbered("dm-", n, 1, |i| format!("acct-{}", i % 100));
    let started = Instant::now();
    publish_all(producer, &bodies).await?;
    let done = wait_decided(ledger, "dm-", bodies.len() as i64).await?;
    let many = bodies.len() as f64 / (done - started).as_secs_f64();
    Ok((hot, many))
}

pub(crate) async fn count(ledger: &Ledger, sql: &str, prefix: &str) -> anyhow::Result<i64> {
    let c = ledger.pool().get().await?;
    Ok(c.query_one(sql, &[&format!("{prefix}%")]).await?.get(0))
}

/// Wait until every batch whose id starts with `prefix` is closed (or denied); returns when.
pub(crate) async fn wait_closed(
    ledger: &Ledger,
    prefix: &str,
    expected: i64,
) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let closed = count(
            ledger,
            "SELECT count(*) FROM batches WHERE id LIKE $1 AND state IN ('completed', 'denied', 'expired', 'cancelled')",
            prefix,
        )
        .await?;
        if closed >= expected {
            return Ok(Instant::now());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{prefix}: {closed} of {expected} closed after 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) async fn wait_decided(
    ledger: &Ledger,
    prefix: &str,
    expected: i64,
) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if count(
            ledger,
            "SELECT count(*) FROM batches WHERE id LIKE $1",
            prefix,
        )
        .await?
            >= expected
        {
            return Ok(Instant::now());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{prefix}: not all decided after 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Publish `bodies` as fast as confirms allow (windows of 500), from one producer.
pub(crate) async fn publish_all(
    producer: &Producer,
    bodies: &[(String, Vec<u8>)],
) -> anyhow::Result<()> {
    producer.send_many(bodies, 500).await
}
