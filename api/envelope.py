"""The response envelope of README.md "REST conventions"."""

from __future__ import annotations

import secrets
import time
from typing import Any

from aiohttp import web

from shared.codes import ErrorCode

API_VERSION = "1.0"
REQUEST_ID_KEY = web.RequestKey("request_id", str)


def new_request_id() -> str:
    return "req-" + secrets.token_hex(8)


def meta(request: web.Request | None) -> dict[str, Any]:
    rid = request.get(REQUEST_ID_KEY) if request is not None else None
    return {"timestamp": int(time.time()), "request_id": rid or new_request_id()}


def ok(
    request: web.Request, data: Any = None, status: int = 200, headers: dict[str, str] | None = None
) -> web.StreamResponse:
    """Success envelope; 204 has no body."""
    if status == 204:
        return web.Response(status=204, headers=headers)
    body = {"success": True, "data": {} if data is None else data, "meta": meta(request)}
    return web.json_response(body, status=status, headers=headers)


def error_body(
    code: ErrorCode | str,
    message: str,
    details: dict[str, Any] | None = None,
    request: web.Request | None = None,
) -> dict[str, Any]:
    return {
        "success": False,
        "error": {"code": str(code), "message": message, "details": details or {}},
        "meta": meta(request),
    }


def error_response(
    request: web.Request | None,
    code: ErrorCode,
    message: str,
    details: dict[str, Any] | None = None,
    *,
    status: int | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return web.json_response(
        error_body(code, message, details, request), status=status or code.status, headers=headers
    )
