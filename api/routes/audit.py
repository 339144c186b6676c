"""Audit export (rest.md "Audit") and the background prune that keeps 90 days.

``GET /audit/export`` streams the caller's own entries as JSON lines, oldest first (newest last),
read in keyset batches so an account with many entries never sits in memory at once. Each line is
``{id, event, created_at, ip_hash, subject_hash, details}``: IPs and subjects only as hashes.
Who: a user access JWT, or an API token with ``admin`` (the same rule as token management).

Every worker runs the hourly prune; the DELETE is idempotent, so several at once are harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from api.authn import require_account_manager
from api.envelope import API_VERSION, REQUEST_ID_KEY
from api.keys import SERVICES
from api.openapi import errors
from shared import audit
from shared.clock import iso_ms
from shared.store.base import Database, Row

routes = web.RouteTableDef()
log = logging.getLogger("switchboard.audit")

BATCH = 500
PRUNE_INTERVAL_S = 3600.0


def _line(row: Row) -> bytes:
    entry = {
        "id": row["id"],
        "event": row["event"],
        "created_at": iso_ms(row["created_at"]),
        "ip_hash": row["ip_hash"],
        "subject_hash": row["subject_hash"],
        "details": json.loads(row["details"]),
    }
    return json.dumps(entry, separators=(",", ":")).encode() + b"\n"


@routes.get("/api/v1/audit/export")
async def export(request: web.Request) -> web.StreamResponse:
    principal = await require_account_manager(request)
    db = request.app[SERVICES].db

    async def batch(after: int) -> list[Row]:
        return await db.fetch(
            "SELECT id, event, created_at, ip_hash, subject_hash, details FROM audit_log"
            " WHERE user_id = $1 AND id > $2 ORDER BY id LIMIT $3",
            principal.user_id,
            after,
            BATCH,
        )

    # The first batch is read before the headers go out, so a failing store still gets the
    # error envelope rather than a truncated 200.
    rows = await batch(0)
    response = web.StreamResponse(
        headers={
            "Content-Type": "application/x-ndjson",
            "Content-Disposition": 'attachment; filename="audit.ndjson"',
            "API-Version": API_VERSION,
            "X-Request-ID": request[REQUEST_ID_KEY],
        }
    )
    await response.prepare(request)
    while rows:
        await response.write(b"".join(_line(r) for r in rows))
        if len(rows) < BATCH:
            break
        rows = await batch(rows[-1]["id"])
    await response.write_eof()
    return response


async def _prune_forever(db: Database) -> None:
    while True:
        try:
            removed = await audit.prune(db)
            if removed:
                log.info(
                    "pruned %d audit entries older than %d days", removed, audit.RETENTION_DAYS
                )
        except Exception:  # noqa: BLE001 - a failed round is retried next hour; the loop must live
            log.exception("audit prune failed")
        await asyncio.sleep(PRUNE_INTERVAL_S)


async def _pruner(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(_prune_forever(app[SERVICES].db))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def setup(app: web.Application) -> None:
    app.cleanup_ctx.append(_pruner)


_LINE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "event": {
            "type": "string",
            "description": "e.g. auth.login, auth.login_failed, token.revoked",
        },
        "created_at": {"type": "string", "format": "date-time"},
        "ip_hash": {
            "type": ["string", "null"],
            "description": "SHA-256 of the client IP, truncated",
        },
        "subject_hash": {"type": ["string", "null"]},
        "details": {"type": "object"},
    },
}

OPENAPI: dict[str, dict[str, dict[str, Any]]] = {
    "/api/v1/audit/export": {
        "get": {
            "summary": "The caller's own audit entries (last 90 days) as JSON lines",
            "description": "One JSON object per line, oldest first. Needs a user access JWT or an API token with the "
            "admin scope. Not enveloped.",
            "tags": ["audit"],
            "security": [{"userJwt": []}, {"apiToken": []}],
            "responses": {
                "200": {
                    "description": "JSON lines.",
                    "content": {"application/x-ndjson": {"schema": _LINE_SCHEMA}},
                },
                **errors(401, 403),
            },
        }
    },
}
