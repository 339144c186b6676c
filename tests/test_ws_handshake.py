"""``/ws``: the upgrade (auth before 101, refusals in the REST envelope), hello, ping/pong, framing
limits and the drain, against a real client library and against bytes written by hand.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import ssl
from pathlib import Path
from typing import Any

import msgpack
import pytest
from aiohttp import web
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from api.keys import SERVICES
from api.middleware import envelope_middleware
from api.routes import ops
from shared.codes import ErrorCode
from shared.errors import ApiError
from shared.principals import SCOPES, Principal
from shared.services import Services
from tests.fixtures.server import read_response
from tests.test_server_http import _self_signed

TIMEOUT = 5.0
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

USER = Principal("user", "u-1", user_id="u-1", scopes=SCOPES - {"admin"})
SUBSCRIBER = Principal("api_token", "t-1", user_id="u-1", scopes=frozenset({"subscribe"}), token_id="t-1")
PUBLISHER = Principal("api_token", "t-2", user_id="u-1", scopes=frozenset({"publish"}), token_id="t-2")
DAEMON = Principal("daemon", "d-1", user_id="u-1", device_id="d-1")
E2EE_DEVICE = Principal("device", "dev-1", device_id="dev-1")
TOKENS = {"user": USER, "sub": SUBSCRIBER, "pub": PUBLISHER, "daemon": DAEMON, "e2ee": E2EE_DEVICE}


async def stub_authenticator(token: str) -> Principal:
    if token == "expired":
        raise ApiError(ErrorCode.TOKEN_EXPIRED, "token expired")
    try:
        return TOKENS[token]
    except KeyError:
        raise ApiError(ErrorCode.INVALID_TOKEN, "invalid token") from None


def _app(services: Services) -> web.Application:
    """The REST shell only: these tests are about the socket side."""
    app = web.Application(middlewares=[envelope_middleware])
    app[SERVICES] = services
    app.add_routes(ops.routes)
    return app


@pytest.fixture
def start(server_factory: Any, make_settings: Any) -> Any:
    async def start(**overrides: Any) -> Any:
        return await server_factory(make_settings(**overrides), stub_authenticator, app_factory=_app)

    return start


@pytest.fixture
async def server(start: Any) -> Any:
    return await start()


def url(server: Any, path: str = "/ws", scheme: str = "ws") -> str:
    return f"{scheme}://127.0.0.1:{server.port}{path}"


async def recv_json(ws: Any) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
    return message


async def recv_hello(ws: Any) -> dict[str, Any]:
    """``hello``, then the ``synced`` that ends the inbox catch-up (nothing to replay here)."""
    hello = await recv_json(ws)
    assert hello["type"] == "hello", hello
    assert await recv_json(ws) == {"type": "synced", "cursor": hello["cursor"]}
    return hello


# -- raw WebSocket by hand -----------------------------------------------------------------------


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True) -> bytes:
    """One client frame, RFC 6455 section 5.2 (masked unless told otherwise)."""
    first = (0x80 if fin else 0) | opcode
    bit = 0x80 if mask else 0
    n = len(payload)
    if n < 126:
        head = bytes([first, bit | n])
    elif n < 1 << 16:
        head = bytes([first, bit | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([first, bit | 127]) + n.to_bytes(8, "big")
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def read_hello(reader: asyncio.StreamReader) -> dict[str, Any]:
    """Raw: the ``hello`` text frame and the ``synced`` after it."""
    opcode, payload = await read_frame(reader)
    hello: dict[str, Any] = json.loads(payload)
    assert opcode == 0x1 and hello["type"] == "hello", hello
    opcode, payload = await read_frame(reader)
    assert opcode == 0x1 and json.loads(payload) == {"type": "synced", "cursor": hello["cursor"]}
    return hello


async def read_frame(
    reader: asyncio.StreamReader, timeout: float = TIMEOUT, *, pings: bool = False
) -> tuple[int, bytes]:
    """The next server frame: (opcode, payload); server frames are never masked. The server's
    heartbeat pings (sent at any time: one wheel visits every socket once per period) are
    skipped unless ``pings``."""
    while True:
        opcode, payload = await _read_one_frame(reader, timeout)
        if pings or opcode != 0x9:
            return opcode, payload


async def _read_one_frame(reader: asyncio.StreamReader, timeout: float) -> tuple[int, bytes]:
    first, second = await asyncio.wait_for(reader.readexactly(2), timeout)
    assert second & 0x80 == 0, "server frames must not be masked"
    n = second & 0x7F
    if n == 126:
        n = int.from_bytes(await reader.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await reader.readexactly(8), "big")
    return first & 0x0F, await reader.readexactly(n)


def upgrade_request(path: str = "/ws", headers: dict[str, str] | None = None, key: str | None = None) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Upgrade: websocket", "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key or base64.b64encode(os.urandom(16)).decode()}", "Sec-WebSocket-Version: 13",
    ]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def raw_open(server: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port)


async def shut(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def refused(server: Any, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], dict[str, Any]]:
    """Send an upgrade by hand; assert it is refused the contract's way and return the answer."""
    reader, writer = await raw_open(server)
    writer.write(upgrade_request(path, headers))
    status, resp_headers, body = await asyncio.wait_for(read_response(reader), TIMEOUT)
    assert status != 101
    assert resp_headers["connection"] == "close"
    assert int(resp_headers["content-length"]) == len(body)
    assert resp_headers["content-type"].startswith("application/json")
    envelope = json.loads(body)
    assert envelope["success"] is False and envelope["meta"]["request_id"]
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""  # and the connection ends
    await shut(writer)
    return status, resp_headers, envelope["error"]


