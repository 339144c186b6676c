"""Accounts (rest.md "Accounts"): register, verify, login limits, refresh rotation and reuse,
logout, sessions, forgot/reset, PATCH /auth/me, and the access-JWT rules (README "Principals")."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import jwt
import pytest

from shared.config import Settings
from tests.auth_helpers import ISO_UTC, PASSWORD, TOKEN_IN_LINK, USER_KEYS, Harness, running


@pytest.fixture
async def h(make_settings: Callable[..., Settings]) -> AsyncIterator[Harness]:
    async with running(make_settings()) as harness:
        yield harness


@pytest.fixture
async def hb(backend_settings: Settings) -> AsyncIterator[Harness]:
    """The same app on SQLite, and on PostgreSQL + Redis."""
    async with running(backend_settings) as harness:
        yield harness


# -- register and verify ---------------------------------------------------------------------------


async def test_register_sends_a_verification_link_that_verifies_once(hb: Harness) -> None:
    resp = await hb.call("POST", "/auth/register", json={"email": " Ann@Example.COM ", "password": PASSWORD})
    assert resp.status == 201
    user = (await resp.json())["data"]["user"]
    assert set(user) == USER_KEYS
    assert user["email"] == "ann@example.com"
    assert user["display_name"] == "ann"
    assert user["email_verified"] is False
    assert ISO_UTC.match(user["created_at"])

    token = await hb.mail_token("ann@example.com", "verify_email")
    session = await hb.login("ann@example.com")
    assert session["user"]["email_verified"] is False
    assert await hb.ok("POST", "/auth/verify-email", json={"token": token}) == {}
    me = await hb.ok("GET", "/auth/me", session["access_token"])
    assert me == {**user, "email_verified": True}
    await hb.fails("POST", "/auth/verify-email", 401, "INVALID_TOKEN", json={"token": token})
    await hb.fails("POST", "/auth/verify-email", 401, "INVALID_TOKEN", json={"token": "x" * 43})


async def test_verification_link_expires(h: Harness) -> None:
    await h.register("exp@example.com")
    token = await h.mail_token("exp@example.com", "verify_email")
    await h.services.db.execute("UPDATE email_tokens SET expires_at = 0")
    await h.fails("POST", "/auth/verify-email", 401, "TOKEN_EXPIRED", json={"token": token})


async def test_email_taken_is_case_insensitive(h: Harness) -> None:
    await h.register("Bob@Example.com", display_name="Bob")
    error = await h.fails("POST", "/auth/register", 409, "EMAIL_TAKEN",
                          json={"email": "bob@EXAMPLE.com", "password": PASSWORD})
    assert error["details"]["field"] == "email"
    assert await h.mail_count("bob@example.com", "verify_email") == 1  # the refused one sent nothing


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"email": "a@example.com", "password": "short"}, "password"),
        ({"email": "not-an-email", "password": PASSWORD}, "email"),
        ({"email": "a@b", "password": PASSWORD}, "email"),
        ({"email": "a\r\nBcc: x@example.com", "password": PASSWORD}, "email"),
        ({"email": 5, "password": PASSWORD}, "email"),
        ({"email": "a@example.com", "password": ["x"] * 12}, "password"),
        ({"email": "a@example.com", "password": PASSWORD, "display_name": 7}, "display_name"),
        ({"password": PASSWORD}, "email"),
        ({"email": "a@example.com"}, "password"),
    ],
)
async def test_register_validation_names_the_field(h: Harness, body: dict[str, Any], field: str) -> None:
    error = await h.fails("POST", "/auth/register", 400, "VALIDATION_ERROR", json=body)
    assert error["details"]["field"] == field


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b""])
async def test_register_refuses_a_body_that_is_not_a_json_object(h: Harness, raw: bytes) -> None:
    error = await h.fails("POST", "/auth/register", 400, "VALIDATION_ERROR", data=raw,
                          headers={"Content-Type": "application/json"})
    assert error["details"]["field"] == "body"


async def test_registrations_are_limited_per_ip(make_settings: Callable[..., Settings]) -> None:
    async with running(make_settings(rate_register_ip="2/3600")) as h:
        await h.register("r1@example.com")
        await h.register("r2@example.com")
        resp = await h.call("POST", "/auth/register", json={"email": "r3@example.com", "password": PASSWORD})
        assert resp.status == 429
        assert (await resp.json())["error"]["code"] == "RATE_LIMIT_EXCEEDED"
        assert int(resp.headers["Retry-After"]) >= 1


# -- login ---------------------------------------------------------------------------------------


async def test_login_answers_the_token_pair(hb: Harness) -> None:
    user = await hb.register("carol@example.com")
    data = await hb.login("CAROL@example.com", device_name="laptop")
    assert set(data) == {"access_token", "refresh_token", "expires_in", "token_type", "user"}
    assert data["token_type"] == "Bearer"
    assert data["expires_in"] == hb.services.settings.access_token_ttl_s
    assert data["user"] == user
    assert await hb.ok("GET", "/auth/me", data["access_token"]) == user


async def test_unknown_email_and_wrong_password_answer_the_same(h: Harness) -> None:
    await h.register("dave@example.com")
    wrong = await h.fails("POST", "/auth/login", 401, "INVALID_CREDENTIALS",
                          json={"email": "dave@example.com", "password": "wrong password!"})
    unknown = await h.fails("POST", "/auth/login", 401, "INVALID_CREDENTIALS",
                            json={"email": "nobody@example.com", "password": "wrong password!"})
    assert wrong == unknown
    await h.fails("POST", "/auth/login", 400, "VALIDATION_ERROR", json={"email": "dave@example.com"})


async def test_failed_logins_are_limited_per_email_before_the_password_is_checked(
    make_settings: Callable[..., Settings],
) -> None:
    async with running(make_settings(rate_login_email="3/900")) as h:
        await h.register("eve@example.com")
        await h.login("eve@example.com")  # successes do not count
        for _ in range(3):
            await h.fails("POST", "/auth/login", 401, "INVALID_CREDENTIALS",
                          json={"email": "eve@example.com", "password": "guess guess guess"})
        # Locked out: even the right password gets 429, so the limit cannot be used to test guesses.
        resp = await h.call("POST", "/auth/login", json={"email": "EVE@example.com", "password": PASSWORD})
        body = await resp.json()
        assert (resp.status, body["error"]["code"]) == (429, "RATE_LIMIT_EXCEEDED")
        assert resp.headers["X-RateLimit-Limit"] == "3"
        assert resp.headers["X-RateLimit-Remaining"] == "0"
        assert int(resp.headers["X-RateLimit-Reset"]) > time.time()
        assert int(resp.headers["Retry-After"]) >= 1
        await h.register("frank@example.com")  # another account is not affected
        await h.login("frank@example.com")


async def test_failed_logins_are_limited_per_ip(make_settings: Callable[..., Settings]) -> None:
    async with running(make_settings(rate_login_ip="2/900")) as h:
        for n in range(2):
            await h.fails("POST", "/auth/login", 401, "INVALID_CREDENTIALS",
                          json={"email": f"x{n}@example.com", "password": "nope nope nope"})
        await h.fails("POST", "/auth/login", 429, "RATE_LIMIT_EXCEEDED",
                      json={"email": "x9@example.com", "password": "nope nope nope"})


# -- refresh rotation ------------------------------------------------------------------------------


async def test_refresh_rotates_and_reuse_revokes_the_whole_family(hb: Harness) -> None:
    first = await hb.signup("gina@example.com")
    second = await hb.ok("POST", "/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert set(second) == {"access_token", "refresh_token", "expires_in", "token_type", "user"}
    assert second["refresh_token"] != first["refresh_token"]
    third = await hb.ok("POST", "/auth/refresh", json={"refresh_token": second["refresh_token"]})
    await hb.ok("GET", "/auth/me", third["access_token"])

    other = await hb.login("gina@example.com")  # another session: not part of the family

    await hb.fails("POST", "/auth/refresh", 401, "REFRESH_TOKEN_REUSED", json={"refresh_token": first["refresh_token"]})
    # The whole family is dead at once: the newest refresh token and every access token.
    await hb.fails("POST", "/auth/refresh", 401, "INVALID_TOKEN", json={"refresh_token": third["refresh_token"]})
    for access in (first["access_token"], second["access_token"], third["access_token"]):
        await hb.fails("GET", "/auth/me", 401, "INVALID_TOKEN", access)
    await hb.ok("GET", "/auth/me", other["access_token"])
    await hb.ok("POST", "/auth/refresh", json={"refresh_token": other["refresh_token"]})


async def test_refresh_refuses_unknown_expired_and_malformed(h: Harness) -> None:
    session = await h.signup("hank@example.com")
    await h.fails("POST", "/auth/refresh", 401, "INVALID_TOKEN", json={"refresh_token": "A" * 43})
    await h.fails("POST", "/auth/refresh", 400, "VALIDATION_ERROR", json={"refresh_token": 42})
    await h.services.db.execute("UPDATE refresh_tokens SET expires_at = 0")
    await h.fails("POST", "/auth/refresh", 401, "TOKEN_EXPIRED", json={"refresh_token": session["refresh_token"]})


async def test_logout_ends_the_session_at_once(hb: Harness) -> None:
    session = await hb.signup("ida@example.com")
    assert await hb.ok("POST", "/auth/logout", session["access_token"]) == {}
    await hb.fails("GET", "/auth/me", 401, "INVALID_TOKEN", session["access_token"])
    await hb.fails("POST", "/auth/refresh", 401, "INVALID_TOKEN", json={"refresh_token": session["refresh_token"]})
    await hb.fails("POST", "/auth/logout", 401, "INVALID_TOKEN")


# -- sessions -------------------------------------------------------------------------------------


async def test_sessions_list_and_revoke(hb: Harness) -> None:
    phone = await hb.signup("jo@example.com", display_name="Jo")
    laptop = await hb.login("jo@example.com", device_name="laptop")
    stranger = await hb.signup("kim@example.com")

    page = await hb.ok("GET", "/auth/sessions", laptop["access_token"])
    assert page["next_cursor"] is None
    by_device = {s["device_name"]: s for s in page["items"]}
    assert set(by_device) == {"", "laptop"}
    assert by_device["laptop"]["current"] is True and by_device[""]["current"] is False
    assert set(by_device["laptop"]) == {"id", "device_name", "ip_hash", "created_at", "last_used_at", "current"}
    assert by_device["laptop"]["ip_hash"] and "127.0.0.1" not in str(page)
    assert ISO_UTC.match(by_device["laptop"]["last_used_at"])

    first = await hb.ok("GET", "/auth/sessions?limit=1", laptop["access_token"])
    assert len(first["items"]) == 1 and first["next_cursor"]
    rest = await hb.ok("GET", f"/auth/sessions?limit=1&cursor={first['next_cursor']}", laptop["access_token"])
    assert [s["id"] for s in first["items"] + rest["items"]] == [s["id"] for s in page["items"]]
    await hb.fails("GET", "/auth/sessions?cursor=%%%", 400, "VALIDATION_ERROR", laptop["access_token"])

    phone_id = by_device[""]["id"]
    await hb.fails("DELETE", f"/auth/sessions/{phone_id}", 404, "NOT_FOUND", stranger["access_token"])
    resp = await hb.call("DELETE", f"/auth/sessions/{phone_id}", laptop["access_token"])
    assert resp.status == 204 and await resp.read() == b""
    await hb.fails("GET", "/auth/me", 401, "INVALID_TOKEN", phone["access_token"])
    await hb.fails("DELETE", f"/auth/sessions/{phone_id}", 404, "NOT_FOUND", laptop["access_token"])
    remaining = await hb.ok("GET", "/auth/sessions", laptop["access_token"])
    assert [s["device_name"] for s in remaining["items"]] == ["laptop"]


async def test_session_endpoints_need_a_user_access_token(h: Harness) -> None:
    session = await h.signup("lee@example.com")
    created = await h.ok("POST", "/tokens", session["access_token"], json={"name": "ci", "scopes": ["publish"]},
                         status=201)
    api_token = created["token"]
    assert (await h.ok("GET", "/auth/me", api_token))["email"] == "lee@example.com"
    await h.fails("GET", "/auth/sessions", 403, "FORBIDDEN", api_token)
    await h.fails("POST", "/auth/logout", 403, "FORBIDDEN", api_token)
    await h.fails("PATCH", "/auth/me", 403, "FORBIDDEN", api_token, json={"display_name": "x"})
    await h.fails("GET", "/auth/sessions", 401, "INVALID_TOKEN")


# -- forgot / reset --------------------------------------------------------------------------------


async def test_forgot_and_reset_password(hb: Harness) -> None:
    session = await hb.signup("max@example.com")
    other = await hb.login("max@example.com")
    assert await hb.ok("POST", "/auth/forgot-password", json={"email": "nobody@example.com"}) == {}
    assert await hb.mail_count("nobody@example.com", "password_reset") == 0
    assert await hb.ok("POST", "/auth/forgot-password", json={"email": "MAX@example.com"}) == {}
    token = await hb.mail_token("max@example.com", "password_reset")

    await hb.fails("POST", "/auth/reset-password", 400, "VALIDATION_ERROR", json={"token": token, "password": "short"})
    new_password = "a brand new passphrase"
    assert await hb.ok("POST", "/auth/reset-password", json={"token": token, "password": new_password}) == {}
    # Every session is gone at once; the old password no longer works, the new one does.
    for s in (session, other):
        await hb.fails("GET", "/auth/me", 401, "INVALID_TOKEN", s["access_token"])
        await hb.fails("POST", "/auth/refresh", 401, "INVALID_TOKEN", json={"refresh_token": s["refresh_token"]})
    await hb.fails("POST", "/auth/login", 401, "INVALID_CREDENTIALS", json={"email": "max@example.com", "password": PASSWORD})
    fresh = await hb.login("max@example.com", new_password)
    assert fresh["user"]["email_verified"] is True  # the link proved the address
    # Single use.
    await hb.fails("POST", "/auth/reset-password", 401, "INVALID_TOKEN", json={"token": token, "password": PASSWORD})


async def test_reset_token_expires_and_a_reset_voids_older_links(h: Harness) -> None:
    await h.register("ned@example.com")
    await h.ok("POST", "/auth/forgot-password", json={"email": "ned@example.com"})
    stale = await h.mail_token("ned@example.com", "password_reset")
    await h.services.db.execute("UPDATE email_tokens SET expires_at = 0 WHERE purpose = 'reset'")
    await h.fails("POST", "/auth/reset-password", 401, "TOKEN_EXPIRED", json={"token": stale, "password": PASSWORD})

    await h.ok("POST", "/auth/forgot-password", json={"email": "ned@example.com"})
    older = await h.mail_token("ned@example.com", "password_reset")
    await h.ok("POST", "/auth/forgot-password", json={"email": "ned@example.com"})
    await h.ok("POST", "/auth/reset-password", json={"token": older, "password": "another good password"})
    newest = [t for t in (await _all_reset_tokens(h)) if t not in (stale, older)]
    assert len(newest) == 1
    await h.fails("POST", "/auth/reset-password", 401, "INVALID_TOKEN", json={"token": newest[0], "password": PASSWORD})


async def _all_reset_tokens(h: Harness) -> list[str]:
    rows = await h.services.db.fetch("SELECT body_text FROM outbox WHERE template = 'password_reset'")
    return [m.group(1) for r in rows if (m := TOKEN_IN_LINK.search(r["body_text"]))]


async def test_forgot_password_limit_is_silent(make_settings: Callable[..., Settings]) -> None:
    async with running(make_settings(rate_forgot_email="1/3600")) as h:
        await h.register("ola@example.com")
        assert await h.ok("POST", "/auth/forgot-password", json={"email": "ola@example.com"}) == {}
        assert await h.ok("POST", "/auth/forgot-password", json={"email": "ola@example.com"}) == {}
        assert await h.mail_count("ola@example.com", "password_reset") == 1
        await h.fails("POST", "/auth/forgot-password", 400, "VALIDATION_ERROR", json={"email": "nope"})


# -- PATCH /auth/me --------------------------------------------------------------------------------


async def test_patch_me_changes_name_and_password(hb: Harness) -> None:
    mine = await hb.signup("pat@example.com")
    other = await hb.login("pat@example.com")
    token = mine["access_token"]
    renamed = await hb.ok("PATCH", "/auth/me", token, json={"display_name": "Patricia"})
    assert renamed["display_name"] == "Patricia" and set(renamed) == USER_KEYS
    await hb.fails("PATCH", "/auth/me", 400, "VALIDATION_ERROR", token, json={"display_name": ""})

    new_password = "patricias new password"
    error = await hb.fails("PATCH", "/auth/me", 400, "VALIDATION_ERROR", token, json={"password": new_password})
    assert error["details"]["field"] == "current_password"
    await hb.fails("PATCH", "/auth/me", 401, "INVALID_CREDENTIALS", token,
                   json={"password": new_password, "current_password": "not my password"})
    await hb.fails("PATCH", "/auth/me", 400, "VALIDATION_ERROR", token,
                   json={"password": "short", "current_password": PASSWORD})
    await hb.ok("PATCH", "/auth/me", token, json={"password": new_password, "current_password": PASSWORD})

    await hb.ok("GET", "/auth/me", token)  # this session survives
    await hb.fails("GET", "/auth/me", 401, "INVALID_TOKEN", other["access_token"])  # the others do not
    await hb.fails("POST", "/auth/login", 401, "INVALID_CREDENTIALS", json={"email": "pat@example.com", "password": PASSWORD})
    await hb.login("pat@example.com", new_password)


# -- access JWT rules ------------------------------------------------------------------------------


def _claims(session: dict[str, Any], **changes: Any) -> dict[str, Any]:
    real = jwt.decode(session["access_token"], options={"verify_signature": False})
    return {**real, **changes}


async def test_forged_and_expired_access_tokens(make_settings: Callable[..., Settings]) -> None:
    key = "k" * 64  # long enough for HS512 without PyJWT's short-key warning
    async with running(make_settings(jwt_secret=key)) as h:
        session = await h.signup("quinn@example.com")
        claims = _claims(session)
        now = int(time.time())

        def unsigned(header: dict[str, Any]) -> str:
            def part(obj: dict[str, Any]) -> str:
                return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

            return f"{part(header)}.{part(claims)}."

        invalid = [
            unsigned({"alg": "none", "typ": "JWT"}),
            jwt.encode(claims, key, algorithm="HS512"),
            jwt.encode(claims, "w" * 64, algorithm="HS256"),
            jwt.encode({**claims, "exp": now - 10}, "w" * 64, algorithm="HS256"),  # forged and expired
            jwt.encode({**claims, "typ": "refresh"}, key, algorithm="HS256"),
            jwt.encode({k: v for k, v in claims.items() if k != "sid"}, key, algorithm="HS256"),
            jwt.encode({**claims, "sid": "no-such-session"}, key, algorithm="HS256"),
            unsigned({"alg": "EdDSA", "typ": "JWT"}),
            session["access_token"][:-4] + "AAAA",
            "a.b.c",
            "not-a-token",
            "sbd_" + "x" * 43,
            "sbt_" + "x" * 43,
        ]
        for token in invalid:
            resp = await h.call("GET", "/auth/me", token)
            body = await resp.json()
            assert (resp.status, body["error"]["code"]) == (401, "INVALID_TOKEN"), token
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")

        expired = jwt.encode({**claims, "iat": now - 100, "exp": now - 10}, key, algorithm="HS256")
        await h.fails("GET", "/auth/me", 401, "TOKEN_EXPIRED", expired)
        for header in ({"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer "}, {}):
            await h.fails("GET", "/auth/me", 401, "INVALID_TOKEN", headers=header)
        # The genuine one still works.
        assert (await h.ok("GET", "/auth/me", session["access_token"]))["email"] == "quinn@example.com"


# -- password hashing ------------------------------------------------------------------------------


async def test_passwords_are_argon2id_hashed_off_the_loop_and_unknown_emails_cost_a_verify(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nacl import pwhash

    threads: list[str] = []
    real_str, real_verify = pwhash.argon2id.str, pwhash.argon2id.verify

    def spy_str(*args: Any, **kwargs: Any) -> bytes:
        threads.append(threading.current_thread().name)
        return real_str(*args, **kwargs)

    def spy_verify(*args: Any, **kwargs: Any) -> bool:
        threads.append(threading.current_thread().name)
        return bool(real_verify(*args, **kwargs))

    monkeypatch.setattr(pwhash.argon2id, "str", spy_str)
    monkeypatch.setattr(pwhash.argon2id, "verify", spy_verify)
    await h.register("rae@example.com")
    stored = await h.services.db.fetchval("SELECT password_hash FROM users WHERE email = 'rae@example.com'")
    assert stored.startswith("$argon2id$") and PASSWORD not in stored
    assert len(threads) == 1
    # An unknown email runs one argon2id verify (against the dummy hash), like a wrong password.
    await h.fails("POST", "/auth/login", 401, "INVALID_CREDENTIALS",
                  json={"email": "nobody@example.com", "password": PASSWORD})
    verifies_unknown = len(threads) - 1
    await h.fails("POST", "/auth/login", 401, "INVALID_CREDENTIALS",
                  json={"email": "rae@example.com", "password": "wrong password"})
    assert verifies_unknown >= 1 and len(threads) - 1 - verifies_unknown == 1
    main = threading.main_thread().name
    assert threads and all(name.startswith("argon2") and name != main for name in threads)
