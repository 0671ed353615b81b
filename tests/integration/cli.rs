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
    // JSON lines: one object, the decision.
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["decision"], "insufficient");
    assert_eq!(
        v["message"],
        "You have enough credits to generate 1 out of 4 items."
    );
    let _ = std::fs::remove_file(&dir);

    // The denied batch shows its decision as the submit printed it: the
    // sentence and the options, not only "skipped 4".
    let denied = holdfast(&t, &["batch", "show", "cli-2"]).await;
    assert!(denied.status.success());
    let text = stdout(&denied);
    for part in [
        "batch cli-2  account studio",
        "state denied",
        "INSUFFICIENT  batch cli-2: nothing was held, nothing started.",
        "You have enough credits to generate 1 out of 4 items.",
        "fits first: 1 item(s) for 10 credits",
        "[generate_first_fit]",
        "[add_credits]",
    ] {
        assert!(text.contains(part), "no {part:?} in:\n{text}");
    }

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

/// Every error the command line prints is one line `holdfast: <message>`,
/// whichever part of it found the problem.
#[tokio::test]
async fn every_error_is_prefixed_holdfast() {
    let t = TestFleet::start_with(fast_settings(), Roles::default(), None).await;
    t.grant("studio", 10).await;
    let bad = std::env::temp_dir().join(format!("{}-bad.json", t.conn.namespace));
    std::fs::write(&bad, r#"{"account_id": "studio", "items": []}"#).unwrap();
    for (args, code, message) in [
        (&["batch", "show", "nope"][..], 1, "no batch `nope`"),
        (
            &["account", "show", "nope"][..],
            1,
            "unknown account `nope`",
        ),
        (&["reserve", "studio", "50"][..], 2, "insufficient credits"),
        (&["batch", "cancel", "nope"][..], 1, "nope"),
        (&["reservation", "show", "nope"][..], 1, "nope"),
        (&["key", "revoke", "nosuchkey123"][..], 1, "nosuchkey123"),
        (
            &["preview", bad.to_str().unwrap()][..],
            3,
            "invalid request: ",
        ),
    ] {
        let out = holdfast(&t, args).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        let lines: Vec<&str> = err.lines().collect();
        assert!(
            lines.len() == 1 && lines[0].starts_with("holdfast: ") && lines[0].contains(message),
            "{args:?}: expected one line `holdfast: …{message}…`, got:\n{err}"
        );
    }
    let _ = std::fs::remove_file(&bad);
}

/// A command run before `holdfast migrate` says at once that the database
/// does not exist and what creates it, instead of retrying.
#[tokio::test]
async fn a_command_before_migrate_names_the_missing_database() {
    let conn = unique_connections();
    let _cleanup = Cleanup { conn: conn.clone() };
    let run = |args: &'static [&'static str]| {
        let url = conn.database_url.clone();
        async move {
            holdfast_command()
                .args(args)
                .env("HOLDFAST_DATABASE_URL", url)
                .env("HOLDFAST_LOG", "warn")
                .output()
                .await
                .unwrap()
        }
    };
    let name = conn.database_url.rsplit('/').next().unwrap().to_string();
    let started = std::time::Instant::now();
    let out = run(&["account", "show", "studio"]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(
        err.trim_end(),
        format!(
            "holdfast: database `{name}` does not exist on 127.0.0.1:5432: run `holdfast migrate` to create it"
        )
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "took {:?}: retried",
        started.elapsed()
    );
    // And `holdfast migrate` does create it.
    assert!(run(&["migrate"]).await.status.success());
    let out = run(&["account", "show", "studio"]).await;
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        "holdfast: unknown account `studio`"
    );
}

