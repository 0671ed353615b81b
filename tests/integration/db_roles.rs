//! Least-privilege database roles (migrations/V3__roles.sql): each role runs
//! its real code as a LOGIN user in its group, and a worker (or coordinator,
//! or reconciler) cannot add credits or create accounts, whatever SQL it sends.
//! Allowances (V7): the admin manages them, and the reconciler issues them
//! only through `holdfast_issue_allowance`, which issues nothing but what an
//! allowance defines for a period that has begun. Spenders (V10): the admin
//! shapes the tree; the service roles move the usage of the holds they take,
//! resolve or grow, and nothing else.

use crate::support;

use std::time::Duration;

use holdfast::fleet::{Fleet, HttpAddr, Roles};
use holdfast_common::config::Connections;
use holdfast_common::database;
use holdfast_common::ledger::{
    AllowanceSpec, AllowanceTerms, ItemOutcome, ItemState, Ledger, LedgerError, Period, Settled,
    Settlement, SpenderSpec,
};
use holdfast_common::messages::{BatchRequest, LimitPeriod};
use holdfast_coordinator::keys::Scope;
use serde_json::json;
use support::*;
use tokio_postgres::error::SqlState;

const GROUPS: [&str; 4] = ["coordinator", "worker", "reconciler", "admin"];

/// LOGIN users, one per group, for one test; dropped with it.
struct Users {
    suffix: String,
    admin_url: String,
}

impl Users {
    async fn create(t: &TestFleet) -> Users {
        let suffix = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let client = connect(&t.conn.database_url).await;
        for g in GROUPS {
            client
                .batch_execute(&format!(
                    "CREATE ROLE hf_{g}_{suffix} LOGIN IN ROLE holdfast_{g}"
                ))
                .await
                .unwrap();
        }
        Users {
            suffix,
            admin_url: t.conn.database_url.clone(),
        }
    }

    /// The test database's URL, logged in as the user of `group`.
    fn url(&self, t: &TestFleet, group: &str) -> String {
        t.conn.database_url.replacen(
            "://postgres@",
            &format!("://hf_{group}_{}@", self.suffix),
            1,
        )
    }

    fn ledger(&self, t: &TestFleet, group: &str) -> Ledger {
        Ledger::new(database::pool(&self.url(t, group), 4).unwrap())
    }
}

impl Drop for Users {
    fn drop(&mut self) {
        let (suffix, url) = (self.suffix.clone(), self.admin_url.clone());
        // Drop cannot await: a runtime of our own, on another thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let Some((base, _)) = url.rsplit_once('/') else {
                    return;
                };
                let Ok((client, conn)) =
                    tokio_postgres::connect(&format!("{base}/postgres"), tokio_postgres::NoTls)
                        .await
                else {
                    return;
                };
                tokio::spawn(conn);
                for g in GROUPS {
                    let _ = client
                        .batch_execute(&format!("DROP ROLE IF EXISTS hf_{g}_{suffix}"))
                        .await;
                }
            });
        })
        .join();
    }
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

fn denied<T: std::fmt::Debug>(r: Result<T, LedgerError>) {
    match r {
        Err(LedgerError::Forbidden(why)) if why.contains("42501") => {}
        other => panic!("expected permission denied, got {other:?}"),
    }
}

fn batch(id: &str, n: usize, cost: i64, mode: &str) -> BatchRequest {
    let items: Vec<_> = (0..n)
        .map(|i| json!({"item_id": format!("i{i}"), "estimated_cost": cost}))
        .collect();
    serde_json::from_value(
        json!({"batch_id": id, "account_id": "acme", "items": items, "mode": mode}),
    )
    .unwrap()
}

fn settle(batch_id: &str, items: std::ops::Range<usize>, cost: i64) -> Vec<Settlement> {
    items
        .map(|i| Settlement {
            batch_id: batch_id.into(),
            item_id: format!("i{i}"),
            outcome: ItemOutcome::Succeeded {
                actual_cost: Some(cost),
            },
        })
        .collect()
}

