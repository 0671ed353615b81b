//! `holdfast-bench`: measure Holdfast against the ceilings of the same
//! machine, in one run, side by side.
//!
//! The roles run as real child processes ([`roles`]) on a fresh database and
//! namespace, so each role's peak RSS is its own. The ceilings
//! ([`ceilings`]) are measured with the same settings the roles use: the
//! broker with Holdfast's confirm window and prefetch on a quorum queue
//! declared like the jobs queue ([`queues`]); PostgreSQL with one-statement
//! `UPDATE`s of one hot row from as many clients as the coordinator has
//! consumers. Then: decisions in the ledger alone ([`ledger_decisions`]),
//! on accounts with one grant beside accounts with five ([`grant_decisions`]),
//! charged to a spender three levels deep beside plain ones ([`spender_decisions`]),
//! runs through the whole fleet ([`end_to_end`]), decision latency beside
//! the broker's own round trip ([`latency`]), where the CPU went ([`cpu`]),
//! and the naive per-item quota it replaces ([`naive`]). [`run`] calls them
//! in order; [`print`] shows the [`BenchReport`] as a table.

mod ceilings;
pub mod cpu;
mod end_to_end;
mod grant_decisions;
mod latency;
mod ledger_decisions;
mod naive;
pub mod profile;
mod queues;
mod report;
mod requests;
mod roles;
mod spender_decisions;

use std::time::Duration;

use clap::Args;
use holdfast::producer::Producer;
use holdfast_common::config::{Connections, QueueSettings};
use holdfast_common::database;
use holdfast_common::ledger::Ledger;
use holdfast_common::topology::{self, Names};
use holdfast_coordinator::config::CoordinatorSettings;

use crate::cpu::CpuMeter;
pub use crate::report::{print, BenchReport};
use crate::roles::Children;

/// What to measure and how much.
#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    /// Messages for the broker ceiling.
    #[arg(long, default_value_t = 20_000)]
    pub broker_messages: usize,
    /// Seconds of hot-row UPDATEs for the PostgreSQL ceiling.
    #[arg(long, default_value_t = 3)]
    pub pg_seconds: u64,
    /// Small (10-item) batches for the end-to-end run on one hot account.
    #[arg(long, default_value_t = 500)]
    pub small_batches: usize,
    /// Items of the large batch.
    #[arg(long, default_value_t = 10_000)]
    pub large_batch: usize,
    /// Requests for the decision-rate runs.
    #[arg(long, default_value_t = 2_000)]
    pub decisions: usize,
    /// Items run at each batch size of the growth measurement (so every size
    /// is timed over the same work).
    #[arg(long, default_value_t = 10_000)]
    pub growth_items: usize,
    /// Timed rounds of each side of the grant comparison (one grant against
    /// five per account); a round is 3 decisions on each of 32 accounts per
    /// client, 384 in all.
    #[arg(long, default_value_t = 20)]
    pub grant_rounds: usize,
    /// Seconds of the half-load latency run.
    #[arg(long, default_value_t = 5)]
    pub latency_seconds: u64,
    /// Keep the bench database afterwards (for a look at it).
    #[arg(long)]
    pub keep: bool,
    /// Measure only the spender comparison (plain decisions against
    /// decisions through a three-level spender path), `--grant-rounds` rounds.
    #[arg(long)]
    pub spenders_only: bool,
    /// Instead of the bench: profile PostgreSQL per statement over the
    /// end-to-end phases, on a throwaway cluster with pg_stat_statements
    /// (see docs/performance.md).
    #[arg(long)]
    pub profile_pg: bool,
    /// Port of the throwaway PostgreSQL of `--profile-pg`.
    #[arg(long, default_value_t = 5439)]
    pub profile_pg_port: u16,
}

/// Plain ledger decisions against decisions charged to a three-level
/// spender path, in alternating rounds ([`spender_decisions`]).
async fn measure_spenders(
    conn: &Connections,
    args: &BenchArgs,
    r: &mut BenchReport,
) -> anyhow::Result<()> {
    holdfast::progress::phase(
        "bench",
        format!(
            "ledger decisions, plain against a three-level spender path, alone and on four grants ({} rounds, alternating)",
            args.grant_rounds
        ),
    );
    let sp =
        spender_decisions::rates(conn, args.grant_rounds, r.pg_clients, r.ledger_group).await?;
    r.ledger_decisions_plain_per_s = sp.plain_per_s;
    r.ledger_decisions_three_level_spender_per_s = sp.three_level_per_s;
    r.spender_decisions_per_side = sp.decisions;
    r.ledger_decisions_four_grants_three_level_spender_per_s = sp.four_grants_three_level_per_s;
    r.ratio_three_level_spender_to_plain_time_per_decision = sp.plain_per_s / sp.three_level_per_s;
    r.ratio_four_grants_three_level_spender_to_plain_time_per_decision =
        sp.plain_per_s / sp.four_grants_three_level_per_s;
    Ok(())
}

