//! Decisions a person can act on: soft holds with a TTL, the start-vs-expiry
//! race, sequential mode, cancel, preview parity, and exactly one completed
//! event per batch.

use crate::support;

use std::time::Duration;

use futures::StreamExt;
use holdfast::fleet::Roles;
use holdfast_common::ledger::LedgerError;
use holdfast_common::messages::{BatchRequest, Decision, Event};
use holdfast_common::pricing;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::json;
use support::*;

fn with_reservation(mut req: serde_json::Value, id: &str) -> serde_json::Value {
    req["reservation_id"] = json!(id);
    req
}

#[tokio::test]
async fn a_soft_hold_keeps_its_credits_and_starts_its_batch_without_a_second_check() {
    let mut t = TestFleet::start().await;
    t.grant("acme", 100).await;
    let hold = t
        .ledger
        .reserve_soft("acme", 60, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!((hold.state.as_str(), hold.amount), ("open", 60));
    assert_eq!(t.available("acme").await, 40);
    // Another batch wanting more than what is left is refused: the hold keeps its credits.
    let other = t.submit(&request("other", "acme", 5, 10)).await;
    assert_eq!(insufficient(&other).available, 40);
    // A different total is a clear error naming the reservation.
    let wrong = t
        .submit(&with_reservation(
            request("wrong", "acme", 5, 11),
            &hold.reservation_id,
        ))
        .await;
    let r = rejected(&wrong);
    assert_eq!(r.errors[0].field, "reservation_id");
    assert!(
        r.errors[0]
            .reason
            .contains("costs 55 credits but reservation"),
        "{}",
        r.reason
    );
    // The matching batch starts from the hold.
    let d = t
        .submit(&with_reservation(
            request("held", "acme", 6, 10),
            &hold.reservation_id,
        ))
        .await;
    assert_eq!(granted(&d).hold_id, hold.reservation_id);
    let b = t.wait_closed("held").await;
    assert_eq!((b.figures.reserved, b.figures.captured), (60, 60));
    // A hold serves one batch only.
    let again = t
        .submit(&with_reservation(
            request("again", "acme", 6, 10),
            &hold.reservation_id,
        ))
        .await;
    assert!(
        rejected(&again)
            .reason
            .contains("is already used by a batch")
            || rejected(&again).reason.contains("is closed")
    );
    let a = t.ledger.account("acme").await.unwrap();
    assert_eq!((a.balance, a.held), (40, 0));
    assert_eq!(
        t.ledger
            .journal("acme")
            .await
            .unwrap()
            .iter()
            .filter(|e| e.kind == "hold")
            .count(),
        1
    );
    t.assert_exact().await;
    t.stop().await;
}

#[tokio::test]
async fn an_expired_hold_releases_once_and_refuses_its_batch_with_the_reason() {
    let mut t = TestFleet::start().await;
    t.grant("acme", 100).await;
    let hold = t
        .ledger
        .reserve_soft("acme", 30, Duration::from_millis(400))
        .await
        .unwrap();
    // Never early: a sweep before the deadline leaves it alone.
    assert_eq!(t.ledger.expire_soft_holds(100).await.unwrap(), 0);
    assert_eq!(
        t.ledger
            .reservation(&hold.reservation_id)
            .await
            .unwrap()
            .state,
        "open"
    );
    // The fleet's reconciler sweeps every 200 ms: expired within a sweep of the deadline.
    eventually("the soft hold expires", || async {
        let r = t.ledger.reservation(&hold.reservation_id).await.unwrap();
        (r.state == "expired").then_some(())
    })
    .await;
    assert_eq!(
        t.ledger.expire_soft_holds(100).await.unwrap(),
        0,
        "expires once"
    );
    assert_eq!(t.available("acme").await, 100);
    let d = t
        .submit(&with_reservation(
            request("late", "acme", 3, 10),
            &hold.reservation_id,
        ))
        .await;
    let r = rejected(&d);
    assert_eq!(r.errors[0].field, "reservation_id");
    assert!(
        r.errors[0].reason.contains("expired at")
            && r.errors[0].reason.contains("credits were released"),
        "{}",
        r.reason
    );
    let expires = t
        .ledger
        .journal("acme")
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "expire")
        .count();
    assert_eq!(expires, 1);
    t.assert_exact().await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_a_start_races_an_expiry_exactly_one_wins() {
    const HOLDS: usize = 40;
    const TTL: Duration = Duration::from_millis(1_000);
    let t = TestFleet::start_with(fast_settings(), Roles::default(), None).await;
    t.grant("acme", 10_000).await;
    // An expirer sweeping without pause, as several reconcilers would.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let expirer = {
        let (ledger, stop) = (t.ledger.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                ledger.expire_soft_holds(100).await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let mut tasks = Vec::new();
    for i in 0..HOLDS {
        let ledger = t.ledger.clone();
        tasks.push(tokio::spawn(async move {
            let hold = ledger.reserve_soft("acme", 10, TTL).await.unwrap();
            let id = hold.reservation_id;
            // Aim at the deadline PostgreSQL stored (same machine, same clock),
            // from 300 ms before it to 100 ms after, 10 ms apart.
            let deadline: chrono::DateTime<chrono::Utc> = hold.expires_at.unwrap().parse().unwrap();
            let target = deadline + chrono::Duration::milliseconds((i as i64 % 40) * 10 - 300);
            if let Ok(wait) = (target - chrono::Utc::now()).to_std() {
                tokio::time::sleep(wait).await;
            }
            let req: BatchRequest = serde_json::from_value(with_reservation(
                request(&format!("race-{i}"), "acme", 1, 10),
                &id,
            ))
            .unwrap();
            let input = reserve_input(&req, Duration::from_secs(60), Duration::from_secs(60));
            let started = match ledger.reserve(&input).await {
                Ok(r) => matches!(r.decision, Decision::Granted(_)),
                Err(LedgerError::Reservation(why)) => {
                    assert!(why.contains("expired"), "{why}");
                    false
                }
                Err(e) => panic!("unexpected: {e}"),
            };
            (id, started)
        }));
    }
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.unwrap());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    expirer.await.unwrap();
    let (mut started, mut expired) = (0, 0);
    for (i, (id, won)) in outcomes.iter().enumerate() {
        let r = t.ledger.reservation(id).await.unwrap();
        let batch = t.ledger.batch(&format!("race-{i}")).await.unwrap();
        match (r.state.as_str(), batch, won) {
            ("expired", None, false) => expired += 1,
            ("open", Some(b), true) => {
                assert_eq!(r.batch_id.as_deref(), Some(b.batch_id.as_str()));
                started += 1;
            }
            (state, b, won) => panic!(
                "hold {id}: state {state}, batch {b:?}, start won {won}: not exactly one winner"
            ),
        }
    }
    eprintln!("race: {started} started, {expired} expired");
    assert_eq!(started + expired, HOLDS);
    assert!(
        started > 0 && expired > 0,
        "both sides must win sometimes for this to be a race"
    );
    let journal = t.ledger.journal("acme").await.unwrap();
    assert_eq!(
        journal.iter().filter(|e| e.kind == "expire").count(),
        expired,
        "each expiry released once"
    );
    assert_eq!(
        t.ledger.account("acme").await.unwrap().held,
        10 * started as i64
    );
    t.assert_exact().await;
}

#[tokio::test]
async fn sequential_mode_stops_cleanly_when_the_next_chunk_does_not_fit() {
    let mut settings = fast_settings();
    settings.coordinator.sequential_chunk = 3;
    let mut t = TestFleet::start_with(settings, Roles::NO_API, None).await;
    t.grant("acme", 65).await;
    let mut req = request("seq", "acme", 10, 10);
    req["mode"] = json!("sequential");
    let d = t.submit(&req).await;
    let g = granted(&d);
    assert_eq!(
        (g.reserved, g.chunk_size, g.item_ids.len()),
        (30, Some(3), 10)
    );
    let Event::Completed { state, figures, .. } = t.completed("seq").await else {
        unreachable!()
    };
    // 30 reserved, then 30 more (35 available), then 30 > 5: stop after six items.
    assert_eq!(state, "completed");
    assert_eq!(
        (figures.succeeded, figures.skipped, figures.failed),
        (6, 4, 0)
    );
    assert_eq!(
        (figures.reserved, figures.captured, figures.released),
        (60, 60, 0)
    );
    let b = t.ledger.batch("seq").await.unwrap().unwrap();
    let ran: Vec<_> = b
        .items
        .iter()
        .filter(|i| i.state == "succeeded")
        .map(|i| i.item_id.as_str())
        .collect();
    assert_eq!(ran, ["i0", "i1", "i2", "i3", "i4", "i5"]);
    assert!(b.items[6..]
        .iter()
        .all(|i| i.state == "skipped" && i.reason.as_deref() == Some("credits_ran_out")));
    assert_eq!(t.ledger.account("acme").await.unwrap().balance, 5);
    t.assert_exact().await;
    t.stop().await;
}

#[tokio::test]
async fn cancel_mid_batch_finishes_running_items_and_releases_the_rest() {
    let mut settings = fast_settings();
    settings.worker.worker_prefetch = 2;
    let mut t = TestFleet::start_with(settings, Roles::NO_API, None).await;
    t.grant("acme", 100).await;
    let items: Vec<_> = (0..10)
        .map(|i| json!({"item_id": format!("i{i}"), "estimated_cost": 10, "payload": {"simulate": {"latency_ms": 300}}}))
        .collect();
    granted(
        &t.submit(&json!({"batch_id": "stop", "account_id": "acme", "items": items}))
            .await,
    );
    eventually("an item of the batch runs", || async {
        let b = t.ledger.batch("stop").await.unwrap().unwrap();
        (b.figures.succeeded > 0).then_some(())
    })
    .await;
    let c = t.ledger.cancel_batch("stop").await.unwrap();
    assert_eq!(c.state, "cancelling");
    assert_eq!(
        t.ledger.cancel_batch("stop").await.unwrap().state,
        "cancelling",
        "idempotent"
    );
    let Event::Completed {
        state, figures: f, ..
    } = t.completed("stop").await
    else {
        unreachable!()
    };
    assert_eq!(state, "cancelled");
    assert_eq!(f.succeeded + f.cancelled, 10);
    assert!(f.succeeded >= 1 && f.cancelled >= 1, "{f:?}");
    assert_eq!((f.failed, f.pending, f.reserved), (0, 0, 100));
    assert_eq!(f.captured, 10 * f.succeeded);
    assert_eq!(f.released, 100 - f.captured);
    let a = t.ledger.account("acme").await.unwrap();
    assert_eq!((a.balance, a.held), (100 - f.captured, 0));
    assert!(matches!(
        t.ledger.cancel_batch("stop").await,
        Err(LedgerError::WrongState(_))
    ));
    t.assert_exact().await;
    t.stop().await;
}

#[tokio::test]
async fn the_preview_matches_the_decision_for_the_same_input() {
    let mut settings = fast_settings();
    settings.coordinator.sequential_chunk = 4;
    let mut t = TestFleet::start_with(settings, Roles::NO_API, None).await;
    t.grant("acme", 95).await;
    let cases = [
        ("all_or_nothing", 10, 12),
        ("all_or_nothing", 7, 12),
        ("first_fit", 10, 12),
        ("priority_fit", 20, 5),
        ("sequential", 20, 12),
        ("sequential", 9, 30),
    ];
    for (i, (mode, n, cost)) in cases.into_iter().enumerate() {
        let mut req = request(&format!("pv-{i}"), "acme", n, cost);
        req["mode"] = json!(mode);
        let parsed: BatchRequest = serde_json::from_value(req.clone()).unwrap();
        let pots = t.ledger.pots("acme").await.unwrap();
        let preview =
            pricing::preview(&parsed, &pots, &[], 4, std::time::Duration::from_secs(3600));
        let decision = t.submit(&req).await;
        match &decision {
            Decision::Granted(_) => {
                assert!(preview.fits, "case {i}: preview said it would not fit")
            }
            Decision::Insufficient(s) => {
                assert!(!preview.fits, "case {i}: preview said it fits");
                assert_eq!(
                    (s.fit_count, s.total_cost, s.available),
                    (preview.fit_count, preview.total_cost, preview.available)
                );
            }
            Decision::Rejected(r) => panic!("case {i}: {r:?}"),
        }
        if preview.fits {
            t.wait_closed(&format!("pv-{i}")).await;
        }
        assert!(
            preview.message.starts_with("This action will cost ~"),
            "{}",
            preview.message
        );
    }
    t.assert_exact().await;
    t.stop().await;
}

#[tokio::test]
async fn exactly_one_completed_event_per_batch_even_with_duplicate_jobs() {
    let mut t = TestFleet::start_with(fast_settings(), Roles::COORDINATOR, None).await;
    t.grant("acme", 100).await;
    // Listen to every completed event of this namespace.
    let conn = lapin::Connection::connect(&t.conn.amqp_url, Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    ch.queue_bind(
        q.name().clone(),
        t.names.events().into(),
        "batch.completed".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut events = ch
        .basic_consume(
            q.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    granted(&t.submit(&request("once", "acme", 5, 10)).await);
    // Every job three times over.
    t.requeue_jobs(5, 3).await;
    t.start_roles(
        Roles {
            worker: true,
            reconciler: true,
            ..Default::default()
        },
        None,
    )
    .await;
    t.wait_closed("once").await;
    // Let duplicates drain and a few sweeps pass, then count.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let mut completed = 0;
    while let Ok(Some(Ok(d))) =
        tokio::time::timeout(Duration::from_millis(300), events.next()).await
    {
        let e: Event = serde_json::from_slice(&d.data).unwrap();
        if let Event::Completed { batch_id, .. } = e {
            assert_eq!(batch_id, "once");
            completed += 1;
        }
    }
    assert_eq!(completed, 1);
    holdfast_common::topology::close(&conn, "bye").await;
    t.stop().await;
}

#[tokio::test]
async fn a_preview_over_amqp_answers_like_the_decision_and_holds_nothing() {
    let mut t = TestFleet::start().await;
    t.grant("acme", 95).await;
    let ask = json!({"account_id": "acme", "count": 10, "cost": 12});
    let Event::Preview(p) = t
        .producer
        .preview(ask.to_string().as_bytes(), "pv1", WAIT)
        .await
        .unwrap()
    else {
        panic!("expected a preview")
    };
    assert_eq!(
        (p.total_cost, p.available, p.fits, p.fit_count, p.shortfall),
        (120, 95, false, 7, 25)
    );
    assert_eq!(
        p.message,
        "This action will cost ~120 credits. You have 95 credits."
    );
    assert_eq!(
        p.advice.as_deref(),
        Some("You have enough credits to generate 7 out of 10 items.")
    );
    assert_eq!(
        t.ledger.account("acme").await.unwrap().held,
        0,
        "a preview holds nothing"
    );
    let d = t.submit(&request("after-preview", "acme", 10, 12)).await;
    assert_eq!(insufficient(&d).fit_count, p.fit_count);

    let bad = t
        .producer
        .preview(br#"{"account_id":"acme","items":[]}"#, "pv2", WAIT)
        .await
        .unwrap();
    let Event::Decision(Decision::Rejected(r)) = bad else {
        panic!("expected a rejection, got {bad:?}")
    };
    assert_eq!(r.errors[0].field, "items");
    let ghost = t
        .producer
        .preview(br#"{"account_id":"ghost","count":1,"cost":1}"#, "pv3", WAIT)
        .await
        .unwrap();
    let Event::Decision(Decision::Rejected(r)) = ghost else {
        panic!("expected a rejection, got {ghost:?}")
    };
    assert_eq!(r.errors[0].field, "account_id");
    t.stop().await;
}
