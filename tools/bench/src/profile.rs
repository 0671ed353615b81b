//! `--profile-pg`: where PostgreSQL's time goes, statement by statement,
//! per item. A throwaway cluster of its own ([`holdfast_harness::postgres`],
//! `fsync` on like the shared server) with `pg_stat_statements` preloaded
//! (`track = all`, so statements run inside functions and triggers show
//! too, marked not top-level) and `track_io_timing` on; the roles run against
//! it as child processes, and each end-to-end phase (small batches, the
//! large batch) starts from reset statistics. Per item of each phase: every
//! statement's calls, execution time, rows, shared blocks and WAL; commits
//! (`pg_stat_database`); WAL (`pg_stat_wal`); updates and HOT updates per
//! table (`pg_stat_user_tables`); and the server's CPU time (its postmaster
//! and every child, reaped ones included, from `/proc`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use holdfast::producer::Producer;
use holdfast_common::config::{Connections, QueueSettings};
use holdfast_common::database;
use holdfast_common::ledger::Ledger;
use holdfast_common::topology::{self, Names};
use holdfast_harness::postgres::Postgres;
use serde::Serialize;

use crate::cpu::{self, CpuMeter, CpuSplit, POSTGRESQL};
use crate::end_to_end::{self, publish_all};
use crate::requests::{numbered, request};
use crate::roles::Children;
use crate::BenchArgs;

/// One statement's figures over a phase, per item.
#[derive(Clone, Debug, Serialize)]
pub struct StatementProfile {
    /// The normalized query text (constants as `$n`), whitespace collapsed.
    pub query: String,
    /// False for a statement run inside a function or trigger.
    pub toplevel: bool,
    pub calls_per_item: f64,
    /// Execution time (planning excluded), µs per item.
    pub exec_us_per_item: f64,
    /// Execution time per call, µs.
    pub exec_us_per_call: f64,
    pub rows_per_item: f64,
    pub shared_blks_hit_per_item: f64,
    pub shared_blks_read_per_item: f64,
    pub shared_blks_dirtied_per_item: f64,
    pub shared_blks_written_per_item: f64,
    pub wal_records_per_item: f64,
    pub wal_fpi_per_item: f64,
    pub wal_bytes_per_item: f64,
}

/// One table's writes over a phase.
#[derive(Clone, Debug, Serialize)]
pub struct TableProfile {
    pub table: String,
    pub inserts_per_item: f64,
    pub updates_per_item: f64,
    pub hot_updates_per_item: f64,
    pub deletes_per_item: f64,
    /// `n_tup_hot_upd / n_tup_upd` (0 without updates).
    pub hot_ratio: f64,
    /// The table's indexes, each maintained on a non-HOT update and every insert.
    pub indexes: Vec<String>,
    pub fillfactor: Option<i32>,
}

/// One phase's profile.
#[derive(Clone, Debug, Serialize)]
pub struct PhaseProfile {
    /// `small_batches` or `large_batch`.
    pub phase: String,
    pub items: usize,
    pub wall_seconds: f64,
    /// The server's CPU µs per item (every process of the cluster).
    pub pg_cpu_us_per_item: f64,
    /// Every process's CPU µs per item, as the bench sums it.
    pub cpu_us_per_item: f64,
    pub cpu: CpuSplit,
    /// Statements' execution time per item, summed over top-level statements
    /// only (nested ones are inside them).
    pub exec_us_per_item_toplevel: f64,
    /// `pg_stat_database.xact_commit` per item.
    pub commits_per_item: f64,
    pub rollbacks_per_item: f64,
    /// `pg_stat_wal` per item.
    pub wal_records_per_item: f64,
    pub wal_fpi_per_item: f64,
    pub wal_bytes_per_item: f64,
    /// WAL writes and syncs (flushes at commit, by the WAL writer) per item.
    pub wal_writes_per_item: f64,
    pub wal_syncs_per_item: f64,
    /// Heaviest first (by execution time).
    pub statements: Vec<StatementProfile>,
    pub tables: Vec<TableProfile>,
}

