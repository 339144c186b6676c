"""Books (rest.md "E2EE devices, books, pairing, relay"): creation, members, the operator's tier.

A book is the unit of E2EE sharing: its member devices exchange ciphertext through
``/ws/relay/{book_id}``; the server knows only who is a member. The creating device becomes the
first member in the same transaction; others join by pairing.

* ``POST /books``: any device JWT may create a book, bound to a book or not (the binding limits
  which existing book the token acts on; creating a new one touches none). Other credentials get
  403 ``FORBIDDEN``. Limited per device (``RATE_BOOK_CREATE``). No body is needed; one sent is
  ignored.
* ``GET /books/{book_id}/devices`` (member): the seed's shape, not the paginated one,
  ``{devices: [{device_id, public_key, last_active_at, is_current}], total_count}``; current
  members only, in the order they joined; ``is_current`` marks the caller.
* ``DELETE /books/{book_id}/devices/{device_id}`` (member): any member may remove any member,
  itself included (leaving the book), as a family removes a lost phone. 204; 404
  ``DEVICE_NOT_FOUND`` when that device is not a current member. ``book_members.removed_at`` is
  set and an audit entry (``book.device_removed``) is written in the same transaction; after the
  commit a ``book_device`` revocation notice (``shared.revocation``) makes every node send the
  device's sockets on this book ``{"type": "device.removed"}`` and close them 1008. Its JWTs stop
  working for the book at once: membership is read on every request and socket upgrade
  (``api.book_access.require_member``).
* ``PATCH /books/{book_id}`` ``{tier: "free"|"paid"}`` (operator: a user access JWT or API token
  holding ``admin``; anyone else 403): the tier selects the paid figures of the seed's per-device
  limits (``api.book_access.hit_device_limit``). → ``{book_id, tier}``; 404 ``BOOK_NOT_FOUND``;
  audited (``book.tier_changed``).

Outsiders (not a current member, an unknown book, a token bound to another book) get 403
``FORBIDDEN`` alike on the member routes: book ids are capabilities (``api.book_access``). The
operator route answers 404 for an unknown book: an operator may know which books exist.
Audit entries carry no raw ids: the subject (the removed device, the book) is hashed by
``audit.record`` and the other ids in ``details`` by ``hash_id``.
"""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from api.authn import client_ip, require_principal
from api.book_access import TIERS, require_member
from api.envelope import ok
from api.keys import SERVICES
from api.openapi import errors, json_ok
from api.routes.devices import require_device
from api.validation import read_json
from shared import audit, revocation
from shared.clock import iso_ms, now_ms
from shared.codes import ErrorCode
from shared.errors import ApiError, validation_error
from shared.principals import Principal
from shared.ratelimit import Limit
from shared.secrets import hash_id

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


@routes.get(PREFIX + "/{book_id}/devices")
async def list_devices(request: web.Request) -> web.StreamResponse:
    book_id = request.match_info["book_id"]
    principal = await require_member(request, book_id)
    rows = await request.app[SERVICES].db.fetch(
        "SELECT d.id, d.public_key, d.last_active_at FROM book_members m"
        " JOIN devices d ON d.id = m.device_id"
        " WHERE m.book_id = $1 AND m.removed_at IS NULL ORDER BY m.joined_at, d.id",
        book_id,
    )
    devices = [
        {
            "device_id": row["id"],
            "public_key": row["public_key"],
            "last_active_at": iso_ms(row["last_active_at"]),
            "is_current": row["id"] == principal.device_id,
        }
        for row in rows
    ]
    return ok(request, {"devices": devices, "total_count": len(devices)})


@routes.delete(PREFIX + "/{book_id}/devices/{device_id}")
async def remove_device(request: web.Request) -> web.StreamResponse:
    book_id = request.match_info["book_id"]
    device_id = request.match_info["device_id"]
    principal = await require_member(request, book_id)
    assert principal.device_id is not None  # require_member checked it
    services = request.app[SERVICES]
    async with services.db.transaction() as tx:
        removed = await tx.execute(
            "UPDATE book_members SET removed_at = $3"
            " WHERE book_id = $1 AND device_id = $2 AND removed_at IS NULL",
            book_id,
            device_id,
            now_ms(),
        )
        if not removed:
            raise ApiError(
                ErrorCode.DEVICE_NOT_FOUND,
                "that device is not a member of this book",
                {"device_id": device_id},
            )
        await audit.record(
            tx,
            user_id=None,
            event="book.device_removed",
            ip=client_ip(request),
            subject=device_id,
            details={
                "book": hash_id(book_id),
                "by_device": hash_id(principal.device_id),
                "self": device_id == principal.device_id,
            },
        )
    await revocation.book_device_removed(services, book_id, device_id)
    return ok(request, status=204)


