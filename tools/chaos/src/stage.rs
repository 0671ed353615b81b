//! A stage: one scenario's own database (on the throwaway PostgreSQL) and
//! AMQP namespace (on the throwaway node), the role processes it started, and
//! the faults it injected. [`Stage::finish`] waits for the fleet to settle,
//! runs the checker and stops every process.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use holdfast_common::config::{Connections, QueueSettings};
use holdfast_common::database;
use holdfast_common::ledger::Ledger;
use holdfast_common::topology::Names;

use crate::checks::{self, Sampler, Sent};
use crate::events::{self, EventAudit};
use crate::load::{Load, Request, ACCOUNT};
use crate::report::Row;
use crate::services::Services;
use holdfast_harness::processes::{Ended, RoleProcess};

/// Settings every role process of the harness gets: quick sweeps and leases,
/// so that recovery shows within a scenario, and small pools.
const BASE_ENV: &[(&str, &str)] = &[
    ("HOLDFAST_SWEEP_INTERVAL_MS", "250"),
    ("HOLDFAST_DISPATCH_GRACE_SECS", "3"),
    ("HOLDFAST_AUDIT_EVERY", "0"),
    ("HOLDFAST_SHUTDOWN_TIMEOUT_SECS", "10"),
    ("HOLDFAST_GENERATOR_RETRY_MS", "20"),
    ("HOLDFAST_COORDINATOR_CONSUMERS", "2"),
    ("HOLDFAST_WORKER_PREFETCH", "16"),
    ("HOLDFAST_PROGRESS_INTERVAL_MS", "500"),
];

/// Environment for a role process: `(name, value)` pairs.
pub type Env = Vec<(String, String)>;

pub fn env(pairs: &[(&str, &str)]) -> Env {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// One scenario's world: its database, namespace, processes and findings.
pub struct Stage<'a> {
    pub name: &'static str,
    pub services: &'a mut Services,
    pub conn: Connections,
    pub ledger: Ledger,
    pub names: Names,
    pub queues: QueueSettings,
    log_dir: PathBuf,
    processes: Vec<RoleProcess>,
    started: usize,
    faults: u32,
    last_fault: Option<Instant>,
    failures: Vec<String>,
    notes: Vec<String>,
    sampler: Option<Sampler>,
    recover_secs: Option<f64>,
    /// The harness's queue of `batch.completed` events, bound from the start.
    events: EventAudit,
}

