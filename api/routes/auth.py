"""Accounts (rest.md "Accounts"): register, login, refresh rotation, sessions, email verification,
password reset. ``setup`` installs the bearer authenticator (``api.authn``) for every module.

Sessions are refresh-token families. Each refresh consumes its token (``used_at``) and issues the
next one in the same family; presenting a consumed token again means it leaked, so the whole
family is revoked (401 ``REFRESH_TOKEN_REUSED``) and its access JWTs die with it (the
authenticator checks the session on every request).

Choices where the contract is silent (also in ``OPENAPI``):

* ``POST /auth/register`` answers ``{user}``; ``GET``/``PATCH /auth/me`` answer the user object.
  ``display_name`` defaults to the part of the email before ``@``.
* ``/auth/refresh`` answers the same shape as ``/auth/login``; an expired refresh token is
  ``TOKEN_EXPIRED``.
* Email tokens (verify, reset): unknown or used -> 401 ``INVALID_TOKEN``, expired -> 401
  ``TOKEN_EXPIRED``. A completed reset also marks the email verified (the link proved it).
* Logout, sessions and ``PATCH /auth/me`` need a user access JWT (API tokens have no session:
  403 ``FORBIDDEN``); ``GET /auth/me`` also accepts an API token.
* ``PATCH /auth/me`` with ``password`` needs ``current_password``; a wrong one answers
  ``INVALID_CREDENTIALS`` and counts against the failed-login limit of the account.
* Sessions are listed while alive: not revoked and refreshed within ``REFRESH_TOKEN_TTL_S``;
  ``last_used_at`` is the last login or refresh.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from api.authn import client_ip, invalid_token, make_authenticator, require_session, require_user_id
from api.envelope import ok
from api.keys import SERVICES
from api.openapi import errors, json_ok
from api.pagination import Page
from api.validation import Body, read_json
from shared import audit, revocation
from shared.clock import iso_ms, now_ms
from shared.codes import ErrorCode
from shared.config import Settings
from shared.errors import ApiError, ConflictError, validation_error
from shared.jwt_tokens import issue_access_token
from shared.mail import enqueue_email, wake_sender
from shared.passwords import hash_password, verify_password
from shared.ratelimit import Limit
from shared.secrets import hash_id, hash_token, opaque_token
from shared.services import Services
from shared.store.base import Executor, Row

routes = web.RouteTableDef()
log = logging.getLogger("switchboard.auth")

PREFIX = "/api/v1/auth"
# Simple and sane: RFC 5322 atext local part (no quotes, spaces or header-breaking characters),
# dotted DNS labels. Checked after trimming and lower-casing.
EMAIL_RE = re.compile(
    r"^[a-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)+$"
)
MAX_EMAIL = 254
MAX_PASSWORD = 1024  # argon2 takes any length; this only bounds the work a body can ask for
MAX_NAME = 100
MAX_TOKEN = 256

USER_FIELDS = "id, email, display_name, email_verified_at, created_at"


# -- helpers -------------------------------------------------------------------------------------


def render_user(row: Row) -> dict[str, Any]:
    """The contract's user object: ``{id, email, display_name, email_verified, created_at}``."""
    return {
        "id": row["id"],
        "email": row["email"],
        "display_name": row["display_name"],
        "email_verified": row["email_verified_at"] is not None,
        "created_at": iso_ms(row["created_at"]),
    }


def read_email(body: Body, field: str = "email") -> str:
    email = body.string(field, max_len=MAX_EMAIL).strip().lower()
    if not EMAIL_RE.match(email):
        raise validation_error(field, "is not a valid email address")
    return str(email)


def read_new_password(body: Body, settings: Settings, field: str = "password") -> str:
    return str(body.string(field, min_len=settings.password_min_length, max_len=MAX_PASSWORD))


def _limit(settings: Settings, name: str) -> Limit:
    return Limit.of(settings.rate(name))


async def _fetch_user(ex: Executor, user_id: str) -> Row:
    row = await ex.fetchrow(f"SELECT {USER_FIELDS} FROM users WHERE id = $1", user_id)
    if row is None:  # the account was deleted under a still-valid credential
        raise invalid_token("account no longer exists")
    return row


