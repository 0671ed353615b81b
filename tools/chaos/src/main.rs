//! `holdfast-chaos`: fault injection against real role processes on
//! throwaway services, then a ledger check. Parse the command line, set up
//! logging, call the library; exit 1 when a scenario failed.

use anyhow::Context;
use clap::Parser;
use holdfast::report;
use holdfast_chaos::ChaosArgs;
use holdfast_common::telemetry;

#[derive(Parser)]
#[command(
    name = "holdfast-chaos",
    version,
    about = "Inject faults into real role processes on throwaway PostgreSQL and RabbitMQ \
             instances, then check the ledger; exit 1 if anything was lost, charged twice, \
             overspent, left open or drifted."
)]
struct Cli {
    /// Print data as JSON.
    #[arg(long, global = true)]
    json: bool,
    /// Write logs as JSON lines.
    #[arg(long, env = "HOLDFAST_LOG_JSON", global = true)]
    log_json: bool,
    #[command(flatten)]
    args: ChaosArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The harness reports in its table; its own connections see every
    // restart it causes, which is no news. The roles log to files.
    if std::env::var_os("HOLDFAST_LOG").is_none() && std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("HOLDFAST_LOG", "error,lapin=off");
    }
    telemetry::init_logging(cli.log_json);
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    // One line with the cause chain, not a Debug dump with a backtrace.
    match runtime.block_on(run(cli)) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("holdfast-chaos: {e:#}");
            std::process::exit(1);
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    if cli.args.list {
        for name in holdfast_chaos::scenario_names() {
            println!("{name}");
        }
        return Ok(0);
    }
    let r = holdfast_chaos::run(&cli.args).await?;
    if cli.json {
        report::json(&r);
    } else {
        holdfast_chaos::print(&r);
    }
    Ok(if r.passed { 0 } else { 1 })
}
