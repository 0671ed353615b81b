//! What each command does: start roles, or read and change the ledger, or
//! talk to a running fleet as a producer would, and print the result.

use std::io::Read;
use std::time::Duration;

use crate::fleet::{Fleet, FleetSettings, Roles};
use crate::producer::{NoAnswer, Producer, ProgressFeed};
use crate::progress::{BatchProgress, Style};
use crate::{demo, report};
use anyhow::Context;
use holdfast_common::config::Connections;
use holdfast_common::database;
use holdfast_common::ledger::Ledger;
use holdfast_common::ledger::{AllowanceSpec, AllowanceTerms, GrantSpec, SpenderSpec};
use holdfast_common::messages::{Decision, Event};
use holdfast_common::telemetry;
use holdfast_common::topology::Names;
use tokio_util::sync::CancellationToken;

use crate::cli::{
    AccountCommand, AuditArgs, BatchCommand, Cli, Command, KeyCommand, KeyCreateArgs, PreviewArgs,
    ReservationCommand, ReserveArgs, SpenderCommand, SubmitArgs,
};
use holdfast_coordinator::keys::{Accounts, KeySpec, KeyStore, Scope};

/// Cancel the token on SIGINT or SIGTERM.
fn on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutdown requested: finishing in-flight work");
        token.cancel();
    });
}

async fn serve(
    conn: &Connections,
    settings: &FleetSettings,
    roles: Roles,
    migrate: bool,
) -> anyhow::Result<i32> {
    if migrate {
        database::migrate(&conn.database_url)
            .await
            .with_context(|| format!("migrating {}", database::describe(&conn.database_url)))?;
    }
    if roles.api {
        let _ = telemetry::metrics();
    }
    let mut settings = settings.clone();
    settings.api.load_secret_files()?;
    let fleet = Fleet::start(conn, &settings, roles).await?;
    on_signal(fleet.shutdown_token());
    fleet.wait().await;
    Ok(0)
}

/// The ledger, for a command that reads or changes it: fails at once when
/// the database does not exist yet (`holdfast migrate` creates it).
async fn ledger(conn: &Connections) -> anyhow::Result<Ledger> {
    Ok(Ledger::new(
        database::connect_pool(&conn.database_url, 2).await?,
    ))
}

/// Carry out `cli`'s command; the process's exit code.
pub async fn run(mut cli: Cli) -> anyhow::Result<i32> {
    cli.conn.load_secret_files()?;
    let (conn, json) = (&cli.conn, cli.json);
    let alone = |roles: Roles| Roles { api: true, ..roles };
    match cli.command {
        Command::Migrate => migrate(conn, json).await,
        Command::Run(s) => serve(conn, &s, Roles::ALL, true).await,
        Command::Coordinator(s) => serve(conn, &s, alone(Roles::COORDINATOR), false).await,
        Command::Worker(s) => {
            let roles = Roles {
                worker: true,
                ..Default::default()
            };
            serve(conn, &s, alone(roles), false).await
        }
        Command::Reconciler(s) => {
            let roles = Roles {
                reconciler: true,
                ..Default::default()
            };
            serve(conn, &s, alone(roles), false).await
        }
        Command::Account(cmd) => account(conn, cmd, json).await,
        Command::Batch(BatchCommand::Show { id }) => show_batch(conn, &id, json).await,
        Command::Batch(BatchCommand::Cancel { id }) => cancel_batch(conn, &id, json).await,
        Command::Audit(args) => audit(conn, args, json).await,
        Command::Submit(args) => submit(conn, args, json).await,
        Command::Preview(args) => preview(conn, args, json).await,
        Command::Reserve(args) => reserve(conn, args, json).await,
        Command::Reservation(cmd) => reservation(conn, cmd, json).await,
        Command::Spender(cmd) => spender(conn, cmd, json).await,
        Command::Demo(s) => demo::run(conn, &s).await,
        Command::Key(cmd) => key(conn, cmd, json).await,
        Command::Schemas { out } => {
            let written = holdfast_common::schemas::write(&out)
                .with_context(|| format!("writing the schemas to {}", out.display()))?;
            if json {
                report::json(&written);
            } else {
                written.iter().for_each(|f| println!("{f}"));
            }
            Ok(0)
        }
        Command::AmqpPermissions { role } => {
            let p = Names::new(conn.namespace.clone()).permissions(role);
            if json {
                report::json(&p);
            } else {
                println!(
                    "configure\t{}\nwrite\t{}\nread\t{}",
                    p.configure, p.write, p.read
                );
            }
            Ok(0)
        }
    }
}

