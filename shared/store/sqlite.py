"""SQLite backend (aiosqlite): the embedded default.

One connection per process in WAL mode, with ``busy_timeout`` so several worker processes can
share the file. aiosqlite runs every call on one thread, so statements are serialized anyway; a
lock makes a transaction exclusive for its whole ``async with`` body, so no other coroutine's
statement lands inside it.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import aiosqlite

from shared.errors import BackendUnavailable, ConflictError, StoreError
from shared.store.base import Executor, Row
from shared.store.migrations import CREATE_TABLE, load_migrations

_PLACEHOLDER = re.compile(r"\$(\d+)")


@lru_cache(maxsize=1024)
def _to_sqlite(sql: str) -> str:
    # ?NNN is SQLite's numbered parameter, the same meaning as PostgreSQL's $NNN.
    return _PLACEHOLDER.sub(r"?\1", sql)


def _adapt(args: tuple[Any, ...]) -> tuple[Any, ...]:
    # Booleans are stored as 0/1; everything else is bound as is.
    return tuple(int(a) if isinstance(a, bool) else a for a in args)


@contextmanager
def _map_errors() -> Iterator[None]:
    try:
        yield
    except sqlite3.IntegrityError as exc:
        text = str(exc)
        if text.startswith("UNIQUE constraint failed") or "PRIMARY KEY" in text:
            raise ConflictError(text, constraint=text.split(":", 1)[-1].strip()) from exc
        raise StoreError(text) from exc
    except sqlite3.OperationalError as exc:
        if "unable to open" in str(exc):
            raise BackendUnavailable(str(exc)) from exc
        raise StoreError(str(exc)) from exc
    except sqlite3.Error as exc:
        raise StoreError(str(exc)) from exc
    except ValueError as exc:  # aiosqlite: "no active connection"
        raise BackendUnavailable(str(exc)) from exc


class _SqliteExecutor:
    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> int:
        with _map_errors():
            cur = await self._conn.execute(_to_sqlite(sql), _adapt(args))
            count = cur.rowcount
            await cur.close()
            return max(count, 0)

    async def executemany(self, sql: str, args: list[tuple[Any, ...]]) -> None:
        with _map_errors():
            await self._conn.executemany(_to_sqlite(sql), [_adapt(a) for a in args])

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        with _map_errors():
            async with self._conn.execute(_to_sqlite(sql), _adapt(args)) as cur:
                rows = await cur.fetchall()
                return [dict(r) for r in rows]

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        with _map_errors():
            async with self._conn.execute(_to_sqlite(sql), _adapt(args)) as cur:
                row = await cur.fetchone()
                return dict(row) if row is not None else None

    async def fetchval(self, sql: str, *args: Any) -> Any:
        row = await self.fetchrow(sql, *args)
        return None if row is None else next(iter(row.values()))


class SqliteDatabase:
    dialect: Literal["sqlite"] = "sqlite"

    def __init__(self, conn: aiosqlite.Connection, path: str) -> None:
        self._conn = conn
        self._exec = _SqliteExecutor(conn)
        self._lock = asyncio.Lock()
        self.path = path

    @classmethod
    async def connect(cls, path: str) -> SqliteDatabase:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        with _map_errors():
            conn = await aiosqlite.connect(path, isolation_level=None)
            conn.row_factory = sqlite3.Row
            for pragma in (
                "PRAGMA journal_mode=WAL",
                "PRAGMA synchronous=NORMAL",
                "PRAGMA busy_timeout=5000",
                "PRAGMA foreign_keys=ON",
            ):
                await conn.execute(pragma)
        return cls(conn, path)

    # Autocommit statements outside a transaction still take the lock, so they never run
    # inside another coroutine's open transaction on the shared connection.
    async def execute(self, sql: str, *args: Any) -> int:
        async with self._lock:
            return await self._exec.execute(sql, *args)

    async def executemany(self, sql: str, args: list[tuple[Any, ...]]) -> None:
        async with self.transaction() as tx:
            await tx.executemany(sql, args)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        async with self._lock:
            return await self._exec.fetch(sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        async with self._lock:
            return await self._exec.fetchrow(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        async with self._lock:
            return await self._exec.fetchval(sql, *args)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Executor]:
        async with self._lock:
            with _map_errors():
                # IMMEDIATE takes the write lock up front: no SQLITE_BUSY upgrade deadlock
                # between worker processes that both read, then both try to write.
                await self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._exec
            except BaseException:
                await asyncio.shield(self._rollback())
                raise
            with _map_errors():
                await self._conn.execute("COMMIT")

    async def _rollback(self) -> None:
        try:
            await self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    async def ping(self) -> None:
        await self.fetchval("SELECT 1")

    async def migrate(self) -> list[str]:
        applied: list[str] = []
        async with self._lock:
            with _map_errors():
                await self._conn.execute(CREATE_TABLE)
                done = {r[0] for r in await self._conn.execute_fetchall("SELECT version FROM schema_migrations")}
                for m in load_migrations(self.dialect):
                    if m.version in done:
                        continue
                    # executescript would COMMIT first; wrap the script in one transaction instead.
                    script = (
                        "BEGIN IMMEDIATE;\n"
                        f"{m.sql}\n;"
                        f"INSERT INTO schema_migrations (version, name, applied_at) "
                        f"VALUES ({int(m.version)}, '{m.name.replace(chr(39), '')}', {int(time.time() * 1000)});\n"
                        "COMMIT;"
                    )
                    try:
                        await self._conn.executescript(script)
                    except BaseException:
                        await self._rollback()
                        raise
                    applied.append(m.name)
        return applied

    async def close(self) -> None:
        await self._conn.close()