/// Run every measurement. `conn` names the services; the bench uses its own
/// database (`<name>_bench`) and namespace, both removed afterwards.
pub async fn run(conn: &Connections, args: &BenchArgs) -> anyhow::Result<BenchReport> {
    let mut conn = conn.clone();
    conn.database_url = format!("{}_bench", conn.database_url);
    conn.namespace = format!("{}-bench-{}", conn.namespace, std::process::id());
    database::drop_database(&conn.database_url).await?;
    database::migrate(&conn.database_url).await?;
    cpu::use_postgres_server(cpu::postmaster_of(&conn.database_url).await?);
    let names = Names::new(conn.namespace.clone());
    let queues = QueueSettings::default();
    let coordinator = CoordinatorSettings::default();
    let mut r = BenchReport {
        machine: report::machine(),
        pg_clients: coordinator.coordinator_consumers,
        ..Default::default()
    };
    if args.spenders_only {
        r.ledger_group = usize::from(coordinator.coordinator_prefetch);
        measure_spenders(&conn, args, &mut r).await?;
        database::drop_database(&conn.database_url).await?;
        return Ok(r);
    }
    measure_ceilings(&conn, args, &coordinator, &mut r).await?;

    let ledger = Ledger::new(database::pool(&conn.database_url, 4)?);
    ledger
        .grant("hot", 1_000_000_000, Some("bench"), true)
        .await?;
    holdfast::progress::phase(
        "bench",
        format!(
            "ledger decisions ({} requests, {} clients, {} per transaction)",
            args.decisions * 5,
            r.pg_clients,
            coordinator.coordinator_prefetch
        ),
    );
    r.ledger_group = usize::from(coordinator.coordinator_prefetch);
    (
        r.ledger_decisions_hot_account_per_s,
        r.ledger_decisions_many_accounts_per_s,
    ) = ledger_decisions::rates(&conn, args.decisions * 5, r.pg_clients, r.ledger_group).await?;
    holdfast::progress::phase(
        "bench",
        format!(
            "ledger decisions, one grant against five ({} rounds of {} requests each, alternating)",
            args.grant_rounds,
            r.pg_clients * r.ledger_group * grant_decisions::PER_ROUND
        ),
    );
    let g = grant_decisions::rates(&conn, args.grant_rounds, r.pg_clients, r.ledger_group).await?;
    r.ledger_decisions_one_grant_per_s = g.one_per_s;
    r.ledger_decisions_five_grants_per_s = g.five_per_s;
    r.five_grants_draws_per_decision = g.five_draws_per_decision;
    r.grant_decisions_per_side = g.decisions;
    r.ratio_five_grants_to_one_grant_time_per_decision = g.one_per_s / g.five_per_s;
    measure_spenders(&conn, args, &mut r).await?;
    // The producer declares the topology before the role processes start, so
    // that they do not race each other to create its quorum queues.
    let producer = Producer::connect(&conn.amqp_url, &names, &queues).await?;
    let children = Children::start(&conn)?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    end_to_end::warm_up(&producer, &ledger).await?;
    let (rate, split) =
        end_to_end::small_batches(&producer, &ledger, children.pids(), args.small_batches).await?;
    r.e2e_small_batches_items_per_s = rate;
    r.cpu.push(split);
    let (rate, split) =
        end_to_end::large_batch(&producer, &ledger, children.pids(), args.large_batch).await?;
    r.e2e_large_batch_items_per_s = rate;
    r.cpu.push(split);
    r.per_item_us_by_batch_size = end_to_end::growth(&producer, &ledger, args.growth_items).await?;

    // Decisions alone: the worker paused, so jobs wait in the queue.
    children.signal("worker", "STOP").await?;
    (
        r.decisions_hot_account_per_s,
        r.decisions_many_accounts_per_s,
    ) = end_to_end::decisions(&producer, &ledger, args.decisions).await?;
    let fleet = Fleet {
        conn: &conn,
        names: &names,
        queues: &queues,
        ledger: &ledger,
        children: &children,
    };
    measure_latency(&fleet, args, &coordinator, &mut r).await?;

    r.peak_rss_mib = children.peak_rss_mib();
    children.stop().await;
    producer.close().await;

    measure_naive(&conn, &ledger, &mut r).await?;
    r.cpu_per_item(args);
    r.ratio_e2e_to_broker = r.e2e_small_batches_items_per_s / r.broker_ceiling_msgs_per_s;
    r.ratio_decisions_to_hot_row = r.decisions_hot_account_per_s / r.pg_hot_row_updates_per_s;
    r.ratio_ledger_decisions_to_hot_row =
        r.ledger_decisions_hot_account_per_s / r.pg_hot_row_updates_per_s;
    clean_up(&conn, &names, ledger, args.keep).await?;
    Ok(r)
}