/// `holdfast key create | list | revoke`.
async fn key(conn: &Connections, cmd: KeyCommand, json: bool) -> anyhow::Result<i32> {
    let ledger = ledger(conn).await?;
    let store = KeyStore::new(ledger.pool().clone());
    match cmd {
        KeyCommand::Create(args) => {
            let spec = key_spec(args)?;
            let created = store.create(&spec).await?;
            if json {
                report::json(&created);
            } else {
                report::created_key(&created);
            }
            // A key for an account that does not exist yet is allowed (the
            // account may come later), but is more often a typing error.
            for account in spec.accounts.as_list().unwrap_or_default() {
                if let Err(holdfast_common::ledger::LedgerError::UnknownAccount(_)) =
                    ledger.account(account).await
                {
                    report::error(format_args!(
                        "note: account `{account}` does not exist (yet)"
                    ));
                }
            }
        }
        KeyCommand::List => {
            let keys = store.list().await?;
            if json {
                report::json(&keys);
            } else {
                report::keys(&keys);
            }
        }
        KeyCommand::Revoke { id } => {
            let revoked = store.revoke(&id).await?;
            if json {
                report::json(&revoked);
            } else {
                report::keys(std::slice::from_ref(&revoked));
            }
        }
    }
    Ok(0)
}

/// What `key create`'s flags ask for.
fn key_spec(args: KeyCreateArgs) -> anyhow::Result<KeySpec> {
    let accounts = match (args.scope, args.all_accounts, args.accounts.is_empty()) {
        (Scope::Admin, _, true) | (_, true, _) => Accounts::All,
        (Scope::Admin, _, false) => {
            anyhow::bail!("an admin key covers every account: give no --account")
        }
        (_, false, true) => anyhow::bail!(
            "a {} key needs --account ID (one or more), or --all-accounts",
            args.scope
        ),
        (_, false, false) => Accounts::Only(args.accounts),
    };
    let expires_at = args
        .expires_in
        .map(|days| chrono::Utc::now() + chrono::Duration::days(i64::from(days)));
    let spec = KeySpec {
        scope: args.scope,
        accounts,
        expires_at,
        name: args.name,
    };
    if let Err(errors) = spec.check() {
        let why: Vec<String> = errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.reason))
            .collect();
        anyhow::bail!("{}", why.join("; "));
    }
    Ok(spec)
}

/// `holdfast migrate`: create the database if missing, apply pending migrations.
async fn migrate(conn: &Connections, json: bool) -> anyhow::Result<i32> {
    let r = database::migrate(&conn.database_url)
        .await
        .with_context(|| format!("migrating {}", database::describe(&conn.database_url)))?;
    if json {
        report::json(
            &serde_json::json!({"created_database": r.created_database, "applied": r.applied}),
        );
        return Ok(0);
    }
    if r.created_database {
        println!(
            "created database {}",
            database::describe(&conn.database_url)
        );
    }
    match r.applied.len() {
        0 => println!("migrations: up to date"),
        _ => println!("migrations applied: {}", r.applied.join(", ")),
    }
    Ok(0)
}

