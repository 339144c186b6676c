"""Shared fixtures. Real services only: PostgreSQL at DATABASE_URL, Redis at REDIS_URL.

Isolation: every PostgreSQL-backed test gets its own schema (dropped afterwards), every
Redis-backed test its own key prefix (deleted afterwards), every test its own DATA_DIR. A missing
service is an error, never a skip: CI must not pass without them.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from shared.config import Settings, load_settings

# Fixture modules, one per real service the tests start or reach.
pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.smtp",
    "tests.fixtures.server",
    "tests.fixtures.inbox",
    "tests.fixtures.redis_cluster",
]

PG_URL = os.environ.get("DATABASE_URL") or "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
if not PG_URL.startswith(("postgres://", "postgresql://")):
    PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


def unique(prefix: str) -> str:
    return f"{prefix}{os.getpid()}_{secrets.token_hex(4)}"


@pytest.fixture
def pg_url() -> str:
    return PG_URL


@pytest.fixture
async def pg_schema() -> AsyncIterator[str]:
    """A fresh PostgreSQL schema, dropped after the test."""
    schema = unique("sbt_")
    try:
        conn = await asyncpg.connect(PG_URL, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"PostgreSQL is required at {PG_URL}: {exc}")
    await conn.close()
    yield schema
    conn = await asyncpg.connect(PG_URL, timeout=5)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
def redis_url() -> str:
    return REDIS_URL


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    """A fresh Redis key prefix; its keys are deleted after the test."""
    prefix = unique("sbt:") + ":"
    client = aioredis.from_url(REDIS_URL)
    try:
        await client.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means the service is missing
        await client.aclose()
        pytest.fail(f"Redis is required at {REDIS_URL}: {exc}")
    yield prefix
    keys = [k async for k in client.scan_iter(match=prefix + "*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Settings for a test: own DATA_DIR, fast argon2, nothing from the developer's environment."""

    def make(**overrides: Any) -> Settings:
        base: dict[str, Any] = {
            "data_dir": str(tmp_path / "data"),
            "port": 0,
            "argon2_opslimit": 1,
            "argon2_memlimit": 8192,
            "jwt_secret": "test-secret-" + secrets.token_hex(16),
        }
        base.update(overrides)
        return load_settings(env={}, **base)

    return make


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def backend_settings(
    backend: str, make_settings: Callable[..., Settings], pg_schema: str, redis_prefix: str
) -> Settings:
    """Settings on SQLite, or on PostgreSQL (own schema) + Redis (own prefix).

    Both isolation fixtures are always requested (cheap): pytest-asyncio cannot resolve fixtures
    lazily from inside an async fixture.
    """
    if backend == "sqlite":
        return make_settings()
    return make_settings(database_url=PG_URL, database_schema=pg_schema, redis_url=REDIS_URL, redis_prefix=redis_prefix)


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> asyncio.Future[None]:
    """Poll ``predicate`` until true (fails the test after ``timeout``)."""

    async def poll() -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            if loop.time() > deadline:
                raise AssertionError("condition not met in time")
            await asyncio.sleep(0.01)

    return asyncio.ensure_future(poll())


# -- CI: a skipped test is a failure (a missing service must never pass silently) -------------
_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # An expected failure (xfail) is reported as "skipped" too; it is not a missing service.
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped and os.environ.get("SWITCHBOARD_NO_SKIPS") == "1":
        print(f"\nSWITCHBOARD_NO_SKIPS=1 and {len(_skipped)} test(s) skipped: {_skipped[:5]}")
        session.exitstatus = 1
