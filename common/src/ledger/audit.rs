//! The audit: recompute every balance and hold from the journal and the items,
//! and name whatever disagrees.

use serde::Serialize;

use super::{Ledger, Result};

/// One disagreement between the ledger's state and what the journal implies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Drift {
    /// `account <id>`, `hold <id> (batch <id>)` or `batch <id>`.
    pub subject: String,
    pub problem: String,
}

/// Each check: a query returning (subject, problem) for every violation.
const CHECKS: &[&str] = &[
    // Balances and held equal the sums of the journal's deltas.
    "SELECT 'account ' || a.id,
            format('balance %s, held %s, but the journal sums to balance %s, held %s',
                   a.balance, a.held, COALESCE(j.b, 0), COALESCE(j.h, 0))
     FROM accounts a
     LEFT JOIN (SELECT account_id, sum(balance_delta) b, sum(held_delta) h FROM journal GROUP BY account_id) j
       ON j.account_id = a.id
     WHERE a.balance <> COALESCE(j.b, 0) OR a.held <> COALESCE(j.h, 0)",
    // Each grant: remaining and held equal the sums of the journal rows that name it.
    "SELECT 'grant ' || g.id || ' (account ' || g.account_id || ')',
            format('remaining %s, held %s, but the journal sums to remaining %s, held %s',
                   g.remaining, g.held, COALESCE(j.b, 0), COALESCE(j.h, 0))
     FROM grants g
     LEFT JOIN (SELECT account_id, grant_id, sum(balance_delta) b, sum(held_delta) h
                FROM journal WHERE grant_id IS NOT NULL GROUP BY account_id, grant_id) j
       ON j.account_id = g.account_id AND j.grant_id = g.id
     WHERE g.remaining <> COALESCE(j.b, 0) OR g.held <> COALESCE(j.h, 0)",
    // Each grant's held is what open holds took of it.
    "SELECT 'grant ' || g.id || ' (account ' || g.account_id || ')',
            format('held %s, but open holds took %s of it', g.held, COALESCE(o.s, 0))
     FROM grants g
     LEFT JOIN (SELECT al.account_id, al.grant_id, sum(al.amount) s
                FROM hold_allocations al JOIN holds h ON h.id = al.hold_id
                WHERE h.state = 'open' GROUP BY al.account_id, al.grant_id) o
       ON o.account_id = g.account_id AND o.grant_id = g.id
     WHERE g.held <> COALESCE(o.s, 0)",
    // Each hold took its amount from grants; a resolved one settled every
    // allocation. (Holds resolved before grants existed have none.)
    "SELECT 'hold ' || h.id,
            format('amount %s state %s, but its allocations total %s (settled %s)',
                   h.amount, h.state, COALESCE(a.s, 0), COALESCE(a.settled, 0))
     FROM holds h
     LEFT JOIN (SELECT hold_id, sum(amount) s, sum(captured + released + expired) settled
                FROM hold_allocations GROUP BY hold_id) a ON a.hold_id = h.id
     WHERE (h.state = 'open' OR a.hold_id IS NOT NULL)
       AND (h.amount <> COALESCE(a.s, 0) OR (h.state <> 'open' AND a.settled <> a.s))",
    // The account's balance and held are the sums over its grants.
    "SELECT 'account ' || a.id,
            format('balance %s, held %s, but its grants total remaining %s, held %s',
                   a.balance, a.held, COALESCE(g.r, 0), COALESCE(g.h, 0))
     FROM accounts a
     LEFT JOIN (SELECT account_id, sum(remaining) r, sum(held) h FROM grants GROUP BY account_id) g
       ON g.account_id = a.id
     WHERE a.balance <> COALESCE(g.r, 0) OR a.held <> COALESCE(g.h, 0)",
    // Held equals the open holds.
    "SELECT 'account ' || a.id, format('held %s, but its open holds total %s', a.held, COALESCE(o.s, 0))
     FROM accounts a
     LEFT JOIN (SELECT account_id, sum(amount) s FROM holds WHERE state = 'open' GROUP BY account_id) o
       ON o.account_id = a.id
     WHERE a.held <> COALESCE(o.s, 0)",
    // Each hold: amount = its hold entry; captured = its capture entries = its items' captures;
    // released = its release/expire entries; once resolved, settle entries = captured.
    "SELECT 'hold ' || h.id || COALESCE(' (batch ' || b.id || ')', ''),
            format('amount %s captured %s released %s state %s; journal: hold %s capture %s release %s settle %s; items captured %s',
                   h.amount, h.captured, h.released, h.state,
                   COALESCE(j.hold, 0), COALESCE(j.capture, 0), COALESCE(j.release, 0), COALESCE(j.settle, 0),
                   COALESCE(i.captured, 0))
     FROM holds h
     LEFT JOIN batches b ON b.hold_id = h.id
     LEFT JOIN (SELECT hold_id,
                       sum(amount) FILTER (WHERE kind = 'hold') AS hold,
                       sum(amount) FILTER (WHERE kind = 'capture') AS capture,
                       sum(amount) FILTER (WHERE kind IN ('release', 'expire', 'grant_expire', 'void')) AS release,
                       sum(amount) FILTER (WHERE kind = 'settle') AS settle
                FROM journal WHERE hold_id IS NOT NULL GROUP BY hold_id) j ON j.hold_id = h.id
     LEFT JOIN (SELECT batch_id, sum(captured) AS captured FROM items GROUP BY batch_id) i ON i.batch_id = b.id
     WHERE COALESCE(j.hold, 0) <> h.amount
        OR COALESCE(j.capture, 0) <> h.captured
        OR (b.id IS NOT NULL AND COALESCE(i.captured, 0) <> h.captured)
        OR COALESCE(j.release, 0) <> h.released
        OR (h.state <> 'open' AND COALESCE(j.settle, 0) <> h.captured)
        OR (h.state = 'open' AND COALESCE(j.settle, 0) <> 0)",
    // Each spender's usage in each period is what the holds that count
    // there hold (open) and captured (resolved), recomputed from the holds.
    "SELECT 'spender ' || u.spender_id || ' (account ' || u.account_id || ', period from '
            || to_char(u.period_start AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') || ')',
            format('held %s, used %s, but its holds hold %s and captured %s',
                   u.held, u.used, COALESCE(l.held, 0), COALESCE(l.used, 0))
     FROM spender_usage u
     LEFT JOIN (SELECT l.account_id, l.spender_id, l.period_start,
                       sum(l.amount) FILTER (WHERE h.state = 'open') AS held,
                       sum(h.captured) FILTER (WHERE h.state <> 'open') AS used
                FROM hold_spenders l JOIN holds h ON h.id = l.hold_id
                GROUP BY l.account_id, l.spender_id, l.period_start) l
       ON l.account_id = u.account_id AND l.spender_id = u.spender_id AND l.period_start = u.period_start
     WHERE u.held <> COALESCE(l.held, 0) OR u.used <> COALESCE(l.used, 0)",
    // A hold counts whole at every level of its spender path, and once
    // resolved it counts what it captured (the journal's settle rows).
    "SELECT 'hold ' || h.id,
            format('amount %s captured %s state %s, but spender %s counts %s captured %s (journal settles %s)',
                   h.amount, h.captured, h.state, l.spender_id, l.amount, l.captured, COALESCE(j.settle, 0))
     FROM hold_spenders l
     JOIN holds h ON h.id = l.hold_id
     LEFT JOIN (SELECT hold_id, sum(amount) AS settle FROM journal
                WHERE kind = 'settle' GROUP BY hold_id) j ON j.hold_id = h.id
     WHERE l.amount <> h.amount
        OR (h.state = 'open' AND l.captured <> 0)
        OR (h.state <> 'open' AND (l.captured <> h.captured OR l.captured <> COALESCE(j.settle, 0)))",
    // A hold's spender path is whole: one link per level, 1 to its depth.
    "SELECT 'hold ' || hold_id, format('counts against %s spenders at depths %s', count(*), string_agg(depth::text, ','))
     FROM hold_spenders GROUP BY hold_id HAVING count(*) <> max(depth) OR min(depth) <> 1",
    // Batch counters agree with the items; a closed batch has nothing pending and a resolved hold.
    "SELECT 'batch ' || b.id,
            format('state %s, run %s succeeded %s failed %s cancelled %s; items: pending %s succeeded %s failed %s cancelled %s; hold %s',
                   b.state, b.run_count, b.succeeded, b.failed, b.cancelled,
                   COALESCE(i.pending, 0), COALESCE(i.succeeded, 0), COALESCE(i.failed, 0), COALESCE(i.cancelled, 0), h.state)
     FROM batches b
     JOIN holds h ON h.id = b.hold_id
     LEFT JOIN (SELECT batch_id,
                       count(*) FILTER (WHERE state = 'pending') AS pending,
                       count(*) FILTER (WHERE state = 'succeeded') AS succeeded,
                       count(*) FILTER (WHERE state = 'failed') AS failed,
                       count(*) FILTER (WHERE state = 'cancelled') AS cancelled,
                       sum(reserved) AS reserved
                FROM items GROUP BY batch_id) i ON i.batch_id = b.id
     WHERE COALESCE(i.succeeded, 0) <> b.succeeded
        OR COALESCE(i.failed, 0) <> b.failed
        OR COALESCE(i.cancelled, 0) <> b.cancelled
        OR COALESCE(i.pending, 0) + b.succeeded + b.failed + b.cancelled <> b.run_count
        OR COALESCE(i.reserved, 0) <> h.amount
        OR (b.state IN ('completed', 'expired', 'cancelled') AND (COALESCE(i.pending, 0) <> 0 OR h.state = 'open'))
        OR (b.state IN ('granted', 'dispatched', 'cancelling') AND h.state <> 'open')",
];

impl Ledger {
    /// Every drift found; empty means the ledger is exact.
    pub async fn audit(&self) -> Result<Vec<Drift>> {
        let drift = self
            .retrying("audit", || async {
                let mut client = self.pool.get().await?;
                // One snapshot for every check, so a concurrent settle cannot look like drift.
                let tx = client
                    .build_transaction()
                    .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                    .read_only(true)
                    .start()
                    .await?;
                let mut drift = Vec::new();
                for check in CHECKS {
                    for row in tx.query(*check, &[]).await? {
                        drift.push(Drift {
                            subject: row.get(0),
                            problem: row.get(1),
                        });
                    }
                }
                tx.commit().await?;
                Ok(drift)
            })
            .await?;
        crate::telemetry::record::drift(drift.len());
        Ok(drift)
    }
}
