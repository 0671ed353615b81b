//! The one policy, in every role, for "the ledger is unavailable".
//!
//! Every ledger call already retries a transient failure a few times within
//! about a second ([`super::Ledger`]'s own backoff). When PostgreSQL is away for
//! longer (a restart, a failover), a role keeps the work it holds (its
//! deliveries stay unacknowledged: a return would count against their
//! delivery limit, which is meant for poison messages, not for a database
//! restart) and asks again with [`wait_out`], for as long as it takes, until
//! the answer comes, the error is not transient, or the role shuts down.

use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

use super::LedgerError;

/// First pause between two tries of an unavailable ledger.
pub const FIRST_WAIT: Duration = Duration::from_millis(250);
/// Longest pause between two tries of an unavailable ledger.
pub const LONGEST_WAIT: Duration = Duration::from_secs(5);

/// An error that says whether asking again later may succeed.
pub trait Transient {
    /// True for "the ledger is unavailable": waiting helps.
    fn is_transient(&self) -> bool;
}

impl Transient for LedgerError {
    fn is_transient(&self) -> bool {
        LedgerError::is_transient(self)
    }
}

/// Run `op` until it succeeds, fails with an error that is not transient, or
/// `shutdown` is cancelled (then the last error is returned, and the caller
/// gives its work back). Between tries: [`FIRST_WAIT`], doubling, at most
/// [`LONGEST_WAIT`], with jitter. Each wait is logged at WARN with `what`.
pub async fn wait_out<T, E, F, Fut>(
    what: &'static str,
    shutdown: &CancellationToken,
    mut op: F,
) -> Result<T, E>
where
    E: Transient + std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(FIRST_WAIT)
        .with_max_delay(LONGEST_WAIT)
        .without_max_times()
        .with_jitter()
        .build();
    loop {
        match op().await {
            Err(e) if e.is_transient() && !shutdown.is_cancelled() => {
                let delay = delays.next().unwrap_or(LONGEST_WAIT);
                tracing::warn!(error = %e, ?delay, "ledger unavailable; holding on to: {what}");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => {}
                }
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn waits_out_transient_errors_and_stops_at_the_rest() {
        let shutdown = CancellationToken::new();
        let tries = AtomicU32::new(0);
        let r: Result<u32, LedgerError> = wait_out("test", &shutdown, || async {
            match tries.fetch_add(1, Ordering::SeqCst) {
                0..=1 => Err(LedgerError::Unavailable("down".into())),
                n => Ok(n),
            }
        })
        .await;
        assert_eq!(r.unwrap(), 2);
        let r: Result<(), LedgerError> = wait_out("test", &shutdown, || async {
            Err(LedgerError::Invalid("bad".into()))
        })
        .await;
        assert!(matches!(r, Err(LedgerError::Invalid(_))));
        shutdown.cancel();
        let r: Result<(), LedgerError> = wait_out("test", &shutdown, || async {
            Err(LedgerError::Unavailable("down".into()))
        })
        .await;
        assert!(
            matches!(r, Err(LedgerError::Unavailable(_))),
            "gives up at shutdown"
        );
    }
}
