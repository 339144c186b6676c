"""E2EE device registration (rest.md "E2EE devices, books, pairing, relay"): proof of possession.

``POST /devices/register`` takes ``{public_key, platform, name?, timestamp, signature}``. The
device proves it holds the private key by signing the UTF-8 text
``"register:" + public_key + ":" + str(timestamp)`` (``public_key`` exactly as sent), so nobody
can register someone else's key. ``setup`` installs the device-JWT verifier
(``shared.device_jwt``) on the authenticator: from then on the device signs its own JWTs.

Choices where the contract is silent (also in ``OPENAPI``):

* Every failed check is 400 ``VALIDATION_ERROR`` with ``details.field`` naming the field:
  ``public_key`` (not standard base64 with padding, not 32 bytes), ``timestamp`` (more than 5 min
  from the server clock), ``signature`` (not base64, not 64 bytes, or not a valid signature of the
  text above by that key). The request carries no credential, so 401 (which tells a client to
  re-authenticate) would be misleading; the proof is simply an invalid field.
* ``public_key`` must be the canonical encoding (re-encoding the 32 bytes gives the same text), so
  one key has one spelling and the UNIQUE column really means one device per key.
* The same key again with a fresh valid signature answers 200 with the same ``device_id``; the
  stored platform and name are kept (registration is not an update endpoint). A replayed request
  (within the 5 minutes) only reveals the device id of a key the replayer already has; acting as
  the device still needs the private key.
* ``RATE_DEVICE_REGISTER_IP`` counts every well-formed attempt from the IP, successful or not.
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from typing import Any

from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from api.authn import client_ip, require_principal
from api.envelope import ok
from api.keys import SERVICES
from api.openapi import errors, json_ok
from api.validation import read_json
from shared import device_jwt
from shared.clock import now_ms
from shared.codes import ErrorCode
from shared.errors import ApiError, ConflictError, validation_error
from shared.principals import Principal
from shared.ratelimit import Limit
from shared.secrets import hash_id

routes = web.RouteTableDef()

PREFIX = "/api/v1/devices"
TIMESTAMP_SKEW_S = 300  # rest.md: "within ±5 min"
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
MAX_PLATFORM = 32
MAX_NAME = 100


def b64_exact(field: str, text: str, size: int) -> bytes:
    """Standard base64 with padding, canonical, decoding to exactly ``size`` bytes."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise validation_error(field, "must be standard base64 with padding") from None
    if len(raw) != size:
        raise validation_error(field, f"must encode exactly {size} bytes")
    if base64.b64encode(raw).decode() != text:
        raise validation_error(field, "must be the canonical base64 encoding")
    return raw


def registration_text(public_key: str, timestamp: int) -> bytes:
    """What the device signs: the public key exactly as sent in the body."""
    return f"register:{public_key}:{timestamp}".encode()


async def require_device(request: web.Request) -> Principal:
    """An E2EE device JWT (any book binding); other credentials get 403 ``FORBIDDEN``."""
    principal = await require_principal(request)
    if principal.kind != "device" or principal.device_id is None:
        raise ApiError(ErrorCode.FORBIDDEN, "this endpoint needs an E2EE device token")
    return principal


@routes.post(PREFIX + "/register")
async def register_device(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    body = await read_json(request)
    public_key = body.string("public_key", min_len=1, max_len=64)
    platform = body.string("platform", min_len=1, max_len=MAX_PLATFORM)
    name = body.string("name", required=False, default=None, max_len=MAX_NAME)
    timestamp = body.integer("timestamp")
    signature_text = body.string("signature", min_len=1, max_len=128)

    decision = await services.limiter.hit(
        f"device_register:ip:{hash_id(client_ip(request))}",
        Limit.of(services.settings.rate("rate_device_register_ip")),
    )
    decision.raise_if_denied("too many device registrations from this address")

    raw_key = b64_exact("public_key", public_key, PUBLIC_KEY_BYTES)
    if abs(int(time.time()) - timestamp) > TIMESTAMP_SKEW_S:
        raise validation_error("timestamp", "must be within 5 minutes of the server time")
    signature = b64_exact("signature", signature_text, SIGNATURE_BYTES)
    try:
        Ed25519PublicKey.from_public_bytes(raw_key).verify(
            signature, registration_text(public_key, timestamp)
        )
    except (InvalidSignature, ValueError):
        raise validation_error("signature", "does not verify with public_key") from None

    db = services.db
    existing = await db.fetchval("SELECT id FROM devices WHERE public_key = $1", public_key)
    if existing is not None:
        return ok(request, {"device_id": existing})
    device_id = str(uuid.uuid4())
    now = now_ms()
    try:
        await db.execute(
            "INSERT INTO devices (id, public_key, platform, name, created_at, last_active_at)"
            " VALUES ($1, $2, $3, $4, $5, $5)",
            device_id,
            public_key,
            platform,
            name,
            now,
        )
    except ConflictError:  # the same key registered concurrently: that row is the device
        existing = await db.fetchval("SELECT id FROM devices WHERE public_key = $1", public_key)
        if existing is None:
            raise
        return ok(request, {"device_id": existing})
    return ok(request, {"device_id": device_id}, status=201)


def setup(app: web.Application) -> None:
    services = app[SERVICES]
    # api.routes.auth (earlier in ROUTE_MODULES) created the authenticator; a stub has no slot.
    device_jwt.install(services.authenticator, services.db)


# -- OpenAPI -------------------------------------------------------------------------------------

_DEVICE_ID = {
    "type": "object",
    "required": ["device_id"],
    "properties": {"device_id": {"type": "string"}},
}

OPENAPI: dict[str, dict[str, dict[str, Any]]] = {
    PREFIX + "/register": {
        "post": {
            "summary": "Register an E2EE device's Ed25519 public key (proof of possession)",
            "description": (
                "signature = Ed25519 signature (standard base64) of the UTF-8 text "
                '"register:" + public_key + ":" + str(timestamp), with public_key exactly as sent. '
                "public_key: the raw 32-byte key in canonical standard base64 with padding; timestamp: unix "
                "seconds within 5 minutes of the server clock. Every failed check is 400 VALIDATION_ERROR "
                "with details.field naming public_key, timestamp or signature. The same key again with a fresh "
                "valid signature answers 200 with the same device_id. Limited per IP (RATE_DEVICE_REGISTER_IP). "
                "Afterwards the device authenticates with JWTs it signs itself (alg EdDSA, see deviceJwt)."
            ),
            "tags": ["e2ee"],
            "security": [],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["public_key", "platform", "timestamp", "signature"],
                            "properties": {
                                "public_key": {
                                    "type": "string",
                                    "description": "raw 32-byte Ed25519 key, standard base64",
                                },
                                "platform": {
                                    "type": "string",
                                    "minLength": 1,
                                    "maxLength": MAX_PLATFORM,
                                },
                                "name": {"type": "string", "maxLength": MAX_NAME},
                                "timestamp": {"type": "integer", "description": "unix seconds"},
                                "signature": {
                                    "type": "string",
                                    "description": "64-byte Ed25519 signature, standard base64",
                                },
                            },
                        }
                    }
                },
            },
            "responses": {
                "201": json_ok("Registered.", _DEVICE_ID),
                "200": json_ok("This key was already registered: the same device.", _DEVICE_ID),
                **errors(400, 413, 429),
            },
        }
    },
}
