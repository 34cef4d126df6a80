-- The append-only event store. Readers follow (tx_id, global_position) below the snapshot xmin,
-- never global_position alone: identity values commit out of order (RELIABILITY.md P1).
CREATE TABLE events (
    global_position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tx_id           xid8 NOT NULL DEFAULT pg_current_xact_id(),
    workspace_id    text NOT NULL,
    event_id        text NOT NULL,
    user_id         text NOT NULL,
    name            text NOT NULL,
    occurred_at     timestamptz NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT nudge_now(),
    properties      jsonb NOT NULL DEFAULT '{}',
    context         jsonb NOT NULL DEFAULT '{}',
    metadata        jsonb NOT NULL DEFAULT '{}',
    body_hash       bytea NOT NULL,
    UNIQUE (workspace_id, event_id)
);
CREATE INDEX events_commit_order ON events (tx_id, global_position);
CREATE INDEX events_by_user ON events (workspace_id, user_id, global_position);

-- Append-only: no updates or deletes, ever (erasure is done by crypto-shredding, later).
CREATE FUNCTION events_are_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events are append-only' USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_are_append_only();

-- Checkpoints of gap-free readers. `pending_*` is the range a relay is publishing, so a re-publish
-- after a crash covers the same events under the same message ids.
CREATE TABLE reader_checkpoints (
    reader          text PRIMARY KEY,
    tx_id           xid8 NOT NULL DEFAULT '0',
    global_position bigint NOT NULL DEFAULT 0,
    pending_tx_id   xid8,
    pending_position bigint,
    last_xmin       xid8 NOT NULL DEFAULT '0',
    updated_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
