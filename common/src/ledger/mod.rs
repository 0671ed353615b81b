//! The credit ledger in PostgreSQL, the source of truth.
//!
//! Operations and their guarantees (see docs/state-machines.md):
//! - [`Ledger::grant`] adds posted credits.
//! - [`Ledger::create_allowance`] gives an account credits every period; the
//!   reconciler issues each period's grant once ([`Ledger::issue_allowances`]).
//! - [`Ledger::reserve`] prices a batch under the account's row lock and either
//!   takes one hold for everything that runs or records a denial. Idempotent on
//!   the batch id.
//! - [`Ledger::settle`] captures item costs (capped at each item's reservation)
//!   or fails items, in one transaction for many items, and closes the batches
//!   whose last item it settled.
//! - closing a batch releases the unused remainder of its hold exactly once.
//! - [`Ledger::reserve_soft`] takes a soft hold with a TTL that a batch may
//!   consume later; the reconciler expires it (never early) otherwise.
//! - [`Ledger::cancel_batch`] stops a batch: running items finish, the rest is released.
//! - [`Ledger::audit`] recomputes balances and holds from the journal.
//! - [`Ledger::stuck`] names open holds past their limits (stuck money).
//! - [`Ledger::put_spender`] defines the spenders of an account (a tree of
//!   budgets with limits per period); a batch charged to one must fit the
//!   account and every spender above it.
//!
//! The files follow the flow: `reserve` → `dispatch` → `capture` → `close`
//! (release), with `expire` and `cancel` as the other ways a hold resolves;
//! `soft_holds`, `accounts`, `views`, `gauges`, `audit` and `stuck` beside them.
//!
//! Lock order, everywhere: batch rows (by id), then hold rows, then account
//! rows (by id), then the account's spenders' usage rows (root to leaf). Reserve locks its account (after the soft hold it consumes,
//! if any) and inserts new rows, so no cycle can form.
//!
//! Account rows are locked `FOR NO KEY UPDATE`, never `FOR UPDATE`: it
//! serialises everything that changes credits just the same, but leaves the
//! `KEY SHARE` lock of a foreign-key check free. Every journal row refers to
//! its account, so with `FOR UPDATE` each capture's journal insert would wait
//! for whichever reservation holds the hot account row.

// The flow, one file a step: reserve → dispatch → capture → close (release),
// with expire and cancel as the other ways a hold resolves.
mod accounts;
mod allowances;
mod audit;
mod cancel;
mod capture;
mod close;
mod dispatch;
mod expire;
mod gauges;
mod grants;
mod patience;
mod reserve;
mod soft_holds;
mod spenders;
mod states;
mod stuck;
mod views;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use deadpool_postgres::Pool;
use tokio::sync::Notify;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

pub use accounts::{Account, JournalEntry};
pub use allowances::{
    check_allowance_id, Allowance, AllowanceSpec, AllowanceTerms, Allowed, Issued, NextTerms,
    Period, MAX_ALLOWANCE_ID_CHARS, MAX_BACKDATE_DAYS,
};

