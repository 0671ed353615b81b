-- Allowances: periodic `plan` grants. An allowance gives an account `amount`
-- credits each period (a day, a week or a calendar month); at each period
-- start the reconciler issues that period's grant, expiring at the period's
-- end. What the previous period left unused rolls over, up to
-- `rollover_cap`, as a grant of its own expiring with the new period's.
--
-- Periods: anchor + k·period, k = 0, 1, 2, ... in UTC (`holdfast_period_after`).
-- A calendar month is PostgreSQL's interval arithmetic from the anchor, never
-- from the previous boundary: an anchor on the 31st resets on the last day of
-- shorter months and on the 31st again in longer ones.
--
-- Exactly once: each period's grant names its allowance and period start,
-- unique per account (grants_one_per_allowance_period), and is issued by one
-- function (`holdfast_issue_allowance`) that locks the account row, then the
-- allowance row, then the grants (the lock order of V5), and advances the
-- allowance's `next_period_start` in the same transaction. Several
-- reconcilers may call it at once: the second waits for the first and finds
-- the period issued. Missed periods (a reconciler down, an anchor in the
-- past) are issued in order, each effective at its own start.
--
-- Terms change from the next period on (PUT): `allowance_terms` keeps one
-- row per set of terms, keyed by the period start they apply from, so a
-- period is always issued on the terms that applied when it began, however
-- late the reconciler issues it. Stopping (DELETE) sets `stops_at`, the end
-- of the current period: no period starts at or after it.
--
-- Least privilege: holdfast_admin manages allowances; holdfast_reconciler
-- reads them and may execute `holdfast_issue_allowance` (SECURITY DEFINER,
-- the one way a service role raises a balance, and only by what an
-- allowance defines once its period has begun).

CREATE TABLE allowances (
    account_id         text NOT NULL REFERENCES accounts (id),
    id                 text NOT NULL CHECK (id <> '' AND length(id) <= 64),
    anchor             timestamptz NOT NULL,
    next_period_start  timestamptz NOT NULL,
    state              text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'stopped')),
    stops_at           timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, id),
    CONSTRAINT allowances_stopped_has_end CHECK ((state = 'stopped') = (stops_at IS NOT NULL)),
    CONSTRAINT allowances_issue_from_anchor CHECK (next_period_start >= anchor)
);
-- What the reconciler looks for each sweep: allowances with periods left
-- (a stopped one whose last period is issued drops out of the index).
CREATE INDEX allowances_due ON allowances (next_period_start)
    WHERE stops_at IS NULL OR next_period_start < stops_at;
COMMENT ON TABLE allowances IS 'Periodic plan grants of an account; issued by the reconciler (see V7__allowances.sql).';
COMMENT ON COLUMN allowances.account_id IS 'Account the allowance gives credits to.';
COMMENT ON COLUMN allowances.id IS 'allowance_id: the idempotency key of the allowance within its account (1..64 characters, so that the ids of its grants fit 128).';
COMMENT ON COLUMN allowances.anchor IS 'Start of the first period (whole seconds); periods start at anchor + k·period.';
COMMENT ON COLUMN allowances.next_period_start IS 'Start of the next period to issue; advanced by holdfast_issue_allowance only. Issued when it is <= now() and before stops_at.';
COMMENT ON COLUMN allowances.state IS 'active, or stopped (no period starts at or after stops_at).';
COMMENT ON COLUMN allowances.stops_at IS 'Stopped allowances: the end of the period that was current when it was stopped.';
COMMENT ON COLUMN allowances.updated_at IS 'Last change of terms, state or next_period_start.';

