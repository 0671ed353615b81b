//! The coordinator process's decider: the groups of several consumers are
//! decided in one ledger transaction, each consumer gets its own decisions,
//! and a request delivered again is decided once.

use crate::support;

use std::time::Duration;

use holdfast_common::ledger::{ReserveInput, Reserved};
use holdfast_common::messages::BatchRequest;
use holdfast_coordinator::group::{GroupDecider, GroupSettings};
use support::*;

/// No role runs: the test feeds the decider itself.
const NO_ROLES: holdfast::fleet::Roles = holdfast::fleet::Roles {
    coordinator: false,
    worker: false,
    reconciler: false,
    api: false,
};
const TIMEOUT: Duration = Duration::from_secs(3600);
const GRACE: Duration = Duration::from_secs(30);

fn settings(pipeline: usize) -> GroupSettings {
    GroupSettings {
        max_group: 256,
        budget: Duration::from_millis(50),
        pipeline,
        queue: 16,
    }
}

fn parsed(batch_id: &str, account: &str, n: usize, cost: i64) -> BatchRequest {
    serde_json::from_value(request(batch_id, account, n, cost)).expect("a valid request")
}

fn inputs(requests: &[BatchRequest]) -> Vec<ReserveInput<'_>> {
    requests
        .iter()
        .map(|r| reserve_input(r, TIMEOUT, GRACE))
        .collect()
}

fn reserved(results: Vec<Result<Reserved, holdfast_common::ledger::LedgerError>>) -> Vec<Reserved> {
    results.into_iter().map(|r| r.expect("decided")).collect()
}

#[tokio::test]
async fn the_groups_of_several_consumers_are_decided_in_one_transaction() {
    let t = TestFleet::start_with(fast_settings(), NO_ROLES, None).await;
    t.grant("hot", 1_000).await;
    let (decider, task) = GroupDecider::start(t.ledger.clone(), settings(1));
    // Four consumers' groups, queued before the decider gets to run (a
    // current-thread runtime polls every submission before the decider).
    let groups: Vec<Vec<BatchRequest>> = (0..4)
        .map(|c| {
            (0..5)
                .map(|i| parsed(&format!("c{c}-{i}"), "hot", 2, 10))
                .collect()
        })
        .collect();
    let decided = futures::future::join_all(groups.iter().map(|g| {
        let (decider, ledger) = (decider.clone(), t.ledger.clone());
        async move { reserved(decider.reserve_many(&ledger, &inputs(g)).await) }
    }))
    .await;
    assert_eq!(decider.transactions(), 1, "one transaction for every group");
    for (g, decided) in groups.iter().zip(&decided) {
        assert_eq!(decided.len(), g.len());
        for (request, r) in g.iter().zip(decided) {
            assert!(!r.replayed);
            let granted = granted(&r.decision);
            assert_eq!(
                granted.batch_id, request.batch_id,
                "each consumer gets its own decisions"
            );
            assert_eq!(granted.reserved, 20);
        }
    }
    assert_eq!(t.available("hot").await, 1_000 - 20 * 20);
    drop(decider);
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the decider stops once its handles are gone")
        .unwrap();
}

#[tokio::test]
async fn a_request_delivered_again_gets_the_same_decision_and_holds_once() {
    let t = TestFleet::start_with(fast_settings(), NO_ROLES, None).await;
    t.grant("acme", 100).await;
    let (decider, _task) = GroupDecider::start(t.ledger.clone(), settings(2));
    let first = vec![parsed("b1", "acme", 3, 10), parsed("b2", "acme", 5, 10)];
    // The same request in two consumers' groups of one transaction (a
    // redelivery that another consumer took), then once more later.
    let again = vec![parsed("b1", "acme", 3, 10)];
    let (first_inputs, again_inputs) = (inputs(&first), inputs(&again));
    let (a, b) = tokio::join!(
        decider.reserve_many(&t.ledger, &first_inputs),
        decider.reserve_many(&t.ledger, &again_inputs),
    );
    let (a, b) = (reserved(a), reserved(b));
    assert_eq!(granted(&a[0].decision).reserved, 30);
    assert!(!a[0].replayed);
    assert!(b[0].replayed, "the second copy replays the first");
    assert!(!b[0].needs_dispatch, "the first copy dispatches");
    assert_eq!(b[0].decision, a[0].decision);
    // b2 wants 50 of the 70 left: granted once.
    assert_eq!(granted(&a[1].decision).reserved, 50);
    let later = reserved(decider.reserve_many(&t.ledger, &inputs(&again)).await);
    assert!(later[0].replayed);
    assert_eq!(later[0].decision, a[0].decision);
    assert_eq!(t.available("acme").await, 100 - 30 - 50);
    t.assert_exact().await;
}
