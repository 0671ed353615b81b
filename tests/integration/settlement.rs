//! Capturing the actual cost: failures are free, savings are released,
//! overruns are capped and recorded, silence charges the reservation, and
//! duplicates never charge twice.

use crate::support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use axum::extract::Json;
use axum::http::StatusCode;
use axum::routing::post;
use holdfast::fleet::Roles;
use holdfast_common::ledger::{ItemOutcome, ItemState, Settled, Settlement};
use holdfast_common::messages::BatchRequest;
use serde_json::{json, Value};
use support::*;

fn item(id: &str, cost: i64, simulate: Value) -> Value {
    json!({"item_id": id, "estimated_cost": cost, "payload": {"simulate": simulate}})
}

#[tokio::test]
async fn failures_savings_overruns_and_silence_are_each_charged_right() {
    let mut t = TestFleet::start().await;
    t.grant("acme", 1000).await;
    let req = json!({"batch_id": "mixed", "account_id": "acme", "items": [
        item("exact", 10, json!({})),
        item("cheaper", 10, json!({"actual_cost": 4})),
        item("dearer", 10, json!({"actual_cost": 25})),
        item("silent", 10, json!({"report_cost": false})),
        item("broken", 10, json!({"fail": true})),
        item("flaky", 10, json!({"transient_failures": 2, "actual_cost": 6})),
        item("free", 10, json!({"actual_cost": 0})),
    ]});
    granted(&t.submit(&req).await);
    let b = t.wait_closed("mixed").await;
    let got: Vec<_> = b
        .items
        .iter()
        .map(|i| (i.item_id.as_str(), i.state.as_str(), i.captured, i.overrun))
        .collect();
    assert_eq!(
        got,
        [
            ("exact", "succeeded", 10, 0),
            ("cheaper", "succeeded", 4, 0),
            ("dearer", "succeeded", 10, 15),
            ("silent", "succeeded", 10, 0),
            ("broken", "failed", 0, 0),
            ("flaky", "succeeded", 6, 0),
            ("free", "succeeded", 0, 0),
        ]
    );
    assert_eq!(
        (
            b.figures.reserved,
            b.figures.captured,
            b.figures.released,
            b.figures.overrun
        ),
        (70, 40, 30, 15)
    );
    let a = t.ledger.account("acme").await.unwrap();
    assert_eq!((a.balance, a.held), (960, 0));
    let overruns: Vec<_> = t
        .ledger
        .journal("acme")
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "overrun")
        .collect();
    assert_eq!(overruns.len(), 1);
    assert_eq!(
        (
            overruns[0].amount,
            overruns[0].balance_delta,
            overruns[0].item_id.as_deref()
        ),
        (15, 0, Some("dearer"))
    );
    t.assert_exact().await;
    t.stop().await;
}

#[tokio::test]
async fn the_same_job_delivered_twice_is_captured_once() {
    // Coordinator only: the jobs wait in the queue.
    let mut t = TestFleet::start_with(fast_settings(), Roles::COORDINATOR, None).await;
    t.grant("acme", 100).await;
    granted(&t.submit(&request("dup", "acme", 4, 5)).await);
    // Take the four jobs and put each back three times.
    t.requeue_jobs(4, 3).await;
    t.start_roles(
        Roles {
            worker: true,
            reconciler: true,
            ..Default::default()
        },
        None,
    )
    .await;
    let b = t.wait_closed("dup").await;
    assert_eq!((b.figures.succeeded, b.figures.captured), (4, 20));
    let captures = t
        .ledger
        .journal("acme")
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "capture")
        .count();
    assert_eq!(captures, 4);
    assert_eq!(t.ledger.account("acme").await.unwrap().balance, 80);
    t.assert_exact().await;
    t.stop().await;
}