# -- hello ---------------------------------------------------------------------------------------


async def test_hello_is_the_first_frame(server: Any) -> None:
    async with connect(url(server, "/ws?device_id=laptop-1"), additional_headers={"Authorization": "Bearer user"}) as ws:
        assert ws.subprotocol is None
        hello = await recv_hello(ws)
    assert hello["type"] == "hello"
    assert hello["connection_id"].startswith("c-") and len(hello["connection_id"]) > 10
    assert hello["principal"] == {"kind": "user", "id": "u-1", "device_id": "laptop-1"}
    assert hello["heartbeat_s"] == 30 and isinstance(hello["heartbeat_s"], int)
    assert hello["cursor"] == 0


async def test_token_in_query_and_daemon_implies_its_device(server: Any) -> None:
    async with connect(url(server, "/ws?token=daemon")) as ws:
        hello = await recv_hello(ws)
    assert hello["principal"] == {"kind": "daemon", "id": "d-1", "device_id": "d-1"}
    async with connect(url(server, "/ws?token=sub")) as ws:
        hello = await recv_hello(ws)
    assert hello["principal"] == {"kind": "api_token", "id": "t-1", "device_id": None}


async def test_connection_ids_are_unique_and_registry_tracks_sockets(server: Any) -> None:
    async with connect(url(server, "/ws?token=user")) as a, connect(url(server, "/ws?token=user")) as b:
        ids = {(await recv_hello(a))["connection_id"], (await recv_hello(b))["connection_id"]}
        assert len(ids) == 2
        assert len(server.state.registry) == 2
    for _ in range(100):
        if len(server.state.registry) == 0:
            break
        await asyncio.sleep(0.02)
    assert len(server.state.registry) == 0


async def test_ping_pong_echoes_request_id(server: Any) -> None:
    async with connect(url(server, "/ws?token=user")) as ws:
        await recv_hello(ws)
        await ws.send(json.dumps({"type": "ping", "request_id": "p1"}))
        assert await recv_json(ws) == {"type": "pong", "request_id": "p1"}
        await ws.send(json.dumps({"type": "ping"}))
        assert await recv_json(ws) == {"type": "pong"}


async def test_handshake_and_frames_by_hand(server: Any) -> None:
    key = base64.b64encode(os.urandom(16)).decode()
    reader, writer = await raw_open(server)
    request = upgrade_request("/ws?token=user", {"Sec-WebSocket-Protocol": "switchboard.v1.json"}, key=key)
    for i in range(len(request)):  # one byte at a time
        writer.write(request[i : i + 1])
        await writer.drain()
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)).decode()
    assert head.startswith("HTTP/1.1 101 ")
    accept = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
    assert f"Sec-WebSocket-Accept: {accept}" in head
    assert "Sec-WebSocket-Protocol: switchboard.v1.json" in head
    assert "Sec-WebSocket-Extensions" not in head  # no permessage-deflate
    await read_hello(reader)
    # A fragmented ping message: text frame without FIN, then a continuation.
    writer.write(client_frame(0x1, b'{"type":"pi', fin=False) + client_frame(0x0, b'ng","request_id":7}'))
    opcode, payload = await read_frame(reader)
    assert opcode == 0x1 and json.loads(payload) == {"type": "pong", "request_id": 7}
    # A WebSocket ping is answered by a pong with the same payload.
    writer.write(client_frame(0x9, b"hb"))
    assert await read_frame(reader) == (0xA, b"hb")
    # Closing handshake: our 1000 is echoed, then the server ends the TCP connection.
    writer.write(client_frame(0x8, (1000).to_bytes(2, "big")))
    opcode, payload = await read_frame(reader)
    assert opcode == 0x8 and int.from_bytes(payload[:2], "big") == 1000
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    await shut(writer)


