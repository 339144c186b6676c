"""``relay.registry``: the sharded, indexed table of one worker's open sockets.

First on stand-in connections (the lookups, re-indexing, the shard placement, the drain's yield
between shards, the memory per socket), then on the real server: live sockets indexed by what
their credentials name, a live refresh re-indexing one, and the drain, including a socket whose
upgrade finishes while the drain is under way.
"""

from __future__ import annotations

import asyncio
import gc
import json
import struct
import tracemalloc
import zlib
from typing import Any

import pytest
from websockets.asyncio.client import connect

from relay.registry import DEFAULT_SHARDS, ConnectionRegistry
from shared.codes import CloseCode, ErrorCode
from shared.errors import ApiError
from shared.principals import SCOPES, Principal
from tests.test_ws_handshake import (
    TIMEOUT,
    read_frame,
    read_hello,
    recv_hello,
    recv_json,
    shut,
    upgrade_request,
)


class Conn:
    """What the registry holds: a principal, ``close`` and ``abort``."""

    __slots__ = ("principal", "closed", "aborted")

    def __init__(self, principal: Principal) -> None:
        self.principal = principal
        self.closed: CloseCode | None = None
        self.aborted = False

    def close(self, code: CloseCode, reason: str | None = None) -> None:
        self.closed = code

    def abort(self) -> None:
        self.aborted = True


def user(uid: str, session: str) -> Principal:
    return Principal("user", uid, user_id=uid, session_id=session)


def api_token(uid: str, token: str) -> Principal:
    return Principal("api_token", uid, user_id=uid, token_id=token)


def daemon(uid: str, device: str) -> Principal:
    return Principal("daemon", device, user_id=uid, device_id=device)


def e2ee(device: str) -> Principal:
    return Principal("device", device, device_id=device, book_id="b-1")


# -- on stand-ins ----------------------------------------------------------------------------------


def test_lookups_by_principal_user_token_session_and_device() -> None:
    registry: ConnectionRegistry[Conn] = ConnectionRegistry()
    phone, laptop = Conn(user("u-1", "s-1")), Conn(user("u-1", "s-2"))
    script, gpu = Conn(api_token("u-1", "t-1")), Conn(daemon("u-1", "d-1"))
    other, tablet = Conn(user("u-2", "s-3")), Conn(e2ee("dev-1"))
    conns = [phone, laptop, script, gpu, other, tablet]
    for conn in conns:
        registry.add(conn)
    registry.add(phone)  # twice is once
    assert len(registry) == 6 and all(conn in registry for conn in conns)
    assert set(registry) == set(conns)

    assert set(registry.by_principal("user", "u-1")) == {phone, laptop}
    assert registry.by_principal("api_token", "u-1") == (script,)
    assert registry.by_principal("daemon", "d-1") == (gpu,)
    assert registry.by_principal("device", "dev-1") == (tablet,)
    assert registry.by_principal("daemon", "u-1") == () and registry.by_principal("user", "nobody") == ()
    assert set(registry.by_user("u-1")) == {phone, laptop, script, gpu}  # its daemons included
    assert registry.by_user("u-2") == (other,)
    assert registry.by_session("s-2") == (laptop,) and registry.by_session("s-9") == ()
    assert registry.by_token("t-1") == (script,)
    assert registry.by_device("d-1") == (gpu,) and registry.by_device("dev-1") == (tablet,)

    # A revocation closes what a lookup returned: the tuple is a snapshot, safe to walk meanwhile.
    for conn in registry.by_user("u-1"):
        registry.discard(conn)
    assert len(registry) == 2 and phone not in registry
    assert registry.by_user("u-1") == () and registry.by_token("t-1") == () and registry.by_device("d-1") == ()
    assert registry.by_principal("user", "u-1") == () and registry.by_session("s-1") == ()
    registry.discard(phone)  # gone already: a no-op
    assert len(registry) == 2 and registry.by_user("u-2") == (other,)
    assert Conn(user("u-2", "s-3")) not in registry and object() not in registry


def test_many_sockets_under_one_key_and_back_to_one() -> None:
    registry: ConnectionRegistry[Conn] = ConnectionRegistry()
    tabs = [Conn(user("u-1", "s-1")) for _ in range(5)]  # one session, five browser tabs
    for tab in tabs:
        registry.add(tab)
    assert registry.by_session("s-1") == tuple(tabs)  # in the order they came
    for tab in tabs[:4]:
        registry.discard(tab)
        assert tab not in registry.by_session("s-1") and tab not in registry.by_user("u-1")
    assert registry.by_session("s-1") == (tabs[4],) and registry.by_principal("user", "u-1") == (tabs[4],)
    registry.add(tabs[0])
    assert set(registry.by_session("s-1")) == {tabs[0], tabs[4]}


