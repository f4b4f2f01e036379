-- Retention (RETENTION_DAYS) deletes by age; these two tables had no index on it.
CREATE INDEX IF NOT EXISTS node_events_at ON node_events (at);
CREATE INDEX IF NOT EXISTS commands_expires_at ON commands (expires_at);

-- A command's params are the caller's flat body, action included, and the dispatcher
-- encodes them as they are: a row written by hand without them would stop it at every
-- start. The rows already there are the gateway's own (NOT VALID: not checked again).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conrelid = 'commands'::regclass AND conname = 'commands_params_shape')
    THEN
        ALTER TABLE commands ADD CONSTRAINT commands_params_shape
            CHECK (jsonb_typeof(params) = 'object' AND params ? 'action') NOT VALID;
    END IF;
END
$$;
