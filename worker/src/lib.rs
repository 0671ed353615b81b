//! Holdfast's worker, a library first: implement [`Generator`] for your own
//! paid work and run [`consume::run`], or use the built-in generators.
//!
//! A job's way through it:
//!
//! ```text
//! <ns>.jobs ─▶ consume (the role: a group of deliveries, one task per job)
//!               └─▶ job     where it stands: a first delivery from its batch's state (read
//!                           once per batch, cached briefly), a redelivery from its item's
//!                           (a duplicate is acked, a cancelled batch's item settled
//!                           uncharged); run the Generator, catch its panic
//!                    └─▶ settle  capture many items in one transaction (ledger::capture),
//!                                ack after the commit, announce closed batches, send a
//!                                sequential batch's next chunk, coalesce progress events
//! ```
//!
//! - [`generator`]: the trait and its error type.
//! - [`simulate`]: latency, cost factor and failures from config or payload.
//! - [`http`]: POST the job to a URL; the answer carries the actual cost.
//! - [`consume`]: the worker role.
//! - [`config`]: the worker's settings.

mod batches;
pub mod config;
pub mod consume;
pub mod generator;
pub mod http;
mod job;
mod settle;
pub mod simulate;

use std::sync::Arc;
use std::time::Duration;

pub use config::{GeneratorKind, GeneratorSettings, WorkerConfig, WorkerSettings};
pub use consume::process_one;
pub use generator::{Generated, Generator, GeneratorError};
pub use job::JobOutcome;

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
