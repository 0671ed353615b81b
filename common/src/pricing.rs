//! Pricing a batch against the credits available: which items run, which fit,
//! and what to tell a person when they do not. Pure functions, so the preview
//! and the reservation answer the same question the same way.

use crate::breakdown::{self, Pot};
use crate::messages::{
    BatchRequest, Choice, FitSet, ItemRequest, LeftOut, Level, LevelKind, Mode, Preview,
};

/// What the request asks to run, before credits are considered: indices into `items`.
pub fn requested(req: &BatchRequest) -> Vec<usize> {
    match (req.mode, &req.item_ids) {
        (Mode::Selected, Some(ids)) => req
            .items
            .iter()
            .enumerate()
            .filter(|(_, it)| ids.iter().any(|id| id == &it.item_id))
            .map(|(i, _)| i)
            .collect(),
        _ => (0..req.items.len()).collect(),
    }
}

/// Sum of the estimated costs of `indices`. Validation bounds costs and counts,
/// so this cannot overflow for an accepted request; saturate to stay total.
pub fn cost_of(items: &[ItemRequest], indices: &[usize]) -> i64 {
    indices
        .iter()
        .fold(0i64, |acc, &i| acc.saturating_add(items[i].estimated_cost))
}

/// The longest prefix of `order` whose cost fits `available`.
fn prefix_fit(items: &[ItemRequest], order: &[usize], available: i64) -> Vec<usize> {
    let mut spent = 0i64;
    let mut taken = Vec::new();
    for &i in order {
        let next = spent.saturating_add(items[i].estimated_cost);
        if next > available {
            break;
        }
        spent = next;
        taken.push(i);
    }
    taken
}

/// Items in request order: the first ones that fit.
pub fn first_fit(items: &[ItemRequest], candidates: &[usize], available: i64) -> Vec<usize> {
    prefix_fit(items, candidates, available)
}

/// Items by descending priority (stable: ties keep request order) that fit,
/// returned in request order.
pub fn priority_fit(items: &[ItemRequest], candidates: &[usize], available: i64) -> Vec<usize> {
    let mut order = candidates.to_vec();
    order.sort_by_key(|&i| std::cmp::Reverse(items[i].priority));
    let mut taken = prefix_fit(items, &order, available);
    taken.sort_unstable();
    taken
}

fn fit_set(items: &[ItemRequest], indices: &[usize]) -> FitSet {
    FitSet {
        count: indices.len(),
        cost: cost_of(items, indices),
        item_ids: indices.iter().map(|&i| items[i].item_id.clone()).collect(),
    }
}

/// The outcome of pricing a request against `available` credits.
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// Hold `total` and run `run`; `left_out` are the other items, with the reason.
    Run {
        run: Vec<usize>,
        left_out: Vec<LeftOut>,
        total: i64,
    },
    /// Hold nothing, run nothing.
    Short(Shortfall),
}

/// Everything an insufficient decision tells a person.
#[derive(Clone, Debug, PartialEq)]
pub struct Shortfall {
    pub total_cost: i64,
    pub available: i64,
    pub shortfall: i64,
    pub items_total: usize,
    pub first_fit: FitSet,
    pub priority_fit: FitSet,
    pub message: String,
    pub detail: String,
    pub options: Vec<Choice>,
}

/// The account as a level a batch must fit: its available credits.
pub fn account_level(available: i64) -> Level {
    Level {
        level: LevelKind::Account,
        spender_id: None,
        kind: None,
        limit: None,
        period: None,
        used: None,
        held: None,
        remaining: Some(available),
        resets_at: None,
    }
}

/// Every level a batch must fit: the account (`available`), then the
/// `spenders` of its path, root first.
pub fn levels(available: i64, spenders: &[Level]) -> Vec<Level> {
    let mut all = Vec::with_capacity(spenders.len() + 1);
    all.push(account_level(available));
    all.extend_from_slice(spenders);
    all
}

