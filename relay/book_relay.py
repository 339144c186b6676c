"""The book relay (realtime.md "Book relay: ``/ws/relay/{book_id}``").

A member device's socket joins the hub channel ``book:{<book_id>}``. Each ``crdt_operation`` is
accepted by ``shared.books.ops.BookOps`` (the same path as ``POST /relay/send``): with retention
on it is committed to the book's history, which gives it its seq, and then published; with
``BOOK_RETENTION=0`` the broker numbers and publishes it in one step. The sender gets
``{"type": "ack", "id", "seq"}`` after that; the other members get the op with ``device_id``
(from the credential, never from the frame), ``relay_timestamp`` and ``seq``. The payload is
never decoded beyond checking its base64 (msgpack peers send and receive raw bytes).

**Order with retention on.** Seqs come from the store, and two nodes may publish seq 6 before
seq 5. Each node keeps a ``_Feed`` per book it has sockets for: the last seq it delivered, the
ops that arrived early, and a gap read. An op above ``delivered + 1`` waits while the gap is read
from the store (an op is committed before it is published, and a book's commits are serialised,
so whatever the store does not hold by then was pruned or never existed). A periodic poll does
the same when no later op arrives to reveal a lost publish (a Redis restart, a node killed
between its commit and its publish).

**Catch-up.** Every new socket starts *held*: live ops for it are kept aside (``pending``) while
it is set up. It then gets ``presence``; with ``?since=S`` the retained ops after S, read from
the store page by page (paced by its write buffer), then ``synced`` with the head; or ``reset``
(with ``snapshot_seq`` when a snapshot exists) then ``synced`` when S is older than what is
retained, or ahead of the head; without ``since``, ``synced`` at once. The held live ops follow (those the replay
already covered are dropped) and the socket goes live. Replay and live delivery never
interleave, so a device sees the book in seq order.

Per-sender order: a socket's ops are accepted one after the other by one worker task (the broker
may spread concurrent publishes over several connections, which could reorder them); at most
``WS_BURST`` ops may wait behind it, beyond that an op is refused with an error frame.

Presence spans the nodes (relay/book_presence.py): ``presence`` lists the book's devices online
on any node as this node knows it (a node that just got its first socket on the book learns the
others' within a broker round trip and tells its sockets with ``device.online``);
``device.online`` goes out when a device's first socket comes, ``device.offline`` when its last
one everywhere closed ``PRESENCE_GRACE_S`` ago, or its node went silent for ``PRESENCE_TTL_S``.

``delivered_seq`` (``GET /books/{id}/sync_status``) and ``devices.last_active_at`` are written
for connected devices every ``SYNC_FLUSH_S`` and when a socket closes, in one batch per pass.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Coroutine, Generator
from typing import TYPE_CHECKING, Any

from relay.book_presence import HERE, BookView
from relay.pacing import paced
from relay.protocol import Message, error_frame, request_id_of
from shared.books import history, is_member, sweep
from shared.books.ops import (
    MAX_OP_ID,
    BookOps,
    NotAccepted,
    book_ops_for,
    decode_payload,
    valid_op_id,
    valid_timestamp,
)
from shared.books.writer import channel_of, sequence_key_of
from shared.broker.envelope import pack_envelope, unpack_envelope
from shared.broker.memory import MemoryBroker
from shared.clock import now_ms
from shared.codes import CloseCode, ErrorCode
from shared.errors import BackendUnavailable, StoreError

if TYPE_CHECKING:
    from relay.connection import WsConnection
    from relay.state import RelayState

log = logging.getLogger("switchboard.relay")

EXTRAS_KEY = "relay.books"
OP_TYPE = history.OP_TYPE
REPLAY_PAGE = 200  # ops per store read during a catch-up or a gap read
HELD_MAX = 10_000  # live ops held for one socket or one feed; beyond that the store is re-read
SYNC_FLUSH_S = 5.0
GAP_READS = 2  # store reads for gaps in flight per node (the writer needs the pool more)
ACTIVE_EVERY_S = 60.0  # a connected, quiet device's last_active_at is refreshed this often

__all__ = ["BookRelay", "channel_of", "for_state", "sequence_key_of"]


def op_error(code: ErrorCode, message: str, op_id: Any) -> Message:
    """realtime.md's op error: ``{type: error, id, code, message}`` (``request_id`` kept for /ws parity)."""
    frame = error_frame(code, message)
    frame["id"] = op_id
    return frame


