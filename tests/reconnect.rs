//! When the broker drops the fleet's connections, every role reconnects by
//! itself, and the consumers come back with their prefetch: QoS belongs to a
//! channel, so a recovered connection without it would flood one worker.

mod support;

use std::time::Duration;

use holdfast::fleet::Roles;
use support::*;

/// Rows of a `rabbitmqctl list_*` call, tab-separated columns.
async fn rabbitmqctl(args: &[&str]) -> Vec<Vec<String>> {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(args)
        .args(["-q", "--no-table-headers"])
        .output()
        .await
        .expect("rabbitmqctl runs (it comes with the rabbitmq-server package)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect()
}

/// (connection pid, connection name) of this namespace's connections.
async fn our_connections(namespace: &str) -> Vec<(String, String)> {
    let suffix = format!("/{namespace}\"}}");
    rabbitmqctl(&["list_connections", "pid", "client_properties"])
        .await
        .into_iter()
        .filter(|row| row.len() == 2)
        .filter_map(|row| {
            // client_properties holds {"connection_name","holdfast-worker/<ns>"}
            let at = row[1].find("{\"connection_name\",\"")? + "{\"connection_name\",\"".len();
            let rest = &row[1][at..];
            let end = rest.find(&suffix)?;
            Some((row[0].clone(), format!("{}/{namespace}", &rest[..end])))
        })
        .collect()
}

/// Prefetch of the consuming channels of the worker connections of `namespace`.
async fn worker_prefetch(namespace: &str) -> Vec<u64> {
    let workers: Vec<String> = our_connections(namespace)
        .await
        .into_iter()
        .filter(|(_, n)| n.starts_with("holdfast-worker/"))
        .map(|(pid, _)| pid)
        .collect();
    rabbitmqctl(&[
        "list_channels",
        "connection",
        "prefetch_count",
        "consumer_count",
    ])
    .await
    .into_iter()
    .filter(|row| row.len() == 3 && workers.contains(&row[0]) && row[2] == "1")
    .map(|row| row[1].parse().unwrap())
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
        .filter(|(_, n)| !n.starts_with("holdfast-producer/"))
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
            .filter(|(p, n)| {
                n.starts_with("holdfast-worker/") && !roles.iter().any(|(o, _)| o == p)
            })
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
