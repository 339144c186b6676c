"""Middlewares: request id + API-Version headers, and every error rendered in the envelope.

Nothing leaves the app as an HTML page or a traceback: aiohttp's own HTTP exceptions (404, 405,
413), our ``ApiError``s, backend errors and anything unexpected all become the JSON envelope.
"""

from __future__ import annotations

import logging
import re

from aiohttp import web
from aiohttp.typedefs import Handler

from api.envelope import API_VERSION, REQUEST_ID_KEY, error_response, new_request_id
from shared.codes import ErrorCode
from shared.errors import ApiError, BackendUnavailable, BlobError, ConflictError, StoreError

log = logging.getLogger("switchboard.api")

_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

_HTTP_CODES: dict[int, ErrorCode] = {
    400: ErrorCode.VALIDATION_ERROR,
    401: ErrorCode.INVALID_TOKEN,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    409: ErrorCode.CONFLICT,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    429: ErrorCode.RATE_LIMIT_EXCEEDED,
    431: ErrorCode.HEADERS_TOO_LARGE,
    503: ErrorCode.SERVICE_UNAVAILABLE,
}


def _finish(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    if not response.prepared:
        response.headers["API-Version"] = API_VERSION
        response.headers["X-Request-ID"] = request[REQUEST_ID_KEY]
    return response


@web.middleware
async def envelope_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    client_rid = request.headers.get("X-Request-ID", "")
    request[REQUEST_ID_KEY] = (
        client_rid if _CLIENT_REQUEST_ID.match(client_rid) else new_request_id()
    )
    try:
        response = await handler(request)
    except ApiError as exc:
        response = error_response(
            request, exc.code, exc.message, exc.details, status=exc.status, headers=exc.headers
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(
            exc.status,
            ErrorCode.INTERNAL_ERROR if exc.status >= 500 else ErrorCode.VALIDATION_ERROR,
        )
        details: dict[str, object] = {}
        if exc.status == 405 and isinstance(exc, web.HTTPMethodNotAllowed):
            details["allowed"] = sorted(exc.allowed_methods)
        message = {
            404: "no such path",
            405: "method not allowed",
            413: "request body too large",
        }.get(exc.status, exc.reason.lower())
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        response = error_response(
            request, code, message, details, status=exc.status, headers=headers
        )
    except ConflictError as exc:
        response = error_response(
            request, ErrorCode.CONFLICT, "conflicts with an existing resource"
        )
        log.info("conflict: %s", exc.constraint)
    except BackendUnavailable as exc:
        log.error("backend unavailable: %s", exc)
        response = error_response(
            request,
            ErrorCode.SERVICE_UNAVAILABLE,
            "a backend is unavailable",
            headers={"Retry-After": "5"},
        )
    except StoreError:
        log.exception("database error")
        response = error_response(request, ErrorCode.DATABASE_ERROR, "database error")
    except BlobError:
        log.exception("blob store error")
        response = error_response(request, ErrorCode.S3_ERROR, "blob store error")
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        response = error_response(request, ErrorCode.INTERNAL_ERROR, "internal error")
    return _finish(request, response)
