"""Bearer credentials -> ``Principal``: the authenticator installed at startup, and handler helpers.

Dispatch on the credential's shape (``Authenticator.__call__``):

* ``sbt_...``  API token, looked up by its SHA-256 (``api_tokens.token_hash``).
* other prefixes registered in ``Authenticator.prefixes`` (the daemon issue adds ``sbd_``).
* ``xxx.yyy.zzz`` a JWT: ``alg: EdDSA`` goes to ``Authenticator.device_jwt`` (the E2EE device
  issue installs it); every other header is a user access JWT, verified as HS256 only.
* anything else: 401 ``INVALID_TOKEN``.

A user access JWT is only as good as its session: every request checks the session row, so a
revoked session (logout, refresh reuse, reset, ``DELETE /auth/sessions/{id}``) stops its access
tokens at once, not at ``exp``. The same query reads the user's email, so ``admin`` follows
``ADMIN_EMAILS`` without re-login.

Client IPs come from ``request.remote``; ``X-Forwarded-For`` is not trusted (anyone can send it),
so behind a proxy every client shares the proxy's limits unless the proxy sets the peer address.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable

import jwt
from aiohttp import web

from api.keys import SERVICES
from shared.clock import now_ms
from shared.codes import ErrorCode
from shared.errors import ApiError
from shared.jwt_tokens import decode_access_token
from shared.principals import SCOPES, Principal, bearer_from_header
from shared.secrets import hash_token
from shared.services import Services

API_TOKEN_PREFIX = "sbt_"
# A user's own access JWT holds every scope except admin; operators (ADMIN_EMAILS) also hold admin.
USER_SCOPES: frozenset[str] = SCOPES - {"admin"}
# last_used_at is written at most this often per token, not on every request (publish runs at 200/s).
LAST_USED_GRANULARITY_MS = 60_000
TOKEN_CACHE_MAX = 10_000  # cached API tokens per process; the cache starts over when full

Resolver = Callable[[str], Awaitable[Principal]]
_PRINCIPAL_KEY = web.RequestKey("principal", Principal)


def user_scopes(email: str, admin_emails: frozenset[str]) -> frozenset[str]:
    return USER_SCOPES | {"admin"} if email.lower() in admin_emails else USER_SCOPES


def client_ip(request: web.Request) -> str:
    """The peer address (X-Forwarded-For is deliberately ignored: it is client-controlled)."""
    return request.remote or "unknown"


def invalid_token(message: str = "invalid credential") -> ApiError:
    return ApiError(
        ErrorCode.INVALID_TOKEN,
        message,
        headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
    )


class Authenticator:
    """Callable ``credential -> Principal`` (``Services.authenticator``)."""

    def __init__(self, services: Services) -> None:
        self.services = services
        # API token hash -> (principal, cached until [monotonic s], expires_at ms | None): a
        # publisher at 200 requests/s costs one store lookup per AUTH_CACHE_S, not 200. Entries of
        # revoked or changed tokens are dropped at once on this node (forget_token, called by the
        # routes) and on the others by the revocation notice (relay.revocation).
        self._token_cache: dict[str, tuple[Principal, float, int | None]] = {}
        self._token_hashes: dict[str, str] = {}  # token id -> its hash, to forget it by id
        # Dispatch point for opaque keys: later issues add e.g. ``prefixes["sbd_"] = daemon_resolver``.
        self.prefixes: dict[str, Resolver] = {API_TOKEN_PREFIX: self.api_token}
        # Dispatch point for ``alg: EdDSA`` device JWTs (E2EE devices issue); None refuses them.
        self.device_jwt: Resolver | None = None

    async def __call__(self, credential: str) -> Principal:
        for prefix, resolver in self.prefixes.items():
            if credential.startswith(prefix):
                return await resolver(credential)
        if credential.count(".") == 2:
            try:
                alg = jwt.get_unverified_header(credential).get("alg")
            except jwt.PyJWTError:
                raise invalid_token("malformed token") from None
            if alg == "EdDSA":
                if self.device_jwt is None:
                    raise invalid_token("device tokens are not accepted here")
                return await self.device_jwt(credential)
            return await self.user_jwt(credential)
        raise invalid_token("unrecognised credential")

    async def user_jwt(self, credential: str) -> Principal:
        try:
            claims = decode_access_token(self.services.jwt_key, credential)
        except ApiError as exc:
            exc.headers.setdefault("WWW-Authenticate", 'Bearer error="invalid_token"')
            raise
        row = await self.services.db.fetchrow(
            "SELECT s.revoked_at, u.email FROM sessions s JOIN users u ON u.id = s.user_id"
            " WHERE s.id = $1 AND s.user_id = $2",
            claims.session_id,
            claims.user_id,
        )
        if row is None or row["revoked_at"] is not None:
            raise invalid_token("session revoked")
        return Principal(
            kind="user",
            id=claims.user_id,
            user_id=claims.user_id,
            scopes=user_scopes(row["email"], self.services.settings.admin_email_set),
            session_id=claims.session_id,
            exp=claims.expires_at,
        )

    def forget_token(self, token_id: str) -> None:
        """Drop a cached token (revoked, or its scopes or expiry changed)."""
        digest = self._token_hashes.pop(token_id, None)
        if digest is not None:
            self._token_cache.pop(digest, None)

    async def api_token(self, credential: str) -> Principal:
        digest = hash_token(credential)
        cached = self._token_cache.get(digest)
        if cached is not None:
            principal, until, expires_at = cached
            if time.monotonic() < until and (expires_at is None or expires_at > now_ms()):
                return principal
            self.forget_token(str(principal.token_id))
        principal, expires_at = await self._load_api_token(digest)
        ttl = self.services.settings.auth_cache_s
        if ttl > 0:
            if len(self._token_cache) >= TOKEN_CACHE_MAX:
                self._token_cache.clear()
                self._token_hashes.clear()
            self._token_cache[digest] = (principal, time.monotonic() + ttl, expires_at)
            self._token_hashes[str(principal.token_id)] = digest
        return principal

    async def _load_api_token(self, digest: str) -> tuple[Principal, int | None]:
        db = self.services.db
        row = await db.fetchrow(
            "SELECT t.id, t.user_id, t.scopes, t.expires_at, t.last_used_at, t.revoked_at, u.email"
            " FROM api_tokens t JOIN users u ON u.id = t.user_id WHERE t.token_hash = $1",
            digest,
        )
        if row is None or row["revoked_at"] is not None:
            raise invalid_token("unknown or revoked API token")
        now = now_ms()
        expires_at = row["expires_at"]
        if expires_at is not None and expires_at <= now:
            raise ApiError(
                ErrorCode.TOKEN_EXPIRED,
                "API token expired",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        last_used = row["last_used_at"]
        if last_used is None or now - last_used >= LAST_USED_GRANULARITY_MS:
            # The guard in WHERE keeps concurrent requests (and workers) to one write per minute.
            await db.execute(
                "UPDATE api_tokens SET last_used_at = $2 WHERE id = $1 AND (last_used_at IS NULL OR last_used_at <= $3)",
                row["id"],
                now,
                now - LAST_USED_GRANULARITY_MS,
            )
        # Never more than the owner holds today: an operator removed from ADMIN_EMAILS loses admin.
        scopes = frozenset(json.loads(row["scopes"])) & user_scopes(
            row["email"], self.services.settings.admin_email_set
        )
        principal = Principal(
            kind="api_token",
            id=row["user_id"],
            user_id=row["user_id"],
            scopes=scopes,
            token_id=row["id"],
            exp=expires_at // 1000 if expires_at is not None else None,
        )
        return principal, expires_at


def make_authenticator(services: Services) -> Authenticator:
    return Authenticator(services)


async def require_principal(request: web.Request, scope: str | None = None) -> Principal:
    """The caller (401 ``INVALID_TOKEN`` without a valid bearer), holding ``scope`` (else 403)."""
    principal = request.get(_PRINCIPAL_KEY)
    if principal is None:
        credential = bearer_from_header(request.headers.get("Authorization"))
        if credential is None:
            raise invalid_token("missing bearer credential")
        services = request.app[SERVICES]
        if services.authenticator is None:
            raise invalid_token("no authenticator configured")
        principal = await services.authenticator(credential)
        request[_PRINCIPAL_KEY] = principal
    if scope is not None:
        principal.require_scope(scope)
    return principal


async def require_session(request: web.Request) -> Principal:
    """A user access JWT (it has a session): for logout, sessions and account changes."""
    principal = await require_principal(request)
    if principal.kind != "user" or principal.session_id is None:
        raise ApiError(
            ErrorCode.FORBIDDEN, "this endpoint needs a user access token (from /auth/login)"
        )
    return principal


async def require_account_manager(request: web.Request) -> Principal:
    """A user access JWT, or an API token with ``admin``: for token management and audit export."""
    principal = await require_principal(request)
    if principal.kind == "user":
        return principal
    if principal.kind == "api_token" and principal.has_scope("admin"):
        return principal
    raise ApiError(
        ErrorCode.FORBIDDEN,
        "needs a user access token or an API token with the 'admin' scope",
        {"scope": "admin"},
    )


async def require_user_id(request: web.Request) -> tuple[Principal, str]:
    """Any principal acting for a user account (user JWT or API token), and that user's id."""
    principal = await require_principal(request)
    if principal.user_id is None:
        raise ApiError(ErrorCode.FORBIDDEN, "this credential does not act for a user account")
    return principal, principal.user_id
