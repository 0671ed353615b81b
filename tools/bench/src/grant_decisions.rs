//! Ledger decisions on accounts with one grant beside accounts with five,
//! in alternating rounds of the same run: what burning a batch down across
//! several grants costs the decision (one allocation and one journal row per
//! grant touched, the plan checked grant by grant).
//!
//! The burn-down is greedy: a hold empties the grants ahead of it before it
//! touches the next one, so a batch can only span two grants if the one in
//! front has less left than it costs. Every round therefore starts from the
//! same grants: each account takes [`PER_ROUND`] 10-credit batches, sized
//! against its grants so that every batch spans two or three of them, and
//! between rounds (off the clock) the batches are expired, which releases
//! their holds, so the front grants are whole again and no grant ever runs
//! out. The one-grant accounts go through exactly the same rounds.

use std::time::{Duration, Instant};

use holdfast_common::config::Connections;
use holdfast_common::database;
use holdfast_common::ledger::{GrantSource, GrantSpec, Ledger, ReserveInput};
use holdfast_common::messages::{BatchRequest, Decision};

use crate::requests::request;

/// Batches each account decides per round, one per transaction.
pub(crate) const PER_ROUND: usize = 3;

/// The five grants of a multi-grant account, in burn-down order, for batches
/// of 10 credits: (grant id, source, priority, expiry as a PostgreSQL
/// interval from now, amount). A round's three batches on the account draw
/// 6 from the promotion and 4 from the plan; 4 from the plan and 6 from the
/// top-up; 1 from the top-up, 5 from the manual grant and 4 from the last
/// purchase: 2, 2 and 3 grants, 7 draws in 3 decisions. The last grant never
/// runs low. The promotion expires within the batches' one-hour deadline, so
/// the first decision of a round also carries an expiry notice.
const FIVE: [(&str, GrantSource, i32, Option<&str>, i64); 5] = [
    (
        "promotion",
        GrantSource::Promotion,
        0,
        Some("50 minutes"),
        6,
    ),
    ("plan", GrantSource::Plan, 0, Some("30 days"), 8),
    ("top-up", GrantSource::Purchase, 1, Some("365 days"), 7),
    ("manual", GrantSource::Manual, 1, None, 5),
    ("purchase", GrantSource::Purchase, 2, None, 1_000_000_000),
];

/// The two sides, and what they measured.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct GrantRates {
    /// Decisions/s on accounts with one grant.
    pub one_per_s: f64,
    /// Decisions/s on accounts with five grants.
    pub five_per_s: f64,
    /// Grants a decision drew from, on average, on the five-grant accounts.
    pub five_draws_per_decision: f64,
    /// Decisions timed on each side.
    pub decisions: usize,
}

/// Alternate `rounds` rounds of each side (after one untimed warm-up
/// round of each), the side that goes first swapping every round, in a
/// database of their own (`<bench database>_grants`, removed afterwards).
/// In a round, `clients` tasks (the coordinator's consumers) each decide
/// [`PER_ROUND`] groups of `group` requests (its prefetch), one request per
/// account in a group, on `group` accounts of their own (so that no two
/// transactions wait for each other's accounts). Only the decisions are
/// timed.
pub(crate) async fn rates(
    conn: &Connections,
    rounds: usize,
    clients: usize,
    group: usize,
) -> anyhow::Result<GrantRates> {
    let url = format!("{}_grants", conn.database_url);
    database::drop_database(&url).await?;
    database::migrate(&url).await?;
    let ledger = Ledger::new(database::pool(&url, clients.max(1))?);
    let sides = [
        Side::new("one", clients, group, 1),
        Side::new("five", clients, group, 2),
    ];
    set_up(&ledger, &sides).await?;

    let (mut time, mut draws) = ([Duration::ZERO; 2], [0usize; 2]);
    for round in 0..=rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for s in order {
            let (elapsed, drawn) = decide_round(&ledger, &sides[s], round).await?;
            if round > 0 {
                time[s] += elapsed;
                draws[s] += drawn;
            }
        }
        release(&ledger, clients).await?;
    }
    let decisions = rounds * sides[0].decisions_per_round();
    anyhow::ensure!(
        decisions > 0,
        "grant bench: no decisions (--grant-rounds 0?)"
    );
    anyhow::ensure!(
        draws[0] == decisions,
        "grant bench: one-grant decisions drew {} grants for {decisions} decisions",
        draws[0]
    );
    let drift = ledger.audit().await?;
    anyhow::ensure!(drift.is_empty(), "grant bench: audit drift {drift:?}");
    drop(ledger);
    database::drop_database(&url).await?;
    Ok(GrantRates {
        one_per_s: decisions as f64 / time[0].as_secs_f64(),
        five_per_s: decisions as f64 / time[1].as_secs_f64(),
        five_draws_per_decision: draws[1] as f64 / decisions as f64,
        decisions,
    })
}

/// One kind of account: `accounts[c]` are client `c`'s.
struct Side {
    name: &'static str,
    accounts: Vec<Vec<String>>,
    /// Grants each decision must draw from, at least.
    min_draws: usize,
}

