//! Holdfast's worker, a library first: implement [`Generator`] for your own
//! paid work and run [`consume::run`], or use the built-in generators.
//!
//! - [`generator`]: the trait and its error type.
//! - [`simulate`]: latency, cost factor and failures from config or payload.
//! - [`http`]: POST the job to a URL; the answer carries the actual cost.
//! - [`consume`]: the worker role (consume, generate, capture, ack).

pub mod consume;
pub mod generator;
pub mod http;
pub mod simulate;

use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};

pub use generator::{Generated, Generator, GeneratorError};

/// Which built-in generator a worker process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GeneratorKind {
    Simulate,
    Http,
}

/// Settings of the built-in generators.
#[derive(Args, Clone, Debug)]
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

/// Why the configured generator cannot be built: a setting to fix.
#[derive(Debug, thiserror::Error)]
pub enum GeneratorSetupError {
    #[error("the http generator needs --http-url (HOLDFAST_HTTP_URL)")]
    MissingUrl,
    #[error("the http generator's client cannot be built: {0}")]
    Client(#[from] reqwest::Error),
}

/// Build the configured built-in generator.
pub fn build_generator(
    settings: &GeneratorSettings,
) -> Result<Arc<dyn Generator>, GeneratorSetupError> {
    Ok(match settings.generator {
        GeneratorKind::Simulate => Arc::new(simulate::Simulate::new(simulate::SimulateSettings {
            latency: Duration::from_millis(settings.simulate_latency_ms),
            cost_factor: settings.simulate_cost_factor,
            failure_rate: settings.simulate_failure_rate,
        })),
        GeneratorKind::Http => {
            let url = settings
                .http_url
                .clone()
                .ok_or(GeneratorSetupError::MissingUrl)?;
            Arc::new(http::Http::new(
                url,
                Duration::from_secs(settings.http_timeout_secs),
            )?)
        }
    })
}
