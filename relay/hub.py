"""The hub: which local sockets listen on which channel, and the broadcast that feeds them.

Channels are spread over shards by a stable hash (centrifuge's hub.go): one hot book never walks
unrelated sockets, dict resizes stay small, and the layout maps onto several worker processes.

A broadcast is decoded once per node and encoded once per wire format actually used by the
channel's members; the same frame bytes go to every member's transport, bypassing the websockets
protocol object: server frames are unmasked and no extension is negotiated (asserted at subscribe),
so one prebuilt frame is valid for everyone (STYLE.md 8). Nothing awaits per recipient: a member whose
write buffer passes the outbound bound is closed with 4008 (slow consumer) and never slows the
others (realtime.md guarantee 3).

Coalescing per channel per loop tick (measured: bench/micro/README.md). A broadcast appends one
entry to its channel's batch: O(1), whatever the member count. At the tick's flush each channel's
entries are encoded once per codec and joined once per codec, and the SAME joined bytes go to every
member in one ``transport.write``: O(members) per tick, not O(members x messages). Members that
need other bytes take the slow path (``_pending_frames``): the excluded device's sockets (the
sender of a book op), a socket with frames of its own queued (acks, replies: ``queue_own``), a
socket already served part of the tick (``_marks``), a socket in several channels with pending
batches (merged in broadcast order). Per-socket order is broadcast order, and a connection's own
frames keep their place: ``queue_own`` first moves the broadcasts already owed to that socket into
its outbox, and ``flush_member`` (called before the connection writes protocol data such as a
close frame) writes everything owed first. Bounds: a channel with ``COALESCE_MAX_FRAMES`` pending
entries is flushed at once, as is an outbox of that size. A subscribe or unsubscribe flushes the
channel's batch first, so a batch always goes to the members it was broadcast to.

Broker envelope: ``msgpack([message, exclude_device, seq])``. A sequenced publish sends the array
header and the first two items; the broker appends ``seq`` (one MessagePack integer) atomically
with its counter, so every node sees a channel's messages in seq order (shared/broker/base.py).

Broker subscriptions follow local membership: subscribe on the first local member (``subscribe``
returns once the broker confirmed it), unsubscribe when the last leaves. One reconciling task per
channel at a time issues those calls, so a leave racing a join can never end unsubscribed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import zlib
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

import msgpack
from websockets.protocol import OPEN

from relay.protocol import json_default
from shared.broker import Broker
from shared.broker.envelope import pack_envelope, unpack_envelope

if TYPE_CHECKING:
    from relay.connection import WsConnection

log = logging.getLogger("switchboard.hub")

Message = dict[str, Any]
Route = Callable[[str, Collection["WsConnection"], bytes], None]


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
    text = json.dumps(message, separators=(",", ":"), ensure_ascii=False, default=json_default)
    return frame_bytes(text.encode(), binary=False)


# Broadcasts one channel (or frames one socket) may queue within one tick before they are written.
COALESCE_MAX_FRAMES = 64
DEFAULT_OUTBOUND_LIMIT = 1 << 20  # WS_OUTBOUND_LIMIT_BYTES' default


class _Entry:
    """One broadcast waiting for the tick's flush; its frames are encoded on first use."""

    __slots__ = ("index", "message", "exclude", "text", "binary")

    def __init__(self, index: int, message: Message, exclude: str | None) -> None:
        self.index = index  # hub-wide broadcast order
        self.message = message
        self.exclude = exclude
        self.text: bytes | None = None
        self.binary: bytes | None = None

    def frame(self, binary: bool) -> bytes:
        if binary:
            if self.binary is None:
                self.binary = encode_frame(self.message, binary=True)
            return self.binary
        if self.text is None:
            self.text = encode_frame(self.message, binary=False)
        return self.text


class _Batch:
    """A channel's broadcasts of this tick, in order, with the channel's (live) member dict."""

    __slots__ = ("members", "entries", "excludes")

    def __init__(self, members: dict[WsConnection, None]) -> None:
        self.members = members
        self.entries: list[_Entry] = []
        self.excludes: set[str] | None = None  # devices some entry skips


def _joined(entries: list[_Entry], binary: bool) -> bytes:
    if len(entries) == 1:
        return entries[0].frame(binary)  # the very frame bytes, shared by every member
    return b"".join([entry.frame(binary) for entry in entries])


def _entry_index(entry: _Entry) -> int:
    return entry.index


