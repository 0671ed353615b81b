//! Limits come before any database work: an oversized message, too many
//! items or an oversized payload is refused by a coordinator (and its HTTP
//! API) whose database cannot even be reached, and nothing reaches the ledger.

use crate::support;

use holdfast::fleet::{Fleet, HttpAddr, Roles};
use holdfast_common::config::Connections;
use serde_json::json;
use support::*;

const ADMIN_TOKEN: &str = "limits-admin-token";

#[tokio::test]
async fn oversized_input_is_refused_before_any_database_work() {
    let mut settings = fast_settings();
    settings.limits.max_message_bytes = 4 * 1024;
    settings.limits.max_items = 3;
    settings.limits.max_payload_bytes = 64;
    settings.http_addr = HttpAddr(Some("127.0.0.1:0".parse().unwrap()));
    settings.api.admin_token = Some(ADMIN_TOKEN.into());
    let mut t = TestFleet::start_with(settings, Roles::default(), None).await;
    t.grant("acme", 1_000).await;

    // A coordinator and an HTTP API whose ledger is a closed port: any
    // ledger call would wait and retry, and none could record anything.
    let nowhere = Connections {
        database_url: "postgres://postgres@127.0.0.1:1/holdfast_unreachable".into(),
        ..t.conn.clone()
    };
    let generator = holdfast_worker::build_generator(&t.settings.generator).unwrap();
    let roles = Roles {
        coordinator: true,
        api: true,
        ..Roles::default()
    };
    let fleet = Fleet::start_with(&nowhere, &t.settings, roles, generator)
        .await
        .unwrap();
    let base = format!("http://{}", fleet.http_addr().unwrap());
    t.fleets.push(fleet);

    let item = |id: String, payload: serde_json::Value| json!({"item_id": id, "estimated_cost": 1, "payload": payload});
    let big_message = json!({
        "batch_id": "big-message", "account_id": "acme",
        "items": [item("a".into(), json!("x".repeat(5 * 1024)))],
    });
    let many_items = json!({
        "batch_id": "many-items", "account_id": "acme",
        "items": (0..4).map(|i| item(format!("i{i}"), json!(null))).collect::<Vec<_>>(),
    });
    let big_payload = json!({
        "batch_id": "big-payload", "account_id": "acme",
        "items": [item("a".into(), json!({"prompt": "x".repeat(100)}))],
    });
    let cases = [
        (&big_message, "body", "the limit is 4096"),
        (&many_items, "items", "the limit is 3"),
        (&big_payload, "items[0].payload", "the limit is 64"),
    ];

    // Over AMQP: answered `rejected`, naming the limit, at once.
    for (request, field, words) in &cases {
        let d = t.submit(request).await;
        let r = rejected(&d);
        assert!(
            r.errors
                .iter()
                .any(|e| e.field == *field && e.reason.contains(words)),
            "{field}: {:?}",
            r.errors
        );
    }

    // Over HTTP: 413 for the body, 422 naming the field for the rest. The
    // admin token is checked without the database (a key would be looked up
    // in it, and this coordinator cannot reach it).
    let http = reqwest::Client::new();
    let post = |path: &str, body: &serde_json::Value| {
        http.post(format!("{base}{path}"))
            .bearer_auth(ADMIN_TOKEN)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
    };
    for path in ["/v1/batches", "/v1/preview", "/v1/reservations"] {
        let r = post(path, &big_message).await.unwrap();
        assert_eq!(r.status(), 413, "{path}");
    }
    for (request, field, words) in &cases[1..] {
        let r = post("/v1/batches", request).await.unwrap();
        assert_eq!(r.status(), 422);
        let body: serde_json::Value = r.json().await.unwrap();
        let errors = body["errors"].as_array().unwrap();
        assert!(
            errors
                .iter()
                .any(|e| e["field"] == *field && e["reason"].as_str().unwrap().contains(words)),
            "{body}"
        );
    }

    // The real ledger never heard of any of them.
    for id in ["big-message", "many-items", "big-payload"] {
        assert!(t.ledger.batch(id).await.unwrap().is_none(), "{id}");
    }
    let a = t.ledger.account("acme").await.unwrap();
    assert_eq!((a.balance, a.held), (1_000, 0));
    assert_eq!(t.dead_letters("requests").await.len(), cases.len());
    t.stop().await;
}