/// The level that binds: the lowest `remaining` (a spender without a limit
/// never binds), the first one on a tie (the account, then the spenders root
/// first). Its index in `levels` and what it leaves the batch.
pub fn tightest(levels: &[Level]) -> (usize, i64) {
    let mut best = (0, i64::MAX);
    for (i, l) in levels.iter().enumerate() {
        if let Some(r) = l.remaining {
            if r < best.1 {
                best = (i, r);
            }
        }
    }
    (best.0, best.1.max(0))
}

/// "your team 'design'" (a spender level).
fn who(level: &Level) -> String {
    format!(
        "your {} '{}'",
        level.kind.as_deref().unwrap_or("spender"),
        level.spender_id.as_deref().unwrap_or_default()
    )
}

/// "Your team 'design' has 180 of its 2,000 monthly credits left: enough for
/// 3 of 10 items. It resets on 1 January." — what a person reads when a
/// spender's limit binds (`k` of `n` items fit).
pub fn spender_sentence(
    level: &Level,
    k: usize,
    n: usize,
    now: chrono::DateTime<chrono::Utc>,
) -> String {
    let who = who(level);
    let mut who_cap = who.clone();
    who_cap.replace_range(0..1, "Y");
    let remaining = level.remaining.unwrap_or(0);
    let limit = level.limit.unwrap_or(0);
    let per = level
        .period
        .and_then(|p| p.adjective())
        .map(|a| format!("{a} "))
        .unwrap_or_default();
    let fit = match (k, n) {
        (0, 1) => "not enough for the item".to_string(),
        (0, n) => format!("not enough for any of the {n} items"),
        (k, n) => format!("enough for {k} of {n} {}", plural(n, "item", "items")),
    };
    let resets = level
        .resets_at
        .as_deref()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| {
            format!(
                " It resets on {}.",
                breakdown::day(t.with_timezone(&chrono::Utc), now)
            )
        })
        .unwrap_or_default();
    format!(
        "{who_cap} has {} of its {} {per}credits left: {fit}.{resets}",
        thousands(remaining),
        thousands(limit)
    )
}

/// A shortfall where spender `level` binds rather than the account: the
/// sentence names the spender, and the option is to ask an admin to raise
/// its limit (adding credits to the account would not help).
pub fn limited_by_spender(s: &mut Shortfall, level: &Level, now: chrono::DateTime<chrono::Utc>) {
    let who = who(level);
    s.message = spender_sentence(level, s.first_fit.count, s.items_total, now);
    s.detail = format!(
        "This action costs {} credits; {who} has {} credits of its limit left ({} short).",
        thousands(s.total_cost),
        thousands(s.available),
        thousands(s.shortfall)
    );
    for o in s.options.iter_mut().filter(|o| o.action == "add_credits") {
        o.action = "raise_limit".into();
        o.label = format!(
            "Ask an admin to raise the limit of {} by {} credits",
            who.trim_start_matches("your "),
            thousands(s.shortfall)
        );
        o.spender_id = level.spender_id.clone();
    }
}

