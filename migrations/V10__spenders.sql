-- Spenders: a tree of named budgets inside an account (a workspace's teams,
-- their members, their keys). Each spender may have a limit per period
-- (day, week, calendar month, or none: a lifetime cap). A batch charged to a
-- spender counts against it and against every spender above it: it fits
-- only if the account's credits and the remaining limit of every spender on
-- the path from the named spender to the root cover it.
--
-- A spender's usage in a period is what holds charged to it (or to a
-- spender below it) hold now, plus what they captured, in that period:
-- `spender_usage`, one row per spender and period start. A hold records
-- the spenders it counts against, and the period it counts in at each level
-- (`hold_spenders`): a batch that started in one period counts in that
-- period, whenever it finishes.
--
-- Periods: with no anchor, calendar periods in UTC (a day from midnight, a
-- week from Monday, a month from the 1st); with an anchor, anchor + k·period
-- as for allowances (holdfast_period_after, V7).
--
-- Lock order: the account row, then the spenders' usage rows from the root
-- to the leaf, then the allocation rows. Every function here that changes
-- usage runs after its caller locked the account (holdfast_take,
-- holdfast_resolve), and locks it again itself (a no-op then), so the
-- account lock serialises every change to an account's spenders.

CREATE TABLE spenders (
    account_id    text NOT NULL REFERENCES accounts (id),
    id            text NOT NULL CHECK (id <> '' AND length(id) <= 128),
    parent_id     text,
    kind          text NOT NULL DEFAULT 'spender' CHECK (kind <> '' AND length(kind) <= 32),
    credit_limit  bigint CHECK (credit_limit >= 0),
    period        text NOT NULL DEFAULT 'none' CHECK (period IN ('day', 'week', 'month', 'none')),
    anchor        timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, id),
    FOREIGN KEY (account_id, parent_id) REFERENCES spenders (account_id, id),
    CONSTRAINT spenders_not_own_parent CHECK (parent_id IS NULL OR parent_id <> id),
    CONSTRAINT spenders_anchor_with_period CHECK (anchor IS NULL OR period <> 'none')
);
CREATE INDEX spenders_children ON spenders (account_id, parent_id) WHERE parent_id IS NOT NULL;
COMMENT ON TABLE spenders IS 'A tree of budgets inside an account, each with an optional limit per period (see V10__spenders.sql).';
COMMENT ON COLUMN spenders.id IS 'spender_id: unique within the account (1..128 characters).';
COMMENT ON COLUMN spenders.parent_id IS 'The spender above this one (same account); NULL for a root. No cycles, at most 8 levels (spenders_tree).';
COMMENT ON COLUMN spenders.kind IS 'What the spender is to people (team, member, key, ...): the word decisions use.';
COMMENT ON COLUMN spenders.credit_limit IS 'Most credits held plus captured per period; NULL: no limit (usage is still counted).';
COMMENT ON COLUMN spenders.period IS 'day, week, month (calendar, UTC unless anchored) or none (a lifetime cap).';
COMMENT ON COLUMN spenders.anchor IS 'Start of one period; periods start at anchor + k·period. NULL: calendar periods in UTC.';

-- No cycles, at most 8 levels: walked up from the new parent, and down
-- from the spender (a moved subtree keeps its height).
CREATE FUNCTION spenders_tree() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    above int;
    below int;
    cycle boolean;
