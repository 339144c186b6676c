"""Durable delivery on ``/ws``: the principal's inbox, with cumulative acks, re-sends and sync.

realtime.md "User/device socket" and guarantees 1-2. Per socket, ``relay.inbox_core.InboxCursor``
decides what to send; this module does the I/O around it:

* **open** (``opened``, before ``hello``): subscribe the socket to ``inbox:{user_id}`` (so every
  wake-up from now on reaches it, held until catch-up is done), register a named device (a new
  one starts at the head), send ``hello`` with the head, replay what the device missed, then
  ``synced``. A device not seen within ``INBOX_RETENTION_S``, or whose entries were pruned, gets
  ``reset`` and starts over at the head.
* **live**: the writer's wake-up (``shared.inbox.writer``) carries committed entries; the hub
  routes it here and each socket of the user takes what is for it.
* **re-sends**: while a socket owes acks, a timer replays from its acked cursor + 1 after
  ``ACK_TIMEOUT``, doubling to ``ACK_TIMEOUT_MAX``.
* **acks** are written to the store in one batch per ``INBOX_ACK_FLUSH_S`` (and on close and
  drain); a node killed in between loses at most that much ack progress, i.e. re-sends that the
  client drops as duplicates.
* **safety net**: every ``INBOX_POLL_S`` the node compares its sockets' cursors with the heads in
  the store and replays where a wake-up was lost (Redis restarted, a node died mid-publish).

Replays are paced by the socket's write buffer, so a long catch-up never trips the slow-consumer
bound by itself, and one replay at a time runs per socket (requests that arrive meanwhile are
merged into the next one).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from relay.hub import encode_frame, frame_bytes
from relay.inbox_core import Decision, InboxCursor
from relay.pacing import paced
from relay.protocol import Message, error_frame, hello_frame, request_id_of
from relay.requests import error_reply, ok_reply
from shared import idempotency, metrics
from shared.clock import now_ms
from shared.codes import CloseCode, ErrorCode
from shared.errors import BackendUnavailable, StoreError
from shared.inbox import store
from shared.inbox.events import (
    WAKE_ENTRIES,
    Entry,
    EventFilter,
    inbox_channel,
    pack_ephemeral,
    unpack_wake,
)

if TYPE_CHECKING:
    from collections.abc import Collection

    from relay.connection import WsConnection
    from relay.state import RelayState
    from shared.principals import Principal

log = logging.getLogger("switchboard.inbox")

EXTRAS_KEY = "relay.inbox"
PRUNE_EVERY_S = 60.0
DELIVERED_MAX = 100_000  # publish delivery times held between two flushes (statistics only)


def _wire_frame(entry: Entry, binary: bool) -> bytes:
    """The entry's ``event`` frame as one complete WebSocket frame, cached on the entry.

    Text: ``data`` is JSON text and goes out verbatim (shared.inbox.events), spliced into the
    frame without a decode and a re-encode. Binary (MessagePack) encodes the decoded frame.
    Prebuilt frames skip the websockets protocol object, as the hub's broadcast does: inbox
    sockets are hub members, which have no extensions (``Hub.subscribe`` asserts it).
    """
    cache = entry.wire
    if cache is None:
        cache = entry.wire = {}
    frame = cache.get(binary)
    if frame is None:
        if binary:
            frame = encode_frame(entry.frame(), binary=True)
        else:
            text = b'{"type":"event","event":%s,"cursor":%d,"data":%s}' % (
                json.dumps(entry.event).encode(),
                entry.cursor,
                entry.data.encode(),
            )
            frame = frame_bytes(text, binary=False)
        cache[binary] = frame
    return frame


_MESSAGE_ID_HEAD = '{"message_id":"'


def _publish_message_id(data: str) -> str | None:
    """A ``publish`` event's message id: POST /publish writes it first, so no full decode."""
    if data.startswith(_MESSAGE_ID_HEAD):
        end = data.find('"', len(_MESSAGE_ID_HEAD))
        if end > 0:
            return data[len(_MESSAGE_ID_HEAD) : end]
    try:
        value = json.loads(data)
    except ValueError:
        return None
    message_id = value.get("message_id") if isinstance(value, dict) else None
    return message_id if isinstance(message_id, str) else None


def inbox_user(principal: Principal) -> str:
    """Whose inbox a principal reads: its user (a daemon's or token's owner)."""
    return principal.user_id or principal.id


