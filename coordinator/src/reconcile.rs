//! The reconciler: the safety net that makes every hold resolve.
//!
//! Each sweep expires soft holds past their TTL, closes batches whose items
//! are all settled (or reserves a sequential batch's next chunk), closes batches past
//! their execution deadline (unsettled items fail, the rest is released),
//! re-dispatches batches whose coordinator died before the broker confirmed
//! every job, issues the allowance periods that have begun, expires what
//! grants past their expiry have left, refreshes the gauges, and now and then audits the ledger: drift
//! (balances against the journal) and stuck money (holds this very sweep
//! should have resolved, past their limit by more than
//! [`ReconcilerSettings::stuck_grace`]: three sweeps, at least 10 s).
//! Several reconcilers may run: each claim is `FOR UPDATE SKIP LOCKED`.

use crate::config::ReconcilerConfig;
use holdfast_common::faults::crash_point;
use holdfast_common::faults::panic_point;
use holdfast_common::ledger::Ledger;
use holdfast_common::messages::Attempt;
use holdfast_common::supervise::guard;
use holdfast_common::telemetry::record;
use holdfast_common::topology::{self, Publisher, SessionError};
use tokio_util::sync::CancellationToken;

use holdfast_common::dispatch::dispatch;

/// What one sweep did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub closed: usize,
    pub expired: usize,
    pub redispatched: usize,
    /// Soft holds expired (their TTL passed with no batch consuming them).
    pub expired_holds: usize,
    /// Credits of allowance periods issued (`plan` grants; rollovers move
    /// credits and are not counted).
    pub issued_credits: i64,
    /// Credits of grants past their expiry that expired unused.
    pub expired_credits: i64,
    /// Drift found, when this sweep audited.
    pub drift: Option<usize>,
    /// Stuck holds found, when this sweep audited.
    pub stuck: Option<usize>,
}

const CLAIM_LIMIT: i64 = 100;

/// One reconciler: a ledger, a publisher and a sweep counter.
pub struct Reconciler {
    ledger: Ledger,
    publisher: Publisher,
    config: ReconcilerConfig,
    sweeps: u64,
}

impl Reconciler {
    pub fn new(ledger: Ledger, publisher: Publisher, config: ReconcilerConfig) -> Self {
        Self {
            ledger,
            publisher,
            config,
            sweeps: 0,
        }
    }

    /// One pass over everything the reconciler looks after.
    pub async fn sweep_once(&mut self) -> Result<SweepReport, SessionError> {
        panic_point("reconciler.sweep", &self.config.names.namespace);
        let mut report = SweepReport {
            closed: self.close_finished().await?,
            expired_holds: self.ledger.expire_soft_holds(CLAIM_LIMIT).await?,
            expired: self.expire_overdue().await?,
            redispatched: self.redispatch_stranded().await?,
            // Before the expiry, so that a period's grant is there as soon
            // as the previous one expires (the previous one's rollover does
            // not depend on it: its grants wait for the issuance).
            issued_credits: self.ledger.issue_allowances(CLAIM_LIMIT).await?,
            // Last, so that what this sweep released to a grant past its
            // expiry expires with it now.
            expired_credits: self.ledger.expire_grants(CLAIM_LIMIT).await?,
            ..Default::default()
        };
        self.refresh_gauges().await?;
        self.sweeps += 1;
        let every = self.config.audit_every;
        if every > 0 && self.sweeps % every == 1 % every {
            self.audit(&mut report).await?;
        }
        Ok(report)
    }

    /// Close the batches whose items are all settled (a worker normally
    /// does it), and send the jobs of a sequential batch's next chunk.
    async fn close_finished(&self) -> Result<usize, SessionError> {
        let names = &self.config.names;
        let window = self.config.coordinator.confirm_window;
        let mut count = 0;
        loop {
            let (closed, advanced) = self.ledger.close_finished(CLAIM_LIMIT).await?;
            // Their completed events are in the outbox, written with the close.
            count += closed.len();
            for batch_id in &advanced {
                let (ledger, publisher) = (&self.ledger, &self.publisher);
                dispatch(ledger, publisher, names, batch_id, Attempt::First, window).await?;
            }
            if ((closed.len() + advanced.len()) as i64) < CLAIM_LIMIT {
                return Ok(count);
            }
        }
    }

