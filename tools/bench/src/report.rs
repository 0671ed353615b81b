//! The report: one run's figures, and the table they print as.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::cpu::{CpuSplit, POSTGRESQL};
use crate::BenchArgs;

/// The end-to-end phases the CPU per item is read for, as keyed in JSON.
pub const SMALL_BATCHES: &str = "small_batches";
pub const LARGE_BATCH: &str = "large_batch";

/// Targets of the CPU figures.
pub const TARGET_RATIO_CPU_ITEM_TO_MESSAGE: f64 = 2.5;
pub const TARGET_PG_CPU_US_PER_ITEM: f64 = 110.0;

/// One run's figures.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BenchReport {
    pub machine: String,
    pub broker_ceiling_msgs_per_s: f64,
    pub pg_hot_row_updates_per_s: f64,
    pub pg_clients: usize,
    pub e2e_small_batches_items_per_s: f64,
    pub e2e_large_batch_items_per_s: f64,
    pub decisions_hot_account_per_s: f64,
    pub decisions_many_accounts_per_s: f64,
    pub ledger_decisions_hot_account_per_s: f64,
    pub ledger_decisions_many_accounts_per_s: f64,
    pub ledger_group: usize,
    /// Ledger decisions on accounts with one grant, timed in rounds
    /// alternating with those on accounts with five grants.
    pub ledger_decisions_one_grant_per_s: f64,
    /// The same on accounts with five grants, each decision drawing from two
    /// or three of them.
    pub ledger_decisions_five_grants_per_s: f64,
    /// Grants a decision drew from, on average, on the five-grant accounts.
    pub five_grants_draws_per_decision: f64,
    /// Decisions timed on each of the two sides.
    pub grant_decisions_per_side: usize,
    /// Ledger decisions on accounts without spenders, timed in rounds
    /// alternating with decisions charged to a three-level spender path.
    pub ledger_decisions_plain_per_s: f64,
    /// The same charged to a key under a member under a team, each limited.
    pub ledger_decisions_three_level_spender_per_s: f64,
    /// The same on accounts with four grants (decisions drawing from one or
    /// two), charged to the same three-level path.
    pub ledger_decisions_four_grants_three_level_spender_per_s: f64,
    /// Decisions timed on each of those two sides.
    pub spender_decisions_per_side: usize,
    pub decision_latency_ms_p50: f64,
    pub decision_latency_ms_p99: f64,
    pub latency_rate_per_s: f64,
    /// The broker alone at the same rate: a request on a quorum queue, a
    /// consumer that answers at once, the answer on the reply queue.
    pub broker_round_trip_ms_p50: f64,
    pub broker_round_trip_ms_p99: f64,
    /// The same offered rate with the workers running the granted jobs meanwhile.
    pub decision_latency_busy_ms_p50: f64,
    pub decision_latency_busy_ms_p99: f64,
    pub per_item_us_by_batch_size: Vec<(usize, f64)>,
    pub peak_rss_mib: Vec<(String, f64)>,
    pub naive_items_per_s: f64,
    pub naive_batches_half_done: usize,
    pub naive_batches: usize,
    pub holdfast_batches_half_done: usize,
    pub ratio_e2e_to_broker: f64,
    pub ratio_decisions_to_hot_row: f64,
    pub ratio_ledger_decisions_to_hot_row: f64,
    /// Time per decision on five grants over that on one (target ≤ 1.3).
    pub ratio_five_grants_to_one_grant_time_per_decision: f64,
    /// Time per decision through a three-level spender path over that of a
    /// plain one (target ≤ 1.3).
    pub ratio_three_level_spender_to_plain_time_per_decision: f64,
    /// Time per decision on four grants through a three-level spender path
    /// over that of a plain one (target ≤ 1.3).
    pub ratio_four_grants_three_level_spender_to_plain_time_per_decision: f64,
    /// Where the CPU went in the broker ceiling and the end-to-end phases.
    pub cpu: Vec<CpuSplit>,
    /// CPU µs per item of each end-to-end phase (`small_batches`,
    /// `large_batch`), summed over every process: the roles, PostgreSQL,
    /// RabbitMQ and the bench.
    pub cpu_us_per_item: BTreeMap<String, f64>,
    /// CPU µs per message of the broker ceiling (published, confirmed,
    /// delivered, acked), summed over RabbitMQ and the bench.
    pub cpu_us_per_message: f64,
    /// `cpu_us_per_item` over `cpu_us_per_message`, per phase (target ≤ 2.5).
    pub ratio_cpu_item_to_message: BTreeMap<String, f64>,
    /// PostgreSQL's CPU µs per item (every process of the server, ended
    /// backends included), per phase (target ≤ 110).
    pub pg_cpu_us_per_item: BTreeMap<String, f64>,
}

