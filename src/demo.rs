//! `holdfast demo`: a scripted Generate All story on the local services.
//! An account on a monthly plan allowance with an expiring top-up, and an
//! API key for that account only; a granted batch, an insufficient one with
//! its "k of N" choice, the choice taken, and the ledger and its grants (in
//! burn-down order) before and after each step; then a workspace whose member
//! is refused by the team's monthly limit while the account still has
//! credits; and the key revoked.

use std::net::SocketAddr;
use std::time::Duration;

use chrono::{DateTime, Datelike, Utc};
use holdfast_common::config::Connections;
use holdfast_common::database;
use holdfast_common::ledger::{
    AllowanceSpec, AllowanceTerms, Grant, GrantSource, GrantSpec, Ledger, Period, SpenderSpec,
};
use holdfast_common::messages::{Decision, Event, LimitPeriod};
use holdfast_common::pricing::thousands;
use holdfast_coordinator::keys::{Accounts, CreatedKey, KeySpec, KeyStore, Scope};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::fleet::{Fleet, FleetSettings, Roles};
use crate::producer::Producer;
use crate::report;

const WAIT: Duration = Duration::from_secs(60);

fn items(prefix: &str, n: usize, cost: i64, cheaper: &[usize]) -> Vec<Value> {
    (0..n)
        .map(|i| {
            // Some images turn out cheaper than estimated: the difference is released.
            let simulate = if cheaper.contains(&i) {
                json!({"latency_ms": 120, "actual_cost": cost - 2})
            } else {
                json!({"latency_ms": 120})
            };
            json!({"item_id": format!("{prefix}-{:02}", i + 1), "estimated_cost": cost,
                   "priority": (n - i) as i64, "payload": {"prompt": format!("product photo {}", i + 1), "simulate": simulate}})
        })
        .collect()
}

/// The account's totals, then its grants in burn-down order.
async fn ledger_line(ledger: &Ledger, account: &str) -> anyhow::Result<()> {
    let a = ledger.account(account).await?;
    println!(
        "   ledger: balance {}, held {}, available {}",
        thousands(a.balance),
        thousands(a.held),
        thousands(a.available)
    );
    for g in ledger.grants(account).await? {
        println!(
            "     grant {:<36} {:<8} remaining {:>4}  held {:>4}  expires {}",
            g.grant_id,
            g.source.as_str(),
            thousands(g.remaining),
            thousands(g.held),
            g.expires_at
                .as_deref()
                .map_or("never", |e| e.get(..10).unwrap_or(e))
        );
    }
    Ok(())
}

/// "1 January 2027".
fn day(rfc3339: Option<&str>) -> String {
    rfc3339
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map_or("never".into(), |t| t.format("%-d %B %Y").to_string())
}

