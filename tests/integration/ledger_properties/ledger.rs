//! The real ledger: each call of the model made on PostgreSQL, its answer
//! reduced to what the model predicts, and the test's control of time.

use std::time::Duration;

use chrono::{DateTime, Utc};
use holdfast_common::ledger::{
    Allowance, AllowanceSpec, ClosedBatch, GrantSpec, ItemOutcome, Ledger, LedgerError,
    ReserveInput, Reserved, SettleReport, Settlement,
};
use holdfast_common::messages::{BatchRequest, Decision, ItemRequest, Mode, SCHEMA_VERSION};
use serde_json::Value;
use tokio_postgres::Client;

use super::model::{error_kind, AView, Call, Model, Obs, Outcome, CHUNK};
use crate::support::reserve_input;

/// Deadlines and TTLs of the test: they pass only when the test says so.
const LONG: Duration = Duration::from_secs(3600);

pub struct Real<'a> {
    pub ledger: &'a Ledger,
    pub db: &'a Client,
    pub account: &'a str,
    /// The origin of the model's time (`Model::t0`).
    pub t0: DateTime<Utc>,
    /// What the audit found before this case began.
    pub drift_before: Vec<holdfast_common::ledger::Drift>,
}

/// Seconds from `t0` to `at`; a time off the whole second matches nothing
/// the model predicts.
pub fn offset(t0: DateTime<Utc>, at: DateTime<Utc>) -> i64 {
    let ms = (at - t0).num_milliseconds();
    if ms % 1000 == 0 {
        ms / 1000
    } else {
        i64::MIN
    }
}

/// An allowance as the ledger showed it, in the model's time.
pub fn allowance_view(t0: DateTime<Utc>, a: &Allowance) -> AView {
    let at = |s: &str| {
        offset(
            t0,
            DateTime::parse_from_rfc3339(s)
                .unwrap_or_else(|e| panic!("{s}: {e}"))
                .with_timezone(&Utc),
        )
    };
    AView {
        anchor: at(&a.anchor),
        state: a.state.clone(),
        stops_at: a.stops_at.as_deref().map(at),
        next: a.next_period_start.as_deref().map(at),
        amount: a.amount,
        period: a.period,
        cap: a.rollover_cap,
        next_terms: a
            .next_terms
            .as_ref()
            .map(|n| (at(&n.effective_from), n.amount, n.period, n.rollover_cap)),
    }
}

pub fn ours(account: &str, closed: &[ClosedBatch]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = closed
        .iter()
        .filter(|c| c.account_id == account)
        .map(|c| (c.batch_id.clone(), c.state.to_string()))
        .collect();
    v.sort();
    v
}

pub fn decision_obs(r: Result<Reserved, LedgerError>) -> Obs {
    match r {
        Ok(r) => match r.decision {
            Decision::Granted(g) => Obs::Decision {
                kind: "granted".into(),
                reserved: g.reserved,
                run: g.item_ids,
                replayed: r.replayed,
            },
            Decision::Insufficient(_) => Obs::Decision {
                kind: "insufficient".into(),
                reserved: 0,
                run: vec![],
                replayed: r.replayed,
            },
            Decision::Rejected(r) => panic!("the ledger rejected a valid request: {r:?}"),
        },
        Err(e) => Obs::Refused(error_kind(&e)),
    }
}