impl BenchReport {
    /// Fill the CPU-per-item figures from the CPU splits (the broker ceiling
    /// first, then the two end-to-end phases, as [`crate::run`] pushes them).
    pub(crate) fn cpu_per_item(&mut self, args: &BenchArgs) {
        let Some(broker) = self.cpu.first() else {
            return;
        };
        self.cpu_us_per_message = broker.total_seconds() * 1e6 / args.broker_messages.max(1) as f64;
        let phases = [
            (SMALL_BATCHES, args.small_batches * 10),
            (LARGE_BATCH, args.large_batch),
        ];
        for ((key, items), split) in phases.into_iter().zip(self.cpu.iter().skip(1)) {
            let items = items.max(1) as f64;
            let per_item = split.total_seconds() * 1e6 / items;
            self.cpu_us_per_item.insert(key.into(), per_item);
            self.pg_cpu_us_per_item
                .insert(key.into(), split.seconds_of(POSTGRESQL) * 1e6 / items);
            if self.cpu_us_per_message > 0.0 {
                self.ratio_cpu_item_to_message
                    .insert(key.into(), per_item / self.cpu_us_per_message);
            }
        }
    }
}

/// `yes` or `no`: whether `value` is within `target` (at most).
fn met(value: Option<&f64>, target: f64) -> &'static str {
    match value {
        Some(v) if *v <= target => "yes",
        Some(_) => "no",
        None => "-",
    }
}

/// The machine, as the report's title names it: cores and memory.
pub(crate) fn machine() -> String {
    format!("{} cores, {}", num_cpus(), memory())
}

fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Total memory from `/proc/meminfo`, e.g. `8 GiB RAM`.
fn memory() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
        })
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| format!("{:.0} GiB RAM", kb / 1024.0 / 1024.0))
        .unwrap_or_default()
}

/// Print the report as a table: the figures, time per item by batch size,
/// peak memory per role, then the CPU split of each phase.
pub fn print(r: &BenchReport) {
    println!("Holdfast bench on {}", r.machine);
    println!("  {:<52} {:>12}", "measure", "value");
    for (k, v) in rows(r) {
        println!("  {k:<52} {v:>12}");
    }
    for (size, us) in &r.per_item_us_by_batch_size {
        println!(
            "  {:<52} {:>12.1}",
            format!("time per item (µs), batches of {size}"),
            us
        );
    }
    for (role, mib) in &r.peak_rss_mib {
        println!("  {:<52} {:>12.1}", format!("peak RSS MiB, {role}"), mib);
    }
    println!(
        "  {:<52} {:>12.1}",
        "CPU µs per message, broker ceiling", r.cpu_us_per_message
    );
    for (key, label) in [
        (SMALL_BATCHES, "10-item batches"),
        (LARGE_BATCH, "one large batch"),
    ] {
        let per_item = r.cpu_us_per_item.get(key);
        let ratio = r.ratio_cpu_item_to_message.get(key);
        let pg = r.pg_cpu_us_per_item.get(key);
        println!(
            "  {:<52} {:>12.1}",
            format!("CPU µs per item, {label}"),
            per_item.copied().unwrap_or_default()
        );
        println!(
            "  {:<52} {:>12} {}",
            format!("  ratio item / message, {label} (≤ {TARGET_RATIO_CPU_ITEM_TO_MESSAGE})"),
            format!("{:.2}", ratio.copied().unwrap_or_default()),
            met(ratio, TARGET_RATIO_CPU_ITEM_TO_MESSAGE)
        );
        println!(
            "  {:<52} {:>12} {}",
            format!("  PostgreSQL CPU µs per item, {label} (≤ {TARGET_PG_CPU_US_PER_ITEM})"),
            format!("{:.1}", pg.copied().unwrap_or_default()),
            met(pg, TARGET_PG_CPU_US_PER_ITEM)
        );
    }
    for split in &r.cpu {
        println!(
            "CPU seconds, {} ({:.1} s wall, {} cores):",
            split.phase,
            split.wall_seconds,
            num_cpus()
        );
        for (component, seconds) in &split.cpu_seconds {
            println!("  {component:<52} {seconds:>12.2}");
        }
    }
}

