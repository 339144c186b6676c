-- Home Pocket pairing codes (rest.md /pairing/*), when no Redis is configured (shared/pairing/sql.py).
-- The code itself is never stored: code_hash is HMAC-SHA256(key derived from the server secret,
-- the six digits), hex. Times are unix milliseconds.

-- A row lives while its code is live (expires_at), then 5 minutes after the match or the expiry
-- (keep_until) so the generating device can still ask /pairing/exchange; swept after that.
CREATE TABLE pairing_codes (
    code_hash TEXT PRIMARY KEY,              -- one record per code: unique among kept codes
    book_id TEXT NOT NULL REFERENCES books (id) ON DELETE CASCADE,
    device_id TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,  -- the generating device
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    keep_until BIGINT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'matched')),
    peer_device_id TEXT,                     -- the device that verified the code (matched)
    matched_at BIGINT
);
CREATE INDEX pairing_codes_keep_idx ON pairing_codes (keep_until);
