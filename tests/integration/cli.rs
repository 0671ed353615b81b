//! The command line as an operator uses it: migrate (twice), accounts,
//! submit --wait, batch show, and audit's exit code on drift.

use crate::support;

use std::process::Output;

use holdfast::fleet::Roles;
use support::*;
use tokio::process::Command;

async fn holdfast(t: &TestFleet, args: &[&str]) -> Output {
    holdfast_command()
        .args(args)
        .env("HOLDFAST_DATABASE_URL", &t.conn.database_url)
        .env("HOLDFAST_AMQP_URL", &t.conn.amqp_url)
        .env("HOLDFAST_NAMESPACE", &t.conn.namespace)
        .env("HOLDFAST_LOG", "warn")
        .output()
        .await
        .expect("run holdfast")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test]
async fn migrate_creates_the_database_and_is_safe_to_repeat() {
    let t = TestFleet::start_with(fast_settings(), Roles::default(), None).await;
    // A database that does not exist yet, on the same server.
    let fresh = format!("{}_fresh", t.conn.database_url);
    let run = |url: String| async move {
        holdfast_command()
            .args(["migrate", "--json"])
            .env("HOLDFAST_DATABASE_URL", &url)
            .env("HOLDFAST_LOG", "warn")
            .output()
            .await
            .unwrap()
    };
    let first = run(fresh.clone()).await;
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(v["created_database"], true);
    let migrations = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .unwrap()
        .count();
    assert_eq!(v["applied"].as_array().unwrap().len(), migrations);
    let second = run(fresh.clone()).await;
    let v: serde_json::Value = serde_json::from_slice(&second.stdout).unwrap();
    assert_eq!(
        (
            v["created_database"].as_bool(),
            v["applied"].as_array().unwrap().len()
        ),
        (Some(false), 0)
    );
    holdfast_common::database::drop_database(&fresh)
        .await
        .unwrap();
}

