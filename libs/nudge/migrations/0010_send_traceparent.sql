-- The trace a send request arrived in (W3C traceparent, '' when untraced): attempts the sweeper
-- starts later (retries, held sends, pickups after a crash) continue that trace.
ALTER TABLE sends ADD COLUMN traceparent text NOT NULL DEFAULT '';
