"""The book relay's live path (realtime.md "Book relay: ``/ws/relay/{book_id}``").

A member device's socket is subscribed to the hub channel ``book:{book_id}`` before its first
frame (``presence``, then ``synced``), so nothing published after that frame can be missed. Each
``crdt_operation`` is published once through the hub with a per-book sequence
(``Hub.publish(..., sequence_key="bookseq:{<book_id>}")``, braces included: a Redis Cluster hash tag): the broker assigns the seq atomically
with the publish, so every node relays a book's ops in seq order. The sender gets
``{"type": "ack", "id", "seq"}``; the other members get the op with ``device_id`` (from the
credential, never from the frame), ``relay_timestamp`` and ``seq``. The payload is never decoded
beyond checking its base64 (msgpack peers send and receive raw bytes).

Per-sender order: a socket's ops are published one after the other by one worker task (the
broker may spread concurrent publishes over several connections, which could reorder them);
at most ``WS_BURST`` ops may wait behind it, beyond that an op is refused with an error frame.

Op ids: a re-sent op (same device, same ``id``) within 24 h is acknowledged with its original seq
and not relayed again. The map is in memory on each node and bounded (``DEDUPE_MAX_ENTRIES``);
durable dedupe across nodes and restarts comes with retention (a later issue), as do catch-up
(``?since``), snapshots and pairing.

Presence here is local to the node (the hub's local members): ``presence`` lists the devices
connected to this book *on this node*, and ``device.online`` / ``device.offline`` go out when a
device's first / last socket on the book on this node comes / goes. Cross-node presence (with
its TTLs and the 10 s offline grace of realtime.md guarantee 5) is a later issue.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Coroutine, Generator
from typing import TYPE_CHECKING, Any

from relay.protocol import Message, error_frame, request_id_of
from shared.broker.memory import MemoryBroker
from shared.codes import CloseCode, ErrorCode
from shared.errors import BackendUnavailable

if TYPE_CHECKING:
    from relay.connection import WsConnection
    from relay.state import RelayState

log = logging.getLogger("switchboard.relay")

EXTRAS_KEY = "relay.books"
OP_TYPE = "crdt_operation"
DEDUPE_TTL_S = 24 * 3600  # realtime.md: "a re-sent op from the same device within 24 hours"
DEDUPE_MAX_ENTRIES = 200_000  # about 40 MB at worst; the oldest entries go first
MAX_OP_ID = 128


def channel_of(book_id: str) -> str:
    # The braces are a Redis Cluster hash tag: the channel and its seq counter share one slot,
    # so the sequenced publish (one script: INCR + SPUBLISH) can run there (shared/broker/redis.py).
    return f"book:{{{book_id}}}"


def sequence_key_of(book_id: str) -> str:
    return f"bookseq:{{{book_id}}}"


def op_error(code: ErrorCode, message: str, op_id: Any) -> Message:
    """realtime.md's op error: ``{type: error, id, code, message}`` (``request_id`` kept for /ws parity)."""
    frame = error_frame(code, message)
    frame["id"] = op_id
    return frame


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


class OpDedupe:
    """``(book_id, device_id, op_id) -> seq`` for 24 h, bounded, oldest first out.

    An entry holds a future while its op is being published, so the same op arriving twice at
    once (two sockets of one device) is published once and both get the same seq.
    """

    __slots__ = ("_entries", "_max", "_ttl")

    def __init__(self, max_entries: int = DEDUPE_MAX_ENTRIES, ttl_s: float = DEDUPE_TTL_S) -> None:
        self._entries: OrderedDict[tuple[str, str, str], tuple[float, asyncio.Future[int]]] = (
            OrderedDict()
        )
        self._max = max_entries
        self._ttl = ttl_s

    def claim(self, key: tuple[str, str, str]) -> tuple[asyncio.Future[int], bool]:
        """The future of ``key``'s seq, and whether the caller must publish (first sighting)."""
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
        """The op was not accepted (broker down): a re-send must publish it."""
        self._entries.pop(key, None)

    def _expire(self, now: float) -> None:
        entries = self._entries
        while entries:
            key, (stamp, future) = next(iter(entries.items()))
            if now - stamp < self._ttl or not future.done():
                return
            del entries[key]


