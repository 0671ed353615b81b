//! The transactional outbox (migrations/V12__outbox.sql, common/src/outbox):
//! events written with the ledger change that causes them reach the events
//! exchange after an outage or a relay crash, once per `message_id` (a
//! duplicate after a crash between publish and delete carries the same id),
//! in order per batch, with one `completed` per batch, and no `NOTIFY`.

use crate::support;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures::StreamExt;
use holdfast_common::ledger::{ItemOutcome, Ledger, LedgerError, Settlement};
use holdfast_common::messages::{BatchRequest, Event};
use holdfast_common::outbox::relay::{self, relay_once};
use holdfast_common::topology::{self, Publisher};
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::json;
use support::*;
use tokio_util::sync::CancellationToken;

/// One message seen on the events exchange: (message_id, event).
type Seen = (String, Event);

/// A queue bound to every event of the namespace.
struct Listener {
    conn: lapin::Connection,
    consumer: lapin::Consumer,
}

impl Listener {
    async fn bind(t: &TestFleet) -> Self {
        let conn = lapin::Connection::connect(&t.conn.amqp_url, Default::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        let q = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        ch.queue_bind(
            q.name().clone(),
            t.names.events().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        let consumer = ch
            .basic_consume(
                q.name().clone(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        Self { conn, consumer }
    }

    /// Everything that arrives until nothing has for `quiet`.
    async fn drain(&mut self, quiet: Duration) -> Vec<Seen> {
        let mut seen = Vec::new();
        while let Ok(Some(Ok(d))) = tokio::time::timeout(quiet, self.consumer.next()).await {
            let id = d
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .expect("every event carries a message_id");
            seen.push((id, serde_json::from_slice(&d.data).unwrap()));
        }
        seen
    }

    async fn close(self) {
        topology::close(&self.conn, "bye").await;
    }
}

fn batch(id: &str, n: usize) -> BatchRequest {
    serde_json::from_value(json!({"batch_id": id, "account_id": "acme",
        "items": (0..n).map(|i| json!({"item_id": format!("i{i}"), "estimated_cost": 2}))
            .collect::<Vec<_>>()}))
    .unwrap()
}

fn done(batch_id: &str, items: std::ops::Range<usize>) -> Vec<Settlement> {
    items
        .map(|i| Settlement {
            batch_id: batch_id.into(),
            item_id: format!("i{i}"),
            outcome: ItemOutcome::Succeeded {
                actual_cost: Some(1),
            },
        })
        .collect()
}

/// Decide `ids` (4 items each) and settle each in two halves with a
/// progress snapshot between: every batch writes decision, progress,
/// completed, without any relay running.
async fn run_batches(ledger: &Ledger, ids: &[String]) {
    for id in ids {
        let req = batch(id, 4);
        let input = reserve_input(&req, Duration::from_secs(60), Duration::from_secs(30));
        granted(&ledger.reserve(&input).await.unwrap().decision);
        ledger.settle(&done(id, 0..2)).await.unwrap();
        assert_eq!(ledger.write_progress(&[id.as_str()]).await.unwrap(), 1);
        let report = ledger.settle(&done(id, 2..4)).await.unwrap();
        assert_eq!(report.closed.len(), 1, "{id} closes");
    }
}

async fn outbox_rows(ledger: &Ledger) -> i64 {
    let c = ledger.pool().get().await.unwrap();
    c.query_one("SELECT count(*) FROM outbox", &[])
        .await
        .unwrap()
        .get(0)
}

/// Every batch's events in the order they arrived, and a check that each
/// message_id arrived `times` times with the same body.
fn by_batch(seen: &[Seen], times: usize) -> BTreeMap<String, Vec<String>> {
    let mut count: HashMap<&str, (usize, &Event)> = HashMap::new();
    for (id, e) in seen {
        let c = count.entry(id).or_insert((0, e));
        assert_eq!(c.1, e, "{id}: a duplicate carries the same event");
        c.0 += 1;
    }
    for (id, (n, _)) in &count {
        assert_eq!(*n, times, "{id} arrived {n} time(s)");
    }
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (id, e) in seen {
        let (batch, kind) = match e {
            Event::Decision(d) => (d.batch_id().unwrap().to_string(), "decision"),
            Event::Progress { batch_id, .. } => (batch_id.clone(), "progress"),
            Event::Completed { batch_id, .. } => (batch_id.clone(), "completed"),
            Event::Preview(_) => panic!("no preview on the events exchange"),
        };
        assert!(id.starts_with(&format!("{batch}:{kind}")), "{id}");
        out.entry(batch).or_default().push(kind.to_string());
    }
    out
}

fn in_order(events: &BTreeMap<String, Vec<String>>, batches: &[String]) {
    assert_eq!(events.len(), batches.len(), "{events:?}");
    for (batch, kinds) in events {
        assert_eq!(
            kinds,
            &["decision", "progress", "completed"],
            "events of {batch} out of order"
        );
    }
}

#[tokio::test]
async fn events_written_during_a_broker_outage_arrive_after_it_once_each_in_order() {
    let t = TestFleet::start_with(fast_settings(), Default::default(), None).await;
    t.grant("acme", 1_000).await;
    let mut listener = Listener::bind(&t).await;
    let ids: Vec<String> = (0..5).map(|i| format!("b{i}")).collect();
    run_batches(&t.ledger, &ids).await;
    assert_eq!(outbox_rows(&t.ledger).await, 15, "three events per batch");

    // A relay that cannot reach the broker: nothing goes, nothing is lost.
    let stop = CancellationToken::new();
    let unreachable = tokio::spawn(relay::run(
        t.ledger.clone(),
        "amqp://guest:guest@127.0.0.1:1/%2f".into(),
        t.names.clone(),
        Duration::from_millis(50),
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.cancel();
    unreachable.await.unwrap();
    assert!(listener.drain(Duration::from_millis(300)).await.is_empty());
    let (depth, lag) = relay::depth(t.ledger.pool()).await.unwrap();
    assert_eq!(depth, 15);
    assert!(
        lag > 0.5,
        "the oldest row waited since before the outage: {lag}"
    );

    // The broker is back for the next relay.
    let stop = CancellationToken::new();
    let relay = tokio::spawn(relay::run(
        t.ledger.clone(),
        t.conn.amqp_url.clone(),
        t.names.clone(),
        Duration::from_millis(50),
        stop.clone(),
    ));
    let seen = listener.drain(Duration::from_millis(1_500)).await;
    stop.cancel();
    relay.await.unwrap();
    in_order(&by_batch(&seen, 1), &ids);
    assert_eq!(outbox_rows(&t.ledger).await, 0, "relayed rows are deleted");
    assert_eq!(relay::depth(t.ledger.pool()).await.unwrap(), (0, 0.0));
    listener.close().await;
}

#[tokio::test]
async fn a_relay_crash_between_publish_and_delete_sends_the_completed_event_again_with_its_id() {
    let t = TestFleet::start_with(fast_settings(), Default::default(), None).await;
    t.grant("acme", 1_000).await;
    let mut listener = Listener::bind(&t).await;
    let ids = vec!["crash".to_string()];
    run_batches(&t.ledger, &ids).await;
    let conn = topology::connect(&t.conn.amqp_url, "test-relay")
        .await
        .unwrap();
    let publisher = Publisher::new(&conn).await.unwrap();
    holdfast_common::faults::enable(&format!(
        "panic-once:outbox.after_publish@{}",
        t.names.namespace
    ));
    let crashed = holdfast_common::supervise::guard(
        "relay",
        "outbox",
        relay_once(t.ledger.pool(), &publisher, &t.names, 100),
    )
    .await;
    assert!(crashed.is_err(), "the pass dies after the broker's confirm");
    assert_eq!(
        outbox_rows(&t.ledger).await,
        3,
        "its rows stay for the next pass"
    );
    let (claimed, sent) = relay_once(t.ledger.pool(), &publisher, &t.names, 100)
        .await
        .unwrap();
    assert_eq!((claimed, sent), (3, 3));
    assert_eq!(outbox_rows(&t.ledger).await, 0);
    let seen = listener.drain(Duration::from_millis(800)).await;
    // Everything twice (at-least-once), the same message_id each time.
    let events = by_batch(&seen, 2);
    assert_eq!(
        events["crash"],
        [
            "decision",
            "progress",
            "completed",
            "decision",
            "progress",
            "completed"
        ]
    );
    let completed: Vec<&str> = seen
        .iter()
        .filter(|(_, e)| matches!(e, Event::Completed { .. }))
        .map(|(id, _)| id.as_str())
        .collect();
    assert_eq!(completed, ["crash:completed", "crash:completed"]);
    topology::close(&conn, "bye").await;
    listener.close().await;
}

#[tokio::test]
async fn several_relays_keep_each_batchs_order() {
    let t = TestFleet::start_with(fast_settings(), Default::default(), None).await;
    t.grant("acme", 10_000).await;
    let mut listener = Listener::bind(&t).await;
    let ids: Vec<String> = (0..30).map(|i| format!("m{i:02}")).collect();
    // Interleaved: every batch decided, then every one half settled, and so on,
    // so that one batch's rows are far apart and claims split them.
    for id in &ids {
        let req = batch(id, 4);
        let input = reserve_input(&req, Duration::from_secs(60), Duration::from_secs(30));
        granted(&t.ledger.reserve(&input).await.unwrap().decision);
    }
    for id in &ids {
        t.ledger.settle(&done(id, 0..2)).await.unwrap();
    }
    let all: Vec<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(t.ledger.write_progress(&all).await.unwrap(), ids.len());
    for id in &ids {
        t.ledger.settle(&done(id, 2..4)).await.unwrap();
    }
    // Four relays, small claims, each on its own connection and publisher.
    let mut relays = Vec::new();
    for n in 0..4 {
        let (url, names, ledger) = (t.conn.amqp_url.clone(), t.names.clone(), t.another_ledger());
        relays.push(tokio::spawn(async move {
            let conn = topology::connect(&url, &format!("relay-{n}"))
                .await
                .unwrap();
            let publisher = Publisher::new(&conn).await.unwrap();
            let mut sent = 0;
            for _ in 0..500 {
                let (claimed, s) = relay_once(ledger.pool(), &publisher, &names, 7)
                    .await
                    .unwrap();
                sent += s;
                if claimed == 0 {
                    break;
                }
                tokio::task::yield_now().await;
            }
            topology::close(&conn, "bye").await;
            sent
        }));
    }
    let mut sent = 0;
    for r in relays {
        sent += r.await.unwrap();
    }
    assert_eq!(sent, 90);
    let seen = listener.drain(Duration::from_millis(1_000)).await;
    in_order(&by_batch(&seen, 1), &ids);
    listener.close().await;
}

/// Another relay holding a batch's first row (as if mid-publish): a pass
/// skips it and holds back the rest of that batch, and relays the others.
#[tokio::test]
async fn a_batchs_later_events_wait_while_another_relay_holds_an_earlier_one() {
    let t = TestFleet::start_with(fast_settings(), Default::default(), None).await;
    t.grant("acme", 1_000).await;
    let mut listener = Listener::bind(&t).await;
    let ids = vec!["held".to_string(), "free".to_string()];
    run_batches(&t.ledger, &ids).await;
    let mut other = t.ledger.pool().get().await.unwrap();
    let other_relay = other.transaction().await.unwrap();
    let held: i64 = other_relay
        .query_one(
            "SELECT id FROM outbox WHERE batch_id = 'held' ORDER BY id LIMIT 1 FOR UPDATE",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let conn = topology::connect(&t.conn.amqp_url, "test-relay")
        .await
        .unwrap();
    let publisher = Publisher::new(&conn).await.unwrap();
    let (claimed, sent) = relay_once(t.ledger.pool(), &publisher, &t.names, 100)
        .await
        .unwrap();
    assert_eq!((claimed, sent), (5, 3), "only the free batch goes");
    let seen = listener.drain(Duration::from_millis(500)).await;
    assert_eq!(by_batch(&seen, 1).keys().collect::<Vec<_>>(), ["free"]);
    // The other relay publishes its row and deletes it; the rest follows.
    other_relay
        .execute("DELETE FROM outbox WHERE id = $1", &[&held])
        .await
        .unwrap();
    other_relay.commit().await.unwrap();
    assert_eq!(
        relay_once(t.ledger.pool(), &publisher, &t.names, 100)
            .await
            .unwrap(),
        (2, 2)
    );
    let seen = listener.drain(Duration::from_millis(500)).await;
    assert_eq!(by_batch(&seen, 1)["held"], ["progress", "completed"]);
    topology::close(&conn, "bye").await;
    listener.close().await;
}

/// A completed summary whose producer's reply queue is gone (it was
/// exclusive to a connection that closed): the event still goes out, the
/// pass succeeds and the rows are deleted.
#[tokio::test]
async fn a_summary_to_a_reply_queue_that_is_gone_does_not_hold_up_the_relay() {
    let t = TestFleet::start_with(fast_settings(), Default::default(), None).await;
    t.grant("acme", 1_000).await;
    let mut listener = Listener::bind(&t).await;
    let ids: Vec<String> = (0..20).map(|i| format!("gone{i:02}")).collect();
    for id in &ids {
        let req = batch(id, 2);
        let mut input = reserve_input(&req, Duration::from_secs(60), Duration::from_secs(30));
        input.reply_to = Some(format!("{}.gone-reply-queue", t.names.namespace));
        input.correlation_id = Some(id.clone());
        granted(&t.ledger.reserve(&input).await.unwrap().decision);
        assert_eq!(
            t.ledger.settle(&done(id, 0..2)).await.unwrap().closed.len(),
            1
        );
    }
    let conn = topology::connect(&t.conn.amqp_url, "test-relay")
        .await
        .unwrap();
    let publisher = Publisher::new(&conn).await.unwrap();
    assert_eq!(
        relay_once(t.ledger.pool(), &publisher, &t.names, 100)
            .await
            .unwrap(),
        (40, 40)
    );
    assert_eq!(outbox_rows(&t.ledger).await, 0);
    let seen = listener.drain(Duration::from_millis(800)).await;
    let events = by_batch(&seen, 1);
    assert_eq!(events.len(), 20);
    assert!(events.values().all(|k| k == &["decision", "completed"]));
    topology::close(&conn, "bye").await;
    listener.close().await;
}

#[tokio::test]
async fn a_batch_has_exactly_one_completed_row() {
    let t = TestFleet::start_with(fast_settings(), Default::default(), None).await;
    t.grant("acme", 1_000).await;
    run_batches(&t.ledger, &["one".to_string()]).await;
    // Every other way to close it finds it closed.
    assert!(matches!(
        t.ledger.cancel_batch("one").await,
        Err(LedgerError::WrongState(_))
    ));
    assert!(t.ledger.expire_overdue(100).await.unwrap().is_empty());
    assert!(t.ledger.close_finished(100).await.unwrap().0.is_empty());
    // A duplicated settle closes nothing again.
    assert!(t
        .ledger
        .settle(&done("one", 0..4))
        .await
        .unwrap()
        .closed
        .is_empty());
    let c = t.ledger.pool().get().await.unwrap();
    let completed: i64 = c
        .query_one(
            "SELECT count(*) FROM outbox WHERE batch_id = 'one' AND kind = 'completed'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(completed, 1);
    // And the database refuses a second one, whatever the code does.
    let second = c
        .execute(
            "INSERT INTO outbox (batch_id, kind, routing_key, body, message_id)
             VALUES ('one', 'completed', 'batch.completed', '\\x7b7d', 'one:completed')",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(
        second.code(),
        Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
    );
}

#[tokio::test]
async fn a_fleet_relays_its_own_events_and_the_producer_hears_completed() {
    let mut t = TestFleet::start().await;
    t.grant("acme", 100).await;
    let mut listener = Listener::bind(&t).await;
    granted(&t.submit(&request("fleet", "acme", 3, 5)).await);
    // The summary to reply_to goes through the outbox too.
    let Event::Completed { batch_id, .. } = t.completed("fleet").await else {
        panic!("expected completed")
    };
    assert_eq!(batch_id, "fleet");
    let seen = listener.drain(Duration::from_millis(800)).await;
    let kinds = &by_batch(&seen, 1)["fleet"];
    assert_eq!(kinds.first().map(String::as_str), Some("decision"));
    assert_eq!(kinds.last().map(String::as_str), Some("completed"));
    eventually("the outbox empties", || async {
        (outbox_rows(&t.ledger).await == 0).then_some(())
    })
    .await;
    listener.close().await;
    t.stop().await;
}

/// No `LISTEN/NOTIFY` anywhere in the ledger's code or migrations: a NOTIFY
/// takes a database-wide lock at commit and would serialise every commit.
/// Comments may name it; no statement may use it.
#[test]
fn no_statement_notifies() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut stack: Vec<std::path::PathBuf> = [
        "common/src",
        "coordinator/src",
        "worker/src",
        "src",
        "migrations",
    ]
    .iter()
    .map(|d| root.join(d))
    .collect();
    let mut files = 0;
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        let text = std::fs::read_to_string(&p).unwrap();
        files += 1;
        for line in text.lines() {
            let code = line.trim_start();
            if code.starts_with("//") || code.starts_with("--") {
                continue;
            }
            let upper = code.to_uppercase();
            assert!(
                !upper.contains("PG_NOTIFY")
                    && !upper.contains("NOTIFY ")
                    && !upper.contains("LISTEN "),
                "{}: {line}",
                p.display()
            );
        }
    }
    assert!(files > 50, "the sources were found ({files})");
}