/// What a preview tells a person before they click: the cost, what they
/// have, what fits, and which grants (`pots`, in burn-down order) it would
/// draw from. Uses the same rules as [`plan`]; a batch granted now would run
/// until `execution_timeout` from now. `spenders` are the levels of the
/// request's spender path, root first (none without a spender): the batch
/// is priced against the tightest level.
pub fn preview(
    req: &BatchRequest,
    pots: &[Pot],
    spenders: &[Level],
    chunk_size: usize,
    execution_timeout: std::time::Duration,
) -> Preview {
    let items = &req.items;
    let wanted = requested(req);
    let total = cost_of(items, &wanted);
    let levels = levels(breakdown::available(pots), spenders);
    let (bind, available) = tightest(&levels);
    let (fits, drawn) = match plan_chunked(req, available, chunk_size) {
        Plan::Run { total, .. } => (true, total),
        Plan::Short(s) => (false, s.first_fit.cost),
    };
    let first = fit_set(items, &first_fit(items, &wanted, available));
    let by_priority = fit_set(items, &priority_fit(items, &wanted, available));
    let n = wanted.len();
    let now = chrono::Utc::now();
    let advice = (total > available).then(|| match levels[bind].level {
        LevelKind::Account => k_of_n(first.count, n),
        LevelKind::Spender => spender_sentence(&levels[bind], first.count, n, now),
    });
    let draws = breakdown::would_draw(pots, drawn);
    let deadline =
        now + chrono::Duration::from_std(execution_timeout).unwrap_or(chrono::Duration::days(1));
    // Fits: where the cost comes from. Does not fit: where the credits the
    // account has are.
    let said = if fits {
        breakdown::describe(&draws, now)
    } else {
        breakdown::describe(&breakdown::would_draw(pots, available), now)
    };
    let message = match (fits, said.is_empty()) {
        (_, true) => format!(
            "This action will cost ~{} credits. You have {} credits.",
            thousands(total),
            thousands(available)
        ),
        (true, false) => format!(
            "This action will cost ~{} credits: {said}. You have {} credits.",
            thousands(total),
            thousands(available)
        ),
        (false, false) => format!(
            "This action will cost ~{} credits. You have {} credits: {said}.",
            thousands(total),
            thousands(available)
        ),
    };
    Preview {
        account_id: req.account_id.clone(),
        mode: req.mode,
        total_cost: total,
        available,
        fits,
        items_total: n,
        fit_count: first.count,
        first_fit: first,
        priority_fit: by_priority,
        shortfall: (total - available).max(0),
        message,
        advice,
        expiry_notice: breakdown::expiry_notice(&draws, deadline, now),
        breakdown: draws,
        spender_id: req.spender_id.clone(),
        limited_by: (!fits).then(|| levels[bind].clone()),
        levels,
    }
}

fn k_of_n(k: usize, n: usize) -> String {
    match k {
        0 => format!(
            "You don't have enough credits to generate any of the {n} {}.",
            plural(n, "item", "items")
        ),
        k => format!(
            "You have enough credits to generate {k} out of {n} {}.",
            plural(n, "item", "items")
        ),
    }
}

/// Like [`plan`], and for `sequential` requests only the first chunk of
/// `chunk_size` items must fit (the rest is reserved chunk by chunk later).
pub fn plan_chunked(req: &BatchRequest, available: i64, chunk_size: usize) -> Plan {
    if req.mode != Mode::Sequential {
        return plan(req, available);
    }
    let items = &req.items;
    let first: Vec<usize> = (0..items.len().min(chunk_size.max(1))).collect();
    let cost = cost_of(items, &first);
    if cost <= available.max(0) {
        Plan::Run {
            run: first,
            left_out: vec![],
            total: cost,
        }
    } else {
        let wanted = requested(req);
        let total = cost_of(items, &wanted);
        Plan::Short(shortfall(items, &wanted, total, available.max(0)))
    }
}

/// Price `req` against `available` credits according to its mode.
pub fn plan(req: &BatchRequest, available: i64) -> Plan {
    let items = &req.items;
    let wanted = requested(req);
    let total = cost_of(items, &wanted);
    let available = available.max(0);
    let chosen = match req.mode {
        Mode::AllOrNothing | Mode::Selected | Mode::Sequential => {
            (total <= available).then(|| wanted.clone())
        }
        Mode::FirstFit => Some(first_fit(items, &wanted, available)).filter(|v| !v.is_empty()),
        Mode::PriorityFit => {
            Some(priority_fit(items, &wanted, available)).filter(|v| !v.is_empty())
        }
    };
    match chosen {
        Some(run) => {
            let reason = if req.mode == Mode::Selected {
                "not_selected"
            } else {
                "did_not_fit"
            };
            let left_out = (0..items.len())
                .filter(|i| run.binary_search(i).is_err())
                .map(|i| LeftOut {
                    item_id: items[i].item_id.clone(),
                    reason: reason.into(),
                })
                .collect();
            let total = cost_of(items, &run);
            Plan::Run {
                run,
                left_out,
                total,
            }
        }
        None => Plan::Short(shortfall(items, &wanted, total, available)),
    }
}

