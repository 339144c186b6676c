"""Settings: one frozen dataclass, read from the environment (12-factor) with an optional TOML file.

Every field carries its environment variable name, default and one-line doc in its metadata, so
``switchboard --help`` and the README table are generated from the same place and cannot drift.

Precedence: environment variable > TOML file (``SWITCHBOARD_CONFIG``, keys are the lower-case
field names or the env names) > default.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A setting has a value that cannot be used."""


UNLIMITED = -1  # RateSpec.count of "unlimited"


@dataclass(frozen=True, slots=True)
class RateSpec:
    """``count`` events per ``period_s`` seconds, e.g. parsed from ``"10/900"``; ``"unlimited"``
    (``count`` = ``UNLIMITED``) where a tier has no limit (the seed's paid photo downloads)."""

    count: int
    period_s: float

    @classmethod
    def parse(cls, text: str) -> RateSpec:
        if text.strip().lower() == "unlimited":
            return cls(UNLIMITED, 1.0)
        try:
            count, _, period = text.partition("/")
            spec = cls(int(count), float(period or 1))
        except ValueError as exc:
            raise ConfigError(f"rate must look like COUNT/SECONDS, got {text!r}") from exc
        if spec.count < 0 or spec.period_s <= 0:
            raise ConfigError(f"rate must be COUNT>=0 / SECONDS>0, got {text!r}")
        return spec

    @property
    def unlimited(self) -> bool:
        return self.count == UNLIMITED

    def __str__(self) -> str:
        if self.unlimited:
            return "unlimited"
        period = int(self.period_s) if self.period_s == int(self.period_s) else self.period_s
        return f"{self.count}/{period}"


def _s(env: str, default: Any, doc: str) -> Any:
    return field(default=default, metadata={"env": env, "doc": doc})