#[tokio::test]
async fn only_the_admin_adds_credits_and_each_role_does_its_own_work() {
    let t = TestFleet::start_with(fast_settings(), Roles::default(), None).await;
    let users = Users::create(&t).await;
    let admin = users.ledger(&t, "admin");
    let coordinator = users.ledger(&t, "coordinator");
    let worker = users.ledger(&t, "worker");
    let reconciler = users.ledger(&t, "reconciler");

    // The admin creates accounts and grants.
    admin
        .grant("acme", 100, Some("invoice 1"), true)
        .await
        .unwrap();
    admin.create_account("other").await.unwrap();

    // Nobody else can, through the ledger...
    for ledger in [&worker, &coordinator, &reconciler] {
        denied(ledger.grant("acme", 5, None, false).await);
        denied(ledger.grant("new", 5, None, true).await);
        denied(ledger.create_account("new").await);
    }
    // ...or with SQL of its own.
    let w = connect(&users.url(&t, "worker")).await;
    for sql in [
        "UPDATE accounts SET balance = balance + 5 WHERE id = 'acme'",
        "UPDATE accounts SET balance = balance + 5, held = held + 5 WHERE id = 'acme'",
        "INSERT INTO accounts (id) VALUES ('mine')",
        "INSERT INTO accounts (id, balance) VALUES ('mine', 1000)",
        "INSERT INTO journal (account_id, kind, amount, balance_delta) VALUES ('acme', 'grant', 5, 5)",
        "INSERT INTO journal (account_id, kind, amount, balance_delta) VALUES ('acme', 'release', 5, 5)",
        "UPDATE journal SET amount = 0",
        "DELETE FROM journal",
        "DELETE FROM holds",
        "INSERT INTO batches (id, account_id, request_hash, mode, state, decision, item_count)
         VALUES ('b', 'acme', '', 'all_or_nothing', 'denied', '{}', 1)",
        "TRUNCATE journal",
        "ALTER TABLE accounts DISABLE TRIGGER USER",
        "SELECT * FROM refinery_schema_history",
    ] {
        let e = w.batch_execute(sql).await.unwrap_err();
        assert_eq!(
            e.code(),
            Some(&SqlState::INSUFFICIENT_PRIVILEGE),
            "{sql}: {e}"
        );
    }

    // The coordinator decides batches and takes soft holds.
    let plain = batch("plain", 3, 10, "all_or_nothing");
    let seq = batch("seq", 4, 5, "sequential");
    for req in [&plain, &seq] {
        let mut input = reserve_input(req, Duration::from_secs(3600), Duration::from_secs(30));
        input.chunk_size = 2;
        let r = coordinator.reserve(&input).await.unwrap();
        granted(&r.decision);
    }
    let soft = coordinator
        .reserve_soft("acme", 7, Duration::from_secs(600))
        .await
        .unwrap();
    let gone = coordinator
        .reserve_soft("acme", 3, Duration::from_secs(600))
        .await
        .unwrap();
    coordinator.cancel_soft(&gone.reservation_id).await.unwrap();
    coordinator.mark_dispatched(&["plain"]).await.unwrap();

    // The worker captures (with an overrun), closes, and reserves a sequential batch's next chunk.
    let r = worker.settle(&settle("plain", 0..3, 12)).await.unwrap();
    assert_eq!(
        r.results[0],
        Settled::Captured {
            captured: 10,
            overrun: 2
        }
    );
    assert_eq!(r.closed.len(), 1, "the last capture closes the batch");
    let again = worker.settle(&settle("plain", 0..1, 1)).await.unwrap();
    assert_eq!(
        again.results[0],
        Settled::AlreadySettled {
            state: ItemState::Succeeded,
            captured: 10
        }
    );
    let r = worker.settle(&settle("seq", 0..2, 4)).await.unwrap();
    assert_eq!(r.advanced, ["seq"], "the worker reserved the next chunk");

    // The reconciler expires soft holds and overdue batches, and audits.
    let admin_sql = connect(&t.conn.database_url).await;
    admin_sql
        .batch_execute(
            "UPDATE holds SET expires_at = now() - interval '1 second' WHERE expires_at IS NOT NULL;
             UPDATE batches SET deadline_at = now() - interval '1 second' WHERE id = 'seq';",
        )
        .await
        .unwrap();
    assert_eq!(reconciler.expire_soft_holds(100).await.unwrap(), 1);
    let closed = reconciler.expire_overdue(100).await.unwrap();
    assert_eq!(closed.len(), 1);
    assert_eq!(closed[0].figures.captured, 8);
    assert!(reconciler.audit().await.unwrap().is_empty());
    let _ = soft;

    // 100 granted; 30 captured by `plain`, 8 by `seq`; nothing held.
    let a = admin.account("acme").await.unwrap();
    assert_eq!((a.balance, a.held), (62, 0));
    t.assert_exact().await;
}

