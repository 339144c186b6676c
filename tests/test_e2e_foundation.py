"""The foundation issue's acceptance flow, against the real one-port server on a real socket.

A new user registers, reads the verification email from the outbox, verifies, logs in, refreshes
twice, replays the first refresh token (whole family revoked), creates an API token with scope
``subscribe`` and opens ``/ws?token=...`` with a plain WebSocket client. Bad input on the way gets
the contract's codes. Runs on the embedded default and on PostgreSQL + Redis.
"""

from __future__ import annotations

import asyncio
import base64
import email
import io
import json
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from shared.config import Settings

TOKEN_IN_LINK = re.compile(r"token=([A-Za-z0-9_-]{32,})")


async def _outbox_token(settings: Settings, to: str, timeout: float = 10.0) -> str:
    """The token in the newest email to ``to``, from the .eml outbox (no SMTP_URL set)."""
    outbox = Path(settings.data_dir) / "outbox"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in sorted(outbox.glob("*.eml"), key=lambda p: p.stat().st_mtime, reverse=True):
            msg = email.message_from_bytes(path.read_bytes())
            if to in str(msg["To"]):
                body = msg.get_payload(decode=True) if not msg.is_multipart() else msg.get_payload(0).get_payload(decode=True)
                match = TOKEN_IN_LINK.search(body.decode())
                if match:
                    # A person greps the raw file (README walk): the link must be there verbatim.
                    assert f"token={match.group(1)}".encode() in path.read_bytes()
                    return match.group(1)
        await asyncio.sleep(0.05)
    raise AssertionError(f"no email to {to} in {outbox}")


async def _call(
    http: aiohttp.ClientSession, method: str, path: str, body: Any = None, token: str | None = None, raw: bytes | None = None
) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if raw is not None:
        headers["Content-Type"] = "application/json"
        # BytesIO: aiohttp warns (an error here) about large raw bytes bodies.
        resp = await http.request(method, path, data=io.BytesIO(raw), headers=headers)
    else:
        resp = await http.request(method, path, json=body, headers=headers)
    async with resp:
        text = await resp.text()
        assert resp.headers.get("API-Version") == "1.0"
        return resp.status, (json.loads(text) if text else {})


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


