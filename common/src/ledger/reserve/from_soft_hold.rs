//! Reserving from a soft hold: the batch consumes a hold taken earlier.

use uuid::Uuid;

use super::super::{Cached, HoldState, LedgerError, Result};
use crate::messages::{Draw, LeftOut, Mode};
use crate::pricing::{self};

use super::rows::{insert_batches, insert_items, write_decisions, NewBatch, NewGrant};
use super::{rfc3339, ReserveInput, Reserved};

/// Grant a batch from a soft hold: no second credit check, provided the hold
/// is still open, belongs to the account, is not used yet, and holds exactly
/// what the batch costs. A hold past its TTL is expired here and now (its
/// credits released once) and the batch refused: when a start races an
/// expiry, the hold's row lock lets exactly one of them win.
pub(super) async fn consume_reservation(
    tx: deadpool_postgres::Transaction<'_>,
    input: &ReserveInput<'_>,
    fingerprint: &[u8],
    reservation: &str,
) -> Result<Reserved> {
    let req = input.request;
    let refuse = |why: String| Err(LedgerError::Reservation(why));
    let Ok(hold_id) = reservation.parse::<Uuid>() else {
        return refuse(format!("`{reservation}` is not a reservation id"));
    };
    // Hold row first, then the account: the lock order of every transaction.
    let Some(row) = tx
        .query_opt(
            "SELECT account_id, amount, state, expires_at IS NOT NULL, expires_at <= now(),
                    to_char(COALESCE(expires_at, closed_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')
             FROM holds WHERE id = $1 FOR UPDATE",
            &[&hold_id],
        )
        .await?
    else {
        return refuse(format!("no reservation `{reservation}`"));
    };
    let (account, amount, state): (String, i64, HoldState) = (row.get(0), row.get(1), row.get(2));
    let (soft, past_ttl, when): (bool, Option<bool>, Option<String>) =
        (row.get(3), row.get(4), row.get(5));
    let when = when.unwrap_or_default();
    if account != req.account_id {
        return refuse(format!(
            "reservation `{reservation}` belongs to another account"
        ));
    }
    match (state, soft, past_ttl) {
        (HoldState::Open, true, Some(true)) => {
            let released = super::super::expire::expire_locked(&tx, &[hold_id]).await?;
            tx.commit().await?;
            for amount in released {
                crate::telemetry::record::soft_hold("expired", amount);
            }
            return refuse(format!(
                "reservation `{reservation}` expired at {when}; its credits were released"
            ));
        }
        (HoldState::Open, true, _) => {}
        (HoldState::Open, false, _) => {
            return refuse(format!(
                "reservation `{reservation}` is already used by a batch"
            ))
        }
        (HoldState::Expired, ..) => {
            return refuse(format!(
                "reservation `{reservation}` expired at {when}; its credits were released"
            ))
        }
        (other, ..) => return refuse(format!("reservation `{reservation}` is {other}")),
    }
    if !matches!(req.mode, Mode::AllOrNothing | Mode::Selected) {
        return refuse("a reservation can start only an all_or_nothing or selected batch".into());
    }
    tx.query_one_cached(
        "SELECT 1 FROM accounts WHERE id = $1 FOR NO KEY UPDATE",
        &[&req.account_id],
    )
    .await?;
    // The hold counts against the spenders it was charged to: the batch must
    // name the same one (or none, when the hold has none).
    let charged: Option<String> = tx
        .query_opt(
            "SELECT spender_id FROM hold_spenders WHERE hold_id = $1 ORDER BY depth DESC LIMIT 1",
            &[&hold_id],
        )
        .await?
        .map(|r| r.get(0));
    if charged != req.spender_id {
        return refuse(match (&charged, &req.spender_id) {
            (Some(c), _) => format!(
                "reservation `{reservation}` is charged to spender `{c}`; the batch must name spender_id `{c}`"
            ),
            (None, _) => format!(
                "reservation `{reservation}` is charged to no spender; the batch must not name a spender_id"
            ),
        });
    }
    let run = pricing::requested(req);
    let total = pricing::cost_of(&req.items, &run);
    if total != amount {
        return refuse(format!(
            "the batch costs {total} credits but reservation `{reservation}` holds {amount}; \
             reserve exactly the batch's total"
        ));
    }
    // The hold is the batch's now: no TTL any more, the execution deadline applies.
    tx.execute_cached(
        "UPDATE holds SET expires_at = NULL WHERE id = $1",
        &[&hold_id],
    )
    .await?;
    let left_out = (0..req.items.len())
        .filter(|i| run.binary_search(i).is_err())
        .map(|i| LeftOut {
            item_id: req.items[i].item_id.clone(),
            reason: "not_selected".into(),
        })
        .collect();
    let item_ids = run.iter().map(|&i| req.items[i].item_id.clone()).collect();
    let mut grant = NewGrant::new(input, hold_id, total, run);
    grant.existing_hold = true;
    // What the soft hold took, grant by grant, is what the batch draws.
    grant.draws = tx
        .query_cached(
            "SELECT al.grant_id, g.source, g.expires_at, al.amount
             FROM hold_allocations al
             JOIN grants g ON g.account_id = al.account_id AND g.id = al.grant_id
             WHERE al.hold_id = $1
             ORDER BY g.priority, g.expires_at NULLS LAST, g.source_rank, g.effective_at, g.id",
            &[&hold_id],
        )
        .await?
        .iter()
        .map(|r| Draw {
            grant_id: r.get(0),
            source: r.get::<_, String>(1).parse().unwrap_or_default(),
            expires_at: r
                .get::<_, Option<chrono::DateTime<chrono::Utc>>>(2)
                .map(rfc3339),
            amount: r.get(3),
        })
        .collect();
    let batch = NewBatch::granted(input, fingerprint, grant, item_ids, left_out);
    insert_batches(&tx, std::slice::from_ref(&batch)).await?;
    insert_items(&tx, std::slice::from_ref(&batch)).await?;
    write_decisions(&tx, std::slice::from_ref(&batch)).await?;
    tx.commit().await?;
    Ok(Reserved {
        decision: batch.decision,
        replayed: false,
        needs_dispatch: true,
        dispatch_now: batch.grant.map(|g| g.run).unwrap_or_default(),
    })
}