/// The table's (measure, value) rows, in the order they print.
fn rows(r: &BenchReport) -> Vec<(String, String)> {
    vec![
        (
            "broker ceiling (quorum, confirms, acked) msg/s".into(),
            format!("{:.0}", r.broker_ceiling_msgs_per_s),
        ),
        (
            format!("PostgreSQL hot-row UPDATE tx/s ({} clients)", r.pg_clients),
            format!("{:.0}", r.pg_hot_row_updates_per_s),
        ),
        (
            "end to end, 10-item batches, one account, items/s".into(),
            format!("{:.0}", r.e2e_small_batches_items_per_s),
        ),
        (
            "end to end, one large batch, items/s".into(),
            format!("{:.0}", r.e2e_large_batch_items_per_s),
        ),
        (
            "decisions/s, one hot account".into(),
            format!("{:.0}", r.decisions_hot_account_per_s),
        ),
        (
            "decisions/s, 100 accounts".into(),
            format!("{:.0}", r.decisions_many_accounts_per_s),
        ),
        (
            format!(
                "ledger decisions/s, one hot account ({} per tx)",
                r.ledger_group
            ),
            format!("{:.0}", r.ledger_decisions_hot_account_per_s),
        ),
        (
            format!(
                "ledger decisions/s, 100 accounts ({} per tx)",
                r.ledger_group
            ),
            format!("{:.0}", r.ledger_decisions_many_accounts_per_s),
        ),
        (
            format!(
                "ledger decisions/s, one-grant accounts ({} per tx)",
                r.ledger_group
            ),
            format!("{:.0}", r.ledger_decisions_one_grant_per_s),
        ),
        (
            format!(
                "ledger decisions/s, five-grant accounts ({} per tx)",
                r.ledger_group
            ),
            format!("{:.0}", r.ledger_decisions_five_grants_per_s),
        ),
        (
            "  grants drawn per decision, five grants".into(),
            format!("{:.2}", r.five_grants_draws_per_decision),
        ),
        (
            format!("ledger decisions/s, no spender ({} per tx)", r.ledger_group),
            format!("{:.0}", r.ledger_decisions_plain_per_s),
        ),
        (
            format!(
                "ledger decisions/s, three-level spender path ({} per tx)",
                r.ledger_group
            ),
            format!("{:.0}", r.ledger_decisions_three_level_spender_per_s),
        ),
        (
            format!("decision latency p50 ms at {:.0}/s", r.latency_rate_per_s),
            format!("{:.1}", r.decision_latency_ms_p50),
        ),
        (
            format!("decision latency p99 ms at {:.0}/s", r.latency_rate_per_s),
            format!("{:.1}", r.decision_latency_ms_p99),
        ),
        (
            format!(
                "  the broker alone (echo), p50 / p99 ms at {:.0}/s",
                r.latency_rate_per_s
            ),
            format!(
                "{:.1} / {:.1}",
                r.broker_round_trip_ms_p50, r.broker_round_trip_ms_p99
            ),
        ),
        (
            format!(
                "  same, workers running the jobs: p50 ms at {:.0}/s",
                r.latency_rate_per_s
            ),
            format!("{:.1}", r.decision_latency_busy_ms_p50),
        ),
        (
            format!(
                "  same, workers running the jobs: p99 ms at {:.0}/s",
                r.latency_rate_per_s
            ),
            format!("{:.1}", r.decision_latency_busy_ms_p99),
        ),
        (
            "naive per-item quota, items/s".into(),
            format!("{:.0}", r.naive_items_per_s),
        ),
        (
            "naive: batches left half done".into(),
            format!("{} of {}", r.naive_batches_half_done, r.naive_batches),
        ),
        (
            "holdfast: batches left half done".into(),
            format!("{}", r.holdfast_batches_half_done),
        ),
        (
            "ratio end to end / broker ceiling".into(),
            format!("{:.2}", r.ratio_e2e_to_broker),
        ),
        (
            "ratio decisions / hot-row ceiling".into(),
            format!("{:.2}", r.ratio_decisions_to_hot_row),
        ),
        (
            "ratio ledger decisions / hot-row ceiling".into(),
            format!("{:.2}", r.ratio_ledger_decisions_to_hot_row),
        ),
        (
            "ratio time per decision, five grants / one (≤ 1.3)".into(),
            format!("{:.2}", r.ratio_five_grants_to_one_grant_time_per_decision),
        ),
        (
            "ratio time per decision, three-level spender / plain (≤ 1.3)".into(),
            format!(
                "{:.2}",
                r.ratio_three_level_spender_to_plain_time_per_decision
            ),
        ),
        (
            format!(
                "ledger decisions/s, four grants, three-level spender ({} per tx)",
                r.ledger_group
            ),
            format!(
                "{:.0}",
                r.ledger_decisions_four_grants_three_level_spender_per_s
            ),
        ),
        (
            "ratio time per decision, four grants + three-level / plain (≤ 1.3)".into(),
            format!(
                "{:.2} {}",
                r.ratio_four_grants_three_level_spender_to_plain_time_per_decision,
                met(
                    Some(&r.ratio_four_grants_three_level_spender_to_plain_time_per_decision),
                    1.3
                )
            ),
        ),
    ]
}
