"""The hub (relay/hub.py) and sequenced publish (shared/broker): encode once, write the same bytes
to every local member, one broker subscription per channel with local members, seqs without gaps
across nodes.

Hub-level tests use fake transports (exact bytes, object identity, encode counts). End-to-end tests
use the real server and real websockets clients; sockets join a channel through a test-only
``test.join`` handler that calls ``hub.subscribe`` (the book relay does the same at upgrade).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from websockets.asyncio.client import ClientConnection, connect
from websockets.frames import Frame, Opcode
from websockets.protocol import OPEN, State

import relay.hub
from api.keys import SERVICES
from api.middleware import envelope_middleware
from api.routes import ops
from relay.hub import Hub, frame_bytes, pack_envelope, unpack_envelope
from relay.protocol import JSON, MSGPACK, MSGPACK_SUBPROTOCOL, Message
from shared.broker.memory import MemoryBroker
from shared.broker.redis import RedisBroker, subscriber_name
from shared.codes import ErrorCode
from shared.errors import ApiError, BackendUnavailable
from shared.principals import SCOPES, Principal
from shared.services import Services
from tests.conftest import wait_for

TIMEOUT = 10.0


# -- fakes for hub-level tests -------------------------------------------------------------------


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.buffered = 0  # what get_write_buffer_size reports
        self.closing = False  # what is_closing reports (aborted, connection_lost not run yet)

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return self.closing


class FakeProtocol:
    def __init__(self) -> None:
        self.state = OPEN
        self.extensions: list[Any] = []


class FakeConn:
    def __init__(self, device_id: str | None = None, binary: bool = False) -> None:
        self.device_id = device_id
        self.codec = MSGPACK if binary else JSON
        self.protocol = FakeProtocol()
        self.transport = FakeTransport()
        self.slow = 0
        self.outbox: list[bytes] = []
        self.flushes = 0

    def flush_outbox(self) -> None:  # as WsConnection.flush_outbox, on the fake transport
        if not self.outbox:
            return
        self.flushes += 1
        data = self.outbox[0] if len(self.outbox) == 1 else b"".join(self.outbox)
        self.outbox.clear()
        self.transport.write(data)
        if self.transport.get_write_buffer_size() > 1000:
            self.slow_consumer()

    def slow_consumer(self) -> None:
        self.slow += 1
        self.protocol.state = State.CLOSING


class CountingBroker(MemoryBroker):
    """A memory broker whose (un)subscribe calls are recorded and may be held."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def subscribe(self, channel: str) -> None:
        self.calls.append(("sub", channel))
        await self.gate.wait()
        await super().subscribe(channel)

    async def unsubscribe(self, channel: str) -> None:
        self.calls.append(("unsub", channel))
        await self.gate.wait()
        await super().unsubscribe(channel)


def parse_frame(data: bytes) -> tuple[int, bytes]:
    """(opcode, payload) of one complete unmasked frame, checked to be exactly one frame."""
    assert data[0] & 0x80, "FIN"
    n = data[1] & 0x7F
    offset = 2
    if n == 126:
        n, offset = int.from_bytes(data[2:4], "big"), 4
    elif n == 127:
        n, offset = int.from_bytes(data[2:10], "big"), 10
    assert len(data) == offset + n
    return data[0] & 0x0F, data[offset:]


def split_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Several frames written at once, split."""
    frames = []
    while data:
        n = data[1] & 0x7F
        offset = {126: 4, 127: 10}.get(n, 2)
        if n >= 126:
            n = int.from_bytes(data[2:offset], "big")
        frames.append(parse_frame(data[: offset + n]))
        data = data[offset + n :]
    return frames


def json_frames(data: bytes) -> list[Message]:
    return [json.loads(payload) for _, payload in split_frames(data)]


async def tick() -> None:
    """Let the hub's once-per-tick flush run."""
    await asyncio.sleep(0)


