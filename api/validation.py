"""Request-body validation: wrong types and missing fields answer VALIDATION_ERROR naming the field.

Handlers read fields through ``Body`` accessors instead of indexing dicts, so a bad body can never
become a KeyError/TypeError (and a 500). Unknown fields are ignored.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from aiohttp import web

from api.keys import MAX_BODY
from shared.codes import ErrorCode
from shared.errors import ApiError, validation_error

T = TypeVar("T")
_MISSING: Any = object()


async def read_json(request: web.Request) -> Body:
    """Parse the JSON object body (size already bounded by the app's client_max_size)."""
    if request.content_length is not None and request.content_length > request.app[MAX_BODY]:
        raise ApiError(
            ErrorCode.PAYLOAD_TOO_LARGE, "request body too large", {"limit": request.app[MAX_BODY]}
        )
    raw = await request.read()
    if not raw.strip():
        raise ApiError(
            ErrorCode.VALIDATION_ERROR, "a JSON object body is required", {"field": "body"}
        )
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(
            ErrorCode.VALIDATION_ERROR,
            "body is not valid JSON",
            {"field": "body", "reason": str(exc)[:200]},
        ) from exc
    if not isinstance(value, dict):
        raise ApiError(ErrorCode.VALIDATION_ERROR, "body must be a JSON object", {"field": "body"})
    return Body(value)


class Body:
    """Typed accessors over a JSON object."""

    __slots__ = ("data",)

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def _get(self, name: str, required: bool, default: Any) -> Any:
        if name not in self.data or self.data[name] is None:
            if required:
                raise validation_error(name, "is required")
            return default
        return self.data[name]

    def has(self, name: str) -> bool:
        return name in self.data

    def string(
        self,
        name: str,
        *,
        required: bool = True,
        default: str | None = None,
        min_len: int = 0,
        max_len: int = 10_000,
    ) -> Any:
        value = self._get(name, required, default)
        if value is default and not required:
            return value
        if not isinstance(value, str):
            raise validation_error(name, "must be a string")
        if len(value) < min_len:
            raise validation_error(name, f"must be at least {min_len} characters")
        if len(value) > max_len:
            raise validation_error(name, f"must be at most {max_len} characters")
        return value

    def integer(
        self,
        name: str,
        *,
        required: bool = True,
        default: int | None = None,
        min: int | None = None,
        max: int | None = None,
    ) -> Any:
        value = self._get(name, required, default)
        if value is default and not required:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise validation_error(name, "must be an integer")
        if min is not None and value < min:
            raise validation_error(name, f"must be >= {min}")
        if max is not None and value > max:
            raise validation_error(name, f"must be <= {max}")
        return value

    def boolean(self, name: str, *, required: bool = True, default: bool | None = None) -> Any:
        value = self._get(name, required, default)
        if value is default and not required:
            return value
        if not isinstance(value, bool):
            raise validation_error(name, "must be a boolean")
        return value

    def string_list(
        self,
        name: str,
        *,
        required: bool = True,
        default: list[str] | None = None,
        max_items: int = 1000,
    ) -> Any:
        value = self._get(name, required, default)
        if value is default and not required:
            return value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise validation_error(name, "must be a list of strings")
        if len(value) > max_items:
            raise validation_error(name, f"must have at most {max_items} items")
        return value

    def mapping(
        self, name: str, *, required: bool = True, default: dict[str, Any] | None = None
    ) -> Any:
        value = self._get(name, required, default)
        if value is default and not required:
            return value
        if not isinstance(value, dict):
            raise validation_error(name, "must be an object")
        return value

    def value(self, name: str, *, required: bool = True, default: Any = None) -> Any:
        return self._get(name, required, default)


def query_int(request: web.Request, name: str, default: int, *, min: int, max: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise validation_error(name, "must be an integer") from None
    if value < min or value > max:
        raise validation_error(name, f"must be between {min} and {max}")
    return value
