//! Bad input: every class gets a `rejected` decision naming the problem, is
//! parked in the dead-letter queue with its reason, holds nothing, and the
//! coordinator goes on serving the next request.

use crate::support;

use holdfast::fleet::Roles;
use serde_json::json;
use support::*;

#[tokio::test]
async fn every_class_of_bad_input_is_rejected_parked_and_harmless() {
    let mut settings = fast_settings();
    settings.limits.max_items = 5;
    settings.limits.max_payload_bytes = 64;
    settings.limits.max_item_cost = 1_000;
    let mut t = TestFleet::start_with(settings, Roles::NO_API, None).await;
    t.grant("acme", 1_000).await;
    let item = |id: &str, cost: i64| json!({"item_id": id, "estimated_cost": cost});
    let body = |v: serde_json::Value| v.to_string().into_bytes();

    // (body, the field the rejection must name, words its reason must contain)
    let cases: Vec<(Vec<u8>, &str, &str)> = vec![
        (b"{not json".to_vec(), "body", "not valid JSON"),
        (b"\xff\xfe\x00garbage".to_vec(), "body", "not valid JSON"),
        (body(json!([1, 2, 3])), "body", "must be a JSON object"),
        (
            body(json!({"account_id": "acme", "items": [item("a", 1)]})),
            "batch_id",
            "is required",
        ),
        (
            body(json!({"batch_id": "m2", "items": [item("a", 1)]})),
            "account_id",
            "is required",
        ),
        (
            body(json!({"batch_id": "m3", "account_id": "acme"})),
            "items",
            "is required",
        ),
        (
            body(json!({"batch_id": "m4", "account_id": "acme", "items": [{"item_id": "a"}]})),
            "items[0].estimated_cost",
            "is required",
        ),
        (
            body(json!({"batch_id": "u1", "account_id": "ghost", "items": [item("a", 1)]})),
            "account_id",
            "unknown account `ghost`",
        ),
        (
            body(json!({"batch_id": "c0", "account_id": "acme", "items": [item("a", 0)]})),
            "items[0].estimated_cost",
            "greater than zero",
        ),
        (
            body(
                json!({"batch_id": "c1", "account_id": "acme", "items": [item("a", 5), item("b", -3)]}),
            ),
            "items[1].estimated_cost",
            "greater than zero",
        ),
        (
            body(json!({"batch_id": "c2", "account_id": "acme", "items": [item("a", 1_001)]})),
            "items[0].estimated_cost",
            "exceeds the per-item limit",
        ),
        (
            body(
                json!({"batch_id": "c3", "account_id": "acme", "items": [{"item_id": "a", "estimated_cost": 1.5}]}),
            ),
            "items[0].estimated_cost",
            "whole number",
        ),
        (
            body(
                json!({"batch_id": "c4", "account_id": "acme", "items": [{"item_id": "a", "estimated_cost": 1e30}]}),
            ),
            "items[0].estimated_cost",
            "",
        ),
        (
            body(json!({"batch_id": "e1", "account_id": "acme", "items": []})),
            "items",
            "at least one item",
        ),
        (
            body(
                json!({"batch_id": "d1", "account_id": "acme", "items": [item("a", 1), item("a", 2)]}),
            ),
            "items[1].item_id",
            "duplicate item id `a`",
        ),
        (
            body(
                json!({"batch_id": "l1", "account_id": "acme", "items": (0..6).map(|i| item(&format!("x{i}"), 1)).collect::<Vec<_>>()}),
            ),
            "items",
            "the limit is 5",
        ),
        (
            body(
                json!({"batch_id": "p1", "account_id": "acme", "items": [{"item_id": "a", "estimated_cost": 1, "payload": {"prompt": "x".repeat(100)}}]}),
            ),
            "items[0].payload",
            "the limit is 64",
        ),
        (
            body(
                json!({"batch_id": "s1", "account_id": "acme", "mode": "selected", "item_ids": ["a", "zz"], "items": [item("a", 1)]}),
            ),
            "item_ids[1]",
            "`zz` is not an item of this batch",
        ),
        (
            body(
                json!({"batch_id": "s2", "account_id": "acme", "mode": "selected", "items": [item("a", 1)]}),
            ),
            "item_ids",
            "is required with mode `selected`",
        ),
        (
            body(
                json!({"batch_id": "md", "account_id": "acme", "mode": "most", "items": [item("a", 1)]}),
            ),
            "mode",
            "unknown mode `most`",
        ),
        (
            body(json!({"batch_id": "", "account_id": "acme", "items": [item("a", 1)]})),
            "batch_id",
            "must not be empty",
        ),
    ];

    for (i, (bytes, field, words)) in cases.iter().enumerate() {
        let d = t.submit_raw(bytes).await;
        let r = rejected(&d);
        assert!(
            r.errors
                .iter()
                .any(|e| e.field == *field && e.reason.contains(words)),
            "case {i}: expected `{field}` ~ `{words}`, got {:?}",
            r.errors
        );
        // The consumer still serves the next, valid request.
        let ok = format!("ok-{i}");
        granted(&t.submit(&request(&ok, "acme", 1, 1)).await);
    }

    let dead = t.dead_letters("requests").await;
    assert_eq!(dead.len(), cases.len(), "each bad request is parked once");
    for ((body, _, _), (parked, reason)) in cases.iter().zip(&dead) {
        assert_eq!(body, parked, "the original bytes are kept");
        assert!(
            !reason.is_empty(),
            "the reason travels with the parked message"
        );
    }
    for i in 0..cases.len() {
        t.wait_closed(&format!("ok-{i}")).await;
    }
    let a = t.ledger.account("acme").await.unwrap();
    assert_eq!(
        (a.open_holds, a.held),
        (0, 0),
        "no bad request holds anything"
    );
    assert_eq!(
        a.balance,
        1_000 - cases.len() as i64,
        "only the valid requests were charged"
    );
    assert_eq!(t.ledger.batch("u1").await.unwrap().map(|b| b.state), None);
    t.assert_exact().await;
    t.stop().await;
}

