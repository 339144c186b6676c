"""Accepting a book op: one path for the relay socket and ``POST /api/v1/relay/send``.

``BookOps.submit`` validates nothing (the callers did) and returns the op's seq once it is
accepted: with retention on (``BOOK_RETENTION``), once it is committed to the book's history
(``BookWriter``); with ``BOOK_RETENTION=0``, once the broker numbered and published it (one
script: INCR + PUBLISH, so every node relays a book's ops in seq order), which is all the
PRD's pure relay promises ("relayed to the devices connected now").

Op ids: a re-sent op (same device, same ``id``) within 24 h is acknowledged with its original seq
and not relayed again. Within one node ``OpDedupe`` answers at once and makes concurrent copies
(two sockets of one device) wait for the first; across nodes and restarts the retained history
answers (``history.append_batch``). With retention off only the in-memory map exists.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, TypeGuard

from shared.books import history
from shared.books.history import NewOp, op_frame
from shared.books.retention import Retention
from shared.books.writer import BookWriter, channel_of, sequence_key_of
from shared.broker.envelope import pack_envelope

if TYPE_CHECKING:
    from shared.services import Services

EXTRAS_KEY = "books.ops"
DEDUPE_TTL_S = 24 * 3600  # realtime.md: "a re-sent op from the same device within 24 hours"
DEDUPE_MAX_ENTRIES = 200_000  # about 40 MB at worst; the oldest entries go first
MAX_OP_ID = 128


def decode_payload(value: Any) -> bytes | None:
    """The op's ciphertext: raw bytes (msgpack) or standard base64 (JSON); None when invalid."""
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


def valid_op_id(value: Any) -> bool:
    return value is None or (isinstance(value, str) and 0 < len(value) <= MAX_OP_ID)


def valid_timestamp(value: Any) -> TypeGuard[int]:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 0


class OpDedupe:
    """``(book_id, device_id, op_id) -> seq`` for 24 h, bounded, oldest first out.

    An entry holds a future while its op is being accepted, so the same op arriving twice at
    once (two sockets of one device) is accepted once and both get the same seq.
    """

    __slots__ = ("_entries", "_max", "_ttl")

    def __init__(self, max_entries: int = DEDUPE_MAX_ENTRIES, ttl_s: float = DEDUPE_TTL_S) -> None:
        self._entries: OrderedDict[tuple[str, str, str], tuple[float, asyncio.Future[int]]] = (
            OrderedDict()
        )
        self._max = max_entries
        self._ttl = ttl_s

    def claim(self, key: tuple[str, str, str]) -> tuple[asyncio.Future[int], bool]:
        """The future of ``key``'s seq, and whether the caller must accept it (first sighting)."""
        now = time.monotonic()
        self._expire(now)
        found = self._entries.get(key)
        if found is not None:
            return found[1], False
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._entries[key] = (now, future)
        while len(self._entries) > self._max:
            _, (_, old) = self._entries.popitem(last=False)
            if not old.done():
                old.cancel()
        return future, True

    def forget(self, key: tuple[str, str, str]) -> None:
        """The op was not accepted (store or broker down): a re-send must try again."""
        self._entries.pop(key, None)

    def _expire(self, now: float) -> None:
        entries = self._entries
        while entries:
            key, (stamp, future) = next(iter(entries.items()))
            if now - stamp < self._ttl or not future.done():
                return
            del entries[key]


class NotAccepted(Exception):
    """A concurrent copy of this op failed: the sender must re-send it."""


class BookOps:
    def __init__(self, services: Services) -> None:
        self._services = services
        self.retention = Retention.parse(services.settings.book_retention)
        self.dedupe = OpDedupe()
        self.writer: BookWriter | None = None
        if self.retention.enabled:
            self.writer = BookWriter(services.db, services.broker, self.retention)
            services.closers.append(self.writer.close)

    @property
    def retained(self) -> bool:
        return self.writer is not None

    async def submit(
        self, book_id: str, device_id: str, op_id: str | None, payload: bytes, client_ts: int
    ) -> int:
        """The op's seq. Raises ``BackendUnavailable``/``StoreError`` (not accepted: re-send),
        or ``NotAccepted`` when a concurrent copy failed."""
        if op_id is None:  # "without one, every frame is a new op"
            return await self._accept(book_id, device_id, None, payload, client_ts)
        key = (book_id, device_id, op_id)
        future, first = self.dedupe.claim(key)
        if not first:
            try:
                return await asyncio.shield(future)
            except asyncio.CancelledError:
                if not future.cancelled():
                    raise  # this task was cancelled, not the first attempt
                raise NotAccepted from None
        seq: int | None = None
        try:
            seq = await self._accept(book_id, device_id, op_id, payload, client_ts)
        finally:  # also when the caller went away mid-accept: never leave a re-send waiting
            if seq is None:
                self.dedupe.forget(key)
                future.cancel()
            else:
                future.set_result(seq)
        return seq

    async def _accept(
        self, book_id: str, device_id: str, op_id: str | None, payload: bytes, client_ts: int
    ) -> int:
        relay_ts = int(time.time())
        if self.writer is not None:
            appended = await self.writer.append(
                NewOp(book_id, device_id, op_id, payload, client_ts, relay_ts)
            )
            return appended.seq
        frame = op_frame(0, device_id, payload, client_ts, relay_ts)
        del frame["seq"]  # the broker appends it to the envelope, the hub adds it to the frame
        body = pack_envelope(frame, device_id, sequenced=True)
        seq = await self._services.broker.publish_sequenced(
            sequence_key_of(book_id), channel_of(book_id), body
        )
        return int(seq)

    async def head(self, book_id: str) -> int:
        """The book's last seq: the store's with retention on, else the broker's counter."""
        if self.writer is not None:
            return await history.head(self._services.db, book_id)
        return int(await self._services.broker.sequence_head(sequence_key_of(book_id)))


def book_ops_for(services: Services) -> BookOps:
    """The process's ``BookOps`` (created on first use; its writer closes with the services)."""
    ops = services.extras.get(EXTRAS_KEY)
    if not isinstance(ops, BookOps):
        ops = BookOps(services)
        services.extras[EXTRAS_KEY] = ops
    return ops
