"""``/blobs/<key>``: the local blob store's signed URLs (rest.md "Photos and blobs").

``GET``/``HEAD`` stream an object to whoever holds a valid download URL; ``PUT`` takes a direct
upload with a valid upload URL, streamed to the store under the signed size limit and content
type. The signature is the only credential: an expired, tampered or missing one answers 403
``FORBIDDEN``. With S3 configured these URLs are never issued and the routes answer 404.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from api.envelope import ok
from api.keys import SERVICES
from api.openapi import errors, json_ok
from shared.blobs.local import READ_CHUNK, InvalidSignature, LocalBlobStore
from shared.codes import ErrorCode
from shared.errors import ApiError, BlobNotFound, BlobTooLarge

routes = web.RouteTableDef()

# Served content types are chosen by uploaders: never let a browser run them on our origin.
_SAFE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; sandbox",
    "Cache-Control": "private, no-store",
}


def _local_store(request: web.Request) -> LocalBlobStore:
    store = request.app[SERVICES].blobs
    if not isinstance(store, LocalBlobStore):
        raise ApiError(ErrorCode.NOT_FOUND, "no such path")
    return store


@routes.get("/blobs/{key:.+}")  # aiohttp adds HEAD for GET routes
async def get_blob(request: web.Request) -> web.StreamResponse:
    store = _local_store(request)
    key = request.match_info["key"]
    try:
        store.authorize_download(key, request.query)
    except InvalidSignature as exc:
        raise ApiError(ErrorCode.FORBIDDEN, str(exc)) from None
    try:
        reader = await store.reader(key)
    except BlobNotFound:
        raise ApiError(ErrorCode.NOT_FOUND, "no such blob") from None
    async with reader:
        response = web.StreamResponse(headers=_SAFE_HEADERS)
        response.content_type = reader.info.content_type
        response.content_length = reader.info.size
        await response.prepare(request)
        if request.method != "HEAD":
            remaining = reader.info.size
            while remaining > 0:
                chunk = await reader.read(min(READ_CHUNK, remaining))
                if not chunk:  # cannot happen for a file we hold open, but never spin
                    break
                await response.write(chunk)
                remaining -= len(chunk)
        await response.write_eof()
    return response


@routes.put("/blobs/{key:.+}")
async def put_blob(request: web.Request) -> web.StreamResponse:
    store = _local_store(request)
    key = request.match_info["key"]
    try:
        grant = store.authorize_upload(key, request.query)
    except InvalidSignature as exc:
        raise ApiError(ErrorCode.FORBIDDEN, str(exc)) from None
    too_large = ApiError(
        ErrorCode.PAYLOAD_TOO_LARGE,
        "upload exceeds the signed size limit",
        {"max_size": grant.max_size},
    )
    # Refuse from the declared length before reading; aiohttp drains the rest (lingering close).
    if request.content_length is not None and request.content_length > grant.max_size:
        raise too_large
    try:
        size = await store.put(
            key,
            request.content.iter_chunked(READ_CHUNK),
            grant.content_type,
            max_size=grant.max_size,
        )
    except BlobTooLarge:
        raise too_large from None
    return ok(
        request, {"key": key, "size_bytes": size, "content_type": grant.content_type}, status=201
    )


_KEY_PARAM: dict[str, Any] = {
    "name": "key",
    "in": "path",
    "required": True,
    "description": "Object key (may contain `/`).",
    "schema": {"type": "string"},
}
_SIGNATURE_PARAMS: list[dict[str, Any]] = [
    _KEY_PARAM,
    {
        "name": "expires",
        "in": "query",
        "required": True,
        "schema": {"type": "integer"},
        "description": "Last valid unix second.",
    },
    {
        "name": "signature",
        "in": "query",
        "required": True,
        "schema": {"type": "string"},
        "description": "base64url HMAC-SHA256, issued by the server. Expired, tampered or missing: 403 `FORBIDDEN`.",
    },
]
_BINARY = {"*/*": {"schema": {"type": "string", "format": "binary"}}}
_NOTE = " Served only by the local blob store; with S3 configured: 404 `NOT_FOUND`."

OPENAPI: dict[str, dict[str, dict[str, Any]]] = {
    "/blobs/{key}": {
        "get": {
            "summary": "Download an object with a signed URL",
            "description": "HEAD is served too." + _NOTE,
            "tags": ["blobs"],
            "parameters": _SIGNATURE_PARAMS,
            "responses": {
                "200": {
                    "description": "The object's bytes with its stored Content-Type.",
                    "content": _BINARY,
                },
                **errors(403, 404),
            },
        },
        "put": {
            "summary": "Upload an object directly with a signed upload URL",
            "description": "The body is streamed to the store; over `max_size` nothing is kept."
            + _NOTE,
            "tags": ["blobs"],
            "parameters": [
                *_SIGNATURE_PARAMS,
                {
                    "name": "content_type",
                    "in": "query",
                    "required": True,
                    "schema": {"type": "string"},
                    "description": "Signed content type the object is stored with.",
                },
                {
                    "name": "max_size",
                    "in": "query",
                    "required": True,
                    "schema": {"type": "integer"},
                    "description": "Signed size limit in bytes.",
                },
            ],
            "requestBody": {"required": True, "content": _BINARY},
            "responses": {
                "201": json_ok(
                    "Stored.",
                    {
                        "type": "object",
                        "properties": {
                            "key": {"type": "string"},
                            "size_bytes": {"type": "integer"},
                            "content_type": {"type": "string"},
                        },
                    },
                ),
                **errors(403, 404, 413),
            },
        },
    }
}
