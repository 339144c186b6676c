"""``RelayState``: what every connection of one listening server shares.

One instance per ``start_server``: the settings and services, the registry of open sockets, the
handlers of ``/ws`` message types, the aiohttp protocol factory for hand-offs, the drain flag and
the per-IP count of unfinished handshakes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from relay import presence, refresh
from relay.hub import Hub
from relay.protocol import Message, pong_frame
from relay.registry import ConnectionRegistry
from shared.config import Settings
from shared.services import Services

if TYPE_CHECKING:
    from relay.connection import WsConnection
    from relay.handoff import HeadReader

log = logging.getLogger("switchboard.relay")

# A handler may answer synchronously (``conn.send(...)``) or return an awaitable, which runs as a
# task tracked by the state (so shutdown can cancel it).
Handler = Callable[["WsConnection", Message], Awaitable[None] | None]
Hook = Callable[["WsConnection"], None]


def _ping(conn: WsConnection, message: Message) -> None:
    conn.send(pong_frame(message))


class RelayState:
    __slots__ = (
        "settings",
        "services",
        "registry",
        "handlers",
        "on_open",
        "on_close",
        "http_factory",
        "draining",
        "handshakes",
        "pending",
        "tasks",
        "hub",
    )

    def __init__(
        self, settings: Settings, services: Services, http_factory: Callable[[], asyncio.Protocol]
    ) -> None:
        self.settings = settings
        self.services = services
        self.registry: ConnectionRegistry[WsConnection] = ConnectionRegistry()
        self.handlers: dict[str, Handler] = {"ping": _ping}
        self.on_open: list[Hook] = []  # run in WsConnection.start(), before the first frame
        self.on_close: list[Hook] = []
        self.http_factory = http_factory
        self.draining = False
        self.handshakes: dict[str, int] = {}  # client IP -> unfinished handshakes
        self.pending: set[HeadReader] = set()  # connections whose first request is not routed yet
        self.tasks: set[asyncio.Task[Any]] = set()
        refresh.install(self)  # credential refresh + expiry (4001) on every socket
        # Channel membership and fan-out; a socket leaves every channel when it goes.
        self.hub = Hub(services.broker, outbound_limit=settings.ws_outbound_limit_bytes)
        self.on_close.append(self.hub.unsubscribe_all)
        presence.install(self)  # /ws presence: hooks, the heartbeat request, refresh and sweep

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coro`` as a task the state keeps a reference to until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("relay task failed", exc_info=task.exception())

    # -- unfinished handshakes per client IP ----------------------------------------------------
    def acquire_handshake(self, ip: str) -> bool:
        count = self.handshakes.get(ip, 0)
        if count >= self.settings.max_handshakes_per_ip:
            return False
        self.handshakes[ip] = count + 1
        return True

    def release_handshake(self, ip: str) -> None:
        count = self.handshakes.get(ip, 0) - 1
        if count > 0:
            self.handshakes[ip] = count
        else:
            self.handshakes.pop(ip, None)
