//! `holdfast-bench`: measure Holdfast against the ceilings of the same
//! machine. Parse the command line, set up logging, call the library.

use anyhow::Context;
use clap::Parser;
use holdfast::report;
use holdfast_bench::BenchArgs;
use holdfast_common::config::Connections;
use holdfast_common::telemetry;

#[derive(Parser)]
#[command(
    name = "holdfast-bench",
    version,
    about = "Measure throughput, latency and memory against the machine's ceilings."
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
    #[command(flatten)]
    args: BenchArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The bench reports on stdout; keep the logs to warnings unless asked.
    if std::env::var_os("HOLDFAST_LOG").is_none() && std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("HOLDFAST_LOG", "warn");
    }
    telemetry::init_logging(cli.log_json);
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    // One line with the cause chain, not a Debug dump with a backtrace.
    if let Err(e) = runtime.block_on(run(cli)) {
        eprintln!("holdfast-bench: {e:#}");
        std::process::exit(1);
    }
    Ok(())
}

async fn run(mut cli: Cli) -> anyhow::Result<()> {
    cli.conn.load_secret_files()?;
    if cli.args.profile_pg {
        let p = holdfast_bench::profile::run(&cli.conn, &cli.args).await;
        holdfast::progress::phase_done(Some(if p.is_ok() { "done" } else { "failed" }));
        let p = p?;
        if cli.json {
            report::json(&p);
        } else {
            holdfast_bench::profile::print(&p);
        }
        return Ok(());
    }
    let r = holdfast_bench::run(&cli.conn, &cli.args).await;
    holdfast::progress::phase_done(Some(if r.is_ok() { "done" } else { "failed" }));
    let r = r?;
    if cli.json {
        report::json(&r);
    } else {
        holdfast_bench::print(&r);
    }
    Ok(())
}
