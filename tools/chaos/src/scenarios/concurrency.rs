//! 64 producers on one hot account: random batch sizes, costs and modes,
//! credits that run out part-way, soft holds (consumed by a batch, cancelled,
//! or left to expire) and batch cancels mixed in. `available` is sampled all
//! along (never below zero) and the audit must be exact at the end.

use std::time::{Duration, Instant};

use holdfast_common::ledger::{Ledger, LedgerError};
use holdfast_common::messages::Decision;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::task::JoinSet;

use crate::checks::Sent;
use crate::load::{Request, ResilientProducer};
use crate::report::Row;
use crate::stage::Stage;

const PRODUCERS: usize = 64;
const ROUNDS: usize = 3;
const ACCOUNT: &str = "hot";
/// Far less than the producers ask for: the account runs dry part-way.
const CREDITS: i64 = 8_000;

/// What one producer saw.
#[derive(Default)]
struct Tally {
    sent: Sent,
    granted: usize,
    insufficient: usize,
    soft_held: usize,
    soft_refused: usize,
    soft_used: usize,
    soft_cancelled: usize,
    cancelled: usize,
}

fn random_items(rng: &mut StdRng, n: usize, latency_ms: u64) -> Vec<Value> {
    (0..n)
        .map(|i| {
            json!({"item_id": format!("i{i}"), "estimated_cost": rng.random_range(1..=40),
                   "priority": rng.random_range(0..5),
                   "payload": {"simulate": {"latency_ms": latency_ms,
                                            "cost_factor": rng.random_range(0.3..1.5)}}})
        })
        .collect()
}

fn total_cost(items: &[Value]) -> i64 {
    items
        .iter()
        .map(|i| i["estimated_cost"].as_i64().unwrap_or(0))
        .sum()
}

/// Send and wait for the decision; tally it.
async fn submit(
    producer: &mut ResilientProducer,
    tally: &mut Tally,
    request: Request,
) -> anyhow::Result<Option<Decision>> {
    producer.send(&request).await?;
    tally.sent.confirmed.insert(request.batch_id.clone());
    let decision = producer
        .decision(&request.batch_id, Duration::from_secs(60))
        .await;
    match &decision {
        Some(Decision::Granted(_)) => tally.granted += 1,
        Some(Decision::Insufficient(_)) => tally.insufficient += 1,
        Some(Decision::Rejected(_)) => {
            tally.sent.rejected.insert(request.batch_id.clone());
        }
        None => {}
    }
    Ok(decision)
}

async fn producer(
    p: usize,
    ledger: Ledger,
    mut producer: ResilientProducer,
) -> anyhow::Result<Tally> {
    let mut rng = StdRng::seed_from_u64(p as u64);
    let mut tally = Tally::default();
    for round in 0..ROUNDS {
        let id = format!("p{p}-r{round}");
        match rng.random_range(0..10) {
            // A soft hold first, then: a batch consumes it, or it is cancelled, or left to expire.
            0..=2 => {
                let n = rng.random_range(1..=8);
                let items = random_items(&mut rng, n, 5);
                let amount = total_cost(&items);
                match ledger
                    .reserve_soft(ACCOUNT, amount, Duration::from_secs(4))
                    .await
                {
                    Ok(hold) => {
                        tally.soft_held += 1;
                        match rng.random_range(0..4) {
                            0 | 1 => {
                                let body = json!({"batch_id": id, "account_id": ACCOUNT,
                                    "reservation_id": hold.reservation_id, "items": items});
                                if let Some(Decision::Granted(_)) =
                                    submit(&mut producer, &mut tally, Request::from_json(&id, body))
                                        .await?
                                {
                                    tally.soft_used += 1;
                                }
                            }
                            // Cancelling races its expiry: either outcome resolves it once.
                            2 => {
                                let cancelled = ledger.cancel_soft(&hold.reservation_id).await;
                                tally.soft_cancelled += usize::from(cancelled.is_ok());
                            }
                            _ => {}
                        }
                    }
                    Err(LedgerError::Insufficient { .. }) => tally.soft_refused += 1,
                    Err(e) => return Err(e.into()),
                }
            }
            // A slow batch, cancelled while it runs.
            3 => {
                let n = rng.random_range(4..=12);
                let items = random_items(&mut rng, n, 150);
                let request = Request::new(&id, ACCOUNT, "first_fit", items);
                if let Some(Decision::Granted(_)) =
                    submit(&mut producer, &mut tally, request).await?
                {
                    tokio::time::sleep(Duration::from_millis(rng.random_range(0..300))).await;
                    match ledger.cancel_batch(&id).await {
                        Ok(_) => tally.cancelled += 1,
                        // It finished first: nothing left to cancel.
                        Err(LedgerError::WrongState(_)) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            // A plain batch in a random mode.
            _ => {
                let n = rng.random_range(1..=15);
                let latency_ms = rng.random_range(0..20);
                let items = random_items(&mut rng, n, latency_ms);
                let mode = ["all_or_nothing", "first_fit", "priority_fit"][rng.random_range(0..3)];
                submit(
                    &mut producer,
                    &mut tally,
                    Request::new(&id, ACCOUNT, mode, items),
                )
                .await?;
            }
        }
    }
    producer.close().await;
    Ok(tally)
}

pub async fn run(mut s: Stage<'_>, settle: Duration) -> anyhow::Result<Row> {
    s.ledger
        .grant(ACCOUNT, CREDITS, Some("chaos"), true)
        .await?;
    s.fleet(2, 2, 1, &[])?;
    let mut tasks = JoinSet::new();
    for p in 0..PRODUCERS {
        let client = ResilientProducer::new(&s.conn.amqp_url, &s.names, &s.queues);
        tasks.spawn(producer(p, s.ledger.clone(), client));
    }
    let mut all = Tally::default();
    while let Some(joined) = tasks.join_next().await {
        let t = joined??;
        all.sent.confirmed.extend(t.sent.confirmed);
        all.sent.rejected.extend(t.sent.rejected);
        all.granted += t.granted;
        all.insufficient += t.insufficient;
        all.soft_held += t.soft_held;
        all.soft_refused += t.soft_refused;
        all.soft_used += t.soft_used;
        all.soft_cancelled += t.soft_cancelled;
        all.cancelled += t.cancelled;
    }
    let load_done = Instant::now();
    s.settle(&all.sent, load_done, settle).await;
    s.expect(
        all.granted > 0 && all.insufficient > 0,
        format!(
            "credits ran out part-way: {} granted, {} insufficient, {} rejected",
            all.granted,
            all.insufficient,
            all.sent.rejected.len()
        ),
    );
    s.expect(
        all.soft_held > 0 && all.cancelled > 0,
        format!(
            "soft holds: {} taken ({} used by a batch, {} cancelled, the rest expired), {} refused; {} batch(es) cancelled while running",
            all.soft_held, all.soft_used, all.soft_cancelled, all.soft_refused, all.cancelled
        ),
    );
    s.finish(all.sent).await
}
