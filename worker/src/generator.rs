//! The extension point: a [`Generator`] does the paid work for one item and
//! reports what it actually cost. Implement it to plug your own model or API
//! into a Holdfast worker.

use async_trait::async_trait;
use holdfast_common::messages::ItemJob;
use serde_json::Value;

/// What a successful generation produced.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Generated {
    /// The actual cost in credit units. `None`: not reported, so the item's
    /// reservation is charged. Above the reservation: capped, overrun recorded.
    pub actual_cost: Option<i64>,
    /// Whatever the generator wants to log about its result (not stored).
    pub output: Option<Value>,
}

/// Why a generation did not succeed, and whether trying again may help.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GeneratorError {
    /// A timeout, a 5xx, a dropped connection: retried with backoff, then the item fails.
    #[error("transient failure: {0}")]
    Transient(String),
    /// The input is refused or the work is impossible: the item fails now, not charged.
    #[error("failed: {0}")]
    Permanent(String),
}

impl GeneratorError {
    pub fn is_transient(&self) -> bool {
        matches!(self, GeneratorError::Transient(_))
    }
}

/// Does the work of one item. Called at least once per item; Holdfast charges
/// each item at most once whatever happens, but a redelivered job after a
/// crash may run the work again, so make side effects idempotent on
/// `(job.batch_id, job.item_id)` where you can.
#[async_trait]
pub trait Generator: Send + Sync + 'static {
    /// A short name for logs.
    fn name(&self) -> &str;

    /// Generate one item.
    async fn generate(&self, job: &ItemJob) -> Result<Generated, GeneratorError>;
}
