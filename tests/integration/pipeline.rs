//! The core pipeline end to end on real PostgreSQL and RabbitMQ: one hold per
//! batch, jobs only when granted, actual cost captured, remainder released.

use crate::support;

use holdfast_common::messages::{Event, Mode};
use serde_json::json;
use support::*;

#[tokio::test]
async fn granted_batch_captures_every_item_once_and_closes_its_hold() {
    let mut t = TestFleet::start().await;
    t.grant("acme", 500).await;
    let d = t.submit(&request("b1", "acme", 10, 12)).await;
    let g = granted(&d);
    assert_eq!(
        (g.reserved, g.item_ids.len(), g.left_out.len()),
        (120, 10, 0)
    );

    let Event::Completed { state, figures, .. } = t.completed("b1").await else {
        unreachable!()
    };
    assert_eq!(state, "completed");
    assert_eq!(
        (figures.succeeded, figures.failed, figures.pending),
        (10, 0, 0)
    );
    assert_eq!(
        (figures.reserved, figures.captured, figures.released),
        (120, 120, 0)
    );

    let b = t.wait_closed("b1").await;
    assert_eq!(b.hold_state.map(|s| s.as_str()), Some("closed"));
    assert!(b
        .items
        .iter()
        .all(|i| i.state == "succeeded" && i.captured == 12));
    let a = t.ledger.account("acme").await.unwrap();
    assert_eq!(
        (a.balance, a.held, a.available, a.open_holds),
        (380, 0, 380, 0)
    );
    let journal = t.ledger.journal("acme").await.unwrap();
    let kinds = |k: &str| journal.iter().filter(|e| e.kind == k).count();
    assert_eq!(
        (
            kinds("grant"),
            kinds("hold"),
            kinds("capture"),
            kinds("settle"),
            kinds("release")
        ),
        // Everything was captured: nothing to release.
        (1, 1, 10, 1, 0)
    );
    t.assert_exact().await;
    t.stop().await;
}

#[tokio::test]
async fn insufficient_holds_nothing_and_first_fit_then_runs_exactly_k_items() {
    let mut t = TestFleet::start().await;
    t.grant("acme", 100).await;
    let mut req = request("short", "acme", 10, 12);
    // Priorities make the priority subset differ from the first-fit prefix.
    for (i, item) in req["items"].as_array_mut().unwrap().iter_mut().enumerate() {
        item["priority"] = json!(i as i64);
    }
    let d = t.submit(&req).await;
    let s = insufficient(&d);
    assert_eq!((s.total_cost, s.available, s.shortfall), (120, 100, 20));
    assert_eq!((s.items_total, s.fit_count), (10, 8));
    assert_eq!(
        s.first_fit.item_ids,
        (0..8).map(|i| format!("i{i}")).collect::<Vec<_>>()
    );
    assert_eq!(
        s.priority_fit.item_ids,
        (2..10).map(|i| format!("i{i}")).collect::<Vec<_>>()
    );
    assert_eq!(
        s.message,
        "You have enough credits to generate 8 out of 10 items."
    );
    assert_eq!(
        s.options
            .iter()
            .map(|o| o.action.as_str())
            .collect::<Vec<_>>(),
        ["generate_first_fit", "select_items", "add_credits"]
    );
    // Nothing held, nothing dispatched, nothing stored to run.
    let a = t.ledger.account("acme").await.unwrap();
    assert_eq!((a.held, a.available, a.open_holds), (0, 100, 0));
    let b = t.ledger.batch("short").await.unwrap().unwrap();
    assert_eq!((b.state.as_str(), b.items.len()), ("denied", 0));

    // The person takes the choice: a new batch id, mode first_fit.
    let mut choice = req.clone();
    choice["batch_id"] = json!("short-first-fit");
    choice["mode"] = json!("first_fit");
    let d = t.submit(&choice).await;
    let g = granted(&d);
    assert_eq!(g.mode, Mode::FirstFit);
    assert_eq!((g.reserved, g.item_ids.len()), (96, 8));
    assert_eq!(
        g.left_out
            .iter()
            .map(|l| (l.item_id.as_str(), l.reason.as_str()))
            .collect::<Vec<_>>(),
        [("i8", "did_not_fit"), ("i9", "did_not_fit")]
    );
    let b = t.wait_closed("short-first-fit").await;
    let ran: Vec<_> = b
        .items
        .iter()
        .filter(|i| i.state == "succeeded")
        .map(|i| i.item_id.clone())
        .collect();
    assert_eq!(ran, g.item_ids);
    assert_eq!(b.items.iter().filter(|i| i.state == "skipped").count(), 2);
    assert_eq!(t.ledger.account("acme").await.unwrap().balance, 4);
    t.assert_exact().await;
    t.stop().await;
}

