//! The report: one row per scenario, what the checker counted and what the
//! scenario expected, and the table it prints as.

use serde::Serialize;

use crate::checks::Counts;

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
    pub(crate) fn broken(scenario: &str, error: &anyhow::Error) -> Self {
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

/// Print the table (and under it, what failed and the notes).
pub fn print(report: &Report) {
    println!(
        "{:<28} {:>7} {:>6} {:>6} {:>5} {:>6} {:>9} {:>10} {:>5} {:>11} {:>9}  result",
        "scenario",
        "batches",
        "items",
        "faults",
        "lost",
        "twice",
        "overspend",
        "open holds",
        "drift",
        "events lost",
        "recover s"
    );
    for r in &report.rows {
        let c = &r.counts;
        println!(
            "{:<28} {:>7} {:>6} {:>6} {:>5} {:>6} {:>9} {:>10} {:>5} {:>11} {:>9}  {}",
            r.scenario,
            c.batches,
            c.items,
            r.faults,
            c.lost,
            c.captured_twice,
            c.overspend,
            c.open_holds,
            c.drift,
            c.events_lost,
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
