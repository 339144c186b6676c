"""The backends one worker process runs with, opened from ``Settings`` and closed together.

``open_services`` picks each implementation from the settings (the embedded default needs no
external service): SQLite or PostgreSQL, in-process or Redis broker and limiter, local directory
or S3 blobs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from shared.blobs import BlobStore
from shared.broker import Broker
from shared.config import Settings
from shared.principals import Principal
from shared.ratelimit import RateLimiter
from shared.secrets import load_or_create
from shared.store import Database, open_database

log = logging.getLogger("switchboard.services")

Authenticator = Callable[[str], Awaitable[Principal]]


@dataclass(eq=False)
class Services:
    settings: Settings
    db: Database
    broker: Broker
    blobs: BlobStore
    limiter: RateLimiter
    jwt_key: bytes
    # Installed by the API layer at startup (api.auth_tokens), used by REST and socket upgrades.
    authenticator: Authenticator | None = None
    # Free-form slots for components that attach themselves (hub, outbox sender, ...).
    extras: dict[str, Any] = field(default_factory=dict)
    # Run first on close, newest first: components that flush into the backends (the inbox
    # writer's queued batch, delivery cursors) before those close.
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def close(self) -> None:
        for closer in reversed(self.closers):
            try:
                await closer()
            except Exception:  # noqa: BLE001 - one failing flush must not keep the rest open
                log.exception("closing a component failed")
        self.closers.clear()
        for name in ("broker", "limiter", "blobs", "db"):
            with contextlib.suppress(Exception):
                await getattr(self, name).close()


def make_broker(settings: Settings) -> Broker:
    if settings.redis_url:
        from shared.broker.redis import RedisBroker

        return RedisBroker(
            settings.redis_url, prefix=settings.redis_prefix, cluster=settings.redis_cluster
        )
    from shared.broker.memory import MemoryBroker

    return MemoryBroker()


def make_limiter(settings: Settings) -> RateLimiter:
    if settings.redis_url:
        from shared.ratelimit.redis import RedisRateLimiter

        return RedisRateLimiter(
            settings.redis_url, prefix=settings.redis_prefix, cluster=settings.redis_cluster
        )
    from shared.ratelimit.memory import MemoryRateLimiter

    return MemoryRateLimiter()


async def make_blobs(settings: Settings) -> BlobStore:
    if settings.uses_s3:
        from shared.blobs.s3 import S3BlobStore

        return await S3BlobStore.open(
            endpoint=settings.s3_endpoint or None,
            bucket=settings.s3_bucket,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id or None,
            secret_access_key=settings.s3_secret_access_key or None,
        )
    from shared.blobs.local import LocalBlobStore

    key = (
        settings.blob_signing_key.encode()
        if settings.blob_signing_key
        else load_or_create(settings.data_path / "blob_key")
    )
    return LocalBlobStore(settings.effective_blob_dir, key, settings.effective_public_url)


async def open_services(settings: Settings, *, migrate: bool = True) -> Services:
    db = await open_database(
        settings.effective_database_url,
        pool_min=settings.database_pool_min,
        pool_max=settings.database_pool_max,
        schema=settings.database_schema,
        migrate=migrate,
    )
    jwt_key = (
        settings.jwt_secret.encode()
        if settings.jwt_secret
        else load_or_create(settings.data_path / "jwt_secret")
    )
    broker = make_broker(settings)
    limiter = make_limiter(settings)
    blobs = await make_blobs(settings)
    return Services(
        settings=settings, db=db, broker=broker, blobs=blobs, limiter=limiter, jwt_key=jwt_key
    )
