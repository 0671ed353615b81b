//! When the broker drops the fleet's connections, every role reconnects by
//! itself, and the consumers come back with their prefetch: QoS belongs to a
//! channel, so a recovered connection without it would flood one worker.

mod support;

use std::time::Duration;

use holdfast::fleet::Roles;
use holdfast::rabbitmqctl::{connections, consumer_prefetch, LIST_CHANNELS, LIST_CONNECTIONS};
use support::*;

/// Output of `rabbitmqctl -q <args>` on the local node.
async fn rabbitmqctl(args: &[&str]) -> String {
    let out = tokio::process::Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .await
        .expect("rabbitmqctl runs (it comes with the rabbitmq-server package)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// (connection pid, role) of this namespace's connections.
async fn our_connections(namespace: &str) -> Vec<(String, String)> {
    connections(&rabbitmqctl(LIST_CONNECTIONS).await, namespace)
}

/// Prefetch of the consuming channels of the worker connections of `namespace`.
async fn worker_prefetch(namespace: &str) -> Vec<u64> {
    let conns = our_connections(namespace).await;
    consumer_prefetch(&rabbitmqctl(LIST_CHANNELS).await, &conns)
        .into_iter()
        .filter(|(role, _)| role == "holdfast-worker")
        .map(|(_, prefetch)| prefetch)
        .collect()
}

#[tokio::test]
async fn roles_reconnect_with_their_prefetch_after_the_broker_drops_them() {
    let mut settings = fast_settings();
    settings.worker.worker_prefetch = 7;
    let mut t = TestFleet::start_with(settings, Roles::NO_API, None).await;
    let ns = t.conn.namespace.clone();
    let deadline = tokio::time::Instant::now() + WAIT;
    while worker_prefetch(&ns).await != [7] {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker never consumed with prefetch 7"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let before = our_connections(&ns).await;
    let roles: Vec<_> = before
        .iter()
        .filter(|(_, n)| n != "holdfast-producer")
        .collect();
    assert!(
        roles.len() >= 4,
        "coordinators, worker, reconciler: {before:?}"
    );
    for (pid, _) in &roles {
        let status = tokio::process::Command::new("rabbitmqctl")
            .args([
                "-q",
                "close_connection",
                pid,
                "test: broker-side disconnect",
            ])
            .status()
            .await
            .unwrap();
        assert!(status.success(), "close_connection {pid}");
    }
    // New connections, and the worker's new channel has its prefetch again.
    while {
        let now = our_connections(&ns).await;
        let fresh = now
            .iter()
            .filter(|(p, n)| n == "holdfast-worker" && !roles.iter().any(|(o, _)| o == p))
            .count();
        fresh == 0 || worker_prefetch(&ns).await != [7]
    } {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker did not come back with prefetch 7"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // And the fleet works again, end to end.
    t.grant("acme", 100).await;
    granted(&t.submit(&request("after", "acme", 20, 2)).await);
    let b = t.wait_closed("after").await;
    assert_eq!(b.figures.captured, 40);
    t.assert_exact().await;
    t.stop().await;
}
