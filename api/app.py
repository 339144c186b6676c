"""``create_app(services) -> web.Application``: the REST shell's factory.

Route modules each expose ``routes: web.RouteTableDef``; adding a module means adding it to
``ROUTE_MODULES``. The relay hands non-WebSocket connections to this app (see relay/handoff.py).
"""

from __future__ import annotations

import importlib

from aiohttp import web

from api.keys import MAX_BODY, SERVICES
from api.middleware import envelope_middleware
from shared.services import Services

ROUTE_MODULES: tuple[str, ...] = (
    "api.routes.ops",
    "api.routes.auth",
    "api.routes.tokens",
    "api.routes.audit",
    "api.routes.blobs",
    "api.routes.mail",
    "api.routes.devices",
    "api.routes.books",
    "api.routes.pairing",
    "api.routes.publish",
    "api.routes.book_history",
    "api.routes.photos",
)


def create_app(services: Services) -> web.Application:
    settings = services.settings
    # client_max_size bounds what request.read()/json() accept; larger bodies answer 413 in the
    # envelope. Multipart endpoints (photos) stream and enforce their own limits.
    app = web.Application(
        middlewares=[envelope_middleware], client_max_size=settings.max_body_bytes
    )
    app[SERVICES] = services
    app[MAX_BODY] = settings.max_body_bytes
    for name in ROUTE_MODULES:
        module = importlib.import_module(name)
        app.add_routes(module.routes)
        setup = getattr(module, "setup", None)
        if setup is not None:
            setup(app)
    return app
