//! `holdfast-chaos`: fault injection against real processes and real
//! services, then a ledger check, the way a Jepsen checker counts lost and
//! duplicated messages.
//!
//! The harness starts its own throwaway PostgreSQL and RabbitMQ
//! ([`services`]), and for each scenario ([`scenarios`]) a fresh database
//! and namespace ([`stage`]) with real `holdfast` role processes
//! ([`holdfast_harness::processes`]). Producers ([`load`]) publish batch
//! requests while the scenario injects its faults (aborts at named crash
//! points, as abrupt as SIGKILL; SIGTERM; broker and database restarts);
//! then the fleet must settle and the checker ([`checks`]) counts what must
//! never happen. Any non-zero count, or a scenario expectation that did not
//! hold, fails the run; [`print`] shows the [`Report`] as a table.

mod checks;
mod events;
mod load;
mod report;
mod scenarios;
pub mod services;
mod stage;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;

pub use checks::{count, Counts, Sent};
pub use events::{events_lost, Arrived};
pub use report::{print, Report, Row};
pub use services::ServiceSettings;
pub use services::Services;

/// What to run.
#[derive(Args, Clone, Debug)]
pub struct ChaosArgs {
    #[command(flatten)]
    pub services: ServiceSettings,
    /// Run only these scenarios (comma-separated names; see `--list`).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// List the scenarios and exit.
    #[arg(long)]
    pub list: bool,
    /// Directory for the role processes' logs (one subdirectory per scenario).
    #[arg(long, default_value = "target/chaos")]
    pub log_dir: PathBuf,
    /// Seconds a scenario may take to settle after its load and faults.
    #[arg(long, default_value_t = 120)]
    pub settle_timeout: u64,
}

/// Run the selected scenarios on fresh throwaway services, removed afterwards
/// (also on error and on Ctrl-C / SIGTERM).
pub async fn run(args: &ChaosArgs) -> anyhow::Result<Report> {
    check_names(args)?;
    let started = Instant::now();
    let mut services = Services::start(&args.services).await?;
    let rows = tokio::select! {
        rows = run_scenarios(&mut services, args) => Ok(rows),
        signal = interrupted() => Err(anyhow::anyhow!("interrupted by {signal}; services stopped")),
    };
    services.shutdown().await;
    Ok(report(rows?, started))
}

/// Run the selected scenarios on `services`, started by the caller (who
/// stops them): the TLS test runs a scenario and then its own checks on the
/// same TLS services. `args.services` is not used.
pub async fn run_on(services: &mut Services, args: &ChaosArgs) -> anyhow::Result<Report> {
    check_names(args)?;
    let started = Instant::now();
    Ok(report(run_scenarios(services, args).await, started))
}

fn check_names(args: &ChaosArgs) -> anyhow::Result<()> {
    for only in &args.only {
        anyhow::ensure!(
            scenarios::ALL.contains(&only.as_str()),
            "no scenario `{only}`; there are: {}",
            scenarios::ALL.join(", ")
        );
    }
    Ok(())
}

fn report(rows: Vec<Row>, started: Instant) -> Report {
    let passed = !rows.is_empty() && rows.iter().all(|r| r.passed);
    Report {
        rows,
        wall_secs: started.elapsed().as_secs_f64(),
        passed,
    }
}

async fn interrupted() -> &'static str {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

async fn run_scenarios(services: &mut Services, args: &ChaosArgs) -> Vec<Row> {
    let settle = Duration::from_secs(args.settle_timeout);
    let mut rows = Vec::new();
    for &name in scenarios::ALL {
        if !args.only.is_empty() && !args.only.iter().any(|o| o == name) {
            continue;
        }
        // A spinner with the scenario and its time on a terminal; a line
        // when it starts and one when it ends otherwise.
        holdfast::progress::phase("chaos", name);
        let row = match scenarios::run(name, services, &args.log_dir, settle).await {
            Ok(row) => row,
            Err(e) => Row::broken(name, &e),
        };
        holdfast::progress::phase_done(Some(if row.passed { "ok" } else { "FAILED" }));
        rows.push(row);
    }
    rows
}

/// The scenario names, for `--list`.
pub fn scenario_names() -> &'static [&'static str] {
    scenarios::ALL
}