CREATE TABLE allowance_terms (
    account_id      text NOT NULL,
    allowance_id    text NOT NULL,
    effective_from  timestamptz NOT NULL,
    amount          bigint NOT NULL CHECK (amount > 0),
    period          text NOT NULL CHECK (period IN ('day', 'week', 'month')),
    anchor          timestamptz NOT NULL,
    rollover_cap    bigint NOT NULL DEFAULT 0 CHECK (rollover_cap >= 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, allowance_id, effective_from),
    FOREIGN KEY (account_id, allowance_id) REFERENCES allowances (account_id, id),
    CONSTRAINT allowance_terms_grid_from_anchor CHECK (anchor <= effective_from)
);
COMMENT ON TABLE allowance_terms IS 'The terms of an allowance, one row per period start they apply from; a period is issued on the row with the latest effective_from at or before its start.';
COMMENT ON COLUMN allowance_terms.effective_from IS 'Start of the first period these terms apply to (a period boundary).';
COMMENT ON COLUMN allowance_terms.amount IS 'Credits issued each period.';
COMMENT ON COLUMN allowance_terms.period IS 'day, week or month (calendar month, UTC).';
COMMENT ON COLUMN allowance_terms.anchor IS 'Origin of the period grid: periods start at anchor + k·period (the allowance''s anchor, or effective_from when the period length changed there).';
COMMENT ON COLUMN allowance_terms.rollover_cap IS 'Most credits the previous period''s unused allowance grants carry into a period; 0: none.';

ALTER TABLE grants ADD COLUMN allowance_id text;
ALTER TABLE grants ADD COLUMN period_start timestamptz;
ALTER TABLE grants ADD CONSTRAINT grants_allowance_fk
    FOREIGN KEY (account_id, allowance_id) REFERENCES allowances (account_id, id);
ALTER TABLE grants ADD CONSTRAINT grants_period_of_allowance
    CHECK (period_start IS NULL OR allowance_id IS NOT NULL);
