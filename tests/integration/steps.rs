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

/// A connection of the test's own, a channel to take jobs with, and a publisher.
async fn broker(t: &TestFleet) -> (lapin::Connection, lapin::Channel, Publisher) {
    let amqp = lapin::Connection::connect(&t.conn.amqp_url, Default::default())
        .await
        .unwrap();
    let channel = amqp.create_channel().await.unwrap();
    let publisher = Publisher::new(&amqp).await.unwrap();
    (amqp, channel, publisher)
}

#[tokio::test]
async fn process_one_runs_captures_and_acks_a_job_and_sees_a_duplicate() {
    let mut t = TestFleet::start_with(fast_settings(), Roles::COORDINATOR, None).await;
    t.grant("acme", 100).await;
    granted(&t.submit(&request("steps", "acme", 2, 10)).await);
    let (amqp, channel, publisher) = broker(&t).await;
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

/// Counts the items it generates.
#[derive(Default)]
struct Counting(std::sync::atomic::AtomicUsize);

#[async_trait::async_trait]
impl holdfast_worker::Generator for Counting {
    fn name(&self) -> &str {
        "counting"
    }

    async fn generate(
        &self,
        _job: &holdfast_common::messages::ItemJob,
    ) -> Result<holdfast_worker::Generated, holdfast_worker::GeneratorError> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(Default::default())
    }
}

#[tokio::test]
async fn a_first_delivery_reads_its_batch_and_a_redelivery_or_redispatch_reads_its_item() {
    let mut t = TestFleet::start_with(fast_settings(), Roles::COORDINATOR, None).await;
    t.grant("acme", 100).await;
    granted(&t.submit(&request("firsts", "acme", 3, 10)).await);
    let (amqp, channel, publisher) = broker(&t).await;
    let counting = Arc::new(Counting::default());
    let generator: Arc<dyn holdfast_worker::Generator> = counting.clone();
    let runs = || counting.0.load(std::sync::atomic::Ordering::SeqCst);
    let config = worker_config(&t);
    let process = |d| process_one(&t.ledger, generator.clone(), &publisher, &config, d);
    let again = |body: &[u8]| {
        let body = body.to_vec();
        let publisher = &publisher;
        let queue = t.names.jobs();
        async move {
            publisher
                .publish_confirmed("", &queue, &body, Default::default())
                .await
                .unwrap();
        }
    };
    let (d1, d2, d3) = (
        t.next_job(&channel).await,
        t.next_job(&channel).await,
        t.next_job(&channel).await,
    );
    let first = d1.data.clone();
    let mut job: holdfast_common::messages::ItemJob = serde_json::from_slice(&first).unwrap();
    assert_eq!(job.attempt, 1);
    assert!(matches!(
        process(d1).await.unwrap(),
        JobOutcome::Captured { captured: 10, .. }
    ));
    assert_eq!(runs(), 1);

    // The same first-dispatch job published again and delivered for the
    // first time: the worker reads only the batch (still running), so the
    // generator runs; the capture finds the item settled and charges nothing.
    again(&first).await;
    let copy = t.next_job(&channel).await;
    assert!(!copy.redelivered);
    assert_eq!(process(copy).await.unwrap(), JobOutcome::Duplicate);
    assert_eq!(runs(), 2);

    // A re-dispatched job (attempt 2): the item is read, the generator does not run.
    job.attempt = 2;
    again(&serde_json::to_vec(&job).unwrap()).await;
    let redispatched = t.next_job(&channel).await;
    assert_eq!(process(redispatched).await.unwrap(), JobOutcome::Duplicate);
    assert_eq!(runs(), 2);

    // A job RabbitMQ delivers again (returned unacknowledged): the item is read.
    again(&first).await;
    let returned = t.next_job(&channel).await;
    holdfast_common::topology::requeue(&returned).await.unwrap();
    let redelivered = t.next_job(&channel).await;
    assert!(redelivered.redelivered);
    assert_eq!(process(redelivered).await.unwrap(), JobOutcome::Duplicate);
    assert_eq!(runs(), 2);

    // Cancelled: a first delivery reads the batch's state and settles the
    // item uncharged, without running it.
    t.ledger.cancel_batch("firsts").await.unwrap();
    assert_eq!(process(d2).await.unwrap(), JobOutcome::Cancelled);
    assert_eq!(process(d3).await.unwrap(), JobOutcome::Cancelled);
    assert_eq!(runs(), 2);
    let b = t.ledger.batch("firsts").await.unwrap().unwrap();
    assert_eq!(
        (b.state.as_str(), b.figures.succeeded, b.figures.cancelled),
        ("cancelled", 1, 2)
    );
    assert_eq!(t.available("acme").await, 90);
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
