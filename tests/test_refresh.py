"""Credential refresh on a live socket (realtime.md): ``refresh`` -> ``refreshed``, close 4001 at
expiry, and every refusal keeps the old credential.

The expiry tests use real user access JWTs (register + login through the API, ACCESS_TOKEN_TTL_S
of 2 s), so they wait for the wall clock; the waits are deadlines, nothing asserts a duration.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import jwt
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from relay.refresh import CredentialWatch, same_principal
from shared.codes import ErrorCode
from shared.errors import ApiError
from shared.principals import SCOPES, Principal
from tests.auth_helpers import PASSWORD
from tests.test_ws_handshake import recv_hello

TIMEOUT = 10.0
TTL_S = 2


async def recv_json(ws: ClientConnection, timeout: float = TIMEOUT) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), timeout))
    return message


async def closed_with(ws: ClientConnection) -> int:
    """Read until the server closes; the code it sent."""
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await recv_json(ws, TIMEOUT + TTL_S)
    assert info.value.rcvd is not None, "no close frame from the server"
    return info.value.rcvd.code


async def sleep_until(unix_s: float) -> None:
    await asyncio.sleep(max(0.0, unix_s - time.time()))


def exp_of(token: str) -> int:
    return int(jwt.decode(token, options={"verify_signature": False})["exp"])


def conn_of(server: Any) -> Any:
    (conn,) = list(server.state.registry)
    return conn


# -- real user JWTs ------------------------------------------------------------------------------


class Api:
    def __init__(self, http: aiohttp.ClientSession, port: int) -> None:
        self.http = http
        self.base = f"http://127.0.0.1:{port}/api/v1"
        self.ws = f"ws://127.0.0.1:{port}/ws"

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        async with self.http.post(self.base + path, json=body) as resp:
            answer = await resp.json()
            assert resp.status in (200, 201), answer
            return dict(answer["data"])

    async def signup(self, email: str) -> dict[str, Any]:
        """Register and log in: the login answer (access_token, refresh_token, user, ...)."""
        await self.post("/auth/register", {"email": email, "password": PASSWORD})
        return await self.post("/auth/login", {"email": email, "password": PASSWORD})

    def connect(self, token: str) -> Any:
        return connect(f"{self.ws}?token={token}", ping_interval=None)


@pytest.fixture
async def api(server_factory: Any, make_settings: Any) -> Any:
    server = await server_factory(make_settings(access_token_ttl_s=TTL_S))
    async with aiohttp.ClientSession() as http:
        yield Api(http, server.port), server


async def test_unrefreshed_socket_is_closed_4001_at_expiry(api: Any) -> None:
    client, _ = api
    login = await client.signup("ada@example.com")
    async with client.connect(login["access_token"]) as ws:
        assert (await recv_hello(ws))["type"] == "hello"
        assert await closed_with(ws) == 4001
    assert time.time() >= exp_of(login["access_token"])  # not before the credential expired


async def test_refreshed_socket_outlives_the_old_expiry(api: Any) -> None:
    client, server = api
    login = await client.signup("ada@example.com")
    old_exp = exp_of(login["access_token"])
    async with client.connect(login["access_token"]) as ws:
        assert (await recv_hello(ws))["type"] == "hello"
        await sleep_until(old_exp - 0.9)  # the next token is issued a whole second later
        renewed = await client.post("/auth/refresh", {"refresh_token": login["refresh_token"]})
        new_exp = exp_of(renewed["access_token"])
        assert new_exp > old_exp
        await ws.send(json.dumps({"type": "refresh", "token": renewed["access_token"], "request_id": "r-1"}))
        assert await recv_json(ws) == {"type": "refreshed", "exp": new_exp, "request_id": "r-1"}
        assert conn_of(server).principal.exp == new_exp
        await sleep_until(old_exp + 0.5)
        await ws.send(json.dumps({"type": "ping"}))
        assert await recv_json(ws) == {"type": "pong"}  # still open past the old expiry
        assert await closed_with(ws) == 4001  # and the new credential expires in its turn
    assert time.time() >= new_exp


async def test_another_users_token_is_refused_and_the_old_credential_stays(api: Any) -> None:
    client, server = api
    ada = await client.signup("ada@example.com")
    bob = await client.signup("bob@example.com")
    async with client.connect(ada["access_token"]) as ws:
        assert (await recv_hello(ws))["type"] == "hello"
        before = conn_of(server).principal
        await ws.send(json.dumps({"type": "refresh", "token": bob["access_token"]}))
        error = await recv_json(ws)
        assert error["type"] == "error" and error["code"] == "FORBIDDEN" and error["message"]
        assert conn_of(server).principal is before
        await ws.send(json.dumps({"type": "refresh", "token": "not-a-token"}))
        error = await recv_json(ws)
        assert error["type"] == "error" and error["code"] == "INVALID_TOKEN"
        await ws.send(json.dumps({"type": "refresh", "token": "a.b.c", "request_id": 7}))
        error = await recv_json(ws)
        assert error["code"] == "INVALID_TOKEN" and error["request_id"] == 7
        assert conn_of(server).principal is before
        # Ada's expiry still rules the socket: it closes at her token's exp, not later.
        assert await closed_with(ws) == 4001
    assert exp_of(ada["access_token"]) <= time.time() < exp_of(bob["access_token"]) + 1


# -- stub credentials: expiry shapes without the API ----------------------------------------------

USER = "u-1"


def _principals() -> dict[str, Principal]:
    soon = int(time.time()) + 1
    scopes = SCOPES - {"admin"}
    return {
        "soon": Principal("user", USER, user_id=USER, scopes=scopes, exp=soon),
        "later": Principal("user", USER, user_id=USER, scopes=scopes, exp=soon + 3600),
        "api-forever": Principal("api_token", USER, user_id=USER, scopes=frozenset({"subscribe"}), token_id="t1"),
        "api-forever-2": Principal("api_token", USER, user_id=USER, scopes=frozenset({"subscribe"}), token_id="t2"),
        "api-no-subscribe": Principal("api_token", USER, user_id=USER, scopes=frozenset({"publish"}), token_id="t3"),
    }


@pytest.fixture
async def stub(server_factory: Any, make_settings: Any) -> Any:
    principals = _principals()

    async def authenticator(token: str) -> Principal:
        if token == "expired":
            raise ApiError(ErrorCode.TOKEN_EXPIRED, "token expired")
        if token not in principals:
            raise ApiError(ErrorCode.INVALID_TOKEN, "invalid token")
        return principals[token]

    server = await server_factory(make_settings(), authenticator)
    return server, principals


def stub_connect(server: Any, token: str) -> Any:
    return connect(f"ws://127.0.0.1:{server.port}/ws?token={token}", ping_interval=None)


async def test_refresh_to_a_credential_without_expiry_disarms_the_timer(stub: Any) -> None:
    server, principals = stub
    async with stub_connect(server, "soon") as ws:
        await recv_hello(ws)
        await ws.send(json.dumps({"type": "refresh", "token": "later"}))
        assert await recv_json(ws) == {"type": "refreshed", "exp": principals["later"].exp}
        await sleep_until(principals["soon"].exp + 0.5)
        await ws.send(json.dumps({"type": "ping"}))
        assert await recv_json(ws) == {"type": "pong"}
        assert conn_of(server).principal is principals["later"]


async def test_api_tokens_without_expiry_never_arm_a_timer(stub: Any) -> None:
    server, principals = stub
    async with stub_connect(server, "api-forever") as ws:
        await recv_hello(ws)
        assert _timers(server) == {}
        # Rotating to another token of the same owner is a refresh; one without ``subscribe``
        # could not have opened the socket, so it cannot take it over either.
        await ws.send(json.dumps({"type": "refresh", "token": "api-forever-2"}))
        assert await recv_json(ws) == {"type": "refreshed", "exp": None}
        await ws.send(json.dumps({"type": "refresh", "token": "api-no-subscribe"}))
        assert (await recv_json(ws))["code"] == "FORBIDDEN"
        assert conn_of(server).principal is principals["api-forever-2"] and _timers(server) == {}
    async with stub_connect(server, "soon") as ws:
        await recv_hello(ws)
        assert len(_timers(server)) == 1
    await asyncio.sleep(0.1)
    assert _timers(server) == {}  # closed sockets leave no timer behind


def _timers(server: Any) -> dict[Any, Any]:
    """The expiry timers of ``server``'s ``CredentialWatch`` (installed as an ``on_open`` hook)."""
    (watch,) = [h.__self__ for h in server.state.on_open if isinstance(getattr(h, "__self__", None), CredentialWatch)]
    return dict(watch._timers)


