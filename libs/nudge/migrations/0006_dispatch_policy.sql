-- Dispatch policy: the claim step of the send state machine, workspace policy (caps, quiet
-- hours), and the recipient facts checked at claim time (consent, time zone, bounced addresses).
-- See docs/dispatch.md.

-- 1. Sends: a `claimed` state between `planned` and `attempting` (RELIABILITY.md P3). A claimed
--    send has passed consent, quiet hours and caps but no provider has been called yet, so a
--    claim whose worker died is simply claimed again; only a stale `attempting` is ambiguous.
ALTER TABLE sends DROP CONSTRAINT sends_state_check;
ALTER TABLE sends ADD CONSTRAINT sends_state_check
    CHECK (state IN ('planned', 'claimed', 'attempting', 'sent', 'retry_wait', 'suppressed',
                     'dead', 'ambiguous'));
ALTER TABLE sends
    ADD COLUMN kind text NOT NULL DEFAULT 'marketing' CHECK (kind IN ('marketing', 'transactional')),
    ADD COLUMN priority integer NOT NULL DEFAULT 0,
    ADD COLUMN decided_at timestamptz,
    -- Fencing token: bumped by every claim; outcome writes require the claim they belong to.
    ADD COLUMN claim_no integer NOT NULL DEFAULT 0,
    -- The frequency-cap slot this send holds (the claim time), NULL when it holds none.
    ADD COLUMN cap_reserved_at timestamptz,
    -- Attempts whose provider outcome was unknown (reply lost, worker died mid-call).
    ADD COLUMN ambiguous_attempts integer NOT NULL DEFAULT 0,
    ADD COLUMN replays integer NOT NULL DEFAULT 0,
    -- Start of the retry window (creation, or the last dead-letter replay).
    ADD COLUMN window_started_at timestamptz;
UPDATE sends SET window_started_at = created_at, decided_at = created_at;
ALTER TABLE sends ALTER COLUMN window_started_at SET NOT NULL,
                  ALTER COLUMN window_started_at SET DEFAULT nudge_now();

DROP INDEX sends_retry_due;
DROP INDEX sends_stale_attempts;
-- Held (quiet hours) and retrying sends, by due time.
CREATE INDEX sends_due ON sends (next_at)
    WHERE state IN ('planned', 'retry_wait') AND next_at IS NOT NULL;
-- Leases: a fresh planned send's pickup deadline, claims and attempts.
CREATE INDEX sends_leases ON sends (lease_until)
    WHERE state IN ('planned', 'claimed', 'attempting') AND lease_until IS NOT NULL;
-- The contenders of one user at claim time.
CREATE INDEX sends_open_by_user ON sends (workspace_id, user_id)
    WHERE state IN ('planned', 'retry_wait', 'claimed');
-- Frequency-cap usage of one user.
CREATE INDEX sends_cap_slots ON sends (workspace_id, user_id, cap_reserved_at)
    WHERE cap_reserved_at IS NOT NULL;

ALTER TABLE dead_letters ADD COLUMN replayed_at timestamptz;
CREATE INDEX dead_letters_by_workspace ON dead_letters (workspace_id, dead_letter_id DESC);

-- 2. Workspace policy (`nudge workspace apply`), the normalized document.
CREATE TABLE workspace_policies (
    workspace_id text PRIMARY KEY REFERENCES workspaces,
    policy       jsonb NOT NULL,
    version      integer NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT nudge_now()
);

-- 3. Recipient facts, projected INLINE from the event store: an AFTER INSERT trigger on
--    `events` updates them in the transaction that appends the event (RELIABILITY.md P3), so an
--    opt-out is in force for every claim that starts after the opt-out was acknowledged, whatever
--    path appended it (ingest Identify/Track, the one-click unsubscribe, a bounce). The rules
--    projection (`user_states`) is read by a separate, lagging reader and is not used here.
--    Trait semantics mirror the rules projection: a key replaces the value, JSON null deletes it.
CREATE TABLE recipient_preferences (
    workspace_id    text NOT NULL,
    user_id         text NOT NULL,
    -- Braze convention: 'opted_in', 'subscribed' or 'unsubscribed'; NULL = never set.
    email_subscribe text,
    push_subscribe  text,
    sms_subscribe   text,
    -- The `timezone` trait as given (validated by dispatch; an invalid name means "not set").
    timezone        text,
    updated_at      timestamptz NOT NULL DEFAULT nudge_now(),
    PRIMARY KEY (workspace_id, user_id)
);

-- Addresses a provider reported as nonexistent (SMTP 5.1.x hard bounce, an unregistered push
-- token). Sends to such an address are suppressed; a `<channel>_subscribe: opted_in` trait (a
-- fresh, explicit confirmation) clears the channel's entries.
CREATE TABLE undeliverable_addresses (
    workspace_id text NOT NULL,
    user_id      text NOT NULL,
    channel      text NOT NULL,
    address      text NOT NULL,
    reason       text NOT NULL,
    send_id      text NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT nudge_now(),
    PRIMARY KEY (workspace_id, user_id, channel, address)
);

