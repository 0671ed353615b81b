//! A synchronous streaming standby of a throwaway cluster, for the
//! `postgres-failover` scenario: `pg_basebackup -R` from the primary into a
//! second data directory, started on another port; the primary then waits
//! for it at every commit (`synchronous_standby_names = '*'`,
//! `synchronous_commit = on`), so that a commit acknowledged to a client is
//! on the standby when the primary dies. The primary is crashed for real
//! (SIGKILL of the postmaster and every backend) and the standby promoted.

use std::path::Path;
use std::time::{Duration, Instant};

use tokio::process::Command;

use super::{ensure_free, output, Postgres};

impl Postgres {
    /// Clone `primary` with `pg_basebackup -R` into `<root>/pg` and start the
    /// copy as its streaming standby on `port`.
    pub async fn standby_of(primary: &Postgres, root: &Path, port: u16) -> anyhow::Result<Self> {
        anyhow::ensure!(
            primary.tls.is_none(),
            "the throwaway standby is made for a plain (non-TLS) primary"
        );
        ensure_free(port, "PostgreSQL standby")?;
        let dir = root.join("pg");
        std::fs::create_dir_all(&dir)?;
        if primary.as_postgres {
            output(
                Command::new("chown").args(["-R", "postgres"]).arg(&dir),
                "chown postgres",
            )
            .await?;
        }
        let mut standby = Self {
            bin: primary.bin.clone(),
            dir,
            port,
            as_postgres: primary.as_postgres,
            running: false,
            tls: None,
            settings: primary.settings.clone(),
        };
        let data = standby.dir.join("data");
        output(
            standby
                .command("pg_basebackup")
                .args(["-h", "127.0.0.1", "-U", "postgres", "-p"])
                .arg(primary.port.to_string())
                .arg("-D")
                .arg(&data)
                .args(["-R", "-X", "stream", "-c", "fast", "--no-sync"]),
            "pg_basebackup",
        )
        .await?;
        standby.start().await?;
        Ok(standby)
    }

    /// Make the primary wait for its standby at every commit, and wait (up
    /// to 60 s) until `pg_stat_replication` shows the standby `sync`.
    pub async fn require_sync_standby(&self) -> anyhow::Result<()> {
        let client = holdfast_common::database::connect(&self.url("postgres")).await?;
        // ALTER SYSTEM runs outside a transaction: one statement at a time.
        for sql in [
            "ALTER SYSTEM SET synchronous_standby_names = '*'",
            "ALTER SYSTEM SET synchronous_commit = 'on'",
            "SELECT pg_reload_conf()",
        ] {
            client.batch_execute(sql).await?;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let sync = client
                .query_opt(
                    "SELECT 1 FROM pg_stat_replication WHERE sync_state = 'sync' AND state = 'streaming'",
                    &[],
                )
                .await?
                .is_some();
            if sync {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the standby did not become a synchronous standby within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A crash of the server, not an orderly stop: SIGKILL to the postmaster
    /// and every process it started (backends, WAL sender, checkpointer...)
    /// at once. Nothing is flushed or said goodbye to.
    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        let pidfile = self.dir.join("data").join("postmaster.pid");
        let text = std::fs::read_to_string(&pidfile)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", pidfile.display()))?;
        let postmaster: u32 = text
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .ok_or_else(|| anyhow::anyhow!("{} names no process", pidfile.display()))?;
        let mut victims = vec![postmaster];
        victims.extend(children_of(postmaster));
        let mut kill = Command::new("kill");
        kill.arg("-KILL").arg("--");
        for pid in &victims {
            kill.arg(pid.to_string());
        }
        output(&mut kill, "kill -KILL the postmaster and its children").await?;
        self.running = false;
        Ok(())
    }

    /// Promote this standby (`pg_ctl promote`, waiting until it accepts writes).
    pub async fn promote(&self) -> anyhow::Result<()> {
        output(&mut self.pg_ctl("promote"), "pg_ctl promote").await?;
        Ok(())
    }
}

/// The processes whose parent is `pid` (from `/proc/<pid>/stat`).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let child: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // `pid (comm) state ppid ...`: comm may hold spaces, so split after its `)`.
            let after = stat.rsplit_once(')')?.1;
            let ppid: u32 = after.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == pid).then_some(child)
        })
        .collect()
}
