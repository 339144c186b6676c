"""The book relay's live path (realtime.md "Handshake", "Book relay"): membership checked before
101, ops relayed to the other members with device_id/relay_timestamp/seq and acknowledged to the
sender, op-id dedupe, bad ops answered without closing, msgpack raw bytes, presence frames, and
two nodes sharing PostgreSQL + Redis keeping one per-book order.

Members are added straight into the store here; tests/test_pairing.py joins them the API way."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import msgpack
import pytest
from websockets.asyncio.client import ClientConnection, connect

from shared.config import Settings
from tests.auth_helpers import PASSWORD
from tests.device_helpers import DeviceKey, insert_book, insert_device
from tests.test_ws_handshake import refused

TIMEOUT = 10.0
MSGPACK = "switchboard.v1.msgpack"


class Peer:
    """One device's relay socket; ``frames`` keeps every frame read, in order."""

    def __init__(self, key: DeviceKey, ws: ClientConnection) -> None:
        self.key = key
        self.ws = ws
        self.binary = ws.subprotocol == MSGPACK
        self.frames: list[dict[str, Any]] = []

    @property
    def id(self) -> str:
        assert self.key.device_id is not None
        return self.key.device_id

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(msgpack.packb(frame, use_bin_type=True) if self.binary else json.dumps(frame))

    async def recv(self) -> dict[str, Any]:
        data = await asyncio.wait_for(self.ws.recv(), TIMEOUT)
        frame: dict[str, Any] = msgpack.unpackb(data, raw=False) if self.binary else json.loads(data)
        self.frames.append(frame)
        return frame

    async def until(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """Read until a frame matches (the ones before it stay in ``frames``)."""
        while True:
            frame = await self.recv()
            if predicate(frame):
                return frame

    async def op(self, payload: bytes, op_id: str | None = None) -> int:
        """Send one op and wait for its ack; the op's seq."""
        frame: dict[str, Any] = {"type": "crdt_operation", "payload": payload if self.binary else b64(payload),
                                 "timestamp": int(time.time())}
        if op_id is not None:
            frame["id"] = op_id
        await self.send(frame)
        ack = await self.until(lambda f: f["type"] in ("ack", "error"))
        assert ack == {"type": "ack", "id": op_id, "seq": ack["seq"]}, ack
        return int(ack["seq"])

    def ops(self) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["type"] == "crdt_operation"]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def relay_url(server: Any, book_id: str) -> str:
    return f"ws://127.0.0.1:{server.port}/ws/relay/{book_id}"


async def open_peer(server: Any, key: DeviceKey, book_id: str, token: str | None = None,
                    msgpack_codec: bool = False) -> Peer:
    """Connect, and check the first frames: ``presence`` (self included), then ``synced``."""
    ws = await connect(
        relay_url(server, book_id),
        additional_headers={"Authorization": f"Bearer {token or key.token()}"},
        subprotocols=[MSGPACK] if msgpack_codec else None,  # type: ignore[list-item]
        open_timeout=TIMEOUT,
    )
    peer = Peer(key, ws)
    presence = await peer.recv()
    assert presence["type"] == "presence" and peer.id in presence["online"], presence
    synced = await peer.recv()
    assert synced["type"] == "synced" and isinstance(synced["seq"], int), synced
    return peer


GRACE_S = 0.3  # PRESENCE_GRACE_S for these tests: device.offline comes this long after the last close


@pytest.fixture
async def server(server_factory: Any, make_settings: Callable[..., Settings]) -> Any:
    return await server_factory(make_settings(presence_grace_s=GRACE_S))


async def devices(server: Any, count: int) -> list[DeviceKey]:
    return [await insert_device(server.services.db) for _ in range(count)]


# -- the live path -----------------------------------------------------------------------------------


