"""Home Pocket photos (rest.md "Photos and blobs"): client-encrypted bytes in the blob store.

``POST /photos/upload`` takes a photo two ways:

* **streamed** (``multipart/form-data``, parts ``metadata`` then ``file``): the file part goes
  to the blob store chunk by chunk (``BlobStore.put`` with an async iterable), never whole in
  memory, so ``client_max_size`` does not apply; the photo is ``ready`` when the answer is 201.
* **direct** (a JSON body with the metadata only): 201 with a presigned ``upload_url`` (the
  local store: ``PUT`` with ``upload_headers``; S3: a ``POST`` form policy with
  ``upload_fields``). The photo stays ``pending``, invisible to ``GET``, until
  ``POST /photos/{id}/complete`` has checked the object with ``HEAD``: size at most
  ``PHOTO_MAX_BYTES`` and equal to the declared ``size_bytes``, type equal to ``mime_type``.
  A failed check deletes the object and leaves the photo pending, to be uploaded again.

Size limit (``PHOTO_MAX_BYTES``, 400 ``PHOTO_TOO_LARGE`` above) checked as early as the request
shows it: a ``Content-Length`` over the limit plus ``MULTIPART_OVERHEAD`` before reading
anything, a declared ``size_bytes`` over it before reading the file, otherwise the bytes
streamed (the store keeps nothing). A streamed file must be exactly ``size_bytes`` long.

Choices where the contract is silent (also in ``OPENAPI``):

* One photo per ``(book_id, transaction_id)``: the same pair again (a retry after a lost
  answer) answers 200 with the existing ``ready`` photo and stores nothing (the file part is
  not read; replacing a photo means ``DELETE`` first). A ``pending`` one is taken over: a
  streamed upload fills it (201), a direct one gets a fresh URL for it (200). The server keeps
  only a SHA-256 of ``transaction_id``.
* Object keys are ``photos/<hash_id(book_id)>/<random>.enc``: nothing the client chose, no
  raw id. ``s3_key`` is that key on the local store too.
* Any current member of the photo's book may read, complete or delete it (as with devices, a
  family shares the book). A non-member gets 403 ``FORBIDDEN``, an unknown photo 404
  ``PHOTO_NOT_FOUND``; a ``pending`` photo is 404 ``PHOTO_NOT_FOUND`` for ``GET`` (details
  ``state: pending``). ``DELETE`` removes the object first, then the row (a failure on the
  way can be retried), and is audited as ``photo.deleted`` with hashed ids.
* ``RATE_PHOTO_UPLOAD`` counts every upload request that passed the membership check
  (retries too), ``RATE_PHOTO_GET`` every ``GET`` of a visible photo; ``*_PAID`` on a paid book.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import AsyncGenerator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from api.authn import client_ip
from api.book_access import hit_device_limit, require_member
from api.envelope import ok
from api.keys import SERVICES
from api.openapi import errors, json_ok
from api.routes.devices import require_device
from api.validation import Body, read_json
from shared import audit
from shared.clock import iso_ms, now_ms
from shared.codes import ErrorCode
from shared.errors import ApiError, BlobTooLarge, ConflictError, validation_error
from shared.secrets import hash_id
from shared.store.base import Executor, Row

routes = web.RouteTableDef()

PREFIX = "/api/v1/photos"
METADATA_MAX_BYTES = 8192
# What a multipart body may carry besides the file: boundaries, part headers, the metadata.
MULTIPART_OVERHEAD = 64 * 1024
STREAM_CHUNK = 256 * 1024
MAX_BOOK_ID = 64
MAX_TRANSACTION_ID = 128
MAX_PHOTO_ID = 64
# type/subtype from RFC 6838 restricted-name characters, no parameters, stored lower-case.
_MIME_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}")
_COLUMNS = "id, book_id, device_id, blob_key, size_bytes, mime_type, state, created_at"


@dataclass(frozen=True, slots=True)
class PhotoMeta:
    book_id: str
    transaction_id: str
    size_bytes: int
    mime_type: str


def parse_metadata(body: Body, limit: int) -> PhotoMeta:
    """The upload metadata; 400 ``VALIDATION_ERROR`` naming the field, ``PHOTO_TOO_LARGE``."""
    book_id = body.string("book_id", min_len=1, max_len=MAX_BOOK_ID)
    transaction_id = body.string("transaction_id", min_len=1, max_len=MAX_TRANSACTION_ID)
    size_bytes = body.integer("size_bytes", min=1)
    mime_type = body.string("mime_type", min_len=3, max_len=192).lower()
    if not _MIME_TYPE.fullmatch(mime_type):
        raise validation_error(
            "mime_type", "must be a media type like image/jpeg (type/subtype, no parameters)"
        )
    if size_bytes > limit:
        raise too_large(limit)
    return PhotoMeta(book_id, transaction_id, size_bytes, mime_type)


def too_large(limit: int) -> ApiError:
    return ApiError(
        ErrorCode.PHOTO_TOO_LARGE,
        f"a photo may have at most {limit} bytes",
        {"max_bytes": limit},
    )


def not_found(message: str = "no such photo", **details: Any) -> ApiError:
    return ApiError(ErrorCode.PHOTO_NOT_FOUND, message, details)


def new_key(book_id: str) -> str:
    """Server-made: the book only as its hash, the name random (not even the photo id)."""
    return f"photos/{hash_id(book_id)}/{uuid.uuid4().hex}.enc"


def transaction_hash(transaction_id: str) -> str:
    return hash_id(transaction_id, 64)


# -- the store -------------------------------------------------------------------------------


async def load_photo(db: Executor, photo_id: str) -> Row | None:
    if not photo_id or len(photo_id) > MAX_PHOTO_ID:
        return None
    return await db.fetchrow(f"SELECT {_COLUMNS} FROM photos WHERE id = $1", photo_id)


async def _by_transaction(db: Executor, book_id: str, tx_hash: str) -> Row | None:
    return await db.fetchrow(
        f"SELECT {_COLUMNS} FROM photos WHERE book_id = $1 AND transaction_hash = $2",
        book_id,
        tx_hash,
    )


async def claim(db: Executor, meta: PhotoMeta, device_id: str) -> tuple[Row, bool]:
    """The photo of ``(book, transaction)``: the existing one, or a new ``pending`` row (True)."""
    tx_hash = transaction_hash(meta.transaction_id)
    existing = await _by_transaction(db, meta.book_id, tx_hash)
    if existing is not None:
        return existing, False
    row: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "book_id": meta.book_id,
        "device_id": device_id,
        "blob_key": new_key(meta.book_id),
        "size_bytes": meta.size_bytes,
        "mime_type": meta.mime_type,
        "state": "pending",
        "created_at": now_ms(),
    }
    try:
        await db.execute(
            "INSERT INTO photos (id, book_id, device_id, transaction_hash, blob_key, size_bytes,"
            " mime_type, state, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending', $8)",
            row["id"],
            row["book_id"],
            row["device_id"],
            tx_hash,
            row["blob_key"],
            row["size_bytes"],
            row["mime_type"],
            row["created_at"],
        )
    except ConflictError:  # the same transaction claimed concurrently: that row is the photo
        existing = await _by_transaction(db, meta.book_id, tx_hash)
        if existing is None:
            raise
        return existing, False
    return row, True


async def _forget_pending(db: Executor, photo_id: str) -> None:
    """Drop a claim whose upload failed (best effort: a leftover claim is taken over later)."""
    with contextlib.suppress(Exception):
        await db.execute("DELETE FROM photos WHERE id = $1 AND state = 'pending'", photo_id)


async def _mark_ready(db: Executor, photo_id: str, size: int, mime_type: str) -> bool:
    changed = await db.execute(
        "UPDATE photos SET state = 'ready', size_bytes = $2, mime_type = $3, completed_at = $4"
        " WHERE id = $1",
        photo_id,
        size,
        mime_type,
        now_ms(),
    )
    return changed > 0


def _stored(row: Mapping[str, Any], size: int | None = None) -> dict[str, Any]:
    return {
        "photo_id": row["id"],
        "s3_key": row["blob_key"],
        "size_bytes": int(row["size_bytes"] if size is None else size),
    }


# -- POST /photos/upload ---------------------------------------------------------------------


@routes.post(PREFIX + "/upload")
async def upload_photo(request: web.Request) -> web.StreamResponse:
    await require_device(request)  # before a byte of the body is read
    if request.content_type == "multipart/form-data":
        return await _upload_streamed(request)
    if request.content_type == "application/json":
        return await _start_direct_upload(request)
    raise ApiError(
        ErrorCode.VALIDATION_ERROR,
        "send multipart/form-data (parts metadata, then file) or a JSON body with the metadata",
        {"field": "body"},
    )


@contextlib.contextmanager
def _multipart_errors() -> Iterator[None]:
    """aiohttp's multipart parser raises ValueError / BadHttpMessage on a malformed body."""
    try:
        yield
    except (ValueError, HttpProcessingError) as exc:
        raise ApiError(
            ErrorCode.VALIDATION_ERROR,
            "malformed multipart body",
            {"field": "body", "reason": str(exc)[:200]},
        ) from None


