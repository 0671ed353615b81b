//! `postgres-failover`: a PostgreSQL primary with a synchronous standby on
//! clusters of the scenario's own. The fleet connects with a multi-host URL
//! (`target_session_attrs=read-write`) that lists the standby first, so
//! that every connection first meets a read-only server and must skip it.
//! Mid-run the primary is crashed (SIGKILL of the postmaster and every
//! backend) and the standby promoted: every role reconnects to the new
//! primary by itself, a commit whose outcome was lost with the connection is
//! resolved by what the ledger holds, never applied twice, and the checks
//! run on the new primary through the same URL.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::load::plans;
use crate::report::Row;
use crate::services::{Postgres, Services};
use crate::stage::Stage;

/// Removes the pair's directory once both servers have stopped (fields drop first).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Decided requests and settled items: what flows while the fleet works.
async fn progress(s: &Stage<'_>) -> anyhow::Result<i64> {
    s.scalar(
        "SELECT (SELECT count(*) FROM batches) \
              + (SELECT count(*) FROM items WHERE state IN ('succeeded', 'failed'))",
    )
    .await
}

pub async fn run(
    name: &'static str,
    services: &mut Services,
    log_dir: &Path,
    settle: Duration,
) -> anyhow::Result<Row> {
    anyhow::ensure!(
        services.tls.is_none(),
        "{name} runs without --tls (its standby is a plain cluster)"
    );
    let (primary_port, standby_port) = (services.pg.port + 1, services.pg.port + 2);
    let root = std::env::temp_dir().join(format!("holdfast-chaos-failover-{}", std::process::id()));
    std::fs::create_dir_all(&root)?;
    std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let _scratch = Scratch(root.clone());
    let started = Instant::now();
    let mut primary = Postgres::create(&root.join("primary"), primary_port, None).await?;
    let standby = Postgres::standby_of(&primary, &root.join("standby"), standby_port).await?;
    primary.require_sync_standby().await?;
    tracing::info!(elapsed = ?started.elapsed(), primary_port, standby_port,
        "primary with a synchronous standby up");

    let db = name.replace('-', "_");
    let url = format!(
        "postgresql://postgres@127.0.0.1:{standby_port},127.0.0.1:{primary_port}/chaos_{db}\
         ?target_session_attrs=read-write"
    );
    let mut s = Stage::on_database(name, services, log_dir, url).await?;
    s.grant(1_000_000).await?;
    // Warnings as usual, and the database module's `connected to` lines.
    s.fleet(
        2,
        2,
        1,
        &[(
            "HOLDFAST_LOG".to_string(),
            "warn,holdfast_common::database=info".to_string(),
        )],
    )?;
    // Short items sent quickly: decisions and settlements commit all the
    // time, so that the crash cuts transactions (and commits) in flight.
    let load = s.load(plans(s.name, 8, 30, 5..30, 60), 200);

    // Crash the primary while batches run.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut open = 0;
    while open == 0 && Instant::now() < deadline {
        open = s
            .scalar("SELECT count(*) FROM batches WHERE state IN ('granted', 'dispatched', 'cancelling')")
            .await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.expect(
        open > 0,
        format!("{open} batch(es) running when the primary was killed"),
    );
    primary.kill9().await?;
    let killed = Instant::now();
    s.fault(format!(
        "primary 127.0.0.1:{primary_port} killed (SIGKILL of the postmaster and its backends)"
    ));
    // A failover manager notices a dead primary after a while; 1 s here.
    tokio::time::sleep(Duration::from_secs(1)).await;
    standby.promote().await?;
    s.fault(format!(
        "standby 127.0.0.1:{standby_port} promoted {:.1}s after the kill",
        killed.elapsed().as_secs_f64()
    ));

    // Time until decisions and settlements flow again, on the new primary.
    let before = progress(&s).await?;
    let flow_deadline = Instant::now() + Duration::from_secs(60);
    let mut flowing = None;
    while Instant::now() < flow_deadline {
        if progress(&s).await? > before {
            flowing = Some(killed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    match flowing {
        Some(after) => s.note(format!(
            "decisions and settlements flowing again {:.1}s after the kill",
            after.as_secs_f64()
        )),
        None => s.expect(
            false,
            "nothing decided or settled within 60 s of the promotion",
        ),
    }

    let sent = load.finish().await?;
    s.settle(&sent, Instant::now(), settle).await;

    // Every role found the old primary past the standby, then the promoted one.
    let old = format!("connected to PostgreSQL 127.0.0.1:{primary_port} (primary)");
    let new = format!("connected to PostgreSQL 127.0.0.1:{standby_port} (primary)");
    for process in s.fleet_names() {
        let (before, after) = (
            s.log_contains(&process, &old),
            s.log_contains(&process, &new),
        );
        s.expect(
            before && after,
            format!("{process} logged `{old}` ({before}) then `{new}` ({after})"),
        );
    }
    // Statements the crash cut (a commit among them has an unknown
    // outcome): each was retried, and the retry re-read what the ledger held.
    let cut: usize = s
        .fleet_names()
        .iter()
        .map(|p| s.log_count(p, "unavailable: connection closed"))
        .sum();
    s.note(format!(
        "{cut} transaction(s) cut by the crash, retried against the new primary"
    ));
    s.finish(sent).await
}
