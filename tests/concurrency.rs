//! Many producers racing on one account never overspend, and the journal
//! agrees with the balances afterwards.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use holdfast::producer::Producer;
use holdfast_common::messages::Decision;
use rand::{Rng, SeedableRng};
use serde_json::json;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_producers_on_one_account_never_overspend() {
    const PRODUCERS: usize = 32;
    const BATCHES_EACH: usize = 4;
    const GRANTED: i64 = 3_000;
    let mut settings = fast_settings();
    settings.coordinator.coordinator_consumers = 4;
    let t = TestFleet::start_with(settings, holdfast::fleet::Roles::NO_API, None).await;
    t.grant("hot", GRANTED).await;

    // Sample `available` throughout: it must never go below zero.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (ledger, stop) = (t.ledger.clone(), stop.clone());
        tokio::spawn(async move {
            let mut samples = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let a = ledger.account("hot").await.unwrap();
                assert!(a.available >= 0 && a.held >= 0, "overspent: {a:?}");
                assert!(a.balance <= GRANTED);
                samples += 1;
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            samples
        })
    };

    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let (conn, names, queues) = (t.conn.clone(), t.names.clone(), t.settings.queues.clone());
        producers.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(p as u64);
            let mut producer = Producer::connect(&conn.amqp_url, &names, &queues).await.unwrap();
            let mut decisions = Vec::new();
            for b in 0..BATCHES_EACH {
                let n = rng.random_range(1..=12);
                let items: Vec<_> = (0..n)
                    .map(|i| json!({"item_id": format!("i{i}"), "estimated_cost": rng.random_range(1..=40),
                                    "priority": rng.random_range(0..5),
                                    "payload": {"simulate": {"cost_factor": rng.random_range(0.3..1.5)}}}))
                    .collect();
                let mode = ["all_or_nothing", "first_fit", "priority_fit"][rng.random_range(0..3)];
                let id = format!("p{p}-b{b}");
                let req = json!({"batch_id": id, "account_id": "hot", "mode": mode, "items": items});
                decisions.push(producer.submit(req.to_string().as_bytes(), &id, WAIT).await.unwrap());
            }
            producer.close().await;
            decisions
        }));
    }
    let mut granted_ids = Vec::new();
    let mut denied = 0;
    for p in producers {
        for d in p.await.unwrap() {
            match d {
                Decision::Granted(g) => granted_ids.push(g.batch_id),
                Decision::Insufficient(_) => denied += 1,
                Decision::Rejected(r) => panic!("valid request rejected: {r:?}"),
            }
        }
    }
    for id in &granted_ids {
        t.wait_closed(id).await;
    }
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.await.unwrap();

    let a = t.ledger.account("hot").await.unwrap();
    let mut captured = 0;
    for id in &granted_ids {
        let b = t.ledger.batch(id).await.unwrap().unwrap();
        assert_eq!(
            b.figures.reserved,
            b.figures.captured + b.figures.released,
            "batch {id}"
        );
        assert!(b.items.iter().all(|i| i.captured <= i.reserved));
        captured += b.figures.captured;
    }
    assert_eq!(a.held, 0);
    assert_eq!(
        a.balance,
        GRANTED - captured,
        "balance = granted - captured"
    );
    assert!(captured <= GRANTED);
    assert!(
        !granted_ids.is_empty() && denied > 0,
        "credits ran out mid-way: {} granted, {denied} denied",
        granted_ids.len()
    );
    assert!(samples > 10);
    t.assert_exact().await;
    t.stop().await;
}
