//! The versioned wire contract against a real fleet: a request exactly as an
//! older producer sent it (tests/fixtures/, from before `schema_version`
//! existed) is still decided; the same batch sent again with
//! `schema_version: 1` replays its decision (no conflict); a newer major
//! version is rejected naming the field; and what Holdfast publishes carries
//! `schema_version` and satisfies the committed schemas of docs/schemas/.

use std::collections::BTreeMap;
use std::path::Path;

use holdfast_common::messages::{Decision, SCHEMA_VERSION};
use holdfast_common::topology;
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::Value;

use crate::support::*;

fn repo_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// The committed schema for an event's routing key.
fn schema_for(routing_key: &str) -> jsonschema::Validator {
    let name = match routing_key {
        "decision.granted" => "decision-granted",
        "decision.insufficient" => "decision-insufficient",
        "decision.rejected" => "decision-rejected",
        "batch.progress" => "progress",
        "batch.completed" => "completed",
        other => panic!("unexpected routing key {other}"),
    };
    let schema: Value = serde_json::from_str(&repo_file(&format!("docs/schemas/{name}.json")))
        .expect("a schema is JSON");
    jsonschema::validator_for(&schema).expect("a valid schema")
}

#[tokio::test]
async fn an_older_producers_request_is_decided_and_what_is_published_matches_the_schemas() {
    let mut t = TestFleet::start().await;
    t.grant("acme", 100).await;

    // Every event, raw, from a queue of our own bound to the events exchange.
    let conn = lapin::Connection::connect(&t.conn.amqp_url, Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let events = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .name()
        .to_string();
    ch.queue_bind(
        events.clone().into(),
        t.names.events().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();

    // Exactly the bytes an older producer sent: no schema_version.
    let fixture = repo_file("tests/fixtures/request-2026-11-first-fit.json");
    let old: Value = serde_json::from_str(&fixture).unwrap();
    assert!(
        old.get("schema_version").is_none(),
        "the fixture predates the field"
    );
    let first = t.submit_raw(fixture.as_bytes()).await;
    let g = granted(&first).clone();
    assert_eq!((g.batch_id.as_str(), g.reserved), ("spring-2026-0042", 96));
    assert_eq!(g.item_ids.len(), 8);

    // The same batch from a producer that now sends the version: the same
    // decision, replayed (the version is not part of the request's content).
    let mut versioned = old.clone();
    versioned["schema_version"] = 1.into();
    let again = t.submit_raw(versioned.to_string().as_bytes()).await;
    assert_eq!(
        granted(&again).hold_id,
        g.hold_id,
        "replayed, not a conflict"
    );

    // A newer major version than this build knows: rejected, naming the field.
    let mut newer = old.clone();
    newer["batch_id"] = "spring-2026-0043".into();
    newer["schema_version"] = (SCHEMA_VERSION + 1).into();
    let r = rejected(&t.submit_raw(newer.to_string().as_bytes()).await).clone();
    assert_eq!(r.errors.len(), 1, "{r:?}");
    assert_eq!(r.errors[0].field, "schema_version");
    assert!(r.reason.contains("is newer than"), "{}", r.reason);
    assert_eq!(r.batch_id.as_deref(), Some("spring-2026-0043"));
    let parked = t.dead_letters("requests").await;
    assert!(
        parked.iter().any(|(_, why)| why.contains("schema_version")),
        "{parked:?}"
    );

    // A field a later producer adds is ignored, not refused.
    let mut later = old.clone();
    later["batch_id"] = "spring-2026-0044".into();
    later["origin"] = serde_json::json!({"ui": "generate-all-button"});
    let d = t.submit_raw(later.to_string().as_bytes()).await;
    assert!(matches!(d, Decision::Insufficient(_)), "{d:?}");

    t.wait_closed("spring-2026-0042").await;
    let wanted = [
        "decision.granted",
        "decision.rejected",
        "decision.insufficient",
        "batch.completed",
    ];
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while !wanted.iter().all(|k| seen.contains_key(*k)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not every kind of event within 30 s; seen {seen:?}"
        );
        let Some(m) = ch
            .basic_get(events.clone().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let key = m.delivery.routing_key.to_string();
        let body: Value = serde_json::from_slice(&m.delivery.data).unwrap();
        assert_eq!(body["schema_version"], SCHEMA_VERSION, "{key}: {body}");
        let errors: Vec<String> = schema_for(&key)
            .iter_errors(&body)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{key}: {errors:?} in {body}");
        *seen.entry(key).or_default() += 1;
    }
    topology::close(&conn, "bye").await;
    t.assert_exact().await;
}
