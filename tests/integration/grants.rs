//! Grants: holds take credits in one burn-down order, a hold's captures are
//! posted to the grants it drew from and the rest goes back to them, or goes
//! with a grant that expired or was voided meanwhile; expiry racing
//! reservations, captures and closes counts every credit once; a decision
//! that waited for the account row is priced on what the lock holder left;
//! `grant_id` is an idempotency key; and a V4 ledger migrated to V5 stays
//! exact.
//!
//! Timings come from the database clock (`SELECT now()`): expiry is decided
//! there, never by the test process's clock.

use crate::support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use holdfast::fleet::Roles;
use holdfast_common::ledger::{
    Grant, GrantSource, GrantSpec, ItemOutcome, Ledger, LedgerError, Settlement,
};
use holdfast_common::messages::{BatchRequest, Decision};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use support::*;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

/// Execution timeout and dispatch grace of the batches reserved here: no
/// reconciler sweep closes or re-dispatches them behind the test's back.
const LONG: Duration = Duration::from_secs(600);

fn ms(n: i64) -> chrono::Duration {
    chrono::Duration::milliseconds(n)
}

fn days(n: i64) -> chrono::Duration {
    chrono::Duration::days(n)
}

/// A database and a namespace, no roles running: the test drives the ledger.
async fn ledger_only() -> TestFleet {
    TestFleet::start_with(fast_settings(), Roles::default(), None).await
}

