"""API tokens (rest.md "API tokens"): shown once, hashed at rest, scoped, owned, revocable."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from shared.config import Settings
from shared.revocation import REVOKE_CHANNEL
from shared.secrets import hash_token
from tests.auth_helpers import ISO_UTC, Harness, running

SECRET = re.compile(r"^sbt_[A-Za-z0-9_-]{43,}$")
TOKEN_KEYS = {"id", "name", "scopes", "created_at", "expires_at", "last_used_at"}


@pytest.fixture
async def h(make_settings: Callable[..., Settings]) -> AsyncIterator[Harness]:
    async with running(make_settings(admin_emails="Root@Example.com")) as harness:
        yield harness


@pytest.fixture
async def hb(backend_settings: Settings) -> AsyncIterator[Harness]:
    async with running(backend_settings) as harness:
        yield harness


def forget_behind_the_api(h: Harness, token_id: str) -> None:
    """These tests edit the store directly, which the API would have told the lookup cache
    (AUTH_CACHE_S) about; without this the next request is served from the cache."""
    h.services.authenticator.forget_token(token_id)  # type: ignore[union-attr]


def in_future(**delta: float) -> str:
    return (datetime.now(UTC) + timedelta(**delta)).isoformat().replace("+00:00", "Z")


async def create(h: Harness, token: str, status: int = 201, **body: Any) -> dict[str, Any]:
    return dict(await h.ok("POST", "/tokens", token, json=body, status=status))


async def test_token_lifecycle(hb: Harness) -> None:
    jwt = (await hb.signup("ana@example.com"))["access_token"]
    expires = in_future(days=30)
    created = await create(hb, jwt, name="ci", scopes=["publish", "subscribe", "publish"], expires_at=expires)
    assert set(created) == TOKEN_KEYS | {"token"}
    assert SECRET.match(created["token"])
    assert created["scopes"] == ["publish", "subscribe"]
    assert created["last_used_at"] is None and ISO_UTC.match(created["created_at"])
    assert created["expires_at"].startswith(expires[:19])
    secret, token_id = created["token"], created["id"]
    # Stored as a hash only.
    stored = await hb.services.db.fetchrow("SELECT token_hash FROM api_tokens WHERE id = $1", token_id)
    assert stored is not None and stored["token_hash"] == hash_token(secret)
    assert await hb.services.db.fetchval("SELECT COUNT(*) FROM api_tokens WHERE token_hash = $1", secret) == 0

    listed = await hb.ok("GET", "/tokens", jwt)
    assert listed["next_cursor"] is None
    assert [set(t) for t in listed["items"]] == [TOKEN_KEYS]
    assert secret not in str(listed)

    current = await hb.ok("GET", "/tokens/current", secret)
    assert current["id"] == token_id and set(current) == TOKEN_KEYS
    assert ISO_UTC.match(current["last_used_at"])  # it was just used
    await hb.fails("GET", "/tokens/current", 404, "NOT_FOUND", jwt)

    patched = await hb.ok("PATCH", f"/tokens/{token_id}", jwt, json={"name": "deploy", "scopes": ["publish"],
                                                                     "expires_at": None})
    assert (patched["name"], patched["scopes"], patched["expires_at"]) == ("deploy", ["publish"], None)
    assert (await hb.ok("GET", "/tokens/current", secret))["name"] == "deploy"

    # Revocation: announced on the broker (sockets close) and refused at once.
    notices: list[tuple[str, Any]] = []
    await hb.services.broker.start(lambda channel, data: notices.append((channel, json.loads(data))))
    await hb.services.broker.subscribe(REVOKE_CHANNEL)
    resp = await hb.call("DELETE", f"/tokens/{token_id}", jwt)
    assert resp.status == 204 and await resp.read() == b""
    await hb.fails("GET", "/tokens/current", 401, "INVALID_TOKEN", secret)
    await hb.fails("DELETE", f"/tokens/{token_id}", 404, "NOT_FOUND", jwt)
    await hb.fails("PATCH", f"/tokens/{token_id}", 404, "NOT_FOUND", jwt, json={"name": "x"})
    assert (await hb.ok("GET", "/tokens", jwt))["items"] == []
    for _ in range(200):  # Redis pub/sub is asynchronous
        if notices:
            break
        await asyncio.sleep(0.01)
    assert notices == [(REVOKE_CHANNEL, {"token": token_id})]


async def test_scopes_are_checked(h: Harness) -> None:
    jwt = (await h.signup("bo@example.com"))["access_token"]
    error = await h.fails("POST", "/tokens", 400, "VALIDATION_ERROR", jwt, json={"name": "x", "scopes": ["publish", "root"]})
    assert error["details"]["field"] == "scopes" and error["details"]["unknown"] == ["root"]
    for body, field in (({"scopes": ["publish"]}, "name"), ({"name": "x"}, "scopes"),
                        ({"name": "x", "scopes": "publish"}, "scopes"), ({"name": "", "scopes": []}, "name"),
                        ({"name": "x", "scopes": [], "expires_at": "soon"}, "expires_at"),
                        ({"name": "x", "scopes": [], "expires_at": 123}, "expires_at"),
                        ({"name": "x", "scopes": [], "expires_at": "2001-01-01T00:00:00Z"}, "expires_at")):
        error = await h.fails("POST", "/tokens", 400, "VALIDATION_ERROR", jwt, json=body)
        assert error["details"]["field"] == field, body
    # admin is for operators only.
    await h.fails("POST", "/tokens", 403, "FORBIDDEN", jwt, json={"name": "x", "scopes": ["admin"]})

    # A token without admin cannot manage tokens, but can use its own scopes.
    plain = (await create(h, jwt, name="pub", scopes=["publish"]))["token"]
    await h.fails("POST", "/tokens", 403, "FORBIDDEN", plain, json={"name": "x", "scopes": ["publish"]})
    await h.fails("GET", "/tokens", 403, "FORBIDDEN", plain)
    await h.fails("POST", "/tokens/revoke", 403, "FORBIDDEN", plain, json={"ids": []})
    await h.ok("GET", "/tokens/current", plain)

    # An operator (ADMIN_EMAILS, any case) may grant admin; an admin token manages tokens but
    # cannot grant more than it holds.
    root = (await h.signup("root@example.com"))["access_token"]
    admin = await create(h, root, name="ops", scopes=["admin", "publish"])
    assert admin["scopes"] == ["admin", "publish"]
    child = await create(h, admin["token"], name="child", scopes=["publish"])
    await h.fails("POST", "/tokens", 403, "FORBIDDEN", admin["token"], json={"name": "x", "scopes": ["tasks:read"]})
    listed = await h.ok("GET", "/tokens", admin["token"])
    assert {t["id"] for t in listed["items"]} == {admin["id"], child["id"]}
    # Scopes can be widened by PATCH only within the same rules.
    await h.fails("PATCH", f"/tokens/{child['id']}", 403, "FORBIDDEN", admin["token"], json={"scopes": ["devices:read"]})
    await h.ok("PATCH", f"/tokens/{child['id']}", root, json={"scopes": ["devices:read"]})
    await h.fails("PATCH", f"/tokens/{child['id']}", 400, "VALIDATION_ERROR", root, json={"scopes": ["nope"]})


async def test_admin_follows_admin_emails(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(admin_emails="ops@example.com")
    async with running(settings) as h:
        root = (await h.signup("ops@example.com"))["access_token"]
        admin = (await create(h, root, name="ops", scopes=["admin"]))["token"]
        await h.ok("GET", "/tokens", admin)
    # The operator is removed from ADMIN_EMAILS: the token no longer carries admin.
    async with running(make_settings(admin_emails="", data_dir=settings.data_dir, jwt_secret=settings.jwt_secret)) as h:
        await h.fails("GET", "/tokens", 403, "FORBIDDEN", admin)
        assert (await h.ok("GET", "/tokens/current", admin))["scopes"] == ["admin"]


async def test_expired_token_is_token_expired(hb: Harness) -> None:
    jwt = (await hb.signup("cy@example.com"))["access_token"]
    created = await create(hb, jwt, name="short", scopes=["publish"], expires_at=in_future(hours=1))
    await hb.ok("GET", "/tokens/current", created["token"])
    await hb.services.db.execute("UPDATE api_tokens SET expires_at = 1000 WHERE id = $1", created["id"])
    forget_behind_the_api(hb, created["id"])
    await hb.fails("GET", "/tokens/current", 401, "TOKEN_EXPIRED", created["token"])
    # Still listed, and can be given a new expiry.
    assert [t["id"] for t in (await hb.ok("GET", "/tokens", jwt))["items"]] == [created["id"]]
    await hb.ok("PATCH", f"/tokens/{created['id']}", jwt, json={"expires_at": in_future(days=1)})
    await hb.ok("GET", "/tokens/current", created["token"])


async def test_only_the_owner_sees_its_tokens_and_batch_revoke(h: Harness) -> None:
    a = (await h.signup("dee@example.com"))["access_token"]
    b = (await h.signup("eli@example.com"))["access_token"]
    mine = [await create(h, a, name=f"t{n}", scopes=["publish"]) for n in range(3)]
    theirs = await create(h, b, name="theirs", scopes=["publish"])
    await h.fails("PATCH", f"/tokens/{theirs['id']}", 404, "NOT_FOUND", a, json={"name": "mine now"})
    await h.fails("DELETE", f"/tokens/{theirs['id']}", 404, "NOT_FOUND", a)
    assert [t["id"] for t in (await h.ok("GET", "/tokens", b))["items"]] == [theirs["id"]]

    ids = [mine[0]["id"], mine[1]["id"], theirs["id"], "unknown", mine[0]["id"]]
    result = await h.ok("POST", "/tokens/revoke", a, json={"ids": ids})
    assert result == {"revoked": [mine[0]["id"], mine[1]["id"]], "not_found": [theirs["id"], "unknown"]}
    for t in mine[:2]:
        await h.fails("GET", "/tokens/current", 401, "INVALID_TOKEN", t["token"])
    await h.ok("GET", "/tokens/current", mine[2]["token"])
    await h.ok("GET", "/tokens/current", theirs["token"])
    await h.fails("POST", "/tokens/revoke", 400, "VALIDATION_ERROR", a, json={"ids": "all"})
    await h.fails("POST", "/tokens/revoke", 401, "INVALID_TOKEN", json={"ids": []})


async def test_list_is_paginated(h: Harness) -> None:
    jwt = (await h.signup("fay@example.com"))["access_token"]
    made = [(await create(h, jwt, name=f"t{n}", scopes=[]))["id"] for n in range(5)]
    seen: list[str] = []
    cursor = None
    while True:
        query = "/tokens?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = await h.ok("GET", query, jwt)
        assert len(page["items"]) <= 2
        seen += [t["id"] for t in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(made) and len(seen) == 5
    await h.fails("GET", "/tokens?cursor=bm9wZQ", 400, "VALIDATION_ERROR", jwt)
    await h.fails("GET", "/tokens?limit=500", 400, "VALIDATION_ERROR", jwt)


async def test_last_used_at_is_written_at_most_once_a_minute(h: Harness) -> None:
    jwt = (await h.signup("gus@example.com"))["access_token"]
    created = await create(h, jwt, name="busy", scopes=["publish"])

    async def last_used() -> int | None:
        value = await h.services.db.fetchval("SELECT last_used_at FROM api_tokens WHERE id = $1", created["id"])
        return None if value is None else int(value)

    await h.ok("GET", "/auth/me", created["token"])
    first = await last_used()
    assert first is not None
    await h.services.db.execute("UPDATE api_tokens SET last_used_at = $2 WHERE id = $1", created["id"], first - 30_000)
    forget_behind_the_api(h, created["id"])
    await h.ok("GET", "/auth/me", created["token"])
    assert await last_used() == first - 30_000  # within the minute: not written again
    await h.services.db.execute("UPDATE api_tokens SET last_used_at = $2 WHERE id = $1", created["id"], first - 61_000)
    forget_behind_the_api(h, created["id"])
    await h.ok("GET", "/auth/me", created["token"])
    refreshed = await last_used()
    assert refreshed is not None and refreshed >= first
