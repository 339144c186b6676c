"""Audit log (README "Operations", rest.md "Audit"): events recorded with hashed IPs and
subjects, exported per user as JSON lines, pruned after 90 days."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from api.app import create_app
from api.routes import audit as audit_routes
from shared import audit
from shared.clock import now_ms
from shared.config import Settings
from shared.secrets import hash_id
from shared.services import open_services
from tests.auth_helpers import ISO_UTC, PASSWORD, Harness, running

DAY_MS = 86_400_000


async def export(h: Harness, token: str) -> list[dict[str, Any]]:
    resp = await h.call("GET", "/audit/export", token)
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("application/x-ndjson")
    assert resp.headers["API-Version"] == "1.0"
    text = await resp.text()
    assert "127.0.0.1" not in text
    return [json.loads(line) for line in text.splitlines()]


async def test_export_has_the_callers_events_with_hashed_ips(backend_settings: Settings) -> None:
    async with running(backend_settings) as h:
        await h.register("ann@example.com")
        await h.fails("POST", "/auth/login", 401, "INVALID_CREDENTIALS",
                      json={"email": "ann@example.com", "password": "wrong password"})
        session = await h.login("ann@example.com")
        token = session["access_token"]
        await h.ok("POST", "/auth/verify-email", json={"token": await h.mail_token("ann@example.com", "verify_email")})
        created = await h.ok("POST", "/tokens", token, json={"name": "ci", "scopes": ["publish"]}, status=201)
        await h.ok("PATCH", f"/tokens/{created['id']}", token, json={"name": "ci2"})
        await h.call("DELETE", f"/tokens/{created['id']}", token)
        refreshed = await h.ok("POST", "/auth/refresh", json={"refresh_token": session["refresh_token"]})
        await h.fails("POST", "/auth/refresh", 401, "REFRESH_TOKEN_REUSED",
                      json={"refresh_token": session["refresh_token"]})
        await h.fails("GET", "/auth/me", 401, "INVALID_TOKEN", refreshed["access_token"])
        token = (await h.login("ann@example.com"))["access_token"]
        await h.ok("PATCH", "/auth/me", token, json={"password": "another password", "current_password": PASSWORD})
        await h.ok("POST", "/auth/logout", token)
        await h.ok("POST", "/auth/forgot-password", json={"email": "ann@example.com"})
        reset = await h.mail_token("ann@example.com", "password_reset")
        await h.ok("POST", "/auth/reset-password", json={"token": reset, "password": "third password!"})
        old = (await h.login("ann@example.com", "third password!"))["access_token"]
        token = (await h.login("ann@example.com", "third password!"))["access_token"]
        sessions = (await h.ok("GET", "/auth/sessions", token))["items"]
        old_id = next(s["id"] for s in sessions if not s["current"])
        await h.call("DELETE", f"/auth/sessions/{old_id}", token)
        await h.fails("GET", "/auth/me", 401, "INVALID_TOKEN", old)
        await h.signup("bob@example.com")  # someone else's entries

        entries = await export(h, token)
        events = [e["event"] for e in entries]
        assert events == [
            "auth.register", "auth.login_failed", "auth.login", "auth.email_verified", "token.created",
            "token.updated", "token.revoked", "auth.refresh_reused", "auth.login", "auth.password_changed",
            "auth.logout", "auth.password_reset_requested", "auth.password_reset", "auth.login", "auth.login",
            "auth.session_revoked",
        ]
        assert entries[-1]["details"] == {"session_id": old_id}
        assert [e["id"] for e in entries] == sorted(e["id"] for e in entries)  # newest last
        for entry in entries:
            assert set(entry) == {"id", "event", "created_at", "ip_hash", "subject_hash", "details"}
            assert entry["ip_hash"] == hash_id("127.0.0.1")
            assert ISO_UTC.match(entry["created_at"])
        assert entries[1]["subject_hash"] == hash_id("ann@example.com")
        assert entries[4]["details"] == {"token_id": created["id"], "scopes": ["publish"]}


async def test_failed_login_for_an_unknown_email_is_recorded_without_user(make_settings: Callable[..., Settings]) -> None:
    async with running(make_settings()) as h:
        await h.fails("POST", "/auth/login", 401, "INVALID_CREDENTIALS",
                      json={"email": "ghost@example.com", "password": "whatever it is"})
        row = await h.services.db.fetchrow("SELECT * FROM audit_log WHERE event = 'auth.login_failed'")
        assert row is not None
        assert row["user_id"] is None
        assert row["subject_hash"] == hash_id("ghost@example.com")
        assert "ghost" not in json.dumps(dict(row))


async def test_export_needs_a_user_token_or_admin(make_settings: Callable[..., Settings]) -> None:
    async with running(make_settings()) as h:
        jwt = (await h.signup("cat@example.com"))["access_token"]
        plain = (await h.ok("POST", "/tokens", jwt, json={"name": "p", "scopes": ["publish"]}, status=201))["token"]
        await h.fails("GET", "/audit/export", 401, "INVALID_TOKEN")
        await h.fails("GET", "/audit/export", 403, "FORBIDDEN", plain)


async def test_export_reads_in_batches(make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit_routes, "BATCH", 2)
    async with running(make_settings()) as h:
        session = await h.signup("dan@example.com")
        for n in range(4):
            await audit.record(h.services.db, user_id=session["user"]["id"], event="test.event", details={"n": n})
        entries = await export(h, session["access_token"])
        assert [e["event"] for e in entries] == ["auth.register", "auth.login"] + ["test.event"] * 4
        assert [e["details"]["n"] for e in entries[2:]] == [0, 1, 2, 3]
        assert len({e["id"] for e in entries}) == 6


async def test_prune_drops_entries_older_than_90_days(backend_settings: Settings) -> None:
    services = await open_services(backend_settings)
    try:
        await audit.record(services.db, user_id="u1", event="recent")
        await audit.record(services.db, user_id="u1", event="old")
        await audit.record(services.db, user_id="u1", event="almost")
        await services.db.execute("UPDATE audit_log SET created_at = $1 WHERE event = 'old'", now_ms() - 91 * DAY_MS)
        await services.db.execute("UPDATE audit_log SET created_at = $1 WHERE event = 'almost'", now_ms() - 89 * DAY_MS)
        assert await audit.prune(services.db) == 1
        remaining = await services.db.fetch("SELECT event FROM audit_log ORDER BY id")
        assert [r["event"] for r in remaining] == ["recent", "almost"]
    finally:
        await services.close()


async def test_the_app_prunes_in_the_background(make_settings: Callable[..., Settings]) -> None:
    services = await open_services(make_settings())
    try:
        await audit.record(services.db, user_id="u1", event="old")
        await services.db.execute("UPDATE audit_log SET created_at = 0")
        async with TestClient(TestServer(create_app(services))):
            for _ in range(500):
                if await services.db.fetchval("SELECT COUNT(*) FROM audit_log") == 0:
                    break
                await asyncio.sleep(0.01)
            assert await services.db.fetchval("SELECT COUNT(*) FROM audit_log") == 0
    finally:
        await services.close()