class Hub:
    __slots__ = (
        "broker",
        "_shards",
        "_channels_of",
        "_asked",
        "_confirmed",
        "_syncing",
        "_closed",
        "_batches",
        "_index",
        "_marks",
        "_dirty",
        "_flush_scheduled",
        "outbound_limit",
        "routes",
        "listeners",
    )

    def __init__(
        self, broker: Broker, *, shards: int = 64, outbound_limit: int = DEFAULT_OUTBOUND_LIMIT
    ) -> None:
        self.broker = broker
        # channel -> members; a dict keeps insertion order and O(1) removal.
        self._shards: list[dict[str, dict[WsConnection, None]]] = [{} for _ in range(shards)]
        # A socket's channels: the name alone for the usual one channel (a set costs ~200 bytes
        # per socket), a set of two or more otherwise.
        self._channels_of: dict[WsConnection, str | set[str]] = {}
        self._asked: set[str] = (
            set()
        )  # channels the broker was asked to subscribe (and not since dropped)
        self._confirmed: set[str] = set()  # ... of which the broker confirmed the subscription
        self._syncing: dict[str, asyncio.Task[None]] = {}  # channel -> its reconciling task
        self._closed = False
        self._batches: dict[str, _Batch] = {}  # channels with broadcasts waiting for the flush
        self._index = 0  # broadcasts so far (orders entries across channels)
        self._marks: dict[WsConnection, int] = {}  # served this tick up to this entry index
        self._dirty: list[WsConnection] = []  # sockets with own frames in their outbox
        self._flush_scheduled = False
        # A socket whose write buffer passes this is a slow consumer (4008): WS_OUTBOUND_LIMIT_BYTES.
        self.outbound_limit = outbound_limit
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
        elif channel in self._batches:  # broadcast before the join: not for the joiner
            self._flush_channel(channel, self._batches[channel])
        members[conn] = None
        current = self._channels_of.get(conn)
        if current is None:
            self._channels_of[conn] = channel
        elif isinstance(current, str):
            if current != channel:
                self._channels_of[conn] = {current, channel}
        else:
            current.add(channel)
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
        if channel in self._batches:  # broadcast while a member: still for the leaver
            self._flush_channel(channel, self._batches[channel])
        del members[conn]
        current = self._channels_of.get(conn)
        if isinstance(current, str):
            if current == channel:
                del self._channels_of[conn]
        elif current is not None:
            current.discard(channel)
            if len(current) == 1:
                self._channels_of[conn] = next(iter(current))
        if not members:
            del shard[channel]
            if not self._closed:
                _ = self._sync(channel)  # runs in the background

    def unsubscribe_all(self, conn: WsConnection) -> None:
        for channel in self._channels(conn):
            self.unsubscribe(conn, channel)

    def _channels(self, conn: WsConnection) -> list[str]:
        current = self._channels_of.get(conn)
        if current is None:
            return []
        return [current] if isinstance(current, str) else list(current)

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
        self._queue(channel, members, message, exclude)

    def broadcast(self, channel: str, message: Message, exclude: str | None = None) -> None:
        """Queue ``message`` for this node's members of ``channel`` (skipping ``exclude``'s sockets).

        Synchronous, no await, no task and no work per recipient (STYLE.md 7): one entry in the
        channel's batch, written at the tick's flush (``_flush``).
        """
        members = self._shard(channel).get(channel)
        if members:
            self._queue(channel, members, message, exclude)

    def broadcast_to(
        self,
        channel: str,
        members: dict[WsConnection, None],
        message: Message,
        exclude: str | None = None,
    ) -> None:
        """``broadcast`` to some of the channel's members only (the book relay holds back the
        sockets still catching up). ``members`` must be a subset of the channel's.

        A tick's batch holds one member dict, so the channel's pending batch is written first and
        this one at once: no coalescing for the channel while a subset is in use (rare, short).
        """
        if not members:
            return
        pending = self._batches.get(channel)
        if pending is not None:
            self._flush_channel(channel, pending)
        self._queue(channel, members, message, exclude)
        batch = self._batches.get(channel)
        if batch is not None:
            self._flush_channel(channel, batch)

    def _queue(
        self, channel: str, members: dict[WsConnection, None], message: Message, exclude: str | None
    ) -> None:
        batch = self._batches.get(channel)
        if batch is None:
            batch = self._batches[channel] = _Batch(members)
        self._index += 1
        batch.entries.append(_Entry(self._index, message, exclude))
        if exclude is not None:
            if batch.excludes is None:
                batch.excludes = {exclude}
            else:
                batch.excludes.add(exclude)
        if len(batch.entries) >= COALESCE_MAX_FRAMES:  # a long burst within one tick: bound it
            self._flush_channel(channel, batch)
        self._schedule()

    def _schedule(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    # -- frames a connection sends itself ----------------------------------------------------------
    def queue_own(self, conn: WsConnection, frame: bytes) -> None:
        """Queue a frame of ``conn``'s own (an ack, a reply) behind what it is already owed; it is
        written at the tick's flush, with the socket's broadcast frames, in one write."""
        outbox = conn.outbox
        if not outbox:  # (listed twice after an early write below: harmless)
            self._dirty.append(conn)
        if self._batches:
            outbox.extend(self._pending_frames(conn))  # owed before this frame: keep their place
        outbox.append(frame)
        if len(outbox) >= COALESCE_MAX_FRAMES:
            conn.flush_outbox()
        self._schedule()

    def flush_member(self, conn: WsConnection, then: list[bytes] | None = None) -> None:
        """Write everything queued for ``conn`` now, followed by the frames ``then``: before it
        writes anything else itself (protocol data, the inbox's entries)."""
        outbox = conn.outbox
        if self._batches:
            frames = self._pending_frames(conn)
            if frames:
                outbox.extend(frames)
        if then:
            outbox.extend(then)
        if outbox:
            conn.flush_outbox()

    def _pending_frames(self, conn: WsConnection) -> list[bytes]:
        """The frames of pending broadcasts ``conn`` is owed and was not served yet, in broadcast
        order; marks it served up to now, so the channel flushes skip them."""
        current = self._channels_of.get(conn)
        if current is None:
            return []
        mark = self._marks.get(conn, 0)
        if mark == self._index:  # served up to the newest broadcast already
            return []
        if isinstance(current, str):  # the usual single channel: its newest entries only
            batch = self._batches.get(current)
            if batch is None:
                return []
            entries = batch.entries
            start = len(entries)
            while start and entries[start - 1].index > mark:
                start -= 1
            if start == len(entries):
                return []
            owed = entries[start:] if start else entries
        else:
            owed = []
            for channel in current:
                batch = self._batches.get(channel)
                if batch is not None:
                    owed += [entry for entry in batch.entries if entry.index > mark]
            if not owed:
                return []
            owed.sort(key=_entry_index)  # across channels: one socket sees broadcast order
        self._marks[conn] = self._index
        binary = conn.codec.binary
        device = conn.device_id
        return [
            entry.frame(binary)
            for entry in owed
            if entry.exclude is None or entry.exclude != device
        ]

    # -- the tick's flush ----------------------------------------------------------------------------
    def _flush(self) -> None:
        self._flush_scheduled = False
        batches = self._batches
        while batches:
            channel = next(iter(batches))
            self._flush_channel(channel, batches[channel])
        self._marks.clear()
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            if conn.outbox:
                conn.flush_outbox()

    def _flush_channel(self, channel: str, batch: _Batch) -> None:
        """Write the batch to every OPEN member: one shared join per codec, one write per socket."""
        entries = batch.entries
        excludes = batch.excludes
        marks = self._marks
        channels_of = self._channels_of if len(self._batches) > 1 else None
        limit = self.outbound_limit
        text: bytes | None = None
        binary: bytes | None = None
        slow: list[WsConnection] = []
        # A copy: nothing below calls back into membership, but a member list must not change
        # size under the loop whatever a transport does.
        for conn in tuple(batch.members):
            if conn.protocol.state is not OPEN:
                continue
            if (
                conn.outbox
                or (marks and conn in marks)
                or (excludes is not None and conn.device_id in excludes)
                or (channels_of is not None and not isinstance(channels_of[conn], str))
            ):
                frames = self._pending_frames(conn)  # reads this batch too: delete it after
                if conn.outbox:
                    frames = [*conn.outbox, *frames]
                    conn.outbox.clear()
                if not frames:
                    continue
                data = frames[0] if len(frames) == 1 else b"".join(frames)
            elif conn.codec.binary:
                if binary is None:
                    binary = _joined(entries, True)
                data = binary
            else:
                if text is None:
                    text = _joined(entries, False)
                data = text
            transport = conn.transport
            if transport.is_closing():  # aborted, connection_lost not run yet
                continue
            transport.write(data)
            if transport.get_write_buffer_size() > limit:
                slow.append(conn)
        self._batches.pop(channel, None)
        for conn in slow:  # closing writes a close frame and may flush: after the batch is gone
            conn.slow_consumer()

    async def close(self) -> None:
        """Stop reconciling (the broker itself is closed with the services)."""
        self._closed = True
        tasks = list(self._syncing.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._batches.clear()
        self._marks.clear()
        for shard in self._shards:
            shard.clear()
        self._channels_of.clear()


__all__ = ["Hub", "encode_frame", "frame_bytes", "pack_envelope", "unpack_envelope"]
