-- Workspaces, API keys and the one time authority (the database clock, skippable in dev).
CREATE TABLE workspaces (
    workspace_id text PRIMARY KEY CHECK (workspace_id ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    name         text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE api_keys (
    key_id       text PRIMARY KEY,
    workspace_id text NOT NULL REFERENCES workspaces,
    secret_hash  bytea NOT NULL,
    scopes       text[] NOT NULL,
    description  text NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    expires_at   timestamptz,
    revoked_at   timestamptz
);

-- Dev/test clock: an offset added to the real clock. `enabled` is set only by dev stacks; the
-- production configuration refuses to advance it.
CREATE TABLE dev_clock (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    skew        interval NOT NULL DEFAULT interval '0',
    enabled     boolean NOT NULL DEFAULT false
);
INSERT INTO dev_clock DEFAULT VALUES;

CREATE FUNCTION nudge_now() RETURNS timestamptz
LANGUAGE sql VOLATILE PARALLEL SAFE AS $$
    SELECT clock_timestamp() + (SELECT skew FROM dev_clock WHERE singleton)
$$;
