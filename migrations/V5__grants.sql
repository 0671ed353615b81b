-- Grants: an account's credits are a set of grants (plan, purchase,
-- promotion, manual), each with a priority and an optional expiry. A hold
-- records what it took from each grant (hold_allocations); a capture is
-- posted to the grants it drew from when the hold resolves, and whatever the
-- hold does not use returns to its grant, or expires with it when the grant
-- expired (or was voided) meanwhile.
--
-- accounts.balance and accounts.held stay, as the sums over the account's
-- grants of `remaining` and `held`: the CHECK constraints on the account row
-- keep guarding against overspending, and the audit recomputes both levels
-- from the journal, whose rows now name the grant they moved.
--
-- One burn-down order everywhere (grants_burn_down below): priority
-- ascending, soonest expiry (never-expiring last), promotion, plan,
-- purchase, manual, oldest effective_at, then the grant id.
--
-- Lock order: the account row, then its grants, then the allocations. Every
-- function here that changes a grant locks its account first.

CREATE TABLE grants (
    account_id    text NOT NULL REFERENCES accounts (id),
    id            text NOT NULL CHECK (id <> '' AND length(id) <= 128),
    amount        bigint NOT NULL CHECK (amount > 0),
    remaining     bigint NOT NULL CHECK (remaining >= 0),
    held          bigint NOT NULL DEFAULT 0 CHECK (held >= 0),
    source        text NOT NULL CHECK (source IN ('plan', 'purchase', 'promotion', 'manual')),
    source_rank   smallint GENERATED ALWAYS AS (
                      CASE source WHEN 'promotion' THEN 0 WHEN 'plan' THEN 1
                                  WHEN 'purchase' THEN 2 ELSE 3 END) STORED,
    priority      integer NOT NULL DEFAULT 0,
    effective_at  timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz,
    state         text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'expired', 'voided')),
    note          text CHECK (length(note) <= 1024),
    created_at    timestamptz NOT NULL DEFAULT now(),
    closed_at     timestamptz,
    PRIMARY KEY (account_id, id),
    CONSTRAINT grants_held_within_remaining CHECK (held <= remaining),
    CONSTRAINT grants_remaining_within_amount CHECK (remaining <= amount),
    CONSTRAINT grants_expiry_after_start CHECK (expires_at IS NULL OR expires_at > effective_at),
    -- An expired or voided grant keeps only what open holds took of it.
    CONSTRAINT grants_closed_keep_only_held CHECK (
        (state = 'active' AND closed_at IS NULL)
        OR (state <> 'active' AND remaining = held AND closed_at IS NOT NULL))
);
CREATE INDEX grants_burn_down ON grants
    (account_id, priority, expires_at NULLS LAST, source_rank, effective_at, id)
    WHERE state = 'active';
CREATE INDEX grants_due ON grants (expires_at) WHERE state = 'active' AND expires_at IS NOT NULL;
COMMENT ON TABLE grants IS 'The credits of an account, one row per grant; burned down in one order (see V5__grants.sql).';
COMMENT ON COLUMN grants.account_id IS 'Account the grant belongs to.';
COMMENT ON COLUMN grants.id IS 'grant_id: the idempotency key of the grant within its account.';
COMMENT ON COLUMN grants.amount IS 'Credits granted, fixed.';
COMMENT ON COLUMN grants.remaining IS 'Credits not yet spent, expired or voided (including what open holds took).';
COMMENT ON COLUMN grants.held IS 'What open holds took of this grant (the sum of their open allocations).';
COMMENT ON COLUMN grants.source IS 'plan, purchase, promotion or manual.';
COMMENT ON COLUMN grants.source_rank IS 'Burn-down rank of the source: promotion 0, plan 1, purchase 2, manual 3.';
COMMENT ON COLUMN grants.priority IS 'Lower is used first; default 0.';
COMMENT ON COLUMN grants.effective_at IS 'When the grant started to count.';
COMMENT ON COLUMN grants.expires_at IS 'When what is left of the grant expires; NULL: never.';
COMMENT ON COLUMN grants.state IS 'active, expired (what was left expired) or voided (what was left was withdrawn).';
COMMENT ON COLUMN grants.note IS 'Free text from whoever granted it.';
COMMENT ON COLUMN grants.closed_at IS 'When the grant expired or was voided.';

