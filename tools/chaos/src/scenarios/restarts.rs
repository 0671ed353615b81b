//! Service faults: the throwaway RabbitMQ node and PostgreSQL cluster are
//! restarted (orderly, killed, crashed, kept away) while batches run. Every
//! role must come back by itself, the consumers with their prefetch.

use std::time::{Duration, Instant};

use holdfast_harness::rabbitmqctl;

use crate::load::{plans, Load};
use crate::report::Row;
use crate::stage::Stage;

/// (role, prefetch) of every consuming channel of this namespace's roles, per RabbitMQ.
async fn consumer_prefetch(s: &Stage<'_>) -> anyhow::Result<Vec<(String, u64)>> {
    let rabbit = &s.services.rabbit;
    let connections = rabbitmqctl::connections(
        &rabbit.ctl(rabbitmqctl::LIST_CONNECTIONS).await?,
        &s.conn.namespace,
    );
    Ok(rabbitmqctl::consumer_prefetch(
        &rabbit.ctl(rabbitmqctl::LIST_CHANNELS).await?,
        &connections,
    ))
}

/// Batches granted and not closed yet: the work a fault interrupts.
async fn running(s: &Stage<'_>) -> anyhow::Result<i64> {
    s.scalar("SELECT count(*) FROM batches WHERE state IN ('granted', 'dispatched', 'cancelling')")
        .await
}

/// Wait (up to 30 s) until some batch is running, so that the fault hits
/// work in progress; returns how many were.
async fn when_running(s: &Stage<'_>) -> anyhow::Result<i64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let open = running(s).await?;
        if open > 0 || Instant::now() > deadline {
            return Ok(open);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Load for the service restarts: 8 producers sending for about 10 s,
/// batches of 5 to 30 items of 400 ms, which keep the fleet busy for longer.
fn restart_load(s: &Stage<'_>) -> Load {
    s.load(plans(s.name, 8, 12, 5..30, 400), 800)
}

/// The broker is restarted twice while batches run, once stopped in order,
/// once killed with SIGKILL; every role must come back by itself, the consumers with their prefetch, and what was not
/// confirmed is sent again (producers' requests, coordinators' jobs).
pub async fn rabbitmq(mut s: Stage<'_>, settle: Duration) -> anyhow::Result<Row> {
    s.grant(1_000_000).await?;
    s.fleet(2, 2, 1, &[])?;
    let load = restart_load(&s);
    for kill in [false, true] {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let open = when_running(&s).await?;
        let away = s.services.rabbit.restart(kill).await?;
        s.fault(format!(
            "RabbitMQ {} and started again ({:.1}s away)",
            if kill { "killed (SIGKILL)" } else { "stopped" },
            away.as_secs_f64()
        ));
        s.expect(
            open > 0,
            format!("{open} batch(es) running when RabbitMQ stopped"),
        );
    }
    let sent = load.finish().await?;
    s.settle(&sent, Instant::now(), settle).await;
    // 2 workers × prefetch 16, 2 coordinators × 2 consumers × prefetch 32.
    let want: Vec<(String, u64)> = [("holdfast-coordinator", 32u64); 4]
        .into_iter()
        .chain([("holdfast-worker", 16); 2])
        .map(|(r, p)| (r.to_string(), p))
        .collect();
    let mut got = Vec::new();
    for _ in 0..60 {
        got = consumer_prefetch(&s).await?;
        got.retain(|(r, _)| r != "holdfast-previews");
        if got == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    s.expect(
        got == want,
        format!("consumers back with their prefetch: {got:?}"),
    );
    s.finish(sent).await
}

/// Closed batches (completed, expired, cancelled).
async fn closed(s: &Stage<'_>) -> anyhow::Result<i64> {
    s.scalar("SELECT count(*) FROM batches WHERE state IN ('completed', 'expired', 'cancelled')")
        .await
}

/// RabbitMQ dies (SIGKILL) at the instant the first batches complete (the
/// harness polls the ledger every 5 ms and kills the node as soon as one
/// closed), and stays away while the workers finish the jobs they hold:
/// batches whose last items those were close in the ledger with no broker
/// to tell. Their `completed` events wait in the outbox and must all arrive
/// once it is back.
pub async fn outage_at_completion(mut s: Stage<'_>, settle: Duration) -> anyhow::Result<Row> {
    s.grant(1_000_000).await?;
    s.fleet(1, 2, 1, &[])?;
    // Batches of 1 to 3 items of 600 ms, sent faster than the two workers
    // (16 jobs at once each) run them: when the first batch completes, the
    // workers hold whole batches, which complete while the broker is away.
    let load = s.load(plans(s.name, 6, 10, 1..4, 600), 300);
    let deadline = Instant::now() + Duration::from_secs(60);
    while closed(&s).await? == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let first = closed(&s).await?;
    let started = Instant::now();
    s.services.rabbit.kill().await?;
    s.fault("RabbitMQ killed as the first batches completed");
    s.expect(
        first > 0,
        format!("{first} batch(es) closed when RabbitMQ was killed"),
    );
    // Away for 8 s: the workers settle the items they had, closing batches.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let closed_away = closed(&s).await? - first;
    let waiting = s
        .scalar("SELECT count(*) FROM outbox WHERE kind = 'completed'")
        .await?;
    s.services.rabbit.start().await?;
    s.fault(format!(
        "RabbitMQ started again ({:.1}s away)",
        started.elapsed().as_secs_f64()
    ));
    s.expect(
        waiting > 0,
        format!(
            "{closed_away} batch(es) closed while RabbitMQ was away; {waiting} completed event(s) waited in the outbox"
        ),
    );
    let sent = load.finish().await?;
    s.settle(&sent, Instant::now(), settle).await;
    s.finish(sent).await
}

/// PostgreSQL crashes (immediate stop: every backend killed, recovery at the
/// next start) while batches run: once restarted at once, once after 30 s
/// away. Roles retry with backoff; nothing is lost or captured twice.
pub async fn postgresql(mut s: Stage<'_>, settle: Duration) -> anyhow::Result<Row> {
    s.grant(1_000_000).await?;
    s.fleet(2, 2, 1, &[])?;
    let load = restart_load(&s);
    for pause in [Duration::ZERO, Duration::from_secs(100)] {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let open = when_running(&s).await?;
        let away = s.services.pg.crash_restart(pause).await?;
        s.fault(format!(
            "PostgreSQL crashed and restarted ({:.1}s away)",
            away.as_secs_f64()
        ));
        s.expect(
            open > 0,
            format!("{open} batch(es) running when PostgreSQL crashed"),
        );
    }
    let sent = load.finish().await?;
    s.settle(&sent, Instant::now(), settle).await;
    s.finish(sent).await
}