class _Reader:
    """One ``/ws`` socket's delivery: its cursor state, its timer, its replay task."""

    __slots__ = (
        "conn",
        "user_id",
        "cursor",
        "timer",
        "replay",
        "pending_after",
        "pending_synced",
        "saved",
        "greeted",
    )

    def __init__(self, conn: WsConnection, user_id: str, cursor: InboxCursor) -> None:
        self.conn = conn
        self.user_id = user_id
        self.cursor = cursor
        self.timer: asyncio.TimerHandle | None = None
        self.replay: asyncio.Task[None] | None = None
        self.pending_after: int | None = None  # a replay asked for while one runs
        self.pending_synced = False
        self.saved = cursor.acked  # the ack the store has (or is about to get) for this device
        self.greeted = False  # hello sent: ephemeral frames may follow


class InboxDelivery:
    """The inbox side of one server (``RelayState``); ``for_state`` creates it."""

    def __init__(self, state: RelayState) -> None:
        self.state = state
        self.settings = state.settings
        self.readers: dict[WsConnection, _Reader] = {}
        self._dirty: dict[tuple[str, str], tuple[int, int]] = {}  # (user, device) -> (ack, seen)
        self._delivered: dict[str, int] = {}  # publish message id -> first sent (unix ms)
        self._background: list[asyncio.Task[None]] = []
        self._stopping = False
        state.handlers["ack"] = self.on_ack
        state.handlers["sync"] = self.on_sync
        state.handlers["filter"] = self.on_filter
        state.on_close.append(self.on_close)
        state.hub.routes["inbox"] = self.on_wake
        state.services.closers.append(self.close)

    def _start_background(self) -> None:
        if self._background:
            return
        spawn = asyncio.get_running_loop().create_task
        self._background = [
            spawn(self._every(self.settings.inbox_ack_flush_s, self.flush_acks), name="inbox-acks"),
            spawn(self._every(self.settings.inbox_poll_s, self.poll), name="inbox-poll"),
            spawn(self._every(PRUNE_EVERY_S, self.prune), name="inbox-prune"),
        ]

    # -- socket lifecycle ---------------------------------------------------------------------
    async def opened(self, conn: WsConnection) -> None:
        """After the 101, reading paused: subscribe, ``hello``, catch up, ``synced``."""
        self._start_background()
        settings = self.settings
        user_id = inbox_user(conn.principal)
        device_id = conn.device_id
        cursor = InboxCursor(
            device_id,
            0,
            ack_timeout=settings.ack_timeout_s,
            ack_timeout_max=settings.ack_timeout_max_s,
        )
        cursor.replaying = True  # hold live entries until the catch-up below has run
        reader = _Reader(conn, user_id, cursor)
        self.readers[conn] = reader
        db = self.state.services.db
        try:
            await self.state.hub.subscribe(conn, inbox_channel(user_id))
            head = await store.head(db, user_id)
            stale = False
            if device_id is not None:
                now = now_ms()
                device = await store.open_device(db, user_id, device_id, head, now)
                acked = min(device.acked, head)
                stale = (
                    not device.created
                    and device.last_seen_at < now - settings.inbox_retention_s * 1000
                )
                if device.filter:
                    cursor.filter = EventFilter(json.loads(device.filter))
                self._dirty[(user_id, device_id)] = (acked, now)  # last_seen_at: connected now
            else:
                acked = head  # a session of its own: live from hello's cursor
        except (BackendUnavailable, StoreError) as exc:
            log.warning("inbox socket closed: %s", exc)
            self._forget(conn)
            conn.fail(CloseCode.OVERLOADED)
            return
        if conn not in self.readers:  # closed while we were reading the store
            return
        cursor.acked = cursor.scanned = cursor.sent = reader.saved = acked
        p = conn.principal
        conn.send(hello_frame(conn.id, p.kind, p.id, device_id, settings.heartbeat_s, cursor=head))
        reader.greeted = True
        if stale:
            await self._reset(reader, head)
            self._request_replay(reader, head, synced=True)
        elif acked >= head:
            # Nothing missed (the usual case): ``synced`` right after ``hello``, before any
            # request of the client is read, and no replay task at all.
            decision = cursor.end_replay(head, now_ms())
            conn.send({"type": "synced", "cursor": cursor.scanned})
            self._follow(reader, decision)
        else:
            self._request_replay(reader, acked, synced=True)

    def on_close(self, conn: WsConnection) -> None:
        reader = self._forget(conn)
        if reader is not None and conn.device_id is not None:
            self._mark_dirty(reader, force=True)

    def _forget(self, conn: WsConnection) -> _Reader | None:
        reader = self.readers.pop(conn, None)
        if reader is None:
            return None
        if reader.timer is not None:
            reader.timer.cancel()
            reader.timer = None
        if reader.replay is not None and reader.replay is not asyncio.current_task():
            reader.replay.cancel()
        return reader

    # -- live ---------------------------------------------------------------------------------
    def on_wake(self, channel: str, members: Collection[WsConnection], data: bytes) -> None:
        try:
            kind, body, exclude = unpack_wake(data)
        except ValueError:
            log.error("dropped a malformed inbox wake-up")
            return
        if kind == WAKE_ENTRIES:
            now = now_ms()
            for conn in list(members):
                reader = self.readers.get(conn)
                if reader is not None:
                    self._follow(reader, reader.cursor.on_live(body, now))
            return
        for conn in list(members):  # an ephemeral frame: not acked, not replayed
            reader = self.readers.get(conn)
            # Not before ``hello``: the socket is subscribed a moment before its first frame.
            if (
                reader is not None
                and reader.greeted
                and (exclude is None or conn.device_id != exclude)
            ):
                conn.send(body)

    def _follow(self, reader: _Reader, decision: Decision) -> None:
        """Send what the cursor decided, start the replay it asked for, keep the timer right."""
        self._send_entries(reader, decision.send)
        if decision.replay_from is not None:
            self._request_replay(reader, decision.replay_from, synced=False)
        self._arm(reader)
        self._mark_dirty(reader)

    def _send_entries(self, reader: _Reader, entries: list[Entry]) -> None:
        """Queue the entries' frames (encoded once per entry, shared by every socket of the
        user) and write them to the socket at once."""
        conn = reader.conn
        if not entries or not conn.open:
            return
        now = now_ms()
        binary = conn.codec.binary
        frames = []
        for entry in entries:
            frames.append(_wire_frame(entry, binary))
            if entry.event == "publish" and len(self._delivered) < DELIVERED_MAX:
                # First delivery time for GET /publish/stats, written with the acks.
                message_id = _publish_message_id(entry.data)
                if message_id is not None:
                    self._delivered.setdefault(message_id, now)
            metrics.INBOX_LAG.observe(max(0.0, (now - entry.created_at) / 1000))
        # Anything the hub queued earlier this tick goes first: order on the socket is kept.
        conn.write_frames(frames)

    async def publish_ephemeral(
        self, user_id: str, frame: Message, exclude_device: str | None = None
    ) -> None:
        """A frame for every socket of ``user_id`` on every node (device.online, typing, ...)."""
        await self.state.services.broker.publish(
            inbox_channel(user_id), pack_ephemeral(frame, exclude_device)
        )

    # -- replays ------------------------------------------------------------------------------
    def _request_replay(self, reader: _Reader, after: int, *, synced: bool) -> None:
        if reader.replay is not None:  # merged into the replay after the running one
            reader.pending_after = (
                after if reader.pending_after is None else min(after, reader.pending_after)
            )
            reader.pending_synced = reader.pending_synced or synced
            return
        # Live entries are held from this very moment, not from when the task first runs.
        reader.cursor.begin_replay(after)
        reader.replay = self.state.spawn(self._replay_loop(reader, after, synced))

    async def _replay_loop(self, reader: _Reader, after: int, synced: bool) -> None:
        try:
            while reader.conn.open and reader.conn in self.readers:
                await self._replay(reader, after, synced)
                if reader.pending_after is None:
                    return
                after, synced = reader.pending_after, reader.pending_synced
                reader.pending_after, reader.pending_synced = None, False
                reader.cursor.begin_replay(after)
        except (BackendUnavailable, StoreError) as exc:
            # The store is down: keep the socket (live delivery may still work); the re-send
            # timer and the poll try again.
            log.warning("inbox replay failed: %s", exc)
            reader.cursor.replaying = False
            reader.cursor.held.clear()
        finally:
            reader.replay = None
            self._arm(reader)

    async def _replay(self, reader: _Reader, after: int, synced: bool) -> None:
        """One pass: everything after ``after`` up to the head as it is now (``begin_replay``
        was called); live entries held meanwhile follow it."""
        cursor, conn = reader.cursor, reader.conn
        db = self.state.services.db
        head = await store.head(db, reader.user_id)
        pos, first = after, True
        page_size = self.settings.inbox_replay_page
        while pos < head and conn.open:
            page = await store.read(db, reader.user_id, pos, head, page_size)
            if first and (not page or page[0].cursor > pos + 1):
                # Cursors are contiguous, so a missing first entry was pruned: what this socket
                # needed is gone (away past retention, or a sync from before the retained
                # history). Start over at the head.
                await self._reset(reader, head)
                break
            first = False
            if not page:
                break
            self._send_entries(reader, cursor.replayed(page, now_ms()))
            pos = page[-1].cursor
            await paced(conn, self.settings.ws_outbound_limit_bytes // 2)
        decision = cursor.end_replay(head, now_ms())
        if synced and conn.open:
            conn.send({"type": "synced", "cursor": cursor.scanned})
        self._follow(reader, decision)

    async def _reset(self, reader: _Reader, head: int) -> None:
        reader.cursor.reset_to(head)
        reader.conn.send({"type": "reset", "cursor": head})
        device_id = reader.conn.device_id
        if device_id is not None:
            await store.reset_device(
                self.state.services.db, reader.user_id, device_id, head, now_ms()
            )
            reader.saved = head

    # -- re-sends -----------------------------------------------------------------------------
    def _arm(self, reader: _Reader) -> None:
        if reader.timer is not None or not reader.cursor.unacked or reader.conn not in self.readers:
            return
        reader.timer = asyncio.get_running_loop().call_later(
            reader.cursor.retry_interval, self._resend, reader
        )

    def _resend(self, reader: _Reader) -> None:
        reader.timer = None
        if reader.conn not in self.readers or not reader.cursor.unacked:
            return
        reader.cursor.next_retry_interval()  # the wait after this re-send is twice as long
        self._request_replay(reader, reader.cursor.acked, synced=False)

    # -- client frames ------------------------------------------------------------------------
    def _cursor_frame(self, conn: WsConnection, message: Message) -> tuple[_Reader, int] | None:
        """The socket's reader and the frame's ``cursor``, or None after an error frame."""
        reader = self.readers.get(conn)
        value = message.get("cursor")
        if (
            reader is not None
            and isinstance(value, int)
            and not isinstance(value, bool)
            and value >= 0
        ):
            return reader, value
        problem = (
            "this socket has no inbox"
            if reader is None
            else "'cursor' must be a non-negative integer"
        )
        conn.send(error_frame(ErrorCode.VALIDATION_ERROR, problem, request_id_of(message)))
        return None

    def on_ack(self, conn: WsConnection, message: Message) -> None:
        found = self._cursor_frame(conn, message)
        if found is None:
            return
        reader, value = found
        if reader.cursor.on_ack(value):
            if reader.timer is not None:
                reader.timer.cancel()
                reader.timer = None
            self._arm(reader)
            self._mark_dirty(reader)

    def on_sync(self, conn: WsConnection, message: Message) -> None:
        found = self._cursor_frame(conn, message)
        if found is None:
            return
        reader, value = found
        after = min(value, reader.cursor.scanned)
        reader.cursor.on_ack(after)  # "last processed": everything up to it is acked
        self._mark_dirty(reader)
        self._request_replay(reader, after, synced=True)

    async def on_filter(self, conn: WsConnection, message: Message) -> None:
        """``{"type": "filter", "events": [...]}``; with a ``request_id`` it gets a ``reply``
        (ok or not), without one only problems are answered, as ``error`` frames."""
        reader = self.readers.get(conn)
        rid = request_id_of(message)

        def refuse(code: ErrorCode, text: str) -> None:
            conn.send(error_frame(code, text) if rid is None else error_reply(rid, code, text))

        if reader is None:
            refuse(ErrorCode.VALIDATION_ERROR, "this socket has no inbox")
            return
        events = message.get("events")
        try:
            new = None if events is None else EventFilter.parse(events)
        except ValueError as exc:
            refuse(ErrorCode.VALIDATION_ERROR, str(exc))
            return
        if new is not None and new.patterns == ["*"]:
            new = None
        reader.cursor.filter = new
        if conn.device_id is not None:  # the filter belongs to the device: it outlives the socket
            try:
                await store.save_filter(
                    self.state.services.db, reader.user_id, conn.device_id,
                    None if new is None else new.to_json(),
                )  # fmt: skip
            except (BackendUnavailable, StoreError):
                refuse(ErrorCode.SERVICE_UNAVAILABLE, "filter not saved; retry")
                return
        if rid is not None:
            conn.send(ok_reply(rid, {"events": None if new is None else new.patterns}))

    # -- acks to the store ----------------------------------------------------------------------
    def _mark_dirty(self, reader: _Reader, *, force: bool = False) -> None:
        device_id = reader.conn.device_id
        if device_id is None:
            return
        ack = reader.cursor.effective_ack
        if ack > reader.saved or force:
            reader.saved = max(ack, reader.saved)
            key = (reader.user_id, device_id)
            old = self._dirty.get(key)
            self._dirty[key] = (max(ack, old[0]) if old else ack, now_ms())

    async def flush_acks(self) -> None:
        if self._delivered:
            delivered, self._delivered = self._delivered, {}
            try:
                await self.state.services.db.executemany(
                    "UPDATE published_messages SET delivered_at = $2 WHERE id = $1 AND delivered_at IS NULL",
                    list(delivered.items()),
                )
            except (BackendUnavailable, StoreError) as exc:
                log.warning("publish delivery times not saved: %s", exc)  # statistics only
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, {}
        rows = [(u, d, ack, seen) for (u, d), (ack, seen) in dirty.items()]
        try:
            await store.save_acks(self.state.services.db, rows)
        except (BackendUnavailable, StoreError) as exc:
            log.warning("inbox acks not saved (%d devices), retrying: %s", len(rows), exc)
            for key, (ack, seen) in dirty.items():  # keep them for the next flush
                old = self._dirty.get(key)
                self._dirty[key] = (max(ack, old[0]), max(seen, old[1])) if old else (ack, seen)

    # -- safety net -----------------------------------------------------------------------------
    async def poll(self) -> None:
        """Replay where the store is ahead of what a socket has seen (a wake-up was lost)."""
        by_user: dict[str, list[_Reader]] = {}
        for reader in self.readers.values():
            if reader.replay is None and not reader.cursor.replaying:
                by_user.setdefault(reader.user_id, []).append(reader)
        if not by_user:
            return
        heads = await store.heads(self.state.services.db, list(by_user))
        for user_id, readers in by_user.items():
            head = heads.get(user_id, 0)
            for reader in readers:
                if reader.cursor.scanned < head and reader.conn in self.readers:
                    self._request_replay(reader, reader.cursor.scanned, synced=False)

    async def prune(self) -> None:
        s = self.settings
        removed = await store.prune(
            self.state.services.db,
            now=now_ms(),
            retention_ms=s.inbox_retention_s * 1000,
            min_age_ms=s.inbox_min_retention_s * 1000,
        )
        if removed:
            log.info("inbox pruned %d entries", removed)
        await idempotency.prune(
            self.state.services.db, now=now_ms(), ttl_ms=s.idempotency_ttl_s * 1000
        )

    async def _every(self, interval: float, job: Any) -> None:
        # The flag, not only the cancellation, ends the loop: on Python 3.11 a cancel that races
        # with a wait_for inside a driver can be swallowed, and close() would wait forever.
        while not self._stopping:
            await asyncio.sleep(interval)
            started = time.monotonic()
            try:
                await job()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a background pass must never die
                log.warning("inbox %s failed: %s", getattr(job, "__name__", "job"), exc)
            if time.monotonic() - started > interval:
                log.warning(
                    "inbox %s took longer than its interval", getattr(job, "__name__", "job")
                )

    async def close(self) -> None:
        """Drain: stop the background passes, write the last acks."""
        self._stopping = True
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._background = []
        for conn in list(self.readers):
            self.on_close(conn)
        try:
            await self.flush_acks()
        except Exception as exc:  # noqa: BLE001 - shutting down: say so, do not raise
            log.warning("inbox acks lost at shutdown: %s", exc)


def for_state(state: RelayState) -> InboxDelivery:
    """The server's ``InboxDelivery``, created (and its handlers installed) on first use."""
    extras = state.services.extras
    delivery = extras.get(EXTRAS_KEY)
    if not isinstance(delivery, InboxDelivery) or delivery.state is not state:
        delivery = InboxDelivery(state)
        extras[EXTRAS_KEY] = delivery
    return delivery


__all__ = ["InboxDelivery", "for_state", "inbox_user"]
