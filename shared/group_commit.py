"""``GroupCommit``: many concurrent appends, one transaction per batch.

``await writer.submit(items)`` returns once the items are committed: whoever caused them
acknowledges only after that (realtime.md guarantee 1). Items that arrive while a batch is being
written wait for the next one, so N concurrent appends cost about one transaction, not N: the
batch grows with the load, up to ``max_batch`` items. A subclass says how a batch is written
(``write``, inside the transaction) and what follows a commit (``committed``: wake-ups).

The inbox (shared/inbox/writer.py) and the book history (shared/books/writer.py) use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Generic, TypeVar

from shared.clock import now_ms
from shared.errors import BackendUnavailable, StoreError
from shared.store.base import Database, Executor

log = logging.getLogger("switchboard.store")

Item = TypeVar("Item")
Result = TypeVar("Result")

DEFAULT_MAX_BATCH = 1000
_RETRIES = 3  # a deadlock or a lost uniqueness race rolls the whole batch back: run it again


class GroupCommit(Generic[Item, Result]):
    name = "group-commit"

    def __init__(self, db: Database, *, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        self._db = db
        self._max_batch = max(1, max_batch)
        self._queue: list[tuple[Item, asyncio.Future[Result]]] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._publishing: set[asyncio.Task[None]] = set()
        self._closed = False
        self.batches = 0  # committed batches (tests and benchmarks read it)
        self.appended = 0

    # -- what a subclass provides ----------------------------------------------------------------
    async def write(self, tx: Executor, items: Sequence[Item], now: int) -> list[Result]:
        """Write ``items`` inside ``tx``; one result per item, in order."""
        raise NotImplementedError

    async def committed(self, items: Sequence[Item], results: Sequence[Result], now: int) -> None:
        """After the commit (in a task of its own, after the callers heard): wake-ups."""

    def retryable(self, exc: Exception) -> bool:
        return "Deadlock" in str(exc)

    # -- the machinery -------------------------------------------------------------------------------
    async def submit(self, items: Sequence[Item]) -> list[Result]:
        """Commit ``items`` (results in order); they may share a batch with others.
        Raises ``BackendUnavailable``/``StoreError``."""
        if self._closed:
            raise BackendUnavailable(f"the {self.name} is closed")
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Result]] = [loop.create_future() for _ in items]
        self._queue.extend(zip(items, futures, strict=True))
        self._ensure_running()
        assert self._wakeup is not None
        self._wakeup.set()
        # shield: a caller that gives up must not cancel the batch others are waiting on; its
        # item may still commit (like any request whose client hung up after sending it).
        if len(futures) == 1:  # the usual case: no gathering future around the one result
            return [await asyncio.shield(futures[0])]
        return list(await asyncio.shield(asyncio.gather(*futures)))

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

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

    async def _commit(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        items = [item for item, _ in batch]
        now = now_ms()
        results: list[Result] | None = None
        error: Exception | None = None
        for attempt in range(_RETRIES):
            try:
                async with self._db.transaction() as tx:
                    results = await self.write(tx, items, now)
                break
            except Exception as exc:  # noqa: BLE001 - every caller of the batch must hear of it
                error = exc
                if not self.retryable(exc) or attempt == _RETRIES - 1:
                    break
        if results is None:
            log.warning("%s: batch of %d not committed: %s", self.name, len(batch), error)
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
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
        task = asyncio.get_running_loop().create_task(self.committed(items, results, now))
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def close(self) -> None:
        """Commit what is queued, run its wake-ups, stop."""
        self._closed = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
        if self._publishing:
            await asyncio.gather(*self._publishing, return_exceptions=True)
