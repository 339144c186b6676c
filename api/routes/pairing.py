"""Pairing (rest.md "E2EE devices, books, pairing, relay"): a new device joins a book by a code.

``POST /pairing/generate`` (a member, for its book) → a six-digit code, live ``PAIRING_TTL_S``;
``POST /pairing/verify`` (the new device, with its own public key) → the generator's key, and the
caller is a member; ``POST /pairing/exchange`` (the generator) → how its code ended, and the new
device's key. The generator also gets ``{"type": "pairing.matched", "device_id", "public_key"}``
on its open ``/ws/relay/{book_id}`` sockets, on whichever node they are (``shared.device_notices``).
The codes live in ``shared.pairing`` (Redis when configured, else the ``pairing_codes`` table),
stored as HMAC digests, never as digits.

Choices where the contract is silent (also in ``OPENAPI``):

* Guess limits (``RATE_PAIRING_FAIL_DEVICE``, ``RATE_PAIRING_FAIL_IP``): both buckets are
  peeked first, so a locked-out caller gets 429 even with the right code; then one attempt is
  counted in each *before* the code is looked at, and only a counted attempt is evaluated. So
  concurrent requests cannot evaluate more guesses than the limit allows (counting on failure
  only, a burst would all pass the peek before any failure is counted). The price: a successful
  verification uses one unit too, harmless at one success per new device.
* Not a guess, not counted: a ``public_key`` other than the caller's registered key (400
  ``VALIDATION_ERROR``, checked first) and wrong JSON types.
* Answers: malformed (not exactly six ASCII digits), unknown, used → 400 ``INVALID_SHORT_CODE``;
  expired → 400 ``SHORT_CODE_EXPIRED`` (``details.expiry``) while its record is kept (5 minutes
  after the expiry), unknown after that; the generator's own code → ``INVALID_SHORT_CODE`` (a
  device cannot pair with itself; the code stays usable); a code whose generator is no longer a
  member of the book → ``INVALID_SHORT_CODE`` (the code stays dead); a token bound to another book
  → 403 ``FORBIDDEN`` (README "Device JWT"), the code stays usable.
* Joining: a new member row, or, for a device removed from the book earlier, the same row with
  ``removed_at`` cleared: pairing again is how a family takes back a phone it found. A current
  member may verify too (it stays a member; both sides learn each other's key again). The match,
  the join and the audit entry commit together (SQL store), or the match is undone when the join
  fails (Redis store).
* ``/pairing/exchange`` by any device other than the generator answers like an unknown code (400
  ``INVALID_SHORT_CODE``), not 403: a different answer would tell a guesser which codes are live.
  The generator must still be a member (403 ``FORBIDDEN`` otherwise). Its answer is kept for
  5 minutes after the match or the expiry, then the code is unknown.
* Audit (``shared.audit``, ids hashed, never a code): ``pairing.generated``, ``pairing.verified``
  (``details.joined``: new, rejoined or member), ``pairing.verify_failed`` (``details.reason``; only
  for evaluated guesses, so a flood of 429s writes nothing), ``pairing.exchanged`` when the
  answer is ``matched`` or ``expired`` (not for every ``pending`` poll).
* Generating retries another code on a collision with a kept record (up to ``GENERATE_TRIES``
  times, then 503: the space would have to be nearly full); the limit counts requests.
"""

from __future__ import annotations

import asyncio
import logging
import math
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from api.authn import client_ip
from api.book_access import forbidden_book, require_member
from api.envelope import ok
from api.keys import SERVICES
from api.openapi import errors, json_ok
from api.routes.devices import require_device
from api.validation import read_json
from shared import audit
from shared.books import is_member
from shared.clock import now_ms
from shared.codes import ErrorCode
from shared.device_notices import pairing_matched
from shared.errors import ApiError, validation_error
from shared.pairing import (
    LINGER_S,
    MATCHED,
    CodeStore,
    Outcome,
    PairingRecord,
    classify,
    new_code,
    open_code_store,
    well_formed,
)
from shared.ratelimit import Limit
from shared.secrets import hash_id
from shared.services import Services
from shared.store.base import Executor

routes = web.RouteTableDef()
log = logging.getLogger("switchboard.pairing")

