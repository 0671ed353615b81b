//! Role processes that die mid-work: workers, coordinators and reconcilers
//! abort at named crash points (as abruptly as SIGKILL) while batches run,
//! and two reconcilers race each other for stranded batches and expiring
//! soft holds. Healthy processes must finish the work, each item captured
//! once.

use std::time::{Duration, Instant};

use holdfast_common::ledger::ReserveInput;
use holdfast_common::messages::BatchRequest;
use serde_json::json;

use crate::load::{items, plans, ACCOUNT};
use crate::report::Row;
use crate::stage::{env, Stage};

/// Worker processes abort at `point` three times (their prefetched jobs go
/// back to the queue); then healthy workers take over.
pub(super) async fn worker_killed(
    mut s: Stage<'_>,
    point: &str,
    settle: Duration,
) -> anyhow::Result<Row> {
    s.grant(1_000_000).await?;
    s.fleet(1, 0, 1, &[])?;
    let load = s.load(plans(s.name, 6, 5, 3..17, 10), 100);
    s.crash_at("worker", point, 3, &[]).await?;
    let succeeded = s
        .scalar("SELECT count(*) FROM items WHERE state = 'succeeded'")
        .await?;
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
pub(super) async fn coordinator_killed(mut s: Stage<'_>, settle: Duration) -> anyhow::Result<Row> {
    s.grant(1_000_000).await?;
    s.fleet(0, 2, 1, &[])?;
    let load = s.load(plans(s.name, 6, 5, 8..30, 5), 100);
    let small_window = env(&[("HOLDFAST_CONFIRM_WINDOW", "2")]);
    s.crash_at("coordinator", "coordinator.after_reserve", 2, &small_window)
        .await?;
    s.crash_at("coordinator", "coordinator.mid_dispatch", 2, &small_window)
        .await?;
    let stranded = s
        .scalar("SELECT count(*) FROM batches WHERE state = 'granted'")
        .await?;
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
pub(super) async fn reconciler_killed(mut s: Stage<'_>, settle: Duration) -> anyhow::Result<Row> {
    s.grant(1_000_000).await?;
    s.fleet(1, 2, 0, &[])?;
    let stranded = strand(&s, 12).await?;
    let load = s.load(plans(s.name, 4, 4, 3..12, 5), 150);
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
pub(super) async fn two_reconcilers(mut s: Stage<'_>, settle: Duration) -> anyhow::Result<Row> {
    s.grant(1_000_000).await?;
    s.fleet(1, 2, 0, &[])?;
    let stranded = strand(&s, 30).await?;
    for _ in 0..20 {
        s.ledger
            .reserve_soft(ACCOUNT, 7, Duration::from_secs(1))
            .await?;
    }
    s.fleet(0, 0, 2, &[])?;
    let load = s.load(plans(s.name, 4, 4, 3..12, 5), 150);
    let mut sent = load.finish().await?;
    sent.confirmed.extend(stranded);
    s.settle(&sent, Instant::now(), settle).await;
    let twice = s.scalar("SELECT count(*) FROM (SELECT 1 FROM journal WHERE kind IN ('settle', 'release', 'expire')
         GROUP BY hold_id, kind HAVING count(*) > 1) d",
    )
    .await?;
    s.expect(
        twice == 0,
        format!("{twice} hold(s) resolved more than once"),
    );
    let expired = s
        .scalar("SELECT count(*) FROM holds WHERE state = 'expired'")
        .await?;
    s.expect(expired == 20, format!("{expired} of 20 soft holds expired"));
    s.finish(sent).await
}
