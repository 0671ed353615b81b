//! Crashes and the reconciler: real `holdfast` processes killed at named
//! points (they abort, as abruptly as SIGKILL), and every batch still runs to
//! completion exactly once.

use crate::support;

use std::process::Stdio;
use std::time::Duration;

use holdfast::fleet::Roles;
use holdfast_common::messages::{BatchRequest, Event};
use serde_json::json;
use support::*;

/// A `holdfast` process on the test's database and namespace, crashing at `failpoint`.
fn holdfast(t: &TestFleet, role: &str, failpoint: &str) -> tokio::process::Child {
    holdfast_command()
        .arg(role)
        .env("HOLDFAST_DATABASE_URL", &t.conn.database_url)
        .env("HOLDFAST_AMQP_URL", &t.conn.amqp_url)
        .env("HOLDFAST_NAMESPACE", &t.conn.namespace)
        .env("HOLDFAST_HTTP_ADDR", "off")
        .env("HOLDFAST_FAILPOINTS", failpoint)
        .env("HOLDFAST_COORDINATOR_CONSUMERS", "1")
        .env("HOLDFAST_CONFIRM_WINDOW", "2")
        .env("HOLDFAST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start holdfast")
}

async fn crashed(mut child: tokio::process::Child) {
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("the process crashes")
        .unwrap();
    assert!(
        !status.success(),
        "the process should have aborted, got {status}"
    );
}

fn capture_count(journal: &[holdfast_common::ledger::JournalEntry]) -> usize {
    journal.iter().filter(|e| e.kind == "capture").count()
}

#[tokio::test]
async fn coordinator_killed_after_reserving_still_runs_the_batch_once() {
    let mut t = TestFleet::start_with(fast_settings(), Roles::default(), None).await;
    t.grant("acme", 100).await;
    let coordinator = holdfast(&t, "coordinator", "coordinator.after_reserve");
    t.producer
        .send(
            request("crash1", "acme", 5, 10).to_string().as_bytes(),
            "crash1",
        )
        .await
        .unwrap();
    crashed(coordinator).await;

    // Reserved and committed, nothing dispatched.
    let b = t
        .ledger
        .batch("crash1")
        .await
        .unwrap()
        .expect("the reservation was committed");
    assert_eq!(
        (b.state.as_str(), b.hold_state.map(|s| s.as_str())),
        ("granted", Some("open"))
    );
    assert_eq!(t.ledger.account("acme").await.unwrap().held, 50);

    // A healthy fleet takes over: the unacknowledged request comes back.
    t.start_roles(Roles::NO_API, None).await;
    let d = t.producer.decision_for("crash1", WAIT).await.unwrap();
    assert_eq!(granted(&d).reserved, 50);
    let Event::Completed { figures, .. } = t.completed("crash1").await else {
        unreachable!()
    };
    assert_eq!(
        (figures.succeeded, figures.captured, figures.released),
        (5, 50, 0)
    );
    let journal = t.ledger.journal("acme").await.unwrap();
    assert_eq!(
        journal.iter().filter(|e| e.kind == "hold").count(),
        1,
        "one hold"
    );
    assert_eq!(capture_count(&journal), 5, "each item captured once");
    t.assert_exact().await;
    t.stop().await;
}

#[tokio::test]
async fn coordinator_killed_mid_dispatch_does_not_charge_twice() {
    let mut t = TestFleet::start_with(fast_settings(), Roles::default(), None).await;
    t.grant("acme", 100).await;
    let coordinator = holdfast(&t, "coordinator", "coordinator.mid_dispatch");
    t.producer
        .send(
            request("crash2", "acme", 6, 10).to_string().as_bytes(),
            "crash2",
        )
        .await
        .unwrap();
    crashed(coordinator).await;
    granted(&t.producer.decision_for("crash2", WAIT).await.unwrap());

    // Two jobs made it to the queue before the crash; all six are sent again.
    t.start_roles(Roles::NO_API, None).await;
    let b = t.wait_closed("crash2").await;
    assert_eq!((b.figures.succeeded, b.figures.captured), (6, 60));
    assert_eq!(capture_count(&t.ledger.journal("acme").await.unwrap()), 6);
    assert_eq!(t.ledger.account("acme").await.unwrap().balance, 40);
    t.assert_exact().await;
    t.stop().await;
}

