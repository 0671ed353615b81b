//! Which grants a batch draws from, and the words for it.
//!
//! The ledger reads an account's spendable grants in burn-down order (the
//! same order `holdfast_take` applies in the database); [`draw`] takes an
//! amount from them in that order, so a preview, a decision and the hold
//! it records name the same grants. [`describe`] and [`expiry_notice`] turn
//! a draw into the sentences a person reads.

use chrono::{DateTime, Datelike, Utc};

use crate::messages::{Draw, GrantSource};
use crate::pricing::thousands;

/// What one grant can give now: its credits not yet held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pot {
    pub grant_id: String,
    pub source: GrantSource,
    pub expires_at: Option<DateTime<Utc>>,
    pub free: i64,
}

/// The credits a set of pots can give.
pub fn available(pots: &[Pot]) -> i64 {
    pots.iter().map(|p| p.free.max(0)).sum()
}

/// Take `amount` from `pots` in their order (burn-down order), lowering each
/// pot by what it gave; stops when the pots run dry.
pub fn draw(pots: &mut [Pot], amount: i64) -> Vec<Draw> {
    let mut need = amount.max(0);
    let mut draws = Vec::new();
    for pot in pots.iter_mut() {
        if need == 0 {
            break;
        }
        let part = need.min(pot.free.max(0));
        if part == 0 {
            continue;
        }
        pot.free -= part;
        need -= part;
        draws.push(Draw {
            grant_id: pot.grant_id.clone(),
            source: pot.source,
            amount: part,
            expires_at: pot.expires_at.map(crate::ledger::rfc3339),
        });
    }
    draws
}

/// What the same draw would be, without taking it.
pub fn would_draw(pots: &[Pot], amount: i64) -> Vec<Draw> {
    draw(&mut pots.to_vec(), amount)
}

/// "80 from your plan allowance (resets on 1 January), 40 from top-ups":
/// each source and expiry day once, in the order they are used. Empty when
/// there is nothing to explain: every credit is a plain granted one (manual,
/// never expiring), as on an account from before grants.
pub fn describe(draws: &[Draw], now: DateTime<Utc>) -> String {
    if draws
        .iter()
        .all(|d| d.source == GrantSource::Manual && d.expires_at.is_none())
    {
        return String::new();
    }
    let mut parts: Vec<(GrantSource, Option<String>, i64)> = Vec::new();
    for d in draws {
        let day = expiry(d).map(|t| day(t, now));
        match parts
            .iter_mut()
            .find(|(s, e, _)| *s == d.source && *e == day)
        {
            Some(p) => p.2 += d.amount,
            None => parts.push((d.source, day, d.amount)),
        }
    }
    parts
        .iter()
        .map(|(source, day, amount)| {
            let what = match (source, day) {
                (GrantSource::Plan, Some(d)) => format!("your plan allowance (resets on {d})"),
                (GrantSource::Plan, None) => "your plan credits".to_string(),
                (GrantSource::Purchase, Some(d)) => format!("top-ups (expire on {d})"),
                (GrantSource::Purchase, None) => "top-ups".to_string(),
                (GrantSource::Promotion, Some(d)) => {
                    format!("promotional credits (expire on {d})")
                }
                (GrantSource::Promotion, None) => "promotional credits".to_string(),
                (GrantSource::Manual, Some(d)) => format!("granted credits (expire on {d})"),
                (GrantSource::Manual, None) => "granted credits".to_string(),
            };
            format!("{} from {what}", thousands(*amount))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// When credits of the draw expire before `deadline`: "40 of these credits
/// expire on 12 December, before this batch's deadline; the batch keeps what
/// it holds until it finishes, and what it leaves unused then expires."
pub fn expiry_notice(
    draws: &[Draw],
    deadline: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Option<String> {
    let early: Vec<(i64, DateTime<Utc>)> = draws
        .iter()
        .filter_map(|d| Some((d.amount, expiry(d)?)))
        .filter(|(_, t)| *t < deadline)
        .collect();
    let first = early.iter().map(|(_, t)| *t).min()?;
    let credits: i64 = early.iter().map(|(a, _)| a).sum();
    Some(format!(
        "{} of these credits expire{} on {}, before this batch's deadline; the batch keeps what it holds until it finishes, and what it leaves unused then expires.",
        thousands(credits),
        if early.len() > 1 { " from" } else { "" },
        day(first, now)
    ))
}

fn expiry(d: &Draw) -> Option<DateTime<Utc>> {
    d.expires_at
        .as_deref()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
}

/// "1 January" this year, "1 January 2028" another year (UTC).
pub(crate) fn day(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    if t.year() == now.year() {
        t.format("%-d %B").to_string()
    } else {
        t.format("%-d %B %Y").to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pot(id: &str, source: GrantSource, expires: Option<&str>, free: i64) -> Pot {
        Pot {
            grant_id: id.into(),
            source,
            expires_at: expires
                .map(|t| DateTime::parse_from_rfc3339(t).unwrap().with_timezone(&Utc)),
            free,
        }
    }

    #[test]
    fn draws_in_order_and_says_where_from() {
        let now = DateTime::parse_from_rfc3339("2026-12-04T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let mut pots = vec![
            pot("plan", GrantSource::Plan, Some("2027-01-01T00:00:00Z"), 80),
            pot("topup", GrantSource::Purchase, None, 100),
            pot("manual", GrantSource::Manual, None, 5),
        ];
        assert_eq!(available(&pots), 185);
        let draws = draw(&mut pots, 120);
        assert_eq!(
            draws
                .iter()
                .map(|d| (d.grant_id.as_str(), d.amount))
                .collect::<Vec<_>>(),
            [("plan", 80), ("topup", 40)]
        );
        assert_eq!((pots[0].free, pots[1].free, pots[2].free), (0, 60, 5));
        assert_eq!(
            describe(&draws, now),
            "80 from your plan allowance (resets on 1 January 2027), 40 from top-ups"
        );
        let deadline = DateTime::parse_from_rfc3339("2027-01-02T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            expiry_notice(&draws, deadline, now).as_deref(),
            Some("80 of these credits expire on 1 January 2027, before this batch's deadline; the batch keeps what it holds until it finishes, and what it leaves unused then expires.")
        );
        assert_eq!(expiry_notice(&draws, now, now), None);
        // More than the pots hold: what there is.
        let rest = draw(&mut pots, 1_000);
        assert_eq!(rest.iter().map(|d| d.amount).sum::<i64>(), 65);
        assert_eq!(available(&pots), 0);
    }
}