async def _new_email_token(ex: Executor, user_id: str, purpose: str, ttl_s: int) -> str:
    token = opaque_token()
    now = now_ms()
    await ex.execute(
        "INSERT INTO email_tokens (token_hash, user_id, purpose, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)",
        hash_token(token),
        user_id,
        purpose,
        now,
        now + ttl_s * 1000,
    )
    return token


async def _send_link(
    ex: Executor,
    settings: Settings,
    *,
    to: str,
    display_name: str,
    template: str,
    path: str,
    token: str,
) -> None:
    link = f"{settings.effective_public_url}/{path}?token={token}"
    await enqueue_email(
        ex, to=to, template=template, context={"display_name": display_name, "link": link}
    )


async def _consume_email_token(ex: Executor, token: str, purpose: str) -> str:
    """Mark a verify/reset token used (once, atomically); returns its user id."""
    row = await ex.fetchrow(
        "SELECT user_id, expires_at, used_at FROM email_tokens WHERE token_hash = $1 AND purpose = $2",
        hash_token(token),
        purpose,
    )
    if row is None or row["used_at"] is not None:
        raise invalid_token("unknown or already used token")
    now = now_ms()
    if row["expires_at"] <= now:
        raise ApiError(ErrorCode.TOKEN_EXPIRED, "this link has expired")
    claimed = await ex.execute(
        "UPDATE email_tokens SET used_at = $2 WHERE token_hash = $1 AND used_at IS NULL",
        hash_token(token),
        now,
    )
    if claimed != 1:  # a concurrent request used it first
        raise invalid_token("unknown or already used token")
    return str(row["user_id"])


async def _issue_refresh(ex: Executor, settings: Settings, session_id: str, now: int) -> str:
    refresh = opaque_token()
    await ex.execute(
        "INSERT INTO refresh_tokens (token_hash, session_id, created_at, expires_at) VALUES ($1, $2, $3, $4)",
        hash_token(refresh),
        session_id,
        now,
        now + settings.refresh_token_ttl_s * 1000,
    )
    return refresh


def _token_pair(services: Services, user: Row, session_id: str, refresh: str) -> dict[str, Any]:
    settings = services.settings
    access = issue_access_token(
        services.jwt_key,
        user_id=user["id"],
        session_id=session_id,
        ttl_s=settings.access_token_ttl_s,
    )
    return {
        "access_token": access,
        "refresh_token": refresh,
        "expires_in": settings.access_token_ttl_s,
        "token_type": "Bearer",
        "user": render_user(user),
    }


async def _revoke_sessions(
    ex: Executor, user_id: str, reason: str, *, keep: str | None = None
) -> int:
    return await ex.execute(
        "UPDATE sessions SET revoked_at = $2, revoked_reason = $3"
        " WHERE user_id = $1 AND revoked_at IS NULL AND id <> $4",
        user_id,
        now_ms(),
        reason,
        keep or "",
    )


# -- register / verify ---------------------------------------------------------------------------