#[tokio::test]
async fn worker_killed_before_or_after_capture_loses_nothing_and_charges_once() {
    for point in ["worker.before_capture", "worker.after_capture"] {
        let mut t = TestFleet::start_with(fast_settings(), Roles::COORDINATOR, None).await;
        t.grant("acme", 100).await;
        granted(&t.submit(&request("w", "acme", 3, 10)).await);
        crashed(holdfast(&t, "worker", point)).await;
        let settled = t.ledger.batch("w").await.unwrap().unwrap().figures;
        if point == "worker.after_capture" {
            assert!(
                settled.succeeded >= 1,
                "the capture committed before the crash"
            );
        } else {
            assert_eq!(settled.succeeded, 0, "{point}");
        }
        t.start_roles(
            Roles {
                worker: true,
                reconciler: true,
                ..Default::default()
            },
            None,
        )
        .await;
        let b = t.wait_closed("w").await;
        assert_eq!(
            (b.figures.succeeded, b.figures.captured),
            (3, 30),
            "{point}"
        );
        assert_eq!(
            capture_count(&t.ledger.journal("acme").await.unwrap()),
            3,
            "{point}"
        );
        t.assert_exact().await;
        t.stop().await;
    }
}

#[tokio::test]
async fn two_reconcilers_redispatch_stranded_batches_exactly_once() {
    let mut t = TestFleet::start_with(fast_settings(), Roles::default(), None).await;
    t.grant("acme", 10_000).await;
    // Granted and committed by a coordinator that then vanished (its request acknowledged or lost).
    for i in 0..20 {
        let req: BatchRequest =
            serde_json::from_value(request(&format!("stranded-{i}"), "acme", 3, 10)).unwrap();
        t.ledger
            .reserve(&reserve_input(
                &req,
                Duration::from_secs(60),
                Duration::from_millis(500),
            ))
            .await
            .unwrap();
    }
    t.start_roles(
        Roles {
            reconciler: true,
            ..Default::default()
        },
        None,
    )
    .await;
    t.start_roles(
        Roles {
            reconciler: true,
            worker: true,
            ..Default::default()
        },
        None,
    )
    .await;
    for i in 0..20 {
        let b = t.wait_closed(&format!("stranded-{i}")).await;
        assert_eq!((b.state.as_str(), b.figures.captured), ("completed", 30));
    }
    let journal = t.ledger.journal("acme").await.unwrap();
    assert_eq!(
        journal.iter().filter(|e| e.kind == "settle").count(),
        20,
        "each batch closed once"
    );
    assert_eq!(capture_count(&journal), 60);
    t.assert_exact().await;
    t.stop().await;
}

#[tokio::test]
async fn a_batch_past_its_deadline_fails_unsettled_items_and_releases_the_rest() {
    let mut settings = fast_settings();
    settings.coordinator.execution_timeout_secs = 1;
    let mut t = TestFleet::start_with(settings, Roles::NO_API, None).await;
    t.grant("acme", 100).await;
    let req = json!({"batch_id": "late", "account_id": "acme", "items": [
        {"item_id": "quick", "estimated_cost": 10},
        {"item_id": "slow", "estimated_cost": 30, "payload": {"simulate": {"latency_ms": 2500}}}]});
    granted(&t.submit(&req).await);
    let Event::Completed { state, figures, .. } = t.completed("late").await else {
        unreachable!()
    };
    assert_eq!(state, "expired");
    assert_eq!(
        (
            figures.succeeded,
            figures.failed,
            figures.captured,
            figures.released
        ),
        (1, 1, 10, 30)
    );
    let slow = t
        .ledger
        .batch("late")
        .await
        .unwrap()
        .unwrap()
        .items
        .into_iter()
        .find(|i| i.item_id == "slow")
        .unwrap();
    assert_eq!(
        (slow.state.as_str(), slow.reason.as_deref()),
        ("failed", Some("deadline"))
    );
    // The slow item finishes after the deadline: its capture changes nothing.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let a = t.ledger.account("acme").await.unwrap();
    assert_eq!((a.balance, a.held), (90, 0));
    assert_eq!(capture_count(&t.ledger.journal("acme").await.unwrap()), 1);
    t.assert_exact().await;
    t.stop().await;
}

