"""The OpenAPI 3.1 document served at ``/api/v1/openapi.json``, assembled from the route modules.

Each module in ``api.app.ROUTE_MODULES`` documents the routes it adds in its ``OPENAPI`` dict
(``{path: {method: operation}}``); this module merges them and adds what no route module owns:
the envelope schemas, the error-code enum, the security schemes and the two WebSocket upgrade
paths. Those two are served by the relay core, not by the aiohttp app, so their operations carry
``x-served-by: relay`` (tests/test_ops.py compares every other operation with the app's router).

Route modules can refer to ``#/components/schemas/{Success,Error,Meta}``,
``#/components/responses/Error`` and the security schemes by name.
"""

from __future__ import annotations

import importlib
from typing import Any

from aiohttp import web

from api.keys import SERVICES
from shared.codes import ErrorCode

Operations = dict[str, dict[str, dict[str, Any]]]

OPENAPI_VERSION = "3.1.0"
ERROR_REF = {"$ref": "#/components/responses/Error"}


def json_ok(description: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """A success response whose envelope ``data`` has schema ``data`` (any object if None)."""
    schema: dict[str, Any] = {
        "allOf": [
            {"$ref": "#/components/schemas/Success"},
            {"type": "object", "properties": {"data": data or {"type": "object"}}},
        ]
    }
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def errors(*statuses: int) -> dict[str, Any]:
    """``responses`` entries for error statuses, all in the error envelope."""
    return {str(status): ERROR_REF for status in statuses}


_META = {
    "type": "object",
    "required": ["timestamp", "request_id"],
    "properties": {
        "timestamp": {"type": "integer", "description": "unix seconds"},
        "request_id": {"type": "string"},
    },
}

_SECURITY_SCHEMES = {
    "userJwt": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "User access JWT (15 min) from POST /api/v1/auth/login or /auth/refresh.",
    },
    "apiToken": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "sbt_...",
        "description": "Scoped opaque API token from POST /api/v1/tokens.",
    },
    "daemonKey": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "sbd_...",
        "description": "Daemon device API key from POST /api/v1/daemon/register.",
    },
    "deviceJwt": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT (EdDSA)",
        "description": "JWT signed by an E2EE device's own Ed25519 key (alg EdDSA), verified with its registered public key.",
    },
}


def _ws_operation(
    summary: str, description: str, parameters: list[dict[str, Any]]
) -> dict[str, Any]:
    token = {
        "name": "token",
        "in": "query",
        "required": False,
        "schema": {"type": "string"},
        "description": "Credential for browsers that cannot set Authorization (same kinds as the header).",
    }
    return {
        "summary": summary,
        "description": description + " WebSocket upgrade (RFC 6455) served by the relay core; "
        "frames, delivery guarantees and close codes are in realtime.md.",
        "x-served-by": "relay",
        "parameters": [token, *parameters],
        "responses": {
            "101": {"description": "Switching Protocols: the socket is open and subscribed."},
            "401": ERROR_REF,
            "403": ERROR_REF,
            "404": ERROR_REF,
            "429": ERROR_REF,
            "503": ERROR_REF,
        },
    }


WEBSOCKET_PATHS: Operations = {
    "/ws": {
        "get": {
            **_ws_operation(
                "Open the principal's inbox socket",
                "Users, daemon devices and API tokens with scope subscribe.",
                [
                    {
                        "name": "device_id",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                    }
                ],
            ),
            "security": [{"userJwt": []}, {"apiToken": []}, {"daemonKey": []}],
        }
    },
    "/ws/relay/{book_id}": {
        "get": {
            **_ws_operation(
                "Open a book's E2EE relay socket",
                "Member devices of the book.",
                [
                    {
                        "name": "book_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "since",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 0},
                    },
                ],
            ),
            "security": [{"deviceJwt": []}],
        }
    },
}


def _components() -> dict[str, Any]:
    error = {
        "type": "object",
        "required": ["success", "error", "meta"],
        "properties": {
            "success": {"const": False},
            "error": {
                "type": "object",
                "required": ["code", "message", "details"],
                "properties": {
                    "code": {"type": "string", "enum": [code.value for code in ErrorCode]},
                    "message": {"type": "string"},
                    "details": {"type": "object"},
                },
            },
            "meta": {"$ref": "#/components/schemas/Meta"},
        },
    }
    success = {
        "type": "object",
        "required": ["success", "data", "meta"],
        "properties": {
            "success": {"const": True},
            "data": {},
            "meta": {"$ref": "#/components/schemas/Meta"},
        },
    }
    return {
        "schemas": {"Meta": _META, "Success": success, "Error": error},
        "responses": {
            "Error": {
                "description": 'Error envelope; error.code names the failure (README.md "REST conventions").',
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            }
        },
        "securitySchemes": _SECURITY_SCHEMES,
    }


def _module_operations() -> list[Operations]:
    from api.app import ROUTE_MODULES  # here, not at the top: api.app loads route modules

    found = []
    for name in ROUTE_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # not written yet: create_app skips it too
                continue
            raise
        found.append(getattr(module, "OPENAPI", {}))
    return found


def merge(documents: list[Operations]) -> Operations:
    """Union of ``{path: {method: operation}}`` dicts; the same operation twice is a bug."""
    paths: Operations = {}
    for doc in documents:
        for path, operations in doc.items():
            target = paths.setdefault(path, {})
            for method, operation in operations.items():
                if method in target:
                    raise ValueError(f"{method.upper()} {path} is documented twice")
                target[method] = operation
    return dict(sorted(paths.items()))


def build_openapi(app: web.Application) -> dict[str, Any]:
    """The whole document for ``app``."""
    settings = app[SERVICES].settings
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Switchboard",
            "version": "1.0",
            "description": "Realtime relay server: REST under /api/v1, operations endpoints, and "
            "the WebSocket upgrades /ws and /ws/relay/{book_id}. Responses use the envelope of "
            'README.md "REST conventions".',
        },
        "servers": [{"url": settings.effective_public_url}],
        "paths": merge([*_module_operations(), WEBSOCKET_PATHS]),
        "components": _components(),
    }
