//! The chaos harness's checker can fail: on a clean ledger it counts nothing,
//! and each planted violation (a request never decided, a batch left
//! unfinished, a second capture of one item, a capture above its
//! reservation, a negative sample, a hold left open) shows up in its column.

// The product's test fleet, shared rather than copied.
#[path = "../../../tests/integration/support/mod.rs"]
mod support;

use std::time::Duration;

use holdfast_chaos::{count, events_lost, Arrived, Sent};
use holdfast_common::messages::BatchRequest;
use support::*;

#[tokio::test]
async fn the_checker_counts_what_was_planted() {
    let mut t = TestFleet::start().await;
    t.grant("acme", 1_000).await;
    granted(&t.submit(&request("ok", "acme", 3, 10)).await);
    t.wait_closed("ok").await;
    let mut sent = Sent::default();
    sent.confirmed.insert("ok".into());

    let clean = count(&t.ledger, &sent, 0).await.unwrap();
    assert!(clean.clean(), "{clean:?}");
    assert_eq!((clean.batches, clean.items), (1, 3));
    t.stop_roles().await;

    // A request the broker confirmed that the ledger never decided.
    sent.confirmed.insert("never-decided".into());
    // A granted batch nobody runs: its 4 items never reach a final state.
    let req: BatchRequest = serde_json::from_value(request("stuck", "acme", 4, 5)).unwrap();
    t.ledger
        .reserve(&reserve_input(
            &req,
            Duration::from_secs(600),
            Duration::from_secs(600),
        ))
        .await
        .unwrap();
    sent.confirmed.insert("stuck".into());
    // A hold nobody resolves.
    t.ledger
        .reserve_soft("acme", 5, Duration::from_secs(600))
        .await
        .unwrap();
    // A second capture of one item, and a capture above a reservation: the
    // database refuses both, so lift its guards first.
    let c = t.ledger.pool().get().await.unwrap();
    c.batch_execute(
        "DROP INDEX journal_one_capture_per_item;
         ALTER TABLE items DROP CONSTRAINT items_capture_within_reservation;
         INSERT INTO journal (account_id, hold_id, batch_id, item_id, kind, amount)
             SELECT account_id, hold_id, batch_id, item_id, 'capture', amount
             FROM journal WHERE kind = 'capture' AND batch_id = 'ok' AND item_id = 'i0';
         UPDATE items SET captured = reserved + 1 WHERE batch_id = 'ok' AND item_id = 'i1';",
    )
    .await
    .unwrap();
    drop(c);

    let dirty = count(&t.ledger, &sent, 2).await.unwrap();
    assert!(!dirty.clean());
    // 1 undecided request + 1 unclosed batch + 4 unfinished items.
    assert_eq!(dirty.lost, 6, "{dirty:?}");
    assert_eq!(dirty.captured_twice, 1, "{dirty:?}");
    // 2 negative samples + the item above its reservation + its hold's captures below its items'.
    assert_eq!(dirty.overspend, 4, "{dirty:?}");
    // The stuck batch's hold and the soft hold.
    assert_eq!(dirty.open_holds, 2, "{dirty:?}");
    assert!(dirty.drift > 0, "{dirty:?}");
}

/// The events check counts a closed batch whose `completed` event did not
/// arrive, and only that one.
#[tokio::test]
async fn the_events_check_counts_a_completed_event_that_never_arrived() {
    let mut t = TestFleet::start().await;
    t.grant("acme", 1_000).await;
    for id in ["heard", "unheard"] {
        granted(&t.submit(&request(id, "acme", 2, 10)).await);
        t.wait_closed(id).await;
    }
    let mut arrived = Arrived::default();
    assert_eq!(
        events_lost(&t.ledger, &arrived).await.unwrap(),
        ["heard", "unheard"]
    );
    arrived.completed.insert("heard".into(), 2);
    assert_eq!(events_lost(&t.ledger, &arrived).await.unwrap(), ["unheard"]);
    arrived.completed.insert("unheard".into(), 1);
    assert!(events_lost(&t.ledger, &arrived).await.unwrap().is_empty());
    t.stop().await;
}
