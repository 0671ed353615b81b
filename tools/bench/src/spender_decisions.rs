//! Ledger decisions charged to a spender three levels deep (a team, a
//! member of it, a key of the member, each with a limit) beside plain
//! decisions on accounts without spenders, in alternating rounds of the same
//! run: what reading the spender path and charging every level costs the
//! decision. A third side combines both costs: accounts with four grants
//! ([`FOUR`], so that decisions burn down across two of them) charged to the
//! same three-level path.
//!
//! The first two sides have one grant per account and decide the same 10-credit
//! batches; between rounds (off the clock) the batches are expired, which
//! releases their holds at the account and at every spender level, so the
//! limits never bind.

use std::time::{Duration, Instant};

use holdfast_common::config::Connections;
use holdfast_common::database;
use holdfast_common::ledger::{GrantSource, GrantSpec, Ledger, ReserveInput, SpenderSpec};
use holdfast_common::messages::{BatchRequest, Decision, LimitPeriod};

use crate::requests::request;

/// Batches each account decides per round, one group per transaction.
pub(crate) const PER_ROUND: usize = 3;

/// The four grants of a combined account, in burn-down order, for batches
/// of 10 credits: (grant id, source, priority, amount). A round's three
/// batches draw 8 + 2, then 5 + 3 + 2, then 10 credits: 2, 3 and 1 grants
/// (6 draws in 3 decisions). The last grant never runs low.
const FOUR: [(&str, GrantSource, i32, i64); 4] = [
    ("plan", GrantSource::Plan, 0, 8),
    ("top-up", GrantSource::Purchase, 1, 7),
    ("manual", GrantSource::Manual, 1, 3),
    ("purchase", GrantSource::Purchase, 2, 1_000_000_000),
];

/// The three sides, and what they measured.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SpenderRates {
    /// Decisions/s on accounts without spenders.
    pub plain_per_s: f64,
    /// Decisions/s charged to a key under a member under a team.
    pub three_level_per_s: f64,
    /// Decisions/s on accounts with four grants, charged to the same path.
    pub four_grants_three_level_per_s: f64,
    /// Decisions timed on each side.
    pub decisions: usize,
}

/// Alternate `rounds` rounds of each side (after one untimed warm-up round
/// of each), the order rotating every round, in a database
/// of their own (`<bench database>_spenders`, removed afterwards). In a
/// round, `clients` tasks each decide [`PER_ROUND`] groups of `group`
/// requests, one per account, on accounts of their own.
pub(crate) async fn rates(
    conn: &Connections,
    rounds: usize,
    clients: usize,
    group: usize,
) -> anyhow::Result<SpenderRates> {
    let url = format!("{}_spenders", conn.database_url);
    database::drop_database(&url).await?;
    database::migrate(&url).await?;
    let ledger = Ledger::new(database::pool(&url, clients.max(1))?);
    let sides = [
        Side::new("plain", clients, group, None, false),
        Side::new("tree", clients, group, Some("key"), false),
        Side::new("four", clients, group, Some("key"), true),
    ];
    set_up(&ledger, &sides).await?;

    let mut time = [Duration::ZERO; 3];
    for round in 0..=rounds {
        let order = [round % 3, (round + 1) % 3, (round + 2) % 3];
        for s in order {
            let elapsed = decide_round(&ledger, &sides[s], round).await?;
            if round > 0 {
                time[s] += elapsed;
            }
        }
        release(&ledger, clients).await?;
    }
    let decisions = rounds * sides[0].decisions_per_round();
    anyhow::ensure!(
        decisions > 0,
        "spender bench: no decisions (--grant-rounds 0?)"
    );
    let drift = ledger.audit().await?;
    anyhow::ensure!(drift.is_empty(), "spender bench: audit drift {drift:?}");
    drop(ledger);
    database::drop_database(&url).await?;
    Ok(SpenderRates {
        plain_per_s: decisions as f64 / time[0].as_secs_f64(),
        three_level_per_s: decisions as f64 / time[1].as_secs_f64(),
        four_grants_three_level_per_s: decisions as f64 / time[2].as_secs_f64(),
        decisions,
    })
}

/// One kind of account: `accounts[c]` are client `c`'s; requests name
/// `spender`; `four_grants`: [`FOUR`] on each account instead of one grant.
struct Side {
    name: &'static str,
    accounts: Vec<Vec<String>>,
    spender: Option<&'static str>,
    four_grants: bool,
}

impl Side {
    fn new(
        name: &'static str,
        clients: usize,
        group: usize,
        spender: Option<&'static str>,
        four_grants: bool,
    ) -> Self {
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
            spender,
            four_grants,
        }
    }

    fn decisions_per_round(&self) -> usize {
        self.accounts.iter().map(Vec::len).sum::<usize>() * PER_ROUND
    }
}

/// One grant on every account of the first two sides, [`FOUR`] on the
/// third; on the second and third, the team → member → key path with limits
/// that never bind (a month, a week, a day). One task per client.
async fn set_up(ledger: &Ledger, sides: &[Side; 3]) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for c in 0..sides[0].accounts.len() {
        let ledger = ledger.clone();
        let mine: Vec<(Vec<String>, bool, bool)> = sides
            .iter()
            .map(|s| (s.accounts[c].clone(), s.spender.is_some(), s.four_grants))
            .collect();
        tasks.push(tokio::spawn(async move {
            for (accounts, spender, four) in &mine {
                for a in accounts {
                    if *four {
                        for (id, source, priority, amount) in FOUR {
                            let spec = GrantSpec {
                                grant_id: Some(id.into()),
                                amount,
                                source,
                                priority,
                                expires_at: None,
                                note: Some("bench".into()),
                            };
                            ledger.add_grant(a, &spec, true).await?;
                        }
                    } else {
                        ledger.grant(a, 1_000_000_000, Some("bench"), true).await?;
                    }
                    if *spender {
                        put_path(&ledger, a).await?;
                    }
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

/// The team → member → key path on account `a`.
async fn put_path(ledger: &Ledger, a: &str) -> anyhow::Result<()> {
    for (id, parent, period) in [
        ("team", None, LimitPeriod::Month),
        ("member", Some("team"), LimitPeriod::Week),
        ("key", Some("member"), LimitPeriod::Day),
    ] {
        let spec = SpenderSpec {
            parent: parent.map(str::to_string),
            kind: Some(id.into()),
            limit: Some(100_000_000),
            period,
            anchor: None,
        };
        ledger.put_spender(a, id, &spec).await?;
    }
    Ok(())
}

/// One round of `side`: each client decides its [`PER_ROUND`] groups in
/// turn, every decision checked granted. Returns the time from the first
/// decision to the last.
async fn decide_round(ledger: &Ledger, side: &Side, round: usize) -> anyhow::Result<Duration> {
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
                            let mut r: BatchRequest =
                                serde_json::from_slice(&request(&id, a, 10, 1))
                                    .expect("a valid request");
                            r.spender_id = side.spender.map(str::to_string);
                            r
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
                    anyhow::ensure!(
                        matches!(r.decision, Decision::Granted(_)) && !r.replayed,
                        "a spender bench decision was not a fresh grant: {:?}",
                        r.decision
                    );
                }
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(started.elapsed())
}

/// Off the clock: expire every open batch (as the reconciler does past a
/// deadline), which releases its hold at the account and at every spender.
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
