-- Dispatch: one row per send, keyed by the deterministic send_id (RELIABILITY.md P3).
CREATE TABLE sends (
    send_id        uuid PRIMARY KEY,
    workspace_id   text NOT NULL,
    user_id        text NOT NULL,
    campaign_id    text NOT NULL,
    campaign_version integer NOT NULL,
    channel        text NOT NULL,
    state          text NOT NULL CHECK (state IN ('planned', 'attempting', 'sent', 'retry_wait',
                                                  'suppressed', 'dead', 'ambiguous')),
    attempts       integer NOT NULL DEFAULT 0,
    lease_until    timestamptz,
    next_at        timestamptz,
    reason         text NOT NULL DEFAULT '',
    provider_message_id text,
    request        bytea NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT nudge_now(),
    updated_at     timestamptz NOT NULL DEFAULT nudge_now(),
    sent_at        timestamptz
);
CREATE INDEX sends_by_user ON sends (workspace_id, user_id, created_at DESC);
CREATE INDEX sends_retry_due ON sends (next_at) WHERE state = 'retry_wait';
CREATE INDEX sends_stale_attempts ON sends (lease_until) WHERE state = 'attempting';

CREATE TABLE dead_letters (
    dead_letter_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    send_id        uuid NOT NULL,
    workspace_id   text NOT NULL,
    reason         text NOT NULL,
    attempts       integer NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT nudge_now()
);
