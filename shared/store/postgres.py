"""PostgreSQL backend (asyncpg, pooled).

``schema`` puts every table in its own schema (created if missing, set as ``search_path`` on each
pooled connection): tests use it to isolate runs, deployments to share a database.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Literal

import asyncpg

from shared.errors import BackendUnavailable, ConflictError, StoreError
from shared.store.base import Executor, Row
from shared.store.migrations import CREATE_TABLE, load_migrations

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


# The server cannot serve us (class 08 connection exceptions, 53300 too many connections,
# 57P01-57P03 shutting down / starting up): an outage, not the caller's bug.
_UNAVAILABLE = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
)


@contextmanager
def _map_errors() -> Iterator[None]:
    try:
        yield
    except asyncpg.UniqueViolationError as exc:
        raise ConflictError(str(exc), constraint=exc.constraint_name) from exc
    except _UNAVAILABLE as exc:
        raise BackendUnavailable(f"postgresql: {type(exc).__name__}: {exc}") from exc
    except asyncpg.PostgresError as exc:
        raise StoreError(f"{type(exc).__name__}: {exc}") from exc
    except asyncpg.InterfaceError as exc:
        # asyncpg uses InterfaceError both for a closed pool/connection (an outage) and for
        # misuse such as a wrong argument count (a bug); only the message tells them apart.
        if "closed" in str(exc) or "closing" in str(exc):
            raise BackendUnavailable(f"postgresql: {exc}") from exc
        raise StoreError(f"InterfaceError: {exc}") from exc
    except asyncpg.exceptions.InternalClientError as exc:
        raise StoreError(f"{type(exc).__name__}: {exc}") from exc
    except (TimeoutError, OSError) as exc:
        raise BackendUnavailable(f"postgresql: {exc}") from exc


async def _keep_session(conn: Any) -> None:
    """The pool's reset on release: nothing to undo.

    asyncpg's default runs ``RESET ALL; UNLISTEN *; CLOSE ALL; pg_advisory_unlock_all()`` on every
    release, one more round trip per query (15 % of the server's samples under the durable
    publish benchmark). This store leaves no session state behind: the schema is a startup
    parameter, nothing LISTENs or SETs, the migration lock is released in a ``finally``. asyncpg
    still rolls back a transaction left open before calling this.
    """


def _rowcount(status: str) -> int:
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


class _PgExecutor:
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> int:
        with _map_errors():
            return _rowcount(await self._conn.execute(sql, *args))

    async def executemany(self, sql: str, args: list[tuple[Any, ...]]) -> None:
        with _map_errors():
            await self._conn.executemany(sql, args)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        with _map_errors():
            return [dict(r) for r in await self._conn.fetch(sql, *args)]

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        with _map_errors():
            row = await self._conn.fetchrow(sql, *args)
            return dict(row) if row is not None else None

    async def fetchval(self, sql: str, *args: Any) -> Any:
        with _map_errors():
            return await self._conn.fetchval(sql, *args)


class PostgresDatabase:
    dialect: Literal["postgresql"] = "postgresql"

    def __init__(self, pool: Any, schema: str) -> None:
        self._pool = pool
        self._exec = _PgExecutor(pool)  # a Pool has execute/fetch*: one connection per call
        self.schema = schema

    @classmethod
    async def connect(
        cls, url: str, *, pool_min: int = 1, pool_max: int = 10, schema: str = ""
    ) -> PostgresDatabase:
        if schema and not _SCHEMA_NAME.match(schema):
            raise ValueError(f"invalid schema name {schema!r}")
        settings = {"search_path": schema} if schema else {}
        with _map_errors():
            if schema:
                # Identifiers cannot be bound as parameters; the name was validated above.
                conn = await asyncpg.connect(url, timeout=10)
                try:
                    await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
                except asyncpg.UniqueViolationError:
                    pass  # IF NOT EXISTS is not atomic: a process starting beside us created it
                finally:
                    await conn.close()
            pool = await asyncpg.create_pool(
                url,
                min_size=pool_min,
                max_size=pool_max,
                server_settings=settings,
                timeout=10,
                command_timeout=30,
                reset=_keep_session,
            )
        return cls(pool, schema)

    async def execute(self, sql: str, *args: Any) -> int:
        return await self._exec.execute(sql, *args)

    async def executemany(self, sql: str, args: list[tuple[Any, ...]]) -> None:
        await self._exec.executemany(sql, args)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return await self._exec.fetch(sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        return await self._exec.fetchrow(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._exec.fetchval(sql, *args)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Executor]:
        with _map_errors():
            conn = await self._pool.acquire()
        try:
            with _map_errors():
                tx = conn.transaction()
                await tx.start()
            try:
                yield _PgExecutor(conn)
            except BaseException:
                await asyncio.shield(self._rollback(tx))
                raise
            with _map_errors():
                await tx.commit()
        finally:
            # Released under shield so a cancelled request never leaks a pooled connection.
            await asyncio.shield(self._pool.release(conn))

    @staticmethod
    async def _rollback(tx: Any) -> None:
        # The caller's exception is what matters; a rollback that fails (connection lost) must
        # not replace it, and the pool discards a broken connection on release anyway.
        with contextlib.suppress(
            asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError
        ):
            await tx.rollback()

    async def ping(self) -> None:
        await self.fetchval("SELECT 1")

    @property
    def pool_stats(self) -> tuple[int, int]:
        """(connections in use, pool size), for the database_connections_active gauge."""
        size = self._pool.get_size()
        return size - self._pool.get_idle_size(), size

    async def migrate(self) -> list[str]:
        applied: list[str] = []
        with _map_errors():
            async with self._pool.acquire() as conn:
                # Workers and nodes start together: one migrates, the others wait here.
                await conn.execute(
                    "SELECT pg_advisory_lock(hashtext($1))", f"sb-migrate:{self.schema}"
                )
                try:
                    await conn.execute(CREATE_TABLE)
                    done = {r[0] for r in await conn.fetch("SELECT version FROM schema_migrations")}
                    for m in load_migrations(self.dialect):
                        if m.version in done:
                            continue
                        async with conn.transaction():
                            await conn.execute(m.sql)
                            await conn.execute(
                                "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
                                m.version,
                                m.name,
                                int(time.time() * 1000),
                            )
                        applied.append(m.name)
                finally:
                    await conn.execute(
                        "SELECT pg_advisory_unlock(hashtext($1))", f"sb-migrate:{self.schema}"
                    )
        return applied

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self._pool.close(), timeout=5)
        except TimeoutError:
            self._pool.terminate()  # a connection still busy past the deadline: cut it
