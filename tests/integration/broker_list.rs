//! `HOLDFAST_AMQP_URL` as a list of nodes: a process connects to the first
//! node that answers, and after the broker closes its connections it comes
//! back by itself, trying the list round-robin.

use crate::support;

use holdfast::fleet::Roles;
use holdfast::producer::Producer;
use holdfast_common::topology::current_nodes;
use holdfast_harness::rabbitmqctl::{connections, LIST_CONNECTIONS};
use support::*;

async fn rabbitmqctl(args: &[&str]) -> String {
    let out = tokio::process::Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .await
        .expect("rabbitmqctl runs (it comes with the rabbitmq-server package)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A port on 127.0.0.1 that nothing listens on (bound, then released).
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn a_list_skips_a_dead_node_and_reconnects_after_the_broker_closes_connections() {
    let mut settings = fast_settings();
    settings.queues.quorum_initial_group_size = Some(1);
    let none = Roles {
        coordinator: false,
        worker: false,
        reconciler: false,
        api: false,
    };
    let mut t = TestFleet::start_with(settings, none, None).await;
    let real = t.conn.amqp_url.clone();
    let dead = format!("amqp://guest:guest@127.0.0.1:{}/%2f", closed_port());
    t.conn.amqp_url = format!("{dead},{real}");
    t.producer = Producer::connect(&t.conn.amqp_url, &t.names, &t.settings.queues)
        .await
        .expect("the producer connects through the second URL");
    t.start_roles(Roles::NO_API, None).await;
    let ns = t.conn.namespace.clone();

    // Every role is on the second node of the list, and says so.
    let worker_name = format!("holdfast-worker/{ns}");
    let on_second = || {
        current_nodes()
            .into_iter()
            .find(|(name, _)| *name == worker_name)
            .map(|(_, node)| node.position)
    };
    eventually("the worker is connected", || async {
        (on_second() == Some(2)).then_some(())
    })
    .await;

    // The declared queues carry the group size.
    let queues = rabbitmqctl(&["list_queues", "--no-table-headers", "name", "arguments"]).await;
    let jobs = queues
        .lines()
        .find(|l| l.starts_with(&format!("{}\t", t.names.jobs())))
        .unwrap_or_else(|| panic!("no jobs queue in {queues}"));
    assert!(jobs.contains("x-quorum-initial-group-size"), "{jobs}");

    t.grant("acme", 1000).await;
    granted(&t.submit(&request("before", "acme", 10, 2)).await);
    assert_eq!(t.wait_closed("before").await.figures.captured, 20);

    let before = connections(&rabbitmqctl(LIST_CONNECTIONS).await, &ns);
    let roles: Vec<_> = before
        .iter()
        .filter(|(_, n)| n != "holdfast-producer")
        .cloned()
        .collect();
    assert!(
        roles.len() >= 4,
        "coordinators, worker, reconciler: {before:?}"
    );
    for (pid, _) in &roles {
        let out = tokio::process::Command::new("rabbitmqctl")
            .args(["-q", "close_connection", pid, "test: node gone"])
            .status()
            .await
            .unwrap();
        assert!(out.success(), "close_connection {pid}");
    }
    // The next round starts after the real node, at the dead one, and wraps
    // around to the real one again.
    eventually("the worker reconnects", || async {
        let now = connections(&rabbitmqctl(LIST_CONNECTIONS).await, &ns);
        now.iter()
            .any(|(p, n)| n == "holdfast-worker" && !roles.iter().any(|(o, _)| o == p))
            .then_some(())
    })
    .await;
    assert_eq!(on_second(), Some(2));
    granted(&t.submit(&request("after", "acme", 10, 3)).await);
    assert_eq!(t.wait_closed("after").await.figures.captured, 30);
    t.assert_exact().await;
    t.stop().await;
}

/// The group size is part of a queue's declaration: a namespace declared
/// without it keeps working for processes that do not set it, and RabbitMQ
/// refuses to declare it again with another size (docs/operations.md).
#[tokio::test]
async fn the_group_size_of_existing_queues_cannot_change() {
    use holdfast_common::config::QueueSettings;
    use holdfast_common::topology::{self, Names};
    let conn = unique_connections();
    let _cleanup = Cleanup { conn: conn.clone() };
    let names = Names::new(conn.namespace.clone());
    let declare = |size: Option<u32>| {
        let url = conn.amqp_url.clone();
        let names = names.clone();
        async move {
            let c = topology::connect(&url, "holdfast-test-declare")
                .await
                .unwrap();
            let ch = c.create_channel().await.unwrap();
            let settings = QueueSettings {
                quorum_initial_group_size: size,
                ..QueueSettings::default()
            };
            let r = topology::declare(&ch, &names, &settings).await;
            topology::close(&c, "declared").await;
            r
        }
    };
    declare(None).await.expect("a first declaration");
    declare(None).await.expect("the same again");
    let changed = declare(Some(2)).await;
    let e = changed
        .expect_err("another group size is refused")
        .to_string();
    assert!(
        e.contains("PRECONDITION_FAILED") || e.contains("inequivalent"),
        "{e}"
    );
}