fn allowance(
    id: &str,
    amount: i64,
    anchor: Option<chrono::DateTime<chrono::Utc>>,
) -> AllowanceSpec {
    AllowanceSpec {
        allowance_id: Some(id.into()),
        terms: AllowanceTerms {
            amount,
            period: Period::Day,
            rollover_cap: 10,
        },
        anchor,
    }
}

#[tokio::test]
async fn only_the_reconciler_issues_allowances_and_only_what_they_define() {
    let t = TestFleet::start_with(fast_settings(), Roles::default(), None).await;
    let users = Users::create(&t).await;
    let admin = users.ledger(&t, "admin");
    let coordinator = users.ledger(&t, "coordinator");
    let worker = users.ledger(&t, "worker");
    let reconciler = users.ledger(&t, "reconciler");

    // The admin manages allowances: this one's second daily period began an hour ago.
    admin.create_account("acme").await.unwrap();
    let now: chrono::DateTime<chrono::Utc> = connect(&t.conn.database_url)
        .await
        .query_one("SELECT now()", &[])
        .await
        .unwrap()
        .get(0);
    let anchor = now - chrono::Duration::hours(25);
    admin
        .create_allowance("acme", &allowance("plan", 100, Some(anchor)))
        .await
        .unwrap();
    admin
        .create_allowance(
            "acme",
            &allowance("spare", 5, Some(now + chrono::Duration::days(1))),
        )
        .await
        .unwrap();
    admin.stop_allowance("acme", "spare").await.unwrap();
    // Nobody else does.
    for ledger in [&coordinator, &worker, &reconciler] {
        denied(
            ledger
                .create_allowance("acme", &allowance("mine", 1_000, None))
                .await,
        );
        let terms = AllowanceTerms {
            amount: 1_000,
            period: Period::Day,
            rollover_cap: 0,
        };
        denied(ledger.change_allowance("acme", "plan", &terms).await);
        denied(ledger.stop_allowance("acme", "plan").await);
    }
    // Only the reconciler issues them.
    for ledger in [&admin, &coordinator, &worker] {
        denied(ledger.issue_allowances(100).await);
    }
    assert_eq!(reconciler.issue_allowances(100).await.unwrap(), 200);
    let a = admin.account("acme").await.unwrap();
    assert_eq!(
        (a.balance, a.available),
        (200, 110),
        "the second period and its rollover"
    );

    // Whatever SQL it sends, the reconciler adds nothing else.
    let r = connect(&users.url(&t, "reconciler")).await;
    for sql in [
        "INSERT INTO grants (account_id, id, amount, remaining, source) VALUES ('acme', 'mine', 5, 5, 'plan')",
        "INSERT INTO allowances (account_id, id, anchor, next_period_start) VALUES ('acme', 'mine', now(), now())",
        "UPDATE allowances SET next_period_start = anchor",
        "UPDATE allowance_terms SET amount = 1000000",
        "INSERT INTO allowance_terms (account_id, allowance_id, effective_from, amount, period, anchor)
         VALUES ('acme', 'plan', now(), 1000000, 'day', now())",
        "INSERT INTO journal (account_id, grant_id, kind, amount, balance_delta) VALUES ('acme', 'mine', 'rollover', 5, 5)",
        "ALTER FUNCTION holdfast_issue_allowance(text, text, integer) SECURITY INVOKER",
        "CREATE OR REPLACE FUNCTION holdfast_period_after(timestamptz, text, timestamptz) RETURNS timestamptz
         LANGUAGE sql AS $$ SELECT now() - interval '1 year' $$",
    ] {
        let e = r.batch_execute(sql).await.unwrap_err();
        assert_eq!(
            e.code(),
            Some(&SqlState::INSUFFICIENT_PRIVILEGE),
            "{sql}: {e}"
        );
    }
    // Calling the function again issues nothing: both periods that began
    // are issued, the next has not begun, `spare` stopped before its first.
    for id in ["plan", "spare"] {
        let rows = r
            .query(
                "SELECT * FROM holdfast_issue_allowance('acme', $1, 100)",
                &[&id],
            )
            .await
            .unwrap();
        assert!(rows.is_empty(), "{id}");
    }
    let w = connect(&users.url(&t, "worker")).await;
    let e = w
        .query(
            "SELECT * FROM holdfast_issue_allowance('acme', 'plan', 100)",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{e}");
    // Everyone reads them (any process may serve the account view).
    for ledger in [&coordinator, &worker, &reconciler] {
        assert_eq!(ledger.allowances("acme").await.unwrap().len(), 2);
    }
    assert_eq!(admin.account("acme").await.unwrap().balance, 200);
    t.assert_exact().await;
}

#[tokio::test]
async fn the_fleet_runs_with_one_database_user_per_role() {
    let mut t = TestFleet::start_with(fast_settings(), Roles::default(), None).await;
    let users = Users::create(&t).await;
    let admin = users.ledger(&t, "admin");
    admin.grant("acme", 1_000, None, true).await.unwrap();
    // The reconciler process issues this allowance's first period.
    admin
        .create_allowance("acme", &allowance("plan", 100, None))
        .await
        .unwrap();

    // The worker process serves the HTTP API too: asked to grant, it refuses.
    let mut api = t.settings.clone();
    api.http_addr = HttpAddr(Some("127.0.0.1:0".parse().unwrap()));
    api.api.admin_token = Some("token".into());
    for (group, roles) in [
        ("coordinator", Roles::COORDINATOR),
        (
            "worker",
            Roles {
                worker: true,
                api: true,
                ..Roles::default()
            },
        ),
        (
            "reconciler",
            Roles {
                reconciler: true,
                ..Roles::default()
            },
        ),
    ] {
        let conn = Connections {
            database_url: users.url(&t, group),
            ..t.conn.clone()
        };
        let generator = holdfast_worker::build_generator(&t.settings.generator).unwrap();
        let fleet = Fleet::start_with(&conn, &api, roles, generator)
            .await
            .unwrap();
        t.fleets.push(fleet);
    }
    let addr = t.fleets[1].http_addr().unwrap();
    let r = reqwest::Client::new()
        .post(format!("http://{addr}/v1/accounts/acme/grants"))
        .bearer_auth("token")
        .json(&json!({"amount": 1_000_000}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["type"].as_str().unwrap().ends_with("forbidden"),
        "{body}"
    );
    // Nor does it take holds: batches go to the coordinators. (Its user may
    // read the key, so the key is accepted; the ledger then refuses.)
    let producer = t.api_key(Scope::Producer, &["acme"]).await;
    let r = reqwest::Client::new()
        .post(format!("http://{addr}/v1/batches"))
        .bearer_auth(&producer)
        .json(&request("via-worker", "acme", 1, 1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(t.ledger.batch("via-worker").await.unwrap().is_none());
    let plain = request("plain", "acme", 5, 10);
    granted(&t.submit(&plain).await);
    let mut seq = request("seq", "acme", 25, 2);
    seq["mode"] = json!("sequential");
    granted(&t.submit(&seq).await);
    assert_eq!(t.wait_closed("plain").await.state, "completed");
    let s = t.wait_closed("seq").await;
    assert_eq!((s.state.as_str(), s.figures.succeeded), ("completed", 25));
    eventually("the reconciler issues the allowance", || async {
        let grants = t.ledger.grants("acme").await.unwrap();
        grants
            .iter()
            .any(|g| g.allowance_id.as_deref() == Some("plan"))
            .then_some(())
    })
    .await;
    let a = t.ledger.account("acme").await.unwrap();
    assert_eq!((a.balance, a.held), (1_000 + 100 - 50 - 50, 0));
    t.assert_exact().await;
    t.stop().await;
}

#[tokio::test]
async fn only_the_admin_shapes_spenders_and_each_role_moves_the_usage_of_its_holds() {
    let t = TestFleet::start_with(fast_settings(), Roles::default(), None).await;
    let users = Users::create(&t).await;
    let admin = users.ledger(&t, "admin");
    let coordinator = users.ledger(&t, "coordinator");
    let worker = users.ledger(&t, "worker");
    let reconciler = users.ledger(&t, "reconciler");
    admin.grant("acme", 1_000, None, true).await.unwrap();
    let team = SpenderSpec {
        kind: Some("team".into()),
        limit: Some(100),
        period: LimitPeriod::Month,
        ..SpenderSpec::default()
    };
    admin.put_spender("acme", "design", &team).await.unwrap();
    for ledger in [&worker, &coordinator, &reconciler] {
        denied(ledger.put_spender("acme", "mine", &team).await);
        denied(ledger.delete_spender("acme", "design").await);
    }
    let w = connect(&users.url(&t, "worker")).await;
    for sql in [
        "UPDATE spenders SET credit_limit = 1000000",
        "INSERT INTO spender_usage (account_id, spender_id, period_start) VALUES ('acme', 'design', now())",
        "DELETE FROM spender_usage",
        "DELETE FROM hold_spenders",
    ] {
        let e = w.batch_execute(sql).await.unwrap_err();
        assert_eq!(e.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{sql}: {e}");
    }

    // The coordinator charges batches and soft holds to spenders; the
    // worker settles and grows a sequential batch; the reconciler expires.
    let mut plain = batch("plain", 2, 10, "all_or_nothing");
    plain.spender_id = Some("design".into());
    let mut seq = batch("seq", 4, 10, "sequential");
    seq.spender_id = Some("design".into());
    for req in [&plain, &seq] {
        let mut input = reserve_input(req, Duration::from_secs(3600), Duration::from_secs(30));
        input.chunk_size = 2;
        granted(&coordinator.reserve(&input).await.unwrap().decision);
    }
    coordinator
        .reserve_soft_for("acme", Some("design"), 5, Duration::from_secs(600))
        .await
        .unwrap();
    worker.settle(&settle("plain", 0..2, 10)).await.unwrap();
    let r = worker.settle(&settle("seq", 0..2, 10)).await.unwrap();
    assert_eq!(r.advanced, ["seq"]);
    connect(&t.conn.database_url)
        .await
        .batch_execute(
            "UPDATE holds SET expires_at = now() - interval '1 second' WHERE expires_at IS NOT NULL;
             UPDATE batches SET deadline_at = now() - interval '1 second' WHERE id = 'seq';",
        )
        .await
        .unwrap();
    assert_eq!(reconciler.expire_soft_holds(100).await.unwrap(), 1);
    assert_eq!(reconciler.expire_overdue(100).await.unwrap().len(), 1);
    let design = admin.spender("acme", "design").await.unwrap();
    assert_eq!((design.used, design.held), (40, 0));
    assert!(reconciler.audit().await.unwrap().is_empty());
    t.assert_exact().await;
}

/// API keys (V11): every service group checks keys and records their use;
/// only the admin creates, lists and revokes them.
#[tokio::test]
async fn only_the_admin_creates_and_revokes_api_keys() {
    use holdfast_coordinator::keys::{Accounts, KeySpec, KeyStore, Scope};
    let t = TestFleet::start_with(fast_settings(), Roles::default(), None).await;
    let users = Users::create(&t).await;
    let store = |group: &str| KeyStore::new(users.ledger(&t, group).pool().clone());
    let spec = KeySpec {
        scope: Scope::Producer,
        accounts: Accounts::Only(vec!["acme".into()]),
        expires_at: None,
        name: Some("roles".into()),
    };
    let created = store("admin").create(&spec).await.unwrap();
    let id = created.info.id.as_str();
    assert_eq!(store("admin").list().await.unwrap().len(), 1);
    for group in ["coordinator", "worker", "reconciler"] {
        let s = store(group);
        denied(s.create(&spec).await);
        denied(s.revoke(id).await);
        // The name and creation time are not needed to check a key.
        denied(s.list().await);
        let creds = s.credentials(id).await.unwrap().expect("the key");
        assert_eq!((creds.scope, creds.revoked_at), (Scope::Producer, None));
        s.touch(id).await.unwrap();
        let client = connect(&users.url(&t, group)).await;
        let err = client
            .execute("UPDATE api_keys SET scope = 'admin' WHERE id = $1", &[&id])
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));
    }
    let info = store("admin").get(id).await.unwrap();
    assert!(
        info.last_used_at.is_some(),
        "a service group recorded the use"
    );
    let revoked = store("admin").revoke(id).await.unwrap();
    assert!(revoked.revoked_at.is_some());
}
