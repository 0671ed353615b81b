//! Settings for every role. Each comes from a flag, then a `HOLDFAST_*`
//! environment variable, then a default that points at the local services.

use std::time::Duration;

use clap::Args;

/// Where the services are and how AMQP names are prefixed.
#[derive(Args, Clone, Debug)]
pub struct Connections {
    /// PostgreSQL URL of the ledger database (created by `migrate` if missing).
    #[arg(
        long,
        env = "HOLDFAST_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/holdfast",
        global = true
    )]
    pub database_url: String,
    /// RabbitMQ URL.
    #[arg(
        long,
        env = "HOLDFAST_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        global = true
    )]
    pub amqp_url: String,
    /// Prefix of every queue and exchange name, so tenants and tests isolate.
    #[arg(
        long,
        env = "HOLDFAST_NAMESPACE",
        default_value = "holdfast",
        global = true
    )]
    pub namespace: String,
    /// Maximum PostgreSQL connections per process.
    #[arg(
        long,
        env = "HOLDFAST_DB_POOL_SIZE",
        default_value_t = 16,
        global = true
    )]
    pub db_pool_size: usize,
}

impl Default for Connections {
    fn default() -> Self {
        Self {
            database_url: "postgres://postgres@127.0.0.1:5432/holdfast".into(),
            amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            namespace: "holdfast".into(),
            db_pool_size: 16,
        }
    }
}

/// Limits enforced on every batch request before any database work.
#[derive(Args, Clone, Debug)]
pub struct Limits {
    /// Most items one batch may carry.
    #[arg(long, env = "HOLDFAST_MAX_ITEMS", default_value_t = 10_000)]
    pub max_items: usize,
    /// Largest payload of one item, in bytes of JSON.
    #[arg(long, env = "HOLDFAST_MAX_PAYLOAD_BYTES", default_value_t = 64 * 1024)]
    pub max_payload_bytes: usize,
    /// Largest batch request message, in bytes.
    #[arg(long, env = "HOLDFAST_MAX_MESSAGE_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_message_bytes: usize,
    /// Highest estimated cost of one item, in credit units.
    #[arg(long, env = "HOLDFAST_MAX_ITEM_COST", default_value_t = 1_000_000_000)]
    pub max_item_cost: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_items: 10_000,
            max_payload_bytes: 64 * 1024,
            max_message_bytes: 16 * 1024 * 1024,
            max_item_cost: 1_000_000_000,
        }
    }
}

/// Queue behaviour shared by producers and consumers: the declarations must agree.
#[derive(Args, Clone, Debug)]
pub struct QueueSettings {
    /// Deliveries of one batch request before RabbitMQ dead-letters it.
    #[arg(long, env = "HOLDFAST_REQUEST_DELIVERY_LIMIT", default_value_t = 20)]
    pub request_delivery_limit: u32,
    /// Deliveries of one item job before RabbitMQ dead-letters it.
    #[arg(long, env = "HOLDFAST_JOB_DELIVERY_LIMIT", default_value_t = 5)]
    pub job_delivery_limit: u32,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            request_delivery_limit: 20,
            job_delivery_limit: 5,
        }
    }
}

/// Coordinator settings.
#[derive(Args, Clone, Debug)]
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
}