async def require_operator(request: web.Request) -> Principal:
    """A user access JWT or an API token holding ``admin`` (ADMIN_EMAILS operators)."""
    principal = await require_principal(request)
    if principal.kind in ("user", "api_token") and principal.has_scope("admin"):
        return principal
    raise ApiError(
        ErrorCode.FORBIDDEN,
        "changing a book's tier needs the 'admin' scope (instance operators)",
        {"scope": "admin"},
    )


@routes.patch(PREFIX + "/{book_id}")
async def set_tier(request: web.Request) -> web.StreamResponse:
    principal = await require_operator(request)
    book_id = request.match_info["book_id"]
    body = await read_json(request)
    tier = body.string("tier", max_len=16)
    if tier not in TIERS:
        raise validation_error("tier", f"must be one of {', '.join(TIERS)}")
    services = request.app[SERVICES]
    async with services.db.transaction() as tx:
        previous = await tx.fetchval("SELECT tier FROM books WHERE id = $1", book_id)
        if previous is None:
            raise ApiError(ErrorCode.BOOK_NOT_FOUND, "no such book")
        await tx.execute("UPDATE books SET tier = $2 WHERE id = $1", book_id, tier)
        await audit.record(
            tx,
            user_id=principal.user_id,
            event="book.tier_changed",
            ip=client_ip(request),
            subject=book_id,
            details={"tier": tier, "previous": str(previous)},
        )
    return ok(request, {"book_id": book_id, "tier": tier})


# -- OpenAPI -------------------------------------------------------------------------------------

_BOOK_ID = {"name": "book_id", "in": "path", "required": True, "schema": {"type": "string"}}
_DEVICE_ID = {"name": "device_id", "in": "path", "required": True, "schema": {"type": "string"}}
_MEMBER = (
    " Needs a device JWT of a current member, bound to this book if bound at all; anything else "
    "(an outsider, an unknown book, a token bound to another book) is 403 FORBIDDEN."
)
_DEVICE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["device_id", "public_key", "last_active_at", "is_current"],
    "properties": {
        "device_id": {"type": "string"},
        "public_key": {"type": "string", "description": "raw Ed25519 key, standard base64"},
        "last_active_at": {
            "type": ["string", "null"],
            "format": "date-time",
            "description": "ISO-8601 UTC",
        },
        "is_current": {"type": "boolean", "description": "this is the calling device"},
    },
}

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
    PREFIX + "/{book_id}": {
        "patch": {
            "summary": "Set a book's tier (operators)",
            "description": (
                "A user access JWT or API token holding the admin scope (ADMIN_EMAILS operators); "
                "anyone else 403 FORBIDDEN. `paid` selects the paid figures of the per-device limits "
                "(RATE_PHOTO_UPLOAD_PAID, RATE_PHOTO_GET_PAID, RATE_RELAY_SEND_PAID). A tier other "
                "than free or paid is 400 VALIDATION_ERROR; an unknown book 404 BOOK_NOT_FOUND. Audited."
            ),
            "tags": ["e2ee"],
            "security": [{"userJwt": []}, {"apiToken": []}],
            "parameters": [_BOOK_ID],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["tier"],
                            "properties": {"tier": {"type": "string", "enum": list(TIERS)}},
                        }
                    }
                },
            },
            "responses": {
                "200": json_ok(
                    "The book's tier now.",
                    {
                        "type": "object",
                        "required": ["book_id", "tier"],
                        "properties": {
                            "book_id": {"type": "string"},
                            "tier": {"type": "string", "enum": list(TIERS)},
                        },
                    },
                ),
                **errors(400, 401, 403, 404),
            },
        }
    },
    PREFIX + "/{book_id}/devices": {
        "get": {
            "summary": "The book's member devices (the seed's shape, not paginated)",
            "description": "Current members only, in the order they joined; is_current marks the caller."
            + _MEMBER,
            "tags": ["e2ee"],
            "security": [{"deviceJwt": []}],
            "parameters": [_BOOK_ID],
            "responses": {
                "200": json_ok(
                    "The members.",
                    {
                        "type": "object",
                        "required": ["devices", "total_count"],
                        "properties": {
                            "devices": {"type": "array", "items": _DEVICE_SCHEMA},
                            "total_count": {"type": "integer"},
                        },
                    },
                ),
                **errors(401, 403),
            },
        }
    },
    PREFIX + "/{book_id}/devices/{device_id}": {
        "delete": {
            "summary": "Remove a device from the book (a lost phone, or leaving)",
            "description": (
                "Any member may remove any member, itself included; audited. Its JWTs stop working for "
                'this book at once; its /ws/relay/{book_id} sockets on every node get {"type": '
                '"device.removed"} and close 1008 within 1 s. 404 DEVICE_NOT_FOUND when that device '
                "is not a current member." + _MEMBER
            ),
            "tags": ["e2ee"],
            "security": [{"deviceJwt": []}],
            "parameters": [_BOOK_ID, _DEVICE_ID],
            "responses": {"204": {"description": "Removed."}, **errors(401, 403, 404)},
        }
    },
}
