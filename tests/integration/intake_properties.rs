//! Properties of the intake over arbitrary ids within the documented limits
//! (1 to 128 characters of any Unicode, multi-byte and control characters
//! included): a request is either accepted or rejected with every problem
//! naming its field, and an accepted request's jobs always make a publishable
//! AMQP message (a `message_id` of at most 255 bytes), never a panic.
//! The last test sends such requests through a fleet on the real services.

use crate::support;

use holdfast_common::config::Limits;
use holdfast_common::dispatch::job_message;
use holdfast_common::messages::{Decision, ItemJob, MAX_SHORT_STRING, SCHEMA_VERSION};
use holdfast_common::pricing;
use holdfast_coordinator::intake;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use serde_json::{json, Value};
use support::*;

/// Any character, with multi-byte ones (up to 4 bytes of UTF-8) well represented.
fn any_char() -> impl Strategy<Value = char> {
    prop_oneof![
        any::<char>(),
        Just('🦀'),
        Just('界'),
        Just('é'),
        prop::char::range('\u{10000}', '\u{10FFFF}'),
        prop::char::range('a', 'z'),
    ]
}

/// 1 to 128 characters: an id at the documented limits. Three in four have
/// no control character (valid ids, most of them long); the rest may (the
/// intake names the field).
fn any_id() -> impl Strategy<Value = String> {
    let valid = || any_char().prop_filter("no control character", |c| !c.is_control());
    prop_oneof![
        1 => prop::collection::vec(valid(), 1..=128),
        2 => prop::collection::vec(valid(), 120..=128),
        1 => prop::collection::vec(any_char(), 1..=128),
    ]
    .prop_map(String::from_iter)
}

/// A request body with arbitrary ids, costs and mode.
fn any_request() -> impl Strategy<Value = Value> {
    let item = (any_id(), 1i64..=1_000_000_000, any::<i32>());
    (
        any_id(),
        any_id(),
        prop::collection::vec(item, 1..=4),
        prop::sample::select(vec![
            "all_or_nothing",
            "first_fit",
            "priority_fit",
            "sequential",
        ]),
    )
        .prop_map(|(batch_id, account_id, items, mode)| {
            let items: Vec<Value> = items
                .into_iter()
                .map(|(id, cost, priority)| {
                    json!({"item_id": id, "estimated_cost": cost, "priority": priority})
                })
                .collect();
            json!({"batch_id": batch_id, "account_id": account_id, "items": items, "mode": mode})
        })
}

/// What the intake made of `body`: `Ok` with the request's jobs checked, or
/// the rejection checked to name a field for every problem.
fn check(body: &[u8]) -> Result<(), TestCaseError> {
    let limits = Limits::default();
    match intake::parse(body, &limits) {
        Ok(request) => {
            for item in &request.items {
                let job = ItemJob {
                    schema_version: SCHEMA_VERSION,
                    batch_id: request.batch_id.clone(),
                    item_id: item.item_id.clone(),
                    account_id: request.account_id.clone(),
                    reserved: item.estimated_cost,
                    payload: item.payload.clone(),
                    attempt: 1,
                };
                let (_, props) = job_message(&job)
                    .map_err(|e| TestCaseError::fail(format!("job not publishable: {e}")))?;
                let id = props.message_id().as_ref().map(|s| s.as_str().len());
                prop_assert!(id.is_some_and(|n| n <= MAX_SHORT_STRING), "{id:?}");
            }
            for available in [0, 1, i64::MAX / 2] {
                let _ = pricing::plan(&request, available);
                let pots = [holdfast_common::breakdown::Pot {
                    grant_id: "g".into(),
                    source: Default::default(),
                    expires_at: None,
                    free: available,
                }];
                let _ =
                    pricing::preview(&request, &pots, &[], 10, std::time::Duration::from_secs(60));
            }
        }
        Err(rejected) => {
            prop_assert!(!rejected.errors.is_empty(), "{rejected:?}");
            for e in &rejected.errors {
                prop_assert!(!e.field.is_empty() && !e.reason.is_empty(), "{e:?}");
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_request_within_the_limits_is_accepted_or_rejected_by_field(body in any_request()) {
        check(body.to_string().as_bytes())?;
    }

    #[test]
    fn any_bytes_are_accepted_or_rejected_by_field(body in prop::collection::vec(any::<u8>(), 0..512)) {
        check(&body)?;
    }
}

/// Requests drawn from the same strategy, sent through a fleet over AMQP:
/// every one is decided or rejected with a field, every granted one closes,
/// and the ledger stays exact.
#[tokio::test]
async fn arbitrary_requests_through_a_fleet_are_decided_or_rejected_by_field() {
    let mut t = TestFleet::start().await;
    let mut runner = TestRunner::deterministic();
    let strategy = any_request();
    let mut granted_ids = Vec::new();
    for n in 0..12 {
        let mut body = strategy.new_tree(&mut runner).unwrap().current();
        let account = body["account_id"].as_str().unwrap().to_string();
        // Half of them on an account that exists, so that some are granted.
        if n % 2 == 0 && intake::check_id(&account).is_ok() {
            t.grant(&account, 4_000_000_000).await;
        }
        let tail: String = body["batch_id"]
            .as_str()
            .unwrap()
            .chars()
            .take(120)
            .collect();
        body["batch_id"] = Value::String(format!("{n}-{tail}"));
        match t.submit_raw(body.to_string().as_bytes()).await {
            Decision::Granted(g) => granted_ids.push(g.batch_id),
            Decision::Insufficient(_) => {}
            Decision::Rejected(r) => {
                assert!(!r.errors.is_empty(), "{r:?}");
                assert!(r.errors.iter().all(|e| !e.field.is_empty()), "{r:?}");
            }
        }
    }
    assert!(!granted_ids.is_empty(), "no case was granted");
    for id in &granted_ids {
        let b = t.wait_closed(id).await;
        assert_eq!(b.state, "completed", "{b:#?}");
    }
    t.assert_exact().await;
    t.stop().await;
}