/// With no coordinator, `submit` names the batch and the queue and says that
/// nothing consumes it; with a coordinator but no worker, `submit --wait`
/// says the same of the jobs queue.
#[tokio::test]
async fn submit_says_which_role_is_missing_when_no_answer_comes() {
    let mut t = TestFleet::start_with(fast_settings(), Roles::default(), None).await;
    t.grant("studio", 100).await;
    let file = std::env::temp_dir().join(format!("{}-silent.json", t.conn.namespace));
    std::fs::write(&file, request("silent-1", "studio", 3, 10).to_string()).unwrap();
    let path = file.to_str().unwrap();
    let out = holdfast(&t, &["submit", path, "--timeout", "2"]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let ns = t.conn.namespace.clone();
    assert_eq!(
        err.trim_end(),
        format!(
            "holdfast: no decision for batch `silent-1` within 2s: no coordinator consumes `{ns}.requests` (1 message(s) waiting there); start one with namespace `{ns}` (`holdfast run` or `holdfast coordinator`)"
        )
    );

    // A coordinator decides it (and the next one); no worker runs the jobs.
    t.start_roles(Roles::COORDINATOR, None).await;
    std::fs::write(&file, request("silent-2", "studio", 3, 10).to_string()).unwrap();
    let out = holdfast(&t, &["submit", path, "--wait", "--timeout", "5"]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        stdout(&out).contains("GRANTED  batch silent-2"),
        "{}",
        stdout(&out)
    );
    assert!(
        err.contains(&format!(
            "holdfast: no summary for batch `silent-2` within 5s: no worker consumes `{ns}.jobs` ("
        )) && err.contains("`holdfast run` or `holdfast worker`"),
        "{err}"
    );
    let _ = std::fs::remove_file(&file);
    t.stop().await;
}

/// Ten items that take from 0.3 to 3 seconds: a batch that runs long enough
/// to report progress several times.
fn slow_request(batch_id: &str) -> serde_json::Value {
    let items: Vec<serde_json::Value> = (0..10)
        .map(|i| {
            serde_json::json!({"item_id": format!("i{i}"), "estimated_cost": 10,
                "payload": {"simulate": {"latency_ms": 300 * (i + 1)}}})
        })
        .collect();
    serde_json::json!({"batch_id": batch_id, "account_id": "studio", "items": items})
}

/// Not on a terminal, `submit --wait` prints plain progress lines, then the
/// summary; with `--json`, one JSON object a line: the decision, progress
/// events, the completed event.
#[tokio::test]
async fn submit_wait_prints_progress_lines_and_json_lines() {
    let t = TestFleet::start().await;
    t.grant("studio", 1_000).await;
    let file = std::env::temp_dir().join(format!("{}-slow.json", t.conn.namespace));
    std::fs::write(&file, slow_request("slow-1").to_string()).unwrap();
    let out = holdfast(&t, &["submit", file.to_str().unwrap(), "--wait"]).await;
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("GRANTED  batch slow-1"), "{text}");
    assert!(
        lines.contains(&"batch slow-1: running 10 item(s); the summary follows when it closes"),
        "{text}"
    );
    let progress: Vec<&&str> = lines
        .iter()
        .filter(|l| l.starts_with("batch slow-1: ") && l.contains(" of 10 items done ("))
        .collect();
    assert!(progress.len() >= 2, "{text}");
    assert!(
        progress
            .iter()
            .all(|l| l.contains("credits captured") && l.contains("items/s, ETA ")),
        "{text}"
    );
    assert!(
        lines
            .last()
            .unwrap()
            .starts_with("COMPLETED  batch slow-1: 10 succeeded"),
        "{text}"
    );

    std::fs::write(&file, slow_request("slow-2").to_string()).unwrap();
    let out = holdfast(&t, &["submit", file.to_str().unwrap(), "--wait", "--json"]).await;
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.first(), Some(&"decision"), "{text}");
    assert_eq!(events[0]["decision"], "granted");
    assert_eq!(kinds.last(), Some(&"completed"), "{text}");
    assert!(
        kinds[1..kinds.len() - 1].iter().all(|k| *k == "progress"),
        "{text}"
    );
    assert!(kinds.len() >= 4, "at least two progress events: {text}");
    assert!(events.iter().all(|e| e["batch_id"] == "slow-2"), "{text}");
    let done = events.last().unwrap();
    assert_eq!(
        (done["succeeded"].as_i64(), done["captured"].as_i64()),
        (Some(10), Some(100))
    );
    let _ = std::fs::remove_file(&file);
    t.stop().await;
}

/// On a terminal (a pseudo-terminal from `script`), `submit --wait` draws a
/// bar that fills up, then prints the summary.
#[tokio::test]
async fn submit_wait_draws_a_bar_on_a_terminal() {
    let t = TestFleet::start().await;
    t.grant("studio", 1_000).await;
    let file = std::env::temp_dir().join(format!("{}-tty.json", t.conn.namespace));
    std::fs::write(&file, slow_request("tty-1").to_string()).unwrap();
    let exe = env!("CARGO_BIN_EXE_holdfast");
    let inner = format!("stty cols 150; '{exe}' submit '{}' --wait", file.display());
    let mut script = Command::new("script");
    for (name, _) in std::env::vars_os() {
        if name.as_encoded_bytes().starts_with(b"HOLDFAST_") {
            script.env_remove(name);
        }
    }
    let out = script
        .args(["-qfec", &inner, "/dev/null"])
        .env("HOLDFAST_DATABASE_URL", &t.conn.database_url)
        .env("HOLDFAST_AMQP_URL", &t.conn.amqp_url)
        .env("HOLDFAST_NAMESPACE", &t.conn.namespace)
        .env("HOLDFAST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("run script(1)");
    let screen = stdout(&out);
    assert!(out.status.success(), "{screen}");
    // Redraws: the bar at some point between empty and full, then full.
    let partial = (1..10).any(|k| screen.contains(&format!("] {k}/10 items")));
    let full = screen.rfind("] 10/10 items · 0 failed · 100 credits captured");
    let summary = screen.rfind("COMPLETED  batch tty-1: 10 succeeded");
    assert!(partial, "no partial bar in:\n{screen}");
    assert!(
        matches!((full, summary), (Some(f), Some(s)) if f < s),
        "the full bar, then the summary, expected in:\n{screen}"
    );
    assert!(screen.contains("/s · ETA "), "{screen}");
    let _ = std::fs::remove_file(&file);
    t.stop().await;
}