PREFIX = "/api/v1/pairing"
CODE_STORE = web.AppKey("pairing.codes", CodeStore)
GENERATE_TRIES = 20
MAX_CODE_TEXT = 64  # longer is a VALIDATION_ERROR (a bounded body field), shorter a bad code
MAX_KEY_TEXT = 128


def iso_s(ms: int) -> str:
    """Unix ms -> ``"2026-02-03T10:35:00Z"`` (the seed's shape; expiries are whole seconds)."""
    return datetime.fromtimestamp(ms // 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def invalid_code(message: str = "unknown or already used pairing code") -> ApiError:
    return ApiError(ErrorCode.INVALID_SHORT_CODE, message)


def code_store(request: web.Request) -> CodeStore:
    return request.app[CODE_STORE]


# -- generate ------------------------------------------------------------------------------------


@routes.post(PREFIX + "/generate")
async def generate(request: web.Request) -> web.StreamResponse:
    await require_device(request)  # 401/403 before the body is looked at
    body = await read_json(request)
    book_id = body.string("book_id", min_len=1, max_len=MAX_CODE_TEXT)
    principal = await require_member(request, book_id)
    device_id = principal.device_id
    assert device_id is not None
    services = request.app[SERVICES]
    settings = services.settings
    spec = settings.rate("rate_pairing_generate")
    if not spec.unlimited:
        decision = await services.limiter.hit(
            f"pairing_generate:device:{device_id}", Limit.of(spec)
        )
        decision.raise_if_denied("too many pairing codes generated by this device")

    now = now_ms()
    ttl = settings.pairing_ttl_s
    expires_at = (math.ceil(now / 1000) + ttl) * 1000  # a whole second, shown exactly
    record = PairingRecord(
        book_id=book_id,
        device_id=device_id,
        created_at=now,
        expires_at=expires_at,
        keep_until=expires_at + LINGER_S * 1000,
    )
    store = code_store(request)
    for _ in range(GENERATE_TRIES):
        code = new_code()
        if await store.create(code, record):
            break
    else:
        log.error("no free pairing code found", extra={"tries": GENERATE_TRIES})
        raise ApiError(
            ErrorCode.SERVICE_UNAVAILABLE,
            "no free pairing code; retry shortly",
            headers={"Retry-After": "1"},
        )
    await audit.record(
        services.db,
        user_id=None,
        event="pairing.generated",
        ip=client_ip(request),
        subject=device_id,
        details={"book": hash_id(book_id)},
    )
    return ok(
        request,
        {"short_code": code, "expires_at": iso_s(expires_at), "ttl_seconds": ttl},
        status=201,
    )


# -- verify --------------------------------------------------------------------------------------


async def count_guess(services: Services, device_id: str, ip: str) -> None:
    """Peek both guess buckets (429 when either is full), then count this attempt in both."""
    settings = services.settings
    buckets = [
        (f"pairing_verify:device:{device_id}", "rate_pairing_fail_device", "this device"),
        (f"pairing_verify:ip:{hash_id(ip)}", "rate_pairing_fail_ip", "this address"),
    ]
    limits = []
    for key, setting, who in buckets:
        spec = settings.rate(setting)
        if not spec.unlimited:
            limits.append((key, Limit.of(spec), f"too many pairing attempts from {who}"))
    for key, limit, message in limits:
        (await services.limiter.peek(key, limit)).raise_if_denied(message)
    for key, limit, message in limits:
        (await services.limiter.hit(key, limit)).raise_if_denied(message)


async def join_book(tx: Executor, book_id: str, device_id: str, now: int) -> str:
    """Make ``device_id`` a current member: ``new``, ``rejoined`` (was removed) or ``member``."""
    removed = await tx.fetchrow(
        "SELECT removed_at FROM book_members WHERE book_id = $1 AND device_id = $2",
        book_id,
        device_id,
    )
    if removed is not None and removed["removed_at"] is None:
        return "member"
    await tx.execute(
        "INSERT INTO book_members (book_id, device_id, joined_at) VALUES ($1, $2, $3)"
        " ON CONFLICT (book_id, device_id) DO UPDATE SET removed_at = NULL,"
        " joined_at = excluded.joined_at WHERE book_members.removed_at IS NOT NULL",
        book_id,
        device_id,
        now,
    )
    return "new" if removed is None else "rejoined"


async def public_key_of(ex: Executor, device_id: str) -> str | None:
    key = await ex.fetchval("SELECT public_key FROM devices WHERE id = $1", device_id)
    return None if key is None else str(key)


@routes.post(PREFIX + "/verify")
async def verify(request: web.Request) -> web.StreamResponse:
    principal = await require_device(request)
    device_id = principal.device_id
    assert device_id is not None
    services = request.app[SERVICES]
    body = await read_json(request)
    short_code = body.string("short_code", max_len=MAX_CODE_TEXT)
    public_key = body.string("public_key", max_len=MAX_KEY_TEXT)
    if public_key != await public_key_of(services.db, device_id):
        raise validation_error("public_key", "must be this device's registered public key")
    ip = client_ip(request)
    await count_guess(services, device_id, ip)

    store = code_store(request)
    now = now_ms()
    outcome, reason = Outcome.UNKNOWN, "malformed"
    record: PairingRecord | None = None
    matched = False
    joined = ""
    peer_key: str | None = None
    if well_formed(short_code):
        try:
            async with services.db.transaction() as tx:
                record = await store.get(short_code, tx)
                outcome = classify(record, device_id, now, principal.book_id)
                reason = outcome.value
                if outcome is Outcome.CLAIMABLE:
                    assert record is not None
                    if not await is_member(tx, record.book_id, record.device_id):
                        outcome, reason = Outcome.UNKNOWN, "generator_not_member"
                    elif not await store.mark_matched(short_code, device_id, now, tx):
                        outcome, reason = Outcome.USED, "used"  # another verification won
                    else:
                        matched = True
                        peer_key = await public_key_of(tx, record.device_id)
                        joined = await join_book(tx, record.book_id, device_id, now)
                        await audit.record(
                            tx,
                            user_id=None,
                            event="pairing.verified",
                            ip=ip,
                            subject=device_id,
                            details={
                                "book": hash_id(record.book_id),
                                "peer": hash_id(record.device_id),
                                "joined": joined,
                            },
                        )
        except BaseException:
            if matched and record is not None and not store.transactional:
                # The join did not commit: give the code back (only if the match is still ours).
                try:
                    await asyncio.shield(store.unmark(short_code, device_id, record))
                except Exception:  # noqa: BLE001 - the first failure is the one to report
                    log.exception("could not release a pairing code after a failed join")
            raise

    if outcome is not Outcome.CLAIMABLE:
        await audit.record(
            services.db,
            user_id=None,
            event="pairing.verify_failed",
            ip=ip,
            subject=device_id,
            details={"reason": reason},
        )
        if outcome is Outcome.EXPIRED:
            assert record is not None
            raise ApiError(
                ErrorCode.SHORT_CODE_EXPIRED,
                "this pairing code has expired",
                {"expiry": iso_s(record.expires_at)},
            )
        if outcome is Outcome.OTHER_BOOK:
            raise ApiError(ErrorCode.FORBIDDEN, "this token is bound to another book")
        if outcome is Outcome.SELF:
            raise invalid_code("a device cannot verify its own pairing code")
        raise invalid_code()

    assert record is not None
    await pairing_matched(services, record.device_id, record.book_id, device_id, public_key)
    return ok(request, {"matched": True, "peer_public_key": peer_key, "book_id": record.book_id})


# -- exchange ------------------------------------------------------------------------------------


@routes.post(PREFIX + "/exchange")
async def exchange(request: web.Request) -> web.StreamResponse:
    principal = await require_device(request)
    device_id = principal.device_id
    assert device_id is not None
    services = request.app[SERVICES]
    body = await read_json(request)
    short_code = body.string("short_code", max_len=MAX_CODE_TEXT)
    record = await code_store(request).get(short_code) if well_formed(short_code) else None
    now = now_ms()
    if record is None or record.device_id != device_id or now >= record.keep_until:
        raise invalid_code("unknown pairing code")  # the same for someone else's code
    if principal.book_id is not None and principal.book_id != record.book_id:
        raise ApiError(ErrorCode.FORBIDDEN, "this token is bound to another book")
    if not await is_member(services.db, record.book_id, device_id):
        raise forbidden_book()

    data: dict[str, Any]
    if record.state == MATCHED and record.peer_device_id is not None:
        data = {
            "status": "matched",
            "peer_device_id": record.peer_device_id,
            "peer_public_key": await public_key_of(services.db, record.peer_device_id),
        }
    elif now >= record.expires_at:
        data = {"status": "expired"}
    else:
        data = {"status": "pending"}
    if data["status"] != "pending":
        await audit.record(
            services.db,
            user_id=None,
            event="pairing.exchanged",
            ip=client_ip(request),
            subject=device_id,
            details={"book": hash_id(record.book_id), "status": data["status"]},
        )
    return ok(request, data)


def setup(app: web.Application) -> None:
    services = app[SERVICES]
    store = open_code_store(services.settings, services.db, services.jwt_key)
    app[CODE_STORE] = store
    services.closers.append(store.close)


# -- OpenAPI -------------------------------------------------------------------------------------

_SECURITY: list[dict[str, list[str]]] = [{"deviceJwt": []}]
_CODE = {"type": "string", "pattern": "^[0-9]{6}$", "description": "six digits"}


def _body(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"type": "object", "required": required, "properties": properties}
            }
        },
    }


