-- Rules: campaigns (versioned), projected user state, campaign instances, decisions, outbox, inbox.
CREATE TABLE campaign_versions (
    workspace_id    text NOT NULL,
    campaign_id     text NOT NULL,
    version         integer NOT NULL,
    definition      jsonb NOT NULL,
    definition_hash text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT nudge_now(),
    PRIMARY KEY (workspace_id, campaign_id, version)
);

CREATE TABLE campaigns (
    workspace_id    text NOT NULL,
    campaign_id     text NOT NULL,
    current_version integer NOT NULL,
    status          text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'paused')),
    updated_at      timestamptz NOT NULL DEFAULT nudge_now(),
    PRIMARY KEY (workspace_id, campaign_id),
    FOREIGN KEY (workspace_id, campaign_id, current_version)
        REFERENCES campaign_versions (workspace_id, campaign_id, version)
);

CREATE TABLE user_states (
    workspace_id    text NOT NULL,
    user_id         text NOT NULL,
    state           jsonb NOT NULL,
    last_position   bigint NOT NULL,
    PRIMARY KEY (workspace_id, user_id)
);

CREATE TABLE campaign_instances (
    instance_id      uuid PRIMARY KEY,
    workspace_id     text NOT NULL,
    campaign_id      text NOT NULL,
    version          integer NOT NULL,
    user_id          text NOT NULL,
    correlation      text NOT NULL DEFAULT '',
    trigger_event_id text NOT NULL,
    trigger_event    jsonb NOT NULL,
    state            text NOT NULL CHECK (state IN ('pending', 'sent', 'cancelled', 'suppressed')),
    due_at           timestamptz NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT nudge_now(),
    updated_at       timestamptz NOT NULL DEFAULT nudge_now()
);
CREATE INDEX campaign_instances_by_user
    ON campaign_instances (workspace_id, user_id, campaign_id, state);

CREATE TABLE decisions (
    decision_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    workspace_id    text NOT NULL,
    user_id         text NOT NULL,
    campaign_id     text NOT NULL,
    version         integer NOT NULL,
    instance_id     uuid,
    event_id        text,
    kind            text NOT NULL,
    reason          text NOT NULL DEFAULT '',
    detail          jsonb NOT NULL DEFAULT '{}',
    decided_at      timestamptz NOT NULL DEFAULT nudge_now()
);
CREATE INDEX decisions_by_user ON decisions (workspace_id, user_id, campaign_id, decision_id);

-- Work to hand to other services, written in the same transaction as the decision (no dual
-- writes); delivered and deleted by the outbox worker. `msg_id` is the idempotency key downstream.
CREATE TABLE rules_outbox (
    outbox_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind            text NOT NULL CHECK (kind IN ('schedule', 'cancel', 'dispatch')),
    msg_id          text NOT NULL,
    subject         text NOT NULL DEFAULT '',
    payload         bytea NOT NULL,
    traceparent     text NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Items from NATS already applied (fired timers); inserted in the same transaction as the effect.
CREATE TABLE rules_inbox (
    item_id         text PRIMARY KEY,
    applied_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
