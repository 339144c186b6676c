"""Cursor pagination: ``?limit=`` (default 50, max 200) and an opaque ``?cursor=``.

The cursor is the sort key of the last item returned (e.g. ``[created_at, id]``), encoded as
base64url JSON. It is opaque to clients but not secret; it is validated like any input.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from api.validation import query_int
from shared.errors import validation_error

DEFAULT_LIMIT = 50
MAX_LIMIT = 200


def encode_cursor(key: Sequence[Any]) -> str:
    return (
        base64.urlsafe_b64encode(json.dumps(list(key), separators=(",", ":")).encode())
        .decode()
        .rstrip("=")
    )


def decode_cursor(text: str) -> list[Any]:
    try:
        padded = text + "=" * (-len(text) % 4)
        value = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise validation_error("cursor", "is not a valid cursor") from None
    if not isinstance(value, list):
        raise validation_error("cursor", "is not a valid cursor")
    return value


@dataclass(frozen=True, slots=True)
class Page:
    limit: int
    after: list[Any] | None  # the decoded cursor, or None for the first page

    @classmethod
    def from_request(cls, request: web.Request) -> Page:
        limit = query_int(request, "limit", DEFAULT_LIMIT, min=1, max=MAX_LIMIT)
        raw = request.query.get("cursor")
        return cls(limit, decode_cursor(raw) if raw else None)

    def result(
        self, rows: Sequence[Any], key: Callable[[Any], Sequence[Any]], render: Callable[[Any], Any]
    ) -> dict[str, Any]:
        """Callers fetch ``limit + 1`` rows; the extra one tells whether a next page exists."""
        items = list(rows[: self.limit])
        more = len(rows) > self.limit
        return {
            "items": [render(r) for r in items],
            "next_cursor": encode_cursor(key(items[-1])) if more and items else None,
        }