CREATE TABLE hold_allocations (
    hold_id     uuid NOT NULL REFERENCES holds (id),
    account_id  text NOT NULL,
    grant_id    text NOT NULL,
    amount      bigint NOT NULL CHECK (amount > 0),
    captured    bigint NOT NULL DEFAULT 0 CHECK (captured >= 0),
    released    bigint NOT NULL DEFAULT 0 CHECK (released >= 0),
    expired     bigint NOT NULL DEFAULT 0 CHECK (expired >= 0),
    PRIMARY KEY (hold_id, account_id, grant_id),
    FOREIGN KEY (account_id, grant_id) REFERENCES grants (account_id, id),
    CONSTRAINT hold_allocations_within_amount CHECK (captured + released + expired <= amount)
);
CREATE INDEX hold_allocations_by_grant ON hold_allocations (account_id, grant_id);
COMMENT ON TABLE hold_allocations IS 'What each hold took from each grant; settled when the hold resolves.';
COMMENT ON COLUMN hold_allocations.amount IS 'Credits this hold took from the grant.';
COMMENT ON COLUMN hold_allocations.captured IS 'Of those, spent by the hold''s captures (set when the hold resolves).';
COMMENT ON COLUMN hold_allocations.released IS 'Of those, returned to the grant when the hold resolved.';
COMMENT ON COLUMN hold_allocations.expired IS 'Of those, expired or voided with the grant instead of returning.';

ALTER TABLE journal ADD COLUMN grant_id text;
COMMENT ON COLUMN journal.grant_id IS 'Grant whose credits moved, for every row with a balance or held delta.';
ALTER TABLE journal DROP CONSTRAINT journal_kind_check;
ALTER TABLE journal ADD CONSTRAINT journal_kind_check CHECK (kind IN
    ('grant', 'hold', 'capture', 'overrun', 'settle', 'release', 'expire', 'grant_expire', 'void'));
COMMENT ON COLUMN journal.kind IS
    'grant (balance+), hold (held+), capture (hold-internal), overrun (record only), settle (balance- and held- by captured), release (held- by the remainder), expire (held- by a soft hold at its TTL), grant_expire (balance-, and held- when an open hold releases it, by credits of an expired grant), void (the same for a voided grant).';
CREATE INDEX journal_by_grant ON journal (account_id, grant_id) WHERE grant_id IS NOT NULL;

-- Existing accounts: each balance becomes one manual grant with no expiry,
-- `opening`, and every open hold an allocation of it. The journal's past
-- movements were all against that one balance: they are attributed to it,
-- so that the audit recomputes the grant from the journal like any other.
INSERT INTO grants (account_id, id, amount, remaining, held, source, note, effective_at)
SELECT id, 'opening', balance, balance, held, 'manual', 'the balance before grants', created_at
FROM accounts WHERE balance > 0;
INSERT INTO hold_allocations (hold_id, account_id, grant_id, amount)
SELECT h.id, h.account_id, 'opening', h.amount
FROM holds h WHERE h.state = 'open';
ALTER TABLE journal DISABLE TRIGGER journal_append_only;
UPDATE journal j SET grant_id = 'opening'
WHERE (j.balance_delta <> 0 OR j.held_delta <> 0)
  AND EXISTS (SELECT 1 FROM grants g WHERE g.account_id = j.account_id AND g.id = 'opening');
ALTER TABLE journal ENABLE TRIGGER journal_append_only;

-- What an account can spend now: what its active grants have left, less what
-- open holds took of them, counting no grant past its expiry even before the
-- reconciler has expired it.
CREATE FUNCTION holdfast_available(p_account text) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT COALESCE(sum(remaining - held), 0)::bigint
    FROM grants
    WHERE account_id = p_account AND state = 'active'
      AND (expires_at IS NULL OR expires_at > now())
$$;