/// Run `sql` on the test's database, behind the ledger's back.
async fn force(t: &TestFleet, sql: &str) {
    let client = t.ledger.pool().get().await.unwrap();
    assert_eq!(client.execute(sql, &[]).await.unwrap(), 1, "{sql}");
}

/// Poll the ledger until the batch is in `state`.
async fn wait_state(t: &TestFleet, batch_id: &str, state: &str) {
    eventually(&format!("batch {batch_id} reaches {state}"), || async {
        let b = t.ledger.batch(batch_id).await.unwrap();
        (b.as_ref().map(|b| b.state.as_str()) == Some(state)).then_some(())
    })
    .await
}

#[tokio::test]
async fn audit_flags_a_hold_forced_past_its_deadline() {
    // A coordinator and nothing else: the jobs wait in the queue, and no
    // reconciler resolves what the test makes overdue.
    let mut t = TestFleet::start_with(fast_settings(), Roles::COORDINATOR, None).await;
    t.grant("acme", 100).await;
    let hold_id = granted(&t.submit(&request("overdue", "acme", 3, 10)).await)
        .hold_id
        .clone();
    wait_state(&t, "overdue", "dispatched").await;
    // Running, within its deadline: nothing is stuck, even with no grace at all.
    assert_eq!(t.ledger.stuck(Duration::ZERO).await.unwrap(), vec![]);

    force(
        &t,
        "UPDATE batches SET deadline_at = now() - interval '10 minutes' WHERE id = 'overdue'",
    )
    .await;
    let stuck = t.ledger.stuck(Duration::from_secs(60)).await.unwrap();
    assert_eq!(stuck.len(), 1, "{stuck:#?}");
    let s = &stuck[0];
    assert_eq!(
        (s.kind.as_str(), s.subject.as_str(), s.credits),
        ("items_overdue", "batch overdue", 30),
        "{s:#?}"
    );
    assert!(
        s.problem.contains(&format!("hold {hold_id}"))
            && s.problem.contains("3 item(s) still pending")
            && s.problem.contains("30 credits held")
            && s.problem.contains("past the execution deadline"),
        "{}",
        s.problem
    );
    // Not yet past a grace longer than the 10 minutes it is overdue.
    assert_eq!(
        t.ledger.stuck(Duration::from_secs(3600)).await.unwrap(),
        vec![]
    );
    // Stuck is not drift: the ledger still agrees with its journal.
    t.assert_exact().await;

    // A soft hold whose TTL passed long ago, never expired.
    let soft = t
        .ledger
        .reserve_soft("acme", 25, Duration::from_secs(600))
        .await
        .unwrap();
    force(
        &t,
        &format!(
            "UPDATE holds SET expires_at = now() - interval '5 minutes' WHERE id = '{}'",
            soft.reservation_id
        ),
    )
    .await;
    let stuck = t.ledger.stuck(Duration::from_secs(60)).await.unwrap();
    let soft_stuck = stuck
        .iter()
        .find(|s| s.kind == "hold_overdue")
        .unwrap_or_else(|| panic!("{stuck:#?}"));
    assert_eq!(
        (soft_stuck.subject.clone(), soft_stuck.credits, stuck.len()),
        (format!("hold {}", soft.reservation_id), 25, 2),
        "{stuck:#?}"
    );
    assert!(
        soft_stuck.problem.contains("account acme") && soft_stuck.problem.contains("past its TTL"),
        "{}",
        soft_stuck.problem
    );
    t.assert_exact().await;

    // A reconciler resolves both on its first sweep: nothing is stuck after.
    t.start_roles(
        Roles {
            reconciler: true,
            ..Default::default()
        },
        None,
    )
    .await;
    assert_eq!(t.wait_closed("overdue").await.state, "expired");
    eventually("the soft hold expires", || async {
        let r = t.ledger.reservation(&soft.reservation_id).await.unwrap();
        (r.state != "open").then_some(())
    })
    .await;
    assert_eq!(t.ledger.stuck(Duration::ZERO).await.unwrap(), vec![]);
    t.assert_exact().await;
    t.stop().await;
}

