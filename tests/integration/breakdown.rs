//! Decisions explain the credits: a preview and the decision that follows
//! name the same grants in burn-down order, the sentence says where the
//! credits come from, credits expiring before the batch's deadline are
//! announced, and a decision never names grants its hold did not take, even
//! when the grants change between the pricing read and the hold.

use crate::support;

use holdfast::fleet::{HttpAddr, Roles};
use holdfast_common::ledger::{GrantSource, GrantSpec};
use holdfast_common::messages::{BatchRequest, Decision, Draw};
use holdfast_coordinator::keys::Scope;
use serde_json::{json, Value};
use support::*;

fn spec(id: &str, amount: i64, source: GrantSource, expires_in_days: Option<i64>) -> GrantSpec {
    GrantSpec {
        grant_id: Some(id.into()),
        amount,
        source,
        expires_at: expires_in_days.map(|d| chrono::Utc::now() + chrono::Duration::days(d)),
        ..GrantSpec::default()
    }
}

fn drawn(draws: &[Draw]) -> Vec<(&str, i64)> {
    draws
        .iter()
        .map(|d| (d.grant_id.as_str(), d.amount))
        .collect()
}

#[tokio::test]
async fn a_preview_and_its_decision_name_the_same_grants() {
    let mut settings = fast_settings();
    settings.http_addr = HttpAddr(Some("127.0.0.1:0".parse().unwrap()));
    // Deadlines a week out: the allowance below expires before that.
    settings.coordinator.execution_timeout_secs = 7 * 24 * 3600;
    let mut t = TestFleet::start_with(settings, Roles::ALL, None).await;
    for g in [
        spec("topup", 100, GrantSource::Purchase, None),
        spec("allowance", 80, GrantSource::Plan, Some(3)),
    ] {
        t.ledger.add_grant("acme", &g, true).await.unwrap();
    }
    let base = format!("http://{}", t.fleets[0].http_addr().unwrap());

    let req = request("b1", "acme", 10, 12);
    let key = t.api_key(Scope::Producer, &["acme"]).await;
    let preview: Value = reqwest::Client::new()
        .post(format!("{base}/v1/preview"))
        .bearer_auth(&key)
        .json(&json!({"account_id": "acme", "items": req["items"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let message = preview["message"].as_str().unwrap();
    assert!(
        message.starts_with(
            "This action will cost ~120 credits: 80 from your plan allowance (resets on "
        ) && message.ends_with("), 40 from top-ups. You have 180 credits."),
        "{message}"
    );
    let breakdown: Vec<Draw> = serde_json::from_value(preview["breakdown"].clone()).unwrap();
    assert_eq!(drawn(&breakdown), [("allowance", 80), ("topup", 40)]);
    assert!(
        preview["expiry_notice"]
            .as_str()
            .is_some_and(|n| n.starts_with("80 of these credits expire on ")),
        "{preview}"
    );

    let Decision::Granted(g) = t.submit(&req).await else {
        panic!("expected a grant")
    };
    assert_eq!(
        g.breakdown, breakdown,
        "the decision draws what the preview said"
    );
    assert!(
        g.message
            .starts_with("120 credits held: 80 from your plan allowance"),
        "{}",
        g.message
    );
    assert!(g.expiry_notice.is_some());
    // ...and the hold took exactly that.
    let client = t.ledger.pool().get().await.unwrap();
    let taken: Vec<(String, i64)> = client
        .query(
            "SELECT al.grant_id, al.amount FROM hold_allocations al
             JOIN batches b ON b.hold_id = al.hold_id WHERE b.id = 'b1' ORDER BY al.amount DESC",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        taken,
        [("allowance".to_string(), 80), ("topup".to_string(), 40)]
    );

    // Short: the first-fit option's draw comes with the denial.
    let Decision::Insufficient(d) = t.submit(&request("b2", "acme", 10, 12)).await else {
        panic!("expected insufficient")
    };
    assert_eq!((d.available, d.first_fit.cost), (60, 60));
    assert_eq!(drawn(&d.breakdown), [("topup", 60)]);
    t.assert_exact().await;
    t.stop().await;
}

/// Another transaction adds a promotion (used first) after the group read
/// the grants and before it took them: the database refuses the stale plan,
/// and the batch is priced again under the account lock, so its decision
/// names the promotion it really drew from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_priced_on_grants_that_changed_is_priced_again() {
    let t = TestFleet::start_with(fast_settings(), Roles::default(), None).await;
    t.ledger
        .add_grant("hot", &spec("base", 100, GrantSource::Manual, None), true)
        .await
        .unwrap();

    let mut other = t.ledger.pool().get().await.unwrap();
    let tx = other.transaction().await.unwrap();
    tx.batch_execute(
        "SELECT 1 FROM accounts WHERE id = 'hot' FOR NO KEY UPDATE;
         INSERT INTO grants (account_id, id, amount, remaining, source)
         VALUES ('hot', 'promo', 30, 30, 'promotion');
         INSERT INTO journal (account_id, grant_id, kind, amount, balance_delta)
         VALUES ('hot', 'promo', 'grant', 30, 30);
         UPDATE accounts SET balance = balance + 30 WHERE id = 'hot';",
    )
    .await
    .unwrap();

    let ledger = t.ledger.clone();
    let decide = tokio::spawn(async move {
        let req: BatchRequest = serde_json::from_value(request("late", "hot", 5, 10)).unwrap();
        ledger
            .reserve_many(&[reserve_input(&req, WAIT, WAIT)])
            .await
            .pop()
            .unwrap()
    });
    let watcher = t.ledger.pool().get().await.unwrap();
    eventually("the group waits for the account row", || async {
        let n: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (n > 0).then_some(())
    })
    .await;
    tx.commit().await.unwrap();

    let decided = decide.await.unwrap().expect("decided, not failed");
    let Decision::Granted(g) = decided.decision else {
        panic!("expected a grant, got {:?}", decided.decision)
    };
    assert_eq!(drawn(&g.breakdown), [("promo", 30), ("base", 20)]);
    t.assert_exact().await;
}

/// Several holds on one account in one group decision: each takes the
/// grants' credits from where the one before it stopped, in burn-down order,
/// and the allocations and journal rows are exactly the draws the decisions
/// name (one row per hold and grant touched).
#[tokio::test]
async fn holds_of_one_group_draw_the_grants_one_after_another() {
    let t = TestFleet::start_with(fast_settings(), Roles::default(), None).await;
    for g in [
        spec("topup", 50, GrantSource::Purchase, None),
        spec("promo", 25, GrantSource::Promotion, None),
        spec("plan", 30, GrantSource::Plan, Some(10)),
    ] {
        t.ledger.add_grant("acme", &g, true).await.unwrap();
    }
    // 10, 30, 20 and 40 credits fit the 105; the last 10 do not fit the 5 left.
    let requests: Vec<BatchRequest> = [("r1", 1), ("r2", 3), ("r3", 2), ("r4", 4), ("r5", 1)]
        .iter()
        .map(|(id, n)| serde_json::from_value(request(id, "acme", *n, 10)).unwrap())
        .collect();
    let inputs: Vec<_> = requests
        .iter()
        .map(|r| reserve_input(r, WAIT, WAIT))
        .collect();
    let decided: Vec<Decision> = t
        .ledger
        .reserve_many(&inputs)
        .await
        .into_iter()
        .map(|d| d.expect("decided").decision)
        .collect();

    let expected: [&[(&str, i64)]; 4] = [
        &[("plan", 10)],
        &[("plan", 20), ("promo", 10)],
        &[("promo", 15), ("topup", 5)],
        &[("topup", 40)],
    ];
    let client = t.ledger.pool().get().await.unwrap();
    for (decision, want) in decided.iter().zip(expected) {
        let Decision::Granted(g) = decision else {
            panic!("expected a grant, got {decision:?}")
        };
        assert_eq!(drawn(&g.breakdown), want, "{}", g.batch_id);
        let hold: uuid::Uuid = g.hold_id.parse().unwrap();
        let rows = client
            .query(
                "SELECT a.grant_id, a.amount, (SELECT sum(j.held_delta)::int8 FROM journal j
                        WHERE j.hold_id = a.hold_id AND j.grant_id = a.grant_id AND j.kind = 'hold')
                 FROM hold_allocations a JOIN grants g ON g.account_id = a.account_id AND g.id = a.grant_id
                 WHERE a.hold_id = $1
                 ORDER BY g.priority, g.expires_at NULLS LAST, g.source_rank, g.effective_at, g.id",
                &[&hold],
            )
            .await
            .unwrap();
        let rows: Vec<(String, i64, i64)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        let want: Vec<(String, i64, i64)> = want
            .iter()
            .map(|(id, amount)| (id.to_string(), *amount, *amount))
            .collect();
        assert_eq!(rows, want, "allocations and journal of {}", g.batch_id);
    }
    // All in one transaction, so one `holdfast_take` for the account: a
    // group that the database refused would be decided request by request,
    // one hold per call, and hide a wrong draw after the first hold.
    let transactions: i64 = client
        .query_one(
            "SELECT count(DISTINCT xmin::text) FROM holds WHERE account_id = 'acme'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(transactions, 1, "the group was decided in one transaction");
    let Decision::Insufficient(short) = &decided[4] else {
        panic!(
            "expected the last request to be short, got {:?}",
            decided[4]
        )
    };
    assert_eq!(short.available, 5);
    let held: Vec<(String, i64)> = t
        .ledger
        .grants("acme")
        .await
        .unwrap()
        .into_iter()
        .map(|g| (g.grant_id, g.held))
        .collect();
    assert_eq!(
        held,
        [
            ("plan".into(), 30),
            ("promo".into(), 25),
            ("topup".into(), 45)
        ]
    );
    t.assert_exact().await;
}
