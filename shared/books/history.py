"""The store side of a book's history: seqs, retained ops, pruning, snapshots (0007_book_history).

Seqs come from ``book_heads.head``, raised inside the transaction that inserts the ops. The row
lock serialises a book's writers, so when an op with seq N is visible every op below N is either
visible too or never will be (a rolled-back batch gives its seqs back). A node that sees seq N
arrive before N-1 can therefore read the gap from the store at once (relay/book_relay.py).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from shared.store.base import Database, Dialect, Executor

OP_TYPE = "crdt_operation"


@dataclass(frozen=True, slots=True)
class NewOp:
    book_id: str
    device_id: str
    op_id: str | None
    payload: bytes
    client_ts: int
    relay_ts: int


@dataclass(frozen=True, slots=True)
class Appended:
    seq: int
    duplicate: bool  # the device sent this op id before: ``seq`` is the first one's


@dataclass(frozen=True, slots=True)
class BookState:
    head: int
    pruned_upto: int  # ops with seq <= this are gone
    ops_total: int
    last_op_at: int | None  # unix ms
    snapshot_seq: int | None
    member: bool = True  # the device asked about (``state(..., member=)``) is a current member


def op_frame(
    seq: int, device_id: str, payload: bytes, client_ts: int, relay_ts: int
) -> dict[str, Any]:
    """The relayed op, live or replayed (realtime.md: the same frame shape)."""
    return {
        "type": OP_TYPE,
        "payload": payload,
        "timestamp": client_ts,
        "device_id": device_id,
        "relay_timestamp": relay_ts,
        "seq": seq,
    }


_INSERT = (
    "INSERT INTO book_ops (book_id, seq, device_id, op_id, payload, client_ts, relay_ts, created_at)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
)
_ROWS_CHUNK = 300  # rows per SQLite statement: its default limit is 999 bound parameters
_SQLITE_HEADS = (
    "INSERT INTO book_heads (book_id, head, ops_total, retained_bytes, last_op_at) VALUES {values}"
    " ON CONFLICT (book_id) DO UPDATE SET head = book_heads.head + excluded.head,"
    " ops_total = book_heads.ops_total + excluded.ops_total,"
    " retained_bytes = book_heads.retained_bytes + excluded.retained_bytes,"
    " last_op_at = excluded.last_op_at RETURNING book_id, head, retained_bytes"
)


_PG_KNOWN = """
SELECT o.book_id, o.device_id, o.op_id, o.seq FROM book_ops o
JOIN unnest($1::text[], $2::text[], $3::text[]) AS t(b, d, i)
  ON o.book_id = t.b AND o.device_id = t.d AND o.op_id = t.i
"""
_PG_HEADS = """
INSERT INTO book_heads AS h (book_id, head, ops_total, retained_bytes, last_op_at)
SELECT b, n, n, s, $4 FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS t(b, n, s) ORDER BY b
ON CONFLICT (book_id) DO UPDATE SET head = h.head + EXCLUDED.head,
  ops_total = h.ops_total + EXCLUDED.head,
  retained_bytes = h.retained_bytes + EXCLUDED.retained_bytes, last_op_at = EXCLUDED.last_op_at
RETURNING book_id, head, retained_bytes
"""
_PG_INSERT = """
INSERT INTO book_ops (book_id, seq, device_id, op_id, payload, client_ts, relay_ts, created_at)
SELECT b, q, d, i, p, c, r, $8 FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[],
  $5::bytea[], $6::bigint[], $7::bigint[]) AS t(b, q, d, i, p, c, r)
