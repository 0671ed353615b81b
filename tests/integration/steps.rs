//! The roles driven one step at a time: `holdfast_worker::process_one` takes
//! one delivery of the jobs queue through the whole worker path, and the
//! reconciler's `sweep_once` does one sweep; no waiting for background tasks.

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use holdfast::fleet::Roles;
use holdfast_common::topology::Publisher;
use holdfast_worker::config::WorkerConfig;
use holdfast_worker::{process_one, JobOutcome};
use serde_json::json;
use support::*;

fn worker_config(t: &TestFleet) -> WorkerConfig {
    WorkerConfig {
        amqp_url: t.conn.amqp_url.clone(),
        names: t.names.clone(),
        queues: t.settings.queues.clone(),
        settings: t.settings.worker.clone(),
    }
}

#[tokio::test]
async fn process_one_runs_captures_and_acks_a_job_and_sees_a_duplicate() {
    let mut t = TestFleet::start_with(fast_settings(), Roles::COORDINATOR, None).await;
    t.grant("acme", 100).await;
    granted(&t.submit(&request("steps", "acme", 2, 10)).await);
    let amqp = lapin::Connection::connect(&t.conn.amqp_url, Default::default())
        .await
        .unwrap();
    let channel = amqp.create_channel().await.unwrap();
    let publisher = Publisher::new(&amqp).await.unwrap();
    let generator: Arc<dyn holdfast_worker::Generator> =
        holdfast_worker::build_generator(&t.settings.generator).unwrap();
    let config = worker_config(&t);

    let first = t.next_job(&channel).await;
    let copy = first.data.clone();
    let outcome = process_one(&t.ledger, generator.clone(), &publisher, &config, first)
        .await
        .unwrap();
    assert_eq!(
        outcome,
        JobOutcome::Captured {
            captured: 10,
            overrun: 0
        }
    );
    assert_eq!(
        t.ledger.batch("steps").await.unwrap().unwrap().state,
        "dispatched"
    );

    let second = t.next_job(&channel).await;
    let outcome = process_one(&t.ledger, generator.clone(), &publisher, &config, second)
        .await
        .unwrap();
    assert!(matches!(outcome, JobOutcome::Captured { captured: 10, .. }));
    // The last capture closed the batch, in this very step.
    let b = t.ledger.batch("steps").await.unwrap().unwrap();
    assert_eq!((b.state.as_str(), b.figures.released), ("completed", 0));

    // The first job delivered again: acknowledged, not run, not charged.
    publisher
        .publish_confirmed("", &t.names.jobs(), &copy, Default::default())
        .await
        .unwrap();
    let again = t.next_job(&channel).await;
    let outcome = process_one(&t.ledger, generator.clone(), &publisher, &config, again)
        .await
        .unwrap();
    assert_eq!(outcome, JobOutcome::Duplicate);

    // Not a job at all: parked with the reason.
    publisher
        .publish_confirmed("", &t.names.jobs(), b"{", Default::default())
        .await
        .unwrap();
    let garbage = t.next_job(&channel).await;
    let outcome = process_one(&t.ledger, generator, &publisher, &config, garbage)
        .await
        .unwrap();
    assert!(
        matches!(&outcome, JobOutcome::Parked { reason } if reason.starts_with("not an item job")),
        "{outcome:?}"
    );
    assert_eq!(t.available("acme").await, 80);
    t.assert_exact().await;
    holdfast_common::topology::close(&amqp, "done").await;
    t.stop().await;
}

#[tokio::test]
async fn one_sweep_expires_a_soft_hold_past_its_ttl_and_closes_an_overdue_batch() {
    let t = TestFleet::start_with(fast_settings(), Roles::default(), None).await;
    t.grant("acme", 100).await;
    t.ledger
        .reserve_soft("acme", 30, Duration::from_millis(1))
        .await
        .unwrap();
    let req: holdfast_common::messages::BatchRequest =
        serde_json::from_value(json!({"batch_id": "late", "account_id": "acme",
            "items": [{"item_id": "a", "estimated_cost": 20}]}))
        .unwrap();
    t.ledger
        .reserve(&reserve_input(
            &req,
            Duration::from_millis(1),
            Duration::from_secs(600),
        ))
        .await
        .unwrap();
    assert_eq!(t.available("acme").await, 50);
    tokio::time::sleep(Duration::from_millis(20)).await;

    let (amqp, mut reconciler) = t.reconciler().await;
    let report = reconciler.sweep_once().await.unwrap();
    assert_eq!((report.expired_holds, report.expired), (1, 1), "{report:?}");
    assert_eq!(report.drift, Some(0));
    assert_eq!(t.available("acme").await, 100);
    let b = t.ledger.batch("late").await.unwrap().unwrap();
    assert_eq!((b.state.as_str(), b.figures.failed), ("expired", 1));
    // Nothing left for the next sweep.
    let report = reconciler.sweep_once().await.unwrap();
    assert_eq!((report.expired_holds, report.expired), (0, 0));
    holdfast_common::topology::close(&amqp, "done").await;
    t.stop().await;
}
