//! The fault scenarios, one table row each. Every scenario runs on a fresh
//! database and namespace ([`Stage`]), drives producers ([`Load`]), injects
//! its faults while they run, waits for the fleet to settle, and adds the
//! expectations that show the fault did what it says (a crash point that was
//! never reached proves nothing).

use std::path::Path;
use std::time::{Duration, Instant};

use holdfast_common::ledger::ReserveInput;
use holdfast_common::messages::BatchRequest;
use holdfast_common::topology;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde_json::json;

use super::load::{items, Load, Request};
use super::services::Services;
use super::stage::{env, Stage};
use super::Row;
use holdfast_harness::processes::Ended;

/// Every scenario, in the order they run: the service restarts come after
/// the process faults, the long concurrency run last.
pub const ALL: &[&str] = &[
    "worker-kill-before-capture",
    "worker-kill-after-capture",
    "coordinator-kill-mid-dispatch",
    "reconciler-kill-mid-sweep",
    "two-reconcilers",
    "poison-job",
    "slow-consumer-deadline",
    "worker-rolling-restart",
    "rabbitmq-restart",
    "postgresql-restart",
    "concurrency-64-producers",
];

/// Run scenario `name`.
pub async fn run(
    name: &'static str,
    services: &mut Services,
    log_dir: &Path,
    settle: Duration,
) -> anyhow::Result<Row> {
    let stage = Stage::new(name, services, log_dir).await?;
    match name {
        "worker-kill-before-capture" => worker_killed(stage, "worker.before_capture", settle).await,
        "worker-kill-after-capture" => worker_killed(stage, "worker.after_capture", settle).await,
        "coordinator-kill-mid-dispatch" => coordinator_killed(stage, settle).await,
        "reconciler-kill-mid-sweep" => reconciler_killed(stage, settle).await,
        "two-reconcilers" => two_reconcilers(stage, settle).await,
        "poison-job" => poison_job(stage, settle).await,
        "slow-consumer-deadline" => slow_consumer_deadline(stage, settle).await,
        "worker-rolling-restart" => rolling_restart(stage, settle).await,
        "rabbitmq-restart" => super::restarts::rabbitmq(stage, settle).await,
        "postgresql-restart" => super::restarts::postgresql(stage, settle).await,
        "concurrency-64-producers" => super::concurrency::run(stage, settle).await,
        other => anyhow::bail!("no scenario `{other}`"),
    }
}

pub(super) const ACCOUNT: &str = "acme";

/// `producers` plans of `each` all-or-nothing batches of varied sizes and costs.
pub(super) fn plans(
    prefix: &str,
    producers: usize,
    each: usize,
    sizes: std::ops::Range<usize>,
    latency_ms: u64,
) -> Vec<Vec<Request>> {
    let span = sizes.end.saturating_sub(sizes.start).max(1);
    (0..producers)
        .map(|p| {
            (0..each)
                .map(|b| {
                    let id = format!("{prefix}-p{p}-b{b}");
                    let n = sizes.start + (p * 7 + b * 5) % span;
                    let cost = 1 + ((p + 3 * b) % 9) as i64;
                    Request::new(&id, ACCOUNT, "all_or_nothing", items(n, cost, latency_ms))
                })
                .collect()
        })
        .collect()
}

pub(super) fn start_load(s: &Stage<'_>, plans: Vec<Vec<Request>>, pace_ms: u64) -> Load {
    Load::start(
        &s.conn.amqp_url,
        &s.names,
        &s.queues,
        plans,
        Duration::from_millis(pace_ms),
        false,
    )
}

pub(super) async fn grant(s: &Stage<'_>, amount: i64) -> anyhow::Result<()> {
    s.ledger.grant(ACCOUNT, amount, Some("chaos"), true).await?;
    Ok(())
}

pub(super) async fn scalar(s: &Stage<'_>, sql: &str) -> anyhow::Result<i64> {
    let c = s.ledger.pool().get().await?;
    Ok(c.query_one(sql, &[]).await?.get(0))
}

/// Worker processes abort at `point` three times (their prefetched jobs go
/// back to the queue); then healthy workers take over.
async fn worker_killed(mut s: Stage<'_>, point: &str, settle: Duration) -> anyhow::Result<Row> {
    grant(&s, 1_000_000).await?;
    s.fleet(1, 0, 1, &[])?;
    let load = start_load(&s, plans(s.name, 6, 5, 3..17, 10), 100);
    s.crash_at("worker", point, 3, &[]).await?;
    let succeeded = scalar(&s, "SELECT count(*) FROM items WHERE state = 'succeeded'").await?;
    if point == "worker.before_capture" {
        s.expect(
            succeeded == 0,
            format!("nothing captured before the healthy workers started ({succeeded})"),
        );
    } else {
        s.expect(
            succeeded > 0,
            format!("{succeeded} item(s) captured by the killed workers, never acked"),
        );
    }
    s.fleet(0, 2, 0, &[])?;
    let sent = load.finish().await?;
    s.settle(&sent, Instant::now(), settle).await;
    s.finish(sent).await
}

