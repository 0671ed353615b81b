//! Many producers racing on one account never overspend, and the journal
//! agrees with the balances afterwards.

use crate::support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use holdfast::producer::Producer;
use holdfast_common::messages::{BatchRequest, Decision};
use rand::{Rng, SeedableRng};
use serde_json::json;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_producers_on_one_account_never_overspend() {
    const PRODUCERS: usize = 32;
    const BATCHES_EACH: usize = 4;
    const GRANTED: i64 = 3_000;
    let mut settings = fast_settings();
    settings.coordinator.coordinator_consumers = 4;
    let t = TestFleet::start_with(settings, holdfast::fleet::Roles::NO_API, None).await;
    t.grant("hot", GRANTED).await;

    // Sample `available` throughout: it must never go below zero.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (ledger, stop) = (t.ledger.clone(), stop.clone());
        tokio::spawn(async move {
            let mut samples = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let a = ledger.account("hot").await.unwrap();
                assert!(a.available >= 0 && a.held >= 0, "overspent: {a:?}");
                assert!(a.balance <= GRANTED);
                samples += 1;
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            samples
        })
    };

    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let (conn, names, queues) = (t.conn.clone(), t.names.clone(), t.settings.queues.clone());
        producers.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(p as u64);
            let mut producer = Producer::connect(&conn.amqp_url, &names, &queues).await.unwrap();
            let mut decisions = Vec::new();
            for b in 0..BATCHES_EACH {
                let n = rng.random_range(1..=12);
                let items: Vec<_> = (0..n)
                    .map(|i| json!({"item_id": format!("i{i}"), "estimated_cost": rng.random_range(1..=40),
                                    "priority": rng.random_range(0..5),
                                    "payload": {"simulate": {"cost_factor": rng.random_range(0.3..1.5)}}}))
                    .collect();
                let mode = ["all_or_nothing", "first_fit", "priority_fit"][rng.random_range(0..3)];
                let id = format!("p{p}-b{b}");
                let req = json!({"batch_id": id, "account_id": "hot", "mode": mode, "items": items});
                decisions.push(producer.submit(req.to_string().as_bytes(), &id, WAIT).await.unwrap());
            }
            producer.close().await;
            decisions
        }));
    }
    let mut granted_ids = Vec::new();
    let mut denied = 0;
    for p in producers {
        for d in p.await.unwrap() {
            match d {
                Decision::Granted(g) => granted_ids.push(g.batch_id),
                Decision::Insufficient(_) => denied += 1,
                Decision::Rejected(r) => panic!("valid request rejected: {r:?}"),
            }
        }
    }
    for id in &granted_ids {
        t.wait_closed(id).await;
    }
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.await.unwrap();

    let a = t.ledger.account("hot").await.unwrap();
    let mut captured = 0;
    for id in &granted_ids {
        let b = t.ledger.batch(id).await.unwrap().unwrap();
        assert_eq!(
            b.figures.reserved,
            b.figures.captured + b.figures.released,
            "batch {id}"
        );
        assert!(b.items.iter().all(|i| i.captured <= i.reserved));
        captured += b.figures.captured;
    }
    assert_eq!(a.held, 0);
    assert_eq!(
        a.balance,
        GRANTED - captured,
        "balance = granted - captured"
    );
    assert!(captured <= GRANTED);
    assert!(
        !granted_ids.is_empty() && denied > 0,
        "credits ran out mid-way: {} granted, {denied} denied",
        granted_ids.len()
    );
    assert!(samples > 10);
    t.assert_exact().await;
    t.stop().await;
}

