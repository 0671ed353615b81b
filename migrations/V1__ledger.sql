-- Holdfast's ledger. PostgreSQL is the source of truth for credits: every
-- amount is an integer in the account's smallest credit unit, never a float.
--
-- Money moves in four places only: a grant (balance up), a hold (held up, at
-- reserve), the close of a hold (balance down by what was captured, held down
-- by the whole hold) and the expiry of a soft hold (held down). Captures touch
-- item, batch and hold rows only, so the account row stays off the per-item
-- path. Every movement is also an append-only journal row; `holdfast audit`
-- recomputes the balances from it.

CREATE TABLE accounts (
    -- The producer's own account identifier.
    id          text PRIMARY KEY CHECK (id <> '' AND length(id) <= 128),
    -- Posted credits: grants minus everything captured by closed holds.
    balance     bigint NOT NULL DEFAULT 0,
    -- Sum of the amounts of this account's open holds.
    held        bigint NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    -- A bug in the code cannot overspend: the database refuses it.
    CONSTRAINT accounts_held_not_negative CHECK (held >= 0),
    CONSTRAINT accounts_available_not_negative CHECK (balance - held >= 0)
);
COMMENT ON TABLE accounts IS 'Credit accounts; available = balance - held, never negative.';
COMMENT ON COLUMN accounts.id IS 'The producer''s account identifier (1..128 characters).';
COMMENT ON COLUMN accounts.balance IS 'Posted credits: grants minus captures of closed holds.';
COMMENT ON COLUMN accounts.held IS 'Sum of the amounts of open holds.';
COMMENT ON COLUMN accounts.created_at IS 'When the account was created.';
COMMENT ON COLUMN accounts.updated_at IS 'Last change to balance or held.';

CREATE TABLE holds (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    account_id   text NOT NULL REFERENCES accounts (id),
    -- The reserved total. Never changes after the hold is taken.
    amount       bigint NOT NULL CHECK (amount > 0),
    -- Sum of the captures of the batch's items so far.
    captured     bigint NOT NULL DEFAULT 0 CHECK (captured >= 0),
    -- What went back to available when the hold resolved.
    released     bigint NOT NULL DEFAULT 0 CHECK (released >= 0),
    state        text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'closed', 'expired')),
    -- Why the hold resolved: completed, deadline, cancelled, ttl.
    close_reason text,
    -- Soft holds only: when the reconciler may expire it (never before).
    expires_at   timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now(),
    closed_at    timestamptz,
    CONSTRAINT holds_captures_within_amount CHECK (captured + released <= amount),
    -- An open hold has released nothing; a resolved hold accounts for every credit.
    CONSTRAINT holds_resolved_exactly CHECK (
        (state = 'open' AND released = 0 AND closed_at IS NULL)
        OR (state <> 'open' AND captured + released = amount AND closed_at IS NOT NULL))
);
CREATE INDEX holds_open_by_expiry ON holds (expires_at) WHERE state = 'open' AND expires_at IS NOT NULL;
COMMENT ON TABLE holds IS 'Reservations: one per granted batch (or a soft hold waiting for its batch). Resolves exactly once.';
COMMENT ON COLUMN holds.id IS 'Hold identifier (also the reservation_id of a soft hold).';
COMMENT ON COLUMN holds.account_id IS 'Account whose credits are held.';
COMMENT ON COLUMN holds.amount IS 'Reserved total, fixed at reserve time.';
COMMENT ON COLUMN holds.captured IS 'Sum of item captures against this hold.';
COMMENT ON COLUMN holds.released IS 'Unused remainder returned when the hold resolved (amount - captured).';
COMMENT ON COLUMN holds.state IS 'open, closed (batch finished, remainder released) or expired (soft hold TTL).';
COMMENT ON COLUMN holds.close_reason IS 'completed, deadline, cancelled or ttl.';
COMMENT ON COLUMN holds.expires_at IS 'Soft holds: expiry deadline; NULL for a batch''s own hold.';
COMMENT ON COLUMN holds.created_at IS 'When the hold was taken.';
COMMENT ON COLUMN holds.closed_at IS 'When the hold resolved; NULL while open.';

