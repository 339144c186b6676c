"""The client SDK's asyncio clients (relay.client) against the real server, started in-process:
book relay ops between two clients with acks and seqs, an op re-sent after a reconnect relayed
once, reconnecting by itself after the server drains (1001) and restarts, refused upgrades as clear
errors, and on ``/ws``: hello, request/reply (ping/pong, errors), msgpack, credential refresh on
the live socket and a fresh token from the getter after 4001.

The durable inbox (event/ack/sync/reset, filter, message.send) is exercised through the Sans-I/O
core in tests/test_client_core.py until the server side lands. Waits are deadlines; nothing here
asserts how long something took.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relay.client import (
    BookClient,
    ClientClosed,
    ConnectionTerminated,
    FileCursorStore,
    HandshakeRejected,
    InboxClient,
    MemoryCursorStore,
    Op,
    ReconnectPolicy,
    RequestError,
    Reset,
)
from shared.config import Settings
from tests.conftest import wait_for
from tests.device_helpers import DeviceKey, insert_book, insert_device
from tests.test_refresh import Api, exp_of, sleep_until
from tests.test_ws_handshake import _app, stub_authenticator

T = 10.0


def fast() -> ReconnectPolicy:
    """Short backoff so the tests reconnect quickly (the policy itself is tested in the core)."""
    return ReconnectPolicy(base=0.05, cap=0.5, rate_limited_s=0.5)


async def next_item(client: Any) -> Any:
    return await asyncio.wait_for(client.__anext__(), T)


def url_of(server: Any) -> str:
    return f"ws://127.0.0.1:{server.port}"


@pytest.fixture
def relay_settings(make_settings: Callable[..., Settings]) -> Settings:
    # Reconnecting is the point of these tests: lift the 5-per-10-minutes relay connection limit.
    return make_settings(rate_relay_connect="1000/600")


@pytest.fixture
async def relay_server(server_factory: Any, relay_settings: Settings) -> Any:
    return await server_factory(relay_settings)


async def book_with(server: Any, count: int) -> tuple[str, list[DeviceKey]]:
    keys = [await insert_device(server.services.db) for _ in range(count)]
    return await insert_book(server.services.db, *keys), keys


# -- book relay ---------------------------------------------------------------------------------------


async def test_two_clients_exchange_ops_with_acks_and_seqs(relay_server: Any) -> None:
    book, (a_key, b_key) = await book_with(relay_server, 2)
    notices: list[dict[str, Any]] = []
    store = MemoryCursorStore()
    async with BookClient(url_of(relay_server), book, token=a_key.token) as a, \
            BookClient(url_of(relay_server), book, token=b_key.token, msgpack=True, store=store,
                       on_notice=notices.append) as b:
        await a.wait_ready(T)
        await b.wait_ready(T)
        await wait_for(lambda: a_key.device_id in b.online and b_key.device_id in a.online, T)

        payloads = [f"ciphertext {i}".encode() for i in range(5)] + [bytes(range(256))]
        before = int(time.time())
        seqs = [await asyncio.wait_for(a.send_op(p), T) for p in payloads]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        got = [await next_item(b) for _ in payloads]
        assert all(isinstance(op, Op) for op in got)
        assert [op.payload for op in got] == payloads  # raw bytes over msgpack, base64 on A's JSON
        assert [op.seq for op in got] == seqs  # the seq the sender was told is the one B sees
        for op in got:
            assert op.device_id == a_key.device_id
            assert before <= op.timestamp <= op.relay_timestamp <= int(time.time())

        b_seq = await asyncio.wait_for(b.send_op(b"from b", id="b-1"), T)
        op = await next_item(a)
        assert (op.payload, op.device_id, op.seq) == (b"from b", b_key.device_id, b_seq)
        assert b_seq > seqs[-1]
        assert (await b.ping(timeout=T))["type"] == "pong"
        assert b.seq == seqs[-1]
        assert notices[0]["type"] == "presence"
    # Leaving the block normally: B's last op counts as processed and is checkpointed.
    assert store.positions == {f"book:{book}": seqs[-1]}


async def test_an_op_resent_after_a_reconnect_is_relayed_once(relay_server: Any) -> None:
    book, (a_key, b_key) = await book_with(relay_server, 2)
    async with BookClient(url_of(relay_server), book, token=a_key.token, policy=fast()) as a, \
            BookClient(url_of(relay_server), book, token=b_key.token) as b:
        await a.wait_ready(T)
        await b.wait_ready(T)
        # A stops reading: the server accepts the op and relays it, but A never sees the ack.
        ws = a._ws
        assert ws is not None
        ws.transport.pause_reading()
        sending = asyncio.ensure_future(a.send_op(b"exactly once", id="op-once"))
        relayed = await next_item(b)
        assert relayed.payload == b"exactly once"
        ws.transport.abort()  # the connection dies with the ack unread
        # A reconnects by itself, re-sends op-once, and gets the op's first seq back.
        assert await asyncio.wait_for(sending, T) == relayed.seq
        assert a.connections == 2
        marker = await asyncio.wait_for(a.send_op(b"marker"), T)
        following = await next_item(b)
        assert (following.payload, following.seq) == (b"marker", marker)  # nothing in between


@pytest.mark.parametrize("retention", ["30d,64MiB", "0"])
async def test_the_client_reconnects_after_the_server_drains_and_restarts(
    server_factory: Any, relay_settings: Settings, retention: str
) -> None:
    relay_settings = dataclasses.replace(relay_settings, book_retention=retention)
    server = await server_factory(relay_settings)
    book, (a_key, b_key) = await book_with(server, 2)
    resets: list[Reset] = []
    async with BookClient(url_of(server), book, token=a_key.token, policy=fast()) as a, \
            BookClient(url_of(server), book, token=b_key.token, policy=fast(), on_reset=resets.append) as b:
        await a.wait_ready(T)
        await b.wait_ready(T)
        for i in range(3):
            await asyncio.wait_for(a.send_op(f"before {i}".encode()), T)
        assert [(await next_item(b)).payload for _ in range(3)] == [b"before 0", b"before 1", b"before 2"]

        await server.close()  # drain: 1001 to every socket, then the port closes
        await wait_for(lambda: not a.connected and not b.connected, T)
        queued = asyncio.ensure_future(a.send_op(b"sent while down"))

        # The same node comes back on the same port (same SQLite file; without retention, a
        # new in-memory sequence).
        again = await server_factory(dataclasses.replace(relay_settings, port=server.port))
        assert isinstance(await asyncio.wait_for(queued, T), int)  # acked by the new server
        await wait_for(lambda: b.connections == 2 and b.connected, T)
        await b.wait_synced(T)
        after = await asyncio.wait_for(a.send_op(b"after"), T)
        while (op := await next_item(b)).payload != b"after":
            assert op.payload == b"sent while down"  # relayed to B only if B was back in time
        assert op.seq == after
        if retention == "0":
            # The restarted sequence starts below what B had seen: B was told (and kept working).
            assert [r.reason for r in resets] == ["history_truncated"]
        else:  # the seq lives in the store: the restart continues it and B simply catches up
            assert resets == []
        assert a.connections == b.connections == 2
        assert again.port == server.port


async def test_a_refused_upgrade_stops_the_client_with_a_clear_error(relay_server: Any) -> None:
    book, _ = await book_with(relay_server, 1)
    outsider = await insert_device(relay_server.services.db)
    client = BookClient(url_of(relay_server), book, token=outsider.token, policy=fast())
    with pytest.raises(HandshakeRejected) as info:
        async for _ in client:
            pass
    assert (info.value.status, info.value.code) == (403, "FORBIDDEN")
    with pytest.raises(HandshakeRejected):
        await client.send_op(b"x")
    with pytest.raises(HandshakeRejected):
        await client.wait_closed()
    assert client.closed and client.failure is info.value
    await client.close()

    expired = BookClient(url_of(relay_server), book, token=lambda: outsider.token(ttl=-120), policy=fast())
    with pytest.raises(HandshakeRejected) as info:
        await expired.wait_ready(T)
    assert (info.value.status, info.value.code) == (401, "TOKEN_EXPIRED")  # after one fresh try
    await expired.close()


async def test_a_restarted_client_resumes_from_its_file_store(relay_server: Any, tmp_path: Path) -> None:
    book, (a_key, b_key) = await book_with(relay_server, 2)
    path = tmp_path / "cursors.json"
    async with BookClient(url_of(relay_server), book, token=a_key.token) as a:
        async with BookClient(url_of(relay_server), book, token=b_key.token, store=FileCursorStore(path)) as b:
            await a.wait_ready(T)
            await b.wait_ready(T)
            seq = await asyncio.wait_for(a.send_op(b"persist me"), T)
            assert (await next_item(b)).seq == seq
        assert json.loads(path.read_text()) == {f"book:{book}": seq}
        # A new process: the position comes back from the file (the next ?since=).
        async with BookClient(url_of(relay_server), book, token=b_key.token, store=FileCursorStore(path)) as b2:
            await b2.wait_ready(T)
            assert b2.seq == seq
            later = await asyncio.wait_for(a.send_op(b"later"), T)
            assert (await next_item(b2)).seq == later


async def test_without_auto_ack_only_what_the_application_marks_is_checkpointed(relay_server: Any) -> None:
    book, (a_key, b_key) = await book_with(relay_server, 2)
    store = MemoryCursorStore()
    handled: list[int] = []
    async with BookClient(url_of(relay_server), book, token=a_key.token) as a:
        b = BookClient(url_of(relay_server), book, token=b_key.token, store=store, auto_ack=False)
        await a.wait_ready(T)
        await b.wait_ready(T)
        seqs = [await asyncio.wait_for(a.send_op(f"op {i}".encode()), T) for i in range(3)]

        async def handler(op: Op) -> None:
            handled.append(op.seq)
            if op.seq == seqs[1]:
                b.processed(op)  # the application committed up to here
            if len(handled) == 3:
                await b.close()

        await asyncio.wait_for(b.run(handler), T)
    assert handled == seqs
    assert store.positions == {f"book:{book}": seqs[1]}


async def test_the_token_must_be_a_getter(relay_server: Any) -> None:
    with pytest.raises(TypeError, match="function"):
        BookClient(url_of(relay_server), "book", token="a-token-string")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        BookClient("ftp://example.com", "book", token=lambda: "t")


# -- /ws --------------------------------------------------------------------------------------------


@pytest.fixture
async def ws_server(server_factory: Any, make_settings: Callable[..., Settings]) -> Any:
    return await server_factory(make_settings(), stub_authenticator, app_factory=_app)


async def test_inbox_hello_ping_and_request_errors(ws_server: Any) -> None:
    async with InboxClient(url_of(ws_server), token=lambda: "user", device_id="laptop") as inbox:
        await inbox.wait_ready(T)
        assert inbox.hello is not None
        assert inbox.hello.principal == {"kind": "user", "id": "u-1", "device_id": "laptop"}
        assert inbox.hello.connection_id.startswith("c-") and inbox.hello.heartbeat_s == 30
        pong = await inbox.ping(timeout=T)
        assert pong["type"] == "pong" and pong["request_id"].startswith("r-")
        with pytest.raises(RequestError) as info:
            await inbox.request("no.such.request", timeout=T, x=1)
        assert info.value.code == "VALIDATION_ERROR" and "no.such.request" in info.value.message
        # Answers are matched by request_id, whatever order they come back in.
        pongs = await asyncio.gather(*(inbox.ping(timeout=T) for _ in range(20)))
        assert len({p["request_id"] for p in pongs}) == 20
        (conn,) = list(ws_server.state.registry)
        assert conn.device_id == "laptop" and not conn.codec.binary
    assert inbox.closed
    with pytest.raises(ClientClosed):
        await inbox.ping()


async def test_inbox_over_msgpack(ws_server: Any) -> None:
    async with InboxClient(f"http://127.0.0.1:{ws_server.port}/", token=lambda: "daemon", msgpack=True) as inbox:
        await inbox.wait_ready(T)
        assert inbox.hello is not None and inbox.hello.principal["kind"] == "daemon"
        assert (await inbox.ping(timeout=T))["type"] == "pong"
        (conn,) = list(ws_server.state.registry)
        assert conn.codec.binary


async def test_inbox_refused_credentials_are_clear_errors(ws_server: Any) -> None:
    for token, status, code in [("nope", 401, "INVALID_TOKEN"), ("e2ee", 403, "FORBIDDEN"),
                                ("pub", 403, "FORBIDDEN")]:
        inbox = InboxClient(url_of(ws_server), token=lambda t=token: t, policy=fast())
        with pytest.raises(HandshakeRejected) as info:
            await inbox.ping(timeout=T)
        assert (info.value.status, info.value.code) == (status, code), token
        await inbox.close()


async def test_inbox_reconnects_after_a_drain_and_restart(
    server_factory: Any, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    server = await server_factory(settings, stub_authenticator, app_factory=_app)
    calls: list[str] = []

    async def token() -> str:
        calls.append("sub")
        return "sub"

    async with InboxClient(url_of(server), token=token, device_id="d1", policy=fast()) as inbox:
        await inbox.wait_ready(T)
        first = inbox.hello
        await server.close()
        await wait_for(lambda: not inbox.connected, T)
        pinging = asyncio.ensure_future(inbox.ping(timeout=T))  # waits for the next socket
        await server_factory(dataclasses.replace(settings, port=server.port), stub_authenticator, app_factory=_app)
        assert (await pinging)["type"] == "pong"
        assert inbox.hello is not None and first is not None
        assert inbox.hello.connection_id != first.connection_id
        assert inbox.connections == 2 and len(calls) >= 2  # the getter is asked for every connection


# -- credentials: real user JWTs (ACCESS_TOKEN_TTL_S = 2 s) -------------------------------------------

TTL_S = 2


class UserTokens:
    """A token getter backed by the real API: the login's access token, then ``/auth/refresh``."""

    def __init__(self, api: Api, login: dict[str, Any]) -> None:
        self.api = api
        self.access = login["access_token"]
        self.refresh_token = login["refresh_token"]
        self.handed: list[str] = []

    async def __call__(self) -> str:
        if self.handed:  # every later call: a new pair (the refresh token rotates)
            renewed = await self.api.post("/auth/refresh", {"refresh_token": self.refresh_token})
            self.access, self.refresh_token = renewed["access_token"], renewed["refresh_token"]
        self.handed.append(self.access)
        return str(self.access)