def run_eagerly(state: RelayState, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """Run ``coro`` right now up to its first real suspension; a task only if it suspends.

    With the in-process broker an op's publish never suspends, so a burst of ops is relayed within
    the ``data_received`` that brought it, without a task per burst (BENCHMARKS.md: task creation
    was ~5 % of test C). Only for that broker (``BookRelay._eager``): the first step runs outside
    any task, and code such as ``asyncio.timeout`` (the Redis client) needs one. If it does
    suspend (a dedupe wait), the rest runs in a task (``state.spawn``) as before.
    """
    try:
        first = coro.send(None)
    except StopIteration:
        return None
    except BaseException:
        coro.close()
        raise
    return state.spawn(_resume(coro, first))


class _Resumed:
    """``await`` continuing a coroutine that already yielded ``first`` (what a Task would do)."""

    __slots__ = ("coro", "first")

    def __init__(self, coro: Coroutine[Any, Any, None], first: Any) -> None:
        self.coro = coro
        self.first = first

    def __await__(self) -> Generator[Any, None, None]:
        coro, pending = self.coro, self.first
        while True:
            try:
                yield pending  # our task waits on the coroutine's future, then resumes us
            except BaseException as exc:  # cancellation: into the coroutine, as a task would
                try:
                    pending = coro.throw(exc)
                except StopIteration:
                    return
                continue
            try:
                pending = coro.send(None)
            except StopIteration:
                return


async def _resume(coro: Coroutine[Any, Any, None], first: Any) -> None:
    await _Resumed(coro, first)


_STARTING: Any = object()


class _Socket:
    """What the relay keeps per open book socket: its book and its queue of ops to publish."""

    __slots__ = ("book_id", "queue", "worker")

    def __init__(self, book_id: str) -> None:
        self.book_id = book_id
        # Made on the first op and dropped when drained: an empty deque is ~600 bytes, and most
        # sockets are idle most of the time (bench/micro/README.md, memory per socket).
        self.queue: deque[tuple[Any, bytes, int]] | None = None
        self.worker: asyncio.Task[None] | None = None


class BookRelay:
    """The relay sockets of one server (``RelayState``); created by ``for_state``."""

    def __init__(self, state: RelayState) -> None:
        self.state = state
        self.sockets: dict[WsConnection, _Socket] = {}
        self.local_devices: dict[tuple[str, str], int] = {}  # (book, device) -> open sockets here
        self.dedupe = OpDedupe()
        # The in-process broker delivers within publish(): ops are relayed without a task.
        self._eager = type(state.services.broker) is MemoryBroker
        state.handlers[OP_TYPE] = self.on_operation
        state.on_close.append(self.on_close)

    # -- socket lifecycle --------------------------------------------------------------------------
    async def opened(self, conn: WsConnection, book_id: str) -> None:
        """Right after the 101 (reading still paused): subscribe, ``presence``, then ``synced``.

        ``presence`` goes out in the same loop step as the subscription completes, so it is the
        first frame: live ops published from then on follow it. ``synced`` reports the head read
        after subscribing, so an op published while that read is in flight may arrive between
        ``presence`` and ``synced`` with a seq at or below the head; clients dedupe by seq.
        """
        hub = self.state.hub
        channel = channel_of(book_id)
        device_id = conn.device_id
        assert device_id is not None  # a device principal always names its device
        try:
            await hub.subscribe(conn, channel)
        except BackendUnavailable:
            self._refuse_late(conn, channel)
            return
        if not conn.open:  # closed while subscribing: on_close ran before we registered it
            hub.unsubscribe(conn, channel)
            return
        self.sockets[conn] = _Socket(book_id)
        online = sorted({c.device_id for c in hub.local_members(channel) if c.open and c.device_id})
        conn.send({"type": "presence", "online": online})
        key = (book_id, device_id)
        count = self.local_devices.get(key, 0)
        self.local_devices[key] = count + 1
        if count == 0:
            self._announce(book_id, device_id, "device.online")
        try:
            head = await self._head(book_id)
        except BackendUnavailable:
            self._refuse_late(conn, channel)
            return
        conn.send({"type": "synced", "seq": head})  # no ?since yet: catch-up is a later issue

    def _refuse_late(self, conn: WsConnection, channel: str) -> None:
        """The broker failed after the 101: close 1013 (try again later, maybe on another node)."""
        log.warning("relay socket closed: the broker is unavailable")
        if conn not in self.sockets:
            self.state.hub.unsubscribe(conn, channel)
        conn.fail(CloseCode.OVERLOADED)

    def on_close(self, conn: WsConnection) -> None:
        socket = self.sockets.pop(conn, None)
        if socket is None:
            return
        if socket.worker is not None and socket.worker is not _STARTING:
            socket.worker.cancel()  # unacknowledged ops are the client's to re-send
        self.state.hub.unsubscribe(conn, channel_of(socket.book_id))
        device_id = conn.device_id
        assert device_id is not None
        key = (socket.book_id, device_id)
        count = self.local_devices.get(key, 0) - 1
        if count > 0:
            self.local_devices[key] = count
            return
        self.local_devices.pop(key, None)
        self._announce(socket.book_id, device_id, "device.offline")

    def _announce(self, book_id: str, device_id: str, kind: str) -> None:
        message = {"type": kind, "device_id": device_id}
        _ = self.state.spawn(self._publish_quietly(book_id, message, device_id))

    async def _publish_quietly(self, book_id: str, message: Message, device_id: str) -> None:
        try:
            await self.state.hub.publish(channel_of(book_id), message, exclude_device=device_id)
        except BackendUnavailable:
            log.warning("presence change not published: the broker is unavailable")

    async def _head(self, book_id: str) -> int:
        """The book's current seq (the broker's counter): what ``synced`` reports."""
        head: int = await self.state.hub.sequence_head(sequence_key_of(book_id))
        return head

    # -- ops -------------------------------------------------------------------------------------
    def on_operation(self, conn: WsConnection, message: Message) -> None:
        socket = self.sockets.get(conn)
        if socket is None:  # a /ws socket: the same answer as any type /ws does not know
            conn.send(
                error_frame(
                    ErrorCode.VALIDATION_ERROR, f"unknown type {OP_TYPE!r}", request_id_of(message)
                )
            )
            return None
        op_id = message.get("id")
        if op_id is not None and (not isinstance(op_id, str) or not 0 < len(op_id) <= MAX_OP_ID):
            conn.send(
                op_error(
                    ErrorCode.VALIDATION_ERROR,
                    f"'id' must be a string of 1..{MAX_OP_ID} characters",
                    None,
                )
            )
            return None
        payload = decode_payload(message.get("payload"))
        if not payload:
            conn.send(
                op_error(
                    ErrorCode.VALIDATION_ERROR, "'payload' must be non-empty standard base64", op_id
                )
            )
            return None
        timestamp = message.get("timestamp")
        if isinstance(timestamp, bool) or not isinstance(timestamp, int) or timestamp < 0:
            conn.send(
                op_error(
                    ErrorCode.VALIDATION_ERROR, "'timestamp' must be unix seconds (integer)", op_id
                )
            )
            return None
        queue = socket.queue
        if queue is None:
            queue = socket.queue = deque()
        elif len(queue) >= self.state.settings.ws_burst:
            conn.send(
                op_error(ErrorCode.RATE_LIMIT_EXCEEDED, "too many ops waiting; slow down", op_id)
            )
            return None
        queue.append((op_id, payload, timestamp))
        if socket.worker is None:
            if self._eager:
                socket.worker = _STARTING  # (nothing re-enters while it runs; belt and braces)
                socket.worker = run_eagerly(self.state, self._drain(conn, socket))
            else:
                socket.worker = self.state.spawn(self._drain(conn, socket))
        return None

    async def _drain(self, conn: WsConnection, socket: _Socket) -> None:
        """Publish the socket's ops in arrival order (per-sender order across nodes)."""
        queue = socket.queue
        assert queue is not None
        try:
            while queue and conn.open:
                op_id, payload, timestamp = queue.popleft()
                await self._relay(conn, socket.book_id, op_id, payload, timestamp)
        finally:
            socket.worker = None
            if not queue and socket.queue is queue:
                socket.queue = None

    async def _relay(
        self, conn: WsConnection, book_id: str, op_id: Any, payload: bytes, timestamp: int
    ) -> None:
        if op_id is None:  # "without one, every frame is a new op"
            seq = await self._publish(conn, book_id, op_id, payload, timestamp)
        else:
            seq = await self._publish_once(conn, book_id, op_id, payload, timestamp)
        if seq is not None:
            conn.send({"type": "ack", "id": op_id, "seq": seq})

    async def _publish_once(
        self, conn: WsConnection, book_id: str, op_id: str, payload: bytes, timestamp: int
    ) -> int | None:
        """Publish unless this device already sent ``op_id`` to this book: then its first seq."""
        assert conn.device_id is not None
        key = (book_id, conn.device_id, op_id)
        future, first = self.dedupe.claim(key)
        if not first:
            try:
                return await asyncio.shield(future)
            except asyncio.CancelledError:
                if not future.cancelled():
                    raise  # this task was cancelled, not the first attempt
                conn.send(
                    op_error(ErrorCode.SERVICE_UNAVAILABLE, "op not accepted; re-send it", op_id)
                )
                return None
        seq: int | None = None
        try:
            seq = await self._publish(conn, book_id, op_id, payload, timestamp)
        finally:  # also when the socket closed mid-publish: never leave a re-send waiting
            if seq is None:
                self.dedupe.forget(key)
                future.cancel()
            else:
                future.set_result(seq)
        return seq

    async def _publish(
        self, conn: WsConnection, book_id: str, op_id: Any, payload: bytes, timestamp: int
    ) -> int | None:
        """The op's seq, or None after telling the sender it was not accepted."""
        device_id = conn.device_id
        op = {
            "type": OP_TYPE,
            "payload": payload,
            "timestamp": timestamp,
            "device_id": device_id,
            "relay_timestamp": int(time.time()),
        }
        try:
            seq = await self.state.hub.publish(
                channel_of(book_id),
                op,
                exclude_device=device_id,
                sequence_key=sequence_key_of(book_id),
            )
        except BackendUnavailable:
            conn.send(
                op_error(ErrorCode.SERVICE_UNAVAILABLE, "broker unavailable; re-send the op", op_id)
            )
            return None
        assert seq is not None  # a sequenced publish always returns its seq
        return int(seq)


def for_state(state: RelayState) -> BookRelay:
    """The server's ``BookRelay``, created (and its handlers installed) on first use."""
    extras = state.services.extras
    relay = extras.get(EXTRAS_KEY)
    if not isinstance(relay, BookRelay) or relay.state is not state:
        relay = BookRelay(state)
        extras[EXTRAS_KEY] = relay
    return relay