#[tokio::test]
async fn priority_fit_and_selected_run_exactly_their_items() {
    let mut t = TestFleet::start().await;
    t.grant("acme", 30).await;
    let req = json!({"batch_id": "prio", "account_id": "acme", "mode": "priority_fit", "items": [
        {"item_id": "low", "estimated_cost": 10, "priority": 1},
        {"item_id": "high", "estimated_cost": 10, "priority": 9},
        {"item_id": "mid", "estimated_cost": 10, "priority": 5},
        {"item_id": "lowest", "estimated_cost": 10}]});
    let d = t.submit(&req).await;
    assert_eq!(granted(&d).item_ids, ["low", "high", "mid"]);
    let b = t.wait_closed("prio").await;
    let states: Vec<_> = b
        .items
        .iter()
        .map(|i| (i.item_id.as_str(), i.state.as_str()))
        .collect();
    assert_eq!(
        states,
        [
            ("low", "succeeded"),
            ("high", "succeeded"),
            ("mid", "succeeded"),
            ("lowest", "skipped")
        ]
    );

    t.grant("acme", 100).await;
    let req = json!({"batch_id": "pick", "account_id": "acme", "mode": "selected", "item_ids": ["c", "a"], "items": [
        {"item_id": "a", "estimated_cost": 7}, {"item_id": "b", "estimated_cost": 50}, {"item_id": "c", "estimated_cost": 3}]});
    let d = t.submit(&req).await;
    let g = granted(&d);
    assert_eq!(
        (g.reserved, g.item_ids.clone()),
        (10, vec!["a".to_string(), "c".to_string()])
    );
    assert_eq!(g.left_out[0].reason, "not_selected");
    let b = t.wait_closed("pick").await;
    assert_eq!(b.figures.captured, 10);
    assert_eq!(
        b.items.iter().find(|i| i.item_id == "b").unwrap().state,
        "skipped"
    );
    assert_eq!(t.ledger.account("acme").await.unwrap().balance, 90);
    t.assert_exact().await;
    t.stop().await;
}

#[tokio::test]
async fn the_same_request_twice_makes_one_batch_and_a_changed_body_is_a_conflict() {
    let mut t = TestFleet::start().await;
    t.grant("acme", 100).await;
    let req = request("once", "acme", 3, 10);
    let first = t.submit(&req).await;
    t.wait_closed("once").await;
    let again = t.submit(&req).await;
    assert_eq!(first, again, "a redelivered request replays its decision");
    let mut changed = req.clone();
    changed["items"][0]["estimated_cost"] = json!(11);
    let r = t.submit(&changed).await;
    assert_eq!(rejected(&r).errors[0].field, "batch_id");
    let a = t.ledger.account("acme").await.unwrap();
    assert_eq!((a.balance, a.held), (70, 0), "charged once");
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
async fn a_denied_batch_stays_denied_after_credits_arrive() {
    let mut t = TestFleet::start().await;
    t.grant("acme", 10).await;
    let req = request("denied", "acme", 2, 10);
    let d = t.submit(&req).await;
    insufficient(&d);
    t.grant("acme", 100).await;
    let again = t.submit(&req).await;
    assert_eq!(d, again, "same id, same decision");
    let mut fresh = req.clone();
    fresh["batch_id"] = json!("denied-retry");
    granted(&t.submit(&fresh).await);
    t.wait_closed("denied-retry").await;
    t.assert_exact().await;
    t.stop().await;
}
