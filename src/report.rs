//! Printing decisions, accounts, batches and audits for people (or as JSON).

use holdfast_common::ledger::{Account, BatchView, Drift, Stuck};
use holdfast_common::messages::{Decision, Event};
use holdfast_common::pricing::thousands;

/// An error, a warning or a note for people, on standard error, worded like
/// every error the command line prints: `holdfast: <message>`.
pub fn error(message: impl std::fmt::Display) {
    eprintln!("holdfast: {message}");
}

/// Print `value` as one line of JSON (a JSON lines stream: `submit --json`).
pub fn json_line<T: serde::Serialize>(value: &T) {
    println!("{}", serde_json::to_string(value).expect("serialisable"));
}

/// Print `value` as pretty JSON.
pub fn json<T: serde::Serialize>(value: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("serialisable")
    );
}

pub fn account(a: &Account) {
    println!(
        "account {:<20} balance {:>10}  held {:>10}  available {:>10}  open holds {}",
        a.id,
        thousands(a.balance),
        thousands(a.held),
        thousands(a.available),
        a.open_holds
    );
}

/// What `account grant` added (or found added before under its id).
pub fn granted(g: &holdfast_common::ledger::Granted) {
    if g.replayed {
        println!(
            "grant {} was added before with the same terms: nothing added",
            g.grant.grant_id
        );
    }
}

/// The grants of an account, one line each, in burn-down order.
pub fn grants(grants: &[holdfast_common::ledger::Grant]) {
    for g in grants {
        println!(
            "  grant {:<24} {:<9} priority {:>3}  remaining {:>10} of {:>10}  held {:>10}  {}{}",
            g.grant_id,
            g.source.as_str(),
            g.priority,
            thousands(g.remaining),
            thousands(g.amount),
            thousands(g.held),
            g.state,
            g.expires_at
                .as_deref()
                .map(|e| format!(", expires {e}"))
                .unwrap_or_default(),
        );
    }
}

/// The allowances of an account, one line each (and a pending change).
pub fn allowances(allowances: &[holdfast_common::ledger::Allowance]) {
    for a in allowances {
        let rollover = match a.rollover_cap {
            0 => String::new(),
            cap => format!(", rollover up to {}", thousands(cap)),
        };
        let next = match (&a.next_period_start, &a.stops_at) {
            (Some(n), _) => format!("next period {n}"),
            (None, Some(s)) => format!("no period after {s}"),
            (None, None) => String::new(),
        };
        println!(
            "  allowance {:<20} {:>10} a {}{}  {}  {}",
            a.allowance_id,
            thousands(a.amount),
            a.period.as_str(),
            rollover,
            a.state,
            next
        );
        if let Some(t) = &a.next_terms {
            println!(
                "    from {}: {} a {}, rollover up to {}",
                t.effective_from,
                thousands(t.amount),
                t.period.as_str(),
                thousands(t.rollover_cap)
            );
        }
    }
}

/// What `account allowance` created (or found created before under its id).
pub fn allowed(a: &holdfast_common::ledger::Allowed) {
    if a.replayed {
        println!(
            "allowance {} exists with the same terms: nothing changed",
            a.allowance.allowance_id
        );
    }
    allowances(std::slice::from_ref(&a.allowance));
}

/// One allowance, as JSON or a line.
pub fn allowance_printed(a: &holdfast_common::ledger::Allowance, as_json: bool) {
    if as_json {
        json(a);
    } else {
        allowances(std::slice::from_ref(a));
    }
}

pub fn decision(d: &Decision) {
    match d {
        Decision::Granted(g) => {
            println!(
                "GRANTED  batch {}: {} credits held for {} of {} items (hold {})",
                g.batch_id,
                thousands(g.reserved),
                g.item_ids.len(),
                g.items_total,
                g.hold_id
            );
            if !g.left_out.is_empty() {
                let ids: Vec<_> = g
                    .left_out
                    .iter()
                    .map(|l| format!("{} ({})", l.item_id, l.reason))
                    .collect();
                println!("         left out: {}", ids.join(", "));
            }
            if !g.message.is_empty() {
                println!("         {}", g.message);
            }
            if let Some(notice) = &g.expiry_notice {
                println!("         {notice}");
            }
        }
        Decision::Insufficient(i) => {
            println!(
                "INSUFFICIENT  batch {}: nothing was held, nothing started.",
                i.batch_id
            );
            println!("     {}", i.message);
            println!("     {}", i.detail);
            println!(
                "     fits first: {} item(s) for {} credits; by priority: {} item(s) for {} credits",
                i.first_fit.count,
                thousands(i.first_fit.cost),
                i.priority_fit.count,
                thousands(i.priority_fit.cost)
            );
            let from = holdfast_common::breakdown::describe(&i.breakdown, chrono::Utc::now());
            if !from.is_empty() {
                println!(
                    "     the first {} would use {} credits: {from}",
                    i.first_fit.count,
                    thousands(i.first_fit.cost)
                );
            }
            for o in &i.options {
                println!("     [{}] {}", o.action, o.label);
            }
        }
        Decision::Rejected(r) => {
            println!(
                "REJECTED  batch {}: {}",
                r.batch_id.as_deref().unwrap_or("?"),
                r.reason
            );
        }
    }
}