@routes.post(PREFIX + "/register")
async def register(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    settings = services.settings
    body = await read_json(request)
    email = read_email(body)
    password = read_new_password(body, settings)
    display_name = body.string(
        "display_name", required=False, default=None, min_len=1, max_len=MAX_NAME
    )
    ip = client_ip(request)
    decision = await services.limiter.hit(
        f"register:ip:{hash_id(ip)}", _limit(settings, "rate_register_ip")
    )
    decision.raise_if_denied("too many registrations from this address")

    password_hash = await hash_password(password, settings)
    now = now_ms()
    user_id = str(uuid.uuid4())
    name = str(display_name) if display_name is not None else email.split("@", 1)[0]
    try:
        async with services.db.transaction() as tx:
            await tx.execute(
                "INSERT INTO users (id, email, display_name, password_hash, created_at, updated_at)"
                " VALUES ($1, $2, $3, $4, $5, $5)",
                user_id,
                email,
                name,
                password_hash,
                now,
            )
            token = await _new_email_token(tx, user_id, "verify", settings.email_token_ttl_s)
            await _send_link(
                tx,
                settings,
                to=email,
                display_name=name,
                template="verify_email",
                path="verify-email",
                token=token,
            )
            await audit.record(tx, user_id=user_id, event="auth.register", ip=ip)
    except ConflictError:
        raise ApiError(
            ErrorCode.EMAIL_TAKEN, "an account with this email already exists", {"field": "email"}
        ) from None
    wake_sender(services)
    user = {
        "id": user_id,
        "email": email,
        "display_name": name,
        "email_verified_at": None,
        "created_at": now,
    }
    return ok(request, {"user": render_user(user)}, status=201)


@routes.post(PREFIX + "/verify-email")
async def verify_email(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    body = await read_json(request)
    token = body.string("token", min_len=1, max_len=MAX_TOKEN)
    async with services.db.transaction() as tx:
        user_id = await _consume_email_token(tx, token, "verify")
        await tx.execute(
            "UPDATE users SET email_verified_at = $2, updated_at = $2 WHERE id = $1 AND email_verified_at IS NULL",
            user_id,
            now_ms(),
        )
        await audit.record(tx, user_id=user_id, event="auth.email_verified", ip=client_ip(request))
    return ok(request, {})


# -- login / refresh / logout --------------------------------------------------------------------


@routes.post(PREFIX + "/login")
async def login(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    settings = services.settings
    body = await read_json(request)
    email = str(body.string("email", max_len=MAX_EMAIL)).strip().lower()
    password = body.string("password", max_len=MAX_PASSWORD)
    device_name = body.string("device_name", required=False, default="", max_len=MAX_NAME)
    ip = client_ip(request)

    # Checked before the password, counted only on failure: a locked-out caller gets 429 even
    # with the right password, so the limit cannot be used to test guesses.
    keys = (
        (f"login:email:{hash_id(email)}", _limit(settings, "rate_login_email")),
        (f"login:ip:{hash_id(ip)}", _limit(settings, "rate_login_ip")),
    )
    for key, limit in keys:
        (await services.limiter.peek(key, limit)).raise_if_denied("too many failed logins")

    user = await services.db.fetchrow(
        f"SELECT {USER_FIELDS}, password_hash FROM users WHERE email = $1", email
    )
    # Unknown email: verified against a dummy hash, so both failures take the same time.
    valid = await verify_password(user["password_hash"] if user else None, password, settings)
    if user is None or not valid:
        for key, limit in keys:
            await services.limiter.hit(key, limit)
        await audit.record(
            services.db,
            user_id=user["id"] if user else None,
            event="auth.login_failed",
            ip=ip,
            subject=email,
        )
        raise ApiError(ErrorCode.INVALID_CREDENTIALS, "wrong email or password")

    now = now_ms()
    session_id = str(uuid.uuid4())
    async with services.db.transaction() as tx:
        await tx.execute(
            "INSERT INTO sessions (id, user_id, device_name, ip_hash, created_at, last_used_at)"
            " VALUES ($1, $2, $3, $4, $5, $5)",
            session_id,
            user["id"],
            device_name,
            hash_id(ip),
            now,
        )
        refresh = await _issue_refresh(tx, settings, session_id, now)
        await audit.record(
            tx, user_id=user["id"], event="auth.login", ip=ip, details={"session_id": session_id}
        )
    await services.limiter.reset(keys[0][0])
    return ok(request, _token_pair(services, user, session_id, refresh))


@routes.post(PREFIX + "/refresh")
async def refresh(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    settings = services.settings
    body = await read_json(request)
    presented = body.string("refresh_token", min_len=1, max_len=MAX_TOKEN)
    ip = client_ip(request)
    now = now_ms()
    pair: dict[str, Any] | None = None
    async with services.db.transaction() as tx:
        row = await tx.fetchrow(
            "SELECT r.session_id, r.expires_at, r.used_at, s.user_id, s.revoked_at"
            " FROM refresh_tokens r JOIN sessions s ON s.id = r.session_id WHERE r.token_hash = $1",
            hash_token(presented),
        )
        if row is None or row["revoked_at"] is not None:
            raise invalid_token("unknown or revoked refresh token")
        session_id, user_id = row["session_id"], row["user_id"]
        if row["used_at"] is None and row["expires_at"] <= now:
            raise ApiError(ErrorCode.TOKEN_EXPIRED, "refresh token expired")
        # The claim is the atomic step: of two requests racing with one token, only one wins;
        # the loser is treated as reuse, like any second presentation.
        claimed = (
            row["used_at"] is None
            and await tx.execute(
                "UPDATE refresh_tokens SET used_at = $2 WHERE token_hash = $1 AND used_at IS NULL",
                hash_token(presented),
                now,
            )
            == 1
        )
        if not claimed:
            # Reuse of a consumed token: it leaked (or the client raced itself). Kill the family;
            # committed before the error is raised below.
            await tx.execute(
                "UPDATE sessions SET revoked_at = $2, revoked_reason = 'refresh_reuse' WHERE id = $1",
                session_id,
                now,
            )
            await audit.record(
                tx,
                user_id=user_id,
                event="auth.refresh_reused",
                ip=ip,
                details={"session_id": session_id},
            )
        else:
            await tx.execute("UPDATE sessions SET last_used_at = $2 WHERE id = $1", session_id, now)
            new_refresh = await _issue_refresh(tx, settings, session_id, now)
            pair = _token_pair(services, await _fetch_user(tx, user_id), session_id, new_refresh)
    if pair is None:
        await revocation.session_revoked(services, session_id)
        raise ApiError(
            ErrorCode.REFRESH_TOKEN_REUSED, "refresh token already used; the session is revoked"
        )
    return ok(request, pair)


@routes.post(PREFIX + "/logout")
async def logout(request: web.Request) -> web.StreamResponse:
    principal = await require_session(request)
    services = request.app[SERVICES]
    async with services.db.transaction() as tx:
        await tx.execute(
            "UPDATE sessions SET revoked_at = $2, revoked_reason = 'logout' WHERE id = $1 AND revoked_at IS NULL",
            principal.session_id,
            now_ms(),
        )
        await audit.record(
            tx,
            user_id=principal.user_id,
            event="auth.logout",
            ip=client_ip(request),
            details={"session_id": principal.session_id},
        )
    if principal.session_id is not None:
        await revocation.session_revoked(services, principal.session_id)
    return ok(request, {})


# -- me / sessions -------------------------------------------------------------------------------


@routes.get(PREFIX + "/me")
async def get_me(request: web.Request) -> web.StreamResponse:
    _, user_id = await require_user_id(request)
    return ok(request, render_user(await _fetch_user(request.app[SERVICES].db, user_id)))


@routes.patch(PREFIX + "/me")
async def patch_me(request: web.Request) -> web.StreamResponse:
    principal = await require_session(request)
    services = request.app[SERVICES]
    settings = services.settings
    user_id = str(principal.user_id)
    body = await read_json(request)
    display_name = body.string(
        "display_name", required=False, default=None, min_len=1, max_len=MAX_NAME
    )
    new_password = None
    if body.value("password", required=False) is not None:
        new_password = read_new_password(body, settings)
        current = body.string("current_password", max_len=MAX_PASSWORD)
        row = await services.db.fetchrow(
            "SELECT email, password_hash FROM users WHERE id = $1", user_id
        )
        stored = row["password_hash"] if row else None
        email_key = f"login:email:{hash_id(row['email'] if row else user_id)}"
        limit = _limit(settings, "rate_login_email")
        (await services.limiter.peek(email_key, limit)).raise_if_denied(
            "too many failed password checks"
        )
        if not await verify_password(stored, current, settings):
            await services.limiter.hit(email_key, limit)
            raise ApiError(
                ErrorCode.INVALID_CREDENTIALS,
                "current_password is wrong",
                {"field": "current_password"},
            )
    password_hash = (
        await hash_password(new_password, settings) if new_password is not None else None
    )

    ip = client_ip(request)
    async with services.db.transaction() as tx:
        now = now_ms()
        if display_name is not None:
            await tx.execute(
                "UPDATE users SET display_name = $2, updated_at = $3 WHERE id = $1",
                user_id,
                display_name,
                now,
            )
        if password_hash is not None:
            await tx.execute(
                "UPDATE users SET password_hash = $2, updated_at = $3 WHERE id = $1",
                user_id,
                password_hash,
                now,
            )
            revoked = await _revoke_sessions(
                tx, user_id, "password_change", keep=principal.session_id
            )
            await audit.record(
                tx,
                user_id=user_id,
                event="auth.password_changed",
                ip=ip,
                details={"sessions_revoked": revoked},
            )
        user = await _fetch_user(tx, user_id)
    if password_hash is not None:
        await revocation.user_sessions_revoked(services, user_id, keep=principal.session_id)
    return ok(request, render_user(user))


def _render_session(current: str | None) -> Any:
    def render(row: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "id": row["id"],
            "device_name": row["device_name"],
            "ip_hash": row["ip_hash"],
            "created_at": iso_ms(row["created_at"]),
            "last_used_at": iso_ms(row["last_used_at"]),
            "current": row["id"] == current,
        }

    return render


@routes.get(PREFIX + "/sessions")
async def list_sessions(request: web.Request) -> web.StreamResponse:
    principal = await require_session(request)
    services = request.app[SERVICES]
    page = Page.from_request(request)
    after_created, after_id = _cursor_key(page)
    alive_since = now_ms() - services.settings.refresh_token_ttl_s * 1000
    rows = await services.db.fetch(
        "SELECT id, device_name, ip_hash, created_at, last_used_at FROM sessions"
        " WHERE user_id = $1 AND revoked_at IS NULL AND last_used_at > $2"
        " AND (created_at > $3 OR (created_at = $3 AND id > $4))"
        " ORDER BY created_at, id LIMIT $5",
        principal.user_id,
        alive_since,
        after_created,
        after_id,
        page.limit + 1,
    )
    return ok(
        request,
        page.result(
            rows, lambda r: (r["created_at"], r["id"]), _render_session(principal.session_id)
        ),
    )


def _cursor_key(page: Page) -> tuple[int, str]:
    """A ``[created_at, id]`` cursor, or the start of the list."""
    if page.after is None:
        return -1, ""
    if (
        len(page.after) != 2
        or not isinstance(page.after[0], int)
        or not isinstance(page.after[1], str)
    ):
        raise validation_error("cursor", "is not a valid cursor")
    return page.after[0], page.after[1]


@routes.delete(PREFIX + "/sessions/{id}")
async def delete_session(request: web.Request) -> web.StreamResponse:
    principal = await require_session(request)
    services = request.app[SERVICES]
    session_id = request.match_info["id"]
    async with services.db.transaction() as tx:
        revoked = await tx.execute(
            "UPDATE sessions SET revoked_at = $3, revoked_reason = 'revoked'"
            " WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL",
            session_id,
            principal.user_id,
            now_ms(),
        )
        if revoked != 1:
            raise ApiError(ErrorCode.NOT_FOUND, "no such session")
        await audit.record(
            tx,
            user_id=principal.user_id,
            event="auth.session_revoked",
            ip=client_ip(request),
            details={"session_id": session_id},
        )
    await revocation.session_revoked(services, session_id)
    return ok(request, status=204)


# -- password reset ------------------------------------------------------------------------------


@routes.post(PREFIX + "/forgot-password")
async def forgot_password(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    settings = services.settings
    body = await read_json(request)
    email = read_email(body)
    decision = await services.limiter.hit(
        f"forgot:email:{hash_id(email)}", _limit(settings, "rate_forgot_email")
    )
    # Always the same answer, limited or not, known address or not: no account enumeration.
    if not decision.allowed:
        log.info("password reset emails limited for an address")
        return ok(request, {})
    sent = False
    async with services.db.transaction() as tx:
        user = await tx.fetchrow("SELECT id, display_name FROM users WHERE email = $1", email)
        if user is not None:
            token = await _new_email_token(tx, user["id"], "reset", settings.reset_token_ttl_s)
            await _send_link(
                tx,
                settings,
                to=email,
                display_name=user["display_name"],
                template="password_reset",
                path="reset-password",
                token=token,
            )
            await audit.record(
                tx, user_id=user["id"], event="auth.password_reset_requested", ip=client_ip(request)
            )
            sent = True
    if sent:
        wake_sender(services)
    return ok(request, {})


@routes.post(PREFIX + "/reset-password")
async def reset_password(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    settings = services.settings
    body = await read_json(request)
    token = body.string("token", min_len=1, max_len=MAX_TOKEN)
    password = read_new_password(body, settings)
    password_hash = await hash_password(password, settings)
    async with services.db.transaction() as tx:
        user_id = await _consume_email_token(tx, token, "reset")
        now = now_ms()
        # The email link proved the address, so it counts as verified too.
        await tx.execute(
            "UPDATE users SET password_hash = $2, updated_at = $3,"
            " email_verified_at = COALESCE(email_verified_at, $3) WHERE id = $1",
            user_id,
            password_hash,
            now,
        )
        # Every other outstanding reset link dies with this one.
        await tx.execute(
            "UPDATE email_tokens SET used_at = $2 WHERE user_id = $1 AND purpose = 'reset' AND used_at IS NULL",
            user_id,
            now,
        )
        revoked = await _revoke_sessions(tx, user_id, "password_reset")
        await audit.record(
            tx,
            user_id=user_id,
            event="auth.password_reset",
            ip=client_ip(request),
            details={"sessions_revoked": revoked},
        )
    await revocation.user_sessions_revoked(services, user_id)
    return ok(request, {})


# -- wiring --------------------------------------------------------------------------------------


def setup(app: web.Application) -> None:
    services = app[SERVICES]
    services.authenticator = make_authenticator(services)


# -- OpenAPI -------------------------------------------------------------------------------------

ISO_TIME = {"type": "string", "format": "date-time", "description": "ISO-8601 UTC"}
USER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["id", "email", "display_name", "email_verified", "created_at"],
    "properties": {
        "id": {"type": "string"},
        "email": {"type": "string", "format": "email"},
        "display_name": {"type": "string"},
        "email_verified": {"type": "boolean"},
        "created_at": ISO_TIME,
    },
}
_TOKEN_PAIR = {
    "type": "object",
    "required": ["access_token", "refresh_token", "expires_in", "token_type", "user"],
    "properties": {
        "access_token": {"type": "string", "description": "HS256 JWT, lifetime ACCESS_TOKEN_TTL_S"},
        "refresh_token": {"type": "string", "description": "single-use; rotate with /auth/refresh"},
        "expires_in": {"type": "integer", "description": "seconds until access_token expires"},
        "token_type": {"const": "Bearer"},
        "user": USER_SCHEMA,
    },
}
_SESSION = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "device_name": {"type": "string"},
        "ip_hash": {
            "type": ["string", "null"],
            "description": "SHA-256 of the login IP, truncated",
        },
        "created_at": ISO_TIME,
        "last_used_at": {**ISO_TIME, "description": "last login or refresh"},
        "current": {"type": "boolean", "description": "the session of the calling access token"},
    },
}
_EMPTY = json_ok("Done (data is {}).", {"type": "object"})
_USER_JWT: list[dict[str, list[str]]] = [{"userJwt": []}]


def _body(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"type": "object", "required": required, "properties": properties}
            }
        },
    }


