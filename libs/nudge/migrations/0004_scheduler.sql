-- Scheduler: durable timers, fired in due_at order by the database clock.
CREATE TABLE timers (
    timer_id     uuid PRIMARY KEY,
    workspace_id text NOT NULL,
    topic        text NOT NULL,
    due_at       timestamptz NOT NULL,
    state        text NOT NULL CHECK (state IN ('pending', 'fired', 'cancelled')),
    version      bigint NOT NULL DEFAULT 1,
    payload      bytea NOT NULL DEFAULT '',
    traceparent  text NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT nudge_now(),
    updated_at   timestamptz NOT NULL DEFAULT nudge_now(),
    fired_at     timestamptz
);
CREATE INDEX timers_due ON timers (due_at) WHERE state = 'pending';
