//! Logs and metrics. Every metric is recorded through [`record`], named as in
//! the design (`holdfast_*`), with low-cardinality labels only.

use std::io::IsTerminal;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{fmt, EnvFilter};

/// Install the tracing subscriber: plain text, or JSON when `json` is set.
/// `RUST_LOG` (or `HOLDFAST_LOG`) filters; the default is `info`.
pub fn init_logging(json: bool) {
    let filter = std::env::var("HOLDFAST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("info,lapin=warn,lapin::returned_messages=error"));
    // Colours only on a terminal: files, journald and container logs get plain text.
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// An error and its causes, `: `-separated, for a log line.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        // `#[error(transparent)]` repeats its source's text: say it once.
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Install the Prometheus recorder once per process and return its handle
/// (render it for `/metrics`).
pub fn metrics() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let fast = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ];
            // A 1-2.5-5 series: generators typically answer in 0.1 s to a few
            // minutes, and percentiles interpolate within one bucket.
            let item = [
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0,
                250.0, 600.0,
            ];
            // Up to the default execution timeout (an hour).
            let batch = [
                0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0,
                2500.0, 3600.0,
            ];
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full("holdfast_reservation_seconds".into()), &fast)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full("holdfast_item_seconds".into()), &item)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full("holdfast_batch_seconds".into()), &batch)
                })
                .expect("bucket lists are non-empty")
                .install_recorder()
                .expect("the metrics recorder is installed once");
            record::zero();
            handle
        })
        .clone()
}

/// Where outcomes are counted. Call after the commit that decided them.
pub mod record {
    use std::time::Duration;

    use metrics::{counter, gauge, histogram};

    use crate::ledger::{BatchState, ClosedBatch, GrantSource, SettleReport, Settled, Settlement};
    use crate::messages::Decision;

    /// Publish every counter and histogram (and the stuck gauge) at zero, so that a first event shows
    /// as an increase (`rate`, `increase`) and dashboards show 0, not no data.
    pub(crate) fn zero() {
        for source in crate::ledger::GrantSource::ALL {
            counter!("holdfast_credits_granted_total", "source" => source.as_str()).absolute(0);
            counter!("holdfast_credits_expired_total", "source" => source.as_str()).absolute(0);
        }
        counter!("holdfast_credits_reserved_total").absolute(0);
        counter!("holdfast_credits_captured_total").absolute(0);
        counter!("holdfast_overrun_credits_total").absolute(0);
        counter!("holdfast_acks_lost_total").absolute(0);
        counter!("holdfast_reservation_retries_total").absolute(0);
        for decision in ["granted", "insufficient", "rejected"] {
            counter!("holdfast_batches_total", "decision" => decision).absolute(0);
        }
        for reason in ["completed", "deadline", "cancelled"] {
            counter!("holdfast_credits_released_total", "reason" => reason).absolute(0);
        }
        for state in ["completed", "expired", "cancelled"] {
            counter!("holdfast_batches_closed_total", "state" => state).absolute(0);
        }
        for outcome in ["succeeded", "failed"] {
            counter!("holdfast_items_total", "outcome" => outcome).absolute(0);
        }
        for queue in ["requests", "jobs"] {
            counter!("holdfast_dead_lettered_total", "queue" => queue).absolute(0);
        }
        for of in ["batch", "item"] {
            counter!("holdfast_worker_lookups_total", "of" => of).absolute(0);
        }
        for (role, task) in TASKS {
            counter!("holdfast_task_panics_total", "role" => *role, "task" => *task).absolute(0);
        }
        // Nothing is stuck until an audit says otherwise: the series exists
        // from the start, so its alert can be checked against any process.
        gauge!("holdfast_ledger_stuck").set(0.0);
        // Nothing waits in the outbox until a relay reads it.
        gauge!("holdfast_outbox_depth").set(0.0);
        gauge!("holdfast_outbox_relay_lag_seconds").set(0.0);
        counter!("holdfast_outbox_relayed_total").absolute(0);
        counter!("holdfast_database_server_changes_total").absolute(0);
        counter!("holdfast_database_failover_errors_total").absolute(0);
        // Registered with no observation: rendered with every bucket at 0.
        let _ = histogram!("holdfast_reservation_seconds");
        let _ = histogram!("holdfast_item_seconds");
        let _ = histogram!("holdfast_batch_seconds");
    }

    pub fn granted(source: GrantSource, amount: i64) {
        counter!("holdfast_credits_granted_total", "source" => source.as_str())
            .increment(amount.max(0) as u64);
    }

    /// Credits of a grant that expired unused (left over at its expiry, or
    /// released by a hold after it).
    pub fn credits_expired(source: GrantSource, amount: i64) {
        if amount > 0 {
            counter!("holdfast_credits_expired_total", "source" => source.as_str())
                .increment(amount as u64);
        }
    }

    pub fn decided(decision: &Decision, took: Duration) {
        counter!("holdfast_batches_total", "decision" => decision.kind()).increment(1);
        if let Decision::Granted(g) = decision {
            counter!("holdfast_credits_reserved_total").increment(g.reserved.max(0) as u64);
        }
        histogram!("holdfast_reservation_seconds").record(took.as_secs_f64());
    }

    /// A group decision priced on credits another transaction spent
    /// meanwhile, decided again under the account lock.
    /// A new database connection reached another server than the last one
    /// (the first connection, and each failover).
    pub fn database_server_changed() {
        counter!("holdfast_database_server_changes_total").increment(1);
    }

    /// A statement failed because its server is read-only or going away
    /// (SQLSTATE 25006, 57P01–57P03): the pools drop their connections.
    pub fn database_failover_error() {
        counter!("holdfast_database_failover_errors_total").increment(1);
    }

