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

-- A database of the original RNR IoT Platform already has nodes and sensor_data, which the
-- two statements above then leave as they are. Bring them up to the shape above, keeping
-- every row and every original column (its dashboard reads them). On a database created
-- above, none of this changes anything. docs/operations.md: "Upgrading a database of the
-- original platform".
ALTER TABLE nodes
    ADD COLUMN IF NOT EXISTS name          TEXT,
    ADD COLUMN IF NOT EXISTS mac_address   TEXT,
    ADD COLUMN IF NOT EXISTS location      TEXT,
    ADD COLUMN IF NOT EXISTS created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    ADD COLUMN IF NOT EXISTS updated_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    ADD COLUMN IF NOT EXISTS last_seen     TIMESTAMPTZ,
    ADD COLUMN IF NOT EXISTS is_active     BOOLEAN NOT NULL DEFAULT true,
    ADD COLUMN IF NOT EXISTS status        TEXT NOT NULL DEFAULT 'unknown',
    ADD COLUMN IF NOT EXISTS message_count BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS firmware      TEXT,
    ADD COLUMN IF NOT EXISTS last_boot     INTEGER;
-- stored_at of the rows already there is the time of the upgrade (a constant default adds
-- the column without rewriting the table); rows written from now on get their own time.
ALTER TABLE sensor_data
    ADD COLUMN IF NOT EXISTS received_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    ADD COLUMN IF NOT EXISTS kind        TEXT NOT NULL DEFAULT 'reading'
               CHECK (kind IN ('reading', 'event', 'heartbeat', 'ping', 'status')),
    ADD COLUMN IF NOT EXISTS ts          DOUBLE PRECISION,
    ADD COLUMN IF NOT EXISTS boot        INTEGER,
    ADD COLUMN IF NOT EXISTS seq         BIGINT,
    ADD COLUMN IF NOT EXISTS stored_at   TIMESTAMPTZ NOT NULL DEFAULT now();
ALTER TABLE sensor_data ALTER COLUMN stored_at SET DEFAULT clock_timestamp();
-- a count the batch upsert adds to must not be NULL (NULL + n stays NULL)
UPDATE nodes SET message_count = 0 WHERE message_count IS NULL;

DO $$
DECLARE
    wanted  CONSTANT text[] := ARRAY[
        -- table, column, what the gateway reads and writes there
        'nodes', 'node_id', 'text', 'nodes', 'name', 'text', 'nodes', 'mac_address', 'text',
        'nodes', 'location', 'text', 'nodes', 'status', 'text', 'nodes', 'firmware', 'text',
        'nodes', 'created_at', 'timestamptz', 'nodes', 'updated_at', 'timestamptz',
        'nodes', 'last_seen', 'timestamptz', 'sensor_data', 'node_id', 'text',
        'sensor_data', 'kind', 'text', 'sensor_data', 'data', 'jsonb',
        'sensor_data', 'received_at', 'timestamptz', 'sensor_data', 'stored_at', 'timestamptz'];
    tbl     text;
    col     text;
    want    text;
    have    text;
    changes text[];
    dups    text;
BEGIN
    -- ON CONFLICT (node_id) needs a unique index on nodes.node_id alone
    IF NOT EXISTS (
        SELECT 1 FROM pg_index i
        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
        WHERE i.indrelid = 'nodes'::regclass AND a.attname = 'node_id'
          AND i.indisunique AND i.indimmediate AND i.indisvalid AND i.indnkeyatts = 1
          AND i.indpred IS NULL AND i.indexprs IS NULL
    ) THEN
        SELECT string_agg(format('%s (%s rows)', node_id, n), ', ' ORDER BY node_id) INTO dups
        FROM (SELECT node_id, count(*) AS n FROM nodes WHERE node_id IS NOT NULL
              GROUP BY node_id HAVING count(*) > 1) d;
        IF dups IS NOT NULL THEN
            RAISE EXCEPTION 'nodes.node_id is not unique: %', dups
                USING DETAIL = 'The gateway keeps one nodes row per node. Nothing was changed.',
                      HINT = 'Find them with SELECT node_id, array_agg(id ORDER BY id) FROM nodes'
                          ' GROUP BY node_id HAVING count(*) > 1; merge each into one row and'
                          ' delete the others (docs/operations.md, "Upgrading a database of the'
                          ' original platform"), then run migrate again.';
        END IF;
        CREATE UNIQUE INDEX nodes_node_id_unique ON nodes (node_id);
    END IF;

    -- Types. json/text data becomes jsonb (the gateway compares and indexes it as jsonb);
    -- a timestamp without time zone becomes timestamptz, its values read as local time in
    -- this session's TimeZone, which is what now() wrote into them (the gateway stores
    -- and compares instants, and presence turns last_seen into epoch seconds); a
    -- length-limited varchar loses its limit (node ids have up to 64 characters, names
    -- up to 200). One ALTER TABLE per table: the table is rewritten at most once.
    FOREACH tbl IN ARRAY ARRAY['nodes', 'sensor_data'] LOOP
        changes := ARRAY[]::text[];
        FOR i IN 1 .. array_length(wanted, 1) BY 3 LOOP
            CONTINUE WHEN wanted[i] <> tbl;
            col := wanted[i + 1];
            want := wanted[i + 2];
            SELECT format_type(a.atttypid, a.atttypmod) INTO have
            FROM pg_attribute a
            WHERE a.attrelid = tbl::regclass AND a.attname = col AND NOT a.attisdropped;
            IF want = 'jsonb' AND have <> 'jsonb' THEN
                changes := changes || format('ALTER COLUMN %I TYPE jsonb USING %I::text::jsonb',
                                             col, col);
            ELSIF want = 'timestamptz' AND have = 'timestamp without time zone' THEN
                changes := changes || format('ALTER COLUMN %I TYPE timestamptz', col);
            ELSIF want = 'text' AND have LIKE 'character varying(%)' THEN
                changes := changes || format('ALTER COLUMN %I TYPE varchar', col);
            END IF;
        END LOOP;
        CONTINUE WHEN cardinality(changes) = 0;
        BEGIN
            EXECUTE format('ALTER TABLE %I ', tbl) || array_to_string(changes, ', ');
        EXCEPTION WHEN invalid_text_representation OR untranslatable_character THEN
            RAISE EXCEPTION 'sensor_data.data holds a value jsonb does not accept: %', SQLERRM
                USING DETAIL = 'Nothing was changed.',
                      HINT = 'Find the rows (PostgreSQL 16 and later: SELECT id, data FROM'
                          ' sensor_data WHERE NOT pg_input_is_valid(data::text, ''jsonb'')),'
                          ' correct or delete them, then run migrate again.';
        END;
    END LOOP;
END
$$;

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
