-- Presence: every online/offline transition, and what the ticker needs to survive restarts.
CREATE TABLE IF NOT EXISTS node_events (
    id          BIGSERIAL PRIMARY KEY,
    node_id     TEXT NOT NULL,
    from_status TEXT NOT NULL,
    to_status   TEXT NOT NULL,
    reason      TEXT NOT NULL CHECK (reason IN ('message', 'timeout', 'lwt', 'status', 'startup')),
    at          TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS node_events_node_at ON node_events (node_id, at DESC);

ALTER TABLE nodes ADD COLUMN IF NOT EXISTS report_interval_s DOUBLE PRECISION;
ALTER TABLE nodes ADD COLUMN IF NOT EXISTS status_changed_at TIMESTAMPTZ;