async def _next_part(reader: MultipartReader, name: str, position: str) -> BodyPartReader:
    with _multipart_errors():
        part = await reader.next()
    if not isinstance(part, BodyPartReader) or part.name != name:
        raise validation_error(name, f"the {position} multipart part must be named {name!r}")
    return part


async def _read_metadata(part: BodyPartReader) -> Body:
    # Line by line, not read_chunk: read_chunk looks a whole chunk past the part for the
    # boundary, so a declared size over the limit would be noticed only once that much of the
    # file had arrived. A line is bounded by the stream's buffer limit (LineTooLong: malformed).
    data = bytearray()
    with _multipart_errors():
        while not part.at_eof():
            data += await part.readline()
            if len(data) > METADATA_MAX_BYTES:
                raise validation_error("metadata", f"must be at most {METADATA_MAX_BYTES} bytes")
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise validation_error("metadata", "must be a JSON object") from None
    if not isinstance(value, dict):
        raise validation_error("metadata", "must be a JSON object")
    return Body(value)


async def _file_chunks(
    part: BodyPartReader, reader: MultipartReader, limit: int, declared: int
) -> AsyncGenerator[bytes, None]:
    """The file part, checked as it streams. Raising here makes the store keep nothing.

    Bytes past ``size_bytes`` are not passed on; the rest is read (and dropped) only to tell
    PHOTO_TOO_LARGE (over the limit) from a wrong ``size_bytes``.
    """
    size = 0
    while not part.at_eof():
        with _multipart_errors():
            chunk = await part.read_chunk(STREAM_CHUNK)
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        if size <= declared:
            yield chunk
    with _multipart_errors():
        trailing = await reader.next()
    if size != declared:
        raise validation_error("size_bytes", f"the file has {size} bytes, not {declared}")
    if trailing is not None:
        raise validation_error("body", "nothing may follow the file part")