async fn query(
    ledger: &Ledger,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Vec<tokio_postgres::Row> {
    let client = ledger.pool().get().await.expect("a connection");
    client.query(sql, params).await.expect(sql)
}

/// The database's clock.
async fn db_now(ledger: &Ledger) -> DateTime<Utc> {
    query(ledger, "SELECT now()", &[]).await[0].get(0)
}

/// Wait until the database's clock is past `at`.
async fn wait_until_past(ledger: &Ledger, at: DateTime<Utc>) {
    eventually("the database clock passes the instant", || async {
        let past: bool = query(ledger, "SELECT now() > $1", &[&at]).await[0].get(0);
        past.then_some(())
    })
    .await
}

fn spec(
    grant_id: &str,
    amount: i64,
    source: GrantSource,
    priority: i32,
    expires_at: Option<DateTime<Utc>>,
) -> GrantSpec {
    GrantSpec {
        grant_id: Some(grant_id.into()),
        amount,
        source,
        priority,
        expires_at,
        note: None,
    }
}

/// Add a new grant (creating the account).
async fn add(ledger: &Ledger, account: &str, spec: GrantSpec) {
    let g = ledger.add_grant(account, &spec, true).await.expect("grant");
    assert!(!g.replayed, "{spec:?} is new");
}

/// Reserve a batch of `n` items costing `cost` each (ids i0..), straight on the ledger.
async fn reserve(ledger: &Ledger, batch: &str, account: &str, n: usize, cost: i64) -> Decision {
    let req: BatchRequest = serde_json::from_value(request(batch, account, n, cost)).unwrap();
    ledger
        .reserve(&reserve_input(&req, LONG, LONG))
        .await
        .expect("decided")
        .decision
}

async fn hold_of(ledger: &Ledger, batch: &str) -> Uuid {
    query(
        ledger,
        "SELECT hold_id FROM batches WHERE id = $1",
        &[&batch],
    )
    .await[0]
        .get(0)
}

/// The journal rows of `hold` that name a grant, oldest first, as
/// `kind grant amount balance_delta held_delta`.
async fn hold_journal(ledger: &Ledger, hold: Uuid) -> Vec<String> {
    query(
        ledger,
        "SELECT kind, grant_id, amount, balance_delta, held_delta FROM journal
         WHERE hold_id = $1 AND kind NOT IN ('capture', 'overrun') ORDER BY id",
        &[&hold],
    )
    .await
    .iter()
    .map(|r| {
        let grant: Option<String> = r.get(1);
        format!(
            "{} {} {} {:+} {:+}",
            r.get::<_, String>(0),
            grant.as_deref().unwrap_or("-"),
            r.get::<_, i64>(2),
            r.get::<_, i64>(3),
            r.get::<_, i64>(4)
        )
    })
    .collect()
}

/// The journal rows of `account` of `kind` that belong to no hold, as
/// `grant amount balance_delta held_delta`.
async fn account_rows(ledger: &Ledger, account: &str, kind: &str) -> Vec<String> {
    query(
        ledger,
        "SELECT grant_id, amount, balance_delta, held_delta FROM journal
         WHERE account_id = $1 AND kind = $2 AND hold_id IS NULL ORDER BY id",
        &[&account, &kind],
    )
    .await
    .iter()
    .map(|r| {
        let grant: Option<String> = r.get(0);
        format!(
            "{} {} {:+} {:+}",
            grant.as_deref().unwrap_or("-"),
            r.get::<_, i64>(1),
            r.get::<_, i64>(2),
            r.get::<_, i64>(3)
        )
    })
    .collect()
}

/// What `hold` took of each grant, by grant id, as
/// `grant amount (captured c, released r, expired x)`.
async fn allocations(ledger: &Ledger, hold: Uuid) -> Vec<String> {
    query(
        ledger,
        "SELECT grant_id, amount, captured, released, expired FROM hold_allocations
         WHERE hold_id = $1 ORDER BY grant_id",
        &[&hold],
    )
    .await
    .iter()
    .map(|r| {
        format!(
            "{} {} (captured {}, released {}, expired {})",
            r.get::<_, String>(0),
            r.get::<_, i64>(1),
            r.get::<_, i64>(2),
            r.get::<_, i64>(3),
            r.get::<_, i64>(4)
        )
    })
    .collect()
}

async fn grant(ledger: &Ledger, account: &str, grant_id: &str) -> Grant {
    ledger
        .grants(account)
        .await
        .unwrap()
        .into_iter()
        .find(|g| g.grant_id == grant_id)
        .unwrap_or_else(|| panic!("{account} has a grant {grant_id}"))
}

/// `state remaining held available` of a grant.
async fn grant_figures(ledger: &Ledger, account: &str, grant_id: &str) -> String {
    let g = grant(ledger, account, grant_id).await;
    format!(
        "{} remaining {} held {} available {}",
        g.state, g.remaining, g.held, g.available
    )
}

/// What new holds may take now: `holdfast_available`.
async fn available(ledger: &Ledger, account: &str) -> i64 {
    query(ledger, "SELECT holdfast_available($1)", &[&account]).await[0].get(0)
}

async fn balance_held(ledger: &Ledger, account: &str) -> (i64, i64) {
    let a = ledger.account(account).await.unwrap();
    (a.balance, a.held)
}

fn succeeded(cost: i64) -> ItemOutcome {
    ItemOutcome::Succeeded {
        actual_cost: Some(cost),
    }
}

fn failed() -> ItemOutcome {
    ItemOutcome::Failed {
        reason: "test".into(),
    }
}

async fn settle(ledger: &Ledger, batch: &str, outcomes: &[(&str, ItemOutcome)]) {
    let items: Vec<Settlement> = outcomes
        .iter()
        .map(|(item, outcome)| Settlement {
            batch_id: batch.into(),
            item_id: (*item).into(),
            outcome: outcome.clone(),
        })
        .collect();
    ledger.settle(&items).await.expect("settled");
}

fn item(id: &str, cost: i64, simulate: Value) -> Value {
    json!({"item_id": id, "estimated_cost": cost, "payload": {"simulate": simulate}})
}

#[tokio::test]
async fn holds_take_from_grants_in_burn_down_order_and_the_next_continues_where_it_stopped() {
    let t = ledger_only().await;
    let l = &t.ledger;
    let now = db_now(l).await;
    // Added in the reverse of their burn-down order. The plan grant expires
    // soonest, but its priority 1 puts it after every priority-0 grant.
    add(
        l,
        "acme",
        spec("plan-p1", 40, GrantSource::Plan, 1, Some(now + days(1))),
    )
    .await;
    add(
        l,
        "acme",
        spec("manual-forever", 100, GrantSource::Manual, 0, None),
    )
    .await;
    let in_a_year = Some(now + days(365));
    add(
        l,
        "acme",
        spec("purchase-1y", 100, GrantSource::Purchase, 0, in_a_year),
    )
    .await;
    let in_a_week = Some(now + days(7));
    add(
        l,
        "acme",
        spec("promo-1w", 30, GrantSource::Promotion, 0, in_a_week),
    )
    .await;
    let order: Vec<String> = l
        .grants("acme")
        .await
        .unwrap()
        .into_iter()
        .map(|g| g.grant_id)
        .collect();
    assert_eq!(
        order,
        ["promo-1w", "purchase-1y", "manual-forever", "plan-p1"]
    );
    assert_eq!(available(l, "acme").await, 270);

    // 50: all of the promotion (soonest expiry), then the purchase.
    assert_eq!(
        granted(&reserve(l, "first", "acme", 5, 10).await).reserved,
        50
    );
    let first = hold_of(l, "first").await;
    assert_eq!(
        hold_journal(l, first).await,
        ["hold promo-1w 30 +0 +30", "hold purchase-1y 20 +0 +20"]
    );
    assert_eq!(
        allocations(l, first).await,
        [
            "promo-1w 30 (captured 0, released 0, expired 0)",
            "purchase-1y 20 (captured 0, released 0, expired 0)"
        ]
    );

    // 150: the rest of the purchase, then the grant that never expires.
    granted(&reserve(l, "second", "acme", 3, 50).await);
    let second = hold_of(l, "second").await;
    assert_eq!(
        hold_journal(l, second).await,
        [
            "hold purchase-1y 80 +0 +80",
            "hold manual-forever 70 +0 +70"
        ]
    );

    // A soft hold of 40: the rest of the manual grant, then priority 1.
    let soft = l.reserve_soft("acme", 40, LONG).await.unwrap();
    let soft: Uuid = soft.reservation_id.parse().unwrap();
    assert_eq!(
        hold_journal(l, soft).await,
        ["hold manual-forever 30 +0 +30", "hold plan-p1 10 +0 +10"]
    );
    assert_eq!(
        allocations(l, soft).await,
        [
            "manual-forever 30 (captured 0, released 0, expired 0)",
            "plan-p1 10 (captured 0, released 0, expired 0)"
        ]
    );

    // 30 left, all on the plan grant: 31 is denied and takes nothing, 30 fits.
    insufficient(&reserve(l, "too-much", "acme", 1, 31).await);
    granted(&reserve(l, "last", "acme", 1, 30).await);
    let last = hold_of(l, "last").await;
    assert_eq!(hold_journal(l, last).await, ["hold plan-p1 30 +0 +30"]);
    let figures: Vec<String> = l
        .grants("acme")
        .await
        .unwrap()
        .iter()
        .map(|g| format!("{} {}/{}/{}", g.grant_id, g.remaining, g.held, g.available))
        .collect();
    assert_eq!(
        figures,
        [
            "promo-1w 30/30/0",
            "purchase-1y 100/100/0",
            "manual-forever 100/100/0",
            "plan-p1 40/40/0"
        ]
    );
    assert_eq!(balance_held(l, "acme").await, (270, 270));
    assert_eq!(available(l, "acme").await, 0);
    t.assert_exact().await;
}

#[tokio::test]
async fn equal_priority_and_expiry_burn_promotion_plan_purchase_manual_then_the_oldest_first() {
    let t = ledger_only().await;
    let l = &t.ledger;
    let at = Some(db_now(l).await + days(30));
    add(l, "acme", spec("m", 10, GrantSource::Manual, 0, at)).await;
    add(l, "acme", spec("pu", 10, GrantSource::Purchase, 0, at)).await;
    add(l, "acme", spec("pl", 10, GrantSource::Plan, 0, at)).await;
    add(l, "acme", spec("pr", 10, GrantSource::Promotion, 0, at)).await;
    // Never expiring, all manual: the oldest first, whatever their ids.
    add(l, "acme", spec("older", 10, GrantSource::Manual, 0, None)).await;
    add(l, "acme", spec("newer", 10, GrantSource::Manual, 0, None)).await;
    add(
        l,
        "acme",
        spec("a-newest", 10, GrantSource::Manual, 0, None),
    )
    .await;
    let expected = ["pr", "pl", "pu", "m", "older", "newer", "a-newest"];
    let order: Vec<String> = l
        .grants("acme")
        .await
        .unwrap()
        .into_iter()
        .map(|g| g.grant_id)
        .collect();
    assert_eq!(order, expected);

    // Holds of 15 each: every one continues where the previous stopped.
    for k in 0..4 {
        granted(&reserve(l, &format!("b{k}"), "acme", 1, 15).await);
    }
    let mut taken = Vec::new();
    for k in 0..4 {
        taken.extend(hold_journal(l, hold_of(l, &format!("b{k}")).await).await);
    }
    assert_eq!(
        taken,
        [
            "hold pr 10 +0 +10",
            "hold pl 5 +0 +5",
            "hold pl 5 +0 +5",
            "hold pu 10 +0 +10",
            "hold m 10 +0 +10",
            "hold older 5 +0 +5",
            "hold older 5 +0 +5",
            "hold newer 10 +0 +10",
        ]
    );
    assert_eq!(available(l, "acme").await, 10);
    assert_eq!(grant(l, "acme", "a-newest").await.held, 0);
    t.assert_exact().await;
}

#[tokio::test]
async fn a_batch_spanning_grants_runs_through_the_fleet_and_posts_its_captures_in_burn_down_order()
{
    let mut t = TestFleet::start().await;
    let now = db_now(&t.ledger).await;
    add(
        &t.ledger,
        "acme",
        spec("promo", 50, GrantSource::Promotion, 0, Some(now + days(7))),
    )
    .await;
    add(
        &t.ledger,
        "acme",
        spec("base", 100, GrantSource::Manual, 0, None),
    )
    .await;
    let req = json!({"batch_id": "span", "account_id": "acme", "items": [
        item("exact", 20, json!({})),
        item("same", 20, json!({"actual_cost": 20})),
        item("cheaper", 20, json!({"actual_cost": 15})),
        item("broken", 20, json!({"fail": true})),
    ]});
    assert_eq!(granted(&t.submit(&req).await).reserved, 80);
    let b = t.wait_closed("span").await;
    assert_eq!(
        (b.state.as_str(), b.figures.captured, b.figures.released),
        ("completed", 55, 25)
    );
    let l = &t.ledger;
    let hold = hold_of(l, "span").await;
    // Taken: the promotion first. Captured 55: the promotion's 50 first, then
    // 5 of the base grant; the 25 unused return to the base grant.
    assert_eq!(
        hold_journal(l, hold).await,
        [
            "hold promo 50 +0 +50",
            "hold base 30 +0 +30",
            "settle promo 50 -50 -50",
            "settle base 5 -5 -5",
            "release base 25 +0 -25",
        ]
    );
    assert_eq!(
        allocations(l, hold).await,
        [
            "base 30 (captured 5, released 25, expired 0)",
            "promo 50 (captured 50, released 0, expired 0)"
        ]
    );
    assert_eq!(
        grant_figures(l, "acme", "promo").await,
        "active remaining 0 held 0 available 0"
    );
    assert_eq!(
        grant_figures(l, "acme", "base").await,
        "active remaining 95 held 0 available 95"
    );
    assert_eq!(balance_held(l, "acme").await, (95, 0));
    assert_eq!(available(l, "acme").await, 95);
    t.assert_exact().await;
    t.stop().await;
}

#[tokio::test]
async fn a_grant_expiring_under_an_open_hold_keeps_its_allocation_and_what_the_hold_does_not_use_expires(
) {
    let t = ledger_only().await;
    let l = &t.ledger;
    let expires = db_now(l).await + ms(2_000);
    add(
        l,
        "acme",
        spec("soon", 50, GrantSource::Promotion, 0, Some(expires)),
    )
    .await;
    add(l, "acme", spec("base", 100, GrantSource::Manual, 0, None)).await;
    granted(&reserve(l, "b", "acme", 3, 10).await);
    let hold = hold_of(l, "b").await;
    assert_eq!(
        allocations(l, hold).await,
        ["soon 30 (captured 0, released 0, expired 0)"]
    );
    assert_eq!(available(l, "acme").await, 120);

    // Never early: neither expire_grants nor a sweep touches it before its time.
    assert_eq!(l.expire_grants(100).await.unwrap(), 0);
    let (amqp, mut reconciler) = t.reconciler().await;
    assert_eq!(reconciler.sweep_once().await.unwrap().drift, Some(0));
    assert!(
        query(l, "SELECT now() < $1", &[&expires]).await[0].get::<_, bool>(0),
        "the checks above ran before the expiry (took over 2 s?)"
    );
    assert_eq!(
        grant_figures(l, "acme", "soon").await,
        "active remaining 50 held 30 available 20"
    );
    assert!(account_rows(l, "acme", "grant_expire").await.is_empty());

    // Past its expiry, before any sweep: none of it is available, and a new
    // hold takes from the base grant.
    wait_until_past(l, expires).await;
    assert_eq!(available(l, "acme").await, 100);
    assert_eq!(grant(l, "acme", "soon").await.available, 0);
    granted(&reserve(l, "after", "acme", 1, 5).await);
    let after = hold_of(l, "after").await;
    assert_eq!(hold_journal(l, after).await, ["hold base 5 +0 +5"]);

    // The sweep expires its free part; the open hold keeps its 30.
    assert_eq!(reconciler.sweep_once().await.unwrap().drift, Some(0));
    assert_eq!(
        grant_figures(l, "acme", "soon").await,
        "expired remaining 30 held 30 available 0"
    );
    assert_eq!(
        account_rows(l, "acme", "grant_expire").await,
        ["soon 20 -20 +0"]
    );
    assert_eq!(balance_held(l, "acme").await, (130, 35));
    assert_eq!(available(l, "acme").await, 95);
    assert_eq!(
        allocations(l, hold).await,
        ["soon 30 (captured 0, released 0, expired 0)"]
    );
    t.assert_exact().await;
    // Once is all.
    assert_eq!(l.expire_grants(100).await.unwrap(), 0);
    reconciler.sweep_once().await.unwrap();
    assert_eq!(account_rows(l, "acme", "grant_expire").await.len(), 1);

    // The batch finishes having used 14: that is posted to the expired grant,
    // and the 16 it does not use expire with it instead of coming back.
    settle(
        l,
        "b",
        &[
            ("i0", succeeded(10)),
            ("i1", succeeded(4)),
            ("i2", failed()),
        ],
    )
    .await;
    let b = l.batch("b").await.unwrap().unwrap();
    assert_eq!(
        (b.state.as_str(), b.figures.captured, b.figures.released),
        ("completed", 14, 16)
    );
    assert_eq!(
        hold_journal(l, hold).await,
        [
            "hold soon 30 +0 +30",
            "settle soon 14 -14 -14",
            "grant_expire soon 16 -16 -16"
        ]
    );
    assert_eq!(
        allocations(l, hold).await,
        ["soon 30 (captured 14, released 0, expired 16)"]
    );
    assert_eq!(
        grant_figures(l, "acme", "soon").await,
        "expired remaining 0 held 0 available 0"
    );
    assert_eq!(balance_held(l, "acme").await, (100, 5));
    assert_eq!(available(l, "acme").await, 95);
    assert_eq!(l.account("acme").await.unwrap().available, 95);
    t.assert_exact().await;

    settle(l, "after", &[("i0", succeeded(5))]).await;
    assert_eq!(balance_held(l, "acme").await, (95, 0));
    assert_eq!(
        grant_figures(l, "acme", "base").await,
        "active remaining 95 held 0 available 95"
    );
    assert_eq!(reconciler.sweep_once().await.unwrap().drift, Some(0));
    holdfast_common::topology::close(&amqp, "done").await;
}

#[tokio::test]
async fn soft_holds_resolving_after_their_grant_expired_let_its_part_expire_and_return_the_rest() {
    let t = ledger_only().await;
    let l = &t.ledger;
    let expires = db_now(l).await + ms(1_000);
    add(
        l,
        "acme",
        spec("soon", 50, GrantSource::Promotion, 0, Some(expires)),
    )
    .await;
    add(l, "acme", spec("base", 100, GrantSource::Manual, 0, None)).await;
    let cancelled = l.reserve_soft("acme", 30, LONG).await.unwrap();
    let ttl = l
        .reserve_soft("acme", 30, Duration::from_millis(1_500))
        .await
        .unwrap();
    let cancelled_hold: Uuid = cancelled.reservation_id.parse().unwrap();
    let ttl_hold: Uuid = ttl.reservation_id.parse().unwrap();
    assert_eq!(
        hold_journal(l, ttl_hold).await,
        ["hold soon 20 +0 +20", "hold base 10 +0 +10"]
    );

    wait_until_past(l, expires).await;
    assert_eq!(l.expire_grants(100).await.unwrap(), 0, "all of it is held");
    assert_eq!(
        grant_figures(l, "acme", "soon").await,
        "expired remaining 50 held 50 available 0"
    );

    // Cancelled: its part of the expired grant expires, nothing comes back.
    l.cancel_soft(&cancelled.reservation_id).await.unwrap();
    assert_eq!(
        hold_journal(l, cancelled_hold).await,
        ["hold soon 30 +0 +30", "grant_expire soon 30 -30 -30"]
    );
    assert_eq!(available(l, "acme").await, 90);

    // Past its TTL: the part of the expired grant expires with the grant,
    // the part of the base grant comes back (`expire`).
    let ttl_at: DateTime<Utc> = query(
        l,
        "SELECT expires_at FROM holds WHERE id = $1",
        &[&ttl_hold],
    )
    .await[0]
        .get(0);
    wait_until_past(l, ttl_at).await;
    assert_eq!(l.expire_soft_holds(100).await.unwrap(), 1);
    assert_eq!(
        hold_journal(l, ttl_hold).await,
        [
            "hold soon 20 +0 +20",
            "hold base 10 +0 +10",
            "grant_expire soon 20 -20 -20",
            "expire base 10 +0 -10"
        ]
    );
    assert_eq!(
        allocations(l, ttl_hold).await,
        [
            "base 10 (captured 0, released 10, expired 0)",
            "soon 20 (captured 0, released 0, expired 20)"
        ]
    );
    assert_eq!(
        grant_figures(l, "acme", "soon").await,
        "expired remaining 0 held 0 available 0"
    );
    assert_eq!(balance_held(l, "acme").await, (100, 0));
    assert_eq!(available(l, "acme").await, 100);
    t.assert_exact().await;
}

#[tokio::test]
async fn voiding_a_grant_removes_what_it_has_left_and_later_what_its_hold_does_not_use() {
    let t = ledger_only().await;
    let l = &t.ledger;
    add(l, "acme", spec("gift", 60, GrantSource::Promotion, 0, None)).await;
    add(l, "acme", spec("base", 100, GrantSource::Manual, 0, None)).await;
    granted(&reserve(l, "b", "acme", 2, 20).await);
    let hold = hold_of(l, "b").await;
    assert_eq!(hold_journal(l, hold).await, ["hold gift 40 +0 +40"]);

    let voided = l.void_grant("acme", "gift", Some("refund")).await.unwrap();
    assert_eq!(
        (
            voided.state.as_str(),
            voided.remaining,
            voided.held,
            voided.available
        ),
        ("voided", 40, 40, 0)
    );
    assert_eq!(account_rows(l, "acme", "void").await, ["gift 20 -20 +0"]);
    assert_eq!(balance_held(l, "acme").await, (140, 40));
    assert_eq!(available(l, "acme").await, 100);
    t.assert_exact().await;

    // Again: nothing more happens. An unknown grant is not found.
    let again = l.void_grant("acme", "gift", None).await.unwrap();
    assert_eq!((again.state.as_str(), again.remaining), ("voided", 40));
    assert_eq!(account_rows(l, "acme", "void").await.len(), 1);
    assert!(matches!(
        l.void_grant("acme", "nope", None).await,
        Err(LedgerError::NotFound(_))
    ));

    // New holds no longer take from it.
    granted(&reserve(l, "next", "acme", 1, 30).await);
    assert_eq!(
        hold_journal(l, hold_of(l, "next").await).await,
        ["hold base 30 +0 +30"]
    );

    // The batch uses 15: posted to the voided grant; the 25 unused are voided.
    settle(l, "b", &[("i0", succeeded(15)), ("i1", failed())]).await;
    assert_eq!(
        hold_journal(l, hold).await,
        [
            "hold gift 40 +0 +40",
            "settle gift 15 -15 -15",
            "void gift 25 -25 -25"
        ]
    );
    assert_eq!(
        allocations(l, hold).await,
        ["gift 40 (captured 15, released 0, expired 25)"]
    );
    assert_eq!(
        grant_figures(l, "acme", "gift").await,
        "voided remaining 0 held 0 available 0"
    );
    assert_eq!(balance_held(l, "acme").await, (100, 30));
    assert_eq!(available(l, "acme").await, 70);
    t.assert_exact().await;
}

#[tokio::test]
async fn a_grant_id_replays_with_the_same_terms_and_conflicts_with_other_terms() {
    let t = ledger_only().await;
    let l = &t.ledger;
    let now = db_now(l).await;
    let spring = GrantSpec {
        grant_id: Some("spring".into()),
        amount: 50,
        source: GrantSource::Promotion,
        priority: 2,
        expires_at: Some(now + days(30)),
        note: Some("spring promotion".into()),
    };
    let first = l.add_grant("acme", &spring, true).await.unwrap();
    assert!(!first.replayed);
    assert_eq!((first.account.balance, first.grant.amount), (50, 50));
    assert_eq!(
        (
            first.grant.source,
            first.grant.priority,
            first.grant.note.as_deref()
        ),
        (GrantSource::Promotion, 2, Some("spring promotion"))
    );
    assert!(first.grant.expires_at.is_some());

    let again = l.add_grant("acme", &spring, false).await.unwrap();
    assert!(again.replayed);
    assert_eq!(again.grant, first.grant);
    assert_eq!(again.account.balance, 50);
    assert_eq!(account_rows(l, "acme", "grant").await, ["spring 50 +50 +0"]);

    let others = [
        GrantSpec {
            amount: 60,
            ..spring.clone()
        },
        GrantSpec {
            source: GrantSource::Purchase,
            ..spring.clone()
        },
        GrantSpec {
            priority: 1,
            ..spring.clone()
        },
        GrantSpec {
            expires_at: spring
                .expires_at
                .map(|e| e + chrono::Duration::microseconds(1)),
            ..spring.clone()
        },
        GrantSpec {
            expires_at: None,
            ..spring.clone()
        },
        GrantSpec {
            note: None,
            ..spring.clone()
        },
    ];
    for other in &others {
        match l.add_grant("acme", other, false).await {
            Err(LedgerError::GrantConflict { account, grant }) => {
                assert_eq!((account.as_str(), grant.as_str()), ("acme", "spring"))
            }
            other_result => panic!("{other:?}: expected a conflict, got {other_result:?}"),
        }
    }

    // Expiring in the past, with or without an id: refused, nothing added.
    for grant_id in [Some("late".to_string()), None] {
        let late = GrantSpec {
            grant_id,
            expires_at: Some(now - ms(1_000)),
            ..GrantSpec::manual(10)
        };
        assert!(
            matches!(
                l.add_grant("acme", &late, false).await,
                Err(LedgerError::Invalid(_))
            ),
            "{late:?}"
        );
    }
    assert!(matches!(
        l.add_grant("acme", &GrantSpec::manual(0), false).await,
        Err(LedgerError::Invalid(_))
    ));
    assert!(matches!(
        l.add_grant("nobody", &GrantSpec::manual(10), false).await,
        Err(LedgerError::UnknownAccount(_))
    ));
    assert_eq!(l.grants("acme").await.unwrap().len(), 1);
    assert_eq!(balance_held(l, "acme").await, (50, 0));
    assert_eq!(account_rows(l, "acme", "grant").await.len(), 1);
    t.assert_exact().await;
}

/// Reservations (batches and soft holds) race the expiry of a promotion on
/// several accounts, while two sweepers expire grants all along. Whatever
/// the interleaving: `available` is never negative, no hold takes from the
/// promotion at or after its expiry, each of its credits is either held or
/// expired (once), and the audit is exact, before and after everything
/// resolves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reservations_racing_a_grant_expiry_never_overspend_and_count_each_credit_once() {
    const ACCOUNTS: usize = 6;
    const PROMO: i64 = 1_000;
    const BASE: i64 = 100;
    let t = ledger_only().await;
    let l = &t.ledger;
    let start = db_now(l).await;
    let mut accounts = Vec::new();
    for a in 0..ACCOUNTS {
        let account = format!("race-{a}");
        let at = start + ms(400 + 60 * a as i64);
        add(
            l,
            &account,
            spec("promo", PROMO, GrantSource::Promotion, 0, Some(at)),
        )
        .await;
        add(
            l,
            &account,
            spec("base", BASE, GrantSource::Manual, 0, None),
        )
        .await;
        accounts.push(account);
    }
    let last_expiry = start + ms(400 + 60 * (ACCOUNTS as i64 - 1));
    // Reservations go on until 250 ms past the last expiry (database clock).
    let until = last_expiry + ms(250);
    let done = Arc::new(AtomicBool::new(false));

    let sweepers: Vec<_> = (0..2)
        .map(|_| {
            let (ledger, done) = (l.clone(), done.clone());
            tokio::spawn(async move {
                let mut expired = 0;
                while !done.load(Ordering::Relaxed) {
                    expired += ledger.expire_grants(100).await.expect("expire grants");
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                expired
            })
        })
        .collect();
    let sampler = {
        let (ledger, done, accounts) = (l.clone(), done.clone(), accounts.clone());
        tokio::spawn(async move {
            let mut samples = 0;
            while !done.load(Ordering::Relaxed) {
                for r in query(
                    &ledger,
                    "SELECT id, holdfast_available(id), balance - held FROM accounts WHERE id = ANY($1)",
                    &[&accounts],
                )
                .await
                {
                    let (id, free, left): (String, i64, i64) = (r.get(0), r.get(1), r.get(2));
                    assert!(free >= 0 && left >= 0, "{id}: available {free}, balance - held {left}");
                }
                samples += 1;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            samples
        })
    };
    let reservers: Vec<_> = accounts
        .iter()
        .enumerate()
        .map(|(a, account)| {
            let (ledger, account) = (l.clone(), account.clone());
            tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(a as u64);
                let (mut granted, mut denied) = (0, 0);
                for n in 0.. {
                    if db_now(&ledger).await > until {
                        break;
                    }
                    if rng.random_bool(0.25) {
                        let amount = rng.random_range(1..=6);
                        match ledger.reserve_soft(&account, amount, LONG).await {
                            Ok(_) => granted += 1,
                            Err(LedgerError::Insufficient { .. }) => denied += 1,
                            Err(e) => panic!("soft hold of {amount} on {account}: {e}"),
                        }
                    } else {
                        let (items, cost) = (rng.random_range(1..=3), rng.random_range(1..=4));
                        let req: BatchRequest = serde_json::from_value(request(
                            &format!("{account}-{n}"),
                            &account,
                            items,
                            cost,
                        ))
                        .unwrap();
                        match ledger.reserve(&reserve_input(&req, LONG, LONG)).await {
                            Ok(r) => match r.decision {
                                Decision::Granted(_) => granted += 1,
                                Decision::Insufficient(_) => denied += 1,
                                other => panic!("{other:?}"),
                            },
                            Err(e) => panic!("batch {} on {account}: {e}", req.batch_id),
                        }
                    }
                }
                (granted, denied)
            })
        })
        .collect();
    for r in reservers {
        let (granted, _) = r.await.expect("a reserver");
        assert!(granted > 0);
    }
    done.store(true, Ordering::Relaxed);
    let mut swept = 0;
    for s in sweepers {
        swept += s.await.expect("a sweeper");
    }
    assert!(sampler.await.expect("the sampler") > 0);
    swept += l.expire_grants(100).await.unwrap();

    let mut expired_total = 0;
    let (mut promo_holds, mut base_holds) = (0, 0);
    for account in &accounts {
        let promo = grant(l, account, "promo").await;
        assert_eq!(promo.state, "expired", "{account}");
        assert_eq!(
            promo.remaining, promo.held,
            "{account}: only what holds took is left"
        );
        let r = &query(
            l,
            "SELECT COALESCE(sum(j.amount) FILTER (WHERE j.kind = 'hold'), 0)::int8,
                    count(*) FILTER (WHERE j.kind = 'hold' AND j.at >= g.expires_at),
                    COALESCE(sum(j.amount) FILTER (WHERE j.kind = 'grant_expire'), 0)::int8,
                    count(*) FILTER (WHERE j.kind = 'grant_expire'),
                    count(*) FILTER (WHERE j.kind NOT IN ('grant', 'hold', 'grant_expire'))
             FROM journal j JOIN grants g ON g.account_id = j.account_id AND g.id = j.grant_id
             WHERE j.account_id = $1 AND j.grant_id = 'promo'",
            &[account],
        )
        .await[0];
        let (taken, late, expired, expiries, other): (i64, i64, i64, i64, i64) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        assert_eq!(
            late, 0,
            "{account}: a hold took from the promotion past its expiry"
        );
        assert!(
            expiries <= 1,
            "{account}: the promotion expired {expiries} times"
        );
        assert_eq!(other, 0, "{account}: nothing resolved yet");
        assert_eq!(taken, promo.held, "{account}");
        assert_eq!(
            taken + expired,
            PROMO,
            "{account}: each credit held or expired, once"
        );
        expired_total += expired;
        let base = grant(l, account, "base").await;
        assert_eq!(base.remaining, BASE);
        assert_eq!(available(l, account).await, BASE - base.held);
        let (balance, held) = balance_held(l, account).await;
        assert_eq!(
            (balance, held),
            (PROMO + BASE - expired, promo.held + base.held)
        );
        promo_holds += (promo.held > 0) as i32;
        base_holds += (base.held > 0) as i32;
    }
    assert_eq!(swept, expired_total, "expire_grants reports what expired");
    assert!(
        promo_holds > 0 && base_holds > 0,
        "reservations ran before and after the expiries ({promo_holds} accounts held promotion credits, {base_holds} base credits)"
    );
    t.assert_exact().await;

    // Everything resolves: what holds do not use of the promotion expires.
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    let pending: Vec<(String, String)> = query(
        l,
        "SELECT batch_id, item_id FROM items WHERE state = 'pending' ORDER BY batch_id, item_id",
        &[],
    )
    .await
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect();
    let settlements: Vec<Settlement> = pending
        .into_iter()
        .map(|(batch_id, item_id)| Settlement {
            batch_id,
            item_id,
            outcome: match rng.random_range(0..3) {
                0 => failed(),
                1 => succeeded(1),
                _ => ItemOutcome::Succeeded { actual_cost: None },
            },
        })
        .collect();
    for chunk in settlements.chunks(50) {
        l.settle(chunk).await.unwrap();
    }
    let soft: Vec<Uuid> = query(l, "SELECT id FROM holds WHERE state = 'open'", &[])
        .await
        .iter()
        .map(|r| r.get(0))
        .collect();
    for id in soft {
        l.cancel_soft(&id.to_string()).await.unwrap();
    }
    for account in &accounts {
        let promo = grant(l, account, "promo").await;
        assert_eq!((promo.remaining, promo.held), (0, 0), "{account}");
        let r = &query(
            l,
            "SELECT COALESCE(sum(amount) FILTER (WHERE kind = 'settle'), 0)::int8,
                    COALESCE(sum(amount) FILTER (WHERE kind = 'grant_expire'), 0)::int8,
                    count(*) FILTER (WHERE kind = 'release')
             FROM journal WHERE account_id = $1 AND grant_id = 'promo'",
            &[account],
        )
        .await[0];
        let (settled, expired, released): (i64, i64, i64) = (r.get(0), r.get(1), r.get(2));
        assert_eq!(
            released, 0,
            "{account}: nothing went back to the expired promotion"
        );
        assert_eq!(settled + expired, PROMO, "{account}");
        let base = grant(l, account, "base").await;
        assert_eq!(base.held, 0);
        assert_eq!(balance_held(l, account).await, (base.remaining, 0));
        assert_eq!(available(l, account).await, base.remaining);
    }
    t.assert_exact().await;
}

