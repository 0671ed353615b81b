//! Spenders: a batch charged to a spender fits only if the account and every
//! spender from it up to its root cover it, all or nothing; the decision
//! names the level that binds, with k of N against it; captures count as the
//! period's usage at every level and the release gives the rest back to
//! every level; soft holds and sequential chunks count the same way; the
//! tree refuses cycles and depth past 8; the audit recomputes every
//! spender's usage from the holds.

use crate::support;

use std::time::Duration;

use holdfast::fleet::Roles;
use holdfast_common::ledger::{
    ItemOutcome, Ledger, LedgerError, Settlement, SpenderSpec, MAX_SPENDER_DEPTH,
};
use holdfast_common::messages::{BatchRequest, Decision, LevelKind, LimitPeriod};
use serde_json::json;
use support::*;

const LONG: Duration = Duration::from_secs(3600);

async fn ledger_only() -> TestFleet {
    TestFleet::start_with(fast_settings(), Roles::default(), None).await
}

fn member(parent: &str, limit: i64) -> SpenderSpec {
    SpenderSpec {
        parent: Some(parent.into()),
        kind: Some("member".into()),
        limit: Some(limit),
        period: LimitPeriod::Month,
        anchor: None,
    }
}

fn team(limit: i64) -> SpenderSpec {
    SpenderSpec {
        kind: Some("team".into()),
        limit: Some(limit),
        period: LimitPeriod::Month,
        ..SpenderSpec::default()
    }
}

/// The workspace: 10,000 credits; team `design` 2,000 a month; its
/// members `ann` 300 and `bob` 1,900 a month.
async fn workspace(l: &Ledger, credits: i64) {
    l.grant("ws", credits, Some("test"), true).await.unwrap();
    l.put_spender("ws", "design", &team(2_000)).await.unwrap();
    l.put_spender("ws", "ann", &member("design", 300))
        .await
        .unwrap();
    l.put_spender("ws", "bob", &member("design", 1_900))
        .await
        .unwrap();
}

fn charged(batch: &str, spender: Option<&str>, n: usize, cost: i64) -> BatchRequest {
    let mut req: BatchRequest = serde_json::from_value(request(batch, "ws", n, cost)).unwrap();
    req.spender_id = spender.map(str::to_string);
    req
}

async fn reserve(l: &Ledger, req: &BatchRequest) -> Result<Decision, LedgerError> {
    l.reserve(&reserve_input(req, LONG, LONG))
        .await
        .map(|r| r.decision)
}

async fn usage(l: &Ledger, spender: &str) -> (i64, i64) {
    let s = l.spender("ws", spender).await.unwrap();
    (s.used, s.held)
}

async fn settle_all(l: &Ledger, batch: &str, n: usize, actual: i64) {
    let items: Vec<Settlement> = (0..n)
        .map(|i| Settlement {
            batch_id: batch.into(),
            item_id: format!("i{i}"),
            outcome: ItemOutcome::Succeeded {
                actual_cost: Some(actual),
            },
        })
        .collect();
    l.settle(&items).await.unwrap();
}

