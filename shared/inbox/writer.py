"""``InboxWriter``: durable appends with group commit, then a wake-up for the delivering nodes.

``await writer.append(entry)`` returns the entry's cursor once it is committed: whoever caused
the event (a REST publish, a socket request) acknowledges only after that (realtime.md
guarantee 1). Group commit (shared/group_commit.py): N concurrent appends cost about one
transaction.

After each commit, one broker message per user of the batch (``inbox:{user_id}``) carries the
new entries to whichever node holds that user's sockets. The wake-up is best effort: the store is
the truth, and the delivering side re-reads it on re-sends, on reconnects and on its periodic
poll, so a wake-up lost with a Redis restart delays delivery, never loses it.

One writer per process (``writer_for(services)``); ``close()`` flushes what is queued.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from shared.broker import Broker
from shared.group_commit import DEFAULT_MAX_BATCH, GroupCommit
from shared.inbox import store
from shared.inbox.events import Entry, inbox_channel, pack_entries
from shared.store.base import Database, Executor

if TYPE_CHECKING:
    from shared.services import Services

log = logging.getLogger("switchboard.inbox")

EXTRAS_KEY = "inbox.writer"


class InboxWriter(GroupCommit[store.NewEntry, int]):
    name = "inbox-writer"

    def __init__(self, db: Database, broker: Broker, *, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        super().__init__(db, max_batch=max_batch)
        self._broker = broker

    async def append(self, entry: store.NewEntry) -> int:
        """Commit ``entry``; its cursor. Raises ``BackendUnavailable``/``StoreError``."""
        return (await self.submit([entry]))[0]

    async def append_many(self, entries: Sequence[store.NewEntry]) -> list[int]:
        """Commit several entries (cursors in order); they may share a batch with others."""
        return await self.submit(entries)

    async def write(self, tx: Executor, items: Sequence[store.NewEntry], now: int) -> list[int]:
        return await store.append_batch(tx, self._db.dialect, items, now)

    async def committed(
        self, items: Sequence[store.NewEntry], results: Sequence[int], now: int
    ) -> None:
        by_user: dict[str, list[Entry]] = defaultdict(list)
        for e, c in zip(items, results, strict=True):
            by_user[e.user_id].append(Entry(c, e.event, e.data, e.target_device, e.expires_at, now))
        started = time.monotonic()
        outcomes = await asyncio.gather(
            *(
                self._broker.publish(inbox_channel(u), pack_entries(es))
                for u, es in by_user.items()
            ),
            return_exceptions=True,
        )
        failed = sum(1 for r in outcomes if isinstance(r, BaseException))
        if failed:
            # Delivery falls back to the store (poll, re-send, reconnect): slower, not lost.
            log.warning(
                "inbox wake-up not published for %d user(s) (%.0f ms)",
                failed,
                (time.monotonic() - started) * 1000,
            )


def writer_for(services: Services) -> InboxWriter:
    """The process's writer (created on first use, closed with the services)."""
    writer = services.extras.get(EXTRAS_KEY)
    if not isinstance(writer, InboxWriter):
        writer = InboxWriter(
            services.db, services.broker, max_batch=services.settings.inbox_batch_max
        )
        services.extras[EXTRAS_KEY] = writer
        services.closers.append(writer.close)
    return writer


__all__ = ["InboxWriter", "writer_for"]