-- Exactly one grant per allowance and period, whoever issues it. (A
-- rollover grant has no period_start: it is the period's second grant.)
CREATE UNIQUE INDEX grants_one_per_allowance_period ON grants (account_id, allowance_id, period_start);
CREATE INDEX grants_by_allowance ON grants (account_id, allowance_id, expires_at)
    WHERE allowance_id IS NOT NULL;
COMMENT ON COLUMN grants.allowance_id IS 'The allowance that issued this grant (its period grant, or the rollover into a period); NULL otherwise.';
COMMENT ON COLUMN grants.period_start IS 'The start of the allowance period this grant was issued for; NULL for a rollover grant and for grants not issued by an allowance.';

ALTER TABLE journal DROP CONSTRAINT journal_kind_check;
ALTER TABLE journal ADD CONSTRAINT journal_kind_check CHECK (kind IN
    ('grant', 'hold', 'capture', 'overrun', 'settle', 'release', 'expire', 'grant_expire', 'void', 'rollover'));
COMMENT ON COLUMN journal.kind IS
    'grant (balance+), hold (held+), capture (hold-internal), overrun (record only), settle (balance- and held- by captured), release (held- by the remainder), expire (held- by a soft hold at its TTL), grant_expire (balance-, and held- when an open hold releases it, by credits of an expired grant), void (the same for a voided grant), rollover (an allowance period''s unused credits moving to the next period''s rollover grant: balance- on the old grant, balance+ on the new one).';

-- The first period start of the grid anchor + k·period (k >= 0) strictly
-- after p_after (the anchor itself when p_after is before it). Calendar
-- arithmetic in UTC, from the anchor: the month after January 31 starts on
-- February 28 (29), the one after that on March 31.
CREATE FUNCTION holdfast_period_after(p_anchor timestamptz, p_period text, p_after timestamptz)
RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    a timestamp := p_anchor AT TIME ZONE 'UTC';
    t timestamp := p_after AT TIME ZONE 'UTC';
    k bigint;
BEGIN
    IF p_period NOT IN ('day', 'week', 'month') THEN
        RAISE EXCEPTION 'unknown allowance period %', p_period USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF t < a THEN
        RETURN p_anchor;
    END IF;
    -- An estimate within one period of the answer, then the exact step.
    IF p_period = 'month' THEN
        k := (extract(year FROM t) - extract(year FROM a)) * 12 + extract(month FROM t) - extract(month FROM a);
    ELSE
        k := floor(extract(epoch FROM t - a) / CASE p_period WHEN 'day' THEN 86400 ELSE 604800 END);
    END IF;
    k := greatest(k, 0);
    WHILE k > 0 AND holdfast_period_start(a, p_period, k) > t LOOP
        k := k - 1;
    END LOOP;
    WHILE holdfast_period_start(a, p_period, k) <= t LOOP
        k := k + 1;
    END LOOP;
    RETURN holdfast_period_start(a, p_period, k) AT TIME ZONE 'UTC';
END
$$;

-- The start of period k of the grid from `a` (UTC, without time zone).
CREATE FUNCTION holdfast_period_start(a timestamp, p_period text, k bigint) RETURNS timestamp
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT a + CASE p_period
                   WHEN 'month' THEN make_interval(months => k::int)
                   WHEN 'week' THEN make_interval(days => 7 * k::int)
                   ELSE make_interval(days => k::int)
               END
$$;

-- Whether a grant of allowance `p_allowance` expiring at `p_expires_at`
-- still waits for the period starting then to be issued, because that
-- period rolls the grant's unused credits over. Such a grant counts for
-- nothing once past its expiry (as any), but is expired only after the
-- issuance took its rollover: so an expiry that runs first (another
-- reconciler, or a boundary passing between the two steps of a sweep) never
-- takes credits the next period was promised.
CREATE FUNCTION holdfast_awaits_rollover(p_account text, p_allowance text, p_expires_at timestamptz)
RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT p_allowance IS NOT NULL AND EXISTS (
        SELECT 1 FROM allowances a
        WHERE a.account_id = p_account AND a.id = p_allowance
          AND a.next_period_start <= p_expires_at
          AND (a.stops_at IS NULL OR p_expires_at < a.stops_at)
          AND (SELECT t.rollover_cap FROM allowance_terms t
               WHERE t.account_id = p_account AND t.allowance_id = p_allowance
                 AND t.effective_from <= p_expires_at
               ORDER BY t.effective_from DESC LIMIT 1) > 0)
$$;

-- V5's expiry, leaving the grants that await their rollover (above) to the
-- sweep after their next period is issued.
CREATE OR REPLACE FUNCTION holdfast_expire_grants(p_account text)
RETURNS TABLE (grant_id text, source text, expired bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    g record;
    total bigint := 0;
BEGIN
    PERFORM 1 FROM accounts WHERE id = p_account FOR NO KEY UPDATE;
    FOR g IN
        SELECT gr.id, gr.source, gr.remaining - gr.held AS free FROM grants gr
        WHERE gr.account_id = p_account AND gr.state = 'active' AND gr.expires_at <= now()
          AND NOT holdfast_awaits_rollover(gr.account_id, gr.allowance_id, gr.expires_at)
        ORDER BY gr.id
        FOR NO KEY UPDATE
    LOOP
        UPDATE grants SET state = 'expired', remaining = held, closed_at = now()
        WHERE account_id = p_account AND id = g.id;
        IF g.free > 0 THEN
            INSERT INTO journal (account_id, grant_id, kind, amount, balance_delta, note)
            VALUES (p_account, g.id, 'grant_expire', g.free, -g.free, 'expired');
        END IF;
        total := total + g.free;
        grant_id := g.id;
        source := g.source;
        expired := g.free;
        RETURN NEXT;
    END LOOP;
    IF total > 0 THEN
        UPDATE accounts SET balance = balance - total, updated_at = now() WHERE id = p_account;
    END IF;
END
$$;

-- Issue the due periods of allowance `p_allowance` of `p_account`, at most
-- `p_max` of them, oldest first: each period that has begun (by the
-- database's clock) and starts before the allowance's stops_at gets its
-- `plan` grant `allowance:<id>:<start>` of the terms that apply from its
-- start, effective at the start and expiring at the period's end, with a
-- `grant` journal row; and, when those terms have a rollover cap, what the
-- previous period's grants of this allowance left unused (remaining - held:
-- never what an open hold took), up to the cap, moves to a grant
-- `allowance:<id>:<start>:rollover` expiring with it (`rollover` journal
-- rows on both sides). The rest of the previous grants expires as usual.
--
-- Lock order: the account row, the allowance row, then grants. Returns one
-- row per period issued.
CREATE FUNCTION holdfast_issue_allowance(p_account text, p_allowance text, p_max integer)
RETURNS TABLE (grant_id text, period_start timestamptz, amount bigint, rolled_over bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
#variable_conflict use_column
DECLARE
    a record;
    t record;
    g record;
    s timestamptz;
    e timestamptz;
    label text;
    carry bigint;
    part bigint;
    issued integer := 0;
BEGIN
    PERFORM 1 FROM accounts WHERE id = p_account FOR NO KEY UPDATE;
    SELECT al.next_period_start, al.stops_at INTO a FROM allowances al
    WHERE al.account_id = p_account AND al.id = p_allowance
    FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    s := a.next_period_start;
    WHILE issued < p_max AND s <= now() AND (a.stops_at IS NULL OR s < a.stops_at) LOOP
        SELECT tr.amount, tr.period, tr.anchor, tr.rollover_cap INTO t FROM allowance_terms tr
        WHERE tr.account_id = p_account AND tr.allowance_id = p_allowance AND tr.effective_from <= s
        ORDER BY tr.effective_from DESC LIMIT 1;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'allowance % of account % has no terms for the period from %', p_allowance, p_account, s
                USING ERRCODE = 'check_violation';
        END IF;
        e := holdfast_period_after(t.anchor, t.period, s);
        label := 'allowance:' || p_allowance || ':' || to_char(s AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"');
        carry := 0;
        IF t.rollover_cap > 0 THEN
            FOR g IN
                SELECT gr.id, gr.remaining - gr.held AS free FROM grants gr
                WHERE gr.account_id = p_account AND gr.allowance_id = p_allowance
                  AND gr.expires_at = s AND gr.state = 'active' AND gr.remaining > gr.held
                ORDER BY gr.priority, gr.source_rank, gr.effective_at, gr.id
                FOR NO KEY UPDATE
            LOOP
                EXIT WHEN carry = t.rollover_cap;
                part := least(t.rollover_cap - carry, g.free);
                UPDATE grants SET remaining = remaining - part WHERE account_id = p_account AND id = g.id;
                INSERT INTO journal (account_id, grant_id, kind, amount, balance_delta, note)
                VALUES (p_account, g.id, 'rollover', part, -part, 'rolled over to ' || label || ':rollover');
                carry := carry + part;
            END LOOP;
        END IF;
        INSERT INTO grants (account_id, id, amount, remaining, source, effective_at, expires_at, note,
                            allowance_id, period_start)
        VALUES (p_account, label, t.amount, t.amount, 'plan', s, e, 'allowance ' || p_allowance,
                p_allowance, s);
        INSERT INTO journal (account_id, grant_id, kind, amount, balance_delta, note)
        VALUES (p_account, label, 'grant', t.amount, t.amount, 'allowance ' || p_allowance);
        IF carry > 0 THEN
            INSERT INTO grants (account_id, id, amount, remaining, source, effective_at, expires_at, note,
                                allowance_id)
            VALUES (p_account, label || ':rollover', carry, carry, 'plan', s, e,
                    'rolled over from the previous period of allowance ' || p_allowance, p_allowance);
            INSERT INTO journal (account_id, grant_id, kind, amount, balance_delta, note)
            VALUES (p_account, label || ':rollover', 'rollover', carry, carry,
                    'rolled over from the previous period');
        END IF;
        UPDATE accounts SET balance = balance + t.amount, updated_at = now() WHERE id = p_account;
        grant_id := label;
        period_start := s;
        amount := t.amount;
        rolled_over := carry;
        RETURN NEXT;
        issued := issued + 1;
        s := e;
    END LOOP;
    IF issued > 0 THEN
        UPDATE allowances SET next_period_start = s, updated_at = now()
        WHERE account_id = p_account AND id = p_allowance;
    END IF;
END
$$;
COMMENT ON FUNCTION holdfast_issue_allowance(text, text, integer) IS
    'Issues the due periods of one allowance (SECURITY DEFINER: the reconciler raises balances only through it).';

-- Privileges (see V3__roles.sql). Reading is harmless (account views are
-- served by any process); the admin manages allowances; only the reconciler
-- issues them, through the function above.
GRANT SELECT ON allowances, allowance_terms
    TO holdfast_coordinator, holdfast_worker, holdfast_reconciler, holdfast_admin;
GRANT INSERT (account_id, id, anchor, next_period_start),
      UPDATE (state, stops_at, updated_at)
    ON allowances TO holdfast_admin;
GRANT INSERT, UPDATE (amount, period, anchor, rollover_cap, created_at), DELETE
    ON allowance_terms TO holdfast_admin;
REVOKE ALL ON FUNCTION holdfast_issue_allowance(text, text, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION holdfast_issue_allowance(text, text, integer) TO holdfast_reconciler;