pub fn completed(e: &Event) {
    if let Event::Completed {
        batch_id,
        state,
        figures: f,
        ..
    } = e
    {
        println!(
            "{}  batch {}: {} succeeded, {} failed, {} skipped; reserved {}, captured {}, released {}{}",
            state.to_uppercase(),
            batch_id,
            f.succeeded,
            f.failed,
            f.skipped,
            thousands(f.reserved),
            thousands(f.captured),
            thousands(f.released),
            if f.overrun > 0 { format!(", overrun {} (not charged)", thousands(f.overrun)) } else { String::new() }
        );
    }
}

pub fn batch(b: &BatchView) {
    let f = &b.figures;
    println!(
        "batch {}  account {}  mode {}  state {}",
        b.batch_id, b.account_id, b.mode, b.state
    );
    // A batch that was not granted held and ran nothing: what it has to show
    // is its decision (the sentence and the options), as `submit` printed it.
    if b.state == holdfast_common::ledger::BatchState::Denied {
        match serde_json::from_value::<Decision>(b.decision.clone()) {
            Ok(d) => {
                print!("  ");
                decision(&d);
            }
            Err(_) => println!("  decision: {}", b.decision),
        }
        return;
    }
    if let Some(h) = &b.hold_id {
        println!(
            "  hold {} ({})",
            h,
            b.hold_state.map_or("?", |s| s.as_str())
        );
    }
    println!(
        "  items {}: run {}, succeeded {}, failed {}, skipped {}, pending {}",
        f.items_total, f.run, f.succeeded, f.failed, f.skipped, f.pending
    );
    println!(
        "  credits: reserved {}, captured {}, released {}, overrun {}",
        thousands(f.reserved),
        thousands(f.captured),
        thousands(f.released),
        thousands(f.overrun)
    );
    if !b.items.is_empty() {
        println!(
            "  {:<16} {:<10} {:>9} {:>9} {:>9}  reason",
            "item", "state", "reserved", "captured", "overrun"
        );
        for i in &b.items {
            println!(
                "  {:<16} {:<10} {:>9} {:>9} {:>9}  {}",
                i.item_id,
                i.state,
                thousands(i.reserved),
                thousands(i.captured),
                thousands(i.overrun),
                i.reason.as_deref().unwrap_or("")
            );
        }
    }
}

pub fn audit(drift: &[Drift]) {
    if drift.is_empty() {
        println!("audit: the ledger is exact (balances, holds and items agree with the journal)");
    } else {
        println!("audit: {} problem(s)", drift.len());
        for d in drift {
            println!("  {}: {}", d.subject, d.problem);
        }
    }
}

/// After [`audit`]: the holds stuck more than `after_secs` past their limit.
pub fn stuck(stuck: &[Stuck], after_secs: u64) {
    if stuck.is_empty() {
        println!(
            "stuck: nothing open more than {after_secs}s past its deadline, TTL or dispatch lease"
        );
    } else {
        let credits: i64 = stuck.iter().map(|s| s.credits).sum();
        println!(
            "stuck: {} hold(s) more than {after_secs}s past their limit, {} credits",
            stuck.len(),
            thousands(credits)
        );
        for s in stuck {
            println!("  {} [{}]: {}", s.subject, s.kind, s.problem);
        }
    }
}

/// The open holds of an account, one a line, under [`account`].
pub fn holds(holds: &[holdfast_common::messages::Reservation]) {
    for h in holds {
        let what = match (&h.batch_id, &h.expires_at) {
            (Some(b), _) => format!("batch {b}"),
            (None, Some(e)) => format!("soft hold, expires {e}"),
            (None, None) => String::new(),
        };
        println!(
            "  hold {}  {} credits  {}",
            h.reservation_id, h.amount, what
        );
    }
}

