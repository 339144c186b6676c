-- Accounts, sessions (refresh-token families), email tokens, API tokens and the audit log.
-- Times are unix milliseconds (BIGINT); JSON is TEXT; "flags" are nullable timestamps.
-- Secrets (refresh, email and API tokens) are stored only as SHA-256 hex (shared.secrets.hash_token).

CREATE TABLE users (
    id TEXT PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,              -- stored lower-cased: uniqueness is case-insensitive
    display_name TEXT NOT NULL,
    password_hash TEXT NOT NULL,             -- argon2id string (libsodium format)
    email_verified_at BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- One row per login: the refresh-token family. Revoking it kills its refresh tokens and, at once,
-- the access JWTs that carry its id in `sid`.
CREATE TABLE sessions (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    device_name TEXT NOT NULL,
    ip_hash TEXT,
    created_at BIGINT NOT NULL,
    last_used_at BIGINT NOT NULL,            -- last login/refresh (not every access-token use)
    revoked_at BIGINT,
    revoked_reason TEXT
);
CREATE INDEX sessions_user_idx ON sessions (user_id, created_at, id);

-- Used rows are kept until they expire: presenting one again is reuse and revokes the family.
CREATE TABLE refresh_tokens (
    token_hash TEXT PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT
);
CREATE INDEX refresh_tokens_session_idx ON refresh_tokens (session_id);
CREATE INDEX refresh_tokens_expires_idx ON refresh_tokens (expires_at);

CREATE TABLE email_tokens (
    token_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    purpose TEXT NOT NULL CHECK (purpose IN ('verify', 'reset')),
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT
);
CREATE INDEX email_tokens_user_idx ON email_tokens (user_id, purpose);

CREATE TABLE api_tokens (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    scopes TEXT NOT NULL,                    -- JSON array of scope names
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    last_used_at BIGINT,                     -- refreshed at most once a minute
    revoked_at BIGINT
);
CREATE INDEX api_tokens_user_idx ON api_tokens (user_id, created_at, id);

-- Kept 90 days (shared.audit.prune). No foreign key: entries outlive nothing they point to, and a
-- failed login for an unknown email has no user. The id orders entries (newest last on export).
CREATE TABLE audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT,
    event TEXT NOT NULL,
    subject_hash TEXT,
    ip_hash TEXT,
    details TEXT NOT NULL,                   -- JSON object
    created_at BIGINT NOT NULL
);
CREATE INDEX audit_log_user_idx ON audit_log (user_id, id);
CREATE INDEX audit_log_created_idx ON audit_log (created_at);