async def test_refusals_keep_the_socket_open(stub: Any) -> None:
    server, principals = stub
    async with stub_connect(server, "later") as ws:
        await recv_hello(ws)
        for message, code in (
            ({"type": "refresh", "token": "expired"}, "TOKEN_EXPIRED"),
            ({"type": "refresh", "token": "api-forever"}, "FORBIDDEN"),  # another kind
            ({"type": "refresh"}, "VALIDATION_ERROR"),
            ({"type": "refresh", "token": 12}, "VALIDATION_ERROR"),
            ({"type": "refresh", "token": "x" * 10_000}, "VALIDATION_ERROR"),
        ):
            await ws.send(json.dumps(message))
            error = await recv_json(ws)
            assert error["type"] == "error" and error["code"] == code, (message, error)
        assert conn_of(server).principal is principals["later"]
        await ws.send(json.dumps({"type": "ping"}))
        assert await recv_json(ws) == {"type": "pong"}


def test_same_principal_bindings() -> None:
    device = Principal("device", "dev-1", device_id="dev-1", book_id="book-1", exp=10)
    assert same_principal(device, Principal("device", "dev-1", device_id="dev-1", book_id="book-1", exp=20))
    assert not same_principal(device, Principal("device", "dev-1", device_id="dev-1", book_id="book-2"))
    assert not same_principal(device, Principal("device", "dev-2", device_id="dev-2", book_id="book-1"))
    user = Principal("user", "u-1", user_id="u-1", scopes=SCOPES)
    assert same_principal(user, Principal("user", "u-1", user_id="u-1", scopes=SCOPES, session_id="s-2"))
    assert not same_principal(user, Principal("user", "u-2", user_id="u-2", scopes=SCOPES))
    assert not same_principal(user, Principal("api_token", "u-1", user_id="u-1", scopes=SCOPES))
    daemon = Principal("daemon", "d-1", user_id="u-1", device_id="d-1")
    assert not same_principal(daemon, Principal("daemon", "d-1", user_id="u-2", device_id="d-1"))