async def test_new_user_flow_end_to_end(server_factory: Any, backend_settings: Settings) -> None:
    server = await server_factory(backend_settings)
    base = f"http://127.0.0.1:{server.port}"
    addr = "Newcomer@Example.com"
    async with aiohttp.ClientSession(base) as http:
        # -- register, with the bad-input cases first ------------------------------------------
        status, body = await _call(http, "POST", "/api/v1/auth/register", raw=b"{not json")
        assert (status, body["error"]["code"]) == (400, "VALIDATION_ERROR")
        status, body = await _call(http, "POST", "/api/v1/auth/register", {"email": addr})
        assert (status, body["error"]["code"]) == (400, "VALIDATION_ERROR")
        assert body["error"]["details"]["field"] == "password"
        status, body = await _call(http, "POST", "/api/v1/auth/register", raw=b'{"x":"' + b"a" * (2 * 1024 * 1024) + b'"}')
        assert (status, body["error"]["code"]) == (413, "PAYLOAD_TOO_LARGE")

        status, body = await _call(
            http, "POST", "/api/v1/auth/register", {"email": addr, "password": "correct horse battery", "display_name": "New"}
        )
        assert status == 201, body
        user = body["data"]["user"] if "user" in body["data"] else body["data"]
        assert user["email"] == addr.lower() and user["email_verified"] is False
        assert set(user) >= {"id", "email", "display_name", "email_verified", "created_at"}
        status, body = await _call(http, "POST", "/api/v1/auth/register", {"email": addr.upper(), "password": "x" * 12})
        assert (status, body["error"]["code"]) == (409, "EMAIL_TAKEN")

        # -- verify from the outbox ------------------------------------------------------------
        token = await _outbox_token(backend_settings, addr.lower())
        status, body = await _call(http, "POST", "/api/v1/auth/verify-email", {"token": token})
        assert status == 200, body

        # -- login (wrong password first) --------------------------------------------------------
        status, body = await _call(http, "POST", "/api/v1/auth/login", {"email": addr, "password": "wrong password!"})
        assert (status, body["error"]["code"]) == (401, "INVALID_CREDENTIALS")
        status, body = await _call(http, "POST", "/api/v1/auth/login", {"email": "nobody@example.com", "password": "wrong password!"})
        assert (status, body["error"]["code"]) == (401, "INVALID_CREDENTIALS")
        status, body = await _call(http, "POST", "/api/v1/auth/login", {"email": addr, "password": "correct horse battery"})
        assert status == 200, body
        login = body["data"]
        assert login["token_type"] == "Bearer" and login["user"]["email_verified"] is True

        # -- refresh twice, then replay the first refresh token ------------------------------------
        first_refresh = login["refresh_token"]
        status, body = await _call(http, "POST", "/api/v1/auth/refresh", {"refresh_token": first_refresh})
        assert status == 200, body
        status, body = await _call(http, "POST", "/api/v1/auth/refresh", {"refresh_token": body["data"]["refresh_token"]})
        assert status == 200, body
        newest = body["data"]
        status, body = await _call(http, "GET", "/api/v1/auth/me", token=newest["access_token"])
        assert status == 200 and body["data"]["email"] == addr.lower()

        status, body = await _call(http, "POST", "/api/v1/auth/refresh", {"refresh_token": first_refresh})
        assert (status, body["error"]["code"]) == (401, "REFRESH_TOKEN_REUSED")
        status, body = await _call(http, "POST", "/api/v1/auth/refresh", {"refresh_token": newest["refresh_token"]})
        assert (status, body["error"]["code"]) == (401, "INVALID_TOKEN")
        status, body = await _call(http, "GET", "/api/v1/auth/me", token=newest["access_token"])
        assert (status, body["error"]["code"]) == (401, "INVALID_TOKEN")

        # -- a fresh session creates an API token with scope subscribe ------------------------------
        status, body = await _call(http, "POST", "/api/v1/auth/login", {"email": addr, "password": "correct horse battery"})
        access = body["data"]["access_token"]
        status, body = await _call(http, "POST", "/api/v1/tokens", {"name": "ws", "scopes": ["subscribe"]}, token=access)
        assert status == 201, body
        api_token = body["data"]["token"]
        assert api_token.startswith("sbt_")
        status, body = await _call(http, "POST", "/api/v1/tokens", {"name": "nope", "scopes": ["teleport"]}, token=access)
        assert (status, body["error"]["code"]) == (400, "VALIDATION_ERROR")

        # -- forged credentials ------------------------------------------------------------------
        claims = jwt.decode(access, options={"verify_signature": False})
        none_alg = f"{_b64url(json.dumps({'alg': 'none', 'typ': 'JWT'}).encode())}.{_b64url(json.dumps(claims).encode())}."
        wrong_key = jwt.encode(claims, "not-the-server-secret-at-all-000000", algorithm="HS256")
        expired = jwt.encode({**claims, "exp": int(time.time()) - 3600, "iat": int(time.time()) - 7200},
                             backend_settings.jwt_secret, algorithm="HS256")
        for forged, code in ((none_alg, "INVALID_TOKEN"), (wrong_key, "INVALID_TOKEN"), ("garbage", "INVALID_TOKEN"),
                             (expired, "TOKEN_EXPIRED")):
            status, body = await _call(http, "GET", "/api/v1/auth/me", token=forged)
            assert (status, body["error"]["code"]) == (401, code), forged

    # -- the socket, with the API token in the query -------------------------------------------
    ws_base = f"ws://127.0.0.1:{server.port}"
    async with connect(f"{ws_base}/ws?token={api_token}") as ws:
        hello = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert hello["type"] == "hello" and hello["principal"]["kind"] == "api_token"
        assert hello["connection_id"].startswith("c-") and hello["heartbeat_s"] == int(backend_settings.heartbeat_s)
        assert json.loads(await asyncio.wait_for(ws.recv(), 5)) == {"type": "synced", "cursor": hello["cursor"]}
        await ws.send(json.dumps({"type": "ping", "request_id": "p1"}))
        pong = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert pong == {"type": "pong", "request_id": "p1"}
    for bad in (none_alg, "sbt_" + "A" * 43, ""):
        with pytest.raises(InvalidStatus) as info:
            async with connect(f"{ws_base}/ws?token={bad}"):
                pass
        assert info.value.response.status_code == 401
        assert json.loads(info.value.response.body)["error"]["code"] == "INVALID_TOKEN"
