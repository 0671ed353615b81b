//! Allowances: periods follow the calendar from their anchor; each period's
//! `plan` grant is issued exactly once, even by reconcilers racing each
//! other; missed periods are caught up in order with their rollover capped;
//! a reset during a running batch leaves the batch what it holds; changes
//! and stops apply from the next period on; bad input is named field by
//! field; the command line manages allowances too.
//!
//! Period boundaries come from the database clock (`SELECT now()`), as the
//! issuance does; a test that needs a boundary soon computes it there.

use crate::support;

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use holdfast::fleet::{HttpAddr, Roles};
use holdfast_common::ledger::{
    AllowanceSpec, AllowanceTerms, ItemOutcome, LedgerError, Period, Settlement,
};
use holdfast_common::messages::BatchRequest;
use serde_json::{json, Value};
use support::*;

const TOKEN: &str = "allowance-admin-token";

/// Execution timeout and dispatch grace of the batches reserved here.
const LONG: std::time::Duration = std::time::Duration::from_secs(600);

/// A database and a namespace, no roles running: the test drives the sweeps.
async fn ledger_only() -> TestFleet {
    TestFleet::start_with(fast_settings(), Roles::default(), None).await
}

fn terms(amount: i64, period: Period, rollover_cap: i64) -> AllowanceTerms {
    AllowanceTerms {
        amount,
        period,
        rollover_cap,
    }
}

async fn allow(
    t: &TestFleet,
    account: &str,
    id: &str,
    terms: AllowanceTerms,
    anchor: DateTime<Utc>,
) {
    let spec = AllowanceSpec {
        allowance_id: Some(id.into()),
        terms,
        anchor: Some(anchor),
    };
    let a = t.ledger.create_allowance(account, &spec).await.unwrap();
    assert!(!a.replayed, "{spec:?} is new");
}