# -- refusals before the upgrade ----------------------------------------------------------------


async def test_bad_token_is_refused_with_401_envelope(server: Any) -> None:
    status, headers, error = await refused(server, "/ws", {"Authorization": "Bearer nope"})
    assert (status, error["code"]) == (401, "INVALID_TOKEN")
    with pytest.raises(InvalidStatus) as info:
        async with connect(url(server, "/ws?token=nope")):
            pass
    assert info.value.response.status_code == 401


async def test_missing_and_expired_credentials(server: Any) -> None:
    status, _, error = await refused(server, "/ws")
    assert (status, error["code"]) == (401, "INVALID_TOKEN")
    status, _, error = await refused(server, "/ws?token=expired")
    assert (status, error["code"]) == (401, "TOKEN_EXPIRED")


async def test_token_without_subscribe_scope_and_e2ee_devices_are_forbidden(server: Any) -> None:
    status, _, error = await refused(server, "/ws?token=pub")
    assert (status, error["code"]) == (403, "FORBIDDEN")
    status, _, error = await refused(server, "/ws", {"Authorization": "Bearer e2ee"})
    assert (status, error["code"]) == (403, "FORBIDDEN")


async def test_unknown_ws_paths_are_404(server: Any) -> None:
    for path in ("/ws/relay/?token=user", "/ws/relay/b1/x?token=user", "/ws/nope?token=user", "/ws/"):
        status, _, error = await refused(server, path)
        assert (status, error["code"]) == (404, "NOT_FOUND")


async def test_invalid_device_id_is_400(server: Any) -> None:
    for bad in ("a" * 65, "has%20space", "", "dev.1"):
        status, _, error = await refused(server, f"/ws?token=user&device_id={bad}")
        assert (status, error["code"]) == (400, "VALIDATION_ERROR")
        assert error["details"]["field"] == "device_id"


async def test_connection_rate_limit_per_principal_and_device(start: Any) -> None:
    server = await start(rate_ws_connect="2/600")
    for _ in range(2):
        async with connect(url(server, "/ws?token=user&device_id=a")) as ws:
            await recv_hello(ws)
    status, headers, error = await refused(server, "/ws?token=user&device_id=a")
    assert (status, error["code"]) == (429, "RATE_LIMIT_EXCEEDED")
    assert int(headers["retry-after"]) >= 1
    # Another device of the same user has its own budget.
    async with connect(url(server, "/ws?token=user&device_id=b")) as ws:
        await recv_hello(ws)


async def test_origin_is_checked_when_configured(start: Any) -> None:
    server = await start(allowed_origins="https://app.example, https://other.example")
    status, _, error = await refused(server, "/ws?token=user", {"Origin": "https://evil.example"})
    assert (status, error["code"]) == (403, "FORBIDDEN")
    async with connect(url(server, "/ws?token=user"), origin="https://other.example") as ws:  # type: ignore[arg-type]
        assert (await recv_hello(ws))["type"] == "hello"


async def test_upgrade_while_draining_is_503(server: Any) -> None:
    server.state.draining = True
    status, _, error = await refused(server, "/ws?token=user")
    assert (status, error["code"]) == (503, "SERVICE_UNAVAILABLE")


