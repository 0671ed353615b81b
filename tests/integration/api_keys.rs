//! API keys on a real server: every `/v1` request needs one. Each denial is
//! a problem document and changes nothing: no key, a wrong key, a revoked
//! one (at once through this process, within the cache's time through
//! another), an expired one (401); a key without the scope, or without the
//! account (403, the same answer whether the account exists or not). Keys
//! made over HTTP by an admin work, are listed without their secret, record
//! their last use, and are revoked. The OpenAPI document says all of it.

use crate::support;

use std::time::Duration;

use holdfast::fleet::{FleetSettings, HttpAddr, Roles};
use holdfast_coordinator::keys::{Accounts, KeySpec, KeyStore, Scope};
use reqwest::Method;
use serde_json::{json, Value};
use support::*;

const ADMIN_TOKEN: &str = "keys-admin-token";

/// Status, headers of interest and body of one answer.
#[derive(Debug)]
struct Reply {
    status: u16,
    content_type: String,
    www_authenticate: Option<String>,
    body: Value,
}

struct Client {
    base: String,
    http: reqwest::Client,
}

impl Client {
    fn of(t: &TestFleet) -> Client {
        let addr = t.fleets[0].http_addr().expect("the API listens");
        Client {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> Reply {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let r = req.send().await.expect("the API answers");
        let header = |name: &str| {
            r.headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_string())
        };
        let (content_type, www_authenticate) = (
            header("content-type").unwrap_or_default(),
            header("www-authenticate"),
        );
        let status = r.status().as_u16();
        let body = r.json().await.unwrap_or(Value::Null);
        Reply {
            status,
            content_type,
            www_authenticate,
            body,
        }
    }

    async fn get(&self, path: &str, key: Option<&str>) -> Reply {
        self.call(Method::GET, path, key, None).await
    }

    async fn post(&self, path: &str, key: Option<&str>, body: Value) -> Reply {
        self.call(Method::POST, path, key, Some(body)).await
    }
}

/// Assert `r` is a problem document of `status` and `type` `urn:holdfast:problem:<kind>`.
fn problem(r: &Reply, status: u16, kind: &str) {
    assert_eq!(r.status, status, "{r:#?}");
    assert_eq!(r.content_type, "application/problem+json", "{r:#?}");
    assert_eq!(r.body["status"], status, "{r:#?}");
    assert_eq!(
        r.body["type"],
        format!("urn:holdfast:problem:{kind}"),
        "{r:#?}"
    );
    if status == 401 {
        assert_eq!(
            r.www_authenticate.as_deref(),
            Some(r#"Bearer realm="holdfast""#)
        );
    }
}

fn settings() -> FleetSettings {
    let mut s = fast_settings();
    s.http_addr = HttpAddr(Some("127.0.0.1:0".parse().unwrap()));
    s.api.admin_token = Some(ADMIN_TOKEN.into());
    s
}

fn preview(account: &str) -> Value {
    json!({"account_id": account, "count": 2, "cost": 5})
}

#[tokio::test]
async fn a_request_without_a_valid_key_is_401_and_changes_nothing() {
    let t = TestFleet::start_with(settings(), Roles::ALL, None).await;
    t.grant("acme", 100).await;
    let api = Client::of(&t);
    let good = t.api_key(Scope::Producer, &["acme"]).await;
    let unknown_id = format!("hf_live_aaaaaaaaaaaa_{}", &good[21..]);
    let wrong_secret = format!(
        "{}{}",
        &good[..good.len() - 1],
        if good.ends_with('A') { "B" } else { "A" }
    );
    let batch = request("b-denied", "acme", 2, 5);

    // No key, a string that is no key, an unknown id, a wrong secret: one answer.
    let mut details = Vec::new();
    for key in [
        None,
        Some("not-a-key"),
        Some(unknown_id.as_str()),
        Some(wrong_secret.as_str()),
    ] {
        for r in [
            api.get("/v1/accounts/acme", key).await,
            api.post("/v1/preview", key, preview("acme")).await,
            api.post("/v1/batches", key, batch.clone()).await,
            api.get("/v1/keys", key).await,
        ] {
            problem(&r, 401, "unauthorized");
            if key.is_some() {
                details.push(r.body["detail"].clone());
            }
        }
    }
    details.dedup();
    assert_eq!(
        details.len(),
        1,
        "one answer for every wrong key: {details:?}"
    );
    // A key in another header scheme is no bearer key.
    let r = api
        .send_raw(Method::GET, "/v1/accounts/acme", &format!("Basic {good}"))
        .await;
    assert_eq!(r, 401);

    // Nothing was held, submitted or created by any of them.
    assert!(t.ledger.batch("b-denied").await.unwrap().is_none());
    assert_eq!(t.available("acme").await, 100);
    // The open routes stay open.
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
        "/demo",
        "/demo/demo.js",
    ] {
        assert_eq!(api.get(path, None).await.status, 200, "{path}");
    }
    // And the good key works.
    let r = api.post("/v1/preview", Some(&good), preview("acme")).await;
    assert_eq!((r.status, &r.body["fits"]), (200, &json!(true)), "{r:#?}");
    t.stop().await;
}

impl Client {
    async fn send_raw(&self, method: Method, path: &str, authorization: &str) -> u16 {
        self.http
            .request(method, format!("{}{path}", self.base))
            .header("authorization", authorization)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }
}

#[tokio::test]
async fn revoked_and_expired_keys_are_refused() {
    let mut s = settings();
    // Another process's revocation reaches this one within a second.
    s.api.api_key_cache_secs = 1;
    let t = TestFleet::start_with(s, Roles::ALL, None).await;
    t.grant("acme", 100).await;
    let api = Client::of(&t);

    // Revoked over this process's API: refused at once.
    let admin = t.api_key(Scope::Admin, &[]).await;
    let key = t.api_key(Scope::Producer, &["acme"]).await;
    let id = &key["hf_live_".len().."hf_live_".len() + 12];
    assert_eq!(api.get("/v1/accounts/acme", Some(&key)).await.status, 200);
    let r = api
        .call(
            Method::DELETE,
            &format!("/v1/keys/{id}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(
        (r.status, &r.body["state"]),
        (200, &json!("revoked")),
        "{r:#?}"
    );
    let r = api.get("/v1/accounts/acme", Some(&key)).await;
    problem(&r, 401, "unauthorized");
    assert!(r.body["detail"].as_str().unwrap().contains("revoked"));
    let r = api
        .post(
            "/v1/batches",
            Some(&key),
            request("b-revoked", "acme", 1, 5),
        )
        .await;
    problem(&r, 401, "unauthorized");
    assert!(t.ledger.batch("b-revoked").await.unwrap().is_none());

    // Revoked by another process (`holdfast key revoke`, here the store on
    // the test's own pool): refused within HOLDFAST_API_KEY_CACHE_SECS.
    let other = t.api_key(Scope::Reader, &["acme"]).await;
    let other_id = &other["hf_live_".len().."hf_live_".len() + 12];
    assert_eq!(api.get("/v1/accounts/acme", Some(&other)).await.status, 200);
    KeyStore::new(t.ledger.pool().clone())
        .revoke(other_id)
        .await
        .unwrap();
    let revoked_at = std::time::Instant::now();
    eventually("the revocation reaches the API", || async {
        (api.get("/v1/accounts/acme", Some(&other)).await.status == 401).then_some(())
    })
    .await;
    assert!(
        revoked_at.elapsed() < Duration::from_secs(3),
        "{:?}",
        revoked_at.elapsed()
    );

    // Expired: accepted until its time, refused after, whatever the cache says.
    let store = KeyStore::new(t.ledger.pool().clone());
    let spec = KeySpec {
        scope: Scope::Producer,
        accounts: Accounts::Only(vec!["acme".into()]),
        expires_at: Some(chrono::Utc::now() + chrono::Duration::milliseconds(1500)),
        name: None,
    };
    let expiring = store.create(&spec).await.unwrap().key;
    assert_eq!(
        api.get("/v1/accounts/acme", Some(&expiring)).await.status,
        200
    );
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let r = api.get("/v1/accounts/acme", Some(&expiring)).await;
    problem(&r, 401, "unauthorized");
    assert!(
        r.body["detail"].as_str().unwrap().contains("expired"),
        "{r:#?}"
    );
    let listed: Vec<Value> =
        serde_json::from_value(api.get("/v1/keys", Some(&admin)).await.body).unwrap();
    let states: Vec<&str> = listed
        .iter()
        .map(|k| k["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["active", "revoked", "revoked", "expired"]);
    assert_eq!(t.available("acme").await, 100);
    t.stop().await;
}

#[tokio::test]
async fn a_key_without_the_scope_or_the_account_is_403_whether_the_account_exists_or_not() {
    let t = TestFleet::start_with(settings(), Roles::ALL, None).await;
    t.grant("acme", 1_000).await;
    let api = Client::of(&t);
    let reader = t.api_key(Scope::Reader, &["acme"]).await;
    let producer = t.api_key(Scope::Producer, &["acme"]).await;
    let everywhere = t.api_key(Scope::Producer, &[]).await;

    // A reader reads, and may not change anything.
    assert_eq!(
        api.get("/v1/accounts/acme", Some(&reader)).await.status,
        200
    );
    for (method, path, body) in [
        (Method::POST, "/v1/preview", Some(preview("acme"))),
        (
            Method::POST,
            "/v1/batches",
            Some(request("b-reader", "acme", 1, 5)),
        ),
        (
            Method::POST,
            "/v1/reservations",
            Some(json!({"account_id": "acme", "amount": 5})),
        ),
        (
            Method::POST,
            "/v1/accounts/acme/grants",
            Some(json!({"amount": 5})),
        ),
        (Method::POST, "/v1/keys", Some(json!({"scope": "admin"}))),
    ] {
        let r = api.call(method.clone(), path, Some(&reader), body).await;
        problem(&r, 403, "insufficient-scope");
        assert!(
            r.body["detail"].as_str().unwrap().contains("reader"),
            "{r:#?}"
        );
    }
    // A producer may not grant, nor manage keys.
    for (method, path) in [
        (Method::POST, "/v1/accounts/acme/grants"),
        (Method::GET, "/v1/keys"),
    ] {
        let r = api
            .call(method, path, Some(&producer), Some(json!({"amount": 5})))
            .await;
        problem(&r, 403, "insufficient-scope");
    }

    // Another account: the same 403 before and after it exists.
    let refused = |r: Reply| {
        problem(&r, 403, "account-not-allowed");
        r.body
    };
    let calls = || async {
        vec![
            refused(api.get("/v1/accounts/beta", Some(&producer)).await),
            refused(
                api.post("/v1/preview", Some(&producer), preview("beta"))
                    .await,
            ),
            refused(
                api.post(
                    "/v1/batches",
                    Some(&producer),
                    request("b-beta", "beta", 1, 5),
                )
                .await,
            ),
            refused(
                api.post(
                    "/v1/reservations",
                    Some(&producer),
                    json!({"account_id": "beta", "amount": 5}),
                )
                .await,
            ),
            refused(api.get("/v1/batches/b-of-beta", Some(&producer)).await),
            refused(
                api.post("/v1/batches/b-of-beta/cancel", Some(&producer), json!({}))
                    .await,
            ),
        ]
    };
    let before = calls().await;
    assert!(matches!(
        t.ledger.account("beta").await,
        Err(holdfast_common::ledger::LedgerError::UnknownAccount(_))
    ));
    t.grant("beta", 1_000).await;
    let r = api
        .post(
            "/v1/batches",
            Some(&everywhere),
            request("b-of-beta", "beta", 2, 5),
        )
        .await;
    assert_eq!(r.status, 201, "{r:#?}");
    let after = calls().await;
    assert_eq!(
        before, after,
        "the answer does not say whether the account or batch exists"
    );

    // A soft hold of beta: its id is as closed to the acme key as a made-up one.
    let r = api
        .post(
            "/v1/reservations",
            Some(&everywhere),
            json!({"account_id": "beta", "amount": 5}),
        )
        .await;
    let hold = r.body["reservation_id"].as_str().unwrap().to_string();
    let mut answers = Vec::new();
    for id in [hold.as_str(), "00000000-0000-0000-0000-000000000000"] {
        for method in [Method::GET, Method::DELETE] {
            let r = api
                .call(
                    method,
                    &format!("/v1/reservations/{id}"),
                    Some(&producer),
                    None,
                )
                .await;
            problem(&r, 403, "account-not-allowed");
            answers.push(r.body["detail"].as_str().unwrap().replace(id, "<id>"));
        }
    }
    answers.dedup();
    assert_eq!(answers.len(), 1, "{answers:?}");
    // A key of every account sees that a made-up id does not exist.
    let r = api
        .get("/v1/batches/no-such-batch", Some(&everywhere))
        .await;
    problem(&r, 404, "unknown-batch");

    // Nothing of beta's was touched by the refused calls: it has the batch
    // (10, captured) and the soft hold (5) of the key that may use it.
    assert_eq!(t.wait_closed("b-of-beta").await.state, "completed");
    let beta = t.ledger.account("beta").await.unwrap();
    assert_eq!((beta.balance, beta.held), (1_000 - 10, 5));
    assert!(t.ledger.batch("b-beta").await.unwrap().is_none());
    assert!(t.ledger.batch("b-reader").await.unwrap().is_none());
    // The acme key does its own work.
    let r = api
        .post(
            "/v1/batches",
            Some(&producer),
            request("b-acme", "acme", 2, 5),
        )
        .await;
    assert_eq!(r.status, 201, "{r:#?}");
    assert_eq!(t.wait_closed("b-acme").await.state, "completed");
    t.assert_exact().await;
    t.stop().await;
}

#[tokio::test]
async fn admins_create_list_and_revoke_keys_over_http() {
    let t = TestFleet::start_with(settings(), Roles::ALL, None).await;
    t.grant("acme", 100).await;
    let api = Client::of(&t);

    // The bootstrap admin token makes the first key.
    let r = api
        .post(
            "/v1/keys",
            Some(ADMIN_TOKEN),
            json!({"scope": "producer", "accounts": ["acme"], "expires_in_days": 30, "name": "shop"}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:#?}");
    let key = r.body["key"].as_str().unwrap().to_string();
    let id = r.body["id"].as_str().unwrap().to_string();
    assert!(key.starts_with(&format!("hf_live_{id}_")));
    assert_eq!(
        (
            r.body["scope"].as_str(),
            r.body["state"].as_str(),
            r.body["accounts"].clone()
        ),
        (Some("producer"), Some("active"), json!(["acme"]))
    );
    let secret = &key[key.len() - 40..];

    // It works, and its use is recorded (coarsely).
    assert_eq!(
        api.post("/v1/preview", Some(&key), preview("acme"))
            .await
            .status,
        200
    );
    let shown = api.get(&format!("/v1/keys/{id}"), Some(ADMIN_TOKEN)).await;
    assert_eq!(shown.status, 200);
    assert!(shown.body["last_used_at"].is_string(), "{shown:#?}");
    assert!(shown.body.get("key").is_none());
    let listed = api.get("/v1/keys", Some(ADMIN_TOKEN)).await;
    assert_eq!(listed.status, 200);
    assert!(!listed.body.to_string().contains(secret));

    // Bad requests name their fields.
    for (body, field) in [
        (json!({"scope": "producer"}), "accounts"),
        (json!({"scope": "admin", "accounts": ["acme"]}), "accounts"),
        (json!({"scope": "owner", "all_accounts": true}), "scope"),
        (
            json!({"scope": "reader", "all_accounts": true, "expires_in_days": 0}),
            "expires_in_days",
        ),
    ] {
        let r = api.post("/v1/keys", Some(ADMIN_TOKEN), body.clone()).await;
        problem(&r, 400, "invalid-request");
        assert_eq!(r.body["errors"][0]["field"], field, "{body}");
    }
    let r = api.get("/v1/keys/nosuchkey123", Some(ADMIN_TOKEN)).await;
    problem(&r, 404, "not-found");

    // Revoked: refused at once; revoking again answers the key as it is.
    let r = api
        .call(
            Method::DELETE,
            &format!("/v1/keys/{id}"),
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(r.body["state"], "revoked");
    let again = api
        .call(
            Method::DELETE,
            &format!("/v1/keys/{id}"),
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(again.body["revoked_at"], r.body["revoked_at"]);
    problem(
        &api.post("/v1/preview", Some(&key), preview("acme")).await,
        401,
        "unauthorized",
    );
    t.stop().await;
}

#[tokio::test]
async fn the_openapi_document_names_the_scope_of_every_operation_as_the_server_enforces_it() {
    let t = TestFleet::start_with(settings(), Roles::ALL, None).await;
    let api = Client::of(&t);
    let doc = api.get("/openapi.json", None).await.body;
    let scheme = &doc["components"]["securitySchemes"]["api_key"];
    assert_eq!(
        (scheme["type"].as_str(), scheme["scheme"].as_str()),
        (Some("http"), Some("bearer"))
    );
    let keys = [
        (Scope::Reader, t.api_key(Scope::Reader, &[]).await),
        (Scope::Producer, t.api_key(Scope::Producer, &[]).await),
        (Scope::Admin, t.api_key(Scope::Admin, &[]).await),
    ];
    let mut v1 = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let method: Method = method.to_uppercase().parse().unwrap();
            let security = &op["security"];
            if !path.starts_with("/v1/") {
                assert!(security.is_null(), "{method} {path} is open: {security}");
                continue;
            }
            v1 += 1;
            let roles = security[0]["api_key"].as_array().expect("api_key security");
            assert_eq!(roles.len(), 1, "{method} {path}");
            let needed: Scope = roles[0].as_str().unwrap().parse().unwrap();
            for status in ["401", "403", "429"] {
                assert!(
                    op["responses"][status].is_object(),
                    "{method} {path} documents {status}"
                );
            }
            assert!(op["responses"]["401"]["headers"]["WWW-Authenticate"].is_object());
            assert!(op["responses"]["429"]["headers"]["Retry-After"].is_object());
            // The server asks for exactly that scope.
            let url = path
                .replace("{grant_id}", "g")
                .replace("{allowance_id}", "a")
                .replace("{spender_id}", "s")
                .replace("{id}", "nothing-here");
            let r = api.call(method.clone(), &url, None, Some(json!({}))).await;
            problem(&r, 401, "unauthorized");
            for (scope, key) in &keys {
                let r = api
                    .call(method.clone(), &url, Some(key), Some(json!({})))
                    .await;
                let refused = r.body["type"] == "urn:holdfast:problem:insufficient-scope";
                assert_eq!(
                    refused,
                    !scope.allows(needed),
                    "{method} {path} with a {scope} key (needs {needed}): {r:#?}"
                );
            }
        }
    }
    assert_eq!(v1, 21, "every /v1 operation was checked");
    t.stop().await;
}

#[tokio::test]
async fn a_key_over_its_rate_is_429_with_retry_after_and_other_keys_are_not() {
    let mut s = settings();
    s.api.http_key_rate = 1;
    s.api.http_key_burst = 3;
    let t = TestFleet::start_with(s, Roles::ALL, None).await;
    t.grant("acme", 100).await;
    let api = Client::of(&t);
    let busy = t.api_key(Scope::Reader, &["acme"]).await;
    let calm = t.api_key(Scope::Reader, &["acme"]).await;

    // Requests without a valid key are refused before they are counted.
    for _ in 0..5 {
        problem(
            &api.get("/v1/accounts/acme", None).await,
            401,
            "unauthorized",
        );
    }
    for _ in 0..3 {
        assert_eq!(api.get("/v1/accounts/acme", Some(&busy)).await.status, 200);
    }
    let r = api
        .http
        .get(format!("{}/v1/accounts/acme", api.base))
        .bearer_auth(&busy)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "Retry-After: {retry}");
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["type"], "urn:holdfast:problem:rate-limited");
    // Every route counts, a refused one too; the other key has its own budget.
    let r = api.post("/v1/preview", Some(&busy), preview("acme")).await;
    problem(&r, 429, "rate-limited");
    assert_eq!(api.get("/v1/accounts/acme", Some(&calm)).await.status, 200);
    // After the wait it is served again.
    tokio::time::sleep(Duration::from_secs(retry)).await;
    assert_eq!(api.get("/v1/accounts/acme", Some(&busy)).await.status, 200);
    t.stop().await;
}