def _op(
    summary: str,
    description: str,
    request: dict[str, Any] | None,
    responses: dict[str, Any],
    security: list[dict[str, list[str]]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "description": description,
        "tags": ["accounts"],
        "responses": responses,
        **extra,
    }
    if request is not None:
        operation["requestBody"] = request
    operation["security"] = security if security is not None else []
    return operation


_STRING = {"type": "string"}
_PASSWORD = {
    "type": "string",
    "minLength": 10,
    "description": "at least PASSWORD_MIN_LENGTH (10) characters",
}
_LIST_PARAMS = [
    {
        "name": "limit",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 1, "maximum": 200},
    },
    {"name": "cursor", "in": "query", "required": False, "schema": {"type": "string"}},
]

OPENAPI: dict[str, dict[str, dict[str, Any]]] = {
    PREFIX + "/register": {
        "post": _op(
            "Create an account",
            "Sends a verification email. Registrations are limited per IP (RATE_REGISTER_IP). "
            "display_name defaults to the part of the email before @.",
            _body(
                {
                    "email": {"type": "string", "format": "email"},
                    "password": _PASSWORD,
                    "display_name": {"type": "string", "maxLength": MAX_NAME},
                },
                ["email", "password"],
            ),
            {
                "201": json_ok(
                    "Created.",
                    {"type": "object", "required": ["user"], "properties": {"user": USER_SCHEMA}},
                ),
                **errors(400, 409, 413, 429),
            },
        )
    },
    PREFIX + "/verify-email": {
        "post": _op(
            "Confirm the email address with the token from the verification email",
            "Unknown or used token: 401 INVALID_TOKEN; expired: 401 TOKEN_EXPIRED.",
            _body({"token": _STRING}, ["token"]),
            {"200": _EMPTY, **errors(400, 401)},
        )
    },
    PREFIX + "/login": {
        "post": _op(
            "Log in: access JWT + refresh token",
            "Unknown email and wrong password both answer 401 INVALID_CREDENTIALS in the same time. Failed "
            "attempts are limited per email (RATE_LOGIN_EMAIL) and per IP (RATE_LOGIN_IP); the limit is checked "
            "before the password. Each login opens a session (refresh-token family).",
            _body(
                {
                    "email": _STRING,
                    "password": _STRING,
                    "device_name": {"type": "string", "maxLength": MAX_NAME},
                },
                ["email", "password"],
            ),
            {"200": json_ok("Logged in.", _TOKEN_PAIR), **errors(400, 401, 429)},
        )
    },
    PREFIX + "/refresh": {
        "post": _op(
            "Rotate the refresh token: a new access JWT and refresh token",
            "Each refresh token works once. Presenting a used one revokes the whole session (401 "
            "REFRESH_TOKEN_REUSED); any token of a revoked session answers 401 INVALID_TOKEN, an expired one "
            "401 TOKEN_EXPIRED. Same answer shape as /auth/login.",
            _body({"refresh_token": _STRING}, ["refresh_token"]),
            {"200": json_ok("New pair.", _TOKEN_PAIR), **errors(400, 401)},
        )
    },
    PREFIX + "/logout": {
        "post": _op(
            "Revoke the current session",
            "Its refresh token and every access JWT of the session stop working at once. Needs a user access "
            "JWT (an API token has no session: 403 FORBIDDEN).",
            None,
            {"200": _EMPTY, **errors(401, 403)},
            _USER_JWT,
        )
    },
    PREFIX + "/me": {
        "get": _op(
            "The calling user",
            "With a user access JWT or any API token of the user.",
            None,
            {"200": json_ok("The user.", USER_SCHEMA), **errors(401)},
            [{"userJwt": []}, {"apiToken": []}],
        ),
        "patch": _op(
            "Change display name and/or password",
            "Changing the password needs current_password (wrong: 401 INVALID_CREDENTIALS, counted against the "
            "failed-login limit) and revokes every other session. Needs a user access JWT.",
            _body(
                {
                    "display_name": {"type": "string", "minLength": 1, "maxLength": MAX_NAME},
                    "password": _PASSWORD,
                    "current_password": _STRING,
                },
                [],
            ),
            {"200": json_ok("The updated user.", USER_SCHEMA), **errors(400, 401, 403, 429)},
            _USER_JWT,
        ),
    },
    PREFIX + "/sessions": {
        "get": _op(
            "Active sessions of the calling user",
            "Not revoked and refreshed within REFRESH_TOKEN_TTL_S, oldest first, paginated.",
            None,
            {
                "200": json_ok(
                    "A page of sessions.",
                    {
                        "type": "object",
                        "properties": {
                            "items": {"type": "array", "items": _SESSION},
                            "next_cursor": {"type": ["string", "null"]},
                        },
                    },
                ),
                **errors(400, 401, 403),
            },
            _USER_JWT,
            parameters=_LIST_PARAMS,
        )
    },
    PREFIX + "/sessions/{id}": {
        "delete": _op(
            "Revoke one of the caller's sessions",
            "Its access JWTs stop at once. Unknown, already revoked or another user's session: 404 NOT_FOUND.",
            None,
            {"204": {"description": "Revoked."}, **errors(401, 403, 404)},
            _USER_JWT,
            parameters=[
                {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
        )
    },
    PREFIX + "/forgot-password": {
        "post": _op(
            "Email a password-reset link",
            "Always 200 with {} (known address or not, limited or not: no account enumeration). The link's "
            "token is single-use and valid RESET_TOKEN_TTL_S (30 min). Limited per address (RATE_FORGOT_EMAIL).",
            _body({"email": {"type": "string", "format": "email"}}, ["email"]),
            {"200": _EMPTY, **errors(400)},
        )
    },
    PREFIX + "/reset-password": {
        "post": _op(
            "Set a new password with the token from the reset email",
            "Revokes every session of the account and marks the email verified. Unknown or used token: 401 "
            "INVALID_TOKEN; expired: 401 TOKEN_EXPIRED.",
            _body({"token": _STRING, "password": _PASSWORD}, ["token", "password"]),
            {"200": _EMPTY, **errors(400, 401)},
        )
    },
}
