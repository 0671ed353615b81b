//! `holdfast`: every role and the operator's command line in one binary.
//! Parse the command line, set up telemetry and signals, call the library.

use std::io::Read;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use holdfast::fleet::{Fleet, FleetSettings, Roles};
use holdfast::{demo, producer::Producer, report};
use holdfast_common::config::{Connections, QueueSettings};
use holdfast_common::database;
use holdfast_common::ledger::Ledger;
use holdfast_common::messages::{Decision, Event};
use holdfast_common::telemetry;
use holdfast_common::topology::Names;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "holdfast",
    version,
    about = "Credit quotas for Generate All batches: one hold per batch, jobs only when granted."
)]
struct Cli {
    #[command(flatten)]
    conn: Connections,
    /// Print data as JSON.
    #[arg(long, global = true)]
    json: bool,
    /// Write logs as JSON lines.
    #[arg(long, env = "HOLDFAST_LOG_JSON", global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the database if missing and apply pending migrations (safe to repeat).
    Migrate,
    /// Run every role in one process: coordinator, worker, reconciler, HTTP API.
    Run(FleetSettings),
    /// Run the coordinator role only.
    Coordinator(FleetSettings),
    /// Run the worker role only.
    Worker(FleetSettings),
    /// Run the reconciler role only.
    Reconciler(FleetSettings),
    /// Accounts: create, grant credits, show balances.
    #[command(subcommand)]
    Account(AccountCommand),
    /// Publish a batch request like a producer would and print the decision.
    Submit(SubmitArgs),
    /// Batches.
    #[command(subcommand)]
    Batch(BatchCommand),
    /// Recompute every balance and hold from the journal; exit 1 on any drift.
    Audit,
    /// A scripted Generate All scenario on the local services.
    Demo(FleetSettings),
}

#[derive(Subcommand)]
enum AccountCommand {
    /// Create an account with no credits.
    Create { id: String },
    /// Add credits to an account.
    Grant {
        id: String,
        /// Credits to add, in the smallest unit (a positive whole number).
        #[arg(allow_negative_numbers = true)]
        amount: i64,
        /// A reference stored in the journal (invoice, reason).
        #[arg(long)]
        note: Option<String>,
        /// Create the account if it does not exist.
        #[arg(long)]
        create: bool,
    },
    /// Show balance, held and available credits.
    Show { id: String },
}

#[derive(Subcommand)]
enum BatchCommand {
    /// Show a batch: decision, hold, figures and items.
    Show { id: String },
}

#[derive(clap::Args)]
struct SubmitArgs {
    /// The request as JSON: a file path, or `-` for standard input.
    file: String,
    /// Also wait for the batch to finish and print its summary.
    #[arg(long)]
    wait: bool,
    /// Seconds to wait for each answer.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    #[command(flatten)]
    queues: QueueSettings,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The demo tells its own story on stdout; keep the logs to warnings unless asked.
    if matches!(cli.command, Command::Demo(_))
        && std::env::var_os("HOLDFAST_LOG").is_none()
        && std::env::var_os("RUST_LOG").is_none()
    {
        std::env::set_var("HOLDFAST_LOG", "warn");
    }
    telemetry::init_logging(cli.log_json);
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let code = runtime.block_on(run(cli))?;
    std::process::exit(code);
}

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
    let fleet = Fleet::start(conn, settings, roles).await?;
    on_signal(fleet.shutdown_token());
    fleet.wait().await;
    Ok(0)
}

fn ledger(conn: &Connections) -> anyhow::Result<Ledger> {
    Ok(Ledger::new(database::pool(&conn.database_url, 2)?))
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    let conn = &cli.conn;
    match cli.command {
        Command::Migrate => {
            let r = database::migrate(&conn.database_url)
                .await
                .with_context(|| format!("migrating {}", database::describe(&conn.database_url)))?;
            if cli.json {
                report::json(
                    &serde_json::json!({"created_database": r.created_database, "applied": r.applied}),
                );
            } else {
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
            }
            Ok(0)
        }
        Command::Run(s) => serve(conn, &s, Roles::ALL, true).await,
        Command::Coordinator(s) => {
            serve(
                conn,
                &s,
                Roles {
                    coordinator: true,
                    api: true,
                    ..Default::default()
                },
                false,
            )
            .await
        }
        Command::Worker(s) => {
            serve(
                conn,
                &s,
                Roles {
                    worker: true,
                    api: true,
                    ..Default::default()
                },
                false,
            )
            .await
        }
        Command::Reconciler(s) => {
            serve(
                conn,
                &s,
                Roles {
                    reconciler: true,
                    api: true,
                    ..Default::default()
                },
                false,
            )
            .await
        }
        Command::Account(cmd) => {
            let ledger = ledger(conn)?;
            let account = match cmd {
                AccountCommand::Create { id } => ledger.create_account(&id).await?,
                AccountCommand::Grant {
                    id,
                    amount,
                    note,
                    create,
                } => ledger.grant(&id, amount, note.as_deref(), create).await?,
                AccountCommand::Show { id } => ledger.account(&id).await?,
            };
            if cli.json {
                report::json(&account);
            } else {
                report::account(&account);
            }
            Ok(0)
        }
        Command::Batch(BatchCommand::Show { id }) => match ledger(conn)?.batch(&id).await? {
            Some(b) if cli.json => {
                report::json(&b);
                Ok(0)
            }
            Some(b) => {
                report::batch(&b);
                Ok(0)
            }
            None => {
                eprintln!("no batch `{id}`");
                Ok(1)
            }
        },
        Command::Audit => {
            let drift = ledger(conn)?.audit().await?;
            if cli.json {
                report::json(&drift);
            } else {
                report::audit(&drift);
            }
            Ok(if drift.is_empty() { 0 } else { 1 })
        }
        Command::Submit(args) => submit(conn, args, cli.json).await,
        Command::Demo(s) => demo::run(conn, &s).await,
    }
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