CREATE TABLE batches (
    -- The producer's batch_id: the idempotency key of the request.
    id              text PRIMARY KEY CHECK (id <> '' AND length(id) <= 128),
    account_id      text NOT NULL REFERENCES accounts (id),
    -- SHA-256 of the canonical request body: same id + other body = conflict.
    request_hash    bytea NOT NULL,
    mode            text NOT NULL,
    state           text NOT NULL CHECK (state IN
                        ('denied', 'granted', 'dispatched', 'completed', 'expired', 'cancelled')),
    -- The decision exactly as sent; replayed verbatim on redelivery.
    decision        jsonb NOT NULL,
    hold_id         uuid UNIQUE REFERENCES holds (id),
    item_count      integer NOT NULL CHECK (item_count > 0),
    run_count       integer NOT NULL DEFAULT 0 CHECK (run_count >= 0 AND run_count <= item_count),
    succeeded       integer NOT NULL DEFAULT 0 CHECK (succeeded >= 0),
    failed          integer NOT NULL DEFAULT 0 CHECK (failed >= 0),
    reply_to        text,
    correlation_id  text,
    deadline_at     timestamptz,
    dispatched_at   timestamptz,
    -- A reconciler re-dispatching this batch holds it until then (several may run).
    dispatch_lease  timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    closed_at       timestamptz,
    CONSTRAINT batches_settled_within_run CHECK (succeeded + failed <= run_count),
    CONSTRAINT batches_granted_have_hold CHECK ((state = 'denied') = (hold_id IS NULL))
);
CREATE INDEX batches_open ON batches (created_at) WHERE state IN ('granted', 'dispatched');
CREATE INDEX batches_by_account ON batches (account_id, created_at);
COMMENT ON TABLE batches IS 'One row per batch request decided (granted or denied); kept after completion.';
COMMENT ON COLUMN batches.id IS 'Producer batch_id, the idempotency key.';
COMMENT ON COLUMN batches.account_id IS 'Account charged.';
COMMENT ON COLUMN batches.request_hash IS 'SHA-256 of the canonical request; a different body under the same id is a conflict.';
COMMENT ON COLUMN batches.mode IS 'all_or_nothing, first_fit, priority_fit, selected or sequential.';
COMMENT ON COLUMN batches.state IS 'denied | granted -> dispatched -> completed | expired | cancelled.';
COMMENT ON COLUMN batches.decision IS 'The decision message as sent, replayed on redelivery.';
COMMENT ON COLUMN batches.hold_id IS 'The batch''s hold; NULL when denied.';
COMMENT ON COLUMN batches.item_count IS 'Items in the request.';
COMMENT ON COLUMN batches.run_count IS 'Items chosen to run (the rest are skipped).';
COMMENT ON COLUMN batches.succeeded IS 'Items settled as succeeded.';
COMMENT ON COLUMN batches.failed IS 'Items settled as failed (never charged).';
COMMENT ON COLUMN batches.reply_to IS 'AMQP reply_to of the request, for the decision and the summary.';
COMMENT ON COLUMN batches.correlation_id IS 'AMQP correlation_id of the request.';
COMMENT ON COLUMN batches.deadline_at IS 'Execution deadline: past it the reconciler fails unsettled items and closes the batch.';
COMMENT ON COLUMN batches.dispatched_at IS 'When the broker confirmed every item job.';
COMMENT ON COLUMN batches.dispatch_lease IS 'Re-dispatch claim held by one reconciler until this time.';
COMMENT ON COLUMN batches.created_at IS 'When the decision was taken.';
COMMENT ON COLUMN batches.closed_at IS 'When the batch finished and its hold resolved.';