    pub fn reservation_retried() {
        counter!("holdfast_reservation_retries_total").increment(1);
    }

    /// A request rejected before reaching the ledger.
    pub fn rejected() {
        counter!("holdfast_batches_total", "decision" => "rejected").increment(1);
    }

    pub fn settled(items: &[Settlement], report: &SettleReport) {
        let mut captured = 0u64;
        let mut overrun = 0u64;
        for (_, result) in items.iter().zip(&report.results) {
            let outcome = match result {
                Settled::Captured {
                    captured: c,
                    overrun: o,
                } => {
                    captured += *c as u64;
                    overrun += *o as u64;
                    "succeeded"
                }
                Settled::Failed => "failed",
                Settled::Cancelled => "cancelled",
                Settled::AlreadySettled { .. } => "duplicate",
                Settled::Unknown => "unknown",
            };
            counter!("holdfast_items_total", "outcome" => outcome).increment(1);
        }
        counter!("holdfast_credits_captured_total").increment(captured);
        if overrun > 0 {
            counter!("holdfast_overrun_credits_total").increment(overrun);
        }
        closed(&report.closed);
    }

    pub fn closed(batches: &[ClosedBatch]) {
        for b in batches {
            let reason = match b.state {
                BatchState::Expired => "deadline",
                BatchState::Cancelled => "cancelled",
                _ => "completed",
            };
            counter!("holdfast_credits_released_total", "reason" => reason)
                .increment(b.figures.released.max(0) as u64);
            counter!("holdfast_batches_closed_total", "state" => b.state.as_str()).increment(1);
            histogram!("holdfast_batch_seconds").record(b.seconds);
        }
    }

    /// A sequential batch reserved its next chunk.
    pub fn chunk_reserved(credits: i64) {
        counter!("holdfast_credits_reserved_total").increment(credits.max(0) as u64);
    }

    /// A job whose item was already settled, acknowledged without running.
    pub fn duplicate_job() {
        counter!("holdfast_items_total", "outcome" => "duplicate").increment(1);
    }

    /// Rows a worker read before running a group of jobs: `batch` states
    /// for first deliveries (once per batch and time to live), `item` states
    /// for redeliveries, re-dispatches and batches no longer running.
    pub fn worker_lookup(of: &'static str, rows: usize) {
        counter!("holdfast_worker_lookups_total", "of" => of).increment(rows as u64);
    }

    pub fn item_seconds(took: Duration) {
        histogram!("holdfast_item_seconds").record(took.as_secs_f64());
    }

    pub fn held(credits: i64, holds: i64) {
        gauge!("holdfast_credits_held").set(credits as f64);
        gauge!("holdfast_holds_open").set(holds as f64);
    }

    pub fn dispatch_backlog(items: i64) {
        gauge!("holdfast_dispatch_backlog").set(items as f64);
    }

    /// Open holds past their deadline (soft hold TTL or batch execution
    /// deadline) after a reconciler sweep: more than zero means holds are
    /// not being resolved.
    pub fn holds_overdue(holds: i64) {
        gauge!("holdfast_holds_overdue").set(holds as f64);
    }

    pub fn drift(count: usize) {
        gauge!("holdfast_ledger_drift").set(count as f64);
    }

    /// Open holds stuck past their deadline, TTL or dispatch lease (beyond
    /// the grace the caller allowed), as the last stuck-money check found.
    pub fn stuck(count: usize) {
        gauge!("holdfast_ledger_stuck").set(count as f64);
    }

    /// A soft hold reserved, cancelled or expired (`credits` counted when known).
    pub fn soft_hold(event: &'static str, credits: i64) {
        counter!("holdfast_soft_holds_total", "event" => event).increment(1);
        if credits > 0 && event != "reserved" {
            counter!("holdfast_credits_released_total", "reason" => event)
                .increment(credits as u64);
        }
    }

    /// A message parked in a dead-letter queue by Holdfast itself.
    pub fn dead_lettered(queue: &'static str) {
        counter!("holdfast_dead_lettered_total", "queue" => queue).increment(1);
    }

    /// Every supervised task, as (role, task): the labels of `holdfast_task_panics_total`.
    pub const TASKS: &[(&str, &str)] = &[
        ("coordinator", "requests"),
        ("coordinator", "previews"),
        ("worker", "jobs"),
        ("worker", "settler"),
        ("reconciler", "sweep"),
        ("relay", "outbox"),
        ("api", "http"),
    ];

    /// A supervised task panicked (one message, one sweep, one HTTP request)
    /// and was kept going. `role` and `task` come from [`TASKS`].
    pub fn task_panic(role: &'static str, task: &'static str) {
        counter!("holdfast_task_panics_total", "role" => role, "task" => task).increment(1);
    }

    /// The outbox as a relay read it: rows waiting, and the age of the oldest
    /// (the relay lag; 0 when nothing waits).
    pub fn outbox(rows: i64, lag_seconds: f64) {
        gauge!("holdfast_outbox_depth").set(rows as f64);
        gauge!("holdfast_outbox_relay_lag_seconds").set(lag_seconds);
    }

    /// Events a relay published, confirmed and deleted from the outbox.
    pub fn outbox_relayed(events: usize) {
        counter!("holdfast_outbox_relayed_total").increment(events as u64);
    }

    /// A RabbitMQ connection opened to the node at `address` (`host:port`
    /// of the configured list: a bounded label).
    pub fn broker_connected(address: &str) {
        counter!("holdfast_broker_connections_total", "node" => address.to_string()).increment(1);
    }

    /// An ack or reject that reached no broker (channel gone): the message comes back.
    pub fn ack_lost() {
        counter!("holdfast_acks_lost_total").increment(1);
    }
}