"""


async def _known(
    tx: Executor, dialect: Dialect, keys: Sequence[tuple[str, str, str]]
) -> dict[tuple[str, str, str], int]:
    """The seqs of the op ids among ``keys`` (book, device, op id) that are already retained."""
    if not keys:
        return {}
    if dialect == "postgresql":
        rows = await tx.fetch(
            _PG_KNOWN, [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys]
        )
        return {(r["book_id"], r["device_id"], r["op_id"]): int(r["seq"]) for r in rows}
    # SQLite: ORed equalities, each an index search (a row-value IN scans the table instead).
    found: dict[tuple[str, str, str], int] = {}
    for n in range(0, len(keys), _ROWS_CHUNK):
        chunk = keys[n : n + _ROWS_CHUNK]
        terms = " OR ".join(
            f"(book_id = ${3 * m + 1} AND device_id = ${3 * m + 2} AND op_id = ${3 * m + 3})"
            for m in range(len(chunk))
        )
        for r in await tx.fetch(
            f"SELECT book_id, device_id, op_id, seq FROM book_ops WHERE {terms}",
            *(value for key in chunk for value in key),
        ):
            found[(r["book_id"], r["device_id"], r["op_id"])] = int(r["seq"])
    return found


async def _raise_heads(
    tx: Executor, dialect: Dialect, counts: dict[str, tuple[int, int]], now: int
) -> dict[str, tuple[int, int]]:
    """Each book's head and retained bytes after adding ``counts[book] = (ops, bytes)``.
    Books in one order for every writer: two nodes' batches never deadlock on the head rows."""
    books = sorted(counts)
    if dialect == "postgresql":
        rows = await tx.fetch(
            _PG_HEADS, books, [counts[b][0] for b in books], [counts[b][1] for b in books], now
        )
        return {r["book_id"]: (int(r["head"]), int(r["retained_bytes"])) for r in rows}
    # SQLite (>= 3.35 for RETURNING): one multi-row upsert per chunk of books.
    heads: dict[str, tuple[int, int]] = {}
    for n in range(0, len(books), _ROWS_CHUNK):
        chunk = books[n : n + _ROWS_CHUNK]
        values = ", ".join(
            f"(${3 * m + 2}, ${3 * m + 3}, ${3 * m + 3}, ${3 * m + 4}, $1)"
            for m in range(len(chunk))
        )
        args: list[Any] = [now]
        for book_id in chunk:
            args += [book_id, counts[book_id][0], counts[book_id][1]]
        for row in await tx.fetch(_SQLITE_HEADS.format(values=values), *args):
            heads[row["book_id"]] = (int(row["head"]), int(row["retained_bytes"]))
    return heads


async def append_batch(
    tx: Executor,
    dialect: Dialect,
    ops: Sequence[NewOp],
    now: int,
    sizes: dict[str, int] | None = None,
) -> list[Appended]:
    """Number and insert ``ops`` (inside the caller's transaction), in order within each book.

    An op whose ``(book, device, op_id)`` is already retained (a re-send, maybe to another node)
    is not inserted again: it answers with the first seq. Two nodes racing the same op id: the
    unique index fails one transaction, which the writer runs again and then finds the op.
    ``sizes`` (when given) receives each written book's retained bytes after the batch. On
    PostgreSQL a batch is three statements whatever its size.
    """
    results: list[Appended | None] = [None] * len(ops)
    keys = list({(op.book_id, op.device_id, op.op_id): None for op in ops if op.op_id is not None})
    known = await _known(tx, dialect, keys)
    fresh: dict[str, list[int]] = defaultdict(list)  # book -> indexes of new ops
    seen: dict[tuple[str, str, str], int] = {}  # the same op id twice within the batch
    for i, op in enumerate(ops):
        key = (op.book_id, op.device_id, op.op_id) if op.op_id is not None else None
        if key is not None and key in known:
            results[i] = Appended(known[key], True)
        elif key is not None and key in seen:
            results[i] = None  # filled after numbering, from the first one
        else:
            if key is not None:
                seen[key] = i
            fresh[op.book_id].append(i)
    if fresh:
        counts = {b: (len(ix), sum(len(ops[i].payload) for i in ix)) for b, ix in fresh.items()}
        heads = await _raise_heads(tx, dialect, counts, now)
        numbered: list[tuple[NewOp, int]] = []
        for book_id, indexes in fresh.items():
            head, retained = heads[book_id]
            if sizes is not None:
                sizes[book_id] = retained
            seq = head - len(indexes)
            for i in indexes:
                seq += 1
                results[i] = Appended(seq, False)
                numbered.append((ops[i], seq))
        await _insert(tx, dialect, numbered, now)
    for i, op in enumerate(ops):
        if results[i] is None:
            first = results[seen[(op.book_id, op.device_id, op.op_id or "")]]
            assert first is not None
            results[i] = Appended(first.seq, True)
    return [r for r in results if r is not None]


async def _insert(
    tx: Executor, dialect: Dialect, numbered: Sequence[tuple[NewOp, int]], now: int
) -> None:
    if dialect == "postgresql":
        await tx.execute(
            _PG_INSERT,
            [op.book_id for op, _ in numbered],
            [seq for _, seq in numbered],
            [op.device_id for op, _ in numbered],
            [op.op_id for op, _ in numbered],
            [op.payload for op, _ in numbered],
            [op.client_ts for op, _ in numbered],
            [op.relay_ts for op, _ in numbered],
            now,
        )
        return
    await tx.executemany(
        _INSERT,
        [
            (op.book_id, seq, op.device_id, op.op_id, op.payload, op.client_ts, op.relay_ts, now)
            for op, seq in numbered
        ],
    )