async def test_ops_reach_every_other_member_with_seq_and_the_sender_gets_the_ack(server: Any) -> None:
    a_key, b_key, c_key = await devices(server, 3)
    book = await insert_book(server.services.db, a_key, b_key, c_key)
    a = await open_peer(server, a_key, book)
    b = await open_peer(server, b_key, book)
    await a.until(lambda f: f == {"type": "device.online", "device_id": b.id})
    c = await open_peer(server, c_key, book)
    assert c.frames[0] == {"type": "presence", "online": sorted([a.id, b.id, c.id])}
    for peer in (a, b):
        await peer.until(lambda f: f == {"type": "device.online", "device_id": c.id})

    sent = [(f"op-{i}", f"ciphertext {i}".encode()) for i in range(5)]
    before = int(time.time())
    seqs = [await a.op(payload, op_id) for op_id, payload in sent]
    seqs.append(await a.op(b"no id"))  # an op without id: ack with id null
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert c.frames[1]["seq"] <= seqs[0] - 1  # synced reported the head before these ops

    expected = [b64(p) for _, p in sent] + [b64(b"no id")]
    for peer in (b, c):
        got = [await peer.until(lambda f: f["type"] == "crdt_operation") for _ in expected]
        assert [f["payload"] for f in got] == expected
        assert [f["seq"] for f in got] == seqs
        for frame in got:
            assert set(frame) == {"type", "payload", "timestamp", "device_id", "relay_timestamp", "seq"}
            assert frame["device_id"] == a.id  # from the credential
            assert before <= frame["relay_timestamp"] <= int(time.time())

    # A never gets its own ops: B's next op is the first op A sees, and channel order is seq order.
    b_seq = await b.op(b"from b")
    frame = await a.until(lambda f: f["type"] == "crdt_operation")
    assert (frame["payload"], frame["device_id"], frame["seq"]) == (b64(b"from b"), b.id, b_seq)
    assert a.ops() == [frame]
    assert b_seq > seqs[-1]

    await a.send({"type": "ping"})
    assert await a.until(lambda f: f["type"] != "crdt_operation") == {"type": "pong"}

    await b.ws.close()
    for peer in (a, c):
        await peer.until(lambda f: f == {"type": "device.offline", "device_id": b.id})
    await a.ws.close()
    await c.ws.close()


async def test_the_sender_device_id_comes_from_the_credential(server: Any) -> None:
    a_key, b_key = await devices(server, 2)
    book = await insert_book(server.services.db, a_key, b_key)
    a = await open_peer(server, a_key, book)
    b = await open_peer(server, b_key, book)
    await a.send({"type": "crdt_operation", "id": "x", "payload": b64(b"p"), "timestamp": 1,
                  "device_id": b.id, "seq": 99999, "relay_timestamp": 0})
    await a.until(lambda f: f["type"] == "ack")
    frame = await b.until(lambda f: f["type"] == "crdt_operation")
    assert frame["device_id"] == a.id and frame["seq"] != 99999 and frame["relay_timestamp"] > 0


async def test_a_resent_op_id_gets_its_first_seq_and_is_relayed_once(server: Any) -> None:
    a_key, b_key = await devices(server, 2)
    book = await insert_book(server.services.db, a_key, b_key)
    a = await open_peer(server, a_key, book)
    b = await open_peer(server, b_key, book)
    first = await a.op(b"once", "op-dup")
    assert await a.op(b"once", "op-dup") == first
    # Another socket of the same device re-sending it: still the same op.
    a2 = await open_peer(server, a_key, book)
    assert await a2.op(b"once", "op-dup") == first
    # Another device may use the same id for its own op.
    other = await b.op(b"b's own", "op-dup")
    assert other > first
    last = await a.op(b"after", "op-next")
    while not any(f["seq"] == last for f in b.ops()):
        await b.recv()
    assert [(f["payload"], f["seq"]) for f in b.ops()] == [(b64(b"once"), first), (b64(b"after"), last)]