impl Side {
    fn new(name: &'static str, clients: usize, group: usize, min_draws: usize) -> Self {
        let accounts = (0..clients.max(1))
            .map(|c| {
                (0..group.max(1))
                    .map(|k| format!("{name}-{c}-{k}"))
                    .collect()
            })
            .collect();
        Self {
            name,
            accounts,
            min_draws,
        }
    }

    fn decisions_per_round(&self) -> usize {
        self.accounts.iter().map(Vec::len).sum::<usize>() * PER_ROUND
    }
}

/// One manual grant on each account of the first side; [`FIVE`] on each of
/// the second. One task per client, each on its own accounts.
async fn set_up(ledger: &Ledger, sides: &[Side; 2]) -> anyhow::Result<()> {
    let expiries: Vec<_> = {
        let client = ledger.pool().get().await?;
        let mut at = Vec::new();
        for (.., expiry, _) in FIVE {
            at.push(match expiry {
                Some(interval) => Some(
                    client
                        .query_one("SELECT now() + $1::text::interval", &[&interval])
                        .await?
                        .get(0),
                ),
                None => None,
            });
        }
        at
    };
    let mut tasks = Vec::new();
    for (one, five) in sides[0].accounts.iter().zip(&sides[1].accounts) {
        let (ledger, one, five, expiries) =
            (ledger.clone(), one.clone(), five.clone(), expiries.clone());
        tasks.push(tokio::spawn(async move {
            for a in &one {
                ledger.grant(a, 1_000_000_000, Some("bench"), true).await?;
            }
            for a in &five {
                for ((id, source, priority, _, amount), expires_at) in
                    FIVE.into_iter().zip(&expiries)
                {
                    let spec = GrantSpec {
                        grant_id: Some(id.into()),
                        amount,
                        source,
                        priority,
                        expires_at: *expires_at,
                        note: Some("bench".into()),
                    };
                    ledger.add_grant(a, &spec, true).await?;
                }
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// One round of `side`: each client decides its [`PER_ROUND`] groups in
/// turn. Returns the time from the first decision to the last, and the
/// grants drawn in all (each decision checked granted, and on five grants
/// drawn from two at least).
async fn decide_round(
    ledger: &Ledger,
    side: &Side,
    round: usize,
) -> anyhow::Result<(Duration, usize)> {
    let min_draws = side.min_draws;
    // Parsed before the clock starts, as in `ledger_decisions`.
    let work: Vec<Vec<Vec<BatchRequest>>> = side
        .accounts
        .iter()
        .enumerate()
        .map(|(c, accounts)| {
            (0..PER_ROUND)
                .map(|j| {
                    accounts
                        .iter()
                        .map(|a| {
                            let id = format!("{}-r{round}-c{c}-{j}-{a}", side.name);
                            serde_json::from_slice(&request(&id, a, 10, 1))
                                .expect("a valid request")
                        })
                        .collect()
                })
                .collect()
        })
        .collect();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for groups in work {
        let ledger = ledger.clone();
        tasks.push(tokio::spawn(async move {
            let mut drawn = 0;
            for requests in &groups {
                let inputs: Vec<ReserveInput> = requests
                    .iter()
                    .map(|request| ReserveInput {
                        request,
                        reply_to: None,
                        correlation_id: None,
                        execution_timeout: Duration::from_secs(3600),
                        dispatch_grace: Duration::from_secs(3600),
                        chunk_size: 10,
                    })
                    .collect();
                for r in ledger.reserve_many(&inputs).await {
                    let r = r?;
                    let Decision::Granted(g) = &r.decision else {
                        anyhow::bail!("a grant bench decision was not granted: {:?}", r.decision);
                    };
                    anyhow::ensure!(!r.replayed, "a grant bench decision was a replay");
                    anyhow::ensure!(
                        g.breakdown.len() >= min_draws,
                        "a grant bench decision drew from {} grant(s), not {min_draws} or more",
                        g.breakdown.len()
                    );
                    drawn += g.breakdown.len();
                }
            }
            anyhow::Ok(drawn)
        }));
    }
    let mut drawn = 0;
    for t in tasks {
        drawn += t.await??;
    }
    Ok((started.elapsed(), drawn))
}

/// Off the clock: bring every open batch's deadline forward and let the
/// reconciler's own close expire them (`clients` at a time, as several
/// reconcilers share the work), which releases their holds to the grants
/// they took from (nothing was captured), so the next round finds the grants
/// as the first one did.
async fn release(ledger: &Ledger, clients: usize) -> anyhow::Result<()> {
    ledger
        .pool()
        .get()
        .await?
        .execute(
            "UPDATE batches SET deadline_at = now() - interval '1 second' WHERE state = 'granted'",
            &[],
        )
        .await?;
    let mut tasks = Vec::new();
    for _ in 0..clients.max(1) {
        let ledger = ledger.clone();
        tasks.push(tokio::spawn(async move {
            while !ledger.expire_overdue(32).await?.is_empty() {}
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}
