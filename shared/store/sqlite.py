"""SQLite backend (aiosqlite): the embedded default.

One connection per process in WAL mode, with ``busy_timeout`` so several worker processes can
share the file. aiosqlite runs every call on one thread, so statements are serialized anyway; a
lock makes a transaction exclusive for its whole ``async with`` body, so no other coroutine's
statement lands inside it.
"""

from __future__ import annotations

import asyncio
import logging
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
from shared.store.migrations import CREATE_TABLE, Migration, load_migrations

# aiosqlite's DEBUG lines quote every bound parameter (token hashes, email bodies with links):
# with LOG_LEVEL=DEBUG they would reach the logs, so its logger never goes below INFO.
logging.getLogger("aiosqlite").setLevel(logging.INFO)

# A $n outside quotes; quoted strings and identifiers are matched whole so a '$1' inside a
# literal stays text, as it does on PostgreSQL.
_PLACEHOLDER = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\$(\d+)")


def _placeholder(match: re.Match[str]) -> str:
    return match.group(0) if match.group(1) is None else "?" + match.group(1)


@lru_cache(maxsize=1024)
def _to_sqlite(sql: str) -> str:
    # ?NNN is SQLite's numbered parameter, the same meaning as PostgreSQL's $NNN.
    return _PLACEHOLDER.sub(_placeholder, sql)


def _statements(script: str) -> list[str]:
    """Split a migration script into statements (``;`` inside literals, comments or triggers kept)."""
    found, start = [], 0
    for match in re.finditer(";", script):
        candidate = script[start : match.end()]
        if sqlite3.complete_statement(candidate):
            found.append(candidate)
            start = match.end()
    found.append(script[start:])
    return [s for s in found if s.strip().strip(";").strip()]


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
    except OverflowError as exc:  # an int outside SQLite's 64-bit INTEGER
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
        try:
            if path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendUnavailable(
                f"sqlite: cannot create the directory of {path}: {exc}"
            ) from exc
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
        # aiosqlite runs statements on its own thread in FIFO order, and cancelling the await
        # does not stop a statement already queued. So every way out that is not a COMMIT
        # queues a ROLLBACK behind whatever is pending (BEGIN included) before the lock is
        # released: the next transaction never finds this one still open.
        async with self._lock:
            try:
                with _map_errors():
                    # IMMEDIATE takes the write lock up front: no SQLITE_BUSY upgrade deadlock
                    # between worker processes that both read, then both try to write.
                    await self._conn.execute("BEGIN IMMEDIATE")
            except BaseException:
                await asyncio.shield(self._rollback())
                raise
            try:
                yield self._exec
                with _map_errors():
                    await self._conn.execute("COMMIT")
            except BaseException:
                await asyncio.shield(self._rollback())
                raise

    async def _rollback(self) -> None:
        try:
            await self._conn.execute("ROLLBACK")
        except (sqlite3.Error, ValueError):  # no transaction open, or the connection is gone
            pass

    async def ping(self) -> None:
        await self.fetchval("SELECT 1")

    async def migrate(self) -> list[str]:
        applied: list[str] = []
        async with self._lock:
            with _map_errors():
                await self._conn.execute(CREATE_TABLE)
                done = {
                    r[0]
                    for r in await self._conn.execute_fetchall(
                        "SELECT version FROM schema_migrations"
                    )
                }
                for m in load_migrations(self.dialect):
                    if m.version not in done and await self._apply(m):
                        applied.append(m.name)
        return applied

    async def _apply(self, m: Migration) -> bool:
        """Apply one migration in its own transaction; False if another process already did.

        Statements run one by one (``executescript`` would COMMIT first and could not be made
        conditional), under BEGIN IMMEDIATE, i.e. the file's write lock, so worker processes
        opening a fresh database together apply each migration once.
        """
        try:
            await self._conn.execute("BEGIN IMMEDIATE")
            fresh = not list(
                await self._conn.execute_fetchall(
                    "SELECT 1 FROM schema_migrations WHERE version = ?", (m.version,)
                )
            )
            if fresh:
                for statement in _statements(m.sql):
                    await self._conn.execute(statement)
                await self._conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    (m.version, m.name, int(time.time() * 1000)),
                )
            await self._conn.execute("COMMIT")
        except BaseException:
            await asyncio.shield(self._rollback())
            raise
        return fresh

    async def close(self) -> None:
        await self._conn.close()
