"""Contract suite of the store: every test runs on SQLite and on the real PostgreSQL.

What repositories rely on: SQL written once with ``$n`` placeholders, plain-dict rows, portable
types, transactions that commit or roll back (also when cancelled), unique violations as
``ConflictError``, every other driver failure as ``StoreError``/``BackendUnavailable``, and
migrations applied exactly once even when several processes open a fresh database together.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from shared.errors import BackendUnavailable, ConflictError, StoreError
from shared.store import Database, open_database
from shared.store.migrations import load_migrations

T_DDL = (
    "CREATE TABLE t (id BIGINT PRIMARY KEY, name TEXT UNIQUE, n BIGINT, note TEXT,"
    " data BYTEA, flag INTEGER NOT NULL DEFAULT 0)"
)


@dataclass
class Target:
    """Where a test's database lives; ``open()`` connects (and migrates) like the server does."""

    url: str
    schema: str

    async def open(self, *, migrate: bool = True) -> Database:
        return await open_database(self.url, schema=self.schema, migrate=migrate)


@pytest.fixture
def target(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Target:
    if backend == "sqlite":
        return Target(f"sqlite:///{tmp_path}/x.db", "")
    return Target(request.getfixturevalue("pg_url"), request.getfixturevalue("pg_schema"))


@pytest.fixture
async def db(target: Target) -> AsyncIterator[Database]:
    database = await target.open()
    yield database
    await database.close()


@pytest.fixture
async def t(db: Database) -> Database:
    """``db`` with the scratch table ``t``."""
    await db.execute(T_DDL)
    return db


# -- migrations ----------------------------------------------------------------------------------


def test_dialect_folders_hold_the_same_versions_and_names() -> None:
    sqlite_list = [(m.version, m.name) for m in load_migrations("sqlite")]
    pg_list = [(m.version, m.name) for m in load_migrations("postgresql")]
    assert sqlite_list == pg_list
    assert sqlite_list, "no migrations found"
    assert all(re.fullmatch(r"[a-z0-9_]+", name) for _, name in sqlite_list)


async def test_migrations_apply_once_and_a_second_open_is_idempotent(target: Target) -> None:
    expected = [(m.version, m.name) for m in load_migrations("sqlite")]
    first = await target.open(migrate=False)
    try:
        assert await first.migrate() == [name for _, name in expected]
        assert await first.migrate() == []
    finally:
        await first.close()
    second = await target.open()  # migrates on open: nothing left to do, nothing fails
    try:
        assert await second.migrate() == []
        rows = await second.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
        assert [(r["version"], r["name"]) for r in rows] == expected
        # The tables exist: the outbox is queryable.
        assert await second.fetchval("SELECT count(*) FROM outbox") == 0
    finally:
        await second.close()


async def test_processes_opening_a_fresh_database_together_migrate_once(target: Target, tmp_path: Path) -> None:
    # Several workers start at once on an empty database: each migration runs exactly once and
    # no worker fails. The race is timing-dependent, so SQLite runs it on several fresh files.
    expected = sorted(m.name for m in load_migrations("sqlite"))
    rounds = [target] if target.schema else [Target(f"sqlite:///{tmp_path}/race{i}.db", "") for i in range(8)]
    for fresh in rounds:
        dbs = [await fresh.open(migrate=False) for _ in range(6)]
        try:
            applied = await asyncio.gather(*(d.migrate() for d in dbs))
            assert sorted(name for names in applied for name in names) == expected
            assert await dbs[0].fetchval("SELECT count(*) FROM schema_migrations") == len(expected)
        finally:
            for d in dbs:
                await d.close()


# -- placeholders, rowcount, fetch* --------------------------------------------------------------


async def test_placeholders_in_any_order_reused_and_past_nine(t: Database) -> None:
    await t.execute("INSERT INTO t (name, id, n, note) VALUES ($2, $1, $3, $2)", 1, "one", 10)
    row = await t.fetchrow("SELECT id, name, n, note FROM t WHERE id = $1", 1)
    assert row == {"id": 1, "name": "one", "n": 10, "note": "one"}
    # $1 used twice, and $10/$11 must not be read as $1 followed by a digit.
    await t.executemany("INSERT INTO t (id, n) VALUES ($1, $2)", [(i, i * 100) for i in range(2, 12)])
    ids = list(range(1, 12))
    placeholders = ", ".join(f"${i}" for i in range(1, 12))
    got = await t.fetch(f"SELECT id FROM t WHERE id IN ({placeholders}) ORDER BY id", *ids)
    assert [r["id"] for r in got] == ids
    nine = ", ".join(f"${i}" for i in range(1, 10))
    sql = f"SELECT id FROM t WHERE n = $11 AND id = $10 AND id NOT IN ({nine})"
    assert await t.fetchval(sql, *range(1, 11), 1000) == 10
    assert await t.fetchval("SELECT count(*) FROM t WHERE name = $1 OR note = $1", "one") == 1


async def test_dollar_inside_a_string_literal_is_not_a_placeholder(t: Database) -> None:
    assert await t.fetchval("SELECT 'costs $1' AS s") == "costs $1"
    await t.execute("INSERT INTO t (id, name, note) VALUES ($1, 'it''s $2', $2)", 1, "x")
    assert await t.fetchrow("SELECT name, note FROM t") == {"name": "it's $2", "note": "x"}


async def test_execute_returns_rows_affected(t: Database) -> None:
    assert await t.execute("INSERT INTO t (id, n) VALUES ($1, $2), ($3, $4), ($5, $6)", 1, 1, 2, 2, 3, 3) == 3
    assert await t.execute("UPDATE t SET n = n + 10 WHERE n >= $1", 2) == 2
    assert await t.execute("UPDATE t SET n = 0 WHERE id = $1", 99) == 0
    assert await t.execute("DELETE FROM t WHERE id <> $1", 1) == 2
    async with t.transaction() as tx:
        assert await tx.execute("UPDATE t SET note = $1", "x") == 1


async def test_fetch_fetchrow_fetchval(t: Database) -> None:
    await t.executemany("INSERT INTO t (id, name) VALUES ($1, $2)", [(1, "a"), (2, "b")])
    rows = await t.fetch("SELECT id, name FROM t ORDER BY id")
    assert rows == [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    assert all(type(r) is dict for r in rows)
    assert list(rows[0]) == ["id", "name"]  # column order kept
    assert await t.fetch("SELECT id FROM t WHERE id > $1", 5) == []
    assert await t.fetchrow("SELECT name FROM t WHERE id = $1", 2) == {"name": "b"}
    assert await t.fetchrow("SELECT name FROM t WHERE id = $1", 5) is None
    assert await t.fetchval("SELECT name FROM t WHERE id = $1", 1) == "a"
    assert await t.fetchval("SELECT name FROM t WHERE id = $1", 5) is None
    assert await t.fetchval("SELECT count(*) FROM t") == 2


async def test_values_round_trip(t: Database) -> None:
    blob = bytes(range(256))
    text = "héllo wörld 🚀 中文 \u200b 'quote' \"dq\""
    big, small = 2**63 - 1, -(2**63)
    await t.execute("INSERT INTO t (id, name, n, note, data) VALUES ($1, $2, $3, $4, $5)", 1, text, big, None, blob)
    await t.execute("INSERT INTO t (id, name, n, note, data) VALUES ($1, $2, $3, $4, $5)", 2, "", small, "", b"")
    one = await t.fetchrow("SELECT name, n, note, data FROM t WHERE id = 1")
    assert one == {"name": text, "n": big, "note": None, "data": blob}
    assert type(one["data"]) is bytes
    two = await t.fetchrow("SELECT name, n, note, data FROM t WHERE id = 2")
    assert two == {"name": "", "n": small, "note": "", "data": b""}  # empty is not NULL
    assert await t.fetchval("SELECT id FROM t WHERE note IS NULL") == 1
    assert await t.fetchval("SELECT id FROM t WHERE n = $1", big) == 1


# -- transactions --------------------------------------------------------------------------------


async def test_transaction_commits_on_normal_exit(t: Database) -> None:
    async with t.transaction() as tx:
        await tx.execute("INSERT INTO t (id) VALUES ($1)", 1)
        await tx.executemany("INSERT INTO t (id) VALUES ($1)", [(2,), (3,)])
        assert await tx.fetchval("SELECT count(*) FROM t") == 3  # own writes visible inside
    assert await t.fetchval("SELECT count(*) FROM t") == 3


async def test_transaction_rolls_back_on_exception_and_reraises_it(t: Database) -> None:
    with pytest.raises(ZeroDivisionError):
        async with t.transaction() as tx:
            await tx.execute("INSERT INTO t (id) VALUES ($1)", 1)
            raise ZeroDivisionError
    assert await t.fetchval("SELECT count(*) FROM t") == 0
    async with t.transaction() as tx:  # the store is still usable
        await tx.execute("INSERT INTO t (id) VALUES ($1)", 2)
    assert await t.fetchval("SELECT count(*) FROM t") == 1


async def test_transaction_rolls_back_when_cancelled(t: Database) -> None:
    inside = asyncio.Event()

    async def work() -> None:
        async with t.transaction() as tx:
            await tx.execute("INSERT INTO t (id) VALUES ($1)", 1)
            inside.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(work())
    await inside.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await t.fetchval("SELECT count(*) FROM t") == 0
    async with t.transaction() as tx:
        await tx.execute("INSERT INTO t (id) VALUES ($1)", 2)
    assert await t.fetchval("SELECT count(*) FROM t") == 1


async def test_transaction_cancelled_while_a_statement_runs(t: Database) -> None:
    if t.dialect == "postgresql":
        slow = "SELECT pg_sleep(30)"
    else:  # a recursive CTE keeps SQLite's thread busy for a while
        slow = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000000) SELECT sum(x) FROM c"
    inside = asyncio.Event()

    async def work() -> None:
        async with t.transaction() as tx:
            await tx.execute("INSERT INTO t (id) VALUES ($1)", 1)
            inside.set()
            await tx.fetchval(slow)

    task = asyncio.create_task(work())
    await inside.wait()
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await t.fetchval("SELECT count(*) FROM t") == 0
    async with t.transaction() as tx:
        await tx.execute("INSERT INTO t (id) VALUES ($1)", 2)
    assert await t.fetchval("SELECT id FROM t") == 2


async def test_cancellation_at_any_point_leaves_the_store_usable(t: Database) -> None:
    # Cancel a transaction after 0, 1, 2, ... loop iterations: whatever point that hits (BEGIN,
    # a statement, COMMIT), the row is either fully there or not, and the next transaction works.
    for steps in range(40):
        async def work(i: int = steps) -> None:
            async with t.transaction() as tx:
                await tx.execute("INSERT INTO t (id, n) VALUES ($1, $2)", i, 1)
                await tx.execute("UPDATE t SET n = 2 WHERE id = $1", i)

        task = asyncio.create_task(work())
        for _ in range(steps):
            await asyncio.sleep(0)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        async with t.transaction() as tx:
            assert await tx.fetchval("SELECT count(*) FROM t WHERE n = 1") == 0  # never half a transaction
    async with t.transaction() as tx:
        await tx.execute("INSERT INTO t (id) VALUES ($1)", 1000)
    assert await t.fetchval("SELECT count(*) FROM t WHERE id = 1000") == 1


async def test_statements_outside_a_transaction_never_land_inside_one(t: Database) -> None:
    entered = asyncio.Event()

    async def rolled_back() -> None:
        async with t.transaction() as tx:
            await tx.execute("INSERT INTO t (id) VALUES ($1)", 1)
            entered.set()
            await asyncio.sleep(0.05)  # let the other coroutine try to write meanwhile
            raise RuntimeError("abort")

    async def outsider() -> None:
        await entered.wait()
        await t.execute("INSERT INTO t (id) VALUES ($1)", 2)

    results = await asyncio.gather(rolled_back(), outsider(), return_exceptions=True)
    assert isinstance(results[0], RuntimeError) and results[1] is None
    assert [r["id"] for r in await t.fetch("SELECT id FROM t")] == [2]


async def test_concurrent_read_modify_write_transactions_serialize(t: Database) -> None:
    await t.execute("INSERT INTO t (id, n) VALUES (1, 0)")
    # PostgreSQL needs the row lock; SQLite transactions are exclusive (BEGIN IMMEDIATE + lock).
    select = "SELECT n FROM t WHERE id = 1" + (" FOR UPDATE" if t.dialect == "postgresql" else "")

    async def increment() -> None:
        async with t.transaction() as tx:
            n = await tx.fetchval(select)
            await asyncio.sleep(0)  # give every other coroutine the chance to interleave
            await tx.execute("UPDATE t SET n = $1 WHERE id = 1", n + 1)

    await asyncio.gather(*(increment() for _ in range(50)))
    assert await t.fetchval("SELECT n FROM t WHERE id = 1") == 50


# -- errors --------------------------------------------------------------------------------------


def _translated(exc: BaseException) -> None:
    """No driver exception escapes; the driver's is kept as the cause for the logs."""
    assert not isinstance(exc, sqlite3.Error | asyncpg.PostgresError | asyncpg.InterfaceError)
    assert exc.__cause__ is not None


async def test_unique_violation_is_conflict_error_naming_the_constraint(t: Database) -> None:
    await t.execute("INSERT INTO t (id, name) VALUES ($1, $2)", 1, "a")
    with pytest.raises(ConflictError) as info:
        await t.execute("INSERT INTO t (id, name) VALUES ($1, $2)", 2, "a")
    assert info.value.constraint and "name" in info.value.constraint
    _translated(info.value)
    with pytest.raises(ConflictError) as pk:
        await t.execute("INSERT INTO t (id, name) VALUES ($1, $2)", 1, "b")
    assert pk.value.constraint
    with pytest.raises(ConflictError):
        async with t.transaction() as tx:
            await tx.execute("INSERT INTO t (id, name) VALUES ($1, $2)", 3, "c")
            await tx.execute("INSERT INTO t (id, name) VALUES ($1, $2)", 4, "c")
    assert await t.fetchval("SELECT count(*) FROM t") == 1  # the transaction was rolled back


@pytest.mark.parametrize(
    ("sql", "args"),
    [
        ("SELEC nonsense", ()),
        ("SELECT * FROM no_such_table", ()),
        ("INSERT INTO t (id, flag) VALUES ($1, NULL)", (1,)),  # NOT NULL
        ("INSERT INTO t (id) VALUES ($1)", (1, 2)),  # too many arguments
        ("INSERT INTO t (id, name) VALUES ($1, $2)", (1,)),  # too few
        ("INSERT INTO t (id) VALUES ($1)", (2**64,)),  # out of BIGINT range
        ("INSERT INTO t (id) VALUES ($1)", ({"not": "bindable"},)),
    ],
)
async def test_other_errors_are_store_errors(t: Database, sql: str, args: tuple[object, ...]) -> None:
    with pytest.raises(StoreError) as info:
        await t.execute(sql, *args)
    assert not isinstance(info.value, ConflictError | BackendUnavailable)  # the caller's bug, not an outage
    _translated(info.value)
    with pytest.raises(StoreError):
        async with t.transaction() as tx:
            await tx.fetch(sql, *args)
    assert await t.fetchval("SELECT 1") == 1  # still usable afterwards


async def test_unreachable_postgresql_is_backend_unavailable() -> None:
    with pytest.raises(BackendUnavailable) as info:
        await open_database("postgresql://postgres@127.0.0.1:1/test")
    _translated(info.value)


async def test_unusable_sqlite_path_is_backend_unavailable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(BackendUnavailable) as info:
        await open_database(f"sqlite:///{tmp_path}/file/x.db")
    _translated(info.value)


async def test_a_closed_database_is_backend_unavailable(target: Target) -> None:
    database = await target.open()
    await database.ping()
    await database.close()
    with pytest.raises(BackendUnavailable):
        await database.ping()


# -- executemany ---------------------------------------------------------------------------------


async def test_executemany_inserts_all_or_nothing(t: Database) -> None:
    await t.executemany("INSERT INTO t (id, name) VALUES ($1, $2)", [(i, f"n{i}") for i in range(100)])
    assert await t.fetchval("SELECT count(*) FROM t") == 100
    with pytest.raises(ConflictError):
        await t.executemany("INSERT INTO t (id, name) VALUES ($1, $2)", [(200, "x"), (201, "n5"), (202, "y")])
    assert await t.fetchval("SELECT count(*) FROM t WHERE id >= 200") == 0
    await t.executemany("INSERT INTO t (id) VALUES ($1)", [])  # an empty batch is fine