fn shortfall(items: &[ItemRequest], wanted: &[usize], total: i64, available: i64) -> Shortfall {
    let first = fit_set(items, &first_fit(items, wanted, available));
    let by_priority = fit_set(items, &priority_fit(items, wanted, available));
    let n = wanted.len();
    let short = total - available;
    let message = k_of_n(first.count, n);
    let detail = format!(
        "This action costs {} credits. You have {} credits available ({} short).",
        thousands(total),
        thousands(available),
        thousands(short)
    );
    let mut options = Vec::new();
    if first.count > 0 {
        options.push(Choice {
            action: "generate_first_fit".into(),
            label: format!("Generate the first {}", first.count),
            item_count: Some(first.count),
            credits: Some(first.cost),
            spender_id: None,
        });
    }
    options.push(Choice {
        action: "select_items".into(),
        label: "Select items manually".into(),
        item_count: None,
        credits: None,
        spender_id: None,
    });
    options.push(Choice {
        action: "add_credits".into(),
        label: format!("Add {} credits", thousands(short)),
        item_count: None,
        credits: Some(short),
        spender_id: None,
    });
    Shortfall {
        total_cost: total,
        available,
        shortfall: short,
        items_total: n,
        first_fit: first,
        priority_fit: by_priority,
        message,
        detail,
        options,
    }
}

fn plural<'a>(n: usize, one: &'a str, many: &'a str) -> &'a str {
    if n == 1 {
        one
    } else {
        many
    }
}

