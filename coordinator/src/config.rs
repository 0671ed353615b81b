//! The settings of the coordinator crate's roles (coordinator, reconciler,
//! and the HTTP API, which decides batch requests as the coordinator does),
//! from flags, `HOLDFAST_*` variables and defaults, and each role's whole
//! configuration.

use std::time::Duration;

use clap::Args;

use crate::bindings::AccountBindings;
use holdfast_common::config::{Limits, QueueSettings};
use holdfast_common::supervise::Heartbeat;
use holdfast_common::topology::Names;

/// Coordinator settings.
#[derive(Args, Clone, Debug)]
#[command(next_help_heading = "Coordinator")]
pub struct CoordinatorSettings {
    /// Unacknowledged requests one coordinator consumer may hold.
    #[arg(long, env = "HOLDFAST_COORDINATOR_PREFETCH", default_value_t = 32)]
    pub coordinator_prefetch: u16,
    /// Concurrent request consumers per coordinator process.
    #[arg(long, env = "HOLDFAST_COORDINATOR_CONSUMERS", default_value_t = 4)]
    pub coordinator_consumers: usize,
    /// Item jobs published before waiting for the broker's confirms.
    #[arg(long, env = "HOLDFAST_CONFIRM_WINDOW", default_value_t = 500)]
    pub confirm_window: usize,
    /// Seconds a granted batch may run before the reconciler closes it.
    #[arg(long, env = "HOLDFAST_EXECUTION_TIMEOUT_SECS", default_value_t = 3600)]
    pub execution_timeout_secs: u64,
    /// Sequential mode: items reserved per chunk.
    #[arg(long, env = "HOLDFAST_SEQUENTIAL_CHUNK", default_value_t = 10)]
    pub sequential_chunk: usize,
    /// Longest TTL a soft hold may ask for, in seconds.
    #[arg(long, env = "HOLDFAST_MAX_RESERVATION_TTL_SECS", default_value_t = 900)]
    pub max_reservation_ttl_secs: u64,
    /// Account bindings of AMQP producers, `user:account,…` (`user:*`: every
    /// account). When set, a request over AMQP must carry a `user_id` bound
    /// to its `account_id`, or it is rejected. Unset: off.
    #[arg(long, env = "HOLDFAST_AMQP_ACCOUNT_BINDINGS")]
    pub amqp_account_bindings: Option<AccountBindings>,
}

impl Default for CoordinatorSettings {
    fn default() -> Self {
        Self {
            coordinator_prefetch: 32,
            coordinator_consumers: 4,
            confirm_window: 500,
            execution_timeout_secs: 3600,
            sequential_chunk: 10,
            max_reservation_ttl_secs: 900,
            amqp_account_bindings: None,
        }
    }
}

impl CoordinatorSettings {
    pub fn execution_timeout(&self) -> Duration {
        Duration::from_secs(self.execution_timeout_secs)
    }
}

/// Reconciler settings.
#[derive(Args, Clone, Debug)]
#[command(next_help_heading = "Reconciler")]
pub struct ReconcilerSettings {
    /// Milliseconds between two sweeps.
    #[arg(long, env = "HOLDFAST_SWEEP_INTERVAL_MS", default_value_t = 5_000)]
    pub sweep_interval_ms: u64,
    /// Seconds a granted batch may stay undispatched before a reconciler re-dispatches it.
    #[arg(long, env = "HOLDFAST_DISPATCH_GRACE_SECS", default_value_t = 30)]
    pub dispatch_grace_secs: u64,
}

impl Default for ReconcilerSettings {
    fn default() -> Self {
        Self {
            sweep_interval_ms: 5_000,
            dispatch_grace_secs: 30,
        }
    }
}

impl ReconcilerSettings {
    pub fn sweep_interval(&self) -> Duration {
        Duration::from_millis(self.sweep_interval_ms)
    }
    pub fn dispatch_grace(&self) -> Duration {
        Duration::from_secs(self.dispatch_grace_secs)
    }
    /// How long past its limit a hold must be before the periodic audit calls
    /// it stuck: three sweeps (each sweep resolves what is overdue, so a
    /// healthy fleet never gets there), and never under 10 seconds.
    pub fn stuck_grace(&self) -> Duration {
        self.sweep_interval()
            .saturating_mul(3)
            .max(Duration::from_secs(10))
    }
}

/// Everything the coordinator role needs.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    pub amqp_url: String,
    pub names: Names,
    pub queues: QueueSettings,
    pub limits: Limits,
    pub settings: CoordinatorSettings,
    /// How long a reconciler waits before re-dispatching a batch this coordinator granted.
    pub dispatch_grace: Duration,
}

/// Everything the reconciler role needs.
#[derive(Clone, Debug)]
pub struct ReconcilerConfig {
    pub amqp_url: String,
    pub names: Names,
    pub queues: QueueSettings,
    pub settings: ReconcilerSettings,
    pub coordinator: CoordinatorSettings,
    /// Audit the ledger every this many sweeps (0: never).
    pub audit_every: u64,
    /// Beats after every sweep that ran to its end; `/readyz` reads it.
    pub heartbeat: Heartbeat,
}