/// `holdfast account create | grant | void | allowance | allowance-change |
/// allowance-stop | show`.
async fn account(conn: &Connections, cmd: AccountCommand, json: bool) -> anyhow::Result<i32> {
    let ledger = ledger(conn).await?;
    let account = match cmd {
        AccountCommand::Create { id } => ledger.create_account(&id).await?,
        AccountCommand::Grant {
            id,
            amount,
            expires_in,
            expires_at,
            priority,
            source,
            grant_id,
            note,
            create,
        } => {
            let expires_at = match expires_in {
                Some(secs) => Some(
                    i64::try_from(secs)
                        .ok()
                        .and_then(chrono::Duration::try_seconds)
                        .and_then(|d| chrono::Utc::now().checked_add_signed(d))
                        .ok_or_else(|| anyhow::anyhow!("--expires-in {secs} is too far away"))?,
                ),
                None => expires_at,
            };
            let spec = GrantSpec {
                grant_id,
                amount,
                source,
                priority,
                expires_at,
                note,
            };
            let granted = ledger.add_grant(&id, &spec, create).await?;
            if !json {
                report::granted(&granted);
            }
            granted.account
        }
        AccountCommand::Void { id, grant_id } => {
            let grant = ledger.void_grant(&id, &grant_id, None).await?;
            if json {
                report::json(&grant);
            } else {
                report::grants(std::slice::from_ref(&grant));
            }
            return Ok(0);
        }
        AccountCommand::Allowance {
            id,
            amount,
            period,
            anchor,
            rollover_cap,
            allowance_id,
        } => {
            let spec = AllowanceSpec {
                allowance_id,
                terms: AllowanceTerms {
                    amount,
                    period,
                    rollover_cap,
                },
                anchor,
            };
            let allowed = ledger.create_allowance(&id, &spec).await?;
            if json {
                report::json(&allowed.allowance);
            } else {
                report::allowed(&allowed);
            }
            return Ok(0);
        }
        AccountCommand::AllowanceChange {
            id,
            allowance_id,
            amount,
            period,
            rollover_cap,
        } => {
            let terms = AllowanceTerms {
                amount,
                period,
                rollover_cap,
            };
            let allowance = ledger.change_allowance(&id, &allowance_id, &terms).await?;
            report::allowance_printed(&allowance, json);
            return Ok(0);
        }
        AccountCommand::AllowanceStop { id, allowance_id } => {
            let allowance = ledger.stop_allowance(&id, &allowance_id).await?;
            report::allowance_printed(&allowance, json);
            return Ok(0);
        }
        AccountCommand::Show { id } => {
            // The same view as GET /v1/accounts/{id}: balances, grants,
            // allowances, open holds.
            let account = ledger.account(&id).await?;
            let grants = ledger.grants(&id).await?;
            let allowances = ledger.allowances(&id).await?;
            let holds = ledger.open_holds(&id).await?;
            if json {
                let mut v = serde_json::to_value(&account)?;
                v["grants"] = serde_json::to_value(&grants)?;
                v["allowances"] = serde_json::to_value(&allowances)?;
                v["holds"] = serde_json::to_value(&holds)?;
                report::json(&v);
            } else {
                report::account(&account);
                report::grants(&grants);
                report::allowances(&allowances);
                report::holds(&holds);
            }
            return Ok(0);
        }
    };
    if json {
        report::json(&account);
    } else {
        report::account(&account);
    }
    Ok(0)
}

/// `holdfast batch show`.
async fn show_batch(conn: &Connections, id: &str, json: bool) -> anyhow::Result<i32> {
    match ledger(conn).await?.batch(id).await? {
        Some(b) if json => report::json(&b),
        Some(b) => report::batch(&b),
        None => {
            report::error(format_args!("no batch `{id}`"));
            return Ok(1);
        }
    }
    Ok(0)
}

/// `holdfast audit`: drift and stuck money; exits 1 if there is any.
async fn audit(conn: &Connections, args: AuditArgs, json: bool) -> anyhow::Result<i32> {
    let ledger = ledger(conn).await?;
    let drift = ledger.audit().await?;
    let stuck = ledger.stuck(Duration::from_secs(args.stuck_after)).await?;
    if json {
        report::json(&serde_json::json!({"drift": drift, "stuck": stuck}));
    } else {
        report::audit(&drift);
        report::stuck(&stuck, args.stuck_after);
    }
    Ok(i32::from(!(drift.is_empty() && stuck.is_empty())))
}