def test_reindex_follows_a_new_credential() -> None:
    registry: ConnectionRegistry[Conn] = ConnectionRegistry()
    conn, neighbour = Conn(api_token("u-1", "t-1")), Conn(api_token("u-1", "t-1"))
    registry.add(conn)
    registry.add(neighbour)
    old, conn.principal = conn.principal, api_token("u-1", "t-2")  # a refresh to another token
    registry.reindex(conn, old)
    assert registry.by_token("t-1") == (neighbour,) and registry.by_token("t-2") == (conn,)
    assert set(registry.by_user("u-1")) == {conn, neighbour} and len(registry) == 2
    # Even another owner (the registry does not judge; relay.refresh does) moves shards cleanly.
    old, conn.principal = conn.principal, user("u-9", "s-9")
    registry.reindex(conn, old)
    assert registry.by_token("t-2") == () and registry.by_user("u-9") == (conn,) and conn in registry
    registry.discard(conn)
    assert registry.by_user("u-9") == () and registry.by_session("s-9") == () and len(registry) == 1
    # Not registered (before start(), after connection_lost): nothing to move.
    stranger = Conn(user("u-3", "s-3"))
    old, stranger.principal = stranger.principal, user("u-3", "s-4")
    registry.reindex(stranger, old)
    assert stranger not in registry and registry.by_session("s-4") == ()


def test_a_socket_lives_in_the_crc32_shard_of_its_user() -> None:
    """Stable across processes (crc32, not ``hash()``): the layout maps onto several workers."""
    registry: ConnectionRegistry[Conn] = ConnectionRegistry()
    conns = [Conn(user("u-1", "s-1")), Conn(daemon("u-1", "d-7")), Conn(e2ee("dev-1"))]
    for conn in conns:
        registry.add(conn)
    shards: list[Any] = registry._shards  # white box: where the drain will find them
    owner = zlib.crc32(b"u-1") % DEFAULT_SHARDS
    assert list(shards[owner].conns) == conns[:2]  # a user's daemons are the user's
    assert list(shards[zlib.crc32(b"dev-1") % DEFAULT_SHARDS].conns) == conns[2:]
    assert sum(len(shard.conns) for shard in shards) == 3


async def test_close_all_closes_shard_by_shard_and_yields_to_the_loop_in_between() -> None:
    registry: ConnectionRegistry[Conn] = ConnectionRegistry(shards=8)
    conns = [Conn(user(f"u-{i}", f"s-{i}")) for i in range(200)]
    for conn in conns:
        registry.add(conn)
    shards: list[Any] = registry._shards
    busy = [len(shard.conns) for shard in shards if shard.conns]
    assert len(busy) == 8  # 200 users spread over every shard
    closing = asyncio.ensure_future(registry.close_all(CloseCode.GOING_AWAY))
    seen = []
    while not closing.done():
        # Each time the loop gets back to us, one more shard has been closed.
        seen.append(sum(conn.closed is not None for conn in conns))
        await asyncio.sleep(0)
    await closing
    assert seen[:8] == [sum(busy[:i]) for i in range(8)]
    assert all(conn.closed is CloseCode.GOING_AWAY for conn in conns)
    # Closing is asking: the sockets leave when their transports are gone.
    assert len(registry) == 200 and not await registry.wait_empty(0.01)
    registry.abort_all()
    assert all(conn.aborted for conn in conns)
    for conn in conns:
        registry.discard(conn)
    assert await registry.wait_empty(0.01)


def test_memory_per_socket_stays_small() -> None:
    """An idle socket's whole budget is about 6 KB (performance.md); the registry takes a few
    hundred bytes of it: keys are the principal's own strings, and a key with one socket maps to
    it directly. 10,000 sockets of 2,500 users, each with two sessions, a token and a daemon."""
    principals = []
    for i in range(2500):
        uid = f"u-{i:06d}"
        principals += [user(uid, f"s-{i}-a"), user(uid, f"s-{i}-b"), api_token(uid, f"t-{i}"),
                       daemon(uid, f"d-{i}")]
    conns = [Conn(p) for p in principals]
    gc.collect()
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        registry: ConnectionRegistry[Conn] = ConnectionRegistry()
        for conn in conns:
            registry.add(conn)
        per_socket = (tracemalloc.get_traced_memory()[0] - baseline) / len(conns)
    finally:
        tracemalloc.stop()
    assert len(registry) == len(conns)
    # Measured: about 220 bytes. A dict per key and index (224 bytes each) would be over 900.
    assert per_socket < 400, f"{per_socket:.0f} bytes per socket"


# -- on the real server ----------------------------------------------------------------------------

USER = Principal("user", "u-1", user_id="u-1", scopes=SCOPES - {"admin"}, session_id="s-1")
TOKENS = {
    "user": USER,
    "t1": Principal("api_token", "u-1", user_id="u-1", scopes=frozenset({"subscribe"}), token_id="t-1"),
    "t2": Principal("api_token", "u-1", user_id="u-1", scopes=frozenset({"subscribe"}), token_id="t-2"),
    "daemon": Principal("daemon", "d-1", user_id="u-1", device_id="d-1"),
}