/// What the test reads straight from its database.
trait Database {
    async fn rows(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Vec<tokio_postgres::Row>;
    /// The database's clock (the one allowance periods follow).
    async fn db_now(&self) -> DateTime<Utc>;
    /// Wait until the database's clock is past `at`.
    async fn wait_db_past(&self, at: DateTime<Utc>);
}

impl Database for TestFleet {
    async fn rows(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Vec<tokio_postgres::Row> {
        let client = self.ledger.pool().get().await.expect("a connection");
        client.query(sql, params).await.expect(sql)
    }

    async fn db_now(&self) -> DateTime<Utc> {
        self.rows("SELECT now()", &[]).await[0].get(0)
    }

    async fn wait_db_past(&self, at: DateTime<Utc>) {
        eventually(&format!("the database clock passes {at}"), || async {
            let past: bool = self.rows("SELECT now() > $1", &[&at]).await[0].get(0);
            past.then_some(())
        })
        .await
    }
}

/// `holdfast_credits_granted_total{source="plan"}` in this process.
fn plan_credits_granted() -> f64 {
    holdfast_common::telemetry::metrics()
        .render()
        .lines()
        .find_map(|l| l.strip_prefix("holdfast_credits_granted_total{source=\"plan\"}"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// One grant issued by an allowance.
#[derive(Debug, PartialEq, Eq)]
struct Issued {
    id: String,
    amount: i64,
    remaining: i64,
    state: String,
    effective_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    period_start: Option<DateTime<Utc>>,
}

/// The grants allowance `allowance` of `account` issued, by period, the
/// period's grant before its rollover grant.
async fn issued(t: &TestFleet, account: &str, allowance: &str) -> Vec<Issued> {
    t.rows(
        "SELECT id, amount, remaining, state, effective_at, expires_at, period_start FROM grants
         WHERE account_id = $1 AND allowance_id = $2 ORDER BY effective_at, id",
        &[&account, &allowance],
    )
    .await
    .iter()
    .map(|r| Issued {
        id: r.get(0),
        amount: r.get(1),
        remaining: r.get(2),
        state: r.get(3),
        effective_at: r.get(4),
        expires_at: r.get(5),
        period_start: r.get(6),
    })
    .collect()
}

#[tokio::test]
async fn periods_follow_the_calendar_from_the_anchor() {
    let t = ledger_only().await;
    let after = |anchor: &str, period: &str, at: &str| {
        let (anchor, period, at) = (anchor.to_string(), period.to_string(), at.to_string());
        let t = &t;
        async move {
            let r = t
                .rows(
                    "SELECT to_char(holdfast_period_after($1::text::timestamptz, $2, $3::text::timestamptz)
                                    AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI')",
                    &[&anchor, &period, &at],
                )
                .await;
            r[0].get::<_, String>(0)
        }
    };
    let jan31 = "2027-01-31T10:00:00Z";
    // Each boundary is anchor + k months: the 31st where the month has one,
    // else the month's last day; never drifting to the 28th.
    let mut at = jan31.to_string();
    let mut months = Vec::new();
    for _ in 0..4 {
        let next = after(jan31, "month", &at).await;
        at = format!("{}:00Z", next.replace(' ', "T"));
        months.push(next);
    }
    assert_eq!(
        months,
        [
            "2027-02-28 10:00",
            "2027-03-31 10:00",
            "2027-04-30 10:00",
            "2027-05-31 10:00"
        ]
    );
    assert_eq!(
        after("2028-01-31T10:00:00Z", "month", "2028-02-01T00:00:00Z").await,
        "2028-02-29 10:00",
        "a leap year's February"
    );
    // Before the anchor, the first period starts at the anchor; a boundary
    // is not after itself.
    assert_eq!(
        after(jan31, "month", "2026-06-01T00:00:00Z").await,
        "2027-01-31 10:00"
    );
    assert_eq!(after(jan31, "month", jan31).await, "2027-02-28 10:00");
    assert_eq!(
        after(jan31, "day", "2027-03-05T09:59:59Z").await,
        "2027-03-05 10:00"
    );
    assert_eq!(
        after(jan31, "week", "2027-03-05T09:59:59Z").await,
        "2027-03-07 10:00"
    );
    // In UTC, whatever the session's time zone.
    let client = t.ledger.pool().get().await.unwrap();
    client
        .batch_execute("SET TimeZone = 'America/New_York'")
        .await
        .unwrap();
    let r = client
        .query_one(
            "SELECT holdfast_period_after('2027-03-01T00:00:00Z', 'month', '2027-03-20T00:00:00Z')
                    = '2027-04-01T00:00:00Z'::timestamptz",
            &[],
        )
        .await
        .unwrap();
    assert!(r.get::<_, bool>(0));
    client.batch_execute("RESET TimeZone").await.unwrap();
}

#[tokio::test]
async fn two_reconcilers_issue_each_period_exactly_once() {
    let t = ledger_only().await;
    let before = plan_credits_granted();
    let (_amqp1, mut first) = t.reconciler_on(t.another_ledger()).await;
    let (_amqp2, mut second) = t.reconciler_on(t.another_ledger()).await;
    let (one, other) = (t.another_ledger(), t.another_ledger());
    let mut expected = 0;
    for round in 0..12i64 {
        let now = t.db_now().await;
        // Three periods of each allowance have begun (the third ends in an
        // hour), on three accounts: every sweep has something to race for.
        let anchor = now - Duration::days(2) - Duration::hours(23);
        let accounts: Vec<String> = (0..3).map(|i| format!("acme-{round}-{i}")).collect();
        for (i, account) in accounts.iter().enumerate() {
            t.ledger.create_account(account).await.unwrap();
            let amount = 10 + round * 3 + i as i64;
            allow(&t, account, "plan", terms(amount, Period::Day, 5), anchor).await;
            expected += 3 * amount;
        }
        // Whole sweeps racing, or the issuance alone (a tighter race).
        let issued_now = if round % 2 == 0 {
            let (a, b) = tokio::join!(first.sweep_once(), second.sweep_once());
            let (a, b) = (a.unwrap(), b.unwrap());
            a.issued_credits + b.issued_credits
        } else {
            let (a, b) = tokio::join!(one.issue_allowances(100), other.issue_allowances(100));
            a.unwrap() + b.unwrap()
        };
        let round_total: i64 = (0..3).map(|i| 3 * (10 + round * 3 + i)).sum();
        assert_eq!(issued_now, round_total, "round {round}: issued once");
        for account in &accounts {
            let grants = issued(&t, account, "plan").await;
            let mut per_period: BTreeMap<DateTime<Utc>, usize> = BTreeMap::new();
            for g in grants.iter().filter(|g| g.period_start.is_some()) {
                *per_period.entry(g.effective_at).or_default() += 1;
            }
            assert_eq!(
                per_period.values().collect::<Vec<_>>(),
                [&1, &1, &1],
                "round {round}, {account}: one grant per period: {grants:#?}"
            );
            let rollovers = grants.iter().filter(|g| g.period_start.is_none()).count();
            assert_eq!(rollovers, 2, "{account}: a rollover into each later period");
        }
    }
    // Nothing is left to issue, and the counter counted each period once.
    let (a, b) = tokio::join!(first.sweep_once(), second.sweep_once());
    assert_eq!(a.unwrap().issued_credits + b.unwrap().issued_credits, 0);
    assert_eq!(plan_credits_granted() - before, expected as f64);

    // Defence in depth: the database refuses a second grant for a period.
    let dup = t
        .ledger
        .pool()
        .get()
        .await
        .unwrap()
        .execute(
            "INSERT INTO grants (account_id, id, amount, remaining, source, allowance_id, period_start)
             SELECT account_id, 'again', 1, 1, 'plan', allowance_id, period_start FROM grants
             WHERE allowance_id IS NOT NULL AND period_start IS NOT NULL LIMIT 1",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(
        dup.code(),
        Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION),
        "{dup}"
    );
    t.assert_exact().await;
}

#[tokio::test]
async fn missed_periods_are_caught_up_in_order_with_the_rollover_capped() {
    let t = ledger_only().await;
    let before = plan_credits_granted();
    let (_amqp, mut reconciler) = t.reconciler().await;
    let now = t.db_now().await;
    t.ledger.create_account("acme").await.unwrap();
    // Four periods have begun; the fourth ends in an hour.
    let anchor = now - Duration::days(3) - Duration::hours(23);
    allow(&t, "acme", "pro", terms(100, Period::Day, 150), anchor).await;
    // The reconciler issued the first period on time, then went down.
    let first = t
        .rows(
            "SELECT grant_id FROM holdfast_issue_allowance('acme', 'pro', 1)",
            &[],
        )
        .await;
    assert_eq!(first.len(), 1);

    let report = reconciler.sweep_once().await.unwrap();
    assert_eq!(report.issued_credits, 300, "the three missed periods");
    // Rolled over: 100 (all the first period left), then 150 twice (the
    // cap, of the 200 each period had). What the cap left behind expired:
    // 50 of the first rollover grant, 100 of the second.
    assert_eq!(report.expired_credits, 150);
    assert_eq!(report.drift, Some(0));
    let anchor = t
        .rows("SELECT anchor FROM allowances WHERE id = 'pro'", &[])
        .await[0]
        .get::<_, DateTime<Utc>>(0);
    let day = |k: i64| anchor + Duration::days(k);
    let label = |k: i64| format!("allowance:pro:{}", day(k).format("%Y-%m-%dT%H:%M:%SZ"));
    let got = issued(&t, "acme", "pro").await;
    let want = |k: i64, rollover: bool, amount: i64, remaining: i64, state: &str| Issued {
        id: if rollover {
            format!("{}:rollover", label(k))
        } else {
            label(k)
        },
        amount,
        remaining,
        state: state.into(),
        effective_at: day(k),
        expires_at: day(k + 1),
        period_start: (!rollover).then(|| day(k)),
    };
    assert_eq!(
        got,
        [
            want(0, false, 100, 0, "expired"),
            want(1, false, 100, 0, "expired"),
            want(1, true, 100, 0, "expired"),
            want(2, false, 100, 0, "expired"),
            want(2, true, 150, 0, "expired"),
            want(3, false, 100, 100, "active"),
            want(3, true, 150, 150, "active"),
        ]
    );
    let moved: Vec<(i64, i64)> = t
        .rows(
            "SELECT COALESCE(sum(amount) FILTER (WHERE balance_delta < 0), 0)::int8,
                    COALESCE(sum(amount) FILTER (WHERE balance_delta > 0), 0)::int8
             FROM journal WHERE account_id = 'acme' AND kind = 'rollover'",
            &[],
        )
        .await
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        moved,
        [(400, 400)],
        "each rollover out of one grant and into another"
    );
    let a = t.ledger.account("acme").await.unwrap();
    assert_eq!((a.balance, a.available), (250, 250));
    let view = t.ledger.allowance("acme", "pro").await.unwrap();
    assert_eq!(
        view.next_period_start.as_deref(),
        Some(holdfast_common::ledger::rfc3339(day(4)).as_str())
    );

    // Nothing twice: the next sweep has nothing to issue.
    let again = reconciler.sweep_once().await.unwrap();
    assert_eq!((again.issued_credits, again.expired_credits), (0, 0));
    assert_eq!(issued(&t, "acme", "pro").await.len(), 7);
    // The first period was issued by hand, outside the ledger's counters.
    assert_eq!(plan_credits_granted() - before, 300.0);
    t.assert_exact().await;
}

#[tokio::test]
async fn a_long_downtime_is_caught_up_in_one_sweep() {
    let t = ledger_only().await;
    let (_amqp, mut reconciler) = t.reconciler().await;
    let now = t.db_now().await;
    t.ledger.create_account("acme").await.unwrap();
    // 300 daily periods have begun: more than one transaction issues.
    let anchor = now - Duration::days(299) - Duration::hours(23);
    allow(&t, "acme", "daily", terms(7, Period::Day, 0), anchor).await;
    let report = reconciler.sweep_once().await.unwrap();
    assert_eq!(report.issued_credits, 300 * 7);
    assert_eq!(report.expired_credits, 299 * 7, "every past period expired");
    let counts = t
        .rows(
            "SELECT count(*), count(DISTINCT period_start), count(*) FILTER (WHERE state = 'active')
             FROM grants WHERE account_id = 'acme' AND allowance_id = 'daily'",
            &[],
        )
        .await;
    let counts: (i64, i64, i64) = (counts[0].get(0), counts[0].get(1), counts[0].get(2));
    assert_eq!(counts, (300, 300, 1));
    assert_eq!(t.available("acme").await, 7);
    assert_eq!(reconciler.sweep_once().await.unwrap().issued_credits, 0);
    t.assert_exact().await;
}

#[tokio::test]
async fn a_monthly_reset_during_a_running_batch_leaves_the_batch_what_it_holds() {
    let t = ledger_only().await;
    let (_amqp, mut reconciler) = t.reconciler().await;
    t.ledger.create_account("acme").await.unwrap();
    t.grant("acme", 1000).await;
    // `reset`: the end of the current monthly period, seconds from now by the
    // database's clock; `k` months back is the anchor (one, unless this is
    // a 29th to 31st that the month before does not have).
    let row = &t
        .rows(
            "SELECT (x + make_interval(secs => 8)) AT TIME ZONE 'UTC',
                    (x + make_interval(secs => 8) - make_interval(months => k)) AT TIME ZONE 'UTC', k
             FROM (SELECT date_trunc('second', now() AT TIME ZONE 'UTC') AS x) v,
                  generate_series(1, 3) k
             WHERE x + make_interval(secs => 8) - make_interval(months => k) + make_interval(months => k)
                   = x + make_interval(secs => 8)
             ORDER BY k LIMIT 1",
            &[],
        )
        .await[0];
    let (reset, anchor, k): (DateTime<Utc>, DateTime<Utc>, i32) =
        (row.get(0), row.get(1), row.get(2));
    allow(&t, "acme", "plan", terms(100, Period::Month, 20), anchor).await;
    let report = reconciler.sweep_once().await.unwrap();
    assert_eq!(report.issued_credits, 100 * i64::from(k));
    let current = issued(&t, "acme", "plan")
        .await
        .into_iter()
        .find(|g| g.period_start.is_some() && g.expires_at == reset)
        .expect("the current period's grant");

    // A batch of five items at 10 takes its 50 from the current period's
    // grant (it expires first), before the reset.
    let req: BatchRequest = serde_json::from_value(request("b", "acme", 5, 10)).unwrap();
    let reserved = t
        .ledger
        .reserve(&reserve_input(&req, LONG, LONG))
        .await
        .unwrap();
    granted(&reserved.decision);
    t.ledger.mark_dispatched(&["b"]).await.unwrap();
    let took = t
        .rows(
            "SELECT al.grant_id, al.amount FROM hold_allocations al
             JOIN batches b ON b.hold_id = al.hold_id WHERE b.id = 'b'",
            &[],
        )
        .await;
    let took: Vec<(String, i64)> = took.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        took,
        [(current.id.clone(), 50)],
        "reserved before the reset"
    );
    let settle = |items: &[(usize, bool)]| {
        let s: Vec<Settlement> = items
            .iter()
            .map(|&(i, ok)| Settlement {
                batch_id: "b".into(),
                item_id: format!("i{i}"),
                outcome: if ok {
                    ItemOutcome::Succeeded {
                        actual_cost: Some(10),
                    }
                } else {
                    ItemOutcome::Failed {
                        reason: "boom".into(),
                    }
                },
            })
            .collect();
        let ledger = t.ledger.clone();
        async move { ledger.settle(&s).await.unwrap() }
    };
    settle(&[(0, true), (1, true)]).await;

    t.wait_db_past(reset).await;
    // An expiry that runs first leaves the ended grant to the issuance, so
    // its unused credits roll over before the rest expires.
    assert_eq!(t.ledger.expire_grants(100).await.unwrap(), 0);
    let report = reconciler.sweep_once().await.unwrap();
    assert_eq!(report.issued_credits, 100, "the new period's grant");
    // Of the ended grant's 50 free credits 20 rolled over, 30 expired (and
    // the 20 rolled into it, if it had a period before it).
    let rolled_in = if k > 1 { 20 } else { 0 };
    assert_eq!(report.expired_credits, 30 + rolled_in);
    let grants = issued(&t, "acme", "plan").await;
    let ended = grants.iter().find(|g| g.id == current.id).unwrap();
    assert_eq!(
        (ended.state.as_str(), ended.remaining),
        ("expired", 50),
        "what the batch holds stays with it"
    );
    let new: Vec<(i64, i64, &str)> = grants
        .iter()
        .filter(|g| g.effective_at == reset)
        .map(|g| (g.amount, g.remaining, g.state.as_str()))
        .collect();
    assert_eq!(new, [(100, 100, "active"), (20, 20, "active")]);

    // The batch completes with what it holds; what it leaves unused of the
    // ended grant expires instead of returning.
    let done = settle(&[(2, true), (3, true), (4, false)]).await;
    assert_eq!(done.closed.len(), 1, "the last item closes the batch");
    let batch = t.ledger.batch("b").await.unwrap().unwrap();
    assert_eq!(
        (
            batch.state.as_str(),
            batch.figures.captured,
            batch.figures.succeeded
        ),
        ("completed", 40, 4)
    );
    let rows: Vec<(String, String, i64)> = t
        .rows(
            "SELECT j.kind, j.grant_id, j.amount FROM journal j JOIN batches b ON b.hold_id = j.hold_id
             WHERE b.id = 'b' AND j.grant_id IS NOT NULL ORDER BY j.id",
            &[],
        )
        .await
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let p = current.id.clone();
    assert_eq!(
        rows,
        [
            ("hold".into(), p.clone(), 50),
            ("settle".into(), p.clone(), 40),
            ("grant_expire".into(), p, 10)
        ]
    );
    let a = t.ledger.account("acme").await.unwrap();
    assert_eq!((a.balance, a.held, a.available), (1120, 0, 1120));
    t.assert_exact().await;
}

/// An HTTP client of the admin API of a fleet (every role, reconciler included).
struct Admin {
    base: String,
    http: reqwest::Client,
}

impl Admin {
    async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(TOKEN);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }
}

async fn api_fleet() -> (TestFleet, Admin) {
    let mut settings = fast_settings();
    settings.http_addr = HttpAddr(Some("127.0.0.1:0".parse().unwrap()));
    settings.api.admin_token = Some(TOKEN.into());
    let t = TestFleet::start_with(settings, Roles::ALL, None).await;
    let base = format!("http://{}", t.fleets[0].http_addr().unwrap());
    (
        t,
        Admin {
            base,
            http: reqwest::Client::new(),
        },
    )
}

#[tokio::test]
async fn changes_and_stops_apply_from_the_next_period() {
    let (t, admin) = api_fleet().await;
    use reqwest::Method;
    t.ledger.create_account("acme").await.unwrap();
    // The current daily period ends at `next`, seconds from now.
    let next: DateTime<Utc> = t
        .rows(
            "SELECT date_trunc('second', now()) + interval '8 seconds'",
            &[],
        )
        .await[0]
        .get(0);
    let anchor = (next - Duration::days(1)).to_rfc3339();
    let at = |t: DateTime<Utc>| holdfast_common::ledger::rfc3339(t);
    let grow = json!({"allowance_id": "grow", "amount": 100, "period": "day", "anchor": anchor});
    let ends = json!({"allowance_id": "ends", "amount": 40, "period": "day", "anchor": anchor});
    let path = "/v1/accounts/acme/allowances";
    for body in [&grow, &ends] {
        let (status, a) = admin.send(Method::POST, path, Some(body.clone())).await;
        assert_eq!(status, 201, "{a}");
        assert_eq!(a["anchor"], at(next - Duration::days(1)));
    }
    // The same id and terms: nothing changes; other terms: 409.
    let (status, _) = admin.send(Method::POST, path, Some(grow.clone())).await;
    assert_eq!(status, 200);
    let mut other = grow.clone();
    other["amount"] = json!(99);
    let (status, problem) = admin.send(Method::POST, path, Some(other)).await;
    assert_eq!(status, 409, "{problem}");
    assert!(problem["type"]
        .as_str()
        .unwrap()
        .ends_with("allowance-conflict"));

    // The reconciler issues the current period of both.
    eventually("the current periods are issued", || async {
        let n = t
            .rows(
                "SELECT count(*) FROM grants WHERE allowance_id IS NOT NULL",
                &[],
            )
            .await[0]
            .get::<_, i64>(0);
        (n == 2).then_some(())
    })
    .await;
    // From the next period: 250 a week, 10 rolling over.
    let (status, a) = admin
        .send(
            Method::PUT,
            &format!("{path}/grow"),
            Some(json!({"amount": 250, "period": "week", "rollover_cap": 10})),
        )
        .await;
    assert_eq!(status, 200, "{a}");
    assert_eq!(
        (a["amount"].clone(), a["period"].clone()),
        (json!(100), json!("day"))
    );
    assert_eq!(
        a["next_terms"],
        json!({"effective_from": at(next), "amount": 250, "period": "week", "rollover_cap": 10}),
        "the change waits for the next period (sent before it began)"
    );
    let (status, a) = admin
        .send(Method::DELETE, &format!("{path}/ends"), None)
        .await;
    assert_eq!(status, 200, "{a}");
    assert_eq!(
        (a["state"].as_str(), a["stops_at"].clone()),
        (Some("stopped"), json!(at(next)))
    );
    assert!(a.get("next_period_start").is_none(), "{a}");
    let (status, again) = admin
        .send(Method::DELETE, &format!("{path}/ends"), None)
        .await;
    assert_eq!(
        (status, &again),
        (200, &a),
        "stopping twice changes nothing"
    );
    let (status, problem) = admin
        .send(
            Method::PUT,
            &format!("{path}/ends"),
            Some(json!({"amount": 1, "period": "day"})),
        )
        .await;
    assert_eq!(status, 409, "{problem}");

    // The next period begins: `grow` issues it on the new terms, `ends` does not.
    t.wait_db_past(next).await;
    let grants = eventually("the next period of `grow` is issued", || async {
        let g = issued(&t, "acme", "grow").await;
        (g.len() == 3).then_some(g)
    })
    .await;
    let new: Vec<(i64, DateTime<Utc>, bool)> = grants
        .iter()
        .filter(|g| g.effective_at == next)
        .map(|g| (g.amount, g.expires_at, g.period_start.is_some()))
        .collect();
    let week = next + Duration::days(7);
    assert_eq!(new, [(250, week, true), (10, week, false)]);
    let ends_grants = eventually("the last period of `ends` expires", || async {
        let g = issued(&t, "acme", "ends").await;
        (g.len() == 1 && g[0].state == "expired").then_some(g)
    })
    .await;
    assert_eq!(ends_grants[0].expires_at, next);

    let view: Value = admin.send(Method::GET, "/v1/accounts/acme", None).await.1;
    let allowances = view["allowances"].as_array().unwrap();
    assert_eq!(allowances.len(), 2, "{view}");
    let g = &allowances[0];
    assert_eq!(
        (
            g["allowance_id"].as_str(),
            g["amount"].as_i64(),
            g["period"].as_str(),
            g["rollover_cap"].as_i64()
        ),
        (Some("grow"), Some(250), Some("week"), Some(10))
    );
    assert_eq!(g["next_period_start"], at(week));
    assert!(g.get("next_terms").is_none(), "{g}");
    // The grants name their allowance and period.
    let plan: Vec<&Value> = view["grants"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["allowance_id"] == "grow" && g["state"] == "active")
        .collect();
    assert_eq!(plan.len(), 2, "{view}");
    assert_eq!(plan[0]["period_start"], at(next));
    assert!(plan[1].get("period_start").is_none(), "the rollover grant");
    assert_eq!(view["available"], 260);
    t.assert_exact().await;
    t.stop().await;
}

#[tokio::test]
async fn bad_allowances_over_http_are_named_field_by_field() {
    let (t, admin) = api_fleet().await;
    use reqwest::Method;
    t.ledger.create_account("acme").await.unwrap();
    let path = "/v1/accounts/acme/allowances";
    let long_ago = (Utc::now() - Duration::days(400)).to_rfc3339();
    for (body, fields) in [
        (json!({"period": "day"}), vec!["amount"]),
        (json!({"amount": 0, "period": "day"}), vec!["amount"]),
        (json!({"amount": "ten", "period": "day"}), vec!["amount"]),
        (json!({"amount": 5}), vec!["period"]),
        (json!({"amount": 5, "period": "year"}), vec!["period"]),
        (json!({"amount": 5, "period": 7}), vec!["period"]),
        (
            json!({"amount": 5, "period": "day", "anchor": "soon"}),
            vec!["anchor"],
        ),
        (
            json!({"amount": 5, "period": "day", "anchor": long_ago}),
            vec!["anchor"],
        ),
        (
            json!({"amount": 5, "period": "day", "rollover_cap": -1}),
            vec!["rollover_cap"],
        ),
        (
            json!({"amount": 5, "period": "day", "rollover_cap": 1.5}),
            vec!["rollover_cap"],
        ),
        (
            json!({"amount": 5, "period": "day", "allowance_id": "x".repeat(65)}),
            vec!["allowance_id"],
        ),
        (
            json!({"amount": 5, "period": "day", "allowance_id": "a\u{7}b"}),
            vec!["allowance_id"],
        ),
        (
            json!({"amount": 5, "period": "day", "allowance_id": 3}),
            vec!["allowance_id"],
        ),
        (
            json!({"amount": -1, "period": "hour", "rollover_cap": "x"}),
            vec!["amount", "period", "rollover_cap"],
        ),
    ] {
        let (status, problem) = admin.send(Method::POST, path, Some(body.clone())).await;
        assert_eq!(status, 400, "{body}: {problem}");
        let named: Vec<&str> = problem["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["field"].as_str().unwrap())
            .collect();
        assert_eq!(named, fields, "{body}: {problem}");
    }
    let (status, a) = admin
        .send(
            Method::POST,
            path,
            Some(json!({"amount": 5, "period": "day"})),
        )
        .await;
    assert_eq!(status, 201, "{a}");
    let id = a["allowance_id"].as_str().unwrap().to_string();
    assert!(id.starts_with("a-"), "a new id: {id}");
    for (body, fields) in [
        (json!({"amount": 5}), vec!["period"]),
        (
            json!({"amount": 5, "period": "day", "anchor": "2030-01-01T00:00:00Z"}),
            vec!["anchor"],
        ),
        (
            json!({"amount": 0, "period": "day", "rollover_cap": -5}),
            vec!["amount", "rollover_cap"],
        ),
    ] {
        let (status, problem) = admin
            .send(Method::PUT, &format!("{path}/{id}"), Some(body.clone()))
            .await;
        assert_eq!(status, 400, "{body}: {problem}");
        let named: Vec<&str> = problem["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["field"].as_str().unwrap())
            .collect();
        assert_eq!(named, fields, "{body}: {problem}");
    }
    let long = "y".repeat(65);
    let (status, problem) = admin
        .send(Method::DELETE, &format!("{path}/{long}"), None)
        .await;
    assert_eq!(status, 400);
    assert_eq!(problem["errors"][0]["field"], "allowance_id", "{problem}");
    for (method, url, body) in [
        (
            Method::PUT,
            format!("{path}/nosuch"),
            Some(json!({"amount": 5, "period": "day"})),
        ),
        (Method::DELETE, format!("{path}/nosuch"), None),
        (
            Method::POST,
            "/v1/accounts/nobody/allowances".to_string(),
            Some(json!({"amount": 5, "period": "day"})),
        ),
    ] {
        let (status, problem) = admin.send(method.clone(), &url, body).await;
        assert_eq!(status, 404, "{method} {url}: {problem}");
    }
    // The ids of allowance grants are reserved.
    let (status, problem) = admin
        .send(
            Method::POST,
            "/v1/accounts/acme/grants",
            Some(json!({"amount": 5, "grant_id": "allowance:x:2027-01-01T00:00:00Z"})),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(problem["errors"][0]["field"], "grant_id", "{problem}");
    // So are they on the ledger.
    let reserved = holdfast_common::ledger::GrantSpec {
        grant_id: Some("allowance:mine".into()),
        ..holdfast_common::ledger::GrantSpec::manual(5)
    };
    assert!(matches!(
        t.ledger.add_grant("acme", &reserved, false).await,
        Err(LedgerError::Invalid(_))
    ));
    // Nothing was created by the refused requests.
    assert_eq!(t.ledger.allowances("acme").await.unwrap().len(), 1);
    t.stop().await;
}

#[tokio::test]
async fn the_command_line_manages_allowances() {
    let t = ledger_only().await;
    t.ledger.create_account("acme").await.unwrap();
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
    let create = [
        "account",
        "allowance",
        "acme",
        "500",
        "--period",
        "month",
        "--anchor",
        "2030-01-31T00:00:00Z",
        "--rollover-cap",
        "100",
        "--allowance-id",
        "pro",
        "--json",
    ];
    let (code, out, err) = run(&create).await;
    assert_eq!(code, Some(0), "{err}");
    let a: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        a,
        json!({"allowance_id": "pro", "amount": 500, "period": "month", "rollover_cap": 100,
               "anchor": "2030-01-31T00:00:00.000Z", "state": "active",
               "next_period_start": "2030-01-31T00:00:00.000Z"})
    );
    let (code, out, _) = run(&create[..create.len() - 1]).await;
    assert_eq!(code, Some(0));
    assert!(out.contains("nothing changed"), "{out}");
    let (code, _, err) = run(&["account", "allowance", "acme", "5", "--period", "year"]).await;
    assert_eq!(code, Some(2));
    assert!(err.contains("day, week or month"), "{err}");
    let (code, _, err) = run(&[
        "account",
        "allowance",
        "acme",
        "5",
        "--period",
        "day",
        "--allowance-id",
        "pro",
    ])
    .await;
    assert_eq!(code, Some(1));
    assert!(err.contains("other terms"), "{err}");
    // Before its first period begins, a change replaces the first terms.
    let (code, out, err) = run(&[
        "account",
        "allowance-change",
        "acme",
        "pro",
        "600",
        "--period",
        "week",
        "--json",
    ])
    .await;
    assert_eq!(code, Some(0), "{err}");
    let a: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (
            a["amount"].clone(),
            a["period"].clone(),
            a["rollover_cap"].clone()
        ),
        (json!(600), json!("week"), json!(0))
    );
    let (code, out, _) = run(&["account", "show", "acme", "--json"]).await;
    assert_eq!(code, Some(0));
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["allowances"][0]["allowance_id"], "pro", "{v}");
    let (code, out, _) = run(&["account", "show", "acme"]).await;
    assert_eq!(code, Some(0));
    assert!(
        out.contains("allowance pro") && out.contains("a week"),
        "{out}"
    );
    // Stopped before its first period: it never issues anything.
    let (code, out, err) = run(&["account", "allowance-stop", "acme", "pro", "--json"]).await;
    assert_eq!(code, Some(0), "{err}");
    let a: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (a["state"].as_str(), a["stops_at"].as_str()),
        (Some("stopped"), Some("2030-01-31T00:00:00.000Z"))
    );
    assert!(a.get("next_period_start").is_none(), "{a}");
    t.assert_exact().await;
}
