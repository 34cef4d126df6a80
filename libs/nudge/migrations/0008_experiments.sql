-- Experiments, conversions and engagement tracking (issue 6; docs/experiments.md).

-- The group each instance was assigned at entry (`control`, `global_control`, or a variant;
-- `treatment` without an experiment), the draw that decided it and the salt it was drawn with
-- (stats read the instances of the current salt). `entered_at` is the triggered decision's time
-- and `exposed_at` the time of the send (or, for a held-out instance, of the would-be send):
-- both are decision times, so a replay gives the same values. `send_id` is the send's (or the
-- would-be send's) id, which dispatch's outcome events carry.
ALTER TABLE campaign_instances
    ADD COLUMN experiment_group  text,
    ADD COLUMN experiment_bucket double precision,
    ADD COLUMN experiment_salt   text,
    ADD COLUMN entered_at        timestamptz,
    ADD COLUMN exposed_at        timestamptz,
    ADD COLUMN send_id           uuid;

ALTER TABLE campaign_instances DROP CONSTRAINT campaign_instances_state_check;
ALTER TABLE campaign_instances ADD CONSTRAINT campaign_instances_state_check
    CHECK (state IN ('pending', 'sent', 'cancelled', 'suppressed', 'held_out'));

CREATE INDEX campaign_instances_by_group
    ON campaign_instances (workspace_id, campaign_id, experiment_salt, experiment_group);

-- Every conversion event of an instance's campaign received within the instance's analysis
-- horizon (entry + longest group delay + `within`) for which the campaign's `match` holds. Stats
-- take the first per instance from entry (intention to treat) and the first within `within` of
-- the exposure (attributed). Inserted by the projector; a re-applied batch changes nothing.
CREATE TABLE campaign_conversions (
    instance_id  uuid NOT NULL,
    event_id     text NOT NULL,
    workspace_id text NOT NULL,
    campaign_id  text NOT NULL,
    user_id      text NOT NULL,
    converted_at timestamptz NOT NULL,
    PRIMARY KEY (instance_id, event_id)
);
CREATE INDEX campaign_conversions_by_campaign ON campaign_conversions (workspace_id, campaign_id);

-- Dispatch: the links of a tracked email (index -> URL), stored with the attempt so a click can
-- never arrive before its links are known.
ALTER TABLE sends ADD COLUMN tracked_links jsonb;
