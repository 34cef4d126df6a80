-- Rules engine (issue 3): every trigger kind, exceptions, pause/resume, explanations, replay.
-- The tables of 0003 already hold what the engine needs (an inactivity instance is re-armed in
-- place, an exception cancels in place); this adds the lookup the resume path makes.

-- ResumeCampaign re-arms the pending instances of one campaign that came due while it was
-- paused: pending instances by campaign and due time.
CREATE INDEX campaign_instances_pending_by_campaign
    ON campaign_instances (workspace_id, campaign_id, due_at) WHERE state = 'pending';
