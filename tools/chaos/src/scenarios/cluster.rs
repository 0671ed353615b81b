//! `rabbitmq-node-loss`: the fleet runs on a three-node RabbitMQ cluster
//! ([`RabbitCluster`]) given as a URL list, its quorum queues with a member
//! on every node. While producers publish and workers run, the node leading
//! the jobs queue is killed (SIGKILL of its Erlang VM), kept away, started
//! again and waited for until it rejoined; then the same for the node
//! leading the requests queue. One node at a time: two of three keep the
//! majority every quorum queue needs.

use std::time::{Duration, Instant};

use crate::checks::Sent;
use crate::load::plans;
use crate::report::Row;
use crate::services::RabbitCluster;
use crate::stage::env;
use crate::stage::Stage;

/// How long a killed node stays away before it is started again.
const AWAY: Duration = Duration::from_secs(5);

/// Requests decided and batches closed so far.
async fn progress(s: &Stage<'_>) -> anyhow::Result<(i64, i64)> {
    Ok((
        s.scalar("SELECT count(*) FROM batches").await?,
        s.scalar(
            "SELECT count(*) FROM batches WHERE state IN ('completed', 'expired', 'cancelled')",
        )
        .await?,
    ))
}

/// Seconds until the fleet decides a request and closes a batch again
/// after a node loss (`None` when it did not within `timeout`).
async fn time_to_progress(s: &Stage<'_>, from: Instant, timeout: Duration) -> Option<f64> {
    let (decided, closed) = progress(s).await.ok()?;
    let (mut more_decided, mut more_closed) = (false, false);
    while from.elapsed() < timeout {
        if let Ok((d, c)) = progress(s).await {
            more_decided |= d > decided;
            more_closed |= c > closed;
            if more_decided && more_closed {
                return Some(from.elapsed().as_secs_f64());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// The scenario: the cluster is started for it and stopped after it.
pub async fn node_loss(mut s: Stage<'_>, settle: Duration) -> anyhow::Result<Row> {
    let root = std::env::temp_dir().join(format!("holdfast-chaos-{}-cluster", std::process::id()));
    let started = Instant::now();
    let mut cluster = RabbitCluster::start(&root).await?;
    s.note(format!(
        "three-node cluster up in {:.1}s",
        started.elapsed().as_secs_f64()
    ));
    let row = match drive(&mut s, &mut cluster, settle).await {
        // The processes stop while the cluster still runs.
        Ok(sent) => s.finish(sent).await,
        Err(e) => Err(e),
    };
    cluster.shutdown().await;
    row
}

async fn drive(
    s: &mut Stage<'_>,
    cluster: &mut RabbitCluster,
    settle: Duration,
) -> anyhow::Result<Sent> {
    let mut queues = s.queues.clone();
    queues.quorum_initial_group_size = Some(crate::services::CLUSTER_NODES as u32);
    s.on_broker(cluster.urls_from(0), queues).await?;
    let queue_names = [s.names.requests(), s.names.jobs()];
    cluster
        .wait_members(&queue_names, Duration::from_secs(30))
        .await?;
    s.grant(1_000_000).await?;
    // Two coordinators, two workers and a reconciler, each with the list
    // starting at another node: the roles spread over the cluster.
    let mut spread = 0;
    for (role, n) in [("coordinator", 2), ("worker", 2), ("reconciler", 1)] {
        for _ in 0..n {
            let extra = env(&[
                ("HOLDFAST_AMQP_URL", &cluster.urls_from(spread)),
                ("HOLDFAST_QUORUM_INITIAL_GROUP_SIZE", "3"),
                ("HOLDFAST_LOG", "warn,holdfast_common::topology=info"),
            ]);
            s.spawn(role, &extra)?;
            spread += 1;
        }
    }
    // 6 producers sending for about 35 s, batches of 3 to 12 items of 300 ms.
    let load = s.load(plans(s.name, 6, 40, 3..12, 300), 800);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut recoveries = Vec::new();
    for (what, queue) in [("jobs", s.names.jobs()), ("requests", s.names.requests())] {
        let leader = cluster.leader(&queue).await?;
        let node = cluster.nodes[leader].node.clone();
        // Strike while batches run (waiting up to 10 s for one).
        let waiting = Instant::now();
        let open = loop {
            let open = s
                .scalar("SELECT count(*) FROM batches WHERE state IN ('granted', 'dispatched', 'cancelling')")
                .await?;
            if open > 0 || waiting.elapsed() > Duration::from_secs(10) {
                break open;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let killed = Instant::now();
        cluster.nodes[leader].kill().await?;
        s.fault(format!(
            "{node}, leader of the {what} queue, killed (SIGKILL)"
        ));
        s.expect(
            open > 0,
            format!("{open} batch(es) running when {node} was killed"),
        );
        let back = time_to_progress(s, killed, Duration::from_secs(60)).await;
        s.expect(
            back.is_some(),
            format!(
                "requests decided and batches closed again {} after {node} was killed",
                back.map(|b| format!("{b:.1}s"))
                    .unwrap_or_else(|| "not within 60s".into())
            ),
        );
        recoveries.extend(back);
        let away = AWAY.saturating_sub(killed.elapsed());
        tokio::time::sleep(away).await;
        cluster.nodes[leader].start().await?;
        let rejoined = cluster
            .wait_members(&queue_names, Duration::from_secs(90))
            .await?;
        s.note(format!(
            "{node} started again after {:.1}s away; every quorum queue member online {:.1}s later",
            (killed.elapsed() - rejoined).as_secs_f64(),
            rejoined.as_secs_f64()
        ));
        let now = cluster.leader(&queue).await?;
        s.note(format!(
            "the {what} queue is led by {} now",
            cluster.nodes[now].node
        ));
    }
    if let Some(worst) = recoveries.iter().copied().reduce(f64::max) {
        s.note(format!("longest pause after a node loss: {worst:.1}s"));
    }
    let sent = load.finish().await?;
    s.settle(&sent, Instant::now(), settle).await;
    let reconnected = s.logs_repeating("connected to RabbitMQ node");
    s.expect(
        reconnected > 0,
        format!("{reconnected} role process(es) logged a reconnection to another node"),
    );
    Ok(sent)
}