@pytest.fixture
async def user_api(server_factory: Any, make_settings: Any) -> Any:
    server = await server_factory(make_settings(access_token_ttl_s=TTL_S))
    async with aiohttp.ClientSession() as http:
        yield Api(http, server.port), server


async def test_the_credential_is_refreshed_on_the_live_socket_before_it_expires(user_api: Any) -> None:
    api, server = user_api
    tokens = UserTokens(api, await api.signup("ada@example.com"))
    old_exp = exp_of(tokens.access)
    async with InboxClient(url_of(server), token=tokens, device_id="phone") as inbox:
        await inbox.wait_ready(T)
        await sleep_until(old_exp + 0.5)
        assert (await inbox.ping(timeout=T))["type"] == "pong"  # still the first socket
        assert inbox.connections == 1
        assert len(tokens.handed) >= 2
        (conn,) = list(server.state.registry)
        assert conn.principal.exp > old_exp
        assert conn.principal.exp in {exp_of(t) for t in tokens.handed[1:]}


async def test_4001_at_expiry_reconnects_with_a_fresh_token_from_the_getter(user_api: Any) -> None:
    api, server = user_api
    tokens = UserTokens(api, await api.signup("ada@example.com"))
    first_exp = exp_of(tokens.access)
    async with InboxClient(url_of(server), token=tokens, device_id="phone", refresh=False,
                           policy=fast()) as inbox:
        await inbox.wait_ready(T)
        first = inbox.hello
        await wait_for(lambda: inbox.connections >= 2 and inbox.connected, T + TTL_S)
        assert inbox.hello is not None and first is not None
        assert inbox.hello.connection_id != first.connection_id
        (conn,) = list(server.state.registry)
        # The new socket runs on the getter's newest token, never the expired one.
        assert tokens.handed[0] != tokens.handed[1]
        assert len(tokens.handed) == inbox.connections  # asked once per connection
        assert conn.principal.exp == exp_of(tokens.handed[-1]) > first_exp
        assert (await inbox.ping(timeout=T))["type"] == "pong"


