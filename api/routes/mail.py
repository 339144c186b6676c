"""Mail: runs this worker's outbox sender for the app's lifetime (``POST /email/test`` comes later).

The sender is stored in ``services.extras["mailer"]`` so handlers can ``wake_sender(services)``
after committing a transaction that enqueued mail.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from api.keys import SERVICES
from shared.mail import MAILER_KEY
from shared.mail.sender import OutboxSender

routes = web.RouteTableDef()
OPENAPI: dict[str, dict[str, dict[str, Any]]] = {}


async def _outbox_sender(app: web.Application) -> AsyncIterator[None]:
    services = app[SERVICES]
    sender = OutboxSender(services)
    sender.start()
    services.extras[MAILER_KEY] = sender
    try:
        yield
    finally:
        # Shutdown: flush what is due (bounded), then stop.
        services.extras.pop(MAILER_KEY, None)
        await sender.close()


def setup(app: web.Application) -> None:
    app.cleanup_ctx.append(_outbox_sender)
