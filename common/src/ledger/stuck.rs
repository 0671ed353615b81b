//! Stuck money: credits that the ledger itself says should have come back by
//! now. The audit ([`Ledger::audit`]) finds balances that disagree with the
//! journal; this finds holds that agree with it but are not being resolved.
//!
//! Each open hold is named at most once, by the first of these that applies:
//! - `hold_overdue`: a soft hold past its TTL that no batch consumed; or a
//!   batch's hold past the batch's execution deadline with every item settled
//!   (the batch should have been closed);
//! - `items_overdue`: a batch past its execution deadline with items still
//!   pending (the reconciler should have failed them and closed the batch);
//! - `undispatched`: a batch granted but not dispatched past its dispatch
//!   lease (a reconciler should have re-dispatched it).
//!
//! Only what is past its limit by more than `grace` counts: the reconciler
//! resolves each of these on its next sweep, so a healthy system shows none.

use std::time::Duration;

use serde::Serialize;
use tokio_postgres::Row;

use super::{BatchState, Ledger, Result};

/// An open hold whose credits should have been resolved by now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Stuck {
    /// `hold_overdue`, `items_overdue` or `undispatched`.
    pub kind: String,
    /// `hold <id> (batch <id>)`, `hold <id>` (a soft hold) or `batch <id>`.
    pub subject: String,
    /// What is wrong, with the credits held and how long past the limit.
    pub problem: String,
    /// Credits the hold keeps from the account's available that would return
    /// if it resolved now: its amount less what its items captured.
    pub credits: i64,
}

const TIME: &str = "'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'";

/// Soft holds past their TTL: (hold, account, amount, captured, seconds past, limit).
fn soft_holds() -> String {
    format!(
        "SELECT h.id::text, h.account_id, h.amount, h.captured,
                extract(epoch FROM now() - h.expires_at)::float8,
                to_char(h.expires_at AT TIME ZONE 'UTC', {TIME})
         FROM holds h
         WHERE h.state = 'open' AND h.expires_at < now() - make_interval(secs => $1)
           AND NOT EXISTS (SELECT 1 FROM batches b WHERE b.hold_id = h.id)
         ORDER BY h.expires_at, h.id"
    )
}

/// Open batches whose hold is open past the execution deadline:
/// (batch, hold, amount, captured, seconds past, limit, pending items, state).
fn past_deadline() -> String {
    format!(
        "SELECT b.id, h.id::text, h.amount, h.captured,
                extract(epoch FROM now() - b.deadline_at)::float8,
                to_char(b.deadline_at AT TIME ZONE 'UTC', {TIME}),
                (SELECT count(*) FROM items i WHERE i.batch_id = b.id AND i.state = 'pending'),
                b.state
         FROM batches b JOIN holds h ON h.id = b.hold_id
         WHERE b.state IN ('granted', 'dispatched', 'cancelling') AND h.state = 'open'
           AND b.deadline_at < now() - make_interval(secs => $1)
         ORDER BY b.deadline_at, b.id"
    )
}

/// Batches granted (or cancelling before their jobs went out) whose dispatch
/// lease ran out, not already past their deadline:
/// (batch, hold, amount, captured, seconds past, limit, pending items).
fn undispatched() -> String {
    format!(
        "SELECT b.id, h.id::text, h.amount, h.captured,
                extract(epoch FROM now() - COALESCE(b.dispatch_lease, b.created_at))::float8,
                to_char(COALESCE(b.dispatch_lease, b.created_at) AT TIME ZONE 'UTC', {TIME}),
                (SELECT count(*) FROM items i WHERE i.batch_id = b.id AND i.state = 'pending')
         FROM batches b JOIN holds h ON h.id = b.hold_id
         WHERE (b.state = 'granted' OR (b.state = 'cancelling' AND b.dispatched_at IS NULL))
           AND h.state = 'open'
           AND COALESCE(b.dispatch_lease, b.created_at) < now() - make_interval(secs => $1)
           AND (b.deadline_at IS NULL OR b.deadline_at >= now() - make_interval(secs => $1))
         ORDER BY COALESCE(b.dispatch_lease, b.created_at), b.id"
    )
}