#[tokio::test]
async fn a_member_batch_fits_the_member_the_team_and_the_account_or_nothing_starts() {
    let t = ledger_only().await;
    let l = &t.ledger;
    workspace(l, 10_000).await;

    // Ann's own limit binds: 300 of 400.
    let d = reserve(l, &charged("a1", Some("ann"), 10, 40))
        .await
        .unwrap();
    let i = insufficient(&d);
    let by = i.limited_by.as_ref().unwrap();
    assert_eq!(by.level, LevelKind::Spender);
    assert_eq!(by.spender_id.as_deref(), Some("ann"));
    assert_eq!((by.limit, by.remaining), (Some(300), Some(300)));
    assert_eq!((i.fit_count, i.available, i.shortfall), (7, 300, 100));
    assert!(
        i.message.starts_with(
            "Your member 'ann' has 300 of its 300 monthly credits left: enough for 7 of 10 items. It resets on 1 "
        ),
        "{}",
        i.message
    );
    let actions: Vec<_> = i.options.iter().map(|o| o.action.as_str()).collect();
    assert_eq!(
        actions,
        ["generate_first_fit", "select_items", "raise_limit"]
    );
    assert_eq!(i.options[2].spender_id.as_deref(), Some("ann"));
    assert_eq!(i.options[2].credits, Some(100));

    // Bob uses 1,820 of the team's 2,000: the team binds for Ann next.
    granted(
        &reserve(l, &charged("b1", Some("bob"), 10, 182))
            .await
            .unwrap(),
    );
    let d = reserve(l, &charged("a2", Some("ann"), 10, 60))
        .await
        .unwrap();
    let i = insufficient(&d);
    let by = i.limited_by.as_ref().unwrap();
    assert_eq!(by.spender_id.as_deref(), Some("design"));
    assert_eq!(by.kind.as_deref(), Some("team"));
    assert_eq!(
        (by.used, by.held, by.remaining),
        (Some(0), Some(1_820), Some(180))
    );
    assert!(
        i.message.starts_with(
            "Your team 'design' has 180 of its 2,000 monthly credits left: enough for 3 of 10 items. It resets on 1 "
        ),
        "{}",
        i.message
    );
    // Nothing was held for the denied batches, at any level.
    assert_eq!(usage(l, "ann").await, (0, 0));
    assert_eq!(usage(l, "design").await, (0, 1_820));
    assert_eq!(t.available("ws").await, 10_000 - 1_820);

    // What fits every level is granted and counts at every level.
    granted(
        &reserve(l, &charged("a3", Some("ann"), 3, 60))
            .await
            .unwrap(),
    );
    assert_eq!(usage(l, "ann").await, (0, 180));
    assert_eq!(usage(l, "design").await, (0, 2_000));
    assert_eq!(usage(l, "bob").await, (0, 1_820));
    t.assert_exact().await;
}

#[tokio::test]
async fn when_the_account_binds_the_option_is_to_add_credits() {
    let t = ledger_only().await;
    let l = &t.ledger;
    workspace(l, 250).await;
    let d = reserve(l, &charged("a1", Some("ann"), 10, 30))
        .await
        .unwrap();
    let i = insufficient(&d);
    let by = i.limited_by.as_ref().unwrap();
    assert_eq!((by.level, by.remaining), (LevelKind::Account, Some(250)));
    assert_eq!(i.fit_count, 8);
    assert_eq!(
        i.message,
        "You have enough credits to generate 8 out of 10 items."
    );
    assert!(i.options.iter().any(|o| o.action == "add_credits"));
    assert!(!i.options.iter().any(|o| o.action == "raise_limit"));
    // A batch without a spender is limited by the account only.
    let d = reserve(l, &charged("n1", None, 10, 30)).await.unwrap();
    assert_eq!(
        insufficient(&d).limited_by.as_ref().unwrap().level,
        LevelKind::Account
    );
}

#[tokio::test]
async fn captures_count_as_used_and_the_release_returns_the_rest_to_every_level() {
    let t = ledger_only().await;
    let l = &t.ledger;
    workspace(l, 10_000).await;
    granted(
        &reserve(l, &charged("a1", Some("ann"), 5, 60))
            .await
            .unwrap(),
    );
    assert_eq!(usage(l, "ann").await, (0, 300));
    settle_all(l, "a1", 5, 35).await;
    assert_eq!(usage(l, "ann").await, (175, 0));
    assert_eq!(usage(l, "design").await, (175, 0));
    assert_eq!(t.available("ws").await, 10_000 - 175);
    let ann = l.spender("ws", "ann").await.unwrap();
    assert_eq!(ann.remaining, Some(125));
    assert!(ann.resets_at.is_some());
    // The period's usage binds the next batch: 125 left.
    let d = reserve(l, &charged("a2", Some("ann"), 3, 50))
        .await
        .unwrap();
    assert_eq!(insufficient(&d).fit_count, 2);
    t.assert_exact().await;
}

