//! The fault scenarios, one table row each. Every scenario runs on a fresh
//! database and namespace ([`Stage`]), drives producers
//! ([`crate::load::Load`]), injects its faults while they run, waits for the
//! fleet to settle, and adds the expectations that show the fault did what
//! it says (a crash point that was never reached proves nothing).
//!
//! - [`crashes`]: role processes aborting at crash points, two reconcilers;
//! - [`jobs`]: a poison job, a slow consumer past its deadline, a rolling restart;
//! - [`restarts`]: the broker and the database restarted under load, and the
//!   broker gone at the instant batches complete;
//! - [`concurrency`]: 64 producers on one hot account;
//! - [`spenders`]: 64 producers over a spender tree, a coordinator and workers killed;
//! - [`cluster`]: a three-node RabbitMQ cluster losing the leaders of the jobs and
//!   requests queues in turn;
//! - [`failover`]: a PostgreSQL primary with a synchronous standby, the
//!   primary killed and the standby promoted; the fleet follows the multi-host URL.

mod cluster;
mod concurrency;
mod crashes;
mod failover;
mod jobs;
mod restarts;
mod spenders;

use std::path::Path;
use std::time::Duration;

use crate::report::Row;
use crate::services::Services;
use crate::stage::Stage;

/// Every scenario, in the order they run: the service restarts come after
/// the process faults, the long concurrency run last.
pub const ALL: &[&str] = &[
    "worker-kill-before-capture",
    "worker-kill-after-capture",
    "coordinator-kill-mid-dispatch",
    "reconciler-kill-mid-sweep",
    "two-reconcilers",
    "poison-job",
    "slow-consumer-deadline",
    "worker-rolling-restart",
    "rabbitmq-restart",
    "broker-outage-at-completion",
    "postgresql-restart",
    "rabbitmq-node-loss",
    "postgres-failover",
    "concurrency-64-producers",
    "spenders-64-producers-kills",
];

/// Run scenario `name`.
pub async fn run(
    name: &'static str,
    services: &mut Services,
    log_dir: &Path,
    settle: Duration,
) -> anyhow::Result<Row> {
    if name == "postgres-failover" {
        // On a primary and standby of its own, not the shared throwaway cluster.
        return failover::run(name, services, log_dir, settle).await;
    }
    let stage = Stage::new(name, services, log_dir).await?;
    match name {
        "worker-kill-before-capture" => {
            crashes::worker_killed(stage, "worker.before_capture", settle).await
        }
        "worker-kill-after-capture" => {
            crashes::worker_killed(stage, "worker.after_capture", settle).await
        }
        "coordinator-kill-mid-dispatch" => crashes::coordinator_killed(stage, settle).await,
        "reconciler-kill-mid-sweep" => crashes::reconciler_killed(stage, settle).await,
        "two-reconcilers" => crashes::two_reconcilers(stage, settle).await,
        "poison-job" => jobs::poison_job(stage, settle).await,
        "slow-consumer-deadline" => jobs::slow_consumer_deadline(stage, settle).await,
        "worker-rolling-restart" => jobs::rolling_restart(stage, settle).await,
        "rabbitmq-restart" => restarts::rabbitmq(stage, settle).await,
        "broker-outage-at-completion" => restarts::outage_at_completion(stage, settle).await,
        "postgresql-restart" => restarts::postgresql(stage, settle).await,
        "rabbitmq-node-loss" => cluster::node_loss(stage, settle).await,
        "concurrency-64-producers" => concurrency::run(stage, settle).await,
        "spenders-64-producers-kills" => spenders::run(stage, settle).await,
        other => anyhow::bail!("no scenario `{other}`"),
    }
}