-- A trait value as a subscription state. Booleans are accepted (true = subscribed); anything
-- else that is not one of the three states counts as 'unsubscribed': when a client clearly
-- tried to change consent and we cannot tell to what, we fail towards not sending.
CREATE FUNCTION dispatch_subscription_state(value jsonb) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN value IS NULL OR jsonb_typeof(value) = 'null' THEN NULL
        WHEN jsonb_typeof(value) = 'boolean' THEN
            CASE WHEN value = 'true'::jsonb THEN 'subscribed' ELSE 'unsubscribed' END
        WHEN jsonb_typeof(value) = 'string'
             AND lower(btrim(value #>> '{}')) IN ('opted_in', 'subscribed', 'unsubscribed')
            THEN lower(btrim(value #>> '{}'))
        ELSE 'unsubscribed'
    END
$$;

-- Must never raise: it runs inside ingest's group commit, where an error would reject every
-- event of the batch. Only jsonb accessors and text functions that cannot fail are used.
CREATE FUNCTION dispatch_project_recipient() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    p jsonb := NEW.properties;
    tz text;
BEGIN
    IF NEW.name = '$identify' THEN
        IF jsonb_typeof(p) <> 'object' THEN
            RETURN NULL;
        END IF;
        tz := CASE WHEN jsonb_typeof(p -> 'timezone') = 'string'
                   THEN left(p ->> 'timezone', 64) END;
        INSERT INTO recipient_preferences AS r
            (workspace_id, user_id, email_subscribe, push_subscribe, sms_subscribe, timezone,
             updated_at)
        VALUES (NEW.workspace_id, NEW.user_id,
                dispatch_subscription_state(p -> 'email_subscribe'),
                dispatch_subscription_state(p -> 'push_subscribe'),
                dispatch_subscription_state(p -> 'sms_subscribe'),
                tz, nudge_now())
        ON CONFLICT (workspace_id, user_id) DO UPDATE SET
            email_subscribe = CASE WHEN p ? 'email_subscribe'
                                   THEN EXCLUDED.email_subscribe ELSE r.email_subscribe END,
            push_subscribe = CASE WHEN p ? 'push_subscribe'
                                  THEN EXCLUDED.push_subscribe ELSE r.push_subscribe END,
            sms_subscribe = CASE WHEN p ? 'sms_subscribe'
                                 THEN EXCLUDED.sms_subscribe ELSE r.sms_subscribe END,
            timezone = CASE WHEN p ? 'timezone' THEN EXCLUDED.timezone ELSE r.timezone END,
            updated_at = EXCLUDED.updated_at;
        IF 'opted_in' IN (dispatch_subscription_state(p -> 'email_subscribe'),
                          dispatch_subscription_state(p -> 'push_subscribe'),
                          dispatch_subscription_state(p -> 'sms_subscribe')) THEN
            DELETE FROM undeliverable_addresses u
            WHERE u.workspace_id = NEW.workspace_id AND u.user_id = NEW.user_id
              AND dispatch_subscription_state(p -> (u.channel || '_subscribe')) = 'opted_in';
        END IF;
    ELSIF NEW.name = 'message.failed' THEN
        INSERT INTO undeliverable_addresses
            (workspace_id, user_id, channel, address, reason, send_id)
        VALUES (NEW.workspace_id, NEW.user_id, coalesce(p ->> 'channel', ''),
                p ->> 'undeliverable_address', coalesce(p ->> 'reason', ''),
                coalesce(p ->> 'send_id', ''))
        ON CONFLICT DO NOTHING;
    END IF;
    RETURN NULL;
END $$;

-- The WHEN clause keeps the cost for every other event to one comparison in C.
CREATE TRIGGER events_project_recipient AFTER INSERT ON events
    FOR EACH ROW
    WHEN (NEW.name = '$identify'
          OR (NEW.name = 'message.failed'
              AND jsonb_typeof(NEW.properties -> 'undeliverable_address') = 'string'))
    EXECUTE FUNCTION dispatch_project_recipient();

-- Backfill from the events already stored, in commit order (a no-op on a fresh database). The
-- events table is append-only (no UPDATE), so the trigger function is replayed by re-running its
-- body through a temporary copy of each row.
DO $$
DECLARE
    e events%ROWTYPE;
BEGIN
    CREATE TEMPORARY TABLE dispatch_backfill (LIKE events) ON COMMIT DROP;
    CREATE TRIGGER dispatch_backfill_project AFTER INSERT ON dispatch_backfill
        FOR EACH ROW EXECUTE FUNCTION dispatch_project_recipient();
    FOR e IN
        SELECT * FROM events
        WHERE name = '$identify'
           OR (name = 'message.failed'
               AND jsonb_typeof(properties -> 'undeliverable_address') = 'string')
        ORDER BY tx_id, global_position
    LOOP
        INSERT INTO dispatch_backfill VALUES (e.*);
    END LOOP;
END $$;
