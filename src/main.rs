//! `holdfast`: every role and the operator's command line in one binary.
//! Parse the command line, set up telemetry and signals, call the library.

use anyhow::Context;
use clap::Parser;
use holdfast::cli::{Cli, Command};
use holdfast_common::telemetry;

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
    // One line with the cause chain, not a Debug dump with a backtrace.
    match runtime.block_on(holdfast::commands::run(cli)) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            holdfast::report::error(format_args!("{e:#}"));
            std::process::exit(1);
        }
    }
}