/// Captures and closes of batches holding a promotion's credits race its
/// expiry (and two sweepers). Whatever the interleaving: a close before the
/// expiry returns the unused part to the promotion (which then expires with
/// its free part), a close after it lets that part expire with the grant;
/// never both, never neither; every credit is settled or expired once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn captures_and_closes_racing_a_grant_expiry_post_each_credit_once() {
    const ACCOUNTS: usize = 4;
    const BATCHES: usize = 30;
    const PROMO: i64 = 1_000;
    const BASE: i64 = 100;
    let t = ledger_only().await;
    let l = &t.ledger;
    let expires = db_now(l).await + ms(3_000);
    let mut accounts = Vec::new();
    for a in 0..ACCOUNTS {
        let account = format!("close-{a}");
        add(
            l,
            &account,
            spec("promo", PROMO, GrantSource::Promotion, 0, Some(expires)),
        )
        .await;
        add(
            l,
            &account,
            spec("base", BASE, GrantSource::Manual, 0, None),
        )
        .await;
        for b in 0..BATCHES {
            granted(&reserve(l, &format!("{account}-{b}"), &account, 2, 10).await);
        }
        accounts.push(account);
    }
    assert!(
        db_now(l).await < expires - ms(400),
        "reserving took too long for this test"
    );
    let done = Arc::new(AtomicBool::new(false));
    let sweepers: Vec<_> = (0..2)
        .map(|_| {
            let (ledger, done) = (l.clone(), done.clone());
            tokio::spawn(async move {
                while !done.load(Ordering::Relaxed) {
                    ledger.expire_grants(100).await.expect("expire grants");
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        })
        .collect();
    // From 300 ms before the expiry, each account's batches capture and close
    // one after the other, a little apart.
    wait_until_past(l, expires - ms(300)).await;
    let closers: Vec<_> = accounts
        .iter()
        .map(|account| {
            let (ledger, account) = (l.clone(), account.clone());
            tokio::spawn(async move {
                for b in 0..BATCHES {
                    let batch = format!("{account}-{b}");
                    settle(&ledger, &batch, &[("i0", succeeded(4))]).await;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    settle(&ledger, &batch, &[("i1", failed())]).await;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        })
        .collect();
    for c in closers {
        c.await.expect("a closer");
    }
    wait_until_past(l, expires).await;
    done.store(true, Ordering::Relaxed);
    for s in sweepers {
        s.await.expect("a sweeper");
    }
    l.expire_grants(100).await.unwrap();

    let (mut closed_before, mut closed_after) = (0, 0);
    for account in &accounts {
        assert_eq!(
            grant_figures(l, account, "promo").await,
            "expired remaining 0 held 0 available 0",
            "{account}"
        );
        let rows = query(
            l,
            "SELECT id, kind, hold_id IS NOT NULL, amount FROM journal
             WHERE account_id = $1 AND grant_id = 'promo' AND kind IN ('settle', 'release', 'grant_expire')
             ORDER BY id",
            &[account],
        )
        .await;
        let sweep: Vec<(i64, i64)> = rows
            .iter()
            .filter(|r| r.get::<_, String>(1) == "grant_expire" && !r.get::<_, bool>(2))
            .map(|r| (r.get(0), r.get(3)))
            .collect();
        assert_eq!(
            sweep.len(),
            1,
            "{account}: the promotion expired once: {sweep:?}"
        );
        let (sweep_id, swept) = sweep[0];
        let (mut settled, mut released, mut expired_with_holds) = (0, 0, 0);
        for r in &rows {
            let (id, kind, of_hold, amount): (i64, String, bool, i64) =
                (r.get(0), r.get(1), r.get(2), r.get(3));
            match (kind.as_str(), of_hold) {
                ("settle", _) => settled += amount,
                ("release", _) => {
                    assert!(
                        id < sweep_id,
                        "{account}: released to the promotion after it expired"
                    );
                    released += amount;
                }
                ("grant_expire", true) => {
                    assert!(
                        id > sweep_id,
                        "{account}: a hold let credits expire before the promotion did"
                    );
                    expired_with_holds += amount;
                }
                _ => {}
            }
        }
        assert_eq!(settled, 4 * BATCHES as i64, "{account}");
        assert_eq!(
            released + expired_with_holds,
            16 * BATCHES as i64,
            "{account}"
        );
        // What came back before the expiry expired with the free part.
        assert_eq!(swept, PROMO - 20 * BATCHES as i64 + released, "{account}");
        assert_eq!(settled + swept + expired_with_holds, PROMO, "{account}");
        let allocations = query(
            l,
            "SELECT count(*) FILTER (WHERE captured = 4 AND released + expired = 16
                                       AND (released = 0 OR expired = 0)),
                    count(*), COALESCE(sum(released), 0)::int8, COALESCE(sum(expired), 0)::int8
             FROM hold_allocations WHERE account_id = $1 AND grant_id = 'promo'",
            &[account],
        )
        .await;
        let (right, all, a_released, a_expired): (i64, i64, i64, i64) = (
            allocations[0].get(0),
            allocations[0].get(1),
            allocations[0].get(2),
            allocations[0].get(3),
        );
        assert_eq!((right, all), (BATCHES as i64, BATCHES as i64), "{account}");
        assert_eq!(
            (a_released, a_expired),
            (released, expired_with_holds),
            "{account}"
        );
        closed_before += released / 16;
        closed_after += expired_with_holds / 16;
        assert_eq!(
            grant_figures(l, account, "base").await,
            "active remaining 100 held 0 available 100"
        );
        assert_eq!(balance_held(l, account).await, (BASE, 0));
    }
    assert!(
        closed_before > 0 && closed_after > 0,
        "closes ran before ({closed_before}) and after ({closed_after}) the expiry"
    );
    t.assert_exact().await;
}

/// Wait until a statement of this database whose text is like `pattern`
/// waits for a lock.
async fn waiting_on_a_lock(ledger: &Ledger, pattern: &str) {
    eventually(
        &format!("a statement like `{pattern}` waits for a lock"),
        || async {
            let n: i64 = query(
                ledger,
                "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE $1",
                &[&pattern],
            )
            .await[0]
                .get(0);
            (n > 0).then_some(())
        },
    )
    .await
}

/// A void holds the account row; a soft hold waits for it. The soft hold
/// must be decided on what the void left (refused as insufficient), not on
/// the credits the voided grant had before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soft_hold_waiting_on_a_void_is_decided_on_what_the_void_left() {
    let t = ledger_only().await;
    let l = &t.ledger;
    add(l, "acme", spec("gift", 80, GrantSource::Promotion, 0, None)).await;
    add(l, "acme", spec("base", 20, GrantSource::Manual, 0, None)).await;

    let mut other = l.pool().get().await.unwrap();
    let void = other.transaction().await.unwrap();
    let voided: i64 = void
        .query_one(
            "SELECT holdfast_void_grant('acme', 'gift', 'withdrawn')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(voided, 80);
    let ledger = l.clone();
    let soft = tokio::spawn(async move { ledger.reserve_soft("acme", 50, LONG).await });
    waiting_on_a_lock(l, "%FROM accounts WHERE id = $1 FOR NO KEY UPDATE%").await;
    void.commit().await.unwrap();

    match soft.await.unwrap() {
        Err(LedgerError::Insufficient {
            requested,
            available,
        }) => assert_eq!((requested, available), (50, 20)),
        other => {
            panic!("expected insufficient (50 requested, 20 left after the void), got {other:?}")
        }
    }
    assert_eq!(balance_held(l, "acme").await, (20, 0));
    t.assert_exact().await;
}

/// A capture that began before a grant's expiry finishes a chunk of a
/// sequential batch while a sweep, after the expiry, holds the account row
/// expiring that grant. The next chunk must be priced on what the sweep
/// left: it no longer fits, the batch stops cleanly, and the capture counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequential_chunk_waiting_on_a_grant_expiry_is_priced_on_what_the_expiry_left() {
    let t = ledger_only().await;
    let l = &t.ledger;
    let expires = db_now(l).await + ms(2_000);
    add(
        l,
        "acme",
        spec("promo", 100, GrantSource::Promotion, 0, Some(expires)),
    )
    .await;
    add(l, "acme", spec("base", 5, GrantSource::Manual, 0, None)).await;
    let mut req = request("seq", "acme", 3, 20);
    req["mode"] = json!("sequential");
    let req: BatchRequest = serde_json::from_value(req).unwrap();
    let input = holdfast_common::ledger::ReserveInput {
        chunk_size: 1,
        ..reserve_input(&req, LONG, LONG)
    };
    granted(&l.reserve(&input).await.unwrap().decision);
    let hold = hold_of(l, "seq").await;
    assert_eq!(hold_journal(l, hold).await, ["hold promo 20 +0 +20"]);

    // The capture starts before the expiry and waits for the batch row.
    let mut c1 = l.pool().get().await.unwrap();
    let batch_lock = c1.transaction().await.unwrap();
    batch_lock
        .execute("SELECT 1 FROM batches WHERE id = 'seq' FOR UPDATE", &[])
        .await
        .unwrap();
    let ledger = l.clone();
    let capture = tokio::spawn(async move {
        ledger
            .settle(&[Settlement {
                batch_id: "seq".into(),
                item_id: "i0".into(),
                outcome: succeeded(20),
            }])
            .await
    });
    waiting_on_a_lock(l, "%FROM batches%FOR UPDATE%").await;
    assert!(
        query(l, "SELECT now() < $1", &[&expires]).await[0].get::<_, bool>(0),
        "the capture began before the expiry (setting up took over 2 s?)"
    );

    // After the expiry a sweep takes the account row and expires the
    // promotion's free 80; the capture then waits for the account row.
    wait_until_past(l, expires).await;
    let mut c2 = l.pool().get().await.unwrap();
    let sweep = c2.transaction().await.unwrap();
    let expired: i64 = sweep
        .query_one(
            "SELECT COALESCE(sum(expired), 0)::int8 FROM holdfast_expire_grants('acme')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(expired, 80);
    batch_lock.commit().await.unwrap();
    waiting_on_a_lock(l, "%FROM accounts WHERE id = $1 FOR NO KEY UPDATE%").await;
    sweep.commit().await.unwrap();

    let report = capture.await.unwrap().expect("the capture is settled");
    assert_eq!(
        report.closed.len(),
        1,
        "the batch stops: 20 do not fit in 5"
    );
    let b = l.batch("seq").await.unwrap().unwrap();
    assert_eq!(
        (b.state.as_str(), b.figures.captured, b.figures.skipped),
        ("completed", 20, 2)
    );
    assert_eq!(
        grant_figures(l, "acme", "promo").await,
        "expired remaining 0 held 0 available 0"
    );
    assert_eq!(balance_held(l, "acme").await, (5, 0));
    t.assert_exact().await;
}

/// The migration files, in version order: (version, file name, SQL).
fn migrations() -> Vec<(u32, String, String)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let mut all: Vec<(u32, String, String)> = std::fs::read_dir(&dir)
        .expect("the migrations directory")
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter_map(|name| {
            let version = name.strip_prefix('V')?.split("__").next()?.parse().ok()?;
            let sql = std::fs::read_to_string(dir.join(&name)).unwrap();
            Some((version, name, sql))
        })
        .collect();
    all.sort();
    all
}

/// Apply the migrations whose version is in `versions`, each in a
/// transaction of its own, as refinery does.
async fn apply(client: &mut tokio_postgres::Client, versions: impl std::ops::RangeBounds<u32>) {
    for (version, name, sql) in migrations() {
        if versions.contains(&version) {
            let tx = client.transaction().await.unwrap();
            tx.batch_execute(&sql)
                .await
                .unwrap_or_else(|e| panic!("{name}: {e:?}"));
            tx.commit().await.unwrap();
        }
    }
}

/// A V4 ledger as the V4 code left it: `acme` was granted 100, a batch
/// closed (20 of 30 captured, 10 released), a soft hold of 5 expired, and a
/// batch is running (40 held, 10 captured so far, one item pending);
/// `spent` spent all it had; `idle` never had anything.
const V4_LEDGER: &str = "
INSERT INTO accounts (id) VALUES ('acme'), ('spent'), ('idle');
INSERT INTO journal (account_id, kind, amount, balance_delta, note) VALUES
    ('acme', 'grant', 100, 100, 'v4'), ('spent', 'grant', 10, 10, 'v4');
UPDATE accounts SET balance = 100 WHERE id = 'acme';
UPDATE accounts SET balance = 10 WHERE id = 'spent';

INSERT INTO holds (id, account_id, amount, captured, released, state, close_reason, closed_at) VALUES
    ('00000000-0000-0000-0000-00000000000a', 'acme', 30, 20, 10, 'closed', 'completed', now()),
    ('00000000-0000-0000-0000-00000000000c', 'spent', 10, 10, 0, 'closed', 'completed', now());
INSERT INTO holds (id, account_id, amount, captured, released, state, close_reason, expires_at, closed_at) VALUES
    ('00000000-0000-0000-0000-00000000000d', 'acme', 5, 0, 5, 'expired', 'ttl', now() - interval '1 hour', now());
INSERT INTO holds (id, account_id, amount, captured) VALUES
    ('00000000-0000-0000-0000-00000000000b', 'acme', 40, 10);
INSERT INTO batches (id, account_id, request_hash, mode, state, decision, hold_id, item_count, run_count,
                     succeeded, deadline_at, dispatched_at, closed_at) VALUES
    ('old', 'acme', '\\x00', 'all_or_nothing', 'completed', '{}', '00000000-0000-0000-0000-00000000000a',
     2, 2, 2, now() + interval '1 hour', now(), now()),
    ('gone', 'spent', '\\x01', 'all_or_nothing', 'completed', '{}', '00000000-0000-0000-0000-00000000000c',
     1, 1, 1, now() + interval '1 hour', now(), now()),
    ('running', 'acme', '\\x02', 'all_or_nothing', 'dispatched', '{}', '00000000-0000-0000-0000-00000000000b',
     2, 2, 1, now() + interval '1 hour', now(), NULL);
INSERT INTO items (batch_id, item_id, position, estimated_cost, reserved, state, captured, settled_at) VALUES
    ('old', 'a', 0, 15, 15, 'succeeded', 15, now()),
    ('old', 'b', 1, 15, 15, 'succeeded', 5, now()),
    ('gone', 'a', 0, 10, 10, 'succeeded', 10, now()),
    ('running', 'x', 0, 20, 20, 'succeeded', 10, now()),
    ('running', 'y', 1, 20, 20, 'pending', 0, NULL);
INSERT INTO journal (account_id, hold_id, batch_id, item_id, kind, amount, balance_delta, held_delta, note) VALUES
    ('acme', '00000000-0000-0000-0000-00000000000a', 'old', NULL, 'hold', 30, 0, 30, NULL),
    ('acme', '00000000-0000-0000-0000-00000000000a', 'old', 'a', 'capture', 15, 0, 0, NULL),
    ('acme', '00000000-0000-0000-0000-00000000000a', 'old', 'b', 'capture', 5, 0, 0, NULL),
    ('acme', '00000000-0000-0000-0000-00000000000a', 'old', NULL, 'settle', 20, -20, -20, 'completed'),
    ('acme', '00000000-0000-0000-0000-00000000000a', 'old', NULL, 'release', 10, 0, -10, 'completed'),
    ('acme', '00000000-0000-0000-0000-00000000000d', NULL, NULL, 'hold', 5, 0, 5, 'soft hold'),
    ('acme', '00000000-0000-0000-0000-00000000000d', NULL, NULL, 'expire', 5, 0, -5, 'ttl'),
    ('acme', '00000000-0000-0000-0000-00000000000b', 'running', NULL, 'hold', 40, 0, 40, NULL),
    ('acme', '00000000-0000-0000-0000-00000000000b', 'running', 'x', 'capture', 10, 0, 0, NULL),
    ('spent', '00000000-0000-0000-0000-00000000000c', 'gone', NULL, 'hold', 10, 0, 10, NULL),
    ('spent', '00000000-0000-0000-0000-00000000000c', 'gone', 'a', 'capture', 10, 0, 0, NULL),
    ('spent', '00000000-0000-0000-0000-00000000000c', 'gone', NULL, 'settle', 10, -10, -10, 'completed'),
    ('spent', '00000000-0000-0000-0000-00000000000c', 'gone', NULL, 'release', 0, 0, 0, 'completed');
UPDATE accounts SET balance = 80, held = 40 WHERE id = 'acme';
UPDATE accounts SET balance = 0 WHERE id = 'spent';
";

/// refinery can migrate to a target version (`Runner::set_target`), but the
/// embedded runner is private to `holdfast_common::database` and this crate
/// does not depend on refinery: the migration files are applied here as
/// refinery applies them, each in a transaction of its own, V1 to V4, then
/// V5 on a ledger that V4 left behind; the migrations after V5 follow
/// before today's ledger code works on it.
#[tokio::test]
async fn a_v4_ledger_migrated_to_v5_gets_an_opening_grant_and_stays_exact() {
    let conn = unique_connections();
    let _cleanup = Cleanup { conn: conn.clone() };
    holdfast_common::database::create_if_missing(&conn.database_url)
        .await
        .unwrap();
    let pool = holdfast_common::database::pool(&conn.database_url, 4).unwrap();
    {
        let mut client = pool.get().await.unwrap();
        apply(&mut client, ..=4).await;
        client
            .batch_execute(V4_LEDGER)
            .await
            .expect("the V4 ledger");
        // The V4 ledger is consistent as the V4 audit saw it.
        let r = client
            .query_one(
                "SELECT sum(balance_delta)::int8, sum(held_delta)::int8 FROM journal WHERE account_id = 'acme'",
                &[],
            )
            .await
            .unwrap();
        assert_eq!((r.get::<_, i64>(0), r.get::<_, i64>(1)), (80, 40));
        apply(&mut client, 5..=5).await;
    }
    let l = &Ledger::new(pool.clone());

    // Today's ledger code (the audit too) reads the grants with the columns
    // of the later migrations, and the spenders' tables (V10): apply them
    // first (they add columns and empty tables, not rows).
    apply(&mut pool.get().await.unwrap(), 6..).await;
    let audit = l.audit().await.unwrap();
    assert!(
        audit.is_empty(),
        "drift after the later migrations: {audit:#?}"
    );

    let grants = l.grants("acme").await.unwrap();
    assert_eq!(grants.len(), 1);
    let g = &grants[0];
    assert_eq!(
        (
            g.grant_id.as_str(),
            g.source,
            g.priority,
            g.amount,
            g.remaining,
            g.held,
            g.available
        ),
        ("opening", GrantSource::Manual, 0, 80, 80, 40, 40)
    );
    assert_eq!(
        (g.state.as_str(), g.expires_at.as_deref()),
        ("active", None)
    );
    assert!(l.grants("spent").await.unwrap().is_empty());
    assert!(l.grants("idle").await.unwrap().is_empty());
    let running: Uuid = "00000000-0000-0000-0000-00000000000b".parse().unwrap();
    assert_eq!(
        allocations(l, running).await,
        ["opening 40 (captured 0, released 0, expired 0)"]
    );
    assert_eq!(
        query(l, "SELECT count(*) FROM hold_allocations", &[]).await[0].get::<_, i64>(0),
        1,
        "only the open hold took from a grant"
    );
    // Every past movement of acme is attributed to its opening grant; spent has none.
    let r = &query(
        l,
        "SELECT count(*) FILTER (WHERE (balance_delta <> 0 OR held_delta <> 0) AND grant_id IS DISTINCT FROM 'opening' AND account_id = 'acme'),
                count(*) FILTER (WHERE grant_id IS NOT NULL AND account_id <> 'acme')
         FROM journal",
        &[],
    )
    .await[0];
    assert_eq!((r.get::<_, i64>(0), r.get::<_, i64>(1)), (0, 0));
    assert_eq!(available(l, "acme").await, 40);
    assert_eq!(available(l, "idle").await, 0);

    // The running batch finishes under today's code: its captures are posted to the
    // opening grant and the rest returns to it.
    settle(l, "running", &[("y", succeeded(15))]).await;
    let b = l.batch("running").await.unwrap().unwrap();
    assert_eq!(
        (b.state.as_str(), b.figures.captured, b.figures.released),
        ("completed", 25, 15)
    );
    assert_eq!(
        hold_journal(l, running).await,
        [
            "hold opening 40 +0 +40",
            "settle opening 25 -25 -25",
            "release opening 15 +0 -15"
        ]
    );
    assert_eq!(
        grant_figures(l, "acme", "opening").await,
        "active remaining 55 held 0 available 55"
    );
    assert_eq!(balance_held(l, "acme").await, (55, 0));

    // The opening grant is an ordinary manual grant: it burns after a promotion.
    let in_a_week = Some(db_now(l).await + days(7));
    add(
        l,
        "acme",
        spec("promo", 10, GrantSource::Promotion, 0, in_a_week),
    )
    .await;
    granted(&reserve(l, "new", "acme", 1, 20).await);
    assert_eq!(
        hold_journal(l, hold_of(l, "new").await).await,
        ["hold promo 10 +0 +10", "hold opening 10 +0 +10"]
    );
    let audit = l.audit().await.unwrap();
    assert!(audit.is_empty(), "drift: {audit:#?}");
}
