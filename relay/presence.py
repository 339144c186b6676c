"""Presence on ``/ws`` (realtime.md guarantee 5): the relay side of ``shared.presence``.

* every ``/ws`` socket counts for its device (``device_id``, or a session key of its own) from
  open to close; the book relay's sockets do not (its presence is per book and node-local);
* ``device.online`` / ``device.offline`` frames for each transition the process's ``Presence``
  reports, published in order to every ``/ws`` socket of the owner on every node
  (``InboxDelivery.publish_ephemeral``: not acked, not replayed). Sessions without ``device_id``
  count in ``online_devices`` but are not devices, so they get no frames; a device is not told
  about itself coming online;
* the ``heartbeat`` request: ``status`` / ``metrics`` checked, the device kept online for
  ``PRESENCE_TIMEOUT_S``, its timestamp queued for the store (one batch per
  ``INBOX_ACK_FLUSH_S``, the same cadence as the inbox's ``last_seen_at`` writes), answered with
  ``{server_time}`` (unix seconds);
* the background passes: ``refresh`` every third of ``PRESENCE_TTL_S``, ``sweep`` (graces,
  heartbeat timeouts and dead nodes' entries; every node sweeps, Redis hands each deadline to one);
* drain (a services closer): this node's sockets count as closed, so their graces start now and
  the devices that do not reconnect elsewhere go offline after the grace, reported by another node.

Installed once per ``RelayState`` (``install``).

Known limit: two transitions of one device noticed by two nodes within a millisecond (an offline
at the end of the grace and a reconnect elsewhere) are published by both nodes independently, so
a third node may deliver them in the other order; ``GET /devices`` has the state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from relay import inbox
from relay.protocol import Message, error_frame, request_id_of
from shared.clock import now_ms
from shared.codes import ErrorCode
from shared.errors import BackendUnavailable
from shared.presence import (
    Presence,
    Timing,
    Transition,
    for_services,
    heartbeat_log,
    is_session,
    parse_heartbeat,
    session_key,
)

if TYPE_CHECKING:
    from relay.connection import WsConnection
    from relay.state import RelayState

log = logging.getLogger("switchboard.presence")

EXTRAS_KEY = "relay.presence"
# Book relay sockets are E2EE device credentials; /ws admits users, daemons and API tokens only.
_BOOK_RELAY_KIND = "device"


class PresenceRelay:
    def __init__(self, state: RelayState) -> None:
        self.state = state
        self.settings = state.settings
        self.presence: Presence = for_services(state.services)
        self.timing = Timing.of(state.settings)
        self.heartbeats = heartbeat_log(state.services)
        self.sockets: dict[WsConnection, tuple[str, str]] = {}  # /ws socket -> (user, device key)
        self._writes: set[asyncio.Task[None]] = set()  # presence changes on their way
        self._frames: deque[tuple[str, Message, str | None]] = deque()
        self._wake = asyncio.Event()
        self._closed = False
        self.presence.add_handler(self._on_transition)
        state.on_open.append(self.on_open)
        state.on_close.append(self.on_close)
        state.handlers["heartbeat"] = self.on_heartbeat
        state.services.closers.append(self.close)
        spawn = asyncio.get_running_loop().create_task
        t = self.timing
        self._loops = [
            spawn(self._every(t.refresh_interval, self.presence.refresh), name="presence-refresh"),
            spawn(self._every(t.sweep_interval, self.presence.sweep), name="presence-sweep"),
            spawn(
                self._every(self.settings.inbox_ack_flush_s, self.flush_heartbeats),
                name="presence-heartbeats",
            ),
        ]
        self._publisher = spawn(self._publish_frames(), name="presence-frames")

    # -- sockets ------------------------------------------------------------------------------
    def on_open(self, conn: WsConnection) -> None:
        if conn.principal.kind == _BOOK_RELAY_KIND or self._closed:
            return
        user_id = inbox.inbox_user(conn.principal)
        key = conn.device_id if conn.device_id is not None else session_key(conn.id)
        self.sockets[conn] = (user_id, key)
        self._write(self.presence.socket_opened(user_id, key))

    def on_close(self, conn: WsConnection) -> None:
        entry = self.sockets.pop(conn, None)
        if entry is not None:
            self._write(self.presence.socket_closed(*entry))

    def _write(self, coro: Coroutine[Any, Any, None]) -> None:
        # Tasks start in creation order, so an open and the close after it reach the presence in
        # that order. Not RelayState tasks: the drain cancels those, and a close must still land.
        task = asyncio.get_running_loop().create_task(coro)
        self._writes.add(task)
        task.add_done_callback(self._written)

    def _written(self, task: asyncio.Task[None]) -> None:
        self._writes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("presence change not written: %s", task.exception())

    # -- transitions -> frames ----------------------------------------------------------------
    def _on_transition(self, transition: Transition) -> None:
        if is_session(transition.device_key):
            return
        kind = "device.online" if transition.online else "device.offline"
        frame: Message = {"type": kind, "device_id": transition.device_key}
        exclude = transition.device_key if transition.online else None
        self._frames.append((transition.user_id, frame, exclude))
        self._wake.set()

    async def _publish_frames(self) -> None:
        """One publisher, so one node's frames keep the order of its transitions."""
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            await self._publish_pending()

    async def _publish_pending(self) -> None:
        delivery = inbox.for_state(self.state)
        while self._frames:
            user_id, frame, exclude = self._frames.popleft()
            try:
                await delivery.publish_ephemeral(user_id, frame, exclude)
            except BackendUnavailable:
                log.warning("%s not published: the broker is unavailable", frame["type"])

    # -- heartbeat request ----------------------------------------------------------------------
    def on_heartbeat(self, conn: WsConnection, message: Message) -> None:
        rid = request_id_of(message)
        entry = self.sockets.get(conn)
        if entry is None:
            _refuse(conn, rid, ErrorCode.VALIDATION_ERROR, "heartbeat is a /ws request")
            return
        try:
            parse_heartbeat(message)
        except ValueError as exc:
            _refuse(conn, rid, ErrorCode.VALIDATION_ERROR, str(exc))
            return
        now = now_ms()
        user_id, key = entry
        # A session ends with its socket, so a heartbeat cannot keep it online beyond that;
        # the metrics go with the devices issue (GET /devices), which has no column for them yet.
        if not is_session(key):
            self._write(self.presence.heartbeat(user_id, key))
            self.heartbeats.record(user_id, key, now)
        conn.send(
            {"type": "reply", "request_id": rid, "ok": True, "data": {"server_time": now // 1000}}
        )

    async def flush_heartbeats(self) -> None:
        await self.heartbeats.flush()

    # -- background -----------------------------------------------------------------------------
    async def _every(self, interval: float, job: Callable[[], Awaitable[None]]) -> None:
        name = getattr(job, "__name__", "job")
        # The flag, not only the cancellation, ends the loop: on Python 3.11 asyncio.wait_for
        # (inside redis-py) swallows a cancellation that races with its result.
        while not self._closed:
            await asyncio.sleep(interval)
            if self._closed:
                return
            started = time.monotonic()
            try:
                await job()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a background pass must never die
                log.warning("presence %s failed: %s", name, exc)
            if time.monotonic() - started > interval:
                log.warning("presence %s took longer than its interval", name)

    async def close(self) -> None:
        """Drain: every socket of this node counts as closed, then the last frames and heartbeat
        timestamps go out. ``Presence.close`` (an older closer, so it runs after this one) then
        writes what is queued and releases its connections."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        for conn in list(self.sockets):
            self.on_close(conn)
        if self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)
        self._publisher.cancel()
        await asyncio.gather(self._publisher, return_exceptions=True)
        try:
            await self._publish_pending()
        except Exception as exc:  # noqa: BLE001 - shutting down: say so, do not raise
            log.warning("presence frames lost at shutdown: %s", exc)
        try:
            await self.heartbeats.flush()
        except Exception as exc:  # noqa: BLE001
            log.warning("heartbeat timestamps lost at shutdown: %s", exc)


def _refuse(conn: WsConnection, rid: Any, code: ErrorCode, message: str) -> None:
    """A request with ``request_id`` gets a failed ``reply`` (realtime.md), else an ``error``."""
    if rid is None:
        conn.send(error_frame(code, message))
        return
    conn.send(
        {
            "type": "reply",
            "request_id": rid,
            "ok": False,
            "error": {"code": str(code), "message": message},
        }
    )


def install(state: RelayState) -> PresenceRelay:
    """Attach presence to ``state`` (from ``RelayState.__init__``, before any socket opens)."""
    relay = PresenceRelay(state)
    state.services.extras[EXTRAS_KEY] = relay
    return relay


def for_state(state: RelayState) -> PresenceRelay:
    relay = state.services.extras.get(EXTRAS_KEY)
    assert isinstance(relay, PresenceRelay) and relay.state is state, "presence not installed"
    return relay


__all__ = ["PresenceRelay", "for_state", "install"]