/// Coordinators abort after the reservation commit and in the middle of a
/// dispatch (after the first confirmed window of two jobs); a healthy
/// coordinator and the reconciler finish the work.
async fn coordinator_killed(mut s: Stage<'_>, settle: Duration) -> anyhow::Result<Row> {
    grant(&s, 1_000_000).await?;
    s.fleet(0, 2, 1, &[])?;
    let load = start_load(&s, plans(s.name, 6, 5, 8..30, 5), 100);
    let small_window = env(&[("HOLDFAST_CONFIRM_WINDOW", "2")]);
    s.crash_at("coordinator", "coordinator.after_reserve", 2, &small_window)
        .await?;
    s.crash_at("coordinator", "coordinator.mid_dispatch", 2, &small_window)
        .await?;
    let stranded = scalar(&s, "SELECT count(*) FROM batches WHERE state = 'granted'").await?;
    // Evidence, not a verdict: a reconciler may already have re-dispatched them.
    s.note(format!(
        "{stranded} batch(es) reserved but not fully dispatched when the last coordinator died"
    ));
    s.fleet(1, 0, 0, &[])?;
    let sent = load.finish().await?;
    s.settle(&sent, Instant::now(), settle).await;
    s.finish(sent).await
}

/// Grant `n` batches straight in the ledger, as a coordinator that died
/// after its commit (and whose request is gone) leaves them: reserved,
/// nothing dispatched; only a reconciler can send their jobs.
async fn strand(s: &Stage<'_>, n: usize) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("stranded-{i}");
        let body = json!({"batch_id": id, "account_id": ACCOUNT, "items": items(4, 5, 0)});
        let request: BatchRequest = serde_json::from_value(body)?;
        s.ledger
            .reserve(&ReserveInput {
                request: &request,
                reply_to: None,
                correlation_id: None,
                execution_timeout: Duration::from_secs(600),
                dispatch_grace: Duration::from_secs(1),
                chunk_size: 10,
            })
            .await?;
        ids.push(id);
    }
    Ok(ids)
}

/// A reconciler aborts right after claiming stranded batches (their dispatch
/// lease taken, nothing sent), twice; a healthy one takes them after the lease.
async fn reconciler_killed(mut s: Stage<'_>, settle: Duration) -> anyhow::Result<Row> {
    grant(&s, 1_000_000).await?;
    s.fleet(1, 2, 0, &[])?;
    let stranded = strand(&s, 12).await?;
    let load = start_load(&s, plans(s.name, 4, 4, 3..12, 5), 150);
    s.crash_at("reconciler", "reconciler.mid_sweep", 2, &[])
        .await?;
    s.fleet(0, 0, 1, &[])?;
    let mut sent = load.finish().await?;
    sent.confirmed.extend(stranded);
    s.settle(&sent, Instant::now(), settle).await;
    s.finish(sent).await
}

/// Two reconcilers share stranded batches and expiring soft holds: each
/// batch is dispatched and closed, each hold resolved, exactly once.
async fn two_reconcilers(mut s: Stage<'_>, settle: Duration) -> anyhow::Result<Row> {
    grant(&s, 1_000_000).await?;
    s.fleet(1, 2, 0, &[])?;
    let stranded = strand(&s, 30).await?;
    for _ in 0..20 {
        s.ledger
            .reserve_soft(ACCOUNT, 7, Duration::from_secs(1))
            .await?;
    }
    s.fleet(0, 0, 2, &[])?;
    let load = start_load(&s, plans(s.name, 4, 4, 3..12, 5), 150);
    let mut sent = load.finish().await?;
    sent.confirmed.extend(stranded);
    s.settle(&sent, Instant::now(), settle).await;
    let twice = scalar(
        &s,
        "SELECT count(*) FROM (SELECT 1 FROM journal WHERE kind IN ('settle', 'release', 'expire')
         GROUP BY hold_id, kind HAVING count(*) > 1) d",
    )
    .await?;
    s.expect(
        twice == 0,
        format!("{twice} hold(s) resolved more than once"),
    );
    let expired = scalar(&s, "SELECT count(*) FROM holds WHERE state = 'expired'").await?;
    s.expect(expired == 20, format!("{expired} of 20 soft holds expired"));
    s.finish(sent).await
}

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
async fn poison_job(mut s: Stage<'_>, settle: Duration) -> anyhow::Result<Row> {
    grant(&s, 1_000_000).await?;
    s.fleet(1, 2, 1, &[])?;
    let mut plans = plans(s.name, 4, 5, 3..12, 5);
    for (p, plan) in plans.iter_mut().enumerate().take(3) {
        let id = format!("poisoned-{p}");
        let mut its = items(5, 3, 0);
        its.push(json!({"item_id": "poison", "estimated_cost": 11,
                        "payload": {"simulate": {"panic": true}}}));
        plan.insert(1, Request::new(&id, ACCOUNT, "all_or_nothing", its));
    }
    let load = start_load(&s, plans, 100);
    let sent = load.finish().await?;
    s.settle(&sent, Instant::now(), settle).await;
    let failed = scalar(
        &s,
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
async fn slow_consumer_deadline(mut s: Stage<'_>, settle: Duration) -> anyhow::Result<Row> {
    grant(&s, 1_000_000).await?;
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
    let load = start_load(&s, vec![plan], 50);
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
async fn rolling_restart(mut s: Stage<'_>, settle: Duration) -> anyhow::Result<Row> {
    const TIMEOUT: Duration = Duration::from_secs(10);
    grant(&s, 1_000_000).await?;
    let slow = env(&[("HOLDFAST_WORKER_PREFETCH", "8")]);
    s.fleet(1, 0, 1, &[])?;
    for _ in 0..3 {
        s.spawn("worker", &slow)?;
    }
    let plan = vec![
        Request::new("rolling-0", ACCOUNT, "all_or_nothing", items(300, 2, 300)),
        Request::new("rolling-1", ACCOUNT, "all_or_nothing", items(300, 2, 300)),
    ];
    let load = start_load(&s, vec![plan], 0);
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
