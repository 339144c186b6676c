"""E2EE device JWTs (README.md "Device JWT"): signed by the device's own Ed25519 key.

A device registers its raw public key once (``POST /devices/register``); afterwards it signs its
own short-lived JWTs and the server verifies them with that key. The rules, in the order checked:

1. The header says ``alg: EdDSA`` and ``typ: JWT``; anything else (``none``, HS256 with the public
   key as an HMAC secret, RS256, ...) is ``INVALID_TOKEN`` before any key is looked up. Decoding
   also pins ``algorithms=["EdDSA"]``, so the header check is belt and braces, not the only guard.
2. ``sub`` names a registered device (read from the unverified payload only to find the key);
   an unknown device is ``INVALID_TOKEN``.
3. The signature verifies with that device's key, and ``sub``, ``iat`` and ``exp`` are present.
   PyJWT checks the signature before the times, so a forged expired token is ``INVALID_TOKEN``;
   a genuine one past ``exp`` (60 s leeway) is ``TOKEN_EXPIRED``.
4. ``iat`` is at most 60 s in the future and ``exp - iat`` at most 24 h: a device cannot mint a
   token that outlives a revocation for long. ``book_id``, when present, is a non-empty string.

The verified token becomes ``Principal(kind="device", id=device_id, device_id=device_id,
book_id=..., exp=...)``. Membership is *not* checked here: each endpoint checks it for the book it
touches (README: "membership is checked on every request").
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, runtime_checkable

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared.codes import ErrorCode
from shared.errors import ApiError
from shared.principals import Principal
from shared.store.base import Executor

ALGORITHM = "EdDSA"
LEEWAY_S = 60
MAX_LIFETIME_S = 24 * 3600
MAX_TOKEN_CHARS = 8192  # a device JWT is a few hundred bytes; do not parse megabytes
MAX_ID_CHARS = 128
_REQUIRED = ["sub", "iat", "exp"]
_WWW_AUTHENTICATE = {"WWW-Authenticate": 'Bearer error="invalid_token"'}


def invalid(message: str) -> ApiError:
    return ApiError(ErrorCode.INVALID_TOKEN, message, headers=dict(_WWW_AUTHENTICATE))


def public_key_from_b64(text: str) -> Ed25519PublicKey:
    """The key of a registered device (``devices.public_key``: standard base64 of 32 raw bytes)."""
    raw = base64.b64decode(text, validate=True)
    return Ed25519PublicKey.from_public_bytes(raw)


def _unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and payload, read only to choose the key; nothing here is trusted yet."""
    if len(token) > MAX_TOKEN_CHARS:
        raise invalid("token too long")
    try:
        header = jwt.get_unverified_header(token)
        payload = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise invalid("malformed token") from None
    return header, payload


async def verify_device_jwt(db: Executor, token: str) -> Principal:
    """The device a JWT speaks for, or ``ApiError`` ``INVALID_TOKEN`` / ``TOKEN_EXPIRED``."""
    header, unverified = _unverified(token)
    if header.get("alg") != ALGORITHM or header.get("typ") != "JWT":
        raise invalid("device tokens must be EdDSA JWTs")
    sub = unverified.get("sub")
    if not isinstance(sub, str) or not 0 < len(sub) <= MAX_ID_CHARS:
        raise invalid("invalid device token: sub")
    row = await db.fetchrow("SELECT public_key FROM devices WHERE id = $1", sub)
    if row is None:
        raise invalid("unknown device")
    try:
        key = public_key_from_b64(row["public_key"])
    except (binascii.Error, ValueError):  # never stored like this (registration checks it)
        raise invalid("unknown device") from None
    try:
        claims = jwt.decode(
            token, key, algorithms=[ALGORITHM], leeway=LEEWAY_S, options={"require": _REQUIRED}
        )
    except jwt.ExpiredSignatureError:
        raise ApiError(
            ErrorCode.TOKEN_EXPIRED, "device token expired", headers=dict(_WWW_AUTHENTICATE)
        ) from None
    except jwt.PyJWTError:  # bad signature, iat in the future, a claim missing or malformed
        raise invalid("invalid device token") from None
    iat, exp, book_id = claims.get("iat"), claims.get("exp"), claims.get("book_id")
    if (
        not isinstance(iat, int)
        or isinstance(iat, bool)
        or not isinstance(exp, int)
        or isinstance(exp, bool)
    ):
        raise invalid("invalid device token: iat and exp must be integers")
    if exp - iat > MAX_LIFETIME_S:
        raise invalid("device token lifetime exceeds 24 h")
    if book_id is not None and (
        not isinstance(book_id, str) or not 0 < len(book_id) <= MAX_ID_CHARS
    ):
        raise invalid("invalid device token: book_id")
    return Principal(kind="device", id=sub, device_id=sub, book_id=book_id, exp=exp)


@runtime_checkable
class DeviceJwtSlot(Protocol):
    """The dispatch point of ``api.authn.Authenticator`` this module plugs into."""

    device_jwt: Callable[[str], Awaitable[Principal]] | None


def install(authenticator: object, db: Executor) -> bool:
    """Become ``authenticator.device_jwt`` (the ``alg: EdDSA`` dispatch point); False if it has none.

    A stub authenticator (tests) has no dispatch point and is left alone.
    """
    if not isinstance(authenticator, DeviceJwtSlot):
        return False

    async def resolve(token: str) -> Principal:
        return await verify_device_jwt(db, token)

    authenticator.device_jwt = resolve
    return True
