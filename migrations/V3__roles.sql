-- Least-privilege group roles, one per kind of process, so that a compromised
-- or buggy worker cannot add credits. Log in as a LOGIN user that is a member
-- of exactly one of these groups (see docs/operations.md, "Database roles").
--
--   holdfast_coordinator  decides batches (reserve), soft holds, cancels, dispatch
--   holdfast_worker       settles items, closes the batches it finishes
--   holdfast_reconciler   expires soft holds and overdue batches, re-dispatches, audits
--   holdfast_admin        creates accounts and grants credits (CLI, admin HTTP API)
--
-- Roles belong to the whole cluster, not to this database, and several
-- databases (and several migrators at once) may run this file: creating a
-- role tolerates one that exists already. The privileges below are per table
-- and per column, and apply to this database only.
--
-- What no group but holdfast_admin (and the tables' owner) can do:
--   * insert an account (no INSERT on accounts);
--   * raise a balance: closing a batch lowers `balance` by what it captured, so
--     the service groups may update that column, but a trigger refuses any
--     increase (accounts_balance_rises_by_grant_only);
--   * write a `grant` journal row, or any row with a positive balance_delta
--     (row-level security on journal).

DO $$
DECLARE
    name text;
BEGIN
    FOREACH name IN ARRAY ARRAY['holdfast_coordinator', 'holdfast_worker', 'holdfast_reconciler', 'holdfast_admin']
    LOOP
        -- Created before (by an administrator, or another database's
        -- migration): keep it. Checked first, so that a migrator without
        -- CREATEROLE works once the roles exist.
        CONTINUE WHEN EXISTS (SELECT 1 FROM pg_roles WHERE rolname = name);
        BEGIN
            EXECUTE format('CREATE ROLE %I NOLOGIN', name);
        EXCEPTION
            -- Created at this moment by a concurrent migration.
            WHEN duplicate_object OR unique_violation THEN NULL;
        END;
    END LOOP;
END
$$;

GRANT USAGE ON SCHEMA public TO holdfast_coordinator, holdfast_worker, holdfast_reconciler, holdfast_admin;

-- Reading is harmless and every role needs it (views, audit, settlement).
GRANT SELECT ON accounts, holds, batches, items, journal
    TO holdfast_coordinator, holdfast_worker, holdfast_reconciler, holdfast_admin;
GRANT USAGE ON SEQUENCE journal_id_seq
    TO holdfast_coordinator, holdfast_worker, holdfast_reconciler, holdfast_admin;

-- Accounts. Holds move `held`; closing a batch moves `balance` down. Only
-- the admin creates accounts. (SELECT ... FOR UPDATE needs UPDATE on a column.)
GRANT UPDATE (balance, held, updated_at) ON accounts
    TO holdfast_coordinator, holdfast_worker, holdfast_reconciler;
GRANT INSERT (id), UPDATE (balance, updated_at) ON accounts TO holdfast_admin;

-- Holds: the coordinator takes them (batch and soft holds) and resolves
-- them (cancel); workers capture into them and close them; the reconciler
-- expires and closes them. A sequential batch grows its hold by a chunk
-- wherever its previous chunk finishes (`amount`).
GRANT INSERT (account_id, amount, expires_at),
      UPDATE (amount, released, state, close_reason, expires_at, closed_at)
    ON holds TO holdfast_coordinator;
GRANT UPDATE (amount, captured, released, state, close_reason, closed_at)
    ON holds TO holdfast_worker;
GRANT UPDATE (amount, released, state, close_reason, closed_at)
    ON holds TO holdfast_reconciler;

-- Batches and items: the coordinator records decisions; the others move
-- them through their states.
GRANT INSERT ON batches, items TO holdfast_coordinator;
GRANT UPDATE (state, run_count, dispatched_at, dispatch_lease, cancel_requested_at, closed_at)
    ON batches TO holdfast_coordinator;
GRANT UPDATE (state, run_count, succeeded, failed, cancelled, dispatched_at, dispatch_lease, closed_at)
    ON batches TO holdfast_worker;
GRANT UPDATE (state, run_count, failed, dispatched_at, dispatch_lease, closed_at)
    ON batches TO holdfast_reconciler;
GRANT UPDATE (state, reason, reserved) ON items TO holdfast_coordinator;
GRANT UPDATE (state, reason, reserved, captured, overrun, settled_at) ON items TO holdfast_worker;
GRANT UPDATE (state, reason, reserved, settled_at) ON items TO holdfast_reconciler;

-- The journal is append-only (a trigger refuses UPDATE and DELETE for
-- everybody). Who may append what is row-level security: the owner is not
-- subject to it; the service groups append movements that never add credits.
GRANT INSERT ON journal TO holdfast_coordinator, holdfast_worker, holdfast_reconciler, holdfast_admin;
ALTER TABLE journal ENABLE ROW LEVEL SECURITY;
CREATE POLICY journal_read ON journal FOR SELECT
    TO holdfast_coordinator, holdfast_worker, holdfast_reconciler, holdfast_admin
    USING (true);
CREATE POLICY journal_movements ON journal FOR INSERT
    TO holdfast_coordinator, holdfast_worker, holdfast_reconciler
    WITH CHECK (kind <> 'grant' AND balance_delta <= 0);
CREATE POLICY journal_grants ON journal FOR INSERT
    TO holdfast_admin
    WITH CHECK (kind = 'grant' AND balance_delta = amount AND held_delta = 0);
COMMENT ON POLICY journal_movements ON journal IS
    'Service roles append holds, captures, settles, releases and expiries; never a grant, never a balance increase.';
COMMENT ON POLICY journal_grants ON journal IS 'holdfast_admin appends grants only.';

-- A balance goes up only by a grant: refused for anybody who is neither a
-- member of holdfast_admin nor of the table's owner (superusers are both).
CREATE FUNCTION accounts_balance_rises_by_grant_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.balance > OLD.balance
       AND NOT pg_has_role(current_user, 'holdfast_admin', 'MEMBER')
       AND NOT pg_has_role(current_user, (SELECT relowner FROM pg_class WHERE oid = TG_RELID), 'MEMBER')
    THEN
        RAISE EXCEPTION 'permission denied: only holdfast_admin may add credits to account %', OLD.id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER accounts_balance_rises_by_grant_only BEFORE UPDATE OF balance ON accounts
    FOR EACH ROW EXECUTE FUNCTION accounts_balance_rises_by_grant_only();
COMMENT ON FUNCTION accounts_balance_rises_by_grant_only() IS
    'Refuses a balance increase unless the current user is a member of holdfast_admin or of the accounts table''s owner.';