/// Group decisions price on credits read without a lock and raise `held`
/// last. Racing groups on one account must still never overspend, and never
/// deny a request that fitted what was left: with no grant meanwhile, every
/// denied request must cost more than the credits left at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_group_decisions_never_overspend_nor_deny_what_fits() {
    const CLIENTS: usize = 8;
    const GROUPS_EACH: usize = 8;
    const GROUP: usize = 8;
    const GRANTED: i64 = 2_000;
    let t = TestFleet::start_with(fast_settings(), holdfast::fleet::Roles::default(), None).await;
    t.grant("hot", GRANTED).await;
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let ledger = t.ledger.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(c as u64);
            let mut outcomes = Vec::new();
            for g in 0..GROUPS_EACH {
                let requests: Vec<BatchRequest> = (0..GROUP)
                    .map(|k| {
                        let (n, cost) = (rng.random_range(1..=4), rng.random_range(1..=12));
                        let id = format!("c{c}-g{g}-r{k}");
                        serde_json::from_value(request(&id, "hot", n, cost)).unwrap()
                    })
                    .collect();
                let inputs: Vec<_> = requests
                    .iter()
                    .map(|r| reserve_input(r, WAIT, WAIT))
                    .collect();
                for (r, decided) in requests.iter().zip(ledger.reserve_many(&inputs).await) {
                    let cost: i64 = r.items.iter().map(|i| i.estimated_cost).sum();
                    outcomes.push((cost, decided.expect("decided").decision));
                }
            }
            outcomes
        }));
    }
    let mut granted = 0;
    let mut denied_costs = Vec::new();
    for task in tasks {
        for (cost, decision) in task.await.unwrap() {
            match decision {
                Decision::Granted(g) => {
                    assert_eq!(g.reserved, cost);
                    granted += cost;
                }
                Decision::Insufficient(_) => denied_costs.push(cost),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    let account = t.ledger.account("hot").await.unwrap();
    assert_eq!(account.held, granted, "held is the sum of the grants");
    assert!(account.available >= 0);
    assert!(
        !denied_costs.is_empty(),
        "the credits should run out in this test"
    );
    for cost in &denied_costs {
        assert!(
            *cost > account.available,
            "a request costing {cost} was denied while {} credits are still free",
            account.available
        );
    }
    assert!(t.ledger.audit().await.unwrap().is_empty());
}

/// The retry, step by step: another transaction holds credits after the
/// group read the account (without a lock) and before it raised `held`. The
/// database refuses the overspend, and the group is decided again under the
/// account lock: the request is denied with what is really left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_priced_on_credits_spent_meanwhile_is_decided_again_under_the_lock() {
    let t = TestFleet::start_with(fast_settings(), holdfast::fleet::Roles::default(), None).await;
    t.grant("hot", 100).await;

    // Another transaction takes a hold of 90 and keeps the account row locked.
    let mut other = t.ledger.pool().get().await.unwrap();
    let tx = other.transaction().await.unwrap();
    tx.batch_execute(
        "WITH h AS (INSERT INTO holds (account_id, amount) VALUES ('hot', 90) RETURNING id)
         SELECT holdfast_take('hot', ARRAY[id], ARRAY[NULL]::text[], ARRAY[90::int8], 'other') FROM h;",
    )
    .await
    .unwrap();

    // The group reads 100 available, prices a 50-credit batch as granted, and
    // waits on the account row at its last statement.
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
    let waiting = async {
        loop {
            let n: i64 = watcher
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if n > 0 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(WAIT, waiting)
        .await
        .expect("the group waits for the account row");
    tx.commit().await.unwrap();

    let decided = decide.await.unwrap().expect("decided, not failed");
    let Decision::Insufficient(d) = decided.decision else {
        panic!("expected insufficient, got {:?}", decided.decision)
    };
    assert_eq!((d.total_cost, d.available), (50, 10));
    let account = t.ledger.account("hot").await.unwrap();
    assert_eq!((account.balance, account.held), (100, 90));
    assert!(t.ledger.audit().await.unwrap().is_empty());
}

/// 64 producers over 8 spenders in 2 teams on one account, with limits that
/// bind at every level: team `t0` (2,000 a month) has four members of 600 a
/// month (they outgrow it), team `t1` (2,000, no period) four members of 300
/// for life (they bind first), and the account has 3,000 credits (less than
/// the teams). No level is ever over its limit, `available` never below 0,
/// every hold resolves, each level's usage adds up, and the audit (which
/// recomputes each spender's usage from the holds) is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_producers_over_a_spender_tree_never_pass_a_limit_at_any_level() {
    use holdfast_common::ledger::SpenderSpec;
    use holdfast_common::messages::{LevelKind, LimitPeriod};

    const PRODUCERS: usize = 64;
    const BATCHES_EACH: usize = 3;
    const GRANTED: i64 = 3_000;
    let mut settings = fast_settings();
    settings.coordinator.coordinator_consumers = 4;
    let t = TestFleet::start_with(settings, holdfast::fleet::Roles::NO_API, None).await;
    t.grant("ws", GRANTED).await;
    let spec = |parent: Option<&str>, kind: &str, limit: i64, period: LimitPeriod| SpenderSpec {
        parent: parent.map(str::to_string),
        kind: Some(kind.into()),
        limit: Some(limit),
        period,
        anchor: None,
    };
    t.ledger
        .put_spender("ws", "t0", &spec(None, "team", 2_000, LimitPeriod::Month))
        .await
        .unwrap();
    t.ledger
        .put_spender("ws", "t1", &spec(None, "team", 2_000, LimitPeriod::None))
        .await
        .unwrap();
    for m in 0..8 {
        let s = if m < 4 {
            spec(Some("t0"), "member", 600, LimitPeriod::Month)
        } else {
            spec(Some("t1"), "member", 300, LimitPeriod::None)
        };
        t.ledger
            .put_spender("ws", &format!("m{m}"), &s)
            .await
            .unwrap();
    }

    // Sample every level throughout: none may ever pass its limit.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (ledger, stop) = (t.ledger.clone(), stop.clone());
        tokio::spawn(async move {
            let mut samples = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let a = ledger.account("ws").await.unwrap();
                assert!(a.available >= 0 && a.held >= 0, "overspent: {a:?}");
                for s in ledger.spenders("ws").await.unwrap() {
                    let limit = s.limit.unwrap();
                    assert!(s.used + s.held <= limit, "over its limit: {s:?}");
                }
                samples += 1;
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            samples
        })
    };

    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let (conn, names, queues) = (t.conn.clone(), t.names.clone(), t.settings.queues.clone());
        producers.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(1_000 + p as u64);
            let mut producer = Producer::connect(&conn.amqp_url, &names, &queues).await.unwrap();
            let mut decisions = Vec::new();
            for b in 0..BATCHES_EACH {
                let n = rng.random_range(1..=8);
                let items: Vec<_> = (0..n)
                    .map(|i| json!({"item_id": format!("i{i}"), "estimated_cost": rng.random_range(5..=40),
                                    "priority": rng.random_range(0..5),
                                    "payload": {"simulate": {"cost_factor": rng.random_range(0.3..1.5)}}}))
                    .collect();
                let mode = ["all_or_nothing", "first_fit", "priority_fit"][rng.random_range(0..3)];
                let id = format!("p{p}-b{b}");
                let req = json!({"batch_id": id, "account_id": "ws", "mode": mode, "items": items,
                                 "spender_id": format!("m{}", p % 8)});
                decisions.push(producer.submit(req.to_string().as_bytes(), &id, WAIT).await.unwrap());
            }
            producer.close().await;
            decisions
        }));
    }
    let mut granted_ids = Vec::new();
    let (mut by_account, mut by_spender) = (0, 0);
    for p in producers {
        for d in p.await.unwrap() {
            match d {
                Decision::Granted(g) => granted_ids.push(g.batch_id),
                Decision::Insufficient(i) => match i.limited_by.unwrap().level {
                    LevelKind::Account => by_account += 1,
                    LevelKind::Spender => by_spender += 1,
                },
                Decision::Rejected(r) => panic!("valid request rejected: {r:?}"),
            }
        }
    }
    for id in &granted_ids {
        t.wait_closed(id).await;
    }
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.await.unwrap();

    let a = t.ledger.account("ws").await.unwrap();
    assert_eq!(a.held, 0);
    let open: i64 = t
        .ledger
        .pool()
        .get()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM holds WHERE state = 'open'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(open, 0, "every hold resolved");
    let spenders = t.ledger.spenders("ws").await.unwrap();
    let used = |id: &str| spenders.iter().find(|s| s.spender_id == id).unwrap().used;
    for s in &spenders {
        assert_eq!(s.held, 0, "{s:?}");
        assert!(s.used <= s.limit.unwrap(), "{s:?}");
    }
    // Every batch was charged to a member: the levels add up to the account.
    for (team, members) in [("t0", 0..4), ("t1", 4..8)] {
        let sum: i64 = members.map(|m| used(&format!("m{m}"))).sum();
        assert_eq!(used(team), sum, "team {team}");
    }
    assert_eq!(used("t0") + used("t1"), GRANTED - a.balance);
    assert!(
        granted_ids.len() > 10 && by_spender > 0 && by_account > 0,
        "{} granted, {by_account} denied by the account, {by_spender} by a spender",
        granted_ids.len()
    );
    assert!(samples > 10);
    t.assert_exact().await;
    t.stop().await;
}