#[tokio::test]
async fn a_group_of_requests_is_priced_level_by_level_in_order() {
    let t = ledger_only().await;
    let l = &t.ledger;
    workspace(l, 10_000).await;
    let reqs: Vec<BatchRequest> = (0..4)
        .map(|k| charged(&format!("g{k}"), Some("ann"), 1, 100))
        .collect();
    let inputs: Vec<_> = reqs.iter().map(|r| reserve_input(r, LONG, LONG)).collect();
    let out = l.reserve_many(&inputs).await;
    let kinds: Vec<_> = out
        .iter()
        .map(|r| r.as_ref().unwrap().decision.kind())
        .collect();
    assert_eq!(kinds, ["granted", "granted", "granted", "insufficient"]);
    assert_eq!(usage(l, "ann").await, (0, 300));
    t.assert_exact().await;
}

#[tokio::test]
async fn an_unknown_spender_is_refused_naming_it_and_holds_nothing() {
    let t = ledger_only().await;
    let l = &t.ledger;
    workspace(l, 1_000).await;
    let e = reserve(l, &charged("x1", Some("carol"), 1, 10))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, LedgerError::UnknownSpender { spender, .. } if spender == "carol"),
        "{e:?}"
    );
    assert_eq!(t.available("ws").await, 1_000);
    // A spender of another account is unknown here too.
    l.grant("other", 10, Some("test"), true).await.unwrap();
    l.put_spender("other", "dave", &team(5)).await.unwrap();
    assert!(matches!(
        reserve(l, &charged("x2", Some("dave"), 1, 1)).await,
        Err(LedgerError::UnknownSpender { .. })
    ));
}

#[tokio::test]
async fn soft_holds_count_against_their_spender_and_only_its_batch_consumes_them() {
    let t = ledger_only().await;
    let l = &t.ledger;
    workspace(l, 10_000).await;
    let e = l
        .reserve_soft_for("ws", Some("ann"), 301, LONG)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            LedgerError::Insufficient {
                requested: 301,
                available: 300
            }
        ),
        "{e:?}"
    );
    let soft = l
        .reserve_soft_for("ws", Some("ann"), 200, LONG)
        .await
        .unwrap();
    assert_eq!(soft.spender_id.as_deref(), Some("ann"));
    assert_eq!(usage(l, "ann").await, (0, 200));
    assert_eq!(usage(l, "design").await, (0, 200));

    let mut wrong = charged("s1", Some("bob"), 4, 50);
    wrong.reservation_id = Some(soft.reservation_id.clone());
    assert!(matches!(
        reserve(l, &wrong).await,
        Err(LedgerError::Reservation(why)) if why.contains("spender `ann`")
    ));
    let mut right = charged("s2", Some("ann"), 4, 50);
    right.reservation_id = Some(soft.reservation_id.clone());
    granted(&reserve(l, &right).await.unwrap());
    settle_all(l, "s2", 4, 10).await;
    assert_eq!(usage(l, "ann").await, (40, 0));

    // A cancelled soft hold gives everything back at every level.
    let soft = l
        .reserve_soft_for("ws", Some("bob"), 100, LONG)
        .await
        .unwrap();
    l.cancel_soft(&soft.reservation_id).await.unwrap();
    assert_eq!(usage(l, "bob").await, (0, 0));
    assert_eq!(usage(l, "design").await, (40, 0));
    t.assert_exact().await;
}

#[tokio::test]
async fn a_sequential_batch_stops_when_its_next_chunk_passes_a_spender_limit() {
    let t = ledger_only().await;
    let l = &t.ledger;
    workspace(l, 10_000).await;
    let mut req = charged("q1", Some("ann"), 6, 60);
    req.mode = holdfast_common::messages::Mode::Sequential;
    let mut input = reserve_input(&req, LONG, LONG);
    input.chunk_size = 2;
    granted(&l.reserve(&input).await.unwrap().decision);
    assert_eq!(usage(l, "ann").await, (0, 120));
    // Each chunk settles at full cost: 120, then 240 used + held, then the
    // third chunk (120) would pass 300.
    for chunk in 0..2 {
        let items: Vec<Settlement> = (2 * chunk..2 * chunk + 2)
            .map(|i| Settlement {
                batch_id: "q1".into(),
                item_id: format!("i{i}"),
                outcome: ItemOutcome::Succeeded { actual_cost: None },
            })
            .collect();
        l.settle(&items).await.unwrap();
    }
    let b = t.wait_closed("q1").await;
    assert_eq!(b.state, "completed");
    assert_eq!(usage(l, "ann").await, (240, 0));
    assert_eq!(usage(l, "design").await, (240, 0));
    t.assert_exact().await;
}

