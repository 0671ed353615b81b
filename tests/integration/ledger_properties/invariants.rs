//! The invariants of the design, checked with SQL of this test (not the
//! ledger's), then against the model, then by the ledger's own audit.

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use chrono::{DateTime, Utc};

use super::ledger::{offset, Real};
use super::model::{Model, SState};

/// Every invariant of the design for `account`, in SQL of this test; then the
/// model's balances and states; then the ledger's own audit of the database.
pub async fn check(real: &Real<'_>, model: &Model) -> Result<(), TestCaseError> {
    let (db, a) = (real.db, real.account);
    let q = |sql: &'static str| async move {
        db.query(sql, &[&a])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    };
    let rows = q("SELECT balance, held FROM accounts WHERE id = $1").await;
    let row = &rows[0];
    let (balance, held): (i64, i64) = (row.get(0), row.get(1));
    prop_assert!(
        held >= 0 && balance - held >= 0,
        "balance {balance}, held {held}"
    );
    prop_assert_eq!(
        (balance, held),
        (model.balance(), model.held()),
        "balance and held vs the model"
    );

    // Every grant as the model has it: what is left, what holds took, its state.
    let rows = q("SELECT id, remaining, held, state FROM grants WHERE account_id = $1").await;
    let mut got: Vec<(String, i64, i64, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    got.sort();
    let mut want: Vec<(String, i64, i64, String)> = model
        .grants
        .iter()
        .map(|g| {
            (
                g.id.clone(),
                g.remaining,
                g.held,
                g.state.as_str().to_string(),
            )
        })
        .collect();
    want.sort();
    prop_assert_eq!(got, want, "grants vs the model");
    for g in &model.grants {
        prop_assert!(
            g.held >= 0 && g.held <= g.remaining,
            "grant {} held {} remaining {}",
            g.id,
            g.held,
            g.remaining
        );
    }
    let negative: i64 =
        q("SELECT count(*) FROM grants WHERE account_id = $1 AND (remaining < 0 OR held < 0)")
            .await[0]
            .get(0);
    prop_assert_eq!(negative, 0, "grants with negative remaining or held");
    // What a new hold may take: grants past their expiry (ended periods
    // awaiting their rollover too) count for nothing.
    let available: i64 = q("SELECT holdfast_available($1)").await[0].get(0);
    prop_assert!(available >= 0, "available {}", available);
    prop_assert_eq!(available, model.available(), "available vs the model");

    allowances(real, model).await?;

    // Balances equal the journal; held equals the open holds.
    let rows = q(
        "SELECT COALESCE(sum(balance_delta), 0)::int8, COALESCE(sum(held_delta), 0)::int8
                  FROM journal WHERE account_id = $1",
    )
    .await;
    let row = &rows[0];
    prop_assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i64>(1)),
        (balance, held),
        "journal sums"
    );
    // Credits granted (allowance periods included, rollovers not), moved by
    // rollovers (out of one grant and into another: the balance does not
    // change), and expired or voided: what the model counted.
    let rows = q("SELECT COALESCE(sum(amount) FILTER (WHERE kind = 'grant'), 0)::int8,
                         COALESCE(sum(amount) FILTER (WHERE kind = 'rollover' AND balance_delta > 0), 0)::int8,
                         COALESCE(sum(balance_delta) FILTER (WHERE kind = 'rollover'), 0)::int8,
                         COALESCE(sum(amount) FILTER (WHERE kind IN ('grant_expire', 'void')), 0)::int8
                  FROM journal WHERE account_id = $1")
    .await;
    let row = &rows[0];
    prop_assert_eq!(
        (
            row.get::<_, i64>(0),
            row.get::<_, i64>(1),
            row.get::<_, i64>(2),
            row.get::<_, i64>(3)
        ),
        (model.granted, model.rolled, 0, model.lost),
        "journal: granted, rolled over (in), rolled over (net), expired or voided"
    );
    let open: i64 = q(
        "SELECT COALESCE(sum(amount), 0)::int8 FROM holds WHERE account_id = $1 AND state = 'open'",
    )
    .await[0]
        .get(0);
    prop_assert_eq!(open, held, "held vs open holds");

    // Per hold: amount = captured + released + open; resolved exactly once:
    // at most one settle and one release (or expiry) per grant it took from,
    // and at least one of them once it is resolved.
    let bad = q("SELECT h.id::text, h.state, h.amount, h.captured, h.released,
                        (SELECT COALESCE(max(n), 0) FROM (SELECT count(*) n FROM journal j
                            WHERE j.hold_id = h.id AND j.kind IN ('release', 'expire', 'grant_expire', 'void')
                            GROUP BY j.grant_id) x),
                        (SELECT COALESCE(max(n), 0) FROM (SELECT count(*) n FROM journal j
                            WHERE j.hold_id = h.id AND j.kind = 'settle' GROUP BY j.grant_id) x),
                        (SELECT count(*) FROM journal j WHERE j.hold_id = h.id
                            AND j.kind IN ('release', 'expire', 'grant_expire', 'void', 'settle'))
                 FROM holds h WHERE h.account_id = $1")
    .await;
    for r in &bad {
        let (id, state, amount, captured, released): (String, String, i64, i64, i64) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        let (resolutions, settles, rows): (i64, i64, i64) = (r.get(5), r.get(6), r.get(7));
        let open_part = if state == "open" {
            amount - captured
        } else {
            0
        };
        prop_assert!(
            amount == captured + released + open_part
                && captured <= amount
                && (state != "open" || released == 0),
            "hold {} {}: amount {} captured {} released {}",
            id,
            state,
            amount,
            captured,
            released
        );
        let once = if state == "open" {
            rows == 0
        } else {
            resolutions <= 1 && settles <= 1 && rows >= 1
        };
        prop_assert!(
            once,
            "hold {} {} resolved {} times ({} settles)",
            id,
            state,
            resolutions,
            settles
        );
    }

    // Per batch: the hold's captures are its items'; a closed batch is settled and its hold resolved.
    let batches = q("SELECT b.id, b.state, h.state, h.captured, h.amount,
                            (SELECT COALESCE(sum(captured), 0)::int8 FROM items i WHERE i.batch_id = b.id),
                            (SELECT count(*) FROM items i WHERE i.batch_id = b.id AND i.state IN ('pending', 'queued'))
                     FROM batches b LEFT JOIN holds h ON h.id = b.hold_id WHERE b.account_id = $1")
    .await;
    for r in &batches {
        let (id, state, hold_state): (String, String, Option<String>) =
            (r.get(0), r.get(1), r.get(2));
        let (hold_captured, items_captured, unsettled): (Option<i64>, i64, i64) =
            (r.get(3), r.get(5), r.get(6));
        if state == "denied" {
            prop_assert!(
                hold_state.is_none() && items_captured == 0,
                "denied batch {} holds something",
                id
            );
            continue;
        }
        prop_assert_eq!(
            hold_captured,
            Some(items_captured),
            "batch {} hold vs items captured",
            id
        );
        if matches!(state.as_str(), "completed" | "expired" | "cancelled") {
            prop_assert!(
                unsettled == 0 && hold_state.as_deref() == Some("closed"),
                "closed batch {} ({}) has {} unsettled items, hold {:?}",
                id,
                state,
                unsettled,
                hold_state
            );
        } else {
            prop_assert_eq!(
                hold_state.as_deref(),
                Some("open"),
                "running batch {} hold",
                id
            );
        }
        // The model's view of the batch and its items.
        let m = &model.batches[model.batch_ix(&id).expect("a batch the model knows")];
        prop_assert_eq!(&state, &m.state, "state of batch {}", id);
        prop_assert_eq!(
            r.get::<_, Option<i64>>(4),
            Some(m.amount),
            "hold amount of batch {}",
            id
        );
        let items = db
            .query(
                "SELECT item_id, state, captured FROM items WHERE batch_id = $1 ORDER BY position",
                &[&id],
            )
            .await
            .unwrap();
        let got: Vec<(String, String, i64)> = items
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        let want: Vec<(String, String, i64)> = m
            .items
            .iter()
            .map(|i| (i.id.clone(), i.state.as_str().to_string(), i.captured))
            .collect();
        prop_assert_eq!(got, want, "items of batch {}", id);
    }
    prop_assert_eq!(batches.len(), model.batches.len(), "batches recorded");

    // Each item captured at most once, and its capture row is its charge.
    let twice: i64 = q("SELECT count(*) FROM (SELECT batch_id, item_id FROM journal
                         WHERE account_id = $1 AND kind = 'capture' GROUP BY 1, 2 HAVING count(*) > 1) t")
    .await[0]
    .get(0);
    prop_assert_eq!(twice, 0, "items captured twice");
    let mismatched: i64 = q("SELECT count(*) FROM items i JOIN batches b ON b.id = i.batch_id
                              LEFT JOIN journal j ON j.batch_id = i.batch_id AND j.item_id = i.item_id AND j.kind = 'capture'
                              WHERE b.account_id = $1
                                AND ((i.state = 'succeeded') <> (j.id IS NOT NULL) OR COALESCE(j.amount, 0) <> i.captured)")
    .await[0]
    .get(0);
    prop_assert_eq!(
        mismatched,
        0,
        "items whose capture row disagrees with the item"
    );

    // Soft holds.
    for s in &model.softs {
        let id: uuid::Uuid = s.id.parse().unwrap();
        let state: String = db
            .query_one("SELECT state FROM holds WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        let want = match s.state {
            SState::Open | SState::Consumed => "open",
            SState::Closed => "closed",
            SState::Expired => "expired",
        };
        prop_assert_eq!(state.as_str(), want, "soft hold {} ({:?})", s.id, s.state);
    }

    // The ledger's own audit, of the whole database: nothing new since the
    // case began (an earlier failing case, while shrinking, leaves its drift).
    let drift: Vec<_> = real
        .ledger
        .audit()
        .await
        .unwrap()
        .into_iter()
        .filter(|d| !real.drift_before.contains(d))
        .collect();
    prop_assert!(drift.is_empty(), "audit: {:?}", drift);
    Ok(())
}

/// Allowances: each period's grant exactly once; the grants each allowance
/// issued (amount, period, effective and expiry times), the allowances and
/// their terms as the model has them.
async fn allowances(real: &Real<'_>, model: &Model) -> Result<(), TestCaseError> {
    let (db, a, t0) = (real.db, real.account, model.t0);
    let at = |t: DateTime<Utc>| offset(t0, t);
    let twice: i64 = db
        .query_one(
            "SELECT count(*) FROM (SELECT 1 FROM grants
                 WHERE account_id = $1 AND period_start IS NOT NULL
                 GROUP BY allowance_id, period_start HAVING count(*) <> 1) x",
            &[&a],
        )
        .await
        .unwrap()
        .get(0);
    prop_assert_eq!(twice, 0, "allowance periods issued more than once");

    type Issued = (String, String, i64, Option<i64>, i64, i64);
    let rows = db
        .query(
            "SELECT id, allowance_id, amount, period_start, effective_at, expires_at FROM grants
             WHERE account_id = $1 AND allowance_id IS NOT NULL ORDER BY id",
            &[&a],
        )
        .await
        .unwrap();
    let got: Vec<Issued> = rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                r.get(1),
                r.get(2),
                r.get::<_, Option<DateTime<Utc>>>(3).map(at),
                at(r.get(4)),
                at(r.get(5)),
            )
        })
        .collect();
    let mut want: Vec<Issued> = model
        .grants
        .iter()
        .filter_map(|g| {
            let al = &model.allowances[g.allowance?];
            let (expires, effective) = g.times();
            Some((
                g.id.clone(),
                al.id.clone(),
                g.amount,
                g.period_start,
                effective,
                expires,
            ))
        })
        .collect();
    want.sort();
    prop_assert_eq!(got, want, "allowance grants vs the model");

    type Row = (String, i64, i64, String, Option<i64>);
    let rows = db
        .query(
            "SELECT id, anchor, next_period_start, state, stops_at FROM allowances
             WHERE account_id = $1 ORDER BY id",
            &[&a],
        )
        .await
        .unwrap();
    let got: Vec<Row> = rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                at(r.get(1)),
                at(r.get(2)),
                r.get(3),
                r.get::<_, Option<DateTime<Utc>>>(4).map(at),
            )
        })
        .collect();
    let want: Vec<Row> = model
        .allowances
        .iter()
        .map(|al| {
            (
                al.id.clone(),
                al.anchor,
                al.next,
                al.view().state,
                al.stops_at,
            )
        })
        .collect();
    prop_assert_eq!(got, want, "allowances vs the model");

    type Terms = (String, i64, i64, String, i64, i64);
    let rows = db
        .query(
            "SELECT allowance_id, effective_from, amount, period, anchor, rollover_cap
             FROM allowance_terms WHERE account_id = $1 ORDER BY allowance_id, effective_from",
            &[&a],
        )
        .await
        .unwrap();
    let got: Vec<Terms> = rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                at(r.get(1)),
                r.get(2),
                r.get(3),
                at(r.get(4)),
                r.get(5),
            )
        })
        .collect();
    let want: Vec<Terms> = model
        .allowances
        .iter()
        .flat_map(|al| {
            al.terms.iter().map(|t| {
                (
                    al.id.clone(),
                    t.from,
                    t.amount,
                    t.period.as_str().to_string(),
                    t.grid,
                    t.cap,
                )
            })
        })
        .collect();
    prop_assert_eq!(got, want, "allowance terms vs the model");
    Ok(())
}
