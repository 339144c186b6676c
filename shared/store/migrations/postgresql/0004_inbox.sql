-- Durable delivery (realtime.md "User/device socket"): every user's inbox is one ordered stream.
-- Times are unix milliseconds. No foreign keys to users: appends are the hot path (group commit,
-- thousands per second) and an FK check per row would double their cost; rows of a deleted user
-- are pruned with the rest after INBOX_RETENTION_S.

-- The last cursor taken per user. Appends lock this row (UPDATE/upsert) inside their
-- transaction, so a user's cursors are contiguous (1, 2, 3, ...) and commit in cursor order on
-- every node: a reader that sees cursor N can trust that N-1 is committed too.
CREATE TABLE inbox_heads (
    user_id TEXT PRIMARY KEY,
    head BIGINT NOT NULL
);

-- One row per durable event. "seq" is the cursor the client sees.
CREATE TABLE inbox_entries (
    user_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    event TEXT NOT NULL,                     -- message.new, publish, task.assigned, ...
    data TEXT NOT NULL,                      -- JSON object, sent to clients as is
    target_device TEXT,                      -- NULL: every device of the user; else only this one
    expires_at BIGINT,                       -- publish ttl_s: not delivered after this
    created_at BIGINT NOT NULL,
    PRIMARY KEY (user_id, seq)
);
CREATE INDEX inbox_entries_created_idx ON inbox_entries (created_at);

-- A user's named devices (the device_id query parameter, or a daemon's own id): where each one
-- has acked up to, and its event filter. Entries are kept until every device seen within
-- INBOX_RETENTION_S acked them.
CREATE TABLE inbox_devices (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    acked BIGINT NOT NULL,
    filter TEXT,                             -- JSON array of patterns ("task.*"); NULL = all
    created_at BIGINT NOT NULL,
    last_seen_at BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id)
);

-- M-SYNC publish history (GET /publish/messages, /publish/stats). The inbox entry carries the
-- same message; this table outlives inbox pruning.
CREATE TABLE published_messages (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,                   -- the target user
    type TEXT NOT NULL,
    data TEXT NOT NULL,                      -- JSON, exactly as published
    target_device TEXT,
    publisher_user_id TEXT NOT NULL,
    token_id TEXT,
    cursor BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    delivered_at BIGINT                      -- first time a socket of the target was sent it
);
-- History newest first: a user's messages in inbox order (cursor), filtered by time.
CREATE INDEX published_messages_user_idx ON published_messages (user_id, cursor);

-- Idempotent requests (publish idempotency_key, /ws request_id): the first reply, kept 24 h.
-- A row with reply NULL is a claim: its first attempt is still running (or died, see claimed_at).
CREATE TABLE idempotency_keys (
    scope TEXT NOT NULL,                     -- who asked: "publish:<token or user>", "ws:<principal>"
    key TEXT NOT NULL,
    reply TEXT,                              -- JSON
    status INTEGER,                          -- HTTP status of the first reply (REST)
    created_at BIGINT NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_keys_created_idx ON idempotency_keys (created_at);