impl Real<'_> {
    pub async fn apply(&self, model: &Model, call: &Call) -> Obs {
        let l = self.ledger;
        match call {
            Call::Grant(t) => {
                let grant_id = format!("g{}", model.grants.len());
                let spec = GrantSpec {
                    grant_id: Some(grant_id.clone()),
                    amount: t.amount,
                    source: t.source,
                    priority: t.priority,
                    expires_at: t
                        .hours
                        .map(|h| chrono::Utc::now() + chrono::Duration::hours(i64::from(h))),
                    note: Some("property".into()),
                };
                l.add_grant(self.account, &spec, false).await.unwrap();
                // Back-date every grant alike (their order stays), so that
                // the test can move an expiry into the past at once.
                self.db
                    .execute(
                        "UPDATE grants SET effective_at = effective_at - interval '10 days'
                         WHERE account_id = $1 AND id = $2",
                        &[&self.account, &grant_id],
                    )
                    .await
                    .unwrap();
                Obs::Done
            }
            Call::ExpireGrants => {
                l.expire_grants(10_000).await.unwrap();
                Obs::Done
            }
            Call::VoidGrant(g) => {
                let g = l
                    .void_grant(self.account, &model.grants[*g].id, None)
                    .await
                    .unwrap();
                Obs::Voided(g.state, g.remaining)
            }
            Call::Reserve(req) => decision_obs(l.reserve(&input(req)).await),
            Call::Replay(b) => decision_obs(l.reserve(&input(&model.batches[*b].request)).await),
            Call::Settle(items) => {
                let s: Vec<Settlement> = items
                    .iter()
                    .map(|(b, i, o)| settlement(model, *b, *i, o))
                    .collect();
                self.settled(l.settle(&s).await.unwrap())
            }
            Call::Cancel(b) => match l.cancel_batch(&model.batches[*b].request.batch_id).await {
                Ok(c) => Obs::Cancel(c.state.to_string()),
                Err(e) => Obs::Refused(error_kind(&e)),
            },
            Call::ExpireOverdue { .. } => {
                Obs::Closed(ours(self.account, &l.expire_overdue(1000).await.unwrap()))
            }
            Call::CloseFinished => {
                let (closed, advanced) = l.close_finished(1000).await.unwrap();
                assert!(
                    !advanced.iter().any(|b| b.starts_with(self.account)),
                    "close_finished advanced {advanced:?}: a settle should have"
                );
                Obs::Closed(ours(self.account, &closed))
            }
            Call::SoftHold(amount) => match l.reserve_soft(self.account, *amount, LONG).await {
                Ok(_) => Obs::Soft(Ok(())),
                Err(LedgerError::Insufficient {
                    requested,
                    available,
                }) => Obs::Soft(Err((requested, available))),
                Err(e) => panic!("soft hold: {e}"),
            },
            Call::ExpireSoft { .. } => Obs::Expired(l.expire_soft_holds(1000).await.unwrap()),
            Call::CancelSoft(s) => match l.cancel_soft(&model.softs[*s].id).await {
                Ok(r) => Obs::Reservation(r.state),
                Err(e) => Obs::Refused(error_kind(&e)),
            },
            Call::StartFromSoft(_, req) => decision_obs(l.reserve(&input(req)).await),
            Call::CreateAllowance(terms, anchor) => {
                let spec = AllowanceSpec {
                    allowance_id: Some(format!("a{}", model.allowances.len())),
                    terms: *terms,
                    anchor: Some(model.t0 + chrono::Duration::seconds(*anchor)),
                };
                self.allowance_obs(
                    l.create_allowance(self.account, &spec)
                        .await
                        .map(|a| (a.allowance, a.replayed)),
                )
            }
            Call::ReplayAllowance(a) => {
                let al = &model.allowances[*a];
                let spec = AllowanceSpec {
                    allowance_id: Some(al.id.clone()),
                    terms: al.created,
                    anchor: None,
                };
                self.allowance_obs(
                    l.create_allowance(self.account, &spec)
                        .await
                        .map(|a| (a.allowance, a.replayed)),
                )
            }
            Call::IssueAllowances { limit, .. } => {
                // One database per test, and what an earlier case left due
                // was issued before this case began: the total is this account's.
                let limit = limit.map_or(10_000, |n| n as i64);
                Obs::Issued(l.issue_allowances(limit).await.unwrap())
            }
            Call::ChangeAllowance(a, terms) => {
                let id = &model.allowances[*a].id;
                let r = l.change_allowance(self.account, id, terms).await;
                self.allowance_obs(r.map(|a| (a, false)))
            }
            Call::StopAllowance(a) => {
                let r = l
                    .stop_allowance(self.account, &model.allowances[*a].id)
                    .await;
                self.allowance_obs(r.map(|a| (a, false)))
            }
        }
    }

    fn allowance_obs(&self, r: Result<(Allowance, bool), LedgerError>) -> Obs {
        match r {
            Ok((a, replayed)) => Obs::Allowance(allowance_view(self.t0, &a), replayed),
            Err(e) => Obs::Refused(error_kind(&e)),
        }
    }

    /// Make allowance `id`'s current period end (or its first begin): move
    /// the allowance, its terms and every grant it issued `secs` seconds
    /// back, in one statement (see `Model::pass_period`).
    pub async fn pass_period(&self, id: &str, secs: i64) {
        self.db
            .execute(
                "WITH d AS (SELECT make_interval(secs => $3::int8::float8) AS d),
                 a AS (UPDATE allowances SET anchor = anchor - d.d,
                              next_period_start = next_period_start - d.d,
                              stops_at = stops_at - d.d
                       FROM d WHERE account_id = $1 AND id = $2 RETURNING 1),
                 t AS (UPDATE allowance_terms SET effective_from = effective_from - d.d,
                              anchor = anchor - d.d
                       FROM d WHERE account_id = $1 AND allowance_id = $2 RETURNING 1),
                 g AS (UPDATE grants SET effective_at = effective_at - d.d,
                              expires_at = expires_at - d.d,
                              period_start = period_start - d.d
                       FROM d WHERE account_id = $1 AND allowance_id = $2 RETURNING 1)
                 SELECT (SELECT count(*) FROM a), (SELECT count(*) FROM t), (SELECT count(*) FROM g)",
                &[&self.account, &id, &secs],
            )
            .await
            .unwrap();
    }

    pub fn settled(&self, r: SettleReport) -> Obs {
        let mut advanced = r.advanced;
        advanced.sort();
        Obs::Settled {
            results: r.results,
            closed: ours(self.account, &r.closed),
            advanced,
        }
    }

    /// Move a batch's execution deadline into the past (instead of waiting).
    pub async fn pass_deadline(&self, batch_id: &str) {
        self.db
            .execute(
                "UPDATE batches SET deadline_at = now() - interval '1 second' WHERE id = $1",
                &[&batch_id],
            )
            .await
            .unwrap();
    }

    /// Move a grant's expiry into the past.
    pub async fn pass_expiry(&self, grant_id: &str) {
        self.db
            .execute(
                "UPDATE grants SET expires_at = clock_timestamp() - interval '1 millisecond'
                 WHERE account_id = $1 AND id = $2",
                &[&self.account, &grant_id],
            )
            .await
            .unwrap();
    }

    /// Move a soft hold's TTL into the past.
    pub async fn pass_ttl(&self, id: &str) {
        let id: uuid::Uuid = id.parse().unwrap();
        self.db
            .execute(
                "UPDATE holds SET expires_at = now() - interval '1 second'
                 WHERE id = $1 AND expires_at IS NOT NULL",
                &[&id],
            )
            .await
            .unwrap();
    }
}

