-- Dispatch's outcome and engagement events (`message.*`) by campaign and send: campaign stats
-- read one campaign's outcomes without scanning the workspace's events. Partial, so other
-- events pay only the predicate.
CREATE INDEX events_outcomes_by_campaign
    ON events (workspace_id, (properties->>'campaign_id'), (properties->>'send_id'))
    WHERE name LIKE 'message.%';
