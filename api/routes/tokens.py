"""API tokens (rest.md "API tokens"): scoped ``sbt_`` secrets for scripts, shown once, stored hashed.

Who may manage tokens: a user access JWT, or an API token holding ``admin``. A token never grants
more than its creator holds (a user JWT holds every scope but ``admin``; operators listed in
``ADMIN_EMAILS`` also hold ``admin``), so asking for ``admin`` without being an operator is 403
``FORBIDDEN``, and an unknown scope name is ``VALIDATION_ERROR``. Only the owner sees or changes
its tokens: another user's token id answers 404 like an unknown one. Revoked tokens disappear
from every endpoint.

``GET /tokens/current`` answers for the API token the request is authenticated with (any API
token, whatever its scopes); called with anything else it answers 404 ``NOT_FOUND``: there is
no current token to show.

Revoking announces it on the broker (``shared.revocation``): the sockets opened with the token close.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from aiohttp import web

from api.authn import API_TOKEN_PREFIX, client_ip, require_account_manager, require_principal
from api.envelope import ok
from api.keys import SERVICES
from api.openapi import errors, json_ok
from api.pagination import Page
from api.validation import Body, read_json
from shared import audit, revocation
from shared.clock import iso_ms, now_ms, parse_iso_ms
from shared.codes import ErrorCode
from shared.errors import ApiError, validation_error
from shared.principals import SCOPES, Principal
from shared.secrets import hash_token, opaque_token
from shared.store.base import Executor, Row

routes = web.RouteTableDef()
log = logging.getLogger("switchboard.tokens")

PREFIX = "/api/v1/tokens"
MAX_NAME = 100
MAX_BATCH = 200
TOKEN_FIELDS = "id, name, scopes, created_at, expires_at, last_used_at"


def render_token(row: Row) -> dict[str, Any]:
    """The contract's API token object (never the secret)."""
    return {
        "id": row["id"],
        "name": row["name"],
        "scopes": json.loads(row["scopes"]),
        "created_at": iso_ms(row["created_at"]),
        "expires_at": iso_ms(row["expires_at"]),
        "last_used_at": iso_ms(row["last_used_at"]),
    }


def read_scopes(body: Body, principal: Principal) -> list[str]:
    scopes = sorted(set(body.string_list("scopes", max_items=4 * len(SCOPES))))
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown:
        raise ApiError(
            ErrorCode.VALIDATION_ERROR,
            f"scopes: unknown scope(s) {', '.join(unknown)}",
            {
                "field": "scopes",
                "reason": "unknown scope",
                "unknown": unknown,
                "allowed": sorted(SCOPES),
            },
        )
    if "admin" in scopes and not principal.has_scope("admin"):
        raise ApiError(
            ErrorCode.FORBIDDEN,
            "the 'admin' scope is for instance operators only",
            {"scope": "admin"},
        )
    beyond = [s for s in scopes if not principal.has_scope(s)]
    if beyond:
        raise ApiError(
            ErrorCode.FORBIDDEN,
            "a token cannot grant scopes its creator does not hold",
            {"scopes": beyond},
        )
    return scopes


def read_expiry(body: Body) -> int | None:
    """``expires_at`` (ISO-8601; no offset = UTC) as unix ms, in the future; null = never."""
    raw = body.value("expires_at", required=False)
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise validation_error("expires_at", "must be an ISO-8601 time string or null")
    try:
        value = parse_iso_ms(raw)
    except (ValueError, OverflowError):
        raise validation_error("expires_at", "must be an ISO-8601 time") from None
    if value <= now_ms():
        raise validation_error("expires_at", "must be in the future")
    return value


async def _owned(ex: Executor, token_id: str, user_id: str) -> Row:
    row = await ex.fetchrow(
        f"SELECT {TOKEN_FIELDS} FROM api_tokens WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL",
        token_id,
        user_id,
    )
    if row is None:
        raise ApiError(ErrorCode.NOT_FOUND, "no such token")
    return row


async def _revoke(ex: Executor, token_id: str, user_id: str, ip: str) -> bool:
    done = await ex.execute(
        "UPDATE api_tokens SET revoked_at = $3 WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL",
        token_id,
        user_id,
        now_ms(),
    )
    if done:
        await audit.record(
            ex, user_id=user_id, event="token.revoked", ip=ip, details={"token_id": token_id}
        )
    return done == 1


@routes.post(PREFIX)
async def create_token(request: web.Request) -> web.StreamResponse:
    principal = await require_account_manager(request)
    services = request.app[SERVICES]
    body = await read_json(request)
    name = body.string("name", min_len=1, max_len=MAX_NAME)
    scopes = read_scopes(body, principal)
    expires_at = read_expiry(body)
    secret = opaque_token(API_TOKEN_PREFIX)
    row = {
        "id": str(uuid.uuid4()),
        "name": name,
        "scopes": json.dumps(scopes),
        "created_at": now_ms(),
        "expires_at": expires_at,
        "last_used_at": None,
    }
    async with services.db.transaction() as tx:
        await tx.execute(
            "INSERT INTO api_tokens (id, user_id, name, token_hash, scopes, created_at, expires_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7)",
            row["id"],
            principal.user_id,
            name,
            hash_token(secret),
            row["scopes"],
            row["created_at"],
            expires_at,
        )
        await audit.record(
            tx,
            user_id=principal.user_id,
            event="token.created",
            ip=client_ip(request),
            details={"token_id": row["id"], "scopes": scopes},
        )
    return ok(request, {**render_token(row), "token": secret}, status=201)