async def test_a_bad_op_gets_an_error_frame_and_the_socket_stays_open(server: Any) -> None:
    a_key, b_key = await devices(server, 2)
    book = await insert_book(server.services.db, a_key, b_key)
    a = await open_peer(server, a_key, book)
    b = await open_peer(server, b_key, book)
    bad: list[tuple[dict[str, Any], Any]] = [
        ({"id": "o1", "payload": "not base64!", "timestamp": 1}, "o1"),
        ({"id": "o2", "payload": "QUJD", "timestamp": 1, "extra": 1}, None),  # fine: control, acked
        ({"id": "o3", "payload": "QUJ", "timestamp": 1}, "o3"),  # bad padding
        ({"id": "o4", "payload": 12, "timestamp": 1}, "o4"),
        ({"id": "o5", "timestamp": 1}, "o5"),
        ({"id": "o6", "payload": "QUJD", "timestamp": "now"}, "o6"),
        ({"id": {"x": 1}, "payload": "QUJD", "timestamp": 1}, None),
    ]
    for fields, error_id in bad:
        await a.send({"type": "crdt_operation", **fields})
        answer = await a.until(lambda f: f["type"] in ("ack", "error"))
        if fields["id"] == "o2":
            assert answer["type"] == "ack"
            continue
        assert answer["type"] == "error" and answer["code"] == "VALIDATION_ERROR", answer
        assert answer["id"] == error_id and answer["message"]
    seq = await a.op(b"still open", "o7")
    got = [await b.until(lambda f: f["type"] == "crdt_operation") for _ in range(2)]
    assert [f["payload"] for f in got] == ["QUJD", b64(b"still open")]
    assert got[1]["seq"] == seq


async def test_msgpack_peers_send_and_receive_raw_bytes(server: Any) -> None:
    a_key, b_key = await devices(server, 2)
    book = await insert_book(server.services.db, a_key, b_key)
    a = await open_peer(server, a_key, book)
    b = await open_peer(server, b_key, book, msgpack_codec=True)
    assert b.binary
    blob = bytes(range(256))
    seq = await a.op(blob, "j1")
    frame = await b.until(lambda f: f["type"] == "crdt_operation")
    assert frame["payload"] == blob and isinstance(frame["payload"], bytes) and frame["seq"] == seq
    seq2 = await b.op(b"\x00\xffraw", "m1")
    frame = await a.until(lambda f: f["type"] == "crdt_operation")
    assert frame["payload"] == b64(b"\x00\xffraw") and frame["seq"] == seq2 > seq
    await b.send({"type": "ping"})
    assert await b.recv() == {"type": "pong"}


async def test_online_and_offline_follow_a_device_s_first_and_last_socket(server: Any) -> None:
    a_key, b_key = await devices(server, 2)
    book = await insert_book(server.services.db, a_key, b_key)
    b = await open_peer(server, b_key, book)
    a1 = await open_peer(server, a_key, book)
    assert a1.frames[0] == {"type": "presence", "online": sorted([a1.id, b.id])}
    assert await b.recv() == {"type": "device.online", "device_id": a1.id}
    a2 = await open_peer(server, a_key, book)  # a second socket of A: nobody is told
    await a1.ws.close()
    await a2.send({"type": "ping"})
    assert await a2.recv() == {"type": "pong"}
    await b.send({"type": "ping"})
    assert await b.recv() == {"type": "pong"}  # no device.offline: A is still here
    await a2.ws.close()
    assert await b.recv() == {"type": "device.offline", "device_id": a1.id}
    await b.ws.close()


# -- refused before 101 --------------------------------------------------------------------------------


async def test_outsiders_unknown_books_and_other_credentials_are_refused_before_101(
    server: Any, make_settings: Callable[..., Settings]
) -> None:
    member, outsider = await devices(server, 2)
    book = await insert_book(server.services.db, member)
    path = f"/ws/relay/{book}"

    async def forbidden(path: str, token: str) -> None:
        status, _, error = await refused(server, path, {"Authorization": f"Bearer {token}"})
        assert (status, error["code"]) == (403, "FORBIDDEN"), error

    await forbidden(path, outsider.token())
    await forbidden("/ws/relay/no-such-book", member.token())  # same answer as not a member
    await forbidden("/ws/relay/no-such-book", outsider.token())
    # A removed member is an outsider again.
    await server.services.db.execute("UPDATE book_members SET removed_at = 1 WHERE device_id = $1", member.device_id)
    await forbidden(path, member.token())

    status, _, error = await refused(server, path)
    assert (status, error["code"]) == (401, "INVALID_TOKEN")
    status, _, error = await refused(server, path, {"Authorization": f"Bearer {outsider.token(ttl=-120)}"})
    assert (status, error["code"]) == (401, "TOKEN_EXPIRED")
    status, _, error = await refused(server, path + f"?token={DeviceKey().token(sub=outsider.device_id)}")
    assert (status, error["code"]) == (401, "INVALID_TOKEN")


