"""``InboxWriter``: durable appends with group commit, then a wake-up for the delivering nodes.

``await writer.append(entry)`` returns the entry's cursor once it is committed: whoever caused
the event (a REST publish, a socket request) acknowledges only after that (realtime.md
guarantee 1). Appends that arrive while a batch is being written wait for the next one, so N
concurrent appends cost about one transaction, not N (group commit): the batch grows with the
load, up to ``max_batch`` entries.

After each commit, one broker message per user of the batch (``inbox:{user_id}``) carries the
new entries to whichever node holds that user's sockets. The wake-up is best effort: the store is
the truth, and the delivering side re-reads it on re-sends, on reconnects and on its periodic
poll, so a wake-up lost with a Redis restart delays delivery, never loses it.

One writer per process (``writer_for(services)``); ``close()`` flushes what is queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from shared.broker import Broker
from shared.clock import now_ms
from shared.errors import BackendUnavailable, StoreError
from shared.inbox import store
from shared.inbox.events import Entry, inbox_channel, pack_entries
from shared.store.base import Database

if TYPE_CHECKING:
    from shared.services import Services

log = logging.getLogger("switchboard.inbox")

EXTRAS_KEY = "inbox.writer"
DEFAULT_MAX_BATCH = 1000
_DEADLOCK_RETRIES = 3


class InboxWriter:
    def __init__(self, db: Database, broker: Broker, *, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        self._db = db
        self._broker = broker
        self._max_batch = max(1, max_batch)
        self._queue: list[tuple[store.NewEntry, asyncio.Future[int]]] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._publishing: set[asyncio.Task[None]] = set()
        self._closed = False
        self.batches = 0  # committed batches (tests and benchmarks read it)
        self.appended = 0

    async def append(self, entry: store.NewEntry) -> int:
        """Commit ``entry``; its cursor. Raises ``BackendUnavailable``/``StoreError``."""
        return (await self.append_many([entry]))[0]

    async def append_many(self, entries: Sequence[store.NewEntry]) -> list[int]:
        """Commit several entries (cursors in order); they may share a batch with others."""
        if self._closed:
            raise BackendUnavailable("the inbox writer is closed")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in entries]
        self._queue.extend(zip(entries, futures, strict=True))
        self._ensure_running()
        assert self._wakeup is not None
        self._wakeup.set()
        # shield: a caller that gives up must not cancel the batch others are waiting on; its
        # entry may still commit (like any request whose client hung up after sending it).
        return list(await asyncio.shield(asyncio.gather(*futures)))

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="inbox-writer")

    async def _run(self) -> None:
        assert self._wakeup is not None
        wakeup = self._wakeup
        while True:
            if not self._queue:
                if self._closed:
                    return
                wakeup.clear()
                await wakeup.wait()
                continue
            batch = self._queue[: self._max_batch]
            del self._queue[: self._max_batch]
            await self._commit(batch)

    async def _commit(self, batch: list[tuple[store.NewEntry, asyncio.Future[int]]]) -> None:
        entries = [e for e, _ in batch]
        now = now_ms()
        cursors: list[int] | None = None
        error: Exception | None = None
        for attempt in range(_DEADLOCK_RETRIES):
            try:
                async with self._db.transaction() as tx:
                    cursors = await store.append_batch(tx, self._db.dialect, entries, now)
                break
            except Exception as exc:  # noqa: BLE001 - every caller of the batch must hear of it
                error = exc
                # A deadlock rolls the whole batch back, so it is safe to run it again.
                if "Deadlock" not in str(exc) or attempt == _DEADLOCK_RETRIES - 1:
                    break
        if cursors is None:
            log.warning("inbox batch of %d not committed: %s", len(batch), error)
            failure = (
                error
                if isinstance(error, BackendUnavailable | StoreError)
                else StoreError(str(error))
            )
            for _, future in batch:
                if not future.done():
                    future.set_exception(failure)
            return
        self.batches += 1
        self.appended += len(batch)
        for (_, future), cursor in zip(batch, cursors, strict=True):
            if not future.done():
                future.set_result(cursor)
        by_user: dict[str, list[Entry]] = defaultdict(list)
        for e, c in zip(entries, cursors, strict=True):
            by_user[e.user_id].append(Entry(c, e.event, e.data, e.target_device, e.expires_at, now))
        task = asyncio.get_running_loop().create_task(self._wake(by_user))
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def _wake(self, by_user: dict[str, list[Entry]]) -> None:
        started = time.monotonic()
        results = await asyncio.gather(
            *(
                self._broker.publish(inbox_channel(u), pack_entries(es))
                for u, es in by_user.items()
            ),
            return_exceptions=True,
        )
        failed = sum(1 for r in results if isinstance(r, BaseException))
        if failed:
            # Delivery falls back to the store (poll, re-send, reconnect): slower, not lost.
            log.warning(
                "inbox wake-up not published for %d user(s) (%.0f ms)",
                failed,
                (time.monotonic() - started) * 1000,
            )

    async def close(self) -> None:
        """Commit what is queued, publish its wake-ups, stop."""
        self._closed = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
        if self._publishing:
            await asyncio.gather(*self._publishing, return_exceptions=True)


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
