//! Ids at every documented limit (128 characters, up to 512 bytes of UTF-8)
//! run end to end: granted, dispatched, captured, closed, over AMQP and over
//! HTTP. Whatever goes into an AMQP short string (255 bytes) is bounded by
//! construction, so no id can make a role panic or strand a hold.

use crate::support;

use holdfast::fleet::{HttpAddr, Roles};
use holdfast_coordinator::keys::Scope;
use serde_json::{json, Value};
use support::*;

/// 128 characters of `c`.
fn id_of(c: char) -> String {
    std::iter::repeat_n(c, 128).collect()
}

/// A request whose batch id and item ids are 128 characters each.
fn long_request(batch_id: &str, account: &str) -> Value {
    json!({
        "batch_id": batch_id,
        "account_id": account,
        "items": [
            {"item_id": id_of('i'), "estimated_cost": 5},
            // 128 emoji: 512 bytes.
            {"item_id": id_of('🦀'), "estimated_cost": 5},
            // 128 three-byte characters: 384 bytes.
            {"item_id": id_of('界'), "estimated_cost": 5},
        ]
    })
}

#[tokio::test]
async fn a_batch_with_ids_at_every_limit_runs_to_completion_over_amqp() {
    let mut t = TestFleet::start().await;
    let account = id_of('å');
    t.grant(&account, 100).await;
    for batch_id in [id_of('b'), id_of('😀')] {
        let decision = t.submit(&long_request(&batch_id, &account)).await;
        assert_eq!(granted(&decision).reserved, 15);
        let b = t.wait_closed(&batch_id).await;
        assert_eq!(b.state, "completed", "{b:#?}");
        assert_eq!((b.figures.succeeded, b.figures.captured), (3, 15));
    }
    assert_eq!(t.available(&account).await, 70);
    t.assert_exact().await;
    assert!(t
        .ledger
        .stuck(std::time::Duration::ZERO)
        .await
        .unwrap()
        .is_empty());
    t.stop().await;
}

#[tokio::test]
async fn a_batch_with_ids_at_every_limit_runs_to_completion_over_http() {
    let mut settings = fast_settings();
    settings.http_addr = HttpAddr(Some("127.0.0.1:0".parse().unwrap()));
    let t = TestFleet::start_with(settings, Roles::ALL, None).await;
    let account = id_of('a');
    t.grant(&account, 100).await;
    let batch_id = id_of('🦀');
    let addr = t.fleets[0].http_addr().expect("the API runs");
    let key = t.api_key(Scope::Producer, &[&account]).await;
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("http://{addr}/v1/batches"))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(long_request(&batch_id, &account).to_string())
        .send()
        .await
        .expect("the API answers");
    assert_eq!(resp.status().as_u16(), 201);
    let b = t.wait_closed(&batch_id).await;
    assert_eq!(b.state, "completed", "{b:#?}");
    assert_eq!((b.figures.succeeded, b.figures.captured), (3, 15));
    assert_eq!(t.available(&account).await, 85);
    t.assert_exact().await;
    t.stop().await;
}
