-- Legacy tables (nodes, sensor_data) keep the columns the original dashboard reads;
-- everything else is added beside them.
CREATE TABLE IF NOT EXISTS nodes (
    id            BIGSERIAL PRIMARY KEY,
    node_id       TEXT NOT NULL UNIQUE,
    name          TEXT,
    mac_address   TEXT,
    location      TEXT,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_seen     TIMESTAMPTZ,
    is_active     BOOLEAN NOT NULL DEFAULT true,
    status        TEXT NOT NULL DEFAULT 'unknown',
    message_count BIGINT NOT NULL DEFAULT 0,
    firmware      TEXT,
    last_boot     INTEGER
);

-- One row per message a node sent on devices/{id}/data or devices/{id}/status.
-- data is the payload as received; received_at is the clock of record; ts is the
-- node's own clock (untrusted); stored_at is when the row was written.
CREATE TABLE IF NOT EXISTS sensor_data (
    id          BIGSERIAL PRIMARY KEY,
    node_id     TEXT NOT NULL,
    data        JSONB NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    kind        TEXT NOT NULL DEFAULT 'reading'
                CHECK (kind IN ('reading', 'event', 'heartbeat', 'ping', 'status')),
    ts          DOUBLE PRECISION,
    boot        INTEGER,
    seq         BIGINT,
    stored_at   TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);
CREATE UNIQUE INDEX IF NOT EXISTS sensor_data_message_key
    ON sensor_data (node_id, boot, seq) WHERE boot IS NOT NULL AND seq IS NOT NULL;
CREATE INDEX IF NOT EXISTS sensor_data_node_time ON sensor_data (node_id, received_at DESC);
CREATE INDEX IF NOT EXISTS sensor_data_time ON sensor_data (received_at DESC);

-- Every message the gateway could not process and every dead letter, with a reason.
CREATE TABLE IF NOT EXISTS failed_messages (
    id             BIGSERIAL PRIMARY KEY,
    fingerprint    BYTEA NOT NULL UNIQUE,
    source         TEXT NOT NULL,
    routing_key    TEXT NOT NULL,
    headers        JSONB NOT NULL DEFAULT '{}',
    body           BYTEA NOT NULL,
    body_truncated BOOLEAN NOT NULL DEFAULT false,
    reason         TEXT NOT NULL,
    detail         TEXT NOT NULL DEFAULT '',
    first_seen     TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_seen      TIMESTAMPTZ NOT NULL DEFAULT now(),
    count          INTEGER NOT NULL DEFAULT 1,
    replayed_at    TIMESTAMPTZ
);
CREATE INDEX IF NOT EXISTS failed_messages_last_seen ON failed_messages (last_seen DESC);