def run_eagerly(state: RelayState, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """Run ``coro`` right now up to its first real suspension; a task only if it suspends.

    With the in-process broker and no retention an op's publish never suspends, so a burst of
    ops is relayed within the ``data_received`` that brought it, without a task per burst
    (BENCHMARKS.md: task creation was ~5 % of test C). Only then (``BookRelay._eager``): the first
    step runs outside any task, and code such as ``asyncio.timeout`` (the Redis client) needs
    one. If it does suspend (a dedupe wait), the rest runs in a task (``state.spawn``) as before.
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
    """What the relay keeps per open book socket."""

    __slots__ = ("book_id", "queue", "worker", "pending", "overflow", "counted", "removed")

    def __init__(self, book_id: str, held: bool) -> None:
        self.book_id = book_id
        # Made on the first op and dropped when drained: an empty deque is ~600 bytes, and most
        # sockets are idle most of the time (bench/micro/README.md, memory per socket).
        self.queue: deque[tuple[Any, bytes, int]] | None = None
        self.worker: asyncio.Task[None] | None = None
        # Live frames kept aside while the socket is set up / catches up (None: live).
        self.pending: list[Message] | None = [] if held else None
        self.overflow = False  # pending hit HELD_MAX: the catch-up re-reads the store instead
        self.counted = False  # counted in ``local_devices`` (presence) once set up
        self.removed = False  # closed because the device left the book: offline without grace


class _Feed:
    """One book on this node: its live ops put back in seq order (retention on), the sockets
    not live yet, and who is online (``BookView``)."""

    __slots__ = (
        "book_id",
        "delivered",
        "held",
        "filling",
        "refill",
        "held_sockets",
        "view",
        "polled",
    )

    def __init__(self, book_id: str) -> None:
        self.book_id = book_id
        self.delivered: int | None = None  # last seq delivered here; None until the head is read
        self.held: dict[int, tuple[Message, str | None]] = {}  # early arrivals by seq
        self.filling: asyncio.Task[None] | None = None
        self.refill = False  # a gap appeared while a read ran: read again after it
        self.held_sockets = 0  # local sockets with ``pending`` (not live yet)
        self.view = BookView()
        self.polled: int | None = None  # ``delivered`` at the last poll (a gap read if stuck)


class BookRelay:
    """The relay sockets of one server (``RelayState``); created by ``for_state``."""

    def __init__(self, state: RelayState) -> None:
        self.state = state
        self.ops: BookOps = book_ops_for(state.services)
        self.retained = self.ops.retained
        self.sockets: dict[WsConnection, _Socket] = {}
        self.local_devices: dict[tuple[str, str], int] = {}  # (book, device) -> open sockets here
        self.feeds: dict[str, _Feed] = {}  # channel -> feed
        self.node_id = os.urandom(6).hex()  # names this node in presence messages
        self._grace: dict[tuple[str, str], asyncio.TimerHandle] = {}  # last socket closed
        # Gap reads at once: a burst of them must not take the pool from the op writer.
        self._reads = asyncio.Semaphore(GAP_READS)
        self._saved: dict[tuple[str, str], int] = {}  # (book, device) -> delivered_seq written
        self._closed_seen: dict[tuple[str, str], int] = {}  # to write after the socket closed
        self._active_at: dict[str, float] = {}  # device -> when last_active_at was last written
        self._background: list[asyncio.Task[None]] = []
        self._stopping = False
        # The in-process broker without retention delivers within publish(): no task per op.
        self._eager = type(state.services.broker) is MemoryBroker and not self.retained
        state.handlers[OP_TYPE] = self.on_operation
        state.on_close.append(self.on_close)
        state.hub.routes["book"] = self.on_book_message
        state.services.closers.append(self.close)

    @property
    def dedupe(self) -> Any:
        return self.ops.dedupe

    # -- background -------------------------------------------------------------------------------
    def _start_background(self) -> None:
        if self._background or self._stopping:
            return
        spawn = asyncio.get_running_loop().create_task
        settings = self.state.settings
        self._background = [
            spawn(self._every(SYNC_FLUSH_S, self.flush_sync), name="book-sync"),
            spawn(self._every(settings.presence_ttl_s / 3, self.presence_pass), name="book-here"),
        ]
        if self.retained:
            self._background += [
                spawn(self._every(settings.inbox_poll_s, self.poll), name="book-poll"),
                spawn(self._every(settings.book_prune_interval_s, self.prune), name="book-prune"),
            ]

    async def _every(self, interval: float, job: Any) -> None:
        while not self._stopping:
            await asyncio.sleep(interval)
            try:
                await job()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a store hiccup must not end the loop
                log.warning("book relay %s failed: %s", getattr(job, "__name__", job), exc)

    async def close(self) -> None:
        self._stopping = True
        for task in self._background:
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        self._background = []
        for feed in self.feeds.values():
            if feed.filling is not None:
                feed.filling.cancel()
        for handle in self._grace.values():
            handle.cancel()  # the other nodes' TTL turns these devices offline
        self._grace.clear()
        try:
            await self.flush_sync(closing=True)
        except Exception as exc:  # noqa: BLE001 - shutting down: the next connect re-reads
            log.warning("book sync state not written at shutdown: %s", exc)

    # -- socket lifecycle --------------------------------------------------------------------------
    async def opened(self, conn: WsConnection, book_id: str, since: int | None = None) -> None:
        """Right after the 101 (reading still paused): subscribe, then ``presence`` first.

        The socket is held (live ops kept aside) from before it joins the channel until its
        catch-up, if any, has been sent: see the module's docstring.
        """
        self._start_background()
        hub = self.state.hub
        channel = channel_of(book_id)
        device_id = conn.device_id
        assert device_id is not None  # a device principal always names its device
        socket = _Socket(book_id, held=True)
        self.sockets[conn] = socket
        first_here = channel not in self.feeds
        feed = self._feed(channel, book_id)
        feed.held_sockets += 1
        try:
            await hub.subscribe(conn, channel)
            if not conn.open:  # closed while subscribing: on_close already ran
                return
            state = await self._state(book_id, device_id)
        except (BackendUnavailable, StoreError):
            self._refuse_late(conn)
            return
        if not conn.open:
            return
        if not state.member:
            # Removed between the upgrade's check and the subscription: the removal notice may
            # have found no socket to close, so this socket closes itself (realtime.md).
            self.evict(conn)
            return
        if self.retained and feed.delivered is None:
            feed.delivered = state.head
            self._drain_held(channel, feed)
        online = set(feed.view.online())
        online.update(c.device_id for c in hub.local_members(channel) if c.open and c.device_id)
        conn.send({"type": "presence", "online": sorted(online)})
        key = (book_id, device_id)
        count = self.local_devices.get(key, 0)
        self.local_devices[key] = count + 1
        socket.counted = True
        grace = self._grace.pop(key, None)
        if grace is not None:
            grace.cancel()  # back within the grace: nobody is told it was ever gone
        elif count == 0:
            self._announce(book_id, device_id, "device.online")
        if first_here:  # ask the other nodes who of this book they count online
            self._publish_here(book_id, query=True)
        if since is None:
            conn.send({"type": "synced", "seq": state.head})
            self._go_live(conn, socket, state.head, replayed=False)
        elif not self.retained or since > state.head or since < state.pruned_upto:
            self._reset(conn, socket, state)
        elif since == state.head:
            conn.send({"type": "synced", "seq": state.head})
            self._go_live(conn, socket, state.head, replayed=True)
        else:
            _ = self.state.spawn(self._catch_up(conn, socket, since, state.head))

    def _feed(self, channel: str, book_id: str) -> _Feed:
        feed = self.feeds.get(channel)
        if feed is None:
            feed = self.feeds[channel] = _Feed(book_id)
        return feed

    async def _state(self, book_id: str, device_id: str) -> history.BookState:
        db = self.state.services.db
        if self.retained:
            return await history.state(db, book_id, member=device_id)
        head = await self.ops.head(book_id)
        member = await is_member(db, book_id, device_id)
        return history.BookState(head, head, head, None, None, member)

    def _reset(self, conn: WsConnection, socket: _Socket, state: history.BookState) -> None:
        frame: Message = {"type": "reset", "reason": "history_truncated", "seq": state.head}
        if state.snapshot_seq is not None:
            frame["snapshot_seq"] = state.snapshot_seq
        conn.send(frame)
        # As on /ws: the catch-up is over (there was nothing to replay), say so the same way.
        conn.send({"type": "synced", "seq": state.head})
        self._go_live(conn, socket, state.head, replayed=True)

    async def _catch_up(self, conn: WsConnection, socket: _Socket, since: int, head: int) -> None:
        """Replay the retained ops after ``since``, then ``synced``, then live."""
        db = self.state.services.db
        limit = self.state.settings.ws_outbound_limit_bytes // 2
        last = since
        try:
            while conn.open:
                while last < head and conn.open:
                    page = await history.read(db, socket.book_id, last, head, REPLAY_PAGE)
                    if not page:
                        break
                    for frame in page:
                        conn.send(frame)
                    last = page[-1]["seq"]
                    await paced(conn, limit)
                if not socket.overflow:
                    break
                # Live ops overflowed the hold: they are all in the store, read on from there.
                socket.overflow = False
                assert socket.pending is not None
                socket.pending.clear()
                head = max(head, await history.head(db, socket.book_id))
        except (BackendUnavailable, StoreError) as exc:
            log.warning("book catch-up failed: %s", exc)
            conn.fail(CloseCode.OVERLOADED)  # reconnect (maybe elsewhere) and resume from since
            return
        if not conn.open:
            return
        head = max(head, last)
        conn.send({"type": "synced", "seq": head})
        self._go_live(conn, socket, last, replayed=True)

    def _go_live(self, conn: WsConnection, socket: _Socket, upto: int, *, replayed: bool) -> None:
        """Send the live frames held for the socket (after ``upto`` if it replayed), go live."""
        pending = socket.pending
        if pending is None:
            return
        socket.pending = None
        feed = self.feeds.get(channel_of(socket.book_id))
        if feed is not None:
            feed.held_sockets -= 1
        for frame in pending:
            seq = frame.get("seq")
            if replayed and seq is not None and seq <= upto:
                continue
            conn.send(frame)
        if conn.device_id is not None:
            self._seen(socket.book_id, conn.device_id, upto)

    def _refuse_late(self, conn: WsConnection) -> None:
        """The broker or store failed after the 101: close 1013 (try again, maybe elsewhere)."""
        log.warning("relay socket closed: the broker or the store is unavailable")
        conn.fail(CloseCode.OVERLOADED)

    def on_close(self, conn: WsConnection) -> None:
        socket = self.sockets.pop(conn, None)
        if socket is None:
            return
        if socket.worker is not None and socket.worker is not _STARTING:
            socket.worker.cancel()  # unacknowledged ops are the client's to re-send
        channel = channel_of(socket.book_id)
        hub = self.state.hub
        hub.unsubscribe(conn, channel)
        feed = self.feeds.get(channel)
        if feed is not None:
            if socket.pending is not None:
                feed.held_sockets -= 1
            elif conn.device_id is not None and feed.delivered is not None:
                self._closed_seen[(socket.book_id, conn.device_id)] = feed.delivered
            if not hub.local_members(channel):
                if feed.filling is not None:
                    feed.filling.cancel()
                del self.feeds[channel]
        device_id = conn.device_id
        assert device_id is not None
        if not socket.counted:
            return
        key = (socket.book_id, device_id)
        count = self.local_devices.get(key, 0) - 1
        if count > 0:
            self.local_devices[key] = count
            return
        self.local_devices.pop(key, None)
        if socket.removed:  # it left the book: no grace, it is not coming back
            self._announce(socket.book_id, device_id, "device.offline")
            return
        # device.offline after the grace (realtime.md guarantee 5), unless it is back by then.
        self._grace[key] = asyncio.get_running_loop().call_later(
            self.state.settings.presence_grace_s, self._grace_over, key
        )

    def evict(self, conn: WsConnection) -> None:
        """The device was removed from the book: ``device.removed``, then close 1008."""
        socket = self.sockets.get(conn)
        if socket is not None:
            socket.removed = True
        conn.send({"type": "device.removed"})  # written before the close frame
        conn.close(CloseCode.POLICY, "device removed from the book")

    def _grace_over(self, key: tuple[str, str]) -> None:
        if self._grace.pop(key, None) is not None and key not in self.local_devices:
            self._announce(key[0], key[1], "device.offline")

    # -- presence across nodes (relay/book_presence.py) -------------------------------------------
    def _announce(self, book_id: str, device_id: str, kind: str) -> None:
        message = {"type": kind, "device_id": device_id, "node": self.node_id}
        _ = self.state.spawn(self._publish_quietly(book_id, message, device_id))

    def _counted_here(self, book_id: str) -> list[str]:
        """The devices this node counts online for the book: open sockets and graces."""
        devices = {
            c.device_id
            for c in self.state.hub.local_members(channel_of(book_id))
            if c.device_id is not None and (s := self.sockets.get(c)) is not None and s.counted
        }
        devices.update(d for (b, d) in self._grace if b == book_id)
        return sorted(devices)

    def _here(self, book_id: str, *, query: bool) -> Message:
        return {
            "type": HERE,
            "node": self.node_id,
            "online": self._counted_here(book_id),
            "query": query,
        }

    def _publish_here(self, book_id: str, *, query: bool) -> None:
        message = self._here(book_id, query=query)
        _ = self.state.spawn(self._publish_quietly(book_id, message, None))

    async def _publish_quietly(self, book_id: str, message: Message, device_id: str | None) -> None:
        try:
            await self.state.hub.publish(channel_of(book_id), message, exclude_device=device_id)
        except BackendUnavailable:
            log.warning("presence change not published: the broker is unavailable")

    def _on_presence(self, channel: str, feed: _Feed, message: Message) -> None:
        node = message.get("node")
        kind = message.get("type")
        if not isinstance(node, str):
            return
        now = time.monotonic()
        view = feed.view
        if kind == HERE:
            online = message.get("online")
            if not isinstance(online, list):
                return
            came, went = view.here(node, [d for d in online if isinstance(d, str)], now)
            self._tell(channel, feed, came, went)
            if message.get("query") is True and node != self.node_id:
                self._publish_here(feed.book_id, query=False)
            return
        device = message.get("device_id")
        if not isinstance(device, str):
            return
        if kind == "device.online" and view.claim(node, device, now):
            self._tell(channel, feed, [device], [])
        elif kind == "device.offline" and view.release(node, device, now):
            self._tell(channel, feed, [], [device])

    def _tell(self, channel: str, feed: _Feed, came: list[str], went: list[str]) -> None:
        for device in came:  # a device is not told about itself
            self._deliver(channel, feed, {"type": "device.online", "device_id": device}, device)
        for device in went:
            self._deliver(channel, feed, {"type": "device.offline", "device_id": device}, device)

    async def presence_pass(self) -> None:
        """Every third of PRESENCE_TTL_S: say who is here, forget nodes that went silent."""
        ttl = self.state.settings.presence_ttl_s
        now = time.monotonic()
        messages: list[tuple[str, bytes]] = []
        for channel, feed in list(self.feeds.items()):
            here = self._here(feed.book_id, query=False)
            messages.append((channel, pack_envelope(here, None)))
            went = feed.view.expire(now, ttl, keep=self.node_id)
            if went:
                self._tell(channel, feed, [], went)
        try:  # every book's _here in one round trip (a pipeline on Redis)
            await self.state.services.broker.publish_many(messages)
        except BackendUnavailable:
            log.warning("presence not published: the broker is unavailable")

    # -- live delivery in seq order (retention on) ---------------------------------------------------
    def on_book_message(self, channel: str, members: Any, data: bytes) -> None:
        """A hub route: the broker's message for ``book:...`` (an op, in seq order; presence)."""
        try:
            message, exclude, seq = unpack_envelope(data)
        except Exception:  # noqa: BLE001 - whatever a broken publisher sent, drop it loudly
            log.error("dropped a malformed broker message on a book channel")
            return
        feed = self.feeds.get(channel)
        if feed is None:
            return
        if seq is None:  # presence: not part of the book's order, never relayed as sent
            self._on_presence(channel, feed, message)
            return
        if not self.retained:  # the broker numbered it: already in order
            message["seq"] = seq
            self._deliver(channel, feed, message, exclude)
            return
        delivered = feed.delivered
        if delivered is not None and seq <= delivered:
            return  # delivered already (a gap read got there first)
        if delivered is None or seq > delivered + 1:
            if len(feed.held) < HELD_MAX:
                feed.held[seq] = (message, exclude)
            if delivered is not None:
                self._fill(channel, feed)
            return
        self._deliver(channel, feed, message, exclude)
        feed.delivered = seq
        if feed.held:
            self._drain_held(channel, feed)

    def _deliver(self, channel: str, feed: _Feed, message: Message, exclude: str | None) -> None:
        hub = self.state.hub
        if not feed.held_sockets:
            hub.broadcast(channel, message, exclude)
            return
        live: dict[WsConnection, None] = {}
        for conn in hub.local_members(channel):
            socket = self.sockets.get(conn)
            if socket is None or socket.pending is None:
                live[conn] = None
            elif conn.device_id != exclude:
                if len(socket.pending) < HELD_MAX:
                    socket.pending.append(message)
                else:
                    socket.overflow = True
        hub.broadcast_to(channel, live, message, exclude)

    def _drain_held(self, channel: str, feed: _Feed) -> None:
        """Deliver the early arrivals that are next in line; read the gap if one remains."""
        held = feed.held
        assert feed.delivered is not None
        for seq in [s for s in held if s <= feed.delivered]:
            del held[seq]
        while held:
            nxt = feed.delivered + 1
            entry = held.pop(nxt, None)
            if entry is None:
                self._fill(channel, feed)
                return
            self._deliver(channel, feed, entry[0], entry[1])
            feed.delivered = nxt

    def _fill(self, channel: str, feed: _Feed, upto: int | None = None) -> None:
        if feed.filling is not None:
            feed.refill = True
            return
        feed.filling = self.state.spawn(self._fill_gap(channel, feed, upto))

    async def _fill_gap(self, channel: str, feed: _Feed, upto: int | None) -> None:
        """Read from the store what this node missed below the first held op (or up to
        ``upto``, the head a poll saw), deliver it in order, then the held ops after it."""
        db = self.state.services.db
        try:
            while True:
                feed.refill = False
                assert feed.delivered is not None
                target = min(feed.held) - 1 if feed.held else upto
                if target is None or target <= feed.delivered:
                    break
                async with self._reads:
                    page = await history.read(db, feed.book_id, feed.delivered, target, REPLAY_PAGE)
                if self.feeds.get(channel) is not feed:
                    return  # the last local socket left meanwhile
                for frame in page:
                    if frame["seq"] > feed.delivered:
                        self._deliver(channel, feed, frame, frame["device_id"])
                        feed.delivered = frame["seq"]
                if len(page) < REPLAY_PAGE:
                    # Everything committed below the target is read: the rest was pruned.
                    feed.delivered = max(feed.delivered, target)
                    upto = None
                feed.filling = None  # _drain_held may need a new read
                self._drain_held(channel, feed)
                if feed.filling is not None or not (feed.refill or feed.held):
                    return
                feed.filling = asyncio.current_task()  # type: ignore[assignment]
        except (BackendUnavailable, StoreError) as exc:
            log.warning("book gap read failed (the poll retries): %s", exc)
        finally:
            if feed.filling is asyncio.current_task():
                feed.filling = None

    async def poll(self) -> None:
        """Read what the store holds beyond what a feed delivered, when it made no progress
        since the previous poll (a publish was lost): within two ``INBOX_POLL_S``."""
        feeds = {f.book_id: (c, f) for c, f in self.feeds.items() if f.delivered is not None}
        if not feeds:
            return
        db = self.state.services.db
        ids = list(feeds)
        for i in range(0, len(ids), 400):
            chunk = ids[i : i + 400]
            marks = ", ".join(f"${n}" for n in range(1, len(chunk) + 1))
            rows = await db.fetch(
                f"SELECT book_id, head FROM book_heads WHERE book_id IN ({marks})", *chunk
            )
            for row in rows:
                channel, feed = feeds[row["book_id"]]
                head = int(row["head"])
                delivered = feed.delivered
                if self.feeds.get(channel) is not feed or delivered is None:
                    continue
                # Behind the store is normal for an op whose publish is on its way; behind and
                # stuck since the last poll means a publish was lost: read it from the store.
                stuck = head > delivered and feed.polled == delivered
                feed.polled = delivered
                if stuck and feed.filling is None:
                    self._fill(channel, feed, upto=head)

    async def prune(self) -> None:
        retention = self.ops.retention
        dropped = await history.prune(
            self.state.services.db,
            now_ms=now_ms(),
            max_age_s=retention.max_age_s,
            max_bytes=retention.max_bytes,
        )
        if dropped:
            log.info("book history pruned %d ops", dropped)
        services = self.state.services
        swept = await sweep.abandoned_photos(services.db, services.blobs, now_ms=now_ms())
        if swept:
            log.info("dropped %d abandoned photo uploads", swept)

    # -- delivered_seq / last_active_at --------------------------------------------------------------
    def _seen(self, book_id: str, device_id: str, seq: int) -> None:
        key = (book_id, device_id)
        if seq > self._closed_seen.get(key, -1):
            self._closed_seen[key] = seq

    async def flush_sync(self, closing: bool = False) -> None:
        """Write ``delivered_seq`` of the devices served since the last pass, in one batch."""
        seen = self._closed_seen
        self._closed_seen = {}
        for conn, socket in self.sockets.items():
            if socket.pending is not None or conn.device_id is None:
                continue
            if self.retained:
                feed = self.feeds.get(channel_of(socket.book_id))
                seq = feed.delivered if feed is not None else None
            else:
                seq = None
            key = (socket.book_id, conn.device_id)
            value = seq if seq is not None else self._saved.get(key, 0)
            if value >= seen.get(key, -1):
                seen[key] = value
        rows = [(b, d, s) for (b, d), s in seen.items() if self._saved.get((b, d)) != s or closing]
        # last_active_at: devices with something new, and connected ones once a minute.
        mono = time.monotonic()
        active = {d for (_, d, _) in rows}
        active.update(d for (_, d) in seen if mono - self._active_at.get(d, 0.0) >= ACTIVE_EVERY_S)
        if not rows and not active:
            return
        now = now_ms()
        db = self.state.services.db
        async with db.transaction() as tx:
            if rows:
                await tx.executemany(
                    "INSERT INTO book_device_sync (book_id, device_id, delivered_seq, updated_at)"
                    " VALUES ($1, $2, $3, $4) ON CONFLICT (book_id, device_id) DO UPDATE SET"
                    " delivered_seq = CASE WHEN excluded.delivered_seq > book_device_sync.delivered_seq"
                    " THEN excluded.delivered_seq ELSE book_device_sync.delivered_seq END,"
                    " updated_at = excluded.updated_at",
                    [(b, d, s, now) for b, d, s in rows],
                )
            await tx.executemany(
                "UPDATE devices SET last_active_at = $2 WHERE id = $1",
                [(d, now) for d in sorted(active)],
            )
        for b, d, s in rows:
            self._saved[(b, d)] = s
        for d in active:
            self._active_at[d] = mono
        if len(self._saved) > 100_000:  # caches of what was written; losing them costs a re-write
            self._saved.clear()
            self._active_at.clear()

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
        if not valid_op_id(op_id):
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
        if not valid_timestamp(timestamp):
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
        """Accept the socket's ops in arrival order (per-sender order across nodes)."""
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
        device_id = conn.device_id
        assert device_id is not None
        try:
            seq = await self.ops.submit(book_id, device_id, op_id, payload, timestamp)
        except NotAccepted:
            conn.send(op_error(ErrorCode.SERVICE_UNAVAILABLE, "op not accepted; re-send it", op_id))
            return
        except (BackendUnavailable, StoreError):
            conn.send(
                op_error(
                    ErrorCode.SERVICE_UNAVAILABLE,
                    "store or broker unavailable; re-send the op",
                    op_id,
                )
            )
            return
        conn.send({"type": "ack", "id": op_id, "seq": seq})


def for_state(state: RelayState) -> BookRelay:
    """The server's ``BookRelay``, created (and its handlers installed) on first use."""
    extras = state.services.extras
    relay = extras.get(EXTRAS_KEY)
    if not isinstance(relay, BookRelay) or relay.state is not state:
        relay = BookRelay(state)
        extras[EXTRAS_KEY] = relay
    return relay