async def state(db: Executor, book_id: str, member: str | None = None) -> BookState:
    """The book's counters; with ``member``, also whether that device is a current member
    (the relay re-checks it once a socket is subscribed: a removal racing the upgrade)."""
    row = await db.fetchrow(
        "SELECT h.head, h.pruned_upto, h.ops_total, h.last_op_at, s.seq AS snapshot_seq,"
        " m.device_id AS member FROM books b LEFT JOIN book_heads h ON h.book_id = b.id"
        " LEFT JOIN book_snapshots s ON s.book_id = b.id"
        " LEFT JOIN book_members m ON m.book_id = b.id AND m.device_id = $2 AND m.removed_at IS NULL"
        " WHERE b.id = $1",
        book_id,
        member or "",
    )
    if row is None:
        return BookState(0, 0, 0, None, None, False)
    snap = row["snapshot_seq"]
    return BookState(
        int(row["head"] or 0),
        int(row["pruned_upto"] or 0),
        int(row["ops_total"] or 0),
        int(row["last_op_at"]) if row["last_op_at"] is not None else None,
        int(snap) if snap is not None else None,
        row["member"] is not None,
    )


async def head(db: Executor, book_id: str) -> int:
    value = await db.fetchval("SELECT head FROM book_heads WHERE book_id = $1", book_id)
    return int(value) if value is not None else 0


async def read(
    db: Executor, book_id: str, after: int, upto: int, limit: int
) -> list[dict[str, Any]]:
    """Retained ops with ``after < seq <= upto``, oldest first, as relay frames."""
    rows = await db.fetch(
        "SELECT seq, device_id, payload, client_ts, relay_ts FROM book_ops"
        " WHERE book_id = $1 AND seq > $2 AND seq <= $3 ORDER BY seq LIMIT $4",
        book_id,
        after,
        upto,
        limit,
    )
    return [
        op_frame(
            int(r["seq"]),
            r["device_id"],
            bytes(r["payload"]),
            int(r["client_ts"]),
            int(r["relay_ts"]),
        )
        for r in rows
    ]


# -- pruning ------------------------------------------------------------------------------------
async def prune_upto(db: Database, book_id: str, upto: int) -> int:
    """Drop the book's ops with seq <= ``upto`` (``pruned_upto`` never goes down); ops dropped."""
    async with db.transaction() as tx:
        current = await tx.fetchval(
            "SELECT pruned_upto FROM book_heads WHERE book_id = $1", book_id
        )
        if current is None or int(current) >= upto:
            return 0
        freed = await tx.fetchrow(
            "SELECT count(*) AS n, coalesce(sum(length(payload)), 0) AS size FROM book_ops"
            " WHERE book_id = $1 AND seq <= $2",
            book_id,
            upto,
        )
        assert freed is not None
        await tx.execute("DELETE FROM book_ops WHERE book_id = $1 AND seq <= $2", book_id, upto)
        await tx.execute(
            "UPDATE book_heads SET pruned_upto = $2, retained_bytes = CASE"
            " WHEN retained_bytes > $3 THEN retained_bytes - $3 ELSE 0 END WHERE book_id = $1",
            book_id,
            upto,
            int(freed["size"]),
        )
        return int(freed["n"])


async def _size_cut(db: Executor, book_id: str, excess: int) -> int:
    """The seq up to which the oldest ops add up to at least ``excess`` bytes."""
    after, freed = 0, 0
    while True:
        rows = await db.fetch(
            "SELECT seq, length(payload) AS size FROM book_ops WHERE book_id = $1 AND seq > $2"
            " ORDER BY seq LIMIT 1000",
            book_id,
            after,
        )
        if not rows:
            return after
        for r in rows:
            freed += int(r["size"])
            after = int(r["seq"])
            if freed >= excess:
                return after


async def prune_to_size(db: Database, book_id: str, max_bytes: int) -> int:
    """Drop the book's oldest ops until it retains at most ``max_bytes``."""
    retained = await db.fetchval(
        "SELECT retained_bytes FROM book_heads WHERE book_id = $1", book_id
    )
    if retained is None or int(retained) <= max_bytes:
        return 0
    return await prune_upto(db, book_id, await _size_cut(db, book_id, int(retained) - max_bytes))


async def prune(db: Database, *, now_ms: int, max_age_s: int | None, max_bytes: int | None) -> int:
    """One pass over every book: ops past the age, below the latest snapshot, over the size."""
    dropped = 0
    if max_age_s is not None:
        cutoff = now_ms - max_age_s * 1000
        for r in await db.fetch(
            "SELECT book_id, max(seq) AS upto FROM book_ops WHERE created_at < $1 GROUP BY book_id",
            cutoff,
        ):
            dropped += await prune_upto(db, r["book_id"], int(r["upto"]))
    for r in await db.fetch(
        "SELECT s.book_id, s.seq FROM book_snapshots s JOIN book_heads h ON h.book_id = s.book_id"
        " WHERE s.seq > h.pruned_upto"
    ):
        dropped += await prune_upto(db, r["book_id"], int(r["seq"]))
    if max_bytes is not None:
        for r in await db.fetch(
            "SELECT book_id FROM book_heads WHERE retained_bytes > $1", max_bytes
        ):
            dropped += await prune_to_size(db, r["book_id"], max_bytes)
    return dropped
