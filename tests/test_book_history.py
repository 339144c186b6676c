"""The book relay's retained history (realtime.md "Book relay", guarantee 1): ``?since`` catch-up
with ``synced``/``reset``, ``BOOK_RETENTION`` (age, size, ``0``), snapshots with compare-and-swap,
durable op-id dedupe, delivery in seq order when a publish is lost, ``POST /relay/send`` and
``sync_status``. Runs on SQLite and on PostgreSQL + Redis."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import connect

from relay import book_relay
from shared.books import history
from shared.books.history import NewOp
from shared.config import Settings
from tests.device_helpers import DeviceKey, insert_book, insert_device
from tests.test_book_relay import MSGPACK, TIMEOUT, Peer, b64, open_peer, relay_url


async def connect_since(server: Any, key: DeviceKey, book_id: str, since: int | None,
                        msgpack_codec: bool = False) -> Peer:
    """Open a relay socket with ``?since=``; ``presence`` checked, the rest left to the test."""
    url = relay_url(server, book_id) + (f"?since={since}" if since is not None else "")
    ws = await connect(url, additional_headers={"Authorization": f"Bearer {key.token()}"},
                       subprotocols=[MSGPACK] if msgpack_codec else None,  # type: ignore[list-item]
                       open_timeout=TIMEOUT)
    peer = Peer(key, ws)
    first = await peer.recv()
    assert first["type"] == "presence", first
    return peer


async def until_type(peer: Peer, *types: str) -> dict[str, Any]:
    return await peer.until(lambda f: f["type"] in types)


class Rest:
    def __init__(self, server: Any) -> None:
        self.base = f"http://127.0.0.1:{server.port}/api/v1"

    async def call(self, method: str, path: str, key: DeviceKey, **kwargs: Any) -> tuple[int, Any, Any]:
        headers = {"Authorization": f"Bearer {key.token()}"}
        async with aiohttp.ClientSession() as http, http.request(
            method, self.base + path, headers=headers, **kwargs
        ) as response:
            return response.status, await response.json(), response.headers

    async def snapshot(self, key: DeviceKey, book: str, seq: int, base: int | None, data: bytes) -> tuple[int, Any]:
        form = aiohttp.FormData()
        form.add_field("metadata", json.dumps({"seq": seq, "base_snapshot_seq": base}),
                       content_type="application/json")
        form.add_field("file", data, filename="snapshot.bin", content_type="application/octet-stream")
        status, body, _ = await self.call("PUT", f"/books/{book}/snapshot", key, data=form)
        return status, body


@pytest.fixture
async def node(server_factory: Any, backend_settings: Settings) -> Any:
    return await server_factory(backend_settings)


async def book_of(server: Any, count: int) -> tuple[str, list[DeviceKey]]:
    keys = [await insert_device(server.services.db) for _ in range(count)]
    return await insert_book(server.services.db, *keys), keys


async def send_all(peer: Peer, name: str, count: int, pause: float = 0.0) -> list[int]:
    """Send ``count`` ops with ids (at once, or ``pause`` apart); their seqs, in send order."""
    for i in range(count):
        if pause:
            await asyncio.sleep(pause)
        await peer.send({"type": "crdt_operation", "id": f"{name}-{i}", "payload": b64(f"{name}:{i}".encode()),
                         "timestamp": int(time.time())})
    acks: list[int] = []
    while len(acks) < count:
        frame = await until_type(peer, "ack", "error")
        assert frame["type"] == "ack", frame
        acks.append(frame["seq"])
    return acks


def payloads(frames: list[dict[str, Any]]) -> list[str]:
    return [base64.b64decode(f["payload"]).decode() for f in frames]


# -- catch-up ------------------------------------------------------------------------------------------


async def test_an_offline_device_catches_up_with_exactly_the_ops_it_missed_in_order(node: Any) -> None:
    book, (a_key, b_key, c_key) = await book_of(node, 3)
    c = await open_peer(node, c_key, book)
    first = await c.op(b"before")
    await c.ws.close()
    a = await open_peer(node, a_key, book)
    b = await open_peer(node, b_key, book)
    acks_a, acks_b = await asyncio.gather(send_all(a, "a", 250), send_all(b, "b", 250))
    sent = sorted(acks_a + acks_b)
    assert sent == list(range(first + 1, first + 501))  # one gapless sequence for the book

    c = await connect_since(node, c_key, book, since=first)
    synced = await until_type(c, "synced")
    replayed = c.ops()
    assert synced == {"type": "synced", "seq": first + 500}
    assert [f["seq"] for f in replayed] == sent  # exactly the missing ops, in order
    by_seq = dict(zip(acks_a, [f"a:{i}" for i in range(250)], strict=True))
    by_seq.update(zip(acks_b, [f"b:{i}" for i in range(250)], strict=True))
    assert payloads(replayed) == [by_seq[s] for s in sent]
    for frame in replayed:  # the live frame's shape, sender from the credential
        assert set(frame) == {"type", "payload", "timestamp", "device_id", "relay_timestamp", "seq"}
        assert frame["device_id"] == (a_key.device_id if by_seq[frame["seq"]][0] == "a" else b_key.device_id)
    for peer in (a, b, c):
        await peer.ws.close()


async def test_live_ops_during_a_catch_up_follow_it_without_gaps_or_repeats(node: Any) -> None:
    book, (a_key, c_key) = await book_of(node, 2)
    a = await open_peer(node, a_key, book)
    await send_all(a, "old", 300)

    async def keep_sending() -> list[int]:
        return await send_all(a, "new", 200, pause=0.01)  # within the frame rate limit

    sender = asyncio.create_task(keep_sending())
    c = await connect_since(node, c_key, book, since=0, msgpack_codec=True)
    new = await sender
    while len(c.ops()) < 500:
        await c.recv()
    seqs = [f["seq"] for f in c.ops()]
    assert seqs == list(range(1, 501)), "replay and live interleaved out of order or with a gap"
    assert [f["type"] for f in c.frames].count("synced") == 1
    assert new[-1] == 500
    await a.ws.close()
    await c.ws.close()


async def test_since_at_the_head_is_synced_and_since_ahead_of_it_is_reset(node: Any) -> None:
    book, (a_key, c_key) = await book_of(node, 2)
    a = await open_peer(node, a_key, book)
    head = (await send_all(a, "x", 3))[-1]
    c = await connect_since(node, c_key, book, since=head)
    assert await c.recv() == {"type": "synced", "seq": head}
    await c.ws.close()
    c = await connect_since(node, c_key, book, since=head + 10)  # a future the server never had
    assert await c.recv() == {"type": "reset", "reason": "history_truncated", "seq": head}
    assert await c.recv() == {"type": "synced", "seq": head}
    await a.op(b"after-reset")  # and the socket is live after the reset
    live = await until_type(c, "crdt_operation")
    assert live["seq"] == head + 1
    await a.ws.close()
    await c.ws.close()


async def test_a_bad_since_is_refused_before_the_upgrade(node: Any) -> None:
    book, (a_key,) = await book_of(node, 1)
    for bad in ("-1", "abc", "1.5", "9" * 30):
        async with aiohttp.ClientSession() as http, http.get(
            relay_url(node, book).replace("ws://", "http://") + f"?since={bad}",
            headers={"Authorization": f"Bearer {a_key.token()}", "Connection": "Upgrade",
                     "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                     "Sec-WebSocket-Key": base64.b64encode(b"0123456789abcdef").decode()},
        ) as response:
            assert response.status == 400, bad
            assert (await response.json())["error"]["code"] == "VALIDATION_ERROR"


# -- retention -----------------------------------------------------------------------------------------


async def test_with_retention_0_nothing_is_stored_and_a_returning_device_gets_reset(
    server_factory: Any, make_settings: Callable[..., Settings]
) -> None:
    server = await server_factory(make_settings(book_retention="0"))
    book, (a_key, b_key, c_key) = await book_of(server, 3)
    a = await open_peer(server, a_key, book)
    b = await open_peer(server, b_key, book)
    acks = await send_all(a, "a", 20)
    assert acks == list(range(1, 21))
    assert len(b.ops()) + len([f for f in [await b.recv() for _ in range(20 - len(b.ops()))]]) >= 20
    assert await server.services.db.fetchval("SELECT count(*) FROM book_ops") == 0
    c = await connect_since(server, c_key, book, since=5)
    assert await c.recv() == {"type": "reset", "reason": "history_truncated", "seq": 20}
    for peer in (a, b, c):
        await peer.ws.close()


async def test_the_size_cap_drops_the_oldest_ops_and_older_syncs_get_reset(
    server_factory: Any, make_settings: Callable[..., Settings]
) -> None:
    server = await server_factory(make_settings(book_retention="30d,2KiB"))
    book, (a_key, c_key) = await book_of(server, 2)
    a = await open_peer(server, a_key, book)
    for i in range(40):  # 40 x 200 bytes = 8 KB, four times the cap
        await a.op(bytes([i]) * 200, op_id=f"op-{i}")
    db = server.services.db

    async def trimmed() -> bool:
        return int(await db.fetchval("SELECT retained_bytes FROM book_heads WHERE book_id = $1", book)) <= 2048

    for _ in range(100):
        if await trimmed():
            break
        await asyncio.sleep(0.05)
    assert await trimmed()
    state = await history.state(db, book)
    assert state.head == 40 and state.pruned_upto >= 29  # at most ~10 ops of 200 bytes fit
    assert int(await db.fetchval("SELECT count(*) FROM book_ops WHERE book_id = $1", book)) == 40 - state.pruned_upto
    c = await connect_since(server, c_key, book, since=0)
    assert (await c.recv())["type"] == "reset"
    await c.ws.close()
    c = await connect_since(server, c_key, book, since=state.pruned_upto)  # what is left replays
    await until_type(c, "synced")
    assert [f["seq"] for f in c.ops()] == list(range(state.pruned_upto + 1, 41))
    await a.ws.close()
    await c.ws.close()


async def test_ops_past_the_age_are_pruned(node: Any) -> None:
    book, (a_key, c_key) = await book_of(node, 2)
    a = await open_peer(node, a_key, book)
    await send_all(a, "x", 5)
    db = node.services.db
    await db.execute("UPDATE book_ops SET created_at = created_at - $1 WHERE book_id = $2 AND seq <= 3",
                     40 * 86400 * 1000, book)
    await book_relay.for_state(node.state).prune()  # the periodic pass, run now
    state = await history.state(db, book)
    assert state.pruned_upto == 3 and state.head == 5
    c = await connect_since(node, c_key, book, since=2)
    assert (await c.recv())["type"] == "reset"
    await a.ws.close()
    await c.ws.close()


# -- snapshots -----------------------------------------------------------------------------------------


async def test_a_device_away_past_a_snapshot_restores_it_and_catches_up_after_it(node: Any) -> None:
    book, (a_key, b_key, c_key) = await book_of(node, 3)
    rest = Rest(node)
    a = await open_peer(node, a_key, book)
    await send_all(a, "x", 30)
    snapshot = b"encrypted-state-" * 1000
    status, body = await rest.snapshot(a_key, book, 20, None, snapshot)
    assert status == 200, body
    assert body["data"]["seq"] == 20 and body["data"]["size_bytes"] == len(snapshot)
    await book_relay.for_state(node.state).prune()
    state = await history.state(node.services.db, book)
    assert state.pruned_upto == 20 and state.snapshot_seq == 20

    c = await connect_since(node, c_key, book, since=10)
    assert await c.recv() == {"type": "reset", "reason": "history_truncated", "seq": 30, "snapshot_seq": 20}
    assert await c.recv() == {"type": "synced", "seq": 30}
    await c.ws.close()
    status, body, _ = await rest.call("GET", f"/books/{book}/snapshot", c_key)
    assert status == 200 and body["data"]["seq"] == 20 and body["data"]["size_bytes"] == len(snapshot)
    async with aiohttp.ClientSession() as http, http.get(body["data"]["download_url"]) as response:
        assert response.status == 200 and await response.read() == snapshot
    c = await connect_since(node, c_key, book, since=20)
    synced = await until_type(c, "synced")
    assert synced["seq"] == 30 and [f["seq"] for f in c.ops()] == list(range(21, 31))
    assert payloads(c.ops()) == [f"x:{i}" for i in range(20, 30)]
    await a.ws.close()
    await c.ws.close()


async def test_two_snapshots_on_the_same_base_one_wins_the_other_gets_conflict(node: Any) -> None:
    book, (a_key, b_key) = await book_of(node, 2)
    rest = Rest(node)
    a = await open_peer(node, a_key, book)
    await send_all(a, "x", 10)
    assert (await rest.snapshot(a_key, book, 4, None, b"first"))[0] == 200
    results = await asyncio.gather(rest.snapshot(a_key, book, 8, 4, b"from-a" * 100),
                                   rest.snapshot(b_key, book, 9, 4, b"from-b" * 100))
    statuses = sorted(status for status, _ in results)
    assert statuses == [200, 409], results
    loser = next(body for status, body in results if status == 409)
    assert loser["error"]["code"] == "CONFLICT"
    winner_seq = next(body["data"]["seq"] for status, body in results if status == 200)
    status, body, _ = await rest.call("GET", f"/books/{book}/snapshot", b_key)
    assert body["data"]["seq"] == winner_seq
    # The stale base again: conflict; the right base: accepted.
    assert (await rest.snapshot(b_key, book, 10, 4, b"late"))[0] == 409
    assert (await rest.snapshot(b_key, book, 10, winner_seq, b"next"))[0] == 200
    await a.ws.close()


async def test_snapshot_requests_are_validated(node: Any) -> None:
    book, (a_key,) = await book_of(node, 1)
    rest = Rest(node)
    status, body, _ = await rest.call("GET", f"/books/{book}/snapshot", a_key)
    assert status == 404 and body["error"]["code"] == "NOT_FOUND"
    status, body = await rest.snapshot(a_key, book, 5, None, b"x")  # the book has no op 5
    assert status == 400 and body["error"]["code"] == "VALIDATION_ERROR"
    status, body, _ = await rest.call("PUT", f"/books/{book}/snapshot", a_key, json={"seq": 1})
    assert status == 400 and body["error"]["code"] == "VALIDATION_ERROR"
    form = aiohttp.FormData()
    form.add_field("file", b"x", filename="f")
    form.add_field("metadata", "{}")
    status, body, _ = await rest.call("PUT", f"/books/{book}/snapshot", a_key, data=form)
    assert status == 400 and body["error"]["code"] == "VALIDATION_ERROR"


async def test_a_snapshot_over_the_limit_is_refused_and_not_kept(
    server_factory: Any, make_settings: Callable[..., Settings]
) -> None:
    server = await server_factory(make_settings(snapshot_max_bytes=1000))
    book, (a_key,) = await book_of(server, 1)
    a = await open_peer(server, a_key, book)
    await a.op(b"x")
    status, body = await Rest(server).snapshot(a_key, book, 1, None, b"y" * 5000)
    assert status == 413 and body["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert await server.services.db.fetchval("SELECT count(*) FROM book_snapshots") == 0
    blob_dir = server.settings.effective_blob_dir
    assert not [p for p in blob_dir.rglob("*") if p.is_file() and "snapshots" in p.parts]
    await a.ws.close()


# -- order and durability ------------------------------------------------------------------------------


async def test_an_op_whose_publish_was_lost_is_delivered_from_the_store_in_order(node: Any) -> None:
    book, (a_key, b_key) = await book_of(node, 2)
    a = await open_peer(node, a_key, book)
    b = await open_peer(node, b_key, book)
    await a.op(b"one")
    # Commit seq 2 without publishing it (a node killed between its commit and its publish).
    db = node.services.db
    async with db.transaction() as tx:
        await history.append_batch(tx, db.dialect, [NewOp(book, a_key.device_id or "", None, b"lost", 1, 1)], 0)
    await a.op(b"three")  # seq 3 reveals the gap: seq 2 is read from the store first
    while len(b.ops()) < 3:
        await b.recv()
    assert [f["seq"] for f in b.ops()] == [1, 2, 3]
    assert payloads(b.ops()) == ["one", "lost", "three"]
    # And with no later op to reveal it, the poll finds it (the second look that sees no progress).
    async with db.transaction() as tx:
        await history.append_batch(tx, db.dialect, [NewOp(book, a_key.device_id or "", None, b"quiet", 1, 1)], 0)
    relay = book_relay.for_state(node.state)
    await relay.poll()  # behind, but maybe an op whose publish is on its way: only noted
    await b.send({"type": "ping"})
    assert await b.recv() == {"type": "pong"}  # nothing delivered by the first look
    await relay.poll()  # still stuck at the same seq: read from the store
    frame = await until_type(b, "crdt_operation")
    assert frame["seq"] == 4 and base64.b64decode(frame["payload"]) == b"quiet"
    await a.ws.close()
    await b.ws.close()


async def test_a_resent_op_id_is_acknowledged_once_across_a_restart(
    server_factory: Any, backend_settings: Settings
) -> None:
    first = await server_factory(backend_settings)
    book, (a_key, b_key) = await book_of(first, 2)
    a = await open_peer(first, a_key, book)
    seq = await a.op(b"once", op_id="op-1")
    await a.ws.close()
    await first.close()
    second = await server_factory(backend_settings)  # a fresh node: no in-memory dedupe
    b = await open_peer(second, b_key, book)
    a = await open_peer(second, a_key, book)
    assert await a.op(b"once", op_id="op-1") == seq
    assert await a.op(b"twice", op_id="op-2") == seq + 1
    frame = await until_type(b, "crdt_operation")
    assert frame["seq"] == seq + 1  # the re-send was not relayed again
    assert int(await second.services.db.fetchval("SELECT count(*) FROM book_ops WHERE book_id = $1", book)) == 2
    await a.ws.close()
    await b.ws.close()


# -- REST ------------------------------------------------------------------------------------------------


async def test_relay_send_takes_the_socket_path(node: Any) -> None:
    book, (a_key, b_key) = await book_of(node, 2)
    rest = Rest(node)
    b = await open_peer(node, b_key, book)
    body = {"book_id": book, "type": "crdt_operation", "payload": b64(b"via-rest"), "timestamp": 1706860800,
            "id": "r-1"}
    status, answer, _ = await rest.call("POST", "/relay/send", a_key, json=body)
    assert status == 200 and answer["data"] == {"seq": 1}, answer
    frame = await until_type(b, "crdt_operation")
    assert frame["seq"] == 1 and frame["device_id"] == a_key.device_id and frame["timestamp"] == 1706860800
    assert base64.b64decode(frame["payload"]) == b"via-rest"
    status, answer, _ = await rest.call("POST", "/relay/send", a_key, json=body)  # re-sent id
    assert status == 200 and answer["data"] == {"seq": 1}
    for bad in ({"type": "other"}, {"payload": "not base64!"}, {"payload": ""}, {"timestamp": "now"},
                {"id": ""}, {"id": "x" * 200}):
        status, answer, _ = await rest.call("POST", "/relay/send", a_key, json={**body, **bad})
        assert status == 400 and answer["error"]["code"] == "VALIDATION_ERROR", bad
    outsider = await insert_device(node.services.db)
    status, answer, _ = await rest.call("POST", "/relay/send", outsider, json=body)
    assert status == 403 and answer["error"]["code"] == "FORBIDDEN"
    await b.ws.close()


async def test_relay_send_is_limited_per_device_with_the_paid_figures_on_paid_books(
    server_factory: Any, make_settings: Callable[..., Settings]
) -> None:
    server = await server_factory(make_settings(rate_relay_send="3/86400", rate_relay_send_paid="6/86400"))
    book, (a_key,) = await book_of(server, 1)
    rest = Rest(server)

    async def send(i: int) -> tuple[int, Any, Any]:
        return await rest.call("POST", "/relay/send", a_key, json={
            "book_id": book, "type": "crdt_operation", "payload": b64(b"%d" % i), "timestamp": 1})

    assert [(await send(i))[0] for i in range(3)] == [200, 200, 200]
    status, body, headers = await send(3)
    assert status == 429 and body["error"]["code"] == "RATE_LIMIT_EXCEEDED"
    assert headers["X-RateLimit-Limit"] == "3" and headers["X-RateLimit-Remaining"] == "0"
    assert int(headers["Retry-After"]) > 0 and int(headers["X-RateLimit-Reset"]) > time.time()
    await server.services.db.execute("UPDATE books SET tier = 'paid' WHERE id = $1", book)
    assert [(await send(i))[0] for i in range(4, 11)] == [200] * 6 + [429]  # the paid figure: 6


async def test_sync_status_reports_counts_and_times_only(node: Any) -> None:
    book, (a_key, b_key) = await book_of(node, 2)
    rest = Rest(node)
    a = await open_peer(node, a_key, book)
    b = await open_peer(node, b_key, book)
    await send_all(a, "x", 5)
    while len(b.ops()) < 5:
        await b.recv()
    await book_relay.for_state(node.state).flush_sync()
    status, body, _ = await rest.call("GET", f"/books/{book}/sync_status", b_key)
    assert status == 200, body
    data = body["data"]
    assert data["head_seq"] == 5 and data["ops_total"] == 5 and data["retained_from_seq"] == 1
    assert data["snapshot_seq"] is None and data["last_op_at"].endswith("Z")
    devices = {d["device_id"]: d for d in data["devices"]}
    assert set(devices) == {a_key.device_id, b_key.device_id}
    assert devices[b_key.device_id]["delivered_seq"] == 5
    assert devices[b_key.device_id]["last_active_at"] is not None
    assert set(data) == {"head_seq", "ops_total", "last_op_at", "retained_from_seq", "snapshot_seq", "devices"}
    outsider = await insert_device(node.services.db)
    status, body, _ = await rest.call("GET", f"/books/{book}/sync_status", outsider)
    assert status == 403
    await a.ws.close()
    await b.ws.close()
