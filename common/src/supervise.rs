//! Supervision: no panic ends a role.
//!
//! Every long-running task (each consumer, the settler, the reconciler's
//! sweep, the HTTP API) runs its units of work (one delivery or group, one
//! capture batch, one sweep, one request) through [`guard`]. A panic there
//! is caught, counted in `holdfast_task_panics_total{role,task}` and handed
//! back as [`Panicked`], so the caller can log it with the batch or hold it
//! concerned and go on with the next unit. [`crate::topology::supervise`]
//! does the same for a whole session and starts it again.
//!
//! A panic is a bug, never an outcome: state is only ever changed in ledger
//! transactions (a panic drops the transaction, which rolls back) and in
//! broker acks (a panic leaves the delivery unacknowledged, so it comes back
//! and counts against its delivery limit).

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;

use crate::telemetry::record;

/// A unit of work panicked; the text is the panic's message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("panicked: {0}")]
pub struct Panicked(pub String);

/// Run `work`, catching a panic: counted for (`role`, `task`) and returned
/// as [`Panicked`]. The caller logs it with what the work concerned.
///
/// Unwind safety: the futures guarded here own or borrow only values that a
/// panic leaves usable (pools, channels, configuration); what they were in
/// the middle of is dropped with them.
pub async fn guard<F: Future>(
    role: &'static str,
    task: &'static str,
    work: F,
) -> Result<F::Output, Panicked> {
    match AssertUnwindSafe(work).catch_unwind().await {
        Ok(out) => Ok(out),
        Err(payload) => {
            record::task_panic(role, task);
            Err(Panicked(panic_text(payload.as_ref())))
        }
    }
}

/// The message of a panic payload (`panic!("...")` carries a `&str` or a `String`).
pub fn panic_text(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic with no message".into())
}

/// When a periodic task (the reconciler's sweep) last finished a unit of
/// work. The task beats; readiness asks how long ago. Cheap to clone: the
/// clones share one clock.
#[derive(Clone, Debug)]
pub struct Heartbeat {
    origin: Instant,
    /// Milliseconds from `origin` to the last beat.
    last: Arc<AtomicU64>,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self::new()
    }
}

impl Heartbeat {
    /// A heartbeat that beat just now (a task that has not had its first
    /// turn yet is not late).
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
            last: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The task finished a unit of work.
    pub fn beat(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }

    /// Time since the last beat.
    pub fn age(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.origin.elapsed().saturating_sub(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_is_caught_and_named() {
        let r = guard("worker", "jobs", async { panic!("boom {}", 1) }).await;
        assert_eq!(r, Err::<(), _>(Panicked("boom 1".into())));
        let r = guard("worker", "jobs", async { panic!("static") }).await;
        assert_eq!(r, Err::<(), _>(Panicked("static".into())));
        assert_eq!(guard("worker", "jobs", async { 7 }).await, Ok(7));
    }
}
