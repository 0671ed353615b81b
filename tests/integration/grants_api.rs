//! Grants over HTTP and the command line: every field of a grant goes in and
//! comes back in the account view, in burn-down order; a `grant_id` replays
//! with the same terms and conflicts with others; bad fields are named; a
//! void takes what is left and nothing a hold took.

use crate::support;

use holdfast::fleet::{HttpAddr, Roles};
use holdfast_coordinator::keys::Scope;
use serde_json::{json, Value};
use support::*;

const TOKEN: &str = "grant-admin-token";

#[tokio::test]
async fn grants_over_http_keep_their_terms_order_and_idempotency() {
    let mut settings = fast_settings();
    settings.http_addr = HttpAddr(Some("127.0.0.1:0".parse().unwrap()));
    settings.api.admin_token = Some(TOKEN.into());
    let t = TestFleet::start_with(settings, Roles::ALL, None).await;
    let base = format!("http://{}", t.fleets[0].http_addr().unwrap());
    // A producer key for the reads and holds; the admin token for grants.
    let key = t.api_key(Scope::Producer, &["acme"]).await;
    let http = reqwest::Client::new();
    let post = |body: Value| {
        http.post(format!("{base}/v1/accounts/acme/grants"))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
    };

    let in_a_week = (chrono::Utc::now() + chrono::Duration::days(7)).to_rfc3339();
    let in_a_year = (chrono::Utc::now() + chrono::Duration::days(365)).to_rfc3339();
    let grants = [
        json!({"amount": 300, "grant_id": "manual", "create": true}),
        json!({"amount": 200, "grant_id": "topup", "source": "purchase", "expires_at": in_a_year, "note": "invoice 7"}),
        json!({"amount": 50, "grant_id": "promo", "source": "promotion", "expires_at": in_a_week}),
        json!({"amount": 1000, "grant_id": "plan", "source": "plan", "priority": 1}),
    ];
    for g in &grants {
        let r = post(g.clone()).await.unwrap();
        assert_eq!(r.status(), 200, "{g}");
    }
    let view: Value = post(grants[1].clone()).await.unwrap().json().await.unwrap();
    assert_eq!(view["balance"], 1550, "a replay adds nothing: {view}");
    assert_eq!(view["available"], 1550);
    let order: Vec<&str> = view["grants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["grant_id"].as_str().unwrap())
        .collect();
    // Priority 0 before 1; soonest expiry first; never-expiring last.
    assert_eq!(order, ["promo", "topup", "manual", "plan"]);
    let topup = &view["grants"][1];
    assert_eq!(
        (
            topup["source"].as_str(),
            topup["amount"].as_i64(),
            topup["remaining"].as_i64(),
            topup["held"].as_i64(),
            topup["note"].as_str(),
            topup["state"].as_str()
        ),
        (
            Some("purchase"),
            Some(200),
            Some(200),
            Some(0),
            Some("invoice 7"),
            Some("active")
        )
    );

    // The same grant_id with other terms: 409, nothing added.
    let r = post(json!({"amount": 999, "grant_id": "topup", "source": "purchase"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let problem: Value = r.json().await.unwrap();
    assert!(
        problem["detail"].as_str().unwrap().contains("topup"),
        "{problem}"
    );

    // Each bad field is named.
    for (body, field) in [
        (json!({"amount": 5, "source": "gift"}), "source"),
        (
            json!({"amount": 5, "expires_at": "2020-01-01T00:00:00Z"}),
            "expires_at",
        ),
        (
            json!({"amount": 5, "expires_at": "next tuesday"}),
            "expires_at",
        ),
        (json!({"amount": 5, "priority": 1u64 << 40}), "priority"),
        (
            json!({"amount": 5, "grant_id": "x".repeat(129)}),
            "grant_id",
        ),
        (json!({"amount": 5, "grant_id": 7}), "grant_id"),
        (json!({"amount": 0}), "amount"),
    ] {
        let r = post(body.clone()).await.unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let problem: Value = r.json().await.unwrap();
        let fields: Vec<&str> = problem["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["field"].as_str().unwrap())
            .collect();
        assert_eq!(fields, [field], "{body}: {problem}");
    }

    // A soft hold takes from the first grants in order; a void of `topup`
    // takes what is left of it, not what the hold took.
    let r = http
        .post(format!("{base}/v1/reservations"))
        .bearer_auth(&key)
        .json(&json!({"account_id": "acme", "amount": 120, "ttl_seconds": 600}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let r = http
        .delete(format!("{base}/v1/accounts/acme/grants/topup"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let topup: Value = r.json().await.unwrap();
    // promo gave 50, topup 70: 130 of it was left to void.
    assert_eq!(
        (
            topup["state"].as_str(),
            topup["remaining"].as_i64(),
            topup["held"].as_i64()
        ),
        (Some("voided"), Some(70), Some(70))
    );
    let r = http
        .delete(format!("{base}/v1/accounts/acme/grants/nosuch"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let view: Value = http
        .get(format!("{base}/v1/accounts/acme"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (
            view["balance"].as_i64(),
            view["held"].as_i64(),
            view["available"].as_i64()
        ),
        (Some(1420), Some(120), Some(1300))
    );
    t.assert_exact().await;
    t.stop().await;
}

#[tokio::test]
async fn account_grant_takes_every_term_on_the_command_line() {
    let t = TestFleet::start_with(fast_settings(), Roles::default(), None).await;
    let url = t.conn.database_url.clone();
    let run = |args: &[&str]| {
        let mut command = holdfast_command();
        command.env("HOLDFAST_DATABASE_URL", &url).args(args);
        async move {
            let out = command.output().await.unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };
    let (code, _, err) = run(&[
        "account",
        "grant",
        "acme",
        "100",
        "--create",
        "--source",
        "purchase",
        "--priority",
        "-1",
        "--expires-in",
        "3600",
        "--grant-id",
        "topup",
        "--note",
        "invoice 7",
    ])
    .await;
    assert_eq!(code, Some(0), "{err}");
    let at = "2030-01-01T00:00:00Z";
    let args = [
        "account",
        "grant",
        "acme",
        "40",
        "--source",
        "promotion",
        "--expires-at",
        at,
        "--grant-id",
        "promo",
    ];
    assert_eq!(run(&args).await.0, Some(0));
    let (code, out, _) = run(&args).await;
    assert_eq!(code, Some(0));
    assert!(out.contains("nothing added"), "{out}");
    let (code, _, err) = run(&["account", "grant", "acme", "40", "--grant-id", "promo"]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("other terms"), "{err}");
    let (code, _, err) = run(&["account", "grant", "acme", "5", "--source", "gift"]).await;
    assert_eq!(code, Some(2));
    assert!(err.contains("plan, purchase, promotion or manual"), "{err}");
    let (code, _, err) = run(&["account", "grant", "acme", "5", "--expires-at", "soon"]).await;
    assert_eq!(code, Some(2));
    assert!(err.contains("RFC 3339"), "{err}");

    let (code, out, _) = run(&["account", "show", "acme", "--json"]).await;
    assert_eq!(code, Some(0));
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["balance"], 140);
    let grants = v["grants"].as_array().unwrap();
    assert_eq!(
        grants
            .iter()
            .map(|g| (
                g["grant_id"].as_str().unwrap(),
                g["priority"].as_i64().unwrap()
            ))
            .collect::<Vec<_>>(),
        [("topup", -1), ("promo", 0)]
    );
    assert_eq!(grants[1]["expires_at"], "2030-01-01T00:00:00.000Z");
    assert_eq!(grants[0]["note"], "invoice 7");

    let (code, out, _) = run(&["account", "void", "acme", "topup", "--json"]).await;
    assert_eq!(code, Some(0));
    let g: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (g["state"].as_str(), g["remaining"].as_i64()),
        (Some("voided"), Some(0))
    );
    assert_eq!(t.available("acme").await, 40);
    t.assert_exact().await;
    t.stop().await;
}