@dataclass(frozen=True)
class Settings:
    # -- server ---------------------------------------------------------------------------
    host: str = _s("HOST", "0.0.0.0", "Address to listen on.")
    port: int = _s("PORT", 8080, "The one port: WebSocket upgrades and REST.")
    workers: int = _s(
        "WORKERS", 1, "Worker processes sharing the port (SO_REUSEPORT); >1 needs REDIS_URL."
    )
    public_url: str = _s(
        "PUBLIC_URL",
        "",
        "Base URL clients reach us at (links in emails, local blob URLs). Default http://localhost:PORT.",
    )
    data_dir: str = _s(
        "DATA_DIR",
        "./data",
        "Directory for the SQLite file, local blobs, .eml outbox and generated secrets.",
    )
    tls_cert_file: str = _s(
        "TLS_CERT_FILE",
        "",
        "Serve TLS with this certificate chain (PEM). Usually TLS ends at the load balancer.",
    )
    tls_key_file: str = _s("TLS_KEY_FILE", "", "Private key for TLS_CERT_FILE.")
    log_level: str = _s("LOG_LEVEL", "INFO", "Logging level (DEBUG, INFO, WARNING, ERROR).")
    allowed_origins: str = _s(
        "ALLOWED_ORIGINS",
        "",
        "Comma-separated browser Origins allowed to open sockets; empty = any.",
    )
    shutdown_timeout_s: float = _s(
        "SHUTDOWN_TIMEOUT_S", 10.0, "SIGTERM drain: seconds before the process exits regardless."
    )
    ready_timeout_s: float = _s(
        "READY_TIMEOUT_S",
        2.0,
        "GET /ready: seconds each backend check may take before it counts as down.",
    )
    # -- backends -------------------------------------------------------------------------
    database_url: str = _s(
        "DATABASE_URL",
        "",
        "postgresql://user@host/db for PostgreSQL; empty or sqlite:///path for SQLite (default DATA_DIR/switchboard.db).",
    )
    database_pool_min: int = _s(
        "DATABASE_POOL_MIN", 1, "PostgreSQL pool: minimum connections per worker."
    )
    database_pool_max: int = _s(
        "DATABASE_POOL_MAX", 10, "PostgreSQL pool: maximum connections per worker."
    )
    database_schema: str = _s(
        "DATABASE_SCHEMA",
        "",
        "PostgreSQL schema to use (created if missing); empty = the server's default search_path.",
    )
    redis_url: str = _s(
        "REDIS_URL",
        "",
        "redis://host:6379/0 switches broker, rate limits and presence to Redis; empty = in-process.",
    )
    redis_prefix: str = _s(
        "REDIS_PREFIX",
        "sb:",
        "Prefix for every Redis key and channel (isolates deployments sharing a Redis).",
    )
    redis_cluster: bool = _s(
        "REDIS_CLUSTER",
        False,
        "REDIS_URL points at a Redis Cluster: use sharded pub/sub (SPUBLISH/SSUBSCRIBE).",
    )
    s3_endpoint: str = _s(
        "S3_ENDPOINT",
        "",
        "S3-compatible endpoint URL; with S3_BUCKET switches blobs from the local directory to S3.",
    )
    s3_bucket: str = _s("S3_BUCKET", "", "Bucket for photos, snapshots, backups and attachments.")
    s3_region: str = _s("S3_REGION", "us-east-1", "S3 region.")
    s3_access_key_id: str = _s(
        "S3_ACCESS_KEY_ID",
        "",
        "S3 access key (falls back to the AWS_* environment/credential chain).",
    )
    s3_secret_access_key: str = _s("S3_SECRET_ACCESS_KEY", "", "S3 secret key.")
    blob_dir: str = _s("BLOB_DIR", "", "Local blob directory (default DATA_DIR/blobs).")
    blob_url_ttl_s: int = _s(
        "BLOB_URL_TTL_S", 300, "Lifetime of signed/presigned blob URLs (at most 300)."
    )
    # -- secrets and tokens ---------------------------------------------------------------
    jwt_secret: str = _s(
        "JWT_SECRET",
        "",
        "HMAC key for user access JWTs; empty = generated once into DATA_DIR/jwt_secret.",
    )
    blob_signing_key: str = _s(
        "BLOB_SIGNING_KEY",
        "",
        "HMAC key for local blob URLs; empty = generated once into DATA_DIR/blob_key.",
    )
    access_token_ttl_s: int = _s("ACCESS_TOKEN_TTL_S", 900, "User access JWT lifetime (15 min).")
    refresh_token_ttl_s: int = _s(
        "REFRESH_TOKEN_TTL_S", 30 * 86400, "Refresh token lifetime (30 days)."
    )
    email_token_ttl_s: int = _s("EMAIL_TOKEN_TTL_S", 86400, "Email verification token lifetime.")
    reset_token_ttl_s: int = _s(
        "RESET_TOKEN_TTL_S", 1800, "Password reset token lifetime (30 min)."
    )
    password_min_length: int = _s("PASSWORD_MIN_LENGTH", 10, "Minimum password length.")
    argon2_opslimit: int = _s(
        "ARGON2_OPSLIMIT", 2, "argon2id ops limit (libsodium INTERACTIVE = 2)."
    )
    argon2_memlimit: int = _s(
        "ARGON2_MEMLIMIT",
        67108864,
        "argon2id memory limit in bytes (libsodium INTERACTIVE = 64 MiB).",
    )
    admin_emails: str = _s(
        "ADMIN_EMAILS",
        "",
        "Comma-separated emails of instance operators (may grant the `admin` scope).",
    )
    # -- email ----------------------------------------------------------------------------
    smtp_url: str = _s(
        "SMTP_URL",
        "",
        "smtp://host:25, smtps://user:pass@host:465 or smtp+starttls://...; empty = .eml files in DATA_DIR/outbox.",
    )
    mail_from: str = _s(
        "MAIL_FROM", "Switchboard <no-reply@localhost>", "From: address of outgoing mail."
    )
    mail_retry_max: int = _s(
        "MAIL_RETRY_MAX", 8, "Delivery attempts per email before it is marked failed."
    )
    # -- REST limits ----------------------------------------------------------------------
    max_body_bytes: int = _s(
        "MAX_BODY_BYTES", 1048576, "JSON request body limit (413 PAYLOAD_TOO_LARGE above)."
    )
    max_head_bytes: int = _s("MAX_HEAD_BYTES", 16384, "HTTP request head limit (431 above).")
    rate_login_email: str = _s(
        "RATE_LOGIN_EMAIL", "10/900", "Failed logins per email (COUNT/SECONDS)."
    )
    rate_login_ip: str = _s("RATE_LOGIN_IP", "50/900", "Failed logins per IP.")
    rate_register_ip: str = _s("RATE_REGISTER_IP", "30/3600", "Registrations per IP.")
    rate_forgot_email: str = _s("RATE_FORGOT_EMAIL", "5/3600", "Password-reset emails per address.")
    # -- E2EE devices and books (Home Pocket) ---------------------------------------------
    rate_device_register_ip: str = _s(
        "RATE_DEVICE_REGISTER_IP", "100/3600", "E2EE device registrations per IP."
    )
    rate_book_create: str = _s("RATE_BOOK_CREATE", "20/3600", "Books created per device.")
    rate_relay_connect: str = _s(
        "RATE_RELAY_CONNECT", "5/600", "/ws/relay/{book_id} connections per device."
    )
    rate_pairing_generate: str = _s(
        "RATE_PAIRING_GENERATE", "10/3600", "Pairing codes generated per device."
    )
    rate_pairing_fail_device: str = _s(
        "RATE_PAIRING_FAIL_DEVICE", "10/600", "Failed pairing verifications per device."
    )
    rate_pairing_fail_ip: str = _s(
        "RATE_PAIRING_FAIL_IP", "30/3600", "Failed pairing verifications per IP."
    )
    # The Home Pocket seed's table (section 2.3), per device; *_PAID when the book's tier is paid.
    rate_photo_upload: str = _s(
        "RATE_PHOTO_UPLOAD", "100/86400", "POST /photos/upload per device (free tier)."
    )
    rate_photo_upload_paid: str = _s(
        "RATE_PHOTO_UPLOAD_PAID", "1000/86400", "POST /photos/upload per device (paid tier)."
    )
    rate_photo_get: str = _s(
        "RATE_PHOTO_GET", "500/86400", "GET /photos/{id} per device (free tier)."
    )
    rate_photo_get_paid: str = _s(
        "RATE_PHOTO_GET_PAID", "unlimited", "GET /photos/{id} per device (paid tier)."
    )
    rate_relay_send: str = _s(
        "RATE_RELAY_SEND", "1000/86400", "POST /relay/send per device (free tier)."
    )
    rate_relay_send_paid: str = _s(
        "RATE_RELAY_SEND_PAID", "10000/86400", "POST /relay/send per device (paid tier)."
    )
    pairing_ttl_s: int = _s("PAIRING_TTL_S", 300, "Lifetime of a pairing code (seconds).")
    photo_max_bytes: int = _s(
        "PHOTO_MAX_BYTES", 10485760, "Largest photo (400 PHOTO_TOO_LARGE above)."
    )
    snapshot_max_bytes: int = _s(
        "SNAPSHOT_MAX_BYTES", 67108864, "Largest encrypted book snapshot (413 above)."
    )
    book_retention: str = _s(
        "BOOK_RETENTION",
        "30d,64MiB",
        "Ciphertext kept per book for catch-up: an age and/or a size (e.g. 7d, 16MiB); 0 = store nothing.",
    )
    book_prune_interval_s: float = _s(
        "BOOK_PRUNE_INTERVAL_S",
        60.0,
        "How often expired, oversized and snapshotted book history is dropped.",
    )
    # -- realtime -------------------------------------------------------------------------
    heartbeat_s: float = _s(
        "HEARTBEAT_S", 30.0, "Server ping interval; a socket silent for 2x is closed."
    )
    handshake_timeout_s: float = _s(
        "HANDSHAKE_TIMEOUT_S", 10.0, "Time allowed to finish the HTTP/WebSocket handshake."
    )
    max_handshakes_per_ip: int = _s(
        "MAX_HANDSHAKES_PER_IP", 64, "Concurrent unfinished handshakes per client IP."
    )
    ws_max_frame_bytes: int = _s(
        "WS_MAX_FRAME_BYTES", 1048576, "Inbound WebSocket message limit (close 1009 above)."
    )
    # 256 fragments: a 1 MiB message in 4 KiB chunks. Below WS_BURST on purpose: every fragment
    # takes a rate token, so a message within this bound also fits a full bucket, and one split
    # too finely gets 1009 (do not resend it) instead of 4029 (pause, then resend: a retry loop).
    ws_max_fragments: int = _s(
        "WS_MAX_FRAGMENTS",
        256,
        "Frames one inbound WebSocket message may be split into (close 1009 above); keep it at most WS_BURST.",
    )
    ws_rate: str = _s(
        "WS_RATE",
        "200/1",
        "Inbound frames per connection per second; every fragment of a message is a frame.",
    )
    ws_burst: int = _s("WS_BURST", 400, "Inbound frame burst per connection.")
    ws_outbound_limit_bytes: int = _s(
        "WS_OUTBOUND_LIMIT_BYTES",
        1048576,
        "Per-connection outbound buffer bound (close 4008 above).",
    )
    rate_ws_connect: str = _s(
        "RATE_WS_CONNECT", "60/600", "/ws connections per principal+device_id."
    )
    # -- durable delivery (inbox) ---------------------------------------------------------
    ack_timeout_s: float = _s(
        "ACK_TIMEOUT",
        5.0,
        "Seconds before un-acked inbox events are re-sent (then doubling, up to ACK_TIMEOUT_MAX).",
    )
    ack_timeout_max_s: float = _s(
        "ACK_TIMEOUT_MAX", 60.0, "Longest interval between re-sends to a device that does not ack."
    )
    inbox_retention_s: int = _s(
        "INBOX_RETENTION_S",
        30 * 86400,
        "Inbox entries are kept for devices seen within this (30 days); older devices get reset.",
    )
    inbox_min_retention_s: int = _s(
        "INBOX_MIN_RETENTION_S",
        300,
        "Entries no device still needs are kept this long (re-sends to device-less sessions).",
    )
    inbox_batch_max: int = _s(
        "INBOX_BATCH_MAX", 1000, "Group commit: most inbox entries written in one transaction."
    )
    inbox_replay_page: int = _s(
        "INBOX_REPLAY_PAGE", 500, "Entries read per store query during catch-up and re-sends."
    )
    inbox_poll_s: float = _s(
        "INBOX_POLL_S",
        10.0,
        "Safety net: how often a node compares its sockets' cursors with the store (lost wake-ups).",
    )
    inbox_ack_flush_s: float = _s(
        "INBOX_ACK_FLUSH_S",
        1.0,
        "How often acked cursors and heartbeat timestamps are written to the store (one batch each per interval).",
    )
    auth_cache_s: float = _s(
        "AUTH_CACHE_S",
        2.0,
        "How long a process reuses an API token's lookup (0 = every request asks the store); revocations drop it at once.",
    )
    idempotency_ttl_s: int = _s(
        "IDEMPOTENCY_TTL_S", 86400, "How long a request_id / idempotency_key keeps its first reply."
    )
    # -- presence -------------------------------------------------------------------------
    presence_timeout_s: float = _s(
        "PRESENCE_TIMEOUT_S",
        90.0,
        "A device without a socket stays online this long after its last heartbeat.",
    )
    presence_grace_s: float = _s(
        "PRESENCE_GRACE_S",
        10.0,
        "device.offline fires this long after a device's last socket closes (reconnects in between are silent).",
    )
    presence_ttl_s: float = _s(
        "PRESENCE_TTL_S",
        30.0,
        "Lifetime of a node's presence entries in Redis (refreshed at a third of it; a dead node's devices expire).",
    )
    # -- publish (M-SYNC) -----------------------------------------------------------------
    rate_publish: str = _s("RATE_PUBLISH", "200/1", "POST /publish per token (or user).")
    publish_burst: int = _s("PUBLISH_BURST", 1000, "POST /publish burst per token.")
    publish_max_bytes: int = _s(
        "PUBLISH_MAX_BYTES", 65536, "Largest encoded `data` of one publish (413 above)."
    )

    # ----------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError("WORKERS must be >= 1")
        if self.workers > 1 and not self.redis_url:
            raise ConfigError("WORKERS > 1 needs REDIS_URL (workers share state through Redis)")
        if self.ws_max_fragments < 1:
            raise ConfigError("WS_MAX_FRAGMENTS must be >= 1 (1 = no fragmented messages)")
        if not 0 < self.blob_url_ttl_s <= 300:
            raise ConfigError(
                "BLOB_URL_TTL_S must be in 1..300 (presigned URLs are bearer credentials)"
            )
        for f in dataclasses.fields(self):
            if f.name.startswith("rate_") or f.name == "ws_rate":
                RateSpec.parse(getattr(self, f.name))

    # -- derived values (kept as properties so they follow the fields) -----------------------
    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def effective_public_url(self) -> str:
        return (self.public_url or f"http://localhost:{self.port}").rstrip("/")

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_path / 'switchboard.db'}"

    @property
    def effective_blob_dir(self) -> Path:
        return Path(self.blob_dir) if self.blob_dir else self.data_path / "blobs"

    @property
    def uses_postgres(self) -> bool:
        return self.effective_database_url.startswith(("postgres://", "postgresql://"))

    @property
    def uses_s3(self) -> bool:
        return bool(self.s3_endpoint or self.s3_bucket)

    @property
    def admin_email_set(self) -> frozenset[str]:
        return frozenset(e.strip().lower() for e in self.admin_emails.split(",") if e.strip())

    @property
    def allowed_origin_set(self) -> frozenset[str]:
        return frozenset(o.strip() for o in self.allowed_origins.split(",") if o.strip())

    def rate(self, name: str) -> RateSpec:
        """The parsed ``COUNT/SECONDS`` value of a ``rate_*`` field."""
        return RateSpec.parse(getattr(self, name))