@pytest.fixture
async def server(server_factory: Any, make_settings: Any) -> Any:
    async def authenticator(token: str) -> Principal:
        if token in TOKENS:
            return TOKENS[token]
        if token.startswith("user-"):  # one user per token, for many sockets
            return Principal("user", token, user_id=token, scopes=SCOPES - {"admin"}, session_id="s-" + token)
        raise ApiError(ErrorCode.INVALID_TOKEN, "invalid token")

    return await server_factory(make_settings(), authenticator)


def ws_url(server: Any, token: str) -> str:
    return f"ws://127.0.0.1:{server.port}/ws?token={token}"


async def wait_until(predicate: Any) -> None:
    for _ in range(int(TIMEOUT / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def test_live_sockets_are_indexed_by_what_their_credentials_name(server: Any) -> None:
    registry = server.state.registry
    async with (
        connect(ws_url(server, "user")) as session,
        connect(ws_url(server, "t1")) as script,
        connect(ws_url(server, "daemon")) as gpu,
    ):
        ids = [(await recv_hello(ws))["connection_id"] for ws in (session, script, gpu)]
        assert sorted(c.id for c in registry.by_user("u-1")) == sorted(ids)
        assert [c.id for c in registry.by_principal("user", "u-1")] == ids[:1]
        assert [c.id for c in registry.by_session("s-1")] == ids[:1]
        assert [c.id for c in registry.by_token("t-1")] == ids[1:2]
        assert [c.id for c in registry.by_device("d-1")] == ids[2:]
        # What a revocation of the token will do: close what the lookup finds, and only that.
        for conn in registry.by_token("t-1"):
            conn.close(CloseCode.POLICY)
        await script.wait_closed()
        assert script.close_code == int(CloseCode.POLICY)
        await session.send(json.dumps({"type": "ping"}))
        frame = await recv_json(session)
        while frame["type"].startswith("device."):  # the user's other devices come and go (presence)
            frame = await recv_json(session)
        assert frame == {"type": "pong"}
        await wait_until(lambda: len(registry) == 2)
        assert registry.by_token("t-1") == ()
    await wait_until(lambda: len(registry) == 0)
    assert registry.by_user("u-1") == () and registry.by_device("d-1") == ()


async def test_a_live_refresh_to_another_token_moves_the_socket_in_the_token_index(server: Any) -> None:
    registry = server.state.registry
    async with connect(ws_url(server, "t1")) as ws:
        await recv_hello(ws)
        (conn,) = registry.by_token("t-1")
        await ws.send(json.dumps({"type": "refresh", "token": "t2"}))
        assert await recv_json(ws) == {"type": "refreshed", "exp": None}
        # Revoking t-2 must find the socket now, revoking t-1 must not.
        assert registry.by_token("t-1") == () and registry.by_token("t-2") == (conn,)
        assert registry.by_user("u-1") == (conn,) and len(registry) == 1
    await wait_until(lambda: len(registry) == 0)
    assert registry.by_token("t-2") == ()


async def test_drain_says_1001_to_sockets_in_every_shard(server: Any) -> None:
    sockets = []
    for i in range(150):  # 150 users: every shard holds some
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(upgrade_request(f"/ws?token=user-{i}"))
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)).startswith(b"HTTP/1.1 101 ")
        await read_hello(reader)
        sockets.append((reader, writer))
    shards: list[Any] = server.state.registry._shards
    assert all(shard.conns for shard in shards)
    closing = asyncio.ensure_future(server.close())
    for reader, writer in sockets:
        opcode, payload = await read_frame(reader)
        assert (opcode, struct.unpack("!H", payload[:2])[0]) == (0x8, 1001)
        writer.write(b"\x88\x82\x00\x00\x00\x00" + payload[:2])  # the client's close (masked, zero key)
    for reader, writer in sockets:
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""  # the server ends the stream
        await shut(writer)
    await asyncio.wait_for(closing, TIMEOUT)
    assert len(server.state.registry) == 0


async def test_an_upgrade_finishing_during_the_drain_is_closed_1001(server_factory: Any, make_settings: Any) -> None:
    """The credential check awaits, so a socket can open after the drain walked its shard: it
    closes itself with 1001 instead of staying open until the drain gives up and aborts it."""
    entered, gate = asyncio.Event(), asyncio.Event()

    async def authenticator(token: str) -> Principal:
        entered.set()
        await gate.wait()
        return USER

    server = await server_factory(make_settings(), authenticator)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(upgrade_request("/ws?token=slow"))
    await asyncio.wait_for(entered.wait(), TIMEOUT)
    # The drain as RunningServer.close runs it, up to the point where it waits for sockets.
    server.state.draining = True
    await server.state.registry.close_all(CloseCode.GOING_AWAY)
    gate.set()
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)).startswith(b"HTTP/1.1 101 ")
    opcode, payload = await read_frame(reader)  # no hello: the close comes first
    assert (opcode, struct.unpack("!H", payload[:2])[0]) == (0x8, 1001)
    writer.write(b"\x88\x82\x00\x00\x00\x00" + payload[:2])
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    await shut(writer)
    await wait_until(lambda: len(server.state.registry) == 0)