BEGIN
    IF NEW.parent_id IS NULL THEN
        above := 0;
    ELSE
        WITH RECURSIVE up(id, parent_id, n) AS (
            SELECT id, parent_id, 1 FROM spenders WHERE account_id = NEW.account_id AND id = NEW.parent_id
            UNION ALL
            SELECT s.id, s.parent_id, up.n + 1 FROM spenders s JOIN up ON s.account_id = NEW.account_id AND s.id = up.parent_id
            WHERE up.n <= 9 AND up.id <> NEW.id
        )
        SELECT max(n), bool_or(id = NEW.id) INTO above, cycle FROM up;
        IF cycle THEN
            RAISE EXCEPTION 'spender % cannot be placed under %: % is below it', NEW.id, NEW.parent_id, NEW.parent_id
                USING ERRCODE = 'check_violation', CONSTRAINT = 'spenders_tree';
        END IF;
    END IF;
    WITH RECURSIVE down(id, n) AS (
        SELECT NEW.id, 1
        UNION ALL
        SELECT s.id, down.n + 1 FROM spenders s JOIN down ON s.account_id = NEW.account_id AND s.parent_id = down.id
        WHERE down.n <= 9
    )
    SELECT max(n) INTO below FROM down;
    IF COALESCE(above, 0) + below > 8 THEN
        RAISE EXCEPTION 'spender % would be % levels deep; spenders nest at most 8 levels', NEW.id, COALESCE(above, 0) + below
            USING ERRCODE = 'check_violation', CONSTRAINT = 'spenders_tree';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER spenders_tree BEFORE INSERT OR UPDATE OF parent_id ON spenders
    FOR EACH ROW EXECUTE FUNCTION spenders_tree();

CREATE TABLE spender_usage (
    account_id    text NOT NULL REFERENCES accounts (id),
    spender_id    text NOT NULL,
    period_start  timestamptz NOT NULL,
    held          bigint NOT NULL DEFAULT 0 CHECK (held >= 0),
    used          bigint NOT NULL DEFAULT 0 CHECK (used >= 0),
    PRIMARY KEY (account_id, spender_id, period_start)
);
COMMENT ON TABLE spender_usage IS 'What each spender (with everything below it) holds and has captured, per period.';
COMMENT ON COLUMN spender_usage.period_start IS 'Start of the period (1970-01-01 UTC for period none).';
COMMENT ON COLUMN spender_usage.held IS 'Held by the open holds that count in this period.';
COMMENT ON COLUMN spender_usage.used IS 'Captured by the resolved holds that count in this period.';

CREATE TABLE hold_spenders (
    hold_id       uuid NOT NULL REFERENCES holds (id),
    account_id    text NOT NULL,
    spender_id    text NOT NULL,
    depth         smallint NOT NULL CHECK (depth BETWEEN 1 AND 8),
    period_start  timestamptz NOT NULL,
    amount        bigint NOT NULL CHECK (amount > 0),
    captured      bigint NOT NULL DEFAULT 0 CHECK (captured >= 0),
    PRIMARY KEY (hold_id, spender_id),
    FOREIGN KEY (account_id, spender_id, period_start)
        REFERENCES spender_usage (account_id, spender_id, period_start),
    CONSTRAINT hold_spenders_capture_within_amount CHECK (captured <= amount)
);
CREATE INDEX hold_spenders_by_usage ON hold_spenders (account_id, spender_id, period_start);
COMMENT ON TABLE hold_spenders IS 'The spenders a hold counts against (its spender and every one above it), and the period it counts in at each.';
COMMENT ON COLUMN hold_spenders.depth IS '1 for the root, the hold''s own spender deepest.';
COMMENT ON COLUMN hold_spenders.amount IS 'The hold''s amount: it counts whole at every level.';
COMMENT ON COLUMN hold_spenders.captured IS 'What the hold captured, set when it resolves (0 while open).';