# -- the durable inbox, end to end (events published over REST: POST /publish) ------------------------


class GatedUser:
    """A user's access token as a getter; ``close_gate()`` holds the next connection back (the
    client stays offline, deterministically, until ``open_gate()``)."""

    def __init__(self, access: str) -> None:
        self.access = access
        self.gate = asyncio.Event()
        self.gate.set()
        self.calls = 0

    def close_gate(self) -> None:
        self.gate.clear()

    def open_gate(self) -> None:
        self.gate.set()

    async def __call__(self) -> str:
        self.calls += 1
        await self.gate.wait()
        return self.access


@pytest.fixture
async def inbox_api(server_factory: Any, make_settings: Any) -> Any:
    server = await server_factory(make_settings())
    async with aiohttp.ClientSession() as http:
        api = Api(http, server.port)
        login = await api.signup("ada@example.com")

        async def publish(data: Any) -> int:
            async with http.post(f"{api.base}/publish", json={"type": "note", "data": data},
                                 headers={"Authorization": f"Bearer {login['access_token']}"}) as resp:
                answer = await resp.json()
                assert resp.status == 202, answer
                return int(answer["data"]["cursor"])

        yield server, GatedUser(login["access_token"]), publish


def abort(client: Any) -> None:
    ws = client._ws
    assert ws is not None
    ws.transport.abort()


