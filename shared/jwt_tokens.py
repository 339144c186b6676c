"""User access JWTs: HS256 with the server's key, short-lived, bound to a session.

Claims: ``sub`` (user id), ``sid`` (session = refresh family id), ``iat``, ``exp``, ``typ: access``
and a random ``jti``. Decoding pins ``algorithms=["HS256"]``, so ``alg: none``, HS512 and the
public-key algorithms are refused before any key is used. A token that is malformed, forged or of
another type answers ``INVALID_TOKEN``; a genuine one past ``exp`` answers ``TOKEN_EXPIRED`` (the
signature is checked first, so a forged expired token is ``INVALID_TOKEN``).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

import jwt

from shared.codes import ErrorCode
from shared.errors import ApiError

ALGORITHM = "HS256"
TOKEN_TYPE = "access"
_REQUIRED = ["sub", "sid", "iat", "exp", "jti", "typ"]


@dataclass(frozen=True, slots=True)
class AccessClaims:
    user_id: str
    session_id: str
    issued_at: int
    expires_at: int  # unix seconds
    jti: str


def issue_access_token(
    key: bytes, *, user_id: str, session_id: str, ttl_s: int, now: int | None = None
) -> str:
    iat = int(time.time()) if now is None else now
    claims = {
        "sub": user_id,
        "sid": session_id,
        "iat": iat,
        "exp": iat + ttl_s,
        "typ": TOKEN_TYPE,
        "jti": secrets.token_urlsafe(12),
    }
    return jwt.encode(claims, key, algorithm=ALGORITHM)


def decode_access_token(key: bytes, token: str) -> AccessClaims:
    """Verified claims of a user access JWT, or ``ApiError`` INVALID_TOKEN / TOKEN_EXPIRED."""
    try:
        claims = jwt.decode(token, key, algorithms=[ALGORITHM], options={"require": _REQUIRED})
    except jwt.ExpiredSignatureError:
        raise ApiError(ErrorCode.TOKEN_EXPIRED, "access token expired") from None
    except jwt.PyJWTError:
        raise ApiError(ErrorCode.INVALID_TOKEN, "invalid access token") from None
    sub, sid, iat, exp, jti = (claims.get(k) for k in ("sub", "sid", "iat", "exp", "jti"))
    if (
        claims.get("typ") != TOKEN_TYPE
        or not isinstance(sub, str)
        or not isinstance(sid, str)
        or not isinstance(jti, str)
        or not isinstance(iat, int)
        or not isinstance(exp, int)
    ):
        raise ApiError(ErrorCode.INVALID_TOKEN, "invalid access token")
    return AccessClaims(user_id=sub, session_id=sid, issued_at=iat, expires_at=exp, jti=jti)
