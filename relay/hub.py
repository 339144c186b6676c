"""The hub: which local sockets listen on which channel, and the broadcast that feeds them.

Channels are spread over shards by a stable hash (centrifuge's hub.go): one hot book never walks
unrelated sockets, dict resizes stay small, and the layout maps onto several worker processes.

A broadcast is decoded once per node and encoded once per wire format actually used by the
channel's members; the same frame bytes go to every member's transport, bypassing the websockets
protocol object: server frames are unmasked and no extension is negotiated (asserted at subscribe),
so one prebuilt frame is valid for everyone (STYLE.md 8). Frames are queued per socket and written
once per loop tick, several joined into one write (measured: bench/micro/README.md). Nothing
awaits per recipient: a member whose write buffer passes the outbound bound is closed with 4008
(slow consumer) and never slows the others (realtime.md guarantee 3).

Broker envelope: ``msgpack([message, exclude_device, seq])``. A sequenced publish sends the array
header and the first two items; the broker appends ``seq`` (one MessagePack integer) atomically
with its counter, so every node sees a channel's messages in seq order (shared/broker/base.py).

Broker subscriptions follow local membership: subscribe on the first local member (``subscribe``
returns once the broker confirmed it), unsubscribe when the last leaves. One reconciling task per
channel at a time issues those calls, so a leave racing a join can never end unsubscribed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import zlib
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

import msgpack
from msgpack import packb as _packb
from websockets.protocol import OPEN

from shared.broker import Broker

if TYPE_CHECKING:
    from relay.connection import WsConnection

log = logging.getLogger("switchboard.hub")

Message = dict[str, Any]
Route = Callable[[str, Collection["WsConnection"], bytes], None]


def _json_default(value: Any) -> Any:
    # bytes values (ciphertext payloads) travel as standard base64 in JSON, raw bytes in msgpack.
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"cannot encode {type(value).__name__}")


def frame_bytes(payload: bytes, *, binary: bool) -> bytes:
    """One complete unmasked server frame (FIN set), RFC 6455 section 5.2."""
    first = 0x82 if binary else 0x81
    n = len(payload)
    if n < 126:
        header = bytes((first, n))
    elif n < 65536:
        header = bytes((first, 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((first, 127)) + n.to_bytes(8, "big")
    return header + payload


def encode_frame(message: Message, *, binary: bool) -> bytes:
    if binary:
        packed: bytes = msgpack.packb(message, use_bin_type=True)
        return frame_bytes(packed, binary=True)
    text = json.dumps(message, separators=(",", ":"), ensure_ascii=False, default=_json_default)
    return frame_bytes(text.encode(), binary=False)


# Frames one socket may queue within one tick before they are written at once.
COALESCE_MAX_FRAMES = 64

_SEQUENCED_HEAD = b"\x93"  # MessagePack fixarray of 3: message, exclude_device, seq


def pack_envelope(message: Message, exclude_device: str | None, *, sequenced: bool) -> bytes:
    """The broker bytes; ``sequenced`` leaves the third item (seq) for the broker to append."""
    if sequenced:
        return b"".join(
            (_SEQUENCED_HEAD, _packb(message, use_bin_type=True), _packb(exclude_device))
        )
    return _packb([message, exclude_device, None], use_bin_type=True)  # type: ignore[no-any-return]


def unpack_envelope(data: bytes) -> tuple[Message, str | None, int | None]:
    message, exclude, seq = msgpack.unpackb(data, raw=False)
    return message, exclude, seq


class Hub:
    __slots__ = (
        "broker",
        "_shards",
        "_channels_of",
        "_asked",
        "_confirmed",
        "_syncing",
        "_closed",
        "_dirty",
        "_flush_scheduled",
        "routes",
        "listeners",
    )

    def __init__(self, broker: Broker, *, shards: int = 64) -> None:
        self.broker = broker
        # channel -> members; a dict keeps insertion order and O(1) removal.
        self._shards: list[dict[str, dict[WsConnection, None]]] = [{} for _ in range(shards)]
        self._channels_of: dict[WsConnection, set[str]] = {}  # for unsubscribe_all
        self._asked: set[str] = (
            set()
        )  # channels the broker was asked to subscribe (and not since dropped)
        self._confirmed: set[str] = set()  # ... of which the broker confirmed the subscription
        self._syncing: dict[str, asyncio.Task[None]] = {}  # channel -> its reconciling task
        self._closed = False
        self._dirty: list[WsConnection] = []  # members with frames in their outbox
        self._flush_scheduled = False
        # Channels whose messages are not hub envelopes: "kind:..." -> handler(channel, members,
        # data). The inbox (relay.inbox) decides per socket what to send, so it takes over there.
        self.routes: dict[str, Route] = {}
        # Node-wide channels (no members: revocation notices): exact name -> handler(data).
        self.listeners: dict[str, Callable[[bytes], None]] = {}

    async def start(self) -> None:
        await self.broker.start(self.on_broker_message)

    def _shard(self, channel: str) -> dict[str, dict[WsConnection, None]]:
        # crc32, not hash(): stable across processes (PYTHONHASHSEED), like centrifuge's index().
        return self._shards[zlib.crc32(channel.encode()) % len(self._shards)]

    # -- membership ---------------------------------------------------------------------------
    async def subscribe(self, conn: WsConnection, channel: str) -> None:
        """Add ``conn`` to ``channel``; returns once the broker confirmed the node's subscription,
        so nothing published afterwards is missed. Raises ``BackendUnavailable`` (the caller then
        unsubscribes ``conn``; the broker keeps the channel wanted until then)."""
        # Prebuilt frames skip the websockets protocol object: valid only without extensions.
        assert not conn.protocol.extensions, "hub broadcast needs connections without extensions"
        shard = self._shard(channel)
        members = shard.get(channel)
        if members is None:
            members = shard[channel] = {}
        members[conn] = None
        self._channels_of.setdefault(conn, set()).add(channel)
        if channel in self._confirmed and channel not in self._syncing:
            return
        # shield: a cancelled joiner must not cancel the subscription other joiners wait for.
        await asyncio.shield(self._sync(channel))

    def unsubscribe(self, conn: WsConnection, channel: str) -> None:
        """Remove ``conn`` (a no-op for a non-member); the broker unsubscribe runs in the background."""
        shard = self._shard(channel)
        members = shard.get(channel)
        if members is None or conn not in members:
            return
        del members[conn]
        channels = self._channels_of.get(conn)
        if channels is not None:
            channels.discard(channel)
            if not channels:
                del self._channels_of[conn]
        if not members:
            del shard[channel]
            if not self._closed:
                _ = self._sync(channel)  # runs in the background

    def unsubscribe_all(self, conn: WsConnection) -> None:
        for channel in list(self._channels_of.get(conn, ())):
            self.unsubscribe(conn, channel)

    def local_members(self, channel: str) -> Collection[WsConnection]:
        return self._shard(channel).get(channel, {}).keys()

    def _sync(self, channel: str) -> asyncio.Task[None]:
        """The channel's reconciling task (started when none runs)."""
        task = self._syncing.get(channel)
        if task is None:
            task = self._syncing[channel] = asyncio.ensure_future(self._reconcile(channel))
            task.add_done_callback(self._synced)
        return task

    async def _reconcile(self, channel: str) -> None:
        # Loops until the broker state matches the membership: joins and leaves that happen while
        # a broker call is in flight are picked up by the next round, in order.
        try:
            while True:
                wanted = channel in self._shard(channel)
                if wanted and channel not in self._confirmed:
                    self._asked.add(channel)
                    await self.broker.subscribe(channel)
                    self._confirmed.add(channel)
                elif not wanted and channel in self._asked:
                    self._asked.discard(channel)
                    self._confirmed.discard(channel)
                    await self.broker.unsubscribe(channel)
                else:
                    return
        finally:
            del self._syncing[channel]

    def _synced(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()  # retrieved here too: a leave-only task has nobody awaiting it
        if exc is not None:
            log.warning("broker (un)subscribe failed: %s", exc)

    # -- fan-out --------------------------------------------------------------------------------
    async def publish(
        self,
        channel: str,
        message: Message,
        *,
        exclude_device: str | None = None,
        sequence_key: str | None = None,
    ) -> int | None:
        """Send ``message`` to every member of ``channel`` on every node (skipping the sockets of
        ``exclude_device``). With ``sequence_key`` the broker numbers it atomically with the
        publish, every node adds ``seq`` to the message, and the seq is returned."""
        if sequence_key is None:
            await self.broker.publish(
                channel, pack_envelope(message, exclude_device, sequenced=False)
            )
            return None
        body = pack_envelope(message, exclude_device, sequenced=True)
        return await self.broker.publish_sequenced(sequence_key, channel, body)

    async def sequence_head(self, sequence_key: str) -> int:
        """The last seq ``publish`` took from ``sequence_key`` (0 before the first)."""
        return await self.broker.sequence_head(sequence_key)

    async def listen(self, channel: str, handler: Callable[[bytes], None]) -> None:
        """Receive every message of ``channel`` on this node for as long as the hub runs."""
        self.listeners[channel] = handler
        await self.broker.subscribe(channel)

    def on_broker_message(self, channel: str, data: bytes) -> None:
        listener = self.listeners.get(channel)
        if listener is not None:
            listener(data)
            return
        members = self._shard(channel).get(channel)
        if not members:
            return
        route = self.routes.get(channel.partition(":")[0])
        if route is not None:
            route(channel, members.keys(), data)
            return
        try:
            message, exclude, seq = unpack_envelope(data)
        except (ValueError, TypeError, msgpack.UnpackException):
            log.error("dropped a malformed broker message on %r", channel)
            return
        if seq is not None:
            message["seq"] = seq
        self.broadcast(members, message, exclude)

    def broadcast(
        self, members: Collection[WsConnection], message: Message, exclude: str | None = None
    ) -> None:
        """Queue ``message`` for every OPEN member, encoding it at most once per wire format.

        Synchronous, no await, no task per recipient (STYLE.md 7). Frames are appended to each
        member's outbox and written once per socket per loop tick (``_flush``): a burst of
        broadcasts costs one send() per socket instead of one per frame (bench/micro/README.md).
        The outbound bound (4008) is checked after each write.
        """
        text_frame: bytes | None = None
        binary_frame: bytes | None = None
        dirty = self._dirty
        for conn in members:
            if conn.protocol.state is not OPEN or (
                exclude is not None and conn.device_id == exclude
            ):
                continue
            if conn.codec.binary:
                if binary_frame is None:
                    binary_frame = encode_frame(message, binary=True)
                frame = binary_frame
            else:
                if text_frame is None:
                    text_frame = encode_frame(message, binary=False)
                frame = text_frame
            outbox = conn.outbox
            if not outbox:  # (after an early flush below it may be listed twice: harmless)
                dirty.append(conn)
            outbox.append(frame)
            if len(outbox) >= COALESCE_MAX_FRAMES:  # a long burst within one tick: bound the queue
                conn.flush_outbox()
        if dirty and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            conn.flush_outbox()  # may close it (4008): membership edits happen after this loop

    async def close(self) -> None:
        """Stop reconciling (the broker itself is closed with the services)."""
        self._closed = True
        tasks = list(self._syncing.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for shard in self._shards:
            shard.clear()
        self._channels_of.clear()


__all__ = ["Hub", "encode_frame", "frame_bytes", "pack_envelope", "unpack_envelope"]