async def test_inbox_device_resumes_after_a_drop_with_every_event_once(inbox_api: Any) -> None:
    server, tokens, publish = inbox_api
    store = MemoryCursorStore()
    # Acks are held back (long delay, big batch): the server must replay everything after a drop.
    async with InboxClient(url_of(server), token=tokens, device_id="laptop", store=store, policy=fast(),
                           ack_delay=60, ack_batch=1000) as inbox:
        await inbox.wait_synced(T)
        cursors = [await publish({"n": i}) for i in range(3)]
        got = [await next_item(inbox) for _ in range(3)]
        assert [(e.event, e.cursor, e.data["data"]) for e in got] == \
            [("publish", c, {"n": i}) for i, c in enumerate(cursors)]

        tokens.close_gate()
        abort(inbox)  # nothing acked yet
        await wait_for(lambda: not inbox.connected and tokens.calls == 2, T)
        missed = [await publish({"n": i}) for i in range(3, 5)]
        tokens.open_gate()
        got += [await next_item(inbox) for _ in range(2)]  # the replay of 1-3 was dropped as dupes
        assert [e.cursor for e in got] == cursors + missed
        assert [e.data["data"]["n"] for e in got] == list(range(5))
        assert inbox.connections == 2
    # A clean close acks (and saves) what was processed.
    assert store.positions == {"inbox:laptop": missed[-1]}

    # The next run of the same device: nothing old again, only what is new.
    async with InboxClient(url_of(server), token=tokens, device_id="laptop", store=store) as again:
        await again.wait_synced(T)
        latest = await publish({"n": 5})
        event = await next_item(again)
        assert (event.cursor, event.data["data"]) == (latest, {"n": 5})