/// The profile: one entry per end-to-end phase.
#[derive(Clone, Debug, Serialize)]
pub struct PgProfile {
    pub server_version: String,
    pub phases: Vec<PhaseProfile>,
}

/// Start a throwaway cluster on `args.profile_pg_port`, run the end-to-end
/// phases against it with the roles, and profile each. RabbitMQ is the
/// shared one (`conn.amqp_url`), in a namespace of the run's own.
pub async fn run(conn: &Connections, args: &BenchArgs) -> anyhow::Result<PgProfile> {
    let root = std::env::temp_dir().join(format!("holdfast-bench-pg-{}", std::process::id()));
    let _dir = RemoveOnDrop(root.clone());
    holdfast::progress::phase(
        "bench",
        format!(
            "throwaway PostgreSQL with pg_stat_statements on port {}",
            args.profile_pg_port
        ),
    );
    let pg = Postgres::create_with(
        &root,
        args.profile_pg_port,
        None,
        &[
            "fsync=on",
            "shared_preload_libraries=pg_stat_statements",
            "pg_stat_statements.track=all",
            "pg_stat_statements.max=5000",
            "track_io_timing=on",
            "track_wal_io_timing=on",
        ],
    )
    .await?;
    let mut conn = conn.clone();
    conn.database_url = pg.url("holdfast_profile");
    conn.namespace = format!("{}-profile-{}", conn.namespace, std::process::id());
    database::migrate(&conn.database_url).await?;
    let ledger = Ledger::new(database::pool(&conn.database_url, 2)?);
    let c = ledger.pool().get().await?;
    c.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .await?;
    let server_version: String = c.query_one("SHOW server_version", &[]).await?.get(0);
    drop(c);
    cpu::use_postgres_server(cpu::postmaster_of(&conn.database_url).await?);
    ledger
        .grant("hot", 1_000_000_000, Some("bench"), true)
        .await?;

    let names = Names::new(conn.namespace.clone());
    let producer = Producer::connect(&conn.amqp_url, &names, &QueueSettings::default()).await?;
    let children = Children::start(&conn)?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    end_to_end::warm_up(&producer, &ledger).await?;

    let mut phases = Vec::new();
    let small = numbered("small-", args.small_batches, 10, |_| "hot".to_string());
    phases.push(
        profile_phase(
            &ledger,
            &children,
            crate::report::SMALL_BATCHES,
            args.small_batches * 10,
            || async {
                publish_all(&producer, &small).await?;
                end_to_end::wait_closed(&ledger, "small-", small.len() as i64).await?;
                anyhow::Ok(())
            },
        )
        .await?,
    );
    let large = [(
        "large-0".to_string(),
        request("large-0", "hot", args.large_batch, 1),
    )];
    phases.push(
        profile_phase(
            &ledger,
            &children,
            crate::report::LARGE_BATCH,
            args.large_batch,
            || async {
                publish_all(&producer, &large).await?;
                end_to_end::wait_closed(&ledger, "large-", 1).await?;
                anyhow::Ok(())
            },
        )
        .await?,
    );

    children.stop().await;
    producer.close().await;
    let amqp = lapin::Connection::connect(&conn.amqp_url, Default::default()).await?;
    let ch = amqp.create_channel().await?;
    let deleted = topology::delete(&ch, &names).await;
    topology::close_channel(&ch, "bench").await;
    topology::close(&amqp, "bench").await;
    deleted?;
    drop(ledger);
    drop(pg);
    Ok(PgProfile {
        server_version,
        phases,
    })
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Reset the statistics, run `phase`, and read them back per item.
async fn profile_phase<F, Fut>(
    ledger: &Ledger,
    children: &Children,
    name: &str,
    items: usize,
    phase: F,
) -> anyhow::Result<PhaseProfile>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    holdfast::progress::phase("bench", format!("profile: {name}, {items} items"));
    let c = ledger.pool().get().await?;
    // Backends flush their statistics at most once a second: let the
    // previous phase's settle before resetting.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.batch_execute(
        "SELECT pg_stat_statements_reset(); SELECT pg_stat_reset(); SELECT pg_stat_reset_shared('wal');",
    )
    .await?;
    let meter = CpuMeter::start(children.pids());
    let started = Instant::now();
    phase().await?;
    let wall = started.elapsed();
    let split = meter.stop(name);
    // The same settling before reading this phase's figures.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let n = items.max(1) as f64;
    let per = |v: f64| v / n;

    let mut statements = Vec::new();
    for row in c
        .query(
            "SELECT regexp_replace(query, '\\s+', ' ', 'g'), toplevel, calls::float8,
                    total_exec_time, rows::float8, shared_blks_hit::float8,
                    shared_blks_read::float8, shared_blks_dirtied::float8,
                    shared_blks_written::float8, wal_records::float8, wal_fpi::float8,
                    wal_bytes::float8
               FROM pg_stat_statements s
               JOIN pg_database d ON d.oid = s.dbid
              WHERE d.datname = current_database()
                AND query NOT LIKE '%pg_stat_statements_reset%'
                AND query NOT LIKE 'SELECT pg_stat_reset%'
              ORDER BY total_exec_time DESC",
            &[],
        )
        .await?
    {
        let calls: f64 = row.get(2);
        let exec_ms: f64 = row.get(3);
        statements.push(StatementProfile {
            query: row.get(0),
            toplevel: row.get(1),
            calls_per_item: per(calls),
            exec_us_per_item: per(exec_ms * 1e3),
            exec_us_per_call: if calls > 0.0 {
                exec_ms * 1e3 / calls
            } else {
                0.0
            },
            rows_per_item: per(row.get(4)),
            shared_blks_hit_per_item: per(row.get(5)),
            shared_blks_read_per_item: per(row.get(6)),
            shared_blks_dirtied_per_item: per(row.get(7)),
            shared_blks_written_per_item: per(row.get(8)),
            wal_records_per_item: per(row.get(9)),
            wal_fpi_per_item: per(row.get(10)),
            wal_bytes_per_item: per(row.get(11)),
        });
    }
    let db = c
        .query_one(
            "SELECT xact_commit::float8, xact_rollback::float8 FROM pg_stat_database
              WHERE datname = current_database()",
            &[],
        )
        .await?;
    let wal = c
        .query_one(
            "SELECT wal_records::float8, wal_fpi::float8, wal_bytes::float8,
                    wal_write::float8, wal_sync::float8 FROM pg_stat_wal",
            &[],
        )
        .await?;
    let mut tables = Vec::new();
    for row in c
        .query(
            "SELECT t.relname::text, n_tup_ins::float8, n_tup_upd::float8,
                    n_tup_hot_upd::float8, n_tup_del::float8,
                    coalesce((SELECT array_agg(i.indexrelid::regclass::text ORDER BY 1)
                                FROM pg_index i WHERE i.indrelid = t.relid), '{}'),
                    (SELECT substring(o FROM 'fillfactor=(\\d+)')::int
                       FROM unnest(c.reloptions) o WHERE o LIKE 'fillfactor=%')
               FROM pg_stat_user_tables t JOIN pg_class c ON c.oid = t.relid
              WHERE n_tup_ins + n_tup_upd + n_tup_del > 0
              ORDER BY n_tup_ins + n_tup_upd + n_tup_del DESC",
            &[],
        )
        .await?
    {
        let (upd, hot): (f64, f64) = (row.get(2), row.get(3));
        tables.push(TableProfile {
            table: row.get(0),
            inserts_per_item: per(row.get(1)),
            updates_per_item: per(upd),
            hot_updates_per_item: per(hot),
            deletes_per_item: per(row.get(4)),
            hot_ratio: if upd > 0.0 { hot / upd } else { 0.0 },
            indexes: row.get(5),
            fillfactor: row.get(6),
        });
    }
    let exec_toplevel: f64 = statements
        .iter()
        .filter(|s| s.toplevel)
        .map(|s| s.exec_us_per_item)
        .sum();
    Ok(PhaseProfile {
        phase: name.into(),
        items,
        wall_seconds: wall.as_secs_f64(),
        pg_cpu_us_per_item: per(split.seconds_of(POSTGRESQL) * 1e6),
        cpu_us_per_item: per(split.total_seconds() * 1e6),
        cpu: split,
        exec_us_per_item_toplevel: exec_toplevel,
        commits_per_item: per(db.get(0)),
        rollbacks_per_item: per(db.get(1)),
        wal_records_per_item: per(wal.get(0)),
        wal_fpi_per_item: per(wal.get(1)),
        wal_bytes_per_item: per(wal.get(2)),
        wal_writes_per_item: per(wal.get(3)),
        wal_syncs_per_item: per(wal.get(4)),
        statements,
        tables,
    })
}

