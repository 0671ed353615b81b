//! Every route that adds credits, creates accounts or manages keys needs the
//! admin scope: each operation the OpenAPI document marks `api_key: [admin]`
//! answers 401 without a credential and with a wrong one, and 403 to a
//! producer key; the reference page's grant needs a key and is off unless
//! the server enables it. None of the refused calls changes the ledger.

use crate::support;

use holdfast::fleet::{HttpAddr, Roles};
use holdfast_common::ledger::{AllowanceSpec, AllowanceTerms, GrantSpec, Period};
use holdfast_coordinator::keys::Scope;
use serde_json::{json, Value};
use support::*;

const TOKEN: &str = "the-admin-token";

#[tokio::test]
async fn admin_operations_refuse_a_missing_or_wrong_token() {
    let mut settings = fast_settings();
    settings.http_addr = HttpAddr(Some("127.0.0.1:0".parse().unwrap()));
    settings.api.admin_token = Some(TOKEN.into());
    let t = TestFleet::start_with(settings, Roles::ALL, None).await;
    let spec = GrantSpec {
        grant_id: Some("g1".into()),
        ..GrantSpec::manual(100)
    };
    t.ledger.add_grant("acme", &spec, true).await.unwrap();
    // An allowance whose first period is a month away: nothing to issue meanwhile.
    let pro = AllowanceSpec {
        allowance_id: Some("pro".into()),
        terms: AllowanceTerms {
            amount: 500,
            period: Period::Month,
            rollover_cap: 0,
        },
        anchor: Some(chrono::Utc::now() + chrono::Duration::days(30)),
    };
    t.ledger.create_allowance("acme", &pro).await.unwrap();
    let base = format!("http://{}", t.fleets[0].http_addr().unwrap());
    let http = reqwest::Client::new();

    let doc: Value = http
        .get(format!("{base}/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut admin_ops = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let secured = op["security"].as_array().is_some_and(|s| {
                s.iter()
                    .any(|r| r["api_key"].as_array().is_some_and(|a| a == &["admin"]))
            });
            if secured {
                let path = path
                    .replace("/v1/keys/{id}", "/v1/keys/abcdefghijkl")
                    .replace("{id}", "acme")
                    .replace("{grant_id}", "g1")
                    .replace("{allowance_id}", "pro")
                    .replace("{spender_id}", "design");
                admin_ops.push((method.to_uppercase(), path));
            }
        }
    }
    assert_eq!(
        admin_ops,
        [
            (
                "POST".to_string(),
                "/v1/accounts/acme/allowances".to_string()
            ),
            (
                "DELETE".to_string(),
                "/v1/accounts/acme/allowances/pro".to_string()
            ),
            (
                "PUT".to_string(),
                "/v1/accounts/acme/allowances/pro".to_string()
            ),
            ("POST".to_string(), "/v1/accounts/acme/grants".to_string()),
            (
                "DELETE".to_string(),
                "/v1/accounts/acme/grants/g1".to_string()
            ),
            ("GET".to_string(), "/v1/accounts/acme/spenders".to_string()),
            (
                "DELETE".to_string(),
                "/v1/accounts/acme/spenders/design".to_string()
            ),
            (
                "GET".to_string(),
                "/v1/accounts/acme/spenders/design".to_string()
            ),
            (
                "PUT".to_string(),
                "/v1/accounts/acme/spenders/design".to_string()
            ),
            ("GET".to_string(), "/v1/keys".to_string()),
            ("POST".to_string(), "/v1/keys".to_string()),
            ("DELETE".to_string(), "/v1/keys/abcdefghijkl".to_string()),
            ("GET".to_string(), "/v1/keys/abcdefghijkl".to_string()),
        ],
        "the admin operations; a new one must be added to this test"
    );

    let body = json!({"amount": 1_000, "create": true, "scope": "admin"});
    let producer = t.api_key(Scope::Producer, &["acme"]).await;
    let reader = t.api_key(Scope::Reader, &[]).await;
    for (method, path) in &admin_ops {
        let url = format!("{base}{path}");
        let method: reqwest::Method = method.parse().unwrap();
        for auth in [
            None,
            Some("Bearer wrong"),
            Some("Basic dGhlLWFkbWluLXRva2Vu"),
            Some("Bearer "),
        ] {
            let mut req = http.request(method.clone(), &url).json(&body);
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 401, "{method} {path} with {auth:?}");
            assert!(r.headers().contains_key("www-authenticate"));
        }
        // Keys of the other scopes: authenticated, but not allowed.
        for key in [&producer, &reader] {
            let r = http
                .request(method.clone(), &url)
                .bearer_auth(key)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 403, "{method} {path}");
            let problem: Value = r.json().await.unwrap();
            assert_eq!(problem["type"], "urn:holdfast:problem:insufficient-scope");
        }
        // The same call for an account that does not exist: not created.
        let r = http
            .request(method.clone(), url.replace("acme", "newcomer"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }

    // The reference page's grant needs a key, and HOLDFAST_DEMO_GRANTS=1.
    let demo = json!({"account_id": "acme", "amount": 10});
    let r = http
        .post(format!("{base}/demo/grant"))
        .json(&demo)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .post(format!("{base}/demo/grant"))
        .bearer_auth(&producer)
        .json(&demo)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let problem: Value = r.json().await.unwrap();
    assert_eq!(problem["type"], "urn:holdfast:problem:demo-grants-disabled");
    assert_eq!(
        t.api_key(Scope::Admin, &[]).await.len(),
        producer.len(),
        "no refused call created a key"
    );
    let client = holdfast_coordinator::keys::KeyStore::new(t.ledger.pool().clone());
    assert_eq!(client.list().await.unwrap().len(), 3);

    assert_eq!(
        t.available("acme").await,
        100,
        "no refused call granted anything"
    );
    assert!(matches!(
        t.ledger.account("newcomer").await,
        Err(holdfast_common::ledger::LedgerError::UnknownAccount(_))
    ));
    let allowances = t.ledger.allowances("acme").await.unwrap();
    assert_eq!(
        (
            allowances.len(),
            allowances[0].amount,
            allowances[0].state.as_str()
        ),
        (1, 500, "active"),
        "no refused call created, changed or stopped an allowance"
    );
    // With the token it works: the refusals above were about the token.
    let r = http
        .post(format!("{base}/v1/accounts/acme/grants"))
        .bearer_auth(TOKEN)
        .json(&json!({"amount": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(t.available("acme").await, 105);
    let r = http
        .delete(format!("{base}/v1/accounts/acme/grants/g1"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let voided: Value = r.json().await.unwrap();
    assert_eq!(
        (voided["state"].as_str(), voided["remaining"].as_i64()),
        (Some("voided"), Some(0))
    );
    assert_eq!(t.available("acme").await, 5);
    let allowances = format!("{base}/v1/accounts/acme/allowances");
    let r = http
        .post(&allowances)
        .bearer_auth(TOKEN)
        .json(&json!({"amount": 5, "period": "week", "anchor": "2099-01-01T00:00:00Z"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = http
        .put(format!("{allowances}/pro"))
        .bearer_auth(TOKEN)
        .json(&json!({"amount": 600, "period": "month"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .delete(format!("{allowances}/pro"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let stopped: Value = r.json().await.unwrap();
    assert_eq!(
        (stopped["state"].as_str(), stopped["amount"].as_i64()),
        (Some("stopped"), Some(600))
    );
    t.stop().await;
}