/// The decision path's statements (reserve, holds, dispatch record) are
/// prepared once per connection and kept in deadpool's statement cache: one
/// round trip each instead of two (prepare, then run), and PostgreSQL parses
/// them once. Every such statement is a constant string, so the cache stays as
/// small as the set of statements. The capture and look-up statements are not
/// cached: with a cached plan their array statements ran about twice as slow.
pub(crate) trait Cached {
    async fn execute_cached(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> std::result::Result<u64, tokio_postgres::Error>;
    async fn query_cached(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> std::result::Result<Vec<Row>, tokio_postgres::Error>;
    async fn query_one_cached(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> std::result::Result<Row, tokio_postgres::Error>;
}

/// For a pooled client and a transaction alike.
impl<C: deadpool_postgres::GenericClient> Cached for C {
    async fn execute_cached(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> std::result::Result<u64, tokio_postgres::Error> {
        self.execute(&self.prepare_cached(sql).await?, params).await
    }
    async fn query_cached(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> std::result::Result<Vec<Row>, tokio_postgres::Error> {
        self.query(&self.prepare_cached(sql).await?, params).await
    }
    async fn query_one_cached(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> std::result::Result<Row, tokio_postgres::Error> {
        self.query_one(&self.prepare_cached(sql).await?, params)
            .await
    }
}
pub use audit::Drift;
pub use cancel::Cancelled;
pub use capture::{ItemOutcome, SettleReport, Settled, Settlement};
pub use close::ClosedBatch;
pub use dispatch::PendingJob;
pub use grants::{Grant, GrantSource, GrantSpec, Granted, ALLOWANCE_GRANT_PREFIX};
pub use patience::{wait_out, Transient};
pub use reserve::{rfc3339, ReserveInput, Reserved};
pub use spenders::{
    check_spender_id, Spender, SpenderLevel, SpenderPut, SpenderSpec, MAX_SPENDER_DEPTH,
};
pub use states::{BatchState, HoldState, ItemState};
pub use stuck::Stuck;
pub use views::{BatchView, ItemView};

/// What went wrong in the ledger, and what the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// PostgreSQL is unreachable or the transaction lost a race: retry later.
    #[error("ledger temporarily unavailable: {0}")]
    Unavailable(String),
    /// The account does not exist: reject the request.
    #[error("unknown account `{0}`")]
    UnknownAccount(String),
    /// The account has no such spender: reject the request, naming `spender_id`.
    #[error("account `{account}` has no spender `{spender}`")]
    UnknownSpender { account: String, spender: String },
    /// The account exists already (create).
    #[error("account `{0}` already exists")]
    AccountExists(String),
    /// The grant id was used before with different terms: reject.
    #[error("account `{account}` already has a grant `{grant}` with other terms")]
    GrantConflict { account: String, grant: String },
    /// The allowance id is taken by an allowance with other terms: reject
    /// (change an allowance with PUT, or use a new id).
    #[error("account `{account}` already has an allowance `{allowance}` with other terms")]
    AllowanceConflict { account: String, allowance: String },
    /// The batch id was used before with a different request body: reject.
    #[error("batch `{0}` was already submitted with a different request")]
    Conflict(String),
    /// The request itself is not acceptable to the ledger: reject.
    #[error("{0}")]
    Invalid(String),
    /// The reservation named by the request cannot start it: reject, naming `reservation_id`.
    #[error("{0}")]
    Reservation(String),
    /// Not enough credits for a soft hold: nothing was held.
    #[error("insufficient credits: {requested} requested, {available} available")]
    Insufficient { requested: i64, available: i64 },
    /// No such batch or reservation.
    #[error("{0}")]
    NotFound(String),
    /// The batch or reservation is in a state that does not allow this.
    #[error("{0}")]
    WrongState(String),
    /// The database user may not do this (SQLSTATE 42501): the process runs
    /// with a role that lacks the privilege (see migrations/V3__roles.sql).
    /// Do not retry; use a user of the right group.
    #[error("not permitted for this database user: {0}")]
    Forbidden(String),
    /// A bug or a refused invariant: do not retry blindly.
    #[error("ledger error: {}", pg_message(.0))]
    Database(#[source] tokio_postgres::Error),
}

impl LedgerError {
    /// True when the same call may succeed later (connection loss, deadlock, serialisation).
    pub fn is_transient(&self) -> bool {
        matches!(self, LedgerError::Unavailable(_))
    }
}

impl From<tokio_postgres::Error> for LedgerError {
    fn from(e: tokio_postgres::Error) -> Self {
        crate::database::note_error(&e);
        let transient = match e.code() {
            None => true, // connection closed, I/O error
            Some(code) => {
                let c = code.code();
                // 08: connection exceptions, 40001/40P01: serialisation and
                // deadlock, 57P: operator intervention (shutdown, restart), 53:
                // resources, 25006: a read-only server (a standby, or a
                // primary being demoted: the next connection finds the new one).
                c.starts_with("08")
                    || *code == SqlState::READ_ONLY_SQL_TRANSACTION
                    || *code == SqlState::T_R_SERIALIZATION_FAILURE
                    || *code == SqlState::T_R_DEADLOCK_DETECTED
                    || c.starts_with("57P")
                    || c.starts_with("53")
            }
        };
        if transient {
            LedgerError::Unavailable(pg_message(&e))
        } else if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
            LedgerError::Forbidden(pg_message(&e))
        } else {
            LedgerError::Database(e)
        }
    }
}

/// PostgreSQL's own words for an error: the message, detail and SQLSTATE of a
/// database error, or the cause chain of a connection error.
pub fn pg_message(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut m = format!("{} (SQLSTATE {})", db.message(), db.code().code());
        if let Some(detail) = db.detail() {
            m.push_str(": ");
            m.push_str(detail);
        }
        return m;
    }
    let mut m = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        m.push_str(": ");
        m.push_str(&s.to_string());
        source = s.source();
    }
    m
}

impl From<deadpool_postgres::PoolError> for LedgerError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        LedgerError::Unavailable(e.to_string())
    }
}

pub type Result<T, E = LedgerError> = std::result::Result<T, E>;

/// The ledger: a handle on the PostgreSQL pool. Cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    pool: Pool,
    retry: ExponentialBuilder,
    /// The dispatch lease of a sequential batch's next chunk (see
    /// [`Ledger::with_dispatch_grace`]).
    dispatch_grace: Duration,
    /// Wakes this process's outbox relay after a commit that wrote events
    /// (see [`crate::outbox::relay`]); shared by every clone.
    wake: Arc<Notify>,
}

impl Ledger {
    pub fn new(pool: Pool) -> Self {
        Self {
            pool,
            wake: Arc::new(Notify::new()),
            retry: ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(50))
                .with_max_delay(Duration::from_secs(2))
                .with_max_times(8)
                .with_jitter(),
            dispatch_grace: Duration::from_secs(30),
        }
    }

    /// How long a batch granted by a settle (a sequential batch's next chunk)
    /// may stay undispatched before a reconciler sends its jobs: the fleet's
    /// `HOLDFAST_DISPATCH_GRACE_SECS`, 30 s unless set.
    pub fn with_dispatch_grace(mut self, dispatch_grace: Duration) -> Self {
        self.dispatch_grace = dispatch_grace;
        self
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// What this process's outbox relay waits on: notified after every commit
    /// that wrote outbox rows. In memory, never `NOTIFY` (see `crate::outbox`).
    pub fn outbox_wake(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Wake the relay: call after committing outbox rows. A wake with no
    /// relay waiting is kept for its next wait.
    pub(crate) fn wake_relay(&self) {
        self.wake.notify_one();
    }

    /// Run `op` again with backoff while it fails transiently.
    async fn retrying<T, F, Fut>(&self, what: &'static str, op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        op.retry(self.retry)
            .when(LedgerError::is_transient)
            .notify(|e, after| tracing::warn!(error = %e, ?after, "{what}: retrying"))
            .await
    }

    /// True when PostgreSQL answers.
    pub async fn ping(&self) -> bool {
        match self.pool.get().await {
            Ok(c) => c.simple_query("SELECT 1").await.is_ok(),
            Err(_) => false,
        }
    }
}
