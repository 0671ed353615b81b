//! Faults in the work itself and in how workers leave it: a job that
//! panics on every delivery, a slow consumer past its batch's execution
//! deadline, and workers restarted one by one with SIGTERM mid-batch.

use std::time::{Duration, Instant};

use holdfast_common::topology;
use holdfast_harness::processes::Ended;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde_json::json;

use crate::load::{items, plans, Request, ACCOUNT};
use crate::report::Row;
use crate::stage::{env, Stage};

/// How many messages wait in `queue`.
async fn queue_depth(s: &Stage<'_>, queue: &str) -> anyhow::Result<u32> {
    let conn = topology::connect(&s.conn.amqp_url, "holdfast-chaos").await?;
    let channel = conn.create_channel().await?;
    let q = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    topology::close(&conn, "done").await;
    Ok(q.message_count())
}

/// Batches with one item whose generator panics on every delivery: after
/// the delivery limit the job is parked, the item failed (uncharged), the
/// batch closes, and the other batches flow past it.
pub(super) async fn poison_job(mut s: Stage<'_>, settle: Duration) -> anyhow::Result<Row> {
    s.grant(1_000_000).await?;
    s.fleet(1, 2, 1, &[])?;
    let mut plans = plans(s.name, 4, 5, 3..12, 5);
    for (p, plan) in plans.iter_mut().enumerate().take(3) {
        let id = format!("poisoned-{p}");
        let mut its = items(5, 3, 0);
        its.push(json!({"item_id": "poison", "estimated_cost": 11,
                        "payload": {"simulate": {"panic": true}}}));
        plan.insert(1, Request::new(&id, ACCOUNT, "all_or_nothing", its));
    }
    let load = s.load(plans, 100);
    let sent = load.finish().await?;
    s.settle(&sent, Instant::now(), settle).await;
    let failed = s
        .scalar(
            "SELECT count(*) FROM items WHERE item_id = 'poison' AND state = 'failed'
           AND captured = 0 AND reason LIKE '%crashed%'",
        )
        .await?;
    s.expect(
        failed == 3,
        format!("{failed} of 3 poison items failed uncharged after the delivery limit"),
    );
    let parked = queue_depth(&s, &s.names.jobs_dead()).await?;
    s.expect(
        parked >= 3,
        format!("{parked} job(s) parked in {}", s.names.jobs_dead()),
    );
    s.finish(sent).await
}

/// One slow consumer (prefetch 2) and a long batch (30 items × 400 ms) past
/// its 4 s execution deadline: the reconciler closes it, unsettled items
/// fail uncharged, the rest of the hold is released; late captures change nothing.
pub(super) async fn slow_consumer_deadline(
    mut s: Stage<'_>,
    settle: Duration,
) -> anyhow::Result<Row> {
    s.grant(1_000_000).await?;
    s.fleet(1, 0, 1, &env(&[("HOLDFAST_EXECUTION_TIMEOUT_SECS", "4")]))?;
    s.spawn("worker", &env(&[("HOLDFAST_WORKER_PREFETCH", "2")]))?;
    let mut plan: Vec<Request> = (0..3)
        .map(|i| {
            let id = format!("short-{i}");
            Request::new(&id, ACCOUNT, "all_or_nothing", items(3, 2, 0))
        })
        .collect();
    plan.push(Request::new(
        "long",
        ACCOUNT,
        "all_or_nothing",
        items(30, 4, 400),
    ));
    let load = s.load(vec![plan], 50);
    let sent = load.finish().await?;
    s.settle(&sent, Instant::now(), settle).await;
    let c = s.ledger.pool().get().await?;
    let row = c
        .query_one(
            "SELECT b.state, b.failed, h.released, h.captured FROM batches b
             JOIN holds h ON h.id = b.hold_id WHERE b.id = 'long'",
            &[],
        )
        .await?;
    let (state, failed, released, captured): (String, i32, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    drop(c);
    s.expect(
        state == "expired" && failed > 0 && released > 0,
        format!("long batch {state}: {failed} item(s) failed at the deadline, {captured} captured, {released} released"),
    );
    s.finish(sent).await
}

/// Rolling restart: each worker in turn gets SIGTERM while a long batch
/// runs; it must finish its in-flight items (capture, ack) and exit 0
/// within its shutdown timeout (10 s); a replacement starts after it.
pub(super) async fn rolling_restart(mut s: Stage<'_>, settle: Duration) -> anyhow::Result<Row> {
    const TIMEOUT: Duration = Duration::from_secs(10);
    s.grant(1_000_000).await?;
    let slow = env(&[("HOLDFAST_WORKER_PREFETCH", "8")]);
    s.fleet(1, 0, 1, &[])?;
    for _ in 0..3 {
        s.spawn("worker", &slow)?;
    }
    let plan = vec![
        Request::new("rolling-0", ACCOUNT, "all_or_nothing", items(300, 2, 300)),
        Request::new("rolling-1", ACCOUNT, "all_or_nothing", items(300, 2, 300)),
    ];
    let load = s.load(vec![plan], 0);
    let sent = load.finish().await?;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let Some(mut worker) = s.take("worker") else {
            anyhow::bail!("no worker to restart");
        };
        let (ended, took, killed) = worker.terminate(TIMEOUT + Duration::from_secs(15)).await;
        s.fault(format!("SIGTERM to {}", worker.name));
        let abandoned = s.log_contains(&worker.name, "still running at the shutdown timeout")
            || s.log_contains(&worker.name, "captures still pending");
        s.expect(
            ended == Ended::Exited(0) && !killed && !abandoned && took <= TIMEOUT,
            format!(
                "{} exited {ended:?} {:.1}s after SIGTERM{}",
                worker.name,
                took.as_secs_f64(),
                if abandoned {
                    ", abandoning in-flight items"
                } else {
                    ""
                }
            ),
        );
        s.spawn("worker", &slow)?;
    }
    s.settle(&sent, Instant::now(), settle).await;
    s.finish(sent).await
}
