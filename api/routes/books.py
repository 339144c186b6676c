"""Books (rest.md "E2EE devices, books, pairing, relay"): ``POST /books``.

A book is the unit of E2EE sharing: its member devices exchange ciphertext through
``/ws/relay/{book_id}``; the server knows only who is a member. The creating device becomes the
first member in the same transaction; others join by pairing (a later issue).

Any device JWT may create a book, bound to a book or not (the binding limits which existing book
the token acts on; creating a new one touches none). Other credentials get 403 ``FORBIDDEN``.
Limited per device (``RATE_BOOK_CREATE``). No request body is needed; one sent is ignored.
"""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from api.envelope import ok
from api.keys import SERVICES
from api.openapi import errors, json_ok
from api.routes.devices import require_device
from shared.clock import now_ms
from shared.ratelimit import Limit

routes = web.RouteTableDef()

PREFIX = "/api/v1/books"


@routes.post(PREFIX)
async def create_book(request: web.Request) -> web.StreamResponse:
    principal = await require_device(request)
    services = request.app[SERVICES]
    device_id = principal.device_id
    decision = await services.limiter.hit(
        f"book_create:device:{device_id}", Limit.of(services.settings.rate("rate_book_create"))
    )
    decision.raise_if_denied("too many books created by this device")
    book_id = str(uuid.uuid4())
    now = now_ms()
    async with services.db.transaction() as tx:
        await tx.execute(
            "INSERT INTO books (id, created_by_device, created_at) VALUES ($1, $2, $3)",
            book_id,
            device_id,
            now,
        )
        await tx.execute(
            "INSERT INTO book_members (book_id, device_id, joined_at) VALUES ($1, $2, $3)",
            book_id,
            device_id,
            now,
        )
    return ok(request, {"book_id": book_id}, status=201)


OPENAPI: dict[str, dict[str, dict[str, Any]]] = {
    PREFIX: {
        "post": {
            "summary": "Create a book; the calling device becomes its first member",
            "description": (
                "Any E2EE device JWT (with or without a book_id binding); other credentials get 403 FORBIDDEN. "
                "No body is needed. Limited per device (RATE_BOOK_CREATE)."
            ),
            "tags": ["e2ee"],
            "security": [{"deviceJwt": []}],
            "responses": {
                "201": json_ok(
                    "Created.",
                    {
                        "type": "object",
                        "required": ["book_id"],
                        "properties": {"book_id": {"type": "string"}},
                    },
                ),
                **errors(401, 403, 429),
            },
        }
    },
}