/// `holdfast spender set | show | delete`.
async fn spender(conn: &Connections, cmd: SpenderCommand, json: bool) -> anyhow::Result<i32> {
    let ledger = ledger(conn).await?;
    match cmd {
        SpenderCommand::Set {
            account,
            spender,
            parent,
            kind,
            limit,
            period,
            anchor,
        } => {
            let spec = SpenderSpec {
                parent,
                kind,
                limit,
                period: period.unwrap_or_default(),
                anchor,
            };
            let put = ledger.put_spender(&account, &spender, &spec).await?;
            if json {
                report::json(&put.spender);
            } else {
                println!(
                    "{} spender {spender} of account {account}",
                    if put.created { "created" } else { "changed" }
                );
                report::spenders(std::slice::from_ref(&put.spender));
            }
        }
        SpenderCommand::Show { account, spender } => {
            let all = match spender {
                Some(s) => vec![ledger.spender(&account, &s).await?],
                None => ledger.spenders(&account).await?,
            };
            if json {
                report::json(&all);
            } else {
                report::spenders(&all);
            }
        }
        SpenderCommand::Delete { account, spender } => {
            ledger.delete_spender(&account, &spender).await?;
            if json {
                report::json(&serde_json::json!({"deleted": spender}));
            } else {
                println!("deleted spender {spender} of account {account}");
            }
        }
    }
    Ok(0)
}

/// `holdfast reservation show | cancel`.
async fn reservation(
    conn: &Connections,
    cmd: ReservationCommand,
    json: bool,
) -> anyhow::Result<i32> {
    let ledger = ledger(conn).await?;
    let r = match cmd {
        ReservationCommand::Show { id } => ledger.reservation(&id).await?,
        ReservationCommand::Cancel { id } => ledger.cancel_soft(&id).await?,
    };
    report::reservation(&r, json);
    Ok(0)
}

/// `holdfast submit`: publish a request as a producer would, print the
/// decision, and with `--wait` follow the batch to its summary.
async fn submit(conn: &Connections, args: SubmitArgs, json: bool) -> anyhow::Result<i32> {
    let body = read_input(&args.file)?;
    // For messages only: the coordinator validates the request.
    let batch_id = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("batch_id")?.as_str().map(str::to_string));
    let names = Names::new(conn.namespace.clone());
    let timeout = Duration::from_secs(args.timeout);
    let mut producer = Producer::connect(&conn.amqp_url, &names, &args.queues).await?;
    // Bound before the request goes out: a short batch's first progress
    // event may follow its decision at once.
    let feed = match args.wait {
        true => Some(producer.follow_progress().await),
        false => None,
    };
    let correlation = uuid::Uuid::new_v4().to_string();
    let decision = match producer.submit(&body, &correlation, timeout).await {
        Ok(d) => d,
        Err(e) => {
            let e = explain_silence(
                &producer,
                &names,
                e,
                "decision",
                batch_id.as_deref(),
                timeout,
            )
            .await;
            producer.close().await;
            return Err(e);
        }
    };
    if json {
        report::json_line(&Event::Decision(decision.clone()));
    } else {
        report::decision(&decision);
    }
    if let (Some(feed), Decision::Granted(granted)) = (feed, &decision) {
        let (feed, hidden) = match feed {
            Ok(f) => (Some(f), None),
            Err(e) => (None, Some(format!("{e:#}"))),
        };
        let mut view = BatchProgress::start(Style::detect(json), granted, hidden.as_deref());
        let done = follow(
            &mut producer,
            feed,
            &correlation,
            granted,
            timeout,
            &mut view,
        )
        .await;
        match done {
            Ok(done) => view.finish(&done),
            Err(e) => {
                view.abandon();
                let e = explain_silence(
                    &producer,
                    &names,
                    e,
                    "summary",
                    Some(&granted.batch_id),
                    timeout,
                )
                .await;
                producer.close().await;
                return Err(e);
            }
        }
    }
    producer.close().await;
    Ok(match decision {
        Decision::Granted(_) => 0,
        Decision::Insufficient(_) => 2,
        Decision::Rejected(_) => 3,
    })
}

