-- Email outbox: rows are written in the caller's transaction (so a rolled-back registration
-- sends nothing) and delivered by shared.mail.sender.OutboxSender.
-- status: 'pending' | 'sent' | 'failed'. Times are unix milliseconds.
-- claimed_until: a sender owns the row until then (a crashed sender's claim simply expires).
CREATE TABLE outbox (
    id TEXT PRIMARY KEY,
    to_addr TEXT NOT NULL,
    subject TEXT NOT NULL,
    body_text TEXT NOT NULL,
    template TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    claimed_until BIGINT,
    last_error TEXT,
    created_at BIGINT NOT NULL,
    sent_at BIGINT
);

-- The sender's poll: pending rows whose next attempt is due, oldest first.
CREATE INDEX outbox_status_next_idx ON outbox (status, next_attempt_at);