def setting_fields() -> list[dataclasses.Field[Any]]:
    return list(dataclasses.fields(Settings))


def _coerce(f: dataclasses.Field[Any], raw: Any) -> Any:
    kind: type = type(f.default)  # every Settings field has a plain default
    if isinstance(raw, kind) and not (kind is int and isinstance(raw, bool)):
        return raw
    text = str(raw).strip()
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(text)
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError as exc:
        raise ConfigError(f"{f.metadata['env']}: expected {kind.__name__}, got {text!r}") from exc
    return text


def load_settings(env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build settings from ``env`` (default ``os.environ``), the TOML file it names, and overrides."""
    env = os.environ if env is None else env
    file_values: dict[str, Any] = {}
    path = env.get("SWITCHBOARD_CONFIG")
    if path:
        try:
            with open(path, "rb") as fh:
                file_values = {str(k).lower(): v for k, v in tomllib.load(fh).items()}
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"SWITCHBOARD_CONFIG={path}: {exc}") from exc
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        name, env_name = f.name, f.metadata["env"]
        if name in overrides:
            values[name] = overrides[name]
        elif env_name in env:
            values[name] = _coerce(f, env[env_name])
        elif name in file_values or env_name.lower() in file_values:
            values[name] = _coerce(f, file_values.get(name, file_values.get(env_name.lower())))
    return Settings(**values)


def describe_settings() -> str:
    """Human-readable table of every setting, for ``--help`` and the README."""
    lines = []
    for f in dataclasses.fields(Settings):
        default = f.default
        shown = repr(default) if default != "" else "(empty)"
        lines.append(f"  {f.metadata['env']:<26} default {shown}\n      {f.metadata['doc']}")
    return "\n".join(lines)
