-- Commands (PROTOCOL §4): the outbox is the record of truth. One row per command per
-- node; every transition is also appended to command_events with its reason.
CREATE TABLE IF NOT EXISTS commands (
    message_id        TEXT PRIMARY KEY,
    node_id           TEXT NOT NULL,
    action            TEXT NOT NULL,
    -- the flat body exactly as the caller gave it (action included), nothing dropped
    params            JSONB NOT NULL,
    priority          SMALLINT NOT NULL CHECK (priority BETWEEN 0 AND 10),
    ttl_s             DOUBLE PRECISION NOT NULL CHECK (ttl_s > 0),
    retain            BOOLEAN NOT NULL DEFAULT false,
    broadcast_id      TEXT,
    status            TEXT NOT NULL DEFAULT 'queued'
                      CHECK (status IN ('queued', 'sent', 'received', 'executed', 'failed',
                                        'rejected', 'expired', 'cancelled')),
    reason            TEXT NOT NULL DEFAULT '',
    created_at        TIMESTAMPTZ NOT NULL,
    expires_at        TIMESTAMPTZ NOT NULL,
    sent_at           TIMESTAMPTZ,
    received_at       TIMESTAMPTZ,
    finished_at       TIMESTAMPTZ,
    -- publishes handed to MQTT; > 0 while queued means an earlier outcome is unknown
    attempts          INTEGER NOT NULL DEFAULT 0,
    updated_at        TIMESTAMPTZ NOT NULL,
    -- when the retained copy on devices/{id}/commands/last was cleared or replaced
    retain_cleared_at TIMESTAMPTZ,
    source            TEXT NOT NULL DEFAULT 'api' CHECK (source IN ('api', 'amqp'))
);
CREATE INDEX IF NOT EXISTS commands_node_time ON commands (node_id, created_at DESC);
CREATE INDEX IF NOT EXISTS commands_broadcast ON commands (broadcast_id)
    WHERE broadcast_id IS NOT NULL;
-- what the dispatcher reloads at start and the expiry sweep scans
CREATE INDEX IF NOT EXISTS commands_open ON commands (expires_at)
    WHERE status IN ('queued', 'sent', 'received');
CREATE INDEX IF NOT EXISTS commands_retained ON commands (node_id, sent_at DESC)
    WHERE retain AND retain_cleared_at IS NULL;

CREATE TABLE IF NOT EXISTS command_events (
    id         BIGSERIAL PRIMARY KEY,
    message_id TEXT NOT NULL REFERENCES commands (message_id) ON DELETE CASCADE,
    status     TEXT NOT NULL,
    reason     TEXT NOT NULL DEFAULT '',
    at         TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS command_events_command ON command_events (message_id, id);

-- Acks that moved no command: unknown message id, another node's command, or a command
-- already past that state (a late or repeated ack). Kept, never an error.
CREATE TABLE IF NOT EXISTS command_acks_unmatched (
    id          BIGSERIAL PRIMARY KEY,
    node_id     TEXT NOT NULL,
    message_id  TEXT NOT NULL,
    status      TEXT NOT NULL,
    detail      TEXT NOT NULL DEFAULT '',
    reason      TEXT NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS command_acks_unmatched_time
    ON command_acks_unmatched (received_at DESC);