impl<'a> Stage<'a> {
    /// A fresh database and namespace named after the scenario.
    pub async fn new(
        name: &'static str,
        services: &'a mut Services,
        log_dir: &std::path::Path,
    ) -> anyhow::Result<Stage<'a>> {
        let ident = name.replace('-', "_");
        let database_url = services.pg.url(&format!("chaos_{ident}"));
        Self::on_database(name, services, log_dir, database_url).await
    }

    /// A fresh database at `database_url` (a cluster of the scenario's own)
    /// and a namespace named after the scenario.
    pub async fn on_database(
        name: &'static str,
        services: &'a mut Services,
        log_dir: &std::path::Path,
        database_url: String,
    ) -> anyhow::Result<Stage<'a>> {
        let conn = Connections {
            database_url,
            amqp_url: services.rabbit.url(),
            namespace: format!("chaos-{name}"),
            db_pool_size: 4,
            ..Default::default()
        };
        database::migrate(&conn.database_url).await?;
        let ledger = Ledger::new(database::pool(&conn.database_url, 16)?);
        let log_dir = log_dir.join(name);
        // The logs of this run only.
        let _ = std::fs::remove_dir_all(&log_dir);
        std::fs::create_dir_all(&log_dir)?;
        let sampler = Some(Sampler::start(ledger.clone()));
        let names = Names::new(conn.namespace.clone());
        let queues = QueueSettings::default();
        let events = EventAudit::bind(&conn.amqp_url, &names, &queues).await?;
        Ok(Stage {
            name,
            services,
            names,
            conn,
            ledger,
            queues,
            log_dir,
            processes: Vec::new(),
            started: 0,
            faults: 0,
            last_fault: None,
            failures: Vec::new(),
            notes: Vec::new(),
            sampler,
            recover_secs: None,
            events,
        })
    }

    /// Move the stage to another broker (`amqp_url` may be a list of
    /// nodes) with queue settings `queues`, before any process starts: the
    /// events audit binds again there.
    pub async fn on_broker(
        &mut self,
        amqp_url: String,
        queues: QueueSettings,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.started == 0,
            "move the stage before starting processes"
        );
        self.conn.amqp_url = amqp_url;
        self.queues = queues;
        self.events = EventAudit::bind(&self.conn.amqp_url, &self.names, &self.queues).await?;
        Ok(())
    }

    /// Start a role process outside the stage's fleet (the caller owns it: a victim).
    pub fn process(
        &mut self,
        role: &str,
        extra: &[(String, String)],
    ) -> anyhow::Result<RoleProcess> {
        self.started += 1;
        let name = format!("{role}-{}", self.started);
        let mut all = env(BASE_ENV);
        all.extend(extra.iter().cloned());
        let log = self.log_dir.join(format!("{name}.log"));
        RoleProcess::spawn(&self.conn, role, &name, &all, Some(&log))
    }

    /// Start a role process that stays up until the stage finishes.
    pub fn spawn(&mut self, role: &str, extra: &[(String, String)]) -> anyhow::Result<()> {
        let p = self.process(role, extra)?;
        self.processes.push(p);
        Ok(())
    }

    /// Start the usual fleet: `coordinators`, `workers` and `reconcilers` processes.
    pub fn fleet(
        &mut self,
        coordinators: usize,
        workers: usize,
        reconcilers: usize,
        extra: &[(String, String)],
    ) -> anyhow::Result<()> {
        for (role, n) in [
            ("coordinator", coordinators),
            ("worker", workers),
            ("reconciler", reconcilers),
        ] {
            for _ in 0..n {
                self.spawn(role, extra)?;
            }
        }
        Ok(())
    }

    /// Grant `amount` credits to [`ACCOUNT`], creating it.
    pub async fn grant(&self, amount: i64) -> anyhow::Result<()> {
        self.ledger
            .grant(ACCOUNT, amount, Some("chaos"), true)
            .await?;
        Ok(())
    }

    /// The one value `sql` selects from the stage's database.
    pub async fn scalar(&self, sql: &str) -> anyhow::Result<i64> {
        let c = self.ledger.pool().get().await?;
        Ok(c.query_one(sql, &[]).await?.get(0))
    }

    /// Start producers on the stage's namespace, one per plan, `pace_ms` between requests.
    pub fn load(&self, plans: Vec<Vec<Request>>, pace_ms: u64) -> Load {
        Load::start(
            &self.conn.amqp_url,
            &self.names,
            &self.queues,
            plans,
            Duration::from_millis(pace_ms),
            false,
        )
    }

    /// The names of the processes of the fleet (their log files are `<name>.log`).
    pub fn fleet_names(&self) -> Vec<String> {
        self.processes.iter().map(|p| p.name.clone()).collect()
    }

    /// Take a process out of the fleet (to stop it).
    pub fn take(&mut self, role: &str) -> Option<RoleProcess> {
        let i = self.processes.iter().position(|p| p.role == role)?;
        Some(self.processes.remove(i))
    }

    /// Record one injected fault.
    pub fn fault(&mut self, what: impl Into<String>) {
        let what = what.into();
        tracing::info!(scenario = self.name, fault = %what, "fault injected");
        self.faults += 1;
        self.last_fault = Some(Instant::now());
    }

    /// Record a scenario-specific expectation; a false one fails the row.
    pub fn expect(&mut self, ok: bool, what: impl Into<String>) {
        let what = what.into();
        if ok {
            self.notes.push(what);
        } else {
            tracing::error!(scenario = self.name, failed = %what, "expectation failed");
            self.failures.push(what);
        }
    }

    /// A note for the report (no pass/fail).
    pub fn note(&mut self, what: impl Into<String>) {
        self.notes.push(what.into());
    }

    /// Start `role` with crash point `point` enabled, `times` times in a row,
    /// each time waiting for it to abort there (as abruptly as SIGKILL).
    pub async fn crash_at(
        &mut self,
        role: &str,
        point: &str,
        times: usize,
        extra: &[(String, String)],
    ) -> anyhow::Result<()> {
        let mut all = extra.to_vec();
        all.push(("HOLDFAST_FAILPOINTS".into(), point.into()));
        for _ in 0..times {
            let mut victim = self.process(role, &all)?;
            match victim.wait_for(Duration::from_secs(90)).await {
                // SIGABRT: the crash point's abort().
                Some(Ended::Signalled(6)) => {
                    self.fault(format!("{} aborted at {point}", victim.name))
                }
                Some(other) => self.expect(
                    false,
                    format!(
                        "{} ended {other:?} instead of aborting at {point}",
                        victim.name
                    ),
                ),
                None => {
                    victim.kill().await;
                    self.expect(false, format!("{} never reached {point}", victim.name));
                }
            }
        }
        Ok(())
    }

    /// Lines of a process's log containing `needle`.
    pub fn log_contains(&self, name: &str, needle: &str) -> bool {
        std::fs::read_to_string(self.log_dir.join(format!("{name}.log")))
            .map(|s| s.contains(needle))
            .unwrap_or(false)
    }

    /// How many process logs of the stage contain `needle` more than once
    /// (a role that reconnected logs its connection again).
    pub fn logs_repeating(&self, needle: &str) -> usize {
        let Ok(dir) = std::fs::read_dir(&self.log_dir) else {
            return 0;
        };
        dir.filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
            .filter(|log| log.matches(needle).count() > 1)
            .count()
    }

    /// How many lines of a process's log contain `needle`.
    pub fn log_count(&self, name: &str, needle: &str) -> usize {
        std::fs::read_to_string(self.log_dir.join(format!("{name}.log")))
            .map(|s| s.lines().filter(|l| l.contains(needle)).count())
            .unwrap_or(0)
    }

    /// Wait for the fleet to settle (every request decided, every batch
    /// closed, every hold resolved), and time the recovery: from the last
    /// fault, or without faults from `load_done`.
    pub async fn settle(&mut self, sent: &Sent, load_done: Instant, timeout: Duration) {
        let from = self.last_fault.unwrap_or(load_done);
        match checks::wait_settled(&self.ledger, sent, timeout).await {
            Some(at) => {
                self.recover_secs = Some(at.saturating_duration_since(from).as_secs_f64());
            }
            None => self
                .failures
                .push(format!("not settled within {timeout:?}")),
        }
    }

    /// Check the ledger and stop every process.
    pub async fn finish(mut self, sent: Sent) -> anyhow::Result<Row> {
        let (samples, negative) = match self.sampler.take() {
            Some(s) => s.finish().await,
            None => (0, 0),
        };
        let mut counts = checks::count(&self.ledger, &sent, negative).await?;
        // Every closed batch's completed event, once the relays had their chance.
        let waiting = events::wait_relayed(&self.ledger, Duration::from_secs(30)).await?;
        let arrived = self.events.collect().await?;
        let lost = events::events_lost(&self.ledger, &arrived).await?;
        counts.events_lost = lost.len() as i64;
        let received: usize = arrived.completed.values().sum();
        self.notes.push(format!(
            "{received} completed event(s) for {} batch(es), {} duplicate(s) (same message_id){}",
            arrived.completed.len(),
            received - arrived.completed.len(),
            if waiting > 0 {
                format!(", {waiting} still in the outbox")
            } else {
                String::new()
            }
        ));
        if !lost.is_empty() {
            tracing::error!(scenario = self.name, ?lost, "completed events lost");
        }
        for mut p in self.processes.drain(..) {
            let (ended, _, killed) = p.terminate(Duration::from_secs(20)).await;
            if killed || ended != Ended::Exited(0) {
                self.notes
                    .push(format!("{} stopped badly: {ended:?}", p.name));
            }
        }
        self.notes.push(format!("{samples} samples of available"));
        Ok(Row::new(
            self.name,
            counts,
            self.faults,
            self.recover_secs,
            self.failures,
            self.notes,
        ))
    }
}