#[tokio::test]
async fn a_request_the_ledger_keeps_refusing_is_answered_and_parked_not_lost() {
    let mut settings = fast_settings();
    settings.queues.request_delivery_limit = 1;
    let mut t = TestFleet::start_with(settings, Roles::NO_API, None).await;
    t.grant("acme", 100).await;
    // A real PostgreSQL error that no validation can foresee, for one batch id.
    let (client, conn) = tokio_postgres::connect(&t.conn.database_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(
            "CREATE FUNCTION refuse_boom() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN IF NEW.id = 'boom' THEN RAISE EXCEPTION 'storage refused batch boom'; END IF;
             RETURN NEW; END $$;
             CREATE TRIGGER refuse_boom BEFORE INSERT ON batches FOR EACH ROW EXECUTE FUNCTION refuse_boom();",
        )
        .await
        .unwrap();
    let d = t.submit(&request("boom", "acme", 2, 10)).await;
    let r = rejected(&d);
    assert_eq!(r.batch_id.as_deref(), Some("boom"));
    assert!(
        r.reason.contains("could not be decided after 2 deliveries")
            && r.reason.contains("storage refused batch boom"),
        "{}",
        r.reason
    );
    let dead = t.dead_letters("requests").await;
    assert_eq!(dead.len(), 1, "parked once, with its reason");
    assert!(dead[0].1.contains("could not be decided"));
    // Nothing held, and the next request is served.
    granted(&t.submit(&request("fine", "acme", 2, 10)).await);
    t.wait_closed("fine").await;
    assert_eq!(t.ledger.account("acme").await.unwrap().balance, 80);
    t.assert_exact().await;
    t.stop().await;
}
