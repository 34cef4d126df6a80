-- The experiment group a send was planned for (`SendRequest.experiment_group`, '' when none),
-- so outcome events carry it without decoding the stored request. No backfill: sends recorded
-- before this had no experiments, and '' is what decoding their request gave.
ALTER TABLE sends ADD COLUMN experiment_group text NOT NULL DEFAULT '';
