//! Reservation decisions in the ledger alone, without the broker: the same
//! entry point the coordinator uses (`Ledger::reserve_many`), as many
//! clients as it has consumers, as many requests per transaction as its
//! prefetch.

use std::time::{Duration, Instant};

use holdfast_common::config::Connections;
use holdfast_common::database;
use holdfast_common::ledger::{Ledger, ReserveInput};
use holdfast_common::messages::BatchRequest;

use crate::requests::request;

/// Reservation decisions in the ledger alone: `clients` tasks (as many as
/// the coordinator has consumers) each decide groups of `group` 10-item
/// requests per transaction (the coordinator's prefetch), `n` in all, with
/// the same entry point the coordinator uses. `accounts` spreads them.
async fn decide(
    ledger: &Ledger,
    prefix: &str,
    accounts: &[String],
    n: usize,
    clients: usize,
    group: usize,
) -> anyhow::Result<f64> {
    let requests: Vec<BatchRequest> = (0..n)
        .map(|i| {
            let body = request(
                &format!("{prefix}{i}"),
                &accounts[i % accounts.len()],
                10,
                1,
            );
            serde_json::from_slice(&body).expect("a valid request")
        })
        .collect();
    let requests = std::sync::Arc::new(requests);
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients.max(1) {
        let (ledger, requests, next) = (ledger.clone(), requests.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let from = next.fetch_add(group, std::sync::atomic::Ordering::Relaxed);
                if from >= requests.len() {
                    return anyhow::Ok(());
                }
                let to = (from + group).min(requests.len());
                let inputs: Vec<ReserveInput> = requests[from..to]
                    .iter()
                    .map(|request| ReserveInput {
                        request,
                        reply_to: None,
                        correlation_id: None,
                        execution_timeout: Duration::from_secs(3600),
                        dispatch_grace: Duration::from_secs(3600),
                        chunk_size: 10,
                    })
                    .collect();
                for r in ledger.reserve_many(&inputs).await {
                    anyhow::ensure!(r.is_ok_and(|r| !r.replayed), "a bench decision failed");
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// [`decide`] on one hot account, then over 100 accounts, in a
/// database of their own (`<bench database>_ledger`, removed afterwards): the
/// batches they grant are never dispatched, and must not reach the fleet.
pub(crate) async fn rates(
    conn: &Connections,
    n: usize,
    clients: usize,
    group: usize,
) -> anyhow::Result<(f64, f64)> {
    let url = format!("{}_ledger", conn.database_url);
    database::drop_database(&url).await?;
    database::migrate(&url).await?;
    let ledger = Ledger::new(database::pool(&url, clients)?);
    let hot = vec!["hot".to_string()];
    let many: Vec<String> = (0..100).map(|a| format!("acct-{a}")).collect();
    for a in hot.iter().chain(&many) {
        ledger.grant(a, 1_000_000_000, Some("bench"), true).await?;
    }
    let rates = (
        decide(&ledger, "lh-", &hot, n, clients, group).await?,
        decide(&ledger, "lm-", &many, n, clients, group).await?,
    );
    let drift = ledger.audit().await?;
    anyhow::ensure!(drift.is_empty(), "ledger bench: audit drift {drift:?}");
    drop(ledger);
    database::drop_database(&url).await?;
    Ok(rates)
}
