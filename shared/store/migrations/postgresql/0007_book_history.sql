-- The book relay's retained ciphertext (realtime.md "Book relay", BOOK_RETENTION) and snapshots.
-- The server never reads a payload: it stores the bytes it relayed, numbered per book, so a device
-- that was offline can catch up with ?since=<seq>. Times are unix milliseconds.

-- One row per book that has ever had an op: the seq counter and what is still retained.
-- Seqs are given out by UPDATE ... head = head + n inside the op's transaction, so the committed
-- seqs of a book are gapless and a node seeing a gap knows the missing ops are already readable.
CREATE TABLE book_heads (
    book_id TEXT PRIMARY KEY REFERENCES books (id) ON DELETE CASCADE,
    head BIGINT NOT NULL,                    -- the last seq given out
    pruned_upto BIGINT NOT NULL DEFAULT 0,   -- ops with seq <= this are gone (retained_from_seq - 1)
    ops_total BIGINT NOT NULL DEFAULT 0,     -- ops ever accepted
    retained_bytes BIGINT NOT NULL DEFAULT 0,
    last_op_at BIGINT
);

CREATE TABLE book_ops (
    book_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    device_id TEXT NOT NULL,                 -- the sender, from its credential
    op_id TEXT,                              -- the client's op id: re-sends are acknowledged once
    payload BYTEA NOT NULL,                  -- ciphertext, exactly as relayed
    client_ts BIGINT NOT NULL,               -- the frame's "timestamp" (unix s)
    relay_ts BIGINT NOT NULL,                -- "relay_timestamp" (unix s)
    created_at BIGINT NOT NULL,
    PRIMARY KEY (book_id, seq)
);
CREATE UNIQUE INDEX book_ops_op_id_idx ON book_ops (book_id, device_id, op_id) WHERE op_id IS NOT NULL;
CREATE INDEX book_ops_created_idx ON book_ops (created_at);

-- The latest encrypted snapshot of a book (PUT /books/{id}/snapshot, compare-and-swap on seq).
CREATE TABLE book_snapshots (
    book_id TEXT PRIMARY KEY REFERENCES books (id) ON DELETE CASCADE,
    seq BIGINT NOT NULL,                     -- covers every op up to and including this seq
    blob_key TEXT NOT NULL,                  -- server-made: snapshots/<uuid>
    size_bytes BIGINT NOT NULL,
    device_id TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

-- How far each member device has been served (sync_status.delivered_seq), written in batches.
CREATE TABLE book_device_sync (
    book_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    delivered_seq BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (book_id, device_id)
);