-- The period of an anchored spender that `p_at` falls in, and when it
-- ends: the last boundary at or before p_at (there is one within the
-- period's shortest length before it), and the next one.
CREATE FUNCTION holdfast_spender_period_anchored(p_period text, p_anchor timestamptz, p_at timestamptz,
                                                 OUT period_start timestamptz, OUT resets_at timestamptz)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    n timestamptz;
BEGIN
    IF p_at < p_anchor THEN
        -- Before the first period: the one that ends at the anchor.
        period_start := p_anchor - ('1 ' || p_period)::interval;
        resets_at := p_anchor;
        RETURN;
    END IF;
    period_start := holdfast_period_after(p_anchor, p_period,
        p_at - CASE p_period WHEN 'month' THEN interval '31 days' WHEN 'week' THEN interval '7 days' ELSE interval '1 day' END);
    LOOP
        n := holdfast_period_after(p_anchor, p_period, period_start);
        EXIT WHEN n > p_at;
        period_start := n;
    END LOOP;
    resets_at := n;
END
$$;

-- The period that `p_at` falls in, and when it ends (NULL: never). Plain
-- SQL, so that the planner inlines it into the path query: calendar periods
-- in UTC without an anchor, the anchored grid otherwise.
CREATE FUNCTION holdfast_spender_period(p_period text, p_anchor timestamptz, p_at timestamptz,
                                        OUT period_start timestamptz, OUT resets_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT CASE
               WHEN p_period = 'none' THEN timestamptz '1970-01-01 00:00:00+00'
               WHEN p_anchor IS NULL THEN date_trunc(p_period, p_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
               ELSE (holdfast_spender_period_anchored(p_period, p_anchor, p_at)).period_start
           END,
           CASE
               WHEN p_period = 'none' THEN NULL
               WHEN p_anchor IS NULL
                   THEN (date_trunc(p_period, p_at AT TIME ZONE 'UTC') + ('1 ' || p_period)::interval) AT TIME ZONE 'UTC'
               ELSE (holdfast_spender_period_anchored(p_period, p_anchor, p_at)).resets_at
           END
$$;

-- The path from spender `p_spender` of `p_account` up to its root, root
-- first (depth 1), each with its limit and its usage in the period `p_at`
-- falls in. No rows: no such spender.
CREATE FUNCTION holdfast_spender_path(p_account text, p_spender text, p_at timestamptz)
RETURNS TABLE (spender_id text, depth int, kind text, credit_limit bigint, period text,
               period_start timestamptz, resets_at timestamptz, held bigint, used bigint)
LANGUAGE sql STABLE AS $$
    WITH RECURSIVE up AS (
        SELECT s.id, s.parent_id, s.kind, s.credit_limit, s.period, s.anchor, 1 AS lvl
        FROM spenders s WHERE s.account_id = p_account AND s.id = p_spender
        UNION ALL
        SELECT s.id, s.parent_id, s.kind, s.credit_limit, s.period, s.anchor, up.lvl + 1
        FROM spenders s JOIN up ON s.account_id = p_account AND s.id = up.parent_id
        WHERE up.lvl < 8
    )
    SELECT up.id, (max(up.lvl) OVER () - up.lvl + 1)::int, up.kind, up.credit_limit, up.period,
           p.period_start, p.resets_at, COALESCE(u.held, 0), COALESCE(u.used, 0)
    FROM up
    -- holdfast_spender_period, written out: a function call per level cost
    -- more than the rest of the path (it is not inlined in a lateral join).
    CROSS JOIN LATERAL (
        SELECT CASE
                   WHEN up.period = 'none' THEN timestamptz '1970-01-01 00:00:00+00'
                   WHEN up.anchor IS NULL
                       THEN date_trunc(up.period, p_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
                   ELSE (holdfast_spender_period_anchored(up.period, up.anchor, p_at)).period_start
               END AS period_start,
               CASE
                   WHEN up.period = 'none' THEN NULL
                   WHEN up.anchor IS NULL
                       THEN (date_trunc(up.period, p_at AT TIME ZONE 'UTC') + ('1 ' || up.period)::interval)
                            AT TIME ZONE 'UTC'
                   ELSE (holdfast_spender_period_anchored(up.period, up.anchor, p_at)).resets_at
               END AS resets_at
    ) p
    LEFT JOIN spender_usage u
      ON u.account_id = p_account AND u.spender_id = up.id AND u.period_start = p.period_start
    ORDER BY 2
$$;

-- Charge hold `p_holds[i]` (of `p_amounts[i]` credits, of account
-- `p_accounts[i]`) to spender `p_spenders[i]` (NULL: to none) and every
-- spender above it, in the period each is in now: a fixed number of
-- statements for a whole group of holds, of any number of accounts. The
-- accounts are locked first (a no-op when the caller's holdfast_take did),
-- then the usage rows are written root first. Raises check_violation when a
-- level's limit would be exceeded (the caller decided on usage that changed
-- meanwhile, and decides again under the account lock), and
-- foreign_key_violation for an unknown spender.
CREATE FUNCTION holdfast_spender_take(p_accounts text[], p_holds uuid[], p_spenders text[], p_amounts bigint[])
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    charged int;
    found_paths int;
    w_accounts text[];
    w_holds uuid[];
    w_amounts bigint[];
    w_spenders text[];
    w_depths int[];
    w_periods timestamptz[];
    w_limits bigint[];
    over record;
BEGIN
    SELECT count(*) INTO charged FROM unnest(p_spenders) s WHERE s IS NOT NULL;
    IF charged = 0 THEN
        RETURN;
    END IF;
    PERFORM 1 FROM accounts WHERE id = ANY(p_accounts) ORDER BY id FOR NO KEY UPDATE;
    -- Every level of every hold's path, read after the account locks (a
    -- statement of its own: it sees what a transaction we waited for left).
    SELECT array_agg(t.account), array_agg(t.hold), array_agg(t.amount), array_agg(p.spender_id),
           array_agg(p.depth), array_agg(p.period_start), array_agg(p.credit_limit), count(DISTINCT t.i)
    INTO w_accounts, w_holds, w_amounts, w_spenders, w_depths, w_periods, w_limits, found_paths
    FROM unnest(p_accounts, p_holds, p_spenders, p_amounts) WITH ORDINALITY AS t(account, hold, spender, amount, i)
    CROSS JOIN LATERAL holdfast_spender_path(t.account, t.spender, now()) p
    WHERE t.spender IS NOT NULL;
    IF found_paths < charged THEN
        RAISE EXCEPTION 'a spender named by a hold does not exist in its account'
            USING ERRCODE = 'foreign_key_violation', CONSTRAINT = 'spender_unknown';
    END IF;

    WITH w AS (
        SELECT * FROM unnest(w_accounts, w_holds, w_amounts, w_spenders, w_depths, w_periods, w_limits)
            AS w(account_id, hold_id, amount, spender_id, depth, period_start, credit_limit)
    ), up AS (
        INSERT INTO spender_usage AS u (account_id, spender_id, period_start, held)
        SELECT account_id, spender_id, period_start, sum(amount)
        FROM w GROUP BY account_id, spender_id, period_start
        ORDER BY account_id, min(depth), spender_id
        ON CONFLICT (account_id, spender_id, period_start)
        DO UPDATE SET held = u.held + EXCLUDED.held
        RETURNING u.account_id, u.spender_id, u.period_start, u.held + u.used AS total
    )
    SELECT up.account_id, up.spender_id, up.total, l.credit_limit INTO over
    FROM up JOIN (SELECT DISTINCT account_id, spender_id, period_start, credit_limit FROM w) l
      ON l.account_id = up.account_id AND l.spender_id = up.spender_id AND l.period_start = up.period_start
    WHERE l.credit_limit IS NOT NULL AND up.total > l.credit_limit
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'spender % of account % would use % of its limit of %',
            over.spender_id, over.account_id, over.total, over.credit_limit
            USING ERRCODE = 'check_violation', CONSTRAINT = 'spender_limit';
    END IF;

    INSERT INTO hold_spenders (hold_id, account_id, spender_id, depth, period_start, amount)
    SELECT hold_id, account_id, spender_id, depth, period_start, sum(amount)
    FROM unnest(w_accounts, w_holds, w_amounts, w_spenders, w_depths, w_periods)
        AS w(account_id, hold_id, amount, spender_id, depth, period_start)
    GROUP BY hold_id, account_id, spender_id, depth, period_start
    ON CONFLICT (hold_id, spender_id) DO UPDATE SET amount = hold_spenders.amount + EXCLUDED.amount;
END
$$;

-- What the spenders of hold `p_hold` have left for it to grow by (a
-- sequential batch's next chunk), each in the period the hold counts in;
-- NULL when none of them has a limit.
CREATE FUNCTION holdfast_spender_room(p_hold uuid) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT min(greatest(s.credit_limit - u.held - u.used, 0))
    FROM hold_spenders l
    JOIN spenders s ON s.account_id = l.account_id AND s.id = l.spender_id
    JOIN spender_usage u
      ON u.account_id = l.account_id AND u.spender_id = l.spender_id AND u.period_start = l.period_start
    WHERE l.hold_id = p_hold AND s.credit_limit IS NOT NULL
$$;

-- Grow hold `p_hold` by `p_amount` at every spender it counts against, in
-- the period it counts in, root first. Raises check_violation past a limit.
CREATE FUNCTION holdfast_spender_grow(p_hold uuid, p_amount bigint) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    l record;
    total bigint;
BEGIN
    PERFORM 1 FROM accounts a JOIN holds h ON h.account_id = a.id WHERE h.id = p_hold FOR NO KEY UPDATE OF a;
    FOR l IN SELECT * FROM hold_spenders WHERE hold_id = p_hold ORDER BY depth LOOP
        UPDATE spender_usage u SET held = u.held + p_amount
        WHERE u.account_id = l.account_id AND u.spender_id = l.spender_id AND u.period_start = l.period_start
        RETURNING u.held + u.used INTO total;
        IF total > (SELECT credit_limit FROM spenders WHERE account_id = l.account_id AND id = l.spender_id) THEN
            RAISE EXCEPTION 'spender % of account % would use % of its limit', l.spender_id, l.account_id, total
                USING ERRCODE = 'check_violation', CONSTRAINT = 'spender_limit';
        END IF;
        UPDATE hold_spenders SET amount = amount + p_amount WHERE hold_id = p_hold AND spender_id = l.spender_id;
    END LOOP;
END
$$;

-- Resolve the spenders of hold `p_hold`, which captured `p_captured`: at
-- every level, in the period the hold counts in, what it held goes and what
-- it captured is used. Root first, after the account (the caller locked it).
CREATE FUNCTION holdfast_spender_resolve(p_hold uuid, p_captured bigint) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    l record;
BEGIN
    FOR l IN SELECT * FROM hold_spenders WHERE hold_id = p_hold ORDER BY depth LOOP
        UPDATE spender_usage u SET held = u.held - l.amount, used = u.used + least(p_captured, l.amount)
        WHERE u.account_id = l.account_id AND u.spender_id = l.spender_id AND u.period_start = l.period_start;
        UPDATE hold_spenders SET captured = least(p_captured, l.amount)
        WHERE hold_id = p_hold AND spender_id = l.spender_id;
    END LOOP;
END
$$;

-- holdfast_resolve (V5) and then the spenders of the hold, in one call.
CREATE FUNCTION holdfast_resolve_spending(p_hold uuid, p_captured bigint, p_batch text,
                                          p_kind text, p_note text)
RETURNS TABLE (source text, expired bigint)
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY SELECT r.source, r.expired FROM holdfast_resolve(p_hold, p_captured, p_batch, p_kind, p_note) r;
    PERFORM holdfast_spender_resolve(p_hold, p_captured);
END
$$;

-- Privileges (see V3__roles.sql): holdfast_admin manages the tree; the
-- coordinator charges holds to spenders; whoever resolves or grows a hold
-- (coordinator, worker, reconciler) moves the usage it counts in.
GRANT SELECT ON spenders, spender_usage, hold_spenders
    TO holdfast_coordinator, holdfast_worker, holdfast_reconciler, holdfast_admin;
GRANT INSERT, UPDATE, DELETE ON spenders TO holdfast_admin;
GRANT INSERT ON spender_usage, hold_spenders TO holdfast_coordinator;
GRANT UPDATE (held, used) ON spender_usage
    TO holdfast_coordinator, holdfast_worker, holdfast_reconciler;
GRANT UPDATE (amount, captured) ON hold_spenders
    TO holdfast_coordinator, holdfast_worker, holdfast_reconciler;
