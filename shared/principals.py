"""Who is calling: the ``Principal`` every REST handler and socket works with.

``authenticate`` turns a bearer credential (user access JWT, ``sbt_`` API token, ``sbd_`` daemon
key, or an E2EE device JWT) into a ``Principal`` or raises ``ApiError`` with ``INVALID_TOKEN`` /
``TOKEN_EXPIRED``. REST and the relay's socket upgrade share it, so both refuse the same things.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from shared.codes import ErrorCode
from shared.errors import ApiError

if TYPE_CHECKING:
    from shared.services import Services

PrincipalKind = Literal["user", "api_token", "daemon", "device"]

# Scopes an API token may hold (rest.md "API tokens"). A user's own access JWT holds all but admin
# (admin only for operators listed in ADMIN_EMAILS).
SCOPES: frozenset[str] = frozenset(
    {
        "publish",
        "subscribe",
        "devices:read",
        "devices:write",
        "tasks:read",
        "tasks:write",
        "messages:read",
        "messages:write",
        "notifications",
        "admin",
    }
)


@dataclass(frozen=True, slots=True)
class Principal:
    kind: PrincipalKind
    id: str  # user id, or device id for daemons / E2EE devices
    user_id: str | None = None
    scopes: frozenset[str] = field(default_factory=frozenset)
    session_id: str | None = None  # user JWT: the refresh family it belongs to
    token_id: str | None = None  # API token id
    device_id: str | None = None
    book_id: str | None = None  # device JWT bound to one book
    exp: int | None = None  # credential expiry (unix s), None = does not expire

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes

    def require_scope(self, scope: str) -> None:
        if scope not in self.scopes:
            raise ApiError(
                ErrorCode.FORBIDDEN, f"this credential lacks the '{scope}' scope", {"scope": scope}
            )


async def authenticate(services: Services, credential: str) -> Principal:
    """Resolve a bearer credential. Implemented in ``api.auth_tokens`` (installed at startup)."""
    resolver = services.authenticator
    if resolver is None:
        raise ApiError(ErrorCode.INVALID_TOKEN, "no authenticator configured")
    return await resolver(credential)


def bearer_from_header(value: str | None) -> str | None:
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
