"""The inbox tables (migration 0004): appends, reads, device cursors, pruning.

Written once for both dialects where the SQL is the same; the append differs, because it is the
hot path and each dialect has its own fastest form:

* PostgreSQL: one upsert of every user's head ``RETURNING`` the new heads (rows locked in
  user-id order, so two nodes' batches never deadlock), then one ``unnest`` insert of all rows;
* SQLite: the write lock is already exclusive (``BEGIN IMMEDIATE``), so read the heads, compute,
  and write with ``executemany``.

Either way a batch is one transaction: its cursors and any extra statements of its entries
(``NewEntry.also``, e.g. the publish history row) commit together or not at all.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared.inbox.events import Entry
from shared.store.base import Dialect, Executor

# Statements an entry adds to its batch's transaction, given its cursor: [(sql, args), ...].
Extra = Callable[[int], Sequence[tuple[str, tuple[Any, ...]]]]

_SQLITE_IN_CHUNK = 500  # bound parameters per IN list (SQLite's limit is 32766; keep it modest)


@dataclass(slots=True)
class NewEntry:
    """An entry to append. ``data`` is JSON text (the caller encodes and size-checks it)."""

    user_id: str
    event: str
    data: str
    target_device: str | None = None
    expires_at: int | None = None
    also: Extra | None = field(default=None, repr=False)


@dataclass(slots=True)
class DeviceCursor:
    acked: int
    filter: str | None
    last_seen_at: int
    created: bool  # the first connection with this device_id: it starts at the head


_ENTRY_COLUMNS = "seq, event, data, target_device, expires_at, created_at"

_PG_HEADS = """
INSERT INTO inbox_heads AS h (user_id, head)
SELECT u, n FROM unnest($1::text[], $2::bigint[]) AS t(u, n) ORDER BY u
ON CONFLICT (user_id) DO UPDATE SET head = h.head + EXCLUDED.head
RETURNING user_id, head
"""
_PG_INSERT = """
INSERT INTO inbox_entries (user_id, seq, event, data, target_device, expires_at, created_at)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::bigint[])
"""
_SQLITE_SET_HEAD = (
    "INSERT INTO inbox_heads (user_id, head) VALUES ($1, $2)"
    " ON CONFLICT (user_id) DO UPDATE SET head = excluded.head"
)
_SQLITE_INSERT = (
    "INSERT INTO inbox_entries (user_id, seq, event, data, target_device, expires_at, created_at)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7)"
)


async def append_batch(
    tx: Executor, dialect: Dialect, entries: Sequence[NewEntry], now: int
) -> list[int]:
    """Give ``entries`` their cursors and insert them (inside the caller's transaction).

    Cursors follow the order of ``entries`` within each user. Returns them in that order.
    """
    counts: dict[str, int] = defaultdict(int)
    for e in entries:
        counts[e.user_id] += 1
    users = sorted(counts)
    if dialect == "postgresql":
        rows = await tx.fetch(_PG_HEADS, users, [counts[u] for u in users])
        heads = {r["user_id"]: int(r["head"]) for r in rows}
    else:
        heads = {u: 0 for u in users}
        for i in range(0, len(users), _SQLITE_IN_CHUNK):
            chunk = users[i : i + _SQLITE_IN_CHUNK]
            marks = ", ".join(f"${n}" for n in range(1, len(chunk) + 1))
            for r in await tx.fetch(
                f"SELECT user_id, head FROM inbox_heads WHERE user_id IN ({marks})", *chunk
            ):
                heads[r["user_id"]] = int(r["head"])
        for u in users:
            heads[u] += counts[u]
        await tx.executemany(_SQLITE_SET_HEAD, [(u, heads[u]) for u in users])
    # The first cursor of each user in this batch: head after the batch minus its count.
    nxt = {u: heads[u] - counts[u] + 1 for u in users}
    cursors: list[int] = []
    for e in entries:
        cursors.append(nxt[e.user_id])
        nxt[e.user_id] += 1
    if dialect == "postgresql":
        await tx.execute(
            _PG_INSERT,
            [e.user_id for e in entries],
            cursors,
            [e.event for e in entries],
            [e.data for e in entries],
            [e.target_device for e in entries],
            [e.expires_at for e in entries],
            [now] * len(entries),
        )
    else:
        await tx.executemany(
            _SQLITE_INSERT,
            [
                (e.user_id, c, e.event, e.data, e.target_device, e.expires_at, now)
                for e, c in zip(entries, cursors, strict=True)
            ],
        )
    extras: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for e, c in zip(entries, cursors, strict=True):
        if e.also is not None:
            for sql, args in e.also(c):
                extras[sql].append(args)
    for sql, arg_list in extras.items():  # one executemany per distinct statement
        await tx.executemany(sql, arg_list)
    return cursors


async def head(db: Executor, user_id: str) -> int:
    value = await db.fetchval("SELECT head FROM inbox_heads WHERE user_id = $1", user_id)
    return int(value or 0)


async def heads(db: Executor, user_ids: Sequence[str]) -> dict[str, int]:
    """Heads of many users (missing users are 0), in chunks."""
    found: dict[str, int] = {}
    for i in range(0, len(user_ids), _SQLITE_IN_CHUNK):
        chunk = list(user_ids[i : i + _SQLITE_IN_CHUNK])
        marks = ", ".join(f"${n}" for n in range(1, len(chunk) + 1))
        for r in await db.fetch(
            f"SELECT user_id, head FROM inbox_heads WHERE user_id IN ({marks})", *chunk
        ):
            found[r["user_id"]] = int(r["head"])
    return found


async def read(db: Executor, user_id: str, after: int, upto: int, limit: int) -> list[Entry]:
    """Entries with ``after < cursor <= upto``, oldest first, at most ``limit``."""
    rows = await db.fetch(
        f"SELECT {_ENTRY_COLUMNS} FROM inbox_entries WHERE user_id = $1 AND seq > $2 AND seq <= $3"
        " ORDER BY seq LIMIT $4",
        user_id,
        after,
        upto,
        limit,
    )
    return [
        Entry(
            int(r["seq"]),
            r["event"],
            r["data"],
            r["target_device"],
            r["expires_at"],
            int(r["created_at"]),
        )
        for r in rows
    ]


async def open_device(
    db: Executor, user_id: str, device_id: str, head_now: int, now: int
) -> DeviceCursor:
    """The device's cursor; a device never seen before is registered at ``head_now``."""
    inserted = await db.execute(
        "INSERT INTO inbox_devices (user_id, device_id, acked, filter, created_at, last_seen_at)"
        " VALUES ($1, $2, $3, NULL, $4, $4) ON CONFLICT (user_id, device_id) DO NOTHING",
        user_id,
        device_id,
        head_now,
        now,
    )
    row = await db.fetchrow(
        "SELECT acked, filter, last_seen_at FROM inbox_devices WHERE user_id = $1 AND device_id = $2",
        user_id,
        device_id,
    )
    assert row is not None  # just inserted, or there already
    return DeviceCursor(
        int(row["acked"]), row["filter"], int(row["last_seen_at"]), created=inserted == 1
    )


# Acks and last_seen_at only move forward, whichever node or socket writes last (CASE: portable
# GREATEST/MAX).
_SAVE_ACK = (
    "UPDATE inbox_devices SET acked = CASE WHEN acked < $3 THEN $3 ELSE acked END,"
    " last_seen_at = CASE WHEN last_seen_at < $4 THEN $4 ELSE last_seen_at END"
    " WHERE user_id = $1 AND device_id = $2"
)


async def save_acks(db: Executor, rows: Sequence[tuple[str, str, int, int]]) -> None:
    """``(user_id, device_id, acked, seen_at)`` rows, one statement for all."""
    if rows:
        await db.executemany(_SAVE_ACK, list(rows))


async def reset_device(db: Executor, user_id: str, device_id: str, acked: int, now: int) -> None:
    """After ``reset``: the device starts over at ``acked`` (may move backwards: nothing was kept)."""
    await db.execute(
        "UPDATE inbox_devices SET acked = $3, last_seen_at = $4 WHERE user_id = $1 AND device_id = $2",
        user_id,
        device_id,
        acked,
        now,
    )


async def save_filter(db: Executor, user_id: str, device_id: str, filter_json: str | None) -> None:
    await db.execute(
        "UPDATE inbox_devices SET filter = $3 WHERE user_id = $1 AND device_id = $2",
        user_id,
        device_id,
        filter_json,
    )


async def prune(db: Executor, *, now: int, retention_ms: int, min_age_ms: int) -> int:
    """Drop entries every device still in use acked, and anything older than the retention.

    A device is in use while it connected within ``retention_ms``; one that did not gets
    ``reset`` when it comes back. Entries no device holds (a user with only device-less
    sessions, or none) are kept ``min_age_ms`` for the re-sends of live sessions.
    """
    stale = now - retention_ms
    removed = await db.execute("DELETE FROM inbox_entries WHERE created_at < $1", stale)
    removed += await db.execute(
        "DELETE FROM inbox_entries WHERE created_at < $2 AND seq <= COALESCE("
        " (SELECT MIN(d.acked) FROM inbox_devices d"
        "  WHERE d.user_id = inbox_entries.user_id AND d.last_seen_at >= $1),"
        " 9223372036854775807)",
        stale,
        now - min_age_ms,
    )
    return removed


__all__ = [
    "DeviceCursor",
    "NewEntry",
    "append_batch",
    "head",
    "heads",
    "open_device",
    "prune",
    "read",
    "reset_device",
    "save_acks",
    "save_filter",
]
