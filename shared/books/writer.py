"""``BookWriter``: book ops committed with group commit, then published to the book's channel.

``await writer.append(op)`` returns once the op is in ``book_ops`` with its seq (or, for a re-sent
op id, the first seq): the sender's ``ack`` leaves only after that (realtime.md guarantee 1).
After each commit every new op goes to ``book:{<book_id>}`` as a hub envelope carrying its seq;
the relay nodes put a book's ops back in seq order and read any gap from the store
(relay/book_relay.py), so a publish lost with a Redis restart delays delivery, never loses it.

A book over its size cap (``BOOK_RETENTION``) is trimmed right after the commit that pushed it
over, not only by the periodic pass: a fast sender must not grow a book far past the cap.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

from shared.books import history
from shared.books.history import Appended, NewOp, op_frame
from shared.books.retention import Retention
from shared.broker import Broker
from shared.broker.envelope import pack_envelope
from shared.errors import BackendUnavailable
from shared.group_commit import GroupCommit
from shared.secrets import hash_id
from shared.store.base import Database, Executor

log = logging.getLogger("switchboard.relay")

BOOK_DIGEST = 32  # hex digits (128 bits) of a book id's SHA-256 in its channel name: no collisions


@functools.lru_cache(maxsize=65536)  # a SHA-256 per op and per delivery otherwise
def channel_of(book_id: str) -> str:
    # The braces are a Redis Cluster hash tag: the channel and its seq counter share one slot,
    # so the sequenced publish (one script: INCR + SPUBLISH) can run there (shared/broker/redis.py).
    # A digest, not the id: Redis (channel names, MONITOR, key listings) never sees a book id.
    return f"book:{{{hash_id(book_id, BOOK_DIGEST)}}}"


def sequence_key_of(book_id: str) -> str:
    return f"bookseq:{{{hash_id(book_id, BOOK_DIGEST)}}}"


class BookWriter(GroupCommit[NewOp, Appended]):
    name = "book-writer"

    def __init__(self, db: Database, broker: Broker, retention: Retention) -> None:
        super().__init__(db)
        self._broker = broker
        self._max_bytes = retention.max_bytes
        self._over: set[str] = set()  # books a commit pushed past the size cap

    async def append(self, op: NewOp) -> Appended:
        return (await self.submit([op]))[0]

    async def write(self, tx: Executor, items: Sequence[NewOp], now: int) -> list[Appended]:
        sizes: dict[str, int] = {}
        results = await history.append_batch(tx, self._db.dialect, items, now, sizes)
        if self._max_bytes is not None:
            self._over.update(b for b, size in sizes.items() if size > self._max_bytes)
        return results

    def retryable(self, exc: Exception) -> bool:
        # Two nodes inserting the same (book, device, op id) at once: the loser runs again and
        # then finds the op (history.append_batch answers it with the first seq).
        text = str(exc)
        return "Deadlock" in text or "unique" in text.lower() or "UNIQUE" in text

    async def committed(
        self, items: Sequence[NewOp], results: Sequence[Appended], now: int
    ) -> None:
        messages = [
            (
                channel_of(op.book_id),
                pack_envelope(
                    op_frame(result.seq, op.device_id, op.payload, op.client_ts, op.relay_ts),
                    op.device_id,
                    seq=result.seq,
                ),
            )
            for op, result in zip(items, results, strict=True)
            if not result.duplicate
        ]
        try:
            await self._broker.publish_many(messages)  # one round trip per batch on Redis
        except BackendUnavailable:
            # The nodes' poll and the next op's gap read deliver them from the store.
            log.warning(
                "%d book op(s) not published; delivery falls back to the store", len(messages)
            )
        while self._over and self._max_bytes is not None:
            book_id = self._over.pop()
            try:
                await history.prune_to_size(self._db, book_id, self._max_bytes)
            except Exception as exc:  # noqa: BLE001 - the periodic pass retries it
                log.warning("book size trim failed: %s", exc)