@pytest.fixture
def count_encodes(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Every ``encode_frame`` call the hub makes, as its ``binary`` flag."""
    calls: list[bool] = []
    real = relay.hub.encode_frame

    def counting(message: Message, *, binary: bool) -> bytes:
        calls.append(binary)
        return real(message, binary=binary)

    monkeypatch.setattr(relay.hub, "encode_frame", counting)
    return calls


# -- frames and envelopes -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
@pytest.mark.parametrize("binary", [False, True])
def test_prebuilt_frame_matches_websockets_serialization(size: int, binary: bool) -> None:
    payload = b"x" * size
    opcode = Opcode.BINARY if binary else Opcode.TEXT
    expected = Frame(opcode, payload).serialize(mask=False, extensions=[])
    assert frame_bytes(payload, binary=binary) == expected


@pytest.mark.parametrize("sequenced", [False, True])
def test_envelope_round_trip(sequenced: bool) -> None:
    message = {"type": "op", "payload": b"\x00\xff", "n": 1}
    data = pack_envelope(message, "dev-1", sequenced=sequenced)
    if sequenced:
        data += msgpack.packb(2**40)  # what the broker appends
    assert unpack_envelope(data) == (message, "dev-1", 2**40 if sequenced else None)


# -- hub-level: exact bytes on fake transports ---------------------------------------------------


async def test_broadcast_writes_one_shared_frame_per_codec(count_encodes: list[bool]) -> None:
    hub = Hub(MemoryBroker(), shards=4)
    await hub.start()
    text = [FakeConn(f"t{i}") for i in range(5)]
    binary = [FakeConn(f"b{i}", binary=True) for i in range(5)]
    for conn in text + binary:
        await hub.subscribe(conn, "c")  # type: ignore[arg-type]
    message = {"type": "op", "payload": b"\x00\x01\xfe\xff", "text": "ä"}
    assert await hub.publish("c", message) is None
    await tick()
    assert sorted(count_encodes) == [False, True]  # once per codec, not per recipient
    frames = [conn.transport.written for conn in text + binary]
    assert all(len(w) == 1 for w in frames)
    assert all(w[0] is frames[0][0] for w in frames[:5])  # the very same bytes object
    assert all(w[0] is frames[5][0] for w in frames[5:])
    opcode, payload = parse_frame(frames[0][0])
    assert opcode == 1
    assert json.loads(payload) == {"type": "op", "payload": base64.b64encode(b"\x00\x01\xfe\xff").decode(), "text": "ä"}
    opcode, payload = parse_frame(frames[5][0])
    assert opcode == 2
    assert msgpack.unpackb(payload) == message  # bytes stay raw bytes


async def test_only_used_codecs_are_encoded_and_closed_members_skipped(count_encodes: list[bool]) -> None:
    hub = Hub(MemoryBroker())
    await hub.start()
    a, b, gone = FakeConn("a"), FakeConn("b"), FakeConn("gone", binary=True)
    for conn in (a, b, gone):
        await hub.subscribe(conn, "c")  # type: ignore[arg-type]
    gone.protocol.state = State.CLOSING
    await hub.publish("c", {"type": "x"})
    await tick()
    assert count_encodes == [False]
    assert gone.transport.written == []
    assert len(a.transport.written) == len(b.transport.written) == 1


async def test_exclude_device_skips_every_socket_of_that_device() -> None:
    hub = Hub(MemoryBroker())
    await hub.start()
    sender1, sender2, other = FakeConn("dev-s"), FakeConn("dev-s", binary=True), FakeConn("dev-o")
    for conn in (sender1, sender2, other):
        await hub.subscribe(conn, "c")  # type: ignore[arg-type]
    await hub.publish("c", {"type": "x"}, exclude_device="dev-s")
    await tick()
    assert sender1.transport.written == sender2.transport.written == []
    assert len(other.transport.written) == 1


async def test_a_member_past_the_outbound_bound_is_closed_and_others_still_written() -> None:
    hub = Hub(MemoryBroker(), outbound_limit=1000)
    await hub.start()
    conns = [FakeConn(f"d{i}") for i in range(10)]
    for conn in conns:
        await hub.subscribe(conn, "c")  # type: ignore[arg-type]
    conns[3].transport.buffered = 1001
    await hub.publish("c", {"type": "x"})
    await tick()
    await hub.publish("c", {"type": "y"})
    await tick()
    assert conns[3].slow == 1 and len(conns[3].transport.written) == 1  # closed, then skipped
    assert all(len(c.transport.written) == 2 and c.slow == 0 for i, c in enumerate(conns) if i != 3)


async def test_an_aborted_transport_is_not_written_before_connection_lost() -> None:
    hub = Hub(MemoryBroker())
    await hub.start()
    gone, other = FakeConn("g"), FakeConn("o")
    for conn in (gone, other):
        await hub.subscribe(conn, "c")  # type: ignore[arg-type]
    gone.transport.closing = True  # abort() ran; the protocol is still OPEN until connection_lost
    await hub.publish("c", {"type": "x"})
    await tick()
    assert gone.transport.written == [] and len(other.transport.written) == 1


async def test_frames_of_one_tick_are_joined_once_per_channel_and_written_once_per_socket() -> None:
    hub = Hub(MemoryBroker())
    await hub.start()
    a, b, c = FakeConn("a"), FakeConn("b", binary=True), FakeConn("c")
    for conn in (a, b, c):
        await hub.subscribe(conn, "ch")  # type: ignore[arg-type]
    for i in range(5):
        await hub.publish("ch", {"type": "op", "i": i})
    assert a.transport.written == []  # nothing written before the tick ends
    await tick()
    assert len(a.transport.written) == len(b.transport.written) == 1
    assert [m["i"] for m in json_frames(a.transport.written[0])] == list(range(5))
    assert a.transport.written[0] is c.transport.written[0]  # one join, shared by the members
    got = [msgpack.unpackb(payload)["i"] for _, payload in split_frames(b.transport.written[0])]
    assert got == list(range(5))
    # A long burst within one tick is bounded: written every COALESCE_MAX_FRAMES broadcasts.
    n = relay.hub.COALESCE_MAX_FRAMES
    for i in range(n * 2 + 1):
        await hub.publish("ch", {"type": "op", "i": i})
    assert len(a.transport.written) == 3
    await tick()
    assert len(a.transport.written) == 4
    assert [m["i"] for w in a.transport.written[1:] for m in json_frames(w)] == list(range(n * 2 + 1))


async def test_a_sockets_own_frames_keep_their_place_among_broadcasts() -> None:
    """An ack queued between two broadcasts is written between them, in the same write."""
    hub = Hub(MemoryBroker())
    await hub.start()
    sender, other = FakeConn("s"), FakeConn("o")
    for conn in (sender, other):
        await hub.subscribe(conn, "ch")  # type: ignore[arg-type]
    await hub.publish("ch", {"type": "op", "i": 0})
    hub.queue_own(sender, frame_bytes(b'{"type":"ack","i":0}', binary=False))  # type: ignore[arg-type]
    await hub.publish("ch", {"type": "op", "i": 1}, exclude_device="o")
    await hub.publish("ch", {"type": "op", "i": 2}, exclude_device="s")
    hub.queue_own(sender, frame_bytes(b'{"type":"ack","i":2}', binary=False))  # type: ignore[arg-type]
    assert sender.transport.written == []
    await tick()
    (written,) = sender.transport.written
    assert [(m["type"], m["i"]) for m in json_frames(written)] == [
        ("op", 0), ("ack", 0), ("op", 1), ("ack", 2)
    ]
    (written,) = other.transport.written
    assert [m["i"] for m in json_frames(written)] == [0, 2]


async def test_flush_member_writes_what_a_socket_is_owed_before_anything_else() -> None:
    """What the connection writes itself (a close frame, a pong) follows its queued frames."""
    hub = Hub(MemoryBroker())
    await hub.start()
    a, b = FakeConn("a"), FakeConn("b")
    for conn in (a, b):
        await hub.subscribe(conn, "ch")  # type: ignore[arg-type]
    await hub.publish("ch", {"type": "op", "i": 0})
    hub.queue_own(a, frame_bytes(b'{"type":"mine"}', binary=False))  # type: ignore[arg-type]
    await hub.publish("ch", {"type": "op", "i": 1})
    hub.flush_member(a)  # type: ignore[arg-type]
    a.transport.write(b"PROTOCOL")  # what WsConnection._send_data writes next
    await hub.publish("ch", {"type": "op", "i": 2})
    await tick()
    first, protocol, last = a.transport.written
    assert [m.get("i", "mine") for m in json_frames(first)] == [0, "mine", 1]
    assert protocol == b"PROTOCOL"
    assert [m["i"] for m in json_frames(last)] == [2]
    (written,) = b.transport.written  # b was not disturbed: one write of the whole tick
    assert [m["i"] for m in json_frames(written)] == [0, 1, 2]


async def test_a_socket_in_several_channels_gets_one_tick_in_broadcast_order() -> None:
    hub = Hub(MemoryBroker())
    await hub.start()
    both, only_x, only_y = FakeConn("both"), FakeConn("x"), FakeConn("y", binary=True)
    for conn, channels in ((both, "xy"), (only_x, "x"), (only_y, "y")):
        for channel in channels:
            await hub.subscribe(conn, channel)  # type: ignore[arg-type]
    for i in range(6):
        await hub.publish("xy"[i % 3 == 0], {"type": "op", "i": i})
    await tick()
    (written,) = both.transport.written
    assert [m["i"] for m in json_frames(written)] == list(range(6))
    (written,) = only_x.transport.written
    assert [m["i"] for m in json_frames(written)] == [1, 2, 4, 5]
    (written,) = only_y.transport.written
    assert [msgpack.unpackb(p)["i"] for _, p in split_frames(written)] == [0, 3]


async def test_membership_changes_mid_tick_see_exactly_the_broadcasts_of_their_membership() -> None:
    """A joiner gets nothing broadcast before it joined; a leaver everything broadcast before it
    left, even when both happen between a broadcast and the tick's flush."""
    hub = Hub(MemoryBroker())
    await hub.start()
    stays, leaves, joins = FakeConn("s"), FakeConn("l"), FakeConn("j")
    for conn in (stays, leaves):
        await hub.subscribe(conn, "ch")  # type: ignore[arg-type]
    await hub.publish("ch", {"type": "op", "i": 0})
    await hub.subscribe(joins, "ch")  # type: ignore[arg-type]
    await hub.publish("ch", {"type": "op", "i": 1})
    hub.unsubscribe(leaves, "ch")  # type: ignore[arg-type]
    await hub.publish("ch", {"type": "op", "i": 2})
    await tick()
    got = {c.device_id: [m["i"] for w in c.transport.written for m in json_frames(w)]
           for c in (stays, leaves, joins)}  # fmt: skip
    assert got == {"s": [0, 1, 2], "l": [0, 1], "j": [1, 2]}


async def test_a_slow_consumer_closed_mid_flush_does_not_disturb_the_others() -> None:
    hub = Hub(MemoryBroker(), outbound_limit=1000)
    await hub.start()
    conns = [FakeConn(f"d{i}", binary=i % 2 == 1) for i in range(6)]
    for conn in conns:
        await hub.subscribe(conn, "x")  # type: ignore[arg-type]
    await hub.subscribe(conns[2], "y")  # type: ignore[arg-type]  # the slow one is in two channels
    conns[2].transport.buffered = 1001
    for i in range(4):
        await hub.publish("xy"[i % 2], {"type": "op", "i": i})
    await tick()
    assert conns[2].slow == 1 and len(conns[2].transport.written) == 1
    await hub.publish("x", {"type": "op", "i": 4})
    await tick()
    assert len(conns[2].transport.written) == 1  # closed: skipped from then on
    for i, conn in enumerate(conns):
        if i != 2:
            assert conn.slow == 0 and len(conn.transport.written) == 2


async def test_sequenced_publish_puts_seq_into_every_frame() -> None:
    hub = Hub(MemoryBroker())
    await hub.start()
    conn = FakeConn("a", binary=True)
    await hub.subscribe(conn, "c")  # type: ignore[arg-type]
    assert await hub.sequence_head("k") == 0
    seqs = [await hub.publish("c", {"type": "op", "i": i}, sequence_key="k") for i in range(3)]
    await tick()
    assert seqs == [1, 2, 3]
    assert await hub.sequence_head("k") == 3
    (written,) = conn.transport.written
    got = [msgpack.unpackb(payload) for _, payload in split_frames(written)]
    assert got == [{"type": "op", "i": i, "seq": i + 1} for i in range(3)]


async def test_broker_subscription_follows_local_membership() -> None:
    broker = CountingBroker()
    hub = Hub(broker)
    await hub.start()
    a, b = FakeConn("a"), FakeConn("b")
    await hub.subscribe(a, "c")  # type: ignore[arg-type]
    await hub.subscribe(b, "c")  # type: ignore[arg-type]
    assert broker.calls == [("sub", "c")]  # only for the first local member
    assert list(hub.local_members("c")) == [a, b]  # type: ignore[comparison-overlap]
    hub.unsubscribe(a, "c")  # type: ignore[arg-type]
    hub.unsubscribe(a, "c")  # type: ignore[arg-type]  # a non-member: no-op
    await asyncio.sleep(0)
    assert broker.calls == [("sub", "c")]
    hub.unsubscribe_all(b)  # type: ignore[arg-type]
    await wait_for(lambda: broker.calls == [("sub", "c"), ("unsub", "c")])
    assert list(hub.local_members("c")) == []


async def test_joiners_wait_for_the_broker_confirm_and_leave_join_races_end_subscribed() -> None:
    broker = CountingBroker()
    hub = Hub(broker)
    await hub.start()
    broker.gate.clear()
    a, b = FakeConn("a"), FakeConn("b")
    join_a = asyncio.ensure_future(hub.subscribe(a, "c"))  # type: ignore[arg-type]
    join_b = asyncio.ensure_future(hub.subscribe(b, "c"))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    assert not join_a.done() and not join_b.done()  # the second joiner waits for the same confirm
    broker.gate.set()
    await asyncio.gather(join_a, join_b)

    # Last member leaves (unsubscribe in flight, held) and a new one joins before it completes.
    broker.gate.clear()
    hub.unsubscribe_all(a)  # type: ignore[arg-type]
    hub.unsubscribe_all(b)  # type: ignore[arg-type]
    await wait_for(lambda: broker.calls[-1] == ("unsub", "c"))
    c = FakeConn("c")
    join_c = asyncio.ensure_future(hub.subscribe(c, "c"))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    assert not join_c.done()
    broker.gate.set()
    await join_c
    assert broker.calls == [("sub", "c"), ("unsub", "c"), ("sub", "c")]
    await hub.publish("c", {"type": "x"})
    await tick()
    assert len(c.transport.written) == 1


async def test_a_failed_broker_subscribe_reaches_the_joiner_and_is_retried() -> None:
    broker = CountingBroker()
    hub = Hub(broker)
    await hub.start()
    real = broker.subscribe

    async def failing(channel: str) -> None:
        raise BackendUnavailable("down")

    broker.subscribe = failing  # type: ignore[method-assign]
    a = FakeConn("a")
    with pytest.raises(BackendUnavailable):
        await hub.subscribe(a, "c")  # type: ignore[arg-type]
    broker.subscribe = real  # type: ignore[method-assign]
    b = FakeConn("b")
    await hub.subscribe(b, "c")  # type: ignore[arg-type]  # not confirmed yet: asks again
    assert broker.calls == [("sub", "c")]
    await hub.publish("c", {"type": "x"})
    await tick()
    assert len(b.transport.written) == 1
    await hub.close()


# -- broker contract: publish_sequenced ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_broker_publish_sequenced_appends_the_seq(kind: str, redis_url: str, redis_prefix: str) -> None:
    broker = MemoryBroker() if kind == "memory" else RedisBroker(redis_url, prefix=redis_prefix)
    got: list[bytes] = []
    try:
        await broker.start(lambda channel, data: got.append(data))
        await broker.subscribe("c")
        assert await broker.sequence_head("k") == 0
        seqs = [await broker.publish_sequenced("k", "c", b"\x92\xa1x") for _ in range(3)]
        assert seqs == [1, 2, 3]
        assert await broker.sequence_head("k") == 3
        assert await broker.sequence_head("other") == 0
        await wait_for(lambda: len(got) == 3)
        assert [msgpack.unpackb(d) for d in got] == [["x", 1], ["x", 2], ["x", 3]]
    finally:
        await broker.close()


# -- end to end: real server, real clients -------------------------------------------------------

USER = Principal("user", "u-1", user_id="u-1", scopes=SCOPES - {"admin"})


async def stub_authenticator(token: str) -> Principal:
    if token != "user":
        raise ApiError(ErrorCode.INVALID_TOKEN, "invalid token")
    return USER


def rest_shell(services: Services) -> web.Application:
    app = web.Application(middlewares=[envelope_middleware])
    app[SERVICES] = services
    app.add_routes(ops.routes)
    return app


def install_join(server: Any) -> None:
    """Test-only message type: join the hub channel named in the frame, then answer ``joined``."""
    state = server.state

    async def join(conn: Any, message: Message) -> None:
        await state.hub.subscribe(conn, message["channel"])
        conn.send({"type": "joined", "channel": message["channel"]})

    state.handlers["test.join"] = join


async def start_node(server_factory: Any, make_settings: Callable[..., Any], **overrides: Any) -> Any:
    server = await server_factory(make_settings(**overrides), stub_authenticator, app_factory=rest_shell)
    install_join(server)
    return server


class Client:
    """A websockets client joined to one channel; decodes either codec."""

    def __init__(self, ws: ClientConnection, binary: bool) -> None:
        self.ws = ws
        self.binary = binary

    async def recv(self) -> Message:
        """The next frame, skipping ``device.online``/``device.offline``: every client here is a
        device of the same user, so they see each other come and go (tests/test_presence.py)."""
        while True:
            data = await asyncio.wait_for(self.ws.recv(), TIMEOUT)
            if self.binary:
                assert isinstance(data, bytes)
                message = dict(msgpack.unpackb(data))
            else:
                assert isinstance(data, str)
                message = dict(json.loads(data))
            if message.get("type") not in ("device.online", "device.offline"):
                return message

    async def send(self, message: Message) -> None:
        await self.ws.send(msgpack.packb(message) if self.binary else json.dumps(message))


async def join(server: Any, channel: str, device_id: str, *, binary: bool = False) -> Client:
    ws = await connect(
        f"ws://127.0.0.1:{server.port}/ws?token=user&device_id={device_id}",
        subprotocols=[MSGPACK_SUBPROTOCOL] if binary else None,
        ping_interval=None,
        max_queue=None,
    )
    client = Client(ws, binary)
    hello = await client.recv()
    assert hello["type"] == "hello"
    assert await client.recv() == {"type": "synced", "cursor": hello["cursor"]}
    await client.send({"type": "test.join", "channel": channel})
    assert await client.recv() == {"type": "joined", "channel": channel}
    return client


async def test_json_and_msgpack_members_each_get_their_codec(
    server_factory: Any, make_settings: Callable[..., Any], count_encodes: list[bool]
) -> None:
    server = await start_node(server_factory, make_settings)
    clients = [await join(server, "room", f"d{i}", binary=i % 2 == 1) for i in range(6)]
    payload = bytes(range(256))
    await server.state.hub.publish("room", {"type": "op", "payload": payload, "n": 1}, exclude_device="d0")
    for client in clients[1:]:
        got = await client.recv()
        if client.binary:
            assert got == {"type": "op", "payload": payload, "n": 1}
        else:
            assert got == {"type": "op", "payload": base64.b64encode(payload).decode(), "n": 1}
    assert sorted(count_encodes) == [False, True]
    # d0 was excluded: the next frame it gets is the next broadcast.
    await server.state.hub.publish("room", {"type": "marker"})
    assert await clients[0].recv() == {"type": "marker"}
    for client in clients:
        await client.ws.close()


async def test_closing_the_last_socket_releases_the_redis_subscription(
    server_factory: Any, make_settings: Callable[..., Any], redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    server = await start_node(server_factory, make_settings, redis_url=redis_url, redis_prefix=redis_prefix)
    redis = aioredis.from_url(redis_url)
    try:
        a = await join(server, "room", "a")
        b = await join(server, "room", "b")
        # Subscribed before `joined`; the user's inbox channel comes with every /ws socket, and
        # every node listens for revocation and device notices.
        assert await channels(redis, redis_prefix) == {"room", "inbox:u-1", "revoke", "device_notice"}
        await a.ws.close()
        await server.state.hub.publish("room", {"type": "still"})
        assert await b.recv() == {"type": "still"}
        assert await channels(redis, redis_prefix) == {"room", "inbox:u-1", "revoke", "device_notice"}
        await b.ws.close()
        await wait_until_channels(redis, redis_prefix, {"revoke", "device_notice"})
        assert list(server.state.hub.local_members("room")) == []
    finally:
        await redis.aclose()


async def test_two_nodes_deliver_one_gapless_sequence(
    server_factory: Any, make_settings: Callable[..., Any], redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    nodes = [
        await start_node(
            server_factory, make_settings, redis_url=redis_url, redis_prefix=redis_prefix,
            data_dir=str(tmp_path / f"node{i}"),
        )
        for i in range(2)
    ]  # fmt: skip
    clients = [await join(nodes[i % 2], "book:1", f"d{i}", binary=i >= 2) for i in range(4)]
    n = 200

    async def publish_from(node: Any, tag: str) -> list[int]:
        return [
            await node.state.hub.publish("book:1", {"type": "op", "from": tag}, sequence_key="bookseq:1")
            for _ in range(n)
        ]

    seqs_1, seqs_2 = await asyncio.gather(publish_from(nodes[0], "n1"), publish_from(nodes[1], "n2"))
    assert sorted(seqs_1 + seqs_2) == list(range(1, 2 * n + 1))
    for client in clients:
        got = [await client.recv() for _ in range(2 * n)]
        assert [m["seq"] for m in got] == list(range(1, 2 * n + 1))  # increasing, no gaps
        assert sum(m["from"] == "n1" for m in got) == n
    assert await nodes[1].state.hub.sequence_head("bookseq:1") == 2 * n
    for client in clients:
        await client.ws.close()


async def test_hub_keeps_working_after_the_pubsub_connection_is_killed(
    server_factory: Any, make_settings: Callable[..., Any], redis_url: str, redis_prefix: str
) -> None:
    server = await start_node(server_factory, make_settings, redis_url=redis_url, redis_prefix=redis_prefix)
    client = await join(server, "room", "a")
    hub = server.state.hub
    redis: Any = aioredis.from_url(redis_url)
    try:
        for i in range(20):
            await hub.publish("room", {"type": "op", "i": i})
        assert [(await client.recv())["i"] for _ in range(20)] == list(range(20))
        killed = 0
        for entry in await redis.client_list(_type="pubsub"):
            if entry.get("name") == subscriber_name(redis_prefix):
                await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub", "ID", entry["id"])
                killed += 1
        assert killed == 1
        # Publish until messages flow again (pub/sub drops what is sent while reconnecting).
        seen: list[int] = []
        i = 20
        while not seen or seen[-1] != i - 1:
            assert i < 2000, "the hub never received again"
            await hub.publish("room", {"type": "op", "i": i})
            i += 1
            with contextlib.suppress(TimeoutError):
                while not seen or seen[-1] != i - 1:
                    seen.append((await asyncio.wait_for(client.recv(), 0.05))["i"])
        for _ in range(10):  # and keeps receiving, in order
            await hub.publish("room", {"type": "op", "i": i})
            i += 1
        while seen[-1] != i - 1:
            seen.append((await client.recv())["i"])
        assert seen == sorted(seen) and len(set(seen)) == len(seen)
        assert await channels(redis, redis_prefix) == {"room", "inbox:u-1", "revoke", "device_notice"}
    finally:
        await redis.aclose()
        await client.ws.close()


async def channels(redis: Any, prefix: str) -> set[str]:
    return {name.decode()[len(prefix) :] for name in await redis.pubsub_channels(prefix + "*")}


async def wait_until_channels(redis: Any, prefix: str, expected: set[str]) -> None:
    for _ in range(500):
        if await channels(redis, prefix) == expected:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"channels never became {expected}")
