//! The HTTP API on real PostgreSQL and RabbitMQ, bound to 127.0.0.1 port 0:
//! previews agree with the decisions that follow, soft holds keep credits
//! until released, batches submitted and cancelled over HTTP settle exactly,
//! and every malformed input is a 4xx problem document, never a 5xx.

use crate::support;

use holdfast::fleet::{FleetSettings, HttpAddr, Roles};
use holdfast_coordinator::keys::Scope;
use reqwest::Method;
use serde_json::{json, Value};
use support::*;

const ADMIN_TOKEN: &str = "test-admin-token";

/// An answer: status, content type, the `Location` and `WWW-Authenticate` headers, and the body as JSON.
#[derive(Debug)]
struct Reply {
    status: u16,
    content_type: String,
    location: Option<String>,
    www_authenticate: Option<String>,
    body: Value,
}

/// A client of one fleet's API, with an API key (producer, every account).
struct Api {
    base: String,
    http: reqwest::Client,
    key: String,
}

impl Api {
    async fn of(t: &TestFleet, fleet: usize) -> Api {
        let addr = t.fleets[fleet].http_addr().expect("the fleet runs the API");
        Api {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
            key: t.api_key(Scope::Producer, &[]).await,
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Reply {
        let resp = req.send().await.expect("the API answers");
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_string())
        };
        let (content_type, location, www_authenticate) = (
            header("content-type").unwrap_or_default(),
            header("location"),
            header("www-authenticate"),
        );
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.expect("a body");
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Reply {
            status,
            content_type,
            location,
            www_authenticate,
            body,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn get(&self, path: &str) -> Reply {
        self.send(self.http.get(self.url(path)).bearer_auth(&self.key))
            .await
    }

    async fn delete(&self, path: &str) -> Reply {
        self.send(self.http.delete(self.url(path)).bearer_auth(&self.key))
            .await
    }

    async fn post(&self, path: &str, body: &Value) -> Reply {
        self.raw(
            Method::POST,
            path,
            Some("application/json"),
            body.to_string(),
        )
        .await
    }

    async fn raw(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> Reply {
        let mut req = self
            .http
            .request(method, self.url(path))
            .bearer_auth(&self.key)
            .body(body);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        self.send(req).await
    }

    async fn grant(&self, account: &str, body: &Value, token: Option<&str>) -> Reply {
        let mut req = self
            .http
            .post(self.url(&format!("/v1/accounts/{account}/grants")))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        self.send(req).await
    }

    /// Poll the batch until it is closed.
    async fn wait_closed(&self, batch_id: &str) -> Value {
        eventually(&format!("batch {batch_id} closes"), || async {
            let r = self.get(&format!("/v1/batches/{batch_id}")).await;
            assert_eq!(r.status, 200, "{r:?}");
            matches!(
                r.body["state"].as_str(),
                Some("completed" | "cancelled" | "expired")
            )
            .then_some(r.body)
        })
        .await
    }
}

/// Fast settings with the API on a free local port and an admin token.
fn api_settings() -> FleetSettings {
    let mut s = fast_settings();
    s.http_addr = HttpAddr(Some("127.0.0.1:0".parse().unwrap()));
    s.api.admin_token = Some(ADMIN_TOKEN.into());
    s
}

async fn start(settings: FleetSettings) -> (TestFleet, Api) {
    let t = TestFleet::start_with(settings, Roles::ALL, None).await;
    let api = Api::of(&t, 0).await;
    (t, api)
}

/// Assert `r` is a problem document with `status`; return the fields its `errors` name.
fn problem(r: &Reply, status: u16) -> Vec<String> {
    assert_eq!(r.status, status, "{r:#?}");
    assert_eq!(r.content_type, "application/problem+json", "{r:#?}");
    assert_eq!(r.body["status"], status, "{r:#?}");
    for key in ["type", "title", "detail"] {
        assert!(r.body[key].is_string(), "problem without `{key}`: {r:#?}");
    }
    r.body["errors"]
        .as_array()
        .map(|errors| {
            errors
                .iter()
                .map(|e| e["field"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// A batch request of `n` items (`item-1`…, the ids `count`/`cost` previews generate).
fn batch(batch_id: &str, account: &str, n: usize, cost: i64, payload: Value) -> Value {
    let items: Vec<Value> = (1..=n)
        .map(
            |i| json!({"item_id": format!("item-{i}"), "estimated_cost": cost, "payload": payload}),
        )
        .collect();
    json!({"batch_id": batch_id, "account_id": account, "items": items})
}

#[tokio::test]
async fn preview_agrees_with_the_decision_that_follows() {
    let (t, api) = start(api_settings()).await;
    t.grant("acme", 100).await;

    // Short: the preview's k of N is the insufficient decision's k of N.
    let p = api
        .post(
            "/v1/preview",
            &json!({"account_id": "acme", "count": 10, "cost": 12}),
        )
        .await;
    assert_eq!(p.status, 200, "{p:?}");
    assert_eq!(p.body["fits"], false);
    assert_eq!(
        (
            &p.body["total_cost"],
            &p.body["available"],
            &p.body["shortfall"]
        ),
        (&json!(120), &json!(100), &json!(20))
    );
    assert_eq!(p.body["fit_count"], 8);
    assert_eq!(
        p.body["message"],
        "This action will cost ~120 credits. You have 100 credits."
    );
    assert_eq!(
        p.body["advice"],
        "You have enough credits to generate 8 out of 10 items."
    );
    let d = api
        .post("/v1/batches", &batch("short", "acme", 10, 12, Value::Null))
        .await;
    assert_eq!(d.status, 200, "{d:?}");
    assert_eq!(d.body["decision"], "insufficient");
    assert_eq!(d.body["fit_count"], p.body["fit_count"]);
    assert_eq!(d.body["total_cost"], p.body["total_cost"]);
    assert_eq!(d.body["first_fit"], p.body["first_fit"]);
    assert_eq!(t.available("acme").await, 100, "a preview holds nothing");

    // The same items in first_fit mode: the preview says it fits, and exactly the fitting prefix runs.
    let mut first_fit = batch("ff", "acme", 10, 12, Value::Null);
    first_fit["mode"] = json!("first_fit");
    let mut preview_ff = first_fit.clone();
    preview_ff.as_object_mut().unwrap().remove("batch_id");
    let p = api.post("/v1/preview", &preview_ff).await;
    assert_eq!((p.status, &p.body["fits"]), (200, &json!(true)), "{p:?}");
    let d = api.post("/v1/batches", &first_fit).await;
    assert_eq!(d.status, 201, "{d:?}");
    assert_eq!(d.body["decision"], "granted");
    assert_eq!(d.location.as_deref(), Some("/v1/batches/ff"));
    assert_eq!(d.body["item_ids"], p.body["first_fit"]["item_ids"]);
    assert_eq!(d.body["reserved"], p.body["first_fit"]["cost"]);

    // Granted over HTTP, then followed to completion over HTTP.
    let b = api.wait_closed("ff").await;
    assert_eq!(b["state"], "completed");
    assert_eq!(b["figures"]["succeeded"], 8);
    assert_eq!(b["figures"]["skipped"], 2);
    assert_eq!(
        (
            &b["figures"]["reserved"],
            &b["figures"]["captured"],
            &b["figures"]["released"]
        ),
        (&json!(96), &json!(96), &json!(0))
    );
    let left: Vec<_> = b["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["state"] == "skipped")
        .map(|i| i["reason"].clone())
        .collect();
    assert_eq!(left, [json!("did_not_fit"), json!("did_not_fit")]);

    // The same request again replays the same decision.
    let again = api.post("/v1/batches", &first_fit).await;
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(again.body["hold_id"], d.body["hold_id"]);
    t.assert_exact().await;
    t.stop().await;
}

#[tokio::test]
async fn a_reservation_keeps_credits_until_it_is_deleted() {
    let (t, api) = start(api_settings()).await;
    t.grant("acme", 100).await;

    let r = api
        .post(
            "/v1/reservations",
            &json!({"account_id": "acme", "amount": 80, "ttl_seconds": 60}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let id = r.body["reservation_id"].as_str().unwrap().to_string();
    assert_eq!(r.location, Some(format!("/v1/reservations/{id}")));
    assert_eq!(
        (&r.body["state"], &r.body["amount"]),
        (&json!("open"), &json!(80))
    );
    assert!(r.body["expires_at"].is_string());

    let a = api.get("/v1/accounts/acme").await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(
        (&a.body["balance"], &a.body["held"], &a.body["available"]),
        (&json!(100), &json!(80), &json!(20))
    );
    assert_eq!(a.body["holds"][0]["reservation_id"], id.as_str());

    // Another batch on the same account cannot take the held credits.
    let d = api
        .post("/v1/batches", &batch("other", "acme", 3, 10, Value::Null))
        .await;
    assert_eq!(
        (d.status, &d.body["decision"]),
        (200, &json!("insufficient"))
    );
    assert_eq!(d.body["available"], 20);
    let short = api
        .post(
            "/v1/reservations",
            &json!({"account_id": "acme", "amount": 30}),
        )
        .await;
    problem(&short, 409);
    assert_eq!(
        (&short.body["requested"], &short.body["available"]),
        (&json!(30), &json!(20))
    );

    // DELETE gives the credits back, once.
    let gone = api.delete(&format!("/v1/reservations/{id}")).await;
    assert_eq!(
        (gone.status, &gone.body["state"]),
        (200, &json!("closed")),
        "{gone:?}"
    );
    assert_eq!(t.available("acme").await, 100);
    let again = api.delete(&format!("/v1/reservations/{id}")).await;
    assert_eq!(
        (again.status, &again.body["state"]),
        (200, &json!("closed"))
    );
    assert_eq!(t.available("acme").await, 100);
    let shown = api.get(&format!("/v1/reservations/{id}")).await;
    assert_eq!(
        (shown.status, &shown.body["state"]),
        (200, &json!("closed"))
    );
    let d = api
        .post("/v1/batches", &batch("after", "acme", 3, 10, Value::Null))
        .await;
    assert_eq!((d.status, &d.body["decision"]), (201, &json!("granted")));
    api.wait_closed("after").await;

    // A reservation for a batch's items, consumed by that batch: in use, it cannot be deleted.
    let slow = json!({"simulate": {"latency_ms": 1500}});
    let r = api
        .post(
            "/v1/reservations",
            &json!({"account_id": "acme", "count": 2, "cost": 10}),
        )
        .await;
    assert_eq!((r.status, &r.body["amount"]), (201, &json!(20)), "{r:?}");
    let rid = r.body["reservation_id"].as_str().unwrap();
    let mut req = batch("held", "acme", 2, 10, slow);
    req["reservation_id"] = json!(rid);
    let d = api.post("/v1/batches", &req).await;
    assert_eq!((d.status, &d.body["hold_id"]), (201, &json!(rid)), "{d:?}");
    problem(&api.delete(&format!("/v1/reservations/{rid}")).await, 409);
    api.wait_closed("held").await;
    t.assert_exact().await;
    t.stop().await;
}

#[tokio::test]
async fn every_malformed_input_is_a_4xx_problem() {
    let mut settings = api_settings();
    settings.limits.max_items = 50;
    settings.limits.max_payload_bytes = 1024;
    settings.limits.max_message_bytes = 64 * 1024;
    settings.limits.max_item_cost = 1_000_000;
    settings.coordinator.max_reservation_ttl_secs = 600;
    let (mut t, api) = start(settings).await;
    t.grant("acme", 1_000).await;
    let item = |id: &str, cost: Value| json!({"item_id": id, "estimated_cost": cost});
    let items = |list: Vec<Value>| json!({"account_id": "acme", "items": list});

    // (body sent to /v1/preview, the status, the fields `errors` must name)
    let cases: Vec<(Value, u16, Vec<&str>)> = vec![
        (json!([1, 2]), 400, vec!["body"]),
        (json!({}), 400, vec!["account_id", "items"]),
        (
            json!({"account_id": 7, "items": "many"}),
            400,
            vec!["account_id", "items"],
        ),
        (
            items(vec![json!({"item_id": 1, "estimated_cost": "3"})]),
            400,
            vec!["items[0].item_id", "items[0].estimated_cost"],
        ),
        (
            items(vec![item("a", json!(-5))]),
            400,
            vec!["items[0].estimated_cost"],
        ),
        (
            items(vec![item("a", json!(0))]),
            400,
            vec!["items[0].estimated_cost"],
        ),
        (
            items(vec![item("a", json!(1.5))]),
            400,
            vec!["items[0].estimated_cost"],
        ),
        (
            items(vec![item("a", json!(1e30))]),
            400,
            vec!["items[0].estimated_cost"],
        ),
        (
            items(vec![item("a", json!(1_000_001))]),
            400,
            vec!["items[0].estimated_cost"],
        ),
        (items(vec![]), 400, vec!["items"]),
        (
            items(vec![item("a", json!(1)), item("a", json!(1))]),
            400,
            vec!["items[1].item_id"],
        ),
        (
            items((0..51).map(|i| item(&format!("i{i}"), json!(1))).collect()),
            400,
            vec!["items"],
        ),
        (
            items(vec![
                json!({"item_id": "a", "estimated_cost": 1, "payload": "x".repeat(2000)}),
            ]),
            400,
            vec!["items[0].payload"],
        ),
        (
            items(vec![
                json!({"item_id": "a", "estimated_cost": 1, "payload": {"k": "\u{0}"}}),
            ]),
            400,
            vec!["items[0].payload"],
        ),
        (
            json!({"account_id": "acme", "count": 0, "cost": -1}),
            400,
            vec!["count", "cost"],
        ),
        (
            json!({"account_id": "acme", "count": 3, "cost": 1, "mode": "selected"}),
            400,
            vec!["item_ids"],
        ),
        (
            json!({"account_id": "ghost", "count": 1, "cost": 1}),
            404,
            vec![],
        ),
    ];
    for (body, status, fields) in cases {
        let r = api.post("/v1/preview", &body).await;
        assert_eq!(problem(&r, status), fields, "{body}");
    }

    // Transport-level problems, on every JSON endpoint.
    for path in ["/v1/preview", "/v1/reservations", "/v1/batches"] {
        let not_json = api
            .raw(Method::POST, path, Some("application/json"), "{nope")
            .await;
        let expected = if path == "/v1/batches" { 422 } else { 400 };
        assert_eq!(problem(&not_json, expected), ["body"], "{path}");
        let empty = api
            .raw(Method::POST, path, Some("application/json"), "")
            .await;
        assert!(empty.status == 400 || empty.status == 422, "{empty:?}");
        problem(&empty, empty.status);
        problem(
            &api.raw(Method::POST, path, Some("text/plain"), "{}").await,
            415,
        );
        problem(&api.raw(Method::POST, path, None, "{}").await, 415);
        let huge = format!(r#"{{"pad":"{}"}}"#, "x".repeat(70 * 1024));
        problem(
            &api.raw(Method::POST, path, Some("application/json"), huge)
                .await,
            413,
        );
        problem(
            &api.raw(Method::PUT, path, Some("application/json"), "{}")
                .await,
            405,
        );
    }

    // Batches: a rejected decision is a 422 naming the fields; nothing is held.
    let r = api
        .post(
            "/v1/batches",
            &json!({"batch_id": "bad", "account_id": "acme", "items": [item("a", json!(-1))]}),
        )
        .await;
    assert_eq!(problem(&r, 422), ["items[0].estimated_cost"]);
    assert_eq!(r.body["batch_id"], "bad");
    let r = api
        .post("/v1/batches", &batch("ghost-1", "ghost", 1, 1, Value::Null))
        .await;
    assert_eq!(problem(&r, 422), ["account_id"]);
    let r = api
        .post("/v1/batches", &batch("b-dup", "acme", 1, 1, Value::Null))
        .await;
    assert_eq!(r.status, 201);
    let r = api
        .post("/v1/batches", &batch("b-dup", "acme", 1, 2, Value::Null))
        .await;
    assert_eq!(problem(&r, 422), ["batch_id"]);

    // Reservations.
    let cases: Vec<(Value, u16, Vec<&str>)> = vec![
        (
            json!({"account_id": "acme", "amount": 10, "ttl_seconds": 601}),
            400,
            vec!["ttl_seconds"],
        ),
        (
            json!({"account_id": "acme", "amount": 10, "ttl_seconds": 0}),
            400,
            vec!["ttl_seconds"],
        ),
        (
            json!({"account_id": "acme", "amount": 10, "ttl_seconds": "soon"}),
            400,
            vec!["ttl_seconds"],
        ),
        (
            json!({"account_id": "acme", "amount": -3}),
            400,
            vec!["amount"],
        ),
        (
            json!({"account_id": "acme", "amount": 2.5}),
            400,
            vec!["amount"],
        ),
        (json!({"account_id": "acme"}), 400, vec!["amount"]),
        (json!({"amount": 3}), 400, vec!["account_id"]),
        (
            json!({"account_id": "acme", "amount": 3, "count": 1, "cost": 3}),
            400,
            vec!["amount"],
        ),
        (
            json!({"account_id": "acme", "items": [item("a", json!(0))]}),
            400,
            vec!["items[0].estimated_cost"],
        ),
        (json!({"account_id": "ghost", "amount": 3}), 404, vec![]),
        (json!({"account_id": "acme", "amount": 5_000}), 409, vec![]),
    ];
    for (body, status, fields) in cases {
        let r = api.post("/v1/reservations", &body).await;
        assert_eq!(problem(&r, status), fields, "{body}");
    }
    problem(&api.get("/v1/reservations/not-a-uuid").await, 404);
    problem(
        &api.delete("/v1/reservations/7706bd98-1fa9-4b26-9468-9dd4c58aa731")
            .await,
        404,
    );

    // Unknown things, bad paths, unknown routes.
    problem(&api.get("/v1/accounts/ghost").await, 404);
    problem(&api.get("/v1/batches/ghost").await, 404);
    problem(
        &api.raw(Method::POST, "/v1/batches/ghost/cancel", None, "")
            .await,
        404,
    );
    assert_eq!(problem(&api.get("/v1/batches/%FF").await, 400), ["id"]);
    assert_eq!(problem(&api.get("/v1/accounts/a%00b").await, 400), ["id"]);
    let long = "x".repeat(129);
    assert_eq!(
        problem(&api.get(&format!("/v1/batches/{long}")).await, 400),
        ["id"]
    );
    problem(&api.get("/v1/nothing-here").await, 404);
    problem(&api.delete("/v1/batches/b-dup").await, 405);

    // Cancelling a finished batch is a conflict.
    api.wait_closed("b-dup").await;
    let r = api
        .raw(Method::POST, "/v1/batches/b-dup/cancel", None, "")
        .await;
    problem(&r, 409);
    // So is cancelling a denied one.
    let r = api
        .post(
            "/v1/batches",
            &batch("denied", "acme", 1, 999_999, Value::Null),
        )
        .await;
    assert_eq!(r.body["decision"], "insufficient");
    problem(
        &api.raw(Method::POST, "/v1/batches/denied/cancel", None, "")
            .await,
        409,
    );

    // Grants: bearer token required, compared exactly; input checked after it.
    let grant = json!({"amount": 5, "note": "invoice 7"});
    let r = api.grant("acme", &grant, None).await;
    problem(&r, 401);
    assert!(r.www_authenticate.unwrap().starts_with("Bearer"));
    let r = api.grant("acme", &grant, Some("test-admin-toke")).await;
    problem(&r, 401);
    assert!(r.www_authenticate.is_some());
    problem(&api.grant("acme", &json!({"amount": 0}), None).await, 401);
    let r = api.grant("acme", &grant, Some(ADMIN_TOKEN)).await;
    assert_eq!(
        (r.status, &r.body["balance"]),
        (200, &json!(1_004)),
        "{r:?}"
    );
    let cases: Vec<(Value, Vec<&str>)> = vec![
        (json!({"amount": 0}), vec!["amount"]),
        (json!({"amount": "5"}), vec!["amount"]),
        (json!({}), vec!["amount"]),
        (json!({"amount": 5, "note": 3}), vec!["note"]),
        (json!({"amount": 5, "note": "\u{0}"}), vec!["note"]),
        (json!({"amount": 5, "create": "yes"}), vec!["create"]),
    ];
    for (body, fields) in cases {
        let r = api.grant("acme", &body, Some(ADMIN_TOKEN)).await;
        assert_eq!(problem(&r, 400), fields, "{body}");
    }
    problem(
        &api.grant("acme", &json!({"amount": i64::MAX}), Some(ADMIN_TOKEN))
            .await,
        400,
    );
    problem(&api.grant("ghost", &grant, Some(ADMIN_TOKEN)).await, 404);
    let r = api
        .grant(
            "newcomer",
            &json!({"amount": 5, "create": true}),
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!((r.status, &r.body["available"]), (200, &json!(5)));

    // A producer key may not grant: that needs the admin scope.
    let r = api.grant("acme", &grant, Some(&api.key)).await;
    assert_eq!(problem(&r, 403), Vec::<String>::new());
    assert_eq!(r.body["type"], "urn:holdfast:problem:insufficient-scope");

    // Without a configured admin token, that token is just a wrong key.
    t.settings.api.admin_token = None;
    t.start_roles(
        Roles {
            api: true,
            ..Roles::default()
        },
        None,
    )
    .await;
    let closed = Api::of(&t, 1).await;
    let r = closed.grant("acme", &grant, Some(ADMIN_TOKEN)).await;
    problem(&r, 401);
    let admin = t.api_key(Scope::Admin, &[]).await;
    let r = closed.grant("acme", &grant, Some(&admin)).await;
    assert_eq!((r.status, &r.body["balance"]), (200, &json!(1_009)));

    t.assert_exact().await;
    t.stop().await;
}

#[tokio::test]
async fn cancel_over_http_settles_exact_figures() {
    let mut settings = api_settings();
    settings.worker.worker_prefetch = 2;
    let (t, api) = start(settings).await;
    t.grant("acme", 1_000).await;
    let n = 20;
    let req = batch(
        "slow",
        "acme",
        n,
        10,
        json!({"simulate": {"latency_ms": 300}}),
    );
    let d = api.post("/v1/batches", &req).await;
    assert_eq!(d.status, 201, "{d:?}");
    // Cancel once the first item has succeeded: some have run, most have not.
    eventually("an item of the slow batch runs", || async {
        let b = api.get("/v1/batches/slow").await;
        (b.body["figures"]["succeeded"].as_i64().unwrap() > 0).then_some(())
    })
    .await;

    let c = api
        .raw(Method::POST, "/v1/batches/slow/cancel", None, "")
        .await;
    assert_eq!(
        (c.status, &c.body["state"]),
        (202, &json!("cancelling")),
        "{c:?}"
    );
    let again = api
        .raw(Method::POST, "/v1/batches/slow/cancel", None, "")
        .await;
    assert!(matches!(again.status, 202 | 409), "{again:?}");

    let b = api.wait_closed("slow").await;
    assert_eq!(b["state"], "cancelled");
    assert_eq!(b["hold_state"], "closed");
    let f = &b["figures"];
    let (succeeded, cancelled, failed) = (
        f["succeeded"].as_i64().unwrap(),
        f["cancelled"].as_i64().unwrap(),
        f["failed"].as_i64().unwrap(),
    );
    assert_eq!((succeeded + cancelled, failed), (n as i64, 0), "{f}");
    assert!(succeeded > 0 && cancelled > 0, "cancel came mid-batch: {f}");
    let items = b["items"].as_array().unwrap();
    let captured_by_items: i64 = items
        .iter()
        .filter(|i| i["state"] == "succeeded")
        .map(|i| i["reserved"].as_i64().unwrap())
        .sum();
    let reserved = f["reserved"].as_i64().unwrap();
    let captured = f["captured"].as_i64().unwrap();
    assert_eq!(reserved, 10 * n as i64);
    assert_eq!(captured, captured_by_items);
    assert_eq!(f["released"].as_i64().unwrap(), reserved - captured);
    assert!(items
        .iter()
        .filter(|i| i["state"] == "cancelled")
        .all(|i| i["captured"] == 0));
    assert_eq!(t.available("acme").await, 1_000 - captured);
    t.assert_exact().await;
    t.stop().await;
}

#[tokio::test]
async fn the_openapi_document_describes_every_route() {
    let (t, api) = start(api_settings()).await;
    let r = api.get("/openapi.json").await;
    assert_eq!(r.status, 200);
    assert!(r.body["openapi"].as_str().unwrap().starts_with("3."));
    let paths = r.body["paths"].as_object().unwrap();
    for (path, method) in [
        ("/v1/preview", "post"),
        ("/v1/reservations", "post"),
        ("/v1/reservations/{id}", "get"),
        ("/v1/reservations/{id}", "delete"),
        ("/v1/batches", "post"),
        ("/v1/batches/{id}", "get"),
        ("/v1/batches/{id}/cancel", "post"),
        ("/v1/accounts/{id}", "get"),
        ("/v1/accounts/{id}/grants", "post"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
    ] {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} is not documented"
        );
    }
    // The server's own refusals are documented where they can happen.
    let responses = |path: &str, method: &str| {
        let r = &paths[path][method]["responses"];
        let mut codes: Vec<String> = r.as_object().unwrap().keys().cloned().collect();
        codes.retain(|c| ["408", "414", "431", "503"].contains(&c.as_str()));
        codes
    };
    assert_eq!(
        responses("/v1/preview", "post"),
        ["408", "414", "431", "503"]
    );
    assert_eq!(responses("/healthz", "get"), ["414", "431", "503"]);
    let schemas = r.body["components"]["schemas"].as_object().unwrap();
    for name in ["Problem", "Preview", "Reservation", "Decision", "BatchView"] {
        assert!(schemas.contains_key(name), "schema {name} missing");
    }
    assert_eq!(api.get("/readyz").await.status, 200);
    t.stop().await;
}