pub fn input(req: &BatchRequest) -> ReserveInput<'_> {
    let mut i = reserve_input(req, LONG, LONG);
    i.chunk_size = CHUNK;
    i
}

pub fn settlement(model: &Model, b: usize, i: usize, o: &Outcome) -> Settlement {
    let batch = &model.batches[b];
    Settlement {
        batch_id: batch.request.batch_id.clone(),
        item_id: batch
            .request
            .items
            .get(i)
            .map(|it| it.item_id.clone())
            .unwrap_or_default(),
        outcome: match o {
            Outcome::Cost(a) => ItemOutcome::Succeeded {
                actual_cost: Some(*a),
            },
            Outcome::NoCost => ItemOutcome::Succeeded { actual_cost: None },
            Outcome::Fail => ItemOutcome::Failed {
                reason: "generator failed".into(),
            },
            Outcome::Cancelled => ItemOutcome::Cancelled,
        },
    }
}

pub fn request(
    model: &Model,
    n: usize,
    mode: Mode,
    costs: &[i64],
    soft: Option<&str>,
) -> BatchRequest {
    BatchRequest {
        schema_version: SCHEMA_VERSION,
        batch_id: format!("{}-b{n}", model.account),
        account_id: model.account.clone(),
        items: costs
            .iter()
            .enumerate()
            .map(|(i, c)| ItemRequest {
                item_id: format!("i{i}"),
                estimated_cost: *c,
                priority: 0,
                payload: Value::Null,
            })
            .collect(),
        mode,
        item_ids: None,
        reservation_id: soft.map(str::to_string),
        spender_id: None,
    }
}

/// Split `amount` into 1 to 3 item costs.
pub fn split(amount: i64, parts: usize) -> Vec<i64> {
    let parts = (parts as i64).clamp(1, amount.min(3));
    let mut v = vec![amount / parts; parts as usize];
    v[0] += amount % parts;
    v
}
