"""HTTP publish (rest.md "Publish", the M-SYNC message broker): POST /publish fans out to sockets.

``POST /publish`` (scope ``publish``) appends a durable ``publish`` event to the target user's
inbox and answers 202 once it is committed (realtime.md guarantee 1): every ``/ws`` socket of
the user gets it live, and a device that is offline gets it on its next connect. The history row
(``published_messages``) and the idempotency reply are written in the same transaction as the
inbox entry, so a retried request with the same ``idempotency_key`` answers exactly the first
reply, never a second event.

Choices where the contract is silent:

* ``target.user_id`` other than the caller's own needs ``admin``; an unknown user is 404.
* ``type`` is the publisher's own label: 1-64 characters of ``[A-Za-z0-9_.:-]``.
* ``data`` may be any JSON value (object, array, string, number, bool, null); it is delivered
  exactly as published.
* ``ttl_s`` (1 s .. INBOX_RETENTION_S): the event is not delivered after it (sockets skip it);
  the history keeps it.
* The rate limit (RATE_PUBLISH, burst PUBLISH_BURST) counts per API token, or per user for a
  user JWT; every answer carries ``X-RateLimit-*`` headers.
* ``GET /publish/messages`` and ``/publish/stats`` need ``publish`` or ``subscribe`` (both are the
  M-SYNC scopes); history is newest first; ``since``/``until`` are ISO-8601 times.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from aiohttp import web

from api.authn import require_principal
from api.envelope import ok
from api.keys import SERVICES
from api.openapi import errors, json_ok
from api.pagination import Page
from api.validation import Body, query_int, read_json
from shared import idempotency, presence
from shared.clock import iso_ms, now_ms, parse_iso_ms
from shared.codes import ErrorCode
from shared.errors import ApiError, validation_error
from shared.inbox.store import NewEntry
from shared.inbox.writer import writer_for
from shared.principals import Principal
from shared.ratelimit import Limit
from shared.services import Services

routes = web.RouteTableDef()

PREFIX = "/api/v1/publish"
TYPE_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
DEVICE_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_IDEMPOTENCY_KEY = 128
STATS_MAX_DAYS = 30
LATENCY_SAMPLE = 10_000
DAY_MS = 86_400_000

_HISTORY_INSERT = (
    "INSERT INTO published_messages (id, user_id, type, data, target_device, publisher_user_id, token_id,"
    " cursor, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
)


def _publisher_key(principal: Principal) -> str:
    return f"token:{principal.token_id}" if principal.token_id else f"user:{principal.user_id}"


async def _target(request: web.Request, body: Body, principal: Principal) -> tuple[str, str | None]:
    raw = body.value("target", required=False)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise validation_error("target", "must be an object {user_id?, device_id?}")
    user_id = raw.get("user_id")
    device_id = raw.get("device_id")
    if user_id is not None and (not isinstance(user_id, str) or not 0 < len(user_id) <= 64):
        raise validation_error("target.user_id", "must be a user id")
    if device_id is not None and (
        not isinstance(device_id, str) or not DEVICE_PATTERN.match(device_id)
    ):
        raise validation_error("target.device_id", "must match [A-Za-z0-9_-]{1,64}")
    own = str(principal.user_id)
    if user_id is None or user_id == own:
        return own, device_id
    if not principal.has_scope("admin"):
        raise ApiError(
            ErrorCode.FORBIDDEN,
            "publishing to another user needs the 'admin' scope",
            {"scope": "admin"},
        )
    exists = await request.app[SERVICES].db.fetchval("SELECT 1 FROM users WHERE id = $1", user_id)
    if exists is None:
        raise ApiError(ErrorCode.NOT_FOUND, "no such user", {"field": "target.user_id"})
    return user_id, device_id


async def online_devices(services: Services, user_id: str) -> int:
    """The target's distinct devices with an open ``/ws`` on any node (a device-less session
    counts as one): the shared presence (``shared.presence``)."""
    return await presence.online_devices(services, user_id)


@routes.post(PREFIX)
async def publish(request: web.Request) -> web.StreamResponse:
    principal = await require_principal(request, "publish")
    if principal.user_id is None:
        raise ApiError(ErrorCode.FORBIDDEN, "only a user's credentials can publish")
    services = request.app[SERVICES]
    settings = services.settings
    publisher = _publisher_key(principal)
    decision = await services.limiter.hit(
        f"publish:{publisher}",
        Limit.of(settings.rate("rate_publish"), burst=settings.publish_burst),
    )
    decision.raise_if_denied("too many publishes; slow down")
    limit_headers = decision.headers

    body = await read_json(request)
    kind = body.string("type", min_len=1, max_len=64)
    if not TYPE_PATTERN.match(kind):
        raise validation_error("type", "must be 1-64 characters of [A-Za-z0-9_.:-]")
    if "data" not in body.data:
        raise validation_error("data", "is required")
    data_json = json.dumps(body.data["data"], separators=(",", ":"), ensure_ascii=False)
    if len(data_json.encode()) > settings.publish_max_bytes:
        raise ApiError(
            ErrorCode.PAYLOAD_TOO_LARGE,
            "encoded data too large",
            {"field": "data", "limit": settings.publish_max_bytes},
        )
    target_user, target_device = await _target(request, body, principal)
    ttl_s = body.integer("ttl_s", required=False, min=1, max=settings.inbox_retention_s)
    key = body.string("idempotency_key", required=False, min_len=1, max_len=MAX_IDEMPOTENCY_KEY)

    db = services.db
    now = now_ms()
    scope = f"publish:{publisher}"
    if key is not None:
        try:
            prior = await idempotency.claim(
                db, scope, key, now=now, ttl_ms=settings.idempotency_ttl_s * 1000
            )
        except idempotency.InProgress:
            raise ApiError(
                ErrorCode.CONFLICT,
                "a publish with this idempotency_key is still in progress",
                {"field": "idempotency_key"},
            ) from None
        if prior is not None:
            return ok(request, prior.body, status=prior.status, headers=limit_headers)

    message_id = "msg-" + uuid.uuid4().hex
    online = await online_devices(services, target_user)
    event = {
        "message_id": message_id,
        "type": kind,
        "data": body.data["data"],
        "publisher": {"user_id": principal.user_id, "token_id": principal.token_id},
        "created_at": iso_ms(now),
    }
    expires_at = now + ttl_s * 1000 if ttl_s else None
    reply: dict[str, Any] = {}

    def alongside(cursor: int) -> list[tuple[str, tuple[Any, ...]]]:
        # Runs inside the inbox batch's transaction: history and idempotent reply commit with it.
        reply.update(message_id=message_id, cursor=cursor, online_devices=online)
        statements = [(
            _HISTORY_INSERT,
            (message_id, target_user, kind, data_json, target_device, principal.user_id, principal.token_id,
             cursor, now, expires_at),
        )]  # fmt: skip
        if key is not None:
            statements.append(idempotency.reply_statement(scope, key, 202, reply))
        return statements

    entry = NewEntry(
        target_user,
        "publish",
        json.dumps(event, separators=(",", ":"), ensure_ascii=False),
        target_device=target_device,
        expires_at=expires_at,
        also=alongside,
    )
    try:
        cursor = await writer_for(services).append(entry)
    except BaseException:
        if key is not None:
            await idempotency.release(db, scope, key)
        raise
    reply.update(message_id=message_id, cursor=cursor, online_devices=online)
    return ok(request, reply, status=202, headers=limit_headers)


# -- history and stats ---------------------------------------------------------------------------


async def _reader(request: web.Request) -> str:
    principal = await require_principal(request)
    if not (principal.has_scope("publish") or principal.has_scope("subscribe")):
        raise ApiError(
            ErrorCode.FORBIDDEN,
            "this credential lacks the 'publish' or 'subscribe' scope",
            {"scope": "publish"},
        )
    if principal.user_id is None:
        raise ApiError(ErrorCode.FORBIDDEN, "only a user's credentials can read publish history")
    return principal.user_id


def _time_param(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    try:
        return parse_iso_ms(raw)
    except ValueError:
        raise validation_error(name, "must be an ISO-8601 time") from None


def render_message(row: Any) -> dict[str, Any]:
    return {
        "message_id": row["id"],
        "type": row["type"],
        "data": json.loads(row["data"]),
        "target": {"user_id": row["user_id"], "device_id": row["target_device"]},
        "publisher": {"user_id": row["publisher_user_id"], "token_id": row["token_id"]},
        "cursor": row["cursor"],
        "created_at": iso_ms(row["created_at"]),
        "expires_at": iso_ms(row["expires_at"]),
        "delivered_at": iso_ms(row["delivered_at"]),
    }


@routes.get(PREFIX + "/messages")
async def list_messages(request: web.Request) -> web.StreamResponse:
    user_id = await _reader(request)
    page = Page.from_request(request)
    kind = request.query.get("type")
    if kind is not None and not TYPE_PATTERN.match(kind):
        raise validation_error("type", "must be 1-64 characters of [A-Za-z0-9_.:-]")
    since, until = _time_param(request, "since"), _time_param(request, "until")
    # Newest first in inbox order: the cursor is the publish's place in the target's inbox, so
    # publishes within the same millisecond still come back in the order they were accepted.
    before = 2**62
    if page.after is not None:
        if (
            len(page.after) != 1
            or not isinstance(page.after[0], int)
            or isinstance(page.after[0], bool)
        ):
            raise validation_error("cursor", "is not a valid cursor")
        before = page.after[0]
    clauses = ["user_id = $1", "cursor < $2"]
    args: list[Any] = [user_id, before]
    for column, op, value in (
        ("type", "=", kind),
        ("created_at", ">=", since),
        ("created_at", "<", until),
    ):
        if value is not None:
            args.append(value)
            clauses.append(f"{column} {op} ${len(args)}")
    args.append(page.limit + 1)
    rows = await request.app[SERVICES].db.fetch(
        "SELECT id, user_id, type, data, target_device, publisher_user_id, token_id, cursor, created_at,"
        f" expires_at, delivered_at FROM published_messages WHERE {' AND '.join(clauses)}"
        f" ORDER BY cursor DESC LIMIT ${len(args)}",
        *args,
    )
    return ok(request, page.result(rows, lambda r: [r["cursor"]], render_message))


def _percentile(sorted_values: list[int], fraction: float) -> int | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


@routes.get(PREFIX + "/stats")
async def stats(request: web.Request) -> web.StreamResponse:
    user_id = await _reader(request)
    days = query_int(request, "days", 7, min=1, max=STATS_MAX_DAYS)
    services = request.app[SERVICES]
    db = services.db
    now = now_ms()
    start = (now // DAY_MS - days + 1) * DAY_MS  # whole UTC days, today included
    counts = await db.fetch(
        "SELECT created_at / 86400000 AS day, type, COUNT(*) AS n FROM published_messages"
        " WHERE user_id = $1 AND created_at >= $2 GROUP BY created_at / 86400000, type ORDER BY day, type",
        user_id,
        start,
    )
    lags = await db.fetch(
        "SELECT delivered_at - created_at AS lag FROM published_messages"
        " WHERE user_id = $1 AND created_at >= $2 AND delivered_at IS NOT NULL"
        " ORDER BY created_at DESC LIMIT $3",
        user_id,
        start,
        LATENCY_SAMPLE,
    )
    values = sorted(max(0, int(r["lag"])) for r in lags)
    by_type: dict[str, int] = {}
    by_day: dict[str, int] = {}
    rows = []
    for r in counts:
        day = (iso_ms(int(r["day"]) * DAY_MS) or "")[:10]
        n = int(r["n"])
        rows.append({"day": day, "type": r["type"], "count": n})
        by_type[r["type"]] = by_type.get(r["type"], 0) + n
        by_day[day] = by_day.get(day, 0) + n
    return ok(request, {
        "since": iso_ms(start),
        "total": sum(by_type.values()),
        "by_type": [{"type": t, "count": n} for t, n in sorted(by_type.items())],
        "by_day": [{"day": d, "count": n} for d, n in sorted(by_day.items())],
        "counts": rows,
        "delivery_latency_ms": {
            "samples": len(values),
            "p50": _percentile(values, 0.50),
            "p90": _percentile(values, 0.90),
            "p99": _percentile(values, 0.99),
            "max": values[-1] if values else None,
        },
        "online_clients": await online_devices(services, user_id),
    })  # fmt: skip


# -- OpenAPI -------------------------------------------------------------------------------------

_SECURITY: list[dict[str, list[str]]] = [{"userJwt": []}, {"apiToken": []}]
_MESSAGE = {
    "type": "object",
    "properties": {
        "message_id": {"type": "string"},
        "type": {"type": "string"},
        "data": {},
        "target": {"type": "object"},
        "publisher": {"type": "object"},
        "cursor": {"type": "integer"},
        "created_at": {"type": "string", "format": "date-time"},
        "expires_at": {"type": ["string", "null"], "format": "date-time"},
        "delivered_at": {"type": ["string", "null"], "format": "date-time"},
    },
}

OPENAPI: dict[str, dict[str, dict[str, Any]]] = {
    PREFIX: {
        "post": {
            "summary": "Publish a message to a user's sockets (durable `publish` event on /ws)",
            "tags": ["publish"],
            "description": "Scope `publish`. Answers 202 once the event is committed to the target's inbox. "
            "Another target user needs `admin`. `data` (any JSON) encoded must fit PUBLISH_MAX_BYTES (64 KiB), "
            "else 413. A repeated `idempotency_key` from the same token answers the first reply.",
            "security": _SECURITY,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {
                    "type": "object",
                    "required": ["type", "data"],
                    "properties": {
                        "type": {"type": "string", "pattern": TYPE_PATTERN.pattern},
                        "data": {},
                        "target": {"type": "object", "properties": {
                            "user_id": {"type": "string"}, "device_id": {"type": "string"}}},
                        "ttl_s": {"type": "integer", "minimum": 1},
                        "idempotency_key": {"type": "string", "maxLength": MAX_IDEMPOTENCY_KEY},
                    },
                }}},
            },
            "responses": {
                "202": json_ok("Accepted and durable.", {
                    "type": "object",
                    "required": ["message_id", "cursor", "online_devices"],
                    "properties": {
                        "message_id": {"type": "string"},
                        "cursor": {"type": "integer"},
                        "online_devices": {"type": "integer"},
                    },
                }),
                **errors(400, 401, 403, 404, 409, 413, 429, 503),
            },
        }
    },
    PREFIX + "/messages": {
        "get": {
            "summary": "History of what was published to the caller's user (newest first)",
            "tags": ["publish"],
            "security": _SECURITY,
            "parameters": [
                {"name": "type", "in": "query", "required": False, "schema": {"type": "string"}},
                {"name": "since", "in": "query", "required": False, "schema": {"type": "string", "format": "date-time"}},
                {"name": "until", "in": "query", "required": False, "schema": {"type": "string", "format": "date-time"}},
                {"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 200}},
                {"name": "cursor", "in": "query", "required": False, "schema": {"type": "string"}},
            ],
            "responses": {
                "200": json_ok("A page.", {"type": "object", "properties": {
                    "items": {"type": "array", "items": _MESSAGE},
                    "next_cursor": {"type": ["string", "null"]},
                }}),
                **errors(400, 401, 403),
            },
        }
    },
    PREFIX + "/stats": {
        "get": {
            "summary": "Counts by type and day, delivery latency percentiles, online clients",
            "tags": ["publish"],
            "security": _SECURITY,
            "parameters": [
                {"name": "days", "in": "query", "required": False,
                 "schema": {"type": "integer", "minimum": 1, "maximum": STATS_MAX_DAYS}},
            ],
            "responses": {"200": json_ok("Statistics."), **errors(400, 401, 403)},
        }
    },
}  # fmt: skip