/// `12345` → `12,345`: numbers people read.
pub fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        out.insert(0, '-');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{LimitPeriod, SCHEMA_VERSION};

    fn req(costs: &[(i64, i32)], mode: Mode) -> BatchRequest {
        BatchRequest {
            schema_version: SCHEMA_VERSION,
            batch_id: "b".into(),
            account_id: "a".into(),
            items: costs
                .iter()
                .enumerate()
                .map(|(i, &(c, p))| ItemRequest {
                    item_id: format!("i{i}"),
                    estimated_cost: c,
                    priority: p,
                    payload: serde_json::Value::Null,
                })
                .collect(),
            mode,
            item_ids: None,
            reservation_id: None,
            spender_id: None,
        }
    }

    #[test]
    fn all_or_nothing_short_reports_k_of_n() {
        let r = req(&[(12, 0); 10], Mode::AllOrNothing);
        let Plan::Short(s) = plan(&r, 100) else {
            panic!("should be short")
        };
        assert_eq!(s.total_cost, 120);
        assert_eq!(s.shortfall, 20);
        assert_eq!(s.first_fit.count, 8);
        assert_eq!(
            s.message,
            "You have enough credits to generate 8 out of 10 items."
        );
        assert_eq!(
            s.detail,
            "This action costs 120 credits. You have 100 credits available (20 short)."
        );
        let actions: Vec<_> = s.options.iter().map(|o| o.action.as_str()).collect();
        assert_eq!(
            actions,
            ["generate_first_fit", "select_items", "add_credits"]
        );
    }

    #[test]
    fn first_fit_is_a_prefix_and_priority_fit_sorts() {
        let r = req(&[(5, 0), (50, 9), (5, 1), (5, 5)], Mode::PriorityFit);
        assert_eq!(first_fit(&r.items, &[0, 1, 2, 3], 20), vec![0]);
        // priority order 1 (50, too big) stops the prefix at once
        assert_eq!(
            priority_fit(&r.items, &[0, 1, 2, 3], 20),
            Vec::<usize>::new()
        );
        // 50 (p9) + 5 (p5) + 5 (p1) = 60: three fit, returned in request order
        assert_eq!(priority_fit(&r.items, &[0, 1, 2, 3], 60), vec![1, 2, 3]);
        assert_eq!(priority_fit(&r.items, &[0, 1, 2, 3], 59), vec![1, 3]);
    }

    #[test]
    fn first_fit_mode_runs_the_fitting_prefix_and_names_the_rest() {
        let r = req(&[(10, 0), (10, 0), (10, 0)], Mode::FirstFit);
        let Plan::Run {
            run,
            left_out,
            total,
        } = plan(&r, 25)
        else {
            panic!()
        };
        assert_eq!(run, vec![0, 1]);
        assert_eq!(total, 20);
        assert_eq!(
            left_out,
            vec![LeftOut {
                item_id: "i2".into(),
                reason: "did_not_fit".into()
            }]
        );
        assert!(
            matches!(plan(&r, 5), Plan::Short(s) if s.first_fit.count == 0
            && s.message == "You don't have enough credits to generate any of the 3 items.")
        );
    }

    #[test]
    fn selected_prices_only_the_named_items() {
        let mut r = req(&[(10, 0), (30, 0), (10, 0)], Mode::Selected);
        r.item_ids = Some(vec!["i2".into(), "i0".into()]);
        let Plan::Run {
            run,
            left_out,
            total,
        } = plan(&r, 20)
        else {
            panic!()
        };
        assert_eq!((run, total), (vec![0, 2], 20));
        assert_eq!(left_out[0].reason, "not_selected");
    }

    fn spender(id: &str, kind: &str, limit: i64, used: i64, period: LimitPeriod) -> Level {
        Level {
            level: LevelKind::Spender,
            spender_id: Some(id.into()),
            kind: Some(kind.into()),
            limit: Some(limit),
            period: Some(period),
            used: Some(used),
            held: Some(0),
            remaining: Some(limit - used),
            resets_at: Some("2027-01-01T00:00:00.000Z".into()),
        }
    }

    #[test]
    fn the_tightest_level_binds_and_the_first_on_a_tie() {
        let team = spender("design", "team", 2_000, 1_820, LimitPeriod::Month);
        let member = spender("ann", "member", 300, 0, LimitPeriod::Month);
        assert_eq!(
            tightest(&levels(10_000, &[team.clone(), member.clone()])),
            (1, 180)
        );
        assert_eq!(
            tightest(&levels(100, &[team.clone(), member.clone()])),
            (0, 100)
        );
        // A tie goes to the level nearer the account.
        assert_eq!(tightest(&levels(180, &[team, member])), (0, 180));
        // No limit never binds.
        let mut free = spender("key", "key", 0, 0, LimitPeriod::None);
        free.limit = None;
        free.remaining = None;
        assert_eq!(tightest(&levels(50, &[free])), (0, 50));
    }

    #[test]
    fn a_binding_spender_is_named_with_its_period_and_the_option_is_to_raise_its_limit() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-12-05T08:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let team = spender("design", "team", 2_000, 1_820, LimitPeriod::Month);
        let r = req(&[(60, 0); 10], Mode::AllOrNothing);
        let Plan::Short(mut s) = plan(&r, 180) else {
            panic!("should be short")
        };
        limited_by_spender(&mut s, &team, now);
        assert_eq!(
            s.message,
            "Your team 'design' has 180 of its 2,000 monthly credits left: enough for 3 of 10 items. It resets on 1 January 2027."
        );
        assert_eq!(
            s.detail,
            "This action costs 600 credits; your team 'design' has 180 credits of its limit left (420 short)."
        );
        let raise = s.options.last().unwrap();
        assert_eq!(
            (
                raise.action.as_str(),
                raise.credits,
                raise.spender_id.as_deref()
            ),
            ("raise_limit", Some(420), Some("design"))
        );
        assert_eq!(
            raise.label,
            "Ask an admin to raise the limit of team 'design' by 420 credits"
        );
        let mut life = spender("ann", "member", 300, 300, LimitPeriod::None);
        life.resets_at = None;
        assert_eq!(
            spender_sentence(&life, 0, 1, now),
            "Your member 'ann' has 0 of its 300 credits left: not enough for the item."
        );
    }

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(-1234567), "-1,234,567");
    }
}