CREATE TABLE items (
    batch_id        text NOT NULL REFERENCES batches (id),
    item_id         text NOT NULL CHECK (item_id <> '' AND length(item_id) <= 128),
    position        integer NOT NULL,
    estimated_cost  bigint NOT NULL CHECK (estimated_cost > 0),
    priority        integer NOT NULL DEFAULT 0,
    -- Part of the hold set aside for this item; 0 for a skipped item.
    reserved        bigint NOT NULL CHECK (reserved >= 0),
    state           text NOT NULL CHECK (state IN ('pending', 'succeeded', 'failed', 'skipped')),
    -- Why an item was skipped or failed.
    reason          text,
    captured        bigint NOT NULL DEFAULT 0,
    overrun         bigint NOT NULL DEFAULT 0 CHECK (overrun >= 0),
    payload         jsonb NOT NULL DEFAULT 'null',
    settled_at      timestamptz,
    PRIMARY KEY (batch_id, item_id),
    CONSTRAINT items_capture_within_reservation CHECK (captured >= 0 AND captured <= reserved),
    CONSTRAINT items_failed_not_charged CHECK (state <> 'failed' OR captured = 0),
    CONSTRAINT items_skipped_hold_nothing CHECK (state <> 'skipped' OR reserved = 0)
);
COMMENT ON TABLE items IS 'The items of granted batches, run or skipped.';
COMMENT ON COLUMN items.batch_id IS 'Batch the item belongs to.';
COMMENT ON COLUMN items.item_id IS 'Producer item_id, unique within the batch.';
COMMENT ON COLUMN items.position IS 'Index of the item in the request.';
COMMENT ON COLUMN items.estimated_cost IS 'Producer estimate, the price reserved when the item runs.';
COMMENT ON COLUMN items.priority IS 'Producer priority (higher first) for priority_fit.';
COMMENT ON COLUMN items.reserved IS 'Credits of the hold set aside for this item; 0 when skipped.';
COMMENT ON COLUMN items.state IS 'pending (held, not settled), succeeded, failed or skipped.';
COMMENT ON COLUMN items.reason IS 'Why the item was skipped or failed.';
COMMENT ON COLUMN items.captured IS 'Credits charged: min(actual, reserved); 0 when failed.';
COMMENT ON COLUMN items.overrun IS 'Actual cost above the reservation, recorded, not charged.';
COMMENT ON COLUMN items.payload IS 'Opaque producer payload handed to the generator.';
COMMENT ON COLUMN items.settled_at IS 'When the item was captured or failed.';

CREATE TABLE journal (
    id             bigserial PRIMARY KEY,
    at             timestamptz NOT NULL DEFAULT now(),
    account_id     text NOT NULL REFERENCES accounts (id),
    hold_id        uuid REFERENCES holds (id),
    batch_id       text,
    item_id        text,
    kind           text NOT NULL CHECK (kind IN
                       ('grant', 'hold', 'capture', 'overrun', 'settle', 'release', 'expire')),
    amount         bigint NOT NULL CHECK (amount >= 0),
    -- How this entry moves accounts.balance and accounts.held.
    balance_delta  bigint NOT NULL DEFAULT 0,
    held_delta     bigint NOT NULL DEFAULT 0,
    note           text
);
CREATE INDEX journal_by_account ON journal (account_id);
CREATE INDEX journal_by_hold ON journal (hold_id) WHERE hold_id IS NOT NULL;
-- Defence in depth: an item is captured at most once, whatever the code does.
CREATE UNIQUE INDEX journal_one_capture_per_item ON journal (batch_id, item_id) WHERE kind = 'capture';
COMMENT ON TABLE journal IS 'Append-only record of every credit movement; balances are recomputable from it.';
COMMENT ON COLUMN journal.id IS 'Monotonic entry number.';
COMMENT ON COLUMN journal.at IS 'When the entry was written.';
COMMENT ON COLUMN journal.account_id IS 'Account affected.';
COMMENT ON COLUMN journal.hold_id IS 'Hold affected, if any.';
COMMENT ON COLUMN journal.batch_id IS 'Batch affected, if any.';
COMMENT ON COLUMN journal.item_id IS 'Item affected (capture, overrun).';
COMMENT ON COLUMN journal.kind IS 'grant (balance+), hold (held+), capture (hold-internal), overrun (record only), settle (balance- and held- by captured), release (held- by the remainder), expire (held- by a soft hold).';
COMMENT ON COLUMN journal.amount IS 'Credits of this entry, never negative.';
COMMENT ON COLUMN journal.balance_delta IS 'Change to accounts.balance.';
COMMENT ON COLUMN journal.held_delta IS 'Change to accounts.held.';
COMMENT ON COLUMN journal.note IS 'Free text: grant reference, release reason.';

CREATE FUNCTION journal_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the journal is append-only (% refused)', TG_OP;
END;
$$;
CREATE TRIGGER journal_append_only BEFORE UPDATE OR DELETE ON journal
    FOR EACH ROW EXECUTE FUNCTION journal_append_only();