pub fn preview(p: &holdfast_common::messages::Preview) {
    use holdfast_common::pricing::thousands;
    println!("{}", p.message);
    if let Some(advice) = &p.advice {
        println!("{advice}");
    }
    for l in p.levels.iter().filter(|l| l.spender_id.is_some()) {
        println!(
            "  {} {}: {}",
            l.kind.as_deref().unwrap_or("spender"),
            l.spender_id.as_deref().unwrap_or_default(),
            match (l.limit, l.remaining) {
                (Some(limit), Some(r)) => format!(
                    "{} of {} per {} left",
                    thousands(r),
                    thousands(limit),
                    l.period.map(|p| p.as_str()).unwrap_or("none")
                ),
                _ => "no limit".to_string(),
            }
        );
    }
    println!(
        "account {}, mode {}: {} of {} items fit in order ({} credits), {} by priority ({} credits); {}",
        p.account_id,
        p.mode.as_str(),
        p.first_fit.count,
        p.items_total,
        thousands(p.first_fit.cost),
        p.priority_fit.count,
        thousands(p.priority_fit.cost),
        if p.fits {
            "it would be granted".to_string()
        } else {
            format!("{} credits short", thousands(p.shortfall))
        }
    );
}

/// Spenders, one line each: limit, used, held, remaining, reset, children.
pub fn spenders(spenders: &[holdfast_common::ledger::Spender]) {
    for s in spenders {
        let limit = match s.limit {
            Some(l) => format!("limit {} per {}", thousands(l), s.period.as_str()),
            None => "no limit".to_string(),
        };
        println!(
            "{} {}{}  {limit}  used {}  held {}{}{}{}",
            s.kind,
            s.spender_id,
            s.parent
                .as_deref()
                .map(|p| format!(" (under {p})"))
                .unwrap_or_default(),
            thousands(s.used),
            thousands(s.held),
            s.remaining
                .map(|r| format!("  remaining {}", thousands(r)))
                .unwrap_or_default(),
            s.resets_at
                .as_deref()
                .map(|t| format!("  resets {t}"))
                .unwrap_or_default(),
            if s.children.is_empty() {
                String::new()
            } else {
                format!("  children: {}", s.children.join(", "))
            },
        );
    }
}

pub fn reservation(r: &holdfast_common::messages::Reservation, as_json: bool) {
    if as_json {
        return json(r);
    }
    println!(
        "reservation {}  account {}  {} credits  {}{}{}",
        r.reservation_id,
        r.account_id,
        holdfast_common::pricing::thousands(r.amount),
        r.state,
        r.expires_at
            .as_deref()
            .map(|t| format!("  expires {t}"))
            .unwrap_or_default(),
        r.batch_id
            .as_deref()
            .map(|b| format!("  batch {b}"))
            .unwrap_or_default(),
    );
}

/// A key just created: the key itself, once, then what `key list` shows.
pub fn created_key(k: &holdfast_coordinator::keys::CreatedKey) {
    println!("{}", k.key);
    println!(
        "(shown once: store it now; Holdfast keeps only its hash. Send it as `Authorization: Bearer <key>`.)"
    );
    keys(std::slice::from_ref(&k.info));
}

/// Keys, one line each: id, scope, state, accounts, times, name.
pub fn keys(keys: &[holdfast_coordinator::keys::KeyInfo]) {
    if keys.is_empty() {
        println!("no API keys");
        return;
    }
    for k in keys {
        let accounts = match &k.accounts {
            None => "every account".to_string(),
            Some(list) => format!("accounts {}", list.join(", ")),
        };
        let state = serde_json::to_value(k.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let mut line = format!(
            "{}  {:<8} {:<7} {accounts}",
            k.prefix,
            k.scope.as_str(),
            state
        );
        line.push_str(&format!("; created {}", k.created_at));
        if let Some(t) = &k.expires_at {
            line.push_str(&format!(", expires {t}"));
        }
        match &k.last_used_at {
            Some(t) => line.push_str(&format!(", last used {t}")),
            None => line.push_str(", never used"),
        }
        if let Some(t) = &k.revoked_at {
            line.push_str(&format!(", revoked {t}"));
        }
        if let Some(name) = &k.name {
            line.push_str(&format!(" ({name})"));
        }
        println!("{line}");
    }
}