@routes.get(PREFIX)
async def list_tokens(request: web.Request) -> web.StreamResponse:
    principal = await require_account_manager(request)
    page = Page.from_request(request)
    after_created, after_id = -1, ""
    if page.after is not None:
        if (
            len(page.after) != 2
            or not isinstance(page.after[0], int)
            or not isinstance(page.after[1], str)
        ):
            raise validation_error("cursor", "is not a valid cursor")
        after_created, after_id = page.after
    rows = await request.app[SERVICES].db.fetch(
        f"SELECT {TOKEN_FIELDS} FROM api_tokens WHERE user_id = $1 AND revoked_at IS NULL"
        " AND (created_at > $2 OR (created_at = $2 AND id > $3)) ORDER BY created_at, id LIMIT $4",
        principal.user_id,
        after_created,
        after_id,
        page.limit + 1,
    )
    return ok(request, page.result(rows, lambda r: (r["created_at"], r["id"]), render_token))


@routes.get(PREFIX + "/current")
async def current_token(request: web.Request) -> web.StreamResponse:
    principal = await require_principal(request)
    if principal.kind != "api_token" or principal.token_id is None or principal.user_id is None:
        raise ApiError(ErrorCode.NOT_FOUND, "this request is not authenticated with an API token")
    return ok(
        request,
        render_token(await _owned(request.app[SERVICES].db, principal.token_id, principal.user_id)),
    )


@routes.patch(PREFIX + "/{id}")
async def update_token(request: web.Request) -> web.StreamResponse:
    principal = await require_account_manager(request)
    user_id = str(principal.user_id)
    services = request.app[SERVICES]
    body = await read_json(request)
    changes: dict[str, Any] = {}
    if body.value("name", required=False) is not None:
        changes["name"] = body.string("name", min_len=1, max_len=MAX_NAME)
    if body.value("scopes", required=False) is not None:
        changes["scopes"] = json.dumps(read_scopes(body, principal))
    if body.has("expires_at"):
        changes["expires_at"] = read_expiry(body)
    token_id = request.match_info["id"]
    async with services.db.transaction() as tx:
        row = dict(await _owned(tx, token_id, user_id))
        row.update(changes)
        # One statement for every case: unchanged columns are written back as they were.
        await tx.execute(
            "UPDATE api_tokens SET name = $2, scopes = $3, expires_at = $4 WHERE id = $1",
            token_id,
            row["name"],
            row["scopes"],
            row["expires_at"],
        )
        if changes:
            await audit.record(
                tx,
                user_id=user_id,
                event="token.updated",
                ip=client_ip(request),
                details={"token_id": token_id, "fields": sorted(changes)},
            )
    if changes:  # after the commit: a lookup in between must not cache the old row again
        revocation.forget_cached_token(services, token_id)
    return ok(request, render_token(row))


@routes.delete(PREFIX + "/{id}")
async def delete_token(request: web.Request) -> web.StreamResponse:
    principal = await require_account_manager(request)
    services = request.app[SERVICES]
    token_id = request.match_info["id"]
    async with services.db.transaction() as tx:
        if not await _revoke(tx, token_id, str(principal.user_id), client_ip(request)):
            raise ApiError(ErrorCode.NOT_FOUND, "no such token")
    await revocation.tokens_revoked(services, [token_id])
    return ok(request, status=204)


@routes.post(PREFIX + "/revoke")
async def revoke_tokens(request: web.Request) -> web.StreamResponse:
    principal = await require_account_manager(request)
    services = request.app[SERVICES]
    body = await read_json(request)
    ids = list(dict.fromkeys(body.string_list("ids", max_items=MAX_BATCH)))
    ip = client_ip(request)
    async with services.db.transaction() as tx:
        revoked = [i for i in ids if await _revoke(tx, i, str(principal.user_id), ip)]
    await revocation.tokens_revoked(services, revoked)
    return ok(request, {"revoked": revoked, "not_found": [i for i in ids if i not in revoked]})


# -- OpenAPI -------------------------------------------------------------------------------------