/// `3h 2m`, `5m 7s`, `42s`: how long past a limit, to the second.
fn how_long(secs: f64) -> String {
    let s = secs.max(0.0).floor() as u64;
    let (d, h, m, s) = (s / 86_400, s / 3_600 % 24, s / 60 % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// `50 credits held (20 captured, 30 to release)`, or `50 credits held` when nothing was captured.
fn held(amount: i64, captured: i64) -> String {
    if captured == 0 {
        format!("{amount} credits held")
    } else {
        format!(
            "{amount} credits held ({captured} captured, {} to release)",
            amount - captured
        )
    }
}

fn soft_hold(r: &Row) -> Stuck {
    let (hold, account): (String, String) = (r.get(0), r.get(1));
    let (amount, captured): (i64, i64) = (r.get(2), r.get(3));
    let (past, limit): (f64, String) = (r.get(4), r.get(5));
    Stuck {
        kind: "hold_overdue".into(),
        subject: format!("hold {hold}"),
        problem: format!(
            "soft hold of account {account} not expired: {}, {} past its TTL ({limit})",
            held(amount, captured),
            how_long(past)
        ),
        credits: amount - captured,
    }
}

fn deadline(r: &Row) -> Stuck {
    let (batch, hold): (String, String) = (r.get(0), r.get(1));
    let (amount, captured): (i64, i64) = (r.get(2), r.get(3));
    let (past, limit): (f64, String) = (r.get(4), r.get(5));
    let (pending, state): (i64, BatchState) = (r.get(6), r.get(7));
    let credits = amount - captured;
    if pending == 0 {
        return Stuck {
            kind: "hold_overdue".into(),
            subject: format!("hold {hold} (batch {batch})"),
            problem: format!(
                "every item settled but the batch is still {state}: {}, {} past its execution deadline ({limit})",
                held(amount, captured),
                how_long(past)
            ),
            credits,
        };
    }
    Stuck {
        kind: "items_overdue".into(),
        subject: format!("batch {batch}"),
        problem: format!(
            "{pending} item(s) still pending {} past the execution deadline ({limit}){}; hold {hold}: {}",
            how_long(past),
            if state == BatchState::Granted {
                ", its jobs never all dispatched"
            } else {
                ""
            },
            held(amount, captured)
        ),
        credits,
    }
}

fn not_dispatched(r: &Row) -> Stuck {
    let (batch, hold): (String, String) = (r.get(0), r.get(1));
    let (amount, captured): (i64, i64) = (r.get(2), r.get(3));
    let (past, limit, pending): (f64, String, i64) = (r.get(4), r.get(5), r.get(6));
    Stuck {
        kind: "undispatched".into(),
        subject: format!("batch {batch}"),
        problem: format!(
            "granted but not dispatched: {pending} item(s) pending, hold {hold}: {}, {} past its dispatch lease ({limit})",
            held(amount, captured),
            how_long(past)
        ),
        credits: amount - captured,
    }
}

impl Ledger {
    /// Every open hold stuck for longer than `grace` beyond its own limit
    /// (see the module documentation); empty means nothing is stuck. Read
    /// only, in one snapshot. Sets the gauge `holdfast_ledger_stuck`.
    pub async fn stuck(&self, grace: Duration) -> Result<Vec<Stuck>> {
        let grace = grace.as_secs_f64();
        let stuck = self
            .retrying("stuck", || async {
                let mut client = self.pool.get().await?;
                // One snapshot (and one now()) for every check, so that a hold
                // moving on meanwhile is neither counted twice nor missed.
                let tx = client
                    .build_transaction()
                    .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                    .read_only(true)
                    .start()
                    .await?;
                let mut stuck = Vec::new();
                for r in tx.query(&soft_holds(), &[&grace]).await? {
                    stuck.push(soft_hold(&r));
                }
                for r in tx.query(&past_deadline(), &[&grace]).await? {
                    stuck.push(deadline(&r));
                }
                for r in tx.query(&undispatched(), &[&grace]).await? {
                    stuck.push(not_dispatched(&r));
                }
                tx.commit().await?;
                Ok(stuck)
            })
            .await?;
        crate::telemetry::record::stuck(stuck.len());
        Ok(stuck)
    }
}

#[cfg(test)]
mod tests {
    use super::how_long;

    #[test]
    fn how_long_reads_like_a_person_would_say_it() {
        assert_eq!(how_long(0.4), "0s");
        assert_eq!(how_long(42.9), "42s");
        assert_eq!(how_long(307.0), "5m 7s");
        assert_eq!(how_long(10_920.0), "3h 2m");
        assert_eq!(how_long(2.0 * 86_400.0 + 3_600.0), "2d 1h");
        assert_eq!(how_long(-5.0), "0s");
    }
}