#[tokio::test]
async fn the_tree_refuses_cycles_unknown_parents_and_depth_past_eight() {
    let t = ledger_only().await;
    let l = &t.ledger;
    workspace(l, 100).await;
    let e = l
        .put_spender("ws", "design", &member("ann", 10))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, LedgerError::Invalid(m) if m.contains("below it")),
        "{e:?}"
    );
    let e = l
        .put_spender("ws", "x", &member("nobody", 10))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, LedgerError::Invalid(m) if m.contains("no spender `nobody`")),
        "{e:?}"
    );
    // design → ann → l3 … l8: eight levels, and a ninth is refused.
    let mut parent = "ann".to_string();
    for depth in 3..=MAX_SPENDER_DEPTH {
        let id = format!("l{depth}");
        l.put_spender("ws", &id, &member(&parent, 10))
            .await
            .unwrap();
        parent = id;
    }
    let e = l
        .put_spender("ws", "l9", &member(&parent, 10))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, LedgerError::Invalid(m) if m.contains("at most 8 levels")),
        "{e:?}"
    );
    // Moving a spender keeps the bound, and refuses a cycle.
    let e = l
        .put_spender("ws", "bob", &member("l7", 10))
        .await
        .map(|_| ());
    assert!(e.is_ok(), "bob has nothing below it: {e:?}");
    let e = l
        .put_spender("ws", "l3", &member("bob", 10))
        .await
        .unwrap_err();
    assert!(matches!(e, LedgerError::Invalid(_)), "{e:?}");

    // Show: children, and delete refused while something is below or open.
    let design = l.spender("ws", "design").await.unwrap();
    assert_eq!(design.children, ["ann"]);
    assert!(matches!(
        l.delete_spender("ws", "design").await,
        Err(LedgerError::WrongState(_))
    ));
    l.put_spender("ws", "solo", &team(50)).await.unwrap();
    granted(
        &reserve(l, &charged("d1", Some("solo"), 1, 10))
            .await
            .unwrap(),
    );
    assert!(matches!(
        l.delete_spender("ws", "solo").await,
        Err(LedgerError::WrongState(m)) if m.contains("open hold")
    ));
    settle_all(l, "d1", 1, 10).await;
    l.delete_spender("ws", "solo").await.unwrap();
    assert!(matches!(
        l.spender("ws", "solo").await,
        Err(LedgerError::UnknownSpender { .. })
    ));
    t.assert_exact().await;
}

