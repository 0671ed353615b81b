-- A decision names the grants its batch draws from (its `breakdown`), priced
-- on a read of the account's grants. holdfast_take now takes that plan and
-- applies the burn-down order itself as before; if the two differ (another
-- transaction changed the grants between the read and the take), it
-- refuses with check_violation and the batch is priced again under the
-- account lock, so a decision never names grants its hold did not take.
--
-- p_plan_holds[k] is the index (1-based) in p_holds of the hold whose draw
-- p_plan_grants[k] / p_plan_amounts[k] is, in burn-down order per hold.
-- NULL plans are not checked (soft holds, sequential chunks).
CREATE FUNCTION holdfast_take(p_account text, p_holds uuid[], p_batches text[],
                              p_amounts bigint[], p_note text,
                              p_plan_holds int[], p_plan_grants text[], p_plan_amounts bigint[])
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    total bigint := 0;
    need bigint;
    part bigint;
    g record;
    checking boolean := p_plan_holds IS NOT NULL;
    k int := 1;
    planned int := COALESCE(array_length(p_plan_holds, 1), 0);
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
            IF checking AND (k > planned OR p_plan_holds[k] <> i OR p_plan_grants[k] <> g.id
                             OR p_plan_amounts[k] <> part) THEN
                RAISE EXCEPTION 'the grants of account % changed since hold % was priced', p_account, p_holds[i]
                    USING ERRCODE = 'check_violation';
            END IF;
            k := k + 1;
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
    IF checking AND k <= planned THEN
        RAISE EXCEPTION 'the grants of account % changed since its holds were priced', p_account
            USING ERRCODE = 'check_violation';
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION holdfast_take(p_account text, p_holds uuid[], p_batches text[],
                                         p_amounts bigint[], p_note text) RETURNS void
LANGUAGE sql AS $$
    SELECT holdfast_take(p_account, p_holds, p_batches, p_amounts, p_note, NULL, NULL, NULL)
$$;
