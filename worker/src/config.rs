//! The worker role's settings, from flags, `HOLDFAST_*` variables and
//! defaults: the consumer's, the built-in generators', and the whole
//! configuration of a worker.

use clap::{Args, ValueEnum};
use holdfast_common::config::QueueSettings;
use holdfast_common::topology::Names;

/// Worker settings.
#[derive(Args, Clone, Debug)]
#[command(next_help_heading = "Worker")]
pub struct WorkerSettings {
    /// Unacknowledged jobs one worker holds, which is also how many run at once.
    #[arg(long, env = "HOLDFAST_WORKER_PREFETCH", default_value_t = 64)]
    pub worker_prefetch: u16,
    /// Most items captured in one transaction.
    #[arg(long, env = "HOLDFAST_SETTLE_BATCH", default_value_t = 128)]
    pub settle_batch: usize,
    /// Retries of a transient generator failure (after the first try) before the item fails.
    #[arg(long, env = "HOLDFAST_GENERATOR_RETRIES", default_value_t = 3)]
    pub generator_retries: usize,
    /// First retry delay, in milliseconds (doubles each time, with jitter).
    #[arg(long, env = "HOLDFAST_GENERATOR_RETRY_MS", default_value_t = 200)]
    pub generator_retry_ms: u64,
    /// Seconds in-flight items get to finish after a shutdown signal.
    #[arg(long, env = "HOLDFAST_SHUTDOWN_TIMEOUT_SECS", default_value_t = 30)]
    pub shutdown_timeout_secs: u64,
    /// At most one progress event per batch per this many milliseconds.
    #[arg(long, env = "HOLDFAST_PROGRESS_INTERVAL_MS", default_value_t = 1_000)]
    pub progress_interval_ms: u64,
    /// How long, in milliseconds, a batch's state read for a first delivery
    /// is used for the next ones (0: read it for every group of deliveries).
    /// A cancel reaches the items that have not started within this time.
    #[arg(long, env = "HOLDFAST_BATCH_STATE_TTL_MS", default_value_t = 250)]
    pub batch_state_ttl_ms: u64,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            worker_prefetch: 64,
            settle_batch: 128,
            generator_retries: 3,
            generator_retry_ms: 200,
            shutdown_timeout_secs: 30,
            progress_interval_ms: 1_000,
            batch_state_ttl_ms: 250,
        }
    }
}

/// Everything the worker role needs.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub amqp_url: String,
    pub names: Names,
    pub queues: QueueSettings,
    pub settings: WorkerSettings,
}

/// Which built-in generator a worker process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GeneratorKind {
    Simulate,
    Http,
}

/// Settings of the built-in generators.
#[derive(Args, Clone, Debug)]
#[command(next_help_heading = "Generator")]
pub struct GeneratorSettings {
    /// The generator to run.
    #[arg(long, env = "HOLDFAST_GENERATOR", value_enum, default_value_t = GeneratorKind::Simulate)]
    pub generator: GeneratorKind,
    /// simulate: milliseconds each item takes.
    #[arg(long, env = "HOLDFAST_SIMULATE_LATENCY_MS", default_value_t = 0)]
    pub simulate_latency_ms: u64,
    /// simulate: actual cost = reserved × this factor.
    #[arg(long, env = "HOLDFAST_SIMULATE_COST_FACTOR", default_value_t = 1.0)]
    pub simulate_cost_factor: f64,
    /// simulate: share of items that fail (0 to 1).
    #[arg(long, env = "HOLDFAST_SIMULATE_FAILURE_RATE", default_value_t = 0.0)]
    pub simulate_failure_rate: f64,
    /// http: the URL each item is POSTed to.
    #[arg(long, env = "HOLDFAST_HTTP_URL")]
    pub http_url: Option<String>,
    /// http: seconds before a request times out (a transient failure).
    #[arg(long, env = "HOLDFAST_HTTP_TIMEOUT_SECS", default_value_t = 30)]
    pub http_timeout_secs: u64,
}

impl Default for GeneratorSettings {
    fn default() -> Self {
        Self {
            generator: GeneratorKind::Simulate,
            simulate_latency_ms: 0,
            simulate_cost_factor: 1.0,
            simulate_failure_rate: 0.0,
            http_url: None,
            http_timeout_secs: 30,
        }
    }
}