#[tokio::test]
async fn audit_flags_a_granted_batch_left_undispatched_once_per_hold() {
    // No roles: the batch is granted in the ledger and nobody dispatches it.
    let t = TestFleet::start_with(fast_settings(), Roles::default(), None).await;
    t.grant("acme", 100).await;
    let req: BatchRequest = serde_json::from_value(request("stranded", "acme", 4, 5)).unwrap();
    t.ledger
        .reserve(&reserve_input(
            &req,
            Duration::from_secs(3600),
            Duration::from_secs(600),
        ))
        .await
        .unwrap();
    // Within its dispatch lease: not stuck.
    assert_eq!(t.ledger.stuck(Duration::ZERO).await.unwrap(), vec![]);

    force(
        &t,
        "UPDATE batches SET dispatch_lease = now() - interval '5 minutes' WHERE id = 'stranded'",
    )
    .await;
    assert_eq!(
        t.ledger.stuck(Duration::from_secs(600)).await.unwrap(),
        vec![]
    );
    let stuck = t.ledger.stuck(Duration::from_secs(60)).await.unwrap();
    assert_eq!(stuck.len(), 1, "{stuck:#?}");
    assert_eq!(
        (
            stuck[0].kind.as_str(),
            stuck[0].subject.as_str(),
            stuck[0].credits
        ),
        ("undispatched", "batch stranded", 20)
    );
    assert!(
        stuck[0].problem.contains("granted but not dispatched")
            && stuck[0].problem.contains("4 item(s) pending")
            && stuck[0].problem.contains("past its dispatch lease"),
        "{}",
        stuck[0].problem
    );

    // Past its deadline as well: named once, for the deadline.
    force(
        &t,
        "UPDATE batches SET deadline_at = now() - interval '5 minutes' WHERE id = 'stranded'",
    )
    .await;
    let stuck = t.ledger.stuck(Duration::from_secs(60)).await.unwrap();
    assert_eq!(stuck.len(), 1, "{stuck:#?}");
    assert_eq!(
        (stuck[0].kind.as_str(), stuck[0].credits),
        ("items_overdue", 20)
    );
    assert!(
        stuck[0].problem.contains("never all dispatched"),
        "{}",
        stuck[0].problem
    );
    t.assert_exact().await;
}

#[tokio::test]
async fn a_healthy_fleet_that_ran_a_batch_has_nothing_stuck() {
    let mut t = TestFleet::start().await;
    t.grant("acme", 100).await;
    granted(&t.submit(&request("healthy", "acme", 5, 10)).await);
    let Event::Completed { state, .. } = t.completed("healthy").await else {
        unreachable!()
    };
    assert_eq!(state, "completed");
    assert_eq!(t.wait_closed("healthy").await.figures.captured, 50);
    assert_eq!(t.ledger.stuck(Duration::ZERO).await.unwrap(), vec![]);
    t.assert_exact().await;
    t.stop().await;
}

/// The reconciler's periodic audit reports what its own sweep could not
/// resolve: here a batch past its deadline that another transaction keeps
/// locked (the sweep skips locked rows), then nothing once it is free.
#[tokio::test]
async fn the_reconcilers_audit_counts_a_hold_its_sweep_could_not_resolve() {
    use holdfast_common::topology;

    let t = TestFleet::start_with(fast_settings(), Roles::default(), None).await;
    t.grant("acme", 100).await;
    let req: BatchRequest = serde_json::from_value(request("locked", "acme", 2, 10)).unwrap();
    t.ledger
        .reserve(&reserve_input(
            &req,
            Duration::from_secs(3600),
            Duration::from_secs(600),
        ))
        .await
        .unwrap();
    force(
        &t,
        "UPDATE batches SET deadline_at = now() - interval '10 minutes' WHERE id = 'locked'",
    )
    .await;

    let (amqp, mut reconciler) = t.reconciler().await;

    let mut locker = t.ledger.pool().get().await.unwrap();
    let lock = locker.transaction().await.unwrap();
    lock.execute("SELECT 1 FROM batches WHERE id = 'locked' FOR UPDATE", &[])
        .await
        .unwrap();
    let report = reconciler.sweep_once().await.unwrap();
    assert_eq!(
        (report.expired, report.drift, report.stuck),
        (0, Some(0), Some(1)),
        "{report:?}"
    );
    lock.rollback().await.unwrap();

    let report = reconciler.sweep_once().await.unwrap();
    assert_eq!(
        (report.expired, report.drift, report.stuck),
        (1, Some(0), Some(0)),
        "{report:?}"
    );
    assert_eq!(t.wait_closed("locked").await.state, "expired");
    topology::close(&amqp, "done").await;
}
