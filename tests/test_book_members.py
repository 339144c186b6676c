"""Book members and the operator's tier (rest.md "E2EE devices, books, pairing, relay"):
``GET /books/{id}/devices`` in the seed's shape, ``DELETE /books/{id}/devices/{device_id}``
(device.removed then close 1008 on every node, the token refused at once on REST and on the
upgrade, other sockets untouched), and ``PATCH /books/{id}`` ``{tier}`` for operators, whose paid
figures the per-device limits then use. Real servers on real ports; members are added straight
into the store (pairing is another route)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from websockets.exceptions import ConnectionClosed

from api.app import create_app
from api.book_access import book_tier, hit_device_limit, require_member
from api.envelope import ok
from relay import book_relay
from shared import revocation
from shared.clock import iso_ms
from shared.config import Settings
from shared.secrets import hash_id
from shared.services import Services
from tests.auth_helpers import ISO_UTC, PASSWORD
from tests.device_helpers import DeviceKey, add_member, insert_book, insert_device
from tests.test_book_relay import TIMEOUT, Peer, open_peer
from tests.test_ws_handshake import refused

OPERATOR = "op@example.com"


class Api:
    """REST calls against a running server, answering ``(status, envelope or None)``."""

    def __init__(self, server: Any) -> None:
        self.base = f"http://127.0.0.1:{server.port}/api/v1"

    async def call(self, method: str, path: str, token: str | None = None, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with aiohttp.ClientSession() as http, http.request(
            method, self.base + path, headers=headers, json=body
        ) as resp:
            text = await resp.text()
            return resp.status, (json.loads(text) if text else None)

    async def ok(self, method: str, path: str, token: str | None = None, body: Any = None, status: int = 200) -> Any:
        got, envelope = await self.call(method, path, token, body)
        assert got == status, envelope
        return None if envelope is None else envelope["data"]

    async def fails(self, method: str, path: str, status: int, code: str, token: str | None = None,
                    body: Any = None) -> dict[str, Any]:
        got, envelope = await self.call(method, path, token, body)
        assert (got, envelope["error"]["code"]) == (status, code), envelope
        assert envelope["success"] is False
        return dict(envelope["error"])


@pytest.fixture
async def server(server_factory: Any, backend_settings: Settings) -> Any:
    """One node on SQLite, or on PostgreSQL + Redis."""
    return await server_factory(backend_settings)


async def devices(server: Any, count: int) -> list[DeviceKey]:
    return [await insert_device(server.services.db) for _ in range(count)]


async def upgrade_refused(server: Any, book_id: str, token: str) -> tuple[int, str]:
    status, _, error = await refused(server, f"/ws/relay/{book_id}", {"Authorization": f"Bearer {token}"})
    return status, error["code"]


async def removed_then_closed(peer: Peer) -> None:
    """The socket gets ``device.removed`` and then the 1008 close, nothing after the frame."""
    await peer.until(lambda f: f["type"] == "device.removed")
    assert peer.frames[-1] == {"type": "device.removed"}
    with pytest.raises(ConnectionClosed):
        await peer.recv()
    assert peer.ws.close_code == 1008, peer.ws.close_code


async def still_open(peer: Peer) -> None:
    await peer.send({"type": "ping"})
    assert await peer.until(lambda f: f["type"] == "pong") == {"type": "pong"}
    assert peer.ws.close_code is None


# -- the member list ---------------------------------------------------------------------------------


async def test_the_device_list_has_the_seed_s_shape_and_marks_the_caller(server: Any) -> None:
    api = Api(server)
    db = server.services.db
    a, b, gone, other = await devices(server, 4)
    book = await insert_book(db, a, b, gone)
    await insert_book(db, other)
    active_ms = 1_770_114_600_123  # 2026-02-03T10:30:00.123Z
    await db.execute("UPDATE devices SET last_active_at = $2 WHERE id = $1", a.device_id, active_ms)
    await db.execute("UPDATE book_members SET removed_at = 1 WHERE device_id = $1", gone.device_id)
    for joined, key in ((1000, a), (2000, b)):  # listed in the order they joined
        await db.execute("UPDATE book_members SET joined_at = $2 WHERE device_id = $1", key.device_id, joined)

    data = await api.ok("GET", f"/books/{book}/devices", a.token())
    assert data == {
        "devices": [
            {"device_id": a.device_id, "public_key": a.public_b64, "last_active_at": iso_ms(active_ms),
             "is_current": True},
            {"device_id": b.device_id, "public_key": b.public_b64, "last_active_at": None, "is_current": False},
        ],
        "total_count": 2,
    }
    assert data["devices"][0]["last_active_at"] == "2026-02-03T10:30:00.123Z"
    assert ISO_UTC.match(data["devices"][0]["last_active_at"])

    as_b = await api.ok("GET", f"/books/{book}/devices", b.token(book))  # a token bound to this book
    assert [(d["device_id"], d["is_current"]) for d in as_b["devices"]] == [(a.device_id, False), (b.device_id, True)]
    # A device that joins later is listed after the others.
    late = await insert_device(db)
    await add_member(db, book, str(late.device_id))
    listed = await api.ok("GET", f"/books/{book}/devices", late.token())
    assert [d["device_id"] for d in listed["devices"]] == [a.device_id, b.device_id, late.device_id]
    assert listed["total_count"] == 3


async def test_outsiders_other_books_tokens_and_other_credentials_are_refused(server: Any) -> None:
    api = Api(server)
    db = server.services.db
    x_member, y_member, both = await devices(server, 3)
    book_x = await insert_book(db, x_member, both)
    book_y = await insert_book(db, y_member, both)

    for method, path in (("GET", f"/books/{book_y}/devices"), ("DELETE", f"/books/{book_y}/devices/{y_member.device_id}")):
        await api.fails(method, path, 403, "FORBIDDEN", x_member.token())  # a device of book X only
        await api.fails(method, path, 403, "FORBIDDEN", both.token(book_x))  # a member, but bound to X
        await api.fails(method, path, 401, "INVALID_TOKEN")
    # An unknown book answers like a book one is not in.
    await api.fails("GET", "/books/no-such-book/devices", 403, "FORBIDDEN", x_member.token())
    await api.fails("DELETE", f"/books/no-such-book/devices/{x_member.device_id}", 403, "FORBIDDEN", x_member.token())
    # A user's own JWT is no device.
    async with aiohttp.ClientSession() as http:
        await http.post(api.base + "/auth/register", json={"email": "u@example.com", "password": PASSWORD})
        resp = await http.post(api.base + "/auth/login", json={"email": "u@example.com", "password": PASSWORD})
        access = (await resp.json())["data"]["access_token"]
    await api.fails("GET", f"/books/{book_y}/devices", 403, "FORBIDDEN", access)

    # Nothing was removed by the refused calls.
    listed = await api.ok("GET", f"/books/{book_y}/devices", y_member.token())
    assert {d["device_id"] for d in listed["devices"]} == {y_member.device_id, both.device_id}


# -- removal -------------------------------------------------------------------------------------------


async def test_a_removed_device_is_told_closed_1008_and_refused_from_then_on(server: Any) -> None:
    api = Api(server)
    db = server.services.db
    lost, keeper, third = await devices(server, 3)
    book = await insert_book(db, lost, keeper, third)
    elsewhere = await insert_book(db, lost, keeper)  # the lost phone stays in this one
    doomed = await open_peer(server, lost, book)
    doomed_bound = await open_peer(server, lost, book, token=lost.token(book))
    keeper_peer = await open_peer(server, keeper, book)
    lost_elsewhere = await open_peer(server, lost, elsewhere)

    assert await api.ok("DELETE", f"/books/{book}/devices/{lost.device_id}", keeper.token(), status=204) is None
    await removed_then_closed(doomed)
    await removed_then_closed(doomed_bound)
    await still_open(keeper_peer)  # the other members keep their sockets
    await still_open(lost_elsewhere)  # and the removed device its sockets on other books

    # Its tokens stop working for this book, on REST and on the upgrade (403 before any 101).
    await api.fails("GET", f"/books/{book}/devices", 403, "FORBIDDEN", lost.token())
    await api.fails("DELETE", f"/books/{book}/devices/{keeper.device_id}", 403, "FORBIDDEN", lost.token())
    assert await upgrade_refused(server, book, lost.token()) == (403, "FORBIDDEN")
    assert await upgrade_refused(server, book, lost.token(book)) == (403, "FORBIDDEN")
    # ... and only for this book.
    listed = await api.ok("GET", f"/books/{elsewhere}/devices", lost.token())
    assert {d["device_id"] for d in listed["devices"]} == {lost.device_id, keeper.device_id}

    listed = await api.ok("GET", f"/books/{book}/devices", third.token())
    assert {d["device_id"] for d in listed["devices"]} == {keeper.device_id, third.device_id}
    removed_at = await db.fetchval(
        "SELECT removed_at FROM book_members WHERE book_id = $1 AND device_id = $2", book, lost.device_id
    )
    assert removed_at is not None and removed_at > 1
    # Gone already: a second removal is DEVICE_NOT_FOUND.
    await api.fails("DELETE", f"/books/{book}/devices/{lost.device_id}", 404, "DEVICE_NOT_FOUND", third.token())

    rows = await db.fetch("SELECT user_id, event, subject_hash, ip_hash, details FROM audit_log WHERE event = $1",
                          "book.device_removed")
    assert len(rows) == 1
    row = rows[0]
    assert row["user_id"] is None and row["subject_hash"] == hash_id(str(lost.device_id)) and row["ip_hash"]
    assert json.loads(row["details"]) == {"book": hash_id(book), "by_device": hash_id(str(keeper.device_id)),
                                          "self": False}
    for raw in (book, lost.device_id, keeper.device_id):
        assert raw not in row["details"]
    for peer in (keeper_peer, lost_elsewhere):
        await peer.ws.close()


async def test_removing_an_unknown_or_foreign_device_is_device_not_found(server: Any) -> None:
    api = Api(server)
    db = server.services.db
    member, stranger = await devices(server, 2)
    book = await insert_book(db, member)
    await insert_book(db, stranger)
    await api.fails("DELETE", f"/books/{book}/devices/no-such-device", 404, "DEVICE_NOT_FOUND", member.token())
    await api.fails("DELETE", f"/books/{book}/devices/{stranger.device_id}", 404, "DEVICE_NOT_FOUND", member.token())
    peer = await open_peer(server, stranger, (await db.fetchval(
        "SELECT book_id FROM book_members WHERE device_id = $1", stranger.device_id)))
    await still_open(peer)  # no notice went out for it
    assert await db.fetchval("SELECT COUNT(*) FROM audit_log WHERE event = 'book.device_removed'") == 0
    await peer.ws.close()


async def test_a_device_may_remove_itself_and_so_leave_the_book(server: Any) -> None:
    api = Api(server)
    db = server.services.db
    leaver, stayer = await devices(server, 2)
    book = await insert_book(db, leaver, stayer)
    leaver_peer = await open_peer(server, leaver, book)
    stayer_peer = await open_peer(server, stayer, book)
    await api.ok("DELETE", f"/books/{book}/devices/{leaver.device_id}", leaver.token(book), status=204)
    await removed_then_closed(leaver_peer)
    await stayer_peer.until(lambda f: f == {"type": "device.offline", "device_id": leaver.device_id})
    await still_open(stayer_peer)
    await api.fails("GET", f"/books/{book}/devices", 403, "FORBIDDEN", leaver.token())
    listed = await api.ok("GET", f"/books/{book}/devices", stayer.token())
    assert listed == {"devices": [{"device_id": stayer.device_id, "public_key": stayer.public_b64,
                                   "last_active_at": None, "is_current": True}], "total_count": 1}
    details = await db.fetchval("SELECT details FROM audit_log WHERE event = 'book.device_removed'")
    assert json.loads(details)["self"] is True
    await stayer_peer.ws.close()


async def test_removal_closes_the_device_s_sockets_on_every_node(
    server_factory: Any, make_settings: Callable[..., Settings], pg_url: str, pg_schema: str,
    redis_url: str, redis_prefix: str,
) -> None:
    def settings() -> Settings:
        return make_settings(database_url=pg_url, database_schema=pg_schema, redis_url=redis_url,
                             redis_prefix=redis_prefix)

    node1 = await server_factory(settings())
    node2 = await server_factory(settings())
    lost, keeper = await devices(node1, 2)
    book = await insert_book(node1.services.db, lost, keeper)
    on_node2 = await open_peer(node2, lost, book)
    on_node1 = await open_peer(node1, lost, book)
    keeper_node2 = await open_peer(node2, keeper, book)

    await Api(node1).ok("DELETE", f"/books/{book}/devices/{lost.device_id}", keeper.token(), status=204)
    await removed_then_closed(on_node2)  # through the shared revoke channel
    await removed_then_closed(on_node1)
    await still_open(keeper_node2)
    await Api(node2).fails("GET", f"/books/{book}/devices", 403, "FORBIDDEN", lost.token())
    assert await upgrade_refused(node2, book, lost.token()) == (403, "FORBIDDEN")
    await keeper_node2.ws.close()


# -- the tier ------------------------------------------------------------------------------------------


async def operator_tokens(api: Api) -> dict[str, str]:
    """Access JWTs of an operator and of a plain user, and API tokens with and without admin."""
    tokens: dict[str, str] = {}
    for name, email in (("operator", OPERATOR), ("user", "plain@example.com")):
        assert (await api.call("POST", "/auth/register", body={"email": email, "password": PASSWORD}))[0] == 201
        login = await api.ok("POST", "/auth/login", body={"email": email, "password": PASSWORD})
        tokens[name] = login["access_token"]
    made = await api.ok("POST", "/tokens", tokens["operator"], {"name": "ops", "scopes": ["admin"]}, status=201)
    tokens["admin_token"] = made["token"]
    made = await api.ok("POST", "/tokens", tokens["operator"], {"name": "pub", "scopes": ["publish"]}, status=201)
    tokens["publish_token"] = made["token"]
    return tokens


async def test_only_operators_set_a_book_s_tier_and_it_is_stored_and_audited(
    server_factory: Any, backend: str, backend_settings: Settings
) -> None:
    server = await server_factory(dataclasses.replace(backend_settings, admin_emails=OPERATOR))
    api = Api(server)
    db = server.services.db
    (member,) = await devices(server, 1)
    book = await insert_book(db, member)
    tokens = await operator_tokens(api)
    path = f"/books/{book}"

    for who in (tokens["user"], tokens["publish_token"], member.token(), member.token(book)):
        error = await api.fails("PATCH", path, 403, "FORBIDDEN", who, {"tier": "paid"})
        assert error["details"] == {"scope": "admin"}
    await api.fails("PATCH", path, 401, "INVALID_TOKEN", None, {"tier": "paid"})
    assert await book_tier(db, book) == "free"

    for bad in ({"tier": "gold"}, {"tier": 1}, {"tier": "PAID"}, {}, {"tier": None}):
        error = await api.fails("PATCH", path, 400, "VALIDATION_ERROR", tokens["operator"], bad)
        assert error["details"]["field"] == "tier", error
    status, envelope = await api.call("PATCH", path, tokens["operator"], None)  # no body at all
    assert (status, envelope["error"]["code"]) == (400, "VALIDATION_ERROR")
    await api.fails("PATCH", "/books/no-such-book", 404, "BOOK_NOT_FOUND", tokens["operator"], {"tier": "paid"})

    assert await api.ok("PATCH", path, tokens["operator"], {"tier": "paid"}) == {"book_id": book, "tier": "paid"}
    assert await db.fetchval("SELECT tier FROM books WHERE id = $1", book) == "paid"
    assert await book_tier(db, book) == "paid"
    assert await api.ok("PATCH", path, tokens["admin_token"], {"tier": "free"}) == {"book_id": book, "tier": "free"}
    assert await book_tier(db, book) == "free"
    # The members see nothing change in their list (tier is the operator's business).
    assert (await api.ok("GET", f"{path}/devices", member.token()))["total_count"] == 1

    rows = await db.fetch(
        "SELECT user_id, subject_hash, details FROM audit_log WHERE event = 'book.tier_changed' ORDER BY id"
    )
    operator_id = await db.fetchval("SELECT id FROM users WHERE email = $1", OPERATOR)
    assert [(r["user_id"], r["subject_hash"], json.loads(r["details"])) for r in rows] == [
        (operator_id, hash_id(book), {"tier": "paid", "previous": "free"}),
        (operator_id, hash_id(book), {"tier": "free", "previous": "paid"}),
    ]


def _app_with_a_limited_probe(services: Services) -> web.Application:
    """The real app plus one route counting a per-device limit, as the photo and relay routes do."""
    app = create_app(services)

    async def probe(request: web.Request) -> web.StreamResponse:
        book_id = request.match_info["book_id"]
        principal = await require_member(request, book_id)
        assert principal.device_id is not None
        await hit_device_limit(request, "rate_photo_upload", principal.device_id, book_id, "photo uploads")
        return ok(request)

    app.router.add_post("/api/v1/test-probe/{book_id}", probe)
    return app


async def test_a_paid_tier_selects_the_paid_figure_of_a_device_limit(
    server_factory: Any, backend_settings: Settings
) -> None:
    settings = dataclasses.replace(backend_settings, admin_emails=OPERATOR, rate_photo_upload="1/86400",
                                   rate_photo_upload_paid="3/86400")
    server = await server_factory(settings, app_factory=_app_with_a_limited_probe)
    api = Api(server)
    free_device, paid_device = await devices(server, 2)
    free_book = await insert_book(server.services.db, free_device)
    paid_book = await insert_book(server.services.db, paid_device)
    tokens = await operator_tokens(api)
    await api.ok("PATCH", f"/books/{paid_book}", tokens["admin_token"], {"tier": "paid"})

    await api.ok("POST", f"/test-probe/{free_book}", free_device.token())
    await api.fails("POST", f"/test-probe/{free_book}", 429, "RATE_LIMIT_EXCEEDED", free_device.token())
    for _ in range(3):
        await api.ok("POST", f"/test-probe/{paid_book}", paid_device.token())
    await api.fails("POST", f"/test-probe/{paid_book}", 429, "RATE_LIMIT_EXCEEDED", paid_device.token())


async def test_the_device_removed_frame_is_sent_to_msgpack_peers_too(server: Any) -> None:
    db = server.services.db
    lost, keeper = await devices(server, 2)
    book = await insert_book(db, lost, keeper)
    peer = await open_peer(server, lost, book, msgpack_codec=True)
    await Api(server).ok("DELETE", f"/books/{book}/devices/{lost.device_id}", keeper.token(), status=204)
    await asyncio.wait_for(removed_then_closed(peer), TIMEOUT)


async def test_a_socket_still_subscribing_is_matched_by_its_token_s_binding(
    server_factory: Any, make_settings: Callable[..., Settings]
) -> None:
    """Between the 101 and the relay recording a socket's book (its subscription), the token's
    binding names the book, so a bound socket is closed even then. The in-process broker delivers
    the notice within the announce, so the window is held open here by hiding the relay's records
    for that one call. (An unbound token's socket in that window is not found: relay/revocation.py.)"""
    server = await server_factory(make_settings())
    lost, keeper = await devices(server, 2)
    book = await insert_book(server.services.db, lost, keeper)
    bound = await open_peer(server, lost, book, token=lost.token(book))
    unbound = await open_peer(server, lost, book)
    relay = server.services.extras[book_relay.EXTRAS_KEY]
    conns = server.state.registry.by_device(lost.device_id)
    assert len(conns) == 2
    hidden = {conn: relay.sockets.pop(conn) for conn in conns}
    try:
        await revocation.book_device_removed(server.services, book, str(lost.device_id))
    finally:
        relay.sockets.update(hidden)
    await removed_then_closed(bound)
    await unbound.ws.close()