_ISO = {"type": ["string", "null"], "format": "date-time", "description": "ISO-8601 UTC"}
TOKEN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["id", "name", "scopes", "created_at", "expires_at", "last_used_at"],
    "properties": {
        "id": {"type": "string"},
        "name": {"type": "string"},
        "scopes": {"type": "array", "items": {"type": "string", "enum": sorted(SCOPES)}},
        "created_at": {"type": "string", "format": "date-time"},
        "expires_at": _ISO,
        "last_used_at": {**_ISO, "description": "ISO-8601 UTC, updated at most once a minute"},
    },
}
_SECURITY: list[dict[str, list[str]]] = [{"userJwt": []}, {"apiToken": []}]
_ID = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]
_MANAGE = " Needs a user access JWT or an API token with the admin scope (else 403 FORBIDDEN)."


def _body(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"type": "object", "required": required, "properties": properties}
            }
        },
    }


_SCOPES_FIELD = {
    "type": "array",
    "items": {"type": "string", "enum": sorted(SCOPES)},
    "description": "unknown names: 400 VALIDATION_ERROR; admin (operators only) or any scope the "
    "caller lacks: 403 FORBIDDEN",
}
_EXPIRES_FIELD = {
    "type": ["string", "null"],
    "format": "date-time",
    "description": "future ISO-8601 time; null = never",
}

OPENAPI: dict[str, dict[str, dict[str, Any]]] = {
    PREFIX: {
        "post": {
            "summary": "Create an API token (the secret is shown once)",
            "tags": ["tokens"],
            "description": "Answers the token object plus `token`, the `sbt_` secret; only its hash is stored."
            + _MANAGE,
            "security": _SECURITY,
            "requestBody": _body(
                {
                    "name": {"type": "string", "minLength": 1, "maxLength": MAX_NAME},
                    "scopes": _SCOPES_FIELD,
                    "expires_at": _EXPIRES_FIELD,
                },
                ["name", "scopes"],
            ),
            "responses": {
                "201": json_ok(
                    "Created.",
                    {
                        "allOf": [
                            TOKEN_SCHEMA,
                            {
                                "type": "object",
                                "required": ["token"],
                                "properties": {"token": {"type": "string"}},
                            },
                        ]
                    },
                ),
                **errors(400, 401, 403),
            },
        },
        "get": {
            "summary": "The caller's API tokens (never the secrets)",
            "tags": ["tokens"],
            "description": "Revoked tokens are not listed; expired ones are, with their expires_at. Oldest first."
            + _MANAGE,
            "security": _SECURITY,
            "parameters": [
                {
                    "name": "limit",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "integer", "minimum": 1, "maximum": 200},
                },
                {"name": "cursor", "in": "query", "required": False, "schema": {"type": "string"}},
            ],
            "responses": {
                "200": json_ok(
                    "A page of tokens.",
                    {
                        "type": "object",
                        "properties": {
                            "items": {"type": "array", "items": TOKEN_SCHEMA},
                            "next_cursor": {"type": ["string", "null"]},
                        },
                    },
                ),
                **errors(400, 401, 403),
            },
        },
    },
    PREFIX + "/current": {
        "get": {
            "summary": "The API token this request is authenticated with",
            "tags": ["tokens"],
            "description": "Any API token may read itself. With any other credential: 404 NOT_FOUND (no current token).",
            "security": [{"apiToken": []}, {"userJwt": []}],
            "responses": {"200": json_ok("The token.", TOKEN_SCHEMA), **errors(401, 404)},
        }
    },
    PREFIX + "/{id}": {
        "patch": {
            "summary": "Rename a token, change its scopes or expiry",
            "tags": ["tokens"],
            "description": "Only the fields present change (`expires_at: null` removes the expiry). Another user's "
            "or a revoked token: 404 NOT_FOUND." + _MANAGE,
            "security": _SECURITY,
            "parameters": _ID,
            "requestBody": _body(
                {
                    "name": {"type": "string", "minLength": 1, "maxLength": MAX_NAME},
                    "scopes": _SCOPES_FIELD,
                    "expires_at": _EXPIRES_FIELD,
                },
                [],
            ),
            "responses": {
                "200": json_ok("The updated token.", TOKEN_SCHEMA),
                **errors(400, 401, 403, 404),
            },
        },
        "delete": {
            "summary": "Revoke a token",
            "tags": ["tokens"],
            "description": "It stops working at once; sockets opened with it close within 1 s."
            + _MANAGE,
            "security": _SECURITY,
            "parameters": _ID,
            "responses": {"204": {"description": "Revoked."}, **errors(401, 403, 404)},
        },
    },
    PREFIX + "/revoke": {
        "post": {
            "summary": "Revoke several tokens",
            "tags": ["tokens"],
            "description": f"At most {MAX_BATCH} ids. Ids that are unknown, revoked or another user's are listed in "
            "not_found (no error)." + _MANAGE,
            "security": _SECURITY,
            "requestBody": _body(
                {"ids": {"type": "array", "items": {"type": "string"}, "maxItems": MAX_BATCH}},
                ["ids"],
            ),
            "responses": {
                "200": json_ok(
                    "What was revoked.",
                    {
                        "type": "object",
                        "properties": {
                            "revoked": {"type": "array", "items": {"type": "string"}},
                            "not_found": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                ),
                **errors(400, 401, 403),
            },
        }
    },
}