async def _upload_streamed(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    db = services.db
    limit = services.settings.photo_max_bytes
    if request.content_length is not None and request.content_length > limit + MULTIPART_OVERHEAD:
        raise too_large(limit)
    with _multipart_errors():
        reader = await request.multipart()
    meta = parse_metadata(
        await _read_metadata(await _next_part(reader, "metadata", "first")), limit
    )
    principal = await require_member(request, meta.book_id)
    assert principal.device_id is not None
    await hit_device_limit(
        request, "rate_photo_upload", principal.device_id, meta.book_id, "photo uploads"
    )
    part = await _next_part(reader, "file", "second")
    row, created = await claim(db, meta, principal.device_id)
    if row["state"] == "ready":
        return ok(request, _stored(row))  # the same transaction again: the file is not read
    key = str(row["blob_key"])
    try:
        # aclosing: a store that stops early (its own max_size) must not leave the generator
        # to the garbage collector.
        async with contextlib.aclosing(
            _file_chunks(part, reader, limit, meta.size_bytes)
        ) as chunks:
            size = await services.blobs.put(key, chunks, meta.mime_type, max_size=limit)
    except BaseException as exc:
        if created:
            await _forget_pending(db, row["id"])
        if isinstance(exc, BlobTooLarge):  # the generator raises first; the store's own check
            raise too_large(limit) from None
        raise
    if not await _mark_ready(db, row["id"], size, meta.mime_type):
        await services.blobs.delete(key)  # deleted while it was uploading
        raise not_found("the photo was deleted while it was uploading")
    return ok(request, _stored(row, size), status=201)


async def _start_direct_upload(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    db = services.db
    settings = services.settings
    meta = parse_metadata(await read_json(request), settings.photo_max_bytes)
    principal = await require_member(request, meta.book_id)
    assert principal.device_id is not None
    await hit_device_limit(
        request, "rate_photo_upload", principal.device_id, meta.book_id, "photo uploads"
    )
    row, created = await claim(db, meta, principal.device_id)
    if row["state"] == "ready":
        return ok(request, _stored(row))
    if not created:  # a pending photo taken over: its declared size and type are these now
        await db.execute(
            "UPDATE photos SET size_bytes = $2, mime_type = $3 WHERE id = $1 AND state = 'pending'",
            row["id"],
            meta.size_bytes,
            meta.mime_type,
        )
    ttl = settings.blob_url_ttl_s
    grant = await services.blobs.upload_url(
        str(row["blob_key"]), ttl, meta.mime_type, meta.size_bytes
    )
    data = {
        "photo_id": row["id"],
        "s3_key": row["blob_key"],
        "upload_url": grant.url,
        "expires_in": grant.expires_in,
        "upload_method": grant.method,
        "upload_fields": grant.fields,
        "upload_headers": grant.headers,
    }
    return ok(request, data, status=201 if created else 200)


# -- /photos/{photo_id} -----------------------------------------------------------------------


async def _member_photo(request: web.Request) -> Row:
    """The photo named in the path (404 unknown) if the caller is a member of its book (403)."""
    await require_device(request)
    row = await load_photo(request.app[SERVICES].db, request.match_info["photo_id"])
    if row is None:
        raise not_found()
    await require_member(request, str(row["book_id"]))
    return row


@routes.post(PREFIX + "/{photo_id}/complete")
async def complete_photo(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    row = await _member_photo(request)
    if row["state"] == "ready":
        return ok(request, _stored(row))
    key = str(row["blob_key"])
    limit = services.settings.photo_max_bytes
    info = await services.blobs.head(key)
    if info is None:
        raise ApiError(
            ErrorCode.CONFLICT,
            "nothing has been uploaded to the upload URL yet",
            {"reason": "not_uploaded"},
        )
    problem: ApiError | None = None
    content_type = info.content_type.split(";", 1)[0].strip().lower()
    if info.size > limit:
        problem = too_large(limit)
    elif info.size != row["size_bytes"]:
        problem = validation_error(
            "size_bytes", f"the uploaded object has {info.size} bytes, not {row['size_bytes']}"
        )
    elif content_type != row["mime_type"]:
        problem = validation_error(
            "mime_type", f"the uploaded object is {content_type!r}, not {row['mime_type']!r}"
        )
    if problem is not None:
        await services.blobs.delete(key)  # the photo stays pending: upload it again
        raise problem
    changed = await services.db.execute(
        "UPDATE photos SET state = 'ready', completed_at = $2 WHERE id = $1 AND state = 'pending'",
        row["id"],
        now_ms(),
    )
    if not changed and await load_photo(services.db, row["id"]) is None:
        raise not_found("the photo was deleted meanwhile")
    return ok(request, _stored(row, info.size))


@routes.get(PREFIX + "/{photo_id}")
async def get_photo(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    row = await _member_photo(request)
    if row["state"] != "ready":
        raise not_found("this photo's upload is not complete", state="pending")
    principal = await require_device(request)
    assert principal.device_id is not None
    await hit_device_limit(
        request, "rate_photo_get", principal.device_id, str(row["book_id"]), "photo downloads"
    )
    ttl = services.settings.blob_url_ttl_s
    data = {
        "photo_id": row["id"],
        "download_url": await services.blobs.download_url(str(row["blob_key"]), ttl),
        "expires_in": ttl,
        "size_bytes": int(row["size_bytes"]),
        "created_at": iso_ms(int(row["created_at"])),
    }
    return ok(request, data)


@routes.delete(PREFIX + "/{photo_id}")
async def delete_photo(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    row = await _member_photo(request)
    principal = await require_device(request)
    assert principal.device_id is not None
    # The object first: if this fails the row is still there and the DELETE can be retried.
    await services.blobs.delete(str(row["blob_key"]))
    async with services.db.transaction() as tx:
        gone = await tx.execute("DELETE FROM photos WHERE id = $1", row["id"])
        if gone:
            await audit.record(
                tx,
                user_id=None,
                event="photo.deleted",
                ip=client_ip(request),
                subject=str(row["id"]),
                details={
                    "book": hash_id(str(row["book_id"])),
                    "device": hash_id(principal.device_id),
                    "state": row["state"],
                },
            )
    return ok(request, status=204)


# -- OpenAPI -------------------------------------------------------------------------------------

_METADATA: dict[str, Any] = {
    "type": "object",
    "required": ["book_id", "transaction_id", "size_bytes", "mime_type"],
    "properties": {
        "book_id": {"type": "string", "minLength": 1, "maxLength": MAX_BOOK_ID},
        "transaction_id": {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_TRANSACTION_ID,
            "description": "The ledger transaction the photo belongs to; one photo per "
            "(book_id, transaction_id). Kept only as a SHA-256.",
        },
        "size_bytes": {
            "type": "integer",
            "minimum": 1,
            "description": "Exact size of the encrypted file; at most PHOTO_MAX_BYTES.",
        },
        "mime_type": {
            "type": "string",
            "description": "type/subtype without parameters (stored lower-case), e.g. image/jpeg.",
        },
    },
}
_STORED: dict[str, Any] = {
    "type": "object",
    "required": ["photo_id", "s3_key", "size_bytes"],
    "properties": {
        "photo_id": {"type": "string"},
        "s3_key": {"type": "string", "description": "photos/<hashed book id>/<random>.enc"},
        "size_bytes": {"type": "integer"},
    },
}
_DIRECT: dict[str, Any] = {
    "type": "object",
    "required": [
        "photo_id",
        "s3_key",
        "upload_url",
        "expires_in",
        "upload_method",
        "upload_fields",
        "upload_headers",
    ],
    "properties": {
        "photo_id": {"type": "string"},
        "s3_key": {"type": "string"},
        "upload_url": {"type": "string", "description": "A bearer credential: never log it."},
        "expires_in": {"type": "integer", "description": "Seconds (BLOB_URL_TTL_S, at most 300)."},
        "upload_method": {
            "type": "string",
            "enum": ["PUT", "POST"],
            "description": "PUT (local store): the bytes as the body, with upload_headers. "
            "POST (S3): a multipart form of upload_fields, then the file as the last field.",
        },
        "upload_fields": {"type": "object", "additionalProperties": {"type": "string"}},
        "upload_headers": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
_PHOTO_ID: list[dict[str, Any]] = [
    {"name": "photo_id", "in": "path", "required": True, "schema": {"type": "string"}}
]
_MEMBERS = (
    "Any current member device of the photo's book; other devices get 403 FORBIDDEN, an "
    "unknown photo is 404 PHOTO_NOT_FOUND."
)

OPENAPI: dict[str, dict[str, dict[str, Any]]] = {
    PREFIX + "/upload": {
        "post": {
            "summary": "Upload an encrypted photo (streamed), or start a direct upload",
            "description": (
                "multipart/form-data with the parts metadata (JSON) then file, in this order: the "
                "file is streamed to the blob store and must be exactly size_bytes long; 201 with "
                "the photo, ready. A JSON body with the metadata only: 201 with a presigned "
                "upload_url; the photo stays pending (invisible) until POST "
                "/photos/{photo_id}/complete. Over PHOTO_MAX_BYTES: 400 PHOTO_TOO_LARGE, from "
                "size_bytes or a Content-Length over PHOTO_MAX_BYTES + 64 KiB before the file is "
                "read, else from the bytes streamed; nothing is kept. The same (book_id, "
                "transaction_id) again answers 200 with the existing ready photo (nothing stored) "
                "or takes over the pending one (direct: 200 with a fresh URL). Members of the book "
                "only (403 FORBIDDEN). Limited per device: RATE_PHOTO_UPLOAD (RATE_PHOTO_UPLOAD_PAID "
                "on a paid book)."
            ),
            "tags": ["e2ee"],
            "security": [{"deviceJwt": []}],
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["metadata", "file"],
                            "properties": {
                                "metadata": _METADATA,
                                "file": {"type": "string", "format": "binary"},
                            },
                        },
                        "encoding": {"metadata": {"contentType": "application/json"}},
                    },
                    "application/json": {"schema": _METADATA},
                },
            },
            "responses": {
                "201": json_ok(
                    "Streamed: the photo is stored and visible. JSON body: a direct upload URL.",
                    {"oneOf": [_STORED, _DIRECT]},
                ),
                "200": json_ok(
                    "This transaction already has a photo: the existing one (or a fresh URL "
                    "for its pending direct upload).",
                    {"oneOf": [_STORED, _DIRECT]},
                ),
                **errors(400, 401, 403, 404, 429),
            },
        }
    },
    PREFIX + "/{photo_id}/complete": {
        "post": {
            "summary": "Finish a direct upload: the server checks the object, then shows it",
            "description": (
                "HEADs the object: larger than PHOTO_MAX_BYTES is 400 PHOTO_TOO_LARGE, a size "
                "other than the declared size_bytes or a type other than mime_type is 400 "
                "VALIDATION_ERROR; either way the object is deleted and the photo stays pending "
                "(upload again). Nothing uploaded yet: 409 CONFLICT. Completing a ready photo "
                "answers it again. " + _MEMBERS
            ),
            "tags": ["e2ee"],
            "security": [{"deviceJwt": []}],
            "parameters": _PHOTO_ID,
            "responses": {
                "200": json_ok("The photo is ready.", _STORED),
                **errors(400, 401, 403, 404, 409),
            },
        }
    },
    PREFIX + "/{photo_id}": {
        "get": {
            "summary": "A download URL for a photo",
            "description": (
                "A pending photo (direct upload not completed) is 404 PHOTO_NOT_FOUND with "
                "details.state = pending. " + _MEMBERS + " Limited per device: RATE_PHOTO_GET "
                "(RATE_PHOTO_GET_PAID, unlimited by default, on a paid book)."
            ),
            "tags": ["e2ee"],
            "security": [{"deviceJwt": []}],
            "parameters": _PHOTO_ID,
            "responses": {
                "200": json_ok(
                    "The photo.",
                    {
                        "type": "object",
                        "required": [
                            "photo_id",
                            "download_url",
                            "expires_in",
                            "size_bytes",
                            "created_at",
                        ],
                        "properties": {
                            "photo_id": {"type": "string"},
                            "download_url": {
                                "type": "string",
                                "description": "A bearer credential: never log it.",
                            },
                            "expires_in": {"type": "integer"},
                            "size_bytes": {"type": "integer"},
                            "created_at": {"type": "string", "format": "date-time"},
                        },
                    },
                ),
                **errors(401, 403, 404, 429),
            },
        },
        "delete": {
            "summary": "Delete a photo and its object",
            "description": "Pending or ready; audited as photo.deleted (hashed ids). " + _MEMBERS,
            "tags": ["e2ee"],
            "security": [{"deviceJwt": []}],
            "parameters": _PHOTO_ID,
            "responses": {"204": {"description": "Deleted."}, **errors(401, 403, 404)},
        },
    },
}