#[tokio::test]
async fn settle_reports_duplicates_and_unknown_items_without_charging() {
    let t = TestFleet::start_with(fast_settings(), Roles::default(), None).await;
    t.grant("acme", 100).await;
    let req: BatchRequest = serde_json::from_value(request("direct", "acme", 2, 10)).unwrap();
    let minute = std::time::Duration::from_secs(60);
    let input = reserve_input(&req, minute, minute);
    t.ledger.reserve(&input).await.unwrap();
    let s = |item: &str, cost| Settlement {
        batch_id: "direct".into(),
        item_id: item.into(),
        outcome: ItemOutcome::Succeeded {
            actual_cost: Some(cost),
        },
    };
    let report = t
        .ledger
        .settle(&[s("i0", 7), s("i0", 9), s("nope", 1)])
        .await
        .unwrap();
    assert_eq!(
        report.results,
        [
            Settled::Captured {
                captured: 7,
                overrun: 0
            },
            Settled::AlreadySettled {
                state: ItemState::Succeeded,
                captured: 7
            },
            Settled::Unknown
        ]
    );
    assert!(report.closed.is_empty());
    let report = t.ledger.settle(&[s("i0", 10), s("i1", 12)]).await.unwrap();
    assert_eq!(
        report.results,
        [
            Settled::AlreadySettled {
                state: ItemState::Succeeded,
                captured: 7
            },
            Settled::Captured {
                captured: 10,
                overrun: 2
            }
        ]
    );
    assert_eq!(report.closed.len(), 1, "the last item closes the batch");
    assert_eq!(
        (
            report.closed[0].figures.captured,
            report.closed[0].figures.released
        ),
        (17, 3)
    );
    assert_eq!(t.ledger.account("acme").await.unwrap().balance, 83);
    t.assert_exact().await;
}

#[tokio::test]
async fn http_generator_retries_5xx_fails_4xx_and_reads_the_cost() {
    let flaky = Arc::new(AtomicU32::new(0));
    let counter = flaky.clone();
    let app = axum::Router::new().route(
        "/generate",
        post(move |Json(job): Json<Value>| {
            let counter = counter.clone();
            async move {
                match job["item_id"].as_str().unwrap_or("") {
                    "flaky" if counter.fetch_add(1, Ordering::SeqCst) < 2 => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        Json(json!({"error": "busy"})),
                    ),
                    "flaky" => (StatusCode::OK, Json(json!({"actual_cost": 5}))),
                    "refused" => (
                        StatusCode::UNPROCESSABLE_ENTITY,
                        Json(json!({"error": "bad prompt"})),
                    ),
                    "nocost" => (
                        StatusCode::OK,
                        Json(json!({"url": "https://example.invalid/x.png"})),
                    ),
                    _ => (StatusCode::OK, Json(json!({"actual_cost": 3}))),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/generate", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let generator: Arc<dyn holdfast_worker::Generator> =
        Arc::new(holdfast_worker::http::Http::new(url, std::time::Duration::from_secs(5)).unwrap());
    let mut t = TestFleet::start_with(fast_settings(), Roles::NO_API, Some(generator)).await;
    t.grant("acme", 100).await;
    let req = json!({"batch_id": "web", "account_id": "acme", "items": [
        {"item_id": "ok", "estimated_cost": 10}, {"item_id": "flaky", "estimated_cost": 10},
        {"item_id": "refused", "estimated_cost": 10}, {"item_id": "nocost", "estimated_cost": 10}]});
    granted(&t.submit(&req).await);
    let b = t.wait_closed("web").await;
    let got: Vec<_> = b
        .items
        .iter()
        .map(|i| (i.item_id.as_str(), i.state.as_str(), i.captured))
        .collect();
    assert_eq!(
        got,
        [
            ("ok", "succeeded", 3),
            ("flaky", "succeeded", 5),
            ("refused", "failed", 0),
            ("nocost", "succeeded", 10)
        ]
    );
    assert_eq!(flaky.load(Ordering::SeqCst), 3, "two 503s, then success");
    assert!(b.items[2].reason.as_deref().unwrap().contains("422"));
    t.assert_exact().await;
    t.stop().await;
    server.abort();
}

#[tokio::test]
async fn a_poison_job_is_dead_lettered_and_its_item_failed_uncharged() {
    let mut settings = fast_settings();
    settings.queues.job_delivery_limit = 2;
    let mut t = TestFleet::start_with(settings, Roles::NO_API, None).await;
    t.grant("acme", 100).await;
    let req = json!({"batch_id": "poison", "account_id": "acme", "items": [
        item("fine", 10, json!({})), item("crash", 10, json!({"panic": true})), item("fine2", 10, json!({}))]});
    granted(&t.submit(&req).await);
    let b = t.wait_closed("poison").await;
    let crash = b.items.iter().find(|i| i.item_id == "crash").unwrap();
    assert_eq!((crash.state.as_str(), crash.captured), ("failed", 0));
    assert!(
        crash.reason.as_deref().unwrap().contains("crashed 3 times"),
        "{:?}",
        crash.reason
    );
    assert_eq!((b.figures.captured, b.figures.released), (20, 10));
    let dead = t.dead_letters("jobs").await;
    assert_eq!(dead.len(), 1);
    assert!(dead[0].1.contains("generator crashed"));
    let job: Value = serde_json::from_slice(&dead[0].0).unwrap();
    assert_eq!(job["item_id"], "crash");
    t.assert_exact().await;
    t.stop().await;
}
