"""Raw HTTP answers the relay writes itself, before anything was handed to aiohttp.

A refused upgrade, a head that is too large or arrives during drain: the REST error envelope
with ``Content-Length`` and ``Connection: close`` (realtime.md "Handshake"), so a client reads
one complete answer and knows the connection ends.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from api.envelope import API_VERSION, error_body
from shared.codes import ErrorCode


def error_response_bytes(
    code: ErrorCode,
    message: str,
    details: dict[str, Any] | None = None,
    *,
    status: int | None = None,
    headers: dict[str, str] | None = None,
) -> bytes:
    status = status or code.status
    body = json.dumps(error_body(code, message, details), separators=(",", ":")).encode()
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Error"
    lines = [
        f"HTTP/1.1 {status} {reason}",
        "Content-Type: application/json; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
        f"API-Version: {API_VERSION}",
    ]
    for name, value in (headers or {}).items():
        if "\r" in value or "\n" in value:  # never let a value split the head
            continue
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
