//! When the broker drops the fleet's connections, every role reconnects by
//! itself, and the consumers come back with their prefetch: QoS belongs to a
//! channel, so a recovered connection without it would flood one worker.

use crate::support;

use holdfast::fleet::{Fleet, Roles};
use holdfast_common::database;
use holdfast_common::topology::Names;
use holdfast_harness::rabbitmqctl::{
    connections, consumer_prefetch, LIST_CHANNELS, LIST_CONNECTIONS,
};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
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
    eventually("the worker consumes with prefetch 7", || async {
        (worker_prefetch(&ns).await == [7]).then_some(())
    })
    .await;
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
    eventually("the worker comes back with prefetch 7", || async {
        let now = our_connections(&ns).await;
        let fresh = now
            .iter()
            .filter(|(p, n)| n == "holdfast-worker" && !roles.iter().any(|(o, _)| o == p))
            .count();
        (fresh > 0 && worker_prefetch(&ns).await == [7]).then_some(())
    })
    .await;
    // And the fleet works again, end to end.
    t.grant("acme", 100).await;
    granted(&t.submit(&request("after", "acme", 20, 2)).await);
    let b = t.wait_closed("after").await;
    assert_eq!(b.figures.captured, 40);
    t.assert_exact().await;
    t.stop().await;
}

/// A process declares the topology once, before its roles connect: roles that
/// declare a new quorum queue at the same instant can make RabbitMQ 3.10 crash
/// a consumer's channel. Checked right after the start returns, on a namespace
/// nobody declared before, sooner than any role could connect and declare.
#[tokio::test]
async fn a_fleet_declares_its_topology_before_its_roles_connect() {
    let conn = unique_connections();
    let _cleanup = Cleanup { conn: conn.clone() };
    database::migrate(&conn.database_url).await.unwrap();
    let names = Names::new(conn.namespace.clone());
    let probe = lapin::Connection::connect(&conn.amqp_url, Default::default())
        .await
        .unwrap();
    let channel = probe.create_channel().await.unwrap();
    let fleet = Fleet::start(&conn, &fast_settings(), Roles::COORDINATOR)
        .await
        .unwrap();
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    for queue in [
        names.requests(),
        names.jobs(),
        names.previews(),
        names.requests_dead(),
        names.jobs_dead(),
    ] {
        if let Err(e) = channel
            .queue_declare(queue.clone().into(), passive, FieldTable::default())
            .await
        {
            panic!("{queue} did not exist when the fleet had started: {e}");
        }
    }
    holdfast_common::topology::close(&probe, "checked").await;
    fleet.stop().await;
}