async def test_inbox_session_syncs_from_its_cursor_after_a_drop(inbox_api: Any) -> None:
    server, tokens, publish = inbox_api
    async with InboxClient(url_of(server), token=tokens, policy=fast()) as session:  # no device_id
        await session.wait_synced(T)
        first = await publish("one")
        assert (await next_item(session)).cursor == first
        tokens.close_gate()
        abort(session)
        await wait_for(lambda: not session.connected and tokens.calls == 2, T)
        missed = [await publish(text) for text in ("two", "three")]
        tokens.open_gate()  # the new socket starts live at hello: only a sync brings these back
        got = [await next_item(session) for _ in range(2)]
        assert [(e.cursor, e.data["data"]) for e in got] == list(zip(missed, ("two", "three"), strict=True))
        live = await publish("four")
        assert (await next_item(session)).cursor == live


async def test_inbox_filter_and_explicit_sync(inbox_api: Any) -> None:
    server, tokens, publish = inbox_api
    async with InboxClient(url_of(server), token=tokens, device_id="desk", filter=["task.*"]) as inbox:
        await inbox.wait_synced(T)
        await publish("filtered out")  # a publish event: not a task.* event
        await inbox.set_filter(["publish"])
        shown = await publish("shown")
        event = await next_item(inbox)
        assert (event.cursor, event.data["data"]) == (shown, "shown")
        await inbox.sync(0)  # a replay of everything: all of it is a duplicate by now
        await inbox.wait_synced(T)
        last = await publish("after the sync")
        assert (await next_item(inbox)).cursor == last


async def test_a_revoked_token_stops_the_client_with_1008(inbox_api: Any) -> None:
    server, user, _ = inbox_api
    api_base = f"http://127.0.0.1:{server.port}/api/v1"
    headers = {"Authorization": f"Bearer {user.access}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{api_base}/tokens", json={"name": "sdk", "scopes": ["subscribe"]},
                             headers=headers) as resp:
            created = (await resp.json())["data"]
        inbox = InboxClient(url_of(server), token=lambda: created["token"], device_id="cli", policy=fast())
        await inbox.wait_synced(T)
        async with http.delete(f"{api_base}/tokens/{created['id']}", headers=headers) as resp:
            assert resp.status == 204
        with pytest.raises(ConnectionTerminated) as info:
            await asyncio.wait_for(inbox.__anext__(), T)
        assert info.value.code == 1008
        assert inbox.closed and inbox.connections == 1  # revoked: no reconnect attempt
        await inbox.close()