    /// Close the batches past their execution deadline: unsettled items fail, the rest is released.
    async fn expire_overdue(&self) -> Result<usize, SessionError> {
        let mut count = 0;
        loop {
            let expired = self.ledger.expire_overdue(CLAIM_LIMIT).await?;
            count += expired.len();
            for b in &expired {
                tracing::warn!(batch_id = %b.batch_id, failed = b.figures.failed, released = b.figures.released,
                    "batch passed its execution deadline; unsettled items failed");
            }
            if (expired.len() as i64) < CLAIM_LIMIT {
                return Ok(count);
            }
        }
    }

    /// Publish again the jobs of granted batches whose coordinator died
    /// before the broker confirmed them all (their dispatch lease ran out).
    async fn redispatch_stranded(&self) -> Result<usize, SessionError> {
        let names = &self.config.names;
        let window = self.config.coordinator.confirm_window;
        let lease = self.config.settings.dispatch_grace();
        let mut count = 0;
        for batch_id in self.ledger.claim_undispatched(lease, CLAIM_LIMIT).await? {
            // Dying here leaves the claim to run out: after the lease another
            // reconciler takes the batch (the chaos harness kills one here).
            crash_point("reconciler.mid_sweep");
            tracing::warn!(%batch_id, "batch granted but not fully dispatched; dispatching again");
            let (ledger, publisher) = (&self.ledger, &self.publisher);
            let sent = dispatch(ledger, publisher, names, &batch_id, Attempt::Again, window);
            match guard("reconciler", "sweep", sent).await {
                Ok(sent) => {
                    sent?;
                    count += 1;
                }
                // The claim runs out and the batch is tried again after the
                // lease; its execution deadline closes it if it never goes.
                Err(panicked) => tracing::error!(%batch_id, panic = %panicked.0,
                    "re-dispatch panicked; the sweep goes on"),
            }
        }
        Ok(count)
    }

    /// The ledger's gauges: credits held, open holds, dispatch backlog, overdue holds.
    async fn refresh_gauges(&self) -> Result<(), SessionError> {
        let (held, holds) = self.ledger.held_totals().await?;
        record::held(held, holds);
        let (backlog, overdue) = self.ledger.backlog_totals().await?;
        record::dispatch_backlog(backlog);
        record::holds_overdue(overdue);
        Ok(())
    }

    /// Recompute the ledger from the journal and look for stuck money; log
    /// each finding at ERROR.
    async fn audit(&self, report: &mut SweepReport) -> Result<(), SessionError> {
        let drift = self.ledger.audit().await?;
        for d in &drift {
            tracing::error!(subject = %d.subject, problem = %d.problem, "ledger drift");
        }
        report.drift = Some(drift.len());
        let stuck = self
            .ledger
            .stuck(self.config.settings.stuck_grace())
            .await?;
        for s in &stuck {
            tracing::error!(subject = %s.subject, kind = %s.kind, credits = s.credits,
                problem = %s.problem, "stuck credits");
        }
        report.stuck = Some(stuck.len());
        Ok(())
    }
}

/// Run the reconciler role until `shutdown`, one sweep per interval.
pub async fn run(ledger: Ledger, config: ReconcilerConfig, shutdown: CancellationToken) {
    topology::supervise("reconciler", "sweep", "reconciler", shutdown.clone(), || async {
        let conn = topology::connect(
            &config.amqp_url,
            &format!("holdfast-reconciler/{}", config.names.namespace),
        )
        .await?;
        let lost = topology::watch(&conn);
        tokio::pin!(lost);
        let channel = conn.create_channel().await?;
        topology::declare(&channel, &config.names, &config.queues).await?;
        let mut reconciler =
            Reconciler::new(ledger.clone(), Publisher::new(&conn).await?, config.clone());
        let mut tick = tokio::time::interval(config.settings.sweep_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                e = &mut lost => return Err(e.into()),
                _ = shutdown.cancelled() => break,
            }
            // A publish on a connection the broker dropped may never be
            // confirmed: give the sweep up when the connection goes.
            let swept = tokio::select! {
                r = guard("reconciler", "sweep", reconciler.sweep_once()) => r,
                e = &mut lost => return Err(e.into()),
            };
            let report = match swept {
                Ok(report) => report?,
                Err(panicked) => {
                    // Whatever it was doing rolled back; the next tick sweeps again.
                    tracing::error!(panic = %panicked.0, "sweep panicked; sweeping again at the next tick");
                    continue;
                }
            };
            config.heartbeat.beat();
            if report != SweepReport::default()
                && report
                    != (SweepReport {
                        drift: Some(0),
                        stuck: Some(0),
                        ..Default::default()
                    })
            {
                tracing::info!(?report, "sweep");
            }
        }
        topology::close(&conn, "shutdown").await;
        Ok(())
    })
    .await;
}
