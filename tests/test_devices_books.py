"""E2EE devices and books (rest.md "E2EE devices, books, pairing, relay"; README "Device JWT"):
registration with proof of possession, book creation, and every device-JWT forgery on a REST
endpoint answered with the contract's code."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import jwt
import pytest

from shared.config import Settings
from tests.auth_helpers import Harness, running
from tests.device_helpers import DeviceKey, b64


@pytest.fixture
async def h(make_settings: Callable[..., Settings]) -> AsyncIterator[Harness]:
    async with running(make_settings()) as harness:
        yield harness


@pytest.fixture
async def hb(backend_settings: Settings) -> AsyncIterator[Harness]:
    """The same app on SQLite, and on PostgreSQL + Redis."""
    async with running(backend_settings) as harness:
        yield harness


async def register(h: Harness, key: DeviceKey, status: int = 201) -> str:
    data = await h.ok("POST", "/devices/register", json=key.register_body(), status=status)
    assert set(data) == {"device_id"}
    key.device_id = data["device_id"]
    return str(data["device_id"])


async def bad_field(h: Harness, body: dict[str, Any], field: str) -> None:
    error = await h.fails("POST", "/devices/register", 400, "VALIDATION_ERROR", json=body)
    assert error["details"]["field"] == field, error


# -- registration ----------------------------------------------------------------------------------


async def test_register_then_same_key_again_is_the_same_device(hb: Harness) -> None:
    key = DeviceKey()
    device_id = await register(hb, key, 201)
    # A fresh signature (another timestamp) for the same key: 200, same device.
    again = await hb.ok("POST", "/devices/register", json=key.register_body(int(time.time()) - 10))
    assert again == {"device_id": device_id}
    other = await register(hb, DeviceKey(), 201)
    assert other != device_id
    row = await hb.services.db.fetchrow("SELECT public_key, platform, name FROM devices WHERE id = $1", device_id)
    assert row is not None and dict(row) == {"public_key": key.public_b64, "platform": "ios", "name": "phone"}


async def test_register_refuses_a_signature_that_does_not_prove_the_key(h: Harness) -> None:
    key, other = DeviceKey(), DeviceKey()
    # Signed by another key.
    await bad_field(h, other.register_body(public_key=key.public_b64), "signature")
    # Right key, but over another timestamp than the one sent.
    ts = int(time.time())
    await bad_field(h, {**key.register_body(ts), "timestamp": ts - 1}, "signature")
    # Flipped bit.
    body = key.register_body()
    raw = bytearray(base64.b64decode(body["signature"]))
    raw[0] ^= 1
    await bad_field(h, {**body, "signature": b64(bytes(raw))}, "signature")
    # The message must use the key exactly as sent: a signature over other text does not count.
    wrong_text = key.private.sign(f"register:{key.public_b64}{ts}".encode())
    await bad_field(h, {**key.register_body(ts), "signature": b64(wrong_text)}, "signature")
    await bad_field(h, key.register_body(signature="not base64!"), "signature")
    await bad_field(h, key.register_body(signature=b64(b"short")), "signature")
    assert await h.services.db.fetchval("SELECT COUNT(*) FROM devices") == 0


async def test_register_refuses_stale_and_future_timestamps(h: Harness) -> None:
    key = DeviceKey()
    await bad_field(h, key.register_body(int(time.time()) - 301), "timestamp")
    await bad_field(h, key.register_body(int(time.time()) + 301), "timestamp")
    await bad_field(h, {**key.register_body(), "timestamp": "123"}, "timestamp")
    assert await register(h, key)  # well inside the window: fine


async def test_register_refuses_keys_that_are_not_32_raw_bytes_in_standard_base64(h: Harness) -> None:
    key = DeviceKey()
    ts = int(time.time())

    def signed(public_key: str) -> dict[str, Any]:
        sig = key.private.sign(f"register:{public_key}:{ts}".encode())
        return {"public_key": public_key, "platform": "android", "timestamp": ts, "signature": b64(sig)}

    await bad_field(h, signed(b64(key.public_raw + b"\0")), "public_key")  # 33 bytes
    await bad_field(h, signed(b64(key.public_raw[:31])), "public_key")  # 31 bytes
    await bad_field(h, signed(key.public_b64.rstrip("=")), "public_key")  # padding missing
    urlsafe = base64.urlsafe_b64encode(b"\xfb\xff" * 16).decode()  # has - and _
    await bad_field(h, signed(urlsafe), "public_key")
    await bad_field(h, signed("@" * 44), "public_key")
    await bad_field(h, key.register_body(public_key=None), "public_key")
    await bad_field(h, key.register_body(platform=""), "platform")


async def test_device_registrations_are_limited_per_ip(make_settings: Callable[..., Settings]) -> None:
    async with running(make_settings(rate_device_register_ip="3/3600")) as h:
        for _ in range(3):
            await register(h, DeviceKey())
        resp = await h.call("POST", "/devices/register", json=DeviceKey().register_body())
        assert resp.status == 429
        assert (await resp.json())["error"]["code"] == "RATE_LIMIT_EXCEEDED"
        assert int(resp.headers["Retry-After"]) > 0
        assert resp.headers["X-RateLimit-Limit"] == "3"


# -- books -------------------------------------------------------------------------------------------


async def test_a_device_creates_books_and_is_their_first_member(hb: Harness) -> None:
    key = DeviceKey()
    device_id = await register(hb, key)
    data = await hb.ok("POST", "/books", key.token(), status=201)
    assert set(data) == {"book_id"}
    # A token bound to that book may create another book too.
    second = await hb.ok("POST", "/books", key.token(book_id=data["book_id"]), status=201)
    assert second["book_id"] != data["book_id"]
    members = await hb.services.db.fetch(
        "SELECT book_id, device_id, removed_at FROM book_members ORDER BY joined_at, book_id"
    )
    assert {(m["book_id"], m["device_id"], m["removed_at"]) for m in members} == {
        (data["book_id"], device_id, None), (second["book_id"], device_id, None),
    }
    tier = await hb.services.db.fetchval("SELECT tier FROM books WHERE id = $1", data["book_id"])
    assert tier == "free"


async def test_only_devices_create_books(h: Harness) -> None:
    await h.fails("POST", "/books", 401, "INVALID_TOKEN")
    session = await h.signup("user@example.com")
    await h.fails("POST", "/books", 403, "FORBIDDEN", session["access_token"])


async def test_book_creation_is_limited_per_device(make_settings: Callable[..., Settings]) -> None:
    async with running(make_settings(rate_book_create="2/3600")) as h:
        a, b = DeviceKey(), DeviceKey()
        await register(h, a)
        await register(h, b)
        for _ in range(2):
            await h.ok("POST", "/books", a.token(), status=201)
        await h.fails("POST", "/books", 429, "RATE_LIMIT_EXCEEDED", a.token())
        await h.ok("POST", "/books", b.token(), status=201)  # per device, not global


# -- device JWT forgeries ----------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(claims: dict[str, Any], header: dict[str, Any]) -> str:
    """A token with any header, e.g. ``alg: none`` (PyJWT refuses to write some of these)."""
    return ".".join((_b64url(json.dumps(header).encode()), _b64url(json.dumps(claims).encode()), ""))


async def test_device_jwts_are_verified_exactly_as_the_contract_says(h: Harness) -> None:
    key = DeviceKey()
    await register(h, key)
    now = int(time.time())
    claims = {"sub": key.device_id, "iat": now, "exp": now + 600}

    async def refused(token: str, code: str = "INVALID_TOKEN") -> None:
        await h.fails("POST", "/books", 401, code, token)

    await h.ok("POST", "/books", key.token(), status=201)  # the genuine one works

    await refused(DeviceKey().token(sub=key.device_id))  # signed by another key
    await refused(unsigned(claims, {"alg": "none", "typ": "JWT"}))
    await refused(jwt.encode(claims, key.public_raw, algorithm="HS256"))  # public key as HMAC secret
    await refused(jwt.encode(claims, key.public_b64, algorithm="HS256"))
    # EdDSA header but the signature part of an HS256 token: still the wrong algorithm.
    hs = jwt.encode(claims, key.public_raw, algorithm="HS256").split(".")
    await refused(".".join((_b64url(json.dumps({"alg": "EdDSA", "typ": "JWT"}).encode()), hs[1], hs[2])))
    await refused(key.token(iat=now - 7200, ttl=3600), "TOKEN_EXPIRED")
    await refused(key.token(iat=now - 3600 - 61, ttl=3600), "TOKEN_EXPIRED")
    await h.ok("POST", "/books", key.token(iat=now - 3600 - 30, ttl=3600), status=201)  # within 60 s leeway
    await refused(key.token(iat=now + 120))  # iat more than 60 s ahead
    await h.ok("POST", "/books", key.token(iat=now + 30), status=201)  # within leeway
    await refused(key.token(ttl=24 * 3600 + 1))  # lifetime over 24 h
    await h.ok("POST", "/books", key.token(ttl=24 * 3600), status=201)
    await refused(key.token(sub="no-such-device"))
    for claim in ("sub", "iat", "exp"):
        await refused(key.token(drop=(claim,)))
    await refused(key.token(claims={"exp": str(now + 600)}))
    await refused(key.token(claims={"book_id": 42}))
    # typ must be JWT.
    await refused(jwt.encode(claims, key.private, algorithm="EdDSA", headers={"typ": "at+jwt"}))
    await refused("not.a.jwt")


async def test_a_forged_expired_token_is_invalid_not_expired(h: Harness) -> None:
    key = DeviceKey()
    await register(h, key)
    forged = DeviceKey().token(sub=key.device_id, iat=int(time.time()) - 7200, ttl=3600)
    await h.fails("POST", "/books", 401, "INVALID_TOKEN", forged)
