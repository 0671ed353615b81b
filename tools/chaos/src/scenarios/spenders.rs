//! 64 producers over 8 spenders in 2 teams on one account, with limits that
//! bind at every level (members of 600 and 300, teams of 2,000, an account
//! of 3,000 credits), while a coordinator dies after its reservation commit
//! and workers die after their captures. Every level is sampled all along:
//! none may pass its limit; at the end every hold is resolved, no spender
//! holds anything, the members add up to their teams and the teams to what
//! the account spent, and the audit (which recomputes each spender's usage
//! from the holds) is exact.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use holdfast_common::ledger::SpenderSpec;
use holdfast_common::messages::LimitPeriod;
use serde_json::json;

use crate::load::{items, Request, ACCOUNT};
use crate::report::Row;
use crate::stage::Stage;

const PRODUCERS: usize = 64;
const EACH: usize = 3;
const CREDITS: i64 = 3_000;

fn spec(parent: Option<&str>, kind: &str, limit: i64, period: LimitPeriod) -> SpenderSpec {
    SpenderSpec {
        parent: parent.map(str::to_string),
        kind: Some(kind.into()),
        limit: Some(limit),
        period,
        anchor: None,
    }
}

/// Producer `p` charges member `m<p % 8>`: batches of 2 to 9 items of 4 to
/// 12 credits, 10 ms each.
fn plans() -> Vec<Vec<Request>> {
    (0..PRODUCERS)
        .map(|p| {
            (0..EACH)
                .map(|b| {
                    let id = format!("spenders-p{p}-b{b}");
                    let n = 2 + (p * 7 + b * 5) % 8;
                    let cost = 4 + ((p + 3 * b) % 9) as i64;
                    let mode = ["all_or_nothing", "first_fit", "priority_fit"][(p + b) % 3];
                    Request::from_json(
                        &id,
                        json!({"batch_id": id, "account_id": ACCOUNT, "mode": mode,
                               "items": items(n, cost, 10), "spender_id": format!("m{}", p % 8)}),
                    )
                })
                .collect()
        })
        .collect()
}

pub async fn run(mut s: Stage<'_>, settle: Duration) -> anyhow::Result<Row> {
    s.grant(CREDITS).await?;
    s.ledger
        .put_spender(
            ACCOUNT,
            "t0",
            &spec(None, "team", 2_000, LimitPeriod::Month),
        )
        .await?;
    s.ledger
        .put_spender(ACCOUNT, "t1", &spec(None, "team", 2_000, LimitPeriod::None))
        .await?;
    for m in 0..8 {
        let member = if m < 4 {
            spec(Some("t0"), "member", 600, LimitPeriod::Month)
        } else {
            spec(Some("t1"), "member", 300, LimitPeriod::None)
        };
        s.ledger
            .put_spender(ACCOUNT, &format!("m{m}"), &member)
            .await?;
    }

    // Every level, sampled all along.
    let stop = Arc::new(AtomicBool::new(false));
    let (samples, over) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let sampler = {
        let (ledger, stop, samples, over) = (
            s.ledger.clone(),
            stop.clone(),
            samples.clone(),
            over.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(all) = ledger.spenders(ACCOUNT).await {
                    samples.fetch_add(1, Ordering::Relaxed);
                    let n = all
                        .iter()
                        .filter(|sp| sp.limit.is_some_and(|l| sp.used + sp.held > l))
                        .count();
                    over.fetch_add(n, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // A reconciler only: the first coordinator and the first workers die.
    s.fleet(0, 0, 1, &[])?;
    let load = s.load(plans(), 20);
    s.crash_at("coordinator", "coordinator.after_reserve", 1, &[])
        .await?;
    s.fleet(1, 0, 0, &[])?;
    s.crash_at("worker", "worker.after_capture", 2, &[]).await?;
    s.fleet(0, 2, 0, &[])?;
    let sent = load.finish().await?;
    s.settle(&sent, Instant::now(), settle).await;
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.await;

    let spenders = s.ledger.spenders(ACCOUNT).await?;
    let used = |id: &str| {
        spenders
            .iter()
            .find(|sp| sp.spender_id == id)
            .map_or(0, |sp| sp.used)
    };
    let over = over.load(Ordering::Relaxed);
    s.expect(
        over == 0,
        format!(
            "no level over its limit in {} samples of the 10 levels ({over} over)",
            samples.load(Ordering::Relaxed)
        ),
    );
    let holding: Vec<_> = spenders
        .iter()
        .filter(|sp| sp.held != 0 || sp.used > sp.limit.unwrap_or(i64::MAX))
        .map(|sp| format!("{} used {} held {}", sp.spender_id, sp.used, sp.held))
        .collect();
    s.expect(
        holding.is_empty(),
        format!("every level released and within its limit ({holding:?})"),
    );
    let members = |r: std::ops::Range<usize>| r.map(|m| used(&format!("m{m}"))).sum::<i64>();
    let spent = CREDITS - s.ledger.account(ACCOUNT).await?.balance;
    s.expect(
        used("t0") == members(0..4) && used("t1") == members(4..8),
        format!(
            "the members add up to their teams: t0 {} = {}, t1 {} = {}",
            used("t0"),
            members(0..4),
            used("t1"),
            members(4..8)
        ),
    );
    s.expect(
        used("t0") + used("t1") == spent,
        format!(
            "the teams add up to what the account spent ({} + {} = {spent})",
            used("t0"),
            used("t1")
        ),
    );
    let denied_by_spender = s
        .scalar(
            "SELECT count(*) FROM batches WHERE state = 'denied'
             AND decision -> 'limited_by' ->> 'level' = 'spender'",
        )
        .await?;
    let denied_by_account = s
        .scalar(
            "SELECT count(*) FROM batches WHERE state = 'denied'
             AND decision -> 'limited_by' ->> 'level' = 'account'",
        )
        .await?;
    s.note(format!(
        "denied by a spender: {denied_by_spender}, by the account: {denied_by_account}"
    ));
    s.finish(sent).await
}