/// The broker's and PostgreSQL's ceilings, before any role runs.
async fn measure_ceilings(
    conn: &Connections,
    args: &BenchArgs,
    coordinator: &CoordinatorSettings,
    r: &mut BenchReport,
) -> anyhow::Result<()> {
    let prefetch = holdfast::fleet::FleetSettings::default()
        .worker
        .worker_prefetch;
    holdfast::progress::phase(
        "bench",
        format!("broker ceiling ({} messages)", args.broker_messages),
    );
    let cpu = CpuMeter::start(vec![]);
    r.broker_ceiling_msgs_per_s = ceilings::broker(
        &conn.amqp_url,
        &conn.namespace,
        args.broker_messages,
        coordinator.confirm_window,
        prefetch,
    )
    .await?;
    r.cpu.push(cpu.stop(&format!(
        "broker ceiling, {} messages",
        args.broker_messages
    )));
    holdfast::progress::phase(
        "bench",
        format!(
            "PostgreSQL hot-row ceiling ({} s, {} clients)",
            args.pg_seconds, r.pg_clients
        ),
    );
    r.pg_hot_row_updates_per_s =
        ceilings::pg_hot_row(&conn.database_url, r.pg_clients, args.pg_seconds).await?;
    Ok(())
}

/// The running fleet the latency phases measure.
struct Fleet<'a> {
    conn: &'a Connections,
    names: &'a Names,
    queues: &'a QueueSettings,
    ledger: &'a Ledger,
    children: &'a Children,
}

/// Decision latency at half the hot-account decision rate, under the same
/// conditions (workers paused), beside the broker's own round trip at that
/// rate; then again with the workers running the jobs. Expects the workers
/// paused; resumes them.
async fn measure_latency(
    fleet: &Fleet<'_>,
    args: &BenchArgs,
    coordinator: &CoordinatorSettings,
    r: &mut BenchReport,
) -> anyhow::Result<()> {
    let (conn, names, queues) = (fleet.conn, fleet.names, fleet.queues);
    holdfast::progress::phase("bench", "decision latency at half load");
    r.latency_rate_per_s = (r.decisions_hot_account_per_s / 2.0).max(1.0);
    (r.decision_latency_ms_p50, r.decision_latency_ms_p99) = latency::decisions(
        conn,
        names,
        queues,
        &names.requests(),
        "lat-",
        r.latency_rate_per_s,
        args.latency_seconds,
    )
    .await?;
    holdfast::progress::phase("bench", "the broker's own round trip at the same rate");
    (r.broker_round_trip_ms_p50, r.broker_round_trip_ms_p99) = latency::broker_round_trip(
        conn,
        names,
        queues,
        r.latency_rate_per_s,
        args.latency_seconds,
        coordinator.coordinator_prefetch,
    )
    .await?;
    fleet.children.signal("worker", "CONT").await?;
    end_to_end::wait_closed(fleet.ledger, "dm-", args.decisions as i64).await?;
    holdfast::progress::phase("bench", "decision latency at half load, workers running");
    (
        r.decision_latency_busy_ms_p50,
        r.decision_latency_busy_ms_p99,
    ) = latency::decisions(
        conn,
        names,
        queues,
        &names.requests(),
        "latbusy-",
        r.latency_rate_per_s,
        args.latency_seconds,
    )
    .await?;
    Ok(())
}

/// The naive per-item baseline, and how many of Holdfast's batches were
/// left half done (none, if the hold does its job).
async fn measure_naive(
    conn: &Connections,
    ledger: &Ledger,
    r: &mut BenchReport,
) -> anyhow::Result<()> {
    holdfast::progress::phase("bench", "naive per-item quota baseline");
    let naive = naive::run(conn, 40, 10, 5, r.pg_clients).await?;
    r.naive_items_per_s = naive.items_per_s;
    r.naive_batches_half_done = naive.half_done;
    r.naive_batches = naive.batches;
    r.holdfast_batches_half_done = end_to_end::count(
        ledger,
        "SELECT count(*) FROM batches WHERE id LIKE $1 AND state = 'completed' AND succeeded <> run_count",
        "",
    )
    .await? as usize;
    Ok(())
}

/// Delete the bench's namespace, and its database unless `keep`.
async fn clean_up(
    conn: &Connections,
    names: &Names,
    ledger: Ledger,
    keep: bool,
) -> anyhow::Result<()> {
    let c = lapin::Connection::connect(&conn.amqp_url, Default::default()).await?;
    let ch = c.create_channel().await?;
    let deleted = topology::delete(&ch, names).await;
    topology::close_channel(&ch, "bench").await;
    topology::close(&c, "bench").await;
    deleted?;
    // The pool goes first: dropping the database ends its connections, which
    // deadpool would log as errors.
    drop(ledger);
    if !keep {
        database::drop_database(&conn.database_url).await?;
    }
    Ok(())
}