async def test_a_user_token_cannot_open_a_book(server: Any) -> None:
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.port}") as http:
        await http.post("/api/v1/auth/register", json={"email": "u@example.com", "password": PASSWORD})
        resp = await http.post("/api/v1/auth/login", json={"email": "u@example.com", "password": PASSWORD})
        access = (await resp.json())["data"]["access_token"]
    (member,) = await devices(server, 1)
    book = await insert_book(server.services.db, member)
    status, _, error = await refused(server, f"/ws/relay/{book}", {"Authorization": f"Bearer {access}"})
    assert (status, error["code"]) == (403, "FORBIDDEN")


async def test_a_token_bound_to_another_book_is_forbidden(server: Any) -> None:
    (key,) = await devices(server, 1)
    book_x = await insert_book(server.services.db, key)
    book_y = await insert_book(server.services.db, key)
    status, _, error = await refused(server, f"/ws/relay/{book_x}", {"Authorization": f"Bearer {key.token(book_y)}"})
    assert (status, error["code"]) == (403, "FORBIDDEN")
    peer = await open_peer(server, key, book_x, token=key.token(book_x))  # bound to this one: fine
    await peer.ws.close()


async def test_relay_connections_are_limited_per_device(server_factory: Any, make_settings: Callable[..., Settings]) -> None:
    server = await server_factory(make_settings(rate_relay_connect="2/600"))
    a_key, b_key = await devices(server, 2)
    book = await insert_book(server.services.db, a_key, b_key)
    peers = [await open_peer(server, a_key, book) for _ in range(2)]
    status, headers, error = await refused(server, f"/ws/relay/{book}", {"Authorization": f"Bearer {a_key.token()}"})
    assert (status, error["code"]) == (429, "RATE_LIMIT_EXCEEDED")
    assert int(headers["retry-after"]) > 0
    peers.append(await open_peer(server, b_key, book))  # per device
    for peer in peers:
        await peer.ws.close()


# -- two nodes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("redis_kind", ["standalone", "cluster"])
async def test_two_nodes_keep_one_per_book_order(
    server_factory: Any, make_settings: Callable[..., Settings], pg_url: str, pg_schema: str,
    redis_url: str, redis_prefix: str, redis_kind: str, request: pytest.FixtureRequest,
) -> None:
    # On a Redis Cluster the book's channel and seq counter share a hash tag (one slot), so the
    # sequenced publish runs there as one script.
    url, cluster = redis_url, False
    if redis_kind == "cluster":
        url, cluster = request.getfixturevalue("redis_cluster").url, True

    def settings() -> Settings:
        return make_settings(database_url=pg_url, database_schema=pg_schema, redis_url=url,
                             redis_prefix=redis_prefix, redis_cluster=cluster)

    node1 = await server_factory(settings())
    node2 = await server_factory(settings())
    a_key, b_key = await devices(node1, 2)
    book = await insert_book(node1.services.db, a_key, b_key)
    a = await open_peer(node1, a_key, book)
    b = await open_peer(node2, b_key, book)
    count = 200

    async def run(peer: Peer, name: str) -> list[int]:
        frames = [{"type": "crdt_operation", "id": f"{name}-{i}", "payload": b64(f"{name}:{i}".encode()),
                   "timestamp": int(time.time())} for i in range(count)]
        for frame in frames:  # all at once: the acks come back while the other side sends too
            await peer.send(frame)
        acks: list[int] = []
        while len(acks) < count:
            frame = await peer.recv()
            assert frame["type"] != "error", frame
            if frame["type"] == "ack":
                assert frame["id"] == f"{name}-{len(acks)}"  # acks in send order
                acks.append(frame["seq"])
        while len(peer.ops()) < count:
            await peer.recv()
        return acks

    acks_a, acks_b = await asyncio.gather(run(a, "a"), run(b, "b"))
    for peer, other, acks in ((a, "b", acks_b), (b, "a", acks_a)):
        ops = peer.ops()
        assert len(ops) == count
        seqs = [f["seq"] for f in ops]
        assert seqs == sorted(seqs) and len(set(seqs)) == count  # strictly increasing
        assert [base64.b64decode(f["payload"]).decode() for f in ops] == [f"{other}:{i}" for i in range(count)]
        assert seqs == acks  # the seq each sender was told is the one everyone sees
    merged = sorted(acks_a + acks_b)
    assert len(set(merged)) == 2 * count  # one counter for the book across both nodes
    await a.ws.close()
    await b.ws.close()