#[tokio::test]
async fn a_batch_counts_in_the_period_it_started_in_and_usage_resets_with_the_next() {
    let t = ledger_only().await;
    let l = &t.ledger;
    workspace(l, 10_000).await;
    granted(
        &reserve(l, &charged("p1", Some("ann"), 5, 60))
            .await
            .unwrap(),
    );
    // The month turns while the batch runs: move its period back one month,
    // as if it had started in the previous one.
    let client = l.pool().get().await.unwrap();
    client
        .batch_execute(
            "INSERT INTO spender_usage (account_id, spender_id, period_start, held, used)
               SELECT account_id, spender_id, period_start - interval '1 month', held, used FROM spender_usage;
             UPDATE hold_spenders SET period_start = period_start - interval '1 month';
             DELETE FROM spender_usage u WHERE NOT EXISTS (
               SELECT 1 FROM hold_spenders l WHERE l.account_id = u.account_id
                 AND l.spender_id = u.spender_id AND l.period_start = u.period_start);",
        )
        .await
        .unwrap();
    // This month Ann has her whole limit; the old batch resolves in its own month.
    assert_eq!(usage(l, "ann").await, (0, 0));
    granted(
        &reserve(l, &charged("p2", Some("ann"), 5, 60))
            .await
            .unwrap(),
    );
    settle_all(l, "p1", 5, 20).await;
    assert_eq!(usage(l, "ann").await, (0, 300));
    let old: i64 = client
        .query_one(
            "SELECT used FROM spender_usage WHERE spender_id = 'ann' AND period_start < date_trunc('month', now())",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(old, 100);
    t.assert_exact().await;
}

#[tokio::test]
async fn the_audit_names_a_spender_whose_usage_disagrees_with_its_holds() {
    let t = ledger_only().await;
    let l = &t.ledger;
    workspace(l, 10_000).await;
    granted(
        &reserve(l, &charged("a1", Some("ann"), 2, 50))
            .await
            .unwrap(),
    );
    t.assert_exact().await;
    let client = l.pool().get().await.unwrap();
    client
        .execute(
            "UPDATE spender_usage SET held = held + 1 WHERE spender_id = 'design'",
            &[],
        )
        .await
        .unwrap();
    let drift = l.audit().await.unwrap();
    assert_eq!(drift.len(), 1, "{drift:#?}");
    assert!(drift[0].subject.starts_with("spender design (account ws"));
}

#[tokio::test]
async fn through_the_fleet_a_spender_batch_runs_and_an_unknown_spender_is_rejected_by_field() {
    let mut t = TestFleet::start().await;
    workspace(&t.ledger, 10_000).await;
    let mut req = request("f1", "ws", 3, 50);
    req["spender_id"] = json!("ann");
    granted(&t.submit(&req).await);
    t.wait_closed("f1").await;
    assert_eq!(usage(&t.ledger, "ann").await.1, 0);
    assert!(usage(&t.ledger, "ann").await.0 > 0);

    let mut req = request("f2", "ws", 1, 5);
    req["spender_id"] = json!("nobody");
    let d = t.submit(&req).await;
    let r = rejected(&d);
    assert_eq!(r.errors[0].field, "spender_id");
    assert!(r.errors[0].reason.contains("nobody"), "{}", r.reason);

    // Previews over AMQP price against every level too, and name an unknown spender.
    let body = json!({"account_id": "ws", "count": 10, "cost": 40, "spender_id": "ann"});
    match t
        .producer
        .preview(body.to_string().as_bytes(), "pv-1", WAIT)
        .await
        .unwrap()
    {
        holdfast_common::messages::Event::Preview(p) => {
            assert!(!p.fits);
            assert_eq!(p.levels.len(), 3, "{:?}", p.levels);
            assert_eq!(p.limited_by.unwrap().spender_id.as_deref(), Some("ann"));
        }
        other => panic!("expected a preview, got {other:?}"),
    }
    let body = json!({"account_id": "ws", "count": 1, "cost": 1, "spender_id": "nobody"});
    match t
        .producer
        .preview(body.to_string().as_bytes(), "pv-2", WAIT)
        .await
        .unwrap()
    {
        holdfast_common::messages::Event::Decision(Decision::Rejected(r)) => {
            assert_eq!(r.errors[0].field, "spender_id")
        }
        other => panic!("expected a rejection, got {other:?}"),
    }

    let mut req = request("f3", "ws", 10, 40);
    req["spender_id"] = json!("ann");
    let d = t.submit(&req).await;
    let i = insufficient(&d);
    assert_eq!(
        i.limited_by.as_ref().unwrap().spender_id.as_deref(),
        Some("ann")
    );
    t.assert_exact().await;
}

#[tokio::test]
async fn over_http_an_admin_shapes_the_tree_and_a_preview_shows_every_level() {
    const TOKEN: &str = "the-admin-token";
    let mut settings = fast_settings();
    settings.http_addr = holdfast::fleet::HttpAddr(Some("127.0.0.1:0".parse().unwrap()));
    settings.api.admin_token = Some(TOKEN.into());
    let t = TestFleet::start_with(settings, Roles::ALL, None).await;
    t.ledger.grant("ws", 10_000, None, true).await.unwrap();
    let base = format!(
        "http://{}/v1/accounts/ws/spenders",
        t.fleets[0].http_addr().unwrap()
    );
    let http = reqwest::Client::new();
    let put = |id: &str, body: serde_json::Value| {
        http.put(format!("{base}/{id}"))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
    };
    let r = put(
        "design",
        json!({"kind": "team", "limit": 2000, "period": "month"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    let r = put(
        "ann",
        json!({"parent": "design", "kind": "member", "limit": 300, "period": "month"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    let r = put(
        "ann",
        json!({"parent": "design", "kind": "member", "limit": 250, "period": "month"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let ann: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        (ann["limit"].as_i64(), ann["remaining"].as_i64()),
        (Some(250), Some(250))
    );
    assert!(ann["resets_at"]
        .as_str()
        .unwrap()
        .ends_with("-01T00:00:00.000Z"));
    // A cycle, a bad field, an unknown parent: 400 naming the field.
    for (body, field) in [
        (json!({"parent": "ann"}), "parent"),
        (json!({"limit": -5, "period": "month"}), "limit"),
        (json!({"parent": "nobody"}), "parent"),
    ] {
        let r = put("design", body.clone()).await.unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let p: serde_json::Value = r.json().await.unwrap();
        let text = p.to_string();
        assert!(text.contains(field), "{body}: {text}");
    }
    let design: serde_json::Value = http
        .get(format!("{base}/design"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(design["children"], json!(["ann"]));
    let all: serde_json::Value = http
        .get(&base)
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(all.as_array().unwrap().len(), 2);
    let r = http
        .delete(format!("{base}/design"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let r = http
        .get(format!("{base}/carol"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // The preview prices against every level and shows them.
    let root = format!("http://{}", t.fleets[0].http_addr().unwrap());
    let p: serde_json::Value = http
        .post(format!("{root}/v1/preview"))
        .bearer_auth(TOKEN)
        .json(&json!({"account_id": "ws", "count": 10, "cost": 40, "spender_id": "ann"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(p["fits"], json!(false));
    assert_eq!(p["fit_count"], json!(6));
    let levels: Vec<_> = p["levels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["level"].as_str().unwrap(),
                l["remaining"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        levels,
        [("account", 10_000), ("spender", 2_000), ("spender", 250)]
    );
    assert_eq!(p["limited_by"]["spender_id"], json!("ann"));
    assert!(p["advice"].as_str().unwrap().starts_with(
        "Your member 'ann' has 250 of its 250 monthly credits left: enough for 6 of 10 items."
    ));
    let r = http
        .post(format!("{root}/v1/preview"))
        .bearer_auth(TOKEN)
        .json(&json!({"account_id": "ws", "count": 1, "cost": 1, "spender_id": "carol"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("spender_id"));
    // A reservation charged to a spender.
    let r = http
        .post(format!("{root}/v1/reservations"))
        .bearer_auth(TOKEN)
        .json(&json!({"account_id": "ws", "amount": 100, "spender_id": "ann"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let soft: serde_json::Value = r.json().await.unwrap();
    assert_eq!(soft["spender_id"], json!("ann"));
    assert_eq!(t.ledger.spender("ws", "ann").await.unwrap().held, 100);
    t.stop().await;
}

#[tokio::test]
async fn periods_are_calendar_periods_in_utc_unless_anchored() {
    use chrono::{Datelike, Duration as D, TimeZone, Timelike, Utc};
    let t = ledger_only().await;
    let l = &t.ledger;
    l.grant("ws", 100, None, true).await.unwrap();
    let now = Utc::now();
    let spec = |period, anchor| SpenderSpec {
        limit: Some(10),
        period,
        anchor,
        ..SpenderSpec::default()
    };
    let at = |s: &str| {
        chrono::DateTime::parse_from_rfc3339(s)
            .unwrap()
            .with_timezone(&Utc)
    };
    // A calendar week: from Monday 00:00 UTC.
    let week = l
        .put_spender("ws", "w", &spec(LimitPeriod::Week, None))
        .await
        .unwrap()
        .spender;
    let start = at(&week.period_start);
    assert_eq!(start.weekday(), chrono::Weekday::Mon);
    assert_eq!((start.hour(), start.minute()), (0, 0));
    assert!(start <= now && now - start < D::days(7));
    assert_eq!(at(week.resets_at.as_deref().unwrap()) - start, D::days(7));
    // A month: from the 1st.
    let month = l
        .put_spender("ws", "m", &spec(LimitPeriod::Month, None))
        .await
        .unwrap()
        .spender;
    assert_eq!(
        at(&month.period_start),
        Utc.with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0)
            .unwrap()
    );
    // A day anchored at 06:00 UTC two days ago: from the last 06:00.
    let anchor = (now - D::days(2))
        .with_hour(6)
        .and_then(|t| t.with_minute(0))
        .and_then(|t| t.with_second(0))
        .and_then(|t| t.with_nanosecond(0))
        .unwrap();
    let day = l
        .put_spender("ws", "d", &spec(LimitPeriod::Day, Some(anchor)))
        .await
        .unwrap()
        .spender;
    let start = at(&day.period_start);
    assert_eq!((start.hour(), start.minute()), (6, 0));
    assert!(start <= now && now - start < D::days(1));
    assert_eq!(at(day.resets_at.as_deref().unwrap()) - start, D::days(1));
    // A lifetime cap never resets.
    let life = l
        .put_spender("ws", "l", &spec(LimitPeriod::None, None))
        .await
        .unwrap()
        .spender;
    assert_eq!(life.resets_at, None);
    // An anchor in the future is refused.
    assert!(matches!(
        l.put_spender("ws", "f", &spec(LimitPeriod::Day, Some(now + D::days(1))))
            .await,
        Err(LedgerError::Invalid(_))
    ));
}

#[tokio::test]
async fn a_spender_draws_the_accounts_grants_in_the_one_burn_down_order_up_to_its_limit() {
    use holdfast_common::ledger::{GrantSource, GrantSpec};
    let t = ledger_only().await;
    let l = &t.ledger;
    for (id, source, amount, days) in [
        ("topup", GrantSource::Purchase, 500, None),
        ("plan", GrantSource::Plan, 100, Some(20)),
    ] {
        let spec = GrantSpec {
            grant_id: Some(id.into()),
            amount,
            source,
            expires_at: days.map(|d| chrono::Utc::now() + chrono::Duration::days(d)),
            ..GrantSpec::default()
        };
        l.add_grant("ws", &spec, true).await.unwrap();
    }
    l.put_spender("ws", "design", &team(250)).await.unwrap();
    // The plan (expiring first) before the top-up, as for any batch.
    let d = reserve(l, &charged("g1", Some("design"), 3, 50))
        .await
        .unwrap();
    let drawn: Vec<_> = granted(&d)
        .breakdown
        .iter()
        .map(|d| (d.grant_id.as_str(), d.amount))
        .collect();
    assert_eq!(drawn, [("plan", 100), ("topup", 50)]);
    // The team's limit caps what it may draw: 100 of its 250 are left,
    // though the account has 450.
    let d = reserve(l, &charged("g2", Some("design"), 3, 50))
        .await
        .unwrap();
    let i = insufficient(&d);
    assert_eq!((i.available, i.fit_count), (100, 2));
    let first: Vec<_> = i
        .breakdown
        .iter()
        .map(|d| (d.grant_id.as_str(), d.amount))
        .collect();
    assert_eq!(first, [("topup", 100)]);
    // A batch without a spender still has the account's whole 450.
    granted(&reserve(l, &charged("g3", None, 9, 50)).await.unwrap());
    t.assert_exact().await;
}

/// Seeded random walks over one workspace: reservations in every mode
/// charged to random spenders of a three-level tree (or to none), soft
/// holds, captures at random costs, failures, cancels, deadlines and soft
/// holds expiring. After every step no level is over its limit, each team's
/// usage is at least the sum of its members' (it also counts batches charged
/// to the team itself), and the audit, which recomputes every spender's
/// usage from the holds, is exact.
#[tokio::test]
async fn random_walks_over_a_spender_tree_keep_every_level_within_its_limit() {
    use rand::{Rng, SeedableRng};
    let t = ledger_only().await;
    let l = &t.ledger;
    l.grant("ws", 4_000, None, true).await.unwrap();
    l.put_spender("ws", "design", &team(1_500)).await.unwrap();
    l.put_spender("ws", "ops", &team(1_200)).await.unwrap();
    for (m, parent, limit) in [
        ("ann", "design", 600),
        ("bob", "design", 1_000),
        ("cy", "ops", 400),
    ] {
        l.put_spender("ws", m, &member(parent, limit))
            .await
            .unwrap();
    }
    let mut key = member("bob", 250);
    key.kind = Some("key".into());
    l.put_spender("ws", "bob-ci", &key).await.unwrap();
    let spenders = [
        None,
        Some("design"),
        Some("ops"),
        Some("ann"),
        Some("bob"),
        Some("cy"),
        Some("bob-ci"),
    ];
    let client = l.pool().get().await.unwrap();
    for seed in 0..3u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut open: Vec<(String, usize)> = Vec::new();
        for step in 0..40 {
            match rng.random_range(0..10) {
                0..=4 => {
                    let id = format!("s{seed}-{step}");
                    let n = rng.random_range(1..=6);
                    let mut req = charged(&id, spenders[rng.random_range(0..spenders.len())], n, 1);
                    for it in &mut req.items {
                        it.estimated_cost = rng.random_range(5..=60);
                    }
                    req.mode = [
                        holdfast_common::messages::Mode::AllOrNothing,
                        holdfast_common::messages::Mode::FirstFit,
                        holdfast_common::messages::Mode::PriorityFit,
                    ][rng.random_range(0..3)];
                    if let Decision::Granted(_) = reserve(l, &req).await.unwrap() {
                        open.push((id, n));
                    }
                }
                5 => {
                    let s = spenders[rng.random_range(1..spenders.len())];
                    let _ = l
                        .reserve_soft_for(
                            "ws",
                            s,
                            rng.random_range(5..=80),
                            Duration::from_millis(1),
                        )
                        .await;
                }
                6..=7 if !open.is_empty() => {
                    let (id, n) = open.swap_remove(rng.random_range(0..open.len()));
                    let items: Vec<Settlement> = (0..n)
                        .map(|i| Settlement {
                            batch_id: id.clone(),
                            item_id: format!("i{i}"),
                            outcome: if rng.random_range(0..5) == 0 {
                                ItemOutcome::Failed {
                                    reason: "test".into(),
                                }
                            } else {
                                ItemOutcome::Succeeded {
                                    actual_cost: Some(rng.random_range(0..=70)),
                                }
                            },
                        })
                        .collect();
                    l.settle(&items).await.unwrap();
                }
                8 if !open.is_empty() => {
                    let (id, _) = open.swap_remove(rng.random_range(0..open.len()));
                    l.cancel_batch(&id).await.unwrap();
                }
                _ => {
                    client
                        .execute(
                            "UPDATE batches SET deadline_at = now() - interval '1 second'
                             WHERE state IN ('granted', 'dispatched') AND random() < 0.3",
                            &[],
                        )
                        .await
                        .unwrap();
                    l.expire_overdue(100).await.unwrap();
                    l.expire_soft_holds(100).await.unwrap();
                    let still: Vec<String> = client
                        .query(
                            "SELECT id FROM batches WHERE state IN ('granted', 'dispatched')",
                            &[],
                        )
                        .await
                        .unwrap()
                        .iter()
                        .map(|r| r.get(0))
                        .collect();
                    open.retain(|(id, _)| still.contains(id));
                }
            }
            let all = l.spenders("ws").await.unwrap();
            let level = |id: &str| all.iter().find(|s| s.spender_id == id).unwrap();
            for s in &all {
                assert!(
                    s.used + s.held <= s.limit.unwrap(),
                    "seed {seed} step {step}: {s:?}"
                );
            }
            for (team, members) in [("design", &["ann", "bob"][..]), ("ops", &["cy"][..])] {
                let sum: i64 = members.iter().map(|m| level(m).used + level(m).held).sum();
                let t = level(team);
                assert!(t.used + t.held >= sum, "seed {seed} step {step}: {team}");
            }
            let b = level("bob");
            let k = level("bob-ci");
            assert!(b.used + b.held >= k.used + k.held);
            assert!(t.available("ws").await >= 0);
            t.assert_exact().await;
        }
    }
}