-- Take `p_amounts[i]` for hold `p_holds[i]` (batch `p_batches[i]`, or NULL
-- for a soft hold) from the grants of `p_account`, in burn-down order: one
-- allocation and one `hold` journal row per grant touched, then the
-- account's `held`. Locks the account row first. Raises check_violation
-- when the grants do not cover an amount: the caller decided on credits that
-- were spent meanwhile and decides again.
CREATE FUNCTION holdfast_take(p_account text, p_holds uuid[], p_batches text[],
                              p_amounts bigint[], p_note text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    total bigint := 0;
    need bigint;
    part bigint;
    g record;
BEGIN
    SELECT COALESCE(sum(x), 0) INTO total FROM unnest(p_amounts) AS x;
    UPDATE accounts SET held = held + total, updated_at = now() WHERE id = p_account;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no account %', p_account USING ERRCODE = 'foreign_key_violation';
    END IF;
    FOR i IN 1 .. COALESCE(array_length(p_holds, 1), 0) LOOP
        need := p_amounts[i];
        FOR g IN
            SELECT id, remaining - held AS free FROM grants
            WHERE account_id = p_account AND state = 'active' AND remaining > held
              AND (expires_at IS NULL OR expires_at > now())
            ORDER BY priority, expires_at NULLS LAST, source_rank, effective_at, id
            FOR NO KEY UPDATE
        LOOP
            EXIT WHEN need = 0;
            part := least(need, g.free);
            UPDATE grants SET held = held + part WHERE account_id = p_account AND id = g.id;
            INSERT INTO hold_allocations (hold_id, account_id, grant_id, amount)
            VALUES (p_holds[i], p_account, g.id, part)
            ON CONFLICT (hold_id, account_id, grant_id)
            DO UPDATE SET amount = hold_allocations.amount + EXCLUDED.amount;
            INSERT INTO journal (account_id, hold_id, batch_id, grant_id, kind, amount, held_delta, note)
            VALUES (p_account, p_holds[i], p_batches[i], g.id, 'hold', part, part, p_note);
            need := need - part;
        END LOOP;
        IF need > 0 THEN
            RAISE EXCEPTION 'the grants of account % are % credits short of hold %', p_account, need, p_holds[i]
                USING ERRCODE = 'check_violation';
        END IF;
    END LOOP;
END
$$;

-- Resolve hold `p_hold` (already marked resolved by the caller, who locked
-- it) with `p_captured` credits spent: the captures are posted to its
-- allocations in burn-down order (`settle`, one row per grant), the rest of
-- each allocation returns to its grant (`p_kind`: release, or expire for a
-- soft hold's TTL), or, if the grant expired or was voided meanwhile, goes
-- with it (`grant_expire` / `void`). Then the account's balance and held.
-- Returns the credits that expired with their grant, by source.
CREATE FUNCTION holdfast_resolve(p_hold uuid, p_captured bigint, p_batch text,
                                 p_kind text, p_note text)
RETURNS TABLE (source text, expired bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_account text;
    v_amount bigint;
    left_to_post bigint := p_captured;
    lost bigint := 0;
    c bigint;
    r bigint;
    a record;
BEGIN
    SELECT h.account_id, h.amount INTO v_account, v_amount FROM holds h WHERE h.id = p_hold;
    PERFORM 1 FROM accounts WHERE id = v_account FOR NO KEY UPDATE;
    FOR a IN
        SELECT al.grant_id, al.amount, g.state AS grant_state, g.source AS grant_source
        FROM hold_allocations al
        JOIN grants g ON g.account_id = al.account_id AND g.id = al.grant_id
        WHERE al.hold_id = p_hold AND al.account_id = v_account
        ORDER BY g.priority, g.expires_at NULLS LAST, g.source_rank, g.effective_at, g.id
        FOR NO KEY UPDATE OF g
    LOOP
        c := least(a.amount, left_to_post);
        r := a.amount - c;
        left_to_post := left_to_post - c;
        IF c > 0 THEN
            UPDATE grants SET remaining = remaining - c, held = held - c
            WHERE account_id = v_account AND id = a.grant_id;
            INSERT INTO journal (account_id, hold_id, batch_id, grant_id, kind, amount,
                                 balance_delta, held_delta, note)
            VALUES (v_account, p_hold, p_batch, a.grant_id, 'settle', c, -c, -c, p_note);
        END IF;
        IF r > 0 AND a.grant_state = 'active' THEN
            UPDATE grants SET held = held - r WHERE account_id = v_account AND id = a.grant_id;
            INSERT INTO journal (account_id, hold_id, batch_id, grant_id, kind, amount, held_delta, note)
            VALUES (v_account, p_hold, p_batch, a.grant_id, p_kind, r, -r, p_note);
        ELSIF r > 0 THEN
            UPDATE grants SET held = held - r, remaining = remaining - r
            WHERE account_id = v_account AND id = a.grant_id;
            INSERT INTO journal (account_id, hold_id, batch_id, grant_id, kind, amount,
                                 balance_delta, held_delta, note)
            VALUES (v_account, p_hold, p_batch, a.grant_id,
                    CASE a.grant_state WHEN 'voided' THEN 'void' ELSE 'grant_expire' END,
                    r, -r, -r, 'released by ' || COALESCE(p_note, 'a hold') || ' after the grant ' || a.grant_state);
            lost := lost + r;
            IF a.grant_state = 'expired' THEN
                source := a.grant_source;
                expired := r;
                RETURN NEXT;
            END IF;
        END IF;
        UPDATE hold_allocations
        SET captured = c,
            released = CASE WHEN a.grant_state = 'active' THEN r ELSE 0 END,
            expired = CASE WHEN a.grant_state = 'active' THEN 0 ELSE r END
        WHERE hold_id = p_hold AND account_id = v_account AND grant_id = a.grant_id;
    END LOOP;
    IF left_to_post > 0 THEN
        RAISE EXCEPTION 'hold % captured % credits more than its allocations', p_hold, left_to_post
            USING ERRCODE = 'check_violation';
    END IF;
    UPDATE accounts SET balance = balance - p_captured - lost, held = held - v_amount, updated_at = now()
    WHERE id = v_account;
END
$$;

-- Expire what is left of the grants of `p_account` past their expiry (never
-- before it: the database's clock decides). What open holds took stays with
-- them. Locks the account first. Returns what expired, per grant.
CREATE FUNCTION holdfast_expire_grants(p_account text)
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

-- Void what is left of grant `p_grant` of `p_account` (never what open holds
-- took of it: that goes when they release it). Returns the credits voided,
-- or NULL when the grant is not active (already expired or voided).
CREATE FUNCTION holdfast_void_grant(p_account text, p_grant text, p_note text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    free bigint;
BEGIN
    PERFORM 1 FROM accounts WHERE id = p_account FOR NO KEY UPDATE;
    SELECT remaining - held INTO free FROM grants
    WHERE account_id = p_account AND id = p_grant AND state = 'active'
    FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    UPDATE grants SET state = 'voided', remaining = held, closed_at = now()
    WHERE account_id = p_account AND id = p_grant;
    IF free > 0 THEN
        INSERT INTO journal (account_id, grant_id, kind, amount, balance_delta, note)
        VALUES (p_account, p_grant, 'void', free, -free, COALESCE(p_note, 'voided'));
        UPDATE accounts SET balance = balance - free, updated_at = now() WHERE id = p_account;
    END IF;
    RETURN free;
END
$$;

-- Privileges (see V3__roles.sql): the service roles move credits between
-- grants and holds; only holdfast_admin adds or voids grants.
GRANT SELECT ON grants, hold_allocations
    TO holdfast_coordinator, holdfast_worker, holdfast_reconciler, holdfast_admin;
GRANT UPDATE (remaining, held, state, closed_at) ON grants
    TO holdfast_coordinator, holdfast_worker, holdfast_reconciler, holdfast_admin;
GRANT INSERT ON grants TO holdfast_admin;
GRANT INSERT, UPDATE (amount, captured, released, expired) ON hold_allocations
    TO holdfast_coordinator, holdfast_worker, holdfast_reconciler;
CREATE POLICY journal_voids ON journal FOR INSERT
    TO holdfast_admin
    WITH CHECK (kind = 'void' AND balance_delta = -amount AND held_delta = 0);
COMMENT ON POLICY journal_voids ON journal IS 'holdfast_admin voids what a grant has left.';
