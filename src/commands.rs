//! What each command does: start roles, or read and change the ledger, or
//! talk to a running fleet as a producer would, and print the result.

use std::io::Read;
use std::time::Duration;

use crate::fleet::{Fleet, FleetSettings, Roles};
use crate::{demo, producer::Producer, report};
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

fn ledger(conn: &Connections) -> anyhow::Result<Ledger> {
    Ok(Ledger::new(database::pool(&conn.database_url, 2)?))
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
    let ledger = ledger(conn)?;
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
                    eprintln!("note: account `{account}` does not exist (yet)");
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
    let ledger = ledger(conn)?;
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
    match ledger(conn)?.batch(id).await? {
        Some(b) if json => report::json(&b),
        Some(b) => report::batch(&b),
        None => {
            eprintln!("no batch `{id}`");
            return Ok(1);
        }
    }
    Ok(0)
}

/// `holdfast audit`: drift and stuck money; exits 1 if there is any.
async fn audit(conn: &Connections, args: AuditArgs, json: bool) -> anyhow::Result<i32> {
    let ledger = ledger(conn)?;
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
    let ledger = ledger(conn)?;
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
    let ledger = ledger(conn)?;
    let r = match cmd {
        ReservationCommand::Show { id } => ledger.reservation(&id).await?,
        ReservationCommand::Cancel { id } => ledger.cancel_soft(&id).await?,
    };
    report::reservation(&r, json);
    Ok(0)
}

async fn submit(conn: &Connections, args: SubmitArgs, json: bool) -> anyhow::Result<i32> {
    let mut body = Vec::new();
    if args.file == "-" {
        std::io::stdin().read_to_end(&mut body)?;
    } else {
        body = std::fs::read(&args.file).with_context(|| format!("reading {}", args.file))?;
    }
    let names = Names::new(conn.namespace.clone());
    let timeout = Duration::from_secs(args.timeout);
    let mut producer = Producer::connect(&conn.amqp_url, &names, &args.queues).await?;
    let correlation = uuid::Uuid::new_v4().to_string();
    let decision = producer.submit(&body, &correlation, timeout).await?;
    let mut out = vec![serde_json::to_value(Event::Decision(decision.clone()))?];
    if !json {
        report::decision(&decision);
    }
    if args.wait && matches!(decision, Decision::Granted(_)) {
        let done = producer.completed_for(&correlation, timeout).await?;
        if !json {
            report::completed(&done);
        }
        out.push(serde_json::to_value(done)?);
    }
    if json {
        report::json(&out);
    }
    producer.close().await;
    Ok(match decision {
        Decision::Granted(_) => 0,
        Decision::Insufficient(_) => 2,
        Decision::Rejected(_) => 3,
    })
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
                eprintln!("invalid request: {}", rejected.reason);
            }
            return Ok(3);
        }
    };
    let ledger = ledger(conn)?;
    let pots = ledger.pots(&request.account_id).await?;
    let spenders = ledger
        .spender_levels(&request.account_id, request.spender_id.as_deref())
        .await?;
    let p = holdfast_common::pricing::preview(
        &request,
        &pots,
        &spenders,
        args.coordinator.sequential_chunk,
        args.coordinator.execution_timeout(),
    );
    if json {
        report::json(&p);
    } else {
        report::preview(&p);
    }
    Ok(if p.fits { 0 } else { 2 })
}

async fn reserve(conn: &Connections, args: ReserveArgs, json: bool) -> anyhow::Result<i32> {
    let max = args.coordinator.max_reservation_ttl_secs;
    if args.ttl == 0 || args.ttl > max {
        anyhow::bail!("--ttl must be from 1 to {max} seconds (HOLDFAST_MAX_RESERVATION_TTL_SECS)");
    }
    let ttl = Duration::from_secs(args.ttl);
    match ledger(conn)?
        .reserve_soft_for(&args.account, args.spender.as_deref(), args.amount, ttl)
        .await
    {
        Ok(r) => {
            report::reservation(&r, json);
            Ok(0)
        }
        Err(e @ holdfast_common::ledger::LedgerError::Insufficient { .. }) => {
            eprintln!("{e}");
            Ok(2)
        }
        Err(e) => Err(e.into()),
    }
}

/// Cancel a batch in the ledger; when it closed at once, its completed event
/// is in the outbox: relay it now rather than wait for a fleet's relay.
async fn cancel_batch(conn: &Connections, id: &str, json: bool) -> anyhow::Result<i32> {
    use holdfast_common::ledger::LedgerError;
    let ledger = ledger(conn)?;
    let cancelled = match ledger.cancel_batch(id).await {
        Ok(c) => c,
        Err(e @ (LedgerError::NotFound(_) | LedgerError::WrongState(_))) => {
            eprintln!("{e}");
            return Ok(1);
        }
        Err(e) => return Err(e.into()),
    };
    if cancelled.closed.is_some() {
        if let Err(e) = relay_now(conn, &ledger).await {
            eprintln!(
                "warning: the batch is cancelled; its completed event waits in the outbox for a running fleet's relay ({e:#})"
            );
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
