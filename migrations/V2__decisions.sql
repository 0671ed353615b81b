-- Decisions a person can act on: soft holds consumed by a batch, sequential
-- batches that reserve chunk by chunk, and cancelled batches.

-- Items: `queued` waits for its chunk's reservation (sequential mode);
-- `cancelled` was never started because its batch was cancelled.
ALTER TABLE items DROP CONSTRAINT items_state_check;
ALTER TABLE items ADD CONSTRAINT items_state_check
    CHECK (state IN ('queued', 'pending', 'succeeded', 'failed', 'cancelled', 'skipped'));
ALTER TABLE items DROP CONSTRAINT items_failed_not_charged;
ALTER TABLE items ADD CONSTRAINT items_unrun_not_charged
    CHECK (state NOT IN ('queued', 'failed', 'cancelled', 'skipped') OR captured = 0);
ALTER TABLE items DROP CONSTRAINT items_skipped_hold_nothing;
ALTER TABLE items ADD CONSTRAINT items_unreserved_hold_nothing
    CHECK (state NOT IN ('queued', 'skipped') OR reserved = 0);
COMMENT ON COLUMN items.state IS
    'queued (sequential, chunk not reserved yet), pending (held, not settled), succeeded, failed, cancelled (never started) or skipped (never held).';

-- Batches: `cancelling` stops new work; running items finish, the rest is cancelled.
ALTER TABLE batches DROP CONSTRAINT batches_state_check;
ALTER TABLE batches ADD CONSTRAINT batches_state_check CHECK (state IN
    ('denied', 'granted', 'dispatched', 'cancelling', 'completed', 'expired', 'cancelled'));
ALTER TABLE batches ADD COLUMN cancelled integer NOT NULL DEFAULT 0 CHECK (cancelled >= 0);
ALTER TABLE batches ADD COLUMN chunk_size integer CHECK (chunk_size > 0);
ALTER TABLE batches ADD COLUMN cancel_requested_at timestamptz;
ALTER TABLE batches DROP CONSTRAINT batches_settled_within_run;
ALTER TABLE batches ADD CONSTRAINT batches_settled_within_run CHECK (succeeded + failed + cancelled <= run_count);
DROP INDEX batches_open;
CREATE INDEX batches_open ON batches (created_at) WHERE state IN ('granted', 'dispatched', 'cancelling');
COMMENT ON COLUMN batches.state IS
    'denied | granted -> dispatched -> completed | expired; granted/dispatched -> cancelling -> cancelled.';
COMMENT ON COLUMN batches.run_count IS 'Items reserved to run so far (sequential batches add a chunk at a time).';
COMMENT ON COLUMN batches.cancelled IS 'Items never started because the batch was cancelled (never charged).';
COMMENT ON COLUMN batches.chunk_size IS 'Sequential mode: items reserved per chunk; NULL otherwise.';
COMMENT ON COLUMN batches.cancel_requested_at IS 'When a cancel was requested; NULL if never.';

COMMENT ON COLUMN holds.amount IS
    'Reserved total. Fixed at reserve time, except that a sequential batch adds each chunk it reserves.';
COMMENT ON COLUMN holds.expires_at IS
    'Soft holds waiting for their batch: the TTL deadline (never expired before it). NULL once a batch consumes the hold, and for a batch''s own hold.';
