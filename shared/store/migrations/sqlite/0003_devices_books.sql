-- E2EE devices (Home Pocket), books and book membership. Times are unix milliseconds.
-- The server stores only public keys and metadata; book contents are ciphertext it never reads.

-- One row per registered Ed25519 key: registering the same key again finds this row.
CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    public_key TEXT NOT NULL UNIQUE,         -- raw 32-byte Ed25519 key, standard base64 as sent
    platform TEXT NOT NULL,
    name TEXT,
    created_at BIGINT NOT NULL,
    last_active_at BIGINT
);

CREATE TABLE books (
    id TEXT PRIMARY KEY,
    created_by_device TEXT NOT NULL REFERENCES devices (id),
    tier TEXT NOT NULL DEFAULT 'free' CHECK (tier IN ('free', 'paid')),
    created_at BIGINT NOT NULL
);

-- A removed member keeps its row (removed_at set): its tokens stop working for the book at once.
CREATE TABLE book_members (
    book_id TEXT NOT NULL REFERENCES books (id) ON DELETE CASCADE,
    device_id TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    joined_at BIGINT NOT NULL,
    removed_at BIGINT,
    PRIMARY KEY (book_id, device_id)
);
CREATE INDEX book_members_device_idx ON book_members (device_id);
