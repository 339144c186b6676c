"""The inbox tables and the group-commit writer, on SQLite and on the real PostgreSQL.

What delivery relies on: a user's cursors are contiguous and commit in order (also with two
writers racing on the same users), a batch and its extra statements commit together or not at
all, device acks only move forward, pruning keeps what a device in use still needs.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from shared.broker.memory import MemoryBroker
from shared.errors import StoreError
from shared.inbox import store
from shared.inbox.events import inbox_channel, unpack_wake
from shared.inbox.store import NewEntry
from shared.inbox.writer import InboxWriter
from shared.store import Database
from tests.test_store import Target, target  # noqa: F401 - the fixture, re-used

DAY_MS = 86_400_000


@pytest.fixture
async def db(target: Target) -> AsyncIterator[Database]:  # noqa: F811 - target is a fixture
    database = await target.open()
    yield database
    await database.close()


def new(user: str, n: int, **kw: Any) -> NewEntry:
    return NewEntry(user, "publish", json.dumps({"n": n}), **kw)


async def test_cursors_are_contiguous_per_user_in_order(db: Database) -> None:
    async with db.transaction() as tx:
        first = await store.append_batch(tx, db.dialect, [new("a", 1), new("b", 1), new("a", 2)], now=1)
    async with db.transaction() as tx:
        second = await store.append_batch(tx, db.dialect, [new("b", 2), new("a", 3), new("c", 1)], now=2)
    assert first == [1, 1, 2] and second == [2, 3, 1]
    assert await store.head(db, "a") == 3 and await store.head(db, "nobody") == 0
    assert await store.heads(db, ["a", "b", "c", "zz"]) == {"a": 3, "b": 2, "c": 1}
    got = await store.read(db, "a", 0, 3, 10)
    assert [(e.cursor, json.loads(e.data)["n"], e.created_at) for e in got] == [(1, 1, 1), (2, 2, 1), (3, 3, 2)]
    assert [e.cursor for e in await store.read(db, "a", 1, 2, 10)] == [2]  # after < cursor <= upto
    assert [e.cursor for e in await store.read(db, "a", 0, 3, 2)] == [1, 2]  # limit


async def test_a_failing_extra_statement_rolls_the_whole_batch_back(db: Database) -> None:
    def bad(cursor: int) -> list[tuple[str, tuple[Any, ...]]]:
        return [("INSERT INTO no_such_table (x) VALUES ($1)", (cursor,))]

    with pytest.raises(StoreError):
        async with db.transaction() as tx:
            await store.append_batch(tx, db.dialect, [new("a", 1), new("a", 2, also=bad)], now=1)
    assert await store.head(db, "a") == 0 and await store.read(db, "a", 0, 10, 10) == []


async def test_group_commit_one_transaction_for_many_appends_and_one_wake_up_per_user(db: Database) -> None:
    broker = MemoryBroker()
    wakes: list[tuple[str, Any]] = []
    await broker.start(lambda channel, data: wakes.append((channel, unpack_wake(data)[1])))
    for user in ("a", "b"):
        await broker.subscribe(inbox_channel(user))
    writer = InboxWriter(db, broker)
    try:
        results = await asyncio.gather(*(writer.append(new("ab"[i % 2], i)) for i in range(200)))
        assert writer.batches == 1 and writer.appended == 200  # all queued before the first commit
        assert sorted(results[0::2]) == list(range(1, 101)) == results[0::2]  # in call order
        assert results[1::2] == list(range(1, 101))
        await writer.close()
    finally:
        await broker.close()
    assert sorted(channel for channel, _ in wakes) == ["inbox:a", "inbox:b"]
    for _, entries in wakes:
        assert [e.cursor for e in entries] == list(range(1, 101))


async def test_two_writers_racing_on_the_same_users_keep_cursors_unique_and_gapless(target: Target) -> None:  # noqa: F811
    dbs = [await target.open(), await target.open()]
    brokers = [MemoryBroker(), MemoryBroker()]
    writers = [InboxWriter(d, b, max_batch=7) for d, b in zip(dbs, brokers, strict=True)]
    users = [f"u{i}" for i in range(5)]
    try:
        async def run(w: InboxWriter, tag: int) -> list[tuple[str, int]]:
            out = []
            for round_ in range(6):
                batch = [new(u, tag * 100 + round_) for u in users for _ in range(3)]
                cursors = await asyncio.gather(*(w.append(e) for e in batch))
                out += [(e.user_id, c) for e, c in zip(batch, cursors, strict=True)]
            return out

        a, b = await asyncio.gather(run(writers[0], 1), run(writers[1], 2))
        for u in users:
            mine = sorted(c for user, c in a + b if user == u)
            assert mine == list(range(1, 37)), u  # 2 writers x 6 rounds x 3 each, no gap, no dupe
            stored = await store.read(dbs[0], u, 0, 100, 100)
            assert [e.cursor for e in stored] == mine
    finally:
        for w in writers:
            await w.close()
        for d in dbs:
            await d.close()


async def test_a_failed_batch_fails_every_caller_and_takes_no_cursor(db: Database) -> None:
    writer = InboxWriter(db, MemoryBroker())

    def bad(cursor: int) -> list[tuple[str, tuple[Any, ...]]]:
        return [("INSERT INTO no_such_table (x) VALUES ($1)", (cursor,))]

    results = await asyncio.gather(writer.append(new("a", 1)), writer.append(new("a", 2, also=bad)),
                                   return_exceptions=True)
    assert all(isinstance(r, StoreError) for r in results)
    assert await writer.append(new("a", 3)) == 1  # the failed batch consumed nothing
    await writer.close()


async def test_devices_register_at_the_head_and_acks_only_move_forward(db: Database) -> None:
    first = await store.open_device(db, "a", "phone", 7, now=10)
    assert (first.acked, first.created, first.filter) == (7, True, None)
    again = await store.open_device(db, "a", "phone", 99, now=20)
    assert (again.acked, again.created, again.last_seen_at) == (7, False, 10)
    await store.save_acks(db, [("a", "phone", 12, 30)])
    await store.save_acks(db, [("a", "phone", 9, 40)])  # an older socket's late flush
    row = await store.open_device(db, "a", "phone", 0, now=50)
    assert (row.acked, row.last_seen_at) == (12, 40)
    await store.reset_device(db, "a", "phone", 3, now=60)
    assert (await store.open_device(db, "a", "phone", 0, now=70)).acked == 3
    await store.save_filter(db, "a", "phone", '["task.*"]')
    assert (await store.open_device(db, "a", "phone", 0, now=80)).filter == '["task.*"]'


async def test_prune_keeps_what_a_device_in_use_still_needs(db: Database) -> None:
    now = 100 * DAY_MS
    async with db.transaction() as tx:
        await store.append_batch(tx, db.dialect, [new("a", i) for i in range(1, 11)], now=now - DAY_MS)
        await store.append_batch(tx, db.dialect, [new("lonely", 1)], now=now - DAY_MS)
        await store.append_batch(tx, db.dialect, [new("fresh", 1)], now=now)
    await store.open_device(db, "a", "phone", 0, now=now)
    await store.open_device(db, "a", "laptop", 0, now=now)
    await store.open_device(db, "a", "old-tablet", 0, now=now - 40 * DAY_MS)  # not seen in 30 days
    await store.save_acks(db, [("a", "phone", 8, now), ("a", "laptop", 5, now)])
    removed = await store.prune(db, now=now, retention_ms=30 * DAY_MS, min_age_ms=300_000)
    # a: up to min(8, 5) = 5 (the tablet holds nothing); lonely: no device needs it, old enough;
    # fresh: no device either, but younger than the minimum age.
    assert removed == 6
    assert [e.cursor for e in await store.read(db, "a", 0, 99, 99)] == [6, 7, 8, 9, 10]
    assert await store.read(db, "lonely", 0, 99, 99) == []
    assert len(await store.read(db, "fresh", 0, 99, 99)) == 1
    assert await store.head(db, "lonely") == 1  # heads stay: cursors never restart
    # Past the retention everything goes, needed or not.
    assert await store.prune(db, now=now + 31 * DAY_MS, retention_ms=30 * DAY_MS, min_age_ms=0) == 6
