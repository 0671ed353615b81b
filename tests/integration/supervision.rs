//! No panic ends a role: a panic in one sweep, one request or one job is
//! caught, logged, counted in `holdfast_task_panics_total{role,task}`, and
//! the role goes on. Panics are injected with scoped fault points
//! (`panic:NAME@NAMESPACE`), so tests sharing a process do not see them.

use crate::support;

use std::time::Duration;

use holdfast::fleet::{HttpAddr, Roles};
use holdfast_common::faults;
use serde_json::json;
use support::*;

#[tokio::test]
async fn a_reconciler_whose_sweep_panics_once_keeps_expiring_holds() {
    let none = Roles {
        coordinator: false,
        worker: false,
        reconciler: false,
        api: false,
    };
    let mut t = TestFleet::start_with(fast_settings(), none, None).await;
    faults::enable(&format!(
        "panic-once:reconciler.sweep@{}",
        t.names.namespace
    ));
    let before = task_panics("reconciler", "sweep");
    t.grant("acme", 100).await;
    let hold = t
        .ledger
        .reserve_soft("acme", 40, Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(t.available("acme").await, 60);
    t.start_roles(Roles::NO_API, None).await;
    // The first sweep panics; a later one expires the hold.
    eventually("the soft hold expires", || async {
        (t.available("acme").await == 100).then_some(())
    })
    .await;
    let r = t.ledger.reservation(&hold.reservation_id).await.unwrap();
    assert_eq!(r.state, "expired", "{r:?}");
    assert!(
        task_panics("reconciler", "sweep") > before,
        "the panic was counted"
    );
    t.assert_exact().await;
    t.stop().await;
}

#[tokio::test]
async fn a_reconciler_that_stops_sweeping_makes_its_process_not_ready() {
    let mut settings = fast_settings();
    settings.http_addr = HttpAddr(Some("127.0.0.1:0".parse().unwrap()));
    let t = TestFleet::start_with(settings, Roles::ALL, None).await;
    let addr = t.fleets[0].http_addr().unwrap();
    let ready = || async move {
        let r = reqwest::get(format!("http://{addr}/readyz")).await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    let (status, body) = ready().await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("last_sweep_secs"), "{body}");
    // From now on every sweep of this namespace panics.
    faults::enable(&format!("panic:reconciler.sweep@{}", t.names.namespace));
    let body = eventually("/readyz reports the stalled reconciler", || async {
        let (status, body) = ready().await;
        (status == 503).then_some(body)
    })
    .await;
    assert!(body.contains("sweep"), "{body}");
    assert!(
        body.contains("application/problem+json") || body.contains("\"status\":503"),
        "{body}"
    );
    t.stop().await;
}

#[tokio::test]
async fn a_request_that_panics_on_every_delivery_is_parked_and_its_credits_released() {
    let mut settings = fast_settings();
    settings.queues.request_delivery_limit = 2;
    settings.coordinator.execution_timeout_secs = 3;
    let mut t = TestFleet::start_with(settings, Roles::NO_API, None).await;
    // Every publish of this namespace's jobs panics: the coordinator's and
    // the reconciler's alike.
    faults::enable(&format!("panic:dispatch.job@{}", t.names.namespace));
    let before = task_panics("coordinator", "requests");
    t.grant("acme", 100).await;
    let decision = t.submit(&request("poison", "acme", 3, 10)).await;
    assert_eq!(granted(&decision).reserved, 30);
    let b = t.wait_closed("poison").await;
    assert_eq!(b.figures.captured, 0, "{b:#?}");
    assert_eq!(b.figures.released, 30, "{b:#?}");
    assert_eq!(t.available("acme").await, 100);
    let dead = t.dead_letters("requests").await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(
        dead[0].1.contains("panicked on 3 deliveries"),
        "{}",
        dead[0].1
    );
    assert!(task_panics("coordinator", "requests") > before);
    // The coordinator still decides the next request.
    let ok = t.submit(&request("after", "acme", 1, 10)).await;
    granted(&ok);
    t.assert_exact().await;
    t.stop().await;
}

#[tokio::test]
async fn a_panic_while_capturing_returns_the_jobs_and_they_are_captured_once() {
    let mut t = TestFleet::start_with(fast_settings(), Roles::NO_API, None).await;
    faults::enable(&format!("panic-once:worker.settle@{}", t.names.namespace));
    let before = task_panics("worker", "settler");
    t.grant("acme", 100).await;
    granted(
        &t.submit(&json!({"batch_id": "b", "account_id": "acme", "items": [
        {"item_id": "a", "estimated_cost": 10}, {"item_id": "b", "estimated_cost": 10}]}))
            .await,
    );
    let b = t.wait_closed("b").await;
    assert_eq!((b.figures.succeeded, b.figures.captured), (2, 20), "{b:#?}");
    assert!(task_panics("worker", "settler") > before);
    t.assert_exact().await;
    t.stop().await;
}

#[tokio::test]
async fn a_preview_that_panics_is_dropped_and_the_next_one_answered() {
    let mut t = TestFleet::start_with(fast_settings(), Roles::COORDINATOR, None).await;
    faults::enable(&format!("panic-once:previews.answer@{}", t.names.namespace));
    let before = task_panics("coordinator", "previews");
    t.grant("acme", 100).await;
    let body = json!({"account_id": "acme", "count": 3, "cost": 10}).to_string();
    let first = t
        .producer
        .preview(body.as_bytes(), "first", Duration::from_secs(3))
        .await;
    assert!(
        first.is_err(),
        "the panicking preview is not answered: {first:?}"
    );
    let second = t
        .producer
        .preview(body.as_bytes(), "second", WAIT)
        .await
        .expect("the next preview is answered");
    assert!(
        matches!(second, holdfast_common::messages::Event::Preview(_)),
        "{second:?}"
    );
    assert!(task_panics("coordinator", "previews") > before);
    t.stop().await;
}

#[tokio::test]
async fn a_job_whose_handling_panics_comes_back_and_is_captured_once() {
    let mut t = TestFleet::start_with(fast_settings(), Roles::NO_API, None).await;
    faults::enable(&format!("panic-once:worker.job@{}", t.names.namespace));
    let before = task_panics("worker", "jobs");
    t.grant("acme", 100).await;
    granted(&t.submit(&request("j", "acme", 3, 10)).await);
    let b = t.wait_closed("j").await;
    assert_eq!((b.figures.succeeded, b.figures.captured), (3, 30), "{b:#?}");
    assert!(task_panics("worker", "jobs") > before);
    t.assert_exact().await;
    t.stop().await;
}
