"""Start and stop the one-port server: relay sockets and the aiohttp REST app on one listener.

``start_server`` opens the services, builds the app, sets up aiohttp's request handler factory
(without a site: the relay's ``HeadReader`` hands connections to it) and listens. ``RunningServer
.close()`` is the drain of README.md "Operations", idempotent:

1. stop accepting; heads completed from now on get 503, unfinished ones are closed;
2. every open socket gets close 1001 (reconnect elsewhere), one registry shard per loop iteration;
   sockets still open after half the remaining budget are aborted;
3. aiohttp finishes in-flight requests and runs its cleanup contexts (mail flush and the like);
4. the services (store, broker, limiter, blobs) close.

``serve`` runs that until SIGTERM/SIGINT, within ``SHUTDOWN_TIMEOUT_S``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import ssl
from collections.abc import Callable

from aiohttp import web

from api.app import create_app
from relay import device_notices, revocation
from relay.handoff import HeadReader
from relay.state import RelayState
from shared.codes import CloseCode
from shared.config import Settings
from shared.services import Authenticator, Services, open_services

log = logging.getLogger("switchboard.server")

AppFactory = Callable[[Services], web.Application]


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    if not (settings.tls_cert_file and settings.tls_key_file):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    context.set_alpn_protocols(["http/1.1"])
    return context


class RunningServer:
    """A listening server; ``close()`` drains it (safe to call more than once)."""

    def __init__(
        self,
        settings: Settings,
        services: Services,
        app: web.Application,
        runner: web.AppRunner,
        state: RelayState,
        server: asyncio.Server,
    ) -> None:
        self.settings = settings
        self.services = services
        self.app = app
        self.runner = runner
        self.state = state
        self.server = server
        self._port = int(server.sockets[0].getsockname()[1])
        self._closing: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        return self._port

    async def close(self) -> None:
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.shutdown_timeout_s
        state = self.state
        state.draining = True
        self.server.close()
        for reader in list(state.pending):
            reader.close()
        # Shard by shard, yielding to the loop in between (relay.registry): with tens of
        # thousands of sockets the close frames already written go out while the rest are closed.
        await state.registry.close_all(CloseCode.GOING_AWAY)
        # Half the budget for the closing handshakes, the rest for aiohttp and the backends.
        if not await state.registry.wait_empty(max(0.1, (deadline - loop.time()) / 2)):
            state.registry.abort_all()
        for task in list(state.tasks):
            task.cancel()
        try:
            await state.hub.close()
            await self.runner.cleanup()
        finally:
            await self.services.close()


async def start_server(
    settings: Settings,
    *,
    services: Services | None = None,
    app_factory: AppFactory = create_app,
    authenticator: Authenticator | None = None,
) -> RunningServer:
    """Open services (unless given), build the app, listen on ``settings.host:port``.

    ``authenticator`` replaces the one the API installs (tests use a stub).
    """
    services = services or await open_services(settings)
    try:
        app = app_factory(services)
        runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,  # api.routes.ops writes its own access line per request
            shutdown_timeout=max(0.5, settings.shutdown_timeout_s / 2),
            max_line_size=settings.max_head_bytes,
            max_field_size=settings.max_head_bytes,
        )
        await runner.setup()
    except BaseException:
        await services.close()
        raise
    if authenticator is not None:
        services.authenticator = authenticator
    http_server = runner.server
    assert http_server is not None
    state = RelayState(settings, services, http_server)
    services.extras["relay.state"] = state
    loop = asyncio.get_running_loop()
    try:
        await state.hub.start()
        await revocation.install(state)
        await device_notices.install(state)
    except BaseException:
        await runner.cleanup()
        await services.close()
        raise
    context = tls_context(settings)
    try:
        server = await loop.create_server(
            lambda: HeadReader(state),
            host=settings.host,
            port=settings.port,
            reuse_port=settings.workers > 1 or None,
            ssl=context,
            # The TLS handshake counts against the same budget as the HTTP one.
            ssl_handshake_timeout=settings.handshake_timeout_s if context is not None else None,
            backlog=2048,
        )
    except BaseException:
        await runner.cleanup()
        await services.close()
        raise
    for sock in server.sockets:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return RunningServer(settings, services, app, runner, state, server)


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then drain within ``SHUTDOWN_TIMEOUT_S``."""
    running = await start_server(settings)
    log.info(
        "listening",
        extra={"host": settings.host, "port": running.port, "tls": bool(settings.tls_cert_file)},
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("draining")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        try:
            await asyncio.wait_for(running.close(), settings.shutdown_timeout_s)
        except TimeoutError:
            log.warning("drain did not finish within SHUTDOWN_TIMEOUT_S; exiting anyway")
