"""The one-port hand-off, on raw sockets: whatever is not a ``/ws`` upgrade reaches aiohttp intact.

Each test writes HTTP by hand, so the relay's head reader sees exactly the byte patterns that
matter: several requests in one segment (pipelining), a chunked body, keep-alive sequences,
one byte per segment, heads too large or never finished.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import datetime
import json
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from api.keys import SERVICES
from api.middleware import envelope_middleware
from api.routes import ops
from relay.httphead import HeadError, find_head_end, parse_head
from shared.services import Services
from tests.fixtures.server import read_response

TIMEOUT = 5.0


def _test_app(services: Services) -> web.Application:
    """The REST shell (envelope middleware, ops routes) plus one echo route, so the body hand-off
    (chunked, pipelined) is observable. Independent of the route modules other issues write."""
    app = web.Application(middlewares=[envelope_middleware], client_max_size=services.settings.max_body_bytes)
    app[SERVICES] = services
    app.add_routes(ops.routes)

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response({"length": len(body), "body": body.decode(), "path": request.path})

    app.router.add_post("/_test/echo", echo)
    return app


@pytest.fixture
async def server(server_factory: Any, make_settings: Any) -> Any:
    return await server_factory(make_settings(handshake_timeout_s=1.0, max_head_bytes=2048), app_factory=_test_app)


async def _open(server: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port)


async def _closed(reader: asyncio.StreamReader) -> bool:
    """True when the server ended the connection (EOF or reset)."""
    try:
        return await asyncio.wait_for(reader.read(65536), TIMEOUT) == b""
    except ConnectionResetError:
        return True


async def _shut(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


def _envelope(body: bytes) -> dict[str, Any]:
    data = json.loads(body)
    assert data["success"] is False
    assert set(data) == {"success", "error", "meta"}
    error: dict[str, Any] = data["error"]
    return error


async def test_json_endpoint_and_404_envelope(server: Any) -> None:
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.port}") as http:
        async with http.get("/health") as resp:
            assert resp.status == 200
            assert (await resp.json())["data"] == {"status": "ok"}
        async with http.get("/nonexistent") as resp:
            assert resp.status == 404
            assert resp.headers["API-Version"] == "1.0"
            assert (await resp.json())["error"]["code"] == "NOT_FOUND"


async def test_plain_get_on_ws_path_without_upgrade_goes_to_rest(server: Any) -> None:
    reader, writer = await _open(server)
    writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = await asyncio.wait_for(read_response(reader), TIMEOUT)
    assert status == 404 and _envelope(body)["code"] == "NOT_FOUND"
    assert "aiohttp" in headers.get("server", "")
    await _shut(writer)


async def test_two_pipelined_requests_in_one_segment(server: Any) -> None:
    reader, writer = await _open(server)
    writer.write(
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /_test/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    )
    first = await asyncio.wait_for(read_response(reader), TIMEOUT)
    second = await asyncio.wait_for(read_response(reader), TIMEOUT)
    assert first[0] == 200 and json.loads(first[2])["data"]["status"] == "ok"
    assert second[0] == 200 and json.loads(second[2]) == {"length": 5, "body": "hello", "path": "/_test/echo"}
    await _shut(writer)


async def test_chunked_post_body(server: Any) -> None:
    reader, writer = await _open(server)
    writer.write(
        b"POST /_test/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4\r\nabcd\r\n"
    )
    await asyncio.sleep(0.05)  # the rest of the body arrives after the hand-off
    writer.write(b"3\r\nefg\r\n0\r\n\r\n")
    status, _, body = await asyncio.wait_for(read_response(reader), TIMEOUT)
    assert status == 200 and json.loads(body)["body"] == "abcdefg"
    await _shut(writer)


async def test_keep_alive_sequence_of_three(server: Any) -> None:
    reader, writer = await _open(server)
    for i in range(3):
        payload = f"req{i}".encode()
        writer.write(b"POST /_test/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n" + payload)
        status, headers, body = await asyncio.wait_for(read_response(reader), TIMEOUT)
        assert status == 200 and json.loads(body)["body"] == payload.decode()
        assert headers.get("connection", "").lower() != "close"
    await _shut(writer)


async def test_request_arriving_one_byte_at_a_time(server: Any) -> None:
    reader, writer = await _open(server)
    request = b"POST /_test/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nxyz"
    for i in range(len(request)):
        writer.write(request[i : i + 1])
        await writer.drain()
        await asyncio.sleep(0)
    status, _, body = await asyncio.wait_for(read_response(reader), TIMEOUT)
    assert status == 200 and json.loads(body)["body"] == "xyz"
    await _shut(writer)


async def test_head_too_large_gets_431_and_close(server: Any) -> None:
    reader, writer = await _open(server)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4000 + b"\r\n\r\n")
    status, headers, body = await asyncio.wait_for(read_response(reader), TIMEOUT)
    assert status == 431
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    assert _envelope(body)["code"] == "HEADERS_TOO_LARGE"
    assert await _closed(reader)
    await _shut(writer)


async def test_unfinished_head_is_closed_after_the_handshake_timeout(server: Any) -> None:
    reader, writer = await _open(server)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finished (slowloris)
    assert await _closed(reader)
    await _shut(writer)


async def test_malformed_request_line_gets_400(server: Any) -> None:
    reader, writer = await _open(server)
    writer.write(b"NOT A REQUEST\r\n\r\n")
    status, headers, body = await asyncio.wait_for(read_response(reader), TIMEOUT)
    assert status == 400 and headers["connection"] == "close"
    assert _envelope(body)["code"] == "VALIDATION_ERROR"
    await _shut(writer)


async def test_unfinished_handshakes_are_bounded_per_ip(server_factory: Any, make_settings: Any) -> None:
    server = await server_factory(make_settings(max_handshakes_per_ip=2), app_factory=_test_app)
    held = [await _open(server) for _ in range(2)]
    for _, writer in held:
        writer.write(b"GET /health HTTP/1.1\r\n")
        await writer.drain()
    reader, writer = await _open(server)
    status, _, body = await asyncio.wait_for(read_response(reader), TIMEOUT)
    assert status == 503 and _envelope(body)["code"] == "SERVICE_UNAVAILABLE"
    await _shut(writer)
    # Finishing one head frees its slot.
    held_reader, held_writer = held[0]
    held_writer.write(b"Host: x\r\n\r\n")
    assert (await asyncio.wait_for(read_response(held_reader), TIMEOUT))[0] == 200
    reader, writer = await _open(server)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await asyncio.wait_for(read_response(reader), TIMEOUT))[0] == 200
    for _, w in [*held, (reader, writer)]:
        await _shut(w)


async def test_requests_during_drain_get_503(server: Any) -> None:
    server.state.draining = True
    reader, writer = await _open(server)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = await asyncio.wait_for(read_response(reader), TIMEOUT)
    assert status == 503 and headers["connection"] == "close"
    assert _envelope(body)["code"] == "SERVICE_UNAVAILABLE"
    await _shut(writer)


async def test_close_drains_keep_alive_connections_and_stops_listening(server_factory: Any, make_settings: Any) -> None:
    server = await server_factory(make_settings(), app_factory=_test_app)
    reader, writer = await _open(server)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await asyncio.wait_for(read_response(reader), TIMEOUT))[0] == 200
    await server.close()
    assert await _closed(reader)
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", server.port)
    await _shut(writer)


# -- TLS -----------------------------------------------------------------------------------------


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    return _self_signed(tmp_path)


async def test_hand_off_over_tls(server_factory: Any, make_settings: Any, tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    server = await server_factory(make_settings(tls_cert_file=str(cert), tls_key_file=str(key)), app_factory=_test_app)
    context = ssl.create_default_context(cafile=str(cert))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=context)
    writer.write(
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /_test/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    )
    assert (await asyncio.wait_for(read_response(reader), TIMEOUT))[0] == 200
    status, _, body = await asyncio.wait_for(read_response(reader), TIMEOUT)
    assert status == 200 and json.loads(body)["body"] == "ok"
    await _shut(writer)
    # Plain HTTP on the TLS port is not served.
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        data = await asyncio.wait_for(reader.read(), TIMEOUT)
    except ConnectionResetError:
        data = b""
    assert b"200 OK" not in data
    await _shut(writer)


# -- the Sans-I/O head parser (no loop) ----------------------------------------------------------

HEAD = b"GET /ws?token=a%2Bb&device_id=d1 HTTP/1.1\r\nHost: x\r\nUpgrade: WebSocket\r\nX-Two: 1\r\nx-two: 2\r\n\r\n"


def test_head_end_found_whole_byte_by_byte_and_with_trailing_data() -> None:
    assert find_head_end(HEAD) == len(HEAD)
    assert find_head_end(HEAD + b"trailing body") == len(HEAD)
    buffer, searched, end = bytearray(), 0, -1
    for i in range(len(HEAD)):
        buffer += HEAD[i : i + 1]
        end = find_head_end(buffer, searched)
        if end >= 0:
            break
        searched = len(buffer)
    assert end == len(HEAD)


def test_parse_head_routes_only_websocket_upgrades_on_ws_paths() -> None:
    head = parse_head(HEAD)
    assert (head.method, head.path, head.version) == ("GET", "/ws", "HTTP/1.1")
    assert head.query_param("token") == "a+b" and head.query_param("device_id") == "d1"
    assert head.header("X-TWO") == "1"  # first value, case-insensitive
    assert head.wants_relay
    assert parse_head(HEAD.replace(b"/ws?", b"/ws/relay/b1?")).wants_relay
    assert not parse_head(HEAD.replace(b"/ws?", b"/wsx?")).wants_relay
    assert not parse_head(HEAD.replace(b"GET", b"POST")).wants_relay
    assert not parse_head(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n").wants_relay
    assert parse_head(b"\r\nGET / HTTP/1.0\r\n\r\n").method == "GET"  # leading empty line ignored


@pytest.mark.parametrize(
    "bad",
    [b"GET /\r\n\r\n", b"GET / HTTP/2.0\r\n\r\n", b"G(T / HTTP/1.1\r\n\r\n", b"GET / HTTP/1.1\r\nNoColon\r\n\r\n",
     b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", b"GET /\xff HTTP/1.1\r\n\r\n"],
)
def test_parse_head_rejects_malformed_heads(bad: bytes) -> None:
    with pytest.raises(HeadError):
        parse_head(bad)


@pytest.mark.parametrize("module", ["relay/httphead.py", "relay/protocol.py"])
def test_sans_io_modules_import_no_event_loop(module: str) -> None:
    tree = ast.parse((Path(__file__).parent.parent / module).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"asyncio", "uvloop", "socket", "redis", "aiohttp"}


def test_relay_exports() -> None:
    import relay

    assert set(relay.__all__) == {"RunningServer", "serve", "start_server"}
    assert all(getattr(relay, name) is not None for name in relay.__all__)
