"""A book's history over REST (rest.md "E2EE devices, books, pairing, relay").

* ``POST /relay/send`` ``{book_id, type, payload, timestamp, id?}`` → ``{seq}``: the same path as
  a socket op (``shared.books.ops.BookOps``): validated alike, numbered alike, relayed to the
  book's connected devices alike, op-id re-sends answered with the first seq. ``type`` must be
  ``crdt_operation``. Limited per device by the seed's table (``RATE_RELAY_SEND``, paid tier
  ``RATE_RELAY_SEND_PAID``).
* ``GET /books/{book_id}/sync_status``: counts and times only, never a payload.
* ``PUT /books/{book_id}/snapshot`` (multipart: ``metadata`` ``{seq, base_snapshot_seq}`` then
  ``file``), compare-and-swap on the current snapshot's seq: 409 ``CONFLICT`` when
  ``base_snapshot_seq`` is not the current one (``null`` for the first). ``seq`` must be above
  the base and at most the book's head (a snapshot covers ops that exist). The file streams to
  the blob store under a server-made key; a losing upload is deleted. ``GET`` answers
  ``{seq, download_url, size_bytes, created_at}`` or 404 ``NOT_FOUND``. Ops up to ``seq`` become
  droppable: the next prune pass (``BOOK_PRUNE_INTERVAL_S``) drops them, and a device that asks
  for older history gets ``reset`` with ``snapshot_seq``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import BodyPartReader, web

from api.book_access import hit_device_limit, require_member
from api.envelope import ok
from api.keys import SERVICES
from api.openapi import errors, json_ok
from api.validation import read_json
from shared.books import history
from shared.books.ops import (
    MAX_OP_ID,
    NotAccepted,
    book_ops_for,
    decode_payload,
    valid_op_id,
    valid_timestamp,
)
from shared.clock import iso_ms, now_ms
from shared.codes import ErrorCode
from shared.errors import ApiError, BlobTooLarge, validation_error

routes = web.RouteTableDef()

METADATA_MAX = 4096  # bytes of the snapshot's metadata part
CHUNK = 64 * 1024


@routes.post("/api/v1/relay/send")
async def relay_send(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    book_id = body.string("book_id", min_len=1, max_len=64)
    principal = await require_member(request, book_id)
    device_id = principal.device_id
    assert device_id is not None
    if body.string("type", max_len=64) != history.OP_TYPE:
        raise validation_error("type", f"must be {history.OP_TYPE!r}")
    op_id = body.value("id", required=False)
    if not valid_op_id(op_id):
        raise validation_error("id", f"must be a string of 1..{MAX_OP_ID} characters")
    payload = decode_payload(body.value("payload"))
    if not payload:
        raise validation_error("payload", "must be non-empty standard base64")
    timestamp = body.value("timestamp")
    if not valid_timestamp(timestamp):
        raise validation_error("timestamp", "must be unix seconds (integer)")
    await hit_device_limit(request, "rate_relay_send", device_id, book_id, "relay sends")
    try:
        seq = await book_ops_for(request.app[SERVICES]).submit(
            book_id, device_id, op_id, payload, timestamp
        )
    except NotAccepted:
        raise ApiError(ErrorCode.SERVICE_UNAVAILABLE, "op not accepted; re-send it") from None
    return ok(request, {"seq": seq})


@routes.get("/api/v1/books/{book_id}/sync_status")
async def sync_status(request: web.Request) -> web.StreamResponse:
    book_id = request.match_info["book_id"]
    await require_member(request, book_id)
    services = request.app[SERVICES]
    ops = book_ops_for(services)
    state = await history.state(services.db, book_id)
    head = state.head if ops.retained else await ops.head(book_id)
    rows = await services.db.fetch(
        "SELECT m.device_id, d.last_active_at, s.delivered_seq FROM book_members m"
        " JOIN devices d ON d.id = m.device_id"
        " LEFT JOIN book_device_sync s ON s.book_id = m.book_id AND s.device_id = m.device_id"
        " WHERE m.book_id = $1 AND m.removed_at IS NULL ORDER BY m.joined_at, m.device_id",
        book_id,
    )
    return ok(
        request,
        {
            "head_seq": head,
            "ops_total": state.ops_total if ops.retained else head,
            "last_op_at": iso_ms(state.last_op_at),
            # Nothing is retained with BOOK_RETENTION=0: the first retained seq is past the head.
            "retained_from_seq": state.pruned_upto + 1 if ops.retained else head + 1,
            "snapshot_seq": state.snapshot_seq,
            "devices": [
                {
                    "device_id": r["device_id"],
                    "delivered_seq": int(r["delivered_seq"] or 0),
                    "last_active_at": iso_ms(r["last_active_at"]),
                }
                for r in rows
            ],
        },
    )


# -- snapshots --------------------------------------------------------------------------------------
async def _metadata(part: Any) -> tuple[int, int | None]:
    if not isinstance(part, BodyPartReader) or part.name != "metadata":
        raise validation_error("metadata", "the first part must be 'metadata' (JSON)")
    raw = await part.read(decode=False)
    if len(raw) > METADATA_MAX:
        raise validation_error("metadata", f"must be at most {METADATA_MAX} bytes")
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise validation_error("metadata", "is not valid JSON") from None
    if not isinstance(meta, dict):
        raise validation_error("metadata", "must be a JSON object")
    seq = meta.get("seq")
    base = meta.get("base_snapshot_seq")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise validation_error("seq", "must be a positive integer")
    if base is not None and (isinstance(base, bool) or not isinstance(base, int) or base < 1):
        raise validation_error("base_snapshot_seq", "must be null or a positive integer")
    if base is not None and seq <= base:
        raise validation_error("seq", "must be above base_snapshot_seq")
    return seq, base


async def _chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while chunk := await part.read_chunk(CHUNK):
        yield chunk


def _conflict(current: int | None) -> ApiError:
    return ApiError(
        ErrorCode.CONFLICT,
        "base_snapshot_seq is not the current snapshot; fetch it and retry",
        {"snapshot_seq": current},
    )


@routes.put("/api/v1/books/{book_id}/snapshot")
async def put_snapshot(request: web.Request) -> web.StreamResponse:
    book_id = request.match_info["book_id"]
    principal = await require_member(request, book_id)
    services = request.app[SERVICES]
    limit = services.settings.snapshot_max_bytes
    too_large = ApiError(ErrorCode.PAYLOAD_TOO_LARGE, "snapshot too large", {"limit": limit})
    if request.content_length is not None and request.content_length > limit + METADATA_MAX + 4096:
        raise too_large
    try:
        reader = await request.multipart()
    except (AssertionError, ValueError, KeyError):  # not multipart/*
        raise validation_error("body", "must be multipart/form-data: metadata, then file") from None
    seq, base = await _metadata(await reader.next())
    state = await history.state(services.db, book_id)
    if seq > state.head:
        raise validation_error("seq", f"must be at most the book's head ({state.head})")
    if base != state.snapshot_seq:  # early answer; the swap below is the real check
        raise _conflict(state.snapshot_seq)
    part = await reader.next()
    if not isinstance(part, BodyPartReader) or part.name != "file":
        raise validation_error("file", "the second part must be 'file' (the encrypted snapshot)")
    key = f"snapshots/{uuid.uuid4()}"
    try:
        size = await services.blobs.put(key, _chunks(part), max_size=limit)
    except BlobTooLarge:
        raise too_large from None
    now = now_ms()
    swapped = False
    old_key: str | None = None
    try:
        async with services.db.transaction() as tx:
            if base is None:
                swapped = 1 == await tx.execute(
                    "INSERT INTO book_snapshots (book_id, seq, blob_key, size_bytes, device_id,"
                    " created_at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (book_id) DO NOTHING",
                    book_id, seq, key, size, principal.device_id, now,
                )  # fmt: skip
            else:
                old_key = await tx.fetchval(
                    "SELECT blob_key FROM book_snapshots WHERE book_id = $1 AND seq = $2",
                    book_id,
                    base,
                )
                swapped = old_key is not None and 1 == await tx.execute(
                    "UPDATE book_snapshots SET seq = $3, blob_key = $4, size_bytes = $5,"
                    " device_id = $6, created_at = $7 WHERE book_id = $1 AND seq = $2",
                    book_id, base, seq, key, size, principal.device_id, now,
                )  # fmt: skip
    finally:
        if not swapped:
            await services.blobs.delete(key)
    if not swapped:
        current = await services.db.fetchval(
            "SELECT seq FROM book_snapshots WHERE book_id = $1", book_id
        )
        raise _conflict(int(current) if current is not None else None)
    if old_key is not None:
        await services.blobs.delete(old_key)
    return ok(request, {"seq": seq, "size_bytes": size, "created_at": iso_ms(now)})


@routes.get("/api/v1/books/{book_id}/snapshot")
async def get_snapshot(request: web.Request) -> web.StreamResponse:
    book_id = request.match_info["book_id"]
    await require_member(request, book_id)
    services = request.app[SERVICES]
    row = await services.db.fetchrow(
        "SELECT seq, blob_key, size_bytes, created_at FROM book_snapshots WHERE book_id = $1",
        book_id,
    )
    if row is None:
        raise ApiError(ErrorCode.NOT_FOUND, "this book has no snapshot yet")
    ttl = services.settings.blob_url_ttl_s
    return ok(
        request,
        {
            "seq": int(row["seq"]),
            "download_url": await services.blobs.download_url(row["blob_key"], ttl),
            "expires_in": ttl,
            "size_bytes": int(row["size_bytes"]),
            "created_at": iso_ms(row["created_at"]),
        },
    )


_SECURITY: list[dict[str, list[str]]] = [{"deviceJwt": []}]
_BOOK_ID = {"name": "book_id", "in": "path", "required": True, "schema": {"type": "string"}}

OPENAPI: dict[str, dict[str, dict[str, Any]]] = {
    "/api/v1/relay/send": {
        "post": {
            "summary": "Send one encrypted CRDT op to a book (the socket op's REST twin)",
            "description": "Body {book_id, type: crdt_operation, payload (standard base64), "
            "timestamp (unix s), id?}. Answers once the op is accepted (committed with retention "
            "on). A re-sent id answers the first seq. Limited per device (RATE_RELAY_SEND).",
            "tags": ["e2ee"],
            "security": _SECURITY,
            "responses": {
                "200": json_ok(
                    "Accepted.",
                    {"type": "object", "properties": {"seq": {"type": "integer"}}},
                ),
                **errors(400, 401, 403, 429, 503),
            },
        }
    },
    "/api/v1/books/{book_id}/sync_status": {
        "get": {
            "summary": "A book's sync status: counts and times only",
            "tags": ["e2ee"],
            "security": _SECURITY,
            "parameters": [_BOOK_ID],
            "responses": {
                "200": json_ok(
                    "head_seq, ops_total, last_op_at, retained_from_seq, snapshot_seq, devices "
                    "[{device_id, delivered_seq, last_active_at}].",
                    {"type": "object"},
                ),
                **errors(401, 403),
            },
        }
    },
    "/api/v1/books/{book_id}/snapshot": {
        "put": {
            "summary": "Upload the book's encrypted snapshot (compare-and-swap on its seq)",
            "description": "multipart/form-data, parts in order: metadata (JSON {seq, "
            "base_snapshot_seq}, null base for the first) then file. 409 CONFLICT when the base "
            "is not the current snapshot. Ops up to seq become droppable.",
            "tags": ["e2ee"],
            "security": _SECURITY,
            "parameters": [_BOOK_ID],
            "responses": {
                "200": json_ok("Stored.", {"type": "object"}),
                **errors(400, 401, 403, 409, 413),
            },
        },
        "get": {
            "summary": "The book's latest snapshot: a download URL",
            "tags": ["e2ee"],
            "security": _SECURITY,
            "parameters": [_BOOK_ID],
            "responses": {
                "200": json_ok(
                    "seq, download_url, expires_in, size_bytes, created_at.", {"type": "object"}
                ),
                **errors(401, 403, 404),
            },
        },
    },
}