# -- presence across nodes, grace and TTL -------------------------------------------------------------


async def test_a_reconnect_within_the_grace_is_silent(
    server_factory: Any, make_settings: Callable[..., Settings]
) -> None:
    server = await server_factory(make_settings(presence_grace_s=3.0, rate_relay_connect="100/600"))
    a_key, b_key = await devices(server, 2)
    book = await insert_book(server.services.db, a_key, b_key)
    a = await open_peer(server, a_key, book)
    b = await open_peer(server, b_key, book)
    assert await a.recv() == {"type": "device.online", "device_id": b.id}
    await b.ws.close()
    b = await open_peer(server, b_key, book)  # back before the grace ends
    assert b.frames[0]["online"] == sorted([a.id, b.id])
    await a.send({"type": "ping"})
    assert await a.recv() == {"type": "pong"}  # neither device.offline nor device.online
    await b.ws.close()
    assert await a.recv() == {"type": "device.offline", "device_id": b.id}  # after the grace
    await a.ws.close()


async def test_presence_spans_nodes_and_a_silent_node_s_devices_go_offline(
    server_factory: Any, make_settings: Callable[..., Settings], pg_url: str, pg_schema: str,
    redis_url: str, redis_prefix: str,
) -> None:
    def settings() -> Settings:
        return make_settings(database_url=pg_url, database_schema=pg_schema, redis_url=redis_url,
                             redis_prefix=redis_prefix, presence_grace_s=GRACE_S, presence_ttl_s=1.5)

    node1 = await server_factory(settings())
    node2 = await server_factory(settings())
    a_key, b_key, c_key = await devices(node1, 3)
    book = await insert_book(node1.services.db, a_key, b_key, c_key)
    a = await open_peer(node1, a_key, book)
    b = await open_peer(node2, b_key, book)  # node 2's first socket on the book
    # B learns of A: in its presence, or right after it once node 1 answered node 2's query.
    if a.id not in b.frames[0]["online"]:
        await b.until(lambda f: f == {"type": "device.online", "device_id": a.id})
    await a.until(lambda f: f == {"type": "device.online", "device_id": b.id})
    c = await open_peer(node2, c_key, book)  # node 2 knows the book now: a complete first frame
    assert c.frames[0] == {"type": "presence", "online": sorted([a.id, b.id, c.id])}
    for peer in (a, b):
        await peer.until(lambda f: f == {"type": "device.online", "device_id": c.id})
    await c.ws.close()  # the last socket of C, on node 2: offline on both nodes after the grace
    for peer in (a, b):
        await peer.until(lambda f: f == {"type": "device.offline", "device_id": c.id})

    # Node 1 stops speaking (its presence pass stops, as if partitioned or killed): after
    # PRESENCE_TTL_S node 2 counts A offline, without anything from node 1.
    relay1 = node1.state.services.extras["relay.books"]
    relay1._stopping = True
    for task in relay1._background:
        task.cancel()
    await b.until(lambda f: f == {"type": "device.offline", "device_id": a.id})
    await a.ws.close()
    await b.ws.close()