#[tokio::test]
async fn accounts_submit_wait_batch_show_and_audit() {
    let t = TestFleet::start().await;
    let created = holdfast(
        &t,
        &["account", "grant", "studio", "50", "--create", "--json"],
    )
    .await;
    assert!(created.status.success());
    let a: serde_json::Value = serde_json::from_slice(&created.stdout).unwrap();
    assert_eq!(
        (a["balance"].as_i64(), a["available"].as_i64()),
        (Some(50), Some(50))
    );
    let bad = holdfast(&t, &["account", "grant", "studio", "-5"]).await;
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("positive"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );

    let dir = std::env::temp_dir().join(format!("{}.json", t.conn.namespace));
    std::fs::write(&dir, request("cli-1", "studio", 4, 10).to_string()).unwrap();
    let out = holdfast(&t, &["submit", dir.to_str().unwrap(), "--wait"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = stdout(&out);
    assert!(
        text.contains("GRANTED") && text.contains("COMPLETED"),
        "{text}"
    );
    assert!(text.contains("captured 40, released 0"), "{text}");

    std::fs::write(&dir, request("cli-2", "studio", 4, 10).to_string()).unwrap();
    let out = holdfast(&t, &["submit", dir.to_str().unwrap(), "--json"]).await;
    assert_eq!(out.status.code(), Some(2), "insufficient exits 2");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["decision"], "insufficient");
    assert_eq!(
        v[0]["message"],
        "You have enough credits to generate 1 out of 4 items."
    );
    let _ = std::fs::remove_file(&dir);

    let show = holdfast(&t, &["batch", "show", "cli-1", "--json"]).await;
    let b: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(
        (b["state"].as_str(), b["items"].as_array().unwrap().len()),
        (Some("completed"), 4)
    );
    assert_eq!(
        holdfast(&t, &["batch", "show", "nope"]).await.status.code(),
        Some(1)
    );

    let audit = holdfast(&t, &["audit"]).await;
    assert!(audit.status.success(), "{}", stdout(&audit));
    // Tamper with a balance behind the ledger's back: the audit names the account.
    let (client, conn) = tokio_postgres::connect(&t.conn.database_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .execute(
            "UPDATE accounts SET balance = balance + 7 WHERE id = 'studio'",
            &[],
        )
        .await
        .unwrap();
    let audit = holdfast(&t, &["audit"]).await;
    assert_eq!(audit.status.code(), Some(1));
    assert!(
        stdout(&audit).contains("account studio"),
        "{}",
        stdout(&audit)
    );
    // And the journal refuses to be rewritten.
    let err = client
        .execute("DELETE FROM journal", &[])
        .await
        .unwrap_err();
    let message = err
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    assert!(message.contains("append-only"), "{err:?}");
    t.stop().await;
}

/// `holdfast run` starts, decides and runs a batch, and stops on SIGTERM
/// without a line at ERROR level: an operator's alerting keys on those.
#[tokio::test]
async fn run_starts_works_and_stops_without_logging_an_error() {
    let mut t = TestFleet::start_with(fast_settings(), Roles::default(), None).await;
    let child = holdfast_command()
        .args(["run", "--http-addr", "off"])
        .env("HOLDFAST_DATABASE_URL", &t.conn.database_url)
        .env("HOLDFAST_AMQP_URL", &t.conn.amqp_url)
        .env("HOLDFAST_NAMESPACE", &t.conn.namespace)
        .env("HOLDFAST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start holdfast run");
    t.grant("studio", 40).await;
    granted(&t.submit(&request("run-1", "studio", 4, 10)).await);
    assert_eq!(t.wait_closed("run-1").await.figures.captured, 40);
    let pid = child.id().expect("running").to_string();
    let term = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(term.success());
    let out = child.wait_with_output().await.unwrap();
    assert!(out.status.success(), "exit status {:?}", out.status);
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let errors: Vec<_> = logs
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some("ERROR") || l.contains("panicked"))
        .collect();
    assert!(errors.is_empty(), "{errors:#?}\n--- all logs:\n{logs}");
    t.stop().await;
}

/// `holdfast audit` names stuck money and exits 1 for it, as for drift; a
/// clean ledger exits 0. `--json` keeps the drift list under `drift`.
#[tokio::test]
async fn audit_names_a_hold_stuck_past_its_deadline_and_exits_1() {
    let t = TestFleet::start_with(fast_settings(), Roles::default(), None).await;
    t.grant("studio", 100).await;
    let req: holdfast_common::messages::BatchRequest =
        serde_json::from_value(request("cli-late", "studio", 3, 10)).unwrap();
    t.ledger
        .reserve(&reserve_input(
            &req,
            std::time::Duration::from_secs(3600),
            std::time::Duration::from_secs(600),
        ))
        .await
        .unwrap();

    let clean = holdfast(&t, &["audit"]).await;
    assert!(clean.status.success(), "{}", stdout(&clean));
    assert!(
        stdout(&clean).contains("stuck: nothing"),
        "{}",
        stdout(&clean)
    );

    // Nobody dispatches or runs it, and its deadline is forced into the past.
    let client = t.ledger.pool().get().await.unwrap();
    client
        .execute(
            "UPDATE batches SET deadline_at = now() - interval '10 minutes' WHERE id = 'cli-late'",
            &[],
        )
        .await
        .unwrap();
    let audit = holdfast(&t, &["audit"]).await;
    let text = stdout(&audit);
    assert_eq!(audit.status.code(), Some(1), "{text}");
    assert!(
        text.contains("the ledger is exact") && text.contains("batch cli-late [items_overdue]"),
        "{text}"
    );

    let json = holdfast(&t, &["audit", "--json"]).await;
    assert_eq!(json.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["drift"], serde_json::json!([]), "{v:#}");
    assert_eq!(
        (
            v["stuck"][0]["subject"].as_str(),
            v["stuck"][0]["kind"].as_str(),
            v["stuck"][0]["credits"].as_i64(),
            v["stuck"].as_array().map(Vec::len)
        ),
        (
            Some("batch cli-late"),
            Some("items_overdue"),
            Some(30),
            Some(1)
        ),
        "{v:#}"
    );

    // Ten minutes overdue is within a grace of a day.
    let patient = holdfast(&t, &["audit", "--stuck-after", "86400"]).await;
    assert!(patient.status.success(), "{}", stdout(&patient));
    t.stop().await;
}

#[tokio::test]
async fn spender_set_show_and_a_reservation_charged_to_one() {
    let t = TestFleet::start_with(fast_settings(), Roles::default(), None).await;
    t.grant("ws", 10_000).await;
    let ok = |o: &Output| {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    ok(&holdfast(
        &t,
        &[
            "spender", "set", "ws", "design", "--kind", "team", "--limit", "2000", "--period",
            "month",
        ],
    )
    .await);
    let member = holdfast(
        &t,
        &[
            "spender", "set", "ws", "ann", "--parent", "design", "--kind", "member", "--limit",
            "300", "--period", "month", "--json",
        ],
    )
    .await;
    ok(&member);
    let ann: serde_json::Value = serde_json::from_slice(&member.stdout).unwrap();
    assert_eq!(
        (ann["limit"].as_i64(), ann["period"].as_str()),
        (Some(300), Some("month"))
    );
    ok(&holdfast(&t, &["reserve", "ws", "120", "--spender", "ann"]).await);
    let shown = holdfast(&t, &["spender", "show", "ws", "--json"]).await;
    ok(&shown);
    let all: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    let design = &all.as_array().unwrap()[0];
    assert_eq!(design["spender_id"], "design");
    assert_eq!(
        (design["held"].as_i64(), design["remaining"].as_i64()),
        (Some(120), Some(1_880))
    );
    assert_eq!(design["children"], serde_json::json!(["ann"]));
    let text = stdout(&holdfast(&t, &["spender", "show", "ws", "ann"]).await);
    assert!(
        text.contains(
            "member ann (under design)  limit 300 per month  used 0  held 120  remaining 180"
        ),
        "{text}"
    );
    // Over the member's limit: refused, holding nothing.
    let refused = holdfast(&t, &["reserve", "ws", "200", "--spender", "ann"]).await;
    assert_eq!(refused.status.code(), Some(2));
    // A cycle is refused with the reason.
    let cycle = holdfast(&t, &["spender", "set", "ws", "design", "--parent", "ann"]).await;
    assert!(!cycle.status.success());
    assert!(String::from_utf8_lossy(&cycle.stderr).contains("below it"));
}

#[tokio::test]
async fn keys_are_shown_once_stored_as_a_hash_listed_and_revoked() {
    let t = TestFleet::start_with(fast_settings(), Roles::default(), None).await;
    let created = holdfast(
        &t,
        &[
            "key",
            "create",
            "--scope",
            "producer",
            "--account",
            "acme",
            "--account",
            "beta",
            "--expires-in",
            "30",
            "--name",
            "ci",
            "--json",
        ],
    )
    .await;
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let k: serde_json::Value = serde_json::from_slice(&created.stdout).unwrap();
    let key = k["key"].as_str().unwrap();
    let id = k["id"].as_str().unwrap();
    assert!(key.starts_with(&format!("hf_live_{id}_")), "{key}");
    assert_eq!(key.len(), "hf_live_".len() + 12 + 1 + 40);
    assert_eq!(
        (k["scope"].as_str(), k["state"].as_str(), k["name"].as_str()),
        (Some("producer"), Some("active"), Some("ci"))
    );
    assert_eq!(k["accounts"], serde_json::json!(["acme", "beta"]));
    assert!(k["expires_at"].is_string());

    // Only the hash is stored: neither the key nor its secret is in the table.
    let (client, conn) = tokio_postgres::connect(&t.conn.database_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let row = client
        .query_one(
            "SELECT key_hash, row_to_json(k)::text AS all_columns FROM api_keys k WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let hash: Vec<u8> = row.get("key_hash");
    let secret = &key["hf_live_".len() + 13..];
    assert_eq!(hash.len(), 32);
    assert!(!row.get::<_, String>("all_columns").contains(secret));

    // Listing never shows the secret.
    let listed = holdfast(&t, &["key", "list", "--json"]).await;
    let text = stdout(&listed);
    assert!(text.contains(id) && !text.contains(secret), "{text}");
    let plain = holdfast(&t, &["key", "list"]).await;
    assert!(stdout(&plain).contains(&format!("hf_live_{id}_")));

    // Refused shapes: a producer key without accounts, an admin key with some.
    for args in [
        &["key", "create", "--scope", "producer"][..],
        &["key", "create", "--scope", "admin", "--account", "acme"][..],
        &["key", "create", "--scope", "root", "--all-accounts"][..],
    ] {
        assert!(!holdfast(&t, args).await.status.success(), "{args:?}");
    }

    let revoked = holdfast(&t, &["key", "revoke", id, "--json"]).await;
    let r: serde_json::Value = serde_json::from_slice(&revoked.stdout).unwrap();
    assert_eq!(r["state"], "revoked");
    assert!(r["revoked_at"].is_string());
    // Revoking again answers the key as it is; a revocation cannot be undone.
    let again = holdfast(&t, &["key", "revoke", id, "--json"]).await;
    let a: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(a["revoked_at"], r["revoked_at"]);
    let undo = client
        .execute(
            "UPDATE api_keys SET revoked_at = NULL WHERE id = $1",
            &[&id],
        )
        .await;
    assert!(undo.is_err(), "a revocation is final");
    assert!(!holdfast(&t, &["key", "revoke", "nosuchkey123"])
        .await
        .status
        .success());
}
