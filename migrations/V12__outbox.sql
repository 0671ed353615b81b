-- The transactional outbox (docs/reliability.md, "Events: the outbox").
--
-- Every event on the events exchange (decision, progress, completed) is
-- written here in the same transaction as the ledger change that causes it,
-- and relayed to RabbitMQ afterwards by a relay task in each process
-- (common/src/outbox.rs): rows are claimed with FOR UPDATE SKIP LOCKED,
-- published with publisher confirms in id order per batch, and deleted once
-- the broker confirmed them. A crash or broker outage leaves the rows here
-- until a relay publishes them: at-least-once, each message carrying a stable
-- `message_id` so that consumers can drop duplicates.
--
-- Order per batch: every transaction that writes a batch's rows holds that
-- batch's row lock (reserve inserts the batch, settles and closes lock it
-- FOR UPDATE, progress FOR NO KEY UPDATE), so the ids of one batch's rows are
-- taken in commit order, and a relay publishes a batch's rows only as an
-- unbroken prefix of what is left for that batch.
--
-- No LISTEN/NOTIFY: a NOTIFY takes a database-wide lock at commit and would
-- serialise every ledger commit. The writer wakes the relay of its own
-- process in memory; every relay also polls.

CREATE TABLE outbox (
    id              bigserial PRIMARY KEY,
    batch_id        text NOT NULL,
    kind            text NOT NULL CHECK (kind IN ('decision', 'progress', 'completed')),
    routing_key     text NOT NULL CHECK (octet_length(routing_key) BETWEEN 1 AND 255),
    -- Not checked here: the batch row already holds them as the producer sent
    -- them, and a close must never fail on them; the relay leaves out what an
    -- AMQP short string cannot carry.
    reply_to        text,
    correlation_id  text,
    body            bytea NOT NULL,
    message_id      text NOT NULL CHECK (octet_length(message_id) BETWEEN 1 AND 255),
    created_at      timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE outbox IS
    'Events written with the ledger change that causes them, waiting for a relay to publish them (see V12__outbox.sql).';
COMMENT ON COLUMN outbox.kind IS 'decision | progress | completed.';
COMMENT ON COLUMN outbox.routing_key IS 'Routing key on the namespace''s events exchange (decision.granted, batch.completed, ...).';
COMMENT ON COLUMN outbox.reply_to IS
    'A producer''s reply queue that also gets this message (a batch''s completed summary), through the default exchange; a queue that is gone is fine.';
COMMENT ON COLUMN outbox.correlation_id IS 'The request''s correlation_id, sent with the reply.';
COMMENT ON COLUMN outbox.body IS 'The JSON message as published.';
COMMENT ON COLUMN outbox.message_id IS
    'AMQP message_id, stable over republishing: <batch_id>:decision, <batch_id>:progress:<settled items>, <batch_id>:completed, or sha256:<hex> of it when longer than 255 bytes.';
COMMENT ON COLUMN outbox.created_at IS 'When the ledger change committed (its transaction''s start); the relay lag is now() - min(created_at).';

-- A relay reads the oldest rows, and the rows of the batches it claimed.
CREATE INDEX outbox_batch ON outbox (batch_id, id);

-- At most one completed event per batch: closing a batch is the only writer
-- of one, and a close changes only an open hold; this index makes a second
-- one a bug the database refuses while the first waits for its relay.
CREATE UNIQUE INDEX outbox_one_completed ON outbox (batch_id) WHERE kind = 'completed';

-- Every service group writes events (the coordinator decisions and cancels,
-- the worker progress and closes, the reconciler closes), and every process
-- runs a relay, which reads, claims and deletes. SELECT ... FOR UPDATE needs
-- UPDATE on a column. holdfast_admin cancels batches from the command line.
GRANT SELECT, INSERT, DELETE, UPDATE (created_at) ON outbox
    TO holdfast_coordinator, holdfast_worker, holdfast_reconciler, holdfast_admin;
GRANT USAGE ON SEQUENCE outbox_id_seq
    TO holdfast_coordinator, holdfast_worker, holdfast_reconciler, holdfast_admin;