async def test_broken_handshake_is_refused_in_the_envelope(server: Any) -> None:
    reader, writer = await raw_open(server)
    writer.write(b"GET /ws?token=user HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    status, headers, body = await asyncio.wait_for(read_response(reader), TIMEOUT)
    assert status == 400 and headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == "VALIDATION_ERROR"
    await shut(writer)


# -- encodings and bad input --------------------------------------------------------------------


async def test_msgpack_subprotocol(server: Any) -> None:
    async with connect(url(server, "/ws?token=user"), subprotocols=["switchboard.v1.msgpack"]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "switchboard.v1.msgpack"
        frame = await asyncio.wait_for(ws.recv(), TIMEOUT)
        assert isinstance(frame, bytes)
        assert msgpack.unpackb(frame)["type"] == "hello"
        assert msgpack.unpackb(await asyncio.wait_for(ws.recv(), TIMEOUT))["type"] == "synced"
        await ws.send(msgpack.packb({"type": "ping", "request_id": "m1"}))
        pong = await asyncio.wait_for(ws.recv(), TIMEOUT)
        assert isinstance(pong, bytes) and msgpack.unpackb(pong) == {"type": "pong", "request_id": "m1"}
        await ws.send(b"\xc1")  # never valid msgpack
        error = msgpack.unpackb(await asyncio.wait_for(ws.recv(), TIMEOUT))
        assert error["type"] == "error" and error["code"] == "VALIDATION_ERROR"


async def test_invalid_frames_get_error_frames_and_the_socket_stays_open(server: Any) -> None:
    async with connect(url(server, "/ws?token=user")) as ws:
        await recv_hello(ws)
        await ws.send("{not json")
        error = await recv_json(ws)
        assert error["type"] == "error" and error["code"] == "VALIDATION_ERROR" and error["request_id"] is None
        await ws.send("[1, 2]")
        assert (await recv_json(ws))["code"] == "VALIDATION_ERROR"
        await ws.send(json.dumps({"type": "no.such.type", "request_id": "r9"}))
        error = await recv_json(ws)
        assert error["code"] == "VALIDATION_ERROR" and error["request_id"] == "r9"
        await ws.send(json.dumps({"request_id": "r10"}))
        assert (await recv_json(ws))["request_id"] == "r10"
        await ws.send(json.dumps({"type": "ping"}))
        assert await recv_json(ws) == {"type": "pong"}


async def test_oversize_message_closes_1009(start: Any) -> None:
    server = await start(ws_max_frame_bytes=1024)
    async with connect(url(server, "/ws?token=user")) as ws:
        await recv_hello(ws)
        await ws.send(json.dumps({"type": "ping", "pad": "x" * 2000}))
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), TIMEOUT)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009


async def test_invalid_utf8_closes_1007_and_unmasked_frame_closes_1002(server: Any) -> None:
    for frame, code in ((client_frame(0x1, b'{"type":"\xff"}'), 1007), (client_frame(0x1, b"{}", mask=False), 1002)):
        reader, writer = await raw_open(server)
        writer.write(upgrade_request("/ws?token=user"))
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        await read_hello(reader)
        writer.write(frame)
        opcode, payload = await read_frame(reader)
        assert opcode == 0x8 and int.from_bytes(payload[:2], "big") == code
        await shut(writer)


async def test_frame_flood_gets_an_error_then_4029(start: Any) -> None:
    server = await start(ws_rate="5/1", ws_burst=5)
    async with connect(url(server, "/ws?token=user")) as ws:
        await recv_hello(ws)
        for _ in range(50):
            await ws.send(json.dumps({"type": "ping"}))
        frames = []
        with pytest.raises(ConnectionClosed) as info:
            while True:
                frames.append(await recv_json(ws))
    assert info.value.rcvd is not None and info.value.rcvd.code == 4029
    assert frames.count({"type": "pong"}) == 5
    assert [f["code"] for f in frames if f["type"] == "error"] == ["RATE_LIMIT_EXCEEDED"]


# -- heartbeats and drain -----------------------------------------------------------------------


async def test_server_pings_and_closes_a_silent_socket(start: Any) -> None:
    server = await start(heartbeat_s=0.2)
    # A client library answers pings: the socket outlives several heartbeat periods.
    async with connect(url(server, "/ws?token=user"), ping_interval=None) as ws:
        await recv_hello(ws)
        await asyncio.sleep(1.0)
        await ws.send(json.dumps({"type": "ping"}))
        assert await recv_json(ws) == {"type": "pong"}
    # A raw client that never answers sees pings, then a close, then the end of the stream.
    reader, writer = await raw_open(server)
    writer.write(upgrade_request("/ws?token=user"))
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    opcodes = []
    while True:
        opcode, payload = await read_frame(reader, pings=True)
        opcodes.append(opcode)
        if opcode == 0x8:
            assert int.from_bytes(payload[:2], "big") == 1011
            break
    assert opcodes[0] == 0x1 and 0x9 in opcodes
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    await shut(writer)


async def test_drain_closes_sockets_with_1001(server: Any) -> None:
    async with connect(url(server, "/ws?token=user")) as ws:
        await recv_hello(ws)
        await asyncio.wait_for(server.close(), TIMEOUT)
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), TIMEOUT)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    assert len(server.state.registry) == 0


async def test_wss_over_tls(start: Any, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server = await start(tls_cert_file=str(cert), tls_key_file=str(key))
    context = ssl.create_default_context(cafile=str(cert))
    async with connect(url(server, "/ws?token=user", scheme="wss"), ssl=context) as ws:
        assert (await recv_hello(ws))["type"] == "hello"
        await ws.send(json.dumps({"type": "ping", "request_id": 1}))
        assert await recv_json(ws) == {"type": "pong", "request_id": 1}
