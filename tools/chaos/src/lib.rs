//! `holdfast chaos`: fault injection against real processes and real
//! services, then a ledger check, the way a Jepsen checker counts lost and
//! duplicated messages.
//!
//! The harness starts its own throwaway PostgreSQL and RabbitMQ
//! ([`services`]), and for each scenario ([`scenarios`], [`restarts`],
//! [`concurrency`]) a fresh database and namespace ([`stage`]) with real
//! `holdfast` role processes ([`holdfast_harness::processes`]). Producers ([`load`])
//! publish batch requests while the scenario injects its faults (aborts at
//! named crash points, as abrupt as SIGKILL; SIGTERM; broker and database
//! restarts); then the fleet must settle and the checker ([`checks`]) counts
//! what must never happen. Any non-zero count, or
//! a scenario expectation that did not hold, fails the run.

mod checks;
mod concurrency;
mod load;
mod restarts;
mod scenarios;
mod services;
mod stage;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

pub use checks::{count, Counts, Sent};
pub use services::ServiceSettings;
use services::Services;

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

/// One scenario's line of the table.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub scenario: String,
    #[serde(flatten)]
    pub counts: Counts,
    pub faults: u32,
    /// Seconds from the last fault (or the end of the load) until settled; `None`: never.
    pub recover_secs: Option<f64>,
    /// Scenario expectations that did not hold.
    pub failures: Vec<String>,
    pub notes: Vec<String>,
    pub passed: bool,
}

impl Row {
    pub fn new(
        scenario: &str,
        counts: Counts,
        faults: u32,
        recover_secs: Option<f64>,
        failures: Vec<String>,
        notes: Vec<String>,
    ) -> Self {
        let passed = counts.clean() && failures.is_empty() && recover_secs.is_some();
        Self {
            scenario: scenario.to_string(),
            counts,
            faults,
            recover_secs,
            failures,
            notes,
            passed,
        }
    }

    /// A scenario that could not run to its check.
    fn broken(scenario: &str, error: &anyhow::Error) -> Self {
        Self::new(
            scenario,
            Counts::default(),
            0,
            None,
            vec![format!("scenario error: {error:#}")],
            vec![],
        )
    }
}

/// The whole run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub rows: Vec<Row>,
    pub wall_secs: f64,
    pub passed: bool,
}

/// Run the selected scenarios on fresh throwaway services, removed afterwards
/// (also on error and on Ctrl-C / SIGTERM).
pub async fn run(args: &ChaosArgs) -> anyhow::Result<Report> {
    for only in &args.only {
        anyhow::ensure!(
            scenarios::ALL.contains(&only.as_str()),
            "no scenario `{only}`; there are: {}",
            scenarios::ALL.join(", ")
        );
    }
    let started = Instant::now();
    let mut services = Services::start(&args.services).await?;
    let rows = tokio::select! {
        rows = run_scenarios(&mut services, args) => Ok(rows),
        signal = interrupted() => Err(anyhow::anyhow!("interrupted by {signal}; services stopped")),
    };
    services.shutdown().await;
    let rows = rows?;
    let passed = !rows.is_empty() && rows.iter().all(|r| r.passed);
    Ok(Report {
        rows,
        wall_secs: started.elapsed().as_secs_f64(),
        passed,
    })
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
        eprintln!("chaos: {name} ...");
        let started = Instant::now();
        let row = match scenarios::run(name, services, &args.log_dir, settle).await {
            Ok(row) => row,
            Err(e) => Row::broken(name, &e),
        };
        eprintln!(
            "chaos: {name}: {} in {:.0}s",
            if row.passed { "ok" } else { "FAILED" },
            started.elapsed().as_secs_f64()
        );
        rows.push(row);
    }
    rows
}

/// The scenario names, for `--list`.
pub fn scenario_names() -> &'static [&'static str] {
    scenarios::ALL
}

/// Print the table (and under it, what failed and the notes).
pub fn print(report: &Report) {
    println!(
        "{:<28} {:>7} {:>6} {:>6} {:>5} {:>6} {:>9} {:>10} {:>5} {:>9}  result",
        "scenario",
        "batches",
        "items",
        "faults",
        "lost",
        "twice",
        "overspend",
        "open holds",
        "drift",
        "recover s"
    );
    for r in &report.rows {
        let c = &r.counts;
        println!(
            "{:<28} {:>7} {:>6} {:>6} {:>5} {:>6} {:>9} {:>10} {:>5} {:>9}  {}",
            r.scenario,
            c.batches,
            c.items,
            r.faults,
            c.lost,
            c.captured_twice,
            c.overspend,
            c.open_holds,
            c.drift,
            r.recover_secs
                .map_or("never".to_string(), |s| format!("{s:.1}")),
            if r.passed { "ok" } else { "FAILED" }
        );
    }
    println!(
        "{} scenario(s), wall time {:.0}s: {}",
        report.rows.len(),
        report.wall_secs,
        if report.passed { "PASSED" } else { "FAILED" }
    );
    for r in &report.rows {
        for f in &r.failures {
            println!("  {} FAILED: {f}", r.scenario);
        }
    }
    for r in &report.rows {
        if !r.notes.is_empty() {
            println!("  {}: {}", r.scenario, r.notes.join("; "));
        }
    }
}
