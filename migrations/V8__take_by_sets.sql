-- holdfast_take decides and writes a group of holds' draws with a fixed
-- number of statements, however many grants the holds span: the draws are
-- computed in one statement over the locked grants, then the grants, the
-- allocations and the journal are each written by one statement. Before, it
-- ran three statements per grant touched by each hold, so a decision on an
-- account of several grants cost noticeably more than one on an account of
-- one grant.
--
-- The burn-down is the same rule as before (V5, V6): the holds, in order,
-- take the grants' free credits in burn-down order, each starting where the
-- one before it stopped. Laid end to end, hold i needs the credits
-- [H(i-1), H(i)) of the running sum of the amounts, and grant j offers
-- [G(j-1), G(j)) of the running sum of what the grants have free; hold i
-- draws from grant j exactly the overlap of the two intervals. A hold of
-- 0 credits draws nothing.
--
-- The plan check (p_plan_*: the draws the decision was priced on, in
-- burn-down order per hold) compares the draws as a whole: any difference
-- is a check violation, as before, and the caller prices again under the
-- account lock. The account row is locked (by its update) in a statement
-- before the one that reads the grants, so under READ COMMITTED that read
-- sees what a transaction this one waited for left.
CREATE OR REPLACE FUNCTION holdfast_take(p_account text, p_holds uuid[], p_batches text[],
                                         p_amounts bigint[], p_note text,
                                         p_plan_holds int[], p_plan_grants text[], p_plan_amounts bigint[])
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    total bigint;
    offered_total bigint;
    d_holds int[];
    d_grants text[];
    d_amounts bigint[];
BEGIN
    SELECT COALESCE(sum(x), 0) INTO total FROM unnest(p_amounts) AS x;
    UPDATE accounts SET held = held + total, updated_at = now() WHERE id = p_account;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no account %', p_account USING ERRCODE = 'foreign_key_violation';
    END IF;

    WITH offered AS (
        SELECT id, remaining - held AS free, priority, expires_at, source_rank, effective_at
        FROM grants
        WHERE account_id = p_account AND state = 'active' AND remaining > held
          AND (expires_at IS NULL OR expires_at > now())
        FOR NO KEY UPDATE
    ), g AS (
        SELECT id, n, running - free AS lo, running AS hi
        FROM (SELECT id, free,
                     row_number() OVER burn_down AS n,
                     (sum(free) OVER burn_down)::bigint AS running
              FROM offered
              WINDOW burn_down AS (ORDER BY priority, expires_at NULLS LAST, source_rank, effective_at, id)) s
    ), h AS (
        SELECT i::int AS i, running - amount AS lo, running AS hi
        FROM (SELECT i, amount, (sum(amount) OVER (ORDER BY i))::bigint AS running
              FROM unnest(p_amounts) WITH ORDINALITY AS u(amount, i)) s
    ), draws AS (
        SELECT h.i, g.n, g.id, least(h.hi, g.hi) - greatest(h.lo, g.lo) AS part
        FROM h JOIN g ON g.lo < h.hi AND h.lo < g.hi
    )
    SELECT COALESCE((SELECT max(hi) FROM g), 0),
           COALESCE(array_agg(i ORDER BY i, n), '{}'),
           COALESCE(array_agg(id ORDER BY i, n), '{}'),
           COALESCE(array_agg(part ORDER BY i, n), '{}')
    INTO offered_total, d_holds, d_grants, d_amounts
    FROM draws;

    IF offered_total < total THEN
        RAISE EXCEPTION 'the grants of account % are % credits short of its holds', p_account, total - offered_total
            USING ERRCODE = 'check_violation';
    END IF;
    IF p_plan_holds IS NOT NULL
       AND (d_holds <> p_plan_holds OR d_grants <> p_plan_grants OR d_amounts <> p_plan_amounts) THEN
        RAISE EXCEPTION 'the grants of account % changed since its holds were priced', p_account
            USING ERRCODE = 'check_violation';
    END IF;

    UPDATE grants g SET held = g.held + d.part
    FROM (SELECT id, sum(part)::bigint AS part FROM unnest(d_grants, d_amounts) AS t(id, part) GROUP BY id) d
    WHERE g.account_id = p_account AND g.id = d.id;

    INSERT INTO hold_allocations (hold_id, account_id, grant_id, amount)
    SELECT p_holds[t.i], p_account, t.id, sum(t.part)::bigint
    FROM unnest(d_holds, d_grants, d_amounts) AS t(i, id, part)
    GROUP BY p_holds[t.i], t.id
    ON CONFLICT (hold_id, account_id, grant_id)
    DO UPDATE SET amount = hold_allocations.amount + EXCLUDED.amount;

    INSERT INTO journal (account_id, hold_id, batch_id, grant_id, kind, amount, held_delta, note)
    SELECT p_account, p_holds[t.i], p_batches[t.i], t.id, 'hold', t.part, t.part, p_note
    FROM unnest(d_holds, d_grants, d_amounts) WITH ORDINALITY AS t(i, id, part, k)
    ORDER BY t.k;
END
$$;