/// Wait for the `completed` summary of `granted`, showing its progress
/// events as they come. `timeout` is the longest silence: each progress
/// event of the batch starts it again.
async fn follow(
    producer: &mut Producer,
    mut feed: Option<ProgressFeed>,
    correlation: &str,
    granted: &holdfast_common::messages::Granted,
    timeout: Duration,
    view: &mut BatchProgress,
) -> anyhow::Result<Event> {
    let mut deadline = tokio::time::Instant::now() + timeout;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let result = loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        // `completed_for` only buffers what it reads: cancelling it between
        // two messages loses none.
        tokio::select! {
            done = producer.completed_for(correlation, left) => break done,
            Some(event) = next_progress(&mut feed, &granted.batch_id) => {
                view.update(&event);
                deadline = tokio::time::Instant::now() + timeout;
            }
            _ = tick.tick() => view.tick(),
        }
    };
    if let Some(feed) = feed {
        feed.close().await;
    }
    result
}

/// The next progress event of `batch_id`, or never (no feed, or it closed).
async fn next_progress(feed: &mut Option<ProgressFeed>, batch_id: &str) -> Option<Event> {
    match feed {
        Some(f) => match f.next_for(batch_id).await {
            Some(e) => Some(e),
            None => {
                *feed = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}

/// An error in waiting for an answer; when no answer came in time, say for
/// which batch and queue, and whether anything consumes that queue (from a
/// passive declare): no coordinator on `<ns>.requests` for a decision, no
/// worker on `<ns>.jobs` for a summary.
async fn explain_silence(
    producer: &Producer,
    names: &Names,
    e: anyhow::Error,
    awaited: &str,
    batch_id: Option<&str>,
    timeout: Duration,
) -> anyhow::Error {
    if e.downcast_ref::<NoAnswer>().is_none() {
        return e;
    }
    let batch = batch_id.map_or("the batch".to_string(), |b| format!("batch `{b}`"));
    let (queue, role, start) = match awaited {
        "decision" => (
            names.requests(),
            "coordinator",
            "`holdfast run` or `holdfast coordinator`",
        ),
        _ => (
            names.jobs(),
            "worker",
            "`holdfast run` or `holdfast worker`",
        ),
    };
    let waited = format!("no {awaited} for {batch} within {timeout:?}");
    match producer.queue_depth(&queue).await {
        Ok(d) if d.consumers == 0 => anyhow::anyhow!(
            "{waited}: no {role} consumes `{queue}` ({} message(s) waiting there); start one with namespace `{}` ({start})",
            d.messages,
            names.namespace
        ),
        // A summary is published by a coordinator's outbox relay, not by the
        // worker that closed the batch: workers alone do not send it.
        Ok(d) if awaited != "decision" => anyhow::anyhow!(
            "{waited}, though {} consumer(s) read `{queue}` ({} message(s) waiting there): the summary is published by a coordinator's outbox relay, so check that a coordinator runs with namespace `{}`; workers may also be busy or unable to reach PostgreSQL (see their logs), or raise --timeout",
            d.consumers,
            d.messages,
            names.namespace
        ),
        Ok(d) => anyhow::anyhow!(
            "{waited}, though {} consumer(s) read `{queue}` ({} message(s) waiting there): they may be busy or unable to reach PostgreSQL (see their logs), or raise --timeout",
            d.consumers,
            d.messages
        ),
        Err(q) => anyhow::anyhow!("{waited}; and {q:#}"),
    }
}

fn read_input(file: &str) -> anyhow::Result<Vec<u8>> {
    let mut body = Vec::new();
    if file == "-" {
        std::io::stdin().read_to_end(&mut body)?;
    } else {
        body = std::fs::read(file).with_context(|| format!("reading {file}"))?;
    }
    Ok(body)
}

async fn preview(conn: &Connections, args: PreviewArgs, json: bool) -> anyhow::Result<i32> {
    let body = read_input(&args.file)?;
    let request = match holdfast_coordinator::intake::parse_preview(&body, &args.limits) {
        Ok(r) => r,
        Err(rejected) => {
            if json {
                report::json(&rejected);
            } else {
                report::error(format_args!("invalid request: {}", rejected.reason));
            }
            return Ok(3);
        }
    };
    let ledger = ledger(conn).await?;
    let pots = ledger.pots(&request.account_id).await?;
    let spenders = ledger
        .spender_levels(&request.account_id, request.spender_id.as_deref())
        .await?;
    let p = holdfast_common::pricing::preview(
        &request,
        &pots,
        &spenders,
        args.pricing.sequential_chunk,
        args.pricing.execution_timeout(),
    );
    if json {
        report::json(&p);
    } else {
        report::preview(&p);
    }
    Ok(if p.fits { 0 } else { 2 })
}

async fn reserve(conn: &Connections, args: ReserveArgs, json: bool) -> anyhow::Result<i32> {
    let max = args.max_reservation_ttl_secs;
    if args.ttl == 0 || args.ttl > max {
        anyhow::bail!("--ttl must be from 1 to {max} seconds (HOLDFAST_MAX_RESERVATION_TTL_SECS)");
    }
    let ttl = Duration::from_secs(args.ttl);
    match ledger(conn)
        .await?
        .reserve_soft_for(&args.account, args.spender.as_deref(), args.amount, ttl)
        .await
    {
        Ok(r) => {
            report::reservation(&r, json);
            Ok(0)
        }
        Err(e @ holdfast_common::ledger::LedgerError::Insufficient { .. }) => {
            report::error(e);
            Ok(2)
        }
        Err(e) => Err(e.into()),
    }
}

/// Cancel a batch in the ledger; when it closed at once, its completed event
/// is in the outbox: relay it now rather than wait for a fleet's relay.
async fn cancel_batch(conn: &Connections, id: &str, json: bool) -> anyhow::Result<i32> {
    use holdfast_common::ledger::LedgerError;
    let ledger = ledger(conn).await?;
    let cancelled = match ledger.cancel_batch(id).await {
        Ok(c) => c,
        Err(e @ (LedgerError::NotFound(_) | LedgerError::WrongState(_))) => {
            report::error(e);
            return Ok(1);
        }
        Err(e) => return Err(e.into()),
    };
    if cancelled.closed.is_some() {
        if let Err(e) = relay_now(conn, &ledger).await {
            report::error(format_args!(
                "warning: the batch is cancelled; its completed event waits in the outbox for a running fleet's relay ({e:#})"
            ));
        }
    }
    if json {
        report::json(&cancelled);
        return Ok(0);
    }
    match &cancelled.closed {
        Some(c) => {
            let f = &c.figures;
            println!(
                "batch {id} cancelled: {} succeeded, {} failed, {} cancelled; reserved {}, captured {}, released {}",
                f.succeeded, f.failed, f.cancelled, f.reserved, f.captured, f.released
            );
        }
        None => println!(
            "batch {id} cancelling: running items finish, then the rest of its hold is released"
        ),
    }
    Ok(0)
}

async fn relay_now(
    conn: &Connections,
    ledger: &holdfast_common::ledger::Ledger,
) -> anyhow::Result<()> {
    let names = Names::new(conn.namespace.clone());
    let amqp = tokio::time::timeout(
        Duration::from_secs(10),
        holdfast_common::topology::connect(&conn.amqp_url, "holdfast-cli"),
    )
    .await
    .context("connecting to RabbitMQ timed out")??;
    let publisher = holdfast_common::topology::Publisher::new(&amqp).await?;
    let relayed = holdfast_common::outbox::relay::relay_once(
        ledger.pool(),
        &publisher,
        &names,
        holdfast_common::outbox::relay::CLAIM_LIMIT,
    )
    .await;
    holdfast_common::topology::close(&amqp, "done").await;
    relayed?;
    Ok(())
}