/// Print the profile as tables, one set per phase.
pub fn print(p: &PgProfile) {
    println!(
        "PostgreSQL per-statement profile (server {})",
        p.server_version
    );
    for ph in &p.phases {
        println!(
            "\n== {} ({} items, {:.1} s wall) ==",
            ph.phase, ph.items, ph.wall_seconds
        );
        println!(
            "  CPU µs per item: all processes {:.1}, PostgreSQL {:.1}; statements' execution (top level) {:.1} µs per item",
            ph.cpu_us_per_item, ph.pg_cpu_us_per_item, ph.exec_us_per_item_toplevel
        );
        println!(
            "  per item: commits {:.3}, rollbacks {:.3}; WAL {:.2} records, {:.3} full-page images, {:.0} bytes; WAL writes {:.3}, syncs {:.3}",
            ph.commits_per_item,
            ph.rollbacks_per_item,
            ph.wal_records_per_item,
            ph.wal_fpi_per_item,
            ph.wal_bytes_per_item,
            ph.wal_writes_per_item,
            ph.wal_syncs_per_item
        );
        for (component, seconds) in &ph.cpu.cpu_seconds {
            println!("  CPU s {component:<40} {seconds:>8.2}");
        }
        println!(
            "  {:>3} {:>8} {:>9} {:>8} {:>7} {:>8} {:>7} {:>7} {:>7} {:>8}  query",
            "top",
            "calls/it",
            "exec µs/it",
            "µs/call",
            "rows/it",
            "hit/it",
            "dirt/it",
            "writ/it",
            "walr/it",
            "walB/it"
        );
        for s in &ph.statements {
            println!(
                "  {:>3} {:>8.3} {:>9.2} {:>8.1} {:>7.3} {:>8.2} {:>7.3} {:>7.3} {:>7.2} {:>8.0}  {}",
                if s.toplevel { "y" } else { "n" },
                s.calls_per_item,
                s.exec_us_per_item,
                s.exec_us_per_call,
                s.rows_per_item,
                s.shared_blks_hit_per_item,
                s.shared_blks_dirtied_per_item,
                s.shared_blks_written_per_item,
                s.wal_records_per_item,
                s.wal_bytes_per_item,
                truncate(&s.query, 150)
            );
        }
        println!(
            "  {:<24} {:>7} {:>7} {:>7} {:>7} {:>6} {:>4}  indexes",
            "table", "ins/it", "upd/it", "hot/it", "del/it", "HOT %", "ff"
        );
        for t in &ph.tables {
            println!(
                "  {:<24} {:>7.3} {:>7.3} {:>7.3} {:>7.3} {:>6.1} {:>4}  {}",
                t.table,
                t.inserts_per_item,
                t.updates_per_item,
                t.hot_updates_per_item,
                t.deletes_per_item,
                t.hot_ratio * 100.0,
                t.fillfactor.map(|f| f.to_string()).unwrap_or("-".into()),
                t.indexes.join(", ")
            );
        }
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}