OPENAPI: dict[str, dict[str, dict[str, Any]]] = {
    PREFIX + "/generate": {
        "post": {
            "summary": "Generate a six-digit pairing code for a book",
            "description": (
                "A current member of book_id (device JWT, bound to that book if bound at all; "
                "else 403 FORBIDDEN). Six digits from a CSPRNG, unique among live codes, live "
                "PAIRING_TTL_S. Limited per device (RATE_PAIRING_GENERATE, 10 per hour)."
            ),
            "tags": ["e2ee"],
            "security": _SECURITY,
            "requestBody": _body({"book_id": {"type": "string"}}, ["book_id"]),
            "responses": {
                "201": json_ok(
                    "Created.",
                    {
                        "type": "object",
                        "required": ["short_code", "expires_at", "ttl_seconds"],
                        "properties": {
                            "short_code": _CODE,
                            "expires_at": {"type": "string", "format": "date-time"},
                            "ttl_seconds": {"type": "integer"},
                        },
                    },
                ),
                **errors(400, 401, 403, 429, 503),
            },
        }
    },
    PREFIX + "/verify": {
        "post": {
            "summary": "Verify a pairing code: join its book and learn the generator's key",
            "description": (
                "Any device JWT. public_key must be the caller's registered key (400 "
                "VALIDATION_ERROR, not counted as a guess). Malformed, unknown or used codes "
                "answer 400 INVALID_SHORT_CODE, expired ones 400 SHORT_CODE_EXPIRED. Attempts are "
                "limited per device (RATE_PAIRING_FAIL_DEVICE) and per IP (RATE_PAIRING_FAIL_IP), "
                "checked before the code: a locked-out caller gets 429 even with a right code. "
                "Single use: of two verifications of one code exactly one succeeds. The "
                "generator gets pairing.matched on its /ws/relay/{book_id} sockets."
            ),
            "tags": ["e2ee"],
            "security": _SECURITY,
            "requestBody": _body(
                {"short_code": _CODE, "public_key": {"type": "string"}},
                ["short_code", "public_key"],
            ),
            "responses": {
                "200": json_ok(
                    "Matched; the caller is a member of book_id.",
                    {
                        "type": "object",
                        "required": ["matched", "peer_public_key", "book_id"],
                        "properties": {
                            "matched": {"const": True},
                            "peer_public_key": {"type": "string"},
                            "book_id": {"type": "string"},
                        },
                    },
                ),
                **errors(400, 401, 403, 429),
            },
        }
    },
    PREFIX + "/exchange": {
        "post": {
            "summary": "The generator asks how its pairing code ended",
            "description": (
                "Only the generating device (any other device gets 400 INVALID_SHORT_CODE, as for "
                "an unknown code). Answers for 5 minutes after the match or the expiry."
            ),
            "tags": ["e2ee"],
            "security": _SECURITY,
            "requestBody": _body({"short_code": _CODE}, ["short_code"]),
            "responses": {
                "200": json_ok(
                    "The code's state.",
                    {
                        "type": "object",
                        "required": ["status"],
                        "properties": {
                            "status": {"enum": ["pending", "matched", "expired"]},
                            "peer_device_id": {"type": "string"},
                            "peer_public_key": {"type": "string"},
                        },
                    },
                ),
                **errors(400, 401, 403),
            },
        }
    },
}