/// Wait until the reconciler has issued this period's grant of `allowance`.
async fn issued_grant(ledger: &Ledger, account: &str, allowance: &str) -> anyhow::Result<Grant> {
    let until = tokio::time::Instant::now() + WAIT;
    loop {
        let grants = ledger.grants(account).await?;
        if let Some(g) = grants
            .into_iter()
            .find(|g| g.allowance_id.as_deref() == Some(allowance))
        {
            return Ok(g);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < until,
            "the reconciler did not issue allowance `{allowance}` within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn run_batch(producer: &mut Producer, request: &Value) -> anyhow::Result<Decision> {
    let id = request["batch_id"].as_str().unwrap_or_default().to_string();
    let decision = producer
        .submit(request.to_string().as_bytes(), &id, WAIT)
        .await?;
    print!("   ");
    report::decision(&decision);
    if let Decision::Granted(_) = decision {
        println!("   ... generating ...");
        let done = producer.completed_for(&id, WAIT).await?;
        print!("   ");
        report::completed(&done);
        if let Event::Completed { figures, .. } = &done {
            anyhow::ensure!(figures.pending == 0, "batch finished with pending items");
        }
    }
    Ok(decision)
}

/// A workspace's team and its members: a member's batch must fit the
/// member's limit, the team's and the account's credits. Returns the
/// workspace's account id.
async fn team_story(
    ledger: &Ledger,
    producer: &mut Producer,
    stamp: &str,
) -> anyhow::Result<String> {
    let workspace = format!("demo-workspace-{stamp}");
    println!("\n4. A workspace with 1,000 credits. Its team `design` may use 200 of them a month, each member 150.");
    ledger
        .grant(&workspace, 1_000, Some("demo workspace"), true)
        .await?;
    let monthly = |parent: Option<&str>, kind: &str, limit: i64| SpenderSpec {
        parent: parent.map(str::to_string),
        kind: Some(kind.into()),
        limit: Some(limit),
        period: LimitPeriod::Month,
        anchor: None,
    };
    ledger
        .put_spender(&workspace, "design", &monthly(None, "team", 200))
        .await?;
    for member in ["ann", "bob"] {
        ledger
            .put_spender(&workspace, member, &monthly(Some("design"), "member", 150))
            .await?;
    }
    report::spenders(&ledger.spenders(&workspace).await?);
    println!("   Ann generates 10 icons (12 credits each), charged to her: member, team and account all cover it.");
    let ann = json!({"batch_id": format!("{workspace}-ann"), "account_id": workspace,
                     "spender_id": "ann", "items": items("icon", 10, 12, &[])});
    run_batch(producer, &ann).await?;
    println!("   Bob asks for 10 banners (12 credits each): his own limit would allow them, the account has plenty, but the team has only what Ann left.");
    let bob = json!({"batch_id": format!("{workspace}-bob"), "account_id": workspace,
                     "spender_id": "bob", "items": items("banner", 10, 12, &[])});
    let decision = run_batch(producer, &bob).await?;
    let Decision::Insufficient(short) = &decision else {
        anyhow::bail!("expected the team's limit to bind, got {}", decision.kind());
    };
    let by = short.limited_by.as_ref();
    anyhow::ensure!(
        by.and_then(|l| l.spender_id.as_deref()) == Some("design"),
        "expected the team to bind, got {by:?}"
    );
    println!(
        "   limited by the team, not the account: the workspace still has {} credits.",
        ledger.account(&workspace).await?.available
    );
    report::spenders(&ledger.spenders(&workspace).await?);
    Ok(workspace)
}

/// Run the story; returns the process exit code.
pub async fn run(conn: &Connections, settings: &FleetSettings) -> anyhow::Result<i32> {
    println!("Holdfast demo: never start what you can't finish.\n");
    database::migrate(&conn.database_url).await?;
    let mut settings = settings.clone();
    // The API on a free loopback port, for the key's part of the story.
    settings.http_addr = crate::fleet::HttpAddr(Some(([127, 0, 0, 1], 0).into()));
    settings.reconciler.sweep_interval_ms = settings.reconciler.sweep_interval_ms.min(1_000);
    // The revocation at the end reaches the API within a second.
    settings.api.api_key_cache_secs = settings.api.api_key_cache_secs.min(1);
    let fleet = Fleet::start(conn, &settings, Roles::ALL).await?;
    println!(
        "Fleet started in this process (coordinator, worker, reconciler) on {} and {}, namespace `{}`.",
        database::describe(&conn.database_url),
        holdfast_common::topology::describe(&conn.amqp_url),
        conn.namespace
    );
    let api = fleet
        .http_addr()
        .ok_or_else(|| anyhow::anyhow!("the demo's HTTP API did not start"))?;
    let result = story(conn, &settings, &fleet.ledger, api).await;
    fleet.stop().await;
    result
}

async fn story(
    conn: &Connections,
    settings: &FleetSettings,
    ledger: &Ledger,
    api: SocketAddr,
) -> anyhow::Result<i32> {
    let stamp = chrono::Utc::now().format("%H%M%S%3f").to_string();
    let account = format!("demo-studio-{stamp}");
    let mut producer = Producer::connect(
        &conn.amqp_url,
        &holdfast_common::topology::Names::new(conn.namespace.clone()),
        &settings.queues,
    )
    .await?;

    println!("\n0. A customer on a plan of 150 credits a month, who also bought 50 credits that expire in 60 days.");
    ledger.create_account(&account).await?;
    let now = Utc::now();
    let month_start = now
        .date_naive()
        .with_day(1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc());
    let terms = AllowanceTerms {
        amount: 150,
        period: Period::Month,
        rollover_cap: 0,
    };
    let spec = AllowanceSpec {
        allowance_id: Some("plan".into()),
        terms,
        anchor: month_start,
    };
    ledger.create_allowance(&account, &spec).await?;
    let plan = issued_grant(ledger, &account, "plan").await?;
    println!(
        "   the reconciler issued this month's plan grant: {}",
        plan.grant_id
    );
    let topup = GrantSpec {
        grant_id: Some("topup".into()),
        amount: 50,
        source: GrantSource::Purchase,
        priority: 0,
        expires_at: Some(now + chrono::Duration::days(60)),
        note: Some("demo top-up".into()),
    };
    let topup = ledger.add_grant(&account, &topup, false).await?.grant;
    ledger_line(ledger, &account).await?;
    println!(
        "   burn-down order: lowest priority, then soonest expiry. Both are priority {}; the plan expires on {}, the top-up on {}: the plan goes first.",
        plan.priority,
        day(plan.expires_at.as_deref()),
        day(topup.expires_at.as_deref())
    );
    let keys = KeyStore::new(ledger.pool().clone());
    let key = app_key(&keys, &account, api).await?;

    println!(
        "\n1. The person clicks \"Generate All\" for 10 product photos, estimated 12 credits each."
    );
    let first = json!({"batch_id": format!("{account}-spring"), "account_id": account,
                       "items": items("spring", 10, 12, &[2, 5, 8])});
    run_batch(&mut producer, &first).await?;
    println!(
        "   (three photos cost 10 instead of 12: their difference went back to the plan grant)"
    );
    ledger_line(ledger, &account).await?;

    println!("\n2. \"Generate All\" again for 10 summer photos: 120 credits, more than is left.");
    let second_items = items("summer", 10, 12, &[]);
    let second = json!({"batch_id": format!("{account}-summer"), "account_id": account, "items": second_items});
    let decision = run_batch(&mut producer, &second).await?;
    ledger_line(ledger, &account).await?;
    let Decision::Insufficient(short) = decision else {
        anyhow::bail!("expected an insufficient decision, got {}", decision.kind());
    };

    let k = short.first_fit.count;
    println!("\n3. The person picks \"Generate the first {k}\": a new request, mode first_fit.");
    let third = json!({"batch_id": format!("{account}-summer-first-{k}"), "account_id": account,
                       "mode": "first_fit", "items": second_items});
    run_batch(&mut producer, &third).await?;
    ledger_line(ledger, &account).await?;

    let workspace = team_story(ledger, &mut producer, &stamp).await?;

    println!("\n5. The account's journal (every credit movement, append-only):");
    println!(
        "   {:>5} {:<8} {:>7} {:>8} {:>8}  batch / item",
        "entry", "kind", "amount", "balance", "held"
    );
    let journal = ledger.journal(&account).await?;
    for e in journal.iter().filter(|e| e.kind != "capture") {
        println!(
            "   {:>5} {:<8} {:>7} {:>+8} {:>+8}  {}{}",
            e.id,
            e.kind,
            e.amount,
            e.balance_delta,
            e.held_delta,
            e.batch_id
                .as_deref()
                .unwrap_or(e.note.as_deref().unwrap_or("")),
            e.item_id
                .as_deref()
                .map(|i| format!(" / {i}"))
                .unwrap_or_default()
        );
    }
    let captures = journal.iter().filter(|e| e.kind == "capture").count();
    println!("   (+ {captures} per-item capture entries; `holdfast batch show <id>` lists them per item)");

    println!("\n6. The audit recomputes every balance and hold from the journal, and every spender's usage from the holds:");
    let drift = ledger.audit().await?;
    print!("   ");
    report::audit(&drift);
    producer.close().await;

    println!("\n7. The app's key is revoked (`holdfast key revoke`): refused from then on.");
    keys.revoke(&key.info.id).await?;
    // Another process revoked it: the API's cache of the key runs out first.
    let revoked = tokio::time::Instant::now();
    let path = format!("/v1/accounts/{account}");
    let (status, refused) = loop {
        let (status, body) = http(api, "GET", &path, &key.key, None).await?;
        if status != 200 || revoked.elapsed() > WAIT {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "   GET {path} with it: {status} ({}), {:.1} s later (HOLDFAST_API_KEY_CACHE_SECS is {})",
        refused["detail"].as_str().unwrap_or_default(),
        revoked.elapsed().as_secs_f64(),
        settings.api.api_key_cache_secs
    );
    println!("\nTry it yourself: `holdfast account show {account}`, `holdfast batch show {account}-spring`, `holdfast spender show {workspace}`.");
    println!("{}", how_to_run(conn));
    Ok(if drift.is_empty() { 0 } else { 1 })
}

/// How to run `holdfast` after the demo: `make install`, or this very
/// binary; and the settings the demo ran with, when they are not the defaults.
fn how_to_run(conn: &Connections) -> String {
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| {
            let cwd = std::env::current_dir().ok()?;
            Some(match p.strip_prefix(&cwd) {
                Ok(relative) => format!("./{}", relative.display()),
                Err(_) => p.display().to_string(),
            })
        })
        .unwrap_or_else(|| "target/release/holdfast".into());
    let mut line = format!(
        "(`make install` puts `holdfast` on your PATH, in ~/.cargo/bin; or run {exe} itself, or `cargo run --release -- …`.)"
    );
    let defaults = Connections::default();
    if conn.database_url != defaults.database_url || conn.namespace != defaults.namespace {
        line.push_str(&format!(
            "\n(The demo used database {} and namespace `{}`: give the commands the same HOLDFAST_DATABASE_URL and HOLDFAST_NAMESPACE.)",
            database::describe(&conn.database_url),
            conn.namespace
        ));
    }
    line
}

/// The customer's app gets a producer key for this account only; it
/// previews over HTTP with it, and another account is refused.
async fn app_key(keys: &KeyStore, account: &str, api: SocketAddr) -> anyhow::Result<CreatedKey> {
    println!("   The shop's app gets an API key for this account only (producer scope, a day):");
    let spec = KeySpec {
        scope: Scope::Producer,
        accounts: Accounts::Only(vec![account.to_string()]),
        expires_at: Some(chrono::Utc::now() + chrono::Duration::days(1)),
        name: Some("holdfast demo".into()),
    };
    let key = keys.create(&spec).await?;
    println!(
        "   key {}… (shown once; only its hash is stored)",
        &key.key[..key.info.prefix.len() + 4]
    );
    let body = json!({"account_id": account, "count": 10, "cost": 12}).to_string();
    let (status, preview) = http(api, "POST", "/v1/preview", &key.key, Some(&body)).await?;
    anyhow::ensure!(
        status == 200,
        "the preview was answered {status}: {preview}"
    );
    println!(
        "   POST /v1/preview with it: {}",
        preview["message"].as_str().unwrap_or_default()
    );
    let other = format!("{account}-other");
    let body = json!({"account_id": other, "count": 1, "cost": 1}).to_string();
    let (status, refused) = http(api, "POST", "/v1/preview", &key.key, Some(&body)).await?;
    println!(
        "   the same key on another account: {status} ({})",
        refused["detail"].as_str().unwrap_or_default()
    );
    Ok(key)
}

/// One HTTP/1.1 request to the demo's own API with a bearer key: the status
/// and the JSON body.
async fn http(
    api: SocketAddr,
    method: &str,
    path: &str,
    key: &str,
    body: Option<&str>,
) -> anyhow::Result<(u16, Value)> {
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {api}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(api).await?;
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut answer)).await??;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no HTTP answer from the demo's API"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no status in the HTTP answer"))?;
    Ok((status, serde_json::from_str(body).unwrap_or(Value::Null)))
}
