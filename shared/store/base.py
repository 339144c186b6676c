"""The ``Database`` protocol and the factory that picks an implementation from the URL."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal, Protocol

Row = Mapping[str, Any]
Dialect = Literal["sqlite", "postgresql"]


class Executor(Protocol):
    """What a connection and a transaction both offer. ``sql`` uses ``$1..$n`` placeholders."""

    async def execute(self, sql: str, *args: Any) -> int:
        """Run a statement; returns the number of rows affected."""
        ...

    async def executemany(self, sql: str, args: list[tuple[Any, ...]]) -> None: ...

    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...

    async def fetchrow(self, sql: str, *args: Any) -> Row | None: ...

    async def fetchval(self, sql: str, *args: Any) -> Any: ...


class Database(Executor, Protocol):
    # Read-only, so an implementation may narrow it (``dialect: Literal["sqlite"]``).
    @property
    def dialect(self) -> Dialect: ...

    def transaction(self) -> AbstractAsyncContextManager[Executor]:
        """A transaction: commits on normal exit, rolls back on any exception or cancellation.

        Inside the body use only the yielded executor: on SQLite the database is locked for
        the whole body (calling ``db.*`` there would wait forever), on PostgreSQL ``db.*``
        would run on another connection, outside the transaction. Not re-entrant.
        ``ConflictError.constraint`` is the backend's name for the violated constraint
        (PostgreSQL: the constraint name, SQLite: ``table.column``): match on the column.
        """
        ...

    async def ping(self) -> None:
        """Raise ``BackendUnavailable`` when the database cannot answer."""
        ...

    async def migrate(self) -> list[str]:
        """Apply pending migrations; returns the names applied."""
        ...

    async def close(self) -> None: ...


async def open_database(
    url: str,
    *,
    pool_min: int = 1,
    pool_max: int = 10,
    schema: str = "",
    migrate: bool = True,
) -> Database:
    """Connect to ``url`` (``sqlite:///path`` or ``postgresql://...``) and apply migrations."""
    db: Database
    if url.startswith(("postgres://", "postgresql://")):
        from shared.store.postgres import PostgresDatabase

        db = await PostgresDatabase.connect(
            url, pool_min=pool_min, pool_max=pool_max, schema=schema
        )
    elif url.startswith("sqlite:///"):
        from shared.store.sqlite import SqliteDatabase

        # SQLAlchemy's convention: sqlite:///relative.db, sqlite:////absolute.db, sqlite:///:memory:
        db = await SqliteDatabase.connect(url.removeprefix("sqlite:///"))
    else:
        raise ValueError(f"unsupported DATABASE_URL scheme: {url.split(':', 1)[0]!r}")
    if migrate:
        await db.migrate()
    return db
