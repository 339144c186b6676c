"""Who may act on a book over REST, and the Home Pocket seed's per-device limits.

Every book-scoped route (metadata, snapshots, pairing, relay/send, photos) starts with
``require_member``: an E2EE device JWT, bound to this book if bound at all, of a device that is a
current member. The membership is read from the store on every request, so a removed device's
tokens stop working for the book at once (rest.md ``DELETE /books/{book_id}/devices/{device_id}``).

A book nobody may see and a book that does not exist answer alike to outsiders (403
``FORBIDDEN``): book ids are capabilities, and a 404 would confirm that one exists.
"""

from __future__ import annotations

from aiohttp import web

from api.keys import SERVICES
from api.routes.devices import require_device
from shared.books import is_member
from shared.codes import ErrorCode
from shared.errors import ApiError
from shared.principals import Principal
from shared.ratelimit import Limit
from shared.store.base import Executor

TIERS = ("free", "paid")


def forbidden_book() -> ApiError:
    return ApiError(ErrorCode.FORBIDDEN, "this device is not a member of that book")


async def require_member(request: web.Request, book_id: str) -> Principal:
    """The calling device, a current member of ``book_id`` (403 ``FORBIDDEN`` otherwise)."""
    principal = await require_device(request)
    if principal.book_id is not None and principal.book_id != book_id:
        raise ApiError(ErrorCode.FORBIDDEN, "this token is bound to another book")
    assert principal.device_id is not None  # require_device checked it
    if not await is_member(request.app[SERVICES].db, book_id, principal.device_id):
        raise forbidden_book()
    return principal


async def book_tier(db: Executor, book_id: str) -> str:
    tier = await db.fetchval("SELECT tier FROM books WHERE id = $1", book_id)
    return str(tier) if tier is not None else "free"


async def hit_device_limit(
    request: web.Request, setting: str, device_id: str, book_id: str, what: str
) -> None:
    """Count one ``setting`` event for ``device_id`` (the ``*_paid`` figure on a paid book).

    Raises 429 ``RATE_LIMIT_EXCEEDED`` with the contract's headers when the device is over it;
    an ``unlimited`` setting counts nothing. The key is per device, not per book: the seed's
    table limits what one device does, and a device in two books must not get twice the quota.
    Each tier counts in its own bucket, so a book turned paid gets the paid quota at once.
    """
    services = request.app[SERVICES]
    tier = await book_tier(services.db, book_id)
    name = f"{setting}_paid" if tier == "paid" else setting
    spec = services.settings.rate(name)
    if spec.unlimited:
        return
    decision = await services.limiter.hit(f"{name}:device:{device_id}", Limit.of(spec))
    decision.raise_if_denied(f"too many {what} from this device")
